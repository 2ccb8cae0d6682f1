//! The configuration file (`--config pushhub.toml`, or `PUSHHUB_CONFIG`): every flag of
//! `pushhub serve`, grouped by layer, under the flag's name with `_` for `-`
//! (`--history-size` is `history_size` in `[history]`).
//!
//! A flag wins over its environment variable, which wins over the file, which wins over the
//! default: the file only fills in what neither a flag nor the environment set, and it does
//! so by handing clap the same text a flag would carry, so a value means the same in the
//! file as on the command line and is checked by the same parser. An unknown section or
//! key, a value of the wrong TOML type, or one the flag would refuse stops the start with
//! the file, the line and the key. `pushhub config` prints the effective configuration in
//! the same form, each value with where it came from, secrets redacted ([`render`]).

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use clap::{Arg, ArgMatches, Command, error::ContextKind, parser::ValueSource};
use toml_edit::{Document, Item, Value};

/// What a key's value must be in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A TOML integer (sizes, counts).
    Integer,
    /// A TOML string: addresses, paths, durations (`"25s"`), choices (`"resync"`).
    Text,
    /// A TOML array of strings (a comma-separated flag).
    List,
}

/// One key of the file: the flag (its clap id) it sets, and what its value must be.
struct Key {
    id: &'static str,
    kind: Kind,
}

const fn int(id: &'static str) -> Key {
    Key {
        id,
        kind: Kind::Integer,
    }
}

const fn text(id: &'static str) -> Key {
    Key {
        id,
        kind: Kind::Text,
    }
}

const fn list(id: &'static str) -> Key {
    Key {
        id,
        kind: Kind::List,
    }
}

/// The file's sections, by layer from the socket up, in the order `pushhub config` prints
/// them. Every flag of `pushhub serve` is in exactly one (a test holds it so).
const SECTIONS: &[(&str, &[Key])] = &[
    (
        "server",
        &[
            text("listen"),
            int("listen_backlog"),
            int("workers"),
            text("tls_cert"),
            text("tls_key"),
            text("header_timeout"),
            int("max_header_bytes"),
            text("shutdown_grace"),
            text("link_hosts"),
        ],
    ),
    (
        "limits",
        &[
            int("max_connections"),
            int("max_connections_per_ip"),
            int("file_reserve"),
            int("publish_rate"),
            int("max_body"),
            int("max_parked_longpolls"),
            int("max_subscriptions_per_connection"),
            int("poll_limit"),
            int("max_poll_limit"),
        ],
    ),
    (
        "auth",
        &[
            text("jwt_secret"),
            text("jwt_public_key"),
            list("public_topics"),
            list("allowed_origins"),
        ],
    ),
    (
        "transports",
        &[
            list("transports"),
            text("heartbeat"),
            text("sse_retry"),
            text("longpoll_timeout"),
            text("longpoll_max_timeout"),
            text("poller_window"),
            int("ws_max_message"),
            int("ws_read_buffer"),
            int("ws_write_buffer"),
            text("ws_ping_interval"),
            text("ws_pong_timeout"),
            text("stall_timeout"),
        ],
    ),
    (
        "durable_streams",
        &[
            text("ds_path"),
            int("ds_max_body"),
            text("ds_long_poll_timeout"),
        ],
    ),
    (
        "hub",
        &[
            int("subscriber_queue"),
            int("catch_up_batch"),
            text("sweep_interval"),
            text("slow_consumer"),
            text("write_delay"),
        ],
    ),
    (
        "history",
        &[
            int("history_size"),
            text("history_max_age"),
            text("data_dir"),
            text("fsync"),
            text("fsync_window"),
        ],
    ),
    (
        "redis",
        &[
            text("redis"),
            text("redis_mode"),
            int("redis_min_replicas"),
            text("redis_replica_timeout"),
            text("node_name"),
        ],
    ),
];

/// Keys whose values `pushhub config` does not print: the JWT secret, and the password in
/// a Redis URL.
const SECRETS: &[&str] = &["jwt_secret", "redis"];

