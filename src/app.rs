//! The application: the state every handler shares ([`AppState`]: the configuration, the
//! transports' state, the connection limits, the link lanes), and the router with the small handlers (`/healthz`, `/stats`,
//! `/metrics`, `/topics/{t}`). It builds each layer from the configuration and wires them;
//! the transports it routes to sit below it, the gate and `main` above.

use std::sync::Arc;

use axum::http::{HeaderValue, header};
use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, FromRef, Path, State},
    routing::get,
};
use tokio_util::sync::CancellationToken;
use tower_http::{
    request_id::{PropagateRequestIdLayer, SetRequestIdLayer},
    set_header::SetResponseHeaderLayer,
    trace::TraceLayer,
};

use crate::{
    access::{Access, Auth, OriginPolicy, RateLimiter},
    config::Config,
    error::Error,
    gate::{
        Gate,
        limits::{Capacity, ConnectionLimits},
        server::StartError,
    },
    hub::{self, Hub, TopicInfo},
    link::Lanes,
    message::{self, TransportKind},
    store::{self, DiskStore, MemoryStore, RedisStore},
    telemetry,
    transport::{self, TransportParts, TransportState},
    web,
};

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
    /// The configuration the server runs with (the gate's limits and timeouts, the store's).
    pub config: Arc<Config>,
    /// What the transports share, and so the whole server: the hub, the stop signal (every
    /// long-lived response selects on it and ends), who may publish and subscribe where, which
    /// browser origins may call the API and open WebSockets.
    pub transport: TransportState,
    /// Open connections, in total and per IP.
    pub connections: Arc<ConnectionLimits>,
    /// How many connections the node takes: `--max-connections` within the open-file limit.
    pub capacity: Capacity,
    /// The emulated links clients reach through `<link>.localhost` (`--link-hosts`).
    pub lanes: Option<Arc<Lanes>>,
}

impl AppState {
    /// State for a server with the store its configuration names (memory, `--data-dir` or
    /// `--redis`). Fails on unusable auth settings or a store that cannot be opened.
    pub fn new(config: Config) -> Result<Self, StartError> {
        let store = open_store(&config)?;
        let auth = Arc::new(Auth::new(
            config.jwt_secret.as_deref(),
            config.jwt_public_key.as_deref(),
            &config.public_topics,
        )?);
        telemetry::install();
        let capacity = Capacity::of_process(config.max_connections, config.file_reserve);
        if capacity.file_limited() {
            tracing::warn!(
                max_connections = capacity.configured,
                open_file_limit = capacity.open_file_limit,
                file_reserve = capacity.file_reserve,
                "--max-connections is above what the open-file limit leaves: taking at most {} \
                 connections (the limit less --file-reserve); raise the open-file limit \
                 (`ulimit -n`, systemd's LimitNOFILE=) to take more",
                capacity.max
            );
        }
        let hub = Hub::new(store, config.hub_settings());
        let shutdown = CancellationToken::new();
        let origins = Arc::new(OriginPolicy::new(&config.allowed_origins, config.listen));
        let transport = TransportState::new(TransportParts {
            hub: hub.clone(),
            settings: config.transport_settings(),
            shutdown: shutdown.clone(),
            auth: auth.clone(),
            origins: origins.clone(),
            publish_limiter: Arc::new(RateLimiter::new(config.publish_rate)),
            max_parked_longpolls: config.max_parked_longpolls,
        });
        Ok(Self(Arc::new(App {
            transport,
            connections: ConnectionLimits::for_capacity(&capacity, config.max_connections_per_ip),
            capacity,
            lanes: config.serves_link_hosts().then(|| Arc::new(Lanes::new())),
            config: Arc::new(config),
        })))
    }

    /// What the gate runs with: its settings, the transports, the connection limits, the
    /// emulated links and this app's router.
    pub fn gate(&self) -> Gate {
        Gate {
            settings: self.config.gate_settings(),
            transports: self.transport.clone(),
            connections: self.connections.clone(),
            lanes: self.lanes.clone(),
            router: router(self.clone()),
        }
    }
}

