//! A minimal writer for the "newc" cpio format the Linux kernel unpacks as
//! an initramfs, so building one needs neither root (device nodes) nor tools.

use std::io::{self, Write};

pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
}

const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter { out, ino: 1 }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + name.len() + 1)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        let n = (4 - len % 4) % 4;
        self.out.write_all(&[0u8; 3][..n])
    }

    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, (0, 0), data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | 0o600, (major, minor), &[])
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cpio itself must read back what we wrote, names and contents.
    #[test]
    fn gnu_cpio_lists_and_extracts_the_archive() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin").unwrap();
        w.file("/bin/hello", 0o755, b"#!/bin/sh\necho hi\n")
            .unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_dev("dev/console", 5, 1).unwrap();
        let bytes = w.finish().unwrap();
        let dir = std::env::temp_dir().join(format!("berth-cpio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let archive = dir.join("a.cpio");
        std::fs::write(&archive, &bytes).unwrap();
        let list = std::process::Command::new("cpio")
            .args(["-t", "-v", "-F"])
            .arg(&archive)
            .output()
            .expect("cpio is installed");
        let text = String::from_utf8_lossy(&list.stdout);
        assert!(
            list.status.success(),
            "{}",
            String::from_utf8_lossy(&list.stderr)
        );
        assert!(text.contains("bin/hello"), "{text}");
        assert!(text.contains("bin/sh -> busybox"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("crw") && l.contains("dev/console")),
            "{text}"
        );
        let extract = std::process::Command::new("cpio")
            .args(["-i", "-d", "--no-absolute-filenames", "-F"])
            .arg(&archive)
            .arg("bin/hello")
            .current_dir(&dir)
            .status()
            .unwrap();
        assert!(extract.success());
        assert_eq!(
            std::fs::read(dir.join("bin/hello")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
    }
}
