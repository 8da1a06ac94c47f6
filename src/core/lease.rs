//! The lease protocol, as a pure state machine: `step(now, input) -> actions`.
//!
//! One [`LeaseMachine`] per node and volume. It never performs I/O or reads a
//! clock: the runtime (or the simulation) hands it the time of its own monotonic
//! clock and the results of the reads and writes it asked for, and carries out
//! the [`Action`]s it returns. docs/PROTOCOL.md is the specification; this is
//! the implementation, in the same words.
//!
//! In short (block numbers are relative to the area):
//! - every node owns one *slot* (block `FIRST_SLOT_BLOCK + i`) and is the only
//!   one that writes it; a node takes a free slot once ("join") and waits
//!   `host_dead_ceiling` with the slot unchanged before it uses it;
//! - to acquire, a node reads all slots; it may claim only if no other slot is
//!   in `Claim` or `Hold` (or unreadable) unless that slot has been seen
//!   unchanged for the `host_dead` of *that slot's* parameters, timed on this
//!   node's clock; it then writes `Claim(gen)` to its own slot, and when that
//!   write has completed, reads all slots again: any other live `Claim`/`Hold`
//!   means conflict, and it withdraws (writes `Idle`) and backs off; so does a
//!   generation seen at or above its own; otherwise it writes both owner
//!   copies and holds the lease;
//! - the owner record is a second witness: while it names a holder, that
//!   holder's slot must show the holder letting go, or be unchanged for its
//!   `host_dead`, before anyone claims;
//! - the holder renews by rewriting its own slot every `renew_interval`; it may
//!   write the volume until `lease_timeout` after the *start* of its last
//!   renewal that completed within `io_timeout`, then it is [`Event::Lost`] and
//!   must be fenced within `fence_timeout`; it seeks again only when asked,
//!   and not before that fence window has passed;
//! - release writes `Released` to both owner copies, then to the slot; a
//!   waiting peer takes over at its next read, with no wait.
//!
//! Invariants kept here (checked by the simulation after every step):
//! - at most one node holds the lease at any real time, counting each holder's
//!   fence window;
//! - granted generations strictly grow;
//! - nothing compares clocks of different nodes: only durations on this node's
//!   own clock, between its own reads, are used.
//!
//! At most one I/O is outstanding at a time: a node's own writes are never
//! reordered, and an I/O that has passed its deadline stays outstanding until it
//! completes (the runtime cannot cancel it).

use crate::core::params::Params;
use crate::core::record::{
    AreaState, Block, Decoded, Header, Owner, OwnerState, Slot, SlotState, BLOCK,
};

/// A point on the node's own monotonic clock, in milliseconds.
pub type Millis = u64;

/// Area block of header copy A, re-read with every scan so that a node never
/// goes on using an area that was moved (`grow`) or replaced (`format`).
pub const HEADER_BLOCK: u64 = 0;
/// Area block of the owner record, copy A.
pub const OWNER_BLOCK: u64 = 1;
/// Area block of the owner record, copy B: written right after copy A, so a
/// write torn by a crash damages at most one copy and the last granted
/// generation survives in the other.
pub const OWNER_B_BLOCK: u64 = 2;
/// Area block of slot 0.
pub const FIRST_SLOT_BLOCK: u64 = 3;
/// Blocks before the first slot (header A and the two owner copies).
pub const LEAD_BLOCKS: usize = FIRST_SLOT_BLOCK as usize;

/// What the machine needs to know about the area (from its header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Number of slots in the area.
    pub max_slots: u16,
    /// The longest `host_dead` any node may use here; the join wait.
    pub host_dead_ceiling_ms: u64,
    /// The volume id in the header; any other header means the area moved or
    /// was replaced.
    pub volume_id: [u8; 16],
}

/// Who this node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Node name; unique among the nodes sharing the volume.
    pub name: String,
    /// Random, chosen at every process start.
    pub nonce: u64,
    /// This node's timing parameters (recorded in its slot).
    pub params: Params,
}

/// Why an I/O failed (an error, or completion past its deadline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoFailure(pub String);

/// Inputs to [`LeaseMachine::step`].
#[derive(Debug, Clone)]
pub enum Input {
    /// Start trying to get the lease (and keep it).
    Acquire,
    /// Give the lease up (the caller has stopped writing), or stop trying.
    Release,
    /// A timer fired; nothing else happened.
    Tick,
    /// The outstanding read finished: the blocks asked for, in order.
    ReadDone(Result<Vec<Block>, IoFailure>),
    /// The outstanding write finished.
    WriteDone(Result<(), IoFailure>),
}

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Read `count` blocks starting at area block `first_block`, then feed
    /// [`Input::ReadDone`].
    Read { first_block: u64, count: usize },
    /// Write `data` to area block `block` (durably), then feed
    /// [`Input::WriteDone`].
    Write { block: u64, data: Box<Block> },
    /// Call `step(_, Tick)` no later than this time.
    WakeAt(Millis),
    /// Tell the world.
    Emit(Event),
}

/// Why a holder lost the lease.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum LostReason {
    /// No renewal completed in time: the lease ran out on this node's clock.
    Expired,
    /// The owner record names another holder with a newer generation.
    Superseded { by: String, generation: u64 },
    /// The area header changed under the holder (moved by `grow --force`, or
    /// reformatted, or damaged).
    AreaChanged { detail: String },
}

/// Events for the caller.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Event {
    /// This node took slot `slot` for the first time.
    Joined { slot: u16 },
    /// The lease is held by someone else (or contended); still waiting.
    Waiting { holder: Option<String> },
    /// This node holds the lease with fencing token `generation`; it may write
    /// until `valid_until` on its own clock unless renewed.
    Acquired {
        generation: u64,
        valid_until: Millis,
    },
    /// A renewal failed or completed late; the lease runs until `valid_until`.
    RenewFailed {
        generation: u64,
        valid_until: Millis,
        error: String,
    },
    /// The lease is gone: the caller must fence now (within `fence_timeout`).
    Lost {
        generation: u64,
        #[serde(flatten)]
        reason: LostReason,
    },
    /// Released; `clean` is false when the release records could not be written
    /// (peers then wait `host_dead` instead of taking over at once).
    Released { generation: u64, clean: bool },
    /// Stopped trying without ever holding.
    Stopped,
    /// Cannot go on (e.g. no free slot); the machine is idle.
    Failed { error: String },
}

/// Mode of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Idle,
    /// Waiting for a free area, or claiming.
    Seeking,
    /// Wrote a fresh slot at `since`; waiting for it to stay ours.
    Joining {
        slot: u16,
        since: Option<Millis>,
    },
    Holding,
    Releasing,
    Lost,
}

