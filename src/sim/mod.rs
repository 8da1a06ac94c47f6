//! Deterministic simulation of the lease protocol, built to break it.
//!
//! Many simulated nodes, each a real [`LeaseMachine`](crate::core::lease::LeaseMachine),
//! share one simulated lease area. A seeded scheduler decides every delay and
//! every fault; an oracle checks after every grant that no two node
//! incarnations could write the volume at the same real time and that granted
//! generations strictly grow. A seed replays exactly: there is one random
//! generator ([`Rng`]), one event queue ordered by (real time, insertion order),
//! and no iteration over hash maps.
//!
//! This is pure code (no I/O, no clock reads, no threads except in
//! [`run_seeds`], where each seed still runs on one thread) used by
//! `tests/sim.rs` and meant for a `blockfence sim` developer subcommand.
//!
//! # Model
//!
//! - **Disk**: `2 + max_slots` blocks, formatted as a fresh area (free owner
//!   record at block 1, zero slots). Reads are served, and writes land, at
//!   one instant chosen by the scheduler between issue and completion; a write
//!   lands a prefix of its 512-byte sectors (all of them unless torn). Writes
//!   of different nodes interleave arbitrarily; one incarnation's writes land
//!   in issue order (it has at most one I/O outstanding).
//! - **Nodes**: 2 to 5 per seed (mostly 3 or more), named `n0`.., each with
//!   its own [`Identity`](crate::core::lease::Identity): a nonce from the seeded
//!   generator, default parameters mostly and other valid ones sometimes (all
//!   with `host_dead` within the area's ceiling).
//! - **Clocks**: `local = offset + (1 + ppm/1e6) x real` per incarnation,
//!   arbitrary offset, constant rate error within
//!   [`CLOCK_RATE_BOUND_PPM`](crate::core::params::CLOCK_RATE_BOUND_PPM)
//!   (extremes included). Clocks of different nodes are never compared.
//! - **Time**: real milliseconds through a queue of events. `WakeAt(t)` turns
//!   into a tick at the real time the node's clock reaches `t`.
//! - **Caller**: each node's application asks to `Acquire`, holds for a while
//!   and `Release`s, gives up waiting (Release while seeking), sometimes
//!   releases and re-acquires at once ("flap"), re-acquires after a `Lost`.
//!   It writes the volume exactly while it has been told `Acquired` and has not
//!   released, lost the lease or crashed.
//! - **Oracle**: see [`oracle`]: writer intervals in real time, extended by
//!   the fence window and the data-write `io_timeout`.
//! - **Quiet tail**: after [`Options::chaos_ms`] no new faults, small delays,
//!   every node wants the lease; the run records whether somebody got it.
//!
//! # Faults, and the real faults they model
//!
//! Each run draws a "weather" (calm, normal, stormy) that scales the rates.
//! Every class can be switched off through [`FaultMix`] (`BLOCKFENCE_SIM_FAULTS`
//! in the tests), to find which one a failure needs.
//!
//! | class (`FaultMix` field) | what happens | real fault |
//! |---|---|---|
//! | `long_delays` | an I/O takes 10-500 ms, or 1-5 s (beyond `io_timeout`) | busy array, path failover, SCSI retries |
//! | `delayed_io` | an I/O takes 10-40 s to be served / to land | queued I/O (multipath `queue_if_no_path`), stuck controller |
//! | `slow_disk` | for 2-20 s every I/O of every node is slow (0.5-8 s) | array controller failover |
//! | `io_errors` | an I/O fails; a failed write landed fully, torn or not at all | EIO, path loss mid-request |
//! | `torn_writes` | only a prefix of a write's sectors lands | crash or power loss mid-write on 512e devices |
//! | `path_loss` | for 1-40 s a node's I/O fails, or is queued until the path returns | cable/HBA/switch failure, `fail_if_no_path` vs `queue_if_no_path` |
//! | `crash` | the node stops; its in-flight write lands as scheduled, torn, never, or (`ghost_writes`) up to 40 s later; it restarts 0.1-90 s later as a fresh machine (new nonce and clock, same name) | process crash, kernel panic, power loss, reboot |
//! | `ghost_writes` | a crashed incarnation's in-flight write lands late, possibly after its successor started | a write stuck in the fabric or array outliving its sender |
//! | `stall` | the node takes no steps for 0.1 s to 3 x `host_dead`, its clock runs on; then it processes everything due | SIGSTOP, a VM paused, long GC or swap storms |
//! | `clock_drift` | rate errors up to the bound | crystal drift, NTP slewing |
//! | `varied_params` | non-default, valid parameters per node, changing across restarts | heterogeneous configuration, upgrades |
//! | `churn` | releases, re-acquires, give-ups, flaps at random times | operators, failovers, application restarts |
//! | `early_reacquire` | after `Lost`, the caller asks to `Acquire` again 0.5-10 s later, possibly before its own fence window (`valid_until + fence + io`) has passed; without it, only after | a runtime that re-acquires once its fence has completed |
//!
//! Broken variants ([`Sabotage`]) exist only to show the oracle can fail.
//!
//! # Assumptions and verdicts
//!
//! Some faults go beyond what the protocol assumes (docs/PROTOCOL.md §5):
//! the run records each moment it breaks an [`Assumption`] (a lease write
//! landing later than `host_dead_ceiling` after its issue). [`judge`] labels
//! a violation: *within the assumptions* when none was broken before it, or
//! when the same seed run with [`Options::enforce_assumptions`] (the same
//! draws, every landing moved back inside the bound) fails too; otherwise
//! *needing one broken*. [`run_seeds`] judges every seed and counts, per fault
//! class the run drew, both kinds ([`Summary::class_table`]);
//! `scripts/sim-sweep` prints that table for any number of seeds.
//!
//! What the simulation found in the protocol is pinned, with diagnoses, in the
//! `finding_*` tests of `tests/sim.rs`.

