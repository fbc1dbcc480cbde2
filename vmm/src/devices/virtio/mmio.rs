//! The virtio-mmio transport, version 2 (virtio 1.x, 4.2.2): registers,
//! feature negotiation, queue setup, DRIVER_OK activation and reset.
//! Queue notifications normally arrive through ioeventfds the builder
//! registers at `NOTIFY_OFFSET`; a notify that reaches us anyway is forwarded
//! to the same eventfd.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{status, ActiveQueue, DeviceSignals, QueueSnapshot, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemory;

/// Each device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Guests write the queue index here to notify the device.
pub const NOTIFY_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4854_5242; // "BRTH"
const CONFIG_SPACE: u64 = 0x100;

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    signals: Arc<DeviceSignals>,
    notify: Vec<EventFd>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    /// The device took DRIVER_OK and runs. Not the same as the DRIVER_OK
    /// bit: an activation that failed leaves the bit set (with FAILED or
    /// NEEDS_RESET), and a FEATURES_OK added after it activates nothing.
    active: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot create a virtio eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("invalid virtio queue size {0}")]
    QueueSize(u16),
}

/// Why a transport could not take a snapshot's state.
#[derive(Debug, thiserror::Error)]
pub enum TransportStateError {
    #[error(
        "a type-{device_type} device with {queues} queues cannot take the state of a \
         type-{saved_type} device with {saved_queues}"
    )]
    Mismatch {
        device_type: u32,
        queues: usize,
        saved_type: u32,
        saved_queues: usize,
    },
    #[error("invalid queue state: {0}")]
    Queue(#[source] virtio_queue::Error),
}

/// A transport's registers and queues, as a snapshot keeps them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub interrupt_status: u32,
    pub needs_reset: bool,
    pub queues: Vec<QueueSnapshot>,
    /// Whether the device ran; absent in snapshots from before it was
    /// recorded, which go by the DRIVER_OK bit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
}

impl MmioTransport {
    /// Stops the device (no more guest memory writes) and records the
    /// registers and the queues' live positions. `resume_device` after.
    pub fn quiesce_for_snapshot(&mut self) -> TransportSnapshot {
        let live = self.device.quiesce();
        let queues = if live.len() == self.queues.len() {
            live
        } else {
            self.queues.iter().map(|q| q.state()).collect()
        };
        TransportSnapshot {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            interrupt_status: self.signals.interrupt_status(),
            needs_reset: self.signals.needs_reset(),
            queues: queues.into_iter().map(Into::into).collect(),
            active: Some(self.active),
        }
    }

    pub fn resume_device(&mut self) {
        self.device.resume();
    }

