//! The scheduler: nodes, their I/O, faults and callers, over one event queue.
//!
//! Everything that happens is an [`Ev`] in a binary heap ordered by (real
//! time, insertion sequence), so ties resolve in insertion order and a seed
//! replays exactly. Every random choice is drawn from the run's one [`Rng`],
//! in event order.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

use super::clock::Clock;
use super::disk::{describe, Disk, SECTORS_PER_BLOCK};
use super::oracle::{Invariant, Oracle, Tenure, Violation};
use super::rng::Rng;
use super::{
    Anomalies, Assumption, Broken, FaultCounts, Options, Outcome, Sabotage, FAULT_CLASSES,
};
use crate::core::lease::{
    Action, Event, Identity, Input, IoFailure, Layout, LeaseMachine, FIRST_SLOT_BLOCK,
    HEADER_BLOCK, OWNER_BLOCK, OWNER_B_BLOCK,
};
use crate::core::params::{Params, CLOCK_RATE_BOUND_PPM};
use crate::core::record::{Block, Decoded, Owner, Slot, SlotState};

/// Steps of one node at one real instant before the machine counts as
/// busy-looping.
const MAX_STEPS_PER_INSTANT: u32 = 1_000;

/// Something that happens at a real time.
#[derive(Debug)]
enum Ev {
    /// A wake-up the machine asked for (`token` must still be current).
    Tick { node: usize, inc: u32, token: u64 },
    /// The disk serves a read: takes the contents now.
    Serve(Read),
    /// A write lands (if `writes[wid].at` is still `at`).
    Land { wid: u64, at: u64 },
    /// An I/O completes: the machine is told.
    Complete {
        node: usize,
        inc: u32,
        io: u64,
        input: Input,
    },
    /// The node's application asks for the lease, or gives it up.
    Caller {
        node: usize,
        inc: u32,
        acquire: bool,
        token: u64,
    },
    /// The scheduler draws the next fault.
    Fault,
    /// A crashed node starts again.
    Restart { node: usize },
    /// The quiet tail begins.
    Quiet,
}

/// A read on its way to the disk.
#[derive(Debug)]
struct Read {
    node: usize,
    inc: u32,
    io: u64,
    first: u64,
    count: usize,
    /// The read fails with this error.
    fail: Option<String>,
}

enum Gate {
    Drop,
    Defer(u64),
    Deliver,
}

struct Entry {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    /// Reversed: the heap pops the earliest (time, seq) first.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// How a node's storage path is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathDown {
    /// I/O fails (multipath `fail_if_no_path`).
    Fail,
    /// I/O waits until the path is back (`queue_if_no_path`).
    Queue,
}

/// A write that has not landed yet.
#[derive(Debug)]
struct PendingWrite {
    who: String,
    block: u64,
    data: Box<Block>,
    sectors: usize,
    at: u64,
    /// Real time it was issued (for the bounded-landing assumption).
    issued: u64,
    /// Its incarnation crashed.
    ghost: bool,
}

/// A node: a name, and its current incarnation.
struct Node {
    name: String,
    /// Parameters this node starts with, and the alternative it may restart
    /// with.
    params: Params,
    alt_params: Params,
    inc: u32,
    /// `None` while crashed.
    machine: Option<LeaseMachine>,
    clock: Clock,
    /// No steps before this real time (stall).
    stalled_until: u64,
    path_down: Option<(u64, PathDown)>,
    /// Current wake-up token; older ticks are stale.
    token: u64,
    /// Outstanding I/O and its unlanded write, if any.
    io: Option<u64>,
    write: Option<u64>,
    /// The caller wants the lease (has asked and not released).
    wants: bool,
    /// Open tenure in the oracle, and the last `valid_until` seen.
    tenure: Option<usize>,
    valid_until: u64,
    silent: bool,
    /// Real end of the fence window of the last lease this incarnation lost.
    fence_ends: u64,
    /// Current caller plan; older caller events are void.
    caller_token: u64,
    last_step_at: u64,
    steps_at_instant: u32,
}

impl Node {
    fn who(&self) -> String {
        format!("{}#{}", self.name, self.inc)
    }
}

/// Per-seed fault rates, in parts per ten thousand.
#[derive(Debug, Clone, Copy)]
struct Weather {
    name: &'static str,
    /// Mean gap between node faults.
    fault_gap_ms: u64,
    long: u64,
    beyond: u64,
    delayed: u64,
    error: u64,
}

const CALM: Weather = Weather {
    name: "calm",
    fault_gap_ms: 60_000,
    long: 100,
    beyond: 10,
    delayed: 2,
    error: 10,
};
const NORMAL: Weather = Weather {
    name: "normal",
    fault_gap_ms: 20_000,
    long: 400,
    beyond: 80,
    delayed: 15,
    error: 50,
};
const STORMY: Weather = Weather {
    name: "stormy",
    fault_gap_ms: 6_000,
    long: 1_000,
    beyond: 250,
    delayed: 60,
    error: 200,
};

#[derive(Debug, Clone, Copy)]
enum FaultKind {
    Crash,
    Stall,
    PathLoss,
    SlowDisk,
}

/// One simulation run.
pub struct World<'a> {
    opts: &'a Options,
    seed: u64,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Entry>,
    disk: Disk,
    layout: Layout,
    nodes: Vec<Node>,
    writes: BTreeMap<u64, PendingWrite>,
    next_id: u64,
    oracle: Oracle,
    weather: Weather,
    quiet_from: u64,
    end: u64,
    slow_until: u64,
    grants_before_quiet: u64,
    violation: Option<Violation>,
    faults: FaultCounts,
    anomalies: Anomalies,
    events: u64,
    digest: u64,
    trace: Vec<String>,
    /// Notable happenings (a write over another node's record, a torn owner
    /// record, ...), to explain a violation.
    notes: Vec<(u64, String)>,
    /// Stated assumptions the run broke, in time order (the first 64).
    broken: Vec<Broken>,
    /// Some clock ran at a rate other than real time.
    drifted: bool,
    /// Some node ran with parameters other than the defaults.
    varied: bool,
    /// [`Sabotage::UnderstatedParams`]: recent (recorded, true) slot records
    /// of the liar.
    lies: Vec<(Box<Block>, Box<Block>)>,
}

