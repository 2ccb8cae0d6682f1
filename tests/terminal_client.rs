//! `pushhub sub` and `pushhub pub` as a script runs them: the real binary against a real
//! server on an ephemeral port, over every transport; `| head` from a shell; a refused
//! token is exit 2 with the server's message; `sub` reconnects across a server restart and
//! resumes without losing or repeating a message.

mod support;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Stdio},
    time::Duration,
};

use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use support::{free_port, spawn_binary};

const BINARY: &str = env!("CARGO_BIN_EXE_pushhub");

/// Runs `pushhub ARGS` with `stdin`: (exit code, stdout lines, stderr).
fn pushhub(args: &[&str], stdin: &str) -> (i32, Vec<String>, String) {
    let mut child = Command::new(BINARY)
        .args(args)
        .env_remove("PUSHHUB_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn json_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[test]
fn pub_prints_each_acknowledgement_and_sub_resumes_on_every_transport() {
    let server = spawn_binary(&[], &[]);
    let url = format!("http://{}", server.addr);
    let (code, acks, stderr) = pushhub(&["pub", "news", r#"{"n":1}"#, "--url", &url], "");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json_lines(&acks)[0]["id"], 1);
    let (code, acks, stderr) =
        pushhub(&["pub", "news", "--url", &url], "plain text\n{\"n\":3}\n\n");
    assert_eq!(code, 0, "{stderr}");
    let ids: Vec<Value> = json_lines(&acks).iter().map(|a| a["id"].clone()).collect();
    assert_eq!(ids, [json!(2), json!(3)], "one message per non-empty line");
    for transport in ["sse", "stream", "ws", "longpoll", "poll"] {
        let args = ["sub", "news", "--transport", transport, "--url", &url];
        let (code, lines, stderr) =
            pushhub(&[&args[..], &["--after", "0", "--count", "2"]].concat(), "");
        assert_eq!(code, 0, "{transport}: {stderr}");
        let got = json_lines(&lines);
        assert_eq!(
            got.iter()
                .map(|e| (e["id"].clone(), e["data"].clone()))
                .collect::<Vec<_>>(),
            [(json!(1), json!({"n": 1})), (json!(2), json!("plain text"))],
            "{transport}"
        );
        assert!(
            stderr.contains("resume with --after 2"),
            "{transport}: {stderr}"
        );
        // The cursor it printed resumes after what it printed: nothing lost, nothing again.
        let (code, lines, stderr) =
            pushhub(&[&args[..], &["--after", "2", "--count", "1"]].concat(), "");
        assert_eq!(code, 0, "{transport}: {stderr}");
        assert_eq!(json_lines(&lines)[0]["id"], 3, "{transport}");
        assert!(
            stderr.contains("resume with --after 3"),
            "{transport}: {stderr}"
        );
    }
}

#[test]
fn sub_piped_into_head_ends_with_head() {
    let server = spawn_binary(&[], &[]);
    let url = format!("http://{}", server.addr);
    pushhub(&["pub", "piped", "--url", &url], "1\n2\n3\n");
    let started = std::time::Instant::now();
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{BINARY} sub piped --after 0 --url {url} | head -n 2"
        ))
        .output()
        .unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        json_lines(&lines)
            .iter()
            .map(|e| e["id"].clone())
            .collect::<Vec<_>>(),
        [json!(1), json!(2)]
    );
    // The topic is quiet after 3: sub notices head is gone without a next message.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_refused_token_is_exit_2_with_the_servers_message() {
    let secret = "terminal-secret";
    let server = spawn_binary(&["--jwt-secret", secret], &[]);
    let url = format!("http://{}", server.addr);
    let (code, _, stderr) = pushhub(&["pub", "locked", "x", "--url", &url], "");
    assert_eq!(code, 2, "no token: {stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    let (code, _, stderr) = pushhub(
        &["pub", "locked", "x", "--url", &url, "--token", "not.a.jwt"],
        "",
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.to_lowercase().contains("token"),
        "the server's message: {stderr}"
    );
    for transport in ["sse", "ws", "longpoll"] {
        let (code, _, stderr) = pushhub(
            &[
                "sub",
                "locked",
                "--transport",
                transport,
                "--url",
                &url,
                "--token",
                "not.a.jwt",
            ],
            "",
        );
        assert_eq!(code, 2, "{transport}: {stderr}");
    }
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let token = encode(
        &Header::default(),
        &json!({"exp": exp, "sub": "cli", "pushhub": {"publish": ["locked"], "subscribe": ["locked"]}}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let (code, acks, stderr) = pushhub(
        &["pub", "locked", "x", "--url", &url, "--token", &token],
        "",
    );
    assert_eq!(
        (code, json_lines(&acks)[0]["id"].clone()),
        (0, json!(1)),
        "{stderr}"
    );
    let (code, lines, stderr) = pushhub(
        &[
            "sub", "locked", "--after", "0", "--count", "1", "--url", &url, "--token", &token,
        ],
        "",
    );
    assert_eq!(
        (code, json_lines(&lines)[0]["data"].clone()),
        (0, json!("x")),
        "{stderr}"
    );
    // A server that is not there: exit 1, not 2.
    let (code, _, _) = pushhub(
        &[
            "pub",
            "t",
            "x",
            "--url",
            &format!("http://127.0.0.1:{}", free_port()),
        ],
        "",
    );
    assert_eq!(code, 1);
}

/// `pushhub ARGS` running, its stdout and stderr piped.
fn spawn_sub(args: &[&str]) -> Child {
    Command::new(BINARY)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A server on `port` keeping history in `dir`, and its startup waited for.
fn server_on(port: u16, dir: &std::path::Path) -> Child {
    let mut child = Command::new(BINARY)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir)
        .env("PUSHHUB_LOG", "pushhub=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while let Some(Ok(line)) = lines.next() {
        if line.contains("listening on") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    child
}

#[test]
fn sub_reconnects_across_a_restart_and_misses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    for transport in ["stream", "ws"] {
        let topic = format!("restart-{transport}");
        let mut server = server_on(port, dir.path());
        let sub = spawn_sub(&[
            "sub",
            &topic,
            "--transport",
            transport,
            "--after",
            "0",
            "--count",
            "4",
            "--url",
            &url,
        ]);
        pushhub(&["pub", &topic, "--url", &url], "1\n2\n");
        std::thread::sleep(Duration::from_millis(300));
        server.kill().unwrap();
        server.wait().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let mut server = server_on(port, dir.path());
        pushhub(&["pub", &topic, "--url", &url], "3\n4\n");
        let output = sub.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        let got: Vec<(Value, Value)> = json_lines(&lines)
            .iter()
            .map(|e| (e["id"].clone(), e["data"].clone()))
            .collect();
        assert_eq!(
            got,
            (1..=4).map(|n| (json!(n), json!(n))).collect::<Vec<_>>(),
            "{transport}: every message once, in order: {stderr}"
        );
        assert!(
            stderr.contains("connecting again"),
            "{transport}: it did reconnect: {stderr}"
        );
        server.kill().unwrap();
        server.wait().unwrap();
    }
}

#[test]
fn heartbeats_are_not_printed() {
    let server = spawn_binary(&["--heartbeat", "100ms"], &[]);
    let url = format!("http://{}", server.addr);
    for transport in ["stream", "sse"] {
        let topic = format!("quiet-{transport}");
        let sub = spawn_sub(&[
            "sub",
            &topic,
            "--transport",
            transport,
            "--count",
            "1",
            "--url",
            &url,
        ]);
        // Several heartbeats go by before the one message.
        std::thread::sleep(Duration::from_millis(600));
        pushhub(&["pub", &topic, "--url", &url], "only\n");
        let output = sub.wait_with_output().unwrap();
        let lines: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(lines.len(), 1, "{transport}: {lines:?}");
        assert_eq!(json_lines(&lines)[0]["data"], "only", "{transport}");
    }
}

#[test]
fn sub_follows_a_topic_list_and_resumes_it_from_the_cursor_it_prints() {
    let server = spawn_binary(&[], &[]);
    let url = format!("http://{}", server.addr);
    for (topic, data) in [
        ("room.a", "1"),
        ("room.b", "2"),
        ("other", "3"),
        ("room.a", "4"),
    ] {
        let (code, _, stderr) = pushhub(&["pub", topic, data, "--url", &url], "");
        assert_eq!(code, 0, "{stderr}");
    }
    for transport in ["sse", "stream", "ws", "longpoll", "poll"] {
        let sub = |after: &str, count: &str| {
            let args = [
                "sub",
                "other,room.*",
                "--transport",
                transport,
                "--url",
                &url,
            ];
            pushhub(
                &[&args[..], &["--after", after, "--count", count]].concat(),
                "",
            )
        };
        let (code, lines, stderr) = sub("0", "2");
        assert_eq!(code, 0, "{transport}: {stderr}");
        let after = stderr
            .lines()
            .find_map(|l| l.strip_prefix("pushhub sub: resume with --after "))
            .unwrap_or_else(|| panic!("{transport}: no cursor in {stderr:?}"))
            .to_owned();
        let (code, rest, stderr) = sub(&after, "2");
        assert_eq!(code, 0, "{transport}: {stderr}");
        let mut seen: Vec<(String, u64)> = json_lines(&lines)
            .iter()
            .chain(&json_lines(&rest))
            .map(|e| {
                (
                    e["topic"].as_str().unwrap().to_owned(),
                    e["id"].as_u64().unwrap(),
                )
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                ("other".into(), 1),
                ("room.a".into(), 1),
                ("room.a".into(), 2),
                ("room.b".into(), 1)
            ],
            "{transport}: every message of the list once, across two runs"
        );
    }
}

#[test]
fn sub_names_itself_and_prints_who_joins_with_presence() {
    let server = spawn_binary(&[], &[]);
    let url = format!("http://{}", server.addr);
    let mut watcher = spawn_sub(&[
        "sub",
        "lobby",
        "--transport",
        "stream",
        "--client",
        "tess",
        "--presence",
        "--url",
        &url,
    ]);
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    let mut next =
        || -> Value { serde_json::from_str(&lines.next().expect("sub ended").unwrap()).unwrap() };
    // Its own join first, then another named subscriber's.
    let own = next();
    assert_eq!(
        (own["type"].as_str(), own["joins"][0]["client"].as_str()),
        (Some("presence"), Some("tess"))
    );
    let (status, list) = {
        let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
        write!(
            stream,
            "GET /topics/lobby/presence HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_owned(), body.to_owned())
    };
    assert!(status.contains("200"), "{status}");
    assert!(list.contains(r#""client":"tess""#), "{list}");
    let mut other = spawn_sub(&["sub", "lobby", "--client", "uma", "--url", &url]);
    let joined = next();
    assert_eq!(joined["joins"][0]["client"], "uma");
    assert_eq!(joined["joins"][0]["transport"], "sse");
    other.kill().unwrap();
    other.wait().unwrap();
    let left = next();
    assert_eq!(left["leaves"][0]["client"], "uma");
    let (code, _, stderr) = pushhub(
        &["sub", "lobby", "--client", "no spaces", "--url", &url],
        "",
    );
    assert_eq!(code, 2, "{stderr}");
    watcher.kill().unwrap();
    watcher.wait().unwrap();
}
