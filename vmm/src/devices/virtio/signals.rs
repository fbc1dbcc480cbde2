//! What a device tells the guest, shared between its worker thread and the
//! transport: interrupt status bits (raised through an irqfd) and the
//! DEVICE_NEEDS_RESET flag for a driver that broke the rules.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

pub struct DeviceSignals {
    irq: EventFd,
    interrupt_status: AtomicU32,
    needs_reset: AtomicBool,
}

impl DeviceSignals {
    pub fn new(irq: EventFd) -> Self {
        DeviceSignals {
            irq,
            interrupt_status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
        }
    }

    fn raise(&self, bit: u32) {
        self.interrupt_status.fetch_or(bit, Ordering::SeqCst);
        // An eventfd write fails only when its counter would overflow, and
        // then an interrupt is pending anyway.
        let _ = self.irq.write(1);
    }

    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// The device stops serving until the driver resets it (virtio 2.1.2).
    pub fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.raise(INT_CONFIG);
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.interrupt_status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Back to a snapshot's bits (no interrupt is raised: the irqchip's own
    /// state says whether one is pending).
    pub fn restore(&self, interrupt_status: u32, needs_reset: bool) {
        self.interrupt_status
            .store(interrupt_status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        self.interrupt_status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    pub fn irq_eventfd(&self) -> &EventFd {
        &self.irq
    }
}
