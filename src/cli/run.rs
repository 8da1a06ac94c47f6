//! `blockfence run`: the wrapper a database pod runs. It acquires a volume from
//! the node's daemon, mounts it, runs the command, keeps the session alive,
//! and fences itself (shutdown, kill, unmount) the moment it can no longer
//! prove the grant is valid.
//!
//! This file is the shell around [`crate::core::holder::HolderMachine`], which
//! decides when to keep alive, stop, fence, unmount and release; here are only
//! the I/O (API requests, mount, the child process, signals) and the clock
//! (tokio's monotonic one).
//!
//! Invariants:
//! - The fence only ever touches the filesystem mounted at DIR if it is the
//!   granted device (same device number): the shutdown ioctl must never hit
//!   whatever filesystem DIR sits on once our mount is gone.
//! - The child is killed by process group only while it is not yet reaped
//!   (its exit is observed with `waitid(WNOWAIT)`), so the group id cannot have
//!   been reused.
//! - The session is released only after the filesystem was unmounted (or the
//!   fence completed); if the unmount fails it is not released, so the
//!   daemon's session timeout fences the node.
//!
//! What it must not do: decide anything the machine decides, or wait on the
//! daemon in a way that delays a fence.

use crate::api::{self, router::valid_name, Grant, StopReason};
use crate::cli::exit;
use crate::client::{code_name, Client, ClientError};
use crate::core::holder::{
    FenceReason, GiveUpReason, HolderAction, HolderConfig, HolderInput, HolderMachine, Millis,
    Phase, Renewal,
};
use crate::ext4::{Ext4Error, ShutdownMode};
use crate::fence::{self, holders, FenceError, FenceOps, FenceTarget, SystemOps, Watchdog};
use anyhow::{anyhow, bail, Context};
use nix::errno::Errno;
use nix::mount::MntFlags;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::SignalKind;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Default `--stop-timeout`, in seconds.
pub const DEFAULT_STOP_TIMEOUT_SECS: &str = "30";
/// Default `--stop-signal`.
pub const DEFAULT_STOP_SIGNAL: &str = "SIGTERM";
/// Longest single acquire request (the API's limit); longer waits are several.
pub const ACQUIRE_CHUNK: Duration = api::MAX_ACQUIRE_TIMEOUT;
/// The time the fence is given (`run_fence`'s deadline from its start): its
/// shutdown step is due within a quarter of it, inside the machine's lead.
pub const FENCE_BUDGET: Duration = Duration::from_secs(3);
/// How long, after the fence, the child is waited for to exit.
pub const CHILD_EXIT_WAIT: Duration = Duration::from_secs(10);
/// Per-request timeout of a keepalive: at least this...
pub const MIN_KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(500);
/// ...and at most this (otherwise the keepalive interval).
pub const MAX_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of the release request.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// The signals forwarded to the command.
pub const FORWARDED_SIGNALS: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];
pub use crate::nsmount::{mount_spec, MountSpec, FS_TYPE};

const AFTER_HELP: &str = "\
What it does:
  1. Acquires VOLUME from the blockfence daemon on this node (waiting up to
     --acquire-timeout while another holder has it), then mounts the granted
     device on DIR as ext4 with the granted mount options (always including
     errors=remount-ro) plus --mount-options. DIR must exist (or --mkdir) and
     must not be a mount point already.
  2. Runs COMMAND in its own process group and forwards SIGTERM, SIGINT,
     SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to it. The environment variable
     BLOCKFENCE_GENERATION tells it the lease generation (a fencing token).
  3. Keeps the session alive every keepalive_interval_ms. The grant is valid
     until the send time of the newest successful keepalive plus its
     valid_for_ms, on this node's monotonic clock.
  4. Fences itself when the daemon says the session is over, or when the grant
     is about to run out without a newer answer (daemon stalled, dead, socket
     gone): the filesystem is shut down (no more writes), COMMAND and every
     process holding the filesystem are SIGKILLed, and DIR is unmounted.
  5. When the daemon asks the holder to stop (handover, shutdown), sends
     --stop-signal to COMMAND and keeps the session alive while it exits; if it
     has not exited after --stop-timeout, fences as above.
  6. When COMMAND exits: syncs, unmounts DIR (killing processes that still
     hold it), releases the volume, and exits with COMMAND's status. If the
     unmount fails the volume is not released (the daemon then fences it when
     the session times out).

