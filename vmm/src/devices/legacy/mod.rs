//! PC legacy devices: the 16550 console, the i8042's reset line, and the
//! port ACPI powers off and resets through.

pub mod i8042;
pub mod power;
pub mod serial;
