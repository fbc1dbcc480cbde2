//! The Prometheus text endpoint (`metrics_listen` in the agent config,
//! off by default): per-VM state, CPU, exits, device I/O, throttling,
//! memory, entitlement breaches and usage; per-node capacity, allocation
//! and VM counts; and the API's request counts and latencies.
//!
//! VM and node figures are read fresh from the manager at every scrape
//! (the same reports Stats returns); the API figures accumulate in
//! [`ApiMetrics`], which wraps every unary ttrpc method.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ttrpc::r#async::{MethodHandler, Service, TtrpcContext};

use crate::manager::Manager;
use crate::store::VmState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

/// Request counts (by method and status code) and latencies (by method).
pub struct ApiMetrics {
    requests: Family<CallLabels, Counter>,
    latency: HistogramFamily,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        fn buckets() -> Histogram {
            // 50 µs to ~13 s.
            Histogram::new(exponential_buckets(0.00005, 4.0, 10))
        }
        ApiMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(buckets),
        }
    }
}

struct Timed {
    method: String,
    inner: Box<dyn MethodHandler + Send + Sync>,
    metrics: Arc<ApiMetrics>,
}

#[async_trait::async_trait]
impl MethodHandler for Timed {
    async fn handler(
        &self,
        ctx: TtrpcContext,
        req: ttrpc::Request,
    ) -> ttrpc::Result<ttrpc::Response> {
        let started = Instant::now();
        let result = self.inner.handler(ctx, req).await;
        let code = match &result {
            Ok(resp) => resp
                .status
                .as_ref()
                .map(|s| format!("{:?}", s.code()))
                .unwrap_or_else(|| "OK".into()),
            Err(_) => "TRANSPORT".into(),
        };
        let method = self.method.clone();
        self.metrics
            .latency
            .get_or_create(&MethodLabels {
                method: method.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .requests
            .get_or_create(&CallLabels { method, code })
            .inc();
        result
    }
}

impl ApiMetrics {
    /// Every unary method of `services` counted and timed.
    pub fn wrap(self: &Arc<Self>, services: HashMap<String, Service>) -> HashMap<String, Service> {
        services
            .into_iter()
            .map(|(name, service)| {
                let short = name.rsplit('.').next().unwrap_or(&name).to_string();
                let methods = (service.methods.into_iter())
                    .map(|(method, inner)| {
                        let timed: Box<dyn MethodHandler + Send + Sync> = Box::new(Timed {
                            method: format!("{short}.{method}"),
                            inner,
                            metrics: self.clone(),
                        });
                        (method, timed)
                    })
                    .collect();
                let service = Service {
                    methods,
                    streams: service.streams,
                };
                (name, service)
            })
            .collect()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmKeyLabels {
    vm: String,
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    vm: String,
    device: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

type FloatCounter = Counter<f64, std::sync::atomic::AtomicU64>;

const STATES: [VmState; 9] = [
    VmState::Defined,
    VmState::Starting,
    VmState::Running,
    VmState::Paused,
    VmState::Stopping,
    VmState::Stopped,
    VmState::Crashed,
    VmState::Migrating,
    VmState::Migrated,
];

/// The per-VM metric families of one scrape.
struct VmFamilies {
    state: Family<VmKeyLabels, Gauge>,
    vcpus: Family<VmLabels, Gauge>,
    memory: Family<VmLabels, Gauge>,
    cpu: Family<VmLabels, FloatCounter>,
    vcpu_time: Family<VmKeyLabels, FloatCounter>,
    exits: Family<VmKeyLabels, Counter>,
    dev_bytes: Family<DeviceLabels, Counter>,
    dev_ops: Family<DeviceLabels, Counter>,
    dev_throttled: Family<DeviceLabels, FloatCounter>,
    cpu_throttled: Family<VmLabels, FloatCounter>,
    resident: Family<VmLabels, Gauge>,
    breaches: Family<VmKeyLabels, Counter>,
    u_cpu: Family<VmLabels, FloatCounter>,
    u_mem: Family<VmLabels, FloatCounter>,
    u_disk: Family<VmLabels, Counter>,
    u_rx: Family<VmLabels, Counter>,
    u_tx: Family<VmLabels, Counter>,
}

impl VmFamilies {
    fn register(registry: &mut Registry) -> VmFamilies {
        macro_rules! family {
            ($name:expr, $help:expr, $ty:ty) => {{
                let f = <$ty>::default();
                registry.register($name, $help, f.clone());
                f
            }};
        }
        let state = family!("vm_state", "1 for the VM's current state (label key)", Family<VmKeyLabels, Gauge>);
        let vcpus = family!("vm_vcpus", "vCPUs the VM is entitled to", Family<VmLabels, Gauge>);
        let memory = family!("vm_memory_bytes", "Guest memory the VM is entitled to", Family<VmLabels, Gauge>);
        let cpu = family!("vm_cpu_seconds", "CPU time of the VM's current VMM and its group", Family<VmLabels, FloatCounter>);
        let vcpu_time = family!("vm_vcpu_seconds", "Run time of each vCPU thread (key = vCPU index)", Family<VmKeyLabels, FloatCounter>);
        let exits = family!("vm_exits", "VM exits the VMM handled, by reason (key)", Family<VmKeyLabels, Counter>);
        let dev_bytes = family!("vm_device_bytes", "Bytes a disk or NIC direction moved", Family<DeviceLabels, Counter>);
        let dev_ops = family!("vm_device_ops", "Requests or frames a disk or NIC direction served", Family<DeviceLabels, Counter>);
        let dev_throttled = family!("vm_device_throttled_seconds", "Time a device's rate limit held it back", Family<DeviceLabels, FloatCounter>);
        let cpu_throttled = family!("vm_cpu_throttled_seconds", "Time the VM's group was throttled at its cpu.max", Family<VmLabels, FloatCounter>);
        let resident = family!("vm_memory_resident_bytes", "Memory the VM's group holds", Family<VmLabels, Gauge>);
        let breaches = family!("vm_entitlement_breaches", "Sampling intervals in which a promise was broken (key)", Family<VmKeyLabels, Counter>);
        let u_cpu = family!("vm_usage_cpu_seconds", "CPU used since the VM was created (billing)", Family<VmLabels, FloatCounter>);
        let u_mem = family!("vm_usage_memory_gib_hours", "Guest memory held over time since the VM was created", Family<VmLabels, FloatCounter>);
        let u_disk = family!("vm_usage_disk_bytes", "Disk bytes since the VM was created", Family<VmLabels, Counter>);
        let u_rx = family!("vm_usage_net_rx_bytes", "Bytes received since the VM was created", Family<VmLabels, Counter>);
        let u_tx = family!("vm_usage_net_tx_bytes", "Bytes sent since the VM was created", Family<VmLabels, Counter>);

        VmFamilies {
            state,
            vcpus,
            memory,
            cpu,
            vcpu_time,
            exits,
            dev_bytes,
            dev_ops,
            dev_throttled,
            cpu_throttled,
            resident,
            breaches,
            u_cpu,
            u_mem,
            u_disk,
            u_rx,
            u_tx,
        }
    }

    /// Adds every VM's figures; returns how many VMs are in each state.
    fn add_all(&self, manager: &Manager) -> HashMap<&'static str, i64> {
        let VmFamilies {
            state,
            vcpus,
            memory,
            cpu,
            vcpu_time,
            exits,
            dev_bytes,
            dev_ops,
            dev_throttled,
            cpu_throttled,
            resident,
            breaches,
            u_cpu,
            u_mem,
            u_disk,
            u_rx,
            u_tx,
        } = self;
        let mut by_state: HashMap<&'static str, i64> = HashMap::new();
        for crate::manager::VmReport {
            spec,
            state: vm_state,
            report: r,
        } in manager.reports()
        {
            let vm = VmLabels {
                vm: spec.id.clone(),
            };
            let keyed = |key: &str| VmKeyLabels {
                vm: spec.id.clone(),
                key: key.to_string(),
            };
            *by_state.entry(vm_state.name()).or_default() += 1;
            state.get_or_create(&keyed(vm_state.name())).set(1);
            vcpus.get_or_create(&vm).set(i64::from(spec.vcpus));
            memory
                .get_or_create(&vm)
                .set((spec.memory_mib << 20) as i64);
            cpu.get_or_create(&vm).inc_by(r.cpu_time_ns as f64 / 1e9);
            for (i, ns) in r.vcpu_run_ns.iter().enumerate() {
                vcpu_time
                    .get_or_create(&keyed(&i.to_string()))
                    .inc_by(*ns as f64 / 1e9);
            }
            for (reason, n) in &r.exits_by_reason {
                exits.get_or_create(&keyed(reason)).inc_by(*n);
            }
            for d in &r.devices {
                let labels = DeviceLabels {
                    vm: spec.id.clone(),
                    device: d.device.clone(),
                    direction: d.direction.clone(),
                };
                dev_bytes.get_or_create(&labels).inc_by(d.bytes);
                dev_ops.get_or_create(&labels).inc_by(d.ops);
                dev_throttled
                    .get_or_create(&labels)
                    .inc_by(d.throttled_ns as f64 / 1e9);
            }
            cpu_throttled
                .get_or_create(&vm)
                .inc_by(r.throttled_ns_total as f64 / 1e9);
            resident
                .get_or_create(&vm)
                .set(r.memory_resident_bytes as i64);
            if let Ok(u) = manager.usage(&spec.id) {
                for (kind, n) in &u.breaches {
                    breaches.get_or_create(&keyed(kind)).inc_by(*n);
                }
                u_cpu.get_or_create(&vm).inc_by(u.cpu_seconds);
                u_mem.get_or_create(&vm).inc_by(u.memory_gib_hours);
                u_disk.get_or_create(&vm).inc_by(u.disk_bytes);
                u_rx.get_or_create(&vm).inc_by(u.net_rx_bytes);
                u_tx.get_or_create(&vm).inc_by(u.net_tx_bytes);
            }
        }
        by_state
    }
}

/// The node's own figures.
fn register_node(registry: &mut Registry, manager: &Manager, by_state: &HashMap<&str, i64>) {
    let c = manager.capacity();
    let node = |registry: &mut Registry, name: &str, help: &str, value: i64| {
        let g: Gauge = Gauge::default();
        g.set(value);
        registry.register(name, help, g);
    };
    node(registry, "node_cpus", "Online host CPUs", i64::from(c.cpus));
    node(
        registry,
        "node_memory_bytes",
        "Host memory",
        (c.memory_mib << 20) as i64,
    );
    node(
        registry,
        "node_allocatable_vcpus",
        "vCPUs VMs may hold (after reserve and overcommit)",
        i64::from(c.allocatable_vcpus),
    );
    node(
        registry,
        "node_allocatable_memory_bytes",
        "Memory VMs may hold",
        (c.allocatable_memory_mib << 20) as i64,
    );
    node(
        registry,
        "node_allocated_vcpus",
        "vCPUs admission holds",
        i64::from(c.held_vcpus),
    );
    node(
        registry,
        "node_allocated_memory_bytes",
        "Memory admission holds",
        (c.held_memory_mib << 20) as i64,
    );
    node(
        registry,
        "node_drained",
        "1 while the node admits no starts",
        i64::from(manager.drained()),
    );
    let vms: Family<StateLabels, Gauge> = Family::default();
    for s in STATES {
        vms.get_or_create(&StateLabels {
            state: s.name().to_string(),
        })
        .set(*by_state.get(s.name()).unwrap_or(&0));
    }
    registry.register("node_vms", "VMs by state", vms);
}

/// The whole exposition, as a scrape gets it.
pub fn render(manager: &Manager, api: &ApiMetrics) -> String {
    let mut registry = Registry::with_prefix("berth");
    let by_state = VmFamilies::register(&mut registry).add_all(manager);
    register_node(&mut registry, manager, &by_state);
    registry.register(
        "api_requests",
        "API calls by method and status",
        api.requests.clone(),
    );
    registry.register(
        "api_request_duration_seconds",
        "API call latency by method",
        api.latency.clone(),
    );
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

/// Serves GET /metrics on `listen` until the agent exits. A minimal
/// HTTP/1.1 responder: one request per connection, nothing else served.
pub async fn serve(listener: tokio::net::TcpListener, manager: Arc<Manager>, api: Arc<ApiMetrics>) {
    loop {
        let (mut conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (manager, api) = (manager.clone(), api.clone());
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = String::from_utf8_lossy(&head);
            let mut words = line.split_whitespace();
            let (status, kind, body) = match (words.next(), words.next()) {
                (Some("GET"), Some("/metrics")) => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    render(&manager, &api),
                ),
                (Some("GET"), _) => ("404 Not Found", "text/plain", "only /metrics\n".into()),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET /metrics\n".into(),
                ),
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}