mod clock;
mod disk;
pub mod oracle;
mod rng;
mod world;

pub use clock::Clock;
pub use oracle::{Invariant, Violation};
pub use rng::Rng;

/// Which fault classes a run may draw (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultMix {
    pub long_delays: bool,
    pub delayed_io: bool,
    pub slow_disk: bool,
    pub io_errors: bool,
    pub torn_writes: bool,
    pub path_loss: bool,
    pub crash: bool,
    pub ghost_writes: bool,
    pub stall: bool,
    pub clock_drift: bool,
    pub varied_params: bool,
    pub churn: bool,
    pub early_reacquire: bool,
}

/// Names of the fault classes, in `FaultMix` field order.
pub const FAULT_CLASSES: [&str; 13] = [
    "long_delays",
    "delayed_io",
    "slow_disk",
    "io_errors",
    "torn_writes",
    "path_loss",
    "crash",
    "ghost_writes",
    "stall",
    "clock_drift",
    "varied_params",
    "churn",
    "early_reacquire",
];

impl FaultMix {
    /// Every fault class.
    pub fn all() -> FaultMix {
        FaultMix {
            long_delays: true,
            delayed_io: true,
            slow_disk: true,
            io_errors: true,
            torn_writes: true,
            path_loss: true,
            crash: true,
            ghost_writes: true,
            stall: true,
            clock_drift: true,
            varied_params: true,
            churn: true,
            early_reacquire: true,
        }
    }

    /// No faults at all: instant-ish I/O, exact clocks, default parameters.
    pub fn none() -> FaultMix {
        FaultMix {
            long_delays: false,
            delayed_io: false,
            slow_disk: false,
            io_errors: false,
            torn_writes: false,
            path_loss: false,
            crash: false,
            ghost_writes: false,
            stall: false,
            clock_drift: false,
            varied_params: false,
            churn: false,
            early_reacquire: false,
        }
    }

