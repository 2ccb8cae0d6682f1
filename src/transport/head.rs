//! HTTP/1.1 request heads, read with `httparse` before hyper sees the connection.
//!
//! pushhub reads the head of each request on a plain HTTP/1.1 connection itself, to decide
//! who serves it (the gate routes: `gate/connection.rs`): the streaming and polling
//! endpoints on the raw socket, where the head travels with the call to the transport
//! ([`super::call::Call`]), everything else by hyper and axum with the bytes already read
//! replayed in front ([`super::io::rewind`]). So this parser only needs to be right about the requests it keeps;
//! anything unusual (a body, HTTP/1.0, `Expect`, too many headers, a malformed head) goes to
//! hyper, which answers it as it always has.

use std::ops::Range;

/// Headers read per request; a head with more goes to hyper (which accepts 100).
const MAX_HEADERS: usize = 48;

/// What the bytes read so far hold.
#[derive(Debug)]
pub enum Parsed {
    /// A complete head.
    Head(RequestHead),
    /// Not a complete head yet.
    Partial,
    /// Not something pushhub serves itself: hand the connection to hyper.
    Other,
}

/// A parsed request head and the buffer it was read into (which may hold more: the start of
/// a pipelined request).
///
/// Kept small (positions are `u32` offsets into the buffer), because it is held by the
/// future of every request in flight.
#[derive(Debug)]
pub struct RequestHead {
    buf: Vec<u8>,
    head_len: u32,
    method: Span,
    path: Span,
    query: Option<Span>,
    /// Name and value of each header.
    headers: Vec<(Span, Span)>,
}

/// A part of the buffer: start and end offsets.
#[derive(Debug, Clone, Copy)]
struct Span(u32, u32);

impl Span {
    fn of(buf: &[u8], part: &[u8]) -> Self {
        let start = part.as_ptr() as usize - buf.as_ptr() as usize;
        // Heads are bounded by `--max-header-bytes`, far below 4 GiB.
        Span(start as u32, (start + part.len()) as u32)
    }

    fn range(self) -> Range<usize> {
        self.0 as usize..self.1 as usize
    }
}

