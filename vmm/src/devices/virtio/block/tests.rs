//! Requests through a real split queue in guest memory (virtio-queue's mock
//! lays the rings out), against a real file.

use std::path::PathBuf;

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::request::{S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use super::*;
use crate::arch::x86_64::layout::create_guest_memory;
use crate::devices::virtio::request_queue::RequestQueue;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const HDR: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const SECTORS: u64 = 64;

struct Rig {
    dir: PathBuf,
    path: PathBuf,
    mem: GuestMemory,
}

fn rig(name: &str) -> Rig {
    let dir = std::env::temp_dir().join(format!("berth-blk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("disk.img");
    let content: Vec<u8> = (0..SECTORS * SECTOR_SIZE)
        .map(|i| (i % 251) as u8)
        .collect();
    std::fs::write(&path, content).unwrap();
    Rig {
        dir,
        path,
        mem: create_guest_memory(1 << 20).unwrap(),
    }
}

fn queue_for(rig: &Rig, vq: &MockSplitQueue<GuestMemory>, read_only: bool) -> BlockQueue {
    let block = Block::open(&rig.path, read_only, Some("disk-serial-1")).unwrap();
    BlockQueue::detached(
        &block,
        rig.mem.clone(),
        vq.create_queue::<Queue>().unwrap(),
        Arc::new(DeviceSignals::new(EventFd::new(0).unwrap())),
    )
    .unwrap()
}

/// Descriptors (addr, len, flags) chained in table order from `first`.
fn chain(first: u16, descs: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
    descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let last = i == descs.len() - 1;
            let flags = if last { flags } else { flags | NEXT };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, first + i as u16 + 1))
        })
        .collect()
}

fn header(mem: &GuestMemory, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

fn status(mem: &GuestMemory) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

/// The (id, len) of used ring entry `i`.
fn used(vq: &MockSplitQueue<GuestMemory>, mem: &GuestMemory, i: u64) -> (u32, u32) {
    let at = vq.used_addr().0 + 4 + 8 * i;
    (
        mem.read_obj(GuestAddress(at)).unwrap(),
        mem.read_obj(GuestAddress(at + 4)).unwrap(),
    )
}

#[test]
fn write_flush_read_round_trip_through_the_file() {
    let r = rig("roundtrip");
    let vq = MockSplitQueue::new(&r.mem, 16);
    let mut q = queue_for(&r, &vq, false);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();

    r.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    header(&r.mem, T_OUT, 4);
    vq.add_desc_chains(
        &chain(0, &[(HDR, 16, 0), (DATA, 1024, 0), (STATUS, 1, WRITE)]),
        0,
    )
    .unwrap();
    assert_eq!(q.process(), 1);
    assert_eq!(status(&r.mem), S_OK);
    let file = std::fs::read(&r.path).unwrap();
    assert_eq!(&file[4 * 512..4 * 512 + 1024], &pattern[..]);
    assert_eq!(used(&vq, &r.mem, 0), (0, 1));

    header(&r.mem, T_FLUSH, 0);
    vq.add_desc_chains(&chain(3, &[(HDR, 16, 0), (STATUS, 1, WRITE)]), 3)
        .unwrap();
    assert_eq!(q.process(), 1);
    assert_eq!(status(&r.mem), S_OK);

    r.mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    header(&r.mem, T_IN, 4);
    vq.add_desc_chains(
        &chain(5, &[(HDR, 16, 0), (DATA, 1024, WRITE), (STATUS, 1, WRITE)]),
        5,
    )
    .unwrap();
    assert_eq!(q.process(), 1);
    assert_eq!(status(&r.mem), S_OK);
    let mut back = vec![0u8; 1024];
    r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
    assert_eq!(used(&vq, &r.mem, 2), (5, 1025));
    std::fs::remove_dir_all(&r.dir).unwrap();
}

#[test]
fn get_id_returns_the_serial() {
    let r = rig("getid");
    let vq = MockSplitQueue::new(&r.mem, 16);
    let mut q = queue_for(&r, &vq, false);
    header(&r.mem, T_GET_ID, 0);
    vq.add_desc_chains(
        &chain(0, &[(HDR, 16, 0), (DATA, 20, WRITE), (STATUS, 1, WRITE)]),
        0,
    )
    .unwrap();
    q.process();
    assert_eq!(status(&r.mem), S_OK);
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..13], b"disk-serial-1");
    assert_eq!(id[13..], [0; 7]);
}

