//! One virtio-blk request: a device-readable header, data buffers, and a
//! device-writable status byte. Everything about the chain is checked
//! before the disk is touched; a request that breaks the rules gets
//! VIRTIO_BLK_S_IOERR (or UNSUPP), never a panic.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::ID_BYTES;
use crate::devices::virtio::chain;
use crate::memory::GuestMemory;

pub const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: u32 = 16;
/// Disk I/O goes through a bounce buffer of at most this much at a time.
const CHUNK: usize = 1 << 20;

pub(super) const T_IN: u32 = 0;
pub(super) const T_OUT: u32 = 1;
pub(super) const T_FLUSH: u32 = 4;
pub(super) const T_GET_ID: u32 = 8;

pub(super) const S_OK: u8 = 0;
pub(super) const S_IOERR: u8 = 1;
pub(super) const S_UNSUPP: u8 = 2;

pub struct Disk {
    pub file: Arc<File>,
    pub read_only: bool,
    /// In sectors.
    pub capacity: u64,
    pub id: [u8; ID_BYTES],
}

/// Serves one request; returns the used length (bytes written into guest
/// memory, status byte included), or None for a chain so broken that no
/// status can be given (a loop, no status buffer): the device then asks the
/// driver for a reset.
pub fn serve(
    disk: &Disk,
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    buf: &mut Vec<u8>,
) -> Option<u32> {
    let descs = chain::collect(chain).ok()?;
    let status_desc = match descs.last() {
        Some(d) if descs.len() >= 2 && d.is_write_only() && d.len() >= 1 => *d,
        _ => return None,
    };
    let (status, written) = match execute(disk, mem, &descs[..descs.len() - 1], buf) {
        Ok(written) => (S_OK, written),
        Err(status) => (status, 0),
    };
    match mem.write_obj(status, status_desc.addr()) {
        Ok(()) => Some(written + 1),
        Err(_) => None,
    }
}

/// Runs the request; Ok(bytes written to the guest) or Err(status).
fn execute(
    disk: &Disk,
    mem: &GuestMemory,
    descs: &[Descriptor],
    buf: &mut Vec<u8>,
) -> Result<u32, u8> {
    let header = descs[0];
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(S_IOERR);
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| S_IOERR)?;
    let kind = u32::from_le_bytes(raw[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(raw[8..16].try_into().unwrap());
    let data = &descs[1..];

    match kind {
        T_IN | T_OUT => {
            let device_writes = kind == T_IN;
            if kind == T_OUT && disk.read_only {
                return Err(S_IOERR);
            }
            let total = check_data(mem, data, device_writes)?;
            if total % SECTOR_SIZE != 0 {
                return Err(S_IOERR);
            }
            let offset = sector.checked_mul(SECTOR_SIZE).ok_or(S_IOERR)?;
            let end = offset.checked_add(total).ok_or(S_IOERR)?;
            if end > disk.capacity * SECTOR_SIZE {
                return Err(S_IOERR);
            }
            transfer(disk, mem, data, offset, device_writes, buf)?;
            // A chain carries less than 4 GiB (virtio-queue ends it otherwise).
            Ok(if device_writes { total as u32 } else { 0 })
        }
        T_FLUSH => {
            if !disk.read_only {
                disk.file.sync_data().map_err(|_| S_IOERR)?;
            }
            Ok(0)
        }
        T_GET_ID => {
            let desc = match data {
                [d] if d.is_write_only() && d.len() > 0 => *d,
                _ => return Err(S_IOERR),
            };
            let n = (desc.len() as usize).min(ID_BYTES);
            mem.write_slice(&disk.id[..n], desc.addr())
                .map_err(|_| S_IOERR)?;
            Ok(n as u32)
        }
        _ => Err(S_UNSUPP),
    }
}

/// Checks every data buffer: non-empty, in guest memory, in the direction
/// the request needs. Returns the total length.
fn check_data(mem: &GuestMemory, data: &[Descriptor], device_writes: bool) -> Result<u64, u8> {
    if data.is_empty() {
        return Err(S_IOERR);
    }
    let mut total = 0u64;
    for d in data {
        let in_memory = mem.check_range(d.addr(), d.len() as usize);
        if d.len() == 0 || d.is_write_only() != device_writes || !in_memory {
            return Err(S_IOERR);
        }
        total += u64::from(d.len());
    }
    Ok(total)
}

/// Moves the data between the disk at `offset` and the guest buffers.
fn transfer(
    disk: &Disk,
    mem: &GuestMemory,
    data: &[Descriptor],
    mut offset: u64,
    device_writes: bool,
    buf: &mut Vec<u8>,
) -> Result<(), u8> {
    for d in data {
        let mut done = 0usize;
        let len = d.len() as usize;
        while done < len {
            let n = (len - done).min(CHUNK);
            if buf.len() < n {
                buf.resize(n, 0);
            }
            let chunk = &mut buf[..n];
            let addr = GuestAddress(d.addr().0 + done as u64);
            if device_writes {
                disk.file
                    .read_exact_at(chunk, offset)
                    .map_err(|_| S_IOERR)?;
                mem.write_slice(chunk, addr).map_err(|_| S_IOERR)?;
            } else {
                mem.read_slice(chunk, addr).map_err(|_| S_IOERR)?;
                disk.file.write_all_at(chunk, offset).map_err(|_| S_IOERR)?;
            }
            done += n;
            offset += n as u64;
        }
    }
    Ok(())
}
