//! A real berth-vmm process: spawned detached (its own session, so an
//! agent restart or kill leaves it running), recognised later by pid and
//! start time, and asked how it ended through the exit record it writes.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Stdio};

use berth_proto::vmm_process::config::VmConfig;
use berth_proto::vmm_process::exit::{ExitRecord, SECCOMP_EXIT_STATUS};
use berth_proto::vmm_process::files::write_atomic;
use berth_proto::vmm_process::host::HostInfo;
use berth_proto::vmm_process::launch::VmmArgs;

use super::{Confinement, Launch, RestoreFrom, VmmExit, VmmProcess};
use crate::store::VmDir;

/// The start time of process `pid` in clock ticks since boot, or None if no
/// such process is alive (a zombie counts as gone).
pub fn proc_start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); starttime is field 22.
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
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
        let start_ticks = proc_start_ticks(pid).unwrap_or(0);
        let gate = child.stdin.take();
        Ok(OsVmmProcess {
            pid,
            start_ticks,
            child: Some(child),
            gate,
        })
    }

    /// A VMM some earlier agent started, if it is still the same process.
    pub fn adopt(pid: i32, start_ticks: u64) -> Option<OsVmmProcess> {
        (pid > 0 && proc_start_ticks(pid) == Some(start_ticks)).then_some(OsVmmProcess {
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
    /// /proc entry no longer shows the same process.
    fn exited(&mut self, dir: &VmDir) -> Option<VmmExit> {
        let status = match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(status),
                Ok(None) => return None,
                Err(_) => None,
            },
            None => {
                if proc_start_ticks(self.pid) == Some(self.start_ticks) {
                    return None;
                }
                None
            }
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
    VmmExit { code: None, reason }
}
