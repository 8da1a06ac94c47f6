//! The fence, as a pure state machine: `step(now, input) -> actions`.
//!
//! When this node loses a lease (or stops keeping one alive) it must stop every
//! write to the volume before a peer may take over. The caller starts the
//! machine with the time by which the fence must be complete on this node's
//! own monotonic clock, `deadline = valid_until + fence_timeout` (see
//! [`crate::core::params::Params::host_dead_ms`] for why a peer waits long
//! enough). Like [`crate::core::lease`], the machine performs no I/O and reads
//! no clock: the shell (`crate::fence`) carries out its [`FenceAction`]s and
//! feeds back the results and the time.
//!
//! **Order** (fixed, each step emitted at most once, never before the one
//! before it was emitted):
//! 1. [`Step::Shutdown`]: `EXT4_IOC_SHUTDOWN` on the mount. From then on no
//!    process can write through the filesystem (every write fails with EIO),
//!    whatever processes still hold it.
//! 2. [`Step::KillHolders`]: SIGKILL every process with a file, cwd, root or
//!    mapping on the filesystem, so nothing keeps it busy (or writes through it
//!    if the shutdown failed).
//! 3. [`Step::Unmount`]: the mount is gone; nothing on this node refers to the
//!    volume any more.
//!
//! **Deadline split.** With `budget = deadline - start`, each step has its own
//! absolute deadline ([`SHUTDOWN_SHARE_PCT`], [`KILL_SHARE_PCT`],
//! [`UNMOUNT_SHARE_PCT`] of the budget after the start):
//!
//! ```text
//! start          25%              60%                 90%        100%
//!   | shutdown    | kill holders    | unmount            | margin   | deadline
//! ```
//!
//! A step is *in time* if its `StepDone { ok: true }` arrives before the
//! machine is stepped at or after its deadline. The next step is emitted as
//! soon as the previous one completed (whatever the result) or missed its
//! deadline: a failed or hung step never blocks the next one from being tried,
//! so steps may then be outstanding at the same time.
//!
//! **Watchdog.** [`FenceAction::WatchdogStarve`] (emitted once) tells the shell
//! to stop feeding the watchdog for good, so the node is reset. It is emitted
//! as soon as any step fails or misses its deadline, and at the overall
//! deadline if `Unmount` has not succeeded by then. The last 10% of the budget
//! is the margin for a starve caused by a late unmount; a starve caused by an
//! earlier step happens earlier. The caller must pick a watchdog timeout that
//! fits the margin it relies on (or pass a deadline shortened by it).
//!
//! **End.** [`FenceAction::Done`] is emitted once: when all three steps have
//! completed, or at the overall deadline, whichever comes first. It carries
//! each step's outcome; after it the machine ignores every input.
//!
//! What it must not do: read a clock, perform I/O, emit a step twice, emit a
//! step before its predecessor, or let the overall deadline pass without
//! `Done` (and, unless every step succeeded in time, `WatchdogStarve`).

use serde::Serialize;

/// A point on the node's own monotonic clock, in milliseconds.
pub type Millis = u64;

/// Share of the budget after which the shutdown must have completed, in percent.
pub const SHUTDOWN_SHARE_PCT: u64 = 25;
/// Share of the budget after which the kill step must have completed, in percent.
pub const KILL_SHARE_PCT: u64 = 60;
/// Share of the budget after which the unmount must have completed, in percent.
pub const UNMOUNT_SHARE_PCT: u64 = 90;

/// One step of the fence, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// `EXT4_IOC_SHUTDOWN`: no more writes through the filesystem.
    Shutdown,
    /// SIGKILL every process holding something on the filesystem.
    KillHolders,
    /// Unmount the filesystem.
    Unmount,
}

/// The steps in the order they run.
pub const STEPS: [Step; 3] = [Step::Shutdown, Step::KillHolders, Step::Unmount];

impl Step {
    /// Position in [`STEPS`].
    pub fn index(self) -> usize {
        match self {
            Step::Shutdown => 0,
            Step::KillHolders => 1,
            Step::Unmount => 2,
        }
    }

