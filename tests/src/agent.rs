//! A real berth-agent for a test: its own state root, socket and config,
//! the probe as the allowed kernel, and a client built from the .proto
//! files. Dropping it kills the agent and every VMM it started.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::contract::common::Empty;
use crate::contract::node_ttrpc::NodeServiceClient;
use crate::contract::vm as pb;
use crate::contract::vm_ttrpc::VmServiceClient;
use crate::{binary, probe_elf, scratch_dir, Running};

pub struct TestAgent {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    /// Extra environment for the agent (and so for its VMMs).
    pub env: Vec<(String, String)>,
    /// Run the agent (and so its VMMs) in this network namespace.
    pub netns: Option<String>,
    process: Option<Running>,
    /// The state root is a tmpfs this agent mounted.
    tmpfs_state: bool,
}

pub struct Clients {
    pub vms: VmServiceClient,
    pub node: NodeServiceClient,
    pub images: crate::contract::image_ttrpc::ImageServiceClient,
}

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(60_000_000_000)
}

impl TestAgent {
    /// A config whose kernel root holds the probe and whose disk root is
    /// the test's own directory.
    pub fn new(test: &str) -> TestAgent {
        Self::with_config(test, "")
    }

    /// The same, with more config lines (reserved resources, overcommit).
    /// VM cgroups go under a parent of the test's own.
    pub fn with_config(test: &str, extra: &str) -> TestAgent {
        Self::with_config_env(test, extra, &[])
    }

    /// The same, with environment variables for the agent (test hooks of
    /// the VMMs it starts). `extra` may set its own `disk_roots`.
    pub fn with_config_env(test: &str, extra: &str, env: &[(&str, &str)]) -> TestAgent {
        Self::with_options(test, extra, env, None)
    }

    /// The same, inside network namespace `netns` if given.
    pub fn with_options(
        test: &str,
        extra: &str,
        env: &[(&str, &str)],
        netns: Option<&str>,
    ) -> TestAgent {
        let mut agent = Self::unstarted(test, extra, env, netns);
        agent.start();
        agent
    }

    /// A plain agent whose state root is a tmpfs of `size_kib`, so a test
    /// can fill it (ENOSPC) while the agent runs. Dropping it unmounts it.
    pub fn with_small_state_root(test: &str, size_kib: u64) -> TestAgent {
        let mut agent = Self::unstarted(test, "", &[], None);
        let state = agent.dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_kib}k"), "tmpfs"])
            .arg(&state)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount a tmpfs on {}", state.display());
        agent.tmpfs_state = true;
        agent.start();
        agent
    }

    fn unstarted(test: &str, extra: &str, env: &[(&str, &str)], netns: Option<&str>) -> TestAgent {
        let dir = scratch_dir(test);
        let socket = dir.join("agent.sock");
        let config = dir.join("agent.toml");
        let probe_dir = probe_elf().parent().unwrap().to_owned();
        std::fs::write(
            &config,
            format!(
                "state_root = {:?}\nsocket = {:?}\nkernel_roots = [{:?}]\n{}vmm_binary = {:?}\ncgroup_parent = {:?}\n{extra}\n",
                dir.join("state"),
                socket,
                probe_dir,
                if extra.contains("disk_roots") {
                    String::new()
                } else {
                    format!("disk_roots = [{:?}]\n", dir.join("disks"))
                },
                crate::vmm_binary(),
                cgroup_parent(test),
            ),
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("disks")).unwrap();
        let agent = TestAgent {
            dir,
            socket,
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns: netns.map(str::to_string),
            process: None,
            tmpfs_state: false,
        };
        agent
    }

    pub fn start(&mut self) {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(binary("berth-agent"));
                cmd
            }
            None => Command::new(binary("berth-agent")),
        };
        cmd.arg("--config").arg(&self.config);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut agent = Running::spawn(cmd);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "berth-agent did not listen on {}",
                self.socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent.wait_for_stderr("serving on", Duration::from_secs(5));
        self.process = Some(agent);
    }

    /// kill -9 of the agent: no clean-up of any kind runs.
    pub fn kill9(&mut self) -> String {
        let agent = self.process.take().expect("agent running");
        let _ = Command::new("kill")
            .args(["-9", &agent.pid().to_string()])
            .status();
        agent.wait(Duration::from_secs(10)).stderr
    }

    pub async fn clients(&self) -> Clients {
        let client = ttrpc::r#async::Client::connect(&format!("unix://{}", self.socket.display()))
            .await
            .expect("connect to the agent");
        Clients {
            vms: VmServiceClient::new(client.clone()),
            node: NodeServiceClient::new(client.clone()),
            images: crate::contract::image_ttrpc::ImageServiceClient::new(client),
        }
    }

    /// What the agent has logged so far (its stderr).
    pub fn log(&self) -> String {
        self.process
            .as_ref()
            .expect("agent running")
            .stderr_so_far()
    }

    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.dir.join("state/vms").join(id)
    }

    pub fn nodectl(&self) -> Command {
        let mut cmd = Command::new(binary("nodectl"));
        cmd.arg("--socket").arg(&self.socket);
        cmd
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        drop(self.process.take());
        // VMMs outlive agents by design: a test must not leave them behind.
        let pids = vmm_pids(&self.dir);
        for pid in &pids {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        // Then their cgroups (once the kernel has let go of the exited
        // VMMs), and the test's parent group.
        let test = self.dir.file_name().unwrap().to_string_lossy().into_owned();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids_gone = pids
                .iter()
                .all(|p| !Path::new(&format!("/proc/{p}")).exists());
            let mut left = false;
            for dir in cgroup_dirs_of(&test) {
                if let Ok(entries) = std::fs::read_dir(&dir) {
                    for e in entries.flatten().filter(|e| e.path().is_dir()) {
                        left |= std::fs::remove_dir(e.path()).is_err();
                    }
                }
                left |= std::fs::remove_dir(&dir).is_err() && dir.exists();
            }
            if (pids_gone && !left) || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.tmpfs_state {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.join("state"))
                .status();
        }
    }
}

