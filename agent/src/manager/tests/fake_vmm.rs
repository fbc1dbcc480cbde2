//! A fake berth-vmm for the core's unit tests: processes that live in a
//! map, a control socket that answers from it, and faults to inject at each
//! step of a VMM's life. It knows nothing of the core: it only does what a
//! VMM process would do to the calls it gets.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_proto::vmm::{
    ConsoleInput, MigrateRequest, MigrationStatus, SetRateLimitRequest, SnapshotReply,
    SnapshotRequest, VmmInfo, VmmStats,
};
use berth_proto::vmm_process::config::VmConfig;

use crate::store::VmDir;
use crate::vmm_proc::RunState;
use crate::vmm_proc::{Confinement, Launch, VmmControl, VmmExit, VmmProcess, VmmUnreachable, Vmms};

/// What goes wrong for one VM's VMMs.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Spawning fails with this error.
    pub spawn_error: Option<String>,
    /// The VMM exits with this reason as soon as its gate opens.
    pub exit_at_gate: Option<String>,
    /// The VMM runs but never answers on its control socket.
    pub silent: bool,
    /// Spawning removes the VM's directory first (a state root that
    /// vanished, or cannot be written, under the launcher).
    pub remove_dir_on_spawn: bool,
    /// Control calls that change the guest answer with this status.
    pub refuse: Option<(ttrpc::Code, String)>,
}

#[derive(Debug)]
struct Proc {
    vm: String,
    alive: bool,
    gate_open: bool,
    paused: bool,
    exit: Option<VmmExit>,
    console: Vec<u8>,
    /// The rate limits set, as (device, direction, bytes per second).
    limits: Vec<(String, String, u64)>,
    migration: Option<String>,
}

#[derive(Default)]
struct World {
    next_pid: i32,
    procs: HashMap<i32, Proc>,
    faults: HashMap<String, Faults>,
    /// The last exit of each VM's VMM, as its exit record would hold it.
    exits: HashMap<String, VmmExit>,
}

#[derive(Clone, Default)]
pub struct FakeVmms(Arc<Mutex<World>>);

fn vm_of(dir: &VmDir) -> String {
    dir.0.file_name().unwrap().to_string_lossy().into_owned()
}

/// A stand-in for the start ticks /proc would give.
fn ticks_of(pid: i32) -> u64 {
    pid as u64 * 7 + 1
}

impl FakeVmms {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.0.lock().unwrap()
    }

    pub fn set_faults(&self, vm: &str, faults: Faults) {
        self.world().faults.insert(vm.to_string(), faults);
    }

    /// The pids of `vm`'s VMMs that are alive.
    pub fn live(&self, vm: &str) -> Vec<i32> {
        let w = self.world();
        let mut pids: Vec<i32> = (w.procs.iter())
            .filter(|(_, p)| p.vm == vm && p.alive)
            .map(|(pid, _)| *pid)
            .collect();
        pids.sort();
        pids
    }

    /// Every live VMM, of any VM.
    pub fn all_live(&self) -> usize {
        self.world().procs.values().filter(|p| p.alive).count()
    }

    /// A VMM that runs for `vm`, as an earlier agent would have left it.
    pub fn run_detached(&self, vm: &str, paused: bool) -> (i32, u64) {
        let mut w = self.world();
        w.next_pid += 1;
        let pid = 1000 + w.next_pid;
        w.procs.insert(pid, new_proc(vm, true, paused));
        (pid, ticks_of(pid))
    }

    /// The VMM of `vm` ends on its own.
    pub fn end(&self, vm: &str, code: Option<i32>, reason: &str) {
        self.end_with(vm, VmmExit::other(code, reason));
    }

    /// The guest of `vm` reboots: its VMM ends cleanly, asking for the
    /// machine back.
    pub fn guest_reset(&self, vm: &str) {
        self.end_with(
            vm,
            VmmExit {
                code: Some(0),
                reason: "guest requested reset".into(),
                cause: crate::vmm_proc::ExitCause::GuestReset,
            },
        );
    }

    fn end_with(&self, vm: &str, exit: VmmExit) {
        let mut w = self.world();
        for p in w.procs.values_mut().filter(|p| p.vm == vm && p.alive) {
            p.alive = false;
            p.exit = Some(exit.clone());
        }
        w.exits.insert(vm.to_string(), exit);
    }

    pub fn console(&self, vm: &str) -> Vec<u8> {
        let w = self.world();
        (w.procs.values())
            .filter(|p| p.vm == vm)
            .flat_map(|p| p.console.clone())
            .collect()
    }

    pub fn limits(&self, vm: &str) -> Vec<(String, String, u64)> {
        let w = self.world();
        (w.procs.values())
            .filter(|p| p.vm == vm && p.alive)
            .flat_map(|p| p.limits.clone())
            .collect()
    }
}

