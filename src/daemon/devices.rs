//! The device layer, wired into the daemon: where a volume's device is, what
//! the kernel says about it, the stale-I/O guard's settings, and the NVMe
//! reservation each volume holds beside its disk lease (docs/DEVICES.md §6).
//!
//! - [`locate`] turns a `--volume` spec (a device path, or an id such as
//!   `uuid.<uuid>`, `eui.<hex>`, `nguid.<hex>`, `wwid:<wwid>`) into the device
//!   node to open and the names device events use;
//! - [`route_events`] runs once per daemon: it takes the
//!   [`device::monitor::Monitor`](crate::device::monitor::Monitor)'s events
//!   and tells each volume task [`DeviceNews::PathLost`] /
//!   [`DeviceNews::PathBack`] (the monitor's own `PathTracker` turns NVMe
//!   path states into `LastPathLost` / `PathUp`; a loop or other disk is lost
//!   when it is removed or its size drops to 0, as a detached loop's does);
//! - [`ReservationLink`] runs one `core::reservation::Reservation` per NVMe
//!   volume on its own thread through `nvme::ops`, behind the
//!   [`ReservationOpener`] seam (real ioctls, or `nvme::fake` in tests).
//!
//! Invariants: nothing here decides to fence; it only reports inputs to the
//! volume task, whose session machine decides. Path loss and a lost
//! reservation are reported at once, never batched or delayed.
//!
//! What it must not do: block a runtime thread on a device (reservation
//! commands run on the link's thread; sysfs reads here are attribute files).

use crate::core::reservation::{Event as ResvEvent, Input as ResvInput, Reservation};
use crate::device::discovery::{self, Volume};
use crate::device::DeviceEvent;
use crate::nvme::ops::{self, ReservationOps, Reservations};
use std::path::{Path, PathBuf};
use tokio::sync::{mpsc, oneshot};

/// What a volume task hears about its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceNews {
    /// The device has no usable path (NVMe) or went away (removed, no
    /// medium): fence now, grant nothing until it is back.
    PathLost(String),
    /// The device is usable again.
    PathBack,
}

/// Where a volume's device is and the names its events carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The node to open (a block device, or an image file in tests).
    pub path: PathBuf,
    /// The kernel's block device name (`loop3`, `nvme0n1`), if a block device.
    pub block_name: Option<String>,
    /// The NVMe namespace (`nvme0n1`), if the device is one.
    pub namespace: Option<String>,
}

/// The id part of a volume spec, without the daemon's prefixes.
fn id_of(spec: &str) -> &str {
    spec.strip_prefix("wwid:")
        .or_else(|| spec.strip_prefix("nguid."))
        .unwrap_or(spec)
}

/// Finds the device of `spec`: a path (`/dev/nvme0n1`, `/dev/loop3`, an
/// image file) is taken as given; anything else is an id resolved through
/// `discovery::resolve` under `sysfs_root`, whose device node is looked up
/// in `dev_dir`. `Ok(None)`: no such device (yet): the path or node does
/// not exist, or the block device has no medium (a detached loop device).
pub fn locate(
    sysfs_root: &Path,
    dev_dir: &Path,
    spec: &Path,
) -> Result<Option<Located>, crate::device::DeviceError> {
    let text = spec.to_string_lossy();
    if text.starts_with('/') {
        if !spec.exists() {
            return Ok(None);
        }
        let real = std::fs::canonicalize(spec).unwrap_or_else(|_| spec.to_path_buf());
        let block_name = real
            .strip_prefix("/dev")
            .ok()
            .and_then(|p| p.to_str())
            .filter(|n| !n.contains('/') && sysfs_root.join("block").join(n).exists())
            .map(str::to_owned);
        if block_name.as_deref().is_some_and(|n| empty(sysfs_root, n)) {
            return Ok(None);
        }
        let namespace = block_name
            .clone()
            .filter(|n| discovery::parse_ns_name(n).is_some());
        return Ok(Some(Located {
            path: spec.to_path_buf(),
            block_name,
            namespace,
        }));
    }
    let located = discovery::resolve(sysfs_root, id_of(&text))?.map(|v| match v {
        Volume::Nvme(ns) => Located {
            path: dev_dir.join(&ns.name),
            block_name: Some(ns.name.clone()),
            namespace: Some(ns.name),
        },
        Volume::Block(b) => Located {
            path: dev_dir.join(&b.name),
            block_name: Some(b.name),
            namespace: None,
        },
    });
    Ok(located.filter(|l| {
        l.path.exists()
            && !l
                .block_name
                .as_deref()
                .is_some_and(|n| empty(sysfs_root, n))
    }))
}