/// The store the configuration names: `--data-dir`, else `--redis`, else memory.
fn open_store(config: &Config) -> Result<Arc<dyn store::Store>, StartError> {
    Ok(match &config.data_dir {
        Some(dir) => Arc::new(DiskStore::open(
            dir,
            config.retention(),
            config.fsync,
            config.fsync_window,
        )?),
        None => match &config.redis {
            Some(_) => Arc::new(RedisStore::connect(
                &config.redis_options().expect("--redis is set"),
                config.retention(),
            )?),
            None => Arc::new(MemoryStore::new(config.retention())),
        },
    })
}

impl App {
    /// Publishes, unless the server is stopping (503 `shutting_down`): the transports' one
    /// publish rule ([`transport::Transports::publish`]).
    pub async fn publish(
        &self,
        topic: &message::TopicName,
        event: message::EventName,
        payload: &message::Payload,
    ) -> Result<Arc<message::Message>, Error> {
        self.transport.publish(topic, event, payload).await
    }
}

/// The transports' handlers take only their own state.
impl FromRef<AppState> for TransportState {
    fn from_ref(app: &AppState) -> Self {
        app.transport.clone()
    }
}

/// The token policy, for the [`Access`] extractor.
impl FromRef<AppState> for Arc<Auth> {
    fn from_ref(app: &AppState) -> Self {
        app.transport.auth.clone()
    }
}

