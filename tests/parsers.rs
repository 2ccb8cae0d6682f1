//! Property tests of the parsers pushhub wrote itself (cursors, names, payload minifying,
//! HTTP request heads, WebSocket frames from clients, query strings): arbitrary input never
//! panics, and what is accepted round-trips. `fuzz/` has coverage-guided targets for the
//! head and frame parsers (docs/security.md says how to run them).
//!
//! `cargo test --test parsers` runs 256 cases per property; raise `PROPTEST_CASES` for a
//! longer search (e.g. `PROPTEST_CASES=100000 cargo test --release --test parsers`).

#![allow(missing_docs)]

use std::borrow::Cow;

use proptest::prelude::*;
use pushhub::{
    message::{Payload, TopicName, wire::opcode},
    transport::head::{Parsed, RequestHead},
    transport::{
        Params, parse_cursor,
        ws::frame::{Event, FrameReader, client_frame},
    },
};

/// Feeds `bytes` to a frame reader in pieces cut at `cuts`, as reads would deliver them;
/// returns the events, or the close code of the first violation.
fn read_frames(bytes: &[u8], cuts: &[usize], max: usize) -> Result<Vec<Event>, u16> {
    let mut reader = FrameReader::new(max);
    let mut buffer = Vec::new();
    let mut events = Vec::new();
    let mut fed = 0;
    let mut ends: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    ends.push(bytes.len());
    ends.sort_unstable();
    for end in ends {
        buffer.extend_from_slice(&bytes[fed..end.max(fed)]);
        fed = end.max(fed);
        loop {
            match reader.next(&buffer) {
                Ok(Some((used, event))) => {
                    assert!(
                        used > 0 && used <= buffer.len(),
                        "a frame uses what it read"
                    );
                    buffer.drain(..used);
                    events.extend(event);
                }
                Ok(None) => break,
                Err(violation) => return Err(violation.code),
            }
        }
    }
    Ok(events)
}