Unprivileged containers (--daemon-mount):
  A container without CAP_SYS_ADMIN cannot mount ext4. With --daemon-mount,
  step 1 asks the daemon to mount instead (POST /v1/volumes/VOLUME/mount over
  --socket): the daemon identifies this process by the socket and mounts the
  granted device on DIR in this process's mount namespace. DIR must exist in
  it (or --mkdir) and be reached without symlinks; --mount-options are not
  accepted (the grant's options are used). At the end DIR is synced and the
  volume released: the daemon's release fence unmounts it, in every
  namespace. If the grant runs out, this wrapper can neither shut down nor
  unmount the filesystem: it kills COMMAND and every process of its own
  holding the filesystem, and the daemon's fence (when the session expires)
  shuts it down and unmounts it.

Exit codes:
  COMMAND's status  COMMAND exited (128+N if killed by signal N)
  1                 an error: no daemon at the socket, unknown volume, DIR
                    missing or already a mount point, mount failed, COMMAND
                    not found, unmount failed (volume not released)
  2                 bad command line
  3                 the volume was not acquired within --acquire-timeout
  4                 the volume was lost and fenced (COMMAND was killed)
  5                 stopped by SIGTERM or SIGINT before COMMAND started";

/// Acquire a volume, mount it, run COMMAND, fence if the grant is lost.
#[derive(clap::Args, Debug)]
#[command(after_long_help = AFTER_HELP)]
pub struct Args {
    /// The volume to acquire (as the daemon names it).
    #[arg(long, env = "BLOCKFENCE_VOLUME")]
    pub volume: String,
    /// Where to mount it.
    #[arg(long, value_name = "DIR", env = "BLOCKFENCE_MOUNT")]
    pub mount: PathBuf,
    /// The daemon's API socket.
    #[arg(long, value_name = "PATH", env = "BLOCKFENCE_SOCKET", default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Who holds the volume, for status and errors [default: $HOSTNAME, else the host name].
    #[arg(long, value_name = "NAME", env = "BLOCKFENCE_HOLDER")]
    pub holder: Option<String>,
    /// Give up after this many seconds without the volume [default: wait forever].
    #[arg(long, value_name = "SECONDS", env = "BLOCKFENCE_ACQUIRE_TIMEOUT", value_parser = parse_seconds, allow_negative_numbers = true)]
    pub acquire_timeout: Option<Duration>,
    /// How long COMMAND may take to exit after the daemon asked it to stop,
    /// in seconds, before it is fenced.
    #[arg(long, value_name = "SECONDS", env = "BLOCKFENCE_STOP_TIMEOUT", default_value = DEFAULT_STOP_TIMEOUT_SECS, value_parser = parse_seconds, allow_negative_numbers = true)]
    pub stop_timeout: Duration,
    /// The signal that asks COMMAND to stop (name such as SIGTERM or TERM, or number).
    #[arg(long, value_name = "SIGNAL", env = "BLOCKFENCE_STOP_SIGNAL", default_value = DEFAULT_STOP_SIGNAL, value_parser = parse_signal)]
    pub stop_signal: Signal,
    /// Extra mount options, comma-separated (e.g. noatime,data=ordered);
    /// errors=remount-ro cannot be weakened.
    #[arg(long, value_name = "OPTS", env = "BLOCKFENCE_MOUNT_OPTIONS")]
    pub mount_options: Option<String>,
    /// Ask the daemon to mount the volume on DIR in this process's mount
    /// namespace instead of mounting it here: for containers without
    /// CAP_SYS_ADMIN. The daemon's fence is then what unmounts it.
    #[arg(
        long,
        env = "BLOCKFENCE_DAEMON_MOUNT",
        conflicts_with = "mount_options"
    )]
    pub daemon_mount: bool,
    /// Create DIR (and its parents) if it does not exist.
    #[arg(long, env = "BLOCKFENCE_MKDIR")]
    pub mkdir: bool,
    /// The command to run and its arguments (after `--`).
    #[arg(value_name = "COMMAND", required = true, last = true)]
    pub command: Vec<OsString>,
}

/// Errors of the wrapper's own operations.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("mount point {}: {error} (create it, or pass --mkdir)", path.display())]
    MountDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("mount point {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("{} is already a mount point; unmount it first or choose another --mount", path.display())]
    AlreadyMounted { path: PathBuf },
    #[error(transparent)]
    BadMountOption(#[from] crate::nsmount::BadMountOption),
    #[error("command not found: {command:?} ({why})")]
    CommandNotFound { command: String, why: String },
    #[error("the granted device {}: {why}", device.display())]
    BadDevice { device: PathBuf, why: String },
    #[error("mounting {} on {} (ext4, {options}): {errno}{}", device.display(), dir.display(), mount_hint(*errno))]
    Mount {
        device: PathBuf,
        dir: PathBuf,
        options: String,
        errno: Errno,
    },
    #[error("the daemon could not mount the volume on {}: {error}", dir.display())]
    DaemonMount { dir: PathBuf, error: String },
    #[error("starting {command:?}: {error}")]
    Spawn {
        command: String,
        error: std::io::Error,
    },
    #[error("{} is now a mount of another device; not touching it", dir.display())]
    ForeignMount { dir: PathBuf },
    #[error("unmounting {}: {errno}{}", dir.display(), if *busy_after_kill { " (still busy after killing every holder)" } else { "" })]
    Unmount {
        dir: PathBuf,
        errno: Errno,
        busy_after_kill: bool,
    },
    #[error(transparent)]
    Holders(#[from] FenceError),
}

fn mount_hint(e: Errno) -> &'static str {
    match e {
        Errno::EPERM | Errno::EACCES => " (needs CAP_SYS_ADMIN: run as root)",
        Errno::EINVAL => " (not an ext4 filesystem, or a mount option ext4 does not know)",
        Errno::ENOENT | Errno::ENOTBLK | Errno::ENXIO => " (the device is missing on this node)",
        Errno::EBUSY => " (the device is in use, or mounted elsewhere)",
        _ => "",
    }
}

/// `--acquire-timeout`, `--stop-timeout`: seconds `>= 0`.
fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| "not a number of seconds (e.g. 30 or 0.5)".to_string())?;
    if !(secs.is_finite() && secs >= 0.0) {
        return Err("must be a number of seconds >= 0".into());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| "too large".into())
}

