//! The shipped unit file: systemd accepts it without a single complaint,
//! and it keeps the two settings the agent's design depends on.

use std::process::Command;

use berth_tests::{binary, repo_root, scratch_dir};

fn verify(test: &str, unit_text: &str) -> (bool, String) {
    let dir = scratch_dir(test);
    let path = dir.join("berth-agent.service");
    std::fs::write(&path, unit_text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed (ci/install-deps.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn shipped_unit() -> String {
    let text = std::fs::read_to_string(repo_root().join("agent/dist/berth-agent.service")).unwrap();
    // Point ExecStart at the binary this build made, so verify can check it.
    text.replace(
        "/usr/local/bin/berth-agent",
        &binary("berth-agent").display().to_string(),
    )
}

#[test]
fn systemd_analyze_verify_accepts_the_unit_silently() {
    let unit = shipped_unit();
    let (ok, text) = verify("unit-ok", &unit);
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
    assert!(
        unit.lines().any(|l| l == "Type=notify"),
        "READY is sent once serving"
    );
    assert!(
        unit.lines().any(|l| l == "KillMode=process"),
        "VMs survive agent restarts"
    );
}

#[test]
fn the_check_catches_a_broken_unit() {
    let broken = shipped_unit().replace("KillMode=process", "KillMode=bogus");
    let (_, text) = verify("unit-broken", &broken);
    assert!(text.contains("kill mode"), "{text}");
}
