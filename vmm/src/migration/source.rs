//! The sending end: pre-copy over the KVM dirty log, then a short pause for
//! the last pages and the device and vCPU state, then the two-step
//! handover (Ready from the destination, Go from us). Until we send Go the
//! guest is ours, and any failure resumes it here.

use std::io::{BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::protocol::{
    self, encode_zeros, is_zero, read_frame, write_frame, write_json, DestinationState, FrameType,
    PageBatch, ProtocolError, PAGE,
};
use crate::devices::bus::lock;
use crate::exit::ExitReason;
use crate::machine::{CaptureError, Machine, PAUSE_TIMEOUT};
use crate::precopy::{self, Round, Sink};
use crate::seccomp::ThreadKind;
use crate::vstate::vm::VmError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a silent peer may keep us waiting for one frame.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// After a lost Ack, how long we keep asking the destination what it did.
const RECONCILE_FOR: Duration = Duration::from_secs(30);
/// After success, how long the VMM waits for its agent to read the final
/// figures before it exits.
const LINGER: Duration = Duration::from_secs(3);
const ZEROS_PER_FRAME: usize = 4096;

#[derive(Clone, Debug)]
pub struct Params {
    /// host:port of the destination berth-vmm.
    pub address: String,
    pub token: String,
    /// Switch over once the remaining dirty memory would take this long to send.
    pub downtime_target: Duration,
    /// Bytes per second; 0 is unlimited.
    pub bandwidth: u64,
    /// The whole migration's limit.
    pub timeout: Duration,
    /// On timeout (or the iteration limit): switch over anyway instead of
    /// giving up.
    pub force_on_timeout: bool,
    pub max_iterations: u32,
}

impl Params {
    pub const DEFAULT_DOWNTIME_MS: u64 = 50;
    pub const DEFAULT_TIMEOUT_MS: u64 = 300_000;
    pub const DEFAULT_MAX_ITERATIONS: u32 = 30;

    /// The parameters of a request, where 0 asks for the default (and a
    /// bandwidth of 0 means unlimited).
    pub fn from_request(req: &berth_proto::vmm::MigrateRequest) -> Params {
        let or = |v: u64, d: u64| if v == 0 { d } else { v };
        Params {
            address: req.address.clone(),
            token: req.token.clone(),
            downtime_target: Duration::from_millis(or(
                req.downtime_ms,
                Params::DEFAULT_DOWNTIME_MS,
            )),
            bandwidth: req.bandwidth_bytes_per_s,
            timeout: Duration::from_millis(or(req.timeout_ms, Params::DEFAULT_TIMEOUT_MS)),
            force_on_timeout: req.force_on_timeout,
            max_iterations: if req.max_iterations == 0 {
                Params::DEFAULT_MAX_ITERATIONS
            } else {
                req.max_iterations
            },
        }
    }
}

/// The contract's phase names, which `GetMigration` reports.
pub use berth_proto::vmm_process::migration::MigrationPhase as Phase;

#[derive(Clone, Debug)]
pub struct Progress {
    pub phase: Phase,
    pub destination: String,
    pub iteration: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    /// Bytes the guest dirtied per second in the last pass.
    pub dirty_rate: u64,
    /// Dirty bytes still to send.
    pub remaining_bytes: u64,
    pub expected_downtime_ms: u64,
    /// Pause here → Ack from the destination (the destination resumed).
    pub downtime_ms: u64,
    pub total_ms: u64,
    pub memory_bytes: u64,
    pub error: String,
}

/// One outgoing migration, shared by its thread and the control API.
pub struct Migration {
    progress: Mutex<Progress>,
    cancel: AtomicBool,
    final_seen: AtomicBool,
}

impl Migration {
    pub fn progress(&self) -> Progress {
        lock(&self.progress).clone()
    }

    /// What the API returns; a final state read by the agent lets the VMM
    /// exit without waiting out its linger.
    pub fn report(&self) -> Progress {
        let p = self.progress();
        if p.phase.is_final() {
            self.final_seen.store(true, Ordering::SeqCst);
        }
        p
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut lock(&self.progress));
    }
}

/// Why a migration could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("migrate: address and token are required")]
    Incomplete,
    #[error("a migration is already {}", .0.name())]
    Busy(Phase),
    #[error("cannot start the migration thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A VMM's outgoing migration: none, or the last one asked for. A new one
/// may start once the last has failed or was cancelled.
#[derive(Default)]
pub struct Outgoing(Mutex<Option<Arc<Migration>>>);

