//! The SIGSYS handler: a filtered thread asked for a system call outside
//! its allow-list. Say which one, then end the process with status 159
//! (128 + SIGSYS), which the agent reports as a seccomp violation.
//!
//! Only async-signal-safe calls here (write, _exit), and both are on every
//! kind's list, so the handler cannot trap itself.

use std::cell::Cell;

use super::ThreadKind;

/// The exit status of a VMM stopped by its seccomp filter.
pub const EXIT_STATUS: i32 = berth_proto::vmm_process::exit::SECCOMP_EXIT_STATUS;

thread_local! {
    // const-initialised Copy: reading it allocates nothing, safe in a handler.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

pub fn set_thread_kind(kind: ThreadKind) {
    KIND.with(|k| k.set(Some(kind)));
}

pub fn install() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; we fill in a handler with the
    // SA_SIGINFO signature and an empty mask before passing it to the kernel.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = handle;
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

extern "C" fn handle(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler; for
    // SIGSYS from seccomp the system call number is the int 8 bytes into the
    // union that starts at offset 16 (after si_signo, si_errno, si_code and
    // padding), after the 8-byte call address.
    let nr = unsafe { *(info as *const u8).add(24).cast::<libc::c_int>() };
    // The one filtered thread without a kind is the launcher.
    let kind = KIND.with(|k| k.get()).map_or("launcher", ThreadKind::name);
    let name = syscalls::Sysno::new(nr as usize).map_or("unknown", |s| s.name());
    let mut line = Line::default();
    line.push("berth-vmm: seccomp: a ");
    line.push(kind);
    line.push(" thread made the forbidden system call ");
    line.push(name);
    line.push(" (");
    line.push_number(nr as u64);
    line.push("); stopping the VM\n");
    // SAFETY: write and _exit are async-signal-safe; the buffer outlives the call.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_STATUS);
    }
}

/// A fixed buffer: a signal handler must not allocate.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, s: &str) {
        self.push_bytes(s.as_bytes());
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push_bytes(&digits[i..]);
    }
}
