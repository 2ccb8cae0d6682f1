//! `pushhub sub TOPIC[,TOPIC|PATTERN...]`: one envelope per line on stdout, from any
//! transport, reconnecting by itself from its cursor (the last id printed; for a topic
//! list, the list's cursor string, kept as the server documents it). When it ends (stdout
//! closed, as by `| head`, or Ctrl-C) it prints on stderr the `--after` that resumes it.

use std::io::Write as _;

use futures::StreamExt;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage, client::IntoClientRequest};

use super::{ClientError, SubArgs};
use crate::{
    bench::http::{Items, RETRY_FIRST, RETRY_MOST, sse_event},
    message::{
        TransportKind,
        cursor::{Cursor, Tracker},
        pattern::Selection,
    },
};

/// Why one connection ended.
enum Ended {
    /// Nothing more is wanted: stdout is closed.
    Done,
    /// The connection was lost (or never made): connect again.
    Lost(String),
}

/// Where `sub` resumes.
enum Resume {
    /// One topic: the newest id printed (or the `--after` given); `None`: from now.
    One(Option<u64>),
    /// A topic list: its cursor, once known (`--after`, the stream's first cursor, a poll's
    /// `next_after`); `None`: from now.
    List {
        list: Selection,
        tracker: Option<Tracker>,
    },
}

impl Resume {
    /// From the topic argument and `--after`.
    fn new(topic: &str, after: Option<&str>) -> Result<Self, ClientError> {
        let bad = |what: String| {
            ClientError::Failed(format!("--after {}: {what}", after.unwrap_or_default()))
        };
        if !crate::transport::listed::is_list(topic) {
            let after = after
                .map(|text| text.parse::<u64>().map_err(|_| bad("a message id".into())))
                .transpose()?;
            return Ok(Resume::One(after));
        }
        let list = Selection::parse(topic, usize::MAX)
            .map_err(|e| ClientError::Failed(format!("{topic}: {e}")))?;
        let tracker = match after {
            None => None,
            // An empty cursor reads every topic from its start, as `after=0` does.
            Some("0") => Some(Tracker::new(list.clone(), Cursor::default())),
            Some(text) => Some(Tracker::new(
                list.clone(),
                Cursor::decode(text, usize::MAX / 32).map_err(|e| bad(e.to_string()))?,
            )),
        };
        Ok(Resume::List { list, tracker })
    }

    /// Takes a cursor string the server gave (an SSE id, a poll's `next_after`, a
    /// stream's opening cursor).
    fn adopt(&mut self, text: &str) {
        match self {
            Resume::One(last) => *last = text.parse().ok().or(*last),
            Resume::List { list, tracker } => {
                if let Ok(cursor) = Cursor::decode(text, usize::MAX / 32) {
                    *tracker = Some(Tracker::new(list.clone(), cursor));
                }
            }
        }
    }

    /// `topic` now stands at `id`.
    fn saw(&mut self, topic: &str, id: u64) {
        match self {
            Resume::One(last) => *last = Some(id),
            Resume::List { tracker, .. } => {
                if let Some(tracker) = tracker {
                    tracker.saw(topic, id);
                }
            }
        }
    }

    /// The cursor as `--after` takes it; `None`: nothing known yet.
    fn text(&self) -> Option<String> {
        match self {
            Resume::One(last) => last.map(|id| id.to_string()),
            Resume::List { tracker, .. } => tracker.as_ref().map(|t| t.cursor().encode()),
        }
    }
}

/// What `sub` has printed: where it resumes.
struct Printed {
    resume: Resume,
    /// Envelopes still wanted (`--count`).
    left: Option<u64>,
    /// The presence parameters every request carries (`client=`, `presence=1`).
    presence: String,
}

