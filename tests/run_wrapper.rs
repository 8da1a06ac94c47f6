//! `blockfence run` end to end: the real binary, the API served in this process
//! (the fake backend behind a proxy that can shorten grants, ask to stop, or
//! go silent: tests/common/api_server.rs), and a real loop device with ext4.
//!
//! Every wrapper that mounts runs inside `unshare -m --propagation private`
//! under a small `sh` that, after the wrapper exited, reports whether the
//! mount is still there in that namespace (`still-mounted`) and the exit code
//! (`exit N`): the mount cannot leak to the host, and the test still sees
//! whether the wrapper unmounted. The device is read back through a second
//! loop device over the same image, with O_DIRECT (no page cache shared with
//! the wrapper's mount), as tests/fence_devices.rs does.
//!
//! Device tests need root and /dev/loop-control (they skip otherwise;
//! `BLOCKFENCE_REQUIRE_DEVICES=1` fails instead). The bad-input tests need
//! neither.

mod common;

use common::daemon_kit::{assert_unchanged_after, debugfs_cat, device_digest, Loop};

use blockfence::api::{StopReason, VolumeState};
use common::api_server::TestApi;
use common::{process_state, require_root_loop, run_ok, run_with_timeout, SharedImage};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_blockfence");
/// Size of the shared image.
const IMAGE_SIZE: u64 = 64 << 20;
/// Longest wait for any single event of a wrapper (a line, its exit).
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes on the mount in a loop, O_DIRECT, one `round` line per pass; prints
/// its pid first. Arguments: the mount point.
const WRITER: &str = "cd \"$1\" || exit 99; echo \"pid $$\"; i=0; echo started; \
     while :; do i=$((i+1)); echo $i >> log; \
     dd if=/dev/urandom of=big bs=4k count=16 oflag=direct conv=notrunc 2>/dev/null; \
     echo round; done";

/// Runs the wrapper (`"$@"`) in the background of this shell, in the mount
/// namespace `unshare` made, then reports on the namespace.
const NAMESPACE_SH: &str = "\"$@\" & pid=$!; echo \"wrapper $pid\"; wait $pid; rc=$?; \
     if grep -q \" $BF_MNT \" /proc/self/mountinfo; then echo still-mounted; fi; \
     echo \"exit $rc\"; exit $rc";

/// An image with two loop devices: `a` is granted, `b` is for reading back.
struct Volume {
    _image: SharedImage,
    a: Loop,
    b: Loop,
}

impl Volume {
    fn new(mkfs: bool) -> Volume {
        let image = SharedImage::create(IMAGE_SIZE).expect("image");
        let a = Loop::attach(image.path());
        let b = Loop::attach(image.path());
        if mkfs {
            run_ok("mkfs.ext4", &["-q", "-F", "-b", "4096", a.arg()]).expect("mkfs.ext4");
        }
        Volume {
            _image: image,
            a,
            b,
        }
    }
}

/// A fake API with volume `pg` granted as `device`.
fn api_for(device: &Path) -> TestApi {
    let api = TestApi::start(&["pg"]);
    let device = device.to_str().expect("UTF-8").to_string();
    api.set(|k| {
        k.devices.insert("pg".into(), device);
    });
    api
}

