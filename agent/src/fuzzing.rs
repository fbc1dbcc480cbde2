//! The fuzz entry point of the agent's API edge (`fuzz/` runs it under
//! libFuzzer): ttrpc request bodies decoded, converted and checked exactly as
//! the handlers in `server` do before they call the manager, without an
//! agent. The tests below run every committed corpus and regression input
//! through it. See docs/fuzzing.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use berth_proto::{common, node, vm as pb};
use protobuf::Message;

use crate::config::AgentConfig;
use crate::server;
use crate::spec::{Limits, VmSpec};

/// Every path a spec names must resolve under here (a root every Linux
/// host has, so committed inputs behave the same everywhere).
pub const FUZZ_ROOT: &str = "/usr";
const LIMITS: Limits = Limits {
    max_vcpus: 64,
    host_memory_mib: 1 << 20,
    flavour: berth_proto::vmm_process::host::Flavour::Unknown,
};

/// The request types, in the order of the selector byte.
pub const REQUESTS: [&str; 11] = [
    "CreateVm",
    "UpdateVm",
    "PrepareMigrateIn",
    "MigrateOut",
    "StopVm",
    "SnapshotVm",
    "RestoreVm",
    "ListVms",
    "VmRef",
    "VmSpec",
    "other",
];

/// Byte 0 picks the request (`% 11`, see REQUESTS); the rest is its
/// protobuf encoding.
pub fn api_requests(data: &[u8]) {
    if let Some((&which, body)) = data.split_first() {
        let _ = request(which, body);
    }
}

fn config() -> AgentConfig {
    AgentConfig {
        kernel_roots: vec![FUZZ_ROOT.into()],
        disk_roots: vec![FUZZ_ROOT.into()],
        ..AgentConfig::default()
    }
}

fn invalid(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// What the handler does with the request before the manager acts on it:
/// Ok when it would go ahead, or the error the client would get.
fn request(which: u8, body: &[u8]) -> Result<(), String> {
    match which % REQUESTS.len() as u8 {
        0 => {
            let req = pb::CreateVmRequest::parse_from_bytes(body).map_err(invalid)?;
            admit(&server::spec_of("create", &req.spec).map_err(invalid)?)
        }
        1 => {
            let req = pb::UpdateVmRequest::parse_from_bytes(body).map_err(invalid)?;
            admit(&server::spec_of("update", &req.spec).map_err(invalid)?)
        }
        2 => {
            let req = pb::PrepareMigrateInRequest::parse_from_bytes(body).map_err(invalid)?;
            let spec = server::spec_of("PrepareMigrateIn", &req.spec).map_err(invalid)?;
            let ttl = server::token_ttl(req.token_ttl_ms).map_err(invalid)?;
            let _taps = server::pairs(&req.tap_overrides);
            admit(&spec)?;
            // The manager hands the VMM now + ttl as a wall-clock expiry
            // in ms, and the VMM turns that back into a SystemTime: an
            // accepted ttl must survive both.
            let expires = crate::manager::now_ms().checked_add(ttl.as_millis() as u64);
            let expiry = expires.and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)));
            assert!(
                expiry.is_some(),
                "token_ttl_ms {} overflows",
                req.token_ttl_ms
            );
            Ok(())
        }
        3 => {
            let req = pb::MigrateOutRequest::parse_from_bytes(body).map_err(invalid)?;
            let params = server::migrate_params(&req.params.clone().unwrap_or_default());
            // What the manager forwards to the VMM.
            let _ = params.bandwidth_mib_s << 20;
            if req.address.is_empty() || req.token.is_empty() {
                return Err("address and token are required".into());
            }
            Ok(())
        }
        4 => {
            let req = pb::StopVmRequest::parse_from_bytes(body).map_err(invalid)?;
            let _ = server::stop_timeout(req.timeout_ms);
            Ok(())
        }
        5 => {
            let req = pb::SnapshotVmRequest::parse_from_bytes(body).map_err(invalid)?;
            crate::spec::check_name("name", &req.name).map_err(invalid)
        }
        6 => {
            let req = pb::RestoreVmRequest::parse_from_bytes(body).map_err(invalid)?;
            let _taps = server::pairs(&req.tap_overrides);
            if req.new_id.is_empty() {
                return Ok(());
            }
            // A restore into a new VM creates it from the source's spec.
            let mut spec = sample_spec();
            spec.id = req.new_id.clone();
            spec.name = if req.new_name.is_empty() {
                req.new_id
            } else {
                req.new_name
            };
            admit(&spec)
        }
        7 => {
            let req = pb::ListVmsRequest::parse_from_bytes(body).map_err(invalid)?;
            let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
            let _ = labels.len();
            Ok(())
        }
        8 => {
            pb::VmRef::parse_from_bytes(body).map_err(invalid)?;
            pb::SnapshotRef::parse_from_bytes(body).map_err(invalid)?;
            Ok(())
        }
        9 => admit(&server::decode_spec(body).map_err(invalid)?),
        _ => {
            let chunk = pb::ConsoleChunk::parse_from_bytes(body).map_err(invalid);
            let watch = node::WatchRequest::parse_from_bytes(body).map_err(invalid);
            let empty = common::Empty::parse_from_bytes(body).map_err(invalid);
            chunk.and(watch).and(empty).map(|_| ())
        }
    }
}