    fn flag(&mut self, name: &str) -> Option<&mut bool> {
        Some(match name {
            "long_delays" => &mut self.long_delays,
            "delayed_io" => &mut self.delayed_io,
            "slow_disk" => &mut self.slow_disk,
            "io_errors" => &mut self.io_errors,
            "torn_writes" => &mut self.torn_writes,
            "path_loss" => &mut self.path_loss,
            "crash" => &mut self.crash,
            "ghost_writes" => &mut self.ghost_writes,
            "stall" => &mut self.stall,
            "clock_drift" => &mut self.clock_drift,
            "varied_params" => &mut self.varied_params,
            "churn" => &mut self.churn,
            "early_reacquire" => &mut self.early_reacquire,
            _ => return None,
        })
    }

    /// Parses a comma-separated list, applied left to right to [`FaultMix::all`]:
    /// `all`, `none`, a class name (switch it on) or `-name` (switch it off).
    /// Example: `all,-delayed_io,-ghost_writes`.
    pub fn parse(spec: &str) -> Result<FaultMix, String> {
        let mut mix = FaultMix::all();
        for word in spec.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match word {
                "all" => mix = FaultMix::all(),
                "none" => mix = FaultMix::none(),
                _ => {
                    let (name, on) = match word.strip_prefix('-') {
                        Some(n) => (n, false),
                        None => (word, true),
                    };
                    let flag = mix.flag(name).ok_or_else(|| {
                        format!(
                            "unknown fault class {name:?}; known: all, none, {}",
                            FAULT_CLASSES.join(", ")
                        )
                    })?;
                    *flag = on;
                }
            }
        }
        Ok(mix)
    }
}

/// A stated assumption of the protocol (docs/PROTOCOL.md §5) that the
/// scheduler can break. A violation that happens only when one is broken is
/// reported apart from one that happens within them ([`judge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Assumption {
    /// Every lease write lands within `host_dead_ceiling` (real time) of
    /// being issued, or never. Broken by a write queued for longer (a path
    /// down with `queue_if_no_path`, a stuck controller, a crashed node's
    /// write stuck in the fabric). Enforced on real storage by the stale-I/O
    /// guard (queued I/O fails within its budget) and NVMe reservations (a
    /// preempted host's writes are refused whenever they arrive).
    LeaseWriteLandsInTime,
}

impl std::fmt::Display for Assumption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Assumption::LeaseWriteLandsInTime => {
                "a lease write lands within host_dead_ceiling of its issue"
            }
        })
    }
}

/// One moment a run broke an assumption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    pub at_ms: u64,
    pub assumption: Assumption,
    pub detail: String,
}

/// A deliberately broken variant, to prove the oracle catches what it should.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sabotage {
    /// Node `n0`'s caller ignores `Waiting` and believes it acquired: it writes
    /// for `lease_timeout` (plus its fence window) every time it is told to wait.
    IgnoreWaiting,
    /// Node `n0` records far shorter timings in its slot than it runs with, so
    /// peers compute a `host_dead` far too small and take over too early.
    UnderstatedParams,
    /// Clock rates drawn within +/-20%, twenty times the bound `host_dead`
    /// is computed for.
    ClockRateOutOfBound,
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Options {
    /// Simulated time with faults, in real ms.
    pub chaos_ms: u64,
    /// Simulated quiet tail after it (no new faults), in real ms.
    pub quiet_ms: u64,
    /// Record a readable line for every event in [`Outcome::trace`].
    pub trace: bool,
    pub faults: FaultMix,
    pub sabotage: Option<Sabotage>,
    /// Keep every stated assumption ([`Assumption`]): the scheduler draws
    /// the same numbers, but moves what would break one back inside it (a
    /// lease write due to land later than `host_dead_ceiling` after its issue
    /// lands at that bound). Used to tell whether a violation needed a broken
    /// assumption ([`judge`]).
    pub enforce_assumptions: bool,
}

