//! The daemon mounts for a pod: `blockfence run --daemon-mount` in a mount
//! and PID namespace of its own with CAP_SYS_ADMIN dropped (a simulated
//! unprivileged database container) gets the volume mounted in its
//! namespace by the daemon, and the daemon's fence unmounts it there.
//!
//! One daemon (in this test process) on a loop device over a formatted
//! image; a second loop device over the same image reads what reached the
//! disk (`debugfs -D`, no shared page cache).
//!
//! Needs root, loop devices, `unshare` and `setpriv` (util-linux); skips
//! with a printed reason otherwise (`BLOCKFENCE_REQUIRE_DEVICES=1` fails
//! instead).

mod common;

use blockfence::api::VolumeEventKind;
use blockfence::daemon::Daemon;
use common::daemon_kit::{debugfs_cat, format_for_two, next_event, test_config, Loop, BIN};
use common::{is_mountpoint, require_root_loop, Scratch};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE_SIZE: u64 = 64 << 20;

/// CAP_SYS_ADMIN's bit in CapEff.
const CAP_SYS_ADMIN: u32 = 21;

/// The daemon's node: an image, a loop device for the daemon and one to
/// read the disk with.
struct Node {
    scratch: Scratch,
    dev: Loop,
    reader: Loop,
    socket: PathBuf,
}

impl Node {
    fn new(name: &str) -> Node {
        let scratch = Scratch::new(name);
        let image = scratch.image("shared.img", IMAGE_SIZE);
        let (dev, reader) = (Loop::attach(&image), Loop::attach(&image));
        format_for_two(&dev.0);
        let socket = scratch.path().join("api.sock");
        Node {
            scratch,
            dev,
            reader,
            socket,
        }
    }
}

/// A simulated pod: `unshare --mount --pid --fork`, CAP_SYS_ADMIN dropped
/// from the bounding and inheritable sets, PID 1 a shell that starts
/// `blockfence run --daemon-mount` and waits (so that killing the wrapper
/// leaves its command alive). The command works inside DIR (its cwd holds
/// the filesystem), writes `f`, syncs, prints its mountinfo line for DIR and
/// `ready`, then waits until `stop` (outside DIR) exists.
struct Pod {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    dir: PathBuf,
    stop: PathBuf,
}

impl Pod {
    fn start(node: &Node) -> Pod {
        let dir = node.scratch.path().join("pod/pgdata");
        let stop = node.scratch.path().join("stop");
        let command = "cd \"$1\" && echo hello > f && sync && grep \" $1 \" /proc/self/mountinfo \
                       && echo ready && while [ ! -e \"$2\" ]; do sleep 0.1; done";
        let wrapper = format!(
            "\"$1\" run --daemon-mount --socket \"$2\" --volume pg --holder pod-a \
             --mount \"$3\" --mkdir -- sh -c '{command}' sh \"$3\" \"$4\" & wait $!"
        );
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--pid", "--fork"])
            .args([
                "setpriv",
                "--bounding-set",
                "-sys_admin",
                "--inh-caps",
                "-sys_admin",
            ])
            .args(["sh", "-c", &wrapper, "sh", BIN])
            .arg(&node.socket)
            .arg(&dir)
            .arg(&stop)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the pod");
        let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Pod {
            child,
            lines,
            dir,
            stop,
        }
    }

    /// The command's output up to `ready`.
    fn wait_ready(&self) -> Vec<String> {
        let mut seen = Vec::new();
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l == "ready" => return seen,
                Ok(l) => seen.push(l),
                Err(e) => panic!("the pod's command did not get ready ({e}); output: {seen:?}"),
            }
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop, "");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Host pids whose command line contains every one of `words`.
fn pids_with(words: &[&str]) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if words.iter().all(|w| text.contains(w)) {
            out.push(pid);
        }
    }
    out
}

fn status_field(pid: u32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
}

/// (the wrapper's pid, its command's pid), as the host sees them.
fn pod_pids(dir: &Path) -> (u32, u32) {
    let dir = dir.to_str().expect("UTF-8");
    let run: Vec<u32> = pids_with(&[BIN, "--daemon-mount", dir])
        .into_iter()
        .filter(|&p| status_field(p, "Name:").as_deref() == Some("blockfence"))
        .collect();
    assert_eq!(run.len(), 1, "one wrapper: {run:?}");
    let run = run[0];
    let command: Vec<u32> = pids_with(&["echo hello"])
        .into_iter()
        .filter(|&p| status_field(p, "PPid:") == Some(run.to_string()))
        .collect();
    assert_eq!(command.len(), 1, "one command: {command:?}");
    (run, command[0])
}

/// Whether any process's mount namespace has a mount on `dir`.
fn mounted_anywhere(dir: &Path) -> Vec<u32> {
    let needle = format!(" {} ", dir.display());
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .is_ok_and(|m| m.lines().any(|l| l.contains(&needle)))
        {
            out.push(pid);
        }
    }
    out
}

