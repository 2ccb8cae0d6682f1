//! The link emulator measured with real sockets: each profile's delay, the bandwidth caps, the
//! flaky link's cuts, resets and blackouts, the idle cutter, and the two middleboxes that
//! speak HTTP in front of a real server.

#![allow(missing_docs)]

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use pushhub::link::{Counters, Link, Profile, Proxy};
use serde_json::json;
use support::{Endpoint, start};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A TCP echo server; returns its address.
async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = socket.set_nodelay(true);
                let mut buf = [0; 4096];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A server that writes `bytes` (or, with `None`, one byte every 10 ms) to every connection.
async fn talker(bytes: Option<usize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                match bytes {
                    Some(n) => {
                        let _ = socket.write_all(&vec![b'x'; n]).await;
                    }
                    None => loop {
                        if socket.write_all(b".").await.is_err() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    },
                }
                let _ = socket.shutdown().await;
                // Hold the socket until the other side closes.
                let mut sink = [0; 64];
                while let Ok(n) = socket.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Connects through a fresh proxy of `link`; returns the time to the first echo (the
/// handshake's round trip included) and the median of `rounds` more round trips.
async fn round_trips(link: Link, rounds: usize) -> (Duration, Duration) {
    let proxy = Proxy::start(link, echo().await).await.unwrap();
    let opened = Instant::now();
    let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
    socket.set_nodelay(true).unwrap();
    let mut byte = [0u8; 1];
    socket.write_all(b"a").await.unwrap();
    socket.read_exact(&mut byte).await.unwrap();
    let first = opened.elapsed();
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let sent = Instant::now();
        socket.write_all(b"a").await.unwrap();
        socket.read_exact(&mut byte).await.unwrap();
        samples.push(sent.elapsed());
    }
    (first, median(samples))
}

#[tokio::test]
async fn every_profile_delays_each_way_by_its_figure() {
    let mut runs = tokio::task::JoinSet::new();
    for name in Profile::NAMES {
        runs.spawn(async move {
            let profile = Profile::named(name).unwrap();
            let rounds = if profile.delay >= Duration::from_millis(100) {
                7
            } else {
                21
            };
            // Delays only: the flaky link's cuts and blackouts (tested below) would reset
            // this connection whenever it opens inside a blackout, 3 s of every 30 at a
            // random phase, one run in ten.
            let delays = Profile {
                cuts: None,
                ..profile.clone()
            };
            let (first, rtt) = round_trips(Link::new(delays), rounds).await;
            (profile, first, rtt)
        });
    }
    while let Some(run) = runs.join_next().await {
        let (profile, first, rtt) = run.unwrap();
        // A round trip is two one-way delays; the median of uniform jitter is about zero;
        // timers add up to a millisecond each way, the machine a few more.
        let expected = profile.delay * 2;
        let low = expected.saturating_sub(profile.jitter);
        let high = expected + profile.jitter + Duration::from_millis(8);
        assert!(
            rtt >= low && rtt <= high,
            "{profile}: median round trip {rtt:?}, expected {low:?}..{high:?}"
        );
        // The first echo also waits for the handshake: two round trips.
        assert!(
            first >= (expected * 2).saturating_sub(profile.jitter * 2),
            "{profile}: first echo after {first:?}"
        );
    }
}

/// The time from the first to the last of `bytes` written at once by the server.
async fn transfer(link: Link, bytes: usize) -> Duration {
    let proxy = Proxy::start(link, talker(Some(bytes)).await).await.unwrap();
    let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut buf = vec![0; 64 * 1024];
    let mut got = socket.read(&mut buf).await.unwrap();
    let first = Instant::now();
    while got < bytes {
        let n = socket.read(&mut buf).await.unwrap();
        assert!(n > 0, "ended after {got} bytes");
        got += n;
    }
    first.elapsed()
}

#[tokio::test]
async fn bandwidth_caps_hold_the_rate() {
    // 3g: 1.6 Mbit/s, 200 kB take 1 s; 4g: 20 Mbit/s, 2 MB take 0.8 s.
    for (name, bytes, expected) in [("3g", 200_000, 1.0), ("4g", 2_000_000, 0.8)] {
        let took = transfer(Link::new(Profile::named(name).unwrap()), bytes).await;
        let took = took.as_secs_f64();
        assert!(
            took >= expected * 0.9 && took <= expected * 1.3,
            "{name}: {bytes} bytes in {took:.3} s, expected about {expected} s"
        );
    }
    // Without a cap (lan), the same 2 MB cross in a small fraction of that.
    let lan = transfer(Link::new(Profile::named("lan").unwrap()), 2_000_000).await;
    assert!(lan < Duration::from_millis(300), "lan: {lan:?}");
}

/// How a connection through a flaky link ended.
#[derive(Debug, PartialEq)]
enum End {
    /// Reset before any byte: refused in a blackout.
    Refused,
    /// Closed (FIN) after this long.
    Closed(Duration),
    /// Reset after this long.
    Reset(Duration),
}

async fn lifetime(addr: SocketAddr) -> End {
    let opened = Instant::now();
    let Ok(mut socket) = TcpStream::connect(addr).await else {
        return End::Refused;
    };
    let mut buf = [0; 256];
    let mut got = 0;
    loop {
        match socket.read(&mut buf).await {
            Ok(0) => return End::Closed(opened.elapsed()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return if got == 0 {
                    End::Refused
                } else {
                    End::Reset(opened.elapsed())
                };
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn a_flaky_link_cuts_every_connection_resets_a_fifth_and_blacks_out() {
    // Times scaled by 1/20: cuts after 100-400 ms, a 150 ms blackout every 1.5 s.
    let flaky = Profile::named("flaky").unwrap().scaled(0.05);
    let proxy = Proxy::start(Link::new(flaky), talker(None).await)
        .await
        .unwrap();
    let addr = proxy.addr();
    // A connection every 15 ms for 3 s (two blackouts), each watched to its end.
    let mut watched = tokio::task::JoinSet::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        watched.spawn(lifetime(addr));
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let ends = watched.join_all().await;
    let refused = ends.iter().filter(|e| **e == End::Refused).count();
    let lives: Vec<(Duration, bool)> = ends
        .iter()
        .filter_map(|e| match e {
            End::Closed(d) => Some((*d, false)),
            End::Reset(d) => Some((*d, true)),
            End::Refused => None,
        })
        .collect();
    let resets = lives.iter().filter(|(_, reset)| *reset).count();
    let attempts = ends.len();
    eprintln!(
        "{attempts} connections: {refused} refused, {} cut, {resets} of them reset",
        lives.len()
    );
    // Every connection that got through was cut between 100 and 400 ms (+ scheduling).
    for (life, _) in &lives {
        assert!(
            *life >= Duration::from_millis(95) && *life <= Duration::from_millis(450),
            "cut after {life:?}"
        );
    }
    // A fifth of the cuts reset: expected 20%, binomial spread over ~170 cuts is ±3%.
    let share = resets as f64 / lives.len() as f64;
    assert!((0.08..=0.35).contains(&share), "reset share {share:.2}");
    // Blackouts cover a tenth of the time.
    let refused_share = refused as f64 / attempts as f64;
    assert!(
        (0.04..=0.2).contains(&refused_share),
        "refused share {refused_share:.2}"
    );
    assert_eq!(Counters::get(&proxy.counters().refused), refused as u64);
    assert_eq!(Counters::get(&proxy.counters().resets), resets as u64);
}

#[tokio::test]
async fn an_idle_cutter_closes_silent_connections_and_spares_talking_ones() {
    let link: Link = "lan+idle-cutter=300ms".parse().unwrap();
    // Silent after its first echo: cut 300 ms later.
    let proxy = Proxy::start(link.clone(), echo().await).await.unwrap();
    let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
    socket.write_all(b"a").await.unwrap();
    let mut buf = [0; 8];
    socket.read_exact(&mut buf[..1]).await.unwrap();
    let quiet = Instant::now();
    assert_eq!(socket.read(&mut buf).await.unwrap(), 0);
    let cut = quiet.elapsed();
    assert!(
        cut >= Duration::from_millis(290) && cut <= Duration::from_millis(450),
        "cut after {cut:?} of silence"
    );
    assert_eq!(Counters::get(&proxy.counters().idle_cuts), 1);
    // A byte every 10 ms: alive after a second.
    let proxy = Proxy::start(link, talker(None).await).await.unwrap();
    let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        assert!(socket.read(&mut buf).await.unwrap() > 0);
    }
    assert_eq!(Counters::get(&proxy.counters().idle_cuts), 0);
}

#[tokio::test]
async fn a_buffering_proxy_holds_sse_until_8_kib_and_lets_whole_answers_through() {
    let server = start().await;
    let held = Proxy::start("lan+buffering-proxy".parse().unwrap(), server.addr)
        .await
        .unwrap();
    let plain = Proxy::start("lan".parse().unwrap(), server.addr)
        .await
        .unwrap();
    // A poll's answer is whole: it goes through at once.
    let behind = Endpoint::new(&held.addr().to_string());
    server.publish("held", json!({"n": 0})).await;
    let (status, body) = behind.get("/topics/held/poll?after=0").await;
    assert_eq!(
        (status, body["messages"][0]["data"]["n"].clone()),
        (200, json!(0))
    );

    // An SSE stream never ends: nothing of it (not even its head) comes through the buffering
    // proxy until 8 KiB of it have, while the plain link shows it at once.
    let open = |addr: SocketAddr| async move {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        socket
            .write_all(b"GET /topics/held/sse?after=1 HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n")
            .await
            .unwrap();
        socket
    };
    let mut through_plain = open(plain.addr()).await;
    let mut through_held = open(held.addr()).await;
    let mut buf = vec![0; 64 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(2), through_plain.read(&mut buf))
        .await
        .expect("the plain link passes the head at once")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let payload = "x".repeat(200);
    for i in 0..10 {
        server
            .publish("held", json!({"n": i, "pad": payload}))
            .await;
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), through_held.read(&mut buf))
            .await
            .is_err(),
        "the buffering proxy let ~3 KiB of a stream through"
    );
    for i in 10..40 {
        server
            .publish("held", json!({"n": i, "pad": payload}))
            .await;
    }
    let n = tokio::time::timeout(Duration::from_secs(2), through_held.read(&mut buf))
        .await
        .expect("8 KiB go through")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let mut got = n;
    while got < 8192 {
        got += through_held.read(&mut buf).await.unwrap();
    }
    assert!(Counters::get(&held.counters().bytes_down) >= 8192);
}

#[tokio::test]
async fn a_no_websocket_proxy_refuses_the_upgrade_and_serves_the_rest() {
    let server = start().await;
    let proxy = Proxy::start("lan+no-websocket".parse().unwrap(), server.addr)
        .await
        .unwrap();
    let url = format!("ws://{}/topics/a/ws", proxy.addr());
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("the upgrade went through: {:?}", other.map(|_| ())),
    }
    assert_eq!(Counters::get(&proxy.counters().upgrades_refused), 1);
    // The same request through a plain link upgrades.
    let plain = Proxy::start("lan".parse().unwrap(), server.addr)
        .await
        .unwrap();
    let url = format!("ws://{}/topics/a/ws", plain.addr());
    assert!(tokio_tungstenite::connect_async(&url).await.is_ok());
    // Everything else passes the no-websocket proxy.
    let behind = Endpoint::new(&proxy.addr().to_string());
    server.publish("a", json!({"n": 1})).await;
    let (status, body) = behind.get("/topics/a/poll?after=0").await;
    assert_eq!(status, 200);
    assert_eq!(body["messages"][0]["data"]["n"], 1);
}

/// A client that reaches `host` (a `*.localhost` name) at `addr`, as browsers and curl do.
fn client_for(host: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .resolve(host, addr)
        .build()
        .unwrap()
}

/// Times one poll of `topic` through `host`.
async fn timed_poll(host: &str, addr: SocketAddr, topic: &str) -> (Duration, serde_json::Value) {
    let client = client_for(host, addr);
    let started = Instant::now();
    let body: serde_json::Value = client
        .get(format!(
            "http://{host}:{}/topics/{topic}/poll?after=0",
            addr.port()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (started.elapsed(), body)
}

#[tokio::test]
async fn a_server_serves_link_host_names_through_their_link() {
    let server = start().await;
    server.publish("lanes", json!({"n": 1})).await;
    // Straight: a fraction of a millisecond. Through `3g.localhost`: the handshake's round
    // trip, then the request's way and the answer's, 100 ms ± 30 each.
    let (direct, body) = timed_poll("localhost", server.addr, "lanes").await;
    assert_eq!(body["messages"][0]["data"]["n"], 1);
    let (linked, body) = timed_poll("3g.localhost", server.addr, "lanes").await;
    assert_eq!(body["messages"][0]["data"]["n"], 1, "the same answer");
    assert!(direct < Duration::from_millis(100), "{direct:?}");
    assert!(
        linked >= Duration::from_millis(340) && linked < Duration::from_secs(2),
        "{linked:?}"
    );
    // The lane counts what it forwarded once the write is done, which may be just after the
    // client has read it.
    let lanes = server.state.lanes.as_ref().unwrap();
    support::eventually("the lane to count the answer", || async {
        Counters::get(&lanes.counters().bytes_down) > 100
    })
    .await;

    // A middlebox joins with `--`: this proxy refuses the upgrade.
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(
            b"GET /topics/lanes/ws HTTP/1.1\r\nhost: lan--no-websocket.localhost\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    socket.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 403"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test]
async fn link_hosts_are_plain_names_when_turned_off() {
    let config = pushhub::Config {
        link_hosts: pushhub::config::LinkHosts::Off,
        ..Default::default()
    };
    let server = support::start_with(config).await;
    assert!(server.state.lanes.is_none());
    server.publish("plain", json!({"n": 1})).await;
    let (took, body) = timed_poll("satellite.localhost", server.addr, "plain").await;
    assert_eq!(body["messages"][0]["data"]["n"], 1);
    assert!(took < Duration::from_millis(300), "{took:?}");
}
