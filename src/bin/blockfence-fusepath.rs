//! `blockfence-fusepath`: one simulated node's storage path, breakable at run time.
//!
//! Tests simulate several nodes sharing one block volume on one machine:
//!
//! ```text
//! image file --> FUSE file DIR/disk (this tool, one per node)
//!            --> loop device (one per node, losetup --direct-io=on) --> node's I/O
//! ```
//!
//! This tool mounts a FUSE filesystem on `--mountpoint` holding a single
//! regular file, `disk`, whose reads and writes pass through to `--backing`
//! at the same offsets (pread/pwrite; flush and fsync become fdatasync). Every
//! open is answered with `FOPEN_DIRECT_IO`, so no FUSE page cache sits between
//! nodes and a loop device with `--direct-io=on` can sit on top of it.
//!
//! A control channel (a Unix socket taking one-line commands) switches the
//! path between modes, effective at once for every request not yet performed:
//!
//! | command        | effect                                                     |
//! |----------------|------------------------------------------------------------|
//! | `ok`           | requests are performed                                     |
//! | `slow MS`      | each request is performed MS milliseconds after it arrived |
//! | `stall`        | requests are held, unanswered, until the mode changes      |
//! | `eio`          | every read, write, flush and fsync fails with EIO          |
//! | `status`       | reports the mode and counters                              |
//! | `wait-held N MS` | waits up to MS ms until at least N requests are held     |
//!
//! Every command is answered with one line: `ok mode=M held=H active=A done=D
//! failed=F` (M is `ok`, `slow:MS`, `stall` or `eio`; held = requests waiting in
//! `stall` or `slow`; active = requests being performed on the backing file)
//! or `err MESSAGE`.
//!
//! Invariants the tests rely on:
//! - once a `stall` or `eio` command has been answered, no read or write
//!   reaches the backing file until the mode changes (the switch waits for
//!   requests already being performed);
//! - a held request is completed by the mode it is released into: `ok`
//!   performs it, `eio` fails it, `slow MS` delays it MS ms from its arrival;
//! - only data requests (read, write, flush, fsync) are gated; lookups,
//!   attributes and opens always answer, so a loop device can still attach.
//!
//! The disk has the backing file's size; writes past its end fail with ENOSPC
//! and the size cannot be changed through the mount.
//!
//! Once mounted and initialised by the kernel it prints one line
//! `READY disk=PATH control=SOCKET` on stdout (and writes it to `--ready-file`
//! if given), so callers wait on an event rather than a sleep. On SIGTERM or
//! SIGINT it fails outstanding requests with EIO and unmounts. If the mount is
//! still in use (a loop device still attached), it detaches it lazily and
//! exits, which aborts the FUSE connection: the users of the file then get
//! errors (ENOTCONN/EIO) instead of hanging. Detach loop devices first.
//!
//! What a stall looks like from above (verified on Linux 6.18): the loop
//! device queues its direct I/O to FUSE asynchronously (FUSE_ASYNC_DIO), so
//! its worker threads stay idle and several requests can be held at once; a
//! process reading or writing the loop device waits in uninterruptible sleep
//! (state D, in `submit_bio_wait`) and SIGKILL does not end it until its I/O
//! is released (`ok`, `eio`, or this process dying). Hence a simulated crash
//! is "cut the path (`eio`), then SIGKILL", and teardown is "`eio`,
//! `losetup -d`, SIGTERM". The kernel's hung-task detector reports such a
//! process after `kernel.hung_task_timeout_secs` (120 s by default).
//!
//! If this process dies (SIGKILL), the kernel aborts the FUSE connection:
//! held and later I/O fails with EIO, and the dead mount ("Transport endpoint
//! is not connected") stays until unmounted (`umount -l DIR`).
//!
//! Needs root (mount(2) of a FUSE filesystem) and /dev/fuse; it does not use
//! libfuse or fusermount.

use std::ffi::OsStr;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use clap::Parser;
use fuser::consts::{FOPEN_DIRECT_IO, FUSE_ASYNC_DIO};
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, Session,
    SessionUnmounter,
};
use libc::{c_int, EBADF, EIO, ENOENT, ENOSPC, ENOTDIR, EPERM};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{debug, error, info, warn};

