//! What the middleboxes see of HTTP/1.1: where each response ends (a `buffering-proxy` holds a
//! response until it has 8 KiB of it or its end) and which requests ask for an upgrade (a
//! `no-websocket` proxy refuses them). Only the framing is read: heads with `httparse`, bodies
//! by `Content-Length`, chunked framing, or the connection's end; after a `101` the
//! connection is a tunnel and nothing more is read.

/// What a `no-websocket` proxy answers an upgrade request, before closing the connection.
pub(super) const UPGRADE_REFUSED: &[u8] = b"HTTP/1.1 403 Forbidden\r\n\
content-type: text/plain\r\n\
content-length: 45\r\n\
connection: close\r\n\
\r\n\
This proxy does not allow WebSocket upgrades.";

/// Holds a server's responses until `limit` bytes of them are buffered or they end.
#[derive(Debug)]
pub(super) struct ResponseHold {
    limit: usize,
    held: Vec<u8>,
    /// How much of `held` the framing has been read through.
    parsed: usize,
    state: Response,
}

/// Where the reader is in the current response.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Response {
    /// Before the end of its head.
    Head,
    /// This many body bytes to go.
    Body(u64),
    /// In a chunked body.
    Chunked(Chunk),
    /// The body ends with the connection.
    UntilClose,
    /// Upgraded (or unreadable): everything passes at once.
    Tunnel,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// This many data bytes to go.
    Data(u64),
    /// The CRLF after a chunk's data, this many bytes of it to go.
    DataEnd(u8),
    /// Trailer lines, up to the empty one.
    Trailer,
}

impl ResponseHold {
    pub(super) fn new(limit: usize) -> ResponseHold {
        ResponseHold {
            limit,
            held: Vec::new(),
            parsed: 0,
            state: Response::Head,
        }
    }

    /// Takes bytes from the server; returns those the proxy lets go now.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        if self.state == Response::Tunnel && self.held.is_empty() {
            return bytes.to_vec();
        }
        self.held.extend_from_slice(bytes);
        // Everything up to the end of the last complete response may go.
        let mut release = 0;
        while let Some(progress) = self.step() {
            if progress == Step::Ended {
                release = self.parsed;
            }
        }
        if self.state == Response::Tunnel {
            release = self.held.len();
        } else if self.held.len() >= self.limit {
            // A full buffer goes, but only as far as the framing was read: a partial
            // chunk-size line or head stays, so the next bytes are read from where it ends.
            release = release.max(self.parsed);
        }
        self.parsed = self.parsed.saturating_sub(release);
        self.held.drain(..release).collect()
    }

    /// The connection ended: what is held goes.
    pub(super) fn finish(&mut self) -> Vec<u8> {
        self.parsed = 0;
        std::mem::take(&mut self.held)
    }

    /// Reads the framing one step further; `None` when it needs more bytes.
    fn step(&mut self) -> Option<Step> {
        let rest = &self.held[self.parsed..];
        match self.state {
            Response::Tunnel => None,
            Response::UntilClose => {
                self.parsed = self.held.len();
                None
            }
            Response::Head => {
                let end = rest.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut response = httparse::Response::new(&mut headers);
                let next = match response.parse(&rest[..end]) {
                    Ok(httparse::Status::Complete(_)) => body_of(&response),
                    _ => Response::Tunnel,
                };
                self.parsed += end;
                Some(self.enter(next))
            }
            Response::Body(left) => {
                let take = (rest.len() as u64).min(left);
                if take == 0 && left > 0 {
                    return None;
                }
                self.parsed += take as usize;
                Some(self.enter(Response::Body(left - take)))
            }
            Response::Chunked(chunk) => self.chunk_step(chunk),
        }
    }

    fn chunk_step(&mut self, chunk: Chunk) -> Option<Step> {
        let rest = &self.held[self.parsed..];
        let next = match chunk {
            Chunk::Size | Chunk::Trailer => {
                let line_end = rest.iter().position(|&b| b == b'\n')? + 1;
                let line = std::str::from_utf8(&rest[..line_end]).unwrap_or("");
                let line = line.trim_end_matches(['\r', '\n']);
                self.parsed += line_end;
                match chunk {
                    Chunk::Trailer if line.is_empty() => return Some(self.enter(Response::Head)),
                    Chunk::Trailer => Chunk::Trailer,
                    _ => {
                        let size = line.split(';').next().unwrap_or("").trim();
                        match u64::from_str_radix(size, 16) {
                            Ok(0) => Chunk::Trailer,
                            Ok(size) => Chunk::Data(size),
                            Err(_) => return Some(self.enter(Response::Tunnel)),
                        }
                    }
                }
            }
            Chunk::Data(left) => {
                let take = (rest.len() as u64).min(left);
                if take == 0 {
                    return None;
                }
                self.parsed += take as usize;
                if take == left {
                    Chunk::DataEnd(2)
                } else {
                    Chunk::Data(left - take)
                }
            }
            Chunk::DataEnd(left) => {
                let take = rest.len().min(left as usize);
                if take == 0 {
                    return None;
                }
                self.parsed += take;
                if take == left as usize {
                    Chunk::Size
                } else {
                    Chunk::DataEnd(left - take as u8)
                }
            }
        };
        Some(self.enter(Response::Chunked(next)))
    }

    /// Moves to `next`; a body of no bytes left is the response's end.
    fn enter(&mut self, next: Response) -> Step {
        match next {
            Response::Body(0) | Response::Head => {
                self.state = Response::Head;
                Step::Ended
            }
            next => {
                self.state = next;
                Step::Read
            }
        }
    }
}

