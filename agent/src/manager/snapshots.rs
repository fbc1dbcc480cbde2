//! Snapshots of a VM: taken by its VMM into `<vm>/snapshots/<name>/`,
//! listed, followed while written, deleted, and restored into the VM itself
//! or into a new one (hibernation is a snapshot taken as the VM stops).

use std::time::Duration;

use super::error::{internal, vmm_error, ApiError, ApiResult};
use super::registry::{lock, EventKind, VmEntry, VmView};
use super::rules::Operation;
use super::{migration, Manager, DEFAULT_STOP_TIMEOUT};
use crate::store::VmState;
use crate::vmm_proc::RestoreFrom;

/// A live snapshot of a large VM takes a while.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

pub use berth_proto::vmm_process::snapshot::SnapshotKind;

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

impl Manager {
    /// Captures a Running or Paused VM into snapshots/<name>.
    pub async fn snapshot(
        &self,
        id: &str,
        name: &str,
        hibernate: bool,
        kind: SnapshotKind,
        live: bool,
    ) -> ApiResult<SnapshotView> {
        crate::spec::check_name("name", name)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let entry = self.registry.entry(id)?;
        let _op = entry.op.lock().await;
        entry.allows(Operation::Snapshot)?;
        let state = entry.state();
        let dir = entry.dir.snapshots();
        std::fs::create_dir_all(&dir).map_err(internal)?;
        let path = dir.join(name);
        let mut req = berth_proto::vmm::SnapshotRequest {
            dir: path.display().to_string(),
            resume: state == VmState::Running && !hibernate,
            live,
            ..Default::default()
        };
        kind.fill(&mut req);
        let reply = self
            .vmm(&entry)
            .await?
            .snapshot(&req, SNAPSHOT_TIMEOUT)
            .await
            .map_err(vmm_error)?;
        self.registry.emit(
            id,
            EventKind::Snapshot,
            state,
            &format!("snapshot {name} taken ({} ms paused)", reply.pause_ms),
        );
        if hibernate {
            self.stop_locked(&entry, true, DEFAULT_STOP_TIMEOUT).await?;
            let mut inner = lock(&entry.inner);
            inner.record.hibernated = Some(name.to_string());
            inner.record.last_exit = format!("hibernated into snapshot {name}");
            self.registry.save(&entry, &inner)?;
            self.registry
                .emit(id, EventKind::Hibernated, VmState::Stopped, name);
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
        let entry = self.registry.entry(id)?;
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
        let entry = self.registry.entry(id)?;
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
        let entry = self.registry.entry(id)?;
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
        let source = self.registry.entry(id)?;
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
            self.registry.entry(new_id)?
        };
        let _op = target.op.lock().await;
        let restored = async {
            target.allows(Operation::RestoreInto)?;
            // A restore replaces whatever hibernation the target held.
            self.admit(&target, "restoring", |r| r.hibernated = None)
                .await?;
            let why = format!("restored from {id}/{snapshot}");
            let from = RestoreFrom {
                snapshot: &path,
                paused,
                taps,
            };
            self.launch_from(&target, &why, Some(from)).await
        }
        .await;
        if let Err(e) = restored {
            // A new VM exists only for this restore: one that did not come
            // up goes with it, so a retry is not ALREADY_EXISTS and no
            // later Start boots its kernel cold instead.
            if !new_id.is_empty() {
                self.forget_new_vm(&target, new_id, &e);
            }
            return Err(e);
        }
        Ok(target.view())
    }

    /// Removes a VM this call created, after what failed.
    fn forget_new_vm(&self, entry: &VmEntry, id: &str, why: &ApiError) {
        match self.registry.remove(entry, id) {
            Ok(()) => self.accounting.forget(id),
            Err(e) => {
                tracing::error!(vm = %id, "cannot remove the VM a failed restore made ({why}): {e}")
            }
        }
    }
}
