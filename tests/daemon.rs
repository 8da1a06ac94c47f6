//! The daemon on real devices: two daemons (two simulated nodes) in this test
//! process, each over its own loop device on one shared image (through its own
//! FUSE storage path where a test cuts it), talking HTTP over their Unix
//! sockets exactly as pods do.
//!
//! The daemons run in this process, so they see (and fence) the
//! mounts the test makes under its scratch directory; a guard unmounts any
//! left over. Short lease parameters (host_dead 1.8 s) keep
//! the takeovers quick; the order of events is what is checked, never a
//! duration.
//!
//! Needs root, loop devices and (for the storage-path test) FUSE; skips with
//! a printed reason otherwise (`BLOCKFENCE_REQUIRE_DEVICES=1` fails instead).

mod common;

use blockfence::api::VolumeEventKind;
use blockfence::daemon::config::DaemonConfig;
use blockfence::daemon::Daemon;
use blockfence::fence::fake::{Behavior, RecordingOps};
use common::daemon_kit::{
    assert_unchanged_after, device_digest, format_for_two, http, http_text, next_event,
    test_config, Loop, BIN,
};
use common::{
    is_mountpoint, require_root_loop, require_root_loop_fuse, run_ok, Mode, NodePath, Scratch,
    SharedImage,
};
use serde_json::Value;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const IMAGE_SIZE: u64 = 64 << 20;

/// A mount point under the test's scratch directory, lazily unmounted on
/// drop if the test left it mounted (the fence normally unmounts it).
struct MountDir(PathBuf);

impl Drop for MountDir {
    fn drop(&mut self) {
        if is_mountpoint(&self.0) {
            let _ = run_ok("umount", &["-l", self.0.to_str().expect("utf-8")]);
        }
    }
}

/// The sum of every sample of metric `name` (any labels) in `/metrics`.
fn metric(socket: &Path, name: &str) -> f64 {
    let (status, text) = http_text(socket, "GET", "/metrics", None);
    assert_eq!(status, 200);
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn acquire(socket: &Path, holder: &str, timeout_s: f64) -> (u16, Value) {
    http(
        socket,
        "POST",
        "/v1/volumes/pg/acquire",
        Some(serde_json::json!({"holder": holder, "timeout_seconds": timeout_s})),
    )
}

fn keepalive(socket: &Path, session: &str) -> (u16, Value) {
    http(
        socket,
        "POST",
        &format!("/v1/sessions/{session}/keepalive"),
        None,
    )
}

/// A child writing to a file on `dir` for ever, holding it open, going on
/// through write errors (only a kill stops it).
fn writer(dir: &Path) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg("exec 3>>\"$1/data\"; i=0; while :; do i=$((i+1)); echo $i >&3 || :; done")
        .arg("sh")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the writer")
}

fn mount(device: &Path, dir: &Path) -> MountDir {
    std::fs::create_dir_all(dir).expect("mkdir");
    run_ok(
        "mount",
        &[
            "-t",
            "ext4",
            "-o",
            "errors=remount-ro",
            device.to_str().expect("utf-8"),
            dir.to_str().expect("utf-8"),
        ],
    )
    .expect("mount");
    MountDir(dir.to_path_buf())
}

/// Two simulated nodes on plain loop devices over one formatted image, with
/// their API sockets' paths.
struct Pair {
    scratch: Scratch,
    la: Loop,
    lb: Loop,
    sa: PathBuf,
    sb: PathBuf,
}

impl Pair {
    fn new(name: &str) -> Pair {
        let scratch = Scratch::new(name);
        let image = scratch.image("shared.img", IMAGE_SIZE);
        let (la, lb) = (Loop::attach(&image), Loop::attach(&image));
        format_for_two(&la.0);
        let (sa, sb) = (scratch.path().join("a.sock"), scratch.path().join("b.sock"));
        Pair {
            scratch,
            la,
            lb,
            sa,
            sb,
        }
    }

    fn config_a(&self) -> DaemonConfig {
        test_config("node-a", &self.sa, &self.la.0)
    }

    /// Daemon a, then daemon b.
    async fn start_both(&self) -> (Daemon, Daemon) {
        let a = Daemon::start(self.config_a()).await.expect("daemon a");
        (a, self.start_b().await)
    }