#[derive(Debug, PartialEq)]
enum Step {
    /// Framing read, the response goes on.
    Read,
    /// A response ended.
    Ended,
}

/// How the body of `response` is framed.
fn body_of(response: &httparse::Response<'_, '_>) -> Response {
    let code = response.code.unwrap_or(0);
    if code == 101 {
        return Response::Tunnel;
    }
    if (100..200).contains(&code) {
        // An interim answer: the real head follows.
        return Response::Head;
    }
    if code == 204 || code == 304 {
        return Response::Body(0);
    }
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    if header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        return Response::Chunked(Chunk::Size);
    }
    match header("content-length").and_then(|v| v.trim().parse().ok()) {
        Some(length) => Response::Body(length),
        None => Response::UntilClose,
    }
}

/// Reads a client's request heads for upgrade requests (`no-websocket`). Each head is held
/// until it is complete, then let go or refused.
#[derive(Debug, Default)]
pub(super) struct UpgradeGuard {
    buf: Vec<u8>,
    /// Body bytes of the current request still to pass.
    body_left: u64,
    /// The requests can no longer be framed (a chunked body): everything passes.
    blind: bool,
}

/// What to do with a client's bytes.
#[derive(Debug, PartialEq)]
pub(super) enum Verdict {
    /// Send these on to the server.
    Forward(Vec<u8>),
    /// Answer [`UPGRADE_REFUSED`] and close.
    Refuse,
}