/// `--stop-signal`: `SIGTERM`, `TERM`, `term` or a number.
fn parse_signal(s: &str) -> Result<Signal, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("no signal number {n}"));
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map_err(|_| format!("unknown signal {s:?} (e.g. SIGTERM, INT, 15)"))
}

/// Splits `--mount-options`.
fn split_options(opts: Option<&str>) -> Vec<String> {
    opts.map(|s| {
        s.split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(String::from)
            .collect()
    })
    .unwrap_or_default()
}

/// The mount point: exists (or created with `mkdir`), a directory, not a mount
/// point; returned canonical (mountinfo shows canonical paths).
fn prepare_dir(dir: &Path, mkdir: bool) -> Result<PathBuf, RunError> {
    let err = |error| RunError::MountDir {
        path: dir.to_path_buf(),
        error,
    };
    if mkdir {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let meta = std::fs::metadata(dir).map_err(err)?;
    if !meta.is_dir() {
        return Err(RunError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    let canonical = std::fs::canonicalize(dir).map_err(err)?;
    if holders::find_mount(&canonical)?.is_some() {
        return Err(RunError::AlreadyMounted { path: canonical });
    }
    Ok(canonical)
}

/// Checks that the command can be started: a path to an executable file, or
/// a name found in PATH.
fn check_command(command: &OsString) -> Result<(), RunError> {
    let shown = command.to_string_lossy().into_owned();
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let path = Path::new(command);
    if command.is_empty() {
        return Err(RunError::CommandNotFound {
            command: shown,
            why: "empty".into(),
        });
    }
    if path.components().count() > 1 || shown.contains('/') {
        if executable(path) {
            return Ok(());
        }
        return Err(RunError::CommandNotFound {
            command: shown,
            why: "no executable file at that path".into(),
        });
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&search).any(|d| executable(&d.join(path))) {
        return Ok(());
    }
    Err(RunError::CommandNotFound {
        command: shown,
        why: format!("not in PATH={}", search.to_string_lossy()),
    })
}

/// Who holds the volume: `--holder`, else $HOSTNAME, else the host name.
fn holder_name(arg: Option<String>) -> anyhow::Result<String> {
    if let Some(h) = arg {
        return Ok(h);
    }
    if let Some(h) = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()) {
        return Ok(h);
    }
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name from /proc/sys/kernel/hostname (pass --holder)")?;
    Ok(h.trim().to_string())
}

/// A watchdog that does nothing: `blockfence run` has no watchdog of its own
/// (the daemon's session timeout backs it).
struct NoWatchdog;

impl Watchdog for NoWatchdog {
    fn feed(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn starve(&mut self) {}
    fn is_starved(&self) -> bool {
        false
    }
}

/// The fence's operations, on the granted filesystem only. Every step first
/// checks that DIR is still a mount of the granted device (`rdev`); if it is
/// not (our own unmount got there first), there is nothing left to fence and
/// the step does nothing. The shutdown goes through a descriptor whose
/// filesystem was checked, so it can never reach the filesystem DIR sits on.
struct GuardedOps {
    rdev: u64,
}

impl FenceOps for GuardedOps {
    fn shutdown(&self, target: &FenceTarget) -> Result<(), FenceError> {
        let mount = target.path.as_path();
        let io = |op, source| {
            FenceError::Shutdown(Ext4Error::Io {
                path: mount.to_path_buf(),
                op,
                offset: 0,
                source,
            })
        };
        let dir = std::fs::File::open(mount).map_err(|e| io("open mount point", e))?;
        let dev = dir
            .metadata()
            .map_err(|e| io("fstat mount point", e))?
            .dev();
        if dev != self.rdev {
            tracing::warn!(mount = %mount.display(), "the granted filesystem is no longer mounted here: nothing to shut down");
            return Ok(());
        }
        // Through our descriptor: it stays on the checked filesystem, and
        // keeps it from being unmounted until the ioctl is done.
        use std::os::fd::AsRawFd;
        let path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        crate::ext4::shutdown(&path, ShutdownMode::NoLogFlush)?;
        drop(dir);
        Ok(())
    }

    fn kill_holders(&self, target: &FenceTarget) -> Result<Vec<i32>, FenceError> {
        match holders::find_mount(&target.path)? {
            Some(m) if m.dev == self.rdev => holders::kill_all(&m),
            _ => Ok(Vec::new()),
        }
    }

    fn unmount(&self, target: &FenceTarget) -> Result<(), FenceError> {
        match holders::find_mount(&target.path)? {
            Some(m) if m.dev == self.rdev => SystemOps.unmount(target),
            _ => Ok(()),
        }
    }
}

/// What the tasks report to the main loop.
#[derive(Debug)]
enum Event {
    Signal(Signal),
    Keepalive {
        sent_at: Millis,
        result: Result<Grant, ClientError>,
    },
    /// The mount finished; the device number of the granted device.
    Mounted(Result<u64, RunError>),
    /// The child exited (not yet reaped).
    ChildExited,
    Unmounted(Result<(), RunError>),
}

type Events = mpsc::UnboundedSender<Event>;

pub fn run(args: Args) -> anyhow::Result<u8> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(run_async(args));
    // A blocking task still hung in the kernel (a mount or sync on a dead
    // device) must not keep the wrapper from exiting with its code.
    runtime.shutdown_background();
    result
}

async fn run_async(args: Args) -> anyhow::Result<u8> {
    let holder = holder_name(args.holder.clone())?;
    valid_name("--volume", &args.volume).map_err(|e| anyhow!(e.message))?;
    valid_name("--holder", &holder).map_err(|e| anyhow!(e.message))?;
    let extra = split_options(args.mount_options.as_deref());
    mount_spec(&[], &extra)?;
    let dir = prepare_dir(&args.mount, args.mkdir)?;
    check_command(&args.command[0])?;

    // Signals first, so none is lost between acquiring and starting the child.
    let (tx, mut rx) = mpsc::unbounded_channel();
    for sig in FORWARDED_SIGNALS {
        let mut stream = tokio::signal::unix::signal(SignalKind::from_raw(sig as i32))
            .with_context(|| format!("installing a handler for {sig}"))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(Event::Signal(sig)).is_err() {
                    return;
                }
            }
        });
    }

    let client = Client::new(&args.socket);
    let base = Instant::now();
    let (grant, sent_at) = match acquire(&client, &args, &holder, &mut rx, base).await? {
        Acquired::Granted(grant, sent_at) => (grant, sent_at),
        Acquired::TimedOut(err) => {
            eprintln!("blockfence run: {err}");
            return Ok(exit::TIMED_OUT);
        }
        Acquired::Interrupted(sig) => {
            eprintln!(
                "blockfence run: {sig} while waiting for volume {:?}; not acquired",
                args.volume
            );
            return Ok(exit::INTERRUPTED);
        }
    };
    tracing::info!(volume = %args.volume, generation = grant.generation, device = %grant.device,
        valid_for_ms = grant.valid_for_ms, "acquired");
    let spec = mount_spec(&grant.mount_options, &extra)?;
    let session = Session {
        args,
        dir,
        spec,
        client,
        tx,
        base,
        grant,
        rdev: None,
        mounting: false,
        child: None,
        child_status: None,
        prepare_error: None,
        interrupted: None,
        unmount_error: None,
        last_error: None,
        stop_reason: None,
    };
    session.run(&mut rx, sent_at).await
}

