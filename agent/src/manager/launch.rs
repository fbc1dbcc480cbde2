//! The launcher: one way to bring up a VMM for a VM (boot, restore,
//! reboot, restart and, through `spawn_recorded`, incoming migration):
//! cgroup → confinement → spawn with its pid recorded before it may run →
//! control socket answering → bridges, with one cleanup path when any step
//! fails.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::vmm_process::config::VmConfig;

use super::error::{ApiError, ApiResult};
use super::registry::{lock, now_ms, VmEntry};
use super::{Manager, KILL_WAIT, START_TIMEOUT};
use crate::spec::VmSpec;
use crate::store::VmState;
use crate::vmm_proc::{Confinement, Launch, RestoreFrom, VmmProcess};

impl Manager {
    /// Spawns a VMM and records its pid and start time before it may run
    /// (the start gate): an agent killed at any later point finds this VMM
    /// at its next start instead of losing it. On an error no VMM runs:
    /// one that was spawned has been ended.
    pub(super) async fn spawn_recorded(
        &self,
        entry: &VmEntry,
        config: &VmConfig,
        cgroup_dirs: &[PathBuf],
        how: Launch<'_>,
        confinement: &Confinement<'_>,
    ) -> ApiResult<Box<dyn VmmProcess>> {
        // The VMM would refuse to start beside another (the run lock); say
        // so before spawning it.
        self.no_vmm_runs(entry)?;
        let mut process = (self.vmms)
            .spawn(&entry.dir, config, cgroup_dirs, how, confinement)
            .map_err(|e| {
                let binary = self.config.vmm_binary();
                ApiError::Unavailable(format!("cannot start {}: {e}", binary.display()))
            })?;
        let recorded = {
            let mut inner = lock(&entry.inner);
            inner.record.pid = process.pid();
            inner.record.proc_start_ticks = process.start_ticks();
            self.registry.store.save_record(&entry.dir, &inner.record)
        };
        let gated = recorded.map_err(|e| e.to_string()).and_then(|()| {
            process
                .open_gate()
                .map_err(|e| format!("cannot let it start: {e}"))
        });
        if let Err(e) = gated {
            process.kill();
            let _ = process.wait_exit(&entry.dir, KILL_WAIT).await;
            let mut inner = lock(&entry.inner);
            inner.record.pid = 0;
            inner.record.proc_start_ticks = 0;
            return Err(ApiError::Internal(format!(
                "cannot record the VMM's pid ({e}); it was ended"
            )));
        }
        Ok(process)
    }

    /// Writes the VM's NoCloud seed, when its spec has a cloud-init part,
    /// before a VMM opens it: at every Start, so it says what the spec
    /// says now.
    pub(super) fn write_cloud_init_seed(&self, entry: &VmEntry, spec: &VmSpec) -> ApiResult<()> {
        let Some(c) = &spec.cloud_init else {
            return Ok(());
        };
        let macs: Vec<String> = (0..spec.nics.len()).map(|i| spec.nic_mac(i)).collect();
        let hostname = if c.hostname.is_empty() {
            spec.display_name()
        } else {
            &c.hostname
        };
        let seed = crate::cloud_init::seed::Seed {
            instance_id: &spec.id,
            hostname,
            cloud_init: c,
            nic_macs: &macs,
        };
        let path = entry.dir.cloud_init_seed();
        seed.write(&path).map_err(|e| {
            let message = format!("cannot write the cloud-init seed {}: {e}", path.display());
            if e.raw_os_error() == Some(nix::libc::ENOSPC) {
                ApiError::ResourceExhausted(message)
            } else {
                ApiError::Internal(message)
            }
        })
    }

