//! Response heads for the requests pushhub serves on the raw socket.
//!
//! They carry what the tower layers add to every response hyper serves (`x-request-id`, the
//! CORS headers of `--allowed-origins`, `date`), so a client cannot tell which path answered;
//! `tests/http_api.rs` compares the two.

use std::sync::{
    OnceLock,
    atomic::{AtomicU64, Ordering},
};

use axum::http::StatusCode;

use super::head::RequestHead;
use crate::{access::OriginPolicy, error::Error, message::wire::push_hex};

/// The next request id: the process start time and a counter, in hex, unique per process
/// without a random source. Shared by hyper's requests (through [`RequestIds`]) and the raw
/// path.
fn push_request_id(out: &mut impl Extend<u8>) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static BOOT: OnceLock<u64> = OnceLock::new();
    let boot = *BOOT.get_or_init(crate::message::now_micros);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    push_hex(out, boot);
    out.extend([b'-']);
    push_hex(out, n);
}

/// The next request id, as text.
pub fn next_request_id() -> String {
    let mut id = Vec::with_capacity(24);
    push_request_id(&mut id);
    String::from_utf8(id).expect("hex digits")
}

/// Request ids for `x-request-id` on hyper's side (kept when the client or a proxy sent one).
#[derive(Clone, Default)]
pub struct RequestIds;

impl tower_http::request_id::MakeRequestId for RequestIds {
    fn make_request_id<B>(
        &mut self,
        _: &axum::http::Request<B>,
    ) -> Option<tower_http::request_id::RequestId> {
        axum::http::HeaderValue::from_str(&next_request_id())
            .ok()
            .map(tower_http::request_id::RequestId::new)
    }
}

/// What every response to one request carries: its id and its CORS headers. Inline bytes,
/// not allocations: one is built for every request served here.
#[derive(Debug)]
pub struct Meta {
    request_id: smallvec::SmallVec<[u8; 40]>,
    allow_origin: Option<smallvec::SmallVec<[u8; 40]>>,
    vary_origin: bool,
}

impl Meta {
    /// The request id the client sent (or a new one) and the CORS answer to its `Origin`.
    pub fn of(head: &RequestHead, origins: &OriginPolicy) -> Self {
        let request_id = match head.header("x-request-id") {
            Some(id)
                if !id.is_empty()
                    && id.iter().all(|&b| b == b'\t' || (0x20..0x7F).contains(&b)) =>
            {
                smallvec::SmallVec::from_slice(id)
            }
            _ => {
                let mut id = smallvec::SmallVec::new();
                push_request_id(&mut id);
                id
            }
        };
        let (allow_origin, vary_origin) = origins.cors(head.header("origin"));
        Self {
            request_id,
            allow_origin: allow_origin.map(smallvec::SmallVec::from_slice),
            vary_origin,
        }
    }

    /// The request's id, for logs.
    pub fn request_id(&self) -> &str {
        std::str::from_utf8(&self.request_id).unwrap_or_default()
    }
}

/// How the body of a response is delimited.
#[derive(Clone, Copy, Debug)]
pub enum Length {
    /// `content-length`.
    Fixed(usize),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// No body (`101 Switching Protocols`).
    None,
    /// Not written yet: the head stops before its `content-length`, `date` and blank line,
    /// which whoever knows the body adds (a long poll answered from the fan-out).
    Deferred,
}

/// Writes a response head: status line, `headers`, the per-request headers, framing, date.
pub fn head(status: StatusCode, headers: &[(&str, &str)], meta: &Meta, length: Length) -> Vec<u8> {
    head_with_room(status, headers, meta, length, 0)
}

/// [`head`], in a buffer with room for `body` more bytes after it.
fn head_with_room(
    status: StatusCode,
    headers: &[(&str, &str)],
    meta: &Meta,
    length: Length,
    body: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(320 + body);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        push_header(&mut out, name, value.as_bytes());
    }
    if let Some(origin) = &meta.allow_origin {
        push_header(&mut out, "access-control-allow-origin", origin);
    }
    if meta.vary_origin {
        push_header(&mut out, "vary", b"origin");
    }
    push_header(&mut out, "x-request-id", &meta.request_id);
    match length {
        Length::Fixed(len) => {
            push_header(
                &mut out,
                "content-length",
                itoa::Buffer::new().format(len).as_bytes(),
            );
        }
        Length::Chunked => push_header(&mut out, "transfer-encoding", b"chunked"),
        Length::None => {}
        Length::Deferred => return out,
    }
    push_header(&mut out, "date", &crate::message::wire::http_date());
    out.extend_from_slice(b"\r\n");
    out
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A complete response with a body.
pub fn full(status: StatusCode, headers: &[(&str, &str)], meta: &Meta, body: &[u8]) -> Vec<u8> {
    let length = Length::Fixed(body.len());
    let mut out = head_with_room(status, headers, meta, length, body.len());
    out.extend_from_slice(body);
    out
}

