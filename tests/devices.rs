//! Device discovery, path health, the stale-I/O guard and device events, on
//! the sysfs fixtures (tests/fixtures/sysfs/<case>, made by make.py there),
//! the recorded uevent sequences (tests/fixtures/uevents), and real loop
//! devices.
//!
//! The live monitor test needs root and loop devices (else it prints why and
//! passes; `BLOCKFENCE_REQUIRE_DEVICES=1` makes that a failure). On this
//! project's machines no udev daemon runs, so the monitor uses its fallback,
//! the kernel uevent netlink socket, and that is the path the test exercises
//! (it says which source ran). The reservation takeover against the fake
//! namespace is tested beside the code (src/nvme/ops.rs, src/core/reservation.rs).

mod common;

use blockfence::core::params::Params;
use blockfence::device::discovery::{self, Tmo, Volume};
use blockfence::device::guard::{self, Decision, Lifetime, Policy};
use blockfence::device::health::{usable, PathTracker};
use blockfence::device::monitor::{Monitor, Options, Source};
use blockfence::device::uevent::{classify, parse_fixture};
use blockfence::device::{AnaState, Change, CtrlState, DeviceEvent};
use common::{require_root_loop, run_with_timeout, Scratch, COMMAND_TIMEOUT};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sysfs")
        .join(case)
}

fn only_namespace(case: &str) -> discovery::Namespace {
    let mut v = discovery::scan(&fixture(case)).expect("scan fixture");
    assert_eq!(v.len(), 1, "{case}: {v:?}");
    v.remove(0)
}

#[test]
fn single_controller_namespace_without_native_multipath() {
    let ns = only_namespace("single-path");
    assert_eq!(ns.name, "nvme0n1");
    assert_eq!(ns.dev_node, PathBuf::from("/dev/nvme0n1"));
    assert_eq!(ns.major_minor, (259, 0));
    assert_eq!(ns.size_bytes, 10 << 30);
    assert!(!ns.multipath);
    assert_eq!(ns.paths.len(), 1);
    let p = &ns.paths[0];
    assert_eq!(
        (p.controller.as_str(), p.path_device.as_deref()),
        ("nvme0", None)
    );
    assert_eq!(p.state, CtrlState::Live);
    assert_eq!(p.transport, "tcp");
    assert_eq!(p.timeouts.kato_s, Some(5));
    assert_eq!(p.timeouts.ctrl_loss_tmo, Tmo::Seconds(600));
    assert_eq!(p.timeouts.fast_io_fail_tmo, Tmo::Off);
    assert_eq!(ns.io_timeout_ms, 30_000);
    assert!(usable(&ns.paths));
    assert_eq!(ns.volume_uuid, None);
    assert!(!ns.lightbits);
}

