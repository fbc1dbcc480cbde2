//! The VMM's control API (berth.v1 VmmService) on a unix socket, for the
//! agent: info, pause/resume, graceful shutdown, stop, stats, console
//! input, rate limits, snapshots and migration. It converts messages and
//! delegates: snapshots to `snapshot_engine`, migration to
//! `migration::source`. It runs on one thread with its own single-threaded
//! runtime, so a VMM started without `--api-socket` pays nothing for it.

use std::io::Cursor;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use berth_proto::common::{DeviceStats, Empty, RateLimit};
use berth_proto::vmm::{
    ConsoleInput as ConsoleInputMsg, MigrateRequest, MigrationStatus, SetRateLimitRequest,
    SnapshotReply, SnapshotRequest, VmmInfo, VmmStats,
};
use berth_proto::vmm_ttrpc::{create_vmm_service, VmmService};
use ttrpc::r#async::TtrpcContext;

use crate::devices::bus::lock;
use crate::devices::legacy::serial::{pump_input, SerialDevice};
use crate::devices::rate_limiter::{BucketConfig, LimitConfig};
use crate::exit::ExitReason;
use crate::seccomp::ThreadKind;

use crate::builder::BuildError;
use crate::machine::{Machine, PAUSE_TIMEOUT};
use crate::migration::source::{Outgoing, Params, Progress, StartError};
use crate::snapshot_engine::{Kind, Request, Snapshots, TakeError};
use berth_proto::vmm_process::control::RunState;
use berth_proto::vmm_process::device::LimiterId;

pub use berth_proto::vmm_process::now_ms;

/// Console input from the API, fed to the serial device in order by one
/// thread (a full receive FIFO makes it wait, never drop).
#[derive(Clone)]
pub struct ConsoleInput(mpsc::Sender<Vec<u8>>);

impl ConsoleInput {
    pub fn start(serial: Arc<Mutex<SerialDevice>>) -> std::io::Result<ConsoleInput> {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        crate::seccomp::spawn(ThreadKind::Control, "api-console-in".into(), move || {
            for chunk in rx {
                pump_input(serial.clone(), Cursor::new(chunk));
            }
        })?;
        Ok(ConsoleInput(tx))
    }
}

pub struct VmmApi {
    pub machine: Arc<Machine>,
    pub snapshots: Snapshots,
    pub console_in: ConsoleInput,
    pub started_at_ms: u64,
    /// The outgoing migration, once one was asked for.
    pub migration: Outgoing,
}

fn limit_from_pb(l: &RateLimit) -> LimitConfig {
    LimitConfig {
        bytes: BucketConfig {
            rate_per_s: l.bytes_per_s,
            burst: l.bytes_burst,
        },
        ops: BucketConfig {
            rate_per_s: l.ops_per_s,
            burst: l.ops_burst,
        },
    }
}

fn limit_to_pb(l: LimitConfig) -> RateLimit {
    RateLimit {
        bytes_per_s: l.bytes.rate_per_s,
        bytes_burst: l.bytes.burst,
        ops_per_s: l.ops.rate_per_s,
        ops_burst: l.ops.burst,
        ..Default::default()
    }
}

fn unavailable(message: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::UNAVAILABLE, message))
}

/// (time on a CPU, time runnable but waiting) of one thread, in ns, from
/// its schedstat.
fn thread_sched_ns(tid: i32) -> (u64, u64) {
    let text =
        std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap_or_default();
    let mut fields = text
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(0));
    (fields.next().unwrap_or(0), fields.next().unwrap_or(0))
}

impl VmmApi {
    fn snapshot(&self, req: &SnapshotRequest) -> Result<SnapshotReply, TakeError> {
        let taken = self.snapshots.take(&Request {
            dir: Path::new(&req.dir),
            kind: Kind::of(req)?,
            live: req.live,
            resume: req.resume,
        })?;
        Ok(SnapshotReply {
            pause_ms: taken.pause_ms,
            memory_bytes: taken.memory_bytes,
            pages_written: taken.pages_written,
            iterations: taken.iterations,
            ..Default::default()
        })
    }

    fn migrate_out(&self, req: &MigrateRequest) -> Result<MigrationStatus, ttrpc::Error> {
        let started = self.migration.start(
            self.machine.clone(),
            Params::from_request(req),
            // The migration reads (and so clears) the dirty log.
            || self.snapshots.forget_parent(),
        );
        started.map(|p| migration_status(&p)).map_err(|e| {
            let code = match e {
                StartError::Incomplete => ttrpc::Code::INVALID_ARGUMENT,
                StartError::Busy(_) => ttrpc::Code::FAILED_PRECONDITION,
                StartError::Thread(_) => ttrpc::Code::UNAVAILABLE,
            };
            ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
        })
    }

