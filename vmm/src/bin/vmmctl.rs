//! vmmctl: talks to one berth-vmm's control socket (the internal
//! VmmService) for operators debugging a VM and for tests where no agent
//! runs: info, pause, resume, shutdown, stop, snapshot, migrate.

use std::path::PathBuf;
use std::process::ExitCode;

use berth_proto::common::Empty;
use berth_proto::vmm::{MigrateRequest, SnapshotRequest};
use berth_proto::vmm_ttrpc::VmmServiceClient;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vmmctl",
    version,
    about = "Control one berth-vmm through its API socket"
)]
struct Args {
    /// The VMM's --api-socket.
    #[arg(long)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Info,
    Pause,
    Resume,
    /// Ask the guest to shut down (Ctrl-Alt-Del).
    Shutdown,
    /// End the VMM now.
    Stop,
    /// Write a snapshot directory.
    Snapshot {
        #[arg(long)]
        dir: PathBuf,
        /// Only the pages written since this VMM's last snapshot.
        #[arg(long)]
        diff: bool,
        /// Copy memory while the guest runs.
        #[arg(long)]
        live: bool,
        /// Let the guest run on afterwards.
        #[arg(long)]
        resume: bool,
    },
    /// Live-migrate to a berth-vmm started with --migrate-listen; waits
    /// until it ends and prints the figures.
    Migrate {
        /// host:port the destination listens on.
        #[arg(long)]
        to: String,
        #[arg(long, env = "BERTH_MIGRATE_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(long, default_value_t = 0)]
        downtime_ms: u64,
        /// MiB/s; 0 is unlimited.
        #[arg(long, default_value_t = 0)]
        bandwidth: u64,
    },
}

async fn run(args: Args) -> Result<String, String> {
    let address = format!("unix://{}", args.socket.display());
    let client = ttrpc::r#async::Client::connect(&address)
        .await
        .map_err(|e| format!("cannot reach the VMM at {}: {e}", args.socket.display()))?;
    let c = VmmServiceClient::new(client);
    let ctx = || ttrpc::context::with_timeout(600_000_000_000);
    let e = Empty::default();
    let show = |i: berth_proto::vmm::VmmInfo| {
        format!(
            "pid {} {} ({} vCPUs, {} MiB)",
            i.pid, i.state, i.vcpus, i.memory_mib
        )
    };
    let out = match args.command {
        Cmd::Info => show(c.info(ctx(), &e).await.map_err(|e| e.to_string())?),
        Cmd::Pause => show(c.pause(ctx(), &e).await.map_err(|e| e.to_string())?),
        Cmd::Resume => show(c.resume(ctx(), &e).await.map_err(|e| e.to_string())?),
        Cmd::Shutdown => c
            .shutdown(ctx(), &e)
            .await
            .map(|_| "asked the guest to shut down".into())
            .map_err(|e| e.to_string())?,
        Cmd::Stop => c
            .stop(ctx(), &e)
            .await
            .map(|_| "stopped".into())
            .map_err(|e| e.to_string())?,
        Cmd::Snapshot {
            dir,
            diff,
            live,
            resume,
        } => {
            let req = SnapshotRequest {
                dir: dir.display().to_string(),
                kind: if diff { "diff" } else { "full" }.into(),
                live,
                resume,
                ..Default::default()
            };
            let r = c.snapshot(ctx(), &req).await.map_err(|e| e.to_string())?;
            format!(
                "snapshot {}: {} pages in {} passes, guest paused {} ms",
                dir.display(),
                r.pages_written,
                r.iterations,
                r.pause_ms
            )
        }
        Cmd::Migrate {
            to,
            token,
            downtime_ms,
            bandwidth,
        } => {
            let req = MigrateRequest {
                address: to.clone(),
                token,
                downtime_ms,
                bandwidth_bytes_per_s: bandwidth << 20,
                ..Default::default()
            };
            c.migrate_out(ctx(), &req)
                .await
                .map_err(|e| e.to_string())?;
            loop {
                let s = c
                    .get_migration(ctx(), &e)
                    .await
                    .map_err(|e| e.to_string())?;
                match s.phase.as_str() {
                    "completed" => {
                        break format!(
                        "migrated to {to} in {} ms: downtime {} ms, {} iterations, {} bytes sent",
                        s.total_ms, s.downtime_ms, s.iteration, s.bytes_sent
                    )
                    }
                    "failed" | "cancelled" | "unknown" => {
                        return Err(format!("migration {}: {}", s.phase, s.error))
                    }
                    _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                }
            }
        }
    };
    Ok(out)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmmctl: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vmmctl: {e}");
            ExitCode::from(1)
        }
    }
}
