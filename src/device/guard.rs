//! The stale-I/O guard: can a partitioned node's queued writes outlive the
//! lease takeover?
//!
//! With NVMe/TCP native multipath the kernel keeps a write queued while any
//! controller of the namespace is live, resetting or connecting, and replays it
//! when a path comes back (REFERENCE §5). A fenced node's writes must be dead
//! before a peer may take over, so for each path:
//!
//! ```text
//! detect  = min(2 x kato, io_timeout)        (io_timeout alone if kato = 0)
//! requeue = min(fast_io_fail_tmo,            (if set)
//!               ceil(ctrl_loss_tmo / reconnect_delay) x reconnect_delay)  (if not off)
//! life    = detect + requeue                 (unbounded if both are off)
//! ```
//!
//! and a namespace's queued writes live as long as its longest-lived path
//! (`max` over paths: I/O fails only when no path can take it). The budget is
//! the time between the latest moment the node may still hand a write to the
//! device (the end of its fence) and the earliest takeover by a peer, both in
//! real time with the clock-rate bound `r` of [`crate::core::params`]:
//!
//! ```text
//! budget = floor(host_dead / (1 + r)) - ceil((lease_timeout + fence_timeout) / (1 - r))
//! ```
//!
//! (≥ io_timeout by the construction of host_dead; 1,027 ms with the default
//! parameters.) The volume passes if `life <= budget` on every path. The fix
//! is a `fast_io_fail_tmo` small enough, and when detection alone exceeds the
//! budget, larger lease parameters. Pure arithmetic in [`path_lifetime`],
//! [`budget_ms`], [`evaluate`]; the one write is [`apply_fast_io_fail`].
//! docs/DEVICES.md shows the same arithmetic with numbers.

use super::discovery::{read_namespace, CtrlTimeouts, Namespace, Tmo};
use super::DeviceError;
use crate::core::params::{Params, CLOCK_RATE_BOUND_PPM};
use serde::Serialize;
use std::path::Path;

/// What the daemon does with a failing volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Do not take the lease on this volume (no writer starts).
    Refuse,
    /// Log the verdict and the fix, carry on (the daemon grants only where
    /// NVMe reservations then refuse a fenced node's queued writes).
    Warn,
    /// Write the computed `fast_io_fail_tmo` to each failing controller, then
    /// re-check; refuse if it still fails.
    SetFastIoFail,
}

/// How long writes queued on one path can live, in ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Lifetime {
    Bounded {
        ms: u64,
        detect_ms: u64,
        requeue_ms: u64,
        /// What ends the requeueing: `fast_io_fail_tmo`, `ctrl_loss_tmo`, or
        /// `none` (not a fabrics controller: nothing is requeued).
        by: &'static str,
    },
    /// `ctrl_loss_tmo` and `fast_io_fail_tmo` both off: forever.
    Unbounded,
}

impl Lifetime {
    pub fn ms(&self) -> Option<u64> {
        match self {
            Lifetime::Bounded { ms, .. } => Some(*ms),
            Lifetime::Unbounded => None,
        }
    }
}

/// Detection time of a dead path: keep-alive (the host's keep-alive command
/// times out after kato, sent every kato) or the I/O timeout, whichever is first.
pub fn detect_ms(t: &CtrlTimeouts, io_timeout_ms: u64) -> u64 {
    let io = t.path_io_timeout_ms.unwrap_or(io_timeout_ms);
    match t.kato_s {
        Some(k) if k > 0 => (2 * u64::from(k) * 1000).min(io),
        _ => io,
    }
}

/// The lifetime of writes queued on a path with these timeouts.
pub fn path_lifetime(t: &CtrlTimeouts, io_timeout_ms: u64) -> Lifetime {
    let detect = detect_ms(t, io_timeout_ms);
    let fast = match t.fast_io_fail_tmo {
        Tmo::Seconds(s) => Some((u64::from(s) * 1000, "fast_io_fail_tmo")),
        _ => None,
    };
    let loss = match t.ctrl_loss_tmo {
        Tmo::Seconds(s) => {
            let d = u64::from(t.reconnect_delay_s.unwrap_or(10).max(1));
            Some((u64::from(s).div_ceil(d) * d * 1000, "ctrl_loss_tmo"))
        }
        Tmo::Missing => Some((0, "none")),
        Tmo::Off => None,
    };
    let requeue = match (fast, loss) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    };
    match requeue {
        Some((ms, by)) => Lifetime::Bounded {
            ms: detect + ms,
            detect_ms: detect,
            requeue_ms: ms,
            by,
        },
        None => Lifetime::Unbounded,
    }
}

/// The time a fenced node's queued write may live without overlapping a
/// peer's takeover, in ms (see the module docs).
pub fn budget_ms(p: &Params) -> u64 {
    let ppm = CLOCK_RATE_BOUND_PPM;
    let takeover = p.host_dead_ms() * 1_000_000 / (1_000_000 + ppm);
    let fence_end = (u64::from(p.lease_timeout_ms) + u64::from(p.fence_timeout_ms)) * 1_000_000;
    let fence_end = fence_end.div_ceil(1_000_000 - ppm);
    takeover.saturating_sub(fence_end)
}