/// How far back notes are shown with a violation.
const NOTES_WINDOW_MS: u64 = 120_000;

/// The parameters of the seeded "liar" in [`Sabotage::UnderstatedParams`].
const LIAR_PARAMS: Params = Params {
    io_timeout_ms: 10,
    renew_interval_ms: 10,
    lease_timeout_ms: 30,
    fence_timeout_ms: 100,
};

fn draw_params(rng: &mut Rng, varied: bool) -> Params {
    if !varied || rng.chance(650) {
        return Params::default();
    }
    let io = rng.range(50, 2_000) as u32;
    let renew = rng.range(200, 2_000) as u32;
    let lease = 2 * renew + io + rng.range(0, 6_000) as u32;
    let fence = rng.range(100, 6_000) as u32;
    let p = Params {
        io_timeout_ms: io,
        renew_interval_ms: renew,
        lease_timeout_ms: lease,
        fence_timeout_ms: fence,
    };
    debug_assert!(p.validate().is_ok(), "{p:?}");
    p
}

fn draw_clock(rng: &mut Rng, opts: &Options, start: u64) -> Clock {
    let offset = if rng.chance(100) {
        0
    } else {
        rng.range(0, 1 << 40)
    };
    let bound = match opts.sabotage {
        Some(Sabotage::ClockRateOutOfBound) => 200_000,
        _ if !opts.faults.clock_drift => 0,
        _ => CLOCK_RATE_BOUND_PPM as i64,
    };
    let ppm = match rng.below(10) {
        0..=2 => bound,
        3..=5 => -bound,
        6..=7 => rng.range(0, 2 * bound as u64) as i64 - bound,
        _ => rng.range(0, 200) as i64 - 100,
    };
    Clock::new(start, offset, ppm.clamp(-bound, bound))
}

fn fnv(h: u64, x: u64) -> u64 {
    (h ^ x).wrapping_mul(0x0000_0100_0000_01b3)
}

impl<'a> World<'a> {
    /// Sets up seed `seed`: nodes, parameters, area, first events.
    pub fn new(seed: u64, opts: &'a Options) -> World<'a> {
        let mut rng = Rng::new(seed);
        let f = opts.faults;
        let n = rng.weighted(&[(1, 2usize), (3, 3), (3, 4), (3, 5)]);
        let mut params = Vec::new();
        for _ in 0..n {
            let p = draw_params(&mut rng, f.varied_params);
            let alt = if rng.chance(300) {
                draw_params(&mut rng, f.varied_params)
            } else {
                p
            };
            params.push((p, alt));
        }
        let mut ceiling = params
            .iter()
            .flat_map(|(p, a)| [p.host_dead_ms(), a.host_dead_ms()])
            .max()
            .unwrap_or(0);
        if f.varied_params && rng.chance(300) {
            ceiling += rng.range(1, 50) * 100;
        }
        let max_slots = if n >= 3 && rng.chance(50) {
            n - 1
        } else {
            n + rng.below(3) as usize
        } as u16;
        let weather = match rng.below(10) {
            0..=2 => CALM,
            3..=7 => NORMAL,
            _ => STORMY,
        };
        let layout = Layout {
            max_slots,
            host_dead_ceiling_ms: ceiling,
            volume_id: super::disk::SIM_VOLUME,
        };
        let nodes = params
            .iter()
            .enumerate()
            .map(|(i, &(p, alt))| {
                let name = format!("n{i}");
                let me = Identity {
                    name: name.clone(),
                    nonce: rng.next_u64(),
                    params: p,
                };
                Node {
                    name,
                    params: p,
                    alt_params: alt,
                    inc: 0,
                    machine: Some(LeaseMachine::new(me, layout)),
                    clock: draw_clock(&mut rng, opts, 0),
                    stalled_until: 0,
                    path_down: None,
                    token: 0,
                    io: None,
                    write: None,
                    wants: false,
                    tenure: None,
                    valid_until: 0,
                    silent: false,
                    fence_ends: 0,
                    caller_token: 0,
                    last_step_at: u64::MAX,
                    steps_at_instant: 0,
                }
            })
            .collect::<Vec<_>>();
        let mut w = World {
            opts,
            seed,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            disk: Disk::formatted(max_slots, Params::default()),
            layout,
            nodes,
            writes: BTreeMap::new(),
            next_id: 0,
            oracle: Oracle::default(),
            weather,
            quiet_from: opts.chaos_ms,
            end: opts.chaos_ms + opts.quiet_ms,
            slow_until: 0,
            grants_before_quiet: 0,
            violation: None,
            faults: FaultCounts::default(),
            anomalies: Anomalies::default(),
            events: 0,
            digest: 0xcbf2_9ce4_8422_2325,
            trace: Vec::new(),
            notes: Vec::new(),
            broken: Vec::new(),
            drifted: false,
            varied: false,
            lies: Vec::new(),
        };
        if opts.trace {
            w.trace.push(format!(
                "seed {seed}: {n} nodes, {max_slots} slots, host_dead ceiling {ceiling} ms, \
                 weather {}",
                weather.name
            ));
            for node in &w.nodes {
                let p = node.params;
                w.trace.push(format!(
                    "  {}: nonce {:04x}, clock {:+} ppm from L{}, params io {} renew {} lease {} \
                     fence {} (host_dead {}){}",
                    node.name,
                    node.machine
                        .as_ref()
                        .map_or(0, |m| m.identity().nonce & 0xffff),
                    node.clock.ppm(),
                    node.clock.local(0),
                    p.io_timeout_ms,
                    p.renew_interval_ms,
                    p.lease_timeout_ms,
                    p.fence_timeout_ms,
                    p.host_dead_ms(),
                    if node.alt_params != p {
                        format!(
                            ", after restart host_dead {}",
                            node.alt_params.host_dead_ms()
                        )
                    } else {
                        String::new()
                    }
                ));
            }
        }
        w.drifted = w.nodes.iter().any(|n| n.clock.ppm() != 0);
        w.varied = w.nodes.iter().any(|n| n.params != Params::default());
        for i in 0..n {
            let at = w.rng.range(0, 3_000);
            w.caller_at(i, at, true);
        }
        let gap = w.fault_gap();
        w.push(gap, Ev::Fault);
        w.push(w.quiet_from, Ev::Quiet);
        w
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Entry {
            at: at.max(self.now),
            seq: self.seq,
            ev,
        });
    }

