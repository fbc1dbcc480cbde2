//! berth.v1 request bodies, converted and checked as the agent's handlers do.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| berth_agent::fuzzing::api_requests(data));
