//! HTTPS and WSS with a certificate generated at run time: an SSE stream read raw over TLS
//! receives what a WebSocket client publishes over WSS.

#![allow(missing_docs)]

mod support;

use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use pushhub::Config;
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
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the server's certificate")
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

#[tokio::test]
async fn sse_and_websocket_work_over_tls() {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("pushhub-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, generated.cert.pem()).unwrap();
    std::fs::write(&key_path, generated.signing_key.serialize_pem()).unwrap();
    let server = start_with(Config {
        tls_cert: Some(cert_path),
        tls_key: Some(key_path),
        ..Default::default()
    })
    .await;

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
