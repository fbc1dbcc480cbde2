//! One admitted connection as ttrpc sees it: the socket, with the frame
//! checks on what ttrpc reads. A failed check is a read error, on which
//! ttrpc closes the connection; so the guard never reads ahead, never
//! buffers and adds no hop.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::{Instant, Sleep};

use super::admission::{Eviction, Shared, Trouble};
use super::frame::{FrameEvent, FrameTracker};

/// Frames up to this size are not counted against the shared budget: a
/// flood of large frames must not starve the small requests of everyone
/// else (cap × this is the most they can hold).
pub const SMALL_FRAME: usize = 64 << 10;

/// An accepted socket of either public listener.
pub enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// A connection the guard admitted, handed to ttrpc.
pub struct GuardedStream {
    inner: Conn,
    id: u64,
    shared: Arc<Shared>,
    eviction: Arc<Eviction>,
    frame: FrameTracker,
    /// When the frame in progress must be whole; polled only in a frame.
    deadline: Pin<Box<Sleep>>,
    /// Budget bytes the frame in progress holds.
    reserved: usize,
    proven: bool,
}

impl GuardedStream {
    pub fn new(inner: Conn, id: u64, eviction: Arc<Eviction>, shared: Arc<Shared>) -> Self {
        GuardedStream {
            inner,
            id,
            shared,
            eviction,
            frame: FrameTracker::default(),
            deadline: Box::pin(tokio::time::sleep_until(Instant::now())),
            reserved: 0,
            proven: false,
        }
    }

    /// Follows the frames in `bytes` (just read); an error closes the
    /// connection.
    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let (used, event) = self.frame.advance(bytes);
            bytes = &bytes[used..];
            match event {
                Some(FrameEvent::Started) => {
                    let deadline = Instant::now() + self.shared.limits.frame_timeout;
                    self.deadline.as_mut().reset(deadline);
                }
                Some(FrameEvent::Header(0)) | Some(FrameEvent::Ended) => self.frame_done(),
                Some(FrameEvent::Header(length)) => self.check_length(length)?,
                None => {}
            }
        }
        Ok(())
    }

    fn check_length(&mut self, length: u32) -> io::Result<()> {
        let length = usize::try_from(length).unwrap_or(usize::MAX);
        let max = self.shared.limits.max_frame_bytes;
        if length > max {
            self.shared.say(Trouble::Oversize, |more| {
                tracing::warn!("API connection closed: it announced a frame of {length} bytes, the limit is {max}{more}")
            });
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {length} bytes over the limit of {max}"),
            ));
        }
        if length > SMALL_FRAME {
            if !self.shared.reserve(length) {
                let budget = self.shared.limits.max_buffered_bytes;
                self.shared.say(Trouble::OverBudget, |more| {
                    tracing::warn!("API connection closed: its frame of {length} bytes would take the large frames in flight over {budget} bytes{more}")
                });
                return Err(io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    "too many large frames in flight",
                ));
            }
            self.reserved = length;
        }
        Ok(())
    }

    fn frame_done(&mut self) {
        self.shared.unreserve(std::mem::take(&mut self.reserved));
        if !self.proven {
            self.proven = true;
            self.shared.proven(self.id);
        }
    }

    fn timed_out(&self) -> io::Error {
        let after = self.shared.limits.frame_timeout;
        self.shared.say(Trouble::TimedOut, |more| {
            tracing::warn!("API connection closed: it began a frame and did not finish it within {after:?}{more}")
        });
        io::Error::new(io::ErrorKind::TimedOut, "frame not finished in time")
    }
}

fn evicted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "closed to make room for another connection",
    )
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.eviction.is_evicted() {
            return Poll::Ready(Err(evicted()));
        }
        let before = buf.filled().len();
        let polled = match &mut this.inner {
            Conn::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        };
        match polled {
            Poll::Ready(Ok(())) => {
                this.observe(&buf.filled()[before..])?;
                if this.frame.in_frame() && Instant::now() >= this.deadline.deadline() {
                    return Poll::Ready(Err(this.timed_out()));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.eviction.park(cx.waker());
                // Checked again after parking: an eviction between the first
                // check and the park would otherwise wake nobody.
                if this.eviction.is_evicted() {
                    return Poll::Ready(Err(evicted()));
                }
                if this.frame.in_frame() && this.deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(this.timed_out()));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Conn::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Conn::Unix(s) => Pin::new(s).poll_flush(cx),
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Conn::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        self.shared.unreserve(std::mem::take(&mut self.reserved));
        self.shared.release(self.id);
    }
}
