//! The device monitor: a thread that turns udev or kernel uevents into
//! [`DeviceEvent`]s on a channel, and watches the paths of NVMe namespaces.
//!
//! Sources, chosen by [`Source::detect`]:
//! - [`Source::Udev`] when a udev daemon runs (`/run/udev/control` exists): a
//!   libudev monitor (group "udev"), so events arrive after udev has created
//!   the device nodes and links;
//! - [`Source::Kernel`] otherwise (containers without udevd, minimal hosts,
//!   this project's CI): the kernel's `NETLINK_KOBJECT_UEVENT` socket, group 1,
//!   messages parsed by [`super::uevent::parse`] (the same function that reads
//!   the recorded fixtures). Messages not sent by the kernel (sender port id
//!   not 0) are dropped.
//!
//! Both are filtered to block disks and NVMe controllers and classified by
//! [`super::uevent::classify`]. With [`Options::watch_paths`], after every NVMe
//! controller event and at least every `path_poll`, the thread re-reads the
//! namespaces' paths from sysfs and sends the
//! [`PathTracker`](super::health::PathTracker)'s PathDown / PathUp /
//! LastPathLost events (the kernel sends no uevent when a controller starts
//! reconnecting, so the poll is what notices it).
//!
//! The thread ends when [`Monitor::stop`] is called (an eventfd wakes it) or
//! the receiver is dropped. The only `unsafe` is the socket, eventfd and poll
//! system calls.
#![allow(unsafe_code)]

use super::health::PathTracker;
use super::uevent::{classify, parse, Uevent};
use super::{DeviceError, DeviceEvent};
use serde::Serialize;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where device events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Udev,
    Kernel,
}

/// The file whose presence says a udev daemon runs.
pub const UDEV_CONTROL: &str = "/run/udev/control";
/// Default interval of the path poll.
pub const DEFAULT_PATH_POLL: Duration = Duration::from_millis(500);

impl Source {
    /// Udev if a udev daemon runs, else the kernel socket.
    pub fn detect() -> Source {
        if Path::new(UDEV_CONTROL).exists() {
            Source::Udev
        } else {
            Source::Kernel
        }
    }
}

/// How to run the monitor.
#[derive(Debug, Clone)]
pub struct Options {
    /// `None`: [`Source::detect`].
    pub source: Option<Source>,
    /// The sysfs root (normally `/sys`) for the path watch.
    pub sysfs_root: PathBuf,
    /// Re-read NVMe paths and report their changes.
    pub watch_paths: bool,
    pub path_poll: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            source: None,
            sysfs_root: PathBuf::from("/sys"),
            watch_paths: true,
            path_poll: DEFAULT_PATH_POLL,
        }
    }
}

/// A running monitor.
#[derive(Debug)]
pub struct Monitor {
    source: Source,
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

fn last_os(what: &'static str) -> DeviceError {
    DeviceError::Monitor {
        what,
        source: io::Error::last_os_error(),
    }
}

/// The kernel uevent socket, bound to group 1.
fn kernel_socket() -> Result<OwnedFd, DeviceError> {
    // SAFETY: plain socket(2) call with constant arguments; the result is
    // checked before use and owned by the OwnedFd.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_KOBJECT_UEVENT,
        )
    };
    if fd < 0 {
        return Err(last_os("socket(AF_NETLINK, NETLINK_KOBJECT_UEVENT)"));
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = 1;
    // SAFETY: addr is a valid sockaddr_nl and the length matches it.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(last_os(
            "bind to the kernel uevent group (needs root in the host network namespace)",
        ));
    }
    // Room for bursts (a loop attach sends several events at once).
    let size: libc::c_int = 4 << 20;
    // SAFETY: setsockopt with a pointer to a live c_int and its size; failure
    // is harmless (the default buffer stays).
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    Ok(fd)
}

/// Reads every pending kernel message; returns the parsed uevents.
fn read_kernel(fd: RawFd, buf: &mut [u8]) -> Vec<Uevent> {
    let mut out = Vec::new();
    loop {
        // SAFETY: sockaddr_nl is plain data; all-zero is valid.
        let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: buf is a live, exclusively borrowed buffer of buf.len()
        // bytes; from/len describe a valid sockaddr_nl.
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
                &mut from as *mut libc::sockaddr_nl as *mut libc::sockaddr,
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                tracing::warn!("device monitor: kernel uevents were dropped (receive buffer full)");
                continue;
            }
            break; // EAGAIN or an error: nothing more now
        }
        if from.nl_pid != 0 {
            continue; // not from the kernel
        }
        if let Some(ev) = parse(&buf[..n as usize]) {
            out.push(ev);
        }
    }
    out
}

fn eventfd() -> Result<OwnedFd, DeviceError> {
    // SAFETY: eventfd(2) with constant flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(last_os("eventfd"));
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until one of `fds` is readable or `timeout` passes; returns which are readable.
fn wait(fds: &[RawFd], timeout: Duration) -> Vec<bool> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: p is a live array of p.len() pollfd structures.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if r <= 0 {
        return vec![false; fds.len()];
    }
    p.iter().map(|x| x.revents & libc::POLLIN != 0).collect()
}