/// The one outstanding I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    ScanRead,
    JoinWrite,
    JoinRead,
    ClaimWrite,
    VerifyRead,
    OwnerWrite,
    OwnerWriteB,
    /// The read after both owner copies are written: the claim must still
    /// stand (own slot intact, no live contender, no newer generation, no
    /// other holder in the owner record) before `Acquired`.
    ConfirmRead,
    RenewWrite,
    OwnerCheck,
    WithdrawWrite,
    ReleaseSlotWrite,
    ReleaseOwnerWrite,
    ReleaseOwnerWriteB,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    op: Op,
    issued: Millis,
}

/// What this node last saw in one slot, and since when (own clock).
#[derive(Debug, Clone)]
struct Observation {
    raw: Box<Block>,
    /// Completion time of the first read that returned these bytes.
    since: Millis,
}

/// The lease state machine of one node for one volume.
#[derive(Debug, Clone)]
pub struct LeaseMachine {
    me: Identity,
    layout: Layout,
    mode: Mode,
    want: bool,
    pending: Option<Pending>,
    observed: Vec<Option<Observation>>,
    my_slot: Option<u16>,
    /// Exactly what this incarnation last wrote to its slot.
    my_last: Option<Box<Block>>,
    seq: u64,
    max_generation_seen: u64,
    /// Generation claimed or held.
    generation: u64,
    claim_issued: Millis,
    valid_until: Millis,
    next_renew: Millis,
    next_poll: Millis,
    backoff_round: u32,
    rng: u64,
    last_waiting: Option<Option<String>>,
    release_clean: bool,
    /// The caller asked to release while holding; carried out even if it asks
    /// to acquire again before the release writes are done.
    release_requested: bool,
    /// After a loss: the end of this node's fence window (own clock). The
    /// machine does not seek again before it, whatever the caller asks.
    fence_until: Millis,
    /// Highest generation in the last full read, not counting our own slot.
    max_other_generation: u64,
    /// The valid owner copy with the highest generation in the last read.
    owner: Option<Owner>,
}

impl LeaseMachine {
    /// A machine for node `me` on an area with `layout`. `me.params` must be
    /// valid and within the area's ceiling (the runtime checks, with a clear
    /// error, before creating the machine).
    pub fn new(me: Identity, layout: Layout) -> LeaseMachine {
        let rng = me.nonce | 1;
        LeaseMachine {
            observed: vec![None; layout.max_slots as usize],
            me,
            layout,
            mode: Mode::Idle,
            want: false,
            pending: None,
            my_slot: None,
            my_last: None,
            seq: 0,
            max_generation_seen: 0,
            generation: 0,
            claim_issued: 0,
            valid_until: 0,
            next_renew: 0,
            next_poll: 0,
            backoff_round: 0,
            rng,
            last_waiting: None,
            release_clean: true,
            release_requested: false,
            fence_until: 0,
            max_other_generation: 0,
            owner: None,
        }
    }

    /// The generation and the end of validity (own clock) while holding.
    pub fn holding(&self) -> Option<(u64, Millis)> {
        (self.mode == Mode::Holding).then_some((self.generation, self.valid_until))
    }

    /// The slot this node uses, once known.
    pub fn slot(&self) -> Option<u16> {
        self.my_slot
    }

    /// This node's identity.
    pub fn identity(&self) -> &Identity {
        &self.me
    }

    /// Whether an I/O is outstanding.
    pub fn io_outstanding(&self) -> bool {
        self.pending.is_some()
    }

    /// Advances the machine to `now` with `input`; returns what to do.
    pub fn step(&mut self, now: Millis, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        self.check_expiry(now, &mut out);
        match input {
            Input::Acquire => {
                self.want = true;
                // From Lost, `drive` starts seeking once the fence window is over;
                // while releasing, once the release is written.
                if self.mode == Mode::Idle {
                    self.start_seeking(now);
                }
            }
            Input::Release => {
                self.want = false;
                if self.mode == Mode::Holding {
                    self.release_requested = true;
                }
            }
            Input::Tick => {}
            Input::ReadDone(result) => self.on_read(now, result, &mut out),
            Input::WriteDone(result) => self.on_write(now, result, &mut out),
        }
        self.check_expiry(now, &mut out);
        self.drive(now, &mut out);
        if let Some(t) = self.next_wake() {
            out.push(Action::WakeAt(t.max(now)));
        }
        out
    }

    fn start_seeking(&mut self, now: Millis) {
        self.mode = Mode::Seeking;
        self.next_poll = now;
        self.backoff_round = 0;
        self.last_waiting = None;
    }

    /// Leaves Holding for Lost. The fence window runs to `valid_until +
    /// fence_timeout + io_timeout`: until then this node may still be writing
    /// under the lost grant, so it must not take a new one.
    fn lose(&mut self, reason: LostReason, out: &mut Vec<Action>) {
        self.mode = Mode::Lost;
        self.release_requested = false;
        // The caller must ask again (after fencing) to get a new grant.
        self.want = false;
        let p = self.me.params;
        self.fence_until = self.valid_until + p.fence_timeout_ms as u64 + p.io_timeout_ms as u64;
        out.push(Action::Emit(Event::Lost {
            generation: self.generation,
            reason,
        }));
    }

    fn check_expiry(&mut self, now: Millis, out: &mut Vec<Action>) {
        if self.mode == Mode::Holding && now >= self.valid_until {
            self.lose(LostReason::Expired, out);
        }
    }

    fn next_wake(&self) -> Option<Millis> {
        match self.mode {
            // With an I/O outstanding, its completion is the next wake-up.
            Mode::Lost if self.want && self.pending.is_none() => Some(self.fence_until),
            Mode::Idle | Mode::Lost => None,
            Mode::Holding if self.pending.is_some() => Some(self.valid_until),
            Mode::Holding => Some(self.valid_until.min(self.next_renew)),
            Mode::Releasing => None,
            Mode::Seeking | Mode::Joining { .. } if self.pending.is_none() => Some(self.next_poll),
            Mode::Seeking | Mode::Joining { .. } => None,
        }
    }

    fn issue(&mut self, now: Millis, op: Op, action: Action, out: &mut Vec<Action>) {
        self.pending = Some(Pending { op, issued: now });
        out.push(action);
    }

    fn read_all(&self) -> Action {
        Action::Read {
            first_block: HEADER_BLOCK,
            count: LEAD_BLOCKS + self.layout.max_slots as usize,
        }
    }

