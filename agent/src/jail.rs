//! How the agent jails each VMM (docs/security.md): a uid/gid of its own
//! from the configured range, the files it may read and write, its taps.
//! berth-vmm does the jailing itself from these flags; the agent makes sure
//! every file the VMM writes belongs to that uid.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use berth_proto::vmm_process::launch::VmmArgs;

pub use crate::config::JailSettings;
use crate::store::VmDir;

/// What one VMM's jail holds.
#[derive(Debug, Default)]
pub struct JailPlan {
    pub uid: u32,
    pub read_only: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
    pub taps: Vec<String>,
}

impl JailPlan {
    /// Gives the VMM's run and snapshot directories, its log and its
    /// writable files to its uid, and makes the jail root.
    pub fn prepare(&self, dir: &VmDir) -> std::io::Result<()> {
        let root = dir.jail_root();
        std::fs::create_dir_all(&root)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
        for owned in [dir.run(), dir.snapshots()] {
            std::fs::create_dir_all(&owned)?;
            chown_tree(&owned, self.uid)?;
            std::fs::set_permissions(&owned, std::fs::Permissions::from_mode(0o750))?;
        }
        if dir.vmm_log().exists() {
            chown(&dir.vmm_log(), self.uid)?;
        }
        for path in &self.read_write {
            if path.is_file() {
                chown(path, self.uid)?;
            }
        }
        Ok(())
    }

    /// Sets the jail flags of a VMM's launch.
    pub fn add_args(&self, args: &mut VmmArgs, dir: &VmDir, settings: &JailSettings) {
        args.jail_root = Some(dir.jail_root());
        args.jail_uid = Some(self.uid);
        args.jail_gid = Some(self.uid);
        args.jail_max_open_files = settings.max_open_files;
        args.jail_core_dumps = settings.core_dumps;
        args.jail_ro = self.read_only.clone();
        args.jail_rw = self.read_write.clone();
        args.jail_taps = self.taps.clone();
    }
}

fn chown(path: &Path, uid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid))
}

/// Chowns `dir` and everything under it, following no symlinks.
fn chown_tree(dir: &Path, uid: u32) -> std::io::Result<()> {
    chown(dir, uid)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            chown_tree(&entry?.path(), uid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_come_from_the_range_lowest_free_first() {
        let s = JailSettings {
            first_uid: 1000,
            uid_count: 3,
            ..Default::default()
        };
        assert_eq!(s.free_uid(&[]), Some(1000));
        assert_eq!(s.free_uid(&[1000, 1002]), Some(1001));
        assert_eq!(s.free_uid(&[1000, 1001, 1002]), None);
        assert!(s.owns_uid(1002) && !s.owns_uid(1003) && !s.owns_uid(999));
        let bad = JailSettings {
            first_uid: u32::MAX,
            uid_count: 2,
            ..Default::default()
        };
        assert!(bad.check().is_err());
    }
}
