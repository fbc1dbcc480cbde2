//! Live migration, berth-vmm to berth-vmm over TCP: `protocol` (frames),
//! `source` (pre-copy and handover), `destination` (receive mode). The
//! protocol and its failure rules are described in PROTOCOL.md beside
//! this file.

pub mod destination;
pub mod protocol;
pub mod source;