    fn tracing(&self) -> bool {
        self.opts.trace
    }

    fn line(&mut self, s: String) {
        self.trace.push(s);
    }

    fn quiet(&self) -> bool {
        self.now >= self.quiet_from
    }

    fn fault_gap(&mut self) -> u64 {
        let g = self.weather.fault_gap_ms;
        self.rng.range(g / 4, g * 7 / 4)
    }

    /// Runs to the end (or the first violation).
    pub fn run(mut self) -> Outcome {
        while let Some(Entry { at, ev, .. }) = self.queue.pop() {
            if at > self.end || self.violation.is_some() {
                break;
            }
            self.now = at;
            self.events += 1;
            self.handle(ev);
        }
        let holder_at_end = self.nodes.iter().any(|n| {
            n.tenure.is_some() && n.machine.as_ref().is_some_and(|m| m.holding().is_some())
        });
        let quiet_live = self.oracle.grants() > self.grants_before_quiet || holder_at_end;
        let classes = self.exercised();
        Outcome {
            seed: self.seed,
            nodes: self.nodes.len(),
            max_slots: self.layout.max_slots,
            weather: self.weather.name,
            violation: self.violation,
            grants: self.oracle.grants(),
            quiet_live,
            events: self.events,
            end_ms: self.now,
            faults: self.faults,
            anomalies: self.anomalies,
            digest: self.digest,
            trace: self.trace,
            broken: self.broken,
            classes,
        }
    }

    /// Which fault classes this run actually drew, in [`FAULT_CLASSES`] order.
    fn exercised(&self) -> [bool; FAULT_CLASSES.len()] {
        let f = &self.faults;
        [
            f.long_delays + f.beyond_io_timeout > 0,
            f.delayed_ios > 0,
            f.slow_disks > 0,
            f.io_errors > 0,
            f.torn_writes > 0,
            f.path_losses > 0,
            f.crashes > 0,
            f.ghost_writes > 0,
            f.stalls > 0,
            self.drifted,
            self.varied,
            f.releases + f.give_ups + f.flaps > 0,
            f.early_reacquires > 0,
        ]
    }

    /// What to do with an event for incarnation `inc` of `node`: drop it (the
    /// incarnation is gone), deliver it, or hold it until a stall ends.
    fn gate(&self, node: usize, inc: u32) -> Gate {
        let nd = &self.nodes[node];
        if nd.inc != inc || nd.machine.is_none() {
            Gate::Drop
        } else if self.now < nd.stalled_until {
            Gate::Defer(nd.stalled_until)
        } else {
            Gate::Deliver
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Tick { node, inc, token } => {
                if token != self.nodes[node].token {
                    return;
                }
                match self.gate(node, inc) {
                    Gate::Drop => {}
                    Gate::Defer(at) => self.push(at, Ev::Tick { node, inc, token }),
                    Gate::Deliver => self.step(node, Input::Tick),
                }
            }
            Ev::Serve(read) => self.serve(read),
            Ev::Land { wid, at } => self.land(wid, at),
            Ev::Complete {
                node,
                inc,
                io,
                input,
            } => {
                if self.nodes[node].io != Some(io) {
                    return;
                }
                match self.gate(node, inc) {
                    Gate::Drop => {}
                    Gate::Defer(at) => self.push(
                        at,
                        Ev::Complete {
                            node,
                            inc,
                            io,
                            input,
                        },
                    ),
                    Gate::Deliver => {
                        self.nodes[node].io = None;
                        self.nodes[node].write = None;
                        self.step(node, input);
                    }
                }
            }
            Ev::Caller {
                node,
                inc,
                acquire,
                token,
            } => {
                if token != self.nodes[node].caller_token {
                    return;
                }
                match self.gate(node, inc) {
                    Gate::Drop => {}
                    Gate::Defer(at) => self.push(
                        at,
                        Ev::Caller {
                            node,
                            inc,
                            acquire,
                            token,
                        },
                    ),
                    Gate::Deliver => self.caller(node, acquire),
                }
            }
            Ev::Fault => self.fault(),
            Ev::Restart { node } => self.restart(node),
            Ev::Quiet => self.begin_quiet(),
        }
    }

    // ----- the machine -------------------------------------------------------

    /// Steps node `n`'s machine at its local time with `input`, then carries
    /// out the actions.
    fn step(&mut self, n: usize, input: Input) {
        let now = self.now;
        let nd = &mut self.nodes[n];
        let Some(m) = nd.machine.as_mut() else { return };
        if nd.last_step_at == now {
            nd.steps_at_instant += 1;
        } else {
            nd.last_step_at = now;
            nd.steps_at_instant = 0;
        }
        let local = nd.clock.local(now);
        let input_desc = self.opts.trace.then(|| describe_input(&input));
        let actions = m.step(local, input);
        nd.token += 1;
        let busy = nd.steps_at_instant > MAX_STEPS_PER_INSTANT;
        let who = nd.who();
        self.digest = fnv(fnv(fnv(self.digest, now), n as u64), local);
        if let Some(input_desc) = input_desc {
            let acts = actions
                .iter()
                .map(|a| describe_action(a, local))
                .collect::<Vec<_>>()
                .join(", ");
            self.line(format!(
                "{now:>9} {who:<6} L{local} {input_desc} -> [{acts}]"
            ));
        }
        if busy {
            self.fail(
                Invariant::MachineContract,
                format!("{who} was stepped {MAX_STEPS_PER_INSTANT} times at one instant"),
            );
            return;
        }
        for a in actions {
            self.digest = fnv(self.digest, action_code(&a));
            match a {
                Action::Read { first_block, count } => self.start_read(n, first_block, count),
                Action::Write { block, data } => self.start_write(n, block, data),
                Action::WakeAt(t) => {
                    let nd = &self.nodes[n];
                    let at = nd.clock.real_at(t);
                    let ev = Ev::Tick {
                        node: n,
                        inc: nd.inc,
                        token: nd.token,
                    };
                    self.push(at, ev);
                }
                Action::Emit(e) => self.on_event(n, local, e),
            }
        }
        self.after_step(n);
    }

