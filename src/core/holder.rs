//! The holder side of an API session, as a pure state machine:
//! `step(now, input) -> actions`. `blockfence run` is its shell; the daemon
//! may reuse it for local holders.
//!
//! A holder got a grant (`valid_for_ms`, `keepalive_interval_ms`) from the
//! daemon and uses the volume (mounts it, runs a command that writes it) only
//! while it can prove the grant is valid on its own monotonic clock:
//!
//! ```text
//! deadline = send time of the newest successful keepalive (or acquire) + its valid_for_ms
//! fence_at = deadline - lead,   lead = min(fence_lead_ms, valid_for_ms / 2)
//! ```
//!
//! **Invariants.**
//! - Whenever the volume may be mounted (phases Preparing, Running, Stopping,
//!   Finishing), a step at or after `fence_at` emits [`HolderAction::Fence`]
//!   (unless the holder is already done). The lead leaves the fence time to
//!   stop the writes (its shutdown step) before `deadline`.
//! - The deadline follows the answer to the *newest* request sent, even when
//!   that answer gives less time than an older one: the daemon's latest word
//!   wins (a lease running out shortens the grant). Answers to older requests
//!   never move it.
//! - A session the daemon says is over (404 unknown_session, 410
//!   session_ended) is fenced at once.
//! - Nothing is mounted before the grant is known valid for longer than the
//!   lead: an acquire that waited long may already be stale, so it is first
//!   confirmed with a keepalive (phase Confirming).
//! - At most one keepalive is in flight; a failed one is retried after
//!   `min(keepalive_interval_ms, retry_ms)`.
//! - Every action list but the terminal ones ends with one
//!   [`HolderAction::ArmTimer`]; after [`HolderAction::Fence`],
//!   [`HolderAction::Finished`] or [`HolderAction::GiveUp`] the machine is
//!   done and ignores every input.
//!
//! **Phases.** Confirming -> Preparing (mount, start the command) -> Running ->
//! (daemon asks to stop: Stopping, the command was signalled) -> Finishing
//! (the command exited: sync, unmount) -> done (release). Keepalives go on in
//! every phase until done, including while the command is being stopped and
//! while the filesystem is being synced and unmounted.
//!
//! What it must not do: read a clock, perform I/O, or let the volume stay in
//! use past `fence_at` without fencing.

/// A point on the holder's own monotonic clock, in milliseconds.
pub type Millis = u64;

/// How long before the deadline the fence starts, at most (see the module docs).
pub const DEFAULT_FENCE_LEAD_MS: Millis = 1_000;

/// Longest wait before retrying a keepalive that failed.
pub const DEFAULT_RETRY_MS: Millis = 500;

/// How the machine behaves; times in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HolderConfig {
    /// How long a command asked to stop may take before it is fenced.
    pub stop_timeout_ms: Millis,
    /// How long before the deadline the fence starts (capped at half the
    /// grant's validity).
    pub fence_lead_ms: Millis,
    /// Longest wait before retrying a failed keepalive.
    pub retry_ms: Millis,
}

impl HolderConfig {
    /// The defaults with the given stop timeout.
    pub fn new(stop_timeout_ms: Millis) -> HolderConfig {
        HolderConfig {
            stop_timeout_ms,
            fence_lead_ms: DEFAULT_FENCE_LEAD_MS,
            retry_ms: DEFAULT_RETRY_MS,
        }
    }
}

/// A successful acquire or keepalive answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    /// When the request was sent (before it was written to the socket).
    pub sent_at: Millis,
    /// The grant's `valid_for_ms`, counted from `sent_at`.
    pub valid_for_ms: u64,
    /// The grant's `keepalive_interval_ms`.
    pub keepalive_interval_ms: u64,
    /// The daemon asks the holder to stop (grant `stop` is set).
    pub stop: bool,
}

/// Inputs to [`HolderMachine::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderInput {
    /// A timer fired (or any wake-up).
    Tick,
    /// A keepalive succeeded.
    KeepaliveOk(Renewal),
    /// A keepalive was answered "the session is over" (404 unknown_session,
    /// 410 session_ended).
    KeepaliveEnded,
    /// A keepalive failed in any other way (daemon unreachable, timeout, 503,
    /// another error).
    KeepaliveFailed,
    /// The volume is mounted and the command runs.
    Prepared,
    /// The command exited, or preparing failed (nothing runs any more).
    ChildExited,
    /// The unmount after [`HolderAction::Unmount`] finished.
    Unmounted {
        /// The filesystem is no longer mounted.
        ok: bool,
    },
}

