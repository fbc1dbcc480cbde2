//! Walking a descriptor chain the guest offered, without trusting it.
//! virtio-queue's iterator ends a chain quietly on a loop, a bad `next`
//! index or an unreadable descriptor; here those are errors, so a device can
//! answer them instead of acting on half a request.

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory as GuestMemoryTrait;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("the descriptor chain is empty (bad head index)")]
    Empty,
    #[error("the descriptor chain loops, is longer than the queue, or points outside its table")]
    Malformed,
}

/// The descriptors of `chain`, in order.
pub fn collect<M>(chain: DescriptorChain<M>) -> Result<Vec<Descriptor>, ChainError>
where
    M: Deref,
    M::Target: GuestMemoryTrait,
{
    let descriptors: Vec<Descriptor> = chain.collect();
    match descriptors.last() {
        None => Err(ChainError::Empty),
        // The walk stopped although the last descriptor names a next one.
        Some(last) if last.has_next() => Err(ChainError::Malformed),
        Some(_) => Ok(descriptors),
    }
}
