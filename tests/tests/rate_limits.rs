//! I/O limits, measured by the guest: the probe's bench modes time each
//! phase by when its begin and end lines reach the console, and the rate a
//! phase achieved must be within 10% of the configured one. A live Update
//! between two phases changes the limit the next phase gets.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_tests::agent::*;
use berth_tests::contract::common::RateLimit;
use berth_tests::contract::vm as pb;
use berth_tests::*;

/// When each console line first appeared, watched every millisecond.
struct LineClock {
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    stop: Arc<AtomicBool>,
}

impl LineClock {
    fn start(log: PathBuf) -> LineClock {
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let text =
                    String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
                let now = Instant::now();
                let mut seen = s.lock().unwrap();
                // Only whole lines: the last one may still be arriving.
                for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
                    let line = line.trim_end_matches(['\r', '\n']);
                    if line.starts_with("PROBE bench") && !seen.contains_key(line) {
                        seen.insert(line.to_string(), now);
                    }
                }
                drop(seen);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        LineClock { seen, stop }
    }

    /// Waits for a line starting with `prefix`; returns it and when it came.
    fn wait(&self, prefix: &str, timeout: Duration) -> (String, Instant) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((line, at)) = (self.seen.lock().unwrap().iter())
                .find(|(l, _)| l.starts_with(prefix))
                .map(|(l, a)| (l.clone(), *a))
            {
                return (line, at);
            }
            assert!(Instant::now() < deadline, "no {prefix:?} on the console");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Seconds between a phase's begin line and its end line, and the end
    /// line's `key=` value.
    fn phase(&self, phase: &str, key: &str, timeout: Duration) -> (f64, u64) {
        let (_, begin) = self.wait(&format!("PROBE bench {phase} begin"), timeout);
        let (end_line, end) = self.wait(&format!("PROBE bench {phase} end"), timeout);
        assert!(end_line.contains("status=0"), "{end_line}");
        let value = (end_line.split_whitespace())
            .find_map(|w| w.strip_prefix(&format!("{key}="))?.parse().ok())
            .unwrap_or_else(|| panic!("no {key}= in {end_line}"));
        ((end - begin).as_secs_f64(), value)
    }
}

impl Drop for LineClock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn limit(bytes_per_s: u64, bytes_burst: u64, ops_per_s: u64, ops_burst: u64) -> RateLimit {
    RateLimit {
        bytes_per_s,
        bytes_burst,
        ops_per_s,
        ops_burst,
        ..Default::default()
    }
}

/// The limit holds (at most 10% over, for the clock's granularity), and
/// the limiter does not hold the guest far below it. The lower bound is
/// loose on purpose: on a loaded host the guest and the limiter's timer
/// wake late (a CI run measured 0.89 for 400 ops/s with a burst of 1),
/// which says nothing about the limiter.
fn holds_the_limit(what: &str, measured: f64, configured: f64) {
    let ratio = measured / configured;
    eprintln!("{what}: {measured:.0} per s against {configured:.0} (ratio {ratio:.3})");
    assert!(
        (0.75..=1.1).contains(&ratio),
        "{what}: measured {measured:.0}/s, configured {configured:.0}/s"
    );
}

