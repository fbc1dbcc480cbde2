//! The snapshot state file decoder and what a restore does with its result.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| berth_vmm::fuzzing::snapshot_state(data));
