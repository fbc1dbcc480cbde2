//! A start that fails at any step of the launcher leaves no VMM running,
//! no cgroup, and a record on disk that says Crashed and why, which the
//! next Start can act on.

use super::fake_vmm::Faults;
use super::*;
use crate::spec::{Nic, RestartKind, RestartPolicy};

/// Starts `id` expecting `wanted`; then checks nothing of the attempt is
/// left, and that the VM starts once the fault is gone.
async fn fails_cleanly(node: &Node, id: &str, wanted: fn(&ApiError) -> bool) {
    let e = node.manager.start(id).await.unwrap_err();
    assert!(wanted(&e), "{id}: {e}");
    assert!(
        node.vmms.live(id).is_empty(),
        "{id}: a VMM was left running"
    );
    let view = node.manager.get(id).unwrap();
    assert_eq!(view.record.state, VmState::Crashed, "{id}");
    assert_eq!(view.record.pid, 0, "{id}");
    assert!(
        !view.record.last_exit.is_empty(),
        "{id}: no reason recorded"
    );
    let disk = node.on_disk(id);
    assert_eq!(disk.state, VmState::Crashed, "{id}: record on disk");
    assert_eq!(
        (disk.pid, disk.proc_start_ticks),
        (0, 0),
        "{id}: pid on disk"
    );
    assert_eq!(disk.last_exit, view.record.last_exit, "{id}");
}

#[tokio::test(start_paused = true)]
async fn a_start_failing_at_each_step_leaves_nothing_behind() {
    let node = Node::new("launch").await;
    let cases: [(&str, Faults); 3] = [
        (
            "spawn",
            Faults {
                spawn_error: Some("exec format error".into()),
                ..Faults::default()
            },
        ),
        (
            "gate",
            Faults {
                exit_at_gate: Some("cannot open /dev/kvm".into()),
                ..Faults::default()
            },
        ),
        (
            "silent",
            Faults {
                silent: true,
                ..Faults::default()
            },
        ),
    ];
    for (id, faults) in cases {
        node.manager.create(node.spec(id)).await.unwrap();
        node.vmms.set_faults(id, faults);
    }
    fails_cleanly(
        &node,
        "spawn",
        |e| matches!(e, ApiError::Unavailable(m) if m.contains("exec format error")),
    )
    .await;
    fails_cleanly(&node, "gate", |e| {
        matches!(e, ApiError::FailedPrecondition(m)
            if m == "the VMM exited while starting: cannot open /dev/kvm")
    })
    .await;
    fails_cleanly(
        &node,
        "silent",
        |e| matches!(e, ApiError::Unavailable(m) if m.contains("did not answer")),
    )
    .await;
    assert_eq!(
        node.manager.get("gate").unwrap().record.last_exit,
        "cannot open /dev/kvm"
    );
    for id in ["spawn", "gate", "silent"] {
        node.vmms.set_faults(id, Faults::default());
        node.manager.start(id).await.unwrap();
        assert_eq!(node.vmms.live(id).len(), 1, "{id} after the fault");
    }
}

#[tokio::test(start_paused = true)]
async fn a_bridge_that_cannot_be_joined_ends_the_vmm() {
    let node = Node::new("bridge").await;
    let mut spec = node.spec("a");
    spec.nics.push(Nic {
        tap: "berthut0".into(),
        bridge: "berthnobr0".into(),
        ..Nic::default()
    });
    node.manager.create(spec).await.unwrap();
    fails_cleanly(
        &node,
        "a",
        |e| matches!(e, ApiError::Unavailable(m) if m.contains("cannot attach tap berthut0")),
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn unusable_cgroups_refuse_the_start_before_any_vmm() {
    let node = Node::with_config("cgroups", |root| AgentConfig {
        cgroup_version: crate::cgroups::VersionChoice::V2,
        cgroup_root: root.join("no-cgroup-here"),
        ..config(root)
    })
    .await;
    node.manager.create(node.spec("a")).await.unwrap();
    fails_cleanly(
        &node,
        "a",
        |e| matches!(e, ApiError::Unavailable(m) if m.contains("cgroups unusable")),
    )
    .await;
    assert_eq!(node.vmms.all_live(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_vmm_whose_pid_cannot_be_recorded_is_ended() {
    let node = Node::new("record").await;
    node.manager.create(node.spec("a")).await.unwrap();
    node.vmms.set_faults(
        "a",
        Faults {
            remove_dir_on_spawn: true,
            ..Faults::default()
        },
    );
    let e = node.manager.start("a").await.unwrap_err();
    assert!(matches!(e, ApiError::Internal(_)), "{e}");
    assert!(node.vmms.live("a").is_empty(), "an unrecorded VMM runs on");
    assert_eq!(node.state("a"), VmState::Crashed);
}

#[tokio::test(start_paused = true)]
async fn a_restart_whose_kernel_went_away_is_refused_at_confinement() {
    let node = Node::new("confine").await;
    let mut spec = node.spec("a");
    spec.restart = RestartPolicy {
        kind: RestartKind::Always,
        max_retries: 0,
        ..Default::default()
    };
    node.manager.create(spec).await.unwrap();
    node.manager.start("a").await.unwrap();
    std::fs::remove_file(node.root.join("images/vmlinux")).unwrap();
    node.vmms.end("a", Some(0), "the guest powered off");
    node.manager.check_exits().await;
    let view = node.manager.get("a").unwrap();
    assert_eq!(view.record.state, VmState::Crashed);
    assert!(
        view.record.last_exit.contains("checked again at start"),
        "{}",
        view.record.last_exit
    );
    assert!(node.vmms.live("a").is_empty());
    assert_eq!(node.on_disk("a").state, VmState::Crashed);
}

#[tokio::test(start_paused = true)]
async fn a_restore_into_a_new_vm_that_fails_leaves_no_vm() {
    let node = Node::new("restore-new").await;
    let m = &node.manager;
    m.create(node.spec("a")).await.unwrap();
    m.start("a").await.unwrap();
    (m.snapshot("a", "s", false, SnapshotKind::Full, false).await).unwrap();
    node.vmms.set_faults(
        "b",
        Faults {
            exit_at_gate: Some("memory.img is truncated".into()),
            ..Faults::default()
        },
    );
    let e = m.restore("a", "s", "b", "", false, &[]).await.unwrap_err();
    assert!(e.message().contains("memory.img is truncated"), "{e}");
    assert!(m.get("b").is_err(), "the failed restore left VM b behind");
    assert!(!m.config.vms_dir().join("b").exists());
    assert!(node.vmms.live("b").is_empty());
    // The retry is a restore, not ALREADY_EXISTS.
    node.vmms.set_faults("b", Faults::default());
    let b = m.restore("a", "s", "b", "", false, &[]).await.unwrap();
    assert_eq!(b.record.state, VmState::Running);
    // A failed restore into the VM itself keeps the VM, Crashed.
    m.stop("a", true, None).await.unwrap();
    node.vmms.set_faults(
        "a",
        Faults {
            exit_at_gate: Some("memory.img is truncated".into()),
            ..Faults::default()
        },
    );
    m.restore("a", "s", "", "", false, &[]).await.unwrap_err();
    assert_eq!(node.state("a"), VmState::Crashed);
}
