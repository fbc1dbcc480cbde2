//! `berth-vmm`: boots one guest from a VM config (file and/or flags) and
//! exits when the guest ends. Exit status: 0 for a guest reset/shutdown or a
//! stop by SIGTERM/SIGINT, 1 for an error before the guest ran, 2 for a guest
//! the VMM could not continue (internal error, failed entry, triple fault).

use std::path::Path;
use std::process::ExitCode;

use berth_proto::vmm_process::exit::{code as exit_code, ExitCause, ExitRecord};
use berth_proto::vmm_process::launch::VmmArgs as Args;
use berth_proto::vmm_process::run_lock::RunLock;
use berth_vmm::builder;
use berth_vmm::config::{DiskConfig, KernelConfig, NicConfig, SerialConfig, SerialInput, VmConfig};
use berth_vmm::seccomp::ThreadKind;

const DEFAULT_VCPUS: u32 = 1;
const DEFAULT_MEMORY_MIB: u64 = 128;

fn config_from(args: &Args) -> Result<VmConfig, String> {
    let mut config = match &args.config {
        _ if args.restore.is_some() => {
            return Err("internal: restore reads its config from the snapshot".into())
        }
        Some(path) => VmConfig::from_file(path).map_err(|e| e.to_string())?,
        None => VmConfig {
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            kernel: KernelConfig {
                path: args
                    .kernel
                    .clone()
                    .ok_or("no kernel given: pass --kernel or --config")?,
                initrd: None,
                cmdline: String::new(),
            },
            serial: SerialConfig::default(),
            disks: Vec::new(),
            nics: Vec::new(),
            discovery: Default::default(),
            rng: None,
        },
    };
    if let Some(kernel) = &args.kernel {
        config.kernel.path = kernel.clone();
    }
    if let Some(initrd) = &args.initrd {
        config.kernel.initrd = Some(initrd.clone());
    }
    if let Some(cmdline) = &args.cmdline {
        config.kernel.cmdline = cmdline.clone();
    }
    if let Some(vcpus) = args.vcpus {
        config.vcpus = vcpus;
    }
    if let Some(mib) = args.memory_mib {
        config.memory_mib = mib;
    }
    if let Some(discovery) = args.discovery {
        config.discovery = discovery;
    }
    apply_console_flags(args, &mut config);
    for spec in &args.disks {
        config.disks.push(parse_disk(spec)?);
    }
    for spec in &args.nics {
        config.nics.push(parse_nic(spec)?);
    }
    if args.rng && config.rng.is_none() {
        config.rng = Some(Default::default());
    }
    Ok(config)
}

/// `OLD=NEW` tap renames for a restore on another host or beside the
/// original.
fn apply_tap_overrides(overrides: &[String], config: &mut VmConfig) -> Result<(), String> {
    for o in overrides {
        let (old, new) = o
            .split_once('=')
            .ok_or_else(|| format!("--tap {o:?} is not OLD=NEW"))?;
        let nic = config
            .nics
            .iter_mut()
            .find(|n| n.tap.as_deref() == Some(old))
            .ok_or_else(|| format!("--tap {o:?}: the snapshot has no NIC on tap {old}"))?;
        nic.tap = Some(new.to_string());
    }
    Ok(())
}

/// The console flags, on top of whatever config they refine.
fn apply_console_flags(args: &Args, config: &mut VmConfig) {
    if let Some(log) = &args.console_log {
        config.serial.log = Some(log.clone());
    }
    config.serial.stdout |= args.console_stdout;
    match args.console_in.as_deref() {
        None => {}
        Some("stdin" | "-") => config.serial.input = SerialInput::Stdin,
        Some("none") => config.serial.input = SerialInput::None,
        Some(path) => config.serial.input = SerialInput::Path(path.into()),
    }
}

fn number(flag: &str, spec: &str, n: &str) -> Result<u64, String> {
    n.parse()
        .map_err(|_| format!("{flag} {spec:?}: {n:?} is not a number"))
}

