//! The VMs of this node and everything done to them. Each VM has an
//! operation lock, so requests on one VM run one at a time (two racing
//! Starts: one starts it, the other finds it Running). Every state change
//! is written to disk before it is announced or returned.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use berth_proto::common::Empty;
use tokio::sync::broadcast;

use crate::cgroups::{self, Layout};
use crate::config::AgentConfig;
use crate::entitlement::{self, Report, Sample};
use crate::spec::{Limits, RestartKind, VmSpec};
use crate::store::{Store, VmDir, VmRecord, VmState};
use crate::vmm_proc::{self, RestoreFrom, VmmExit, VmmProcess};

mod confine;
mod group;
mod images;
mod launch;
mod migration;
pub use group::{GroupAction, GroupOutcome, MemberResult};
pub use images::image_error;
pub use migration::{MigrateParams, PreparedIn, DEFAULT_TOKEN_TTL};

const START_TIMEOUT: Duration = Duration::from_secs(15);
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
const KILL_WAIT: Duration = Duration::from_secs(3);
const SUPERVISE_EVERY: Duration = Duration::from_millis(100);
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Usage records are saved every this many samples (nothing is lost in
/// between: see usage.rs).
const USAGE_SAVE_EVERY: u64 = 5;

/// An API error: becomes a ttrpc status with this code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    InvalidArgument(String),
    NotFound(String),
    AlreadyExists(String),
    FailedPrecondition(String),
    ResourceExhausted(String),
    Unavailable(String),
    Internal(String),
}

impl ApiError {
    /// What went wrong, without the kind.
    pub fn message(&self) -> &str {
        match self {
            ApiError::InvalidArgument(m)
            | ApiError::NotFound(m)
            | ApiError::AlreadyExists(m)
            | ApiError::FailedPrecondition(m)
            | ApiError::ResourceExhausted(m)
            | ApiError::Unavailable(m)
            | ApiError::Internal(m) => m,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, msg) = match self {
            ApiError::InvalidArgument(m) => ("invalid argument", m),
            ApiError::NotFound(m) => ("not found", m),
            ApiError::AlreadyExists(m) => ("already exists", m),
            ApiError::FailedPrecondition(m) => ("failed precondition", m),
            ApiError::ResourceExhausted(m) => ("resource exhausted", m),
            ApiError::Unavailable(m) => ("unavailable", m),
            ApiError::Internal(m) => ("internal", m),
        };
        write!(f, "{kind}: {msg}")
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

pub fn now_ms() -> u64 {
    berth_proto::vmm_process::now_ms()
}

/// A state change or other happening, as Watch streams it.
#[derive(Clone, Debug)]
pub struct Event {
    pub at_ms: u64,
    pub vm_id: String,
    pub kind: String,
    pub state: VmState,
    pub message: String,
}

/// A snapshot being written, as far as it got.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SnapshotProgress {
    pub active: bool,
    pub pass: u32,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub exists: bool,
}

/// A snapshot as callers see it.
#[derive(Clone, Debug, Default)]
pub struct SnapshotView {
    pub vm_id: String,
    pub name: String,
    pub created_at_ms: u64,
    pub disk_bytes: u64,
    pub memory_bytes: u64,
    pub pause_ms: u64,
    pub path: String,
}

fn snapshot_view(vm_id: &str, name: &str, path: &std::path::Path) -> SnapshotView {
    use std::os::unix::fs::MetadataExt;
    let files = [
        berth_proto::vmm_process::snapshot::STATE_FILE,
        berth_proto::vmm_process::snapshot::MEMORY_FILE,
    ];
    let meta: Vec<std::fs::Metadata> = files
        .iter()
        .filter_map(|f| std::fs::metadata(path.join(f)).ok())
        .collect();
    SnapshotView {
        vm_id: vm_id.to_string(),
        name: name.to_string(),
        created_at_ms: meta.first().map(|m| m.mtime() as u64 * 1000).unwrap_or(0),
        disk_bytes: meta.iter().map(|m| m.blocks() * 512).sum(),
        memory_bytes: meta.get(1).map(|m| m.len()).unwrap_or(0),
        pause_ms: 0,
        path: path.display().to_string(),
    }
}

/// A VM as callers see it.
#[derive(Clone, Debug)]
pub struct VmView {
    pub spec: VmSpec,
    pub record: VmRecord,
    pub console_log: String,
}

struct VmInner {
    spec: VmSpec,
    record: VmRecord,
    process: Option<VmmProcess>,
}

pub struct VmEntry {
    op: tokio::sync::Mutex<()>,
    inner: Mutex<VmInner>,
    dir: VmDir,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Manager {
    pub config: AgentConfig,
    store: Store,
    pub images: crate::images::ImageStore,
    vms: RwLock<BTreeMap<String, Arc<VmEntry>>>,
    events: broadcast::Sender<Event>,
    pub limits: Limits,
    pub quarantined: Vec<String>,
    /// The cgroup layout, or why there is none.
    pub cgroups: Result<Layout, String>,
    /// Held while a start is admitted, so parallel starts see each other.
    admission: tokio::sync::Mutex<()>,
    drained: AtomicBool,
    /// The last two samples of each running VM.
    samples: Mutex<HashMap<String, (Sample, Sample)>>,
    /// Each VM's usage record, once read or first sampled.
    usage: Mutex<HashMap<String, crate::usage::UsageRecord>>,
    /// Records changed since they were last saved.
    usage_unsaved: Mutex<std::collections::HashSet<String>>,
    /// Groups of VMs that ended but could not be removed yet.
    groups_to_remove: Mutex<Vec<String>>,
}

/// Host totals and what admission counts, in one place.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CapacityNumbers {
    pub cpus: u32,
    pub memory_mib: u64,
    pub allocatable_vcpus: u32,
    pub allocatable_memory_mib: u64,
    pub running_vcpus: u32,
    pub running_memory_mib: u64,
    pub defined_vcpus: u32,
    pub defined_memory_mib: u64,
    /// What admission holds against allocatable: running VMs, or all of
    /// them when the agent reserves on define.
    pub held_vcpus: u32,
    pub held_memory_mib: u64,
}

/// Online host CPUs, from sysfs ("0-1" → 2).
pub fn host_cpus() -> u32 {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| entitlement::cpus_in(s.trim()))
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        })
}

