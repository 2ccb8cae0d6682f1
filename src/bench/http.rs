//! A small HTTP/1.1 client for the bench's hot loops (pollers, SSE readers and the
//! publisher) and for `pushhub sub` and `pub`.
//!
//! The bench shares the machine with the server it measures, so its clients must cost as
//! little as possible: a general client (reqwest) spent 15-30 µs of the bench's CPU per
//! poll, which on a shared box limited how fast pollers came back, and so what the bench
//! measured. This one keeps one connection per client, writes each request with one write,
//! and parses the answer with `httparse`: `Content-Length` and chunked bodies, keep-alive and
//! `Connection: close`. Everything else (setup, `/stats`) still uses reqwest.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

/// The first wait before a client connects again after losing its connection; it doubles
/// while attempts fail, up to [`RETRY_MOST`].
pub const RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between two attempts to connect again.
pub const RETRY_MOST: Duration = Duration::from_secs(2);

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// One keep-alive connection to a server.
#[derive(Debug)]
pub struct Connection {
    addr: String,
    stream: Option<TcpStream>,
    /// Bytes read and not used yet.
    buf: Vec<u8>,
    /// How the body of the stream opened last is delimited.
    streaming: Framing,
    /// Header lines sent with every request (`authorization: Bearer ...\r\n`).
    extra: String,
    /// The local address to connect from ([`source_address`]), or the system's choice.
    source: Option<IpAddr>,
}

/// How many loopback source addresses the bench's subscribers are spread over.
const SOURCE_ADDRESSES: usize = 250;

/// The address subscriber `index` connects from when the server is on 127.0.0.1: one of
/// 127.0.0.2 to 127.0.0.251. From one address, connections to one server port share about
/// 28,000 ephemeral ports, and each one closed holds its port for a minute in TIME_WAIT: two
/// runs of 15,000 and 19,000 subscribers in a row ran out. Spread, each address holds a
/// few hundred at most. `None` (the system's choice) for any other server.
pub fn source_address(base: &str, index: usize) -> Option<IpAddr> {
    let host = authority(base);
    let loopback = host.starts_with("127.0.0.1:") || host.starts_with("localhost:");
    loopback.then(|| IpAddr::from([127, 0, 0, 2 + (index % SOURCE_ADDRESSES) as u8]))
}

/// The `host:port` of `base` (`http://host:port`).
pub fn authority(base: &str) -> &str {
    base.trim_start_matches("http://").trim_end_matches('/')
}

/// Connects to `addr` (`host:port`) from `source`, when given.
pub async fn connect_from(addr: &str, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(addr).await;
    };
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address"));
    for target in tokio::net::lookup_host(addr).await? {
        let socket = match target {
            SocketAddr::V4(_) if source.is_ipv4() => tokio::net::TcpSocket::new_v4()?,
            _ => continue,
        };
        socket.bind(SocketAddr::new(source, 0))?;
        match socket.connect(target).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last = error,
        }
    }
    Err(last)
}

/// A complete answer.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// A Durable Streams server's `Stream-Next-Offset`, when it sent one.
    pub next_offset: Option<String>,
}

/// How a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    Close,
}

/// A response head: status, body framing, and whether the server will close.
#[derive(Debug)]
struct Head {
    status: u16,
    framing: Framing,
    close: bool,
    next_offset: Option<String>,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

impl Connection {
    /// A client of `base` (`http://host:port`); it connects on first use.
    pub fn new(base: &str) -> Self {
        let addr = authority(base).to_owned();
        Self {
            addr,
            stream: None,
            buf: Vec::with_capacity(4096),
            streaming: Framing::Close,
            extra: String::new(),
            source: None,
        }
    }

    /// Connects from `source` (see [`source_address`]).
    pub fn from_source(mut self, source: Option<IpAddr>) -> Self {
        self.source = source;
        self
    }

    /// Sends `header` (`name: value`) with every request.
    pub fn with_header(mut self, header: &str) -> Self {
        self.extra.push_str(header);
        self.extra.push_str("\r\n");
        self
    }

    async fn stream(&mut self) -> io::Result<&mut TcpStream> {
        if self.stream.is_none() {
            let stream = connect_from(&self.addr, self.source).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
            self.buf.clear();
        }
        Ok(self.stream.as_mut().expect("connected above"))
    }

