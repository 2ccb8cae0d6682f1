//! The answer the fan-out writes itself to a long poll parked on a plain TCP socket.

use std::{
    io::IoSlice,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::{
    hub::{AnswerCache, Respond, Responded},
    message::{Message, MessageId, TransportKind, wire},
    transport::{TransportState, poll::encode_body},
};

/// Answers a long poll parked on a plain TCP socket from the fan-out: the writer that has the
/// new messages writes the whole response (the head the request's handler prepared, then the
/// length, the date and the body, shared by every poller answered alike) with one `writev`.
/// The poller's task is not woken: its connection's next request is what wakes it.
pub struct DirectAnswer {
    app: TransportState,
    socket: Arc<TcpStream>,
    /// The response head up to its `content-length` (status line, type, caching, request id,
    /// CORS), from the request.
    head: Bytes,
    /// What the socket did not take, for the task to write.
    rest: Mutex<Vec<Bytes>>,
    /// The task must answer itself (and so be woken): the client pipelined its next request,
    /// whose arrival would otherwise have woken the task.
    held: AtomicBool,
    /// The poll's place among the parked long polls, freed as soon as it is answered.
    place: Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
}

impl std::fmt::Debug for DirectAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectAnswer").finish_non_exhaustive()
    }
}

impl DirectAnswer {
    /// Answers on `socket` with responses that begin with `head`.
    pub fn new(app: TransportState, socket: Arc<TcpStream>, head: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            app,
            socket,
            head: Bytes::from(head),
            rest: Mutex::new(Vec::new()),
            held: AtomicBool::new(false),
            place: Mutex::new(None),
        })
    }

    /// From now on, leaves the answer to the poller's task.
    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    /// Holds the poll's place among the parked long polls until either answers.
    pub fn keep_place(&self, place: tokio::sync::OwnedSemaphorePermit) {
        *self.place.lock().unwrap_or_else(|e| e.into_inner()) = Some(place);
    }

    /// Frees the poll's place among the parked long polls (it was answered).
    pub fn release_place(&self) {
        drop(self.place.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// What is left to write of a begun answer.
    pub fn take_rest(&self) -> Vec<Bytes> {
        std::mem::take(&mut *self.rest.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Respond for DirectAnswer {
    fn respond(
        &self,
        messages: &[Arc<Message>],
        newest: MessageId,
        cache: &mut AnswerCache,
    ) -> Responded {
        let (Some(first), Some(last)) = (messages.first(), messages.last()) else {
            return Responded::No;
        };
        if self.held.load(Ordering::SeqCst) {
            return Responded::No;
        }
        // As the poller's own answer says: `last_id` the topic's newest, `more` when the
        // limit left newer messages out.
        let more = newest > last.id;
        let tail = cache.get_or_encode(first.id - 1, messages.len(), newest, || {
            // The rest of the head, then the body, in one allocation: shared by every
            // poller that gets this answer.
            const ROOM: usize = 80;
            let mut body = encode_body(messages, newest, last.id, more, None, ROOM);
            let mut head = Vec::with_capacity(ROOM);
            head.extend_from_slice(b"content-length: ");
            head.extend_from_slice(itoa::Buffer::new().format(body.len() - ROOM).as_bytes());
            head.extend_from_slice(b"\r\ndate: ");
            head.extend_from_slice(&wire::http_date());
            head.extend_from_slice(b"\r\n\r\n");
            let start = ROOM - head.len();
            body[start..ROOM].copy_from_slice(&head);
            Bytes::from(body).slice(start..)
        });
        let parts = [IoSlice::new(&self.head), IoSlice::new(&tail)];
        let written = match self.socket.try_write_vectored(&parts) {
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(_) => return Responded::No,
        };
        let body_len = tail.len() - tail.iter().position(|&b| b == b'{').unwrap_or(0);
        self.app
            .count_answer(TransportKind::Longpoll, messages, body_len);
        let total = self.head.len() + tail.len();
        self.app
            .hub
            .record_heads(TransportKind::Longpoll, total - body_len);
        if written == total {
            // Answered: its place goes back now, not when its task next runs.
            self.release_place();
            return Responded::Written;
        }
        crate::telemetry::blocked_write();
        let mut rest = self.rest.lock().unwrap_or_else(|e| e.into_inner());
        if written < self.head.len() {
            rest.push(self.head.slice(written..));
            rest.push(tail);
        } else {
            rest.push(tail.slice(written - self.head.len()..));
        }
        Responded::Begun
    }
}
