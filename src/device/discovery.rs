//! Discovery: NVMe namespaces, their controller paths, and other block devices
//! (loop devices), read from a sysfs tree.
//!
//! Everything is read under a root directory that stands for `/sys` (the real
//! one, or a fixture copy in tests/fixtures/sysfs/<case>/), only these files:
//!
//! - `block/<ns>/{dev,size,wwid,nguid,uuid,eui,nsid,ana_state,queue/io_timeout}`
//!   for a namespace `nvme<S>n<N>` (multipath head, or a namespace of one
//!   controller when native multipath is off);
//! - `class/nvme/nvme<C>/{state,transport,address,subsysnqn,model,serial,
//!   ctrl_loss_tmo,reconnect_delay,fast_io_fail_tmo,kato}` for each controller,
//!   and `class/nvme/nvme<C>/nvme<S>c<C>n<N>/{ana_state,ana_grpid,
//!   queue/io_timeout}` for each path of a multipath namespace;
//! - `class/nvme-subsystem/nvme-subsys<S>/iopolicy`;
//! - `module/nvme_core/parameters/io_timeout` (seconds);
//! - `block/<dev>/{dev,size,ro,loop/backing_file}` for any other block device.
//!
//! A path device is named `nvme<S>c<C>n<N>`: subsystem instance S (the same as
//! the head's), controller instance C, namespace instance N (kernel
//! `nvme_mpath_set_disk_name`). Missing optional files are `None`, never an
//! error; a namespace whose `dev` or `size` cannot be read is an error.
//! Read-only: nothing here writes.

use super::health::{AnaState, CtrlState};
use super::DeviceError;
use serde::Serialize;
use std::fs;
use std::path::{Path, PathBuf};

/// The Lightbits subsystem NQN prefix.
pub const LIGHTBITS_NQN_PREFIX: &str = "nqn.2016-01.com.lightbitslabs:";
/// Default of nvme_core.io_timeout when the module parameter is not readable, in s.
pub const DEFAULT_NVME_IO_TIMEOUT_S: u64 = 30;

/// A fabrics timeout attribute: absent (not a fabrics controller), `off`
/// (-1: forever), or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Tmo {
    #[default]
    Missing,
    Off,
    Seconds(u32),
}

impl Tmo {
    fn parse(s: &str) -> Option<Tmo> {
        let s = s.trim();
        if s == "off" {
            return Some(Tmo::Off);
        }
        match s.parse::<i64>() {
            Ok(v) if v < 0 => Some(Tmo::Off),
            Ok(v) => u32::try_from(v).ok().map(Tmo::Seconds),
            Err(_) => None,
        }
    }
}

/// The timeouts of one controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CtrlTimeouts {
    /// Keep-alive timeout in s (`kato`; 0 = no keep-alive).
    pub kato_s: Option<u32>,
    pub ctrl_loss_tmo: Tmo,
    pub reconnect_delay_s: Option<u32>,
    pub fast_io_fail_tmo: Tmo,
    /// The path device's queue I/O timeout in ms, if it has its own queue.
    pub path_io_timeout_ms: Option<u64>,
}

/// One controller path to a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NvmePath {
    /// `nvme<C>`.
    pub controller: String,
    /// `nvme<S>c<C>n<N>` with native multipath, else `None`.
    pub path_device: Option<String>,
    pub state: CtrlState,
    pub ana_state: Option<AnaState>,
    pub ana_group: Option<u32>,
    /// `tcp`, `rdma`, `fc`, `pcie`, `loop`.
    pub transport: String,
    pub address: String,
    pub timeouts: CtrlTimeouts,
}

/// Identifiers of a namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NsIds {
    pub wwid: Option<String>,
    pub nguid: Option<String>,
    pub uuid: Option<String>,
    pub eui64: Option<String>,
    pub nsid: Option<u32>,
}

