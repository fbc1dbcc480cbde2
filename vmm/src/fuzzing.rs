//! Entry points for fuzzing: each takes arbitrary bytes, builds what it
//! needs (a small guest memory, a split virtqueue laid out by the bytes, a
//! state file, a frame stream) and drives the real parsing code with it.
//! `fuzz/` runs them under libFuzzer; the tests below run every committed
//! corpus and regression input through them, so a crash input copied into
//! `fuzz/regressions/<target>/` fails `cargo test` until it is fixed.
//!
//! None of them may panic, hang or allocate without bound for any input;
//! errors are expected. Where a property can be checked (a read-only disk
//! stays unchanged, a transport's snapshot restores into an equal one), it is
//! asserted, so the fuzzer finds logic errors too, not only crashes.
//! See docs/fuzzing.md.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::create_guest_memory;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::block::{Block, BlockQueue, SECTOR_SIZE};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::tap::{Tap, VNET_HDR_LEN};
use crate::devices::virtio::net::{NetQueues, MAX_FRAME};
use crate::devices::virtio::request_queue::RequestQueue;
use crate::devices::virtio::{
    chain, read_config_bytes, ActivateError, ActiveQueue, DeviceSignals, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMemory;
use crate::snapshot::{self, VmSnapshot};

mod migration_frames;
// What the tests of the migration target name through `super::*`.
#[cfg(test)]
use crate::migration::protocol::{self, FrameType, ProtocolError};
#[cfg(test)]
use migration_frames::migration;
pub use migration_frames::migration_frames;

/// Guest RAM of every target: small, so that the fuzzer's addresses land in
/// it often, and cheap to map for each input.
pub const MEM_SIZE: u64 = 64 << 10;
/// The devices' queue maximum (virtio-blk and virtio-net offer 256).
const QUEUE_MAX: u16 = 256;
/// Where an idle second queue lives (the net targets exercise one queue).
const IDLE_QUEUE: u64 = MEM_SIZE - 0x100;
/// Register accesses per virtio-mmio input.
const MAX_MMIO_OPS: usize = 512;
/// Chains the virtio-mmio target's device serves per activation.
const SERVE_CHAINS: u16 = 16;
/// The memory file of the snapshot target.
const SNAPSHOT_MEMORY: u64 = 16 << 10;
const MMIO_MAGIC: u32 = 0x7472_6976;

/// Fixed-size fields off the front of fuzz input; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let head = self.take(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn rest(self) -> &'a [u8] {
        self.0
    }
}

/// MEM_SIZE bytes of guest RAM starting with `contents`.
fn guest_memory(contents: &[u8]) -> GuestMemory {
    let mem = create_guest_memory(MEM_SIZE).expect("64 KiB of anonymous memory");
    let n = contents.len().min(MEM_SIZE as usize);
    mem.write_slice(&contents[..n], GuestAddress(0))
        .expect("the contents fit the region");
    mem
}

fn signals() -> Arc<DeviceSignals> {
    Arc::new(DeviceSignals::new(
        EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd"),
    ))
}

/// Where a split virtqueue of `size` entries lives when laid out from
/// `base`: descriptor table, available ring, used ring (4-byte aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rings {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

pub fn rings(size: u16, base: u64) -> Rings {
    let size = u64::from(size);
    let avail = base + 16 * size;
    Rings {
        desc: base,
        avail,
        used: (avail + 6 + 2 * size + 3) & !3,
    }
}

/// A ready queue as a driver sets it up through the transport, continuing
/// at `next_avail` (as after a restore); None when the transport would not
/// activate it (it does not fit guest memory).
fn split_queue(
    mem: &GuestMemory,
    size: u16,
    base: u64,
    event_idx: bool,
    next_avail: u16,
) -> Option<Queue> {
    let r = rings(size, base);
    let mut q = Queue::new(QUEUE_MAX).ok()?;
    q.set_size(size);
    q.set_desc_table_address(Some(r.desc as u32), Some((r.desc >> 32) as u32));
    q.set_avail_ring_address(Some(r.avail as u32), Some((r.avail >> 32) as u32));
    q.set_used_ring_address(Some(r.used as u32), Some((r.used >> 32) as u32));
    q.set_event_idx(event_idx);
    q.set_ready(true);
    q.set_next_avail(next_avail);
    q.set_next_used(next_avail);
    q.is_valid(mem).then_some(q)
}

/// A per-thread scratch directory, removed when the thread ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

thread_local! {
    static SCRATCH: Scratch = {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("berth-fuzz-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch directory under TMPDIR");
        Scratch(dir)
    };
}

