//! Every tunable of the server in one documented [`Config`], settable by flag, `PUSHHUB_*`
//! environment variable, or the configuration file ([`file`]). Limits a client or an operator can meet (sizes, timeouts, counts) are
//! here; what stays in code are internal batch and buffer sizes (a request head's first read,
//! how many queued frames one write takes), each named and explained where it is used.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;

pub mod file;

use crate::{
    gate::GateSettings,
    hub::{FanoutSettings, HubSettings, SlowConsumerPolicy},
    message::{PerTransport, TransportKind},
    store::{FsyncPolicy, RedisMode, RedisOptions, Retention},
    transport::settings::{
        ConnectionSettings, DurableSettings, PollSettings, PublishSettings, StreamSettings,
        TransportSettings,
    },
};

/// Server configuration. `Config::default()` is what `pushhub serve` runs with when given no
/// flags and no environment.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "PUSHHUB_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Transports served, comma-separated: any of `poll,longpoll,sse,ws,stream`. The others answer
    /// 404, e.g. to run behind a proxy that cannot carry WebSocket.
    #[arg(
        long,
        env = "PUSHHUB_TRANSPORTS",
        value_delimiter = ',',
        default_value = "poll,longpoll,sse,ws,stream",
        value_parser = parse_served_transport
    )]
    pub transports: Vec<TransportKind>,

    /// Messages of history kept per topic.
    #[arg(long, env = "PUSHHUB_HISTORY_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub history_size: u64,

    /// Age after which history is dropped (e.g. `90s`, `1h`); `off` (or `0`) keeps it until
    /// the count limit. In memory, an idle topic whose history is gone is forgotten and its ids
    /// restart at 1; with `--data-dir` or `--redis` the id counter is kept.
    #[arg(long, env = "PUSHHUB_HISTORY_MAX_AGE", default_value = "1h", value_parser = parse_age_limit)]
    pub history_max_age: Duration,

    /// Largest accepted publish body, in bytes.
    #[arg(long, env = "PUSHHUB_MAX_BODY", default_value_t = 64 * 1024)]
    pub max_body: usize,

    /// Long-poll hold time when the request names no `timeout`.
    #[arg(long, env = "PUSHHUB_LONGPOLL_TIMEOUT", default_value = "25s", value_parser = parse_duration)]
    pub longpoll_timeout: Duration,

    /// Largest `timeout` a long-poll request may ask for.
    #[arg(long, env = "PUSHHUB_LONGPOLL_MAX_TIMEOUT", default_value = "120s", value_parser = parse_duration)]
    pub longpoll_max_timeout: Duration,

    /// Interval of SSE comment heartbeats (`: keep-alive`).
    #[arg(long, env = "PUSHHUB_HEARTBEAT", default_value = "15s", value_parser = parse_duration)]
    pub heartbeat: Duration,

    /// Reconnect delay suggested to SSE clients with the `retry:` field.
    #[arg(long, env = "PUSHHUB_SSE_RETRY", default_value = "2s", value_parser = parse_duration)]
    pub sse_retry: Duration,

    /// Messages per poll or long-poll answer when the request names no `limit`.
    #[arg(long, env = "PUSHHUB_POLL_LIMIT", default_value_t = 100)]
    pub poll_limit: usize,

    /// Largest `limit` a poll or long-poll request may ask for.
    #[arg(long, env = "PUSHHUB_MAX_POLL_LIMIT", default_value_t = 1000)]
    pub max_poll_limit: usize,

    /// How many messages a live (SSE/WebSocket) subscriber may fall behind before it stops
    /// being fed live and reads its backlog from history by cursor instead. This bounds the
    /// memory a slow subscriber can pin, whatever the publish rate.
    #[arg(long, env = "PUSHHUB_SUBSCRIBER_QUEUE", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub subscriber_queue: u64,

    /// Messages read from history at once when a subscriber catches up.
    #[arg(long, env = "PUSHHUB_CATCH_UP_BATCH", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub catch_up_batch: u64,

    /// How often idle topics are looked for and dropped.
    #[arg(long, env = "PUSHHUB_SWEEP_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub sweep_interval: Duration,

    /// A short or long poller counts as a subscriber for this long after its last request.
    #[arg(long, env = "PUSHHUB_POLLER_WINDOW", default_value = "30s", value_parser = parse_duration)]
    pub poller_window: Duration,

    /// Largest WebSocket message a client may send, in bytes (frames over it close with 1009).
    #[arg(long, env = "PUSHHUB_WS_MAX_MESSAGE", default_value_t = 64 * 1024 + 1024)]
    pub ws_max_message: usize,

    /// Bytes read from a WebSocket client at once (at most 2048 on plain TCP). No read buffer
    /// is held while a connection is idle; a partly received message keeps what it has.
    #[arg(long, env = "PUSHHUB_WS_READ_BUFFER", default_value_t = 4 * 1024)]
    pub ws_read_buffer: usize,

    /// Accepted for compatibility, with no effect: WebSocket frames are written from each
    /// message's shared bytes, with no write buffer per connection.
    #[arg(long, env = "PUSHHUB_WS_WRITE_BUFFER", default_value_t = 8 * 1024, hide = true)]
    pub ws_write_buffer: usize,

    /// How long a fan-out writer waits, once woken by a publish, to gather more messages into
    /// each subscriber's write (`0`: write what is ready at once; several messages that are
    /// ready together still share a write). A few milliseconds trade that much latency for
    /// less CPU per delivery at high message rates. At most 1 s.
    #[arg(long, env = "PUSHHUB_WRITE_DELAY", default_value = "0", value_parser = parse_write_delay)]
    pub write_delay: Duration,

    /// HS256 secret that signs client tokens. With it (or `--jwt-public-key`), publishing
    /// needs a token, and so does subscribing outside `--public-topics`.
    #[arg(long, env = "PUSHHUB_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM public key (RSA for RS256, P-256 EC for ES256) that verifies client tokens.
    #[arg(long, env = "PUSHHUB_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// Topic patterns anyone may subscribe to without a token, comma-separated (`news.*`,
    /// `lobby`, `*`).
    #[arg(long, env = "PUSHHUB_PUBLIC_TOPICS", value_delimiter = ',')]
    pub public_topics: Vec<String>,

    /// Origins allowed for CORS and for WebSocket handshakes, comma-separated
    /// (`https://app.example.com`), or `*`. Empty: any origin while listening on a loopback
    /// address (the local demo), only same-origin pages otherwise.
    #[arg(long, env = "PUSHHUB_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Serve host names such as `3g.localhost` or `flaky--buffering-proxy.localhost` through
    /// an emulated link (the lab's per-lane link selector; see `pushhub bench --link`):
    /// `auto` does while listening on a loopback address, `on` always, `off` never.
    #[arg(long, env = "PUSHHUB_LINK_HOSTS", value_enum, default_value = "auto")]
    pub link_hosts: LinkHosts,

    /// Open connections at most (all transports); past it new connections get 503.
    #[arg(long, env = "PUSHHUB_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Open files kept back from connections, for the listener, the store, Redis and the
    /// answers that refuse connections over the limit: `--max-connections` is lowered to the
    /// open-file limit less this many, and said so at startup. Default: 100 and 1% of the limit.
    #[arg(long, env = "PUSHHUB_FILE_RESERVE")]
    pub file_reserve: Option<usize>,

    /// Connections the kernel queues until they are accepted (the listen backlog; Linux caps
    /// it at `net.core.somaxconn`). Clients reconnecting all at once wait here, instead of
    /// being dropped and retrying after a second.
    #[arg(long, env = "PUSHHUB_LISTEN_BACKLOG", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub listen_backlog: u32,

    /// Open connections per client IP at most (429); `0`: no per-IP limit. Behind a proxy
    /// every client shares its IP: leave it off there and limit at the proxy.
    #[arg(long, env = "PUSHHUB_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// Publishes per second per token subject (or per IP without a token), with bursts of
    /// as many; `0`: unlimited.
    #[arg(long, env = "PUSHHUB_PUBLISH_RATE", default_value_t = 0)]
    pub publish_rate: u32,

    /// Long polls parked at once at most; past it a long poll gets 503 with `Retry-After`.
    #[arg(long, env = "PUSHHUB_MAX_PARKED_LONGPOLLS", default_value_t = 50_000)]
    pub max_parked_longpolls: usize,

    /// Topics one connection may follow at once: a multiplexed WebSocket's subscriptions, or
    /// a request's topic list (`/topics/a,b,news.*/sse`) with the topics its patterns match.
    #[arg(
        long,
        env = "PUSHHUB_MAX_SUBSCRIPTIONS_PER_CONNECTION",
        default_value_t = 100
    )]
    pub max_subscriptions_per_connection: usize,

    /// Largest request head (request line and headers), in bytes; larger gets 431.
    #[arg(long, env = "PUSHHUB_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// Time a client gets to send a complete request head (slow-header attacks); also how
    /// long an idle keep-alive connection is held waiting for its next request.
    #[arg(long, env = "PUSHHUB_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// Interval of WebSocket pings.
    #[arg(long, env = "PUSHHUB_WS_PING_INTERVAL", default_value = "25s", value_parser = parse_duration)]
    pub ws_ping_interval: Duration,

    /// A WebSocket peer that sends nothing (not even a pong) for this long after a ping is
    /// closed and its resources freed.
    #[arg(long, env = "PUSHHUB_WS_PONG_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub ws_pong_timeout: Duration,

    /// A connection whose writes make no progress for this long is closed: a peer that
    /// stopped reading, or vanished without closing (SSE streams, long polls, WebSockets).
    #[arg(long, env = "PUSHHUB_STALL_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub stall_timeout: Duration,

    /// What happens to an SSE/WebSocket subscriber that falls `--subscriber-queue` messages
    /// behind: `resync` (read the backlog from history by cursor) or `disconnect` (WS close
    /// 1013, SSE stream ended; the client reconnects with its cursor).
    #[arg(
        long,
        env = "PUSHHUB_SLOW_CONSUMER",
        default_value = "resync",
        value_enum
    )]
    pub slow_consumer: SlowConsumerPolicy,

    /// PEM certificate chain: with `--tls-key`, serve HTTPS and WSS.
    #[arg(long, env = "PUSHHUB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "PUSHHUB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Keep history and id counters on disk in this directory (an embedded fjall database),
    /// so they survive restarts and crashes. Without it (and without `--redis`) history lives
    /// in memory.
    #[arg(long, env = "PUSHHUB_DATA_DIR", conflicts_with = "redis")]
    pub data_dir: Option<PathBuf>,

    /// With `--data-dir`: `batch` lets publishes that queue together share one `fdatasync`,
    /// `always` syncs each one alone. Either way `201` is sent only after the sync.
    #[arg(long, env = "PUSHHUB_FSYNC", value_enum, default_value = "batch")]
    pub fsync: FsyncPolicy,

    /// With `--fsync batch`: how long the writer waits after a group's first publish for more
    /// to join it (at most 100ms; `0` takes only what already queued).
    #[arg(long, env = "PUSHHUB_FSYNC_WINDOW", default_value = "0", value_parser = parse_fsync_window)]
    pub fsync_window: Duration,

    /// Share topics with every node on this Redis (`redis://host:port/db`): ids are assigned
    /// in Redis, history is kept there, and each node fans out what any node publishes. A
    /// Redis Cluster takes a comma-separated list of seed nodes
    /// (`redis://10.0.0.1:7000,redis://10.0.0.2:7000`).
    #[arg(long, env = "PUSHHUB_REDIS", hide_env_values = true)]
    pub redis: Option<String>,

    /// Whether `--redis` is one primary or a Redis Cluster: `auto` takes several seeds, or a
    /// seed that says `cluster_enabled:1`, as a cluster.
    #[arg(long, env = "PUSHHUB_REDIS_MODE", value_enum, default_value_t = RedisMode::Auto)]
    pub redis_mode: RedisMode,

    /// Answer a publish `201` only once this many replicas of its primary have it (Redis
    /// `WAIT`), so a failover cannot lose it; fewer within `--redis-replica-timeout` is a 503
    /// (the message may still be kept and delivered). Only the shard's full replica count
    /// protects against any single failover. 0: answer when the primary has it.
    #[arg(long, env = "PUSHHUB_REDIS_MIN_REPLICAS", default_value_t = 0)]
    pub redis_min_replicas: u32,

    /// How long a publish waits for `--redis-min-replicas` replicas (never 0).
    #[arg(long, env = "PUSHHUB_REDIS_REPLICA_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub redis_replica_timeout: Duration,

    /// This node's name in presence lists (`GET /topics/{t}/presence`): the host name and the
    /// listen port when not given (the process id when the port is 0).
    #[arg(long, env = "PUSHHUB_NODE_NAME", value_parser = parse_name)]
    pub node_name: Option<String>,

    /// How long open streams get to close after a shutdown signal before the process exits.
    #[arg(long, env = "PUSHHUB_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Worker threads of the runtime, and fan-out shards (one writer each); `0`: one per
    /// core the process may use.
    #[arg(long, env = "PUSHHUB_WORKERS", default_value_t = 0)]
    pub workers: usize,

    /// Where the Durable Streams protocol is served (streams are `<path>/{name}`); `off` does
    /// not serve it.
    #[arg(long, env = "PUSHHUB_DS_PATH", default_value = "/v1/stream", value_parser = parse_ds_path)]
    pub ds_path: String,

    /// Largest Durable Streams append (`POST`/`PUT` body), in bytes.
    #[arg(long, env = "PUSHHUB_DS_MAX_BODY", default_value_t = 16 * 1024 * 1024)]
    pub ds_max_body: usize,

    /// How long a Durable Streams long poll (`live=long-poll`) waits before `204`, and how
    /// often an idle Durable Streams SSE read sends a keep-alive control event.
    #[arg(long, env = "PUSHHUB_DS_LONG_POLL_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub ds_long_poll_timeout: Duration,
}

