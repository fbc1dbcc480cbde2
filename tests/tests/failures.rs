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
