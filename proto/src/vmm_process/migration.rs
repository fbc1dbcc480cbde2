//! Where a live migration stands, as the source VMM reports it over
//! `VmmService.GetMigration` (by name) and the agent records it.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    Connecting,
    Precopy,
    Switchover,
    /// The destination runs the VM; the source VMM is about to exit.
    Completed,
    /// Failed or cancelled before the handover: the VM runs on the source.
    Failed,
    Cancelled,
    /// Go was sent but the destination could not be asked whether it ran
    /// the VM: the VM stays paused on the source until someone decides.
    #[default]
    Unknown,
    /// The agent's own phase for an incoming migration not yet handed
    /// over; a VMM never reports it.
    Receiving,
}

impl MigrationPhase {
    pub const ALL: [MigrationPhase; 8] = [
        MigrationPhase::Connecting,
        MigrationPhase::Precopy,
        MigrationPhase::Switchover,
        MigrationPhase::Completed,
        MigrationPhase::Failed,
        MigrationPhase::Cancelled,
        MigrationPhase::Unknown,
        MigrationPhase::Receiving,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MigrationPhase::Connecting => "connecting",
            MigrationPhase::Precopy => "precopy",
            MigrationPhase::Switchover => "switchover",
            MigrationPhase::Completed => "completed",
            MigrationPhase::Failed => "failed",
            MigrationPhase::Cancelled => "cancelled",
            MigrationPhase::Unknown => "unknown",
            MigrationPhase::Receiving => "receiving",
        }
    }

    /// The phase a VMM named; a name this build does not know is Unknown.
    pub fn from_name(name: &str) -> MigrationPhase {
        MigrationPhase::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .unwrap_or(MigrationPhase::Unknown)
    }

    /// Will the source VMM report no other phase after this one?
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationPhase::Completed
                | MigrationPhase::Failed
                | MigrationPhase::Cancelled
                | MigrationPhase::Unknown
        )
    }
}

impl fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_reads_back_by_name_and_in_json() {
        for phase in MigrationPhase::ALL {
            assert_eq!(MigrationPhase::from_name(phase.name()), phase);
            let json = serde_json::to_string(&phase).unwrap();
            assert_eq!(json, format!("\"{}\"", phase.name()));
        }
        assert_eq!(
            MigrationPhase::from_name("teleporting"),
            MigrationPhase::Unknown
        );
        assert!(!MigrationPhase::Receiving.is_final() && MigrationPhase::Cancelled.is_final());
    }
}
