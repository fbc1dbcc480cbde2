//! The agent's binaries without a running node. (Also what makes
//! `cargo test --workspace` build them for the tests/ crate.)

use std::process::Command;

#[test]
fn a_malformed_config_is_refused_with_the_file_and_the_problem() {
    let dir = std::env::temp_dir().join(format!("berth-agent-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(&config, "state_root = \"/tmp/x\"\nsokcet = \"/tmp/s\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_berth-agent"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("agent.toml") && stderr.contains("unknown field `sokcet`"),
        "{stderr}"
    );
}

#[test]
fn nodectl_prints_shell_completions() {
    let out = Command::new(env!("CARGO_BIN_EXE_nodectl"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("_nodectl") && text.contains("pause"),
        "{text}"
    );
}
