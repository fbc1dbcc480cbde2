//! PC legacy devices: the 16550 console and the i8042's reset line.

pub mod i8042;
pub mod serial;
