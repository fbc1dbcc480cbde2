//! The one place where the CPUID a guest sees is decided: KVM's supported
//! set, with the topology and identity leaves rewritten per vCPU.
//!
//! Topology model: one socket, `vcpus` cores, one thread per core, APIC id =
//! vCPU index (the MP table says the same).
//!
//! No nested virtualization: VMX and SVM are hidden, as most clouds do by
//! default. A guest that sees them loads its own KVM, whose state (nested
//! VMCBs, EFER.SVME) no snapshot or migration of ours carries; a Debian
//! cloud image did exactly that, and hung in its reboot path.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_THERMAL_POWER: u32 = 0x6;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_SVM: u32 = 0x8000_000a;

const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: Intel VT-x.
const ECX_VMX: u32 = 1 << 5;
/// Leaf 0x8000_0001 ECX: AMD-V.
const ECX_SVM: u32 = 1 << 2;
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
                entry.ecx = (entry.ecx | ECX_HYPERVISOR) & !ECX_VMX;
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
            // No virtual PMU: a guest must not program counters we do not
            // save; no nested virtualization (the module comment says why).
            LEAF_PERFMON | LEAF_SVM => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => topology_leaf(entry, apic_id, vcpus),
            LEAF_AMD_SIZE_IDS => {
                entry.ecx = (entry.ecx & !0xf0ff) | (bits_for(vcpus) << 12) | (vcpus - 1).min(255);
            }
            LEAF_EXT_FEATURES => entry.ecx &= !ECX_SVM,
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
    fn a_guest_sees_no_vmx_or_svm() {
        let mut leaf1 = entry(1, 0);
        leaf1.ecx = ECX_VMX | 1;
        let mut ext = entry(LEAF_EXT_FEATURES, 0);
        ext.ecx = ECX_SVM | 1;
        let mut svm = entry(LEAF_SVM, 0);
        (svm.eax, svm.ebx, svm.edx) = (1, 0x8000, 0x1ff);
        let mut cpuid = CpuId::from_entries(&[leaf1, ext, svm]).unwrap();
        normalize(&mut cpuid, 0, 1);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ecx & (ECX_VMX | 1), 1, "VMX hidden, the rest kept");
        assert_eq!(e[1].ecx, 1, "SVM hidden, the rest kept");
        assert_eq!((e[2].eax, e[2].ebx, e[2].ecx, e[2].edx), (0, 0, 0, 0));
    }

    #[test]
    fn bits_for_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 64].map(bits_for), [0, 1, 2, 2, 3, 6]);
    }
}

/// One CPUID register of feature bits, as the migration hello carries it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FeatureWord {
    pub leaf: u32,
    pub subleaf: u32,
    pub register: String,
    pub bits: u32,
}

/// The registers whose bits tell what instructions a guest may use; a
/// destination must have every bit the guest was given.
const FEATURE_REGISTERS: [(u32, u32, &str); 8] = [
    (LEAF_FEATURES, 0, "ecx"),
    (LEAF_FEATURES, 0, "edx"),
    (0x7, 0, "ebx"),
    (0x7, 0, "ecx"),
    (0x7, 0, "edx"),
    (0xd, 1, "eax"),
    (LEAF_EXT_FEATURES, 0, "ecx"),
    (LEAF_EXT_FEATURES, 0, "edx"),
];

/// Bits `normalize` sets itself, so they say nothing about the host.
fn synthesized(leaf: u32, register: &str) -> u32 {
    match (leaf, register) {
        (LEAF_FEATURES, "ecx") => ECX_HYPERVISOR,
        (LEAF_FEATURES, "edx") => EDX_HTT,
        _ => 0,
    }
}

pub fn feature_words(entries: &[kvm_cpuid_entry2]) -> Vec<FeatureWord> {
    FEATURE_REGISTERS
        .iter()
        .map(|&(leaf, subleaf, register)| {
            let bits = entries
                .iter()
                .find(|e| e.function == leaf && e.index == subleaf)
                .map(|e| match register {
                    "eax" => e.eax,
                    "ebx" => e.ebx,
                    "ecx" => e.ecx,
                    _ => e.edx,
                })
                .unwrap_or(0);
            FeatureWord {
                leaf,
                subleaf,
                register: register.to_string(),
                bits: bits & !synthesized(leaf, register),
            }
        })
        .collect()
}

/// What `wanted` has that `have` lacks, one entry per register, as text
/// ("leaf 0x7.0 ebx bits 0x20"); empty when `have` covers it.
pub fn missing_features(wanted: &[FeatureWord], have: &[FeatureWord]) -> Vec<String> {
    wanted
        .iter()
        .filter_map(|w| {
            let present = have
                .iter()
                .find(|h| h.leaf == w.leaf && h.subleaf == w.subleaf && h.register == w.register)
                .map(|h| h.bits)
                .unwrap_or(0);
            let missing = w.bits & !present;
            (missing != 0).then(|| {
                format!(
                    "leaf {:#x}.{} {} bits {missing:#x}",
                    w.leaf, w.subleaf, w.register
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod feature_tests {
    use super::*;

    #[test]
    fn a_missing_bit_is_named_and_synthesized_bits_are_ignored() {
        let guest = [kvm_cpuid_entry2 {
            function: 1,
            ecx: ECX_HYPERVISOR | 0b101,
            edx: EDX_HTT | 1,
            ..Default::default()
        }];
        let host = [kvm_cpuid_entry2 {
            function: 1,
            ecx: 0b001,
            edx: 1,
            ..Default::default()
        }];
        let missing = missing_features(&feature_words(&guest), &feature_words(&host));
        assert_eq!(missing, vec!["leaf 0x1.0 ecx bits 0x4".to_string()]);
        assert!(missing_features(&feature_words(&host), &feature_words(&guest)).is_empty());
    }
}
