//! The `pushhub` binary: parses flags and environment, binds, runs until Ctrl-C or SIGTERM.

use anyhow::Context;
use clap::{Parser, Subcommand};
use pushhub::Config;
use tracing_subscriber::EnvFilter;

/// jemalloc instead of the system allocator: a gateway holds many thousands of small,
/// long-lived per-connection objects next to short-lived per-request ones, and jemalloc's
/// size classes keep them from fragmenting the heap. Measured with `pushhub bench --scenario
/// idle --subscribers 10000`: 1.83 vs 2.08 KiB per idle SSE stream, 1.99 vs 2.40 per
/// WebSocket, 2.45 vs 2.87 per parked long poll, at the same CPU per delivery
/// (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "pushhub",
    version,
    about = "One hub, five push transports plus Durable Streams, one cursor"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// A TOML file holding any flag of `serve`, grouped by layer (docs/operations.md has a
    /// commented example; `pushhub config` prints the effective one). Flags and `PUSHHUB_*`
    /// variables win over it.
    #[arg(long, env = "PUSHHUB_CONFIG", global = true)]
    config: Option<std::path::PathBuf>,
    /// Flags of `serve`, the default command.
    #[command(flatten)]
    serve: Config,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve(Box<Config>),
    /// Print the effective configuration of `serve` as TOML (flags, then `PUSHHUB_*`
    /// variables, then the `--config` file, then defaults), with where each value came
    /// from; secrets redacted.
    Config(Box<Config>),
    /// Load-benchmark each transport and write a report.
    Bench(Box<pushhub::bench::BenchArgs>),
    /// Follow a topic: one envelope per line (NDJSON) on stdout, on any transport,
    /// reconnecting by itself; on exit, the `--after` that resumes it goes to stderr.
    Sub(pushhub::client::SubArgs),
    /// Publish DATA to a topic, or one message per line of stdin; prints each
    /// acknowledgement. Exit 2 when the token is refused.
    Pub(pushhub::client::PubArgs),
}

/// The subcommands that take the flags of `serve`, which the configuration file sets.
const SERVING: &[&str] = &["serve", "config"];

/// Parses the command line with its configuration file; a bad flag is clap's usage error,
/// a bad file names the file, the line and the key (exit 2 either way).
fn parse() -> (Cli, pushhub::config::file::Parsed) {
    use clap::{CommandFactory, FromArgMatches};
    let command = Cli::command();
    let parsed =
        match pushhub::config::file::parse(&command, std::env::args_os().collect(), SERVING) {
            Ok(parsed) => parsed,
            Err(pushhub::config::file::ConfigError::Flags(error)) => error.exit(),
            Err(error) => {
                eprintln!("error: {error}");
                std::process::exit(2);
            }
        };
    match Cli::from_arg_matches(&parsed.matches) {
        Ok(cli) => (cli, parsed),
        Err(error) => error.exit(),
    }
}

