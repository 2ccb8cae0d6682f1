//! pushhub: one hub, four ways to push each message to a browser.
//!
//! A publisher posts a message to a topic; the hub gives it the topic's next id and exposes it
//! at once through short polling, long polling, Server-Sent Events and WebSocket. All four
//! speak the same JSON envelope and resume from the same cursor (the message id), so a client
//! can switch transport mid-stream and lose nothing.
//!
//! # How a message flows
//!
//! 1. A transport parses the request ([`transport`]) and calls [`App::publish`], which
//!    checks the server is not stopping and calls [`hub::Hub::publish`].
//! 2. The hub asks the topic's log ([`store::TopicLog`]) to append it. The log assigns the
//!    id and keeps bounded history; [`message::Message`] frames it once per wire format
//!    (envelope, WebSocket frame, SSE event and chunk), here.
//! 3. The hub hands the shared `Arc<Message>` to the fan-out writer of each worker that has
//!    subscribers of the topic: the publisher never waits for a subscriber. (With Redis, the
//!    message comes back through the node's subscription instead, for every node alike.)
//! 4. Each writer walks the topic's subscribers on its worker ([`hub::Outlet`]) and writes
//!    the shared bytes straight to their sockets; only a subscriber whose socket would block
//!    gets a queue and its own task woken. A subscriber that sees an id gap, or whose queue
//!    overflows, reads what it missed from the log by cursor. Parked long polls are answered
//!    by the same walk; pollers read the log directly ([`hub::Hub::poll`],
//!    [`hub::Hub::park`]).
//!
//! # Layout
//!
//! - [`config`]: every tunable, with flags, environment variables and defaults.
//! - [`message`]: envelope, names, ids, encodings.
//! - [`hub`]: topics, publish, subscribe from a cursor, subscriber counts; no HTTP.
//! - [`store`]: where history lives, behind the [`store::Store`] trait.
//! - [`transport`]: `publish`, `poll`, `longpoll`, `sse`, `ws`: thin adapters over the hub.
//! - [`web`]: the embedded demo page.
//! - [`error`]: the one error type, answered as `{"error", "code"}`.
//! - [`gate`]: reads each request head and serves streams, long polls and simple requests
//!   on the raw socket; hands the rest to hyper.
//! - [`server`]: workers and the accept loop: connection limits, TLS, graceful stop.
//! - [`auth`], [`origin`], [`limits`]: who may do what, from where, how often.
//! - [`telemetry`]: `GET /metrics` in the Prometheus format.
//! - [`bench`]: `pushhub bench`, the load benchmark of each transport.
//!
//! # Where history lives
//!
//! Three [`store::Store`]s sit behind the same trait: in memory (the default), on disk
//! (`--data-dir`, [`store::DiskStore`]: an embedded fjall database whose single writer
//! thread acknowledges a publish only after `fdatasync`), and in Redis (`--redis`,
//! [`store::RedisStore`]: ids from a Lua script, so several nodes share topics). A log that
//! learns of messages from other nodes delivers them itself, through
//! [`store::TopicLog::follow`], into the same live ring step 3 fills; from there on, nothing
//! differs, and the transports never know which store runs.
//!
//! # Production concerns, and where they sit
//!
//! Everything a public deployment needs is in front of the hub, never inside it: the accept
//! loop refuses connections over the limits before parsing anything; a token is verified once
//! per request and checked per topic by the transports before they call the hub; long-lived
//! streams carry their token's expiry and the stop signal in their `select!`. The hub stays
//! free of HTTP and of policy, so its hot path (publish, fan-out) is what the benchmarks
//! measure.

pub mod auth;
pub mod bench;
pub mod config;
pub mod error;
pub mod gate;
pub mod hub;
pub mod limits;
pub mod message;
pub mod origin;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod web;