    fn migration_report(&self, cancel: bool) -> MigrationStatus {
        (self.migration.report(cancel).as_ref())
            .map(migration_status)
            .unwrap_or_default()
    }

    fn info(&self) -> VmmInfo {
        let mut info = VmmInfo {
            pid: std::process::id() as i32,
            vcpus: self.machine.config.vcpus,
            memory_mib: self.machine.config.memory_mib,
            started_at_ms: self.started_at_ms,
            ..Default::default()
        };
        let state = if self.machine.vcpus.is_paused() {
            RunState::Paused
        } else {
            RunState::Running
        };
        state.fill(&mut info);
        info
    }
}

fn migration_status(p: &Progress) -> MigrationStatus {
    MigrationStatus {
        phase: p.phase.name().into(),
        destination: p.destination.clone(),
        iteration: p.iteration,
        bytes_sent: p.bytes_sent,
        pages_sent: p.pages_sent,
        dirty_rate_bytes_per_s: p.dirty_rate,
        remaining_bytes: p.remaining_bytes,
        expected_downtime_ms: p.expected_downtime_ms,
        downtime_ms: p.downtime_ms,
        total_ms: p.total_ms,
        memory_bytes: p.memory_bytes,
        error: p.error.clone(),
        ..Default::default()
    }
}

#[async_trait::async_trait]
impl VmmService for VmmApi {
    async fn migrate_out(
        &self,
        _ctx: &TtrpcContext,
        req: MigrateRequest,
    ) -> ttrpc::Result<MigrationStatus> {
        VmmApi::migrate_out(self, &req)
    }