/// Why a command line and its configuration file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The command line itself (clap prints it, with usage, and exits 2).
    #[error(transparent)]
    Flags(#[from] clap::Error),
    /// The file could not be read or parsed.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong (TOML's own error names the line and column).
        message: String,
    },
    /// A key of the file is unknown, or its value wrong.
    #[error("config file {path}, line {line}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// The key's line, from 1.
        line: usize,
        /// Which key, and what is wrong with it.
        message: String,
    },
}

/// A command line parsed with its configuration file applied.
#[derive(Debug)]
pub struct Parsed {
    /// What clap matched, the file's values included.
    pub matches: ArgMatches,
    /// The file read, if any.
    pub file: Option<PathBuf>,
    /// The ids of the settings the file gave.
    pub from_file: BTreeSet<String>,
}

/// Parses `argv` with `command`; when `--config` (or `PUSHHUB_CONFIG`) names a file, the
/// settings of the subcommands named `serving` (or of the command itself, when no
/// subcommand is given) that no flag and no environment variable set are taken from it.
pub fn parse(
    command: &Command,
    argv: Vec<OsString>,
    serving: &[&str],
) -> Result<Parsed, ConfigError> {
    let first = command.clone().try_get_matches_from(&argv)?;
    let file = first.get_one::<PathBuf>("config").cloned();
    let settings = match first.subcommand() {
        Some((name, sub)) if serving.contains(&name) => Some((Some(name), sub)),
        Some(_) => None,
        None => Some((None, &first)),
    };
    let (Some(path), Some((subcommand, matches))) = (&file, settings) else {
        return Ok(Parsed {
            matches: first,
            file,
            from_file: BTreeSet::new(),
        });
    };
    let args = match subcommand {
        Some(name) => command
            .find_subcommand(name)
            .expect("matched")
            .get_arguments()
            .cloned()
            .collect::<Vec<_>>(),
        None => command.get_arguments().cloned().collect(),
    };
    let values = read(path, &args)?;
    let mut argv = argv;
    let mut from_file = BTreeSet::new();
    for FileValue { arg, value, .. } in &values {
        let id = arg.get_id().as_str();
        let unset = matches!(
            matches.value_source(id),
            None | Some(ValueSource::DefaultValue)
        );
        // An empty list is what an unset list flag means already; `--flag=` would be one
        // empty element.
        let empty = value.is_empty();
        if unset
            && !empty
            && let Some(long) = arg.get_long()
        {
            argv.push(format!("--{long}={value}").into());
            from_file.insert(id.to_owned());
        }
    }
    // The flags' own parsers check the file's values: a refusal of one is the file's error.
    let matches = command
        .clone()
        .try_get_matches_from(argv)
        .map_err(|error| refusal(error, &values, &from_file, path))?;
    Ok(Parsed {
        matches,
        file,
        from_file,
    })
}

/// A refusal of the command line with the file's values added: the file's error, with
/// the line of the value refused, when the value came from the file.
fn refusal(
    error: clap::Error,
    values: &[FileValue],
    from_file: &BTreeSet<String>,
    path: &Path,
) -> ConfigError {
    let refused = error.get(ContextKind::InvalidArg).map(ToString::to_string);
    let flag = refused
        .as_deref()
        .and_then(|r| r.split([' ', '=']).next())
        .map(str::to_owned);
    let from = values.iter().find(|v| {
        from_file.contains(v.arg.get_id().as_str())
            && v.arg.get_long().map(|long| format!("--{long}")) == flag
    });
    match from {
        Some(v) => ConfigError::Key {
            path: path.to_owned(),
            line: v.line,
            message: format!(
                "`{}` = {:?}: {}",
                v.arg.get_id(),
                v.value,
                first_line(&error)
            ),
        },
        None => ConfigError::Flags(error),
    }
}

