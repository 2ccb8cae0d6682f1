//! How a node reaches Redis: one primary, or a Redis Cluster through redis-rs's cluster
//! client (slot routing, `MOVED`/`ASK`, topology refresh and resubscription are the
//! library's). Every connection here reconnects by itself; a command sent while Redis is
//! away fails, and the caller answers 503.
//!
//! A node holds three kinds of connection: `commands` (reads, multiplexed), `writes`
//! (write scripts, with their `WAIT` under `--redis-min-replicas`, pipelined to the slot's
//! primary because `WAIT` blocks the connection it runs on; in a cluster without the
//! library's retries, since a write whose reply was lost may have run; one primary without
//! `--redis-min-replicas` writes on `commands`), and the subscriber, whose pushes
//! (messages, subscription confirmations, disconnections) the listener reads.

use std::time::Duration;

use redis::{
    Client, Cmd, ErrorKind, Pipeline, ProtocolVersion, PushInfo, RedisError, RedisFuture,
    RedisResult, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClientBuilder, ClusterConfig},
    cluster_async::ClusterConnection,
    cluster_routing::{
        MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
    },
};
use tokio::sync::mpsc;

use super::super::StoreError;

/// How long a Redis command may take before the publish or read fails with 503.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait between two reconnection attempts.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Whether `--redis` names one primary or a cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RedisMode {
    /// A cluster when several seeds are given, or when the one seed says
    /// `cluster_enabled:1`; one primary otherwise (and when the seed cannot be reached at
    /// start: then pass `cluster` to be sure).
    #[default]
    Auto,
    /// One primary (with or without replicas): classic pub/sub.
    Single,
    /// A Redis Cluster (7 or later): sharded pub/sub, routing by slot.
    Cluster,
}

/// Where and how a node reaches Redis.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// Seed URLs (`redis://host:port/db`); a cluster may take several.
    pub urls: Vec<String>,
    /// One primary or a cluster.
    pub mode: RedisMode,
    /// Replicas that must have a publish before it is answered `201` (0: none).
    pub min_replicas: u32,
    /// How long a publish waits for those replicas before it is answered 503.
    pub replica_timeout: Duration,
}

impl RedisOptions {
    /// One primary at `url`, no replicas waited for.
    pub fn single(url: &str) -> Self {
        Self {
            urls: vec![url.to_owned()],
            mode: RedisMode::Single,
            min_replicas: 0,
            replica_timeout: Duration::from_secs(1),
        }
    }
}

fn bad_url(url: &str, error: RedisError) -> StoreError {
    StoreError::Internal(format!("--redis {url}: {error}"))
}

/// A connection that routes by key: to the one primary, or through the cluster client.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

