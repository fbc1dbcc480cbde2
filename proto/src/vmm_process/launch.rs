//! berth-vmm's command line: the one definition of the flags the agent
//! launches a VMM with and the VMM parses. [`VmmArgs::to_command`] turns
//! a value back into the arguments that parse to it (checked by a test for
//! every flag), so the agent never spells a flag itself.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;

/// The environment variable that carries the migration token: not on the
/// command line, where any local user could read it.
pub const MIGRATE_TOKEN_ENV: &str = "BERTH_MIGRATE_TOKEN";

/// The default KVM device.
pub const KVM_DEVICE: &str = "/dev/kvm";

#[derive(Parser, Debug, Clone, PartialEq, Eq)]
#[command(name = "berth-vmm", version, about = "Boot one guest over /dev/kvm")]
pub struct VmmArgs {
    /// Print what this host offers guests (KVM flavour, vCPU limit) as
    /// JSON and exit: the agent learns host facts that need KVM this way.
    #[arg(long)]
    pub host_info: bool,
    /// VM config file (JSON, or TOML with a .toml extension); flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kernel: ELF vmlinux or bzImage.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    #[arg(long)]
    pub cmdline: Option<String>,
    #[arg(long)]
    pub vcpus: Option<u32>,
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Append console output to this file.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Copy console output to stdout.
    #[arg(long)]
    pub console_stdout: bool,
    /// Console input: "stdin", or a file/FIFO path.
    #[arg(long)]
    pub console_in: Option<String>,
    /// A virtio-blk disk: PATH[,ro][,serial=ID]; repeat for more (vda, vdb, ...).
    #[arg(long = "disk", value_name = "PATH[,ro][,serial=ID]")]
    pub disks: Vec<String>,
    /// A virtio-net NIC: tap=NAME[,mac=MAC] or fd=N[,mac=MAC]; repeat for more.
    #[arg(long = "nic", value_name = "tap=NAME|fd=N[,mac=MAC]")]
    pub nics: Vec<String>,
    /// Serve the control API (berth.v1 VmmService) on this unix socket.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// On exit, write {"code": .., "reason": ".."} to this file (atomically),
    /// so a supervisor that is not our parent learns how we ended.
    #[arg(long)]
    pub exit_file: Option<PathBuf>,
    /// Start a new session (setsid), detached from the caller's terminal and
    /// process group, as the agent does for every VMM.
    #[arg(long)]
    pub detach: bool,
    /// Wait for one byte on stdin before doing anything. The agent sends
    /// it once this VMM's pid is on disk; end of file instead means the
    /// agent died first, and a VMM no agent knows of must not run.
    #[arg(long)]
    pub start_gate_stdin: bool,
    /// Join this cgroup directory (repeat for each v1 hierarchy) before any
    /// thread starts, so every vCPU and device thread is accounted to it.
    #[arg(long = "cgroup", value_name = "DIR")]
    pub cgroups: Vec<PathBuf>,
    /// Restore the VM from this snapshot directory instead of booting; the
    /// console flags still apply.
    #[arg(long)]
    pub restore: Option<PathBuf>,
    /// With --restore: keep the guest paused until the API resumes it.
    #[arg(long)]
    pub paused: bool,
    /// With --restore: attach the NIC whose tap was OLD to NEW instead.
    #[arg(long = "tap", value_name = "OLD=NEW")]
    pub tap_overrides: Vec<String>,
    /// Receive a live migration on this address (host:port; port 0 picks
    /// one) instead of booting; the console, tap and API flags still apply.
    #[arg(long, value_name = "ADDR")]
    pub migrate_listen: Option<String>,
    /// With --migrate-listen: the token the source must present (at least 16 characters).
    #[arg(long, env = MIGRATE_TOKEN_ENV, hide_env_values = true)]
    pub migrate_token: Option<String>,
    /// With --migrate-listen: give up if no source arrived by this time (Unix ms).
    #[arg(long, value_name = "UNIX_MS")]
    pub migrate_expires_at_ms: Option<u64>,
    /// With --migrate-listen: write the address actually bound here (atomically).
    #[arg(long)]
    pub migrate_address_file: Option<PathBuf>,
    /// KVM device to open.
    #[arg(long, default_value = KVM_DEVICE)]
    pub kvm_device: PathBuf,
    /// Jail this VMM (docs/security.md): pivot_root into this empty
    /// directory holding only the --jail-ro/--jail-rw paths and the devices,
    /// then run as --jail-uid/--jail-gid with no capabilities.
    #[arg(long, value_name = "DIR")]
    pub jail_root: Option<PathBuf>,
    #[arg(long, requires = "jail_root")]
    pub jail_uid: Option<u32>,
    #[arg(long, requires = "jail_root")]
    pub jail_gid: Option<u32>,
    /// A file or directory the jailed VMM may read (repeat).
    #[arg(long = "jail-ro", value_name = "PATH", requires = "jail_root")]
    pub jail_ro: Vec<PathBuf>,
    /// A file or directory the jailed VMM may write (repeat).
    #[arg(long = "jail-rw", value_name = "PATH", requires = "jail_root")]
    pub jail_rw: Vec<PathBuf>,
    /// A tap to attach before privileges are dropped (repeat).
    #[arg(long = "jail-tap", value_name = "NAME", requires = "jail_root")]
    pub jail_taps: Vec<String>,
    /// RLIMIT_NOFILE in the jail.
    #[arg(long, default_value_t = 4096)]
    pub jail_max_open_files: u64,
    /// Allow core dumps in the jail (they contain guest memory).
    #[arg(long)]
    pub jail_core_dumps: bool,
    /// Run without the per-thread seccomp filters (debugging only: a
    /// compromised thread could then make any system call).
    #[arg(long)]
    pub no_seccomp: bool,
}

