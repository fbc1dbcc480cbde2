//! A real berth-vmm process: spawned detached (its own session, so an
//! agent restart or kill leaves it running), recognised later by pid and
//! start time, and asked how it ended through the exit record it writes.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use berth_proto::vmm_process::config::VmConfig;
use berth_proto::vmm_process::exit::{ExitRecord, SECCOMP_EXIT_STATUS};
use berth_proto::vmm_process::files::write_atomic;
use berth_proto::vmm_process::host::HostInfo;
use berth_proto::vmm_process::launch::VmmArgs;
use berth_proto::vmm_process::run_lock;

use super::{Confinement, Launch, RestoreFrom, VmmExit, VmmProcess};
use crate::store::VmDir;

/// The start time of process `pid` in clock ticks since boot: `Ok(None)`
/// when no such process is alive (a zombie counts as gone), an error when
/// /proc could not be read (no descriptor left, no permission), which says
/// nothing about the process and must never be taken for "gone".
pub fn proc_start_ticks(pid: i32) -> std::io::Result<Option<u64>> {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        Err(e) if e.raw_os_error() == Some(libc_esrch()) => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Ok(None);
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); starttime is field 22.
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return Ok(None);
    }
    Ok(fields.get(19).and_then(|t| t.parse().ok()))
}

/// A process that ended while its stat file was open reads as ESRCH.
fn libc_esrch() -> i32 {
    nix::errno::Errno::ESRCH as i32
}

/// Says that whether a VMM runs cannot be told now, once per ten seconds
/// at most: under descriptor exhaustion this is asked for every VMM ten
/// times a second.
fn cannot_tell(pid: i32, e: &std::io::Error) {
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    static QUIET: AtomicU64 = AtomicU64::new(0);
    let now = berth_proto::vmm_process::now_ms();
    let last = LAST_MS.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 10_000
        && LAST_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let quiet = QUIET.swap(0, Ordering::Relaxed);
        tracing::warn!(
            pid,
            "cannot tell whether the VMM runs ({e}); taking it as running \
             ({quiet} more such checks not logged)"
        );
    } else {
        QUIET.fetch_add(1, Ordering::Relaxed);
    }
}

/// Does the VM in `dir` still have its VMM? Its run lock says; a VMM from
/// before the lock (no lock file) is asked for by pid and start time.
/// `None` when neither can tell now.
fn still_runs(dir: &VmDir, pid: i32, start_ticks: u64) -> Option<bool> {
    let lock = dir.run_lock();
    match run_lock::holder(&lock) {
        Ok(Some(_)) => Some(true),
        Ok(None) if lock.exists() => Some(false),
        Ok(None) => same_process(pid, start_ticks),
        Err(e) => {
            cannot_tell(pid, &e);
            None
        }
    }
}

/// Is `pid` still the process that started at `start_ticks`? `None` when
/// /proc cannot tell now (it is asked again later).
fn same_process(pid: i32, start_ticks: u64) -> Option<bool> {
    match proc_start_ticks(pid) {
        Ok(ticks) => Some(ticks == Some(start_ticks)),
        Err(e) => {
            cannot_tell(pid, &e);
            None
        }
    }
}

pub struct OsVmmProcess {
    pub pid: i32,
    pub start_ticks: u64,
    /// Present when this agent started the VMM (so it must reap it).
    child: Option<Child>,
    /// The VMM waits on this pipe before it does anything (`--start-gate
    /// stdin`): the agent opens it once the pid is on disk, and a VMM
    /// whose agent died before that sees the pipe close and exits, so no
    /// VMM ever runs unrecorded.
    gate: Option<std::process::ChildStdin>,
}

fn tap_overrides(taps: &[(String, String)]) -> Vec<String> {
    taps.iter()
        .map(|(old, new)| VmmArgs::tap_override(old, new))
        .collect()
}

