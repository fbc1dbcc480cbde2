//! The receiving end: one listener, one expected source. It checks the
//! hello (token, expiry, CPU), fills fresh guest memory from page frames,
//! and hands the state to the builder. After Ready it waits for Go, on the
//! first connection or, if that broke, on a new one from the same source;
//! after Go it keeps answering the source's queries for as long as the VMM
//! lives, so a source that lost our Ack learns that we run the VM.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, SystemTime};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::protocol::{
    self, decode_pages, decode_zeros, read_frame, read_frame_into, write_json, DestinationState,
    FrameType, ProtocolError, PAGE,
};
use crate::arch::x86_64::cpuid;
use crate::arch::x86_64::layout::create_guest_memory;
use crate::memory::GuestMemory;
use crate::seccomp::ThreadKind;
use crate::snapshot::VmSnapshot;

const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Test hooks (feature `test-hooks`), from BERTH_TEST_MIGRATION_FAULT in
/// the destination VMM's environment: `drop-ack` (run the VM but close
/// instead of sending Ack), `hide-cpu-feature` (pretend this host lacks the
/// FPU bit of CPUID leaf 1), `drop-before-ready` (close after the state
/// arrives, before Ready).
#[cfg(feature = "test-hooks")]
pub fn test_fault(name: &str) -> bool {
    std::env::var("BERTH_TEST_MIGRATION_FAULT")
        .map(|v| v.split(',').any(|f| f == name))
        .unwrap_or(false)
}

/// Without the `test-hooks` feature no fault is ever injected.
#[cfg(not(feature = "test-hooks"))]
pub fn test_fault(_: &str) -> bool {
    false
}

#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("no migration arrived before the token expired")]
    Expired,
    #[error("refused the source: {0}")]
    Refused(String),
    #[error("cannot {0}")]
    Local(String),
}

impl From<std::io::Error> for IncomingError {
    fn from(e: std::io::Error) -> Self {
        IncomingError::Protocol(ProtocolError::Io(e))
    }
}

/// A VMM waiting for its migration.
pub struct Incoming {
    listener: TcpListener,
    token: String,
    expires: SystemTime,
}

/// Memory and state received; `link` is the source, waiting for Ready.
pub struct Received {
    pub snapshot: VmSnapshot,
    pub memory: GuestMemory,
    pub config: crate::config::VmConfig,
    pub link: Link,
}

/// The connection to the source (and the listener it may come back on).
pub struct Link {
    conn: TcpStream,
    listener: TcpListener,
    token: String,
}

fn refuse(conn: &mut TcpStream, why: String) -> IncomingError {
    let _ = write_json(
        conn,
        FrameType::Abort,
        &protocol::Abort {
            reason: why.clone(),
        },
    );
    IncomingError::Refused(why)
}

