//! virtio-blk and virtio-net of berth-vmm, driven by the probe guest's
//! polling driver on real KVM, with real files and a real tap. The probe
//! prints what it saw; the test checks the files and the frames on the host.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth_tests::net::{net_peer, TestTap};
use berth_tests::*;

const TIMEOUT: Duration = Duration::from_secs(60);
const SECTOR: usize = 512;
const GUEST_MAC: &str = "52:54:00:00:be:01";

/// The probe's write pattern: byte i of sector s on block device d.
fn pattern(seed: u64, d: u64, s: u64, i: u64) -> u8 {
    (seed + d + s * 131 + i * 7) as u8
}

/// A disk image of `sectors` sectors with host-written contents.
fn disk(dir: &Path, name: &str, sectors: usize, salt: u8) -> PathBuf {
    let path = dir.join(name);
    let bytes: Vec<u8> = (0..sectors * SECTOR)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(salt))
        .collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn probe(cmdline: &str) -> Command {
    vmm_command(&probe_elf(), 1, 64, cmdline)
}

fn assert_pattern(file: &[u8], seed: u64, d: u64, start: u64, count: u64) {
    for s in start..start + count {
        for i in 0..SECTOR as u64 {
            let at = (s as usize) * SECTOR + i as usize;
            assert_eq!(
                file[at],
                pattern(seed, d, s, i),
                "disk {d} sector {s} byte {i}"
            );
        }
    }
}

/// The disk found through the DSDT (the default, ACPI) and through the
/// command line (legacy discovery) is driven the same way.
#[test]
fn blk_writes_land_in_the_file_and_host_data_reads_back() {
    blk_round_trip("acpi");
}

#[test]
fn blk_found_through_the_command_line_works_the_same() {
    blk_round_trip("legacy");
}

fn blk_round_trip(discovery: &str) {
    report_mode(&format!("blk_round_trip {discovery}"));
    let dir = scratch_dir(&format!("virtio-blk-{discovery}"));
    let path = disk(&dir, "disk0.img", 2048, 1);
    let before = std::fs::read(&path).unwrap();
    let mut cmd =
        probe("probe.mode=blk probe.blk_write=8:300:5 probe.blk_read=512:96 probe.blk_oob=1");
    cmd.arg("--disk")
        .arg(format!("{},serial=berth-disk-0", path.display()))
        .args(["--discovery", discovery]);
    let out = run(cmd, TIMEOUT);
    let ctx = out.describe();
    let lines = out.probe_lines();
    let has = |l: &str| lines.iter().any(|x| x == l);
    assert!(
        has(&format!(
            "PROBE virtio_source {}",
            if discovery == "acpi" {
                "acpi"
            } else {
                "cmdline"
            }
        )),
        "{ctx}"
    );
    assert!(
        has("PROBE virtio dev=0 base=0xd0000000 irq=5 id=2"),
        "{ctx}"
    );
    if discovery == "acpi" {
        assert!(
            has("PROBE acpi_virtio 0xd0000000 0x1000 5"),
            "the DSDT's window and GSI\n{ctx}"
        );
        assert!(
            !out.stdout.contains("virtio_mmio.device="),
            "no command-line words with ACPI\n{ctx}"
        );
    } else {
        assert_eq!(out.probe_value("acpi").as_deref(), Some("none"), "{ctx}");
    }
    assert!(
        has("PROBE blk dev=0 capacity=2048 ro=0 id=berth-disk-0"),
        "{ctx}"
    );
    assert!(
        has("PROBE blk dev=0 write start=8 count=300 status=0"),
        "{ctx}"
    );
    assert!(has("PROBE blk dev=0 flush status=0"), "{ctx}");
    assert!(has("PROBE blk dev=0 verify ok"), "{ctx}");
    assert!(
        has("PROBE blk dev=0 oob status=1"),
        "past the end is IOERR\n{ctx}"
    );
    let after = std::fs::read(&path).unwrap();
    assert_pattern(&after, 5, 0, 8, 300);
    assert_eq!(
        &after[..8 * SECTOR],
        &before[..8 * SECTOR],
        "before the write range"
    );
    assert_eq!(
        &after[308 * SECTOR..],
        &before[308 * SECTOR..],
        "after the write range"
    );
    let expected = fnv1a(&before[512 * SECTOR..608 * SECTOR]);
    assert!(
        has(&format!(
            "PROBE blk dev=0 read start=512 count=96 status=0 fnv={expected:016x}"
        )),
        "the guest read what the host wrote\n{ctx}"
    );
    assert_eq!(out.status.code(), Some(0), "{ctx}");
}