    /// Why header block `b` is not the header this machine was started on.
    fn header_problem(&self, b: &Block) -> Option<String> {
        match Header::decode(b) {
            Decoded::Valid(h) if h.volume_id != self.layout.volume_id => Some(
                "the lease area was replaced (another volume id): it was formatted again".into(),
            ),
            Decoded::Valid(h) if h.state == AreaState::Moved => Some(format!(
                "the lease area moved to byte {} (`blockfence grow`): open the device again",
                h.moved_to
            )),
            Decoded::Valid(_) => None,
            Decoded::Empty => Some("the lease area header was erased".into()),
            Decoded::Corrupt(r) => Some(format!("the lease area header became unreadable ({r})")),
        }
    }

    fn write_slot(&mut self, now: Millis, op: Op, state: SlotState, out: &mut Vec<Action>) {
        let Some(index) = self.my_slot else { return };
        self.seq += 1;
        let slot = Slot {
            index,
            state,
            name: self.me.name.clone(),
            nonce: self.me.nonce,
            seq: self.seq,
            generation: self.generation,
            max_generation_seen: self.max_generation_seen,
            params: self.me.params,
        };
        let data = Box::new(slot.encode());
        self.my_last = Some(data.clone());
        self.issue(
            now,
            op,
            Action::Write {
                block: FIRST_SLOT_BLOCK + index as u64,
                data,
            },
            out,
        );
    }

    fn write_owner(
        &mut self,
        now: Millis,
        op: Op,
        block: u64,
        state: OwnerState,
        out: &mut Vec<Action>,
    ) {
        let owner = Owner {
            state,
            holder_slot: self.my_slot.unwrap_or(0),
            holder_name: self.me.name.clone(),
            holder_nonce: self.me.nonce,
            generation: self.generation,
            params: self.me.params,
        };
        self.issue(
            now,
            op,
            Action::Write {
                block,
                data: Box::new(owner.encode()),
            },
            out,
        );
    }

    /// Starts the next I/O when none is outstanding.
    fn drive(&mut self, now: Millis, out: &mut Vec<Action>) {
        if self.pending.is_some() {
            return;
        }
        if self.mode == Mode::Lost && self.want && now >= self.fence_until {
            self.start_seeking(now);
        }
        match self.mode {
            Mode::Idle | Mode::Lost | Mode::Releasing => {}
            Mode::Seeking | Mode::Joining { .. } if !self.want => {
                self.mode = Mode::Idle;
                out.push(Action::Emit(Event::Stopped));
                let claimed = self
                    .my_last
                    .as_ref()
                    .and_then(|b| Slot::decode(b).valid().map(|s| s.state == SlotState::Claim))
                    .unwrap_or(false);
                if claimed {
                    self.write_slot(now, Op::WithdrawWrite, SlotState::Idle, out);
                }
            }
            Mode::Seeking if now >= self.next_poll => {
                let read = self.read_all();
                self.issue(now, Op::ScanRead, read, out);
            }
            Mode::Joining { since: Some(_), .. } if now >= self.next_poll => {
                let read = self.read_all();
                self.issue(now, Op::JoinRead, read, out);
            }
            Mode::Seeking | Mode::Joining { .. } => {}
            Mode::Holding if self.release_requested || !self.want => {
                self.release_requested = false;
                self.mode = Mode::Releasing;
                self.release_clean = true;
                // Owner copies first, slot last: a peer takes over only once it
                // sees the slot released, so these owner writes can never land
                // after (and hide) the next holder's.
                self.write_owner(
                    now,
                    Op::ReleaseOwnerWrite,
                    OWNER_BLOCK,
                    OwnerState::Released,
                    out,
                );
            }
            Mode::Holding if now >= self.next_renew => {
                self.write_slot(now, Op::RenewWrite, SlotState::Hold, out);
            }
            Mode::Holding => {}
        }
    }

    fn late(&self, now: Millis, issued: Millis) -> bool {
        now.saturating_sub(issued) > self.me.params.io_timeout_ms as u64
    }

    fn backoff(&mut self, now: Millis) {
        // xorshift64: deterministic per nonce, so simulations replay exactly.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.backoff_round = (self.backoff_round + 1).min(5);
        let span = self.me.params.poll_interval_ms() << self.backoff_round;
        self.next_poll = now + self.me.params.io_timeout_ms as u64 / 10 + self.rng % span.max(1);
    }

    fn on_write(&mut self, now: Millis, result: Result<(), IoFailure>, out: &mut Vec<Action>) {
        let Some(p) = self.pending.take() else { return };
        let ok = result.is_ok() && !self.late(now, p.issued);
        let error = match &result {
            Err(IoFailure(e)) => e.clone(),
            Ok(()) => format!("completed after {} ms", now.saturating_sub(p.issued)),
        };
        match p.op {
            Op::JoinWrite => {
                if let Mode::Joining { slot, .. } = self.mode {
                    if result.is_ok() {
                        self.mode = Mode::Joining {
                            slot,
                            since: Some(now),
                        };
                        self.next_poll = now + self.me.params.poll_interval_ms();
                    } else {
                        self.my_slot = None;
                        self.mode = Mode::Seeking;
                        self.backoff(now);
                    }
                }
            }
            Op::ClaimWrite => {
                if self.mode != Mode::Seeking {
                    return;
                }
                if ok {
                    let read = self.read_all();
                    self.issue(now, Op::VerifyRead, read, out);
                } else {
                    self.withdraw(now, out);
                }
            }
            Op::OwnerWrite => {
                if self.mode != Mode::Seeking {
                    return;
                }
                if ok && self.want {
                    self.write_owner(now, Op::OwnerWriteB, OWNER_B_BLOCK, OwnerState::Held, out);
                } else {
                    self.withdraw(now, out);
                }
            }
            Op::OwnerWriteB => {
                if self.mode != Mode::Seeking {
                    return;
                }
                if ok && self.want {
                    let read = self.read_all();
                    self.issue(now, Op::ConfirmRead, read, out);
                } else {
                    self.withdraw(now, out);
                }
            }
            Op::RenewWrite => {
                if self.mode != Mode::Holding {
                    return;
                }
                let interval = self.me.params.renew_interval_ms as u64;
                if ok {
                    self.valid_until = self
                        .valid_until
                        .max(p.issued + self.me.params.lease_timeout_ms as u64);
                    self.next_renew = p.issued + interval;
                    self.issue(
                        now,
                        Op::OwnerCheck,
                        Action::Read {
                            first_block: HEADER_BLOCK,
                            count: LEAD_BLOCKS,
                        },
                        out,
                    );
                } else {
                    // Retry at the normal cadence, or soon if that has passed.
                    self.next_renew = (p.issued + interval).max(now + interval / 4);
                    out.push(Action::Emit(Event::RenewFailed {
                        generation: self.generation,
                        valid_until: self.valid_until,
                        error,
                    }));
                }
            }
            Op::WithdrawWrite => {
                if self.mode == Mode::Seeking {
                    self.backoff(now);
                }
            }
            Op::ReleaseOwnerWrite if ok => {
                self.write_owner(
                    now,
                    Op::ReleaseOwnerWriteB,
                    OWNER_B_BLOCK,
                    OwnerState::Released,
                    out,
                );
            }
            Op::ReleaseOwnerWrite => {
                // Copy A may be torn: leave copy B alone, so that it still
                // carries this generation (one failing path must never damage
                // both copies), and say released in the slot only.
                self.release_clean = false;
                self.write_slot(now, Op::ReleaseSlotWrite, SlotState::Released, out);
            }
            Op::ReleaseOwnerWriteB => {
                self.release_clean &= ok;
                self.write_slot(now, Op::ReleaseSlotWrite, SlotState::Released, out);
            }
            Op::ReleaseSlotWrite => {
                self.release_clean &= ok;
                out.push(Action::Emit(Event::Released {
                    generation: self.generation,
                    clean: self.release_clean,
                }));
                if self.want {
                    self.start_seeking(now);
                } else {
                    self.mode = Mode::Idle;
                }
            }
            Op::ScanRead | Op::JoinRead | Op::VerifyRead | Op::ConfirmRead | Op::OwnerCheck => {}
        }
    }

