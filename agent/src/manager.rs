//! The core: the VMs of this node and everything done to them, made of
//! rooms that own their state — the registry (VMs, records, events; the
//! only place a state changes), admission (capacity, drain), the VMs'
//! cgroups, accounting (samples, usage, reports) — and the work that spans
//! them: the lifecycle operations here, the launcher (`launch.rs`), the
//! supervisor (`supervisor.rs`), snapshots, migration and groups. Which
//! operation a VM accepts in which state is one table (`rules.rs`).
//!
//! Each VM has an operation lock, so requests on one VM run one at a time
//! (two racing Starts: one starts it, the other finds it Running). Every
//! state change is written to disk before it is announced or returned.
//! Every VMM is reached through the `Vmms` trait, so all of this is
//! unit-tested against a fake VMM (`manager/tests/`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use berth_proto::vmm_process::device::LimiterId;

use crate::config::AgentConfig;
use crate::spec::{Limits, RateLimit, VmSpec};
use crate::store::{Store, VmState};
use crate::vmm_proc::control::rate_limit_to_pb;
use crate::vmm_proc::{OsVmms, RestoreFrom, VmmControl, VmmExit, Vmms};

mod accounting;
mod admission;
mod confine;
mod error;
mod group;
mod images;
mod launch;
mod migration;
mod registry;
pub mod rules;
mod snapshots;
mod supervisor;
#[cfg(test)]
mod tests;
mod vm_cgroups;

pub use accounting::VmReport;
pub use admission::{host_cpus, CapacityNumbers};
pub use error::{ApiError, ApiResult};
pub use group::{GroupAction, GroupOutcome, MemberResult};
pub use images::image_error;
pub use migration::{MigrateParams, PreparedIn, DEFAULT_TOKEN_TTL};
pub use registry::{now_ms, Allocation, Event, EventKind, VmView};
pub use snapshots::{SnapshotKind, SnapshotProgress, SnapshotView};

use error::{internal, vmm_error};
use registry::{lock, Registry, VmEntry};
use rules::Operation;

const START_TIMEOUT: Duration = Duration::from_secs(15);
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
const KILL_WAIT: Duration = Duration::from_secs(3);

pub struct Manager {
    pub config: AgentConfig,
    pub images: crate::images::ImageStore,
    pub limits: Limits,
    pub quarantined: Vec<String>,
    registry: Registry,
    admission: admission::Admission,
    pub cgroups: vm_cgroups::VmCgroups,
    accounting: accounting::Accounting,
    vmms: Arc<dyn Vmms>,
}

impl Manager {
    /// Loads every stored VM and re-adopts the VMMs still running, which
    /// are this node's berth-vmm processes.
    pub async fn load(config: AgentConfig, limits: Limits) -> std::io::Result<Arc<Manager>> {
        let vmms = Arc::new(OsVmms {
            binary: config.vmm_binary(),
        });
        Self::load_with(config, limits, vmms).await
    }

    /// Loads every stored VM, reaching VMMs through `vmms`.
    pub async fn load_with(
        config: AgentConfig,
        limits: Limits,
        vmms: Arc<dyn Vmms>,
    ) -> std::io::Result<Arc<Manager>> {
        let store = Store::open(config.vms_dir(), config.quarantine_dir())?;
        let images = crate::images::ImageStore::open(config.image_store_dir())?;
        let (loaded, quarantined) = store.load_all();
        for q in &quarantined {
            tracing::error!("quarantined a VM whose state could not be read: {q}");
        }
        let manager = Arc::new(Manager {
            admission: admission::Admission::load(config.state_root.join("node.json")),
            cgroups: vm_cgroups::VmCgroups::detect(&config),
            registry: Registry::new(store),
            accounting: accounting::Accounting::default(),
            config,
            images,
            limits,
            quarantined,
            vmms,
        });
        for mut l in loaded {
            // Every VM is asked, not only those recorded as running: the
            // run lock finds a VMM whatever the record says.
            let process = (manager.vmms).adopt(&l.dir, l.record.pid, l.record.proc_start_ticks);
            if let Some(p) = &process {
                l.record.pid = p.pid();
                l.record.proc_start_ticks = p.start_ticks();
            }
            let entry = VmEntry::new(l.spec, l.record, process, l.dir);
            manager.reconcile_loaded(&entry).await;
            manager.registry.insert(entry.clone());
            if entry.state() == VmState::Migrating {
                manager.rewatch_migration(entry);
            }
        }
        manager.cgroups.remove_stale(&manager.registry.with_vmm());
        Ok(manager)
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.registry.subscribe()
    }

