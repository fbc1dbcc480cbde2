//! The supervisor: notices a VMM that ended on its own and applies the
//! VM's restart policy; after an agent restart, takes on the VMMs an
//! earlier agent left running (or records how they ended).

use std::sync::Arc;
use std::time::Duration;

use super::launch::attach_bridges;
use super::registry::{lock, now_ms, VmEntry};
use super::{Manager, KILL_WAIT, START_TIMEOUT};
use crate::spec::{OnReboot, RestartKind};
use crate::store::VmState;
use crate::vmm_proc::{ExitCause, RunState, VmmExit};

/// What the supervisor does once a VMM has ended on its own.
enum AfterExit {
    Stay,
    /// The guest rebooted: a new VMM, as a machine comes back from a reset.
    Reboot,
    /// The restart policy's restart, with its note.
    Restart(String),
}

const SUPERVISE_EVERY: Duration = Duration::from_millis(100);

impl Manager {
    /// Watches every running VMM; runs for the agent's life.
    pub async fn supervise(self: Arc<Self>) {
        loop {
            tokio::time::sleep(SUPERVISE_EVERY).await;
            self.check_exits().await;
        }
    }

    /// One round of the supervisor: every VMM that ended since the last.
    pub(super) async fn check_exits(&self) {
        self.cgroups.retry_removal(&self.registry.with_vmm());
        for entry in self.registry.entries() {
            // An operation in progress watches its VMM itself.
            let Ok(_op) = entry.op.try_lock() else {
                continue;
            };
            let exit = {
                let mut inner = lock(&entry.inner);
                match inner.process.as_mut() {
                    Some(p) => p.exited(&entry.dir),
                    None => None,
                }
            };
            if let Some(exit) = exit {
                self.on_exit(&entry, exit).await;
            }
        }
    }

    /// A VMM ended on its own: record why, then bring the machine back if
    /// its guest rebooted, or apply the restart policy.
    pub(super) async fn on_exit(&self, entry: &Arc<VmEntry>, exit: VmmExit) {
        let next = {
            let mut inner = lock(&entry.inner);
            inner.process = None;
            inner.record.pid = 0;
            inner.record.last_exit = exit.reason.clone();
            let state = if exit.clean() {
                VmState::Stopped
            } else {
                VmState::Crashed
            };
            let _ = self
                .registry
                .transition(entry, &mut inner, state, &exit.reason);
            let policy = &inner.spec.restart;
            let restarts = inner.record.restarts;
            if exit.cause == ExitCause::GuestReset && policy.on_reboot == OnReboot::Restart {
                AfterExit::Reboot
            } else {
                match policy.kind {
                    RestartKind::Always => {
                        AfterExit::Restart(format!("restart {} (always)", restarts + 1))
                    }
                    RestartKind::OnFailure if !exit.clean() && restarts < policy.max_retries => {
                        AfterExit::Restart(format!(
                            "restart {} of {}",
                            restarts + 1,
                            policy.max_retries
                        ))
                    }
                    _ => AfterExit::Stay,
                }
            }
        };
        let why = match next {
            AfterExit::Stay => return,
            // Not a restart under the policy: the guest asked for it.
            AfterExit::Reboot => "guest rebooted".to_string(),
            AfterExit::Restart(note) => {
                lock(&entry.inner).record.restarts += 1;
                note
            }
        };
        if let Err(e) = self.launch_from(entry, &why, None).await {
            tracing::error!("{why}: the new VMM did not start: {e}");
        }
    }

    /// After a restart: a VM recorded as running either still has its VMM
    /// (adopted: ask it whether it is paused) or is marked Crashed.
    pub(super) async fn reconcile_loaded(&self, entry: &Arc<VmEntry>) {
        let (state, adopted) = {
            let inner = lock(&entry.inner);
            (inner.record.state, inner.process.is_some())
        };
        // A migration's VMM is its watcher's business (rewatch_migration).
        if state == VmState::Migrating || !(state.has_vmm() || adopted) {
            return;
        }
        if adopted && state == VmState::Starting && !self.finish_interrupted_start(entry).await {
            return;
        }
        if adopted && state == VmState::Stopping {
            self.finish_interrupted_stop(entry).await;
            return;
        }
        if !adopted {
            let exit = self.vmms.read_exit(&entry.dir);
            let mut inner = lock(&entry.inner);
            tracing::warn!(vm = %inner.spec.id, "VMM gone while the agent was away: {}", exit.reason);
            inner.record.pid = 0;
            inner.record.last_exit = exit.reason.clone();
            let _ = self
                .registry
                .transition(entry, &mut inner, VmState::Crashed, &exit.reason);
            return;
        }
        let live = match self.vmms.connect(&entry.dir).await {
            Ok(client) => client.info(Duration::from_secs(2)).await.ok().map(|info| {
                match RunState::of(&info) {
                    RunState::Paused => VmState::Paused,
                    RunState::Running => VmState::Running,
                }
            }),
            Err(_) => None,
        };
        let mut inner = lock(&entry.inner);
        let pid = inner.record.pid;
        match live {
            Some(s) => {
                tracing::info!(vm = %inner.spec.id, pid, "re-adopted VMM ({})", s.name());
                if s != state {
                    let _ = self.registry.transition(entry, &mut inner, s, "re-adopted");
                }
            }
            None => {
                tracing::warn!(vm = %inner.spec.id, pid, "VMM alive but its control socket does not answer");
            }
        }
    }

    /// An agent died while it stopped this VM: the stop was asked for, so
    /// it is finished (the VMM may already be on its way out, and answer
    /// nothing), and the VM is Stopped, not left Stopping.
    async fn finish_interrupted_stop(&self, entry: &Arc<VmEntry>) {
        let process = lock(&entry.inner).process.take();
        let exit = match process {
            Some(mut p) => {
                p.kill();
                p.wait_exit(&entry.dir, KILL_WAIT).await
            }
            None => None,
        };
        let why = match exit {
            Some(e) if e.code.is_some() => e.reason,
            _ => "stopped: the agent restarted while stopping it".to_string(),
        };
        let mut inner = lock(&entry.inner);
        tracing::info!(vm = %inner.spec.id, "finishing a stop the last agent did not see end");
        self.release_cgroup(&inner.spec.id);
        inner.record.pid = 0;
        inner.record.proc_start_ticks = 0;
        inner.record.last_exit = why.clone();
        let _ = (self.registry).transition(entry, &mut inner, VmState::Stopped, &why);
    }

    /// An agent died while this VM's VMM was starting. A VMM that comes
    /// up within the start timeout is taken on (its taps joined to their
    /// bridges); one that does not is ended. Either way it is never lost.
    /// Returns whether the VMM runs on.
    async fn finish_interrupted_start(&self, entry: &VmEntry) -> bool {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let up = loop {
            if self.vmm_answers(entry).await {
                break true;
            }
            let gone = lock(&entry.inner)
                .process
                .as_mut()
                .and_then(|p| p.exited(&entry.dir));
            if gone.is_some() || tokio::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let spec = lock(&entry.inner).spec.clone();
        let failure = if up {
            attach_bridges(&spec).err().map(|e| e.to_string())
        } else {
            Some("the agent restarted while the VMM was starting, and it did not come up".into())
        };
        let Some(why) = failure else {
            tracing::info!(vm = %spec.id, "took on a VMM whose start the last agent did not see end");
            lock(&entry.inner).record.started_at_ms = now_ms();
            return true;
        };
        tracing::warn!(vm = %spec.id, "{why}; ending it");
        let process = lock(&entry.inner).process.take();
        let _ = self.abort_launch(entry, process, why).await;
        false
    }
}
