//! The probe guest on berth-vmm: CPUs, memory, command line, console input,
//! reset and SIGTERM, asserted on what the probe itself printed.

use std::time::Duration;

use berth_tests::*;

const TIMEOUT: Duration = Duration::from_secs(60);

fn parse_hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|_| panic!("hex {s:?}"))
}

/// The probe's `PROBE e820 <addr> <size> <type>` lines for RAM.
fn probe_ram(out: &Finished) -> Vec<(u64, u64)> {
    out.probe_lines()
        .iter()
        .filter_map(|l| l.strip_prefix("PROBE e820 "))
        .filter_map(|rest| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            (f.get(2) == Some(&"1")).then(|| (parse_hex(f[0]), parse_hex(f[1])))
        })
        .collect()
}

/// How the guest is told its CPUs and devices (berth-vmm's --discovery).
#[derive(Clone, Copy, Debug)]
enum Discovery {
    Acpi,
    Legacy,
}

fn probe_command(
    vcpus: u32,
    memory_mib: u64,
    cmdline: &str,
    d: Discovery,
) -> std::process::Command {
    let mut cmd = vmm_command(&probe_elf(), vcpus, memory_mib, cmdline);
    if let Discovery::Legacy = d {
        cmd.args(["--discovery", "legacy"]);
    }
    cmd
}

fn boot_probe(vcpus: u32, memory_mib: u64) {
    boot_probe_with(vcpus, memory_mib, Discovery::Acpi);
}

fn boot_probe_with(vcpus: u32, memory_mib: u64, discovery: Discovery) {
    report_mode(&format!(
        "probe {vcpus} vCPUs {memory_mib} MiB, {discovery:?}"
    ));
    let cmd = probe_command(vcpus, memory_mib, "probe.mode=boot", discovery);
    let out = run(cmd, TIMEOUT);
    let ctx = out.describe();
    assert_eq!(
        out.probe_value("hello").as_deref(),
        Some("boot=linux"),
        "{ctx}"
    );
    // Each discovery alone: a guest never sees both.
    match discovery {
        Discovery::Acpi => {
            assert_eq!(
                out.probe_value("cpus_madt"),
                Some(vcpus.to_string()),
                "{ctx}"
            );
            assert_eq!(
                out.probe_value("cpus_mp").as_deref(),
                Some("1 nomptable"),
                "{ctx}"
            );
            assert_eq!(
                out.probe_value("acpi").as_deref(),
                Some("rsdp=0xe0000 dsdt=0xe0040"),
                "the RSDP where the zero page says, the DSDT after it\n{ctx}"
            );
            assert!(
                out.probe_lines()
                    .contains(&"PROBE e820 0xe0000 0x20000 2".to_string()),
                "the tables' range is reserved in the e820 map\n{ctx}"
            );
        }
        Discovery::Legacy => {
            assert_eq!(out.probe_value("cpus_mp"), Some(vcpus.to_string()), "{ctx}");
            assert_eq!(out.probe_value("acpi").as_deref(), Some("none"), "{ctx}");
        }
    }
    assert_eq!(out.probe_value("cpus_up"), Some(vcpus.to_string()), "{ctx}");
    let ram = probe_ram(&out);
    assert_eq!(ram, expected_low_e820(memory_mib), "{ctx}");
    let total_kib: u64 = ram.iter().map(|r| r.1 / 1024).sum();
    assert_eq!(
        out.probe_value("mem_kib"),
        Some(total_kib.to_string()),
        "{ctx}"
    );
    let top_page = (memory_mib << 20) - 4096;
    assert_eq!(
        out.probe_value("mem_check"),
        Some(format!("ok {top_page:#x}")),
        "the probe wrote and read back the last page of RAM\n{ctx}"
    );
    assert!(
        out.probe_lines().contains(&"PROBE done".to_string()),
        "{ctx}"
    );
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    assert!(
        out.stderr.contains("berth-vmm: guest requested reset"),
        "{ctx}"
    );
}

#[test]
fn probe_1_vcpu_64_mib() {
    boot_probe(1, 64);
}

#[test]
fn probe_2_vcpus_64_mib() {
    boot_probe(2, 64);
}

#[test]
fn probe_4_vcpus_64_mib() {
    boot_probe(4, 64);
}

#[test]
fn probe_2_vcpus_legacy_mp_table() {
    boot_probe_with(2, 64, Discovery::Legacy);
}

#[test]
fn probe_4_vcpus_legacy_mp_table() {
    boot_probe_with(4, 64, Discovery::Legacy);
}

/// The guest powers off the way Linux does on hardware-reduced ACPI (the
/// FADT's sleep control register, the DSDT's S5 type): the VMM ends with
/// status 0 and says so; with legacy discovery there is no such register.
#[test]
fn acpi_poweroff_ends_the_vmm_cleanly() {
    report_mode("acpi_poweroff_ends_the_vmm_cleanly");
    let out = run(
        probe_command(2, 64, "probe.mode=poweroff", Discovery::Acpi),
        TIMEOUT,
    );
    let ctx = out.describe();
    assert_eq!(
        out.probe_value("poweroff").as_deref(),
        Some("port=0x600 slp_typ=5"),
        "{ctx}"
    );
    assert!(
        !out.stdout.contains("PROBE done"),
        "the write ended the guest\n{ctx}"
    );
    assert!(out.stderr.contains("berth-vmm: guest powered off"), "{ctx}");
    assert_eq!(out.status.code(), Some(0), "{ctx}");

    let out = run(
        probe_command(1, 64, "probe.mode=poweroff", Discovery::Legacy),
        TIMEOUT,
    );
    let ctx = out.describe();
    assert_eq!(
        out.probe_value("poweroff").as_deref(),
        Some("error=no_acpi_sleep_register"),
        "{ctx}"
    );
}

