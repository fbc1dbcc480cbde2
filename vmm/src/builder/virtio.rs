//! Placing virtio-mmio devices: each gets a 4 KiB register window in the
//! MMIO gap and its own IOAPIC line, an irqfd for interrupts and one
//! ioeventfd per queue for notifications. The guest learns the windows from
//! the DSDT, or (legacy discovery) from a `virtio_mmio.device=` word each on
//! the kernel command line.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;

use super::BuildError;
use crate::arch::x86_64::acpi::MmioWindow;
use crate::arch::x86_64::layout::MMIO_GAP_START;
use crate::config::{DiskConfig, NicConfig, VmConfig};
use crate::devices::bus::Bus;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, NOTIFY_OFFSET};
use crate::devices::virtio::net::tap::Tap;
use crate::devices::virtio::net::{parse_mac, Net};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::VirtioDevice;
use berth_proto::vmm_process::device::{Direction, LimiterId};

use crate::machine::{DeviceLimiter, Transports};
use crate::vstate::vm::Vm;

/// IOAPIC lines 5..=23 are free (0-4 are the PIT, keyboard, cascade, COM2
/// and COM1 in the MP table's ISA wiring).
const FIRST_IRQ: u32 = 5;
const LAST_IRQ: u32 = 23;
pub const MAX_DEVICES: usize = (LAST_IRQ - FIRST_IRQ + 1) as usize;
// The agent refuses a spec with more devices than this (the contract's
// MAX_DEVICES): the two must agree.
const _: () = assert!(MAX_DEVICES == berth_proto::vmm_process::config::MAX_DEVICES);

type Device = (Box<dyn VirtioDevice>, Vec<DeviceLimiter>);

fn disk_device(index: usize, disk: &DiskConfig) -> Result<Device, BuildError> {
    let block = Block::open(&disk.path, disk.read_only, disk.serial.as_deref())?;
    let limiter = block.limiter();
    limiter.update(disk.limit);
    let limiters = vec![DeviceLimiter {
        id: LimiterId::disk(index),
        limiter,
    }];
    Ok((Box::new(block), limiters))
}

fn nic_device(index: usize, nic: &NicConfig) -> Result<Device, BuildError> {
    let tap = match (&nic.tap, nic.tap_fd) {
        (Some(name), _) => Tap::open(name)?,
        (None, Some(fd)) => {
            // SAFETY: the config hands this fd to berth-vmm (inherited from
            // the process that started it); nothing else in the VMM owns it.
            Tap::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })?
        }
        (None, None) => return Err(crate::config::ConfigError::NicBackend(index).into()),
    };
    let mac = match &nic.mac {
        Some(text) => parse_mac(text).ok_or_else(|| crate::config::ConfigError::NicMac {
            index,
            mac: text.clone(),
        })?,
        // Locally administered, unicast, stable per position and process.
        None => {
            let pid = std::process::id().to_be_bytes();
            [0x02, 0xb3, pid[2], pid[3], 0x00, index as u8]
        }
    };
    let net = Net::new(tap, mac).map_err(|source| BuildError::Io {
        what: "the NIC's rate limiters",
        source,
    })?;
    let limiters = net.limiters();
    limiters.rx.update(nic.rx_limit);
    limiters.tx.update(nic.tx_limit);
    let limiters = vec![
        DeviceLimiter {
            id: LimiterId::nic(index, Direction::Rx),
            limiter: limiters.rx,
        },
        DeviceLimiter {
            id: LimiterId::nic(index, Direction::Tx),
            limiter: limiters.tx,
        },
    ];
    Ok((Box::new(net), limiters))
}

fn rng_device(rng: &crate::config::RngConfig) -> Result<Device, BuildError> {
    let device = Rng::new().map_err(|source| BuildError::Io {
        what: "the entropy device's rate limiter",
        source,
    })?;
    let limiter = device.limiter();
    limiter.update(rng.limit);
    let limiters = vec![DeviceLimiter {
        id: LimiterId::rng(),
        limiter,
    }];
    Ok((Box::new(device), limiters))
}

/// What `attach_devices` made.
pub struct Attached {
    /// Where each device is, in slot order (disks first).
    pub windows: Vec<MmioWindow>,
    pub transports: Transports,
    pub limiters: Vec<DeviceLimiter>,
}

/// Creates every disk, NIC and the entropy device, in that order, and
/// wires them into `mmio` and KVM.
pub fn attach_devices(vm: &Vm, config: &VmConfig, mmio: &mut Bus) -> Result<Attached, BuildError> {
    let (disks, nics) = (&config.disks, &config.nics);
    let count = disks.len() + nics.len() + usize::from(config.rng.is_some());
    if count > MAX_DEVICES {
        return Err(BuildError::TooManyDevices(count));
    }
    let mut devices = Vec::with_capacity(count);
    let mut limiters = Vec::new();
    for (index, disk) in disks.iter().enumerate() {
        let (device, mut l) = disk_device(index, disk)?;
        devices.push(device);
        limiters.append(&mut l);
    }
    for (index, nic) in nics.iter().enumerate() {
        let (device, mut l) = nic_device(index, nic)?;
        devices.push(device);
        limiters.append(&mut l);
    }
    if let Some(rng) = &config.rng {
        let (device, mut l) = rng_device(rng)?;
        devices.push(device);
        limiters.append(&mut l);
    }

    let mut windows = Vec::with_capacity(count);
    let mut transports = Vec::with_capacity(count);
    for (slot, device) in devices.into_iter().enumerate() {
        let base = MMIO_GAP_START + slot as u64 * MMIO_WINDOW;
        let irq = FIRST_IRQ + slot as u32;
        let transport = MmioTransport::new(device, vm.memory().clone())?;
        vm.register_irqfd(transport.irq_eventfd(), irq)?;
        for (queue, evt) in transport.notify_eventfds().iter().enumerate() {
            vm.fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + NOTIFY_OFFSET),
                    queue as u32,
                )
                .map_err(|source| BuildError::Kvm {
                    what: "register a virtio ioeventfd",
                    source,
                })?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(base, MMIO_WINDOW, transport.clone())
            .map_err(|e| BuildError::Io {
                what: "the MMIO bus",
                source: std::io::Error::other(e),
            })?;
        transports.push(transport);
        windows.push(MmioWindow {
            base,
            len: MMIO_WINDOW,
            gsi: irq,
        });
    }
    Ok(Attached {
        windows,
        transports,
        limiters,
    })
}

/// The command-line words that announce `windows` to a kernel without ACPI
/// (Linux's CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
pub fn cmdline_words(windows: &[MmioWindow]) -> Vec<String> {
    windows
        .iter()
        .map(|w| {
            format!(
                "virtio_mmio.device={}K@{:#x}:{}",
                w.len >> 10,
                w.base,
                w.gsi
            )
        })
        .collect()
}
