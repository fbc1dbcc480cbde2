//! virtio-blk requests from a queue laid out in guest memory by the input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| berth_vmm::fuzzing::virtio_blk_requests(data));
