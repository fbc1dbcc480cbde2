//! The VMM as the agent sees it: a process it spawns, adopts and ends, and a
//! control socket it talks to. Everything the core does to a VMM goes
//! through the [`Vmms`] trait, so the core is unit-tested against a fake
//! (`manager/tests/fake_vmm.rs`) and runs against real berth-vmm processes
//! ([`OsVmms`]) in production.

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_proto::vmm_process::config::VmConfig;
pub use berth_proto::vmm_process::exit::ExitCause;

use crate::store::VmDir;

pub mod control;
mod process;

pub use control::{RunState, TtrpcControl, VmmControl, VmmUnreachable};
pub use process::{host_info, proc_start_ticks, read_exit, OsVmmProcess};

/// How a VMM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmExit {
    /// The VMM's exit code from its exit record; None when it left none
    /// (killed, or crashed before it could write one).
    pub code: Option<i32>,
    pub reason: String,
    /// What the guest asked for, if it ended the VM itself.
    pub cause: ExitCause,
}

impl VmmExit {
    /// An end with no guest request behind it (killed, stopped, failed).
    pub fn other(code: Option<i32>, reason: impl Into<String>) -> VmmExit {
        VmmExit {
            code,
            reason: reason.into(),
            cause: ExitCause::Other,
        }
    }

    pub fn clean(&self) -> bool {
        self.code == Some(0)
    }
}

/// Boot a VMM from a snapshot instead of from its config.
#[derive(Clone, Copy)]
pub struct RestoreFrom<'a> {
    pub snapshot: &'a Path,
    /// Leave the vCPUs stopped after restoring.
    pub paused: bool,
    /// (tap in the snapshot, tap to open instead) pairs.
    pub taps: &'a [(String, String)],
}

/// Wait for a live migration instead of booting.
#[derive(Clone, Copy)]
pub struct IncomingFrom<'a> {
    /// host:port to listen on (port 0: the VMM picks one and writes it to
    /// `VmDir::migration_address`).
    pub listen: &'a str,
    pub token: &'a str,
    pub expires_at_ms: u64,
    pub taps: &'a [(String, String)],
}

/// How a VMM gets its guest.
#[derive(Clone, Copy)]
pub enum Launch<'a> {
    Boot,
    Restore(RestoreFrom<'a>),
    Incoming(IncomingFrom<'a>),
}

/// The jail (None: jailing is off) and seccomp settings for one VMM.
pub struct Confinement<'a> {
    pub jail: Option<crate::jail::JailPlan>,
    pub settings: &'a crate::config::JailSettings,
}

/// One VMM process, spawned by this agent or adopted from an earlier one.
pub trait VmmProcess: Send {
    fn pid(&self) -> i32;
    /// Its start time in clock ticks since boot: with the pid, what
    /// recognises this process again after an agent restart.
    fn start_ticks(&self) -> u64;
    /// Lets a VMM this agent spawned go on, once its pid is recorded.
    fn open_gate(&mut self) -> std::io::Result<()>;
    /// Has it ended, and how? (Reaps a child of ours.)
    fn exited(&mut self, dir: &VmDir) -> Option<VmmExit>;
    /// Kills it outright.
    fn kill(&self);
}

impl dyn VmmProcess {
    /// Waits up to `timeout` for it to end (on tokio's clock, which the
    /// unit tests run paused).
    pub async fn wait_exit(&mut self, dir: &VmDir, timeout: Duration) -> Option<VmmExit> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(exit) = self.exited(dir) {
                return Some(exit);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What the core does to VMMs: start one, find one again, learn how one
/// that was gone ended, talk to one.
#[async_trait::async_trait]
pub trait Vmms: Send + Sync {
    /// Starts a VMM for `config` in `dir`, held at its start gate.
    fn spawn(
        &self,
        dir: &VmDir,
        config: &VmConfig,
        cgroups: &[PathBuf],
        how: Launch<'_>,
        confinement: &Confinement<'_>,
    ) -> std::io::Result<Box<dyn VmmProcess>>;
    /// The VMM of this VM that still runs, found by its run lock: the one
    /// an earlier agent recorded (`pid`, `start_ticks`; 0 if none), or
    /// one the record lost.
    fn adopt(&self, dir: &VmDir, pid: i32, start_ticks: u64) -> Option<Box<dyn VmmProcess>>;
    /// The pid of the VMM that holds this VM's run lock, if one does;
    /// an error when that cannot be told now.
    fn holder(&self, dir: &VmDir) -> std::io::Result<Option<i32>>;
    /// How a VMM that ended while nobody watched went: its exit record.
    fn read_exit(&self, dir: &VmDir) -> VmmExit;
    /// A client of the VMM's control socket.
    async fn connect(&self, dir: &VmDir) -> Result<Box<dyn VmmControl>, VmmUnreachable>;
}

/// Real berth-vmm processes of this binary.
pub struct OsVmms {
    pub binary: PathBuf,
}

#[async_trait::async_trait]
impl Vmms for OsVmms {
    fn spawn(
        &self,
        dir: &VmDir,
        config: &VmConfig,
        cgroups: &[PathBuf],
        how: Launch<'_>,
        confinement: &Confinement<'_>,
    ) -> std::io::Result<Box<dyn VmmProcess>> {
        OsVmmProcess::spawn(&self.binary, dir, config, cgroups, how, confinement)
            .map(|p| Box::new(p) as Box<dyn VmmProcess>)
    }

    fn adopt(&self, dir: &VmDir, pid: i32, start_ticks: u64) -> Option<Box<dyn VmmProcess>> {
        OsVmmProcess::adopt(dir, pid, start_ticks).map(|p| Box::new(p) as Box<dyn VmmProcess>)
    }

    fn holder(&self, dir: &VmDir) -> std::io::Result<Option<i32>> {
        berth_proto::vmm_process::run_lock::holder(&dir.run_lock())
    }

    fn read_exit(&self, dir: &VmDir) -> VmmExit {
        read_exit(dir, None)
    }

    async fn connect(&self, dir: &VmDir) -> Result<Box<dyn VmmControl>, VmmUnreachable> {
        TtrpcControl::connect(dir)
            .await
            .map(|c| Box::new(c) as Box<dyn VmmControl>)
    }
}
