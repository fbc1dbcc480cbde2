//! The virtio-mmio register interface driven by a sequence of accesses.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| berth_vmm::fuzzing::virtio_mmio_registers(data));