fn new_proc(vm: &str, gate_open: bool, paused: bool) -> Proc {
    Proc {
        vm: vm.to_string(),
        alive: true,
        gate_open,
        paused,
        exit: None,
        console: Vec::new(),
        limits: Vec::new(),
        migration: None,
    }
}

struct FakeProcess {
    world: FakeVmms,
    pid: i32,
}

impl VmmProcess for FakeProcess {
    fn pid(&self) -> i32 {
        self.pid
    }

    fn start_ticks(&self) -> u64 {
        ticks_of(self.pid)
    }

    fn open_gate(&mut self) -> std::io::Result<()> {
        let mut w = self.world.world();
        let vm = w.procs[&self.pid].vm.clone();
        let faults = w.faults.get(&vm).cloned().unwrap_or_default();
        let p = w.procs.get_mut(&self.pid).unwrap();
        p.gate_open = true;
        if let Some(reason) = faults.exit_at_gate {
            p.alive = false;
            p.exit = Some(VmmExit::other(Some(1), reason));
        }
        Ok(())
    }

    fn exited(&mut self, _dir: &VmDir) -> Option<VmmExit> {
        let w = self.world.world();
        let p = &w.procs[&self.pid];
        (!p.alive).then(|| {
            p.exit
                .clone()
                .unwrap_or(VmmExit::other(None, "VMM killed by signal 9"))
        })
    }

    fn kill(&self) {
        let mut w = self.world.world();
        let p = w.procs.get_mut(&self.pid).unwrap();
        p.alive = false;
    }
}

#[async_trait::async_trait]
impl Vmms for FakeVmms {
    fn spawn(
        &self,
        dir: &VmDir,
        _config: &VmConfig,
        _cgroups: &[PathBuf],
        how: Launch<'_>,
        _confinement: &Confinement<'_>,
    ) -> std::io::Result<Box<dyn VmmProcess>> {
        let vm = vm_of(dir);
        let faults = self.world().faults.get(&vm).cloned().unwrap_or_default();
        if let Some(e) = faults.spawn_error {
            return Err(std::io::Error::other(e));
        }
        if faults.remove_dir_on_spawn {
            std::fs::remove_dir_all(&dir.0)?;
        }
        let paused = matches!(how, Launch::Restore(r) if r.paused);
        let mut w = self.world();
        w.next_pid += 1;
        let pid = 1000 + w.next_pid;
        w.procs.insert(pid, new_proc(&vm, false, paused));
        Ok(Box::new(FakeProcess {
            world: self.clone(),
            pid,
        }))
    }

    /// Like the run lock: whichever VMM of this VM lives is found, the
    /// recorded one or not.
    fn adopt(&self, dir: &VmDir, pid: i32, start_ticks: u64) -> Option<Box<dyn VmmProcess>> {
        let holder = self.holder(dir).unwrap()?;
        let recorded = holder == pid && start_ticks == ticks_of(pid);
        let pid = if recorded { pid } else { holder };
        Some(Box::new(FakeProcess {
            world: self.clone(),
            pid,
        }))
    }

    fn holder(&self, dir: &VmDir) -> std::io::Result<Option<i32>> {
        Ok(self.live(&vm_of(dir)).first().copied())
    }

    fn read_exit(&self, dir: &VmDir) -> VmmExit {
        self.world()
            .exits
            .get(&vm_of(dir))
            .cloned()
            .unwrap_or(VmmExit::other(None, "VMM died without an exit record"))
    }

    async fn connect(&self, dir: &VmDir) -> Result<Box<dyn VmmControl>, VmmUnreachable> {
        let vm = vm_of(dir);
        let w = self.world();
        let silent = w.faults.get(&vm).is_some_and(|f| f.silent);
        let pid = (w.procs.iter())
            .find(|(_, p)| p.vm == vm && p.alive && p.gate_open && !silent)
            .map(|(pid, _)| *pid)
            .ok_or_else(|| VmmUnreachable {
                socket: dir.socket(),
                source: ttrpc::Error::Others(format!("no VMM of {vm} listens")),
            })?;
        Ok(Box::new(FakeControl {
            world: self.clone(),
            pid,
        }))
    }
}

struct FakeControl {
    world: FakeVmms,
    pid: i32,
}

fn gone() -> ttrpc::Error {
    ttrpc::Error::Others("the VMM hung up".into())
}

