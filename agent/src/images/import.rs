//! One import: the bytes are hashed as they are written to a temporary
//! file; at the end the digest is checked, a qcow2 is converted to raw with
//! qemu-img, and the result is hashed again for its content address.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::{io_error, is_digest, ImageError, ImageKind, ImageRecord};

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// What an import is asked to store.
#[derive(Clone, Debug, Default)]
pub struct ImportHeader {
    pub name: String,
    pub kind: String,
    pub labels: BTreeMap<String, String>,
    /// "sha256:<hex>" the imported bytes must hash to; empty: no check.
    pub expected_digest: String,
    /// "raw", "qcow2" or "" (detect).
    pub format: String,
    /// The promised length, 0 if unknown.
    pub size_bytes: u64,
    /// "stream" or the node path it was read from.
    pub source: String,
}

impl ImportHeader {
    pub fn validate(&self) -> Result<ImageKind, ImageError> {
        crate::spec::check_name("name", &self.name)
            .map_err(|e| ImageError::Invalid(e.to_string()))?;
        let kind = ImageKind::parse(&self.kind).map_err(|e| ImageError::Invalid(e.to_string()))?;
        if !self.expected_digest.is_empty() && !is_digest(&self.expected_digest) {
            return Err(ImageError::Invalid(format!(
                "expected_digest: {:?} is not sha256:<64 hex digits>",
                self.expected_digest
            )));
        }
        if !matches!(self.format.as_str(), "" | "raw" | "qcow2") {
            return Err(ImageError::Invalid(format!(
                "format: {:?} is not raw or qcow2",
                self.format
            )));
        }
        if kind != ImageKind::Disk && self.format == "qcow2" {
            return Err(ImageError::Invalid(
                "format: only disk images may be qcow2".into(),
            ));
        }
        for key in self.labels.keys() {
            if key.is_empty() || key.len() > 63 || key.contains('=') || key.contains(',') {
                return Err(ImageError::Invalid(format!(
                    "labels.{key}: keys are 1-63 characters without '=' or ','"
                )));
            }
        }
        Ok(kind)
    }
}

/// An import in progress. Dropping it removes its temporary files.
pub struct Importer {
    header: ImportHeader,
    kind: ImageKind,
    path: PathBuf,
    file: Option<File>,
    hasher: Sha256,
    written: u64,
    head: Vec<u8>,
}

/// A verified import, ready to be filed.
pub struct Finished {
    pub record: ImageRecord,
    /// The raw content (a temporary file until the store renames it).
    pub file: TempFile,
}

/// A file removed when dropped unless it was renamed away.
pub struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl AsRef<Path> for TempFile {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn unique_tmp(dir: &Path, what: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("{what}-{}-{n}", std::process::id()))
}

