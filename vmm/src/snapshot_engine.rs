//! Taking a snapshot of the running machine: full, diff (the pages written
//! since this VMM's last snapshot) or live (memory copied while the guest
//! runs, by the pre-copy loop, then a short pause for the rest). The file
//! format is `snapshot`'s; the control API only asks for one.
//!
//! A module of its own, above `machine`, rather than inside `snapshot`:
//! the machine records its state in the snapshot format, so the format
//! cannot also depend on the machine.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::devices::bus::lock;
use crate::machine::{CaptureError, Machine, PAUSE_TIMEOUT};
use crate::memory::GuestMemory;
use crate::precopy::{self, Round, Sink};
use crate::snapshot::{count_dirty, SnapshotError, Writer};
use crate::vstate::vcpu::PauseTimeout;
use crate::vstate::vm::VmError;

/// A live snapshot pauses once a pass leaves at most this many pages dirty
/// (4 MiB), or after this many passes.
const LIVE_DONE_PAGES: u64 = 1024;
const LIVE_MAX_PASSES: u32 = 10;

pub use berth_proto::vmm_process::snapshot::SnapshotKind as Kind;

pub struct Request<'a> {
    pub dir: &'a Path,
    pub kind: Kind,
    pub live: bool,
    /// Resume the guest afterwards if it was running.
    pub resume: bool,
}

/// What a snapshot cost.
pub struct Taken {
    pub pause_ms: u64,
    pub memory_bytes: u64,
    pub pages_written: u64,
    /// Pre-copy passes (0 unless live).
    pub iterations: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error(transparent)]
    UnknownKind(#[from] berth_proto::vmm_process::snapshot::UnknownSnapshotKind),
    #[error("a diff snapshot needs a parent: take a full snapshot first")]
    NoParent,
    #[error("live diff snapshots are not supported; take a live full one")]
    LiveDiff,
    #[error(transparent)]
    Write(#[from] SnapshotError),
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The vCPUs did not all stop.
    #[error(transparent)]
    Pause(#[from] PauseTimeout),
    /// Saving the vCPUs' or the VM's state.
    #[error(transparent)]
    Capture(#[from] CaptureError),
}

/// The snapshots one VMM takes. It remembers the last, the parent of the
/// next diff (dirty logging starts with the first).
pub struct Snapshots {
    machine: Arc<Machine>,
    last: Mutex<Option<PathBuf>>,
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// The snapshot file as a pre-copy sink.
struct FileSink<'a> {
    writer: &'a mut Writer,
    memory: &'a GuestMemory,
}

impl Sink for FileSink<'_> {
    type Error = TakeError;

    fn send_all(&mut self) -> Result<(), TakeError> {
        Ok(self.writer.copy_all(self.memory)?)
    }

    fn send_dirty(&mut self, dirty: &[Vec<u64>]) -> Result<(), TakeError> {
        Ok(self.writer.copy_dirty(self.memory, dirty)?)
    }

    /// Counting the pass that would copy these pages: the caller still
    /// copies them while the guest runs.
    fn done(&mut self, round: &Round) -> Result<bool, TakeError> {
        Ok(count_dirty(round.dirty) <= LIVE_DONE_PAGES || round.passes + 1 >= LIVE_MAX_PASSES)
    }
}

impl Snapshots {
    pub fn new(machine: Arc<Machine>) -> Snapshots {
        Snapshots {
            machine,
            last: Mutex::new(None),
        }
    }

    /// Something else read (and so cleared) the dirty log, as a migration
    /// does: the next diff would miss those pages, so it needs a new full
    /// snapshot first.
    pub fn forget_parent(&self) {
        *lock(&self.last) = None;
    }

    /// Takes a snapshot into `req.dir`. Resumes if asked to.
    pub fn take(&self, req: &Request) -> Result<Taken, TakeError> {
        let diff = req.kind == Kind::Diff;
        let parent = lock(&self.last).clone();
        if diff && parent.is_none() {
            return Err(TakeError::NoParent);
        }
        if diff && req.live {
            return Err(TakeError::LiveDiff);
        }
        let m = &self.machine;
        let mut writer = Writer::begin(req.dir, m.vm.memory())?;
        let was_paused = m.vcpus.is_paused();
        let live = req.live && !was_paused;
        let iterations = if live {
            self.copy_live(&mut writer)?
        } else {
            0
        };
        let paused_at = Instant::now();
        if !was_paused {
            m.vcpus.pause(PAUSE_TIMEOUT)?;
        }
        // Devices stop too, so nothing writes guest memory while it is saved.
        let virtio = m.quiesce_devices();
        let result = (|| {
            let memory = m.vm.memory();
            let dirty_pages = if diff || live {
                let dirty = m.vm.take_dirty()?;
                writer.copy_dirty(memory, &dirty)?;
                Some(dirty)
            } else {
                writer.copy_all(memory)?;
                None
            };
            let mut snapshot = m.capture(virtio)?;
            if diff {
                snapshot.kind = "diff".into();
                snapshot.parent = parent.clone();
                snapshot.dirty = dirty_pages;
            }
            let pages = writer.pages_written;
            writer.finish(&snapshot)?;
            // From here on, "dirty" means "since this snapshot".
            m.vm.start_dirty_log()?;
            *lock(&self.last) = Some(absolute(req.dir));
            Ok::<u64, TakeError>(pages)
        })();
        m.resume_devices();
        let pause_ms = paused_at.elapsed().as_millis() as u64;
        if req.resume && !was_paused {
            m.vcpus.resume();
        }
        Ok(Taken {
            pause_ms,
            memory_bytes: m.memory_bytes(),
            pages_written: result?,
            iterations,
        })
    }

    /// The running part of a live snapshot: the pre-copy passes, the pages
    /// the last of them left, then what a sync let the guest dirty. Returns
    /// the passes, the pre-copy's and the one that copied what it left.
    fn copy_live(&self, writer: &mut Writer) -> Result<u32, TakeError> {
        let m = &self.machine;
        let memory = m.vm.memory();
        let rest = precopy::run(&*m.vm, &mut FileSink { writer, memory })?;
        writer.copy_dirty(memory, &rest.dirty)?;
        writer.sync()?;
        // What the sync let the guest dirty meanwhile, still running.
        let dirty = m.vm.take_dirty()?;
        writer.copy_dirty(memory, &dirty)?;
        Ok(rest.passes + 1)
    }
}
