//! `blockfence-apifake`: the node API over the in-memory fake backend, for
//! testing API clients and fuzzing the API (scripts/fuzz-api) without disks.
//!
//! It serves [`blockfence::api::router`] on a Unix socket and a loopback TCP
//! address, over [`FakeBackend`] with the volumes given by `--volume` (all
//! free), with a [`Metrics`] the fake keeps up to date. An acquire of a held
//! volume waits at most `--max-wait-seconds` (so a fuzzer's hour-long
//! timeouts end in a 409 soon). Once both listeners
//! are bound it prints one line `READY socket=PATH tcp=ADDR` on stdout (ADDR
//! is the real address when port 0 was asked for), so callers wait on that
//! line rather than sleeping. It exits 0 on SIGTERM or SIGINT after a graceful
//! shutdown (open event streams end, the socket file is removed).
//!
//! It must never listen on anything but loopback (the API has no
//! authentication; [`Server::start`] refuses other addresses) and it holds no
//! real lease: nothing it grants protects a disk.

use anyhow::Context;
use blockfence::api::fake::FakeBackend;
use blockfence::api::{ServeConfig, Server};
use blockfence::metrics::Metrics;
use clap::Parser;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// Default `--socket`.
const DEFAULT_SOCKET: &str = "/tmp/blockfence-apifake.sock";
/// Default `--tcp`: loopback, any free port.
const DEFAULT_TCP: &str = "127.0.0.1:0";
/// Default `--max-wait-seconds`.
const DEFAULT_MAX_WAIT_SECONDS: f64 = 2.0;
/// Default `--volume`s.
const DEFAULT_VOLUMES: &[&str] = &["vol-a", "vol-b", "vol-c"];

/// Serve the blockfence node API over an in-memory fake backend (no disks, no
/// real leases) on a Unix socket and a loopback TCP address. Prints
/// `READY socket=PATH tcp=ADDR` once listening; stops on SIGTERM/SIGINT.
#[derive(Debug, Parser)]
#[command(name = "blockfence-apifake", version)]
struct Args {
    /// Unix socket to serve on (a stale socket there is replaced).
    #[arg(long, value_name = "PATH", env = "BLOCKFENCE_APIFAKE_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,

    /// Loopback TCP address to serve on; port 0 picks a free port (printed on
    /// the READY line).
    #[arg(long, value_name = "ADDR", env = "BLOCKFENCE_APIFAKE_TCP", default_value = DEFAULT_TCP)]
    tcp: SocketAddr,

    /// A volume the fake knows (repeat for more; comma-separated in the
    /// environment variable).
    #[arg(
        long = "volume",
        value_name = "NAME",
        env = "BLOCKFENCE_APIFAKE_VOLUMES",
        value_delimiter = ',',
        default_values_t = DEFAULT_VOLUMES.iter().map(|v| v.to_string()).collect::<Vec<_>>()
    )]
    volumes: Vec<String>,

    /// Longest time an acquire of a held volume waits, whatever its
    /// timeout_seconds (it then answers 409 held), so fuzzers asking for an
    /// hour do not hang.
    #[arg(long, value_name = "SECONDS", env = "BLOCKFENCE_APIFAKE_MAX_WAIT_SECONDS", default_value_t = DEFAULT_MAX_WAIT_SECONDS)]
    max_wait_seconds: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    for volume in &args.volumes {
        blockfence::api::router::valid_name("--volume", volume)
            .map_err(|e| anyhow::anyhow!(e.message))?;
    }

    // Register the handlers before announcing READY, so a signal sent right
    // after the line is seen is not lost.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let max_wait = Duration::try_from_secs_f64(args.max_wait_seconds).map_err(|e| {
        anyhow::anyhow!(
            "--max-wait-seconds {}: {e}; give a number of seconds >= 0",
            args.max_wait_seconds
        )
    })?;
    let metrics = Arc::new(Metrics::new());
    let commands = FakeBackend::new(args.volumes.iter().cloned())
        .with_metrics(metrics.clone())
        .with_max_wait(max_wait)
        .spawn();
    let config = ServeConfig {
        socket: args.socket.clone(),
        tcp: Some(args.tcp),
    };
    let server = Server::start(&config, commands, metrics)
        .await
        .context("starting the API server")?;
    let tcp = server
        .tcp_addr()
        .context("the server has no TCP address although one was configured")?;
    tracing::info!(socket = %args.socket.display(), %tcp, volumes = ?args.volumes, "serving the fake API");
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY socket={} tcp={tcp}", args.socket.display())
        .and_then(|()| out.flush())
        .context("writing the READY line")?;
    drop(out);

    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    server.shutdown().await.context("stopping the API server")?;
    Ok(())
}
