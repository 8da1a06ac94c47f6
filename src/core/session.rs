//! Sessions: who on this node may write a volume, as a pure state machine,
//! `step(now, input) -> actions`.
//!
//! One [`SessionMachine`] per volume, beside that volume's
//! [`LeaseMachine`](crate::core::lease::LeaseMachine). The lease machine decides
//! whether *this node* holds the volume; this machine decides which local
//! holder (a database pod) gets it, for how long, and when this node must
//! fence its own use of the volume. The daemon's runtime feeds it API
//! requests, lease news and fence results with the time of its monotonic
//! clock, and carries out the [`Action`]s.
//!
//! Rules, in the order they protect the data:
//! - a grant exists only while the lease is held; it says how long it stays
//!   valid without news: until the lease's `valid_until`, never later;
//! - every end of a session goes through a fence before the lease is given
//!   up: released, expired (no keepalive for `session_timeout`), stopped too
//!   slowly after a stop request, or lost. The fence is a no-op when nothing
//!   on this node still has the volume mounted, so a clean release costs
//!   nothing;
//! - a lost lease is fenced by `valid_until + fence_timeout`, the instant a
//!   peer may count on (docs/PROTOCOL.md);
//! - a fence that failed or ran late never gives the lease up: the node keeps
//!   renewing (so no peer takes over while a writer may survive) and the
//!   runtime starves the watchdog, which resets the node; the volume answers
//!   `unavailable` meanwhile;
//! - at most one session per volume; other acquires wait in order until their
//!   deadline.
//!
//! What this module must not do: I/O, clock reads, randomness (session ids
//! come in with the request), or anything about the on-disk protocol.

use std::collections::VecDeque;

/// A point on the node's own monotonic clock, in milliseconds.
pub type Millis = u64;

/// Identifies one API request, so its answer can be routed back.
pub type ReqId = u64;

/// How many ended sessions are remembered, so that a late keepalive learns
/// that its session *ended* (410) rather than that it never existed (404).
pub const ENDED_MEMORY: usize = 16;

/// Timing of sessions on this volume (from the daemon's configuration and the
/// lease parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// A session without a keepalive for this long ends (and is fenced).
    pub session_timeout_ms: Millis,
    /// A holder asked to stop (handover, shutdown) has this long to release.
    pub stop_timeout_ms: Millis,
    /// How often holders are told to send keepalives.
    pub keepalive_interval_ms: Millis,
    /// The lease's fence budget: a fence must end by its deadline, at most
    /// this long after it starts (or after the lease expired).
    pub fence_timeout_ms: Millis,
    /// After handing the volume over, local acquires wait this long before
    /// seeking the lease again, so that the named node gets it.
    pub handover_hold_off_ms: Millis,
    /// An acquire's timeout is how long it waits while *someone else* holds
    /// the volume; taking a free volume takes a few lease I/Os, so a waiter
    /// that saw no holder gets this much longer (then it is refused anyway).
    pub acquire_grace_ms: Millis,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The holder released it.
    Released,
    /// No keepalive within `session_timeout`.
    Expired,
    /// Asked to stop (handover, shutdown), it did not release in time.
    StopTimedOut,
    /// The lease was lost (expired or superseded on disk).
    LeaseLost,
    /// The device lost its last usable path (or went away): writes issued
    /// now only queue, so the node fences at once instead of waiting for
    /// its renewals to fail.
    PathLost,
    /// The NVMe reservation was taken from this node (a peer preempted it):
    /// a peer already writes, so the node fences at once.
    ReservationLost,
}

impl EndReason {
    /// The word used in events, metrics and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Released => "released",
            EndReason::Expired => "session_expired",
            EndReason::StopTimedOut => "stop_timed_out",
            EndReason::LeaseLost => "lease_lost",
            EndReason::PathLost => "path_lost",
            EndReason::ReservationLost => "reservation_lost",
        }
    }
}

/// Why the holder is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// Planned switchover to another node.
    Handover,
    /// The daemon is shutting down.
    Shutdown,
}

/// What the lease machine reported, as the runtime tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseNews {
    /// This node holds the lease with `generation` until `valid_until`.
    Acquired {
        generation: u64,
        valid_until: Millis,
    },
    /// A renewal succeeded: the lease now runs until `valid_until`.
    Renewed { valid_until: Millis },
    /// A renewal failed or was late; the lease still runs until `valid_until`.
    RenewLate { valid_until: Millis },
    /// The lease is gone (expired on this node's clock, or superseded).
    Lost { generation: u64, reason: String },
    /// Released (`clean`: the release records were written).
    Released { generation: u64 },
    /// Stopped seeking without holding.
    Stopped,
    /// Someone else holds it (or it is contended).
    Waiting { holder: Option<String> },
    /// The lease machine cannot go on.
    Failed { error: String },
}

/// Inputs to [`SessionMachine::step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A holder asks for the volume, waiting until `deadline`. `session` is
    /// the id it gets if granted (made by the runtime, unguessable).
    Acquire {
        req: ReqId,
        holder: String,
        session: String,
        deadline: Millis,
    },
    /// A holder keeps its session alive.
    Keepalive { req: ReqId, session: String },
    /// A holder gives the volume up (it has unmounted).
    Release { req: ReqId, session: String },
    /// Ask the local holder to stop so that `to_node` can take the volume.
    Handover { req: ReqId, to_node: String },
    /// The daemon is stopping: ask the holder to stop, grant nothing new.
    Shutdown,
    /// What the lease machine said.
    Lease(LeaseNews),
    /// The fence the machine asked for finished; `ok` when every step
    /// succeeded by its deadline.
    FenceDone { ok: bool },
    /// The volume's device has no usable path any more (or was removed):
    /// the live session ends and is fenced at once, and nothing is granted
    /// until [`Input::PathBack`]. `why` is said in refusals.
    PathLost { why: String },
    /// The device is usable again. Grants nothing by itself: acquires may
    /// now proceed.
    PathBack,
    /// The runtime's reservation check found the NVMe reservation taken
    /// (or a write was refused with Reservation Conflict): fence at once.
    ReservationLost,
    /// The NVMe reservation could not be taken after this node won the
    /// lease (sent before that lease's `Acquired`): no writer starts; the
    /// lease is given back and the waiting acquires are refused with `why`.
    ReservationRefused { why: String },
    /// A timer fired.
    Tick,
}