    /// `GET path`, and its whole answer.
    pub async fn get(&mut self, path: &str) -> io::Result<Response> {
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: {}\r\naccept: */*\r\n{}\r\n",
            self.addr, self.extra
        );
        self.exchange(request.as_bytes()).await
    }

    /// `POST path` with a JSON body, and its whole answer.
    pub async fn post_json(&mut self, path: &str, body: &[u8]) -> io::Result<Response> {
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n",
            self.addr,
            body.len(),
            self.extra
        )
        .into_bytes();
        request.extend_from_slice(body);
        self.exchange(&request).await
    }

    async fn exchange(&mut self, request: &[u8]) -> io::Result<Response> {
        let result = self.try_exchange(request).await;
        if result.is_err() {
            // A failed or closed connection is opened again for the next request.
            self.stream = None;
        }
        result
    }

    async fn try_exchange(&mut self, request: &[u8]) -> io::Result<Response> {
        self.stream().await?.write_all(request).await?;
        let head = self.read_head().await?;
        let mut body = Vec::new();
        match head.framing {
            Framing::Length(len) => {
                while self.buf.len() < len {
                    self.fill().await?;
                }
                body.extend(self.buf.drain(..len));
            }
            Framing::Chunked => while self.read_chunk(&mut body).await? {},
            Framing::Close => {
                while self.fill().await.is_ok() {}
                body.append(&mut self.buf);
                self.stream = None;
            }
        }
        if head.close {
            self.stream = None;
        }
        Ok(Response {
            status: head.status,
            body,
            next_offset: head.next_offset,
        })
    }

    /// Sends `GET path` with `headers` (each `name: value`) and reads the head of a streamed
    /// answer; its body then comes from [`Connection::next_data`] (also a refusal's, which
    /// has a length).
    pub async fn open_stream(&mut self, path: &str, headers: &[&str]) -> io::Result<u16> {
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nhost: {}\r\n{}",
            self.addr, self.extra
        );
        for header in headers {
            request.push_str(header);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        self.stream().await?.write_all(request.as_bytes()).await?;
        let head = self.read_head().await?;
        self.streaming = head.framing;
        Ok(head.status)
    }

    /// The next data of a streamed body (chunked, or delimited by the close), appended to
    /// `out`; `Ok(false)` at its end.
    pub async fn next_data(&mut self, out: &mut Vec<u8>) -> io::Result<bool> {
        if self.streaming == Framing::Chunked {
            return self.read_chunk(out).await;
        }
        if let Framing::Length(left) = self.streaming {
            if left == 0 {
                return Ok(false);
            }
            if self.buf.is_empty() {
                self.fill().await?;
            }
            let take = left.min(self.buf.len());
            out.extend(self.buf.drain(..take));
            self.streaming = Framing::Length(left - take);
            return Ok(true);
        }
        if self.buf.is_empty() {
            match self.fill().await {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                    self.stream = None;
                    return Ok(false);
                }
                Err(error) => return Err(error),
            }
        }
        out.append(&mut self.buf);
        Ok(true)
    }

    /// Reads more into the buffer; an error at the end of the stream.
    async fn fill(&mut self) -> io::Result<()> {
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| invalid("not connected"))?;
        if self.buf.capacity() - self.buf.len() < 2048 {
            self.buf.reserve(8192);
        }
        if stream.read_buf(&mut self.buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    async fn read_head(&mut self) -> io::Result<Head> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 24];
            let mut response = httparse::Response::new(&mut headers);
            match response
                .parse(&self.buf)
                .map_err(|_| invalid("bad response head"))?
            {
                httparse::Status::Complete(len) => {
                    let status = response.code.unwrap_or(0);
                    let mut framing = Framing::Close;
                    let mut close = false;
                    let mut next_offset = None;
                    for header in response.headers.iter() {
                        if header.name.eq_ignore_ascii_case("stream-next-offset") {
                            next_offset = std::str::from_utf8(header.value).ok().map(str::to_owned);
                        }
                        if header.name.eq_ignore_ascii_case("content-length") {
                            let len = std::str::from_utf8(header.value)
                                .ok()
                                .and_then(|v| v.trim().parse().ok())
                                .ok_or_else(|| invalid("bad content-length"))?;
                            framing = Framing::Length(len);
                        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                            framing = Framing::Chunked;
                        } else if header.name.eq_ignore_ascii_case("connection") {
                            close = header.value.eq_ignore_ascii_case(b"close");
                        }
                    }
                    if matches!(status, 100..=199 | 204 | 304) {
                        // No body, whatever the headers say (a 204 has no length).
                        framing = Framing::Length(0);
                    }
                    self.buf.drain(..len);
                    return Ok(Head {
                        status,
                        framing,
                        close,
                        next_offset,
                    });
                }
                httparse::Status::Partial => self.fill().await?,
            }
        }
    }

    /// Reads one chunk of a chunked body into `out`; `Ok(false)` after the last chunk.
    async fn read_chunk(&mut self, out: &mut Vec<u8>) -> io::Result<bool> {
        let (size, line) = loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let text = std::str::from_utf8(&self.buf[..end]).map_err(|_| invalid("chunk"))?;
                let hex = text.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(hex, 16).map_err(|_| invalid("chunk size"))?;
                break (size, end + 2);
            }
            self.fill().await?;
        };
        while self.buf.len() < line + size + 2 {
            self.fill().await?;
        }
        out.extend_from_slice(&self.buf[line..line + size]);
        self.buf.drain(..line + size + 2);
        Ok(size > 0)
    }
}

/// A streamed body split into items at a delimiter (a blank line between SSE events, a
/// newline between NDJSON lines), whatever the reads' boundaries.
#[derive(Debug)]
pub struct Items {
    delimiter: &'static [u8],
    buffer: Vec<u8>,
    /// Where the search for the end of the next item resumes.
    scanned: usize,
}

impl Items {
    /// Items ended by `delimiter`.
    pub fn new(delimiter: &'static [u8]) -> Self {
        Self {
            delimiter,
            buffer: Vec::new(),
            scanned: 0,
        }
    }

    /// Reads the stream's next data from `connection`: how many bytes, or `None` at its end.
    pub async fn read(&mut self, connection: &mut Connection) -> io::Result<Option<usize>> {
        let before = self.buffer.len();
        let more = connection.next_data(&mut self.buffer).await?;
        Ok(more.then(|| self.buffer.len() - before))
    }

    /// Hands each complete item read so far to `each`, in order, and keeps the rest.
    pub fn drain(&mut self, mut each: impl FnMut(&[u8])) {
        let delimiter = self.delimiter;
        let mut start = 0;
        while let Some(end) = self.buffer[self.scanned.max(start)..]
            .windows(delimiter.len())
            .position(|w| w == delimiter)
            .map(|at| self.scanned.max(start) + at)
        {
            each(&self.buffer[start..end]);
            start = end + delimiter.len();
        }
        self.buffer.drain(..start);
        // The end of an item may straddle two reads: look again from its possible start.
        self.scanned = self.buffer.len().saturating_sub(delimiter.len() - 1);
    }
}

/// An SSE event's `event:` name (`message` when it has none) and its `data:` (one line).
pub fn sse_event(block: &[u8]) -> (&[u8], Option<&[u8]>) {
    let mut event: &[u8] = b"message";
    let mut data = None;
    for line in block.split(|&b| b == b'\n') {
        if let Some(name) = line.strip_prefix(b"event: ") {
            event = name;
        } else if let Some(value) = line.strip_prefix(b"data: ") {
            data = Some(value);
        }
    }
    (event, data)
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    /// Subscribers of a loopback server connect from 127.0.0.2 upward, and arrive from
    /// there: the server sees the address each was given.
    #[tokio::test]
    async fn subscribers_connect_from_spread_loopback_addresses() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        assert_eq!(source_address(&base, 0), Some([127, 0, 0, 2].into()));
        assert_eq!(source_address(&base, 249), Some([127, 0, 0, 251].into()));
        assert_eq!(source_address(&base, 250), Some([127, 0, 0, 2].into()));
        assert_eq!(source_address("http://10.1.2.3:80", 7), None);
        for index in [0, 3, 249] {
            let source = source_address(&base, index);
            let addr = base.trim_start_matches("http://");
            let _client = connect_from(addr, source).await.unwrap();
            let (_, peer) = listener.accept().await.unwrap();
            assert_eq!(Some(peer.ip()), source);
        }
    }

    #[tokio::test]
    async fn lengths_chunks_and_closes_are_read_exactly() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = vec![0; 1024];
            let _ = socket.read(&mut request).await.unwrap();
            // Two answers in one write: one with a length, then (after the next request)
            // a chunked one split across writes.
            socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                .await
                .unwrap();
            let _ = socket.read(&mut request).await.unwrap();
            socket
                .write_all(
                    b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n",
                )
                .await
                .unwrap();
            socket.write_all(b"2\r\nde\r\n0\r\n\r\n").await.unwrap();
        });
        let mut connection = Connection::new(&format!("http://{addr}"));
        let first = connection.get("/a").await.unwrap();
        assert_eq!((first.status, &first.body[..]), (200, &b"hello"[..]));
        let second = connection.post_json("/b", b"{}").await.unwrap();
        assert_eq!((second.status, &second.body[..]), (201, &b"abcde"[..]));
        server.await.unwrap();
    }
}
