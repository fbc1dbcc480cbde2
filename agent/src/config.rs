//! berth-agent's configuration (TOML). Every field has a default, so an
//! empty file is a working config for a single-node setup.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Where VM definitions, state, consoles and sockets live.
    pub state_root: PathBuf,
    /// The API socket (mode 0660).
    pub socket: PathBuf,
    /// Group that owns the API socket; empty keeps root's group.
    pub socket_group: String,
    /// Also listen on this ttrpc address ("tcp://127.0.0.1:7000"). Off by
    /// default: the unix socket is the API.
    pub tcp_listen: Option<String>,
    /// Kernels and initrds must resolve (symlinks followed) inside one of these.
    pub kernel_roots: Vec<PathBuf>,
    /// Disk images must resolve inside one of these.
    pub disk_roots: Vec<PathBuf>,
    /// The berth-vmm binary; empty means "berth-vmm next to berth-agent".
    pub vmm_binary: Option<PathBuf>,
    /// Host CPUs and memory kept for the host itself.
    pub reserved_cpus: u32,
    pub reserved_memory_mib: u64,
    /// Allocatable = (total - reserved) x ratio.
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    /// Console log size before it is rotated (one old log is kept).
    pub console_log_max_bytes: u64,
    /// cgroup version: auto (detected), v1, v2, or off (no enforcement).
    pub cgroup_version: VersionChoice,
    /// Where the cgroup hierarchies are mounted.
    pub cgroup_root: PathBuf,
    /// The group VMs go under: `<parent>/<id>` (v1), `<parent>.slice/<id>` (v2).
    pub cgroup_parent: String,
    /// Memory a VM's group may use beyond its guest RAM: the VMM itself,
    /// its thread stacks and the page cache of its disk I/O.
    pub vmm_memory_overhead_mib: u64,
    /// Count defined (not only running) VMs against capacity, so Create
    /// also refuses what would not fit.
    pub reserve_on_define: bool,
    /// Where VMMs receiving a migration listen ("host" or "host:port"; a
    /// missing port means any free one). It is also the address handed to
    /// the source, so it must be one the source can reach.
    pub migration_listen: String,
    /// Serve Prometheus metrics at http://<this>/metrics ("127.0.0.1:9464");
    /// off unless set. Anyone who reaches it sees every VM's figures.
    pub metrics_listen: Option<String>,
    /// The API guard (docs/agent.md): connections open at once on the API
    /// sockets; at the cap the oldest one that never sent a request makes
    /// room, else the newcomer is closed.
    pub api_max_connections: usize,
    /// A request frame begun must be whole within this many seconds.
    pub api_frame_timeout_secs: u64,
    /// The largest frame a client may announce (ttrpc's own limit).
    pub api_max_frame_bytes: u64,
    /// Frames over 64 KiB in flight, all connections together.
    pub api_max_buffered_bytes: u64,
    /// How each VMM is confined (docs/security.md).
    pub jail: JailSettings,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            state_root: "/var/lib/berth".into(),
            socket: "/run/berth/agent.sock".into(),
            socket_group: String::new(),
            tcp_listen: None,
            kernel_roots: vec!["/var/lib/berth/images".into()],
            disk_roots: vec![
                "/var/lib/berth/images".into(),
                "/var/lib/berth/disks".into(),
            ],
            vmm_binary: None,
            reserved_cpus: 0,
            reserved_memory_mib: 512,
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            console_log_max_bytes: 1 << 20,
            cgroup_version: VersionChoice::Auto,
            cgroup_root: "/sys/fs/cgroup".into(),
            cgroup_parent: "berth".into(),
            vmm_memory_overhead_mib: 64,
            reserve_on_define: false,
            migration_listen: "127.0.0.1".into(),
            metrics_listen: None,
            api_max_connections: 256,
            api_frame_timeout_secs: 10,
            api_max_frame_bytes: 4 << 20,
            api_max_buffered_bytes: 64 << 20,
            jail: JailSettings::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    pub fn vmm_binary(&self) -> PathBuf {
        self.vmm_binary.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("berth-vmm")))
                .unwrap_or_else(|| "berth-vmm".into())
        })
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.state_root.join("vms")
    }

    /// The image store (ImageService).
    pub fn image_store_dir(&self) -> PathBuf {
        self.state_root.join("image-store")
    }

    pub fn quarantine_dir(&self) -> PathBuf {
        self.state_root.join("quarantine")
    }
}

/// Which cgroup hierarchy VMs are confined in (`cgroup_version`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VersionChoice {
    #[default]
    Auto,
    V1,
    V2,
    /// No cgroups at all: VMs get no enforced share. For debugging only;
    /// the agent says so loudly.
    Off,
}

/// A `[jail]` uid range that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JailSettingsError {
    #[error("jail.first_uid and jail.uid_count must be positive")]
    Empty,
    #[error("jail.first_uid + jail.uid_count overflows a uid")]
    Overflow,
}

/// The `[jail]` section of the agent config.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JailSettings {
    /// Jail every VMM. Off is for debugging only, and the agent says so
    /// loudly at start and on every VM start.
    pub enabled: bool,
    /// Seccomp filters in every VMM (off: debugging only, also loud).
    pub seccomp: bool,
    /// VMs run as uid = gid = first_uid + slot, slot < uid_count.
    pub first_uid: u32,
    pub uid_count: u32,
    /// RLIMIT_NOFILE of a VMM.
    pub max_open_files: u64,
    /// Let a VMM dump core (a core holds guest memory).
    pub core_dumps: bool,
}

impl Default for JailSettings {
    fn default() -> Self {
        JailSettings {
            enabled: true,
            seccomp: true,
            first_uid: 300_000,
            uid_count: 10_000,
            max_open_files: 4096,
            core_dumps: false,
        }
    }
}

impl JailSettings {
    pub fn owns_uid(&self, uid: u32) -> bool {
        uid >= self.first_uid && uid - self.first_uid < self.uid_count && uid != 0
    }

    /// The lowest uid of the range that `used` does not hold.
    pub fn free_uid(&self, used: &[u32]) -> Option<u32> {
        (0..self.uid_count)
            .filter_map(|slot| self.first_uid.checked_add(slot))
            .find(|uid| *uid != 0 && !used.contains(uid))
    }

    pub fn check(&self) -> Result<(), JailSettingsError> {
        if self.first_uid == 0 || self.uid_count == 0 {
            return Err(JailSettingsError::Empty);
        }
        if self.first_uid.checked_add(self.uid_count).is_none() {
            return Err(JailSettingsError::Overflow);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example shipped in agent/dist documents the real defaults.
    #[test]
    fn the_example_config_is_the_defaults() {
        let example: AgentConfig = toml::from_str(include_str!("../dist/agent.toml")).unwrap();
        let defaults = AgentConfig::default();
        assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
        let unknown = toml::from_str::<AgentConfig>("state_rot = \"/x\"").unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `state_rot`"),
            "{unknown}"
        );
    }
}