impl Connection {
    /// Runs `pipeline` as one unit on the primary that owns `key`'s slot, never spread over
    /// nodes: its `WAIT` must count the replicas of the write before it.
    pub(super) async fn on_primary(
        &mut self,
        key: &str,
        pipeline: &Pipeline,
    ) -> RedisResult<Vec<Value>> {
        let count = pipeline.len();
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, 0, count).await,
            Connection::Cluster(c) => {
                let route =
                    SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master));
                c.route_pipeline(pipeline.clone(), 0, count, route).await
            }
        }
    }

    /// Keys matching `pattern`, at least `limit` of them if there are (a `SCAN` of the
    /// primary, or of every primary of a cluster: each holds its own slots' keys).
    pub(super) async fn scan(&mut self, pattern: &str, limit: usize) -> RedisResult<Vec<Vec<u8>>> {
        let scan = |cursor: u64| {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000);
            cmd
        };
        let mut keys = Vec::new();
        match self {
            Connection::Single(c) => {
                let mut cursor = 0;
                loop {
                    let (next, page): (u64, Vec<Vec<u8>>) = scan(cursor).query_async(c).await?;
                    keys.extend(page);
                    if next == 0 || keys.len() >= limit {
                        break;
                    }
                    cursor = next;
                }
            }
            Connection::Cluster(c) => {
                // Without a response policy, a command routed to every primary answers a map
                // of each primary's address to its reply.
                let every = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                let Value::Map(pages) = c.route_command(scan(0), every).await? else {
                    return Err(RedisError::from((ErrorKind::Client, "SCAN: not a map")));
                };
                for (address, page) in pages {
                    let address: String = redis::from_redis_value(address)?;
                    let (mut next, page): (u64, Vec<Vec<u8>>) = redis::from_redis_value(page)?;
                    keys.extend(page);
                    let (host, port) = address
                        .rsplit_once(':')
                        .and_then(|(host, port)| Some((host.to_owned(), port.parse().ok()?)))
                        .ok_or_else(|| RedisError::from((ErrorKind::Client, "SCAN: an address")))?;
                    while next != 0 && keys.len() < limit {
                        let node = SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port,
                        };
                        let reply = c
                            .route_command(scan(next), RoutingInfo::SingleNode(node))
                            .await?;
                        let (after, page): (u64, Vec<Vec<u8>>) = redis::from_redis_value(reply)?;
                        keys.extend(page);
                        next = after;
                    }
                }
            }
        }
        Ok(keys)
    }

    /// Subscribes to a topic's channel: sharded in a cluster.
    pub(super) async fn follow(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Connection::Single(c) => c.subscribe(channel).await,
            Connection::Cluster(c) => c.ssubscribe(channel).await,
        }
    }

    /// Makes a cluster connection look at the cluster again where `key`'s slot is concerned:
    /// a keyed command sent through a stale slot map meets a redirect, which makes the
    /// library refresh the map and move its subscriptions to the slots' owners. A
    /// subscriber connection sends no keyed command of its own, so nothing else would.
    pub(super) async fn refresh_route(&mut self, key: &str) {
        if let Connection::Cluster(c) = self {
            let _ = redis::cmd("EXISTS")
                .arg(key)
                .query_async::<redis::Value>(c)
                .await;
        }
    }

    /// Ends a [`Connection::follow`].
    pub(super) async fn unfollow(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Connection::Single(c) => c.unsubscribe(channel).await,
            Connection::Cluster(c) => c.sunsubscribe(channel).await,
        }
    }

    /// Subscribes to a classic channel (broadcast to every node of a cluster).
    pub(super) async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Connection::Single(c) => c.subscribe(channel).await,
            Connection::Cluster(c) => c.subscribe(channel).await,
        }
    }
}

/// A node's connections to Redis, as [`connect`] opens them.
pub(super) struct Links {
    pub(super) commands: Connection,
    /// Always in a cluster; with one primary, only with `--redis-min-replicas`.
    pub(super) writes: Option<Connection>,
    pub(super) subscriber: Connection,
    pub(super) pushes: mpsc::UnboundedReceiver<PushInfo>,
    /// Talking to a cluster: publishes use `SPUBLISH`, subscriptions `SSUBSCRIBE`.
    pub(super) cluster: bool,
}

/// Opens the connections lazily (a node starts, and answers 503, while Redis is down), after
/// deciding whether the seeds are a cluster. Must be called inside a Tokio runtime.
pub(super) fn connect(options: &RedisOptions) -> Result<Links, StoreError> {
    let Some(first) = options.urls.first() else {
        return Err(StoreError::Internal("--redis names no server".into()));
    };
    for url in &options.urls {
        Client::open(url.as_str()).map_err(|e| bad_url(url, e))?;
    }
    let cluster = match options.mode {
        RedisMode::Single => false,
        RedisMode::Cluster => true,
        RedisMode::Auto => options.urls.len() > 1 || seed_is_cluster(first),
    };
    if !cluster && options.urls.len() > 1 {
        return Err(StoreError::Internal(
            "--redis names several servers, which only a cluster takes (--redis-mode cluster)"
                .into(),
        ));
    }
    Ok(if cluster {
        cluster_links(options)?
    } else {
        single_links(options)?
    })
}