enum Acquired {
    Granted(Grant, Millis),
    TimedOut(ClientError),
    Interrupted(Signal),
}

fn millis_since(base: Instant) -> Millis {
    u64::try_from(base.elapsed().as_millis()).unwrap_or(Millis::MAX)
}

/// Acquires in chunks of at most [`ACQUIRE_CHUNK`] until granted, timed out,
/// or SIGTERM/SIGINT.
async fn acquire(
    client: &Client,
    args: &Args,
    holder: &str,
    rx: &mut mpsc::UnboundedReceiver<Event>,
    base: Instant,
) -> anyhow::Result<Acquired> {
    let until = args.acquire_timeout.map(|t| Instant::now() + t);
    loop {
        let left = until.map(|u| u.saturating_duration_since(Instant::now()));
        let chunk = left.map_or(ACQUIRE_CHUNK, |l| l.min(ACQUIRE_CHUNK));
        let sent_at = millis_since(base);
        let request = client.acquire(&args.volume, holder, chunk);
        tokio::pin!(request);
        let result = loop {
            tokio::select! {
                r = &mut request => break r,
                ev = rx.recv() => match ev {
                    Some(Event::Signal(sig)) if matches!(sig, Signal::SIGTERM | Signal::SIGINT) => {
                        return Ok(Acquired::Interrupted(sig));
                    }
                    _ => {}
                },
            }
        };
        match result {
            Ok(grant) => return Ok(Acquired::Granted(grant, sent_at)),
            Err(e) if e.code() == Some(api::ErrorCode::Held) => {
                if until.is_some_and(|u| Instant::now() >= u) {
                    return Ok(Acquired::TimedOut(e));
                }
                tracing::info!(volume = %args.volume, error = %e, "still held; waiting on");
            }
            Err(e) if e.code() == Some(api::ErrorCode::UnknownVolume) => {
                bail!("{e}; check --volume");
            }
            Err(e) => bail!("acquiring volume {:?}: {e}", args.volume),
        }
    }
}

struct Session {
    args: Args,
    dir: PathBuf,
    spec: MountSpec,
    client: Client,
    tx: Events,
    base: Instant,
    grant: Grant,
    /// Device number of the granted device, once it was mounted.
    rdev: Option<u64>,
    /// A mount is under way.
    mounting: bool,
    /// The child, until reaped.
    child: Option<std::process::Child>,
    child_status: Option<ExitStatus>,
    /// Why the command did not run.
    prepare_error: Option<anyhow::Error>,
    /// A signal that stopped the run before the child started.
    interrupted: Option<Signal>,
    unmount_error: Option<RunError>,
    /// The latest failed keepalive.
    last_error: Option<ClientError>,
    stop_reason: Option<StopReason>,
}

impl Session {
    fn now(&self) -> Millis {
        millis_since(self.base)
    }

