//! Live migration between two berth-agents on this machine (separate state
//! roots and sockets): a probe guest dirtying memory moves and comes back
//! with its memory verified page by page and its counter going on; a disk
//! stays writable; every failure before the handover leaves the VM running
//! on the source with nothing left on the destination; a lost Ack is
//! reconciled; and the traffic crosses a veth pair between two network
//! namespaces.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use berth_tests::agent::*;
use berth_tests::contract::vm as pb;
use berth_tests::*;

const BOOT: Duration = Duration::from_secs(60);
const SETTLE: Duration = Duration::from_secs(180);

struct Pair {
    src: TestAgent,
    dst: TestAgent,
    disks: PathBuf,
}

fn disk_roots(disks: &std::path::Path) -> String {
    format!("disk_roots = [{disks:?}]\n")
}

/// Two agents whose disk roots are one shared directory (the "shared
/// storage" migration assumes).
fn pair(test: &str, dst_env: &[(&str, &str)]) -> Pair {
    let disks = scratch_dir(&format!("{test}-disks"));
    let roots = disk_roots(&disks);
    Pair {
        src: TestAgent::with_config(&format!("{test}-src"), &roots),
        dst: TestAgent::with_config_env(&format!("{test}-dst"), &roots, dst_env),
        disks,
    }
}

fn dirty_spec(id: &str, rate: u32) -> pb::VmSpec {
    let mut spec = probe_spec(
        id,
        1,
        &format!("probe.mode=dirty probe.dirty_mib=16 probe.dirty_rate={rate} probe.report_ms=100"),
    );
    spec.memory_mib = 128;
    spec
}

/// The highest "PROBE dirty count=<n>" on a console.
fn last_count(agent: &TestAgent, id: &str) -> Option<u64> {
    console_text(agent, id)
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("PROBE dirty count="))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
}

