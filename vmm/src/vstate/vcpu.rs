//! One thread per vCPU: KVM_RUN, dispatch the exit, repeat until the VM
//! stops. Threads are kicked out of KVM_RUN with a signal (`KICK_SIGNAL`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::vcpu_state::{self, StateError};
use crate::devices::bus::Bus;
use crate::exit::{ExitNotifier, ExitReason};
use crate::snapshot::state::VcpuState;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// The real-time signal that interrupts a vCPU thread's KVM_RUN (EINTR).
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick handler; must run before any vCPU thread starts.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Why vCPUs came out of KVM_RUN, as Stats names them: port and MMIO
/// accesses (the device emulation), halts and interrupt windows, a kick
/// (signal) and everything else.
pub const EXIT_REASONS: [&str; 8] = [
    "io_in",
    "io_out",
    "mmio_read",
    "mmio_write",
    "hlt",
    "irq_window",
    "interrupted",
    "other",
];

fn exit_reason_index(exit: &Result<VcpuExit<'_>, kvm_ioctls::Error>) -> usize {
    match exit {
        Ok(VcpuExit::IoIn(..)) => 0,
        Ok(VcpuExit::IoOut(..)) => 1,
        Ok(VcpuExit::MmioRead(..)) => 2,
        Ok(VcpuExit::MmioWrite(..)) => 3,
        Ok(VcpuExit::Hlt) => 4,
        Ok(VcpuExit::IrqWindowOpen) => 5,
        Ok(VcpuExit::Intr) => 6,
        Err(e) if e.errno() == libc::EINTR => 6,
        _ => 7,
    }
}

/// Shared by all vCPU threads: pausing, and what they report.
#[derive(Default)]
pub struct VcpuControl {
    state: Mutex<PauseState>,
    changed: Condvar,
    /// Exits handled in userspace, all vCPUs together.
    pub exits: AtomicU64,
    /// The same by reason, indexed like `EXIT_REASONS`.
    pub exits_by_reason: [AtomicU64; EXIT_REASONS.len()],
    /// Port and MMIO accesses no device claimed.
    pub unclaimed_port: AtomicU64,
    pub unclaimed_mmio: AtomicU64,
    /// Kernel thread ids of the vCPU threads, by index (0 until started).
    tids: Mutex<Vec<i32>>,
}

#[derive(Default)]
struct PauseState {
    paused: bool,
    parked: usize,
    /// Raised to ask every parked vCPU to save its state into `saved`.
    save_generation: u64,
    saved: Vec<Option<Result<VcpuState, StateError>>>,
}