impl UpgradeGuard {
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Verdict {
        if self.blind {
            return Verdict::Forward(bytes.to_vec());
        }
        self.buf.extend_from_slice(bytes);
        let mut forward = 0;
        loop {
            let rest = &self.buf[forward..];
            if self.body_left > 0 {
                let take = (rest.len() as u64).min(self.body_left);
                if take == 0 {
                    break;
                }
                self.body_left -= take;
                forward += take as usize;
                continue;
            }
            let Some(end) = rest
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|p| p + 4)
            else {
                break;
            };
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut request = httparse::Request::new(&mut headers);
            if !matches!(
                request.parse(&rest[..end]),
                Ok(httparse::Status::Complete(_))
            ) {
                self.blind = true;
                forward = self.buf.len();
                break;
            }
            let value = |name: &str| {
                request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
            };
            if value("upgrade").is_some_and(|v| v.contains("websocket")) {
                return Verdict::Refuse;
            }
            if value("transfer-encoding").is_some() {
                self.blind = true;
                forward = self.buf.len();
                break;
            }
            self.body_left = value("content-length")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            forward += end;
        }
        Verdict::Forward(self.buf.drain(..forward).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns what went out after each piece.
    fn hold(input: &[u8], step: usize, limit: usize) -> Vec<Vec<u8>> {
        let mut hold = ResponseHold::new(limit);
        input.chunks(step).map(|piece| hold.feed(piece)).collect()
    }

    #[test]
    fn complete_responses_go_at_their_end_and_open_ones_wait_for_the_limit() {
        let poll = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        for step in [1, 3, poll.len()] {
            let out = hold(poll, step, 8192);
            // Nothing goes before the last byte; then all of it.
            assert!(out[..out.len() - 1].iter().all(Vec::is_empty), "{step}");
            assert_eq!(out.last().unwrap(), poll);
        }
        let chunked =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        for step in [1, 7, chunked.len()] {
            let out = hold(chunked, step, 8192);
            assert_eq!(out.concat(), chunked);
            assert!(!out.last().unwrap().is_empty(), "{step}");
            assert!(out[..out.len() - 1].iter().all(Vec::is_empty), "{step}");
        }
        // An SSE stream that never ends: held until 8 KiB have come.
        let mut hold = ResponseHold::new(8192);
        assert!(
            hold.feed(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
                .is_empty()
        );
        let event = b"id: 1\ndata: {\"x\":1}\n\n";
        let mut sent = 0;
        let mut fed = 0;
        while sent == 0 {
            sent = hold.feed(event).len();
            fed += 1;
        }
        assert!(sent >= 8192, "{sent}");
        assert_eq!(fed, (8192 - 51) / event.len() + 1);
        assert_eq!(hold.finish(), b"");
    }

    #[test]
    fn a_full_buffer_goes_without_losing_its_place_in_the_chunk_framing() {
        // A chunked stream whose 8 KiB mark falls inside a chunk-size line: the held bytes go
        // up to that line, the framing goes on from it, and the stream stays held (not a
        // tunnel) afterwards.
        let mut hold = ResponseHold::new(64);
        let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        let chunk = |n: usize| {
            let mut c = format!("{n:x}\r\n").into_bytes();
            c.extend(std::iter::repeat_n(b'x', n));
            c.extend_from_slice(b"\r\n");
            c
        };
        let mut input = head.to_vec();
        input.extend(chunk(31));
        input.extend(chunk(31));
        // Cut inside the next size line ("1f"): the "1" arrives now, the "f" later.
        input.extend_from_slice(b"1");
        let out = hold.feed(&input);
        assert_eq!(out, &input[..input.len() - 1]);
        let mut rest = b"f\r\n".to_vec();
        rest.extend(std::iter::repeat_n(b'x', 31));
        rest.extend_from_slice(b"\r\n");
        // Not yet 64 bytes held: held, not tunnelled.
        assert!(hold.feed(&rest).is_empty());
        assert_eq!(hold.state, Response::Chunked(Chunk::Size));
        assert_eq!(hold.feed(b"0\r\n\r\n").len(), 1 + rest.len() + 5);
    }

    #[test]
    fn an_upgrade_is_a_tunnel_and_interim_answers_are_skipped() {
        let mut hold = ResponseHold::new(8192);
        let upgrade = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n\x81\x02hi";
        assert_eq!(hold.feed(upgrade), upgrade);
        assert_eq!(hold.feed(b"\x81\x01a"), b"\x81\x01a");
        // Two keep-alive answers in one read: both go; a third, half read, waits.
        let mut hold = ResponseHold::new(8192);
        let done = b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let third = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf there";
        let (early, late) = third.split_at(third.len() - 7);
        assert_eq!(hold.feed(&[&done[..], early].concat()), done);
        assert_eq!(hold.feed(late), third);
    }

    #[test]
    fn upgrade_requests_are_refused_and_others_pass_whole() {
        let mut guard = UpgradeGuard::default();
        let get = b"GET /topics/a/poll HTTP/1.1\r\nhost: x\r\n\r\n";
        assert_eq!(guard.feed(&get[..10]), Verdict::Forward(vec![]));
        assert_eq!(guard.feed(&get[10..]), Verdict::Forward(get.to_vec()));
        let post = b"POST /topics/a HTTP/1.1\r\ncontent-length: 4\r\n\r\n{}\r\n";
        assert_eq!(guard.feed(post), Verdict::Forward(post.to_vec()));
        let upgrade =
            b"GET /topics/a/ws HTTP/1.1\r\nconnection: Upgrade\r\nupgrade: WebSocket\r\n\r\n";
        assert_eq!(guard.feed(upgrade), Verdict::Refuse);
    }
}
