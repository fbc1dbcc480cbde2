//! Architecture-specific boot: memory layout, boot protocol, CPU setup.

pub mod x86_64;
