//! Snapshots: a directory with a state file and a memory file.
//!
//! `state.json` starts with a header line — magic, format version, the
//! berth version, the host CPU vendor, the KVM flavour and a checksum of
//! the rest — followed by the encoded state (vCPUs, VM, devices, config).
//! `memory.img` holds guest RAM, regions back to back, with all-zero pages
//! left as holes (a sparse file). Both are written under a temporary
//! directory name and renamed into place, so a crash mid-snapshot never
//! leaves something that looks valid.
//!
//! Restore order (see `vstate::vcpu_state` for the per-vCPU order):
//! memory (mapped MAP_PRIVATE from the memory file, so restore does not read
//! it) → VM (memory slots, TSS, irqchip, PIT) → vCPUs created and their
//! state set → irqchip, PIT and clock state → devices from their state.

pub mod state;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
};

use crate::memory::{dirty_offsets, GuestMemory};
pub use state::VmSnapshot;

pub use berth_proto::vmm_process::snapshot::{
    fnv1a, read_progress, Progress, FORMAT_VERSION, MAGIC, MEMORY_FILE, PROGRESS_FILE, STATE_FILE,
};
use berth_proto::vmm_process::snapshot::{temporary_dir, Header, HeaderError};
const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// What the header says (magic, format, checksum, CPU vendor), as the
    /// agent checks it too.
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("snapshot state {path} cannot be decoded: {message}")]
    Decode { path: PathBuf, message: String },
    #[error("memory file {path} is {found} bytes; the snapshot needs {expected}")]
    MemorySize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("parent snapshot {0} is missing")]
    MissingParent(PathBuf),
    #[error("cannot map the memory file: {0}")]
    Map(String),
    #[error("cannot read guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_owned();
    move |source| SnapshotError::Io { what, path, source }
}

/// A snapshot being written: its temporary directory and memory file.
pub struct Writer {
    dir: PathBuf,
    tmp: PathBuf,
    memory: File,
    /// Offset of each region in the memory file.
    offsets: Vec<u64>,
    pub pages_written: u64,
    /// Guest memory bytes gone through in the current pass, and how many
    /// the pass covers: what `progress.json` in the temporary directory
    /// shows while the snapshot is written.
    progress: Progress,
    /// `done_bytes` when `progress.json` was last written.
    reported: u64,
}

/// Progress is rewritten every this many bytes.
const PROGRESS_STEP: u64 = 32 << 20;

impl Writer {
    /// Starts `<dir>.tmp` with a memory file as large as guest RAM (sparse).
    pub fn begin(dir: &Path, mem: &GuestMemory) -> Result<Writer, SnapshotError> {
        let tmp = temporary_dir(dir);
        remove_unfinished(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io("create", &tmp))?;
        let path = tmp.join(MEMORY_FILE);
        let memory = File::create(&path).map_err(io("create", &path))?;
        let mut offsets = Vec::new();
        let mut total = 0u64;
        for region in mem.iter() {
            offsets.push(total);
            total += region.len();
        }
        memory.set_len(total).map_err(io("size", &path))?;
        Ok(Writer {
            dir: dir.to_owned(),
            tmp,
            memory,
            offsets,
            pages_written: 0,
            progress: Progress::default(),
            reported: 0,
        })
    }

    fn start_pass(&mut self, total_bytes: u64) {
        self.progress.pass += 1;
        self.progress.done_bytes = 0;
        self.progress.total_bytes = total_bytes;
        self.reported = 0;
        self.report();
    }

    fn advance(&mut self, bytes: u64) {
        self.progress.done_bytes += bytes;
        let p = &self.progress;
        if p.done_bytes >= self.reported + PROGRESS_STEP || p.done_bytes == p.total_bytes {
            self.report();
        }
    }

    /// Best effort and not synced: it only feeds progress displays.
    fn report(&mut self) {
        self.reported = self.progress.done_bytes;
        let Ok(text) = serde_json::to_vec(&self.progress) else {
            return;
        };
        let path = self.tmp.join(PROGRESS_FILE);
        let next = self.tmp.join(".progress.json.next");
        if std::fs::write(&next, text).is_ok() {
            let _ = std::fs::rename(&next, &path);
        }
    }

    fn put(&mut self, at: u64, page: &[u8]) -> Result<(), SnapshotError> {
        let path = self.tmp.join(MEMORY_FILE);
        self.memory
            .write_all_at(page, at)
            .map_err(io("write", &path))?;
        self.pages_written += 1;
        Ok(())
    }