fn scratch(sub: &str) -> PathBuf {
    let dir = SCRATCH.with(|s| s.0.join(sub));
    std::fs::create_dir_all(&dir).expect("a scratch directory under TMPDIR");
    dir
}

/// A datagram socket pair standing in for a tap: whole frames both ways.
fn tap_pair() -> (Tap, UnixDatagram) {
    let (ours, peer) = UnixDatagram::pair().expect("a socket pair");
    ours.set_nonblocking(true).expect("non-blocking");
    peer.set_nonblocking(true).expect("non-blocking");
    let file = File::from(OwnedFd::from(ours));
    (Tap::from_file_unchecked(file, "fuzz0"), peer)
}

/// virtio-blk: byte 0 = flags (bit 0 read-only disk, bit 1 EVENT_IDX,
/// bits 2-4 log2 of the queue size), byte 1 = disk size in sectors (mod 17),
/// bytes 2-3 = the queue's next available index; the rest is guest memory
/// from address 0, where the queue's rings start (see `rings`), then
/// headers, data and status bytes wherever the descriptors point.
pub fn virtio_blk_requests(data: &[u8]) {
    blk(data);
}

/// What serving a queue left behind, for the tests to look at.
#[cfg_attr(not(test), allow(dead_code))]
struct Served {
    mem: GuestMemory,
    signals: Arc<DeviceSignals>,
    /// Frames lost (net).
    dropped: u64,
    /// Frames that reached the tap (net transmit).
    frames: Vec<Vec<u8>>,
}

fn blk(data: &[u8]) -> Option<Served> {
    let mut input = Input(data);
    let flags = input.u8();
    let sectors = u64::from(input.u8() % 17);
    let next_avail = input.u16();
    let read_only = flags & 1 != 0;
    let size = 1u16 << ((flags >> 2) & 7);
    let mem = guest_memory(input.rest());
    let queue = split_queue(&mem, size, 0, flags & 2 != 0, next_avail)?;
    let path = scratch("blk").join("disk.img");
    let disk = File::create(&path).expect("a scratch disk");
    disk.set_len(sectors * SECTOR_SIZE).expect("sized");
    drop(disk);
    let block = Block::open(&path, read_only, Some("fuzz-serial")).expect("the scratch disk");
    let signals = signals();
    let mut q =
        BlockQueue::detached(&block, mem.clone(), queue, signals.clone()).expect("an eventfd");
    q.process();
    if signals.needs_reset() {
        // Stops serving until the driver resets the device.
        assert_eq!(q.process(), 0);
    }
    let after = std::fs::read(&path).expect("the scratch disk");
    // Requests never change the disk's size, and a read-only disk not at all.
    assert_eq!(after.len() as u64, sectors * SECTOR_SIZE);
    if read_only {
        assert!(
            after.iter().all(|&b| b == 0),
            "a read-only disk was written"
        );
    }
    Some(Served {
        mem,
        signals,
        dropped: 0,
        frames: Vec::new(),
    })
}

/// virtio-net transmit: byte 0 = flags (bits 0-2 log2 of the queue size,
/// bit 3 EVENT_IDX), bytes 1-2 = next available index; the rest is guest
/// memory from address 0 with the transmit queue's rings first.
pub fn virtio_net_tx(data: &[u8]) {
    net_tx(data);
}

fn net_tx(data: &[u8]) -> Option<Served> {
    let mut input = Input(data);
    let flags = input.u8();
    let next_avail = input.u16();
    let size = 1u16 << (flags & 7);
    let mem = guest_memory(input.rest());
    let tx = split_queue(&mem, size, 0, flags & 8 != 0, next_avail)?;
    let rx = split_queue(&mem, 1, IDLE_QUEUE, false, 0).expect("the idle queue fits");
    let (tap, peer) = tap_pair();
    let signals = signals();
    let mut q = NetQueues::detached(mem.clone(), rx, tx, signals.clone(), tap).expect("eventfds");
    q.transmit();
    // What reached the tap: whole frames with a header and no offload
    // request (none was negotiated), never larger than a frame can be.
    let mut buf = vec![0u8; MAX_FRAME + 1];
    let mut frames = Vec::new();
    while let Ok(n) = peer.recv(&mut buf) {
        assert!(n > VNET_HDR_LEN && n <= MAX_FRAME, "a {n}-byte frame");
        assert!(buf[..VNET_HDR_LEN].iter().all(|&b| b == 0), "offloads");
        frames.push(buf[..n].to_vec());
    }
    // Transmitting writes only the used ring: what the ring offered is all.
    assert!(frames.len() <= usize::from(size));
    Some(Served {
        mem,
        signals,
        dropped: q.dropped(),
        frames,
    })
}

