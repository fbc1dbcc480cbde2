//! `nodectl doctor`: checks that this host can run Berth's VMs and says,
//! for anything that is wrong, exactly what to do about it. It reads the
//! agent's config and the VM documents on disk; it needs no running agent.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::config::AgentConfig;
use crate::spec::VmSpec;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One check's outcome: what was found, and the fix when it is not ok.
#[derive(Clone, Debug)]
pub struct Finding {
    pub check: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    pub fix: String,
}

fn ok(check: &'static str, detail: impl Into<String>) -> Finding {
    Finding {
        check,
        verdict: Verdict::Ok,
        detail: detail.into(),
        fix: String::new(),
    }
}

fn bad(
    check: &'static str,
    verdict: Verdict,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        check,
        verdict,
        detail: detail.into(),
        fix: fix.into(),
    }
}

/// Where the checks look; the real host's paths unless a test says otherwise.
pub struct Host {
    pub kvm: PathBuf,
    pub tun: PathBuf,
    pub sys: PathBuf,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            kvm: "/dev/kvm".into(),
            tun: "/dev/net/tun".into(),
            sys: "/sys".into(),
        }
    }
}

/// Every check, in the order an operator would fix them.
pub fn run(config: &AgentConfig, host: &Host) -> Vec<Finding> {
    let mut findings = vec![check_kvm(host), check_cgroups(config), check_tun(host)];
    findings.extend(check_bridges(config, host));
    findings.push(check_disk(&config.state_root));
    findings.push(check_jail_uids(config));
    findings.push(check_vmm_binary(config));
    findings
}

/// A character device we can open read-write, or what is wrong with it.
fn open_device(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.file_type().is_char_device() {
        return Err(format!("{} is not a character device", path.display()));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

fn check_kvm(host: &Host) -> Finding {
    if let Err(e) = open_device(&host.kvm) {
        let fix = if host.kvm.exists() {
            "run the agent as root (or add its user to the kvm group)"
        } else {
            "enable virtualisation in the firmware and load the module: modprobe kvm_intel (Intel) or modprobe kvm_amd (AMD)"
        };
        return bad("kvm", Verdict::Fail, e, fix);
    }
    let loaded = |m: &str| host.sys.join("module").join(m).exists();
    if loaded("kvm_intel") || loaded("kvm_amd") {
        let module = if loaded("kvm_intel") {
            "kvm_intel"
        } else {
            "kvm_amd"
        };
        ok(
            "kvm",
            format!("{} opens; hardware KVM ({module})", host.kvm.display()),
        )
    } else if loaded("kvm_pvm") {
        bad(
            "kvm",
            Verdict::Warn,
            format!(
                "{} opens, but it is software KVM (kvm_pvm): stock Linux guests cannot boot",
                host.kvm.display()
            ),
            "use a host with VT-x or AMD-V and load kvm_intel or kvm_amd for Linux guests",
        )
    } else {
        bad(
            "kvm",
            Verdict::Warn,
            format!(
                "{} opens, but no known KVM module is loaded",
                host.kvm.display()
            ),
            "check lsmod for kvm_intel or kvm_amd",
        )
    }
}

fn check_cgroups(config: &AgentConfig) -> Finding {
    match crate::cgroups::Layout::detect(
        config.cgroup_version,
        &config.cgroup_root,
        &config.cgroup_parent,
    ) {
        Ok(layout) => ok(
            "cgroups",
            format!(
                "{} at {} with cpu, cpuset and memory",
                layout.version(),
                config.cgroup_root.display()
            ),
        ),
        Err(e) => bad(
            "cgroups",
            Verdict::Fail,
            e.to_string(),
            "mount cgroup v2 on the cgroup_root with the cpu, cpuset and memory controllers \
             (or the v1 cpu, cpuacct, cpuset and memory hierarchies), or set cgroup_root",
        ),
    }
}

fn check_tun(host: &Host) -> Finding {
    match open_device(&host.tun) {
        Ok(()) => ok("tun", format!("{} opens", host.tun.display())),
        Err(e) => bad(
            "tun",
            Verdict::Fail,
            format!("{e}: VMs with NICs cannot start"),
            format!(
                "modprobe tun; if {} is still missing: mkdir -p {} && mknod {} c 10 200",
                host.tun.display(),
                host.tun.parent().unwrap_or(Path::new("/")).display(),
                host.tun.display()
            ),
        ),
    }
}

/// The bridges the defined VMs' NICs join (from their documents on disk).
fn bridges_in_use(config: &AgentConfig) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(config.vms_dir()) else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read(entry.path().join("spec.json")) else {
            continue;
        };
        let Ok(spec) = serde_json::from_slice::<VmSpec>(&text) else {
            continue;
        };
        for nic in spec.nics.iter().filter(|n| !n.bridge.is_empty()) {
            found.push((nic.bridge.clone(), spec.id.clone()));
        }
    }
    found.sort();
    found
}

fn check_bridges(config: &AgentConfig, host: &Host) -> Vec<Finding> {
    let mut by_bridge: Vec<(String, Vec<String>)> = Vec::new();
    for (bridge, vm) in bridges_in_use(config) {
        match by_bridge.iter_mut().find(|(b, _)| *b == bridge) {
            Some((_, vms)) => vms.push(vm),
            None => by_bridge.push((bridge, vec![vm])),
        }
    }
    if by_bridge.is_empty() {
        return vec![ok("bridges", "no defined VM joins a bridge")];
    }
    by_bridge
        .into_iter()
        .map(|(bridge, vms)| {
            let dir = host.sys.join("class/net").join(&bridge);
            let users = vms.join(", ");
            if dir.join("bridge").is_dir() {
                ok("bridges", format!("{bridge} exists (used by {users})"))
            } else if dir.exists() {
                bad(
                    "bridges",
                    Verdict::Fail,
                    format!("{bridge} exists but is not a bridge (used by {users})"),
                    format!("ip link del {bridge} && ip link add {bridge} type bridge && ip link set {bridge} up"),
                )
            } else {
                bad(
                    "bridges",
                    Verdict::Fail,
                    format!("bridge {bridge} does not exist; starting {users} will fail"),
                    format!("ip link add {bridge} type bridge && ip link set {bridge} up"),
                )
            }
        })
        .collect()
}