/// A transport `--transports` can switch: pushhub's own (Durable Streams reads are served,
/// or not, with `--ds-path`).
fn parse_served_transport(value: &str) -> Result<TransportKind, String> {
    match value.parse::<TransportKind>() {
        Ok(kind) if !kind.is_durable() => Ok(kind),
        Ok(kind) => Err(format!(
            "{kind} is served under --ds-path, not switched by --transports"
        )),
        Err(_) => Err(format!(
            "unknown transport {value:?}: use poll, longpoll, sse, ws or stream"
        )),
    }
}

/// `--ds-path`: `off`, or an absolute path (its trailing slash dropped).
fn parse_ds_path(value: &str) -> Result<String, String> {
    if value == "off" {
        return Ok(value.to_owned());
    }
    let path = value.trim_end_matches('/');
    if !path.starts_with('/') || path.len() < 2 || path.contains(['?', '#', '{', '}', '*']) {
        return Err("use `off` or an absolute path such as /v1/stream".into());
    }
    Ok(path.to_owned())
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            transports: TransportKind::NATIVE.to_vec(),
            history_size: 1000,
            history_max_age: Duration::from_secs(3600),
            max_body: 64 * 1024,
            longpoll_timeout: Duration::from_secs(25),
            longpoll_max_timeout: Duration::from_secs(120),
            heartbeat: Duration::from_secs(15),
            sse_retry: Duration::from_secs(2),
            poll_limit: 100,
            max_poll_limit: 1000,
            subscriber_queue: 256,
            catch_up_batch: 256,
            sweep_interval: Duration::from_secs(10),
            poller_window: Duration::from_secs(30),
            ws_max_message: 64 * 1024 + 1024,
            ws_read_buffer: 4 * 1024,
            ws_write_buffer: 8 * 1024,
            write_delay: Duration::ZERO,
            jwt_secret: None,
            jwt_public_key: None,
            public_topics: Vec::new(),
            allowed_origins: Vec::new(),
            link_hosts: LinkHosts::Auto,
            max_connections: 100_000,
            max_connections_per_ip: 0,
            file_reserve: None,
            listen_backlog: 4096,
            publish_rate: 0,
            max_parked_longpolls: 50_000,
            max_subscriptions_per_connection: 100,
            max_header_bytes: 16 * 1024,
            header_timeout: Duration::from_secs(10),
            ws_ping_interval: Duration::from_secs(25),
            ws_pong_timeout: Duration::from_secs(10),
            slow_consumer: SlowConsumerPolicy::Resync,
            stall_timeout: Duration::from_secs(30),
            tls_cert: None,
            tls_key: None,
            shutdown_grace: Duration::from_secs(5),
            workers: 0,
            data_dir: None,
            fsync: FsyncPolicy::Batch,
            fsync_window: Duration::ZERO,
            redis: None,
            redis_mode: RedisMode::Auto,
            node_name: None,
            redis_min_replicas: 0,
            redis_replica_timeout: Duration::from_secs(1),
            ds_path: "/v1/stream".into(),
            ds_max_body: 16 * 1024 * 1024,
            ds_long_poll_timeout: Duration::from_secs(20),
        }
    }
}