/// The smallest lease parameters (io_timeout raised in 100 ms steps, the lease
/// timeout raised with it where its minimum requires) whose budget covers
/// `life_ms`; `None` if no valid parameters do.
pub fn params_covering(p: &Params, life_ms: u64) -> Option<Params> {
    (1..=600u32)
        .map(|i| i * 100)
        .filter(|&io| io >= p.io_timeout_ms)
        .find_map(|io| {
            let q = Params {
                io_timeout_ms: io,
                lease_timeout_ms: p.lease_timeout_ms.max(2 * p.renew_interval_ms + io),
                ..*p
            };
            (q.validate().is_ok() && budget_ms(&q) >= life_ms).then_some(q)
        })
}

/// The verdict for one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PathVerdict {
    pub controller: String,
    pub lifetime: Lifetime,
    pub pass: bool,
    /// The `fast_io_fail_tmo` (s) to set on this failing path (`None` if it
    /// passes or already has one this low); the path may still fail after it
    /// when detection alone exceeds the budget (then the fixes say so).
    pub fast_io_fail_fix_s: Option<u32>,
}

/// The verdict for one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub volume: String,
    pub pass: bool,
    pub budget_ms: u64,
    /// The longest lifetime over the paths (`None` = unbounded).
    pub lifetime_ms: Option<u64>,
    pub paths: Vec<PathVerdict>,
    /// Exact commands and settings that make the volume pass.
    pub fixes: Vec<String>,
}

/// Evaluates a namespace against the lease parameters `p`.
pub fn evaluate(ns: &Namespace, p: &Params) -> Verdict {
    let budget = budget_ms(p);
    let mut paths = Vec::new();
    let mut fixes = Vec::new();
    let mut worst_after_fix = 0u64;
    for path in &ns.paths {
        let life = path_lifetime(&path.timeouts, ns.io_timeout_ms);
        let pass = life.ms().is_some_and(|ms| ms <= budget);
        let detect = detect_ms(&path.timeouts, ns.io_timeout_ms);
        let fix = if pass {
            None
        } else {
            let s = (budget.saturating_sub(detect) / 1000) as u32;
            let current = match path.timeouts.fast_io_fail_tmo {
                Tmo::Seconds(c) => Some(c),
                _ => None,
            };
            // With fast_io_fail_tmo already this low, only detection is left.
            let s = current.map_or(s, |c| c.min(s));
            worst_after_fix = worst_after_fix.max(detect + u64::from(s) * 1000);
            if current.map_or(true, |c| c > s) {
                fixes.push(format!(
                    "echo {s} > /sys/class/nvme/{c}/fast_io_fail_tmo   # now, until the controller is re-created",
                    c = path.controller
                ));
                Some(s)
            } else {
                None
            }
        };
        paths.push(PathVerdict {
            controller: path.controller.clone(),
            lifetime: life,
            pass,
            fast_io_fail_fix_s: fix,
        });
    }
    let pass = paths.iter().all(|v| v.pass);
    if !pass {
        if let Some(s) = paths.iter().filter_map(|v| v.fast_io_fail_fix_s).min() {
            fixes.push(format!(
                "connect with `nvme connect ... --fast_io_fail_tmo={s}` (or `fast_io_fail_tmo={s}` in the connect configuration) so it survives a reconnect and reboot"
            ));
        }
        if worst_after_fix > budget {
            let cover = params_covering(p, worst_after_fix);
            fixes.push(format!(
                "detecting a dead path alone takes up to {worst_after_fix} ms (2 x kato or the I/O timeout) > budget {budget} ms: {}",
                match cover {
                    Some(q) => format!(
                        "raise the volume's lease parameters to --io-timeout-ms {} --lease-timeout-ms {} (`blockfence format`; takeover after {} ms instead of {} ms), or shorten detection with `nvme connect ... --keep-alive-tmo=1` and a lower /sys/block/{}/queue/io_timeout",
                        q.io_timeout_ms,
                        q.lease_timeout_ms,
                        q.host_dead_ms(),
                        p.host_dead_ms(),
                        ns.name
                    ),
                    None => format!(
                        "shorten detection with `nvme connect ... --keep-alive-tmo=1` and a lower /sys/block/{}/queue/io_timeout; no valid lease parameters cover it",
                        ns.name
                    ),
                }
            ));
        }
    }
    let lifetime_ms = paths
        .iter()
        .map(|v| v.lifetime.ms())
        .try_fold(0u64, |acc, m| m.map(|m| acc.max(m)));
    Verdict {
        volume: ns.name.clone(),
        pass,
        budget_ms: budget,
        lifetime_ms,
        paths,
        fixes,
    }
}

