//! The tests' own ttrpc client, generated from the .proto files alone, so
//! the protocol is exercised by code that shares nothing with the agent's
//! client (nodectl, berth-proto).

const PROTO_ROOT: &str = "../proto";
include!("../proto/codegen.rs");
