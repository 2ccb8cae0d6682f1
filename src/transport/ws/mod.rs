//! `GET /topics/{topic}/ws` and `GET /ws`: WebSocket, one topic or many per connection.
//!
//! Both endpoints run the same [`Session`]: the per-topic one starts subscribed to its topic
//! and publishes there by default; the multiplexed one starts with no subscription.
//!
//! Server frames: an envelope (a message, recognisable by having no `type`), or a control
//! object with a `type`: `ack`, `subscribed`, `unsubscribed`, `pong`, `error`, and the
//! cursor signals `truncated` and `reset`.
//!
//! pushhub speaks WebSocket itself ([`frame`] reads client frames, [`crate::message::wire`]
//! writes server frames): a message's frame is built once, when it is published, and the
//! fan-out writes those bytes to every socket. A client that stops reading is dropped after
//! `--ws-pong-timeout` without progress; until then the hub's policy (read the backlog from
//! history by cursor) bounds what it holds.

pub mod frame;
mod session;

use std::{net::IpAddr, sync::Arc};

use axum::{
    body::Body,
    extract::{Path, Request, State},
    http::{HeaderMap, StatusCode, header},
    response::Response,
};
use bytes::Bytes;
use tokio::net::TcpStream;

pub use session::{Session, close_frame};

use super::{
    Params, Then,
    call::{Call, Next as CallNext},
    io::Io,
    listed,
    response::{self, Length},
    stream,
};
use crate::{
    access::{Access, HeaderSource, origin::WebSocketOrigin},
    error::Error,
    hub::{Native, OutletGuard, Presenter},
    message::{TopicName, TransportKind, pattern::Selection},
    transport::TransportState,
};

