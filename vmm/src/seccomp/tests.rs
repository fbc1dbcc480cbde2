use super::*;

#[test]
fn the_built_in_inventory_compiles_for_every_kind() {
    let inventory = Inventory::built_in().unwrap();
    let filters = Filters::compile(&inventory).unwrap();
    for kind in ThreadKind::ALL {
        assert!(!filters.programs[&kind].is_empty(), "{kind:?}");
    }
}

#[test]
fn the_filters_built_in_at_build_time_are_the_inventory_compiled_now() {
    let compiled = Filters::compile(&Inventory::built_in().unwrap()).unwrap();
    let built_in = Filters::built_in().unwrap();
    assert_eq!(built_in, compiled);
    assert_eq!(Filters::from_bytes(&compiled.to_bytes()).unwrap(), compiled);
    let bytes = compiled.to_bytes();
    assert!(Filters::from_bytes(&bytes[..bytes.len() - 3]).is_err());
}

#[test]
fn no_kind_may_start_programs_trace_or_change_identity() {
    let inventory = Inventory::built_in().unwrap();
    let forbidden = [
        "execve",
        "execveat",
        "fork",
        "vfork",
        "ptrace",
        "setuid",
        "setgid",
        "setresuid",
        "mount",
        "umount2",
        "pivot_root",
        "chroot",
        "unshare",
        "setns",
        "init_module",
        "kexec_load",
        "bpf",
        "perf_event_open",
        "process_vm_writev",
        "keyctl",
    ];
    for kind in ThreadKind::ALL {
        let allowed = inventory.syscall_names(kind);
        for name in forbidden {
            assert!(!allowed.contains(&name), "{} may call {name}", kind.name());
        }
        // Nor can any kind create threads: that is the launcher's alone.
        assert!(!allowed.contains(&"clone") && !allowed.contains(&"clone3"));
    }
}

#[test]
fn ioctl_is_limited_to_named_requests() {
    let inventory = Inventory::built_in().unwrap();
    let vcpu = inventory.allowed(ThreadKind::Vcpu).unwrap();
    let requests = &vcpu[&libc::SYS_ioctl];
    assert!(requests.contains(&0xae80), "KVM_RUN");
    // KVM_SET_USER_MEMORY_REGION would let a vCPU thread remap guest memory.
    assert!(!requests.contains(&0x4020ae46));
    // A device worker makes no ioctl at all.
    let device = inventory.allowed(ThreadKind::Device).unwrap();
    assert!(!device.contains_key(&libc::SYS_ioctl));
}

#[test]
fn the_launcher_may_do_what_every_kind_may() {
    let inventory = Inventory::built_in().unwrap();
    let union = inventory.union().unwrap();
    for kind in ThreadKind::ALL {
        for (nr, requests) in inventory.allowed(kind).unwrap() {
            let launcher = &union[&nr];
            assert!(
                requests.iter().all(|r| launcher.contains(r)),
                "{kind:?} {nr}"
            );
        }
    }
}

#[test]
fn a_bad_inventory_is_refused_with_the_name_at_fault() {
    let text = include_str!("inventory.toml");
    let typo = text.replacen("\"epoll_wait\"", "\"epoll_wiat\"", 1);
    let err = Inventory::parse(&typo)
        .unwrap()
        .allowed(ThreadKind::Device)
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown system call epoll_wiat"),
        "{err}"
    );
    let unknown_ioctl = text.replacen("\"KVM_RUN\"", "\"KVM_RUN_FAST\"", 1);
    let err = Inventory::parse(&unknown_ioctl)
        .unwrap()
        .allowed(ThreadKind::Vcpu)
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown ioctl KVM_RUN_FAST"),
        "{err}"
    );
    let bare = text.replacen("\"KVM_RUN\",", "", 1).replacen(
        "\"read\", \"close\", \"fcntl\"",
        "\"read\", \"ioctl\"",
        1,
    );
    assert!(Inventory::parse(&bare)
        .unwrap()
        .allowed(ThreadKind::Vcpu)
        .is_err());
}

#[test]
fn thread_kinds_round_trip_their_names() {
    for kind in ThreadKind::ALL {
        assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
    }
    assert_eq!(ThreadKind::from_name("gpu"), None);
}
