//! What a Durable Streams stream holds: its content type (stored verbatim, compared in a
//! normalised form), whether it is in JSON mode (appends are JSON values, reads are arrays of
//! them) or holds bytes, how a JSON body becomes values, and the numeric header formats.

use serde_json::value::RawValue;

/// The type a stream gets when its creator names none (or nothing usable).
pub const DEFAULT_TYPE: &str = "application/octet-stream";

/// A stream's content type: as given, and normalised (lowercase, no parameters) for
/// comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentType {
    /// As the creator sent it, echoed in `Content-Type`.
    pub raw: String,
    /// `type/subtype`, lowercase, without parameters.
    pub essence: String,
}

/// How a stream's appends and reads are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `application/json`: each append is one or more JSON values; a read is their array.
    Json,
    /// `text/*`: bytes, shown as text on SSE.
    Text,
    /// Anything else: bytes, base64 on SSE.
    Binary,
}

impl ContentType {
    /// The type of a `Content-Type` header: missing, empty, or not starting with
    /// `type/subtype` gives [`DEFAULT_TYPE`].
    pub fn parse(header: Option<&str>) -> ContentType {
        let raw = header.map(str::trim).filter(|v| starts_with_type(v));
        let raw = raw.unwrap_or(DEFAULT_TYPE).to_owned();
        let essence = raw
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        ContentType { raw, essence }
    }

    /// Whether `other` names the same type (`TEXT/PLAIN` and `text/plain; charset=utf-8` do).
    pub fn same_as(&self, other: &ContentType) -> bool {
        self.essence == other.essence
    }

    /// The stream's mode.
    pub fn mode(&self) -> Mode {
        if self.essence == "application/json" {
            Mode::Json
        } else if self.essence.starts_with("text/") {
            Mode::Text
        } else {
            Mode::Binary
        }
    }
}

/// `^[\w-]+/[\w-]+`: a type and a subtype of word characters and dashes.
fn starts_with_type(value: &str) -> bool {
    let word = |s: &str| {
        s.bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
            .count()
    };
    let first = word(value);
    first > 0 && value.as_bytes().get(first) == Some(&b'/') && word(&value[first + 1..]) > 0
}

/// Why a JSON body is refused (`400`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Not JSON.
    #[error("the body is not valid JSON: {0}")]
    Invalid(String),
    /// `[]` on an append: nothing to append.
    #[error("an empty array appends nothing")]
    EmptyArray,
}

/// The values a JSON body appends: a top-level array is flattened one level (each element is
/// a value), anything else is one value. `[]` is refused on an append and is an empty start
/// on a create (`creating`).
pub fn json_values(body: &[u8], creating: bool) -> Result<Vec<Box<RawValue>>, JsonError> {
    let text = std::str::from_utf8(body).map_err(|e| JsonError::Invalid(e.to_string()))?;
    let value: Box<RawValue> =
        serde_json::from_str(text).map_err(|e| JsonError::Invalid(e.to_string()))?;
    if !value.get().trim_start().starts_with('[') {
        return Ok(vec![value]);
    }
    let values: Vec<Box<RawValue>> =
        serde_json::from_str(value.get()).map_err(|e| JsonError::Invalid(e.to_string()))?;
    if values.is_empty() && !creating {
        return Err(JsonError::EmptyArray);
    }
    Ok(values)
}

/// A non-negative decimal without a sign, leading zeros, fraction or exponent
/// (`^(0|[1-9]\d*)$`): `Stream-TTL`, `Stream-Fork-Sub-Offset`.
pub fn plain_number(value: &str) -> Option<u64> {
    let canonical = value == "0"
        || (value.bytes().all(|b| b.is_ascii_digit())
            && !value.starts_with('0')
            && !value.is_empty());
    canonical.then(|| value.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_are_kept_as_given_and_compared_normalised() {
        let json = ContentType::parse(Some("application/json; charset=utf-8"));
        assert_eq!(json.raw, "application/json; charset=utf-8");
        assert_eq!(json.mode(), Mode::Json);
        assert!(json.same_as(&ContentType::parse(Some("APPLICATION/JSON"))));
        assert!(!json.same_as(&ContentType::parse(Some("text/plain"))));
        assert_eq!(ContentType::parse(Some("TEXT/PLAIN")).mode(), Mode::Text);
        for missing in [
            None,
            Some(""),
            Some("  "),
            Some("nonsense"),
            Some("/x"),
            Some("a/"),
        ] {
            let t = ContentType::parse(missing);
            assert_eq!(
                (t.raw.as_str(), t.mode()),
                (DEFAULT_TYPE, Mode::Binary),
                "{missing:?}"
            );
        }
        assert_eq!(ContentType::parse(Some("image/png")).mode(), Mode::Binary);
        assert_eq!(
            ContentType::parse(Some("application/x-protobuf")).mode(),
            Mode::Binary
        );
    }

    #[test]
    fn json_bodies_flatten_one_level() {
        let values = |body: &str, creating| {
            json_values(body.as_bytes(), creating)
                .map(|v| v.iter().map(|v| v.get().to_owned()).collect::<Vec<_>>())
        };
        assert_eq!(
            values(r#"{"a":1}"#, false),
            Ok(vec![r#"{"a":1}"#.to_owned()])
        );
        assert_eq!(
            values(r#"[{"n":1}]"#, false),
            Ok(vec![r#"{"n":1}"#.to_owned()])
        );
        assert_eq!(
            values("[[1,2],[3,4]]", false),
            Ok(vec!["[1,2]".to_owned(), "[3,4]".to_owned()])
        );
        assert_eq!(
            values("[[[1,2,3]]]", false),
            Ok(vec!["[[1,2,3]]".to_owned()])
        );
        assert_eq!(values(r#" ["s", 1, true, null] "#, false).unwrap().len(), 4);
        assert_eq!(values("[]", false), Err(JsonError::EmptyArray));
        assert_eq!(values("[]", true), Ok(vec![]));
        assert!(matches!(
            values("{ invalid json }", false),
            Err(JsonError::Invalid(_))
        ));
    }

    #[test]
    fn numeric_headers_take_plain_decimals_only() {
        assert_eq!(plain_number("0"), Some(0));
        assert_eq!(plain_number("3600"), Some(3600));
        for bad in ["", "abc", "-1", "00060", "+60", "60.5", "1e3", "05", "1 "] {
            assert_eq!(plain_number(bad), None, "{bad:?}");
        }
    }
}
