//! The streams this process serves: per stream, the lock that orders its writes (so that a
//! producer's check and its append, or an append and a close, are one step), the time it was
//! last read or written (the sliding TTL), and a wake-up for readers waiting on a change that
//! appends nothing (a close, a delete). Also what outlives one request: loading a stream's
//! metadata with its lifetime applied, deleting a stream and releasing its fork source, and
//! the sweeper that expires streams nobody touches.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{error::DurableError, frames::Frames, meta::Meta};
use crate::{
    error::Error,
    message::{TopicName, now_millis},
    store::{StreamState, StreamWrite},
    transport::Transports,
};

/// How often streams with a lifetime are checked for expiry.
const SWEEP_EVERY: Duration = Duration::from_millis(200);

/// The registry of streams touched by this process.
#[derive(Debug, Default)]
pub struct Streams {
    locals: Mutex<HashMap<TopicName, Arc<Local>>>,
}

/// What this process keeps for one stream.
#[derive(Debug, Default)]
pub struct Local {
    /// Held by every write (create, append, close, delete) for its whole check-then-write.
    pub write: tokio::sync::Mutex<()>,
    /// The last read or append seen here, unix milliseconds.
    pub accessed: AtomicU64,
    /// Woken on every change readers wait for besides an append (close, delete).
    pub changed: Notify,
    /// The stream has a TTL or an expiry: the sweeper looks at it.
    lifetime: AtomicBool,
    /// The last stored record decoded here, and what it decoded to.
    decoded: Mutex<Option<(bytes::Bytes, Meta)>>,
    /// The SSE events of the stream's newest messages, shared by its live readers here.
    frames: Mutex<Option<Arc<Frames>>>,
}

impl Local {
    /// The shared SSE events of the stream `meta` describes.
    pub fn frames(&self, meta: &Meta) -> Arc<Frames> {
        let mut frames = self.frames.lock().unwrap_or_else(|e| e.into_inner());
        match frames.as_ref() {
            Some(kept) if kept.fits(meta) => kept.clone(),
            _ => frames.insert(Arc::new(Frames::new(meta))).clone(),
        }
    }

    /// Notes a read or an append now.
    pub fn touch(&self) {
        self.accessed.fetch_max(now_millis(), Ordering::Relaxed);
    }
}

impl Streams {
    /// The local state of `topic`, created on first use.
    pub fn local(&self, topic: &TopicName) -> Arc<Local> {
        let mut locals = self.locals.lock().unwrap_or_else(|e| e.into_inner());
        locals.entry(topic.clone()).or_default().clone()
    }

    fn forget(&self, topic: &TopicName) {
        let mut locals = self.locals.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(local) = locals.remove(topic) {
            local.changed.notify_waiters();
        }
    }

    /// The stream's metadata as stored, whatever its state; `None` if the topic is no stream.
    pub async fn load(app: &Transports, topic: &TopicName) -> Result<Option<Meta>, Error> {
        let Some(StreamState {
            record, version, ..
        }) = app.hub.stream_state(topic).await?
        else {
            return Ok(None);
        };
        let meta = Meta::decode(&record).map_err(crate::store::StoreError::Internal)?;
        Ok(Some(Meta { version, ..meta }))
    }

    /// The metadata of a stream that can be read or written now: `404` when there is none
    /// or its lifetime is over (`410` if forks still read it), `410` when it was deleted
    /// while forks remained.
    pub async fn open(&self, app: &Transports, topic: &TopicName) -> Result<Meta, Error> {
        self.open_local(app, topic, &self.local(topic)).await
    }

    /// [`Streams::open`] for a caller that holds the stream's [`Local`] already (a reader
    /// between its events), without looking it up again.
    pub async fn open_local(
        &self,
        app: &Transports,
        topic: &TopicName,
        local: &Local,
    ) -> Result<Meta, Error> {
        let Some(meta) = Self::load_cached(app, topic, local).await? else {
            return Err(DurableError::NotFound.into());
        };
        local.lifetime.store(
            meta.ttl.is_some() || meta.expires_ms.is_some(),
            Ordering::Relaxed,
        );
        if meta.deleted {
            return Err(DurableError::Gone.into());
        }
        if meta.expired(now_millis(), local.accessed.load(Ordering::Relaxed)) {
            return Err(if meta.forks > 0 {
                DurableError::Gone
            } else {
                DurableError::NotFound
            }
            .into());
        }
        Ok(meta)
    }

