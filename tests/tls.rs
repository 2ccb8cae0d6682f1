//! HTTPS and WSS with a certificate generated at run time: an SSE stream read raw over TLS
//! receives what a WebSocket client publishes over WSS.

#![allow(missing_docs)]

mod support;

use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use pushhub::{Config, message::TransportKind};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use support::{PATIENCE, start_with};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;

async fn tls_connect(
    addr: std::net::SocketAddr,
    cert: &rcgen::Certificate,
) -> TlsStream<TcpStream> {
    tls_connect_alpn(addr, cert, &[]).await
}

/// A client that trusts `cert` and offers `alpn` (e.g. `h2`).
fn client(cert: &rcgen::Certificate, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// A TLS connection offering `alpn` (e.g. `h2`).
async fn tls_connect_alpn(
    addr: std::net::SocketAddr,
    cert: &rcgen::Certificate,
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    client(cert, alpn)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the server's certificate")
}

/// An HTTP/2 connection over TLS (checked to be HTTP/2), sending bodies of type `B`.
async fn h2_connect<B>(
    addr: std::net::SocketAddr,
    cert: &rcgen::Certificate,
) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = tls_connect_alpn(addr, cert, &[b"h2"]).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "HTTP/2 chosen"
    );
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender
}

/// Appends what `stream` sends to `seen` until it contains `needle`.
async fn read_until(stream: &mut TlsStream<TcpStream>, seen: &mut String, needle: &str) {
    let mut buffer = [0u8; 4096];
    while !seen.contains(needle) {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buffer))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "SSE over TLS closed early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
    }
}

/// Publishes `data` through the server's own state (its port speaks only TLS).
async fn publish(server: &support::TestServer, topic: &str, data: Value) {
    let topic = pushhub::message::TopicName::parse(topic).unwrap();
    let payload = pushhub::message::Payload::from_json(&data.to_string()).unwrap();
    server
        .state
        .publish(
            &topic,
            pushhub::message::EventName::default_event(),
            &payload,
        )
        .await
        .unwrap();
}

/// A server with a certificate made for this test, the certificate, and its directory.
async fn tls_server(
    name: &str,
) -> (
    support::TestServer,
    rcgen::CertifiedKey<rcgen::KeyPair>,
    std::path::PathBuf,
) {
    tls_server_with(name, Config::default()).await
}