fn tools_present() -> bool {
    let ok = ["unshare", "setpriv", "debugfs"]
        .iter()
        .all(|t| Command::new(t).arg("--help").output().is_ok());
    if !ok {
        eprintln!("skipping: needs unshare, setpriv (util-linux) and debugfs (e2fsprogs)");
    }
    ok
}

/// Checks what every pod test starts with: mounted in the pod's namespace
/// (not the test's), the file on the disk, no CAP_SYS_ADMIN. Returns the
/// (wrapper, command) pids.
fn check_mounted_for_the_pod(node: &Node, pod: &Pod) -> (u32, u32) {
    let out = pod.wait_ready();
    let dir = std::fs::canonicalize(&pod.dir).expect("--mkdir made DIR");
    assert!(
        out.iter()
            .any(|l| l.contains(&format!(" {} ", dir.display()))),
        "the pod sees its mount: {out:?}"
    );
    assert!(
        !is_mountpoint(&dir),
        "the mount must not show in the test's (the daemon's) namespace"
    );
    let (run, command) = pod_pids(&dir);
    let mountinfo = std::fs::read_to_string(format!("/proc/{command}/mountinfo")).unwrap();
    assert!(mountinfo.contains(&format!(" {} ", dir.display())));
    for pid in [run, command] {
        let eff = status_field(pid, "CapEff:").expect("CapEff");
        let eff = u64::from_str_radix(&eff, 16).expect("hex");
        assert_eq!(eff & (1 << CAP_SYS_ADMIN), 0, "pid {pid} has CAP_SYS_ADMIN");
    }
    assert_eq!(debugfs_cat(&node.reader.0, "/f").trim(), "hello");
    (run, command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_pod_gets_the_volume_mounted_in_its_namespace_and_released() {
    if !require_root_loop() || !tools_present() {
        return;
    }
    let node = Node::new("pod-mount");
    let daemon = Daemon::start(test_config("node-a", &node.socket, &node.dev.0))
        .await
        .expect("daemon");
    let mut events = daemon.subscribe("pg").unwrap();
    let mut pod = Pod::start(&node);
    let (_run, _command) = {
        let node_ref = &node;
        let pod_ref = &pod;
        tokio::task::block_in_place(|| check_mounted_for_the_pod(node_ref, pod_ref))
    };
    // The command ends: the wrapper syncs and releases; the release's fence
    // (the daemon's) unmounts in the pod's namespace.
    std::fs::write(&pod.stop, "").unwrap();
    let status = tokio::task::block_in_place(|| pod.child.wait()).expect("the pod ends");
    assert!(status.success(), "{status:?}");
    let (fenced_at, fenced) =
        next_event(&mut events, |k| matches!(k, VolumeEventKind::Fenced { .. })).await;
    assert!(
        matches!(fenced, VolumeEventKind::Fenced { ok: true, .. }),
        "{fenced:?}"
    );
    let (released_at, _) = next_event(&mut events, |k| {
        matches!(k, VolumeEventKind::Released { .. })
    })
    .await;
    assert!(released_at >= fenced_at);
    assert_eq!(mounted_anywhere(&pod.dir), Vec::<u32>::new());
    daemon.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pod_wrapper_is_fenced_by_the_daemon_in_the_pods_namespace() {
    if !require_root_loop() || !tools_present() {
        return;
    }
    let node = Node::new("pod-mount-killed");
    let daemon = Daemon::start(test_config("node-a", &node.socket, &node.dev.0))
        .await
        .expect("daemon");
    let mut events = daemon.subscribe("pg").unwrap();
    let mut pod = Pod::start(&node);
    let (run, command) = {
        let (node_ref, pod_ref) = (&node, &pod);
        tokio::task::block_in_place(|| check_mounted_for_the_pod(node_ref, pod_ref))
    };
    // Only the wrapper dies: no more keepalives, its command lives on.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        status_field(command, "State:").is_some(),
        "the command lives on"
    );
    let (_, fencing) = next_event(&mut events, |k| {
        matches!(k, VolumeEventKind::Fencing { .. })
    })
    .await;
    assert!(
        matches!(&fencing, VolumeEventKind::Fencing { reason, .. } if reason == "session_expired"),
        "{fencing:?}"
    );
    let (fenced_at, fenced) =
        next_event(&mut events, |k| matches!(k, VolumeEventKind::Fenced { .. })).await;
    assert!(
        matches!(fenced, VolumeEventKind::Fenced { ok: true, .. }),
        "{fenced:?}"
    );
    // The command (its cwd on the volume) was killed, so the pod's PID 1
    // returns, and nothing is mounted in any namespace.
    let status = tokio::task::block_in_place(|| pod.child.wait()).expect("the pod ends");
    let _ = status;
    assert!(
        status_field(command, "State:").map_or(true, |s| s.starts_with('Z')),
        "the command was killed"
    );
    assert_eq!(mounted_anywhere(&pod.dir), Vec::<u32>::new());
    let (released_at, _) = next_event(&mut events, |k| {
        matches!(k, VolumeEventKind::Released { .. })
    })
    .await;
    assert!(released_at >= fenced_at, "released only after the fence");
    daemon.shutdown().await.unwrap();
}
