//! The ttrpc edge: berth.v1 NodeService and VmService on top of the
//! manager. Conversions between the generated types and our plain ones
//! happen here and nowhere else.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::Duration;

use berth_proto::common::Empty;
use berth_proto::node::{Capacity, DiskSpace, Event as PbEvent, NodeInfo, WatchRequest};
use berth_proto::vm as pb;
use berth_proto::{node_ttrpc, vm_ttrpc};
use protobuf::{EnumOrUnknown, Message, MessageField};
use ttrpc::r#async::{ServerStream, ServerStreamSender, TtrpcContext};

use crate::manager::{ApiError, Event, Manager, SnapshotKind, VmReport, VmView};
use crate::spec::{self, RestartKind, VmSpec};
use crate::store::VmState;
use crate::vmm_proc::control::{rate_limit_from_pb, rate_limit_to_pb};

mod images;
pub use images::ImageApi;

pub(crate) fn status(e: ApiError) -> ttrpc::Error {
    use ttrpc::Code;
    let (code, msg) = match e {
        ApiError::InvalidArgument(m) => (Code::INVALID_ARGUMENT, m),
        ApiError::NotFound(m) => (Code::NOT_FOUND, m),
        ApiError::AlreadyExists(m) => (Code::ALREADY_EXISTS, m),
        ApiError::FailedPrecondition(m) => (Code::FAILED_PRECONDITION, m),
        ApiError::ResourceExhausted(m) => (Code::RESOURCE_EXHAUSTED, m),
        ApiError::Unavailable(m) => (Code::UNAVAILABLE, m),
        ApiError::Internal(m) => (Code::INTERNAL, m),
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

/// Fields this agent does not know are an error, not something to drop.
pub(crate) fn refuse_unknown_fields(
    what: &str,
    msg: &dyn protobuf::MessageDyn,
) -> Result<(), ApiError> {
    let unknown: Vec<u32> = msg
        .special_fields_dyn()
        .unknown_fields()
        .iter()
        .map(|(n, _)| n)
        .collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(format!(
            "{what}: unknown field number(s) {unknown:?}"
        )))
    }
}

/// Unlimited stays absent on the wire.
fn limit_field(l: spec::RateLimit) -> MessageField<berth_proto::common::RateLimit> {
    if l.is_unlimited() {
        MessageField::none()
    } else {
        MessageField::some(rate_limit_to_pb(l))
    }
}

pub fn spec_from_pb(p: &pb::VmSpec) -> Result<VmSpec, ApiError> {
    refuse_unknown_fields("spec", p)?;
    let kernel = p.kernel.clone().unwrap_or_default();
    refuse_unknown_fields("spec.kernel", &kernel)?;
    let cpu = p.cpu.clone().unwrap_or_default();
    let restart = p.restart.clone().unwrap_or_default();
    Ok(VmSpec {
        id: p.id.clone(),
        name: p.name.clone(),
        labels: p
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        vcpus: p.vcpus,
        memory_mib: p.memory_mib,
        kernel: spec::Kernel {
            path: kernel.path.into(),
            initrd: (!kernel.initrd.is_empty()).then(|| kernel.initrd.into()),
            cmdline: kernel.cmdline,
            image: kernel.image,
            initrd_image: kernel.initrd_image,
        },
        disks: p
            .disks
            .iter()
            .map(|d| spec::Disk {
                path: d.path.clone().into(),
                read_only: d.read_only,
                serial: d.serial.clone(),
                image: d.image.clone(),
                limit: rate_limit_from_pb(&d.limit),
            })
            .collect(),
        nics: p
            .nics
            .iter()
            .map(|n| spec::Nic {
                tap: n.tap.clone(),
                bridge: n.bridge.clone(),
                mac: n.mac.clone(),
                rx_limit: rate_limit_from_pb(&n.rx_limit),
                tx_limit: rate_limit_from_pb(&n.tx_limit),
            })
            .collect(),
        cpu: spec::CpuPolicy {
            weight: if cpu.weight == 0 {
                spec::DEFAULT_CPU_WEIGHT
            } else {
                cpu.weight
            },
            max: cpu.max,
            cpuset: cpu.cpuset,
        },
        memory: spec::MemoryPolicy {
            overhead_mib: p.memory.overhead_mib,
        },
        restart: spec::RestartPolicy {
            kind: match restart.kind.enum_value_or_default() {
                pb::restart_policy::Kind::NEVER => RestartKind::Never,
                pb::restart_policy::Kind::ON_FAILURE => RestartKind::OnFailure,
                pb::restart_policy::Kind::ALWAYS => RestartKind::Always,
            },
            max_retries: if restart.max_retries == 0 {
                spec::DEFAULT_MAX_RETRIES
            } else {
                restart.max_retries
            },
        },
    })
}

