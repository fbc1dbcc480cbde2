//! Why a VM ended, and the one channel every thread reports that through.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote 0xFE to the i8042 command port, or asked KVM for a reset.
    GuestReset,
    /// The guest asked KVM to power off.
    GuestShutdown,
    /// The guest entered ACPI S5 (`poweroff`) through the FADT's sleep
    /// control register.
    GuestPowerOff,
    /// The VMM was told to stop (SIGTERM, SIGINT).
    Signal(i32),
    /// The VMM was told to stop through its control API.
    Stopped,
    /// The VM now runs on the destination of a live migration.
    Migrated(String),
    /// A vCPU hit something the VMM cannot continue from.
    VcpuFault { vcpu: u32, reason: String, rip: u64 },
}

impl ExitReason {
    /// Process exit status: 0 for an orderly end, 2 for a guest fault (1 is
    /// left for errors before the guest ran).
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestReset
            | ExitReason::GuestShutdown
            | ExitReason::GuestPowerOff
            | ExitReason::Signal(_)
            | ExitReason::Stopped
            | ExitReason::Migrated(_) => 0,
            ExitReason::VcpuFault { .. } => 2,
        }
    }
}

impl ExitReason {
    /// The cause a supervisor acts on (restart on a guest's reboot).
    pub fn cause(&self) -> berth_proto::vmm_process::exit::ExitCause {
        use berth_proto::vmm_process::exit::ExitCause;
        match self {
            ExitReason::GuestReset => ExitCause::GuestReset,
            ExitReason::GuestShutdown | ExitReason::GuestPowerOff => ExitCause::GuestPowerOff,
            ExitReason::Signal(_)
            | ExitReason::Stopped
            | ExitReason::Migrated(_)
            | ExitReason::VcpuFault { .. } => ExitCause::Other,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::GuestReset => f.write_str("guest requested reset"),
            ExitReason::GuestShutdown => f.write_str("guest requested shutdown"),
            ExitReason::GuestPowerOff => f.write_str("guest powered off"),
            ExitReason::Signal(sig) => write!(f, "stopped by signal {sig}"),
            ExitReason::Stopped => f.write_str("stopped by request"),
            ExitReason::Migrated(to) => write!(f, "migrated to {to}"),
            ExitReason::VcpuFault { vcpu, reason, rip } => {
                write!(f, "vCPU {vcpu} stopped: {reason} at RIP {rip:#x}")
            }
        }
    }
}

/// Cloned into every thread that can end the VM. The first report wins; the
/// stop flag tells every vCPU loop to return at its next exit.
#[derive(Clone)]
pub struct ExitNotifier {
    tx: mpsc::Sender<ExitReason>,
    stop: Arc<AtomicBool>,
}

impl ExitNotifier {
    pub fn new() -> (Self, mpsc::Receiver<ExitReason>) {
        let (tx, rx) = mpsc::channel();
        (
            ExitNotifier {
                tx,
                stop: Arc::new(AtomicBool::new(false)),
            },
            rx,
        )
    }

    pub fn notify(&self, reason: ExitReason) {
        self.stop.store(true, Ordering::SeqCst);
        // The receiver only goes away when the process is exiting anyway.
        let _ = self.tx.send(reason);
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}
