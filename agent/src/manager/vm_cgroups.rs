//! Each VM's cgroup: made with its limits before its VMM starts, changed
//! live, read for usage, and removed when the VMM is gone (retried while an
//! exiting VMM keeps the group busy a moment too long).

use std::path::PathBuf;
use std::sync::Mutex;

use super::error::{ApiError, ApiResult};
use super::registry::lock;
use crate::cgroups::{self, CgroupSetupError, Layout, VersionChoice};
use crate::config::AgentConfig;
use crate::spec::VmSpec;

pub struct VmCgroups {
    /// The cgroup layout, or why there is none.
    pub layout: Result<Layout, CgroupSetupError>,
    /// The config turned cgroups off (then VMs start without one).
    off: bool,
    default_overhead_mib: u64,
    /// Groups of VMs that ended but could not be removed yet.
    to_remove: Mutex<Vec<String>>,
}

impl VmCgroups {
    pub(super) fn detect(config: &AgentConfig) -> VmCgroups {
        let layout = Layout::detect(
            config.cgroup_version,
            &config.cgroup_root,
            &config.cgroup_parent,
        );
        let off = config.cgroup_version == VersionChoice::Off;
        match &layout {
            Ok(layout) => tracing::info!(
                "cgroup {} under {}",
                layout.version(),
                config.cgroup_root.display()
            ),
            Err(e) if off => tracing::warn!("NO CPU OR MEMORY ENFORCEMENT: {e}"),
            Err(e) => tracing::error!("cgroups unusable, VMs will not start: {e}"),
        }
        VmCgroups {
            layout,
            off,
            default_overhead_mib: config.vmm_memory_overhead_mib,
            to_remove: Mutex::new(Vec::new()),
        }
    }

    /// The cgroup version in use, or "off".
    pub fn version(&self) -> &'static str {
        self.layout.as_ref().map(|l| l.version()).unwrap_or("off")
    }

    fn limits(&self, spec: &VmSpec) -> cgroups::Limits {
        let overhead = if spec.memory.overhead_mib > 0 {
            spec.memory.overhead_mib
        } else {
            self.default_overhead_mib
        };
        cgroups::Limits {
            weight: spec.cpu.weight,
            max: (spec.cpu.max > 0.0).then_some(spec.cpu.max),
            cpuset: (!spec.cpu.cpuset.is_empty()).then(|| spec.cpu.cpuset.clone()),
            memory_bytes: (spec.memory_mib + overhead) << 20,
        }
    }

    /// The VM's cgroup, created with its limits; the VMM joins these dirs.
    pub(super) fn prepare(&self, spec: &VmSpec) -> ApiResult<Vec<PathBuf>> {
        match &self.layout {
            Ok(layout) => layout
                .create(&spec.id, &self.limits(spec))
                .map_err(|e| ApiError::Unavailable(format!("cannot set up the VM's cgroup: {e}"))),
            Err(_) if self.off => Ok(Vec::new()),
            Err(e) => Err(ApiError::Unavailable(format!(
                "cgroups unusable on this node: {e}"
            ))),
        }
    }

    /// Applies `spec`'s shares and memory limit to its running VM.
    pub(super) fn apply(&self, spec: &VmSpec) -> ApiResult<()> {
        if let Ok(layout) = &self.layout {
            layout
                .apply(&spec.id, &self.limits(spec))
                .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        }
        Ok(())
    }

    pub(super) fn usage(&self, id: &str) -> Option<cgroups::Usage> {
        self.layout.as_ref().ok()?.usage(id).ok()
    }

    pub(super) fn release(&self, id: &str) {
        if let Ok(layout) = &self.layout {
            if !layout.remove(id) {
                lock(&self.to_remove).push(id.to_string());
            }
        }
    }

    /// Retries the groups an exiting VMM kept busy, unless their VM runs
    /// again.
    pub(super) fn retry_removal(&self, with_vmm: &[String]) {
        let Ok(layout) = &self.layout else { return };
        lock(&self.to_remove).retain(|id| !with_vmm.contains(id) && !layout.remove(id));
    }

    /// Removes groups no VM with a VMM owns (after a restart).
    pub(super) fn remove_stale(&self, with_vmm: &[String]) {
        if let Ok(layout) = &self.layout {
            for removed in layout.remove_stale(with_vmm) {
                tracing::info!("removed stale cgroup {removed}");
            }
        }
    }
}
