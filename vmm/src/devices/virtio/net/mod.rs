//! virtio-net backed by a tap (virtio 1.x, 5.1): one receive and one
//! transmit queue, a configured MAC, no offloads (none are negotiated, and
//! a transmitted header's offload fields are cleared before the tap sees
//! them).
//!
//! Receiving: a frame read from the tap waits in `pending` until the guest
//! posts a buffer. While it waits we stop watching the tap (no busy loop)
//! and re-enable queue notifications, re-checking the ring afterwards so a
//! buffer posted in between is not missed.

pub mod tap;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use super::chain;
use super::worker::{set_watching, DeviceWorker, EventHandler};
use super::{read_config_bytes, ActivateError, ActiveQueue, DeviceSignals, VirtioDevice};
use super::{TYPE_NET, VIRTIO_F_VERSION_1};
use crate::devices::rate_limiter::{LimitConfig, RateLimiter};
use crate::memory::GuestMemory;
use tap::{Tap, VNET_HDR_LEN};

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const QUEUE_SIZE: u16 = 256;
/// Largest frame we move: a 64 KiB packet plus Ethernet and virtio headers.
pub(crate) const MAX_FRAME: usize = 65562;

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const TAP_TOKEN: u64 = 2;
const RX_LIMIT_TOKEN: u64 = 3;
const TX_LIMIT_TOKEN: u64 = 4;

/// Each direction's limiter, seen from the guest: rx is what it receives.
#[derive(Clone)]
pub struct NetLimiters {
    pub rx: Arc<RateLimiter>,
    pub tx: Arc<RateLimiter>,
}

impl NetLimiters {
    pub fn unlimited() -> std::io::Result<NetLimiters> {
        Ok(NetLimiters {
            rx: Arc::new(RateLimiter::new(LimitConfig::default())?),
            tx: Arc::new(RateLimiter::new(LimitConfig::default())?),
        })
    }
}

pub struct Net {
    tap: Tap,
    config: [u8; 6],
    worker: DeviceWorker<NetQueues>,
    limiters: NetLimiters,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> std::io::Result<Self> {
        Ok(Net {
            tap,
            config: mac,
            worker: DeviceWorker::default(),
            limiters: NetLimiters::unlimited()?,
        })
    }

    pub fn limiters(&self) -> NetLimiters {
        self.limiters.clone()
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        _features: u64,
        queues: Vec<ActiveQueue>,
        signals: Arc<DeviceSignals>,
    ) -> Result<(), ActivateError> {
        self.reset();
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Ok(());
        };
        let handler = NetQueues {
            mem,
            rx: rx.queue,
            rx_notify: rx.notify,
            tx: tx.queue,
            tx_notify: tx.notify,
            signals,
            tap: self.tap.try_clone()?,
            frame: vec![0; MAX_FRAME],
            pending: None,
            tx_buf: Vec::with_capacity(MAX_FRAME),
            dropped: 0,
            limiters: self.limiters.clone(),
        };
        let name = format!("net-{}", self.tap.name());
        self.worker.start(&name, handler)?;
        Ok(())
    }

    fn reset(&mut self) {
        self.worker.reset();
    }

    fn quiesce(&mut self) -> Vec<virtio_queue::QueueState> {
        self.worker
            .quiesce()
            .iter()
            .flat_map(|q| [q.rx.state(), q.tx.state()])
            .collect()
    }

    fn resume(&mut self) {
        self.worker.resume(&format!("net-{}", self.tap.name()));
    }
}

pub struct NetQueues {
    mem: GuestMemory,
    rx: Queue,
    rx_notify: EventFd,
    tx: Queue,
    tx_notify: EventFd,
    signals: Arc<DeviceSignals>,
    tap: Tap,
    frame: Vec<u8>,
    /// Length of a frame in `frame` still waiting for a receive buffer.
    pending: Option<usize>,
    tx_buf: Vec<u8>,
    /// Frames lost to buffers too small or unreadable.
    dropped: u64,
    limiters: NetLimiters,
}