impl Outgoing {
    /// Starts migrating `machine` as `params` say. `before_start` runs once
    /// the request is accepted, just before the migration begins (it will
    /// read, and so clear, the dirty log). Returns the first progress.
    pub fn start(
        &self,
        machine: Arc<Machine>,
        params: Params,
        before_start: impl FnOnce(),
    ) -> Result<Progress, StartError> {
        if params.address.is_empty() || params.token.is_empty() {
            return Err(StartError::Incomplete);
        }
        let mut current = lock(&self.0);
        if let Some(m) = current.as_ref() {
            let phase = m.progress().phase;
            if !phase.is_final() || phase == Phase::Completed || phase == Phase::Unknown {
                return Err(StartError::Busy(phase));
            }
        }
        before_start();
        let m = start(machine, params).map_err(StartError::Thread)?;
        let progress = m.progress();
        *current = Some(m);
        Ok(progress)
    }

    /// The migration's progress, if one was asked for; `cancel` cancels
    /// it first (it stops before the handover, or not at all).
    pub fn report(&self, cancel: bool) -> Option<Progress> {
        lock(&self.0).as_ref().map(|m| {
            if cancel {
                m.cancel();
            }
            m.report()
        })
    }
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("cancelled")]
    Cancelled,
    #[error("timed out after {0:?} in pass {1} with {2} bytes left to send")]
    Timeout(Duration, u32, u64),
    #[error("did not converge in {0} passes: {1} bytes left, which would take {2} ms paused")]
    NoConvergence(u32, u64, u64),
    #[error("{0}")]
    Local(String),
    /// Saving the vCPUs' or the VM's state at the switchover.
    #[error(transparent)]
    Capture(#[from] CaptureError),
}

/// After Go, the destination never told us whether it runs the VM.
#[derive(Debug, thiserror::Error)]
#[error("the destination did not answer for {waited:?}: {last}")]
struct ReconcileError {
    waited: Duration,
    /// Why the last attempt to ask it failed.
    #[source]
    last: Failure,
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Protocol(ProtocolError::Io(e))
    }
}

impl From<VmError> for Failure {
    fn from(e: VmError) -> Self {
        Failure::Local(e.to_string())
    }
}

/// Starts migrating `machine` on a thread of its own.
pub fn start(machine: Arc<Machine>, params: Params) -> std::io::Result<Arc<Migration>> {
    let migration = Arc::new(Migration {
        progress: Mutex::new(Progress {
            phase: Phase::Connecting,
            destination: params.address.clone(),
            iteration: 0,
            bytes_sent: 0,
            pages_sent: 0,
            dirty_rate: 0,
            remaining_bytes: machine.memory_bytes(),
            expected_downtime_ms: 0,
            downtime_ms: 0,
            total_ms: 0,
            memory_bytes: machine.memory_bytes(),
            error: String::new(),
        }),
        cancel: AtomicBool::new(false),
        final_seen: AtomicBool::new(false),
    });
    let m = migration.clone();
    crate::seccomp::spawn(ThreadKind::Migration, "migrate-out".into(), move || {
        run(machine, params, m)
    })?;
    Ok(migration)
}

fn run(machine: Arc<Machine>, params: Params, m: Arc<Migration>) {
    let started = Instant::now();
    let mut sender = Sender {
        machine: &machine,
        params: &params,
        m: &m,
        started,
        bytes: 0,
        pages: 0,
        throttle_from: Instant::now(),
        throttle_bytes: 0,
    };
    let outcome = sender.migrate();
    let total_ms = started.elapsed().as_millis() as u64;
    match outcome {
        Ok(()) => {
            m.update(|p| {
                p.phase = Phase::Completed;
                p.total_ms = total_ms;
                p.remaining_bytes = 0;
            });
            eprintln!(
                "berth-vmm: migrated to {} in {total_ms} ms (downtime {} ms)",
                params.address,
                m.progress().downtime_ms
            );
            let deadline = Instant::now() + LINGER;
            while !m.final_seen.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            machine
                .exit
                .notify(ExitReason::Migrated(params.address.clone()));
        }
        Err(Outcome::Resumed(failure)) => {
            let cancelled = matches!(failure, Failure::Cancelled);
            eprintln!(
                "berth-vmm: migration to {} failed: {failure}; the VM runs here",
                params.address
            );
            m.update(|p| {
                p.phase = if cancelled {
                    Phase::Cancelled
                } else {
                    Phase::Failed
                };
                p.error = failure.to_string();
                p.total_ms = total_ms;
            });
        }
        Err(Outcome::Unknown(why)) => {
            eprintln!(
                "berth-vmm: migration to {}: Go was sent but the outcome is unknown ({why}); the VM stays paused here",
                params.address
            );
            m.update(|p| {
                p.phase = Phase::Unknown;
                p.error = why.to_string();
                p.total_ms = total_ms;
            });
        }
    }
}