/// An error as a complete response: its status, its JSON body and its headers, as
/// [`Error`]'s `IntoResponse` answers on hyper's side. Counted and logged there too.
pub fn error(error: &Error, meta: &Meta) -> Vec<u8> {
    error_with(error, meta, &[])
}

/// [`error`], with `more` headers (those a protocol puts on every answer).
pub fn error_with(error: &Error, meta: &Meta, more: &[(&str, &str)]) -> Vec<u8> {
    error.report(Some(meta.request_id()));
    let body = error.body_json();
    let extra = error.headers();
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    headers.extend(extra.iter().map(|(n, v)| (*n, v.as_str())));
    headers.extend_from_slice(more);
    full(error.status(), &headers, meta, body.as_bytes())
}

/// Writes a response of the axum router: its status and headers, the `date` and framing
/// headers hyper would add, and its body (`Content-Length` when its size is known, else
/// chunked; none for `HEAD`). Returns whether the connection may be kept.
pub async fn write_app(
    io: &mut crate::transport::io::Io,
    response: axum::response::Response,
    head_only: bool,
) -> std::io::Result<bool> {
    use axum::body::HttpBody as _;
    use futures::StreamExt;

    let (parts, body) = response.into_parts();
    let status = parts.status;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut keep = true;
    let mut dated = false;
    for (name, value) in &parts.headers {
        match name.as_str() {
            "content-length" | "transfer-encoding" => continue,
            "connection" => keep &= !value.as_bytes().eq_ignore_ascii_case(b"close"),
            "date" => dated = true,
            _ => {}
        }
        push_header(&mut out, name.as_str(), value.as_bytes());
    }
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let exact = body.size_hint().exact();
    let chunked = !bodiless && exact.is_none();
    if !bodiless {
        match exact {
            Some(len) => push_header(
                &mut out,
                "content-length",
                itoa::Buffer::new().format(len).as_bytes(),
            ),
            None => push_header(&mut out, "transfer-encoding", b"chunked"),
        }
    }
    if !dated {
        push_header(&mut out, "date", &crate::message::wire::http_date());
    }
    out.extend_from_slice(b"\r\n");
    if head_only || bodiless {
        io.write_all(&out).await?;
        return Ok(keep);
    }
    let mut data = body.into_data_stream();
    while let Some(chunk) = data.next().await {
        let Ok(chunk) = chunk else {
            // The body failed midway: the response cannot be completed, nor the connection
            // kept.
            io.write_all(&out).await?;
            return Ok(false);
        };
        if chunk.is_empty() {
            continue;
        }
        if chunked {
            crate::message::wire::push_chunk_start(&mut out, chunk.len());
            out.extend_from_slice(&chunk);
            out.extend_from_slice(b"\r\n");
        } else {
            out.extend_from_slice(&chunk);
        }
        if out.len() >= 64 * 1024 {
            io.write_all(&out).await?;
            out.clear();
        }
    }
    if chunked {
        out.extend_from_slice(crate::message::wire::LAST_CHUNK);
    }
    io.write_all(&out).await?;
    Ok(keep)
}

impl std::fmt::Debug for RequestIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestIds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_carry_framing_and_the_request_id() {
        let head_bytes =
            b"GET /x HTTP/1.1\r\nx-request-id: abc\r\nOrigin: https://a.example\r\n\r\n";
        let (parsed, _) = RequestHead::parse(head_bytes.to_vec());
        let super::super::head::Parsed::Head(request) = parsed else {
            panic!()
        };
        let policy = OriginPolicy::List(vec!["https://a.example".into()]);
        let meta = Meta::of(&request, &policy);
        let text = String::from_utf8(full(
            StatusCode::OK,
            &[("content-type", "application/json")],
            &meta,
            b"{}",
        ))
        .unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"));
        assert!(
            text.contains("\r\naccess-control-allow-origin: https://a.example\r\nvary: origin\r\n")
        );
        assert!(text.contains("\r\nx-request-id: abc\r\ncontent-length: 2\r\ndate: "));
        assert!(text.ends_with(" GMT\r\n\r\n{}"));
        let anyone = Meta::of(&request, &OriginPolicy::Any);
        let text = String::from_utf8(head(StatusCode::OK, &[], &anyone, Length::Chunked)).unwrap();
        assert!(text.contains("access-control-allow-origin: *\r\n") && !text.contains("vary"));
        assert!(text.contains("transfer-encoding: chunked\r\n"));
    }
}
