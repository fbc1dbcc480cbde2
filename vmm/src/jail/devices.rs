//! The jail's /dev and /proc: device nodes recreated for the VMM's uid, and
//! a /proc that shows the VMM nothing but its own process.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::stat::{mknod, Mode, SFlag};
use nix::unistd::{chown, Gid, Uid};

use super::{at, io_at, JailError};

/// Makes the character device `device` (its host major and minor) at the
/// same path in the jail, readable and writable by `uid` alone.
pub fn recreate(root: &Path, device: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    let meta = std::fs::metadata(device).map_err(|e| io_at("cannot stat", device, e))?;
    if !meta.file_type().is_char_device() {
        return Err(JailError::Invalid(format!(
            "{} is not a character device",
            device.display()
        )));
    }
    let target = root.join(device.strip_prefix("/").unwrap_or(device));
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_at("cannot create", parent, e))?;
    }
    mknod(
        &target,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        meta.rdev(),
    )
    .map_err(at("cannot create the device node", &target))?;
    chown(&target, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .map_err(at("cannot chown", &target))
}

/// A private view of /proc: `subset=pid` hides everything but the process
/// directories, `hidepid=invisible` every process not the VMM's own uid.
pub fn mount_proc(root: &Path) -> Result<(), JailError> {
    let target = root.join("proc");
    std::fs::create_dir_all(&target).map_err(|e| io_at("cannot create", &target, e))?;
    mount(
        Some("proc"),
        &target,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("hidepid=invisible,subset=pid"),
    )
    .map_err(at("cannot mount proc on", &target))
}
