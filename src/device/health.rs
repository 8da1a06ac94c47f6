//! Path health: controller states, ANA states, and whether a namespace still
//! has a usable path.
//!
//! A path of a namespace is one controller (`/sys/class/nvme/nvmeX`) reaching
//! it; its state is the controller's `state` and, with ANA, the `ana_state` of
//! the path device `nvmeXcYnZ`. A path is *usable* when the controller is
//! `live` and the ANA state is optimized or non-optimized (or the subsystem
//! has no ANA). Losing the last usable path is [`DeviceEvent::LastPathLost`].
//!
//! Pure: the states are read by [`super::discovery`]; the tracker only compares
//! snapshots. It must not read sysfs or clocks.

use super::discovery::NvmePath;
use super::DeviceEvent;
use serde::Serialize;
use std::collections::BTreeMap;

/// `/sys/class/nvme/nvmeX/state` (kernel `nvme_sysfs_show_state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CtrlState {
    New,
    Live,
    Resetting,
    Connecting,
    Deleting,
    DeletingNoIo,
    Dead,
    /// Anything else the kernel may print, kept verbatim.
    Unknown(String),
}

impl CtrlState {
    pub fn parse(s: &str) -> CtrlState {
        match s.trim() {
            "new" => CtrlState::New,
            "live" => CtrlState::Live,
            "resetting" => CtrlState::Resetting,
            "connecting" => CtrlState::Connecting,
            "deleting" => CtrlState::Deleting,
            "deleting (no IO)" => CtrlState::DeletingNoIo,
            "dead" => CtrlState::Dead,
            other => CtrlState::Unknown(other.to_owned()),
        }
    }

    /// True if native multipath keeps I/O queued for this controller
    /// (`nvme_available_path`: live, resetting or connecting).
    pub fn keeps_io_queued(&self) -> bool {
        matches!(
            self,
            CtrlState::Live | CtrlState::Resetting | CtrlState::Connecting
        )
    }

    pub fn as_str(&self) -> &str {
        match self {
            CtrlState::New => "new",
            CtrlState::Live => "live",
            CtrlState::Resetting => "resetting",
            CtrlState::Connecting => "connecting",
            CtrlState::Deleting => "deleting",
            CtrlState::DeletingNoIo => "deleting (no IO)",
            CtrlState::Dead => "dead",
            CtrlState::Unknown(s) => s,
        }
    }
}

/// `ana_state` of a path device (kernel `nvme_ana_state_names`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnaState {
    Optimized,
    NonOptimized,
    Inaccessible,
    PersistentLoss,
    Change,
    Unknown(String),
}

impl AnaState {
    pub fn parse(s: &str) -> AnaState {
        match s.trim() {
            "optimized" => AnaState::Optimized,
            "non-optimized" => AnaState::NonOptimized,
            "inaccessible" => AnaState::Inaccessible,
            "persistent-loss" => AnaState::PersistentLoss,
            "change" => AnaState::Change,
            other => AnaState::Unknown(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            AnaState::Optimized => "optimized",
            AnaState::NonOptimized => "non-optimized",
            AnaState::Inaccessible => "inaccessible",
            AnaState::PersistentLoss => "persistent-loss",
            AnaState::Change => "change",
            AnaState::Unknown(s) => s,
        }
    }

    /// I/O can be sent on a path in this state.
    pub fn accessible(&self) -> bool {
        matches!(self, AnaState::Optimized | AnaState::NonOptimized)
    }
}

/// True if I/O can go down this path now.
pub fn path_usable(p: &NvmePath) -> bool {
    p.state == CtrlState::Live && p.ana_state.as_ref().map_or(true, AnaState::accessible)
}

/// True if at least one path is usable.
pub fn usable(paths: &[NvmePath]) -> bool {
    paths.iter().any(path_usable)
}

/// Remembers, per namespace, which paths were usable, and reports changes.
#[derive(Debug, Default, Clone)]
pub struct PathTracker {
    /// namespace -> controller -> usable
    seen: BTreeMap<String, BTreeMap<String, bool>>,
}

impl PathTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Compares a new snapshot of `namespace`'s paths with the last one and
    /// returns the events: PathDown / PathUp per controller, then
    /// LastPathLost if the namespace had a usable path and has none now. The
    /// first snapshot of a namespace reports only what is down (and
    /// LastPathLost if nothing is usable).
    pub fn observe(&mut self, namespace: &str, paths: &[NvmePath]) -> Vec<DeviceEvent> {
        let prev = self.seen.get(namespace);
        let had_usable = prev.map_or(true, |m| m.values().any(|&u| u));
        let mut events = Vec::new();
        let mut now = BTreeMap::new();
        for p in paths {
            let u = path_usable(p);
            let before = prev.and_then(|m| m.get(&p.controller)).copied();
            match (before, u) {
                (Some(true) | None, false) => events.push(DeviceEvent::PathDown {
                    namespace: namespace.to_owned(),
                    controller: p.controller.clone(),
                    state: p.state.clone(),
                    ana_state: p.ana_state.clone(),
                }),
                (Some(false), true) => events.push(DeviceEvent::PathUp {
                    namespace: namespace.to_owned(),
                    controller: p.controller.clone(),
                }),
                _ => {}
            }
            now.insert(p.controller.clone(), u);
        }
        // A path that vanished (controller deleted) is down.
        if let Some(m) = prev {
            for (c, &u) in m {
                if u && !now.contains_key(c) {
                    events.push(DeviceEvent::PathDown {
                        namespace: namespace.to_owned(),
                        controller: c.clone(),
                        state: CtrlState::Dead,
                        ana_state: None,
                    });
                }
            }
        }
        if had_usable && !now.values().any(|&u| u) {
            events.push(DeviceEvent::LastPathLost {
                namespace: namespace.to_owned(),
            });
        }
        self.seen.insert(namespace.to_owned(), now);
        events
    }

