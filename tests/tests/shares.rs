//! Host capacity, admission and CPU/memory shares, measured on this host's
//! real cgroups: the probe burns CPU and the kernel's own accounting says
//! what each VM got.

use std::time::{Duration, Instant};

use berth_tests::agent::*;
use berth_tests::contract::common::Empty;
use berth_tests::contract::vm as pb;
use berth_tests::report_mode;
use ttrpc::Code;

const BOOT: Duration = Duration::from_secs(30);
const WINDOW: Duration = Duration::from_secs(6);

fn burner(id: &str, weight: u32, max: f64, cpuset: &str) -> pb::VmSpec {
    let mut spec = probe_spec(id, 1, "probe.mode=burn");
    spec.cpu = protobuf::MessageField::some(pb::CpuPolicy {
        weight,
        max,
        cpuset: cpuset.into(),
        ..Default::default()
    });
    spec
}

async fn stats(c: &Clients, id: &str) -> pb::VmStats {
    c.vms.stats(ctx(), &vm_ref(id)).await.expect("stats")
}

/// CPU time each VM got over `WINDOW`, measured by the kernel (cgroup).
async fn cpu_over_window(c: &Clients, ids: &[&str]) -> Vec<f64> {
    let before: Vec<u64> = futures_all(c, ids).await;
    tokio::time::sleep(WINDOW).await;
    let after: Vec<u64> = futures_all(c, ids).await;
    before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 / 1e9 / WINDOW.as_secs_f64())
        .collect()
}

async fn futures_all(c: &Clients, ids: &[&str]) -> Vec<u64> {
    let mut v = Vec::new();
    for id in ids {
        v.push(stats(c, id).await.cpu_time_ns);
    }
    v
}

