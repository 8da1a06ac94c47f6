//! Timing parameters of the lease, and every timeout derived from them.
//!
//! A node records its four parameters in its slot (and the holder in the owner
//! record), so a contender computes its waits from the *holder's* values, never its
//! own. All derived values are here, in one place, and docs/PROTOCOL.md shows the
//! same arithmetic. Pure: no clocks, no I/O.

use serde::Serialize;

/// Bound on how far any node's monotonic clock rate may differ from real time,
/// in parts per million (1% = 10,000 ppm). Quartz clocks are within 100 ppm; NTP
/// slews at most 500 ppm. The simulation draws clock rates within this bound.
pub const CLOCK_RATE_BOUND_PPM: u64 = 10_000;

/// Default deadline of one lease read or write, in ms.
pub const DEFAULT_IO_TIMEOUT_MS: u32 = 1_000;
/// Default time between two renewals by the holder, in ms.
pub const DEFAULT_RENEW_INTERVAL_MS: u32 = 1_000;
/// Default lease validity after the start of the last successful renewal, in ms.
pub const DEFAULT_LEASE_TIMEOUT_MS: u32 = 5_000;
/// Default time the holder's fence may take after its lease expires, in ms.
pub const DEFAULT_FENCE_TIMEOUT_MS: u32 = 3_000;

/// The recorded timing parameters of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Params {
    /// Deadline of every lease read and write; an I/O that completes later
    /// counts as failed. Also the bound on how long a data write issued before
    /// the fence may take to land (checked against the device by `doctor`).
    pub io_timeout_ms: u32,
    /// Time between the starts of two renewals.
    pub renew_interval_ms: u32,
    /// The holder may write the volume until `lease_timeout` after the start of
    /// its last renewal that completed within `io_timeout`; then it fences.
    pub lease_timeout_ms: u32,
    /// Time the fence (shutdown, kill, unmount; else the watchdog) may take
    /// after the lease expired.
    pub fence_timeout_ms: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            io_timeout_ms: DEFAULT_IO_TIMEOUT_MS,
            renew_interval_ms: DEFAULT_RENEW_INTERVAL_MS,
            lease_timeout_ms: DEFAULT_LEASE_TIMEOUT_MS,
            fence_timeout_ms: DEFAULT_FENCE_TIMEOUT_MS,
        }
    }
}

/// A parameter set that cannot be used safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    #[error("io_timeout must be between 10 ms and 60 s (got {0} ms)")]
    IoTimeout(u32),
    #[error("renew_interval must be between 10 ms and 60 s (got {0} ms)")]
    RenewInterval(u32),
    #[error(
        "lease_timeout ({lease} ms) must be at least 2 x renew_interval + io_timeout ({min} ms), \
         so that one renewal may fail without losing the lease"
    )]
    LeaseTooShort { lease: u32, min: u32 },
    #[error("lease_timeout must be at most 10 minutes (got {0} ms)")]
    LeaseTooLong(u32),
    #[error("fence_timeout must be between 100 ms and 10 minutes (got {0} ms)")]
    FenceTimeout(u32),
}

impl Params {
    /// Checks the parameters are usable.
    pub fn validate(&self) -> Result<(), ParamsError> {
        if !(10..=60_000).contains(&self.io_timeout_ms) {
            return Err(ParamsError::IoTimeout(self.io_timeout_ms));
        }
        if !(10..=60_000).contains(&self.renew_interval_ms) {
            return Err(ParamsError::RenewInterval(self.renew_interval_ms));
        }
        let min = 2 * self.renew_interval_ms + self.io_timeout_ms;
        if self.lease_timeout_ms < min {
            return Err(ParamsError::LeaseTooShort {
                lease: self.lease_timeout_ms,
                min,
            });
        }
        if self.lease_timeout_ms > 600_000 {
            return Err(ParamsError::LeaseTooLong(self.lease_timeout_ms));
        }
        if !(100..=600_000).contains(&self.fence_timeout_ms) {
            return Err(ParamsError::FenceTimeout(self.fence_timeout_ms));
        }
        Ok(())
    }

    /// How long a peer must see this node's slot unchanged, on the peer's own
    /// monotonic clock, before it may treat the node as dead and take over:
    ///
    /// `host_dead = ceil((lease_timeout + fence_timeout + io_timeout) x (1+r)/(1-r))`
    ///
    /// rounded up to the next 100 ms, with `r` = [`CLOCK_RATE_BOUND_PPM`]. See
    /// docs/PROTOCOL.md, "Why host_dead is long enough".
    pub fn host_dead_ms(&self) -> u64 {
        let sum =
            self.lease_timeout_ms as u64 + self.fence_timeout_ms as u64 + self.io_timeout_ms as u64;
        let num = sum * (1_000_000 + CLOCK_RATE_BOUND_PPM);
        let den = 1_000_000 - CLOCK_RATE_BOUND_PPM;
        let ms = num.div_ceil(den);
        ms.div_ceil(100) * 100
    }

    /// Interval between two reads of the area by a node waiting for the lease.
    pub fn poll_interval_ms(&self) -> u64 {
        (self.renew_interval_ms as u64 / 2).max(5)
    }

    /// The ext4 MMP update interval (seconds) that suits these parameters: the
    /// kernel rewrites the MMP block at least twice within `host_dead`.
    pub fn mmp_update_interval_s(&self) -> u16 {
        ((self.host_dead_ms() / 2_000) as u16).clamp(1, 300)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_host_dead_is_about_ten_seconds() {
        let p = Params::default();
        p.validate().unwrap();
        // (5000 + 3000 + 1000) * 1.01/0.99 = 9181.8 -> 9200 ms.
        assert_eq!(p.host_dead_ms(), 9_200);
        assert_eq!(p.mmp_update_interval_s(), 4);
    }

    #[test]
    fn host_dead_covers_the_holders_whole_fence_at_the_worst_clock_rates() {
        for p in [
            Params::default(),
            Params {
                io_timeout_ms: 10,
                renew_interval_ms: 10,
                lease_timeout_ms: 30,
                fence_timeout_ms: 100,
            },
            Params {
                io_timeout_ms: 60_000,
                renew_interval_ms: 60_000,
                lease_timeout_ms: 600_000,
                fence_timeout_ms: 600_000,
            },
        ] {
            p.validate().unwrap();
            // The holder's fence ends, in real time, by (lease + fence + io) / (1 - r)
            // after the start of its last renewal; the fastest peer has seen the slot
            // unchanged for host_dead on its clock no earlier than host_dead / (1 + r).
            let r = CLOCK_RATE_BOUND_PPM as f64 / 1e6;
            let fence_end =
                (p.lease_timeout_ms + p.fence_timeout_ms + p.io_timeout_ms) as f64 / (1.0 - r);
            let takeover = p.host_dead_ms() as f64 / (1.0 + r);
            assert!(takeover >= fence_end, "{p:?}: {takeover} < {fence_end}");
        }
    }

    #[test]
    fn unsafe_parameters_are_refused() {
        let p = Params {
            lease_timeout_ms: 2_000,
            ..Params::default()
        };
        assert!(matches!(
            p.validate(),
            Err(ParamsError::LeaseTooShort { .. })
        ));
        let p = Params {
            io_timeout_ms: 0,
            ..Params::default()
        };
        assert!(p.validate().is_err());
        let p = Params {
            fence_timeout_ms: 0,
            ..Params::default()
        };
        assert!(p.validate().is_err());
    }
}
