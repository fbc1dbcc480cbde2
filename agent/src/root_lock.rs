//! One agent per state root. Two agents on one root would both re-adopt
//! and both restart the same VMs: two VMMs writing one disk. The first
//! agent holds an exclusive `flock` on `<state_root>/agent.lock` for its
//! whole life; the kernel drops it when the agent ends, however it ends
//! (kill -9 included), so a stale lock file never blocks the next agent.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The file under the state root that carries the lock and the holder's pid.
pub const LOCK_FILE: &str = "agent.lock";

#[derive(Debug, thiserror::Error)]
pub enum RootLockError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state root {root} is in use by another berth-agent ({holder}); one agent per state root"
    )]
    Held { root: PathBuf, holder: String },
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: Errno },
    #[error("cannot record this agent's pid in {path}: {source}")]
    Record {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held for the agent's life; dropping it releases the root.
#[derive(Debug)]
pub struct StateRootLock {
    _lock: Flock<File>,
}

impl StateRootLock {
    /// Takes the root or says who holds it. Never waits.
    pub fn acquire(root: &Path) -> Result<StateRootLock, RootLockError> {
        let path = root.join(LOCK_FILE);
        // std opens with O_CLOEXEC: the VMMs the agent spawns do not
        // inherit the lock (they must not keep the root locked after it).
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| RootLockError::Open {
                path: path.clone(),
                source,
            })?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let holder = match pid.trim() {
                    "" => "pid unknown".to_string(),
                    pid => format!("pid {pid}"),
                };
                return Err(RootLockError::Held {
                    root: root.to_owned(),
                    holder,
                });
            }
            Err((_, source)) => return Err(RootLockError::Lock { path, source }),
        };
        let record = |file: &mut File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            writeln!(file, "{}", std::process::id())?;
            file.sync_all()
        };
        record(&mut lock).map_err(|source| RootLockError::Record { path, source })?;
        Ok(StateRootLock { _lock: lock })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_root_is_refused_naming_the_holder() {
        let root = std::env::temp_dir().join(format!("berth-root-lock-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let first = StateRootLock::acquire(&root).unwrap();
        let err = StateRootLock::acquire(&root).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, RootLockError::Held { .. }),
            "wrong error: {text}"
        );
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "holder not named: {text}"
        );
        drop(first);
        // Released with its holder: the next agent takes the root.
        StateRootLock::acquire(&root).unwrap();
        let _ = std::fs::remove_dir_all(&root);
    }
}
