//! The kernel inside a disk image. A cloud image carries its own kernel
//! and initrd on its root filesystem; Debian keeps `/vmlinuz` and
//! `/initrd.img` (or, with `link_in_boot`, `/boot/vmlinuz` and
//! `/boot/initrd.img`) pointing at the versioned files. Found by reading
//! the partition table (GPT or MBR) and the first ext4 partition that
//! holds a kernel, whose PARTUUID the command line then names as root.
//! Nothing is mounted: the disk is read as a file, in user space.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ext4_view::{Ext4, Ext4Read};

const SECTOR: u64 = 512;
const EXT4_MAGIC_OFFSET: u64 = 1024 + 56;
const EXT4_MAGIC: u16 = 0xef53;
const GPT_PROTECTIVE: u8 = 0xee;
/// Kernels and initrds read into memory: a distribution's are tens of MiB.
const MAX_KERNEL_BYTES: u64 = 256 << 20;
const MAX_INITRD_BYTES: u64 = 1 << 30;
const KERNELS: [&str; 2] = ["/vmlinuz", "/boot/vmlinuz"];
const INITRDS: [&str; 2] = ["/initrd.img", "/boot/initrd.img"];

/// What a disk offers to boot from.
#[derive(Debug)]
pub struct BootFiles {
    /// 1-based, as Linux numbers partitions (vda1).
    pub partition: u32,
    /// What `root=PARTUUID=` names.
    pub partuuid: String,
    /// The path the kernel was found at (a symlink's name when it was one).
    pub kernel_path: String,
    pub kernel: Vec<u8>,
    pub initrd: Option<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum BootFilesError {
    #[error("cannot read the disk image: {0}")]
    Io(#[from] std::io::Error),
    #[error("no partition table: neither a GPT nor an MBR with partitions")]
    NoPartitionTable,
    #[error("no ext4 partition among its {0} partition(s)")]
    NoExt4(usize),
    #[error("partition {partition} is ext4 but cannot be read: {message}")]
    Ext4 { partition: u32, message: String },
    #[error("no kernel in the ext4 partition(s) {partitions:?}: none of {} exists", KERNELS.join(", "))]
    NoKernel { partitions: Vec<u32> },
    #[error(
        "{path} in partition {partition} is not a kernel: neither an ELF vmlinux nor a bzImage"
    )]
    NotAKernel { partition: u32, path: String },
    #[error(
        "{path} in partition {partition} is {bytes} bytes, more than the {limit} read into memory"
    )]
    TooLarge {
        partition: u32,
        path: String,
        bytes: u64,
        limit: u64,
    },
}

/// One partition: where it is, and its PARTUUID.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Partition {
    number: u32,
    start: u64,
    size: u64,
    partuuid: String,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A GPT unique GUID as Linux prints it: the first three fields are
/// little-endian on disk.
fn guid(b: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        le32(b, 0),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10..16]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    )
}

fn gpt(file: &File, disk_bytes: u64) -> Result<Vec<Partition>, BootFilesError> {
    let mut header = [0u8; 92];
    file.read_exact_at(&mut header, SECTOR)?;
    if &header[..8] != b"EFI PART" {
        return Ok(Vec::new());
    }
    let (entries_at, count, entry_size) = (le64(&header, 72), le32(&header, 80), le32(&header, 84));
    // A hostile header must not make us read gigabytes.
    if !(128..=4096).contains(&entry_size) || count > 1024 {
        return Ok(Vec::new());
    }
    let mut table = vec![0u8; count as usize * entry_size as usize];
    file.read_exact_at(&mut table, entries_at.saturating_mul(SECTOR))?;
    let mut parts = Vec::new();
    for (i, e) in table.chunks(entry_size as usize).enumerate() {
        if e[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        let (start, end) = (
            first.saturating_mul(SECTOR),
            (last + 1).saturating_mul(SECTOR),
        );
        if last < first || end > disk_bytes {
            continue;
        }
        parts.push(Partition {
            number: i as u32 + 1,
            start,
            size: end - start,
            partuuid: guid(&e[16..32]),
        });
    }
    Ok(parts)
}

/// The partitions of the disk image at `file`, GPT or MBR (primary
/// partitions only).
fn partitions(file: &File) -> Result<Vec<Partition>, BootFilesError> {
    let disk_bytes = file.metadata()?.len();
    if disk_bytes < 2 * SECTOR {
        return Err(BootFilesError::NoPartitionTable);
    }
    let mut mbr = [0u8; 512];
    file.read_exact_at(&mut mbr, 0)?;
    if mbr[510..] != [0x55, 0xaa] {
        return Err(BootFilesError::NoPartitionTable);
    }
    let entries: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + 16 * i..462 + 16 * i]).collect();
    let parts = if entries.iter().any(|e| e[4] == GPT_PROTECTIVE) {
        gpt(file, disk_bytes)?
    } else {
        let signature = le32(&mbr, 440);
        (entries.iter().enumerate())
            .filter(|(_, e)| !matches!(e[4], 0 | 0x05 | 0x0f | 0x85))
            .map(|(i, e)| Partition {
                number: i as u32 + 1,
                start: u64::from(le32(e, 8)) * SECTOR,
                size: u64::from(le32(e, 12)) * SECTOR,
                partuuid: format!("{signature:08x}-{:02x}", i + 1),
            })
            .filter(|p| p.size > 0 && p.start + p.size <= disk_bytes)
            .collect()
    };
    if parts.is_empty() {
        return Err(BootFilesError::NoPartitionTable);
    }
    Ok(parts)
}

