//! [`IoWorker`]: lease I/O with deadlines.
//!
//! A block device can take arbitrarily long to complete an I/O (path failover,
//! a dead array, a hung driver), and a thread in `pread`/`pwrite` cannot be
//! interrupted. So lease I/O never runs on the caller's thread: each device has
//! one dedicated worker thread that performs requests one at a time, in
//! submission order, and the caller waits for a reply only until its deadline.
//!
//! Invariants:
//! - requests are performed strictly in submission order, one at a time: a
//!   node's own writes are never reordered or overlapped, and a read submitted
//!   after a write sees that write;
//! - [`Ticket::wait_until`] returns by its deadline (plus scheduling noise),
//!   whatever the device does; no caller ever blocks on the device;
//! - a request whose deadline passed is *still in flight*: it may complete (or
//!   land on the disk) later. The ticket comes back inside
//!   [`Waited::TimedOut`] so its completion can be observed, and every later
//!   request queues behind it. The lease logic must treat a timed-out write as
//!   "may or may not have happened";
//! - dropping the worker never blocks: queued requests still run, then the
//!   thread exits; a thread stuck in the kernel is left behind, not joined.
//!
//! Time is `std::time::Instant` (the runtime's monotonic clock); the pure core
//! receives the resulting observations and times as inputs.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::core::record::Block;
use crate::disk::error::DiskError;
use crate::disk::store::BlockStore;

/// One lease I/O, in area blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read `count` blocks from `first_block`.
    Read { first_block: u64, count: usize },
    /// Write one block.
    Write { block: u64, data: Box<Block> },
}

/// The result of a completed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The blocks read, in order.
    Read(Vec<Block>),
    /// The write is durable.
    Written,
}

/// Why [`Ticket::wait_until`] returned without a reply.
#[derive(Debug)]
pub enum Waited {
    /// The deadline passed first. The request is still in flight; the ticket
    /// is handed back so its late completion can be observed.
    TimedOut(Ticket),
    /// The request completed in time, with an error.
    Failed(DiskError),
    /// The worker thread died before completing the request.
    WorkerGone,
}

impl std::fmt::Display for Waited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Waited::TimedOut(t) => write!(
                f,
                "lease I/O #{} ({}) missed its deadline and is still in flight",
                t.id, t.kind
            ),
            Waited::Failed(e) => write!(f, "lease I/O failed: {e}"),
            Waited::WorkerGone => write!(f, "the lease I/O worker thread died"),
        }
    }
}

impl std::error::Error for Waited {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Waited::Failed(e) => Some(e),
            _ => None,
        }
    }
}

type Outcome = Result<Reply, DiskError>;

/// Where a job's outcome goes: a blocking [`Ticket`] or an async one.
enum ReplyTo {
    Blocking(mpsc::SyncSender<Outcome>),
    Async(tokio::sync::oneshot::Sender<Outcome>),
}

struct Job {
    req: Request,
    reply: ReplyTo,
}

/// A submitted request; wait on it with [`wait_until`](Ticket::wait_until).
#[derive(Debug)]
pub struct Ticket {
    id: u64,
    kind: &'static str,
    submitted_at: Instant,
    rx: mpsc::Receiver<Outcome>,
}

impl Ticket {
    /// Submission number on its worker, from 0.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// When the request was submitted, taken before it was queued: the I/O
    /// started no earlier. A holder that counts its lease from this instant
    /// counts conservatively (its lease ends no later than it thinks).
    pub fn submitted_at(&self) -> Instant {
        self.submitted_at
    }

    /// Waits for the reply until `deadline`. A deadline already past still
    /// collects a reply that has arrived.
    pub fn wait_until(self, deadline: Instant) -> Result<Reply, Waited> {
        let received = match self.rx.try_recv() {
            Ok(outcome) => Ok(outcome),
            Err(mpsc::TryRecvError::Disconnected) => return Err(Waited::WorkerGone),
            Err(mpsc::TryRecvError::Empty) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Waited::TimedOut(self));
                }
                self.rx.recv_timeout(left)
            }
        };
        match received {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(Waited::Failed(e)),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Waited::TimedOut(self)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Waited::WorkerGone),
        }
    }
}

