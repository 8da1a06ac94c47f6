//! The NVMe reservation takeover as a pure state machine.
//!
//! The disk lease decides *who* may write; an NVMe reservation (type Write
//! Exclusive) makes the storage itself refuse writes from anyone else. It closes
//! two faults the disk lease alone cannot: a partitioned holder whose queued
//! writes are replayed when its path heals after a peer took over, and a paused
//! holder (VM, SIGSTOP) that resumes and writes before it notices that its lease
//! expired. See docs/DEVICES.md, "Reservations".
//!
//! Protocol, per namespace, with one key per node ([`crate::nvme::reservation::key_for_node`]):
//! - every node registers its key (Register, action Replace with IEKEY, so it is
//!   idempotent);
//! - the node that wins the disk lease reads the reservation (Report): if nobody
//!   holds it, it acquires Write Exclusive; if another key holds it (a silent old
//!   holder), it preempts-and-aborts that key, which unregisters it and aborts
//!   its queued commands; then it reads the reservation again to confirm;
//! - the holder checks with a Report when the daemon asks ([`Input::Check`]);
//!   finding that it no longer holds the reservation or that its key is gone, or
//!   any Reservation Conflict status on a command or a data write, is
//!   [`Event::ReservationLost`]: the daemon fences at once;
//! - on a normal step-down the holder releases the reservation;
//! - a namespace without reservation support gives [`Event::Unsupported`] once
//!   and the machine does nothing more: the disk lease alone protects it.
//!
//! Invariants: the machine never asks to acquire or preempt unless the daemon
//! said the disk lease is ours ([`Input::BecomeHolder`]); once it has reported
//! `ReservationLost` it sends no more commands until [`Input::Rejoin`] (after the
//! fence). It must not do I/O or read clocks: reservations are not timed, the
//! daemon sends [`Input::Check`] on its own timer.

use serde::Serialize;

/// A reservation key (64 bits, never 0).
pub type Key = u64;

/// Reservation types (NVMe Base Specification, "Reservation Type Encoding").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResvType {
    WriteExclusive = 1,
    ExclusiveAccess = 2,
    WriteExclusiveRegistrantsOnly = 3,
    ExclusiveAccessRegistrantsOnly = 4,
    WriteExclusiveAllRegistrants = 5,
    ExclusiveAccessAllRegistrants = 6,
}

impl ResvType {
    /// The type from its encoding; `None` for 0 (no reservation) or reserved values.
    pub fn from_code(code: u8) -> Option<ResvType> {
        Some(match code {
            1 => ResvType::WriteExclusive,
            2 => ResvType::ExclusiveAccess,
            3 => ResvType::WriteExclusiveRegistrantsOnly,
            4 => ResvType::ExclusiveAccessRegistrantsOnly,
            5 => ResvType::WriteExclusiveAllRegistrants,
            6 => ResvType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    /// The encoding (RTYPE).
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// One registered controller from a Reservation Report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Registrant {
    /// Controller ID.
    pub cntlid: u16,
    /// RCSTS bit 0: this controller's host holds the reservation.
    pub holds: bool,
    /// The host's reservation key.
    pub key: Key,
    /// The 128-bit host identifier (extended data structure).
    pub host_id: [u8; 16],
}

/// The decoded Reservation Report (status) of a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResvStatus {
    /// GEN: incremented by every Register that changes keys, and by preempts.
    pub generation: u32,
    /// RTYPE: the reservation type, `None` when nothing is held.
    pub rtype: Option<ResvType>,
    /// PTPLS: the reservation persists through power loss.
    pub ptpl: bool,
    /// One entry per registered controller.
    pub registrants: Vec<Registrant>,
}

impl ResvStatus {
    /// The key of the holder, if a reservation is held.
    pub fn holder_key(&self) -> Option<Key> {
        self.rtype?;
        self.registrants.iter().find(|r| r.holds).map(|r| r.key)
    }

    /// True if `key` is registered (by any controller).
    pub fn is_registered(&self, key: Key) -> bool {
        self.registrants.iter().any(|r| r.key == key)
    }
}

/// A reservation command the shell must send (on this node's namespace fd).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// Register `key` for this host (Replace with IEKEY: idempotent).
    Register { key: Key },
    /// Acquire a free reservation of type `rtype` with `key`.
    Acquire { key: Key, rtype: ResvType },
    /// Preempt-and-abort: remove `victim`'s registration (and abort its
    /// commands) and take the reservation with `key`.
    PreemptAbort {
        key: Key,
        victim: Key,
        rtype: ResvType,
    },
    /// Release the reservation held with `key`.
    Release { key: Key, rtype: ResvType },
    /// Read the reservation status (extended data structure).
    Report,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", content = "detail", rename_all = "snake_case")]
pub enum Outcome {
    /// Success; for Report, the decoded status.
    Ok(Option<ResvStatus>),
    /// NVMe status Reservation Conflict (0x83).
    Conflict,
    /// Any other failure (device error, other NVMe status), with its text.
    Failed(String),
}

/// What the daemon tells the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The result of the capability probe (Identify Controller ONCS bit 5 and
    /// Identify Namespace RESCAP bit for Write Exclusive).
    Probed { supported: bool, reason: String },
    /// A command ended.
    Done { command: Command, outcome: Outcome },
    /// The disk lease is ours: take the reservation.
    BecomeHolder,
    /// The lease was released normally: release the reservation.
    StepDown,
    /// A data write failed with Reservation Conflict.
    WriteConflict,
    /// Timer: verify the reservation (holder) or the registration (standby).
    Check,
    /// The fence after a loss completed: register again as a standby.
    Rejoin,
}

/// Why the reservation was lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LostReason {
    /// A Report shows our key unregistered (preempted by a peer).
    KeyGone,
    /// A Report shows another key holding the reservation.
    OtherHolder { holder: Option<Key> },
    /// A command or data write failed with Reservation Conflict.
    Conflict,
}

