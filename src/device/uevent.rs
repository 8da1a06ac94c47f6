//! Kernel uevents: the one parser, and the classification into
//! [`DeviceEvent`]s.
//!
//! A kernel uevent on the `NETLINK_KOBJECT_UEVENT` socket (group 1) is
//! `ACTION@DEVPATH\0KEY=VALUE\0KEY=VALUE\0...`. Messages that udev rebroadcasts
//! (group 2) start with `libudev\0` and a binary header; they are not parsed
//! here (the udev source of [`super::monitor`] gets properties from libudev).
//! Recorded fixture sequences (tests/fixtures/uevents/*.txt: one event per
//! block of `KEY=VALUE` lines, blocks separated by a blank line, `#` comments)
//! are turned into the same bytes and go through [`parse`], so a replay runs
//! the code a live socket runs.
//!
//! Pure: no I/O. The parser takes any bytes without panicking (the monitor
//! also drops messages whose sender is not the kernel).

use super::{Change, DeviceEvent};
use std::collections::BTreeMap;

/// One parsed uevent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Uevent {
    pub action: String,
    pub devpath: String,
    pub props: BTreeMap<String, String>,
}

impl Uevent {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.props.get(key).map(String::as_str)
    }
}

/// Parses one message. `None` for a libudev message, an empty message, or one
/// without ACTION and DEVPATH.
pub fn parse(buf: &[u8]) -> Option<Uevent> {
    if buf.starts_with(b"libudev\0") {
        return None;
    }
    let mut ev = Uevent::default();
    for field in buf.split(|&b| b == 0) {
        let Ok(field) = std::str::from_utf8(field) else {
            continue;
        };
        if let Some((k, v)) = field.split_once('=') {
            ev.props.insert(k.to_owned(), v.to_owned());
        } else if let Some((action, path)) = field.split_once('@') {
            // The header; the ACTION/DEVPATH properties below repeat it.
            ev.action = action.to_owned();
            ev.devpath = path.to_owned();
        }
    }
    if let Some(a) = ev.props.get("ACTION") {
        ev.action = a.clone();
    }
    if let Some(p) = ev.props.get("DEVPATH") {
        ev.devpath = p.clone();
    }
    (!ev.action.is_empty() && !ev.devpath.is_empty()).then_some(ev)
}

/// Splits a fixture text into messages in the kernel's wire format.
pub fn fixture_messages(text: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') {
            continue;
        }
        if line.is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        cur.extend_from_slice(line.as_bytes());
        cur.push(0);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Parses a recorded fixture sequence through [`parse`].
pub fn parse_fixture(text: &str) -> Vec<Uevent> {
    fixture_messages(text)
        .iter()
        .filter_map(|m| parse(m))
        .collect()
}

fn devname(ev: &Uevent) -> String {
    ev.get("DEVNAME")
        .map(|d| d.strip_prefix("/dev/").unwrap_or(d).to_owned())
        .unwrap_or_else(|| ev.devpath.rsplit('/').next().unwrap_or_default().to_owned())
}

/// True for `nvme<S>c<C>n<N>`, a hidden multipath path device.
fn is_path_device(name: &str) -> bool {
    name.strip_prefix("nvme")
        .and_then(|r| r.split_once('c'))
        .is_some_and(|(s, rest)| {
            !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && rest.contains('n')
        })
}

