//! The `blockfence` subcommands.
//!
//! Each subcommand lives in its own file and is a thin layer over the library:
//! parse arguments, call `disk`/`ext4`/`core`, print. Errors a user can meet are
//! reported as one line that says what is wrong and what to do, with a non-zero
//! exit code; nothing here panics on bad input.

mod daemon;
mod doctor;
mod format;
mod grow;
mod inspect;
mod lease;
mod run;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Exit codes shared by all subcommands (see also `blockfence lease acquire --help`).
pub mod exit {
    /// Success; for `lease acquire`: acquired, then released on a signal.
    pub const OK: u8 = 0;
    /// An error: bad input, I/O failure, unusable device.
    pub const ERROR: u8 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: u8 = 2;
    /// `lease acquire`: the lease was not acquired before `--timeout`.
    pub const TIMED_OUT: u8 = 3;
    /// `lease acquire`: the lease was acquired and then lost (expired or superseded).
    pub const LOST: u8 = 4;
    /// `lease acquire`: stopped by SIGTERM/SIGINT before it acquired.
    pub const INTERRUPTED: u8 = 5;
}

/// blockfence: at most one writer per shared block volume.
///
/// A lease area at the end of the device (outside the filesystem) tells every
/// node who may write. See docs/PROTOCOL.md for the protocol and its guarantees.
#[derive(Parser, Debug)]
#[command(name = "blockfence", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log filter (tracing syntax, e.g. `info`, `blockfence=debug`).
    #[arg(long, global = true, env = "BLOCKFENCE_LOG", default_value = "warn")]
    pub log: String,
    /// Log as JSON lines (for Kubernetes).
    #[arg(long, global = true, env = "BLOCKFENCE_LOG_JSON")]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Write the lease area at the end of DEVICE and create ext4 (with MMP) in the rest.
    Format(format::Args),
    /// Show the lease area (holder, generation, slots, parameters) and the ext4 MMP state.
    Inspect(inspect::Args),
    /// Take, hold and release the lease from the command line.
    #[command(subcommand)]
    Lease(lease::Command),
    /// Move the lease area to the new end of a device that was enlarged.
    Grow(grow::Args),
    /// Run the node daemon: hold the leases of the volumes local pods ask for,
    /// serve the node-local API, fence this node's use of a volume it can no
    /// longer prove it owns, feed the watchdog.
    ///
    /// Pods ask through the API (docs/openapi.yaml) on the Unix socket, most
    /// simply with `blockfence run`. Every option also comes from an
    /// environment variable and the --config file (docs/CONFIG.md).
    /// SIGTERM/SIGINT: holders are asked to stop, their volumes fenced or
    /// released, then the daemon exits.
    Daemon(crate::daemon::DaemonArgs),
    /// Acquire a volume from the daemon, mount it, run COMMAND; fence if the grant is lost.
    Run(run::Args),
    /// Check each volume's NVMe paths, stale-I/O timeouts and reservation support, with fixes.
    Doctor(doctor::Args),
}

/// Runs the command line; the binary's whole `main`.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    init_logging(&cli.log, cli.log_json);
    let result = match cli.command {
        Command::Format(a) => format::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Lease(c) => lease::run(c),
        Command::Grow(a) => grow::run(a),
        Command::Daemon(a) => daemon::run(a),
        Command::Run(a) => run::run(a),
        Command::Doctor(a) => doctor::run(a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("blockfence: {e:#}");
            ExitCode::from(exit::ERROR)
        }
    }
}

fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