impl Printed {
    /// Prints one item (an envelope or a signal, as JSON) and moves the cursor past it;
    /// `false` once stdout is closed or `--count` envelopes are printed.
    fn item(&mut self, json: &[u8]) -> bool {
        if self.left == Some(0) {
            return false;
        }
        let mut envelope = false;
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) {
            let topic = value["topic"].as_str().unwrap_or_default();
            match value["type"].as_str() {
                // The NDJSON stream's heartbeat: nothing to print.
                Some("keepalive") => return true,
                // A topic list's stream opens with its cursor: bookkeeping, not printed.
                Some("cursor") => {
                    self.resume
                        .adopt(value["cursor"].as_str().unwrap_or_default());
                    return true;
                }
                // Ids started again: everything from the new topic's start is next.
                Some("reset") => self.resume.saw(topic, 0),
                Some("truncated") => {
                    let oldest = value["oldest_id"].as_u64().unwrap_or(1);
                    self.resume.saw(topic, oldest.saturating_sub(1));
                }
                Some(_) => {}
                None => {
                    envelope = true;
                    if let Some(id) = value["id"].as_u64() {
                        self.resume.saw(topic, id);
                    }
                }
            }
        }
        let mut stdout = std::io::stdout().lock();
        let written = stdout.write_all(json).is_ok()
            && stdout.write_all(b"\n").is_ok()
            && stdout.flush().is_ok();
        if envelope && let Some(left) = &mut self.left {
            *left -= 1;
        }
        written && self.left != Some(0)
    }

    /// `?after=N` (or a list's cursor), or nothing (from now).
    fn query(&self) -> String {
        let after = self
            .resume
            .text()
            .map_or_else(String::new, |after| format!("after={after}"));
        match (after.is_empty(), self.presence.is_empty()) {
            (_, true) => after,
            (true, false) => self.presence.clone(),
            (false, false) => format!("{after}&{}", self.presence),
        }
    }
}

/// `client=NAME&presence=1`, as `--client` and `--presence` ask.
fn presence_query(args: &SubArgs) -> String {
    let mut query = Vec::new();
    if let Some(client) = &args.client {
        query.push(format!("client={client}"));
    }
    if args.presence {
        query.push("presence=1".to_owned());
    }
    query.join("&")
}

/// Follows `args.topic` until stdout closes or Ctrl-C; a refusal ends it with the error.
pub async fn subscribe(args: SubArgs) -> Result<(), ClientError> {
    let mut printed = Printed {
        resume: Resume::new(&args.topic, args.after.as_deref())?,
        left: args.count,
        presence: presence_query(&args),
    };
    if args.count == Some(0) {
        return Ok(());
    }
    let mut retry = RETRY_FIRST;
    let outcome = loop {
        let before = printed.resume.text();
        let ended = tokio::select! {
            ended = connect(&args, &mut printed) => ended,
            _ = tokio::signal::ctrl_c() => Ok(Ended::Done),
            () = stdout_closed() => Ok(Ended::Done),
        };
        match ended {
            Ok(Ended::Done) => break Ok(()),
            Err(error) => break Err(error),
            Ok(Ended::Lost(reason)) => {
                if printed.resume.text() != before {
                    retry = RETRY_FIRST;
                }
                eprintln!("pushhub sub: {reason}; connecting again in {retry:?}");
                tokio::select! {
                    () = tokio::time::sleep(retry) => {}
                    _ = tokio::signal::ctrl_c() => break Ok(()),
                }
                retry = (retry * 2).min(RETRY_MOST);
            }
        }
    };
    if let Some(after) = printed.resume.text() {
        eprintln!("pushhub sub: resume with --after {after}");
    }
    outcome
}

/// Ends once nothing reads stdout any more (`| head` has what it wanted), so that a quiet
/// topic does not keep the pipeline waiting for a next message to fail writing. Looks
/// every 200 ms: a pipe whose reader is gone polls as an error.
async fn stdout_closed() {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let stdout = std::io::stdout();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut fds = [PollFd::new(&stdout, PollFlags::empty())];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        if poll(&mut fds, Some(&now)).is_ok()
            && fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP)
        {
            return;
        }
    }
}

/// One connection of `args.transport`, until it ends.
async fn connect(args: &SubArgs, printed: &mut Printed) -> Result<Ended, ClientError> {
    match args.transport {
        TransportKind::Ws => websocket(args, printed).await,
        TransportKind::Sse => stream(args, printed, "sse", b"\n\n").await,
        TransportKind::Stream => stream(args, printed, "stream", b"\n").await,
        _ => polling(args, printed).await,
    }
}