/// What the machine tells the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// No reservation support: the disk lease alone protects this volume.
    Unsupported { reason: String },
    /// Our key is registered.
    Registered,
    /// We hold the reservation; `preempted` is the old holder's key if we took it over.
    Acquired { preempted: Option<Key> },
    /// We released the reservation.
    Released,
    /// We lost the reservation: fence now.
    ReservationLost { reason: LostReason },
    /// We could not take the reservation although the disk lease is ours: the
    /// daemon must not start writers (policy decides).
    AcquireFailed { detail: String },
    /// A command failed in a way that needs no fence (e.g. registering as standby).
    CommandFailed { command: Command, detail: String },
}

/// An action for the shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Probe support (Identify) and answer with [`Input::Probed`].
    Probe,
    /// Send a command and answer with [`Input::Done`].
    Send(Command),
    /// Tell the daemon (and log).
    Emit(Event),
}

/// Where the machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Probing,
    Unsupported,
    Unregistered,
    Registering,
    Registered,
    Acquiring,
    Holding,
    Releasing,
    Lost,
}

/// How many times a contender re-reads and retries after a conflict while it
/// takes the reservation before it gives up with [`Event::AcquireFailed`].
pub const MAX_ACQUIRE_ATTEMPTS: u32 = 3;

/// The reservation machine of one node for one namespace.
#[derive(Debug, Clone)]
pub struct Reservation {
    key: Key,
    rtype: ResvType,
    phase: Phase,
    /// The disk lease is ours (BecomeHolder seen, no StepDown since).
    want_hold: bool,
    attempts: u32,
    preempted: Option<Key>,
}

impl Reservation {
    /// A machine for this node's `key` (non-zero), type Write Exclusive.
    pub fn new(key: Key) -> Reservation {
        debug_assert_ne!(key, 0, "0 is not a valid reservation key");
        Reservation {
            key,
            rtype: ResvType::WriteExclusive,
            phase: Phase::Probing,
            want_hold: false,
            attempts: 0,
            preempted: None,
        }
    }

