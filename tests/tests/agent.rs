//! berth-agent end to end: real agent processes, real berth-vmm, the probe
//! guest, driven by a ttrpc client generated from the .proto files alone.

use std::time::{Duration, Instant};

use berth_tests::agent::*;
use berth_tests::contract::node::WatchRequest;
use berth_tests::contract::vm as pb;
use berth_tests::report_mode;
use protobuf::Message;
use ttrpc::Code;

const BOOT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "current_thread")]
async fn lifecycle_create_start_pause_resume_stop_start_delete() {
    report_mode("agent lifecycle");
    let agent = TestAgent::new("agent-lifecycle");
    let c = agent.clients().await;
    let vm = create_and_start(&c, probe_spec("life", 2, "probe.mode=tick")).await;
    assert_eq!(state_of(&vm), pb::VmState::RUNNING);
    assert!(vm.status.pid > 0);
    wait_console(&agent, "life", "PROBE cpus_up 2", BOOT);
    wait_console(&agent, "life", "PROBE tick 3", BOOT);

    let vm = c.vms.pause(ctx(), &vm_ref("life")).await.unwrap();
    assert_eq!(state_of(&vm), pb::VmState::PAUSED);
    let paused_at = last_tick(&agent, "life").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        last_tick(&agent, "life"),
        Some(paused_at),
        "a paused guest does not advance"
    );

    let vm = c.vms.resume(ctx(), &vm_ref("life")).await.unwrap();
    assert_eq!(state_of(&vm), pb::VmState::RUNNING);
    wait_console(
        &agent,
        "life",
        &format!("PROBE tick {}", paused_at + 3),
        BOOT,
    );

    // The probe ignores Ctrl-Alt-Del, so a graceful stop ends in the kill path.
    let stop = pb::StopVmRequest {
        id: "life".into(),
        timeout_ms: 500,
        ..Default::default()
    };
    let vm = c.vms.stop(ctx(), &stop).await.unwrap();
    assert_eq!(state_of(&vm), pb::VmState::STOPPED);
    assert_eq!(vm.status.pid, 0);
    assert!(agent.vm_dir("life").join("spec.json").exists());

    let vm = c.vms.start(ctx(), &vm_ref("life")).await.unwrap();
    assert_eq!(state_of(&vm), pb::VmState::RUNNING);
    let (code, msg) = code_of(c.vms.delete(ctx(), &vm_ref("life")).await);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("Running"), "{msg}");
    let force = pb::StopVmRequest {
        id: "life".into(),
        force: true,
        ..Default::default()
    };
    c.vms.stop(ctx(), &force).await.unwrap();
    assert!(
        agent.vm_dir("life").exists(),
        "the state stays until Delete"
    );
    c.vms.delete(ctx(), &vm_ref("life")).await.unwrap();
    assert!(
        !agent.vm_dir("life").exists(),
        "Delete removes the state dir"
    );
    let (code, _) = code_of(c.vms.get(ctx(), &vm_ref("life")).await);
    assert_eq!(code, Code::NOT_FOUND);
}