/// An NVMe namespace as the block layer shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Namespace {
    /// `nvme<S>n<N>`.
    pub name: String,
    /// `/dev/nvme<S>n<N>`.
    pub dev_node: PathBuf,
    pub major_minor: (u32, u32),
    pub ids: NsIds,
    /// The storage's volume UUID: from a WWID `uuid.<uuid>` (Lightbits
    /// namespaces carry the volume UUID there).
    pub volume_uuid: Option<String>,
    pub size_bytes: u64,
    pub subsysnqn: Option<String>,
    pub model: Option<String>,
    pub iopolicy: Option<String>,
    /// True if the subsystem is a Lightbits cluster.
    pub lightbits: bool,
    /// True if the namespace is a native multipath head.
    pub multipath: bool,
    /// Effective I/O timeout of the namespace's queue in ms
    /// (`queue/io_timeout`, else `nvme_core.io_timeout`).
    pub io_timeout_ms: u64,
    pub paths: Vec<NvmePath>,
}

/// A block device that is not an NVMe namespace (loop device, other disk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockInfo {
    pub name: String,
    pub dev_node: PathBuf,
    pub major_minor: Option<(u32, u32)>,
    pub size_bytes: u64,
    pub read_only: bool,
    /// For a loop device, its backing file.
    pub loop_backing_file: Option<PathBuf>,
}

/// What a volume name resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Volume {
    Nvme(Box<Namespace>),
    Block(BlockInfo),
}

fn read_opt(path: &Path) -> Option<String> {
    fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn read_req(path: &Path) -> Result<String, DeviceError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| DeviceError::Read {
            path: path.to_owned(),
            source,
        })
}

fn parse_dev(path: &Path) -> Result<(u32, u32), DeviceError> {
    let s = read_req(path)?;
    let bad = || DeviceError::Parse {
        path: path.to_owned(),
        content: s.clone(),
        what: "expected MAJOR:MINOR",
    };
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    Ok((a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?))
}

fn parse_size(path: &Path) -> Result<u64, DeviceError> {
    let s = read_req(path)?;
    s.parse::<u64>()
        .map(|sectors| sectors * 512)
        .map_err(|_| DeviceError::Parse {
            path: path.to_owned(),
            content: s.clone(),
            what: "expected a number of 512-byte sectors",
        })
}

/// `nvme<A>n<N>` -> (A, N); `None` for anything else (partitions, path devices).
pub fn parse_ns_name(name: &str) -> Option<(u32, u32)> {
    let rest = name.strip_prefix("nvme")?;
    let (a, n) = rest.split_once('n')?;
    if a.is_empty()
        || n.is_empty()
        || !a.bytes().all(|b| b.is_ascii_digit())
        || !n.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((a.parse().ok()?, n.parse().ok()?))
}

fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|s| natural_key(s));
    v
}

/// Sort key so that nvme2 comes before nvme10.
fn natural_key(s: &str) -> (String, u64) {
    let digits: String = s.chars().rev().take_while(|c| c.is_ascii_digit()).collect();
    let n = digits
        .chars()
        .rev()
        .collect::<String>()
        .parse()
        .unwrap_or(0);
    (s[..s.len() - digits.len()].to_owned(), n)
}

/// The effective nvme_core I/O timeout in ms.
pub fn nvme_core_io_timeout_ms(root: &Path) -> u64 {
    read_opt(&root.join("module/nvme_core/parameters/io_timeout"))
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(DEFAULT_NVME_IO_TIMEOUT_S)
        * 1000
}