/// The command line's names for the hub's slow-consumer policy.
impl clap::ValueEnum for SlowConsumerPolicy {
    fn value_variants<'a>() -> &'a [Self] {
        &[SlowConsumerPolicy::Resync, SlowConsumerPolicy::Disconnect]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(match self {
            SlowConsumerPolicy::Resync => clap::builder::PossibleValue::new("resync").help(
                "Read the backlog from history by cursor (nothing lost while history holds it)",
            ),
            SlowConsumerPolicy::Disconnect => clap::builder::PossibleValue::new("disconnect")
                .help("Close the connection; the client reconnects with its cursor"),
        })
    }
}

/// The command line's names for the transports: their own names.
impl clap::ValueEnum for TransportKind {
    fn value_variants<'a>() -> &'a [Self] {
        &TransportKind::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// The command line's names for how `--redis` is reached.
impl clap::ValueEnum for RedisMode {
    fn value_variants<'a>() -> &'a [Self] {
        &[RedisMode::Auto, RedisMode::Single, RedisMode::Cluster]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(match self {
            RedisMode::Auto => clap::builder::PossibleValue::new("auto")
                .help("A cluster if several seeds are given or the seed says cluster_enabled:1"),
            RedisMode::Single => clap::builder::PossibleValue::new("single")
                .help("One primary (with or without replicas): classic pub/sub"),
            RedisMode::Cluster => clap::builder::PossibleValue::new("cluster")
                .help("A Redis Cluster (7 or later): sharded pub/sub, routing by slot"),
        })
    }
}

/// The command line's names for the disk store's fsync policy.
impl clap::ValueEnum for FsyncPolicy {
    fn value_variants<'a>() -> &'a [Self] {
        &[FsyncPolicy::Always, FsyncPolicy::Batch]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(match self {
            FsyncPolicy::Always => clap::builder::PossibleValue::new("always")
                .help("Every publish is written and fdatasync'ed on its own before it is acknowledged"),
            FsyncPolicy::Batch => clap::builder::PossibleValue::new("batch").help(
                "Publishes that queue together (within --fsync-window) share one write and one fdatasync",
            ),
        })
    }
}

impl Config {
    /// Worker threads (and fan-out shards) to run with: `--workers`, or one per core.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => crate::hub::default_shards(),
            n => n,
        }
    }

