//! How the control API names a device's rate limiter: the device
//! ("disk0", "nic1": its kind and its index in the VM config; "rng", the
//! one entropy device) and the direction ("io" for a disk and the rng;
//! "rx" and "tx" for a NIC). Both processes
//! parse and print these names here, so neither spells them itself.

use std::fmt;

/// A device of the VM config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceId {
    Disk(usize),
    Nic(usize),
    /// The entropy device (at most one per VM).
    Rng,
}

impl DeviceId {
    /// "disk<N>", "nic<N>" or "rng".
    pub fn parse(name: &str) -> Option<DeviceId> {
        if name == "rng" {
            return Some(DeviceId::Rng);
        }
        let number = |rest: &str| {
            // "disk01" is not "disk1": one spelling a device.
            let canonical = !rest.is_empty() && (rest == "0" || !rest.starts_with('0'));
            canonical.then(|| rest.parse().ok()).flatten()
        };
        if let Some(rest) = name.strip_prefix("disk") {
            return number(rest).map(DeviceId::Disk);
        }
        name.strip_prefix("nic").and_then(number).map(DeviceId::Nic)
    }

    /// The directions this device's limiters have.
    pub fn directions(self) -> &'static [Direction] {
        match self {
            DeviceId::Disk(_) | DeviceId::Rng => &[Direction::Io],
            DeviceId::Nic(_) => &[Direction::Rx, Direction::Tx],
        }
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceId::Disk(i) => write!(f, "disk{i}"),
            DeviceId::Nic(i) => write!(f, "nic{i}"),
            DeviceId::Rng => f.write_str("rng"),
        }
    }
}

/// Which way a limiter counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// A disk's reads and writes together.
    Io,
    /// What a NIC delivers to the guest.
    Rx,
    /// What a NIC takes from the guest.
    Tx,
}

impl Direction {
    pub fn parse(word: &str) -> Option<Direction> {
        match word {
            "io" => Some(Direction::Io),
            "rx" => Some(Direction::Rx),
            "tx" => Some(Direction::Tx),
            _ => None,
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Direction::Io => "io",
            Direction::Rx => "rx",
            Direction::Tx => "tx",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

/// One rate limiter of a VM: a device and one of its directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LimiterId {
    pub device: DeviceId,
    pub direction: Direction,
}

/// A device or direction name the contract does not have.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no rate limiter {device:?}/{direction:?}: devices are disk<N> (io), nic<N> (rx, tx) and rng (io)")]
pub struct UnknownLimiter {
    pub device: String,
    pub direction: String,
}

impl LimiterId {
    pub fn disk(index: usize) -> LimiterId {
        LimiterId {
            device: DeviceId::Disk(index),
            direction: Direction::Io,
        }
    }

    pub fn rng() -> LimiterId {
        LimiterId {
            device: DeviceId::Rng,
            direction: Direction::Io,
        }
    }

    pub fn nic(index: usize, direction: Direction) -> LimiterId {
        LimiterId {
            device: DeviceId::Nic(index),
            direction,
        }
    }

    /// The limiter the API's (device, direction) words name.
    pub fn parse(device: &str, direction: &str) -> Result<LimiterId, UnknownLimiter> {
        let unknown = || UnknownLimiter {
            device: device.to_string(),
            direction: direction.to_string(),
        };
        let d = DeviceId::parse(device).ok_or_else(unknown)?;
        let dir = Direction::parse(direction)
            .filter(|dir| d.directions().contains(dir))
            .ok_or_else(unknown)?;
        Ok(LimiterId {
            device: d,
            direction: dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_only_real_limiters_parse() {
        for id in [
            LimiterId::disk(0),
            LimiterId::disk(12),
            LimiterId::nic(0, Direction::Rx),
            LimiterId::nic(3, Direction::Tx),
            LimiterId::rng(),
        ] {
            let back = LimiterId::parse(&id.device.to_string(), id.direction.word());
            assert_eq!(back, Ok(id));
        }
        for (device, direction) in [
            ("disk0", "rx"),
            ("nic0", "io"),
            ("disk", "io"),
            ("disk01", "io"),
            ("nicx", "rx"),
            ("tap0", "rx"),
            ("nic1", "up"),
            ("disk-1", "io"),
            ("rng", "rx"),
            ("rng0", "io"),
        ] {
            let e = LimiterId::parse(device, direction).unwrap_err();
            assert!(e.to_string().contains(device), "{e}");
        }
    }
}
