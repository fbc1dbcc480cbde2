//! The 16550 console on COM1, from vm-superio. Output goes to a log file
//! and/or stdout; input is fed in by a thread through `enqueue_input`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::{lock, BusDevice};
use crate::seccomp::ThreadKind;

pub const COM1_PORT_BASE: u64 = 0x3f8;
pub const COM1_PORT_LEN: u64 = 8;
pub const COM1_GSI: u32 = 4;

/// Raises the serial interrupt by writing the eventfd KVM watches (irqfd).
pub struct IrqTrigger(EventFd);

impl IrqTrigger {
    pub fn new() -> io::Result<Self> {
        Ok(IrqTrigger(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A console log file that stays under a size bound: when full it becomes
/// `<path>.1` (one old log kept) and writing starts over.
///
/// The console is written from the vCPU thread, whose seccomp filter allows
/// `write` but no `rename` or `open`: a rotation is done by a thread of its
/// own (kind control) while the writer waits for the new file, once per
/// bound's worth of output.
pub struct ConsoleLog {
    file: File,
    size: u64,
    max: Option<u64>,
    rotator: Option<Rotator>,
}

/// The rotation thread's two ends: "rotate now", and the new file back.
struct Rotator {
    ask: mpsc::Sender<()>,
    done: mpsc::Receiver<io::Result<File>>,
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// `path` becomes `path.1`; a new, empty `path` is opened.
fn rotate(path: &Path) -> io::Result<File> {
    let mut old = path.to_owned().into_os_string();
    old.push(".1");
    std::fs::rename(path, old)?;
    open_append(path)
}

impl ConsoleLog {
    pub fn open(path: &Path, max: Option<u64>) -> io::Result<Self> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        let rotator = match max {
            Some(_) => Some(Self::start_rotator(path.to_owned())?),
            None => None,
        };
        Ok(ConsoleLog {
            file,
            size,
            max,
            rotator,
        })
    }

    /// The thread ends when the log is dropped (its channel closes).
    fn start_rotator(path: PathBuf) -> io::Result<Rotator> {
        let (ask, asked) = mpsc::channel::<()>();
        let (done_tx, done) = mpsc::channel();
        crate::seccomp::spawn(ThreadKind::Control, "console-log".into(), move || {
            for () in asked {
                if done_tx.send(rotate(&path)).is_err() {
                    return;
                }
            }
        })?;
        Ok(Rotator { ask, done })
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if let (Some(max), Some(rotator)) = (self.max, &self.rotator) {
            if self.size > 0 && self.size + buf.len() as u64 > max {
                let gone = || io::Error::other("the console log's rotation thread is gone");
                rotator.ask.send(()).map_err(|_| gone())?;
                self.file = rotator.done.recv().map_err(|_| gone())??;
                self.size = 0;
            }
        }
        self.file.write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }
}

/// Where console output goes: every byte to each sink.
pub struct ConsoleOut {
    log: Option<ConsoleLog>,
    stdout: bool,
}

impl ConsoleOut {
    pub fn new(log: Option<ConsoleLog>, stdout: bool) -> Self {
        ConsoleOut { log, stdout }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(log) = &mut self.log {
            log.write_all(buf)?;
        }
        if self.stdout {
            io::stdout().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.stdout {
            io::stdout().flush()?;
        }
        Ok(())
    }
}

/// A snapshot's serial registers or FIFO that the 16550 model refuses.
#[derive(Debug, thiserror::Error)]
#[error("invalid serial state: {0:?}")]
pub struct SerialStateError(#[source] vm_superio::serial::Error<io::Error>);

pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, ConsoleOut>,
}

impl SerialDevice {
    pub fn new(irq: IrqTrigger, out: ConsoleOut) -> Self {
        SerialDevice {
            serial: Serial::new(irq, out),
        }
    }

    /// A device continuing from a snapshot's registers and FIFO.
    pub fn restore(
        state: &vm_superio::serial::SerialState,
        irq: IrqTrigger,
        out: ConsoleOut,
    ) -> Result<Self, SerialStateError> {
        Serial::from_state(state, irq, NoEvents, out)
            .map(|serial| SerialDevice { serial })
            .map_err(SerialStateError)
    }

    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.serial.state()
    }

    pub fn irq_eventfd(&self) -> &EventFd {
        self.serial.interrupt_evt().eventfd()
    }

    /// Queues as much of `input` as the receive FIFO takes; returns how much.
    fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.serial.fifo_capacity().min(input.len());
        if room == 0 {
            return 0;
        }
        self.serial.enqueue_raw_bytes(&input[..room]).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // A full disk or closed stdout must not stop the guest; the
            // bytes are lost and we say so once per failure.
            if let Err(e) = self.serial.write(off, value) {
                eprintln!("berth-vmm: console output failed: {e:?}");
            }
        }
    }
}

/// Feeds `input` into the guest's receive FIFO until end of file. The FIFO
/// is 64 bytes: when it is full we wait for the guest to drain it instead of
/// dropping input.
pub fn pump_input(device: Arc<Mutex<SerialDevice>>, mut input: impl Read) {
    let mut buf = [0u8; 256];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("berth-vmm: console input closed: {e}");
                return;
            }
        };
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let taken = lock(&device).enqueue_input(pending);
            pending = &pending[taken..];
            if !pending.is_empty() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_log_rotates_at_its_bound_and_keeps_one_old_log() {
        let dir = std::env::temp_dir().join(format!("berth-rotate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let _ = std::fs::remove_file(&path);
        let mut log = ConsoleLog::open(&path, Some(10)).unwrap();
        for chunk in [&b"0123456"[..], b"789", b"abcdef", b"ghijklmn"] {
            log.write_all(chunk).unwrap();
        }
        // 7+3 fits; "abcdef" rotates; "ghijklmn" rotates again.
        assert_eq!(std::fs::read(&path).unwrap(), b"ghijklmn");
        assert_eq!(std::fs::read(dir.join("console.log.1")).unwrap(), b"abcdef");
    }

    #[test]
    fn a_fifo_over_its_size_is_refused_with_the_model_error() {
        let state = vm_superio::serial::SerialState {
            in_buffer: vec![0; 65],
            ..Default::default()
        };
        let irq = IrqTrigger::new().unwrap();
        let Err(e) = SerialDevice::restore(&state, irq, ConsoleOut::new(None, false)) else {
            panic!("a 65-byte FIFO restored");
        };
        assert_eq!(e.to_string(), "invalid serial state: FullFifo");
        let cause = std::error::Error::source(&e).expect("the model's error is the cause");
        assert_eq!(cause.to_string(), "No space left in FIFO");
    }

    const RBR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[test]
    fn output_reaches_the_log_and_input_reaches_the_guest() {
        let dir = std::env::temp_dir().join(format!("berth-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log_path = dir.join("console.log");
        let _ = std::fs::remove_file(&log_path);
        let log = ConsoleLog::open(&log_path, None).unwrap();
        let dev = Arc::new(Mutex::new(SerialDevice::new(
            IrqTrigger::new().unwrap(),
            ConsoleOut::new(Some(log), false),
        )));
        for b in b"hi\n" {
            dev.lock().unwrap().write(0, &[*b]);
        }
        assert_eq!(std::fs::read(&log_path).unwrap(), b"hi\n");

        // Enable the receive interrupt, then feed more than one FIFO's worth.
        dev.lock().unwrap().write(IER, &[1]);
        let input: Vec<u8> = (0..200u8).collect();
        let feeder = {
            let dev = dev.clone();
            let input = input.clone();
            std::thread::spawn(move || pump_input(dev, &input[..]))
        };
        let mut got = Vec::new();
        while got.len() < input.len() {
            let mut d = dev.lock().unwrap();
            let mut lsr = [0u8];
            d.read(LSR, &mut lsr);
            if lsr[0] & 1 != 0 {
                let mut b = [0u8];
                d.read(RBR, &mut b);
                got.push(b[0]);
            }
        }
        feeder.join().unwrap();
        assert_eq!(got, input, "no byte lost or reordered past a full FIFO");
        assert!(dev.lock().unwrap().irq_eventfd().read().unwrap() > 0);
    }
}