    fn withdraw(&mut self, now: Millis, out: &mut Vec<Action>) {
        self.mode = Mode::Seeking;
        self.write_slot(now, Op::WithdrawWrite, SlotState::Idle, out);
    }

    fn on_read(
        &mut self,
        now: Millis,
        result: Result<Vec<Block>, IoFailure>,
        out: &mut Vec<Action>,
    ) {
        let Some(p) = self.pending.take() else { return };
        let blocks = match result {
            Ok(b) => b,
            Err(_) => {
                match p.op {
                    Op::VerifyRead | Op::ConfirmRead if self.mode == Mode::Seeking => {
                        self.withdraw(now, out)
                    }
                    Op::ScanRead | Op::JoinRead => {
                        self.next_poll = now + self.me.params.poll_interval_ms()
                    }
                    _ => {}
                }
                return;
            }
        };
        if p.op == Op::OwnerCheck {
            if blocks.len() == LEAD_BLOCKS {
                self.check_owner(&blocks[0], &blocks[1..LEAD_BLOCKS], out);
            }
            return;
        }
        if blocks.len() != LEAD_BLOCKS + self.layout.max_slots as usize {
            // The runtime returned the wrong shape: treat as a failed read.
            self.next_poll = now + self.me.params.poll_interval_ms();
            if matches!(p.op, Op::VerifyRead | Op::ConfirmRead) && self.mode == Mode::Seeking {
                self.withdraw(now, out);
            }
            return;
        }
        if let Some(error) = self.header_problem(&blocks[0]) {
            // Never go on in an area that is no longer the volume's.
            if self.mode == Mode::Seeking && matches!(p.op, Op::VerifyRead | Op::ConfirmRead) {
                self.withdraw(now, out);
            } else {
                self.mode = Mode::Idle;
            }
            self.want = false;
            out.push(Action::Emit(Event::Failed { error }));
            return;
        }
        self.observe(now, &blocks[1..LEAD_BLOCKS], &blocks[LEAD_BLOCKS..]);
        // A read that completed past its deadline may show the area as it was
        // long ago: nothing is decided on it (a scan polls again, a claim is
        // withdrawn). The observations it brought still count, since `since`
        // only ever makes a slot look younger.
        let late = self.late(now, p.issued);
        match (p.op, self.mode) {
            (Op::ScanRead, Mode::Seeking) if late => {
                self.next_poll = now + self.me.params.poll_interval_ms();
            }
            (Op::ScanRead, Mode::Seeking) => self.evaluate(now, p.issued, out),
            (
                Op::JoinRead,
                Mode::Joining {
                    slot,
                    since: Some(since),
                },
            ) => {
                if self.own_slot_intact() {
                    if p.issued.saturating_sub(since) >= self.layout.host_dead_ceiling_ms {
                        self.mode = Mode::Seeking;
                        out.push(Action::Emit(Event::Joined { slot }));
                        self.evaluate(now, p.issued, out);
                    } else {
                        self.next_poll = now + self.me.params.poll_interval_ms();
                    }
                } else {
                    // Another node wrote the same free slot: pick again.
                    self.my_slot = None;
                    self.my_last = None;
                    self.mode = Mode::Seeking;
                    self.backoff(now);
                }
            }
            (Op::VerifyRead, Mode::Seeking) => {
                if late || !self.claim_stands(p.issued) {
                    self.withdraw(now, out);
                } else {
                    self.write_owner(now, Op::OwnerWrite, OWNER_BLOCK, OwnerState::Held, out);
                }
            }
            (Op::ConfirmRead, Mode::Seeking) => {
                // The same test once more, after the owner copies landed: a
                // stray write (a join or ghost write landing long after it was
                // issued) that replaced our claim between the verify read and
                // the owner writes would otherwise let a peer claim beside us
                // unseen. From here on the owner record witnesses for us.
                let valid_until = self.claim_issued + self.me.params.lease_timeout_ms as u64;
                if late || now >= valid_until || !self.claim_stands(p.issued) {
                    self.withdraw(now, out);
                } else {
                    self.mode = Mode::Holding;
                    self.valid_until = valid_until;
                    self.next_renew = self.claim_issued + self.me.params.renew_interval_ms as u64;
                    self.backoff_round = 0;
                    out.push(Action::Emit(Event::Acquired {
                        generation: self.generation,
                        valid_until,
                    }));
                }
            }
            _ => {}
        }
    }

    /// Whether our claim still stands after a read issued at `read_issued`:
    /// our slot shows exactly our claim, no other slot or owner record blocks,
    /// nobody shows a generation at or above ours (a generation chosen from an
    /// older read may have been granted meanwhile), and the caller still wants
    /// the lease.
    fn claim_stands(&self, read_issued: Millis) -> bool {
        self.own_slot_intact()
            && self.blocker(read_issued).is_none()
            && self.max_other_generation < self.generation
            && self.want
    }

