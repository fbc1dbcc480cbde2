//! `nodectl top`: what each VM is entitled to and what it got, refreshed
//! like top(1).

use std::collections::HashMap;
use std::io::Write;

use berth_proto::vm as pb;
use berth_proto::vm_ttrpc::VmServiceClient;
use serde_json::Value;

use crate::agent::ctx;
use crate::failure::{from_ttrpc, Failure};
use crate::render::json::stats_json;
use crate::render::state_name;
use crate::render::table::print_table;
use crate::vm::vm_ref;

pub async fn run(
    vms: &VmServiceClient,
    once: bool,
    interval: u64,
    json: bool,
) -> Result<(), Failure> {
    let mut io = IoRates::default();
    loop {
        let all = crate::vm::list_all(vms, Default::default()).await?;
        let mut stats = Vec::new();
        for vm in &all {
            stats.push(
                vms.stats(ctx(), &vm_ref(&vm.spec.id))
                    .await
                    .map_err(from_ttrpc)?,
            );
        }
        io.update(&stats);
        print_top(&stats, &io, json, !once);
        if once {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_secs(interval.max(1))).await;
    }
}

/// Disk and network bytes per second of each VM, from two readings of its
/// device counters (none until the second reading).
#[derive(Default)]
struct IoRates {
    last: HashMap<String, (u64, u64, std::time::Instant)>,
    rates: HashMap<String, (f64, f64)>,
}

impl IoRates {
    fn update(&mut self, stats: &[pb::VmStats]) {
        let now = std::time::Instant::now();
        for s in stats {
            let (disk, rx, tx) = berth_agent::usage::io_totals(&s.devices);
            let net = rx + tx;
            if let Some((d0, n0, t0)) = self.last.get(&s.id) {
                let secs = now.duration_since(*t0).as_secs_f64().max(1e-3);
                let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
                self.rates
                    .insert(s.id.clone(), (rate(*d0, disk), rate(*n0, net)));
            }
            self.last.insert(s.id.clone(), (disk, net, now));
        }
    }

    fn cell(&self, id: &str, pick: fn(&(f64, f64)) -> f64) -> String {
        self.rates
            .get(id)
            .map(|r| format!("{:.1}", pick(r) / f64::from(1 << 20)))
            .unwrap_or_else(|| "-".into())
    }
}

fn print_top(stats: &[pb::VmStats], io: &IoRates, json: bool, refresh: bool) {
    if json {
        println!("{}", Value::Array(stats.iter().map(stats_json).collect()));
        return;
    }
    if refresh {
        print!("\x1b[H\x1b[2J");
    }
    let mut rows = vec![[
        "ID",
        "STATE",
        "VCPUS",
        "WEIGHT",
        "MAX",
        "SHARE",
        "CPU",
        "WAIT",
        "THROTTLED",
        "MEM MiB",
        "LIMIT MiB",
        "DISK MiB/s",
        "NET MiB/s",
        "BREACHES",
    ]
    .map(String::from)
    .to_vec()];
    for s in stats {
        rows.push(vec![
            s.id.clone(),
            state_name(s.state.enum_value_or_default()).into(),
            s.vcpus.to_string(),
            s.cpu_weight.to_string(),
            if s.cpu_max > 0.0 {
                format!("{:.2}", s.cpu_max)
            } else {
                "-".into()
            },
            format!("{:.2}", s.cpu_fair_share),
            format!("{:.2}", s.cpu_used),
            format!("{:.0}%", s.cpu_wait * 100.0),
            format!("{}/{}", s.throttled_periods, s.periods),
            (s.memory_resident_bytes >> 20).to_string(),
            (s.memory_limit_bytes >> 20).to_string(),
            io.cell(&s.id, |r| r.0),
            io.cell(&s.id, |r| r.1),
            s.breaches.join("; "),
        ]);
    }
    print_table(rows);
    let _ = std::io::stdout().flush();
}
