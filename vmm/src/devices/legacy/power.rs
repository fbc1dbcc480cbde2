//! The I/O port the FADT names as the sleep control, sleep status and reset
//! register. Hardware-reduced ACPI has no PM1 blocks: a guest's `poweroff`
//! writes SLP_TYP (the `_S5_` value) with SLP_EN here, its `reboot` the
//! FADT's reset value. It holds no state, so snapshots carry nothing of it.

use crate::devices::bus::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

pub const POWER_PORT: u16 = 0x600;
pub const POWER_PORT_LEN: u64 = 1;
/// What the FADT tells the guest to write for a reset.
pub const RESET_VALUE: u8 = 1;
/// The sleep type the DSDT's `_S5_` package gives.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Sleep control register (ACPI 6.5, 4.8.3.7): SLP_TYP in bits 2-4, SLP_EN
/// in bit 5.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111 << SLP_TYP_SHIFT;
const SLP_EN: u8 = 1 << 5;

pub struct PowerPort {
    exit: ExitNotifier,
}

impl PowerPort {
    pub fn new(exit: ExitNotifier) -> Self {
        PowerPort { exit }
    }
}

impl BusDevice for PowerPort {
    /// Sleep status: WAK_STS never set (only S5 is offered, and the guest
    /// does not come back from it).
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let [value] = data else {
            return;
        };
        if value & SLP_EN != 0 {
            // Only S5 exists in the DSDT; another sleep type is a guest
            // bug, and ignoring it leaves the guest running as it was.
            if (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLEEP_TYPE {
                self.exit.notify(ExitReason::GuestPowerOff);
            }
        } else if *value == RESET_VALUE {
            self.exit.notify(ExitReason::GuestReset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> (PowerPort, std::sync::mpsc::Receiver<ExitReason>) {
        let (exit, rx) = ExitNotifier::new();
        (PowerPort::new(exit), rx)
    }

    #[test]
    fn s5_with_slp_en_powers_off_and_the_reset_value_resets() {
        let (mut p, rx) = port();
        p.write(0, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT | SLP_EN]);
        assert_eq!(rx.try_recv(), Ok(ExitReason::GuestPowerOff));
        let (mut p, rx) = port();
        p.write(0, &[RESET_VALUE]);
        assert_eq!(rx.try_recv(), Ok(ExitReason::GuestReset));
    }

    #[test]
    fn other_writes_change_nothing() {
        let (mut p, rx) = port();
        // S5 without SLP_EN, S3 with it, a word-sized write, zero.
        p.write(0, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]);
        p.write(0, &[3 << SLP_TYP_SHIFT | SLP_EN]);
        p.write(0, &[RESET_VALUE, 0]);
        p.write(0, &[0]);
        assert!(rx.try_recv().is_err());
        let mut status = [0xffu8];
        p.read(0, &mut status);
        assert_eq!(status, [0]);
    }
}