    /// Whether `transport` is served.
    pub fn serves(&self, transport: TransportKind) -> bool {
        if transport.is_durable() {
            return self.durable_path().is_some();
        }
        self.transports.contains(&transport)
    }

    /// The history policy of the store.
    pub fn retention(&self) -> Retention {
        Retention {
            max_messages: usize::try_from(self.history_size).unwrap_or(usize::MAX),
            max_age: (!self.history_max_age.is_zero()).then_some(self.history_max_age),
        }
    }

    /// How to reach Redis, when `--redis` is set: its seeds, split at commas.
    pub fn redis_options(&self) -> Option<RedisOptions> {
        let urls = self.redis.as_ref()?;
        Some(RedisOptions {
            urls: urls
                .split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(str::to_owned)
                .collect(),
            mode: self.redis_mode,
            min_replicas: self.redis_min_replicas,
            replica_timeout: self.redis_replica_timeout,
        })
    }

    /// Where the Durable Streams protocol is served, unless `--ds-path off`.
    pub fn durable_path(&self) -> Option<&str> {
        (self.ds_path != "off").then_some(self.ds_path.as_str())
    }

    /// The transports' settings: poll limits and timeouts, stream and WebSocket limits, the
    /// publish body limit, the Durable Streams path, body limit and long-poll wait, and what
    /// every raw connection obeys (the stall limit, pipelined input kept).
    pub fn transport_settings(&self) -> TransportSettings {
        TransportSettings {
            poll: PollSettings {
                default_limit: self.poll_limit,
                max_limit: self.max_poll_limit,
                default_timeout: self.longpoll_timeout,
                max_timeout: self.longpoll_max_timeout,
            },
            stream: StreamSettings {
                sse_retry: self.sse_retry,
                ws_pong_timeout: self.ws_pong_timeout,
                ws_read_buffer: self.ws_read_buffer,
                ws_max_message: self.ws_max_message,
                max_subscriptions: self.max_subscriptions_per_connection,
            },
            publish: PublishSettings {
                max_body: self.max_body,
            },
            durable: DurableSettings {
                path: self.durable_path().map(str::to_owned),
                max_body: self.ds_max_body,
                long_poll_timeout: self.ds_long_poll_timeout,
                default_host: self.listen.to_string(),
                https: self.tls_cert.is_some(),
            },
            connection: ConnectionSettings {
                stall_timeout: self.stall_timeout,
                max_pending_input: self.max_header_bytes,
            },
        }
    }