#[test]
fn multipath_paths_carry_their_ana_states() {
    let ns = only_namespace("multipath-ana");
    assert!(ns.multipath);
    let states: Vec<_> = ns
        .paths
        .iter()
        .map(|p| {
            (
                p.controller.as_str(),
                p.path_device.as_deref(),
                p.ana_state.clone(),
                p.ana_group,
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            (
                "nvme0",
                Some("nvme0c0n1"),
                Some(AnaState::Optimized),
                Some(1)
            ),
            (
                "nvme1",
                Some("nvme0c1n1"),
                Some(AnaState::NonOptimized),
                Some(2)
            ),
            (
                "nvme2",
                Some("nvme0c2n1"),
                Some(AnaState::Inaccessible),
                Some(3)
            ),
        ]
    );
    assert_eq!(ns.iopolicy.as_deref(), Some("numa"));
    assert!(usable(&ns.paths));
    assert!(!usable(&ns.paths[2..]));
}

#[test]
fn lightbits_volume_is_recognised_and_resolved_by_its_uuid() {
    let root = fixture("lightbits");
    let ns = only_namespace("lightbits");
    assert!(ns.lightbits);
    let vol = "5f1c3e2a-8b7d-4c6e-9a1b-2d3e4f5a6b7c";
    assert_eq!(ns.volume_uuid.as_deref(), Some(vol));
    assert_eq!(ns.model.as_deref(), Some("Lightbits LightOS"));
    assert!(ns
        .subsysnqn
        .as_deref()
        .unwrap()
        .starts_with(discovery::LIGHTBITS_NQN_PREFIX));
    assert_eq!(ns.paths.len(), 3);
    assert!(ns
        .paths
        .iter()
        .all(|p| p.timeouts.ctrl_loss_tmo == Tmo::Off));
    for id in [
        vol,
        "5F1C3E2A8B7D4C6E9A1B2D3E4F5A6B7C",
        "uuid.5f1c3e2a-8b7d-4c6e-9a1b-2d3e4f5a6b7c",
        "/dev/nvme0n1",
        "nvme0n1",
    ] {
        match discovery::resolve(&root, id).unwrap() {
            Some(Volume::Nvme(n)) => assert_eq!(n.name, "nvme0n1", "{id}"),
            other => panic!("{id}: {other:?}"),
        }
    }
    assert_eq!(discovery::resolve(&root, "5f1c3e2a-0000").unwrap(), None);
    assert_eq!(discovery::resolve(&root, "").unwrap(), None);
}

#[test]
fn loop_devices_are_read_through_the_same_sysfs_code() {
    let root = fixture("no-nvme");
    assert!(discovery::scan(&root).unwrap().is_empty());
    match discovery::resolve(&root, "/dev/loop0").unwrap() {
        Some(Volume::Block(b)) => {
            assert_eq!(b.major_minor, Some((7, 0)));
            assert_eq!(b.size_bytes, 512 << 20);
            assert_eq!(
                b.loop_backing_file,
                Some(PathBuf::from("/var/lib/blockfence/shared.img"))
            );
            assert!(!b.read_only);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_reconnecting_namespace_has_no_usable_path_and_the_tracker_says_so() {
    let healthy = only_namespace("multipath-ana");
    let down = only_namespace("reconnecting");
    assert_eq!(down.paths[0].state, CtrlState::Connecting);
    assert_eq!(down.paths[1].state, CtrlState::Resetting);
    assert!(!usable(&down.paths));
    let mut t = PathTracker::new();
    assert!(t
        .observe("nvme0n1", &healthy.paths)
        .iter()
        .all(|e| matches!(e, DeviceEvent::PathDown { controller, .. } if controller == "nvme2")));
    let ev = t.observe("nvme0n1", &down.paths);
    assert_eq!(
        ev.last(),
        Some(&DeviceEvent::LastPathLost {
            namespace: "nvme0n1".into()
        }),
        "{ev:?}"
    );
    let ev = t.observe("nvme0n1", &healthy.paths);
    assert!(
        ev.contains(&DeviceEvent::PathUp {
            namespace: "nvme0n1".into(),
            controller: "nvme0".into()
        }),
        "{ev:?}"
    );
}

#[test]
fn guard_verdicts_per_fixture() {
    let p = Params::default();
    let cases = [
        ("single-path", false),
        ("multipath-ana", true),
        ("lightbits", false),
        ("reconnecting", false),
        ("timeouts-unsafe", false),
        ("timeouts-safe", false),
    ];
    for (case, pass) in cases {
        let v = guard::evaluate(&only_namespace(case), &p);
        assert_eq!(v.pass, pass, "{case}: {v:#?}");
        assert_eq!(v.budget_ms, 1_027);
        assert_eq!(
            v.fixes.is_empty(),
            pass,
            "{case}: a failure always comes with a fix"
        );
    }
    let v = guard::evaluate(&only_namespace("lightbits"), &p);
    assert_eq!(v.lifetime_ms, None);
    assert!(v.paths.iter().all(|x| x.lifetime == Lifetime::Unbounded));
    assert!(v.fixes.iter().any(|f| f == "echo 0 > /sys/class/nvme/nvme0/fast_io_fail_tmo   # now, until the controller is re-created"), "{:?}", v.fixes);
    assert!(v.fixes.iter().any(|f| f.contains("--fast_io_fail_tmo=0")));
    let v = guard::evaluate(&only_namespace("timeouts-unsafe"), &p);
    assert_eq!(v.paths[0].lifetime.ms(), Some(610_000));
    assert_eq!(v.paths[1].lifetime, Lifetime::Unbounded);
    // The safe timeouts (kato 1, fast_io_fail_tmo 0) pass once the lease
    // parameters leave 2 s for detection, as the fix says.
    let v = guard::evaluate(&only_namespace("timeouts-safe"), &p);
    assert!(
        v.fixes.iter().any(|f| f.contains("--io-timeout-ms 2000")),
        "{:?}",
        v.fixes
    );
    let bigger = Params {
        io_timeout_ms: 2_000,
        ..p
    };
    assert!(guard::evaluate(&only_namespace("timeouts-safe"), &bigger).pass);
}

/// A writable copy of a fixture (symlinks kept relative).
fn copy_fixture(case: &str, scratch: &Scratch) -> PathBuf {
    let dst = scratch.path().join(case);
    let out = run_with_timeout(
        Command::new("cp").arg("-a").arg(fixture(case)).arg(&dst),
        COMMAND_TIMEOUT,
    )
    .expect("cp");
    assert!(out.status.success(), "cp -a: {}", out.stderr);
    dst
}

#[test]
fn set_fast_io_fail_policy_writes_the_attribute_and_rechecks() {
    let scratch = Scratch::new("guard-");
    let root = copy_fixture("timeouts-unsafe", &scratch);
    let read = |c: &str| {
        std::fs::read_to_string(root.join("class/nvme").join(c).join("fast_io_fail_tmo")).unwrap()
    };

    // Refuse and Warn change nothing.
    let d = guard::enforce(&root, "nvme0n1", &Params::default(), Policy::Refuse).unwrap();
    assert!(
        matches!(d, Decision::Refused { ref applied, .. } if applied.is_empty()),
        "{d:?}"
    );
    assert!(matches!(
        guard::enforce(&root, "nvme0n1", &Params::default(), Policy::Warn).unwrap(),
        Decision::Warned { .. }
    ));
    assert_eq!(read("nvme0").trim(), "off");

    // With default parameters even fast_io_fail_tmo=0 leaves 10 s of
    // detection (kato 5): written, re-checked, still refused.
    let d = guard::enforce(&root, "nvme0n1", &Params::default(), Policy::SetFastIoFail).unwrap();
    match d {
        Decision::Refused { applied, verdict } => {
            assert_eq!(
                applied,
                vec![("nvme0".to_owned(), 0), ("nvme1".to_owned(), 0)]
            );
            assert_eq!(verdict.lifetime_ms, Some(10_000));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(read("nvme0"), "0");
    assert_eq!(read("nvme1"), "0");

    // With parameters that leave room for detection, a fresh copy passes
    // after the write.
    let root2 = copy_fixture("single-path", &scratch);
    let p = guard::params_covering(&Params::default(), 12_000).unwrap();
    match guard::enforce(&root2, "nvme0n1", &p, Policy::SetFastIoFail).unwrap() {
        Decision::Proceed { applied, verdict } => {
            assert_eq!(applied.len(), 1);
            assert!(verdict.pass);
            let s = applied[0].1;
            assert_eq!(
                std::fs::read_to_string(root2.join("class/nvme/nvme0/fast_io_fail_tmo")).unwrap(),
                s.to_string()
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn recorded_loop_uevents_replay_through_the_live_parser() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/uevents/loop-attach-resize-detach.txt"),
    )
    .unwrap();
    let events: Vec<_> = parse_fixture(&text).iter().filter_map(classify).collect();
    let changed = |change| DeviceEvent::Changed {
        name: "loop0".into(),
        change,
    };
    assert_eq!(
        events,
        vec![
            changed(Change::Other),
            changed(Change::Resized),
            changed(Change::Other),
            changed(Change::Media)
        ]
    );
}

#[test]
fn nvme_uevent_sequence_classifies_and_ignores_noise() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/uevents/nvme-path-loss.txt"),
    )
    .unwrap();
    let events: Vec<_> = parse_fixture(&text).iter().filter_map(classify).collect();
    assert_eq!(
        events,
        vec![
            DeviceEvent::Controller {
                name: "nvme1".into(),
                detail: "change NVME_EVENT=connected NVME_TRTYPE=tcp".into()
            },
            DeviceEvent::Controller {
                name: "nvme1".into(),
                detail: "path nvme0c1n1 remove".into()
            },
            DeviceEvent::Controller {
                name: "nvme1".into(),
                detail: "remove".into()
            },
            DeviceEvent::Changed {
                name: "nvme0n1".into(),
                change: Change::Resized
            },
            DeviceEvent::Removed {
                name: "nvme0n1".into()
            },
        ]
    );
}

/// Waits for the first event `want` accepts, up to a generous bound; events
/// about other devices (other tests attach loop devices too) are skipped.
fn wait_for(
    rx: &Receiver<DeviceEvent>,
    what: &str,
    want: impl Fn(&DeviceEvent) -> bool,
) -> DeviceEvent {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(e) if want(&e) => return e,
            Ok(_) => continue,
            Err(e) => panic!("no {what} event: {e}"),
        }
    }
}

fn losetup(args: &[&str]) -> String {
    let out =
        run_with_timeout(Command::new("losetup").args(args), COMMAND_TIMEOUT).expect("run losetup");
    assert!(out.status.success(), "losetup {args:?}: {}", out.stderr);
    out.stdout.trim().to_owned()
}

#[test]
fn live_monitor_sees_loop_attach_resize_and_detach() {
    if !require_root_loop() {
        return;
    }
    let source = Source::detect();
    eprintln!(
        "device monitor source: {source:?} ({})",
        if source == Source::Kernel {
            "no udev daemon: the kernel uevent fallback is what this test exercises"
        } else {
            "udev daemon running"
        }
    );
    let scratch = Scratch::new("monitor-");
    let image = scratch.image("mon.img", 64 << 20);
    let (tx, rx) = channel();
    let opts = Options {
        watch_paths: false,
        ..Options::default()
    };
    let monitor = Monitor::spawn(opts, tx).expect("start the device monitor");
    assert_eq!(monitor.source(), source);

    let dev = attach(&image);
    let name = dev.strip_prefix("/dev/").unwrap().to_owned();
    let detach = scopeguard(dev.clone());
    let ours = |e: &DeviceEvent| match e {
        DeviceEvent::Changed { name: n, .. }
        | DeviceEvent::Added { name: n, .. }
        | DeviceEvent::Removed { name: n } => *n == name,
        _ => false,
    };
    let ev = wait_for(&rx, "attach", |e| ours(e));
    eprintln!("attach: {ev:?}");

    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    losetup(&["-c", &dev]);
    wait_for(&rx, "resize", |e| {
        ours(e)
            && matches!(
                e,
                DeviceEvent::Changed {
                    change: Change::Resized,
                    ..
                }
            )
    });
    let size = discovery::read_block(Path::new("/sys"), &name)
        .unwrap()
        .size_bytes;
    assert_eq!(size, 128 << 20);

    drop(detach);
    // Detach is a change event (DISK_MEDIA_CHANGE=1 on recent kernels, see
    // the recorded fixture); after it the device has no capacity.
    let ev = wait_for(&rx, "detach", |e| ours(e));
    eprintln!("detach: {ev:?}");
    assert_eq!(
        discovery::read_block(Path::new("/sys"), &name)
            .unwrap()
            .size_bytes,
        0
    );
    monitor.stop();
}

/// `losetup -f --show IMAGE`, retried: other test processes attach at the
/// same time and `-f` may lose the race for a free device.
fn attach(image: &Path) -> String {
    let mut last = String::new();
    for _ in 0..10 {
        let out = run_with_timeout(
            Command::new("losetup").args(["-f", "--show"]).arg(image),
            COMMAND_TIMEOUT,
        )
        .expect("run losetup");
        if out.status.success() {
            return out.stdout.trim().to_owned();
        }
        last = out.stderr;
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("cannot attach a loop device to {}: {last}", image.display());
}

/// Detaches the loop device when dropped (also when the test panics).
struct Detach(String);

fn scopeguard(dev: String) -> Detach {
    Detach(dev)
}

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = run_with_timeout(
            Command::new("losetup").args(["-d", &self.0]),
            COMMAND_TIMEOUT,
        );
    }
}

#[test]
fn monitor_path_watch_reports_the_last_path_lost_from_sysfs() {
    let (tx, rx) = channel();
    let opts = Options {
        source: Some(Source::Kernel),
        sysfs_root: fixture("reconnecting"),
        watch_paths: true,
        path_poll: Duration::from_millis(50),
    };
    let monitor = Monitor::spawn(opts, tx).expect("start the device monitor");
    let ev = wait_for(&rx, "LastPathLost", |e| {
        matches!(e, DeviceEvent::LastPathLost { .. })
    });
    assert_eq!(
        ev,
        DeviceEvent::LastPathLost {
            namespace: "nvme0n1".into()
        }
    );
    monitor.stop();
}

#[test]
fn udev_source_starts_and_stops_even_without_a_udev_daemon() {
    // libudev disables a "udev" monitor when no daemon runs: it starts and
    // stays silent. With a daemon, this is the source the daemon would use.
    let (tx, _rx) = channel();
    let opts = Options {
        source: Some(Source::Udev),
        watch_paths: false,
        ..Options::default()
    };
    let monitor = Monitor::spawn(opts, tx).expect("start the udev monitor");
    assert_eq!(monitor.source(), Source::Udev);
    monitor.stop();
}