    /// The first actions: probe support.
    pub fn start(&self) -> Vec<Action> {
        vec![Action::Probe]
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn key(&self) -> Key {
        self.key
    }

    /// Feeds one input; returns the actions to perform in order.
    pub fn step(&mut self, input: Input) -> Vec<Action> {
        use Phase::*;
        if self.phase == Unsupported {
            return Vec::new();
        }
        match input {
            Input::Probed { supported, reason } => {
                if self.phase != Probing {
                    return Vec::new();
                }
                if supported {
                    self.register()
                } else {
                    self.phase = Unsupported;
                    vec![Action::Emit(Event::Unsupported { reason })]
                }
            }
            Input::BecomeHolder => {
                self.want_hold = true;
                match self.phase {
                    Registered => self.begin_acquire(),
                    _ => Vec::new(),
                }
            }
            Input::StepDown => {
                self.want_hold = false;
                match self.phase {
                    Holding | Acquiring => {
                        self.phase = Releasing;
                        vec![Action::Send(Command::Release {
                            key: self.key,
                            rtype: self.rtype,
                        })]
                    }
                    _ => Vec::new(),
                }
            }
            Input::WriteConflict => match self.phase {
                Holding | Acquiring | Releasing => self.lost(LostReason::Conflict),
                _ => Vec::new(),
            },
            Input::Check => match self.phase {
                Unregistered => self.register(),
                Registered | Holding => vec![Action::Send(Command::Report)],
                _ => Vec::new(),
            },
            Input::Rejoin => match self.phase {
                Lost => {
                    self.want_hold = false;
                    self.register()
                }
                _ => Vec::new(),
            },
            Input::Done { command, outcome } => self.done(command, outcome),
        }
    }

    fn register(&mut self) -> Vec<Action> {
        self.phase = Phase::Registering;
        vec![Action::Send(Command::Register { key: self.key })]
    }

    fn begin_acquire(&mut self) -> Vec<Action> {
        self.phase = Phase::Acquiring;
        self.attempts = 0;
        self.preempted = None;
        vec![Action::Send(Command::Report)]
    }

    fn lost(&mut self, reason: LostReason) -> Vec<Action> {
        self.phase = Phase::Lost;
        vec![Action::Emit(Event::ReservationLost { reason })]
    }

    fn done(&mut self, command: Command, outcome: Outcome) -> Vec<Action> {
        use Phase::*;
        match (self.phase, command) {
            (Registering, Command::Register { .. }) => match outcome {
                Outcome::Ok(_) => {
                    self.phase = Registered;
                    let mut out = vec![Action::Emit(Event::Registered)];
                    if self.want_hold {
                        out.extend(self.begin_acquire());
                    }
                    out
                }
                Outcome::Conflict | Outcome::Failed(_) => {
                    self.phase = Unregistered;
                    let detail = describe(&outcome);
                    if self.want_hold {
                        vec![Action::Emit(Event::AcquireFailed { detail })]
                    } else {
                        vec![Action::Emit(Event::CommandFailed { command, detail })]
                    }
                }
            },
            (Acquiring, Command::Report) => match outcome {
                Outcome::Ok(Some(status)) => self.acquiring_report(&status),
                Outcome::Conflict => self.lost(LostReason::Conflict),
                other => self.acquire_failed(describe(&other)),
            },
            (Acquiring, Command::Acquire { .. } | Command::PreemptAbort { .. }) => match outcome {
                // Confirm with a Report: success of the command alone is not
                // proof (a peer may have preempted us in between).
                Outcome::Ok(_) => vec![Action::Send(Command::Report)],
                Outcome::Conflict => {
                    self.attempts += 1;
                    if self.attempts >= MAX_ACQUIRE_ATTEMPTS {
                        self.acquire_failed("reservation conflict on every attempt".into())
                    } else {
                        vec![Action::Send(Command::Report)]
                    }
                }
                other => self.acquire_failed(describe(&other)),
            },
            (Holding, Command::Report) => match outcome {
                Outcome::Ok(Some(status)) => {
                    if !status.is_registered(self.key) {
                        self.lost(LostReason::KeyGone)
                    } else if status.holder_key() != Some(self.key) {
                        self.lost(LostReason::OtherHolder {
                            holder: status.holder_key(),
                        })
                    } else {
                        Vec::new()
                    }
                }
                Outcome::Conflict => self.lost(LostReason::Conflict),
                // A failed Report proves nothing either way: the disk lease
                // still protects; the next Check retries.
                other => vec![Action::Emit(Event::CommandFailed {
                    command,
                    detail: describe(&other),
                })],
            },
            (Registered, Command::Report) => match outcome {
                Outcome::Ok(Some(status)) if !status.is_registered(self.key) => self.register(),
                Outcome::Ok(_) => Vec::new(),
                other => vec![Action::Emit(Event::CommandFailed {
                    command,
                    detail: describe(&other),
                })],
            },
            (Releasing, Command::Release { .. }) => {
                self.phase = Registered;
                match outcome {
                    Outcome::Ok(_) => vec![Action::Emit(Event::Released)],
                    other => vec![Action::Emit(Event::CommandFailed {
                        command,
                        detail: describe(&other),
                    })],
                }
            }
            // A late answer to a command of an earlier phase.
            _ => Vec::new(),
        }
    }

    fn acquiring_report(&mut self, status: &ResvStatus) -> Vec<Action> {
        if !status.is_registered(self.key) {
            // We registered, and now our key is gone: someone preempted us
            // while we believe the disk lease is ours. Never write.
            return self.lost(LostReason::KeyGone);
        }
        match status.holder_key() {
            Some(k) if k == self.key => {
                self.phase = Phase::Holding;
                vec![Action::Emit(Event::Acquired {
                    preempted: self.preempted,
                })]
            }
            None => vec![Action::Send(Command::Acquire {
                key: self.key,
                rtype: self.rtype,
            })],
            Some(victim) => {
                self.preempted = Some(victim);
                vec![Action::Send(Command::PreemptAbort {
                    key: self.key,
                    victim,
                    rtype: self.rtype,
                })]
            }
        }
    }

    fn acquire_failed(&mut self, detail: String) -> Vec<Action> {
        self.phase = Phase::Registered;
        vec![Action::Emit(Event::AcquireFailed { detail })]
    }
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Ok(_) => "ok".into(),
        Outcome::Conflict => "reservation conflict".into(),
        Outcome::Failed(s) => s.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Key = 0x1111;
    const OLD: Key = 0x2222;

    fn status(holder: Option<Key>, keys: &[Key]) -> ResvStatus {
        ResvStatus {
            generation: 1,
            rtype: holder.map(|_| ResvType::WriteExclusive),
            ptpl: false,
            registrants: keys
                .iter()
                .enumerate()
                .map(|(i, &k)| Registrant {
                    cntlid: i as u16,
                    holds: Some(k) == holder,
                    key: k,
                    host_id: [0; 16],
                })
                .collect(),
        }
    }

    fn done(command: Command, outcome: Outcome) -> Input {
        Input::Done { command, outcome }
    }

    fn registered() -> Reservation {
        let mut m = Reservation::new(ME);
        assert_eq!(m.start(), vec![Action::Probe]);
        let a = m.step(Input::Probed {
            supported: true,
            reason: String::new(),
        });
        assert_eq!(a, vec![Action::Send(Command::Register { key: ME })]);
        let a = m.step(done(Command::Register { key: ME }, Outcome::Ok(None)));
        assert_eq!(a, vec![Action::Emit(Event::Registered)]);
        m
    }

    #[test]
    fn free_reservation_is_acquired_and_confirmed() {
        let mut m = registered();
        assert_eq!(
            m.step(Input::BecomeHolder),
            vec![Action::Send(Command::Report)]
        );
        let acquire = Command::Acquire {
            key: ME,
            rtype: ResvType::WriteExclusive,
        };
        let a = m.step(done(
            Command::Report,
            Outcome::Ok(Some(status(None, &[ME, OLD]))),
        ));
        assert_eq!(a, vec![Action::Send(acquire)]);
        assert_eq!(
            m.step(done(acquire, Outcome::Ok(None))),
            vec![Action::Send(Command::Report)]
        );
        let a = m.step(done(
            Command::Report,
            Outcome::Ok(Some(status(Some(ME), &[ME, OLD]))),
        ));
        assert_eq!(a, vec![Action::Emit(Event::Acquired { preempted: None })]);
        assert_eq!(m.phase(), Phase::Holding);
    }

    #[test]
    fn silent_holder_is_preempted_and_aborted() {
        let mut m = registered();
        m.step(Input::BecomeHolder);
        let a = m.step(done(
            Command::Report,
            Outcome::Ok(Some(status(Some(OLD), &[ME, OLD]))),
        ));
        let pa = Command::PreemptAbort {
            key: ME,
            victim: OLD,
            rtype: ResvType::WriteExclusive,
        };
        assert_eq!(a, vec![Action::Send(pa)]);
        m.step(done(pa, Outcome::Ok(None)));
        let a = m.step(done(
            Command::Report,
            Outcome::Ok(Some(status(Some(ME), &[ME]))),
        ));
        assert_eq!(
            a,
            vec![Action::Emit(Event::Acquired {
                preempted: Some(OLD)
            })]
        );
    }

    #[test]
    fn holder_that_finds_its_key_gone_or_a_conflict_is_lost() {
        for (outcome, reason) in [
            (
                Outcome::Ok(Some(status(Some(OLD), &[OLD]))),
                LostReason::KeyGone,
            ),
            (
                Outcome::Ok(Some(status(Some(OLD), &[ME, OLD]))),
                LostReason::OtherHolder { holder: Some(OLD) },
            ),
            (Outcome::Conflict, LostReason::Conflict),
        ] {
            let mut m = holding();
            assert_eq!(m.step(Input::Check), vec![Action::Send(Command::Report)]);
            let a = m.step(done(Command::Report, outcome));
            assert_eq!(a, vec![Action::Emit(Event::ReservationLost { reason })]);
            assert_eq!(m.phase(), Phase::Lost);
            // Nothing more until the fence is done.
            assert!(m.step(Input::Check).is_empty());
            assert!(m.step(Input::BecomeHolder).is_empty());
            assert_eq!(
                m.step(Input::Rejoin),
                vec![Action::Send(Command::Register { key: ME })]
            );
        }
        let mut m = holding();
        assert_eq!(
            m.step(Input::WriteConflict),
            vec![Action::Emit(Event::ReservationLost {
                reason: LostReason::Conflict
            })]
        );
    }

    fn holding() -> Reservation {
        let mut m = registered();
        m.step(Input::BecomeHolder);
        let acquire = Command::Acquire {
            key: ME,
            rtype: ResvType::WriteExclusive,
        };
        m.step(done(
            Command::Report,
            Outcome::Ok(Some(status(None, &[ME]))),
        ));
        m.step(done(acquire, Outcome::Ok(None)));
        m.step(done(
            Command::Report,
            Outcome::Ok(Some(status(Some(ME), &[ME]))),
        ));
        assert_eq!(m.phase(), Phase::Holding);
        m
    }

    #[test]
    fn unsupported_namespace_falls_back_once_and_stays_silent() {
        let mut m = Reservation::new(ME);
        let a = m.step(Input::Probed {
            supported: false,
            reason: "ONCS bit 5 clear".into(),
        });
        assert_eq!(
            a,
            vec![Action::Emit(Event::Unsupported {
                reason: "ONCS bit 5 clear".into()
            })]
        );
        for i in [
            Input::BecomeHolder,
            Input::Check,
            Input::WriteConflict,
            Input::StepDown,
        ] {
            assert!(m.step(i).is_empty());
        }
    }

    #[test]
    fn step_down_releases() {
        let mut m = holding();
        let rel = Command::Release {
            key: ME,
            rtype: ResvType::WriteExclusive,
        };
        assert_eq!(m.step(Input::StepDown), vec![Action::Send(rel)]);
        assert_eq!(
            m.step(done(rel, Outcome::Ok(None))),
            vec![Action::Emit(Event::Released)]
        );
        assert_eq!(m.phase(), Phase::Registered);
    }

    #[test]
    fn repeated_conflicts_while_acquiring_give_up_without_holding() {
        let mut m = registered();
        m.step(Input::BecomeHolder);
        let acquire = Command::Acquire {
            key: ME,
            rtype: ResvType::WriteExclusive,
        };
        let mut last = Vec::new();
        for _ in 0..MAX_ACQUIRE_ATTEMPTS {
            m.step(done(
                Command::Report,
                Outcome::Ok(Some(status(None, &[ME]))),
            ));
            last = m.step(done(acquire, Outcome::Conflict));
        }
        assert!(matches!(
            last.as_slice(),
            [Action::Emit(Event::AcquireFailed { .. })]
        ));
        assert_ne!(m.phase(), Phase::Holding);
    }

    #[test]
    fn become_holder_while_registering_acquires_after_registration() {
        let mut m = Reservation::new(ME);
        m.step(Input::Probed {
            supported: true,
            reason: String::new(),
        });
        assert!(m.step(Input::BecomeHolder).is_empty());
        let a = m.step(done(Command::Register { key: ME }, Outcome::Ok(None)));
        assert_eq!(
            a,
            vec![
                Action::Emit(Event::Registered),
                Action::Send(Command::Report)
            ]
        );
    }

    #[test]
    fn standby_whose_key_vanished_registers_again() {
        let mut m = registered();
        m.step(Input::Check);
        let a = m.step(done(
            Command::Report,
            Outcome::Ok(Some(status(Some(OLD), &[OLD]))),
        ));
        assert_eq!(a, vec![Action::Send(Command::Register { key: ME })]);
    }
}