enum Outcome {
    /// Before the handover: the VM was resumed here.
    Resumed(Failure),
    /// After Go: the destination may run the VM; we do not resume.
    Unknown(ReconcileError),
}

struct Sender<'a> {
    machine: &'a Machine,
    params: &'a Params,
    m: &'a Migration,
    started: Instant,
    bytes: u64,
    pages: u64,
    throttle_from: Instant,
    throttle_bytes: u64,
}

fn merge(into: &mut [Vec<u64>], from: &[Vec<u64>]) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= *y;
        }
    }
}

impl Sender<'_> {
    fn migrate(&mut self) -> Result<(), Outcome> {
        let stream = self.connect().map_err(Outcome::Resumed)?;
        // Smaller than a page frame, so the pages go to the socket without
        // another copy; headers and small frames are still coalesced.
        let mut w = BufWriter::with_capacity(
            64 << 10,
            stream.try_clone().map_err(|e| Outcome::Resumed(e.into()))?,
        );
        let mut r = stream;
        let pending = match self.precopy(&mut w, &mut r) {
            Ok(pending) => pending,
            Err(failure) => {
                self.abort(&mut w, &failure);
                return Err(Outcome::Resumed(failure));
            }
        };
        self.switchover(&mut w, &mut r, pending)
    }

    fn connect(&mut self) -> Result<TcpStream, Failure> {
        let address = self
            .params
            .address
            .to_socket_addrs()
            .map_err(|e| Failure::Local(format!("cannot resolve {}: {e}", self.params.address)))?
            .next()
            .ok_or_else(|| {
                Failure::Local(format!("{} resolves to nothing", self.params.address))
            })?;
        let stream = TcpStream::connect_timeout(&address, CONNECT_TIMEOUT)
            .map_err(|e| Failure::Local(format!("cannot connect to {address}: {e}")))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(stream)
    }

    /// Hello, the first full pass and the dirty passes. Returns the dirty
    /// pages not sent yet when it is time to switch over.
    fn precopy(
        &mut self,
        w: &mut BufWriter<TcpStream>,
        r: &mut TcpStream,
    ) -> Result<Vec<Vec<u64>>, Failure> {
        let machine = self.machine;
        let hello = protocol::Hello {
            token: self.params.token.clone(),
            berth_version: env!("CARGO_PKG_VERSION").into(),
            cpu_vendor: berth_proto::vmm_process::host::cpu_vendor(),
            cpu_model: berth_proto::vmm_process::host::cpu_model(),
            cpu_features: crate::arch::x86_64::cpuid::feature_words(
                machine
                    .guest_cpuids
                    .first()
                    .map_or(&[][..], |c| c.as_slice()),
            ),
            config: machine.current_config(),
            regions: machine.regions(),
        };
        self.bytes += write_json(w, FrameType::Hello, &hello)? as u64;
        read_frame(r)?.expect::<protocol::Empty>(FrameType::Welcome)?;
        self.m.update(|p| p.phase = Phase::Precopy);
        let rest = precopy::run(&*machine.vm, &mut StreamSink { sender: self, w })?;
        Ok(rest.dirty)
    }

    /// Pause, last pages, state, Ready, Go, Ack.
    fn switchover(
        &mut self,
        w: &mut BufWriter<TcpStream>,
        r: &mut TcpStream,
        mut pending: Vec<Vec<u64>>,
    ) -> Result<(), Outcome> {
        let machine = self.machine;
        self.m.update(|p| p.phase = Phase::Switchover);
        let paused_at = Instant::now();
        let was_paused = machine.vcpus.is_paused();
        if let Err(e) = machine.vcpus.pause(PAUSE_TIMEOUT) {
            let failure = Failure::Local(e.to_string());
            self.abort(w, &failure);
            return Err(Outcome::Resumed(failure));
        }
        let virtio = machine.quiesce_devices();
        let handed = (|| -> Result<(), Failure> {
            self.check_cancel()?;
            let last = machine
                .vm
                .take_dirty()
                .map_err(|e| Failure::Local(e.to_string()))?;
            merge(&mut pending, &last);
            self.send_dirty(w, &pending)?;
            let state = machine.capture(virtio)?;
            self.bytes += write_json(w, FrameType::State, &state)? as u64;
            read_frame(r)?.expect::<protocol::Empty>(FrameType::Ready)?;
            Ok(())
        })();
        if let Err(failure) = handed {
            self.abort(w, &failure);
            machine.resume_devices();
            if !was_paused {
                machine.vcpus.resume();
            }
            return Err(Outcome::Resumed(failure));
        }
        // The handover: from this write on, the destination may run the VM,
        // so whatever happens next we never resume it here.
        let acked = write_json(w, FrameType::Go, &protocol::Empty::default())
            .map_err(ProtocolError::from)
            .and_then(|_| read_frame(r)?.expect::<protocol::Ack>(FrameType::Ack));
        if let Err(e) = acked {
            eprintln!("berth-vmm: no Ack after Go ({e}); asking the destination");
            self.reconcile().map_err(Outcome::Unknown)?;
        }
        let downtime = paused_at.elapsed().as_millis() as u64;
        let (bytes, pages) = (self.bytes, self.pages);
        self.m.update(|p| {
            p.downtime_ms = downtime;
            p.bytes_sent = bytes;
            p.pages_sent = pages;
        });
        Ok(())
    }

    /// Asks the destination, on new connections, whether it runs the VM;
    /// repeats Go if it is still waiting for one.
    fn reconcile(&mut self) -> Result<(), ReconcileError> {
        let deadline = Instant::now() + RECONCILE_FOR;
        loop {
            let last = match self.query_once() {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            std::thread::sleep(Duration::from_millis(200));
            if Instant::now() >= deadline {
                return Err(ReconcileError {
                    waited: RECONCILE_FOR,
                    last,
                });
            }
        }
    }

    fn query_once(&mut self) -> Result<(), Failure> {
        let mut stream = self.connect()?;
        write_json(
            &mut stream,
            FrameType::Query,
            &protocol::Query {
                token: self.params.token.clone(),
            },
        )?;
        let status: protocol::Status = read_frame(&mut stream)?.expect(FrameType::Status)?;
        if status.state == DestinationState::Ready {
            write_json(&mut stream, FrameType::Go, &protocol::Empty::default())?;
            read_frame(&mut stream)?.expect::<protocol::Ack>(FrameType::Ack)?;
        }
        Ok(())
    }

    fn abort(&self, w: &mut BufWriter<TcpStream>, failure: &Failure) {
        // Best effort: the destination may already be gone.
        let _ = write_json(
            w,
            FrameType::Abort,
            &protocol::Abort {
                reason: failure.to_string(),
            },
        );
    }

    fn check_cancel(&self) -> Result<(), Failure> {
        if self.m.cancel.load(Ordering::SeqCst) {
            return Err(Failure::Cancelled);
        }
        Ok(())
    }

    fn timed_out(&self) -> bool {
        self.started.elapsed() >= self.params.timeout
    }

    /// Counts a frame, keeps the progress current, honours the bandwidth
    /// limit, and notices cancel and (unless forcing) timeout.
    fn sent(&mut self, n: usize, pages: u64) -> Result<(), Failure> {
        self.bytes += n as u64;
        self.pages += pages;
        let (bytes, total) = (self.bytes, self.pages);
        self.m.update(|p| {
            p.bytes_sent = bytes;
            p.pages_sent = total;
        });
        if self.params.bandwidth > 0 {
            self.throttle_bytes += n as u64;
            let due = self.throttle_bytes as f64 / self.params.bandwidth as f64;
            let elapsed = self.throttle_from.elapsed().as_secs_f64();
            if due > elapsed {
                std::thread::sleep(Duration::from_secs_f64(due - elapsed));
            }
        }
        self.check_cancel()?;
        if self.timed_out() && !self.params.force_on_timeout {
            return Err(Failure::Timeout(
                self.started.elapsed(),
                self.m.progress().iteration,
                self.m.progress().remaining_bytes,
            ));
        }
        Ok(())
    }

    fn end_iteration(
        &mut self,
        w: &mut BufWriter<TcpStream>,
        iteration: u32,
    ) -> Result<(), Failure> {
        let n = write_json(
            w,
            FrameType::IterationEnd,
            &protocol::IterationEnd {
                iteration,
                pages: self.pages,
            },
        )?;
        self.sent(n, 0)
    }

    /// The first pass: every page that is not all zeros (the destination's
    /// memory starts zeroed).
    fn send_all(&mut self, w: &mut BufWriter<TcpStream>) -> Result<(), Failure> {
        let machine = self.machine;
        let mem = machine.vm.memory();
        let mut batch = PageBatch::default();
        let mut scanned = 0u64;
        for region in mem.iter() {
            let base = region.start_addr().0;
            let mut done = 0u64;
            while done < region.len() {
                let pages = ((region.len() - done) as usize / PAGE).min(batch.room());
                batch
                    .read_nonzero(base + done, pages, |buf| {
                        mem.read_slice(buf, GuestAddress(base + done))
                    })
                    .map_err(|e| Failure::Local(e.to_string()))?;
                if batch.is_full() {
                    let count = batch.addrs.len() as u64;
                    let sent = batch.flush(w)?;
                    self.sent(sent, count)?;
                }
                done += (pages * PAGE) as u64;
                scanned += (pages * PAGE) as u64;
                self.m
                    .update(|p| p.remaining_bytes = p.memory_bytes.saturating_sub(scanned));
            }
        }
        let count = batch.addrs.len() as u64;
        let sent = batch.flush(w)?;
        self.sent(sent, count)
    }

    /// The pages set in `dirty`; those that are all zeros now go as
    /// addresses only.
    fn send_dirty(
        &mut self,
        w: &mut BufWriter<TcpStream>,
        dirty: &[Vec<u64>],
    ) -> Result<(), Failure> {
        let machine = self.machine;
        let mem = machine.vm.memory();
        let mut batch = PageBatch::default();
        let mut zeros = Vec::new();
        let mut page = vec![0u8; PAGE];
        for (region, bits) in mem.iter().zip(dirty) {
            for offset in crate::memory::dirty_offsets(bits, region.len()) {
                let gpa = region.start_addr().0 + offset;
                mem.read_slice(&mut page, GuestAddress(gpa))
                    .map_err(|e| Failure::Local(e.to_string()))?;
                if is_zero(&page) {
                    zeros.push(gpa);
                    if zeros.len() >= ZEROS_PER_FRAME {
                        let n = write_frame(w, FrameType::Zeros, &[&encode_zeros(&zeros)])?;
                        self.sent(n, zeros.len() as u64)?;
                        zeros.clear();
                    }
                } else {
                    batch.push(gpa, &page);
                    if batch.is_full() {
                        let count = batch.addrs.len() as u64;
                        let sent = batch.flush(w)?;
                        self.sent(sent, count)?;
                    }
                }
            }
        }
        let count = batch.addrs.len() as u64;
        let sent = batch.flush(w)?;
        self.sent(sent, count)?;
        if !zeros.is_empty() {
            let n = write_frame(w, FrameType::Zeros, &[&encode_zeros(&zeros)])?;
            self.sent(n, zeros.len() as u64)?;
        }
        w.flush()?;
        Ok(())
    }
}

