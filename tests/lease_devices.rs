//! The on-disk lease on real devices: every simulated node has its own FUSE
//! storage path and its own loop device (`--direct-io=on`) over one shared image,
//! and runs `blockfence lease acquire` as a real process.
//!
//! Needs root, loop devices and FUSE (CI has them); skips with a printed reason
//! otherwise. Timing assertions here are safety bounds ("never before
//! host_dead"), not performance goals; those are in scripts/bench-lease.

mod common;

use common::{require_root_loop_fuse, run_with_timeout, Mode, NodePath, SharedImage};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_blockfence");
/// host_dead at the default parameters (see core::params).
const HOST_DEAD: Duration = Duration::from_millis(9_200);
const RENEW: Duration = Duration::from_millis(1_000);
const POLL: Duration = Duration::from_millis(500);

/// An event line from one `lease acquire` process, stamped on arrival.
#[derive(Debug, Clone)]
struct Seen {
    node: String,
    at: Instant,
    event: Value,
}

impl Seen {
    fn kind(&self) -> &str {
        self.event["event"].as_str().unwrap_or("")
    }
}

/// A running `blockfence lease acquire`.
struct Acquirer {
    node: String,
    child: Child,
}

impl Acquirer {
    fn start(device: &Path, node: &str, events: Sender<Seen>, extra: &[&str]) -> Acquirer {
        let mut child = Command::new(BIN)
            .args(["lease", "acquire"])
            .arg(device)
            .args(["--node", node])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn blockfence lease acquire");
        let stdout = child.stdout.take().expect("piped stdout");
        let name = node.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("{name}: not a JSON line ({e}): {line}"));
                if events
                    .send(Seen {
                        node: name.clone(),
                        at: Instant::now(),
                        event,
                    })
                    .is_err()
                {
                    break;
                }
            }
        });
        Acquirer {
            node: node.to_string(),
            child,
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("signal");
    }

    fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < end, "{} did not exit", self.node);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Acquirer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for the next event of `kind` from `node`; returns it and everything seen before.
fn wait_for(
    rx: &Receiver<Seen>,
    log: &mut Vec<Seen>,
    node: &str,
    kind: &str,
    timeout: Duration,
) -> Seen {
    let end = Instant::now() + timeout;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(seen) => {
                log.push(seen.clone());
                if seen.node == node && seen.kind() == kind {
                    return seen;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!("no {kind} from {node} within {timeout:?}; seen: {log:#?}")
            }
            Err(RecvTimeoutError::Disconnected) => panic!("event channel closed; seen: {log:#?}"),
        }
    }
}

/// The events of every acquirer in a test, in arrival order.
struct Events {
    tx: Sender<Seen>,
    rx: Receiver<Seen>,
    log: Vec<Seen>,
}

impl Events {
    fn new() -> Events {
        let (tx, rx) = channel();
        Events {
            tx,
            rx,
            log: Vec::new(),
        }
    }

    /// Starts `lease acquire` for `node` on its own device.
    fn start(&self, node: &NodePath, extra: &[&str]) -> Acquirer {
        Acquirer::start(node.device(), node.name(), self.tx.clone(), extra)
    }

    fn wait(&mut self, node: &str, kind: &str, timeout: Duration) -> Seen {
        wait_for(&self.rx, &mut self.log, node, kind, timeout)
    }

    /// node 0 acquires, then node 1 starts and reports it is waiting.
    fn holder_and_waiter(
        &mut self,
        c: &Cluster,
        waiter_args: &[&str],
    ) -> (Acquirer, Seen, Acquirer) {
        let a = self.start(&c.nodes[0], &[]);
        let acquired = self.wait(c.nodes[0].name(), "acquired", Duration::from_secs(30));
        let b = self.start(&c.nodes[1], waiter_args);
        self.wait(c.nodes[1].name(), "waiting", Duration::from_secs(30));
        (a, acquired, b)
    }
}