    async fn run(
        mut self,
        rx: &mut mpsc::UnboundedReceiver<Event>,
        sent_at: Millis,
    ) -> anyhow::Result<u8> {
        let cfg = HolderConfig::new(
            u64::try_from(self.args.stop_timeout.as_millis()).unwrap_or(Millis::MAX),
        );
        self.stop_reason = self.grant.stop;
        let (mut machine, mut actions) =
            HolderMachine::new(cfg, self.now(), renewal(&self.grant, sent_at));
        if machine.phase() == Phase::Confirming {
            tracing::info!(
                waited_ms = self.now().saturating_sub(sent_at),
                "the grant is stale after the wait: confirming it before mounting"
            );
        }
        loop {
            let mut timer = None;
            for action in std::mem::take(&mut actions) {
                match action {
                    HolderAction::Prepare => self.start_mount(),
                    HolderAction::SendKeepalive => self.send_keepalive(),
                    HolderAction::ArmTimer(t) => timer = Some(t),
                    HolderAction::StopChild => self.stop_child(),
                    HolderAction::Fence(reason) => return Ok(self.fence(rx, reason).await),
                    HolderAction::Unmount => self.start_unmount(),
                    HolderAction::Finished { release } => return self.finish(release).await,
                    HolderAction::GiveUp(reason) => return self.give_up(reason).await,
                }
            }
            let wake = timer.map(|t| self.base + Duration::from_millis(t));
            let event = tokio::select! {
                () = sleep_until(wake) => None,
                ev = rx.recv() => ev,
            };
            let input = match event {
                None => HolderInput::Tick,
                Some(ev) => self.handle(ev),
            };
            actions = machine.step(self.now(), input);
        }
    }

    /// Turns an event into the machine's input, doing what the event itself
    /// requires (forwarding a signal, starting the child, reaping it).
    fn handle(&mut self, event: Event) -> HolderInput {
        match event {
            Event::Signal(sig) => {
                match &self.child {
                    Some(child) => {
                        tracing::info!(signal = %sig, "forwarding to the command");
                        let _ = kill(child_pid(child), sig);
                    }
                    None if self.mounting && matches!(sig, Signal::SIGTERM | Signal::SIGINT) => {
                        self.interrupted = Some(sig);
                    }
                    None => {}
                }
                HolderInput::Tick
            }
            Event::Keepalive { sent_at, result } => match result {
                Ok(grant) => {
                    self.grant.keepalive_interval_ms = grant.keepalive_interval_ms;
                    if grant.stop.is_some() && self.stop_reason.is_none() {
                        self.stop_reason = grant.stop;
                    }
                    HolderInput::KeepaliveOk(renewal(&grant, sent_at))
                }
                Err(e) => {
                    let ended = e.session_over();
                    if ended {
                        tracing::error!(error = %e, "the session is over");
                    } else {
                        tracing::warn!(error = %e, "keepalive failed");
                    }
                    self.last_error = Some(e);
                    if ended {
                        HolderInput::KeepaliveEnded
                    } else {
                        HolderInput::KeepaliveFailed
                    }
                }
            },
            Event::Mounted(result) => {
                self.mounting = false;
                match result {
                    Ok(rdev) => {
                        self.rdev = Some(rdev);
                        if let Some(sig) = self.interrupted {
                            self.prepare_error = Some(anyhow!(
                                "{sig} before the command started; unmounted and released"
                            ));
                            return HolderInput::ChildExited;
                        }
                        match self.spawn_child() {
                            Ok(()) => HolderInput::Prepared,
                            Err(e) => {
                                self.prepare_error = Some(e.into());
                                HolderInput::ChildExited
                            }
                        }
                    }
                    Err(e) => {
                        self.prepare_error = Some(e.into());
                        HolderInput::ChildExited
                    }
                }
            }
            Event::ChildExited => {
                if let Some(mut child) = self.child.take() {
                    match child.wait() {
                        Ok(status) => self.child_status = Some(status),
                        Err(e) => tracing::error!(error = %e, "reaping the command"),
                    }
                }
                HolderInput::ChildExited
            }
            Event::Unmounted(result) => {
                let ok = result.is_ok();
                self.unmount_error = result.err();
                HolderInput::Unmounted { ok }
            }
        }
    }

    fn start_mount(&mut self) {
        if self.args.daemon_mount {
            return self.start_daemon_mount();
        }
        self.mounting = true;
        let device = PathBuf::from(&self.grant.device);
        let (dir, spec, tx) = (self.dir.clone(), self.spec.clone(), self.tx.clone());
        tokio::task::spawn_blocking(move || {
            let _ = tx.send(Event::Mounted(mount_volume(&device, &dir, &spec)));
        });
    }

    /// `--daemon-mount`: the daemon mounts on DIR in this namespace; the
    /// device number is that of the filesystem now at DIR.
    fn start_daemon_mount(&mut self) {
        self.mounting = true;
        let client = self.client.clone();
        let (volume, session) = (self.args.volume.clone(), self.grant.session.clone());
        let (dir, tx) = (self.dir.clone(), self.tx.clone());
        tokio::spawn(async move {
            let failed = |error: String| RunError::DaemonMount {
                dir: dir.clone(),
                error,
            };
            let result = match client.mount(&volume, &session, &dir).await {
                Ok(m) => std::fs::metadata(&dir)
                    .map(|meta| {
                        tracing::info!(device = %m.device, dir = %dir.display(), "mounted by the daemon");
                        meta.dev()
                    })
                    .map_err(|e| failed(format!("it answered, but {e}"))),
                Err(e) => Err(failed(short_error(&e))),
            };
            let _ = tx.send(Event::Mounted(result));
        });
    }