    /// Updates the tenure's end from the machine's validity; spots holds the
    /// caller was never told about.
    fn after_step(&mut self, n: usize) {
        let nd = &mut self.nodes[n];
        let holding = nd.machine.as_ref().and_then(|m| m.holding());
        match (holding, nd.tenure) {
            (Some((_, vu)), Some(t)) => {
                nd.valid_until = vu;
                let bound = self.bound(n, vu);
                self.oracle.extend(t, bound);
            }
            (Some(_), None) if nd.wants && !nd.silent && self.violation.is_none() => {
                nd.silent = true;
                self.anomalies.silent_hold += 1;
                if self.opts.trace {
                    let who = self.nodes[n].who();
                    self.line(format!(
                        "{:>9} {who:<6} ANOMALY: machine holds the lease but never said Acquired \
                         since the caller's last Release",
                        self.now
                    ));
                }
            }
            (None, _) => nd.silent = false,
            _ => {}
        }
    }

    /// Real time by which node `n` stops writing if its lease is valid until
    /// local `vu`: `vu + fence_timeout + io_timeout` on its clock.
    fn bound(&self, n: usize, vu: u64) -> u64 {
        let nd = &self.nodes[n];
        let p = nd
            .machine
            .as_ref()
            .map_or(nd.params, |m| m.identity().params);
        nd.clock
            .real_at(vu + p.fence_timeout_ms as u64 + p.io_timeout_ms as u64)
    }

    /// Real time by which node `n`'s in-flight data writes have landed if it
    /// stops writing now.
    fn stop_now(&self, n: usize) -> u64 {
        let nd = &self.nodes[n];
        let io = nd
            .machine
            .as_ref()
            .map_or(nd.params, |m| m.identity().params)
            .io_timeout_ms as u64;
        nd.clock.real_at(nd.clock.local(self.now) + io)
    }

    /// Records a notable happening (kept for [`NOTES_WINDOW_MS`]).
    fn note(&mut self, s: String) {
        if self.opts.trace {
            self.line(format!("{:>9} NOTE   {s}", self.now));
        }
        let now = self.now;
        self.notes.retain(|(t, _)| t + NOTES_WINDOW_MS >= now);
        self.notes.push((now, s));
    }

    fn fail(&mut self, invariant: Invariant, mut detail: String) {
        if self.violation.is_none() {
            let now = self.now;
            let recent: Vec<String> = self
                .notes
                .iter()
                .filter(|(t, _)| t + NOTES_WINDOW_MS >= now)
                .map(|(t, s)| format!("\n    {t} ms: {s}"))
                .collect();
            if !recent.is_empty() {
                detail.push_str("\n  notable in the last 120 s:");
                detail.push_str(&recent.concat());
            }
            if self.opts.trace {
                self.line(format!(
                    "{:>9} VIOLATION of {invariant}: {detail}",
                    self.now
                ));
            }
            self.violation = Some(Violation {
                invariant,
                at_ms: self.now,
                detail,
            });
        }
    }

    fn open_tenure(&mut self, n: usize, generation: Option<u64>, vu: u64, fake: bool) {
        let nd = &self.nodes[n];
        let who = nd.who();
        let t = Tenure {
            who,
            node: n,
            inc: nd.inc,
            generation,
            start: self.now,
            end: None,
            bound: self.bound(n, vu),
            why_end: "",
        };
        match self.oracle.open(t) {
            Ok(i) if fake => self.oracle.close(i, u64::MAX, "fake grant"),
            Ok(i) => {
                let nd = &mut self.nodes[n];
                nd.tenure = Some(i);
                nd.valid_until = vu;
            }
            Err(v) => self.fail(v.invariant, v.detail),
        }
    }

    fn close_tenure(&mut self, n: usize, end: u64, why: &'static str) {
        if let Some(i) = self.nodes[n].tenure.take() {
            self.oracle.close(i, end, why);
        }
    }

    /// The caller's reaction to an event of its machine.
    fn on_event(&mut self, n: usize, local: u64, e: Event) {
        let churn = self.opts.faults.churn && !self.quiet();
        match e {
            Event::Acquired {
                generation,
                valid_until,
            } => {
                let nd = &self.nodes[n];
                if !nd.wants || nd.tenure.is_some() {
                    self.anomalies.unexpected_acquired += 1;
                    return;
                }
                self.open_tenure(n, Some(generation), valid_until, false);
                if churn && self.rng.chance(600) {
                    let at = self.now + self.rng.range(1_000, 60_000);
                    self.caller_at(n, at, false);
                }
            }
            Event::Lost { .. } => {
                let vu = self.nodes[n].valid_until;
                let end = self.bound(n, vu);
                self.close_tenure(n, end, "lost: valid_until + fence + io");
                let nd = &mut self.nodes[n];
                nd.wants = false;
                nd.fence_ends = end;
                // The application is being fenced: its earlier plans are void.
                nd.caller_token += 1;
                // The application is fenced; it asks again once it has
                // restarted, perhaps before its fence window has passed.
                let at = if self.opts.faults.early_reacquire {
                    self.now + self.rng.range(500, 10_000)
                } else {
                    end + self.rng.range(0, 5_000)
                };
                self.caller_at(n, at, true);
            }
            // An Acquire that came while the release was under way is kept by
            // the machine: it seeks again after `Released` and will say
            // `Acquired`; nothing to do for the caller.
            Event::Released { .. } => {}
            Event::Stopped => {
                if self.nodes[n].wants {
                    // Stopped although the caller wants the lease: the machine
                    // dropped an Acquire. Count it and ask again.
                    self.anomalies.acquire_absorbed += 1;
                    self.nodes[n].wants = false;
                    let at = self.now + self.rng.range(0, 100);
                    self.caller_at(n, at, true);
                }
            }
            Event::Failed { .. } => {
                self.anomalies.failed += 1;
                self.nodes[n].wants = false;
                let at = self.now + self.rng.range(5_000, 30_000);
                self.caller_at(n, at, true);
            }
            Event::Waiting { .. } => {
                if self.opts.sabotage == Some(Sabotage::IgnoreWaiting)
                    && n == 0
                    && self.nodes[n].tenure.is_none()
                {
                    let p = self.nodes[n].params;
                    self.open_tenure(n, None, local + p.lease_timeout_ms as u64, true);
                }
            }
            Event::Joined { .. } | Event::RenewFailed { .. } => {}
        }
    }

