//! One control group per VM, so it gets the CPU and memory share it was
//! promised and no more. cgroup v1 (a `berth/<id>` group in each of the cpu,
//! cpuacct, cpuset and memory hierarchies) and v2 (`berth.slice/<id>` in
//! the unified tree) are both written here, behind one type. The VMM joins
//! its groups itself, first thing, before it starts any thread.

use std::path::{Path, PathBuf};

/// cfs period used for cpu_max (100 ms, the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

pub use crate::config::VersionChoice;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchies {
    /// Hierarchy roots for cpu, cpuacct, cpuset and memory.
    V1 {
        cpu: PathBuf,
        cpuacct: PathBuf,
        cpuset: PathBuf,
        memory: PathBuf,
    },
    /// The unified tree's root.
    V2 { root: PathBuf },
}

/// Where this agent's VM groups live: `<parent>/<id>` in each v1
/// hierarchy, `<parent>.slice/<id>` in v2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub hierarchies: Hierarchies,
    parent: String,
}

/// What a VM's group enforces.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// 1-10000, 100 = default share.
    pub weight: u32,
    /// CPUs; None = unbounded.
    pub max: Option<f64>,
    /// Host CPU list ("0-3,6"); None = the parent's.
    pub cpuset: Option<String>,
    pub memory_bytes: u64,
}

/// Counters read from a VM's group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_ns: u64,
    pub throttled_ns: u64,
    pub periods: u64,
    pub throttled_periods: u64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {source}")]
pub struct CgroupError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError {
        path: path.to_owned(),
        source,
    })
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| CgroupError {
            path: path.to_owned(),
            source,
        })
}

/// "key value" lines (cpu.stat, memory.stat).
fn stat_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// cpu.shares for a weight: 100 is the kernel's default 1024.
pub fn weight_to_shares(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / 100).max(2)
}

/// Why this host's cgroups cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupSetupError {
    #[error("cgroups are off (cgroup_version = \"off\")")]
    Off,
    #[error("{}: {source} (no cgroup v2 here)", path.display())]
    NoV2 {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup v2 at {} lacks the {controller} controller", root.display())]
    MissingController {
        root: PathBuf,
        controller: &'static str,
    },
    #[error("cgroup v1 hierarchy {} is missing", dir.display())]
    MissingV1 { dir: PathBuf },
}

impl Layout {
    /// Finds the hierarchies: pure v2 when /sys/fs/cgroup has controllers,
    /// else the v1 mounts (the unified mount of a hybrid host has none).
    pub fn detect(
        choice: VersionChoice,
        root: &Path,
        parent: &str,
    ) -> Result<Layout, CgroupSetupError> {
        let hierarchies = Self::detect_hierarchies(choice, root)?;
        Ok(Layout {
            hierarchies,
            parent: parent.to_string(),
        })
    }

    fn detect_hierarchies(
        choice: VersionChoice,
        root: &Path,
    ) -> Result<Hierarchies, CgroupSetupError> {
        let v2 = root.join("cgroup.controllers");
        let v1 = |c: &str| root.join(c);
        let want_v2 = match choice {
            VersionChoice::V2 => true,
            VersionChoice::V1 => false,
            VersionChoice::Auto => v2.exists(),
            VersionChoice::Off => return Err(CgroupSetupError::Off),
        };
        if want_v2 {
            let controllers =
                std::fs::read_to_string(&v2).map_err(|source| CgroupSetupError::NoV2 {
                    path: v2.clone(),
                    source,
                })?;
            for c in ["cpu", "cpuset", "memory"] {
                if !controllers.split_whitespace().any(|x| x == c) {
                    return Err(CgroupSetupError::MissingController {
                        root: root.to_owned(),
                        controller: c,
                    });
                }
            }
            return Ok(Hierarchies::V2 {
                root: root.to_owned(),
            });
        }
        let v1 = Hierarchies::V1 {
            cpu: v1("cpu"),
            cpuacct: v1("cpuacct"),
            cpuset: v1("cpuset"),
            memory: v1("memory"),
        };
        if let Hierarchies::V1 {
            cpu,
            cpuacct,
            cpuset,
            memory,
        } = &v1
        {
            for dir in [cpu, cpuacct, cpuset, memory] {
                if !dir.is_dir() {
                    return Err(CgroupSetupError::MissingV1 { dir: dir.clone() });
                }
            }
        }
        Ok(v1)
    }

