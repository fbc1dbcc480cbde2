//! The Linux guest image on berth-vmm, and the image itself under QEMU.
//!
//! On hardware KVM the guest boots to its initramfs marker and resets. On
//! the software PVM KVM a stock kernel cannot get past its early boot (see
//! shared TESTING.md), so the test asserts what can be seen there: the early
//! console lines carry our command line and memory map, and the VMM ends with
//! a clear internal-error report instead of hanging.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use berth_tests::*;

const MEMORY_MIB: u64 = 256;

fn e820_lines(stdout: &str) -> Vec<(u64, u64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l.trim_end_matches('\r').strip_prefix("BIOS-e820: [mem ")?;
            let (range, kind) = rest.split_once("] ")?;
            if kind != "usable" {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = u64::from_str_radix(start.trim_start_matches("0x"), 16).ok()?;
            let end = u64::from_str_radix(end.trim_start_matches("0x"), 16).ok()?;
            Some((start, end - start + 1))
        })
        .collect()
}

fn boot_linux(kernel: &Path, test: &str) {
    let mode = report_mode(test);
    let linux = image_dir("linux");
    let marker = format!("berth.test={}", std::process::id());
    match mode {
        KvmMode::Hardware => {
            let cmdline = format!(
                "console=ttyS0 reboot=k panic=-1 {marker} berth.run=\"echo ran-from-cmdline\""
            );
            let mut cmd = vmm_command(kernel, 2, MEMORY_MIB, &cmdline);
            cmd.arg("--initrd").arg(linux.join("initramfs.cpio.gz"));
            // Our tinyconfig kernel has no ACPI: the MP table and the
            // command-line announcements.
            cmd.args(["--discovery", "legacy"]);
            let out = run(cmd, Duration::from_secs(120));
            assert!(
                out.stdout.contains("BERTH-GUEST-READY cpus=2"),
                "{}",
                out.describe()
            );
            assert!(
                out.stdout.contains("ran-from-cmdline"),
                "{}",
                out.describe()
            );
            assert!(out.stdout.contains(&marker), "{}", out.describe());
            assert_eq!(out.status.code(), Some(0), "{}", out.describe());
            assert!(
                out.stderr.contains("guest requested reset"),
                "{}",
                out.describe()
            );
        }
        _ => {
            let cmdline = format!("earlyprintk=ttyS0 console=ttyS0 {marker}");
            let mut cmd = vmm_command(kernel, 1, MEMORY_MIB, &cmdline);
            cmd.arg("--initrd").arg(linux.join("initramfs.cpio.gz"));
            // Our tinyconfig kernel has no ACPI: the MP table and the
            // command-line announcements.
            cmd.args(["--discovery", "legacy"]);
            let out = run(cmd, Duration::from_secs(180));
            assert!(
                out.stdout.contains("Linux version 6.1"),
                "{}",
                out.describe()
            );
            assert!(
                out.stdout.contains(&format!("Command line: {cmdline}")),
                "{}",
                out.describe()
            );
            assert_eq!(
                e820_lines(&out.stdout),
                expected_low_e820(MEMORY_MIB),
                "{}",
                out.describe()
            );
            assert_eq!(out.status.code(), Some(2), "{}", out.describe());
            assert!(
                out.stderr
                    .contains("vCPU 0 stopped: KVM_EXIT_INTERNAL_ERROR")
                    && out.stderr.contains("at RIP 0x"),
                "{}",
                out.describe()
            );
        }
    }
}

#[test]
fn linux_vmlinux_boots() {
    boot_linux(&image_dir("linux").join("vmlinux"), "linux_vmlinux_boots");
}

#[test]
fn linux_bzimage_boots() {
    boot_linux(&image_dir("linux").join("bzImage"), "linux_bzimage_boots");
}

/// Proves the image (kernel, initramfs, /init) under QEMU's software
/// emulation, independently of berth-vmm and of this host's KVM.
#[test]
fn linux_image_boots_under_qemu_tcg() {
    let linux = image_dir("linux");
    let qemu = which("qemu-system-x86_64").expect(
        "qemu-system-x86_64 is missing: apt-get install qemu-system-x86 (ci/install-deps.sh does)",
    );
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-accel",
        "tcg",
        "-M",
        "microvm,acpi=off",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "256",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
    ])
    .arg(linux.join("bzImage"))
    .arg("-initrd")
    .arg(linux.join("initramfs.cpio.gz"))
    .arg("-append")
    .arg("console=ttyS0 reboot=t panic=-1 berth.run=\"echo qemu-ran-it\"");
    let out = run(cmd, Duration::from_secs(180));
    assert!(
        out.stdout.contains("BERTH-GUEST-READY cpus=2"),
        "{}",
        out.describe()
    );
    assert!(out.stdout.contains("qemu-ran-it"), "{}", out.describe());
    assert!(
        out.stdout.contains("BERTH-RUN-EXIT 0"),
        "{}",
        out.describe()
    );
}
