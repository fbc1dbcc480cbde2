//! Every conversion between berth.v1 messages and the agent's own types,
//! in one place: the services in this folder only convert and delegate.

use std::time::Duration;

use berth_proto::node::{Capacity, DiskSpace, Event as PbEvent};
use berth_proto::vm as pb;
use protobuf::{EnumOrUnknown, Message, MessageField};

use crate::manager::{ApiError, Event, Manager, VmView};
use crate::spec::{self, RestartKind, VmSpec};
use crate::store::VmState;
use crate::vmm_proc::control::{rate_limit_from_pb, rate_limit_to_pb};

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
pub(super) fn limit_field(l: spec::RateLimit) -> MessageField<berth_proto::common::RateLimit> {
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
    let discovery = discovery_from_pb(kernel.discovery)?;
    if let Some(r) = p.rng.as_ref() {
        refuse_unknown_fields("spec.rng", r)?;
    }
    let cloud_init = match p.cloud_init.as_ref() {
        Some(c) => {
            refuse_unknown_fields("spec.cloud_init", c)?;
            for (i, n) in c.nics.iter().enumerate() {
                refuse_unknown_fields(&format!("spec.cloud_init.nics[{i}]"), n)?;
            }
            Some(cloud_init_from_pb(c))
        }
        None => None,
    };
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
            discovery,
            from_disk: kernel.from_disk,
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
            on_reboot: match restart.on_reboot.enum_value_or_default() {
                pb::restart_policy::OnReboot::ON_REBOOT_RESTART => spec::OnReboot::Restart,
                pb::restart_policy::OnReboot::ON_REBOOT_STOP => spec::OnReboot::Stop,
            },
            max_retries: if restart.max_retries == 0 {
                spec::DEFAULT_MAX_RETRIES
            } else {
                restart.max_retries
            },
        },
        cloud_init,
        rng: p.rng.as_ref().map(|r| spec::Rng {
            limit: rate_limit_from_pb(&r.limit),
        }),
    })
}

/// A discovery this agent does not know (a newer client's) is refused,
/// never read as the default.
fn discovery_from_pb(
    d: EnumOrUnknown<pb::Discovery>,
) -> Result<berth_proto::vmm_process::config::Discovery, ApiError> {
    use berth_proto::vmm_process::config::Discovery;
    match d.enum_value() {
        Ok(pb::Discovery::DISCOVERY_ACPI) => Ok(Discovery::Acpi),
        Ok(pb::Discovery::DISCOVERY_LEGACY) => Ok(Discovery::Legacy),
        Err(n) => Err(ApiError::InvalidArgument(format!(
            "spec.kernel.discovery {n} is not a discovery this agent knows (ACPI or LEGACY)"
        ))),
    }
}

fn discovery_to_pb(d: berth_proto::vmm_process::config::Discovery) -> pb::Discovery {
    use berth_proto::vmm_process::config::Discovery;
    match d {
        Discovery::Acpi => pb::Discovery::DISCOVERY_ACPI,
        Discovery::Legacy => pb::Discovery::DISCOVERY_LEGACY,
    }
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
            discovery: discovery_to_pb(s.kernel.discovery).into(),
            from_disk: s.kernel.from_disk,
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
            on_reboot: EnumOrUnknown::new(match s.restart.on_reboot {
                spec::OnReboot::Restart => pb::restart_policy::OnReboot::ON_REBOOT_RESTART,
                spec::OnReboot::Stop => pb::restart_policy::OnReboot::ON_REBOOT_STOP,
            }),
            ..Default::default()
        }),
        cloud_init: s.cloud_init.as_ref().map(cloud_init_to_pb).into(),
        rng: (s.rng.as_ref())
            .map(|r| pb::Rng {
                limit: limit_field(r.limit),
                ..Default::default()
            })
            .into(),
        ..Default::default()
    }
}

fn cloud_init_from_pb(c: &pb::CloudInit) -> crate::cloud_init::CloudInit {
    crate::cloud_init::CloudInit {
        hostname: c.hostname.clone(),
        ssh_authorized_keys: c.ssh_authorized_keys.clone(),
        user_data: c.user_data.clone(),
        network_config: c.network_config.clone(),
        nics: (c.nics.iter())
            .map(|n| crate::cloud_init::StaticNic {
                address: n.address.clone(),
                gateway: n.gateway.clone(),
                dns: n.dns.clone(),
            })
            .collect(),
    }
}