proptest! {
    #[test]
    fn cursors_accept_exactly_the_decimal_u64s(text in "\\PC{0,24}") {
        let parsed = parse_cursor("after", text.as_bytes());
        let expected = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            text.parse::<u64>().ok()
        } else {
            None
        };
        prop_assert_eq!(parsed.ok(), expected);
    }

    #[test]
    fn every_u64_cursor_round_trips(n in any::<u64>()) {
        prop_assert_eq!(parse_cursor("after", n.to_string().as_bytes()).unwrap(), n);
    }

    #[test]
    fn topic_names_follow_the_documented_rule(text in "\\PC{0,140}") {
        let valid = (1..=128).contains(&text.len())
            && text.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b));
        let parsed = TopicName::parse(&text);
        prop_assert_eq!(parsed.is_ok(), valid, "{:?}", text);
        if let Ok(name) = parsed {
            prop_assert_eq!(name.as_str(), text.as_str());
        }
    }

    #[test]
    fn minified_json_means_the_same_and_has_no_newline(value in json_value()) {
        let pretty = serde_json::to_string_pretty(&value).unwrap();
        let payload = Payload::from_json(&pretty).unwrap();
        prop_assert!(!payload.as_str().contains('\n'));
        let back: serde_json::Value = serde_json::from_str(payload.as_str()).unwrap();
        prop_assert_eq!(back, value);
    }

    #[test]
    fn arbitrary_bodies_are_accepted_or_refused_never_panicking(text in "\\PC{0,200}") {
        let accepted = Payload::from_json(&text);
        prop_assert_eq!(accepted.is_ok(), serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok());
        let wrapped = Payload::from_text(&text);
        prop_assert_eq!(serde_json::from_str::<String>(wrapped.as_str()).unwrap(), text);
    }
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        "\\PC{0,20}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map("[a-z \\n\"]{0,6}", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A client message: text or binary content, split into fragments at `splits`, each
/// fragment masked with its own key.
fn fragmented(text: bool, content: &[u8], splits: &[usize], keys: &[[u8; 4]]) -> Vec<u8> {
    let mut points: Vec<usize> = splits.iter().map(|s| s % (content.len() + 1)).collect();
    points.push(content.len());
    points.sort_unstable();
    points.dedup();
    let mut bytes = Vec::new();
    let mut start = 0;
    for (k, &end) in points.iter().enumerate() {
        let first = k == 0;
        let last = k == points.len() - 1;
        let kind = match (first, text) {
            (true, true) => opcode::TEXT,
            (true, false) => opcode::BINARY,
            (false, _) => opcode::CONTINUATION,
        };
        bytes.extend(client_frame(
            last,
            kind,
            &content[start..end],
            keys[k % keys.len()],
        ));
        start = end;
    }
    bytes
}

proptest! {
    #[test]
    fn request_heads_parse_or_refuse_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let (Parsed::Head(head), _) = RequestHead::parse(bytes.clone()) {
            // What a parsed head says is in the bytes it was read from.
            prop_assert!(head.len() <= bytes.len());
            let text = String::from_utf8_lossy(&bytes[..head.len()]).into_owned();
            prop_assert!(text.starts_with(head.method()));
            prop_assert!(text.contains(head.path()));
            prop_assert!(text.ends_with("\r\n\r\n") || text.ends_with("\n\n"));
            let _ = (head.is_plain_get(), head.wants_close(), head.header("host"), head.query());
            let rest = head.into_rest();
            prop_assert_eq!(&rest[..], &bytes[bytes.len() - rest.len()..]);
        }
    }

    #[test]
    fn well_formed_heads_read_back_what_was_written(
        path in "/[a-z0-9._-]{0,40}",
        query in "[a-z0-9=&%.]{0,40}",
        values in proptest::collection::vec("[ -~]{0,30}", 0..6),
        cut in 0usize..400,
    ) {
        let mut head = format!("GET {path}?{query} HTTP/1.1\r\nHost: x\r\n");
        for (i, value) in values.iter().enumerate() {
            head.push_str(&format!("x-h{i}: {}\r\n", value.trim()));
        }
        head.push_str("\r\n");
        let bytes = head.as_bytes();
        // Any prefix is partial; the whole is complete.
        let cut = cut.min(bytes.len() - 1);
        prop_assert!(matches!(RequestHead::parse(bytes[..cut].to_vec()).0, Parsed::Partial));
        let (Parsed::Head(parsed), _) = RequestHead::parse(bytes.to_vec()) else {
            return Err(TestCaseError::fail("a complete head"));
        };
        prop_assert_eq!(parsed.path(), path.as_str());
        prop_assert_eq!(parsed.query(), query.as_str());
        for (i, value) in values.iter().enumerate() {
            let name = format!("x-h{i}");
            prop_assert_eq!(parsed.header(&name), Some(value.trim().as_bytes()));
        }
        prop_assert!(parsed.is_plain_get());
    }

    #[test]
    fn client_frames_of_arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
        max in 0usize..300,
    ) {
        let _ = read_frames(&bytes, &cuts, max);
    }

    #[test]
    fn fragmented_messages_come_back_whole_however_reads_cut_them(
        messages in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300)), 1..5),
        splits in proptest::collection::vec(any::<usize>(), 0..4),
        keys in proptest::collection::vec(any::<[u8; 4]>(), 1..4),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ping in proptest::collection::vec(any::<u8>(), 0..125),
    ) {
        let mut bytes = Vec::new();
        let mut expected = Vec::new();
        for (text, content) in &messages {
            // Text messages carry text (any UTF-8), binary ones any bytes.
            let content = if *text {
                String::from_utf8_lossy(content).into_owned().into_bytes()
            } else {
                content.clone()
            };
            bytes.extend(fragmented(*text, &content, &splits, &keys));
            // A control frame may come between messages.
            bytes.extend(client_frame(true, opcode::PING, &ping, keys[0]));
            expected.push(if *text {
                Event::Text(String::from_utf8(content).unwrap())
            } else {
                Event::Binary(content)
            });
            expected.push(Event::Ping(ping.clone()));
        }
        let events = read_frames(&bytes, &cuts, 1 << 20).map_err(|code| TestCaseError::fail(format!("refused with {code}")))?;
        prop_assert_eq!(events, expected);
    }

    #[test]
    fn query_values_are_the_last_given_decoded(
        pairs in proptest::collection::vec(("[a-c]{1,2}", "[a-z0-9%+]{0,8}"), 0..8),
    ) {
        let query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let query = query.join("&");
        let params = Params::new(Cow::Borrowed(&query), None);
        for name in ["a", "b", "c", "ab", "zz"] {
            let expected = form_urlencoded::parse(query.as_bytes())
                .filter(|(k, _)| k == name)
                .last()
                .map(|(_, v)| v.into_owned());
            prop_assert_eq!(params.get(name).map(Cow::into_owned), expected);
        }
    }
}
