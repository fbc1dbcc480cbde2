//! Wires a VM together from its config: checks host limits, creates memory
//! and the KVM VM, loads the kernel, builds the boot structures and devices,
//! and configures each vCPU. `Vmm::run` then starts the threads.

mod virtio;
pub use virtio::{DeviceLimiter, Transports};

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use crate::seccomp::{self, ThreadKind};
use std::time::Duration;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::create_guest_memory;
use crate::arch::x86_64::{boot, cpuid, mptable, regs};
use crate::config::{ConfigError, SerialInput, VmConfig};
use crate::devices::bus::Bus;
use crate::devices::legacy::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN, KEYBOARD_GSI};
use crate::devices::legacy::serial::{
    pump_input, ConsoleLog, ConsoleOut, IrqTrigger, SerialDevice, COM1_GSI, COM1_PORT_BASE,
    COM1_PORT_LEN,
};
use crate::exit::{ExitNotifier, ExitReason};
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
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
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
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::block::BlockError),
    #[error(transparent)]
    Tap(#[from] crate::devices::virtio::net::tap::TapError),
    #[error(transparent)]
    Transport(#[from] crate::devices::virtio::mmio::TransportError),
    #[error("{0} virtio devices requested; at most {max} fit the free interrupt lines", max = virtio::MAX_DEVICES)]
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
    transports: virtio::Transports,
    limiters: Arc<Vec<virtio::DeviceLimiter>>,
    vcpus: Vec<Vcpu>,
    control: Arc<VcpuControl>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    input: SerialInput,
    exit: ExitNotifier,
    exit_rx: Receiver<ExitReason>,
    guest_cpuids: Vec<Vec<kvm_bindings::kvm_cpuid_entry2>>,
    pub flavour: Flavour,
    pub vcpu_count: u32,
    pub memory_mib: u64,
}

pub fn build(config: &VmConfig, kvm_device: &Path) -> Result<Vmm, BuildError> {
    build_vm(config, kvm_device, None)
}

/// A VM from a snapshot directory: memory mapped privately from its memory
/// file, vCPU, VM and device state as saved. `config` is the snapshot's own
/// with the caller's console settings.
pub fn restore(
    dir: &Path,
    snapshot: crate::snapshot::VmSnapshot,
    config: &VmConfig,
    kvm_device: &Path,
) -> Result<Vmm, BuildError> {
    let memory = crate::snapshot::load_memory(dir, &snapshot)?;
    // Dirty logging (and so a diff's baseline) starts with this VMM's first
    // full snapshot: turning it on here would cost every restore time that
    // grows with guest size.
    build_vm(config, kvm_device, Some((snapshot, memory)))
}

/// A VM from state and memory that arrived over a migration connection.
pub fn restore_migrated(
    snapshot: crate::snapshot::VmSnapshot,
    memory: crate::memory::GuestMemory,
    config: &VmConfig,
    kvm_device: &Path,
) -> Result<Vmm, BuildError> {
    build_vm(config, kvm_device, Some((snapshot, memory)))
}

fn build_vm(
    config: &VmConfig,
    kvm_device: &Path,
    restore: Option<(crate::snapshot::VmSnapshot, crate::memory::GuestMemory)>,
) -> Result<Vmm, BuildError> {
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

    let mem_size = config.memory_mib << 20;
    let (snapshot, memory) = match restore {
        Some((snapshot, memory)) => (Some(snapshot), memory),
        None => (
            None,
            create_guest_memory(mem_size).map_err(|e| BuildError::GuestMemory {
                mib: config.memory_mib,
                message: e.to_string(),
            })?,
        ),
    };
    let vm = Vm::new(&kvm_fd, memory)?;
    let mem = vm.memory();

    // A restored guest's memory already holds its kernel and boot tables.
    let boot_image = match &snapshot {
        Some(_) => None,
        None => {
            let kernel = boot::load_kernel(mem, &config.kernel.path)?;
            let initrd = match &config.kernel.initrd {
                Some(path) => Some(boot::load_initrd(mem, &kernel, path)?),
                None => None,
            };
            mptable::setup(mem, config.vcpus)?;
            regs::write_boot_tables(mem)?;
            Some((kernel, initrd))
        }
    };

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
    let serial = Arc::new(Mutex::new(match &snapshot {
        Some(s) => SerialDevice::restore(&(&s.serial).into(), irq, out)
            .map_err(|e| io_err("the serial device")(std::io::Error::other(e)))?,
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
    if let Some(s) = &snapshot {
        crate::devices::bus::lock(&i8042).restore(&s.i8042);
    }
    pio.insert(COM1_PORT_BASE, COM1_PORT_LEN, serial.clone())
        .and_then(|_| pio.insert(I8042_PORT_BASE, I8042_PORT_LEN, i8042.clone()))
        .map_err(|e| io_err("the port I/O bus")(std::io::Error::other(e)))?;
    let pio = Arc::new(pio);
    let mut mmio = Bus::default();
    let virtio::Attached {
        cmdline: device_words,
        transports,
        limiters,
    } = virtio::attach_devices(&vm, &config.disks, &config.nics, &mut mmio)?;
    if let Some(s) = &snapshot {
        if s.virtio.len() != transports.len() {
            return Err(io_err("the virtio devices")(std::io::Error::other(
                format!(
                    "the snapshot has {} virtio devices, the config {}",
                    s.virtio.len(),
                    transports.len()
                ),
            )));
        }
        for (transport, state) in transports.iter().zip(&s.virtio) {
            crate::devices::bus::lock(transport)
                .restore(state)
                .map_err(|e| io_err("a virtio device's state")(std::io::Error::other(e)))?;
        }
    }
    let mmio = Arc::new(mmio);

    // The user's command line, then the words that announce our devices.
    let cmdline = std::iter::once(config.kernel.cmdline.as_str())
        .chain(device_words.iter().map(String::as_str))
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let entry = match boot_image {
        Some((kernel, initrd)) => {
            boot::write_cmdline(mem, &kernel, &cmdline)?;
            boot::write_zero_page(mem, &kernel, cmdline.len(), initrd, mem_size)?;
            kernel.entry
        }
        None => 0,
    };
    let msr_indices = Arc::new(
        crate::vstate::vcpu_state::msr_indices(&kvm_fd)
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
        // What the guest sees: ours, or the saved one restore sets below.
        guest_cpuids.push(match &snapshot {
            Some(s) => s
                .vcpus
                .get(index as usize)
                .map(|v| v.cpuid.clone())
                .unwrap_or_default(),
            None => cpuid.as_slice().to_vec(),
        });
        regs::setup_common(&fd)?;
        match &snapshot {
            Some(s) => {
                let state = s.vcpus.get(index as usize).ok_or_else(|| {
                    io_err("the vCPU state")(std::io::Error::other("the snapshot has fewer vCPUs"))
                })?;
                crate::vstate::vcpu_state::restore(&kvm_fd, &fd, state).map_err(|e| {
                    io_err("a vCPU's saved state")(std::io::Error::other(e.to_string()))
                })?;
            }
            // APs stay in KVM's wait-for-SIPI state until the guest starts them.
            None if index == 0 => regs::setup_boot_regs(&fd, entry)?,
            None => {}
        }
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
    if let Some(s) = &snapshot {
        crate::vstate::vcpu_state::restore_vm(vm.fd(), &s.vm)
            .map_err(|e| io_err("the VM's saved state")(std::io::Error::other(e.to_string())))?;
    }

    Ok(Vmm {
        vm: Arc::new(vm),
        config: config.clone(),
        transports,
        limiters: Arc::new(limiters),
        vcpus,
        control,
        serial,
        i8042,
        input: config.serial.input.clone(),
        exit,
        exit_rx,
        guest_cpuids,
        flavour,
        vcpu_count: config.vcpus,
        memory_mib: config.memory_mib,
    })
}

impl Vmm {
    /// Runs the guest until something ends it; returns why. With
    /// `api_socket`, serves the VmmService (pause, resume, shutdown, stop,
    /// stats, console input) there while it runs.
    pub fn run(
        self,
        api_socket: Option<&Path>,
        start_paused: bool,
    ) -> Result<ExitReason, BuildError> {
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
        let mut api_server = None;
        if let Some(path) = api_socket {
            let console_in = crate::api::ConsoleInput::start(self.serial.clone())
                .map_err(io_err("the console input queue"))?;
            let machine = crate::machine::Machine {
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
            let api = crate::api::VmmApi {
                machine: Arc::new(machine),
                last_snapshot: Mutex::new(None),
                console_in,
                vcpu_count: self.vcpu_count,
                memory_mib: self.memory_mib,
                started_at_ms: crate::api::now_ms(),
                migration: Mutex::new(None),
            };
            api_server =
                Some(
                    crate::api::serve(path, api).map_err(|source| BuildError::ApiSocket {
                        path: path.to_owned(),
                        source,
                    })?,
                );
        }
        // Everything this thread still does is the control kind's: wait,
        // stop the vCPUs, write the exit file.
        seccomp::enter(ThreadKind::Control);
        let reason = self
            .exit_rx
            .recv()
            .expect("the VMM holds a sender for as long as it waits");
        vcpus.stop_all(Duration::from_secs(1));
        if let Some(server) = api_server {
            server.shutdown(Duration::from_secs(1));
        }
        Ok(reason)
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
