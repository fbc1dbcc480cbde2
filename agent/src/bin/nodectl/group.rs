//! Commands on many VMs at once: a label selector (-l KEY=VALUE) instead of
//! a VM id, one action the agent applies to every member.

use std::collections::HashMap;

use berth_proto::vm as pb;
use berth_proto::vm_ttrpc::VmServiceClient;

use crate::agent::ctx;
use crate::args::parse_labels;
use crate::failure::{fail, from_ttrpc, Failure};
use crate::progress;
use crate::render::json::group_json;
use crate::render::state_name;
use crate::render::table::print_table;

pub enum Target {
    One(String),
    Group(HashMap<String, String>),
}

/// A VM id, or a label selector (-l): exactly one of them.
pub fn target(id: Option<String>, labels: &[String]) -> Result<Target, Failure> {
    match (id, labels.is_empty()) {
        (Some(id), true) => Ok(Target::One(id)),
        (None, false) => Ok(Target::Group(parse_labels(labels)?)),
        (Some(_), false) => Err(fail(2, "give a VM id or -l KEY=VALUE, not both")),
        (None, true) => Err(fail(
            2,
            "give a VM id, or -l KEY=VALUE for every VM with that label",
        )),
    }
}

/// One action on a label selector; prints a line per member and fails
/// (exit 1) if any member failed.
pub async fn act(
    vms: &VmServiceClient,
    selector: HashMap<String, String>,
    action: pb::GroupAction,
    json: bool,
    set: impl FnOnce(&mut pb::GroupActionRequest),
) -> Result<(), Failure> {
    let mut req = pb::GroupActionRequest {
        selector,
        action: action.into(),
        ..Default::default()
    };
    set(&mut req);
    let what = format!("{:?} on {} VM group", action, req.selector.len());
    let reply = progress::with_ticker(&what, json, vms.group(ctx(), &req))
        .await
        .map_err(from_ttrpc)?;
    let failed = reply.results.iter().filter(|r| !r.ok).count();
    if json {
        println!("{}", group_json(&reply));
    } else if reply.results.is_empty() {
        println!("no VM matches");
    } else {
        let mut rows = vec![["ID", "RESULT", "STATE", "ERROR"]
            .map(String::from)
            .to_vec()];
        for r in &reply.results {
            rows.push(vec![
                r.id.clone(),
                if r.ok { "ok" } else { "FAILED" }.into(),
                state_name(r.state.enum_value_or_default()).into(),
                r.error.clone(),
            ]);
        }
        print_table(rows);
        if reply.all_paused_at_ms > 0 && failed == 0 {
            println!(
                "all members paused together for {} ms",
                reply.resumed_at_ms.saturating_sub(reply.all_paused_at_ms)
            );
        }
    }
    match failed {
        0 => Ok(()),
        n => Err(fail(
            1,
            format!("{n} of {} members failed", reply.results.len()),
        )),
    }
}