fn main() -> anyhow::Result<()> {
    let (cli, parsed) = parse();
    if let Some(Command::Config(_)) = &cli.command {
        let command = <Cli as clap::CommandFactory>::command();
        let serve = command.find_subcommand("config").expect("a subcommand");
        let matches = parsed
            .matches
            .subcommand_matches("config")
            .expect("matched");
        print!("{}", pushhub::config::file::render(&parsed, serve, matches));
        return Ok(());
    }
    // The server runs one single-threaded runtime per worker: this one is worker 0, and
    // `pushhub::serve` starts the others. The bench's clients share one multi-threaded
    // runtime.
    if let Some(Command::Bench(args)) = &cli.command
        && let Some((_, client_cpus)) = pushhub::bench::cpu_split(args.cpus)
    {
        // Before the runtime's threads exist, so that they all inherit it; the server the
        // bench starts gets the other CPUs.
        pushhub::bench::affinity::pin(&client_cpus).context("cannot pin the bench's CPUs")?;
    }
    let runtime = match &cli.command {
        Some(Command::Bench(_)) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    }
    .enable_all()
    .build()
    .context("cannot start the runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_env("PUSHHUB_LOG")
        .unwrap_or_else(|_| EnvFilter::new("pushhub=info,tower_http=warn"));
    // One JSON object per line for log collectors; plain text for people.
    if std::env::var("PUSHHUB_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let config = match cli.command {
        Some(Command::Serve(config)) => *config,
        Some(Command::Bench(args)) => return bench(*args).await,
        Some(Command::Sub(args)) => return client(pushhub::client::subscribe(args).await),
        Some(Command::Pub(args)) => return client(pushhub::client::publish(args).await),
        Some(Command::Config(_)) => unreachable!("printed before the runtime started"),
        None => cli.serve,
    };
    // Every subscriber holds a socket: raise the soft open-file limit to the hard limit, as
    // nginx's worker_rlimit_nofile does, so the default 1024 does not cap connections.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(error) => tracing::warn!(%error, "could not raise the open-file limit"),
    }
    let listener = pushhub::gate::server::listen(config.listen, config.listen_backlog)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(store = %store_description(&config), "history store");
    // A contract: `pushhub bench` and the tests find the port of a server started with
    // `--listen 127.0.0.1:0` in this line (docs/operations.md, "Logs").
    tracing::info!("pushhub listening on {scheme}://{addr}/ (demo page at {scheme}://{addr}/)");
    pushhub::run(listener, config, shutdown_signal()).await?;
    tracing::info!("pushhub stopped");
    Ok(())
}

/// Which store the server runs with, for the startup log; never the Redis credentials.
fn store_description(config: &pushhub::Config) -> String {
    match (&config.data_dir, &config.redis) {
        (Some(dir), _) => format!("disk at {} (--fsync {:?})", dir.display(), config.fsync),
        (None, Some(urls)) => {
            let hosts: Vec<String> = urls
                .split(',')
                .map(|url| {
                    let (scheme, rest) = url.trim().split_once("://").unwrap_or(("redis", url));
                    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
                    format!("{scheme}://{host}")
                })
                .collect();
            let mode = clap::ValueEnum::to_possible_value(&config.redis_mode)
                .map(|value| value.get_name().to_owned())
                .unwrap_or_default();
            format!(
                "redis at {} (--redis-mode {mode}, --redis-min-replicas {})",
                hosts.join(","),
                config.redis_min_replicas
            )
        }
        (None, None) => "memory (history is lost on restart; see --data-dir)".to_owned(),
    }
}

async fn bench(args: pushhub::bench::BenchArgs) -> anyhow::Result<()> {
    use pushhub::bench::report;
    let run = pushhub::bench::run(&args).await?;
    report::write_all(&args, &run)
        .with_context(|| format!("cannot write the report to {}", args.out.display()))?;
    if args.json {
        println!("{}", report::json(&args, &run));
    } else {
        if let Some(floor) = &run.floor {
            println!("{}\n", report::floor_line(floor));
        }
        if args.scenario == pushhub::bench::Scenario::Compare {
            use pushhub::bench::compare;
            println!("{}", compare::markdown(&args, &run.results));
            println!("comparison: {}", args.out.join("comparison.md").display());
            return Ok(());
        }
        println!("{}", report::table(&run.results));
        for line in report::reading(&run.results) {
            println!("- {line}");
        }
        println!("\nreport: {}", args.out.join("report.md").display());
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutdown signal received");
}

/// Ends `pushhub sub` or `pub`: an error on stderr and its exit code (2 for a refused
/// token, 1 otherwise).
fn client(outcome: Result<(), pushhub::client::ClientError>) -> anyhow::Result<()> {
    if let Err(error) = outcome {
        eprintln!("pushhub: {error}");
        std::process::exit(error.exit_code());
    }
    Ok(())
}
