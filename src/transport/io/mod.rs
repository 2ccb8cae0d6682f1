//! The byte stream of one connection, as the transports serve it.
//!
//! A plain TCP connection is kept in an `Arc`, so that the fan-out writers can write to the
//! same socket the connection's task reads from (both use tokio's `&self` socket calls, which
//! keep their own readiness per direction). Anything else (TLS, a connection hyper upgraded)
//! is a boxed stream the task alone reads and writes.
//!
//! The small IO adapters live beside it, one per file, as in hyper's `common/io`:
//! [`rewind`] (bytes already read, replayed in front of a stream) and [`hyper`] (the stall
//! guard on what hyper serves, and taking an upgraded connection back from hyper).

pub mod hyper;
pub mod rewind;

pub use self::hyper::{HyperIo, StallGuard, reclaim};
pub use rewind::Rewind;

use std::{
    io::{self, IoSlice},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// What a boxed connection must be.
pub trait AsyncIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> AsyncIo for T {}

/// One connection's byte stream.
pub enum Io {
    /// Plain TCP, shareable with the fan-out writers.
    Tcp(Arc<TcpStream>),
    /// A stream only the connection's task touches.
    Other(Box<dyn AsyncIo>),
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Io::Tcp(stream) => f.debug_tuple("Tcp").field(stream).finish(),
            Io::Other(_) => f.write_str("Other"),
        }
    }
}

impl Io {
    /// The socket the fan-out may write to directly, if this is plain TCP.
    pub fn shared_socket(&self) -> Option<Arc<TcpStream>> {
        match self {
            Io::Tcp(stream) => Some(stream.clone()),
            Io::Other(_) => None,
        }
    }

    /// Ready when a read may find something: for plain TCP, the socket's read readiness, so
    /// that an idle connection waits without holding a read buffer; always for other streams,
    /// which can only be polled by reading.
    ///
    /// # Cancel safety
    /// Cancel safe: it only registers interest.
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Io::Tcp(stream) => stream.poll_read_ready(cx),
            Io::Other(_) => Poll::Ready(Ok(())),
        }
    }

    /// Reads what is available into the spare capacity of `buf` (at least `chunk` bytes of
    /// room are made); `Ok(0)` is the end of the stream.
    pub fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<u8>,
        chunk: usize,
    ) -> Poll<io::Result<usize>> {
        if let Io::Tcp(stream) = self {
            // Read into the stack first: a wake-up that finds nothing (readiness is only a
            // hint) must not leave an idle connection holding a buffer.
            // Uninitialised: `recv` says which bytes it filled, and only those are copied.
            let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
            let take = chunk.clamp(1, scratch.len());
            loop {
                ready!(stream.poll_read_ready(cx))?;
                match read_drained(stream, &mut scratch[..take], buf) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(error) => return Poll::Ready(Err(error)),
                }
            }
        }
        if buf.capacity() - buf.len() < chunk {
            buf.reserve(chunk);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut *self), cx, buf)
    }

    /// Reads once into `buf`, waiting until something arrives.
    ///
    /// # Cancel safety
    /// Cancel safe: bytes are appended to `buf` only when the read completes, so a read
    /// cancelled in a `select!` loses nothing.
    pub async fn read_into(&mut self, buf: &mut Vec<u8>, chunk: usize) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_into(cx, buf, chunk)).await
    }

    /// Writes `frames` from `*done` bytes on; advances `*done`. Ready once all is written.
    pub fn poll_write_frames(
        &mut self,
        cx: &mut Context<'_>,
        frames: &[Bytes],
        done: &mut usize,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut skip = *done;
            let mut slices: smallvec::SmallVec<[IoSlice<'_>; 16]> = smallvec::SmallVec::new();
            for frame in frames {
                if skip >= frame.len() {
                    skip -= frame.len();
                    continue;
                }
                slices.push(IoSlice::new(&frame[skip..]));
                skip = 0;
            }
            if slices.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let written = ready!(Pin::new(&mut *self).poll_write_vectored(cx, &slices))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += written;
        }
    }

    /// Writes all of `bytes`, and fails once a write has made no progress for `stall`. The
    /// first write is tried at once, so the common case (the socket takes it all) arms no
    /// timer.
    pub async fn write_all_within(
        &mut self,
        bytes: &[u8],
        stall: std::time::Duration,
    ) -> io::Result<()> {
        let done = match self {
            Io::Tcp(stream) => match stream.try_write(bytes) {
                Ok(n) => n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
                Err(error) => return Err(error),
            },
            Io::Other(_) => 0,
        };
        if done == bytes.len() {
            return Ok(());
        }
        let rest = &bytes[done..];
        match tokio::time::timeout(stall, async {
            self.write_all(rest).await?;
            self.flush().await
        })
        .await
        {
            Ok(written) => written,
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        }
    }

    /// Writes all of `bytes`.
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut done = 0;
        while done < bytes.len() {
            let written =
                std::future::poll_fn(|cx| Pin::new(&mut *self).poll_write(cx, &bytes[done..]))
                    .await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            done += written;
        }
        Ok(())
    }

    /// Flushes what a TLS stream buffers (nothing to do for plain TCP).
    pub async fn flush(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_flush(cx)).await
    }

    /// Closes the writing side, so the peer sees the end of the stream.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_shutdown(cx)).await
    }
}

/// One `recv` into `buf`. A read shorter than `buf` emptied the socket's receive queue, so
/// the socket's read readiness is cleared as a failed read would clear it: the next read then
/// waits for the next epoll edge instead of making a system call that finds nothing. This is
/// nginx's `ngx_unix_recv` rule. It is safe with edge-triggered epoll: whatever arrives after
/// the `recv` (or during it, into the socket's backlog) raises a new edge, and tokio clears
/// readiness only if no newer edge was seen.
/// What was read is appended to `out`.
fn read_drained(
    stream: &TcpStream,
    scratch: &mut [std::mem::MaybeUninit<u8>],
    out: &mut Vec<u8>,
) -> io::Result<usize> {
    let mut got = 0;
    let room = scratch.len();
    let result = stream.try_io(tokio::io::Interest::READABLE, || {
        let ((read, _), _) =
            rustix::net::recv(stream, &mut *scratch, rustix::net::RecvFlags::empty())?;
        out.extend_from_slice(read);
        got = read.len();
        if got > 0 && got < room {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(got)
        }
    });
    match result {
        Err(error) if error.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(stream) => loop {
                ready!(stream.poll_read_ready(cx))?;
                // Zeroed once per buffer: `ReadBuf` remembers what is initialised.
                match stream.try_read(buf.initialize_unfilled()) {
                    Ok(n) => {
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(error) => return Poll::Ready(Err(error)),
                }
            },
            Io::Other(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(stream) => loop {
                ready!(stream.poll_write_ready(cx))?;
                match stream.try_write(buf) {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    other => return Poll::Ready(other),
                }
            },
            Io::Other(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(stream) => loop {
                ready!(stream.poll_write_ready(cx))?;
                match stream.try_write_vectored(bufs) {
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                    other => return Poll::Ready(other),
                }
            },
            Io::Other(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Tcp(_) => true,
            Io::Other(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(_) => Poll::Ready(Ok(())),
            Io::Other(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(stream) => Poll::Ready(
                rustix::net::shutdown(&**stream, rustix::net::Shutdown::Write)
                    .map_err(io::Error::from),
            ),
            Io::Other(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
