//! Failures the agent must come out of in a state the next command can act
//! on: a state root that fills up under it.

use std::io::Write;
use std::time::Duration;

use berth_tests::agent::*;
use berth_tests::contract::vm as pb;
use berth_tests::{report_mode, Lcg};
use ttrpc::Code;

const BOOT: Duration = Duration::from_secs(30);

/// Writes `path` until the filesystem it is on has no room left.
fn fill(path: &std::path::Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 64 << 10];
    loop {
        match file.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = file.sync_all();
}

#[tokio::test(flavor = "current_thread")]
async fn a_stop_that_cannot_be_recorded_leaves_the_vm_running_and_retryable() {
    report_mode("stop on a full state root");
    let agent = TestAgent::with_small_state_root("full-stop", 16 << 10);
    let c = agent.clients().await;
    let vm = create_and_start(&c, probe_spec("full", 1, "probe.mode=tick")).await;
    wait_console(&agent, "full", "PROBE tick 1", BOOT);
    let pid = vm.status.pid as i32;

    let filler = agent.dir.join("state/filler");
    fill(&filler);
    let force = pb::StopVmRequest {
        id: "full".into(),
        force: true,
        ..Default::default()
    };
    let (code, msg) = code_of(c.vms.stop(ctx(), &force).await);
    assert_eq!(code, Code::INTERNAL, "{msg}");
    assert!(msg.contains("it is Running"), "{msg}");
    // The stop never began: the VM is what its VMM is, Running.
    let now = get(&c, "full").await;
    assert_eq!(state_of(&now), pb::VmState::RUNNING);
    assert_eq!(now.status.pid, vm.status.pid);
    assert_eq!(vmm_pids(&agent.dir), vec![pid]);

    // A snapshot or a Create that hits the full disk fails with its code
    // and a one-line message, and leaves nothing behind.
    let snap = agent
        .nodectl()
        .args(["snapshot", "create", "full", "s1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&snap.stderr);
    assert_ne!(snap.status.code(), Some(0), "{err}");
    assert_ne!(
        snap.status.code(),
        Some(7),
        "the agent is reachable: {err}\nvmm.log: {}",
        std::fs::read_to_string(agent.vm_dir("full").join("vmm.log")).unwrap_or_default()
    );
    assert!(!err.contains("special_fields"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let snapshots = agent.vm_dir("full").join("snapshots");
    let left: Vec<_> = std::fs::read_dir(&snapshots)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in {}: {left:?}", snapshots.display());
    assert_eq!(state_of(&get(&c, "full").await), pb::VmState::RUNNING);
    let (code, msg) = code_of(
        c.vms
            .create(ctx(), &create_req(probe_spec("more", 1, "probe.mode=tick")))
            .await,
    );
    assert_eq!(code, Code::INTERNAL, "{msg}");
    assert!(
        !agent.vm_dir("more").exists(),
        "a failed Create leaves no directory"
    );

    // Once there is room again, the same command works.
    std::fs::remove_file(&filler).unwrap();
    let stopped = c.vms.stop(ctx(), &force).await.unwrap();
    assert_eq!(state_of(&stopped), pb::VmState::STOPPED);
    assert!(vmm_pids(&agent.dir).is_empty(), "the VMM is gone");
    let record = std::fs::read_to_string(agent.vm_dir("full").join("state.json")).unwrap();
    assert!(record.contains("\"stopped\""), "{record}");
    // And the VM starts again.
    let vm = c.vms.start(ctx(), &vm_ref("full")).await.unwrap();
    assert_eq!(state_of(&vm), pb::VmState::RUNNING);
}

#[tokio::test(flavor = "current_thread")]
async fn start_pause_update_and_restore_on_a_full_state_root_fail_cleanly_and_work_after() {
    report_mode("every operation on a full state root");
    let agent = TestAgent::with_small_state_root("full-ops", 256 << 10);
    let c = agent.clients().await;
    create_and_start(&c, probe_spec("a", 1, "probe.mode=tick")).await;
    wait_console(&agent, "a", "PROBE tick 1", BOOT);
    let snap = pb::SnapshotVmRequest {
        id: "a".into(),
        name: "s1".into(),
        ..Default::default()
    };
    c.vms.snapshot(ctx(), &snap).await.unwrap();
    c.vms
        .create(ctx(), &create_req(probe_spec("b", 1, "probe.mode=tick")))
        .await
        .unwrap();
    let filler = agent.dir.join("state/filler");
    fill(&filler);

    // Start: its intent cannot be written, so it never began.
    let (code, msg) = code_of(c.vms.start(ctx(), &vm_ref("b")).await);
    assert_eq!(code, Code::INTERNAL, "{msg}");
    assert!(msg.contains("it is Defined"), "{msg}");
    assert_eq!(state_of(&get(&c, "b").await), pb::VmState::DEFINED);
    assert!(vmm_pids(&agent.vm_dir("b")).is_empty(), "b got a VMM");
    // Pause: the VMM did pause; the VM says so although it is not on disk.
    let (code, msg) = code_of(c.vms.pause(ctx(), &vm_ref("a")).await);
    assert_eq!(code, Code::INTERNAL, "{msg}");
    assert_eq!(state_of(&get(&c, "a").await), pb::VmState::PAUSED);
    // Update: refused whole, the document stays as it was.
    let mut spec = get(&c, "b").await.spec.unwrap();
    spec.vcpus = 2;
    let req = pb::UpdateVmRequest {
        spec: protobuf::MessageField::some(spec),
        ..Default::default()
    };
    let (code, msg) = code_of(c.vms.update(ctx(), &req).await);
    assert_eq!(code, Code::INTERNAL, "{msg}");
    assert_eq!(get(&c, "b").await.spec.vcpus, 1);
    // Restore into a new VM: no VM, directory or VMM is left of it.
    let restore = pb::RestoreVmRequest {
        id: "a".into(),
        snapshot: "s1".into(),
        new_id: "c".into(),
        ..Default::default()
    };
    let (code, msg) = code_of(c.vms.restore(ctx(), &restore).await);
    assert_eq!(code, Code::INTERNAL, "{msg}");
    let (code, _) = code_of(c.vms.get(ctx(), &vm_ref("c")).await);
    assert_eq!(code, Code::NOT_FOUND);
    assert!(
        !agent.vm_dir("c").exists(),
        "a failed restore left c's directory"
    );

    // With room again, every one of them works.
    std::fs::remove_file(&filler).unwrap();
    let b = c.vms.start(ctx(), &vm_ref("b")).await.unwrap();
    assert_eq!(state_of(&b), pb::VmState::RUNNING);
    let a = c.vms.resume(ctx(), &vm_ref("a")).await.unwrap();
    assert_eq!(state_of(&a), pb::VmState::RUNNING);
    let restored = c.vms.restore(ctx(), &restore).await.unwrap();
    assert_eq!(state_of(&restored), pb::VmState::RUNNING);
    for id in ["a", "b", "c"] {
        assert_eq!(vmm_pids(&agent.vm_dir(id).join("run")).len(), 1, "{id}");
    }
}

fn create_req(spec: pb::VmSpec) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        spec: protobuf::MessageField::some(spec),
        ..Default::default()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn oversized_labels_are_refused_and_a_listing_of_maximal_vms_works() {
    report_mode("label limits");
    let agent = TestAgent::new("label-limits");
    let c = agent.clients().await;
    let mut many = probe_spec("many", 1, "probe.mode=tick");
    for i in 0..65 {
        many.labels.insert(format!("k{i}"), "v".into());
    }
    let (code, msg) = code_of(c.vms.create(ctx(), &create_req(many)).await);
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(
        msg.starts_with("labels:") && msg.contains("limit of 64"),
        "{msg}"
    );
    let mut big = probe_spec("big", 1, "probe.mode=tick");
    big.labels.insert("note".into(), "x".repeat(1 << 20));
    let (code, msg) = code_of(c.vms.create(ctx(), &create_req(big)).await);
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("limit of 256"), "{msg}");
    assert!(
        msg.len() < 300,
        "the value is not echoed: {} bytes",
        msg.len()
    );
    assert!(
        !agent.vm_dir("many").exists() && !agent.vm_dir("big").exists(),
        "a refused Create leaves nothing"
    );

    // The largest labels allowed, on many VMs: every listing still works.
    for v in 0..20 {
        let mut spec = probe_spec(&format!("max{v}"), 1, "probe.mode=tick");
        for i in 0..64 {
            spec.labels.insert(format!("{i:0>63}"), "v".repeat(256));
        }
        c.vms.create(ctx(), &create_req(spec)).await.unwrap();
    }
    let list = c
        .vms
        .list(ctx(), &pb::ListVmsRequest::default())
        .await
        .unwrap();
    assert_eq!(list.vms.len(), 20);
    assert!(list.vms.iter().all(|v| v.spec.labels.len() == 64));
    let table = agent.nodectl().arg("list").output().unwrap();
    assert!(table.status.success(), "{table:?}");
    let text = String::from_utf8_lossy(&table.stdout);
    assert_eq!(
        text.lines().count(),
        21,
        "a header and a row per VM:\n{text}"
    );
    assert!(text.contains('…'), "long label cells are cut:\n{text}");
    let json = agent.nodectl().args(["list", "--json"]).output().unwrap();
    assert!(json.status.success(), "{json:?}");

    // A document larger than a request can carry: refused for its size
    // with the invalid-argument status, not taken for a lost agent.
    let huge = agent.dir.join("huge.toml");
    let text = format!(
        "id = \"huge\"\nvcpus = 1\nmemory_mib = 64\n[kernel]\npath = \"/k\"\ncmdline = \"{}\"\n",
        "x".repeat(5 << 20)
    );
    std::fs::write(&huge, text).unwrap();
    let out = agent
        .nodectl()
        .arg("create")
        .arg("-f")
        .arg(&huge)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("limit of 65536"), "{err}");
    assert!(
        err.len() < 500,
        "the document is not echoed: {} bytes",
        err.len()
    );
}

/// Collects every page of a listing; returns the VMs and the pages' sizes.
async fn all_pages(c: &Clients, page_size: u32) -> (Vec<String>, Vec<usize>) {
    let mut req = pb::ListVmsRequest {
        page_size,
        ..Default::default()
    };
    let (mut ids, mut pages) = (Vec::new(), Vec::new());
    loop {
        let page = c.vms.list(ctx(), &req).await.unwrap();
        assert!(
            protobuf::Message::compute_size(&page) < 4 << 20,
            "an answer over the transport's limit"
        );
        pages.push(page.vms.len());
        ids.extend(page.vms.iter().map(|v| v.spec.id.clone()));
        if page.next_page_token.is_empty() {
            return (ids, pages);
        }
        req.page_token = page.next_page_token;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_listing_larger_than_one_answer_comes_in_pages() {
    report_mode("ListVms paging");
    let agent = TestAgent::new("list-pages");
    let c = agent.clients().await;
    // 150 VMs with the largest labels: about 3.5 MiB of listing, which
    // one answer used to carry whole, near ttrpc's 4 MiB limit.
    for v in 0..150 {
        let mut spec = probe_spec(&format!("max{v:03}"), 1, "probe.mode=tick");
        for i in 0..64 {
            spec.labels.insert(format!("{i:0>63}"), "v".repeat(256));
        }
        c.vms.create(ctx(), &create_req(spec)).await.unwrap();
    }
    let wanted: Vec<String> = (0..150).map(|v| format!("max{v:03}")).collect();
    let (ids, pages) = all_pages(&c, 0).await;
    assert_eq!(ids, wanted, "every VM once, in id order");
    assert!(pages.len() >= 2, "one answer held it all: {pages:?}");
    let (ids, pages) = all_pages(&c, 40).await;
    assert_eq!(ids, wanted);
    assert_eq!(pages, [40, 40, 40, 30]);
    let json = agent.nodectl().args(["list", "--json"]).output().unwrap();
    assert!(json.status.success(), "{json:?}");
    let listed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(150));
}

#[tokio::test(flavor = "current_thread")]
async fn an_agent_killed_during_starts_never_leaves_a_vm_with_two_vmms_or_none_recorded() {
    report_mode("agent kill -9 during Start");
    let mut rng = Lcg::from_clock();
    let mut agent = TestAgent::new("kill-during-start");
    let mut ids: Vec<String> = Vec::new();
    for round in 0..6 {
        let c = agent.clients().await;
        let fresh: Vec<String> = (0..4).map(|i| format!("r{round}v{i}")).collect();
        for id in &fresh {
            c.vms
                .create(ctx(), &create_req(probe_spec(id, 1, "probe.mode=tick")))
                .await
                .unwrap();
        }
        ids.extend(fresh.iter().cloned());
        let starts: Vec<_> = fresh
            .iter()
            .map(|id| {
                let vms = c.vms.clone();
                let r = vm_ref(id);
                tokio::spawn(async move { vms.start(ctx(), &r).await })
            })
            .collect();
        let delay = 20 + rng.below(300);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        agent.kill9();
        for s in starts {
            let _ = s.await;
        }
        drop(c);
        agent.start();
        let c = agent.clients().await;
        for id in &ids {
            let vm = get(&c, id).await;
            let pids = vmm_pids(&agent.vm_dir(id));
            let state = state_of(&vm);
            assert!(
                pids.len() <= 1,
                "round {round} (killed after {delay} ms): {id} has VMMs {pids:?}"
            );
            match pids.first() {
                Some(&pid) => {
                    assert!(
                        matches!(state, pb::VmState::RUNNING),
                        "round {round} (killed after {delay} ms): {id} has VMM {pid} but is {state:?} ({})",
                        vm.status.last_exit
                    );
                    assert_eq!(
                        vm.status.pid as i32, pid,
                        "{id}: the VMM recorded is the one running"
                    );
                }
                None => assert!(
                    !matches!(
                        state,
                        pb::VmState::RUNNING | pb::VmState::PAUSED | pb::VmState::STARTING
                    ),
                    "round {round}: {id} is {state:?} with no VMM"
                ),
            }
        }
        // Whatever a VM ended as, Start gives it exactly one VMM and its
        // guest runs; then the round's VMs stop, to leave room for the next.
        for id in &fresh {
            let vm = get(&c, id).await;
            if state_of(&vm) != pb::VmState::RUNNING {
                let started = c.vms.start(ctx(), &vm_ref(id)).await.unwrap();
                assert_eq!(state_of(&started), pb::VmState::RUNNING);
            }
            assert_eq!(vmm_pids(&agent.vm_dir(id)).len(), 1, "{id}");
            wait_console(&agent, id, "PROBE tick 1", BOOT);
        }
        for id in &fresh {
            let force = pb::StopVmRequest {
                id: id.clone(),
                force: true,
                ..Default::default()
            };
            c.vms.stop(ctx(), &force).await.unwrap();
            assert!(vmm_pids(&agent.vm_dir(id)).is_empty(), "{id}");
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_second_vmm_for_a_running_vm_refuses_to_start() {
    report_mode("VMM run lock");
    let agent = TestAgent::new("run-lock");
    let c = agent.clients().await;
    let vm = create_and_start(&c, probe_spec("one", 1, "probe.mode=tick")).await;
    wait_console(&agent, "one", "PROBE tick 1", BOOT);
    let lock = agent.vm_dir("one").join("run/vmm.lock");
    // Whatever the agent's records say, a VMM started for the same VM by
    // hand (or by a second agent) stops before it touches a guest.
    let second = std::process::Command::new(berth_tests::binary("berth-vmm"))
        .arg("--run-lock")
        .arg(&lock)
        .arg("--kernel")
        .arg(berth_tests::probe_elf())
        .args(["--memory-mib", "64", "--cmdline", "probe.mode=tick"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "another berth-vmm (pid {}) runs this VM",
            vm.status.pid
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("KVM"), "it went on to KVM: {stderr}");
    assert_eq!(vmm_pids(&agent.vm_dir("one")), vec![vm.status.pid]);
    let before = last_tick(&agent, "one").unwrap_or(0);
    wait_console(&agent, "one", &format!("PROBE tick {}", before + 2), BOOT);
}