    async fn get_migration(&self, _ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<MigrationStatus> {
        Ok(self.migration_report(false))
    }

    async fn cancel_migration(
        &self,
        _ctx: &TtrpcContext,
        _: Empty,
    ) -> ttrpc::Result<MigrationStatus> {
        Ok(self.migration_report(true))
    }

    async fn info(&self, _ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<VmmInfo> {
        Ok(self.info())
    }

    async fn pause(&self, _ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<VmmInfo> {
        self.machine
            .vcpus
            .pause(PAUSE_TIMEOUT)
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(self.info())
    }

    async fn resume(&self, _ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<VmmInfo> {
        self.machine.vcpus.resume();
        Ok(self.info())
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<Empty> {
        lock(&self.machine.i8042).ctrl_alt_del();
        Ok(Empty::default())
    }

    async fn stop(&self, _ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<Empty> {
        self.machine.exit.notify(ExitReason::Stopped);
        Ok(Empty::default())
    }

    async fn stats(&self, _ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<VmmStats> {
        let sched: Vec<(u64, u64)> = self
            .machine
            .vcpus
            .control
            .tids()
            .into_iter()
            .map(thread_sched_ns)
            .collect();
        Ok(VmmStats {
            vcpu_run_ns: sched.iter().map(|s| s.0).collect(),
            vcpu_wait_ns: sched.iter().map(|s| s.1).collect(),
            exits: self
                .machine
                .vcpus
                .control
                .exits
                .load(std::sync::atomic::Ordering::Relaxed),
            exits_by_reason: (crate::vstate::vcpu::EXIT_REASONS.iter())
                .zip(&self.machine.vcpus.control.exits_by_reason)
                .map(|(name, n)| {
                    (
                        name.to_string(),
                        n.load(std::sync::atomic::Ordering::Relaxed),
                    )
                })
                .collect(),
            unclaimed_port_accesses: (self.machine.vcpus.control.unclaimed_port)
                .load(std::sync::atomic::Ordering::Relaxed),
            unclaimed_mmio_accesses: (self.machine.vcpus.control.unclaimed_mmio)
                .load(std::sync::atomic::Ordering::Relaxed),
            devices: (self.machine.limiters.iter())
                .map(|d| {
                    let s = d.limiter.stats();
                    DeviceStats {
                        device: d.id.device.to_string(),
                        direction: d.id.direction.word().into(),
                        bytes: s.bytes,
                        ops: s.ops,
                        throttled_ns: s.throttled_ns,
                        limit: protobuf::MessageField::some(limit_to_pb(d.limiter.config())),
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn set_rate_limit(
        &self,
        _ctx: &TtrpcContext,
        req: SetRateLimitRequest,
    ) -> ttrpc::Result<Empty> {
        let wanted = LimiterId::parse(&req.device, &req.direction).ok();
        let target = (self.machine.limiters.iter())
            .find(|d| Some(d.id) == wanted)
            .ok_or_else(|| {
                let known: Vec<String> = (self.machine.limiters.iter())
                    .map(|d| format!("{}/{}", d.id.device, d.id.direction))
                    .collect();
                ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::NOT_FOUND,
                    format!(
                        "no device {}/{} (this VM has: {})",
                        req.device,
                        req.direction,
                        known.join(", ")
                    ),
                ))
            })?;
        target
            .limiter
            .update(limit_from_pb(&req.limit.clone().unwrap_or_default()));
        Ok(Empty::default())
    }

    async fn snapshot(
        &self,
        _ctx: &TtrpcContext,
        req: SnapshotRequest,
    ) -> ttrpc::Result<SnapshotReply> {
        if req.dir.is_empty() {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::INVALID_ARGUMENT,
                "snapshot: no directory given",
            )));
        }
        VmmApi::snapshot(self, &req).map_err(|e| {
            ttrpc::Error::RpcStatus(ttrpc::get_status(
                ttrpc::Code::FAILED_PRECONDITION,
                e.to_string(),
            ))
        })
    }

    async fn console_write(
        &self,
        _ctx: &TtrpcContext,
        req: ConsoleInputMsg,
    ) -> ttrpc::Result<Empty> {
        self.console_in
            .0
            .send(req.data)
            .map_err(|_| unavailable("the console input queue is gone".into()))?;
        Ok(Empty::default())
    }
}

/// The running API server. Dropping it leaves the server to die with the
/// process; [`ApiServer::shutdown`] lets replies in flight reach their
/// callers first.
pub struct ApiServer {
    shutdown: tokio::sync::oneshot::Sender<()>,
    done: mpsc::Receiver<()>,
}

impl ApiServer {
    /// Stops accepting calls and waits (at most `timeout`) until every
    /// reply already produced has been written. Without this, a Stop call
    /// races the process exit and its caller sees the socket close instead
    /// of its answer.
    pub fn shutdown(self, timeout: std::time::Duration) {
        if self.shutdown.send(()).is_ok() {
            let _ = self.done.recv_timeout(timeout);
        }
    }
}

impl crate::builder::Control for ApiServer {
    fn shutdown(self, timeout: std::time::Duration) {
        ApiServer::shutdown(self, timeout)
    }
}

/// Serves the control API for the running `machine` (`Vmm::start`) on the
/// unix socket at `path`.
pub fn start(path: &Path, machine: Arc<Machine>) -> Result<ApiServer, BuildError> {
    let console_in =
        ConsoleInput::start(machine.serial.clone()).map_err(|source| BuildError::Io {
            what: "the console input queue",
            source,
        })?;
    let api = VmmApi {
        snapshots: Snapshots::new(machine.clone()),
        machine,
        console_in,
        started_at_ms: now_ms(),
        migration: Outgoing::default(),
    };
    serve(path, api).map_err(|source| BuildError::ApiSocket {
        path: path.to_owned(),
        source,
    })
}

/// Serves `api` on the unix socket at `path` from a thread of its own.
/// Returns once the socket is listening.
pub fn serve(path: &Path, api: VmmApi) -> std::io::Result<ApiServer> {
    // A socket left by a VMM that died is ours to replace.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let address = format!("unix://{}", path.display());
    let service = create_vmm_service(Arc::new(api));
    let (ready_tx, ready_rx) = mpsc::channel();
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    crate::seccomp::spawn(ThreadKind::Control, "api".into(), move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        runtime.block_on(async move {
            let server = ttrpc::r#async::Server::new()
                .bind(&address)
                .map(|s| s.register_service(service));
            let mut server = match server {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(std::io::Error::other(e.to_string())));
                    return;
                }
            };
            if let Err(e) = server.start().await {
                let _ = ready_tx.send(Err(std::io::Error::other(e.to_string())));
                return;
            }
            let _ = ready_tx.send(Ok(()));
            if shutdown_rx.await.is_ok() {
                let _ = server.shutdown().await;
                let _ = done_tx.send(());
            } else {
                std::future::pending::<()>().await;
            }
        });
    })?;
    ready_rx
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("the API thread died")))?;
    Ok(ApiServer {
        shutdown: shutdown_tx,
        done: done_rx,
    })
}