/// `ip link set <tap> master <bridge> up` for every NIC that names a
/// bridge. Building the bridge is the controller's business.
/// A VMM that answered with an error keeps its code and only its message
/// (a full disk is its FAILED_PRECONDITION, not "unreachable"); a VMM that
/// did not answer is UNAVAILABLE.
fn vmm_error(e: ttrpc::Error) -> ApiError {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            let message = format!("the VMM refused: {}", s.message());
            match s.code() {
                ttrpc::Code::INVALID_ARGUMENT => ApiError::InvalidArgument(message),
                ttrpc::Code::NOT_FOUND => ApiError::NotFound(message),
                ttrpc::Code::ALREADY_EXISTS => ApiError::AlreadyExists(message),
                ttrpc::Code::FAILED_PRECONDITION => ApiError::FailedPrecondition(message),
                ttrpc::Code::RESOURCE_EXHAUSTED => ApiError::ResourceExhausted(message),
                ttrpc::Code::UNAVAILABLE => ApiError::Unavailable(message),
                _ => ApiError::Internal(message),
            }
        }
        other => ApiError::Unavailable(format!("the VMM did not answer: {other}")),
    }
}

/// Does the VM's VMM serve its control socket (and so is it up)?
async fn vmm_answers(dir: &VmDir) -> bool {
    let Ok(client) = vmm_proc::connect(dir).await else {
        return false;
    };
    client
        .info(
            ttrpc::context::with_timeout(1_000_000_000),
            &Empty::default(),
        )
        .await
        .is_ok()
}

fn attach_bridges(spec: &VmSpec) -> Result<(), String> {
    for nic in spec.nics.iter().filter(|n| !n.bridge.is_empty()) {
        let out = std::process::Command::new("ip")
            .args(["link", "set", &nic.tap, "master", &nic.bridge, "up"])
            .output()
            .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cannot attach tap {} to bridge {}: {}",
                nic.tap,
                nic.bridge,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// `id`'s usage record, read from its file the first time.
fn usage_record<'a>(
    usage: &'a mut HashMap<String, crate::usage::UsageRecord>,
    id: &str,
    dir: &VmDir,
) -> &'a mut crate::usage::UsageRecord {
    usage
        .entry(id.to_string())
        .or_insert_with(|| crate::usage::UsageRecord::load(&dir.usage()))
}

