//! The servers a run measures: a pushhub started as a child process on an ephemeral port (one
//! per node, sharing Redis for a cluster), or the running ones `--url` names; their
//! addresses, PIDs, CPU time and RSS.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader},
    process::{Child, ChildStderr, Command, Stdio},
    thread::JoinHandle,
};

use super::{BenchArgs, BenchError, RedisFleet, affinity, cpu_split, procfs};

/// The servers measured: one node, or the nodes of a cluster.
pub(super) struct Server {
    pub(super) nodes: Vec<Node>,
    /// The Redis processes the nodes share, when the bench started them (`--redis-start`).
    pub(super) redis_pids: Vec<u32>,
}

pub(super) struct Node {
    base: String,
    pid: Option<u32>,
    child: Option<Child>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Server {
    /// The first node: where a phase's Durable Streams are created.
    pub(super) fn first_base(&self) -> &str {
        &self.nodes[0].base
    }

    pub(super) fn bases(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.base.clone()).collect()
    }

    /// PIDs of every node, if all are known.
    pub(super) fn pids(&self) -> Option<Vec<u32>> {
        self.nodes.iter().map(|n| n.pid).collect()
    }

    /// Resident memory of all nodes together.
    pub(super) fn rss_kib(&self) -> Option<u64> {
        rss_of(&self.pids()?)
    }

    /// CPU time of all nodes together, ns, from the scheduler's exact accounting.
    pub(super) fn cpu_ns(&self) -> Option<u64> {
        Some(self.node_cpu_ns()?.into_iter().sum())
    }

    /// CPU time of each node, ns, in the nodes' order.
    pub(super) fn node_cpu_ns(&self) -> Option<Vec<u64>> {
        self.pids()?.into_iter().map(procfs::cpu_ns).collect()
    }

    /// CPU time of the Redis processes the bench started, ns (`None` without them).
    pub(super) fn redis_cpu_ns(&self) -> Option<u64> {
        if self.redis_pids.is_empty() {
            return None;
        }
        self.redis_pids.iter().map(|&pid| procfs::cpu_ns(pid)).sum()
    }

    /// CPU time of all nodes together.
    pub(super) fn cpu_times(&self) -> Option<procfs::CpuTimes> {
        self.pids()?
            .into_iter()
            .map(procfs::cpu_times)
            .try_fold(procfs::CpuTimes::default(), |sum, times| {
                Some(sum.plus(times?))
            })
    }
}

pub(super) fn rss_of(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|&pid| procfs::rss_kib(pid)).sum()
}

/// Starts the nodes (or names the `--url` ones); with `redis`, every node started uses it.
pub(super) fn start_server(
    args: &BenchArgs,
    redis: Option<&RedisFleet>,
) -> Result<Server, BenchError> {
    if !args.url.is_empty() {
        let mut nodes = Vec::new();
        for (index, url) in args.url.iter().enumerate() {
            let base = url.trim_end_matches('/').to_owned();
            let host = base
                .split("://")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .unwrap_or_default();
            let loopback = host.starts_with("127.")
                || host.starts_with("localhost")
                || host.starts_with("[::1]");
            if !loopback && !args.allow_remote {
                return Err(BenchError::Setup(format!(
                    "{url} is not a loopback address: pass --allow-remote to load a remote server"
                )));
            }
            nodes.push(Node {
                base,
                pid: args.server_pid.get(index).copied(),
                child: None,
            });
        }
        return Ok(Server {
            nodes,
            redis_pids: Vec::new(),
        });
    }
    let mut server_args = args.server_args.clone();
    if let Some(redis) = redis {
        server_args.push(format!("--redis={}", redis.seeds()));
    }
    if args.nodes > 1 && !server_args.iter().any(|a| a.starts_with("--redis")) {
        return Err(BenchError::Setup(
            "--nodes above 1 needs shared topics: add --redis-start=single (or cluster:3), or \
             --server-arg=--redis=redis://HOST:PORT"
                .into(),
        ));
    }
    let nodes = (0..args.nodes)
        .map(|_| start_node(args, &server_args))
        .collect::<Result<_, _>>()?;
    Ok(Server {
        nodes,
        redis_pids: redis.map(RedisFleet::pids).unwrap_or_default(),
    })
}

/// Starts one node with `server_args` (the run's, plus the Redis it was given).
fn start_node(args: &BenchArgs, server_args: &[String]) -> Result<Node, BenchError> {
    let binary = match &args.server_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?,
    };
    let mut command = Command::new(binary);
    // A child inherits the CPUs of the thread that starts it: this thread takes the
    // server's CPUs for the spawn, and its own back after.
    let restore = match cpu_split(args.cpus) {
        Some((server_cpus, _)) => {
            let own = affinity::current();
            affinity::pin(&server_cpus)?;
            own
        }
        None => None,
    };
    let child = command
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--max-poll-limit",
            "1000",
        ])
        .args(server_args)
        .env("PUSHHUB_LOG", "pushhub=info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    if let Some(own) = restore {
        affinity::pin(&own)?;
    }
    let mut child = child?;
    let stdout = child.stdout.take().expect("stdout is piped");
    // Read from the start, so that a server writing much to stderr never blocks on the pipe;
    // kept for the error when it exits before listening.
    let stderr = keep_tail(child.stderr.take().expect("stderr is piped"));
    let mut lines = BufReader::new(stdout).lines();
    let mut said = VecDeque::new();
    let addr = loop {
        let Some(line) = lines.next() else {
            return Err(exited_before_listening(&mut child, stderr, said));
        };
        let line = line?;
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split('/').next().unwrap_or_default().to_owned();
        }
        if said.len() == TAIL_LINES {
            said.pop_front();
        }
        said.push_back(line);
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok(Node {
        base: format!("http://{addr}"),
        pid: Some(child.id()),
        child: Some(child),
    })
}

/// Lines of a child's output kept for the error that explains why it did not start.
const TAIL_LINES: usize = 20;

/// Reads `stderr` to its end in a thread of its own, keeping its last lines.
fn keep_tail(stderr: ChildStderr) -> JoinHandle<VecDeque<String>> {
    std::thread::spawn(move || {
        let mut tail = VecDeque::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        tail
    })
}

/// The error of a server that ended its output before saying where it listens: its exit
/// status and what it said (its stderr, where clap and the server's own errors go, else its
/// last log lines), so a mistyped `--server-arg` shows the server's own complaint.
fn exited_before_listening(
    child: &mut Child,
    stderr: JoinHandle<VecDeque<String>>,
    stdout: VecDeque<String>,
) -> BenchError {
    let status = child
        .wait()
        .map_or_else(|e| format!("status unknown: {e}"), |s| s.to_string());
    let stderr = stderr.join().unwrap_or_default();
    let said = if stderr.iter().any(|l| !l.trim().is_empty()) {
        stderr
    } else {
        stdout
    };
    let said: Vec<String> = said.into_iter().filter(|l| !l.trim().is_empty()).collect();
    let mut message = format!("server exited before listening ({status})");
    if !said.is_empty() {
        message.push_str(", saying:\n");
        message.push_str(&said.join("\n"));
    }
    BenchError::Server(message)
}