    pub fn version(&self) -> &'static str {
        match self.hierarchies {
            Hierarchies::V1 { .. } => "v1",
            Hierarchies::V2 { .. } => "v2",
        }
    }

    fn hierarchies(&self) -> Vec<PathBuf> {
        match &self.hierarchies {
            Hierarchies::V1 {
                cpu,
                cpuacct,
                cpuset,
                memory,
            } => {
                let mut v = vec![cpu.clone(), cpuacct.clone(), cpuset.clone(), memory.clone()];
                // cpu and cpuacct are often one mount (cpu,cpuacct).
                v.dedup_by(|a, b| a.canonicalize().ok() == b.canonicalize().ok());
                v
            }
            Hierarchies::V2 { root } => vec![root.clone()],
        }
    }

    fn parent_name(&self) -> String {
        match self.hierarchies {
            Hierarchies::V1 { .. } => self.parent.clone(),
            Hierarchies::V2 { .. } => format!("{}.slice", self.parent),
        }
    }

    /// The VM's group in every hierarchy (what the VMM joins).
    pub fn group_dirs(&self, id: &str) -> Vec<PathBuf> {
        self.hierarchies()
            .into_iter()
            .map(|h| h.join(self.parent_name()).join(id))
            .collect()
    }

    /// Creates the parent group and the VM's group, and sets its limits.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<Vec<PathBuf>, CgroupError> {
        let parent = self.parent_name();
        match &self.hierarchies {
            Hierarchies::V1 { cpuset, .. } => {
                for h in self.hierarchies() {
                    let dir = h.join(&parent).join(id);
                    std::fs::create_dir_all(&dir).map_err(|source| CgroupError {
                        path: dir.clone(),
                        source,
                    })?;
                }
                // A new cpuset group starts empty and takes no tasks until
                // it has CPUs and memory nodes: inherit the parent's.
                for dir in [cpuset.join(&parent), cpuset.join(&parent).join(id)] {
                    let parent = dir.parent().unwrap().to_owned();
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        if read(&dir.join(file))?.is_empty() {
                            write(&dir.join(file), &read(&parent.join(file))?)?;
                        }
                    }
                }
            }
            Hierarchies::V2 { root } => {
                let slice = root.join(&parent);
                std::fs::create_dir_all(slice.join(id)).map_err(|source| CgroupError {
                    path: slice.join(id),
                    source,
                })?;
                for dir in [root.as_path(), slice.as_path()] {
                    write(&dir.join("cgroup.subtree_control"), "+cpu +cpuset +memory")?;
                }
            }
        }
        self.apply(id, limits)?;
        Ok(self.group_dirs(id))
    }

    /// Writes the limits; used at creation and for live updates.
    pub fn apply(&self, id: &str, limits: &Limits) -> Result<(), CgroupError> {
        let parent = self.parent_name();
        match &self.hierarchies {
            Hierarchies::V1 {
                cpu,
                cpuset,
                memory,
                ..
            } => {
                let (cpu, cpuset, memory) = (
                    cpu.join(&parent).join(id),
                    cpuset.join(&parent).join(id),
                    memory.join(&parent).join(id),
                );
                write(
                    &cpu.join("cpu.shares"),
                    &weight_to_shares(limits.weight).to_string(),
                )?;
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                let quota = match limits.max {
                    Some(m) => ((m * CPU_PERIOD_US as f64) as i64).max(1000).to_string(),
                    None => "-1".into(),
                };
                write(&cpu.join("cpu.cfs_quota_us"), &quota)?;
                let cpus = match &limits.cpuset {
                    Some(c) => c.clone(),
                    None => read(&cpuset.parent().unwrap().join("cpuset.cpus"))?,
                };
                write(&cpuset.join("cpuset.cpus"), &cpus)?;
                write(
                    &memory.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
            }
            Hierarchies::V2 { root } => {
                let dir = root.join(&parent).join(id);
                write(&dir.join("cpu.weight"), &limits.weight.to_string())?;
                let max = match limits.max {
                    Some(m) => format!(
                        "{} {CPU_PERIOD_US}",
                        ((m * CPU_PERIOD_US as f64) as u64).max(1000)
                    ),
                    None => format!("max {CPU_PERIOD_US}"),
                };
                write(&dir.join("cpu.max"), &max)?;
                write(
                    &dir.join("cpuset.cpus"),
                    limits.cpuset.as_deref().unwrap_or(""),
                )?;
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
            }
        }
        Ok(())
    }

    pub fn usage(&self, id: &str) -> Result<Usage, CgroupError> {
        let parent = self.parent_name();
        match &self.hierarchies {
            Hierarchies::V1 {
                cpu,
                cpuacct,
                memory,
                ..
            } => {
                let memory = memory.join(&parent).join(id);
                let stat = read(&cpu.join(&parent).join(id).join("cpu.stat"))?;
                Ok(Usage {
                    cpu_ns: read(&cpuacct.join(&parent).join(id).join("cpuacct.usage"))?
                        .parse()
                        .unwrap_or(0),
                    throttled_ns: stat_field(&stat, "throttled_time"),
                    periods: stat_field(&stat, "nr_periods"),
                    throttled_periods: stat_field(&stat, "nr_throttled"),
                    memory_bytes: read(&memory.join("memory.usage_in_bytes"))?
                        .parse()
                        .unwrap_or(0),
                    memory_limit_bytes: read(&memory.join("memory.limit_in_bytes"))?
                        .parse()
                        .unwrap_or(0),
                })
            }
            Hierarchies::V2 { root } => {
                let dir = root.join(&parent).join(id);
                let stat = read(&dir.join("cpu.stat"))?;
                Ok(Usage {
                    cpu_ns: stat_field(&stat, "usage_usec") * 1000,
                    throttled_ns: stat_field(&stat, "throttled_usec") * 1000,
                    periods: stat_field(&stat, "nr_periods"),
                    throttled_periods: stat_field(&stat, "nr_throttled"),
                    memory_bytes: read(&dir.join("memory.current"))?.parse().unwrap_or(0),
                    memory_limit_bytes: read(&dir.join("memory.max"))?.parse().unwrap_or(u64::MAX),
                })
            }
        }
    }

    /// Removes the VM's group; false while the kernel still counts an
    /// exited VMM in it (not yet reaped), so the caller tries again later.
    pub fn remove(&self, id: &str) -> bool {
        let mut all = true;
        for dir in self.group_dirs(id) {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => all = false,
            }
        }
        all
    }

    /// Empty groups under our parent whose VM is not running: left by a
    /// crash (a group with processes in it cannot be removed).
    pub fn remove_stale(&self, running: &[String]) -> Vec<String> {
        let mut removed = Vec::new();
        for h in self.hierarchies() {
            let Ok(entries) = std::fs::read_dir(h.join(self.parent_name())) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir()
                    && !running.contains(&name)
                    && std::fs::remove_dir(e.path()).is_ok()
                {
                    removed.push(format!("{}", e.path().display()));
                }
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory tree laid out like a cgroup v2 mount (plain files).
    fn fake_v2(test: &str) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("berth-fake-cg2-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        root
    }

    #[test]
    fn v2_writer_sets_weight_max_cpuset_and_memory() {
        let root = fake_v2("writer");
        let layout = Layout::detect(VersionChoice::Auto, &root, "berth").unwrap();
        assert_eq!(layout.version(), "v2");
        let limits = Limits {
            weight: 250,
            max: Some(0.5),
            cpuset: Some("1".into()),
            memory_bytes: 192 << 20,
        };
        let dirs = layout.create("vm1", &limits).unwrap();
        assert_eq!(dirs, vec![root.join("berth.slice/vm1")]);
        let get = |f: &str| std::fs::read_to_string(root.join("berth.slice/vm1").join(f)).unwrap();
        assert_eq!(get("cpu.weight"), "250");
        assert_eq!(get("cpu.max"), "50000 100000");
        assert_eq!(get("cpuset.cpus"), "1");
        assert_eq!(get("memory.max"), (192u64 << 20).to_string());
        let subtree =
            std::fs::read_to_string(root.join("berth.slice/cgroup.subtree_control")).unwrap();
        assert_eq!(subtree, "+cpu +cpuset +memory");
        layout
            .apply(
                "vm1",
                &Limits {
                    max: None,
                    ..limits
                },
            )
            .unwrap();
        assert_eq!(get("cpu.max"), "max 100000");

        std::fs::write(
            root.join("berth.slice/vm1/cpu.stat"),
            "usage_usec 1500\nnr_periods 7\nnr_throttled 3\nthrottled_usec 20\n",
        )
        .unwrap();
        std::fs::write(root.join("berth.slice/vm1/memory.current"), "4096\n").unwrap();
        let u = layout.usage("vm1").unwrap();
        assert_eq!(
            (u.cpu_ns, u.periods, u.throttled_periods, u.throttled_ns),
            (1_500_000, 7, 3, 20_000)
        );
        assert_eq!((u.memory_bytes, u.memory_limit_bytes), (4096, 192 << 20));
    }

    #[test]
    fn v2_without_a_needed_controller_is_refused() {
        let root = fake_v2("missing");
        std::fs::write(root.join("cgroup.controllers"), "cpu io pids\n").unwrap();
        let e = Layout::detect(VersionChoice::V2, &root, "berth").unwrap_err();
        assert!(e.to_string().contains("cpuset"), "{e}");
    }

    #[test]
    fn shares_follow_weight_with_100_as_the_default() {
        assert_eq!(weight_to_shares(100), 1024);
        assert_eq!(weight_to_shares(200), 2048);
        assert_eq!(weight_to_shares(1), 10);
        assert_eq!(weight_to_shares(10000), 102400);
    }
}