    fn spawn_child(&mut self) -> Result<(), RunError> {
        let program = &self.args.command[0];
        let child = std::process::Command::new(program)
            .args(&self.args.command[1..])
            .env("BLOCKFENCE_GENERATION", self.grant.generation.to_string())
            .process_group(0)
            .spawn()
            .map_err(|error| RunError::Spawn {
                command: program.to_string_lossy().into_owned(),
                error,
            })?;
        let pid = child_pid(&child);
        tracing::info!(pid = pid.as_raw(), "command started");
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("child-wait".into())
            .spawn(move || {
                use nix::sys::wait::{waitid, Id, WaitPidFlag};
                // Wait without reaping: the pid (and group) stay ours until
                // the main loop reaps it.
                while let Err(Errno::EINTR) =
                    waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
                {
                }
                let _ = tx.send(Event::ChildExited);
            })
            .map_err(|error| RunError::Spawn {
                command: "the thread that waits for the command".into(),
                error,
            })?;
        self.child = Some(child);
        Ok(())
    }

    fn send_keepalive(&self) {
        let sent_at = self.now();
        let interval = Duration::from_millis(self.grant.keepalive_interval_ms);
        let client = self
            .client
            .clone()
            .with_timeout(interval.clamp(MIN_KEEPALIVE_TIMEOUT, MAX_KEEPALIVE_TIMEOUT));
        let (session, tx) = (self.grant.session.clone(), self.tx.clone());
        tokio::spawn(async move {
            let result = client.keepalive(&session).await;
            let _ = tx.send(Event::Keepalive { sent_at, result });
        });
    }

    fn stop_child(&self) {
        let Some(child) = &self.child else { return };
        let sig = self.args.stop_signal;
        tracing::info!(signal = %sig, reason = ?self.stop_reason, "the daemon asks the command to stop");
        let _ = kill(child_pid(child), sig);
    }

    fn start_unmount(&self) {
        let (dir, rdev, tx) = (self.dir.clone(), self.rdev, self.tx.clone());
        let daemon_mount = self.args.daemon_mount;
        tokio::task::spawn_blocking(move || {
            let result = if daemon_mount {
                // No privilege to unmount: sync, and let the release's fence
                // (the daemon's) unmount it everywhere.
                sync_volume(&dir, rdev)
            } else {
                unmount_volume(&dir, rdev)
            };
            let _ = tx.send(Event::Unmounted(result));
        });
    }

