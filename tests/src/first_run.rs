//! What a VMM itself costs before its guest runs, independent of how fast
//! the (possibly software) KVM runs guest code: the time from the VMM's
//! execve to its first `KVM_RUN`, read from `strace -f -ttt` timestamps.
//! `ci/bench.sh boot` measures berth-vmm and QEMU this way alike.

use std::path::Path;
use std::process::Command;

/// `cmd` run under strace, tracing only execve and ioctl (seccomp-bpf
/// keeps every other system call at full speed), the trace in `trace`.
pub fn traced(cmd: &Command, trace: &Path) -> Command {
    let mut traced = Command::new("strace");
    traced
        .args(["-f", "-ttt", "-qq", "--seccomp-bpf"])
        .args(["-e", "trace=execve,ioctl", "-o"])
        .arg(trace)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    traced
}

/// Seconds from the first execve to the first KVM_RUN in an
/// `strace -f -ttt` trace (lines `PID SECONDS.MICROS call(...)`); None if
/// either is missing.
pub fn exec_to_first_run(trace: &str) -> Option<f64> {
    let mut exec = None;
    for line in trace.lines() {
        // strace pads the pid column: "977   1.5 call(...)".
        let Some((_pid, rest)) = line.trim_start().split_once(' ') else {
            continue;
        };
        let Some((time, call)) = rest.trim_start().split_once(' ') else {
            continue;
        };
        let Ok(time) = time.parse::<f64>() else {
            continue;
        };
        if exec.is_none() && call.starts_with("execve(") {
            exec = Some(time);
        } else if call.starts_with("ioctl(") && call.contains("KVM_RUN") {
            return Some(time - exec?);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_span_runs_from_the_first_execve_to_the_first_kvm_run() {
        let trace = "\
4101 1764680000.100000 execve(\"/usr/bin/berth-vmm\", [...], 0x7ff /* 20 vars */) = 0
4101 1764680000.101500 ioctl(3, KVM_CREATE_VM, 0) = 4
977   1764680000.112250 ioctl(9, KVM_RUN <unfinished ...>
4103 1764680000.113000 ioctl(10, KVM_RUN, 0) = 0
";
        let span = exec_to_first_run(trace).unwrap();
        assert!((span - 0.01225).abs() < 1e-6, "{span}");
        assert_eq!(exec_to_first_run("4101 1.0 execve(\"x\") = 0\n"), None);
        assert_eq!(
            exec_to_first_run("4101 2.0 ioctl(9, KVM_RUN, 0) = 0\n"),
            None
        );
    }
}
