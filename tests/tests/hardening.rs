//! Isolation: the seccomp filters stop a VMM thread that makes a forbidden
//! system call, and a jailed VMM (run directly, and as the agent starts
//! every VM) sees none of the host's files, holds no privilege and runs
//! every thread under a filter.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use berth_tests::agent::*;
use berth_tests::{probe_elf, report_mode, run, scratch_dir, vmm_command};

const SECCOMP_EXIT: i32 = 159;

/// Runs the probe with `BERTH_TEST_SECCOMP_VIOLATION=<kind>`; returns the
/// exit status and stderr.
fn violate(kind: &str, cmdline: &str, disk: Option<&Path>) -> (Option<i32>, String) {
    let mut cmd = vmm_command(&probe_elf(), 1, 64, cmdline);
    if let Some(disk) = disk {
        cmd.arg("--disk").arg(disk);
    }
    cmd.env("BERTH_TEST_SECCOMP_VIOLATION", kind);
    let done = run(cmd, Duration::from_secs(60));
    (done.status.code(), done.stderr)
}

#[test]
fn a_forbidden_system_call_stops_the_vmm_and_is_named() {
    report_mode("seccomp violation");
    let dir = scratch_dir("seccomp-violation");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    // The control kind covers the main thread; vcpu the vCPU threads; the
    // blk mode activates a virtio device, which starts a device worker.
    // Every other test runs its VMMs filtered too: their workloads pass.
    for (kind, cmdline) in [
        ("control", "probe.mode=tick"),
        ("vcpu", "probe.mode=tick"),
        (
            "device",
            "probe.mode=blk probe.blk_write=8:1:1 probe.blk_read=0:1",
        ),
    ] {
        let (code, stderr) = violate(kind, cmdline, Some(&disk));
        assert_eq!(code, Some(SECCOMP_EXIT), "{kind}: {stderr}");
        let line = format!(
            "berth-vmm: seccomp: a {kind} thread made the forbidden system call ptrace (101)"
        );
        assert!(
            stderr.contains(&line),
            "{kind}: wanted {line:?} in:\n{stderr}"
        );
    }
    // A VMM waiting for a migration receives on a migration thread.
    let mut cmd = std::process::Command::new(berth_tests::vmm_binary());
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 60_000;
    cmd.args(["--migrate-listen", "127.0.0.1:0", "--migrate-token"])
        .arg("hardening-token-0123456789")
        .arg("--migrate-expires-at-ms")
        .arg(expires.to_string())
        .env("BERTH_TEST_SECCOMP_VIOLATION", "migration");
    let done = run(cmd, Duration::from_secs(60));
    assert_eq!(
        done.status.code(),
        Some(SECCOMP_EXIT),
        "{}",
        done.describe()
    );
    let line = "berth-vmm: seccomp: a migration thread made the forbidden system call ptrace (101)";
    assert!(
        done.stderr.contains(line),
        "wanted {line:?} in:\n{}",
        done.stderr
    );

    // Without the hook the same runs end normally: the filters allow what
    // the workloads need.
    let mut cmd = vmm_command(
        &probe_elf(),
        2,
        64,
        "probe.mode=blk probe.blk_write=8:1:1 probe.blk_read=0:1",
    );
    cmd.arg("--disk").arg(&disk);
    let done = run(cmd, Duration::from_secs(60));
    assert_eq!(done.status.code(), Some(0), "{}", done.describe());
    assert!(done.stdout.contains("PROBE done"), "{}", done.describe());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_jailed_vmm_cannot_open_host_files() {
    report_mode("jail probe");
    let dir = scratch_dir("jail-probe");
    let (root, rundir) = (dir.join("jail"), dir.join("run"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&rundir).unwrap();
    let uid = 300_777;
    std::os::unix::fs::chown(&rundir, Some(uid), Some(uid)).unwrap();
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, b"host only").unwrap();
    let kernel = probe_elf();
    let probe = [
        Path::new("/etc/hostname"),
        &secret,
        Path::new("/proc/1/status"),
        &kernel,
    ];
    let mut cmd = vmm_command(&kernel, 1, 64, "probe.mode=boot");
    cmd.arg("--jail-root")
        .arg(&root)
        .arg("--jail-uid")
        .arg(uid.to_string())
        .arg("--jail-gid")
        .arg(uid.to_string())
        .arg("--jail-ro")
        .arg(&kernel)
        .arg("--jail-rw")
        .arg(&rundir)
        .arg("--exit-file")
        .arg(rundir.join("exit.json"))
        .env(
            "BERTH_TEST_JAIL_PROBE",
            std::env::join_paths(probe).unwrap(),
        );
    let done = run(cmd, Duration::from_secs(60));
    assert_eq!(done.status.code(), Some(0), "{}", done.describe());
    assert!(done.stdout.contains("PROBE done"), "{}", done.describe());
    for hidden in [
        "/etc/hostname",
        &secret.display().to_string(),
        "/proc/1/status",
    ] {
        let line = format!("berth-vmm: jail probe: {hidden} refused");
        assert!(
            done.stderr.contains(&line),
            "wanted {line:?}:\n{}",
            done.stderr
        );
    }
    let line = format!("berth-vmm: jail probe: {} opened", kernel.display());
    assert!(
        done.stderr.contains(&line),
        "wanted {line:?}:\n{}",
        done.stderr
    );
    // What it wrote, it wrote as its uid; and nothing leaked onto the host's
    // jail directory (the tmpfs lived in the VMM's namespace only).
    assert_eq!(
        std::fs::metadata(rundir.join("exit.json")).unwrap().uid(),
        uid
    );
    assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

fn status_field(pid: i32, task: &str, key: &str) -> String {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/task/{task}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "current_thread")]
async fn the_agent_jails_every_vmm_with_its_own_uid() {
    report_mode("agent jail");
    let agent = TestAgent::with_config(
        "agent-jail",
        "[jail]\nfirst_uid = 310000\nuid_count = 100\n",
    );
    let c = agent.clients().await;
    create_and_start(&c, probe_spec("jailed-a", 2, "probe.mode=tick")).await;
    create_and_start(&c, probe_spec("jailed-b", 1, "probe.mode=tick")).await;
    wait_console(&agent, "jailed-a", "PROBE tick", Duration::from_secs(30));

    let mut uids = Vec::new();
    for id in ["jailed-a", "jailed-b"] {
        let dir = agent.vm_dir(id);
        let pids = vmm_pids(&dir);
        assert_eq!(pids.len(), 1, "{id}: {pids:?}");
        let pid = pids[0];
        let uid: u32 = status_field(pid, &pid.to_string(), "Uid")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((310_000..310_100).contains(&uid), "{id} runs as {uid}");
        uids.push(uid);
        // Every thread: filtered, no capabilities, no way to gain any.
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let task = task.unwrap().file_name().into_string().unwrap();
            assert_eq!(status_field(pid, &task, "Seccomp"), "2", "{id} task {task}");
            assert_eq!(
                status_field(pid, &task, "NoNewPrivs"),
                "1",
                "{id} task {task}"
            );
            assert_eq!(status_field(pid, &task, "CapEff"), "0000000000000000");
            assert_eq!(status_field(pid, &task, "CapBnd"), "0000000000000000");
        }
        // Its own mount namespace.
        let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
        assert_ne!(ns(&pid.to_string()), ns("self"), "{id}");
        // What it writes belongs to it; the agent's state does not.
        for file in ["run", "run/vmm.sock", "run/console.log", "snapshots"] {
            assert_eq!(
                std::fs::metadata(dir.join(file)).unwrap().uid(),
                uid,
                "{id}: {file}"
            );
        }
        assert_eq!(std::fs::metadata(dir.join("state.json")).unwrap().uid(), 0);
    }
    assert_ne!(uids[0], uids[1], "each VM has a uid of its own");

    // The uid is kept across a stop and start.
    let stop = berth_tests::contract::vm::StopVmRequest {
        id: "jailed-b".into(),
        timeout_ms: 200,
        ..Default::default()
    };
    c.vms.stop(ctx(), &stop).await.unwrap();
    c.vms.start(ctx(), &vm_ref("jailed-b")).await.unwrap();
    let pid = vmm_pids(&agent.vm_dir("jailed-b"))[0];
    let again: u32 = status_field(pid, &pid.to_string(), "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(again, uids[1]);
}

/// A guest that prints past its console log's bound, under the seccomp
/// filters the agent turns on: the log rotates (one old log kept) and the
/// guest runs on. The vCPU thread that writes the console may not rename
/// or open files, so the rotation must happen elsewhere; when it did not,
/// the first rotation killed the VMM (found by a Debian boot whose two
/// boots' console passed 1 MiB).
#[tokio::test(flavor = "current_thread")]
async fn a_console_past_its_bound_rotates_and_the_guest_runs_on() {
    report_mode("console rotation under seccomp");
    let agent = TestAgent::with_config("console-rotate", "console_log_max_bytes = 2048\n");
    let c = agent.clients().await;
    // A tick every ~5 ms: about 3 KiB of console a second.
    let spec = probe_spec("chatty", 1, "probe.mode=tick probe.tick_cycles=13000000");
    create_and_start(&c, spec).await;
    let run = agent.vm_dir("chatty").join("run");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !run.join("console.log.1").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no rotation within 60 s; console:\n{}",
            console_text(&agent, "chatty")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Past the first rotation, the guest keeps printing: a later tick than
    // any the old log holds shows up in the new one.
    let old = std::fs::read_to_string(run.join("console.log.1")).unwrap_or_default();
    let last_old = old
        .lines()
        .filter_map(|l| l.trim().strip_prefix("PROBE tick "))
        .filter_map(|n| n.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    wait_console(
        &agent,
        "chatty",
        &format!("PROBE tick {}\r\n", last_old + 50),
        Duration::from_secs(60),
    );
    let vm = get(&c, "chatty").await;
    assert_eq!(
        state_of(&vm),
        berth_tests::contract::vm::VmState::RUNNING,
        "{:?}",
        vm.status
    );
    for file in ["console.log", "console.log.1"] {
        let len = std::fs::metadata(run.join(file)).unwrap().len();
        assert!(len <= 2048 + 64, "{file} holds {len} bytes, over the bound");
    }
}
