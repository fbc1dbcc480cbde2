//! Wires a VM together: from its config (`boot`: memory, kernel, boot
//! structures) or from saved state (`restore`: a snapshot, or what a
//! migration sent). Both check the host's limits, then attach the same
//! devices and create the vCPUs through the helpers here, and differ only in
//! where memory and each part's state come from. `Vmm::start` then starts the
//! threads and hands back the running machine, which a layer above serves
//! (`api::start`) before it waits for the guest's end (`Running::wait`).

mod boot;
mod restore;
mod virtio;

pub use boot::build;
pub use restore::{restore, restore_migrated, RestoreError};

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::seccomp::{self, ThreadKind};

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{cpuid, mptable, regs};
use crate::config::{ConfigError, SerialInput, VmConfig};
use crate::devices::bus::Bus;
use crate::devices::legacy::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN, KEYBOARD_GSI};
use crate::devices::legacy::power::{PowerPort, POWER_PORT, POWER_PORT_LEN};
use crate::devices::legacy::serial::{
    pump_input, ConsoleLog, ConsoleOut, IrqTrigger, SerialDevice, COM1_GSI, COM1_PORT_BASE,
    COM1_PORT_LEN,
};
use crate::exit::{ExitNotifier, ExitReason};
use crate::machine::{DeviceLimiter, Machine, Transports};
use crate::snapshot::VmSnapshot;
use crate::vstate::kvm::{self, Flavour, KvmOpenError};
use crate::vstate::vcpu::{self, Vcpu, VcpuControl, VcpuSet};
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    KvmOpen(#[from] KvmOpenError),
    #[error("vcpus {requested} exceeds what this host allows ({limit}, {why})")]
    TooManyVcpus {
        requested: u32,
        limit: u32,
        why: &'static str,
    },
    #[error("memory_mib {requested} exceeds this host's memory ({host} MiB)")]
    MemoryTooLarge { requested: u64, host: u64 },
    #[error("cannot allocate {mib} MiB of guest memory: {message}")]
    GuestMemory { mib: u64, message: String },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] crate::arch::x86_64::boot::BootError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    Acpi(#[from] crate::arch::x86_64::acpi::AcpiError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error("cannot open console log {path}: {source}")]
    ConsoleLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("KVM could not {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot serve the control API on {path}: {source}")]
    ApiSocket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::block::BlockError),
    #[error(transparent)]
    Tap(#[from] crate::devices::virtio::net::tap::TapError),
    #[error(transparent)]
    Transport(#[from] crate::devices::virtio::mmio::TransportError),
    #[error("{0} virtio devices requested (disks, NICs and the rng); at most {max} fit the free interrupt lines", max = virtio::MAX_DEVICES)]
    TooManyDevices(usize),
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> BuildError {
    move |source| BuildError::Io { what, source }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

/// A VM ready to run: memory loaded, devices wired, vCPUs configured.
pub struct Vmm {
    // Owns guest memory and the VM fd; must outlive the vCPU threads.
    vm: Arc<Vm>,
    config: VmConfig,
    transports: Transports,
    limiters: Arc<Vec<DeviceLimiter>>,
    vcpus: Vec<Vcpu>,
    control: Arc<VcpuControl>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    input: SerialInput,
    exit: ExitNotifier,
    exit_rx: Receiver<ExitReason>,
    guest_cpuids: Vec<Vec<kvm_cpuid_entry2>>,
    pub flavour: Flavour,
    pub vcpu_count: u32,
    pub memory_mib: u64,
}

/// What serves a running machine to its controller: the control API,
/// which a layer above the builder starts (`api::start`), so the builder
/// needs nothing of it but this.
pub trait Control {
    /// Stops serving, letting replies in flight out (at most `timeout`).
    fn shutdown(self, timeout: Duration);
}

/// KVM, opened once `config` passed its checks and fits this host.
fn open_kvm(config: &VmConfig, kvm_device: &Path) -> Result<(Kvm, Flavour), BuildError> {
    config.validate()?;
    let kvm_fd = kvm::open(kvm_device)?;
    let flavour = kvm::detect_flavour();

    let max_vcpus = kvm_fd.get_max_vcpus() as u32;
    if config.vcpus > max_vcpus {
        return Err(BuildError::TooManyVcpus {
            requested: config.vcpus,
            limit: max_vcpus,
            why: "KVM_CAP_MAX_VCPUS",
        });
    }
    if config.vcpus > mptable::MAX_CPUS {
        return Err(BuildError::TooManyVcpus {
            requested: config.vcpus,
            limit: mptable::MAX_CPUS,
            why: "one-byte APIC ids in the MP table",
        });
    }
    if let Some(host) = berth_proto::vmm_process::host::memory_mib() {
        if config.memory_mib > host {
            return Err(BuildError::MemoryTooLarge {
                requested: config.memory_mib,
                host,
            });
        }
    }
    Ok((kvm_fd, flavour))
}

/// The exit channel and the port I/O devices (COM1, the i8042) on their bus.
struct Legacy {
    exit: ExitNotifier,
    exit_rx: Receiver<ExitReason>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    pio: Arc<Bus>,
}

/// Creates the port I/O devices, continuing from `saved`'s state on a
/// restore.
fn attach_legacy(
    vm: &Vm,
    config: &VmConfig,
    saved: Option<&VmSnapshot>,
) -> Result<Legacy, BuildError> {
    let (exit, exit_rx) = ExitNotifier::new();
    let log = match &config.serial.log {
        Some(path) => Some(ConsoleLog::open(path, config.serial.log_max_bytes).map_err(
            |source| BuildError::ConsoleLog {
                path: path.to_owned(),
                source,
            },
        )?),
        None => None,
    };
    let irq = IrqTrigger::new().map_err(io_err("the serial interrupt eventfd"))?;
    let out = ConsoleOut::new(log, config.serial.stdout);
    let serial = Arc::new(Mutex::new(match saved {
        Some(s) => {
            SerialDevice::restore(&(&s.serial).into(), irq, out).map_err(RestoreError::Serial)?
        }
        None => SerialDevice::new(irq, out),
    }));
    vm.register_irqfd(crate::devices::bus::lock(&serial).irq_eventfd(), COM1_GSI)?;
    let mut pio = Bus::default();
    let i8042 = Arc::new(Mutex::new(I8042::new(
        exit.clone(),
        EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("the keyboard interrupt eventfd"))?,
    )));
    vm.register_irqfd(
        crate::devices::bus::lock(&i8042).irq_eventfd(),
        KEYBOARD_GSI,
    )?;
    if let Some(s) = saved {
        crate::devices::bus::lock(&i8042).restore(&s.i8042);
    }
    // The power port is there whatever the discovery: it holds no state,
    // and a restored guest that booted with ACPI still needs it.
    let power = Arc::new(Mutex::new(PowerPort::new(exit.clone())));
    pio.insert(COM1_PORT_BASE, COM1_PORT_LEN, serial.clone())
        .and_then(|_| pio.insert(I8042_PORT_BASE, I8042_PORT_LEN, i8042.clone()))
        .and_then(|_| pio.insert(u64::from(POWER_PORT), POWER_PORT_LEN, power))
        .map_err(|e| io_err("the port I/O bus")(std::io::Error::other(e)))?;
    Ok(Legacy {
        exit,
        exit_rx,
        serial,
        i8042,
        pio: Arc::new(pio),
    })
}

/// Every disk and NIC of `config` on a new MMIO bus.
fn attach_virtio(vm: &Vm, config: &VmConfig) -> Result<(virtio::Attached, Arc<Bus>), BuildError> {
    let mut mmio = Bus::default();
    let attached = virtio::attach_devices(vm, config, &mut mmio)?;
    Ok((attached, Arc::new(mmio)))
}

/// The vCPUs, and the CPUID each one's guest sees.
struct Vcpus {
    vcpus: Vec<Vcpu>,
    control: Arc<VcpuControl>,
    guest_cpuids: Vec<Vec<kvm_cpuid_entry2>>,
}

/// Creates each vCPU with our CPUID and the common registers; `setup`
/// then gives vCPU `index` its boot or saved state and returns the CPUID
/// its guest sees (ours, or the saved one restore sets).
fn create_vcpus(
    kvm_fd: &Kvm,
    vm: &Vm,
    config: &VmConfig,
    buses: (&Arc<Bus>, &Arc<Bus>),
    exit: &ExitNotifier,
    mut setup: impl FnMut(u32, &VcpuFd, &CpuId) -> Result<Vec<kvm_cpuid_entry2>, BuildError>,
) -> Result<Vcpus, BuildError> {
    let (pio, mmio) = buses;
    let msr_indices = Arc::new(
        crate::vstate::vcpu_state::msr_indices(kvm_fd)
            .map_err(|e| io_err("the MSR list")(std::io::Error::other(e.to_string())))?,
    );
    let supported = kvm_fd
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report its supported CPUID"))?;
    let control = Arc::new(VcpuControl::default());
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    let mut guest_cpuids = Vec::new();
    for index in 0..config.vcpus {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("create a vCPU"))?;
        let mut cpuid = supported.clone();
        cpuid::normalize(&mut cpuid, index, config.vcpus);
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err("set a vCPU's CPUID"))?;
        regs::setup_common(&fd)?;
        guest_cpuids.push(setup(index, &fd, &cpuid)?);
        vcpus.push(Vcpu::new(
            index,
            fd,
            pio.clone(),
            mmio.clone(),
            exit.clone(),
            control.clone(),
            msr_indices.clone(),
        ));
    }
    Ok(Vcpus {
        vcpus,
        control,
        guest_cpuids,
    })
}

