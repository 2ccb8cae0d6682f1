//! The lab page and the pushhub.js client library, embedded in the binary so that `cargo run --release` needs nothing else.

use axum::{
    Router,
    http::{HeaderValue, header},
    response::IntoResponse,
    routing::get,
};

/// Each asset: URL path, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_bytes!("../web/index.html"),
    ),
    (
        "/lab.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../web/lab.js"),
    ),
    (
        "/pushhub.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../web/pushhub.js"),
    ),
    (
        "/rooms.html",
        "text/html; charset=utf-8",
        include_bytes!("../web/rooms.html"),
    ),
    (
        "/rooms.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../web/rooms.js"),
    ),
    (
        "/style.css",
        "text/css; charset=utf-8",
        include_bytes!("../web/style.css"),
    ),
];

/// Routes serving every embedded asset, for a router of any state.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    ASSETS
        .iter()
        .fold(Router::new(), |router, &(path, content_type, bytes)| {
            router.route(
                path,
                get(move || async move {
                    (
                        [
                            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
                            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                        ],
                        bytes,
                    )
                        .into_response()
                }),
            )
        })
}