use std::{future::Future, sync::Arc};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, Path, State},
    routing::get,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::{
    request_id::{PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};

use auth::{Access, Auth};
pub use config::Config;
pub use error::Error;
use hub::{Hub, HubSettings, TopicInfo};
use limits::{ConnectionLimits, RateLimiter};
use origin::OriginPolicy;
use server::StartError;
use store::{DiskStore, MemoryStore, RedisStore};

/// What every handler shares: one `Arc`, so that cloning it into each request, connection
/// and session is one reference count, and holding it costs a pointer.
#[derive(Clone)]
pub struct AppState(Arc<App>);

impl std::ops::Deref for AppState {
    type Target = App;

    fn deref(&self) -> &App {
        &self.0
    }
}

/// The state behind an [`AppState`].
pub struct App {
    /// The hub.
    pub hub: Arc<Hub>,
    /// The configuration the server runs with.
    pub config: Arc<Config>,
    /// Fired when the server stops: every long-lived response (long poll, SSE, WebSocket)
    /// selects on it and ends.
    pub shutdown: CancellationToken,
    /// Who may publish and subscribe where.
    pub auth: Arc<Auth>,
    /// Which browser origins may call the API and open WebSockets.
    pub origins: Arc<OriginPolicy>,
    /// Open connections, in total and per IP.
    pub connections: Arc<ConnectionLimits>,
    /// Publishes per second per client.
    pub publish_limiter: Arc<RateLimiter>,
    /// Places for parked long polls.
    pub parked_longpolls: Arc<tokio::sync::Semaphore>,
    /// Held (shared) by each publish while it appends; taken exclusively by a stream that is
    /// stopping, so that it drains only once every acknowledged publish is appended.
    publishing: Arc<tokio::sync::RwLock<()>>,
}

impl AppState {
    /// State for a server with the store its configuration names (memory, `--data-dir` or
    /// `--redis`). Fails on unusable auth settings or a store that cannot be opened.
    pub fn new(config: Config) -> Result<Self, StartError> {
        let store: Arc<dyn store::Store> = match &config.data_dir {
            Some(dir) => Arc::new(DiskStore::open(
                dir,
                config.retention(),
                config.fsync,
                config.fsync_window,
            )?),
            None => match &config.redis {
                Some(url) => Arc::new(RedisStore::open(url, config.retention())?),
                None => Arc::new(MemoryStore::new(config.retention())),
            },
        };
        let auth = Auth::new(
            config.jwt_secret.as_deref(),
            config.jwt_public_key.as_deref(),
            &config.public_topics,
        )?;
        telemetry::install();
        Ok(Self(Arc::new(App {
            hub: Hub::new(store, HubSettings::from(&config)),
            auth: Arc::new(auth),
            origins: Arc::new(OriginPolicy::new(&config.allowed_origins, config.listen)),
            connections: ConnectionLimits::new(
                config.max_connections,
                config.max_connections_per_ip,
            ),
            publish_limiter: Arc::new(RateLimiter::new(config.publish_rate)),
            parked_longpolls: Arc::new(tokio::sync::Semaphore::new(config.max_parked_longpolls)),
            config: Arc::new(config),
            shutdown: CancellationToken::new(),
            publishing: Arc::default(),
        })))
    }
}

impl App {
    /// Publishes, unless the server is stopping (503 `shutting_down`): a publish is either
    /// refused or appended before any stream drains for the stop, so an acknowledged message
    /// reaches every subscriber still connected.
    pub async fn publish(
        &self,
        topic: &message::TopicName,
        event: message::EventName,
        payload: &message::Payload,
    ) -> Result<Arc<message::Message>, Error> {
        let _appending = self.publishing.read().await;
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        self.hub.publish(topic, event, payload).await
    }

    /// Waits until every publish admitted before the stop has been appended.
    pub async fn publishes_settled(&self) {
        drop(self.publishing.write().await);
    }
}

/// The HTTP API and the demo page.
pub fn router(state: AppState) -> Router {
    let max_body = state.config.max_body;
    let config = state.config.clone();
    let mut router = web::routes()
        .route(
            "/healthz",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/stats", get(stats))
        .route("/metrics", get(metrics_text))
        .route(
            "/topics/{topic}",
            get(topic_info).post(transport::publish::publish),
        );
    // A transport switched off is simply not routed: its URLs answer 404 like any unknown
    // path, and a client library falls back to the next transport.
    if config.serves("poll") {
        router = router.route("/topics/{topic}/poll", get(transport::poll::poll));
    }
    if config.serves("longpoll") {
        router = router.route(
            "/topics/{topic}/longpoll",
            get(transport::longpoll::longpoll),
        );
    }
    if config.serves("sse") {
        router = router.route("/topics/{topic}/sse", get(transport::sse::sse));
    }
    if config.serves("ws") {
        router = router
            .route("/topics/{topic}/ws", get(transport::ws::topic_ws))
            .route("/ws", get(transport::ws::multiplexed_ws));
    }
    router
        .fallback(|| async { Error::NotFound })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(state.origins.cors_layer())
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(gate::response::RequestIds))
        .with_state(state)
}

/// The span of one request: its id, method and path, never the query (it may hold
/// `?token=`) nor the body.
fn request_span(request: &axum::http::Request<axum::body::Body>) -> tracing::Span {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!("request", id, method = %request.method(), path = %request.uri().path())
}

async fn metrics_text(State(app): State<AppState>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        telemetry::render(&app),
    )
}

async fn stats(State(app): State<AppState>) -> Json<hub::HubStats> {
    Json(app.hub.stats())
}

async fn topic_info(
    State(app): State<AppState>,
    access: Access,
    Path(topic): Path<String>,
) -> Result<Json<TopicInfo>, Error> {
    let topic = transport::topic(&topic)?;
    access.check_subscribe(&topic)?;
    Ok(Json(app.hub.info(&topic).await?))
}

/// Serves on `listener` until `shutdown` completes, then ends every stream and waits at most
/// `config.shutdown_grace` for connections to finish.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let state = AppState::new(config)?;
    serve(listener, state, shutdown).await
}

/// Like [`run`], with state built by the caller (tests use it to reach the hub).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let tls = match (&state.config.tls_cert, &state.config.tls_key) {
        (Some(cert), Some(key)) => Some(server::tls_acceptor(cert, key)?),
        _ => None,
    };
    let stop = state.shutdown.clone();
    tokio::spawn(
        state
            .hub
            .clone()
            .run_sweeper(state.config.sweep_interval, stop.clone()),
    );
    let app = router(state.clone());
    let stopping = {
        let state = state.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                () = state.shutdown.cancelled() => {}
            }
            // Long polls and idle connections end on this; streams stop their heartbeats,
            // and once every publish admitted before the stop is appended, write what they
            // have not been sent and end. The accept loop then waits for them.
            state.shutdown.cancel();
            state.hub.stop_timers();
            tokio::spawn(async move {
                state.publishes_settled().await;
                state.hub.drain();
            });
        }
    };
    server::serve_workers(listener, app, &state, tls, stopping).await
}