/// A clap error's first line, without its `error: ` prefix.
fn first_line(error: &clap::Error) -> String {
    let text = error.render().to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// One setting the file holds.
struct FileValue {
    arg: Arg,
    /// As its flag would carry it.
    value: String,
    line: usize,
}

/// Reads and checks the file: each key it sets, as the text its flag would carry.
fn read(path: &Path, args: &[Arg]) -> Result<Vec<FileValue>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let document = Document::parse(text.as_str()).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let at = |span: Option<std::ops::Range<usize>>, message: String| ConfigError::Key {
        path: path.to_owned(),
        line: span.map_or(0, |s| text[..s.start].matches('\n').count() + 1),
        message,
    };
    let mut values = Vec::new();
    for (section_name, item) in document.as_table().iter() {
        let section_key = document.as_table().key(section_name).and_then(|k| k.span());
        let Some((_, keys)) = SECTIONS.iter().find(|(name, _)| *name == section_name) else {
            let hint = match SECTIONS
                .iter()
                .find(|(_, keys)| keys.iter().any(|k| k.id == section_name))
            {
                Some((section, _)) => format!("`{section_name}` belongs in [{section}]"),
                None => format!(
                    "unknown section [{section_name}] (sections: {})",
                    SECTIONS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            return Err(at(section_key, hint));
        };
        let Some(table) = item.as_table_like() else {
            return Err(at(section_key, format!("[{section_name}] must be a table")));
        };
        for (name, item) in table.iter() {
            let span = table.key(name).and_then(|k| k.span());
            let Some(key) = keys.iter().find(|k| k.id == name) else {
                let elsewhere = SECTIONS
                    .iter()
                    .find(|(_, keys)| keys.iter().any(|k| k.id == name));
                return Err(at(
                    span,
                    match elsewhere {
                        Some((section, _)) => {
                            format!("`{name}` belongs in [{section}], not [{section_name}]")
                        }
                        None => format!("unknown key `{name}` in [{section_name}]"),
                    },
                ));
            };
            let arg = args
                .iter()
                .find(|a| a.get_id() == key.id)
                .expect("every key is a flag (tested)");
            let value = flag_text(key, item)
                .map_err(|wanted| at(span.clone(), format!("`{name}` must be {wanted}")))?;
            let line = match at(span, String::new()) {
                ConfigError::Key { line, .. } => line,
                _ => 0,
            };
            values.push(FileValue {
                arg: arg.clone(),
                value,
                line,
            });
        }
    }
    Ok(values)
}

/// The text a flag would carry for `item`, or what it should have been.
fn flag_text(key: &Key, item: &Item) -> Result<String, &'static str> {
    let value = item.as_value();
    match (key.kind, value) {
        (Kind::Integer, Some(Value::Integer(n))) => Ok(n.value().to_string()),
        (Kind::Integer, _) => Err("an integer"),
        (Kind::Text, Some(Value::String(s))) => Ok(s.value().clone()),
        (Kind::Text, _) => Err("a string (a duration is written \"25s\")"),
        (Kind::List, Some(Value::Array(items))) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or("an array of strings"))
            .collect::<Result<Vec<_>, _>>()
            .map(|items| items.join(",")),
        (Kind::List, _) => Err("an array of strings"),
    }
}

/// Where a setting's value came from.
fn source(parsed: &Parsed, matches: &ArgMatches, id: &str) -> &'static str {
    if parsed.from_file.contains(id) {
        return "file";
    }
    match matches.value_source(id) {
        Some(ValueSource::CommandLine) => "flag",
        Some(ValueSource::EnvVariable) => "environment",
        Some(ValueSource::DefaultValue) => "default",
        _ => "unset",
    }
}

