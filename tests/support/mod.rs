//! Shared test helpers: a real server on 127.0.0.1:0, and clients for every transport.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use futures::{SinkExt, StreamExt};
use pushhub::{AppState, Config};
use serde_json::Value;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message as WsMessage};
use tokio_util::sync::CancellationToken;

/// How long a test waits for something that should happen promptly before failing.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A file or directory a test made under the temporary directory, removed when dropped (a
/// failed assertion included), so that no run leaves one behind.
pub struct Removed(pub std::path::PathBuf);

impl std::ops::Deref for Removed {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Removed {
    fn drop(&mut self) {
        if std::fs::remove_dir_all(&self.0).is_err() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub state: AppState,
    /// A client of this server (the request helpers are on it, reached through `Deref`).
    pub endpoint: Endpoint,
    stop: CancellationToken,
    task: JoinHandle<Result<(), pushhub::gate::server::StartError>>,
}

impl std::ops::Deref for TestServer {
    type Target = Endpoint;

    fn deref(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// A client of one server (in this process or a child process), by address.
#[derive(Clone)]
pub struct Endpoint {
    /// `127.0.0.1:PORT`.
    pub host: String,
    pub http: reqwest::Client,
}

pub async fn start() -> TestServer {
    start_with(Config::default()).await
}

pub async fn start_with(mut config: Config) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    config.listen = addr;
    let state = AppState::new(config).unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(pushhub::serve(
        listener,
        state.clone(),
        stop.clone().cancelled_owned(),
    ));
    TestServer {
        addr,
        state,
        endpoint: Endpoint::new(&addr.to_string()),
        stop,
        task,
    }
}

impl TestServer {
    /// The hub's subscriber counts of `topic`.
    pub async fn subscribers(&self, topic: &str) -> pushhub::hub::Subscribers {
        let topic = pushhub::message::TopicName::parse(topic).unwrap();
        self.state
            .transport
            .hub
            .info(&topic)
            .await
            .unwrap()
            .subscribers
    }

    /// Stops the server the way a signal would, and waits for it to finish.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("server did not stop in time")
            .unwrap()
            .unwrap();
    }
}

impl Endpoint {
    pub fn new(host: &str) -> Self {
        Self {
            host: host.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.host, path)
    }

    /// Publishes `data` as JSON and returns the id.
    pub async fn publish(&self, topic: &str, data: Value) -> u64 {
        let response = self
            .http
            .post(self.url(&format!("/topics/{topic}")))
            .json(&data)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "publish failed");
        response.json::<Value>().await.unwrap()["id"]
            .as_u64()
            .unwrap()
    }

    /// Publishes `count` messages `{"n": i}` and returns their ids.
    pub async fn publish_many(&self, topic: &str, count: usize) -> Vec<u64> {
        let mut ids = Vec::with_capacity(count);
        for i in 0..count {
            ids.push(self.publish(topic, serde_json::json!({ "n": i })).await);
        }
        ids
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    pub async fn sse(&self, path: &str, last_event_id: Option<&str>) -> SseClient {
        let mut request = self.http.get(self.url(path));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "SSE connect failed");
        let mut client = SseClient {
            headers: response.headers().clone(),
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
            retry: None,
            chunks: 0,
        };
        client.read_hello().await;
        client
    }

    /// Opens an HTTP stream (`/topics/{t}/stream`): one JSON value per line.
    pub async fn stream(&self, path: &str) -> StreamClient {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "stream connect failed");
        StreamClient {
            headers: response.headers().clone(),
            body: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
        }
    }

    pub async fn ws(&self, path: &str) -> WsClient {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}{}", self.host, path))
            .await
            .unwrap();
        WsClient { ws }
    }
}

/// Reads `application/x-ndjson` line by line, as `fetch()` with a `ReadableStream` would.
pub struct StreamClient {
    pub headers: reqwest::header::HeaderMap,
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: Vec<u8>,
}

impl StreamClient {
    /// The next line as JSON (keep-alive lines included), or `None` when the stream ends.
    pub async fn next_line(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let text = std::str::from_utf8(&line[..end]).expect("UTF-8 line");
                return Some(serde_json::from_str(text).expect("each line is one JSON value"));
            }
            match tokio::time::timeout(PATIENCE, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buffer.extend_from_slice(&chunk),
                Ok(Some(Err(_)) | None) => return None,
                Err(_) => panic!("stream silent for {PATIENCE:?}"),
            }
        }
    }

    /// The next line that is not a keep-alive.
    pub async fn next_json(&mut self) -> Option<Value> {
        loop {
            let line = self.next_line().await?;
            if line["type"] != "keepalive" {
                return Some(line);
            }
        }
    }

    /// Bytes received after the last complete line: a broken line if not empty at the end.
    pub fn leftover(&self) -> &[u8] {
        &self.buffer
    }
}

