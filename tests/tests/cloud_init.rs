//! The cloud-init part of a VM document through a real agent: the NoCloud
//! seed it writes (checked with blkid and mtools, as cloud-init's own
//! discovery would see it), the guest reading that disk, the seed following
//! the spec across an Update, and each bad field refused by name.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use berth_tests::agent::*;
use berth_tests::contract::vm as pb;
use berth_tests::*;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDjMsNB7AmKbdtDy8VZyS8pmiPloTGRRhBXnkDCb7o7o test@berth";

fn tool(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} (ci/install-deps.sh installs it): {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file of the seed, read with mtools.
fn seed_file(seed: &Path, name: &str) -> String {
    tool(
        "mtype",
        &["-i", &seed.display().to_string(), &format!("::{name}")],
    )
}

fn cloud_spec(id: &str, cmdline: &str, tap: &str) -> pb::VmSpec {
    let mut spec = probe_spec(id, 1, cmdline);
    spec.nics.push(pb::Nic {
        tap: tap.into(),
        ..Default::default()
    });
    spec.cloud_init = protobuf::MessageField::some(pb::CloudInit {
        hostname: "web-1".into(),
        ssh_authorized_keys: vec![KEY.into()],
        user_data: "#cloud-config\nruncmd: [[touch, /ran]]\n".into(),
        nics: vec![pb::StaticNic {
            address: "192.0.2.10/24".into(),
            gateway: "192.0.2.1".into(),
            dns: vec!["192.0.2.53".into()],
            ..Default::default()
        }],
        ..Default::default()
    });
    spec
}

#[tokio::test(flavor = "current_thread")]
async fn the_seed_holds_the_spec_and_the_guest_reads_it() {
    report_mode("cloud_init");
    let agent = TestAgent::new("cloud-init");
    let c = agent.clients().await;
    let tap = format!("bci{}", std::process::id());
    let cmdline = "probe.mode=blk probe.blk_read=0:8";
    create_and_start(&c, cloud_spec("ci", cmdline, &tap)).await;
    let seed = agent.vm_dir("ci").join("cloud-init-seed.img");

    let ids = tool("blkid", &["-o", "export", &seed.display().to_string()]);
    assert!(
        ids.contains("LABEL=CIDATA") && ids.contains("TYPE=vfat"),
        "{ids}"
    );
    let listing = tool("mdir", &["-b", "-i", &seed.display().to_string(), "::"]);
    for name in ["meta-data", "user-data", "network-config"] {
        assert!(listing.contains(name), "{name} in {listing}");
    }
    let meta = seed_file(&seed, "meta-data");
    assert!(meta.contains("instance-id: \"ci\""), "{meta}");
    assert!(meta.contains("local-hostname: \"web-1\""), "{meta}");
    assert!(meta.contains(&format!("  - \"{KEY}\"")), "{meta}");
    assert_eq!(
        seed_file(&seed, "user-data"),
        "#cloud-config\nruncmd: [[touch, /ran]]\n"
    );
    let net = seed_file(&seed, "network-config");
    let vm = get(&c, "ci").await;
    // The NIC had no MAC in the spec: the one the VMM got is the one the
    // network config matches on.
    let mac = std::fs::read_to_string(format!("/sys/class/net/{tap}/address")).unwrap();
    assert!(vm.spec.nics[0].mac.is_empty());
    assert!(net.contains("- \"192.0.2.10/24\""), "{net}");
    assert!(net.contains("via: \"192.0.2.1\""), "{net}");
    assert!(net.contains("addresses: [\"192.0.2.53\"]"), "{net}");
    let guest_mac = net
        .lines()
        .find_map(|l| l.trim().strip_prefix("macaddress: "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    assert!(guest_mac.starts_with("02:b3:"), "{net}");
    assert_ne!(
        guest_mac,
        mac.trim(),
        "the tap's own MAC is the host side's"
    );

    // The guest sees the seed as a read-only disk after the spec's disks
    // (here the only one), byte for byte.
    wait_console(&agent, "ci", "PROBE done", Duration::from_secs(30));
    let console = console_text(&agent, "ci");
    assert!(
        console.contains("PROBE blk dev=0 capacity=2048 ro=1 id=cidata"),
        "{console}"
    );
    let bytes = std::fs::read(&seed).unwrap();
    let fnv = fnv1a(&bytes[..8 * 512]);
    assert!(
        console.contains(&format!(
            "PROBE blk dev=0 read start=0 count=8 status=0 fnv={fnv:016x}"
        )),
        "{console}"
    );

    // A changed spec is what the next Start's seed says (the probe ended
    // itself: the VM is Stopped).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while state_of(&get(&c, "ci").await) != pb::VmState::STOPPED {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            get(&c, "ci").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut spec = get(&c, "ci").await.spec.unwrap();
    spec.cloud_init.as_mut().unwrap().hostname = "web-2".into();
    let req = pb::UpdateVmRequest {
        spec: protobuf::MessageField::some(spec),
        ..Default::default()
    };
    c.vms.update(ctx(), &req).await.expect("update");
    c.vms.start(ctx(), &vm_ref("ci")).await.expect("start");
    let meta = seed_file(&seed, "meta-data");
    assert!(meta.contains("local-hostname: \"web-2\""), "{meta}");
    assert!(
        meta.contains("instance-id: \"ci\""),
        "same VM, same instance: {meta}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn each_bad_field_is_refused_by_name() {
    report_mode("cloud_init_bad");
    let agent = TestAgent::new("cloud-init-bad");
    let c = agent.clients().await;
    type Change = fn(&mut pb::CloudInit);
    let cases: [(Change, &str); 6] = [
        (
            |ci| ci.user_data = "x".repeat(16 * 1024 + 1),
            "cloud_init.user_data: 16385 bytes; at most 16384 (EC2's limit)",
        ),
        (
            |ci| ci.ssh_authorized_keys = vec!["ssh-rsa nope".into()],
            "cloud_init.ssh_authorized_keys[0]: not an SSH public key",
        ),
        (
            |ci| ci.hostname = "bad_host".into(),
            "cloud_init.hostname: \"bad_host\" is not a hostname",
        ),
        (
            |ci| {
                ci.nics.clear();
                ci.network_config = "version: [".into()
            },
            "cloud_init.network_config: does not parse as YAML",
        ),
        (
            |ci| ci.nics[0].address = "192.0.2.10".into(),
            "cloud_init.nics[0].address: ",
        ),
        (
            |ci| ci.nics.push(ci.nics[0].clone()),
            "cloud_init.nics: 2 entries, but the VM has 1 NIC(s)",
        ),
    ];
    for (i, (change, says)) in cases.into_iter().enumerate() {
        let mut spec = cloud_spec(&format!("bad{i}"), "probe.mode=boot", "bcibad");
        change(spec.cloud_init.as_mut().unwrap());
        let req = pb::CreateVmRequest {
            spec: protobuf::MessageField::some(spec),
            ..Default::default()
        };
        let (code, message) = code_of(c.vms.create(ctx(), &req).await);
        assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{message}");
        assert!(message.contains(says), "case {i}: {message}");
    }
    let listed = c
        .vms
        .list(ctx(), &pb::ListVmsRequest::default())
        .await
        .unwrap();
    assert!(listed.vms.is_empty(), "nothing was created: {listed:?}");
}

/// The same part in a `nodectl create -f` document, and a bad one refused
/// with the field's name and exit status 2 (INVALID_ARGUMENT).
#[test]
fn nodectl_takes_the_part_from_a_toml_document() {
    report_mode("cloud_init_nodectl");
    let agent = TestAgent::new("cloud-init-cli");
    let write = |name: &str, hostname: &str| {
        let path = agent.dir.join(name);
        std::fs::write(
            &path,
            format!(
                "id = {name:?}\nvcpus = 1\nmemory_mib = 64\n[kernel]\npath = {:?}\ncmdline = \"probe.mode=boot\"\n\
                 [cloud_init]\nhostname = {hostname:?}\nssh_authorized_keys = [{KEY:?}]\n\
                 user_data = \"\"\"\n#!/bin/sh\necho hello\n\"\"\"\n",
                probe_elf()
            ),
        )
        .unwrap();
        path
    };
    let good = write("cli", "cli-host");
    let out = agent
        .nodectl()
        .args(["--json", "create", "-f", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = agent
        .nodectl()
        .args(["--json", "show", "cli"])
        .output()
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let part = &shown["cloud_init"];
    assert_eq!(shown["kernel"]["discovery"], "acpi", "{shown}");
    assert_eq!(part["hostname"], "cli-host", "{shown}");
    assert_eq!(part["user_data"], "#!/bin/sh\necho hello\n", "{shown}");
    assert_eq!(part["ssh_authorized_keys"][0], KEY, "{shown}");

    let bad = write("bad", "no_underscores");
    let out = agent
        .nodectl()
        .args(["create", "-f", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("cloud_init.hostname"), "{stderr}");
}
