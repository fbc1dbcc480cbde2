//! Requests through a real split queue in guest memory.

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::arch::x86_64::layout::create_guest_memory;
use crate::devices::rate_limiter::BucketConfig;
use crate::devices::virtio::request_queue::RequestQueue;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const BUF: u64 = 0x20000;

fn rig() -> (GuestMemory, Rng) {
    (create_guest_memory(1 << 20).unwrap(), Rng::new().unwrap())
}

fn queue(mem: &GuestMemory, rng: &Rng, vq: &MockSplitQueue<GuestMemory>) -> RngQueue {
    let signals = Arc::new(DeviceSignals::new(EventFd::new(0).unwrap()));
    RngQueue::detached(
        rng,
        mem.clone(),
        vq.create_queue::<Queue>().unwrap(),
        signals,
    )
    .unwrap()
}

fn chain(first: u16, descs: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
    (descs.iter().enumerate())
        .map(|(i, &(addr, len, flags))| {
            let flags = if i + 1 < descs.len() {
                flags | NEXT
            } else {
                flags
            };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, first + i as u16 + 1))
        })
        .collect()
}

fn used_len(vq: &MockSplitQueue<GuestMemory>, mem: &GuestMemory, i: u64) -> u32 {
    mem.read_obj(GuestAddress(vq.used_addr().0 + 8 + 8 * i))
        .unwrap()
}

#[test]
fn writable_buffers_are_filled_with_random_bytes() {
    let (mem, rng) = rig();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q = queue(&mem, &rng, &vq);
    mem.write_slice(&[0u8; 4096], GuestAddress(BUF)).unwrap();
    vq.add_desc_chains(
        &chain(0, &[(BUF, 1024, WRITE), (BUF + 1024, 3072, WRITE)]),
        0,
    )
    .unwrap();
    assert_eq!(q.process(), 1);
    assert_eq!(used_len(&vq, &mem, 0), 4096);
    let mut got = vec![0u8; 4096];
    mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    // 4 KiB of getrandom output has no long run of zeros, and every byte
    // value is there often enough.
    assert!(
        got.windows(16).all(|w| w.iter().any(|&b| b != 0)),
        "zeros left"
    );
    let distinct: std::collections::BTreeSet<u8> = got.iter().copied().collect();
    assert!(
        distinct.len() > 200,
        "{} distinct byte values",
        distinct.len()
    );
    assert_eq!(rng.limiter().stats().bytes, 4096);
}

#[test]
fn a_read_only_or_outside_buffer_gets_what_was_written_before_it() {
    let (mem, rng) = rig();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q = queue(&mem, &rng, &vq);
    // Readable descriptor: nothing written, still completed.
    vq.add_desc_chains(&chain(0, &[(BUF, 64, 0)]), 0).unwrap();
    // Writable, then one past the end of guest memory.
    vq.add_desc_chains(&chain(1, &[(BUF, 64, WRITE), (1 << 30, 64, WRITE)]), 1)
        .unwrap();
    assert_eq!(q.process(), 2);
    assert_eq!(used_len(&vq, &mem, 0), 0);
    assert_eq!(used_len(&vq, &mem, 1), 64);
}

#[test]
fn a_huge_request_gets_at_most_the_cap() {
    let (mem, rng) = rig();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q = queue(&mem, &rng, &vq);
    vq.add_desc_chains(&chain(0, &[(BUF, 512 * 1024, WRITE)]), 0)
        .unwrap();
    assert_eq!(q.process(), 1);
    assert_eq!(used_len(&vq, &mem, 0), MAX_REQUEST_BYTES as u32);
}

#[test]
fn the_rate_limit_holds_requests_on_the_ring() {
    let (mem, rng) = rig();
    // 64 bytes a second: the first request's 128 bytes leave the bucket in
    // debt for about a second.
    rng.limiter().update(LimitConfig {
        bytes: BucketConfig {
            rate_per_s: 64,
            burst: 64,
        },
        ops: BucketConfig::default(),
    });
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q = queue(&mem, &rng, &vq);
    vq.add_desc_chains(&chain(0, &[(BUF, 128, WRITE)]), 0)
        .unwrap();
    vq.add_desc_chains(&chain(1, &[(BUF + 128, 128, WRITE)]), 1)
        .unwrap();
    assert_eq!(q.process(), 1, "the burst lets one request through");
    assert_eq!(q.process(), 0, "the second waits for the limiter's timer");
}
