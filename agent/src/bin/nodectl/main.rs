//! nodectl: the operator's CLI for berth-agent, over the same socket a
//! controller uses. Tables for people, `--json` for scripts. Exit status:
//! 0 ok, 1 other error, 2 invalid argument, 3 not found, 4 wrong state,
//! 5 already exists, 6 does not fit, 7 agent unreachable, 8 a VMM or host
//! resource the agent needs is unavailable.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use berth_agent::server::spec_to_pb;
use berth_agent::spec::VmSpec;
use berth_proto::common::Empty;
use berth_proto::node::{Capacity, Event, NodeInfo, WatchRequest};
use berth_proto::node_ttrpc::NodeServiceClient;
use berth_proto::vm::{self as pb, VmState};
use berth_proto::vm_ttrpc::VmServiceClient;
use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};

mod image;
mod progress;

const DEFAULT_SOCKET: &str = "/run/berth/agent.sock";
const DETACH_KEY: u8 = 0x1d; // Ctrl-]

#[derive(Parser)]
#[command(
    name = "nodectl",
    version,
    about = "Operate the VMs of this node through berth-agent"
)]
struct Cli {
    /// The agent's socket.
    #[arg(long, global = true, env = "BERTH_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List VMs, optionally only those with every given label.
    List {
        #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Show one VM: spec and status.
    Show {
        id: String,
    },
    /// Define a VM from a spec file (TOML; see docs/agent.md).
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Start a VM, or with -l every VM with those labels.
    Start {
        id: Option<String>,
        #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Stop a VM, or with -l every VM with those labels.
    Stop {
        id: Option<String>,
        #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Kill at once instead of asking the guest to shut down.
        #[arg(long)]
        force: bool,
        /// Seconds the guest gets before it is killed.
        #[arg(long, default_value_t = 10)]
        timeout: u32,
    },
    Reboot {
        id: String,
    },
    /// Pause a VM, or with -l every VM with those labels.
    Pause {
        id: Option<String>,
        #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// Resume a VM, or with -l every VM with those labels.
    Resume {
        id: Option<String>,
        #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    Delete {
        id: String,
    },
    /// Attach to the console (detach with Ctrl-]), or print its log.
    Console {
        id: String,
        /// Print the log and keep following it (no input).
        #[arg(long)]
        follow: bool,
        /// Print the last N lines of the log and exit.
        #[arg(long)]
        tail: Option<usize>,
    },
    /// Snapshots of a VM: create (or hibernate), list, restore, delete.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotCmd,
    },
    /// Live-migrate a running VM to another node. --to is either the
    /// destination agent's socket (unix:///path or a path: nodectl prepares
    /// the destination itself) or the address a destination's
    /// `nodectl migrate-in` printed, with --token.
    Migrate {
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
    },
    /// Prepare this node to receive a VM (spec file as for create): prints
    /// the address and one-time token to give `nodectl migrate` on the source.
    MigrateIn {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(long)]
        listen: Option<String>,
        /// Seconds the token stays valid (default 60).
        #[arg(long)]
        ttl: Option<u64>,
        #[arg(long = "tap", value_name = "OLD=NEW")]
        taps: Vec<String>,
    },
    /// Show a VM's last migration.
    Migration {
        id: String,
    },
    /// Cancel an outgoing migration before its handover.
    MigrateCancel {
        id: String,
    },
    /// The node's image store: import, list, show, remove.
    Image {
        #[command(subcommand)]
        action: image::ImageCmd,
    },
    /// Stream the node's events.
    Events {
        /// Only this VM's events.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Replace a VM's spec from a file; on a running VM only cpu and
    /// memory policies may change, and they apply at once.
    Update {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// What each VM is entitled to and what it got, refreshed like top.
    Top {
        /// Print once and exit.
        #[arg(long)]
        once: bool,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1)]
        interval: u64,
    },
    /// What this node has and what its VMs hold.
    Capacity,
    /// Stop admitting new VM starts (running VMs continue).
    Drain,
    /// Admit VM starts again.
    Undrain,
    /// What this node is.
    Node,
    /// Print shell completions.
    Completions {
        shell: clap_complete::Shell,
    },
    /// Check this host (KVM, cgroups, tun, the VMs' bridges, disk space, the
    /// jail's uid range, berth-vmm) and say how to fix what is wrong; needs
    /// no running agent. Exit status 1 when a check fails.
    Doctor {
        /// The agent's config (default /etc/berth/agent.toml if present).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
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

fn snapshot_json(s: &pb::SnapshotInfo) -> Value {
    json!({
        "vm": s.vm_id, "name": s.name, "created_at_ms": s.created_at_ms, "disk_bytes": s.disk_bytes,
        "memory_bytes": s.memory_bytes, "pause_ms": s.pause_ms, "path": s.path,
    })
}

struct Failure {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

fn from_ttrpc(e: ttrpc::Error) -> Failure {
    match e {
        ttrpc::Error::RpcStatus(s) => {
            let code = match s.code() {
                ttrpc::Code::INVALID_ARGUMENT => 2,
                ttrpc::Code::NOT_FOUND => 3,
                ttrpc::Code::FAILED_PRECONDITION => 4,
                ttrpc::Code::ALREADY_EXISTS => 5,
                ttrpc::Code::RESOURCE_EXHAUSTED => 6,
                // The agent answered: what it could not reach is a VMM
                // or a host resource, not itself.
                ttrpc::Code::UNAVAILABLE => 8,
                _ => 1,
            };
            fail(code, s.message().to_string())
        }
        other => fail(7, format!("lost the agent: {other}")),
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(120_000_000_000)
}

fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::DEFINED => "Defined",
        VmState::STARTING => "Starting",
        VmState::RUNNING => "Running",
        VmState::PAUSED => "Paused",
        VmState::STOPPING => "Stopping",
        VmState::STOPPED => "Stopped",
        VmState::MIGRATING => "Migrating",
        VmState::CRASHED => "Crashed",
        VmState::MIGRATED => "Migrated",
        VmState::VM_STATE_UNSPECIFIED => "?",
    }
}

fn vm_json(vm: &pb::Vm) -> Value {
    let spec = vm.spec.clone().unwrap_or_default();
    let status = vm.status.clone().unwrap_or_default();
    let kernel = spec.kernel.clone().unwrap_or_default();
    let cpu = spec.cpu.clone().unwrap_or_default();
    json!({
        "id": spec.id,
        "name": spec.name,
        "labels": spec.labels,
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "kernel": {"path": kernel.path, "initrd": kernel.initrd, "cmdline": kernel.cmdline},
        "disks": spec.disks.iter().map(|d| json!({"path": d.path, "read_only": d.read_only, "serial": d.serial})).collect::<Vec<_>>(),
        "nics": spec.nics.iter().map(|n| json!({"tap": n.tap, "bridge": n.bridge, "mac": n.mac})).collect::<Vec<_>>(),
        "cpu": {"weight": cpu.weight, "max": cpu.max, "cpuset": cpu.cpuset},
        "state": state_name(status.state.enum_value_or_default()),
        "pid": status.pid,
        "started_at_ms": status.started_at_ms,
        "restarts": status.restarts,
        "last_exit": status.last_exit,
        "console_log": status.console_log,
        "migration": status.migration.as_ref().map(migration_json),
    })
}

fn migration_json(m: &pb::MigrationInfo) -> Value {
    json!({
        "id": m.id, "direction": m.direction, "phase": m.phase, "peer": m.peer,
        "started_at_ms": m.started_at_ms, "iteration": m.iteration,
        "bytes_sent": m.bytes_sent, "dirty_rate_bytes_per_s": m.dirty_rate_bytes_per_s,
        "remaining_bytes": m.remaining_bytes, "expected_downtime_ms": m.expected_downtime_ms,
        "downtime_ms": m.downtime_ms, "total_ms": m.total_ms,
        "memory_bytes": m.memory_bytes, "error": m.error,
    })
}

fn parse_taps(taps: &[String]) -> Result<HashMap<String, String>, Failure> {
    let mut out = HashMap::new();
    for t in taps {
        let (old, new) = t
            .split_once('=')
            .ok_or_else(|| fail(2, format!("--tap {t:?} is not OLD=NEW")))?;
        out.insert(old.to_string(), new.to_string());
    }
    Ok(out)
}

async fn connect_agent(socket: &std::path::Path) -> Result<ttrpc::r#async::Client, Failure> {
    let address = format!("unix://{}", socket.display());
    ttrpc::r#async::Client::connect(&address)
        .await
        .map_err(|e| {
            let text = e.to_string();
            let message = if text.contains("os error 13") {
                // The agent runs; the socket's mode (0660) keeps us out.
                format!(
                    "permission denied on {}: run as root or as a member of the agent's \
                     socket_group ({text})",
                    socket.display()
                )
            } else {
                format!(
                    "agent not running at {}: start berth-agent.service (or pass --socket) ({text})",
                    socket.display()
                )
            };
            fail(7, message)
        })
}

/// `--to` names a destination agent (its socket) rather than a VMM address.
fn agent_socket(to: &str) -> Option<PathBuf> {
    if let Some(path) = to.strip_prefix("unix://") {
        return Some(path.into());
    }
    let path = std::path::Path::new(to);
    (to.starts_with('/') || path.exists()).then(|| path.to_owned())
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
    let req = pb::VmRef {
        id: id.to_string(),
        ..Default::default()
    };
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

/// Widest a table cell is shown; longer values (labels, errors) are cut
/// with an ellipsis, and `--json` shows them whole.
const MAX_CELL_CHARS: usize = 60;

/// `cell` cut to `MAX_CELL_CHARS` characters, an ellipsis marking the cut.
fn fit_cell(cell: &str) -> String {
    if cell.chars().count() <= MAX_CELL_CHARS {
        return cell.to_string();
    }
    let mut cut: String = cell.chars().take(MAX_CELL_CHARS - 1).collect();
    cut.push('…');
    cut
}

fn print_table(rows: Vec<Vec<String>>) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| fit_cell(c)).collect())
        .collect();
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn print_vm(vm: &pb::Vm, json: bool) {
    if json {
        println!("{}", vm_json(vm));
        return;
    }
    let v = vm_json(vm);
    for (key, value) in v.as_object().unwrap() {
        println!(
            "{key:<14} {}",
            match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            }
        );
    }
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

enum Target {
    One(String),
    Group(HashMap<String, String>),
}

/// A VM id, or a label selector (-l): exactly one of them.
fn target(id: Option<String>, labels: &[String]) -> Result<Target, Failure> {
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
async fn group(
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
        let members: Vec<Value> = (reply.results.iter())
            .map(|r| {
                json!({"id": r.id, "ok": r.ok, "error": r.error,
                       "state": state_name(r.state.enum_value_or_default()),
                       "snapshot": r.snapshot.as_ref().map(snapshot_json)})
            })
            .collect();
        println!(
            "{}",
            json!({"results": members, "all_paused_at_ms": reply.all_paused_at_ms,
                   "resumed_at_ms": reply.resumed_at_ms})
        );
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

fn parse_labels(labels: &[String]) -> Result<HashMap<String, String>, Failure> {
    labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| fail(2, format!("label {l:?} is not KEY=VALUE")))
        })
        .collect()
}