#[test]
fn read_only_disk_refuses_writes_and_two_disks_stay_independent() {
    report_mode("read_only_disk_refuses_writes_and_two_disks_stay_independent");
    let dir = scratch_dir("virtio-blk-two");
    let rw = disk(&dir, "rw.img", 1024, 2);
    let ro = disk(&dir, "ro.img", 1024, 3);
    let rw_before = std::fs::read(&rw).unwrap();
    let ro_before = std::fs::read(&ro).unwrap();
    let mut cmd = probe("probe.mode=blk probe.blk_write=16:8:40 probe.blk_read=0:64");
    cmd.arg("--disk")
        .arg(&rw)
        .arg("--disk")
        .arg(format!("{},ro", ro.display()));
    let out = run(cmd, TIMEOUT);
    let ctx = out.describe();
    let lines = out.probe_lines();
    let has = |l: &str| lines.iter().any(|x| x == l);
    assert!(has("PROBE blk dev=1 capacity=1024 ro=1 id="), "{ctx}");
    assert!(
        has("PROBE blk dev=0 write start=16 count=8 status=0"),
        "{ctx}"
    );
    assert!(
        has("PROBE blk dev=1 write start=16 count=8 status=1"),
        "writes to the read-only disk fail with IOERR\n{ctx}"
    );
    assert_eq!(
        std::fs::read(&ro).unwrap(),
        ro_before,
        "the read-only file is unchanged"
    );
    let rw_after = std::fs::read(&rw).unwrap();
    assert_pattern(&rw_after, 40, 0, 16, 8);
    assert_eq!(&rw_after[24 * SECTOR..], &rw_before[24 * SECTOR..]);
    // Each disk reads back its own contents.
    let fnv0 = fnv1a(&rw_after[..64 * SECTOR]);
    let fnv1 = fnv1a(&ro_before[..64 * SECTOR]);
    assert_ne!(fnv0, fnv1);
    assert!(
        has(&format!(
            "PROBE blk dev=0 read start=0 count=64 status=0 fnv={fnv0:016x}"
        )),
        "{ctx}"
    );
    assert!(
        has(&format!(
            "PROBE blk dev=1 read start=0 count=64 status=0 fnv={fnv1:016x}"
        )),
        "{ctx}"
    );
    assert_eq!(out.status.code(), Some(0), "{ctx}");
}

#[test]
fn net_frames_cross_the_tap_both_ways() {
    report_mode("net_frames_cross_the_tap_both_ways");
    let tap = TestTap::create("n");
    let mut peer = net_peer(&tap.0);
    let mut cmd = probe("probe.mode=net probe.net_tx=3 probe.net_rx=2");
    cmd.arg("--nic")
        .arg(format!("tap={},mac={GUEST_MAC}", tap.0));
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE net rx ready", TIMEOUT);
    peer.write_stdin(
        format!("send {GUEST_MAC} HOST-FRAME 0\nsend ff:ff:ff:ff:ff:ff HOST-FRAME 1\n").as_bytes(),
    );
    let out = vm.wait(TIMEOUT);
    let ctx = out.describe();
    let lines = out.probe_lines();
    let has = |l: &str| lines.iter().any(|x| x == l);
    assert!(has(&format!("PROBE net mac={GUEST_MAC}")), "{ctx}");
    assert!(has("PROBE net tx sent=3"), "{ctx}");
    assert!(has("PROBE net rx len=60 payload=HOST-FRAME 0"), "{ctx}");
    assert!(has("PROBE net rx len=60 payload=HOST-FRAME 1"), "{ctx}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("PROBE net rx done got=2")),
        "{ctx}"
    );
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    for k in 0..3 {
        peer.wait_for_output(
            &format!(
                "RECV src={GUEST_MAC} dst=ff:ff:ff:ff:ff:ff len=60 payload=BERTH-PROBE-FRAME {k}"
            ),
            TIMEOUT,
        );
    }
}