/// Default simulated time with faults per seed.
pub const DEFAULT_CHAOS_MS: u64 = 150_000;
/// Default quiet tail per seed.
pub const DEFAULT_QUIET_MS: u64 = 90_000;

impl Default for Options {
    fn default() -> Self {
        Options {
            chaos_ms: DEFAULT_CHAOS_MS,
            quiet_ms: DEFAULT_QUIET_MS,
            trace: false,
            faults: FaultMix::all(),
            sabotage: None,
            enforce_assumptions: false,
        }
    }
}

/// How many faults of each kind a run (or many) drew.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub crashes: u64,
    pub restarts: u64,
    pub stalls: u64,
    pub path_losses: u64,
    pub slow_disks: u64,
    pub io_errors: u64,
    pub torn_writes: u64,
    pub long_delays: u64,
    pub beyond_io_timeout: u64,
    pub delayed_ios: u64,
    pub ghost_writes: u64,
    pub releases: u64,
    pub give_ups: u64,
    pub flaps: u64,
    /// Acquires asked for before the caller's own fence window ended.
    pub early_reacquires: u64,
}

impl FaultCounts {
    fn add(&mut self, o: &FaultCounts) {
        self.crashes += o.crashes;
        self.restarts += o.restarts;
        self.stalls += o.stalls;
        self.path_losses += o.path_losses;
        self.slow_disks += o.slow_disks;
        self.io_errors += o.io_errors;
        self.torn_writes += o.torn_writes;
        self.long_delays += o.long_delays;
        self.beyond_io_timeout += o.beyond_io_timeout;
        self.delayed_ios += o.delayed_ios;
        self.ghost_writes += o.ghost_writes;
        self.releases += o.releases;
        self.give_ups += o.give_ups;
        self.flaps += o.flaps;
        self.early_reacquires += o.early_reacquires;
    }
}

/// Surprises that are not safety violations (API or liveness oddities).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Anomalies {
    /// `Acquire` input while a release was in progress was dropped: the
    /// machine ended `Released` (idle) although the caller wants the lease.
    pub acquire_absorbed: u64,
    /// The machine holds (and renews) the lease, but never told the caller
    /// `Acquired` since the caller's last `Release`: nobody uses the lease and
    /// nobody else can get it.
    pub silent_hold: u64,
    /// `Acquired` while the caller did not want the lease, or twice in a row.
    pub unexpected_acquired: u64,
    /// `Failed` (e.g. no free slot).
    pub failed: u64,
}

impl Anomalies {
    fn add(&mut self, o: &Anomalies) {
        self.acquire_absorbed += o.acquire_absorbed;
        self.silent_hold += o.silent_hold;
        self.unexpected_acquired += o.unexpected_acquired;
        self.failed += o.failed;
    }

    fn any(&self) -> bool {
        self.acquire_absorbed + self.silent_hold + self.unexpected_acquired > 0
    }
}

/// The result of one seed.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub nodes: usize,
    pub max_slots: u16,
    pub weather: &'static str,
    /// The first broken invariant; the run stops there.
    pub violation: Option<Violation>,
    /// Grants (`Acquired` with a generation) in the whole run.
    pub grants: u64,
    /// Somebody was granted the lease during the quiet tail, or held it at its end.
    pub quiet_live: bool,
    /// Events processed.
    pub events: u64,
    /// Simulated real time reached, in ms.
    pub end_ms: u64,
    pub faults: FaultCounts,
    pub anomalies: Anomalies,
    /// A hash of everything that happened (times, inputs, actions, landings);
    /// equal for two runs of one seed.
    pub digest: u64,
    /// One line per event, when [`Options::trace`] is set.
    pub trace: Vec<String>,
    /// Stated assumptions the run broke before it ended (the first 64).
    pub broken: Vec<Broken>,
    /// Which fault classes the run drew, in [`FAULT_CLASSES`] order.
    pub classes: [bool; FAULT_CLASSES.len()],
}