async fn console(
    vms: &VmServiceClient,
    id: &str,
    follow: bool,
    tail: Option<usize>,
) -> Result<(), Failure> {
    let stream = vms.console(ctx()).await.map_err(from_ttrpc)?;
    let (tx, mut rx) = stream.split();
    tx.send(&pb::ConsoleChunk {
        id: id.to_string(),
        ..Default::default()
    })
    .await
    .map_err(from_ttrpc)?;
    if let Some(n) = tail {
        // The first answer carries the replayed log.
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .map_err(|_| fail(1, "no console data"))?
            .map_err(from_ttrpc)?;
        let text = String::from_utf8_lossy(&chunk.data);
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(n)..] {
            println!("{line}");
        }
        return Ok(());
    }
    let interactive = !follow;
    let raw = if interactive {
        RawTerminal::enter()
    } else {
        None
    };
    if interactive {
        eprintln!("[attached to {id}; detach with Ctrl-]]\r");
        let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let id = id.to_string();
        loop {
            tokio::select! {
                input = in_rx.recv() => {
                    let Some(data) = input else { break };
                    if let Some(pos) = data.iter().position(|&b| b == DETACH_KEY) {
                        if pos > 0 {
                            let _ = tx.send(&pb::ConsoleChunk { id: id.clone(), data: data[..pos].to_vec(), ..Default::default() }).await;
                        }
                        break;
                    }
                    if tx.send(&pb::ConsoleChunk { id: id.clone(), data, ..Default::default() }).await.is_err() {
                        break;
                    }
                }
                output = rx.recv() => {
                    match output {
                        Ok(chunk) => { let mut out = std::io::stdout(); let _ = out.write_all(&chunk.data); let _ = out.flush(); }
                        Err(_) => break,
                    }
                }
            }
        }
        drop(raw);
        eprintln!("\r\n[detached]");
    } else {
        while let Ok(chunk) = rx.recv().await {
            let mut out = std::io::stdout();
            let _ = out.write_all(&chunk.data);
            let _ = out.flush();
        }
    }
    Ok(())
}

