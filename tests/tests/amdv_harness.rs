//! Linux on hardware-style KVM, in every CI run: berth-vmm boots our Linux
//! guest on Debian's kvm_amd inside QEMU's software emulation of AMD-V (see
//! docs/testing.md). All scenarios share one boot of the inner host; each
//! test asserts on its own scenario's output.
//!
//! Run one by hand: `BERTH_HARNESS_ONLY=boot_2_vcpus cargo test -p berth-tests
//! --test amdv_harness boot_2_vcpus -- --nocapture`.

use std::sync::OnceLock;
use std::time::Duration;

use berth_tests::harness::{run_scenarios, HarnessRun, Scenario, ScenarioResult};

const GUEST_MEMORY_MIB: u64 = 256;

/// What every scenario's guest runs: proof it is a shell executing our
/// command (arithmetic the cmdline does not contain), its command line, its
/// RAM as the kernel sees it, then reboot (done by /init).
const GUEST_COMMAND: &str =
    "echo computed-$((6*7)); cat /proc/cmdline; grep System.RAM /proc/iomem";

fn vmm(kernel: &str, vcpus: u32, marker: &str) -> String {
    format!(
        "timeout 240 berth-vmm --kernel /guest/{kernel} --initrd /guest/initramfs.cpio.gz \
         --vcpus {vcpus} --memory-mib {GUEST_MEMORY_MIB} --console-stdout \
         --cmdline 'console=ttyS0 reboot=k panic=-1 quiet {marker} berth.run=\"{GUEST_COMMAND}\"'\n"
    )
}

fn scenarios() -> Vec<Scenario> {
    let all = vec![
        Scenario {
            name: "boot_1_vcpu",
            script: vmm("vmlinux", 1, "berth.marker=one-vcpu-elf"),
        },
        Scenario {
            name: "boot_2_vcpus",
            script: vmm("bzImage", 2, "berth.marker=two-vcpus-bzimage"),
        },
    ];
    match std::env::var("BERTH_HARNESS_ONLY") {
        Ok(only) => all
            .into_iter()
            .filter(|s| only.split(',').any(|o| o == s.name))
            .collect(),
        Err(_) => all,
    }
}

fn harness() -> &'static HarnessRun {
    static RUN: OnceLock<HarnessRun> = OnceLock::new();
    RUN.get_or_init(|| {
        eprintln!("[amdv_harness] mode: Linux on kvm_amd inside QEMU TCG (emulated AMD-V)");
        let run = run_scenarios(&scenarios(), Duration::from_secs(600));
        eprintln!(
            "[amdv_harness] inner host run took {:?}",
            run.finished.elapsed
        );
        run
    })
}

fn check_linux_boot(result: &ScenarioResult, vcpus: u32, marker: &str) {
    let out = &result.output;
    let ctx = format!("scenario {} ({} ms):\n{out}", result.name, result.ms);
    eprintln!("[amdv_harness] {} took {} ms", result.name, result.ms);
    assert!(
        out.contains(&format!("BERTH-GUEST-READY cpus={vcpus} ")),
        "guest reached userspace with {vcpus} CPUs\n{ctx}"
    );
    assert!(
        out.contains("computed-42"),
        "the cmdline command ran in a shell\n{ctx}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains(marker) && l.contains("berth.run=")),
        "/proc/cmdline carries our command line\n{ctx}"
    );
    let top = (GUEST_MEMORY_MIB << 20) - 1;
    assert!(
        out.lines()
            .any(|l| l.trim() == format!("00100000-{top:08x} : System RAM")),
        "the guest's RAM ends where the configured memory does\n{ctx}"
    );
    assert!(out.contains("BERTH-RUN-EXIT 0"), "{ctx}");
    assert!(
        out.contains("berth-vmm: guest requested reset"),
        "the guest's reboot ended berth-vmm through the i8042\n{ctx}"
    );
    assert_eq!(result.exit, 0, "berth-vmm exit status\n{ctx}");
}

#[test]
fn boot_1_vcpu() {
    check_linux_boot(
        &harness().scenario("boot_1_vcpu"),
        1,
        "berth.marker=one-vcpu-elf",
    );
}

#[test]
fn boot_2_vcpus() {
    check_linux_boot(
        &harness().scenario("boot_2_vcpus"),
        2,
        "berth.marker=two-vcpus-bzimage",
    );
}
