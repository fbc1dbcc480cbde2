//! Enough of the i8042 keyboard controller for two things: the PC's reset
//! line (command 0xFE on port 0x64 ends the VM cleanly) and Ctrl-Alt-Del,
//! which is how the VMM asks a guest to shut down gracefully. The controller
//! answers Linux's probing (self test, control register) so its keyboard
//! driver binds, and delivers keyboard bytes on IRQ 1.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::exit::{ExitNotifier, ExitReason};

pub const I8042_PORT_BASE: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
pub const KEYBOARD_GSI: u32 = 1;
const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const STATUS_KBD_UNLOCKED: u8 = 0x10;

const CTR_KBD_INTERRUPT: u8 = 0x01;
const CTR_SYSTEM: u8 = 0x04;

const SELF_TEST_OK: u8 = 0x55;
const KBD_ACK: u8 = 0xfa;
const KBD_RESET_OK: u8 = 0xaa;
const KBD_CMD_RESET: u8 = 0xff;
const KBD_CMD_GET_ID: u8 = 0xf2;
/// An MF2 keyboard.
const KBD_ID: [u8; 2] = [0xab, 0x83];
/// Ctrl, Alt, Del make codes in scan code set 2, as the guest's keyboard
/// driver expects them from an untranslating controller.
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

pub struct I8042 {
    exit: ExitNotifier,
    irq: EventFd,
    ctr: u8,
    output_port: u8,
    status: u8,
    /// The command whose data byte comes next on the data port.
    pending: Option<u8>,
    out: VecDeque<u8>,
}

/// The controller's registers and queued bytes, as a snapshot keeps them.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    pub ctr: u8,
    pub output_port: u8,
    pub status: u8,
    pub pending: Option<u8>,
    pub out: Vec<u8>,
}

impl I8042 {
    pub fn state(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            output_port: self.output_port,
            status: self.status,
            pending: self.pending,
            out: self.out.iter().copied().collect(),
        }
    }

    pub fn restore(&mut self, s: &I8042State) {
        self.ctr = s.ctr;
        self.output_port = s.output_port;
        self.status = s.status;
        self.pending = s.pending;
        self.out = s.out.iter().copied().collect();
    }

    pub fn new(exit: ExitNotifier, irq: EventFd) -> Self {
        I8042 {
            exit,
            irq,
            ctr: CTR_KBD_INTERRUPT | CTR_SYSTEM,
            output_port: 0x01,
            status: STATUS_SYSTEM | STATUS_KBD_UNLOCKED,
            pending: None,
            out: VecDeque::new(),
        }
    }

    pub fn irq_eventfd(&self) -> &EventFd {
        &self.irq
    }

    fn push(&mut self, bytes: &[u8]) {
        self.out.extend(bytes);
        self.status |= STATUS_OUTPUT_FULL;
        if self.ctr & CTR_KBD_INTERRUPT != 0 {
            let _ = self.irq.write(1);
        }
    }

    /// Presses Ctrl-Alt-Del: a Linux guest reboots (or lets init decide).
    pub fn ctrl_alt_del(&mut self) {
        self.push(&CTRL_ALT_DEL);
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CTR => self.push(&[self.ctr]),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.pending = Some(cmd),
            CMD_SELF_TEST => self.push(&[SELF_TEST_OK]),
            CMD_KBD_TEST => self.push(&[0x00]),
            CMD_READ_OUTPUT_PORT => self.push(&[self.output_port]),
            CMD_RESET_CPU => self.exit.notify(ExitReason::GuestReset),
            // Enabling/disabling ports and the rest need no answer.
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            Some(CMD_WRITE_OUTPUT_PORT) => self.output_port = value,
            // A byte for the keyboard itself.
            _ => match value {
                KBD_CMD_RESET => self.push(&[KBD_ACK, KBD_RESET_OK]),
                KBD_CMD_GET_ID => self.push(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
                _ => self.push(&[KBD_ACK]),
            },
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            DATA_OFFSET => {
                let byte = self.out.pop_front().unwrap_or(0);
                if self.out.is_empty() {
                    self.status &= !STATUS_OUTPUT_FULL;
                } else if self.ctr & CTR_KBD_INTERRUPT != 0 {
                    let _ = self.irq.write(1);
                }
                byte
            }
            COMMAND_OFFSET => self.status,
            _ => 0,
        };
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            DATA_OFFSET => self.data(value),
            COMMAND_OFFSET => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (I8042, ExitNotifier, std::sync::mpsc::Receiver<ExitReason>) {
        let (exit, rx) = ExitNotifier::new();
        (I8042::new(exit.clone(), EventFd::new(0).unwrap()), exit, rx)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn only_the_reset_command_ends_the_vm() {
        let (mut dev, exit, rx) = device();
        dev.write(DATA_OFFSET, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert!(rx.try_recv().is_err());
        assert!(!exit.stopping());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(rx.try_recv().unwrap(), ExitReason::GuestReset);
        assert!(exit.stopping());
    }

    #[test]
    fn answers_linux_probing_and_delivers_ctrl_alt_del() {
        let (mut dev, _exit, _rx) = device();
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), SELF_TEST_OK);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x47);
        dev.write(DATA_OFFSET, &[KBD_CMD_GET_ID]);
        let id: Vec<u8> = (0..3).map(|_| read(&mut dev, DATA_OFFSET)).collect();
        assert_eq!(id, [KBD_ACK, 0xab, 0x83]);

        let before = dev.irq_eventfd().read().unwrap();
        assert!(before > 0);
        dev.ctrl_alt_del();
        assert!(dev.irq_eventfd().read().unwrap() > 0, "IRQ 1 raised");
        let keys: Vec<u8> = (0..4).map(|_| read(&mut dev, DATA_OFFSET)).collect();
        assert_eq!(keys, CTRL_ALT_DEL);
    }
}
