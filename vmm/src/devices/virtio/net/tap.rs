//! A Linux tap device in non-blocking mode with a 12-byte virtio-net header
//! on every frame (IFF_VNET_HDR), which is exactly the header a VERSION_1
//! virtio-net driver puts in front of its frames.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// struct virtio_net_hdr_v1: what precedes every frame, both ways.
pub const VNET_HDR_LEN: usize = 12;

/// `struct ifreq` as far as the tun ioctls use it.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} is empty or longer than 15 bytes")]
    Name(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("cannot attach to tap {name}: {source}")]
    Attach { name: String, source: io::Error },
    #[error("tap fd {fd} is not usable: {source}")]
    Fd { fd: RawFd, source: io::Error },
    #[error("tap fd {0} was opened without IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")]
    FdFlags(RawFd),
    #[error("cannot configure tap {name}: {source}")]
    Configure { name: String, source: io::Error },
}

pub struct Tap {
    file: File,
    name: String,
}

fn ifreq(name: &str, flags: libc::c_short) -> IfReq {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    req
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Taps attached before the VMM gave up CAP_NET_ADMIN (the jail), by name.
static PREOPENED: std::sync::Mutex<Vec<Tap>> = std::sync::Mutex::new(Vec::new());

/// Attaches to the tap `name` now, for a later [`Tap::open`] of that name.
pub fn preopen(name: &str) -> Result<(), TapError> {
    let tap = Tap::attach(name)?;
    PREOPENED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(tap);
    Ok(())
}

impl Tap {
    /// Attaches to the tap `name`, creating it if it does not exist (which
    /// needs CAP_NET_ADMIN), or takes it from those attached by [`preopen`].
    /// A new tap starts down; bringing it up and attaching it to a bridge
    /// is the caller's business.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let mut preopened = PREOPENED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = preopened.iter().position(|t| t.name == name) {
            return Ok(preopened.swap_remove(i));
        }
        drop(preopened);
        Tap::attach(name)
    }

    fn attach(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::Name(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req`
        // is laid out as and outlives the call; the fd is our open tun fd.
        check(unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) }).map_err(|source| {
            TapError::Attach {
                name: name.to_string(),
                source,
            }
        })?;
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.configure()?;
        Ok(tap)
    }

    /// Takes over a tap fd another process (the agent) attached for us.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let file = File::from(fd);
        let mut req = ifreq("", 0);
        // SAFETY: TUNGETIFF fills a `struct ifreq`, which `req` is laid out
        // as; a non-tun fd makes it fail with an error, nothing else.
        check(unsafe { libc::ioctl(raw, TUNGETIFF, &mut req) })
            .map_err(|source| TapError::Fd { fd: raw, source })?;
        let wanted = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if req.flags & wanted != wanted {
            return Err(TapError::FdFlags(raw));
        }
        // SAFETY: F_GETFL/F_SETFL on an fd we own take and return ints.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        check(flags).map_err(|source| TapError::Fd { fd: raw, source })?;
        // SAFETY: as above.
        check(unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) })
            .map_err(|source| TapError::Fd { fd: raw, source })?;
        let end = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let tap = Tap {
            file,
            name: String::from_utf8_lossy(&req.name[..end]).into_owned(),
        };
        tap.configure()?;
        Ok(tap)
    }

    /// A 12-byte header, and no offloads: we negotiate none with the guest.
    fn configure(&self) -> Result<(), TapError> {
        let err = |source| TapError::Configure {
            name: self.name.clone(),
            source,
        };
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, which
        // points at `size` for the duration of the call.
        check(unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &size) })
            .map_err(err)?;
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        check(unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) })
            .map_err(err)?;
        Ok(())
    }

    /// Any fd that reads and writes whole frames (a datagram socket) in
    /// place of a tap, unchecked: for fuzzing and tests.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn from_file_unchecked(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// One frame (with its header), or WouldBlock when none is queued.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
