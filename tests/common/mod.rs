//! Test harness: several simulated nodes sharing one block volume.
//!
//! ```text
//! SharedImage (sparse file) --> NodePath "a": blockfence-fusepath --> /dev/loopN (direct-io)
//!                           \-> NodePath "b": blockfence-fusepath --> /dev/loopM (direct-io)
//! ```
//!
//! Each node gets its own FUSE passthrough file and its own loop device, so a
//! test can break one node's storage path (`set_mode`) while the others keep
//! working. Two nodes never share a loop device (they would share a page
//! cache and superblock).
//!
//! Teardown (`NodePath::stop`, or `Drop`, also while unwinding from a panic)
//! runs in the only order that cannot hang: switch the path to `eio` (held
//! requests fail, blocked readers wake), detach the loop device, then SIGTERM
//! the FUSE process and unmount if it left anything behind.
//!
//! `BLOCKFENCE_KEEP_DEVICES=1` keeps images, mounts, loop devices and FUSE
//! processes for inspection and prints where they are. A node's directory
//! has the layout of `scripts/lib-nodes.sh` (mnt/, control.sock,
//! fusepath.log, pid, device), so `. scripts/lib-nodes.sh; bf_node_stop DIR`
//! cleans it up; by hand: `--send eio` to the control socket, `losetup -d`,
//! `kill`, `umount -l`.
//!
//! `BLOCKFENCE_REQUIRE_DEVICES=1` turns a missing facility (not root, no
//! loop, no FUSE) into a failure instead of a skip; use it in CI.
//!
//! Not every test uses every helper.
#![allow(dead_code)]

pub mod api_server;
pub mod daemon_kit;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The FUSE passthrough binary built with this package.
pub const FUSEPATH_BIN: &str = env!("CARGO_BIN_EXE_blockfence-fusepath");
/// Keep everything for inspection when set to 1.
pub const KEEP_ENV: &str = "BLOCKFENCE_KEEP_DEVICES";
/// Fail instead of skipping when the facilities are missing, when set to 1.
pub const REQUIRE_ENV: &str = "BLOCKFENCE_REQUIRE_DEVICES";
/// How long a FUSE process may take to mount and print READY.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a teardown step (losetup -d, FUSE exit) may take.
pub const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(20);
/// Timeout for short commands such as losetup.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// Alignment and size unit of O_DIRECT I/O in these tests.
pub const SECTOR: usize = 4096;

fn env_is_1(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

fn keep_devices() -> bool {
    env_is_1(KEEP_ENV)
}

/// True if this process can use loop devices and FUSE: root, /dev/loop-control
/// and /dev/fuse. Otherwise prints why and returns false so the test can
/// return early (skip); with `BLOCKFENCE_REQUIRE_DEVICES=1` it panics instead.
pub fn require_root_loop_fuse() -> bool {
    require(true)
}

/// Like [`require_root_loop_fuse`], for tests that need root and loop devices
/// but no FUSE.
pub fn require_root_loop() -> bool {
    require(false)
}

fn require(fuse: bool) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("not running as root");
    }
    if !Path::new("/dev/loop-control").exists() {
        missing.push("no /dev/loop-control (loop driver not available)");
    }
    if fuse && !Path::new("/dev/fuse").exists() {
        missing.push("no /dev/fuse (FUSE not available)");
    }
    if missing.is_empty() {
        return true;
    }
    let reason = missing.join(", ");
    if env_is_1(REQUIRE_ENV) {
        panic!("{REQUIRE_ENV}=1 but this test cannot run: {reason}");
    }
    let needs = if fuse {
        "root, loop devices and FUSE"
    } else {
        "root and loop devices"
    };
    eprintln!("SKIPPED: needs {needs}: {reason}");
    false
}

// ---------------------------------------------------------------------------
// Commands with a timeout
// ---------------------------------------------------------------------------

/// What a finished command printed.
#[derive(Debug)]
pub struct CmdOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    /// The output if the command succeeded, else an error with its stderr.
    pub fn ok(self, what: &str) -> io::Result<CmdOutput> {
        if self.status.success() {
            Ok(self)
        } else {
            Err(io::Error::other(format!(
                "{what} failed ({}): {}{}",
                self.status,
                self.stderr.trim(),
                self.stdout.trim()
            )))
        }
    }
}