/// A wrapper running in its own mount namespace.
struct Wrapper {
    sh: Option<Child>,
    /// The wrapper's own pid (not the shell's).
    pid: i32,
    /// The command's pid, once it printed it.
    command_pid: Option<i32>,
    lines: mpsc::Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// What a wrapper left behind.
#[derive(Debug)]
struct Finished {
    code: i32,
    still_mounted: bool,
    stderr: String,
}

impl Wrapper {
    fn start(api: &TestApi, mnt: &Path, options: &[&str], command: &[&str]) -> Wrapper {
        let mut sh = Command::new("unshare")
            .args([
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                NAMESPACE_SH,
                "sh",
            ])
            .arg(BIN)
            .args(["run", "--volume", "pg", "--holder", "test-pod", "--mount"])
            .arg(mnt)
            .arg("--socket")
            .arg(api.socket())
            .args(options)
            .arg("--")
            .args(command)
            .env("BF_MNT", mnt)
            .env("BLOCKFENCE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn unshare");
        let (tx, lines) = mpsc::channel();
        let out = sh.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut err = sh.stderr.take().expect("piped");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let mut w = Wrapper {
            sh: Some(sh),
            pid: 0,
            command_pid: None,
            lines,
            stderr: Some(stderr),
        };
        let first = w.next_line();
        w.pid = first
            .strip_prefix("wrapper ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("expected the wrapper's pid, got {first:?}"));
        w
    }

    fn next_line(&mut self) -> String {
        let line = self
            .lines
            .recv_timeout(EVENT_TIMEOUT)
            .unwrap_or_else(|e| panic!("no output line within {EVENT_TIMEOUT:?}: {e}"));
        if let Some(pid) = line.strip_prefix("pid ").and_then(|p| p.parse().ok()) {
            self.command_pid = Some(pid);
        }
        line
    }

    /// Reads lines until one equals `want`; panics if the wrapper ends first.
    fn expect_line(&mut self, want: &str) {
        loop {
            let line = self.next_line();
            if line == want {
                return;
            }
            assert!(
                !line.starts_with("exit "),
                "wrapper ended ({line}) before printing {want:?}"
            );
        }
    }

    fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid), sig).expect("signal the wrapper");
    }

    /// Waits for the wrapper to exit; what the namespace shell reported.
    fn finish(mut self) -> Finished {
        let mut still_mounted = false;
        let code = loop {
            let line = self.next_line();
            if line == "still-mounted" {
                still_mounted = true;
            }
            if let Some(code) = line.strip_prefix("exit ") {
                break code.parse().expect("exit code");
            }
        };
        let mut sh = self.sh.take().expect("running");
        let _ = sh.wait();
        let stderr = self.stderr.take().expect("once").join().unwrap_or_default();
        eprintln!("wrapper stderr:\n{stderr}");
        Finished {
            code,
            still_mounted,
            stderr,
        }
    }
}