/// virtio-net receive: byte 0 = flags (as for transmit), bytes 1-2 = next
/// available index, byte 3 = frames waiting on the tap (mod 9), then each
/// frame as a u16 length and that many bytes (padded with 0xa5 when the
/// input ends); the rest is guest memory with the receive queue first.
pub fn virtio_net_rx(data: &[u8]) {
    net_rx(data);
}

fn net_rx(data: &[u8]) -> Option<Served> {
    let mut input = Input(data);
    let flags = input.u8();
    let next_avail = input.u16();
    let count = input.u8() % 9;
    let mut frames = Vec::new();
    for _ in 0..count {
        let len = usize::from(input.u16());
        let mut frame = input.take(len).to_vec();
        frame.resize(len, 0xa5);
        frames.push(frame);
    }
    let size = 1u16 << (flags & 7);
    let mem = guest_memory(input.rest());
    let rx = split_queue(&mem, size, 0, flags & 8 != 0, next_avail)?;
    let tx = split_queue(&mem, 1, IDLE_QUEUE, false, 0).expect("the idle queue fits");
    let (tap, peer) = tap_pair();
    let mut queued = 0u64;
    for frame in &frames {
        if peer.send(frame).is_err() {
            break;
        }
        queued += 1;
    }
    let epoll = Epoll::new().expect("an epoll fd");
    let signals = signals();
    let mut q = NetQueues::detached(mem.clone(), rx, tx, signals.clone(), tap).expect("eventfds");
    q.receive(&epoll);
    assert!(q.dropped() <= queued);
    // The guest posts nothing new: a second look finds the same.
    q.receive(&epoll);
    Some(Served {
        mem,
        signals,
        dropped: q.dropped(),
        frames: Vec::new(),
    })
}

/// A device for the transport to drive: the shape of virtio-blk (type 2,
/// one queue) or virtio-net (type 1, two), or any other. It serves its
/// queues right away when activated, through the same chain checks the real
/// devices use, and never starts a thread.
struct FuzzDevice {
    kind: u32,
    sizes: Vec<u16>,
    features: u64,
    config: Vec<u8>,
    mem: Option<GuestMemory>,
    active: Vec<ActiveQueue>,
}

impl FuzzDevice {
    fn new(kind: u32, sizes: Vec<u16>) -> FuzzDevice {
        FuzzDevice {
            kind,
            sizes,
            // VERSION_1, plus a device bit and a high one beyond it.
            features: VIRTIO_F_VERSION_1 | (1 << 5) | (1 << 9) | (1 << 40),
            config: (0u8..24).collect(),
            mem: None,
            active: Vec::new(),
        }
    }

    /// The device the transport of a snapshot's `device_type` wraps.
    fn for_type(kind: u32) -> FuzzDevice {
        match kind {
            crate::devices::virtio::TYPE_NET => FuzzDevice::new(kind, vec![QUEUE_MAX; 2]),
            _ => FuzzDevice::new(kind, vec![QUEUE_MAX]),
        }
    }

    /// Completes what the driver offered on every ready queue.
    fn serve(&mut self) {
        let Some(mem) = &self.mem else { return };
        for active in &mut self.active {
            let q = &mut active.queue;
            if !q.ready() {
                continue;
            }
            // The transport hands over only queues that fit guest memory.
            assert!(q.is_valid(mem), "an invalid queue was activated");
            // A few chains per activation: the chains themselves are
            // what the block and net targets fuzz.
            for _ in 0..q.size().min(SERVE_CHAINS) {
                let Some(chain) = q.iter(mem).ok().and_then(|mut it| it.next()) else {
                    break;
                };
                let head = chain.head_index();
                if chain::collect(chain).is_err() || q.add_used(mem, head, 0).is_err() {
                    break;
                }
            }
        }
    }
}

