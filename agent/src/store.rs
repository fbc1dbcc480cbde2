//! The state root on disk: `vms/<id>/spec.json` and `state.json` (written
//! atomically), beside the VM's console log, control socket and exit
//! record. A VM directory that cannot be read back is moved to
//! `quarantine/` and reported, never dropped silently.

use std::path::{Path, PathBuf};

use berth_proto::vmm_process::files::write_atomic;
pub use berth_proto::vmm_process::migration::MigrationPhase;
use serde::{Deserialize, Serialize};

use crate::spec::VmSpec;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    #[default]
    Defined,
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Crashed,
    /// Moving to or from another node (see `VmRecord::migration`).
    Migrating,
    /// Now runs on another node; kept as a record of where it went.
    Migrated,
}

impl VmState {
    /// States in which a VMM process exists (or should).
    pub fn has_vmm(self) -> bool {
        matches!(
            self,
            VmState::Starting
                | VmState::Running
                | VmState::Paused
                | VmState::Stopping
                | VmState::Migrating
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            VmState::Defined => "Defined",
            VmState::Starting => "Starting",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Stopping => "Stopping",
            VmState::Stopped => "Stopped",
            VmState::Crashed => "Crashed",
            VmState::Migrating => "Migrating",
            VmState::Migrated => "Migrated",
        }
    }
}

/// What the agent records about a VM besides its spec.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmRecord {
    pub state: VmState,
    pub pid: i32,
    /// The VMM's start time in clock ticks since boot (/proc/<pid>/stat
    /// field 22): with the pid, it tells our VMM from a re-used pid.
    pub proc_start_ticks: u64,
    pub started_at_ms: u64,
    pub restarts: u32,
    pub last_exit: String,
    pub state_changed_ms: u64,
    /// The snapshot a hibernated VM's next Start restores.
    pub hibernated: Option<String>,
    /// The VM's last migration, in or out.
    pub migration: Option<MigrationRecord>,
    /// The uid (and gid) its jailed VMM runs as; 0 until first started.
    pub jail_uid: u32,
    /// Its own copies of the writable disks its spec takes from images.
    pub disk_copies: Vec<DiskCopy>,
}

/// A VM's writable copy of a disk image, made at its first Start.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskCopy {
    /// Index into spec.disks.
    pub disk: u32,
    /// The image as the spec names it, and the content it was copied from.
    pub image: String,
    pub digest: String,
    pub path: PathBuf,
    /// "reflink" or "sparse-copy".
    pub method: String,
}

impl VmRecord {
    /// Is this VM the source of a migration (in progress or its last one)?
    pub fn migrates_out(&self) -> bool {
        self.migration
            .as_ref()
            .is_some_and(|m| m.direction == MigrationDirection::Out)
    }
}

/// Which end of a migration this node is; stored as "out" / "in".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationDirection {
    /// This node is the source (the record's default: a source's status
    /// poll fills in a record it has not got yet).
    #[default]
    Out,
    In,
}

impl MigrationDirection {
    pub fn name(self) -> &'static str {
        match self {
            MigrationDirection::Out => "out",
            MigrationDirection::In => "in",
        }
    }
}

/// One migration as the agent saw it: the source VMM's figures for an
/// outgoing one, the destination's view for an incoming one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationRecord {
    pub direction: MigrationDirection,
    /// The source VMM's phase; `Receiving` for an incoming one not yet
    /// handed over.
    pub phase: MigrationPhase,
    /// The other end: the destination VMM's address (out), or the address
    /// this node listened on (in).
    pub peer: String,
    pub started_at_ms: u64,
    pub iteration: u32,
    pub bytes_sent: u64,
    pub dirty_rate_bytes_per_s: u64,
    pub remaining_bytes: u64,
    pub expected_downtime_ms: u64,
    pub downtime_ms: u64,
    pub total_ms: u64,
    pub memory_bytes: u64,
    pub error: String,
}

/// One VM's files.
#[derive(Clone, Debug)]
pub struct VmDir(pub PathBuf);

