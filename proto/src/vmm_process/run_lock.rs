//! One VMM per VM, enforced where the VMM lives: every berth-vmm holds an
//! exclusive flock on its VM's `run/vmm.lock` for its whole life, taken
//! before it touches the guest, with its pid written inside. A second
//! VMM for the same VM cannot take it and refuses to start, whatever the
//! agent's records say; the agent asks the lock, not /proc, whether a VM
//! has a live VMM. The kernel drops the lock when the VMM dies, however
//! it dies.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
// std opens every file O_CLOEXEC: the lock stays with this process.
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The lock's name in a VM's run directory.
pub const FILE: &str = "vmm.lock";

/// How long a starting VMM retries a lock that is held: the agent's probe
/// holds it shared for a moment, a live VMM for good.
const ACQUIRE_PATIENCE: Duration = Duration::from_millis(300);

/// The lock, held while this value lives.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum RunLockError {
    #[error("another berth-vmm (pid {holder}) runs this VM: it holds {}", path.display())]
    Held { path: PathBuf, holder: i32 },
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunLockError + '_ {
    move |source| RunLockError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The pid written in the lock file (0 when none is yet).
fn read_pid(file: &mut File) -> i32 {
    let mut text = String::new();
    let _ = file.rewind().and_then(|()| file.read_to_string(&mut text));
    text.trim().parse().unwrap_or(0)
}

impl RunLock {
    /// Takes the lock for this process and writes its pid into it.
    pub fn acquire(path: &Path) -> Result<RunLock, RunLockError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io(path))?;
        let deadline = Instant::now() + ACQUIRE_PATIENCE;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(RunLockError::Held {
                        path: path.to_owned(),
                        holder: read_pid(&mut file),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(path)(e)),
            }
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(io(path))?;
        Ok(RunLock { _file: file })
    }
}

/// Does a live VMM hold the lock at `path`? `Ok(Some(pid))` (pid 0 when it
/// has not written it yet), `Ok(None)` when no VMM does (or there is no
/// lock file: no VMM of this release ever ran here), an error when it
/// cannot be told (no descriptor left, say), which must never be taken
/// for "none".
pub fn holder(path: &Path) -> std::io::Result<Option<i32>> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(None),
        Err(std::fs::TryLockError::WouldBlock) => Ok(Some(read_pid(&mut file))),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_it_is_named() {
        let dir = std::env::temp_dir().join(format!("berth-run-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE);
        let _ = std::fs::remove_file(&path);
        assert_eq!(holder(&path).unwrap(), None, "no file: no VMM");
        let lock = RunLock::acquire(&path).unwrap();
        let me = std::process::id() as i32;
        assert_eq!(holder(&path).unwrap(), Some(me));
        // flock is per open file: a second open in this process is another
        // holder, as a second VMM would be.
        match RunLock::acquire(&path) {
            Err(RunLockError::Held { holder, .. }) => assert_eq!(holder, me),
            other => panic!("a second lock: {other:?}"),
        }
        drop(lock);
        assert_eq!(holder(&path).unwrap(), None, "released with its holder");
        let again = RunLock::acquire(&path).unwrap();
        assert_eq!(holder(&path).unwrap(), Some(me));
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
