//! The Debian 12 genericcloud image images/debian builds: what is in it
//! (Debian's genericcloud package set, nothing of Berth, nothing of the
//! builder's identity), and that the agent boots the kernel it carries
//! after a plain `nodectl image import` of its qcow2. Its full boot, with
//! cloud-init and SSH, is tests/tests/debian_guest.rs (in the harness).

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use berth_tests::agent::*;
use berth_tests::contract::vm as pb;
use berth_tests::*;
use ext4_view::{Ext4, Ext4Read};

const IMAGE: &str = "debian-12-genericcloud-amd64";
/// images/debian/build.sh puts the root partition at 1 MiB.
const ROOT_OFFSET: u64 = 1 << 20;

struct Partition(File);

impl Ext4Read for Partition {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(self.0.read_exact_at(dst, ROOT_OFFSET + start)?)
    }
}

fn root_fs(image: &Path) -> Ext4 {
    let file = File::open(image.join(format!("{IMAGE}.raw"))).unwrap();
    Ext4::load(Box::new(Partition(file))).expect("the root partition is ext4")
}

/// Every path in the filesystem, directories first.
fn walk(fs: &Ext4, dir: &str, out: &mut Vec<String>) {
    for entry in fs.read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().display().to_string();
        if name == "." || name == ".." {
            continue;
        }
        let path = format!("{}/{name}", dir.trim_end_matches('/'));
        out.push(path.clone());
        if entry.file_type().unwrap().is_dir() {
            walk(fs, &path, out);
        }
    }
}

/// Packages dpkg has installed, from the image's own /var/lib/dpkg/status.
fn installed(fs: &Ext4) -> BTreeSet<String> {
    let status = String::from_utf8(fs.read("/var/lib/dpkg/status").unwrap()).unwrap();
    status
        .split("\n\n")
        .filter(|stanza| stanza.lines().any(|l| l == "Status: install ok installed"))
        .filter_map(|stanza| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix("Package: "))
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn the_image_holds_debians_genericcloud_set_and_nothing_of_berth() {
    let image = image_dir("debian");
    let fs = root_fs(&image);

    let wanted: Vec<String> =
        std::fs::read_to_string(repo_root().join("images/debian/genericcloud.packages"))
            .unwrap()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect();
    assert!(wanted.len() > 20, "the list is read: {wanted:?}");
    let have = installed(&fs);
    let missing: Vec<&String> = wanted.iter().filter(|p| !have.contains(*p)).collect();
    assert!(missing.is_empty(), "not installed: {missing:?}");
    // The versioned kernel behind the meta-package, and no boot loader.
    assert!(
        have.iter()
            .any(|p| p.starts_with("linux-image-6.1.0-") && p.ends_with("-cloud-amd64")),
        "{have:?}"
    );
    assert!(!have.iter().any(|p| p.starts_with("grub")), "{have:?}");

    let mut paths = Vec::new();
    walk(&fs, "/", &mut paths);
    assert!(
        paths.len() > 10_000,
        "a whole system: {} paths",
        paths.len()
    );
    let berth: Vec<&String> = paths
        .iter()
        .filter(|p| p.to_ascii_lowercase().contains("berth"))
        .collect();
    assert!(berth.is_empty(), "files of Berth in the image: {berth:?}");

    // The first boot is cloud-init's: no host keys, no machine id.
    assert!(
        !paths.iter().any(|p| p.starts_with("/etc/ssh/ssh_host_")),
        "host keys baked in"
    );
    assert!(fs.read("/etc/machine-id").unwrap().is_empty());
    // The root is named as the kernel command line will name it.
    let partuuid = std::fs::read_to_string(image.join("partuuid")).unwrap();
    let fstab = String::from_utf8(fs.read("/etc/fstab").unwrap()).unwrap();
    assert!(
        fstab.contains(&format!("PARTUUID={} / ext4", partuuid.trim())),
        "{fstab}"
    );
    for link in ["/vmlinuz", "/initrd.img"] {
        let target = fs.read_link(link).unwrap();
        assert!(
            target.display().to_string().starts_with("boot/"),
            "{link} -> {}",
            target.display()
        );
    }
}

/// `nodectl image import <the qcow2>` is enough: a VM with
/// `kernel.from_disk` boots Debian's kernel from it with its root named by
/// PARTUUID. On a software KVM the stock kernel dies early (docs/testing.md),
/// so this asserts its first console lines, printed through earlycon.
#[tokio::test(flavor = "current_thread")]
async fn the_imported_qcow2_boots_the_kernel_it_carries() {
    let mode = report_mode("debian_image");
    let image = image_dir("debian");
    let partuuid = std::fs::read_to_string(image.join("partuuid")).unwrap();
    let agent = TestAgent::new("debian-image");
    let out = agent
        .nodectl()
        .args(["image", "import", "--kind", "disk", "--name", "debian-12"])
        .arg(image.join(format!("{IMAGE}.qcow2")))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let c = agent.clients().await;
    let spec = pb::VmSpec {
        id: "deb".into(),
        vcpus: 1,
        memory_mib: 512,
        kernel: protobuf::MessageField::some(pb::Kernel {
            from_disk: true,
            cmdline: "console=ttyS0 earlycon=uart8250,io,0x3f8".into(),
            ..Default::default()
        }),
        disks: vec![pb::Disk {
            image: "debian-12".into(),
            ..Default::default()
        }],
        restart: protobuf::MessageField::some(pb::RestartPolicy {
            on_reboot: pb::restart_policy::OnReboot::ON_REBOOT_STOP.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    create_and_start(&c, spec).await;
    // Written a byte at a time under the software KVM's emulation: wait for
    // the whole root= word.
    let root = format!("root=PARTUUID={}", partuuid.trim());
    wait_console(&agent, "deb", &root, Duration::from_secs(240));
    let console = console_text(&agent, "deb");
    let packages = std::fs::read_to_string(image.join("packages")).unwrap();
    let release = packages
        .lines()
        .filter_map(|l| l.strip_prefix("linux-image-"))
        .filter_map(|l| l.split_whitespace().next())
        .find(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        .expect("a versioned kernel package in the image");
    assert!(
        console.contains(&format!("Linux version {release} ")),
        "Debian's kernel {release} ran ({mode:?}):\n{console}"
    );
    assert!(
        console
            .lines()
            .any(|l| l.contains("Command line:") && l.contains(&root)),
        "its root named by PARTUUID:\n{console}"
    );
}
