//! An in-memory NVMe namespace that answers reservation and Identify
//! passthrough commands, shared by several simulated hosts.
//!
//! Model (NVMe Base Specification, "Reservations"): registrants are per host
//! (one key each); at most one holder; type Write Exclusive lets only the
//! holder write while a reservation is held, anyone when none is. Register,
//! Acquire (acquire, preempt, preempt-and-abort), Release (release, clear) and
//! Report follow the specification's rules for the cases blockfence uses;
//! anything else answers Invalid Field. The commands are decoded with the same
//! functions the tests check against the specification's byte offsets.
//!
//! Test code only in spirit, but public so integration tests and the daemon's
//! tests can use it.

use super::passthru::{
    Passthru, PassthruCmd, SC_INVALID_FIELD, SC_INVALID_OPCODE, SC_RESERVATION_CONFLICT, STATUS_DNR,
};
use super::reservation::{self as enc, decode_fields, encode_report, ONCS_OFFSET, RESCAP_OFFSET};
use crate::core::reservation::{Key, Registrant, ResvStatus, ResvType};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
struct State {
    supported: bool,
    generation: u32,
    /// host id -> key
    keys: BTreeMap<u8, Key>,
    holder: Option<u8>,
    rtype: Option<ResvType>,
    /// Commands of a host that were aborted by a preempt-and-abort.
    aborted: BTreeMap<u8, u32>,
}

/// The shared namespace.
#[derive(Debug, Clone, Default)]
pub struct FakeNamespace {
    state: Arc<Mutex<State>>,
}

const CONFLICT: u16 = STATUS_DNR | SC_RESERVATION_CONFLICT;

impl FakeNamespace {
    /// A namespace with (`supported`) or without reservation support.
    pub fn new(supported: bool) -> FakeNamespace {
        let ns = FakeNamespace::default();
        ns.lock().supported = supported;
        ns
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake namespace lock poisoned")
    }

    /// A host (controller) attached to the namespace.
    pub fn host(&self, host_id: u8) -> FakeHost {
        FakeHost {
            ns: self.clone(),
            host_id,
            path: PathBuf::from(format!("/dev/fake-nvme{host_id}n1")),
        }
    }

    /// A data write from `host_id`: `Err(status)` with Reservation Conflict
    /// if the reservation forbids it.
    pub fn write(&self, host_id: u8) -> Result<(), u16> {
        let s = self.lock();
        match (s.holder, s.rtype) {
            (Some(h), Some(ResvType::WriteExclusive)) if h != host_id => Err(CONFLICT),
            _ => Ok(()),
        }
    }

    /// The current status (as a Report would show it).
    pub fn status(&self) -> ResvStatus {
        status_of(&self.lock())
    }

    /// How many of `host_id`'s queued commands a preempt-and-abort aborted.
    pub fn aborted(&self, host_id: u8) -> u32 {
        self.lock().aborted.get(&host_id).copied().unwrap_or(0)
    }
}

fn status_of(s: &State) -> ResvStatus {
    ResvStatus {
        generation: s.generation,
        rtype: s.holder.and(s.rtype),
        ptpl: false,
        registrants: s
            .keys
            .iter()
            .map(|(&h, &k)| Registrant {
                cntlid: h as u16,
                holds: s.holder == Some(h),
                key: k,
                host_id: [h; 16],
            })
            .collect(),
    }
}

/// One host's view: implements [`Passthru`].
#[derive(Debug, Clone)]
pub struct FakeHost {
    ns: FakeNamespace,
    host_id: u8,
    path: PathBuf,
}

impl FakeHost {
    pub fn host_id(&self) -> u8 {
        self.host_id
    }