/// Runs one seed.
pub fn run(seed: u64, opts: &Options) -> Outcome {
    world::World::new(seed, opts).run()
}

/// What one seed says about the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No invariant broken.
    Clean,
    /// An invariant broken while every stated assumption held: a protocol
    /// bug. Either the run broke no assumption before the violation, or it
    /// did but the same seed with the assumptions kept
    /// ([`Options::enforce_assumptions`]) fails as well (that violation is
    /// the one given).
    Within(Violation),
    /// An invariant broken only when an assumption is: the run broke
    /// `broken` before the violation, and the same seed with the assumptions
    /// kept shows no violation.
    NeedsBroken {
        violation: Violation,
        broken: Vec<Broken>,
    },
}

impl Verdict {
    /// The violation, if any.
    pub fn violation(&self) -> Option<&Violation> {
        match self {
            Verdict::Clean => None,
            Verdict::Within(v) | Verdict::NeedsBroken { violation: v, .. } => Some(v),
        }
    }

    /// The assumptions the violation needed broken (empty within them).
    pub fn assumptions(&self) -> Vec<Assumption> {
        let mut a: Vec<Assumption> = match self {
            Verdict::NeedsBroken { broken, .. } => broken.iter().map(|b| b.assumption).collect(),
            _ => Vec::new(),
        };
        a.sort();
        a.dedup();
        a
    }
}

/// Runs one seed and labels its violation, if any: within the stated
/// assumptions, or needing one broken (see [`Verdict`]).
pub fn judge(seed: u64, opts: &Options) -> (Outcome, Verdict) {
    let o = run(seed, opts);
    let verdict = match &o.violation {
        None => Verdict::Clean,
        Some(v) if o.broken.is_empty() || opts.enforce_assumptions => Verdict::Within(v.clone()),
        Some(v) => {
            let kept = run(
                seed,
                &Options {
                    enforce_assumptions: true,
                    trace: false,
                    ..opts.clone()
                },
            );
            match kept.violation {
                Some(kv) => Verdict::Within(kv),
                None => Verdict::NeedsBroken {
                    violation: v.clone(),
                    broken: o.broken.clone(),
                },
            }
        }
    };
    (o, verdict)
}

/// Seeds and violations among the runs that drew one fault class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassStats {
    /// Seeds whose run drew this class at least once.
    pub seeds: u64,
    /// Of those, violations within the assumptions.
    pub within: u64,
    /// Of those, violations that needed an assumption broken.
    pub needs_broken: u64,
    /// Of those, mutual-exclusion violations of either kind.
    pub mutual_exclusion: u64,
}

/// Results of many seeds.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub first_seed: u64,
    pub seeds: u64,
    /// Failing seeds, in seed order (every violation, however labelled).
    pub violations: Vec<(u64, Violation)>,
    /// Violations within the stated assumptions (protocol bugs), in seed order.
    pub within: Vec<(u64, Violation)>,
    /// Violations that needed an assumption broken, with the assumptions.
    pub needs_broken: Vec<(u64, Violation, Vec<Assumption>)>,
    /// Per fault class ([`FAULT_CLASSES`] order): seeds that drew it, and the
    /// violations among them.
    pub by_class: [ClassStats; FAULT_CLASSES.len()],
    /// Seeds whose run broke a stated assumption (with or without a violation).
    pub seeds_breaking: u64,
    pub grants: u64,
    pub seeds_with_grant: u64,
    pub seeds_quiet_live: u64,
    /// Seeds whose quiet tail saw no holder (first few).
    pub quiet_dead_seeds: Vec<u64>,
    pub events: u64,
    pub sim_ms: u64,
    pub faults: FaultCounts,
    pub anomalies: Anomalies,
    /// Seeds with an anomaly (first few).
    pub anomaly_seeds: Vec<u64>,
}

