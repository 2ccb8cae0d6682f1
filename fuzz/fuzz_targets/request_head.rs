//! Request heads as pushhub reads them before hyper: arbitrary bytes are parsed or refused,
//! never a panic, and a parsed head describes bytes it was read from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pushhub::transport::head::{Parsed, RequestHead};

fuzz_target!(|bytes: &[u8]| {
    if let (Parsed::Head(head), _) = RequestHead::parse(bytes.to_vec()) {
        assert!(head.len() <= bytes.len());
        let _ = (head.method(), head.path(), head.query(), head.is_plain_get());
        let _ = (head.header("host"), head.wants_close(), head.has_token("connection", "upgrade"));
        let _ = head.to_request();
        let rest = head.into_rest();
        assert_eq!(&rest[..], &bytes[bytes.len() - rest.len()..]);
    }
});