/// A converted spec: checked as `Manager::validate` checks it, and, when it
/// passes, everything downstream of the edge must take it.
fn admit(spec: &VmSpec) -> Result<(), String> {
    // The edge converts back (Get, List, Watch) without loss.
    let back = server::spec_from_pb(&server::spec_to_pb(spec)).expect("our own encoding");
    if !spec.cpu.max.is_nan() {
        assert_eq!(&back, spec, "a spec changed through spec_to_pb");
    }
    spec.validate(&config(), &LIMITS).map_err(invalid)?;
    // What the store writes as spec.json reads back the same.
    let json = serde_json::to_vec_pretty(spec).expect("plain data serialises");
    let stored: VmSpec = serde_json::from_slice(&json).expect("spec.json reads back");
    assert_eq!(&stored, spec, "a spec changed through spec.json");
    // The VMM accepts the config the agent derives from an accepted spec.
    let vmm = spec.vmm_config(
        Path::new("/var/lib/berth/console.log"),
        1 << 20,
        Path::new("/var/lib/berth/seed.img"),
    );
    if let Err(e) = vmm.validate() {
        panic!("the agent accepted a spec its VMM refuses: {e}");
    }
    let json = serde_json::to_vec_pretty(&vmm).expect("plain data serialises");
    let parsed: berth_proto::vmm_process::config::VmConfig =
        serde_json::from_slice(&json).expect("the VMM reads the config back");
    assert_eq!(parsed, vmm);
    Ok(())
}

/// A spec that validates (FUZZ_ROOT holds its files).
pub fn sample_spec() -> VmSpec {
    VmSpec {
        id: "vm-1".into(),
        name: "web".into(),
        vcpus: 2,
        memory_mib: 256,
        kernel: crate::spec::Kernel {
            path: PathBuf::from("/usr/bin/env"),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            ..Default::default()
        },
        ..VmSpec::default()
    }
}

#[cfg(test)]
mod tests {
    use protobuf::MessageField;

    use super::*;

