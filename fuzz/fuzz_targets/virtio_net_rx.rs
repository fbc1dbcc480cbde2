//! virtio-net receive: frames from the tap into guest-posted buffers.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| berth_vmm::fuzzing::virtio_net_rx(data));