/// Name of the one file in the mount.
const DISK_NAME: &str = "disk";
/// Inode of the mount's root directory (fixed by FUSE).
const ROOT_INO: u64 = fuser::FUSE_ROOT_ID;
/// Inode of `disk`.
const DISK_INO: u64 = 2;
/// How long the kernel may cache attributes and lookups. Zero: the size
/// reported is always the backing file's current size.
const ATTR_TTL: Duration = Duration::ZERO;
/// Suffix appended to the mountpoint to name the default control socket.
const DEFAULT_CONTROL_SUFFIX: &str = ".sock";
/// Mode at start.
const DEFAULT_MODE: &str = "ok";
/// Maximum concurrent background (asynchronous) requests the kernel may queue.
const MAX_BACKGROUND: u16 = 64;
/// FUSE source name of our mounts, as it appears in /proc/self/mountinfo.
const FS_NAME_PREFIX: &str = "blockfence-fusepath:";

/// Exit code when SIGTERM found the mount busy and the connection was aborted.
const EXIT_ABORTED: i32 = 3;

/// Pass a backing image through FUSE as DIR/disk, with a run-time switch
/// between ok, slow, stalled and failing (EIO) storage.
///
/// Control commands (one line each on the socket, one line answered):
/// `ok`, `slow MS`, `stall`, `eio`, `status`, `wait-held N MS`.
/// Prints `READY disk=PATH control=SOCKET` once mounted. SIGTERM unmounts.
/// Needs root and /dev/fuse (no fusermount needed).
///
/// Example:
///   blockfence-fusepath --backing shared.img --mountpoint /tmp/a &
///   losetup --direct-io=on -f --show /tmp/a/disk
///   blockfence-fusepath --control /tmp/a.sock --send stall
///   blockfence-fusepath --control /tmp/a.sock --send "slow 200"
/// Stop: --send eio, losetup -d the device, then SIGTERM.
#[derive(Debug, Parser)]
#[command(
    name = "blockfence-fusepath",
    version,
    verbatim_doc_comment,
    override_usage = "blockfence-fusepath --backing IMG --mountpoint DIR [--control SOCKET] \
                      [--ready-file FILE] [--mode MODE]\n       \
                      blockfence-fusepath --control SOCKET --send COMMAND"
)]
struct Args {
    /// Backing image file (the shared volume); its size is the disk's size.
    #[arg(
        long,
        value_name = "IMG",
        env = "BLOCKFENCE_FUSEPATH_BACKING",
        required_unless_present = "send"
    )]
    backing: Option<PathBuf>,

    /// Existing empty directory to mount on; the disk appears as DIR/disk.
    #[arg(
        long,
        value_name = "DIR",
        env = "BLOCKFENCE_FUSEPATH_MOUNTPOINT",
        required_unless_present = "send"
    )]
    mountpoint: Option<PathBuf>,

    /// Unix socket for control commands [default: DIR.sock].
    #[arg(long, value_name = "SOCKET", env = "BLOCKFENCE_FUSEPATH_CONTROL")]
    control: Option<PathBuf>,

    /// Also write the READY line to this file (atomically) once mounted.
    #[arg(long, value_name = "FILE", env = "BLOCKFENCE_FUSEPATH_READY_FILE")]
    ready_file: Option<PathBuf>,

    /// Mode at start: ok, slow:MS, stall or eio.
    #[arg(long, default_value = DEFAULT_MODE, env = "BLOCKFENCE_FUSEPATH_MODE")]
    mode: Mode,

    /// Client instead of server: send COMMAND to the --control socket of a
    /// running instance, print its answer, exit 1 if the answer is an error.
    /// Example: blockfence-fusepath --control DIR.sock --send "slow 200"
    #[arg(long, value_name = "COMMAND", requires = "control")]
    send: Option<String>,
}

/// How the storage path treats data requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Perform requests.
    Ok,
    /// Perform each request this long after it arrived.
    Slow(Duration),
    /// Hold requests unanswered until the mode changes.
    Stall,
    /// Fail requests with EIO.
    Eio,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Ok => write!(f, "ok"),
            Mode::Slow(d) => write!(f, "slow:{}", d.as_millis()),
            Mode::Stall => write!(f, "stall"),
            Mode::Eio => write!(f, "eio"),
        }
    }
}

impl FromStr for Mode {
    type Err = String;

