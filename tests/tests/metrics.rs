//! The Prometheus endpoint, read as a scraper would (prometheus-parse), and
//! usage accounting across an agent kill -9.

use std::time::{Duration, Instant};

use berth_tests::agent::*;
use berth_tests::contract::vm as pb;
use berth_tests::*;
use prometheus_parse::{Scrape, Value};

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn scrape(port: u16) -> Scrape {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid exposition")
}

/// The value of `metric` with exactly these labels (others ignored).
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .find(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(v)))
        .and_then(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

async fn stats(c: &Clients, id: &str) -> pb::VmStats {
    c.vms.stats(ctx(), &vm_ref(id)).await.expect("stats")
}

/// Stats and a scrape from the same sampling round: both read between
/// two identical Stats answers.
async fn stats_and_scrape(c: &Clients, id: &str, port: u16) -> (pb::VmStats, Scrape) {
    for _ in 0..20 {
        let before = stats(c, id).await;
        let s = scrape(port);
        let after = stats(c, id).await;
        let same = before.exits == after.exits
            && before.usage == after.usage
            && before.memory_resident_bytes == after.memory_resident_bytes
            && before.cpu_time_ns == after.cpu_time_ns;
        if same {
            return (after, s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no quiet moment between two samples");
}

#[tokio::test(flavor = "current_thread")]
async fn the_metrics_endpoint_parses_and_its_values_match_stats() {
    report_mode("metrics");
    let port = free_port();
    let agent =
        TestAgent::with_config("metrics", &format!("metrics_listen = \"127.0.0.1:{port}\""));
    let c = agent.clients().await;
    let disk = agent.dir.join("disks/m.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut spec = probe_spec("m1", 1, "probe.mode=blk probe.blk_hold=1");
    spec.disks.push(pb::Disk {
        path: disk.display().to_string(),
        ..Default::default()
    });
    create_and_start(&c, spec).await;
    wait_console(&agent, "m1", "holding", Duration::from_secs(60));
    // The probe identified its disk and waits; hold the VM still so the
    // figures settle.
    c.vms.pause(ctx(), &vm_ref("m1")).await.expect("pause");
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let (st, s) = stats_and_scrape(&c, "m1", port).await;
    let vm = [("vm", "m1")];
    assert_eq!(
        value(&s, "berth_vm_state", &[("vm", "m1"), ("key", "Paused")]),
        Some(1.0)
    );
    assert_eq!(value(&s, "berth_vm_vcpus", &vm), Some(1.0));
    assert_eq!(
        value(&s, "berth_vm_memory_bytes", &vm),
        Some((64u64 << 20) as f64)
    );
    assert_eq!(
        value(&s, "berth_vm_memory_resident_bytes", &vm),
        Some(st.memory_resident_bytes as f64)
    );
    assert!(st.memory_resident_bytes > 0);
    assert_eq!(
        value(&s, "berth_vm_cpu_seconds_total", &vm),
        Some(st.cpu_time_ns as f64 / 1e9)
    );
    assert!(!st.exits_by_reason.is_empty());
    for (reason, n) in &st.exits_by_reason {
        assert_eq!(
            value(&s, "berth_vm_exits_total", &[("vm", "m1"), ("key", reason)]),
            Some(*n as f64),
            "exits {reason}"
        );
    }
    let disk0 = st
        .devices
        .iter()
        .find(|d| d.device == "disk0")
        .expect("disk0");
    assert!(
        disk0.ops >= 1 && disk0.bytes >= 20,
        "the get-id request: {disk0:?}"
    );
    let labels = [("vm", "m1"), ("device", "disk0"), ("direction", "io")];
    assert_eq!(
        value(&s, "berth_vm_device_bytes_total", &labels),
        Some(disk0.bytes as f64)
    );
    assert_eq!(
        value(&s, "berth_vm_device_ops_total", &labels),
        Some(disk0.ops as f64)
    );
    let usage = st.usage.clone().unwrap();
    assert!(
        usage.cpu_seconds > 0.0 && usage.memory_gib_hours > 0.0,
        "{usage:?}"
    );
    assert_eq!(
        value(&s, "berth_vm_usage_cpu_seconds_total", &vm),
        Some(usage.cpu_seconds)
    );
    assert_eq!(
        value(&s, "berth_vm_usage_disk_bytes_total", &vm),
        Some(usage.disk_bytes as f64)
    );

    assert_eq!(
        value(&s, "berth_node_vms", &[("state", "Paused")]),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "berth_node_vms", &[("state", "Running")]),
        Some(0.0)
    );
    assert_eq!(value(&s, "berth_node_allocated_vcpus", &[]), Some(1.0));
    let calls = value(
        &s,
        "berth_api_requests_total",
        &[("method", "VmService.Stats"), ("code", "OK")],
    )
    .expect("Stats calls counted");
    assert!(calls >= 1.0, "{calls}");
    let missing = c.vms.get(ctx(), &vm_ref("nope")).await;
    assert!(missing.is_err());
    let s = scrape(port);
    assert_eq!(
        value(
            &s,
            "berth_api_requests_total",
            &[("method", "VmService.Get"), ("code", "NOT_FOUND")]
        ),
        Some(1.0)
    );
    let latency = s
        .samples
        .iter()
        .find(|x| {
            x.metric == "berth_api_request_duration_seconds"
                && x.labels.get("method") == Some("VmService.Get")
        })
        .expect("a latency histogram");
    assert!(
        matches!(&latency.value, Value::Histogram(b) if !b.is_empty()),
        "{latency:?}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn usage_survives_an_agent_kill_9_and_misses_nothing() {
    report_mode("usage");
    let mut agent = TestAgent::new("usage");
    let c = agent.clients().await;
    create_and_start(&c, probe_spec("burner", 1, "probe.mode=burn")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let before = loop {
        let u = stats(&c, "burner").await.usage.unwrap_or_default();
        if u.cpu_seconds > 1.0 {
            break u;
        }
        assert!(Instant::now() < deadline, "no CPU counted: {u:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(agent.vm_dir("burner").join("usage.json").exists());
    let out = agent
        .nodectl()
        .args(["--json", "top", "--once"])
        .output()
        .unwrap();
    let top: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(top[0]["id"], "burner", "{top}");
    assert!(
        top[0]["usage"]["cpu_seconds"].as_f64().unwrap() > 0.0,
        "{top}"
    );
    let out = agent.nodectl().args(["top", "--once"]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("DISK MiB/s") && table.contains("burner"),
        "{table}"
    );
    agent.kill9();
    // The VM burns on while no agent counts.
    std::thread::sleep(Duration::from_secs(2));
    agent.start();
    let c = agent.clients().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // One VMM, one cgroup since creation: the usage must equal the group's
    // whole CPU time, the time with no agent included.
    let mut last = None;
    for _ in 0..20 {
        let st = stats(&c, "burner").await;
        let u = st.usage.clone().unwrap();
        let group = st.cpu_time_ns as f64 / 1e9;
        if (u.cpu_seconds - group).abs() < 1e-6 {
            assert!(
                u.cpu_seconds > before.cpu_seconds + 1.0,
                "{before:?} then {u:?}"
            );
            assert_eq!(u.since_ms, before.since_ms, "not counted anew");
            assert!(u.running_seconds >= before.running_seconds + 4.0, "{u:?}");
            last = None;
            break;
        }
        last = Some((u, group));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        last.is_none(),
        "usage and the group's CPU time never agreed: {last:?}"
    );

    // Stopped, the VM gets no more samples: its record is saved at once,
    // and what Stats says is what the file holds.
    let req = pb::StopVmRequest {
        id: "burner".into(),
        force: true,
        ..Default::default()
    };
    c.vms.stop(ctx(), &req).await.expect("stop");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let u = stats(&c, "burner").await.usage.unwrap();
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent.vm_dir("burner").join("usage.json")).unwrap())
            .unwrap();
    assert_eq!(
        file["usage"]["cpu_seconds"].as_f64(),
        Some(u.cpu_seconds),
        "{file}"
    );
}
