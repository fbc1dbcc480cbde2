//! Where the image store meets the VMs: a spec's image references are
//! checked at Create and Start, resolved to files at every start, and
//! writable disks get a copy of their own.

use std::path::PathBuf;
use std::sync::Arc;

use super::error::{internal, ApiError, ApiResult};
use super::registry::{lock, VmEntry};
use super::Manager;
use crate::images::{copy_for_vm, ImageError, ImageRecord};
use crate::spec::VmSpec;
use crate::store::DiskCopy;

pub fn image_error(e: ImageError) -> ApiError {
    match e {
        ImageError::Invalid(m) | ImageError::Rejected(m) => ApiError::InvalidArgument(m),
        ImageError::NotFound(m) => ApiError::NotFound(m),
        ImageError::AlreadyExists(m) => ApiError::AlreadyExists(m),
        ImageError::InUse(m) => ApiError::FailedPrecondition(m),
        ImageError::Io(m) => ApiError::Internal(m),
    }
}

impl Manager {
    /// Every image the spec names exists and is of the right kind.
    pub(super) fn check_images(&self, spec: &VmSpec) -> ApiResult<()> {
        for (field, reference, kind) in spec.image_refs() {
            let image = self
                .images
                .get(reference)
                .map_err(|e| ApiError::InvalidArgument(format!("{field}: {e}")))?;
            if image.kind != kind {
                return Err(ApiError::InvalidArgument(format!(
                    "{field}: image {:?} is a {} image, not a {} image",
                    image.name,
                    image.kind.name(),
                    kind.name()
                )));
            }
        }
        Ok(())
    }

    /// The image a spec's reference means now, and its file.
    pub(super) fn image_file(
        &self,
        field: &str,
        reference: &str,
    ) -> ApiResult<(ImageRecord, PathBuf)> {
        let image = self.images.get(reference).map_err(|e| {
            ApiError::FailedPrecondition(format!("{field}: {e} (checked again at start)"))
        })?;
        let path = self.images.blob_path(&image.digest);
        Ok((image, path))
    }

    /// The VMs whose specs name `image` (by its name, or by its digest when
    /// no other name in `store`, the store's records, holds that content).
    pub fn image_users(&self, image: &ImageRecord, store: &[ImageRecord]) -> Vec<String> {
        let sole_holder = store.iter().filter(|r| r.digest == image.digest).count() == 1;
        self.registry
            .entries()
            .iter()
            .filter_map(|e| {
                let spec = &lock(&e.inner).spec;
                let uses = spec
                    .image_refs()
                    .iter()
                    .any(|(_, r, _)| *r == image.name || (sole_holder && *r == image.digest));
                uses.then(|| spec.id.clone())
            })
            .collect()
    }

    /// The VMs' copies made from `image`: "<vm> disks[<i>] <method>".
    pub fn image_copies(&self, image: &ImageRecord) -> Vec<String> {
        self.registry
            .entries()
            .iter()
            .flat_map(|e| {
                let inner = lock(&e.inner);
                let id = inner.spec.id.clone();
                inner
                    .record
                    .disk_copies
                    .iter()
                    .filter(|c| c.digest == image.digest)
                    .map(|c| format!("{id} disks[{}] {}", c.disk, c.method))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Disk `index`'s own copy of `reference`, made now if the VM has none
    /// of that image yet. The copy stays with the VM (its data) until the
    /// VM is deleted or its spec names another image for that disk.
    pub(super) fn disk_copy(
        &self,
        entry: &Arc<VmEntry>,
        index: usize,
        reference: &str,
    ) -> ApiResult<PathBuf> {
        let existing = lock(&entry.inner)
            .record
            .disk_copies
            .iter()
            .find(|c| c.disk as usize == index)
            .cloned();
        if let Some(copy) = &existing {
            if copy.image == reference && copy.path.is_file() {
                return Ok(copy.path.clone());
            }
        }
        let field = format!("disks[{index}].image");
        let (image, blob) = self.image_file(&field, reference)?;
        std::fs::create_dir_all(entry.dir.disks()).map_err(internal)?;
        let path = entry.dir.disks().join(format!("disk{index}.raw"));
        if let Some(old) = &existing {
            let why = if old.image == reference {
                "its copy is gone: a new one is made from the image"
            } else {
                "the disk now names another image: its old copy is replaced"
            };
            tracing::warn!(disk = index, image = reference, "{why}");
            let _ = std::fs::remove_file(&path);
        }
        let method = copy_for_vm(&blob, &path).map_err(image_error)?;
        let copy = DiskCopy {
            disk: index as u32,
            image: reference.to_string(),
            digest: image.digest,
            path: path.clone(),
            method: method.name().into(),
        };
        let mut inner = lock(&entry.inner);
        inner
            .record
            .disk_copies
            .retain(|c| c.disk as usize != index);
        inner.record.disk_copies.push(copy);
        inner.record.disk_copies.sort_by_key(|c| c.disk);
        self.registry.save(entry, &inner)?;
        Ok(path)
    }
}
