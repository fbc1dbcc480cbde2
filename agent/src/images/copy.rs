//! A VM's own writable copy of a disk image: a reflink where the
//! filesystem shares blocks (btrfs, xfs), else a sparse copy that skips
//! the image's zero blocks.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use super::{io_error, ImageError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMethod {
    Reflink,
    SparseCopy,
}

impl CopyMethod {
    pub fn name(self) -> &'static str {
        match self {
            CopyMethod::Reflink => "reflink",
            CopyMethod::SparseCopy => "sparse-copy",
        }
    }
}

const BLOCK: usize = 64 << 10;

/// Makes `dest` (which must not exist) a copy of `image`, written to a
/// temporary name first so a cut-off copy is never taken for a disk.
pub fn copy_for_vm(image: &Path, dest: &Path) -> Result<CopyMethod, ImageError> {
    let tmp = dest.with_extension("copying");
    let _ = std::fs::remove_file(&tmp);
    let result = reflink(image, &tmp).and_then(|linked| {
        if linked {
            Ok(CopyMethod::Reflink)
        } else {
            sparse_copy(image, &tmp).map(|()| CopyMethod::SparseCopy)
        }
    });
    let method = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    // The store keeps blobs read-only; the copy is the VM's to write.
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(io_error("the disk copy"))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_error("syncing the disk copy"))?;
    std::fs::rename(&tmp, dest).map_err(io_error("the disk copy"))?;
    Ok(method)
}

/// `cp --reflink=always`: true if the filesystem shared the blocks, false
/// if it cannot.
fn reflink(image: &Path, dest: &Path) -> Result<bool, ImageError> {
    let out = Command::new("cp")
        .arg("--reflink=always")
        .arg(image)
        .arg(dest)
        .output()
        .map_err(io_error("running cp"))?;
    if out.status.success() {
        return Ok(true);
    }
    let _ = std::fs::remove_file(dest);
    Ok(false)
}

fn sparse_copy(image: &Path, dest: &Path) -> Result<(), ImageError> {
    let mut src = File::open(image).map_err(io_error(image.display()))?;
    let len = src.metadata().map_err(io_error(image.display()))?.len();
    let mut out = File::options()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(io_error(dest.display()))?;
    let mut buf = vec![0u8; BLOCK];
    let mut offset = 0u64;
    while offset < len {
        let want = (len - offset).min(BLOCK as u64) as usize;
        src.read_exact(&mut buf[..want])
            .map_err(io_error(image.display()))?;
        if buf[..want].iter().any(|&b| b != 0) {
            out.seek(SeekFrom::Start(offset))
                .and_then(|_| out.write_all(&buf[..want]))
                .map_err(io_error(dest.display()))?;
        }
        offset += want as u64;
    }
    out.set_len(len).map_err(io_error(dest.display()))?;
    Ok(())
}
