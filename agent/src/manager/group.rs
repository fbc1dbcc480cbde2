//! Group actions: one action on every VM whose labels match a selector,
//! with a result per VM. A consistent group snapshot pauses every member
//! before it writes any snapshot, so all of them capture the same moment.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::{now_ms, ApiError, ApiResult, Manager, SnapshotKind, SnapshotView};
use crate::store::VmState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupAction {
    Start,
    Stop {
        force: bool,
        timeout: Option<Duration>,
    },
    Pause,
    Resume,
    /// Consistent snapshots, all named `name` (one per member).
    Snapshot,
}

#[derive(Debug)]
pub struct MemberResult {
    pub id: String,
    pub outcome: Result<(), ApiError>,
    pub state: VmState,
    pub snapshot: Option<SnapshotView>,
}

#[derive(Debug, Default)]
pub struct GroupOutcome {
    pub results: Vec<MemberResult>,
    pub all_paused_at_ms: u64,
    pub resumed_at_ms: u64,
}

impl Manager {
    fn members(&self, selector: &BTreeMap<String, String>) -> ApiResult<Vec<String>> {
        if selector.is_empty() {
            return Err(ApiError::InvalidArgument(
                "selector: give at least one label; an empty selector would take every VM".into(),
            ));
        }
        Ok(self.list(selector).into_iter().map(|v| v.spec.id).collect())
    }

    fn state_now(&self, id: &str) -> VmState {
        self.get(id)
            .map(|v| v.record.state)
            .unwrap_or(VmState::Stopped)
    }

    fn member(&self, id: String, outcome: ApiResult<()>) -> MemberResult {
        MemberResult {
            state: self.state_now(&id),
            id,
            outcome,
            snapshot: None,
        }
    }

    /// Applies `action` to every VM matching `selector`; members act
    /// concurrently and one failing does not stop the others.
    pub async fn group(
        self: &Arc<Self>,
        selector: &BTreeMap<String, String>,
        action: GroupAction,
        snapshot_name: &str,
    ) -> ApiResult<GroupOutcome> {
        let members = self.members(selector)?;
        if action == GroupAction::Snapshot {
            crate::spec::check_name("snapshot_name", snapshot_name)
                .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
            return Ok(self.group_snapshot(members, snapshot_name).await);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for id in members {
            let manager = self.clone();
            tasks.spawn(async move {
                let outcome = match action {
                    GroupAction::Start => manager.start(&id).await.map(drop),
                    GroupAction::Stop { force, timeout } => {
                        manager.stop(&id, force, timeout).await.map(drop)
                    }
                    GroupAction::Pause => manager.pause(&id).await.map(drop),
                    GroupAction::Resume => manager.resume(&id).await.map(drop),
                    GroupAction::Snapshot => unreachable!("handled above"),
                };
                (id, outcome)
            });
        }
        let mut results = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let (id, outcome) = done.map_err(|e| ApiError::Internal(e.to_string()))?;
            results.push(self.member(id, outcome));
        }
        results.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(GroupOutcome {
            results,
            ..Default::default()
        })
    }

    /// Pause all, snapshot each, resume those that were running. If a
    /// member cannot be paused, no snapshot is taken: a set that is not
    /// from one moment is worse than none.
    async fn group_snapshot(self: &Arc<Self>, members: Vec<String>, name: &str) -> GroupOutcome {
        let mut paused_by_us = Vec::new();
        let mut refusal = None;
        for id in &members {
            match self.state_now(id) {
                VmState::Paused => {}
                VmState::Running => match self.pause(id).await {
                    Ok(_) => paused_by_us.push(id.clone()),
                    Err(e) => {
                        refusal = Some((id.clone(), e));
                        break;
                    }
                },
                other => {
                    refusal = Some((
                        id.clone(),
                        ApiError::FailedPrecondition(format!(
                            "VM {id} is {}; a group snapshot needs every member Running or Paused",
                            other.name()
                        )),
                    ));
                    break;
                }
            }
        }
        let all_paused_at_ms = now_ms();
        let mut results = Vec::new();
        if let Some((culprit, error)) = refusal {
            for id in &members {
                let outcome = if *id == culprit {
                    Err(error.clone())
                } else {
                    Err(ApiError::FailedPrecondition(format!(
                        "not snapshotted: member {culprit} could not be paused, so the group would not be consistent"
                    )))
                };
                results.push((id.clone(), outcome, None));
            }
        } else {
            for id in &members {
                match self
                    .snapshot(id, name, false, SnapshotKind::Full, false)
                    .await
                {
                    Ok(view) => results.push((id.clone(), Ok(()), Some(view))),
                    Err(e) => results.push((id.clone(), Err(e), None)),
                }
            }
        }
        let resumed_at_ms = now_ms();
        for id in &paused_by_us {
            if let Err(e) = self.resume(id).await {
                tracing::error!(vm = %id, "could not resume after the group snapshot: {e}");
                if let Some(r) = results.iter_mut().find(|r| r.0 == *id) {
                    r.1 = Err(ApiError::Unavailable(format!(
                        "snapshotted, but could not be resumed: {e}"
                    )));
                }
            }
        }
        GroupOutcome {
            results: results
                .into_iter()
                .map(|(id, outcome, snapshot)| MemberResult {
                    snapshot,
                    ..self.member(id, outcome)
                })
                .collect(),
            all_paused_at_ms,
            resumed_at_ms,
        }
    }
}