fn format(device: &Path, nodes: &[&str]) {
    let mut cmd = Command::new(BIN);
    cmd.arg("format").arg(device).arg("--force");
    for n in nodes {
        cmd.args(["--node", n]);
    }
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60)).expect("run format");
    assert!(out.status.success(), "format failed: {}", out.stderr);
}

struct Cluster {
    _image: SharedImage,
    nodes: Vec<NodePath>,
}

fn cluster(names: &[&str]) -> Option<Cluster> {
    if !require_root_loop_fuse() {
        return None;
    }
    let image = SharedImage::create(64 << 20).expect("image");
    let nodes: Vec<NodePath> = names
        .iter()
        .map(|n| NodePath::new(&image, n).expect("node path"))
        .collect();
    format(nodes[0].device(), names);
    Some(Cluster {
        _image: image,
        nodes,
    })
}

/// All nodes start `lease acquire` at once, many rounds: in each round exactly
/// one holds at a time; each release hands the lease to a waiting peer; the
/// generations grow.
fn race_rounds(names: &[&str], rounds: usize) {
    let Some(c) = cluster(names) else { return };
    let mut last_generation = 0;
    for round in 0..rounds {
        let (tx, rx) = channel();
        let mut procs: Vec<Acquirer> = c
            .nodes
            .iter()
            .map(|n| Acquirer::start(n.device(), n.name(), tx.clone(), &[]))
            .collect();
        let mut log: Vec<Seen> = Vec::new();
        // Events taken off the channel while waiting for something else.
        let mut early: std::collections::VecDeque<Seen> = Default::default();
        let mut released_at: Option<Instant> = None;
        for _ in 0..names.len() {
            // The next acquired event, from whichever node.
            let seen = loop {
                let s = match early.pop_front() {
                    Some(s) => s,
                    None => {
                        let s = rx
                            .recv_timeout(Duration::from_secs(30))
                            .unwrap_or_else(|e| {
                                panic!("round {round}: nobody acquired ({e}); seen: {log:#?}")
                            });
                        log.push(s.clone());
                        s
                    }
                };
                if s.kind() == "acquired" {
                    break s;
                }
            };
            if let Some(t) = released_at {
                assert!(
                    seen.at >= t,
                    "round {round}: {} acquired before the holder was told to release",
                    seen.node
                );
            }
            let generation = seen.event["generation"].as_u64().expect("generation");
            assert!(
                generation > last_generation,
                "round {round}: generation {generation} after {last_generation}"
            );
            last_generation = generation;
            // Nobody else may acquire while it holds: give them a moment to try
            // (they are polling every 0.5 s), then release it.
            let idx = procs
                .iter()
                .position(|p| p.node == seen.node)
                .expect("known node");
            let deadline = Instant::now() + 2 * POLL;
            while let Ok(s) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                assert_ne!(
                    s.kind(),
                    "acquired",
                    "round {round}: two holders: {} while {} holds; {log:#?}",
                    s.node,
                    seen.node
                );
                log.push(s);
            }
            released_at = Some(Instant::now());
            procs[idx].signal(nix::sys::signal::Signal::SIGTERM);
            // A waiting peer may take over (and say so) before the holder has
            // written its owner copies and printed `released`: keep such
            // events for the next turn.
            let end = Instant::now() + Duration::from_secs(10);
            loop {
                let s = rx
                    .recv_timeout(end.saturating_duration_since(Instant::now()))
                    .unwrap_or_else(|e| panic!("round {round}: no release ({e}); seen: {log:#?}"));
                log.push(s.clone());
                if s.node == seen.node && s.kind() == "released" {
                    break;
                }
                early.push_back(s);
            }
            assert_eq!(
                procs[idx].wait_exit(Duration::from_secs(10)),
                0,
                "exit code after release"
            );
        }
    }
}

#[test]
fn two_nodes_racing_exactly_one_holds_over_many_rounds() {
    race_rounds(&["node-a", "node-b"], 8);
}

#[test]
fn three_nodes_racing_exactly_one_holds_over_many_rounds() {
    race_rounds(&["node-a", "node-b", "node-c"], 5);
}

