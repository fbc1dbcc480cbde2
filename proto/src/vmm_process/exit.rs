//! How a VMM ended, for a supervisor that is not its parent: berth-vmm
//! writes `{"code": .., "reason": ".."}` to its `--exit-file` (atomically)
//! as its last act; the agent reads it after the process is gone.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::files::write_atomic;

/// The status berth-vmm's SIGSYS handler exits with when a thread made a
/// system call its seccomp filter forbids. It leaves no exit record: the
/// handler may not do file I/O.
pub const SECCOMP_EXIT_STATUS: i32 = 159;

/// The exit codes berth-vmm uses.
pub mod code {
    /// The guest reset or shut down, or the VMM was stopped by SIGTERM/SIGINT.
    pub const CLEAN: i32 = 0;
    /// An error before the guest ran (bad config, jail, cgroup, gate).
    pub const NOT_STARTED: i32 = 1;
    /// The VMM could not continue the guest (internal error, triple fault).
    pub const GUEST_FAILED: i32 = 2;
}

/// What ended the VM, in the terms a supervisor acts on: a guest's
/// `reboot` asks for the machine back, its `poweroff` does not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitCause {
    /// A stop, a signal, a fault, a migration, an error before the guest
    /// ran (the code and reason say which); also a record from a VMM
    /// older than this field.
    #[default]
    Other,
    /// The guest reset the machine: `reboot` (the i8042 pulse or the
    /// FADT's reset register).
    GuestReset,
    /// The guest turned the machine off (ACPI S5, or KVM_SYSTEM_EVENT_SHUTDOWN).
    GuestPowerOff,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub code: i32,
    pub reason: String,
    #[serde(default)]
    pub cause: ExitCause,
}

impl ExitRecord {
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut text = serde_json::to_vec(self).expect("plain data serialises");
        text.push(b'\n');
        write_atomic(path, &text)
    }

    /// The record at `path`; None when there is none or it is not one.
    pub fn read(path: &Path) -> Option<ExitRecord> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_a_torn_one_reads_as_none() {
        let dir = std::env::temp_dir().join(format!("berth-exit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("exit.json");
        let record = ExitRecord {
            code: code::GUEST_FAILED,
            reason: "triple fault \"here\"".into(),
            cause: ExitCause::Other,
        };
        record.write(&path).unwrap();
        assert_eq!(ExitRecord::read(&path), Some(record));
        // A record written before `cause` existed reads as Other.
        std::fs::write(
            &path,
            b"{\"code\": 0, \"reason\": \"guest requested reset\"}",
        )
        .unwrap();
        assert_eq!(ExitRecord::read(&path).unwrap().cause, ExitCause::Other);
        let reset = ExitRecord {
            code: code::CLEAN,
            reason: "guest requested reset".into(),
            cause: ExitCause::GuestReset,
        };
        reset.write(&path).unwrap();
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("\"cause\":\"guest_reset\""));
        assert_eq!(ExitRecord::read(&path), Some(reset));
        std::fs::write(&path, b"{\"code\": 1, \"rea").unwrap();
        assert_eq!(ExitRecord::read(&path), None);
        assert_eq!(ExitRecord::read(&dir.join("missing")), None);
    }
}
