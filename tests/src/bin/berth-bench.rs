//! `berth-bench <what>`: benchmarks against a peer measured in the same run
//! (QEMU's microvm machine booting the same probe). Run through
//! `ci/bench.sh`, which builds this and berth-vmm in release mode.
//!
//! boot: process start → first serial byte, start → the probe's done
//! marker, and peak RSS minus the guest RAM actually touched.
//! blk: sequential write and read MiB/s and 4 KiB random-read IOPS of the
//! probe's blkbench mode on a raw file (virtio-blk, page cache on both).
//! net: guest→host and host→guest frame throughput over a tap (virtio-net,
//! no vhost), with a Python AF_PACKET peer on the host end.
//! migrate: live migration over loopback of 512 MiB and 2 GiB guests, idle
//! and dirtying 50 MiB/s, against QEMU's own migration of the same guest.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use berth_tests::{probe_elf, Running};

const RUNS: usize = 10;
const MEMORY_MIB: u64 = 256;
const VCPUS: u32 = 1;
const TIMEOUT: Duration = Duration::from_secs(60);

fn release_vmm() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let vmm = exe.with_file_name("berth-vmm");
    assert!(
        vmm.exists(),
        "{} missing: build it with `cargo build --release -p berth-vmm` (ci/bench.sh does)",
        vmm.display()
    );
    vmm
}

/// The two VMMs measured side by side.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Peer {
    Berth,
    Qemu,
}

impl Peer {
    fn command(self, vmm: &Path, probe: &Path, mode: &str) -> Command {
        self.command_with(vmm, probe, &format!("probe.mode={mode}"), &Attach::Nothing)
    }

    fn command_with(self, vmm: &Path, probe: &Path, cmdline: &str, attach: &Attach) -> Command {
        let mut cmd = self.base_command(vmm, probe, cmdline);
        match (self, attach) {
            (_, Attach::Nothing) => {}
            (Peer::Berth, Attach::Disk(path)) => {
                cmd.arg("--disk").arg(path);
            }
            (Peer::Berth, Attach::Nic { tap, mac }) => {
                cmd.arg("--nic").arg(format!("tap={tap},mac={mac}"));
            }
            (Peer::Qemu, Attach::Disk(path)) => {
                cmd.args(["-global", "virtio-mmio.force-legacy=false", "-drive"])
                    .arg(format!("id=d0,file={},format=raw,if=none", path.display()))
                    .args(["-device", "virtio-blk-device,drive=d0"]);
            }
            (Peer::Qemu, Attach::Nic { tap, mac }) => {
                cmd.args(["-global", "virtio-mmio.force-legacy=false", "-netdev"])
                    .arg(format!(
                        "tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"
                    ))
                    .arg("-device")
                    .arg(format!("virtio-net-device,netdev=n0,mac={mac}"));
            }
        }
        cmd
    }

    fn base_command(self, vmm: &Path, probe: &Path, cmdline: &str) -> Command {
        let cmdline = cmdline.to_string();
        match self {
            Peer::Berth => {
                let mut c = Command::new(vmm);
                c.arg("--kernel")
                    .arg(probe)
                    .args(["--vcpus", &VCPUS.to_string()])
                    .args(["--memory-mib", &MEMORY_MIB.to_string()])
                    .args(["--cmdline", &cmdline, "--console-stdout"])
                    .args(["--console-in", "stdin"]);
                c
            }
            Peer::Qemu => {
                let mut c = Command::new("qemu-system-x86_64");
                c.args(["-enable-kvm", "-cpu", "host,-arch-capabilities"])
                    .args(["-M", "microvm,acpi=off", "-nodefaults", "-no-user-config"])
                    .args(["-nographic", "-no-reboot", "-serial", "stdio"])
                    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
                    .args(["-m", &MEMORY_MIB.to_string(), "-smp", &VCPUS.to_string()])
                    .arg("-kernel")
                    .arg(probe)
                    .args(["-append", &cmdline]);
                c
            }
        }
    }
}

/// What a benchmark attaches to the VM besides the probe.
enum Attach {
    Nothing,
    Disk(PathBuf),
    Nic { tap: String, mac: String },
}

/// A child whose stdout lines are timestamped as they arrive.
struct Timed {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
}

impl Timed {
    fn spawn(mut cmd: Command) -> Timed {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn");
        let out = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let line = line.trim_end_matches('\r').to_string();
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Timed { child, lines }
    }