/// The migration stream as a pre-copy sink.
struct StreamSink<'s, 'a> {
    sender: &'s mut Sender<'a>,
    w: &'s mut BufWriter<TcpStream>,
}

impl Sink for StreamSink<'_, '_> {
    type Error = Failure;

    fn send_all(&mut self) -> Result<(), Failure> {
        self.sender.m.update(|p| p.iteration = 1);
        self.sender.send_all(self.w)
    }

    fn send_dirty(&mut self, dirty: &[Vec<u64>]) -> Result<(), Failure> {
        self.sender.send_dirty(self.w, dirty)
    }

    fn end_pass(&mut self, pass: u32) -> Result<(), Failure> {
        self.sender.end_iteration(self.w, pass)
    }

    fn check(&mut self) -> Result<(), Failure> {
        self.sender.check_cancel()
    }

    /// Done once the rest would go within the downtime target; at the
    /// iteration limit or the timeout, done if forcing, else failed.
    fn done(&mut self, round: &Round) -> Result<bool, Failure> {
        let (s, iteration) = (&*self.sender, round.passes);
        let remaining = crate::snapshot::count_dirty(round.dirty) * PAGE as u64;
        // What the link has carried so far is the best guess of what it
        // will carry during the pause.
        let rate = (s.bytes as f64 / round.elapsed.as_secs_f64().max(1e-3)).max(1.0);
        let expected = Duration::from_secs_f64(remaining as f64 / rate);
        s.m.update(|p| {
            p.iteration = iteration;
            p.remaining_bytes = remaining;
            p.dirty_rate = (remaining as f64 / round.dirtied_in.as_secs_f64().max(1e-3)) as u64;
            p.expected_downtime_ms = expected.as_millis() as u64;
        });
        if expected <= s.params.downtime_target {
            return Ok(true);
        }
        if iteration >= s.params.max_iterations || s.timed_out() {
            if s.params.force_on_timeout {
                return Ok(true);
            }
            if s.timed_out() {
                return Err(Failure::Timeout(s.started.elapsed(), iteration, remaining));
            }
            return Err(Failure::NoConvergence(
                iteration,
                remaining,
                expected.as_millis() as u64,
            ));
        }
        Ok(false)
    }
}