    fn caller_at(&mut self, n: usize, at: u64, acquire: bool) {
        let nd = &self.nodes[n];
        let ev = Ev::Caller {
            node: n,
            inc: nd.inc,
            acquire,
            token: nd.caller_token,
        };
        self.push(at, ev);
    }

    fn caller(&mut self, n: usize, acquire: bool) {
        let churn = self.opts.faults.churn && !self.quiet();
        let wants = self.nodes[n].wants;
        if acquire && !wants {
            let nd = &self.nodes[n];
            if nd.fence_ends > self.now {
                self.faults.early_reacquires += 1;
                let note = format!(
                    "{} asks to Acquire {} ms before the fence window of its lost lease ends",
                    nd.who(),
                    nd.fence_ends - self.now
                );
                self.note(note);
            }
            self.nodes[n].wants = true;
            self.step(n, Input::Acquire);
            if churn && self.rng.chance(100) {
                let at = self.now + self.rng.range(1_000, 30_000);
                self.caller_at(n, at, false);
            }
        } else if !acquire && wants && !self.quiet() {
            let holding = self.nodes[n].tenure.is_some();
            if holding {
                self.faults.releases += 1;
            } else {
                self.faults.give_ups += 1;
            }
            self.nodes[n].wants = false;
            // `Release` is the caller's word that it has stopped writing and its
            // writes have completed (it flushed, unmounted): no io_timeout here.
            self.close_tenure(n, self.now, "released");
            self.step(n, Input::Release);
            let at = if churn && self.rng.chance(50) {
                self.faults.flaps += 1;
                self.now + self.rng.range(0, 20)
            } else {
                self.now + self.rng.range(100, 20_000)
            };
            self.caller_at(n, at, true);
        }
    }

    // ----- I/O ---------------------------------------------------------------

    /// A delay for one step of one I/O of node `n` (issue to serve/land, or
    /// serve/land to completion).
    fn delay(&mut self, n: usize) -> u64 {
        if self.quiet() {
            return self.rng.range(0, 5);
        }
        let f = self.opts.faults;
        let io = self.nodes[n].params.io_timeout_ms as u64;
        if f.slow_disk && self.now < self.slow_until && self.rng.chance(700) {
            self.faults.long_delays += 1;
            return self.rng.range(500, 8_000);
        }
        let w = self.weather;
        let x = self.rng.below(10_000);
        if f.delayed_io && x < w.delayed {
            self.faults.delayed_ios += 1;
            self.rng.range(10_000, 40_000)
        } else if f.long_delays && x < w.delayed + w.beyond {
            self.faults.beyond_io_timeout += 1;
            self.rng.range(io + 1, io + 4_000)
        } else if f.long_delays && x < w.delayed + w.beyond + w.long {
            self.faults.long_delays += 1;
            self.rng.range(10, 500)
        } else {
            self.rng.range(0, 5)
        }
    }

    fn io_error(&mut self) -> bool {
        let e = self.weather.error;
        let on = self.opts.faults.io_errors && !self.quiet() && self.rng.below(10_000) < e;
        self.faults.io_errors += on as u64;
        on
    }

    /// Path state for node `n` now: `Some(Fail)`, `Some(Queue)` with the real
    /// time the path returns, or `None`.
    fn path(&mut self, n: usize) -> Option<(u64, PathDown)> {
        let nd = &mut self.nodes[n];
        match nd.path_down {
            Some((until, _)) if until <= self.now => {
                nd.path_down = None;
                None
            }
            p => p,
        }
    }

    fn new_io(&mut self, n: usize) -> Option<u64> {
        if let Some(old) = self.nodes[n].io {
            let who = self.nodes[n].who();
            self.fail(
                Invariant::MachineContract,
                format!("{who} started an I/O while I/O {old} was outstanding"),
            );
            return None;
        }
        self.next_id += 1;
        self.nodes[n].io = Some(self.next_id);
        Some(self.next_id)
    }

    fn start_read(&mut self, n: usize, first: u64, count: usize) {
        let Some(io) = self.new_io(n) else { return };
        let inc = self.nodes[n].inc;
        match self.path(n) {
            Some((_, PathDown::Fail)) => {
                let at = self.now + self.rng.range(0, 3_000);
                let input = Input::ReadDone(Err(IoFailure("no path to the device".into())));
                self.push(
                    at,
                    Ev::Complete {
                        node: n,
                        inc,
                        io,
                        input,
                    },
                );
            }
            path => {
                let mut at = self.now + self.delay(n);
                if let Some((until, PathDown::Queue)) = path {
                    at = at.max(until + self.rng.range(0, 5));
                }
                let fail = self
                    .io_error()
                    .then(|| "EIO reading the lease area".to_string());
                self.push(
                    at,
                    Ev::Serve(Read {
                        node: n,
                        inc,
                        io,
                        first,
                        count,
                        fail,
                    }),
                );
            }
        }
    }

