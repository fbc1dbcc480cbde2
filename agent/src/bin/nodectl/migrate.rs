//! Live migration: `migrate` (out of this node, preparing the destination
//! agent itself when --to names its socket), `migrate-in` (prepare this node
//! by hand), `migration` (the last one's progress) and `migrate-cancel`.

use std::path::{Path, PathBuf};

use berth_agent::server::spec_to_pb;
use berth_proto::vm::{self as pb, VmState};
use berth_proto::vm_ttrpc::VmServiceClient;
use clap::Args;
use serde_json::json;

use crate::agent::{connect_agent, ctx};
use crate::args::{parse_taps, read_spec};
use crate::failure::{fail, from_ttrpc, Failure};
use crate::render::json::migration_json;
use crate::vm::vm_ref;

// The flags of `nodectl migrate` (its help is on `Cmd::Migrate`).
#[derive(Args)]
pub struct MigrateArgs {
    id: String,
    #[arg(long)]
    to: String,
    #[arg(long, env = "BERTH_MIGRATE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Downtime target in ms (default 50).
    #[arg(long)]
    downtime_ms: Option<u64>,
    /// Bandwidth limit in MiB/s (default unlimited).
    #[arg(long)]
    bandwidth: Option<u64>,
    /// Give up after this many seconds (default 300).
    #[arg(long)]
    timeout: Option<u64>,
    /// At the timeout, switch over anyway instead of giving up.
    #[arg(long)]
    force: bool,
    /// With a destination agent: where its VMM listens (host or host:port).
    #[arg(long)]
    listen: Option<String>,
    /// With a destination agent: attach the NIC on tap OLD to tap NEW there.
    #[arg(long = "tap", value_name = "OLD=NEW")]
    taps: Vec<String>,
    /// Return once the migration started instead of showing its progress.
    #[arg(long)]
    no_wait: bool,
}

// The flags of `nodectl migrate-in` (its help is on `Cmd::MigrateIn`).
#[derive(Args)]
pub struct MigrateInArgs {
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    #[arg(long)]
    listen: Option<String>,
    /// Seconds the token stays valid (default 60).
    #[arg(long)]
    ttl: Option<u64>,
    #[arg(long = "tap", value_name = "OLD=NEW")]
    taps: Vec<String>,
}

pub async fn migrate(vms: &VmServiceClient, args: MigrateArgs, json: bool) -> Result<(), Failure> {
    let MigrateArgs {
        id,
        to,
        token,
        downtime_ms,
        bandwidth,
        timeout,
        force,
        listen,
        taps,
        no_wait,
    } = args;
    let (address, token) = match (agent_socket(&to), token) {
        (Some(socket), _) => {
            let vm = vms.get(ctx(), &vm_ref(&id)).await.map_err(from_ttrpc)?;
            let dest = VmServiceClient::new(connect_agent(&socket).await?);
            let req = pb::PrepareMigrateInRequest {
                spec: vm.spec.clone(),
                listen_address: listen.unwrap_or_default(),
                tap_overrides: parse_taps(&taps)?,
                ..Default::default()
            };
            let prepared = dest
                .prepare_migrate_in(ctx(), &req)
                .await
                .map_err(from_ttrpc)?;
            (prepared.address, prepared.token)
        }
        (None, Some(token)) => (to, token),
        (None, None) => {
            return Err(fail(
                2,
                "--to is a VMM address: pass the --token the destination's `nodectl migrate-in` printed",
            ))
        }
    };
    let req = pb::MigrateOutRequest {
        id: id.clone(),
        address,
        token,
        params: protobuf::MessageField::some(pb::MigrationParams {
            downtime_ms: downtime_ms.unwrap_or(0),
            bandwidth_mib_s: bandwidth.unwrap_or(0),
            timeout_ms: timeout.unwrap_or(0).saturating_mul(1000),
            force_on_timeout: force,
            ..Default::default()
        }),
        ..Default::default()
    };
    let started = vms.migrate_out(ctx(), &req).await.map_err(from_ttrpc)?;
    if no_wait {
        if json {
            println!("{}", migration_json(&started));
        } else {
            println!("migrating {id} to {}", started.peer);
        }
        return Ok(());
    }
    follow_migration(vms, &id, json).await
}

/// `--to` names a destination agent (its socket) rather than a VMM address.
fn agent_socket(to: &str) -> Option<PathBuf> {
    if let Some(path) = to.strip_prefix("unix://") {
        return Some(path.into());
    }
    let path = Path::new(to);
    (to.starts_with('/') || path.exists()).then(|| path.to_owned())
}

