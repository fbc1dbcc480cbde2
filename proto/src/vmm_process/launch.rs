//! berth-vmm's command line: the one definition of the flags the agent
//! launches a VMM with and the VMM parses. Each flag is one line of the
//! `vmm_args!` table below, which makes the [`VmmArgs`] field, the parser
//! ([`VmmArgs::try_parse_from`]), the `--help` text and
//! [`VmmArgs::to_args`], the arguments that parse back to a value (checked
//! by a test for every flag), so the agent never spells a flag itself.
//!
//! A small parser of our own rather than clap's derive: berth-vmm runs once
//! per guest, and clap's code was a tenth of what each VMM process keeps
//! resident (issue 16).

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::config::Discovery;

/// The environment variable that carries the migration token: not on the
/// command line, where any local user could read it.
pub const MIGRATE_TOKEN_ENV: &str = "BERTH_MIGRATE_TOKEN";

/// The default KVM device.
pub const KVM_DEVICE: &str = "/dev/kvm";

const ABOUT: &str = "Boot one guest over /dev/kvm";

/// The text of one flag's value, read and written back.
trait Value: Sized {
    fn read(text: &OsStr) -> Result<Self, String>;
    fn write(&self) -> OsString;
}

impl Value for PathBuf {
    fn read(text: &OsStr) -> Result<Self, String> {
        Ok(text.into())
    }
    fn write(&self) -> OsString {
        self.clone().into_os_string()
    }
}

impl Value for String {
    fn read(text: &OsStr) -> Result<Self, String> {
        text.to_str()
            .map(str::to_owned)
            .ok_or_else(|| "invalid UTF-8 was detected".to_string())
    }
    fn write(&self) -> OsString {
        self.into()
    }
}

macro_rules! number_value {
    ($($t:ty),*) => {$(
        impl Value for $t {
            fn read(text: &OsStr) -> Result<Self, String> {
                String::read(text)?.parse().map_err(|e| format!("{e}"))
            }
            fn write(&self) -> OsString {
                self.to_string().into()
            }
        }
    )*};
}
number_value!(u32, u64);

impl Value for Discovery {
    fn read(text: &OsStr) -> Result<Self, String> {
        String::read(text)?.parse()
    }
    fn write(&self) -> OsString {
        self.as_str().into()
    }
}

/// How a field takes its flag: a switch (`bool`), at most one value
/// (`Option`), any number (`Vec`), or one value with a default.
trait Field {
    const TAKES_VALUE: bool = true;
    const REPEATS: bool = false;
    /// Takes one occurrence of the flag (`None`: a switch).
    fn take(&mut self, value: Option<&OsStr>) -> Result<(), String>;
    /// Writes the flag back, unless `self` is `default`.
    fn put(&self, flag: &str, default: &Self, out: &mut Vec<OsString>);
    /// The default as `--help` shows it, if it is not simply "not given".
    fn shown_default(&self) -> Option<OsString> {
        None
    }
}

impl Field for bool {
    const TAKES_VALUE: bool = false;
    fn take(&mut self, _: Option<&OsStr>) -> Result<(), String> {
        *self = true;
        Ok(())
    }
    fn put(&self, flag: &str, _: &Self, out: &mut Vec<OsString>) {
        if *self {
            out.push(flag.into());
        }
    }
}

impl<T: Value> Field for Option<T> {
    fn take(&mut self, value: Option<&OsStr>) -> Result<(), String> {
        *self = Some(T::read(value.unwrap_or_default())?);
        Ok(())
    }
    fn put(&self, flag: &str, _: &Self, out: &mut Vec<OsString>) {
        if let Some(v) = self {
            out.extend([flag.into(), v.write()]);
        }
    }
}

impl<T: Value> Field for Vec<T> {
    const REPEATS: bool = true;
    fn take(&mut self, value: Option<&OsStr>) -> Result<(), String> {
        self.push(T::read(value.unwrap_or_default())?);
        Ok(())
    }
    fn put(&self, flag: &str, _: &Self, out: &mut Vec<OsString>) {
        for v in self {
            out.extend([flag.into(), v.write()]);
        }
    }
}

