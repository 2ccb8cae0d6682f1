//! `GET /topics/{topic}/longpoll`: the poll answer, held until there is something to say.

use std::{
    io::IoSlice,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    extract::{Path, State},
    response::Response,
};
use bytes::Bytes;
use tokio::net::TcpStream;

use super::{
    Params,
    poll::{PollRequest, count_answer, encode_batch, encode_body, json_response},
};
use crate::{
    AppState,
    error::Error,
    gate::auth::Access,
    hub::{AnswerCache, ParkedPoll, Parking, Respond, Responded, Waited},
    message::{Message, MessageId, TransportKind, wire},
};

/// Answers at once when messages after `after` exist; otherwise parks until one arrives,
/// `timeout` seconds pass (then `200` with an empty list) or the server shuts down.
pub async fn longpoll(
    State(app): State<AppState>,
    access: Access,
    Path(topic): Path<String>,
    params: Params<'static>,
) -> Result<Response, Error> {
    Ok(json_response(answer(&app, &access, &topic, &params).await?))
}

/// The body of a long poll's answer, whichever server asked.
pub async fn answer(
    app: &AppState,
    access: &Access,
    topic: &str,
    params: &Params<'_>,
) -> Result<Vec<u8>, Error> {
    prepare(app, access, topic, params)?.answer(app).await
}

/// A long poll checked and admitted, ready to wait: all a parked long poll holds besides
/// its place in the topic's followers (the request it came from is gone by then).
#[derive(Debug)]
pub struct Prepared {
    request: PollRequest,
    timeout: std::time::Duration,
    /// Held for as long as the request is parked: bounds the parked long polls.
    _place: tokio::sync::OwnedSemaphorePermit,
}

/// Checks a long poll's topic, permission and parameters, and takes a place for it.
pub fn prepare(
    app: &AppState,
    access: &Access,
    topic: &str,
    params: &Params<'_>,
) -> Result<Prepared, Error> {
    let request = PollRequest::parse(topic, params, &app.transports.poll)?;
    access.check_subscribe(&request.topic)?;
    let timeout = params.timeout(&app.transports.poll)?;
    let place = app
        .parked_longpolls
        .clone()
        .try_acquire_owned()
        .map_err(|_| Error::AtCapacity("too many parked long polls"))?;
    Ok(Prepared {
        request,
        timeout,
        _place: place,
    })
}

impl Prepared {
    /// Waits as long as the long poll asks (answering at once when there is news), and
    /// returns the answer's body.
    pub async fn answer(self, app: &AppState) -> Result<Vec<u8>, Error> {
        let request = &self.request;
        let waited = app
            .hub
            .wait_or_answer(
                &request.topic,
                request.after,
                request.limit,
                self.timeout,
                &request.client,
                &app.shutdown,
                None,
            )
            .await?;
        match waited {
            Waited::Batch(batch) => Ok(encode_batch(app, TransportKind::Longpoll, &batch)),
            Waited::Answered => unreachable!("no responder was given"),
        }
    }

    /// The first step of a long poll served on its own connection: answered at once, or
    /// parked ([`Waiting`]), letting the fan-out answer through `direct` when messages come.
    pub async fn park(
        self,
        app: &AppState,
        direct: Option<Arc<DirectAnswer>>,
    ) -> Result<Parked, Error> {
        let Prepared {
            request,
            timeout,
            _place: place,
        } = self;
        // With a responder the place goes with it, to be freed as soon as either answers.
        let place = match &direct {
            Some(direct) => {
                *direct.place.lock().unwrap_or_else(|e| e.into_inner()) = Some(place);
                None
            }
            None => Some(place),
        };
        let parking = app
            .hub
            .park(
                &request.topic,
                request.after,
                request.limit,
                &request.client,
                direct.map(|d| d as Arc<dyn Respond>),
                TransportKind::Longpoll,
            )
            .await?;
        Ok(match parking {
            Parking::Ready(batch) => Parked::Now(Answer::Body(encode_batch(
                app,
                TransportKind::Longpoll,
                &batch,
            ))),
            Parking::Answered => Parked::Now(Answer::Answered),
            Parking::Parked(parked) => Parked::Waiting(Waiting {
                parked,
                client: request.client,
                timeout,
                _place: place,
            }),
        })
    }
}

/// Where a long poll stands after [`Prepared::park`].
#[derive(Debug)]
pub enum Parked {
    /// Answered already, or to be answered now.
    Now(Answer),
    /// Parked: wait for [`Waiting::poll_news`] or [`Waiting::timeout`], then
    /// [`Waiting::finish`].
    Waiting(Waiting),
}

/// A parked long poll: all it holds while it waits.
#[derive(Debug)]
pub struct Waiting {
    parked: ParkedPoll,
    client: String,
    timeout: std::time::Duration,
    _place: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Waiting {
    /// How long the poll waits for news.
    pub fn timeout(&self) -> std::time::Duration {
        self.timeout
    }

    /// Ready once a message newer than the poll's cursor was published.
    pub fn poll_news(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.parked.poll_news(cx)
    }

    /// The answer, once woken, timed out or stopping.
    pub async fn finish(self, app: &AppState) -> Result<Answer, Error> {
        let Waiting { parked, client, .. } = self;
        Ok(match app.hub.unpark(parked, &client).await? {
            Waited::Batch(batch) => {
                Answer::Body(encode_batch(app, TransportKind::Longpoll, &batch))
            }
            Waited::Answered => Answer::Answered,
        })
    }
}

/// How a long poll was answered.
#[derive(Debug)]
pub enum Answer {
    /// With this body, still to be sent.
    Body(Vec<u8>),
    /// By its [`DirectAnswer`], from the fan-out.
    Answered,
}

/// Answers a long poll parked on a plain TCP socket from the fan-out: the writer that has the
/// new messages writes the whole response (the head the request's handler prepared, then the
/// length, the date and the body, shared by every poller answered alike) with one `writev`.
/// The poller's task is not woken: its connection's next request is what wakes it.
pub struct DirectAnswer {
    app: AppState,
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
    pub fn new(app: AppState, socket: Arc<TcpStream>, head: Vec<u8>) -> Arc<Self> {
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
        count_answer(&self.app, TransportKind::Longpoll, messages, body_len);
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
