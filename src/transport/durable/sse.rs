//! The SSE framing Durable Streams specifies, written by hand because the suite reads it
//! byte for byte: `event: data` then one `data:` line (no space after the colon) per line of
//! the payload, split on every kind of line break so that a payload cannot end its event or
//! forge one; `event: control` with a flat one-line JSON object; binary payloads in standard
//! padded base64.

use super::offset::Offset;
use crate::{hub::Format, transport::body::Framing};

/// How a live SSE read frames its body: chunks on the raw socket, so that a client may send
/// its next request on the same connection once a closed stream's read ends. Its headers
/// depend on the stream (the data encoding), so the framing lists none.
pub static FRAMING: Framing = Framing {
    headers: &[],
    raw: Format::DsSseChunked,
    body: Format::DsSse,
    // Never sent (a live read has no token expiry); comments, which SSE parsers skip.
    expired: b": token expired\n\n",
    unavailable: b": message store unavailable; come back with your offset\n\n",
    // Never sent: a live read follows one stream.
    too_many_topics: b": too many topics\n\n",
    answers_unavailable: false,
};

/// Appends a `data` event carrying `payload`.
pub fn data_event(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(b"event: data\n");
    let mut rest = payload;
    loop {
        let end = rest.iter().position(|&b| b == b'\n' || b == b'\r');
        let line = &rest[..end.unwrap_or(rest.len())];
        out.extend_from_slice(b"data:");
        out.extend_from_slice(line);
        out.push(b'\n');
        let Some(end) = end else { break };
        // `\r\n` is one break.
        let skip = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
    }
    out.push(b'\n');
}

/// Where a reader stands, for a `control` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control<'a> {
    /// The stream is open: the next offset, the cursor, and whether the reader is at the
    /// tail.
    Open {
        /// Where the next read starts.
        next: Offset,
        /// The `Stream-Cursor` value (decimal) that keeps caches apart.
        cursor: &'a str,
        /// The reader has everything up to the tail.
        up_to_date: bool,
    },
    /// The stream is closed and the reader has everything: the last event of the response.
    Closed {
        /// The stream's final offset.
        next: Offset,
    },
}

/// Appends a `control` event.
pub fn control_event(out: &mut Vec<u8>, control: &Control<'_>) {
    out.extend_from_slice(b"event: control\ndata:");
    let text = match control {
        Control::Open {
            next,
            cursor,
            up_to_date,
        } => {
            let up = if *up_to_date {
                r#","upToDate":true"#
            } else {
                ""
            };
            format!(r#"{{"streamNextOffset":"{next}","streamCursor":"{cursor}"{up}}}"#)
        }
        Control::Closed { next } => {
            format!(r#"{{"streamNextOffset":"{next}","streamClosed":true}}"#)
        }
    };
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// Decodes standard padded base64 (as [`base64`] writes it); `None` on anything else.
pub fn unbase64(text: &[u8]) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    }
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for (index, quad) in text.chunks(4).enumerate() {
        let last = index == text.len() / 4 - 1;
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        out.push((n >> 16) as u8);
        if pad < 2 {
            out.push((n >> 8) as u8);
        }
        if pad < 1 {
            out.push(n as u8);
        }
    }
    Some(out)
}

/// Standard base64 with padding, as a binary stream's SSE data is sent.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn base64_round_trips_and_refuses_what_it_did_not_write() {
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            assert_eq!(unbase64(base64(&bytes).as_bytes()), Some(bytes));
        }
        assert_eq!(base64(b"Hello"), "SGVsbG8=");
        for bad in ["SGVsbG8", "SGV=bG8=", "S===", "SGVs!G8="] {
            assert_eq!(unbase64(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn data_lines_split_on_every_line_break_and_cannot_forge_an_event() {
        assert_eq!(
            text(|o| data_event(o, b"line1\nline2")),
            "event: data\ndata:line1\ndata:line2\n\n"
        );
        assert_eq!(
            text(|o| data_event(o, b"a\r\nb\rc\n")),
            "event: data\ndata:a\ndata:b\ndata:c\ndata:\n\n"
        );
        let forged = text(|o| data_event(o, b"x\n\nevent: control\ndata: {}"));
        assert_eq!(
            forged,
            "event: data\ndata:x\ndata:\ndata:event: control\ndata:data: {}\n\n"
        );
        // No line of the event starts a new field: every line is a `data:` line.
        assert!(
            forged
                .lines()
                .skip(1)
                .filter(|l| !l.is_empty())
                .all(|l| l.starts_with("data:"))
        );
    }

    #[test]
    fn control_events_are_flat_one_line_objects() {
        let next = Offset(12);
        assert_eq!(
            text(|o| control_event(
                o,
                &Control::Open {
                    next,
                    cursor: "12345",
                    up_to_date: true
                }
            )),
            "event: control\ndata:{\"streamNextOffset\":\"0000000000000000_0000000000000012\",\"streamCursor\":\"12345\",\"upToDate\":true}\n\n"
        );
        assert_eq!(
            text(|o| control_event(o, &Control::Closed { next })),
            "event: control\ndata:{\"streamNextOffset\":\"0000000000000000_0000000000000012\",\"streamClosed\":true}\n\n"
        );
    }

    #[test]
    fn base64_is_standard_and_padded() {
        assert_eq!(base64(b"Hello"), "SGVsbG8=");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(&[0, 255, 254, 253]), "AP/+/Q==");
    }
}
