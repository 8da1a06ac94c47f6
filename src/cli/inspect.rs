//! `blockfence inspect`: what the lease area and ext4 MMP say, now or over time.

use crate::core::lease::{FIRST_SLOT_BLOCK, OWNER_BLOCK};
use crate::core::record::{Decoded, Header, Owner, OwnerState, Slot, SlotState};
use crate::disk::area::{self, AreaInfo};
use crate::disk::blockdev::{Access, BlockDevice};
use crate::disk::device::DeviceIo;
use crate::disk::error::HeaderCopy;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Block device (or image file) formatted by `blockfence format`.
    pub device: PathBuf,
    /// Print JSON instead of text (with --watch: one JSON object per line).
    #[arg(long)]
    pub json: bool,
    /// Keep reading and show how long each slot has been unchanged, timed on
    /// this node's clock (a slot unchanged for its host_dead is dead).
    #[arg(long)]
    pub watch: bool,
    /// With --watch: time between two reads, in ms.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub interval_ms: u64,
}

/// One read of the area, decoded.
struct Snapshot {
    info: AreaInfo,
    owner: Decoded<Owner>,
    slots: Vec<(Box<[u8; 4096]>, Decoded<Slot>)>,
}

fn read(dev: &BlockDevice) -> anyhow::Result<Snapshot> {
    let info = area::open_area(dev)?;
    let owners = (FIRST_SLOT_BLOCK - OWNER_BLOCK) as usize;
    let count = owners + info.header.max_slots as usize;
    let blocks = dev
        .read_at(info.area_offset + OWNER_BLOCK * 4096, count * 4096)?
        .to_blocks();
    Ok(Snapshot {
        owner: Owner::best_of(&blocks[..owners]),
        slots: blocks[owners..]
            .iter()
            .map(|b| (Box::new(*b), Slot::decode(b)))
            .collect(),
        info,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The lease as the slots show it at one instant.
fn lease_state(snap: &Snapshot) -> (&'static str, Option<String>) {
    let mut holders = snap
        .slots
        .iter()
        .filter_map(|(_, d)| d.valid())
        .filter(|s| s.state == SlotState::Hold);
    if let Some(h) = holders.next() {
        return ("held", Some(h.name.clone()));
    }
    if snap
        .slots
        .iter()
        .any(|(_, d)| d.valid().is_some_and(|s| s.state == SlotState::Claim))
    {
        return ("contended", None);
    }
    match snap.owner.valid().map(|o| o.state) {
        Some(OwnerState::Released) => ("released", None),
        Some(OwnerState::Held) => ("held", snap.owner.valid().map(|o| o.holder_name.clone())),
        _ => ("free", None),
    }
}

fn header_json(h: &Header, damaged: Option<&str>) -> Value {
    json!({
        "area_offset": h.area_offset,
        "area_size": h.area_size,
        "max_slots": h.max_slots,
        "state": h.state,
        "volume_id": hex(&h.volume_id),
        "fs_bytes": h.fs_bytes,
        "logical_sector": h.logical_sector,
        "physical_sector": h.physical_sector,
        "params": h.params,
        "host_dead_ms": h.params.host_dead_ms(),
        "host_dead_ceiling_ms": h.host_dead_ceiling_ms,
        "damaged_copy": damaged,
    })
}

fn to_json(snap: &Snapshot, device: &std::path::Path, unchanged: Option<&[u64]>) -> Value {
    let damaged = snap.info.degraded.as_ref().map(|d| match d.which {
        HeaderCopy::A => "A",
        HeaderCopy::B => "B",
        HeaderCopy::Both => "A and B",
    });
    let owner = match &snap.owner {
        Decoded::Valid(o) => json!({
            "state": o.state,
            "holder": (o.state != OwnerState::Free).then(|| o.holder_name.clone()),
            "slot": o.holder_slot,
            "generation": o.generation,
            "params": o.params,
        }),
        Decoded::Empty => json!({"state": "free", "holder": null, "generation": 0}),
        Decoded::Corrupt(r) => json!({"state": "corrupt", "error": r.to_string()}),
    };
    let slots: Vec<Value> = snap
        .slots
        .iter()
        .enumerate()
        .filter(|(_, (_, d))| !matches!(d, Decoded::Empty))
        .map(|(i, (_, d))| {
            let mut v = match d {
                Decoded::Valid(s) => json!({
                    "index": i,
                    "state": s.state,
                    "name": s.name,
                    "nonce": format!("{:016x}", s.nonce),
                    "seq": s.seq,
                    "generation": s.generation,
                    "params": s.params,
                    "host_dead_ms": s.params.host_dead_ms(),
                }),
                _ => json!({"index": i, "state": "corrupt",
                    "error": match d { Decoded::Corrupt(r) => r.to_string(), _ => String::new() }}),
            };
            if let Some(u) = unchanged {
                v["unchanged_for_ms"] = u[i].into();
            }
            v
        })
        .collect();
    let (state, holder) = lease_state(snap);
    let mmp = match crate::ext4::read_mmp(device) {
        Ok((sb, mmp)) => {
            let report = crate::ext4::MmpReport::new(&sb, &mmp);
            let mut v = serde_json::to_value(&report).unwrap_or(Value::Null);
            v["text"] = report.to_string().into();
            v
        }
        Err(e) => json!({"error": e.to_string()}),
    };
    json!({
        "device": device,
        "lease": {"state": state, "holder": holder},
        "header": header_json(&snap.info.header, damaged),
        "owner": owner,
        "slots": slots,
        "mmp": mmp,
    })
}

fn print_text(v: &Value) {
    let h = &v["header"];
    println!("device      {}", v["device"].as_str().unwrap_or(""));
    println!(
        "lease       {}{}",
        v["lease"]["state"].as_str().unwrap_or(""),
        v["lease"]["holder"]
            .as_str()
            .map(|h| format!(" by {h}"))
            .unwrap_or_default()
    );
    println!(
        "owner       {} generation {}{}",
        v["owner"]["state"].as_str().unwrap_or(""),
        v["owner"]["generation"],
        v["owner"]["holder"]
            .as_str()
            .map(|h| format!(" holder {h}"))
            .unwrap_or_default()
    );
    println!(
        "area        {} bytes at {}, {} slots, volume id {}{}",
        h["area_size"],
        h["area_offset"],
        h["max_slots"],
        h["volume_id"].as_str().unwrap_or(""),
        h["damaged_copy"]
            .as_str()
            .map(|c| format!(", HEADER COPY {c} DAMAGED (the other copy is used)"))
            .unwrap_or_default()
    );
    println!(
        "defaults    io_timeout {} ms, renew {} ms, lease {} ms, fence {} ms -> host_dead {} ms (ceiling {} ms)",
        h["params"]["io_timeout_ms"], h["params"]["renew_interval_ms"], h["params"]["lease_timeout_ms"],
        h["params"]["fence_timeout_ms"], h["host_dead_ms"], h["host_dead_ceiling_ms"]
    );
    println!("slots");
    for s in v["slots"].as_array().into_iter().flatten() {
        let unchanged = s["unchanged_for_ms"]
            .as_u64()
            .map(|u| {
                let dead = s["host_dead_ms"].as_u64().is_some_and(|hd| u >= hd);
                format!(
                    "  unchanged {:.1} s{}",
                    u as f64 / 1000.0,
                    if dead { " (dead)" } else { "" }
                )
            })
            .unwrap_or_default();
        println!(
            "  {:>3} {:<9} {:<24} gen {:<6} seq {:<8}{}",
            s["index"],
            s["state"].as_str().unwrap_or(""),
            s["name"].as_str().or(s["error"].as_str()).unwrap_or(""),
            s["generation"],
            s["seq"],
            unchanged
        );
    }
    match v["mmp"].get("error") {
        Some(e) => println!("ext4 mmp    unavailable: {}", e.as_str().unwrap_or("")),
        None => {
            let text = v["mmp"]["text"].as_str().unwrap_or("");
            for (i, line) in text.lines().enumerate() {
                println!(
                    "{}{line}",
                    if i == 0 {
                        "ext4 mmp    "
                    } else {
                        "            "
                    }
                );
            }
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let dev = BlockDevice::open(&args.device, Access::ReadOnly)?;
    if !args.watch {
        let snap = read(&dev)?;
        let v = to_json(&snap, &args.device, None);
        if args.json {
            println!("{v}");
        } else {
            print_text(&v);
        }
        return Ok(crate::cli::exit::OK);
    }
    let start = Instant::now();
    let mut seen: HashMap<usize, (Box<[u8; 4096]>, Instant)> = HashMap::new();
    loop {
        let snap = read(&dev)?;
        let now = Instant::now();
        let unchanged: Vec<u64> = snap
            .slots
            .iter()
            .enumerate()
            .map(|(i, (raw, _))| {
                let entry = seen.entry(i).or_insert_with(|| (raw.clone(), now));
                if entry.0[..] != raw[..] {
                    *entry = (raw.clone(), now);
                }
                (now - entry.1).as_millis() as u64
            })
            .collect();
        let mut v = to_json(&snap, &args.device, Some(&unchanged));
        v["watching_for_ms"] = ((now - start).as_millis() as u64).into();
        if args.json {
            println!("{v}");
        } else {
            print!("\x1b[2J\x1b[H");
            print_text(&v);
        }
        std::thread::sleep(Duration::from_millis(args.interval_ms));
    }
}