fn parse_disk(spec: &str) -> Result<DiskConfig, String> {
    let mut parts = spec.split(',');
    let path = parts.next().filter(|p| !p.is_empty());
    let mut disk = DiskConfig {
        path: path.ok_or(format!("--disk {spec:?}: no path"))?.into(),
        read_only: false,
        serial: None,
        limit: Default::default(),
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => disk.read_only = true,
            Some(("serial", id)) => disk.serial = Some(id.to_string()),
            Some(("bps", n)) => disk.limit.bytes.rate_per_s = number("--disk", spec, n)?,
            Some(("iops", n)) => disk.limit.ops.rate_per_s = number("--disk", spec, n)?,
            _ => {
                return Err(format!(
                    "--disk {spec:?}: unknown option {opt:?} (ro, serial=ID, bps=N, iops=N)"
                ))
            }
        }
    }
    Ok(disk)
}

fn parse_nic(spec: &str) -> Result<NicConfig, String> {
    let mut nic = NicConfig {
        tap: None,
        tap_fd: None,
        mac: None,
        rx_limit: Default::default(),
        tx_limit: Default::default(),
    };
    for opt in spec.split(',') {
        match opt.split_once('=') {
            Some(("tap", name)) => nic.tap = Some(name.to_string()),
            Some(("fd", fd)) => {
                nic.tap_fd = Some(
                    fd.parse()
                        .map_err(|_| format!("--nic {spec:?}: fd {fd:?} is not a number"))?,
                )
            }
            Some(("mac", mac)) => nic.mac = Some(mac.to_string()),
            Some(("rx_bps", n)) => nic.rx_limit.bytes.rate_per_s = number("--nic", spec, n)?,
            Some(("tx_bps", n)) => nic.tx_limit.bytes.rate_per_s = number("--nic", spec, n)?,
            _ => {
                return Err(format!(
                    "--nic {spec:?}: unknown option {opt:?} (tap=NAME, fd=N, mac=MAC, rx_bps=N, tx_bps=N)"
                ))
            }
        }
    }
    Ok(nic)
}

/// Records how the VMM ended for a supervisor that cannot wait for us.
fn write_exit_file(path: &Path, record: &ExitRecord) {
    if let Err(e) = record.write(path) {
        eprintln!("berth-vmm: cannot write exit file {}: {e}", path.display());
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.host_info {
        let info = berth_vmm::vstate::kvm::host_info(&args.kvm_device);
        println!(
            "{}",
            serde_json::to_string(&info).expect("plain data serialises")
        );
        return ExitCode::SUCCESS;
    }
    if args.detach {
        if let Err(e) = nix::unistd::setsid() {
            eprintln!("berth-vmm: error: cannot start a new session: {e}");
            return ExitCode::from(1);
        }
    }
    // Before the gate, so a VMM the agent is about to record already holds
    // its VM; kept until the process ends, however it ends.
    let _run_lock = match args.run_lock.as_deref().map(RunLock::acquire) {
        None => None,
        Some(Ok(lock)) => Some(lock),
        Some(Err(e)) => {
            // No exit record: the file is the other VMM's to write.
            eprintln!("berth-vmm: error: {e}");
            return ExitCode::from(1);
        }
    };
    if args.start_gate_stdin {
        let mut byte = [0u8; 1];
        if !matches!(std::io::Read::read(&mut std::io::stdin(), &mut byte), Ok(1)) {
            let reason = "the agent that started this VMM went away before recording it";
            eprintln!("berth-vmm: error: {reason}");
            if let Some(path) = &args.exit_file {
                write_exit_file(path, &not_started(reason.into()));
            }
            return ExitCode::from(1);
        }
    }
    for dir in &args.cgroups {
        let procs = dir.join("cgroup.procs");
        if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
            let reason = format!("cannot join cgroup {}: {e}", dir.display());
            eprintln!("berth-vmm: error: {reason}");
            if let Some(path) = &args.exit_file {
                write_exit_file(path, &not_started(reason));
            }
            return ExitCode::from(1);
        }
    }
    if let Err(reason) = enter_jail(&args).and_then(|()| start_seccomp(&args)) {
        eprintln!("berth-vmm: error: {reason}");
        if let Some(path) = &args.exit_file {
            write_exit_file(path, &not_started(reason));
        }
        return ExitCode::from(1);
    }
    let record = run(&args);
    if let Some(path) = &args.exit_file {
        write_exit_file(path, &record);
    }
    ExitCode::from(record.code as u8)
}

