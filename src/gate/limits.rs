//! Connection limits that protect the server from any one client: open connections in total
//! and per IP, enforced before anything is parsed. (The publish rate is per publish, which
//! transports apply: [`crate::access::RateLimiter`].)

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::error::Error;

/// Counts open connections, in total and per client IP, and the refusals being answered.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    /// Refusals answered at once out of the reserve: each holds a file while it reads the
    /// request and answers. More are answered while open connections leave files unused
    /// (`file_room`, the files connections may take); past both, a connection over a limit
    /// is closed unanswered.
    max_refusing: usize,
    file_room: usize,
    refusing: AtomicUsize,
}

/// One refusal being answered; dropping it frees its place.
#[derive(Debug)]
pub struct RefusalPermit {
    limits: Arc<ConnectionLimits>,
}

impl Drop for RefusalPermit {
    fn drop(&mut self) {
        self.limits.refusing.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl ConnectionLimits {
    /// Limits of `max_total` connections, and `max_per_ip` per IP (`0`: no per-IP limit).
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Self::build(max_total, max_per_ip, 64, usize::MAX)
    }

    /// Limits of `capacity` connections, and `max_per_ip` per IP, answering at once half
    /// the file reserve's worth of refusals, and more while connections leave files unused.
    pub fn for_capacity(capacity: &Capacity, max_per_ip: usize) -> Arc<Self> {
        Self::build(
            capacity.max,
            max_per_ip,
            (capacity.file_reserve / 2).max(8),
            capacity.file_room(),
        )
    }

    fn build(
        max_total: usize,
        max_per_ip: usize,
        max_refusing: usize,
        file_room: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_ip,
            open: Mutex::new((0, HashMap::new())),
            max_refusing,
            file_room,
            refusing: AtomicUsize::new(0),
        })
    }

    /// A place to answer a refusal in, or `None` when as many are being answered as files
    /// allow: half the reserve, or more while the open connections leave files unused (a
    /// storm of clients over `--max-connections` far below the file limit is answered
    /// whole).
    pub fn refusal(self: &Arc<Self>) -> Option<RefusalPermit> {
        let open = self.open();
        self.refusing
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max_refusing || open.saturating_add(n) < self.file_room).then_some(n + 1)
            })
            .ok()
            .map(|_| RefusalPermit {
                limits: self.clone(),
            })
    }

    /// Admits a connection from `ip`, or names the limit it hits.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnectionPermit, Error> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, per_ip) = &mut *open;
        if *total >= self.max_total {
            return Err(Error::AtCapacity("too many open connections"));
        }
        let from_ip = per_ip.entry(ip).or_default();
        if self.max_per_ip > 0 && *from_ip >= self.max_per_ip {
            return Err(Error::TooManyRequests {
                what: "too many open connections from this address",
                retry_after: 5,
            });
        }
        *from_ip += 1;
        *total += 1;
        Ok(ConnectionPermit {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).0
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = self
            .limits
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (total, per_ip) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// How many connections a node takes: `--max-connections`, lowered to what the open-file
/// limit leaves once a reserve is kept back. Every connection holds a file (its socket), and
/// so do the listener, the store's files, Redis and the answer that refuses a connection over
/// the limit: a node out of files can no longer refuse anyone (its clients wait in the
/// backlog with no answer), so it stops taking connections while files are left to say no.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Capacity {
    /// Connections taken at most (the 503 past it).
    pub max: usize,
    /// `--max-connections` as configured.
    pub configured: usize,
    /// The process's open-file limit (the soft one, raised to the hard one at startup), when
    /// known.
    pub open_file_limit: Option<u64>,
    /// Files kept back from connections.
    pub file_reserve: usize,
}

