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
/// Modules /init loads (tests/harness/init.sh), all from the amdhost
/// image: KVM and taps always; a virtio-pci disk and bridges only for an
/// inner host with a data disk ([`InnerHost::data_disk`]).
const MODULES: [&str; 4] = ["irqbypass", "kvm", "kvm-amd", "tun"];
const CLOUD_HOST_MODULES: [&str; 9] = [
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "llc",
    "stp",
    "bridge",
];
const OUTER_CPUS: u32 = 2;

/// The inner host's machine and what it carries beyond the standard set.
pub struct InnerHost {
    /// QEMU's `-cpu` for the inner host (docs/testing.md says which and why).
    pub cpu: &'static str,
    pub memory_mib: u32,
    /// A raw disk image (ext4) the inner host mounts at /data. QEMU keeps
    /// the inner host's writes in a throwaway overlay, so it stays as built.
    pub data_disk: Option<PathBuf>,
    /// More files for the initramfs: (path inside, mode, file outside).
    pub files: Vec<(String, u32, PathBuf)>,
    /// More files given by content: (path inside, mode, bytes).
    pub texts: Vec<(String, u32, Vec<u8>)>,
    /// Binaries whose shared libraries come along too: (path inside, file outside).
    pub programs: Vec<(String, PathBuf)>,
}

impl Default for InnerHost {
    fn default() -> Self {
        InnerHost {
            cpu: "max",
            memory_mib: 2048,
            data_disk: None,
            files: Vec::new(),
            texts: Vec::new(),
            programs: Vec::new(),
        }
    }
}

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

fn inputs(scenarios: &[Scenario], host_options: &InnerHost) -> Vec<Input> {
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
    if host_options.data_disk.is_some() {
        for m in CLOUD_HOST_MODULES {
            v.push(file(
                &format!("lib/modules/{m}.ko"),
                0o644,
                host.join("modules").join(format!("{m}.ko")),
            ));
        }
    }
    let mut libraries = shared_libraries(&vmm);
    for (dest, path) in &host_options.programs {
        libraries.extend(shared_libraries(path));
        v.push(Input {
            dest: dest.trim_start_matches('/').to_string(),
            perm: 0o755,
            source: Source::Stripped(path.clone()),
        });
    }
    libraries.sort();
    libraries.dedup();
    for lib in libraries {
        let dest = lib.to_string_lossy().trim_start_matches('/').to_string();
        v.push(file(&dest, 0o755, lib));
    }
    for (dest, perm, path) in &host_options.files {
        v.push(file(dest.trim_start_matches('/'), *perm, path.clone()));
    }
    for (dest, perm, bytes) in &host_options.texts {
        v.push(Input {
            dest: dest.trim_start_matches('/').to_string(),
            perm: *perm,
            source: Source::Bytes(bytes.clone()),
        });
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
fn outer_initramfs(scenarios: &[Scenario], host_options: &InnerHost) -> PathBuf {
    let inputs = inputs(scenarios, host_options);
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

/// Boots the standard inner host under QEMU's AMD-V emulation and runs
/// `scenarios`.
pub fn run_scenarios(scenarios: &[Scenario], timeout: Duration) -> HarnessRun {
    run_scenarios_on(&InnerHost::default(), scenarios, timeout)
}

/// The same on an inner host made to `host_options`.
pub fn run_scenarios_on(
    host_options: &InnerHost,
    scenarios: &[Scenario],
    timeout: Duration,
) -> HarnessRun {
    let qemu = crate::which("qemu-system-x86_64").unwrap_or_else(|| {
        panic!(
            "qemu-system-x86_64 is missing, so the emulated-AMD-V harness cannot start: \
             apt-get install qemu-system-x86 (ci/install-deps.sh does)"
        )
    });
    let initramfs = outer_initramfs(scenarios, host_options);
    // For studies of which CPU features the emulation gets right
    // (docs/testing.md): BERTH_HARNESS_CPU replaces the model.
    let cpu = std::env::var("BERTH_HARNESS_CPU").unwrap_or_else(|_| host_options.cpu.to_string());
    let live = std::env::temp_dir().join(format!("berth-harness-{}.console", std::process::id()));
    eprintln!(
        "[harness] follow the inner host's console: tail -f {}",
        live.display()
    );
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-M", "q35", "-cpu", &cpu])
        .args([
            "-smp",
            &OUTER_CPUS.to_string(),
            "-m",
            &host_options.memory_mib.to_string(),
        ])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        // The console comes back on stdout, and is also written as it
        // happens to a file one can follow while a long run goes on.
        .args([
            "-chardev",
            &format!("stdio,id=console,signal=off,logfile={}", live.display()),
        ])
        .args(["-serial", "chardev:console"])
        .arg("-kernel")
        .arg(image_dir("amdhost").join("vmlinuz"))
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", "console=ttyS0 quiet panic=-1"]);
    if let Some(disk) = &host_options.data_disk {
        cmd.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,snapshot=on",
            disk.display()
        ));
    }
    eprintln!(
        "[harness] inner host: -cpu {cpu} -m {} MiB{}",
        host_options.memory_mib,
        if host_options.data_disk.is_some() {
            ", a data disk"
        } else {
            ""
        }
    );
    // A run that hangs is killed but not a panic here: the scenarios it did
    // finish still count, and each missing one fails its own test.
    let (finished, timed_out) = crate::Running::spawn(cmd).wait_or_kill(timeout);
    if timed_out {
        eprintln!("[harness] the inner host did not finish within {timeout:?} and was killed");
    }
    HarnessRun { finished }
}