impl Summary {
    fn add(&mut self, o: &Outcome, verdict: &Verdict) {
        self.seeds += 1;
        if let Some(v) = &o.violation {
            self.violations.push((o.seed, v.clone()));
        }
        match verdict {
            Verdict::Clean => {}
            Verdict::Within(v) => self.within.push((o.seed, v.clone())),
            Verdict::NeedsBroken { violation, .. } => {
                self.needs_broken
                    .push((o.seed, violation.clone(), verdict.assumptions()))
            }
        }
        self.seeds_breaking += !o.broken.is_empty() as u64;
        let me = verdict
            .violation()
            .is_some_and(|v| v.invariant == Invariant::MutualExclusion);
        for (stats, _) in self
            .by_class
            .iter_mut()
            .zip(o.classes)
            .filter(|(_, on)| *on)
        {
            stats.seeds += 1;
            stats.within += matches!(verdict, Verdict::Within(_)) as u64;
            stats.needs_broken += matches!(verdict, Verdict::NeedsBroken { .. }) as u64;
            stats.mutual_exclusion += me as u64;
        }
        self.grants += o.grants;
        self.seeds_with_grant += (o.grants > 0) as u64;
        self.seeds_quiet_live += o.quiet_live as u64;
        if !o.quiet_live && o.violation.is_none() && self.quiet_dead_seeds.len() < 20 {
            self.quiet_dead_seeds.push(o.seed);
        }
        self.events += o.events;
        self.sim_ms += o.end_ms;
        self.faults.add(&o.faults);
        self.anomalies.add(&o.anomalies);
        if o.anomalies.any() && self.anomaly_seeds.len() < 20 {
            self.anomaly_seeds.push(o.seed);
        }
    }

    /// A few lines for humans.
    pub fn report(&self) -> String {
        let f = &self.faults;
        let a = &self.anomalies;
        format!(
            "seeds {first}..{end}: {viol} violating ({within} within the assumptions, {needs} needing one broken, \
             {me} of mutual exclusion), {grants} grants, {wg} seeds with >= 1 grant, \
             {ql} seeds with a holder in the quiet tail (no holder: {qd:?})\n\
             {events} events, {hours:.1} simulated hours\n\
             faults: {crashes} crashes ({restarts} restarts, {ghosts} late in-flight writes), {stalls} stalls, \
             {paths} path losses, {slow} slow-disk periods, {errs} I/O errors, {torn} torn writes, \
             {long} long I/Os, {beyond} beyond io_timeout, {delayed} delayed (>= 10 s); \
             caller: {rel} releases, {gu} give-ups, {flaps} flaps\n\
             anomalies (not safety): {absorbed} Acquire absorbed by a release in progress, \
             {silent} silent holds, {unexp} unexpected Acquired, {failed} Failed; seeds: {aseeds:?}",
            first = self.first_seed,
            end = self.first_seed + self.seeds,
            viol = self.violations.len(),
            within = self.within.len(),
            needs = self.needs_broken.len(),
            me = self.mutual_exclusion(),
            grants = self.grants,
            wg = self.seeds_with_grant,
            ql = self.seeds_quiet_live,
            qd = self.quiet_dead_seeds,
            events = self.events,
            hours = self.sim_ms as f64 / 3_600_000.0,
            crashes = f.crashes,
            restarts = f.restarts,
            ghosts = f.ghost_writes,
            stalls = f.stalls,
            paths = f.path_losses,
            slow = f.slow_disks,
            errs = f.io_errors,
            torn = f.torn_writes,
            long = f.long_delays,
            beyond = f.beyond_io_timeout,
            delayed = f.delayed_ios,
            rel = f.releases,
            gu = f.give_ups,
            flaps = f.flaps,
            absorbed = a.acquire_absorbed,
            silent = a.silent_hold,
            unexp = a.unexpected_acquired,
            failed = a.failed,
            aseeds = self.anomaly_seeds,
        )
    }
}