fn read_path(root: &Path, controller: &str, path_device: Option<&str>, ns_dir: &Path) -> NvmePath {
    let c = root.join("class/nvme").join(controller);
    let num = |f: &str| read_opt(&c.join(f)).and_then(|s| s.parse::<u32>().ok());
    let tmo = |f: &str| {
        read_opt(&c.join(f))
            .and_then(|s| Tmo::parse(&s))
            .unwrap_or_default()
    };
    let pdir = path_device.map_or_else(|| ns_dir.to_owned(), |p| c.join(p));
    NvmePath {
        controller: controller.to_owned(),
        path_device: path_device.map(str::to_owned),
        state: read_opt(&c.join("state")).map_or(CtrlState::Unknown("missing".into()), |s| {
            CtrlState::parse(&s)
        }),
        ana_state: read_opt(&pdir.join("ana_state")).map(|s| AnaState::parse(&s)),
        ana_group: read_opt(&pdir.join("ana_grpid")).and_then(|s| s.parse().ok()),
        transport: read_opt(&c.join("transport")).unwrap_or_default(),
        address: read_opt(&c.join("address")).unwrap_or_default(),
        timeouts: CtrlTimeouts {
            kato_s: num("kato"),
            ctrl_loss_tmo: tmo("ctrl_loss_tmo"),
            reconnect_delay_s: num("reconnect_delay"),
            fast_io_fail_tmo: tmo("fast_io_fail_tmo"),
            path_io_timeout_ms: path_device
                .and_then(|_| read_opt(&pdir.join("queue/io_timeout")))
                .and_then(|s| s.parse().ok()),
        },
    }
}

/// Reads one namespace `name` (`nvme<S>n<N>`).
pub fn read_namespace(root: &Path, name: &str) -> Result<Namespace, DeviceError> {
    let (s, n) = parse_ns_name(name).ok_or_else(|| DeviceError::NotFound {
        id: name.to_owned(),
        root: root.to_owned(),
    })?;
    let dir = root.join("block").join(name);
    let major_minor = parse_dev(&dir.join("dev"))?;
    let size_bytes = parse_size(&dir.join("size"))?;
    let ids = NsIds {
        wwid: read_opt(&dir.join("wwid")),
        nguid: read_opt(&dir.join("nguid")),
        uuid: read_opt(&dir.join("uuid")),
        eui64: read_opt(&dir.join("eui")),
        nsid: read_opt(&dir.join("nsid")).and_then(|v| v.parse().ok()),
    };
    // Paths: every controller that has a path device nvme<S>c<C>n<N>.
    let mut paths = Vec::new();
    for ctrl in list_dir(&root.join("class/nvme")) {
        let Some(c) = ctrl
            .strip_prefix("nvme")
            .and_then(|c| c.parse::<u32>().ok())
        else {
            continue;
        };
        let pdev = format!("nvme{s}c{c}n{n}");
        if root.join("class/nvme").join(&ctrl).join(&pdev).is_dir() {
            paths.push(read_path(root, &ctrl, Some(&pdev), &dir));
        }
    }
    let multipath = !paths.is_empty();
    if !multipath {
        // Native multipath off: nvme<C>n<N> belongs to controller nvme<C>.
        let ctrl = format!("nvme{s}");
        if root.join("class/nvme").join(&ctrl).is_dir() {
            paths.push(read_path(root, &ctrl, None, &dir));
        }
    }
    let first = paths
        .first()
        .map(|p| root.join("class/nvme").join(&p.controller));
    let subsysnqn = first.as_ref().and_then(|c| read_opt(&c.join("subsysnqn")));
    let model = first.as_ref().and_then(|c| read_opt(&c.join("model")));
    let lightbits = subsysnqn
        .as_deref()
        .is_some_and(|q| q.starts_with(LIGHTBITS_NQN_PREFIX))
        || model.as_deref().is_some_and(|m| m.contains("Lightbits"));
    let volume_uuid = ids
        .wwid
        .as_deref()
        .and_then(|w| w.strip_prefix("uuid."))
        .map(str::to_ascii_lowercase);
    let io_timeout_ms = read_opt(&dir.join("queue/io_timeout"))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| nvme_core_io_timeout_ms(root));
    Ok(Namespace {
        name: name.to_owned(),
        dev_node: PathBuf::from("/dev").join(name),
        major_minor,
        ids,
        volume_uuid,
        size_bytes,
        subsysnqn,
        model,
        iopolicy: read_opt(&root.join(format!("class/nvme-subsystem/nvme-subsys{s}/iopolicy"))),
        lightbits,
        multipath,
        io_timeout_ms,
        paths,
    })
}