impl VmDir {
    pub fn spec(&self) -> PathBuf {
        self.0.join("spec.json")
    }
    pub fn state(&self) -> PathBuf {
        self.0.join("state.json")
    }
    /// What the VMM writes (its sockets, console log, exit record) and its
    /// config: the one directory of the VM's own that its jail may write.
    pub fn run(&self) -> PathBuf {
        self.0.join("run")
    }
    /// The usage record (usage.rs).
    pub fn usage(&self) -> PathBuf {
        self.0.join("usage.json")
    }
    /// Copies of the writable disks taken from images.
    pub fn disks(&self) -> PathBuf {
        self.0.join("disks")
    }
    /// The empty directory the jailed VMM pivots into.
    pub fn jail_root(&self) -> PathBuf {
        self.0.join("jail")
    }
    pub fn console_log(&self) -> PathBuf {
        self.run().join("console.log")
    }
    /// The kernel and initrd read from disk 0 (`kernel.from_disk`).
    pub fn boot_files(&self) -> PathBuf {
        self.0.join("boot")
    }
    /// The NoCloud seed disk of a VM with a cloud-init part
    /// (`cloud_init::seed`), rewritten at every Start.
    pub fn cloud_init_seed(&self) -> PathBuf {
        self.0.join("cloud-init-seed.img")
    }
    pub fn socket(&self) -> PathBuf {
        self.run().join("vmm.sock")
    }
    pub fn exit_file(&self) -> PathBuf {
        self.run().join("exit.json")
    }
    pub fn vmm_config(&self) -> PathBuf {
        self.run().join("vmm.json")
    }
    pub fn vmm_log(&self) -> PathBuf {
        self.0.join("vmm.log")
    }
    pub fn snapshots(&self) -> PathBuf {
        self.0.join("snapshots")
    }
    /// The lock every VMM of this VM holds for its life
    /// (`berth_proto::vmm_process::run_lock`).
    pub fn run_lock(&self) -> PathBuf {
        self.run().join(berth_proto::vmm_process::run_lock::FILE)
    }
    /// Where a VMM receiving a migration writes the address it listens on.
    pub fn migration_address(&self) -> PathBuf {
        self.run().join("migrate.addr")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A VM read back at start-up.
pub struct Loaded {
    pub spec: VmSpec,
    pub record: VmRecord,
    pub dir: VmDir,
}

pub struct Store {
    vms: PathBuf,
    quarantine: PathBuf,
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("plain data serialises");
    bytes.push(b'\n');
    write_atomic(path, &bytes).map_err(|source| StoreError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Why a VM's directory could not be loaded (it is quarantined).
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("spec id {0:?} does not match its directory")]
    WrongId(String),
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| LoadError::Parse {
        path: path.to_owned(),
        source,
    })
}

impl Store {
    pub fn open(vms: PathBuf, quarantine: PathBuf) -> std::io::Result<Store> {
        std::fs::create_dir_all(&vms)?;
        Ok(Store { vms, quarantine })
    }

    pub fn dir(&self, id: &str) -> VmDir {
        VmDir(self.vms.join(id))
    }

    /// Creates the VM's directory and its first spec and state.
    pub fn create(&self, spec: &VmSpec, record: &VmRecord) -> Result<VmDir, StoreError> {
        let dir = self.dir(&spec.id);
        std::fs::create_dir_all(&dir.0).map_err(|source| StoreError::Write {
            path: dir.0.clone(),
            source,
        })?;
        // A Create that cannot write both documents leaves no directory:
        // an empty or half-written one would be quarantined at the next load.
        let written = write_json(&dir.spec(), spec).and_then(|()| write_json(&dir.state(), record));
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&dir.0);
            return Err(e);
        }
        Ok(dir)
    }

    pub fn save_spec(&self, dir: &VmDir, spec: &VmSpec) -> Result<(), StoreError> {
        write_json(&dir.spec(), spec)
    }

    pub fn save_record(&self, dir: &VmDir, record: &VmRecord) -> Result<(), StoreError> {
        write_json(&dir.state(), record)
    }

    pub fn remove(&self, dir: &VmDir) -> Result<(), StoreError> {
        std::fs::remove_dir_all(&dir.0).map_err(|source| StoreError::Remove {
            path: dir.0.clone(),
            source,
        })
    }

    /// Reads every VM. Directories that do not read back are moved to
    /// quarantine; their names and reasons are returned beside the VMs.
    pub fn load_all(&self) -> (Vec<Loaded>, Vec<String>) {
        let mut loaded = Vec::new();
        let mut quarantined = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.vms) else {
            return (loaded, quarantined);
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for path in dirs {
            let dir = VmDir(path.clone());
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let read = read_json::<VmSpec>(&dir.spec()).and_then(|spec| {
                let record = read_json::<VmRecord>(&dir.state())?;
                if spec.id != name {
                    return Err(LoadError::WrongId(spec.id));
                }
                Ok((spec, record))
            });
            match read {
                Ok((spec, record)) => loaded.push(Loaded { spec, record, dir }),
                Err(reason) => {
                    let moved = self.quarantine_dir(&path, &name);
                    quarantined.push(format!("{name}: {reason} (moved to {moved})"));
                }
            }
        }
        (loaded, quarantined)
    }

    fn quarantine_dir(&self, path: &Path, name: &str) -> String {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let target = self.quarantine.join(format!("{name}-{stamp}"));
        let result =
            std::fs::create_dir_all(&self.quarantine).and_then(|_| std::fs::rename(path, &target));
        match result {
            Ok(()) => target.display().to_string(),
            Err(e) => format!("nowhere: {e}; left in place"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_state_is_quarantined_and_the_rest_loads() {
        let root = std::env::temp_dir().join(format!("berth-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let store = Store::open(root.join("vms"), root.join("quarantine")).unwrap();
        for id in ["a", "b", "c"] {
            let spec = VmSpec {
                id: id.into(),
                vcpus: 1,
                memory_mib: 64,
                ..Default::default()
            };
            store.create(&spec, &VmRecord::default()).unwrap();
        }
        std::fs::write(store.dir("b").state(), b"{\"state\": \"runn").unwrap();
        std::fs::write(store.dir("c").spec(), b"").unwrap();
        let (loaded, quarantined) = store.load_all();
        assert_eq!(
            loaded
                .iter()
                .map(|l| l.spec.id.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(quarantined.len(), 2, "{quarantined:?}");
        assert!(quarantined[0].starts_with("b: ") && quarantined[0].contains("state.json"));
        assert!(!store.dir("b").0.exists());
        let kept: Vec<_> = std::fs::read_dir(root.join("quarantine"))
            .unwrap()
            .collect();
        assert_eq!(
            kept.len(),
            2,
            "the broken directories are kept, not deleted"
        );
    }
}