/// `reboot` through the FADT's reset register, without the i8042.
#[test]
fn acpi_reset_register_resets() {
    report_mode("acpi_reset_register_resets");
    let out = run(
        probe_command(1, 64, "probe.mode=acpi_reset", Discovery::Acpi),
        TIMEOUT,
    );
    let ctx = out.describe();
    assert_eq!(
        out.probe_value("acpi_reset").as_deref(),
        Some("port=0x600 value=1"),
        "{ctx}"
    );
    assert!(
        !out.stdout.contains("PROBE done"),
        "the write ended the guest\n{ctx}"
    );
    assert!(
        out.stderr.contains("berth-vmm: guest requested reset"),
        "{ctx}"
    );
    assert_eq!(out.status.code(), Some(0), "{ctx}");
}

#[test]
fn probe_1_vcpu_1_gib() {
    boot_probe(1, 1024);
}

#[test]
fn probe_4_vcpus_1_gib() {
    boot_probe(4, 1024);
}

#[test]
fn cmdline_arrives_intact() {
    report_mode("cmdline_arrives_intact");
    let cmdline = "probe.mode=boot root=/dev/vda1 quoted=\"two words\" punct=a,b;c:d!e@f#%^&*()[]{}<>?/~|+- x";
    let out = run(vmm_command(&probe_elf(), 1, 64, cmdline), TIMEOUT);
    assert_eq!(
        out.probe_value("cmdline").as_deref(),
        Some(cmdline),
        "{}",
        out.describe()
    );
}

#[test]
fn console_log_file_holds_the_console() {
    report_mode("console_log_file_holds_the_console");
    let dir = scratch_dir("console-log");
    let log = dir.join("console.log");
    let mut cmd = vmm_command(&probe_elf(), 1, 64, "probe.mode=boot");
    cmd.arg("--console-log").arg(&log);
    let out = run(cmd, TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        logged, out.stdout,
        "the log and stdout carry the same bytes"
    );
    assert!(logged.contains("PROBE done"));
}

#[test]
fn serial_input_is_echoed() {
    report_mode("serial_input_is_echoed");
    let mut cmd = vmm_command(&probe_elf(), 1, 64, "probe.mode=echo");
    cmd.arg("--console-in").arg("stdin");
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE echo ready", TIMEOUT);
    // More than the 64-byte receive FIFO, so the VMM must wait for the guest.
    let text: String = (0..8)
        .map(|i| format!("line {i} of the echo test\n"))
        .collect();
    let input = format!("{text}quit\n");
    vm.write_stdin(input.as_bytes());
    let out = vm.wait(TIMEOUT);
    let ctx = out.describe();
    let after_ready = out
        .stdout
        .split("PROBE echo ready")
        .nth(1)
        .unwrap_or_default();
    assert!(
        after_ready.replace("\r\n", "\n").contains(&text),
        "every input byte came back, in order\n{ctx}"
    );
    assert!(
        out.probe_lines()
            .contains(&format!("PROBE echo done bytes={}", input.len())),
        "{ctx}"
    );
    assert_eq!(out.status.code(), Some(0), "{ctx}");
}

#[test]
fn sigterm_stops_the_guest_cleanly() {
    report_mode("sigterm_stops_the_guest_cleanly");
    let mut cmd = vmm_command(&probe_elf(), 2, 64, "probe.mode=echo");
    cmd.arg("--console-in").arg("stdin");
    let mut vm = Running::spawn(cmd);
    vm.wait_for_output("PROBE echo ready", TIMEOUT);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &vm.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = vm.wait(Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert!(
        out.stderr.contains("stopped by signal 15"),
        "{}",
        out.describe()
    );
    assert!(!out.stdout.contains("PROBE done"), "{}", out.describe());
}

#[test]
fn guest_triple_fault_is_reported_with_vcpu_and_rip() {
    report_mode("guest_triple_fault_is_reported_with_vcpu_and_rip");
    let out = run(
        vmm_command(&probe_elf(), 2, 64, "probe.mode=triple_fault"),
        TIMEOUT,
    );
    let ctx = out.describe();
    assert!(out.stdout.contains("PROBE triple_fault now"), "{ctx}");
    assert_eq!(out.status.code(), Some(2), "{ctx}");
    let report = out
        .stderr
        .lines()
        .find(|l| l.contains("triple fault (KVM_EXIT_SHUTDOWN)"))
        .unwrap_or_else(|| panic!("no triple-fault report\n{ctx}"));
    assert!(report.starts_with("berth-vmm: vCPU 0 stopped:"), "{ctx}");
    let rip = parse_hex(report.rsplit("at RIP ").next().unwrap());
    // The probe is linked at 1 MiB; the fault is in its code.
    assert!((0x10_0000..0x20_0000).contains(&rip), "RIP {rip:#x}\n{ctx}");
}
