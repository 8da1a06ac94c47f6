//! `blockfence-watchdog-emu`: a hardware watchdog for one simulated node.
//!
//! The demo and the failover benchmark run several simulated nodes on one
//! machine, which has no watchdog device. This tool plays one node's
//! watchdog: it creates a FIFO at `--path`, which the node's daemon opens as
//! its `--watchdog` file and feeds, and it "resets the node" (runs
//! `--on-expire`, e.g. cut the node's storage path to EIO and SIGKILL every
//! process of the node) when the feeds stop for `--timeout-ms`.
//!
//! Semantics follow the Linux watchdog API
//! (Documentation/watchdog/watchdog-api):
//! - any byte feeds it; the timer is armed by the first byte (a real device
//!   is armed by its open, which a FIFO reader cannot see);
//! - a writer that closes after writing `V` as its last byte disarms it: the
//!   tool prints `{"event":"disarmed",...}` and exits 0;
//! - a writer that closes without `V` leaves it armed: the timer keeps
//!   running, and a new writer may open the FIFO and go on feeding (a
//!   restarted daemon);
//! - silence for `--timeout-ms`, measured on the monotonic clock with poll(2)
//!   timeouts (never sleeps), fires it once: the tool prints
//!   `{"event":"expired",...}`, runs `--on-expire` with `sh -c`, prints
//!   `{"event":"reset_done",...}` and exits 3.
//!
//! Output (stdout, one line each): `READY path=PATH` once the FIFO exists and
//! is open for reading, then JSON lines. Every JSON line carries `uptime_s`,
//! CLOCK_BOOTTIME in seconds (the clock of /proc/uptime, which shell
//! harnesses read without forking), so it can be placed on a timeline.
//!
//! The timing rule is the pure [`Timer`] (time is an argument); `main` only
//! polls the FIFO and reads the clock. It must not feed anything itself or
//! run `--on-expire` more than once.

use anyhow::{bail, Context};
use clap::Parser;
use nix::sys::stat::Mode;
use nix::time::{clock_gettime, ClockId};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

/// Default silence after which the watchdog fires, in ms.
const DEFAULT_TIMEOUT_MS: u64 = 1000;
/// The magic close character.
const MAGIC_CLOSE: u8 = b'V';
/// Exit code after the watchdog fired.
const EXIT_EXPIRED: u8 = 3;

/// A hardware watchdog emulator for one simulated node (see the module docs).
#[derive(Debug, Parser)]
#[command(name = "blockfence-watchdog-emu", version, about)]
struct Args {
    /// The FIFO to create (it must not exist, or must already be a FIFO).
    #[arg(long, env = "BLOCKFENCE_WATCHDOG_EMU_PATH")]
    path: PathBuf,
    /// Silence after the last feed after which the node is reset, in ms.
    #[arg(long, env = "BLOCKFENCE_WATCHDOG_EMU_TIMEOUT_MS", default_value_t = DEFAULT_TIMEOUT_MS)]
    timeout_ms: u64,
    /// Shell command run once (with `sh -c`) when the watchdog fires.
    #[arg(long, env = "BLOCKFENCE_WATCHDOG_EMU_ON_EXPIRE", default_value = "")]
    on_expire: String,
    /// A name for the output lines (the node's name).
    #[arg(long, env = "BLOCKFENCE_WATCHDOG_EMU_NODE", default_value = "")]
    node: String,
}

/// What the watchdog decides after an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// Keep going; poll again for at most this long (`None`: not armed, wait
    /// for the first feed as long as it takes).
    Wait(Option<u64>),
    /// The silence reached the timeout: reset the node. `silent_ms` is the
    /// time since the last feed.
    Expire { silent_ms: u64 },
    /// The last writer closed right after a `V`: stop, without a reset.
    Disarm,
}

/// The timing rule, pure: times are milliseconds on one monotonic clock,
/// passed in by the caller.
#[derive(Debug, Clone)]
struct Timer {
    timeout_ms: u64,
    /// When the last byte arrived; `None` until the first one (not armed).
    last_feed_ms: Option<u64>,
    /// Whether the last byte received was the magic close character.
    last_was_magic: bool,
    /// Bytes received so far.
    feeds: u64,
}

