//! The simulated storage paths themselves: two nodes over one image, each
//! with its own FUSE file and loop device, and what each mode does to I/O.
//!
//! Needs root, loop devices and FUSE (CI runs as root); skips otherwise.

mod common;

use std::io;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    pattern, process_state, read_direct, require_root_loop_fuse, write_direct, Mode, NodePath,
    SharedImage, SECTOR,
};

const IMAGE_SIZE: u64 = 64 << 20;
/// Generous bound for things that must happen; never a synchronisation.
const MUST_HAPPEN: Duration = Duration::from_secs(20);

fn two_nodes() -> (SharedImage, NodePath, NodePath) {
    let image = SharedImage::create(IMAGE_SIZE).expect("create image");
    let a = NodePath::new(&image, "a").expect("node a");
    let b = NodePath::new(&image, "b").expect("node b");
    (image, a, b)
}

/// Stops the nodes and asserts they left no loop device and no mount.
fn stop_and_check(nodes: Vec<NodePath>) {
    for node in nodes {
        let name = node.name().to_string();
        let footprint = node.footprint();
        let present = footprint.leftovers();
        assert_eq!(
            present.len(),
            2,
            "the check must see the live loop device and mount: {present:#?}"
        );
        node.stop()
            .unwrap_or_else(|e| panic!("teardown of {name}: {e}"));
        let left = footprint.leftovers();
        assert!(left.is_empty(), "node {name} left: {left:#?}");
    }
}

fn is_eio(r: &io::Result<impl Sized>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EIO))
}

#[test]
fn write_through_one_node_reads_back_through_the_other() {
    if !require_root_loop_fuse() {
        return;
    }
    let (image, a, b) = two_nodes();
    assert_ne!(
        a.device(),
        b.device(),
        "each node needs its own loop device"
    );
    let data = pattern(1, 4 * SECTOR);
    let offset = 1 << 20;

    write_direct(a.device(), offset, &data).expect("write through a");
    assert_eq!(
        read_direct(b.device(), offset, data.len()).expect("read b"),
        data
    );

    // And it is really in the shared image, at the same offset.
    let in_image = std::fs::read(image.path()).expect("read image");
    assert_eq!(
        &in_image[offset as usize..offset as usize + data.len()],
        &data[..]
    );

    // The other way round too.
    let data2 = pattern(2, SECTOR);
    write_direct(b.device(), 0, &data2).expect("write through b");
    assert_eq!(read_direct(a.device(), 0, SECTOR).expect("read a"), data2);
    stop_and_check(vec![a, b]);
}

#[test]
fn slow_delays_each_io_by_at_least_the_delay() {
    if !require_root_loop_fuse() {
        return;
    }
    let (_image, a, b) = two_nodes();
    a.set_mode(Mode::Slow(200)).expect("slow");

    let start = Instant::now();
    read_direct(a.device(), 0, SECTOR).expect("slow read");
    let read_took = start.elapsed();
    let start = Instant::now();
    write_direct(a.device(), 0, &pattern(3, SECTOR)).expect("slow write");
    let write_took = start.elapsed();
    assert!(
        read_took >= Duration::from_millis(200),
        "read took {read_took:?}"
    );
    assert!(
        write_took >= Duration::from_millis(200),
        "write took {write_took:?}"
    );

    // Node b is not slowed (no upper bound asserted on a shared machine:
    // just that it works).
    read_direct(b.device(), 0, SECTOR).expect("b reads");

    a.set_mode(Mode::Ok).expect("ok");
    read_direct(a.device(), 0, SECTOR).expect("restored");
    stop_and_check(vec![a, b]);
}

#[test]
fn eio_fails_one_node_while_the_other_works() {
    if !require_root_loop_fuse() {
        return;
    }
    let (_image, a, b) = two_nodes();
    a.set_mode(Mode::Eio).expect("eio");

    assert!(
        is_eio(&read_direct(a.device(), 0, SECTOR)),
        "read on a must fail with EIO"
    );
    assert!(
        is_eio(&write_direct(a.device(), 0, &pattern(4, SECTOR))),
        "write on a must fail with EIO"
    );

    let data = pattern(5, SECTOR);
    write_direct(b.device(), 8 * SECTOR as u64, &data).expect("b writes");
    assert_eq!(
        read_direct(b.device(), 8 * SECTOR as u64, SECTOR).expect("b reads"),
        data
    );

    a.set_mode(Mode::Ok).expect("ok");
    assert_eq!(
        read_direct(a.device(), 8 * SECTOR as u64, SECTOR).expect("a restored"),
        data,
        "a sees what b wrote while a was cut off"
    );
    stop_and_check(vec![a, b]);
}

