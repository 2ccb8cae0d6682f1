//! A live SSE read (`live=sse`) that follows its stream through the hub's fan-out, as the
//! native SSE transport does: once the reader has caught up, each append's `data` event and
//! the `control` event after it are encoded once for every reader of the stream on this node
//! ([`super::frames::Frames`]) and written by the fan-out straight to each reader's socket. No reader's task
//! wakes for an append; it wakes only for what the fan-out cannot see: a close or a delete
//! (which end the response after the stream's last message), and a keep-alive after a quiet
//! `--ds-long-poll-timeout`.
//!
//! The catch-up before that (which may stitch in what a fork inherited from its source) is
//! read and written by the reader itself ([`SseStart`]); the hub's subscription then resumes
//! after the offset it reached, so that nothing is lost or repeated between the two.

use std::sync::Arc;

use axum::body::Bytes;

use super::{
    frames::Frames,
    meta::{self, Meta},
    offset::Offset,
    read,
    sse::{self, Control},
    streams::Local,
};
use crate::{
    error::Error,
    hub::{Format, Framer, Outlet, SubId},
    message::{Message, MessageId, TopicName, now_millis},
    transport::TransportState,
    transport::{body, stream::Watch},
};

/// One reader's [`Framer`]: the stream's shared events, or events of its own when the
/// cursor it came with is already the current interval's (it then gets a later one).
struct ReaderFramer {
    frames: Arc<Frames>,
    local: Arc<Local>,
    chunked: bool,
    /// The `cursor` the reader asked with.
    asked: Option<u64>,
}

impl Framer for ReaderFramer {
    fn frame(&self, message: &Arc<Message>) -> Bytes {
        let now = now_millis();
        let interval = meta::cursor(None, now, 0);
        if let Some(asked) = self.asked.filter(|&asked| asked >= interval) {
            let cursor = meta::cursor(Some(&asked.to_string()), now, fastrand::u64(..));
            let (chunk, events) = self.frames.encode(message, &cursor.to_string());
            return if self.chunked { chunk } else { events };
        }
        let (bytes, fresh) = self.frames.shared(message, interval, self.chunked);
        if fresh {
            // Once per append, not per reader: readers keep the stream's TTL sliding.
            self.local.touch();
        }
        bytes
    }
}

/// An SSE read's start: what the reader gets before it follows the fan-out.
#[derive(Debug)]
pub struct SseStart {
    pub(super) app: TransportState,
    pub(super) topic: TopicName,
    pub(super) local: Arc<Local>,
    pub(super) meta: Meta,
    /// The catch-up's events, unframed (counted as delivered by whoever read them).
    pub(super) events: Vec<u8>,
    /// The topic id to follow the stream from.
    pub(super) after: MessageId,
    /// The `cursor` the reader asked with.
    pub(super) asked: Option<u64>,
}

impl SseStart {
    /// Opens the read's outlet on `wire` ([`crate::hub::Format::DsSseChunked`] on the raw
    /// socket, with its response head; [`crate::hub::Format::DsSse`] in a body hyper frames), queues the catch-up,
    /// and follows the stream from where the catch-up ended.
    pub async fn open(self: Box<Self>, wire: body::Wire<Format>) -> Result<body::Opened, Error> {
        let body::Wire {
            socket,
            format,
            head,
        } = wire;
        let frames = self.local.frames(&self.meta);
        let framer = Arc::new(ReaderFramer {
            frames,
            local: self.local.clone(),
            chunked: format.chunked(),
            asked: self.asked,
        });
        let outlet = self.app.hub.framed_outlet(socket, format, framer);
        if let Some(head) = head {
            outlet.push(Bytes::from(head));
        }
        if !self.events.is_empty() {
            outlet.push(format.body(&self.events));
        }
        let sub = self
            .app
            .hub
            .subscribe(&self.topic, Some(self.after), &outlet)
            .await?;
        let watch: Watch = Box::pin(watch(
            self.app,
            self.topic,
            self.local,
            self.meta,
            outlet.0.clone(),
            sub,
            self.asked,
        ));
        Ok(body::Opened {
            outlet,
            expires: None,
            watch: Some(watch),
        })
    }
}

/// Watches what the fan-out cannot see for one reader: the stream closed (the response ends
/// after its last message, with the closing `control` event) or deleted or expired (it ends),
/// here or on another node sharing the store; or quiet for `--ds-long-poll-timeout` (a
/// keep-alive `control` event at the reader's offset, and the stream's state read again). A
/// shutdown is the outlet's drain.
async fn watch(
    app: TransportState,
    topic: TopicName,
    local: Arc<Local>,
    mut meta: Meta,
    outlet: Arc<Outlet>,
    sub: SubId,
    asked: Option<u64>,
) {
    let timeout = app.settings.durable.long_poll_timeout;
    let format = outlet.format();
    let elsewhere = app.hub.state_notices(&topic);
    loop {
        let changed = local.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let changed_elsewhere = elsewhere.notified();
        tokio::pin!(changed_elsewhere);
        changed_elsewhere.as_mut().enable();
        if meta.closed {
            let Ok(tail) = read::own_tail(&app, &topic, &meta).await else {
                outlet.finish_after(sub, 0, Bytes::new());
                return;
            };
            let mut last = Vec::new();
            sse::control_event(&mut last, &Control::Closed { next: tail });
            outlet.finish_after(sub, meta.id_at(tail), format.body(&last));
            return;
        }
        let quiet = tokio::select! {
            () = &mut changed => false,
            () = &mut changed_elsewhere => false,
            () = tokio::time::sleep(timeout) => true,
        };
        meta = match app.streams.open_local(&app, &topic, &local).await {
            Ok(meta) => meta,
            Err(_) => {
                // Deleted or expired: the response ends after what was sent.
                outlet.finish_after(sub, 0, Bytes::new());
                return;
            }
        };
        if quiet && !meta.closed {
            let at = outlet.cursor(sub).map_or(Offset(meta.start), |id| {
                meta.offset_after(id).max(Offset(meta.start))
            });
            let asked = asked.map(|asked| asked.to_string());
            let cursor = meta::cursor(asked.as_deref(), now_millis(), fastrand::u64(..));
            let cursor = cursor.to_string();
            let mut keep_alive = Vec::new();
            sse::control_event(
                &mut keep_alive,
                &Control::Open {
                    next: at,
                    cursor: &cursor,
                    up_to_date: true,
                },
            );
            outlet.send(format.body(&keep_alive));
            local.touch();
        }
    }
}
