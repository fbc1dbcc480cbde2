//! Facts about the host that both processes need. What needs KVM to find
//! out (which KVM, how many vCPUs it allows) only berth-vmm knows: the
//! agent asks it with `berth-vmm --host-info`, which prints one
//! [`HostInfo`] as JSON. What /proc tells anyone is read here, once: a
//! jailed VMM no longer sees /proc, so the jail reads these before it
//! enters.

use std::fmt;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// Which KVM this host has: hardware (VT-x, AMD-V) or the software PVM of
/// some nested hosts, where stock Linux cannot boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flavour {
    Intel,
    Amd,
    Pvm,
    #[default]
    Unknown,
}

impl Flavour {
    pub fn is_hardware(self) -> bool {
        matches!(self, Flavour::Intel | Flavour::Amd)
    }

    /// The hypervisor kind and KVM module, as the node's capacity reports
    /// them: ("hardware", "kvm_intel"), ("pvm", "kvm_pvm"), ...
    pub fn kind_and_module(self) -> (&'static str, &'static str) {
        match self {
            Flavour::Intel => ("hardware", "kvm_intel"),
            Flavour::Amd => ("hardware", "kvm_amd"),
            Flavour::Pvm => ("pvm", "kvm_pvm"),
            Flavour::Unknown => ("unknown", ""),
        }
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

/// What `berth-vmm --host-info` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostInfo {
    pub flavour: Flavour,
    /// The most vCPUs one guest may have here: KVM's limit, capped by what
    /// the VMM's boot tables describe. 0 when KVM cannot be opened.
    pub max_vcpus: u32,
    /// Why KVM cannot be used, when it cannot.
    #[serde(default)]
    pub kvm_error: Option<String>,
}

/// Smallest guest the boot layout fits comfortably (page tables, zero page,
/// MP table, a kernel at 1 MiB and an initrd).
pub const MIN_MEMORY_MIB: u64 = 32;

/// /proc/cpuinfo, read once.
pub fn cpuinfo() -> &'static str {
    static CPUINFO: OnceLock<String> = OnceLock::new();
    CPUINFO.get_or_init(|| std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
}

/// Field `key` of the first CPU in /proc/cpuinfo ("" when absent).
pub fn cpuinfo_field(key: &str) -> String {
    field_of(cpuinfo(), key)
}

fn field_of(cpuinfo: &str, key: &str) -> String {
    cpuinfo
        .lines()
        .find(|l| l.split(':').next().map(str::trim) == Some(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default()
}

/// The host CPU's vendor string (GenuineIntel, AuthenticAMD).
pub fn cpu_vendor() -> String {
    cpuinfo_field("vendor_id")
}

/// The host CPU's model name.
pub fn cpu_model() -> String {
    cpuinfo_field("model name")
}

/// Host RAM in MiB from /proc/meminfo, read once; None if unreadable.
pub fn memory_mib() -> Option<u64> {
    static MIB: OnceLock<Option<u64>> = OnceLock::new();
    *MIB.get_or_init(|| {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_fields_are_found_by_their_whole_key() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nmodel\t\t: 1\n";
        assert_eq!(field_of(info, "vendor_id"), "AuthenticAMD");
        assert_eq!(field_of(info, "model name"), "AMD EPYC 7B13");
        assert_eq!(field_of(info, "model"), "1");
        assert_eq!(field_of(info, "flags"), "");
    }

    #[test]
    fn host_info_reads_back_and_names_its_flavour() {
        let info = HostInfo {
            flavour: Flavour::Pvm,
            max_vcpus: 32,
            kvm_error: None,
        };
        let json = serde_json::to_string(&info).unwrap();
        assert!(json.contains("\"pvm\""), "{json}");
        assert_eq!(serde_json::from_str::<HostInfo>(&json).unwrap(), info);
        assert_eq!(Flavour::Amd.kind_and_module(), ("hardware", "kvm_amd"));
    }
}
