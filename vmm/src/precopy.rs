//! Pre-copy: copying guest memory while the guest runs, so that the pause
//! that follows only has to carry what the guest dirtied last. A live
//! snapshot (a file) and a migration (a TCP stream) share this loop and
//! differ only in their [`Sink`]: where pages go, and when a remainder is
//! small enough (or the limits say stop) to pause for.
//!
//! The loop: turn the dirty log on, send all of memory (pass 1), then
//! read the dirty log, let the sink judge what it holds, and either stop
//! with it still to send or send it and read again. The caller pauses the
//! guest and sends the remainder with the last pages the pause catches.

use std::time::{Duration, Instant};

use crate::vstate::vm::{Vm, VmError};

/// Dirty pages, per guest memory region one bit per 4 KiB page (as
/// `Vm::take_dirty` returns them).
pub type DirtyPages = Vec<Vec<u64>>;

/// Where the pre-copy reads which pages the guest wrote. The VM's dirty log;
/// a trait so the loop's rules can be tested without KVM.
pub trait DirtyLog {
    /// Starts (or restarts) logging: what is dirty from now on.
    fn start(&self) -> Result<(), VmError>;
    /// What was dirtied since the last call (or the start), and clears it.
    fn take(&self) -> Result<DirtyPages, VmError>;
}

impl DirtyLog for Vm {
    fn start(&self) -> Result<(), VmError> {
        self.start_dirty_log()
    }

    fn take(&self) -> Result<DirtyPages, VmError> {
        self.take_dirty()
    }
}

/// One read of the dirty log, for the sink to judge.
pub struct Round<'a> {
    /// Passes sent so far; the first, full one is pass 1.
    pub passes: u32,
    pub dirty: &'a [Vec<u64>],
    /// How long the guest had to dirty these pages: since the previous
    /// read, or since the full pass ended.
    pub dirtied_in: Duration,
    /// Since the full pass began.
    pub elapsed: Duration,
}

/// Where the pre-copy sends memory, and its rules for stopping.
pub trait Sink {
    type Error: From<VmError>;

    /// Pass 1: all of guest memory.
    fn send_all(&mut self) -> Result<(), Self::Error>;

    /// A later pass: the pages set in `dirty`.
    fn send_dirty(&mut self, dirty: &[Vec<u64>]) -> Result<(), Self::Error>;

    /// Pass `pass` is sent.
    fn end_pass(&mut self, _pass: u32) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Before each read of the dirty log: a chance to give up (a cancel).
    fn check(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// `Ok(true)` to stop with `round.dirty` not sent, `Ok(false)` to send
    /// it and go on, an error to give up.
    fn done(&mut self, round: &Round) -> Result<bool, Self::Error>;
}

/// What the pre-copy left: the dirty pages the sink stopped on, not yet
/// sent, and how many passes were sent.
pub struct Remainder {
    pub dirty: DirtyPages,
    pub passes: u32,
}

/// Runs the pre-copy until the sink says it is done (or fails). The dirty
/// log stays on: the caller reads the last of it once the guest is paused.
pub fn run<S: Sink>(log: &impl DirtyLog, sink: &mut S) -> Result<Remainder, S::Error> {
    log.start()?;
    let began = Instant::now();
    sink.send_all()?;
    let mut passes = 1u32;
    sink.end_pass(passes)?;
    let mut last_read = Instant::now();
    loop {
        sink.check()?;
        let dirty = log.take()?;
        let dirtied_in = last_read.elapsed();
        last_read = Instant::now();
        let round = Round {
            passes,
            dirty: &dirty,
            dirtied_in,
            elapsed: began.elapsed(),
        };
        if sink.done(&round)? {
            return Ok(Remainder { dirty, passes });
        }
        sink.send_dirty(&dirty)?;
        passes += 1;
        sink.end_pass(passes)?;
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// A dirty log that hands out `rounds` in order (one region each).
    struct Script {
        rounds: RefCell<Vec<u64>>,
        started: RefCell<u32>,
    }

    impl DirtyLog for Script {
        fn start(&self) -> Result<(), VmError> {
            *self.started.borrow_mut() += 1;
            Ok(())
        }

        fn take(&self) -> Result<DirtyPages, VmError> {
            let mut rounds = self.rounds.borrow_mut();
            Ok(vec![vec![if rounds.is_empty() {
                0
            } else {
                rounds.remove(0)
            }]])
        }
    }

    /// Records what it is asked to do; stops when a round has at most
    /// `small` pages, or gives up after `limit` passes.
    #[derive(Default)]
    struct Recorder {
        events: Vec<String>,
        small: u32,
        limit: u32,
        cancel_at: Option<usize>,
    }

    impl Sink for Recorder {
        type Error = Stop;

        fn send_all(&mut self) -> Result<(), Stop> {
            self.events.push("all".into());
            Ok(())
        }

        fn send_dirty(&mut self, dirty: &[Vec<u64>]) -> Result<(), Stop> {
            self.events.push(format!("dirty {:b}", dirty[0][0]));
            Ok(())
        }

        fn end_pass(&mut self, pass: u32) -> Result<(), Stop> {
            self.events.push(format!("end {pass}"));
            Ok(())
        }

        fn check(&mut self) -> Result<(), Stop> {
            if self.cancel_at == Some(self.events.len()) {
                return Err(Stop("cancelled".into()));
            }
            Ok(())
        }

        fn done(&mut self, round: &Round) -> Result<bool, Stop> {
            if round.dirty[0][0].count_ones() <= self.small {
                return Ok(true);
            }
            if round.passes >= self.limit {
                return Err(Stop(format!("no convergence in {}", round.passes)));
            }
            Ok(false)
        }
    }

    /// The recorder's error: what went wrong, as text.
    #[derive(Debug, PartialEq)]
    struct Stop(String);

    impl From<VmError> for Stop {
        fn from(e: VmError) -> Stop {
            Stop(e.to_string())
        }
    }

    fn script(rounds: &[u64]) -> Script {
        Script {
            rounds: RefCell::new(rounds.to_vec()),
            started: RefCell::new(0),
        }
    }

    #[test]
    fn sends_everything_then_each_round_until_one_is_small() {
        let log = script(&[0b1111, 0b111, 0b1]);
        let mut sink = Recorder {
            small: 1,
            limit: 10,
            ..Default::default()
        };
        let rest = run(&log, &mut sink).unwrap();
        assert_eq!(*log.started.borrow(), 1);
        assert_eq!(rest.passes, 3);
        assert_eq!(
            rest.dirty,
            vec![vec![0b1]],
            "the small round is left to send"
        );
        assert_eq!(
            sink.events,
            ["all", "end 1", "dirty 1111", "end 2", "dirty 111", "end 3"]
        );
    }

    #[test]
    fn the_sink_may_give_up_or_be_cancelled() {
        let mut sink = Recorder {
            small: 0,
            limit: 2,
            ..Default::default()
        };
        let err = run(&script(&[0b11, 0b11, 0b11]), &mut sink).err();
        assert_eq!(err, Some(Stop("no convergence in 2".into())));

        let mut sink = Recorder {
            small: 0,
            limit: 10,
            cancel_at: Some(4),
            ..Default::default()
        };
        let err = run(&script(&[0b11, 0b11]), &mut sink).err();
        assert_eq!(err, Some(Stop("cancelled".into())));
        assert_eq!(sink.events, ["all", "end 1", "dirty 11", "end 2"]);
    }
}