/// One SSE event as parsed from the raw stream.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap()
    }
}

/// Reads `text/event-stream` byte by byte, the way a browser would (per the HTML spec's
/// parsing rules for the fields we use).
pub struct SseClient {
    pub headers: reqwest::header::HeaderMap,
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
    pub retry: Option<u64>,
    /// Body chunks read so far: how many writes the server's frames came in, give or take TCP.
    pub chunks: usize,
}

pub enum SseItem {
    Event(SseEvent),
    Comment(String),
    Retry(u64),
    /// A block with an `id:` and no data: a browser sets `lastEventId` and dispatches nothing.
    Cursor(String),
}

impl SseClient {
    async fn read_hello(&mut self) {
        match self.next_item().await {
            Some(SseItem::Retry(ms)) => self.retry = Some(ms),
            _ => panic!("SSE stream must open with a retry: hint"),
        }
    }

    /// The next block (event, comment or retry), or `None` when the stream ends.
    pub async fn next_item(&mut self) -> Option<SseItem> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                return Some(parse_block(&block));
            }
            match tokio::time::timeout(PATIENCE, self.body.next()).await {
                Ok(Some(Ok(chunk))) => {
                    self.chunks += 1;
                    self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
                }
                Ok(Some(Err(_)) | None) => return None,
                Err(_) => panic!("SSE stream silent for {PATIENCE:?}"),
            }
        }
    }

    /// Bytes received after the last complete block: a broken frame if not empty at the end.
    pub fn leftover(&self) -> &str {
        &self.buffer
    }

    /// The next event, skipping comments.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            match self.next_item().await? {
                SseItem::Event(event) => return Some(event),
                SseItem::Comment(_) | SseItem::Retry(_) | SseItem::Cursor(_) => continue,
            }
        }
    }
}

fn parse_block(block: &str) -> SseItem {
    let mut event = SseEvent {
        id: None,
        event: "message".into(),
        data: String::new(),
    };
    let mut data_lines = Vec::new();
    for line in block.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix(':') {
            return SseItem::Comment(comment.trim().to_owned());
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => event.id = Some(value.to_owned()),
            "event" => event.event = value.to_owned(),
            "data" => data_lines.push(value.to_owned()),
            "retry" => return SseItem::Retry(value.parse().unwrap()),
            other => panic!("unexpected SSE field {other:?}"),
        }
    }
    if data_lines.is_empty() {
        return SseItem::Cursor(event.id.expect("a block with neither data nor id"));
    }
    event.data = data_lines.join("\n");
    SseItem::Event(event)
}

pub struct WsClient {
    pub ws: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
}

impl WsClient {
    pub async fn send_json(&mut self, value: Value) {
        self.ws
            .send(WsMessage::text(value.to_string()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(WsMessage::text(text)).await.unwrap();
    }

    /// The next text frame as JSON; `None` when the server closes.
    pub async fn next_json(&mut self) -> Option<Value> {
        loop {
            match tokio::time::timeout(PATIENCE, self.ws.next()).await {
                Ok(Some(Ok(WsMessage::Text(text)))) => {
                    return Some(serde_json::from_str(&text).unwrap());
                }
                Ok(Some(Ok(WsMessage::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(_))) => continue,
                Err(_) => panic!("WebSocket silent for {PATIENCE:?}"),
            }
        }
    }

    /// Reads until the server's close frame, skipping other frames, and returns it.
    pub async fn next_close(&mut self) -> tokio_tungstenite::tungstenite::protocol::CloseFrame {
        tokio::time::timeout(PATIENCE, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(WsMessage::Close(Some(frame)))) => return frame,
                    Some(Ok(_)) => continue,
                    other => panic!("expected a close frame, got {other:?}"),
                }
            }
        })
        .await
        .expect("no close frame in time")
    }

    /// The next frame that is a message envelope (has an `id`, no `type`), skipping others.
    pub async fn next_envelope(&mut self) -> Value {
        loop {
            let frame = self.next_json().await.expect("connection closed");
            if frame.get("type").is_none() {
                return frame;
            }
        }
    }
}

/// Waits until `condition` holds, checking every few milliseconds; panics after `PATIENCE`.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The ids of a list of envelopes.
pub fn ids(messages: &[Value]) -> Vec<u64> {
    messages.iter().map(|m| m["id"].as_u64().unwrap()).collect()
}