impl Default for VmmArgs {
    /// No flags given: what `berth-vmm` alone parses to.
    /// The token is left out even when the environment holds one: a
    /// default is what a caller builds on, not what this process was given.
    fn default() -> Self {
        let mut args = VmmArgs::parse_from(["berth-vmm"]);
        args.migrate_token = None;
        args
    }
}

fn push(args: &mut Vec<OsString>, flag: &str, value: impl Into<OsString>) {
    args.push(flag.into());
    args.push(value.into());
}

fn push_opt<T: Into<OsString> + Clone>(args: &mut Vec<OsString>, flag: &str, value: &Option<T>) {
    if let Some(v) = value {
        push(args, flag, v.clone());
    }
}

fn push_all<T: Into<OsString> + Clone>(args: &mut Vec<OsString>, flag: &str, values: &[T]) {
    for v in values {
        push(args, flag, v.clone());
    }
}

fn push_flag(args: &mut Vec<OsString>, flag: &str, on: bool) {
    if on {
        args.push(flag.into());
    }
}

impl VmmArgs {
    /// The arguments (after the program name) that parse back to `self`,
    /// except the migration token, which [`Self::to_command`] passes in the
    /// environment.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a = Vec::new();
        push_flag(&mut a, "--host-info", self.host_info);
        push_opt(&mut a, "--config", &self.config);
        push_opt(&mut a, "--kernel", &self.kernel);
        push_opt(&mut a, "--initrd", &self.initrd);
        push_opt(&mut a, "--cmdline", &self.cmdline);
        push_opt(&mut a, "--vcpus", &self.vcpus.map(|n| n.to_string()));
        push_opt(
            &mut a,
            "--memory-mib",
            &self.memory_mib.map(|n| n.to_string()),
        );
        push_opt(&mut a, "--console-log", &self.console_log);
        push_flag(&mut a, "--console-stdout", self.console_stdout);
        push_opt(&mut a, "--console-in", &self.console_in);
        push_all(&mut a, "--disk", &self.disks);
        push_all(&mut a, "--nic", &self.nics);
        push_opt(&mut a, "--api-socket", &self.api_socket);
        push_opt(&mut a, "--exit-file", &self.exit_file);
        push_flag(&mut a, "--detach", self.detach);
        push_flag(&mut a, "--start-gate-stdin", self.start_gate_stdin);
        push_all(&mut a, "--cgroup", &self.cgroups);
        push_opt(&mut a, "--restore", &self.restore);
        push_flag(&mut a, "--paused", self.paused);
        push_all(&mut a, "--tap", &self.tap_overrides);
        push_opt(&mut a, "--migrate-listen", &self.migrate_listen);
        push_opt(
            &mut a,
            "--migrate-expires-at-ms",
            &self.migrate_expires_at_ms.map(|n| n.to_string()),
        );
        push_opt(&mut a, "--migrate-address-file", &self.migrate_address_file);
        if self.kvm_device != Path::new(KVM_DEVICE) {
            push(&mut a, "--kvm-device", self.kvm_device.clone());
        }
        push_opt(&mut a, "--jail-root", &self.jail_root);
        push_opt(&mut a, "--jail-uid", &self.jail_uid.map(|n| n.to_string()));
        push_opt(&mut a, "--jail-gid", &self.jail_gid.map(|n| n.to_string()));
        push_all(&mut a, "--jail-ro", &self.jail_ro);
        push_all(&mut a, "--jail-rw", &self.jail_rw);
        push_all(&mut a, "--jail-tap", &self.jail_taps);
        if self.jail_max_open_files != VmmArgs::default().jail_max_open_files {
            push(
                &mut a,
                "--jail-max-open-files",
                self.jail_max_open_files.to_string(),
            );
        }
        push_flag(&mut a, "--jail-core-dumps", self.jail_core_dumps);
        push_flag(&mut a, "--no-seccomp", self.no_seccomp);
        a
    }

    /// A command that runs `binary` with these arguments; the migration
    /// token, if any, goes in its environment.
    pub fn to_command(&self, binary: &Path) -> Command {
        let mut cmd = Command::new(binary);
        cmd.args(self.to_args());
        match &self.migrate_token {
            Some(token) => cmd.env(MIGRATE_TOKEN_ENV, token),
            None => cmd.env_remove(MIGRATE_TOKEN_ENV),
        };
        cmd
    }

    /// `OLD=NEW` tap renames, as `--tap` takes them.
    pub fn tap_override(old: &str, new: &str) -> String {
        format!("{old}={new}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field set to something other than its default.
    fn everything() -> VmmArgs {
        VmmArgs {
            host_info: true,
            config: Some("/vm/vmm.json".into()),
            kernel: Some("/k".into()),
            initrd: Some("/i".into()),
            cmdline: Some("console=ttyS0 a=\"b c\"".into()),
            vcpus: Some(3),
            memory_mib: Some(96),
            console_log: Some("/vm/console.log".into()),
            console_stdout: true,
            console_in: Some("stdin".into()),
            disks: vec!["/d0,ro".into(), "/d1,serial=x".into()],
            nics: vec!["tap=t0".into(), "fd=5,mac=52:54:00:00:00:01".into()],
            api_socket: Some("/vm/run/api.sock".into()),
            exit_file: Some("/vm/run/exit.json".into()),
            detach: true,
            start_gate_stdin: true,
            cgroups: vec!["/sys/fs/cgroup/cpu/berth/a".into(), "/b".into()],
            restore: Some("/vm/snapshots/s".into()),
            paused: true,
            tap_overrides: vec![VmmArgs::tap_override("t0", "t9")],
            migrate_listen: Some("127.0.0.1:0".into()),
            migrate_token: None,
            migrate_expires_at_ms: Some(1_700_000_000_000),
            migrate_address_file: Some("/vm/run/addr".into()),
            kvm_device: "/dev/kvm-test".into(),
            jail_root: Some("/vm/jail".into()),
            jail_uid: Some(300_001),
            jail_gid: Some(300_002),
            jail_ro: vec!["/k".into(), "/i".into()],
            jail_rw: vec!["/vm/run".into()],
            jail_taps: vec!["t0".into()],
            jail_max_open_files: 99,
            jail_core_dumps: true,
            no_seccomp: true,
        }
    }

    fn reparsed(args: &VmmArgs) -> VmmArgs {
        let mut argv = vec![OsString::from("berth-vmm")];
        argv.extend(args.to_args());
        VmmArgs::try_parse_from(argv).expect("our own arguments parse")
    }

    #[test]
    fn every_flag_parses_back_to_what_was_set() {
        let all = everything();
        assert_eq!(reparsed(&all), all);
        assert_eq!(reparsed(&VmmArgs::default()), VmmArgs::default());
        assert!(VmmArgs::default().to_args().is_empty());
    }

    #[test]
    fn the_token_travels_in_the_environment_not_the_arguments() {
        let args = VmmArgs {
            migrate_listen: Some("0.0.0.0:0".into()),
            migrate_token: Some("a-token-of-sixteen-chars".into()),
            ..VmmArgs::default()
        };
        let cmd = args.to_command(Path::new("/usr/bin/berth-vmm"));
        assert!(cmd
            .get_args()
            .all(|a| !a.to_string_lossy().contains("a-token")));
        let env: Vec<_> = cmd.get_envs().collect();
        assert_eq!(
            env,
            vec![(
                std::ffi::OsStr::new(MIGRATE_TOKEN_ENV),
                Some(std::ffi::OsStr::new("a-token-of-sixteen-chars"))
            )]
        );
    }

    #[test]
    fn a_jail_flag_without_a_jail_root_is_refused() {
        let err = VmmArgs::try_parse_from(["berth-vmm", "--jail-uid", "5"]).unwrap_err();
        assert!(err.to_string().contains("--jail-root"), "{err}");
    }
}