fn cloud_init_to_pb(c: &crate::cloud_init::CloudInit) -> pb::CloudInit {
    pb::CloudInit {
        hostname: c.hostname.clone(),
        ssh_authorized_keys: c.ssh_authorized_keys.clone(),
        user_data: c.user_data.clone(),
        network_config: c.network_config.clone(),
        nics: (c.nics.iter())
            .map(|n| pb::StaticNic {
                address: n.address.clone(),
                gateway: n.gateway.clone(),
                dns: n.dns.clone(),
                ..Default::default()
            })
            .collect(),
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

pub(super) fn migration_to_pb(id: &str, m: crate::store::MigrationRecord) -> pb::MigrationInfo {
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

/// The most one ListVms answer holds, well under ttrpc's 4 MiB frame.
pub const MAX_LIST_BYTES: u64 = 2 << 20;

/// One page of VMs (in id order): at most `page_size` (0: any number) and
/// at most MAX_LIST_BYTES, with the token for the rest when they did not
/// all fit. A page always holds at least one VM, and one VM is far below
/// the bound (its labels and devices are bounded).
pub fn list_page(views: impl Iterator<Item = VmView>, page_size: u32) -> pb::ListVmsResponse {
    let mut page = pb::ListVmsResponse::default();
    let mut bytes = 0u64;
    for view in views {
        let vm = vm_to_pb(view);
        // A repeated field's element costs its size plus its tag and length.
        let cost = vm.compute_size() + 8;
        let full = page_size > 0 && page.vms.len() >= page_size as usize;
        if !page.vms.is_empty() && (full || bytes + cost > MAX_LIST_BYTES) {
            page.next_page_token = page
                .vms
                .last()
                .map(|v| v.spec.id.clone())
                .unwrap_or_default();
            return page;
        }
        bytes += cost;
        page.vms.push(vm);
    }
    page
}

pub(super) fn vm_to_pb(v: VmView) -> pb::Vm {
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
        unclaimed_port_accesses: r.unclaimed.port,
        unclaimed_mmio_accesses: r.unclaimed.mmio,
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

pub(super) fn snapshot_to_pb(s: crate::manager::SnapshotView) -> pb::SnapshotInfo {
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

pub(super) fn event_to_pb(e: &Event) -> PbEvent {
    PbEvent {
        at_ms: e.at_ms,
        vm_id: e.vm_id.clone(),
        kind: e.kind.word().into(),
        state: EnumOrUnknown::new(state_to_pb(e.state)),
        message: e.message.clone(),
        ..Default::default()
    }
}

/// The spec a Create, Update or PrepareMigrateIn carries, converted.
pub fn spec_of(what: &str, spec: &MessageField<pb::VmSpec>) -> Result<VmSpec, ttrpc::Error> {
    spec.as_ref()
        .ok_or_else(|| ApiError::InvalidArgument(format!("{what}: spec is missing")))
        .and_then(spec_from_pb)
        .map_err(status)
}

pub fn capacity_pb(m: &Manager) -> Capacity {
    let c = m.capacity();
    let cpu = crate::host::cpu_identity();
    let disks = (crate::host::roots_in_use(&m.config).into_iter())
        .map(|d| DiskSpace {
            role: d.role.into(),
            path: d.path,
            total_bytes: d.total_bytes,
            free_bytes: d.free_bytes,
            ..Default::default()
        })
        .collect();
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
        cpu_vendor: cpu.vendor,
        cpu_model: cpu.model,
        cpu_flags: cpu.flags,
        cgroup_version: m.cgroups.version().into(),
        drained: m.drained(),
        reserve_on_define: m.config.reserve_on_define,
        ..Default::default()
    }
}

/// Checks the bytes of a spec as a client would send them, field numbers
/// and all; used by the tests of unknown-field handling.
pub fn decode_spec(bytes: &[u8]) -> Result<VmSpec, ApiError> {
    let p = pb::VmSpec::parse_from_bytes(bytes)
        .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
    spec_from_pb(&p)
}