macro_rules! defaulted_field {
    ($($t:ty),*) => {$(
        impl Field for $t {
            fn take(&mut self, value: Option<&OsStr>) -> Result<(), String> {
                *self = <$t>::read(value.unwrap_or_default())?;
                Ok(())
            }
            fn put(&self, flag: &str, default: &Self, out: &mut Vec<OsString>) {
                if self != default {
                    out.extend([flag.into(), self.write()]);
                }
            }
            fn shown_default(&self) -> Option<OsString> {
                Some(self.write())
            }
        }
    )*};
}
defaulted_field!(PathBuf, u64);

/// One flag as the parser and `--help` see it.
struct Flag {
    field: &'static str,
    flag: &'static str,
    value: Option<&'static str>,
    help: &'static [&'static str],
    takes_value: bool,
    repeats: bool,
    env: Option<&'static str>,
}

impl Flag {
    /// `--flag <VALUE>`, as messages name it.
    fn usage(&self) -> String {
        match self.value {
            Some(v) if self.takes_value => format!("{} <{v}>", self.flag),
            _ => self.flag.to_string(),
        }
    }
}

/// Declares [`VmmArgs`]: per field its doc (the `--help` text), type,
/// flag, value name, and optionally `default(..)`, `requires(field)` (the
/// flag is refused without that one) and `env(VAR)` (read from the
/// environment when the flag is absent, and never written as an argument).
macro_rules! vmm_args {
    (@default) => { Default::default() };
    (@default $default:expr) => { $default };
    (@option) => { None };
    (@option $some:expr) => { Some($some) };
    (@put $out:ident $this:ident $defaults:ident $field:ident $flag:literal;) => {
        Field::put(&$this.$field, $flag, &$defaults.$field, &mut $out)
    };
    (@put $out:ident $this:ident $defaults:ident $field:ident $flag:literal; $env:expr) => {};
    ($(
        $(#[doc = $doc:literal])*
        $field:ident: $ty:ty = $flag:literal $(<$value:literal>)?
            $(default($default:expr))? $(requires($needs:ident))? $(env($env:expr))?;
    )*) => {
        /// Every flag of `berth-vmm`; [`Default`] is no flag given.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct VmmArgs {
            $($(#[doc = $doc])* pub $field: $ty,)*
        }

        impl Default for VmmArgs {
            /// No flags given: what `berth-vmm` alone parses to. The token
            /// is left out even when the environment holds one: a default
            /// is what a caller builds on, not what this process was given.
            fn default() -> Self {
                VmmArgs { $($field: vmm_args!(@default $($default)?),)* }
            }
        }

        const FLAGS: &[Flag] = &[$(Flag {
            field: stringify!($field),
            flag: $flag,
            value: vmm_args!(@option $($value)?),
            help: &[$($doc),*],
            takes_value: <$ty as Field>::TAKES_VALUE,
            repeats: <$ty as Field>::REPEATS,
            env: vmm_args!(@option $($env)?),
        }),*];

        /// Pairs of (flag, the field it needs set).
        const REQUIRES: &[(&str, &str)] = &[$($(($flag, stringify!($needs)),)?)*];

        impl VmmArgs {
            fn take(&mut self, flag: &str, value: Option<&OsStr>) -> Result<(), String> {
                match flag {
                    $($flag => Field::take(&mut self.$field, value),)*
                    _ => unreachable!("{flag} is in FLAGS"),
                }
            }

            fn shown_defaults(&self) -> Vec<Option<OsString>> {
                vec![$(Field::shown_default(&self.$field)),*]
            }

            /// The arguments (after the program name) that parse back to
            /// `self`, except the migration token, which [`Self::to_command`]
            /// passes in the environment.
            pub fn to_args(&self) -> Vec<OsString> {
                let (this, defaults) = (self, VmmArgs::default());
                let mut out = Vec::new();
                $(vmm_args!(@put out this defaults $field $flag; $($env)?);)*
                out
            }
        }
    };
}

vmm_args! {
    /// Print what this host offers guests (KVM flavour, vCPU limit) as
    /// JSON and exit: the agent learns host facts that need KVM this way.
    host_info: bool = "--host-info";
    /// VM config file (JSON, or TOML with a .toml extension); flags override it.
    config: Option<PathBuf> = "--config" <"PATH">;
    /// Kernel: ELF vmlinux or bzImage.
    kernel: Option<PathBuf> = "--kernel" <"PATH">;
    /// Initial ramdisk.
    initrd: Option<PathBuf> = "--initrd" <"PATH">;
    /// Kernel command line.
    cmdline: Option<String> = "--cmdline" <"TEXT">;
    /// Number of vCPUs.
    vcpus: Option<u32> = "--vcpus" <"N">;
    /// Guest RAM in MiB.
    memory_mib: Option<u64> = "--memory-mib" <"MIB">;
    /// How the guest finds its CPUs and devices: ACPI tables (the default),
    /// or an MP table and virtio_mmio.device= words for kernels without ACPI.
    discovery: Option<Discovery> = "--discovery" <"acpi|legacy">;
    /// Append console output to this file.
    console_log: Option<PathBuf> = "--console-log" <"PATH">;
    /// Copy console output to stdout.
    console_stdout: bool = "--console-stdout";
    /// Console input: "stdin", or a file/FIFO path.
    console_in: Option<String> = "--console-in" <"stdin|PATH">;
    /// A virtio-blk disk; repeat for more (vda, vdb, ...).
    disks: Vec<String> = "--disk" <"PATH[,ro][,serial=ID][,bps=N][,iops=N]">;
    /// A virtio-net NIC; repeat for more.
    nics: Vec<String> = "--nic" <"tap=NAME|fd=N[,mac=MAC][,rx_bps=N][,tx_bps=N]">;
    /// A virtio-rng entropy device (after the disks and NICs).
    rng: bool = "--rng";
    /// Serve the control API (berth.v1 VmmService) on this unix socket.
    api_socket: Option<PathBuf> = "--api-socket" <"PATH">;
    /// On exit, write {"code": .., "reason": ".."} to this file (atomically),
    /// so a supervisor that is not our parent learns how we ended.
    exit_file: Option<PathBuf> = "--exit-file" <"PATH">;
    /// Start a new session (setsid), detached from the caller's terminal and
    /// process group, as the agent does for every VMM.
    detach: bool = "--detach";
    /// Wait for one byte on stdin before doing anything. The agent sends
    /// it once this VMM's pid is on disk; end of file instead means the
    /// agent died first, and a VMM no agent knows of must not run.
    start_gate_stdin: bool = "--start-gate-stdin";
    /// Hold an exclusive lock on this file for the VMM's whole life, taken
    /// before anything else (`run_lock`): a second VMM for the same VM
    /// refuses to start, and the agent tells a live VMM by it.
    run_lock: Option<PathBuf> = "--run-lock" <"PATH">;
    /// Join this cgroup directory (repeat for each v1 hierarchy) before any
    /// thread starts, so every vCPU and device thread is accounted to it.
    cgroups: Vec<PathBuf> = "--cgroup" <"DIR">;
    /// Restore the VM from this snapshot directory instead of booting; the
    /// console flags still apply.
    restore: Option<PathBuf> = "--restore" <"DIR">;
    /// With --restore: keep the guest paused until the API resumes it.
    paused: bool = "--paused";
    /// With --restore: attach the NIC whose tap was OLD to NEW instead.
    tap_overrides: Vec<String> = "--tap" <"OLD=NEW">;
    /// Receive a live migration on this address (host:port; port 0 picks
    /// one) instead of booting; the console, tap and API flags still apply.
    migrate_listen: Option<String> = "--migrate-listen" <"ADDR">;
    /// With --migrate-listen: the token the source must present (at least 16 characters).
    migrate_token: Option<String> = "--migrate-token" <"TOKEN"> env(MIGRATE_TOKEN_ENV);
    /// With --migrate-listen: give up if no source arrived by this time (Unix ms).
    migrate_expires_at_ms: Option<u64> = "--migrate-expires-at-ms" <"UNIX_MS">;
    /// With --migrate-listen: write the address actually bound here (atomically).
    migrate_address_file: Option<PathBuf> = "--migrate-address-file" <"PATH">;
    /// KVM device to open.
    kvm_device: PathBuf = "--kvm-device" <"PATH"> default(KVM_DEVICE.into());
    /// Jail this VMM (docs/security.md): pivot_root into this empty
    /// directory holding only the --jail-ro/--jail-rw paths and the devices,
    /// then run as --jail-uid/--jail-gid with no capabilities.
    jail_root: Option<PathBuf> = "--jail-root" <"DIR">;
    /// The uid the jailed VMM runs as.
    jail_uid: Option<u32> = "--jail-uid" <"UID"> requires(jail_root);
    /// The gid the jailed VMM runs as.
    jail_gid: Option<u32> = "--jail-gid" <"GID"> requires(jail_root);
    /// A file or directory the jailed VMM may read (repeat).
    jail_ro: Vec<PathBuf> = "--jail-ro" <"PATH"> requires(jail_root);
    /// A file or directory the jailed VMM may write (repeat).
    jail_rw: Vec<PathBuf> = "--jail-rw" <"PATH"> requires(jail_root);
    /// A tap to attach before privileges are dropped (repeat).
    jail_taps: Vec<String> = "--jail-tap" <"NAME"> requires(jail_root);
    /// RLIMIT_NOFILE in the jail.
    jail_max_open_files: u64 = "--jail-max-open-files" <"N"> default(4096);
    /// Allow core dumps in the jail (they contain guest memory).
    jail_core_dumps: bool = "--jail-core-dumps";
    /// Run without the per-thread seccomp filters (debugging only: a
    /// compromised thread could then make any system call).
    no_seccomp: bool = "--no-seccomp";
}

/// Why the arguments did not give a [`VmmArgs`]: `--help` or `--version`
/// was asked for (exit 0), or they are wrong (exit 2, as clap did).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    Help(String),
    Version(String),
    Invalid(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Help(text) | ParseError::Version(text) => f.write_str(text),
            ParseError::Invalid(message) => write!(
                f,
                "error: {message}\n\nUsage: berth-vmm [OPTIONS]\n\nFor more information, try '--help'."
            ),
        }
    }
}

