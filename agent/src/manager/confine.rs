//! Each VMM's confinement, decided at every start: its paths resolved and
//! checked against the roots again (the files may have changed since the
//! spec was accepted), its uid, and what its jail holds.

use std::path::Path;
use std::sync::Arc;

use berth_proto::vmm_process::config::VmConfig;

use super::error::{ApiError, ApiResult};
use super::registry::VmEntry;
use super::Manager;
use crate::jail::JailPlan;
use crate::spec::{resolve_in_roots, VmSpec};
use crate::vmm_proc::Confinement;
use berth_proto::vmm_process::files::write_atomic;

impl Manager {
    /// Rewrites `config`'s paths to what they resolve to now (the jail
    /// mounts exactly those, and the VMM opens them refusing symlinks) and
    /// plans the jail. `snapshot`: a snapshot directory to restore from;
    /// `taps`: the tap names the VMM will attach.
    pub(super) fn confine(
        &self,
        entry: &Arc<VmEntry>,
        spec: &VmSpec,
        config: &mut VmConfig,
        snapshot: Option<&Path>,
        taps: Vec<String>,
    ) -> ApiResult<Confinement<'_>> {
        let settings = &self.config.jail;
        if !settings.seccomp {
            tracing::warn!(vm = %spec.id, "SECCOMP IS OFF for this VMM (jail.seccomp = false): debugging only");
        }
        let recheck = |field: &str, path: &Path, roots: &[std::path::PathBuf]| {
            resolve_in_roots(field, path, roots)
                .map_err(|e| ApiError::FailedPrecondition(format!("{e} (checked again at start)")))
        };
        let kernel = &spec.kernel;
        config.kernel.path = if kernel.from_disk {
            Default::default() // set from disk 0 below
        } else if kernel.image.is_empty() {
            recheck("kernel.path", &kernel.path, &self.config.kernel_roots)?
        } else {
            self.image_file("kernel.image", &kernel.image)?.1
        };
        if let Some(initrd) = &kernel.initrd {
            config.kernel.initrd =
                Some(recheck("kernel.initrd", initrd, &self.config.kernel_roots)?);
        } else if !kernel.initrd_image.is_empty() {
            config.kernel.initrd = Some(
                self.image_file("kernel.initrd_image", &kernel.initrd_image)?
                    .1,
            );
        }
        for (i, (disk, spec_disk)) in config.disks.iter_mut().zip(&spec.disks).enumerate() {
            disk.path = if spec_disk.image.is_empty() {
                recheck(
                    &format!("disks[{i}].path"),
                    &spec_disk.path,
                    &self.config.disk_roots,
                )?
            } else if spec_disk.read_only {
                self.image_file(&format!("disks[{i}].image"), &spec_disk.image)?
                    .1
            } else {
                self.disk_copy(entry, i, &spec_disk.image)?
            };
        }
        if kernel.from_disk {
            boot_from_disk(entry, config)?;
        }
        if !settings.enabled {
            tracing::warn!(vm = %spec.id, "JAIL IS OFF for this VMM (jail.enabled = false): it runs as root with the host's files in reach; debugging only");
            return Ok(Confinement {
                jail: None,
                settings,
            });
        }
        let uid = self.jail_uid(entry)?;
        let mut plan = JailPlan {
            uid,
            read_only: vec![config.kernel.path.clone()],
            read_write: vec![entry.dir.run(), entry.dir.snapshots()],
            taps,
        };
        plan.read_only.extend(config.kernel.initrd.clone());
        for disk in &config.disks {
            if disk.read_only {
                plan.read_only.push(disk.path.clone());
            } else {
                plan.read_write.push(disk.path.clone());
            }
        }
        if let Some(dir) = snapshot {
            let dir = std::fs::canonicalize(dir)
                .map_err(|e| ApiError::FailedPrecondition(format!("{}: {e}", dir.display())))?;
            // A VM's own snapshots are already writable in its jail.
            if !dir.starts_with(entry.dir.snapshots()) {
                plan.read_only.push(dir);
            }
        }
        Ok(Confinement {
            jail: Some(plan),
            settings,
        })
    }

    /// The VM's jail uid: the one it had, else the lowest free one.
    fn jail_uid(&self, entry: &Arc<VmEntry>) -> ApiResult<u32> {
        self.registry.claim_jail_uid(entry, &self.config.jail)
    }
}

/// Reads the kernel and initrd off disk 0 (as resolved: the VM's own copy
/// of an image) into the VM's directory and points `config` at them,
/// adding `root=PARTUUID=` unless the command line names a root.
fn boot_from_disk(entry: &VmEntry, config: &mut VmConfig) -> ApiResult<()> {
    let disk = config
        .disks
        .first()
        .map(|d| d.path.clone())
        .ok_or_else(|| {
            ApiError::FailedPrecondition("kernel.from_disk: the VM has no disk 0".into())
        })?;
    let refused = |e: &dyn std::fmt::Display| {
        ApiError::FailedPrecondition(format!(
            "kernel.from_disk: disks[0] ({}): {e}",
            disk.display()
        ))
    };
    let boot = crate::images::boot_files::find(&disk).map_err(|e| refused(&e))?;
    let dir = entry.dir.boot_files();
    let write = |name: &str, bytes: &[u8]| {
        std::fs::create_dir_all(&dir)
            .and_then(|()| write_atomic(&dir.join(name), bytes))
            .map(|()| dir.join(name))
            .map_err(|e| {
                ApiError::Internal(format!("cannot write {}: {e}", dir.join(name).display()))
            })
    };
    config.kernel.path = write("vmlinuz", &boot.kernel)?;
    config.kernel.initrd = match &boot.initrd {
        Some(bytes) => Some(write("initrd.img", bytes)?),
        None => None,
    };
    let names_root = config
        .kernel
        .cmdline
        .split_whitespace()
        .any(|w| w.starts_with("root="));
    if !names_root {
        let root = format!("root=PARTUUID={}", boot.partuuid);
        config.kernel.cmdline = [config.kernel.cmdline.trim(), &root]
            .join(" ")
            .trim()
            .to_string();
    }
    tracing::info!(dir = %entry.dir.0.display(), partition = boot.partition, kernel = %boot.kernel_path, "booting the kernel on disk 0");
    Ok(())
}