/// The real `pushhub` binary running as a child process on an ephemeral port.
pub struct ServerProcess {
    pub child: Child,
    /// `127.0.0.1:PORT`, read from the startup log line.
    pub addr: String,
    /// Every log line the process has written so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ServerProcess {
    /// A client of this process.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::new(&self.addr)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary with `args` (plus `--listen 127.0.0.1:0`) and environment `envs`, and
/// waits for its startup line.
pub fn spawn_binary(args: &[&str], envs: &[(&str, &str)]) -> ServerProcess {
    spawn_command(Command::new(env!("CARGO_BIN_EXE_pushhub")), args, envs)
}

/// [`spawn_binary`] in a process that may open `files` files at most (its soft and hard
/// limits: the server cannot raise them).
pub fn spawn_binary_with_files(args: &[&str], files: u64) -> ServerProcess {
    // The shell lowers both limits, then becomes the server.
    let mut command = Command::new("sh");
    command.args([
        "-c",
        &format!("ulimit -Sn {files} && ulimit -Hn {files} && exec \"$0\" \"$@\""),
        env!("CARGO_BIN_EXE_pushhub"),
    ]);
    spawn_command(command, args, &[])
}

fn spawn_command(mut command: Command, args: &[&str], envs: &[(&str, &str)]) -> ServerProcess {
    let mut child = command
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .env("PUSHHUB_LOG", "pushhub=info")
        .env("NO_COLOR", "1")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pushhub");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let addr = loop {
        let line = lines
            .next()
            .expect("pushhub exited before listening")
            .unwrap();
        log.lock().unwrap().push(line.clone());
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest
                .split('/')
                .next()
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_owned();
        }
    };
    // Keep draining the log so the child never blocks on a full pipe.
    let collected = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            collected.lock().unwrap().push(line);
        }
    });
    ServerProcess { child, addr, log }
}