/// The holder's storage path is cut (EIO), then it is killed: the peer takes
/// over after host_dead, never before.
#[test]
fn a_crashed_holder_is_taken_over_after_host_dead_never_before() {
    let Some(c) = cluster(&["node-a", "node-b"]) else {
        return;
    };
    let mut ev = Events::new();
    let (mut a, _, _b) = ev.holder_and_waiter(&c, &[]);
    // Let a renew a few times, then cut its path and kill it.
    std::thread::sleep(3 * RENEW);
    c.nodes[0].set_mode(Mode::Eio).expect("cut path");
    let cut = Instant::now();
    c.nodes[0].crash(&mut a.child).expect("crash a");
    let seen = ev.wait("node-b", "acquired", HOST_DEAD * 3);
    let took = seen.at - cut;
    // a's last renewal landed at most one renew interval (+ its I/O) before the cut.
    assert!(
        took + RENEW + Duration::from_millis(100) >= HOST_DEAD,
        "node-b took over {took:?} after the cut: sooner than host_dead {HOST_DEAD:?} allows"
    );
    assert!(
        took <= HOST_DEAD + POLL + Duration::from_secs(2),
        "takeover took {took:?}"
    );
}

/// The holder is stopped (SIGSTOP) past host_dead: the peer takes over; when
/// the old holder resumes, its first word is that it lost the lease, and it
/// exits with the lost code without renewing.
#[test]
fn a_stopped_holder_loses_the_lease_and_says_so_when_it_resumes() {
    let Some(c) = cluster(&["node-a", "node-b"]) else {
        return;
    };
    let mut ev = Events::new();
    let (mut a, acquired, _b) = ev.holder_and_waiter(&c, &[]);
    let gen_a = acquired.event["generation"].as_u64().expect("generation");
    a.signal(nix::sys::signal::Signal::SIGSTOP);
    let stopped = Instant::now();
    let seen = ev.wait("node-b", "acquired", HOST_DEAD * 3);
    assert!(
        seen.at - stopped + RENEW + Duration::from_millis(100) >= HOST_DEAD,
        "took over after {:?}",
        seen.at - stopped
    );
    let gen_b = seen.event["generation"].as_u64().expect("generation");
    assert!(gen_b > gen_a);
    let slot_before = inspect_json(c.nodes[1].device());
    a.signal(nix::sys::signal::Signal::SIGCONT);
    let lost = ev.wait("node-a", "lost", Duration::from_secs(10));
    assert_eq!(lost.event["reason"], "expired", "{lost:?}");
    // Nothing from node-a between its acquired and its lost but renewal failures.
    for s in ev
        .log
        .iter()
        .filter(|s| s.node == "node-a" && s.at > acquired.at && s.at < lost.at)
    {
        assert_eq!(
            s.kind(),
            "renew_failed",
            "node-a acted after resuming: {s:?}"
        );
    }
    assert_eq!(a.wait_exit(Duration::from_secs(10)), 4, "lost exit code");
    // node-a did not write its slot again after resuming as holder: b still holds.
    let after = inspect_json(c.nodes[1].device());
    assert_eq!(after["owner"]["holder"], "node-b", "{after}");
    assert_eq!(
        slot_before["owner"]["generation"],
        after["owner"]["generation"]
    );
}

fn inspect_json(device: &Path) -> Value {
    let out = run_with_timeout(
        Command::new(BIN).arg("inspect").arg(device).arg("--json"),
        Duration::from_secs(20),
    )
    .expect("inspect");
    assert!(out.status.success(), "inspect failed: {}", out.stderr);
    serde_json::from_str(&out.stdout).expect("inspect --json prints JSON")
}

/// A holder whose lease is released hands over at once: no host_dead wait.
#[test]
fn a_clean_release_hands_over_without_waiting() {
    let Some(c) = cluster(&["node-a", "node-b"]) else {
        return;
    };
    let mut ev = Events::new();
    let (a, _, _b) = ev.holder_and_waiter(&c, &[]);
    let asked = Instant::now();
    a.signal(nix::sys::signal::Signal::SIGTERM);
    ev.wait("node-a", "released", Duration::from_secs(10));
    let seen = ev.wait("node-b", "acquired", Duration::from_secs(10));
    assert!(
        seen.at - asked < HOST_DEAD / 2,
        "handover took {:?}: that is a host_dead wait",
        seen.at - asked
    );
}

