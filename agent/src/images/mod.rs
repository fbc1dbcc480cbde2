//! The node's image store (`<state_root>/image-store/`): kernels, initrds
//! and disk images, content-addressed by the sha256 of their raw bytes and
//! named for specs to use.
//!
//! ```text
//! image-store/blobs/sha256-<hex>    the content, read-only (0444)
//! image-store/index/<name>.json     name → digest, kind, labels, origin
//! image-store/tmp/                  imports in progress (emptied at start)
//! ```
//! A blob appears by rename only once it is complete and verified, and an
//! index entry is written (atomically) only after its blob exists, so a
//! crash leaves at worst an unnamed blob, never a name without content.

pub mod boot_files;
mod copy;
mod import;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use berth_proto::vmm_process::files::write_atomic;
use serde::{Deserialize, Serialize};

pub use crate::names::{is_digest, ImageKind};
pub use copy::{copy_for_vm, CopyMethod};
pub use import::{ImportHeader, Importer};

/// One named image, as index/<name>.json holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRecord {
    pub name: String,
    pub kind: ImageKind,
    /// "sha256:<hex>" of the stored raw bytes.
    pub digest: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub created_at_ms: u64,
    /// "raw" or "qcow2".
    pub source_format: String,
    /// sha256 of the bytes as they were imported.
    pub source_digest: String,
    /// A node path, or "stream".
    pub source: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InUse(String),
    /// The content is not what was promised (digest, length, format).
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    Io(String),
}

pub fn io_error(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ImageError {
    move |e| ImageError::Io(format!("{what}: {e}"))
}

/// One index entry; an unreadable one is logged and left for the operator.
fn read_entry(path: &Path) -> Option<ImageRecord> {
    let read = std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
    read.map_err(|e| tracing::error!(path = %path.display(), "unreadable image index entry: {e}"))
        .ok()
}

pub struct ImageStore {
    root: PathBuf,
    /// Imports and removals change the index one at a time.
    index_lock: Mutex<()>,
}

impl ImageStore {
    pub fn open(root: PathBuf) -> std::io::Result<ImageStore> {
        for dir in ["blobs", "index", "tmp"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        // Imports that were cut off: nothing refers to them.
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let _ = std::fs::remove_file(entry?.path());
        }
        // The jailed VMMs read blobs as their own uids.
        for dir in [&root, &root.join("blobs")] {
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
        Ok(ImageStore {
            root,
            index_lock: Mutex::new(()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn index_path(&self, name: &str) -> PathBuf {
        self.root.join("index").join(format!("{name}.json"))
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.replacen("sha256:", "sha256-", 1))
    }

    /// Every readable index entry, by name. An unreadable one is logged and
    /// left in place for the operator.
    pub fn list(&self) -> Vec<ImageRecord> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir(self.root.join("index")) else {
            return out;
        };
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) == Some("json") {
                out.extend(read_entry(&path));
            }
        }
        out.sort_by(|a: &ImageRecord, b| a.name.cmp(&b.name));
        out
    }

    /// By name (its own index entry), or by digest (the first name holding
    /// it).
    pub fn get(&self, reference: &str) -> Result<ImageRecord, ImageError> {
        let found = if is_digest(reference) {
            self.list().into_iter().find(|r| r.digest == reference)
        } else {
            crate::spec::check_name("image", reference)
                .map_err(|e| ImageError::Invalid(e.to_string()))?;
            let path = self.index_path(reference);
            path.exists().then(|| read_entry(&path)).flatten()
        };
        found.ok_or_else(|| ImageError::NotFound(format!("no image {reference:?} in the store")))
    }

    /// Starts an import; the bytes go to [`Importer::write`].
    pub fn begin_import(&self, header: ImportHeader) -> Result<Importer, ImageError> {
        header.validate()?;
        Importer::new(&self.tmp_dir(), header)
    }

    /// Files a finished import under its name. The same content under the
    /// same name again is no change; other content under a taken name is
    /// refused.
    pub fn commit(&self, importer: Importer) -> Result<ImageRecord, ImageError> {
        let done = importer.finish()?;
        let _guard = self.index_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(existing) = self.get(&done.record.name) {
            if existing.digest == done.record.digest && existing.kind == done.record.kind {
                return Ok(existing);
            }
            return Err(ImageError::AlreadyExists(format!(
                "image {:?} exists with {} ({}); remove it first",
                existing.name,
                existing.digest,
                existing.kind.name()
            )));
        }
        let blob = self.blob_path(&done.record.digest);
        if blob.exists() {
            drop(done.file);
        } else {
            std::fs::rename(&done.file, &blob).map_err(io_error("storing the image"))?;
            std::fs::set_permissions(&blob, std::os::unix::fs::PermissionsExt::from_mode(0o444))
                .map_err(io_error("making the image read-only"))?;
            std::fs::File::open(self.root.join("blobs"))
                .and_then(|d| d.sync_all())
                .map_err(io_error("syncing the image store"))?;
        }
        let json =
            serde_json::to_vec_pretty(&done.record).map_err(|e| ImageError::Io(e.to_string()))?;
        write_atomic(&self.index_path(&done.record.name), &json)
            .map_err(io_error("writing the image index"))?;
        Ok(done.record)
    }

    /// Removes a name, and its blob once no other name holds it. `users`:
    /// the VMs whose specs name it (non-empty refuses).
    pub fn remove(&self, reference: &str, users: &[String]) -> Result<(), ImageError> {
        let _guard = self.index_lock.lock().unwrap_or_else(|e| e.into_inner());
        let record = self.get(reference)?;
        if !users.is_empty() {
            return Err(ImageError::InUse(format!(
                "image {:?} is used by VM(s) {}; delete them or change their specs first",
                record.name,
                users.join(", ")
            )));
        }
        std::fs::remove_file(self.index_path(&record.name))
            .map_err(io_error("removing the image index entry"))?;
        if !self.list().iter().any(|r| r.digest == record.digest) {
            std::fs::remove_file(self.blob_path(&record.digest))
                .map_err(io_error("removing the image content"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
