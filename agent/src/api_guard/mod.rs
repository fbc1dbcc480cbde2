//! The guard in front of ttrpc (issue 20). ttrpc's own server accepts
//! without limit, spins logging on EMFILE and waits forever for the rest of
//! a frame; a client holding connections or half-sent frames starved the
//! API and grew the agent. So the agent accepts on the public sockets
//! itself and hands ttrpc only connections it admitted, through ttrpc's
//! `Listener::new` (a stream of connections): no second socket, no copy.
//!
//! - at most `api_max_connections` open; at the cap the oldest connection
//!   that never sent a whole frame is closed for the newcomer (a flood of
//!   held-open sockets cannot lock a client out), else the newcomer is;
//! - a failing accept (EMFILE, ENFILE, ENOBUFS…) sleeps 10 ms doubling to
//!   1 s; running out of descriptors also lowers the cap for a minute and
//!   sheds a silent connection;
//! - a frame begun must be whole within `api_frame_timeout_secs`, may
//!   announce at most `api_max_frame_bytes`, and frames over 64 KiB share a
//!   budget of `api_max_buffered_bytes` across all connections;
//! - each kind of trouble is logged at most once a second, with a count of
//!   the ones not logged.

mod accept;
mod admission;
mod conn;
mod frame;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use ttrpc::r#async::transport::Listener;

use crate::config::AgentConfig;
pub use accept::PublicListener;
use admission::Shared;
use conn::GuardedStream;

/// The guard's limits, from the agent config.
#[derive(Clone, Debug)]
pub struct GuardLimits {
    pub max_connections: usize,
    pub frame_timeout: Duration,
    pub max_frame_bytes: usize,
    pub max_buffered_bytes: usize,
}

impl GuardLimits {
    /// A zero would refuse every client (no connection, no time, no
    /// bytes), so it is a config error rather than a silent lock-out.
    pub fn from_config(config: &AgentConfig) -> Result<GuardLimits, GuardError> {
        for (key, value) in [
            ("api_max_connections", config.api_max_connections as u64),
            ("api_frame_timeout_secs", config.api_frame_timeout_secs),
            ("api_max_frame_bytes", config.api_max_frame_bytes),
            ("api_max_buffered_bytes", config.api_max_buffered_bytes),
        ] {
            if value == 0 {
                return Err(GuardError::Zero(key));
            }
        }
        Ok(GuardLimits {
            max_connections: config.api_max_connections,
            frame_timeout: Duration::from_secs(config.api_frame_timeout_secs),
            max_frame_bytes: usize::try_from(config.api_max_frame_bytes).unwrap_or(usize::MAX),
            max_buffered_bytes: usize::try_from(config.api_max_buffered_bytes)
                .unwrap_or(usize::MAX),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: String,
        source: std::io::Error,
    },
    #[error("unsupported API address {0:?}: use unix:///path or tcp://host:port")]
    Scheme(String),
    #[error("{0} must be positive")]
    Zero(&'static str),
}

/// Admitted connections on their way to ttrpc; enough to keep the accept
/// loops busy while ttrpc spawns a connection's tasks.
const HANDOFF: usize = 64;

/// The running accept loops; dropping it stops them (the sockets close).
pub struct Guard {
    loops: Vec<JoinHandle<()>>,
}

impl Guard {
    /// Starts one accept loop per `(name, listener)` and returns the
    /// listener to give ttrpc (`Server::add_listener`): one for all of
    /// them, as ttrpc serves only one.
    pub fn start(
        limits: GuardLimits,
        listeners: Vec<(String, PublicListener)>,
    ) -> (Guard, Listener) {
        warn_if_descriptors_short(limits.max_connections);
        let shared = Arc::new(Shared::new(limits));
        let (tx, rx) = mpsc::channel(HANDOFF);
        let loops = listeners
            .into_iter()
            .map(|(name, listener)| {
                tokio::spawn(accept::accept_loop(
                    listener,
                    name,
                    shared.clone(),
                    tx.clone(),
                ))
            })
            .collect();
        (Guard { loops }, Listener::new(Admitted(rx)))
    }
}

/// Descriptors the agent needs besides API connections: its state files,
/// the VMMs' control sockets, image imports.
const OWN_DESCRIPTORS: u64 = 256;

/// A cap the descriptor limit cannot hold ends in EMFILE, which the guard
/// survives (a lower cap for a while) but the operator should hear of.
fn warn_if_descriptors_short(cap: usize) {
    use nix::sys::resource::{getrlimit, Resource};
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let want = (cap as u64).saturating_add(OWN_DESCRIPTORS);
    if soft < want {
        tracing::warn!(
            "RLIMIT_NOFILE is {soft}, under api_max_connections ({cap}) + {OWN_DESCRIPTORS} for the agent's own files: \
             raise LimitNOFILE or lower api_max_connections"
        );
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for l in &self.loops {
            l.abort();
        }
    }
}

/// The admitted connections as the stream ttrpc's `Listener` takes.
struct Admitted(mpsc::Receiver<GuardedStream>);

impl futures_core::Stream for Admitted {
    type Item = std::io::Result<GuardedStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().0.poll_recv(cx).map(|c| c.map(Ok))
    }
}
