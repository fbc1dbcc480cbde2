//! The agent killed (`kill -9`) at a random moment while Create, Start,
//! Stop, Pause, Resume, Snapshot, Restore, Update and Delete run on several
//! VMs at once, round after round, restarted each time. After every round:
//! at most one VMM per VM, no VMM without a VM, every VM's state is its
//! VMM's truth, and a VM that was running and was not asked to stop or
//! pause still runs, its guest counting on.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use berth_tests::agent::*;
use berth_tests::contract::vm as pb;
use berth_tests::{report_mode, Lcg};

const BOOT: Duration = Duration::from_secs(30);
const ROUNDS: usize = 20;
/// The whole suite stops starting rounds after this, however many ran.
const BUDGET: Duration = Duration::from_secs(150);

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Create(String),
    Start,
    Stop,
    Pause,
    Resume,
    Snapshot(String),
    /// Restore this VM's snapshot into a new VM of this id.
    RestoreNew(String, String),
    Update,
    Delete,
}

impl Op {
    /// May the VM's guest stop counting because of this operation?
    fn may_halt(&self) -> bool {
        matches!(self, Op::Stop | Op::Pause | Op::Delete)
    }
}

/// An operation that makes sense for a VM in `state` (the agent may still
/// refuse it: that is fine, the point is what a kill leaves).
fn pick(rng: &mut Lcg, state: pb::VmState, snaps: &[String], n: usize) -> Op {
    use pb::VmState::*;
    let running = matches!(state, RUNNING | PAUSED);
    match (rng.below(8), running) {
        (0, true) => Op::Stop,
        (1, true) if state == RUNNING => Op::Pause,
        (1, true) => Op::Resume,
        (2 | 3, true) => Op::Snapshot(format!("s{n}")),
        (4, _) if !snaps.is_empty() => {
            let snap = snaps[rng.below(snaps.len() as u64) as usize].clone();
            Op::RestoreNew(snap, format!("c{n}"))
        }
        (5, false) => Op::Delete,
        (6, _) => Op::Update,
        (_, false) => Op::Start,
        _ => Op::Snapshot(format!("s{n}")),
    }
}

async fn run_op(c: Clients, id: String, op: Op) {
    let r = vm_ref(&id);
    let _ = match op {
        Op::Create(new) => {
            let spec = probe_spec(&new, 1, "probe.mode=tick");
            c.vms.create(ctx(), &create_req(spec)).await.map(drop)
        }
        Op::Start => c.vms.start(ctx(), &r).await.map(drop),
        Op::Stop => {
            let req = pb::StopVmRequest {
                id,
                force: true,
                ..Default::default()
            };
            c.vms.stop(ctx(), &req).await.map(drop)
        }
        Op::Pause => c.vms.pause(ctx(), &r).await.map(drop),
        Op::Resume => c.vms.resume(ctx(), &r).await.map(drop),
        Op::Snapshot(name) => {
            let req = pb::SnapshotVmRequest {
                id,
                name,
                ..Default::default()
            };
            c.vms.snapshot(ctx(), &req).await.map(drop)
        }
        Op::RestoreNew(snapshot, new_id) => {
            let req = pb::RestoreVmRequest {
                id,
                snapshot,
                new_id,
                ..Default::default()
            };
            c.vms.restore(ctx(), &req).await.map(drop)
        }
        Op::Update => {
            let Ok(vm) = c.vms.get(ctx(), &r).await else {
                return;
            };
            // A change a running VM takes live as well as a stopped one.
            let mut spec = vm.spec.clone().unwrap_or_default();
            let cpu = spec.cpu.mut_or_insert_default();
            cpu.weight = if cpu.weight == 200 { 100 } else { 200 };
            let req = pb::UpdateVmRequest {
                spec: protobuf::MessageField::some(spec),
                ..Default::default()
            };
            c.vms.update(ctx(), &req).await.map(drop)
        }
        Op::Delete => c.vms.delete(ctx(), &r).await.map(drop),
    };
}

fn create_req(spec: pb::VmSpec) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        spec: protobuf::MessageField::some(spec),
        ..Default::default()
    }
}

async fn listed(c: &Clients) -> Vec<pb::Vm> {
    let mut all = Vec::new();
    let mut req = pb::ListVmsRequest::default();
    loop {
        let page = c.vms.list(ctx(), &req).await.unwrap();
        all.extend(page.vms);
        if page.next_page_token.is_empty() {
            return all;
        }
        req.page_token = page.next_page_token;
    }
}

/// The VMMs running VM `id`: those whose run directory is its. (A VMM
/// restoring another VM's snapshot names `id`'s directory too, for the
/// snapshot, so `vmm_pids` would count it.)
fn vmms_of(agent: &TestAgent, id: &str) -> Vec<i32> {
    vmm_pids(&agent.vm_dir(id).join("run"))
}

/// Every VMM of this agent's state root, whatever VM it belongs to.
fn vmms_under(agent: &TestAgent) -> usize {
    vmm_pids(&agent.vm_dir("")).len()
}

