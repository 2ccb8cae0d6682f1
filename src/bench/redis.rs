//! The Redis a many-node run shares (`--redis-start`): one primary, or a Redis Cluster of M
//! primaries with one replica each, started from Debian's `redis-server` on loopback
//! ports, and removed afterwards (processes killed, directories deleted). Each Redis runs
//! under a watchdog shell that kills it and deletes its directory when the bench goes away
//! in any way (the bench's end of the shell's stdin closes), so a bench killed -9 leaves no
//! Redis behind.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    os::unix::process::CommandExt,
    process::{Child, Command, Stdio},
    str::FromStr,
    time::{Duration, Instant},
};

use super::BenchError;

/// What `--redis-start` starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisStart {
    /// One primary.
    Single,
    /// A cluster of this many primaries (at least 3), each with one replica.
    Cluster(u16),
}

impl FromStr for RedisStart {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "single" {
            return Ok(Self::Single);
        }
        let primaries = s
            .strip_prefix("cluster:")
            .and_then(|m| m.parse::<u16>().ok())
            .ok_or_else(|| format!("{s:?}: expected single or cluster:M (M primaries)"))?;
        if !(3..=16).contains(&primaries) {
            return Err(format!(
                "cluster:{primaries}: a Redis Cluster takes 3 to 16 primaries here"
            ));
        }
        Ok(Self::Cluster(primaries))
    }
}

impl std::fmt::Display for RedisStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Single => f.write_str("single"),
            Self::Cluster(m) => write!(f, "cluster:{m}"),
        }
    }
}

/// One `redis-server` the bench started, and the watchdog shell it runs under.
#[derive(Debug)]
struct Process {
    port: u16,
    pid: u32,
    watchdog: Child,
}

/// The Redis processes of a run: the nodes' `--redis` seeds and the PIDs whose CPU is
/// Redis's cost. Dropping it kills them and deletes their directories.
#[derive(Debug)]
pub struct RedisFleet {
    processes: Vec<Process>,
    /// How many of the processes, first in order, are given as seeds (a cluster's client
    /// finds the rest itself).
    primaries: usize,
}

impl Drop for RedisFleet {
    fn drop(&mut self) {
        for process in &mut self.processes {
            // The watchdog reads its stdin to its end, then kills and cleans up.
            drop(process.watchdog.stdin.take());
            let _ = process.watchdog.wait();
        }
    }
}

/// Runs `redis-server` with the arguments after the script's name, prints its PID, waits
/// for its stdin to close, then kills it and deletes its directory (`$DIR`).
const WATCHDOG: &str = r#"mkdir -p "$DIR"; redis-server "$@" >/dev/null 2>&1 & pid=$!; echo $pid; read _; kill -9 $pid; wait $pid; rm -rf "$DIR""#;

impl RedisFleet {
    /// Starts what `start` names and waits until it serves (a cluster: every slot covered
    /// and every replica in sync).
    pub fn start(start: RedisStart) -> Result<Self, BenchError> {
        let mut fleet = Self {
            processes: Vec::new(),
            primaries: 0,
        };
        match start {
            RedisStart::Single => {
                fleet.spawn(&[])?;
                fleet.primaries = 1;
                fleet.wait_ready(|info| info.contains("loading:0"), "INFO", "persistence")?;
            }
            RedisStart::Cluster(primaries) => {
                for _ in 0..primaries * 2 {
                    fleet.spawn(&[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                    ])?;
                }
                fleet.primaries = primaries as usize;
                fleet.create_cluster()?;
            }
        }
        Ok(fleet)
    }

    /// The `--redis` value of the nodes.
    pub fn seeds(&self) -> String {
        self.processes
            .iter()
            .take(self.primaries)
            .map(|p| format!("redis://127.0.0.1:{}/", p.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// PIDs of every Redis process, primaries and replicas.
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(|p| p.pid).collect()
    }

    fn spawn(&mut self, extra: &[&str]) -> Result<(), BenchError> {
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("pushhub-bench-redis-{}-{port}", std::process::id()));
        let mut watchdog = Command::new("sh")
            // Its own process group: a Ctrl-C or hang-up meant for the bench does not kill
            // the shell before it cleans up; the bench's end of its stdin closing does.
            .process_group(0)
            .args(["-c", WATCHDOG, "redis-watchdog"])
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .args(extra)
            .env("DIR", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut pid = String::new();
        BufReader::new(watchdog.stdout.take().expect("stdout is piped")).read_line(&mut pid)?;
        let pid = pid.trim().parse().map_err(|_| {
            BenchError::Setup(format!(
                "--redis-start: could not start redis-server ({pid:?})"
            ))
        })?;
        self.processes.push(Process {
            port,
            pid,
            watchdog,
        });
        Ok(())
    }

    /// `redis-cli --cluster create` over every process, one replica per primary, then waits
    /// until every node says the cluster is ok and every replica is in sync.
    fn create_cluster(&mut self) -> Result<(), BenchError> {
        self.wait_ready(|info| info.contains("cluster_enabled:1"), "INFO", "cluster")?;
        let addresses: Vec<String> = self
            .processes
            .iter()
            .map(|p| format!("127.0.0.1:{}", p.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                BenchError::Setup(format!(
                    "--redis-start: cannot run redis-cli ({e}); install redis-tools"
                ))
            })?;
        if !created.status.success() {
            return Err(BenchError::Setup(format!(
                "--redis-start: redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&created.stdout)
            )));
        }
        self.wait_ready(
            |info| info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384"),
            "CLUSTER",
            "INFO",
        )?;
        // A replica still loading its primary's data would make the first writes' `WAIT`
        // and the first reads' timings about the sync, not about the bench.
        self.wait_ready(
            |info| info.contains("role:master") || info.contains("master_link_status:up"),
            "INFO",
            "replication",
        )
    }

    /// Waits (up to 30 s) until every process answers `command argument` with a text that
    /// `ready` accepts.
    fn wait_ready(
        &mut self,
        ready: impl Fn(&str) -> bool,
        command: &str,
        argument: &str,
    ) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        for process in &mut self.processes {
            loop {
                if exited(process.pid) {
                    return Err(BenchError::Setup(format!(
                        "--redis-start: redis-server on port {} exited (is redis-server installed? Debian: apt-get install redis-server redis-tools)",
                        process.port
                    )));
                }
                let answer = ask(process.port, command, argument);
                if answer.as_deref().is_some_and(&ready) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(BenchError::Setup(format!(
                        "--redis-start: redis-server on port {} not ready after 30 s ({command} {argument}: {answer:?})",
                        process.port
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

/// Whether the process is gone, or a zombie its shell has not reaped yet (the shell waits
/// in `read`, so a redis-server that failed to start stays one).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Asks the Redis on `port` one command, as text.
fn ask(port: u16, command: &str, argument: &str) -> Option<String> {
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let mut connection = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()?;
    ::redis::cmd(command)
        .arg(argument)
        .query::<String>(&mut connection)
        .ok()
}

/// A loopback port nobody listens on now.
fn free_port() -> Result<u16, BenchError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_flag_takes() {
        assert_eq!("single".parse(), Ok(RedisStart::Single));
        assert_eq!("cluster:3".parse(), Ok(RedisStart::Cluster(3)));
        assert!("cluster:2".parse::<RedisStart>().is_err());
        assert!("cluster".parse::<RedisStart>().is_err());
        assert!("sentinel".parse::<RedisStart>().is_err());
        assert_eq!(RedisStart::Cluster(4).to_string(), "cluster:4");
    }
}