    /// The share of the budget by which this step must have completed.
    pub fn share_pct(self) -> u64 {
        match self {
            Step::Shutdown => SHUTDOWN_SHARE_PCT,
            Step::KillHolders => KILL_SHARE_PCT,
            Step::Unmount => UNMOUNT_SHARE_PCT,
        }
    }

    /// The action that carries this step out.
    pub fn action(self) -> FenceAction {
        match self {
            Step::Shutdown => FenceAction::Shutdown,
            Step::KillHolders => FenceAction::KillHolders,
            Step::Unmount => FenceAction::Unmount,
        }
    }
}

/// Inputs to [`FenceMachine::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceInput {
    /// Start fencing; the fence must be complete by `deadline_ms` (own clock).
    Start { deadline_ms: Millis },
    /// The outstanding `step` finished, successfully or not.
    StepDone { step: Step, ok: bool },
    /// A timer armed with [`FenceAction::ArmTimer`] fired (or any wake-up).
    Tick,
}

/// How one step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Not emitted (the machine ended before it could be).
    NotStarted,
    /// Emitted, and no answer by the end.
    NoAnswer,
    /// Succeeded by its deadline.
    Ok,
    /// Succeeded, but after its deadline.
    Late,
    /// Reported failure.
    Failed,
}

/// One step's record, for events and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StepReport {
    pub step: Step,
    /// When the step had to be complete.
    pub deadline_ms: Millis,
    /// When it was emitted.
    pub started_ms: Option<Millis>,
    /// When its result arrived.
    pub finished_ms: Option<Millis>,
    pub outcome: Outcome,
}

/// Why the watchdog is starved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum StarveReason {
    /// The step reported failure.
    StepFailed { step: Step },
    /// The step was not done by its deadline.
    StepLate { step: Step },
    /// The overall deadline passed before the unmount succeeded.
    DeadlinePassed,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceAction {
    /// Shut the filesystem down; then feed `StepDone { step: Shutdown, .. }`.
    Shutdown,
    /// SIGKILL the holders; then feed `StepDone { step: KillHolders, .. }`.
    KillHolders,
    /// Unmount; then feed `StepDone { step: Unmount, .. }`.
    Unmount,
    /// Call `step(_, Tick)` no later than this time.
    ArmTimer(Millis),
    /// Stop feeding the watchdog, for good: the node must be reset.
    WatchdogStarve(StarveReason),
    /// The fence is over. `ok` = every step succeeded in time.
    Done { ok: bool, steps: [StepReport; 3] },
}

impl FenceAction {
    /// The step this action carries out, if it is one.
    pub fn step(&self) -> Option<Step> {
        match self {
            FenceAction::Shutdown => Some(Step::Shutdown),
            FenceAction::KillHolders => Some(Step::KillHolders),
            FenceAction::Unmount => Some(Step::Unmount),
            _ => None,
        }
    }
}

/// Per-step state inside the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    Pending,
    Running,
    /// Still running past its deadline (already counted as a miss).
    Overdue,
    Finished(Outcome),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Idle,
    Fencing,
    Finished,
}

/// The fence of one mount on this node. See the module docs.
#[derive(Debug, Clone)]
pub struct FenceMachine {
    phase: Phase,
    start_ms: Millis,
    deadline_ms: Millis,
    progress: [Progress; 3],
    reports: [StepReport; 3],
    starved: bool,
    armed: Option<Millis>,
}

impl Default for FenceMachine {
    fn default() -> Self {
        FenceMachine::new()
    }
}

/// The absolute deadline of `step` for a fence started at `start` that must
/// be complete by `deadline` (the split of the module docs). A deadline at or
/// before the start gives every step the start as its deadline.
pub fn step_deadline(step: Step, start: Millis, deadline: Millis) -> Millis {
    let budget = deadline.saturating_sub(start);
    start + budget * step.share_pct() / 100
}

impl FenceMachine {
    /// A machine waiting for [`FenceInput::Start`].
    pub fn new() -> FenceMachine {
        let report = |step| StepReport {
            step,
            deadline_ms: 0,
            started_ms: None,
            finished_ms: None,
            outcome: Outcome::NotStarted,
        };
        FenceMachine {
            phase: Phase::Idle,
            start_ms: 0,
            deadline_ms: 0,
            progress: [Progress::Pending; 3],
            reports: STEPS.map(report),
            starved: false,
            armed: None,
        }
    }

