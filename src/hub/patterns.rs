//! Who follows a pattern: the connections a new topic must join when its name matches one
//! of their patterns (`news.*` picks up `news.sport` when its first message is published,
//! here or on another node).
//!
//! A registry of (prefix, connection) entries, scanned once per *created* topic, never per
//! message: a publish to a topic that exists costs nothing here, whatever the number of
//! pattern subscribers. Entries are removed when their connection ends.

use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

use super::outlet::Outlet;

/// Who waits for a pattern's new topics.
#[derive(Clone)]
pub(super) enum Watcher {
    /// A stream: the hub joins each new topic to its outlet.
    Outlet(Weak<Outlet>),
    /// A parked long poll: woken, it reads the new topic itself.
    Waiting(Weak<Notify>),
}

/// A watcher that is still there.
pub(super) enum Live {
    Outlet(Arc<Outlet>),
    Waiting(Arc<Notify>),
}

impl Watcher {
    fn upgrade(&self) -> Option<Live> {
        match self {
            Watcher::Outlet(outlet) => outlet.upgrade().map(Live::Outlet),
            Watcher::Waiting(notify) => notify.upgrade().map(Live::Waiting),
        }
    }

    fn same(&self, other: &Live) -> bool {
        match (self, other) {
            (Watcher::Outlet(a), Live::Outlet(b)) => std::ptr::eq(a.as_ptr(), Arc::as_ptr(b)),
            (Watcher::Waiting(a), Live::Waiting(b)) => std::ptr::eq(a.as_ptr(), Arc::as_ptr(b)),
            _ => false,
        }
    }
}

/// A long poll's entries in the registry, removed when it is dropped.
pub struct Watching {
    patterns: Arc<Patterns>,
    slots: Vec<usize>,
}

impl std::fmt::Debug for Watching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watching")
            .field("slots", &self.slots)
            .finish()
    }
}

impl Watching {
    pub(super) fn new(patterns: Arc<Patterns>) -> Self {
        Self {
            patterns,
            slots: Vec::new(),
        }
    }

    pub(super) fn add(&mut self, prefix: &str, notify: &Arc<Notify>) {
        let slot = self
            .patterns
            .add(prefix, Watcher::Waiting(Arc::downgrade(notify)));
        self.slots.push(slot);
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        for slot in self.slots.drain(..) {
            self.patterns.remove(slot);
        }
    }
}

/// The registry (one per hub).
#[derive(Default)]
pub(super) struct Patterns {
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    entries: Vec<Option<(Box<str>, Watcher)>>,
    free: Vec<usize>,
}

impl Patterns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `outlet` as following every topic starting with `prefix`; returns its slot.
    pub(super) fn add(&self, prefix: &str, watcher: Watcher) -> usize {
        let mut slots = self.lock();
        let entry = Some((Box::from(prefix), watcher));
        match slots.free.pop() {
            Some(slot) => {
                slots.entries[slot] = entry;
                slot
            }
            None => {
                slots.entries.push(entry);
                slots.entries.len() - 1
            }
        }
    }

    /// Removes the entry in `slot`.
    pub(super) fn remove(&self, slot: usize) {
        let mut slots = self.lock();
        if let Some(entry) = slots.entries.get_mut(slot)
            && entry.take().is_some()
        {
            slots.free.push(slot);
        }
    }

    /// Whether no connection follows a pattern (the common case: nothing to do).
    pub(super) fn is_empty(&self) -> bool {
        let slots = self.lock();
        slots.entries.len() == slots.free.len()
    }

    /// The watchers with a pattern that selects `topic`, each once.
    pub(super) fn selecting(&self, topic: &str) -> Vec<Live> {
        let slots = self.lock();
        let mut live: Vec<Live> = Vec::new();
        for (prefix, watcher) in slots.entries.iter().flatten() {
            if topic.starts_with(&**prefix)
                && !live.iter().any(|l| watcher.same(l))
                && let Some(watcher) = watcher.upgrade()
            {
                live.push(watcher);
            }
        }
        live
    }

    /// Every registered (prefix, watcher), for a rescan after creations were missed.
    pub(super) fn all(&self) -> Vec<(String, Live)> {
        let slots = self.lock();
        slots
            .entries
            .iter()
            .flatten()
            .filter_map(|(prefix, watcher)| Some((prefix.to_string(), watcher.upgrade()?)))
            .collect()
    }
}