/// One volume as the event router sees it.
#[derive(Debug)]
pub struct Watched {
    pub volume: String,
    /// As configured (a path or an id), to locate it again.
    pub spec: PathBuf,
    /// Where it was last found (`None`: missing since start-up).
    pub located: Option<Located>,
    pub news: mpsc::UnboundedSender<DeviceNews>,
}

/// Whether the block device `name` has no medium (size 0 or gone).
fn empty(sysfs_root: &Path, name: &str) -> bool {
    std::fs::read_to_string(sysfs_root.join("block").join(name).join("size"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(true, |sectors| sectors == 0)
}

/// Routes device events to the volumes they concern, until `events` closes.
/// A volume that is missing or lost is located again on any block device
/// appearing or changing (an id may come back under another name).
pub async fn route_events(
    sysfs_root: PathBuf,
    dev_dir: PathBuf,
    mut events: mpsc::UnboundedReceiver<DeviceEvent>,
    mut watched: Vec<Watched>,
) {
    let mut lost: Vec<bool> = watched.iter().map(|w| w.located.is_none()).collect();
    while let Some(event) = events.recv().await {
        for (i, w) in watched.iter_mut().enumerate() {
            if lost[i]
                && matches!(
                    event,
                    DeviceEvent::Added { .. }
                        | DeviceEvent::Changed { .. }
                        | DeviceEvent::PathUp { .. }
                )
            {
                if let Ok(Some(l)) = locate(&sysfs_root, &dev_dir, &w.spec) {
                    let fresh = w.located.as_ref() != Some(&l);
                    w.located = Some(l);
                    // Back under the same name: the rules below say so.
                    if fresh {
                        lost[i] = false;
                        let _ = w.news.send(DeviceNews::PathBack);
                        continue;
                    }
                }
            }
            let Some(located) = &w.located else { continue };
            let block = located.block_name.as_deref();
            let ns = located.namespace.as_deref();
            let news = match &event {
                DeviceEvent::Removed { name } if Some(name.as_str()) == block => Some(
                    DeviceNews::PathLost(format!("its device {name} was removed")),
                ),
                DeviceEvent::Changed { name, .. } if Some(name.as_str()) == block => {
                    if empty(&sysfs_root, name) {
                        Some(DeviceNews::PathLost(format!(
                            "its device {name} has no medium any more (detached)"
                        )))
                    } else {
                        // An NVMe namespace is back only when a path is.
                        (lost[i] && ns.is_none()).then_some(DeviceNews::PathBack)
                    }
                }
                DeviceEvent::Added { name, .. }
                    if Some(name.as_str()) == block && lost[i] && ns.is_none() =>
                {
                    Some(DeviceNews::PathBack)
                }
                DeviceEvent::LastPathLost { namespace } if Some(namespace.as_str()) == ns => Some(
                    DeviceNews::PathLost(format!("NVMe namespace {namespace} has no usable path")),
                ),
                DeviceEvent::PathUp { namespace, .. }
                    if Some(namespace.as_str()) == ns && lost[i] =>
                {
                    Some(DeviceNews::PathBack)
                }
                DeviceEvent::PathDown {
                    namespace,
                    controller,
                    state,
                    ..
                } if Some(namespace.as_str()) == ns => {
                    tracing::warn!(volume = %w.volume, %controller, state = state.as_str(), "an NVMe path is down");
                    None
                }
                _ => None,
            };
            let Some(news) = news else { continue };
            let now_lost = matches!(news, DeviceNews::PathLost(_));
            if now_lost == lost[i] {
                continue; // already said
            }
            lost[i] = now_lost;
            let _ = w.news.send(news);
        }
    }
}

/// Opens the reservation commands of a volume's NVMe namespace.
pub trait ReservationOpener: Send + Sync + 'static {
    /// The commands for namespace `namespace` of `volume`, whose device
    /// node is `device`.
    fn open(
        &self,
        volume: &str,
        namespace: &str,
        device: &Path,
    ) -> Result<Box<dyn ReservationOps + Send>, String>;
}

/// The real thing: passthrough ioctls on the namespace's block device.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemReservations;

impl ReservationOpener for SystemReservations {
    fn open(
        &self,
        _volume: &str,
        _namespace: &str,
        device: &Path,
    ) -> Result<Box<dyn ReservationOps + Send>, String> {
        crate::nvme::passthru::NamespaceDevice::open(device)
            .map(|d| Box::new(Reservations::new(d)) as Box<dyn ReservationOps + Send>)
            .map_err(|e| e.to_string())
    }
}

type Request = (ResvInput, Option<oneshot::Sender<Vec<ResvEvent>>>);

/// A volume's reservation machine on its own thread.
#[derive(Debug)]
pub struct ReservationLink {
    requests: std::sync::mpsc::Sender<Request>,
    /// Events of inputs sent without a reply (start, Check, StepDown, Rejoin).
    pub events: mpsc::UnboundedReceiver<ResvEvent>,
}

impl ReservationLink {
    /// Starts the machine for `key` (probe, register) on a new thread.
    pub fn spawn(
        volume: &str,
        key: crate::core::reservation::Key,
        mut ops: Box<dyn ReservationOps + Send>,
    ) -> std::io::Result<ReservationLink> {
        let (req_tx, req_rx) = std::sync::mpsc::channel::<Request>();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let name = volume.to_owned();
        std::thread::Builder::new()
            .name(format!("resv-{volume}"))
            .spawn(move || {
                let span = tracing::info_span!("reservation", volume = %name);
                let _entered = span.enter();
                let mut machine = Reservation::new(key);
                for e in ops::start(&mut machine, ops.as_mut()) {
                    let _ = ev_tx.send(e);
                }
                while let Ok((input, reply)) = req_rx.recv() {
                    let events = ops::drive(&mut machine, ops.as_mut(), input);
                    match reply {
                        Some(r) => {
                            let _ = r.send(events);
                        }
                        None => {
                            for e in events {
                                let _ = ev_tx.send(e);
                            }
                        }
                    }
                }
            })?;
        Ok(ReservationLink {
            requests: req_tx,
            events: ev_rx,
        })
    }

    /// Sends `input`; its events come on [`ReservationLink::events`].
    pub fn send(&self, input: ResvInput) {
        let _ = self.requests.send((input, None));
    }

    /// Sends `input` and returns a receiver of its events.
    pub fn ask(&self, input: ResvInput) -> oneshot::Receiver<Vec<ResvEvent>> {
        let (tx, rx) = oneshot::channel();
        let _ = self.requests.send((input, Some(tx)));
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(case: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/sysfs")
            .join(case)
    }

    #[test]
    fn ids_resolve_to_the_namespace_under_the_dev_dir() {
        let root = fixture("single-path");
        let dev = tempfile::tempdir().unwrap();
        // Resolved, but no device node yet: missing.
        assert_eq!(
            locate(&root, dev.path(), Path::new("nvme0n1")).unwrap(),
            None
        );
        std::fs::write(dev.path().join("nvme0n1"), b"").unwrap();
        for spec in [
            "eui.00a0b1c2d3e4f501",
            "wwid:eui.00a0b1c2d3e4f501",
            "nvme0n1",
        ] {
            let l = locate(&root, dev.path(), Path::new(spec))
                .unwrap()
                .unwrap_or_else(|| panic!("{spec} not found"));
            assert_eq!(l.path, dev.path().join("nvme0n1"), "{spec}");
            assert_eq!(l.namespace.as_deref(), Some("nvme0n1"));
        }
        assert_eq!(
            locate(&root, Path::new("/dev"), Path::new("uuid.0000")).unwrap(),
            None
        );
        assert_eq!(
            locate(&root, Path::new("/dev"), Path::new("/nonexistent/dev")).unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn events_of_the_volume_become_path_lost_and_back_once() {
        let root = fixture("single-path");
        let (tx, rx) = mpsc::unbounded_channel();
        let (news_tx, mut news) = mpsc::unbounded_channel();
        let w = Watched {
            volume: "pg".into(),
            spec: "/nonexistent/nvme0n1".into(),
            located: Some(Located {
                path: "/dev/nvme0n1".into(),
                block_name: Some("nvme0n1".into()),
                namespace: Some("nvme0n1".into()),
            }),
            news: news_tx,
        };
        let router = tokio::spawn(route_events(root, "/dev".into(), rx, vec![w]));
        let lost = |n: &str| DeviceEvent::LastPathLost {
            namespace: n.into(),
        };
        let up = |n: &str| DeviceEvent::PathUp {
            namespace: n.into(),
            controller: "nvme0".into(),
        };
        for e in [
            up("nvme0n1"),
            lost("nvme1n1"),
            lost("nvme0n1"),
            lost("nvme0n1"),
        ] {
            tx.send(e).unwrap();
        }
        // A change of the namespace is not its path coming back.
        tx.send(DeviceEvent::Changed {
            name: "nvme0n1".into(),
            change: crate::device::Change::Resized,
        })
        .unwrap();
        tx.send(up("nvme0n1")).unwrap();
        tx.send(DeviceEvent::Removed {
            name: "nvme0n1".into(),
        })
        .unwrap();
        drop(tx);
        router.await.unwrap();
        let mut got = Vec::new();
        while let Ok(n) = news.try_recv() {
            got.push(n);
        }
        assert!(matches!(&got[0], DeviceNews::PathLost(w) if w.contains("no usable path")));
        assert_eq!(got[1], DeviceNews::PathBack);
        assert!(matches!(&got[2], DeviceNews::PathLost(w) if w.contains("removed")));
        assert_eq!(got.len(), 3, "{got:?}");
    }
}
