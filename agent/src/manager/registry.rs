//! The registry: every VM of this node, its document and record, and the
//! event stream. The only place a VM's state changes, and every change is
//! on disk before it is announced.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::broadcast;

use super::error::{ApiError, ApiResult};
use super::rules::{self, Operation};
use crate::config::JailSettings;
use crate::spec::VmSpec;
use crate::store::{Store, VmDir, VmRecord, VmState};
use crate::vmm_proc::VmmProcess;

pub fn now_ms() -> u64 {
    berth_proto::vmm_process::now_ms()
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What kind of happening an event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    State,
    Deleted,
    Snapshot,
    Hibernated,
    Migration,
    Drained,
    Undrained,
}

impl EventKind {
    /// The word Watch sends.
    pub fn word(self) -> &'static str {
        match self {
            EventKind::State => "state",
            EventKind::Deleted => "deleted",
            EventKind::Snapshot => "snapshot",
            EventKind::Hibernated => "hibernated",
            EventKind::Migration => "migration",
            EventKind::Drained => "drained",
            EventKind::Undrained => "undrained",
        }
    }
}

/// A state change or other happening, as Watch streams it.
#[derive(Clone, Debug)]
pub struct Event {
    pub at_ms: u64,
    pub vm_id: String,
    pub kind: EventKind,
    pub state: VmState,
    pub message: String,
}

/// A VM as callers see it.
#[derive(Clone, Debug)]
pub struct VmView {
    pub spec: VmSpec,
    pub record: VmRecord,
    pub console_log: String,
}

pub(super) struct VmInner {
    pub spec: VmSpec,
    pub record: VmRecord,
    pub process: Option<Box<dyn VmmProcess>>,
}

pub struct VmEntry {
    /// Held for a whole operation, so requests on one VM run one at a time.
    pub(super) op: tokio::sync::Mutex<()>,
    pub(super) inner: Mutex<VmInner>,
    pub(super) dir: VmDir,
}

impl VmEntry {
    pub(super) fn new(
        spec: VmSpec,
        record: VmRecord,
        process: Option<Box<dyn VmmProcess>>,
        dir: VmDir,
    ) -> Arc<VmEntry> {
        Arc::new(VmEntry {
            op: tokio::sync::Mutex::new(()),
            inner: Mutex::new(VmInner {
                spec,
                record,
                process,
            }),
            dir,
        })
    }

    pub(super) fn view(&self) -> VmView {
        let inner = lock(&self.inner);
        VmView {
            spec: inner.spec.clone(),
            record: inner.record.clone(),
            console_log: self.dir.console_log().display().to_string(),
        }
    }

    pub(super) fn state(&self) -> VmState {
        lock(&self.inner).record.state
    }

    /// FAILED_PRECONDITION unless the rules let `op` run in the VM's state.
    pub(super) fn allows(&self, op: Operation) -> ApiResult<()> {
        let inner = lock(&self.inner);
        allows(&inner, op)
    }
}

pub(super) fn allows(inner: &VmInner, op: Operation) -> ApiResult<()> {
    rules::check(op, inner.record.state).map_err(|hint| {
        ApiError::FailedPrecondition(format!(
            "VM {} is {}; {hint}",
            inner.spec.id,
            inner.record.state.name()
        ))
    })
}

/// vCPUs and MiB of the VMs with a VMM, and of all VMs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allocation {
    pub running_vcpus: u32,
    pub running_memory_mib: u64,
    pub defined_vcpus: u32,
    pub defined_memory_mib: u64,
}

pub struct Registry {
    pub(super) store: Store,
    vms: RwLock<BTreeMap<String, Arc<VmEntry>>>,
    events: broadcast::Sender<Event>,
}