    /// Fences, kills the child, and returns [`exit::LOST`].
    async fn fence(mut self, rx: &mut mpsc::UnboundedReceiver<Event>, reason: FenceReason) -> u8 {
        let had_child = self.child.is_some();
        if let Some(child) = &self.child {
            let _ = killpg(child_pid(child), Signal::SIGKILL);
        }
        // A mount under way may still complete: wait for it, so it is fenced
        // too (kernel mounts are not cancellable).
        let wait_until = Instant::now() + FENCE_BUDGET;
        while self.mounting {
            match tokio::time::timeout_at(wait_until, rx.recv()).await {
                Ok(Some(Event::Mounted(Ok(rdev)))) => {
                    self.rdev = Some(rdev);
                    self.mounting = false;
                }
                Ok(Some(Event::Mounted(Err(_)))) => self.mounting = false,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let (fenced_ok, summary) = match self.rdev {
            Some(rdev) if self.args.daemon_mount => {
                // Without CAP_SYS_ADMIN neither the shutdown nor the unmount
                // would work: kill what writes from here; the daemon's fence
                // (at the session's expiry) shuts down and unmounts.
                let dir = self.dir.clone();
                let killed = tokio::task::spawn_blocking(move || match holders::find_mount(&dir) {
                    Ok(Some(m)) if m.dev == rdev => holders::kill_all(&m),
                    Ok(_) => Ok(Vec::new()),
                    Err(e) => Err(e),
                })
                .await;
                match killed {
                    Ok(Ok(killed)) => (
                        true,
                        format!(
                            "{}{} other holder(s) killed; {} stays mounted until the daemon's \
                             fence unmounts it (--daemon-mount)",
                            if had_child { "command killed, " } else { "" },
                            killed.len(),
                            self.dir.display()
                        ),
                    ),
                    Ok(Err(e)) => (false, format!("FENCE INCOMPLETE: {e}")),
                    Err(e) => (false, format!("FENCE FAILED: {e}")),
                }
            }
            Some(rdev) => {
                let dir = self.dir.clone();
                let report = tokio::task::spawn_blocking(move || {
                    let deadline = std::time::Instant::now() + FENCE_BUDGET;
                    let ops = Arc::new(GuardedOps { rdev });
                    fence::run_fence(ops, &mut NoWatchdog, &FenceTarget::mount(dir), deadline)
                })
                .await;
                match report {
                    Ok(r) if r.ok => (
                        true,
                        format!(
                            "fenced: {}filesystem shut down, {} other holder(s) killed, {} unmounted",
                            if had_child { "command killed, " } else { "" },
                            r.killed.len(),
                            self.dir.display()
                        ),
                    ),
                    Ok(r) => (
                        false,
                        format!(
                            "FENCE INCOMPLETE: {}",
                            r.errors
                                .iter()
                                .flatten()
                                .cloned()
                                .collect::<Vec<_>>()
                                .join("; ")
                        ),
                    ),
                    Err(e) => (false, format!("FENCE FAILED: {e}")),
                }
            }
            None if self.mounting => (
                false,
                format!(
                    "FENCE INCOMPLETE: the mount of {} did not finish",
                    self.dir.display()
                ),
            ),
            None => (true, "nothing was mounted".to_string()),
        };
        if let Some(child) = &self.child {
            let _ = killpg(child_pid(child), Signal::SIGKILL);
            let until = Instant::now() + CHILD_EXIT_WAIT;
            loop {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(Event::ChildExited)) => break,
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        tracing::error!("the command did not exit after SIGKILL");
                        break;
                    }
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.try_wait();
        }
        let volume = &self.args.volume;
        let why = match reason {
            FenceReason::SessionEnded => format!(
                "the daemon ended the session ({})",
                self.last_error
                    .as_ref()
                    .map_or_else(|| "no reason given".into(), short_error)
            ),
            FenceReason::NoAnswer { .. } => format!(
                "no keepalive answer in time, the grant ran out (last error: {})",
                self.last_error
                    .as_ref()
                    .map_or_else(|| "none: the daemon did not answer".into(), short_error)
            ),
            FenceReason::StopTimeout => format!(
                "the command did not exit within {} s of {} after the daemon asked it to stop ({})",
                self.args.stop_timeout.as_secs_f64(),
                self.args.stop_signal,
                self.stop_reason.map_or("stop", stop_word)
            ),
        };
        // The session is still ours after a stop timeout: once nothing can
        // write, give the volume back at once rather than by timeout.
        if reason == FenceReason::StopTimeout && fenced_ok {
            let _ = self.release().await;
        }
        eprintln!("blockfence run: lost volume {volume:?}: {why}; {summary}");
        exit::LOST
    }

    async fn release(&self) -> Result<(), ClientError> {
        let client = self.client.clone().with_timeout(RELEASE_TIMEOUT);
        match client.release(&self.args.volume, &self.grant.session).await {
            Ok(_) => {
                tracing::info!(volume = %self.args.volume, "released");
                Ok(())
            }
            Err(e) => {
                eprintln!(
                    "blockfence run: warning: releasing volume {:?} failed: {e}; the daemon ends the session when its keepalives stop",
                    self.args.volume
                );
                Err(e)
            }
        }
    }

    async fn finish(mut self, release: bool) -> anyhow::Result<u8> {
        if !release {
            let err = self
                .unmount_error
                .take()
                .map_or_else(|| "unknown error".into(), |e| e.to_string());
            eprintln!(
                "blockfence run: could not unmount: {err}; volume {:?} NOT released: the daemon fences it when the session times out",
                self.args.volume
            );
            return Ok(exit::ERROR);
        }
        let _ = self.release().await;
        if let Some(e) = self.prepare_error.take() {
            if self.interrupted.is_some() {
                eprintln!("blockfence run: {e:#}");
                return Ok(exit::INTERRUPTED);
            }
            return Err(e);
        }
        Ok(match self.child_status {
            Some(status) => exit_code(status),
            None => exit::ERROR,
        })
    }

    async fn give_up(self, reason: GiveUpReason) -> anyhow::Result<u8> {
        let err = self.last_error.as_ref().map_or_else(
            || "the grant is valid for too short a time".into(),
            short_error,
        );
        match reason {
            GiveUpReason::SessionEnded => {}
            GiveUpReason::NoAnswer => {
                let _ = self.release().await;
            }
        }
        bail!(
            "the grant of volume {:?} could not be confirmed before mounting: {err}",
            self.args.volume
        )
    }
}

fn stop_word(r: StopReason) -> &'static str {
    match r {
        StopReason::Handover => "handover",
        StopReason::Shutdown => "shutdown",
    }
}

/// An error in a few words for the one-line messages.
fn short_error(e: &ClientError) -> String {
    match e.body() {
        Some(b) => format!("{}: {}", code_name(b.error), b.message),
        None => e.to_string(),
    }
}

fn renewal(grant: &Grant, sent_at: Millis) -> Renewal {
    Renewal {
        sent_at,
        valid_for_ms: grant.valid_for_ms,
        keepalive_interval_ms: grant.keepalive_interval_ms,
        stop: grant.stop.is_some(),
    }
}

fn child_pid(child: &std::process::Child) -> Pid {
    Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX))
}