    fn check_owner(&mut self, header: &Block, owners: &[Block], out: &mut Vec<Action>) {
        if self.mode != Mode::Holding {
            return;
        }
        if let Some(detail) = self.header_problem(header) {
            self.lose(LostReason::AreaChanged { detail }, out);
            return;
        }
        for b in owners {
            let Decoded::Valid(owner) = Owner::decode(b) else {
                continue;
            };
            let other = owner.holder_nonce != self.me.nonce || owner.holder_name != self.me.name;
            if owner.state == OwnerState::Held && other && owner.generation > self.generation {
                self.lose(
                    LostReason::Superseded {
                        by: owner.holder_name,
                        generation: owner.generation,
                    },
                    out,
                );
                return;
            }
        }
    }

    /// Records what each slot holds and since when; learns generations.
    fn observe(&mut self, now: Millis, owners: &[Block], blocks: &[Block]) {
        let mut max_other = 0;
        self.owner = Owner::best_of(owners).valid().cloned();
        for b in owners {
            if let Decoded::Valid(owner) = Owner::decode(b) {
                // Our own owner copies of the claim in progress are not news.
                let ours = owner.holder_name == self.me.name
                    && owner.holder_nonce == self.me.nonce
                    && owner.generation == self.generation;
                if !ours {
                    max_other = max_other.max(owner.generation);
                }
            }
        }
        for (i, b) in blocks.iter().enumerate() {
            let changed = match &self.observed[i] {
                Some(o) => o.raw[..] != b[..],
                None => true,
            };
            if changed {
                self.observed[i] = Some(Observation {
                    raw: Box::new(*b),
                    since: now,
                });
            }
            let mine = self.my_slot == Some(i as u16)
                && self.my_last.as_ref().is_some_and(|l| l[..] == b[..]);
            if let Decoded::Valid(s) = Slot::decode(b) {
                if !mine {
                    max_other = max_other.max(s.generation).max(s.max_generation_seen);
                }
            }
        }
        self.max_other_generation = max_other;
        self.max_generation_seen = self.max_generation_seen.max(max_other);
    }

    /// Whether the slot observation `obs` was unchanged for `host_dead` up to a
    /// read issued at `read_issued`.
    fn is_dead(obs: &Observation, read_issued: Millis, host_dead: u64) -> bool {
        read_issued >= obs.since && read_issued - obs.since >= host_dead
    }

    /// Our own slot, when it holds a torn or damaged write: ours (this
    /// incarnation wrote it and is its only writer), to be repaired by our
    /// next write, not a contender to wait out.
    fn own_slot_torn(&self) -> bool {
        match (self.my_slot, &self.my_last) {
            (Some(i), Some(_)) => self.observed[i as usize]
                .as_ref()
                .is_some_and(|o| matches!(Slot::decode(&o.raw), Decoded::Corrupt(_))),
            _ => false,
        }
    }

    fn own_slot_intact(&self) -> bool {
        match (self.my_slot, &self.my_last) {
            (Some(i), Some(last)) => self.observed[i as usize]
                .as_ref()
                .is_some_and(|o| o.raw[..] == last[..]),
            _ => false,
        }
    }

    /// The first slot that forbids claiming, judged with a read issued at
    /// `read_issued`: another node's (or an earlier incarnation's) `Claim`,
    /// `Hold` or unreadable slot that has not been seen unchanged for its
    /// `host_dead`. Returns the name to report, if known.
    fn blocker(&self, read_issued: Millis) -> Option<Option<String>> {
        for (i, obs) in self.observed.iter().enumerate() {
            let Some(obs) = obs else { continue };
            let mine = self.my_slot == Some(i as u16);
            if mine && self.my_last.as_ref().is_some_and(|l| l[..] == obs.raw[..]) {
                continue;
            }
            if mine && self.own_slot_torn() {
                continue;
            }
            let (contending, host_dead, name) = match Slot::decode(&obs.raw) {
                Decoded::Empty => (false, 0, None),
                Decoded::Valid(s) => {
                    let host_dead = if s.params.validate().is_ok() {
                        s.params.host_dead_ms()
                    } else {
                        self.layout.host_dead_ceiling_ms
                    };
                    let contending = matches!(s.state, SlotState::Claim | SlotState::Hold);
                    (contending, host_dead, Some(s.name))
                }
                Decoded::Corrupt(_) => (true, self.layout.host_dead_ceiling_ms, None),
            };
            // A slot only its own node writes: when it is in our slot but not
            // our bytes, it is an earlier incarnation of us, or a node that
            // wrote the same free slot; either way it counts like any other.
            if contending && !Self::is_dead(obs, read_issued, host_dead) {
                return Some(name);
            }
        }
        self.owner_blocker(read_issued)
    }

    /// The owner record as a second witness: while it names a holder, that
    /// holder's slot must show the holder itself letting go (`idle` or
    /// `released` with the holder's nonce and at least its generation), or
    /// have been unchanged for the holder's `host_dead`. So a stray write that
    /// replaced a live holder's `hold` (a join or a ghost write landing very
    /// late) cannot make the lease look free.
    fn owner_blocker(&self, read_issued: Millis) -> Option<Option<String>> {
        let o = self
            .owner
            .as_ref()
            .filter(|o| o.state == OwnerState::Held)?;
        let k = o.holder_slot;
        if self.my_slot == Some(k)
            && o.holder_name == self.me.name
            && (self.own_slot_intact() || self.own_slot_torn())
        {
            // The holder was an earlier incarnation of us; we are that slot's
            // writer now, and judged the earlier one dead before we wrote it.
            // (If the owner names another node in what we take for our slot,
            // we took it by mistake, e.g. from a stale read: wait like anyone.)
            return None;
        }
        let obs = self.observed.get(k as usize)?.as_ref()?;
        if let Decoded::Valid(s) = Slot::decode(&obs.raw) {
            let let_go = matches!(s.state, SlotState::Idle | SlotState::Released);
            if s.nonce == o.holder_nonce && let_go && s.generation >= o.generation {
                return None;
            }
        }
        let host_dead = if o.params.validate().is_ok() {
            o.params.host_dead_ms()
        } else {
            self.layout.host_dead_ceiling_ms
        };
        if Self::is_dead(obs, read_issued, host_dead) {
            None
        } else {
            Some(Some(o.holder_name.clone()))
        }
    }