/// sha256 of a whole file, as "sha256:<hex>".
pub fn file_digest(path: &Path) -> Result<String, ImageError> {
    let mut file = File::open(path).map_err(io_error(path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_error(path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex(&hasher.finalize())))
}

impl Importer {
    pub fn new(tmp_dir: &Path, header: ImportHeader) -> Result<Importer, ImageError> {
        let kind = header.validate()?;
        let path = unique_tmp(tmp_dir, "import");
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error("creating the import file"))?;
        Ok(Importer {
            header,
            kind,
            path,
            file: Some(file),
            hasher: Sha256::new(),
            written: 0,
            head: Vec::new(),
        })
    }

    pub fn header(&self) -> &ImportHeader {
        &self.header
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), ImageError> {
        if self.header.size_bytes > 0 && self.written + data.len() as u64 > self.header.size_bytes {
            return Err(ImageError::Rejected(format!(
                "more than the announced {} bytes arrived",
                self.header.size_bytes
            )));
        }
        if self.head.len() < 4 {
            let want = (4 - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..want]);
        }
        self.hasher.update(data);
        self.written += data.len() as u64;
        self.file
            .as_mut()
            .expect("open until finish")
            .write_all(data)
            .map_err(io_error("writing the import"))
    }

    /// Copies a whole file in.
    pub fn write_from(&mut self, mut source: impl Read) -> Result<(), ImageError> {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = source
                .read(&mut buf)
                .map_err(io_error("reading the image"))?;
            if n == 0 {
                return Ok(());
            }
            self.write(&buf[..n])?;
        }
    }

    /// Checks what arrived and turns it into the raw content to store.
    pub fn finish(mut self) -> Result<Finished, ImageError> {
        let file = self.file.take().expect("finished once");
        file.sync_all().map_err(io_error("syncing the import"))?;
        drop(file);
        let imported = TempFile(std::mem::take(&mut self.path));
        if self.header.size_bytes > 0 && self.written != self.header.size_bytes {
            return Err(ImageError::Rejected(format!(
                "the stream ended after {} of the announced {} bytes",
                self.written, self.header.size_bytes
            )));
        }
        if self.written == 0 {
            return Err(ImageError::Rejected("the image is empty".into()));
        }
        let source_digest = format!("sha256:{}", hex(&self.hasher.clone().finalize()));
        if !self.header.expected_digest.is_empty() && self.header.expected_digest != source_digest {
            return Err(ImageError::Rejected(format!(
                "digest mismatch: expected {}, the bytes hash to {source_digest}; nothing was stored",
                self.header.expected_digest
            )));
        }
        let qcow2 = match self.header.format.as_str() {
            "qcow2" => true,
            "raw" => false,
            _ => self.head.as_slice() == QCOW2_MAGIC,
        };
        if qcow2 && self.kind != ImageKind::Disk {
            return Err(ImageError::Rejected(
                "this is a qcow2 file; only disk images may be qcow2".into(),
            ));
        }
        let (file, digest, size_bytes) = if qcow2 {
            let raw = convert_qcow2(&imported)?;
            let digest = file_digest(raw.as_ref())?;
            let size = std::fs::metadata(&raw.0)
                .map_err(io_error("the converted image"))?
                .len();
            (raw, digest, size)
        } else {
            (imported, source_digest.clone(), self.written)
        };
        let header = &self.header;
        Ok(Finished {
            record: ImageRecord {
                name: header.name.clone(),
                kind: self.kind,
                digest,
                size_bytes,
                labels: header.labels.clone(),
                created_at_ms: berth_proto::vmm_process::now_ms(),
                source_format: if qcow2 { "qcow2" } else { "raw" }.into(),
                source_digest,
                source: header.source.clone(),
            },
            file,
        })
    }
}

impl Drop for Importer {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn qemu_img(args: &[&str]) -> Result<std::process::Output, ImageError> {
    Command::new("qemu-img").args(args).output().map_err(|e| {
        ImageError::Io(format!(
            "cannot run qemu-img (Debian package qemu-utils; ci/install-deps.sh installs it): {e}"
        ))
    })
}

/// qcow2 → sparse raw beside it. A qcow2 that names a backing or external
/// data file is refused: converting it would read that host file into the
/// image.
fn convert_qcow2(qcow2: &TempFile) -> Result<TempFile, ImageError> {
    let path = qcow2.0.to_string_lossy().into_owned();
    let info = qemu_img(&["info", "--output=json", "-f", "qcow2", &path])?;
    if !info.status.success() {
        return Err(ImageError::Rejected(format!(
            "not a valid qcow2 image: {}",
            String::from_utf8_lossy(&info.stderr).trim()
        )));
    }
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)
        .map_err(|e| ImageError::Io(format!("qemu-img info printed no JSON: {e}")))?;
    if info.get("backing-filename").is_some() || info.get("full-backing-filename").is_some() {
        return Err(ImageError::Rejected(
            "the qcow2 image names a backing file; only self-contained images are accepted".into(),
        ));
    }
    if info.pointer("/format-specific/data/data-file").is_some() {
        return Err(ImageError::Rejected(
            "the qcow2 image names an external data file; only self-contained images are accepted"
                .into(),
        ));
    }
    let raw = TempFile(qcow2.0.with_extension("raw"));
    let raw_path = raw.0.to_string_lossy().into_owned();
    let out = qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &path, &raw_path])?;
    if !out.status.success() {
        return Err(ImageError::Rejected(format!(
            "qemu-img could not convert the qcow2 image: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    File::open(&raw.0)
        .and_then(|f| f.sync_all())
        .map_err(io_error("syncing the converted image"))?;
    Ok(raw)
}