impl Vmm {
    fn assemble(
        vm: Vm,
        config: &VmConfig,
        flavour: Flavour,
        legacy: Legacy,
        attached: virtio::Attached,
        vcpus: Vcpus,
    ) -> Vmm {
        Vmm {
            vm: Arc::new(vm),
            config: config.clone(),
            transports: attached.transports,
            limiters: Arc::new(attached.limiters),
            vcpus: vcpus.vcpus,
            control: vcpus.control,
            serial: legacy.serial,
            i8042: legacy.i8042,
            input: config.serial.input.clone(),
            exit: legacy.exit,
            exit_rx: legacy.exit_rx,
            guest_cpuids: vcpus.guest_cpuids,
            flavour,
            vcpu_count: config.vcpus,
            memory_mib: config.memory_mib,
        }
    }
}

/// A machine whose vCPUs run: what the builder hands back once a VM is
/// started. A layer above may serve it (`api::start`), then waits.
pub struct Running {
    pub machine: Arc<Machine>,
    vcpus: Arc<VcpuSet>,
    exit_rx: Receiver<ExitReason>,
}

impl Running {
    /// Waits until something ends the guest, stops the vCPUs and then
    /// `control` (if it serves the machine); returns why the guest ended.
    pub fn wait<C: Control>(self, control: Option<C>) -> ExitReason {
        // Everything this thread still does is the control kind's: wait,
        // stop the vCPUs, write the exit file.
        seccomp::enter(ThreadKind::Control);
        let reason = self
            .exit_rx
            .recv()
            .expect("the VMM holds a sender for as long as it waits");
        self.vcpus.stop_all(Duration::from_secs(1));
        if let Some(server) = control {
            server.shutdown(Duration::from_secs(1));
        }
        reason
    }
}