    /// Copies all of guest RAM, leaving all-zero pages as holes.
    pub fn copy_all(&mut self, mem: &GuestMemory) -> Result<(), SnapshotError> {
        let mut buf = vec![0u8; 1 << 20];
        let zero = [0u8; PAGE];
        self.start_pass(mem.iter().map(|r| r.len()).sum());
        for (r, region) in mem.iter().enumerate() {
            let base = region.start_addr().0;
            let mut done = 0u64;
            while done < region.len() {
                let n = (region.len() - done).min(buf.len() as u64) as usize;
                mem.read_slice(&mut buf[..n], GuestAddress(base + done))?;
                for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                    if page != &zero[..page.len()] {
                        let at = self.offsets[r] + done + (i * PAGE) as u64;
                        let page = page.to_vec();
                        self.put(at, &page)?;
                    }
                }
                done += n as u64;
                self.advance(n as u64);
            }
        }
        Ok(())
    }

    /// Copies the pages set in `dirty` (zero pages too: they may have been
    /// written over with zeros since an earlier pass).
    pub fn copy_dirty(
        &mut self,
        mem: &GuestMemory,
        dirty: &[Vec<u64>],
    ) -> Result<(), SnapshotError> {
        let mut page = vec![0u8; PAGE];
        self.start_pass(count_dirty(dirty) * PAGE as u64);
        for ((r, region), bits) in mem.iter().enumerate().zip(dirty) {
            for offset in dirty_offsets(bits, region.len()) {
                mem.read_slice(&mut page, GuestAddress(region.start_addr().0 + offset))?;
                let at = self.offsets[r] + offset;
                let data = page.clone();
                self.put(at, &data)?;
                self.advance(PAGE as u64);
            }
        }
        Ok(())
    }

    /// Flushes what is written so far, so the final (paused) part of a live
    /// snapshot only waits for its own few pages.
    pub fn sync(&self) -> Result<(), SnapshotError> {
        let path = self.tmp.join(MEMORY_FILE);
        self.memory.sync_data().map_err(io("sync", &path))
    }

    /// Writes the state file and moves the snapshot into place.
    pub fn finish(self, state: &VmSnapshot) -> Result<(), SnapshotError> {
        let memory_path = self.tmp.join(MEMORY_FILE);
        self.memory.sync_all().map_err(io("sync", &memory_path))?;
        let _ = std::fs::remove_file(self.tmp.join(PROGRESS_FILE));
        let text = encode_state(state);
        berth_proto::vmm_process::files::write_atomic(&self.tmp.join(STATE_FILE), &text)
            .map_err(io("write", &self.tmp))?;
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir).map_err(io("replace", &self.dir))?;
        }
        std::fs::rename(&self.tmp, &self.dir).map_err(io("rename into", &self.dir))?;
        if let Some(parent) = self.dir.parent() {
            File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(io("sync", parent))?;
        }
        Ok(())
    }
}

/// A snapshot that did not finish (a full disk, a failed pass, a cancel)
/// leaves no `<dir>.tmp` behind; after `finish` the directory has moved
/// and there is nothing to remove. The files are removed by name, not
/// by listing the directory: the control thread's seccomp filter has no
/// getdents64, and a cleanup must not cost the VM.
impl Drop for Writer {
    fn drop(&mut self) {
        remove_unfinished(&self.tmp);
    }
}

/// Removes a snapshot's temporary directory by the names a `Writer` puts
/// in it (an earlier VMM's as well as ours).
fn remove_unfinished(tmp: &Path) {
    if !tmp.exists() {
        return;
    }
    let state_temp = format!(".{STATE_FILE}.tmp.");
    let names = [
        MEMORY_FILE,
        PROGRESS_FILE,
        ".progress.json.next",
        STATE_FILE,
    ];
    for name in names {
        let _ = std::fs::remove_file(tmp.join(name));
    }
    let _ = std::fs::remove_file(tmp.join(format!("{state_temp}{}", std::process::id())));
    if std::fs::remove_dir(tmp).is_err() && tmp.exists() {
        eprintln!(
            "berth-vmm: warning: {} holds files of another writer; left in place",
            tmp.display()
        );
    }
}

/// The bytes of a state file: the header line, then the encoded state.
pub fn encode_state(state: &VmSnapshot) -> Vec<u8> {
    let body = serde_json::to_vec(state).expect("plain data serialises");
    let header = Header {
        format_version: FORMAT_VERSION.into(),
        cpu_vendor: state.cpu_vendor.clone(),
        cpu_model: state.cpu_model.clone(),
        kvm_flavour: state.kvm_flavour.clone(),
    };
    header.encode(&body)
}

