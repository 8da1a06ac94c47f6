//! `blockfence doctor`: per volume, is this node's device set up so that the
//! lease can protect it? NVMe paths and their health, the stale-I/O guard
//! (can queued writes outlive a takeover?), reservation support; with the
//! exact fix for every failure.
//!
//! Reads sysfs (the real one or `--sysfs-root`), and only on the real /sys
//! sends Identify to the namespace to learn about reservations. Changes
//! nothing. Exit code 0 when every volume passes, 1 when any fails (or on an
//! error), 2 for a bad command line.

use super::exit;
use crate::core::params::{self, Params};
use crate::device::discovery::{self, Namespace, Volume};
use crate::device::guard::{self, Lifetime, Verdict};
use crate::device::health::{path_usable, usable};
use anyhow::Context;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Default sysfs root.
pub const DEFAULT_SYSFS_ROOT: &str = "/sys";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print one JSON document instead of text.
    #[arg(long, env = "BLOCKFENCE_DOCTOR_JSON")]
    pub json: bool,
    /// Directory that stands for /sys (a copy for tests). Reservations are
    /// probed only when this is the real /sys.
    #[arg(long, env = "BLOCKFENCE_SYSFS_ROOT", default_value = DEFAULT_SYSFS_ROOT)]
    pub sysfs_root: PathBuf,
    /// A volume to check, as NAME=DEVICE_OR_ID: /dev/nvme0n1, nvme0n1, loop0,
    /// or a WWID / NGUID / UUID / Lightbits volume UUID (repeatable). Without
    /// it, every NVMe namespace found is checked.
    #[arg(
        long = "volume",
        value_name = "NAME=DEVICE_OR_ID",
        env = "BLOCKFENCE_DOCTOR_VOLUMES",
        value_delimiter = ','
    )]
    pub volumes: Vec<String>,
    /// The lease I/O deadline of the volume's lease parameters, ms.
    #[arg(long, env = "BLOCKFENCE_IO_TIMEOUT_MS", default_value_t = params::DEFAULT_IO_TIMEOUT_MS)]
    pub io_timeout_ms: u32,
    /// The renewal interval, ms.
    #[arg(long, env = "BLOCKFENCE_RENEW_INTERVAL_MS", default_value_t = params::DEFAULT_RENEW_INTERVAL_MS)]
    pub renew_interval_ms: u32,
    /// The lease validity after a renewal starts, ms.
    #[arg(long, env = "BLOCKFENCE_LEASE_TIMEOUT_MS", default_value_t = params::DEFAULT_LEASE_TIMEOUT_MS)]
    pub lease_timeout_ms: u32,
    /// The time the fence may take, ms.
    #[arg(long, env = "BLOCKFENCE_FENCE_TIMEOUT_MS", default_value_t = params::DEFAULT_FENCE_TIMEOUT_MS)]
    pub fence_timeout_ms: u32,
}

/// One path as reported.
#[derive(Debug, Serialize)]
struct PathReport {
    controller: String,
    state: String,
    ana_state: Option<String>,
    usable: bool,
    transport: String,
    address: String,
}

/// What doctor found out about reservations.
#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
enum ResvReport {
    Supported,
    /// Disk lease only.
    Unsupported {
        reason: String,
    },
    NotProbed {
        reason: String,
    },
    Error {
        error: String,
    },
}

#[derive(Debug, Serialize)]
struct VolumeReport {
    name: String,
    id: String,
    pass: bool,
    kind: &'static str,
    device: Option<PathBuf>,
    problems: Vec<String>,
    fixes: Vec<String>,
    notes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<Box<Namespace>>,
    paths: Vec<PathReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    guard: Option<Verdict>,
    reservations: ResvReport,
}

#[derive(Debug, Serialize)]
struct Report {
    sysfs_root: PathBuf,
    params: Params,
    host_dead_ms: u64,
    budget_ms: u64,
    nvme_found: bool,
    pass: bool,
    volumes: Vec<VolumeReport>,
}

fn probe_reservations(root: &Path, ns: &Namespace) -> ResvReport {
    if root != Path::new(DEFAULT_SYSFS_ROOT) {
        return ResvReport::NotProbed {
            reason: "--sysfs-root is not /sys: no device to ask".into(),
        };
    }
    match crate::nvme::ops::probe_device(&ns.dev_node) {
        Ok(s) => match s.reason() {
            None => ResvReport::Supported,
            Some(reason) => ResvReport::Unsupported { reason },
        },
        Err(e) => ResvReport::Error {
            error: e.to_string(),
        },
    }
}

