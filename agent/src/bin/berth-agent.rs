//! berth-agent: serves berth.v1 (NodeService, VmService) on a unix socket
//! and keeps this node's VMs. Stopping the agent (SIGTERM, or kill -9)
//! leaves the VMs running; the next agent re-adopts them.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use berth_agent::api_guard::{Guard, GuardLimits, PublicListener};
use berth_agent::config::AgentConfig;
use berth_agent::manager::Manager;
use berth_agent::metrics::ApiMetrics;
use berth_agent::root_lock::StateRootLock;
use berth_agent::server::{ImageApi, NodeApi, VmApi};
use berth_agent::spec::Limits;
use clap::Parser;

#[derive(Parser)]
#[command(name = "berth-agent", version, about = "Berth's per-host daemon")]
struct Args {
    /// Agent config (TOML). Without --config, /etc/berth/agent.toml is read
    /// if it exists, else the documented defaults apply.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides the config's state_root.
    #[arg(long)]
    state_root: Option<PathBuf>,
    /// Overrides the config's socket.
    #[arg(long)]
    socket: Option<PathBuf>,
}

const DEFAULT_CONFIG: &str = "/etc/berth/agent.toml";

fn load_config(args: &Args) -> Result<AgentConfig, String> {
    let mut config = match &args.config {
        Some(path) => AgentConfig::load(path).map_err(|e| e.to_string())?,
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            AgentConfig::load(DEFAULT_CONFIG.as_ref()).map_err(|e| e.to_string())?
        }
        None => AgentConfig::default(),
    };
    if let Some(root) = &args.state_root {
        config.state_root = root.clone();
    }
    if let Some(socket) = &args.socket {
        config.socket = socket.clone();
    }
    Ok(config)
}

/// What the node offers guests. KVM facts come from the VMM binary
/// (`berth-vmm --host-info`): the agent itself never opens /dev/kvm.
fn host_limits(config: &AgentConfig) -> Limits {
    use berth_proto::vmm_process::host;
    let info = match berth_agent::vmm_proc::host_info(&config.vmm_binary()) {
        Ok(info) => info,
        Err(e) => {
            tracing::error!("{e}; VMs cannot start on this node");
            host::HostInfo::default()
        }
    };
    if let Some(e) = &info.kvm_error {
        tracing::error!("{e}; VMs cannot start on this node");
    }
    Limits {
        max_vcpus: info.max_vcpus,
        host_memory_mib: host::memory_mib().unwrap_or(0),
        flavour: info.flavour,
    }
}

fn prepare_socket(config: &AgentConfig) -> Result<String, String> {
    let path = &config.socket;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "{} is in use: is another berth-agent running?",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale {}: {e}", path.display()))?;
    }
    Ok(format!("unix://{}", path.display()))
}

fn secure_socket(config: &AgentConfig) -> Result<(), String> {
    let path = &config.socket;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
    if !config.socket_group.is_empty() {
        let group = nix::unistd::Group::from_name(&config.socket_group)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("socket_group {:?} does not exist", config.socket_group))?;
        nix::unistd::chown(path, None, Some(group.gid))
            .map_err(|e| format!("cannot chown {}: {e}", path.display()))?;
    }
    Ok(())
}

async fn bind(address: &str) -> Result<PublicListener, String> {
    PublicListener::bind(address)
        .await
        .map_err(|e| e.to_string())
}

/// The Prometheus endpoint (`metrics_listen`), on a task of its own.
async fn serve_metrics(
    listen: &str,
    manager: &Arc<Manager>,
    api_metrics: &Arc<ApiMetrics>,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot serve metrics on {listen} (metrics_listen): {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    if !local.ip().is_loopback() {
        tracing::warn!("metrics on {local}, not a loopback address: anyone who reaches it sees every VM's figures");
    }
    tracing::info!("metrics on http://{local}/metrics");
    tokio::spawn(berth_agent::metrics::serve(
        listener,
        manager.clone(),
        api_metrics.clone(),
    ));
    Ok(())
}

async fn run(args: Args) -> Result<(), String> {
    let mut config = load_config(&args)?;
    let limits = host_limits(&config);
    config.jail.check().map_err(|e| e.to_string())?;
    let guard_limits = GuardLimits::from_config(&config).map_err(|e| e.to_string())?;
    // A jailed VMM opens its run and snapshot directories refusing
    // symlinks, so the state root is used by its real path.
    std::fs::create_dir_all(&config.state_root)
        .and_then(|()| std::fs::canonicalize(&config.state_root))
        .map(|real| config.state_root = real)
        .map_err(|e| {
            format!(
                "cannot open state root {}: {e}",
                config.state_root.display()
            )
        })?;
    // Before anything reads the root or touches a VMM: a second agent on
    // this root would re-adopt and restart the same VMs.
    let _root_lock = StateRootLock::acquire(&config.state_root).map_err(|e| e.to_string())?;
    if !config.jail.enabled {
        tracing::warn!("JAIL IS OFF (jail.enabled = false): every VMM runs as root with the host's files in reach; debugging only");
    }
    if !config.jail.seccomp {
        tracing::warn!("SECCOMP IS OFF (jail.seccomp = false): VMM threads may make any system call; debugging only");
    }
    let address = prepare_socket(&config)?;
    let tcp = config.tcp_listen.clone();
    let manager = Manager::load(config.clone(), limits).await.map_err(|e| {
        format!(
            "cannot open state root {}: {e}",
            config.state_root.display()
        )
    })?;

    // The guard accepts on the public sockets and hands ttrpc only what it
    // admits (api_guard): ttrpc's own accept loop has no cap and spins on
    // EMFILE. One ttrpc listener for both sockets: ttrpc serves only one.
    let mut listeners = vec![(address.clone(), bind(&address).await?)];
    if let Some(tcp) = &tcp {
        tracing::warn!(
            "also listening on {tcp} (tcp_listen is set): anyone who reaches it controls this node"
        );
        listeners.push((tcp.clone(), bind(tcp).await?));
    }
    let (guard, admitted) = Guard::start(guard_limits, listeners);
    let api_metrics = Arc::new(ApiMetrics::default());
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(admitted)
        .register_service(
            api_metrics.wrap(berth_proto::vm_ttrpc::create_vm_service(Arc::new(VmApi(
                manager.clone(),
            )))),
        )
        .register_service(
            api_metrics.wrap(berth_proto::node_ttrpc::create_node_service(Arc::new(
                NodeApi(manager.clone()),
            ))),
        )
        .register_service(
            api_metrics.wrap(berth_proto::image_ttrpc::create_image_service(Arc::new(
                ImageApi(manager.clone()),
            ))),
        );
    if let Some(listen) = &config.metrics_listen {
        serve_metrics(listen, &manager, &api_metrics).await?;
    }
    server
        .start()
        .await
        .map_err(|e| format!("cannot serve on {address}: {e}"))?;
    secure_socket(&config)?;
    tokio::spawn(manager.clone().supervise());
    tokio::spawn(manager.clone().sample());
    tracing::info!("serving on {address}");
    if let Err(e) = berth_agent::notify::notify("READY=1") {
        tracing::warn!("cannot notify systemd: {e}");
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let _ = berth_agent::notify::notify("STOPPING=1");
    tracing::info!("stopping; VMs keep running");
    let _ = server.shutdown().await;
    drop(guard);
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("berth-agent: error: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("berth-agent: error: {e}");
            ExitCode::from(1)
        }
    }
}
