//! The crate's layers, read from its sources: every top-level module has a place in the
//! order docs/architecture.md writes down (its "Layers, checked" block), and imports (through
//! `crate::`, `super::` up to the crate root, or a name `lib.rs` re-exports) only modules
//! below its place. So the message model, the stores, the hub, the transports and the gate
//! can each be read, tested and changed without the layers above them, and no two modules
//! import each other.

#![allow(missing_docs)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Tighter rules for the low layers than "anything below": the modules each may import.
const NARROWER: &[(&str, &[&str])] = &[
    // Names, payloads, envelope, encodings, clock: nothing of the crate.
    ("message", &[]),
    // Counters and handles: a leaf; rendering `/metrics` from the app state is the app's.
    ("telemetry", &["message"]),
    // Where history lives: only the message model.
    ("store", &["message"]),
    // Topics, cursors, fan-out: its own settings and error types, no HTTP, no CLI.
    ("hub", &["message", "store", "telemetry"]),
    // The link emulator: bytes and HTTP/1.1 framing, nothing of the crate.
    ("link", &[]),
    // The embedded lab page: nothing of the crate.
    ("web", &[]),
];

/// Frameworks of the layers above: HTTP (axum, hyper, tower, the `http` types) and the
/// command line (clap). The low layers name none of them, so their errors carry no status
/// code and their settings no flag; `error.rs` and `config.rs` translate.
const FRAMEWORKS: &[&str] = &["axum", "hyper", "tower", "tower_http", "http", "clap"];

/// The layers with no HTTP or CLI framework.
const FRAMEWORK_FREE: &[&str] = &["message", "telemetry", "store", "hub", "link"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The layer order, bottom first, from docs/architecture.md: the first word of each line of
/// the fenced block after the heading "## Layers, checked", written top first.
fn order_from(doc: &str) -> Vec<String> {
    let section = doc
        .split("## Layers, checked")
        .nth(1)
        .expect("docs/architecture.md has a 'Layers, checked' section");
    let block = section
        .split("```")
        .nth(1)
        .expect("the section opens with a fenced block");
    let mut order: Vec<String> = block
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    order.reverse();
    order
}

fn order() -> Vec<String> {
    order_from(&fs::read_to_string(root().join("docs/architecture.md")).unwrap())
}

/// The top-level modules in `src/`: files `x.rs` and folders `x/` (lib and main as `lib`).
fn top_level_modules(src: &Path) -> BTreeSet<String> {
    fs::read_dir(src)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter_map(|path| {
            let name = path.file_stem()?.to_str()?.to_owned();
            let module = path.is_dir() || path.extension().is_some_and(|e| e == "rs");
            module.then(|| if name == "main" { "lib".into() } else { name })
        })
        .collect()
}

/// Every source file of a module (its file, or every file of its folder), with its depth
/// below the crate root (`src/a.rs` and `src/a/mod.rs` are 1, `src/a/b.rs` is 2).
fn sources(src: &Path, module: &str) -> Vec<(PathBuf, usize)> {
    if module == "lib" {
        return vec![(src.join("lib.rs"), 0), (src.join("main.rs"), 0)];
    }
    let mut files = Vec::new();
    let file = src.join(format!("{module}.rs"));
    if file.exists() {
        files.push((file, 1));
    }
    let mut dirs = vec![(src.join(module), 1)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push((path, depth + 1));
            } else if path.extension().is_some_and(|e| e == "rs") {
                let nested = path.file_stem().is_some_and(|s| s != "mod");
                files.push((path, depth + usize::from(nested)));
            }
        }
    }
    files
}

