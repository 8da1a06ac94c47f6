//! The daemon's device layer on real loop devices: path loss fences at once,
//! volumes named by id, the stale-I/O guard's policy, and the NVMe
//! reservation beside the lease (on `nvme::fake`).
//!
//! There is no NVMe here, so NVMe volumes are a fixture sysfs tree
//! (tests/fixtures/sysfs, copied so a test can change a controller's state)
//! whose namespace `nvme0n1` is a symlink in a scratch `--dev-dir` to a real
//! loop device: the guard, the path tracker and id resolution read the
//! fixture, the lease runs on the loop device. The daemon's real device
//! monitor polls the copy's paths, so a controller set to `connecting` in
//! the copy is what a lost NVMe/TCP path looks like to it.
//!
//! Each check is on the order of events (the Fencing event's reason says
//! whether the path loss or the lease's expiry fenced), never a duration.
//! Needs root and loop devices; skips with a printed reason otherwise
//! (`BLOCKFENCE_REQUIRE_DEVICES=1` fails instead).

mod common;

use common::daemon_kit::{format_for_two, http, next_event, Loop};

use blockfence::api::{VolumeEvent, VolumeEventKind};
use blockfence::core::reservation::{Input as ResvInput, Key, Reservation, ResvStatus, ResvType};
use blockfence::daemon::config::{DaemonConfig, DeviceOptions, ParamOverrides, Policy, VolumeSpec};
use blockfence::daemon::devices::ReservationOpener;
use blockfence::daemon::Daemon;
use blockfence::device::DeviceEvent;
use blockfence::fence::device::DeviceOps;
use blockfence::nvme::fake::FakeNamespace;
use blockfence::nvme::ops::{self, ReservationOps, Reservations};
use blockfence::nvme::reservation::{key_for_node, AcquireAction, RegisterAction, ReleaseAction};
use blockfence::nvme::NvmeError;
use common::{require_root_loop, run_ok, Scratch};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const IMAGE_SIZE: u64 = 64 << 20;
/// The id of the fixtures' namespace nvme0n1.
const NS_ID: &str = "eui.00a0b1c2d3e4f501";

/// Lease parameters whose stale-I/O budget (2057 ms) covers the
/// `timeouts-safe` fixture (kato 1 s, fast_io_fail_tmo 0: 2000 ms) and not
/// `timeouts-unsafe`; the lease (3 s) outlives any path-loss fence by far.
const PARAMS: ParamOverrides = ParamOverrides {
    io_timeout_ms: Some(2_000),
    renew_interval_ms: Some(500),
    lease_timeout_ms: Some(3_000),
    fence_timeout_ms: Some(3_000),
};

/// A formatted loop device and, for NVMe cases, a copy of a sysfs fixture
/// with a dev dir whose `nvme0n1` is the loop device.
struct Setup {
    scratch: Scratch,
    dev: Loop,
    sysfs: PathBuf,
    dev_dir: PathBuf,
}

impl Setup {
    fn new(prefix: &str, fixture: Option<&str>) -> Setup {
        let scratch = Scratch::new(prefix);
        let image = scratch.image("shared.img", IMAGE_SIZE);
        let dev = Loop::attach(&image);
        format_for_two(&dev.0);
        let (sysfs, dev_dir) = match fixture {
            Some(case) => {
                let from = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/sysfs")
                    .join(case);
                let sysfs = scratch.path().join("sys");
                run_ok(
                    "cp",
                    &["-a", from.to_str().unwrap(), sysfs.to_str().unwrap()],
                )
                .expect("copy the fixture");
                let dev_dir = scratch.path().join("dev");
                std::fs::create_dir(&dev_dir).unwrap();
                std::os::unix::fs::symlink(&dev.0, dev_dir.join("nvme0n1")).unwrap();
                (sysfs, dev_dir)
            }
            None => (PathBuf::from("/sys"), PathBuf::from("/dev")),
        };
        Setup {
            scratch,
            dev,
            sysfs,
            dev_dir,
        }
    }

    fn socket(&self) -> PathBuf {
        self.scratch.path().join("a.sock")
    }

