//! A one-line progress bar on stderr: redrawn in place on a terminal, a
//! line per tenth otherwise (logs stay readable), nothing with --json.

use std::io::IsTerminal;
use std::time::Instant;

pub struct Progress {
    what: String,
    total: u64,
    tty: bool,
    quiet: bool,
    started: Instant,
    last_tenth: u64,
}

impl Progress {
    pub fn new(what: impl Into<String>, total: u64, quiet: bool) -> Progress {
        Progress {
            what: what.into(),
            total,
            tty: std::io::stderr().is_terminal(),
            quiet,
            started: Instant::now(),
            last_tenth: 0,
        }
    }

    pub fn line(&self, done: u64) -> String {
        let share = if self.total == 0 {
            0.0
        } else {
            (done as f64 / self.total as f64).clamp(0.0, 1.0)
        };
        let filled = (share * 30.0).round() as usize;
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        format!(
            "{} [{}{}] {:>3.0}% {} / {} MiB  {:.1} MiB/s",
            self.what,
            "#".repeat(filled),
            ".".repeat(30 - filled),
            share * 100.0,
            done >> 20,
            self.total >> 20,
            done as f64 / secs / f64::from(1 << 20)
        )
    }

    pub fn update(&mut self, done: u64) {
        if self.quiet {
            return;
        }
        if self.tty {
            eprint!("\r{}", self.line(done));
            return;
        }
        let tenth = done.saturating_mul(10) / self.total.max(1);
        if tenth > self.last_tenth {
            self.last_tenth = tenth;
            eprintln!("{}", self.line(done));
        }
    }

    pub fn finish(&mut self, done: u64) {
        if self.quiet {
            return;
        }
        if self.tty {
            eprintln!("\r{}", self.line(done));
        } else if self.last_tenth < 10 {
            eprintln!("{}", self.line(done));
        }
    }
}

/// Runs `work`, showing on a terminal how long it has taken so far: for
/// calls that report no progress of their own (a snapshot being written).
pub async fn with_ticker<T>(
    what: &str,
    quiet: bool,
    work: impl std::future::Future<Output = T>,
) -> T {
    if quiet || !std::io::stderr().is_terminal() {
        return work.await;
    }
    let started = Instant::now();
    let line = || format!("{what} ... {:.1} s", started.elapsed().as_secs_f64());
    tokio::pin!(work);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        tokio::select! {
            out = &mut work => {
                eprintln!("\r{}", line());
                return out;
            }
            _ = tick.tick() => eprint!("\r{}", line()),
        }
    }
}