impl Timer {
    fn new(timeout_ms: u64) -> Timer {
        Timer {
            timeout_ms,
            last_feed_ms: None,
            last_was_magic: false,
            feeds: 0,
        }
    }

    /// The deadline check at `now_ms`, with nothing new read.
    fn tick(&self, now_ms: u64) -> Decision {
        match self.last_feed_ms {
            None => Decision::Wait(None),
            Some(last) => {
                let silent_ms = now_ms.saturating_sub(last);
                if silent_ms >= self.timeout_ms {
                    Decision::Expire { silent_ms }
                } else {
                    Decision::Wait(Some(self.timeout_ms - silent_ms))
                }
            }
        }
    }

    /// Bytes read at `now_ms`. The deadline is checked first: bytes that
    /// arrive after it passed (the poll returned late) do not undo a reset.
    fn bytes(&mut self, now_ms: u64, bytes: &[u8]) -> Decision {
        if let d @ Decision::Expire { .. } = self.tick(now_ms) {
            return d;
        }
        if let Some(&last) = bytes.last() {
            self.last_feed_ms = Some(now_ms);
            self.last_was_magic = last == MAGIC_CLOSE;
            self.feeds += bytes.len() as u64;
        }
        self.tick(now_ms)
    }

    /// Every writer closed at `now_ms`: disarmed after a `V`, else still
    /// counting (a closed watchdog that was not disarmed still fires).
    fn eof(&mut self, now_ms: u64) -> Decision {
        if let d @ Decision::Expire { .. } = self.tick(now_ms) {
            return d;
        }
        if self.last_was_magic {
            Decision::Disarm
        } else {
            self.tick(now_ms)
        }
    }
}

/// CLOCK_BOOTTIME in seconds: the clock of /proc/uptime.
fn uptime_s() -> f64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
        .unwrap_or(0.0)
}

fn emit(value: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Creates the FIFO (or accepts an existing one).
fn make_fifo(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_fifo() => Ok(()),
        Ok(_) => bail!(
            "{} exists and is not a FIFO; remove it or choose another --path",
            path.display()
        ),
        Err(_) => nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o600))
            .with_context(|| format!("creating the FIFO {}", path.display())),
    }
}

/// Opens the read end without waiting for a writer.
fn open_reader(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening the FIFO {} for reading", path.display()))
}

/// poll(2) for input on one descriptor: `Ok(true)` when readable or hung up,
/// `Ok(false)` when `timeout_ms` (`None`: forever) passed first.
fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: Option<u64>) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let timeout = timeout_ms.map_or(-1, |ms| ms.min(i32::MAX as u64) as libc::c_int);
    // SAFETY: `pfd` is a valid, initialised pollfd that lives across the call,
    // and the count passed is 1; the descriptor is borrowed, so it stays open.
    // (nix's safe wrapper needs its `poll` feature, which this crate does not
    // enable.)
    #[allow(unsafe_code)]
    let n = unsafe { libc::poll(&mut pfd, 1, timeout) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n > 0)
    }
}

/// Runs the watchdog until it expires or is disarmed.
fn serve(args: &Args) -> anyhow::Result<u8> {
    make_fifo(&args.path)?;
    let mut fd = open_reader(&args.path)?;
    emit_ready(&args.path);
    let start = Instant::now();
    let now_ms = || start.elapsed().as_millis() as u64;
    let mut timer = Timer::new(args.timeout_ms);
    let mut decision = timer.tick(now_ms());
    let mut buf = [0u8; 4096];
    loop {
        let wait = match decision {
            Decision::Wait(w) => w,
            Decision::Expire { silent_ms } => return Ok(expire(args, &timer, silent_ms)),
            Decision::Disarm => {
                emit(serde_json::json!({
                    "event": "disarmed", "node": args.node, "feeds": timer.feeds,
                    "uptime_s": uptime_s(),
                }));
                let _ = std::fs::remove_file(&args.path);
                return Ok(0);
            }
        };
        // poll(2) waits at least this long; an early wake-up just polls again.
        match poll_readable(fd.as_fd(), wait) {
            Ok(true) => {}
            Ok(false) => {
                decision = timer.tick(now_ms());
                continue;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {
                decision = timer.tick(now_ms());
                continue;
            }
            Err(e) => return Err(e).context("poll on the FIFO"),
        }
        match fd.read(&mut buf) {
            Ok(0) => {
                decision = timer.eof(now_ms());
                if matches!(decision, Decision::Wait(_)) {
                    // Reopen before closing the old end, so the FIFO never
                    // lacks a reader (a writer's open must not fail) and the
                    // new end does not report the old hang-up again.
                    let fresh = open_reader(&args.path)?;
                    fd = fresh;
                }
            }
            Ok(n) => decision = timer.bytes(now_ms(), &buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                decision = timer.tick(now_ms());
            }
            Err(e) => return Err(e).context("reading the FIFO"),
        }
    }
}

fn emit_ready(path: &Path) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "READY path={}", path.display());
    let _ = out.flush();
}

