//! The guard's own accept loop on a public socket: it admits or refuses
//! each connection before ttrpc sees it, and backs off when accepting
//! fails instead of spinning (ttrpc's own loop logged each EMFILE, millions
//! a minute, at 63 % of a CPU).

use std::io;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;

use super::admission::{Backoff, Shared, Trouble};
use super::conn::{Conn, GuardedStream};
use super::GuardError;

/// A listening socket of the API.
pub enum PublicListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl PublicListener {
    /// Binds a ttrpc-style address: `unix:///path` or `tcp://host:port`.
    pub async fn bind(address: &str) -> Result<PublicListener, GuardError> {
        let bound = if let Some(path) = address.strip_prefix("unix://") {
            UnixListener::bind(path).map(PublicListener::Unix)
        } else if let Some(addr) = address.strip_prefix("tcp://") {
            TcpListener::bind(addr).await.map(PublicListener::Tcp)
        } else {
            return Err(GuardError::Scheme(address.to_string()));
        };
        bound.map_err(|source| GuardError::Bind {
            address: address.to_string(),
            source,
        })
    }

    async fn accept(&self) -> io::Result<Conn> {
        match self {
            PublicListener::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
            PublicListener::Tcp(l) => l.accept().await.map(|(s, _)| {
                // Small request/response frames: no Nagle delay.
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
        }
    }
}

/// Errors that concern one connection that is already gone; the next
/// accept is a different connection, so there is nothing to wait for.
fn one_connection_only(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// Errors that mean descriptors (or socket memory) ran out.
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM)
    )
}

/// The errno values named above (nix's, so the agent needs no libc).
mod libc_errno {
    use nix::errno::Errno;
    pub const EMFILE: i32 = Errno::EMFILE as i32;
    pub const ENFILE: i32 = Errno::ENFILE as i32;
    pub const ENOBUFS: i32 = Errno::ENOBUFS as i32;
    pub const ENOMEM: i32 = Errno::ENOMEM as i32;
}

/// Accepts on `listener` until ttrpc stops taking connections.
pub async fn accept_loop(
    listener: PublicListener,
    name: String,
    shared: Arc<Shared>,
    to_ttrpc: mpsc::Sender<GuardedStream>,
) {
    let mut backoff = Backoff::new();
    loop {
        match listener.accept().await {
            Ok(conn) => {
                backoff.reset();
                // Refused: dropping it closes it at once.
                let Some(admitted) = shared.admit() else {
                    continue;
                };
                let stream =
                    GuardedStream::new(conn, admitted.id, admitted.eviction, shared.clone());
                if to_ttrpc.send(stream).await.is_err() {
                    return;
                }
                if admitted.evicted_other {
                    // Let the evicted connection's tasks close its socket
                    // before the next accept needs the descriptor.
                    tokio::task::yield_now().await;
                }
            }
            Err(e) if one_connection_only(&e) => {}
            Err(e) => {
                let shed = out_of_descriptors(&e).then(|| shared.shed());
                if shed.is_some_and(|(_, closed)| closed > 0) {
                    // Descriptors were freed: the next try may well work.
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                shared.say(Trouble::AcceptFailed, |more| match shed {
                    Some((cap, _)) => tracing::warn!(
                        "cannot accept on {name}: {e}; retrying in {delay:?}, at most {cap} API connections for a minute{more}"
                    ),
                    None => tracing::warn!("cannot accept on {name}: {e}; retrying in {delay:?}{more}"),
                });
                tokio::time::sleep(delay).await;
            }
        }
    }
}
