//! Connection limits that protect the server from any one client: open connections in total
//! and per IP, enforced before anything is parsed. (The publish rate is per publish, which
//! transports apply: [`crate::access::RateLimiter`].)

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use crate::error::Error;

/// Counts open connections, in total and per client IP.
#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
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
        Arc::new(Self {
            max_total,
            max_per_ip,
            open: Mutex::new((0, HashMap::new())),
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

#[cfg(test)]
mod tests {
    use super::*;

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
