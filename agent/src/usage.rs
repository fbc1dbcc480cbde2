//! Usage accounting: what each VM has used since it was created (CPU
//! seconds, GiB-hours of memory, disk and network bytes, broken
//! entitlement promises), for a controller to bill from.
//!
//! Each VM keeps `usage.json` beside its state: the totals and a cursor,
//! the cumulative counters (cgroup CPU time, the VMM's device counters) as
//! last read, with the VMM's pid. A reading adds only what grew since the
//! cursor, so the file can be written every few seconds and still lose
//! nothing when the agent dies: the counters it missed are still in the
//! cgroup and the VMM, and the next agent adds them from the saved cursor.
//! What is lost is only what a VMM counted and took with it when it died
//! between two saves.

use berth_proto::vmm_process::device::{DeviceId, Direction, LimiterId};
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Usage {
    pub cpu_seconds: f64,
    /// Guest memory held while a VMM ran, integrated over time.
    pub memory_gib_hours: f64,
    pub disk_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    /// Time with a VMM (Running or Paused).
    pub running_seconds: f64,
    /// When counting began (Unix ms).
    pub since_ms: u64,
    /// Sampling intervals in which each entitlement promise was broken.
    pub breaches: BTreeMap<String, u64>,
}

/// The cumulative counters as last read.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cursor {
    pub pid: i32,
    pub at_ms: u64,
    pub cpu_ns: u64,
    pub disk_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UsageRecord {
    pub usage: Usage,
    pub cursor: Cursor,
}

/// One reading of a running VM's counters.
#[derive(Clone, Debug, Default)]
pub struct Reading {
    pub pid: i32,
    pub vmm_started_at_ms: u64,
    pub now_ms: u64,
    pub memory_mib: u64,
    /// The VM's cgroup CPU time (cumulative for this VMM's group).
    pub cpu_ns: u64,
    /// Disk, net rx and net tx bytes from the VMM; None if it did not answer.
    pub devices: Option<(u64, u64, u64)>,
}

/// Bytes a VMM's devices moved: disks, what its NICs received, what they
/// sent.
pub fn io_totals(devices: &[berth_proto::common::DeviceStats]) -> (u64, u64, u64) {
    let mut totals = (0, 0, 0);
    for d in devices {
        match LimiterId::parse(&d.device, &d.direction) {
            Ok(LimiterId {
                device: DeviceId::Disk(_),
                ..
            }) => totals.0 += d.bytes,
            Ok(LimiterId {
                direction: Direction::Rx,
                ..
            }) => totals.1 += d.bytes,
            Ok(LimiterId {
                direction: Direction::Tx,
                ..
            }) => totals.2 += d.bytes,
            // Entropy is not I/O a VM is billed for; a limiter this agent
            // does not know counts nowhere.
            Ok(_) | Err(_) => {}
        }
    }
    totals
}

/// What grew: counters restart at 0 with a new VMM (and its new group).
fn growth(old: u64, new: u64) -> u64 {
    if new >= old {
        new - old
    } else {
        new
    }
}

impl UsageRecord {
    pub fn add(&mut self, r: &Reading) {
        let same_vmm = r.pid != 0 && self.cursor.pid == r.pid;
        let base = if same_vmm {
            self.cursor.clone()
        } else {
            // A VMM we have not read before: everything it counted is new,
            // and it has been running since it started.
            Cursor {
                at_ms: r.vmm_started_at_ms.max(self.cursor.at_ms),
                ..Cursor::default()
            }
        };
        let u = &mut self.usage;
        if u.since_ms == 0 {
            u.since_ms = r.vmm_started_at_ms.min(r.now_ms).max(1);
        }
        let seconds = r.now_ms.saturating_sub(base.at_ms) as f64 / 1000.0;
        u.running_seconds += seconds;
        u.memory_gib_hours += r.memory_mib as f64 / 1024.0 * seconds / 3600.0;
        u.cpu_seconds += growth(base.cpu_ns, r.cpu_ns) as f64 / 1e9;
        let mut cursor = Cursor {
            pid: r.pid,
            at_ms: r.now_ms,
            cpu_ns: r.cpu_ns,
            disk_bytes: base.disk_bytes,
            net_rx_bytes: base.net_rx_bytes,
            net_tx_bytes: base.net_tx_bytes,
        };
        if let Some((disk, rx, tx)) = r.devices {
            u.disk_bytes += growth(base.disk_bytes, disk);
            u.net_rx_bytes += growth(base.net_rx_bytes, rx);
            u.net_tx_bytes += growth(base.net_tx_bytes, tx);
            (cursor.disk_bytes, cursor.net_rx_bytes, cursor.net_tx_bytes) = (disk, rx, tx);
        }
        self.cursor = cursor;
    }