impl RequestHead {
    /// Parses the head at the start of `buf`, taking the buffer when it is complete.
    pub fn parse(buf: Vec<u8>) -> (Parsed, Option<Vec<u8>>) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let head_len = match request.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return (Parsed::Partial, Some(buf)),
            Err(_) => return (Parsed::Other, Some(buf)),
        };
        // HTTP/1.0 has other keep-alive and framing rules: hyper knows them.
        if request.version != Some(1) {
            return (Parsed::Other, Some(buf));
        }
        let (Some(method), Some(target)) = (request.method, request.path) else {
            return (Parsed::Other, Some(buf));
        };
        let method = Span::of(&buf, method.as_bytes());
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(Span::of(&buf, query.as_bytes()))),
            None => (target, None),
        };
        let path = Span::of(&buf, path.as_bytes());
        let headers = request
            .headers
            .iter()
            .map(|h| (Span::of(&buf, h.name.as_bytes()), Span::of(&buf, h.value)))
            .collect();
        let head = RequestHead {
            head_len: head_len as u32,
            method,
            path,
            query,
            headers,
            buf,
        };
        (Parsed::Head(head), None)
    }

    /// Text the parser handed out as `&str` (method, path, query).
    fn text(&self, span: Span) -> &str {
        // These spans were taken from `&str`s httparse returned for this buffer, which it had
        // checked (methods are tokens, targets visible ASCII); the buffer has not changed
        // since. Checked again (a few ns on short ASCII) rather than assumed: no `unsafe`.
        std::str::from_utf8(&self.buf[span.range()]).expect("httparse returned UTF-8 spans")
    }

    /// The request method.
    pub fn method(&self) -> &str {
        self.text(self.method)
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.text(self.path)
    }

    /// The query string, without the `?`.
    pub fn query(&self) -> &str {
        self.query.map_or("", |q| self.text(q))
    }

    /// The value of the last header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| self.buf[n.range()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| &self.buf[v.range()])
    }

    /// How many headers are named `name`.
    fn count(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| self.buf[n.range()].eq_ignore_ascii_case(name.as_bytes()))
            .count()
    }

    /// Whether a header named `name` is present.
    pub fn has_header(&self, name: &str) -> bool {
        self.count(name) > 0
    }

    /// Whether exactly one header is named `name`.
    pub fn single(&self, name: &str) -> bool {
        self.count(name) == 1
    }

    /// The head as an `http` request (empty body), for the axum router; `None` when a name
    /// or value is not valid for `http` (hyper then answers 400).
    pub fn to_request(&self) -> Option<axum::http::Request<axum::body::Body>> {
        let end = self.query.map_or(self.path.1, |q| q.1) as usize;
        let target = &self.buf[self.path.0 as usize..end];
        let mut request = axum::http::Request::builder()
            .method(axum::http::Method::from_bytes(self.method().as_bytes()).ok()?)
            .uri(axum::http::Uri::try_from(target).ok()?)
            .version(axum::http::Version::HTTP_11)
            .body(axum::body::Body::empty())
            .ok()?;
        let headers = request.headers_mut();
        headers.reserve(self.headers.len());
        for (name, value) in &self.headers {
            headers.append(
                axum::http::HeaderName::from_bytes(&self.buf[name.range()]).ok()?,
                axum::http::HeaderValue::from_bytes(&self.buf[value.range()]).ok()?,
            );
        }
        Some(request)
    }

    /// Whether a comma-separated header has `token` (ASCII case-insensitive).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| self.buf[n.range()].eq_ignore_ascii_case(name.as_bytes()))
            .flat_map(|(_, v)| self.buf[v.range()].split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    }

    /// A GET with no body and nothing that needs hyper's handling: one pushhub may serve.
    pub fn is_plain_get(&self) -> bool {
        if self.method() != "GET" {
            return false;
        }
        // One pass over the headers: no transfer coding, no `Expect`, no body length but 0.
        self.headers.iter().all(|(name, value)| {
            let name = &self.buf[name.range()];
            !(name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"expect")
                || (name.eq_ignore_ascii_case(b"content-length")
                    && &self.buf[value.range()] != b"0"))
        })
    }

    /// The client asked to close the connection after this request.
    pub fn wants_close(&self) -> bool {
        self.has_token("connection", "close")
    }

    /// Bytes read after the head: the start of the next (pipelined) request. Consumes the
    /// head.
    pub fn into_rest(self) -> Vec<u8> {
        let mut buf = self.buf;
        if buf.len() == self.head_len as usize {
            // Nothing pipelined: the buffer's memory goes back now.
            return Vec::new();
        }
        buf.drain(..self.head_len as usize);
        buf
    }

    /// The whole buffer, head included, to replay in front of the stream for hyper.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// Length of the head in bytes.
    pub fn len(&self) -> usize {
        self.head_len as usize
    }

    /// Whether the head is empty (it never is; for clippy's `len` rule).
    pub fn is_empty(&self) -> bool {
        self.head_len == 0
    }
}

impl crate::access::HeaderSource for RequestHead {
    fn header(&self, name: &str) -> Option<&[u8]> {
        RequestHead::header(self, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &[u8]) -> Parsed {
        RequestHead::parse(text.to_vec()).0
    }

    #[test]
    fn a_get_is_read_with_its_query_and_headers() {
        let Parsed::Head(head) = parse(
            b"GET /topics/a/sse?after=3&x=y HTTP/1.1\r\nHost: h\r\nLast-Event-ID: 7\r\nConnection: keep-alive, Upgrade\r\n\r\nGET /next",
        ) else {
            panic!("not parsed");
        };
        assert_eq!(head.method(), "GET");
        assert_eq!(head.path(), "/topics/a/sse");
        assert_eq!(head.query(), "after=3&x=y");
        assert_eq!(head.header("last-event-id"), Some(&b"7"[..]));
        assert!(head.has_token("connection", "upgrade"));
        assert!(head.is_plain_get() && !head.wants_close());
        assert_eq!(head.into_rest(), b"GET /next");
    }

    #[test]
    fn what_pushhub_does_not_serve_goes_to_hyper() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost:"), Parsed::Partial));
        assert!(matches!(parse(b"GET / HTTP/1.0\r\n\r\n"), Parsed::Other));
        assert!(matches!(parse(b"NOT HTTP AT ALL\r\n\r\n"), Parsed::Other));
        assert!(matches!(
            parse(b"GET /\x00 HTTP/1.1\r\n\r\n"),
            Parsed::Other
        ));
        let Parsed::Head(post) =
            parse(b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n")
        else {
            panic!()
        };
        assert!(!post.is_plain_get(), "two lengths: hyper answers 400");
        let Parsed::Head(chunked) = parse(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        else {
            panic!()
        };
        assert!(!chunked.is_plain_get());
    }
}