    async fn start_b(&self) -> Daemon {
        Daemon::start(test_config("node-b", &self.sb, &self.lb.0))
            .await
            .expect("daemon b")
    }
}

/// [`acquire`] off the runtime.
async fn acquire_off(socket: &Path, holder: &str, timeout_s: f64) -> (u16, Value) {
    let (socket, holder) = (socket.to_path_buf(), holder.to_string());
    blocking(move || acquire(&socket, &holder, timeout_s)).await
}

/// Runs a blocking call off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("no panic")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_volume_goes_to_the_waiting_node_with_a_higher_generation() {
    if !require_root_loop() {
        return;
    }
    let pair = Pair::new("daemon-release");
    let (sa, sb) = (pair.sa.clone(), pair.sb.clone());
    let a = Daemon::start(pair.config_a()).await.expect("daemon a");
    let b = pair.start_b().await;

    let (status, grant_a) = acquire_off(&sa, "pg-a", 10.0).await;
    assert_eq!(status, 200, "{grant_a}");
    assert_eq!(grant_a["device"], pair.la.0.to_str().unwrap());
    assert!(grant_a["mount_options"]
        .as_array()
        .unwrap()
        .contains(&Value::from("errors=remount-ro")));
    let session_a = grant_a["session"].as_str().unwrap().to_string();

    // B waits while A holds it (and keeps it alive).
    let waiter = tokio::task::spawn_blocking({
        let sb = sb.clone();
        move || (acquire(&sb, "pg-b", 30.0), Instant::now())
    });
    let mut events_b = b.subscribe("pg").expect("volume pg");
    for _ in 0..5 {
        let (status, g) = blocking({
            let (sa, s) = (sa.clone(), session_a.clone());
            move || keepalive(&sa, &s)
        })
        .await;
        assert_eq!(status, 200, "{g}");
        assert!(g["valid_for_ms"].as_u64().unwrap() <= 1_000);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !waiter.is_finished(),
        "B was granted while A held the volume"
    );
    // The daemon's own work shows in its metrics.
    let m = blocking({
        let sa = sa.clone();
        move || {
            [
                "blockfence_renewals_total",
                "blockfence_lease_io_writes_total",
                "blockfence_lease_io_reads_total",
                "blockfence_takeover_duration_seconds_count",
                "blockfence_sessions",
            ]
            .map(|n| metric(&sa, n))
        }
    })
    .await;
    assert!(m.iter().all(|v| *v >= 1.0), "metrics not recorded: {m:?}");
    let released_at = Instant::now();
    let (status, st) = blocking({
        let (sa, s) = (sa.clone(), session_a.clone());
        move || {
            http(
                &sa,
                "POST",
                "/v1/volumes/pg/release",
                Some(serde_json::json!({"session": s})),
            )
        }
    })
    .await;
    assert_eq!(status, 200, "{st}");
    let ((status, grant_b), granted_at) = waiter.await.unwrap();
    assert_eq!(status, 200, "{grant_b}");
    assert!(granted_at >= released_at);
    assert!(grant_b["generation"].as_u64() > grant_a["generation"].as_u64());
    let (_, ev) = next_event(&mut events_b, |k| {
        matches!(k, VolumeEventKind::Granted { .. })
    })
    .await;
    assert!(matches!(ev, VolumeEventKind::Granted { holder, .. } if holder == "pg-b"));
    // The old session is over, and says so.
    let (status, body) = blocking(move || keepalive(&sa, &session_a)).await;
    assert_eq!(status, 410, "{body}");
    a.shutdown().await.expect("a stops");
    // B's holder is asked to stop; with nobody answering, its session times
    // out, is fenced (nothing mounted) and released.
    b.shutdown().await.expect("b stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_session_is_fenced_writers_killed_and_then_the_lease_released() {
    if !require_root_loop() {
        return;
    }
    let pair = Pair::new("daemon-silent");
    let (sa, sb) = (pair.sa.clone(), pair.sb.clone());
    let (a, b) = pair.start_both().await;
    let mut events_a = a.subscribe("pg").unwrap();

    let (status, grant) = acquire_off(&sa, "pg-a", 10.0).await;
    assert_eq!(status, 200, "{grant}");
    let dir = pair.scratch.path().join("mnt");
    let _mounted = mount(&pair.la.0, &dir);
    let mut w = writer(&dir);
    // No keepalive: after session_timeout the daemon fences.
    let (_, fencing) = next_event(&mut events_a, |k| {
        matches!(k, VolumeEventKind::Fencing { .. })
    })
    .await;
    assert!(
        matches!(fencing, VolumeEventKind::Fencing { reason, .. } if reason == "session_expired")
    );
    let (fenced_at, fenced) = next_event(&mut events_a, |k| {
        matches!(k, VolumeEventKind::Fenced { .. })
    })
    .await;
    assert!(
        matches!(fenced, VolumeEventKind::Fenced { ok: true, .. }),
        "{fenced:?}"
    );
    let status = w.wait().expect("reap the writer");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the writer was killed"
    );
    assert!(!is_mountpoint(&dir), "the fence unmounted the volume");
    let (released_at, _) = next_event(&mut events_a, |k| {
        matches!(k, VolumeEventKind::Released { .. })
    })
    .await;
    assert!(released_at >= fenced_at);
    let (status, body) = blocking({
        let s = grant["session"].as_str().unwrap().to_string();
        move || keepalive(&sa, &s)
    })
    .await;
    assert_eq!(status, 410, "{body}");
    // The peer gets it at once (a release, no host_dead wait).
    let (status, g) = blocking(move || acquire(&sb, "pg-b", 10.0)).await;
    assert_eq!(status, 200, "{g}");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A writer in a mount and PID namespace of its own (as a pod's container
/// is): it mounts `device` at `dir` there (`--propagation private`: the mount
/// never shows in the daemon's namespace), says `mounted` on stdout, and
/// appends lines to `dir/data` for ever. With `detach`, it then lazily
/// unmounts `dir` in its own namespace while keeping the file open, so the
/// filesystem is in no mountinfo at all (what `umount -l` leaves behind).
fn namespaced_writer(device: &Path, dir: &Path, detach: bool) -> (Child, u32) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let script = format!(
        "mount -t ext4 -o errors=remount-ro \"$1\" \"$2\" && exec 3>>\"$2/data\" && {} \
         echo mounted && i=0 && while :; do i=$((i+1)); echo $i >&3 || :; done",
        if detach { "umount -l \"$2\" &&" } else { "" }
    );
    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "sh",
            "-c",
        ])
        .arg(script)
        .arg("sh")
        .arg(device)
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start unshare");
    let mut line = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    std::io::BufRead::read_line(&mut out, &mut line).expect("read the writer's stdout");
    assert_eq!(line.trim(), "mounted", "the writer did not start");
    let pid = child.id();
    (child, pid)
}

