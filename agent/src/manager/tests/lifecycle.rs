//! Every operation in every state, the supervisor's restart policy,
//! re-adoption after an agent restart, and persist-before-announce.

use super::fake_vmm::{write_snapshot, Faults};
use super::*;
use crate::manager::rules::{self, Operation, Operation::*};
use crate::spec::{RestartKind, RestartPolicy};

const Y: bool = true;
const N: bool = false;

/// Which operation is allowed in which state, written out here on its own
/// so that a change to `rules.rs` or to an operation's code that lets an
/// operation run where it must not (or refuses one that must run) fails.
/// Columns: Defined Starting Running Paused Stopping Stopped Crashed
/// Migrating Migrated.
const EXPECTED: [(Operation, [bool; 9]); 12] = [
    (Start, [Y, N, N, N, N, Y, Y, N, N]),
    (RestoreInto, [Y, N, N, N, N, Y, Y, N, N]),
    (Stop, [N, N, Y, Y, N, N, N, N, N]),
    (Reboot, [N, N, Y, Y, N, N, N, N, N]),
    (Pause, [N, N, Y, N, N, N, N, N, N]),
    (Resume, [N, N, N, Y, N, N, N, N, N]),
    (Snapshot, [N, N, Y, Y, N, N, N, N, N]),
    (ConsoleInput, [N, N, Y, Y, N, N, N, N, N]),
    (Delete, [Y, N, N, N, N, Y, Y, N, Y]),
    (Redefine, [Y, N, N, N, N, Y, Y, N, Y]),
    (MigrateOut, [N, N, Y, N, N, N, N, N, N]),
    (CancelMigration, [N, N, N, N, N, N, N, Y, N]),
];

#[test]
fn the_rules_table_is_the_expected_one() {
    for (op, row) in EXPECTED {
        for (state, allowed) in rules::STATES.into_iter().zip(row) {
            assert_eq!(
                rules::check(op, state).is_ok(),
                allowed,
                "{op:?} in {state:?}"
            );
        }
    }
}

/// Creates VM `id` (with a snapshot "base" to restore) and brings it
/// into `state` the way the API would, or as an operation in flight has it.
async fn vm_in(node: &Node, id: &str, state: VmState) {
    let m = &node.manager;
    m.create(node.spec(id)).await.unwrap();
    let dir = m.registry.entry(id).unwrap().dir.snapshots().join("base");
    write_snapshot(&dir).unwrap();
    match state {
        VmState::Defined => {}
        VmState::Running => drop(m.start(id).await.unwrap()),
        VmState::Paused => {
            m.start(id).await.unwrap();
            m.pause(id).await.unwrap();
        }
        VmState::Stopped => {
            m.start(id).await.unwrap();
            m.stop(id, false, None).await.unwrap();
        }
        VmState::Crashed => {
            m.start(id).await.unwrap();
            node.vmms.end(id, Some(1), "the guest panicked");
            m.check_exits().await;
        }
        VmState::Starting | VmState::Stopping | VmState::Migrating => {
            m.start(id).await.unwrap();
            node.force(id, state);
        }
        VmState::Migrated => node.force(id, state),
    }
    assert_eq!(node.state(id), state, "setting up {id}");
}

async fn apply(node: &Node, op: Operation, id: &str) -> ApiResult<()> {
    let m = &node.manager;
    match op {
        Start => m.start(id).await.map(drop),
        RestoreInto => m.restore(id, "base", "", "", false, &[]).await.map(drop),
        Stop => m.stop(id, true, None).await.map(drop),
        Reboot => m.reboot(id).await.map(drop),
        Pause => m.pause(id).await.map(drop),
        Resume => m.resume(id).await.map(drop),
        Snapshot => (m.snapshot(id, "s1", false, SnapshotKind::Full, false).await).map(drop),
        ConsoleInput => m.console_write(id, b"ls\n".to_vec()).await,
        Delete => m.delete(id).await,
        Redefine => {
            let mut spec = m.get(id)?.spec;
            spec.vcpus = 2;
            m.update(spec).await.map(drop)
        }
        MigrateOut => {
            let params = MigrateParams::default();
            (m.migrate_out(id, "127.0.0.1:1", "token", &params).await).map(drop)
        }
        CancelMigration => m.cancel_migration(id).await.map(drop),
    }
}

/// The state an allowed operation leaves the VM in (None: deleted).
fn after(op: Operation, before: VmState) -> Option<VmState> {
    match op {
        Start | RestoreInto | Reboot | Resume => Some(VmState::Running),
        Stop => Some(VmState::Stopped),
        Pause => Some(VmState::Paused),
        MigrateOut => Some(VmState::Migrating),
        Delete => None,
        Snapshot | ConsoleInput | Redefine | CancelMigration => Some(before),
    }
}