fn wait_count_above(agent: &TestAgent, id: &str, above: u64) -> u64 {
    let deadline = Instant::now() + BOOT;
    loop {
        if let Some(n) = last_count(agent, id).filter(|&n| n > above) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{id}'s count never passed {above}:\n{}",
            console_text(agent, id)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn type_into(c: &Clients, id: &str, bytes: &[u8]) {
    let stream = c.vms.console(ctx()).await.expect("console");
    for data in [Vec::new(), bytes.to_vec()] {
        stream
            .send(&pb::ConsoleChunk {
                id: id.into(),
                data,
                ..Default::default()
            })
            .await
            .expect("console input");
    }
    // Let the agent hand the bytes to the VMM before the stream closes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stream.close_send().await;
}

async fn prepare(dst: &Clients, spec: pb::VmSpec, ttl_ms: u64) -> pb::PrepareMigrateInResponse {
    let req = pb::PrepareMigrateInRequest {
        spec: protobuf::MessageField::some(spec),
        token_ttl_ms: ttl_ms,
        ..Default::default()
    };
    dst.vms
        .prepare_migrate_in(ctx(), &req)
        .await
        .expect("prepare_migrate_in")
}

async fn start_out(
    src: &Clients,
    id: &str,
    address: &str,
    token: &str,
    params: pb::MigrationParams,
) -> pb::MigrationInfo {
    let req = pb::MigrateOutRequest {
        id: id.into(),
        address: address.into(),
        token: token.into(),
        params: protobuf::MessageField::some(params),
        ..Default::default()
    };
    src.vms.migrate_out(ctx(), &req).await.expect("migrate_out")
}

/// Polls until the source's VM has left Migrating; returns the final VM.
async fn settle(c: &Clients, id: &str) -> pb::Vm {
    let deadline = Instant::now() + SETTLE;
    loop {
        let vm = get(c, id).await;
        if state_of(&vm) != pb::VmState::MIGRATING {
            return vm;
        }
        assert!(Instant::now() < deadline, "{id} still migrating: {vm:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Prepare on `to`, migrate from `from`, wait for the end.
async fn migrate(
    from: &Clients,
    to: &Clients,
    id: &str,
    params: pb::MigrationParams,
) -> (pb::Vm, pb::MigrationInfo) {
    let spec = get(from, id).await.spec.unwrap();
    let p = prepare(to, spec, 0).await;
    start_out(from, id, &p.address, &p.token, params).await;
    let vm = settle(from, id).await;
    let info = vm.status.migration.clone().unwrap();
    (vm, info)
}

async fn listed(c: &Clients) -> Vec<(String, pb::VmState)> {
    c.vms
        .list(ctx(), &pb::ListVmsRequest::default())
        .await
        .unwrap()
        .vms
        .iter()
        .map(|v| (v.spec.id.clone(), state_of(v)))
        .collect()
}

/// Until the destination has dropped its incoming VM (its VMM exits as
/// soon as the attempt fails; the agent notices within a moment).
async fn wait_no_vms(agent: &TestAgent, c: &Clients) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let vms = listed(c).await;
        if vms.is_empty() && vmm_pids(&agent.dir).is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the destination kept {vms:?} (VMMs {:?})",
            vmm_pids(&agent.dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the destination VM to be Running (its agent saw the handover).
async fn wait_running(c: &Clients, id: &str) -> pb::Vm {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(vm) = c.vms.get(ctx(), &vm_ref(id)).await {
            if state_of(&vm) == pb::VmState::RUNNING {
                return vm;
            }
        }
        assert!(Instant::now() < deadline, "{id} never Running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn count_of(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[tokio::test(flavor = "current_thread")]
async fn a_dirtying_guest_migrates_to_another_agent_and_back_intact() {
    report_mode("migration round trip");
    let p = pair("mig-roundtrip", &[]);
    let (src, dst) = (p.src.clients().await, p.dst.clients().await);
    for rate in [0u32, 20, 100] {
        let id = format!("dirty{rate}");
        create_and_start(&src, dirty_spec(&id, rate)).await;
        wait_console(&p.src, &id, "PROBE dirty ready", BOOT);
        wait_console(&p.src, &id, "PROBE dirty count=", BOOT);
        let before = if rate == 0 {
            0
        } else {
            wait_count_above(&p.src, &id, 0)
        };
        // A guest that dirties faster than the link drains may never fit
        // 50 ms: it switches over at the iteration limit instead.
        let params = pb::MigrationParams {
            max_iterations: 8,
            force_on_timeout: true,
            ..Default::default()
        };
        let (vm, info) = migrate(&src, &dst, &id, params.clone()).await;
        assert_eq!(state_of(&vm), pb::VmState::MIGRATED, "{rate}: {info:?}");
        assert_eq!(info.phase, "completed", "{info:?}");
        assert_eq!(info.direction, "out");
        assert!(info.downtime_ms > 0 && info.bytes_sent > 0, "{info:?}");
        assert_eq!(vm.status.pid, 0, "the source VMM is gone");
        eprintln!(
            "{rate} MiB/s: {} passes, {} bytes, downtime {} ms, total {} ms",
            info.iteration, info.bytes_sent, info.downtime_ms, info.total_ms
        );
        let there = wait_running(&dst, &id).await;
        assert_eq!(
            there.status.migration.direction, "in",
            "{:?}",
            there.status.migration
        );
        // The count goes on over there, and the memory is what it wrote.
        if rate == 0 {
            wait_console(&p.dst, &id, "PROBE dirty count=0", BOOT);
        } else {
            wait_count_above(&p.dst, &id, before);
        }
        assert!(
            !console_text(&p.dst, &id).contains("PROBE hello"),
            "the destination did not boot the guest again"
        );
        type_into(&dst, &id, b"v").await;
        wait_console(&p.dst, &id, "PROBE dirty verify ok pages=4096", BOOT);
        assert!(!console_text(&p.dst, &id).contains("verify fail"));
        assert_eq!(
            listed(&src).await,
            vec![(id.clone(), pb::VmState::MIGRATED)],
            "the source keeps a record of where it went"
        );
        assert_eq!(listed(&dst).await, vec![(id.clone(), pb::VmState::RUNNING)]);

        // And back again: the source takes its Migrated record back.
        let mid = last_count(&p.dst, &id).unwrap();
        let reports_home = count_of(&console_text(&p.src, &id), "PROBE dirty count=");
        let (vm, info) = migrate(&dst, &src, &id, params).await;
        assert_eq!(state_of(&vm), pb::VmState::MIGRATED, "{info:?}");
        let home = wait_running(&src, &id).await;
        assert_eq!(home.status.migration.direction, "in");
        if rate == 0 {
            let deadline = Instant::now() + BOOT;
            while count_of(&console_text(&p.src, &id), "PROBE dirty count=") <= reports_home {
                assert!(Instant::now() < deadline, "no reports after coming home");
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            wait_count_above(&p.src, &id, mid);
        }
        type_into(&src, &id, b"v").await;
        let deadline = Instant::now() + BOOT;
        while count_of(
            &console_text(&p.src, &id),
            "PROBE dirty verify ok pages=4096",
        ) < 1
        {
            assert!(Instant::now() < deadline, "{}", console_text(&p.src, &id));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!console_text(&p.src, &id).contains("verify fail"));
        src.vms
            .stop(
                ctx(),
                &pb::StopVmRequest {
                    id: id.clone(),
                    force: true,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        dst.vms.delete(ctx(), &vm_ref(&id)).await.unwrap();
        src.vms.delete(ctx(), &vm_ref(&id)).await.unwrap();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_disk_stays_writable_and_the_console_follows_the_vm() {
    report_mode("migration with a disk, through nodectl");
    let p = pair("mig-disk", &[]);
    let (src, dst) = (p.src.clients().await, p.dst.clients().await);
    let disk = p.disks.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut spec = probe_spec(
        "blk",
        1,
        "probe.mode=blk probe.blk_hold=1 probe.blk_write=8:16:5 probe.blk_read=64:8",
    );
    spec.disks.push(pb::Disk {
        path: disk.display().to_string(),
        serial: "migdisk".into(),
        ..Default::default()
    });
    create_and_start(&src, spec).await;
    wait_console(&p.src, "blk", "PROBE blk dev=0 holding", BOOT);

    // The operator's way: nodectl prepares the destination agent itself.
    let out = p
        .src
        .nodectl()
        .args(["migrate", "blk", "--to"])
        .arg(&p.dst.socket)
        .args(["--downtime-ms", "30"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("migrated blk to 127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("downtime"), "{stdout}");
    assert!(stderr.contains("["), "a progress bar: {stderr}");
    assert_eq!(state_of(&get(&src, "blk").await), pb::VmState::MIGRATED);
    wait_running(&dst, "blk").await;

    type_into(&dst, "blk", b"x").await;
    wait_console(&p.dst, "blk", "PROBE blk dev=0 verify ok", BOOT);
    let console = console_text(&p.dst, "blk");
    assert!(
        console.contains("PROBE blk dev=0 write start=8 count=16 status=0"),
        "{console}"
    );
    assert!(
        !console_text(&p.src, "blk").contains("write start=8"),
        "the source's console ends at the handover"
    );
    // The guest's write reached the shared file.
    let after = std::fs::read(&disk).unwrap();
    assert!(
        after[8 * 512..24 * 512].iter().any(|&b| b != 0),
        "sectors 8..24 were written"
    );
    assert!(
        after[..8 * 512].iter().all(|&b| b == 0),
        "sector 0..8 untouched"
    );

    // nodectl shows the record on both sides.
    let show = p.src.nodectl().args(["migration", "blk"]).output().unwrap();
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("out") && text.contains("completed"), "{text}");
}

/// Forwards one connection to `to`, cutting both ways once `limit` bytes
/// went from the client to the server, then stops listening (so the
/// source's reconnects are refused, as with a dead peer).
fn cutting_proxy(to: String, limit: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let Ok((mut client, _)) = listener.accept() else {
            return;
        };
        drop(listener);
        let mut server = TcpStream::connect(&to).unwrap();
        let mut back_client = client.try_clone().unwrap();
        let mut back_server = server.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_server, &mut back_client);
        });
        let mut sent = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        while sent < limit {
            let n = match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n.min(limit - sent),
            };
            if server.write_all(&buf[..n]).is_err() {
                break;
            }
            sent += n;
        }
        let _ = client.shutdown(std::net::Shutdown::Both);
        let _ = server.shutdown(std::net::Shutdown::Both);
    });
    address
}

async fn wait_bytes_sent(c: &Clients, id: &str, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = c.vms.get_migration(ctx(), &vm_ref(id)).await.unwrap();
        if m.bytes_sent >= at_least {
            return;
        }
        assert!(
            m.phase == "connecting" || m.phase == "precopy",
            "the migration ended early: {m:?}"
        );
        assert!(Instant::now() < deadline, "{m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// After a failed attempt: the VM runs on the source (its count goes on),
/// the destination holds nothing, and the two agents' lists agree.
async fn assert_still_at_source(
    p: &Pair,
    src: &Clients,
    dst_agent: &TestAgent,
    dst: &Clients,
    case: &str,
    expect_error: &str,
) {
    let vm = settle(src, "vm").await;
    let info = vm.status.migration.clone().unwrap();
    assert_eq!(state_of(&vm), pb::VmState::RUNNING, "{case}: {info:?}");
    assert!(
        info.phase == "failed" || info.phase == "cancelled",
        "{case}: {info:?}"
    );
    assert!(
        info.error.contains(expect_error),
        "{case}: expected {expect_error:?} in {:?}",
        info.error
    );
    let n = last_count(&p.src, "vm").unwrap_or(0);
    wait_count_above(&p.src, "vm", n + 2);
    wait_no_vms(dst_agent, dst).await;
    assert_eq!(listed(src).await, vec![("vm".into(), pb::VmState::RUNNING)]);
    eprintln!("{case}: source resumed ({})", info.error);
}

#[tokio::test(flavor = "current_thread")]
async fn every_failure_before_the_handover_leaves_the_vm_running_on_the_source() {
    report_mode("migration failures");
    let p = pair("mig-fail", &[]);
    let (src, dst) = (p.src.clients().await, p.dst.clients().await);
    create_and_start(&src, dirty_spec("vm", 20)).await;
    wait_count_above(&p.src, "vm", 0);
    let spec = get(&src, "vm").await.spec.unwrap();
    // 1 MiB/s over 16 MiB of written memory: the first pass takes ~16 s,
    // long enough to fail it part-way.
    let slow = pb::MigrationParams {
        bandwidth_mib_s: 1,
        ..Default::default()
    };

    // A wrong token.
    let prep = prepare(&dst, spec.clone(), 0).await;
    start_out(
        &src,
        "vm",
        &prep.address,
        "0123456789abcdef0123456789abcdef",
        Default::default(),
    )
    .await;
    assert_still_at_source(
        &p,
        &src,
        &p.dst,
        &dst,
        "wrong token",
        "wrong migration token",
    )
    .await;

    // An expired token: the receiving VMM gave up, so nobody listens.
    let prep = prepare(&dst, spec.clone(), 300).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    start_out(&src, "vm", &prep.address, &prep.token, Default::default()).await;
    assert_still_at_source(&p, &src, &p.dst, &dst, "expired token", "cannot connect").await;

    // The connection cut in the hello, and in the memory phase.
    for (case, limit) in [("cut in hello", 10usize), ("cut in memory", 2 << 20)] {
        let prep = prepare(&dst, spec.clone(), 0).await;
        let proxy = cutting_proxy(prep.address.clone(), limit);
        start_out(&src, "vm", &proxy, &prep.token, Default::default()).await;
        assert_still_at_source(&p, &src, &p.dst, &dst, case, "").await;
    }

    // The destination VMM killed part-way.
    let prep = prepare(&dst, spec.clone(), 0).await;
    let victim = get(&dst, "vm").await.status.pid;
    assert!(victim > 0);
    start_out(&src, "vm", &prep.address, &prep.token, slow.clone()).await;
    wait_bytes_sent(&src, "vm", 512 << 10).await;
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    assert_still_at_source(&p, &src, &p.dst, &dst, "destination killed", "").await;

    // The timeout.
    let prep = prepare(&dst, spec.clone(), 0).await;
    let params = pb::MigrationParams {
        timeout_ms: 1500,
        ..slow.clone()
    };
    start_out(&src, "vm", &prep.address, &prep.token, params).await;
    assert_still_at_source(&p, &src, &p.dst, &dst, "timeout", "timed out").await;

    // A cancel.
    let prep = prepare(&dst, spec.clone(), 0).await;
    start_out(&src, "vm", &prep.address, &prep.token, slow.clone()).await;
    wait_bytes_sent(&src, "vm", 256 << 10).await;
    let m = src
        .vms
        .cancel_migration(ctx(), &vm_ref("vm"))
        .await
        .unwrap();
    assert_eq!(m.direction, "out");
    assert_still_at_source(&p, &src, &p.dst, &dst, "cancel", "cancelled").await;

    // Incompatible CPUs, and a destination that drops the line after the
    // state arrived (before Ready): agents whose VMMs carry those faults.
    for (case, fault, error) in [
        ("incompatible CPU", "hide-cpu-feature", "lacks features"),
        ("cut in the state phase", "drop-before-ready", ""),
    ] {
        let faulty = TestAgent::with_config_env(
            &format!("mig-fail-{fault}"),
            &disk_roots(&p.disks),
            &[("BERTH_TEST_MIGRATION_FAULT", fault)],
        );
        let fc = faulty.clients().await;
        let prep = prepare(&fc, spec.clone(), 0).await;
        start_out(&src, "vm", &prep.address, &prep.token, Default::default()).await;
        assert_still_at_source(&p, &src, &faulty, &fc, case, error).await;
    }

    // After all that, a clean migration still works.
    let (vm, info) = migrate(&src, &dst, "vm", Default::default()).await;
    assert_eq!(state_of(&vm), pb::VmState::MIGRATED, "{info:?}");
    wait_running(&dst, "vm").await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_lost_ack_is_reconciled_and_both_agents_agree() {
    report_mode("migration with a lost ack");
    let p = pair("mig-ack", &[("BERTH_TEST_MIGRATION_FAULT", "drop-ack")]);
    let (src, dst) = (p.src.clients().await, p.dst.clients().await);
    create_and_start(&src, dirty_spec("vm", 20)).await;
    let before = wait_count_above(&p.src, "vm", 0);
    let (vm, info) = migrate(&src, &dst, "vm", Default::default()).await;
    // The source asked the destination again and learnt that it runs the VM.
    assert_eq!(state_of(&vm), pb::VmState::MIGRATED, "{info:?}");
    assert_eq!(info.phase, "completed");
    wait_running(&dst, "vm").await;
    wait_count_above(&p.dst, "vm", before);
    assert_eq!(
        listed(&src).await,
        vec![("vm".into(), pb::VmState::MIGRATED)]
    );
    assert_eq!(
        listed(&dst).await,
        vec![("vm".into(), pb::VmState::RUNNING)]
    );
    assert!(vmm_pids(&p.src.dir).is_empty(), "no VMM left on the source");
}

/// Two namespaces joined by a veth pair, removed on drop.
struct Namespaces(String, String);

impl Namespaces {
    fn create(tag: &str) -> Namespaces {
        let (a, b) = (format!("bm{tag}a"), format!("bm{tag}b"));
        let sh = |cmd: &str| {
            let ok = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
            assert!(ok.success(), "{cmd}");
        };
        let _ = Command::new("ip").args(["netns", "del", &a]).status();
        let _ = Command::new("ip").args(["netns", "del", &b]).status();
        sh(&format!("ip netns add {a} && ip netns add {b}"));
        sh(&format!(
            "ip link add v{tag}a netns {a} type veth peer name v{tag}b netns {b}"
        ));
        sh(&format!(
            "ip -n {a} addr add 10.231.0.1/24 dev v{tag}a && ip -n {a} link set v{tag}a up && ip -n {a} link set lo up"
        ));
        sh(&format!(
            "ip -n {b} addr add 10.231.0.2/24 dev v{tag}b && ip -n {b} link set v{tag}b up && ip -n {b} link set lo up"
        ));
        Namespaces(a, b)
    }

    /// Bytes received on the destination's end of the veth.
    fn rx_bytes(&self, tag: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.1, "cat"])
            .arg(format!("/sys/class/net/v{tag}b/statistics/rx_bytes"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.1]).status();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn migration_crosses_a_veth_between_two_network_namespaces() {
    report_mode("migration across namespaces");
    let tag = format!("{}", std::process::id() % 10000);
    let ns = Namespaces::create(&tag);
    let disks = scratch_dir("mig-netns-disks");
    // `ip netns exec` mounts a sysfs of its own, without the cgroup
    // hierarchies; cgroups are covered elsewhere.
    let roots = format!("{}cgroup_version = \"off\"\n", disk_roots(&disks));
    let src_agent = TestAgent::with_options("mig-netns-src", &roots, &[], Some(&ns.0));
    let dst_agent = TestAgent::with_options(
        "mig-netns-dst",
        &format!("{roots}migration_listen = \"10.231.0.2\"\n"),
        &[],
        Some(&ns.1),
    );
    let (src, dst) = (src_agent.clients().await, dst_agent.clients().await);
    create_and_start(&src, dirty_spec("vm", 20)).await;
    let before = wait_count_above(&src_agent, "vm", 0);
    let spec = get(&src, "vm").await.spec.unwrap();
    let p = prepare(&dst, spec, 0).await;
    assert!(p.address.starts_with("10.231.0.2:"), "{}", p.address);
    let rx_before = ns.rx_bytes(&tag);
    start_out(&src, "vm", &p.address, &p.token, Default::default()).await;
    let vm = settle(&src, "vm").await;
    let info = vm.status.migration.clone().unwrap();
    assert_eq!(state_of(&vm), pb::VmState::MIGRATED, "{info:?}");
    wait_running(&dst, "vm").await;
    wait_count_above(&dst_agent, "vm", before);
    let crossed = ns.rx_bytes(&tag) - rx_before;
    assert!(
        crossed >= info.bytes_sent,
        "the veth carried {crossed} bytes; the migration sent {}",
        info.bytes_sent
    );
}

#[tokio::test(flavor = "current_thread")]
async fn agents_restarted_mid_migration_follow_it_to_the_end() {
    report_mode("migration across agent restarts");
    let mut p = pair("mig-restart", &[]);
    let (src, dst) = (p.src.clients().await, p.dst.clients().await);
    create_and_start(&src, dirty_spec("vm", 20)).await;
    let before = wait_count_above(&p.src, "vm", 0);
    let spec = get(&src, "vm").await.spec.unwrap();
    let prep = prepare(&dst, spec, 0).await;
    // Slow enough to kill the agents mid-transfer; at 4 MiB/s a guest
    // dirtying 20 MiB/s never converges, so it switches over after pass 2.
    let params = pb::MigrationParams {
        bandwidth_mib_s: 4,
        max_iterations: 2,
        force_on_timeout: true,
        ..Default::default()
    };
    start_out(&src, "vm", &prep.address, &prep.token, params).await;
    wait_bytes_sent(&src, "vm", 1 << 20).await;
    // Both agents die mid-transfer; the VMMs carry on by themselves.
    p.src.kill9();
    p.dst.kill9();
    drop((src, dst));
    p.src.start();
    p.dst.start();
    let (src, dst) = (p.src.clients().await, p.dst.clients().await);
    let vm = settle(&src, "vm").await;
    let info = vm.status.migration.clone().unwrap();
    assert_eq!(state_of(&vm), pb::VmState::MIGRATED, "{info:?}");
    wait_running(&dst, "vm").await;
    wait_count_above(&p.dst, "vm", before);
    assert!(vmm_pids(&p.src.dir).is_empty(), "the source VMM is gone");
}

#[tokio::test(flavor = "current_thread")]
async fn bad_migration_requests_get_clear_errors_and_change_nothing() {
    report_mode("migration request errors");
    let p = pair("mig-errors", &[]);
    let (src, dst) = (p.src.clients().await, p.dst.clients().await);
    let prepare_req = |spec: pb::VmSpec| pb::PrepareMigrateInRequest {
        spec: protobuf::MessageField::some(spec),
        ..Default::default()
    };

    // A disk outside the destination's roots.
    let mut spec = probe_spec("bad", 1, "probe.mode=tick");
    spec.disks.push(pb::Disk {
        path: "/etc/shadow".into(),
        ..Default::default()
    });
    let (code, msg) = code_of(dst.vms.prepare_migrate_in(ctx(), &prepare_req(spec)).await);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    // Too big for the destination.
    let mut spec = probe_spec("huge", 1, "probe.mode=tick");
    spec.memory_mib = 1 << 30;
    let (code, msg) = code_of(dst.vms.prepare_migrate_in(ctx(), &prepare_req(spec)).await);
    assert!(
        matches!(
            code,
            ttrpc::Code::RESOURCE_EXHAUSTED | ttrpc::Code::INVALID_ARGUMENT
        ),
        "{code:?} {msg}"
    );
    // A drained destination admits nothing.
    dst.node
        .drain(ctx(), &berth_tests::contract::common::Empty::default())
        .await
        .unwrap();
    let (code, msg) = code_of(
        dst.vms
            .prepare_migrate_in(ctx(), &prepare_req(probe_spec("d", 1, "probe.mode=tick")))
            .await,
    );
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("drained"), "{msg}");
    dst.node
        .undrain(ctx(), &berth_tests::contract::common::Empty::default())
        .await
        .unwrap();
    assert!(
        listed(&dst).await.is_empty(),
        "refused requests leave no VM"
    );

    // An id the destination already has.
    create_and_start(&dst, probe_spec("taken", 1, "probe.mode=tick")).await;
    let (code, msg) = code_of(
        dst.vms
            .prepare_migrate_in(
                ctx(),
                &prepare_req(probe_spec("taken", 1, "probe.mode=tick")),
            )
            .await,
    );
    assert_eq!(code, ttrpc::Code::ALREADY_EXISTS, "{msg}");
    assert_eq!(state_of(&get(&dst, "taken").await), pb::VmState::RUNNING);

    // MigrateOut: a VM that is not running, no token, no such VM.
    let req = pb::CreateVmRequest {
        spec: protobuf::MessageField::some(probe_spec("idle", 1, "probe.mode=tick")),
        ..Default::default()
    };
    src.vms.create(ctx(), &req).await.unwrap();
    let out = |id: &str, token: &str| pb::MigrateOutRequest {
        id: id.into(),
        address: "127.0.0.1:9".into(),
        token: token.into(),
        ..Default::default()
    };
    let (code, msg) = code_of(src.vms.migrate_out(ctx(), &out("idle", "t")).await);
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
    let (code, msg) = code_of(src.vms.migrate_out(ctx(), &out("idle", "")).await);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    let (code, msg) = code_of(src.vms.migrate_out(ctx(), &out("nope", "t")).await);
    assert_eq!(code, ttrpc::Code::NOT_FOUND, "{msg}");
    let (code, msg) = code_of(src.vms.get_migration(ctx(), &vm_ref("idle")).await);
    assert_eq!(code, ttrpc::Code::NOT_FOUND, "{msg}");
    let (code, msg) = code_of(src.vms.cancel_migration(ctx(), &vm_ref("idle")).await);
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
    assert_eq!(state_of(&get(&src, "idle").await), pb::VmState::DEFINED);

    // nodectl without a token for a VMM address says what to do.
    let out = p
        .src
        .nodectl()
        .args(["migrate", "idle", "--to", "127.0.0.1:9"])
        .env_remove("BERTH_MIGRATE_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token"));
}
