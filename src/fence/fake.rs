//! A recording [`FenceOps`] for tests: each step succeeds, fails, answers
//! after a delay, or hangs until released; every call is recorded.

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{FenceError, FenceOps, FenceTarget};
use crate::core::fence::Step;

/// How the fake answers one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    Succeed,
    Fail,
    /// Succeed after this long.
    After(Duration),
    /// Never answer, until [`RecordingOps::release`].
    Hang,
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub step: Step,
    pub mount: PathBuf,
    pub at: Instant,
}

/// The recording fake.
#[derive(Debug)]
pub struct RecordingOps {
    behavior: [Behavior; 3],
    calls: Mutex<Vec<Call>>,
    released: Mutex<bool>,
    wake: Condvar,
}

impl RecordingOps {
    /// A fake answering the steps (in [`crate::core::fence::STEPS`] order) so.
    pub fn new(behavior: [Behavior; 3]) -> RecordingOps {
        RecordingOps {
            behavior,
            calls: Mutex::new(Vec::new()),
            released: Mutex::new(false),
            wake: Condvar::new(),
        }
    }

    /// The calls so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("not poisoned").clone()
    }

    /// Lets every hung step return (with a failure).
    pub fn release(&self) {
        *self.released.lock().expect("not poisoned") = true;
        self.wake.notify_all();
    }

    fn act(&self, step: Step, mount: &Path) -> Result<(), FenceError> {
        self.calls.lock().expect("not poisoned").push(Call {
            step,
            mount: mount.to_path_buf(),
            at: Instant::now(),
        });
        match self.behavior[step.index()] {
            Behavior::Succeed => Ok(()),
            Behavior::Fail => Err(FenceError::Fake { step }),
            Behavior::After(d) => {
                std::thread::sleep(d);
                Ok(())
            }
            Behavior::Hang => {
                let mut released = self.released.lock().expect("not poisoned");
                while !*released {
                    released = self.wake.wait(released).expect("not poisoned");
                }
                Err(FenceError::Fake { step })
            }
        }
    }
}

impl FenceOps for RecordingOps {
    fn shutdown(&self, target: &FenceTarget) -> Result<(), FenceError> {
        self.act(Step::Shutdown, &target.path)
    }

    fn kill_holders(&self, target: &FenceTarget) -> Result<Vec<i32>, FenceError> {
        self.act(Step::KillHolders, &target.path)
            .map(|()| Vec::new())
    }

    fn unmount(&self, target: &FenceTarget) -> Result<(), FenceError> {
        self.act(Step::Unmount, &target.path)
    }
}