    fn serve(&mut self, r: Read) {
        let Read {
            node: n,
            inc,
            io,
            first,
            count,
            fail,
        } = r;
        let nd = &self.nodes[n];
        if nd.inc != inc || nd.machine.is_none() || nd.io != Some(io) {
            return;
        }
        let mut result = match fail {
            Some(e) => Err(IoFailure(e)),
            None => self.disk.read(first, count).ok_or_else(|| {
                IoFailure(format!(
                    "read of {count} blocks at {first} is out of the area"
                ))
            }),
        };
        if let (Ok(blocks), true) = (&mut result, n == 0) {
            for b in blocks.iter_mut() {
                if let Some((_, truth)) = self.lies.iter().find(|(lie, _)| lie[..] == b[..]) {
                    *b = **truth;
                }
            }
        }
        if self.tracing() {
            let who = self.nodes[n].who();
            self.line(format!(
                "{:>9} disk   {who} read b{first}+{count} served{}",
                self.now,
                if result.is_err() { " (will fail)" } else { "" }
            ));
        }
        let at = self.now + self.delay(n);
        self.push(
            at,
            Ev::Complete {
                node: n,
                inc,
                io,
                input: Input::ReadDone(result),
            },
        );
    }

    /// Sectors of a write that fails or is cut short: all, a torn prefix, or none.
    fn failed_write_sectors(&mut self) -> usize {
        let torn = self.opts.faults.torn_writes;
        match self.rng.below(3) {
            0 => SECTORS_PER_BLOCK,
            1 if torn => {
                self.faults.torn_writes += 1;
                self.rng.range(1, SECTORS_PER_BLOCK as u64 - 1) as usize
            }
            _ => 0,
        }
    }

    fn start_write(&mut self, n: usize, block: u64, mut data: Box<Block>) {
        let Some(io) = self.new_io(n) else { return };
        if self.opts.sabotage == Some(Sabotage::UnderstatedParams) && n == 0 {
            // It lies in its slot and in the owner record alike.
            let lie = match (Slot::decode(&data), Owner::decode(&data)) {
                (Decoded::Valid(mut s), _) => {
                    s.params = LIAR_PARAMS;
                    Some(Box::new(s.encode()))
                }
                (_, Decoded::Valid(mut o)) => {
                    o.params = LIAR_PARAMS;
                    Some(Box::new(o.encode()))
                }
                _ => None,
            };
            if let Some(lie) = lie {
                // Its own reads must see what its machine wrote, or it would
                // think its slot was taken.
                self.lies.push((lie.clone(), data));
                if self.lies.len() > 8 {
                    self.lies.remove(0);
                }
                data = lie;
            }
        }
        let inc = self.nodes[n].inc;
        let (land_at, sectors, complete_at, result) = match self.path(n) {
            Some((_, PathDown::Fail)) => {
                let sectors = self.failed_write_sectors();
                let land = self.now + self.rng.range(0, 5);
                let done = land + self.rng.range(0, 3_000);
                let r = Err(IoFailure("no path to the device".into()));
                (land, sectors, done, r)
            }
            path => {
                let mut land = self.now + self.delay(n);
                if let Some((until, PathDown::Queue)) = path {
                    land = land.max(until + self.rng.range(0, 5));
                }
                let done = land + self.delay(n);
                if self.io_error() {
                    let sectors = self.failed_write_sectors();
                    (
                        land,
                        sectors,
                        done,
                        Err(IoFailure("EIO writing the lease area".into())),
                    )
                } else {
                    (land, SECTORS_PER_BLOCK, done, Ok(()))
                }
            }
        };
        let land_at = self.enforce_landing(self.now, land_at);
        if sectors > 0 {
            self.next_id += 1;
            let wid = self.next_id;
            let who = self.nodes[n].who();
            self.writes.insert(
                wid,
                PendingWrite {
                    who,
                    block,
                    data,
                    sectors,
                    at: land_at,
                    issued: self.now,
                    ghost: false,
                },
            );
            self.nodes[n].write = Some(wid);
            self.push(land_at, Ev::Land { wid, at: land_at });
        }
        self.push(
            complete_at,
            Ev::Complete {
                node: n,
                inc,
                io,
                input: Input::WriteDone(result),
            },
        );
    }

    fn land(&mut self, wid: u64, at: u64) {
        if self.writes.get(&wid).map_or(true, |w| w.at != at) {
            return;
        }
        let Some(w) = self.writes.remove(&wid) else {
            return;
        };
        let ceiling = self.layout.host_dead_ceiling_ms;
        if at.saturating_sub(w.issued) > ceiling {
            self.break_assumption(
                Assumption::LeaseWriteLandsInTime,
                format!(
                    "{}'s write to b{} lands {} ms after it was issued (ceiling {ceiling} ms)",
                    w.who,
                    w.block,
                    at - w.issued
                ),
            );
        }
        self.note_overwrite(&w);
        self.disk.write(w.block, &w.data, w.sectors);
        self.digest = fnv(fnv(self.digest, w.block), w.sectors as u64);
        if w.ghost {
            self.faults.ghost_writes += 1;
        }
        if self.tracing() {
            let what = self
                .disk
                .block(w.block)
                .map_or_else(|| "out of the area".into(), |b| describe(w.block, b));
            self.line(format!(
                "{:>9} disk   {} write b{} lands{}{}: {what}",
                self.now,
                w.who,
                w.block,
                if w.sectors < SECTORS_PER_BLOCK {
                    format!(" TORN ({}/{} sectors)", w.sectors, SECTORS_PER_BLOCK)
                } else {
                    String::new()
                },
                if w.ghost { " (crashed sender)" } else { "" },
            ));
        }
    }