/// Prepares this node to receive a VM; prints the address and one-time
/// token to give `nodectl migrate` on the source.
pub async fn migrate_in(
    vms: &VmServiceClient,
    args: MigrateInArgs,
    json: bool,
) -> Result<(), Failure> {
    let spec = read_spec(&args.file)?;
    let req = pb::PrepareMigrateInRequest {
        spec: protobuf::MessageField::some(spec_to_pb(&spec)),
        listen_address: args.listen.unwrap_or_default(),
        token_ttl_ms: args.ttl.unwrap_or(0).saturating_mul(1000),
        tap_overrides: parse_taps(&args.taps)?,
        ..Default::default()
    };
    let p = vms
        .prepare_migrate_in(ctx(), &req)
        .await
        .map_err(from_ttrpc)?;
    if json {
        println!(
            "{}",
            json!({"id": spec.id, "address": p.address, "token": p.token, "expires_at_ms": p.expires_at_ms})
        );
    } else {
        println!("address {}", p.address);
        println!("token   {}", p.token);
        println!(
            "on the source: nodectl migrate {} --to {} --token <token>",
            spec.id, p.address
        );
    }
    Ok(())
}

/// A VM's last migration.
pub async fn show(vms: &VmServiceClient, id: &str, json: bool) -> Result<(), Failure> {
    let m = vms
        .get_migration(ctx(), &vm_ref(id))
        .await
        .map_err(from_ttrpc)?;
    if json {
        println!("{}", migration_json(&m));
        return Ok(());
    }
    println!("{} {} {}: {}", id, m.direction, m.peer, progress_bar(&m));
    if !m.error.is_empty() {
        println!("error: {}", m.error);
    }
    if m.downtime_ms > 0 {
        println!("downtime {} ms, total {} ms", m.downtime_ms, m.total_ms);
    }
    Ok(())
}

pub async fn cancel(vms: &VmServiceClient, id: &str, json: bool) -> Result<(), Failure> {
    let m = vms
        .cancel_migration(ctx(), &vm_ref(id))
        .await
        .map_err(from_ttrpc)?;
    if json {
        println!("{}", migration_json(&m));
    } else {
        println!("cancelling the migration of {id} ({})", m.phase);
    }
    Ok(())
}

/// A one-line progress bar: the share of memory no longer dirty.
fn progress_bar(m: &pb::MigrationInfo) -> String {
    let done = if m.memory_bytes == 0 {
        0.0
    } else {
        1.0 - (m.remaining_bytes as f64 / m.memory_bytes as f64).clamp(0.0, 1.0)
    };
    let filled = (done * 30.0).round() as usize;
    format!(
        "[{}{}] {:>3.0}% {:<10} pass {:<2} sent {:>6} MiB  left {:>5} MiB  dirty {:>4} MiB/s  est. downtime {} ms",
        "#".repeat(filled),
        ".".repeat(30 - filled),
        done * 100.0,
        m.phase,
        m.iteration,
        m.bytes_sent >> 20,
        m.remaining_bytes >> 20,
        m.dirty_rate_bytes_per_s >> 20,
        m.expected_downtime_ms
    )
}

/// Polls until the migration ends, drawing its progress on stderr.
async fn follow_migration(vms: &VmServiceClient, id: &str, json: bool) -> Result<(), Failure> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last_line = String::new();
    let req = vm_ref(id);
    loop {
        let m = vms.get_migration(ctx(), &req).await.map_err(from_ttrpc)?;
        let line = progress_bar(&m);
        if line != last_line && !json {
            if tty {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
            last_line = line;
        }
        // The agent reports the end once its VM's state has settled.
        let vm = vms.get(ctx(), &req).await.map_err(from_ttrpc)?;
        let state = vm.status.state.enum_value_or_default();
        let settled = matches!(
            m.phase.as_str(),
            "completed" | "failed" | "cancelled" | "unknown"
        ) && state != VmState::MIGRATING;
        if settled {
            if tty && !json {
                eprintln!();
            }
            if json {
                println!("{}", migration_json(&m));
            }
            return match m.phase.as_str() {
                "completed" => {
                    if !json {
                        println!(
                            "migrated {id} to {}: downtime {} ms, total {} ms, {} passes, {} MiB sent",
                            m.peer,
                            m.downtime_ms,
                            m.total_ms,
                            m.iteration,
                            m.bytes_sent >> 20
                        );
                    }
                    Ok(())
                }
                "unknown" => Err(fail(
                    1,
                    format!(
                        "migration of {id} to {}: outcome unknown ({}); {id} is paused here: check the destination before resuming it",
                        m.peer, m.error
                    ),
                )),
                phase => Err(fail(
                    4,
                    format!("migration of {id} to {} {phase}: {}; it runs here", m.peer, m.error),
                )),
            };
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
