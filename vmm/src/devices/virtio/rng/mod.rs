//! virtio-rng, the entropy device (virtio 1.x, 5.4): every buffer the
//! driver offers is filled from the host's getrandom(2). A guest's sshd and
//! cloud-init want entropy at first boot, before the guest has gathered
//! its own. Rate-limited like the other devices, in bytes and requests.

use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::request_queue::{serve_available, RequestQueue, Served};
use super::worker::DeviceWorker;
use super::{ActivateError, ActiveQueue, DeviceSignals, VirtioDevice};
use super::{TYPE_RNG, VIRTIO_F_VERSION_1};
use crate::devices::rate_limiter::{LimitConfig, RateLimiter};
use crate::memory::GuestMemory;

const QUEUE_SIZE: u16 = 256;
/// At most this much per request: a driver asking for more gets this much
/// (the used length says so), and the worker never holds a huge buffer.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

pub struct Rng {
    worker: DeviceWorker<RngQueue>,
    limiter: Arc<RateLimiter>,
}

impl Rng {
    pub fn new() -> std::io::Result<Rng> {
        Ok(Rng {
            worker: DeviceWorker::default(),
            limiter: Arc::new(RateLimiter::new(LimitConfig::default())?),
        })
    }

    /// The device's limiter (bytes handed out and requests; unlimited
    /// until set).
    pub fn limiter(&self) -> Arc<RateLimiter> {
        self.limiter.clone()
    }
}

const NAME: &str = "rng";

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    /// virtio-rng has no config space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        _features: u64,
        mut queues: Vec<ActiveQueue>,
        signals: Arc<DeviceSignals>,
    ) -> Result<(), ActivateError> {
        self.reset();
        let Some(active) = queues.pop() else {
            return Ok(());
        };
        let handler = RngQueue {
            mem,
            queue: active.queue,
            notify: active.notify,
            signals,
            limiter: self.limiter.clone(),
            buf: Vec::new(),
        };
        self.worker.start(NAME, handler)?;
        Ok(())
    }

    fn reset(&mut self) {
        self.worker.reset();
    }

    fn quiesce(&mut self) -> Vec<virtio_queue::QueueState> {
        self.worker
            .quiesce()
            .iter()
            .map(|q| q.queue.state())
            .collect()
    }

    fn resume(&mut self) {
        self.worker.resume(NAME);
    }
}

/// Fills `buf` from getrandom(2), the one system call the device thread's
/// filter allows for it (no /dev/urandom fallback, which would need an
/// open). A signal (the vCPU kicks) can cut a large read short: go on.
fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    use rustix::rand::{getrandom, GetRandomFlags};
    let mut filled = 0;
    while filled < buf.len() {
        match getrandom(&mut buf[filled..], GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Fills one chain's device-writable buffers; returns the bytes written. A
/// descriptor the device may not write, or one outside guest memory, ends
/// the fill there: the driver gets what was written.
fn fill(mem: &GuestMemory, buf: &mut Vec<u8>, descriptors: &[Descriptor]) -> u32 {
    let mut written = 0usize;
    for d in descriptors {
        if !d.is_write_only() || written >= MAX_REQUEST_BYTES {
            break;
        }
        let n = (d.len() as usize).min(MAX_REQUEST_BYTES - written);
        buf.resize(n, 0);
        if host_random(buf).is_err() || mem.write_slice(buf, d.addr()).is_err() {
            break;
        }
        written += n;
    }
    written as u32
}

pub struct RngQueue {
    mem: GuestMemory,
    queue: Queue,
    notify: EventFd,
    signals: Arc<DeviceSignals>,
    limiter: Arc<RateLimiter>,
    buf: Vec<u8>,
}

impl RngQueue {
    /// A queue served by calling `process` directly, with no worker
    /// thread (unit tests).
    #[cfg(test)]
    pub(crate) fn detached(
        rng: &Rng,
        mem: GuestMemory,
        queue: Queue,
        signals: Arc<DeviceSignals>,
    ) -> std::io::Result<RngQueue> {
        Ok(RngQueue {
            mem,
            queue,
            notify: EventFd::new(libc::EFD_NONBLOCK)?,
            signals,
            limiter: rng.limiter.clone(),
            buf: Vec::new(),
        })
    }
}

impl RequestQueue for RngQueue {
    fn notify(&self) -> &EventFd {
        &self.notify
    }

    fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    fn process(&mut self) -> usize {
        let (mem, buf) = (&self.mem, &mut self.buf);
        serve_available(
            &mut self.queue,
            mem,
            &self.signals,
            &self.limiter,
            |chain| {
                let descriptors = super::chain::collect(chain).ok()?;
                let written = fill(mem, buf, &descriptors);
                Some(Served {
                    used_len: written,
                    charged_bytes: u64::from(written),
                })
            },
        )
    }
}

#[cfg(test)]
mod tests;
