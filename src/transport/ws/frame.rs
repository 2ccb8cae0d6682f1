//! WebSocket frames from clients (RFC 6455 §5), parsed from a byte buffer.
//!
//! This is the only code that reads what WebSocket clients send, so it is strict and bounded:
//! every client frame must be masked, reserved bits must be clear (no extension is
//! negotiated), control frames must be short and unfragmented, a message may not exceed
//! `--ws-max-message` (checked from the declared length, before the payload is read), and a
//! text message must be UTF-8. Each violation has its close code. Property tests feed it
//! arbitrary bytes (`tests/parsers.rs`), and `fuzz/` has a coverage-guided target.

use crate::message::wire::opcode;

/// Close codes the server sends (RFC 6455 §7.4.1), plus pushhub's own.
pub mod close_code {
    /// The server is going away (shutting down).
    pub const AWAY: u16 = 1001;
    /// The client broke the protocol.
    pub const PROTOCOL: u16 = 1002;
    /// A text message was not UTF-8.
    pub const INVALID: u16 = 1007;
    /// A message was larger than the server accepts.
    pub const SIZE: u16 = 1009;
    /// Try again later: the client fell too far behind.
    pub const AGAIN: u16 = 1013;
    /// Policy violation: a pattern picked up more topics than a connection may follow.
    pub const POLICY: u16 = 1008;
    /// The client's token expired (application range 4000-4999).
    pub const TOKEN_EXPIRED: u16 = 4001;
}

/// The close frame for a session that cannot start (the store is away): try again later.
pub fn close_for(error: &crate::error::Error) -> bytes::Bytes {
    crate::message::wire::ws_close_frame(close_code::AGAIN, error.code())
}

/// A complete message or control frame from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A text message (UTF-8 checked).
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A ping, to be answered with a pong carrying the same payload.
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// The client starts the closing handshake, with its code and reason if it gave them.
    Close(Option<(u16, String)>),
}

/// Why the client's bytes end the connection: the close code to send and a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    /// The close code.
    pub code: u16,
    /// A short reason, sent in the close frame.
    pub reason: &'static str,
}

const fn violation(code: u16, reason: &'static str) -> Violation {
    Violation { code, reason }
}

/// Reads client frames and reassembles fragmented messages.
#[derive(Debug)]
pub struct FrameReader {
    max_message: usize,
    /// The opcode and the payload so far of a fragmented message (boxed: every idle
    /// connection holds this field, few ever receive a fragmented message).
    fragments: Option<Box<(u8, Vec<u8>)>>,
}

impl FrameReader {
    /// A reader that refuses messages over `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            fragments: None,
        }
    }

    /// Whether a fragmented message is partly received (its bytes are held here).
    pub fn in_message(&self) -> bool {
        self.fragments.is_some()
    }

    /// Parses the next frame at the start of `buf`. `Ok(None)`: more bytes are needed.
    /// `Ok(Some((n, event)))`: the first `n` bytes were one frame, and `event` is `None` when
    /// that frame did not complete a message.
    #[allow(clippy::type_complexity)]
    pub fn next(&mut self, buf: &[u8]) -> Result<Option<(usize, Option<Event>)>, Violation> {
        let Some(header) = Header::parse(buf)? else {
            return Ok(None);
        };
        let is_control = header.opcode >= opcode::CLOSE;
        if !is_control {
            let so_far = self.fragments.as_ref().map_or(0, |f| f.1.len());
            if header.len > (self.max_message - so_far.min(self.max_message)) as u64 {
                return Err(violation(close_code::SIZE, "message too large"));
            }
            match (header.opcode, &self.fragments) {
                (opcode::CONTINUATION, None) => {
                    return Err(violation(close_code::PROTOCOL, "continuation of nothing"));
                }
                (opcode::TEXT | opcode::BINARY, Some(_)) => {
                    return Err(violation(
                        close_code::PROTOCOL,
                        "new message inside a fragmented one",
                    ));
                }
                _ => {}
            }
        }
        let len = header.len as usize;
        let total = header.size + len;
        if buf.len() < total {
            return Ok(None);
        }
        let mut payload = buf[header.size..total].to_vec();
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= header.mask[i & 3];
        }
        let event = match header.opcode {
            opcode::PING => Some(Event::Ping(payload)),
            opcode::PONG => Some(Event::Pong),
            opcode::CLOSE => Some(close_event(&payload)?),
            opcode::CONTINUATION => {
                let fragments = self.fragments.as_mut().expect("checked above");
                fragments.1.extend_from_slice(&payload);
                if header.fin {
                    let (kind, data) = *self.fragments.take().expect("checked above");
                    Some(message(kind, data)?)
                } else {
                    None
                }
            }
            kind if header.fin => Some(message(kind, payload)?),
            kind => {
                self.fragments = Some(Box::new((kind, payload)));
                None
            }
        };
        Ok(Some((total, event)))
    }
}

fn message(kind: u8, data: Vec<u8>) -> Result<Event, Violation> {
    if kind == opcode::TEXT {
        String::from_utf8(data)
            .map(Event::Text)
            .map_err(|_| violation(close_code::INVALID, "invalid UTF-8 in text frame"))
    } else {
        Ok(Event::Binary(data))
    }
}