/// Spawns a thread that reads `r` to the end.
fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `cmd` (stdin closed, stdout and stderr captured) for at most
/// `timeout`. On timeout its process group is killed and an error of kind
/// `TimedOut` returned; the error says if the process would not even die
/// (uninterruptible sleep, "D" state, as on a stalled storage path).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> io::Result<CmdOutput> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("starting {shown}: {e}")))?;
    let pid = child.id();
    let out = drain(child.stdout.take().expect("stdout is piped"));
    let err = drain(child.stderr.take().expect("stderr is piped"));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(timeout) {
        Ok(status) => status?,
        Err(_) => {
            // The child is not reaped until the waiter returns, so the pid
            // (and process group) is still ours.
            let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
            let died = rx.recv_timeout(Duration::from_secs(5)).is_ok();
            let state = process_state(pid)
                .map(|s| format!(", state {s}"))
                .unwrap_or_default();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{shown} did not finish within {timeout:?}; killed{}{state}",
                    if died { "" } else { " but it did not die" }
                ),
            ));
        }
    };
    Ok(CmdOutput {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Runs `program args...` with `COMMAND_TIMEOUT`, requiring success.
pub fn run_ok(program: &str, args: &[&str]) -> io::Result<CmdOutput> {
    run_with_timeout(Command::new(program).args(args), COMMAND_TIMEOUT)?
        .ok(&format!("{program} {}", args.join(" ")))
}

/// The state letter of a process from /proc (R, S, D, Z, ...), if it exists.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": comm may contain spaces and parentheses.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

// ---------------------------------------------------------------------------
// O_DIRECT I/O
// ---------------------------------------------------------------------------

/// A buffer aligned for O_DIRECT, without unsafe code: an over-allocated
/// vector and an aligned window into it.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Self {
        let storage = vec![0u8; len + SECTOR];
        let start = storage.as_ptr().align_offset(SECTOR);
        assert!(start < SECTOR, "cannot align a heap buffer");
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    pub fn from_slice(data: &[u8]) -> Self {
        let mut buf = Self::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Opens a block device (or file) for O_DIRECT reads and writes.
pub fn open_direct(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("opening {} O_DIRECT: {e}", path.display()),
            )
        })
}

/// Reads `len` bytes at `offset` with O_DIRECT (both multiples of SECTOR).
pub fn read_direct(path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let file = open_direct(path)?;
    let mut buf = AlignedBuf::zeroed(len);
    file.read_exact_at(buf.as_mut_slice(), offset)?;
    Ok(buf.as_slice().to_vec())
}

/// Writes `data` at `offset` with O_DIRECT and fdatasync (multiples of SECTOR).
pub fn write_direct(path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
    let file = open_direct(path)?;
    file.write_all_at(AlignedBuf::from_slice(data).as_slice(), offset)?;
    file.sync_data()
}

/// `len` bytes that differ from run to run and from offset to offset.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed ^ u64::from(std::process::id()) ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The shared volume
// ---------------------------------------------------------------------------

/// One sparse image file: the shared volume all nodes see.
pub struct SharedImage {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    size: u64,
}

