//! `pushhub sub` and `pushhub pub`: the terminal client, as ntfy's CLI or websocat are for
//! their servers. Both run over the bench's own clients ([`crate::bench::http`]'s
//! connection and stream splitting, the bench's WebSocket set-up and reconnect pacing), so
//! what a script sees is what the bench measures.
//!
//! `sub` prints one envelope per line (NDJSON, signals included) on any transport,
//! reconnects by itself from the last id it printed, and says on stderr, when it ends, the
//! `--after` that resumes it. `pub` publishes its argument, or one message per line of
//! stdin, and prints each acknowledgement. Exit codes: 0 done, 1 the server could not be
//! used (unreachable, or a refusal other than auth), 2 refused for its token (401 or 403,
//! with the server's message).

mod publish;
mod subscribe;

use clap::Args;

pub use publish::publish;
pub use subscribe::subscribe;

use crate::message::TransportKind;

/// Where and as whom a command talks to the server.
#[derive(Args, Debug, Clone)]
pub struct Server {
    /// The server's base URL (plain HTTP; for TLS, use curl).
    #[arg(long, env = "PUSHHUB_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// A token (JWT) sent as `Authorization: Bearer`.
    #[arg(long, env = "PUSHHUB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl Server {
    /// A connection to the server, carrying the token.
    fn connection(&self) -> crate::bench::http::Connection {
        let connection = crate::bench::http::Connection::new(&self.url);
        match &self.token {
            Some(token) => connection.with_header(&format!("authorization: Bearer {token}")),
            None => connection,
        }
    }
}

/// Flags of `pushhub sub`.
#[derive(Args, Debug, Clone)]
pub struct SubArgs {
    /// The topic to follow, or a list of topics and patterns (`chat.lobby,news.*`) followed
    /// on one connection.
    pub topic: String,
    /// How: `ws`, `sse`, `stream` (NDJSON), `longpoll` or `poll`.
    #[arg(long, default_value = "sse", value_parser = parse_transport)]
    pub transport: TransportKind,
    /// Start after this cursor (what a previous run printed on exit: a message id, or a
    /// topic list's cursor string; `0`: from the start of the history). Without it: from
    /// now.
    #[arg(long)]
    pub after: Option<String>,
    /// Stop after this many envelopes (signals not counted). Then the `--after` printed on
    /// exit is exact; a reader that stops reading early (`| head`) may leave lines written
    /// but unread, which that cursor counts as seen.
    #[arg(long)]
    pub count: Option<u64>,
    /// How often `--transport poll` asks.
    #[arg(long, default_value = "1s", value_parser = crate::config::parse_duration)]
    pub interval: std::time::Duration,
    /// The name to appear under in the topics' presence lists (a token's subject wins).
    #[arg(long, value_parser = crate::config::parse_name)]
    pub client: Option<String>,
    /// Also print the topics' `presence` envelopes (who joins and leaves; streams only).
    #[arg(long)]
    pub presence: bool,
    /// The server, and the token.
    #[command(flatten)]
    pub server: Server,
}

/// Flags of `pushhub pub`.
#[derive(Args, Debug, Clone)]
pub struct PubArgs {
    /// The topic to publish to.
    pub topic: String,
    /// The message: JSON, or else sent as a JSON string. Without it, each line of stdin is
    /// one message.
    pub data: Option<String>,
    /// The server, and the token.
    #[command(flatten)]
    pub server: Server,
}

/// Why a command stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the token (401, 403): exit 2.
    #[error("refused ({status}): {message}")]
    Refused {
        /// The status.
        status: u16,
        /// The server's own message.
        message: String,
    },
    /// Anything else: exit 1.
    #[error("{0}")]
    Failed(String),
}

impl ClientError {
    /// The process's exit code for it.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Refused { .. } => 2,
            ClientError::Failed(_) => 1,
        }
    }

    /// The error for an answer with `status` and `body`: auth refusals apart.
    fn answered(status: u16, body: &[u8]) -> Self {
        let message = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
        match status {
            401 | 403 => ClientError::Refused { status, message },
            _ => ClientError::Failed(format!("answered {status}: {message}")),
        }
    }
}

/// The transports `sub` reads: pushhub's own.
fn parse_transport(value: &str) -> Result<TransportKind, String> {
    match value.parse::<TransportKind>() {
        Ok(kind) if !kind.is_durable() => Ok(kind),
        _ => Err(format!(
            "unknown transport {value:?}: use ws, sse, stream, longpoll or poll"
        )),
    }
}
