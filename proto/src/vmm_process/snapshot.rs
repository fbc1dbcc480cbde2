//! The snapshot directory as both processes see it. berth-vmm writes
//! `<name>.tmp/` and renames it to `<name>/` when complete; the agent lists,
//! sizes and checks snapshots from these names alone.
//!
//! - `state.json`: one header line (magic, format version, berth version,
//!   CPU vendor and model, KVM flavour, a checksum of the rest), then the
//!   VMM's encoded state, which only the VMM decodes.
//! - `memory.img`: guest RAM (sparse).
//! - `progress.json`, in `<name>.tmp/` only while the snapshot is written.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const MAGIC: &str = "BERTH-SNAPSHOT";
/// Semver of the snapshot format, independent of the crate's version.
pub const FORMAT_VERSION: &str = "1.0.0";
pub const STATE_FILE: &str = "state.json";
pub const MEMORY_FILE: &str = "memory.img";
pub const PROGRESS_FILE: &str = "progress.json";

/// What a snapshot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    /// All of guest memory.
    Full,
    /// The pages written since the VMM's last snapshot.
    Diff,
}

/// A snapshot kind word that is neither "full" nor "diff".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown snapshot kind {0:?} (full, diff)")]
pub struct UnknownSnapshotKind(pub String);

impl SnapshotKind {
    /// The API's word: "full" (or empty) or "diff".
    pub fn parse(word: &str) -> Result<SnapshotKind, UnknownSnapshotKind> {
        match word {
            "" | "full" => Ok(SnapshotKind::Full),
            "diff" => Ok(SnapshotKind::Diff),
            other => Err(UnknownSnapshotKind(other.to_string())),
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            SnapshotKind::Full => "full",
            SnapshotKind::Diff => "diff",
        }
    }

    /// The kind a request asks for: its enum, or from an agent of the
    /// release before it, its word.
    pub fn of(req: &crate::vmm::SnapshotRequest) -> Result<SnapshotKind, UnknownSnapshotKind> {
        use crate::vmm::VmmSnapshotKind as Pb;
        match req.snapshot_kind.enum_value() {
            Ok(Pb::VMM_SNAPSHOT_KIND_FULL) => Ok(SnapshotKind::Full),
            Ok(Pb::VMM_SNAPSHOT_KIND_DIFF) => Ok(SnapshotKind::Diff),
            Ok(Pb::VMM_SNAPSHOT_KIND_UNSPECIFIED) => SnapshotKind::parse(&req.kind),
            Err(n) => Err(UnknownSnapshotKind(format!("enum value {n}"))),
        }
    }

    /// Writes the kind into `req`, as enum and as word.
    pub fn fill(self, req: &mut crate::vmm::SnapshotRequest) {
        use crate::vmm::VmmSnapshotKind as Pb;
        let kind = match self {
            SnapshotKind::Full => Pb::VMM_SNAPSHOT_KIND_FULL,
            SnapshotKind::Diff => Pb::VMM_SNAPSHOT_KIND_DIFF,
        };
        req.snapshot_kind = protobuf::EnumOrUnknown::new(kind);
        req.kind = self.word().into();
    }
}

/// Where snapshot `dir` is written until it is complete.
pub fn temporary_dir(dir: &Path) -> PathBuf {
    dir.with_extension("tmp")
}

/// How far a snapshot being written has got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Memory passes so far (a live snapshot makes several).
    pub pass: u32,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// The progress of snapshot `dir` while it is being written; None when
/// none is (not begun, or finished).
pub fn read_progress(dir: &Path) -> Option<Progress> {
    let bytes = std::fs::read(temporary_dir(dir).join(PROGRESS_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a Berth snapshot (bad magic)")]
    BadMagic(PathBuf),
    #[error(
        "snapshot format {found} cannot be restored by this berth-vmm (format {FORMAT_VERSION})"
    )]
    Version { found: String },
    #[error("snapshot state {0} is corrupt: checksum mismatch")]
    Checksum(PathBuf),
    #[error("snapshot was taken on a {taken} CPU; this host has a {here} CPU")]
    CpuVendor { taken: String, here: String },
}

/// The first line of a state file. The model and flavour are for people
/// reading it: spaces in them are written, and read back, as `_`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub format_version: String,
    pub cpu_vendor: String,
    pub cpu_model: String,
    pub kvm_flavour: String,
}

impl Header {
    /// The bytes of a state file: this header, then `body`.
    pub fn encode(&self, body: &[u8]) -> Vec<u8> {
        let line = format!(
            "{MAGIC} {FORMAT_VERSION} berth={} vendor={} model={:?} kvm={:?} checksum={:016x}\n",
            env!("CARGO_PKG_VERSION"),
            self.cpu_vendor,
            self.cpu_model.replace(' ', "_"),
            self.kvm_flavour.replace(' ', "_"),
            fnv1a(body)
        );
        let mut text = line.into_bytes();
        text.extend_from_slice(body);
        text
    }

