//! Dispatch of port I/O and MMIO accesses to the device that owns the range.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reached through a bus; `offset` is relative to its base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps a device already there")]
pub struct BusOverlap {
    pub base: u64,
    pub len: u64,
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Built before the vCPUs start and read-only afterwards, so vCPU threads
/// share it without a lock; each device has its own.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusOverlap> {
        let end = base.checked_add(len).ok_or(BusOverlap { base, len })?;
        let overlaps = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if len == 0 || overlaps {
            return Err(BusOverlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset + size as u64 <= *len).then_some((offset, dev))
    }

    /// Returns false when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned by a panicking thread is still the best
/// state we have; keep serving it rather than take the VMM down.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u8)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn accesses_reach_the_right_device_at_the_right_offset() {
        let mut bus = Bus::default();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(0x3f8, &[7]));
        assert!(!bus.read(0x400, &mut b));
        assert!(
            !bus.read(0x3ff, &mut [0u8; 2]),
            "access running past the end"
        );
        assert_eq!(dev.lock().unwrap().0, vec![(0, 7)]);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::default();
        bus.insert(0x60, 5, Arc::new(Mutex::new(Echo(Vec::new()))))
            .unwrap();
        assert!(bus
            .insert(0x64, 2, Arc::new(Mutex::new(Echo(Vec::new()))))
            .is_err());
        assert!(bus
            .insert(0x5f, 2, Arc::new(Mutex::new(Echo(Vec::new()))))
            .is_err());
        bus.insert(0x65, 1, Arc::new(Mutex::new(Echo(Vec::new()))))
            .unwrap();
    }
}
