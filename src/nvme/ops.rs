//! Typed reservation commands over any [`Passthru`], and the driver that runs
//! the pure machine [`crate::core::reservation::Reservation`] against them.
//!
//! The driver performs exactly the commands the machine asks for, in order,
//! feeding each result back, and returns the machine's events to the daemon.
//! It blocks on the device: the daemon calls it from a blocking thread.

use super::passthru::{status_meaning, Passthru, PassthruCmd};
use super::reservation::{
    self, AcquireAction, Cptpl, Encoded, RegisterAction, ReleaseAction, Support, CNS_CONTROLLER,
    CNS_NAMESPACE, REPORT_LEN,
};
use super::NvmeError;
use crate::core::reservation::{
    Action, Command, Event, Input, Key, Outcome, Reservation, ResvStatus, ResvType,
};

/// The reservation commands, typed (what the driver and `doctor` use).
pub trait ReservationOps {
    /// Identify Controller (ONCS) and Identify Namespace (RESCAP).
    fn support(&mut self) -> Result<Support, NvmeError>;
    fn register(
        &mut self,
        action: RegisterAction,
        iekey: bool,
        crkey: Key,
        nrkey: Key,
    ) -> Result<(), NvmeError>;
    fn acquire(
        &mut self,
        action: AcquireAction,
        rtype: ResvType,
        crkey: Key,
        prkey: Key,
    ) -> Result<(), NvmeError>;
    fn release(
        &mut self,
        action: ReleaseAction,
        rtype: ResvType,
        crkey: Key,
    ) -> Result<(), NvmeError>;
    fn report(&mut self) -> Result<ResvStatus, NvmeError>;
}

/// [`ReservationOps`] by passthrough commands on one namespace.
#[derive(Debug)]
pub struct Reservations<D: Passthru> {
    dev: D,
}

impl<D: Passthru> Reservations<D> {
    pub fn new(dev: D) -> Self {
        Reservations { dev }
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    fn submit(&mut self, mut e: Encoded, admin: bool) -> Result<Vec<u8>, NvmeError> {
        let mut cmd: PassthruCmd = e.cmd;
        let r = if admin {
            self.dev.admin(&mut cmd, &mut e.data)
        } else {
            self.dev.io(&mut cmd, &mut e.data)
        };
        match r {
            Ok(0) => Ok(e.data),
            Ok(status) => Err(NvmeError::Status {
                path: self.dev.path().to_owned(),
                command: e.name,
                status,
                meaning: status_meaning(status),
            }),
            Err(source) => Err(NvmeError::Ioctl {
                path: self.dev.path().to_owned(),
                command: e.name,
                source,
            }),
        }
    }
}

impl<D: Passthru> ReservationOps for Reservations<D> {
    fn support(&mut self) -> Result<Support, NvmeError> {
        let nsid = self.dev.nsid();
        let ctrl = self.submit(reservation::identify(0, CNS_CONTROLLER), true)?;
        let ns = self.submit(reservation::identify(nsid, CNS_NAMESPACE), true)?;
        Ok(Support::decode(&ctrl, &ns))
    }

    fn register(
        &mut self,
        action: RegisterAction,
        iekey: bool,
        crkey: Key,
        nrkey: Key,
    ) -> Result<(), NvmeError> {
        let e = reservation::register(
            self.dev.nsid(),
            action,
            iekey,
            Cptpl::NoChange,
            crkey,
            nrkey,
        );
        self.submit(e, false).map(drop)
    }

    fn acquire(
        &mut self,
        action: AcquireAction,
        rtype: ResvType,
        crkey: Key,
        prkey: Key,
    ) -> Result<(), NvmeError> {
        let e = reservation::acquire(self.dev.nsid(), action, rtype, crkey, prkey);
        self.submit(e, false).map(drop)
    }

    fn release(
        &mut self,
        action: ReleaseAction,
        rtype: ResvType,
        crkey: Key,
    ) -> Result<(), NvmeError> {
        let e = reservation::release(self.dev.nsid(), action, rtype, crkey);
        self.submit(e, false).map(drop)
    }