/// Why the holder fences itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceReason {
    /// The daemon said the session is over.
    SessionEnded,
    /// No keepalive succeeded in time: `fence_at` passed.
    NoAnswer {
        /// The deadline that was about to pass.
        deadline: Millis,
    },
    /// The command did not exit within the stop timeout after it was asked to.
    StopTimeout,
}

/// Why the holder gives up before anything was mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUpReason {
    /// The daemon said the session is over.
    SessionEnded,
    /// Confirming the grant failed.
    NoAnswer,
}

/// What the shell must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderAction {
    /// Mount the volume and start the command; answer with
    /// [`HolderInput::Prepared`] or (on failure) [`HolderInput::ChildExited`].
    Prepare,
    /// Send a keepalive now; note the send time for [`Renewal::sent_at`].
    SendKeepalive,
    /// Step the machine again at this time at the latest.
    ArmTimer(Millis),
    /// Send the stop signal to the command.
    StopChild,
    /// Fence now: stop all writes, kill the command, unmount. Terminal.
    Fence(FenceReason),
    /// Sync and unmount; answer with [`HolderInput::Unmounted`].
    Unmount,
    /// Done; release the session if `release` (the filesystem is unmounted).
    /// Terminal.
    Finished {
        /// Whether to release the session.
        release: bool,
    },
    /// Done before anything was mounted; release the session best effort.
    /// Terminal.
    GiveUp(GiveUpReason),
}

/// Where the holder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The acquire's grant may be stale: confirming it with a keepalive.
    Confirming,
    /// Mounting and starting the command.
    Preparing,
    /// The command runs.
    Running,
    /// The command was asked to stop; fenced if it still runs at `until`.
    Stopping {
        /// The stop timeout's end.
        until: Millis,
    },
    /// The command exited; syncing and unmounting.
    Finishing,
    /// Fenced, finished or given up.
    Done,
}

impl Phase {
    /// The volume may be mounted in this phase.
    pub fn may_be_mounted(self) -> bool {
        matches!(
            self,
            Phase::Preparing | Phase::Running | Phase::Stopping { .. } | Phase::Finishing
        )
    }
}

/// The holder's state machine.
#[derive(Debug, Clone)]
pub struct HolderMachine {
    cfg: HolderConfig,
    phase: Phase,
    /// Send time of the renewal the deadline comes from.
    sent_at: Millis,
    valid_for_ms: u64,
    interval_ms: u64,
    next_keepalive: Millis,
    in_flight: bool,
    stop_requested: bool,
}