    /// A client of the VM's VMM; UNAVAILABLE when it cannot be reached.
    async fn vmm(&self, entry: &VmEntry) -> ApiResult<Box<dyn VmmControl>> {
        self.vmms
            .connect(&entry.dir)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))
    }

    /// Does the VM's VMM serve its control socket (and so is it up)?
    async fn vmm_answers(&self, entry: &VmEntry) -> bool {
        match self.vmms.connect(&entry.dir).await {
            Ok(client) => client.info(Duration::from_secs(1)).await.is_ok(),
            Err(_) => false,
        }
    }

    /// FAILED_PRECONDITION when a VMM holds the VM's run lock, UNAVAILABLE
    /// when that cannot be told: nothing that needs the VM without a VMM
    /// goes ahead on a guess.
    fn no_vmm_runs(&self, entry: &VmEntry) -> ApiResult<()> {
        let id = lock(&entry.inner).spec.id.clone();
        match self.vmms.holder(&entry.dir) {
            Ok(None) => Ok(()),
            Ok(Some(pid)) => Err(ApiError::FailedPrecondition(format!(
                "a berth-vmm (pid {pid}) still runs VM {id}: it holds {}",
                entry.dir.run_lock().display()
            ))),
            Err(e) => Err(ApiError::Unavailable(format!(
                "cannot tell whether a VMM of VM {id} runs ({e})"
            ))),
        }
    }

    /// Its cgroup and samples go with a VMM that ended.
    fn release_cgroup(&self, id: &str) {
        self.cgroups.release(id);
        self.accounting.forget_samples(id);
    }

    pub fn validate(&self, spec: &VmSpec) -> ApiResult<()> {
        spec.validate(&self.config, &self.limits)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        self.check_images(spec)
    }

    pub async fn create(&self, spec: VmSpec) -> ApiResult<VmView> {
        self.validate(&spec)?;
        let _admission = self.admission.hold().await;
        if self.config.reserve_on_define {
            self.capacity().check_fits(&spec)?;
        }
        Ok(self.registry.create(spec)?.view())
    }

    pub fn get(&self, id: &str) -> ApiResult<VmView> {
        Ok(self.registry.entry(id)?.view())
    }

    pub fn list(&self, labels: &BTreeMap<String, String>) -> Vec<VmView> {
        self.registry.list(labels)
    }

    /// vCPUs and MiB of running VMs and of all VMs.
    pub fn allocation(&self) -> Allocation {
        self.registry.allocation()
    }

    pub async fn update(&self, spec: VmSpec) -> ApiResult<VmView> {
        let entry = self.registry.entry(&spec.id)?;
        let _op = entry.op.lock().await;
        self.validate(&spec)?;
        if self.registry.name_taken(&spec.name, &spec.id) {
            return Err(ApiError::AlreadyExists(format!(
                "name {:?} is taken",
                spec.name
            )));
        }
        let (live, old) = {
            let inner = lock(&entry.inner);
            (inner.record.state.has_vmm(), inner.spec.clone())
        };
        if live {
            // Live: only the shares and the I/O limits may change.
            let mut same = spec.with_limits_of(&old);
            same.cpu = old.cpu.clone();
            same.memory = old.memory.clone();
            if same != old {
                entry.allows(Operation::Redefine)?;
            }
        }
        // The document first: a change that cannot be recorded is not made.
        (self.registry.store)
            .save_spec(&entry.dir, &spec)
            .map_err(internal)?;
        if live {
            // Then at once to the running VM; if it does not take them,
            // the document goes back to what the VM still runs with.
            if let Err(e) = self.apply_live(&entry, &spec, &old).await {
                if let Err(back) = self.registry.store.save_spec(&entry.dir, &old) {
                    tracing::error!(vm = %old.id, "cannot put the spec back after a failed update: {back}");
                }
                let _ = self.cgroups.apply(&old);
                return Err(e);
            }
        }
        lock(&entry.inner).spec = spec;
        Ok(entry.view())
    }

    /// Applies a spec's shares and changed I/O limits to the running VM.
    async fn apply_live(&self, entry: &VmEntry, spec: &VmSpec, old: &VmSpec) -> ApiResult<()> {
        self.cgroups.apply(spec)?;
        let changed: Vec<_> = (spec.rate_limits().into_iter())
            .zip(old.rate_limits())
            .filter(|(new, old)| new.1 != old.1)
            .map(|(new, _)| new)
            .collect();
        self.push_rate_limits(entry, changed).await
    }

    pub async fn delete(&self, id: &str) -> ApiResult<()> {
        let entry = self.registry.entry(id)?;
        let _op = entry.op.lock().await;
        entry.allows(Operation::Delete)?;
        // Whatever the record says: never remove the directory of a VM
        // whose VMM lives.
        self.no_vmm_runs(&entry)?;
        self.registry.remove(&entry, id)?;
        self.accounting.forget(id);
        Ok(())
    }

    pub async fn start(&self, id: &str) -> ApiResult<VmView> {
        let entry = self.registry.entry(id)?;
        let _op = entry.op.lock().await;
        {
            let inner = lock(&entry.inner);
            registry::allows(&inner, Operation::Start)?;
            // Paths are checked again now: files may have moved since Create.
            self.validate(&inner.spec)?;
        }
        self.admit(&entry, "started", |_| {}).await?;
        let hibernated = lock(&entry.inner).record.hibernated.clone();
        match hibernated {
            Some(name) => self.wake(&entry, &name).await?,
            None => self.launch_from(&entry, "started", None).await?,
        }
        Ok(entry.view())
    }

    /// Starts a hibernated VM from its snapshot, with its spec's I/O limits.
    async fn wake(&self, entry: &Arc<VmEntry>, name: &str) -> ApiResult<()> {
        let path = entry.dir.snapshots().join(name);
        self.launch_from(
            entry,
            &format!("woke from snapshot {name}"),
            Some(RestoreFrom {
                snapshot: &path,
                paused: false,
                taps: &[],
            }),
        )
        .await?;
        {
            let mut inner = lock(&entry.inner);
            inner.record.hibernated = None;
            self.registry.save(entry, &inner)?;
        }
        // The snapshot holds the limits in force when it was taken; an
        // Update while the VM slept changed the spec since.
        let (id, limits) = {
            let inner = lock(&entry.inner);
            (inner.spec.id.clone(), inner.spec.rate_limits())
        };
        self.push_rate_limits(entry, limits).await.map_err(|e| {
            ApiError::Unavailable(format!(
                "VM {id} woke from snapshot {name} but runs with the snapshot's I/O limits, not its spec's: {e}"
            ))
        })
    }

    /// Sets these I/O limits in the VM's running VMM.
    async fn push_rate_limits(
        &self,
        entry: &VmEntry,
        limits: impl IntoIterator<Item = (LimiterId, RateLimit)>,
    ) -> ApiResult<()> {
        for (id, limit) in limits {
            let req = berth_proto::vmm::SetRateLimitRequest {
                device: id.device.to_string(),
                direction: id.direction.word().into(),
                limit: protobuf::MessageField::some(rate_limit_to_pb(limit)),
                ..Default::default()
            };
            (self.vmm(entry).await?)
                .set_rate_limit(&req, Duration::from_secs(5))
                .await
                .map_err(vmm_error)?;
        }
        Ok(())
    }

    pub async fn pause(&self, id: &str) -> ApiResult<VmView> {
        self.pause_or_resume(id, true).await
    }

    pub async fn resume(&self, id: &str) -> ApiResult<VmView> {
        self.pause_or_resume(id, false).await
    }

    /// Running → Paused, or Paused → Running, through the VMM.
    async fn pause_or_resume(&self, id: &str, pause: bool) -> ApiResult<VmView> {
        let (op, to, why) = if pause {
            (Operation::Pause, VmState::Paused, "paused")
        } else {
            (Operation::Resume, VmState::Running, "resumed")
        };
        let entry = self.registry.entry(id)?;
        let _op = entry.op.lock().await;
        entry.allows(op)?;
        let vmm = self.vmm(&entry).await?;
        let timeout = Duration::from_secs(10);
        if pause {
            vmm.pause(timeout).await
        } else {
            vmm.resume(timeout).await
        }
        .map_err(vmm_error)?;
        let mut inner = lock(&entry.inner);
        self.registry.transition(&entry, &mut inner, to, why)?;
        drop(inner);
        Ok(entry.view())
    }

    pub async fn stop(
        &self,
        id: &str,
        force: bool,
        timeout: Option<Duration>,
    ) -> ApiResult<VmView> {
        let entry = self.registry.entry(id)?;
        let _op = entry.op.lock().await;
        self.stop_locked(&entry, force, timeout.unwrap_or(DEFAULT_STOP_TIMEOUT))
            .await?;
        Ok(entry.view())
    }

    /// Graceful (Ctrl-Alt-Del, then wait), then the VMM's own Stop, then
    /// SIGKILL. The caller holds the operation lock.
    async fn stop_locked(
        &self,
        entry: &Arc<VmEntry>,
        force: bool,
        timeout: Duration,
    ) -> ApiResult<()> {
        let was = {
            let mut inner = lock(&entry.inner);
            registry::allows(&inner, Operation::Stop)?;
            let state = inner.record.state;
            let why = if force { "forced stop" } else { "stop" };
            (self.registry).transition(entry, &mut inner, VmState::Stopping, why)?;
            state
        };
        let Some(mut process) = lock(&entry.inner).process.take() else {
            return Err(ApiError::Internal("no VMM process recorded".into()));
        };
        let mut exit = None;
        if !force {
            let ask = Duration::from_secs(5);
            if let Ok(vmm) = self.vmm(entry).await {
                if was == VmState::Paused {
                    let _ = vmm.resume(ask).await;
                }
                if vmm.shutdown(ask).await.is_ok() {
                    exit = process.wait_exit(&entry.dir, timeout).await;
                }
            }
        }
        if exit.is_none() {
            if let Ok(vmm) = self.vmm(entry).await {
                let _ = vmm.stop(Duration::from_secs(2)).await;
            }
            exit = process.wait_exit(&entry.dir, KILL_WAIT).await;
        }
        let exit = match exit {
            Some(e) => e,
            None => {
                process.kill();
                process
                    .wait_exit(&entry.dir, KILL_WAIT)
                    .await
                    .unwrap_or(VmmExit::other(None, "VMM killed"))
            }
        };
        let mut inner = lock(&entry.inner);
        self.release_cgroup(&inner.spec.id);
        inner.record.pid = 0;
        inner.record.last_exit = exit.reason.clone();
        (self.registry).transition(entry, &mut inner, VmState::Stopped, &exit.reason)
    }

    pub async fn reboot(&self, id: &str) -> ApiResult<VmView> {
        let entry = self.registry.entry(id)?;
        let _op = entry.op.lock().await;
        entry.allows(Operation::Reboot)?;
        self.stop_locked(&entry, true, DEFAULT_STOP_TIMEOUT).await?;
        self.launch_from(&entry, "rebooted", None).await?;
        Ok(entry.view())
    }

    /// Forwards console input to the VMM.
    pub async fn console_write(&self, id: &str, data: Vec<u8>) -> ApiResult<()> {
        let entry = self.registry.entry(id)?;
        entry.allows(Operation::ConsoleInput)?;
        let msg = berth_proto::vmm::ConsoleInput {
            data,
            ..Default::default()
        };
        (self.vmm(&entry).await?)
            .console_write(&msg, Duration::from_secs(5))
            .await
            .map_err(vmm_error)
    }

    pub fn console_log_path(&self, id: &str) -> ApiResult<std::path::PathBuf> {
        Ok(self.registry.entry(id)?.dir.console_log())
    }
}
