//! The daemon mounts a volume for a pod (`POST /v1/volumes/{volume}/mount`):
//! the blocking [`crate::nsmount::mount_into`] on a blocking thread, its
//! errors as API answers, and the [`MountGate`] that orders mounts and fences.
//!
//! The volume task checks that the session is live and granted, then hands
//! the mount here; it does not wait for it (a mount may take seconds: the
//! superblock read, ext4's MMP check).
//!
//! Invariant (the gate): no mount lands after a fence of the volume has
//! started. Every session end starts a fence ([`MountGate::close`] on the
//! runtime thread, before the fence's blocking job is spawned), and:
//! - a mount runs holding the gate's lock, and only if no fence started
//!   since its session was checked;
//! - the fence's job takes the same lock before it fences ([`MountGate::settle`]),
//!   so a mount in flight finishes first and is then fenced like any other
//!   mount (its mount in the pod's namespace is found through /proc).
//!
//! A mount hung in the kernel (a dead device) therefore holds up the fence,
//! which then misses its deadline: the fence fails and the watchdog is
//! starved, as for any fence that cannot finish.
//!
//! What it must not do: keep a descriptor of the mount (the fence's final
//! exclusive open of the device would fail on it).

use crate::api::{ApiError, Mounted, Reply};
use crate::nsmount::{self, MountSpec};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Orders a volume's mounts and fences (see the module docs).
#[derive(Debug, Default)]
pub struct MountGate {
    /// Fences started so far.
    fences: AtomicU64,
    /// Held by a mount in flight, and by a fence before it starts.
    lock: Mutex<()>,
}

impl MountGate {
    /// A ticket for a mount checked now: valid until the next fence starts.
    pub fn ticket(&self) -> u64 {
        self.fences.load(Ordering::SeqCst)
    }

    /// A fence is starting: tickets issued before it are void. Never blocks.
    pub fn close(&self) {
        self.fences.fetch_add(1, Ordering::SeqCst);
    }

    /// Waits until no mount is in flight (blocking: call it from the fence's
    /// blocking job, after [`MountGate::close`]).
    pub fn settle(&self) {
        drop(self.lock.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Runs `mount` if no fence started since `ticket` was taken; `None`
    /// otherwise.
    fn run<T>(&self, ticket: u64, mount: impl FnOnce() -> T) -> Option<T> {
        let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        (self.fences.load(Ordering::SeqCst) == ticket).then(mount)
    }
}

/// One mount to carry out.
#[derive(Debug)]
pub struct PodMount {
    /// The volume's name.
    pub volume: String,
    /// The live session it is for.
    pub session: String,
    /// The granted device (in the daemon's namespace).
    pub device: PathBuf,
    /// The target in the caller's namespace.
    pub target: PathBuf,
    /// The caller.
    pub peer: Arc<OwnedFd>,
    /// The grant's mount options.
    pub spec: MountSpec,
}

/// Mounts on a blocking thread and answers `reply` when done.
pub fn spawn(gate: Arc<MountGate>, ticket: u64, job: PodMount, reply: Reply<Mounted>) {
    tokio::task::spawn_blocking(move || {
        let answer = match gate.run(ticket, || {
            nsmount::mount_into(&job.peer, &job.device, &job.target, &job.spec)
        }) {
            None => Err(ApiError::session_ended(
                &job.session,
                "it was fenced before the mount could start",
            )),
            Some(Err(e)) => {
                tracing::warn!(volume = %job.volume, error = %e, "mount for the caller failed");
                Err(ApiError::unavailable(e.to_string()))
            }
            Some(Ok(())) => {
                tracing::info!(volume = %job.volume, device = %job.device.display(),
                    target = %job.target.display(), "mounted in the caller's namespace");
                Ok(Mounted {
                    volume: job.volume,
                    session: job.session,
                    target: job.target.display().to_string(),
                    device: job.device.display().to_string(),
                })
            }
        };
        let _ = reply.send(answer);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_checked_before_a_fence_started_does_not_run() {
        let gate = MountGate::default();
        let ticket = gate.ticket();
        assert_eq!(gate.run(ticket, || 1), Some(1));
        gate.close();
        assert_eq!(gate.run(ticket, || 2), None);
        assert_eq!(gate.run(gate.ticket(), || 3), Some(3));
    }

    #[test]
    fn a_fence_waits_for_the_mount_in_flight() {
        let gate = Arc::new(MountGate::default());
        let ticket = gate.ticket();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (finish_tx, finish_rx) = std::sync::mpsc::channel::<()>();
        let g = Arc::clone(&gate);
        let mount = std::thread::spawn(move || {
            g.run(ticket, || {
                started_tx.send(()).unwrap();
                finish_rx.recv().unwrap();
                std::time::Instant::now()
            })
        });
        started_rx.recv().unwrap();
        gate.close();
        let g = Arc::clone(&gate);
        let fence = std::thread::spawn(move || {
            g.settle();
            std::time::Instant::now()
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        finish_tx.send(()).unwrap();
        let mounted = mount.join().unwrap().expect("the mount ran");
        assert!(fence.join().unwrap() >= mounted);
    }
}