/// Why `berth-vmm --host-info` told us nothing.
#[derive(Debug, thiserror::Error)]
pub enum HostInfoError {
    #[error("cannot run {what}: {source}")]
    Run {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed ({status}): {stderr}")]
    Failed {
        what: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{what} printed something that is not host info: {source}")]
    Garbled {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

/// What the VMM binary says this host offers (`berth-vmm --host-info`).
pub fn host_info(binary: &Path) -> Result<HostInfo, HostInfoError> {
    let args = VmmArgs {
        host_info: true,
        ..VmmArgs::default()
    };
    let what = format!("{} --host-info", binary.display());
    let output = args
        .to_command(binary)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| HostInfoError::Run {
            what: what.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(HostInfoError::Failed {
            what,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    serde_json::from_slice(&output.stdout).map_err(|source| HostInfoError::Garbled { what, source })
}

impl OsVmmProcess {
    /// Starts berth-vmm for `config` in `dir`, detached: booting it, from a
    /// snapshot directory (paused or not, with tap renames), or waiting for
    /// a migration.
    pub fn spawn(
        binary: &Path,
        dir: &VmDir,
        config: &VmConfig,
        cgroups: &[std::path::PathBuf],
        how: Launch<'_>,
        confinement: &Confinement<'_>,
    ) -> std::io::Result<OsVmmProcess> {
        std::fs::create_dir_all(dir.run())?;
        let json = serde_json::to_vec_pretty(config).expect("plain data serialises");
        write_atomic(&dir.vmm_config(), &json)?;
        for stale in [dir.exit_file(), dir.socket(), dir.migration_address()] {
            match std::fs::remove_file(&stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.vmm_log())?;
        let mut args = VmmArgs {
            no_seccomp: !confinement.settings.seccomp,
            cgroups: cgroups.to_vec(),
            api_socket: Some(dir.socket()),
            exit_file: Some(dir.exit_file()),
            detach: true,
            start_gate_stdin: true,
            run_lock: Some(dir.run_lock()),
            ..VmmArgs::default()
        };
        if let Some(plan) = &confinement.jail {
            plan.prepare(dir)?;
            plan.add_args(&mut args, dir, confinement.settings);
        }
        match how {
            // The snapshot carries the VM's config; only the console moves.
            Launch::Restore(RestoreFrom {
                snapshot,
                paused,
                taps,
            }) => {
                args.restore = Some(snapshot.to_owned());
                args.console_log = Some(dir.console_log());
                args.paused = paused;
                args.tap_overrides = tap_overrides(taps);
            }
            // The source sends the config; the console and taps are ours.
            Launch::Incoming(incoming) => {
                args.migrate_listen = Some(incoming.listen.to_string());
                args.migrate_expires_at_ms = Some(incoming.expires_at_ms);
                args.migrate_address_file = Some(dir.migration_address());
                args.console_log = Some(dir.console_log());
                args.migrate_token = Some(incoming.token.to_string());
                args.tap_overrides = tap_overrides(incoming.taps);
            }
            Launch::Boot => args.config = Some(dir.vmm_config()),
        }
        let mut child = args
            .to_command(binary)
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let pid = child.id() as i32;
        // Without its start time a restarted agent could not know this VMM
        // again: end it rather than run it unrecognisable.
        let start_ticks = match proc_start_ticks(pid) {
            Ok(Some(ticks)) => ticks,
            Ok(None) => 0, // it already ended: exited() will say how
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot read the new VMM's start time: {e}"),
                ));
            }
        };
        let gate = child.stdin.take();
        Ok(OsVmmProcess {
            pid,
            start_ticks,
            child: Some(child),
            gate,
        })
    }

    /// The VMM of the VM in `dir` that still runs: whoever holds its run
    /// lock, which is the recorded `pid` unless the record lost it. A VMM
    /// from before the run lock (no lock file) is recognised by pid and
    /// start time. When neither can tell now, the recorded VMM is taken as
    /// running: one taken for gone could be started a second time.
    pub fn adopt(dir: &VmDir, pid: i32, start_ticks: u64) -> Option<OsVmmProcess> {
        let lock = dir.run_lock();
        let (pid, start_ticks) = match run_lock::holder(&lock) {
            Ok(Some(holder)) if holder > 0 && holder != pid => {
                let ticks = proc_start_ticks(holder).ok().flatten().unwrap_or(0);
                tracing::warn!(
                    pid = holder,
                    recorded = pid,
                    "a VMM the record does not name holds {}: taking it on",
                    lock.display()
                );
                (holder, ticks)
            }
            Ok(Some(_)) => (pid, start_ticks),
            Ok(None) if lock.exists() => return None,
            Ok(None) => match same_process(pid, start_ticks) {
                Some(false) => return None,
                _ => (pid, start_ticks),
            },
            Err(e) => {
                tracing::warn!(
                    "cannot read {} ({e}); taking pid {pid} as running",
                    lock.display()
                );
                (pid, start_ticks)
            }
        };
        (pid > 0).then_some(OsVmmProcess {
            pid,
            start_ticks,
            child: None,
            gate: None,
        })
    }
}

impl VmmProcess for OsVmmProcess {
    fn pid(&self) -> i32 {
        self.pid
    }

    fn start_ticks(&self) -> u64 {
        self.start_ticks
    }

    /// Lets a VMM this agent spawned go on, once its pid is recorded.
    fn open_gate(&mut self) -> std::io::Result<()> {
        match self.gate.take() {
            Some(mut gate) => gate.write_all(b"g"),
            None => Ok(()),
        }
    }

    /// Has it ended? Reaps our own child; an adopted one is gone when its
    /// /proc entry no longer shows the same process. When neither can be
    /// asked now, it runs: the supervisor asks again next round.
    fn exited(&mut self, dir: &VmDir) -> Option<VmmExit> {
        let status = match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(status),
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(pid = self.pid, "cannot wait for the VMM ({e})");
                    match same_process(self.pid, self.start_ticks) {
                        Some(false) => None,
                        _ => return None,
                    }
                }
            },
            None => match still_runs(dir, self.pid, self.start_ticks) {
                Some(false) => None,
                _ => return None,
            },
        };
        Some(read_exit(dir, status))
    }

    /// Kills it outright.
    fn kill(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// How the VMM ended, from its exit record, else from its wait status.
pub fn read_exit(dir: &VmDir, status: Option<std::process::ExitStatus>) -> VmmExit {
    if let Some(record) = ExitRecord::read(&dir.exit_file()) {
        return VmmExit {
            code: Some(record.code),
            reason: record.reason,
            cause: record.cause,
        };
    }
    use std::os::unix::process::ExitStatusExt;
    let reason = match status {
        Some(s) if s.signal().is_some() => format!("VMM killed by signal {}", s.signal().unwrap()),
        // berth-vmm's SIGSYS handler exits 159 without an exit record.
        Some(s) if s.code() == Some(SECCOMP_EXIT_STATUS) => format!(
            "VMM stopped by its seccomp filter: a forbidden system call (named in {})",
            dir.vmm_log().display()
        ),
        Some(s) => format!(
            "VMM exited with status {} and no exit record",
            s.code().unwrap_or(-1)
        ),
        None => "VMM died without an exit record".to_string(),
    };
    VmmExit::other(None, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_process_has_its_start_time_and_a_missing_one_is_gone() {
        let me = std::process::id() as i32;
        let ticks = proc_start_ticks(me).unwrap().expect("this test runs");
        assert_eq!(same_process(me, ticks), Some(true));
        assert_eq!(same_process(me, ticks + 1), Some(false));
        // Above pid_max (at most 2^22): never a process.
        assert_eq!(proc_start_ticks(1 << 23).unwrap(), None);
        assert_eq!(same_process(1 << 23, ticks), Some(false));
    }
}
