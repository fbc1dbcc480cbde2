//! x86-64: the Linux boot protocol, ACPI tables or the MP table, CPUID and
//! initial registers.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;