impl Incoming {
    pub fn listen(address: &str, token: &str, expires: SystemTime) -> std::io::Result<Incoming> {
        if token.len() < 16 {
            return Err(std::io::Error::other(
                "the migration token must be at least 16 characters",
            ));
        }
        Ok(Incoming {
            listener: TcpListener::bind(address)?,
            token: token.to_string(),
            expires,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Waits (until the token expires) for the source, then takes its
    /// memory and state. Any failure ends the attempt: the token was for
    /// one try.
    pub fn receive(self, kvm_device: &std::path::Path) -> Result<Received, IncomingError> {
        let mut conn = self.accept()?;
        let hello: protocol::Hello = read_frame(&mut conn)?.expect(FrameType::Hello)?;
        let memory = self.welcome(&mut conn, &hello, kvm_device)?;
        let snapshot = receive_memory(&mut conn, &memory)?;
        if snapshot.regions != hello.regions || snapshot.vcpus.len() != hello.config.vcpus as usize
        {
            return Err(refuse(
                &mut conn,
                "the state does not match the hello (memory layout or vCPU count)".into(),
            ));
        }
        Ok(Received {
            snapshot,
            memory,
            config: hello.config,
            link: Link {
                conn,
                listener: self.listener,
                token: self.token,
            },
        })
    }

    /// The source's connection, set up for the transfer; none once the
    /// token expired.
    fn accept(&self) -> Result<TcpStream, IncomingError> {
        self.listener.set_nonblocking(true)?;
        let conn = loop {
            match self.listener.accept() {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if SystemTime::now() >= self.expires {
                        return Err(IncomingError::Expired);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.listener.set_nonblocking(false)?;
        conn.set_nonblocking(false)?;
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        conn.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(conn)
    }

    /// Checks the hello (token, expiry, CPU, config, memory layout) and
    /// allocates the guest's memory, refusing the source with the reason
    /// if any of it fails; then says Welcome.
    fn welcome(
        &self,
        conn: &mut TcpStream,
        hello: &protocol::Hello,
        kvm_device: &std::path::Path,
    ) -> Result<GuestMemory, IncomingError> {
        if !constant_time_eq(hello.token.as_bytes(), self.token.as_bytes()) {
            return Err(refuse(conn, "wrong migration token".into()));
        }
        if SystemTime::now() >= self.expires {
            return Err(refuse(conn, "the migration token has expired".into()));
        }
        let here = berth_proto::vmm_process::host::cpu_vendor();
        if hello.cpu_vendor != here {
            return Err(refuse(
                conn,
                format!(
                    "the source CPU is {}, this host's is {here}",
                    hello.cpu_vendor
                ),
            ));
        }
        let missing = cpuid::missing_features(&hello.cpu_features, &host_features(kvm_device)?);
        if !missing.is_empty() {
            return Err(refuse(
                conn,
                format!(
                    "this host's CPU lacks features the guest uses: {}",
                    missing.join(", ")
                ),
            ));
        }
        if let Err(e) = hello.config.validate() {
            return Err(refuse(conn, format!("the VM config is invalid: {e}")));
        }
        let size = hello.config.memory_mib << 20;
        let expected: Vec<(u64, u64)> = crate::arch::x86_64::layout::ram_regions(size);
        if hello.regions != expected {
            return Err(refuse(
                conn,
                format!(
                    "the guest's memory layout {:x?} is not the one {} MiB has here",
                    hello.regions, hello.config.memory_mib
                ),
            ));
        }
        let memory = match create_guest_memory(size) {
            Ok(m) => m,
            Err(e) => {
                return Err(refuse(
                    conn,
                    format!("cannot allocate {} MiB: {e}", hello.config.memory_mib),
                ))
            }
        };
        write_json(conn, FrameType::Welcome, &protocol::Empty::default())?;
        Ok(memory)
    }
}

/// Page and zero frames into `memory` until the state arrives; returns it.
fn receive_memory(conn: &mut TcpStream, memory: &GuestMemory) -> Result<VmSnapshot, IncomingError> {
    let zero = [0u8; PAGE];
    let mut frame = protocol::Frame {
        kind: FrameType::Abort,
        payload: Vec::with_capacity(protocol::PAGES_PER_FRAME * (PAGE + 8) + 4),
    };
    loop {
        read_frame_into(conn, &mut frame)?;
        match frame.kind {
            FrameType::Pages => {
                for (gpa, page) in decode_pages(&frame.payload)? {
                    put_page(memory, gpa, page)?;
                }
            }
            FrameType::Zeros => {
                for gpa in decode_zeros(&frame.payload)? {
                    put_page(memory, gpa, &zero)?;
                }
            }
            FrameType::IterationEnd => {
                let end: protocol::IterationEnd = frame.json()?;
                eprintln!(
                    "berth-vmm: migration pass {} done ({} pages so far)",
                    end.iteration, end.pages
                );
            }
            FrameType::State => return Ok(frame.json::<VmSnapshot>()?),
            other => {
                frame.expect::<protocol::Empty>(FrameType::State)?;
                return Err(ProtocolError::Unexpected {
                    expected: FrameType::State,
                    got: other,
                }
                .into());
            }
        }
    }
}

fn host_features(kvm_device: &std::path::Path) -> Result<Vec<cpuid::FeatureWord>, IncomingError> {
    let kvm =
        crate::vstate::kvm::open(kvm_device).map_err(|e| IncomingError::Local(e.to_string()))?;
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| IncomingError::Local(format!("read the supported CPUID: {e}")))?;
    let mut words = cpuid::feature_words(supported.as_slice());
    if test_fault("hide-cpu-feature") {
        if let Some(w) = words
            .iter_mut()
            .find(|w| w.leaf == 1 && w.register == "edx")
        {
            w.bits &= !1;
        }
    }
    Ok(words)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Writes one received page, refusing addresses outside guest RAM or not
/// page aligned.
pub(crate) fn put_page(memory: &GuestMemory, gpa: u64, page: &[u8]) -> Result<(), ProtocolError> {
    let last = gpa.checked_add(PAGE as u64 - 1);
    let inside = gpa.is_multiple_of(PAGE as u64)
        && last.is_some_and(|last| {
            memory.address_in_range(GuestAddress(gpa))
                && memory.address_in_range(GuestAddress(last))
        });
    if !inside {
        return Err(ProtocolError::Malformed {
            what: "pages",
            why: format!("page address {gpa:#x} is not an aligned page of guest RAM"),
        });
    }
    memory
        .write_slice(page, GuestAddress(gpa))
        .map_err(|e| ProtocolError::Malformed {
            what: "pages",
            why: e.to_string(),
        })
}

impl Link {
    /// The builder could not use what arrived: tell the source, which resumes.
    pub fn refuse(mut self, why: String) {
        let _ = refuse(&mut self.conn, why);
    }

    /// Says Ready and waits for Go: on this connection, or on a new one
    /// from the source if this one breaks (the source may have sent Go and
    /// lost the line). Never gives up once Ready is sent: the source may no
    /// longer run the VM. Returns a handle that sends the Ack.
    pub fn handover(self) -> Result<Handover, IncomingError> {
        let Link {
            mut conn,
            listener,
            token,
        } = self;
        if test_fault("drop-before-ready") {
            return Err(IncomingError::Local(
                "test fault: dropped before Ready".into(),
            ));
        }
        write_json(&mut conn, FrameType::Ready, &protocol::Empty::default())?;
        let mut current = Some(conn);
        loop {
            if let Some(mut c) = current.take() {
                // No timeout here: a source that is slow to decide is not a failure.
                let _ = c.set_read_timeout(None);
                match read_frame(&mut c) {
                    Ok(f) if f.kind == FrameType::Go => {
                        return Ok(Handover { conn: c, listener, token })
                    }
                    Ok(f) if f.kind == FrameType::Abort => {
                        let abort: protocol::Abort = f.json()?;
                        return Err(ProtocolError::PeerAborted(abort.reason).into());
                    }
                    Ok(f) => eprintln!("berth-vmm: ignoring a {:?} frame while waiting for Go", f.kind),
                    Err(e) => eprintln!(
                        "berth-vmm: the source's connection broke after Ready ({e}); waiting for it to ask again"
                    ),
                }
            }
            // A new connection must prove it is the source before it may say Go.
            let (mut c, _) = listener.accept()?;
            let _ = c.set_read_timeout(Some(IO_TIMEOUT));
            match read_frame(&mut c).and_then(|f| f.expect::<protocol::Query>(FrameType::Query)) {
                Ok(q) if constant_time_eq(q.token.as_bytes(), token.as_bytes()) => {
                    let status = protocol::Status {
                        state: DestinationState::Ready,
                    };
                    if write_json(&mut c, FrameType::Status, &status).is_ok() {
                        current = Some(c);
                    }
                }
                _ => {
                    let _ = write_json(
                        &mut c,
                        FrameType::Abort,
                        &protocol::Abort {
                            reason: "not the source of this migration".into(),
                        },
                    );
                }
            }
        }
    }
}

/// Go received: the VM is ours.
pub struct Handover {
    conn: TcpStream,
    listener: TcpListener,
    token: String,
}

impl Handover {
    /// Acknowledges Go (the vCPUs are about to start), then answers the
    /// source's queries with Running for as long as this VMM lives.
    pub fn ack(mut self) {
        let resumed_at_ms = berth_proto::vmm_process::now_ms();
        if test_fault("drop-ack") {
            eprintln!("berth-vmm: test fault: not sending Ack");
        } else {
            let _ = write_json(
                &mut self.conn,
                FrameType::Ack,
                &protocol::Ack { resumed_at_ms },
            );
            let _ = self.conn.flush();
        }
        drop(self.conn);
        let (listener, token) = (self.listener, self.token);
        let _ = crate::seccomp::spawn(ThreadKind::Migration, "migrate-status".into(), move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { continue };
                let _ = c.set_read_timeout(Some(IO_TIMEOUT));
                let asked =
                    read_frame(&mut c).and_then(|f| f.expect::<protocol::Query>(FrameType::Query));
                if matches!(&asked, Ok(q) if constant_time_eq(q.token.as_bytes(), token.as_bytes()))
                {
                    let status = protocol::Status {
                        state: DestinationState::Running,
                    };
                    let _ = write_json(&mut c, FrameType::Status, &status);
                    // A source that thought we were Ready says Go again.
                    if let Ok(f) = read_frame(&mut c) {
                        if f.kind == FrameType::Go {
                            let _ = write_json(
                                &mut c,
                                FrameType::Ack,
                                &protocol::Ack { resumed_at_ms },
                            );
                        }
                    }
                }
            }
        });
    }
}
