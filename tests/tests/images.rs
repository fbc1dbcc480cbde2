//! The image store through a real agent: a kernel streamed over ttrpc and
//! a qcow2 disk imported with nodectl boot a VM by name; the VM writes to
//! its own copy, never to the image; Remove is refused while a spec names
//! the image and works after; a bad digest or a hostile qcow2 leaves
//! nothing behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth_tests::agent::*;
use berth_tests::contract::image as ipb;
use berth_tests::contract::vm as pb;
use berth_tests::*;

const SECTOR: usize = 512;

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    format!("sha256:{}", text.split_whitespace().next().unwrap())
}

/// A raw disk of `sectors` with content in its first 64 sectors and a hole
/// after, and its qcow2 conversion.
fn disks(dir: &Path, sectors: usize) -> (PathBuf, PathBuf) {
    let raw = dir.join("data.raw");
    let mut bytes = vec![0u8; sectors * SECTOR];
    for (i, b) in bytes[..64 * SECTOR].iter_mut().enumerate() {
        *b = (i * 13 % 251) as u8;
    }
    std::fs::write(&raw, &bytes).unwrap();
    let qcow2 = dir.join("data.qcow2");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .output()
        .expect("qemu-img (ci/install-deps.sh installs qemu-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (raw, qcow2)
}

async fn stream_import(
    c: &Clients,
    file: &Path,
    name: &str,
    kind: &str,
    expected_digest: &str,
) -> ttrpc::Result<ipb::Image> {
    let mut stream = c.images.import(ctx()).await?;
    stream
        .send(&ipb::ImageChunk {
            header: protobuf::MessageField::some(ipb::ImportImageHeader {
                name: name.into(),
                kind: kind.into(),
                expected_digest: expected_digest.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    for chunk in std::fs::read(file).unwrap().chunks(100_000) {
        stream
            .send(&ipb::ImageChunk {
                data: chunk.to_vec(),
                ..Default::default()
            })
            .await?;
    }
    stream.close_and_recv().await
}

fn image_ref(name: &str) -> ipb::ImageRef {
    ipb::ImageRef {
        name: name.into(),
        ..Default::default()
    }
}

fn store_files(agent: &TestAgent, sub: &str) -> Vec<String> {
    std::fs::read_dir(agent.dir.join("state/image-store").join(sub))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "current_thread")]
async fn images_boot_by_name_and_are_kept_while_a_vm_names_them() {
    report_mode("images");
    let agent = TestAgent::new("images-use");
    let c = agent.clients().await;

    let probe = probe_elf();
    let kernel = stream_import(&c, &probe, "probe-kernel", "kernel", &sha256_of(&probe))
        .await
        .expect("stream import");
    assert_eq!(kernel.digest, sha256_of(&probe));
    assert_eq!(kernel.source, "stream");
    assert_eq!(
        std::fs::read(&kernel.path).unwrap(),
        std::fs::read(&probe).unwrap()
    );

    // The qcow2 disk through nodectl, which streams it with a progress bar.
    let (raw, qcow2) = disks(&agent.dir, 4096);
    let out = agent
        .nodectl()
        .args([
            "--json", "image", "import", "--kind", "disk", "--name", "data",
        ])
        .args(["-l", "os=none"])
        .arg(&qcow2)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let disk: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(disk["source_format"], "qcow2");
    assert_eq!(disk["digest"], sha256_of(&raw), "stored as raw");
    assert_eq!(disk["source_digest"], sha256_of(&qcow2));
    assert_eq!(disk["size_bytes"], 4096 * 512);

    // A VM by image names: it reads the image's bytes and writes its copy.
    let mut spec = probe_spec(
        "img-vm",
        1,
        "probe.mode=blk probe.blk_read=0:64 probe.blk_write=100:4:9",
    );
    let k = spec.kernel.as_mut().unwrap();
    k.path.clear();
    k.image = "probe-kernel".into();
    spec.disks.push(pb::Disk {
        image: "data".into(),
        ..Default::default()
    });
    create_and_start(&c, spec).await;
    wait_console(&agent, "img-vm", "PROBE done", Duration::from_secs(60));
    let console = console_text(&agent, "img-vm");
    let raw_bytes = std::fs::read(&raw).unwrap();
    let fnv = fnv1a(&raw_bytes[..64 * SECTOR]);
    assert!(
        console.contains(&format!("read start=0 count=64 status=0 fnv={fnv:016x}")),
        "the guest read the qcow2's content:\n{console}"
    );
    assert!(console.contains("PROBE blk dev=0 verify ok"), "{console}");

    let vm = get(&c, "img-vm").await;
    let copy = &vm.status.disk_copies[0];
    assert_eq!((copy.disk, copy.image.as_str()), (0, "data"));
    assert_eq!(copy.digest, sha256_of(&raw));
    assert!(
        ["reflink", "sparse-copy"].contains(&copy.method.as_str()),
        "{copy:?}"
    );
    let copied = std::fs::read(&copy.path).unwrap();
    assert_ne!(
        copied[100 * SECTOR..104 * SECTOR],
        raw_bytes[100 * SECTOR..104 * SECTOR]
    );
    assert_eq!(
        sha256_of(Path::new(disk["path"].as_str().unwrap())),
        sha256_of(&raw),
        "the image is untouched"
    );

    let shown = c.images.get(ctx(), &image_ref("data")).await.unwrap();
    assert_eq!(shown.used_by, ["img-vm"]);
    assert_eq!(shown.copies, [format!("img-vm disks[0] {}", copy.method)]);
    let listed = c
        .images
        .list(
            ctx(),
            &ipb::ListImagesRequest {
                labels: [("os".to_string(), "none".to_string())].into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(listed.images.len(), 1);
    assert_eq!(listed.images[0].name, "data");

    for name in ["data", "probe-kernel"] {
        let (code, msg) = code_of(c.images.remove(ctx(), &image_ref(name)).await);
        assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
        assert!(msg.contains("img-vm"), "{msg}");
    }
    let out = agent
        .nodectl()
        .args(["image", "remove", "data"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "nodectl: wrong state");

    // The probe ends its run; once its VM is Stopped, deleting it frees both.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while state_of(&get(&c, "img-vm").await) != pb::VmState::STOPPED {
        assert!(std::time::Instant::now() < deadline, "img-vm never stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.vms
        .delete(ctx(), &vm_ref("img-vm"))
        .await
        .expect("delete");
    for name in ["data", "probe-kernel"] {
        c.images
            .remove(ctx(), &image_ref(name))
            .await
            .expect("remove");
    }
    assert!(store_files(&agent, "blobs").is_empty());
    assert!(store_files(&agent, "index").is_empty());
    let (code, _) = code_of(c.images.get(ctx(), &image_ref("data")).await);
    assert_eq!(code, ttrpc::Code::NOT_FOUND);
}

#[tokio::test(flavor = "current_thread")]
async fn bad_imports_are_refused_with_nothing_left_behind() {
    let agent = TestAgent::new("images-bad");
    let c = agent.clients().await;
    let probe = probe_elf();

    let wrong = format!("sha256:{}", "ab".repeat(32));
    let (code, msg) = code_of(stream_import(&c, &probe, "k", "kernel", &wrong).await);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("digest mismatch"), "{msg}");

    // A qcow2 that would pull a host file in through its backing file.
    let evil = agent.dir.join("evil.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname"])
        .arg(&evil)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, msg) = code_of(stream_import(&c, &evil, "evil", "disk", "").await);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("backing file"), "{msg}");

    // A node path outside the kernel and disk roots.
    let mut stream = c.images.import(ctx()).await.unwrap();
    stream
        .send(&ipb::ImageChunk {
            header: protobuf::MessageField::some(ipb::ImportImageHeader {
                name: "shadow".into(),
                kind: "disk".into(),
                path: "/etc/shadow".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let (code, msg) = code_of(stream.close_and_recv().await);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("outside the allowed roots"), "{msg}");

    for sub in ["tmp", "blobs", "index"] {
        assert!(store_files(&agent, sub).is_empty(), "{sub} is not empty");
    }
    let list = c.images.list(ctx(), &Default::default()).await.unwrap();
    assert!(list.images.is_empty());

    // A spec naming an image that is not there, or one of the wrong kind.
    let mut spec = probe_spec("no-image", 1, "");
    spec.kernel.as_mut().unwrap().path.clear();
    spec.kernel.as_mut().unwrap().image = "missing".into();
    let req = pb::CreateVmRequest {
        spec: protobuf::MessageField::some(spec),
        ..Default::default()
    };
    let (code, msg) = code_of(c.vms.create(ctx(), &req).await);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.starts_with("kernel.image:"), "{msg}");
}

/// images/register.sh puts a recipe's output into a running agent's store.
#[tokio::test(flavor = "current_thread")]
async fn the_image_recipes_register_their_output() {
    let agent = TestAgent::new("images-register");
    let c = agent.clients().await;
    let out = Command::new(repo_root().join("images/register.sh"))
        .arg("--socket")
        .arg(&agent.socket)
        .arg("probe")
        .env("NODECTL", binary("nodectl"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = probe_elf()
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let image = c
        .images
        .get(ctx(), &image_ref(&name))
        .await
        .expect("registered");
    assert_eq!(image.kind, "kernel");
    assert_eq!(image.digest, sha256_of(&probe_elf()));
    assert_eq!(
        image.labels.get("recipe").map(String::as_str),
        Some("probe")
    );
    assert!(stdout.contains(&image.digest), "{stdout}");
}
