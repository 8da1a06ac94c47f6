//! A node's monotonic clock: `local = offset + rate x (real - start)`.
//!
//! Real time is the simulation's time (ms since the run began); local time is
//! what the node's [`LeaseMachine`](crate::core::lease::LeaseMachine) is given.
//! Each incarnation of a node gets its own clock: an arbitrary offset (clocks of
//! different nodes are never comparable, and a restarted process's monotonic
//! clock starts anywhere) and a constant rate error in parts per million, drawn
//! within [`CLOCK_RATE_BOUND_PPM`](crate::core::params::CLOCK_RATE_BOUND_PPM)
//! unless a sabotage asks otherwise. This models crystal drift and NTP slewing;
//! it never jumps or runs backwards (a monotonic clock cannot).

/// One incarnation's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// Real time at which this clock reads `offset`.
    start: u64,
    offset: u64,
    /// Rate error: the clock advances `1 + ppm / 1e6` ms per real ms.
    ppm: i64,
}

impl Clock {
    /// A clock that reads `offset` at real time `start` and then runs at
    /// `1 + ppm / 1e6` ms per real ms (`|ppm| < 1e6`).
    pub fn new(start: u64, offset: u64, ppm: i64) -> Clock {
        assert!(ppm.abs() < 1_000_000, "clock rate error {ppm} ppm");
        Clock { start, offset, ppm }
    }

    /// Rate error in parts per million.
    pub fn ppm(&self) -> i64 {
        self.ppm
    }

    /// Local reading at real time `real` (non-decreasing in `real`).
    pub fn local(&self, real: u64) -> u64 {
        let d = real.saturating_sub(self.start) as i128;
        let drift = (d * self.ppm as i128).div_euclid(1_000_000);
        (self.offset as i128 + d + drift) as u64
    }

    /// The earliest real time at which the clock reads `local` or more
    /// (`start` when it already did at `start`).
    pub fn real_at(&self, local: u64) -> u64 {
        if local <= self.offset {
            return self.start;
        }
        let want = (local - self.offset) as i128;
        let mut d = (want * 1_000_000 / (1_000_000 + self.ppm as i128)) as u64;
        while self.local(self.start + d) < local {
            d += 1;
        }
        while d > 0 && self.local(self.start + d - 1) >= local {
            d -= 1;
        }
        self.start + d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_at_is_the_inverse_of_local() {
        for ppm in [-10_000, -1, 0, 3, 10_000, -200_000] {
            let c = Clock::new(1_000, 1 << 40, ppm);
            let mut prev = 0;
            for real in (1_000..200_000).step_by(997) {
                let l = c.local(real);
                assert!(l >= prev);
                prev = l;
                let r = c.real_at(l);
                assert!(r <= real && c.local(r) >= l, "{ppm} {real} {r}");
                assert!(r == 1_000 || c.local(r - 1) < l);
            }
        }
    }
}