/// The command's status as this process's exit code.
fn exit_code(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return u8::try_from(code & 0xff).unwrap_or(exit::ERROR);
    }
    match status.signal() {
        Some(sig) => u8::try_from(128 + sig).unwrap_or(exit::ERROR),
        None => exit::ERROR,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Mounts the granted device on `dir`; returns its device number.
fn mount_volume(device: &Path, dir: &Path, spec: &MountSpec) -> Result<u64, RunError> {
    let bad = |why: String| RunError::BadDevice {
        device: device.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(device).map_err(|e| bad(e.to_string()))?;
    if !meta.file_type().is_block_device() {
        return Err(bad("not a block device".into()));
    }
    if holders::find_mount(dir)?.is_some() {
        return Err(RunError::AlreadyMounted {
            path: dir.to_path_buf(),
        });
    }
    nix::mount::mount(
        Some(device),
        dir,
        Some(FS_TYPE),
        spec.flags,
        Some(spec.data.as_str()),
    )
    .map_err(|errno| RunError::Mount {
        device: device.to_path_buf(),
        dir: dir.to_path_buf(),
        options: spec.data.clone(),
        errno,
    })?;
    tracing::info!(device = %device.display(), dir = %dir.display(), options = %spec.data, "mounted");
    Ok(meta.rdev())
}

/// `--daemon-mount`'s end: syncs `dir` if the granted device (`rdev`) is
/// mounted there (the daemon's fence after the release shuts the filesystem
/// down without flushing its log, then unmounts it).
fn sync_volume(dir: &Path, rdev: Option<u64>) -> Result<(), RunError> {
    let Some(rdev) = rdev else { return Ok(()) };
    match holders::find_mount(dir)? {
        Some(m) if m.dev == rdev => {}
        Some(_) => {
            return Err(RunError::ForeignMount {
                dir: dir.to_path_buf(),
            })
        }
        None => return Ok(()),
    }
    let f = std::fs::File::open(dir).map_err(|error| RunError::MountDir {
        path: dir.to_path_buf(),
        error,
    })?;
    use std::os::fd::AsRawFd;
    nix::unistd::syncfs(f.as_raw_fd()).map_err(|errno| RunError::Unmount {
        dir: dir.to_path_buf(),
        errno,
        busy_after_kill: false,
    })?;
    tracing::info!(dir = %dir.display(), "synced; the daemon unmounts it on release");
    Ok(())
}

/// Syncs and unmounts `dir` if the granted device (`rdev`) is mounted there;
/// kills the remaining holders and retries once if it is busy.
fn unmount_volume(dir: &Path, rdev: Option<u64>) -> Result<(), RunError> {
    let Some(rdev) = rdev else { return Ok(()) };
    let Some(m) = holders::find_mount(dir)? else {
        return Ok(());
    };
    if m.dev != rdev {
        return Err(RunError::ForeignMount {
            dir: dir.to_path_buf(),
        });
    }
    match std::fs::File::open(dir) {
        Ok(f) => {
            use std::os::fd::AsRawFd;
            if let Err(e) = nix::unistd::syncfs(f.as_raw_fd()) {
                tracing::error!(dir = %dir.display(), error = %e, "syncfs failed");
            }
        }
        Err(e) => tracing::error!(dir = %dir.display(), error = %e, "opening for syncfs"),
    }
    match nix::mount::umount2(dir, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(Errno::EBUSY) => {
            let killed = holders::kill_all(&m)?;
            tracing::warn!(dir = %dir.display(), ?killed, "unmount was busy: killed the remaining holders");
            nix::mount::umount2(dir, MntFlags::empty()).map_err(|errno| RunError::Unmount {
                dir: dir.to_path_buf(),
                errno,
                busy_after_kill: errno == Errno::EBUSY,
            })
        }
        Err(errno) => Err(RunError::Unmount {
            dir: dir.to_path_buf(),
            errno,
            busy_after_kill: false,
        }),
    }
    .inspect(|()| tracing::info!(dir = %dir.display(), "unmounted"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("SIGTERM").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("int").unwrap(), Signal::SIGINT);
        assert_eq!(parse_signal("10").unwrap(), Signal::SIGUSR1);
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("999").is_err());
        assert_eq!(parse_seconds("0.5").unwrap(), Duration::from_millis(500));
        assert!(parse_seconds("-1").is_err());
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
    }

    #[test]
    fn commands_are_checked_before_acquiring() {
        assert!(check_command(&OsString::from("sh")).is_ok());
        assert!(check_command(&OsString::from("/bin/sh")).is_ok());
        assert!(check_command(&OsString::from("no-such-command-blockfence")).is_err());
        assert!(check_command(&OsString::from("/etc/passwd")).is_err());
    }

    #[test]
    fn the_guard_keeps_the_shutdown_off_other_filesystems() {
        // procfs is not ext4: were the guard missing, the shutdown would fail
        // with NotExt4 rather than do nothing.
        let ops = GuardedOps { rdev: u64::MAX };
        ops.shutdown(&FenceTarget::mount("/proc"))
            .expect("nothing to shut down");
        let dev = std::fs::metadata("/proc").unwrap().dev();
        let err = GuardedOps { rdev: dev }
            .shutdown(&FenceTarget::mount("/proc"))
            .expect_err("procfs is ours here, and not ext4");
        assert!(err.to_string().contains("not"), "{err}");
    }

    #[test]
    fn the_mount_dir_must_be_a_directory_and_not_mounted() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            prepare_dir(&file, false),
            Err(RunError::NotADirectory { .. })
        ));
        let missing = tmp.path().join("a/b");
        assert!(matches!(
            prepare_dir(&missing, false),
            Err(RunError::MountDir { .. })
        ));
        assert_eq!(
            prepare_dir(&missing, true).unwrap(),
            std::fs::canonicalize(&missing).unwrap()
        );
        assert!(matches!(
            prepare_dir(Path::new("/"), false),
            Err(RunError::AlreadyMounted { .. })
        ));
    }
}