impl std::error::Error for ParseError {}

impl ParseError {
    /// 0 for `--help` and `--version`, 2 for wrong arguments.
    pub fn exit_code(&self) -> i32 {
        match self {
            ParseError::Invalid(_) => 2,
            _ => 0,
        }
    }

    /// Prints `self` (help and version to stdout, errors to stderr) and
    /// exits with [`Self::exit_code`].
    pub fn exit(&self) -> ! {
        match self {
            ParseError::Invalid(_) => eprintln!("{self}"),
            _ => println!("{self}"),
        }
        std::process::exit(self.exit_code())
    }
}

fn help() -> String {
    let mut text = format!("{ABOUT}\n\nUsage: berth-vmm [OPTIONS]\n\nOptions:\n");
    let defaults = VmmArgs::default().shown_defaults();
    for (flag, default) in FLAGS.iter().zip(defaults) {
        text += &format!("      {}\n", flag.usage());
        for line in flag.help {
            text += &format!("          {}\n", line.trim());
        }
        let mut notes = Vec::new();
        if flag.repeats {
            notes.push("repeatable".to_string());
        }
        if let Some(default) = default {
            notes.push(format!("default: {}", default.to_string_lossy()));
        }
        if let Some(env) = flag.env {
            notes.push(format!("env: {env}"));
        }
        if let Some((_, needs)) = REQUIRES.iter().find(|(f, _)| *f == flag.flag) {
            notes.push(format!("needs: {}", by_field(needs).flag));
        }
        if !notes.is_empty() {
            text += &format!("          [{}]\n", notes.join("] ["));
        }
    }
    text += "  -h, --help\n          Print help\n  -V, --version\n          Print version";
    text
}

