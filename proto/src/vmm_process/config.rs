//! The VM description berth-vmm boots from: what the agent writes as
//! `vmm.json` and the VMM reads, so it is plain serde data with no
//! behaviour beyond checks.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use super::host::MIN_MEMORY_MIB;

/// One complete VM description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs, 1..=the KVM limit.
    pub vcpus: u32,
    /// Guest RAM in MiB, MIN_MEMORY_MIB..=host memory.
    pub memory_mib: u64,
    pub kernel: KernelConfig,
    #[serde(default)]
    pub serial: SerialConfig,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net interfaces, in order.
    #[serde(default)]
    pub nics: Vec<NicConfig>,
    /// How the guest finds its CPUs and devices.
    #[serde(default)]
    pub discovery: Discovery,
    /// A virtio-rng entropy device, after the disks and NICs; None: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<RngConfig>,
}

/// The entropy device: bytes handed out and requests, token-bucket limited.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    #[serde(default)]
    pub limit: LimitConfig,
}

/// How a guest learns its CPUs and virtio devices. Either one or the
/// other, never both: a kernel that reads ACPI and also takes
/// `virtio_mmio.device=` words would register every device twice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Discovery {
    /// ACPI tables (RSDP, XSDT, FADT, MADT, DSDT): what stock distribution
    /// kernels read. Their virtio-mmio devices are `LNRO0005` devices.
    #[default]
    Acpi,
    /// An MP table and one `virtio_mmio.device=` word per device on the
    /// command line, for kernels built without ACPI.
    Legacy,
}

impl Discovery {
    pub const ALL: [Discovery; 2] = [Discovery::Acpi, Discovery::Legacy];

    pub fn as_str(self) -> &'static str {
        match self {
            Discovery::Acpi => "acpi",
            Discovery::Legacy => "legacy",
        }
    }
}

impl std::fmt::Display for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Discovery {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Discovery::ALL
            .into_iter()
            .find(|d| d.as_str() == text)
            .ok_or_else(|| format!("{text:?} is not a discovery: use acpi or legacy"))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// A raw disk image file.
    pub path: PathBuf,
    /// The guest sees VIRTIO_BLK_F_RO and writes fail with IOERR.
    #[serde(default)]
    pub read_only: bool,
    /// Answer to the guest's get-id request (at most 20 bytes).
    #[serde(default)]
    pub serial: Option<String>,
    /// Token buckets for the disk's bytes and requests (both directions).
    #[serde(default)]
    pub limit: LimitConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// Tap to attach to, created if missing. Exactly one of `tap` and
    /// `tap_fd` is given.
    #[serde(default)]
    pub tap: Option<String>,
    /// An already attached tap fd inherited from the parent (opened with
    /// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).
    #[serde(default)]
    pub tap_fd: Option<i32>,
    /// "52:54:00:12:34:56"; a locally administered one derived from the
    /// interface's position when absent.
    #[serde(default)]
    pub mac: Option<String>,
    /// Token buckets for what the guest receives and what it sends.
    #[serde(default)]
    pub rx_limit: LimitConfig,
    #[serde(default)]
    pub tx_limit: LimitConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelConfig {
    /// ELF vmlinux or bzImage; the format is detected from the file.
    pub path: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line as given by the user; the VMM appends nothing it
    /// does not document.
    #[serde(default)]
    pub cmdline: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Every byte the guest writes to its console is appended here.
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// Rotate the log when it reaches this size: it becomes `<log>.1`
    /// (replacing an older one) and a new log starts. None: never.
    #[serde(default)]
    pub log_max_bytes: Option<u64>,
    /// Also copy console output to the VMM's stdout.
    #[serde(default)]
    pub stdout: bool,
    /// Where console input comes from.
    #[serde(default)]
    pub input: SerialInput,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SerialInput {
    /// The guest gets no input.
    #[default]
    None,
    /// The VMM's stdin (a pipe or a terminal).
    Stdin,
    /// A file or FIFO, read until end of file.
    Path(PathBuf),
}

/// One token bucket: `rate_per_s` tokens a second (0: unlimited), holding
/// at most `burst` (0: a tenth of a second's worth, at least 1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BucketConfig {
    pub rate_per_s: u64,
    pub burst: u64,
}

/// A device's (or a direction's) limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitConfig {
    pub bytes: BucketConfig,
    pub ops: BucketConfig,
}

impl LimitConfig {
    pub fn is_unlimited(&self) -> bool {
        self.bytes.rate_per_s == 0 && self.ops.rate_per_s == 0
    }
}

