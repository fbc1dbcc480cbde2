//! Facts about this host that the node's API reports: the CPU's identity
//! and the space left where the agent keeps things.

use std::path::Path;

/// Vendor, model name and flags of the host CPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuIdentity {
    pub vendor: String,
    pub model: String,
    pub flags: Vec<String>,
}

/// The host CPU, from /proc/cpuinfo.
pub fn cpu_identity() -> CpuIdentity {
    use berth_proto::vmm_process::host;
    CpuIdentity {
        vendor: host::cpu_vendor(),
        model: host::cpu_model(),
        flags: host::cpuinfo_field("flags")
            .split_whitespace()
            .map(String::from)
            .collect(),
    }
}

/// Size and free space of the filesystem holding one of the agent's roots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiskUse {
    /// What the agent keeps there: state_root, kernel_root, disk_root.
    pub role: &'static str,
    pub path: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// `path`'s filesystem (zeros when it cannot be read).
pub fn disk_use(role: &'static str, path: &Path) -> DiskUse {
    let (total_bytes, free_bytes) = nix::sys::statvfs::statvfs(path)
        .map(|s| {
            let frag = s.fragment_size();
            (s.blocks() * frag, s.blocks_available() * frag)
        })
        .unwrap_or((0, 0));
    DiskUse {
        role,
        path: path.display().to_string(),
        total_bytes,
        free_bytes,
    }
}

/// Every root of the agent's config, with its space.
pub fn roots_in_use(config: &crate::config::AgentConfig) -> Vec<DiskUse> {
    let mut disks = vec![disk_use("state_root", &config.state_root)];
    for root in &config.kernel_roots {
        disks.push(disk_use("kernel_root", root));
    }
    for root in &config.disk_roots {
        disks.push(disk_use("disk_root", root));
    }
    disks
}
