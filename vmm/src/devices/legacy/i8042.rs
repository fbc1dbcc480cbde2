//! Just enough of the i8042 keyboard controller for the PC's reset line:
//! command 0xFE on port 0x64 pulses reset, which we turn into a clean exit.

use crate::devices::bus::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

pub const I8042_PORT_BASE: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    exit: ExitNotifier,
}

impl I8042 {
    pub fn new(exit: ExitNotifier) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: no key data, input buffer empty, so a guest never waits.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.notify(ExitReason::GuestReset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_reset_command_ends_the_vm() {
        let (exit, rx) = ExitNotifier::new();
        let mut dev = I8042::new(exit.clone());
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert!(rx.try_recv().is_err());
        assert!(!exit.stopping());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(rx.try_recv().unwrap(), ExitReason::GuestReset);
        assert!(exit.stopping());
    }
}