#[test]
fn tap_is_created_when_missing_and_gone_after() {
    report_mode("tap_is_created_when_missing_and_gone_after");
    let name = format!("bt{}c", std::process::id());
    let sys = Path::new("/sys/class/net").join(&name);
    assert!(!sys.exists());
    let mut cmd = probe("probe.mode=echo");
    cmd.args(["--console-in", "stdin", "--nic"])
        .arg(format!("tap={name}"));
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE echo ready", TIMEOUT);
    assert!(sys.exists(), "berth-vmm created tap {name}");
    vm.write_stdin(b"quit\n");
    let out = vm.wait(TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert!(!sys.exists(), "a tap berth-vmm created goes away with it");
}

#[test]
fn hostile_descriptors_get_errors_or_a_reset_and_the_vmm_keeps_serving() {
    report_mode("hostile_descriptors_get_errors_or_a_reset_and_the_vmm_keeps_serving");
    let dir = scratch_dir("virtio-bad");
    let path = disk(&dir, "disk.img", 256, 4);
    let tap = TestTap::create("b");
    let mut peer = net_peer(&tap.0);
    let mut cmd = probe("probe.mode=bad");
    cmd.arg("--disk").arg(&path);
    cmd.arg("--nic")
        .arg(format!("tap={},mac={GUEST_MAC}", tap.0));
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE net rx ready", TIMEOUT);
    peer.write_stdin(format!("send {GUEST_MAC} AFTER-BAD-TX\n").as_bytes());
    let out = vm.wait(TIMEOUT);
    let ctx = out.describe();
    let lines = out.probe_lines();
    let expected = [
        ("oob_addr", "status:1"),
        ("loop", "needs_reset"),
        ("zero_len", "status:1"),
        ("oversized", "status:1"),
        ("readonly_buffer", "status:1"),
        ("avail_jump", "needs_reset"),
        ("bad_head", "needs_reset"),
    ];
    for (case, outcome) in expected {
        let line = format!("PROBE bad case={case} outcome={outcome} recovered=ok");
        assert!(lines.contains(&line), "missing {line:?}\n{ctx}");
    }
    assert!(
        lines.contains(&"PROBE bad case=net_tx_oob rx_after=ok".to_string()),
        "the receive queue still works after a hostile transmit\n{ctx}"
    );
    assert!(lines.contains(&"PROBE done".to_string()), "{ctx}");
    assert_eq!(out.status.code(), Some(0), "the VMM survived it all\n{ctx}");
}

/// virtio-rng: the guest's buffers come back full of random bytes, two
/// answers differ; without `--rng` the guest finds no such device.
#[test]
fn rng_hands_the_guest_random_bytes() {
    report_mode("rng_hands_the_guest_random_bytes");
    let mut cmd = probe("probe.mode=rng probe.rng_bytes=1024");
    cmd.arg("--rng");
    let out = run(cmd, TIMEOUT);
    let ctx = out.describe();
    for i in 0..2 {
        let line = out
            .probe_lines()
            .into_iter()
            .find_map(|l| {
                l.strip_prefix(&format!("PROBE rng read {i} "))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("no read {i}\n{ctx}"));
        let distinct: u32 = line
            .strip_prefix("len=1024 distinct=")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}\n{ctx}"));
        // 1 KiB of random bytes holds nearly every byte value.
        assert!(distinct > 200, "{line}\n{ctx}");
    }
    assert!(
        out.probe_lines()
            .contains(&"PROBE rng differ=1".to_string()),
        "{ctx}"
    );
    assert!(
        out.probe_lines()
            .contains(&"PROBE virtio dev=0 base=0xd0000000 irq=5 id=4".to_string()),
        "{ctx}"
    );

    let out = run(probe("probe.mode=rng"), TIMEOUT);
    assert_eq!(
        out.probe_value("rng").as_deref(),
        Some("error=no_device"),
        "{}",
        out.describe()
    );
}
