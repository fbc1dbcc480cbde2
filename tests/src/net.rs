//! Host ends of guest networks for tests: a tap per test and a Python
//! AF_PACKET peer on it.

use std::process::Command;
use std::time::Duration;

use crate::{repo_root, Running};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A tap made for one test, up, and deleted when the test ends.
pub struct TestTap(pub String);

impl TestTap {
    pub fn create(suffix: &str) -> TestTap {
        let name = format!("bt{}{suffix}", std::process::id());
        let ip = |args: &[&str]| {
            let ok = Command::new("ip")
                .args(args)
                .status()
                .expect("ip (iproute2)")
                .success();
            assert!(ok, "ip {args:?} failed");
        };
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        ip(&["link", "set", &name, "up"]);
        TestTap(name)
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

pub fn net_peer(tap: &str) -> Running {
    let mut cmd = Command::new("python3");
    cmd.arg(repo_root().join("tests/support/net_peer.py"))
        .arg(tap);
    let mut peer = Running::spawn(cmd);
    peer.wait_for_output("READY", TIMEOUT);
    peer
}
