//! KVM state: the VM (memory slots, irqchip, PIT) and its vCPUs.

pub mod kvm;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