pub fn spec_to_pb(s: &VmSpec) -> pb::VmSpec {
    pb::VmSpec {
        id: s.id.clone(),
        name: s.name.clone(),
        labels: s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        vcpus: s.vcpus,
        memory_mib: s.memory_mib,
        kernel: MessageField::some(pb::Kernel {
            path: s.kernel.path.display().to_string(),
            initrd: s
                .kernel
                .initrd
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            cmdline: s.kernel.cmdline.clone(),
            image: s.kernel.image.clone(),
            initrd_image: s.kernel.initrd_image.clone(),
            ..Default::default()
        }),
        disks: s
            .disks
            .iter()
            .map(|d| pb::Disk {
                path: d.path.display().to_string(),
                read_only: d.read_only,
                serial: d.serial.clone(),
                image: d.image.clone(),
                limit: limit_field(d.limit),
                ..Default::default()
            })
            .collect(),
        nics: s
            .nics
            .iter()
            .map(|n| pb::Nic {
                tap: n.tap.clone(),
                bridge: n.bridge.clone(),
                mac: n.mac.clone(),
                rx_limit: limit_field(n.rx_limit),
                tx_limit: limit_field(n.tx_limit),
                ..Default::default()
            })
            .collect(),
        cpu: MessageField::some(pb::CpuPolicy {
            weight: s.cpu.weight,
            max: s.cpu.max,
            cpuset: s.cpu.cpuset.clone(),
            ..Default::default()
        }),
        memory: MessageField::some(pb::MemoryPolicy {
            overhead_mib: s.memory.overhead_mib,
            ..Default::default()
        }),
        restart: MessageField::some(pb::RestartPolicy {
            kind: EnumOrUnknown::new(match s.restart.kind {
                RestartKind::Never => pb::restart_policy::Kind::NEVER,
                RestartKind::OnFailure => pb::restart_policy::Kind::ON_FAILURE,
                RestartKind::Always => pb::restart_policy::Kind::ALWAYS,
            }),
            max_retries: s.restart.max_retries,
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn state_to_pb(s: VmState) -> pb::VmState {
    match s {
        VmState::Defined => pb::VmState::DEFINED,
        VmState::Starting => pb::VmState::STARTING,
        VmState::Running => pb::VmState::RUNNING,
        VmState::Paused => pb::VmState::PAUSED,
        VmState::Stopping => pb::VmState::STOPPING,
        VmState::Stopped => pb::VmState::STOPPED,
        VmState::Crashed => pb::VmState::CRASHED,
        VmState::Migrating => pb::VmState::MIGRATING,
        VmState::Migrated => pb::VmState::MIGRATED,
    }
}

fn migration_to_pb(id: &str, m: crate::store::MigrationRecord) -> pb::MigrationInfo {
    pb::MigrationInfo {
        id: id.to_string(),
        direction: m.direction.name().into(),
        phase: m.phase.name().into(),
        peer: m.peer,
        started_at_ms: m.started_at_ms,
        iteration: m.iteration,
        bytes_sent: m.bytes_sent,
        dirty_rate_bytes_per_s: m.dirty_rate_bytes_per_s,
        remaining_bytes: m.remaining_bytes,
        expected_downtime_ms: m.expected_downtime_ms,
        downtime_ms: m.downtime_ms,
        total_ms: m.total_ms,
        memory_bytes: m.memory_bytes,
        error: m.error,
        ..Default::default()
    }
}

/// A request's map field (tap_overrides) as the manager takes it.
pub fn pairs(map: &std::collections::HashMap<String, String>) -> Vec<(String, String)> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The longest a migration token may stay valid.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// PrepareMigrateIn's token lifetime: 0 is the default, and more than
/// MAX_TOKEN_TTL is refused (now + ttl must stay a representable expiry).
pub fn token_ttl(ms: u64) -> Result<Duration, ApiError> {
    match Duration::from_millis(ms) {
        ttl if ttl.is_zero() => Ok(crate::manager::DEFAULT_TOKEN_TTL),
        ttl if ttl <= MAX_TOKEN_TTL => Ok(ttl),
        _ => Err(ApiError::InvalidArgument(format!(
            "token_ttl_ms {ms} exceeds the maximum of {} (one day)",
            MAX_TOKEN_TTL.as_millis()
        ))),
    }
}

/// MigrateOut's options as the manager takes them (0 = the VMM's default).
pub fn migrate_params(p: &pb::MigrationParams) -> crate::manager::MigrateParams {
    crate::manager::MigrateParams {
        downtime_ms: p.downtime_ms,
        bandwidth_mib_s: p.bandwidth_mib_s,
        timeout_ms: p.timeout_ms,
        force_on_timeout: p.force_on_timeout,
        max_iterations: p.max_iterations,
    }
}

/// StopVm's grace period for the guest; None = the default.
pub fn stop_timeout(timeout_ms: u32) -> Option<Duration> {
    (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms.into()))
}

fn vm_to_pb(v: VmView) -> pb::Vm {
    pb::Vm {
        spec: MessageField::some(spec_to_pb(&v.spec)),
        status: MessageField::some(pb::VmStatus {
            state: EnumOrUnknown::new(state_to_pb(v.record.state)),
            pid: v.record.pid,
            started_at_ms: v.record.started_at_ms,
            restarts: v.record.restarts,
            last_exit: v.record.last_exit,
            console_log: v.console_log,
            state_changed_ms: v.record.state_changed_ms,
            migration: v
                .record
                .migration
                .map(|m| migration_to_pb(&v.spec.id, m))
                .into(),
            disk_copies: (v.record.disk_copies.into_iter())
                .map(|c| pb::DiskCopy {
                    disk: c.disk,
                    image: c.image,
                    digest: c.digest,
                    path: c.path.display().to_string(),
                    method: c.method,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn stats_to_pb(spec: &VmSpec, state: VmState, r: crate::entitlement::Report) -> pb::VmStats {
    pb::VmStats {
        id: spec.id.clone(),
        state: EnumOrUnknown::new(state_to_pb(state)),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        cpu_weight: spec.cpu.weight,
        cpu_max: spec.cpu.max,
        cpuset: spec.cpu.cpuset.clone(),
        cpu_fair_share: r.cpu_fair_share,
        interval_ms: r.interval_ms,
        cpu_used: r.cpu_used,
        cpu_wait: r.cpu_wait,
        throttled_periods: r.throttled_periods,
        periods: r.periods,
        throttled_ns: r.throttled_ns,
        cpu_time_ns: r.cpu_time_ns,
        vcpu_run_ns: r.vcpu_run_ns,
        memory_resident_bytes: r.memory_resident_bytes,
        memory_limit_bytes: r.memory_limit_bytes,
        breaches: r.breaches,
        throttled: r.throttled,
        exits: r.exits,
        exits_by_reason: r.exits_by_reason.into_iter().collect(),
        devices: (r.devices.into_iter())
            .map(|d| berth_proto::common::DeviceStats {
                device: d.device,
                direction: d.direction,
                bytes: d.bytes,
                ops: d.ops,
                throttled_ns: d.throttled_ns,
                limit: MessageField::some(rate_limit_to_pb(d.limit)),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

pub fn usage_to_pb(u: &crate::usage::Usage) -> pb::Usage {
    pb::Usage {
        cpu_seconds: u.cpu_seconds,
        memory_gib_hours: u.memory_gib_hours,
        disk_bytes: u.disk_bytes,
        net_rx_bytes: u.net_rx_bytes,
        net_tx_bytes: u.net_tx_bytes,
        running_seconds: u.running_seconds,
        since_ms: u.since_ms,
        breaches: u.breaches.clone().into_iter().collect(),
        ..Default::default()
    }
}

fn snapshot_to_pb(s: crate::manager::SnapshotView) -> pb::SnapshotInfo {
    pb::SnapshotInfo {
        vm_id: s.vm_id,
        name: s.name,
        created_at_ms: s.created_at_ms,
        disk_bytes: s.disk_bytes,
        memory_bytes: s.memory_bytes,
        pause_ms: s.pause_ms,
        path: s.path,
        ..Default::default()
    }
}

fn event_to_pb(e: &Event) -> PbEvent {
    PbEvent {
        at_ms: e.at_ms,
        vm_id: e.vm_id.clone(),
        kind: e.kind.word().into(),
        state: EnumOrUnknown::new(state_to_pb(e.state)),
        message: e.message.clone(),
        ..Default::default()
    }
}

pub struct VmApi(pub Arc<Manager>);

/// The spec a Create, Update or PrepareMigrateIn carries, converted.
pub fn spec_of(what: &str, spec: &MessageField<pb::VmSpec>) -> Result<VmSpec, ttrpc::Error> {
    spec.as_ref()
        .ok_or_else(|| ApiError::InvalidArgument(format!("{what}: spec is missing")))
        .and_then(spec_from_pb)
        .map_err(status)
}

#[async_trait::async_trait]
impl vm_ttrpc::VmService for VmApi {
    async fn create(&self, _: &TtrpcContext, req: pb::CreateVmRequest) -> ttrpc::Result<pb::Vm> {
        let spec = spec_of("create", &req.spec)?;
        self.0.create(spec).await.map(vm_to_pb).map_err(status)
    }

    async fn get(&self, _: &TtrpcContext, req: pb::VmRef) -> ttrpc::Result<pb::Vm> {
        self.0.get(&req.id).map(vm_to_pb).map_err(status)
    }

    async fn list(
        &self,
        _: &TtrpcContext,
        req: pb::ListVmsRequest,
    ) -> ttrpc::Result<pb::ListVmsResponse> {
        let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
        Ok(pb::ListVmsResponse {
            vms: self.0.list(&labels).into_iter().map(vm_to_pb).collect(),
            ..Default::default()
        })
    }

    async fn update(&self, _: &TtrpcContext, req: pb::UpdateVmRequest) -> ttrpc::Result<pb::Vm> {
        let spec = spec_of("update", &req.spec)?;
        self.0.update(spec).await.map(vm_to_pb).map_err(status)
    }

    async fn delete(&self, _: &TtrpcContext, req: pb::VmRef) -> ttrpc::Result<Empty> {
        self.0
            .delete(&req.id)
            .await
            .map(|_| Empty::default())
            .map_err(status)
    }

    async fn start(&self, _: &TtrpcContext, req: pb::VmRef) -> ttrpc::Result<pb::Vm> {
        self.0.start(&req.id).await.map(vm_to_pb).map_err(status)
    }

    async fn stop(&self, _: &TtrpcContext, req: pb::StopVmRequest) -> ttrpc::Result<pb::Vm> {
        self.0
            .stop(&req.id, req.force, stop_timeout(req.timeout_ms))
            .await
            .map(vm_to_pb)
            .map_err(status)
    }

    async fn reboot(&self, _: &TtrpcContext, req: pb::VmRef) -> ttrpc::Result<pb::Vm> {
        self.0.reboot(&req.id).await.map(vm_to_pb).map_err(status)
    }

    async fn snapshot(
        &self,
        _: &TtrpcContext,
        req: pb::SnapshotVmRequest,
    ) -> ttrpc::Result<pb::SnapshotInfo> {
        self.0
            .snapshot(
                &req.id,
                &req.name,
                req.hibernate,
                SnapshotKind::parse(&req.kind).map_err(status)?,
                req.live,
            )
            .await
            .map(snapshot_to_pb)
            .map_err(status)
    }

    async fn restore(&self, _: &TtrpcContext, req: pb::RestoreVmRequest) -> ttrpc::Result<pb::Vm> {
        self.0
            .restore(
                &req.id,
                &req.snapshot,
                &req.new_id,
                &req.new_name,
                req.paused,
                &pairs(&req.tap_overrides),
            )
            .await
            .map(vm_to_pb)
            .map_err(status)
    }

    async fn prepare_migrate_in(
        &self,
        _: &TtrpcContext,
        req: pb::PrepareMigrateInRequest,
    ) -> ttrpc::Result<pb::PrepareMigrateInResponse> {
        let spec = spec_of("PrepareMigrateIn", &req.spec)?;
        let ttl = token_ttl(req.token_ttl_ms).map_err(status)?;
        let prepared = self
            .0
            .prepare_migrate_in(spec, &req.listen_address, ttl, &pairs(&req.tap_overrides))
            .await
            .map_err(status)?;
        Ok(pb::PrepareMigrateInResponse {
            address: prepared.address,
            token: prepared.token,
            expires_at_ms: prepared.expires_at_ms,
            vm: MessageField::some(vm_to_pb(prepared.vm)),
            ..Default::default()
        })
    }

    async fn migrate_out(
        &self,
        _: &TtrpcContext,
        req: pb::MigrateOutRequest,
    ) -> ttrpc::Result<pb::MigrationInfo> {
        let params = migrate_params(&req.params.clone().unwrap_or_default());
        self.0
            .migrate_out(&req.id, &req.address, &req.token, &params)
            .await
            .map(|m| migration_to_pb(&req.id, m))
            .map_err(status)
    }

    async fn get_migration(
        &self,
        _: &TtrpcContext,
        req: pb::VmRef,
    ) -> ttrpc::Result<pb::MigrationInfo> {
        self.0
            .get_migration(&req.id)
            .map(|m| migration_to_pb(&req.id, m))
            .map_err(status)
    }

    async fn cancel_migration(
        &self,
        _: &TtrpcContext,
        req: pb::VmRef,
    ) -> ttrpc::Result<pb::MigrationInfo> {
        self.0
            .cancel_migration(&req.id)
            .await
            .map(|m| migration_to_pb(&req.id, m))
            .map_err(status)
    }

    async fn list_snapshots(
        &self,
        _: &TtrpcContext,
        req: pb::VmRef,
    ) -> ttrpc::Result<pb::ListSnapshotsResponse> {
        Ok(pb::ListSnapshotsResponse {
            snapshots: self
                .0
                .list_snapshots(&req.id)
                .map_err(status)?
                .into_iter()
                .map(snapshot_to_pb)
                .collect(),
            ..Default::default()
        })
    }

    async fn delete_snapshot(
        &self,
        _: &TtrpcContext,
        req: pb::SnapshotRef,
    ) -> ttrpc::Result<Empty> {
        self.0
            .delete_snapshot(&req.id, &req.name)
            .await
            .map(|_| Empty::default())
            .map_err(status)
    }

    async fn group(
        &self,
        _: &TtrpcContext,
        req: pb::GroupActionRequest,
    ) -> ttrpc::Result<pb::GroupActionResponse> {
        use crate::manager::GroupAction;
        refuse_unknown_fields("group", &req).map_err(status)?;
        let action = match req.action.enum_value() {
            Ok(pb::GroupAction::GROUP_START) => GroupAction::Start,
            Ok(pb::GroupAction::GROUP_STOP) => GroupAction::Stop {
                force: req.force,
                timeout: stop_timeout(req.timeout_ms),
            },
            Ok(pb::GroupAction::GROUP_PAUSE) => GroupAction::Pause,
            Ok(pb::GroupAction::GROUP_RESUME) => GroupAction::Resume,
            Ok(pb::GroupAction::GROUP_SNAPSHOT) => GroupAction::Snapshot,
            _ => {
                return Err(status(ApiError::InvalidArgument(
                    "action: give start, stop, pause, resume or snapshot".into(),
                )))
            }
        };
        let selector: BTreeMap<String, String> = req.selector.into_iter().collect();
        let outcome = self
            .0
            .group(&selector, action, &req.snapshot_name)
            .await
            .map_err(status)?;
        Ok(pb::GroupActionResponse {
            results: (outcome.results.into_iter())
                .map(|r| pb::GroupMemberResult {
                    id: r.id,
                    ok: r.outcome.is_ok(),
                    error: r.outcome.err().map(|e| e.to_string()).unwrap_or_default(),
                    state: EnumOrUnknown::new(state_to_pb(r.state)),
                    snapshot: r.snapshot.map(snapshot_to_pb).into(),
                    ..Default::default()
                })
                .collect(),
            all_paused_at_ms: outcome.all_paused_at_ms,
            resumed_at_ms: outcome.resumed_at_ms,
            ..Default::default()
        })
    }

    async fn get_snapshot_progress(
        &self,
        _: &TtrpcContext,
        req: pb::SnapshotRef,
    ) -> ttrpc::Result<pb::SnapshotProgress> {
        let p = self
            .0
            .snapshot_progress(&req.id, &req.name)
            .map_err(status)?;
        Ok(pb::SnapshotProgress {
            active: p.active,
            pass: p.pass,
            done_bytes: p.done_bytes,
            total_bytes: p.total_bytes,
            exists: p.exists,
            ..Default::default()
        })
    }

    async fn stats(&self, _: &TtrpcContext, req: pb::VmRef) -> ttrpc::Result<pb::VmStats> {
        let VmReport {
            spec,
            state,
            report: r,
        } = self.0.report(&req.id).map_err(status)?;
        let mut stats = stats_to_pb(&spec, state, r);
        stats.usage = MessageField::some(usage_to_pb(&self.0.usage(&req.id).map_err(status)?));
        Ok(stats)
    }

    async fn pause(&self, _: &TtrpcContext, req: pb::VmRef) -> ttrpc::Result<pb::Vm> {
        self.0.pause(&req.id).await.map(vm_to_pb).map_err(status)
    }

    async fn resume(&self, _: &TtrpcContext, req: pb::VmRef) -> ttrpc::Result<pb::Vm> {
        self.0.resume(&req.id).await.map(vm_to_pb).map_err(status)
    }

    async fn console(
        &self,
        _: &TtrpcContext,
        stream: ServerStream<pb::ConsoleChunk, pb::ConsoleChunk>,
    ) -> ttrpc::Result<()> {
        let (tx, mut rx) = stream.split();
        let first = rx.recv().await?.ok_or_else(|| {
            status(ApiError::InvalidArgument(
                "console: no first message".into(),
            ))
        })?;
        let id = first.id.clone();
        let log = self.0.console_log_path(&id).map_err(status)?;
        if !first.data.is_empty() {
            self.0
                .console_write(&id, first.data)
                .await
                .map_err(status)?;
        }
        let manager = self.0.clone();
        let input_id = id.clone();
        let input = tokio::spawn(async move {
            while let Ok(Some(chunk)) = rx.recv().await {
                if manager.console_write(&input_id, chunk.data).await.is_err() {
                    break;
                }
            }
        });
        // Replay the recent log, then follow it (across rotations).
        let mut offset = std::fs::metadata(&log)
            .map(|m| m.len().saturating_sub(64 << 10))
            .unwrap_or(0);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let len = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
            if len < offset {
                offset = 0; // rotated
            }
            if len > offset {
                let mut file = std::fs::File::open(&log)
                    .map_err(|e| status(ApiError::Internal(e.to_string())))?;
                file.seek(SeekFrom::Start(offset)).ok();
                let n = file.read(&mut buf).unwrap_or(0);
                offset += n as u64;
                let chunk = pb::ConsoleChunk {
                    id: id.clone(),
                    data: buf[..n].to_vec(),
                    ..Default::default()
                };
                if tx.send(&chunk).await.is_err() {
                    break;
                }
                continue;
            }
            // The client hung up (its side of the stream ended) or the VM
            // is gone: nobody is left to follow the log for.
            if input.is_finished() || self.0.get(&id).is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        input.abort();
        Ok(())
    }
}

/// Vendor, model name and flags of the host CPU, from /proc/cpuinfo.
fn cpu_identity() -> (String, String, Vec<String>) {
    use berth_proto::vmm_process::host;
    let flags = host::cpuinfo_field("flags")
        .split_whitespace()
        .map(String::from)
        .collect();
    (host::cpu_vendor(), host::cpu_model(), flags)
}

fn disk_space(role: &str, path: &std::path::Path) -> DiskSpace {
    let (total, free) = nix::sys::statvfs::statvfs(path)
        .map(|s| {
            let frag = s.fragment_size();
            (s.blocks() * frag, s.blocks_available() * frag)
        })
        .unwrap_or((0, 0));
    DiskSpace {
        role: role.into(),
        path: path.display().to_string(),
        total_bytes: total,
        free_bytes: free,
        ..Default::default()
    }
}

pub fn capacity_pb(m: &Manager) -> Capacity {
    let c = m.capacity();
    let (vendor, model, flags) = cpu_identity();
    let mut disks = vec![disk_space("state_root", &m.config.state_root)];
    for root in &m.config.kernel_roots {
        disks.push(disk_space("kernel_root", root));
    }
    for root in &m.config.disk_roots {
        disks.push(disk_space("disk_root", root));
    }
    Capacity {
        cpus: c.cpus,
        memory_mib: c.memory_mib,
        running_vcpus: c.running_vcpus,
        running_memory_mib: c.running_memory_mib,
        defined_vcpus: c.defined_vcpus,
        defined_memory_mib: c.defined_memory_mib,
        reserved_cpus: m.config.reserved_cpus,
        reserved_memory_mib: m.config.reserved_memory_mib,
        cpu_overcommit: m.config.cpu_overcommit,
        memory_overcommit: m.config.memory_overcommit,
        allocatable_vcpus: c.allocatable_vcpus,
        allocatable_memory_mib: c.allocatable_memory_mib,
        free_vcpus: c.allocatable_vcpus.saturating_sub(c.held_vcpus),
        free_memory_mib: c.allocatable_memory_mib.saturating_sub(c.held_memory_mib),
        disks,
        max_vcpus: m.limits.max_vcpus,
        hypervisor: m.limits.flavour.kind_and_module().0.into(),
        cpu_vendor: vendor,
        cpu_model: model,
        cpu_flags: flags,
        cgroup_version: m.cgroups.version().into(),
        drained: m.drained(),
        reserve_on_define: m.config.reserve_on_define,
        ..Default::default()
    }
}

pub struct NodeApi(pub Arc<Manager>);

#[async_trait::async_trait]
impl node_ttrpc::NodeService for NodeApi {
    async fn get_node(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<NodeInfo> {
        let (hypervisor, module) = self.0.limits.flavour.kind_and_module();
        Ok(NodeInfo {
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            api_version: berth_proto::API_VERSION.into(),
            hypervisor: hypervisor.into(),
            kvm_module: module.into(),
            max_vcpus: self.0.limits.max_vcpus,
            features: [
                "vm.lifecycle",
                "vm.console",
                "vm.restart-policy",
                "node.watch",
                "image.store",
                "vm.group",
            ]
            .map(String::from)
            .to_vec(),
            kernel_release: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            quarantined: self.0.quarantined.clone(),
            ..Default::default()
        })
    }

    async fn get_capacity(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<Capacity> {
        Ok(capacity_pb(&self.0))
    }

    async fn drain(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<Capacity> {
        self.0.set_drained(true).map_err(status)?;
        Ok(capacity_pb(&self.0))
    }

    async fn undrain(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<Capacity> {
        self.0.set_drained(false).map_err(status)?;
        Ok(capacity_pb(&self.0))
    }

    async fn watch(
        &self,
        _: &TtrpcContext,
        req: WatchRequest,
        tx: ServerStreamSender<PbEvent>,
    ) -> ttrpc::Result<()> {
        let mut events = self.0.subscribe();
        loop {
            match events.recv().await {
                Ok(e) => {
                    if !req.id.is_empty() && e.vm_id != req.id {
                        continue;
                    }
                    if tx.send(&event_to_pb(&e)).await.is_err() {
                        return Ok(());
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return Ok(()),
            }
        }
    }
}

/// Checks the bytes of a spec as a client would send them, field numbers
/// and all; used by the tests of unknown-field handling.
pub fn decode_spec(bytes: &[u8]) -> Result<VmSpec, ApiError> {
    let p = pb::VmSpec::parse_from_bytes(bytes)
        .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
    spec_from_pb(&p)
}
