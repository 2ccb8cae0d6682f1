//! Byte-level encodings shared by the transports: WebSocket server frames, Server-Sent Events
//! frames, and HTTP/1.1 chunks.
//!
//! Everything here is pure (bytes in, bytes out), so a message can be framed once when it is
//! published and the same bytes written to every subscriber: a server's WebSocket frames are
//! never masked (RFC 6455 §5.1), so a frame is the same for every connection, and an SSE event
//! or an HTTP chunk depends only on its content.

use bytes::Bytes;

use super::MessageId;

/// WebSocket opcodes (RFC 6455 §5.2).
pub mod opcode {
    /// A continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// A UTF-8 text message.
    pub const TEXT: u8 = 0x1;
    /// A binary message.
    pub const BINARY: u8 = 0x2;
    /// The closing handshake.
    pub const CLOSE: u8 = 0x8;
    /// A ping, answered with a pong carrying the same payload.
    pub const PING: u8 = 0x9;
    /// A pong.
    pub const PONG: u8 = 0xA;
}

/// The longest WebSocket frame header a server writes: 2 bytes plus a 64-bit length.
pub const WS_MAX_HEADER: usize = 10;

/// The header of an unmasked, final WebSocket frame with `opcode` and a payload of `len`
/// bytes: the bytes and how many of them are used.
pub fn ws_header(opcode: u8, len: usize) -> ([u8; WS_MAX_HEADER], usize) {
    let mut header = [0u8; WS_MAX_HEADER];
    header[0] = 0x80 | (opcode & 0x0F);
    let used = if len < 126 {
        header[1] = len as u8;
        2
    } else if let Ok(len) = u16::try_from(len) {
        header[1] = 126;
        header[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (header, used)
}

/// A complete, unmasked, final WebSocket frame.
pub fn ws_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let (header, used) = ws_header(opcode, payload.len());
    let mut frame = Vec::with_capacity(used + payload.len());
    frame.extend_from_slice(&header[..used]);
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

/// A WebSocket close frame with `code` and a short `reason` (at most 123 bytes are kept, the
/// most a control frame can carry).
pub fn ws_close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    ws_frame(opcode::CLOSE, &payload)
}

/// Appends one SSE event: `id:`, `event:` and one `data:` line, then the blank line. The data
/// must be one line (compact JSON is).
pub fn push_sse_frame(out: &mut Vec<u8>, id: MessageId, event: &str, data: &[u8]) {
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
    out.extend_from_slice(b"\nevent: ");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
}

/// Length of what [`push_sse_frame`] appends.
pub fn sse_frame_len(id: MessageId, event: &str, data: &[u8]) -> usize {
    4 + itoa::Buffer::new().format(id).len() + 8 + event.len() + 7 + data.len() + 2
}

/// One SSE event as its own `Bytes`.
pub fn sse_frame(id: MessageId, event: &str, data: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(sse_frame_len(id, event, data));
    push_sse_frame(&mut frame, id, event, data);
    Bytes::from(frame)
}

/// Appends the line that opens an HTTP/1.1 chunk of `len` bytes (`len` in hex, then CRLF).
pub fn push_chunk_start(out: &mut Vec<u8>, len: usize) {
    push_hex(out, len as u64);
    out.extend_from_slice(b"\r\n");
}

/// Appends `value` in lowercase hex, without leading zeros.
pub fn push_hex(out: &mut impl Extend<u8>, value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 16];
    let mut at = text.len();
    let mut rest = value;
    loop {
        at -= 1;
        text[at] = DIGITS[(rest & 0xF) as usize];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    out.extend(text[at..].iter().copied());
}

/// `data` as one HTTP/1.1 chunk. Empty data would end the body, so it must not be empty.
pub fn chunk(data: &[u8]) -> Bytes {
    debug_assert!(!data.is_empty(), "an empty chunk ends a chunked body");
    let mut out = Vec::with_capacity(data.len() + 12);
    push_chunk_start(&mut out, data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(CHUNK_END);
    Bytes::from(out)
}

/// What ends every HTTP/1.1 chunk, after its data.
pub const CHUNK_END: &[u8] = b"\r\n";

/// The chunk that ends a chunked HTTP/1.1 body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The `date` header value of an HTTP response now, formatted once per second per thread.
pub fn http_date() -> [u8; 29] {
    use std::{
        cell::RefCell,
        time::{SystemTime, UNIX_EPOCH},
    };
    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            let text = httpdate::fmt_http_date(now);
            cached.1.copy_from_slice(&text.as_bytes()[..29]);
            cached.0 = second;
        }
        cached.1
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_headers_use_the_shortest_length_form() {
        assert_eq!(&ws_frame(opcode::TEXT, b"hi")[..], b"\x81\x02hi");
        let (header, used) = ws_header(opcode::TEXT, 126);
        assert_eq!(&header[..used], &[0x81, 126, 0, 126]);
        let (header, used) = ws_header(opcode::BINARY, 65_535);
        assert_eq!(&header[..used], &[0x82, 126, 0xFF, 0xFF]);
        let (header, used) = ws_header(opcode::TEXT, 65_536);
        assert_eq!(&header[..used], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(&ws_close_frame(1001, "bye")[..], b"\x88\x05\x03\xe9bye");
        let long = "é".repeat(100);
        let close = ws_close_frame(1000, &long);
        assert_eq!(close[1] as usize, close.len() - 2);
        assert!(
            close.len() - 2 <= 125,
            "a control frame carries at most 125 bytes"
        );
        assert!(
            std::str::from_utf8(&close[4..]).is_ok(),
            "cut on a char boundary"
        );
    }

    #[test]
    fn chunks_and_sse_frames_are_framed_exactly() {
        assert_eq!(&chunk(b"abc")[..], b"3\r\nabc\r\n");
        assert_eq!(&chunk(&[b'x'; 300])[..5], b"12c\r\n");
        let frame = sse_frame(7, "note", b"{}");
        assert_eq!(&frame[..], b"id: 7\nevent: note\ndata: {}\n\n");
        assert_eq!(frame.len(), sse_frame_len(7, "note", b"{}"));
    }
}