/// A grant, as the machine answers it (the runtime adds the device and mount
/// options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub session: String,
    pub holder: String,
    pub generation: u64,
    /// The lease's remaining validity: the holder must stop writing by the
    /// time it sent this request plus this.
    pub valid_for_ms: Millis,
    pub keepalive_interval_ms: Millis,
    pub stop: Option<StopKind>,
}

/// A refusal, as the machine answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Timed out waiting; `holder` is who has it (a local holder or a node).
    Held { holder: Option<String> },
    /// No such session, ever (or forgotten).
    UnknownSession,
    /// The session ended, for this reason: stop writing.
    SessionEnded(EndReason),
    /// Handover asked of a volume this node does not hold.
    NotHeld { holder: Option<String> },
    /// The volume cannot be granted now (daemon stopping, fence failed,
    /// lease machine failed).
    Unavailable(String),
}

/// An answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Acquire and keepalive.
    Grant(Granted),
    /// Release and handover: done; the runtime answers with the status.
    Done,
    /// The request is refused.
    Refused(Refusal),
}

/// Why the machine asks for a fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceCause(pub EndReason);

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Feed `Input::Acquire` to the lease machine.
    SeekLease,
    /// Feed `Input::Release` to the lease machine.
    ReleaseLease,
    /// Fence this node's use of the volume (every mount of its device), each
    /// step done by `deadline`; then feed [`Input::FenceDone`].
    Fence { deadline: Millis, cause: EndReason },
    /// Answer request `req`.
    Reply { req: ReqId, answer: Answer },
    /// Tell subscribers.
    Publish(Published),
    /// Call `step(_, Tick)` no later than this.
    WakeAt(Millis),
}

/// Events for the volume's subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    Granted {
        session: String,
        holder: String,
        generation: u64,
    },
    RenewalLate {
        generation: u64,
        valid_for_ms: Millis,
    },
    HandoverRequested {
        session: String,
        to_node: String,
    },
    Fencing {
        generation: u64,
        cause: EndReason,
    },
    Fenced {
        generation: u64,
        ok: bool,
    },
    Released {
        generation: u64,
    },
}

/// This node's use of the volume, for status, metrics and the watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not wanted, not held.
    Idle,
    /// Seeking the lease for waiting acquires.
    Seeking,
    /// Held, with a session.
    Serving,
    /// A fence runs; then the lease is released (or was lost).
    Fencing,
    /// The lease release is being written.
    Releasing,
    /// A fence failed: the lease is kept until the watchdog resets the node.
    FenceFailed,
    /// The lease machine failed (e.g. no free slot); nothing is granted.
    Broken,
}

#[derive(Debug, Clone)]
struct Session {
    id: String,
    holder: String,
    generation: u64,
    last_keepalive: Millis,
    stop: Option<(StopKind, Millis)>,
}

#[derive(Debug, Clone)]
struct Waiter {
    req: ReqId,
    holder: String,
    session: String,
    deadline: Millis,
}

/// The session state machine of one volume on this node.
#[derive(Debug, Clone)]
pub struct SessionMachine {
    cfg: SessionConfig,
    phase: Phase,
    session: Option<Session>,
    waiters: VecDeque<Waiter>,
    ended: VecDeque<(String, EndReason)>,
    /// Releases to answer once the lease release is written.
    release_replies: Vec<ReqId>,
    /// The lease, as far as this node holds it: (generation, valid_until).
    lease: Option<(u64, Millis)>,
    /// The generation of the lease a running fence is about.
    fence_generation: u64,
    /// Whether the lease was lost (so the fence does not end in a release).
    lost: bool,
    /// Who holds the volume elsewhere, as the lease machine last said.
    elsewhere: Option<String>,
    /// Highest generation seen.
    generation: u64,
    shutting_down: bool,
    /// A handover was asked: once the session's fence is over, local
    /// acquires hold off for `handover_hold_off_ms`.
    handing_over: bool,
    hold_off_until: Millis,
    broken: Option<String>,
    /// Why the device cannot be used now (path lost, device gone).
    path_lost: Option<String>,
    /// The next acquired lease is given back at once, for this reason.
    refuse_next_grant: Option<String>,
}

