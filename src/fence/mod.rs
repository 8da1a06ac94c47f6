//! Carrying out the fence on this node: the shell around
//! [`crate::core::fence::FenceMachine`].
//!
//! [`run_fence`] feeds the machine this node's monotonic time and the step
//! results, runs each step it asks for on its own thread (so a hung step never
//! stops the machine from trying the next one or from starving the watchdog),
//! feeds the [`Watchdog`] every [`FEED_INTERVAL`] until the machine says
//! starve, and returns a [`FenceReport`] when the machine is done.
//!
//! The steps, behind [`FenceOps`] (the real one is [`SystemOps`]; tests use
//! [`fake::RecordingOps`]):
//! 1. **shutdown**: `EXT4_IOC_SHUTDOWN` with `NOLOGFLUSH` ([`crate::ext4::shutdown`]):
//!    it writes nothing more and does not wait on the device; every later write
//!    through the filesystem fails with EIO.
//! 2. **kill holders**: SIGKILL every process with a file, cwd, root or mapping
//!    on the filesystem, repeated until a scan finds none ([`holders`]). Never
//!    PID 1 or this process.
//! 3. **unmount**: a normal `umount2(mount, 0)`. After shutdown and kill nothing
//!    holds the mount, so it succeeds; if it reports EBUSY anyway, one more
//!    kill round and a second try; if that fails too the mount is detached
//!    (`MNT_DETACH`, so no new process can reach it by path) but the step still
//!    *fails*, because a detached filesystem may still have holders: the
//!    watchdog is starved. A mount already gone counts as unmounted.
//!
//! What this module must not do: decide anything the machine decides (order,
//! deadlines, when to starve), or feed the watchdog after a starve.

pub mod device;
pub mod fake;
pub mod holders;
pub mod watchdog;

use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::core::fence::{
    FenceAction, FenceInput, FenceMachine, Millis, StarveReason, Step, StepReport,
};
use crate::ext4::{Ext4Error, ShutdownMode};
pub use watchdog::{FileWatchdog, Watchdog};

/// Longest time between two watchdog feeds while fencing (not starved).
pub const FEED_INTERVAL: Duration = Duration::from_millis(100);

/// Why a fence step failed.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("shutting the filesystem down failed: {0}")]
    Shutdown(#[from] Ext4Error),
    #[error("{}: reading /proc failed: {source}", path.display())]
    Proc {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a mount point (per /proc/self/mountinfo)", mount.display())]
    NotMounted { mount: PathBuf },
    #[error("processes {pids:?} still hold the filesystem after SIGKILL (uninterruptible sleep?)")]
    StillHeld { pids: Vec<i32> },
    #[error("{}: umount failed: {source}{}", mount.display(),
        if *detached { " (detached it with MNT_DETACH; holders may remain)" } else { "" })]
    Unmount {
        mount: PathBuf,
        source: nix::errno::Errno,
        detached: bool,
    },
    #[error("{}: still in use after every mount of it in every namespace was unmounted \
        (an exclusive open fails with EBUSY): a lazily detached filesystem, a mount namespace \
        with no process left, or another exclusive user", device.display())]
    DeviceBusy { device: PathBuf },
    #[error("the fake was told to fail {step:?}")]
    Fake { step: Step },
}

/// What a fence is for: a mount point (`blockfence run`'s own mount), or a
/// block device (the daemon: every mount of it in every namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceTarget {
    /// The mount point, or the device node.
    pub path: PathBuf,
    /// The device number of a device target, known from when it was opened:
    /// the fence still finds its mounts after the device node went away.
    pub dev: Option<u64>,
    /// The device's `diskseq` when it was opened (Linux 5.15+), to tell a
    /// device number given to another disk since then: that number then
    /// holds nothing of ours, and the fence must not touch its users.
    pub diskseq: Option<u64>,
}

impl FenceTarget {
    /// A mount point.
    pub fn mount(path: impl Into<PathBuf>) -> FenceTarget {
        FenceTarget {
            path: path.into(),
            dev: None,
            diskseq: None,
        }
    }

    /// A block device at `path` with device number `dev` and, if known, the
    /// `diskseq` it had when it was opened ([`device::diskseq`]).
    pub fn device(path: impl Into<PathBuf>, dev: u64, diskseq: Option<u64>) -> FenceTarget {
        FenceTarget {
            path: path.into(),
            dev: Some(dev),
            diskseq,
        }
    }
}