impl Summary {
    /// Adds the results of a later, disjoint run of seeds.
    pub fn merge(&mut self, o: Summary) {
        self.seeds += o.seeds;
        self.violations.extend(o.violations);
        self.within.extend(o.within);
        self.needs_broken.extend(o.needs_broken);
        self.seeds_breaking += o.seeds_breaking;
        for (a, b) in self.by_class.iter_mut().zip(o.by_class) {
            a.seeds += b.seeds;
            a.within += b.within;
            a.needs_broken += b.needs_broken;
            a.mutual_exclusion += b.mutual_exclusion;
        }
        self.grants += o.grants;
        self.seeds_with_grant += o.seeds_with_grant;
        self.seeds_quiet_live += o.seeds_quiet_live;
        let room = 20usize.saturating_sub(self.quiet_dead_seeds.len());
        self.quiet_dead_seeds
            .extend(o.quiet_dead_seeds.into_iter().take(room));
        self.events += o.events;
        self.sim_ms += o.sim_ms;
        self.faults.add(&o.faults);
        self.anomalies.add(&o.anomalies);
        let room = 20usize.saturating_sub(self.anomaly_seeds.len());
        self.anomaly_seeds
            .extend(o.anomaly_seeds.into_iter().take(room));
    }

    /// Mutual-exclusion violations of either kind.
    pub fn mutual_exclusion(&self) -> usize {
        self.violations
            .iter()
            .filter(|(_, v)| v.invariant == Invariant::MutualExclusion)
            .count()
    }

    /// The per-class table: seeds that drew each class, violations within
    /// the assumptions, violations that needed one broken, and the rates.
    pub fn class_table(&self) -> String {
        let rate = |n: u64, of: u64| {
            if of == 0 {
                "-".to_string()
            } else if n == 0 {
                "0".to_string()
            } else {
                format!("{:.2e}", n as f64 / of as f64)
            }
        };
        let mut t = format!(
            "{:<16} {:>9} {:>7} {:>9} {:>7} {:>10} {:>10}\n",
            "fault class", "seeds", "within", "rate", "needs", "rate", "mutual-ex"
        );
        let all = ClassStats {
            seeds: self.seeds,
            within: self.within.len() as u64,
            needs_broken: self.needs_broken.len() as u64,
            mutual_exclusion: self.mutual_exclusion() as u64,
        };
        let rows = FAULT_CLASSES
            .iter()
            .copied()
            .zip(self.by_class)
            .chain(std::iter::once(("(every seed)", all)));
        for (name, c) in rows {
            t.push_str(&format!(
                "{:<16} {:>9} {:>7} {:>9} {:>7} {:>10} {:>10}\n",
                name,
                c.seeds,
                c.within,
                rate(c.within, c.seeds),
                c.needs_broken,
                rate(c.needs_broken, c.seeds),
                c.mutual_exclusion
            ));
        }
        t.push_str(&format!(
            "{} seeds broke a stated assumption at least once (landings later than \
             host_dead_ceiling); none seen in n seeds bounds a rate below 3/n (95% confidence)\n",
            self.seeds_breaking
        ));
        t
    }
}

/// Runs seeds `first..first + count` on `threads` threads (each seed on one
/// thread, so each is as deterministic as alone), judging each ([`judge`]).
/// Traces are dropped.
pub fn run_seeds(first: u64, count: u64, opts: &Options, threads: usize) -> Summary {
    let threads = threads.clamp(1, count.max(1) as usize);
    let mut outcomes: Vec<(Outcome, Verdict)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads as u64)
            .map(|t| {
                s.spawn(move || {
                    (first + t..first + count)
                        .step_by(threads)
                        .map(|seed| {
                            let (mut o, verdict) = judge(seed, opts);
                            o.trace = Vec::new();
                            (o, verdict)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a simulation thread panicked"))
            .collect()
    });
    outcomes.sort_by_key(|(o, _)| o.seed);
    let mut summary = Summary {
        first_seed: first,
        ..Summary::default()
    };
    for (o, verdict) in &outcomes {
        summary.add(o, verdict);
    }
    summary
}