enum Delivery {
    Delivered,
    NoBuffer,
    Broken,
}

impl NetQueues {
    /// Queues served by calling `receive` and `transmit` directly, with no
    /// worker thread (fuzzing and tests).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn detached(
        mem: GuestMemory,
        rx: Queue,
        tx: Queue,
        signals: Arc<DeviceSignals>,
        tap: Tap,
    ) -> std::io::Result<NetQueues> {
        Ok(NetQueues {
            mem,
            rx,
            rx_notify: EventFd::new(libc::EFD_NONBLOCK)?,
            tx,
            tx_notify: EventFd::new(libc::EFD_NONBLOCK)?,
            signals,
            tap,
            frame: vec![0; MAX_FRAME],
            pending: None,
            tx_buf: Vec::with_capacity(MAX_FRAME),
            dropped: 0,
            limiters: NetLimiters::unlimited()?,
        })
    }

    /// Frames lost so far (buffers too small or unreadable, a full tap).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Copies `data` across the writable descriptors of one chain; returns
    /// the bytes written, or None when the chain cannot take it all.
    fn scatter(&self, descs: &[Descriptor], data: &[u8]) -> Option<u32> {
        let mut done = 0usize;
        for d in descs {
            if done == data.len() {
                break;
            }
            if !d.is_write_only() {
                return None;
            }
            let n = (d.len() as usize).min(data.len() - done);
            self.mem.write_slice(&data[done..done + n], d.addr()).ok()?;
            done += n;
        }
        (done == data.len()).then_some(done as u32)
    }

    fn deliver_pending(&mut self) -> Delivery {
        let Some(len) = self.pending else {
            return Delivery::Delivered;
        };
        let chain = match self.rx.iter(&self.mem) {
            Ok(mut avail) => avail.next(),
            Err(_) => return Delivery::Broken,
        };
        let Some(chain) = chain else {
            return Delivery::NoBuffer;
        };
        let head = chain.head_index();
        let Ok(descs) = chain::collect(chain) else {
            return Delivery::Broken;
        };
        let used = match self.scatter(&descs, &self.frame[..len]) {
            Some(n) => n,
            None => {
                self.dropped += 1;
                0
            }
        };
        if self.rx.add_used(&self.mem, head, used).is_err() {
            return Delivery::Broken;
        }
        self.pending = None;
        Delivery::Delivered
    }

    /// Moves frames from the tap into receive buffers until one side runs dry.
    pub(crate) fn receive(&mut self, epoll: &Epoll) {
        let mut delivered = false;
        while !self.signals.needs_reset() {
            if self.pending.is_none() {
                if !self.limiters.rx.admit() {
                    // Frames wait in the tap; the limiter's timer resumes us.
                    let _ = set_watching(epoll, self.tap.as_raw_fd(), TAP_TOKEN, false);
                    break;
                }
                match self.tap.read_frame(&mut self.frame) {
                    Ok(n) if n >= VNET_HDR_LEN => {
                        // No mergeable buffers: every frame is one buffer.
                        self.frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                        self.pending = Some(n);
                        self.limiters.rx.consume((n - VNET_HDR_LEN) as u64);
                    }
                    Ok(_) => continue,
                    Err(_) => break, // WouldBlock: the tap is empty.
                }
            }
            match self.deliver_pending() {
                Delivery::Delivered => delivered = true,
                Delivery::Broken => {
                    self.signals.set_needs_reset();
                    break;
                }
                Delivery::NoBuffer => {
                    // Ask for a notification, then look once more: the guest
                    // may have posted a buffer before it saw the request.
                    if let Ok(true) = self.rx.enable_notification(&self.mem) {
                        continue;
                    }
                    let _ = set_watching(epoll, self.tap.as_raw_fd(), TAP_TOKEN, false);
                    break;
                }
            }
        }
        if delivered && self.rx.needs_notification(&self.mem).unwrap_or(true) {
            self.signals.signal_used();
        }
    }

    /// Sends every frame the guest queued for transmission.
    pub(crate) fn transmit(&mut self) {
        let mut completed = false;
        while !self.signals.needs_reset() {
            let chain = match self.tx.iter(&self.mem) {
                Ok(mut avail) => avail.next(),
                Err(_) => {
                    self.signals.set_needs_reset();
                    break;
                }
            };
            let Some(chain) = chain else { break };
            if !self.limiters.tx.admit() {
                // Left on the ring; the limiter's timer brings us back.
                self.tx.go_to_previous_position();
                break;
            }
            let head = chain.head_index();
            let Ok(descs) = chain::collect(chain) else {
                self.signals.set_needs_reset();
                break;
            };
            if self.gather(&descs) {
                let frame_bytes = self.tx_buf.len() - VNET_HDR_LEN;
                self.limiters.tx.consume(frame_bytes as u64);
                // A full tap queue drops the frame, as a NIC would.
                if self.tap.write_frame(&self.tx_buf).is_err() {
                    self.dropped += 1;
                }
            } else {
                self.dropped += 1;
            }
            if self.tx.add_used(&self.mem, head, 0).is_err() {
                self.signals.set_needs_reset();
                break;
            }
            completed = true;
        }
        if completed && self.tx.needs_notification(&self.mem).unwrap_or(true) {
            self.signals.signal_used();
        }
    }

    /// Collects one frame into `tx_buf`; false if the chain is unusable.
    fn gather(&mut self, descs: &[Descriptor]) -> bool {
        self.tx_buf.clear();
        for d in descs {
            let len = d.len() as usize;
            if d.is_write_only() || self.tx_buf.len() + len > MAX_FRAME {
                return false;
            }
            let start = self.tx_buf.len();
            self.tx_buf.resize(start + len, 0);
            if self
                .mem
                .read_slice(&mut self.tx_buf[start..], GuestAddress(d.addr().0))
                .is_err()
            {
                return false;
            }
        }
        if self.tx_buf.len() <= VNET_HDR_LEN {
            return false;
        }
        // No offloads were negotiated: the tap must not act on any.
        self.tx_buf[..VNET_HDR_LEN].fill(0);
        true
    }
}

