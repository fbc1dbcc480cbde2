//! Guest RAM: anonymous mappings with a dirty bitmap, so that what our own
//! devices write is tracked next to KVM's dirty log (snapshots, migration).

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::ram_regions;

pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

pub fn create_guest_memory(size: u64) -> Result<GuestMemory, vm_memory::mmap::FromRangesError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemory::from_ranges(&ranges)
}