    fn reservation(&self, cmd: &PassthruCmd, data: &mut [u8]) -> u16 {
        let mut s = self.ns.lock();
        if !s.supported {
            return SC_INVALID_OPCODE;
        }
        let me = self.host_id;
        let f = decode_fields(cmd, data);
        let mine = s.keys.get(&me).copied();
        match cmd.opcode {
            enc::OPC_RESV_REGISTER => match f.action {
                0 => match mine {
                    Some(k) if k == f.second_key => 0,
                    Some(_) => CONFLICT,
                    None => {
                        s.keys.insert(me, f.second_key);
                        s.generation += 1;
                        0
                    }
                },
                1 => {
                    if !f.iekey && mine != Some(f.crkey) {
                        return CONFLICT;
                    }
                    s.keys.remove(&me);
                    if s.holder == Some(me) {
                        s.holder = None;
                        s.rtype = None;
                    }
                    s.generation += 1;
                    0
                }
                2 => {
                    if !f.iekey && mine.is_some_and(|k| k != f.crkey) {
                        return CONFLICT;
                    }
                    if f.second_key == 0 {
                        return SC_INVALID_FIELD;
                    }
                    s.keys.insert(me, f.second_key);
                    s.generation += 1;
                    0
                }
                _ => SC_INVALID_FIELD,
            },
            enc::OPC_RESV_ACQUIRE => {
                let Some(rtype) = ResvType::from_code(f.rtype) else {
                    return SC_INVALID_FIELD;
                };
                if mine != Some(f.crkey) {
                    return CONFLICT;
                }
                match f.action {
                    0 => match s.holder {
                        None => {
                            s.holder = Some(me);
                            s.rtype = Some(rtype);
                            0
                        }
                        Some(h) if h == me && s.rtype == Some(rtype) => 0,
                        Some(_) => CONFLICT,
                    },
                    1 | 2 => {
                        let victims: Vec<u8> = s
                            .keys
                            .iter()
                            .filter(|(&h, &k)| k == f.second_key && h != me)
                            .map(|(&h, _)| h)
                            .collect();
                        if victims.is_empty() {
                            return CONFLICT;
                        }
                        for v in &victims {
                            s.keys.remove(v);
                            if f.action == 2 {
                                *s.aborted.entry(*v).or_default() += 1;
                            }
                        }
                        let take = match s.holder {
                            None => true,
                            Some(h) => victims.contains(&h),
                        };
                        if take {
                            s.holder = Some(me);
                            s.rtype = Some(rtype);
                        }
                        s.generation += 1;
                        0
                    }
                    _ => SC_INVALID_FIELD,
                }
            }
            enc::OPC_RESV_RELEASE => {
                if mine != Some(f.crkey) {
                    return CONFLICT;
                }
                match f.action {
                    0 => {
                        if s.holder == Some(me) {
                            if s.rtype.map(ResvType::code) != Some(f.rtype) {
                                return SC_INVALID_FIELD;
                            }
                            s.holder = None;
                            s.rtype = None;
                        }
                        0
                    }
                    1 => {
                        s.holder = None;
                        s.rtype = None;
                        s.keys.clear();
                        s.generation += 1;
                        0
                    }
                    _ => SC_INVALID_FIELD,
                }
            }
            enc::OPC_RESV_REPORT => {
                if cmd.cdw11 & 1 == 0 {
                    // Only the extended data structure is modelled.
                    return SC_INVALID_FIELD;
                }
                let want = ((cmd.cdw10 as usize) + 1) * 4;
                let len = want.min(data.len());
                encode_report(&status_of(&s), &mut data[..len]);
                0
            }
            _ => SC_INVALID_OPCODE,
        }
    }
}

impl Passthru for FakeHost {
    fn admin(&mut self, cmd: &mut PassthruCmd, data: &mut [u8]) -> io::Result<u16> {
        if cmd.opcode != enc::OPC_IDENTIFY {
            return Ok(SC_INVALID_OPCODE);
        }
        data.fill(0);
        let supported = self.ns.lock().supported;
        match cmd.cdw10 & 0xff {
            enc::CNS_CONTROLLER if supported => {
                data[ONCS_OFFSET..ONCS_OFFSET + 2]
                    .copy_from_slice(&(enc::ONCS_RESERVATIONS | 0x1f).to_le_bytes());
            }
            enc::CNS_NAMESPACE if supported => data[RESCAP_OFFSET] = 0xff,
            _ => {}
        }
        Ok(0)
    }

    fn io(&mut self, cmd: &mut PassthruCmd, data: &mut [u8]) -> io::Result<u16> {
        Ok(self.reservation(cmd, data))
    }

    fn nsid(&self) -> u32 {
        1
    }

    fn path(&self) -> &Path {
        &self.path
    }
}
