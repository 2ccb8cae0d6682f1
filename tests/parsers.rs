//! Property tests of the parsers pushhub wrote itself (cursors, names, payload minifying):
//! arbitrary input never panics, and what is accepted round-trips.
//!
//! `cargo test --test parsers` runs 256 cases per property; raise `PROPTEST_CASES` for a
//! longer search (e.g. `PROPTEST_CASES=100000 cargo test --release --test parsers`).

#![allow(missing_docs)]

use proptest::prelude::*;
use pushhub::{
    message::{Payload, TopicName},
    transport::parse_cursor,
};

proptest! {
    #[test]
    fn cursors_accept_exactly_the_decimal_u64s(text in "\\PC{0,24}") {
        let parsed = parse_cursor("after", &text);
        let expected = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            text.parse::<u64>().ok()
        } else {
            None
        };
        prop_assert_eq!(parsed.ok(), expected);
    }

    #[test]
    fn every_u64_cursor_round_trips(n in any::<u64>()) {
        prop_assert_eq!(parse_cursor("after", &n.to_string()).unwrap(), n);
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