    /// Notes a write that replaces another node's (or a newer incarnation's)
    /// record, and torn owner records.
    fn note_overwrite(&mut self, w: &PendingWrite) {
        let Some(old) = self.disk.block(w.block) else {
            return;
        };
        let torn = w.sectors < SECTORS_PER_BLOCK;
        if w.block == OWNER_BLOCK || w.block == OWNER_B_BLOCK {
            if torn || w.ghost {
                let s = format!(
                    "{}write of crashed-or-failed {} lands on the owner record, replacing {}",
                    if torn { "torn " } else { "late " },
                    w.who,
                    describe(w.block, old)
                );
                self.note(s);
            }
            return;
        }
        let (Decoded::Valid(old), Decoded::Valid(new)) = (Slot::decode(old), Slot::decode(&w.data))
        else {
            return;
        };
        let join_race = old.state == SlotState::Idle && new.state == SlotState::Idle;
        if old.name != new.name && !join_race {
            let s = format!(
                "{}'s write lands on s{} over {}/{:04x}'s record ({:?} g{}): two nodes in one slot",
                w.who,
                w.block - FIRST_SLOT_BLOCK,
                old.name,
                old.nonce & 0xffff,
                old.state,
                old.generation
            );
            self.note(s);
        } else if old.nonce != new.nonce && w.ghost {
            let s = format!(
                "write of crashed {} lands on s{} over its successor's record ({:?} g{})",
                w.who,
                w.block - FIRST_SLOT_BLOCK,
                old.state,
                old.generation
            );
            self.note(s);
        }
    }

    /// With [`Options::enforce_assumptions`], the landing time `at` of a
    /// write issued at `issued`, moved no later than the bound the stated
    /// assumption allows; otherwise `at`.
    fn enforce_landing(&self, issued: u64, at: u64) -> u64 {
        if self.opts.enforce_assumptions {
            at.min(issued + self.layout.host_dead_ceiling_ms)
        } else {
            at
        }
    }

    /// Records that the run broke a stated assumption now.
    fn break_assumption(&mut self, assumption: Assumption, detail: String) {
        if self.opts.trace {
            self.line(format!(
                "{:>9} ASSUME broken ({assumption}): {detail}",
                self.now
            ));
        }
        if self.broken.len() < 64 {
            self.broken.push(Broken {
                at_ms: self.now,
                assumption,
                detail,
            });
        }
    }

    // ----- faults ------------------------------------------------------------

    fn fault(&mut self) {
        if self.quiet() {
            return;
        }
        let f = self.opts.faults;
        let mut kinds = Vec::new();
        if f.crash {
            kinds.push((30, FaultKind::Crash));
        }
        if f.stall {
            kinds.push((25, FaultKind::Stall));
        }
        if f.path_loss {
            kinds.push((20, FaultKind::PathLoss));
        }
        if f.slow_disk {
            kinds.push((10, FaultKind::SlowDisk));
        }
        if kinds.is_empty() {
            return;
        }
        let kind = self.rng.weighted(&kinds);
        let n = self.rng.below(self.nodes.len() as u64) as usize;
        match kind {
            FaultKind::Crash => self.crash(n),
            FaultKind::Stall => self.stall(n),
            FaultKind::PathLoss => self.path_loss(n),
            FaultKind::SlowDisk => {
                self.faults.slow_disks += 1;
                self.slow_until = self.now + self.rng.range(2_000, 20_000);
                if self.tracing() {
                    self.line(format!(
                        "{:>9} FAULT  slow disk until {} ms",
                        self.now, self.slow_until
                    ));
                }
            }
        }
        let at = self.now + self.fault_gap();
        self.push(at, Ev::Fault);
    }

    fn crash(&mut self, n: usize) {
        if self.nodes[n].machine.is_none() {
            return;
        }
        self.faults.crashes += 1;
        let end = self.stop_now(n);
        self.close_tenure(n, end, "crashed: crash + io");
        let f = self.opts.faults;
        let nd = &mut self.nodes[n];
        nd.machine = None;
        nd.io = None;
        nd.wants = false;
        nd.stalled_until = 0;
        nd.path_down = None;
        let who = nd.who();
        let in_flight = nd
            .write
            .take()
            .and_then(|wid| Some((wid, self.writes.remove(&wid)?)));
        let mut fate = String::new();
        if let Some((wid, mut w)) = in_flight {
            w.ghost = true;
            let scheduled = w.at;
            let mut choices = vec![(40, 0u8), (20, 1)];
            if f.torn_writes {
                choices.push((20, 2));
            }
            if f.ghost_writes {
                choices.push((20, 3));
            }
            match self.rng.weighted(&choices) {
                0 => fate = format!("in-flight write to b{} lands at {} ms", w.block, w.at),
                1 => {
                    fate = format!("in-flight write to b{} never lands", w.block);
                    w.sectors = 0;
                }
                2 => {
                    self.faults.torn_writes += 1;
                    w.sectors = self.rng.range(0, SECTORS_PER_BLOCK as u64 - 1) as usize;
                    fate = format!(
                        "in-flight write to b{} lands torn ({}/8) at {} ms",
                        w.block, w.sectors, w.at
                    );
                }
                _ => {
                    w.at = w.at.max(self.now) + self.rng.range(0, 40_000);
                    w.at = self.enforce_landing(w.issued, w.at);
                    if f.torn_writes && self.rng.chance(300) {
                        self.faults.torn_writes += 1;
                        w.sectors = self.rng.range(1, SECTORS_PER_BLOCK as u64 - 1) as usize;
                    }
                    fate = format!(
                        "in-flight write to b{} lands late ({}/8) at {} ms",
                        w.block, w.sectors, w.at
                    );
                }
            }
            if w.sectors > 0 {
                let at = w.at;
                self.writes.insert(wid, w);
                if at != scheduled {
                    self.push(at, Ev::Land { wid, at });
                }
            }
        }
        let delay = match self.rng.below(20) {
            0..=9 => self.rng.range(100, 2_000),
            10..=16 => self.rng.range(2_000, 30_000),
            _ => self.rng.range(30_000, 90_000),
        };
        let at = self.now + delay;
        if self.tracing() {
            self.line(format!(
                "{:>9} FAULT  crash {who}; restart at {at} ms. {fate}",
                self.now
            ));
        }
        self.push(at, Ev::Restart { node: n });
    }

