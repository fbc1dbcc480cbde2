//! virtio-blk backed by a raw file (virtio 1.x, 5.2): read, write, flush and
//! get-id, with an optional read-only mode advertised as VIRTIO_BLK_F_RO.

mod request;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::request_queue::{serve_available, RequestQueue, Served};
use super::worker::DeviceWorker;
use super::{read_config_bytes, ActivateError, ActiveQueue, DeviceSignals, VirtioDevice};
use super::{TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::devices::rate_limiter::{LimitConfig, RateLimiter};
use crate::memory::GuestMemory;
pub use request::SECTOR_SIZE;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const QUEUE_SIZE: u16 = 256;
/// Data segments per request: the ring minus the header and status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Length of the get-id answer (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk serial {0:?} is longer than {ID_BYTES} bytes")]
    SerialTooLong(String),
    #[error("cannot set up the disk's rate limiter: {0}")]
    Limiter(std::io::Error),
}

pub struct Block {
    file: Arc<File>,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_BYTES],
    config: Vec<u8>,
    worker: DeviceWorker<BlockQueue>,
    name: String,
    limiter: Arc<RateLimiter>,
}

impl Block {
    pub fn open(path: &Path, read_only: bool, serial: Option<&str>) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(open_err(std::io::Error::other("not a regular file")));
        }
        let capacity = meta.len() / SECTOR_SIZE;
        let mut id = [0u8; ID_BYTES];
        if let Some(serial) = serial {
            if serial.len() > ID_BYTES {
                return Err(BlockError::SerialTooLong(serial.to_string()));
            }
            id[..serial.len()].copy_from_slice(serial.as_bytes());
        }
        // struct virtio_blk_config: capacity @0, size_max @8, seg_max @12.
        let mut config = vec![0u8; 16];
        config[..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Block {
            file: Arc::new(file),
            read_only,
            capacity,
            id,
            config,
            worker: DeviceWorker::default(),
            name: format!(
                "blk-{}",
                path.file_name().unwrap_or_default().to_string_lossy()
            ),
            limiter: Arc::new(
                RateLimiter::new(LimitConfig::default()).map_err(BlockError::Limiter)?,
            ),
        })
    }

    /// The disk's I/O limiter (bytes and requests; unlimited until set).
    pub fn limiter(&self) -> Arc<RateLimiter> {
        self.limiter.clone()
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { VIRTIO_BLK_F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
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
        let handler = BlockQueue {
            mem,
            queue: active.queue,
            notify: active.notify,
            signals,
            disk: request::Disk {
                file: self.file.clone(),
                read_only: self.read_only,
                capacity: self.capacity,
                id: self.id,
            },
            buf: Vec::new(),
            limiter: self.limiter.clone(),
        };
        self.worker.start(&self.name, handler)?;
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
        self.worker.resume(&self.name);
    }
}

/// The worker's state: the request queue and what it needs to serve it.
pub struct BlockQueue {
    mem: GuestMemory,
    queue: Queue,
    notify: EventFd,
    signals: Arc<DeviceSignals>,
    disk: request::Disk,
    buf: Vec<u8>,
    limiter: Arc<RateLimiter>,
}

/// A request's header (16 bytes) and status byte, which are not its data.
const REQUEST_FRAMING: u64 = 17;

impl BlockQueue {
    /// A queue of `block` served by calling `process` directly, with no
    /// worker thread (fuzzing and tests).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn detached(
        block: &Block,
        mem: GuestMemory,
        queue: Queue,
        signals: Arc<DeviceSignals>,
    ) -> std::io::Result<BlockQueue> {
        Ok(BlockQueue {
            mem,
            queue,
            notify: EventFd::new(libc::EFD_NONBLOCK)?,
            signals,
            disk: request::Disk {
                file: block.file.clone(),
                read_only: block.read_only,
                capacity: block.capacity,
                id: block.id,
            },
            buf: Vec::new(),
            limiter: block.limiter.clone(),
        })
    }
}

impl RequestQueue for BlockQueue {
    fn notify(&self) -> &EventFd {
        &self.notify
    }

    fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    fn process(&mut self) -> usize {
        let (disk, mem, buf) = (&self.disk, &self.mem, &mut self.buf);
        serve_available(
            &mut self.queue,
            mem,
            &self.signals,
            &self.limiter,
            |chain| {
                let data_bytes = (chain.clone().map(|d| u64::from(d.len())))
                    .sum::<u64>()
                    .saturating_sub(REQUEST_FRAMING);
                let used_len = request::serve(disk, mem, chain, buf)?;
                Some(Served {
                    used_len,
                    charged_bytes: data_bytes,
                })
            },
        )
    }
}

#[cfg(test)]
mod tests;