impl VirtioDevice for FuzzDevice {
    fn device_type(&self) -> u32 {
        self.kind
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let start = offset as usize;
        if let Some(dst) = self.config.get_mut(start..) {
            let n = dst.len().min(data.len());
            dst[..n].copy_from_slice(&data[..n]);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        _features: u64,
        queues: Vec<ActiveQueue>,
        _signals: Arc<DeviceSignals>,
    ) -> Result<(), ActivateError> {
        assert_eq!(queues.len(), self.sizes.len());
        self.mem = Some(mem);
        self.active = queues;
        self.serve();
        Ok(())
    }

    fn reset(&mut self) {
        self.active.clear();
        self.mem = None;
    }

    fn quiesce(&mut self) -> Vec<virtio_queue::QueueState> {
        self.active.iter().map(|a| a.queue.state()).collect()
    }

    fn resume(&mut self) {
        self.serve();
    }
}

fn read_u32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// The virtio-mmio registers: byte 0 picks the device (0 blk-like, 1
/// net-like, else a device with `byte % 4` queues of the next u16 as their
/// maximum size); then a sequence of operations, each an opcode byte:
/// `% 6` = 0, 1 write a 32-bit register (offset u8 * 4, value u32), 2 read
/// one, 3 an access of any width at any offset (u16 offset, u8 length % 9,
/// opcode bit 7 = write), 4 write guest memory (u16 address, u8 length,
/// bytes), 5 snapshot the transport and continue on a fresh one restored
/// from it.
pub fn virtio_mmio_registers(data: &[u8]) {
    mmio(data);
}

/// The transport and guest memory after the operations.
fn mmio(data: &[u8]) -> Option<(MmioTransport, GuestMemory)> {
    let mut input = Input(data);
    let shape = input.u8();
    let (kind, sizes) = match shape {
        0 => (crate::devices::virtio::TYPE_BLOCK, vec![QUEUE_MAX]),
        1 => (crate::devices::virtio::TYPE_NET, vec![QUEUE_MAX; 2]),
        n => (u32::from(n), vec![input.u16(); usize::from(n % 4)]),
    };
    let mem = guest_memory(&[]);
    let make = || MmioTransport::new(Box::new(FuzzDevice::new(kind, sizes.clone())), mem.clone());
    // Queue sizes no transport accepts (0, or not a power of two) end here.
    let mut t = make().ok()?;
    for _ in 0..MAX_MMIO_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        match op % 6 {
            0 | 1 => {
                let offset = u64::from(input.u8()) * 4;
                t.write(offset, &input.u32().to_le_bytes());
            }
            2 => {
                read_u32(&mut t, u64::from(input.u8()) * 4);
            }
            3 => {
                let offset = u64::from(input.u16());
                let len = usize::from(input.u8() % 9);
                if op & 0x80 != 0 {
                    let mut buf = input.take(len).to_vec();
                    buf.resize(len, 0);
                    t.write(offset, &buf);
                } else {
                    let mut buf = vec![0xccu8; len];
                    t.read(offset, &mut buf);
                }
            }
            4 => {
                let addr = u64::from(input.u16());
                let len = usize::from(input.u8());
                let _ = mem.write_slice(input.take(len), GuestAddress(addr));
            }
            _ => {
                let before: Vec<u32> = (0..0x40).map(|r| read_u32(&mut t, r * 4)).collect();
                let saved = t.quiesce_for_snapshot();
                t.resume_device();
                let mut fresh = make().expect("it was built once");
                fresh
                    .restore(&saved)
                    .expect("a transport's own snapshot restores");
                let after: Vec<u32> = (0..0x40).map(|r| read_u32(&mut fresh, r * 4)).collect();
                assert_eq!(before, after, "registers differ after a restore");
                t = fresh;
            }
        }
        assert_eq!(read_u32(&mut t, 0), MMIO_MAGIC);
    }
    Some((t, mem))
}

/// The snapshot state decoder: byte 0 bit 0 clear = the rest is a whole
/// state file; set = the rest is the body, behind a header made valid here
/// (magic, version, this host's CPU vendor, the body's checksum), with each
/// `"@VENDOR@"` in it replaced by this host's CPU vendor. A state
/// that decodes then goes where a restore takes it before KVM: the VM
/// config check, the memory file's layout and diff chain (`load_memory`,
/// against a 16 KiB memory file), the serial, i8042 and virtio-mmio device
/// state, and the vCPUs' CPUID and MSR lists.
pub fn snapshot_state(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = state_text(mode, rest);
    let dir = scratch("snapshot");
    let Ok(mut state) = snapshot::decode_state(&dir.join(snapshot::STATE_FILE), &text) else {
        return;
    };
    let _ = state.config.validate();
    restore_devices(&state);
    for vcpu in &state.vcpus {
        let _ = kvm_bindings::CpuId::from_entries(&vcpu.cpuid);
        let _ = kvm_bindings::Msrs::from_entries(&vcpu.msrs);
    }
    load_snapshot_memory(&dir, &mut state);
}

