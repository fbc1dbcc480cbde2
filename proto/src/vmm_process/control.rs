//! What crosses the VMM's control socket (`VmmService`, vmm.proto) as a
//! type: the run state a VMM reports. Both processes read and write it
//! only through here.

use crate::vmm::{VmmInfo, VmmRunState};
use protobuf::EnumOrUnknown;

/// What a VMM's vCPUs are doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

impl RunState {
    /// The state `info` reports: its enum, or from a VMM of the release
    /// before it, its word ("paused"; any other word runs).
    pub fn of(info: &VmmInfo) -> RunState {
        match info.run_state.enum_value() {
            Ok(VmmRunState::VMM_RUN_STATE_PAUSED) => RunState::Paused,
            Ok(VmmRunState::VMM_RUN_STATE_RUNNING) => RunState::Running,
            _ if info.state == "paused" => RunState::Paused,
            _ => RunState::Running,
        }
    }

    /// Writes the state into `info`, as enum and as word.
    pub fn fill(self, info: &mut VmmInfo) {
        let (state, word) = match self {
            RunState::Running => (VmmRunState::VMM_RUN_STATE_RUNNING, "running"),
            RunState::Paused => (VmmRunState::VMM_RUN_STATE_PAUSED, "paused"),
        };
        info.run_state = EnumOrUnknown::new(state);
        info.state = word.into();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_round_trips_and_an_older_vmm_is_understood() {
        for state in [RunState::Running, RunState::Paused] {
            let mut info = VmmInfo::default();
            state.fill(&mut info);
            assert_eq!(RunState::of(&info), state);
            // The release before the enum sent only the word.
            info.run_state = Default::default();
            assert_eq!(RunState::of(&info), state);
        }
    }
}
