//! Durable Streams offsets. The protocol's offsets are opaque strings that sort
//! lexicographically and strictly increase; the suite hard-codes the shape of two of them
//! (`0000000000000000_0000000000000000`, the start of any stream, and
//! `9999999999999999_9999999999999999`, beyond any tail), so pushhub uses that shape: two
//! 16-digit zero-padded numbers, the first always 0, the second the id of the last message
//! (one append is one pushhub message) before the position. A position is therefore a pushhub
//! cursor, and the two resume the same way.

use std::fmt;

/// Digits of each half.
const DIGITS: usize = 16;

/// A position in a stream: after the message with this id (0: before the first).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Offset(pub u64);

/// Where a read starts, as the `offset` parameter says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// `-1` (or no `offset` on a catch-up read): the beginning.
    Beginning,
    /// `now`: the current tail, whatever it is when the read starts.
    Now,
    /// A position a previous response gave.
    At(Offset),
    /// A well-formed offset past any position pushhub gives (its first half is not 0, or
    /// its second does not fit): beyond every tail.
    Beyond,
}

/// Why an offset parameter is refused (`400`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffsetError {
    /// `?offset=` with no value.
    #[error("offset is empty")]
    Empty,
    /// Not `-1`, `now` or `<digits>_<digits>`.
    #[error("offset must be -1, now or an offset a response gave")]
    Malformed,
}

impl Offset {
    /// The start of every stream.
    pub const ZERO: Offset = Offset(0);
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:0w$}_{:0w$}", 0, self.0, w = DIGITS)
    }
}

/// Reads a percent-decoded `offset` value: `^(-1|now|\d+_\d+)$`.
pub fn parse(value: &str) -> Result<Start, OffsetError> {
    match value {
        "" => Err(OffsetError::Empty),
        "-1" => Ok(Start::Beginning),
        "now" => Ok(Start::Now),
        _ => {
            let (high, low) = value.split_once('_').ok_or(OffsetError::Malformed)?;
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if !digits(high) || !digits(low) {
                return Err(OffsetError::Malformed);
            }
            if high.bytes().any(|b| b != b'0') {
                return Ok(Start::Beyond);
            }
            Ok(low
                .parse()
                .map_or(Start::Beyond, |id| Start::At(Offset(id))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_have_the_suites_shape_and_sort_as_strings() {
        assert_eq!(
            Offset::ZERO.to_string(),
            "0000000000000000_0000000000000000"
        );
        assert_eq!(Offset(42).to_string(), "0000000000000000_0000000000000042");
        // Strictly increasing as strings, as the suite compares them.
        let mut last = Offset::ZERO.to_string();
        for id in [1, 9, 10, 99, 100, 12_345, u64::MAX / 2] {
            let next = Offset(id).to_string();
            assert!(next > last, "{next} after {last}");
            last = next;
        }
    }

    #[test]
    fn offset_parameters_are_validated_as_the_suite_expects() {
        assert_eq!(parse("-1"), Ok(Start::Beginning));
        assert_eq!(parse("now"), Ok(Start::Now));
        assert_eq!(
            parse("0000000000000000_0000000000000007"),
            Ok(Start::At(Offset(7)))
        );
        assert_eq!(parse(&Offset(123).to_string()), Ok(Start::At(Offset(123))));
        assert_eq!(
            parse("9999999999999999_9999999999999999"),
            Ok(Start::Beyond)
        );
        assert_eq!(parse("0_99999999999999999999999"), Ok(Start::Beyond));
        assert_eq!(parse(""), Err(OffsetError::Empty));
        for bad in [
            "0,1", "0 1", "abc", "_1", "1_", "-2", "1_2_3", "../1", "1\n_2", "NOW",
        ] {
            assert_eq!(parse(bad), Err(OffsetError::Malformed), "{bad:?}");
        }
    }
}
