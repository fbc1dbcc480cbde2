//! The one place where the CPUID a guest sees is decided: KVM's supported
//! set, with the topology and identity leaves rewritten per vCPU.
//!
//! Topology model: one socket, `vcpus` cores, one thread per core, APIC id =
//! vCPU index (the MP table says the same).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_THERMAL_POWER: u32 = 0x6;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Leaf 6 EAX bits Linux would use to drive power management we do not emulate.
const EAX_TURBO_AND_HWP: u32 = (1 << 1) | (1 << 7);

const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `count` items (ceil(log2)).
fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

fn topology_leaf(entry: &mut kvm_cpuid_entry2, apic_id: u32, vcpus: u32) {
    entry.edx = apic_id;
    match entry.index {
        0 => {
            // SMT level: one thread per core.
            entry.eax = 0;
            entry.ebx = 1;
            entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
        }
        1 => {
            entry.eax = bits_for(vcpus);
            entry.ebx = vcpus;
            entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
        }
        _ => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = entry.index;
        }
    }
}

/// Rewrites `cpuid` (KVM's supported set) for vCPU `index` of `vcpus`.
pub fn normalize(cpuid: &mut CpuId, index: u32, vcpus: u32) {
    let apic_id = index;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx =
                    (apic_id << 24) | (vcpus.min(255) << 16) | (8 << 8) | (entry.ebx & 0xff);
                entry.ecx |= ECX_HYPERVISOR;
                if vcpus > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // Cores per package − 1 in EAX[31:26]; caches are per core.
                entry.eax = (entry.eax & 0x3ff) | ((vcpus.min(64) - 1) << 26);
            }
            LEAF_THERMAL_POWER => entry.eax &= !EAX_TURBO_AND_HWP,
            // No virtual PMU: a guest must not program counters we do not save.
            LEAF_PERFMON => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => topology_leaf(entry, apic_id, vcpus),
            LEAF_AMD_SIZE_IDS => {
                entry.ecx = (entry.ecx & !0xf0ff) | (bits_for(vcpus) << 12) | (vcpus - 1).min(255);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn each_vcpu_sees_its_apic_id_and_the_core_count() {
        let mut cpuid =
            CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)])
                .unwrap();
        normalize(&mut cpuid, 3, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[2].eax, e[2].ebx, e[2].edx), (2, 4, 3));
        assert_eq!((e[2].ecx >> 8) & 0xff, LEVEL_TYPE_CORE);
        assert_eq!(e[3].ebx, 0);
    }

    #[test]
    fn bits_for_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 64].map(bits_for), [0, 1, 2, 2, 3, 6]);
    }
}