#[test]
fn stall_blocks_a_read_until_the_path_is_released() {
    if !require_root_loop_fuse() {
        return;
    }
    let (_image, a, b) = two_nodes();
    let data = pattern(6, SECTOR);
    let offset = 16 * SECTOR as u64;
    write_direct(b.device(), offset, &data).expect("b writes");

    a.set_mode(Mode::Stall).expect("stall");
    let (tx, rx) = mpsc::channel();
    let device = a.device().to_path_buf();
    let reader = thread::spawn(move || {
        let _ = tx.send(read_direct(&device, offset, SECTOR));
    });

    // The read reached a's path and is held there ...
    assert!(
        a.wait_held(1, MUST_HAPPEN).expect("wait-held"),
        "read never reached a"
    );
    // ... and has not completed.
    assert!(
        matches!(
            rx.recv_timeout(Duration::from_millis(500)),
            Err(mpsc::RecvTimeoutError::Timeout)
        ),
        "a read on a stalled path completed"
    );
    // Node b is unaffected meanwhile.
    assert_eq!(
        read_direct(b.device(), offset, SECTOR).expect("b reads"),
        data
    );

    a.set_mode(Mode::Ok).expect("ok");
    let got = rx
        .recv_timeout(MUST_HAPPEN)
        .expect("released read completes");
    assert_eq!(got.expect("released read succeeds"), data);
    reader.join().expect("reader thread");
    stop_and_check(vec![a, b]);
}

#[test]
fn stall_released_into_eio_fails_the_held_io() {
    if !require_root_loop_fuse() {
        return;
    }
    let image = SharedImage::create(IMAGE_SIZE).expect("image");
    let a = NodePath::new(&image, "a").expect("node a");
    a.set_mode(Mode::Stall).expect("stall");
    let (tx, rx) = mpsc::channel();
    let device = a.device().to_path_buf();
    thread::spawn(move || {
        let _ = tx.send(write_direct(&device, 0, &pattern(7, SECTOR)));
    });
    assert!(
        a.wait_held(1, MUST_HAPPEN).expect("wait-held"),
        "write never reached a"
    );
    a.set_mode(Mode::Eio).expect("eio");
    let result = rx
        .recv_timeout(MUST_HAPPEN)
        .expect("released write returns");
    assert!(is_eio(&result), "held write must fail with EIO: {result:?}");
    // Nothing reached the image.
    assert_eq!(
        std::fs::read(image.path()).expect("image")[..SECTOR],
        [0u8; SECTOR]
    );
    stop_and_check(vec![a]);
}

/// Dropping a node whose path is stalled, with a reader blocked on it, must
/// not hang: teardown switches to eio first, which wakes the reader.
#[test]
fn teardown_of_a_stalled_node_does_not_hang() {
    if !require_root_loop_fuse() {
        return;
    }
    let image = SharedImage::create(IMAGE_SIZE).expect("image");
    let a = NodePath::new(&image, "a").expect("node a");
    let footprint = a.footprint();
    a.set_mode(Mode::Stall).expect("stall");
    let (tx, rx) = mpsc::channel();
    let device = a.device().to_path_buf();
    thread::spawn(move || {
        let _ = tx.send(read_direct(&device, 0, SECTOR));
    });
    assert!(a.wait_held(1, MUST_HAPPEN).expect("wait-held"));

    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        drop(a);
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(MUST_HAPPEN)
        .expect("teardown finished");
    let result = rx.recv_timeout(MUST_HAPPEN).expect("blocked reader woke");
    assert!(
        is_eio(&result),
        "blocked read must fail with EIO: {result:?}"
    );
    assert!(
        footprint.leftovers().is_empty(),
        "{:#?}",
        footprint.leftovers()
    );
}