    /// Accepts `ok`, `stall`, `eio`, and `slow MS` or `slow:MS`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let words: Vec<&str> = s.split([' ', ':']).filter(|w| !w.is_empty()).collect();
        match words.as_slice() {
            ["ok"] => Ok(Mode::Ok),
            ["stall"] => Ok(Mode::Stall),
            ["eio"] => Ok(Mode::Eio),
            ["slow", ms] => ms
                .parse::<u64>()
                .map(|ms| Mode::Slow(Duration::from_millis(ms)))
                .map_err(|e| format!("slow takes milliseconds (slow 200): {e}")),
            _ => Err(format!(
                "unknown mode {s:?}: expected ok, slow MS, stall or eio"
            )),
        }
    }
}

/// What the gate's state protects.
#[derive(Debug)]
struct GateState {
    mode: Mode,
    /// Requests waiting in `stall` or `slow`.
    held: u64,
    /// Requests being performed on the backing file.
    active: u64,
    /// Requests performed.
    done: u64,
    /// Requests failed by the mode (EIO) or by the backing file.
    failed: u64,
}

/// Decides when, and whether, each data request runs.
#[derive(Debug)]
struct Gate {
    state: Mutex<GateState>,
    /// Signalled on every mode change and whenever `held` or `active` change.
    changed: Condvar,
}

/// Held while a request is performed on the backing file.
struct Permit<'a>(&'a Gate);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.active -= 1;
        self.0.changed.notify_all();
    }
}

impl Gate {
    fn new(mode: Mode) -> Self {
        Gate {
            state: Mutex::new(GateState {
                mode,
                held: 0,
                active: 0,
                done: 0,
                failed: 0,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        // A panic elsewhere cannot leave the counters half-updated in a way
        // that matters more than hanging every request would.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the mode lets a request that arrived at `arrived` run.
    /// Returns a permit to perform it, or the errno to fail it with.
    fn admit(&self, arrived: Instant) -> Result<Permit<'_>, c_int> {
        let mut st = self.lock();
        let mut holding = false;
        let verdict = loop {
            let wait_until = match st.mode {
                Mode::Ok => break Ok(()),
                Mode::Eio => break Err(EIO),
                Mode::Stall => None,
                Mode::Slow(delay) => {
                    let due = arrived + delay;
                    if Instant::now() >= due {
                        break Ok(());
                    }
                    Some(due)
                }
            };
            if !holding {
                holding = true;
                st.held += 1;
                self.changed.notify_all();
            }
            st = match wait_until {
                None => self
                    .changed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(due) => {
                    let left = due.saturating_duration_since(Instant::now());
                    self.changed
                        .wait_timeout(st, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        };
        if holding {
            st.held -= 1;
            self.changed.notify_all();
        }
        match verdict {
            Ok(()) => {
                st.active += 1;
                Ok(Permit(self))
            }
            Err(errno) => {
                st.failed += 1;
                Err(errno)
            }
        }
    }

    /// Records how a performed request ended.
    fn finished(&self, ok: bool) {
        let mut st = self.lock();
        if ok {
            st.done += 1;
        } else {
            st.failed += 1;
        }
    }

    /// Switches the mode. For `stall` and `eio`, returns only once no request
    /// is being performed any more, so none reaches the backing file after.
    fn set_mode(&self, mode: Mode) {
        let mut st = self.lock();
        st.mode = mode;
        self.changed.notify_all();
        if matches!(mode, Mode::Stall | Mode::Eio) {
            while st.active > 0 {
                st = self
                    .changed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    /// Waits up to `timeout` until at least `n` requests are held.
    fn wait_held(&self, n: u64, timeout: Duration) -> bool {
        let st = self.lock();
        let (st, _) = self
            .changed
            .wait_timeout_while(st, timeout, |st| st.held < n)
            .unwrap_or_else(PoisonError::into_inner);
        st.held >= n
    }

    fn status(&self) -> String {
        let st = self.lock();
        format!(
            "mode={} held={} active={} done={} failed={}",
            st.mode, st.held, st.active, st.done, st.failed
        )
    }
}

/// Handles one control command line; returns the one-line answer.
fn control_command(gate: &Gate, line: &str) -> String {
    let line = line.trim();
    let mut words = line.split_whitespace();
    match words.next() {
        Some("status") => format!("ok {}", gate.status()),
        Some("wait-held") => {
            let n = words.next().and_then(|w| w.parse::<u64>().ok());
            let ms = words.next().and_then(|w| w.parse::<u64>().ok());
            match (n, ms) {
                (Some(n), Some(ms)) => {
                    if gate.wait_held(n, Duration::from_millis(ms)) {
                        format!("ok {}", gate.status())
                    } else {
                        format!("err timeout: fewer than {n} held: {}", gate.status())
                    }
                }
                _ => "err usage: wait-held N MS".to_string(),
            }
        }
        _ => match line.parse::<Mode>() {
            Ok(mode) => {
                gate.set_mode(mode);
                info!(%mode, "mode switched");
                format!("ok {}", gate.status())
            }
            Err(e) => format!("err {e}"),
        },
    }
}

/// Serves control connections until the process ends.
fn serve_control(listener: UnixListener, gate: Arc<Gate>) {
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "control accept failed");
                continue;
            }
        };
        let gate = gate.clone();
        let spawned = thread::Builder::new()
            .name("control".into())
            .spawn(move || serve_control_conn(conn, &gate));
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start a control thread");
        }
    }
}

fn serve_control_conn(conn: UnixStream, gate: &Gate) {
    let mut out = match conn.try_clone() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "control connection unusable");
            return;
        }
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let answer = control_command(gate, &line);
        debug!(command = %line.trim(), %answer, "control");
        if writeln!(out, "{answer}").is_err() {
            return;
        }
    }
}

/// The FUSE filesystem: a root directory holding `disk`.
struct PassthroughFs {
    backing: Arc<File>,
    gate: Arc<Gate>,
    /// The READY line, printed once the kernel has initialised the connection.
    ready_line: String,
    ready_file: Option<PathBuf>,
}

impl PassthroughFs {
    fn disk_size(&self) -> std::io::Result<u64> {
        Ok(self.backing.metadata()?.len())
    }