    /// The gate's settings: request heads and bodies, stalls, workers and the stop's grace,
    /// which endpoints are served, TLS.
    pub fn gate_settings(&self) -> GateSettings {
        GateSettings {
            header_timeout: self.header_timeout,
            max_header_bytes: self.max_header_bytes,
            max_body: self.max_body,
            stall_timeout: self.stall_timeout,
            shutdown_grace: self.shutdown_grace,
            workers: self.worker_count(),
            served: PerTransport::from_fn(|kind| self.serves(kind)),
            durable_path: self.durable_path().map(str::to_owned),
            tls: self.tls_cert.clone().zip(self.tls_key.clone()),
        }
    }

    /// The hub's settings: queues, catch-up, the poller window, the slow-consumer policy, and
    /// the fan-out's workers and timers.
    pub fn hub_settings(&self) -> HubSettings {
        HubSettings {
            subscriber_queue: usize::try_from(self.subscriber_queue).unwrap_or(usize::MAX),
            catch_up_batch: usize::try_from(self.catch_up_batch).unwrap_or(usize::MAX),
            poller_window: self.poller_window,
            slow_consumer: self.slow_consumer,
            fanout: FanoutSettings {
                shards: self.worker_count(),
                write_delay: self.write_delay,
                heartbeat: self.heartbeat,
                ping_interval: self.ws_ping_interval,
                pong_timeout: self.ws_pong_timeout,
            },
            max_topics_per_connection: self.max_subscriptions_per_connection.max(1),
            node_name: self.node_name(),
        }
    }

