//! Disk images made by the real tools (sfdisk for GPT and MBR tables,
//! mkfs.ext4 -d for the filesystem), read back without mounting.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

/// A fake bzImage: what the boot protocol's header check looks at.
fn bzimage() -> Vec<u8> {
    let mut k = vec![0u8; 4096];
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} (ci/install-deps.sh): {e}"));
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Disk {
    dir: PathBuf,
    image: PathBuf,
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A 10 MiB disk with a `label` (gpt or dos) table whose partition 1
/// (from 1 MiB, 8 MiB) holds ext4 made from `files` and `links`, or (with
/// `ext4: false`) nothing.
fn disk(
    name: &str,
    label: &str,
    ext4: bool,
    files: &[(&str, &[u8])],
    links: &[(&str, &str)],
) -> Disk {
    let dir = std::env::temp_dir().join(format!("berth-bootfiles-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("boot")).unwrap();
    for (path, bytes) in files {
        std::fs::write(root.join(path), bytes).unwrap();
    }
    for (link, target) in links {
        std::os::unix::fs::symlink(target, root.join(link)).unwrap();
    }
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(10 << 20)
        .unwrap();
    if !label.is_empty() {
        let script = format!("label: {label}\nstart=2048, size=16384, type=linux\n");
        let mut child = Command::new("sfdisk")
            .args(["-q"])
            .arg(&image)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sfdisk (package fdisk; ci/install-deps.sh installs it)");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
    }
    if ext4 {
        let offset = if label.is_empty() {
            "offset=0"
        } else {
            "offset=1048576"
        };
        run(Command::new("mkfs.ext4")
            .args(["-F", "-q", "-E", offset, "-d"])
            .arg(&root)
            .arg(&image)
            .arg("8M"));
    }
    Disk { dir, image }
}

fn partuuid(image: &Path) -> String {
    run(Command::new("sfdisk")
        .arg("--part-uuid")
        .arg(image)
        .arg("1"))
    .to_lowercase()
}

#[test]
fn a_gpt_disk_gives_its_kernel_initrd_and_partuuid() {
    let d = disk(
        "gpt",
        "gpt",
        true,
        &[
            ("boot/vmlinuz-6.1.0-9-cloud-amd64", &bzimage()),
            ("boot/initrd.img-6.1.0-9-cloud-amd64", b"initrd!"),
        ],
        &[
            ("vmlinuz", "boot/vmlinuz-6.1.0-9-cloud-amd64"),
            ("initrd.img", "boot/initrd.img-6.1.0-9-cloud-amd64"),
        ],
    );
    let boot = find(&d.image).unwrap();
    assert_eq!(boot.partition, 1);
    assert_eq!(boot.partuuid, partuuid(&d.image), "as Linux will name it");
    assert_eq!(boot.kernel_path, "/vmlinuz");
    assert_eq!(boot.kernel, bzimage());
    assert_eq!(boot.initrd.as_deref(), Some(&b"initrd!"[..]));
}

#[test]
fn an_mbr_disk_with_the_links_in_boot_works_too() {
    let d = disk(
        "mbr",
        "dos",
        true,
        &[("boot/vmlinuz-5", b"\x7fELF-a-vmlinux")],
        &[("boot/vmlinuz", "vmlinuz-5")],
    );
    let boot = find(&d.image).unwrap();
    assert_eq!(boot.kernel_path, "/boot/vmlinuz");
    assert!(boot.initrd.is_none());
    // An MBR partition's PARTUUID is the disk identifier and its number.
    let id = run(Command::new("blkid")
        .args(["-p", "-s", "PTUUID", "-o", "value"])
        .arg(&d.image));
    assert_eq!(boot.partuuid, format!("{id}-01"));
}

#[test]
fn each_way_a_disk_cannot_boot_is_named() {
    let cases: Vec<(Disk, &str)> = vec![
        (disk("bare", "", true, &[], &[]), "no partition table"),
        (
            disk("empty", "gpt", false, &[], &[]),
            "no ext4 partition among its 1 partition(s)",
        ),
        (
            disk("nokernel", "gpt", true, &[("boot/readme", b"hi")], &[]),
            "no kernel in the ext4 partition(s) [1]",
        ),
        (
            disk(
                "text",
                "gpt",
                true,
                &[("boot/vmlinuz-1", b"#!/bin/sh\necho not a kernel\n")],
                &[("vmlinuz", "boot/vmlinuz-1")],
            ),
            "/vmlinuz in partition 1 is not a kernel",
        ),
    ];
    for (d, says) in cases {
        let err = find(&d.image).unwrap_err().to_string();
        assert!(err.contains(says), "{}: {err}", d.image.display());
    }
    let missing = find(Path::new("/nonexistent/disk.img")).unwrap_err();
    assert!(matches!(missing, BootFilesError::Io(_)), "{missing}");
}

#[test]
fn a_hostile_gpt_header_reads_nothing_past_the_disk() {
    let d = disk("hostile", "gpt", true, &[], &[]);
    // Entry count and size at their maximum, entries at the far end.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&d.image)
        .unwrap();
    f.write_all_at(&u64::MAX.to_le_bytes(), SECTOR + 72)
        .unwrap();
    let err = find(&d.image).unwrap_err();
    assert!(matches!(err, BootFilesError::Io(_)), "{err}");
}