/// Number of pages set in per-region dirty bitmaps.
pub fn count_dirty(dirty: &[Vec<u64>]) -> u64 {
    dirty
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// Reads and checks a snapshot's state: magic, version, checksum, CPU vendor.
pub fn read_state(dir: &Path) -> Result<VmSnapshot, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read(&path).map_err(io("read", &path))?;
    decode_state(&path, &text)
}

/// Checks and decodes the bytes of a state file (`path` names it in errors):
/// magic, version, checksum, CPU vendor.
pub fn decode_state(path: &Path, text: &[u8]) -> Result<VmSnapshot, SnapshotError> {
    let (header, body) = Header::split(path, text)?;
    let state: VmSnapshot = serde_json::from_slice(body).map_err(|e| SnapshotError::Decode {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let here = berth_proto::vmm_process::host::cpu_vendor();
    if state.cpu_vendor != here || header.cpu_vendor != here {
        return Err(HeaderError::CpuVendor {
            taken: state.cpu_vendor.clone(),
            here,
        }
        .into());
    }
    Ok(state)
}

/// Guest memory for restoring `target` (in `dir`): the full snapshot at the
/// root of its chain mapped privately, then each diff's pages on top.
pub fn load_memory(dir: &Path, target: &VmSnapshot) -> Result<GuestMemory, SnapshotError> {
    let mut diffs: Vec<(PathBuf, Vec<Vec<u64>>)> = Vec::new();
    let (mut base_dir, mut base_regions) = (dir.to_owned(), target.regions.clone());
    let mut next = target.parent.clone().filter(|_| target.kind == "diff");
    if let Some(dirty) = &target.dirty {
        diffs.push((dir.to_owned(), dirty.clone()));
    }
    while let Some(parent) = next {
        if diffs.len() > 64 {
            return Err(SnapshotError::Decode {
                path: parent,
                message: "diff chain longer than 64 (a loop?)".into(),
            });
        }
        if !parent.join(STATE_FILE).exists() {
            return Err(SnapshotError::MissingParent(parent));
        }
        let state = read_state(&parent)?;
        if state.kind == "diff" {
            diffs.push((parent.clone(), state.dirty.clone().unwrap_or_default()));
            next = state.parent.clone();
        } else {
            base_dir = parent;
            base_regions = state.regions;
            next = None;
        }
    }
    if base_regions != target.regions {
        return Err(SnapshotError::Map(
            "the chain's snapshots disagree on the memory layout".into(),
        ));
    }
    let mem = map_memory(&base_dir, &base_regions)?;
    // Oldest diff first.
    for (diff_dir, dirty) in diffs.iter().rev() {
        let path = diff_dir.join(MEMORY_FILE);
        let file = File::open(&path).map_err(io("open", &path))?;
        let mut page = vec![0u8; PAGE];
        let mut offset = 0u64;
        for (region, bits) in mem.iter().zip(dirty) {
            for at in dirty_offsets(bits, region.len()) {
                file.read_exact_at(&mut page, offset + at)
                    .map_err(io("read", &path))?;
                mem.write_slice(&page, GuestAddress(region.start_addr().0 + at))?;
            }
            offset += region.len();
        }
    }
    Ok(mem)
}

/// Maps the memory file privately: pages are read when the guest touches
/// them, and its writes never reach the snapshot.
pub fn map_memory(dir: &Path, regions: &[(u64, u64)]) -> Result<GuestMemory, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let file = OpenOptions::new()
        .read(true)
        .open(&path)
        .map_err(io("open", &path))?;
    // A state file's sizes may add up past 2^64: that is no file's size.
    let expected = regions.iter().try_fold(0u64, |sum, r| sum.checked_add(r.1));
    let found = file.metadata().map_err(io("stat", &path))?.len();
    if expected != Some(found) {
        return Err(SnapshotError::MemorySize {
            path,
            found,
            expected: expected.unwrap_or(u64::MAX),
        });
    }
    let mut offset = 0u64;
    let mut mapped = Vec::new();
    for &(start, size) in regions {
        let file = file.try_clone().map_err(io("open", &path))?;
        let mapping = MmapRegionBuilder::new_with_bitmap(
            size as usize,
            AtomicBitmap::with_len(size as usize),
        )
        .with_file_offset(FileOffset::new(file, offset))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| SnapshotError::Map(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| SnapshotError::Map("region overflows the address space".into()))?;
        mapped.push(region);
        offset += size;
    }
    GuestMemory::from_regions(mapped).map_err(|e| SnapshotError::Map(e.to_string()))
}
