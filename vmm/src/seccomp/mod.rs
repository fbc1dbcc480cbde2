//! Per-thread seccomp filters for berth-vmm.
//!
//! Every thread belongs to one [`ThreadKind`] and runs under that kind's
//! allow-list from `inventory.toml` (kept in the repo, checked by tests),
//! compiled to BPF when the VMM is built (`build.rs`), so a starting VMM
//! neither parses TOML nor runs the filter compiler: that code would stay
//! resident in every VMM process. A system call outside the list raises SIGSYS; the
//! handler in `sigsys` names the call on stderr and ends the process.
//!
//! A thread inherits the filter of the thread that created it, and stacked
//! filters only ever narrow. Threads are therefore created by [`spawn`]:
//! once filtering is on, a launcher thread whose filter is the union of all
//! kinds creates them, and each new thread installs its own kind's filter
//! before it runs any of its code.

mod filters;
mod inventory;
mod sigsys;

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use seccompiler::BpfProgram;

pub use filters::{AllowList, Filters, SeccompError, ThreadKind};
pub use inventory::Inventory;
pub use sigsys::EXIT_STATUS;

/// The built-in inventory's filters, as `build.rs` compiled them.
const BUILT_IN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-filters.bin"));

impl Filters {
    /// The filters this binary was built with.
    pub fn built_in() -> Result<Filters, SeccompError> {
        Filters::from_bytes(BUILT_IN)
    }
}

type Job = Box<dyn FnOnce() + Send>;

struct State {
    /// Each kind's filter (the union went to the launcher).
    programs: BTreeMap<ThreadKind, BpfProgram>,
    launcher: Mutex<mpsc::Sender<Job>>,
    /// Test-only (feature `test-hooks`): `BERTH_TEST_SECCOMP_VIOLATION=<kind>`
    /// makes every thread of that kind make a system call no kind may make,
    /// right after it enters its filter, so a test can watch the filter
    /// stop the VMM.
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
            violate_in: test_violation(),
        })
        .map_err(|_| SeccompError::AlreadyOn)
}

#[cfg(feature = "test-hooks")]
fn test_violation() -> Option<ThreadKind> {
    std::env::var("BERTH_TEST_SECCOMP_VIOLATION")
        .ok()
        .and_then(|k| ThreadKind::from_name(&k))
}

#[cfg(not(feature = "test-hooks"))]
fn test_violation() -> Option<ThreadKind> {
    None
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