/// The invariants after a round; `ever` holds every id that existed.
async fn check_round(agent: &TestAgent, c: &Clients, ever: &BTreeSet<String>, what: &str) {
    use pb::VmState::*;
    let vms = listed(c).await;
    let ids: BTreeSet<String> = vms.iter().map(|v| v.spec.id.clone()).collect();
    for id in ever {
        let pids = vmms_of(agent, id);
        assert!(pids.len() <= 1, "{what}: {id} has VMMs {pids:?}");
        if !ids.contains(id) {
            assert!(
                pids.is_empty(),
                "{what}: VMM {pids:?} runs for deleted VM {id}"
            );
        }
    }
    let counted: usize = ever.iter().map(|id| vmms_of(agent, id).len()).sum();
    assert_eq!(vmms_under(agent), counted, "{what}: a VMM of no VM");
    for vm in &vms {
        let id = &vm.spec.id;
        let state = state_of(vm);
        match vmms_of(agent, id).first() {
            Some(&pid) => {
                assert!(
                    matches!(state, RUNNING | PAUSED),
                    "{what}: {id} has VMM {pid} but is {state:?} ({})",
                    vm.status.last_exit
                );
                assert_eq!(vm.status.pid, pid, "{what}: {id}'s recorded VMM");
            }
            None => assert!(
                !matches!(state, RUNNING | PAUSED | STARTING | STOPPING),
                "{what}: {id} is {state:?} with no VMM"
            ),
        }
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// The tick the guest of `id` printed last (`last_tick` is the highest on
/// the console, which an earlier boot of the same VM may hold).
fn latest_tick(agent: &TestAgent, id: &str) -> Option<u64> {
    console_text(agent, id).lines().rev().find_map(|l| {
        l.trim_end_matches('\r')
            .strip_prefix("PROBE tick ")?
            .parse()
            .ok()
    })
}

/// The guest of `id` counts on: a later tick appears.
fn counts_on(agent: &TestAgent, id: &str, what: &str) {
    let before = latest_tick(agent, id).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while latest_tick(agent, id).unwrap_or(0) <= before {
        assert!(
            Instant::now() < deadline,
            "{what}: {id}'s guest stopped counting at {before}; its console ends:\n{}\nits VMM's log:\n{}",
            tail(&console_text(agent, id)),
            tail(&std::fs::read_to_string(agent.vm_dir(id).join("vmm.log")).unwrap_or_default()),
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Keeps the node small between rounds: the VMs a round made go again,
/// and each first VM keeps its newest snapshot only.
async fn tidy(c: &Clients) {
    for vm in listed(c).await {
        let id = vm.spec.id.clone();
        if !id.starts_with('v') {
            let stop = pb::StopVmRequest {
                id: id.clone(),
                force: true,
                ..Default::default()
            };
            let _ = c.vms.stop(ctx(), &stop).await;
            c.vms.delete(ctx(), &vm_ref(&id)).await.unwrap();
            continue;
        }
        let Ok(list) = c.vms.list_snapshots(ctx(), &vm_ref(&id)).await else {
            continue;
        };
        let mut snaps = list.snapshots;
        snaps.sort_by_key(|s| s.created_at_ms);
        snaps.pop();
        for s in snaps {
            let req = pb::SnapshotRef {
                id: id.clone(),
                name: s.name,
                ..Default::default()
            };
            let _ = c.vms.delete_snapshot(ctx(), &req).await;
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn an_agent_killed_during_any_operation_leaves_every_vm_in_its_vmms_truth() {
    report_mode("agent kill -9 during every operation");
    let mut rng = Lcg::from_clock();
    let mut agent = TestAgent::new("kill-any-op");
    let mut ever = BTreeSet::new();
    {
        let c = agent.clients().await;
        for i in 0..4 {
            let id = format!("v{i}");
            create_and_start(&c, probe_spec(&id, 1, "probe.mode=tick")).await;
            wait_console(&agent, &id, "PROBE tick 1", BOOT);
            ever.insert(id);
        }
    }
    let started = Instant::now();
    for round in 0..ROUNDS {
        if started.elapsed() > BUDGET {
            eprintln!("stopping after {round} rounds: time budget spent");
            break;
        }
        let c = agent.clients().await;
        let vms = listed(&c).await;
        let mut plan = Vec::new();
        for (n, vm) in vms.iter().enumerate() {
            let id = vm.spec.id.clone();
            let snaps: Vec<String> = (c.vms.list_snapshots(ctx(), &vm_ref(&id)).await)
                .map(|l| l.snapshots.into_iter().map(|s| s.name).collect())
                .unwrap_or_default();
            let op = pick(&mut rng, state_of(vm), &snaps, round * 100 + n);
            if let Op::RestoreNew(_, new) = &op {
                ever.insert(new.clone());
            }
            plan.push((id, state_of(vm), op));
        }
        let new = format!("n{round}");
        ever.insert(new.clone());
        plan.push((new.clone(), pb::VmState::DEFINED, Op::Create(new)));
        let mut tasks = Vec::new();
        for (id, _, op) in plan.iter().cloned() {
            let c = agent.clients().await;
            tasks.push(tokio::spawn(run_op(c, id, op)));
        }
        let delay = 10 + rng.below(400);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let killed_log = agent.kill9();
        for t in tasks {
            let _ = t.await;
        }
        drop(c);
        agent.start();
        let c = agent.clients().await;
        let ops: Vec<String> = plan
            .iter()
            .map(|(id, _, op)| format!("{id}:{op:?}"))
            .collect();
        let what = format!(
            "round {round} (killed after {delay} ms; {})",
            ops.join(", ")
        );
        // Shown only when the round fails: what both agents said.
        eprintln!(
            "=== round {round}: the killed agent's log\n{killed_log}\n=== the new agent's log\n{}",
            agent.log()
        );
        check_round(&agent, &c, &ever, &what).await;
        for (id, before, op) in &plan {
            if *before == pb::VmState::RUNNING && !op.may_halt() {
                let vm = get(&c, id).await;
                assert_eq!(state_of(&vm), pb::VmState::RUNNING, "{what}: {id}");
                counts_on(&agent, id, &what);
            }
        }
        tidy(&c).await;
    }
}
