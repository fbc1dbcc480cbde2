//! Names the other modules share and that depend on nothing: what kind of
//! file an image reference names, and what a content digest looks like.
//! Both the VM document (`spec`) and the image store (`images`) use them, so
//! they sit below both.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageKind {
    Kernel,
    Initrd,
    Disk,
}

impl ImageKind {
    pub fn parse(s: &str) -> Result<Self, UnknownImageKind> {
        match s {
            "kernel" => Ok(ImageKind::Kernel),
            "initrd" => Ok(ImageKind::Initrd),
            "disk" => Ok(ImageKind::Disk),
            other => Err(UnknownImageKind(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Kernel => "kernel",
            ImageKind::Initrd => "initrd",
            ImageKind::Disk => "disk",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("kind: {0:?} is not kernel, initrd or disk")]
pub struct UnknownImageKind(pub String);

/// "sha256:<64 lowercase hex>".
pub fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}