/// Every NVMe namespace under `root/block`, in name order.
pub fn scan(root: &Path) -> Result<Vec<Namespace>, DeviceError> {
    list_dir(&root.join("block"))
        .into_iter()
        .filter(|n| parse_ns_name(n).is_some())
        .map(|n| read_namespace(root, &n))
        .collect()
}

/// Reads any block device `root/block/<name>`.
pub fn read_block(root: &Path, name: &str) -> Result<BlockInfo, DeviceError> {
    let dir = root.join("block").join(name);
    if !dir.exists() {
        return Err(DeviceError::NotFound {
            id: name.to_owned(),
            root: root.to_owned(),
        });
    }
    Ok(BlockInfo {
        name: name.to_owned(),
        dev_node: PathBuf::from("/dev").join(name),
        major_minor: parse_dev(&dir.join("dev")).ok(),
        size_bytes: parse_size(&dir.join("size"))?,
        read_only: read_opt(&dir.join("ro")).is_some_and(|v| v == "1"),
        loop_backing_file: read_opt(&dir.join("loop/backing_file")).map(PathBuf::from),
    })
}

fn norm(s: &str) -> String {
    s.trim().to_ascii_lowercase().replace('-', "")
}

/// True if `id` names this namespace by one of its identifiers.
pub fn matches(ns: &Namespace, id: &str) -> bool {
    let want = norm(id.strip_prefix("uuid.").unwrap_or(id));
    if want.is_empty() {
        return false;
    }
    let ids = [
        ns.ids.wwid.as_deref(),
        ns.ids.wwid.as_deref().and_then(|w| w.strip_prefix("uuid.")),
        ns.ids.nguid.as_deref(),
        ns.ids.uuid.as_deref(),
        ns.ids.eui64.as_deref(),
        ns.volume_uuid.as_deref(),
    ];
    ids.iter().flatten().any(|v| norm(v) == want)
}

/// Finds the volume named `id`: `/dev/NAME` or `NAME` of a block device (a
/// symlink such as /dev/disk/by-id/... is followed when `root` is the real
/// /sys), or a WWID / NGUID / UUID / EUI-64 / Lightbits volume UUID of an NVMe
/// namespace. `Ok(None)` if nothing matches.
pub fn resolve(root: &Path, id: &str) -> Result<Option<Volume>, DeviceError> {
    let mut name = id.strip_prefix("/dev/").unwrap_or(id).to_owned();
    if id.starts_with('/') && root == Path::new("/sys") {
        if let Ok(real) = fs::canonicalize(id) {
            if let Some(n) = real.strip_prefix("/dev").ok().and_then(|p| p.to_str()) {
                name = n.to_owned();
            }
        }
    }
    if !name.contains('/') && !name.is_empty() && root.join("block").join(&name).exists() {
        return Ok(Some(if parse_ns_name(&name).is_some() {
            Volume::Nvme(Box::new(read_namespace(root, &name)?))
        } else {
            Volume::Block(read_block(root, &name)?)
        }));
    }
    Ok(scan(root)?
        .into_iter()
        .find(|ns| matches(ns, id))
        .map(|ns| Volume::Nvme(Box::new(ns))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_names() {
        assert_eq!(parse_ns_name("nvme0n1"), Some((0, 1)));
        assert_eq!(parse_ns_name("nvme12n3"), Some((12, 3)));
        assert_eq!(parse_ns_name("nvme0c1n1"), None);
        assert_eq!(parse_ns_name("nvme0n1p1"), None);
        assert_eq!(parse_ns_name("loop0"), None);
        assert_eq!(parse_ns_name("nvmen1"), None);
    }

    #[test]
    fn timeouts_parse_off_and_numbers() {
        assert_eq!(Tmo::parse("off\n"), Some(Tmo::Off));
        assert_eq!(Tmo::parse("-1"), Some(Tmo::Off));
        assert_eq!(Tmo::parse("600"), Some(Tmo::Seconds(600)));
        assert_eq!(Tmo::parse("x"), None);
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["nvme10", "nvme2", "nvme1"];
        v.sort_by_key(|s| natural_key(s));
        assert_eq!(v, ["nvme1", "nvme2", "nvme10"]);
    }
}