/// The reset: report, run the command once, report its status.
fn expire(args: &Args, timer: &Timer, silent_ms: u64) -> u8 {
    emit(serde_json::json!({
        "event": "expired", "node": args.node, "silent_ms": silent_ms,
        "timeout_ms": args.timeout_ms, "feeds": timer.feeds, "uptime_s": uptime_s(),
    }));
    let status = if args.on_expire.is_empty() {
        None
    } else {
        match Command::new("sh").arg("-c").arg(&args.on_expire).status() {
            Ok(s) => s.code(),
            Err(e) => {
                tracing::error!(error = %e, "cannot run --on-expire");
                None
            }
        }
    };
    emit(serde_json::json!({
        "event": "reset_done", "node": args.node, "status": status, "uptime_s": uptime_s(),
    }));
    let _ = std::fs::remove_file(&args.path);
    EXIT_EXPIRED
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    match serve(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("blockfence-watchdog-emu: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_armed_until_the_first_feed() {
        let t = Timer::new(100);
        assert_eq!(t.tick(0), Decision::Wait(None));
        assert_eq!(t.tick(1_000_000), Decision::Wait(None));
    }

    #[test]
    fn feeds_push_the_deadline_and_silence_expires_it() {
        let mut t = Timer::new(100);
        assert_eq!(t.bytes(10, b"."), Decision::Wait(Some(100)));
        assert_eq!(t.tick(60), Decision::Wait(Some(50)));
        assert_eq!(t.bytes(90, b".."), Decision::Wait(Some(100)));
        assert_eq!(t.tick(189), Decision::Wait(Some(1)));
        assert_eq!(t.tick(190), Decision::Expire { silent_ms: 100 });
        assert_eq!(t.feeds, 3);
    }

    #[test]
    fn a_late_feed_does_not_undo_an_expiry() {
        let mut t = Timer::new(100);
        t.bytes(0, b".");
        assert_eq!(t.bytes(150, b"."), Decision::Expire { silent_ms: 150 });
    }

    #[test]
    fn magic_close_then_eof_disarms() {
        let mut t = Timer::new(100);
        t.bytes(0, b"...V");
        assert_eq!(t.eof(10), Decision::Disarm);
    }

    #[test]
    fn magic_must_be_the_last_byte() {
        let mut t = Timer::new(100);
        t.bytes(0, b"V.");
        assert_eq!(t.eof(10), Decision::Wait(Some(90)));
        t.bytes(20, b"V");
        t.bytes(30, b".");
        assert_eq!(t.eof(40), Decision::Wait(Some(90)));
    }

    #[test]
    fn eof_without_magic_keeps_counting_and_a_new_writer_may_feed() {
        let mut t = Timer::new(100);
        t.bytes(0, b".");
        assert_eq!(t.eof(30), Decision::Wait(Some(70)));
        assert_eq!(t.bytes(80, b"."), Decision::Wait(Some(100)));
        assert_eq!(t.eof(100), Decision::Wait(Some(80)));
        assert_eq!(t.tick(180), Decision::Expire { silent_ms: 100 });
    }

    #[test]
    fn magic_after_the_deadline_does_not_disarm() {
        let mut t = Timer::new(100);
        t.bytes(0, b".");
        assert_eq!(t.bytes(200, b"V"), Decision::Expire { silent_ms: 200 });
        assert_eq!(t.eof(200), Decision::Expire { silent_ms: 200 });
    }

    #[test]
    fn an_empty_read_is_not_a_feed() {
        let mut t = Timer::new(100);
        t.bytes(0, b".");
        assert_eq!(t.bytes(50, b""), Decision::Wait(Some(50)));
    }
}
