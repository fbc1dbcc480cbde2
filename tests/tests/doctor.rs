//! `nodectl doctor` on this host: what is there is ok, a bridge a VM names
//! but nobody built fails with the command that builds it, and a host whose
//! /dev/net/tun is hidden (a mount namespace with an empty /dev/net) fails
//! the tun check with the fix.

use std::process::Command;

use berth_tests::agent::*;
use berth_tests::binary;
use berth_tests::contract::vm as pb;
use serde_json::Value;

fn findings(out: &std::process::Output) -> Vec<Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(list)) => list,
        _ => panic!(
            "doctor printed no JSON list:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn find<'a>(list: &'a [Value], check: &str, detail_has: &str) -> &'a Value {
    list.iter()
        .find(|f| f["check"] == check && f["detail"].as_str().unwrap_or("").contains(detail_has))
        .unwrap_or_else(|| panic!("no {check} finding mentioning {detail_has:?} in {list:#?}"))
}

struct Bridge(&'static str);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", self.0]).status();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn doctor_names_what_is_missing_and_how_to_fix_it() {
    let agent = TestAgent::new("doctor");
    let c = agent.clients().await;
    let present = Bridge("bdocok0");
    let _ = Command::new("ip").args(["link", "del", present.0]).status();
    assert!(Command::new("ip")
        .args(["link", "add", present.0, "type", "bridge"])
        .status()
        .unwrap()
        .success());
    for (id, bridge) in [("doc-a", present.0), ("doc-b", "bdocgone0")] {
        let mut spec = probe_spec(id, 1, "probe.mode=tick");
        spec.nics.push(pb::Nic {
            tap: format!("t{id}"),
            bridge: bridge.into(),
            ..Default::default()
        });
        let req = pb::CreateVmRequest {
            spec: protobuf::MessageField::some(spec),
            ..Default::default()
        };
        c.vms.create(ctx(), &req).await.unwrap();
    }

    let doctor = || {
        let mut cmd = Command::new(binary("nodectl"));
        cmd.args(["--json", "doctor", "--config"])
            .arg(&agent.config);
        cmd
    };
    let out = doctor().output().unwrap();
    let list = findings(&out);
    assert_eq!(
        find(&list, "tun", "/dev/net/tun")["verdict"],
        "ok",
        "{list:#?}"
    );
    assert_eq!(find(&list, "berth-vmm", "executable")["verdict"], "ok");
    assert_eq!(find(&list, "bridges", "bdocok0")["verdict"], "ok");
    let gone = find(&list, "bridges", "bdocgone0");
    assert_eq!(gone["verdict"], "FAIL");
    assert!(gone["detail"].as_str().unwrap().contains("doc-b"), "{gone}");
    assert_eq!(
        gone["fix"],
        "ip link add bdocgone0 type bridge && ip link set bdocgone0 up"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed check fails the command"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 check(s) failed"));

    // The same host with /dev/net/tun hidden.
    let script = format!(
        "mount -t tmpfs tmpfs /dev/net && exec {} --json doctor --config {}",
        binary("nodectl").display(),
        agent.config.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let list = findings(&out);
    let tun = find(&list, "tun", "/dev/net/tun");
    assert_eq!(tun["verdict"], "FAIL", "{list:#?}");
    assert!(
        tun["fix"].as_str().unwrap().contains("modprobe tun"),
        "{tun}"
    );
    assert!(
        tun["fix"]
            .as_str()
            .unwrap()
            .contains("mknod /dev/net/tun c 10 200"),
        "{tun}"
    );
    assert_eq!(out.status.code(), Some(1));
    // Hiding tun does not disturb the other checks.
    assert_eq!(find(&list, "bridges", "bdocok0")["verdict"], "ok");
}