/// The terminal in raw mode for an interactive console; restored on drop.
struct RawTerminal(nix::sys::termios::Termios);

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        let stdin = std::io::stdin();
        let saved = nix::sys::termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.0,
        );
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Cmd::Completions { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "nodectl",
            &mut std::io::stdout(),
        );
        return Ok(());
    }
    if let Cmd::Doctor { config } = &cli.command {
        return doctor(config.as_deref(), cli.json);
    }
    let client = connect_agent(&cli.socket).await?;
    if let Cmd::Image { action } = cli.command {
        let images = berth_proto::image_ttrpc::ImageServiceClient::new(client);
        return image::run(images, action, cli.json).await;
    }
    let vms = VmServiceClient::new(client.clone());
    let node = NodeServiceClient::new(client);
    let vm_ref = |id: &str| pb::VmRef {
        id: id.to_string(),
        ..Default::default()
    };
    let json = cli.json;
    let show = |vm: pb::Vm| print_vm(&vm, json);
    match cli.command {
        Cmd::List { labels } => {
            let req = pb::ListVmsRequest {
                labels: parse_labels(&labels)?,
                ..Default::default()
            };
            let list = vms.list(ctx(), &req).await.map_err(from_ttrpc)?;
            if json {
                println!("{}", Value::Array(list.vms.iter().map(vm_json).collect()));
            } else {
                let mut rows = vec![["ID", "NAME", "STATE", "VCPUS", "MEMORY", "PID", "LABELS"]
                    .map(String::from)
                    .to_vec()];
                for vm in &list.vms {
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
            }
        }
        Cmd::Show { id } => show(vms.get(ctx(), &vm_ref(&id)).await.map_err(from_ttrpc)?),
        Cmd::Create { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| fail(2, format!("cannot read {}: {e}", file.display())))?;
            let spec: VmSpec =
                toml::from_str(&text).map_err(|e| fail(2, format!("{}: {e}", file.display())))?;
            let req = pb::CreateVmRequest {
                spec: protobuf::MessageField::some(spec_to_pb(&spec)),
                ..Default::default()
            };
            show(vms.create(ctx(), &req).await.map_err(from_ttrpc)?);
        }
        Cmd::Start { id, labels } => match target(id, &labels)? {
            Target::One(id) => show(vms.start(ctx(), &vm_ref(&id)).await.map_err(from_ttrpc)?),
            Target::Group(selector) => {
                group(&vms, selector, pb::GroupAction::GROUP_START, json, |_| {}).await?
            }
        },
        Cmd::Stop {
            id,
            labels,
            force,
            timeout,
        } => match target(id, &labels)? {
            Target::One(id) => {
                let req = pb::StopVmRequest {
                    id,
                    force,
                    timeout_ms: timeout.saturating_mul(1000),
                    ..Default::default()
                };
                show(vms.stop(ctx(), &req).await.map_err(from_ttrpc)?);
            }
            Target::Group(selector) => {
                let set = |r: &mut pb::GroupActionRequest| {
                    r.force = force;
                    r.timeout_ms = timeout.saturating_mul(1000);
                };
                group(&vms, selector, pb::GroupAction::GROUP_STOP, json, set).await?
            }
        },
        Cmd::Reboot { id } => show(vms.reboot(ctx(), &vm_ref(&id)).await.map_err(from_ttrpc)?),
        Cmd::Pause { id, labels } => match target(id, &labels)? {
            Target::One(id) => show(vms.pause(ctx(), &vm_ref(&id)).await.map_err(from_ttrpc)?),
            Target::Group(selector) => {
                group(&vms, selector, pb::GroupAction::GROUP_PAUSE, json, |_| {}).await?
            }
        },
        Cmd::Resume { id, labels } => match target(id, &labels)? {
            Target::One(id) => show(vms.resume(ctx(), &vm_ref(&id)).await.map_err(from_ttrpc)?),
            Target::Group(selector) => {
                group(&vms, selector, pb::GroupAction::GROUP_RESUME, json, |_| {}).await?
            }
        },
        Cmd::Delete { id } => {
            vms.delete(ctx(), &vm_ref(&id)).await.map_err(from_ttrpc)?;
            if json {
                println!("{}", json!({"deleted": id}));
            } else {
                println!("deleted {id}");
            }
        }
        Cmd::Console { id, follow, tail } => console(&vms, &id, follow, tail).await?,
        Cmd::Snapshot { action } => match action {
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
                        return group(&vms, selector, action, json, set).await;
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
                let info = snapshot_with_progress(&vms, &req, json).await?;
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
            }
            SnapshotCmd::List { id } => {
                let list = vms
                    .list_snapshots(ctx(), &vm_ref(&id))
                    .await
                    .map_err(from_ttrpc)?;
                if json {
                    println!(
                        "{}",
                        Value::Array(list.snapshots.iter().map(snapshot_json).collect())
                    );
                } else {
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
                }
            }
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
                show(vms.restore(ctx(), &req).await.map_err(from_ttrpc)?);
            }
            SnapshotCmd::Delete { id, name } => {
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
            }
        },
        Cmd::Migrate {
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
        } => {
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
            } else {
                follow_migration(&vms, &id, json).await?;
            }
        }
        Cmd::MigrateIn {
            file,
            listen,
            ttl,
            taps,
        } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| fail(2, format!("cannot read {}: {e}", file.display())))?;
            let spec: VmSpec =
                toml::from_str(&text).map_err(|e| fail(2, format!("{}: {e}", file.display())))?;
            let req = pb::PrepareMigrateInRequest {
                spec: protobuf::MessageField::some(spec_to_pb(&spec)),
                listen_address: listen.unwrap_or_default(),
                token_ttl_ms: ttl.unwrap_or(0).saturating_mul(1000),
                tap_overrides: parse_taps(&taps)?,
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
        }
        Cmd::Migration { id } => {
            let m = vms
                .get_migration(ctx(), &vm_ref(&id))
                .await
                .map_err(from_ttrpc)?;
            if json {
                println!("{}", migration_json(&m));
            } else {
                println!("{} {} {}: {}", id, m.direction, m.peer, progress_bar(&m));
                if !m.error.is_empty() {
                    println!("error: {}", m.error);
                }
                if m.downtime_ms > 0 {
                    println!("downtime {} ms, total {} ms", m.downtime_ms, m.total_ms);
                }
            }
        }
        Cmd::MigrateCancel { id } => {
            let m = vms
                .cancel_migration(ctx(), &vm_ref(&id))
                .await
                .map_err(from_ttrpc)?;
            if json {
                println!("{}", migration_json(&m));
            } else {
                println!("cancelling the migration of {id} ({})", m.phase);
            }
        }
        Cmd::Events { vm } => {
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
        }
        Cmd::Update { file } => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| fail(2, format!("cannot read {}: {e}", file.display())))?;
            let spec: VmSpec =
                toml::from_str(&text).map_err(|e| fail(2, format!("{}: {e}", file.display())))?;
            let req = pb::UpdateVmRequest {
                spec: protobuf::MessageField::some(spec_to_pb(&spec)),
                ..Default::default()
            };
            show(vms.update(ctx(), &req).await.map_err(from_ttrpc)?);
        }
        Cmd::Top { once, interval } => {
            let mut io = IoRates::default();
            loop {
                let list = vms
                    .list(ctx(), &pb::ListVmsRequest::default())
                    .await
                    .map_err(from_ttrpc)?;
                let mut stats = Vec::new();
                for vm in &list.vms {
                    stats.push(
                        vms.stats(ctx(), &vm_ref(&vm.spec.id))
                            .await
                            .map_err(from_ttrpc)?,
                    );
                }
                io.update(&stats);
                print_top(&stats, &io, json, !once);
                if once {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_secs(interval.max(1))).await;
            }
        }
        Cmd::Drain => print_capacity(
            &node
                .drain(ctx(), &Empty::default())
                .await
                .map_err(from_ttrpc)?,
            json,
        ),
        Cmd::Undrain => print_capacity(
            &node
                .undrain(ctx(), &Empty::default())
                .await
                .map_err(from_ttrpc)?,
            json,
        ),
        Cmd::Capacity => print_capacity(
            &node
                .get_capacity(ctx(), &Empty::default())
                .await
                .map_err(from_ttrpc)?,
            json,
        ),
        Cmd::Node => print_node(
            &node
                .get_node(ctx(), &Empty::default())
                .await
                .map_err(from_ttrpc)?,
            json,
        ),
        Cmd::Completions { .. } | Cmd::Doctor { .. } | Cmd::Image { .. } => {
            unreachable!("handled before connecting")
        }
    }
    Ok(())
}