/// Confines this process before it reads anything a guest or a peer sent.
fn enter_jail(args: &Args) -> Result<(), String> {
    let Some(root) = &args.jail_root else {
        return Ok(());
    };
    let (Some(uid), Some(gid)) = (args.jail_uid, args.jail_gid) else {
        return Err("--jail-root needs --jail-uid and --jail-gid".into());
    };
    let mut devices = vec![args.kvm_device.clone()];
    if !args.jail_taps.is_empty() || !args.nics.is_empty() {
        devices.push("/dev/net/tun".into());
    }
    let config = berth_vmm::jail::JailConfig {
        root: root.clone(),
        uid,
        gid,
        read_only: args.jail_ro.clone(),
        read_write: args.jail_rw.clone(),
        devices,
        taps: args.jail_taps.clone(),
        max_open_files: args.jail_max_open_files,
        core_dumps: args.jail_core_dumps,
    };
    berth_vmm::jail::enter(&config).map_err(|e| e.to_string())?;
    jail_probe();
    Ok(())
}

/// Test-only (feature `test-hooks`): `BERTH_TEST_JAIL_PROBE=PATH[:PATH...]`
/// reports whether the jailed VMM can open each path, so a test can see
/// what the jail hides.
#[cfg(not(feature = "test-hooks"))]
fn jail_probe() {}

#[cfg(feature = "test-hooks")]
fn jail_probe() {
    let Some(paths) = std::env::var_os("BERTH_TEST_JAIL_PROBE") else {
        return;
    };
    for path in std::env::split_paths(&paths) {
        match std::fs::File::open(&path) {
            Ok(_) => eprintln!("berth-vmm: jail probe: {} opened", path.display()),
            Err(e) => eprintln!("berth-vmm: jail probe: {} refused: {e}", path.display()),
        }
    }
}

/// Filters every thread started from here on (docs/security.md).
fn start_seccomp(args: &Args) -> Result<(), String> {
    use berth_vmm::seccomp::{self, Filters};
    if args.no_seccomp {
        eprintln!(
            "berth-vmm: WARNING: seccomp is OFF (--no-seccomp): any thread of this VMM may make \
             any system call; use this for debugging only"
        );
        return Ok(());
    }
    let filters = Filters::built_in().map_err(|e| e.to_string())?;
    seccomp::enable(filters).map_err(|e| e.to_string())
}

fn not_started(reason: String) -> ExitRecord {
    ExitRecord {
        code: exit_code::NOT_STARTED,
        reason,
        cause: ExitCause::Other,
    }
}

fn fail(message: String) -> ExitRecord {
    eprintln!("berth-vmm: error: {message}");
    not_started(format!("error: {message}"))
}

