//! `berth-bench <what>`: benchmarks against a peer measured in the same run
//! (QEMU's microvm machine booting the same probe). Run through
//! `ci/bench.sh`, which builds this and berth-vmm in release mode.
//!
//! boot: process start → first serial byte, start → the probe's done
//! marker, and peak RSS minus the guest RAM actually touched.

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
        let cmdline = format!("probe.mode={mode}");
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
    let (bmin, bmed, bmax) = stats(berth);
    let (qmin, qmed, qmax) = stats(qemu);
    let ratio = bmed / qmed;
    println!(
        "{what:<28} berth-vmm min/median/max {bmin:9.2}/{bmed:9.2}/{bmax:9.2} {unit}   \
         qemu {qmin:9.2}/{qmed:9.2}/{qmax:9.2} {unit}   ratio {ratio:.3}"
    );
    ratio
}

fn bench_boot() {
    let vmm = release_vmm();
    let probe = probe_elf();
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
        }
    }
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
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("boot") => bench_boot(),
        other => {
            eprintln!("usage: berth-bench boot   (got {other:?})");
            std::process::exit(2);
        }
    }
}