impl VcpuControl {
    /// Parks the calling vCPU thread while the VM is paused, saving its
    /// state when a snapshot asks for it (only the thread that runs a vCPU
    /// may touch its fd).
    fn park_while_paused(&self, exit: &ExitNotifier, vcpu: &Vcpu) {
        let mut state = crate::devices::bus::lock(&self.state);
        if !state.paused {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        let mut generation = state.save_generation;
        while state.paused && !exit.stopping() {
            if state.save_generation != generation {
                generation = state.save_generation;
                let saved = vcpu_state::save(&vcpu.fd, &vcpu.msr_indices);
                if let Some(slot) = state.saved.get_mut(vcpu.index as usize) {
                    *slot = Some(saved);
                }
                self.changed.notify_all();
            }
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.parked -= 1;
        self.changed.notify_all();
    }

    fn pause_requested(&self) -> bool {
        crate::devices::bus::lock(&self.state).paused
    }

    /// The vCPU threads park as soon as they start (a restore that stays
    /// paused).
    pub fn start_paused(&self) {
        crate::devices::bus::lock(&self.state).paused = true;
    }

    pub fn tids(&self) -> Vec<i32> {
        crate::devices::bus::lock(&self.tids).clone()
    }
}

/// The running vCPU threads, for pausing, resuming and stopping them.
pub struct VcpuSet {
    threads: Mutex<Vec<JoinHandle<()>>>,
    pub control: Arc<VcpuControl>,
}

#[derive(Debug, thiserror::Error)]
#[error("the vCPUs did not all stop within {0:?}")]
pub struct PauseTimeout(Duration);

/// Why `VcpuSet::save_states` returned no states.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the vCPUs did not save their state within {0:?}")]
    Timeout(Duration),
    /// A vCPU's thread could not read its state from KVM.
    #[error(transparent)]
    State(#[from] StateError),
}

impl VcpuSet {
    pub fn start(vcpus: Vec<Vcpu>, control: Arc<VcpuControl>) -> std::io::Result<VcpuSet> {
        *crate::devices::bus::lock(&control.tids) = vec![0; vcpus.len()];
        let mut threads = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            threads.push(vcpu.spawn()?);
        }
        Ok(VcpuSet {
            threads: Mutex::new(threads),
            control,
        })
    }

    fn kick_all(&self) {
        for t in crate::devices::bus::lock(&self.threads).iter() {
            let _ = t.kill(kick_signal());
        }
    }

    /// Stops every vCPU outside KVM_RUN; returns once all are parked.
    pub fn pause(&self, timeout: Duration) -> Result<(), PauseTimeout> {
        let total = crate::devices::bus::lock(&self.threads).len();
        let deadline = Instant::now() + timeout;
        crate::devices::bus::lock(&self.control.state).paused = true;
        loop {
            // A kick can land just before KVM_RUN; repeat until all parked.
            self.kick_all();
            let state = crate::devices::bus::lock(&self.control.state);
            let (state, _) = self
                .control
                .changed
                .wait_timeout(state, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner());
            if state.parked == total {
                return Ok(());
            }
            drop(state);
            if Instant::now() > deadline {
                self.resume();
                return Err(PauseTimeout(timeout));
            }
        }
    }

    pub fn resume(&self) {
        crate::devices::bus::lock(&self.control.state).paused = false;
        self.control.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        crate::devices::bus::lock(&self.control.state).paused
    }

    /// Every vCPU's state, saved by its own (parked) thread. The VM must be
    /// paused.
    pub fn save_states(&self, timeout: Duration) -> Result<Vec<VcpuState>, SaveError> {
        let total = crate::devices::bus::lock(&self.threads).len();
        let deadline = Instant::now() + timeout;
        let mut state = crate::devices::bus::lock(&self.control.state);
        if !state.paused {
            return Err(SaveError::NotPaused);
        }
        state.saved = (0..total).map(|_| None).collect();
        state.save_generation += 1;
        self.control.changed.notify_all();
        while state.saved.iter().any(Option::is_none) {
            if Instant::now() > deadline {
                return Err(SaveError::Timeout(timeout));
            }
            state = self
                .control
                .changed
                .wait_timeout(state, Duration::from_millis(10))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        std::mem::take(&mut state.saved)
            .into_iter()
            .map(|s| s.expect("every slot filled").map_err(SaveError::from))
            .collect()
    }

    /// Ends every vCPU thread (the VM is over).
    pub fn stop_all(&self, timeout: Duration) {
        self.control.changed.notify_all();
        let threads = std::mem::take(&mut *crate::devices::bus::lock(&self.threads));
        stop_all(threads, timeout);
    }
}

pub struct Vcpu {
    index: u32,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: ExitNotifier,
    control: Arc<VcpuControl>,
    /// MSRs a snapshot saves.
    msr_indices: Arc<Vec<u32>>,
}

impl Vcpu {
    pub fn new(
        index: u32,
        fd: VcpuFd,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: ExitNotifier,
        control: Arc<VcpuControl>,
        msr_indices: Arc<Vec<u32>>,
    ) -> Self {
        Vcpu {
            index,
            fd,
            pio,
            mmio,
            exit,
            control,
            msr_indices,
        }
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    pub fn spawn(mut self) -> std::io::Result<JoinHandle<()>> {
        let name = format!("vcpu{}", self.index);
        crate::seccomp::spawn(crate::seccomp::ThreadKind::Vcpu, name, move || {
            if let Some(tid) =
                crate::devices::bus::lock(&self.control.tids).get_mut(self.index as usize)
            {
                *tid = nix::unistd::gettid().as_raw();
            }
            if let Some(reason) = self.run_until_stopped() {
                self.exit.notify(reason);
            }
        })
    }

    fn fault(&mut self, reason: String) -> ExitReason {
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        ExitReason::VcpuFault {
            vcpu: self.index,
            reason,
            rip,
        }
    }

    /// The suberror and data words KVM leaves for an internal error.
    fn internal_error_detail(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: kvm_run is the KVM-shared page of this vCPU; on
        // KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal` member of
        // the exit union, so reading it is reading initialised plain data.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..n]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        format!(
            "KVM_EXIT_INTERNAL_ERROR (suberror {}, data [{}]); this KVM could not emulate the \
             guest's instruction",
            internal.suberror,
            data.join(", ")
        )
    }

    /// Runs the vCPU; returns why the VM must end, or None when another
    /// thread already ended it.
    fn run_until_stopped(&mut self) -> Option<ExitReason> {
        loop {
            if self.exit.stopping() {
                return None;
            }
            // KVM finishes a port or MMIO read we emulated (and, on the fast
            // path, a port write) only on the next KVM_RUN: until then the
            // vCPU is still on that instruction, and state saved from it
            // would make a restored guest repeat the access. So a pausing
            // vCPU first enters with immediate_exit, which completes the
            // access and returns EINTR without running the guest.
            let settling = self.control.pause_requested();
            self.fd.set_kvm_immediate_exit(u8::from(settling));
            // The exit borrows the vCPU: decide what to do, then act on it.
            let exit = self.fd.run();
            let settled = settling && matches!(&exit, Err(e) if e.errno() == libc::EINTR);
            self.control.exits_by_reason[exit_reason_index(&exit)].fetch_add(1, Ordering::Relaxed);
            let step = match exit {
                // What no device claims reads as all-ones (an empty bus) and
                // drops writes: a guest probing for hardware goes on.
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                        self.control.unclaimed_port.fetch_add(1, Ordering::Relaxed);
                    }
                    Step::Continue
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !self.pio.write(u64::from(port), data) {
                        self.control.unclaimed_port.fetch_add(1, Ordering::Relaxed);
                    }
                    Step::Continue
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                        self.control.unclaimed_mmio.fetch_add(1, Ordering::Relaxed);
                    }
                    Step::Continue
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.mmio.write(addr, data) {
                        self.control.unclaimed_mmio.fetch_add(1, Ordering::Relaxed);
                    }
                    Step::Continue
                }
                Ok(VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr) => Step::Continue,
                Ok(VcpuExit::Shutdown) => Step::Fault(
                    "triple fault (KVM_EXIT_SHUTDOWN): the guest reset itself through a fault"
                        .to_string(),
                ),
                Ok(VcpuExit::FailEntry(reason, cpu)) => Step::Fault(format!(
                    "KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x} on host CPU {cpu})"
                )),
                Ok(VcpuExit::InternalError) => Step::InternalError,
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_RESET => Step::End(ExitReason::GuestReset),
                    KVM_SYSTEM_EVENT_SHUTDOWN => Step::End(ExitReason::GuestShutdown),
                    KVM_SYSTEM_EVENT_CRASH => Step::Fault("the guest reported a crash".into()),
                    other => Step::Fault(format!("unknown KVM system event {other}")),
                },
                Ok(other) => Step::Fault(format!("unexpected KVM exit {other:?}")),
                // EINTR: kicked; EAGAIN: an AP left INIT_RECEIVED (PVM).
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Continue,
                Err(e) => Step::Fault(format!("KVM_RUN failed: {e}")),
            };
            self.control.exits.fetch_add(1, Ordering::Relaxed);
            match step {
                Step::Continue if settled => self.control.park_while_paused(&self.exit, self),
                Step::Continue => {}
                Step::End(reason) => return Some(reason),
                Step::Fault(message) => return Some(self.fault(message)),
                Step::InternalError => {
                    let detail = self.internal_error_detail();
                    return Some(self.fault(detail));
                }
            }
        }
    }
}

enum Step {
    Continue,
    End(ExitReason),
    Fault(String),
    InternalError,
}

/// Kicks every vCPU thread until it has left KVM_RUN and ended, for at most
/// `timeout`. A kick can land just before a thread enters KVM_RUN, hence the
/// repeat.
pub fn stop_all(threads: Vec<JoinHandle<()>>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    for thread in threads {
        while !thread.is_finished() && Instant::now() < deadline {
            let _ = thread.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(5));
        }
        if thread.is_finished() {
            let _ = thread.join();
        }
    }
}
