//! The VM document in plain Rust: what `nodectl create -f vm.toml` reads,
//! what the agent stores as spec.json, and what the ttrpc VmSpec converts to
//! at the edge. Validation names the field that is wrong.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use berth_proto::vmm_process::device::{Direction, LimiterId};
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;

pub const MIN_MEMORY_MIB: u64 = 32;
pub const DEFAULT_CPU_WEIGHT: u32 = 100;
pub const DEFAULT_MAX_RETRIES: u32 = 3;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: Kernel,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub nics: Vec<Nic>,
    #[serde(default)]
    pub cpu: CpuPolicy,
    #[serde(default)]
    pub memory: MemoryPolicy,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// What cloud-init gets on first boot; None: no seed disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<crate::cloud_init::CloudInit>,
    /// A virtio-rng entropy device; None: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<Rng>,
}

/// The entropy device, with its limit on the bytes and requests it serves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rng {
    #[serde(default)]
    pub limit: RateLimit,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    /// A file in the kernel roots, or empty with `image`.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub path: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub cmdline: String,
    /// A kernel from the image store (name or digest) instead of `path`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    /// An initrd from the image store instead of `initrd`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub initrd_image: String,
    /// How the guest finds its CPUs and devices (ACPI unless the kernel
    /// has none).
    #[serde(default)]
    pub discovery: berth_proto::vmm_process::config::Discovery,
    /// Boot the kernel and initrd found on disk 0's root partition (read
    /// at every Start, so a kernel the guest upgraded is the next one);
    /// `root=PARTUUID=<that partition>` is added unless the command line
    /// names a root. Instead of path/image.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_disk: bool,
}

fn path_is_empty(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// A raw file in the disk roots, or empty with `image`.
    #[serde(default, skip_serializing_if = "path_is_empty")]
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub serial: String,
    /// A disk image from the image store (name or digest) instead of
    /// `path`; a writable disk gets a copy of its own at the first Start.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    /// The disk's I/O limits (reads and writes together).
    #[serde(default, skip_serializing_if = "RateLimit::is_unlimited")]
    pub limit: RateLimit,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub tap: String,
    #[serde(default)]
    pub bridge: String,
    #[serde(default)]
    pub mac: String,
    /// Limits on what the guest receives, and on what it sends.
    #[serde(default, skip_serializing_if = "RateLimit::is_unlimited")]
    pub rx_limit: RateLimit,
    #[serde(default, skip_serializing_if = "RateLimit::is_unlimited")]
    pub tx_limit: RateLimit,
}

/// Token buckets: 0 rates are unlimited, a 0 burst is a tenth of a
/// second's worth. Changeable on a running VM with Update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimit {
    pub bytes_per_s: u64,
    pub bytes_burst: u64,
    pub ops_per_s: u64,
    pub ops_burst: u64,
}

impl RateLimit {
    pub fn is_unlimited(&self) -> bool {
        *self == RateLimit::default()
    }