    /// Spawns the VMM (booting, or restoring from a snapshot) and waits until its control socket answers.
    pub(super) async fn launch_from(
        &self,
        entry: &Arc<VmEntry>,
        why: &str,
        restore: Option<RestoreFrom<'_>>,
    ) -> ApiResult<()> {
        let (mut config, spec) = {
            let mut inner = lock(&entry.inner);
            if inner.record.state != VmState::Starting {
                (self.registry).transition(entry, &mut inner, VmState::Starting, why)?;
            }
            (
                inner.spec.vmm_config(
                    &entry.dir.console_log(),
                    self.config.console_log_max_bytes,
                    &entry.dir.cloud_init_seed(),
                ),
                inner.spec.clone(),
            )
        };
        if let Err(e) = self.write_cloud_init_seed(entry, &spec) {
            self.abort_launch(entry, None, e.to_string()).await?;
            return Err(e);
        }
        let cgroup_dirs = match self.cgroups.prepare(&spec) {
            Ok(dirs) => dirs,
            Err(e) => {
                self.abort_launch(entry, None, e.to_string()).await?;
                return Err(e);
            }
        };
        let taps = nic_taps(&spec, restore.as_ref().map_or(&[][..], |r| r.taps));
        let confinement = match self.confine(
            entry,
            &spec,
            &mut config,
            restore.as_ref().map(|r| r.snapshot),
            taps,
        ) {
            Ok(c) => c,
            Err(e) => {
                self.abort_launch(entry, None, e.to_string()).await?;
                return Err(e);
            }
        };
        let how = restore.map_or(Launch::Boot, Launch::Restore);
        let mut process = match self
            .spawn_recorded(entry, &config, &cgroup_dirs, how, &confinement)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                self.abort_launch(entry, None, e.message().to_string())
                    .await?;
                return Err(e);
            }
        };
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(exit) = process.exited(&entry.dir) {
                let message = format!("the VMM exited while starting: {}", exit.reason);
                self.abort_launch(entry, None, exit.reason).await?;
                return Err(ApiError::FailedPrecondition(message));
            }
            if self.vmm_answers(entry).await {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                let message =
                    "the VMM did not answer on its control socket in time; killed".to_string();
                self.abort_launch(entry, Some(process), message.clone())
                    .await?;
                return Err(ApiError::Unavailable(message));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The VMM made the taps; put each into its bridge, if it names one.
        if let Err(e) = attach_bridges(&spec) {
            let message = e.to_string();
            self.abort_launch(entry, Some(process), message.clone())
                .await?;
            return Err(ApiError::Unavailable(message));
        }
        // spawn_recorded has put the pid and start time in the record.
        let mut inner = lock(&entry.inner);
        inner.record.started_at_ms = now_ms();
        inner.process = Some(process);
        let state = match restore {
            Some(RestoreFrom { paused: true, .. }) => VmState::Paused,
            _ => VmState::Running,
        };
        self.registry.transition(entry, &mut inner, state, why)
    }

    /// The one way out of a launch that failed at any step: its VMM (if
    /// one was spawned) ended, its cgroup released, the VM Crashed with
    /// why. Nothing of the attempt is left behind.
    pub(super) async fn abort_launch(
        &self,
        entry: &VmEntry,
        process: Option<Box<dyn VmmProcess>>,
        why: String,
    ) -> ApiResult<()> {
        if let Some(mut process) = process {
            process.kill();
            let _ = process.wait_exit(&entry.dir, KILL_WAIT).await;
        }
        let mut inner = lock(&entry.inner);
        self.release_cgroup(&inner.spec.id);
        inner.record.pid = 0;
        inner.record.proc_start_ticks = 0;
        inner.record.last_exit = why.clone();
        (self.registry).transition(entry, &mut inner, VmState::Crashed, &why)
    }
}

/// Why a tap could not join its bridge.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("cannot run ip (iproute2): {0}")]
    NoIp(#[source] std::io::Error),
    #[error("cannot attach tap {tap} to bridge {bridge}: {stderr}")]
    Refused {
        tap: String,
        bridge: String,
        stderr: String,
    },
}

/// `ip link set <tap> master <bridge> up` for every NIC that names a
/// bridge. Building the bridge is the controller's business.
pub(super) fn attach_bridges(spec: &VmSpec) -> Result<(), BridgeError> {
    for nic in spec.nics.iter().filter(|n| !n.bridge.is_empty()) {
        let out = std::process::Command::new("ip")
            .args(["link", "set", &nic.tap, "master", &nic.bridge, "up"])
            .output()
            .map_err(BridgeError::NoIp)?;
        if !out.status.success() {
            return Err(BridgeError::Refused {
                tap: nic.tap.clone(),
                bridge: nic.bridge.clone(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
    }
    Ok(())
}

/// The taps a VMM attaches: the spec's with a restore's or migration's
/// renames applied (the spec may carry them already), each once.
pub(super) fn nic_taps(spec: &VmSpec, renames: &[(String, String)]) -> Vec<String> {
    let mut taps: Vec<String> = spec.nics.iter().map(|n| n.tap.clone()).collect();
    for (old, new) in renames {
        for tap in taps.iter_mut().filter(|t| *t == old) {
            tap.clone_from(new);
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    taps.retain(|t| seen.insert(t.clone()));
    taps
}