fn by_field(field: &str) -> &'static Flag {
    FLAGS
        .iter()
        .find(|f| f.field == field)
        .expect("requires() names a field")
}

/// `--flag=value` as its two halves.
fn split_inline(arg: &OsStr) -> (&OsStr, Option<&OsStr>) {
    let bytes = arg.as_bytes();
    match bytes.iter().position(|&b| b == b'=') {
        Some(i) if bytes.starts_with(b"--") => (
            OsStr::from_bytes(&bytes[..i]),
            Some(OsStr::from_bytes(&bytes[i + 1..])),
        ),
        _ => (arg, None),
    }
}

impl VmmArgs {
    /// This process's arguments; prints help, the version or what is wrong
    /// and exits (0, or 2 for wrong arguments) if they do not give a value.
    pub fn parse() -> Self {
        Self::try_parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parses a command line, program name first. Flags may be given as
    /// `--flag VALUE` or `--flag=VALUE`; a flag that takes one value may be
    /// given once; a flag with `env` falls back to that variable.
    pub fn try_parse_from<I, T>(args: I) -> Result<Self, ParseError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        Self::parse_with_env(args, |name| std::env::var_os(name))
    }

    fn parse_with_env<I, T>(
        args: I,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Self, ParseError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        let mut args = args.into_iter().map(Into::into).skip(1);
        let mut parsed = VmmArgs::default();
        let mut seen: Vec<&'static str> = Vec::new();
        while let Some(arg) = args.next() {
            match arg.to_str() {
                Some("-h" | "--help") => return Err(ParseError::Help(help())),
                Some("-V" | "--version") => {
                    let version = concat!("berth-vmm ", env!("CARGO_PKG_VERSION"));
                    return Err(ParseError::Version(version.into()));
                }
                _ => {}
            }
            let (name, inline) = split_inline(&arg);
            let invalid = |m: String| ParseError::Invalid(m);
            let Some(flag) = FLAGS.iter().find(|f| name == f.flag) else {
                let arg = arg.to_string_lossy();
                return Err(invalid(format!("unexpected argument '{arg}' found")));
            };
            if seen.contains(&flag.flag) && !flag.repeats {
                return Err(invalid(format!(
                    "the argument '{}' cannot be used more than once",
                    flag.usage()
                )));
            }
            seen.push(flag.flag);
            let value = match (flag.takes_value, inline) {
                (true, Some(v)) => Some(v.to_owned()),
                (true, None) => match args.next() {
                    // "-" is a value (stdin); anything else with a dash is
                    // a flag, and this one's value is missing.
                    Some(v) if v != "-" && v.as_bytes().starts_with(b"-") => None,
                    next => next,
                }
                .map(Some)
                .ok_or_else(|| {
                    invalid(format!(
                        "a value is required for '{}' but none was supplied",
                        flag.usage()
                    ))
                })?,
                (false, Some(v)) => {
                    return Err(invalid(format!(
                        "unexpected value '{}' for '{}' found; it takes none",
                        v.to_string_lossy(),
                        flag.flag
                    )))
                }
                (false, None) => None,
            };
            parsed.take(flag.flag, value.as_deref()).map_err(|e| {
                let v = value.unwrap_or_default();
                let v = v.to_string_lossy();
                invalid(format!("invalid value '{v}' for '{}': {e}", flag.usage()))
            })?;
        }
        for flag in FLAGS.iter().filter(|f| !seen.contains(&f.flag)) {
            let Some(value) = flag.env.and_then(&env) else {
                continue;
            };
            if !value.is_empty() {
                parsed.take(flag.flag, Some(&value)).map_err(|e| {
                    ParseError::Invalid(format!(
                        "invalid value in ${} for '{}': {e}",
                        flag.env.unwrap_or_default(),
                        flag.usage()
                    ))
                })?;
            }
        }
        for (flag, needs) in REQUIRES {
            let needs = by_field(needs);
            if seen.contains(flag) && !seen.contains(&needs.flag) {
                return Err(ParseError::Invalid(format!(
                    "{flag} needs {}, which was not given",
                    needs.usage()
                )));
            }
        }
        Ok(parsed)
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
            discovery: Some(Discovery::Legacy),
            console_log: Some("/vm/console.log".into()),
            console_stdout: true,
            console_in: Some("stdin".into()),
            disks: vec!["/d0,ro".into(), "/d1,serial=x".into()],
            nics: vec!["tap=t0".into(), "fd=5,mac=52:54:00:00:00:01".into()],
            rng: true,
            api_socket: Some("/vm/run/api.sock".into()),
            exit_file: Some("/vm/run/exit.json".into()),
            detach: true,
            start_gate_stdin: true,
            run_lock: Some("/vm/run/vmm.lock".into()),
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
    fn a_discovery_that_is_not_one_is_refused_with_the_choices() {
        let err = VmmArgs::try_parse_from(["berth-vmm", "--discovery", "bios"]).unwrap_err();
        assert!(err.to_string().contains("use acpi or legacy"), "{err}");
    }

    #[test]
    fn a_jail_flag_without_a_jail_root_is_refused() {
        let err = VmmArgs::try_parse_from(["berth-vmm", "--jail-uid", "5"]).unwrap_err();
        assert!(err.to_string().contains("--jail-root"), "{err}");
    }
    fn parse(args: &[&str]) -> Result<VmmArgs, ParseError> {
        VmmArgs::parse_with_env(
            std::iter::once("berth-vmm").chain(args.iter().copied()),
            |_| None,
        )
    }

    fn refused(args: &[&str]) -> String {
        let err = parse(args).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{err}");
        err.to_string()
    }

    #[test]
    fn values_may_follow_an_equals_sign() {
        let args = parse(&[
            "--vcpus=2",
            "--cmdline=a=b",
            "--disk=/d",
            "--console-in",
            "-",
        ])
        .unwrap();
        assert_eq!(args.vcpus, Some(2));
        assert_eq!(args.cmdline.as_deref(), Some("a=b"));
        assert_eq!(args.disks, vec!["/d".to_string()]);
        assert_eq!(args.console_in.as_deref(), Some("-"));
    }

    #[test]
    fn wrong_arguments_are_refused_saying_what_is_wrong() {
        let err = refused(&["--no-such-flag"]);
        assert!(
            err.contains("unexpected argument '--no-such-flag'"),
            "{err}"
        );
        assert!(err.contains("--help"), "{err}");
        assert!(refused(&["stray"]).contains("'stray'"));
        let err = refused(&["--vcpus", "two"]);
        assert!(err.contains("'two'") && err.contains("--vcpus"), "{err}");
        let err = refused(&["--kernel"]);
        assert!(
            err.contains("a value is required for '--kernel <PATH>'"),
            "{err}"
        );
        let err = refused(&["--kernel", "--vcpus", "1"]);
        assert!(
            err.contains("a value is required for '--kernel <PATH>'"),
            "{err}"
        );
        let err = refused(&["--config", "/a", "--config", "/b"]);
        assert!(
            err.contains("'--config <PATH>' cannot be used more than once"),
            "{err}"
        );
        let err = refused(&["--detach=yes"]);
        assert!(err.contains("--detach") && err.contains("'yes'"), "{err}");
    }

    #[test]
    fn the_token_is_read_from_the_environment_unless_given() {
        let env = |name: &str| (name == MIGRATE_TOKEN_ENV).then(|| OsString::from("from-env"));
        let args = VmmArgs::parse_with_env(["berth-vmm"], env).unwrap();
        assert_eq!(args.migrate_token.as_deref(), Some("from-env"));
        let args = VmmArgs::parse_with_env(["berth-vmm", "--migrate-token", "flag"], env).unwrap();
        assert_eq!(args.migrate_token.as_deref(), Some("flag"));
        let empty = |_: &str| Some(OsString::new());
        let args = VmmArgs::parse_with_env(["berth-vmm"], empty).unwrap();
        assert_eq!(args.migrate_token, None);
    }

    #[test]
    fn help_lists_every_flag_and_version_names_the_binary() {
        let help = parse(&["--help"]).unwrap_err();
        assert_eq!(help.exit_code(), 0);
        let help = help.to_string();
        for flag in FLAGS {
            assert!(
                help.contains(&flag.usage()),
                "{} missing from\n{help}",
                flag.flag
            );
        }
        assert!(help.contains("[default: /dev/kvm]"), "{help}");
        assert!(help.contains("[env: BERTH_MIGRATE_TOKEN]"), "{help}");
        let version = parse(&["-V"]).unwrap_err();
        assert_eq!(version.exit_code(), 0);
        assert!(version.to_string().starts_with("berth-vmm "), "{version}");
    }
}
