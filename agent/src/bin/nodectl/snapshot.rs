//! `nodectl snapshot ...`: a VM's snapshots (create or hibernate, list,
//! restore, delete), and consistent snapshots of a labelled group.

use berth_proto::vm as pb;
use berth_proto::vm_ttrpc::VmServiceClient;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::agent::ctx;
use crate::args::{parse_labels, parse_taps};
use crate::failure::{fail, from_ttrpc, Failure};
use crate::group;
use crate::progress;
use crate::render::json::snapshot_json;
use crate::render::table::print_table;
use crate::vm::{print_vm, vm_ref};

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Capture a running VM (`create ID NAME`); with --hibernate, stop it
    /// too (Start restores it). With -l (`create -l k=v NAME`): a consistent
    /// snapshot of every VM with those labels, all paused first.
    Create {
        /// ID NAME, or NAME with -l.
        #[arg(num_args = 1..=2, required = true)]
        args: Vec<String>,
        #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        #[arg(long)]
        hibernate: bool,
        /// Only the pages written since the VM's last snapshot.
        #[arg(long)]
        diff: bool,
        /// Copy memory while the guest runs; pause it only briefly.
        #[arg(long)]
        live: bool,
    },
    List {
        id: String,
    },
    /// Restore into the stopped VM itself, or into a new VM with --new-id.
    Restore {
        id: String,
        name: String,
        #[arg(long)]
        new_id: Option<String>,
        #[arg(long)]
        new_name: Option<String>,
        /// Leave the restored guest paused.
        #[arg(long)]
        paused: bool,
        /// Attach the NIC on tap OLD to tap NEW instead (repeatable).
        #[arg(long = "tap", value_name = "OLD=NEW")]
        taps: Vec<String>,
    },
    Delete {
        id: String,
        name: String,
    },
}

pub async fn run(vms: &VmServiceClient, cmd: SnapshotCmd, json: bool) -> Result<(), Failure> {
    match cmd {
        SnapshotCmd::Create {
            args,
            labels,
            hibernate,
            diff,
            live,
        } => {
            let (id, name) = match (args.as_slice(), labels.is_empty()) {
                ([id, name], true) => (id.clone(), name.clone()),
                ([name], false) => {
                    if hibernate || diff || live {
                        return Err(fail(
                            2,
                            "a group snapshot is full and paused; --hibernate, --diff and --live are for one VM",
                        ));
                    }
                    let selector = parse_labels(&labels)?;
                    let name = name.clone();
                    let set = move |r: &mut pb::GroupActionRequest| r.snapshot_name = name;
                    let action = pb::GroupAction::GROUP_SNAPSHOT;
                    return group::act(vms, selector, action, json, set).await;
                }
                _ => {
                    return Err(fail(
                        2,
                        "give ID NAME for one VM, or -l KEY=VALUE and NAME for a group",
                    ))
                }
            };
            let req = pb::SnapshotVmRequest {
                id,
                name,
                hibernate,
                kind: if diff { "diff" } else { "full" }.into(),
                live,
                ..Default::default()
            };
            create(vms, &req, json).await
        }
        SnapshotCmd::List { id } => list(vms, &id, json).await,
        SnapshotCmd::Restore {
            id,
            name,
            new_id,
            new_name,
            paused,
            taps,
        } => {
            let tap_overrides = parse_taps(&taps)?;
            let req = pb::RestoreVmRequest {
                id,
                snapshot: name,
                new_id: new_id.unwrap_or_default(),
                new_name: new_name.unwrap_or_default(),
                paused,
                tap_overrides,
                ..Default::default()
            };
            print_vm(&vms.restore(ctx(), &req).await.map_err(from_ttrpc)?, json);
            Ok(())
        }
        SnapshotCmd::Delete { id, name } => delete(vms, id, name, json).await,
    }
}

async fn create(
    vms: &VmServiceClient,
    req: &pb::SnapshotVmRequest,
    json: bool,
) -> Result<(), Failure> {
    let info = snapshot_with_progress(vms, req, json).await?;
    if json {
        println!("{}", snapshot_json(&info));
    } else {
        println!(
            "snapshot {} of {}: {} MiB of memory, {} MiB on disk, guest paused {} ms",
            info.name,
            info.vm_id,
            info.memory_bytes >> 20,
            info.disk_bytes >> 20,
            info.pause_ms
        );
    }
    Ok(())
}

/// Takes a snapshot, drawing a bar per memory pass from the agent's
/// progress reports while the call runs.
async fn snapshot_with_progress(
    vms: &VmServiceClient,
    req: &pb::SnapshotVmRequest,
    json: bool,
) -> Result<pb::SnapshotInfo, Failure> {
    let what = pb::SnapshotRef {
        id: req.id.clone(),
        name: req.name.clone(),
        ..Default::default()
    };
    let call = vms.snapshot(ctx(), req);
    tokio::pin!(call);
    let mut bar: Option<(u32, progress::Progress, u64)> = None;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            out = &mut call => {
                if let Some((_, mut b, total)) = bar.take() {
                    if out.is_ok() {
                        b.finish(total);
                    }
                }
                return out.map_err(from_ttrpc);
            }
            _ = tick.tick() => {
                let Ok(p) = vms.get_snapshot_progress(ctx(), &what).await else { continue };
                if !p.active || p.total_bytes == 0 {
                    continue;
                }
                if bar.as_ref().is_none_or(|(pass, _, _)| *pass != p.pass) {
                    if let Some((_, mut old, total)) = bar.take() {
                        old.finish(total);
                    }
                    let label = format!("snapshot {} of {} (pass {})", req.name, req.id, p.pass);
                    bar = Some((p.pass, progress::Progress::new(label, p.total_bytes, json), p.total_bytes));
                }
                if let Some((_, b, _)) = bar.as_mut() {
                    b.update(p.done_bytes);
                }
            }
        }
    }
}

async fn list(vms: &VmServiceClient, id: &str, json: bool) -> Result<(), Failure> {
    let list = vms
        .list_snapshots(ctx(), &vm_ref(id))
        .await
        .map_err(from_ttrpc)?;
    if json {
        println!(
            "{}",
            Value::Array(list.snapshots.iter().map(snapshot_json).collect())
        );
        return Ok(());
    }
    let mut rows = vec![["NAME", "CREATED (ms)", "MEMORY MiB", "ON DISK MiB"]
        .map(String::from)
        .to_vec()];
    for s in &list.snapshots {
        rows.push(vec![
            s.name.clone(),
            s.created_at_ms.to_string(),
            (s.memory_bytes >> 20).to_string(),
            (s.disk_bytes >> 20).to_string(),
        ]);
    }
    print_table(rows);
    Ok(())
}

async fn delete(
    vms: &VmServiceClient,
    id: String,
    name: String,
    json: bool,
) -> Result<(), Failure> {
    let req = pb::SnapshotRef {
        id: id.clone(),
        name: name.clone(),
        ..Default::default()
    };
    vms.delete_snapshot(ctx(), &req).await.map_err(from_ttrpc)?;
    if json {
        println!("{}", json!({"deleted": name, "vm": id}));
    } else {
        println!("deleted snapshot {name} of {id}");
    }
    Ok(())
}
