//! When the node's watchdog may be fed: a pure policy.
//!
//! The watchdog is the fence of last resort. It covers what the daemon cannot
//! do itself: a daemon that is stopped (SIGSTOP, frozen cgroup), a fence step
//! hung in the kernel, kernel writeback of a node whose processes are frozen.
//! The rule that makes it safe:
//!
//! > feed only while, for every volume this node may be writing,
//! > `now + watchdog_timeout <= valid_until + fence_timeout`.
//!
//! So if the daemon stops feeding at any instant (it stalls, or a fence
//! fails), the last feed `f` satisfies `f + watchdog_timeout <= valid_until +
//! fence_timeout`, and the reset lands no later than the end of the fence
//! window, the instant a peer may count on (docs/PROTOCOL.md, host_dead). A
//! volume whose fence finished in time is no longer being written and stops
//! counting; a fence that failed starves the watchdog for good.
//!
//! Consequence: `watchdog_timeout <= fence_timeout` is required (else the
//! daemon could never feed while holding a lease that is about to be renewed);
//! with `watchdog_timeout == fence_timeout` the daemon feeds exactly while
//! every lease it writes under is valid.
//!
//! Pure: the runtime passes its monotonic time and every volume's state.

/// A point on the node's own monotonic clock, in milliseconds.
pub type Millis = u64;

/// One volume, as the watchdog policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// This node does not write the volume (never granted, released, or
    /// fenced in time).
    NotWriting,
    /// This node may write the volume until `valid_until` and must have
    /// fenced by `valid_until + fence_timeout_ms`.
    Writing {
        valid_until: Millis,
        fence_timeout_ms: Millis,
    },
    /// A fence failed or was late: the node must be reset.
    FenceFailed,
}

/// Whether the watchdog may be fed at `now`.
pub fn may_feed<'a>(
    now: Millis,
    watchdog_timeout_ms: Millis,
    guards: impl IntoIterator<Item = &'a Guard>,
) -> bool {
    guards.into_iter().all(|g| match *g {
        Guard::NotWriting => true,
        Guard::Writing {
            valid_until,
            fence_timeout_ms,
        } => {
            now.saturating_add(watchdog_timeout_ms) <= valid_until.saturating_add(fence_timeout_ms)
        }
        Guard::FenceFailed => false,
    })
}

/// Why a watchdog timeout cannot be used with a volume's fence budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the watchdog timeout ({watchdog_ms} ms) must not exceed the fence timeout \
     ({fence_ms} ms): the reset must land within the fence window"
)]
pub struct TimeoutTooLong {
    pub watchdog_ms: Millis,
    pub fence_ms: Millis,
}

/// Checks `watchdog_timeout <= fence_timeout`.
pub fn check_timeout(watchdog_ms: Millis, fence_ms: Millis) -> Result<(), TimeoutTooLong> {
    if watchdog_ms > fence_ms {
        return Err(TimeoutTooLong {
            watchdog_ms,
            fence_ms,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn feeds_while_leases_run_and_never_after_a_failed_fence() {
        let w = Guard::Writing {
            valid_until: 10_000,
            fence_timeout_ms: 3_000,
        };
        assert!(may_feed(0, 3_000, &[Guard::NotWriting, w]));
        assert!(may_feed(10_000, 3_000, &[w]));
        assert!(!may_feed(10_001, 3_000, &[w]));
        assert!(may_feed(11_000, 2_000, &[w]));
        assert!(!may_feed(0, 3_000, &[w, Guard::FenceFailed]));
        assert!(may_feed(u64::MAX, 3_000, &[]));
    }

    #[test]
    fn the_timeout_must_fit_the_fence_window() {
        assert!(check_timeout(3_000, 3_000).is_ok());
        assert_eq!(
            check_timeout(3_001, 3_000),
            Err(TimeoutTooLong {
                watchdog_ms: 3_001,
                fence_ms: 3_000
            })
        );
    }

    proptest! {
        /// Whatever the feeding schedule, the reset that follows the last
        /// feed lands within every written volume's fence window.
        #[test]
        fn a_reset_after_the_last_feed_lands_in_the_fence_window(
            feeds in proptest::collection::vec(0u64..20_000, 1..50),
            valid_until in 0u64..20_000,
            fence in 100u64..5_000,
            wd_frac in 1u64..=100,
        ) {
            let wd = (fence * wd_frac / 100).max(1);
            let g = [Guard::Writing { valid_until, fence_timeout_ms: fence }];
            let last = feeds.iter().copied().filter(|&t| may_feed(t, wd, &g)).max();
            if let Some(last) = last {
                prop_assert!(last + wd <= valid_until + fence);
            }
        }
    }
}
