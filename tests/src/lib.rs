//! Helpers for Berth's integration tests: where the binaries and guest images
//! are, which KVM this host has, and running `berth-vmm` with a time limit
//! while capturing what the guest printed.

pub mod agent;
pub mod cpio;
pub mod first_run;
pub mod harness;
pub mod net;

/// berth.v1 as generated here from the .proto files.
#[allow(
    clippy::all,
    unused,
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals
)]
pub mod contract {
    include!(concat!(env!("OUT_DIR"), "/generated.rs"));
}

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// FNV-1a 64, as the probe's `blk_read` reports it.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repo")
        .to_owned()
}

/// The directory cargo put this test's sibling binaries in (target/<profile>).
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // Tests live in target/<profile>/deps/, binaries (berth-bench) beside
    // the others in target/<profile>/.
    let dir = exe.parent().expect("binary has a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target/<profile>").to_owned()
    } else {
        dir.to_owned()
    }
}

/// A workspace binary, built by `cargo test --workspace` before any test runs.
pub fn binary(name: &str) -> PathBuf {
    let path = target_profile_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (which builds every binary) or `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// berth-vmm as the tests need it: with its fault hooks (feature
/// `test-hooks`), which `cargo build --workspace` / `cargo test --workspace`
/// turn on through this crate. A `cargo build -p berth-vmm` since then
/// replaced it with one without them, which the hook tests cannot use.
pub fn vmm_binary() -> PathBuf {
    static CHECKED: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let path = binary("berth-vmm");
            let hooks = std::process::Command::new("grep")
                .args(["-qa", "BERTH_TEST_MIGRATION_FAULT"])
                .arg(&path)
                .status()
                .expect("grep");
            assert!(
                hooks.success(),
                "{} was built without its test hooks (feature test-hooks): run `cargo build --workspace` (or `cargo test --workspace`) before these tests",
                path.display()
            );
            path
        })
        .clone()
}

/// Where slow artefacts are cached, outside the repo (same rule as
/// images/lib.sh).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BERTH_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or("/root".into())).join(".cache")
        });
    base.join("berth")
}

/// A program on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.exists())
    })
}

/// Builds (or finds in the cache) a guest image and returns its directory.
pub fn image_dir(name: &str) -> PathBuf {
    static DIRS: OnceLock<Mutex<Vec<(String, PathBuf)>>> = OnceLock::new();
    let dirs = DIRS.get_or_init(Default::default);
    let mut dirs = dirs.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, dir)) = dirs.iter().find(|(n, _)| n == name) {
        return dir.clone();
    }
    let out = Command::new(repo_root().join("images/build.sh"))
        .arg(name)
        .stderr(Stdio::inherit())
        .output()
        .expect("run images/build.sh");
    assert!(
        out.status.success(),
        "images/build.sh {name} failed ({}); see its output above",
        out.status
    );
    let dir = PathBuf::from(
        String::from_utf8(out.stdout)
            .expect("utf-8 path")
            .lines()
            .last()
            .expect("images/build.sh prints the image dir"),
    );
    dirs.push((name.to_string(), dir.clone()));
    dir
}

pub fn probe_elf() -> PathBuf {
    image_dir("probe").join("probe.elf")
}

/// Which KVM this host has, as the tests report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmMode {
    Hardware,
    Pvm,
    None,
}

pub fn kvm_mode() -> KvmMode {
    let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
    if !Path::new("/dev/kvm").exists() {
        KvmMode::None
    } else if loaded("kvm_pvm") {
        KvmMode::Pvm
    } else if loaded("kvm_intel") || loaded("kvm_amd") {
        KvmMode::Hardware
    } else {
        // A /dev/kvm we cannot classify is treated as the weaker one.
        KvmMode::Pvm
    }
}

/// Prints which mode a test ran in, so the log says what was proven.
pub fn report_mode(test: &str) -> KvmMode {
    let mode = kvm_mode();
    eprintln!("[{test}] KVM mode: {mode:?}");
    assert_ne!(
        mode,
        KvmMode::None,
        "/dev/kvm is missing: these tests boot real guests and need KVM"
    );
    mode
}

/// A running berth-vmm (or any child) whose stdout and stderr are collected
/// in the background.
pub struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    started: Instant,
}

pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    /// Lines the probe printed (`PROBE ...`), carriage returns removed.
    pub fn probe_lines(&self) -> Vec<String> {
        self.stdout
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .filter(|l| l.starts_with("PROBE "))
            .collect()
    }

    /// The value after `PROBE <key> ` on its first line.
    pub fn probe_value(&self, key: &str) -> Option<String> {
        let prefix = format!("PROBE {key} ");
        self.probe_lines()
            .into_iter()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
    }

    pub fn describe(&self) -> String {
        format!(
            "status {:?} after {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

fn collect(
    mut src: impl Read + Send + 'static,
    dst: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match src.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => dst.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    })
}

impl Running {
    pub fn spawn(mut cmd: Command) -> Running {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), stdout.clone()),
            collect(child.stderr.take().unwrap(), stderr.clone()),
        ];
        Running {
            child,
            stdout,
            stderr,
            readers,
            started,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn write_stdin(&mut self, bytes: &[u8]) {
        let stdin = self.child.stdin.as_mut().expect("stdin is piped");
        stdin.write_all(bytes).expect("write to the VMM's stdin");
        stdin.flush().unwrap();
    }

    pub fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits until stdout contains `needle`; panics with everything seen so
    /// far if it does not appear within `timeout` or the process ends first.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) {
        self.wait_for(needle, timeout, false)
    }

    /// The same, on stderr.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) {
        self.wait_for(needle, timeout, true)
    }

    fn wait_for(&mut self, needle: &str, timeout: Duration, stderr: bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = if stderr {
                self.stderr_so_far()
            } else {
                self.stdout_so_far()
            };
            if seen.contains(needle) {
                return;
            }
            let exited = self.child.try_wait().unwrap().is_some();
            if exited || Instant::now() > deadline {
                let (finished, _) = self.finish(Duration::from_secs(5));
                panic!(
                    "{needle:?} never appeared ({}):\n{}",
                    if exited { "process ended" } else { "timed out" },
                    finished.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to end; kills it (and fails the test, with its
    /// output) if it runs past `timeout`: a hang is a failure, not a pass.
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let (finished, timed_out) = self.finish(timeout);
        assert!(
            !timed_out,
            "process did not end within {timeout:?} and was killed:\n{}",
            finished.describe()
        );
        finished
    }

    /// Waits for the process to end, killing it past `timeout`; returns
    /// what it printed and whether it had to be killed.
    pub fn wait_or_kill(mut self, timeout: Duration) -> (Finished, bool) {
        self.finish(timeout)
    }

    /// Closes stdin, waits up to `timeout`, kills the process past it.
    fn finish(&mut self, timeout: Duration) -> (Finished, bool) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let timed_out = status.is_none();
        let status = status.unwrap_or_else(|| {
            let _ = self.child.kill();
            self.child.wait().unwrap()
        });
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let finished = Finished {
            status,
            stdout: String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned(),
            stderr: String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned(),
            elapsed: self.started.elapsed(),
        };
        (finished, timed_out)
    }
}

impl Drop for Running {
    /// A test that panics must not leave a VMM running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `berth-vmm` command with its console on stdout.
pub fn vmm_command(kernel: &Path, vcpus: u32, memory_mib: u64, cmdline: &str) -> Command {
    let mut cmd = Command::new(vmm_binary());
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--vcpus")
        .arg(vcpus.to_string())
        .arg("--memory-mib")
        .arg(memory_mib.to_string())
        .arg("--cmdline")
        .arg(cmdline)
        .arg("--console-stdout");
    cmd
}

/// Runs a command to its end within `timeout`.
pub fn run(cmd: Command, timeout: Duration) -> Finished {
    Running::spawn(cmd).wait(timeout)
}

/// The e820 map berth-vmm promises for `memory_mib` below the MMIO gap:
/// base memory up to the EBDA, then everything from 1 MiB. Written out
/// here independently of the VMM's own layout code.
pub fn expected_low_e820(memory_mib: u64) -> Vec<(u64, u64)> {
    vec![(0, 0x9fc00), (0x10_0000, (memory_mib << 20) - 0x10_0000)]
}

/// A scratch directory unique to one test.
pub fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("berth-test-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A small random source for fault-injection rounds, seeded from the clock
/// and printed, so a failing round can be replayed with the same seed.
pub struct Lcg(pub u64);

impl Lcg {
    /// Seeded from the clock; the seed is printed.
    pub fn from_clock() -> Lcg {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        eprintln!("seed {seed}");
        Lcg(seed)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}