/// Free space: below 1 GiB or 5% fails (snapshots and disks will not fit),
/// below 10 GiB warns.
fn check_disk(state_root: &Path) -> Finding {
    // The state root may not exist before the first agent start.
    let mut probe = state_root.to_path_buf();
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p.to_path_buf(),
            None => break,
        }
    }
    let (total, free) = match nix::sys::statvfs::statvfs(&probe) {
        Ok(s) => (
            s.blocks() * s.fragment_size(),
            s.blocks_available() * s.fragment_size(),
        ),
        Err(e) => {
            return bad(
                "disk",
                Verdict::Fail,
                format!("cannot read free space of {}: {e}", probe.display()),
                "check that the state_root's filesystem is mounted",
            )
        }
    };
    disk_verdict(state_root, total, free)
}

pub fn disk_verdict(state_root: &Path, total: u64, free: u64) -> Finding {
    const GIB: u64 = 1 << 30;
    let detail = format!(
        "{:.1} GiB free of {:.1} GiB under {}",
        free as f64 / GIB as f64,
        total as f64 / GIB as f64,
        state_root.display()
    );
    if free < GIB || free.saturating_mul(20) < total {
        bad("disk", Verdict::Fail, detail, "free space there (old snapshots: nodectl snapshot delete) or move state_root to a larger filesystem")
    } else if free < 10 * GIB {
        bad(
            "disk",
            Verdict::Warn,
            detail,
            "snapshots need as much space as guest memory: free some before taking more",
        )
    } else {
        ok("disk", detail)
    }
}

fn check_jail_uids(config: &AgentConfig) -> Finding {
    let jail = &config.jail;
    if !jail.enabled {
        return bad(
            "jail",
            Verdict::Warn,
            "the jail is off (jail.enabled = false): VMMs run as root",
            "set [jail] enabled = true in the agent config",
        );
    }
    if let Err(e) = jail.check() {
        return bad(
            "jail",
            Verdict::Fail,
            e.to_string(),
            "fix [jail] first_uid and uid_count",
        );
    }
    // A host account inside the range would share files with a VM.
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let clash = passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let uid: u32 = f.nth(1)?.parse().ok()?;
        jail.owns_uid(uid).then(|| format!("{name} ({uid})"))
    });
    match clash {
        Some(user) => bad(
            "jail",
            Verdict::Fail,
            format!(
                "host account {user} has a uid in the VM range {}..{}",
                jail.first_uid,
                u64::from(jail.first_uid) + u64::from(jail.uid_count)
            ),
            "move [jail] first_uid to a range no account uses",
        ),
        None => ok(
            "jail",
            format!(
                "VM uids {}..{} are used by no host account",
                jail.first_uid,
                u64::from(jail.first_uid) + u64::from(jail.uid_count)
            ),
        ),
    }
}

fn check_vmm_binary(config: &AgentConfig) -> Finding {
    let path = config.vmm_binary();
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && m.mode() & 0o111 != 0 => {
            ok("berth-vmm", format!("{} is executable", path.display()))
        }
        Ok(_) => bad(
            "berth-vmm",
            Verdict::Fail,
            format!("{} is not an executable file", path.display()),
            format!("chmod 755 {}", path.display()),
        ),
        Err(e) => bad(
            "berth-vmm",
            Verdict::Fail,
            format!("{}: {e}", path.display()),
            "install berth-vmm beside berth-agent or set vmm_binary in the agent config",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_space_thresholds() {
        const GIB: u64 = 1 << 30;
        let root = Path::new("/var/lib/berth");
        assert_eq!(disk_verdict(root, 100 * GIB, 50 * GIB).verdict, Verdict::Ok);
        assert_eq!(
            disk_verdict(root, 100 * GIB, 4 * GIB).verdict,
            Verdict::Fail
        );
        assert_eq!(disk_verdict(root, 40 * GIB, 5 * GIB).verdict, Verdict::Warn);
        let tiny = disk_verdict(root, 4 * GIB, GIB / 2);
        assert_eq!(tiny.verdict, Verdict::Fail);
        assert!(tiny.detail.contains("0.5 GiB free"), "{}", tiny.detail);
    }

    #[test]
    fn missing_devices_fail_with_the_fix() {
        let dir = std::env::temp_dir().join(format!("berth-doctor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let host = Host {
            kvm: dir.join("kvm"),
            tun: dir.join("net/tun"),
            sys: dir.clone(),
        };
        let tun = check_tun(&host);
        assert_eq!(tun.verdict, Verdict::Fail);
        assert!(
            tun.fix.contains("modprobe tun") && tun.fix.contains("c 10 200"),
            "{}",
            tun.fix
        );
        let kvm = check_kvm(&host);
        assert_eq!(kvm.verdict, Verdict::Fail);
        assert!(kvm.fix.contains("modprobe kvm_"), "{}", kvm.fix);
        // A regular file is not a device.
        std::fs::write(dir.join("kvm"), b"").unwrap();
        assert!(check_kvm(&host).detail.contains("not a character device"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
