//! The lease runner: the thin imperative shell around [`LeaseMachine`].
//!
//! It owns the machine, feeds it the time of this process's monotonic clock
//! (`std::time::Instant`, CLOCK_MONOTONIC: it keeps running while the process
//! is stopped, so a resumed holder sees its lease expired) and the results of the
//! I/O it asked for, and carries out its actions. I/O goes through one
//! [`IoWorker`] thread, in order; the machine keeps at most one request
//! outstanding, so a request that passes its deadline simply stays outstanding
//! while the machine's own timers (expiry) go on.
//!
//! The runner decides nothing about the lease: every decision is in
//! `core::lease`.

use crate::core::lease::{Action, Event, Identity, Input, Layout, LeaseMachine};
use crate::core::params::Params;
use crate::disk::area::open_area;
use crate::disk::blockdev::{Access, BlockDevice};
use crate::disk::error::DiskError;
use crate::disk::store::{AreaStore, BlockStore};
use crate::disk::worker::{lease_input, IoWorker, Request, Ticket, Waited};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the runner sleeps at most between two looks at its stop flag.
const STOP_CHECK: Duration = Duration::from_millis(20);

/// Errors of the runner.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("invalid lease parameters: {0}")]
    Params(#[from] crate::core::params::ParamsError),
    #[error(
        "these parameters give host_dead = {host_dead_ms} ms, above the ceiling of this volume \
         ({ceiling_ms} ms, set by `blockfence format`): use shorter timeouts, or reformat"
    )]
    AboveCeiling { host_dead_ms: u64, ceiling_ms: u64 },
    #[error("node name must be 1 to {max} bytes of UTF-8 (got {len})")]
    BadName { len: usize, max: usize },
    #[error("{0}")]
    Failed(String),
}

/// How the runner ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Held the lease, then released it when asked to stop.
    Released,
    /// Never acquired before the timeout.
    TimedOut,
    /// Asked to stop before it acquired.
    Interrupted,
    /// Held the lease, then lost it.
    Lost,
}

/// I/O counters, for benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounts {
    pub reads: u64,
    pub blocks_read: u64,
    pub writes: u64,
}

/// Runs one node's lease on one device.
pub struct LeaseRunner {
    machine: LeaseMachine,
    worker: IoWorker,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    counts: IoCounts,
    /// The outstanding request, and whether it is a read.
    pending: Option<(Ticket, bool)>,
}

/// Checks a node name fits a slot record.
pub fn check_node_name(name: &str) -> Result<(), RunnerError> {
    let max = crate::core::record::NAME_MAX;
    if name.is_empty() || name.len() > max {
        return Err(RunnerError::BadName {
            len: name.len(),
            max,
        });
    }
    Ok(())
}

/// A device's lease area, opened and checked, ready for a [`LeaseMachine`].
pub struct OpenedLease {
    /// Area-relative block I/O on the device.
    pub store: AreaStore<BlockDevice>,
    /// What the machine needs to know about the area.
    pub layout: Layout,
    /// This node, with a fresh nonce and the parameters it will record.
    pub identity: Identity,
}

/// Opens the lease area of `device` for node `node` and checks the
/// parameters (`params` maps the area's defaults to this node's): valid, and
/// within the area's host_dead ceiling. Blocking I/O (a few reads).
pub fn open_lease(
    device: &Path,
    node: &str,
    params: impl FnOnce(Params) -> Params,
) -> Result<OpenedLease, RunnerError> {
    check_node_name(node)?;
    let dev = BlockDevice::open(device, Access::ReadWrite)?;
    let info = open_area(&dev)?;
    let params = params(info.header.params);
    params.validate()?;
    let ceiling = info.header.host_dead_ceiling_ms as u64;
    if params.host_dead_ms() > ceiling {
        return Err(RunnerError::AboveCeiling {
            host_dead_ms: params.host_dead_ms(),
            ceiling_ms: ceiling,
        });
    }
    let layout = Layout {
        volume_id: info.header.volume_id,
        max_slots: info.header.max_slots,
        host_dead_ceiling_ms: ceiling,
    };
    Ok(OpenedLease {
        store: AreaStore::for_area(dev, &info),
        layout,
        identity: Identity {
            name: node.to_string(),
            nonce: rand::random(),
            params,
        },
    })
}

impl LeaseRunner {
    /// Opens the lease area of `device` for node `node`. `params` maps the
    /// area's default parameters to this node's.
    pub fn open(
        device: &Path,
        node: &str,
        params: impl FnOnce(Params) -> Params,
    ) -> Result<LeaseRunner, RunnerError> {
        let opened = open_lease(device, node, params)?;
        LeaseRunner::with_store(Box::new(opened.store), opened.layout, opened.identity)
    }