/// `--timeout` gives up with its own exit code while another node holds.
#[test]
fn acquire_times_out_while_another_node_holds() {
    let Some(c) = cluster(&["node-a", "node-b"]) else {
        return;
    };
    let mut ev = Events::new();
    let _a = ev.start(&c.nodes[0], &[]);
    ev.wait("node-a", "acquired", Duration::from_secs(30));
    let mut b = ev.start(&c.nodes[1], &["--timeout", "2"]);
    assert_eq!(
        b.wait_exit(Duration::from_secs(20)),
        3,
        "timed-out exit code"
    );
    while let Ok(s) = ev.rx.try_recv() {
        assert!(!(s.node == "node-b" && s.kind() == "acquired"), "{s:?}");
    }
}

/// A corrupted area (both header copies damaged) is refused with one clear line;
/// one damaged copy is survived.
#[test]
fn a_corrupted_area_is_refused_with_a_clear_error() {
    let Some(c) = cluster(&["node-a"]) else {
        return;
    };
    let dev = c.nodes[0].device();
    let size = common::run_ok(
        "blockdev",
        &["--getsize64", dev.to_str().expect("utf-8 path")],
    )
    .expect("blockdev")
    .stdout
    .trim()
    .parse::<u64>()
    .expect("size");
    let area = (size / (1 << 20)) * (1 << 20) - (1 << 20);
    // Flip one byte inside a header copy (magic intact): a damaged record.
    let damage = |offset: u64| {
        let mut block = common::read_direct(dev, offset, 4096).expect("read header");
        assert_eq!(&block[..4], b"BFHD");
        block[100] ^= 0xff;
        common::write_direct(dev, offset, &block).expect("damage header");
    };
    // Damage copy B only: still usable.
    damage(area + 255 * 4096);
    let ok = inspect_json(dev);
    assert_eq!(ok["header"]["damaged_copy"], "B", "{ok}");
    // Damage copy A too: refused everywhere, one line, exit 1.
    damage(area);
    for args in [vec!["inspect"], vec!["lease", "acquire"]] {
        let mut cmd = Command::new(BIN);
        cmd.args(&args).arg(dev);
        if args.len() == 2 {
            cmd.args(["--node", "node-a", "--timeout", "1"]);
        }
        let out = run_with_timeout(&mut cmd, Duration::from_secs(20)).expect("run");
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{args:?}: one line expected: {}",
            out.stderr
        );
        assert!(
            lines[0].contains("damaged") && lines[0].contains("no intact copy"),
            "{args:?}: {}",
            lines[0]
        );
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
}