impl Vmm {
    /// Starts the guest: the vCPU, signal and console-input threads, and
    /// the running machine that a control API serves (pause, resume,
    /// shutdown, stop, stats, console input, snapshots, migration).
    pub fn start(self, start_paused: bool) -> Result<Running, BuildError> {
        vcpu::install_kick_handler().map_err(io_err("the vCPU kick signal"))?;
        let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(io_err("signal handling"))?;
        let on_signal = self.exit.clone();
        seccomp::spawn(ThreadKind::Control, "signals".into(), move || {
            if let Some(sig) = signals.forever().next() {
                on_signal.notify(ExitReason::Signal(sig));
            }
        })
        .map_err(io_err("the signal thread"))?;

        self.spawn_input()?;

        if start_paused {
            self.control.start_paused();
        }
        let vcpus = Arc::new(
            VcpuSet::start(self.vcpus, self.control.clone()).map_err(io_err("a vCPU thread"))?,
        );
        let machine = Machine {
            vm: self.vm.clone(),
            vcpus: vcpus.clone(),
            serial: self.serial.clone(),
            i8042: self.i8042.clone(),
            transports: self.transports.clone(),
            limiters: self.limiters.clone(),
            config: self.config.clone(),
            flavour: self.flavour.to_string(),
            exit: self.exit.clone(),
            guest_cpuids: self.guest_cpuids.clone(),
        };
        Ok(Running {
            machine: Arc::new(machine),
            vcpus,
            exit_rx: self.exit_rx,
        })
    }

    fn spawn_input(&self) -> Result<(), BuildError> {
        let serial = self.serial.clone();
        let input = self.input.clone();
        if input == SerialInput::None {
            return Ok(());
        }
        seccomp::spawn(
            ThreadKind::Control,
            "console-in".into(),
            move || match input {
                SerialInput::None => {}
                SerialInput::Stdin => pump_input(serial, std::io::stdin()),
                // Opened here: opening a FIFO blocks until a writer appears.
                SerialInput::Path(path) => match File::open(&path) {
                    Ok(file) => pump_input(serial, file),
                    Err(e) => eprintln!(
                        "berth-vmm: cannot open console input {}: {e}",
                        path.display()
                    ),
                },
            },
        )
        .map_err(io_err("the console input thread"))?;
        Ok(())
    }
}