    /// The stream's metadata, decoded only when its stored record changed since the last
    /// decode in this process (a reader wakes for every append; the record rarely changes).
    async fn load_cached(
        app: &Transports,
        topic: &TopicName,
        local: &Local,
    ) -> Result<Option<Meta>, Error> {
        let Some(StreamState {
            record, version, ..
        }) = app.hub.stream_state(topic).await?
        else {
            return Ok(None);
        };
        let mut cached = local.decoded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((bytes, meta)) = cached.as_ref()
            && *bytes == record
        {
            return Ok(Some(Meta {
                version,
                ..meta.clone()
            }));
        }
        let meta = Meta::decode(&record).map_err(crate::store::StoreError::Internal)?;
        *cached = Some((record, meta.clone()));
        Ok(Some(Meta { version, ..meta }))
    }

    /// Stores `meta` as the stream's state, appending nothing.
    pub async fn save(app: &Transports, topic: &TopicName, meta: &Meta) -> Result<(), Error> {
        app.write_stream(
            topic,
            StreamWrite {
                time: now_millis(),
                state: Some(StreamState {
                    record: meta.encode(),
                    sealed: meta.closed,
                    version: 0,
                }),
                expect: meta.expect(),
                ..StreamWrite::default()
            },
        )
        .await?;
        Ok(())
    }

    /// Ends a stream whose lifetime is over or that was deleted, the caller holding its
    /// write lock: hidden (kept for its forks, `410`) while forks remain, else removed with
    /// its history, releasing its own fork source.
    pub async fn retire(
        &self,
        app: &Transports,
        topic: &TopicName,
        mut meta: Meta,
    ) -> Result<(), Error> {
        if meta.forks > 0 {
            if !meta.deleted {
                meta.deleted = true;
                Self::save(app, topic, &meta).await?;
            }
            self.local(topic).changed.notify_waiters();
            return Ok(());
        }
        app.write_stream(
            topic,
            StreamWrite {
                clear: true,
                time: now_millis(),
                expect: meta.expect(),
                ..StreamWrite::default()
            },
        )
        .await?;
        self.forget(topic);
        if let Some(source) = meta.fork.and_then(|f| TopicName::parse(&f.source).ok()) {
            Box::pin(self.release(app, &source)).await?;
        }
        Ok(())
    }

    /// Drops one fork's reference on `source`; a source deleted or expired meanwhile goes
    /// with its last fork (and so on up the chain).
    async fn release(&self, app: &Transports, source: &TopicName) -> Result<(), Error> {
        let local = self.local(source);
        let _writing = local.write.lock().await;
        let Some(mut meta) = Self::load(app, source).await? else {
            return Ok(());
        };
        meta.forks = meta.forks.saturating_sub(1);
        let over =
            meta.deleted || meta.expired(now_millis(), local.accessed.load(Ordering::Relaxed));
        if meta.forks == 0 && over {
            self.retire(app, source, meta).await
        } else {
            Self::save(app, source, &meta).await
        }
    }

    /// Expires, every 200 ms, the streams with a lifetime that are over: readers and
    /// writers would see them as gone anyway; this frees their history and releases their
    /// fork sources even when nobody asks for them again.
    pub async fn run_sweeper(
        self: Arc<Self>,
        app: crate::transport::TransportState,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let candidates: Vec<(TopicName, Arc<Local>)> = {
                let locals = self.locals.lock().unwrap_or_else(|e| e.into_inner());
                locals
                    .iter()
                    .filter(|(_, local)| local.lifetime.load(Ordering::Relaxed))
                    .map(|(topic, local)| (topic.clone(), local.clone()))
                    .collect()
            };
            for (topic, local) in candidates {
                if let Err(error) = self.expire(&app, &topic, &local).await {
                    tracing::warn!(%topic, %error, "expiring a stream failed");
                }
            }
        }
    }

    async fn expire(
        &self,
        app: &Transports,
        topic: &TopicName,
        local: &Local,
    ) -> Result<(), Error> {
        let _writing = local.write.lock().await;
        let Some(meta) = Self::load(app, topic).await? else {
            self.forget(topic);
            return Ok(());
        };
        let accessed = local.accessed.load(Ordering::Relaxed);
        if meta.deleted || !meta.expired(now_millis(), accessed) {
            return Ok(());
        }
        self.retire(app, topic, meta).await
    }
}