impl Registry {
    pub(super) fn new(store: Store) -> Registry {
        let (events, _) = broadcast::channel(1024);
        Registry {
            store,
            vms: RwLock::new(BTreeMap::new()),
            events,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub(super) fn emit(&self, vm_id: &str, kind: EventKind, state: VmState, message: &str) {
        let _ = self.events.send(Event {
            at_ms: now_ms(),
            vm_id: vm_id.to_string(),
            kind,
            state,
            message: message.to_string(),
        });
    }

    /// Persists the new state, then announces it. When the write fails
    /// (a full disk), memory keeps the VMM's truth so the next command can
    /// act: an intent (Starting, Stopping) that was not recorded did not
    /// begin, so the VM stays where it was; any other state reports what
    /// already happened to the VMM, so memory holds it and the next
    /// successful write records it.
    pub(super) fn transition(
        &self,
        entry: &VmEntry,
        inner: &mut VmInner,
        state: VmState,
        message: &str,
    ) -> ApiResult<()> {
        let before = (inner.record.state, inner.record.state_changed_ms);
        inner.record.state = state;
        inner.record.state_changed_ms = now_ms();
        if let Err(e) = self.store.save_record(&entry.dir, &inner.record) {
            let intent = matches!(state, VmState::Starting | VmState::Stopping);
            if intent {
                (inner.record.state, inner.record.state_changed_ms) = before;
            }
            let kept = inner.record.state.name();
            tracing::error!(
                vm = %inner.spec.id,
                "cannot record {} ({message}): {e}; the VM is {kept}",
                state.name()
            );
            return Err(ApiError::Internal(format!(
                "cannot record VM {} as {}: {e}; it is {kept}, retry once the state root can be written",
                inner.spec.id,
                state.name()
            )));
        }
        tracing::info!(vm = %inner.spec.id, "{} ({message})", state.name());
        self.emit(&inner.spec.id, EventKind::State, state, message);
        Ok(())
    }

    /// Writes the record as it is in memory (no state change).
    pub(super) fn save(&self, entry: &VmEntry, inner: &VmInner) -> ApiResult<()> {
        self.store
            .save_record(&entry.dir, &inner.record)
            .map_err(|e| ApiError::Internal(e.to_string()))
    }

    pub(super) fn entry(&self, id: &str) -> ApiResult<Arc<VmEntry>> {
        self.vms
            .read()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no VM with id {id:?}")))
    }

    pub(super) fn entries(&self) -> Vec<Arc<VmEntry>> {
        self.vms.read().unwrap().values().cloned().collect()
    }

    /// Takes a loaded VM in.
    pub(super) fn insert(&self, entry: Arc<VmEntry>) {
        let id = lock(&entry.inner).spec.id.clone();
        self.vms.write().unwrap().insert(id, entry);
    }

    /// Defines a new VM: refused when its id or name is taken; its
    /// directory and documents are on disk before it is listed.
    pub(super) fn create(&self, spec: VmSpec) -> ApiResult<Arc<VmEntry>> {
        let mut vms = self.vms.write().unwrap();
        if vms.contains_key(&spec.id) {
            return Err(ApiError::AlreadyExists(format!(
                "a VM with id {:?} exists",
                spec.id
            )));
        }
        if let Some(other) = vms.values().find(|e| {
            let s = &lock(&e.inner).spec;
            !spec.name.is_empty() && s.display_name() == spec.name
        }) {
            return Err(ApiError::AlreadyExists(format!(
                "name {:?} is taken by VM {}",
                spec.name,
                lock(&other.inner).spec.id
            )));
        }
        let record = VmRecord {
            state: VmState::Defined,
            state_changed_ms: now_ms(),
            ..Default::default()
        };
        let dir = self
            .store
            .create(&spec, &record)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let id = spec.id.clone();
        let entry = VmEntry::new(spec, record, None, dir);
        vms.insert(id.clone(), entry.clone());
        drop(vms);
        self.emit(&id, EventKind::State, VmState::Defined, "created");
        Ok(entry)
    }

    /// Is `name` the name of a VM other than `id`?
    pub(super) fn name_taken(&self, name: &str, id: &str) -> bool {
        self.vms.read().unwrap().values().any(|e| {
            let s = &lock(&e.inner).spec;
            s.id != id && !name.is_empty() && s.display_name() == name
        })
    }

    /// Removes a VM and its directory.
    pub(super) fn remove(&self, entry: &VmEntry, id: &str) -> ApiResult<()> {
        self.store
            .remove(&entry.dir)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        self.vms.write().unwrap().remove(id);
        self.emit(id, EventKind::Deleted, VmState::Stopped, "deleted");
        Ok(())
    }

    /// Drops a VM whose directory is already gone (or could not be
    /// removed, which the caller has logged).
    pub(super) fn forget(&self, id: &str, message: &str) {
        self.vms.write().unwrap().remove(id);
        self.emit(id, EventKind::Deleted, VmState::Stopped, message);
    }

    /// The VM's jail uid: the one it had, else the lowest free one.
    pub(super) fn claim_jail_uid(
        &self,
        entry: &Arc<VmEntry>,
        settings: &JailSettings,
    ) -> ApiResult<u32> {
        let current = lock(&entry.inner).record.jail_uid;
        if settings.owns_uid(current) {
            return Ok(current);
        }
        // The write lock: two VMs starting at once must not share a uid.
        let vms = self.vms.write().unwrap_or_else(|e| e.into_inner());
        let used: Vec<u32> = (vms.values())
            .filter(|e| !Arc::ptr_eq(e, entry))
            .map(|e| lock(&e.inner).record.jail_uid)
            .collect();
        let uid = settings.free_uid(&used).ok_or_else(|| {
            ApiError::ResourceExhausted(format!(
                "every jail uid in {}..{} is taken: raise jail.uid_count",
                settings.first_uid,
                u64::from(settings.first_uid) + u64::from(settings.uid_count)
            ))
        })?;
        lock(&entry.inner).record.jail_uid = uid;
        Ok(uid)
    }

    pub(super) fn list(&self, labels: &BTreeMap<String, String>) -> Vec<VmView> {
        self.vms
            .read()
            .unwrap()
            .values()
            .map(|e| e.view())
            .filter(|v| {
                labels
                    .iter()
                    .all(|(k, val)| v.spec.labels.get(k) == Some(val))
            })
            .collect()
    }

    /// The ids of the VMs that have (or should have) a VMM.
    pub(super) fn with_vmm(&self) -> Vec<String> {
        self.vms
            .read()
            .unwrap()
            .iter()
            .filter(|(_, e)| lock(&e.inner).record.state.has_vmm())
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub(super) fn allocation(&self) -> Allocation {
        let vms = self.vms.read().unwrap();
        let mut a = Allocation::default();
        for e in vms.values() {
            let inner = lock(&e.inner);
            a.defined_vcpus += inner.spec.vcpus;
            a.defined_memory_mib += inner.spec.memory_mib;
            if inner.record.state.has_vmm() {
                a.running_vcpus += inner.spec.vcpus;
                a.running_memory_mib += inner.spec.memory_mib;
            }
        }
        a
    }
}