/// The state file the snapshot target decodes.
fn state_text(mode: u8, rest: &[u8]) -> Vec<u8> {
    if mode & 1 == 0 {
        return rest.to_vec();
    }
    const PLACEHOLDER: &[u8] = b"\"@VENDOR@\"";
    let vendor =
        serde_json::to_vec(&berth_proto::vmm_process::host::cpu_vendor()).expect("a string");
    let mut body = Vec::with_capacity(rest.len());
    let mut i = 0;
    while i < rest.len() {
        if rest[i..].starts_with(PLACEHOLDER) {
            body.extend_from_slice(&vendor);
            i += PLACEHOLDER.len();
        } else {
            body.push(rest[i]);
            i += 1;
        }
    }
    with_valid_header(&body)
}

/// `body` behind the header `snapshot::Writer` gives a state file.
fn with_valid_header(body: &[u8]) -> Vec<u8> {
    let mut text = format!(
        "{} {} berth=fuzz vendor={} model=\"fuzz\" kvm=\"fuzz\" checksum={:016x}\n",
        snapshot::MAGIC,
        snapshot::FORMAT_VERSION,
        berth_proto::vmm_process::host::cpu_vendor(),
        snapshot::fnv1a(body)
    )
    .into_bytes();
    text.extend_from_slice(body);
    text
}

fn restore_devices(state: &VmSnapshot) {
    use crate::devices::legacy::i8042::I8042;
    use crate::devices::legacy::serial::{ConsoleOut, IrqTrigger, SerialDevice};

    let irq = IrqTrigger::new().expect("an eventfd");
    if let Ok(mut serial) =
        SerialDevice::restore(&(&state.serial).into(), irq, ConsoleOut::new(None, false))
    {
        for offset in 0..8 {
            let mut b = [0u8];
            serial.read(offset, &mut b);
        }
    }
    let (exit, _exits) = crate::exit::ExitNotifier::new();
    let mut i8042 = I8042::new(exit, EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd"));
    i8042.restore(&state.i8042);
    for _ in 0..4 {
        let mut b = [0u8];
        i8042.read(4, &mut b);
        i8042.read(0, &mut b);
    }
    let mem = guest_memory(&[]);
    for saved in &state.virtio {
        let device = FuzzDevice::for_type(saved.device_type);
        if let Ok(mut t) = MmioTransport::new(Box::new(device), mem.clone()) {
            if t.restore(saved).is_ok() {
                read_u32(&mut t, 0x070);
            }
        }
    }
}

/// `load_memory` over a scratch snapshot directory holding the state and a
/// 16 KiB memory file. A parent, wherever the state says it is, becomes a
/// scratch directory with the same state as a full snapshot (or, for a
/// parent that is the snapshot itself, the same diff again: a loop).
fn load_snapshot_memory(dir: &Path, state: &mut VmSnapshot) {
    let memory = dir.join(snapshot::MEMORY_FILE);
    let file = File::create(&memory).expect("a scratch memory file");
    file.set_len(SNAPSHOT_MEMORY).expect("sized");
    let parent = dir.join("parent");
    if let Some(named) = state.parent.take() {
        if named.as_os_str().len() % 2 == 0 {
            std::fs::create_dir_all(&parent).expect("a scratch directory");
            let (kind, dirty) = (std::mem::take(&mut state.kind), state.dirty.take());
            state.kind = "full".into();
            std::fs::write(
                parent.join(snapshot::STATE_FILE),
                snapshot::encode_state(state),
            )
            .expect("a scratch state file");
            (state.kind, state.dirty) = (kind, dirty);
            std::fs::copy(&memory, parent.join(snapshot::MEMORY_FILE)).expect("a copy");
            state.parent = Some(parent);
        } else {
            std::fs::write(
                dir.join(snapshot::STATE_FILE),
                snapshot::encode_state(state),
            )
            .expect("a scratch state file");
            state.parent = Some(dir.to_owned());
        }
    }
    if let Ok(mem) = snapshot::load_memory(dir, state) {
        assert_eq!(mem.num_regions(), state.regions.len());
    }
}

/// The saved fuzz inputs in `dir` (a corpus or regressions folder), in
/// name order, READMEs and dot files aside; for the tests that replay them.
pub fn saved_inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            p.is_file() && !name.starts_with('.') && !name.ends_with(".md")
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| std::fs::read(&p).ok().map(|bytes| (p, bytes)))
        .collect()
}

#[cfg(test)]
mod tests;