    /// Decides, from a fresh read of all slots, whether to join, wait or claim.
    fn evaluate(&mut self, now: Millis, read_issued: Millis, out: &mut Vec<Action>) {
        if !self.want {
            return;
        }
        if self.my_slot.is_some()
            && self.my_last.is_some()
            && !self.own_slot_intact()
            && !self.own_slot_torn()
        {
            // Our slot was overwritten: someone else took it. Find another.
            // (A torn slot is our own torn write: we keep it and rewrite it.)
            self.my_slot = None;
            self.my_last = None;
        }
        if self.my_slot.is_none() {
            let found = self.observed.iter().position(|o| {
                o.as_ref().is_some_and(|o| {
                    Slot::decode(&o.raw)
                        .valid()
                        .is_some_and(|s| s.name == self.me.name)
                })
            });
            match found {
                Some(i) => {
                    // Our name from an earlier incarnation: the slot is ours, but
                    // what that incarnation wrote counts like another node's.
                    self.my_slot = Some(i as u16);
                    if let Some(s) = self.observed[i]
                        .as_ref()
                        .and_then(|o| Slot::decode(&o.raw).valid().cloned())
                    {
                        if s.nonce == self.me.nonce {
                            self.my_last = self.observed[i].as_ref().map(|o| o.raw.clone());
                        }
                        self.seq = self.seq.max(s.seq);
                    }
                }
                None => {
                    // An empty slot, else a corrupt one nobody has rewritten for
                    // the ceiling (a torn write of a node that is gone): the join
                    // wait protects either choice.
                    let ceiling = self.layout.host_dead_ceiling_ms;
                    let empty = self.observed.iter().position(|o| {
                        o.as_ref()
                            .is_some_and(|o| matches!(Slot::decode(&o.raw), Decoded::Empty))
                    });
                    let free = empty.or_else(|| {
                        self.observed.iter().position(|o| {
                            o.as_ref().is_some_and(|o| {
                                matches!(Slot::decode(&o.raw), Decoded::Corrupt(_))
                                    && Self::is_dead(o, read_issued, ceiling)
                            })
                        })
                    });
                    match free {
                        Some(i) => {
                            self.my_slot = Some(i as u16);
                            self.mode = Mode::Joining {
                                slot: i as u16,
                                since: None,
                            };
                            self.write_slot(now, Op::JoinWrite, SlotState::Idle, out);
                        }
                        None => {
                            self.mode = Mode::Idle;
                            self.want = false;
                            out.push(Action::Emit(Event::Failed {
                                error: format!(
                                    "no free slot: all {} slots of the lease area are taken by other nodes",
                                    self.layout.max_slots
                                ),
                            }));
                        }
                    }
                    return;
                }
            }
        }
        match self.blocker(read_issued) {
            Some(holder) => {
                if self.last_waiting.as_ref() != Some(&holder) {
                    self.last_waiting = Some(holder.clone());
                    out.push(Action::Emit(Event::Waiting { holder }));
                }
                self.next_poll = now + self.me.params.poll_interval_ms();
            }
            None => {
                self.generation = self.max_generation_seen + 1;
                self.max_generation_seen = self.generation;
                self.claim_issued = now;
                self.write_slot(now, Op::ClaimWrite, SlotState::Claim, out);
            }
        }
    }
}

/// Length of one block, re-exported for runtimes that size buffers.
pub const BLOCK_BYTES: usize = BLOCK;

#[cfg(test)]
mod tests {
    use super::*;

    /// A perfect disk with instant I/O, for unit tests of single schedules.
    struct Disk {
        blocks: Vec<Block>,
    }

    impl Disk {
        fn new(slots: u16) -> Disk {
            let mut blocks = vec![[0u8; BLOCK]; LEAD_BLOCKS + slots as usize];
            blocks[HEADER_BLOCK as usize] = header(slots).encode();
            blocks[OWNER_BLOCK as usize] = Owner::free(Params::default()).encode();
            blocks[OWNER_B_BLOCK as usize] = Owner::free(Params::default()).encode();
            Disk { blocks }
        }
        /// Performs the I/O actions at once; returns the follow-up input.
        fn perform(&mut self, actions: &[Action]) -> (Option<Input>, Vec<Event>) {
            let mut input = None;
            let mut events = vec![];
            for a in actions {
                match a {
                    Action::Read { first_block, count } => {
                        let s = *first_block as usize;
                        input = Some(Input::ReadDone(Ok(self.blocks[s..s + count].to_vec())));
                    }
                    Action::Write { block, data } => {
                        self.blocks[*block as usize] = **data;
                        input = Some(Input::WriteDone(Ok(())));
                    }
                    Action::Emit(e) => events.push(e.clone()),
                    Action::WakeAt(_) => {}
                }
            }
            (input, events)
        }
    }

    const VOLUME: [u8; 16] = [7; 16];

    fn header(slots: u16) -> Header {
        Header {
            area_offset: 1 << 30,
            area_size: 1 << 20,
            max_slots: slots,
            state: AreaState::Active,
            moved_to: 0,
            volume_id: VOLUME,
            logical_sector: 512,
            physical_sector: 512,
            fs_bytes: 1 << 30,
            params: Params::default(),
            host_dead_ceiling_ms: Params::default().host_dead_ms() as u32,
        }
    }

    fn layout() -> Layout {
        Layout {
            max_slots: 4,
            host_dead_ceiling_ms: Params::default().host_dead_ms(),
            volume_id: VOLUME,
        }
    }

    fn node(name: &str, nonce: u64) -> LeaseMachine {
        LeaseMachine::new(
            Identity {
                name: name.into(),
                nonce,
                params: Params::default(),
            },
            layout(),
        )
    }

    /// Runs `m` at time `now` until it has no immediate I/O left.
    fn settle(m: &mut LeaseMachine, disk: &mut Disk, now: Millis, first: Input) -> Vec<Event> {
        let mut events = vec![];
        let mut input = Some(first);
        while let Some(i) = input.take() {
            let actions = m.step(now, i);
            let (next, ev) = disk.perform(&actions);
            events.extend(ev);
            input = next;
        }
        events
    }

    #[test]
    fn a_fresh_node_joins_then_acquires_a_free_area() {
        let mut disk = Disk::new(4);
        let mut a = node("a", 1);
        let ev = settle(&mut a, &mut disk, 0, Input::Acquire);
        assert!(ev.is_empty(), "{ev:?}");
        // Joining: nothing until the ceiling has passed with the slot unchanged.
        let ceiling = layout().host_dead_ceiling_ms;
        let mut t = 0;
        let mut events = vec![];
        while t <= ceiling + 1_000 {
            t += 100;
            events.extend(settle(&mut a, &mut disk, t, Input::Tick));
        }
        assert!(matches!(events[0], Event::Joined { slot: 0 }));
        assert!(matches!(events[1], Event::Acquired { generation: 1, .. }));
        assert_eq!(a.holding().map(|h| h.0), Some(1));
    }

