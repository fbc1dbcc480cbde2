//! Generates berth.v1's Rust code; the generator is shared with the tests
//! crate, which builds its own independent client from the same .proto files.

const PROTO_ROOT: &str = ".";
include!("codegen.rs");
