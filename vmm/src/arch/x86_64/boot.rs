//! Loading a kernel and initrd and filling in the Linux x86-64 boot protocol
//! (Documentation/arch/x86/boot.rst): the zero page with the e820 map, the
//! command line, and the initrd's place.

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::*;
use crate::memory::GuestMemory;

const PAGE_SIZE: u64 = 4096;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// setup_header.xloadflags: the bzImage has a 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    KernelOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a kernel: neither an ELF vmlinux nor a bzImage")]
    NotAKernel { path: PathBuf },
    #[error("cannot load kernel {path}: {message}")]
    KernelLoad { path: PathBuf, message: String },
    #[error("bzImage {path} has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")]
    No64BitEntry { path: PathBuf },
    #[error("cannot open initrd {path}: {source}")]
    InitrdOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "initrd {path} ({size} bytes) does not fit in guest memory: it needs to sit between the \
         kernel's end at {kernel_end:#x} and {limit:#x}; give the VM more memory"
    )]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    #[error(
        "kernel command line is {len} bytes; this kernel accepts at most {max} (boot protocol limit)"
    )]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write boot structures into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// What the rest of the boot needs to know about a loaded kernel.
#[derive(Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// The 64-bit entry point (rip of the boot vCPU).
    pub entry: u64,
    /// First byte the kernel may still use after loading (decompression
    /// space for a bzImage), so the initrd goes above it.
    pub end: u64,
    /// The bzImage's own setup header, copied into the zero page.
    pub setup_header: Option<setup_header>,
}

impl LoadedKernel {
    /// Largest command line, including its NUL, this kernel accepts.
    pub fn cmdline_limit(&self) -> usize {
        match self.setup_header {
            Some(hdr) if hdr.version >= 0x206 => {
                CMDLINE_MAX_SIZE.min(hdr.cmdline_size as usize + 1)
            }
            _ => CMDLINE_MAX_SIZE,
        }
    }
}

fn detect_format(path: &Path, file: &mut File) -> Result<KernelFormat, BootError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut head = [0u8; 0x206];
    let read = file
        .read(&mut head)
        .and_then(|n| file.seek(SeekFrom::Start(0)).map(|_| n))
        .map_err(|source| BootError::KernelOpen {
            path: path.to_owned(),
            source,
        })?;
    if read >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if read >= 0x206
        && u32::from_le_bytes(head[0x202..0x206].try_into().unwrap()) == KERNEL_HDR_MAGIC
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::NotAKernel {
        path: path.to_owned(),
    })
}

/// Loads an ELF vmlinux or a bzImage into guest memory.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::KernelOpen {
        path: path.to_owned(),
        source,
    })?;
    let format = detect_format(path, &mut file)?;
    let load_err = |e: linux_loader::loader::Error| BootError::KernelLoad {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::Elf => {
            let res = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(LoadedKernel {
                format,
                entry: res.kernel_load.0,
                end: res.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let res = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            let hdr = res
                .setup_header
                .expect("bzImage loader returns a setup header");
            if hdr.version < 0x20c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry {
                    path: path.to_owned(),
                });
            }
            // The decompressor works in place up to init_size from the
            // preferred address (or where it was loaded, if relocatable).
            let decompress_base = res.kernel_load.0.max(hdr.pref_address);
            Ok(LoadedKernel {
                format,
                entry: res.kernel_load.0 + 0x200,
                end: res
                    .kernel_end
                    .max(decompress_base + u64::from(hdr.init_size)),
                setup_header: Some(hdr),
            })
        }
    }
}

/// Where the initrd went: `(address, size)`.
pub type InitrdPlacement = (u64, u64);

/// Puts the initrd as high as allowed in low memory, above the kernel.
pub fn load_initrd(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<InitrdPlacement, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::InitrdOpen {
        path: path.to_owned(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::InitrdOpen {
            path: path.to_owned(),
            source,
        })?
        .len();
    let lowmem_end = mem.last_addr().0.min(MMIO_GAP_START - 1) + 1;
    let limit = match kernel.setup_header {
        Some(hdr) if hdr.version >= 0x203 => lowmem_end.min(u64::from(hdr.initrd_addr_max) + 1),
        _ => lowmem_end,
    };
    let kernel_end = kernel.end.next_multiple_of(PAGE_SIZE);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end || size > u64::from(u32::MAX) {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| BootError::InitrdRead {
            path: path.to_owned(),
            source,
        })?;
    Ok((addr, size))
}

/// Writes the NUL-terminated command line where the zero page points.
pub fn write_cmdline(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &str,
) -> Result<(), BootError> {
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let max = kernel.cmdline_limit();
    if cmdline.len() + 1 > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: max - 1,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))?;
    Ok(())
}

/// Builds the zero page for the 64-bit entry; `acpi_rsdp` is where the
/// ACPI tables start, when the VM has them.
pub fn write_zero_page(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    mem_size: u64,
    acpi_rsdp: Option<u64>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if let Some(rsdp) = acpi_rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    let map = e820_map(mem_size, acpi_rsdp.is_some());
    for (slot, &(addr, size, type_)) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::create_guest_memory;

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let kernel = LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x100_0000,
            end: 0x120_0000,
            setup_header: None,
        };
        write_cmdline(&mem, &kernel, "console=ttyS0").unwrap();
        write_zero_page(
            &mem,
            &kernel,
            13,
            Some((0x300_0000, 0x1000)),
            64 << 20,
            None,
        )
        .unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ params.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!(params.e820_entries, 2);
        assert_eq!({ params.acpi_rsdp_addr }, 0, "no ACPI tables, no RSDP");
        let high = params.e820_table[1];
        assert_eq!(({ high.addr }, { high.size }), (HIMEM_START, (63 << 20)));
        write_zero_page(&mem, &kernel, 13, None, 64 << 20, Some(0xe_0000)).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(params.e820_entries, 3);
        let tables = params.e820_table[1];
        assert_eq!(
            ({ tables.addr }, { tables.size }, { tables.r#type }),
            (0xe_0000, 0x2_0000, E820_RESERVED)
        );
        let mut line = [0u8; 14];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0\0");
    }

    #[test]
    fn cmdline_over_the_protocol_limit_is_refused() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let kernel = LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0,
            end: 0,
            setup_header: None,
        };
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let err = write_cmdline(&mem, &kernel, &long).unwrap_err();
        assert!(
            matches!(
                err,
                BootError::CmdlineTooLong {
                    len: 2048,
                    max: 2047
                }
            ),
            "{err}"
        );
        write_cmdline(&mem, &kernel, &long[..CMDLINE_MAX_SIZE - 1]).unwrap();
    }
}
