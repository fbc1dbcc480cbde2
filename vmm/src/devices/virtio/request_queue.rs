//! The loop a request-serving device (virtio-blk, virtio-rng) runs over its
//! one queue: take each available chain the rate limit admits, serve it,
//! complete it, and interrupt the guest once at the end. A broken driver
//! (an avail index too far ahead, a malformed chain, a head outside the
//! ring) sets DEVICE_NEEDS_RESET and the device serves nothing more until
//! the driver resets it.

use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use super::worker::EventHandler;
use super::DeviceSignals;
use crate::devices::rate_limiter::RateLimiter;
use crate::memory::GuestMemory;

/// What serving one chain gave: the length the device wrote into it (the
/// used length) and the bytes the limiter charges for it.
pub struct Served {
    pub used_len: u32,
    pub charged_bytes: u64,
}

/// Serves every chain the limiter admits with `serve` (None: a chain the
/// device cannot answer, which needs a reset); returns how many completed.
pub fn serve_available(
    queue: &mut Queue,
    mem: &GuestMemory,
    signals: &DeviceSignals,
    limiter: &RateLimiter,
    mut serve: impl FnMut(DescriptorChain<&GuestMemory>) -> Option<Served>,
) -> usize {
    let mut completed = 0;
    while !signals.needs_reset() {
        let chain = match queue.iter(mem) {
            Ok(mut avail) => avail.next(),
            // An avail index more than a ring ahead: the driver is broken.
            Err(_) => {
                signals.set_needs_reset();
                break;
            }
        };
        let Some(chain) = chain else { break };
        if !limiter.admit() {
            // Left on the ring; the limiter's timer brings us back.
            queue.go_to_previous_position();
            break;
        }
        let head = chain.head_index();
        let Some(served) = serve(chain) else {
            signals.set_needs_reset();
            break;
        };
        limiter.consume(served.charged_bytes);
        if queue.add_used(mem, head, served.used_len).is_err() {
            // A head index outside the ring cannot be completed.
            signals.set_needs_reset();
            break;
        }
        completed += 1;
    }
    if completed > 0 && queue.needs_notification(mem).unwrap_or(true) {
        signals.signal_used();
    }
    completed
}

/// A device's worker state whose only event sources are its queue's
/// notifications and its limiter's timer, both of which mean "serve what is
/// available". Its worker loop is the `EventHandler` below.
pub trait RequestQueue: Send + 'static {
    fn notify(&self) -> &EventFd;
    fn limiter(&self) -> &RateLimiter;
    /// Serves every available request; returns how many completed.
    fn process(&mut self) -> usize;
}

const NOTIFY_TOKEN: u64 = 0;
const LIMITER_TOKEN: u64 = 1;

impl<T: RequestQueue> EventHandler for T {
    fn sources(&self) -> Vec<(RawFd, u64)> {
        vec![
            (self.notify().as_raw_fd(), NOTIFY_TOKEN),
            (self.limiter().timer_fd(), LIMITER_TOKEN),
        ]
    }

    fn handle(&mut self, token: u64, _epoll: &Epoll) {
        if token == LIMITER_TOKEN {
            self.limiter().timer_fired();
        } else {
            let _ = self.notify().read();
        }
        self.process();
    }
}