/// Writes `seconds` to `root/class/nvme/<controller>/fast_io_fail_tmo`.
pub fn apply_fast_io_fail(root: &Path, controller: &str, seconds: u32) -> Result<(), DeviceError> {
    let path = root
        .join("class/nvme")
        .join(controller)
        .join("fast_io_fail_tmo");
    let value = seconds.to_string();
    std::fs::write(&path, &value).map_err(|source| DeviceError::Write {
        path: path.clone(),
        value: value.clone(),
        source,
    })?;
    tracing::warn!(controller, seconds, path = %path.display(), "set fast_io_fail_tmo (stale-I/O guard)");
    Ok(())
}

/// The outcome of [`enforce`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// The volume passes (possibly after setting fast_io_fail_tmo).
    Proceed {
        verdict: Verdict,
        applied: Vec<(String, u32)>,
    },
    /// It fails; the policy says carry on (the verdict is logged).
    Warned { verdict: Verdict },
    /// It fails; do not take the lease.
    Refused {
        verdict: Verdict,
        applied: Vec<(String, u32)>,
    },
}

/// Runs the guard for the namespace `ns_name` under `root` with `policy`.
pub fn enforce(
    root: &Path,
    ns_name: &str,
    p: &Params,
    policy: Policy,
) -> Result<Decision, DeviceError> {
    let ns = read_namespace(root, ns_name)?;
    let verdict = evaluate(&ns, p);
    if verdict.pass {
        return Ok(Decision::Proceed {
            verdict,
            applied: Vec::new(),
        });
    }
    match policy {
        Policy::Warn => {
            tracing::warn!(volume = ns_name, fixes = ?verdict.fixes, "stale-I/O guard: queued writes may outlive the takeover");
            Ok(Decision::Warned { verdict })
        }
        Policy::Refuse => Ok(Decision::Refused {
            verdict,
            applied: Vec::new(),
        }),
        Policy::SetFastIoFail => {
            let mut applied = Vec::new();
            for v in verdict.paths.iter().filter(|v| !v.pass) {
                if let Some(s) = v.fast_io_fail_fix_s {
                    apply_fast_io_fail(root, &v.controller, s)?;
                    applied.push((v.controller.clone(), s));
                }
            }
            let after = evaluate(&read_namespace(root, ns_name)?, p);
            Ok(if after.pass {
                Decision::Proceed {
                    verdict: after,
                    applied,
                }
            } else {
                Decision::Refused {
                    verdict: after,
                    applied,
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(kato: u32, loss: Tmo, delay: u32, fast: Tmo) -> CtrlTimeouts {
        CtrlTimeouts {
            kato_s: Some(kato),
            ctrl_loss_tmo: loss,
            reconnect_delay_s: Some(delay),
            fast_io_fail_tmo: fast,
            path_io_timeout_ms: None,
        }
    }

    #[test]
    fn default_budget_is_about_one_second() {
        // floor(9200 / 1.01) - ceil(8000 / 0.99) = 9108 - 8081
        assert_eq!(budget_ms(&Params::default()), 1_027);
        assert!(budget_ms(&Params::default()) >= u64::from(Params::default().io_timeout_ms));
    }

    #[test]
    fn kernel_defaults_keep_writes_ten_minutes() {
        // kato 5, ctrl_loss_tmo 600, reconnect_delay 10, fast_io_fail off, io_timeout 30 s
        let l = path_lifetime(&t(5, Tmo::Seconds(600), 10, Tmo::Off), 30_000);
        assert_eq!(
            l,
            Lifetime::Bounded {
                ms: 610_000,
                detect_ms: 10_000,
                requeue_ms: 600_000,
                by: "ctrl_loss_tmo"
            }
        );
        assert_eq!(
            path_lifetime(&t(5, Tmo::Off, 10, Tmo::Off), 30_000),
            Lifetime::Unbounded
        );
        // ctrl_loss_tmo rounds up to whole reconnect delays.
        assert_eq!(
            path_lifetime(&t(0, Tmo::Seconds(25), 10, Tmo::Off), 2_000).ms(),
            Some(32_000)
        );
        // fast_io_fail ends it sooner, also with ctrl_loss_tmo off.
        assert_eq!(
            path_lifetime(&t(1, Tmo::Off, 10, Tmo::Seconds(0)), 30_000).ms(),
            Some(2_000)
        );
        // Not fabrics: nothing requeued beyond the timeout.
        let pcie = CtrlTimeouts::default();
        assert_eq!(path_lifetime(&pcie, 30_000).ms(), Some(30_000));
    }

    #[test]
    fn covering_params_have_a_budget_that_covers() {
        let p = Params::default();
        let q = params_covering(&p, 10_000).unwrap();
        assert!(budget_ms(&q) >= 10_000);
        q.validate().unwrap();
        let smaller = Params {
            io_timeout_ms: q.io_timeout_ms - 100,
            lease_timeout_ms: p
                .lease_timeout_ms
                .max(2 * p.renew_interval_ms + q.io_timeout_ms - 100),
            ..p
        };
        assert!(budget_ms(&smaller) < 10_000);
        assert_eq!(params_covering(&p, 10_000_000), None);
    }
}