/// A write waits for its replicas on top of its own round trip.
fn write_timeout(options: &RedisOptions) -> Duration {
    COMMAND_TIMEOUT + options.replica_timeout
}

/// The connections to a cluster, each a redis-rs cluster connection.
fn cluster_links(options: &RedisOptions) -> Result<Links, StoreError> {
    let (push_tx, pushes) = mpsc::unbounded_channel();
    let client =
        |pushes: Option<mpsc::UnboundedSender<PushInfo>>, timeout: Duration, retries: u32| {
            let mut builder = ClusterClientBuilder::new(options.urls.iter().map(String::as_str))
                .use_protocol(ProtocolVersion::RESP3)
                .retries(retries)
                .min_retry_wait(20)
                .max_retry_wait(MAX_BACKOFF.as_millis() as u64);
            if let Some(pushes) = pushes {
                builder = builder.push_sender(pushes);
            }
            let client = builder.build().map_err(|e| bad_url(&options.urls[0], e))?;
            let config = ClusterConfig::new()
                .set_connection_timeout(COMMAND_TIMEOUT)
                .set_response_timeout(timeout);
            Ok::<_, StoreError>(Connection::Cluster(
                client.get_pending_async_connection_with_config(config),
            ))
        };
    Ok(Links {
        commands: client(None, COMMAND_TIMEOUT, 2)?,
        // No retries by the library: after a lost reply it would send a write again,
        // which may have run already (a primary killed after replicating it).
        writes: Some(client(None, write_timeout(options), 0)?),
        subscriber: client(Some(push_tx), COMMAND_TIMEOUT, 2)?,
        pushes,
        cluster: true,
    })
}

/// The connections to one primary, each a redis-rs connection manager.
fn single_links(options: &RedisOptions) -> Result<Links, StoreError> {
    let url = &options.urls[0];
    let client = Client::open(url.as_str()).map_err(|e| bad_url(url, e))?;
    let (push_tx, pushes) = mpsc::unbounded_channel();
    let manager = |pushes: Option<mpsc::UnboundedSender<PushInfo>>, timeout: Duration| {
        let mut config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(MAX_BACKOFF);
        let client = match pushes {
            Some(pushes) => {
                config = config
                    .set_push_sender(pushes)
                    .set_automatic_resubscription();
                // Pushes (messages on a connection that also runs commands) need RESP3.
                let info = client.get_connection_info().clone();
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                Client::open(info.set_redis_settings(settings)).map_err(|e| bad_url(url, e))?
            }
            None => client.clone(),
        };
        client
            .get_connection_manager_lazy(config)
            .map(Connection::Single)
            .map_err(|e| bad_url(url, e))
    };
    Ok(Links {
        commands: manager(None, COMMAND_TIMEOUT)?,
        writes: (options.min_replicas > 0)
            .then(|| manager(None, write_timeout(options)))
            .transpose()?,
        subscriber: manager(Some(push_tx), COMMAND_TIMEOUT)?,
        pushes,
        cluster: false,
    })
}

/// Asks the seed whether it runs in cluster mode; `false` when it cannot be asked.
fn seed_is_cluster(url: &str) -> bool {
    let asked = Client::open(url).and_then(|client| {
        let mut connection = client.get_connection_with_timeout(COMMAND_TIMEOUT)?;
        connection.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        redis::cmd("INFO")
            .arg("cluster")
            .query::<String>(&mut connection)
    });
    match asked {
        Ok(info) => info.contains("cluster_enabled:1"),
        Err(error) => {
            tracing::warn!(
                %error,
                "redis: could not ask the seed whether it is a cluster; using it as one primary \
                 (--redis-mode cluster says otherwise)"
            );
            false
        }
    }
}

/// Whether an error means the command never ran, so retrying it cannot apply it twice.
pub(super) fn not_run(error: &RedisError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Server(redis::ServerErrorKind::NoScript)
    )
}