    /// `--node-name`, or the host's name and the listen port.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
                .filter(|name| crate::message::valid_name(name))
                .unwrap_or_else(|| "pushhub".into());
            match self.listen.port() {
                // The system picks the port after this is read: the process id tells such
                // nodes apart instead.
                0 => format!("{host}:pid{}", std::process::id()),
                port => format!("{host}:{port}"),
            }
        })
    }
}

/// A node's or a client's name: the characters of a topic name (a node's is part of member
/// ids, which `/` ends).
pub fn parse_name(text: &str) -> Result<String, String> {
    if crate::message::valid_name(text) {
        Ok(text.to_owned())
    } else {
        Err("use 1-128 characters of A-Z a-z 0-9 . _ : -".into())
    }
}

/// Parses `15`, `15s`, `500ms`, `2m`, `1h 30m`; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).map_err(|e| e.to_string())
}

/// Whether `<link>.localhost` host names are served through emulated links.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkHosts {
    /// While listening on a loopback address (where `*.localhost` names lead).
    Auto,
    /// Always.
    On,
    /// Never.
    Off,
}

impl Config {
    /// Whether this server serves `<link>.localhost` through emulated links.
    pub fn serves_link_hosts(&self) -> bool {
        match self.link_hosts {
            LinkHosts::Auto => self.listen.ip().is_loopback(),
            LinkHosts::On => true,
            LinkHosts::Off => false,
        }
    }
}

/// A [`parse_duration`] of at most one second: a longer write delay would hold deliveries
/// (and the session's reads) for longer than any client tolerates.
fn parse_write_delay(text: &str) -> Result<Duration, String> {
    let delay = parse_duration(text)?;
    if delay > Duration::from_secs(1) {
        return Err("at most 1s".into());
    }
    Ok(delay)
}

/// A [`parse_duration`] of at most 100ms: every publish of a group waits that long.
fn parse_fsync_window(text: &str) -> Result<Duration, String> {
    let window = parse_duration(text)?;
    if window > Duration::from_millis(100) {
        return Err("at most 100ms".into());
    }
    Ok(window)
}

/// Like [`parse_duration`], where `off` or `none` mean no limit, returned as zero.
pub fn parse_age_limit(text: &str) -> Result<Duration, String> {
    match text.trim() {
        "off" | "none" => Ok(Duration::ZERO),
        other => parse_duration(other),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn default_matches_the_flag_defaults() {
        if std::env::vars().any(|(k, _)| k.starts_with("PUSHHUB_")) {
            return; // the environment would override the flag defaults
        }
        assert_eq!(Cli::parse_from(["pushhub"]).config, Config::default());
    }

    #[test]
    fn durations_accept_bare_seconds_and_units() {
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_age_limit("off"), Ok(Duration::ZERO));
        assert!(parse_duration("soon").is_err());
    }
}
