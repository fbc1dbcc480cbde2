//! Live migration between agents: PrepareMigrateIn on the destination,
//! MigrateOut on the source, each followed by a task that watches its own
//! VMM until the migration ends. The VMMs decide who owns the guest (see
//! vmm/src/migration/PROTOCOL.md); each agent follows its VMM, so the two
//! agree without talking to each other.

use std::sync::Arc;
use std::time::Duration;

use berth_proto::vmm_process::migration::MigrationPhase;

use super::error::{internal, vmm_error, ApiError, ApiResult};
use super::launch::nic_taps;
use super::registry::{lock, now_ms, EventKind, VmEntry, VmInner, VmView};
use super::rules::Operation;
use super::Manager;
use crate::spec::VmSpec;
use crate::store::{MigrationDirection, MigrationRecord, VmRecord, VmState};
use crate::vmm_proc::{IncomingFrom, Launch};

const WATCH_EVERY: Duration = Duration::from_millis(100);
/// How long a receiving VMM may take to bind and report its address.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a source VMM may take to exit after handing over.
const EXIT_AFTER_HANDOVER: Duration = Duration::from_secs(10);
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60);

/// Options of an outgoing migration (0 means the VMM's default).
#[derive(Clone, Debug, Default)]
pub struct MigrateParams {
    pub downtime_ms: u64,
    pub bandwidth_mib_s: u64,
    pub timeout_ms: u64,
    pub force_on_timeout: bool,
    pub max_iterations: u32,
}

/// What the destination hands to the source.
pub struct PreparedIn {
    pub address: String,
    pub token: String,
    pub expires_at_ms: u64,
    pub vm: VmView,
}

