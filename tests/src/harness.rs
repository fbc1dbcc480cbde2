//! The emulated-AMD-V harness: proves that berth-vmm boots real Linux on
//! kvm_amd on machines whose own /dev/kvm is the software PVM.
//!
//! QEMU's software emulation (`-accel tcg -cpu max`) offers AMD-V with nested
//! paging; Debian's stock cloud kernel loads `kvm-amd` inside it and gets a
//! real /dev/kvm. We boot that kernel as an "inner host" with an initramfs
//! holding berth-vmm, its libraries, our guest images and one shell script
//! per scenario; its /init (tests/harness/init.sh) runs them in order and
//! brackets each one's output with HARNESS-BEGIN/END lines.

use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::cpio::CpioWriter;
use crate::{image_dir, vmm_binary, Finished};

const INIT: &str = include_str!("../harness/init.sh");
const MODULES: [&str; 4] = ["irqbypass", "kvm", "kvm-amd", "tun"];
/// Memory and CPUs of the inner host.
const OUTER_MEMORY_MIB: u32 = 2048;
const OUTER_CPUS: u32 = 2;

/// One scenario: a shell script run by the inner host's /init. Its output,
/// exit status and time come back in a [`ScenarioResult`].
pub struct Scenario {
    pub name: &'static str,
    pub script: String,
}

#[derive(Debug)]
pub struct ScenarioResult {
    pub name: String,
    /// What the scenario printed (the inner guest's console among it).
    pub output: String,
    pub exit: i32,
    pub ms: u64,
}

pub struct HarnessRun {
    pub finished: Finished,
}

impl HarnessRun {
    /// The result of one scenario; panics with the whole console if it did
    /// not run to its end.
    pub fn scenario(&self, name: &str) -> ScenarioResult {
        let console = self.finished.stdout.replace('\r', "");
        let begin = format!("HARNESS-BEGIN {name}\n");
        let end = format!("HARNESS-END {name} exit=");
        let found = console.split_once(&begin).and_then(|(_, rest)| {
            let (output, tail) = rest.split_once(&end)?;
            let line = tail.lines().next()?;
            let (exit, ms) = line.split_once(" ms=")?;
            Some(ScenarioResult {
                name: name.to_string(),
                output: output.to_string(),
                exit: exit.parse().ok()?,
                ms: ms.trim().parse().ok()?,
            })
        });
        found.unwrap_or_else(|| {
            let why = if !console.contains("HARNESS-KVM kvm_amd") {
                "the inner host has no kvm_amd /dev/kvm (does the CPU model offer svm?)"
            } else {
                "it did not run to its end in the harness"
            };
            panic!("scenario {name}: {why}:\n{}", self.finished.describe())
        })
    }
}

struct Input {
    dest: String,
    perm: u32,
    source: Source,
}

enum Source {
    File(PathBuf),
    /// A binary whose debug info is stripped on the way in (size).
    Stripped(PathBuf),
    /// A mostly empty disk image, gzipped on the way in (cpio has no holes).
    Gzipped(PathBuf),
    Bytes(Vec<u8>),
}