/// Checks an upgrade request and returns its `Sec-WebSocket-Accept` value; anything that is
/// not a version-13 WebSocket handshake gets `426 Upgrade Required`.
pub fn accept_key(headers: &dyn HeaderSource) -> Result<String, Error> {
    let has = |name: &str, token: &str| {
        headers.header(name).is_some_and(|value| {
            value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    };
    let key = headers
        .header("sec-websocket-key")
        .filter(|key| !key.is_empty());
    match key {
        Some(key)
            if has("upgrade", "websocket")
                && has("connection", "upgrade")
                && headers.header("sec-websocket-version") == Some(b"13") =>
        {
            Ok(tungstenite::handshake::derive_accept_key(key))
        }
        _ => Err(Error::UpgradeRequired),
    }
}

/// The headers of the `101` answer, besides the per-request ones.
pub fn upgrade_headers(accept: &str) -> [(&'static str, String); 3] {
    [
        ("upgrade", "websocket".to_owned()),
        ("connection", "upgrade".to_owned()),
        ("sec-websocket-accept", accept.to_owned()),
    ]
}

/// A WebSocket request checked and answered: ready to run.
pub struct Opened {
    /// The connection's outlet (the `101` head is queued on it first).
    pub outlet: OutletGuard,
    /// The protocol state.
    pub session: Session,
    /// When the client's token expires.
    pub expires: Option<tokio::time::Instant>,
}

/// What a per-topic connection follows from the start, and where it starts.
#[derive(Debug)]
pub enum Home {
    /// One topic, from a message id (or now); `publish` goes there when it names none.
    One(TopicName, Option<crate::message::MessageId>),
    /// A topic list ([`listed`]); `publish` must name its topic.
    Listed(Selection, listed::Start),
}

/// Checks a handshake for `topic` (per-topic: a name or a list) or none (multiplexed), in
/// the order clients are answered: topic, permission, cursor, then the handshake itself (the
/// `Origin` was checked at admission, before). Returns the accept key, and what it follows.
pub fn check(
    app: &TransportState,
    access: &Access,
    topic: Option<&str>,
    params: &Params,
    headers: &dyn HeaderSource,
) -> Result<(String, Option<Home>, Presenter), Error> {
    let home = match topic {
        Some(list) if listed::is_list(list) => {
            let (selection, start) = listed::check(app, access, list, |limit| {
                listed::Start::from_params(params, limit)
            })?;
            Some(Home::Listed(selection, start))
        }
        Some(topic) => {
            let topic = super::topic(topic)?;
            access.check_subscribe(&topic)?;
            Some(Home::One(topic, params.after()?))
        }
        None => None,
    };
    let presenter = params.presenter(access)?;
    Ok((accept_key(headers)?, home, presenter))
}

/// What a checked handshake opens a session with.
#[derive(Debug)]
pub struct Start {
    /// The caller's verdict, kept for the session's life.
    pub access: Access,
    /// The topic a per-topic connection follows, and its cursor.
    pub home: Option<Home>,
    /// The client's address (per-client publish limits).
    pub peer: Option<IpAddr>,
    /// The plain TCP socket the fan-out may write to.
    pub socket: Option<Arc<TcpStream>>,
    /// The `101` answer, when this server writes it (raw path); empty otherwise.
    pub head: Bytes,
    /// Who the client says it is, for presence.
    pub presenter: Presenter,
}

/// Opens the session of a checked handshake: the outlet (with the `101` answer queued
/// first) and, on the per-topic endpoint, its subscription. Subscribing before the `101` is
/// sent means whatever is published once the client sees the handshake reaches it.
pub async fn open(app: &TransportState, start: Start) -> Result<Opened, Error> {
    let Start {
        access,
        home,
        peer,
        socket,
        head,
        presenter,
    } = start;
    let outlet = match &home {
        Some(Home::Listed(_, start)) => {
            app.hub
                .listed_outlet(socket, Native::Ws, listed::carried(start))
        }
        _ => app.hub.outlet(socket, Native::Ws),
    };
    outlet.present_as(presenter);
    if !head.is_empty() {
        outlet.push(head);
    }
    let expires = access.expires_at();
    let default_topic = match &home {
        Some(Home::One(topic, _)) => Some(topic.clone()),
        _ => None,
    };
    let session = Session::new(app.clone(), access, peer, default_topic);
    match home {
        Some(Home::One(topic, after)) => {
            app.hub.subscribe(&topic, after, &outlet).await?;
        }
        Some(Home::Listed(selection, start)) => {
            listed::open_listed(app, &selection, &start, &outlet).await?;
        }
        None => {}
    }
    app.hub.record_request(TransportKind::Ws);
    Ok(Opened {
        outlet,
        session,
        expires,
    })
}

/// A WebSocket call on the raw socket: checks the handshake, opens the session with the
/// `101` answer queued first, and hands it to the connection ([`run`]).
pub async fn serve(call: Call<'_>, io: &mut Io) -> CallNext {
    let topic = (!call.topic().is_empty()).then_some(call.topic());
    let checked = check(call.state, &call.access, topic, &call.params(), &call.head);
    let (accept, home, presenter) = match checked {
        Ok(checked) => checked,
        Err(error) => return call.refuse(io, &error).await,
    };
    let headers = upgrade_headers(&accept);
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let switching = response::head(
        StatusCode::SWITCHING_PROTOCOLS,
        &headers,
        &call.meta,
        Length::None,
    );
    let switching_len = switching.len();
    let session = Start {
        access: call.access.clone(),
        home,
        peer: Some(call.peer.ip()),
        socket: io.shared_socket(),
        head: Bytes::from(switching),
        presenter,
    };
    match open(call.state, session).await {
        Ok(opened) => {
            call.heads(switching_len);
            CallNext::Then(Box::new(Then::Ws(Running {
                opened,
                input: call.head.into_rest(),
            })))
        }
        // The store cannot serve the subscribe yet (Redis is down): complete the handshake
        // and close with 1013 (try again later), which a client can act on; a refused
        // handshake is only a failure to a browser.
        Err(error) if error.is_store_unavailable() => {
            error.report(None);
            let mut answer = response::head(
                StatusCode::SWITCHING_PROTOCOLS,
                &headers,
                &call.meta,
                Length::None,
            );
            answer.extend_from_slice(&frame::close_for(&error));
            call.heads(answer.len());
            call.answer_and_close(io, answer).await
        }
        Err(error) => {
            let answer = response::error(&error, &call.meta);
            call.heads(answer.len());
            call.answer_and_close(io, answer).await
        }
    }
}

/// An opened session on the raw socket, with the bytes the client sent after its handshake:
/// all such a connection holds while it lasts.
#[derive(Debug)]
pub struct Running {
    /// The session.
    pub opened: Opened,
    /// Bytes the client already sent.
    pub input: Vec<u8>,
}

/// Runs an opened session over `io` until it ends, then closes with the code its end calls
/// for; the connection closes after it.
pub async fn run(app: &TransportState, running: Running, io: &mut Io) -> CallNext {
    let Running {
        opened: Opened {
            outlet,
            mut session,
            expires,
        },
        mut input,
    } = running;
    let settings = stream::Settings {
        // A peer that stops reading stalls our writes; one that vanished answers no ping.
        // Either is cut off after this long, and its resources freed.
        stall: app.settings.stream.ws_pong_timeout,
        read_chunk: app.settings.stream.ws_read_buffer,
    };
    // Bytes that arrived with the handshake are handled first.
    let early = if input.is_empty() {
        Ok(())
    } else {
        use stream::Peer as _;
        super::boxed(|| session.on_input(&mut input, &outlet)).await
    };
    let finish = match early {
        Err(finish) => finish,
        Ok(()) => {
            let driver = stream::Driver::new(expires, None);
            stream::run(io, &outlet, &mut session, &settings, driver, &mut input).await
        }
    };
    super::boxed(|| close(io, &outlet, finish, settings.stall)).await;
    CallNext::Close
}

/// Ends a session: its close frame (the one `finish` calls for, or the answer to the
/// client's), after whatever is queued before it, then the end of the stream.
async fn close(
    io: &mut Io,
    outlet: &OutletGuard,
    finish: stream::Finish,
    stall: std::time::Duration,
) {
    let frame = close_frame(finish);
    let closing = frame.is_some() || finish == stream::Finish::Closed;
    if let Some(frame) = frame {
        outlet.push_last(frame);
    }
    if closing {
        let _ = stream::write_pending(io, outlet, stall).await;
    }
    let _ = io.shutdown().await;
}

/// `GET /topics/{topic}/ws` through axum (a connection hyper serves).
pub async fn topic_ws(
    State(app): State<TransportState>,
    access: Access,
    _: WebSocketOrigin,
    Path(topic): Path<String>,
    params: Params<'static>,
    request: Request,
) -> Result<Response, Error> {
    upgrade(app, access, Some(&topic), params, request).await
}

/// `GET /ws` through axum.
pub async fn multiplexed_ws(
    State(app): State<TransportState>,
    access: Access,
    _: WebSocketOrigin,
    params: Params<'static>,
    request: Request,
) -> Result<Response, Error> {
    upgrade(app, access, None, params, request).await
}

/// Answers `101` and runs the session on the connection hyper hands over. A plain TCP
/// connection is taken back from hyper whole, so the fan-out writes to it directly.
async fn upgrade(
    app: TransportState,
    access: Access,
    topic: Option<&str>,
    params: Params<'static>,
    mut request: Request,
) -> Result<Response, Error> {
    let headers: &HeaderMap = request.headers();
    let (accept, home, presenter) = check(&app, &access, topic, &params, headers)?;
    let on_upgrade = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or(Error::UpgradeRequired)?;
    // The session starts once hyper hands the connection over, after the `101`; a client
    // following from now starts from the newest id as of now, so whatever is published once
    // it sees the handshake complete reaches it.
    // A store that cannot say where "now" is (Redis is down) does not refuse the handshake:
    // the session closes with 1013 (try again later) instead, which a client can act on.
    let home = match home {
        Some(Home::One(topic, None)) => match app.hub.last_id(&topic).await.map_err(Error::from) {
            Ok(now) => Ok(Some(Home::One(topic, Some(now)))),
            Err(error) if error.is_store_unavailable() => Err(error),
            Err(error) => return Err(error),
        },
        Some(Home::Listed(selection, listed::Start::Now)) => {
            match listed::now(&app, &selection).await {
                Ok(now) => Ok(Some(Home::Listed(selection, now))),
                Err(error) if error.is_store_unavailable() => Err(error),
                Err(error) => return Err(error),
            }
        }
        home => Ok(home),
    };
    let peer = params.peer_ip();
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let (mut io, input) = super::io::reclaim(upgraded);
        let socket = io.shared_socket();
        let opened = match home {
            Ok(home) => {
                let start = Start {
                    access,
                    home,
                    peer,
                    socket,
                    head: Bytes::new(),
                    presenter,
                };
                open(&app, start).await
            }
            Err(error) => Err(error),
        };
        match opened {
            Ok(opened) => {
                run(&app, Running { opened, input }, &mut io).await;
            }
            Err(error) => {
                tracing::warn!(%error, "WebSocket session could not start");
                let _ = io.write_all(&frame::close_for(&error)).await;
            }
        }
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for (name, value) in upgrade_headers(&accept) {
        if let Ok(value) = header::HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(header::HeaderName::from_static(name), value);
        }
    }
    Ok(response)
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}
