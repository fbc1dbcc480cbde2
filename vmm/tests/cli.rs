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

/// The KVM module /sys/module shows loaded, as --host-info names it.
fn loaded_flavour() -> &'static str {
    let loaded = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
    if loaded("kvm_pvm") {
        "pvm"
    } else if loaded("kvm_intel") {
        "intel"
    } else if loaded("kvm_amd") {
        "amd"
    } else {
        "unknown"
    }
}

#[test]
fn host_info_names_the_loaded_kvm_and_its_vcpu_limit() {
    let out = vmm().arg("--host-info").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["flavour"], loaded_flavour(), "{info}");
    let max = info["max_vcpus"].as_u64().unwrap();
    if std::path::Path::new("/dev/kvm").exists() {
        assert!((1..=254).contains(&max), "{info}");
        assert!(info["kvm_error"].is_null(), "{info}");
    }

    let out = vmm()
        .args(["--host-info", "--kvm-device", "/nonexistent/kvm"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["max_vcpus"], 0, "{info}");
    let why = info["kvm_error"].as_str().unwrap();
    assert!(why.contains("/nonexistent/kvm does not exist"), "{why}");
}