impl HolderMachine {
    /// Starts with the acquire's answer, at `now`.
    pub fn new(
        cfg: HolderConfig,
        now: Millis,
        acquired: Renewal,
    ) -> (HolderMachine, Vec<HolderAction>) {
        let mut m = HolderMachine {
            cfg,
            phase: Phase::Confirming,
            sent_at: acquired.sent_at,
            valid_for_ms: acquired.valid_for_ms,
            interval_ms: acquired.keepalive_interval_ms.max(1),
            next_keepalive: acquired
                .sent_at
                .saturating_add(acquired.keepalive_interval_ms.max(1)),
            in_flight: false,
            stop_requested: acquired.stop,
        };
        let mut actions = Vec::new();
        if now < m.fence_at() {
            m.phase = Phase::Preparing;
            actions.push(HolderAction::Prepare);
        } else {
            // Confirm at once.
            m.next_keepalive = now;
        }
        m.finish_step(now, &mut actions);
        (m, actions)
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The time by which writes must have stopped unless a newer keepalive
    /// succeeds.
    pub fn deadline(&self) -> Millis {
        self.sent_at.saturating_add(self.valid_for_ms)
    }

    /// When the fence starts unless a newer keepalive succeeds.
    pub fn fence_at(&self) -> Millis {
        let lead = self.cfg.fence_lead_ms.min(self.valid_for_ms / 2);
        self.deadline().saturating_sub(lead)
    }

    /// Feeds one input at `now` (monotonic, never decreasing).
    pub fn step(&mut self, now: Millis, input: HolderInput) -> Vec<HolderAction> {
        let mut actions = Vec::new();
        if self.phase == Phase::Done {
            return actions;
        }
        match input {
            HolderInput::Tick => {}
            HolderInput::KeepaliveOk(r) => {
                self.in_flight = false;
                if r.sent_at >= self.sent_at {
                    self.sent_at = r.sent_at;
                    self.valid_for_ms = r.valid_for_ms;
                    self.interval_ms = r.keepalive_interval_ms.max(1);
                    self.next_keepalive = r.sent_at.saturating_add(self.interval_ms);
                }
                self.stop_requested |= r.stop;
                if self.phase == Phase::Confirming {
                    if now < self.fence_at() {
                        self.phase = Phase::Preparing;
                        actions.push(HolderAction::Prepare);
                    } else {
                        // Valid for less than the lead even when fresh.
                        return self.done(actions, HolderAction::GiveUp(GiveUpReason::NoAnswer));
                    }
                }
            }
            HolderInput::KeepaliveEnded => {
                self.in_flight = false;
                let end = if self.phase == Phase::Confirming {
                    HolderAction::GiveUp(GiveUpReason::SessionEnded)
                } else {
                    HolderAction::Fence(FenceReason::SessionEnded)
                };
                return self.done(actions, end);
            }
            HolderInput::KeepaliveFailed => {
                self.in_flight = false;
                if self.phase == Phase::Confirming {
                    return self.done(actions, HolderAction::GiveUp(GiveUpReason::NoAnswer));
                }
                self.next_keepalive = now.saturating_add(self.interval_ms.min(self.cfg.retry_ms));
            }
            HolderInput::Prepared => {
                if self.phase == Phase::Preparing {
                    self.phase = Phase::Running;
                }
            }
            HolderInput::ChildExited => {
                if matches!(
                    self.phase,
                    Phase::Preparing | Phase::Running | Phase::Stopping { .. }
                ) {
                    self.phase = Phase::Finishing;
                    actions.push(HolderAction::Unmount);
                }
            }
            HolderInput::Unmounted { ok } => {
                if self.phase == Phase::Finishing {
                    return self.done(actions, HolderAction::Finished { release: ok });
                }
            }
        }
        self.finish_step(now, &mut actions);
        actions
    }

    /// The checks every step ends with: fence, stop, keepalive, timer.
    fn finish_step(&mut self, now: Millis, actions: &mut Vec<HolderAction>) {
        if self.phase.may_be_mounted() && now >= self.fence_at() {
            let deadline = self.deadline();
            let fence = HolderAction::Fence(FenceReason::NoAnswer { deadline });
            *actions = self.done(std::mem::take(actions), fence);
            return;
        }
        if self.phase == Phase::Running && self.stop_requested {
            self.phase = Phase::Stopping {
                until: now.saturating_add(self.cfg.stop_timeout_ms),
            };
            actions.push(HolderAction::StopChild);
        }
        if let Phase::Stopping { until } = self.phase {
            if now >= until {
                *actions = self.done(
                    std::mem::take(actions),
                    HolderAction::Fence(FenceReason::StopTimeout),
                );
                return;
            }
        }
        if !self.in_flight && now >= self.next_keepalive {
            self.in_flight = true;
            actions.push(HolderAction::SendKeepalive);
        }
        let mut wake = Millis::MAX;
        if !self.in_flight {
            wake = wake.min(self.next_keepalive);
        }
        if self.phase != Phase::Confirming {
            wake = wake.min(self.fence_at());
        }
        if let Phase::Stopping { until } = self.phase {
            wake = wake.min(until);
        }
        actions.push(HolderAction::ArmTimer(wake));
    }

    fn done(&mut self, mut actions: Vec<HolderAction>, end: HolderAction) -> Vec<HolderAction> {
        self.phase = Phase::Done;
        actions.retain(|a| !matches!(a, HolderAction::Prepare));
        actions.push(end);
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CFG: HolderConfig = HolderConfig {
        stop_timeout_ms: 30_000,
        fence_lead_ms: 1_000,
        retry_ms: 500,
    };

    fn renewal(sent_at: Millis) -> Renewal {
        Renewal {
            sent_at,
            valid_for_ms: 10_000,
            keepalive_interval_ms: 2_000,
            stop: false,
        }
    }

    fn has(actions: &[HolderAction], a: HolderAction) -> bool {
        actions.contains(&a)
    }

    fn timer(actions: &[HolderAction]) -> Option<Millis> {
        actions.iter().find_map(|a| match a {
            HolderAction::ArmTimer(t) => Some(*t),
            _ => None,
        })
    }

    /// A machine in Running at time 100, acquired at 0.
    fn running() -> HolderMachine {
        let (mut m, a) = HolderMachine::new(CFG, 100, renewal(0));
        assert!(has(&a, HolderAction::Prepare));
        m.step(100, HolderInput::Prepared);
        assert_eq!(m.phase(), Phase::Running);
        m
    }

    #[test]
    fn a_fresh_grant_mounts_at_once_and_keeps_alive_every_interval() {
        let (m, a) = HolderMachine::new(CFG, 5, renewal(0));
        assert_eq!(
            a,
            vec![HolderAction::Prepare, HolderAction::ArmTimer(2_000)]
        );
        assert_eq!(m.deadline(), 10_000);
        assert_eq!(m.fence_at(), 9_000);
        let mut m = running();
        assert_eq!(
            m.step(1_999, HolderInput::Tick),
            vec![HolderAction::ArmTimer(2_000)]
        );
        let a = m.step(2_000, HolderInput::Tick);
        assert_eq!(
            a,
            vec![HolderAction::SendKeepalive, HolderAction::ArmTimer(9_000)]
        );
        // The answer arrives later; the deadline counts from the send time.
        let a = m.step(2_300, HolderInput::KeepaliveOk(renewal(2_000)));
        assert_eq!(m.deadline(), 12_000);
        assert_eq!(a, vec![HolderAction::ArmTimer(4_000)]);
    }

    #[test]
    fn a_stale_acquire_is_confirmed_before_anything_is_mounted() {
        // Acquired after waiting 60 s: the grant counted from the send time is over.
        let (mut m, a) = HolderMachine::new(CFG, 60_000, renewal(0));
        assert_eq!(m.phase(), Phase::Confirming);
        assert!(!has(&a, HolderAction::Prepare));
        assert!(has(&a, HolderAction::SendKeepalive));
        assert!(!a.iter().any(|x| matches!(x, HolderAction::Fence(_))));
        let a = m.step(60_010, HolderInput::KeepaliveOk(renewal(60_000)));
        assert!(has(&a, HolderAction::Prepare));
        assert_eq!(m.phase(), Phase::Preparing);
        // A confirmation that fails gives up, with nothing to fence.
        let (mut m, _) = HolderMachine::new(CFG, 60_000, renewal(0));
        let a = m.step(60_010, HolderInput::KeepaliveFailed);
        assert_eq!(a, vec![HolderAction::GiveUp(GiveUpReason::NoAnswer)]);
        let (mut m, _) = HolderMachine::new(CFG, 60_000, renewal(0));
        let a = m.step(60_010, HolderInput::KeepaliveEnded);
        assert_eq!(a, vec![HolderAction::GiveUp(GiveUpReason::SessionEnded)]);
        assert_eq!(m.phase(), Phase::Done);
    }

    #[test]
    fn session_over_fences_at_once() {
        for phase_input in [None, Some(HolderInput::ChildExited)] {
            let mut m = running();
            if let Some(i) = phase_input {
                m.step(200, i);
            }
            let a = m.step(2_100, HolderInput::KeepaliveEnded);
            assert_eq!(a, vec![HolderAction::Fence(FenceReason::SessionEnded)]);
            assert_eq!(m.phase(), Phase::Done);
            assert!(m.step(2_200, HolderInput::Tick).is_empty());
        }
    }

    #[test]
    fn silence_fences_at_fence_at_with_retries_before() {
        let mut m = running();
        m.step(2_000, HolderInput::Tick);
        // Failing keepalives are retried after retry_ms.
        let a = m.step(2_050, HolderInput::KeepaliveFailed);
        assert_eq!(a, vec![HolderAction::ArmTimer(2_550)]);
        let a = m.step(2_550, HolderInput::Tick);
        assert_eq!(
            a,
            vec![HolderAction::SendKeepalive, HolderAction::ArmTimer(9_000)]
        );
        // This one hangs; nothing else is sent while it is in flight.
        assert_eq!(
            m.step(8_999, HolderInput::Tick),
            vec![HolderAction::ArmTimer(9_000)]
        );
        let a = m.step(9_000, HolderInput::Tick);
        assert_eq!(
            a,
            vec![HolderAction::Fence(FenceReason::NoAnswer {
                deadline: 10_000
            })]
        );
    }

    #[test]
    fn the_newest_answer_sets_the_deadline_even_when_shorter() {
        let mut m = running();
        m.step(2_000, HolderInput::Tick);
        let short = Renewal {
            valid_for_ms: 3_000,
            ..renewal(2_000)
        };
        m.step(2_010, HolderInput::KeepaliveOk(short));
        assert_eq!(m.deadline(), 5_000);
        assert_eq!(m.fence_at(), 4_000);
        // An answer to an older request (sent before) does not move it.
        m.step(2_020, HolderInput::KeepaliveOk(renewal(1_000)));
        assert_eq!(m.deadline(), 5_000);
        let a = m.step(4_000, HolderInput::Tick);
        assert!(has(
            &a,
            HolderAction::Fence(FenceReason::NoAnswer { deadline: 5_000 })
        ));
    }

    #[test]
    fn a_short_validity_caps_the_lead_at_half() {
        let r = Renewal {
            valid_for_ms: 1_000,
            keepalive_interval_ms: 200,
            ..renewal(0)
        };
        let (m, _) = HolderMachine::new(CFG, 0, r);
        assert_eq!(m.fence_at(), 500);
    }

    #[test]
    fn a_stop_request_signals_keeps_alive_and_fences_after_the_timeout() {
        let mut m = running();
        m.step(2_000, HolderInput::Tick);
        let stop = Renewal {
            stop: true,
            ..renewal(2_000)
        };
        let a = m.step(2_010, HolderInput::KeepaliveOk(stop));
        assert_eq!(
            a,
            vec![HolderAction::StopChild, HolderAction::ArmTimer(4_000)]
        );
        assert_eq!(m.phase(), Phase::Stopping { until: 32_010 });
        // Asked again: not signalled again.
        let a = m.step(4_000, HolderInput::Tick);
        assert_eq!(
            a,
            vec![HolderAction::SendKeepalive, HolderAction::ArmTimer(11_000)]
        );
        let a = m.step(
            4_010,
            HolderInput::KeepaliveOk(Renewal {
                stop: true,
                ..renewal(4_000)
            }),
        );
        assert!(!has(&a, HolderAction::StopChild));
        // Kept alive until the stop timeout; then fenced.
        let mut t = 4_010;
        while t < 32_010 {
            t = timer(&m.step(t, HolderInput::Tick)).unwrap();
            if t < 32_010 {
                m.step(t, HolderInput::Tick);
                m.step(
                    t,
                    HolderInput::KeepaliveOk(Renewal {
                        stop: true,
                        ..renewal(t)
                    }),
                );
            }
        }
        let a = m.step(32_010, HolderInput::Tick);
        assert_eq!(a, vec![HolderAction::Fence(FenceReason::StopTimeout)]);
    }

    #[test]
    fn a_stop_in_the_grant_is_delivered_once_the_command_runs() {
        let r = Renewal {
            stop: true,
            ..renewal(0)
        };
        let (mut m, a) = HolderMachine::new(CFG, 0, r);
        assert!(!has(&a, HolderAction::StopChild));
        let a = m.step(10, HolderInput::Prepared);
        assert!(has(&a, HolderAction::StopChild));
    }

    #[test]
    fn child_exit_unmounts_keeps_alive_and_releases_only_if_unmounted() {
        for ok in [true, false] {
            let mut m = running();
            let a = m.step(500, HolderInput::ChildExited);
            assert!(has(&a, HolderAction::Unmount));
            assert_eq!(m.phase(), Phase::Finishing);
            // Still kept alive while syncing.
            assert!(has(
                &m.step(2_000, HolderInput::Tick),
                HolderAction::SendKeepalive
            ));
            let a = m.step(2_100, HolderInput::Unmounted { ok });
            assert_eq!(a, vec![HolderAction::Finished { release: ok }]);
        }
        // A sync that outlasts the grant is fenced.
        let mut m = running();
        m.step(500, HolderInput::ChildExited);
        let a = m.step(9_000, HolderInput::Tick);
        assert!(matches!(
            a[..],
            [HolderAction::Fence(FenceReason::NoAnswer { .. })]
        ));
    }

    #[test]
    fn preparing_failure_goes_through_unmount() {
        let (mut m, _) = HolderMachine::new(CFG, 0, renewal(0));
        let a = m.step(10, HolderInput::ChildExited);
        assert!(has(&a, HolderAction::Unmount));
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Wait(u64),
        Ok {
            delay: u64,
            valid: u64,
            interval: u64,
            stop: bool,
        },
        Failed,
        Ended,
        Prepared,
        ChildExited,
        Unmounted(bool),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (0u64..5_000).prop_map(Ev::Wait),
            (0u64..3_000, 0u64..20_000, 1u64..5_000, any::<bool>()).prop_map(
                |(delay, valid, interval, stop)| Ev::Ok {
                    delay,
                    valid,
                    interval,
                    stop
                }
            ),
            Just(Ev::Failed),
            Just(Ev::Ended),
            Just(Ev::Prepared),
            Just(Ev::ChildExited),
            any::<bool>().prop_map(Ev::Unmounted),
        ]
    }

    proptest! {
        /// Whatever happens, a machine that may have the volume mounted is
        /// never left past fence_at after a step, and a Fence is only ever
        /// emitted as the last action; the timer never points past fence_at
        /// while mounted.
        #[test]
        fn never_mounted_past_fence_at(
            start in 0u64..20_000,
            valid in 0u64..20_000,
            evs in proptest::collection::vec(ev(), 1..60),
        ) {
            let first = Renewal { sent_at: 0, valid_for_ms: valid, keepalive_interval_ms: 2_000, stop: false };
            let (mut m, mut a) = HolderMachine::new(CFG, start, first);
            let mut now = start;
            let mut sent: Vec<Millis> = Vec::new();
            for e in evs {
                if m.phase() == Phase::Done { break; }
                if a.contains(&HolderAction::SendKeepalive) { sent.push(now); }
                let input = match e {
                    Ev::Wait(d) => { now += d; HolderInput::Tick }
                    Ev::Ok { delay, valid, interval, stop } => {
                        // Answers only to requests actually sent.
                        let Some(s) = sent.pop() else { continue };
                        now += delay;
                        HolderInput::KeepaliveOk(Renewal { sent_at: s, valid_for_ms: valid, keepalive_interval_ms: interval, stop })
                    }
                    Ev::Failed => { if sent.pop().is_none() { continue } HolderInput::KeepaliveFailed }
                    Ev::Ended => { if sent.pop().is_none() { continue } HolderInput::KeepaliveEnded }
                    Ev::Prepared => HolderInput::Prepared,
                    Ev::ChildExited => HolderInput::ChildExited,
                    Ev::Unmounted(ok) => HolderInput::Unmounted { ok },
                };
                a = m.step(now, input);
                let terminal = a.iter().position(|x| matches!(x,
                    HolderAction::Fence(_) | HolderAction::Finished { .. } | HolderAction::GiveUp(_)));
                if let Some(i) = terminal {
                    prop_assert_eq!(i, a.len() - 1, "terminal action not last: {:?}", a);
                    prop_assert_eq!(m.phase(), Phase::Done);
                } else {
                    prop_assert!(m.phase() != Phase::Done);
                    let t = timer(&a);
                    prop_assert!(t.is_some(), "no timer: {:?}", a);
                    if m.phase().may_be_mounted() {
                        prop_assert!(now < m.fence_at(), "mounted at {} past fence_at {}", now, m.fence_at());
                        prop_assert!(t.unwrap() <= m.fence_at());
                    }
                }
            }
        }
    }
}