fn doctor(config: Option<&std::path::Path>, json: bool) -> Result<(), Failure> {
    use berth_agent::config::AgentConfig;
    use berth_agent::doctor::{self, Verdict};
    let default = std::path::Path::new("/etc/berth/agent.toml");
    let config = match config {
        Some(path) => AgentConfig::load(path).map_err(|e| fail(2, e.to_string()))?,
        None if default.exists() => {
            AgentConfig::load(default).map_err(|e| fail(2, e.to_string()))?
        }
        None => AgentConfig::default(),
    };
    let findings = doctor::run(&config, &doctor::Host::default());
    if json {
        let list: Vec<Value> = findings
            .iter()
            .map(|f| json!({"check": f.check, "verdict": f.verdict.name(), "detail": f.detail, "fix": f.fix}))
            .collect();
        println!("{}", Value::Array(list));
    } else {
        use std::io::IsTerminal;
        let colour = std::io::stdout().is_terminal();
        for f in &findings {
            let (start, end) = match (colour, f.verdict) {
                (false, _) => ("", ""),
                (true, Verdict::Ok) => ("\x1b[32m", "\x1b[0m"),
                (true, Verdict::Warn) => ("\x1b[33m", "\x1b[0m"),
                (true, Verdict::Fail) => ("\x1b[1;31m", "\x1b[0m"),
            };
            println!(
                "{start}{:<4}{end} {:<9} {}",
                f.verdict.name(),
                f.check,
                f.detail
            );
            if !f.fix.is_empty() {
                println!("{:<14} fix: {}", "", f.fix);
            }
        }
    }
    let failed = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Fail)
        .count();
    if failed > 0 {
        return Err(fail(
            1,
            format!("doctor: {failed} check(s) failed; see the fixes above"),
        ));
    }
    Ok(())
}

