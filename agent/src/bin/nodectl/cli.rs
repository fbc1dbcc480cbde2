//! The command line: every command and global flag. Each command's code is
//! in the file of its resource (main.rs says which).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::image::ImageCmd;
use crate::migrate::{MigrateArgs, MigrateInArgs};
use crate::snapshot::SnapshotCmd;
use crate::vm::StopArgs;

const DEFAULT_SOCKET: &str = "/run/berth/agent.sock";

#[derive(Parser)]
#[command(
    name = "nodectl",
    version,
    about = "Operate the VMs of this node through berth-agent"
)]
pub struct Cli {
    /// The agent's socket.
    #[arg(long, global = true, env = "BERTH_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

// Commands with many flags keep them beside their code (`vm::StopArgs`,
// `migrate::MigrateArgs`); a command's help is its variant's doc comment.
#[derive(Subcommand)]
pub enum Cmd {
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
    Stop(StopArgs),
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
    Migrate(MigrateArgs),
    /// Prepare this node to receive a VM (spec file as for create): prints
    /// the address and one-time token to give `nodectl migrate` on the source.
    MigrateIn(MigrateInArgs),
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
        action: ImageCmd,
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