    /// Checks the header of a state file's bytes (`path` names it in
    /// errors): magic, format version, checksum. Returns it and the body.
    pub fn split<'a>(path: &Path, text: &'a [u8]) -> Result<(Header, &'a [u8]), HeaderError> {
        let bad_magic = || HeaderError::BadMagic(path.to_owned());
        let newline = text
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(bad_magic)?;
        let line = String::from_utf8_lossy(&text[..newline]).into_owned();
        let body = &text[newline + 1..];
        let mut words = line.split_whitespace();
        if words.next() != Some(MAGIC) {
            return Err(bad_magic());
        }
        let version = words.next().unwrap_or_default().to_string();
        if version.split('.').next() != FORMAT_VERSION.split('.').next() {
            return Err(HeaderError::Version { found: version });
        }
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap_or_default()
                .trim_matches('"')
                .to_string()
        };
        if field("checksum=") != format!("{:016x}", fnv1a(body)) {
            return Err(HeaderError::Checksum(path.to_owned()));
        }
        let header = Header {
            format_version: version,
            cpu_vendor: field("vendor="),
            cpu_model: field("model="),
            kvm_flavour: field("kvm="),
        };
        Ok((header, body))
    }

    /// Can snapshot `dir` be restored on a host whose CPU vendor is
    /// `host_vendor`? Reads the state file and checks its header and
    /// checksum; the state itself is the VMM's to decode.
    pub fn check_restorable(dir: &Path, host_vendor: &str) -> Result<Header, HeaderError> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read(&path).map_err(|source| HeaderError::Read {
            path: path.clone(),
            source,
        })?;
        let (header, _) = Header::split(&path, &text)?;
        if header.cpu_vendor != host_vendor {
            return Err(HeaderError::CpuVendor {
                taken: header.cpu_vendor,
                here: host_vendor.to_string(),
            });
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_round_trips_and_an_older_agent_is_understood() {
        for kind in [SnapshotKind::Full, SnapshotKind::Diff] {
            let mut req = crate::vmm::SnapshotRequest::default();
            kind.fill(&mut req);
            assert_eq!(SnapshotKind::of(&req), Ok(kind));
            req.snapshot_kind = Default::default();
            assert_eq!(SnapshotKind::of(&req), Ok(kind), "the word alone");
        }
        let req = crate::vmm::SnapshotRequest::default();
        assert_eq!(SnapshotKind::of(&req), Ok(SnapshotKind::Full));
        let e = SnapshotKind::parse("incremental").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown snapshot kind \"incremental\" (full, diff)"
        );
    }

    fn header() -> Header {
        Header {
            format_version: FORMAT_VERSION.into(),
            cpu_vendor: "AuthenticAMD".into(),
            cpu_model: "AMD EPYC 7B13 64-Core Processor".into(),
            kvm_flavour: "software (kvm_pvm)".into(),
        }
    }

    #[test]
    fn a_header_reads_back_with_its_body() {
        let text = header().encode(b"{\"vcpus\":[]}");
        let (back, body) = Header::split(Path::new("s"), &text).unwrap();
        assert_eq!(back.cpu_vendor, "AuthenticAMD");
        assert_eq!(back.cpu_model, "AMD_EPYC_7B13_64-Core_Processor");
        assert_eq!(back.kvm_flavour, "software_(kvm_pvm)");
        assert_eq!(back.format_version, FORMAT_VERSION);
        assert_eq!(body, b"{\"vcpus\":[]}");
    }

    #[test]
    fn a_changed_byte_another_format_or_another_vendor_is_refused() {
        let mut text = header().encode(b"{\"vcpus\":[]}");
        *text.last_mut().unwrap() = b']';
        let err = Header::split(Path::new("s"), &text).unwrap_err();
        assert!(matches!(err, HeaderError::Checksum(_)), "{err}");
        let text =
            String::from_utf8(header().encode(b"{}"))
                .unwrap()
                .replacen(FORMAT_VERSION, "2.0.0", 1);
        let err = Header::split(Path::new("s"), text.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("format 2.0.0"), "{err}");
        assert!(matches!(
            Header::split(Path::new("s"), b"QFI\xfb\n{}"),
            Err(HeaderError::BadMagic(_))
        ));

        let dir = std::env::temp_dir().join(format!("berth-header-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(STATE_FILE), header().encode(b"{}")).unwrap();
        Header::check_restorable(&dir, "AuthenticAMD").unwrap();
        let err = Header::check_restorable(&dir, "GenuineIntel").unwrap_err();
        assert_eq!(
            err.to_string(),
            "snapshot was taken on a AuthenticAMD CPU; this host has a GenuineIntel CPU"
        );
    }
}
