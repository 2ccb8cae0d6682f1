//! The connections hyper serves: HTTP/2 (over TLS), and HTTP/1.1 connections whose request is
//! not one pushhub serves on the raw socket, with the bytes already read replayed in front.

use std::{future::Future, io, pin::Pin, sync::Arc, time::Duration};

use axum::{Router, extract::ConnectInfo, http::Request};
use hyper::{body::Incoming, server::conn::http1, upgrade::Upgraded};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::rewind::Rewind;
use crate::transport::io::Io;

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

/// The HTTP protocols a connection may speak with hyper: HTTP/1.1 on plain TCP (an
/// HTTP/2-capable connection state costs a few KiB more per idle connection, and browsers
/// use HTTP/2 only over TLS), HTTP/1.1 or HTTP/2 by ALPN over TLS.
#[derive(Debug)]
pub struct Protocols {
    stall_timeout: Duration,
    http1: http1::Builder,
    any: auto::Builder<TokioExecutor>,
}

impl Protocols {
    /// Builders with the limits of `config`.
    pub fn new(config: &crate::Config) -> Self {
        let max_buf = config.max_header_bytes.max(8192);
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_timeout)
            .max_buf_size(max_buf);
        let mut any = auto::Builder::new(TokioExecutor::new());
        any.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_timeout)
            .max_buf_size(max_buf);
        any.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
        Self {
            stall_timeout: config.stall_timeout,
            http1,
            any,
        }
    }

    /// Serves the rest of a connection with hyper: HTTP/1.1, or whatever ALPN chose when
    /// `negotiated` (TLS). `read` is what was read from it already.
    pub async fn serve(
        self: Arc<Self>,
        io: Io,
        read: Vec<u8>,
        negotiated: bool,
        peer: std::net::SocketAddr,
        router: Router,
        stop: CancellationToken,
    ) {
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request)
        });
        let io: HyperIo = TokioIo::new(StallGuard::new(Rewind::new(read, io), self.stall_timeout));
        let ended = if negotiated {
            let connection = self.any.serve_connection_with_upgrades(io, service);
            let connection = std::pin::pin!(connection);
            until_done(connection, &stop, |c| c.graceful_shutdown())
                .await
                .err()
                .map(|e| e.to_string())
        } else {
            let connection = self.http1.serve_connection(io, service).with_upgrades();
            let connection = std::pin::pin!(connection);
            until_done(connection, &stop, |c| c.graceful_shutdown())
                .await
                .err()
                .map(|e| e.to_string())
        };
        if let Some(error) = ended {
            tracing::debug!(%error, %peer, "connection ended with an error");
        }
    }
}

/// Drives a connection; once `stop` fires, asks it to finish its current request and close.
async fn until_done<C, E>(
    mut connection: Pin<&mut C>,
    stop: &CancellationToken,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::select! {
        ended = connection.as_mut() => return ended,
        () = stop.cancelled() => {}
    }
    graceful_shutdown(connection.as_mut());
    connection.await
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
    fn new(io: I, limit: Duration) -> Self {
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
