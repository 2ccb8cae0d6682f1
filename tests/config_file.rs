//! The configuration file end to end, through the real binary: what it sets reaches the
//! server; flags, then the environment, then the file, then defaults; every kind of mistake
//! stops the start with the file, line and key; `pushhub config` prints the effective
//! configuration (secrets redacted), and with nothing set it is docs/operations.md's
//! commented example.

mod support;

use std::{path::PathBuf, process::Command};

use serde_json::json;
use support::{ids, spawn_binary};

/// Writes `text` to a fresh file named after `name`.
fn file(name: &str, text: &str) -> support::Removed {
    let path = std::env::temp_dir().join(format!("pushhub-{name}-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    support::Removed(path)
}

/// Runs `pushhub ARGS` with only `envs` in its environment: (exit code, stdout, stderr).
fn pushhub(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_pushhub"))
        .env_clear()
        .envs(envs.iter().copied())
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The line `pushhub config` prints for `key`.
fn setting(printed: &str, key: &str) -> String {
    printed
        .lines()
        .find(|l| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no {key} in {printed}"))
        .to_owned()
}

#[tokio::test]
async fn the_server_runs_with_what_the_file_sets() {
    let path = file(
        "runs",
        "[history]\nhistory_size = 2\n\n[limits]\nmax_body = 40\n",
    );
    let server = spawn_binary(&["--config", path.to_str().unwrap()], &[]);
    let node = server.endpoint();
    for n in 1..=3 {
        node.publish("kept", json!(n)).await;
    }
    let (_, history) = node.get("/topics/kept/poll?after=0").await;
    assert_eq!(
        ids(history["messages"].as_array().unwrap()),
        [2, 3],
        "{history}"
    );
    let big = node
        .http
        .post(node.url("/topics/kept"))
        .json(&json!("x".repeat(60)))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413, "max_body from the file");
    // The same file through PUSHHUB_CONFIG, with the environment over it.
    let server = spawn_binary(
        &[],
        &[
            ("PUSHHUB_CONFIG", path.to_str().unwrap()),
            ("PUSHHUB_HISTORY_SIZE", "3"),
        ],
    );
    let node = server.endpoint();
    for n in 1..=4 {
        node.publish("kept", json!(n)).await;
    }
    let (_, history) = node.get("/topics/kept/poll?after=0").await;
    assert_eq!(ids(history["messages"].as_array().unwrap()), [2, 3, 4]);
}

#[test]
fn flags_win_over_the_environment_which_wins_over_the_file() {
    let path = file(
        "precedence",
        "[server]\nlisten = \"127.0.0.1:9001\"\nworkers = 3\n\n[history]\nhistory_size = 11\nhistory_max_age = \"10m\"\n",
    );
    let config = path.to_str().unwrap();
    let (code, printed, stderr) = pushhub(
        &["config", "--config", config, "--history-size", "33"],
        &[("PUSHHUB_HISTORY_SIZE", "22"), ("PUSHHUB_WORKERS", "2")],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        setting(&printed, "history_size"),
        "history_size = 33 # flag"
    );
    assert_eq!(setting(&printed, "workers"), "workers = 2 # environment");
    assert_eq!(
        setting(&printed, "listen"),
        "listen = \"127.0.0.1:9001\" # file"
    );
    assert_eq!(
        setting(&printed, "history_max_age"),
        "history_max_age = \"10m\" # file"
    );
    assert_eq!(
        setting(&printed, "poll_limit"),
        "poll_limit = 100 # default"
    );
    // The file alone: what it holds, over the defaults.
    let (code, printed, _) = pushhub(&["config", "--config", config], &[]);
    assert_eq!(code, 0);
    assert_eq!(
        setting(&printed, "history_size"),
        "history_size = 11 # file"
    );
    assert_eq!(setting(&printed, "workers"), "workers = 3 # file");
}

#[test]
fn secrets_are_redacted_in_what_config_prints() {
    let path = file(
        "secrets",
        "[auth]\njwt_secret = \"hunter2\"\npublic_topics = [\"news.*\", \"lobby\"]\n\n[redis]\nredis = \"redis://app:pw123@127.0.0.1:6379/0\"\n",
    );
    let (code, printed, stderr) = pushhub(&["config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !printed.contains("hunter2") && !printed.contains("pw123"),
        "{printed}"
    );
    assert_eq!(
        setting(&printed, "jwt_secret"),
        "jwt_secret = \"<redacted>\" # file"
    );
    assert_eq!(
        setting(&printed, "redis"),
        "redis = \"redis://app:<redacted>@127.0.0.1:6379/0\" # file"
    );
    assert_eq!(
        setting(&printed, "public_topics"),
        "public_topics = [\"news.*\", \"lobby\"] # file"
    );
}

#[test]
fn a_bad_file_stops_the_start_naming_the_key_and_its_line() {
    let cases = [
        (
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[history]\nhistroy_size = 5\n",
            "line 5: unknown key `histroy_size` in [history]",
        ),
        (
            "[history]\nhistory_size = \"50\"\n",
            "line 2: `history_size` must be an integer",
        ),
        (
            "[transports]\nheartbeat = 15\n",
            "line 2: `heartbeat` must be a string",
        ),
        (
            "[auth]\npublic_topics = \"news.*\"\n",
            "line 2: `public_topics` must be an array of strings",
        ),
        (
            "[server]\nhistory_size = 5\n",
            "line 2: `history_size` belongs in [history], not [server]",
        ),
        (
            "# a comment\n[storage]\ndata_dir = \"/tmp/x\"\n",
            "line 2: unknown section [storage]",
        ),
        (
            "history_size = 5\n",
            "line 1: `history_size` belongs in [history]",
        ),
        (
            "[history]\nhistory_size = 0\n",
            "line 2: `history_size` = \"0\": invalid value '0'",
        ),
        (
            "[transports]\ntransports = [\"ws\", \"carrier-pigeon\"]\n",
            "line 2: `transports` = \"ws,carrier-pigeon\": invalid value 'carrier-pigeon'",
        ),
        ("[server\n", "TOML parse error at line 1"),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = file(&format!("bad{i}"), text);
        let (code, printed, stderr) = pushhub(&["--config", path.to_str().unwrap()], &[]);
        assert_eq!(code, 2, "{text:?}: {stderr}");
        assert!(printed.is_empty(), "{text:?}: nothing served or printed");
        assert!(
            stderr.contains(&format!("config file {}", path.display()))
                && stderr.contains(expected),
            "{text:?}: expected {expected:?} in {stderr:?}"
        );
    }
    let (code, _, stderr) = pushhub(&["--config", "/nonexistent/pushhub.toml"], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/pushhub.toml"), "{stderr}");
}

#[test]
fn the_documented_example_is_what_config_prints_for_the_defaults() {
    let (code, printed, stderr) = pushhub(&["config"], &[]);
    assert_eq!(code, 0, "{stderr}");
    let docs = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"),
    )
    .unwrap();
    let example = docs
        .split("<!-- pushhub config: defaults -->\n```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/operations.md holds the example");
    assert_eq!(example, printed, "docs/operations.md's example is stale");
    // And it is a file pushhub reads back to the same configuration.
    let path = file("roundtrip", &printed);
    let (code, again, stderr) = pushhub(&["config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(again.replace(" # file\n", " # default\n"), printed);
}