/// 128 random bits as hex, from the kernel.
fn new_token() -> ApiResult<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| ApiError::Internal(format!("cannot read /dev/urandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// "host" → "host:0"; "host:port" and "[v6]:port" stay.
fn with_port(listen: &str) -> String {
    let has_port = match listen.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok() && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    };
    if has_port {
        listen.to_string()
    } else if listen.contains(':') && !listen.starts_with('[') {
        format!("[{listen}]:0")
    } else {
        format!("{listen}:0")
    }
}

/// Renames the taps of `spec`'s NICs: (old, new) pairs.
pub fn rename_taps(spec: &mut VmSpec, taps: &[(String, String)]) -> ApiResult<()> {
    for (old, new) in taps {
        let nic = spec
            .nics
            .iter_mut()
            .find(|n| &n.tap == old)
            .ok_or_else(|| {
                ApiError::InvalidArgument(format!(
                    "tap_overrides: VM {} has no NIC on tap {old}",
                    spec.id
                ))
            })?;
        nic.tap = new.clone();
    }
    Ok(())
}

fn record_from_vmm(r: &mut MigrationRecord, s: &berth_proto::vmm::MigrationStatus) {
    r.phase = MigrationPhase::from_name(&s.phase);
    r.iteration = s.iteration;
    r.bytes_sent = s.bytes_sent;
    r.dirty_rate_bytes_per_s = s.dirty_rate_bytes_per_s;
    r.remaining_bytes = s.remaining_bytes;
    r.expected_downtime_ms = s.expected_downtime_ms;
    r.downtime_ms = s.downtime_ms;
    r.total_ms = s.total_ms;
    r.memory_bytes = s.memory_bytes;
    r.error = s.error.clone();
}

/// One line for Watch: where an outgoing migration stands.
fn progress_line(r: &MigrationRecord) -> String {
    format!(
        "{} to {}: pass {}, {} MiB sent, {} MiB left, dirtying {} MiB/s, expected downtime {} ms",
        r.phase,
        r.peer,
        r.iteration,
        r.bytes_sent >> 20,
        r.remaining_bytes >> 20,
        r.dirty_rate_bytes_per_s >> 20,
        r.expected_downtime_ms
    )
}

impl Manager {
    /// Admits `spec` for an incoming migration and starts a VMM waiting for
    /// it. A VM of the same id that migrated away from here earlier is
    /// taken back (its record returns if this attempt fails).
    pub async fn prepare_migrate_in(
        self: &Arc<Self>,
        mut spec: VmSpec,
        listen: &str,
        ttl: Duration,
        taps: &[(String, String)],
    ) -> ApiResult<PreparedIn> {
        rename_taps(&mut spec, taps)?;
        self.validate(&spec)?;
        refuse_local_disk_copies(&spec)?;
        let id = spec.id.clone();
        let previous = match self.registry.entry(&id) {
            Ok(entry) => {
                let _op = entry.op.lock().await;
                let mut inner = lock(&entry.inner);
                if inner.record.state != VmState::Migrated {
                    return Err(ApiError::AlreadyExists(format!(
                        "VM {id} exists here ({}); only a VM that migrated away can come back",
                        inner.record.state.name()
                    )));
                }
                let previous = (inner.spec.clone(), inner.record.clone());
                self.registry
                    .store
                    .save_spec(&entry.dir, &spec)
                    .map_err(internal)?;
                inner.spec = spec.clone();
                Some(previous)
            }
            Err(_) => {
                self.create(spec.clone()).await?;
                None
            }
        };
        let entry = self.registry.entry(&id)?;
        match self.launch_incoming(&entry, listen, ttl, taps).await {
            Ok((address, token, expires_at_ms)) => {
                let watcher = self.clone();
                let watched = entry.clone();
                tokio::spawn(async move { watcher.watch_incoming(watched, previous).await });
                Ok(PreparedIn {
                    address,
                    token,
                    expires_at_ms,
                    vm: entry.view(),
                })
            }
            Err(e) => {
                self.forget_incoming(&entry, previous, &e.to_string());
                Err(e)
            }
        }
    }

    async fn launch_incoming(
        &self,
        entry: &Arc<VmEntry>,
        listen: &str,
        ttl: Duration,
        taps: &[(String, String)],
    ) -> ApiResult<(String, String, u64)> {
        let _op = entry.op.lock().await;
        let listen = with_port(if listen.is_empty() {
            &self.config.migration_listen
        } else {
            listen
        });
        self.admit(entry, "incoming migration", |r| {
            r.migration = Some(MigrationRecord {
                direction: MigrationDirection::In,
                phase: MigrationPhase::Receiving,
                started_at_ms: now_ms(),
                ..Default::default()
            })
        })
        .await?;
        let spec = lock(&entry.inner).spec.clone();
        let cgroup_dirs = self.cgroups.prepare(&spec)?;
        let token = new_token()?;
        let expires_at_ms = now_ms() + ttl.as_millis() as u64;
        let mut config = spec.vmm_config(
            &entry.dir.console_log(),
            self.config.console_log_max_bytes,
            &entry.dir.cloud_init_seed(),
        );
        self.write_cloud_init_seed(entry, &spec)?;
        let confinement = self.confine(entry, &spec, &mut config, None, nic_taps(&spec, taps))?;
        let how = Launch::Incoming(IncomingFrom {
            listen: &listen,
            token: &token,
            expires_at_ms,
            taps,
        });
        let mut process = self
            .spawn_recorded(entry, &config, &cgroup_dirs, how, &confinement)
            .await?;
        let deadline = tokio::time::Instant::now() + LISTEN_TIMEOUT;
        let address = loop {
            if let Ok(address) = std::fs::read_to_string(entry.dir.migration_address()) {
                break address;
            }
            if let Some(exit) = process.exited(&entry.dir) {
                return Err(ApiError::FailedPrecondition(format!(
                    "the receiving VMM exited: {}",
                    exit.reason
                )));
            }
            if tokio::time::Instant::now() > deadline {
                process.kill();
                let _ = process.wait_exit(&entry.dir, Duration::from_secs(3)).await;
                return Err(ApiError::Unavailable(
                    "the receiving VMM did not start listening in time; killed".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // spawn_recorded has put the pid and start time in the record.
        let mut inner = lock(&entry.inner);
        inner.record.started_at_ms = now_ms();
        inner.process = Some(process);
        if let Some(m) = inner.record.migration.as_mut() {
            m.peer = address.clone();
        }
        self.registry.transition(
            entry,
            &mut inner,
            VmState::Migrating,
            &format!("waiting for a migration on {address}"),
        )?;
        Ok((address, token, expires_at_ms))
    }

    /// Follows the receiving VMM until it serves its control socket (it
    /// only does after the handover: the VM is ours) or exits (the attempt
    /// failed: the VM is not ours).
    async fn watch_incoming(
        self: Arc<Self>,
        entry: Arc<VmEntry>,
        previous: Option<(VmSpec, VmRecord)>,
    ) {
        let _op = entry.op.lock().await;
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            let exit = lock(&entry.inner)
                .process
                .as_mut()
                .and_then(|p| p.exited(&entry.dir));
            if let Some(exit) = exit {
                self.forget_incoming(&entry, previous, &exit.reason);
                return;
            }
            if !self.vmm_answers(&entry).await {
                continue;
            }
            let spec = {
                let mut inner = lock(&entry.inner);
                let started = inner
                    .record
                    .migration
                    .as_ref()
                    .map(|m| m.started_at_ms)
                    .unwrap_or_default();
                if let Some(m) = inner.record.migration.as_mut() {
                    m.phase = MigrationPhase::Completed;
                    m.total_ms = now_ms().saturating_sub(started);
                }
                let _ =
                    self.registry
                        .transition(&entry, &mut inner, VmState::Running, "migrated in");
                inner.spec.clone()
            };
            if let Err(e) = super::launch::attach_bridges(&spec) {
                tracing::error!(vm = %spec.id, "after migrating in: {e}");
            }
            return;
        }
    }

    /// An incoming migration that did not happen: no trace of the VM
    /// remains, or the record of its earlier departure comes back.
    fn forget_incoming(
        &self,
        entry: &Arc<VmEntry>,
        previous: Option<(VmSpec, VmRecord)>,
        why: &str,
    ) {
        let id = lock(&entry.inner).spec.id.clone();
        self.release_cgroup(&id);
        let message = format!("incoming migration failed: {why}");
        tracing::warn!(vm = %id, "{message}");
        match previous {
            Some((spec, record)) => {
                let mut inner = lock(&entry.inner);
                inner.process = None;
                let _ = self.registry.store.save_spec(&entry.dir, &spec);
                inner.spec = spec;
                inner.record = record;
                let _ = self
                    .registry
                    .transition(entry, &mut inner, VmState::Migrated, &message);
            }
            None => {
                if let Err(e) = self.registry.store.remove(&entry.dir) {
                    tracing::error!(vm = %id, "cannot remove the failed incoming VM: {e}");
                }
                self.registry.forget(&id, &message);
            }
        }
        (self.registry).emit(&id, EventKind::Migration, VmState::Stopped, &message);
    }

    /// Starts moving a Running VM to the destination VMM at `address`.
    pub async fn migrate_out(
        self: &Arc<Self>,
        id: &str,
        address: &str,
        token: &str,
        params: &MigrateParams,
    ) -> ApiResult<MigrationRecord> {
        if address.is_empty() || token.is_empty() {
            return Err(ApiError::InvalidArgument(
                "address and token (from the destination's PrepareMigrateIn) are required".into(),
            ));
        }
        let entry = self.registry.entry(id)?;
        let op = entry.op.lock().await;
        {
            let inner = lock(&entry.inner);
            super::registry::allows(&inner, Operation::MigrateOut)?;
            refuse_local_disk_copies(&inner.spec)?;
        }
        let req = berth_proto::vmm::MigrateRequest {
            address: address.to_string(),
            token: token.to_string(),
            downtime_ms: params.downtime_ms,
            bandwidth_bytes_per_s: params.bandwidth_mib_s << 20,
            timeout_ms: params.timeout_ms,
            force_on_timeout: params.force_on_timeout,
            max_iterations: params.max_iterations,
            ..Default::default()
        };
        let status = (self.vmm(&entry).await?)
            .migrate_out(&req, Duration::from_secs(10))
            .await
            .map_err(vmm_error)?;
        let record = {
            let mut inner = lock(&entry.inner);
            let mut record = MigrationRecord {
                direction: MigrationDirection::Out,
                peer: address.to_string(),
                started_at_ms: now_ms(),
                ..Default::default()
            };
            record_from_vmm(&mut record, &status);
            inner.record.migration = Some(record.clone());
            self.registry.transition(
                &entry,
                &mut inner,
                VmState::Migrating,
                &format!("migrating to {address}"),
            )?;
            record
        };
        drop(op);
        let watcher = self.clone();
        let watched = entry.clone();
        tokio::spawn(async move { watcher.watch_outgoing(watched).await });
        Ok(record)
    }

    /// Follows the source VMM's migration to its end, reporting progress.
    async fn watch_outgoing(self: Arc<Self>, entry: Arc<VmEntry>) {
        let op = entry.op.lock().await;
        let mut reported: Option<(MigrationPhase, u32)> = None;
        let mut last_event = std::time::Instant::now();
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            let status = match self.vmm(&entry).await {
                Ok(vmm) => vmm.get_migration(Duration::from_secs(2)).await.ok(),
                Err(_) => None,
            };
            let Some(status) = status else {
                // No answer: did the VMM die under the migration?
                let exit = lock(&entry.inner)
                    .process
                    .as_mut()
                    .and_then(|p| p.exited(&entry.dir));
                if let Some(exit) = exit {
                    drop(op);
                    self.on_exit(&entry, exit).await;
                    return;
                }
                continue;
            };
            let (record, id) = {
                let mut inner = lock(&entry.inner);
                let record = inner.record.migration.get_or_insert_with(Default::default);
                record_from_vmm(record, &status);
                (record.clone(), inner.spec.id.clone())
            };
            let now = (record.phase, record.iteration);
            if Some(now) != reported || last_event.elapsed() >= Duration::from_millis(500) {
                self.registry.emit(
                    &id,
                    EventKind::Migration,
                    VmState::Migrating,
                    &progress_line(&record),
                );
                reported = Some(now);
                last_event = std::time::Instant::now();
            }
            match record.phase {
                MigrationPhase::Completed => {
                    self.finish_outgoing(&entry, &record).await;
                    return;
                }
                MigrationPhase::Failed | MigrationPhase::Cancelled => {
                    let mut inner = lock(&entry.inner);
                    let message = format!(
                        "migration to {} {}: {}; the VM runs here",
                        record.peer, record.phase, record.error
                    );
                    let _ =
                        self.registry
                            .transition(&entry, &mut inner, VmState::Running, &message);
                    return;
                }
                MigrationPhase::Unknown => {
                    let mut inner = lock(&entry.inner);
                    let message = format!(
                        "migration to {}: outcome unknown ({}); the VM is paused here and may run on the destination: check it before resuming or stopping this one",
                        record.peer, record.error
                    );
                    let _ = self
                        .registry
                        .transition(&entry, &mut inner, VmState::Paused, &message);
                    return;
                }
                _ => {}
            }
        }
    }

    /// The destination runs the VM: our VMM exits on its own; what stays
    /// here is the record of where the VM went.
    async fn finish_outgoing(&self, entry: &Arc<VmEntry>, record: &MigrationRecord) {
        let process = lock(&entry.inner).process.take();
        if let Some(mut process) = process {
            if process
                .wait_exit(&entry.dir, EXIT_AFTER_HANDOVER)
                .await
                .is_none()
            {
                process.kill();
                let _ = process.wait_exit(&entry.dir, Duration::from_secs(3)).await;
            }
        }
        let mut inner: std::sync::MutexGuard<'_, VmInner> = lock(&entry.inner);
        self.release_cgroup(&inner.spec.id);
        inner.record.pid = 0;
        inner.record.last_exit = format!("migrated to {}", record.peer);
        let message = format!(
            "migrated to {}: downtime {} ms, total {} ms, {} passes",
            record.peer, record.downtime_ms, record.total_ms, record.iteration
        );
        let _ = self
            .registry
            .transition(entry, &mut inner, VmState::Migrated, &message);
    }

    /// After an agent restart, a VM recorded as Migrating: follow its
    /// adopted VMM again, or settle what happened while no agent watched.
    pub(super) fn rewatch_migration(self: &Arc<Self>, entry: Arc<VmEntry>) {
        let (outgoing, adopted) = {
            let inner = lock(&entry.inner);
            (inner.record.migrates_out(), inner.process.is_some())
        };
        let watcher = self.clone();
        if adopted {
            tracing::info!("re-adopted a VMM in the middle of a migration");
            if outgoing {
                tokio::spawn(async move { watcher.watch_outgoing(entry).await });
            } else {
                tokio::spawn(async move { watcher.watch_incoming(entry, None).await });
            }
            return;
        }
        let exit = self.vmms.read_exit(&entry.dir);
        if !outgoing {
            self.forget_incoming(&entry, None, &exit.reason);
            return;
        }
        let mut inner = lock(&entry.inner);
        inner.record.pid = 0;
        inner.record.last_exit = exit.reason.clone();
        if let Some(peer) = exit.reason.strip_prefix("migrated to ") {
            let peer = peer.to_string();
            if let Some(m) = inner.record.migration.as_mut() {
                m.phase = MigrationPhase::Completed;
            }
            self.release_cgroup(&inner.spec.id);
            let message = format!("migrated to {peer} while the agent was away");
            let _ = self
                .registry
                .transition(&entry, &mut inner, VmState::Migrated, &message);
        } else {
            let _ = self
                .registry
                .transition(&entry, &mut inner, VmState::Crashed, &exit.reason);
        }
    }

    pub fn get_migration(&self, id: &str) -> ApiResult<MigrationRecord> {
        let entry = self.registry.entry(id)?;
        let inner = lock(&entry.inner);
        inner
            .record
            .migration
            .clone()
            .ok_or_else(|| ApiError::NotFound(format!("VM {id} has never migrated")))
    }

    /// Asks the source VMM to stop before the handover. Refused on the
    /// destination: once its VMM said Ready only the source may decide.
    pub async fn cancel_migration(&self, id: &str) -> ApiResult<MigrationRecord> {
        let entry = self.registry.entry(id)?;
        {
            let inner = lock(&entry.inner);
            super::registry::allows(&inner, Operation::CancelMigration)?;
            if !inner.record.migrates_out() {
                let hint = super::rules::rule(Operation::CancelMigration).1;
                return Err(ApiError::FailedPrecondition(format!(
                    "VM {} is {}; {hint}",
                    inner.spec.id,
                    inner.record.state.name()
                )));
            }
        }
        let status = (self.vmm(&entry).await?)
            .cancel_migration(Duration::from_secs(5))
            .await
            .map_err(vmm_error)?;
        let mut inner = lock(&entry.inner);
        let record = inner.record.migration.get_or_insert_with(Default::default);
        record_from_vmm(record, &status);
        Ok(record.clone())
    }
}

/// Migration moves memory and device state; disks are expected on storage
/// both nodes see. A writable copy of an image lives on one node only, so
/// moving its VM would leave the guest's data behind.
fn refuse_local_disk_copies(spec: &crate::spec::VmSpec) -> ApiResult<()> {
    match spec
        .disks
        .iter()
        .position(|d| !d.image.is_empty() && !d.read_only)
    {
        Some(i) => Err(ApiError::FailedPrecondition(format!(
            "disks[{i}]: a writable disk copied from image {:?} is local to this node; \
             migration does not move disks (snapshot it, or use a path on shared storage)",
            spec.disks[i].image
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_get_a_port_when_they_have_none() {
        assert_eq!(with_port("127.0.0.1"), "127.0.0.1:0");
        assert_eq!(with_port("10.0.0.2:7100"), "10.0.0.2:7100");
        assert_eq!(with_port("::1"), "[::1]:0");
        assert_eq!(with_port("[::1]:9"), "[::1]:9");
        assert_eq!(with_port("node-2"), "node-2:0");
    }
}