    /// A runner over any block store (tests, benchmarks).
    pub fn with_store(
        store: Box<dyn BlockStore>,
        layout: Layout,
        identity: Identity,
    ) -> Result<LeaseRunner, RunnerError> {
        let worker = IoWorker::spawn(&format!("lease-io-{}", identity.name), store)?;
        Ok(LeaseRunner {
            machine: LeaseMachine::new(identity, layout),
            worker,
            epoch: Instant::now(),
            stop: Arc::new(AtomicBool::new(false)),
            counts: IoCounts::default(),
            pending: None,
        })
    }

    /// Set it (from a signal handler or another thread) to release and stop.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Uses `flag` as the stop flag (one registered with signal handlers
    /// before the device was opened, so no signal is lost in between).
    pub fn use_stop_flag(&mut self, flag: Arc<AtomicBool>) {
        self.stop = flag;
    }

    /// I/O performed so far.
    pub fn io_counts(&self) -> IoCounts {
        self.counts
    }

    /// Milliseconds on this runner's clock.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Acquires the lease, holds it until the stop flag is set, then releases
    /// it. Gives up if not acquired within `timeout`. Every event goes to
    /// `on_event` with the runner's clock.
    pub fn run(
        &mut self,
        timeout: Option<Duration>,
        on_event: &mut dyn FnMut(u64, &Event),
    ) -> Result<Outcome, RunnerError> {
        let give_up_at = timeout.map(|t| {
            let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
            self.now_ms().saturating_add(ms)
        });
        let mut input = Input::Acquire;
        let mut release_sent = false;
        let mut timed_out = false;
        let mut held = false;
        loop {
            let now = self.now_ms();
            let mut wake = None;
            for action in self.machine.step(now, input) {
                match action {
                    Action::Read { first_block, count } => {
                        self.counts.reads += 1;
                        self.counts.blocks_read += count as u64;
                        let ticket = self.worker.submit(Request::Read { first_block, count });
                        self.pending = Some((ticket, true));
                    }
                    Action::Write { block, data } => {
                        self.counts.writes += 1;
                        let ticket = self.worker.submit(Request::Write { block, data });
                        self.pending = Some((ticket, false));
                    }
                    Action::WakeAt(t) => wake = Some(t),
                    Action::Emit(event) => {
                        on_event(now, &event);
                        match event {
                            Event::Acquired { .. } => held = true,
                            Event::Released { .. } => return Ok(Outcome::Released),
                            Event::Lost { .. } => return Ok(Outcome::Lost),
                            Event::Stopped if timed_out => return Ok(Outcome::TimedOut),
                            Event::Stopped if held => return Ok(Outcome::Released),
                            Event::Stopped => return Ok(Outcome::Interrupted),
                            Event::Failed { error } => return Err(RunnerError::Failed(error)),
                            _ => {}
                        }
                    }
                }
            }
            input = loop {
                let now = self.now_ms();
                if !release_sent && self.stop.load(Ordering::SeqCst) {
                    release_sent = true;
                    break Input::Release;
                }
                if !release_sent
                    && self.machine.holding().is_none()
                    && give_up_at.is_some_and(|t| now >= t)
                {
                    release_sent = true;
                    timed_out = true;
                    break Input::Release;
                }
                if wake.is_some_and(|t| now >= t) {
                    break Input::Tick;
                }
                let mut until = now + STOP_CHECK.as_millis() as u64;
                if let Some(t) = wake {
                    until = until.min(t);
                }
                if let Some(t) = give_up_at {
                    until = until.min(t.max(now));
                }
                let wait = Duration::from_millis(until.saturating_sub(now));
                if let Some(done) = self.wait_pending(wait) {
                    break done;
                }
            };
        }
    }

    /// Waits up to `wait` for the outstanding request; its completion as an
    /// input, or `None` if it is still in flight (or there is none).
    fn wait_pending(&mut self, wait: Duration) -> Option<Input> {
        let Some((ticket, is_read)) = self.pending.take() else {
            std::thread::sleep(wait);
            return None;
        };
        let outcome = match ticket.wait_until(Instant::now() + wait) {
            Err(Waited::TimedOut(ticket)) => {
                self.pending = Some((ticket, is_read));
                return None;
            }
            Ok(reply) => Ok(reply),
            Err(e) => Err(e.to_string()),
        };
        Some(lease_input(outcome, is_read))
    }
}