/// A process blocked on a stalled path sits in uninterruptible sleep: SIGKILL
/// does not end it until the path completes or fails its I/O. Hence a crash
/// is "cut the path (eio), then SIGKILL", never the other way round.
#[test]
fn sigkilled_process_with_stalled_io_stays_until_the_path_is_released() {
    if !require_root_loop_fuse() {
        return;
    }
    let image = SharedImage::create(IMAGE_SIZE).expect("image");
    let a = NodePath::new(&image, "a").expect("node a");
    a.set_mode(Mode::Stall).expect("stall");
    let mut dd = Command::new("dd")
        .arg(format!("if={}", a.device().display()))
        .args([
            "of=/dev/null",
            "bs=4096",
            "count=1",
            "iflag=direct",
            "status=none",
        ])
        .spawn()
        .expect("start dd");
    assert!(
        a.wait_held(1, MUST_HAPPEN).expect("wait-held"),
        "dd's read never reached a"
    );

    dd.kill().expect("SIGKILL dd");
    // No event to wait for here: sample the state for a while; it must stay D.
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        assert_eq!(
            process_state(dd.id()),
            Some('D'),
            "killed dd should be stuck in D"
        );
        assert!(
            dd.try_wait().expect("try_wait").is_none(),
            "killed dd exited while stalled"
        );
        thread::sleep(Duration::from_millis(20));
    }

    a.set_mode(Mode::Eio).expect("eio");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(dd.wait());
    });
    let status = rx.recv_timeout(MUST_HAPPEN).expect("dd dies once released");
    assert!(!status.expect("wait").success());
    stop_and_check(vec![a]);
}

/// If the FUSE process itself dies, the kernel aborts its connection: held
/// I/O fails instead of hanging, and teardown still leaves nothing behind.
#[test]
fn killing_the_fuse_process_fails_held_io() {
    if !require_root_loop_fuse() {
        return;
    }
    let image = SharedImage::create(IMAGE_SIZE).expect("image");
    let mut a = NodePath::new(&image, "a").expect("node a");
    a.set_mode(Mode::Stall).expect("stall");
    let (tx, rx) = mpsc::channel();
    let device = a.device().to_path_buf();
    thread::spawn(move || {
        let _ = tx.send(read_direct(&device, 0, SECTOR));
    });
    assert!(a.wait_held(1, MUST_HAPPEN).expect("wait-held"));
    a.kill_fuse().expect("kill the FUSE process");
    let result = rx.recv_timeout(MUST_HAPPEN).expect("held read returns");
    assert!(is_eio(&result), "held read must fail with EIO: {result:?}");
    assert!(
        is_eio(&read_direct(a.device(), 0, SECTOR)),
        "new reads fail too"
    );
    stop_and_check(vec![a]);
}

/// `crash` cuts the path before the kill: a write the node had in flight
/// (here held by a very slow path) never reaches the shared image.
#[test]
fn crash_cuts_the_path_before_killing() {
    if !require_root_loop_fuse() {
        return;
    }
    let image = SharedImage::create(IMAGE_SIZE).expect("image");
    let a = NodePath::new(&image, "a").expect("node a");
    let data_file = a.dir().join("block");
    std::fs::write(&data_file, pattern(8, SECTOR)).expect("data file");
    a.set_mode(Mode::Slow(60_000)).expect("slow");
    let mut node_process = Command::new("dd")
        .arg(format!("if={}", data_file.display()))
        .arg(format!("of={}", a.device().display()))
        .args(["bs=4096", "seek=4", "oflag=direct", "status=none"])
        .spawn()
        .expect("start dd");
    assert!(
        a.wait_held(1, MUST_HAPPEN).expect("wait-held"),
        "write never reached a"
    );

    let status = a.crash(&mut node_process).expect("crash");
    assert!(!status.success());
    let in_image = std::fs::read(image.path()).expect("image");
    assert_eq!(
        in_image[4 * SECTOR..5 * SECTOR],
        [0u8; SECTOR],
        "a write in flight at the crash reached the image"
    );
    assert!(a.status().expect("status").contains("held=0"));
    stop_and_check(vec![a]);
}

/// The helper used by teardown reports a command that hangs rather than
/// hanging itself.
#[test]
fn run_with_timeout_kills_a_hanging_command() {
    let err = common::run_with_timeout(Command::new("sleep").arg("30"), Duration::from_millis(200))
        .expect_err("must time out");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    let out = common::run_ok("sh", &["-c", "echo hi; echo err >&2"]).expect("sh");
    assert_eq!(out.stdout.trim(), "hi");
    assert_eq!(out.stderr.trim(), "err");
    assert!(common::run_ok("false", &[]).is_err());
}