    /// Whether `Done` has been emitted.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// Whether `WatchdogStarve` has been emitted.
    pub fn starved(&self) -> bool {
        self.starved
    }

    /// When the fence started (the time of `Start`).
    pub fn start_ms(&self) -> Millis {
        self.start_ms
    }

    /// The overall deadline (never before the start).
    pub fn deadline_ms(&self) -> Millis {
        self.deadline_ms
    }

    /// The per-step records so far.
    pub fn reports(&self) -> [StepReport; 3] {
        self.reports
    }

    /// The only entry point: feed an input at `now` (own monotonic clock),
    /// get the actions to carry out, in order.
    pub fn step(&mut self, now: Millis, input: FenceInput) -> Vec<FenceAction> {
        let mut out = Vec::new();
        match (&self.phase, input) {
            (Phase::Idle, FenceInput::Start { deadline_ms }) => {
                self.phase = Phase::Fencing;
                self.start_ms = now;
                self.deadline_ms = deadline_ms.max(now);
                for (i, step) in STEPS.iter().enumerate() {
                    self.reports[i].deadline_ms = step_deadline(*step, now, self.deadline_ms);
                }
                self.emit_step(now, Step::Shutdown, &mut out);
            }
            (Phase::Fencing, FenceInput::StepDone { step, ok }) => {
                self.complete(now, step, ok, &mut out);
            }
            // Ticks just advance time; anything else is out of place and ignored
            // (a second Start, a result before Start or after Done).
            _ => {}
        }
        if self.phase == Phase::Fencing {
            self.advance(now, &mut out);
        }
        out
    }

    fn emit_step(&mut self, now: Millis, step: Step, out: &mut Vec<FenceAction>) {
        let i = step.index();
        debug_assert_eq!(self.progress[i], Progress::Pending);
        self.progress[i] = Progress::Running;
        self.reports[i].started_ms = Some(now);
        out.push(step.action());
    }

    fn starve(&mut self, reason: StarveReason, out: &mut Vec<FenceAction>) {
        if !self.starved {
            self.starved = true;
            out.push(FenceAction::WatchdogStarve(reason));
        }
    }

    fn complete(&mut self, now: Millis, step: Step, ok: bool, out: &mut Vec<FenceAction>) {
        let i = step.index();
        let overdue = match self.progress[i] {
            Progress::Running => false,
            Progress::Overdue => true,
            // A result for a step not outstanding: ignore it.
            Progress::Pending | Progress::Finished(_) => return,
        };
        let late = overdue || now > self.reports[i].deadline_ms;
        let outcome = match (ok, late) {
            (false, _) => Outcome::Failed,
            (true, false) => Outcome::Ok,
            (true, true) => Outcome::Late,
        };
        self.progress[i] = Progress::Finished(outcome);
        self.reports[i].finished_ms = Some(now);
        self.reports[i].outcome = outcome;
        match outcome {
            Outcome::Failed => self.starve(StarveReason::StepFailed { step }, out),
            Outcome::Late => self.starve(StarveReason::StepLate { step }, out),
            _ => {}
        }
    }