fn lifetime_text(l: &Lifetime) -> String {
    match l {
        Lifetime::Bounded {
            ms,
            detect_ms,
            requeue_ms,
            by,
        } => {
            format!("{ms} ms (detect {detect_ms} ms + requeue {requeue_ms} ms until {by})")
        }
        Lifetime::Unbounded => "forever (ctrl_loss_tmo off and fast_io_fail_tmo off)".into(),
    }
}

fn check_namespace(name: &str, id: &str, root: &Path, ns: Namespace, p: &Params) -> VolumeReport {
    let verdict = guard::evaluate(&ns, p);
    let mut problems = Vec::new();
    let mut fixes = verdict.fixes.clone();
    let mut notes = Vec::new();
    for v in verdict.paths.iter().filter(|v| !v.pass) {
        problems.push(format!(
            "path {}: queued writes can live {}, longer than the {} ms before a peer may take over",
            v.controller,
            lifetime_text(&v.lifetime),
            verdict.budget_ms
        ));
    }
    if ns.paths.is_empty() {
        problems.push("no controller path found for this namespace".into());
    } else if !usable(&ns.paths) {
        problems.push(
            "no usable path: every controller is down, connecting or ANA-inaccessible".into(),
        );
        fixes.push(format!(
            "check the network to {} and `nvme list-subsys /dev/{}`; the daemon treats this as LastPathLost",
            ns.paths.iter().map(|p| p.address.as_str()).collect::<Vec<_>>().join(" / "),
            ns.name
        ));
    }
    if ns.lightbits {
        notes.push(format!(
            "Lightbits volume {} (subsystem {})",
            ns.volume_uuid.as_deref().unwrap_or("?"),
            ns.subsysnqn.as_deref().unwrap_or("?")
        ));
    }
    let reservations = probe_reservations(root, &ns);
    match &reservations {
        ResvReport::Unsupported { reason } => notes.push(format!(
            "reservations unsupported ({reason}): the disk lease alone protects this volume; a paused or partitioned old holder is stopped only by its own fence and the timeouts above"
        )),
        ResvReport::Error { error } => notes.push(format!("reservation support unknown: {error}")),
        _ => {}
    }
    let paths = ns
        .paths
        .iter()
        .map(|x| PathReport {
            controller: x.controller.clone(),
            state: x.state.as_str().to_owned(),
            ana_state: x.ana_state.as_ref().map(|a| a.as_str().to_owned()),
            usable: path_usable(x),
            transport: x.transport.clone(),
            address: x.address.clone(),
        })
        .collect();
    VolumeReport {
        name: name.to_owned(),
        id: id.to_owned(),
        pass: problems.is_empty(),
        kind: "nvme",
        device: Some(ns.dev_node.clone()),
        problems,
        fixes,
        notes,
        namespace: Some(Box::new(ns)),
        paths,
        guard: Some(verdict),
        reservations,
    }
}

