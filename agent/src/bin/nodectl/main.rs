//! nodectl: the operator's CLI for berth-agent, over the same socket a
//! controller uses. Tables for people, `--json` for scripts. Exit status:
//! 0 ok, 1 other error, 2 invalid argument, 3 not found, 4 wrong state,
//! 5 already exists, 6 does not fit, 7 agent unreachable, 8 a VMM or host
//! resource the agent needs is unavailable.
//!
//! This file parses the command line (`cli.rs`) and hands each command to
//! the file of its resource; `render/` draws tables and JSON.

use std::process::ExitCode;

use berth_proto::image_ttrpc::ImageServiceClient;
use berth_proto::node_ttrpc::NodeServiceClient;
use berth_proto::vm_ttrpc::VmServiceClient;
use clap::{CommandFactory, Parser};

mod agent;
mod args;
mod cli;
mod console;
mod doctor;
mod failure;
mod group;
mod image;
mod migrate;
mod node;
mod progress;
mod render;
mod snapshot;
mod top;
mod vm;

use cli::{Cli, Cmd};
use failure::{fail, Failure};

async fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.json;
    // Completions and doctor need no agent; every other command starts by
    // connecting to it.
    let client = match &cli.command {
        Cmd::Completions { shell } => {
            let out = &mut std::io::stdout();
            clap_complete::generate(*shell, &mut Cli::command(), "nodectl", out);
            return Ok(());
        }
        Cmd::Doctor { config } => return doctor::run(config.as_deref(), json),
        _ => agent::connect_agent(&cli.socket).await?,
    };
    let vms = VmServiceClient::new(client.clone());
    let node = NodeServiceClient::new(client.clone());
    match cli.command {
        Cmd::List { labels } => vm::list(&vms, &labels, json).await,
        Cmd::Show { id } => vm::show(&vms, &id, json).await,
        Cmd::Create { file } => vm::create(&vms, &file, json).await,
        Cmd::Update { file } => vm::update(&vms, &file, json).await,
        Cmd::Start { id, labels } => vm::simple(&vms, vm::Simple::Start, id, &labels, json).await,
        Cmd::Stop(args) => vm::stop(&vms, args, json).await,
        Cmd::Reboot { id } => vm::reboot(&vms, &id, json).await,
        Cmd::Pause { id, labels } => vm::simple(&vms, vm::Simple::Pause, id, &labels, json).await,
        Cmd::Resume { id, labels } => vm::simple(&vms, vm::Simple::Resume, id, &labels, json).await,
        Cmd::Delete { id } => vm::delete(&vms, &id, json).await,
        Cmd::Console { id, follow, tail } => console::run(&vms, &id, follow, tail).await,
        Cmd::Snapshot { action } => snapshot::run(&vms, action, json).await,
        Cmd::Migrate(args) => migrate::migrate(&vms, args, json).await,
        Cmd::MigrateIn(args) => migrate::migrate_in(&vms, args, json).await,
        Cmd::Migration { id } => migrate::show(&vms, &id, json).await,
        Cmd::MigrateCancel { id } => migrate::cancel(&vms, &id, json).await,
        Cmd::Image { action } => image::run(ImageServiceClient::new(client), action, json).await,
        Cmd::Events { vm } => node::events(&node, vm, json).await,
        Cmd::Top { once, interval } => top::run(&vms, once, interval, json).await,
        Cmd::Capacity => node::capacity(&node, json).await,
        Cmd::Drain => node::drain(&node, json).await,
        Cmd::Undrain => node::undrain(&node, json).await,
        Cmd::Node => node::show(&node, json).await,
        Cmd::Completions { .. } | Cmd::Doctor { .. } => unreachable!("handled before connecting"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(run(cli)),
        Err(e) => Err(fail(1, e.to_string())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("nodectl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
