//! The crate's layers, read from its sources: each low layer may import (through `crate::`)
//! only the layers below it, so that the message model, the stores and the hub can be read,
//! tested and changed without the HTTP and CLI layers above them. The order wanted is
//! message → store → hub → transports → gate/app → main (docs/architecture.md).

#![allow(missing_docs)]

use std::{collections::BTreeSet, fs, path::Path};

/// Each checked layer and the crate modules it may import.
const RULES: &[(&str, &[&str])] = &[
    // Names, payloads, envelope, encodings, clock: nothing of the crate.
    ("message", &[]),
    // Where history lives: only the message model.
    ("store", &["message"]),
    // Counters and handles: a leaf; rendering `/metrics` from the app state is the app's.
    ("telemetry", &["message"]),
    // Topics, cursors, fan-out: its own settings and error types, no HTTP, no CLI.
    ("hub", &["message", "store", "telemetry"]),
    // The link emulator: bytes and HTTP/1.1 framing, nothing of the crate.
    ("link", &[]),
];

/// The source of a module (its file, or every file of its folder), without test modules:
/// by this crate's convention a `#[cfg(test)]` module closes the file.
fn sources(module: &str) -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let file = root.join(format!("{module}.rs"));
    if file.exists() {
        files.push(file);
    }
    let mut dirs = vec![root.join(module)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    assert!(!files.is_empty(), "no sources for `{module}`");
    files
        .into_iter()
        .map(|path| {
            let text = fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            (path.display().to_string(), code.to_owned())
        })
        .collect()
}

/// The crate modules `code` names through `crate::`: `crate::a::b`, `crate::{a, b::{c, d}}`.
/// Comments are not code: lines starting with `//` are skipped.
fn imports(code: &str) -> BTreeSet<String> {
    let code: String = code
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let first_name = |text: &str| -> String {
        text.trim()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            found.insert(first_name(rest));
            continue;
        };
        // The group's top-level parts: split at commas outside nested braces.
        let mut depth = 0;
        let mut part = String::new();
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    found.insert(first_name(&part));
                    part.clear();
                    continue;
                }
                _ => {}
            }
            part.push(c);
        }
        found.insert(first_name(&part));
    }
    found.remove("");
    found
}

#[test]
fn low_layers_import_only_what_is_below_them() {
    let mut broken = Vec::new();
    for (layer, allowed) in RULES {
        for (file, code) in sources(layer) {
            for import in imports(&code) {
                if import != *layer && !allowed.contains(&import.as_str()) {
                    broken.push(format!("{file} imports crate::{import}"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}

/// Frameworks of the layers above: HTTP (axum, hyper, tower, the `http` types) and the
/// command line (clap). The low layers name none of them, so their errors carry no status
/// code and their settings no flag; `error.rs` and `config.rs` translate.
const FRAMEWORKS: &[&str] = &["axum", "hyper", "tower", "tower_http", "http", "clap"];

#[test]
fn low_layers_use_no_http_or_cli_framework() {
    let mut broken = Vec::new();
    for (layer, _) in RULES {
        for (file, code) in sources(layer) {
            for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for framework in FRAMEWORKS {
                    let path = format!("{framework}::");
                    let named = line.match_indices(&path).any(|(at, _)| {
                        // A whole path segment: not the tail of `crate::http::` or `my_clap::`.
                        !line[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':')
                    });
                    if named {
                        broken.push(format!("{file} uses {framework}: {}", line.trim()));
                    }
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "low layer uses a framework:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_import_reader_finds_single_and_grouped_imports() {
    let code = "use crate::error::Error;\nuse crate::{\n    config::Config,\n    hub::{Hub, Outlet},\n};\n// crate::comment::Not\nlet x = crate::telemetry::stream();";
    let found: Vec<String> = imports(code).into_iter().collect();
    assert_eq!(found, ["config", "error", "hub", "telemetry"]);
}
