use super::*;

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDjMsNB7AmKbdtDy8VZyS8pmiPloTGRRhBXnkDCb7o7o test@berth";

fn with(f: impl FnOnce(&mut CloudInit)) -> Result<(), String> {
    let mut c = CloudInit::default();
    f(&mut c);
    validate(&c, 2).map_err(|e| e.to_string())
}

#[test]
fn a_full_part_passes() {
    with(|c| {
        c.hostname = "web-1.example.org".into();
        c.ssh_authorized_keys = vec![ED25519.into()];
        c.user_data = "#cloud-config\npackages: [htop]\n".into();
        c.nics = vec![StaticNic {
            address: "192.168.7.2/24".into(),
            gateway: "192.168.7.1".into(),
            dns: vec!["192.168.7.1".into()],
        }];
    })
    .unwrap();
    with(|c| c.network_config = "network:\n  version: 2\n  ethernets: {}\n".into()).unwrap();
}

#[test]
fn hostnames_follow_rfc_1123() {
    for good in ["a", "web-1", "x.y.z", &"a".repeat(63)] {
        check_hostname(good).unwrap();
    }
    for bad in ["-a", "a-", "a_b", "a..b", &"a".repeat(64), "ünï", "a b"] {
        let err = with(|c| c.hostname = bad.into()).unwrap_err();
        assert!(err.starts_with("cloud_init.hostname: "), "{err}");
    }
}

#[test]
fn keys_must_be_ssh_public_keys_of_their_stated_type() {
    check_ssh_key(ED25519).unwrap();
    let wrong_type = ED25519.replacen("ssh-ed25519", "ssh-rsa", 1);
    let cases = [
        ("ssh-ed25519", "expected"),
        ("ssh-dss AAAA", "unknown type"),
        ("ssh-ed25519 not*base64", "not base64"),
        (wrong_type.as_str(), "not a ssh-rsa key"),
        (
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5\nssh-rsa x",
            "control character",
        ),
        ("-----BEGIN OPENSSH PRIVATE KEY-----", "unknown type"),
    ];
    for (key, says) in cases {
        let err = with(|c| c.ssh_authorized_keys = vec![ED25519.into(), key.into()]).unwrap_err();
        assert!(
            err.starts_with("cloud_init.ssh_authorized_keys[1]: "),
            "{err}"
        );
        assert!(err.contains(says), "{key:?}: {err}");
    }
}

#[test]
fn user_data_is_at_most_16_kib() {
    with(|c| c.user_data = "x".repeat(MAX_USER_DATA)).unwrap();
    let err = with(|c| c.user_data = "x".repeat(MAX_USER_DATA + 1)).unwrap_err();
    assert_eq!(
        err,
        "cloud_init.user_data: 16385 bytes; at most 16384 (EC2's limit)"
    );
}

#[test]
fn network_config_must_parse_as_version_2() {
    let cases = [
        ("version: 2\nethernets: [", "does not parse as YAML"),
        ("version: 1\nconfig: []\n", "only network-config version 2"),
        ("ethernets: {}\n", "no `version: 2`"),
        ("a: 1\n---\nb: 2\n", "one YAML document"),
    ];
    for (text, says) in cases {
        let err = with(|c| c.network_config = text.into()).unwrap_err();
        assert!(err.starts_with("cloud_init.network_config: "), "{err}");
        assert!(err.contains(says), "{text:?}: {err}");
    }
}

#[test]
fn static_nics_are_checked_field_by_field() {
    let nic = |address: &str, gateway: &str, dns: &[&str]| StaticNic {
        address: address.into(),
        gateway: gateway.into(),
        dns: dns.iter().map(|s| s.to_string()).collect(),
    };
    let cases = [
        (nic("10.0.0.5", "", &[]), "cloud_init.nics[0].address: "),
        (nic("10.0.0.5/33", "", &[]), "not a prefix length (0-32)"),
        (nic("10.0.0.300/24", "", &[]), "not an IP address"),
        (
            nic("10.0.0.5/24", "fe80::1", &[]),
            "gateway: not of the address's family",
        ),
        (
            nic("10.0.0.5/24", "", &["dns.example"]),
            "dns: \"dns.example\" is not",
        ),
    ];
    for (n, says) in cases {
        let err = with(|c| c.nics = vec![n.clone()]).unwrap_err();
        assert!(err.contains(says), "{n:?}: {err}");
    }
    let three = vec![nic("10.0.0.5/24", "", &[]); 3];
    let err = with(|c| c.nics = three).unwrap_err();
    assert_eq!(err, "cloud_init.nics: 3 entries, but the VM has 2 NIC(s)");
    let err = with(|c| {
        c.nics = vec![nic("10.0.0.5/24", "", &[])];
        c.network_config = "version: 2\n".into();
    })
    .unwrap_err();
    assert!(err.contains("not both"), "{err}");
}

#[test]
fn hostile_network_config_is_an_error_not_a_crash() {
    // Deep nesting within the size limit: the parser must refuse it
    // rather than run the agent's stack out.
    let deep = "[".repeat(MAX_NETWORK_CONFIG - 1);
    let err = with(|c| c.network_config = deep).unwrap_err();
    assert!(err.starts_with("cloud_init.network_config: "), "{err}");
    let deep_map = "a:\n".to_string() + &" a:\n".repeat(4000);
    assert!(with(|c| c.network_config = deep_map).is_err());
}
