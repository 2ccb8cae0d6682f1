//! What hyper is given, and how a connection is taken back from it: the stall guard on its
//! writes, the bytes already read replayed in front ([`super::Rewind`]), and [`reclaim`]
//! after a WebSocket upgrade.

use std::{io, pin::Pin, time::Duration};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Io, Rewind};

/// The stream hyper is given: every connection has this one type, so that an upgraded
/// connection can be taken back whole ([`reclaim`]).
pub type HyperIo = TokioIo<StallGuard<Rewind<Io>>>;

/// Takes a connection back from hyper after a WebSocket upgrade: the stream and the bytes
/// hyper had read but not used. A plain TCP connection comes back as itself, so the fan-out
/// can write to it directly.
pub fn reclaim(upgraded: Upgraded) -> (Io, Vec<u8>) {
    match upgraded.downcast::<HyperIo>() {
        Ok(parts) => {
            let (unread, io) = parts.io.into_inner().io.into_parts();
            let mut input = parts.read_buf.to_vec();
            input.extend_from_slice(&unread);
            (io, input)
        }
        Err(upgraded) => (Io::Other(Box::new(TokioIo::new(upgraded))), Vec::new()),
    }
}

/// Fails a connection's writes once they have made no progress for `limit`: a peer that
/// stopped reading (or vanished without a FIN) otherwise holds its connection, its
/// subscription and its buffers until TCP gives up, which can take many minutes. (Streams
/// pushhub serves itself apply the same limit in their own loop.)
#[derive(Debug)]
pub struct StallGuard<I> {
    io: I,
    limit: Duration,
    stalled_since: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> StallGuard<I> {
    /// `io`, whose writes fail once stalled for `limit`.
    pub fn new(io: I, limit: Duration) -> Self {
        Self {
            io,
            limit,
            stalled_since: None,
        }
    }

    /// Turns a pending write into an error once the stall has lasted `limit`.
    fn check<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<io::Result<T>>,
    ) -> std::task::Poll<io::Result<T>> {
        use std::{future::Future as _, task::Poll};
        if polled.is_ready() {
            self.stalled_since = None;
            return polled;
        }
        let limit = self.limit;
        let deadline = self
            .stalled_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "peer stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for StallGuard<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for StallGuard<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, polled)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