/// The device event a uevent means, if any: block disks (add, remove,
/// change/resize), NVMe controllers (any action: re-read their paths).
/// Partitions and other subsystems give `None`.
pub fn classify(ev: &Uevent) -> Option<DeviceEvent> {
    let subsystem = ev.get("SUBSYSTEM")?;
    let name = devname(ev);
    match subsystem {
        "block" if ev.get("DEVTYPE") == Some("disk") => {
            if is_path_device(&name) {
                // A path appeared or went: the namespace's paths changed.
                let ctrl = name
                    .split_once('c')
                    .and_then(|(_, r)| r.split_once('n'))
                    .map(|(c, _)| format!("nvme{c}"))
                    .unwrap_or_default();
                return Some(DeviceEvent::Controller {
                    name: ctrl,
                    detail: format!("path {name} {}", ev.action),
                });
            }
            match ev.action.as_str() {
                "add" => Some(DeviceEvent::Added {
                    name,
                    major_minor: ev
                        .get("MAJOR")
                        .zip(ev.get("MINOR"))
                        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?))),
                }),
                "remove" => Some(DeviceEvent::Removed { name }),
                "change" => Some(DeviceEvent::Changed {
                    name,
                    change: if ev.get("RESIZE") == Some("1") {
                        Change::Resized
                    } else if ev.get("DISK_MEDIA_CHANGE") == Some("1") {
                        Change::Media
                    } else {
                        Change::Other
                    },
                }),
                _ => None,
            }
        }
        "nvme" => {
            let mut detail = ev.action.clone();
            for k in ["NVME_EVENT", "NVME_AEN", "NVME_TRTYPE"] {
                if let Some(v) = ev.get(k) {
                    detail.push_str(&format!(" {k}={v}"));
                }
            }
            Some(DeviceEvent::Controller { name, detail })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_wire_format() {
        let msg = b"change@/devices/virtual/block/loop3\0ACTION=change\0DEVPATH=/devices/virtual/block/loop3\0SUBSYSTEM=block\0RESIZE=1\0MAJOR=7\0MINOR=3\0DEVNAME=loop3\0DEVTYPE=disk\0SEQNUM=42\0";
        let ev = parse(msg).unwrap();
        assert_eq!(ev.action, "change");
        assert_eq!(ev.get("SEQNUM"), Some("42"));
        assert_eq!(
            classify(&ev),
            Some(DeviceEvent::Changed {
                name: "loop3".into(),
                change: Change::Resized
            })
        );
    }

    #[test]
    fn rejects_junk_without_panicking() {
        assert_eq!(parse(b""), None);
        assert_eq!(parse(b"libudev\0\xfe\xed"), None);
        assert_eq!(parse(b"\xff\xfe\0=\0@\0"), None);
        assert_eq!(parse(b"KEY=VALUE\0"), None);
    }

    #[test]
    fn classifies_nvme_and_ignores_partitions() {
        let part = parse(b"ACTION=add\0DEVPATH=/x/nvme0n1p1\0SUBSYSTEM=block\0DEVTYPE=partition\0DEVNAME=nvme0n1p1\0").unwrap();
        assert_eq!(classify(&part), None);
        let ctrl = parse(b"ACTION=change\0DEVPATH=/devices/virtual/nvme-fabrics/ctl/nvme1\0SUBSYSTEM=nvme\0DEVNAME=nvme1\0NVME_EVENT=connected\0").unwrap();
        assert_eq!(
            classify(&ctrl),
            Some(DeviceEvent::Controller {
                name: "nvme1".into(),
                detail: "change NVME_EVENT=connected".into()
            })
        );
        let path = parse(b"ACTION=remove\0DEVPATH=/x/nvme0c1n1\0SUBSYSTEM=block\0DEVTYPE=disk\0DEVNAME=nvme0c1n1\0").unwrap();
        assert!(
            matches!(classify(&path), Some(DeviceEvent::Controller { name, .. }) if name == "nvme1")
        );
    }

    #[test]
    fn fixture_text_becomes_the_wire_format() {
        let text = "# comment\nACTION=add\nDEVPATH=/devices/virtual/block/loop0\nSUBSYSTEM=block\nDEVTYPE=disk\nDEVNAME=loop0\nMAJOR=7\nMINOR=0\n\n\nACTION=remove\nDEVPATH=/devices/virtual/block/loop0\nSUBSYSTEM=block\nDEVTYPE=disk\nDEVNAME=loop0\n";
        let evs = parse_fixture(text);
        assert_eq!(evs.len(), 2);
        assert_eq!(
            classify(&evs[0]),
            Some(DeviceEvent::Added {
                name: "loop0".into(),
                major_minor: Some((7, 0))
            })
        );
        assert_eq!(
            classify(&evs[1]),
            Some(DeviceEvent::Removed {
                name: "loop0".into()
            })
        );
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_without_panicking(buf in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Some(ev) = parse(&buf) {
                let _ = classify(&ev);
            }
        }

        #[test]
        fn wire_format_round_trips(action in "(add|remove|change)", name in "[a-z]{1,8}[0-9]{0,3}", resize in proptest::prelude::any::<bool>()) {
            let mut msg = format!("{action}@/devices/virtual/block/{name}\0ACTION={action}\0DEVPATH=/devices/virtual/block/{name}\0SUBSYSTEM=block\0DEVTYPE=disk\0DEVNAME={name}\0");
            if resize {
                msg.push_str("RESIZE=1\0");
            }
            let ev = parse(msg.as_bytes()).unwrap();
            proptest::prop_assert_eq!(&ev.action, &action);
            proptest::prop_assert_eq!(ev.get("DEVNAME"), Some(name.as_str()));
        }
    }
}