    /// The first line starting with `prefix`, and when it arrived.
    fn line(&self, prefix: &str) -> (Instant, String) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(found) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|(_, l)| l.starts_with(prefix))
            {
                return found.clone();
            }
            if Instant::now() > deadline {
                let seen: Vec<String> = self
                    .lines
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|l| l.1.clone())
                    .collect();
                panic!(
                    "no line {prefix:?} within {TIMEOUT:?}; saw:\n{}",
                    seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn send(&mut self, text: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    fn finish(mut self) {
        self.close_stdin();
        let deadline = Instant::now() + TIMEOUT;
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=<number>` from a line.
fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn phase_seconds(vm: &Timed, name: &str) -> (f64, String) {
    let (t0, _) = vm.line(&format!("PROBE bench {name} begin"));
    let (t1, end) = vm.line(&format!("PROBE bench {name} end"));
    assert!(end.contains("status=0"), "{name} failed: {end}");
    ((t1 - t0).as_secs_f64(), end)
}

const BENCH_RUNS: usize = 5;

fn bench_blk() {
    let vmm = release_vmm();
    let probe = probe_elf();
    let dir = std::env::temp_dir().join(format!("berth-bench-blk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // 1 GiB written once up front, so no run pays for filling a sparse file.
    let disk = dir.join("disk.img");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&disk).unwrap();
        let chunk = vec![0x5au8; 4 << 20];
        for _ in 0..256 {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let mut results: [[Vec<f64>; 3]; 2] = Default::default();
    println!(
        "blk: {BENCH_RUNS} alternating runs, probe blkbench (1 GiB sequential in 64 KiB requests, 8 in flight; 20000 random 4 KiB reads), 1 GiB raw file, KVM {:?}",
        berth_tests::kvm_mode()
    );
    for _ in 0..BENCH_RUNS {
        for (i, peer) in [Peer::Berth, Peer::Qemu].into_iter().enumerate() {
            let cmd = peer.command_with(
                &vmm,
                &probe,
                "probe.mode=blkbench",
                &Attach::Disk(disk.clone()),
            );
            let vm = Timed::spawn(cmd);
            let mib = |(secs, end): (f64, String)| field(&end, "bytes") / (1 << 20) as f64 / secs;
            results[i][1].push(mib(phase_seconds(&vm, "seq_write")));
            results[i][0].push(mib(phase_seconds(&vm, "seq_read")));
            let (secs, end) = phase_seconds(&vm, "rand_read");
            results[i][2].push(field(&end, "ops") / secs);
            vm.line("PROBE done");
            vm.finish();
        }
    }
    println!("(ratios are berth-vmm / QEMU: above 1 means berth-vmm is faster)");
    let [[br, bw, bi], [qr, qw, qi]] = results;
    let read = report("sequential read", "MiB/s", br, qr);
    let write = report("sequential write", "MiB/s", bw, qw);
    let iops = report("4 KiB random read", "IOPS", bi, qi);
    println!("METRIC blk.seq_read_ratio {read:.3}");
    println!("METRIC blk.seq_write_ratio {write:.3}");
    println!("METRIC blk.randread_iops_ratio {iops:.3}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tap for the benchmark, up, deleted at the end.
struct BenchTap(String);

impl BenchTap {
    fn create() -> BenchTap {
        let name = format!("bb{}", std::process::id());
        for args in [
            vec!["tuntap", "add", "dev", name.as_str(), "mode", "tap"],
            vec!["link", "set", name.as_str(), "up"],
        ] {
            let ok = Command::new("ip")
                .args(&args)
                .status()
                .expect("ip")
                .success();
            assert!(ok, "ip {args:?} failed");
        }
        BenchTap(name)
    }
}

impl Drop for BenchTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

fn net_peer(args: &[&str]) -> Timed {
    let script = berth_tests::repo_root().join("tests/support/net_bench_peer.py");
    let mut cmd = Command::new("python3");
    cmd.arg(script).args(args);
    let peer = Timed::spawn(cmd);
    peer.line("READY");
    peer
}

fn bench_net() {
    const FRAMES: u32 = 50000;
    /// Host send rate: above what the guest takes, so it never starves.
    const SEND_FPS: u32 = 60000;
    const FRAME: u32 = 1514;
    const MAC: &str = "52:54:00:be:be:01";
    let vmm = release_vmm();
    let probe = probe_elf();
    let tap = BenchTap::create();
    let mut results: [[Vec<f64>; 2]; 2] = Default::default();
    println!(
        "net: {BENCH_RUNS} alternating runs, probe netbench, {FRAMES} frames of {FRAME} bytes each way, KVM {:?}",
        berth_tests::kvm_mode()
    );
    let cmdline = format!(
        "probe.mode=netbench probe.bench_tx_frames={FRAMES} probe.bench_rx_frames={FRAMES} probe.bench_frame={FRAME}"
    );
    for _ in 0..BENCH_RUNS {
        for (i, peer) in [Peer::Berth, Peer::Qemu].into_iter().enumerate() {
            let mut receiver = net_peer(&["recv", &tap.0]);
            let mut sender = net_peer(&[
                "send",
                &tap.0,
                MAC,
                &SEND_FPS.to_string(),
                &FRAME.to_string(),
            ]);
            let attach = Attach::Nic {
                tap: tap.0.clone(),
                mac: MAC.to_string(),
            };
            let vm = Timed::spawn(peer.command_with(&vmm, &probe, &cmdline, &attach));
            let (tx_secs, _) = phase_seconds(&vm, "net_tx");
            receiver.close_stdin();
            let (_, got) = receiver.line("RESULT");
            results[i][0].push(field(&got, "bytes") / (1 << 20) as f64 / tx_secs);

            vm.line("PROBE bench net_rx ready");
            let t0 = Instant::now();
            sender.send("go\n");
            let (t1, end) = vm.line("PROBE bench net_rx end");
            sender.send("stop\n");
            assert!(end.contains("status=0"), "net_rx failed: {end}");
            results[i][1].push(field(&end, "bytes") / (1 << 20) as f64 / (t1 - t0).as_secs_f64());
            vm.line("PROBE done");
            vm.finish();
            receiver.finish();
            sender.finish();
        }
    }
    println!("(ratios are berth-vmm / QEMU: above 1 means berth-vmm is faster)");
    let [[btx, brx], [qtx, qrx]] = results;
    let tx = report("guest -> host", "MiB/s", btx, qtx);
    let rx = report("host -> guest", "MiB/s", brx, qrx);
    println!("METRIC net.tx_ratio {tx:.3}");
    println!("METRIC net.rx_ratio {rx:.3}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn bench_api() {
    use berth_tests::agent::{create_and_start, ctx, probe_spec, vm_ref, TestAgent};
    const CALLS: usize = 10_000;
    const STARTS: usize = 20;
    // 21 one-vCPU probes on a small host: admission must let them all in
    // (they idle), so the starts measure the agent, not a refusal.
    let agent = TestAgent::with_config("bench-api", "cpu_overcommit = 16.0\n");
    runtime().block_on(async {
        let c = agent.clients().await;
        let req = berth_tests::contract::vm::CreateVmRequest {
            spec: protobuf::MessageField::some(probe_spec("probe-get", 1, "probe.mode=tick")),
            ..Default::default()
        };
        c.vms.create(ctx(), &req).await.unwrap();
        let target = vm_ref("probe-get");
        let mut rtts = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let t0 = Instant::now();
            c.vms.get(ctx(), &target).await.unwrap();
            rtts.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        rtts.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let (p50, p99) = (percentile(&rtts, 0.5), percentile(&rtts, 0.99));
        println!("GetVm round trip over {CALLS} calls: p50 {p50:.1} us, p99 {p99:.1} us");

        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..STARTS {
            let c = agent.clients().await;
            tasks.push(tokio::spawn(async move {
                let mut spec = probe_spec(&format!("bench-{i}"), 1, "probe.mode=tick");
                spec.memory_mib = 32;
                create_and_start(&c, spec).await
            }));
        }
        for t in tasks {
            let vm = t.await.unwrap();
            assert_eq!(
                vm.status.state.enum_value_or_default(),
                berth_tests::contract::vm::VmState::RUNNING
            );
        }
        let start20 = t0.elapsed().as_secs_f64();
        println!("{STARTS} concurrent create+start to Running: {start20:.2} s");
        let pid = berth_tests::agent::agent_pid(&agent);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss = kib_field(&status, "VmRSS:") as f64 / 1024.0;
        println!("agent RSS with {} VMs: {rss:.1} MiB", STARTS + 1);
        println!("METRIC api.getvm_p50_us {p50:.1}");
        println!("METRIC api.getvm_p99_us {p99:.1}");
        println!("METRIC api.start20_s {start20:.2}");
        println!("METRIC api.agent_rss_mib {rss:.1}");
    });
}

/// Snapshot write speed against dd, restore → first guest output, and the
/// pause of live snapshots with the guest idle and dirtying 50 MiB/s.
fn bench_snapshot() {
    use berth_tests::contract::vmm::SnapshotRequest;
    use berth_tests::contract::vmm_ttrpc::VmmServiceClient;
    let vmm = release_vmm();
    let probe = probe_elf();
    let dir = std::env::temp_dir().join(format!("berth-bench-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rt = runtime();
    let client = |socket: &Path| {
        let address = format!("unix://{}", socket.display());
        rt.block_on(async move {
            VmmServiceClient::new(ttrpc::r#async::Client::connect(&address).await.unwrap())
        })
    };
    let ctx = || ttrpc::context::with_timeout(600_000_000_000);
    let boot = |mib: u64, cmdline: &str, socket: &Path| {
        let mut c = Command::new(&vmm);
        c.arg("--kernel")
            .arg(&probe)
            .args([
                "--vcpus",
                "1",
                "--memory-mib",
                &mib.to_string(),
                "--cmdline",
                cmdline,
            ])
            .args(["--console-stdout", "--console-in", "stdin", "--api-socket"])
            .arg(socket);
        Timed::spawn(c)
    };
    let mut restore_ms = Vec::new();
    let mut write_ratio = Vec::new();
    for mib in [256u64, 1024] {
        // Fill most of RAM so the snapshot has real data to write.
        let fill = mib - 64;
        let socket = dir.join(format!("vmm-{mib}.sock"));
        let vm = boot(
            mib,
            &format!(
                "probe.mode=dirty probe.dirty_mib={fill} probe.dirty_rate=0 probe.report_ms=50"
            ),
            &socket,
        );
        vm.line("PROBE dirty ready");
        let c = client(&socket);
        let snap = dir.join(format!("snap-{mib}"));
        let req = SnapshotRequest {
            dir: snap.display().to_string(),
            resume: false,
            ..Default::default()
        };
        let t0 = Instant::now();
        rt.block_on(c.snapshot(ctx(), &req)).expect("snapshot");
        let secs = t0.elapsed().as_secs_f64();
        let _ = rt.block_on(c.stop(ctx(), &berth_tests::contract::common::Empty::default()));
        vm.finish();
        let snap_mib_s = mib as f64 / secs;
        // dd of the same size to the same disk, synced like the snapshot.
        let dd_target = dir.join("dd.img");
        let t0 = Instant::now();
        let ok = Command::new("dd")
            .args(["if=/dev/zero", "bs=1M", "conv=fsync", "status=none"])
            .arg(format!("of={}", dd_target.display()))
            .arg(format!("count={mib}"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "dd failed");
        let dd_mib_s = mib as f64 / t0.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&dd_target);
        println!("{mib} MiB guest: snapshot written in {secs:.2} s ({snap_mib_s:.0} MiB/s), dd {dd_mib_s:.0} MiB/s");
        write_ratio.push(snap_mib_s / dd_mib_s);

        // Restore: process start → vCPUs about to run, as the VMM measures
        // it, several times.
        let mut times = Vec::new();
        for _ in 0..5 {
            use std::io::BufRead;
            let mut child = Command::new(&vmm)
                .arg("--restore")
                .arg(&snap)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn a restore");
            let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
            let ms: f64 = stderr
                .lines()
                .map_while(Result::ok)
                .find_map(|l| l.split(" in ").nth(1)?.strip_suffix(" ms")?.parse().ok())
                .expect("the VMM reports its restore time");
            times.push(ms);
            let _ = child.kill();
            let _ = child.wait();
        }
        let (_, med, _) = stats(times);
        println!("{mib} MiB guest: restore (process start -> vCPUs run) {med:.2} ms (median of 5)");
        restore_ms.push(med);
    }

    let mut live = Vec::new();
    for rate in [0u32, 50] {
        let socket = dir.join(format!("vmm-live-{rate}.sock"));
        let vm = boot(
            512,
            &format!("probe.mode=dirty probe.dirty_mib=256 probe.dirty_rate={rate}"),
            &socket,
        );
        vm.line("PROBE dirty count=");
        std::thread::sleep(Duration::from_secs(1));
        let c = client(&socket);
        let mut pauses = Vec::new();
        for i in 0..3 {
            let req = SnapshotRequest {
                dir: dir.join(format!("live-{rate}-{i}")).display().to_string(),
                live: true,
                resume: true,
                ..Default::default()
            };
            let r = rt.block_on(c.snapshot(ctx(), &req)).expect("live snapshot");
            println!(
                "live snapshot at {rate} MiB/s: {} passes, {} pages, paused {} ms",
                r.iterations, r.pages_written, r.pause_ms
            );
            pauses.push(r.pause_ms as f64);
        }
        let _ = rt.block_on(c.stop(ctx(), &berth_tests::contract::common::Empty::default()));
        vm.finish();
        live.push(stats(pauses).1);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ratio = write_ratio.iter().sum::<f64>() / write_ratio.len() as f64;
    println!("METRIC snapshot.restore_ms_256m {:.2}", restore_ms[0]);
    println!("METRIC snapshot.restore_ms_1g {:.2}", restore_ms[1]);
    println!("METRIC snapshot.write_vs_dd_ratio {ratio:.3}");
    println!("METRIC snapshot.live_pause_ms_idle {:.1}", live[0]);
    println!("METRIC snapshot.live_pause_ms_dirty50 {:.1}", live[1]);
}

/// Loopback TCP throughput in bytes/s: the link both migrations use.
fn loopback_bytes_per_s(total: usize) -> f64 {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        while got < total {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    });
    let mut w = std::net::TcpStream::connect(address).unwrap();
    let buf = vec![0x5au8; 1 << 20];
    let t0 = Instant::now();
    for _ in 0..total / buf.len() {
        w.write_all(&buf).unwrap();
    }
    drop(w);
    reader.join().unwrap();
    total as f64 / t0.elapsed().as_secs_f64()
}

/// One migration's figures.
#[derive(Debug, Default, Clone, Copy)]
struct MigrationRun {
    total_ms: f64,
    downtime_ms: f64,
    gap_ms: f64,
    bytes: f64,
    iterations: f64,
}

/// The largest gap between the last report on the source and the first on
/// the destination, as the host saw the console lines arrive.
fn console_gap_ms(src: &Timed, dst: &Timed) -> f64 {
    let (first_dst, _) = dst.line("PROBE dirty count=");
    let last_src = src
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, l)| l.starts_with("PROBE dirty count="))
        .map(|(t, _)| *t)
        .max()
        .expect("source reports");
    first_dst.saturating_duration_since(last_src).as_secs_f64() * 1e3
}

fn dirty_cmdline(mib: u64, rate: u32) -> String {
    // Half of RAM (at most the probe's 1 GiB region) holds written data.
    format!(
        "probe.mode=dirty probe.dirty_mib={} probe.dirty_rate={rate} probe.report_ms=5",
        (mib / 2).min(1024)
    )
}

fn migrate_berth(vmm: &Path, dir: &Path, mib: u64, rate: u32) -> MigrationRun {
    use berth_tests::contract::common::Empty;
    use berth_tests::contract::vmm::MigrateRequest;
    use berth_tests::contract::vmm_ttrpc::VmmServiceClient;
    let probe = probe_elf();
    let socket = dir.join(format!("mig-{mib}-{rate}.sock"));
    let addr_file = dir.join(format!("mig-{mib}-{rate}.addr"));
    let token = "bench-migration-token-0123456789";
    let mut src_cmd = Command::new(vmm);
    src_cmd
        .arg("--kernel")
        .arg(&probe)
        .args(["--vcpus", "1", "--memory-mib", &mib.to_string()])
        .args(["--cmdline", &dirty_cmdline(mib, rate), "--console-stdout"])
        .arg("--api-socket")
        .arg(&socket);
    let src = Timed::spawn(src_cmd);
    let mut dst_cmd = Command::new(vmm);
    dst_cmd
        .args(["--migrate-listen", "127.0.0.1:0", "--migrate-token", token])
        .arg("--migrate-address-file")
        .arg(&addr_file)
        .arg("--console-stdout");
    let dst = Timed::spawn(dst_cmd);
    src.line("PROBE dirty count=");
    std::thread::sleep(Duration::from_secs(1));
    let address = std::fs::read_to_string(&addr_file).expect("the destination listens");
    let rt = runtime();
    let ctx = || ttrpc::context::with_timeout(600_000_000_000);
    let run = rt.block_on(async {
        let c = VmmServiceClient::new(
            ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
                .await
                .unwrap(),
        );
        let req = MigrateRequest {
            address,
            token: token.into(),
            downtime_ms: 50,
            ..Default::default()
        };
        c.migrate_out(ctx(), &req).await.expect("migrate");
        loop {
            let s = c.get_migration(ctx(), &Empty::default()).await.unwrap();
            match s.phase.as_str() {
                "completed" => {
                    break MigrationRun {
                        total_ms: s.total_ms as f64,
                        downtime_ms: s.downtime_ms as f64,
                        gap_ms: 0.0,
                        bytes: s.bytes_sent as f64,
                        iterations: f64::from(s.iteration),
                    }
                }
                "failed" | "cancelled" | "unknown" => panic!("migration {}: {}", s.phase, s.error),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    });
    let gap_ms = console_gap_ms(&src, &dst);
    src.finish();
    dst.finish();
    MigrationRun { gap_ms, ..run }
}

/// A QMP command's reply (events skipped).
fn qmp(stream: &mut std::os::unix::net::UnixStream, command: &str) -> serde_json::Value {
    use std::io::{BufRead, Write};
    stream.write_all(command.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v.get("return").is_some() || v.get("error").is_some() {
            return v;
        }
    }
}

/// The same guest moved by QEMU between two microvm processes.
fn migrate_qemu(dir: &Path, mib: u64, rate: u32) -> Option<MigrationRun> {
    let probe = probe_elf();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let qmp_path = dir.join(format!("qmp-{mib}-{rate}.sock"));
    let base = |extra: &[&str]| {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-enable-kvm", "-cpu", "host,-arch-capabilities"])
            .args(["-M", "microvm,acpi=off", "-nodefaults", "-no-user-config"])
            .args(["-nographic", "-serial", "stdio"])
            .args(["-m", &mib.to_string(), "-smp", "1"])
            .arg("-kernel")
            .arg(&probe)
            .args(["-append", &dirty_cmdline(mib, rate)])
            .args(extra);
        c
    };
    let src = Timed::spawn(base(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp_path.display()),
    ]));
    let dst = Timed::spawn(base(&["-incoming", &format!("tcp:127.0.0.1:{port}")]));
    src.line("PROBE dirty count=");
    std::thread::sleep(Duration::from_secs(1));
    let mut q = std::os::unix::net::UnixStream::connect(&qmp_path).ok()?;
    {
        use std::io::BufRead;
        let mut greeting = String::new();
        std::io::BufReader::new(q.try_clone().unwrap())
            .read_line(&mut greeting)
            .unwrap();
    }
    qmp(&mut q, r#"{"execute":"qmp_capabilities"}"#);
    qmp(
        &mut q,
        r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":50}}"#,
    );
    let started = qmp(
        &mut q,
        &format!(r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#),
    );
    if started.get("error").is_some() {
        println!("qemu: migrate refused: {started}");
        src.finish();
        dst.finish();
        return None;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let info = loop {
        let v = qmp(&mut q, r#"{"execute":"query-migrate"}"#);
        let r = &v["return"];
        match r["status"].as_str() {
            Some("completed") => break r.clone(),
            Some("failed") | Some("cancelled") => {
                println!("qemu: migration {}: {r}", r["status"]);
                src.finish();
                dst.finish();
                return None;
            }
            _ if Instant::now() > deadline => {
                println!("qemu: migration did not finish: {r}");
                src.finish();
                dst.finish();
                return None;
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let gap_ms = console_gap_ms(&src, &dst);
    src.finish();
    dst.finish();
    Some(MigrationRun {
        total_ms: info["total-time"].as_f64().unwrap_or(0.0),
        downtime_ms: info["downtime"].as_f64().unwrap_or(0.0),
        gap_ms,
        bytes: info["ram"]["transferred"].as_f64().unwrap_or(0.0),
        iterations: info["ram"]["dirty-sync-count"].as_f64().unwrap_or(0.0),
    })
}

/// Live migration over loopback, berth-vmm to berth-vmm and QEMU to QEMU:
/// total time, downtime (pause → resume, and the gap the guest's console
/// shows), bytes sent over guest memory, iterations.
fn bench_migrate() {
    let vmm = release_vmm();
    let dir = std::env::temp_dir().join(format!("berth-bench-mig-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bw = loopback_bytes_per_s(1 << 30);
    println!("loopback TCP: {:.0} MiB/s", bw / f64::from(1 << 20));
    let mut metrics = Vec::new();
    for mib in [512u64, 2048] {
        for rate in [0u32, 50] {
            let b = migrate_berth(&vmm, &dir, mib, rate);
            let memory = (mib << 20) as f64;
            let ideal_ms = memory / bw * 1e3;
            println!(
                "berth {mib:>4} MiB, dirty {rate:>2} MiB/s: total {:7.1} ms ({:.2}x memory/bandwidth), \
                 downtime {:5.1} ms, guest gap {:5.1} ms, sent/memory {:.3}, {} passes",
                b.total_ms,
                b.total_ms / ideal_ms,
                b.downtime_ms,
                b.gap_ms,
                b.bytes / memory,
                b.iterations
            );
            match migrate_qemu(&dir, mib, rate) {
                Some(q) => println!(
                    "qemu  {mib:>4} MiB, dirty {rate:>2} MiB/s: total {:7.1} ms ({:.2}x memory/bandwidth), \
                     downtime {:5.1} ms, guest gap {:5.1} ms, sent/memory {:.3}, {} syncs   \
                     ratio berth/qemu: total {:.3}, downtime {:.3}",
                    q.total_ms,
                    q.total_ms / ideal_ms,
                    q.downtime_ms,
                    q.gap_ms,
                    q.bytes / memory,
                    q.iterations,
                    b.total_ms / q.total_ms,
                    b.downtime_ms / q.downtime_ms.max(1.0)
                ),
                None => println!("qemu  {mib:>4} MiB, dirty {rate:>2} MiB/s: no figure"),
            }
            if mib == 512 {
                metrics.push((rate, b, ideal_ms));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    for (rate, b, ideal_ms) in metrics {
        if rate == 0 {
            println!("METRIC migrate.downtime_ms_idle_512m {:.1}", b.downtime_ms);
            println!("METRIC migrate.guest_gap_ms_idle_512m {:.1}", b.gap_ms);
            println!(
                "METRIC migrate.total_vs_ideal_ratio_idle_512m {:.3}",
                b.total_ms / ideal_ms
            );
        } else {
            println!(
                "METRIC migrate.downtime_ms_dirty50_512m {:.1}",
                b.downtime_ms
            );
        }
    }
}

/// Measured CPU split of two burning VMs pinned to one host CPU, against
/// their weights; and what one Stats call costs the agent.
fn bench_shares() {
    use berth_tests::agent::{create_and_start, ctx, probe_spec, vm_ref, TestAgent};
    use berth_tests::contract::vm as pb;
    const WINDOW: Duration = Duration::from_secs(5);
    let agent = TestAgent::new("bench-shares");
    runtime().block_on(async {
        let c = agent.clients().await;
        let burner = |id: &str, weight: u32| {
            let mut spec = probe_spec(id, 1, "probe.mode=burn");
            spec.cpu = protobuf::MessageField::some(pb::CpuPolicy {
                weight,
                cpuset: "1".into(),
                ..Default::default()
            });
            spec
        };
        create_and_start(&c, burner("a", 100)).await;
        create_and_start(&c, burner("b", 100)).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let cpu_ns = |id: &'static str| {
            let c = &c;
            async move { c.vms.stats(ctx(), &vm_ref(id)).await.unwrap().cpu_time_ns }
        };
        let mut errors = Vec::new();
        for (wa, wb) in [(100u32, 100u32), (200, 100), (400, 100)] {
            for (id, w) in [("a", wa), ("b", wb)] {
                let mut spec = c.vms.get(ctx(), &vm_ref(id)).await.unwrap().spec.unwrap();
                spec.cpu.as_mut().unwrap().weight = w;
                let req = pb::UpdateVmRequest {
                    spec: protobuf::MessageField::some(spec),
                    ..Default::default()
                };
                c.vms.update(ctx(), &req).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(2)).await; // settle, and a fresh sample
            let (a0, b0) = (cpu_ns("a").await, cpu_ns("b").await);
            tokio::time::sleep(WINDOW).await;
            let (a1, b1) = (cpu_ns("a").await, cpu_ns("b").await);
            let measured = (a1 - a0) as f64 / (b1 - b0) as f64;
            let wanted = f64::from(wa) / f64::from(wb);
            let err = (measured - wanted).abs() / wanted;
            println!("weights {wa}:{wb}: measured ratio {measured:.3} (want {wanted:.1}), relative error {err:.3}");
            errors.push(err);
        }
        const CALLS: usize = 2000;
        let t0 = Instant::now();
        for _ in 0..CALLS {
            c.vms.stats(ctx(), &vm_ref("a")).await.unwrap();
        }
        let per_call = t0.elapsed().as_secs_f64() * 1e6 / CALLS as f64;
        println!("Stats call: {per_call:.1} us each over {CALLS} calls");
        println!("METRIC shares.ratio_err_1to1 {:.3}", errors[0]);
        println!("METRIC shares.ratio_err_2to1 {:.3}", errors[1]);
        println!("METRIC shares.ratio_err_4to1 {:.3}", errors[2]);
        println!("METRIC shares.stats_call_us {per_call:.1}");
    });
}

/// Start → first stdout byte, and start → "PROBE done".
fn time_boot(mut cmd: Command) -> (Duration, Duration) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child: Child = cmd.spawn().expect("spawn the VMM");
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut first = None;
    let mut buf = [0u8; 4096];
    let done = loop {
        let n = out.read(&mut buf).expect("read console");
        if n == 0 {
            panic!(
                "console closed before PROBE done:\n{}",
                String::from_utf8_lossy(&seen)
            );
        }
        first.get_or_insert_with(|| start.elapsed());
        seen.extend_from_slice(&buf[..n]);
        if seen.windows(10).any(|w| w == b"PROBE done") {
            break start.elapsed();
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "no PROBE done within {TIMEOUT:?}"
        );
    };
    let _ = child.wait();
    (first.unwrap(), done)
}

/// KiB from a "Key:   123 kB" line.
fn kib_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} missing"))
}

/// Peak RSS minus the resident part of the guest RAM mapping, in KiB, read
/// while the probe waits for console input (boot finished, nothing exited).
fn rss_overhead_kib(cmd: Command) -> u64 {
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE echo ready", TIMEOUT);
    let pid = vm.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak = kib_field(&status, "VmHWM:");
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    // The guest RAM is the mapping at least as large as the configured memory
    // with the most resident pages.
    let mut guest_rss = 0;
    let mut size = 0;
    for line in smaps.lines() {
        if line.starts_with("Size:") {
            size = kib_field(line, "Size:");
        } else if line.starts_with("Rss:") && size >= MEMORY_MIB * 1024 {
            guest_rss = guest_rss.max(kib_field(line, "Rss:"));
        }
    }
    vm.write_stdin(b"quit\n");
    let _ = vm.wait(TIMEOUT);
    peak.saturating_sub(guest_rss)
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn report(what: &str, unit: &str, berth: Vec<f64>, qemu: Vec<f64>) -> f64 {
    report_pair(what, unit, ("berth-vmm", berth), ("qemu", qemu))
}

/// Prints min/median/max of two series and returns the ratio of medians.
fn report_pair(what: &str, unit: &str, a: (&str, Vec<f64>), b: (&str, Vec<f64>)) -> f64 {
    let (amin, amed, amax) = stats(a.1);
    let (bmin, bmed, bmax) = stats(b.1);
    let ratio = amed / bmed;
    println!(
        "{what:<28} {} min/median/max {amin:9.2}/{amed:9.2}/{amax:9.2} {unit}   \
         {} {bmin:9.2}/{bmed:9.2}/{bmax:9.2} {unit}   ratio {ratio:.3}",
        a.0, b.0
    );
    ratio
}

/// Milliseconds from the VMM's execve to its first KVM_RUN (under strace).
fn exec_to_first_run_ms(peer: Peer, vmm: &Path, probe: &Path) -> f64 {
    let trace = std::env::temp_dir().join(format!("berth-bench-trace-{}", std::process::id()));
    let cmd = berth_tests::first_run::traced(&peer.command(vmm, probe, "boot"), &trace);
    time_boot(cmd);
    let text = std::fs::read_to_string(&trace).expect("strace wrote its trace");
    let _ = std::fs::remove_file(&trace);
    let span = berth_tests::first_run::exec_to_first_run(&text)
        .unwrap_or_else(|| panic!("no execve then KVM_RUN in the trace of {peer:?}"));
    span * 1e3
}

fn bench_boot() {
    let vmm = release_vmm();
    let probe = probe_elf();
    let mut to_run = [Vec::new(), Vec::new()];
    let mut first = [Vec::new(), Vec::new()];
    let mut done = [Vec::new(), Vec::new()];
    let mut rss = [Vec::new(), Vec::new()];
    println!(
        "boot: {RUNS} alternating runs, probe, {VCPUS} vCPU, {MEMORY_MIB} MiB, KVM {:?}",
        berth_tests::kvm_mode()
    );
    for _ in 0..RUNS {
        for (i, peer) in [Peer::Berth, Peer::Qemu].into_iter().enumerate() {
            let (f, d) = time_boot(peer.command(&vmm, &probe, "boot"));
            first[i].push(f.as_secs_f64() * 1e3);
            done[i].push(d.as_secs_f64() * 1e3);
            rss[i].push(rss_overhead_kib(peer.command(&vmm, &probe, "echo")) as f64 / 1024.0);
            to_run[i].push(exec_to_first_run_ms(peer, &vmm, &probe));
        }
    }
    let [bt, qt] = to_run;
    let to_run_ratio = report("execve -> first KVM_RUN", "ms", bt, qt);
    let [bf, qf] = first;
    let [bd, qd] = done;
    let [br, qr] = rss;
    let first_ratio = report("start -> first serial byte", "ms", bf, qf);
    let done_ratio = report("start -> PROBE done", "ms", bd, qd);
    let berth_rss = stats(br.clone()).1;
    report("peak RSS - guest RAM", "MiB", br, qr);
    println!("METRIC boot.first_byte_ratio {first_ratio:.3}");
    println!("METRIC boot.done_ratio {done_ratio:.3}");
    println!("METRIC boot.rss_overhead_mib {berth_rss:.2}");
    println!("(execve -> first KVM_RUN is timed under strace, for both alike: what each VMM costs before guest code runs)");
    println!("METRIC boot.to_first_run_ratio {to_run_ratio:.3}");
}

/// Boot with the jail and seccomp on (as the agent runs every VMM) against
/// the same VMM with both off, and QEMU as the outside peer.
fn bench_hardening() {
    let vmm = release_vmm();
    let probe = probe_elf();
    let dir = std::env::temp_dir().join(format!("berth-bench-jail-{}", std::process::id()));
    let (root, run) = (dir.join("jail"), dir.join("run"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    let uid = 399_999;
    std::os::unix::fs::chown(&run, Some(uid), Some(uid)).unwrap();
    let hardened = || {
        let mut c = Peer::Berth.command(&vmm, &probe, "boot");
        c.arg("--jail-root")
            .arg(&root)
            .args([
                "--jail-uid",
                &uid.to_string(),
                "--jail-gid",
                &uid.to_string(),
            ])
            .arg("--jail-ro")
            .arg(&probe)
            .arg("--jail-rw")
            .arg(&run);
        c
    };
    let bare = || {
        let mut c = Peer::Berth.command(&vmm, &probe, "boot");
        c.arg("--no-seccomp");
        c
    };
    println!(
        "hardening: {RUNS} alternating runs, probe, {VCPUS} vCPU, {MEMORY_MIB} MiB, KVM {:?}",
        berth_tests::kvm_mode()
    );
    let mut first = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..RUNS {
        for (i, cmd) in [hardened(), bare(), Peer::Qemu.command(&vmm, &probe, "boot")]
            .into_iter()
            .enumerate()
        {
            first[i].push(time_boot(cmd).0.as_secs_f64() * 1e3);
        }
    }
    let [jailed, unjailed, qemu] = first;
    let overhead = report_pair(
        "start -> first serial byte",
        "ms",
        ("jailed+seccomp", jailed.clone()),
        ("bare", unjailed),
    );
    let vs_qemu = report_pair(
        "start -> first serial byte",
        "ms",
        ("jailed+seccomp", jailed),
        ("qemu", qemu),
    );
    println!("METRIC hardening.boot_overhead_ratio {overhead:.3}");
    println!("METRIC hardening.jailed_first_byte_vs_qemu_ratio {vs_qemu:.3}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("boot") => bench_boot(),
        Some("hardening") => bench_hardening(),
        Some("blk") => bench_blk(),
        Some("net") => bench_net(),
        Some("api") => bench_api(),
        Some("shares") => bench_shares(),
        Some("snapshot") => bench_snapshot(),
        Some("migrate") => bench_migrate(),
        other => {
            eprintln!(
                "usage: berth-bench boot|blk|net|api|shares|snapshot|migrate|hardening   (got {other:?})"
            );
            std::process::exit(2);
        }
    }
}
