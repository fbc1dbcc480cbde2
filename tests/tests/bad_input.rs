//! Every bad input berth-vmm can be given ends it with status 1 and a
//! message that names the problem, before any guest runs.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use berth_tests::*;

fn expect_error(cmd: Command, needles: &[&str]) {
    let out = run(cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    for needle in needles {
        assert!(
            out.stderr.contains(needle),
            "missing {needle:?}:\n{}",
            out.describe()
        );
    }
    assert!(!out.stderr.contains("panicked"), "{}", out.describe());
}

fn probe_vm(vcpus: u32, memory_mib: u64) -> Command {
    vmm_command(&probe_elf(), vcpus, memory_mib, "probe.mode=boot")
}

#[test]
fn missing_kernel() {
    let path = "/nonexistent/berth/vmlinux";
    expect_error(
        vmm_command(Path::new(path), 1, 64, ""),
        &["cannot open kernel", path, "No such file"],
    );
}

#[test]
fn unreadable_kernel() {
    let dir = scratch_dir("unreadable-kernel");
    expect_error(
        vmm_command(&dir, 1, 64, ""),
        &["cannot open kernel", "Is a directory"],
    );
}

#[test]
fn file_that_is_not_a_kernel() {
    let dir = scratch_dir("not-a-kernel");
    let path = dir.join("notes.txt");
    std::fs::write(&path, "these are not the bytes of a kernel\n".repeat(100)).unwrap();
    expect_error(
        vmm_command(&path, 1, 64, ""),
        &["is not a kernel: neither an ELF vmlinux nor a bzImage"],
    );
}

#[test]
fn zero_vcpus() {
    expect_error(probe_vm(0, 64), &["vcpus must be at least 1, got 0"]);
}

#[test]
fn more_vcpus_than_kvm_allows() {
    expect_error(
        probe_vm(100_000, 64),
        &[
            "vcpus 100000 exceeds what this host allows",
            "KVM_CAP_MAX_VCPUS",
        ],
    );
}

#[test]
fn memory_too_small() {
    expect_error(
        probe_vm(1, 16),
        &["memory_mib 16 is below the minimum of 32 MiB"],
    );
}

#[test]
fn memory_too_large() {
    expect_error(
        probe_vm(1, 1 << 30),
        &["memory_mib 1073741824 exceeds this host's memory"],
    );
}

#[test]
fn cmdline_too_long() {
    let long = format!("probe.mode=boot {}", "x".repeat(3000));
    expect_error(
        vmm_command(&probe_elf(), 1, 64, &long),
        &[
            &format!("kernel command line is {} bytes", long.len()),
            "at most 2047",
        ],
    );
}

#[test]
fn initrd_that_does_not_fit() {
    let dir = scratch_dir("big-initrd");
    let initrd = dir.join("initrd.img");
    // Sparse: 80 MiB of apparent size costs no disk.
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(80 << 20)
        .unwrap();
    let mut cmd = probe_vm(1, 64);
    cmd.arg("--initrd").arg(&initrd);
    expect_error(
        cmd,
        &["initrd", "does not fit in guest memory", "83886080 bytes"],
    );
}

#[test]
fn missing_initrd() {
    let mut cmd = probe_vm(1, 64);
    cmd.arg("--initrd").arg("/nonexistent/initrd");
    expect_error(cmd, &["cannot open initrd /nonexistent/initrd"]);
}

#[test]
fn kvm_device_missing() {
    let mut cmd = probe_vm(1, 64);
    cmd.arg("--kvm-device").arg("/nonexistent/kvm");
    expect_error(cmd, &["/nonexistent/kvm does not exist", "no KVM"]);
}

#[test]
fn kvm_device_not_permitted() {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata("/dev/kvm")
        .expect("/dev/kvm is missing: this test needs it")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o006,
        0,
        "/dev/kvm is world-accessible here, so 'not permitted' cannot be provoked"
    );
    // Run a copy from a directory `nobody` can reach: the build tree may sit
    // in a private directory.
    let dir = scratch_dir("kvm-not-permitted");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let vmm = dir.join("berth-vmm");
    std::fs::copy(vmm_binary(), &vmm).unwrap();
    let mut cmd = Command::new(&vmm);
    cmd.args([
        "--kernel",
        "/nonexistent",
        "--vcpus",
        "1",
        "--memory-mib",
        "64",
    ]);
    cmd.uid(65534).gid(65534);
    expect_error(cmd, &["permission denied opening /dev/kvm", "kvm group"]);
}

#[test]
fn unknown_config_field() {
    let dir = scratch_dir("unknown-field");
    let path = dir.join("vm.toml");
    std::fs::write(
        &path,
        format!(
            "vcpus = 1\nmemory_mib = 64\nmemroy_mib = 128\n[kernel]\npath = {:?}\n",
            probe_elf()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(vmm_binary());
    cmd.arg("--config").arg(&path);
    expect_error(cmd, &["invalid VM config", "unknown field `memroy_mib`"]);
}