/// Shared libraries `ldd` says `binary` needs, as (path in the host, same path inside).
fn shared_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .expect("ldd is installed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

fn inputs(scenarios: &[Scenario]) -> Vec<Input> {
    let host = image_dir("amdhost");
    let linux = image_dir("linux");
    let vmm = vmm_binary();
    let file = |dest: &str, perm, path: PathBuf| Input {
        dest: dest.to_string(),
        perm,
        source: Source::File(path),
    };
    let mut v = vec![
        Input {
            dest: "init".into(),
            perm: 0o755,
            source: Source::Bytes(INIT.as_bytes().to_vec()),
        },
        file("bin/busybox", 0o755, host.join("busybox")),
        Input {
            dest: "usr/bin/berth-vmm".into(),
            perm: 0o755,
            source: Source::Stripped(vmm.clone()),
        },
        Input {
            dest: "usr/bin/vmmctl".into(),
            perm: 0o755,
            source: Source::Stripped(crate::binary("vmmctl")),
        },
        file("guest/vmlinux", 0o644, linux.join("vmlinux")),
        file("guest/bzImage", 0o644, linux.join("bzImage")),
        file(
            "guest/initramfs.cpio.gz",
            0o644,
            linux.join("initramfs.cpio.gz"),
        ),
        Input {
            dest: "guest/rootfs.ext4.gz".into(),
            perm: 0o644,
            source: Source::Gzipped(linux.join("rootfs.ext4")),
        },
    ];
    for m in MODULES {
        v.push(file(
            &format!("lib/modules/{m}.ko"),
            0o644,
            host.join("modules").join(format!("{m}.ko")),
        ));
    }
    for lib in shared_libraries(&vmm) {
        let dest = lib.to_string_lossy().trim_start_matches('/').to_string();
        v.push(file(&dest, 0o755, lib));
    }
    for (i, s) in scenarios.iter().enumerate() {
        v.push(Input {
            dest: format!("scenarios/{i:02}-{}.sh", s.name),
            perm: 0o755,
            source: Source::Bytes(s.script.clone().into_bytes()),
        });
    }
    v
}

fn read(source: &Source) -> Vec<u8> {
    match source {
        Source::File(p) => std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())),
        Source::Bytes(b) => b.clone(),
        Source::Gzipped(p) => {
            let out = Command::new("gzip")
                .args(["-c", "-1"])
                .arg(p)
                .output()
                .expect("gzip is installed");
            assert!(out.status.success(), "gzip {} failed", p.display());
            out.stdout
        }
        Source::Stripped(p) => {
            let tmp = std::env::temp_dir().join(format!("berth-strip-{}", std::process::id()));
            let ok = Command::new("objcopy")
                .arg("--strip-debug")
                .arg(p)
                .arg(&tmp)
                .status()
                .expect("objcopy (binutils) is installed")
                .success();
            assert!(ok, "objcopy --strip-debug {} failed", p.display());
            let bytes = std::fs::read(&tmp).unwrap();
            let _ = std::fs::remove_file(&tmp);
            bytes
        }
    }
}

/// Builds the inner host's initramfs, or reuses the cached one when no input
/// changed (the key hashes every input's path and bytes).
fn outer_initramfs(scenarios: &[Scenario]) -> PathBuf {
    let inputs = inputs(scenarios);
    let mut hasher = DefaultHasher::new();
    for input in &inputs {
        hasher.write(input.dest.as_bytes());
        hasher.write_u32(input.perm);
        let bytes = match &input.source {
            Source::Stripped(p) | Source::File(p) | Source::Gzipped(p) => std::fs::read(p).unwrap(),
            Source::Bytes(b) => b.clone(),
        };
        hasher.write(&bytes);
    }
    let cache = crate::cache_dir().join("harness");
    std::fs::create_dir_all(&cache).unwrap();
    let path = cache.join(format!("inner-host-{:016x}.cpio", hasher.finish()));
    if path.exists() {
        eprintln!("[harness] initramfs unchanged: {}", path.display());
        return path;
    }
    eprintln!("[harness] building {}", path.display());
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut w = CpioWriter::new(std::io::BufWriter::new(
        std::fs::File::create(&tmp).unwrap(),
    ));
    let mut dirs: Vec<String> = ["dev", "proc", "sys", "tmp", "bin", "usr", "usr/bin"]
        .into_iter()
        .map(String::from)
        .collect();
    for input in &inputs {
        let mut parent = Path::new(&input.dest).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.push(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
    }
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        w.dir(d).unwrap();
    }
    w.char_dev("dev/console", 5, 1).unwrap();
    w.symlink("bin/sh", "busybox").unwrap();
    for input in &inputs {
        w.file(&input.dest, input.perm, &read(&input.source))
            .unwrap();
    }
    w.finish().unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// Boots the inner host under QEMU's AMD-V emulation and runs `scenarios`.
pub fn run_scenarios(scenarios: &[Scenario], timeout: Duration) -> HarnessRun {
    let qemu = crate::which("qemu-system-x86_64").unwrap_or_else(|| {
        panic!(
            "qemu-system-x86_64 is missing, so the emulated-AMD-V harness cannot start: \
             apt-get install qemu-system-x86 (ci/install-deps.sh does)"
        )
    });
    let initramfs = outer_initramfs(scenarios);
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-M", "q35", "-cpu", "max"])
        .args([
            "-smp",
            &OUTER_CPUS.to_string(),
            "-m",
            &OUTER_MEMORY_MIB.to_string(),
        ])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(image_dir("amdhost").join("vmlinuz"))
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", "console=ttyS0 quiet panic=-1"]);
    // A run that hangs is killed but not a panic here: the scenarios it did
    // finish still count, and each missing one fails its own test.
    let (finished, timed_out) = crate::Running::spawn(cmd).wait_or_kill(timeout);
    if timed_out {
        eprintln!("[harness] the inner host did not finish within {timeout:?} and was killed");
    }
    HarnessRun { finished }
}
