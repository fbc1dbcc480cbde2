//! Output for scripts (`--json`): each answer of the agent as one JSON
//! value, every field whole (tables cut long cells).

use berth_agent::doctor::Finding;
use berth_proto::image as image_pb;
use berth_proto::node::{Capacity, Event, NodeInfo};
use berth_proto::vm as pb;
use serde_json::{json, Value};

use super::state_name;

pub fn vm_json(vm: &pb::Vm) -> Value {
    let spec = vm.spec.clone().unwrap_or_default();
    let status = vm.status.clone().unwrap_or_default();
    let kernel = spec.kernel.clone().unwrap_or_default();
    let cpu = spec.cpu.clone().unwrap_or_default();
    let restart = spec.restart.clone().unwrap_or_default();
    json!({
        "id": spec.id,
        "name": spec.name,
        "labels": spec.labels,
        "vcpus": spec.vcpus,
        "memory_mib": spec.memory_mib,
        "kernel": {"path": kernel.path, "initrd": kernel.initrd, "cmdline": kernel.cmdline,
                   "discovery": discovery_name(kernel.discovery.enum_value()),
                   "from_disk": kernel.from_disk},
        "disks": spec.disks.iter().map(|d| json!({"path": d.path, "read_only": d.read_only, "serial": d.serial})).collect::<Vec<_>>(),
        "nics": spec.nics.iter().map(|n| json!({"tap": n.tap, "bridge": n.bridge, "mac": n.mac})).collect::<Vec<_>>(),
        "cpu": {"weight": cpu.weight, "max": cpu.max, "cpuset": cpu.cpuset},
        "restart": restart_json(&restart),
        "state": state_name(status.state.enum_value_or_default()),
        "pid": status.pid,
        "started_at_ms": status.started_at_ms,
        "restarts": status.restarts,
        "last_exit": status.last_exit,
        "console_log": status.console_log,
        "migration": status.migration.as_ref().map(migration_json),
        "cloud_init": spec.cloud_init.as_ref().map(cloud_init_json),
    })
}

fn discovery_name(d: Result<pb::Discovery, i32>) -> Value {
    match d {
        Ok(pb::Discovery::DISCOVERY_ACPI) => "acpi".into(),
        Ok(pb::Discovery::DISCOVERY_LEGACY) => "legacy".into(),
        Err(n) => n.into(),
    }
}

fn restart_json(r: &pb::RestartPolicy) -> Value {
    use pb::restart_policy::{Kind, OnReboot};
    let kind: Value = match r.kind.enum_value() {
        Ok(Kind::NEVER) => "never".into(),
        Ok(Kind::ON_FAILURE) => "on-failure".into(),
        Ok(Kind::ALWAYS) => "always".into(),
        Err(n) => n.into(),
    };
    let on_reboot: Value = match r.on_reboot.enum_value() {
        Ok(OnReboot::ON_REBOOT_RESTART) => "restart".into(),
        Ok(OnReboot::ON_REBOOT_STOP) => "stop".into(),
        Err(n) => n.into(),
    };
    json!({"kind": kind, "max_retries": r.max_retries, "on_reboot": on_reboot})
}

fn cloud_init_json(c: &pb::CloudInit) -> Value {
    json!({
        "hostname": c.hostname, "ssh_authorized_keys": c.ssh_authorized_keys,
        "user_data": c.user_data, "network_config": c.network_config,
        "nics": c.nics.iter().map(|n| json!({"address": n.address, "gateway": n.gateway, "dns": n.dns})).collect::<Vec<_>>(),
    })
}

pub fn migration_json(m: &pb::MigrationInfo) -> Value {
    json!({
        "id": m.id, "direction": m.direction, "phase": m.phase, "peer": m.peer,
        "started_at_ms": m.started_at_ms, "iteration": m.iteration,
        "bytes_sent": m.bytes_sent, "dirty_rate_bytes_per_s": m.dirty_rate_bytes_per_s,
        "remaining_bytes": m.remaining_bytes, "expected_downtime_ms": m.expected_downtime_ms,
        "downtime_ms": m.downtime_ms, "total_ms": m.total_ms,
        "memory_bytes": m.memory_bytes, "error": m.error,
    })
}

pub fn snapshot_json(s: &pb::SnapshotInfo) -> Value {
    json!({
        "vm": s.vm_id, "name": s.name, "created_at_ms": s.created_at_ms, "disk_bytes": s.disk_bytes,
        "memory_bytes": s.memory_bytes, "pause_ms": s.pause_ms, "path": s.path,
    })
}

/// The outcome of an action on a label selector, member by member.
pub fn group_json(reply: &pb::GroupActionResponse) -> Value {
    let members: Vec<Value> = (reply.results.iter())
        .map(|r| {
            json!({"id": r.id, "ok": r.ok, "error": r.error,
                   "state": state_name(r.state.enum_value_or_default()),
                   "snapshot": r.snapshot.as_ref().map(snapshot_json)})
        })
        .collect();
    json!({"results": members, "all_paused_at_ms": reply.all_paused_at_ms,
           "resumed_at_ms": reply.resumed_at_ms})
}

/// One VM's line of `top`.
pub fn stats_json(s: &pb::VmStats) -> Value {
    json!({
        "id": s.id, "state": state_name(s.state.enum_value_or_default()),
        "vcpus": s.vcpus, "cpu_weight": s.cpu_weight, "cpu_max": s.cpu_max, "cpuset": s.cpuset,
        "cpu_fair_share": s.cpu_fair_share, "cpu_used": s.cpu_used, "cpu_wait": s.cpu_wait,
        "throttled": s.throttled, "throttled_periods": s.throttled_periods, "periods": s.periods,
        "memory_mib": s.memory_mib, "memory_resident_bytes": s.memory_resident_bytes,
        "memory_limit_bytes": s.memory_limit_bytes, "interval_ms": s.interval_ms,
        "breaches": s.breaches, "exits": s.exits,
        "unclaimed_port_accesses": s.unclaimed_port_accesses,
        "unclaimed_mmio_accesses": s.unclaimed_mmio_accesses,
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
}

pub fn image_json(i: &image_pb::Image) -> Value {
    json!({
        "name": i.name, "kind": i.kind, "digest": i.digest, "size_bytes": i.size_bytes,
        "disk_bytes": i.disk_bytes, "labels": i.labels, "created_at_ms": i.created_at_ms,
        "source_format": i.source_format, "source_digest": i.source_digest, "source": i.source,
        "path": i.path, "used_by": i.used_by, "copies": i.copies,
    })
}

pub fn capacity_json(c: &Capacity) -> Value {
    let disks: Vec<Value> = c
        .disks
        .iter()
        .map(|d| json!({"role": d.role, "path": d.path, "total_bytes": d.total_bytes, "free_bytes": d.free_bytes}))
        .collect();
    json!({
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
    })
}

pub fn node_json(n: &NodeInfo) -> Value {
    json!({
        "hostname": n.hostname, "agent_version": n.agent_version, "api_version": n.api_version,
        "hypervisor": n.hypervisor, "kvm_module": n.kvm_module, "max_vcpus": n.max_vcpus,
        "features": n.features, "kernel_release": n.kernel_release, "quarantined": n.quarantined,
    })
}

pub fn event_json(e: &Event) -> Value {
    let state = state_name(e.state.enum_value_or_default());
    json!({"at_ms": e.at_ms, "vm": e.vm_id, "kind": e.kind, "state": state, "message": e.message})
}

pub fn finding_json(f: &Finding) -> Value {
    json!({"check": f.check, "verdict": f.verdict.name(), "detail": f.detail, "fix": f.fix})
}