fn print_event(e: &Event, json: bool) {
    let state = state_name(e.state.enum_value_or_default());
    if json {
        println!(
            "{}",
            json!({"at_ms": e.at_ms, "vm": e.vm_id, "kind": e.kind, "state": state, "message": e.message})
        );
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

/// The ANSI colour of a state on a terminal: green runs, yellow is on its
/// way or paused, red failed, plain otherwise.
fn state_colour(state: &str) -> &'static str {
    match state {
        "Running" => "\x1b[32m",
        "Starting" | "Stopping" | "Paused" | "Migrating" => "\x1b[33m",
        "Crashed" => "\x1b[1;31m",
        _ => "\x1b[0m",
    }
}

fn print_capacity(c: &Capacity, json: bool) {
    let disks: Vec<Value> = c
        .disks
        .iter()
        .map(|d| json!({"role": d.role, "path": d.path, "total_bytes": d.total_bytes, "free_bytes": d.free_bytes}))
        .collect();
    let v = json!({
        "cpus": c.cpus, "memory_mib": c.memory_mib,
        "reserved_cpus": c.reserved_cpus, "reserved_memory_mib": c.reserved_memory_mib,
        "cpu_overcommit": c.cpu_overcommit, "memory_overcommit": c.memory_overcommit,
        "allocatable_vcpus": c.allocatable_vcpus, "allocatable_memory_mib": c.allocatable_memory_mib,
        "running_vcpus": c.running_vcpus, "running_memory_mib": c.running_memory_mib,
        "defined_vcpus": c.defined_vcpus, "defined_memory_mib": c.defined_memory_mib,
        "free_vcpus": c.free_vcpus, "free_memory_mib": c.free_memory_mib,
        "disks": disks, "max_vcpus": c.max_vcpus, "hypervisor": c.hypervisor,
        "cpu_vendor": c.cpu_vendor, "cpu_model": c.cpu_model, "cpu_flags": c.cpu_flags,
        "cgroup_version": c.cgroup_version, "drained": c.drained, "reserve_on_define": c.reserve_on_define,
    });
    if json {
        println!("{v}");
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

/// Disk and network bytes per second of each VM, from two readings of its
/// device counters (none until the second reading).
#[derive(Default)]
struct IoRates {
    last: HashMap<String, (u64, u64, std::time::Instant)>,
    rates: HashMap<String, (f64, f64)>,
}

impl IoRates {
    fn update(&mut self, stats: &[pb::VmStats]) {
        let now = std::time::Instant::now();
        for s in stats {
            let (disk, rx, tx) = berth_agent::usage::io_totals(&s.devices);
            let net = rx + tx;
            if let Some((d0, n0, t0)) = self.last.get(&s.id) {
                let secs = now.duration_since(*t0).as_secs_f64().max(1e-3);
                let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
                self.rates
                    .insert(s.id.clone(), (rate(*d0, disk), rate(*n0, net)));
            }
            self.last.insert(s.id.clone(), (disk, net, now));
        }
    }

    fn cell(&self, id: &str, pick: fn(&(f64, f64)) -> f64) -> String {
        self.rates
            .get(id)
            .map(|r| format!("{:.1}", pick(r) / f64::from(1 << 20)))
            .unwrap_or_else(|| "-".into())
    }
}

fn print_top(stats: &[pb::VmStats], io: &IoRates, json: bool, refresh: bool) {
    if json {
        let rows: Vec<Value> = stats
            .iter()
            .map(|s| {
                json!({
                    "id": s.id, "state": state_name(s.state.enum_value_or_default()),
                    "vcpus": s.vcpus, "cpu_weight": s.cpu_weight, "cpu_max": s.cpu_max, "cpuset": s.cpuset,
                    "cpu_fair_share": s.cpu_fair_share, "cpu_used": s.cpu_used, "cpu_wait": s.cpu_wait,
                    "throttled": s.throttled, "throttled_periods": s.throttled_periods, "periods": s.periods,
                    "memory_mib": s.memory_mib, "memory_resident_bytes": s.memory_resident_bytes,
                    "memory_limit_bytes": s.memory_limit_bytes, "interval_ms": s.interval_ms,
                    "breaches": s.breaches, "exits": s.exits,
                    "devices": s.devices.iter().map(|d| json!({
                        "device": d.device, "direction": d.direction, "bytes": d.bytes,
                        "ops": d.ops, "throttled_ns": d.throttled_ns,
                    })).collect::<Vec<_>>(),
                    "usage": s.usage.as_ref().map(|u| json!({
                        "cpu_seconds": u.cpu_seconds, "memory_gib_hours": u.memory_gib_hours,
                        "disk_bytes": u.disk_bytes, "net_rx_bytes": u.net_rx_bytes,
                        "net_tx_bytes": u.net_tx_bytes, "running_seconds": u.running_seconds,
                        "since_ms": u.since_ms, "breaches": u.breaches,
                    })),
                })
            })
            .collect();
        println!("{}", Value::Array(rows));
        return;
    }
    if refresh {
        print!("\x1b[H\x1b[2J");
    }
    let mut rows = vec![[
        "ID",
        "STATE",
        "VCPUS",
        "WEIGHT",
        "MAX",
        "SHARE",
        "CPU",
        "WAIT",
        "THROTTLED",
        "MEM MiB",
        "LIMIT MiB",
        "DISK MiB/s",
        "NET MiB/s",
        "BREACHES",
    ]
    .map(String::from)
    .to_vec()];
    for s in stats {
        rows.push(vec![
            s.id.clone(),
            state_name(s.state.enum_value_or_default()).into(),
            s.vcpus.to_string(),
            s.cpu_weight.to_string(),
            if s.cpu_max > 0.0 {
                format!("{:.2}", s.cpu_max)
            } else {
                "-".into()
            },
            format!("{:.2}", s.cpu_fair_share),
            format!("{:.2}", s.cpu_used),
            format!("{:.0}%", s.cpu_wait * 100.0),
            format!("{}/{}", s.throttled_periods, s.periods),
            (s.memory_resident_bytes >> 20).to_string(),
            (s.memory_limit_bytes >> 20).to_string(),
            io.cell(&s.id, |r| r.0),
            io.cell(&s.id, |r| r.1),
            s.breaches.join("; "),
        ]);
    }
    print_table(rows);
    let _ = std::io::stdout().flush();
}

fn print_node(n: &NodeInfo, json: bool) {
    let v = json!({
        "hostname": n.hostname, "agent_version": n.agent_version, "api_version": n.api_version,
        "hypervisor": n.hypervisor, "kvm_module": n.kvm_module, "max_vcpus": n.max_vcpus,
        "features": n.features, "kernel_release": n.kernel_release, "quarantined": n.quarantined,
    });
    if json {
        println!("{v}");
    } else {
        for (key, value) in v.as_object().unwrap() {
            println!(
                "{key:<15} {}",
                match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                }
            );
        }
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

#[cfg(test)]
mod table_tests {
    use super::*;

    #[test]
    fn long_cells_are_cut_with_an_ellipsis() {
        assert_eq!(fit_cell("short"), "short");
        let long = "é".repeat(100_000);
        let cut = fit_cell(&long);
        assert_eq!(cut.chars().count(), MAX_CELL_CHARS);
        assert!(cut.ends_with('…'));
        let exact = "x".repeat(MAX_CELL_CHARS);
        assert_eq!(fit_cell(&exact), exact);
    }
}
