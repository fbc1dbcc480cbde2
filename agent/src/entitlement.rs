//! "You get what you ask for", made checkable: what each VM was promised
//! (vCPUs, weight, cap, memory) against what it received over the last
//! sampling interval, with the promises it did not get spelled out.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::cgroups::Usage;
use crate::spec::VmSpec;

/// One sample of a running VM.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub usage: Usage,
    pub vcpu_run_ns: Vec<u64>,
    pub vcpu_wait_ns: Vec<u64>,
    /// The VMM's device counters and exits (cumulative).
    pub devices: Vec<DeviceUsage>,
    pub exits: u64,
    pub exits_by_reason: BTreeMap<String, u64>,
    pub unclaimed: Unclaimed,
}

/// Guest accesses no device of the VMM claimed (cumulative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unclaimed {
    pub port: u64,
    pub mmio: u64,
}

/// One disk or NIC direction, as its VMM counts it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceUsage {
    pub device: String,
    pub direction: String,
    pub bytes: u64,
    pub ops: u64,
    pub throttled_ns: u64,
    pub limit: crate::spec::RateLimit,
}

/// What the report says; the ttrpc edge turns it into VmStats.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub interval_ms: u64,
    pub cpu_used: f64,
    pub cpu_wait: f64,
    pub cpu_fair_share: f64,
    pub throttled: bool,
    pub throttled_periods: u64,
    pub periods: u64,
    pub throttled_ns: u64,
    pub cpu_time_ns: u64,
    pub vcpu_run_ns: Vec<u64>,
    pub memory_resident_bytes: u64,
    pub memory_limit_bytes: u64,
    pub breaches: Vec<String>,
    /// From the latest sample, cumulative for the current VMM.
    pub devices: Vec<DeviceUsage>,
    pub exits: u64,
    pub exits_by_reason: BTreeMap<String, u64>,
    pub unclaimed: Unclaimed,
    /// The cgroup's CPU throttling, cumulative for the VM's group.
    pub throttled_ns_total: u64,
}

pub const BREACH_MAX: &str = "throttled below cpu_max";
pub const BREACH_WEIGHT: &str = "starved below weight share";

/// A VM's use over an interval, before shares are known.
pub fn measure(prev: &Sample, last: &Sample) -> Report {
    let secs = last.at.duration_since(prev.at).as_secs_f64().max(1e-3);
    let delta = |a: u64, b: u64| b.saturating_sub(a);
    let waits: Vec<u64> = last
        .vcpu_wait_ns
        .iter()
        .zip(&prev.vcpu_wait_ns)
        .map(|(l, p)| delta(*p, *l))
        .collect();
    let cpu_wait = if waits.is_empty() {
        0.0
    } else {
        waits.iter().sum::<u64>() as f64 / 1e9 / secs / waits.len() as f64
    };
    let throttled_periods = delta(prev.usage.throttled_periods, last.usage.throttled_periods);
    Report {
        interval_ms: (secs * 1000.0) as u64,
        cpu_used: delta(prev.usage.cpu_ns, last.usage.cpu_ns) as f64 / 1e9 / secs,
        cpu_wait,
        throttled: throttled_periods > 0,
        throttled_periods,
        periods: delta(prev.usage.periods, last.usage.periods),
        throttled_ns: delta(prev.usage.throttled_ns, last.usage.throttled_ns),
        cpu_time_ns: last.usage.cpu_ns,
        vcpu_run_ns: last.vcpu_run_ns.clone(),
        memory_resident_bytes: last.usage.memory_bytes,
        memory_limit_bytes: last.usage.memory_limit_bytes,
        devices: last.devices.clone(),
        exits: last.exits,
        exits_by_reason: last.exits_by_reason.clone(),
        unclaimed: last.unclaimed,
        throttled_ns_total: last.usage.throttled_ns,
        ..Default::default()
    }
}