/// The lease machine's input for a finished request: its reply, or why it
/// failed (`Waited`'s words), as a read or a write completion.
pub fn lease_input(outcome: Result<Reply, String>, is_read: bool) -> crate::core::lease::Input {
    use crate::core::lease::{Input, IoFailure};
    match outcome {
        Ok(Reply::Read(blocks)) => Input::ReadDone(Ok(blocks)),
        Ok(Reply::Written) => Input::WriteDone(Ok(())),
        Err(e) if is_read => Input::ReadDone(Err(IoFailure(e))),
        Err(e) => Input::WriteDone(Err(IoFailure(e))),
    }
}

fn kind_of(req: &Request) -> &'static str {
    match req {
        Request::Read { .. } => "read",
        Request::Write { .. } => "write",
    }
}

/// One thread per device performing lease I/O in order.
#[derive(Debug)]
pub struct IoWorker {
    name: String,
    tx: mpsc::Sender<Job>,
    next_id: AtomicU64,
    pending: Arc<AtomicUsize>,
    thread: JoinHandle<()>,
}

impl IoWorker {
    /// Starts the worker thread `name` over `store`.
    pub fn spawn(name: &str, store: impl BlockStore + 'static) -> Result<IoWorker, DiskError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let pending = Arc::new(AtomicUsize::new(0));
        let thread_pending = Arc::clone(&pending);
        let thread = std::thread::Builder::new()
            .name(format!("io-{name}"))
            .spawn(move || {
                for job in rx {
                    let outcome = match job.req {
                        Request::Read { first_block, count } => {
                            store.read_blocks(first_block, count).map(Reply::Read)
                        }
                        Request::Write { block, data } => {
                            store.write_block(block, &data).map(|()| Reply::Written)
                        }
                    };
                    thread_pending.fetch_sub(1, Ordering::SeqCst);
                    // The caller may have dropped its ticket; that is fine.
                    match job.reply {
                        ReplyTo::Blocking(tx) => {
                            let _ = tx.send(outcome);
                        }
                        ReplyTo::Async(tx) => {
                            let _ = tx.send(outcome);
                        }
                    }
                }
            })
            .map_err(|source| DiskError::WorkerSpawn {
                name: name.to_string(),
                source,
            })?;
        Ok(IoWorker {
            name: name.to_string(),
            tx,
            next_id: AtomicU64::new(0),
            pending,
            thread,
        })
    }

    /// Queues `req` behind every earlier request and returns at once.
    pub fn submit(&self, req: Request) -> Ticket {
        let kind = kind_of(&req);
        let (reply, rx) = mpsc::sync_channel(1);
        let submitted_at = Instant::now();
        let id = self.enqueue(req, ReplyTo::Blocking(reply));
        Ticket {
            id,
            kind,
            submitted_at,
            rx,
        }
    }

