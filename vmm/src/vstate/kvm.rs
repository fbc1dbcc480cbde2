//! Opening /dev/kvm and telling which KVM it is: hardware (VT-x / AMD-V) or
//! the software PVM of some nested hosts, where stock Linux cannot boot.

use std::fmt;
use std::path::Path;

use kvm_ioctls::Kvm;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Intel,
    Amd,
    Pvm,
    Unknown,
}

impl Flavour {
    /// Which KVM module is loaded, looked up once: a jailed VMM no longer
    /// sees /sys, so the jail asks before it enters.
    pub fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Flavour> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(Flavour::probe_sysfs)
    }

    fn probe_sysfs() -> Self {
        let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
        if loaded("kvm_pvm") {
            Flavour::Pvm
        } else if loaded("kvm_intel") {
            Flavour::Intel
        } else if loaded("kvm_amd") {
            Flavour::Amd
        } else {
            Flavour::Unknown
        }
    }

    pub fn is_hardware(self) -> bool {
        matches!(self, Flavour::Intel | Flavour::Amd)
    }
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavour::Intel => "hardware (kvm_intel)",
            Flavour::Amd => "hardware (kvm_amd)",
            Flavour::Pvm => "software (kvm_pvm)",
            Flavour::Unknown => "unknown",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KvmOpenError {
    #[error("{path} does not exist: this host has no KVM (load kvm_intel or kvm_amd)")]
    Missing { path: String },
    #[error("permission denied opening {path}: run as root or as a member of the kvm group")]
    Denied { path: String },
    #[error("cannot open {path}: {source}")]
    Other {
        path: String,
        source: kvm_ioctls::Error,
    },
}

pub fn open(path: &Path) -> Result<Kvm, KvmOpenError> {
    let display = path.display().to_string();
    let c_path = std::ffi::CString::new(display.clone()).map_err(|_| KvmOpenError::Missing {
        path: display.clone(),
    })?;
    Kvm::new_with_path(&c_path).map_err(|source| match source.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => KvmOpenError::Missing { path: display },
        libc::EACCES | libc::EPERM => KvmOpenError::Denied { path: display },
        _ => KvmOpenError::Other {
            path: display,
            source,
        },
    })
}