/// The operations of the fence, on one target of this node: a mount point
/// ([`SystemOps`]) or a block device ([`device::DeviceOps`]).
pub trait FenceOps: Send + Sync {
    /// Stops all writes through the target's filesystem.
    fn shutdown(&self, target: &FenceTarget) -> Result<(), FenceError>;
    /// SIGKILLs every process holding the target; returns their pids.
    fn kill_holders(&self, target: &FenceTarget) -> Result<Vec<i32>, FenceError>;
    /// Unmounts the target.
    fn unmount(&self, target: &FenceTarget) -> Result<(), FenceError>;
}

/// The real operations: ioctl, /proc, signals, umount2.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemOps;

impl FenceOps for SystemOps {
    fn shutdown(&self, target: &FenceTarget) -> Result<(), FenceError> {
        let mount = target.path.as_path();
        crate::ext4::shutdown(mount, ShutdownMode::NoLogFlush)?;
        Ok(())
    }

    fn kill_holders(&self, target: &FenceTarget) -> Result<Vec<i32>, FenceError> {
        let mount = target.path.as_path();
        let m = holders::find_mount(mount)?.ok_or_else(|| FenceError::NotMounted {
            mount: mount.to_path_buf(),
        })?;
        holders::kill_all(&m)
    }

    fn unmount(&self, target: &FenceTarget) -> Result<(), FenceError> {
        use nix::mount::{umount2, MntFlags};
        let mount = target.path.as_path();
        let Some(m) = holders::find_mount(mount)? else {
            return Ok(());
        };
        let err = match umount2(mount, MntFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) => {
                // A holder appeared after the kill step: one more round.
                let _ = holders::kill_all(&m);
                match umount2(mount, MntFlags::empty()) {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        let detached =
            err == nix::errno::Errno::EBUSY && umount2(mount, MntFlags::MNT_DETACH).is_ok();
        Err(FenceError::Unmount {
            mount: mount.to_path_buf(),
            source: err,
            detached,
        })
    }
}

/// What a fence did, for events and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct FenceReport {
    /// Every step succeeded by its deadline.
    pub ok: bool,
    /// Why the watchdog was starved, if it was.
    pub starved: Option<StarveReason>,
    /// When it was starved, in ms after the start.
    pub starved_ms: Option<Millis>,
    /// Per step (times in ms after the start).
    pub steps: [StepReport; 3],
    /// Per step, the error of a step that failed.
    pub errors: [Option<String>; 3],
    /// The pids the kill step killed.
    pub killed: Vec<i32>,
    /// From the start to Done.
    pub duration_ms: f64,
}

type StepResult = (Step, Result<Vec<i32>, FenceError>);

fn spawn_step<O: FenceOps + 'static>(
    ops: &Arc<O>,
    target: &FenceTarget,
    step: Step,
    tx: &mpsc::Sender<StepResult>,
) {
    let (ops, mount, results) = (Arc::clone(ops), target.clone(), tx.clone());
    let name = format!("fence-{step:?}").to_lowercase();
    let run = move || {
        let res = match step {
            Step::Shutdown => ops.shutdown(&mount).map(|()| Vec::new()),
            Step::KillHolders => ops.kill_holders(&mount),
            Step::Unmount => ops.unmount(&mount).map(|()| Vec::new()),
        };
        // The driver may be gone (fence over): the result is then of no use.
        let _ = results.send((step, res));
    };
    if let Err(e) = std::thread::Builder::new().name(name).spawn(run) {
        // Without a thread the step cannot run: report it failed.
        let _ = tx.send((
            step,
            Err(FenceError::Proc {
                path: PathBuf::from("/proc/self/task"),
                source: e,
            }),
        ));
    }
}

