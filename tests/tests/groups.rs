//! Group actions on label selectors through a real agent: start, pause,
//! resume and stop reach exactly the matching VMs, with a result each, and
//! a group snapshot is consistent: every member is paused before any
//! snapshot is written, so no member's counter moves in the window, and
//! each snapshot holds the count its VM stopped at.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use berth_tests::agent::*;
use berth_tests::contract::vm as pb;
use berth_tests::*;

const BOOT: Duration = Duration::from_secs(60);

fn labelled(id: &str, app: &str) -> pb::VmSpec {
    let mut spec = probe_spec(id, 1, "probe.mode=tick");
    spec.labels.insert("app".into(), app.into());
    spec
}

fn selector(app: &str) -> HashMap<String, String> {
    [("app".to_string(), app.to_string())].into()
}

async fn group(c: &Clients, app: &str, action: pb::GroupAction) -> pb::GroupActionResponse {
    let req = pb::GroupActionRequest {
        selector: selector(app),
        action: action.into(),
        snapshot_name: "together".into(),
        ..Default::default()
    };
    c.vms.group(ctx(), &req).await.expect("group action")
}

fn ids_and_states(reply: &pb::GroupActionResponse) -> Vec<(String, bool, pb::VmState)> {
    (reply.results.iter())
        .map(|r| (r.id.clone(), r.ok, r.state.enum_value_or_default()))
        .collect()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Watches the consoles of `ids`, noting when each new tick first shows.
fn watch_ticks(
    agent: &TestAgent,
    ids: &[&str],
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(String, u64, u64)>> {
    let logs: Vec<(String, std::path::PathBuf)> = (ids.iter())
        .map(|id| (id.to_string(), agent.vm_dir(id).join("run/console.log")))
        .collect();
    let seen = Arc::new(Mutex::new(Vec::new()));
    std::thread::spawn(move || {
        let mut last: HashMap<String, u64> = HashMap::new();
        while !stop.load(Ordering::Relaxed) {
            for (id, log) in &logs {
                let text =
                    String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
                let tick = (text.lines())
                    .filter_map(|l| l.trim_end_matches('\r').strip_prefix("PROBE tick "))
                    .filter_map(|n| n.parse::<u64>().ok())
                    .max();
                if let Some(t) = tick {
                    if last.get(id) != Some(&t) {
                        last.insert(id.clone(), t);
                        seen.lock().unwrap().push((id.clone(), t, now_ms()));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let v = seen.lock().unwrap().clone();
        v
    })
}

#[tokio::test(flavor = "current_thread")]
async fn group_actions_reach_the_matching_vms_and_a_group_snapshot_is_consistent() {
    report_mode("groups");
    let agent = TestAgent::new("groups");
    let c = agent.clients().await;
    for (id, app) in [("web-a", "web"), ("web-b", "web"), ("db-a", "db")] {
        let req = pb::CreateVmRequest {
            spec: protobuf::MessageField::some(labelled(id, app)),
            ..Default::default()
        };
        c.vms.create(ctx(), &req).await.expect("create");
    }

    let started = group(&c, "web", pb::GroupAction::GROUP_START).await;
    assert_eq!(
        ids_and_states(&started),
        [
            ("web-a".into(), true, pb::VmState::RUNNING),
            ("web-b".into(), true, pb::VmState::RUNNING)
        ]
    );
    assert_eq!(state_of(&get(&c, "db-a").await), pb::VmState::DEFINED);
    let out = agent
        .nodectl()
        .args(["--json", "list", "-l", "app=web"])
        .output()
        .unwrap();
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");

    let paused = group(&c, "web", pb::GroupAction::GROUP_PAUSE).await;
    assert!(paused
        .results
        .iter()
        .all(|r| r.ok && r.state.enum_value_or_default() == pb::VmState::PAUSED));
    // Starting them again fails per member, with the reason, not as a whole.
    let again = group(&c, "web", pb::GroupAction::GROUP_START).await;
    assert!(
        again
            .results
            .iter()
            .all(|r| !r.ok && r.error.contains("Paused")),
        "{again:?}"
    );
    let resumed = group(&c, "web", pb::GroupAction::GROUP_RESUME).await;
    assert!(resumed
        .results
        .iter()
        .all(|r| r.ok && r.state.enum_value_or_default() == pb::VmState::RUNNING));
    for id in ["web-a", "web-b"] {
        let at = last_tick(&agent, id).unwrap_or(0);
        wait_console(&agent, id, &format!("PROBE tick {}", at + 3), BOOT);
    }

    // The consistent snapshot, watched from outside.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_ticks(&agent, &["web-a", "web-b"], stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let snap = group(&c, "web", pb::GroupAction::GROUP_SNAPSHOT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    assert!(snap.results.iter().all(|r| r.ok), "{snap:?}");
    assert!(
        snap.results
            .iter()
            .all(|r| r.state.enum_value_or_default() == pb::VmState::RUNNING),
        "the members run again"
    );
    let (paused_at, resumed_at) = (snap.all_paused_at_ms, snap.resumed_at_ms);
    assert!(paused_at > 0 && paused_at <= resumed_at, "{snap:?}");
    let in_window: Vec<_> = (seen.iter())
        .filter(|(_, _, at)| *at > paused_at + 5 && *at < resumed_at)
        .collect();
    assert!(
        in_window.is_empty(),
        "ticks appeared while the group was paused ({paused_at}..{resumed_at}): {in_window:?}"
    );

    // Each snapshot holds the count its VM stopped at: a clone continues
    // from the last tick seen before the window.
    for id in ["web-a", "web-b"] {
        let before = (seen.iter())
            .filter(|(v, _, at)| v == id && *at <= paused_at + 5)
            .map(|(_, t, _)| *t)
            .max()
            .expect("ticks before the snapshot");
        let clone = format!("{id}-clone");
        let req = pb::RestoreVmRequest {
            id: id.into(),
            snapshot: "together".into(),
            new_id: clone.clone(),
            ..Default::default()
        };
        c.vms.restore(ctx(), &req).await.expect("restore");
        wait_console(&agent, &clone, "PROBE tick", BOOT);
        let first = first_tick(&agent, &clone).unwrap();
        assert_eq!(
            first,
            before + 1,
            "{id}'s snapshot is from the paused moment"
        );
    }

    let out = agent
        .nodectl()
        .args(["snapshot", "create", "-l", "app=web", "again"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("web-a") && text.contains("web-b") && !text.contains("db-a"),
        "{text}"
    );
    assert!(text.contains("all members paused together"), "{text}");

    let stopped = group(&c, "web", pb::GroupAction::GROUP_STOP).await;
    assert!(
        stopped
            .results
            .iter()
            .all(|r| r.ok && r.state.enum_value_or_default() == pb::VmState::STOPPED),
        "{stopped:?}"
    );
    let (code, msg) = code_of(
        c.vms
            .group(
                ctx(),
                &pb::GroupActionRequest {
                    action: pb::GroupAction::GROUP_STOP.into(),
                    ..Default::default()
                },
            )
            .await,
    );
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
}