/// The cgroup parent a test agent puts its VMs under (unique per test and
/// process, so parallel tests never touch each other's groups).
pub fn cgroup_parent(test: &str) -> String {
    let test = test.trim_start_matches("berth-test-");
    let test = test
        .rsplit_once('-')
        .filter(|(_, pid)| pid.parse::<u32>().is_ok())
        .map(|(t, _)| t)
        .unwrap_or(test);
    format!("bt{}-{test}", std::process::id())
}

/// Where that parent lives in each hierarchy this host might have.
pub fn cgroup_dirs_of(test: &str) -> Vec<PathBuf> {
    let parent = cgroup_parent(test);
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs: Vec<PathBuf> = ["cpu", "cpuacct", "cpuset", "memory"]
        .iter()
        .map(|h| root.join(h).join(&parent))
        .collect();
    dirs.push(root.join(format!("{parent}.slice")));
    dirs
}

/// The agent's pid.
pub fn agent_pid(agent: &TestAgent) -> u32 {
    agent.process.as_ref().expect("agent running").pid()
}

/// Pids of the berth-vmm processes whose config lives under `dir`.
pub fn vmm_pids(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("berth-vmm") && c.contains(&needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// A probe VM spec (the probe as kernel, `cmdline` for it).
/// A probe VM. The probe ends every mode with a reset, which means "done"
/// for a test, so its reboot leaves the VM Stopped instead of booting it
/// again (`on_reboot = stop`).
pub fn probe_spec(id: &str, vcpus: u32, cmdline: &str) -> pb::VmSpec {
    pb::VmSpec {
        id: id.into(),
        name: format!("{id}-name"),
        vcpus,
        memory_mib: 64,
        kernel: protobuf::MessageField::some(pb::Kernel {
            path: probe_elf().display().to_string(),
            cmdline: cmdline.into(),
            ..Default::default()
        }),
        restart: protobuf::MessageField::some(pb::RestartPolicy {
            on_reboot: pb::restart_policy::OnReboot::ON_REBOOT_STOP.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn vm_ref(id: &str) -> pb::VmRef {
    pb::VmRef {
        id: id.into(),
        ..Default::default()
    }
}

pub fn state_of(vm: &pb::Vm) -> pb::VmState {
    vm.status.state.enum_value_or_default()
}

/// The ttrpc status code of a failed call.
pub fn code_of<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> (ttrpc::Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected an error status, got {other:?}"),
    }
}

pub async fn create_and_start(c: &Clients, spec: pb::VmSpec) -> pb::Vm {
    let id = spec.id.clone();
    let req = pb::CreateVmRequest {
        spec: protobuf::MessageField::some(spec),
        ..Default::default()
    };
    c.vms.create(ctx(), &req).await.expect("create");
    c.vms.start(ctx(), &vm_ref(&id)).await.expect("start")
}

/// The console log's text.
pub fn console_text(agent: &TestAgent, id: &str) -> String {
    String::from_utf8_lossy(
        &std::fs::read(agent.vm_dir(id).join("run/console.log")).unwrap_or_default(),
    )
    .into_owned()
}

/// Waits until the console log contains `needle`.
pub fn wait_console(agent: &TestAgent, id: &str, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !console_text(agent, id).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{needle:?} never appeared on {id}'s console:\n{}",
            console_text(agent, id)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first "PROBE tick <n>" on a console (where a restored VM went on).
pub fn first_tick(agent: &TestAgent, id: &str) -> Option<u64> {
    console_text(agent, id).lines().find_map(|l| {
        l.trim_end_matches('\r')
            .strip_prefix("PROBE tick ")?
            .parse()
            .ok()
    })
}

/// The highest "PROBE tick <n>" on a console.
pub fn last_tick(agent: &TestAgent, id: &str) -> Option<u64> {
    console_text(agent, id)
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("PROBE tick "))
        .filter_map(|n| n.parse().ok())
        .max()
}

pub async fn get(c: &Clients, id: &str) -> pb::Vm {
    c.vms.get(ctx(), &vm_ref(id)).await.expect("get")
}

pub async fn node_info(c: &Clients) -> crate::contract::node::NodeInfo {
    c.node
        .get_node(ctx(), &Empty::default())
        .await
        .expect("get_node")
}