/// Whether `redis-server` can run here. Without it the Redis tests skip (and say so), unless
/// `PUSHHUB_REQUIRE_REDIS` is set (as `.ci/run` does): then its absence fails the test.
pub fn redis_installed() -> bool {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    assert!(
        std::env::var_os("PUSHHUB_REQUIRE_REDIS").is_none(),
        "PUSHHUB_REQUIRE_REDIS is set but redis-server is not installed"
    );
    eprintln!(
        "SKIPPED: redis-server is not installed (apt-get install -y redis-server); \
         the Redis tests did not run"
    );
    false
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `redis-server` process, run under a watchdog shell that kills it when the test
/// process goes away in any way (its end of the watchdog's stdin closes): a test killed -9
/// leaves no Redis behind.
struct RedisProcess {
    watchdog: Child,
    pid: String,
}

impl RedisProcess {
    fn spawn(port: u16, dir: &std::path::Path, extra: &[&str]) -> Self {
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(r#"redis-server "$@" >/dev/null 2>&1 & pid=$!; echo $pid; read _; kill -9 $pid"#)
            .arg("redis-watchdog")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let mut pid = String::new();
        BufReader::new(watchdog.stdout.take().unwrap())
            .read_line(&mut pid)
            .unwrap();
        Self {
            watchdog,
            pid: pid.trim().to_owned(),
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to the server.
    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid])
            .status();
    }

    /// SIGKILL: an outage, not a clean stop.
    fn kill(mut self) {
        let _ = Command::new("kill").args(["-9", &self.pid]).status();
        drop(self.watchdog.stdin.take());
        let _ = self.watchdog.wait();
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        if let Some(stdin) = self.watchdog.stdin.take() {
            drop(stdin);
            let _ = self.watchdog.wait();
        }
    }
}

/// Waits until a Redis on `port` answers `PING`.
fn wait_redis_ready(port: u16) {
    wait_redis_says(port, b"PING\r\n", "+PONG");
}

/// Sends `command` to the Redis on `port` until its reply contains `expected`.
pub fn wait_redis_says(port: u16, command: &[u8], expected: &str) {
    wait_redis_says_any(port, command, &[expected]);
}

/// Sends `command` to the Redis on `port` until its reply contains one of `expected`.
pub fn wait_redis_says_any(port: u16, command: &[u8], expected: &[&str]) {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + PATIENCE * 3;
    loop {
        let reply = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.write_all(command)?;
            let mut reply = vec![0; 4096];
            let n = s.read(&mut reply)?;
            Ok(String::from_utf8_lossy(&reply[..n]).into_owned())
        });
        if matches!(&reply, Ok(reply) if expected.iter().any(|e| reply.contains(e))) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "redis on {port} never said {expected:?}: {reply:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A real `redis-server` on a free loopback port, with an append-only file synced on every
/// write in its own directory, so a restart keeps everything it acknowledged.
pub struct RedisServer {
    process: Option<RedisProcess>,
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts one, or returns `None` when Redis cannot run here (see [`redis_installed`]).
    pub fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    /// Starts one with more `redis-server` arguments (`--replicaof`, ...).
    pub fn start_with(extra: &[&str]) -> Option<Self> {
        if !redis_installed() {
            return None;
        }
        let mut server = Self {
            process: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.restart();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (SIGKILL: an outage, not a clean stop).
    pub fn kill(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill();
        }
    }

    /// Freezes the server (SIGSTOP): it neither answers nor replicates until [`Self::resume`].
    pub fn pause(&self) {
        if let Some(process) = &self.process {
            process.signal("STOP");
        }
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        if let Some(process) = &self.process {
            process.signal("CONT");
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.process = Some(RedisProcess::spawn(self.port, self.dir.path(), &extra));
        wait_redis_ready(self.port);
    }
}

/// A real Redis Cluster on loopback: `primaries` primaries with one replica each, every
/// node with an append-only file (a killed primary comes back with its data, never empty)
/// and a 1.5 s `cluster-node-timeout`. Every process is killed when this is dropped, or
/// when the test process dies.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts one, or returns `None` when Redis cannot run here (see [`redis_installed`]).
    pub fn start(primaries: usize) -> Option<Self> {
        if !redis_installed() {
            return None;
        }
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1500",
        ];
        let nodes: Vec<RedisServer> = (0..primaries * 2)
            .map(|_| RedisServer::start_with(&args).unwrap())
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli --cluster create");
        assert!(created.success(), "redis-cli --cluster create failed");
        let cluster = Self { nodes };
        cluster.wait_healthy();
        Some(cluster)
    }

    /// Every node as a seed list for `--redis`.
    pub fn seeds(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(RedisServer::url).collect();
        urls.join(",")
    }

    fn live_port(&self) -> String {
        self.nodes
            .iter()
            .find(|n| n.process.is_some())
            .expect("a live node")
            .port
            .to_string()
    }

    /// The cluster slot of `key`.
    pub fn slot_of(&self, key: &str) -> u16 {
        let out = Command::new("redis-cli")
            .args(["-p", &self.live_port(), "cluster", "keyslot", key])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    /// The node that is primary for `key`'s slot now, as a live node sees it.
    pub fn primary_of(&self, key: &str) -> usize {
        let slot = self.slot_of(key);
        let live = self.live_port();
        let out = Command::new("redis-cli")
            .args(["-p", &live, "cluster", "slots"])
            .output()
            .unwrap();
        // Lines: start, end, primary ip, primary port, primary id, then replicas.
        let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        let mut i = 0;
        while i + 3 < lines.len() {
            let (start, end) = (lines[i].parse::<u16>(), lines[i + 1].parse::<u16>());
            if let (Ok(start), Ok(end)) = (start, end)
                && (start..=end).contains(&slot)
                && let Ok(port) = lines[i + 3].parse::<u16>()
            {
                return self.nodes.iter().position(|n| n.port == port).unwrap();
            }
            i += 1;
        }
        panic!("no primary for slot {slot}: {lines:?}");
    }

    /// The replica of the primary `primary`.
    pub fn replica_of(&self, primary: usize) -> usize {
        let out = Command::new("redis-cli")
            .args([
                "-p",
                &self.nodes[primary].port.to_string(),
                "info",
                "replication",
            ])
            .output()
            .unwrap();
        let info = String::from_utf8_lossy(&out.stdout).into_owned();
        let port: u16 = info
            .lines()
            .find(|l| l.starts_with("slave0:"))
            .and_then(|l| l.split(',').find_map(|f| f.strip_prefix("port=")))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("node {primary} has no replica: {info}"));
        self.nodes.iter().position(|n| n.port == port).unwrap()
    }

    /// Waits until every live node reports the cluster healthy, and every shard's replica
    /// is in sync with its primary.
    pub fn wait_healthy(&self) {
        for node in self.nodes.iter().filter(|n| n.process.is_some()) {
            wait_redis_says(node.port, b"CLUSTER INFO\r\n", "cluster_state:ok");
            wait_redis_says_any(
                node.port,
                b"INFO replication\r\n",
                &["connected_slaves:1", "master_link_status:up"],
            );
        }
    }
}