impl Capacity {
    /// The capacity for `configured` connections with `open_file_limit` files, keeping
    /// `reserve` of them back (by default 100 and 1% of the limit).
    pub fn new(configured: usize, reserve: Option<usize>, open_file_limit: Option<u64>) -> Self {
        let limit = open_file_limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX));
        let file_reserve = reserve.unwrap_or_else(|| 100 + limit.unwrap_or(0) / 100);
        let max = match limit {
            Some(limit) => configured.min(limit.saturating_sub(file_reserve)),
            None => configured,
        };
        Self {
            max,
            configured,
            open_file_limit,
            file_reserve,
        }
    }

    /// The capacity of this process: its open-file limit read now.
    pub fn of_process(configured: usize, reserve: Option<usize>) -> Self {
        let limit = rlimit::getrlimit(rlimit::Resource::NOFILE)
            .ok()
            .map(|(soft, _hard)| soft)
            .filter(|&soft| soft != rlimit::INFINITY);
        Self::new(configured, reserve, limit)
    }

    /// The files connections may hold: the open-file limit less the reserve (unbounded
    /// where the limit is unknown).
    pub fn file_room(&self) -> usize {
        self.open_file_limit.map_or(usize::MAX, |limit| {
            usize::try_from(limit)
                .unwrap_or(usize::MAX)
                .saturating_sub(self.file_reserve)
        })
    }

    /// Whether the open-file limit lowered `--max-connections`.
    pub fn file_limited(&self) -> bool {
        self.max < self.configured
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_limit_lowers_max_connections_and_keeps_a_reserve() {
        // 20,000 files: 300 kept back (100 and 1%), 19,700 connections.
        let capacity = Capacity::new(100_000, None, Some(20_000));
        assert_eq!((capacity.max, capacity.file_reserve), (19_700, 300));
        assert!(capacity.file_limited());
        // Below the file limit, the configured value holds.
        let capacity = Capacity::new(5_000, None, Some(20_000));
        assert_eq!(capacity.max, 5_000);
        assert!(!capacity.file_limited());
        // A reserve given, a limit smaller than the reserve, and no known limit.
        assert_eq!(Capacity::new(100_000, Some(0), Some(1_000)).max, 1_000);
        assert_eq!(Capacity::new(100_000, None, Some(50)).max, 0);
        assert_eq!(Capacity::new(100_000, None, None).max, 100_000);
    }

    #[test]
    fn limits_count_in_total_and_per_ip_and_free_on_drop() {
        let limits = ConnectionLimits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(a).unwrap();
        assert!(matches!(
            limits.admit(a),
            Err(Error::TooManyRequests { .. })
        ));
        let _third = limits.admit(b).unwrap();
        assert!(matches!(limits.admit(b), Err(Error::AtCapacity(_))));
        assert_eq!(limits.open(), 3);
        drop(first);
        assert_eq!(limits.open(), 2);
        assert!(limits.admit(a).is_ok(), "a place freed by a dropped permit");
        assert_eq!(limits.open(), 2, "the temporary permit was dropped again");
    }

    #[test]
    fn refusals_answered_at_once_are_bounded_by_the_files_left() {
        // 100 files, 4 kept back, 10 connections at most: 96 files for connections and
        // refusals, so with 10 open, 86 refusals are answered at once.
        let capacity = Capacity::new(10, Some(4), Some(100));
        let limits = ConnectionLimits::for_capacity(&capacity, 0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let open: Vec<_> = (0..10).map(|_| limits.admit(ip).unwrap()).collect();
        let held: Vec<_> = (0..86).map(|_| limits.refusal().unwrap()).collect();
        assert!(limits.refusal().is_none(), "no file left but the reserve's");
        drop(held);
        assert!(limits.refusal().is_some());
        // At the file limit itself (all 96 files held by connections), half the reserve,
        // at least 8, is still answered.
        let capacity = Capacity::new(100_000, Some(4), Some(100));
        let limits = ConnectionLimits::for_capacity(&capacity, 0);
        let full: Vec<_> = (0..96).map(|_| limits.admit(ip).unwrap()).collect();
        let held: Vec<_> = (0..8).map(|_| limits.refusal().unwrap()).collect();
        assert!(limits.refusal().is_none());
        drop((open, full, held));
    }

    #[test]
    fn a_poisoned_lock_keeps_counting() {
        let limits = ConnectionLimits::new(10, 0);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let permit = limits.admit(ip).unwrap();
        // A thread that panics while holding the lock poisons it.
        let poisoner = limits.clone();
        let _ = std::thread::spawn(move || {
            let _held = poisoner.open.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert!(limits.open.is_poisoned());
        // Admitting, counting and dropping (which runs in `Drop`) still work.
        let second = limits.admit(ip).unwrap();
        assert_eq!(limits.open(), 2);
        drop(permit);
        drop(second);
        assert_eq!(limits.open(), 0);
    }
}