    fn fuzz_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
    }

    /// The saved inputs of the agent_api target, in name order (not the
    /// READMEs or hidden files beside them).
    fn inputs(kind: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = fuzz_dir().join(kind).join("agent_api");
        let mut inputs: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| !p.to_string_lossy().ends_with(".md"))
            .filter(|p| {
                !p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .starts_with('.')
            })
            .filter_map(|p| std::fs::read(&p).ok().map(|bytes| (p, bytes)))
            .collect();
        inputs.sort();
        inputs
    }

    #[test]
    fn corpus_and_regression_inputs_run_clean() {
        let corpus = inputs("corpus");
        assert!(!corpus.is_empty(), "fuzz/corpus/agent_api has no inputs");
        let mut failed = Vec::new();
        for (path, bytes) in corpus.iter().chain(&inputs("regressions")) {
            if std::panic::catch_unwind(|| api_requests(bytes)).is_err() {
                failed.push(path.display().to_string());
            }
        }
        assert!(failed.is_empty(), "inputs that crash: {failed:#?}");
    }

    fn encoded(which: u8, msg: &dyn protobuf::MessageDyn) -> Vec<u8> {
        let mut v = vec![which];
        v.extend(msg.write_to_bytes_dyn().unwrap());
        v
    }

    fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let spec = MessageField::some(server::spec_to_pb(&sample_spec()));
        let mut full = sample_spec();
        full.labels.insert("tier".into(), "web".into());
        full.disks.push(crate::spec::Disk {
            path: "/usr/bin/env".into(),
            read_only: true,
            serial: "disk-1".into(),
            image: String::new(),
            limit: crate::spec::RateLimit {
                bytes_per_s: 1 << 20,
                ops_per_s: 100,
                ..Default::default()
            },
        });
        full.nics.push(crate::spec::Nic {
            tap: "tap0".into(),
            bridge: "br0".into(),
            mac: "52:54:00:12:34:56".into(),
            rx_limit: Default::default(),
            tx_limit: crate::spec::RateLimit {
                bytes_per_s: 1 << 20,
                bytes_burst: 4096,
                ..Default::default()
            },
        });
        full.cpu.max = 1.5;
        full.cpu.cpuset = "0-1".into();
        full.restart.kind = crate::spec::RestartKind::OnFailure;
        let full_pb = server::spec_to_pb(&full);
        let taps = [("tap0".to_string(), "tap9".to_string())].into();
        vec![
            (
                "create",
                encoded(
                    0,
                    &pb::CreateVmRequest {
                        spec: MessageField::some(full_pb.clone()),
                        ..Default::default()
                    },
                ),
            ),
            (
                "update",
                encoded(
                    1,
                    &pb::UpdateVmRequest {
                        spec: spec.clone(),
                        ..Default::default()
                    },
                ),
            ),
            (
                "prepare-migrate-in",
                encoded(
                    2,
                    &pb::PrepareMigrateInRequest {
                        spec: MessageField::some(full_pb.clone()),
                        listen_address: "127.0.0.1".into(),
                        token_ttl_ms: 30_000,
                        tap_overrides: taps,
                        ..Default::default()
                    },
                ),
            ),
            (
                "migrate-out",
                encoded(
                    3,
                    &pb::MigrateOutRequest {
                        id: "vm-1".into(),
                        address: "10.0.0.2:4000".into(),
                        token: "00112233445566778899aabbccddeeff".into(),
                        params: MessageField::some(pb::MigrationParams {
                            downtime_ms: 50,
                            bandwidth_mib_s: 100,
                            timeout_ms: 60_000,
                            force_on_timeout: true,
                            max_iterations: 10,
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ),
            ),
            (
                "stop",
                encoded(
                    4,
                    &pb::StopVmRequest {
                        id: "vm-1".into(),
                        force: false,
                        timeout_ms: 5000,
                        ..Default::default()
                    },
                ),
            ),
            (
                "snapshot",
                encoded(
                    5,
                    &pb::SnapshotVmRequest {
                        id: "vm-1".into(),
                        name: "snap-1".into(),
                        kind: "diff".into(),
                        ..Default::default()
                    },
                ),
            ),
            (
                "restore",
                encoded(
                    6,
                    &pb::RestoreVmRequest {
                        id: "vm-1".into(),
                        snapshot: "snap-1".into(),
                        new_id: "vm-2".into(),
                        tap_overrides: [("tap0".to_string(), "tap1".to_string())].into(),
                        ..Default::default()
                    },
                ),
            ),
            (
                "list",
                encoded(
                    7,
                    &pb::ListVmsRequest {
                        labels: [("tier".to_string(), "web".to_string())].into(),
                        ..Default::default()
                    },
                ),
            ),
            (
                "vm-ref",
                encoded(
                    8,
                    &pb::SnapshotRef {
                        id: "vm-1".into(),
                        name: "snap-1".into(),
                        ..Default::default()
                    },
                ),
            ),
            ("spec", encoded(9, &full_pb)),
            (
                "console",
                encoded(
                    10,
                    &pb::ConsoleChunk {
                        id: "vm-1".into(),
                        data: b"ls\n".to_vec(),
                        ..Default::default()
                    },
                ),
            ),
        ]
    }

    #[test]
    fn seeds_are_accepted() {
        for (name, bytes) in seeds() {
            assert_eq!(request(bytes[0], &bytes[1..]), Ok(()), "seed {name}");
        }
    }

    /// Regenerates fuzz/corpus/agent_api/seed-*: `cargo test -p
    /// berth-agent --lib fuzzing::tests::write_seed_corpus -- --ignored`.
    #[test]
    #[ignore]
    fn write_seed_corpus() {
        let dir = fuzz_dir().join("corpus/agent_api");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds() {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }

    fn refused(which: u8, msg: &dyn protobuf::MessageDyn) -> String {
        let bytes = encoded(which, msg);
        request(bytes[0], &bytes[1..]).unwrap_err()
    }

    #[test]
    fn hostile_requests_are_refused_with_the_field_named() {
        let with = |edit: &dyn Fn(&mut pb::VmSpec)| {
            let mut p = server::spec_to_pb(&sample_spec());
            edit(&mut p);
            pb::CreateVmRequest {
                spec: MessageField::some(p),
                ..Default::default()
            }
        };
        let cases: Vec<(&str, pb::CreateVmRequest)> = vec![
            ("spec is missing", pb::CreateVmRequest::default()),
            ("id:", with(&|p| p.id = "../etc".into())),
            ("vcpus:", with(&|p| p.vcpus = u32::MAX)),
            ("memory_mib:", with(&|p| p.memory_mib = u64::MAX)),
            (
                "kernel.path:",
                with(&|p| p.kernel.mut_or_insert_default().path = "/usr/../etc/shadow".into()),
            ),
            (
                "kernel.path:",
                with(&|p| p.kernel.mut_or_insert_default().path = "relative/vmlinux".into()),
            ),
            (
                "cpu.max:",
                with(&|p| p.cpu.mut_or_insert_default().max = f64::NAN),
            ),
            (
                "cpu.max:",
                with(&|p| p.cpu.mut_or_insert_default().max = f64::INFINITY),
            ),
            (
                "cpu.weight:",
                with(&|p| p.cpu.mut_or_insert_default().weight = 10_001),
            ),
            (
                "labels.",
                with(&|p| {
                    p.labels.insert("a=b".into(), "c".into());
                }),
            ),
            (
                "nics[0].tap:",
                with(&|p| {
                    p.nics.push(pb::Nic {
                        tap: "a/b".into(),
                        ..Default::default()
                    })
                }),
            ),
            (
                "disks[0].serial:",
                with(&|p| {
                    p.disks.push(pb::Disk {
                        path: "/usr/bin/env".into(),
                        serial: "x".repeat(21),
                        ..Default::default()
                    })
                }),
            ),
        ];
        for (field, req) in cases {
            let e = refused(0, &req);
            assert!(e.contains(field), "{field}: {e}");
        }

        // Field numbers this agent does not know, a truncated message, a
        // length prefix that claims 4 GiB, and nesting past the limit.
        let mut unknown = encoded(9, &server::spec_to_pb(&sample_spec()));
        unknown.extend([0xf8, 0x7f, 0x01]); // field 2047, varint 1
        assert!(request(9, &unknown[1..])
            .unwrap_err()
            .contains("unknown field"));
        let full = encoded(0, &with(&|_| {}));
        assert!(request(0, &full[1..full.len() - 3]).is_err());
        let huge = [0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x00];
        assert!(request(0, &huge).is_err());
        // Unknown field 15 as a group nested 1000 deep.
        let deep = [vec![0x7b; 1000], vec![0x7c; 1000]].concat();
        assert!(request(0, &deep).unwrap_err().contains("recursion"));
        assert!(refused(
            5,
            &pb::SnapshotVmRequest {
                name: "a/../../b".into(),
                ..Default::default()
            }
        )
        .contains("name"));
        assert!(refused(3, &pb::MigrateOutRequest::default()).contains("required"));
    }

    #[test]
    fn a_token_lifetime_whose_expiry_overflows_is_refused() {
        let prepare = |token_ttl_ms| {
            let spec = MessageField::some(server::spec_to_pb(&sample_spec()));
            encoded(
                2,
                &pb::PrepareMigrateInRequest {
                    spec,
                    token_ttl_ms,
                    ..Default::default()
                },
            )
        };
        for ms in [0, 1, 60_000, server::MAX_TOKEN_TTL.as_millis() as u64] {
            let bytes = prepare(ms);
            assert_eq!(request(bytes[0], &bytes[1..]), Ok(()), "{ms}");
        }
        for ms in [server::MAX_TOKEN_TTL.as_millis() as u64 + 1, u64::MAX] {
            let bytes = prepare(ms);
            let e = request(bytes[0], &bytes[1..]).unwrap_err();
            assert!(e.contains("token_ttl_ms"), "{e}");
        }
    }
}
