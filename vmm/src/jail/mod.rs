//! The jail berth-vmm puts itself in before it reads any guest input
//! (Firecracker's jailer, done in-process): a mount namespace whose root is
//! an empty tmpfs holding only the VM's files, bind-mounted at the paths the
//! config names, and the KVM and tun device nodes; then an unprivileged
//! uid/gid with no capabilities, no_new_privs and rlimits.
//!
//! Every path is opened with symlinks refused before it is bind-mounted
//! through its file descriptor, so a path swapped for a symlink after the
//! agent checked it (TOCTOU) is refused here, not followed.

mod devices;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{chdir, pivot_root, setgroups, setresgid, setresuid, Gid, Uid};

/// What the jail holds and who the VMM becomes in it.
#[derive(Clone, Debug, Default)]
pub struct JailConfig {
    /// An empty directory: the jail's root (a tmpfs is mounted on it, in
    /// the VMM's own mount namespace only).
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Files or directories the VMM reads (kernel, initrd, read-only disks,
    /// a snapshot to restore).
    pub read_only: Vec<PathBuf>,
    /// Files or directories it writes (disks, its run directory with the
    /// sockets, console log and exit record, its snapshot directory).
    pub read_write: Vec<PathBuf>,
    /// Device nodes it needs (/dev/kvm, /dev/net/tun), recreated in the jail
    /// owned by `uid`.
    pub devices: Vec<PathBuf>,
    /// Taps to attach while still privileged (creating or attaching a tap
    /// needs CAP_NET_ADMIN); the NICs find them by name.
    pub taps: Vec<String>,
    /// RLIMIT_NOFILE.
    pub max_open_files: u64,
    /// Allow core dumps (they hold guest memory); off unless asked for.
    pub core_dumps: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {what} {path}: {source}")]
    Path {
        what: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("jail: {what}: {source}")]
    Step {
        what: &'static str,
        source: nix::Error,
    },
    #[error("jail: {0}")]
    Invalid(String),
    #[error("jail: tap {name}: {source}")]
    Tap {
        name: String,
        source: crate::devices::virtio::net::tap::TapError,
    },
}

fn step(what: &'static str) -> impl FnOnce(nix::Error) -> JailError {
    move |source| JailError::Step { what, source }
}

fn at<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> JailError + 'a {
    move |source| JailError::Path {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Enters the jail. Call from the main thread before any other thread
/// starts: the uid change and rlimits then hold for every thread.
pub fn enter(config: &JailConfig) -> Result<(), JailError> {
    if config.uid == 0 || config.gid == 0 {
        return Err(JailError::Invalid(
            "the jail uid and gid must not be 0".into(),
        ));
    }
    if !config.root.is_absolute() {
        return Err(JailError::Invalid(format!(
            "the jail root {} is not absolute",
            config.root.display()
        )));
    }
    let last_cap = last_capability();
    // Host facts the VMM reports later, read while /proc and /sys are here.
    crate::vstate::kvm::detect_flavour();
    berth_proto::vmm_process::host::cpuinfo();
    berth_proto::vmm_process::host::memory_mib();
    for name in &config.taps {
        crate::devices::virtio::net::tap::preopen(name).map_err(|source| JailError::Tap {
            name: name.clone(),
            source,
        })?;
    }

    unshare(CloneFlags::CLONE_NEWNS).map_err(step("unshare the mount namespace"))?;
    // Nothing we mount may reach the host, and host unmounts still reach us.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(step("make / a slave mount"))?;
    // Opened in the new namespace (a bind source must be a mount of ours),
    // before anything is mounted over them.
    let mut binds = Vec::new();
    for (paths, writable) in [(&config.read_only, false), (&config.read_write, true)] {
        for path in paths {
            binds.push((path.clone(), open_no_symlinks(path)?, writable));
        }
    }
    mount(
        Some("tmpfs"),
        &config.root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    )
    .map_err(at("mount a tmpfs on", &config.root))?;

    for (path, fd, writable) in &binds {
        bind_into(&config.root, path, fd, *writable)?;
    }
    for device in &config.devices {
        devices::recreate(&config.root, device, config.uid, config.gid)?;
    }
    devices::mount_proc(&config.root)?;

    chdir(&config.root).map_err(at("chdir to", &config.root))?;
    // pivot_root(".", ".") stacks the old root under the new one; detaching
    // it leaves the jail as the only tree this process can see.
    pivot_root(".", ".").map_err(step("pivot_root into the jail"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the host's root"))?;
    chdir("/").map_err(step("chdir to the jail's root"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(step("make the jail's root read-only"))?;

    let nofile = config.max_open_files;
    setrlimit(Resource::RLIMIT_NOFILE, nofile, nofile).map_err(step("set RLIMIT_NOFILE"))?;
    if !config.core_dumps {
        setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(step("set RLIMIT_CORE"))?;
    }
    drop_privileges(config.uid, config.gid, last_cap)
}

/// Opens `path` as an O_PATH descriptor, refusing a symlink anywhere in it.
fn open_no_symlinks(path: &Path) -> Result<OwnedFd, JailError> {
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(JailError::Invalid(format!(
            "{} is not an absolute path without `..`",
            path.display()
        )));
    }
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    openat2(AT_FDCWD, path, how).map_err(at("cannot open (symlinks refused)", path))
}

/// Bind-mounts the opened `fd` at `path` inside `root`.
fn bind_into(root: &Path, path: &Path, fd: &OwnedFd, writable: bool) -> Result<(), JailError> {
    let target = root.join(path.strip_prefix("/").unwrap_or(path));
    let source = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    let is_dir = std::fs::metadata(&source)
        .map(|m| m.is_dir())
        .map_err(|e| io_at("cannot stat", path, e))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_at("cannot create", parent, e))?;
    }
    let made = if is_dir {
        std::fs::create_dir_all(&target)
    } else {
        std::fs::File::create(&target).map(drop)
    };
    made.map_err(|e| io_at("cannot create", &target, e))?;
    mount(
        Some(&source),
        &target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(at("cannot bind-mount", path))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !writable {
        flags |= MsFlags::MS_RDONLY;
    }
    if !is_dir || writable {
        flags |= MsFlags::MS_NOEXEC;
    }
    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
        .map_err(at("cannot restrict the bind mount of", path))
}

fn io_at(what: &'static str, path: &Path, e: std::io::Error) -> JailError {
    JailError::Path {
        what,
        path: path.to_owned(),
        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// Becomes `uid`/`gid` with no supplementary groups, no capabilities (and
/// none to regain: the bounding set is emptied first) and no_new_privs.
fn drop_privileges(uid: u32, gid: u32, last_cap: u64) -> Result<(), JailError> {
    for cap in 0..=last_cap {
        // SAFETY: PR_CAPBSET_DROP takes a capability number and no pointers.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            return Err(JailError::Step {
                what: "drop the capability bounding set",
                source: nix::Error::last(),
            });
        }
    }
    setgroups(&[]).map_err(step("clear supplementary groups"))?;
    let (gid, uid) = (Gid::from_raw(gid), Uid::from_raw(uid));
    setresgid(gid, gid, gid).map_err(step("setresgid"))?;
    // From root to a non-root uid: the kernel clears every capability set.
    setresuid(uid, uid, uid).map_err(step("setresuid"))?;
    nix::sys::prctl::set_no_new_privs().map_err(step("set no_new_privs"))?;
    Ok(())
}

fn last_capability() -> u64 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        // CAP_CHECKPOINT_RESTORE, the last one Linux 6.x knows.
        .unwrap_or(40)
}