impl SharedImage {
    /// Creates a sparse image of `size_bytes` in a new temporary directory.
    pub fn create(size_bytes: u64) -> io::Result<SharedImage> {
        let dir = tempfile::Builder::new()
            .prefix("blockfence-image-")
            .tempdir()?;
        let path = dir.path().join("shared.img");
        File::create(&path)?.set_len(size_bytes)?;
        Ok(SharedImage {
            dir: Some(dir),
            path,
            size: size_bytes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for SharedImage {
    fn drop(&mut self) {
        if keep_devices() {
            if let Some(dir) = self.dir.take() {
                eprintln!("{KEEP_ENV}=1: keeping image {}", self.path.display());
                let _ = dir.keep();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// One node's storage path
// ---------------------------------------------------------------------------

/// How a node's storage path treats I/O (see blockfence-fusepath --help).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// I/O is performed.
    Ok,
    /// Each I/O is performed this many milliseconds after it arrived.
    Slow(u64),
    /// I/O is held, unanswered, until the mode changes.
    Stall,
    /// I/O fails with EIO.
    Eio,
}

impl fmt::Display for Mode {
    /// The control command for this mode.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Ok => write!(f, "ok"),
            Mode::Slow(ms) => write!(f, "slow {ms}"),
            Mode::Stall => write!(f, "stall"),
            Mode::Eio => write!(f, "eio"),
        }
    }
}

/// One simulated node's storage path: image -> FUSE file -> loop device.
pub struct NodePath {
    name: String,
    /// Holds the mountpoint, control socket and log; None once kept.
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    mountpoint: PathBuf,
    control: PathBuf,
    log: PathBuf,
    fuse: Option<Child>,
    device: Option<PathBuf>,
    /// `major:minor` of the FUSE mount, as losetup shows BACK-MAJ:MIN.
    fuse_dev: String,
}

impl NodePath {
    /// Starts blockfence-fusepath for node `name` over `image`, waits for its
    /// READY line and attaches `losetup --direct-io=on` to its disk.
    pub fn new(image: &SharedImage, name: &str) -> io::Result<NodePath> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("blockfence-node-{name}-"))
            .tempdir()?;
        let dir_path = dir.path().to_path_buf();
        let mountpoint = dir_path.join("mnt");
        let control = dir_path.join("control.sock");
        let log = dir_path.join("fusepath.log");
        std::fs::create_dir(&mountpoint)?;
        let log_file = OpenOptions::new().create(true).append(true).open(&log)?;
        let mut child = Command::new(FUSEPATH_BIN)
            .arg("--backing")
            .arg(image.path())
            .arg("--mountpoint")
            .arg(&mountpoint)
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file.try_clone()?)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {FUSEPATH_BIN}: {e}")))?;

        // Forward stdout to the log; report the READY line (or EOF) once.
        let stdout = child.stdout.take().expect("stdout is piped");
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut log_out = log_file;
        thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log_out, "{line}");
                if line.starts_with("READY ") {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(true);
                    }
                }
            }
            if let Some(tx) = ready_tx.take() {
                let _ = tx.send(false);
            }
        });

        let mut node = NodePath {
            name: name.to_string(),
            dir: Some(dir),
            dir_path,
            mountpoint,
            control,
            log,
            fuse: Some(child),
            device: None,
            fuse_dev: String::new(),
        };
        // The same layout as scripts/lib-nodes.sh, so `bf_node_stop DIR`
        // cleans up a node kept with BLOCKFENCE_KEEP_DEVICES=1.
        let pid = node.fuse_pid().expect("just started");
        std::fs::write(node.dir_path.join("pid"), format!("{pid}\n"))?;
        match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok(true) => {}
            Ok(false) => return Err(node.startup_error("exited before READY")),
            Err(_) => return Err(node.startup_error(&format!("no READY within {READY_TIMEOUT:?}"))),
        }
        let disk = node.disk();
        let dev = std::fs::metadata(&disk)?.dev();
        node.fuse_dev = format!("{}:{}", libc::major(dev), libc::minor(dev));
        let disk = disk.to_str().expect("temp paths are UTF-8");
        let out = run_ok("losetup", &["--direct-io=on", "-f", "--show", disk])?;
        let device = PathBuf::from(out.stdout.trim());
        node.device = Some(device.clone());
        std::fs::write(
            node.dir_path.join("device"),
            format!("{}\n", device.display()),
        )?;
        Ok(node)
    }

    fn startup_error(&self, what: &str) -> io::Error {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        io::Error::other(format!(
            "blockfence-fusepath for node {}: {what}; its log:\n{log}",
            self.name
        ))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's loop device (/dev/loopN).
    pub fn device(&self) -> &Path {
        self.device.as_deref().expect("attached in new()")
    }

    /// The FUSE file the loop device sits on.
    pub fn disk(&self) -> PathBuf {
        self.mountpoint.join("disk")
    }

    /// The directory holding the mountpoint, control socket and log.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    pub fn control_socket(&self) -> &Path {
        &self.control
    }

    /// The FUSE process's log (stderr and stdout).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// What to look for after teardown (`Footprint::leftovers`).
    pub fn footprint(&self) -> Footprint {
        Footprint {
            dir: self.dir_path.clone(),
            fuse_dev: self.fuse_dev.clone(),
            device: self.device().to_path_buf(),
        }
    }

    pub fn fuse_pid(&self) -> Option<u32> {
        self.fuse.as_ref().map(Child::id)
    }

    /// Sends one control command and returns the answer (`ok ...`), or an
    /// error carrying the `err ...` answer.
    pub fn control(&self, command: &str) -> io::Result<String> {
        let conn = UnixStream::connect(&self.control)?;
        conn.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        writeln!(&conn, "{command}")?;
        let mut answer = String::new();
        BufReader::new(&conn).read_line(&mut answer)?;
        let answer = answer.trim_end().to_string();
        if answer.starts_with("ok") {
            Ok(answer)
        } else {
            Err(io::Error::other(format!(
                "node {}: {command:?} answered {answer:?}",
                self.name
            )))
        }
    }

    /// Switches the storage path's mode; effective for every I/O not yet
    /// performed. Returns once switched (for stall and eio: once no I/O is
    /// being performed on the image any more).
    pub fn set_mode(&self, mode: Mode) -> io::Result<String> {
        self.control(&mode.to_string())
    }

    /// `ok mode=M held=H active=A done=D failed=F`.
    pub fn status(&self) -> io::Result<String> {
        self.control("status")
    }

    /// Waits until at least `n` I/O requests are held by `stall` (or `slow`):
    /// the event that proves an I/O reached this path and is blocked there.
    pub fn wait_held(&self, n: u64, timeout: Duration) -> io::Result<bool> {
        let command = format!("wait-held {n} {}", timeout.as_millis());
        match self.control(&command) {
            Ok(_) => Ok(true),
            Err(e) if e.to_string().contains("timeout") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Crash a node: cut its storage path (EIO) first, then SIGKILL its
    /// process and reap it. The cut comes first so that nothing the process
    /// had in flight reaches the volume after the "crash".
    pub fn crash(&self, node_process: &mut Child) -> io::Result<ExitStatus> {
        self.set_mode(Mode::Eio)?;
        let _ = node_process.kill();
        node_process.wait()
    }

    /// SIGKILLs the FUSE process: the storage path dies abruptly. The kernel
    /// aborts the FUSE connection, so held and new I/O on the device fail
    /// (EIO); the dead mount stays until teardown unmounts it.
    pub fn kill_fuse(&mut self) -> io::Result<ExitStatus> {
        let child = self
            .fuse
            .as_mut()
            .ok_or_else(|| io::Error::other("FUSE process already gone"))?;
        child.kill()?;
        child.wait()
    }

    /// Tears down in the order that cannot hang: eio, detach the loop device,
    /// SIGTERM the FUSE process (SIGKILL after TEARDOWN_TIMEOUT), unmount
    /// what is left. Returns every problem met; does all steps regardless.
    pub fn stop(mut self) -> io::Result<()> {
        let problems = self.teardown();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(io::Error::other(problems.join("; ")))
        }
    }

    fn teardown(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.fuse.is_none() && self.device.is_none() {
            return problems;
        }
        // 1. Nothing may stay blocked on this path. (A dead FUSE process has
        //    already failed everything: its connection was aborted.)
        let fuse_alive = match self.fuse.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) | None => false,
            Some(Err(e)) => {
                problems.push(format!("checking the FUSE process: {e}"));
                true
            }
        };
        if fuse_alive {
            if let Err(e) = self.set_mode(Mode::Eio) {
                problems.push(format!("switching to eio: {e}"));
            }
        }
        // 2. Detach. If something still holds the device open, the kernel
        //    detaches it when that last user closes it (autoclear).
        if let Some(device) = self.device.take() {
            let dev = device.to_string_lossy().into_owned();
            if let Err(e) =
                run_with_timeout(Command::new("losetup").args(["-d", &dev]), TEARDOWN_TIMEOUT)
                    .and_then(|o| o.ok(&format!("losetup -d {dev}")))
            {
                problems.push(e.to_string());
            }
        }
        // 3. Stop the FUSE process; it unmounts on SIGTERM.
        if let Some(child) = self.fuse.take() {
            if let Err(e) = stop_child(child) {
                problems.push(format!("stopping blockfence-fusepath: {e}"));
            }
        }
        // 4. Whatever is left (it was killed, or the mount was busy).
        if is_mountpoint(&self.mountpoint) {
            if let Err(e) = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
            {
                problems.push(format!("umount -l {}: {e}", self.mountpoint.display()));
            }
        }
        problems
    }
}