    pub fn to_vmm(self) -> berth_proto::vmm_process::config::LimitConfig {
        use berth_proto::vmm_process::config::{BucketConfig, LimitConfig};
        LimitConfig {
            bytes: BucketConfig {
                rate_per_s: self.bytes_per_s,
                burst: self.bytes_burst,
            },
            ops: BucketConfig {
                rate_per_s: self.ops_per_s,
                burst: self.ops_burst,
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CpuPolicy {
    pub weight: u32,
    /// CPUs (0.5 = half a CPU); 0 = unbounded.
    pub max: f64,
    pub cpuset: String,
}

impl Default for CpuPolicy {
    fn default() -> Self {
        CpuPolicy {
            weight: DEFAULT_CPU_WEIGHT,
            max: 0.0,
            cpuset: String::new(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryPolicy {
    pub overhead_mib: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartKind {
    #[default]
    Never,
    OnFailure,
    Always,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartPolicy {
    pub kind: RestartKind,
    pub max_retries: u32,
    /// What the guest's own reboot does (whatever `kind` says).
    pub on_reboot: OnReboot,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            kind: RestartKind::Never,
            max_retries: DEFAULT_MAX_RETRIES,
            on_reboot: OnReboot::Restart,
        }
    }
}

/// A guest's `reboot` ends its VMM (a reset, like Firecracker's); the
/// agent then brings the machine back, or leaves it Stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnReboot {
    #[default]
    Restart,
    Stop,
}

/// A spec problem, reported as INVALID_ARGUMENT "<field>: <message>".
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
    }
}

/// ids and names: 1-63 of [a-z0-9-], not starting with '-'.
pub fn check_name(field: &str, value: &str) -> Result<(), SpecError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && !value.starts_with('-')
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(err(
            field,
            format!("{value:?} must be 1-63 characters of a-z, 0-9 and '-', not starting with '-'"),
        ))
    }
}

/// Resolves `path` (following every symlink) and requires it inside one of
/// `roots`, so a spec cannot reach /etc/shadow or climb out with `..`.
pub fn resolve_in_roots(field: &str, path: &Path, roots: &[PathBuf]) -> Result<PathBuf, SpecError> {
    if !path.is_absolute() {
        return Err(err(
            field,
            format!("{} is not an absolute path", path.display()),
        ));
    }
    let outside = || {
        let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        err(
            field,
            format!(
                "{} is outside the allowed roots [{}]",
                path.display(),
                roots.join(", ")
            ),
        )
    };
    let real_roots: Vec<PathBuf> = roots
        .iter()
        .filter_map(|root| std::fs::canonicalize(root).ok())
        .collect();
    let real = match std::fs::canonicalize(path) {
        Ok(real) => real,
        // Only a path that is plainly inside a root may say why it cannot
        // be opened: for any other, "no such file" against "outside" would
        // tell a caller which host paths exist.
        Err(e) => {
            let plainly_inside = !path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
                && roots
                    .iter()
                    .chain(&real_roots)
                    .any(|root| path.starts_with(root));
            return Err(if plainly_inside {
                err(field, format!("{}: {e}", path.display()))
            } else {
                outside()
            });
        }
    };
    // The resolved path is not named either: it would show where a
    // symlink outside the roots points.
    if !real_roots.iter().any(|root| real.starts_with(root)) {
        return Err(outside());
    }
    if !real.is_file() {
        return Err(err(
            field,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(real)
}

/// A file given either as a path or as an image: exactly one of them when
/// `required`, else at most one; an image reference must be a name or a
/// digest.
fn check_source(
    field: &str,
    path_field: &str,
    image_field: &str,
    path: Option<&Path>,
    image: &str,
    required: bool,
) -> Result<(), SpecError> {
    let has_path = path.is_some_and(|p| !path_is_empty(p));
    match (has_path, image.is_empty()) {
        (true, false) => Err(err(
            format!("{field}.{image_field}"),
            format!("give {path_field} or {image_field}, not both"),
        )),
        (false, true) if required => Err(err(
            format!("{field}.{path_field}"),
            format!("one of {path_field} and {image_field} is needed"),
        )),
        (false, false) if !crate::names::is_digest(image) => {
            check_name(&format!("{field}.{image_field}"), image)
        }
        _ => Ok(()),
    }
}

impl VmSpec {
    /// Every device's limits, by the limiter the VMM knows them as.
    pub fn rate_limits(&self) -> Vec<(LimiterId, RateLimit)> {
        let mut out = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            out.push((LimiterId::disk(i), d.limit));
        }
        for (i, n) in self.nics.iter().enumerate() {
            out.push((LimiterId::nic(i, Direction::Rx), n.rx_limit));
            out.push((LimiterId::nic(i, Direction::Tx), n.tx_limit));
        }
        if let Some(rng) = &self.rng {
            out.push((LimiterId::rng(), rng.limit));
        }
        out
    }

    /// The same spec with every rate limit taken from `other` (to compare
    /// what else differs).
    pub fn with_limits_of(&self, other: &VmSpec) -> VmSpec {
        let mut s = self.clone();
        for (d, o) in s.disks.iter_mut().zip(&other.disks) {
            d.limit = o.limit;
        }
        for (n, o) in s.nics.iter_mut().zip(&other.nics) {
            n.rx_limit = o.rx_limit;
            n.tx_limit = o.tx_limit;
        }
        if let (Some(r), Some(o)) = (&mut s.rng, &other.rng) {
            r.limit = o.limit;
        }
        s
    }

    /// The images a spec names, with the field naming each and the kind
    /// it must be.
    pub fn image_refs(&self) -> Vec<(String, &str, crate::names::ImageKind)> {
        use crate::names::ImageKind;
        let mut refs = Vec::new();
        if !self.kernel.image.is_empty() {
            refs.push((
                "kernel.image".to_string(),
                self.kernel.image.as_str(),
                ImageKind::Kernel,
            ));
        }
        if !self.kernel.initrd_image.is_empty() {
            refs.push((
                "kernel.initrd_image".to_string(),
                self.kernel.initrd_image.as_str(),
                ImageKind::Initrd,
            ));
        }
        for (i, disk) in self.disks.iter().enumerate() {
            if !disk.image.is_empty() {
                refs.push((
                    format!("disks[{i}].image"),
                    disk.image.as_str(),
                    ImageKind::Disk,
                ));
            }
        }
        refs
    }
}

/// Bounds on labels: every List answer carries them, so a few huge ones
/// would push the whole node's listing past the transport's frame limit.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_BYTES: usize = 63;
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// A whole VM document, as stored (spec.json): room for the largest labels
/// and every device, and a bound on what one VM adds to a listing.
pub const MAX_SPEC_BYTES: usize = 64 << 10;
/// Disks and NICs together: the VMM has an interrupt line for this many
/// virtio devices.
pub const MAX_DEVICES: usize = berth_proto::vmm_process::config::MAX_DEVICES;

/// Host limits a spec is checked against.
pub struct Limits {
    pub max_vcpus: u32,
    pub host_memory_mib: u64,
    /// Which KVM the node has (from `berth-vmm --host-info`).
    pub flavour: berth_proto::vmm_process::host::Flavour,
}

impl VmSpec {
    fn check_labels(&self) -> Result<(), SpecError> {
        if self.labels.len() > MAX_LABELS {
            return Err(err(
                "labels",
                format!(
                    "{} labels, more than the limit of {MAX_LABELS}",
                    self.labels.len()
                ),
            ));
        }
        for (key, value) in &self.labels {
            let shown: String = key.chars().take(MAX_LABEL_KEY_BYTES).collect();
            if key.is_empty()
                || key.len() > MAX_LABEL_KEY_BYTES
                || key.contains('=')
                || key.contains(',')
            {
                return Err(err(
                    format!("labels.{shown}"),
                    format!("keys are 1-{MAX_LABEL_KEY_BYTES} bytes without '=' or ','"),
                ));
            }
            if value.len() > MAX_LABEL_VALUE_BYTES {
                return Err(err(
                    format!("labels.{key}"),
                    format!(
                        "value of {} bytes, more than the limit of {MAX_LABEL_VALUE_BYTES}",
                        value.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks every field; paths are resolved against the config's roots.
    /// Disks (source, roots, serial) and NICs (tap name, MAC).
    fn check_devices(&self, config: &AgentConfig) -> Result<(), SpecError> {
        for (i, disk) in self.disks.iter().enumerate() {
            let field = format!("disks[{i}]");
            check_source(&field, "path", "image", Some(&disk.path), &disk.image, true)?;
            if disk.image.is_empty() {
                resolve_in_roots(&format!("{field}.path"), &disk.path, &config.disk_roots)?;
            }
            if disk.serial.len() > 20 {
                return Err(err(format!("disks[{i}].serial"), "longer than 20 bytes"));
            }
        }
        for (i, nic) in self.nics.iter().enumerate() {
            if nic.tap.is_empty()
                || nic.tap.len() > 15
                || nic.tap.contains('/')
                || nic.tap.contains(char::is_whitespace)
            {
                return Err(err(
                    format!("nics[{i}].tap"),
                    format!("{:?} is not a valid interface name", nic.tap),
                ));
            }
            if !nic.mac.is_empty()
                && berth_proto::vmm_process::config::parse_mac(&nic.mac).is_none()
            {
                return Err(err(
                    format!("nics[{i}].mac"),
                    format!("{:?} is not a MAC like 52:54:00:12:34:56", nic.mac),
                ));
            }
        }
        Ok(())
    }

    /// The limits on the document's size, checked before anything in it
    /// is looked at (or echoed in an error). nodectl checks them too, so a
    /// document over them is not sent at all.
    pub fn check_size(&self) -> Result<(), SpecError> {
        let bytes = serde_json::to_vec(self).map_or(usize::MAX, |b| b.len());
        if bytes > MAX_SPEC_BYTES {
            return Err(err(
                "spec",
                format!("{bytes} bytes, more than the limit of {MAX_SPEC_BYTES}"),
            ));
        }
        let seed = usize::from(self.cloud_init.is_some());
        let rng = usize::from(self.rng.is_some());
        let devices = self.disks.len() + self.nics.len() + seed + rng;
        if devices > MAX_DEVICES {
            let what = match (seed, rng) {
                (0, 0) => "disks and NICs",
                (_, 0) => "disks and NICs with the cloud-init seed disk",
                (0, _) => "disks and NICs with the rng",
                _ => "disks and NICs with the cloud-init seed disk and the rng",
            };
            return Err(err(
                "disks",
                format!("{devices} {what}, more than the limit of {MAX_DEVICES}"),
            ));
        }
        Ok(())
    }

    pub fn validate(&self, config: &AgentConfig, limits: &Limits) -> Result<(), SpecError> {
        // Labels first: their errors name the limit without echoing the
        // value; then the size, before any other field is echoed.
        self.check_labels()?;
        self.check_size()?;
        check_name("id", &self.id)?;
        if !self.name.is_empty() {
            check_name("name", &self.name)?;
        }
        if self.vcpus == 0 {
            return Err(err("vcpus", "must be at least 1"));
        }
        if self.vcpus > limits.max_vcpus {
            return Err(err(
                "vcpus",
                format!(
                    "{} exceeds this node's maximum of {}",
                    self.vcpus, limits.max_vcpus
                ),
            ));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(err(
                "memory_mib",
                format!(
                    "{} is below the minimum of {MIN_MEMORY_MIB}",
                    self.memory_mib
                ),
            ));
        }
        if self.memory_mib > limits.host_memory_mib {
            return Err(err(
                "memory_mib",
                format!(
                    "{} exceeds this node's memory of {} MiB",
                    self.memory_mib, limits.host_memory_mib
                ),
            ));
        }
        let kernel = &self.kernel;
        if kernel.from_disk {
            self.check_kernel_from_disk()?;
        }
        check_source(
            "kernel",
            "path",
            "image",
            Some(&kernel.path),
            &kernel.image,
            !kernel.from_disk,
        )?;
        if kernel.image.is_empty() && !kernel.from_disk {
            resolve_in_roots("kernel.path", &kernel.path, &config.kernel_roots)?;
        }
        let initrd = kernel.initrd.as_deref();
        check_source(
            "kernel",
            "initrd",
            "initrd_image",
            initrd,
            &kernel.initrd_image,
            false,
        )?;
        if let Some(initrd) = initrd {
            resolve_in_roots("kernel.initrd", initrd, &config.kernel_roots)?;
        }
        if self.kernel.cmdline.len() >= 2048 {
            return Err(err("kernel.cmdline", "longer than 2047 bytes"));
        }
        self.check_devices(config)?;
        if let Some(c) = &self.cloud_init {
            crate::cloud_init::validate(c, self.nics.len()).map_err(|e| err(e.field, e.message))?;
            if c.hostname.is_empty() {
                // The VM's name becomes the hostname: it must be one.
                crate::cloud_init::check_hostname(self.display_name()).map_err(|e| {
                    err(
                        "cloud_init.hostname",
                        format!("empty, and the VM's name {e}"),
                    )
                })?;
            }
        }
        if !(1..=10000).contains(&self.cpu.weight) {
            return Err(err(
                "cpu.weight",
                format!("{} is outside 1-10000", self.cpu.weight),
            ));
        }
        if !(self.cpu.max >= 0.0 && self.cpu.max <= f64::from(limits.max_vcpus)) {
            return Err(err(
                "cpu.max",
                format!("{} is not between 0 and {}", self.cpu.max, limits.max_vcpus),
            ));
        }
        Ok(())
    }

    /// `kernel.from_disk` stands alone: no kernel or initrd of its own,
    /// and a disk 0 to read them from.
    fn check_kernel_from_disk(&self) -> Result<(), SpecError> {
        let k = &self.kernel;
        let other = !path_is_empty(&k.path)
            || !k.image.is_empty()
            || k.initrd.is_some()
            || !k.initrd_image.is_empty();
        if other {
            return Err(err(
                "kernel.from_disk",
                "the kernel and initrd come from disk 0: give no path, image, initrd or initrd_image",
            ));
        }
        if self.disks.is_empty() {
            return Err(err("kernel.from_disk", "the VM has no disk 0 to boot from"));
        }
        Ok(())
    }

    pub fn display_name(&self) -> &str {
        if self.name.is_empty() {
            &self.id
        } else {
            &self.name
        }
    }

    /// The MAC of NIC `index`: the spec's, or one derived from the VM's id
    /// (locally administered, unicast), so that it stays the same across
    /// restarts and a guest's network configuration can match on it.
    pub fn nic_mac(&self, index: usize) -> String {
        match self.nics.get(index) {
            Some(n) if !n.mac.is_empty() => n.mac.clone(),
            _ => {
                // FNV-1a of the id: stable across agent versions and hosts.
                let hash = (self.id.bytes()).fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
                });
                let h = hash.to_be_bytes();
                format!(
                    "02:b3:{:02x}:{:02x}:{:02x}:{:02x}",
                    h[0], h[1], h[2], index as u8
                )
            }
        }
    }

    /// The description berth-vmm boots from, with the console going to
    /// `console_log`, the paths as resolved at validation, and (with a
    /// cloud-init part) the seed at `seed` as a last, read-only disk.
    pub fn vmm_config(
        &self,
        console_log: &Path,
        console_log_max_bytes: u64,
        seed: &Path,
    ) -> berth_proto::vmm_process::config::VmConfig {
        use berth_proto::vmm_process::config::*;
        let seed_disk = self.cloud_init.as_ref().map(|_| DiskConfig {
            path: seed.to_owned(),
            read_only: true,
            serial: Some("cidata".into()),
            limit: LimitConfig::default(),
        });
        VmConfig {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: KernelConfig {
                path: self.kernel.path.clone(),
                initrd: self.kernel.initrd.clone(),
                cmdline: self.kernel.cmdline.clone(),
            },
            discovery: self.kernel.discovery,
            serial: SerialConfig {
                log: Some(console_log.to_owned()),
                log_max_bytes: Some(console_log_max_bytes),
                stdout: false,
                input: SerialInput::None,
            },
            disks: self
                .disks
                .iter()
                .map(|d| DiskConfig {
                    path: d.path.clone(),
                    read_only: d.read_only,
                    serial: (!d.serial.is_empty()).then(|| d.serial.clone()),
                    limit: d.limit.to_vmm(),
                })
                .chain(seed_disk)
                .collect(),
            nics: (self.nics.iter().enumerate())
                .map(|(i, n)| NicConfig {
                    tap: Some(n.tap.clone()),
                    tap_fd: None,
                    mac: Some(self.nic_mac(i)),
                    rx_limit: n.rx_limit.to_vmm(),
                    tx_limit: n.tx_limit.to_vmm(),
                })
                .collect(),
            rng: self.rng.as_ref().map(|r| RngConfig {
                limit: r.limit.to_vmm(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (PathBuf, AgentConfig) {
        let dir = std::env::temp_dir().join(format!("berth-spec-{}", std::process::id()));
        let roots = dir.join("images");
        std::fs::create_dir_all(&roots).unwrap();
        std::fs::write(roots.join("vmlinux"), b"k").unwrap();
        std::fs::write(dir.join("outside"), b"x").unwrap();
        let _ = std::fs::remove_file(roots.join("escape"));
        std::os::unix::fs::symlink(dir.join("outside"), roots.join("escape")).unwrap();
        let config = AgentConfig {
            kernel_roots: vec![roots.clone()],
            disk_roots: vec![roots.clone()],
            ..AgentConfig::default()
        };
        (roots, config)
    }

    fn spec(roots: &Path) -> VmSpec {
        VmSpec {
            id: "web-1".into(),
            vcpus: 2,
            memory_mib: 128,
            kernel: Kernel {
                path: roots.join("vmlinux"),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    const LIMITS: Limits = Limits {
        max_vcpus: 64,
        host_memory_mib: 4096,
        flavour: berth_proto::vmm_process::host::Flavour::Unknown,
    };

    #[test]
    fn each_bad_field_is_named() {
        let (roots, config) = setup();
        assert_eq!(spec(&roots).validate(&config, &LIMITS), Ok(()));
        type Mutation = Box<dyn Fn(&mut VmSpec)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("id", Box::new(|s| s.id = "Web_1".into())),
            ("vcpus", Box::new(|s| s.vcpus = 0)),
            ("vcpus", Box::new(|s| s.vcpus = 1000)),
            ("memory_mib", Box::new(|s| s.memory_mib = 1 << 40)),
            (
                "kernel.path",
                Box::new(|s| s.kernel.path = "/nonexistent/vmlinux".into()),
            ),
            (
                "kernel.path",
                Box::new(|s| s.kernel.path = "/etc/shadow".into()),
            ),
            ("kernel.path", Box::new(|s| s.kernel.path = PathBuf::new())),
            ("kernel.image", Box::new(|s| s.kernel.image = "k1".into())),
            (
                "kernel.image",
                Box::new(|s| {
                    s.kernel.path = PathBuf::new();
                    s.kernel.image = "Not A Name".into()
                }),
            ),
            ("disks[0].path", Box::new(|s| s.disks.push(Disk::default()))),
            (
                "kernel.path",
                Box::new(|s| s.kernel.path = s.kernel.path.parent().unwrap().join("../outside")),
            ),
            (
                "kernel.path",
                Box::new(|s| s.kernel.path = s.kernel.path.parent().unwrap().join("escape")),
            ),
            ("cpu.weight", Box::new(|s| s.cpu.weight = 0)),
            (
                "nics[0].mac",
                Box::new(|s| {
                    s.nics.push(Nic {
                        tap: "t0".into(),
                        mac: "zz".into(),
                        ..Default::default()
                    })
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut s = spec(&roots);
            mutate(&mut s);
            let e = s.validate(&config, &LIMITS).unwrap_err();
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn labels_are_bounded_and_each_limit_is_named() {
        let (roots, config) = setup();
        let mut s = spec(&roots);
        for i in 0..MAX_LABELS {
            s.labels
                .insert(format!("k{i}"), "v".repeat(MAX_LABEL_VALUE_BYTES));
        }
        assert_eq!(s.validate(&config, &LIMITS), Ok(()), "the maximum fits");
        s.labels.insert("one-more".into(), "v".into());
        let e = s.validate(&config, &LIMITS).unwrap_err();
        assert_eq!(e.field, "labels");
        assert!(e.to_string().contains("limit of 64"), "{e}");

        let mut s = spec(&roots);
        s.labels
            .insert("big".into(), "v".repeat(MAX_LABEL_VALUE_BYTES + 1));
        let e = s.validate(&config, &LIMITS).unwrap_err();
        assert_eq!(e.field, "labels.big");
        assert!(e.to_string().contains("limit of 256"), "{e}");

        let mut s = spec(&roots);
        s.labels.insert("k".repeat(1 << 20), "v".into());
        let e = s.validate(&config, &LIMITS).unwrap_err();
        assert!(e.to_string().len() < 300, "a huge key is not echoed whole");
    }

    #[test]
    fn the_document_and_its_devices_are_bounded() {
        let (roots, config) = setup();
        let mut s = spec(&roots);
        s.kernel.cmdline = "x".repeat(2000);
        s.name = "n".repeat(1 << 20);
        let e = s.validate(&config, &LIMITS).unwrap_err();
        assert_eq!(e.field, "spec");
        assert!(e.to_string().contains("limit of 65536"), "{e}");
        assert!(e.to_string().len() < 300, "the name is not echoed");

        let mut s = spec(&roots);
        for i in 0..=MAX_DEVICES {
            s.nics.push(Nic {
                tap: format!("tap{i}"),
                ..Nic::default()
            });
        }
        let e = s.validate(&config, &LIMITS).unwrap_err();
        assert!(e.to_string().contains("20 disks and NICs"), "{e}");
        s.nics.pop();
        assert_eq!(s.validate(&config, &LIMITS), Ok(()), "the maximum fits");
    }

    #[test]
    fn a_path_outside_the_roots_gets_one_message_whether_or_not_it_exists() {
        let (roots, config) = setup();
        let message = |path: &str| {
            let mut s = spec(&roots);
            s.kernel.path = path.into();
            let e = s.validate(&config, &LIMITS).unwrap_err();
            assert_eq!(e.field, "kernel.path");
            e.to_string().replace(path, "<path>")
        };
        let exists = message("/etc/hostname");
        assert_eq!(exists, message("/etc/no-such-file-here"));
        assert!(exists.contains("outside the allowed roots"), "{exists}");
        let escape = roots.join("escape").display().to_string();
        let via_symlink = message(&escape);
        let target = roots.parent().unwrap().join("outside");
        assert!(
            !via_symlink.contains(&target.display().to_string()),
            "the symlink's target is not shown: {via_symlink}"
        );
        let dotdot = roots.join("../no-such").display().to_string();
        assert_eq!(message(&dotdot), exists);
        // Inside a root, a missing file says so.
        let missing = roots.join("missing").display().to_string();
        assert!(message(&missing).contains("No such file"));
    }

    #[test]
    fn toml_document_round_trips_and_refuses_unknown_fields() {
        let text = "id = \"a\"\nvcpus = 1\nmemory_mib = 64\n[kernel]\npath = \"/k\"\n[restart]\nkind = \"on-failure\"\n";
        let s: VmSpec = toml::from_str(text).unwrap();
        assert_eq!(s.restart.kind, RestartKind::OnFailure);
        assert_eq!(s.restart.max_retries, DEFAULT_MAX_RETRIES);
        assert_eq!(s.cpu.weight, DEFAULT_CPU_WEIGHT);
        let e = toml::from_str::<VmSpec>(&format!("{text}vcpu = 3\n")).unwrap_err();
        assert!(e.to_string().contains("unknown field `vcpu`"), "{e}");
    }
}