    fn attr(&self, ino: u64) -> std::io::Result<FileAttr> {
        let meta = self.backing.metadata()?;
        let time = |t: std::io::Result<SystemTime>| t.unwrap_or(SystemTime::UNIX_EPOCH);
        let (kind, perm, nlink, size) = if ino == ROOT_INO {
            (FileType::Directory, 0o755, 2, 0)
        } else {
            (FileType::RegularFile, 0o600, 1, meta.len())
        };
        Ok(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: time(meta.accessed()),
            mtime: time(meta.modified()),
            ctime: time(meta.modified()),
            crtime: SystemTime::UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: meta.uid(),
            gid: meta.gid(),
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn reply_attr(&self, ino: u64, reply: ReplyAttr) {
        match self.attr(ino) {
            Ok(attr) => reply.attr(&ATTR_TTL, &attr),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Runs a data request on its own thread, so that held requests never
    /// block the session loop (nor each other).
    fn spawn_io(&self, what: &'static str, job: impl FnOnce(&File, &Gate) + Send + 'static) {
        let backing = self.backing.clone();
        let gate = self.gate.clone();
        let spawned = thread::Builder::new()
            .name(what.into())
            .spawn(move || job(&backing, &gate));
        // On failure the job, and with it the reply, is dropped: fuser then
        // answers the kernel with EIO.
        if let Err(e) = spawned {
            error!(error = %e, what, "cannot start an I/O thread; failing the request");
        }
    }
}

fn errno(e: &std::io::Error) -> c_int {
    e.raw_os_error().unwrap_or(EIO)
}

/// Reads up to `len` bytes at `offset`, fewer only at the end of the file.
fn read_full(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

impl Filesystem for PassthroughFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), c_int> {
        // Let the kernel queue direct I/O (the loop device's) asynchronously,
        // so several requests can be held or in flight at once.
        if let Err(missing) = config.add_capabilities(FUSE_ASYNC_DIO) {
            warn!(
                missing,
                "kernel lacks FUSE_ASYNC_DIO; direct I/O will be synchronous"
            );
        }
        if let Err(nearest) = config.set_max_background(MAX_BACKGROUND) {
            let _ = config.set_max_background(nearest);
        }
        if let Some(path) = &self.ready_file {
            if let Err(e) = write_atomically(path, &format!("{}\n", self.ready_line)) {
                error!(error = %e, path = %path.display(), "cannot write the ready file");
                return Err(EIO);
            }
        }
        let mut stdout = std::io::stdout().lock();
        // The READY line is the synchronisation point for callers: if stdout
        // is gone nobody is waiting, which is not a reason to stop.
        let _ = writeln!(stdout, "{}", self.ready_line).and_then(|()| stdout.flush());
        info!(line = %self.ready_line, "ready");
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent != ROOT_INO {
            return reply.error(ENOTDIR);
        }
        if name != DISK_NAME {
            return reply.error(ENOENT);
        }
        match self.attr(DISK_INO) {
            Ok(attr) => reply.entry(&ATTR_TTL, &attr, 0),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            ROOT_INO | DISK_INO => self.reply_attr(ino, reply),
            _ => reply.error(ENOENT),
        }
    }

    /// Only no-op changes are accepted: the disk's size is the image's.
    /// (An `O_TRUNC` open of a non-empty disk therefore fails with EPERM.)
    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        if ino != DISK_INO && ino != ROOT_INO {
            return reply.error(ENOENT);
        }
        if let Some(size) = size {
            match self.disk_size() {
                Ok(current) if current == size => {}
                Ok(current) => {
                    warn!(size, current, "refusing to resize the disk");
                    return reply.error(EPERM);
                }
                Err(e) => return reply.error(errno(&e)),
            }
        }
        self.reply_attr(ino, reply);
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match ino {
            // Direct I/O: no FUSE page cache between this node and the image.
            DISK_INO => reply.opened(0, FOPEN_DIRECT_IO),
            ROOT_INO => reply.opened(0, 0),
            _ => reply.error(ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        if ino != DISK_INO {
            return reply.error(EBADF);
        }
        let arrived = Instant::now();
        let offset = offset.max(0) as u64;
        self.spawn_io("read", move |backing, gate| {
            let permit = match gate.admit(arrived) {
                Ok(p) => p,
                Err(e) => return reply.error(e),
            };
            let result = read_full(backing, offset, size as usize);
            drop(permit);
            gate.finished(result.is_ok());
            match result {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    warn!(error = %e, offset, size, "backing read failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        if ino != DISK_INO {
            return reply.error(EBADF);
        }
        let arrived = Instant::now();
        let offset = offset.max(0) as u64;
        match self.disk_size() {
            Ok(size) if offset.saturating_add(data.len() as u64) <= size => {}
            Ok(_) => return reply.error(ENOSPC),
            Err(e) => return reply.error(errno(&e)),
        }
        let data = data.to_vec();
        self.spawn_io("write", move |backing, gate| {
            let permit = match gate.admit(arrived) {
                Ok(p) => p,
                Err(e) => return reply.error(e),
            };
            let result = backing.write_all_at(&data, offset);
            drop(permit);
            gate.finished(result.is_ok());
            match result {
                // A FUSE write moves at most max_write bytes, far below u32::MAX.
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => {
                    warn!(error = %e, offset, len = data.len(), "backing write failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn flush(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        self.sync(ino, reply);
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _data: bool, reply: ReplyEmpty) {
        self.sync(ino, reply);
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT_INO {
            return reply.error(ENOTDIR);
        }
        let entries = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset.max(0) as usize) {
            // The offset given is that of the next entry.
            if reply.add(*ino, (i + 1) as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let blocks = self.disk_size().unwrap_or(0) / 4096;
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096);
    }
}

impl PassthroughFs {
    /// flush and fsync: fdatasync on the backing file, gated like data.
    fn sync(&self, ino: u64, reply: ReplyEmpty) {
        if ino != DISK_INO {
            return reply.ok();
        }
        let arrived = Instant::now();
        self.spawn_io("sync", move |backing, gate| {
            let permit = match gate.admit(arrived) {
                Ok(p) => p,
                Err(e) => return reply.error(e),
            };
            let result = backing.sync_data();
            drop(permit);
            gate.finished(result.is_ok());
            match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }
}

fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Binds the control socket, replacing a stale socket (never another file).
fn bind_control(path: &Path) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "control path {} exists and is not a socket; choose another --control",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale control socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("binding control socket {}", path.display()))
}

/// Whether one of our FUSE mounts is still on `mountpoint` (canonical path).
fn our_mount_on(mountpoint: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    // mountinfo escapes space, tab, newline and backslash as octal.
    let escaped = mountpoint
        .to_string_lossy()
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    info.lines().any(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            return false;
        };
        fields.get(4) == Some(&escaped.as_str())
            && fields
                .get(sep + 2)
                .is_some_and(|src| src.starts_with(FS_NAME_PREFIX))
    })
}

/// On SIGTERM/SIGINT: fail held requests, unmount; if busy, detach and abort.
fn handle_signals(
    mut signals: Signals,
    gate: Arc<Gate>,
    mut unmounter: SessionUnmounter,
    mountpoint: PathBuf,
    control: PathBuf,
) {
    let Some(signal) = signals.forever().next() else {
        return;
    };
    info!(
        signal,
        "shutting down: failing outstanding requests, unmounting"
    );
    gate.set_mode(Mode::Eio);
    // On success the session loop sees ENODEV and returns; main exits.
    let _ = unmounter.unmount();
    if our_mount_on(&mountpoint) {
        warn!(
            mountpoint = %mountpoint.display(),
            "mount busy (is a loop device still attached? detach it first); \
             detaching lazily and aborting the FUSE connection"
        );
        if let Err(e) = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH) {
            error!(error = %e, "lazy unmount failed");
        }
        let _ = std::fs::remove_file(&control);
        // Exiting closes /dev/fuse, which aborts the connection.
        std::process::exit(EXIT_ABORTED);
    }
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match (&args.send, &args.control, &args.backing, &args.mountpoint) {
        (Some(command), Some(control), _, _) => send(control, command),
        (None, _, Some(backing), Some(mountpoint)) => {
            serve(&args, backing, mountpoint).map(|()| ExitCode::SUCCESS)
        }
        // clap enforces one of the two shapes above.
        _ => bail!("give --backing and --mountpoint, or --control and --send"),
    }
}

/// Client mode: one command, one answer on stdout.
fn send(control: &Path, command: &str) -> anyhow::Result<ExitCode> {
    let conn = UnixStream::connect(control)
        .with_context(|| format!("connecting to control socket {}", control.display()))?;
    writeln!(&conn, "{}", command.trim()).context("sending the command")?;
    let mut answer = String::new();
    BufReader::new(&conn)
        .read_line(&mut answer)
        .context("reading the answer")?;
    let answer = answer.trim_end();
    println!("{answer}");
    Ok(if answer.starts_with("ok") {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Server mode: mount, serve until unmounted or signalled.
fn serve(args: &Args, backing_path: &Path, mountpoint_arg: &Path) -> anyhow::Result<()> {
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .open(backing_path)
        .with_context(|| format!("opening backing image {}", backing_path.display()))?;
    let meta = backing.metadata()?;
    if !meta.is_file() {
        bail!(
            "backing image {} is not a regular file",
            backing_path.display()
        );
    }
    let mountpoint = mountpoint_arg
        .canonicalize()
        .with_context(|| format!("mountpoint {} must exist", mountpoint_arg.display()))?;
    if !mountpoint.is_dir() {
        bail!("mountpoint {} is not a directory", mountpoint.display());
    }
    let control = args.control.clone().unwrap_or_else(|| {
        let mut p = mountpoint.as_os_str().to_owned();
        p.push(DEFAULT_CONTROL_SUFFIX);
        PathBuf::from(p)
    });

    let gate = Arc::new(Gate::new(args.mode));
    let listener = bind_control(&control)?;
    {
        let gate = gate.clone();
        thread::Builder::new()
            .name("control".into())
            .spawn(move || serve_control(listener, gate))
            .context("starting the control thread")?;
    }

    let disk = mountpoint.join(DISK_NAME);
    let fs = PassthroughFs {
        backing: Arc::new(backing),
        gate: gate.clone(),
        ready_line: format!(
            "READY disk={} control={}",
            disk.display(),
            control.display()
        ),
        ready_file: args.ready_file.clone(),
    };
    let options = [
        MountOption::FSName(format!("{FS_NAME_PREFIX}{}", backing_path.display())),
        MountOption::Subtype("blockfence-fusepath".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
    ];
    let mut session = Session::new(fs, &mountpoint, &options).with_context(|| {
        format!(
            "mounting FUSE on {} (needs root and /dev/fuse)",
            mountpoint.display()
        )
    })?;
    info!(
        backing = %backing_path.display(),
        disk = %disk.display(),
        control = %control.display(),
        size = meta.len(),
        mode = %args.mode,
        "mounted"
    );

    let signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    {
        let (gate, mountpoint, control) = (gate.clone(), mountpoint.clone(), control.clone());
        let unmounter = session.unmount_callable();
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || handle_signals(signals, gate, unmounter, mountpoint, control))
            .context("starting the signal thread")?;
    }

    let result = session.run();
    // Whatever ended the loop, nothing may hang on us any more.
    gate.set_mode(Mode::Eio);
    drop(session);
    let _ = std::fs::remove_file(&control);
    if let Some(path) = &args.ready_file {
        let _ = std::fs::remove_file(path);
    }
    result.context("FUSE session failed")?;
    info!("unmounted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn modes_parse_and_print() {
        for (text, mode) in [
            ("ok", Mode::Ok),
            ("stall", Mode::Stall),
            ("eio", Mode::Eio),
            ("slow 200", Mode::Slow(Duration::from_millis(200))),
            ("slow:200", Mode::Slow(Duration::from_millis(200))),
        ] {
            assert_eq!(text.parse::<Mode>(), Ok(mode));
        }
        assert_eq!(Mode::Slow(Duration::from_millis(7)).to_string(), "slow:7");
        assert_eq!(
            "slow:7".parse::<Mode>().map(|m| m.to_string()).as_deref(),
            Ok("slow:7")
        );
        assert!("slow".parse::<Mode>().is_err());
        assert!("slow x".parse::<Mode>().is_err());
        assert!("fast".parse::<Mode>().is_err());
    }

    #[test]
    fn ok_admits_and_eio_fails() {
        let gate = Gate::new(Mode::Ok);
        assert!(gate.admit(Instant::now()).is_ok());
        gate.set_mode(Mode::Eio);
        assert_eq!(gate.admit(Instant::now()).err(), Some(EIO));
    }

    /// A held request is released into the new mode: ok runs it, eio fails it.
    #[test]
    fn stall_holds_until_the_mode_changes() {
        for (release, expect_ok) in [(Mode::Ok, true), (Mode::Eio, false)] {
            let gate = Arc::new(Gate::new(Mode::Stall));
            let (tx, rx) = mpsc::channel();
            let g = gate.clone();
            let worker = thread::spawn(move || {
                let admitted = g.admit(Instant::now()).is_ok();
                tx.send(admitted).expect("test receiver alive");
            });
            assert!(
                gate.wait_held(1, Duration::from_secs(10)),
                "request never held"
            );
            assert!(rx.try_recv().is_err(), "a stalled request completed");
            gate.set_mode(release);
            let admitted = rx.recv_timeout(Duration::from_secs(10)).expect("released");
            assert_eq!(admitted, expect_ok);
            worker.join().expect("worker");
            assert!(
                gate.status().contains("held=0 active=0"),
                "{}",
                gate.status()
            );
        }
    }

    #[test]
    fn slow_delays_from_arrival() {
        let gate = Gate::new(Mode::Slow(Duration::from_millis(50)));
        let arrived = Instant::now();
        let permit = gate.admit(arrived);
        assert!(permit.is_ok());
        assert!(arrived.elapsed() >= Duration::from_millis(50));
    }

    /// Switching to eio waits for requests being performed, so none lands after.
    #[test]
    fn eio_waits_for_active_requests() {
        let gate = Arc::new(Gate::new(Mode::Ok));
        let permit = gate.admit(Instant::now()).expect("admitted");
        let (tx, rx) = mpsc::channel();
        let g = gate.clone();
        let switcher = thread::spawn(move || {
            g.set_mode(Mode::Eio);
            tx.send(()).expect("test receiver alive");
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "did not wait"
        );
        drop(permit);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("switch completes");
        switcher.join().expect("switcher");
    }

    #[test]
    fn control_answers_one_line() {
        let gate = Gate::new(Mode::Ok);
        assert!(control_command(&gate, "slow 20\n").starts_with("ok mode=slow:20 "));
        assert!(control_command(&gate, "status").starts_with("ok mode=slow:20 "));
        assert!(control_command(&gate, "bogus").starts_with("err "));
        assert!(control_command(&gate, "wait-held 1 1").starts_with("err timeout"));
        assert!(control_command(&gate, "wait-held").starts_with("err usage"));
        assert!(control_command(&gate, "ok").starts_with("ok mode=ok "));
    }
}