    fn report(&mut self) -> Result<ResvStatus, NvmeError> {
        let data = self.submit(reservation::report(self.dev.nsid(), REPORT_LEN), false)?;
        reservation::decode_report(&data)
    }
}

fn outcome<T>(r: Result<T, NvmeError>, f: impl FnOnce(T) -> Option<ResvStatus>) -> Outcome {
    match r {
        Ok(v) => Outcome::Ok(f(v)),
        Err(e) if e.is_reservation_conflict() => Outcome::Conflict,
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// Performs one command of the machine.
pub fn perform(ops: &mut dyn ReservationOps, command: Command) -> Outcome {
    match command {
        // Replace with IEKEY: registers whatever key this host had (or none).
        Command::Register { key } => {
            outcome(ops.register(RegisterAction::Replace, true, 0, key), |_| {
                None
            })
        }
        Command::Acquire { key, rtype } => {
            outcome(ops.acquire(AcquireAction::Acquire, rtype, key, 0), |_| None)
        }
        Command::PreemptAbort { key, victim, rtype } => outcome(
            ops.acquire(AcquireAction::PreemptAndAbort, rtype, key, victim),
            |_| None,
        ),
        Command::Release { key, rtype } => {
            outcome(ops.release(ReleaseAction::Release, rtype, key), |_| None)
        }
        Command::Report => outcome(ops.report(), Some),
    }
}

/// Runs the machine against `ops` until it has nothing more to send; returns
/// the events in order (each also logged).
pub fn drive(machine: &mut Reservation, ops: &mut dyn ReservationOps, input: Input) -> Vec<Event> {
    let mut events = Vec::new();
    let mut pending: std::collections::VecDeque<Action> = machine.step(input).into();
    while let Some(action) = pending.pop_front() {
        match action {
            Action::Probe => {
                let input = probe(ops);
                pending.extend(machine.step(input));
            }
            Action::Send(command) => {
                let outcome = perform(ops, command);
                tracing::debug!(?command, ?outcome, "reservation command");
                pending.extend(machine.step(Input::Done { command, outcome }));
            }
            Action::Emit(event) => {
                match &event {
                    Event::ReservationLost { reason } => {
                        tracing::error!(
                            ?reason,
                            key = machine.key(),
                            "NVMe reservation lost: fence now"
                        )
                    }
                    Event::Unsupported { reason } => tracing::warn!(
                        %reason,
                        "NVMe reservations unsupported: the disk lease alone protects this volume"
                    ),
                    other => tracing::info!(event = ?other, "reservation"),
                }
                events.push(event);
            }
        }
    }
    events
}

/// Starts the machine (probe, register) and drives it.
pub fn start(machine: &mut Reservation, ops: &mut dyn ReservationOps) -> Vec<Event> {
    // `start` only ever asks to probe; feed the probe through `drive`.
    debug_assert_eq!(machine.start(), vec![Action::Probe]);
    let input = probe(ops);
    drive(machine, ops, input)
}

/// Identifies the namespace: whether it supports Write Exclusive reservations.
fn probe(ops: &mut dyn ReservationOps) -> Input {
    match ops.support() {
        Ok(s) => Input::Probed {
            supported: s.write_exclusive(),
            reason: s.reason().unwrap_or_default(),
        },
        Err(e) => Input::Probed {
            supported: false,
            reason: format!("cannot identify the namespace: {e}"),
        },
    }
}

/// Support of a namespace device, for `doctor`: opens it and sends Identify.
pub fn probe_device(path: &std::path::Path) -> Result<Support, NvmeError> {
    let dev = super::passthru::NamespaceDevice::open(path)?;
    Reservations::new(dev).support()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::reservation::{LostReason, Phase};
    use crate::nvme::fake::FakeNamespace;
    use crate::nvme::reservation::key_for_node;

    struct Node {
        machine: Reservation,
        ops: Reservations<crate::nvme::fake::FakeHost>,
        host: u8,
    }

    fn node(ns: &FakeNamespace, host: u8, name: &str) -> (Node, Vec<Event>) {
        let mut n = Node {
            machine: Reservation::new(key_for_node(name)),
            ops: Reservations::new(ns.host(host)),
            host,
        };
        let ev = start(&mut n.machine, &mut n.ops);
        (n, ev)
    }

    #[test]
    fn takeover_from_a_silent_holder_fences_its_writes_and_it_learns_it_lost() {
        let ns = FakeNamespace::new(true);
        let (mut a, ev) = node(&ns, 1, "node-a");
        assert_eq!(ev, vec![Event::Registered]);
        let (mut b, ev) = node(&ns, 2, "node-b");
        assert_eq!(ev, vec![Event::Registered]);

        // A wins the disk lease and takes the reservation.
        let ev = drive(&mut a.machine, &mut a.ops, Input::BecomeHolder);
        assert_eq!(ev, vec![Event::Acquired { preempted: None }]);
        assert_eq!(ns.status().holder_key(), Some(key_for_node("node-a")));
        assert!(ns.write(a.host).is_ok());
        // Write Exclusive: the registered standby cannot write.
        assert!(ns.write(b.host).is_err());

        // A falls silent (paused, partitioned); B wins the disk lease later
        // and preempts-and-aborts A's key.
        let ev = drive(&mut b.machine, &mut b.ops, Input::BecomeHolder);
        assert_eq!(
            ev,
            vec![Event::Acquired {
                preempted: Some(key_for_node("node-a"))
            }]
        );
        assert_eq!(ns.aborted(a.host), 1);
        assert!(ns.write(b.host).is_ok());
        // A's replayed or resumed writes are refused by the storage.
        assert_eq!(
            ns.write(a.host).map_err(crate::nvme::passthru::status_code),
            Err(crate::nvme::passthru::SC_RESERVATION_CONFLICT)
        );

        // A resumes: its check finds its key gone => fence at once.
        let ev = drive(&mut a.machine, &mut a.ops, Input::Check);
        assert_eq!(
            ev,
            vec![Event::ReservationLost {
                reason: LostReason::KeyGone
            }]
        );
        assert_eq!(a.machine.phase(), Phase::Lost);
        // After its fence it registers again as a standby and cannot write.
        let ev = drive(&mut a.machine, &mut a.ops, Input::Rejoin);
        assert_eq!(ev, vec![Event::Registered]);
        assert!(ns.write(a.host).is_err());
        // B still holds.
        assert!(drive(&mut b.machine, &mut b.ops, Input::Check).is_empty());
    }

    #[test]
    fn a_write_conflict_seen_by_the_holder_is_a_loss() {
        let ns = FakeNamespace::new(true);
        let (mut a, _) = node(&ns, 1, "node-a");
        drive(&mut a.machine, &mut a.ops, Input::BecomeHolder);
        let ev = drive(&mut a.machine, &mut a.ops, Input::WriteConflict);
        assert_eq!(
            ev,
            vec![Event::ReservationLost {
                reason: LostReason::Conflict
            }]
        );
    }

    #[test]
    fn step_down_releases_so_the_next_holder_acquires_without_preempting() {
        let ns = FakeNamespace::new(true);
        let (mut a, _) = node(&ns, 1, "node-a");
        let (mut b, _) = node(&ns, 2, "node-b");
        drive(&mut a.machine, &mut a.ops, Input::BecomeHolder);
        assert_eq!(
            drive(&mut a.machine, &mut a.ops, Input::StepDown),
            vec![Event::Released]
        );
        assert_eq!(
            drive(&mut b.machine, &mut b.ops, Input::BecomeHolder),
            vec![Event::Acquired { preempted: None }]
        );
        assert_eq!(ns.aborted(a.host), 0);
    }

    #[test]
    fn unsupported_namespace_reports_the_fallback() {
        let ns = FakeNamespace::new(false);
        let (mut a, ev) = node(&ns, 1, "node-a");
        match ev.as_slice() {
            [Event::Unsupported { reason }] => assert!(reason.contains("ONCS"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(drive(&mut a.machine, &mut a.ops, Input::BecomeHolder).is_empty());
        // Nothing protects at the storage level: writes from anyone pass.
        assert!(ns.write(2).is_ok());
    }
}