/// Fences `target`: runs the machine with this node's monotonic clock until
/// it is done, which is by `deadline` at the latest (plus scheduling delay).
/// Steps still hung at the end are left running on their threads.
pub fn run_fence<O: FenceOps + 'static>(
    ops: Arc<O>,
    watchdog: &mut dyn Watchdog,
    target: &FenceTarget,
    deadline: Instant,
) -> FenceReport {
    let mount = target.path.as_path();
    let base = Instant::now();
    let ms = |t: Instant| t.saturating_duration_since(base).as_millis() as Millis;
    let (tx, rx) = mpsc::channel::<StepResult>();
    let mut machine = FenceMachine::new();
    let mut timer: Option<Millis> = None;
    let mut last_feed: Option<Instant> = None;
    let mut errors: [Option<String>; 3] = [None, None, None];
    let mut killed = Vec::new();
    let mut starved = None;
    let mut starved_ms = None;
    let mut actions = machine.step(
        0,
        FenceInput::Start {
            deadline_ms: ms(deadline),
        },
    );
    loop {
        for action in actions.drain(..) {
            match action {
                FenceAction::Shutdown | FenceAction::KillHolders | FenceAction::Unmount => {
                    let step = action.step().expect("a step action");
                    tracing::info!(mount = %mount.display(), ?step, "fence step");
                    spawn_step(&ops, target, step, &tx);
                }
                FenceAction::ArmTimer(at) => timer = Some(at),
                FenceAction::WatchdogStarve(reason) => {
                    tracing::error!(mount = %mount.display(), ?reason, "fence: starving the watchdog");
                    watchdog.starve();
                    starved = Some(reason);
                    starved_ms = Some(ms(Instant::now()));
                }
                FenceAction::Done { ok, steps } => {
                    return FenceReport {
                        ok,
                        starved,
                        starved_ms,
                        steps,
                        errors,
                        killed,
                        duration_ms: base.elapsed().as_secs_f64() * 1e3,
                    };
                }
            }
        }
        let now = Instant::now();
        if !watchdog.is_starved() && last_feed.map_or(true, |t| now >= t + FEED_INTERVAL) {
            if let Err(e) = watchdog.feed() {
                tracing::warn!(error = %e, "feeding the watchdog failed");
            }
            last_feed = Some(now);
        }
        let mut wake = base + Duration::from_millis(timer.unwrap_or_else(|| ms(deadline)));
        if !watchdog.is_starved() {
            wake = wake.min(last_feed.unwrap_or(now) + FEED_INTERVAL);
        }
        let input = match rx.recv_timeout(wake.saturating_duration_since(now)) {
            Ok((step, res)) => {
                let ok = res.is_ok();
                match res {
                    Ok(pids) => killed.extend(pids),
                    Err(e) => {
                        tracing::error!(mount = %mount.display(), ?step, error = %e, "fence step failed");
                        errors[step.index()] = Some(e.to_string());
                    }
                }
                FenceInput::StepDone { step, ok }
            }
            // `tx` is held here, so the channel cannot disconnect.
            Err(_) => FenceInput::Tick,
        };
        actions = machine.step(ms(Instant::now()), input);
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{Behavior, RecordingOps};
    use super::*;

    /// A watchdog that records when it was fed.
    #[derive(Default)]
    struct Recorder {
        feeds: Vec<Instant>,
        starved: bool,
    }

    impl Watchdog for Recorder {
        fn feed(&mut self) -> std::io::Result<()> {
            assert!(!self.starved, "fed after a starve");
            self.feeds.push(Instant::now());
            Ok(())
        }
        fn starve(&mut self) {
            self.starved = true;
        }
        fn is_starved(&self) -> bool {
            self.starved
        }
    }

    #[test]
    fn all_steps_succeed_in_order_and_the_watchdog_is_fed() {
        let ops = Arc::new(RecordingOps::new([Behavior::Succeed; 3]));
        let mut w = Recorder::default();
        let start = Instant::now();
        let r = run_fence(
            ops.clone(),
            &mut w,
            &FenceTarget::mount("/mnt/x"),
            start + Duration::from_secs(5),
        );
        assert!(r.ok, "{r:?}");
        assert!(r.starved.is_none());
        let calls: Vec<Step> = ops.calls().iter().map(|c| c.step).collect();
        assert_eq!(calls, crate::core::fence::STEPS.to_vec());
        assert!(ops
            .calls()
            .iter()
            .all(|c| c.mount == std::path::Path::new("/mnt/x")));
        assert!(!w.feeds.is_empty() && !w.starved);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "did not wait for the deadline"
        );
    }

    #[test]
    fn a_failing_step_starves_and_the_rest_still_run() {
        let ops = Arc::new(RecordingOps::new([
            Behavior::Fail,
            Behavior::Succeed,
            Behavior::Succeed,
        ]));
        let mut w = Recorder::default();
        let r = run_fence(
            ops.clone(),
            &mut w,
            &FenceTarget::mount("/mnt/x"),
            Instant::now() + Duration::from_secs(5),
        );
        assert!(!r.ok);
        assert!(matches!(
            r.starved,
            Some(StarveReason::StepFailed {
                step: Step::Shutdown
            })
        ));
        assert!(r.errors[0].as_deref().unwrap().contains("Shutdown"));
        assert_eq!(ops.calls().len(), 3);
        assert!(w.starved);
    }
}