    fn restart(&mut self, n: usize) {
        if self.nodes[n].machine.is_some() {
            return;
        }
        self.faults.restarts += 1;
        let alt = self.opts.faults.varied_params && self.rng.chance(300);
        let nonce = self.rng.next_u64();
        let clock = draw_clock(&mut self.rng, self.opts, self.now);
        let layout = self.layout;
        let nd = &mut self.nodes[n];
        if alt {
            std::mem::swap(&mut nd.params, &mut nd.alt_params);
        }
        nd.inc += 1;
        nd.clock = clock;
        self.drifted |= clock.ppm() != 0;
        self.varied |= nd.params != Params::default();
        nd.machine = Some(LeaseMachine::new(
            Identity {
                name: nd.name.clone(),
                nonce,
                params: nd.params,
            },
            layout,
        ));
        nd.token += 1;
        nd.io = None;
        nd.write = None;
        nd.wants = false;
        nd.tenure = None;
        nd.silent = false;
        nd.fence_ends = 0;
        let who = nd.who();
        let hd = nd.params.host_dead_ms();
        if self.tracing() {
            self.line(format!(
                "{:>9} FAULT  restart {who}: nonce {:04x}, clock {:+} ppm from L{}, host_dead {hd}",
                self.now,
                nonce & 0xffff,
                clock.ppm(),
                clock.local(self.now)
            ));
        }
        let at = self.now + self.rng.range(0, 2_000);
        self.caller_at(n, at, true);
    }

    fn stall(&mut self, n: usize) {
        if self.nodes[n].machine.is_none() {
            return;
        }
        self.faults.stalls += 1;
        let hd = self.nodes[n].params.host_dead_ms();
        let d = match self.rng.below(20) {
            0..=9 => self.rng.range(100, 2_000),
            // host_dead may be under 2 s with varied parameters.
            10..=16 => self.rng.range(2_000.min(hd), hd.max(2_000)),
            _ => self.rng.range(hd, 3 * hd),
        };
        let until = self.now + d;
        let nd = &mut self.nodes[n];
        nd.stalled_until = nd.stalled_until.max(until);
        if self.tracing() {
            let who = self.nodes[n].who();
            self.line(format!(
                "{:>9} FAULT  stall {who} until {until} ms",
                self.now
            ));
        }
    }

    fn path_loss(&mut self, n: usize) {
        if self.nodes[n].machine.is_none() {
            return;
        }
        self.faults.path_losses += 1;
        let until = self.now + self.rng.range(1_000, 40_000);
        let mode = if self.rng.chance(500) {
            PathDown::Fail
        } else {
            PathDown::Queue
        };
        self.nodes[n].path_down = Some((until, mode));
        if self.tracing() {
            let who = self.nodes[n].who();
            self.line(format!(
                "{:>9} FAULT  path loss {who} ({mode:?}) until {until} ms",
                self.now
            ));
        }
    }

    fn begin_quiet(&mut self) {
        self.slow_until = 0;
        self.grants_before_quiet = self.oracle.grants();
        if self.tracing() {
            self.line(format!(
                "{:>9} QUIET  no more faults; every node wants the lease",
                self.now
            ));
        }
        for n in 0..self.nodes.len() {
            self.nodes[n].path_down = None;
            let at = self.now + self.rng.range(0, 1_000);
            if self.nodes[n].machine.is_none() {
                self.push(at, Ev::Restart { node: n });
            } else if !self.nodes[n].wants {
                self.caller_at(n, at, true);
            }
        }
    }
}

fn describe_input(input: &Input) -> String {
    match input {
        Input::Acquire => "Acquire".into(),
        Input::Release => "Release".into(),
        Input::Tick => "Tick".into(),
        Input::ReadDone(Ok(blocks)) => {
            let parts = blocks
                .iter()
                .enumerate()
                .map(|(i, b)| describe(HEADER_BLOCK + i as u64, b))
                .collect::<Vec<_>>();
            format!("ReadDone(ok: {})", parts.join(" | "))
        }
        Input::ReadDone(Err(e)) => format!("ReadDone(err: {})", e.0),
        Input::WriteDone(Ok(())) => "WriteDone(ok)".into(),
        Input::WriteDone(Err(e)) => format!("WriteDone(err: {})", e.0),
    }
}

fn describe_action(a: &Action, local: u64) -> String {
    match a {
        Action::Read { first_block, count } => format!("Read b{first_block}+{count}"),
        Action::Write { block, data } => format!("Write b{block} {}", describe(*block, data)),
        Action::WakeAt(t) => format!("WakeAt +{}", t.saturating_sub(local)),
        Action::Emit(e) => match e {
            Event::Acquired {
                generation,
                valid_until,
            } => format!(
                "ACQUIRED g{generation} valid +{}",
                valid_until.saturating_sub(local)
            ),
            Event::RenewFailed {
                generation,
                valid_until,
                error,
            } => format!(
                "RenewFailed g{generation} valid +{} ({error})",
                valid_until.saturating_sub(local)
            ),
            e => format!("{e:?}"),
        },
    }
}

fn action_code(a: &Action) -> u64 {
    match a {
        Action::Read { first_block, count } => 1 ^ (first_block << 8) ^ ((*count as u64) << 20),
        Action::Write { block, data } => {
            2 ^ (block << 8) ^ data.iter().take(128).fold(0, |h, &b| fnv(h, b as u64))
        }
        Action::WakeAt(t) => 3 ^ (t << 4),
        Action::Emit(e) => {
            4 ^ match e {
                Event::Acquired { generation, .. } => 1 + (generation << 4),
                Event::Lost { .. } => 2,
                Event::Released { .. } => 3,
                Event::Stopped => 4,
                Event::Waiting { .. } => 5,
                Event::Joined { .. } => 6,
                Event::RenewFailed { .. } => 7,
                Event::Failed { .. } => 8,
            } << 4
        }
    }
}