/// Host CPUs in a cpuset list ("0-3,6" → 5); None for an empty list.
pub fn cpus_in(list: &str) -> Option<u32> {
    let mut n = 0;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u32>().ok()?.checked_sub(a.parse::<u32>().ok()?)? + 1,
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

/// Fills in fair shares and breaches for every VM measured together.
/// VMs with the same cpuset compete for those CPUs; the others for the
/// host's. A VM counts as competing when it used a tenth of a CPU.
pub fn judge(reports: &mut [(VmSpec, Report)], host_cpus: u32) {
    let pool = |spec: &VmSpec| spec.cpu.cpuset.trim().to_string();
    let busy_weight = |p: &str, reports: &[(VmSpec, Report)]| -> f64 {
        reports
            .iter()
            .filter(|(s, r)| pool(s) == p && r.cpu_used > 0.1)
            .map(|(s, _)| f64::from(s.cpu.weight))
            .sum()
    };
    let weights: Vec<f64> = reports
        .iter()
        .map(|(s, _)| busy_weight(&pool(s), reports))
        .collect();
    for ((spec, report), total_weight) in reports.iter_mut().zip(weights) {
        let available = f64::from(cpus_in(&spec.cpu.cpuset).unwrap_or(host_cpus));
        let weight = f64::from(spec.cpu.weight);
        let mut share = available * weight / total_weight.max(weight);
        share = share.min(f64::from(spec.vcpus));
        if spec.cpu.max > 0.0 {
            share = share.min(spec.cpu.max);
        }
        report.cpu_fair_share = share;
        report.breaches.clear();
        if spec.cpu.max > 0.0 && report.throttled && report.cpu_used < 0.9 * spec.cpu.max {
            report.breaches.push(BREACH_MAX.into());
        }
        if report.cpu_wait > 0.1 && report.cpu_used < 0.8 * share {
            report.breaches.push(BREACH_WEIGHT.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(weight: u32, max: f64, cpuset: &str, vcpus: u32) -> VmSpec {
        let mut s = VmSpec {
            vcpus,
            ..Default::default()
        };
        s.cpu.weight = weight;
        s.cpu.max = max;
        s.cpu.cpuset = cpuset.into();
        s
    }

    fn report(cpu_used: f64, cpu_wait: f64, throttled: bool) -> Report {
        Report {
            cpu_used,
            cpu_wait,
            throttled,
            ..Default::default()
        }
    }

    #[test]
    fn usage_is_measured_per_second_of_interval() {
        let t0 = Instant::now();
        let a = Sample {
            at: t0,
            usage: Usage {
                cpu_ns: 1_000_000_000,
                throttled_periods: 4,
                ..Default::default()
            },
            vcpu_run_ns: vec![0, 0],
            vcpu_wait_ns: vec![0, 0],
            devices: Vec::new(),
            exits: 10,
            exits_by_reason: BTreeMap::new(),
            unclaimed: Unclaimed::default(),
        };
        let b = Sample {
            at: t0 + Duration::from_secs(2),
            usage: Usage {
                cpu_ns: 2_000_000_000,
                throttled_periods: 9,
                ..Default::default()
            },
            vcpu_run_ns: vec![5, 6],
            vcpu_wait_ns: vec![400_000_000, 0],
            devices: Vec::new(),
            exits: 25,
            exits_by_reason: [("hlt".to_string(), 25)].into(),
            unclaimed: Unclaimed { port: 3, mmio: 1 },
        };
        let r = measure(&a, &b);
        assert_eq!(r.interval_ms, 2000);
        assert_eq!(r.exits, 25, "cumulative, from the latest sample");
        assert_eq!(r.unclaimed, Unclaimed { port: 3, mmio: 1 });
        assert!((r.cpu_used - 0.5).abs() < 1e-9);
        assert!((r.cpu_wait - 0.1).abs() < 1e-9);
        assert_eq!((r.throttled, r.throttled_periods), (true, 5));
    }

    #[test]
    fn shares_follow_weights_within_a_cpuset_and_breaches_are_named() {
        let mut vms = vec![
            (spec(200, 0.0, "1", 1), report(0.5, 0.5, false)),
            (spec(100, 0.0, "1", 1), report(0.5, 0.5, false)),
            (spec(100, 0.5, "", 2), report(0.3, 0.0, true)),
            (spec(100, 0.5, "", 2), report(0.49, 0.0, true)),
        ];
        judge(&mut vms, 2);
        assert!((vms[0].1.cpu_fair_share - 2.0 / 3.0).abs() < 1e-9);
        assert!((vms[1].1.cpu_fair_share - 1.0 / 3.0).abs() < 1e-9);
        // Weight 200 got 0.5 of its 0.67 while waiting: starved.
        assert_eq!(vms[0].1.breaches, vec![BREACH_WEIGHT.to_string()]);
        // Weight 100 got more than its share: no breach.
        assert!(vms[1].1.breaches.is_empty());
        // Throttled at 0.3 of a 0.5 cap: broken; at 0.49: the cap working.
        assert_eq!(vms[2].1.breaches, vec![BREACH_MAX.to_string()]);
        assert!(vms[3].1.breaches.is_empty() && vms[3].1.throttled);
        assert!((vms[2].1.cpu_fair_share - 0.5).abs() < 1e-9);
        assert_eq!(cpus_in("0-3,6"), Some(5));
        assert_eq!(cpus_in(""), None);
        assert_eq!(cpus_in("3-1"), None);
    }
}
