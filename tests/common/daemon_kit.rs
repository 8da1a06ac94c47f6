//! Pieces the daemon, device and wrapper tests share: loop devices over an
//! image, `blockfence format`, one HTTP/1.1 request over the API's Unix
//! socket, and waiting for a volume event.

use super::{run_ok, AlignedBuf};
use blockfence::api::{VolumeEvent, VolumeEventKind};
use blockfence::daemon::config::{DaemonConfig, ParamOverrides, VolumeSpec};
use serde_json::Value;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The blockfence binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_blockfence");

/// A loop device (`--direct-io=on`) over an image, detached on drop.
pub struct Loop(pub PathBuf);

impl Loop {
    /// Attaches a new loop device to `image`.
    pub fn attach(image: &Path) -> Loop {
        let image = image.to_str().expect("temp paths are UTF-8");
        let out = run_ok("losetup", &["--direct-io=on", "-f", "--show", image]).expect("losetup");
        Loop(PathBuf::from(out.stdout.trim()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn arg(&self) -> &str {
        self.0.to_str().expect("device paths are UTF-8")
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run_ok("losetup", &["-d", self.arg()]);
    }
}

/// `blockfence format --force` with slots reserved for node-a and node-b.
pub fn format_for_two(device: &Path) {
    let out = Command::new(BIN)
        .args(["format", "--force", "--node", "node-a", "--node", "node-b"])
        .arg(device)
        .output()
        .expect("run format");
    assert!(
        out.status.success(),
        "format: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One HTTP/1.1 request over a Unix socket: (status, JSON body or Null).
pub fn http(socket: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (status, text) = http_text(socket, method, path, body);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// One HTTP/1.1 request over a Unix socket: (status, body text).
pub fn http_text(socket: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    let mut s = UnixStream::connect(socket).expect("connect to the daemon");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Waits for the first event matching `pick` (30 s at most): when it came,
/// and what it was.
pub async fn next_event(
    rx: &mut tokio::sync::broadcast::Receiver<VolumeEvent>,
    pick: impl Fn(&VolumeEventKind) -> bool,
) -> (Instant, VolumeEventKind) {
    let wait = async {
        loop {
            match rx.recv().await {
                Ok(e) if pick(&e.kind) => return (Instant::now(), e.kind),
                Ok(_) => {}
                Err(e) => panic!("event stream: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("the event within 30 s")
}

/// Chunk of the whole-device reads of [`device_digest`].
const DIGEST_CHUNK: usize = 1 << 20;

/// crc32c of every MiB of the first `size` bytes of `device`, read with
/// O_DIRECT (through a second loop device: no page cache shared with the
/// writer's), to see whether anything lands on the device.
pub fn device_digest(device: &Path, size: u64) -> Vec<u32> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .expect("open O_DIRECT");
    let mut buf = AlignedBuf::zeroed(DIGEST_CHUNK);
    (0..size / DIGEST_CHUNK as u64)
        .map(|i| {
            file.read_exact_at(buf.as_mut_slice(), i * DIGEST_CHUNK as u64)
                .expect("O_DIRECT read");
            crc32c::crc32c(buf.as_slice())
        })
        .collect()
}

/// How long after a fence a device is watched for late writes.
pub const LATE_WRITE_WINDOW: Duration = Duration::from_millis(500);

/// Asserts that nothing lands on `device` (its first `size` bytes) for
/// [`LATE_WRITE_WINDOW`] after `digest` ([`device_digest`]) was taken.
pub fn assert_unchanged_after(device: &Path, size: u64, digest: &[u32]) {
    std::thread::sleep(LATE_WRITE_WINDOW); // an observation window, not a wait for an event
    let later = device_digest(device, size);
    let changed: Vec<usize> = (0..digest.len())
        .filter(|&i| digest[i] != later[i])
        .collect();
    assert!(
        changed.is_empty(),
        "MiB {changed:?} changed after the fence"
    );
}

/// `debugfs -D` (O_DIRECT) `cat` of `file` on `device`.
pub fn debugfs_cat(device: &Path, file: &str) -> String {
    let cmd = format!("cat {file}");
    run_ok(
        "debugfs",
        &["-D", "-R", &cmd, device.to_str().expect("UTF-8")],
    )
    .expect("debugfs cat")
    .stdout
}

/// Short lease parameters for daemon tests: host_dead = (1000 + 500 + 200)
/// x 1.01/0.99 -> 1.8 s.
pub const SHORT_PARAMS: ParamOverrides = ParamOverrides {
    io_timeout_ms: Some(200),
    renew_interval_ms: Some(200),
    lease_timeout_ms: Some(1_000),
    fence_timeout_ms: Some(500),
};

/// A daemon configuration for tests: node `node`, one volume `pg` on
/// `device`, [`SHORT_PARAMS`], a 1 s session timeout.
pub fn test_config(node: &str, socket: &Path, device: &Path) -> DaemonConfig {
    DaemonConfig {
        node_name: node.into(),
        socket: socket.to_path_buf(),
        listen: None,
        volumes: vec![VolumeSpec {
            name: "pg".into(),
            device: device.to_path_buf(),
        }],
        watchdog: None,
        watchdog_timeout: None,
        session_timeout: Duration::from_millis(1_000),
        stop_timeout: Duration::from_secs(3),
        handover_hold_off: Duration::from_secs(2),
        params: SHORT_PARAMS,
        devices: Default::default(),
    }
}
