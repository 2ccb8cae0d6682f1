//! Parked long polls as the fan-out sees them ([`Waiter`]s, woken once a message newer
//! than their cursor is offered), and the answers the fan-out writes to them itself
//! ([`Respond`], through the transport that knows the wire format), encoded once per walk
//! for every poller at the same cursor ([`AnswerCache`]).

use std::{
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use smallvec::SmallVec;

use super::presence::Gauge;
use crate::message::{Message, MessageId};

/// Answers a parked long poll from the fan-out itself: the writer that has a topic's new
/// messages in hand writes the answer straight to the poller's socket, instead of waking the
/// poller's task to read them back from the log, encode them and write them. Implemented by
/// the transport that knows the wire format; `Hub::wait_or_answer` takes one.
pub trait Respond: Send + Sync {
    /// Answers with `messages` (the first right after the poller's cursor, at most its
    /// limit); `newest` is the topic's newest id (past the last of `messages` when the limit
    /// left some out). [`Responded::No`] leaves the answer to
    /// the poller's task. `cache` is shared by the pollers of one walk, which mostly get the
    /// same answer: an implementation keeps what it encoded there.
    fn respond(
        &self,
        messages: &[Arc<Message>],
        newest: MessageId,
        cache: &mut AnswerCache,
    ) -> Responded;
}

/// What [`Respond::respond`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Responded {
    /// The whole answer is written: nothing is left for the poller's task.
    Written,
    /// The answer is begun and the socket would block: the poller's task finishes it.
    Begun,
    /// Nothing was written: the poller's task answers.
    No,
}

/// Answers encoded during one writer walk, for pollers that get the same one.
#[derive(Default)]
pub struct AnswerCache {
    entries: SmallVec<[(MessageId, usize, MessageId, Bytes); 2]>,
}

impl AnswerCache {
    /// The answer for the messages starting after `after`, `count` of them, with the topic's
    /// newest id `newest`, encoded by `encode` the first time it is asked for.
    pub fn get_or_encode(
        &mut self,
        after: MessageId,
        count: usize,
        newest: MessageId,
        encode: impl FnOnce() -> Bytes,
    ) -> Bytes {
        if let Some((.., answer)) = self
            .entries
            .iter()
            .find(|(a, c, n, _)| (*a, *c, *n) == (after, count, newest))
        {
            return answer.clone();
        }
        let answer = encode();
        self.entries.push((after, count, newest, answer.clone()));
        answer
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
    }
}

/// A parked long poll: woken once a message newer than its cursor is offered, unless its
/// responder answers it right there.
pub(super) struct Waiter {
    state: Mutex<WaiterState>,
    respond: Option<Arc<dyn Respond>>,
    limit: usize,
}

struct WaiterState {
    after: MessageId,
    outcome: Outcome,
    waker: Option<Waker>,
    /// Counts the poll as a parked subscriber until it is answered.
    gauge: Option<Gauge>,
}

/// Where a parked long poll stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Nothing new yet.
    Waiting,
    /// Something newer was published: the poller reads it and answers.
    News,
    /// Its responder answered it (wholly, or begun for the poller's task to finish).
    Answered,
}

impl Waiter {
    pub(super) fn new(
        after: MessageId,
        limit: usize,
        respond: Option<Arc<dyn Respond>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(WaiterState {
                after,
                outcome: Outcome::Waiting,
                waker: None,
                gauge: None,
            }),
            respond,
            limit: limit.max(1),
        })
    }

    pub(super) fn offer(&self, messages: &[Arc<Message>], cache: &mut AnswerCache) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let newest = messages.last().map_or(0, |m| m.id);
        if newest <= state.after || state.outcome != Outcome::Waiting {
            return;
        }
        let first = messages.iter().position(|m| m.id > state.after);
        if let (Some(respond), Some(first)) = (&self.respond, first) {
            // Only an exact continuation is answered here; a gap is the log's to fill.
            if messages[first].id == state.after + 1 {
                let fresh = &messages[first..];
                let take = fresh.len().min(self.limit);
                match respond.respond(&fresh[..take], newest, cache) {
                    Responded::Written => {
                        state.outcome = Outcome::Answered;
                        // Answered in full: no longer parked, although its task has not
                        // run yet.
                        state.gauge = None;
                        // The poller's task is not woken: its connection's next request is
                        // what wakes it.
                        return;
                    }
                    Responded::Begun => state.outcome = Outcome::Answered,
                    Responded::No => state.outcome = Outcome::News,
                }
            } else {
                state.outcome = Outcome::News;
            }
        } else {
            state.outcome = Outcome::News;
        }
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
    }

    /// Counts the poll as parked (`gauge`) until it is answered or [`Waiter::uncount`].
    pub(super) fn count(&self, gauge: Gauge) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.outcome == Outcome::Waiting {
            state.gauge = Some(gauge);
        }
    }

    /// Stops counting the poll as parked.
    pub(super) fn uncount(&self) {
        let gauge = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .gauge
            .take();
        drop(gauge);
    }

    /// Takes the answer back from the writers: from here on no writer answers this poll or
    /// wakes it. Returns what happened before, so that the poller answers only if no
    /// responder did ([`Outcome::Answered`]: it already has).
    pub(super) fn claim(&self) -> Outcome {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = state.outcome;
        if before == Outcome::Waiting {
            state.outcome = Outcome::News;
        }
        before
    }

    /// Ready once a newer message was offered (and maybe answered).
    pub(super) fn poll_news(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.outcome != Outcome::Waiting {
            return Poll::Ready(());
        }
        match &mut state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl std::fmt::Debug for AnswerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnswerCache").finish_non_exhaustive()
    }
}