fn check(name: &str, id: &str, root: &Path, p: &Params) -> VolumeReport {
    let failed = |problem: String, fix: String| VolumeReport {
        name: name.to_owned(),
        id: id.to_owned(),
        pass: false,
        kind: "unknown",
        device: None,
        problems: vec![problem],
        fixes: vec![fix],
        notes: Vec::new(),
        namespace: None,
        paths: Vec::new(),
        guard: None,
        reservations: ResvReport::NotProbed {
            reason: "no device".into(),
        },
    };
    match discovery::resolve(root, id) {
        Ok(Some(Volume::Nvme(ns))) => check_namespace(name, id, root, *ns, p),
        Ok(Some(Volume::Block(b))) => VolumeReport {
            name: name.to_owned(),
            id: id.to_owned(),
            pass: true,
            kind: "block",
            device: Some(b.dev_node.clone()),
            problems: Vec::new(),
            fixes: Vec::new(),
            notes: vec![format!(
                "{} is not an NVMe namespace{}: no NVMe path timeouts to check and no reservations; the disk lease alone protects it",
                b.name,
                b.loop_backing_file
                    .as_ref()
                    .map(|f| format!(" (loop device over {})", f.display()))
                    .unwrap_or_default()
            )],
            namespace: None,
            paths: Vec::new(),
            guard: None,
            reservations: ResvReport::NotProbed { reason: "not NVMe".into() },
        },
        Ok(None) => failed(
            format!("no block device or NVMe namespace matches {id:?} under {}", root.display()),
            "run `blockfence doctor` without --volume to list the NVMe namespaces, or give /dev/NAME".into(),
        ),
        Err(e) => failed(e.to_string(), "check that the device exists and sysfs is readable (run as root)".into()),
    }
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let p = Params {
        io_timeout_ms: args.io_timeout_ms,
        renew_interval_ms: args.renew_interval_ms,
        lease_timeout_ms: args.lease_timeout_ms,
        fence_timeout_ms: args.fence_timeout_ms,
    };
    p.validate().context("invalid lease parameters")?;
    let root = args.sysfs_root.clone();
    if !root.join("block").is_dir() && !root.join("class").is_dir() {
        anyhow::bail!(
            "{} does not look like sysfs (no block/ or class/): give --sysfs-root the directory that stands for /sys",
            root.display()
        );
    }
    let namespaces = discovery::scan(&root)
        .with_context(|| format!("cannot read NVMe namespaces under {}", root.display()))?;
    let mut volumes = Vec::new();
    for spec in &args.volumes {
        let (name, id) = match spec.split_once('=') {
            Some((n, i)) if !n.is_empty() && !i.is_empty() => (n, i),
            _ => anyhow::bail!(
                "--volume {spec:?}: expected NAME=DEVICE_OR_ID, e.g. pgdata=/dev/nvme0n1"
            ),
        };
        volumes.push(check(name, id, &root, &p));
    }
    if args.volumes.is_empty() {
        for ns in namespaces.iter().cloned() {
            let name = ns.name.clone();
            volumes.push(check_namespace(&name, &name, &root, ns, &p));
        }
    }
    let report = Report {
        sysfs_root: root,
        params: p,
        host_dead_ms: p.host_dead_ms(),
        budget_ms: guard::budget_ms(&p),
        nvme_found: !namespaces.is_empty(),
        pass: volumes.iter().all(|v| v.pass),
        volumes,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(if report.pass { exit::OK } else { exit::ERROR })
}

fn print_text(r: &Report) {
    println!(
        "lease parameters: io_timeout {} ms, renew {} ms, lease {} ms, fence {} ms -> takeover after {} ms; a fenced node's queued writes must be dead within {} ms",
        r.params.io_timeout_ms,
        r.params.renew_interval_ms,
        r.params.lease_timeout_ms,
        r.params.fence_timeout_ms,
        r.host_dead_ms,
        r.budget_ms
    );
    if r.volumes.is_empty() {
        println!(
            "no NVMe namespaces under {}: nothing to check. Volumes on other block devices (loop devices, local disks) have no NVMe path timeouts and no reservations; the disk lease alone protects them. Name one with --volume NAME=DEVICE to check it.",
            r.sysfs_root.display()
        );
        return;
    }
    for v in &r.volumes {
        println!();
        println!(
            "volume {} ({}{}): {}",
            v.name,
            v.id,
            v.device
                .as_ref()
                .map(|d| format!(", {}", d.display()))
                .unwrap_or_default(),
            if v.pass { "PASS" } else { "FAIL" }
        );
        if let Some(ns) = &v.namespace {
            println!(
                "  namespace: {:.1} GiB, {}, wwid {}, subsystem {}{}",
                ns.size_bytes as f64 / (1u64 << 30) as f64,
                if ns.multipath {
                    "native multipath"
                } else {
                    "single controller"
                },
                ns.ids.wwid.as_deref().unwrap_or("-"),
                ns.subsysnqn.as_deref().unwrap_or("-"),
                ns.iopolicy
                    .as_deref()
                    .map(|i| format!(", iopolicy {i}"))
                    .unwrap_or_default()
            );
        }
        for p in &v.paths {
            println!(
                "  path {}: {} {} {}{}",
                p.controller,
                p.transport,
                p.state,
                p.ana_state.as_deref().unwrap_or("(no ANA)"),
                if p.usable { ", usable" } else { ", NOT usable" }
            );
        }
        if let Some(g) = &v.guard {
            for pv in &g.paths {
                println!(
                    "  stale I/O via {}: queued writes live {}: {}",
                    pv.controller,
                    lifetime_text(&pv.lifetime),
                    if pv.pass { "ok" } else { "TOO LONG" }
                );
            }
        }
        match &v.reservations {
            ResvReport::Supported => println!("  reservations: supported (Write Exclusive)"),
            ResvReport::Unsupported { reason } => {
                println!("  reservations: unsupported: {reason}; fallback: disk lease only")
            }
            ResvReport::NotProbed { reason } => println!("  reservations: not probed ({reason})"),
            ResvReport::Error { error } => println!("  reservations: unknown ({error})"),
        }
        for n in &v.notes {
            println!("  note: {n}");
        }
        for p in &v.problems {
            println!("  problem: {p}");
        }
        for f in &v.fixes {
            println!("  fix: {f}");
        }
    }
    let failed = r.volumes.iter().filter(|v| !v.pass).count();
    println!();
    println!("{} of {} volumes fail", failed, r.volumes.len());
}
