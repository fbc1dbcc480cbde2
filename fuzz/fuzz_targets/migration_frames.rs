//! The migration frame reader and the page, zeros and JSON payload decoders.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| berth_vmm::fuzzing::migration_frames(data));