#[tokio::test(start_paused = true)]
async fn every_operation_in_every_state_runs_or_is_refused_with_the_exact_error() {
    for (column, state) in rules::STATES.into_iter().enumerate() {
        let node = Node::new("matrix").await;
        for (row, (op, allowed)) in EXPECTED.iter().enumerate() {
            let id = format!("vm-{row}");
            vm_in(&node, &id, state).await;
            let pids = node.vmms.live(&id);
            let result = apply(&node, *op, &id).await;
            let what = format!("{op:?} in {state:?}");
            if !allowed[column] {
                let wanted = format!("VM {id} is {}; {}", state.name(), rules::rule(*op).1);
                assert_eq!(result, Err(ApiError::FailedPrecondition(wanted)), "{what}");
                assert_eq!(node.state(&id), state, "{what} changed the state");
                assert_eq!(node.vmms.live(&id), pids, "{what} touched the VMM");
                continue;
            }
            assert_eq!(result, Ok(()), "{what}");
            match after(*op, state) {
                None => assert!(node.manager.get(&id).is_err(), "{what}: still listed"),
                Some(s) => assert_eq!(node.state(&id), s, "{what}"),
            }
            let with_vmm = after(*op, state).is_some_and(|s| s.has_vmm());
            assert_eq!(node.vmms.live(&id).len(), usize::from(with_vmm), "{what}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn allowed_operations_reach_the_vmm() {
    let node = Node::new("reach").await;
    let m = &node.manager;
    let mut spec = node.spec("a");
    spec.nics.push(crate::spec::Nic {
        tap: "berthut1".into(),
        ..Default::default()
    });
    m.create(spec).await.unwrap();
    m.start("a").await.unwrap();
    m.console_write("a", b"echo hi\n".to_vec()).await.unwrap();
    assert_eq!(node.vmms.console("a"), b"echo hi\n");
    // Shares and I/O limits change live; only the limit that changed is
    // sent to the VMM.
    let mut spec = m.get("a").unwrap().spec;
    spec.cpu.weight = 300;
    spec.nics[0].rx_limit.bytes_per_s = 1 << 20;
    m.update(spec).await.unwrap();
    assert_eq!(m.get("a").unwrap().spec.cpu.weight, 300);
    assert_eq!(
        node.vmms.limits("a"),
        [("nic0".to_string(), "rx".to_string(), 1 << 20)]
    );
    // A change beyond shares and limits is refused on a live VM.
    let mut spec = m.get("a").unwrap().spec;
    spec.memory_mib = 128;
    let e = m.update(spec).await.unwrap_err();
    assert!(e.message().contains("stop it to change the rest"), "{e}");
    let pid = m.get("a").unwrap().record.pid;
    m.reboot("a").await.unwrap();
    let view = m.get("a").unwrap();
    assert_ne!(view.record.pid, pid, "a reboot runs a new VMM");
    assert_eq!(node.vmms.live("a"), vec![view.record.pid]);
}

#[tokio::test(start_paused = true)]
async fn every_state_change_is_on_disk_before_it_is_announced() {
    let node = Node::new("persist").await;
    let m = &node.manager;
    m.create(node.spec("a")).await.unwrap();
    let mut events = m.subscribe();
    m.start("a").await.unwrap();
    let mut seen = Vec::new();
    while let Ok(e) = events.try_recv() {
        assert_eq!(e.kind, EventKind::State);
        seen.push(e.state);
    }
    assert_eq!(seen, [VmState::Starting, VmState::Running]);
    assert_eq!(node.on_disk("a").state, VmState::Running);
    assert_eq!(node.on_disk("a").pid, m.get("a").unwrap().record.pid);

    // A stop whose intent cannot be written does not begin and says
    // nothing: the VM still runs, and the next stop works.
    let dir = m.config.vms_dir().join("a");
    let kept = node.root.join("kept");
    std::fs::rename(&dir, &kept).unwrap();
    let e = m.stop("a", true, None).await.unwrap_err();
    assert!(matches!(e, ApiError::Internal(_)), "{e}");
    assert!(
        events.try_recv().is_err(),
        "an unrecorded change was announced"
    );
    assert_eq!(node.state("a"), VmState::Running);
    assert_eq!(node.vmms.live("a").len(), 1);
    std::fs::rename(&kept, &dir).unwrap();
    m.stop("a", true, None).await.unwrap();
    assert_eq!(node.on_disk("a").state, VmState::Stopped);
    assert!(node.vmms.live("a").is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_supervisor_restarts_on_failure_up_to_its_limit() {
    let node = Node::new("restart").await;
    let m = &node.manager;
    let mut spec = node.spec("a");
    spec.restart = RestartPolicy {
        kind: RestartKind::OnFailure,
        max_retries: 2,
        ..Default::default()
    };
    m.create(spec).await.unwrap();
    m.start("a").await.unwrap();
    for round in 1..=2 {
        let pid = m.get("a").unwrap().record.pid;
        node.vmms.end("a", Some(1), "the guest panicked");
        m.check_exits().await;
        let view = m.get("a").unwrap();
        assert_eq!(view.record.state, VmState::Running, "restart {round}");
        assert_eq!(view.record.restarts, round);
        assert_ne!(view.record.pid, pid);
    }
    node.vmms.end("a", Some(1), "the guest panicked again");
    m.check_exits().await;
    let view = m.get("a").unwrap();
    assert_eq!(view.record.state, VmState::Crashed);
    assert_eq!(view.record.last_exit, "the guest panicked again");
    assert!(node.vmms.live("a").is_empty());
    // A clean exit is Stopped, and on-failure does not restart it.
    m.start("a").await.unwrap();
    node.vmms.end("a", Some(0), "the guest powered off");
    m.check_exits().await;
    assert_eq!(node.state("a"), VmState::Stopped);
    assert!(node.vmms.live("a").is_empty());
}

/// A guest's `reboot` brings the machine back with a new VMM, whatever the
/// restart policy, and is not counted as a restart; a power-off does not;
/// `on_reboot = stop` leaves a rebooted VM Stopped.
#[tokio::test(start_paused = true)]
async fn a_guest_reboot_comes_back_unless_the_spec_says_stop() {
    let node = Node::new("reboot").await;
    let m = &node.manager;
    m.create(node.spec("a")).await.unwrap();
    m.start("a").await.unwrap();
    let pid = m.get("a").unwrap().record.pid;
    node.vmms.guest_reset("a");
    m.check_exits().await;
    let view = m.get("a").unwrap();
    assert_eq!(view.record.state, VmState::Running);
    assert_ne!(view.record.pid, pid, "a new VMM");
    assert_eq!(view.record.restarts, 0, "a reboot is not a restart");
    assert_eq!(view.record.last_exit, "guest requested reset");
    assert_eq!(node.vmms.live("a").len(), 1);
    node.vmms.end("a", Some(0), "guest powered off");
    m.check_exits().await;
    assert_eq!(node.state("a"), VmState::Stopped);
    assert!(node.vmms.live("a").is_empty());

    let mut spec = node.spec("b");
    spec.restart.on_reboot = crate::spec::OnReboot::Stop;
    m.create(spec).await.unwrap();
    m.start("b").await.unwrap();
    node.vmms.guest_reset("b");
    m.check_exits().await;
    assert_eq!(node.state("b"), VmState::Stopped);
    assert!(node.vmms.live("b").is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_takes_on_what_runs_and_records_what_ended() {
    let node = Node::new("adopt").await;
    let m = &node.manager;
    for id in ["run", "pause", "gone"] {
        m.create(node.spec(id)).await.unwrap();
        m.start(id).await.unwrap();
    }
    m.pause("pause").await.unwrap();
    let pids: Vec<i32> = ["run", "pause"]
        .iter()
        .map(|id| m.get(id).unwrap().record.pid)
        .collect();
    node.vmms.end("gone", None, "VMM killed by signal 9");

    let again = node.restart().await;
    assert_eq!(again.get("run").unwrap().record.state, VmState::Running);
    assert_eq!(again.get("run").unwrap().record.pid, pids[0]);
    assert_eq!(again.get("pause").unwrap().record.state, VmState::Paused);
    assert_eq!(again.get("pause").unwrap().record.pid, pids[1]);
    let gone = again.get("gone").unwrap().record;
    assert_eq!(gone.state, VmState::Crashed);
    assert_eq!(gone.last_exit, "VMM killed by signal 9");
    // The adopted VMMs answer the new agent.
    again.resume("pause").await.unwrap();
    again.stop("run", false, None).await.unwrap();
    assert!(node.vmms.live("run").is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_start_the_last_agent_did_not_see_end_is_taken_on_or_ended() {
    let node = Node::new("interrupted").await;
    let m = &node.manager;
    for id in ["up", "mute"] {
        m.create(node.spec(id)).await.unwrap();
        let (pid, ticks) = node.vmms.run_detached(id, false);
        let entry = m.registry.entry(id).unwrap();
        let mut inner = lock(&entry.inner);
        inner.record.state = VmState::Starting;
        inner.record.pid = pid;
        inner.record.proc_start_ticks = ticks;
        m.registry.save(&entry, &inner).unwrap();
    }
    node.vmms.set_faults(
        "mute",
        Faults {
            silent: true,
            ..Faults::default()
        },
    );
    let again = node.restart().await;
    assert_eq!(again.get("up").unwrap().record.state, VmState::Running);
    assert_eq!(node.vmms.live("up").len(), 1);
    let mute = again.get("mute").unwrap().record;
    assert_eq!(mute.state, VmState::Crashed);
    assert!(
        mute.last_exit.contains("did not come up"),
        "{}",
        mute.last_exit
    );
    assert!(node.vmms.live("mute").is_empty(), "a VMM was left running");
    assert_eq!(node.on_disk("mute").pid, 0);
}

#[tokio::test(start_paused = true)]
async fn a_vmm_holding_the_run_lock_is_never_doubled_nor_deleted_under() {
    let node = Node::new("run-lock").await;
    let m = &node.manager;
    m.create(node.spec("a")).await.unwrap();
    // A VMM of VM "a" runs that no record names (the record says Defined).
    let (pid, _) = node.vmms.run_detached("a", false);
    let e = m.start("a").await.unwrap_err();
    assert!(
        e.message()
            .contains(&format!("a berth-vmm (pid {pid}) still runs VM a")),
        "{e}"
    );
    assert_eq!(node.vmms.live("a"), vec![pid], "a second VMM was started");
    m.stop("a", true, None).await.unwrap_err();
    let e = m.delete("a").await.unwrap_err();
    assert!(e.message().contains("still runs VM a"), "{e}");
    assert!(m.config.vms_dir().join("a").exists());
    // The next agent finds it by its lock and takes it on.
    let again = node.restart().await;
    let view = again.get("a").unwrap();
    assert_eq!(view.record.state, VmState::Running);
    assert_eq!(view.record.pid, pid);
    again.stop("a", true, None).await.unwrap();
    assert!(node.vmms.live("a").is_empty());
    again.delete("a").await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_stop_the_last_agent_did_not_see_end_is_finished() {
    let node = Node::new("interrupted-stop").await;
    let m = &node.manager;
    m.create(node.spec("a")).await.unwrap();
    m.start("a").await.unwrap();
    // The agent recorded the intent, then died before the VMM ended.
    let entry = m.registry.entry("a").unwrap();
    {
        let mut inner = lock(&entry.inner);
        inner.record.state = VmState::Stopping;
        m.registry.save(&entry, &inner).unwrap();
    }
    let again = node.restart().await;
    let view = again.get("a").unwrap();
    assert_eq!(view.record.state, VmState::Stopped);
    assert_eq!(view.record.pid, 0);
    assert!(node.vmms.live("a").is_empty(), "the VMM runs on");
    assert_eq!(node.on_disk("a").state, VmState::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_live_update_is_recorded_before_it_is_applied_and_undone_if_refused() {
    let node = Node::new("live-update").await;
    let m = &node.manager;
    let mut spec = node.spec("a");
    spec.nics.push(crate::spec::Nic {
        tap: "berthut2".into(),
        ..Default::default()
    });
    m.create(spec).await.unwrap();
    m.start("a").await.unwrap();
    let mut wanted = m.get("a").unwrap().spec;
    wanted.nics[0].tx_limit.bytes_per_s = 4 << 20;

    // A document that cannot be written: nothing reaches the VMM.
    let dir = m.config.vms_dir().join("a");
    let aside = node.root.join("aside");
    std::fs::rename(&dir, &aside).unwrap();
    let e = m.update(wanted.clone()).await.unwrap_err();
    assert!(matches!(e, ApiError::Internal(_)), "{e}");
    std::fs::rename(&aside, &dir).unwrap();
    assert!(
        node.vmms.limits("a").is_empty(),
        "applied though not recorded"
    );

    // A VMM that refuses the limit: the document goes back.
    node.vmms.set_faults(
        "a",
        Faults {
            refuse: Some((ttrpc::Code::INVALID_ARGUMENT, "no such limiter".into())),
            ..Faults::default()
        },
    );
    let e = m.update(wanted.clone()).await.unwrap_err();
    assert!(e.message().contains("no such limiter"), "{e}");
    assert_eq!(m.get("a").unwrap().spec.nics[0].tx_limit.bytes_per_s, 0);
    let stored: VmSpec =
        serde_json::from_slice(&std::fs::read(dir.join("spec.json")).unwrap()).unwrap();
    assert_eq!(
        stored.nics[0].tx_limit.bytes_per_s, 0,
        "the refused change stayed on disk"
    );

    node.vmms.set_faults("a", Faults::default());
    m.update(wanted).await.unwrap();
    assert_eq!(
        node.vmms.limits("a"),
        [("nic0".to_string(), "tx".to_string(), 4 << 20)]
    );
}
