//! Failures the agent must come out of in a state the next command can act
//! on: a state root that fills up under it.

use std::io::Write;
use std::time::Duration;

use berth_tests::agent::*;
use berth_tests::contract::vm as pb;
use berth_tests::report_mode;
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
}