impl EventHandler for NetQueues {
    fn sources(&self) -> Vec<(RawFd, u64)> {
        vec![
            (self.rx_notify.as_raw_fd(), RX_TOKEN),
            (self.tx_notify.as_raw_fd(), TX_TOKEN),
            (self.tap.as_raw_fd(), TAP_TOKEN),
            (self.limiters.rx.timer_fd(), RX_LIMIT_TOKEN),
            (self.limiters.tx.timer_fd(), TX_LIMIT_TOKEN),
        ]
    }

    fn handle(&mut self, token: u64, epoll: &Epoll) {
        match token {
            RX_TOKEN => {
                let _ = self.rx_notify.read();
                // New buffers: deliver what waits and listen to the tap again.
                let _ = set_watching(epoll, self.tap.as_raw_fd(), TAP_TOKEN, true);
                self.receive(epoll);
            }
            TX_TOKEN => {
                let _ = self.tx_notify.read();
                self.transmit();
            }
            TAP_TOKEN => self.receive(epoll),
            RX_LIMIT_TOKEN => {
                self.limiters.rx.timer_fired();
                let _ = set_watching(epoll, self.tap.as_raw_fd(), TAP_TOKEN, true);
                self.receive(epoll);
            }
            TX_LIMIT_TOKEN => {
                self.limiters.tx.timer_fired();
                self.transmit();
            }
            _ => {}
        }
    }
}

pub use berth_proto::vmm_process::config::parse_mac;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_parse_strictly() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:0f"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 0x0f])
        );
        for bad in [
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
            "",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
