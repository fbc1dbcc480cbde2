//! nodectl: the operator's CLI for berth-agent, over the same socket a
//! controller uses. Tables for people, `--json` for scripts. Exit status:
//! 0 ok, 1 other error, 2 invalid argument, 3 not found, 4 wrong state,
//! 5 already exists, 6 does not fit, 7 agent unreachable.

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
    Start {
        id: String,
    },
    Stop {
        id: String,
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
    Pause {
        id: String,
    },
    Resume {
        id: String,
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
    /// Stream the node's events.
    Events {
        /// Only this VM's events.
        #[arg(long)]
        vm: Option<String>,
    },
    /// What this node has and what its VMs hold.
    Capacity,
    /// What this node is.
    Node,
    /// Print shell completions.
    Completions {
        shell: clap_complete::Shell,
    },
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
                ttrpc::Code::UNAVAILABLE => 7,
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
    })
}

fn print_table(rows: Vec<Vec<String>>) {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
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
    let address = format!("unix://{}", cli.socket.display());
    let client = ttrpc::r#async::Client::connect(&address)
        .await
        .map_err(|e| {
            fail(
                7,
                format!(
                    "agent not running at {}: start berth-agent.service (or pass --socket) ({e})",
                    cli.socket.display()
                ),
            )
        })?;
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
        Cmd::Start { id } => show(vms.start(ctx(), &vm_ref(&id)).await.map_err(from_ttrpc)?),
        Cmd::Stop { id, force, timeout } => {
            let req = pb::StopVmRequest {
                id,
                force,
                timeout_ms: timeout.saturating_mul(1000),
                ..Default::default()
            };
            show(vms.stop(ctx(), &req).await.map_err(from_ttrpc)?);
        }
        Cmd::Reboot { id } => show(vms.reboot(ctx(), &vm_ref(&id)).await.map_err(from_ttrpc)?),
        Cmd::Pause { id } => show(vms.pause(ctx(), &vm_ref(&id)).await.map_err(from_ttrpc)?),
        Cmd::Resume { id } => show(vms.resume(ctx(), &vm_ref(&id)).await.map_err(from_ttrpc)?),
        Cmd::Delete { id } => {
            vms.delete(ctx(), &vm_ref(&id)).await.map_err(from_ttrpc)?;
            if json {
                println!("{}", json!({"deleted": id}));
            } else {
                println!("deleted {id}");
            }
        }
        Cmd::Console { id, follow, tail } => console(&vms, &id, follow, tail).await?,
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
        Cmd::Completions { .. } => unreachable!("handled before connecting"),
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
        println!("{} {} {} {} {}", e.at_ms, e.vm_id, e.kind, state, e.message);
    }
    let _ = std::io::stdout().flush();
}

fn print_capacity(c: &Capacity, json: bool) {
    let v = json!({
        "cpus": c.cpus, "memory_mib": c.memory_mib,
        "running_vcpus": c.running_vcpus, "running_memory_mib": c.running_memory_mib,
        "defined_vcpus": c.defined_vcpus, "defined_memory_mib": c.defined_memory_mib,
    });
    if json {
        println!("{v}");
    } else {
        print_table(vec![
            ["", "CPUS", "MEMORY MiB"].map(String::from).to_vec(),
            vec!["host".into(), c.cpus.to_string(), c.memory_mib.to_string()],
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
        ]);
    }
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
