//! Booting the kernel a disk image carries (`kernel.from_disk`), as a
//! cloud image is booted: a GPT disk made by sfdisk and mkfs.ext4 whose
//! root holds the probe as its kernel behind Debian's `/vmlinuz` link,
//! used as a file and imported as a qcow2 image; and every way it is
//! refused.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_tests::agent::*;
use berth_tests::contract::vm as pb;
use berth_tests::*;

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A 16 MiB GPT disk whose partition 1 is ext4 with the probe as
/// /boot/vmlinuz-probe and /vmlinuz pointing at it. Returns the image and
/// partition 1's PARTUUID.
fn cloud_disk(dir: &Path) -> (PathBuf, String) {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::copy(probe_elf(), root.join("boot/vmlinuz-probe")).unwrap();
    std::os::unix::fs::symlink("boot/vmlinuz-probe", root.join("vmlinuz")).unwrap();
    let image = dir.join("cloud.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut sfdisk = Command::new("sfdisk")
        .arg("-q")
        .arg(&image)
        .stdin(Stdio::piped())
        .spawn()
        .expect("sfdisk (package fdisk; ci/install-deps.sh installs it)");
    (sfdisk.stdin.take().unwrap())
        .write_all(b"label: gpt\nstart=2048, size=28672, type=linux\n")
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-F", "-q", "-E", "offset=1048576", "-d"])
            .arg(&root)
            .arg(&image)
            .arg("14M"),
    );
    let uuid = run_ok(
        Command::new("sfdisk")
            .arg("--part-uuid")
            .arg(&image)
            .arg("1"),
    );
    (image, uuid.to_lowercase())
}

fn from_disk_spec(id: &str, disk: pb::Disk) -> pb::VmSpec {
    let mut spec = probe_spec(id, 1, "probe.mode=boot");
    let k = spec.kernel.as_mut().unwrap();
    k.path.clear();
    k.from_disk = true;
    spec.disks.push(disk);
    spec
}

#[tokio::test(flavor = "current_thread")]
async fn a_cloud_disk_boots_its_own_kernel_from_a_file_and_from_an_import() {
    report_mode("disk_kernel");
    let agent = TestAgent::new("disk-kernel");
    let c = agent.clients().await;
    let disks = agent.dir.join("disks");
    let (image, partuuid) = cloud_disk(&disks);

    let spec = from_disk_spec(
        "file",
        pb::Disk {
            path: image.display().to_string(),
            ..Default::default()
        },
    );
    create_and_start(&c, spec).await;
    wait_console(&agent, "file", "PROBE done", Duration::from_secs(30));
    let console = console_text(&agent, "file");
    assert!(
        console.contains(&format!(
            "PROBE cmdline probe.mode=boot root=PARTUUID={partuuid}"
        )),
        "the probe read off the disk booted, told where its root is:\n{console}"
    );

    // The same disk as a qcow2 image in the store: importing it is enough.
    let qcow2 = disks.join("cloud.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&image)
            .arg(&qcow2),
    );
    let out = agent
        .nodectl()
        .args(["image", "import", "--kind", "disk", "--name", "cloud"])
        .arg(&qcow2)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut spec = from_disk_spec(
        "imported",
        pb::Disk {
            image: "cloud".into(),
            ..Default::default()
        },
    );
    // A root the user names is kept as it is.
    spec.kernel.as_mut().unwrap().cmdline = "probe.mode=boot root=/dev/vda1".into();
    create_and_start(&c, spec).await;
    wait_console(&agent, "imported", "PROBE done", Duration::from_secs(30));
    let console = console_text(&agent, "imported");
    assert!(
        console.contains("PROBE cmdline probe.mode=boot root=/dev/vda1\n")
            || console.contains("PROBE cmdline probe.mode=boot root=/dev/vda1\r"),
        "{console}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_disk_without_a_kernel_or_a_spec_that_mixes_sources_is_refused() {
    report_mode("disk_kernel_bad");
    let agent = TestAgent::new("disk-kernel-bad");
    let c = agent.clients().await;
    let plain = agent.dir.join("disks/plain.img");
    std::fs::File::create(&plain)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let spec = from_disk_spec(
        "plain",
        pb::Disk {
            path: plain.display().to_string(),
            ..Default::default()
        },
    );
    let req = pb::CreateVmRequest {
        spec: protobuf::MessageField::some(spec),
        ..Default::default()
    };
    c.vms.create(ctx(), &req).await.expect("create");
    let (code, message) = code_of(c.vms.start(ctx(), &vm_ref("plain")).await);
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{message}");
    assert!(
        message.contains("kernel.from_disk: disks[0]") && message.contains("no partition table"),
        "{message}"
    );

    let mut both = from_disk_spec(
        "both",
        pb::Disk {
            path: plain.display().to_string(),
            ..Default::default()
        },
    );
    both.kernel.as_mut().unwrap().path = probe_elf().display().to_string();
    let mut diskless = from_disk_spec("diskless", pb::Disk::default());
    diskless.disks.clear();
    for (spec, says) in [
        (both, "give no path, image, initrd or initrd_image"),
        (diskless, "the VM has no disk 0"),
    ] {
        let req = pb::CreateVmRequest {
            spec: protobuf::MessageField::some(spec),
            ..Default::default()
        };
        let (code, message) = code_of(c.vms.create(ctx(), &req).await);
        assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{message}");
        assert!(
            message.contains("kernel.from_disk") && message.contains(says),
            "{message}"
        );
    }
}
