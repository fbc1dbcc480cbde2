//! Per-thread seccomp filters for berth-vmm.
//!
//! Every thread belongs to one [`ThreadKind`] and runs under that kind's
//! allow-list, compiled at start-up from `inventory.toml` (kept in the repo,
//! checked by tests). A system call outside the list raises SIGSYS; the
//! handler in `sigsys` names the call on stderr and ends the process.
//!
//! A thread inherits the filter of the thread that created it, and stacked
//! filters only ever narrow. Threads are therefore created by [`spawn`]:
//! once filtering is on, a launcher thread whose filter is the union of all
//! kinds creates them, and each new thread installs its own kind's filter
//! before it runs any of its code.

mod inventory;
mod sigsys;

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use inventory::Inventory;
pub use sigsys::EXIT_STATUS;

/// What a thread does, which decides what it may ask of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// Runs KVM_RUN and emulates the port and MMIO accesses it exits with.
    Vcpu,
    /// A virtio device worker: queues, disk files, taps.
    Device,
    /// The main thread, the control API, signals and console input.
    Control,
    /// Live migration: the sender, the receiver and the status responder.
    Migration,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Control,
        ThreadKind::Migration,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Control => "control",
            ThreadKind::Migration => "migration",
        }
    }

    pub fn from_name(name: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("the seccomp inventory is invalid: {0}")]
    Inventory(String),
    #[error("cannot compile the {kind} seccomp filter: {source}")]
    Compile {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the {kind} seccomp filter: {source}")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("cannot start the thread launcher: {0}")]
    Launcher(std::io::Error),
    #[error("seccomp filters are already on")]
    AlreadyOn,
}

/// The compiled filters, one per kind plus their union for the launcher.
pub struct Filters {
    programs: BTreeMap<ThreadKind, BpfProgram>,
    union: BpfProgram,
}

impl Filters {
    pub fn compile(inventory: &Inventory) -> Result<Filters, SeccompError> {
        let mut programs = BTreeMap::new();
        for kind in ThreadKind::ALL {
            programs.insert(kind, compile(kind.name(), inventory.allowed(kind)?)?);
        }
        let union = compile("launcher", inventory.union()?)?;
        Ok(Filters { programs, union })
    }
}

/// System call numbers, each with the ioctl requests it is limited to
/// (empty: any arguments).
pub type AllowList = BTreeMap<i64, Vec<u64>>;

fn compile(kind: &'static str, allowed: AllowList) -> Result<BpfProgram, SeccompError> {
    let compile_err = |source| SeccompError::Compile { kind, source };
    let mut rules = BTreeMap::new();
    for (nr, requests) in allowed {
        let mut syscall_rules = Vec::new();
        for request in requests {
            // ioctl's request is an unsigned int in the kernel: the low
            // 32 bits are all that count.
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                .map_err(compile_err)?;
            syscall_rules.push(SeccompRule::new(vec![cond]).map_err(compile_err)?);
        }
        rules.insert(nr, syscall_rules);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(compile_err)?;
    BpfProgram::try_from(filter).map_err(compile_err)
}

type Job = Box<dyn FnOnce() + Send>;

struct State {
    /// Each kind's filter (the union went to the launcher).
    programs: BTreeMap<ThreadKind, BpfProgram>,
    launcher: Mutex<mpsc::Sender<Job>>,
    /// Test-only: `BERTH_TEST_SECCOMP_VIOLATION=<kind>` makes every thread
    /// of that kind make a system call no kind may make, right after it
    /// enters its filter, so a test can watch the filter stop the VMM.
    violate_in: Option<ThreadKind>,
}

static STATE: OnceLock<State> = OnceLock::new();

/// Turns filtering on for every thread created from now on through
/// [`spawn`], and starts the launcher. Call once, early, from a thread that
/// is not filtered yet; then call [`enter`] on the threads that already run.
pub fn enable(filters: Filters) -> Result<(), SeccompError> {
    sigsys::install().map_err(SeccompError::Launcher)?;
    let (tx, rx) = mpsc::channel::<Job>();
    let Filters { programs, union } = filters;
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("launcher".into())
        .spawn(move || {
            let installed = seccompiler::apply_filter(&union);
            let ok = installed.is_ok();
            let _ = ready_tx.send(installed);
            if ok {
                for job in rx {
                    job();
                }
            }
        })
        .map_err(SeccompError::Launcher)?;
    ready_rx
        .recv()
        .map_err(|_| SeccompError::Launcher(std::io::Error::other("the launcher died")))?
        .map_err(|source| SeccompError::Install {
            kind: "launcher",
            source,
        })?;
    STATE
        .set(State {
            programs,
            launcher: Mutex::new(tx),
            violate_in: std::env::var("BERTH_TEST_SECCOMP_VIOLATION")
                .ok()
                .and_then(|k| ThreadKind::from_name(&k)),
        })
        .map_err(|_| SeccompError::AlreadyOn)
}

/// Puts the calling thread under `kind`'s filter (nothing when filtering is
/// off). A thread that cannot be filtered must not run: the process ends.
pub fn enter(kind: ThreadKind) {
    let Some(state) = STATE.get() else { return };
    sigsys::set_thread_kind(kind);
    if let Err(source) = seccompiler::apply_filter(&state.programs[&kind]) {
        eprintln!(
            "berth-vmm: error: {}",
            SeccompError::Install {
                kind: kind.name(),
                source
            }
        );
        std::process::exit(1);
    }
    if state.violate_in == Some(kind) {
        // SAFETY: ptrace(PTRACE_TRACEME) with no pointers; the filter traps
        // it before the kernel acts on it.
        unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) };
    }
}

/// Starts a named thread of `kind`, filtered when filtering is on.
pub fn spawn<F, T>(kind: ThreadKind, name: String, body: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let filtered = move || {
        enter(kind);
        body()
    };
    let Some(state) = STATE.get() else {
        return std::thread::Builder::new().name(name).spawn(filtered);
    };
    let (handle_tx, handle_rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = handle_tx.send(std::thread::Builder::new().name(name).spawn(filtered));
    });
    let gone = || std::io::Error::other("the thread launcher is gone");
    state
        .launcher
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| gone())?;
    handle_rx.recv().map_err(|_| gone())?
}

#[cfg(test)]
mod tests;
