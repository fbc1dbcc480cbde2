//! Emulated devices. They know nothing of KVM: they sit on a `Bus` and raise
//! interrupts through an `EventFd` the builder wired to an irqfd.

pub mod bus;
pub mod legacy;
pub mod rate_limiter;
pub mod virtio;