fn close_event(payload: &[u8]) -> Result<Event, Violation> {
    match payload {
        [] => Ok(Event::Close(None)),
        [_] => Err(violation(close_code::PROTOCOL, "one-byte close payload")),
        [high, low, reason @ ..] => {
            let code = u16::from_be_bytes([*high, *low]);
            // Codes a peer may send (RFC 6455 §7.4): not 1004-1006, 1015 or below 1000.
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(violation(close_code::PROTOCOL, "invalid close code"));
            }
            let reason = std::str::from_utf8(reason)
                .map_err(|_| violation(close_code::INVALID, "invalid UTF-8 in close reason"))?;
            Ok(Event::Close(Some((code, reason.to_owned()))))
        }
    }
}

/// A frame header.
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    len: u64,
    /// Bytes of the header, mask included.
    size: usize,
}

impl Header {
    fn parse(buf: &[u8]) -> Result<Option<Self>, Violation> {
        let [first, second, ..] = *buf else {
            return Ok(None);
        };
        if first & 0x70 != 0 {
            return Err(violation(close_code::PROTOCOL, "reserved bits set"));
        }
        let fin = first & 0x80 != 0;
        let opcode = first & 0x0F;
        if !matches!(
            opcode,
            opcode::CONTINUATION
                | opcode::TEXT
                | opcode::BINARY
                | opcode::CLOSE
                | opcode::PING
                | opcode::PONG
        ) {
            return Err(violation(close_code::PROTOCOL, "unknown opcode"));
        }
        if second & 0x80 == 0 {
            return Err(violation(
                close_code::PROTOCOL,
                "client frames must be masked",
            ));
        }
        let (len, at) = match second & 0x7F {
            126 => match buf.get(2..4) {
                Some(bytes) => (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(bytes) => {
                    let len = u64::from_be_bytes(bytes.try_into().expect("eight bytes"));
                    if len >> 63 != 0 {
                        return Err(violation(close_code::PROTOCOL, "length out of range"));
                    }
                    (len, 10)
                }
                None => return Ok(None),
            },
            short => (u64::from(short), 2),
        };
        if opcode >= opcode::CLOSE && (!fin || len > 125) {
            return Err(violation(
                close_code::PROTOCOL,
                "control frames must be short and whole",
            ));
        }
        let Some(mask) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        Ok(Some(Self {
            fin,
            opcode,
            mask: mask.try_into().expect("four bytes"),
            len,
            size: at + 4,
        }))
    }
}

/// Encodes a client frame (masked), for tests of the reader.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut frame = vec![(if fin { 0x80 } else { 0 }) | opcode];
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len @ 126..=65_535 => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(reader: &mut FrameReader, mut buf: &[u8]) -> Result<Vec<Event>, Violation> {
        let mut events = Vec::new();
        while let Some((used, event)) = reader.next(buf)? {
            events.extend(event);
            buf = &buf[used..];
        }
        assert!(buf.is_empty(), "{} bytes left over", buf.len());
        Ok(events)
    }

    const MASK: [u8; 4] = [1, 2, 3, 4];

    #[test]
    fn fragments_are_reassembled_and_controls_may_come_between() {
        let mut bytes = client_frame(false, opcode::TEXT, b"hel", MASK);
        bytes.extend(client_frame(true, opcode::PING, b"p", MASK));
        bytes.extend(client_frame(true, opcode::CONTINUATION, b"lo", MASK));
        bytes.extend(client_frame(true, opcode::CLOSE, b"\x03\xe8bye", MASK));
        let events = read_all(&mut FrameReader::new(100), &bytes).unwrap();
        assert_eq!(
            events,
            [
                Event::Ping(b"p".to_vec()),
                Event::Text("hello".into()),
                Event::Close(Some((1000, "bye".into())))
            ]
        );
    }

    #[test]
    fn each_violation_has_its_close_code() {
        let cases: [(Vec<u8>, u16); 8] = [
            (client_frame(true, opcode::CONTINUATION, b"x", MASK), 1002),
            (vec![0x81, 0x01, b'x'], 1002),       // unmasked
            (vec![0xC1, 0x80, 0, 0, 0, 0], 1002), // reserved bit
            (client_frame(true, 0x3, b"", MASK), 1002),
            (client_frame(false, opcode::PING, b"", MASK), 1002),
            (client_frame(true, opcode::TEXT, &[0xFF, 0xFE], MASK), 1007),
            (client_frame(true, opcode::TEXT, &[b'a'; 101], MASK), 1009),
            (client_frame(true, opcode::CLOSE, &[0x03, 0xEE], MASK), 1002), // 1006
        ];
        for (bytes, code) in cases {
            let error = read_all(&mut FrameReader::new(100), &bytes).unwrap_err();
            assert_eq!(error.code, code, "{bytes:?}");
        }
        // The size is refused from the header alone, before the payload arrives.
        let mut reader = FrameReader::new(100);
        let frame = client_frame(true, opcode::BINARY, &[0; 70_000], MASK);
        assert_eq!(reader.next(&frame[..14]).unwrap_err().code, 1009);
        // Fragments count towards the limit together.
        let mut bytes = client_frame(false, opcode::TEXT, &[b'a'; 60], MASK);
        bytes.extend(client_frame(true, opcode::CONTINUATION, &[b'a'; 60], MASK));
        let error = read_all(&mut FrameReader::new(100), &bytes).unwrap_err();
        assert_eq!(error.code, 1009);
    }

    #[test]
    fn a_frame_split_anywhere_waits_for_the_rest() {
        let frame = client_frame(true, opcode::TEXT, &[b'z'; 300], MASK);
        let mut reader = FrameReader::new(1000);
        for cut in 0..frame.len() {
            assert_eq!(reader.next(&frame[..cut]).unwrap(), None, "cut at {cut}");
        }
        let (used, event) = reader.next(&frame).unwrap().unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(event, Some(Event::Text("z".repeat(300))));
    }
}
