//! The demo harness and its watchdog emulator, end to end.
//!
//! - `watchdog_emu_*`: `blockfence-watchdog-emu` on a real FIFO (no root
//!   needed): a writer that closes without `V` and a second writer that feeds
//!   after it, then silence -> the reset command runs once, exit 3; a writer
//!   that ends with `V` disarms it, exit 0, and the command never runs.
//! - `demo_quick`: runs `scripts/demo.sh --quick` (two simulated nodes, real
//!   PostgreSQL, a hard kill of the active node) and fails if the script
//!   reports a lost acknowledged row or a moment when two nodes could write.
//!   Needs root, loop devices, FUSE, cgroup v2 and PostgreSQL 15; skipped
//!   otherwise unless `BLOCKFENCE_REQUIRE_DEVICES=1`. Takes about 20 s
//!   (the takeover waits out host_dead, 9.2 s).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

const EMU_BIN: &str = env!("CARGO_BIN_EXE_blockfence-watchdog-emu");

/// Starts the emulator and waits for its READY line (the FIFO is open).
fn start_emu(
    fifo: &Path,
    timeout_ms: u64,
    on_expire: &str,
) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(EMU_BIN)
        .arg("--path")
        .arg(fifo)
        .arg("--timeout-ms")
        .arg(timeout_ms.to_string())
        .arg("--on-expire")
        .arg(on_expire)
        .arg("--node")
        .arg("node-t")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn blockfence-watchdog-emu");
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read READY");
    assert!(line.starts_with("READY path="), "first line: {line:?}");
    (child, out)
}

fn json_lines(out: BufReader<std::process::ChildStdout>) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(&l.expect("read line")).expect("a JSON line"))
        .collect()
}

#[test]
fn watchdog_emu_fires_after_silence_across_writer_reopens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("watchdog");
    let marker = dir.path().join("reset");
    let on_expire = format!("echo reset >> '{}'", marker.display());
    let (mut child, out) = start_emu(&fifo, 300, &on_expire);
    // First writer: feeds, closes without the magic character.
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .expect("open FIFO");
    w.write_all(b"..").expect("feed");
    drop(w);
    // Second writer (a restarted daemon) feeds again, then goes silent
    // without closing; the emulator must not treat it as disarmed.
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .expect("reopen FIFO");
    w.write_all(b".").expect("feed");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(3), "expired exit code");
    let lines = json_lines(out);
    assert_eq!(lines[0]["event"], "expired", "{lines:?}");
    assert_eq!(lines[0]["feeds"], 3, "{lines:?}");
    assert!(lines[0]["silent_ms"].as_u64().expect("silent_ms") >= 300);
    assert_eq!(lines[1]["event"], "reset_done", "{lines:?}");
    assert_eq!(lines[1]["status"], 0, "{lines:?}");
    let resets = std::fs::read_to_string(&marker).expect("the reset command ran");
    assert_eq!(resets, "reset\n", "ran exactly once");
    drop(w);
}

#[test]
fn watchdog_emu_magic_close_disarms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("watchdog");
    let marker = dir.path().join("reset");
    let on_expire = format!("echo reset >> '{}'", marker.display());
    let (mut child, out) = start_emu(&fifo, 200, &on_expire);
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .expect("open FIFO");
    w.write_all(b"...").expect("feed");
    w.write_all(b"V").expect("magic close");
    drop(w);
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "disarmed exit code");
    let lines = json_lines(out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["event"], "disarmed");
    assert_eq!(lines[0]["feeds"], 4);
    assert!(!marker.exists(), "a disarmed watchdog must not reset");
}

/// Whether the facilities the demo needs are here; prints why not.
fn demo_facilities() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not root".into());
    }
    for p in [
        "/dev/fuse",
        "/dev/loop-control",
        "/usr/lib/postgresql/15/bin/postgres",
    ] {
        if !Path::new(p).exists() {
            return Err(format!("{p} missing"));
        }
    }
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        || Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists();
    if !v2 {
        return Err("no cgroup v2 hierarchy".into());
    }
    Ok(())
}

#[test]
fn demo_quick() {
    if let Err(why) = demo_facilities() {
        if std::env::var("BLOCKFENCE_REQUIRE_DEVICES").as_deref() == Ok("1") {
            panic!("demo_quick cannot run: {why}");
        }
        eprintln!("skipping demo_quick: {why}");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin_dir = Path::new(EMU_BIN).parent().expect("target dir");
    let mut child = Command::new("bash")
        .arg(root.join("scripts/demo.sh"))
        .arg("--quick")
        .env("BF_BIN_DIR", bin_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run scripts/demo.sh");
    let out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut text = String::new();
    for line in out.lines() {
        let line = line.expect("read demo output");
        println!("{line}");
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait().expect("wait for demo.sh");
    // The script's verdict lines, machine-readable.
    let find = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
    };
    let acked = find("RESULT acked=").expect("the demo printed RESULT acked=");
    let lost = find("RESULT lost=").expect("the demo printed RESULT lost=");
    let double = find("RESULT double_writer_samples=")
        .expect("the demo printed RESULT double_writer_samples=");
    let after =
        find("RESULT acked_after_fault=").expect("the demo printed RESULT acked_after_fault=");
    assert!(acked > 0, "no insert was acknowledged at all");
    assert!(
        after > 0,
        "no insert was acknowledged after the fault: no takeover"
    );
    assert_eq!(lost, 0, "acknowledged rows lost");
    assert_eq!(double, 0, "moments when two nodes could write");
    assert!(status.success(), "demo.sh failed: {status}");
}
