//! Snapshots of a running probe guest, restored into new berth-vmm
//! processes: the guest continues exactly where it stopped (its counter,
//! kept in guest memory, goes on from the next value), and a damaged
//! snapshot is refused with a clear error.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth_tests::contract::common::Empty;
use berth_tests::contract::vmm::SnapshotRequest;
use berth_tests::contract::vmm_ttrpc::VmmServiceClient;
use berth_tests::*;

const TIMEOUT: Duration = Duration::from_secs(60);

fn ticks(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("PROBE tick "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

async fn client(socket: &Path) -> VmmServiceClient {
    let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
        .await
        .expect("connect to the VMM");
    VmmServiceClient::new(c)
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(30_000_000_000)
}

/// Boots the probe in tick mode, snapshots it after a few ticks, stops it.
/// Returns the snapshot directory and the last tick the guest printed.
async fn take_snapshot(test: &str) -> (PathBuf, u64) {
    let dir = scratch_dir(test);
    let socket = dir.join("vmm.sock");
    let mut cmd = vmm_command(&probe_elf(), 2, 64, "probe.mode=tick");
    cmd.arg("--api-socket").arg(&socket);
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE tick 5", TIMEOUT);
    let c = client(&socket).await;
    let snap = dir.join("snap");
    let req = SnapshotRequest {
        dir: snap.display().to_string(),
        resume: false,
        ..Default::default()
    };
    let reply = c.snapshot(ctx(), &req).await.expect("snapshot");
    assert_eq!(reply.memory_bytes, 64 << 20);
    eprintln!("snapshot paused the guest for {} ms", reply.pause_ms);
    let info = c.info(ctx(), &Empty::default()).await.unwrap();
    assert_eq!(info.state, "paused", "resume=false leaves it paused");
    let stopped = c.stop(ctx(), &Empty::default()).await;
    let out = vm.wait(TIMEOUT);
    assert!(stopped.is_ok(), "stop: {stopped:?}\n{}", out.describe());
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let last = *ticks(&out.stdout)
        .last()
        .expect("ticks before the snapshot");
    (snap, last)
}

fn restore(snap: &Path) -> Running {
    let mut cmd = Command::new(vmm_binary());
    cmd.arg("--restore")
        .arg(snap)
        .args(["--console-stdout", "--console-in", "stdin"]);
    Running::spawn(cmd)
}

#[tokio::test(flavor = "current_thread")]
async fn a_restored_guest_continues_where_it_stopped() {
    report_mode("snapshot restore");
    let (snap, last) = take_snapshot("snapshot-restore").await;
    assert!(snap.join("state.json").exists() && snap.join("memory.img").exists());
    // Sparse: far fewer blocks than the 64 MiB it stands for.
    let blocks = std::fs::metadata(snap.join("memory.img"))
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap();
    assert!(blocks < 16 << 20, "memory file uses {blocks} bytes on disk");

    // Three VMs from the same snapshot, each continuing the same count.
    for round in 0..3 {
        let mut vm = restore(&snap);
        vm.wait_for_output(&format!("PROBE tick {}", last + 3), TIMEOUT);
        vm.write_stdin(b"q");
        let out = vm.wait(TIMEOUT);
        let ctx = out.describe();
        let after = ticks(&out.stdout);
        assert_eq!(
            after.first(),
            Some(&(last + 1)),
            "round {round}: the count continues\n{ctx}"
        );
        assert!(
            after.windows(2).all(|w| w[1] == w[0] + 1),
            "round {round}: no tick lost or repeated\n{ctx}"
        );
        assert!(
            !out.stdout.contains("PROBE hello"),
            "it did not boot again\n{ctx}"
        );
        assert!(
            out.stdout.contains("PROBE tick stopped at"),
            "console input works\n{ctx}"
        );
        assert!(out.stdout.contains("PROBE done"), "{ctx}");
        assert_eq!(out.status.code(), Some(0), "{ctx}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_damaged_snapshot_is_refused_with_a_clear_error() {
    report_mode("snapshot damage");
    let (snap, _) = take_snapshot("snapshot-damage").await;
    let state = std::fs::read(snap.join("state.json")).unwrap();
    let memory_len = std::fs::metadata(snap.join("memory.img")).unwrap().len();
    let newline = state.iter().position(|&b| b == b'\n').unwrap();
    let header = String::from_utf8(state[..newline].to_vec()).unwrap();

    let refuse = |what: &str, needle: &str| {
        let out = restore(&snap).wait(TIMEOUT);
        assert_eq!(out.status.code(), Some(1), "{what}:\n{}", out.describe());
        assert!(
            out.stderr.contains(needle),
            "{what}: expected {needle:?}\n{}",
            out.describe()
        );
    };
    let put_state = |bytes: &[u8]| std::fs::write(snap.join("state.json"), bytes).unwrap();

    let mut flipped = state.clone();
    flipped[newline + 40] ^= 0x01;
    put_state(&flipped);
    refuse("a flipped byte", "is corrupt: checksum mismatch");

    let mut versioned = header.replacen(" 1.0.0 ", " 9.0.0 ", 1).into_bytes();
    versioned.extend_from_slice(&state[newline..]);
    put_state(&versioned);
    refuse("a newer format", "snapshot format 9.0.0 cannot be restored");

    let vendor = header
        .split_whitespace()
        .find_map(|w| w.strip_prefix("vendor="))
        .unwrap()
        .to_string();
    let mut faked = header
        .replace(&format!("vendor={vendor}"), "vendor=FakeVendorXYZ")
        .into_bytes();
    faked.extend_from_slice(&state[newline..]);
    put_state(&faked);
    refuse("another CPU vendor", "this host has a");

    let mut bad_magic = state.clone();
    bad_magic[0] = b'X';
    put_state(&bad_magic);
    refuse("a wrong magic", "is not a Berth snapshot");

    put_state(&state);
    std::fs::File::options()
        .write(true)
        .open(snap.join("memory.img"))
        .unwrap()
        .set_len(memory_len / 2)
        .unwrap();
    refuse(
        "a truncated memory file",
        &format!("the snapshot needs {memory_len}"),
    );
}

/// Snapshots `vm` (whose API socket is `socket`) into `snap` as `kind`
/// ("full", "diff" after a full one, or "live"), leaves it paused and stops
/// it.
async fn snapshot_and_stop(vm: Running, socket: &Path, snap: &Path, kind: &str) {
    let c = client(socket).await;
    let (kind, live) = match kind {
        "diff" => {
            let base = snap.with_file_name(format!(
                "{}-base",
                snap.file_name().unwrap().to_string_lossy()
            ));
            let req = SnapshotRequest {
                dir: base.display().to_string(),
                resume: true,
                ..Default::default()
            };
            c.snapshot(ctx(), &req).await.expect("base snapshot");
            ("diff", false)
        }
        "live" => ("full", true),
        _ => ("full", false),
    };
    let req = SnapshotRequest {
        dir: snap.display().to_string(),
        resume: false,
        kind: kind.into(),
        live,
        ..Default::default()
    };
    c.snapshot(ctx(), &req).await.expect("snapshot");
    c.stop(ctx(), &Empty::default()).await.unwrap();
    let out = vm.wait(TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
}

#[tokio::test(flavor = "current_thread")]
async fn a_restored_guest_keeps_using_its_disk() {
    report_mode("snapshot with a disk");
    for kind in ["full", "diff", "live"] {
        disk_after_restore(kind).await;
    }
}

async fn disk_after_restore(kind: &str) {
    let dir = scratch_dir(&format!("snapshot-disk-{kind}"));
    let disk = dir.join("disk.img");
    let host: Vec<u8> = (0..512 * 128).map(|i| (i % 253) as u8).collect();
    std::fs::write(&disk, &host).unwrap();
    let socket = dir.join("vmm.sock");
    let mut cmd = vmm_command(
        &probe_elf(),
        1,
        64,
        "probe.mode=blk probe.blk_hold=1 probe.blk_write=8:16:5 probe.blk_read=64:8",
    );
    cmd.arg("--disk")
        .arg(format!("{},serial=snapdisk", disk.display()));
    cmd.arg("--api-socket").arg(&socket);
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE blk dev=0 holding", TIMEOUT);
    let snap = dir.join("snap");
    snapshot_and_stop(vm, &socket, &snap, kind).await;

    // The guest set the device up before the snapshot; it resumes using it.
    let mut vm = restore(&snap);
    vm.write_stdin(b"x");
    let out = vm.wait(TIMEOUT);
    let ctx = out.describe();
    assert!(
        out.stdout
            .contains("PROBE blk dev=0 write start=8 count=16 status=0"),
        "{ctx}"
    );
    assert!(out.stdout.contains("PROBE blk dev=0 verify ok"), "{ctx}");
    let fnv = host[64 * 512..72 * 512]
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
    assert!(
        out.stdout
            .contains(&format!("read start=64 count=8 status=0 fnv={fnv:016x}")),
        "{ctx}"
    );
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    let after = std::fs::read(&disk).unwrap();
    for s in 8..24u64 {
        for i in 0..512u64 {
            let want = (5 + s * 131 + i * 7) as u8;
            assert_eq!(
                after[(s * 512 + i) as usize],
                want,
                "sector {s} byte {i} written after restore"
            );
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_restored_guest_keeps_receiving_on_its_tap() {
    report_mode("snapshot with a tap");
    for (i, kind) in ["full", "diff", "live"].into_iter().enumerate() {
        tap_after_restore(kind, i).await;
    }
}

async fn tap_after_restore(kind: &str, i: usize) {
    use berth_tests::net::{net_peer, TestTap};
    let dir = scratch_dir(&format!("snapshot-net-{kind}"));
    let tap = TestTap::create(&format!("s{i}"));
    let mut peer = net_peer(&tap.0);
    let socket = dir.join("vmm.sock");
    let mac = "52:54:00:00:5a:01";
    let mut cmd = vmm_command(&probe_elf(), 1, 64, "probe.mode=net probe.net_rx=2");
    cmd.arg("--nic").arg(format!("tap={},mac={mac}", tap.0));
    cmd.arg("--api-socket").arg(&socket);
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE net rx ready", TIMEOUT);
    let snap = dir.join("snap");
    snapshot_and_stop(vm, &socket, &snap, kind).await;

    // Its receive buffers were posted before the snapshot; frames sent now
    // land in them.
    let vm = restore(&snap);
    std::thread::sleep(Duration::from_millis(300));
    peer.write_stdin(
        format!("send {mac} AFTER-RESTORE 1\nsend {mac} AFTER-RESTORE 2\n").as_bytes(),
    );
    let out = vm.wait(TIMEOUT);
    let ctx = out.describe();
    assert!(
        out.stdout
            .contains("PROBE net rx len=60 payload=AFTER-RESTORE 1"),
        "{ctx}"
    );
    assert!(
        out.stdout
            .contains("PROBE net rx len=60 payload=AFTER-RESTORE 2"),
        "{ctx}"
    );
    assert!(out.stdout.contains("PROBE net rx done got=2"), "{ctx}");
    assert_eq!(out.status.code(), Some(0), "{ctx}");
}

async fn snap(
    c: &VmmServiceClient,
    dir: &Path,
    kind: &str,
    live: bool,
    resume: bool,
) -> berth_tests::contract::vmm::SnapshotReply {
    let req = SnapshotRequest {
        dir: dir.display().to_string(),
        kind: kind.into(),
        live,
        resume,
        ..Default::default()
    };
    c.snapshot(ctx(), &req)
        .await
        .unwrap_or_else(|e| panic!("{kind} snapshot: {e:?}"))
}

#[tokio::test(flavor = "current_thread")]
async fn a_chain_of_three_diffs_restores_the_latest_state() {
    report_mode("diff snapshots");
    let dir = scratch_dir("snapshot-diff");
    let socket = dir.join("vmm.sock");
    let mut cmd = vmm_command(&probe_elf(), 1, 64, "probe.mode=tick");
    cmd.arg("--api-socket").arg(&socket);
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE tick 3", TIMEOUT);
    let c = client(&socket).await;
    snap(&c, &dir.join("base"), "full", false, true).await;
    for (i, at) in [(1, 6), (2, 9)] {
        vm.wait_for_output(&format!("PROBE tick {at}"), TIMEOUT);
        let r = snap(&c, &dir.join(format!("d{i}")), "diff", false, true).await;
        assert!(
            r.pages_written > 0 && r.pages_written < 1000,
            "a diff holds few pages: {r:?}"
        );
    }
    vm.wait_for_output("PROBE tick 12", TIMEOUT);
    snap(&c, &dir.join("d3"), "diff", false, false).await;
    c.stop(ctx(), &Empty::default()).await.unwrap();
    let out = vm.wait(TIMEOUT);
    let last = *ticks(&out.stdout).last().unwrap();
    let on_disk = std::fs::metadata(dir.join("d3/memory.img"))
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap();
    assert!(
        on_disk < 1 << 20,
        "a diff's memory file is small: {on_disk} bytes"
    );

    let mut vm = restore(&dir.join("d3"));
    vm.wait_for_output(&format!("PROBE tick {}", last + 2), TIMEOUT);
    vm.write_stdin(b"q");
    let out = vm.wait(TIMEOUT);
    assert_eq!(
        ticks(&out.stdout).first(),
        Some(&(last + 1)),
        "{}",
        out.describe()
    );

    // Without its base the chain cannot be restored.
    std::fs::rename(dir.join("base"), dir.join("gone")).unwrap();
    let out = restore(&dir.join("d3")).wait(TIMEOUT);
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("parent snapshot") && out.stderr.contains("is missing"),
        "{}",
        out.describe()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_live_snapshot_pauses_briefly_and_restores_a_consistent_guest() {
    report_mode("live snapshot");
    let dir = scratch_dir("snapshot-live");
    let socket = dir.join("vmm.sock");
    let mut cmd = vmm_command(&probe_elf(), 2, 256, "probe.mode=tick");
    cmd.arg("--api-socket").arg(&socket);
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE tick 3", TIMEOUT);
    let c = client(&socket).await;
    let r = snap(&c, &dir.join("live"), "full", true, true).await;
    eprintln!(
        "live snapshot: {} passes, {} pages, paused {} ms",
        r.iterations, r.pages_written, r.pages_written
    );
    assert!(r.iterations >= 2, "{r:?}");
    let info = c.info(ctx(), &Empty::default()).await.unwrap();
    assert_eq!(
        info.state, "running",
        "the guest runs on after a live snapshot"
    );
    let before = ticks(&vm.stdout_so_far()).last().copied().unwrap();
    vm.wait_for_output(&format!("PROBE tick {}", before + 2), TIMEOUT);
    c.stop(ctx(), &Empty::default()).await.unwrap();
    let original = ticks(&vm.wait(TIMEOUT).stdout);

    let mut restored = restore(&dir.join("live"));
    restored.wait_for_output("PROBE tick", TIMEOUT);
    std::thread::sleep(Duration::from_millis(300));
    restored.write_stdin(b"q");
    let out = restored.wait(TIMEOUT);
    let after = ticks(&out.stdout);
    let first = after[0];
    assert!(
        original.contains(&(first - 1)),
        "it continues from a point the guest reached: {first}\n{}",
        out.describe()
    );
    assert!(
        after.windows(2).all(|w| w[1] == w[0] + 1),
        "{}",
        out.describe()
    );
    assert!(out.stdout.contains("PROBE done"), "{}", out.describe());
}

fn counts(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("PROBE dirty count="))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn a_guest_dirtying_50_mib_s_survives_full_live_and_diff_chain_snapshots_intact() {
    report_mode("live snapshot under dirtying");
    let dir = scratch_dir("snapshot-dirty");
    let socket = dir.join("vmm.sock");
    let mut cmd = vmm_command(
        &probe_elf(),
        1,
        256,
        "probe.mode=dirty probe.dirty_mib=64 probe.dirty_rate=50 probe.report_ms=200",
    );
    cmd.args(["--console-in", "stdin", "--api-socket"])
        .arg(&socket);
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE dirty ready", TIMEOUT);
    std::thread::sleep(Duration::from_millis(800));
    let c = client(&socket).await;
    let before = *counts(&vm.stdout_so_far())
        .last()
        .expect("reports before the snapshot");
    snap(&c, &dir.join("full"), "full", false, true).await;
    std::thread::sleep(Duration::from_millis(300));
    let r = snap(&c, &dir.join("live"), "full", true, true).await;
    eprintln!(
        "live snapshot at 50 MiB/s: {} passes, {} pages, paused {} ms",
        r.iterations, r.pages_written, r.pause_ms
    );
    assert!(r.iterations >= 2, "{r:?}");
    // A chain of three diffs on top of the live snapshot.
    for name in ["diff1", "diff2", "diff3"] {
        std::thread::sleep(Duration::from_millis(400));
        let r = snap(&c, &dir.join(name), "diff", false, true).await;
        assert!(
            r.pages_written > 0,
            "{name}: the dirtier changed pages since the last snapshot: {r:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    c.stop(ctx(), &Empty::default()).await.unwrap();
    let original = vm.wait(TIMEOUT);
    assert!(
        !original.stdout.contains("verify fail"),
        "{}",
        original.describe()
    );

    for snapshot in ["full", "live", "diff3"] {
        let mut vm = restore(&dir.join(snapshot));
        vm.wait_for_output("PROBE dirty count=", TIMEOUT);
        vm.write_stdin(b"v");
        vm.wait_for_output("PROBE dirty verify", TIMEOUT);
        vm.write_stdin(b"q");
        let out = vm.wait(TIMEOUT);
        let ctx = out.describe();
        assert!(
            out.stdout.contains("PROBE dirty verify ok pages=16384"),
            "{snapshot}: memory intact\n{ctx}"
        );
        assert!(!out.stdout.contains("verify fail"), "{snapshot}\n{ctx}");
        let after = counts(&out.stdout);
        assert!(
            after[0] > before,
            "{snapshot}: the count continues past {before}: {after:?}"
        );
        assert!(
            after.windows(2).all(|w| w[1] >= w[0]),
            "{snapshot}: {after:?}"
        );
        assert!(
            out.stdout.contains("PROBE dirty stopped"),
            "{snapshot}\n{ctx}"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_vmm_killed_while_writing_leaves_no_snapshot_that_looks_valid() {
    report_mode("snapshot crash");
    let dir = scratch_dir("snapshot-crash");
    let socket = dir.join("vmm.sock");
    // A lot of non-zero memory, so writing it takes a while.
    let mut cmd = vmm_command(&probe_elf(), 1, 768, "probe.mode=dirty probe.dirty_mib=640");
    cmd.args(["--console-in", "stdin", "--api-socket"])
        .arg(&socket);
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE dirty ready", TIMEOUT);
    let c = client(&socket).await;
    let snap_dir = dir.join("snap");
    let req = SnapshotRequest {
        dir: snap_dir.display().to_string(),
        ..Default::default()
    };
    let call = c.snapshot(ctx(), &req);
    let kill = async {
        // Kill as soon as the snapshot's memory file is being written.
        let tmp = dir.join("snap.tmp/memory.img");
        while !tmp.exists() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        Command::new("kill")
            .args(["-9", &vm.pid().to_string()])
            .status()
            .unwrap();
    };
    let (result, _) = tokio::join!(call, kill);
    assert!(
        result.is_err(),
        "the snapshot cannot have finished: {result:?}"
    );
    let _ = vm.wait(TIMEOUT);
    assert!(
        !snap_dir.exists(),
        "no snapshot directory under the real name"
    );
    let out = restore(&snap_dir).wait(TIMEOUT);
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("cannot read"), "{}", out.describe());
}

/// Stop's reply must reach the caller before the VMM exits: a caller that
/// sees the socket close cannot tell a clean stop from a crash.
#[tokio::test(flavor = "current_thread")]
async fn stop_is_answered_before_the_vmm_exits() {
    // Paused, as after a snapshot, the vCPUs stop at once and the exit
    // comes soonest: that is where the race showed.
    for round in 0..10 {
        let dir = scratch_dir(&format!("stop-answer-{round}"));
        let socket = dir.join("vmm.sock");
        let mut cmd = vmm_command(&probe_elf(), 2, 64, "probe.mode=tick");
        cmd.arg("--api-socket").arg(&socket);
        let mut vm = Running::spawn(cmd);
        vm.wait_for_output("PROBE tick 1", TIMEOUT);
        let c = client(&socket).await;
        c.pause(ctx(), &Empty::default()).await.expect("pause");
        let reply = c.stop(ctx(), &Empty::default()).await;
        let out = vm.wait(TIMEOUT);
        assert!(
            reply.is_ok(),
            "round {round}: stop answered {reply:?}\n{}",
            out.describe()
        );
        assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    }
}

/// A limit changed live is what a snapshot keeps: the restored VM runs
/// under the new one, not the one it was started with.
#[tokio::test(flavor = "current_thread")]
async fn a_snapshot_keeps_a_rate_limit_changed_live() {
    use berth_tests::contract::common::RateLimit;
    use berth_tests::contract::vmm::SetRateLimitRequest;
    let dir = scratch_dir("snapshot-limit");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let socket = dir.join("vmm.sock");
    let mut cmd = vmm_command(&probe_elf(), 1, 64, "probe.mode=tick");
    cmd.arg("--api-socket")
        .arg(&socket)
        .arg("--disk")
        .arg(format!("{},bps=1000000", disk.display()));
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE tick 1", TIMEOUT);
    let c = client(&socket).await;
    let req = SetRateLimitRequest {
        device: "disk0".into(),
        direction: "io".into(),
        limit: protobuf::MessageField::some(RateLimit {
            bytes_per_s: 2_000_000,
            ops_per_s: 50,
            ..Default::default()
        }),
        ..Default::default()
    };
    c.set_rate_limit(ctx(), &req).await.expect("set_rate_limit");
    let wrong = SetRateLimitRequest {
        device: "disk7".into(),
        direction: "io".into(),
        ..Default::default()
    };
    let err = c.set_rate_limit(ctx(), &wrong).await.unwrap_err();
    assert!(
        format!("{err:?}").contains("this VM has: disk0/io"),
        "{err:?}"
    );
    let snap = dir.join("snap");
    let req = SnapshotRequest {
        dir: snap.display().to_string(),
        resume: false,
        ..Default::default()
    };
    c.snapshot(ctx(), &req).await.expect("snapshot");
    c.stop(ctx(), &Empty::default()).await.expect("stop");
    vm.wait(TIMEOUT);

    let restored_socket = dir.join("restored.sock");
    let mut cmd = Command::new(vmm_binary());
    cmd.arg("--restore")
        .arg(&snap)
        .arg("--api-socket")
        .arg(&restored_socket)
        .args(["--console-stdout"]);
    let restored = Running::spawn(cmd);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !restored_socket.exists() {
        assert!(std::time::Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let c = client(&restored_socket).await;
    let stats = c.stats(ctx(), &Empty::default()).await.unwrap();
    let limit = stats.devices[0].limit.clone().unwrap();
    assert_eq!((limit.bytes_per_s, limit.ops_per_s), (2_000_000, 50));
    c.stop(ctx(), &Empty::default()).await.expect("stop");
    restored.wait(TIMEOUT);
}

/// Pauses the VMM behind `socket`, snapshots it into `snap` and stops it;
/// returns everything it printed on its console.
async fn snapshot_paused_and_stop(vm: Running, socket: &Path, snap: &Path) -> String {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = client(socket).await;
    c.pause(ctx(), &Empty::default()).await.expect("pause");
    let req = SnapshotRequest {
        dir: snap.display().to_string(),
        resume: false,
        ..Default::default()
    };
    let taken = c.snapshot(ctx(), &req).await;
    let stopped = c.stop(ctx(), &Empty::default()).await;
    let out = vm.wait(TIMEOUT);
    assert!(taken.is_ok(), "snapshot: {taken:?}\n{}", out.describe());
    assert!(stopped.is_ok(), "stop: {stopped:?}\n{}", out.describe());
    out.stdout
}

/// KVM finishes a port or MMIO access that userspace emulated only when
/// the vCPU enters KVM_RUN again; a vCPU paused right after such an exit is
/// still on the instruction. A snapshot taken then must not make the
/// restored guest do the access again: a console read would pop a second
/// byte from the receive FIFO and the first would be lost.
#[tokio::test(flavor = "current_thread")]
async fn a_snapshot_never_replays_a_port_access() {
    report_mode("snapshot mid port access");
    let dir = scratch_dir("snapshot-port-access");
    let mut cmd = vmm_command(&probe_elf(), 1, 64, "probe.mode=echo");
    let mut socket = dir.join("vmm0.sock");
    cmd.arg("--api-socket")
        .arg(&socket)
        .args(["--console-in", "stdin"]);
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE echo ready", TIMEOUT);
    const ROUNDS: usize = 16;
    let blocks: Vec<String> = (0..=ROUNDS)
        .map(|r| (0..120).map(|k| format!("<{r:02}-{k:03}>")).collect())
        .collect();
    let mut echoed = String::new();
    for (round, block) in blocks.iter().enumerate() {
        // Paused while the guest echoes the block, byte by byte.
        vm.write_stdin(block.as_bytes());
        vm.wait_for_output(&format!("<{round:02}-020>"), TIMEOUT);
        let snap = dir.join(format!("snap{round}"));
        echoed.push_str(&snapshot_paused_and_stop(vm, &socket, &snap).await);
        socket = dir.join(format!("vmm{}.sock", round + 1));
        let mut cmd = Command::new(vmm_binary());
        cmd.arg("--restore")
            .arg(&snap)
            .args(["--console-stdout", "--console-in", "stdin"])
            .arg("--api-socket")
            .arg(&socket);
        vm = Running::spawn(cmd);
    }
    echoed.push_str(&snapshot_paused_and_stop(vm, &socket, &dir.join("last")).await);

    // Input the VMM had read but not yet put in the guest's FIFO ends with
    // it, so each block may be cut short; but what the guest echoed of a
    // block is its beginning, without a gap.
    let echoed = echoed
        .split_once("PROBE echo ready\r\n")
        .unwrap_or_else(|| panic!("the echo mode started\n{echoed}"))
        .1;
    for (round, block) in blocks.iter().enumerate() {
        let start = echoed
            .find(&format!("<{round:02}-000>"))
            .unwrap_or_else(|| panic!("block {round} was echoed\n{echoed}"));
        let rest = &echoed[start..];
        let end = rest
            .find(&format!("<{:02}-000>", round + 1))
            .unwrap_or(rest.len());
        let got = &rest[..end];
        assert!(
            got.len() > 20 * 8 && block.starts_with(got),
            "round {round}: the guest echoed a byte twice or lost one across the snapshot\n\
             sent:   {block}\nechoed: {got}"
        );
    }
}