/// The effective configuration of `matches` (the settings' own matches: a subcommand's, or
/// the command's) as a commented TOML file, each value with where it came from and the
/// flag and variable that also set it; secrets redacted. With no flag, variable or file it
/// is the commented example of docs/operations.md (a test holds them equal).
pub fn render(parsed: &Parsed, command: &Command, matches: &ArgMatches) -> String {
    let mut out = String::from(
        "# pushhub's configuration, as `pushhub config` prints it. Each key is a flag of\n\
         # `pushhub serve`; a flag wins over its PUSHHUB_* variable, which wins over this\n\
         # file, which wins over the default. The comment after each value says which set it.\n",
    );
    for (section, keys) in SECTIONS {
        let _ = write!(out, "\n[{section}]\n");
        for key in *keys {
            let Some(arg) = command.get_arguments().find(|a| a.get_id() == key.id) else {
                continue;
            };
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let env = arg
                .get_env()
                .map(|e| format!(", {}", e.to_string_lossy()))
                .unwrap_or_default();
            let flag = arg.get_long().unwrap_or(key.id);
            for line in wrap(&format!("{help} (--{flag}{env})"), 86) {
                let _ = writeln!(out, "# {line}");
            }
            let raw: Vec<String> = matches
                .get_raw(key.id)
                .map(|values| values.map(|v| v.to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            let origin = source(parsed, matches, key.id);
            if raw.is_empty() && key.kind != Kind::List {
                let _ = writeln!(out, "# {} = (unset)", key.id);
                continue;
            }
            let raw: Vec<String> = raw.iter().map(|v| redact(key.id, v)).collect();
            let value = match key.kind {
                Kind::Integer => raw.join(","),
                Kind::Text => quote(&raw.join(",")),
                Kind::List => format!(
                    "[{}]",
                    raw.iter().map(|v| quote(v)).collect::<Vec<_>>().join(", ")
                ),
            };
            let _ = writeln!(out, "{} = {value} # {origin}", key.id);
        }
    }
    out
}

/// A value as `pushhub config` may print it: the JWT secret not at all, a Redis URL
/// without its password.
fn redact(id: &str, value: &str) -> String {
    if !SECRETS.contains(&id) {
        return value.to_owned();
    }
    if id != "redis" {
        return "<redacted>".into();
    }
    value
        .split(',')
        .map(|url| match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let credentials = &url[scheme + 3..at];
                let user = credentials.split(':').next().unwrap_or_default();
                format!("{}{user}:<redacted>{}", &url[..scheme + 3], &url[at..])
            }
            _ => url.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A TOML basic string.
fn quote(value: &str) -> String {
    toml_edit::Value::from(value).to_string().trim().to_owned()
}

/// Splits `text` into lines of at most `width` characters, at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("one line at least");
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(word.to_owned());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use clap::Args;

    use super::*;
    use crate::Config;

    #[test]
    fn every_flag_of_serve_is_in_exactly_one_section() {
        let command = Config::augment_args(Command::new("serve"));
        let flags: BTreeSet<String> = command
            .get_arguments()
            .map(|a| a.get_id().as_str().to_owned())
            .filter(|id| id != "help")
            .collect();
        let keys: Vec<&str> = SECTIONS
            .iter()
            .flat_map(|(_, keys)| keys.iter().map(|k| k.id))
            .collect();
        let distinct: BTreeSet<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        assert_eq!(keys.len(), distinct.len(), "a key in two sections");
        assert_eq!(
            flags, distinct,
            "the sections hold every flag, and only flags"
        );
    }

    #[test]
    fn redacts_secrets_and_keeps_the_rest() {
        assert_eq!(redact("jwt_secret", "s3cret"), "<redacted>");
        assert_eq!(
            redact("redis", "redis://:pw@10.0.0.1:6379/0,redis://u:pw@h:7000"),
            "redis://:<redacted>@10.0.0.1:6379/0,redis://u:<redacted>@h:7000"
        );
        assert_eq!(
            redact("redis", "redis://127.0.0.1:6379/"),
            "redis://127.0.0.1:6379/"
        );
        assert_eq!(redact("listen", "127.0.0.1:8080"), "127.0.0.1:8080");
    }

    #[test]
    fn wraps_at_spaces() {
        assert_eq!(wrap("aa bb cc", 5), ["aa bb", "cc"]);
        assert_eq!(wrap("", 5), [""]);
    }
}