/// "52:54:00:12:34:56" as bytes; None for anything else.
/// Disks and NICs together that one VM may have: berth-vmm gives each
/// virtio device an IOAPIC line of its own, and lines 5 to 23 are free.
pub const MAX_DEVICES: usize = 19;

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read VM config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid VM config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("vcpus must be at least 1, got 0")]
    NoVcpus,
    #[error("memory_mib {0} is below the minimum of {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(u64),
    #[error("nics[{0}]: give exactly one of tap and tap_fd")]
    NicBackend(usize),
    #[error("nics[{index}].mac {mac:?} is not a MAC address like 52:54:00:12:34:56")]
    NicMac { index: usize, mac: String },
}

impl VmConfig {
    /// Reads a config file: `.toml` as TOML, anything else as JSON.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parsed = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).map_err(|e| e.to_string())
        } else {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        };
        parsed.map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Checks what can be checked without the host; host limits (KVM's vCPU
    /// maximum, host memory) are checked by the builder.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall(self.memory_mib));
        }
        for (index, nic) in self.nics.iter().enumerate() {
            if nic.tap.is_some() == nic.tap_fd.is_some() {
                return Err(ConfigError::NicBackend(index));
            }
            if let Some(mac) = &nic.mac {
                if parse_mac(mac).is_none() {
                    return Err(ConfigError::NicMac {
                        index,
                        mac: mac.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_tmp(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("berth-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn toml_and_json_describe_the_same_vm() {
        let toml = write_tmp(
            "vm.toml",
            "vcpus = 2\nmemory_mib = 64\n[kernel]\npath = \"/k\"\ncmdline = \"a=b\"\n[serial]\nstdout = true\ninput = \"stdin\"\n",
        );
        let json = write_tmp(
            "vm.json",
            r#"{"vcpus":2,"memory_mib":64,"kernel":{"path":"/k","cmdline":"a=b"},"serial":{"stdout":true,"input":"stdin"}}"#,
        );
        let a = VmConfig::from_file(&toml).unwrap();
        let b = VmConfig::from_file(&json).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.vcpus, 2);
        assert_eq!(a.serial.input, SerialInput::Stdin);
        assert_eq!(
            a.discovery,
            Discovery::Acpi,
            "ACPI unless a config says otherwise"
        );
    }

    #[test]
    fn discovery_reads_from_both_formats_and_refuses_anything_else() {
        let toml = write_tmp(
            "legacy.toml",
            "vcpus = 1\nmemory_mib = 64\ndiscovery = \"legacy\"\n[kernel]\npath = \"/k\"\n",
        );
        assert_eq!(
            VmConfig::from_file(&toml).unwrap().discovery,
            Discovery::Legacy
        );
        let json = write_tmp(
            "bios.json",
            r#"{"vcpus":1,"memory_mib":64,"kernel":{"path":"/k"},"discovery":"bios"}"#,
        );
        let err = VmConfig::from_file(&json).unwrap_err().to_string();
        assert!(err.contains("unknown variant `bios`"), "{err}");
        assert_eq!("acpi".parse(), Ok(Discovery::Acpi));
        assert!("ACPI".parse::<Discovery>().is_err());
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let path = write_tmp(
            "bad.json",
            r#"{"vcpus":1,"memory_mib":64,"kernel":{"path":"/k"},"vcpu":3}"#,
        );
        let err = VmConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field `vcpu`"), "{err}");
    }

    #[test]
    fn zero_vcpus_and_tiny_memory_are_refused() {
        let mut cfg = VmConfig {
            vcpus: 0,
            memory_mib: 64,
            kernel: KernelConfig {
                path: "/k".into(),
                initrd: None,
                cmdline: String::new(),
            },
            serial: SerialConfig::default(),
            disks: Vec::new(),
            nics: Vec::new(),
            discovery: Discovery::default(),
            rng: None,
        };
        assert!(matches!(cfg.validate(), Err(ConfigError::NoVcpus)));
        cfg.vcpus = 1;
        cfg.memory_mib = 16;
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::MemoryTooSmall(16))
        ));
        cfg.memory_mib = 32;
        cfg.validate().unwrap();
    }

    #[test]
    fn nics_need_one_backend_and_a_real_mac() {
        let path = write_tmp(
            "nics.toml",
            "vcpus = 1\nmemory_mib = 64\n[kernel]\npath = \"/k\"\n[[nics]]\ntap = \"t0\"\ntap_fd = 3\n",
        );
        let cfg = VmConfig::from_file(&path).unwrap();
        assert!(matches!(cfg.validate(), Err(ConfigError::NicBackend(0))));
        let path = write_tmp(
            "mac.toml",
            "vcpus = 1\nmemory_mib = 64\n[kernel]\npath = \"/k\"\n[[disks]]\npath = \"/d\"\nread_only = true\n[[nics]]\ntap = \"t0\"\nmac = \"52:54:00\"\n",
        );
        let cfg = VmConfig::from_file(&path).unwrap();
        assert!(cfg.disks[0].read_only);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("nics[0].mac"), "{err}");
    }
}
