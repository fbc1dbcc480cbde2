//! One VM's life: list, show, create, update, start, stop, reboot, pause,
//! resume, delete. Start, stop, pause and resume also take a label
//! selector instead of an id (`group.rs`).

use std::path::Path;

use berth_agent::server::spec_to_pb;
use berth_proto::vm as pb;
use berth_proto::vm_ttrpc::VmServiceClient;
use clap::Args;
use serde_json::{json, Value};

use crate::agent::ctx;
use crate::args::{parse_labels, read_spec};
use crate::failure::{from_ttrpc, Failure};
use crate::group::{self, target, Target};
use crate::render::json::vm_json;
use crate::render::table::{print_fields, print_table};

// The flags of `nodectl stop` (its help is on `Cmd::Stop`).
#[derive(Args)]
pub struct StopArgs {
    id: Option<String>,
    #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Kill at once instead of asking the guest to shut down.
    #[arg(long)]
    force: bool,
    /// Seconds the guest gets before it is killed.
    #[arg(long, default_value_t = 10)]
    timeout: u32,
}

pub fn vm_ref(id: &str) -> pb::VmRef {
    pb::VmRef {
        id: id.to_string(),
        ..Default::default()
    }
}

/// A VM as the agent answered it: all its fields, or its JSON.
pub fn print_vm(vm: &pb::Vm, json: bool) {
    if json {
        println!("{}", vm_json(vm));
        return;
    }
    print_fields(&vm_json(vm), 14);
}

/// Every VM carrying `labels`, page after page.
pub async fn list_all(
    vms: &VmServiceClient,
    labels: std::collections::HashMap<String, String>,
) -> Result<Vec<pb::Vm>, Failure> {
    let mut all = Vec::new();
    let mut req = pb::ListVmsRequest {
        labels,
        ..Default::default()
    };
    loop {
        let page = vms.list(ctx(), &req).await.map_err(from_ttrpc)?;
        all.extend(page.vms);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        req.page_token = page.next_page_token;
    }
}

pub async fn list(vms: &VmServiceClient, labels: &[String], json: bool) -> Result<(), Failure> {
    let all = list_all(vms, parse_labels(labels)?).await?;
    if json {
        println!("{}", Value::Array(all.iter().map(vm_json).collect()));
        return Ok(());
    }
    let mut rows = vec![["ID", "NAME", "STATE", "VCPUS", "MEMORY", "PID", "LABELS"]
        .map(String::from)
        .to_vec()];
    for vm in &all {
        let v = vm_json(vm);
        let labels: Vec<String> = vm
            .spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        rows.push(vec![
            v["id"].as_str().unwrap_or("").into(),
            v["name"].as_str().unwrap_or("").into(),
            v["state"].as_str().unwrap_or("").into(),
            v["vcpus"].to_string(),
            format!("{} MiB", v["memory_mib"]),
            v["pid"].to_string(),
            labels.join(","),
        ]);
    }
    print_table(rows);
    Ok(())
}

pub async fn show(vms: &VmServiceClient, id: &str, json: bool) -> Result<(), Failure> {
    let vm = vms.get(ctx(), &vm_ref(id)).await.map_err(from_ttrpc)?;
    print_vm(&vm, json);
    Ok(())
}

pub async fn create(vms: &VmServiceClient, file: &Path, json: bool) -> Result<(), Failure> {
    let spec = read_spec(file)?;
    let req = pb::CreateVmRequest {
        spec: protobuf::MessageField::some(spec_to_pb(&spec)),
        ..Default::default()
    };
    print_vm(&vms.create(ctx(), &req).await.map_err(from_ttrpc)?, json);
    Ok(())
}

/// Replaces a VM's spec; on a running VM only cpu and memory policies may
/// change (the agent checks).
pub async fn update(vms: &VmServiceClient, file: &Path, json: bool) -> Result<(), Failure> {
    let spec = read_spec(file)?;
    let req = pb::UpdateVmRequest {
        spec: protobuf::MessageField::some(spec_to_pb(&spec)),
        ..Default::default()
    };
    print_vm(&vms.update(ctx(), &req).await.map_err(from_ttrpc)?, json);
    Ok(())
}

/// Start, Pause and Resume: the same call on one VM or a label group.
#[derive(Clone, Copy)]
pub enum Simple {
    Start,
    Pause,
    Resume,
}

/// Does `action` to VM `id`, or to every VM matching `labels`.
pub async fn simple(
    vms: &VmServiceClient,
    action: Simple,
    id: Option<String>,
    labels: &[String],
    json: bool,
) -> Result<(), Failure> {
    match target(id, labels)? {
        Target::One(id) => {
            let r = vm_ref(&id);
            let vm = match action {
                Simple::Start => vms.start(ctx(), &r).await,
                Simple::Pause => vms.pause(ctx(), &r).await,
                Simple::Resume => vms.resume(ctx(), &r).await,
            };
            print_vm(&vm.map_err(from_ttrpc)?, json);
            Ok(())
        }
        Target::Group(selector) => {
            let each = match action {
                Simple::Start => pb::GroupAction::GROUP_START,
                Simple::Pause => pb::GroupAction::GROUP_PAUSE,
                Simple::Resume => pb::GroupAction::GROUP_RESUME,
            };
            group::act(vms, selector, each, json, |_| {}).await
        }
    }
}

pub async fn stop(vms: &VmServiceClient, args: StopArgs, json: bool) -> Result<(), Failure> {
    let StopArgs {
        id,
        labels,
        force,
        timeout,
    } = args;
    match target(id, &labels)? {
        Target::One(id) => {
            let req = pb::StopVmRequest {
                id,
                force,
                timeout_ms: timeout.saturating_mul(1000),
                ..Default::default()
            };
            print_vm(&vms.stop(ctx(), &req).await.map_err(from_ttrpc)?, json);
            Ok(())
        }
        Target::Group(selector) => {
            let set = |r: &mut pb::GroupActionRequest| {
                r.force = force;
                r.timeout_ms = timeout.saturating_mul(1000);
            };
            group::act(vms, selector, pb::GroupAction::GROUP_STOP, json, set).await
        }
    }
}

pub async fn reboot(vms: &VmServiceClient, id: &str, json: bool) -> Result<(), Failure> {
    print_vm(
        &vms.reboot(ctx(), &vm_ref(id)).await.map_err(from_ttrpc)?,
        json,
    );
    Ok(())
}

pub async fn delete(vms: &VmServiceClient, id: &str, json: bool) -> Result<(), Failure> {
    vms.delete(ctx(), &vm_ref(id)).await.map_err(from_ttrpc)?;
    if json {
        println!("{}", json!({"deleted": id}));
    } else {
        println!("deleted {id}");
    }
    Ok(())
}
