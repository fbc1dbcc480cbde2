//! The node itself: what it is (`node`), what it has and holds
//! (`capacity`), whether it admits VM starts (`drain`, `undrain`), and its
//! event stream (`events`).

use std::io::Write;

use berth_proto::common::Empty;
use berth_proto::node::{Capacity, Event, WatchRequest};
use berth_proto::node_ttrpc::NodeServiceClient;

use crate::agent::ctx;
use crate::failure::{from_ttrpc, Failure};
use crate::render::json::{capacity_json, event_json, node_json};
use crate::render::table::{print_fields, print_table};
use crate::render::{state_colour, state_name};

pub async fn show(node: &NodeServiceClient, json: bool) -> Result<(), Failure> {
    let n = node
        .get_node(ctx(), &Empty::default())
        .await
        .map_err(from_ttrpc)?;
    let v = node_json(&n);
    if json {
        println!("{v}");
    } else {
        print_fields(&v, 15);
    }
    Ok(())
}

pub async fn capacity(node: &NodeServiceClient, json: bool) -> Result<(), Failure> {
    let c = node
        .get_capacity(ctx(), &Empty::default())
        .await
        .map_err(from_ttrpc)?;
    print_capacity(&c, json);
    Ok(())
}

/// Stops admitting new VM starts (running VMs continue); prints the capacity.
pub async fn drain(node: &NodeServiceClient, json: bool) -> Result<(), Failure> {
    let c = node
        .drain(ctx(), &Empty::default())
        .await
        .map_err(from_ttrpc)?;
    print_capacity(&c, json);
    Ok(())
}

pub async fn undrain(node: &NodeServiceClient, json: bool) -> Result<(), Failure> {
    let c = node
        .undrain(ctx(), &Empty::default())
        .await
        .map_err(from_ttrpc)?;
    print_capacity(&c, json);
    Ok(())
}

/// Prints the node's events, or one VM's, as they come, until the agent
/// ends the stream.
pub async fn events(
    node: &NodeServiceClient,
    vm: Option<String>,
    json: bool,
) -> Result<(), Failure> {
    let req = WatchRequest {
        id: vm.unwrap_or_default(),
        ..Default::default()
    };
    let mut stream = node
        .watch(ttrpc::context::with_timeout(0), &req)
        .await
        .map_err(from_ttrpc)?;
    while let Ok(Some(e)) = stream.recv().await {
        print_event(&e, json);
    }
    Ok(())
}

fn print_event(e: &Event, json: bool) {
    let state = state_name(e.state.enum_value_or_default());
    if json {
        println!("{}", event_json(e));
    } else {
        use std::io::IsTerminal;
        let (start, end) = if std::io::stdout().is_terminal() {
            (state_colour(state), "\x1b[0m")
        } else {
            ("", "")
        };
        println!(
            "{} {} {} {start}{state}{end} {}",
            e.at_ms, e.vm_id, e.kind, e.message
        );
    }
    let _ = std::io::stdout().flush();
}

fn print_capacity(c: &Capacity, json: bool) {
    if json {
        println!("{}", capacity_json(c));
        return;
    }
    print_table(vec![
        ["", "CPUS", "MEMORY MiB"].map(String::from).to_vec(),
        vec!["host".into(), c.cpus.to_string(), c.memory_mib.to_string()],
        vec![
            "reserved".into(),
            c.reserved_cpus.to_string(),
            c.reserved_memory_mib.to_string(),
        ],
        vec![
            format!(
                "allocatable (x{} / x{})",
                c.cpu_overcommit, c.memory_overcommit
            ),
            c.allocatable_vcpus.to_string(),
            c.allocatable_memory_mib.to_string(),
        ],
        vec![
            "running VMs".into(),
            c.running_vcpus.to_string(),
            c.running_memory_mib.to_string(),
        ],
        vec![
            "all VMs".into(),
            c.defined_vcpus.to_string(),
            c.defined_memory_mib.to_string(),
        ],
        vec![
            "free".into(),
            c.free_vcpus.to_string(),
            c.free_memory_mib.to_string(),
        ],
    ]);
    println!();
    for d in &c.disks {
        println!(
            "disk {:<12} {:<40} {} GiB free of {}",
            d.role,
            d.path,
            d.free_bytes >> 30,
            d.total_bytes >> 30
        );
    }
    println!(
        "hypervisor      {} (max {} vCPUs per VM)",
        c.hypervisor, c.max_vcpus
    );
    println!(
        "cpu             {} {} ({} flags)",
        c.cpu_vendor,
        c.cpu_model,
        c.cpu_flags.len()
    );
    println!("cgroups         {}", c.cgroup_version);
    println!("drained         {}", c.drained);
}
