//! Opening /dev/kvm and telling which KVM it is: hardware (VT-x / AMD-V) or
//! the software PVM of some nested hosts, where stock Linux cannot boot.

use std::path::Path;

pub use berth_proto::vmm_process::host::{Flavour, HostInfo};
use kvm_ioctls::Kvm;

/// Which KVM module is loaded, looked up once: a jailed VMM no longer
/// sees /sys, so the jail asks before it enters.
pub fn detect_flavour() -> Flavour {
    static DETECTED: std::sync::OnceLock<Flavour> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| {
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
    })
}

/// What `berth-vmm --host-info` prints: the flavour, and how many vCPUs a
/// guest may have (KVM's limit, capped by what an MP table describes).
pub fn host_info(device: &Path) -> HostInfo {
    let flavour = detect_flavour();
    match open(device) {
        Ok(kvm) => HostInfo {
            flavour,
            max_vcpus: (kvm.get_max_vcpus() as u32).min(crate::arch::x86_64::mptable::MAX_CPUS),
            kvm_error: None,
        },
        Err(e) => HostInfo {
            flavour,
            max_vcpus: 0,
            kvm_error: Some(e.to_string()),
        },
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