impl FakeControl {
    /// Runs `f` on this VMM's process, if it still runs and is not told
    /// to refuse.
    fn with<T>(&self, f: impl FnOnce(&mut Proc) -> T) -> ttrpc::Result<T> {
        let mut w = self.world.world();
        let vm = w.procs[&self.pid].vm.clone();
        if let Some((code, message)) = w.faults.get(&vm).and_then(|f| f.refuse.clone()) {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(code, message)));
        }
        let p = w.procs.get_mut(&self.pid).unwrap();
        if !p.alive {
            return Err(gone());
        }
        Ok(f(p))
    }

    fn info_of(p: &Proc) -> VmmInfo {
        let mut info = VmmInfo::default();
        let state = if p.paused {
            RunState::Paused
        } else {
            RunState::Running
        };
        state.fill(&mut info);
        info
    }

    fn end(&self, reason: &str) -> ttrpc::Result<()> {
        let vm = self.with(|p| {
            p.alive = false;
            p.exit = Some(VmmExit::other(Some(0), reason));
            p.vm.clone()
        })?;
        let exit = VmmExit::other(Some(0), reason);
        self.world.world().exits.insert(vm, exit);
        Ok(())
    }
}

/// What a VMM leaves in a snapshot directory, as far as the agent reads
/// it: a state file whose header restores on this host, and the memory.
pub fn write_snapshot(dir: &Path) -> std::io::Result<()> {
    use berth_proto::vmm_process::snapshot::{Header, FORMAT_VERSION, MEMORY_FILE, STATE_FILE};
    std::fs::create_dir_all(dir)?;
    let header = Header {
        format_version: FORMAT_VERSION.into(),
        cpu_vendor: berth_proto::vmm_process::host::cpu_vendor(),
        cpu_model: "fake".into(),
        kvm_flavour: "fake".into(),
    };
    std::fs::write(dir.join(STATE_FILE), header.encode(b"{}"))?;
    std::fs::write(dir.join(MEMORY_FILE), vec![0u8; 4096])
}

fn status(phase: &str) -> MigrationStatus {
    MigrationStatus {
        phase: phase.into(),
        ..Default::default()
    }
}

#[async_trait::async_trait]
impl VmmControl for FakeControl {
    async fn info(&self, _: Duration) -> ttrpc::Result<VmmInfo> {
        let w = self.world.world();
        let p = &w.procs[&self.pid];
        if !p.alive {
            return Err(gone());
        }
        Ok(Self::info_of(p))
    }
    async fn pause(&self, _: Duration) -> ttrpc::Result<VmmInfo> {
        self.with(|p| {
            p.paused = true;
            Self::info_of(p)
        })
    }
    async fn resume(&self, _: Duration) -> ttrpc::Result<VmmInfo> {
        self.with(|p| {
            p.paused = false;
            Self::info_of(p)
        })
    }
    async fn shutdown(&self, _: Duration) -> ttrpc::Result<()> {
        self.end("the guest shut down")
    }
    async fn stop(&self, _: Duration) -> ttrpc::Result<()> {
        self.end("stopped through the API")
    }
    async fn stats(&self, _: Duration) -> ttrpc::Result<VmmStats> {
        self.with(|_| VmmStats::default())
    }
    async fn set_rate_limit(&self, req: &SetRateLimitRequest, _: Duration) -> ttrpc::Result<()> {
        let bytes = req.limit.as_ref().map_or(0, |l| l.bytes_per_s);
        self.with(|p| {
            (p.limits).push((req.device.clone(), req.direction.clone(), bytes));
        })
    }
    async fn console_write(&self, req: &ConsoleInput, _: Duration) -> ttrpc::Result<()> {
        self.with(|p| p.console.extend_from_slice(&req.data))
    }
    async fn snapshot(&self, req: &SnapshotRequest, _: Duration) -> ttrpc::Result<SnapshotReply> {
        let resume = req.resume;
        self.with(|_| ())?;
        write_snapshot(Path::new(&req.dir)).map_err(|e| {
            ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::FAILED_PRECONDITION,
                e.to_string(),
            ))
        })?;
        self.with(|p| {
            p.paused = !resume;
            SnapshotReply {
                pause_ms: 3,
                ..Default::default()
            }
        })
    }
    async fn migrate_out(
        &self,
        req: &MigrateRequest,
        _: Duration,
    ) -> ttrpc::Result<MigrationStatus> {
        self.with(|p| {
            p.migration = Some(req.address.clone());
            status("precopy")
        })
    }
    async fn get_migration(&self, _: Duration) -> ttrpc::Result<MigrationStatus> {
        self.with(|p| match p.migration {
            Some(_) => status("precopy"),
            None => status("cancelled"),
        })
    }
    async fn cancel_migration(&self, _: Duration) -> ttrpc::Result<MigrationStatus> {
        self.with(|p| {
            p.migration = None;
            status("cancelled")
        })
    }
}
