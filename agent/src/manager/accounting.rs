//! Accounting: samples of every running VM (its cgroup and its VMM's
//! counters) once a second, the entitlement reports judged from the last
//! two, and each VM's usage record, saved so that an agent restart loses
//! nothing (see usage.rs).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::admission::host_cpus;
use super::error::{ApiError, ApiResult};
use super::registry::{lock, now_ms, VmEntry};
use super::Manager;
use crate::entitlement::{self, Report, Sample};
use crate::spec::VmSpec;
use crate::store::{VmDir, VmState};
use crate::usage::{Reading, Usage, UsageRecord};
use crate::vmm_proc::control::rate_limit_from_pb;

const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Usage records are saved every this many samples (nothing is lost in
/// between: see usage.rs).
const USAGE_SAVE_EVERY: u64 = 5;

/// One VM's entitlement report, with what it was judged on.
#[derive(Clone, Debug)]
pub struct VmReport {
    pub spec: VmSpec,
    pub state: VmState,
    pub report: Report,
}

#[derive(Default)]
pub struct Accounting {
    /// The last two samples of each running VM.
    samples: Mutex<HashMap<String, (Sample, Sample)>>,
    /// Each VM's usage record, once read or first sampled.
    usage: Mutex<HashMap<String, UsageRecord>>,
    /// Records changed since they were last saved.
    unsaved: Mutex<HashSet<String>>,
}

/// `id`'s usage record, read from its file the first time.
fn usage_record<'a>(
    usage: &'a mut HashMap<String, UsageRecord>,
    id: &str,
    dir: &VmDir,
) -> &'a mut UsageRecord {
    usage
        .entry(id.to_string())
        .or_insert_with(|| UsageRecord::load(&dir.usage()))
}

/// Saves `id`'s usage record; it stays marked unsaved if that fails.
fn save_usage(id: &str, dir: &VmDir, record: &UsageRecord, unsaved: &mut HashSet<String>) {
    match record.save(&dir.usage()) {
        Ok(()) => {
            unsaved.remove(id);
        }
        Err(e) => tracing::error!(vm = %id, "cannot save usage: {e}"),
    }
}

impl Accounting {
    fn push_sample(&self, id: String, sample: Sample) {
        let mut samples = lock(&self.samples);
        let pair = match samples.remove(&id) {
            Some((_, last)) => (last, sample),
            None => (sample.clone(), sample),
        };
        samples.insert(id, pair);
    }

    /// Forgets a VM's samples (its VMM ended).
    pub(super) fn forget_samples(&self, id: &str) {
        lock(&self.samples).remove(id);
    }

    /// Forgets a deleted VM.
    pub(super) fn forget(&self, id: &str) {
        self.forget_samples(id);
        lock(&self.usage).remove(id);
        lock(&self.unsaved).remove(id);
    }

    /// Adds one reading to `id`'s usage record; saves the record when
    /// `save` (or when a new VMM appeared).
    fn account(&self, id: &str, dir: &VmDir, reading: &Reading, save: bool) {
        let mut usage = lock(&self.usage);
        let record = usage_record(&mut usage, id, dir);
        let new_vmm = record.cursor.pid != reading.pid;
        record.add(reading);
        let mut unsaved = lock(&self.unsaved);
        unsaved.insert(id.to_string());
        if save || new_vmm {
            save_usage(id, dir, record, &mut unsaved);
        }
    }

    /// Counts the breaches of this round's reports; saves at once the
    /// record of a VM that stopped, which gets no more samples.
    fn settle(&self, reports: &[VmReport], dir_of: impl Fn(&str) -> Option<VmDir>) {
        let mut usage = lock(&self.usage);
        let mut unsaved = lock(&self.unsaved);
        for r in reports {
            let id = &r.spec.id;
            let Some(record) = usage.get_mut(id) else {
                continue;
            };
            if !r.report.breaches.is_empty() {
                record.count_breaches(&r.report.breaches);
                unsaved.insert(id.clone());
            }
            if !r.state.has_vmm() && unsaved.contains(id) {
                if let Some(dir) = dir_of(id) {
                    save_usage(id, &dir, record, &mut unsaved);
                }
            }
        }
    }
}