fn interesting(ev: &Uevent) -> bool {
    matches!(ev.get("SUBSYSTEM"), Some("block" | "nvme"))
}

fn udev_to_uevent(event: &udev::Event) -> Uevent {
    let mut ev = Uevent {
        action: event.event_type().to_string(),
        devpath: event.devpath().to_string_lossy().into_owned(),
        ..Uevent::default()
    };
    for p in event.properties() {
        ev.props.insert(
            p.name().to_string_lossy().into_owned(),
            p.value().to_string_lossy().into_owned(),
        );
    }
    ev
}

struct PathWatch {
    root: PathBuf,
    tracker: PathTracker,
    poll: Duration,
    last: Option<Instant>,
}

impl PathWatch {
    /// Re-reads the namespaces and sends the tracker's events. False if the
    /// receiver is gone.
    fn check(&mut self, tx: &Sender<DeviceEvent>) -> bool {
        self.last = Some(Instant::now());
        match super::discovery::scan(&self.root) {
            Ok(namespaces) => {
                for ns in namespaces {
                    for e in self.tracker.observe(&ns.name, &ns.paths) {
                        if tx.send(e).is_err() {
                            return false;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "device monitor: cannot read NVMe paths"),
        }
        true
    }

    fn due(&self) -> bool {
        self.last.map_or(true, |t| t.elapsed() >= self.poll)
    }
}

impl Monitor {
    /// Starts the monitor thread; events go to `tx`. Returns once the socket
    /// is listening, so events caused after this call are not missed.
    pub fn spawn(opts: Options, tx: Sender<DeviceEvent>) -> Result<Monitor, DeviceError> {
        let source = opts.source.unwrap_or_else(Source::detect);
        let stop = eventfd()?;
        let stop_fd = stop.as_raw_fd();
        let mut watch = opts.watch_paths.then(|| PathWatch {
            root: opts.sysfs_root.clone(),
            tracker: PathTracker::new(),
            poll: opts.path_poll,
            last: None,
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), DeviceError>>();
        let thread = std::thread::Builder::new()
            .name("device-monitor".into())
            .spawn(move || {
                let poll = watch.as_ref().map_or(Duration::from_secs(3600), |w| w.poll);
                match source {
                    Source::Kernel => {
                        let sock = match kernel_socket() {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        };
                        let _ = ready_tx.send(Ok(()));
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            if let Some(w) = watch.as_mut().filter(|w| w.due()) {
                                if !w.check(&tx) {
                                    return;
                                }
                            }
                            let ready = wait(&[sock.as_raw_fd(), stop_fd], poll);
                            if ready[1] {
                                return;
                            }
                            if ready[0]
                                && !deliver(
                                    read_kernel(sock.as_raw_fd(), &mut buf),
                                    &tx,
                                    &mut watch,
                                )
                            {
                                return;
                            }
                        }
                    }
                    Source::Udev => {
                        let sock = match udev::MonitorBuilder::new()
                            .and_then(|b| b.match_subsystem("block"))
                            .and_then(|b| b.match_subsystem("nvme"))
                            .and_then(|b| b.listen())
                        {
                            Ok(s) => s,
                            Err(source) => {
                                let _ = ready_tx.send(Err(DeviceError::Monitor {
                                    what: "libudev monitor",
                                    source,
                                }));
                                return;
                            }
                        };
                        let _ = ready_tx.send(Ok(()));
                        loop {
                            if let Some(w) = watch.as_mut().filter(|w| w.due()) {
                                if !w.check(&tx) {
                                    return;
                                }
                            }
                            let ready = wait(&[sock.as_raw_fd(), stop_fd], poll);
                            if ready[1] {
                                return;
                            }
                            if ready[0] {
                                let evs: Vec<Uevent> =
                                    sock.iter().map(|e| udev_to_uevent(&e)).collect();
                                if !deliver(evs, &tx, &mut watch) {
                                    return;
                                }
                            }
                        }
                    }
                }
            })
            .map_err(|source| DeviceError::Monitor {
                what: "spawn the monitor thread",
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                return Err(DeviceError::Monitor {
                    what: "the monitor thread ended before it listened",
                    source: io::Error::other("thread ended"),
                })
            }
        }
        tracing::info!(?source, "device monitor listening");
        Ok(Monitor {
            source,
            stop,
            thread: Some(thread),
        })
    }

    pub fn source(&self) -> Source {
        self.source
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            );
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Sends the classified events; re-reads paths after a controller event.
fn deliver(evs: Vec<Uevent>, tx: &Sender<DeviceEvent>, watch: &mut Option<PathWatch>) -> bool {
    for ev in evs.iter().filter(|e| interesting(e)) {
        let Some(de) = classify(ev) else { continue };
        let controller = matches!(de, DeviceEvent::Controller { .. });
        tracing::debug!(event = ?de, "device event");
        if tx.send(de).is_err() {
            return false;
        }
        if controller {
            if let Some(w) = watch.as_mut() {
                if !w.check(tx) {
                    return false;
                }
            }
        }
    }
    true
}