/// The agent samples each VM about once a second: waits for a sample in
/// which `device`/`direction` has served at least `ops` requests.
async fn device_stats(
    c: &Clients,
    id: &str,
    device: &str,
    direction: &str,
    ops: u64,
) -> berth_tests::contract::common::DeviceStats {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = c.vms.stats(ctx(), &vm_ref(id)).await.expect("stats");
        let found = (s.devices.iter())
            .find(|d| d.device == device && d.direction == direction)
            .cloned();
        match found {
            Some(d) if d.ops >= ops => return d,
            other => assert!(Instant::now() < deadline, "{device}/{direction}: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn disk_limits_hold_the_guest_to_its_rate_and_change_live() {
    report_mode("disk rate limit");
    let agent = TestAgent::new("rate-disk");
    let c = agent.clients().await;
    let disk = agent.dir.join("disks/bench.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let mut spec = probe_spec(
        "limited",
        1,
        "probe.mode=blkbench probe.bench_mib=16 probe.bench_req_kib=64 probe.bench_depth=4 probe.bench_ops=600",
    );
    spec.disks.push(pb::Disk {
        path: disk.display().to_string(),
        limit: protobuf::MessageField::some(limit(4 << 20, 64 << 10, 0, 0)),
        ..Default::default()
    });
    let clock = LineClock::start(agent.vm_dir("limited").join("run/console.log"));
    create_and_start(&c, spec.clone()).await;

    let (secs, bytes) = clock.phase("seq_write", "bytes", Duration::from_secs(60));
    // The first burst passes at once; the rest at the rate.
    holds_the_limit(
        "seq_write bytes",
        (bytes - (64 << 10)) as f64 / secs,
        (4 << 20) as f64,
    );

    // Live, as soon as the write phase ended: 4x the bytes, and 400 ops/s.
    spec.disks[0].limit = protobuf::MessageField::some(limit(16 << 20, 64 << 10, 400, 1));
    let req = pb::UpdateVmRequest {
        spec: protobuf::MessageField::some(spec),
        ..Default::default()
    };
    c.vms.update(ctx(), &req).await.expect("live update");
    let (secs, bytes) = clock.phase("seq_read", "bytes", Duration::from_secs(60));
    holds_the_limit("seq_read bytes", bytes as f64 / secs, (16 << 20) as f64);
    let (secs, ops) = clock.phase("rand_read", "ops", Duration::from_secs(60));
    holds_the_limit("rand_read ops", ops as f64 / secs, 400.0);

    let d = device_stats(&c, "limited", "disk0", "io", 600).await;
    assert!(d.bytes >= 2 * (16 << 20), "{d:?}");
    assert!(
        d.throttled_ns > 3_000_000_000,
        "held back most of the run: {d:?}"
    );
    assert_eq!(d.limit.ops_per_s, 400);
    // The same sample carries the exits by reason: the probe drives its
    // disk through MMIO and prints through the serial port.
    let s = c.vms.stats(ctx(), &vm_ref("limited")).await.unwrap();
    for reason in ["mmio_write", "mmio_read", "io_out"] {
        assert!(
            s.exits_by_reason.get(reason).copied().unwrap_or(0) > 0,
            "{reason}: {:?}",
            s.exits_by_reason
        );
    }
    assert!(s.exits_by_reason.values().sum::<u64>() >= s.exits, "{s:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_nic_tx_limit_holds_the_guest_to_its_rate() {
    report_mode("net rate limit");
    let agent = TestAgent::new("rate-net");
    let c = agent.clients().await;
    let tap = format!("brl{}", std::process::id() % 100_000);
    let mut spec = probe_spec(
        "sender",
        1,
        "probe.mode=netbench probe.bench_tx_frames=2000 probe.bench_rx_frames=1 probe.bench_rx_timeout=10000000000",
    );
    spec.nics.push(pb::Nic {
        tap: tap.clone(),
        tx_limit: protobuf::MessageField::some(limit(2 << 20, 16 << 10, 0, 0)),
        ..Default::default()
    });
    let clock = LineClock::start(agent.vm_dir("sender").join("run/console.log"));
    create_and_start(&c, spec).await;
    let (secs, bytes) = clock.phase("net_tx", "bytes", Duration::from_secs(60));
    holds_the_limit(
        "net_tx bytes",
        (bytes - (16 << 10)) as f64 / secs,
        (2 << 20) as f64,
    );
    let tx = device_stats(&c, "sender", "nic0", "tx", 2000).await;
    assert!(tx.throttled_ns > 1_000_000_000, "{tx:?}");
    assert_eq!(tx.limit.bytes_per_s, 2 << 20);
    let _ = std::process::Command::new("ip")
        .args(["link", "del", &tap])
        .status();
}

/// The receive side: the host offers frames faster than the limit; the
/// guest gets them at the limit (the tap holds and then drops the rest).
#[test]
fn a_nic_rx_limit_holds_what_the_guest_receives_to_its_rate() {
    use berth_tests::net::TestTap;
    report_mode("net rx rate limit");
    const MAC: &str = "52:54:00:be:be:07";
    const LIMIT: u64 = 2 << 20;
    let tap = TestTap::create("rl");
    let mut sender = Running::spawn({
        let mut cmd = std::process::Command::new("python3");
        cmd.arg(repo_root().join("tests/support/net_bench_peer.py"))
            .args(["send", &tap.0, MAC, "4000", "1514"]);
        cmd
    });
    sender.wait_for_output("READY", Duration::from_secs(30));
    let mut cmd = vmm_command(
        &probe_elf(),
        1,
        64,
        "probe.mode=netbench probe.bench_tx_frames=1 probe.bench_rx_frames=3000 probe.bench_frame=1514",
    );
    cmd.arg("--nic")
        .arg(format!("tap={},mac={MAC},rx_bps={LIMIT}", tap.0));
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE bench net_rx ready", Duration::from_secs(60));
    let start = Instant::now();
    sender.write_stdin(b"go\n");
    let end_line = loop {
        let out = vm.stdout_so_far();
        // Only a whole line: the last one may still be arriving.
        if let Some(line) = (out.split_inclusive('\n'))
            .find(|l| l.starts_with("PROBE bench net_rx end") && l.ends_with('\n'))
        {
            break line.trim_end_matches(['\r', '\n']).to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no net_rx end:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let secs = start.elapsed().as_secs_f64();
    sender.write_stdin(b"stop\n");
    assert!(end_line.contains("status=0"), "{end_line}");
    let bytes: u64 = end_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("bytes=")?.parse().ok())
        .unwrap();
    // The default burst is a tenth of a second's worth.
    holds_the_limit(
        "net_rx bytes",
        (bytes - LIMIT / 10) as f64 / secs,
        LIMIT as f64,
    );
    vm.wait_for_output("PROBE done", Duration::from_secs(30));
}

/// A limit changed by Update while the VM is hibernated is the one it runs
/// under when it wakes, not the one its snapshot recorded.
#[tokio::test(flavor = "current_thread")]
async fn a_limit_updated_while_hibernated_holds_after_the_wake_up() {
    report_mode("limit across hibernation");
    let agent = TestAgent::new("rate-hibernate");
    let c = agent.clients().await;
    let disk = agent.dir.join("disks/idle.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut spec = probe_spec("sleeper", 1, "probe.mode=tick");
    spec.disks.push(pb::Disk {
        path: disk.display().to_string(),
        limit: protobuf::MessageField::some(limit(4 << 20, 64 << 10, 0, 0)),
        ..Default::default()
    });
    create_and_start(&c, spec.clone()).await;
    wait_console(&agent, "sleeper", "PROBE tick 1", Duration::from_secs(60));
    let req = pb::SnapshotVmRequest {
        id: "sleeper".into(),
        name: "nap".into(),
        hibernate: true,
        ..Default::default()
    };
    c.vms.snapshot(ctx(), &req).await.expect("hibernate");

    spec.disks[0].limit = protobuf::MessageField::some(limit(8 << 20, 128 << 10, 300, 10));
    let req = pb::UpdateVmRequest {
        spec: protobuf::MessageField::some(spec),
        ..Default::default()
    };
    c.vms
        .update(ctx(), &req)
        .await
        .expect("update while hibernated");
    let vm = c.vms.start(ctx(), &vm_ref("sleeper")).await.expect("wake");
    assert_eq!(state_of(&vm), pb::VmState::RUNNING);
    let d = device_stats(&c, "sleeper", "disk0", "io", 0).await;
    let l = &d.limit;
    assert_eq!(
        (l.bytes_per_s, l.bytes_burst, l.ops_per_s, l.ops_burst),
        (8 << 20, 128 << 10, 300, 10),
        "the VMM runs with the updated limit: {d:?}"
    );
}