impl Manager {
    /// Samples every running VM's cgroup and vCPU threads once a second.
    pub async fn sample(self: Arc<Self>) {
        for round in 0u64.. {
            tokio::time::sleep(SAMPLE_EVERY).await;
            if self.cgroups.layout.is_err() {
                continue;
            }
            let save_now = round % USAGE_SAVE_EVERY == 0;
            let running = self
                .registry
                .entries()
                .into_iter()
                .filter(|e| matches!(e.state(), VmState::Running | VmState::Paused));
            for entry in running {
                self.sample_one(&entry, save_now).await;
            }
            let reports = self.reports();
            self.accounting.settle(&reports, |id| {
                self.registry.entry(id).ok().map(|e| e.dir.clone())
            });
        }
    }

    async fn sample_one(&self, entry: &VmEntry, save_now: bool) {
        let (id, pid, started_at_ms, memory_mib) = {
            let inner = lock(&entry.inner);
            let r = &inner.record;
            (
                inner.spec.id.clone(),
                r.pid,
                r.started_at_ms,
                inner.spec.memory_mib,
            )
        };
        let Some(usage) = self.cgroups.usage(&id) else {
            return;
        };
        let vmm = match self.vmms.connect(&entry.dir).await {
            Ok(c) => c.stats(Duration::from_secs(1)).await.ok(),
            Err(_) => None,
        };
        let reading = Reading {
            pid,
            vmm_started_at_ms: started_at_ms,
            now_ms: now_ms(),
            memory_mib,
            cpu_ns: usage.cpu_ns,
            devices: vmm.as_ref().map(|v| crate::usage::io_totals(&v.devices)),
        };
        self.accounting.account(&id, &entry.dir, &reading, save_now);
        let vmm = vmm.unwrap_or_default();
        let sample = Sample {
            at: std::time::Instant::now(),
            usage,
            vcpu_run_ns: vmm.vcpu_run_ns,
            vcpu_wait_ns: vmm.vcpu_wait_ns,
            exits: vmm.exits,
            exits_by_reason: vmm.exits_by_reason.into_iter().collect(),
            unclaimed: entitlement::Unclaimed {
                port: vmm.unclaimed_port_accesses,
                mmio: vmm.unclaimed_mmio_accesses,
            },
            devices: (vmm.devices.into_iter())
                .map(|d| entitlement::DeviceUsage {
                    limit: rate_limit_from_pb(&d.limit),
                    device: d.device,
                    direction: d.direction,
                    bytes: d.bytes,
                    ops: d.ops,
                    throttled_ns: d.throttled_ns,
                })
                .collect(),
        };
        self.accounting.push_sample(id, sample);
    }

    /// What a VM has used since it was created.
    pub fn usage(&self, id: &str) -> ApiResult<Usage> {
        let entry = self.registry.entry(id)?;
        let mut usage = lock(&self.accounting.usage);
        Ok(usage_record(&mut usage, id, &entry.dir).usage.clone())
    }

    /// Entitlement reports of every VM (judged together, since shares
    /// depend on who else is busy); a VM without a VMM has an empty one.
    pub fn reports(&self) -> Vec<VmReport> {
        let samples = lock(&self.accounting.samples);
        let mut judged: Vec<(VmSpec, Report)> = Vec::new();
        let mut states = Vec::new();
        for entry in self.registry.entries() {
            let inner = lock(&entry.inner);
            let report = match samples.get(&inner.spec.id) {
                Some((prev, last)) if inner.record.state.has_vmm() => {
                    entitlement::measure(prev, last)
                }
                _ => Report::default(),
            };
            states.push(inner.record.state);
            judged.push((inner.spec.clone(), report));
        }
        drop(samples);
        entitlement::judge(&mut judged, host_cpus());
        judged
            .into_iter()
            .zip(states)
            .map(|((spec, report), state)| VmReport {
                spec,
                state,
                report,
            })
            .collect()
    }

    pub fn report(&self, id: &str) -> ApiResult<VmReport> {
        self.registry.entry(id)?;
        self.reports()
            .into_iter()
            .find(|r| r.spec.id == id)
            .ok_or_else(|| ApiError::NotFound(format!("no VM with id {id:?}")))
    }
}
