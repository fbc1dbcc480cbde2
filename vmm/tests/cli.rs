//! The command line of berth-vmm, without booting anything. (Also the reason
//! `cargo test --workspace` builds the berth-vmm binary the tests/ crate runs.)

use std::process::Command;

fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_berth-vmm"))
}

#[test]
fn no_kernel_is_a_clear_error() {
    let out = vmm().output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no kernel given: pass --kernel or --config"),
        "{stderr}"
    );
}

#[test]
fn malformed_config_file_names_the_file_and_the_problem() {
    let dir = std::env::temp_dir().join(format!("berth-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vm.json");
    std::fs::write(&path, "{\"vcpus\": 1, \"memory_mib\": 64,").unwrap();
    let out = vmm().arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid VM config") && stderr.contains("vm.json"),
        "{stderr}"
    );
}