    fn joined(name: &str, nonce: u64, disk: &mut Disk) -> LeaseMachine {
        let mut m = node(name, nonce);
        settle(&mut m, disk, 0, Input::Acquire);
        let mut t = 0;
        while m.holding().is_none() {
            t += 100;
            settle(&mut m, disk, t, Input::Tick);
            assert!(t < 60_000);
        }
        // Hand it back so the next node can join on a free area.
        settle(&mut m, disk, t, Input::Release);
        m
    }

    /// The one I/O action in `actions`.
    fn io(actions: &[Action]) -> &Action {
        let io: Vec<&Action> = actions
            .iter()
            .filter(|a| matches!(a, Action::Read { .. } | Action::Write { .. }))
            .collect();
        assert_eq!(io.len(), 1, "{actions:?}");
        io[0]
    }

    fn emitted(actions: &[Action]) -> Vec<Event> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Emit(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    /// `a` (joined) acquires at `t` with instant I/O until its claim has
    /// landed; returns the actions asking for the verify read.
    fn claim(a: &mut LeaseMachine, disk: &mut Disk, t: Millis) -> Vec<Action> {
        let scan = a.step(t, Input::Acquire);
        let (read, _) = disk.perform(&scan);
        let claim = a.step(t, read.expect("a scan read"));
        assert!(
            matches!(io(&claim), Action::Write { block, .. } if *block == FIRST_SLOT_BLOCK),
            "{claim:?}"
        );
        let (done, _) = disk.perform(&claim);
        a.step(t, done.expect("a claim write"))
    }

    #[test]
    fn a_claim_decided_on_a_read_completing_past_its_deadline_is_withdrawn() {
        let mut disk = Disk::new(4);
        let mut a = joined("a", 1, &mut disk);
        let t = 100_000;
        let verify = claim(&mut a, &mut disk, t);
        assert!(matches!(io(&verify), Action::Read { .. }), "{verify:?}");
        // Served at once, but its completion comes back after io_timeout.
        let (read, _) = disk.perform(&verify);
        let late = t + Params::default().io_timeout_ms as u64 + 1;
        let out = a.step(late, read.unwrap());
        assert!(
            matches!(io(&out), Action::Write { block, data }
                if *block == FIRST_SLOT_BLOCK
                && Slot::decode(data).valid().is_some_and(|s| s.state == SlotState::Idle)),
            "a late verify read must withdraw: {out:?}"
        );
    }

    #[test]
    fn a_stray_write_over_the_claim_before_the_owner_copies_land_is_seen_by_the_confirm_read() {
        let mut disk = Disk::new(4);
        let mut a = joined("a", 1, &mut disk);
        let t = 100_000;
        let verify = claim(&mut a, &mut disk, t);
        let (read, _) = disk.perform(&verify);
        let owner_a = a.step(t, read.unwrap());
        assert!(matches!(
            io(&owner_a),
            Action::Write {
                block: OWNER_BLOCK,
                ..
            }
        ));
        // A join write of another node, issued long ago, lands on a's slot now.
        let stray = Slot {
            index: 0,
            state: SlotState::Idle,
            name: "late".into(),
            nonce: 9,
            seq: 1,
            generation: 0,
            max_generation_seen: 0,
            params: Params::default(),
        };
        disk.blocks[FIRST_SLOT_BLOCK as usize] = stray.encode();
        let (done, _) = disk.perform(&owner_a);
        let owner_b = a.step(t, done.unwrap());
        assert!(matches!(
            io(&owner_b),
            Action::Write {
                block: OWNER_B_BLOCK,
                ..
            }
        ));
        let (done, _) = disk.perform(&owner_b);
        let confirm = a.step(t, done.unwrap());
        assert!(matches!(io(&confirm), Action::Read { .. }), "{confirm:?}");
        assert!(
            emitted(&confirm).is_empty(),
            "no grant before the confirm read"
        );
        let (read, _) = disk.perform(&confirm);
        let out = a.step(t, read.unwrap());
        assert!(
            !emitted(&out)
                .iter()
                .any(|e| matches!(e, Event::Acquired { .. })),
            "{out:?}"
        );
        assert!(a.holding().is_none());
    }

    #[test]
    fn a_release_whose_owner_copy_a_failed_leaves_copy_b_alone() {
        let mut disk = Disk::new(4);
        let mut a = joined("a", 1, &mut disk);
        let t = 100_000;
        let ev = settle(&mut a, &mut disk, t, Input::Acquire);
        let Some(Event::Acquired { generation, .. }) = ev.last().cloned() else {
            panic!("{ev:?}")
        };
        let out = a.step(t + 10, Input::Release);
        assert!(matches!(
            io(&out),
            Action::Write {
                block: OWNER_BLOCK,
                ..
            }
        ));
        // Copy A fails (and may have landed torn): copy B must keep the generation.
        let out = a.step(t + 20, Input::WriteDone(Err(IoFailure("EIO".into()))));
        assert!(
            matches!(io(&out), Action::Write { block, .. } if *block == FIRST_SLOT_BLOCK),
            "the slot, not owner copy B: {out:?}"
        );
        let out = a.step(t + 30, Input::WriteDone(Ok(())));
        assert_eq!(
            emitted(&out),
            vec![Event::Released {
                generation,
                clean: false
            }]
        );
        let b = Owner::decode(&disk.blocks[OWNER_B_BLOCK as usize]);
        assert!(
            b.valid()
                .is_some_and(|o| o.generation == generation && o.state == OwnerState::Held),
            "{b:?}"
        );
    }

    #[test]
    fn release_hands_over_at_once_and_generation_grows() {
        let mut disk = Disk::new(4);
        let mut a = joined("a", 1, &mut disk);
        let mut b = joined("b", 2, &mut disk);
        let t = 100_000;
        let ev = settle(&mut a, &mut disk, t, Input::Acquire);
        let Some(Event::Acquired { generation: ga, .. }) = ev.last().cloned() else {
            panic!("{ev:?}")
        };
        let ev = settle(&mut b, &mut disk, t, Input::Acquire);
        assert!(
            matches!(ev.last(), Some(Event::Waiting { holder: Some(h) }) if h == "a"),
            "{ev:?}"
        );
        let ev = settle(&mut a, &mut disk, t + 10, Input::Release);
        assert_eq!(
            ev,
            vec![Event::Released {
                generation: ga,
                clean: true
            }]
        );
        // b's next poll, with no waiting at all.
        let ev = settle(&mut b, &mut disk, t + 500, Input::Tick);
        assert!(
            matches!(ev.last(), Some(Event::Acquired { generation, .. }) if *generation == ga + 1),
            "{ev:?}"
        );
    }

    #[test]
    fn a_silent_holder_is_taken_over_only_after_host_dead() {
        let mut disk = Disk::new(4);
        let mut a = joined("a", 1, &mut disk);
        let mut b = joined("b", 2, &mut disk);
        let t0 = 100_000;
        settle(&mut a, &mut disk, t0, Input::Acquire);
        assert!(a.holding().is_some());
        // a goes silent now (crash). b starts watching.
        let host_dead = Params::default().host_dead_ms();
        let mut t = t0;
        let mut acquired_at = None;
        settle(&mut b, &mut disk, t, Input::Acquire);
        while acquired_at.is_none() {
            t += 50;
            let ev = settle(&mut b, &mut disk, t, Input::Tick);
            if ev.iter().any(|e| matches!(e, Event::Acquired { .. })) {
                acquired_at = Some(t);
            }
        }
        let at = acquired_at.unwrap();
        assert!(
            at - t0 >= host_dead,
            "took over after {} ms < host_dead {host_dead}",
            at - t0
        );
        assert!(at - t0 <= host_dead + 1_000, "took {} ms", at - t0);
        // When a comes back its clock says the lease ran out.
        let ev = settle(&mut a, &mut disk, at, Input::Tick);
        assert!(
            matches!(
                ev[0],
                Event::Lost {
                    reason: LostReason::Expired,
                    ..
                }
            ),
            "{ev:?}"
        );
    }

    #[test]
    fn a_renewing_holder_is_never_taken_over() {
        let mut disk = Disk::new(4);
        let mut a = joined("a", 1, &mut disk);
        let mut b = joined("b", 2, &mut disk);
        let t0 = 100_000;
        settle(&mut a, &mut disk, t0, Input::Acquire);
        settle(&mut b, &mut disk, t0, Input::Acquire);
        for k in 1..1_000 {
            let t = t0 + k * 100;
            settle(&mut a, &mut disk, t, Input::Tick);
            let ev = settle(&mut b, &mut disk, t, Input::Tick);
            assert!(
                !ev.iter().any(|e| matches!(e, Event::Acquired { .. })),
                "{ev:?}"
            );
        }
        assert!(a.holding().is_some());
    }

    #[test]
    fn a_renewal_completing_late_does_not_extend_the_lease() {
        let mut disk = Disk::new(4);
        let mut a = joined("a", 1, &mut disk);
        let t0 = 100_000;
        settle(&mut a, &mut disk, t0, Input::Acquire);
        let (_, until) = a.holding().unwrap();
        let actions = a.step(t0 + 1_000, Input::Tick);
        assert!(actions.iter().any(|x| matches!(x, Action::Write { .. })));
        // The write completes 2 s later: past io_timeout.
        let actions = a.step(t0 + 3_000, Input::WriteDone(Ok(())));
        assert!(actions
            .iter()
            .any(|x| matches!(x, Action::Emit(Event::RenewFailed { .. }))));
        assert_eq!(a.holding().unwrap().1, until);
        let actions = a.step(until, Input::Tick);
        assert!(actions
            .iter()
            .any(|x| matches!(x, Action::Emit(Event::Lost { .. }))));
    }

    #[test]
    fn a_corrupt_slot_blocks_claims_until_unchanged_for_the_ceiling() {
        let mut disk = Disk::new(4);
        let mut b = joined("b", 2, &mut disk);
        // Slot 3 is torn garbage.
        disk.blocks[FIRST_SLOT_BLOCK as usize + 3] = [0x5a; BLOCK];
        let t0 = 100_000;
        let ev = settle(&mut b, &mut disk, t0, Input::Acquire);
        assert!(
            matches!(ev.last(), Some(Event::Waiting { holder: None })),
            "{ev:?}"
        );
        let ceiling = layout().host_dead_ceiling_ms;
        let mut t = t0;
        loop {
            t += 100;
            let ev = settle(&mut b, &mut disk, t, Input::Tick);
            if ev.iter().any(|e| matches!(e, Event::Acquired { .. })) {
                break;
            }
        }
        assert!(t - t0 >= ceiling);
    }

    #[test]
    fn a_moved_area_stops_waiters_and_holders() {
        let mut disk = Disk::new(4);
        let mut a = joined("a", 1, &mut disk);
        let mut b = joined("b", 2, &mut disk);
        let t0 = 100_000;
        settle(&mut a, &mut disk, t0, Input::Acquire);
        settle(&mut b, &mut disk, t0, Input::Acquire);
        let mut moved = header(4);
        moved.state = AreaState::Moved;
        moved.moved_to = 2 << 30;
        disk.blocks[HEADER_BLOCK as usize] = moved.encode();
        let ev = settle(&mut b, &mut disk, t0 + 500, Input::Tick);
        assert!(
            matches!(&ev[..], [Event::Failed { error }] if error.contains("moved")),
            "{ev:?}"
        );
        assert!(a.holding().is_some(), "a holds");
        let ev = settle(&mut a, &mut disk, t0 + 1_000, Input::Tick);
        assert!(
            matches!(
                &ev[..],
                [Event::Lost {
                    reason: LostReason::AreaChanged { .. },
                    ..
                }]
            ),
            "{ev:?}"
        );
    }

    #[test]
    fn no_free_slot_is_a_clear_failure() {
        let mut disk = Disk::new(1);
        let mut m = LeaseMachine::new(
            Identity {
                name: "x".into(),
                nonce: 9,
                params: Params::default(),
            },
            Layout {
                max_slots: 1,
                host_dead_ceiling_ms: 9_200,
                volume_id: VOLUME,
            },
        );
        let other = Slot {
            index: 0,
            state: SlotState::Idle,
            name: "y".into(),
            nonce: 1,
            seq: 1,
            generation: 0,
            max_generation_seen: 0,
            params: Params::default(),
        };
        disk.blocks[FIRST_SLOT_BLOCK as usize] = other.encode();
        let ev = settle(&mut m, &mut disk, 0, Input::Acquire);
        assert!(
            matches!(&ev[0], Event::Failed { error } if error.contains("no free slot")),
            "{ev:?}"
        );
    }
}