    /// Queues `req` like [`IoWorker::submit`], for an async caller: the
    /// receiver completes when the request does (a deadline is the caller's
    /// `tokio::time::timeout`; the request stays in flight after it). A
    /// closed receiver (`RecvError`) means the worker thread is gone.
    pub fn submit_async(
        &self,
        req: Request,
    ) -> tokio::sync::oneshot::Receiver<Result<Reply, DiskError>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.enqueue(req, ReplyTo::Async(reply));
        rx
    }

    fn enqueue(&self, req: Request, reply: ReplyTo) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(Job { req, reply }).is_err() {
            // The thread is gone; the reply sender was dropped with the job,
            // so the waiter sees `WorkerGone` (or a closed receiver).
            self.pending.fetch_sub(1, Ordering::SeqCst);
        }
        id
    }

    /// Queues a read of `count` area blocks from `first_block`.
    pub fn read(&self, first_block: u64, count: usize) -> Ticket {
        self.submit(Request::Read { first_block, count })
    }

    /// Queues a write of one area block.
    pub fn write(&self, block: u64, data: &Block) -> Ticket {
        self.submit(Request::Write {
            block,
            data: Box::new(*data),
        })
    }

    /// Requests submitted and not yet completed (including one stuck in the
    /// device). A caller can refuse to queue more behind a hung request.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Whether the worker thread is still running.
    pub fn is_alive(&self) -> bool {
        !self.thread.is_finished()
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::record::BLOCK;
    use crate::disk::store::MemStore;
    use std::time::Duration;

    const SLACK: Duration = Duration::from_millis(200);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn replies_in_order() {
        let store = MemStore::new();
        let w = IoWorker::spawn("t", store.clone()).unwrap();
        let t1 = w.write(2, &[1u8; BLOCK]);
        let t2 = w.write(2, &[2u8; BLOCK]);
        let t3 = w.read(2, 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        // Waiting out of order changes nothing: the worker ran them in order.
        assert_eq!(
            t3.wait_until(deadline).unwrap(),
            Reply::Read(vec![[2u8; BLOCK]])
        );
        assert_eq!(t1.wait_until(deadline).unwrap(), Reply::Written);
        assert_eq!(t2.wait_until(deadline).unwrap(), Reply::Written);
        assert_eq!(w.pending(), 0);
    }

    #[test]
    fn hung_io_times_out_stays_in_flight_and_later_requests_queue_behind_it() {
        let store = MemStore::new();
        let w = IoWorker::spawn("t", store.clone()).unwrap();
        store.pause();
        let start = Instant::now();
        let write = w.write(5, &[9u8; BLOCK]);
        let ticket = match write.wait_until(start + ms(50)) {
            Err(Waited::TimedOut(t)) => t,
            r => panic!("expected timeout, got {r:?}"),
        };
        assert!(start.elapsed() >= ms(50));
        assert!(start.elapsed() < ms(50) + SLACK, "caller blocked too long");
        assert_eq!(ticket.id(), 0);

        // A read submitted later waits behind the hung write.
        let read = w.read(5, 1);
        let read = match read.wait_until(Instant::now() + ms(20)) {
            Err(Waited::TimedOut(t)) => t,
            r => panic!("expected timeout, got {r:?}"),
        };
        assert_eq!(w.pending(), 2);
        // A deadline in the past returns at once.
        let read = match read.wait_until(start) {
            Err(Waited::TimedOut(t)) => t,
            r => panic!("{r:?}"),
        };

        // The device recovers: the late completion is observable, and the read
        // (queued behind) sees the write.
        store.resume();
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(ticket.wait_until(deadline).unwrap(), Reply::Written);
        assert_eq!(
            read.wait_until(deadline).unwrap(),
            Reply::Read(vec![[9u8; BLOCK]])
        );
        assert_eq!(w.pending(), 0);
    }

    #[test]
    fn slow_io_completing_after_the_deadline_is_still_reported() {
        let store = MemStore::new();
        store.set_latency(ms(100));
        let w = IoWorker::spawn("t", store.clone()).unwrap();
        let t = w.write(3, &[3u8; BLOCK]);
        let t = match t.wait_until(Instant::now() + ms(10)) {
            Err(Waited::TimedOut(t)) => t,
            r => panic!("{r:?}"),
        };
        std::thread::sleep(ms(200));
        // Completed meanwhile: an expired deadline still collects the reply.
        assert_eq!(t.wait_until(Instant::now()).unwrap(), Reply::Written);
        assert_eq!(store.peek(3), [3u8; BLOCK]);
    }

    #[test]
    fn errors_are_reported_as_failed() {
        let store = MemStore::new();
        let w = IoWorker::spawn("t", store.clone()).unwrap();
        store.fail_next_writes(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(matches!(
            w.write(2, &[1u8; BLOCK]).wait_until(deadline),
            Err(Waited::Failed(DiskError::Injected { .. }))
        ));
        assert!(matches!(
            w.read(300, 1).wait_until(deadline),
            Err(Waited::Failed(DiskError::OutsideArea { .. }))
        ));
        assert!(w.write(2, &[1u8; BLOCK]).wait_until(deadline).is_ok());
    }

    struct Panicking;
    impl BlockStore for Panicking {
        fn read_blocks(&self, _: u64, _: usize) -> Result<Vec<Block>, DiskError> {
            panic!("store panicked (expected by the test)")
        }
        fn write_block(&self, _: u64, _: &Block) -> Result<(), DiskError> {
            unreachable!()
        }
    }

    #[test]
    fn a_dead_worker_is_reported_not_waited_for() {
        let w = IoWorker::spawn("t", Panicking).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(matches!(
            w.read(0, 1).wait_until(deadline),
            Err(Waited::WorkerGone)
        ));
        let start = Instant::now();
        while w.is_alive() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(ms(5));
        }
        assert!(!w.is_alive());
        assert!(matches!(
            w.read(0, 1).wait_until(deadline),
            Err(Waited::WorkerGone)
        ));
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
