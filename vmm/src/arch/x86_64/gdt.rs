//! The boot GDT and the KVM segment descriptors derived from it.

use kvm_bindings::kvm_segment;

/// Null, 64-bit code, data, TSS: what Linux's 64-bit entry expects.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
pub const CODE_INDEX: u16 = 1;
pub const DATA_INDEX: u16 = 2;
pub const TSS_INDEX: u16 = 3;

/// Packs a descriptor the way the CPU reads it: `flags` holds the access byte
/// in bits 0..8 and the G/DB/L/AVL nibble in bits 12..16.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The segment register KVM should load for descriptor `index` of `table`.
pub fn segment_from_gdt(table: &[u64], index: u16) -> kvm_segment {
    let entry = table[usize::from(index)];
    let bit = |shift: u32| ((entry >> shift) & 1) as u8;
    let granular = bit(55) == 1;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_present_64bit_and_flat() {
        let cs = segment_from_gdt(&BOOT_GDT, CODE_INDEX);
        assert_eq!((cs.present, cs.l, cs.db, cs.s, cs.type_), (1, 1, 0, 1, 0xb));
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 8));
        let tss = segment_from_gdt(&BOOT_GDT, TSS_INDEX);
        assert_eq!((tss.s, tss.type_, tss.selector), (0, 0xb, 24));
        let null = segment_from_gdt(&BOOT_GDT, 0);
        assert_eq!(null.unusable, 1);
    }
}
