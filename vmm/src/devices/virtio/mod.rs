//! virtio devices over the virtio-mmio transport (virtio 1.x, "modern").
//!
//! A device (`block`, `net`, `rng`) knows its features, config space and how to
//! serve its queues; the transport (`mmio`) owns the registers, feature
//! negotiation, queue setup and reset, and hands the device its queues when
//! the driver sets DRIVER_OK. Devices serve queues on their own worker thread
//! (`worker`), woken by ioeventfds, and interrupt the guest through an irqfd.

pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod request_queue;
pub mod rng;
pub mod signals;
pub mod worker;

use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;
pub use signals::DeviceSignals;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// One queue handed to a device at activation, with the eventfd the guest's
/// notifications for it arrive on.
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("cannot start the device worker: {0}")]
    Io(#[from] std::io::Error),
}

/// What a virtio device offers the transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to config space; devices here have nothing writable.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving `queues` with the negotiated `features`.
    fn activate(
        &mut self,
        mem: GuestMemory,
        features: u64,
        queues: Vec<ActiveQueue>,
        signals: std::sync::Arc<DeviceSignals>,
    ) -> Result<(), ActivateError>;
    /// Stops serving and forgets the queues (driver reset). The device must be
    /// ready to be activated again.
    fn reset(&mut self);
    /// Stops serving for a snapshot and returns the live state of each
    /// queue (empty if not active); `resume` continues from there.
    fn quiesce(&mut self) -> Vec<QueueState>;
    fn resume(&mut self);
}

/// A queue's state as a snapshot keeps it (virtio-queue's QueueState).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// Reads `data.len()` bytes of a config space laid out in `bytes` at `offset`;
/// reads past its end return zeros.
pub fn read_config_bytes(bytes: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = offset as usize;
    if let Some(src) = bytes.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
