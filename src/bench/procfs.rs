//! CPU time and memory of the server process, read from `/proc/PID` (Linux).

use std::time::Duration;

/// CPU time a process has used so far, split into its own code and the kernel's on its behalf.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    /// In the process's own code.
    pub user: Duration,
    /// In the kernel on its behalf (system calls: for a push server, mostly socket writes).
    pub system: Duration,
}

impl CpuTimes {
    /// User plus system time.
    pub fn total(&self) -> Duration {
        self.user + self.system
    }

    /// The time of two processes together.
    pub fn plus(self, other: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }

    /// The time used between `earlier` and `self`.
    pub fn since(&self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

/// CPU time the process has used so far.
pub fn cpu_times(pid: u32) -> Option<CpuTimes> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |index: usize| -> Option<Duration> {
        let ticks: u64 = fields.get(index)?.parse().ok()?;
        Some(Duration::from_secs_f64(ticks as f64 / CLOCK_TICKS))
    };
    Some(CpuTimes {
        user: ticks(11)?,
        system: ticks(12)?,
    })
}

/// CPU time of all the process's threads so far, in nanoseconds, from the scheduler's own
/// accounting (`/proc/PID/task/*/schedstat`): exact, where `/proc/PID/stat` counts 10 ms
/// ticks. Used for short intervals (connecting subscribers).
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        let Ok(stat) = std::fs::read_to_string(path) else {
            continue; // the thread exited meanwhile
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Resident memory now, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Clock ticks per second of `/proc` CPU times (`USER_HZ`): 100 on every Linux architecture
/// pushhub builds for, so CPU figures have a 10 ms resolution; phases last seconds.
const CLOCK_TICKS: f64 = 100.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        // Burn CPU until the kernel has accounted at least one clock tick to us.
        let started = std::time::Instant::now();
        let mut spin = 0u64;
        while cpu_times(pid).unwrap().total() == Duration::ZERO {
            for i in 0..100_000u64 {
                spin = std::hint::black_box(spin.wrapping_add(i * i));
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no CPU time ever accounted"
            );
        }
        assert!(rss_kib(pid).unwrap() > 100);
        assert!(cpu_times(u32::MAX).is_none());
        let later = cpu_times(pid).unwrap();
        assert_eq!(later.since(later).total(), Duration::ZERO);
        assert!(later.since(CpuTimes::default()).total() > Duration::ZERO);
    }
}