/// The origin policy, for the WebSocket `Origin` extractor.
impl FromRef<AppState> for Arc<OriginPolicy> {
    fn from_ref(app: &AppState) -> Self {
        app.transport.origins.clone()
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
        .route("/links", get(links))
        .route("/metrics", get(metrics_text))
        .route(
            "/topics/{topic}",
            get(topic_info).post(transport::publish::publish),
        )
        .route("/topics/{topic}/presence", get(presence));
    // A transport switched off is simply not routed: its URLs answer 404 like any unknown
    // path, and a client library falls back to the next transport.
    for kind in config.transports.iter().copied() {
        let path = format!("/topics/{{topic}}/{kind}");
        router = match kind {
            TransportKind::Poll => router.route(&path, get(transport::poll::poll)),
            TransportKind::Longpoll => router.route(&path, get(transport::longpoll::longpoll)),
            TransportKind::Sse => router.route(&path, get(transport::sse::sse)),
            TransportKind::Stream => router.route(&path, get(transport::ndjson::stream)),
            TransportKind::Ws => router
                .route(&path, get(transport::ws::topic_ws))
                .route("/ws", get(transport::ws::multiplexed_ws)),
            // Served under `--ds-path` below; `--transports` never lists them.
            TransportKind::DsSse | TransportKind::DsLongpoll => router,
        };
    }
    let mut router = router
        .fallback(|| async { Error::NotFound })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(state.transport.origins.cors_layer());
    if let Some(path) = config.durable_path() {
        // Its own CORS (the protocol's methods and headers) and the headers the protocol
        // puts on every answer, errors included.
        let streams = transport::durable::routes(path)
            .layer(transport::durable::cors_layer(&state.transport.origins))
            .layer(SetResponseHeaderLayer::overriding(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ))
            .layer(SetResponseHeaderLayer::if_not_present(
                header::HeaderName::from_static("cross-origin-resource-policy"),
                HeaderValue::from_static("cross-origin"),
            ));
        router = router.merge(streams);
    }
    router
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(
            transport::response::RequestIds,
        ))
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

/// `GET /metrics`: the hub's counters copied into the recorder, then everything rendered.
async fn metrics_text(State(app): State<AppState>) -> impl axum::response::IntoResponse {
    let stats = app.transport.hub.stats();
    metrics::gauge!("pushhub_topics").set(stats.topics as f64);
    metrics::gauge!("pushhub_open_connections").set(app.connections.open() as f64);
    metrics::counter!("pushhub_publishes_total").absolute(stats.publishes);
    for transport in TransportKind::ALL {
        let name = transport.name();
        metrics::gauge!("pushhub_subscribers", "transport" => name)
            .set(stats.subscribers[transport] as f64);
        metrics::counter!("pushhub_deliveries_total", "transport" => name)
            .absolute(stats.deliveries[transport]);
        metrics::counter!("pushhub_sent_bytes_total", "transport" => name)
            .absolute(stats.bytes[transport]);
        metrics::counter!("pushhub_requests_total", "transport" => name)
            .absolute(stats.requests[transport]);
    }
    let text = telemetry::render();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

/// `GET /stats`: the hub's counters and subscriber totals, and the node's connections.
#[derive(serde::Serialize)]
struct Stats {
    #[serde(flatten)]
    hub: hub::HubStats,
    connections: Connections,
}

/// Open connections against the node's capacity.
#[derive(serde::Serialize)]
struct Connections {
    open: usize,
    #[serde(flatten)]
    capacity: Capacity,
}

async fn stats(State(app): State<AppState>) -> Json<Stats> {
    Json(Stats {
        hub: app.transport.hub.stats(),
        connections: Connections {
            open: app.connections.open(),
            capacity: app.capacity,
        },
    })
}

/// `GET /links`: the emulated links this server serves through `<link>.localhost` host names
/// (the lab's per-lane selectors), and what crossed them.
async fn links(State(app): State<AppState>) -> Json<serde_json::Value> {
    use crate::link::{Counters, Middleboxes, Profile};
    let profiles: Vec<serde_json::Value> = Profile::NAMES
        .iter()
        .filter_map(|name| Profile::named(name))
        .map(|p| {
            serde_json::json!({
                "name": p.name,
                "delay_ms": p.delay.as_secs_f64() * 1000.0,
                "jitter_ms": p.jitter.as_secs_f64() * 1000.0,
                "bandwidth_mbit": p.bandwidth_bps.map(|bps| bps as f64 / 1e6),
                "cuts": p.cuts.is_some(),
                "description": p.to_string(),
            })
        })
        .collect();
    let counters = app.lanes.as_ref().map(|lanes| {
        let c = lanes.counters();
        serde_json::json!({
            "connections": Counters::get(&c.connections),
            "refused": Counters::get(&c.refused),
            "cuts": Counters::get(&c.cuts),
            "idle_cuts": Counters::get(&c.idle_cuts),
            "upgrades_refused": Counters::get(&c.upgrades_refused),
            "bytes_up": Counters::get(&c.bytes_up),
            "bytes_down": Counters::get(&c.bytes_down),
        })
    });
    Json(serde_json::json!({
        "enabled": app.lanes.is_some(),
        "host": "{link}.localhost, middleboxes joined with --: 3g--buffering-proxy.localhost",
        "profiles": profiles,
        "middleboxes": Middleboxes::NAMES,
        "counters": counters,
    }))
}

async fn topic_info(
    State(app): State<AppState>,
    access: Access,
    Path(topic): Path<String>,
) -> Result<Json<TopicInfo>, Error> {
    let topic = transport::topic(&topic)?;
    access.check_subscribe(&topic)?;
    Ok(Json(app.transport.hub.info(&topic).await?))
}

/// Most members a presence list names when `limit` does not say.
const PRESENCE_LIMIT: usize = 1000;
/// Most members a presence list may be asked to name.
const MAX_PRESENCE_LIMIT: usize = 10_000;

/// `GET /topics/{topic}/presence`: the topic's named members on every node, oldest first, at
/// most `limit` (`count` says how many there are).
async fn presence(
    State(app): State<AppState>,
    access: Access,
    Path(topic): Path<String>,
    params: transport::Params<'static>,
) -> Result<Json<serde_json::Value>, Error> {
    let topic = transport::topic(&topic)?;
    access.check_subscribe(&topic)?;
    let limit = match params.get("limit") {
        None => PRESENCE_LIMIT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=MAX_PRESENCE_LIMIT).contains(limit))
            .ok_or_else(|| {
                Error::param(
                    "limit",
                    format!("must be between 1 and {MAX_PRESENCE_LIMIT}"),
                )
            })?,
    };
    let mut members = app.transport.hub.presence(&topic).await?;
    let count = members.len();
    members.truncate(limit);
    Ok(Json(serde_json::json!({
        "topic": topic,
        "count": count,
        "members": members,
    })))
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