/// One partition of the image, as ext4-view reads it.
struct PartitionReader {
    file: File,
    start: u64,
    size: u64,
}

impl Ext4Read for PartitionReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let end = start_byte.checked_add(dst.len() as u64);
        if end.is_none_or(|end| end > self.size) {
            return Err("read past the end of the partition".into());
        }
        Ok(self.file.read_exact_at(dst, self.start + start_byte)?)
    }
}

fn is_kernel(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF") || bytes.get(0x202..0x206) == Some(b"HdrS")
}

/// The first of `paths` that exists in `fs`, read whole (symlinks
/// followed), if it is at most `limit` bytes.
fn read_first(
    fs: &Ext4,
    partition: u32,
    paths: &[&str],
    limit: u64,
) -> Result<Option<(String, Vec<u8>)>, BootFilesError> {
    let ext4_err = |e: ext4_view::Ext4Error| BootFilesError::Ext4 {
        partition,
        message: e.to_string(),
    };
    for &path in paths {
        if !fs.exists(path).map_err(ext4_err)? {
            continue;
        }
        let bytes = fs.metadata(path).map_err(ext4_err)?.len();
        if bytes > limit {
            return Err(BootFilesError::TooLarge {
                partition,
                path: path.into(),
                bytes,
                limit,
            });
        }
        return Ok(Some((path.to_string(), fs.read(path).map_err(ext4_err)?)));
    }
    Ok(None)
}

/// The kernel (and initrd, if there is one) of the disk image at `disk`.
pub fn find(disk: &Path) -> Result<BootFiles, BootFilesError> {
    let file = File::open(disk)?;
    let parts = partitions(&file)?;
    let mut ext4 = Vec::new();
    for p in &parts {
        let mut magic = [0u8; 2];
        if p.size > EXT4_MAGIC_OFFSET + 2 {
            file.read_exact_at(&mut magic, p.start + EXT4_MAGIC_OFFSET)?;
        }
        if u16::from_le_bytes(magic) != EXT4_MAGIC {
            continue;
        }
        ext4.push(p.number);
        let reader = PartitionReader {
            file: file.try_clone()?,
            start: p.start,
            size: p.size,
        };
        let fs = Ext4::load(Box::new(reader)).map_err(|e| BootFilesError::Ext4 {
            partition: p.number,
            message: e.to_string(),
        })?;
        let Some((kernel_path, kernel)) = read_first(&fs, p.number, &KERNELS, MAX_KERNEL_BYTES)?
        else {
            continue;
        };
        if !is_kernel(&kernel) {
            return Err(BootFilesError::NotAKernel {
                partition: p.number,
                path: kernel_path,
            });
        }
        let initrd = read_first(&fs, p.number, &INITRDS, MAX_INITRD_BYTES)?.map(|(_, b)| b);
        return Ok(BootFiles {
            partition: p.number,
            partuuid: p.partuuid.clone(),
            kernel_path,
            kernel,
            initrd,
        });
    }
    if ext4.is_empty() {
        return Err(BootFilesError::NoExt4(parts.len()));
    }
    Err(BootFilesError::NoKernel { partitions: ext4 })
}

#[cfg(test)]
#[path = "boot_files_tests.rs"]
mod tests;