    fn config(&self, device: &str, policy: Policy) -> DaemonConfig {
        DaemonConfig {
            node_name: "node-a".into(),
            socket: self.socket(),
            listen: None,
            volumes: vec![VolumeSpec {
                name: "pg".into(),
                device: PathBuf::from(device),
            }],
            watchdog: None,
            watchdog_timeout: None,
            session_timeout: Duration::from_secs(20),
            stop_timeout: Duration::from_secs(3),
            handover_hold_off: Duration::from_secs(2),
            params: PARAMS,
            devices: DeviceOptions {
                sysfs_root: self.sysfs.clone(),
                dev_dir: self.dev_dir.clone(),
                stale_io_policy: policy,
            },
        }
    }

    /// Sets every controller of the fixture copy to `state`.
    fn set_controllers(&self, state: &str) {
        let ctl = self.sysfs.join("devices/virtual/nvme-fabrics/ctl");
        for c in std::fs::read_dir(&ctl).unwrap() {
            std::fs::write(c.unwrap().path().join("state"), format!("{state}\n")).unwrap();
        }
    }
}

/// Reservation commands on one host of a fake namespace (`refuse`: every
/// Acquire fails, as a target that will not grant it).
struct FakeOpener {
    ns: FakeNamespace,
    host: u8,
    refuse: bool,
}

impl ReservationOpener for FakeOpener {
    fn open(
        &self,
        _volume: &str,
        _namespace: &str,
        _device: &Path,
    ) -> Result<Box<dyn ReservationOps + Send>, String> {
        let ops = Reservations::new(self.ns.host(self.host));
        Ok(if self.refuse {
            Box::new(Refusing(ops))
        } else {
            Box::new(ops)
        })
    }
}

/// Reservation commands whose Acquire always fails.
struct Refusing(Reservations<blockfence::nvme::fake::FakeHost>);

impl ReservationOps for Refusing {
    fn support(&mut self) -> Result<blockfence::nvme::reservation::Support, NvmeError> {
        self.0.support()
    }
    fn register(
        &mut self,
        action: RegisterAction,
        iekey: bool,
        crkey: Key,
        nrkey: Key,
    ) -> Result<(), NvmeError> {
        self.0.register(action, iekey, crkey, nrkey)
    }
    fn acquire(
        &mut self,
        _action: AcquireAction,
        _rtype: ResvType,
        _crkey: Key,
        _prkey: Key,
    ) -> Result<(), NvmeError> {
        Err(NvmeError::Malformed {
            command: "acquire",
            detail: "the test target refuses".into(),
        })
    }
    fn release(
        &mut self,
        action: ReleaseAction,
        rtype: ResvType,
        crkey: Key,
    ) -> Result<(), NvmeError> {
        self.0.release(action, rtype, crkey)
    }
    fn report(&mut self) -> Result<ResvStatus, NvmeError> {
        self.0.report()
    }
}

async fn start(cfg: DaemonConfig, ns: &FakeNamespace) -> Daemon {
    start_opener(cfg, ns, false).await
}

async fn start_opener(cfg: DaemonConfig, ns: &FakeNamespace, refuse: bool) -> Daemon {
    Daemon::start_full(
        cfg,
        Arc::new(DeviceOps),
        Arc::new(FakeOpener {
            ns: ns.clone(),
            host: 1,
            refuse,
        }),
    )
    .await
    .expect("daemon starts")
}

/// One HTTP/1.1 request over a Unix socket: (status, JSON body).
async fn acquire(socket: &Path, holder: &str) -> (u16, Value) {
    let (socket, holder) = (socket.to_path_buf(), holder.to_string());
    tokio::task::spawn_blocking(move || {
        http(
            &socket,
            "POST",
            "/v1/volumes/pg/acquire",
            Some(serde_json::json!({"holder": holder, "timeout_seconds": 5.0})),
        )
    })
    .await
    .expect("no panic")
}

async fn release(socket: &Path, session: &str) -> (u16, Value) {
    let (socket, session) = (socket.to_path_buf(), session.to_string());
    tokio::task::spawn_blocking(move || {
        http(
            &socket,
            "POST",
            "/v1/volumes/pg/release",
            Some(serde_json::json!({"session": session})),
        )
    })
    .await
    .expect("no panic")
}