/// Saves `id`'s usage record; it stays marked unsaved if that fails.
fn save_usage(
    id: &str,
    dir: &VmDir,
    record: &crate::usage::UsageRecord,
    unsaved: &mut std::collections::HashSet<String>,
) {
    match record.save(&dir.usage()) {
        Ok(()) => {
            unsaved.remove(id);
        }
        Err(e) => tracing::error!(vm = %id, "cannot save usage: {e}"),
    }
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct NodeState {
    drained: bool,
}

impl Manager {
    /// Loads every stored VM and re-adopts the VMMs still running.
    pub async fn load(config: AgentConfig, limits: Limits) -> std::io::Result<Arc<Manager>> {
        let store = Store::open(config.vms_dir(), config.quarantine_dir())?;
        let images = crate::images::ImageStore::open(config.image_store_dir())?;
        let (loaded, quarantined) = store.load_all();
        for q in &quarantined {
            tracing::error!("quarantined a VM whose state could not be read: {q}");
        }
        let (events, _) = broadcast::channel(1024);
        let cgroups = Layout::detect(
            config.cgroup_version,
            &config.cgroup_root,
            &config.cgroup_parent,
        );
        match &cgroups {
            Ok(layout) => tracing::info!(
                "cgroup {} under {}",
                layout.version(),
                config.cgroup_root.display()
            ),
            Err(e) if config.cgroup_version == cgroups::VersionChoice::Off => {
                tracing::warn!("NO CPU OR MEMORY ENFORCEMENT: {e}")
            }
            Err(e) => tracing::error!("cgroups unusable, VMs will not start: {e}"),
        }
        let drained = std::fs::read(config.state_root.join("node.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<NodeState>(&b).ok())
            .map(|n| n.drained)
            .unwrap_or(false);
        let manager = Arc::new(Manager {
            config,
            store,
            images,
            vms: RwLock::new(BTreeMap::new()),
            events,
            limits,
            quarantined,
            cgroups,
            admission: tokio::sync::Mutex::new(()),
            drained: AtomicBool::new(drained),
            samples: Mutex::new(HashMap::new()),
            usage: Mutex::new(HashMap::new()),
            usage_unsaved: Mutex::new(std::collections::HashSet::new()),
            groups_to_remove: Mutex::new(Vec::new()),
        });
        for l in loaded {
            let process = if l.record.state.has_vmm() {
                VmmProcess::adopt(l.record.pid, l.record.proc_start_ticks)
            } else {
                None
            };
            let entry = Arc::new(VmEntry {
                op: tokio::sync::Mutex::new(()),
                inner: Mutex::new(VmInner {
                    spec: l.spec,
                    record: l.record,
                    process,
                }),
                dir: l.dir,
            });
            manager.reconcile_loaded(&entry).await;
            let id = lock(&entry.inner).spec.id.clone();
            manager.vms.write().unwrap().insert(id, entry.clone());
            if lock(&entry.inner).record.state == VmState::Migrating {
                manager.rewatch_migration(entry);
            }
        }
        if let Ok(layout) = &manager.cgroups {
            let running: Vec<String> = manager
                .list(&BTreeMap::new())
                .into_iter()
                .filter(|v| v.record.state.has_vmm())
                .map(|v| v.spec.id)
                .collect();
            for removed in layout.remove_stale(&running) {
                tracing::info!("removed stale cgroup {removed}");
            }
        }
        Ok(manager)
    }

    /// After a restart: a VM recorded as running either still has its VMM
    /// (adopted: ask it whether it is paused) or is marked Crashed.
    async fn reconcile_loaded(&self, entry: &Arc<VmEntry>) {
        let (state, adopted) = {
            let inner = lock(&entry.inner);
            (inner.record.state, inner.process.is_some())
        };
        // A migration's VMM is its watcher's business (rewatch_migration).
        if !state.has_vmm() || state == VmState::Migrating {
            return;
        }
        if adopted && state == VmState::Starting && !self.finish_interrupted_start(entry).await {
            return;
        }
        if adopted {
            let live = match vmm_proc::connect(&entry.dir).await {
                Ok(client) => client
                    .info(
                        ttrpc::context::with_timeout(2_000_000_000),
                        &Empty::default(),
                    )
                    .await
                    .ok()
                    .map(|info| {
                        if info.state == "paused" {
                            VmState::Paused
                        } else {
                            VmState::Running
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
                        let _ = self.transition(entry, &mut inner, s, "re-adopted");
                    }
                }
                None => {
                    tracing::warn!(vm = %inner.spec.id, pid, "VMM alive but its control socket does not answer");
                }
            }
        } else {
            let exit = vmm_proc::read_exit(&entry.dir, None);
            let mut inner = lock(&entry.inner);
            tracing::warn!(vm = %inner.spec.id, "VMM gone while the agent was away: {}", exit.reason);
            inner.record.pid = 0;
            inner.record.last_exit = exit.reason.clone();
            let _ = self.transition(entry, &mut inner, VmState::Crashed, &exit.reason);
        }
    }

    /// An agent died while this VM's VMM was starting. A VMM that comes
    /// up within the start timeout is taken on (its taps joined to their
    /// bridges); one that does not is ended. Either way it is never lost.
    /// Returns whether the VMM runs on.
    async fn finish_interrupted_start(&self, entry: &VmEntry) -> bool {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let up = loop {
            if vmm_answers(&entry.dir).await {
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
            attach_bridges(&spec).err()
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

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, vm_id: &str, kind: &str, state: VmState, message: &str) {
        let _ = self.events.send(Event {
            at_ms: now_ms(),
            vm_id: vm_id.to_string(),
            kind: kind.to_string(),
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
    fn transition(
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
        self.emit(&inner.spec.id, "state", state, message);
        Ok(())
    }

    fn entry(&self, id: &str) -> ApiResult<Arc<VmEntry>> {
        self.vms
            .read()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no VM with id {id:?}")))
    }

    fn view(entry: &VmEntry) -> VmView {
        let inner = lock(&entry.inner);
        VmView {
            spec: inner.spec.clone(),
            record: inner.record.clone(),
            console_log: entry.dir.console_log().display().to_string(),
        }
    }

    fn wrong_state(spec: &VmSpec, state: VmState, wanted: &str) -> ApiError {
        ApiError::FailedPrecondition(format!("VM {} is {}; {wanted}", spec.id, state.name()))
    }

    pub fn validate(&self, spec: &VmSpec) -> ApiResult<()> {
        spec.validate(&self.config, &self.limits)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        self.check_images(spec)
    }

    pub async fn create(&self, spec: VmSpec) -> ApiResult<VmView> {
        self.validate(&spec)?;
        let _admission = self.admission.lock().await;
        if self.config.reserve_on_define {
            self.check_fits(&spec)?;
        }
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
        let dir = self.store.create(&spec, &record).map_err(internal)?;
        let id = spec.id.clone();
        let entry = Arc::new(VmEntry {
            op: tokio::sync::Mutex::new(()),
            inner: Mutex::new(VmInner {
                spec,
                record,
                process: None,
            }),
            dir,
        });
        vms.insert(id.clone(), entry.clone());
        drop(vms);
        self.emit(&id, "state", VmState::Defined, "created");
        Ok(Self::view(&entry))
    }

    pub fn get(&self, id: &str) -> ApiResult<VmView> {
        let entry = self.entry(id)?;
        Ok(Self::view(&entry))
    }

    pub fn list(&self, labels: &BTreeMap<String, String>) -> Vec<VmView> {
        self.vms
            .read()
            .unwrap()
            .values()
            .map(|e| Self::view(e))
            .filter(|v| {
                labels
                    .iter()
                    .all(|(k, val)| v.spec.labels.get(k) == Some(val))
            })
            .collect()
    }

    pub async fn update(&self, spec: VmSpec) -> ApiResult<VmView> {
        let entry = self.entry(&spec.id)?;
        let _op = entry.op.lock().await;
        self.validate(&spec)?;
        let taken = self.vms.read().unwrap().values().any(|e| {
            let s = &lock(&e.inner).spec;
            s.id != spec.id && !spec.name.is_empty() && s.display_name() == spec.name
        });
        if taken {
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
            // Live: only the shares and the I/O limits may change, and
            // they apply at once.
            let mut same = spec.with_limits_of(&old);
            same.cpu = old.cpu.clone();
            same.memory = old.memory.clone();
            if same != old {
                return Err(Self::wrong_state(
                    &old,
                    lock(&entry.inner).record.state,
                    "only cpu and memory policies and rate limits change on a running VM; stop it to change the rest",
                ));
            }
            if let Ok(layout) = &self.cgroups {
                layout
                    .apply(&spec.id, &self.cgroup_limits(&spec))
                    .map_err(|e| ApiError::Unavailable(e.to_string()))?;
            }
            let changed: Vec<_> = (spec.rate_limits().into_iter())
                .zip(old.rate_limits())
                .filter(|(new, old)| new.2 != old.2)
                .map(|(new, _)| new)
                .collect();
            self.push_rate_limits(&entry, changed).await?;
        }
        let mut inner = lock(&entry.inner);
        self.store.save_spec(&entry.dir, &spec).map_err(internal)?;
        inner.spec = spec;
        drop(inner);
        Ok(Self::view(&entry))
    }

    pub async fn delete(&self, id: &str) -> ApiResult<()> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        {
            let inner = lock(&entry.inner);
            if inner.record.state.has_vmm() {
                return Err(Self::wrong_state(
                    &inner.spec,
                    inner.record.state,
                    "stop it before deleting it",
                ));
            }
        }
        self.store.remove(&entry.dir).map_err(internal)?;
        self.vms.write().unwrap().remove(id);
        lock(&self.usage).remove(id);
        self.emit(id, "deleted", VmState::Stopped, "deleted");
        Ok(())
    }

    pub async fn start(&self, id: &str) -> ApiResult<VmView> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        {
            let inner = lock(&entry.inner);
            Self::ensure_not_running(&inner, "it must be Defined, Stopped or Crashed to start")?;
            // Paths are checked again now: files may have moved since Create.
            self.validate(&inner.spec)?;
        }
        self.admit(&entry, "started", |_| {}).await?;
        let hibernated = lock(&entry.inner).record.hibernated.clone();
        match hibernated {
            Some(name) => {
                let path = entry.dir.snapshots().join(&name);
                self.launch_from(
                    &entry,
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
                    self.store
                        .save_record(&entry.dir, &inner.record)
                        .map_err(internal)?;
                }
                // The snapshot holds the limits in force when it was taken;
                // an Update while the VM slept changed the spec since.
                let limits = lock(&entry.inner).spec.rate_limits();
                self.push_rate_limits(&entry, limits).await.map_err(|e| {
                    ApiError::Unavailable(format!(
                        "VM {id} woke from snapshot {name} but runs with the snapshot's I/O limits, not its spec's: {e}"
                    ))
                })?;
            }
            None => self.launch(&entry, "started").await?,
        }
        Ok(Self::view(&entry))
    }

    /// Captures a Running or Paused VM into snapshots/<name>.
    pub async fn snapshot(
        &self,
        id: &str,
        name: &str,
        hibernate: bool,
        kind: &str,
        live: bool,
    ) -> ApiResult<SnapshotView> {
        crate::spec::check_name("name", name)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        let state = lock(&entry.inner).record.state;
        if !matches!(state, VmState::Running | VmState::Paused) {
            let inner = lock(&entry.inner);
            return Err(Self::wrong_state(
                &inner.spec,
                state,
                "only a Running or Paused VM can be snapshotted",
            ));
        }
        let dir = entry.dir.snapshots();
        std::fs::create_dir_all(&dir).map_err(internal)?;
        let path = dir.join(name);
        let req = berth_proto::vmm::SnapshotRequest {
            dir: path.display().to_string(),
            resume: state == VmState::Running && !hibernate,
            kind: kind.to_string(),
            live,
            ..Default::default()
        };
        let ctx = ttrpc::context::with_timeout(300_000_000_000);
        let reply = self
            .vmm_call(&entry, |c| async move { c.snapshot(ctx, &req).await })
            .await?;
        self.emit(
            id,
            "snapshot",
            state,
            &format!("snapshot {name} taken ({} ms paused)", reply.pause_ms),
        );
        if hibernate {
            self.stop_locked(&entry, true, DEFAULT_STOP_TIMEOUT).await?;
            let mut inner = lock(&entry.inner);
            inner.record.hibernated = Some(name.to_string());
            inner.record.last_exit = format!("hibernated into snapshot {name}");
            self.store
                .save_record(&entry.dir, &inner.record)
                .map_err(internal)?;
            self.emit(id, "hibernated", VmState::Stopped, name);
        }
        let mut view = snapshot_view(id, name, &path);
        view.pause_ms = reply.pause_ms;
        Ok(view)
    }

    /// How far snapshot `name` of `id` has got: read from the progress
    /// file its VMM keeps in the snapshot's temporary directory, without
    /// waiting for the VM's operation lock (the Snapshot call holds it).
    pub fn snapshot_progress(&self, id: &str, name: &str) -> ApiResult<SnapshotProgress> {
        crate::spec::check_name("name", name)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let entry = self.entry(id)?;
        let dir = entry.dir.snapshots().join(name);
        let exists = dir
            .join(berth_proto::vmm_process::snapshot::STATE_FILE)
            .exists();
        let progress = berth_proto::vmm_process::snapshot::read_progress(&dir);
        let active = progress.is_some();
        let p = progress.unwrap_or_default();
        Ok(SnapshotProgress {
            active,
            pass: p.pass,
            done_bytes: p.done_bytes,
            total_bytes: p.total_bytes,
            exists,
        })
    }

    pub fn list_snapshots(&self, id: &str) -> ApiResult<Vec<SnapshotView>> {
        let entry = self.entry(id)?;
        let mut names: Vec<String> = std::fs::read_dir(entry.dir.snapshots())
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        e.path()
                            .join(berth_proto::vmm_process::snapshot::STATE_FILE)
                            .exists()
                    })
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        Ok(names
            .iter()
            .map(|n| snapshot_view(id, n, &entry.dir.snapshots().join(n)))
            .collect())
    }

    pub async fn delete_snapshot(&self, id: &str, name: &str) -> ApiResult<()> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        let path = Self::existing_snapshot(&entry, id, name)?;
        if lock(&entry.inner).record.hibernated.as_deref() == Some(name) {
            return Err(ApiError::FailedPrecondition(format!(
                "snapshot {name} holds hibernated VM {id}; start the VM first"
            )));
        }
        std::fs::remove_dir_all(&path).map_err(internal)?;
        Ok(())
    }

    /// The directory of `id`'s complete snapshot `name`.
    fn existing_snapshot(
        entry: &VmEntry,
        id: &str,
        snapshot: &str,
    ) -> ApiResult<std::path::PathBuf> {
        let path = entry.dir.snapshots().join(snapshot);
        if snapshot.is_empty()
            || snapshot.contains('/')
            || !path
                .join(berth_proto::vmm_process::snapshot::STATE_FILE)
                .exists()
        {
            return Err(ApiError::NotFound(format!(
                "VM {id} has no snapshot {snapshot:?}"
            )));
        }
        Ok(path)
    }

    /// A VM from a snapshot: the stopped source VM itself, or a new VM.
    pub async fn restore(
        &self,
        id: &str,
        snapshot: &str,
        new_id: &str,
        new_name: &str,
        paused: bool,
        taps: &[(String, String)],
    ) -> ApiResult<VmView> {
        let source = self.entry(id)?;
        let path = Self::existing_snapshot(&source, id, snapshot)?;
        // Refuse a snapshot this host cannot run before anything changes.
        berth_proto::vmm_process::snapshot::Header::check_restorable(
            &path,
            &berth_proto::vmm_process::host::cpu_vendor(),
        )
        .map_err(|e| ApiError::FailedPrecondition(e.to_string()))?;
        let target = if new_id.is_empty() {
            if !taps.is_empty() {
                let mut spec = lock(&source.inner).spec.clone();
                migration::rename_taps(&mut spec, taps)?;
                self.update(spec).await?;
            }
            source
        } else {
            let mut spec = lock(&source.inner).spec.clone();
            migration::rename_taps(&mut spec, taps)?;
            spec.id = new_id.to_string();
            spec.name = if new_name.is_empty() {
                new_id.to_string()
            } else {
                new_name.to_string()
            };
            self.create(spec).await?;
            self.entry(new_id)?
        };
        let _op = target.op.lock().await;
        {
            let inner = lock(&target.inner);
            Self::ensure_not_running(&inner, "stop it to restore a snapshot into it")?;
        }
        // A restore replaces whatever hibernation the target held.
        self.admit(&target, "restoring", |r| r.hibernated = None)
            .await?;
        self.launch_from(
            &target,
            &format!("restored from {id}/{snapshot}"),
            Some(RestoreFrom {
                snapshot: &path,
                paused,
                taps,
            }),
        )
        .await?;
        Ok(Self::view(&target))
    }

    /// Only a VM with no VMM can be started or restored into.
    fn ensure_not_running(inner: &VmInner, hint: &str) -> ApiResult<()> {
        if matches!(
            inner.record.state,
            VmState::Defined | VmState::Stopped | VmState::Crashed
        ) {
            Ok(())
        } else {
            Err(Self::wrong_state(&inner.spec, inner.record.state, hint))
        }
    }

    /// Admits `entry` and marks it Starting under one lock: parallel starts
    /// that together exceed capacity admit exactly as many as fit. `also`
    /// edits the record saved with that transition.
    async fn admit(
        &self,
        entry: &Arc<VmEntry>,
        why: &str,
        also: impl FnOnce(&mut VmRecord),
    ) -> ApiResult<()> {
        let _admission = self.admission.lock().await;
        if self.drained.load(Ordering::SeqCst) {
            return Err(ApiError::FailedPrecondition(
                "the node is drained: no new VM starts until Undrain".into(),
            ));
        }
        if !self.config.reserve_on_define {
            let spec = lock(&entry.inner).spec.clone();
            self.check_fits(&spec)?;
        }
        let mut inner = lock(&entry.inner);
        inner.record.restarts = 0;
        also(&mut inner.record);
        self.transition(entry, &mut inner, VmState::Starting, why)
    }

    /// The host's numbers and what admission holds.
    pub fn capacity(&self) -> CapacityNumbers {
        let cpus = host_cpus();
        let memory_mib = self.limits.host_memory_mib;
        let (rv, rm, dv, dm) = self.allocation();
        let alloc_cpus = (f64::from(cpus.saturating_sub(self.config.reserved_cpus))
            * self.config.cpu_overcommit) as u32;
        let alloc_mem = (memory_mib.saturating_sub(self.config.reserved_memory_mib) as f64
            * self.config.memory_overcommit) as u64;
        let (held_vcpus, held_memory_mib) = if self.config.reserve_on_define {
            (dv, dm)
        } else {
            (rv, rm)
        };
        CapacityNumbers {
            cpus,
            memory_mib,
            allocatable_vcpus: alloc_cpus,
            allocatable_memory_mib: alloc_mem,
            running_vcpus: rv,
            running_memory_mib: rm,
            defined_vcpus: dv,
            defined_memory_mib: dm,
            held_vcpus,
            held_memory_mib,
        }
    }

    /// RESOURCE_EXHAUSTED, naming the resource and the numbers, when `spec`
    /// does not fit beside what is held. The caller holds `admission`.
    fn check_fits(&self, spec: &VmSpec) -> ApiResult<()> {
        let c = self.capacity();
        if c.held_vcpus + spec.vcpus > c.allocatable_vcpus {
            return Err(ApiError::ResourceExhausted(format!(
                "VM {} needs {} vCPUs; {} of {} allocatable vCPUs are free",
                spec.id,
                spec.vcpus,
                c.allocatable_vcpus.saturating_sub(c.held_vcpus),
                c.allocatable_vcpus
            )));
        }
        if c.held_memory_mib + spec.memory_mib > c.allocatable_memory_mib {
            return Err(ApiError::ResourceExhausted(format!(
                "VM {} needs {} MiB of memory; {} of {} allocatable MiB are free",
                spec.id,
                spec.memory_mib,
                c.allocatable_memory_mib.saturating_sub(c.held_memory_mib),
                c.allocatable_memory_mib
            )));
        }
        Ok(())
    }

    pub fn set_drained(&self, drained: bool) -> ApiResult<()> {
        let bytes = serde_json::to_vec(&NodeState { drained }).expect("plain data");
        berth_proto::vmm_process::files::write_atomic(
            &self.config.state_root.join("node.json"),
            &bytes,
        )
        .map_err(internal)?;
        self.drained.store(drained, Ordering::SeqCst);
        let message = if drained {
            "node drained"
        } else {
            "node undrained"
        };
        self.emit(
            "",
            if drained { "drained" } else { "undrained" },
            VmState::Defined,
            message,
        );
        Ok(())
    }

    pub fn drained(&self) -> bool {
        self.drained.load(Ordering::SeqCst)
    }

    fn cgroup_limits(&self, spec: &VmSpec) -> cgroups::Limits {
        let overhead = if spec.memory.overhead_mib > 0 {
            spec.memory.overhead_mib
        } else {
            self.config.vmm_memory_overhead_mib
        };
        cgroups::Limits {
            weight: spec.cpu.weight,
            max: (spec.cpu.max > 0.0).then_some(spec.cpu.max),
            cpuset: (!spec.cpu.cpuset.is_empty()).then(|| spec.cpu.cpuset.clone()),
            memory_bytes: (spec.memory_mib + overhead) << 20,
        }
    }

    /// The VM's cgroup, created with its limits; the VMM joins these dirs.
    fn prepare_cgroup(&self, spec: &VmSpec) -> ApiResult<Vec<std::path::PathBuf>> {
        match &self.cgroups {
            Ok(layout) => layout
                .create(&spec.id, &self.cgroup_limits(spec))
                .map_err(|e| ApiError::Unavailable(format!("cannot set up the VM's cgroup: {e}"))),
            Err(_) if self.config.cgroup_version == cgroups::VersionChoice::Off => Ok(Vec::new()),
            Err(e) => Err(ApiError::Unavailable(format!(
                "cgroups unusable on this node: {e}"
            ))),
        }
    }

    fn release_cgroup(&self, id: &str) {
        if let Ok(layout) = &self.cgroups {
            if !layout.remove(id) {
                lock(&self.groups_to_remove).push(id.to_string());
            }
        }
        lock(&self.samples).remove(id);
    }

    /// Retries groups an exiting VMM kept busy a moment too long.
    fn retry_group_removal(&self) {
        let Ok(layout) = &self.cgroups else { return };
        let running: Vec<String> = self
            .vms
            .read()
            .unwrap()
            .iter()
            .filter(|(_, e)| lock(&e.inner).record.state.has_vmm())
            .map(|(id, _)| id.clone())
            .collect();
        lock(&self.groups_to_remove).retain(|id| !running.contains(id) && !layout.remove(id));
    }

    /// Spawns the VMM and waits until its control socket answers.
    async fn launch(&self, entry: &Arc<VmEntry>, why: &str) -> ApiResult<()> {
        self.launch_from(entry, why, None).await
    }

    /// Sets these I/O limits in the VM's running VMM.
    async fn push_rate_limits(
        &self,
        entry: &VmEntry,
        limits: impl IntoIterator<Item = (String, &'static str, crate::spec::RateLimit)>,
    ) -> ApiResult<()> {
        for (device, direction, limit) in limits {
            let req = berth_proto::vmm::SetRateLimitRequest {
                device,
                direction: direction.into(),
                limit: protobuf::MessageField::some(crate::server::rate_limit_to_pb(limit)),
                ..Default::default()
            };
            let ctx = ttrpc::context::with_timeout(5_000_000_000);
            self.vmm_call(entry, |c| async move { c.set_rate_limit(ctx, &req).await })
                .await?;
        }
        Ok(())
    }

    async fn vmm_call<F, Fut, T>(&self, entry: &VmEntry, call: F) -> ApiResult<T>
    where
        F: FnOnce(berth_proto::vmm_ttrpc::VmmServiceClient) -> Fut,
        Fut: std::future::Future<Output = ttrpc::Result<T>>,
    {
        let client = vmm_proc::connect(&entry.dir)
            .await
            .map_err(ApiError::Unavailable)?;
        call(client).await.map_err(vmm_error)
    }

    pub async fn pause(&self, id: &str) -> ApiResult<VmView> {
        self.pause_or_resume(id, true).await
    }

    pub async fn resume(&self, id: &str) -> ApiResult<VmView> {
        self.pause_or_resume(id, false).await
    }

    /// Running → Paused, or Paused → Running, through the VMM.
    async fn pause_or_resume(&self, id: &str, pause: bool) -> ApiResult<VmView> {
        let (from, to, wanted, why) = if pause {
            (
                VmState::Running,
                VmState::Paused,
                "only a Running VM can be paused",
                "paused",
            )
        } else {
            (
                VmState::Paused,
                VmState::Running,
                "only a Paused VM can be resumed",
                "resumed",
            )
        };
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        {
            let inner = lock(&entry.inner);
            if inner.record.state != from {
                return Err(Self::wrong_state(&inner.spec, inner.record.state, wanted));
            }
        }
        let ctx = ttrpc::context::with_timeout(10_000_000_000);
        self.vmm_call(&entry, |c| async move {
            if pause {
                c.pause(ctx, &Empty::default()).await
            } else {
                c.resume(ctx, &Empty::default()).await
            }
        })
        .await?;
        let mut inner = lock(&entry.inner);
        self.transition(&entry, &mut inner, to, why)?;
        drop(inner);
        Ok(Self::view(&entry))
    }

    pub async fn stop(
        &self,
        id: &str,
        force: bool,
        timeout: Option<Duration>,
    ) -> ApiResult<VmView> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        self.stop_locked(&entry, force, timeout.unwrap_or(DEFAULT_STOP_TIMEOUT))
            .await?;
        Ok(Self::view(&entry))
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
            let state = inner.record.state;
            if !matches!(state, VmState::Running | VmState::Paused) {
                return Err(Self::wrong_state(
                    &inner.spec,
                    state,
                    "only a Running or Paused VM can be stopped",
                ));
            }
            self.transition(
                entry,
                &mut inner,
                VmState::Stopping,
                if force { "forced stop" } else { "stop" },
            )?;
            state
        };
        let Some(mut process) = lock(&entry.inner).process.take() else {
            return Err(ApiError::Internal("no VMM process recorded".into()));
        };
        let mut exit = None;
        if !force {
            let ctx = || ttrpc::context::with_timeout(5_000_000_000);
            if was == VmState::Paused {
                let _ = self
                    .vmm_call(entry, |c| async move {
                        c.resume(ctx(), &Empty::default()).await
                    })
                    .await;
            }
            if self
                .vmm_call(entry, |c| async move {
                    c.shutdown(ctx(), &Empty::default()).await
                })
                .await
                .is_ok()
            {
                exit = process.wait_exit(&entry.dir, timeout).await;
            }
        }
        if exit.is_none() {
            let ctx = ttrpc::context::with_timeout(2_000_000_000);
            let _ = self
                .vmm_call(
                    entry,
                    |c| async move { c.stop(ctx, &Empty::default()).await },
                )
                .await;
            exit = process.wait_exit(&entry.dir, KILL_WAIT).await;
        }
        let exit = match exit {
            Some(e) => e,
            None => {
                process.kill();
                process
                    .wait_exit(&entry.dir, KILL_WAIT)
                    .await
                    .unwrap_or(VmmExit {
                        code: None,
                        reason: "VMM killed".into(),
                    })
            }
        };
        let mut inner = lock(&entry.inner);
        self.release_cgroup(&inner.spec.id);
        inner.record.pid = 0;
        inner.record.last_exit = exit.reason.clone();
        self.transition(entry, &mut inner, VmState::Stopped, &exit.reason)
    }

    pub async fn reboot(&self, id: &str) -> ApiResult<VmView> {
        let entry = self.entry(id)?;
        let _op = entry.op.lock().await;
        self.stop_locked(&entry, true, DEFAULT_STOP_TIMEOUT).await?;
        self.launch(&entry, "rebooted").await?;
        Ok(Self::view(&entry))
    }

    /// Forwards console input to the VMM.
    pub async fn console_write(&self, id: &str, data: Vec<u8>) -> ApiResult<()> {
        let entry = self.entry(id)?;
        {
            let inner = lock(&entry.inner);
            if !matches!(inner.record.state, VmState::Running | VmState::Paused) {
                return Err(Self::wrong_state(
                    &inner.spec,
                    inner.record.state,
                    "console input needs a running VM",
                ));
            }
        }
        let msg = berth_proto::vmm::ConsoleInput {
            data,
            ..Default::default()
        };
        let ctx = ttrpc::context::with_timeout(5_000_000_000);
        self.vmm_call(&entry, |c| async move { c.console_write(ctx, &msg).await })
            .await
            .map(|_| ())
    }

    pub fn console_log_path(&self, id: &str) -> ApiResult<std::path::PathBuf> {
        Ok(self.entry(id)?.dir.console_log())
    }

    /// Watches every running VMM; runs for the agent's life.
    pub async fn supervise(self: Arc<Self>) {
        loop {
            tokio::time::sleep(SUPERVISE_EVERY).await;
            self.retry_group_removal();
            let entries: Vec<Arc<VmEntry>> = self.vms.read().unwrap().values().cloned().collect();
            for entry in entries {
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
    }

    /// A VMM ended on its own: record why, then apply the restart policy.
    async fn on_exit(&self, entry: &Arc<VmEntry>, exit: VmmExit) {
        let (restart, policy_note) = {
            let mut inner = lock(&entry.inner);
            inner.process = None;
            inner.record.pid = 0;
            inner.record.last_exit = exit.reason.clone();
            let state = if exit.clean() {
                VmState::Stopped
            } else {
                VmState::Crashed
            };
            let _ = self.transition(entry, &mut inner, state, &exit.reason);
            let policy = inner.spec.restart.clone();
            let restarts = inner.record.restarts;
            match policy.kind {
                RestartKind::Always => (true, format!("restart {} (always)", restarts + 1)),
                RestartKind::OnFailure if !exit.clean() && restarts < policy.max_retries => (
                    true,
                    format!("restart {} of {}", restarts + 1, policy.max_retries),
                ),
                _ => (false, String::new()),
            }
        };
        if restart {
            lock(&entry.inner).record.restarts += 1;
            if let Err(e) = self.launch(entry, &policy_note).await {
                tracing::error!("restart failed: {e}");
            }
        }
    }

    /// Samples every running VM's cgroup and vCPU threads once a second.
    pub async fn sample(self: Arc<Self>) {
        for round in 0u64.. {
            tokio::time::sleep(SAMPLE_EVERY).await;
            let Ok(layout) = &self.cgroups else { continue };
            let save_now = round % USAGE_SAVE_EVERY == 0;
            let running: Vec<(String, Arc<VmEntry>)> = self
                .vms
                .read()
                .unwrap()
                .iter()
                .filter(|(_, e)| {
                    matches!(
                        lock(&e.inner).record.state,
                        VmState::Running | VmState::Paused
                    )
                })
                .map(|(id, e)| (id.clone(), e.clone()))
                .collect();
            for (id, entry) in running {
                let Ok(usage) = layout.usage(&id) else {
                    continue;
                };
                let ctx = ttrpc::context::with_timeout(1_000_000_000);
                let vmm = self
                    .vmm_call(
                        &entry,
                        |c| async move { c.stats(ctx, &Empty::default()).await },
                    )
                    .await
                    .ok();
                self.account(&id, &entry, &usage, vmm.as_ref(), save_now);
                let vmm = vmm.unwrap_or_default();
                let sample = Sample {
                    at: std::time::Instant::now(),
                    usage,
                    vcpu_run_ns: vmm.vcpu_run_ns,
                    vcpu_wait_ns: vmm.vcpu_wait_ns,
                    exits: vmm.exits,
                    exits_by_reason: vmm.exits_by_reason.into_iter().collect(),
                    devices: (vmm.devices.into_iter())
                        .map(|d| entitlement::DeviceUsage {
                            limit: crate::server::rate_limit_from_pb(&d.limit),
                            device: d.device,
                            direction: d.direction,
                            bytes: d.bytes,
                            ops: d.ops,
                            throttled_ns: d.throttled_ns,
                        })
                        .collect(),
                };
                let mut samples = lock(&self.samples);
                let pair = match samples.remove(&id) {
                    Some((_, last)) => (last, sample),
                    None => (sample.clone(), sample),
                };
                samples.insert(id, pair);
            }
            let mut usage = lock(&self.usage);
            let mut unsaved = lock(&self.usage_unsaved);
            for (spec, state, report) in self.reports() {
                let Some(record) = usage.get_mut(&spec.id) else {
                    continue;
                };
                if !report.breaches.is_empty() {
                    record.count_breaches(&report.breaches);
                    unsaved.insert(spec.id.clone());
                }
                // A VM that stopped gets no more samples: save what its
                // last ones added now, not at some later round.
                if !state.has_vmm() && unsaved.contains(&spec.id) {
                    if let Some(entry) = self.vms.read().unwrap().get(&spec.id) {
                        save_usage(&spec.id, &entry.dir, record, &mut unsaved);
                    }
                }
            }
        }
    }

    /// Adds one reading of a running VM to its usage record; saves the
    /// record when `save` (or when a new VMM appeared).
    fn account(
        &self,
        id: &str,
        entry: &Arc<VmEntry>,
        cgroup: &crate::cgroups::Usage,
        vmm: Option<&berth_proto::vmm::VmmStats>,
        save: bool,
    ) {
        let (pid, started_at_ms, memory_mib) = {
            let inner = lock(&entry.inner);
            (
                inner.record.pid,
                inner.record.started_at_ms,
                inner.spec.memory_mib,
            )
        };
        let devices = vmm.map(|v| crate::usage::io_totals(&v.devices));
        let reading = crate::usage::Reading {
            pid,
            vmm_started_at_ms: started_at_ms,
            now_ms: now_ms(),
            memory_mib,
            cpu_ns: cgroup.cpu_ns,
            devices,
        };
        let mut usage = lock(&self.usage);
        let record = usage_record(&mut usage, id, &entry.dir);
        let new_vmm = record.cursor.pid != pid;
        record.add(&reading);
        let mut unsaved = lock(&self.usage_unsaved);
        unsaved.insert(id.to_string());
        if save || new_vmm {
            save_usage(id, &entry.dir, record, &mut unsaved);
        }
    }

    /// What a VM has used since it was created.
    pub fn usage(&self, id: &str) -> ApiResult<crate::usage::Usage> {
        let entry = self.entry(id)?;
        let mut usage = lock(&self.usage);
        Ok(usage_record(&mut usage, id, &entry.dir).usage.clone())
    }

    /// Entitlement reports of every running VM (judged together, since
    /// shares depend on who else is busy).
    pub fn reports(&self) -> Vec<(VmSpec, VmState, Report)> {
        let samples = lock(&self.samples);
        let vms = self.vms.read().unwrap();
        let mut judged: Vec<(VmSpec, Report)> = Vec::new();
        let mut states = Vec::new();
        for (id, entry) in vms.iter() {
            let inner = lock(&entry.inner);
            let report = match samples.get(id) {
                Some((prev, last)) if inner.record.state.has_vmm() => {
                    entitlement::measure(prev, last)
                }
                _ => Report::default(),
            };
            states.push(inner.record.state);
            judged.push((inner.spec.clone(), report));
        }
        entitlement::judge(&mut judged, host_cpus());
        judged
            .into_iter()
            .zip(states)
            .map(|((spec, report), state)| (spec, state, report))
            .collect()
    }

    pub fn report(&self, id: &str) -> ApiResult<(VmSpec, VmState, Report)> {
        self.entry(id)?;
        self.reports()
            .into_iter()
            .find(|(s, _, _)| s.id == id)
            .ok_or_else(|| ApiError::NotFound(format!("no VM with id {id:?}")))
    }

    /// vCPUs and MiB of running VMs and of all VMs.
    pub fn allocation(&self) -> (u32, u64, u32, u64) {
        let vms = self.vms.read().unwrap();
        let mut totals = (0, 0, 0, 0);
        for e in vms.values() {
            let inner = lock(&e.inner);
            totals.2 += inner.spec.vcpus;
            totals.3 += inner.spec.memory_mib;
            if inner.record.state.has_vmm() {
                totals.0 += inner.spec.vcpus;
                totals.1 += inner.spec.memory_mib;
            }
        }
        totals
    }
}

/// The taps a VMM attaches: the spec's with a restore's or migration's
/// renames applied (the spec may carry them already), each once.
fn nic_taps(spec: &VmSpec, renames: &[(String, String)]) -> Vec<String> {
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