/// The code of `text` with comments, string and character literals blanked out (kept as
/// spaces, so positions hold): what is left is what the compiler reads as paths and braces.
fn code_only(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = bytes.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for byte in &mut out[from..to.min(bytes.len())] {
            if *byte != b'\n' {
                *byte = b' ';
            }
        }
    };
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        let end = if rest.starts_with(b"//") {
            rest.iter()
                .position(|&b| b == b'\n')
                .map_or(bytes.len(), |n| i + n)
        } else if rest.starts_with(b"/*") {
            text[i + 2..]
                .find("*/")
                .map_or(bytes.len(), |n| i + 2 + n + 2)
        } else if rest.starts_with(b"r#\"") || rest.starts_with(b"r\"") {
            let hashes = rest[1..].iter().take_while(|&&b| b == b'#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let start = i + 2 + hashes;
            text[start..]
                .find(&close)
                .map_or(bytes.len(), |n| start + n + close.len())
        } else if rest[0] == b'"' {
            let mut j = i + 1;
            while j < bytes.len() && bytes[j] != b'"' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            j + 1
        } else if rest[0] == b'\'' {
            // A character literal ('x', '\n', '\u{..}'), not a lifetime ('a).
            let close = if rest.get(1) == Some(&b'\\') {
                rest.iter().skip(2).position(|&b| b == b'\'').map(|n| n + 2)
            } else {
                (rest.get(2) == Some(&b'\'')).then_some(2)
            };
            match close {
                Some(n) => i + n + 1,
                None => {
                    i += 1;
                    continue;
                }
            }
        } else {
            i += 1;
            continue;
        };
        blank(&mut out, i, end);
        i = end.max(i + 1);
    }
    String::from_utf8(out).expect("blanking keeps UTF-8")
}