/// The reproduction of the namespace hole: the writer's mount is invisible
/// to the daemon's mountinfo, its session expires, and the lease must not be
/// released (nor the peer granted) before nothing can write any more.
async fn a_namespaced_writer_is_fenced_before_the_lease_is_released(name: &str, detach: bool) {
    if !require_root_loop() {
        return;
    }
    let pair = Pair::new(name);
    let (sa, sb) = (pair.sa.clone(), pair.sb.clone());
    let (a, b) = pair.start_both().await;
    let mut events_a = a.subscribe("pg").unwrap();
    let (status, grant) = acquire_off(&sa, "pg-a", 10.0).await;
    assert_eq!(status, 200, "{grant}");
    let dir = pair.scratch.path().join("mnt");
    let (w, _) = namespaced_writer(&pair.la.0, &dir, detach);
    assert!(
        !is_mountpoint(&dir),
        "the writer's mount must not be visible to the daemon"
    );
    // Writes through A show through B (or the check after the fence proves nothing).
    let before = device_digest(&pair.lb.0, IMAGE_SIZE);
    run_ok("sync", &[]).unwrap();
    assert_ne!(before, device_digest(&pair.lb.0, IMAGE_SIZE));
    let contender = tokio::task::spawn_blocking(move || {
        let r = acquire(&sb, "pg-b", 30.0);
        (r, Instant::now())
    });
    // No keepalive: the session expires and the daemon fences.
    let (_, fencing) = next_event(&mut events_a, |k| {
        matches!(k, VolumeEventKind::Fencing { .. })
    })
    .await;
    // session_expired; lease_lost when a loaded machine made renewals late
    // (the short test parameters): either way the fence must come first.
    assert!(
        matches!(&fencing, VolumeEventKind::Fencing { reason, .. }
            if reason == "session_expired" || reason == "lease_lost"),
        "{fencing:?}"
    );
    let (fenced_at, fenced) = next_event(&mut events_a, |k| {
        matches!(k, VolumeEventKind::Fenced { .. })
    })
    .await;
    let digest_after = device_digest(&pair.lb.0, IMAGE_SIZE);
    assert!(
        matches!(fenced, VolumeEventKind::Fenced { ok: true, .. }),
        "{fenced:?}"
    );
    // The writer (PID 1 of its namespace; its loop never ends by itself) was
    // killed, and with it the namespace: `unshare` returns.
    let out = w.wait_with_output().expect("reap unshare");
    assert!(
        !out.status.success(),
        "the writer ended by itself: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let ((status, g), granted_at) = contender.await.unwrap();
    assert_eq!(status, 200, "{g}");
    assert!(
        granted_at >= fenced_at,
        "the peer was granted before the fence ended"
    );
    let (released_at, _) = next_event(&mut events_a, |k| {
        matches!(k, VolumeEventKind::Released { .. })
    })
    .await;
    assert!(released_at >= fenced_at);
    assert_unchanged_after(&pair.lb.0, IMAGE_SIZE, &digest_after);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_in_its_own_mount_and_pid_namespace_is_fenced_before_the_release() {
    a_namespaced_writer_is_fenced_before_the_lease_is_released("daemon-ns-writer", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazily_detached_mount_held_open_is_fenced_before_the_release() {
    a_namespaced_writer_is_fenced_before_the_lease_is_released("daemon-ns-detached", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_fenced_before_the_peer_takes_over() {
    if !require_root_loop_fuse() {
        return;
    }
    let scratch = Scratch::new("daemon-lost");
    let image = SharedImage::create(IMAGE_SIZE).expect("image");
    let (pa, pb) = (
        NodePath::new(&image, "node-a").expect("path a"),
        NodePath::new(&image, "node-b").expect("path b"),
    );
    format_for_two(pa.device());
    let (sa, sb) = (scratch.path().join("a.sock"), scratch.path().join("b.sock"));
    let a = Daemon::start(test_config("node-a", &sa, pa.device()))
        .await
        .expect("daemon a");
    let b = Daemon::start(test_config("node-b", &sb, pb.device()))
        .await
        .expect("daemon b");
    let mut events_a = a.subscribe("pg").unwrap();

    let (status, grant) = acquire_off(&sa, "pg-a", 10.0).await;
    assert_eq!(status, 200, "{grant}");
    let session = grant["session"].as_str().unwrap().to_string();
    let dir = scratch.path().join("mnt");
    let _mounted = mount(pa.device(), &dir);
    let w = writer(&dir);
    // The holder keeps its session alive; only the storage path fails.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keeper = std::thread::spawn({
        let (sa, stop) = (sa.clone(), stop.clone());
        move || loop {
            let (status, _) = keepalive(&sa, &session);
            if status != 200 || stop.load(std::sync::atomic::Ordering::SeqCst) {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    // Cut the path only once the writer has its file open and writes.
    let t = Instant::now();
    while std::fs::metadata(dir.join("data")).map_or(true, |m| m.len() == 0) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the writer never wrote"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    pa.set_mode(Mode::Eio).expect("cut A's path");
    let contender =
        tokio::task::spawn_blocking(move || (acquire(&sb, "pg-b", 30.0), Instant::now()));
    let (_, lost) = next_event(&mut events_a, |k| {
        matches!(k, VolumeEventKind::Fencing { .. })
    })
    .await;
    assert!(matches!(lost, VolumeEventKind::Fencing { reason, .. } if reason == "lease_lost"));
    let (fenced_at, fenced) = next_event(&mut events_a, |k| {
        matches!(k, VolumeEventKind::Fenced { .. })
    })
    .await;
    assert!(
        matches!(fenced, VolumeEventKind::Fenced { ok: true, .. }),
        "{fenced:?}"
    );
    let out = w.wait_with_output().unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "writer: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mountpoint(&dir));
    let ((status, g), granted_at) = contender.await.unwrap();
    assert_eq!(status, 200, "{g}");
    assert!(
        granted_at > fenced_at,
        "the peer took over before the fence ended"
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        keeper.join().unwrap(),
        410,
        "the holder was told its session ended"
    );
    a.shutdown().await.ok();
    b.shutdown().await.ok();
    drop((pa, pb));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fence_keeps_the_lease_and_starves_the_watchdog() {
    if !require_root_loop() {
        return;
    }
    let pair = Pair::new("daemon-fence-failed");
    let (sa, sb) = (pair.sa.clone(), pair.sb.clone());
    let dog = pair.scratch.path().join("watchdog");
    std::fs::write(&dog, b"").unwrap();
    let ops = Arc::new(RecordingOps::new([
        Behavior::Fail,
        Behavior::Succeed,
        Behavior::Succeed,
    ]));
    let cfg = DaemonConfig {
        watchdog: Some(dog.clone()),
        ..pair.config_a()
    };
    let a = Daemon::start_with(cfg, ops.clone())
        .await
        .expect("daemon a");
    let b = pair.start_b().await;
    let mut events_a = a.subscribe("pg").unwrap();
    let (status, _) = acquire_off(&sa, "pg-a", 10.0).await;
    assert_eq!(status, 200);
    let dir = pair.scratch.path().join("mnt");
    let _mounted = mount(&pair.la.0, &dir);
    let (_, fenced) = next_event(&mut events_a, |k| {
        matches!(k, VolumeEventKind::Fenced { .. })
    })
    .await;
    assert!(
        matches!(fenced, VolumeEventKind::Fenced { ok: false, .. }),
        "{fenced:?}"
    );
    let steps: Vec<_> = ops
        .calls()
        .iter()
        .map(|c| (c.step, c.mount.clone()))
        .collect();
    assert_eq!(steps.len(), 3, "{steps:?}");
    // The daemon fences the device (every mount of it, in every namespace).
    assert!(steps.iter().all(|(_, m)| *m == pair.la.0), "{steps:?}");
    // The feeder notices within a few feed intervals.
    let t = Instant::now();
    while !a.watchdog_starved() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "watchdog never starved"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fed = std::fs::read(&dog).unwrap();
    assert!(
        !fed.is_empty(),
        "the watchdog was fed while the lease was healthy"
    );
    // The lease is kept: the peer times out naming node A's holder.
    let (status, body) = blocking(move || acquire(&sb, "pg-b", 3.0)).await;
    assert_eq!(status, 409, "{body}");
    // New local grants are refused.
    let (status, body) = blocking({
        let sa = sa.clone();
        move || acquire(&sa, "pg-a2", 0.0)
    })
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(
        a.shutdown().await.is_err(),
        "a failed fence does not settle"
    );
    let fed = std::fs::read(&dog).unwrap();
    assert_ne!(
        fed.last(),
        Some(&b'V'),
        "a starved watchdog is never disarmed"
    );
    b.shutdown().await.ok();
}

#[test]
fn the_daemon_refuses_bad_configuration_with_clear_errors() {
    let scratch = Scratch::new("daemon-config");
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("daemon")
            .args(args)
            .env_remove("BLOCKFENCE_VOLUMES")
            .env_remove("BLOCKFENCE_NODE_NAME")
            .output()
            .expect("run the daemon");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let sock = scratch.path().join("s.sock");
    let sock = sock.to_str().unwrap();
    let (code, err) = run(&["--node-name", "a", "--socket", sock]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no volumes"), "{err}");
    let (code, err) = run(&["--node-name", "a", "--volume", "pg"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("NAME=DEVICE"), "{err}");
    let blank = scratch.image("blank.img", 64 << 20);
    let spec = format!("pg={}", blank.display());
    let (code, err) = run(&["--node-name", "a", "--socket", sock, "--volume", &spec]);
    assert_eq!(code, Some(1));
    assert!(err.contains("\"pg\"") && err.contains("format"), "{err}");
    let (code, err) = run(&["--volume", &spec, "--socket", sock]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--node-name"), "{err}");
    let out = Command::new(BIN)
        .args(["daemon", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for s in [
        "BLOCKFENCE_NODE_NAME",
        "BLOCKFENCE_VOLUMES",
        "--watchdog",
        "--config",
    ] {
        assert!(help.contains(s), "--help lacks {s}");
    }
}