#[tokio::test(flavor = "current_thread")]
async fn agent_kill9_leaves_vms_running_and_the_next_agent_adopts_them() {
    report_mode("agent kill -9");
    let mut agent = TestAgent::new("agent-kill9");
    let c = agent.clients().await;
    let mut pids = Vec::new();
    for i in 0..3 {
        let vm = create_and_start(&c, probe_spec(&format!("vm{i}"), 1, "probe.mode=tick")).await;
        pids.push(vm.status.pid);
        wait_console(&agent, &format!("vm{i}"), "PROBE tick 1", BOOT);
    }
    drop(c);
    agent.kill9();
    let before: Vec<u64> = (0..3)
        .map(|i| last_tick(&agent, &format!("vm{i}")).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    agent.start();
    let c = agent.clients().await;
    for i in 0..3 {
        let id = format!("vm{i}");
        let vm = get(&c, &id).await;
        assert_eq!(state_of(&vm), pb::VmState::RUNNING, "{id}");
        assert_eq!(vm.status.pid, pids[i], "{id} was adopted, not restarted");
        assert_eq!(vm.status.restarts, 0);
        // Its console kept going while no agent ran, and still does.
        wait_console(&agent, &id, &format!("PROBE tick {}", before[i] + 5), BOOT);
        assert!(
            console_text(&agent, &id).contains("PROBE hello"),
            "console intact from boot"
        );
        // Still controllable.
        let vm = c.vms.pause(ctx(), &vm_ref(&id)).await.unwrap();
        assert_eq!(state_of(&vm), pb::VmState::PAUSED);
        c.vms.resume(ctx(), &vm_ref(&id)).await.unwrap();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_second_agent_on_the_same_state_root_exits_and_the_first_goes_on() {
    report_mode("second agent on one state root");
    let agent = TestAgent::new("agent-second");
    let c = agent.clients().await;
    let vm = create_and_start(&c, probe_spec("held", 1, "probe.mode=tick")).await;
    wait_console(&agent, "held", "PROBE tick 1", BOOT);

    // Same config (so the same state root), its own socket.
    let other = agent.dir.join("other.sock");
    let mut cmd = std::process::Command::new(berth_tests::binary("berth-agent"));
    cmd.arg("--config")
        .arg(&agent.config)
        .arg("--socket")
        .arg(&other);
    let second = berth_tests::Running::spawn(cmd).wait(Duration::from_secs(20));
    assert_eq!(second.status.code(), Some(1), "{}", second.describe());
    let holder = format!("in use by another berth-agent (pid {})", agent_pid(&agent));
    assert!(second.stderr.contains(&holder), "{}", second.describe());
    assert!(!other.exists(), "the second agent never served");

    // The first agent still owns its VM, which was neither adopted twice
    // nor restarted.
    let now = get(&c, "held").await;
    assert_eq!(state_of(&now), pb::VmState::RUNNING);
    assert_eq!(now.status.pid, vm.status.pid);
    assert_eq!(vmm_pids(&agent.dir).len(), 1);
    let tick = last_tick(&agent, "held").unwrap();
    wait_console(&agent, "held", &format!("PROBE tick {}", tick + 2), BOOT);
}

#[tokio::test(flavor = "current_thread")]
async fn vmm_kill9_is_a_crash_seen_within_a_second_and_the_restart_policy_applies() {
    report_mode("vmm kill -9");
    let agent = TestAgent::new("agent-crash");
    let c = agent.clients().await;
    let mut spec = probe_spec("crashy", 1, "probe.mode=tick");
    spec.restart = protobuf::MessageField::some(pb::RestartPolicy {
        kind: pb::restart_policy::Kind::ON_FAILURE.into(),
        max_retries: 1,
        ..Default::default()
    });
    let vm = create_and_start(&c, spec).await;
    let mut events = c
        .node
        .watch(
            ttrpc::context::with_timeout(0),
            &WatchRequest {
                id: "crashy".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let first_pid = vm.status.pid;
    let killed_at = Instant::now();
    std::process::Command::new("kill")
        .args(["-9", &first_pid.to_string()])
        .status()
        .unwrap();

    let mut seen = Vec::new();
    while !seen.iter().any(|(s, _)| *s == pb::VmState::RUNNING) {
        let e = tokio::time::timeout(BOOT, events.recv())
            .await
            .expect("events")
            .unwrap()
            .unwrap();
        let state = e.state.enum_value_or_default();
        if state == pb::VmState::CRASHED {
            assert!(
                killed_at.elapsed() < Duration::from_secs(1),
                "crash noticed after {:?}",
                killed_at.elapsed()
            );
            assert!(e.message.contains("signal 9"), "{}", e.message);
        }
        seen.push((state, e.message.clone()));
    }
    let states: Vec<pb::VmState> = seen.iter().map(|s| s.0).collect();
    assert_eq!(
        states,
        [
            pb::VmState::CRASHED,
            pb::VmState::STARTING,
            pb::VmState::RUNNING
        ],
        "{seen:?}"
    );
    assert!(seen[1].1.contains("restart 1 of 1"), "{seen:?}");
    let vm = get(&c, "crashy").await;
    assert_eq!(vm.status.restarts, 1);
    assert_ne!(vm.status.pid, first_pid);

    // The one retry is used up: the next crash stays a crash.
    std::process::Command::new("kill")
        .args(["-9", &vm.status.pid.to_string()])
        .status()
        .unwrap();
    let e = tokio::time::timeout(BOOT, events.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(e.state.enum_value_or_default(), pb::VmState::CRASHED);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(state_of(&get(&c, "crashy").await), pb::VmState::CRASHED);
}

#[tokio::test(flavor = "current_thread")]
async fn a_guest_that_ends_itself_is_stopped_not_crashed() {
    report_mode("clean guest exit");
    let agent = TestAgent::new("agent-clean-exit");
    let c = agent.clients().await;
    create_and_start(&c, probe_spec("once", 1, "probe.mode=boot")).await;
    let deadline = Instant::now() + BOOT;
    loop {
        let vm = get(&c, "once").await;
        if state_of(&vm) == pb::VmState::STOPPED {
            assert_eq!(vm.status.last_exit, "guest requested reset");
            break;
        }
        assert!(Instant::now() < deadline, "still {:?}", state_of(&vm));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn every_bad_request_gets_its_code() {
    report_mode("agent errors");
    let agent = TestAgent::new("agent-errors");
    let c = agent.clients().await;
    let create = |spec: pb::VmSpec| pb::CreateVmRequest {
        spec: protobuf::MessageField::some(spec),
        ..Default::default()
    };
    let outside = agent.dir.join("outside.img");
    std::fs::write(&outside, b"x").unwrap();
    std::os::unix::fs::symlink(&outside, agent.dir.join("disks/escape.img")).unwrap();
    let cases: Vec<(&str, pb::VmSpec)> = vec![
        ("vcpus", {
            let mut s = probe_spec("e1", 0, "");
            s.vcpus = 0;
            s
        }),
        ("memory_mib", {
            let mut s = probe_spec("e2", 1, "");
            s.memory_mib = 1 << 40;
            s
        }),
        ("kernel.path", {
            let mut s = probe_spec("e3", 1, "");
            s.kernel.as_mut().unwrap().path = "/nonexistent/vmlinux".into();
            s
        }),
        ("kernel.path", {
            let mut s = probe_spec("e4", 1, "");
            s.kernel.as_mut().unwrap().path = "/etc/shadow".into();
            s
        }),
        ("disks[0].path", {
            let mut s = probe_spec("e5", 1, "");
            s.disks.push(pb::Disk {
                path: agent.dir.join("disks/escape.img").display().to_string(),
                ..Default::default()
            });
            s
        }),
        ("disks[0].path", {
            let mut s = probe_spec("e6", 1, "");
            s.disks.push(pb::Disk {
                path: agent.dir.join("disks/../outside.img").display().to_string(),
                ..Default::default()
            });
            s
        }),
        ("disks[0].path", {
            let mut s = probe_spec("e8", 1, "");
            s.disks.push(pb::Disk {
                path: "/etc/shadow".into(),
                ..Default::default()
            });
            s
        }),
        ("id", probe_spec("Bad_Id", 1, "")),
    ];
    for (field, spec) in cases {
        let (code, msg) = code_of(c.vms.create(ctx(), &create(spec)).await);
        assert_eq!(code, Code::INVALID_ARGUMENT, "{field}: {msg}");
        assert!(
            msg.starts_with(&format!("{field}:")),
            "names the field {field}: {msg}"
        );
    }

    // Unknown fields: a spec carrying field number 99.
    let mut spec = probe_spec("e7", 1, "");
    spec.mut_special_fields()
        .mut_unknown_fields()
        .add_varint(99, 1);
    let (code, msg) = code_of(c.vms.create(ctx(), &create(spec)).await);
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("unknown field") && msg.contains("99"), "{msg}");

    c.vms
        .create(ctx(), &create(probe_spec("dup", 1, "probe.mode=tick")))
        .await
        .unwrap();
    let (code, _) = code_of(c.vms.create(ctx(), &create(probe_spec("dup", 1, ""))).await);
    assert_eq!(code, Code::ALREADY_EXISTS);
    let mut same_name = probe_spec("other", 1, "");
    same_name.name = "dup-name".into();
    let (code, msg) = code_of(c.vms.create(ctx(), &create(same_name)).await);
    assert_eq!(code, Code::ALREADY_EXISTS, "{msg}");

    let (code, _) = code_of(c.vms.start(ctx(), &vm_ref("ghost")).await);
    assert_eq!(code, Code::NOT_FOUND);
    let (code, msg) = code_of(c.vms.pause(ctx(), &vm_ref("dup")).await);
    assert_eq!(code, Code::FAILED_PRECONDITION);
    assert!(msg.contains("Defined"), "names the current state: {msg}");

    // Two clients race Start: one wins, the other is told it is running.
    let c2 = agent.clients().await;
    let dup = vm_ref("dup");
    let (a, b) = tokio::join!(c.vms.start(ctx(), &dup), c2.vms.start(ctx(), &dup));
    let ok = [a.is_ok(), b.is_ok()];
    assert_eq!(
        ok.iter().filter(|x| **x).count(),
        1,
        "exactly one Start wins: {a:?} {b:?}"
    );
    let loser = if a.is_ok() { b } else { a };
    let (code, msg) = code_of(loser);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("Running") || msg.contains("Starting"), "{msg}");
}

#[tokio::test(flavor = "current_thread")]
async fn garbage_state_is_quarantined_and_reported_and_the_rest_load() {
    report_mode("quarantine");
    let mut agent = TestAgent::new("agent-quarantine");
    {
        let c = agent.clients().await;
        for id in ["good", "bad"] {
            let req = pb::CreateVmRequest {
                spec: protobuf::MessageField::some(probe_spec(id, 1, "")),
                ..Default::default()
            };
            c.vms.create(ctx(), &req).await.unwrap();
        }
    }
    agent.kill9();
    std::fs::write(
        agent.vm_dir("bad").join("state.json"),
        b"{\"state\": \"runn",
    )
    .unwrap();
    agent.start();
    let c = agent.clients().await;
    let list = c
        .vms
        .list(ctx(), &pb::ListVmsRequest::default())
        .await
        .unwrap();
    let ids: Vec<&str> = list.vms.iter().map(|v| v.spec.id.as_str()).collect();
    assert_eq!(ids, ["good"]);
    let node = node_info(&c).await;
    assert_eq!(node.quarantined.len(), 1, "{:?}", node.quarantined);
    assert!(
        node.quarantined[0].starts_with("bad: "),
        "{:?}",
        node.quarantined
    );
    let kept = std::fs::read_dir(agent.dir.join("state/quarantine"))
        .unwrap()
        .count();
    assert_eq!(
        kept, 1,
        "the broken VM is kept for an operator, not deleted"
    );
}

/// The agent learns KVM facts from `berth-vmm --host-info` (it opens no
/// /dev/kvm itself) and reports them.
#[tokio::test(flavor = "current_thread")]
async fn the_node_reports_the_kvm_its_vmm_binary_found() {
    report_mode("agent host info");
    let agent = TestAgent::new("agent-host-info");
    let c = agent.clients().await;
    let node = node_info(&c).await;
    let loaded = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
    let (hypervisor, module) = if loaded("kvm_pvm") {
        ("pvm", "kvm_pvm")
    } else if loaded("kvm_intel") {
        ("hardware", "kvm_intel")
    } else {
        ("hardware", "kvm_amd")
    };
    assert_eq!(
        (node.hypervisor.as_str(), node.kvm_module.as_str()),
        (hypervisor, module)
    );
    assert!((1..=254).contains(&node.max_vcpus), "{}", node.max_vcpus);
}

#[test]
fn nodectl_json_parses_and_tables_show_the_vm() {
    report_mode("nodectl");
    let agent = TestAgent::new("agent-nodectl");
    let spec_file = agent.dir.join("vm.toml");
    std::fs::write(
        &spec_file,
        format!(
            "id = \"cli\"\nvcpus = 1\nmemory_mib = 64\nlabels = {{ tier = \"web\" }}\n[kernel]\npath = {:?}\ncmdline = \"probe.mode=tick\"\n",
            berth_tests::probe_elf()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = agent.nodectl().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "nodectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let created: serde_json::Value = serde_json::from_str(&run(&[
        "--json",
        "create",
        "-f",
        spec_file.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(created["state"], "Defined");
    let started: serde_json::Value =
        serde_json::from_str(&run(&["--json", "start", "cli"])).unwrap();
    assert_eq!(started["state"], "Running");
    let list: serde_json::Value =
        serde_json::from_str(&run(&["--json", "list", "-l", "tier=web"])).unwrap();
    assert_eq!(list[0]["id"], "cli");
    let none: serde_json::Value =
        serde_json::from_str(&run(&["--json", "list", "-l", "tier=db"])).unwrap();
    assert_eq!(none, serde_json::json!([]));
    let node: serde_json::Value = serde_json::from_str(&run(&["--json", "node"])).unwrap();
    assert_eq!(node["api_version"], "v1");
    let cap: serde_json::Value = serde_json::from_str(&run(&["--json", "capacity"])).unwrap();
    assert_eq!(cap["running_vcpus"], 1);
    assert!(run(&["list"])
        .lines()
        .any(|l| l.starts_with("cli ") && l.contains("Running")));
    wait_console(&agent, "cli", "PROBE tick 2", BOOT);
    assert!(run(&["console", "cli", "--tail", "2"]).contains("PROBE tick"));

    let missing = agent.nodectl().args(["show", "nope"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(3), "NOT_FOUND is exit 3");
    let gone = std::process::Command::new(berth_tests::binary("nodectl"))
        .args(["--socket", "/nonexistent/agent.sock", "list"])
        .output()
        .unwrap();
    assert_eq!(gone.status.code(), Some(7));
    let msg = String::from_utf8_lossy(&gone.stderr);
    assert!(
        msg.contains("agent not running at /nonexistent/agent.sock: start berth-agent.service"),
        "{msg}"
    );
}

#[test]
fn the_api_socket_is_0660() {
    use std::os::unix::fs::PermissionsExt;
    let agent = TestAgent::new("agent-socket-mode");
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
}

#[tokio::test(flavor = "current_thread")]
async fn console_stream_replays_output_and_carries_input() {
    report_mode("console stream");
    let agent = TestAgent::new("agent-console");
    let c = agent.clients().await;
    create_and_start(&c, probe_spec("echo", 1, "probe.mode=echo")).await;
    wait_console(&agent, "echo", "PROBE echo ready", BOOT);
    let stream = c.vms.console(ctx()).await.unwrap();
    stream
        .send(&pb::ConsoleChunk {
            id: "echo".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seen = String::new();
    let mut sent = false;
    let deadline = Instant::now() + BOOT;
    let mut stream = stream;
    while !seen.contains("PROBE echo done bytes=14") {
        assert!(Instant::now() < deadline, "console so far:\n{seen}");
        let chunk = tokio::time::timeout(BOOT, stream.recv())
            .await
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk.data));
        if !sent && seen.contains("PROBE echo ready") {
            // The replay brought the boot output; now type into the guest.
            assert!(seen.contains("PROBE hello"), "{seen}");
            stream
                .send(&pb::ConsoleChunk {
                    id: "echo".into(),
                    data: b"hi there\nquit\n".to_vec(),
                    ..Default::default()
                })
                .await
                .unwrap();
            sent = true;
        }
    }
    assert!(
        seen.replace("\r\n", "\n").contains("hi there\nquit\n"),
        "echoed back:\n{seen}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn nics_are_attached_to_their_bridge_and_a_missing_bridge_is_an_error() {
    report_mode("bridge");
    let agent = TestAgent::new("agent-bridge");
    let c = agent.clients().await;
    let bridge = format!("bb{}", std::process::id());
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .status()
            .unwrap()
            .success()
    };
    assert!(ip(&["link", "add", &bridge, "type", "bridge"]));
    let tap = format!("bt{}br", std::process::id());
    let mut spec = probe_spec("bridged", 1, "probe.mode=tick");
    spec.nics.push(pb::Nic {
        tap: tap.clone(),
        bridge: bridge.clone(),
        ..Default::default()
    });
    create_and_start(&c, spec).await;
    let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).unwrap();
    assert_eq!(master.file_name().unwrap().to_string_lossy(), bridge);

    let mut spec = probe_spec("orphan", 1, "probe.mode=tick");
    spec.nics.push(pb::Nic {
        tap: format!("bt{}or", std::process::id()),
        bridge: "no-such-br0".into(),
        ..Default::default()
    });
    let req = pb::CreateVmRequest {
        spec: protobuf::MessageField::some(spec),
        ..Default::default()
    };
    c.vms.create(ctx(), &req).await.unwrap();
    let (code, msg) = code_of(c.vms.start(ctx(), &vm_ref("orphan")).await);
    assert_eq!(code, Code::UNAVAILABLE, "{msg}");
    assert!(msg.contains("no-such-br0"), "{msg}");
    assert_eq!(state_of(&get(&c, "orphan").await), pb::VmState::CRASHED);
    // The failed start left nothing behind: no VMM, no tap, no cgroup
    // (where the running VM has its), and a record that says Crashed with
    // no pid.
    assert!(
        cgroup_dirs_of("agent-bridge")
            .iter()
            .any(|d| d.join("bridged").is_dir()),
        "the running VM's cgroup is not where the test looks"
    );
    assert!(vmm_pids(&agent.vm_dir("orphan")).is_empty());
    let orphan_tap = format!("/sys/class/net/bt{}or", std::process::id());
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let leftovers = || {
        let mut left: Vec<String> = cgroup_dirs_of("agent-bridge")
            .into_iter()
            .map(|d| d.join("orphan"))
            .filter(|d| d.exists())
            .map(|d| d.display().to_string())
            .collect();
        if std::path::Path::new(&orphan_tap).exists() {
            left.push(orphan_tap.clone());
        }
        left
    };
    while !leftovers().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "a failed start left {:?}",
            leftovers()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent.vm_dir("orphan").join("state.json")).unwrap())
            .unwrap();
    assert_eq!(record["state"], "crashed", "{record}");
    assert_eq!(record["pid"], 0, "{record}");
    let stop = pb::StopVmRequest {
        id: "bridged".into(),
        force: true,
        ..Default::default()
    };
    c.vms.stop(ctx(), &stop).await.unwrap();
    ip(&["link", "del", &bridge]);
}

#[tokio::test(flavor = "current_thread")]
async fn snapshot_restore_into_a_new_vm_and_hibernate() {
    report_mode("agent snapshots");
    let agent = TestAgent::new("agent-snapshot");
    let c = agent.clients().await;
    create_and_start(&c, probe_spec("orig", 2, "probe.mode=tick")).await;
    wait_console(&agent, "orig", "PROBE tick 4", BOOT);
    let req = pb::SnapshotVmRequest {
        id: "orig".into(),
        name: "s1".into(),
        ..Default::default()
    };
    let info = c.vms.snapshot(ctx(), &req).await.unwrap();
    assert_eq!(info.memory_bytes, 64 << 20);
    assert!(
        info.disk_bytes > 0 && info.disk_bytes < 16 << 20,
        "{info:?}"
    );
    // The source resumes after the snapshot; its count goes on.
    let at_snapshot = last_tick(&agent, "orig").unwrap();
    wait_console(
        &agent,
        "orig",
        &format!("PROBE tick {}", at_snapshot + 3),
        BOOT,
    );

    // A clone from the snapshot: a normal VM, continuing the count.
    let req = pb::RestoreVmRequest {
        id: "orig".into(),
        snapshot: "s1".into(),
        new_id: "clone".into(),
        ..Default::default()
    };
    let vm = c.vms.restore(ctx(), &req).await.unwrap();
    assert_eq!(state_of(&vm), pb::VmState::RUNNING);
    assert_ne!(vm.status.pid, get(&c, "orig").await.status.pid);
    wait_console(&agent, "clone", "PROBE tick", BOOT);
    let first = first_tick(&agent, "clone").unwrap();
    assert!(
        (at_snapshot.saturating_sub(1)..=at_snapshot + 1).contains(&first),
        "the clone continues from the snapshot ({first} vs {at_snapshot})"
    );
    assert!(
        !console_text(&agent, "clone").contains("PROBE hello"),
        "it did not boot"
    );
    let paused = c.vms.pause(ctx(), &vm_ref("clone")).await.unwrap();
    assert_eq!(
        state_of(&paused),
        pb::VmState::PAUSED,
        "the clone is controllable"
    );

    // Hibernate: snapshot + stop; Start wakes it where it was.
    let req = pb::SnapshotVmRequest {
        id: "orig".into(),
        name: "sleep".into(),
        hibernate: true,
        ..Default::default()
    };
    c.vms.snapshot(ctx(), &req).await.unwrap();
    let vm = get(&c, "orig").await;
    assert_eq!(state_of(&vm), pb::VmState::STOPPED);
    assert!(
        vm.status.last_exit.contains("hibernated"),
        "{}",
        vm.status.last_exit
    );
    let slept_at = last_tick(&agent, "orig").unwrap();
    let (code, _) = code_of(
        c.vms
            .delete_snapshot(ctx(), &snap_ref("orig", "sleep"))
            .await,
    );
    assert_eq!(
        code,
        Code::FAILED_PRECONDITION,
        "a hibernated VM's snapshot is kept"
    );
    c.vms.start(ctx(), &vm_ref("orig")).await.unwrap();
    wait_console(
        &agent,
        "orig",
        &format!("PROBE tick {}", slept_at + 2),
        BOOT,
    );
    let text = console_text(&agent, "orig");
    assert_eq!(text.matches("PROBE hello").count(), 1, "woke, not rebooted");

    let list = c.vms.list_snapshots(ctx(), &vm_ref("orig")).await.unwrap();
    let names: Vec<&str> = list.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["s1", "sleep"]);
    c.vms
        .delete_snapshot(ctx(), &snap_ref("orig", "s1"))
        .await
        .unwrap();
    let (code, _) = code_of(c.vms.delete_snapshot(ctx(), &snap_ref("orig", "s1")).await);
    assert_eq!(code, Code::NOT_FOUND);
}

fn snap_ref(id: &str, name: &str) -> pb::SnapshotRef {
    pb::SnapshotRef {
        id: id.into(),
        name: name.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_restored_clone_can_move_to_another_tap() {
    report_mode("restore with a tap override");
    let agent = TestAgent::new("agent-snapshot-tap");
    let c = agent.clients().await;
    let (old, new) = (
        format!("bt{}so", std::process::id()),
        format!("bt{}sn", std::process::id()),
    );
    let mut spec = probe_spec("withnic", 1, "probe.mode=tick");
    spec.nics.push(pb::Nic {
        tap: old.clone(),
        ..Default::default()
    });
    create_and_start(&c, spec).await;
    wait_console(&agent, "withnic", "PROBE tick 2", BOOT);
    let req = pb::SnapshotVmRequest {
        id: "withnic".into(),
        name: "n1".into(),
        ..Default::default()
    };
    c.vms.snapshot(ctx(), &req).await.unwrap();
    let mut req = pb::RestoreVmRequest {
        id: "withnic".into(),
        snapshot: "n1".into(),
        new_id: "twin".into(),
        ..Default::default()
    };
    req.tap_overrides.insert(old.clone(), new.clone());
    let vm = c.vms.restore(ctx(), &req).await.unwrap();
    assert_eq!(state_of(&vm), pb::VmState::RUNNING);
    assert_eq!(vm.spec.nics[0].tap, new, "the clone's spec records its tap");
    assert!(
        std::path::Path::new("/sys/class/net").join(&new).exists(),
        "the clone is on {new}"
    );
    assert!(
        std::path::Path::new("/sys/class/net").join(&old).exists(),
        "the original keeps {old}"
    );
    wait_console(&agent, "twin", "PROBE tick", BOOT);
    let mut bad = pb::RestoreVmRequest {
        id: "withnic".into(),
        snapshot: "n1".into(),
        new_id: "twin2".into(),
        ..Default::default()
    };
    bad.tap_overrides.insert("nosuchtap".into(), "x".into());
    let (code, msg) = code_of(c.vms.restore(ctx(), &bad).await);
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
}

/// A snapshot of a large guest reports its progress while it is written,
/// and nodectl draws it.
#[tokio::test(flavor = "current_thread")]
async fn snapshot_progress_is_reported_while_it_is_written() {
    report_mode("snapshot progress");
    let agent = TestAgent::new("agent-snap-progress");
    let c = agent.clients().await;
    let mut spec = probe_spec(
        "big",
        1,
        "probe.mode=dirty probe.dirty_mib=512 probe.dirty_rate=0",
    );
    spec.memory_mib = 1024;
    create_and_start(&c, spec).await;
    wait_console(&agent, "big", "PROBE dirty ready", BOOT);
    let out = agent
        .nodectl()
        .args(["snapshot", "create", "big", "s1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let bars: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("snapshot s1 of big (pass 1)"))
        .collect();
    assert!(bars.last().is_some_and(|l| l.contains("100%")), "{stderr}");
    assert!(
        bars.iter().any(|l| !l.contains("100%")),
        "a bar before the end:\n{stderr}"
    );
    let req = pb::SnapshotRef {
        id: "big".into(),
        name: "s1".into(),
        ..Default::default()
    };
    let done = c.vms.get_snapshot_progress(ctx(), &req).await.unwrap();
    assert!(!done.active && done.exists, "{done:?}");
}
