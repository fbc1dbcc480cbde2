//! The core's unit tests, against a fake VMM (`tests/fake_vmm.rs`): every
//! operation in every state, persist-before-announce, and a start that
//! fails at each step leaving nothing behind.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::registry::lock;
use super::*;
use crate::config::JailSettings;
use crate::spec::Kernel;
use crate::store::{MigrationDirection, MigrationRecord};

mod fake_vmm;
mod launch;
mod lifecycle;

use fake_vmm::FakeVmms;

/// A node: a state root of its own, a manager over it, its fake VMMs.
struct Node {
    root: PathBuf,
    manager: Arc<Manager>,
    vmms: FakeVmms,
}

fn scratch(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let root = std::env::temp_dir().join(format!("berth-core-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::write(root.join("images/vmlinux"), b"kernel").unwrap();
    root
}

fn config(root: &std::path::Path) -> AgentConfig {
    AgentConfig {
        state_root: root.join("state"),
        socket: root.join("agent.sock"),
        kernel_roots: vec![root.join("images")],
        disk_roots: vec![root.join("images")],
        cgroup_version: crate::cgroups::VersionChoice::Off,
        // Room for every VM the tests start, whatever the host's CPUs.
        cpu_overcommit: 1000.0,
        jail: JailSettings {
            enabled: false,
            ..JailSettings::default()
        },
        ..AgentConfig::default()
    }
}

fn limits() -> Limits {
    Limits {
        max_vcpus: 8,
        host_memory_mib: 16 << 10,
        flavour: Default::default(),
    }
}

impl Node {
    async fn new(name: &str) -> Node {
        Self::with_config(name, config).await
    }

    async fn with_config(name: &str, make: impl Fn(&std::path::Path) -> AgentConfig) -> Node {
        let root = scratch(name);
        let vmms = FakeVmms::default();
        let manager = Manager::load_with(make(&root), limits(), Arc::new(vmms.clone()))
            .await
            .unwrap();
        Node {
            root,
            manager,
            vmms,
        }
    }

    /// The same state root and VMMs under a new agent.
    async fn restart(&self) -> Arc<Manager> {
        let config = self.manager.config.clone();
        Manager::load_with(config, limits(), Arc::new(self.vmms.clone()))
            .await
            .unwrap()
    }

    fn spec(&self, id: &str) -> VmSpec {
        VmSpec {
            id: id.into(),
            vcpus: 1,
            memory_mib: 64,
            kernel: Kernel {
                path: self.root.join("images/vmlinux"),
                ..Kernel::default()
            },
            ..VmSpec::default()
        }
    }

    fn state(&self, id: &str) -> VmState {
        self.manager.get(id).unwrap().record.state
    }

    /// The record as the state root holds it.
    fn on_disk(&self, id: &str) -> crate::store::VmRecord {
        let path = self.manager.config.vms_dir().join(id).join("state.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// Puts VM `id` into `state` in memory, as an operation in flight
    /// would have it (the transient states exist only under a VM's lock).
    fn force(&self, id: &str, state: VmState) {
        let entry = self.manager.registry.entry(id).unwrap();
        let mut inner = lock(&entry.inner);
        inner.record.state = state;
        if state == VmState::Migrating {
            inner.record.migration = Some(MigrationRecord {
                direction: MigrationDirection::Out,
                peer: "127.0.0.1:1".into(),
                ..Default::default()
            });
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
