//! Which operation a VM accepts in which state: the one table. Every
//! lifecycle operation asks it before doing anything, so a refusal is the
//! same FAILED_PRECONDITION, with the same hint, wherever it comes from.

use crate::store::VmState;

/// An operation on one VM, as far as its state matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Start,
    /// Restore a snapshot into this VM.
    RestoreInto,
    Stop,
    Reboot,
    Pause,
    Resume,
    Snapshot,
    ConsoleInput,
    Delete,
    /// An Update that changes more than the shares and I/O limits.
    Redefine,
    MigrateOut,
    /// Cancel an outgoing migration (the record must also say "out").
    CancelMigration,
}

use Operation::*;
use VmState::*;

/// Every operation, for the tests that walk the table.
pub const OPERATIONS: [Operation; 12] = [
    Start,
    RestoreInto,
    Stop,
    Reboot,
    Pause,
    Resume,
    Snapshot,
    ConsoleInput,
    Delete,
    Redefine,
    MigrateOut,
    CancelMigration,
];

/// Every state, likewise.
pub const STATES: [VmState; 9] = [
    Defined, Starting, Running, Paused, Stopping, Stopped, Crashed, Migrating, Migrated,
];

/// The states `op` is allowed in, and what to tell a caller otherwise.
pub fn rule(op: Operation) -> (&'static [VmState], &'static str) {
    match op {
        Start => (
            &[Defined, Stopped, Crashed],
            "it must be Defined, Stopped or Crashed to start",
        ),
        RestoreInto => (
            &[Defined, Stopped, Crashed],
            "stop it to restore a snapshot into it",
        ),
        Stop | Reboot => (
            &[Running, Paused],
            "only a Running or Paused VM can be stopped",
        ),
        Pause => (&[Running], "only a Running VM can be paused"),
        Resume => (&[Paused], "only a Paused VM can be resumed"),
        Snapshot => (
            &[Running, Paused],
            "only a Running or Paused VM can be snapshotted",
        ),
        ConsoleInput => (&[Running, Paused], "console input needs a running VM"),
        Delete => (
            &[Defined, Stopped, Crashed, Migrated],
            "stop it before deleting it",
        ),
        Redefine => (
            &[Defined, Stopped, Crashed, Migrated],
            "only cpu and memory policies and rate limits change on a running VM; stop it to change the rest",
        ),
        MigrateOut => (&[Running], "only a Running VM can migrate"),
        CancelMigration => (
            &[Migrating],
            "only an outgoing migration in progress can be cancelled (cancel on the source node)",
        ),
    }
}

/// Ok when `op` may run on a VM in `state`; else the hint for the caller.
pub fn check(op: Operation, state: VmState) -> Result<(), &'static str> {
    let (allowed, hint) = rule(op);
    if allowed.contains(&state) {
        Ok(())
    } else {
        Err(hint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table agrees with what has a VMM: an operation that needs one is
    /// never allowed without one, and the ones that replace the VMM or the
    /// record never run beside one.
    #[test]
    fn needs_a_vmm_exactly_where_the_state_has_one() {
        for op in OPERATIONS {
            let (allowed, _) = rule(op);
            let needs_vmm = !matches!(op, Start | RestoreInto | Delete | Redefine);
            for state in allowed {
                assert_eq!(state.has_vmm(), needs_vmm, "{op:?} allowed in {state:?}");
            }
        }
    }

    #[test]
    fn transient_states_accept_nothing_but_cancel() {
        for op in OPERATIONS {
            assert!(check(op, Starting).is_err(), "{op:?} while Starting");
            assert!(check(op, Stopping).is_err(), "{op:?} while Stopping");
            assert_eq!(check(op, Migrating).is_ok(), op == CancelMigration);
        }
    }
}