    /// Forgets a namespace (removed).
    pub fn forget(&mut self, namespace: &str) {
        self.seen.remove(namespace);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::discovery::CtrlTimeouts;

    fn path(c: &str, state: CtrlState, ana: Option<AnaState>) -> NvmePath {
        NvmePath {
            controller: c.into(),
            path_device: None,
            state,
            ana_state: ana,
            ana_group: None,
            transport: "tcp".into(),
            address: String::new(),
            timeouts: CtrlTimeouts::default(),
        }
    }

    #[test]
    fn usable_needs_a_live_accessible_path() {
        use AnaState::*;
        use CtrlState::*;
        assert!(!usable(&[]));
        assert!(usable(&[path("nvme0", Live, None)]));
        assert!(usable(&[path("nvme0", Live, Some(NonOptimized))]));
        assert!(!usable(&[
            path("nvme0", Live, Some(Inaccessible)),
            path("nvme1", Connecting, Some(Optimized)),
            path("nvme2", Live, Some(PersistentLoss)),
            path("nvme3", Live, Some(Change)),
            path("nvme4", Resetting, None),
        ]));
        assert!(usable(&[
            path("nvme0", Live, Some(Inaccessible)),
            path("nvme1", Live, Some(Optimized)),
        ]));
    }

    #[test]
    fn states_parse_as_the_kernel_prints_them() {
        assert_eq!(CtrlState::parse("live\n"), CtrlState::Live);
        assert_eq!(
            CtrlState::parse("deleting (no IO)"),
            CtrlState::DeletingNoIo
        );
        assert_eq!(
            CtrlState::parse("weird"),
            CtrlState::Unknown("weird".into())
        );
        assert_eq!(AnaState::parse("non-optimized\n"), AnaState::NonOptimized);
        assert_eq!(AnaState::parse("persistent-loss"), AnaState::PersistentLoss);
        assert!(CtrlState::Connecting.keeps_io_queued());
        assert!(!CtrlState::Deleting.keeps_io_queued());
    }

    #[test]
    fn tracker_reports_down_up_and_the_last_path() {
        use AnaState::*;
        use CtrlState::*;
        let mut t = PathTracker::new();
        let both = [
            path("nvme0", Live, Some(Optimized)),
            path("nvme1", Live, Some(NonOptimized)),
        ];
        assert!(t.observe("nvme0n1", &both).is_empty());
        let ev = t.observe(
            "nvme0n1",
            &[
                path("nvme0", Connecting, Some(Optimized)),
                path("nvme1", Live, Some(NonOptimized)),
            ],
        );
        assert!(
            matches!(ev.as_slice(), [DeviceEvent::PathDown { controller, .. }] if controller == "nvme0")
        );
        let ev = t.observe("nvme0n1", &[path("nvme1", Live, Some(Inaccessible))]);
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(
            matches!(&ev[0], DeviceEvent::PathDown { controller, .. } if controller == "nvme1")
        );
        assert_eq!(
            ev[1],
            DeviceEvent::LastPathLost {
                namespace: "nvme0n1".into()
            }
        );
        // Still nothing usable: no repeated LastPathLost.
        assert!(t
            .observe("nvme0n1", &[path("nvme1", Live, Some(Inaccessible))])
            .is_empty());
        let ev = t.observe("nvme0n1", &[path("nvme1", Live, Some(Optimized))]);
        assert_eq!(
            ev,
            vec![DeviceEvent::PathUp {
                namespace: "nvme0n1".into(),
                controller: "nvme1".into()
            }]
        );
    }

    #[test]
    fn first_snapshot_without_a_usable_path_is_a_loss() {
        let mut t = PathTracker::new();
        let ev = t.observe("nvme0n1", &[path("nvme0", CtrlState::Connecting, None)]);
        assert_eq!(ev.len(), 2);
        assert!(matches!(ev[1], DeviceEvent::LastPathLost { .. }));
    }
}