async fn websocket(args: &SubArgs, printed: &mut Printed) -> Result<Ended, ClientError> {
    let url = format!(
        "{}/topics/{}/ws?{}",
        args.server
            .url
            .trim_end_matches('/')
            .replacen("http", "ws", 1),
        args.topic,
        printed.query()
    );
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ClientError::Failed(format!("{url}: {e}")))?;
    if let Some(token) = &args.server.token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::Failed("the token is not a valid header value".into()))?;
        request.headers_mut().insert("authorization", value);
    }
    let mut socket = match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => socket,
        Err(tungstenite::Error::Http(response)) => {
            let body = response.body().clone().unwrap_or_default();
            return Err(ClientError::answered(response.status().as_u16(), &body));
        }
        Err(e) => return Ok(Ended::Lost(format!("WebSocket: {e}"))),
    };
    loop {
        match socket.next().await {
            Some(Ok(WsMessage::Text(text))) => {
                if !printed.item(text.as_bytes()) {
                    return Ok(Ended::Done);
                }
            }
            Some(Ok(WsMessage::Close(frame))) => {
                return Ok(Ended::Lost(format!("closed by the server: {frame:?}")));
            }
            None => return Ok(Ended::Lost("closed by the server".into())),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Ok(Ended::Lost(format!("WebSocket: {e}"))),
        }
    }
}

/// SSE or NDJSON: the bench's stream reader and item splitter.
async fn stream(
    args: &SubArgs,
    printed: &mut Printed,
    endpoint: &str,
    delimiter: &'static [u8],
) -> Result<Ended, ClientError> {
    let mut connection = args.server.connection();
    let path = format!("/topics/{}/{endpoint}?{}", args.topic, printed.query());
    let status = match connection.open_stream(&path, &[]).await {
        Ok(status) => status,
        Err(e) => return Ok(Ended::Lost(format!("{}: {e}", args.server.url))),
    };
    if status != 200 {
        // The refusal's body: a JSON error, read whole.
        let mut body = Vec::new();
        while let Ok(true) = connection.next_data(&mut body).await {}
        return Err(ClientError::answered(status, &body));
    }
    let mut items = Items::new(delimiter);
    loop {
        match items.read(&mut connection).await {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(Ended::Lost("the stream ended".into())),
            Err(e) => return Ok(Ended::Lost(format!("{endpoint}: {e}"))),
        }
        let mut open = true;
        items.drain(|item| {
            let json = if delimiter == b"\n\n" {
                // On a topic list each event's id is the list's cursor.
                if let Some(id) = sse_id(item).filter(|_| open) {
                    printed.resume.adopt(id);
                }
                sse_event(item).1
            } else {
                Some(item).filter(|line| !line.is_empty())
            };
            if let Some(json) = json.filter(|_| open) {
                open = printed.item(json);
            }
        });
        if !open {
            return Ok(Ended::Done);
        }
    }
}

/// Long polls (or polls every `--interval`), printing what each answer carries.
async fn polling(args: &SubArgs, printed: &mut Printed) -> Result<Ended, ClientError> {
    let mut connection = args.server.connection();
    let endpoint = if args.transport == TransportKind::Longpoll {
        "longpoll"
    } else {
        "poll"
    };
    loop {
        let path = format!("/topics/{}/{endpoint}?{}", args.topic, printed.query());
        let answer = match connection.get(&path).await {
            Ok(answer) => answer,
            Err(e) => return Ok(Ended::Lost(format!("{}: {e}", args.server.url))),
        };
        if answer.status != 200 {
            return Err(ClientError::answered(answer.status, &answer.body));
        }
        let answer: serde_json::Value = serde_json::from_slice(&answer.body)
            .map_err(|e| ClientError::Failed(format!("{endpoint} answer: {e}")))?;
        // A topic list's answer has each topic's signals under `topics`; one topic's at the
        // top.
        let single = serde_json::json!({ &args.topic: answer });
        let topics = answer["topics"].as_object().or(single.as_object());
        let signals = topics.into_iter().flatten().filter_map(|(topic, fields)| {
            if fields["reset"] == true {
                Some(serde_json::json!({"type": "reset", "topic": topic}))
            } else if fields["truncated"] == true {
                Some(serde_json::json!({"type": "truncated", "topic": topic, "oldest_id": fields["oldest_id"]}))
            } else {
                None
            }
        });
        let messages = answer["messages"].as_array().cloned().unwrap_or_default();
        for item in signals.collect::<Vec<_>>().iter().chain(&messages) {
            if !printed.item(item.to_string().as_bytes()) {
                return Ok(Ended::Done);
            }
        }
        match &answer["next_after"] {
            serde_json::Value::String(cursor) => printed.resume.adopt(cursor),
            next => printed.resume.adopt(&next.to_string()),
        }
        if endpoint == "poll" && answer["more"] != true {
            tokio::time::sleep(args.interval).await;
        }
    }
}

/// The `id:` field of an SSE block, if it has one.
fn sse_id(block: &[u8]) -> Option<&str> {
    block
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"id: "))
        .and_then(|id| std::str::from_utf8(id).ok())
}