    pub fn count_breaches(&mut self, breaches: &[String]) {
        for b in breaches {
            *self.usage.breaches.entry(b.clone()).or_default() += 1;
        }
    }

    /// The record in `path`; a missing file is a fresh record. One that
    /// cannot be read is kept aside (`usage.json.unreadable`) and reported,
    /// and counting starts again.
    pub fn load(path: &Path) -> UsageRecord {
        match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => UsageRecord::default(),
            Err(e) => {
                tracing::error!(path = %path.display(), "cannot read usage: {e}");
                UsageRecord::default()
            }
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                let aside = path.with_extension("json.unreadable");
                let _ = std::fs::rename(path, &aside);
                tracing::error!(path = %path.display(), "unreadable usage record ({e}); kept as {} and counting anew", aside.display());
                UsageRecord::default()
            }),
        }
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("plain data serialises");
        bytes.push(b'\n');
        berth_proto::vmm_process::files::write_atomic(path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(pid: i32, now_ms: u64, cpu_ns: u64, disk: u64) -> Reading {
        Reading {
            pid,
            vmm_started_at_ms: 1_000,
            now_ms,
            memory_mib: 1024,
            cpu_ns,
            devices: Some((disk, 0, 0)),
        }
    }

    #[test]
    fn readings_add_what_grew_and_a_new_vmm_starts_from_zero() {
        let mut r = UsageRecord::default();
        r.add(&reading(7, 2_000, 500_000_000, 100));
        assert_eq!(r.usage.cpu_seconds, 0.5);
        assert_eq!(r.usage.disk_bytes, 100);
        assert_eq!(r.usage.running_seconds, 1.0, "since the VMM started");
        r.add(&reading(7, 3_000, 1_500_000_000, 150));
        assert_eq!(r.usage.cpu_seconds, 1.5);
        assert_eq!(r.usage.disk_bytes, 150);
        // A VMM that did not answer: its devices are not counted twice later.
        r.add(&Reading {
            devices: None,
            ..reading(7, 4_000, 1_500_000_000, 0)
        });
        r.add(&reading(7, 5_000, 1_500_000_000, 200));
        assert_eq!(r.usage.disk_bytes, 200);
        // A new VMM (restart): its counters start at 0.
        let mut fresh = reading(9, 6_000, 250_000_000, 30);
        fresh.vmm_started_at_ms = 5_500;
        r.add(&fresh);
        assert_eq!(r.usage.cpu_seconds, 1.75);
        assert_eq!(r.usage.disk_bytes, 230);
        assert_eq!(r.usage.running_seconds, 4.5);
        let gib_hours = 4.5 / 3600.0;
        assert!((r.usage.memory_gib_hours - gib_hours).abs() < 1e-12);
    }

    #[test]
    fn io_totals_split_disks_from_each_nic_direction() {
        let dev = |device: &str, direction: &str, bytes| berth_proto::common::DeviceStats {
            device: device.into(),
            direction: direction.into(),
            bytes,
            ..Default::default()
        };
        let devices = [
            dev("disk0", "io", 1),
            dev("disk1", "io", 2),
            dev("nic0", "rx", 10),
            dev("nic0", "tx", 100),
            dev("nic1", "rx", 20),
        ];
        assert_eq!(io_totals(&devices), (3, 30, 100));
    }

    #[test]
    fn a_record_round_trips_and_an_unreadable_one_is_kept_aside() {
        let dir = std::env::temp_dir().join(format!("berth-usage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("usage.json");
        let mut r = UsageRecord::default();
        r.add(&reading(7, 2_000, 500_000_000, 100));
        r.count_breaches(&["starved below weight share".into()]);
        r.save(&path).unwrap();
        assert_eq!(UsageRecord::load(&path), r);
        std::fs::write(&path, b"{garbage").unwrap();
        assert_eq!(UsageRecord::load(&path), UsageRecord::default());
        assert!(dir.join("usage.json.unreadable").exists());
    }
}