/// Receive mode: wait for the source, build the VM from what it sends,
/// take the handover, then run.
fn run_incoming(args: &Args, address: &str) -> ExitRecord {
    use berth_vmm::migration::destination::Incoming;
    let Some(token) = &args.migrate_token else {
        return fail("--migrate-listen needs --migrate-token".into());
    };
    let expires = std::time::UNIX_EPOCH
        + std::time::Duration::from_millis(
            args.migrate_expires_at_ms
                .unwrap_or_else(|| berth_vmm::api::now_ms() + 600_000),
        );
    let incoming = match Incoming::listen(address, token, expires) {
        Ok(i) => i,
        Err(e) => return fail(format!("cannot listen for a migration on {address}: {e}")),
    };
    let bound = match incoming.local_addr() {
        Ok(a) => a.to_string(),
        Err(e) => return fail(format!("cannot read the bound address: {e}")),
    };
    if let Some(path) = &args.migrate_address_file {
        if let Err(e) = berth_proto::vmm_process::files::write_atomic(path, bound.as_bytes()) {
            return fail(format!("cannot write {}: {e}", path.display()));
        }
    }
    eprintln!("berth-vmm: waiting for a migration on {bound}");
    // What the source sends is parsed on a migration-filtered thread.
    let kvm_device = args.kvm_device.clone();
    let receiving =
        berth_vmm::seccomp::spawn(ThreadKind::Migration, "migrate-in".into(), move || {
            incoming.receive(&kvm_device)
        });
    let received = match receiving.map(|t| t.join()) {
        Ok(Ok(Ok(r))) => r,
        Ok(Ok(Err(e))) => return fail(format!("incoming migration failed: {e}")),
        Ok(Err(_)) => return fail("incoming migration failed: the receiver panicked".into()),
        Err(e) => return fail(format!("cannot start the migration receiver: {e}")),
    };
    let berth_vmm::migration::destination::Received {
        mut snapshot,
        memory,
        mut config,
        link,
    } = received;
    apply_console_flags(args, &mut config);
    if let Err(e) = apply_tap_overrides(&args.tap_overrides, &mut config) {
        link.refuse(e.clone());
        return fail(e);
    }
    snapshot.config = config.clone();
    let vmm = match builder::restore_migrated(snapshot, memory, &config, &args.kvm_device) {
        Ok(vmm) => vmm,
        Err(e) => {
            link.refuse(format!("the destination cannot build the VM: {e}"));
            return fail(e.to_string());
        }
    };
    let handover = match link.handover() {
        Ok(h) => h,
        Err(e) => return fail(format!("incoming migration failed before Go: {e}")),
    };
    handover.ack();
    eprintln!(
        "berth-vmm: migration received; {} vCPU(s), {} MiB running",
        config.vcpus, config.memory_mib
    );
    run_vmm(vmm, args, false)
}

/// Runs the guest, serving the control API on `--api-socket` if given.
fn run_vmm(vmm: builder::Vmm, args: &Args, paused: bool) -> ExitRecord {
    let running = match vmm.start(paused) {
        Ok(running) => running,
        Err(e) => return fail(e.to_string()),
    };
    let socket = args.api_socket.as_deref();
    let api = socket.map(|path| berth_vmm::api::start(path, running.machine.clone()));
    match api.transpose() {
        Ok(api) => finish(Ok(running.wait(api))),
        Err(e) => fail(e.to_string()),
    }
}

fn finish(result: Result<berth_vmm::exit::ExitReason, builder::BuildError>) -> ExitRecord {
    match result {
        Ok(reason) => {
            eprintln!("berth-vmm: {reason}");
            ExitRecord {
                code: reason.exit_code(),
                reason: reason.to_string(),
                cause: reason.cause(),
            }
        }
        Err(e) => fail(e.to_string()),
    }
}

fn run(args: &Args) -> ExitRecord {
    if let Some(address) = &args.migrate_listen {
        return run_incoming(args, address);
    }
    let started = std::time::Instant::now();
    let (config, built) = match &args.restore {
        Some(dir) => match berth_vmm::snapshot::read_state(dir) {
            Ok(snapshot) => {
                let mut config = snapshot.config.clone();
                apply_console_flags(args, &mut config);
                if let Err(e) = apply_tap_overrides(&args.tap_overrides, &mut config) {
                    return fail(e.to_string());
                }
                let built = builder::restore(dir, snapshot, &config, &args.kvm_device);
                (config, built)
            }
            Err(e) => {
                return fail(e.to_string());
            }
        },
        None => match config_from(args) {
            Ok(c) => {
                let built = builder::build(&c, &args.kvm_device);
                (c, built)
            }
            Err(e) => {
                return fail(e.to_string());
            }
        },
    };
    let vmm = match built {
        Ok(vmm) => vmm,
        Err(e) => {
            return fail(e.to_string());
        }
    };
    if let Some(dir) = &args.restore {
        // From process start to the vCPUs about to run: what a restore costs.
        eprintln!(
            "berth-vmm: restored from {} in {:.2} ms",
            dir.display(),
            started.elapsed().as_secs_f64() * 1e3
        );
    }
    eprintln!(
        "berth-vmm: KVM {}; {} vCPU(s), {} MiB; kernel {}",
        vmm.flavour,
        config.vcpus,
        config.memory_mib,
        config.kernel.path.display()
    );
    run_vmm(vmm, args, args.paused)
}