#[test]
fn read_only_disk_refuses_writes_and_keeps_its_file() {
    let r = rig("readonly");
    let before = std::fs::read(&r.path).unwrap();
    let vq = MockSplitQueue::new(&r.mem, 16);
    let mut q = queue_for(&r, &vq, true);
    r.mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    header(&r.mem, T_OUT, 0);
    vq.add_desc_chains(
        &chain(0, &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)]),
        0,
    )
    .unwrap();
    q.process();
    assert_eq!(status(&r.mem), S_IOERR);
    assert_eq!(std::fs::read(&r.path).unwrap(), before);
}

/// (what, request type, sector, data descriptor, expected status)
type HostileCase = (&'static str, u32, u64, (u64, u32, u16), u8);

#[test]
fn hostile_requests_get_an_error_status() {
    let cases: [HostileCase; 6] = [
        ("past the end", T_IN, SECTORS, (DATA, 512, WRITE), S_IOERR),
        (
            "straddles the end",
            T_IN,
            SECTORS - 1,
            (DATA, 1024, WRITE),
            S_IOERR,
        ),
        (
            "outside guest memory",
            T_IN,
            0,
            (0x7f00_0000_0000, 512, WRITE),
            S_IOERR,
        ),
        ("zero length", T_IN, 0, (DATA, 0, WRITE), S_IOERR),
        ("oversized", T_IN, 0, (DATA, 0xffff_ff00, WRITE), S_IOERR),
        (
            "read into a device-readable buffer",
            T_IN,
            0,
            (DATA, 512, 0),
            S_IOERR,
        ),
    ];
    for (what, kind, sector, data, expected) in cases {
        let r = rig("hostile");
        let before = std::fs::read(&r.path).unwrap();
        let vq = MockSplitQueue::new(&r.mem, 16);
        let mut q = queue_for(&r, &vq, false);
        header(&r.mem, kind, sector);
        vq.add_desc_chains(&chain(0, &[(HDR, 16, 0), data, (STATUS, 1, WRITE)]), 0)
            .unwrap();
        assert_eq!(q.process(), 1, "{what}");
        assert_eq!(status(&r.mem), expected, "{what}");
        assert!(!q.signals.needs_reset(), "{what}");
        assert_eq!(std::fs::read(&r.path).unwrap(), before, "{what}");
    }
    let r = rig("unsupported");
    let vq = MockSplitQueue::new(&r.mem, 16);
    let mut q = queue_for(&r, &vq, false);
    header(&r.mem, 99, 0);
    vq.add_desc_chains(&chain(0, &[(HDR, 16, 0), (STATUS, 1, WRITE)]), 0)
        .unwrap();
    q.process();
    assert_eq!(status(&r.mem), S_UNSUPP);
}

#[test]
fn looping_chain_and_avail_jump_ask_for_a_reset() {
    let r = rig("loop");
    let vq = MockSplitQueue::new(&r.mem, 16);
    let mut q = queue_for(&r, &vq, false);
    header(&r.mem, T_IN, 0);
    let mut descs = chain(0, &[(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)]);
    descs[2] = RawDescriptor::from(SplitDescriptor::new(STATUS, 1, WRITE | NEXT, 0));
    vq.add_desc_chains(&descs, 0).unwrap();
    assert_eq!(q.process(), 0);
    assert!(q.signals.needs_reset());
    assert_ne!(
        q.signals.interrupt_status() & super::super::signals::INT_CONFIG,
        0
    );

    let r = rig("jump");
    let vq = MockSplitQueue::new(&r.mem, 16);
    let mut q = queue_for(&r, &vq, false);
    let avail_idx = GuestAddress(vq.avail_addr().0 + 2);
    r.mem.write_obj(16u16 + 5, avail_idx).unwrap();
    assert_eq!(q.process(), 0);
    assert!(q.signals.needs_reset());
}

#[test]
fn device_writes_mark_guest_pages_dirty() {
    let r = rig("dirty");
    let vq = MockSplitQueue::new(&r.mem, 16);
    let mut q = queue_for(&r, &vq, false);
    let region: &vm_memory::MmapRegion<AtomicBitmap> = r.mem.find_region(GuestAddress(0)).unwrap();
    let data_page = DATA as usize;
    let far_page = 0x80000usize;
    region.bitmap().reset();
    assert!(!region.bitmap().dirty_at(data_page));
    header(&r.mem, T_IN, 0);
    region.bitmap().reset();
    vq.add_desc_chains(
        &chain(0, &[(HDR, 16, 0), (DATA, 4096, WRITE), (STATUS, 1, WRITE)]),
        0,
    )
    .unwrap();
    region.bitmap().reset();
    q.process();
    assert!(
        region.bitmap().dirty_at(data_page),
        "read data landed in a dirty page"
    );
    assert!(
        region.bitmap().dirty_at(STATUS as usize),
        "the status byte's page is dirty"
    );
    assert!(
        region.bitmap().dirty_at(vq.used_addr().0 as usize),
        "the used ring's page is dirty"
    );
    assert!(
        !region.bitmap().dirty_at(far_page),
        "untouched pages stay clean"
    );
}

mod hostile_queues {
    //! Property test: whatever the guest leaves in the descriptor table,
    //! the avail ring and the request headers, serving the queue ends,
    //! never panics, never completes more than was offered, and never
    //! changes a read-only disk.
    use proptest::prelude::*;

    use super::*;

    /// (addr, len, flags, next) with addresses around the interesting spots:
    /// headers, data, the rings, the end of memory and far outside it.
    fn descriptor() -> impl Strategy<Value = (u64, u32, u16, u16)> {
        let addr = prop_oneof![
            Just(HDR),
            Just(DATA),
            Just(STATUS),
            Just(0u64),
            Just((1 << 20) - 8),
            Just(0x7f00_0000_0000u64),
            any::<u64>(),
        ];
        let len = prop_oneof![
            Just(0u32),
            Just(1),
            Just(16),
            Just(512),
            Just(4096),
            any::<u32>()
        ];
        (addr, len, 0u16..8, 0u16..24)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn any_queue_contents_are_served_safely(
            descs in proptest::collection::vec(descriptor(), 1..16),
            heads in proptest::collection::vec(0u16..24, 0..20),
            avail_idx in any::<u16>(),
            kind in prop_oneof![Just(T_IN), Just(T_OUT), Just(T_FLUSH), Just(T_GET_ID), any::<u32>()],
            sector in prop_oneof![Just(0u64), Just(SECTORS - 1), Just(SECTORS), any::<u64>()],
            read_only in any::<bool>(),
        ) {
            let r = rig("prop");
            let before = std::fs::read(&r.path).unwrap();
            let vq = MockSplitQueue::new(&r.mem, 16);
            let mut q = queue_for(&r, &vq, read_only);
            header(&r.mem, kind, sector);
            for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
                vq.desc_table().store(i as u16, raw).unwrap();
            }
            // The mock lays the used ring over avail entries 8..16, so heads
            // go in the first eight (the device reads the rest as it finds it).
            let ring = vq.avail_addr().0 + 4;
            for (i, head) in heads.iter().enumerate() {
                r.mem.write_obj(*head, GuestAddress(ring + 2 * (i as u64 % 8))).unwrap();
            }
            r.mem.write_obj(avail_idx, GuestAddress(vq.avail_addr().0 + 2)).unwrap();

            let completed = q.process();
            if avail_idx > 16 {
                // More offered than the ring holds: the driver is broken.
                prop_assert_eq!(completed, 0);
                prop_assert!(q.signals.needs_reset());
            } else {
                prop_assert!(completed <= usize::from(avail_idx));
            }
            let used_idx: u16 = r.mem.read_obj(GuestAddress(vq.used_addr().0 + 2)).unwrap();
            prop_assert_eq!(usize::from(used_idx), completed);
            if read_only {
                prop_assert_eq!(std::fs::read(&r.path).unwrap(), before);
            }
            let _ = std::fs::remove_dir_all(&r.dir);
        }
    }
}