/// [`tls_server`] with other settings.
async fn tls_server_with(
    name: &str,
    config: Config,
) -> (
    support::TestServer,
    rcgen::CertifiedKey<rcgen::KeyPair>,
    std::path::PathBuf,
) {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("pushhub-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, generated.cert.pem()).unwrap();
    std::fs::write(&key_path, generated.signing_key.serialize_pem()).unwrap();
    let server = start_with(Config {
        tls_cert: Some(cert_path),
        tls_key: Some(key_path),
        ..config
    })
    .await;
    (server, generated, dir)
}

#[tokio::test]
async fn sse_and_websocket_work_over_tls() {
    let (server, generated, dir) = tls_server("sse-ws").await;

    // Plain HTTP on the TLS port gets no answer.
    let plain = reqwest::Client::new()
        .get(server.url("/healthz"))
        .send()
        .await;
    assert!(
        plain.is_err(),
        "plain HTTP must not be served on a TLS listener"
    );

    // SSE over HTTPS, parsed from the raw decrypted stream.
    let mut sse = tls_connect(server.addr, &generated.cert).await;
    sse.write_all(b"GET /topics/secure/sse HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut seen = String::new();
    read_until(&mut sse, &mut seen, "retry:").await;
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(
        seen.to_ascii_lowercase()
            .contains("content-type: text/event-stream")
    );

    // Publish over WSS.
    let wss = tls_connect(server.addr, &generated.cert).await;
    let (mut ws, response) =
        tokio_tungstenite::client_async("wss://localhost/topics/secure/ws", wss)
            .await
            .unwrap();
    assert_eq!(response.status(), 101);
    ws.send(WsMessage::text(
        json!({"type": "publish", "data": {"over": "wss"}}).to_string(),
    ))
    .await
    .unwrap();
    let ack: Value = loop {
        match tokio::time::timeout(PATIENCE, ws.next()).await.unwrap() {
            Some(Ok(WsMessage::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "ack" {
                    break frame;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(ack["id"], 1);

    read_until(&mut sse, &mut seen, "\"over\":\"wss\"").await;
    assert!(seen.contains("id: 1\n"), "{seen}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn polls_and_long_polls_work_over_tls() {
    let (server, generated, dir) = tls_server("polls").await;
    // A long poll parked over TLS, then a short poll pipelined on the same connection.
    let mut stream = tls_connect(server.addr, &generated.cert).await;
    stream
        .write_all(b"GET /topics/tlspoll/longpoll?after=0&timeout=30 HTTP/1.1\r\nHost: localhost\r\n\r\nGET /topics/tlspoll/poll?after=0 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    support::eventually("the long poll parked", || async {
        server.subscribers("tlspoll").await[TransportKind::Longpoll] == 1
    })
    .await;
    publish(&server, "tlspoll", json!({"over": "tls"})).await;
    let mut seen = String::new();
    while seen.matches("\"over\":\"tls\"").count() < 2 {
        read_until(&mut stream, &mut seen, "\"over\":\"tls\"").await;
        if seen.matches("\"over\":\"tls\"").count() < 2 {
            let mut more = [0u8; 4096];
            let n = tokio::time::timeout(PATIENCE, stream.read(&mut more))
                .await
                .unwrap()
                .unwrap();
            seen.push_str(&String::from_utf8_lossy(&more[..n]));
        }
    }
    assert_eq!(seen.matches("HTTP/1.1 200 OK").count(), 2, "{seen}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn sse_and_long_polls_work_over_http2() {
    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;

    let (server, generated, dir) = tls_server("h2").await;
    let mut sender = h2_connect(server.addr, &generated.cert).await;
    let get = |path: &str| {
        hyper::Request::get(format!("https://localhost{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    // Three streams on one connection: an SSE stream, a parked long poll, a short poll.
    let sse = sender.send_request(get("/topics/h2/sse")).await.unwrap();
    assert_eq!(sse.status(), 200);
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    let mut sse = sse.into_body();
    let longpoll = {
        let mut sender = sender.clone();
        tokio::spawn(async move {
            let request = get("/topics/h2/longpoll?after=0&timeout=30");
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap().to_bytes()
        })
    };
    support::eventually("the long poll parked", || async {
        server.subscribers("h2").await[TransportKind::Longpoll] == 1
    })
    .await;
    publish(&server, "h2", json!({"over": "h2"})).await;
    let answer: Value = serde_json::from_slice(
        &tokio::time::timeout(PATIENCE, longpoll)
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(answer["messages"][0]["data"]["over"], "h2");
    let mut events = String::new();
    while !events.contains("\"over\":\"h2\"") {
        let frame = tokio::time::timeout(PATIENCE, sse.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            events.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(events.starts_with("retry: "), "{events}");
    assert!(
        events.contains("id: 1\nevent: message\ndata: {"),
        "{events}"
    );
    let poll = sender
        .send_request(get("/topics/h2/poll?after=0"))
        .await
        .unwrap();
    let body = poll.into_body().collect().await.unwrap().to_bytes();
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["last_id"], 1);

    // A Durable Streams SSE read over HTTP/2 (served through hyper, not the raw socket)
    // follows its stream and ends with the closing control event.
    use http_body_util::Full;
    let mut sender = h2_connect(server.addr, &generated.cert).await;
    let request = |method: hyper::Method, path: &str, body: &'static str, close: bool| {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("https://localhost/v1/stream/{path}"))
            .header("content-type", "application/json");
        if close {
            request = request.header("stream-closed", "true");
        }
        request
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    use hyper::Method;
    let created = sender
        .send_request(request(Method::PUT, "h2s", "", false))
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let sse = sender
        .send_request(request(Method::GET, "h2s?offset=-1&live=sse", "", false))
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    let reading = tokio::spawn(async move { sse.into_body().collect().await.unwrap().to_bytes() });
    support::eventually("the reader following its stream", || async {
        server.subscribers("h2s").await[TransportKind::DsSse] == 1
    })
    .await;
    for (body, close) in [("[1,2]", false), ("3", true)] {
        let appended = sender
            .send_request(request(Method::POST, "h2s", body, close))
            .await
            .unwrap();
        assert_eq!(appended.status(), 204);
    }
    let body = tokio::time::timeout(PATIENCE, reading)
        .await
        .expect("the read ends with its stream")
        .unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("event: data\ndata:[1,2]\n\n"), "{text}");
    assert!(text.contains("event: data\ndata:[3]\n\n"), "{text}");
    assert!(text.ends_with("\"streamClosed\":true}\n\n"), "{text}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_tls_connection_over_the_limit_is_refused_with_an_alert_before_any_handshake() {
    let (server, cert, dir) = tls_server_with(
        "limit",
        Config {
            max_connections: 1,
            ..Default::default()
        },
    )
    .await;
    let mut held = tls_connect(server.addr, &cert.cert).await;
    // The second connection is over the limit: its handshake fails on the server's alert.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let refused = tokio::time::timeout(
        PATIENCE,
        client(&cert.cert, &[]).connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("refused at once");
    let error = refused.expect_err("over the limit").to_string();
    assert!(error.contains("InternalError"), "{error}");
    // The connection within the limit is served as before.
    held.write_all(b"GET /topics/t/poll HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut seen = String::new();
    read_until(&mut held, &mut seen, "last_id").await;
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    let _ = std::fs::remove_dir_all(dir);
}