impl SessionMachine {
    /// An idle machine.
    pub fn new(cfg: SessionConfig) -> SessionMachine {
        SessionMachine {
            cfg,
            phase: Phase::Idle,
            session: None,
            waiters: VecDeque::new(),
            ended: VecDeque::new(),
            release_replies: Vec::new(),
            lease: None,
            fence_generation: 0,
            lost: false,
            elsewhere: None,
            generation: 0,
            shutting_down: false,
            handing_over: false,
            hold_off_until: 0,
            broken: None,
            path_lost: None,
            refuse_next_grant: None,
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The lease held by this node: (generation, valid_until).
    pub fn lease(&self) -> Option<(u64, Millis)> {
        self.lease
    }

    /// Highest generation seen (held here or elsewhere).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Who holds the volume: the local session's holder, or another node.
    pub fn holder(&self) -> Option<String> {
        match &self.session {
            Some(s) => Some(s.holder.clone()),
            None if self.lease.is_some() => None,
            None => self.elsewhere.clone(),
        }
    }

    /// Number of live sessions (0 or 1).
    pub fn sessions(&self) -> usize {
        usize::from(self.session.is_some())
    }

    /// Whether this node may be writing the volume right now: from a grant
    /// until the fence after it has finished. The watchdog is fed only while
    /// every such volume's lease (plus fence budget) is still running.
    pub fn may_be_writing(&self) -> bool {
        matches!(
            self.phase,
            Phase::Serving | Phase::Fencing | Phase::FenceFailed
        )
    }

    /// Whether `session` is the live, granted session at `now` (its lease
    /// still valid): what the daemon needs before it mounts for it.
    /// Otherwise why not (unknown, or ended and why).
    pub fn live(&self, now: Millis, session: &str) -> Result<(), Refusal> {
        match &self.session {
            Some(s) if s.id == session => {
                if self.phase == Phase::Serving && self.lease.is_some_and(|(_, until)| now < until)
                {
                    Ok(())
                } else {
                    Err(Refusal::SessionEnded(EndReason::LeaseLost))
                }
            }
            _ => Err(self.gone(session)),
        }
    }

    /// Advances the machine to `now` with `input`; returns what to do.
    pub fn step(&mut self, now: Millis, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        self.check_expiry(now, &mut out);
        match input {
            Input::Acquire {
                req,
                holder,
                session,
                deadline,
            } => self.on_acquire(now, req, holder, session, deadline, &mut out),
            Input::Keepalive { req, session } => self.on_keepalive(now, req, &session, &mut out),
            Input::Release { req, session } => self.on_release(now, req, &session, &mut out),
            Input::Handover { req, to_node } => self.on_handover(now, req, to_node, &mut out),
            Input::Shutdown => {
                self.shutting_down = true;
                if let Some(s) = &mut self.session {
                    if s.stop.is_none() {
                        s.stop = Some((StopKind::Shutdown, now));
                    }
                }
                for w in std::mem::take(&mut self.waiters) {
                    reply(
                        &mut out,
                        w.req,
                        Answer::Refused(Refusal::Unavailable("the daemon is stopping".into())),
                    );
                }
            }
            Input::Lease(news) => self.on_lease(now, news, &mut out),
            Input::FenceDone { ok } => self.on_fence_done(now, ok, &mut out),
            Input::PathLost { why } => {
                self.path_lost = Some(why);
                if self.phase == Phase::Serving {
                    self.end_session(now, EndReason::PathLost, &mut out);
                }
                let why = self.unavailable().unwrap_or_default();
                for w in std::mem::take(&mut self.waiters) {
                    reply(
                        &mut out,
                        w.req,
                        Answer::Refused(Refusal::Unavailable(why.clone())),
                    );
                }
            }
            Input::PathBack => self.path_lost = None,
            Input::ReservationRefused { why } => self.refuse_next_grant = Some(why),
            Input::ReservationLost => {
                if self.phase == Phase::Serving {
                    self.end_session(now, EndReason::ReservationLost, &mut out);
                }
            }
            Input::Tick => {}
        }
        self.on_time(now, &mut out);
        if let Some(t) = self.next_wake() {
            out.push(Action::WakeAt(t.max(now)));
        }
        out
    }

    fn on_acquire(
        &mut self,
        now: Millis,
        req: ReqId,
        holder: String,
        session: String,
        deadline: Millis,
        out: &mut Vec<Action>,
    ) {
        if let Some(why) = self.unavailable() {
            reply(out, req, Answer::Refused(Refusal::Unavailable(why)));
            return;
        }
        self.waiters.push_back(Waiter {
            req,
            holder,
            session,
            deadline,
        });
        // A zero timeout must still get a chance at a free volume: the lease
        // is sought, and the waiter answered at its deadline (now) if held.
        self.seek_if_wanted(now, out);
    }

    fn unavailable(&self) -> Option<String> {
        if self.shutting_down {
            return Some("the daemon is stopping".into());
        }
        if self.phase == Phase::FenceFailed {
            return Some(
                "a fence of this volume failed on this node; it keeps the lease until the \
                 watchdog resets the node (see the daemon's log)"
                    .into(),
            );
        }
        if let Some(e) = &self.broken {
            return Some(format!("the lease cannot be used: {e}"));
        }
        if let Some(why) = &self.path_lost {
            return Some(format!(
                "the volume's device is not usable on this node: {why}; acquires are \
                 answered again once it is back (check the storage path, `blockfence doctor`)"
            ));
        }
        None
    }

    fn seek_if_wanted(&mut self, now: Millis, out: &mut Vec<Action>) {
        if self.phase == Phase::Idle && !self.waiters.is_empty() && now >= self.hold_off_until {
            self.phase = Phase::Seeking;
            out.push(Action::SeekLease);
        }
    }

    fn on_keepalive(&mut self, now: Millis, req: ReqId, session: &str, out: &mut Vec<Action>) {
        match &mut self.session {
            Some(s) if s.id == session => {
                s.last_keepalive = now;
                let granted = self.granted(now);
                reply(out, req, Answer::Grant(granted));
            }
            _ => reply(out, req, Answer::Refused(self.gone(session))),
        }
    }

    /// Why `session` is not the live one.
    fn gone(&self, session: &str) -> Refusal {
        match self.ended.iter().find(|(id, _)| id == session) {
            Some((_, why)) => Refusal::SessionEnded(*why),
            None => Refusal::UnknownSession,
        }
    }

    fn granted(&self, now: Millis) -> Granted {
        let s = self
            .session
            .as_ref()
            .expect("granted is called with a session");
        let valid_until = self.lease.map_or(now, |(_, until)| until);
        Granted {
            session: s.id.clone(),
            holder: s.holder.clone(),
            generation: s.generation,
            valid_for_ms: valid_until.saturating_sub(now),
            keepalive_interval_ms: self.cfg.keepalive_interval_ms,
            stop: s.stop.map(|(kind, _)| kind),
        }
    }

    fn on_release(&mut self, now: Millis, req: ReqId, session: &str, out: &mut Vec<Action>) {
        match &self.session {
            Some(s) if s.id == session => {
                self.release_replies.push(req);
                self.end_session(now, EndReason::Released, out);
            }
            _ => reply(out, req, Answer::Refused(self.gone(session))),
        }
    }

    fn on_handover(&mut self, now: Millis, req: ReqId, to_node: String, out: &mut Vec<Action>) {
        let Some(s) = &mut self.session else {
            let holder = self.holder();
            reply(out, req, Answer::Refused(Refusal::NotHeld { holder }));
            return;
        };
        if s.stop.is_none() {
            s.stop = Some((StopKind::Handover, now));
        }
        out.push(Action::Publish(Published::HandoverRequested {
            session: s.id.clone(),
            to_node,
        }));
        // Local acquires step aside for a while once this session is over.
        self.handing_over = true;
        reply(out, req, Answer::Done);
    }

    /// Ends the live session and starts its fence.
    fn end_session(&mut self, now: Millis, why: EndReason, out: &mut Vec<Action>) {
        let Some(s) = self.session.take() else { return };
        self.ended.push_back((s.id, why));
        while self.ended.len() > ENDED_MEMORY {
            self.ended.pop_front();
        }
        let budget = self.cfg.fence_timeout_ms;
        // Never later than the lease allows: a lost lease is fenced by
        // valid_until + fence_timeout, a held one within the budget from now.
        let deadline = match self.lease {
            Some((_, until)) => now.min(until).saturating_add(budget),
            None => now.saturating_add(budget),
        };
        self.fence_generation = s.generation;
        self.phase = Phase::Fencing;
        out.push(Action::Publish(Published::Fencing {
            generation: s.generation,
            cause: why,
        }));
        out.push(Action::Fence {
            deadline,
            cause: why,
        });
    }

    fn on_lease(&mut self, now: Millis, news: LeaseNews, out: &mut Vec<Action>) {
        match news {
            LeaseNews::Acquired {
                generation,
                valid_until,
            } => {
                self.lease = Some((generation, valid_until));
                self.generation = self.generation.max(generation);
                self.lost = false;
                self.elsewhere = None;
                if let Some(why) = self.refuse_next_grant.take() {
                    if self.session.is_none() && matches!(self.phase, Phase::Seeking | Phase::Idle)
                    {
                        for w in std::mem::take(&mut self.waiters) {
                            reply(
                                out,
                                w.req,
                                Answer::Refused(Refusal::Unavailable(format!(
                                    "the NVMe reservation could not be taken after winning the \
                                     lease, so no writer may start: {why}"
                                ))),
                            );
                        }
                        self.phase = Phase::Releasing;
                        out.push(Action::ReleaseLease);
                        return;
                    }
                }
                self.grant_first_waiter(now, out);
            }
            LeaseNews::Renewed { valid_until } | LeaseNews::RenewLate { valid_until } => {
                let late = matches!(news, LeaseNews::RenewLate { .. });
                if let Some((generation, until)) = &mut self.lease {
                    *until = valid_until;
                    if late {
                        out.push(Action::Publish(Published::RenewalLate {
                            generation: *generation,
                            valid_for_ms: valid_until.saturating_sub(now),
                        }));
                    }
                }
            }
            LeaseNews::Lost { generation, .. } => {
                self.lost = true;
                // The lease ran out (or was superseded); the lease's own
                // valid_until stays the fence's reference instant.
                match self.phase {
                    Phase::Serving => self.end_session(now, EndReason::LeaseLost, out),
                    Phase::Fencing => {}
                    // Held with no session (releasing, or granted to nobody):
                    // nothing on this node writes.
                    _ => {
                        self.lease = None;
                        if self.phase != Phase::FenceFailed {
                            self.phase = Phase::Idle;
                            // A release cut short by expiry: its fence was done.
                            for req in self.release_replies.drain(..) {
                                reply(out, req, Answer::Done);
                            }
                        }
                    }
                }
                self.generation = self.generation.max(generation);
            }
            LeaseNews::Released { generation } => {
                self.lease = None;
                if self.phase == Phase::Releasing {
                    self.phase = Phase::Idle;
                }
                out.push(Action::Publish(Published::Released { generation }));
                for req in self.release_replies.drain(..) {
                    reply(out, req, Answer::Done);
                }
                self.seek_if_wanted(now, out);
            }
            LeaseNews::Stopped => {
                if matches!(self.phase, Phase::Releasing | Phase::Seeking) {
                    self.phase = Phase::Idle;
                }
                self.seek_if_wanted(now, out);
            }
            LeaseNews::Waiting { holder } => self.elsewhere = holder,
            LeaseNews::Failed { error } => {
                self.lease = None;
                self.phase = Phase::Broken;
                for w in std::mem::take(&mut self.waiters) {
                    reply(
                        out,
                        w.req,
                        Answer::Refused(Refusal::Unavailable(format!(
                            "the lease cannot be used: {error}"
                        ))),
                    );
                }
                self.broken = Some(error);
            }
        }
    }

    fn grant_first_waiter(&mut self, now: Millis, out: &mut Vec<Action>) {
        let Some((generation, _)) = self.lease else {
            return;
        };
        if self.session.is_some() || !matches!(self.phase, Phase::Seeking | Phase::Idle) {
            return;
        }
        // Waiters whose deadline passed were answered in on_time.
        let Some(w) = self.waiters.pop_front() else {
            // Nobody wants it any more: give it back.
            self.phase = Phase::Releasing;
            out.push(Action::ReleaseLease);
            return;
        };
        self.session = Some(Session {
            id: w.session.clone(),
            holder: w.holder.clone(),
            generation,
            last_keepalive: now,
            stop: None,
        });
        self.phase = Phase::Serving;
        out.push(Action::Publish(Published::Granted {
            session: w.session,
            holder: w.holder,
            generation,
        }));
        let granted = self.granted(now);
        reply(out, w.req, Answer::Grant(granted));
    }

    fn on_fence_done(&mut self, now: Millis, ok: bool, out: &mut Vec<Action>) {
        if self.phase != Phase::Fencing {
            return;
        }
        if std::mem::take(&mut self.handing_over) {
            self.hold_off_until = now.saturating_add(self.cfg.handover_hold_off_ms);
        }
        out.push(Action::Publish(Published::Fenced {
            generation: self.fence_generation,
            ok,
        }));
        if !ok {
            // Keep the lease (if still held): a writer may survive, so no
            // peer may take over before the watchdog resets this node.
            self.phase = Phase::FenceFailed;
            let why = self.unavailable().unwrap_or_default();
            for w in std::mem::take(&mut self.waiters) {
                reply(
                    out,
                    w.req,
                    Answer::Refused(Refusal::Unavailable(why.clone())),
                );
            }
            for req in self.release_replies.drain(..) {
                reply(out, req, Answer::Refused(Refusal::Unavailable(why.clone())));
            }
            return;
        }
        if self.lost || self.lease.is_none() {
            self.lease = None;
            self.phase = Phase::Idle;
            for req in self.release_replies.drain(..) {
                reply(out, req, Answer::Done);
            }
            self.seek_if_wanted(now, out);
        } else {
            self.phase = Phase::Releasing;
            out.push(Action::ReleaseLease);
        }
    }

    /// A session whose lease ran out on this clock ends at once, whether or
    /// not the lease machine has said so yet: no grant outlives the lease.
    fn check_expiry(&mut self, now: Millis, out: &mut Vec<Action>) {
        if self.phase == Phase::Serving && self.lease.is_some_and(|(_, until)| now >= until) {
            self.end_session(now, EndReason::LeaseLost, out);
        }
    }

    /// Deadlines: waiters, session expiry, stop timeout, hold-off.
    fn on_time(&mut self, now: Millis, out: &mut Vec<Action>) {
        self.check_expiry(now, out);
        let holder = self.holder();
        let mut kept = VecDeque::new();
        for w in std::mem::take(&mut self.waiters) {
            if self.due(&w) <= now {
                reply(
                    out,
                    w.req,
                    Answer::Refused(Refusal::Held {
                        holder: holder.clone(),
                    }),
                );
            } else {
                kept.push_back(w);
            }
        }
        self.waiters = kept;
        if self.phase == Phase::Seeking && self.waiters.is_empty() {
            self.phase = Phase::Releasing;
            out.push(Action::ReleaseLease);
        }
        if let Some(s) = &self.session {
            if now >= s.last_keepalive.saturating_add(self.cfg.session_timeout_ms) {
                self.end_session(now, EndReason::Expired, out);
            } else if let Some((_, since)) = s.stop {
                if now >= since.saturating_add(self.cfg.stop_timeout_ms) {
                    self.end_session(now, EndReason::StopTimedOut, out);
                }
            }
        }
        self.seek_if_wanted(now, out);
    }

    /// When a waiter is refused: at its deadline while someone holds the
    /// volume, `acquire_grace` later while it may be free.
    fn due(&self, w: &Waiter) -> Millis {
        if self.holder().is_some() || self.lease.is_some() {
            w.deadline
        } else {
            w.deadline.saturating_add(self.cfg.acquire_grace_ms)
        }
    }

    fn next_wake(&self) -> Option<Millis> {
        let mut t: Option<Millis> = None;
        let mut at = |x: Millis| t = Some(t.map_or(x, |t| t.min(x)));
        for w in &self.waiters {
            at(self.due(w));
        }
        if let Some(s) = &self.session {
            at(s.last_keepalive.saturating_add(self.cfg.session_timeout_ms));
            if let Some((_, until)) = self.lease {
                at(until);
            }
            if let Some((_, since)) = s.stop {
                at(since.saturating_add(self.cfg.stop_timeout_ms));
            }
        }
        if self.phase == Phase::Idle && !self.waiters.is_empty() {
            at(self.hold_off_until);
        }
        t
    }
}

fn reply(out: &mut Vec<Action>, req: ReqId, answer: Answer) {
    out.push(Action::Reply { req, answer });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    const CFG: SessionConfig = SessionConfig {
        session_timeout_ms: 5_000,
        stop_timeout_ms: 10_000,
        keepalive_interval_ms: 1_000,
        fence_timeout_ms: 3_000,
        handover_hold_off_ms: 2_000,
        acquire_grace_ms: 3_000,
    };

    fn acquire(req: ReqId, holder: &str, deadline: Millis) -> Input {
        Input::Acquire {
            req,
            holder: holder.into(),
            session: format!("s{req}"),
            deadline,
        }
    }

    fn answer(out: &[Action], req: ReqId) -> Option<&Answer> {
        out.iter().find_map(|a| match a {
            Action::Reply { req: r, answer } if *r == req => Some(answer),
            _ => None,
        })
    }

    fn fence(out: &[Action]) -> Option<(Millis, EndReason)> {
        out.iter().find_map(|a| match a {
            Action::Fence { deadline, cause } => Some((*deadline, *cause)),
            _ => None,
        })
    }

    fn granted(m: &mut SessionMachine, now: Millis, valid_until: Millis) -> Granted {
        let out = m.step(now, acquire(1, "pg-0", now + 60_000));
        assert!(out.contains(&Action::SeekLease));
        let out = m.step(
            now,
            Input::Lease(LeaseNews::Acquired {
                generation: 7,
                valid_until,
            }),
        );
        match answer(&out, 1) {
            Some(Answer::Grant(g)) => g.clone(),
            other => panic!("no grant: {other:?} in {out:?}"),
        }
    }

    #[test]
    fn a_grant_is_valid_until_the_lease_and_keepalive_tracks_renewals() {
        let mut m = SessionMachine::new(CFG);
        let g = granted(&mut m, 100, 5_100);
        assert_eq!((g.session.as_str(), g.generation), ("s1", 7));
        assert_eq!(g.valid_for_ms, 5_000);
        assert_eq!(g.stop, None);
        m.step(
            1_100,
            Input::Lease(LeaseNews::Renewed { valid_until: 6_100 }),
        );
        let out = m.step(
            1_200,
            Input::Keepalive {
                req: 2,
                session: "s1".into(),
            },
        );
        let Some(Answer::Grant(g)) = answer(&out, 2) else {
            panic!("{out:?}")
        };
        assert_eq!(g.valid_for_ms, 4_900);
        assert_eq!(m.phase(), Phase::Serving);
        assert!(m.may_be_writing());
    }

    #[test]
    fn only_the_live_granted_session_is_live() {
        let mut m = SessionMachine::new(CFG);
        assert_eq!(m.live(0, "s1"), Err(Refusal::UnknownSession));
        granted(&mut m, 0, 5_000);
        assert_eq!(m.live(100, "s1"), Ok(()));
        assert_eq!(m.live(100, "s2"), Err(Refusal::UnknownSession));
        // Past the lease's validity (the machine not yet told): not live.
        assert!(matches!(m.live(5_000, "s1"), Err(Refusal::SessionEnded(_))));
        m.step(
            200,
            Input::Release {
                req: 2,
                session: "s1".into(),
            },
        );
        assert_eq!(
            m.live(300, "s1"),
            Err(Refusal::SessionEnded(EndReason::Released))
        );
    }

    #[test]
    fn a_second_acquire_waits_and_times_out_naming_the_holder() {
        let mut m = SessionMachine::new(CFG);
        granted(&mut m, 0, 5_000);
        let out = m.step(10, acquire(2, "pg-1", 500));
        assert!(answer(&out, 2).is_none());
        assert!(out.contains(&Action::WakeAt(500)));
        m.step(
            400,
            Input::Keepalive {
                req: 3,
                session: "s1".into(),
            },
        );
        let out = m.step(500, Input::Tick);
        assert_eq!(
            answer(&out, 2),
            Some(&Answer::Refused(Refusal::Held {
                holder: Some("pg-0".into())
            }))
        );
    }

    #[test]
    fn a_free_volume_gets_a_grace_for_its_lease_io() {
        let mut m = SessionMachine::new(CFG);
        let out = m.step(0, acquire(1, "pg-0", 0));
        assert!(answer(&out, 1).is_none(), "{out:?}");
        assert!(out.contains(&Action::SeekLease));
        let out = m.step(
            20,
            Input::Lease(LeaseNews::Acquired {
                generation: 1,
                valid_until: 5_020,
            }),
        );
        assert!(matches!(answer(&out, 1), Some(Answer::Grant(_))));
    }

    #[test]
    fn no_keepalive_fences_then_releases_then_serves_the_next_waiter() {
        let mut m = SessionMachine::new(CFG);
        granted(&mut m, 0, 5_000);
        m.step(10, acquire(2, "pg-1", 60_000));
        m.step(
            1_000,
            Input::Lease(LeaseNews::Renewed { valid_until: 6_000 }),
        );
        m.step(
            4_000,
            Input::Lease(LeaseNews::Renewed { valid_until: 9_000 }),
        );
        let out = m.step(4_999, Input::Tick);
        assert!(fence(&out).is_none());
        let out = m.step(5_000, Input::Tick);
        assert_eq!(fence(&out), Some((8_000, EndReason::Expired)));
        assert!(!out.contains(&Action::ReleaseLease), "release before fence");
        assert!(m.may_be_writing());
        // The old session learns it ended.
        let out = m.step(
            5_001,
            Input::Keepalive {
                req: 3,
                session: "s1".into(),
            },
        );
        assert_eq!(
            answer(&out, 3),
            Some(&Answer::Refused(Refusal::SessionEnded(EndReason::Expired)))
        );
        let out = m.step(5_050, Input::FenceDone { ok: true });
        assert!(out.contains(&Action::ReleaseLease));
        assert!(!m.may_be_writing());
        let out = m.step(5_060, Input::Lease(LeaseNews::Released { generation: 7 }));
        assert!(out.contains(&Action::SeekLease), "{out:?}");
        let out = m.step(
            5_600,
            Input::Lease(LeaseNews::Acquired {
                generation: 8,
                valid_until: 10_600,
            }),
        );
        let Some(Answer::Grant(g)) = answer(&out, 2) else {
            panic!("{out:?}")
        };
        assert_eq!((g.session.as_str(), g.generation), ("s2", 8));
    }

    #[test]
    fn a_lost_lease_is_fenced_by_valid_until_plus_the_fence_budget() {
        let mut m = SessionMachine::new(CFG);
        granted(&mut m, 0, 5_000);
        m.step(900, Input::Lease(LeaseNews::Renewed { valid_until: 5_900 }));
        m.step(
            1_900,
            Input::Lease(LeaseNews::RenewLate { valid_until: 5_900 }),
        );
        let out = m.step(
            5_950,
            Input::Lease(LeaseNews::Lost {
                generation: 7,
                reason: "expired".into(),
            }),
        );
        assert_eq!(fence(&out), Some((8_900, EndReason::LeaseLost)));
        let out = m.step(6_000, Input::FenceDone { ok: true });
        assert!(
            !out.contains(&Action::ReleaseLease),
            "lost: nothing to release"
        );
        assert_eq!(m.phase(), Phase::Idle);
        assert!(m.lease().is_none());
    }

    #[test]
    fn a_failed_fence_keeps_the_lease_and_refuses_new_grants() {
        let mut m = SessionMachine::new(CFG);
        granted(&mut m, 0, 5_000);
        let out = m.step(
            10,
            Input::Release {
                req: 2,
                session: "s1".into(),
            },
        );
        assert!(fence(&out).is_some());
        let out = m.step(20, Input::FenceDone { ok: false });
        assert!(!out.contains(&Action::ReleaseLease));
        assert!(matches!(
            answer(&out, 2),
            Some(Answer::Refused(Refusal::Unavailable(_)))
        ));
        assert_eq!(m.phase(), Phase::FenceFailed);
        assert!(m.may_be_writing());
        let out = m.step(30, acquire(3, "pg-1", 60_000));
        assert!(matches!(
            answer(&out, 3),
            Some(Answer::Refused(Refusal::Unavailable(_)))
        ));
    }

    #[test]
    fn handover_asks_the_holder_to_stop_and_steps_aside_after() {
        let mut m = SessionMachine::new(CFG);
        granted(&mut m, 0, 5_000);
        let out = m.step(
            100,
            Input::Handover {
                req: 2,
                to_node: "node-b".into(),
            },
        );
        assert_eq!(answer(&out, 2), Some(&Answer::Done));
        let out = m.step(
            200,
            Input::Keepalive {
                req: 3,
                session: "s1".into(),
            },
        );
        let Some(Answer::Grant(g)) = answer(&out, 3) else {
            panic!("{out:?}")
        };
        assert_eq!(g.stop, Some(StopKind::Handover));
        // A local pod restarts and asks at once: it must not win the race.
        m.step(300, acquire(4, "pg-0b", 60_000));
        m.step(
            400,
            Input::Release {
                req: 5,
                session: "s1".into(),
            },
        );
        m.step(410, Input::FenceDone { ok: true });
        let out = m.step(420, Input::Lease(LeaseNews::Released { generation: 7 }));
        assert_eq!(answer(&out, 5), Some(&Answer::Done));
        assert!(!out.contains(&Action::SeekLease), "{out:?}");
        assert!(out.contains(&Action::WakeAt(2_410)), "{out:?}");
        let out = m.step(2_410, Input::Tick);
        assert!(out.contains(&Action::SeekLease));
    }

    #[test]
    fn a_holder_that_does_not_stop_in_time_is_fenced() {
        let mut m = SessionMachine::new(CFG);
        granted(&mut m, 0, 60_000);
        m.step(0, Input::Shutdown);
        let mut now = 0;
        while now < 9_000 {
            now += 1_000;
            let out = m.step(
                now,
                Input::Keepalive {
                    req: now,
                    session: "s1".into(),
                },
            );
            let Some(Answer::Grant(g)) = answer(&out, now) else {
                panic!("{now}: {out:?}")
            };
            assert_eq!(g.stop, Some(StopKind::Shutdown));
            if let Some(f) = fence(&out) {
                panic!("fenced early at {now}: {f:?}");
            }
        }
        let out = m.step(10_000, Input::Tick);
        assert_eq!(fence(&out), Some((13_000, EndReason::StopTimedOut)));
    }

    #[test]
    fn path_loss_fences_at_once_and_refuses_until_the_path_is_back() {
        let mut m = SessionMachine::new(CFG);
        granted(&mut m, 0, 5_000);
        m.step(10, acquire(2, "pg-1", 60_000));
        let out = m.step(
            1_000,
            Input::PathLost {
                why: "last path lost".into(),
            },
        );
        // Now plus the budget, not valid_until plus the budget.
        assert_eq!(fence(&out), Some((4_000, EndReason::PathLost)));
        assert!(matches!(
            answer(&out, 2),
            Some(Answer::Refused(Refusal::Unavailable(w))) if w.contains("last path lost")
        ));
        let out = m.step(
            1_010,
            Input::Keepalive {
                req: 3,
                session: "s1".into(),
            },
        );
        assert_eq!(
            answer(&out, 3),
            Some(&Answer::Refused(Refusal::SessionEnded(EndReason::PathLost)))
        );
        let out = m.step(1_020, acquire(4, "pg-2", 60_000));
        assert!(matches!(
            answer(&out, 4),
            Some(Answer::Refused(Refusal::Unavailable(_)))
        ));
        m.step(1_100, Input::FenceDone { ok: true });
        m.step(1_200, Input::Lease(LeaseNews::Released { generation: 7 }));
        // Back: nothing is sought by itself, the next acquire is.
        let out = m.step(1_300, Input::PathBack);
        assert!(!out.contains(&Action::SeekLease), "{out:?}");
        let out = m.step(1_400, acquire(5, "pg-3", 60_000));
        assert!(out.contains(&Action::SeekLease), "{out:?}");
    }

    #[test]
    fn path_loss_after_the_lease_ran_out_keeps_the_lease_deadline() {
        let mut m = SessionMachine::new(CFG);
        granted(&mut m, 0, 5_000);
        // The lease ran out at 5_000 on this clock: the expiry check ends
        // the session first, by valid_until + budget.
        let out = m.step(6_000, Input::PathLost { why: "gone".into() });
        assert_eq!(fence(&out), Some((8_000, EndReason::LeaseLost)));
    }

    #[test]
    fn a_lost_reservation_fences_at_once() {
        let mut m = SessionMachine::new(CFG);
        granted(&mut m, 0, 5_000);
        let out = m.step(2_000, Input::ReservationLost);
        assert_eq!(fence(&out), Some((5_000, EndReason::ReservationLost)));
        // Idle: nothing to fence.
        let mut idle = SessionMachine::new(CFG);
        assert!(fence(&idle.step(0, Input::ReservationLost)).is_none());
    }

    #[test]
    fn a_reservation_refused_after_winning_the_lease_grants_nothing() {
        let mut m = SessionMachine::new(CFG);
        m.step(0, acquire(1, "pg-0", 60_000));
        m.step(
            10,
            Input::ReservationRefused {
                why: "conflict".into(),
            },
        );
        let out = m.step(
            10,
            Input::Lease(LeaseNews::Acquired {
                generation: 3,
                valid_until: 5_010,
            }),
        );
        assert!(matches!(
            answer(&out, 1),
            Some(Answer::Refused(Refusal::Unavailable(w))) if w.contains("conflict")
        ));
        assert!(out.contains(&Action::ReleaseLease), "{out:?}");
        assert!(!m.may_be_writing());
        m.step(20, Input::Lease(LeaseNews::Released { generation: 3 }));
        // Only that one lease: the next acquire is granted.
        let g = granted(&mut m, 30, 5_030);
        assert_eq!(g.generation, 7);
    }

    /// A stand-in lease: grants after a delay, releases, expires.
    #[derive(Debug, Default)]
    struct FakeLease {
        seeking_since: Option<Millis>,
        held: Option<(u64, Millis)>,
        releasing: bool,
        generation: u64,
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Random requests, lease behaviour and fence results: every request
        /// is answered exactly once; a grant never outlives the lease; the
        /// lease is released only after a successful fence of every session
        /// it served; at most one session at a time.
        #[test]
        fn invariants_hold_under_random_schedules(
            ops in proptest::collection::vec((0u8..13, 0u64..3_000, any::<bool>()), 1..120)
        ) {
            let mut m = SessionMachine::new(CFG);
            let mut lease = FakeLease::default();
            let mut now: Millis = 0;
            let mut next_req: ReqId = 0;
            let mut open: HashSet<ReqId> = HashSet::new();
            let mut sessions: HashMap<String, ()> = HashMap::new();
            let mut live: Option<String> = None;
            // A session served under the lease whose fence has not ended ok.
            let mut unfenced = false;
            let mut fencing = false;
            let mut failed = false;
            for (op, dt, flag) in ops {
                now += dt % 700;
                let input = match op {
                    0 | 1 => {
                        next_req += 1;
                        open.insert(next_req);
                        acquire(next_req, "h", now + if flag { 0 } else { dt * 3 })
                    }
                    2 | 3 => {
                        next_req += 1;
                        open.insert(next_req);
                        let s = live.clone().unwrap_or_else(|| "s0".into());
                        Input::Keepalive { req: next_req, session: s }
                    }
                    4 => {
                        next_req += 1;
                        open.insert(next_req);
                        let s = live.clone().unwrap_or_else(|| "nope".into());
                        Input::Release { req: next_req, session: s }
                    }
                    5 => {
                        next_req += 1;
                        open.insert(next_req);
                        Input::Handover { req: next_req, to_node: "b".into() }
                    }
                    10 if flag => Input::PathLost { why: "lost".into() },
                    10 => Input::PathBack,
                    11 => Input::ReservationLost,
                    12 => Input::ReservationRefused { why: "x".into() },
                    6 if fencing => {
                        fencing = false;
                        Input::FenceDone { ok: flag || dt % 5 != 0 }
                    }
                    7 => match lease.held {
                        Some((_, until)) if flag && now < until => {
                            Input::Lease(LeaseNews::Renewed { valid_until: now + 5_000 })
                        }
                        Some((g, until)) if now >= until => {
                            lease.held = None;
                            lease.releasing = false;
                            Input::Lease(LeaseNews::Lost { generation: g, reason: "expired".into() })
                        }
                        _ => Input::Tick,
                    },
                    8 if lease.releasing => {
                        lease.releasing = false;
                        let g = lease.held.take().map_or(lease.generation, |(g, _)| g);
                        Input::Lease(LeaseNews::Released { generation: g })
                    }
                    _ => match lease.seeking_since {
                        Some(t) if now >= t + 50 => {
                            lease.seeking_since = None;
                            lease.generation += 1;
                            lease.held = Some((lease.generation, now + 5_000));
                            Input::Lease(LeaseNews::Acquired {
                                generation: lease.generation,
                                valid_until: now + 5_000,
                            })
                        }
                        _ => Input::Tick,
                    },
                };
                if let Input::Lease(LeaseNews::Renewed { valid_until }) = &input {
                    if let Some((g, _)) = lease.held { lease.held = Some((g, *valid_until)); }
                }
                let out = m.step(now, input);
                for a in &out {
                    match a {
                        Action::Reply { req, answer } => {
                            prop_assert!(open.remove(req), "answered twice or never asked: {req}");
                            if let Answer::Grant(g) = answer {
                                let (_, until) = lease.held.expect("grant without lease");
                                prop_assert!(now + g.valid_for_ms <= until);
                                if !sessions.contains_key(&g.session) {
                                    prop_assert!(live.is_none(), "two sessions");
                                    sessions.insert(g.session.clone(), ());
                                    live = Some(g.session.clone());
                                    unfenced = true;
                                }
                            }
                        }
                        Action::SeekLease if lease.held.is_none() => {
                            lease.seeking_since = Some(now);
                        }
                        Action::ReleaseLease => {
                            prop_assert!(!unfenced, "released before the fence ended");
                            prop_assert!(!failed, "released after a failed fence");
                            if lease.held.is_some() { lease.releasing = true; }
                            lease.seeking_since = None;
                        }
                        Action::Fence { .. } => {
                            prop_assert!(!fencing, "two fences at once");
                            fencing = true;
                            live = None;
                        }
                        Action::Publish(Published::Fenced { ok, .. }) => {
                            if *ok { unfenced = false; } else { failed = true; }
                        }
                        Action::WakeAt(t) => prop_assert!(*t >= now),
                        _ => {}
                    }
                }
            }
        }
    }
}