    /// Applies deadlines, emits the next step where it is due, and ends the
    /// fence when everything answered or the overall deadline is reached.
    fn advance(&mut self, now: Millis, out: &mut Vec<FenceAction>) {
        for i in 0..STEPS.len() {
            let step = STEPS[i];
            if self.progress[i] == Progress::Running && now >= self.reports[i].deadline_ms {
                self.progress[i] = Progress::Overdue;
                self.starve(StarveReason::StepLate { step }, out);
            }
            let released = matches!(self.progress[i], Progress::Finished(_) | Progress::Overdue);
            if released && i + 1 < STEPS.len() && self.progress[i + 1] == Progress::Pending {
                self.emit_step(now, STEPS[i + 1], out);
            }
        }
        let all_answered = self
            .progress
            .iter()
            .all(|p| matches!(p, Progress::Finished(_)));
        if all_answered || now >= self.deadline_ms {
            if self.progress[Step::Unmount.index()] != Progress::Finished(Outcome::Ok) {
                self.starve(StarveReason::DeadlinePassed, out);
            }
            for (p, r) in self.progress.iter().zip(self.reports.iter_mut()) {
                if matches!(p, Progress::Running | Progress::Overdue) {
                    r.outcome = Outcome::NoAnswer;
                }
            }
            let ok = self.reports.iter().all(|r| r.outcome == Outcome::Ok);
            if !ok {
                self.starve(StarveReason::DeadlinePassed, out);
            }
            self.phase = Phase::Finished;
            out.push(FenceAction::Done {
                ok,
                steps: self.reports,
            });
            return;
        }
        let next = self
            .progress
            .iter()
            .zip(self.reports.iter())
            .filter(|(p, _)| **p == Progress::Running)
            .map(|(_, r)| r.deadline_ms)
            .chain(std::iter::once(self.deadline_ms))
            .min()
            .expect("the overall deadline is always there");
        if self.armed != Some(next) {
            self.armed = Some(next);
            out.push(FenceAction::ArmTimer(next));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn done(actions: &[FenceAction]) -> Option<(bool, [StepReport; 3])> {
        actions.iter().find_map(|a| match a {
            FenceAction::Done { ok, steps } => Some((*ok, *steps)),
            _ => None,
        })
    }

    fn starves(actions: &[FenceAction]) -> bool {
        actions
            .iter()
            .any(|a| matches!(a, FenceAction::WatchdogStarve(_)))
    }

    #[test]
    fn deadline_split_is_25_60_90_percent() {
        assert_eq!(step_deadline(Step::Shutdown, 1_000, 5_000), 2_000);
        assert_eq!(step_deadline(Step::KillHolders, 1_000, 5_000), 3_400);
        assert_eq!(step_deadline(Step::Unmount, 1_000, 5_000), 4_600);
        // A deadline already passed leaves no budget at all.
        assert_eq!(step_deadline(Step::Unmount, 1_000, 500), 1_000);
        let mut m = FenceMachine::new();
        m.step(1_000, FenceInput::Start { deadline_ms: 5_000 });
        let r = m.reports();
        assert_eq!(
            r.map(|r| r.deadline_ms),
            [2_000, 3_400, 4_600],
            "the machine uses the documented split"
        );
    }

    #[test]
    fn all_steps_in_time_is_ok_and_never_starves() {
        let mut m = FenceMachine::new();
        let a = m.step(0, FenceInput::Start { deadline_ms: 1_000 });
        assert_eq!(a, vec![FenceAction::Shutdown, FenceAction::ArmTimer(250)]);
        let a = m.step(
            10,
            FenceInput::StepDone {
                step: Step::Shutdown,
                ok: true,
            },
        );
        assert_eq!(
            a,
            vec![FenceAction::KillHolders, FenceAction::ArmTimer(600)]
        );
        let a = m.step(
            20,
            FenceInput::StepDone {
                step: Step::KillHolders,
                ok: true,
            },
        );
        assert_eq!(a, vec![FenceAction::Unmount, FenceAction::ArmTimer(900)]);
        let a = m.step(
            30,
            FenceInput::StepDone {
                step: Step::Unmount,
                ok: true,
            },
        );
        assert!(!starves(&a), "{a:?}");
        let (ok, steps) = done(&a).expect("done");
        assert!(ok);
        assert_eq!(steps.map(|s| s.outcome), [Outcome::Ok; 3]);
        assert_eq!(steps.map(|s| s.finished_ms), [Some(10), Some(20), Some(30)]);
        assert!(m.is_done() && !m.starved());
        // Nothing after Done.
        assert!(m.step(40, FenceInput::Tick).is_empty());
        assert!(m.step(40, FenceInput::Start { deadline_ms: 99 }).is_empty());
    }

    #[test]
    fn a_failed_step_starves_at_once_and_the_next_step_still_runs() {
        let mut m = FenceMachine::new();
        m.step(0, FenceInput::Start { deadline_ms: 1_000 });
        let a = m.step(
            5,
            FenceInput::StepDone {
                step: Step::Shutdown,
                ok: false,
            },
        );
        assert_eq!(
            a,
            vec![
                FenceAction::WatchdogStarve(StarveReason::StepFailed {
                    step: Step::Shutdown
                }),
                FenceAction::KillHolders,
                FenceAction::ArmTimer(600),
            ]
        );
        m.step(
            6,
            FenceInput::StepDone {
                step: Step::KillHolders,
                ok: true,
            },
        );
        let a = m.step(
            7,
            FenceInput::StepDone {
                step: Step::Unmount,
                ok: true,
            },
        );
        assert!(!starves(&a), "starved once only: {a:?}");
        let (ok, steps) = done(&a).expect("done");
        assert!(!ok);
        assert_eq!(
            steps.map(|s| s.outcome),
            [Outcome::Failed, Outcome::Ok, Outcome::Ok]
        );
    }

    #[test]
    fn a_hung_step_is_passed_at_its_deadline_and_the_fence_ends_at_the_overall_one() {
        let mut m = FenceMachine::new();
        m.step(0, FenceInput::Start { deadline_ms: 1_000 });
        m.step(
            1,
            FenceInput::StepDone {
                step: Step::Shutdown,
                ok: true,
            },
        );
        // The kill never answers.
        assert!(m.step(599, FenceInput::Tick).is_empty());
        let a = m.step(600, FenceInput::Tick);
        assert_eq!(
            a,
            vec![
                FenceAction::WatchdogStarve(StarveReason::StepLate {
                    step: Step::KillHolders
                }),
                FenceAction::Unmount,
                FenceAction::ArmTimer(900),
            ]
        );
        m.step(
            601,
            FenceInput::StepDone {
                step: Step::Unmount,
                ok: true,
            },
        );
        let a = m.step(999, FenceInput::Tick);
        assert!(a.is_empty(), "{a:?}");
        let a = m.step(1_000, FenceInput::Tick);
        let (ok, steps) = done(&a).expect("done at the deadline");
        assert!(!ok);
        assert_eq!(
            steps.map(|s| s.outcome),
            [Outcome::Ok, Outcome::NoAnswer, Outcome::Ok]
        );
        // A late answer changes nothing.
        assert!(m
            .step(
                2_000,
                FenceInput::StepDone {
                    step: Step::KillHolders,
                    ok: true
                }
            )
            .is_empty());
    }

    #[test]
    fn a_step_that_answers_after_its_deadline_without_a_tick_is_late() {
        let mut m = FenceMachine::new();
        m.step(0, FenceInput::Start { deadline_ms: 1_000 });
        let a = m.step(
            300,
            FenceInput::StepDone {
                step: Step::Shutdown,
                ok: true,
            },
        );
        assert_eq!(
            a[0],
            FenceAction::WatchdogStarve(StarveReason::StepLate {
                step: Step::Shutdown
            })
        );
        assert_eq!(a[1], FenceAction::KillHolders);
        assert_eq!(m.reports()[0].outcome, Outcome::Late);
    }

    #[test]
    fn a_deadline_already_passed_tries_every_step_and_starves_at_once() {
        let mut m = FenceMachine::new();
        let a = m.step(5_000, FenceInput::Start { deadline_ms: 4_000 });
        let steps: Vec<Step> = a.iter().filter_map(FenceAction::step).collect();
        assert_eq!(steps, STEPS.to_vec());
        assert!(starves(&a));
        let (ok, _) = done(&a).expect("done at once");
        assert!(!ok);
    }

    #[test]
    fn inputs_before_start_and_unknown_results_are_ignored() {
        let mut m = FenceMachine::new();
        assert!(m.step(0, FenceInput::Tick).is_empty());
        assert!(m
            .step(
                0,
                FenceInput::StepDone {
                    step: Step::Unmount,
                    ok: true
                }
            )
            .is_empty());
        m.step(0, FenceInput::Start { deadline_ms: 100 });
        // A result for a step not yet emitted does not count.
        assert!(m
            .step(
                1,
                FenceInput::StepDone {
                    step: Step::Unmount,
                    ok: true
                }
            )
            .is_empty());
        assert_eq!(m.reports()[2].outcome, Outcome::NotStarted);
    }

    /// How the simulated shell answers one step: after `delay` ms, or never.
    #[derive(Debug, Clone, Copy)]
    struct Answer {
        delay: Option<u64>,
        ok: bool,
    }

    fn answer() -> impl Strategy<Value = Answer> {
        (
            prop_oneof![
                4 => (0u64..400).prop_map(Some),
                1 => Just(None),
            ],
            prop::bool::weighted(0.85),
        )
            .prop_map(|(delay, ok)| Answer { delay, ok })
    }

    /// Runs the machine against a simulated shell: step results arrive after
    /// their delays, timers fire when armed (or `tick_lag` later, a slow
    /// runtime), extra ticks at random times. Returns every (time, action).
    fn simulate(
        start: u64,
        budget: u64,
        answers: [Answer; 3],
        extra_ticks: &[u64],
        tick_lag: u64,
    ) -> Vec<(u64, FenceAction)> {
        let mut m = FenceMachine::new();
        let mut log = Vec::new();
        // Pending events: (time, order, input).
        let mut events: Vec<(u64, u64, FenceInput)> = extra_ticks
            .iter()
            .map(|t| (start + t, 0, FenceInput::Tick))
            .collect();
        let mut seq = 1u64;
        let mut now = start;
        let mut actions = m.step(
            now,
            FenceInput::Start {
                deadline_ms: start + budget,
            },
        );
        loop {
            for a in actions.drain(..) {
                if let Some(step) = a.step() {
                    let ans = answers[step.index()];
                    if let Some(d) = ans.delay {
                        events.push((now + d, seq, FenceInput::StepDone { step, ok: ans.ok }));
                        seq += 1;
                    }
                }
                if let FenceAction::ArmTimer(at) = a {
                    assert!(at > now, "timer armed in the past: {at} at {now}");
                    events.push((at + tick_lag, seq, FenceInput::Tick));
                    seq += 1;
                }
                log.push((now, a));
            }
            if m.is_done() || events.is_empty() {
                break;
            }
            events.sort_by_key(|e| (e.0, e.1));
            let (t, _, input) = events.remove(0);
            now = now.max(t);
            actions = m.step(now, input);
        }
        assert!(m.is_done(), "the machine never ended: {log:?}");
        log
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn order_uniqueness_deadline_and_starvation(
            start in 0u64..10_000,
            budget in 0u64..1_000,
            answers in [answer(), answer(), answer()],
            extra_ticks in prop::collection::vec(0u64..1_500, 0..6),
        ) {
            let log = simulate(start, budget, answers, &extra_ticks, 0);
            let deadline = start + budget;
            let emitted: Vec<Step> = log.iter().filter_map(|(_, a)| a.step()).collect();
            // Shutdown before kill before unmount, each at most once.
            prop_assert!(emitted.windows(2).all(|w| w[0] < w[1]), "{:?}", emitted);
            prop_assert_eq!(emitted.first().copied(), Some(Step::Shutdown));
            let dones: Vec<_> = log.iter().filter_map(|(t, a)| match a {
                FenceAction::Done { ok, steps } => Some((*t, *ok, *steps)),
                _ => None,
            }).collect();
            prop_assert_eq!(dones.len(), 1, "one Done: {:?}", log);
            let (done_at, ok, steps) = dones[0];
            prop_assert!(done_at <= deadline, "Done at {} after the deadline {}", done_at, deadline);
            let last_is_done = matches!(log.last(), Some((_, FenceAction::Done { .. })));
            prop_assert!(last_is_done, "Done is the last action: {:?}", log);
            let starves: Vec<u64> = log.iter().filter_map(|(t, a)| match a {
                FenceAction::WatchdogStarve(_) => Some(*t),
                _ => None,
            }).collect();
            prop_assert!(starves.len() <= 1, "starved twice: {:?}", log);
            prop_assert!(starves.iter().all(|t| *t <= deadline));
            // Starved exactly when some step was not Ok.
            let all_ok = steps.iter().all(|s| s.outcome == Outcome::Ok);
            prop_assert_eq!(ok, all_ok);
            prop_assert_eq!(starves.len() == 1, !all_ok, "{:?}", log);
            // Starved as soon as it was known: at a failure, at a missed deadline.
            for s in steps.iter().filter(|s| s.outcome != Outcome::Ok) {
                let known = match (s.outcome, s.started_ms) {
                    (Outcome::Failed, _) => s.finished_ms.expect("a failure has a time"),
                    (_, Some(started)) => s.deadline_ms.max(started),
                    (_, None) => deadline,
                };
                prop_assert!(starves[0] <= known, "starved at {} after {:?}: {:?}", starves[0], s, log);
            }
            // An Ok step answered ok by its deadline; a failed answer is never Ok.
            for (i, s) in steps.iter().enumerate() {
                let ans = answers[i];
                if s.outcome == Outcome::Ok {
                    prop_assert!(ans.ok);
                    prop_assert!(s.finished_ms.expect("finished") <= s.deadline_ms);
                }
                if !ans.ok && s.finished_ms.is_some() {
                    prop_assert_eq!(s.outcome, Outcome::Failed);
                }
                if ans.delay.is_none() && s.started_ms.is_some() {
                    prop_assert_eq!(s.outcome, Outcome::NoAnswer);
                }
                prop_assert_eq!(s.deadline_ms, step_deadline(STEPS[i], start, deadline));
            }
            // A failed or hung step does not block the next one: once the previous
            // step answered or passed its deadline, the next one is tried.
            for i in 1..3 {
                let prev = steps[i - 1];
                if let Some(started) = prev.started_ms {
                    let released = prev.finished_ms.is_some() || done_at >= prev.deadline_ms.max(started);
                    prop_assert!(!released || steps[i].started_ms.is_some(), "{:?} never tried: {:?}", STEPS[i], log);
                }
            }
            // A step is never emitted before the previous one finished or passed
            // its deadline.
            for i in 1..3 {
                if let Some(t) = steps[i].started_ms {
                    let prev = steps[i - 1];
                    let released = prev.finished_ms.is_some_and(|f| f <= t) || t >= prev.deadline_ms;
                    prop_assert!(released, "{:?} started at {} too early: {:?}", STEPS[i], t, steps);
                }
            }
        }

        #[test]
        fn a_slow_runtime_still_gets_done_and_starve_at_its_first_wakeup(
            budget in 1u64..1_000,
            answers in [answer(), answer(), answer()],
            lag in 1u64..200,
        ) {
            // Timers fire late: the machine cannot end before it is stepped, but it
            // must end at the first wake-up at or after the deadline and starve if
            // anything was not in time.
            let log = simulate(0, budget, answers, &[], lag);
            let (t, ok, steps) = log.iter().find_map(|(t, a)| match a {
                FenceAction::Done { ok, steps } => Some((*t, *ok, *steps)),
                _ => None,
            }).expect("done");
            prop_assert!(t <= budget + lag);
            let starved = log.iter().any(|(_, a)| matches!(a, FenceAction::WatchdogStarve(_)));
            prop_assert_eq!(starved, !ok);
            prop_assert_eq!(ok, steps.iter().all(|s| s.outcome == Outcome::Ok));
        }

        #[test]
        fn arbitrary_inputs_never_emit_a_step_twice(
            inputs in prop::collection::vec((0u64..50, 0u8..5, prop::bool::ANY), 0..40),
        ) {
            let mut m = FenceMachine::new();
            let mut now = 0;
            let mut seen = Vec::new();
            let mut dones = 0;
            for (dt, kind, ok) in inputs {
                now += dt;
                let input = match kind {
                    0 => FenceInput::Start { deadline_ms: now + dt * 10 },
                    1 => FenceInput::Tick,
                    k => FenceInput::StepDone { step: STEPS[(k - 2) as usize], ok },
                };
                for a in m.step(now, input) {
                    if let Some(s) = a.step() {
                        prop_assert!(!seen.contains(&s), "{:?} twice", s);
                        prop_assert!(seen.last().map_or(s == Step::Shutdown, |l| *l < s));
                        seen.push(s);
                    }
                    if matches!(a, FenceAction::Done { .. }) {
                        dones += 1;
                    }
                }
            }
            prop_assert!(dones <= 1);
        }
    }
}