impl Drop for Wrapper {
    fn drop(&mut self) {
        if let Some(mut sh) = self.sh.take() {
            // A failed test: kill everything, the namespace goes with it.
            if let Some(pid) = self.command_pid {
                let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = nix::sys::signal::killpg(Pid::from_raw(sh.id() as i32), Signal::SIGKILL);
            let _ = sh.wait();
        }
    }
}

/// Whether `pid` is gone (or a zombie: it runs no more).
fn dead(pid: i32) -> bool {
    process_state(pid as u32).map_or(true, |s| s == 'Z' || s == 'X')
}

fn volume_state(api: &TestApi) -> (VolumeState, Option<String>) {
    let s = api
        .block_on(api.client().volume("pg"))
        .expect("GET /v1/volumes/pg");
    (s.state, s.holder)
}

/// After a fence: nothing reaches the device through loop B any more.
fn assert_device_quiet(b: &Path) {
    assert_unchanged_after(b, IMAGE_SIZE, &device_digest(b, IMAGE_SIZE));
}

/// Starts the writer and checks that its writes show through loop B (or the
/// check after the fence proves nothing). Returns the command's pid.
fn start_writing(w: &mut Wrapper, b: &Path) -> i32 {
    w.expect_line("started");
    let pid = w.command_pid.expect("the writer printed its pid");
    let before = device_digest(b, IMAGE_SIZE);
    w.expect_line("round");
    w.expect_line("round");
    assert_ne!(
        before,
        device_digest(b, IMAGE_SIZE),
        "writes through A must show through B"
    );
    pid
}

/// The wrapper fenced (exit 4, for `why`): the command is dead, the volume
/// unmounted, and nothing more reaches the device.
fn assert_fenced(f: &Finished, why: &str, pid: i32, readback: &Path) {
    assert_eq!(f.code, 4, "{f:?}");
    assert!(f.stderr.contains(why), "{f:?}");
    assert!(
        f.stderr
            .contains("fenced: command killed, filesystem shut down"),
        "{f:?}"
    );
    assert!(!f.still_mounted, "{f:?}");
    assert!(dead(pid), "the command {pid} still runs");
    assert_device_quiet(readback);
}

#[test]
fn the_command_runs_on_the_volume_and_its_status_is_the_exit_code() {
    if !require_root_loop() {
        return;
    }
    let vol = Volume::new(true);
    let api = api_for(vol.a.path());
    let mnt = tempfile::tempdir().unwrap();
    let script = "echo \"hello $BLOCKFENCE_GENERATION\" > \"$1/file\" || exit 99; \
                  grep \" $1 \" /proc/self/mountinfo; exit 3";
    let mut w = Wrapper::start(
        &api,
        mnt.path(),
        &["--mount-options", "noatime"],
        &["sh", "-c", script, "sh", mnt.path().to_str().unwrap()],
    );
    let mountinfo = w.next_line();
    // The granted options (errors=remount-ro) and the extra ones are in effect.
    assert!(mountinfo.contains("noatime"), "{mountinfo}");
    assert!(mountinfo.contains("errors=remount-ro"), "{mountinfo}");
    let f = w.finish();
    assert_eq!(f.code, 3, "{f:?}");
    assert!(!f.still_mounted, "{f:?}");
    assert_eq!(volume_state(&api), (VolumeState::Free, None), "released");
    // On the device, with no journal replay needed: unmounted cleanly.
    assert_eq!(debugfs_cat(vol.b.path(), "/file"), "hello 1\n");
}

#[test]
fn a_session_ended_by_the_daemon_is_fenced() {
    if !require_root_loop() {
        return;
    }
    let vol = Volume::new(true);
    let api = api_for(vol.a.path());
    let mnt = tempfile::tempdir().unwrap();
    let m = mnt.path().to_str().unwrap();
    let mut w = Wrapper::start(&api, mnt.path(), &[], &["sh", "-c", WRITER, "sh", m]);
    let pid = start_writing(&mut w, vol.b.path());
    // A handover in the fake ends the local session: the next keepalive is 404.
    api.block_on(api.client().handover("pg", "node-2"))
        .expect("handover");
    let f = w.finish();
    assert_eq!(f.code, 4, "{f:?}");
    assert!(f.stderr.contains("lost volume \"pg\""), "{f:?}");
    assert!(f.stderr.contains("ended the session"), "{f:?}");
    assert!(
        f.stderr
            .contains("fenced: command killed, filesystem shut down"),
        "{f:?}"
    );
    assert!(!f.still_mounted, "{f:?}");
    assert!(dead(pid), "the command {pid} still runs");
    assert_device_quiet(vol.b.path());
    assert_eq!(volume_state(&api).1.as_deref(), Some("node-2"));
}

#[test]
fn a_session_ended_410_is_fenced() {
    if !require_root_loop() {
        return;
    }
    let vol = Volume::new(true);
    let api = api_for(vol.a.path());
    api.set(|k| k.keepalive_interval_ms = Some(200));
    let mnt = tempfile::tempdir().unwrap();
    let m = mnt.path().to_str().unwrap();
    let mut w = Wrapper::start(&api, mnt.path(), &[], &["sh", "-c", WRITER, "sh", m]);
    let pid = start_writing(&mut w, vol.b.path());
    api.set(|k| k.session_ended = true);
    let f = w.finish();
    assert_fenced(&f, "session_ended", pid, vol.b.path());
}

#[test]
fn a_silent_daemon_is_fenced_when_the_grant_runs_out() {
    if !require_root_loop() {
        return;
    }
    let vol = Volume::new(true);
    let api = api_for(vol.a.path());
    api.set(|k| {
        k.valid_for_ms = Some(1_500);
        k.keepalive_interval_ms = Some(300);
    });
    let mnt = tempfile::tempdir().unwrap();
    let m = mnt.path().to_str().unwrap();
    let mut w = Wrapper::start(&api, mnt.path(), &[], &["sh", "-c", WRITER, "sh", m]);
    let pid = start_writing(&mut w, vol.b.path());
    // Kept alive past the first grant's validity: keepalives work.
    assert!(api.wait_keepalives(6, EVENT_TIMEOUT), "no keepalives");
    assert!(!dead(pid));
    api.set(|k| k.silent = true);
    let f = w.finish();
    assert_fenced(&f, "no keepalive answer in time", pid, vol.b.path());
}

#[test]
fn signals_are_forwarded_and_the_exit_status_passed_on() {
    if !require_root_loop() {
        return;
    }
    let vol = Volume::new(true);
    let api = api_for(vol.a.path());
    let mnt = tempfile::tempdir().unwrap();
    let script = "echo \"pid $$\"; trap 'echo got-USR1' USR1; trap 'echo got-HUP' HUP; \
                  trap 'echo got-TERM; exit 7' TERM; echo started; \
                  while :; do sleep 0.05; done";
    let mut w = Wrapper::start(&api, mnt.path(), &[], &["sh", "-c", script]);
    w.expect_line("started");
    w.signal(Signal::SIGUSR1);
    w.expect_line("got-USR1");
    w.signal(Signal::SIGHUP);
    w.expect_line("got-HUP");
    w.signal(Signal::SIGTERM);
    w.expect_line("got-TERM");
    let f = w.finish();
    assert_eq!(f.code, 7, "{f:?}");
    assert!(!f.still_mounted, "{f:?}");
    assert_eq!(volume_state(&api), (VolumeState::Free, None), "released");
}

#[test]
fn a_stop_request_stops_the_command_then_unmounts_and_releases() {
    if !require_root_loop() {
        return;
    }
    let vol = Volume::new(true);
    let api = api_for(vol.a.path());
    api.set(|k| k.keepalive_interval_ms = Some(200));
    let mnt = tempfile::tempdir().unwrap();
    let script = "trap 'echo got-USR2; exit 9' USR2; echo started; \
                  while :; do sleep 0.05; done";
    let mut w = Wrapper::start(
        &api,
        mnt.path(),
        &["--stop-signal", "USR2"],
        &["sh", "-c", script],
    );
    w.expect_line("started");
    assert_eq!(volume_state(&api).0, VolumeState::Held);
    api.set(|k| k.stop = Some(StopReason::Handover));
    w.expect_line("got-USR2");
    let f = w.finish();
    assert_eq!(f.code, 9, "{f:?}");
    assert!(!f.still_mounted, "{f:?}");
    assert_eq!(volume_state(&api), (VolumeState::Free, None), "released");
}

#[test]
fn a_command_that_ignores_the_stop_request_is_fenced() {
    if !require_root_loop() {
        return;
    }
    let vol = Volume::new(true);
    let api = api_for(vol.a.path());
    api.set(|k| k.keepalive_interval_ms = Some(200));
    let mnt = tempfile::tempdir().unwrap();
    let script = "echo \"pid $$\"; trap 'echo ignoring-TERM' TERM; echo started; \
                  while :; do sleep 0.05; done";
    let mut w = Wrapper::start(
        &api,
        mnt.path(),
        &["--stop-timeout", "1"],
        &["sh", "-c", script],
    );
    w.expect_line("started");
    let pid = w.command_pid.expect("pid");
    api.set(|k| k.stop = Some(StopReason::Shutdown));
    w.expect_line("ignoring-TERM");
    let f = w.finish();
    assert_eq!(f.code, 4, "{f:?}");
    assert!(
        f.stderr.contains("did not exit within 1 s of SIGTERM"),
        "{f:?}"
    );
    assert!(!f.still_mounted, "{f:?}");
    assert!(dead(pid), "the command {pid} still runs");
    // Fenced while the session was still valid: given back at once.
    assert_eq!(volume_state(&api), (VolumeState::Free, None), "released");
}

#[test]
fn processes_left_holding_the_mount_are_killed_so_it_unmounts() {
    if !require_root_loop() {
        return;
    }
    let vol = Volume::new(true);
    let api = api_for(vol.a.path());
    let mnt = tempfile::tempdir().unwrap();
    // Leaves a process behind (in another session, so not the command's
    // group) whose cwd is on the mount, then exits 0.
    let script = "cd \"$1\" && setsid sleep 1000 </dev/null >/dev/null 2>&1 & \
                  sleep_pid=$!; echo \"left $sleep_pid\"; \
                  while [ \"$(readlink /proc/$sleep_pid/exe)\" != \"$(command -v sleep)\" ]; do :; done; \
                  exit 0";
    let mut w = Wrapper::start(
        &api,
        mnt.path(),
        &[],
        &["sh", "-c", script, "sh", mnt.path().to_str().unwrap()],
    );
    let left: i32 = loop {
        let line = w.next_line();
        if let Some(p) = line.strip_prefix("left ") {
            break p.parse().expect("pid");
        }
    };
    let f = w.finish();
    assert_eq!(f.code, 0, "{f:?}");
    assert!(!f.still_mounted, "{f:?}");
    assert!(dead(left), "the process left on the mount still runs");
    assert_eq!(volume_state(&api), (VolumeState::Free, None), "released");
}

#[test]
fn a_grant_after_a_long_wait_is_confirmed_before_mounting() {
    if !require_root_loop() {
        return;
    }
    let vol = Volume::new(true);
    let api = api_for(vol.a.path());
    api.set(|k| {
        k.valid_for_ms = Some(1_000);
        k.keepalive_interval_ms = Some(200);
    });
    let other = api
        .block_on(api.client().acquire("pg", "other-pod", Duration::ZERO))
        .expect("acquire");
    let mnt = tempfile::tempdir().unwrap();
    let w = Wrapper::start(&api, mnt.path(), &[], &["sh", "-c", "echo ran; exit 5"]);
    assert!(
        api.wait_acquires(2, EVENT_TIMEOUT),
        "the wrapper did not ask"
    );
    // Makes the grant the wrapper waits for stale: counted from the send
    // time, it will have run out when it arrives (not a synchronisation).
    std::thread::sleep(Duration::from_millis(1_200));
    let keepalives = api.keepalives();
    api.block_on(api.client().release("pg", &other.session))
        .expect("release");
    let f = w.finish();
    // Without the confirmation it would have been fenced at once (exit 4).
    assert_eq!(f.code, 5, "{f:?}");
    assert!(api.keepalives() > keepalives, "no confirming keepalive");
    assert!(!f.still_mounted, "{f:?}");
    assert_eq!(volume_state(&api), (VolumeState::Free, None), "released");
}

#[test]
fn a_mount_failure_is_one_line_and_releases_the_volume() {
    if !require_root_loop() {
        return;
    }
    let vol = Volume::new(false); // no filesystem
    let api = api_for(vol.a.path());
    let mnt = tempfile::tempdir().unwrap();
    let w = Wrapper::start(&api, mnt.path(), &[], &["sh", "-c", "echo ran"]);
    let f = w.finish();
    assert_eq!(f.code, 1, "{f:?}");
    assert!(f.stderr.contains("blockfence: mounting"), "{f:?}");
    assert!(!f.stderr.contains("ran"), "{f:?}");
    assert_eq!(volume_state(&api), (VolumeState::Free, None), "released");
}

// ---------------------------------------------------------------------------
// Bad input: nothing is mounted, no root needed.
// ---------------------------------------------------------------------------

/// Runs `blockfence run ARGS` directly; (exit code, stderr).
fn run_direct(args: &[&str]) -> (i32, String) {
    let out = run_with_timeout(
        Command::new(BIN)
            .arg("run")
            .args(args)
            .env_remove("BLOCKFENCE_SOCKET"),
        EVENT_TIMEOUT,
    )
    .expect("blockfence run");
    eprintln!("{args:?}: {:?}\n{}", out.status, out.stderr);
    (out.status.code().expect("exited"), out.stderr)
}

#[test]
fn bad_input_is_one_clear_line_and_exit_1() {
    let api = TestApi::start(&["pg"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let sock = api.socket().to_str().unwrap().to_string();
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();

    let missing = dir.path().join("none.sock");
    let (code, err) = run_direct(&[
        "--volume",
        "pg",
        "--mount",
        d,
        "--socket",
        missing.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach the blockfence daemon"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let (code, err) = run_direct(&[
        "--volume", "nope", "--mount", d, "--socket", &sock, "--", "true",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("no volume named \"nope\""), "{err}");

    let (code, err) = run_direct(&[
        "--volume",
        "pg",
        "--mount",
        file.to_str().unwrap(),
        "--socket",
        &sock,
        "--",
        "true",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a directory"), "{err}");

    let absent = dir.path().join("absent");
    let (code, err) = run_direct(&[
        "--volume",
        "pg",
        "--mount",
        absent.to_str().unwrap(),
        "--socket",
        &sock,
        "--",
        "true",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("--mkdir"), "{err}");

    let (code, err) = run_direct(&[
        "--volume", "pg", "--mount", "/", "--socket", &sock, "--", "true",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("already a mount point"), "{err}");

    let (code, err) = run_direct(&[
        "--volume",
        "pg",
        "--mount",
        d,
        "--socket",
        &sock,
        "--",
        "no-such-command-bf",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("command not found"), "{err}");

    let (code, err) = run_direct(&[
        "--volume",
        "pg",
        "--mount",
        d,
        "--socket",
        &sock,
        "--mount-options",
        "errors=continue",
        "--",
        "true",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("errors=continue"), "{err}");

    // No command: a usage error.
    let (code, err) = run_direct(&["--volume", "pg", "--mount", d, "--socket", &sock]);
    assert_eq!(code, 2);
    assert!(err.contains("<COMMAND>"), "{err}");

    // None of these took the volume.
    assert_eq!(volume_state(&api), (VolumeState::Free, None));
}

#[test]
fn an_acquire_timeout_is_exit_3_naming_the_holder() {
    let api = TestApi::start(&["pg"]);
    let dir = tempfile::tempdir().unwrap();
    let sock = api.socket().to_str().unwrap().to_string();
    api.block_on(api.client().acquire("pg", "other-pod", Duration::ZERO))
        .expect("acquire");
    let (code, err) = run_direct(&[
        "--volume",
        "pg",
        "--mount",
        dir.path().to_str().unwrap(),
        "--socket",
        &sock,
        "--acquire-timeout",
        "0.3",
        "--",
        "true",
    ]);
    assert_eq!(code, 3);
    assert!(err.contains("other-pod"), "{err}");
    assert_eq!(volume_state(&api).1.as_deref(), Some("other-pod"));
}

#[test]
fn help_explains_the_behaviour_and_exit_codes() {
    let out = run_ok(BIN, &["run", "--help"]).expect("--help");
    for want in [
        "Exit codes:",
        "--stop-timeout",
        "BLOCKFENCE_VOLUME",
        "errors=remount-ro",
        "fences",
    ] {
        assert!(
            out.stdout.contains(want),
            "{want:?} missing from:\n{}",
            out.stdout
        );
    }
}