/// `code` without what `#[cfg(test)]` marks: the item after each such attribute (a `mod
/// tests { .. }`, a helper `fn`, a `use`), wherever it stands in the file.
fn without_tests(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let bytes = item.as_bytes();
        let stop = item.find(['{', ';']).expect("an item follows #[cfg(test)]");
        let end = if bytes[stop] == b';' {
            stop + 1
        } else {
            let mut depth = 0usize;
            let mut end = item.len();
            for (i, &byte) in bytes.iter().enumerate().skip(stop) {
                match byte {
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            end
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// The first path segment of each path in `text` that follows `prefix` (`crate::a::b`,
/// `crate::{a, b::{c, d}}`): `a`, `b`.
fn segments_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let first_name = |text: &str| -> String {
        text.trim()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices(prefix) {
        // A whole path: not the tail of `my_crate::` (nor the second `super::` of a longer
        // climb, which another prefix reads).
        if code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = code[at + prefix.len()..].trim_start();
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
    found.remove("self");
    found
}

/// The top-level modules (or crate-root names) `code`, in a file `depth` levels below the
/// crate root, names: through `crate::`, and through as many `super::` as climb to the root.
fn imports(code: &str, depth: usize) -> BTreeSet<String> {
    let mut found = segments_after(code, "crate::");
    if depth > 0 {
        found.extend(segments_after(code, &"super::".repeat(depth)));
    }
    found
}

/// The names `lib.rs` re-exports (`pub use app::{App, AppState}`) and the module of each.
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for statement in code_only(lib).split(';') {
        let Some(path) = statement.trim().strip_prefix("pub use ") else {
            continue;
        };
        let (module, rest) = path.split_once("::").expect("pub use names a module path");
        let list = rest.trim().trim_start_matches('{').trim_end_matches('}');
        for name in list.split(',') {
            let name = name.trim().rsplit("::").next().unwrap_or_default();
            let name = name.rsplit(" as ").next().unwrap_or_default().trim();
            if !name.is_empty() {
                names.insert(name.to_owned(), module.trim().to_owned());
            }
        }
    }
    names
}

/// Every edge from a module to another that points up or sideways, or to a module with no
/// place, in the tree under `root`.
fn broken_edges(root: &Path, order: &[String]) -> Vec<String> {
    let src = root.join("src");
    let place = |module: &str| order.iter().position(|m| m == module);
    let lib = fs::read_to_string(src.join("lib.rs")).unwrap();
    let reexported = reexports(&lib);
    let mut broken = Vec::new();
    for module in top_level_modules(&src) {
        let Some(here) = place(&module) else {
            broken.push(format!(
                "src/{module}: no place in the order of docs/architecture.md"
            ));
            continue;
        };
        let narrower = NARROWER.iter().find(|(m, _)| *m == module).map(|(_, a)| *a);
        for (file, depth) in sources(&src, &module) {
            let code = without_tests(&code_only(&fs::read_to_string(&file).unwrap()));
            for name in imports(&code, depth) {
                let target = reexported.get(&name).cloned().unwrap_or(name);
                if target == module || module == "lib" {
                    continue;
                }
                let file = file.strip_prefix(root).unwrap_or(&file).display();
                match place(&target) {
                    None if !top_level_modules(&src).contains(&target) => {
                        // A crate-root item lib.rs defines itself (`crate::run`): lib is the
                        // top, so naming it is pointing up.
                        broken.push(format!("{file} imports crate::{target}, defined in lib.rs"));
                    }
                    None => {}
                    Some(there) if there >= here => {
                        broken.push(format!("{file} ({module}) imports {target}, above it"));
                    }
                    Some(_) if narrower.is_some_and(|a| !a.contains(&target.as_str())) => {
                        broken.push(format!("{file} ({module}) imports {target}"));
                    }
                    Some(_) => {}
                }
            }
        }
    }
    broken
}

/// Pairs of files in one folder of `root/src` that import each other (through `super::`
/// or the folder's `crate::` path). A folder's `mod.rs` is its module's root, which declares
/// the others: its children reaching its items is the shape of a Rust module, not a pair.
fn mutual_siblings(root: &Path) -> Vec<String> {
    let src = root.join("src");
    let mut broken = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        let mut files = Vec::new();
        let mut names = BTreeSet::new();
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
                continue;
            };
            if path.is_dir() {
                dirs.push(path);
                names.insert(stem);
            } else if path.extension().is_some_and(|e| e == "rs") && stem != "mod" {
                names.insert(stem.clone());
                files.push((stem, path));
            }
        }
        let module = dir
            .strip_prefix(&src)
            .unwrap()
            .display()
            .to_string()
            .replace('/', "::");
        let imported: BTreeMap<String, BTreeSet<String>> = files
            .iter()
            .map(|(stem, path)| {
                let code = without_tests(&code_only(&fs::read_to_string(path).unwrap()));
                let mut found = segments_after(&code, "super::");
                if !module.is_empty() {
                    found.extend(segments_after(&code, &format!("crate::{module}::")));
                }
                found.retain(|name| names.contains(name) && name != stem);
                (stem.clone(), found)
            })
            .collect();
        for (a, imports) in &imported {
            for b in imports {
                if a < b && imported.get(b).is_some_and(|back| back.contains(a)) {
                    let dir = dir.strip_prefix(root).unwrap_or(&dir).display().to_string();
                    broken.push(format!("{dir}: {a}.rs and {b}.rs import each other"));
                }
            }
        }
    }
    broken
}

#[test]
fn no_two_files_of_a_folder_import_each_other() {
    let broken = mutual_siblings(&root());
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn two_files_importing_each_other_fail() {
    let dir = tempfile::tempdir().unwrap();
    let hub = dir.path().join("src/hub");
    fs::create_dir_all(&hub).unwrap();
    fs::write(
        hub.join("mod.rs"),
        "mod fanout;\nmod outlet;\nmod cursor;\n",
    )
    .unwrap();
    fs::write(
        hub.join("fanout.rs"),
        "use super::{cursor, outlet::Outlet};\n",
    )
    .unwrap();
    fs::write(hub.join("outlet.rs"), "use crate::hub::fanout::Fanout;\n").unwrap();
    fs::write(hub.join("cursor.rs"), "use super::Topic;\n").unwrap();
    assert_eq!(
        mutual_siblings(dir.path()),
        ["src/hub: fanout.rs and outlet.rs import each other"]
    );
}

#[test]
fn every_module_imports_only_what_is_below_it() {
    let order = order();
    let broken = broken_edges(&root(), &order);
    assert!(
        broken.is_empty(),
        "layering broken (order, bottom first: {}):\n{}",
        order.join(" < "),
        broken.join("\n")
    );
}

#[test]
fn the_order_places_every_module_once_and_lib_on_top() {
    let order = order();
    let unique: BTreeSet<&String> = order.iter().collect();
    assert_eq!(
        unique.len(),
        order.len(),
        "a module placed twice: {order:?}"
    );
    assert_eq!(order.last().map(String::as_str), Some("lib"), "{order:?}");
    let modules = top_level_modules(&root().join("src"));
    let placed: BTreeSet<String> = order.iter().cloned().collect();
    assert_eq!(modules, placed, "src/ and docs/architecture.md disagree");
    for (module, allowed) in NARROWER {
        let here = order.iter().position(|m| m == module).unwrap();
        for below in *allowed {
            let there = order.iter().position(|m| m == below).unwrap();
            assert!(
                there < here,
                "{module} may import {below}, which is not below it"
            );
        }
    }
}

#[test]
fn low_layers_use_no_http_or_cli_framework() {
    let src = root().join("src");
    let mut broken = Vec::new();
    for layer in FRAMEWORK_FREE {
        for (file, _) in sources(&src, layer) {
            let code = without_tests(&code_only(&fs::read_to_string(&file).unwrap()));
            for line in code.lines() {
                for framework in FRAMEWORKS {
                    let path = format!("{framework}::");
                    let named = line.match_indices(&path).any(|(at, _)| {
                        // A whole path segment: not the tail of `crate::http::` or `my_clap::`.
                        !line[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':')
                    });
                    if named {
                        broken.push(format!(
                            "{} uses {framework}: {}",
                            file.display(),
                            line.trim()
                        ));
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
fn the_import_reader_finds_single_grouped_super_and_reexported_imports() {
    let code = "use crate::error::Error;\nuse crate::{\n    config::Config,\n    hub::{Hub, Outlet},\n};\n// crate::comment::Not\nlet s = \"crate::string::Not\";\nlet x = crate::telemetry::stream();\nuse super::super::{store, self};";
    let found: Vec<String> = imports(&code_only(code), 2).into_iter().collect();
    assert_eq!(found, ["config", "error", "hub", "store", "telemetry"]);
    // One `super::` from a top-level file is the crate root; from a nested file it is not.
    assert!(imports("use super::app::X;", 1).contains("app"));
    assert!(imports("use super::frame::X;", 2).is_empty());
    let lib = "pub mod app;\npub use app::{App, AppState, router};\npub use config::Config;";
    let names = reexports(lib);
    assert_eq!(names["AppState"], "app");
    assert_eq!(names["Config"], "config");
}

#[test]
fn code_after_a_test_module_is_still_read() {
    let code = "#[cfg(test)]\nfn helper() { let x = '{'; }\nuse crate::app::A;\n#[cfg(test)]\nmod tests {\n    use crate::config::C;\n    fn f() { if true { } }\n}\nuse crate::gate::G;\n";
    let read = without_tests(&code_only(code));
    let found: Vec<String> = imports(&read, 1).into_iter().collect();
    assert_eq!(found, ["app", "gate"], "read: {read}");
}

#[test]
fn an_upward_edge_or_an_unplaced_module_fails() {
    // A crate in miniature: hub imports transport (up), and `extra` has no place.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("hub")).unwrap();
    fs::write(src.join("lib.rs"), "pub use hub::Hub;\n").unwrap();
    fs::write(src.join("main.rs"), "").unwrap();
    fs::write(src.join("message.rs"), "").unwrap();
    fs::write(src.join("transport.rs"), "use crate::Hub;\n").unwrap();
    fs::write(src.join("hub/mod.rs"), "mod fanout;\n").unwrap();
    fs::write(
        src.join("hub/fanout.rs"),
        "use super::super::transport::X;\n",
    )
    .unwrap();
    fs::write(src.join("extra.rs"), "").unwrap();
    let order: Vec<String> = ["message", "hub", "transport", "lib"]
        .map(String::from)
        .into();
    let broken = broken_edges(dir.path(), &order);
    assert_eq!(broken.len(), 2, "{broken:#?}");
    assert!(
        broken.iter().any(|b| b.contains("src/extra")),
        "{broken:#?}"
    );
    assert!(
        broken
            .iter()
            .any(|b| b.contains("fanout.rs (hub) imports transport")),
        "{broken:#?}"
    );
}

#[test]
fn the_order_is_read_top_first_from_the_doc() {
    let doc =
        "# A\n## Layers, checked\ntext\n```\nmain   top\napp    middle\nmessage  bottom\n```\n";
    assert_eq!(order_from(doc), ["message", "app", "main"]);
}
