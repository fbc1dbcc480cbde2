//! How nodectl shows the agent's answers: tables and key-value lists for
//! people (`table`), JSON for scripts (`json`).

use berth_proto::vm::VmState;

pub mod json;
pub mod table;

pub fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::DEFINED => "Defined",
        VmState::STARTING => "Starting",
        VmState::RUNNING => "Running",
        VmState::PAUSED => "Paused",
        VmState::STOPPING => "Stopping",
        VmState::STOPPED => "Stopped",
        VmState::MIGRATING => "Migrating",
        VmState::CRASHED => "Crashed",
        VmState::MIGRATED => "Migrated",
        VmState::VM_STATE_UNSPECIFIED => "?",
    }
}

/// The ANSI colour of a state on a terminal: green runs, yellow is on its
/// way or paused, red failed, plain otherwise.
pub fn state_colour(state: &str) -> &'static str {
    match state {
        "Running" => "\x1b[32m",
        "Starting" | "Stopping" | "Paused" | "Migrating" => "\x1b[33m",
        "Crashed" => "\x1b[1;31m",
        _ => "\x1b[0m",
    }
}
