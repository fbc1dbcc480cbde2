//! Guest RAM: anonymous mappings with a dirty bitmap, so that what our own
//! devices write is tracked next to KVM's dirty log (snapshots, migration).

//! It depends on no other module: the architecture lays it out
//! (`arch::x86_64::layout::create_guest_memory`), devices, vCPUs and
//! snapshots use it.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;

pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Byte offsets of the pages set in one region's dirty bitmap (one bit per
/// 4 KiB page, as `Vm::take_dirty` returns it), below `region_len`.
pub fn dirty_offsets(bits: &[u64], region_len: u64) -> impl Iterator<Item = u64> + '_ {
    bits.iter().enumerate().flat_map(move |(w, &word)| {
        let mut word = word;
        std::iter::from_fn(move || {
            if word == 0 {
                return None;
            }
            let bit = u64::from(word.trailing_zeros());
            word &= word - 1;
            Some((w as u64 * 64 + bit) * 4096)
        })
        .filter(move |&offset| offset < region_len)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn dirty_offsets_lists_set_bits_inside_the_region() {
        let bits = [0b1010u64, 1 << 63, 1];
        let all: Vec<u64> = super::dirty_offsets(&bits, 128 * 4096).collect();
        assert_eq!(all, vec![4096, 3 * 4096, 127 * 4096]);
    }
}
