//! The thread a virtio device serves its queues on: an epoll loop over the
//! device's event sources (queue notifications, a tap) and a stop eventfd.
//! I/O never runs on vCPU threads.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use crate::seccomp::ThreadKind;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const STOP_TOKEN: u64 = u64::MAX;

/// A device's side of the loop.
pub trait EventHandler: Send + 'static {
    /// The file descriptors to watch for input, each with the token that
    /// `handle` will be called with.
    fn sources(&self) -> Vec<(RawFd, u64)>;
    /// Called when the source with `token` is readable. `epoll` lets a
    /// handler stop or resume watching a source (e.g. a tap while the
    /// guest has no receive buffers).
    fn handle(&mut self, token: u64, epoll: &Epoll);
}

pub fn watch(epoll: &Epoll, fd: RawFd, token: u64) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )
}

/// Turns input events of an already watched `fd` on or off.
pub fn set_watching(epoll: &Epoll, fd: RawFd, token: u64, on: bool) -> io::Result<()> {
    let events = if on { EventSet::IN } else { EventSet::empty() };
    epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
}

pub struct Worker<H: EventHandler> {
    stop: EventFd,
    thread: Option<JoinHandle<H>>,
}

impl<H: EventHandler> Worker<H> {
    pub fn spawn(name: &str, mut handler: H) -> io::Result<Worker<H>> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        watch(&epoll, stop.as_raw_fd(), STOP_TOKEN)?;
        for (fd, token) in handler.sources() {
            watch(&epoll, fd, token)?;
        }
        let thread = crate::seccomp::spawn(ThreadKind::Device, name.to_string(), move || {
            let mut events = vec![EpollEvent::default(); 16];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        eprintln!("berth-vmm: device worker stopped: epoll failed: {e}");
                        return handler;
                    }
                };
                for event in &events[..n] {
                    if event.data() == STOP_TOKEN {
                        return handler;
                    }
                    handler.handle(event.data(), &epoll);
                }
            }
        })?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the loop, waits for it and hands back the device's state:
    /// after this the device touches no guest memory until it is spawned
    /// again. Dropping a worker stops it too.
    pub fn stop(mut self) -> Option<H> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Option<H> {
        let thread = self.thread.take()?;
        let _ = self.stop.write(1);
        thread.join().ok()
    }
}

impl<H: EventHandler> Drop for Worker<H> {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// A device's worker over its life: not started, running, or stopped for a
/// snapshot with its state kept so that it can run again.
pub struct DeviceWorker<H: EventHandler> {
    running: Option<Worker<H>>,
    quiesced: Option<H>,
}

impl<H: EventHandler> Default for DeviceWorker<H> {
    fn default() -> Self {
        DeviceWorker {
            running: None,
            quiesced: None,
        }
    }
}

impl<H: EventHandler> DeviceWorker<H> {
    pub fn start(&mut self, name: &str, handler: H) -> io::Result<()> {
        self.running = Some(Worker::spawn(name, handler)?);
        Ok(())
    }

    pub fn reset(&mut self) {
        // Dropping the worker stops its thread and waits for it.
        self.running = None;
        self.quiesced = None;
    }

    /// Stops the worker and keeps its state, which the snapshot reads.
    pub fn quiesce(&mut self) -> Option<&H> {
        self.quiesced = self.running.take().and_then(Worker::stop);
        self.quiesced.as_ref()
    }

    /// Runs a quiesced worker again; a device that was not running stays so.
    pub fn resume(&mut self, name: &str) {
        if let Some(handler) = self.quiesced.take() {
            match Worker::spawn(name, handler) {
                Ok(w) => self.running = Some(w),
                Err(e) => eprintln!("berth-vmm: cannot resume {name}: {e}"),
            }
        }
    }
}