    /// Continues from a snapshot: registers, queues, and (when the driver
    /// had set DRIVER_OK) a running device.
    pub fn restore(&mut self, s: &TransportSnapshot) -> Result<(), TransportStateError> {
        if s.device_type != self.device.device_type() || s.queues.len() != self.queues.len() {
            return Err(TransportStateError::Mismatch {
                device_type: self.device.device_type(),
                queues: self.queues.len(),
                saved_type: s.device_type,
                saved_queues: s.queues.len(),
            });
        }
        for (queue, saved) in self.queues.iter_mut().zip(&s.queues) {
            *queue = Queue::try_from(virtio_queue::QueueState::from(*saved))
                .map_err(TransportStateError::Queue)?;
        }
        self.status = s.status;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.signals.restore(s.interrupt_status, s.needs_reset);
        let was_active = s
            .active
            .unwrap_or(s.status & status::DRIVER_OK != 0 && !s.needs_reset);
        if was_active {
            self.activate();
        }
        Ok(())
    }

    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory) -> Result<Self, TransportError> {
        let mut queues = Vec::new();
        let mut notify = Vec::new();
        for &size in device.queue_max_sizes() {
            queues.push(Queue::new(size).map_err(|_| TransportError::QueueSize(size))?);
            notify.push(EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd)?);
        }
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd)?;
        Ok(MmioTransport {
            device,
            mem,
            signals: Arc::new(DeviceSignals::new(irq)),
            notify,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            active: false,
        })
    }

    /// The eventfd the builder wires to the device's interrupt line (irqfd).
    pub fn irq_eventfd(&self) -> &EventFd {
        self.signals.irq_eventfd()
    }

    /// One eventfd per queue, for the builder to register as ioeventfds with
    /// the queue index as datamatch.
    pub fn notify_eventfds(&self) -> &[EventFd] {
        &self.notify
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.status & status::DRIVER_OK != 0 {
            // Queue layout is frozen once the device runs.
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            0x000 => MAGIC_VALUE,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => queue.map_or(0, |q| u32::from(q.max_size())),
            0x044 => queue.map_or(0, |q| u32::from(q.ready())),
            0x060 => self.signals.interrupt_status(),
            0x070 => {
                let needs_reset = if self.signals.needs_reset() {
                    status::DEVICE_NEEDS_RESET
                } else {
                    0
                };
                self.status | needs_reset
            }
            // Config space never changes under a driver here.
            0x0fc => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x014 => self.device_features_sel = value,
            // Features are fixed once FEATURES_OK is set.
            0x020 if self.status & status::FEATURES_OK == 0 => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features =
                    (self.driver_features & !(0xffff_ffff << shift)) | (u64::from(value) << shift);
            }
            0x024 => self.driver_features_sel = value,
            0x030 => self.queue_sel = value,
            0x038 => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            0x044 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            0x050 => {
                if let Some(evt) = self.notify.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            0x064 => self.signals.ack(value),
            0x070 => self.write_status(value),
            0x080 => self.set_queue_addr(|q, v| q.set_desc_table_address(Some(v), None), value),
            0x084 => self.set_queue_addr(|q, v| q.set_desc_table_address(None, Some(v)), value),
            0x090 => self.set_queue_addr(|q, v| q.set_avail_ring_address(Some(v), None), value),
            0x094 => self.set_queue_addr(|q, v| q.set_avail_ring_address(None, Some(v)), value),
            0x0a0 => self.set_queue_addr(|q, v| q.set_used_ring_address(Some(v), None), value),
            0x0a4 => self.set_queue_addr(|q, v| q.set_used_ring_address(None, Some(v)), value),
            _ => {}
        }
    }

    fn set_queue_addr(&mut self, set: impl FnOnce(&mut Queue, u32), value: u32) {
        if let Some(q) = self.selected_queue() {
            set(q, value);
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        if value & self.status != self.status {
            // Clearing bits other than by reset is not allowed; ignore.
            return;
        }
        let mut value = value;
        if added & status::FEATURES_OK != 0 && !self.features_acceptable() {
            // FEATURES_OK does not stick: the driver reads it back and fails
            // (and a DRIVER_OK written with it activates nothing: FAILED).
            value &= !status::FEATURES_OK;
        }
        self.status = value;
        if added & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.features();
        self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self) {
        if self.status & status::FEATURES_OK == 0 {
            self.status |= status::FAILED;
            return;
        }
        let mut active = Vec::with_capacity(self.queues.len());
        for (queue, notify) in self.queues.iter().zip(&self.notify) {
            if queue.ready() && !queue.is_valid(&self.mem) {
                self.signals.set_needs_reset();
                return;
            }
            let notify = match notify.try_clone() {
                Ok(n) => n,
                Err(_) => {
                    self.status |= status::FAILED;
                    return;
                }
            };
            let Ok(queue) = Queue::try_from(queue.state()) else {
                self.signals.set_needs_reset();
                return;
            };
            active.push(ActiveQueue { queue, notify });
        }
        if let Err(e) = self.device.activate(
            self.mem.clone(),
            self.driver_features,
            active,
            self.signals.clone(),
        ) {
            eprintln!("berth-vmm: virtio device activation failed: {e}");
            self.status |= status::FAILED;
            return;
        }
        self.active = true;
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        for evt in &self.notify {
            // Drop notifications meant for the old queues.
            let _ = evt.read();
        }
        self.signals.clear();
        self.status = 0;
        self.active = false;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if data.len() == 4 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            // Registers are 32-bit only (virtio 4.2.2.1).
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        self.device.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::TransportStateError;

    #[test]
    fn a_mismatch_names_both_devices() {
        let e = TransportStateError::Mismatch {
            device_type: 2,
            queues: 1,
            saved_type: 1,
            saved_queues: 2,
        };
        assert_eq!(
            e.to_string(),
            "a type-2 device with 1 queues cannot take the state of a type-1 device with 2"
        );
    }
}