/// SIGTERM, wait up to TEARDOWN_TIMEOUT, then SIGKILL and wait.
fn stop_child(mut child: Child) -> io::Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    let pid = child.id();
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(TEARDOWN_TIMEOUT) {
        Ok(status) => status,
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let status = rx
                .recv_timeout(TEARDOWN_TIMEOUT)
                .map_err(|_| io::Error::other(format!("process {pid} does not die")))??;
            Err(io::Error::other(format!(
                "did not exit on SIGTERM within {TEARDOWN_TIMEOUT:?}; killed: {status}"
            )))
        }
    }
}

impl Drop for NodePath {
    fn drop(&mut self) {
        if keep_devices() {
            if let Some(dir) = self.dir.take() {
                eprintln!(
                    "{KEEP_ENV}=1: keeping node {}: device {}, FUSE file {} (pid {}), \
                     control socket {}, log {}; clean up with: \
                     . scripts/lib-nodes.sh; bf_node_stop {}",
                    self.name,
                    self.device.as_deref().unwrap_or(Path::new("-")).display(),
                    self.disk().display(),
                    self.fuse_pid().map_or("-".into(), |p| p.to_string()),
                    self.control.display(),
                    self.log.display(),
                    self.dir_path.display()
                );
                let _ = dir.keep();
                // Neither kill nor reap the FUSE process: it keeps serving.
                self.fuse.take();
                self.device.take();
            }
            return;
        }
        for problem in self.teardown() {
            eprintln!("teardown of node {}: {problem}", self.name);
        }
    }
}

