//! The safety oracle: writer intervals in real time, and granted generations.
//!
//! A *tenure* is the real-time interval during which one node incarnation may
//! write the volume. It opens when the machine emits `Acquired` (while the
//! caller wants the lease) and ends at the earliest of:
//! - the `Release` input (the caller stops writing, and waits for its writes
//!   to complete, before it releases: a release is clean, and the protocol
//!   lets a waiting peer take over at once);
//! - the crash of the incarnation, plus the node's `io_timeout` on its own
//!   clock (a data write issued just before the crash may still land);
//! - the real time at which the node's clock reaches `valid_until +
//!   fence_timeout + io_timeout`, with the last `valid_until` the machine held
//!   (its fence or watchdog stops a stalled or cut-off node by then, and a data
//!   write issued just before the fence may land up to `io_timeout` later:
//!   this is the `host_dead` arithmetic).
//!
//! Invariants checked when a tenure opens (which is enough: an open tenure's
//! end only grows at a step taken before its current end, so any overlap
//! already exists when the later tenure opens):
//! - no two tenures of different incarnations overlap;
//! - every grant's generation is greater than every earlier grant's.

use std::fmt;

/// Which invariant a run broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invariant {
    /// Two incarnations could write the volume at the same real time.
    MutualExclusion,
    /// A grant's generation was not above every earlier grant's.
    GenerationOrder,
    /// The machine broke its own contract with the runtime (two outstanding
    /// I/Os, or asking to be stepped again and again at the same instant).
    MachineContract,
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Invariant::MutualExclusion => "mutual exclusion (two writers at once)",
            Invariant::GenerationOrder => "generations strictly grow",
            Invariant::MachineContract => "lease machine contract",
        })
    }
}

/// A broken invariant, with what the oracle knows about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub invariant: Invariant,
    /// Real time (ms) at which it was detected.
    pub at_ms: u64,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} violated at {} ms: {}",
            self.invariant, self.at_ms, self.detail
        )
    }
}

/// One writer interval.
#[derive(Debug, Clone)]
pub struct Tenure {
    /// Who: `name#incarnation`.
    pub who: String,
    /// Node index and incarnation, to tell incarnations apart.
    pub node: usize,
    pub inc: u32,
    /// Generation granted (`None` for a sabotaged node's fake grant).
    pub generation: Option<u64>,
    pub start: u64,
    /// Final end once known (release, crash, loss).
    pub end: Option<u64>,
    /// End if nothing else happens: `valid_until + fence + io` in real time.
    pub bound: u64,
    /// Why the tenure ended, for messages.
    pub why_end: &'static str,
}

impl Tenure {
    /// The last real ms (exclusive) at which this incarnation may write.
    pub fn effective_end(&self) -> u64 {
        self.end.unwrap_or(self.bound).min(self.bound)
    }
}

/// Tenures and grants of one run.
#[derive(Debug, Default)]
pub struct Oracle {
    tenures: Vec<Tenure>,
    /// Indices of tenures whose end may still be in the future.
    active: Vec<usize>,
    /// Highest generation granted so far, and by whom.
    max_generation: Option<(u64, String)>,
    grants: u64,
}

impl Oracle {
    /// Records a new tenure starting now (`t.start`) and checks it against
    /// every other incarnation's tenure and against earlier generations.
    pub fn open(&mut self, t: Tenure) -> Result<usize, Violation> {
        let now = t.start;
        // A tenure whose end has passed can neither write nor grow again: its
        // holder could only renew at a step before `valid_until`.
        self.active
            .retain(|&i| self.tenures[i].effective_end() > now);
        for &i in &self.active {
            let o = &self.tenures[i];
            if (o.node, o.inc) == (t.node, t.inc) {
                continue;
            }
            if o.effective_end() > now {
                return Err(Violation {
                    invariant: Invariant::MutualExclusion,
                    at_ms: now,
                    detail: format!(
                        "{} was granted {} at {} ms while {} ({}, since {} ms) may write until {} ms ({})",
                        t.who,
                        gen_str(t.generation),
                        now,
                        o.who,
                        gen_str(o.generation),
                        o.start,
                        o.effective_end(),
                        if o.end.is_some() { o.why_end } else { "still holding: valid_until + fence + io" },
                    ),
                });
            }
        }
        if let Some(g) = t.generation {
            self.grants += 1;
            if let Some((max, by)) = &self.max_generation {
                if g <= *max {
                    return Err(Violation {
                        invariant: Invariant::GenerationOrder,
                        at_ms: now,
                        detail: format!(
                            "{} was granted generation {g}, but {by} was granted generation {max} earlier",
                            t.who
                        ),
                    });
                }
            }
            self.max_generation = Some((g, t.who.clone()));
        }
        self.tenures.push(t);
        let i = self.tenures.len() - 1;
        self.active.push(i);
        Ok(i)
    }

    /// The tenure's holder renewed: it now may write until `bound`.
    pub fn extend(&mut self, i: usize, bound: u64) {
        let t = &mut self.tenures[i];
        if t.end.is_none() {
            t.bound = t.bound.max(bound);
        }
    }

    /// The tenure ends at `end` (or its bound, if earlier).
    pub fn close(&mut self, i: usize, end: u64, why: &'static str) {
        let t = &mut self.tenures[i];
        if t.end.is_none() {
            t.end = Some(end.min(t.bound));
            t.why_end = if end < t.bound {
                why
            } else {
                "valid_until + fence + io"
            };
        }
    }

    /// Number of real grants (with a generation) so far.
    pub fn grants(&self) -> u64 {
        self.grants
    }

    /// Whether any tenure is still open.
    pub fn any_open(&self) -> bool {
        self.active.iter().any(|&i| self.tenures[i].end.is_none())
    }
}

fn gen_str(g: Option<u64>) -> String {
    match g {
        Some(g) => format!("generation {g}"),
        None => "a fake grant".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(node: usize, g: u64, start: u64, bound: u64) -> Tenure {
        Tenure {
            who: format!("n{node}"),
            node,
            inc: 0,
            generation: Some(g),
            start,
            end: None,
            bound,
            why_end: "",
        }
    }

    #[test]
    fn overlaps_and_old_generations_are_caught() {
        let mut o = Oracle::default();
        let a = o.open(t(0, 1, 0, 100)).unwrap();
        let e = o.open(t(1, 2, 50, 200)).unwrap_err();
        assert_eq!(e.invariant, Invariant::MutualExclusion);
        o.close(a, 40, "release");
        let b = o.open(t(1, 2, 50, 200)).unwrap();
        o.close(b, 60, "release");
        let e = o.open(t(2, 2, 300, 400)).unwrap_err();
        assert_eq!(e.invariant, Invariant::GenerationOrder);
        o.open(t(2, 3, 300, 400)).unwrap();
        assert_eq!(o.grants(), 4);
    }
}