/// The reason of the next Fencing event.
async fn fencing_reason(rx: &mut tokio::sync::broadcast::Receiver<VolumeEvent>) -> String {
    match next_event(rx, |k| matches!(k, VolumeEventKind::Fencing { .. }))
        .await
        .1
    {
        VolumeEventKind::Fencing { reason, .. } => reason,
        _ => unreachable!("picked above"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nvme_volume_by_id_that_loses_its_last_path_is_fenced_at_once() {
    if !require_root_loop() {
        return;
    }
    let s = Setup::new("dd-path", Some("timeouts-safe"));
    // Reservations unsupported: the disk lease alone, and grants still work.
    let ns = FakeNamespace::new(false);
    let d = start(s.config(NS_ID, Policy::Refuse), &ns).await;
    let mut events = d.subscribe("pg").unwrap();
    let (status, grant) = acquire(&s.socket(), "pg-0").await;
    assert_eq!(status, 200, "{grant}");
    assert_eq!(
        grant["device"],
        s.dev_dir.join("nvme0n1").to_str().unwrap(),
        "resolved by id to the namespace's node"
    );
    // Both controllers start reconnecting: the namespace has no usable path.
    s.set_controllers("connecting");
    let lost = next_event(&mut events, |k| {
        matches!(k, VolumeEventKind::PathLost { .. })
    })
    .await
    .1;
    assert!(
        matches!(&lost, VolumeEventKind::PathLost { reason } if reason.contains("nvme0n1")),
        "{lost:?}"
    );
    assert_eq!(fencing_reason(&mut events).await, "path_lost");
    let ended = next_event(&mut events, |k| matches!(k, VolumeEventKind::Fenced { .. }))
        .await
        .1;
    assert!(matches!(ended, VolumeEventKind::Fenced { ok: true, .. }));
    // Nothing is granted while the path is lost, and the refusal says why.
    let (status, body) = acquire(&s.socket(), "pg-1").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("no usable path"),
        "{body}"
    );
    // The path comes back: acquires are served again.
    s.set_controllers("live");
    next_event(&mut events, |k| matches!(k, VolumeEventKind::PathBack {})).await;
    let mut served = None;
    for _ in 0..50 {
        let (status, body) = acquire(&s.socket(), "pg-2").await;
        if status == 200 {
            served = Some(body);
            break;
        }
        assert_eq!(status, 503, "{body}");
        // Polling the API (the path's return has no API event to wait on).
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let grant = served.expect("granted again once the path is back");
    let (status, body) = release(&s.socket(), grant["session"].as_str().unwrap()).await;
    assert_eq!(status, 200, "{body}");
    d.shutdown().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_loop_device_fences_its_holder_before_the_lease_runs_out() {
    if !require_root_loop() {
        return;
    }
    let s = Setup::new("dd-loop", None);
    let ns = FakeNamespace::new(true);
    let d = start(s.config(s.dev.0.to_str().unwrap(), Policy::Refuse), &ns).await;
    let mut events = d.subscribe("pg").unwrap();
    let (status, grant) = acquire(&s.socket(), "pg-0").await;
    assert_eq!(status, 200, "{grant}");
    // Not NVMe: no reservation is taken.
    assert_eq!(ns.status().holder_key(), None);
    // The kernel defers the detach of an open loop device until its last
    // close, so the removal it would then announce is fed in directly.
    let name = s.dev.0.file_name().unwrap().to_str().unwrap().to_string();
    d.inject_device_event(DeviceEvent::Removed {
        name: "loop999999".into(),
    });
    d.inject_device_event(DeviceEvent::Removed { name });
    // Fenced for the path, not for the lease (3 s, renewing fine).
    assert_eq!(fencing_reason(&mut events).await, "path_lost");
    let (status, body) = acquire(&s.socket(), "pg-1").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("removed"),
        "{body}"
    );
    d.shutdown().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stale_io_guard_refuses_an_unsafe_namespace_with_the_fix() {
    if !require_root_loop() {
        return;
    }
    let ns = FakeNamespace::new(false);
    // refuse: 503 naming the fix, and no lease taken.
    let s = Setup::new("dd-guard", Some("timeouts-unsafe"));
    let d = start(s.config(NS_ID, Policy::Refuse), &ns).await;
    let (status, body) = acquire(&s.socket(), "pg-0").await;
    assert_eq!(status, 503, "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains("stale-I/O guard"), "{msg}");
    assert!(msg.contains("fast_io_fail_tmo"), "{msg}");
    d.shutdown().await.expect("stops");
    // set-fast-io-fail: the fix is written to the controllers (then the
    // detection time alone, kato 5 s, still exceeds the budget: refused).
    let d = start(s.config(NS_ID, Policy::SetFastIoFail), &ns).await;
    let (status, body) = acquire(&s.socket(), "pg-0").await;
    let written = std::fs::read_to_string(
        s.sysfs
            .join("devices/virtual/nvme-fabrics/ctl/nvme0/fast_io_fail_tmo"),
    )
    .unwrap();
    assert_ne!(written.trim(), "off", "fast_io_fail_tmo was not set");
    assert_eq!(status, 503, "{body}");
    d.shutdown().await.expect("stops");
    // warn, without reservations: nothing would make the target refuse this
    // node's queued writes after a takeover, so nothing is granted.
    let d = start(s.config(NS_ID, Policy::Warn), &ns).await;
    let (status, body) = acquire(&s.socket(), "pg-0").await;
    assert_eq!(status, 503, "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains("reservations"), "{msg}");
    d.shutdown().await.expect("stops");
    // warn, with reservations: granted, and said so (once the key is
    // registered, which has no API event: the acquire is retried).
    let ns = FakeNamespace::new(true);
    let d = start(s.config(NS_ID, Policy::Warn), &ns).await;
    let mut events = d.subscribe("pg").unwrap();
    let mut granted = None;
    for _ in 0..50 {
        let (status, body) = acquire(&s.socket(), "pg-0").await;
        if status == 200 {
            granted = Some(body);
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("try again"),
            "{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = granted.expect("granted once the reservation key is registered");
    let warned = next_event(&mut events, |k| {
        matches!(k, VolumeEventKind::StaleIoWarning { .. })
    })
    .await
    .1;
    assert!(
        matches!(&warned, VolumeEventKind::StaleIoWarning { fixes } if fixes.contains("budget")),
        "{warned:?}"
    );
    let (status, body) = release(&s.socket(), body["session"].as_str().unwrap()).await;
    assert_eq!(status, 200, "{body}");
    d.shutdown().await.expect("stops");
    drop(s);
    // A safe namespace passes under refuse.
    let s = Setup::new("dd-guard-ok", Some("timeouts-safe"));
    let d = start(s.config(NS_ID, Policy::Refuse), &ns).await;
    let (status, body) = acquire(&s.socket(), "pg-0").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = release(&s.socket(), body["session"].as_str().unwrap()).await;
    assert_eq!(status, 200, "{body}");
    d.shutdown().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_reservation_fences_the_holder_at_once() {
    if !require_root_loop() {
        return;
    }
    let s = Setup::new("dd-resv", Some("timeouts-safe"));
    let ns = FakeNamespace::new(true);
    let d = start(s.config(NS_ID, Policy::Refuse), &ns).await;
    let mut events = d.subscribe("pg").unwrap();
    let (status, grant) = acquire(&s.socket(), "pg-0").await;
    assert_eq!(status, 200, "{grant}");
    // The reservation was taken before the grant was answered.
    let mine = key_for_node("node-a");
    assert_eq!(ns.status().holder_key(), Some(mine));
    assert!(ns.write(1).is_ok() && ns.write(2).is_err());
    // A peer (host 2) takes over the namespace: preempt-and-abort.
    let peer_ns = ns.clone();
    tokio::task::spawn_blocking(move || {
        let mut peer = Reservations::new(peer_ns.host(2));
        let mut m = Reservation::new(key_for_node("node-b"));
        ops::start(&mut m, &mut peer);
        ops::drive(&mut m, &mut peer, ResvInput::BecomeHolder)
    })
    .await
    .unwrap();
    assert_eq!(ns.status().holder_key(), Some(key_for_node("node-b")));
    // The next check (every renew interval) sees it: fenced for that.
    assert_eq!(fencing_reason(&mut events).await, "reservation_lost");
    let ended = next_event(&mut events, |k| matches!(k, VolumeEventKind::Fenced { .. }))
        .await
        .1;
    assert!(matches!(ended, VolumeEventKind::Fenced { ok: true, .. }));
    let (status, body) = tokio::task::spawn_blocking({
        let (sock, sess) = (s.socket(), grant["session"].as_str().unwrap().to_string());
        move || {
            http(
                &sock,
                "POST",
                &format!("/v1/sessions/{sess}/keepalive"),
                None,
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(status, 410, "{body}");
    d.shutdown().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_that_cannot_be_taken_starts_no_writer() {
    if !require_root_loop() {
        return;
    }
    let s = Setup::new("dd-resv-refused", Some("timeouts-safe"));
    let ns = FakeNamespace::new(true);
    let d = start_opener(s.config(NS_ID, Policy::Refuse), &ns, true).await;
    let mut events = d.subscribe("pg").unwrap();
    let (status, body) = acquire(&s.socket(), "pg-0").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("NVMe reservation could not be taken"),
        "{body}"
    );
    // The lease won for nothing is given back, and nobody was granted.
    let first = next_event(&mut events, |k| {
        matches!(
            k,
            VolumeEventKind::Released { .. } | VolumeEventKind::Granted { .. }
        )
    })
    .await
    .1;
    assert!(
        matches!(first, VolumeEventKind::Released { .. }),
        "{first:?}"
    );
    assert_eq!(ns.status().holder_key(), None);
    d.shutdown().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_whose_device_is_missing_waits_for_it() {
    if !require_root_loop() {
        return;
    }
    let s = Setup::new("dd-missing", Some("timeouts-safe"));
    let node = s.dev_dir.join("nvme0n1");
    std::fs::remove_file(&node).unwrap();
    let ns = FakeNamespace::new(false);
    // Not an error: the daemon starts and says why it cannot grant.
    let d = start(s.config(NS_ID, Policy::Refuse), &ns).await;
    let (status, body) = acquire(&s.socket(), "pg-0").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("not present"),
        "{body}"
    );
    // The device node appears, and the kernel says a disk was added.
    std::os::unix::fs::symlink(&s.dev.0, &node).unwrap();
    d.inject_device_event(DeviceEvent::Added {
        name: "nvme0n1".into(),
        major_minor: None,
    });
    let mut served = None;
    for _ in 0..50 {
        let (status, body) = acquire(&s.socket(), "pg-0").await;
        if status == 200 {
            served = Some(body);
            break;
        }
        assert_eq!(status, 503, "{body}");
        // Polling the API (opening the device has no API event to wait on).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grant = served.expect("granted once the device appeared");
    assert_eq!(grant["device"], node.to_str().unwrap());
    let (status, body) = release(&s.socket(), grant["session"].as_str().unwrap()).await;
    assert_eq!(status, 200, "{body}");
    d.shutdown().await.expect("stops");
}

/// A loop device created at a number of our own (none exists at start),
/// detached and removed on drop.
struct NewLoop(PathBuf, u32);

impl Drop for NewLoop {
    fn drop(&mut self) {
        let _ = run_ok("losetup", &["-d", self.0.to_str().expect("utf-8")]);
        if let Ok(ctl) = std::fs::File::open("/dev/loop-control") {
            use std::os::fd::AsRawFd;
            // LOOP_CTL_REMOVE: the device was created for this test only.
            // SAFETY: a valid fd and an integer argument, as loop(4) says.
            #[allow(unsafe_code)]
            unsafe {
                libc::ioctl(ctl.as_raw_fd(), 0x4C81, self.1 as libc::c_ulong);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_device_attached_after_start_up_is_opened_on_the_kernels_event() {
    if !require_root_loop() {
        return;
    }
    let s = Setup::new("dd-attach", None);
    // A formatted image, and a loop device number nobody uses.
    let image = s.scratch.path().join("shared.img");
    let n = (4_000..5_000)
        .map(|i| 4_000 + (std::process::id() + i) % 1_000)
        .find(|n| !Path::new(&format!("/dev/loop{n}")).exists())
        .expect("a free loop number");
    let dev = PathBuf::from(format!("/dev/loop{n}"));
    let ns = FakeNamespace::new(false);
    let d = start(s.config(dev.to_str().unwrap(), Policy::Refuse), &ns).await;
    let (status, body) = acquire(&s.socket(), "pg-0").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("not present"),
        "{body}"
    );
    // losetup creates the device (an `add` uevent) and attaches (`change`).
    run_ok(
        "losetup",
        &[
            "--direct-io=on",
            dev.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
    )
    .expect("losetup");
    let _attached = NewLoop(dev.clone(), n);
    let mut served = None;
    for _ in 0..100 {
        let (status, body) = acquire(&s.socket(), "pg-0").await;
        if status == 200 {
            served = Some(body);
            break;
        }
        assert_eq!(status, 503, "{body}");
        // Polling the API (opening the device has no API event to wait on).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grant = served.expect("granted once the kernel announced the device");
    assert_eq!(grant["device"], dev.to_str().unwrap());
    let (status, body) = release(&s.socket(), grant["session"].as_str().unwrap()).await;
    assert_eq!(status, 200, "{body}");
    d.shutdown().await.expect("stops");
}