// ---------------------------------------------------------------------------
// Leftover checks
// ---------------------------------------------------------------------------

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let escaped = path.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .any(|line| line.split(' ').nth(4) == Some(escaped.as_str()))
}

/// What a node leaves on the system, to check after teardown that nothing
/// is left (see `NodePath::footprint`).
#[derive(Clone, Debug)]
pub struct Footprint {
    /// The node's directory (mountpoint, socket, log).
    pub dir: PathBuf,
    /// `major:minor` of the FUSE mount that held the node's disk.
    pub fuse_dev: String,
    /// The node's loop device.
    pub device: PathBuf,
}

impl Footprint {
    /// Loop devices still backed by the node's FUSE file (even once lazily
    /// unmounted, when their BACK-FILE no longer names it) and mounts under
    /// the node's directory.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        match run_ok(
            "losetup",
            &["-l", "-n", "-O", "NAME,BACK-MAJ:MIN,BACK-FILE"],
        ) {
            Ok(out) => {
                for line in out.stdout.lines() {
                    let mut cols = line.split_whitespace();
                    let (name, dev) = (cols.next(), cols.next());
                    let dir = self.dir.to_string_lossy();
                    // The FUSE mount's anonymous device number is reused once
                    // it is gone: a loop device backed by another node's
                    // file under the same number is not ours.
                    let other_node = line.contains("/blockfence-node-") && !line.contains(&*dir);
                    let ours = (dev == Some(self.fuse_dev.as_str()) && !other_node)
                        || (name.is_some_and(|n| Path::new(n) == self.device)
                            && line.contains(&*dir));
                    if ours {
                        found.push(format!("loop device still attached: {}", line.trim()));
                    }
                }
            }
            Err(e) => found.push(format!("cannot list loop devices: {e}")),
        }
        let dir = self.dir.to_string_lossy().into_owned();
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            for line in info.lines() {
                if line.split(' ').nth(4).is_some_and(|m| m.starts_with(&dir)) {
                    found.push(format!("mount still present: {line}"));
                }
            }
        }
        found
    }
}

/// A scratch directory for images and mount points under cargo's test tmp dir
/// (or `BLOCKFENCE_TEST_DIR`); kept with `BLOCKFENCE_KEEP_DEVICES=1`.
pub struct Scratch(Option<tempfile::TempDir>);

impl Scratch {
    /// A fresh directory whose name starts with `prefix`.
    pub fn new(prefix: &str) -> Scratch {
        let base = std::env::var_os("BLOCKFENCE_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
        std::fs::create_dir_all(&base).expect("test dir");
        Scratch(Some(
            tempfile::Builder::new()
                .prefix(prefix)
                .tempdir_in(base)
                .expect("tempdir"),
        ))
    }

    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("scratch dir").path()
    }

    /// A sparse image of `size` bytes.
    pub fn image(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path().join(name);
        File::create(&p)
            .and_then(|f| f.set_len(size))
            .expect("create image");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if keep_devices() {
            if let Some(d) = self.0.take() {
                eprintln!("{KEEP_ENV}=1: kept {}", d.keep().display());
            }
        }
    }
}
