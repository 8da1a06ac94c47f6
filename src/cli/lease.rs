//! `blockfence lease acquire`: take, hold and release the lease from a shell.

use crate::cli::exit;
use crate::core::lease::Event;
use crate::disk::runner::{check_node_name, LeaseRunner, Outcome};
use anyhow::Context;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Wait for the lease on DEVICE, hold it (renewing) until SIGTERM or SIGINT,
    /// then release it so that a waiting peer takes over at once.
    ///
    /// Prints one JSON object per line on stdout for each event:
    /// `waiting` (who holds it), `acquired` (with the fencing `generation` and
    /// `valid_for_ms`), `renew_failed`, `lost` (with a `reason`), `released`.
    ///
    /// Exit codes: 0 acquired and then released on a signal; 1 error (bad
    /// device, unformatted or corrupted area, I/O); 2 bad command line;
    /// 3 timed out before acquiring; 4 acquired and then lost (expired or
    /// superseded): whatever wrote under this lease must stop now; 5 stopped by
    /// a signal before it acquired.
    Acquire(AcquireArgs),
}

#[derive(clap::Args, Debug)]
pub struct AcquireArgs {
    /// Block device (or image file) formatted by `blockfence format`.
    pub device: PathBuf,
    /// This node's name, unique among the nodes sharing the volume.
    #[arg(long, env = "BLOCKFENCE_NODE_NAME")]
    pub node: String,
    /// Give up after this many seconds without the lease (default: wait forever).
    #[arg(long, value_name = "SECONDS", allow_negative_numbers = true, value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// The lease parameters this node records (each defaults to the area's).
    #[command(flatten)]
    pub params: crate::daemon::config::ParamOverrides,
    /// Once acquired, mark the ext4 MMP block clean (with a valid checksum) if
    /// it says in use, so that the mount that follows a takeover from a crashed
    /// holder does not wait out the kernel's MMP check (11-22 s). Safe because
    /// the lease has proven the previous holder fenced; refused while the
    /// filesystem is mounted on this node. Prints an `mmp_cleaned` event.
    #[arg(long)]
    pub mmp_clean: bool,
}

pub fn run(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Acquire(a) => acquire(a),
    }
}

/// `--timeout`: a number of seconds, `>= 0`, that a `Duration` can hold.
/// Negative numbers reach this parser (rather than being taken for an option)
/// so that `--timeout -1` is told what is wrong with it.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| "not a number of seconds (e.g. 30 or 0.5)".to_string())?;
    if !(secs.is_finite() && secs >= 0.0) {
        return Err("must be a number of seconds >= 0 (leave it out to wait forever)".into());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| "too large (leave it out to wait forever)".into())
}

fn acquire(args: AcquireArgs) -> anyhow::Result<u8> {
    let timeout = args.timeout;
    check_node_name(&args.node).with_context(|| format!("--node {:?}", args.node))?;
    // Handlers first: a SIGTERM that arrives while the device is being opened
    // then ends the run with the interrupted code, not the signal's default.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    let mut runner = LeaseRunner::open(&args.device, &args.node, |area| args.params.apply(area))?;
    runner.use_stop_flag(stop);
    let device = args.device.clone();
    let mmp_clean = args.mmp_clean;
    let outcome = runner.run(timeout, &mut |now_ms, event| {
        print_event(now_ms, event);
        if mmp_clean && matches!(event, Event::Acquired { .. }) {
            clean_mmp(&device);
        }
    })?;
    Ok(match outcome {
        Outcome::Released => exit::OK,
        Outcome::TimedOut => exit::TIMED_OUT,
        Outcome::Lost => exit::LOST,
        Outcome::Interrupted => exit::INTERRUPTED,
    })
}

/// Marks the MMP block clean after an acquire; reports, never fails the lease.
fn clean_mmp(device: &std::path::Path) {
    let event = match crate::ext4::mark_mmp_clean(device) {
        Ok(previous) => serde_json::json!({"event": "mmp_cleaned", "previous": previous}),
        Err(e) => serde_json::json!({"event": "mmp_clean_failed", "error": e.to_string()}),
    };
    println!("{event}");
}

/// One JSON line per event; times are durations on this node's clock.
fn print_event(now_ms: u64, event: &Event) {
    let mut value = match serde_json::to_value(event) {
        Ok(v) => v,
        Err(_) => return,
    };
    if let serde_json::Value::Object(map) = &mut value {
        if let Some(until) = map.remove("valid_until").and_then(|v| v.as_u64()) {
            map.insert("valid_for_ms".into(), until.saturating_sub(now_ms).into());
        }
    }
    println!("{value}");
}