/// Waits until the sampler has seen the VM running (a first interval).
async fn wait_sampled(c: &Clients, id: &str) {
    let deadline = Instant::now() + BOOT;
    while stats(c, id).await.interval_ms == 0 || stats(c, id).await.cpu_time_ns == 0 {
        assert!(Instant::now() < deadline, "no stats for {id}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn weights_200_and_100_on_one_cpu_split_it_2_to_1_and_a_live_update_changes_that() {
    report_mode("cpu weights");
    let agent = TestAgent::new("shares-weights");
    let c = agent.clients().await;
    create_and_start(&c, burner("heavy", 200, 0.0, "1")).await;
    create_and_start(&c, burner("light", 100, 0.0, "1")).await;
    wait_console(&agent, "heavy", "PROBE burn 1", BOOT);
    wait_console(&agent, "light", "PROBE burn 1", BOOT);
    wait_sampled(&c, "heavy").await;
    wait_sampled(&c, "light").await;

    let used = cpu_over_window(&c, &["heavy", "light"]).await;
    let ratio = used[0] / used[1];
    eprintln!(
        "weights 200:100 on CPU 1: {:.3} and {:.3} CPUs, ratio {ratio:.2}",
        used[0], used[1]
    );
    assert!((1.6..=2.4).contains(&ratio), "ratio {ratio:.2} ({used:?})");
    assert!(
        used[0] + used[1] <= 1.1,
        "both are confined to one CPU: {used:?}"
    );

    let report = stats(&c, "heavy").await;
    assert_eq!(report.cpu_weight, 200);
    assert!(
        (report.cpu_fair_share - 2.0 / 3.0).abs() < 0.01,
        "{}",
        report.cpu_fair_share
    );

    // Live: the heavy one drops to weight 50 without a restart.
    let mut spec = get(&c, "heavy").await.spec.unwrap();
    spec.cpu.as_mut().unwrap().weight = 50;
    let pid = get(&c, "heavy").await.status.pid;
    let req = pb::UpdateVmRequest {
        spec: protobuf::MessageField::some(spec),
        ..Default::default()
    };
    c.vms.update(ctx(), &req).await.unwrap();
    assert_eq!(
        get(&c, "heavy").await.status.pid,
        pid,
        "updated live, not restarted"
    );
    let used = cpu_over_window(&c, &["heavy", "light"]).await;
    let ratio = used[0] / used[1];
    eprintln!("after the update, weights 50:100: ratio {ratio:.2}");
    assert!((0.3..=0.7).contains(&ratio), "ratio {ratio:.2} ({used:?})");

    // A running VM's other fields do not change live.
    let mut spec = get(&c, "heavy").await.spec.unwrap();
    spec.vcpus = 2;
    let req = pb::UpdateVmRequest {
        spec: protobuf::MessageField::some(spec),
        ..Default::default()
    };
    let (code, msg) = code_of(c.vms.update(ctx(), &req).await);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
}

#[tokio::test(flavor = "current_thread")]
async fn cpu_max_half_caps_usage_and_the_report_says_throttled() {
    report_mode("cpu max");
    let agent = TestAgent::new("shares-max");
    let c = agent.clients().await;
    create_and_start(&c, burner("capped", 100, 0.5, "")).await;
    wait_console(&agent, "capped", "PROBE burn 1", BOOT);
    wait_sampled(&c, "capped").await;
    let used = cpu_over_window(&c, &["capped"]).await[0];
    eprintln!("cpu_max 0.5: used {used:.3} CPUs");
    assert!(used <= 0.55, "used {used:.3} CPUs");
    assert!(used >= 0.3, "it did burn: {used:.3}");
    let report = stats(&c, "capped").await;
    assert!(
        report.throttled && report.throttled_periods > 0,
        "{report:?}"
    );
    assert_eq!(report.cpu_max, 0.5);
    assert!(
        report.breaches.is_empty(),
        "the cap working is no breach: {:?}",
        report.breaches
    );
}

#[tokio::test(flavor = "current_thread")]
async fn the_memory_limit_is_set_and_the_vm_runs_under_it() {
    report_mode("memory limit");
    let agent = TestAgent::new("shares-memory");
    let c = agent.clients().await;
    create_and_start(&c, probe_spec("mem", 1, "probe.mode=tick")).await;
    wait_console(&agent, "mem", "PROBE tick 5", BOOT);
    wait_sampled(&c, "mem").await;
    let report = stats(&c, "mem").await;
    // 64 MiB of guest RAM plus the default 64 MiB VMM allowance.
    assert_eq!(report.memory_limit_bytes, 128 << 20, "{report:?}");
    assert!(
        report.memory_resident_bytes > 0
            && report.memory_resident_bytes < report.memory_limit_bytes
    );
    assert_eq!(state_of(&get(&c, "mem").await), pb::VmState::RUNNING);
    // The kernel enforces what the report says.
    let parent = cgroup_parent("shares-memory");
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory")
        .join(&parent)
        .join("mem/memory.limit_in_bytes");
    let v2 = std::path::Path::new("/sys/fs/cgroup").join(format!("{parent}.slice/mem/memory.max"));
    let written = std::fs::read_to_string(&v1)
        .or_else(|_| std::fs::read_to_string(&v2))
        .unwrap();
    assert_eq!(written.trim(), (128u64 << 20).to_string());
}

fn host_cpus() -> u32 {
    std::thread::available_parallelism().unwrap().get() as u32
}

/// A node where exactly 3 one-vCPU VMs fit.
fn three_vcpu_node(test: &str) -> TestAgent {
    TestAgent::with_config(
        test,
        &format!(
            "reserved_cpus = {}\ncpu_overcommit = 3.0\n",
            host_cpus() - 1
        ),
    )
}

#[tokio::test(flavor = "current_thread")]
async fn admission_refuses_what_does_not_fit_and_capacity_moves() {
    report_mode("admission");
    let agent = three_vcpu_node("shares-admission");
    let c = agent.clients().await;
    let cap = c.node.get_capacity(ctx(), &Empty::default()).await.unwrap();
    assert_eq!(cap.allocatable_vcpus, 3, "{cap:?}");
    assert_eq!((cap.running_vcpus, cap.free_vcpus), (0, 3));
    assert!(cap.cgroup_version == "v1" || cap.cgroup_version == "v2");
    assert!(!cap.cpu_vendor.is_empty() && !cap.cpu_flags.is_empty());
    assert!(cap
        .disks
        .iter()
        .any(|d| d.role == "state_root" && d.free_bytes > 0));
    for id in ["a", "b", "c", "d"] {
        let mut spec = probe_spec(id, 1, "probe.mode=tick");
        if id == "d" {
            spec.vcpus = 2;
        }
        let req = pb::CreateVmRequest {
            spec: protobuf::MessageField::some(spec),
            ..Default::default()
        };
        c.vms.create(ctx(), &req).await.unwrap();
    }
    c.vms.start(ctx(), &vm_ref("a")).await.unwrap();
    c.vms.start(ctx(), &vm_ref("b")).await.unwrap();
    let cap = c.node.get_capacity(ctx(), &Empty::default()).await.unwrap();
    assert_eq!(
        (cap.running_vcpus, cap.free_vcpus, cap.defined_vcpus),
        (2, 1, 5)
    );
    let (code, msg) = code_of(c.vms.start(ctx(), &vm_ref("d")).await);
    assert_eq!(code, Code::RESOURCE_EXHAUSTED, "{msg}");
    assert!(
        msg.contains("needs 2 vCPUs; 1 of 3 allocatable vCPUs are free"),
        "{msg}"
    );
    assert_eq!(
        state_of(&get(&c, "d").await),
        pb::VmState::DEFINED,
        "nothing changed"
    );
    c.vms.start(ctx(), &vm_ref("c")).await.unwrap();
    let (code, _) = code_of(c.vms.start(ctx(), &vm_ref("d")).await);
    assert_eq!(code, Code::RESOURCE_EXHAUSTED);
    for id in ["a", "b"] {
        let stop = pb::StopVmRequest {
            id: id.into(),
            force: true,
            ..Default::default()
        };
        c.vms.stop(ctx(), &stop).await.unwrap();
    }
    let cap = c.node.get_capacity(ctx(), &Empty::default()).await.unwrap();
    assert_eq!((cap.running_vcpus, cap.free_vcpus), (1, 2));
    c.vms.start(ctx(), &vm_ref("d")).await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn parallel_starts_admit_exactly_as_many_as_fit() {
    report_mode("admission race");
    let agent = three_vcpu_node("shares-race");
    let mut clients = Vec::new();
    for i in 0..6 {
        let c = agent.clients().await;
        let req = pb::CreateVmRequest {
            spec: protobuf::MessageField::some(probe_spec(&format!("r{i}"), 1, "probe.mode=tick")),
            ..Default::default()
        };
        c.vms.create(ctx(), &req).await.unwrap();
        clients.push(c);
    }
    // Six clients start at once; the agent must admit exactly three.
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            c.vms.start(ctx(), &vm_ref(&format!("r{i}"))).await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let exhausted = results
        .into_iter()
        .filter_map(|r| r.err())
        .filter(|e| matches!(e, ttrpc::Error::RpcStatus(s) if s.code() == Code::RESOURCE_EXHAUSTED))
        .count();
    assert_eq!((ok, exhausted), (3, 3));
    let c = agent.clients().await;
    let cap = c.node.get_capacity(ctx(), &Empty::default()).await.unwrap();
    assert_eq!((cap.running_vcpus, cap.free_vcpus), (3, 0));
}

#[tokio::test(flavor = "current_thread")]
async fn drain_blocks_starts_keeps_running_vms_and_survives_a_restart() {
    report_mode("drain");
    let mut agent = TestAgent::new("shares-drain");
    {
        let c = agent.clients().await;
        create_and_start(&c, probe_spec("running", 1, "probe.mode=tick")).await;
        let req = pb::CreateVmRequest {
            spec: protobuf::MessageField::some(probe_spec("waiting", 1, "probe.mode=tick")),
            ..Default::default()
        };
        c.vms.create(ctx(), &req).await.unwrap();
        let cap = c.node.drain(ctx(), &Empty::default()).await.unwrap();
        assert!(cap.drained);
    }
    agent.kill9();
    agent.start();
    let c = agent.clients().await;
    let (code, msg) = code_of(c.vms.start(ctx(), &vm_ref("waiting")).await);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("drained"), "{msg}");
    assert_eq!(state_of(&get(&c, "running").await), pb::VmState::RUNNING);
    let before = last_tick(&agent, "running").unwrap_or(0);
    wait_console(
        &agent,
        "running",
        &format!("PROBE tick {}", before + 2),
        BOOT,
    );
    c.node.undrain(ctx(), &Empty::default()).await.unwrap();
    c.vms.start(ctx(), &vm_ref("waiting")).await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn with_reserve_on_define_create_refuses_what_would_not_fit() {
    report_mode("reserve on define");
    let agent = TestAgent::with_config(
        "shares-reserve",
        &format!(
            "reserved_cpus = {}\ncpu_overcommit = 3.0\nreserve_on_define = true\n",
            host_cpus() - 1
        ),
    );
    let c = agent.clients().await;
    let create = |id: &str| pb::CreateVmRequest {
        spec: protobuf::MessageField::some(probe_spec(id, 1, "probe.mode=tick")),
        ..Default::default()
    };
    for id in ["d1", "d2", "d3"] {
        c.vms.create(ctx(), &create(id)).await.unwrap();
    }
    let (code, msg) = code_of(c.vms.create(ctx(), &create("d4")).await);
    assert_eq!(code, Code::RESOURCE_EXHAUSTED, "{msg}");
    assert!(msg.contains("0 of 3 allocatable vCPUs are free"), "{msg}");
    let cap = c.node.get_capacity(ctx(), &Empty::default()).await.unwrap();
    assert!(cap.reserve_on_define);
    assert_eq!((cap.defined_vcpus, cap.free_vcpus), (3, 0));
    // What was reserved at Create starts without a second count.
    c.vms.start(ctx(), &vm_ref("d1")).await.unwrap();
}