/// A takeover from a crashed holder that had the filesystem mounted: with
/// `--mmp-clean` the new holder finds the MMP block in use (the dead node's
/// kmmpd stopped mid-sequence), marks it clean, and can mount at once.
#[test]
fn mmp_clean_after_a_takeover_from_a_crashed_mounted_holder() {
    let Some(c) = cluster(&["node-a", "node-b"]) else {
        return;
    };
    let mut ev = Events::new();
    let mut a = ev.start(&c.nodes[0], &[]);
    ev.wait("node-a", "acquired", Duration::from_secs(30));
    let dir_a = tempfile::tempdir().expect("mount dir");
    let dir_b = tempfile::tempdir().expect("mount dir");
    let dev_a = c.nodes[0].device().to_str().expect("utf-8").to_string();
    common::run_ok("mount", &[&dev_a, dir_a.path().to_str().expect("utf-8")]).expect("mount on a");
    std::fs::write(dir_a.path().join("from-a"), b"written by a").expect("write on a");
    // syncfs of this filesystem only: a plain `sync` would also wait for other
    // tests' filesystems, some on storage paths they stalled on purpose.
    let file = dir_a.path().join("from-a");
    common::run_ok("sync", &["-f", file.to_str().expect("utf-8")]).expect("sync -f");
    // node-a dies with the filesystem mounted: path cut, process killed.
    c.nodes[0].set_mode(Mode::Eio).expect("cut path");
    c.nodes[0].crash(&mut a.child).expect("crash a");
    let (_, mmp) = blockfence::ext4::read_mmp(c.nodes[1].device()).expect("read mmp via b");
    assert!(
        matches!(mmp.state(), blockfence::ext4::MmpState::InUse { .. }),
        "expected an in-use MMP block left by node-a, got {:?}",
        mmp.state()
    );
    let _b = ev.start(&c.nodes[1], &["--mmp-clean"]);
    ev.wait("node-b", "acquired", HOST_DEAD * 3);
    let cleaned = ev.wait("node-b", "mmp_cleaned", Duration::from_secs(10));
    assert_eq!(cleaned.event["previous"]["state"], "in_use", "{cleaned:?}");
    let (_, mmp) = blockfence::ext4::read_mmp(c.nodes[1].device()).expect("read mmp via b");
    assert_eq!(mmp.state(), blockfence::ext4::MmpState::Clean);
    // node-a's dead mount goes away; node-b mounts and sees a's data.
    let _ = common::run_ok("umount", &["-l", dir_a.path().to_str().expect("utf-8")]);
    let dev_b = c.nodes[1].device().to_str().expect("utf-8").to_string();
    common::run_ok("mount", &[&dev_b, dir_b.path().to_str().expect("utf-8")]).expect("mount on b");
    let data = std::fs::read(dir_b.path().join("from-a"));
    let _ = common::run_ok("umount", &[dir_b.path().to_str().expect("utf-8")]);
    assert_eq!(data.expect("a's file on b"), b"written by a");
}

/// The same lease on a 4Kn device (4096-byte logical sectors): format, acquire,
/// hand over on release. Every lease I/O is a 4096-byte aligned block, so it
/// must work unchanged.
#[test]
fn the_lease_works_on_4096_byte_sector_devices() {
    if !require_root_loop_fuse() {
        return;
    }
    let image = SharedImage::create(64 << 20).expect("image");
    let path = image.path().to_str().expect("utf-8").to_string();
    let attach = || {
        let out = common::run_ok(
            "losetup",
            &[
                "--direct-io=on",
                "--sector-size",
                "4096",
                "-f",
                "--show",
                &path,
            ],
        )
        .expect("losetup");
        std::path::PathBuf::from(out.stdout.trim())
    };
    struct Detach(Vec<std::path::PathBuf>);
    impl Drop for Detach {
        fn drop(&mut self) {
            for d in &self.0 {
                let _ = Command::new("losetup").arg("-d").arg(d).status();
            }
        }
    }
    let devs = Detach(vec![attach(), attach()]);
    let ssz = common::run_ok("blockdev", &["--getss", devs.0[0].to_str().expect("utf-8")])
        .expect("blockdev");
    assert_eq!(ssz.stdout.trim(), "4096");
    format(&devs.0[0], &["node-a", "node-b"]);
    let mut ev = Events::new();
    let a = Acquirer::start(&devs.0[0], "node-a", ev.tx.clone(), &[]);
    let first = ev.wait("node-a", "acquired", Duration::from_secs(30));
    let _b = Acquirer::start(&devs.0[1], "node-b", ev.tx.clone(), &[]);
    ev.wait("node-b", "waiting", Duration::from_secs(30));
    a.signal(nix::sys::signal::Signal::SIGTERM);
    ev.wait("node-a", "released", Duration::from_secs(10));
    let second = ev.wait("node-b", "acquired", Duration::from_secs(10));
    assert!(second.event["generation"].as_u64() > first.event["generation"].as_u64());
    let v = inspect_json(&devs.0[1]);
    assert_eq!(v["header"]["logical_sector"], 4096, "{v}");
}
