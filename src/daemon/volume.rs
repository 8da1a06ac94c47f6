//! One volume's task: the shell around its [`LeaseMachine`] and
//! [`SessionMachine`].
//!
//! The task owns both machines and feeds them the daemon's monotonic time
//! (tokio's clock, one epoch for the whole daemon), the lease I/O results from
//! the volume's [`IoWorker`] thread, the API requests for this volume, timer
//! ticks and fence results; it carries out their actions: lease reads and
//! writes, replies, events, fences (on a blocking thread), and it publishes
//! the volume's status and its watchdog [`Guard`].
//!
//! It also runs the stale-I/O guard before the first grant, turns device
//! news (path lost / back) and reservation events into session inputs, takes
//! the NVMe reservation after the lease is won and before the grant is
//! answered, and checks it every renew interval while held.
//!
//! It decides nothing itself: every decision is in `core::lease`,
//! `core::session` and `core::reservation`. The one thing it adds is marking the ext4 MMP block clean
//! right after the lease is acquired (the lease has proven the previous holder
//! fenced), so a mount after a takeover does not wait out the kernel's MMP
//! check.

use crate::api::{
    ApiError, Command, ErrorCode, FenceState, Grant, StopReason, VolumeEvent, VolumeEventKind,
    VolumeState, VolumeStatus, REQUIRED_MOUNT_OPTIONS,
};
use crate::core::lease::{self, Event, Identity, Layout, LeaseMachine, Millis};
use crate::core::params::Params;
use crate::core::reservation::{Event as ResvEvent, Input as ResvInput};
use crate::core::session::{
    self, Answer, EndReason, LeaseNews, Phase, Published, Refusal, SessionConfig, SessionMachine,
    StopKind,
};
use crate::core::watchdog::Guard;
use crate::daemon::devices::{DeviceNews, ReservationLink};
use crate::daemon::mounts::fence_device;
use crate::daemon::podmount::{self, MountGate, PodMount};
use crate::device::guard::{self, Decision, Policy};
use crate::disk::error::DiskError;
use crate::disk::store::BlockStore;
use crate::disk::worker::{lease_input, IoWorker, Reply as IoReply, Request, Waited};
use crate::fence::FenceOps;
use crate::metrics::{LeaseState, Metrics};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

/// Depth of a volume's command queue.
pub const VOLUME_QUEUE: usize = 64;
/// Events kept for slow subscribers before they are told they lagged.
pub const EVENT_BUFFER: usize = 256;

/// What the dispatcher sends a volume task.
#[derive(Debug)]
pub enum VolumeCmd {
    /// An API command for this volume (acquire, keepalive, release, handover).
    Api(Command),
    /// The daemon is stopping.
    Shutdown,
}

/// A snapshot of the volume for `GET /v1/volumes`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub state: VolumeState,
    pub holder: Option<String>,
    pub generation: u64,
    pub last_renewal: Option<Instant>,
    pub fence_state: FenceState,
    pub phase: Phase,
}

impl Snapshot {
    /// Nothing held, nothing going on.
    pub fn idle() -> Snapshot {
        Snapshot {
            state: VolumeState::Free,
            holder: None,
            generation: 0,
            last_renewal: None,
            fence_state: FenceState::Idle,
            phase: Phase::Idle,
        }
    }

    /// The API's view at `now`.
    pub fn status(&self, volume: &str, now: Instant) -> VolumeStatus {
        VolumeStatus {
            volume: volume.to_string(),
            state: self.state,
            holder: self.holder.clone(),
            generation: self.generation,
            since_renewal_ms: self
                .last_renewal
                .map(|t| now.saturating_duration_since(t).as_millis() as u64),
            fence_state: self.fence_state,
        }
    }
}

/// The handles the rest of the daemon keeps for one volume.
#[derive(Debug, Clone)]
pub struct VolumeHandle {
    pub name: String,
    pub index: usize,
    pub commands: mpsc::Sender<VolumeCmd>,
    pub snapshot: watch::Receiver<Snapshot>,
    pub events: broadcast::Sender<VolumeEvent>,
}

/// What a volume needs from the daemon.
pub struct VolumeSetup<O> {
    pub name: String,
    pub index: usize,
    pub device: PathBuf,
    /// `st_rdev` of the device (`None` for an image file: nothing to fence).
    pub rdev: Option<u64>,
    /// The device's `diskseq` when it was opened (see `fence::device`).
    pub diskseq: Option<u64>,
    pub store: Box<dyn BlockStore>,
    pub layout: Layout,
    pub identity: Identity,
    pub sessions: SessionConfig,
    /// The daemon's clock origin.
    pub epoch: Instant,
    /// This volume's entry in the watchdog's table.
    pub guards: Arc<Mutex<Vec<Guard>>>,
    pub fence_ops: Arc<O>,
    /// Mark ext4 MMP clean after acquiring (off for raw test images).
    pub mmp_clean: bool,
    pub metrics: Arc<Metrics>,
    /// The stale-I/O guard, for an NVMe volume.
    pub guard: Option<GuardCheck>,
    /// The NVMe reservation beside the lease, where supported.
    pub reservation: Option<ReservationLink>,
}

/// The receiving ends a volume's task serves; they outlive one opening of
/// its device (the task closes a device that went away while idle and waits
/// for it, keeping its API and events).
#[derive(Debug)]
pub struct VolumeChannels {
    pub name: String,
    pub commands: mpsc::Receiver<VolumeCmd>,
    pub snapshot: watch::Sender<Snapshot>,
    pub events: broadcast::Sender<VolumeEvent>,
    /// What the device layer says about this volume's device.
    pub device_news: Option<mpsc::UnboundedReceiver<DeviceNews>>,
}

/// A volume's channels and the handle the dispatcher keeps.
pub fn channels(
    name: &str,
    index: usize,
    device_news: mpsc::UnboundedReceiver<DeviceNews>,
) -> (VolumeChannels, VolumeHandle) {
    let (tx, rx) = mpsc::channel(VOLUME_QUEUE);
    let (snap_tx, snap_rx) = watch::channel(Snapshot::idle());
    let (events, _) = broadcast::channel(EVENT_BUFFER);
    let handle = VolumeHandle {
        name: name.to_string(),
        index,
        commands: tx,
        snapshot: snap_rx,
        events: events.clone(),
    };
    let chans = VolumeChannels {
        name: name.to_string(),
        commands: rx,
        snapshot: snap_tx,
        events,
        device_news: Some(device_news),
    };
    (chans, handle)
}

/// How a volume task ended.
#[derive(Debug)]
pub enum Exit {
    /// Told to stop, nothing held.
    Stopped,
    /// Its device went away while nothing was held: it is closed; the
    /// channels are handed back to wait for it.
    DeviceGone(VolumeChannels, String),
}

impl VolumeChannels {
    /// Serves the API while the device is missing (acquires are refused as
    /// `unavailable`, saying why) until device news arrives (`true`: try to
    /// open it) or the daemon stops (`false`).
    pub async fn wait_for_device(&mut self, why: &str) -> bool {
        self.snapshot.send_replace(Snapshot::idle());
        loop {
            tokio::select! {
                n = maybe_recv(self.device_news.as_mut()) => match n {
                    Some(n) => {
                        if n == DeviceNews::PathBack {
                            let _ = self.events.send(VolumeEvent {
                                volume: self.name.clone(),
                                kind: VolumeEventKind::PathBack {},
                            });
                        }
                        return true;
                    }
                    None => self.device_news = None,
                },
                cmd = self.commands.recv() => match cmd {
                    None | Some(VolumeCmd::Shutdown) => return false,
                    Some(VolumeCmd::Api(c)) => self.refuse(c, why),
                }
            }
        }
    }

    fn refuse(&self, command: Command, why: &str) {
        let status = || Snapshot::idle().status(&self.name, Instant::now());
        let unknown = || {
            ApiError::new(
                ErrorCode::UnknownSession,
                "no such session on this volume: it was never granted or is long gone",
            )
        };
        match command {
            Command::Acquire { reply, .. } => {
                let _ = reply.send(Err(ApiError::unavailable(format!(
                    "volume {:?}: {why}; acquires are served once it appears",
                    self.name
                ))));
            }
            Command::Keepalive { reply, .. } => {
                let _ = reply.send(Err(unknown()));
            }
            Command::Release { reply, .. } => {
                let _ = reply.send(Err(unknown()));
            }
            Command::Mount { reply, .. } => {
                let _ = reply.send(Err(unknown()));
            }
            Command::Handover { reply, .. } => {
                let _ = reply.send(Err(ApiError::new(
                    ErrorCode::NotHeld,
                    format!("volume {:?} is not held by this node ({why})", self.name),
                )));
            }
            Command::ListVolumes { reply } => {
                let _ = reply.send(Ok(vec![status()]));
            }
            Command::GetVolume { reply, .. } => {
                let _ = reply.send(Ok(status()));
            }
            Command::Subscribe { reply, .. } => {
                let _ = reply.send(Ok(self.events.subscribe()));
            }
        }
    }
}

/// The stale-I/O guard of one NVMe volume, run before its first grant.
#[derive(Debug, Clone)]
pub struct GuardCheck {
    pub sysfs_root: PathBuf,
    pub namespace: String,
    pub policy: Policy,
}

/// A reply waiting for the session machine's answer.
enum Waiting {
    Grant(crate::api::Reply<Grant>),
    Status(crate::api::Reply<VolumeStatus>),
}

/// Work queued between the two machines.
enum Work {
    Lease(lease::Input),
    Session(session::Input),
}

/// The volume task's state.
pub struct VolumeTask<O> {
    name: String,
    index: usize,
    device: PathBuf,
    rdev: Option<u64>,
    diskseq: Option<u64>,
    params: Params,
    lease: LeaseMachine,
    sessions: SessionMachine,
    worker: IoWorker,
    io: Option<(oneshot::Receiver<Result<IoReply, DiskError>>, bool)>,
    lease_wake: Option<Millis>,
    session_wake: Option<Millis>,
    fence: Option<oneshot::Receiver<bool>>,
    fence_started: Option<Instant>,
    fence_cause: &'static str,
    waiting: HashMap<u64, Waiting>,
    next_req: u64,
    epoch: Instant,
    guards: Arc<Mutex<Vec<Guard>>>,
    fence_ops: Arc<O>,
    mmp_clean: bool,
    last_valid_until: Option<Millis>,
    last_renewal: Option<Instant>,
    fenced: bool,
    snapshot: watch::Sender<Snapshot>,
    events: broadcast::Sender<VolumeEvent>,
    commands: mpsc::Receiver<VolumeCmd>,
    queue: VecDeque<Work>,
    metrics: Arc<Metrics>,
    /// When the last lease write was submitted (a renewal's start).
    write_started: Option<Instant>,
    /// When this node started seeking the lease (for the takeover time).
    seek_started: Option<Instant>,
    /// When a handover was asked (for the handover time).
    handover_started: Option<Instant>,
    device_news: Option<mpsc::UnboundedReceiver<DeviceNews>>,
    guard: Option<GuardCheck>,
    /// The guard failed and let grants through (policy warn) only because
    /// reservations cover the volume: if they turn out unsupported, the
    /// guard is run again and refuses.
    guard_needs_resv: Option<GuardCheck>,
    resv: Option<ReservationLink>,
    /// This node's reservation key is registered on the namespace (so the
    /// target will refuse its writes once a peer preempts it).
    resv_registered: bool,
    /// The reservation is held (checked every renew interval).
    resv_holding: bool,
    /// The reservation was lost: rejoin after the fence.
    resv_lost: bool,
    resv_check: tokio::time::Interval,
    /// The device went away (why): close it once nothing is held.
    gone: Option<String>,
    /// Orders mounts for pods and fences ([`podmount`]).
    mount_gate: Arc<MountGate>,
}

impl<O: FenceOps + 'static> VolumeTask<O> {
    /// Builds the task (starting its I/O worker thread) over `chans`.
    /// On failure the channels come back with the error.
    pub fn new(
        setup: VolumeSetup<O>,
        chans: VolumeChannels,
    ) -> Result<VolumeTask<O>, (DiskError, VolumeChannels)> {
        let worker = match IoWorker::spawn(&format!("lease-{}", setup.name), setup.store) {
            Ok(w) => w,
            Err(e) => return Err((e, chans)),
        };
        let params = setup.identity.params;
        let task = VolumeTask {
            name: setup.name,
            index: setup.index,
            device: setup.device,
            rdev: setup.rdev,
            diskseq: setup.diskseq,
            params,
            lease: LeaseMachine::new(setup.identity, setup.layout),
            sessions: SessionMachine::new(setup.sessions),
            worker,
            io: None,
            lease_wake: None,
            session_wake: None,
            fence: None,
            fence_started: None,
            fence_cause: "",
            waiting: HashMap::new(),
            next_req: 0,
            epoch: setup.epoch,
            guards: setup.guards,
            fence_ops: setup.fence_ops,
            mmp_clean: setup.mmp_clean,
            last_valid_until: None,
            last_renewal: None,
            fenced: false,
            snapshot: chans.snapshot,
            events: chans.events,
            commands: chans.commands,
            queue: VecDeque::new(),
            metrics: setup.metrics,
            write_started: None,
            seek_started: None,
            handover_started: None,
            device_news: chans.device_news,
            guard: setup.guard,
            guard_needs_resv: None,
            resv_registered: false,
            resv: setup.reservation,
            resv_holding: false,
            resv_lost: false,
            resv_check: {
                let every = Duration::from_millis(params.renew_interval_ms.max(1) as u64);
                let mut t = tokio::time::interval_at(Instant::now() + every, every);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            },
            gone: None,
            mount_gate: Arc::default(),
        };
        Ok(task)
    }

    /// Closes the device (the worker thread ends with the task) and hands
    /// the channels back.
    fn into_channels(self) -> VolumeChannels {
        VolumeChannels {
            name: self.name,
            commands: self.commands,
            snapshot: self.snapshot,
            events: self.events,
            device_news: self.device_news,
        }
    }

    fn now(&self) -> Millis {
        Instant::now()
            .saturating_duration_since(self.epoch)
            .as_millis() as Millis
    }

    fn at(&self, ms: Millis) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// Runs until told to stop (or the command channel closes) and nothing
    /// is held any more. While stopping it still serves keepalives and
    /// releases, so a holder asked to stop can finish cleanly.
    pub async fn run(mut self) -> Exit {
        let mut stopping = false;
        let mut closed = false;
        loop {
            self.drain().await;
            self.publish();
            let idle = !self.sessions.may_be_writing()
                && self.sessions.lease().is_none()
                && matches!(self.sessions.phase(), Phase::Idle | Phase::Broken);
            if stopping && idle {
                return Exit::Stopped;
            }
            if self.gone.is_some()
                && idle
                && self.lease.holding().is_none()
                && self.io.is_none()
                && self.fence.is_none()
            {
                tracing::warn!(volume = %self.name, "device gone: closed; waiting for it to come back");
                if let Ok(mut g) = self.guards.lock() {
                    if let Some(slot) = g.get_mut(self.index) {
                        *slot = Guard::NotWriting;
                    }
                }
                let why = self.gone.take().unwrap_or_default();
                return Exit::DeviceGone(self.into_channels(), why);
            }
            let wake = [self.lease_wake, self.session_wake]
                .into_iter()
                .flatten()
                .min()
                .map(|t| self.at(t));
            let io = self.io.as_mut().map(|(rx, _)| rx);
            let fence = self.fence.as_mut();
            let news = self.device_news.as_mut();
            let resv = self.resv.as_mut().map(|l| &mut l.events);
            let holding = self.resv_holding;
            tokio::select! {
                n = maybe_recv(news) => match n {
                    Some(n) => self.on_device(n),
                    None => self.device_news = None,
                },
                e = maybe_recv(resv) => match e {
                    Some(e) => self.on_resv_events(vec![e]),
                    None => self.resv = None,
                },
                _ = self.resv_check.tick(), if holding => {
                    if let Some(link) = &self.resv {
                        link.send(ResvInput::Check);
                    }
                }
                cmd = self.commands.recv(), if !closed => match cmd {
                    Some(VolumeCmd::Api(c)) => self.on_api(c),
                    Some(VolumeCmd::Shutdown) => {
                        stopping = true;
                        self.queue.push_back(Work::Session(session::Input::Shutdown));
                    }
                    None => {
                        (closed, stopping) = (true, true);
                        self.queue.push_back(Work::Session(session::Input::Shutdown));
                    }
                },
                res = maybe(io) => {
                    let (_, is_read) = self.io.take().expect("an I/O was outstanding");
                    self.queue.push_back(Work::Lease(io_input(res, is_read)));
                }
                ok = maybe(fence) => {
                    self.fence = None;
                    self.queue.push_back(Work::Session(session::Input::FenceDone { ok: ok.unwrap_or(false) }));
                }
                () = sleep_until_opt(wake) => {
                    let now = self.now();
                    if self.lease_wake.is_some_and(|t| now >= t) {
                        self.lease_wake = None;
                        self.queue.push_back(Work::Lease(lease::Input::Tick));
                    }
                    if self.session_wake.is_some_and(|t| now >= t) {
                        self.session_wake = None;
                        self.queue.push_back(Work::Session(session::Input::Tick));
                    }
                }
            }
        }
    }

    fn on_api(&mut self, command: Command) {
        let now = self.now();
        self.next_req += 1;
        let req = self.next_req;
        let input = match command {
            Command::Acquire {
                holder,
                timeout,
                reply,
                ..
            } => {
                if let Some(why) = self.check_guard() {
                    let _ = reply.send(Err(ApiError::unavailable(why)));
                    return;
                }
                self.waiting.insert(req, Waiting::Grant(reply));
                let session = format!("{:x}-{:032x}", self.index, rand::random::<u128>());
                let wait = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
                session::Input::Acquire {
                    req,
                    holder,
                    session,
                    deadline: now.saturating_add(wait),
                }
            }
            Command::Keepalive { session, reply } => {
                self.waiting.insert(req, Waiting::Grant(reply));
                session::Input::Keepalive { req, session }
            }
            Command::Release { session, reply, .. } => {
                self.waiting.insert(req, Waiting::Status(reply));
                session::Input::Release { req, session }
            }
            Command::Handover { to_node, reply, .. } => {
                self.waiting.insert(req, Waiting::Status(reply));
                session::Input::Handover { req, to_node }
            }
            Command::Mount {
                volume,
                session,
                target,
                peer,
                reply,
            } => {
                self.mount_for(now, volume, session, target, peer, reply);
                return;
            }
            Command::ListVolumes { reply } => {
                let _ = reply.send(Ok(vec![self.status()]));
                return;
            }
            Command::GetVolume { reply, .. } => {
                let _ = reply.send(Ok(self.status()));
                return;
            }
            Command::Subscribe { reply, .. } => {
                let _ = reply.send(Ok(self.events.subscribe()));
                return;
            }
        };
        self.queue.push_back(Work::Session(input));
    }

    /// Mounts for a live, granted session ([`podmount`]), off this task.
    fn mount_for(
        &mut self,
        now: Millis,
        volume: String,
        session: String,
        target: PathBuf,
        peer: Arc<std::os::fd::OwnedFd>,
        reply: crate::api::Reply<crate::api::Mounted>,
    ) {
        if let Err(r) = self.sessions.live(now, &session) {
            let _ = reply.send(Err(self.refusal(r)));
            return;
        }
        let granted: Vec<String> = REQUIRED_MOUNT_OPTIONS
            .iter()
            .map(|s| s.to_string())
            .collect();
        let spec = match crate::nsmount::mount_spec(&granted, &[]) {
            Ok(spec) => spec,
            Err(e) => {
                let _ = reply.send(Err(ApiError::unavailable(e.to_string())));
                return;
            }
        };
        let job = PodMount {
            volume,
            session,
            device: self.device.clone(),
            target,
            peer,
            spec,
        };
        let gate = Arc::clone(&self.mount_gate);
        let ticket = gate.ticket();
        podmount::spawn(gate, ticket, job, reply);
    }

    /// Runs the stale-I/O guard until it has let a grant through once;
    /// `Some(why)` refuses the acquire (with the exact fixes).
    fn check_guard(&mut self) -> Option<String> {
        let g = self.guard.as_ref()?;
        // Attribute files of sysfs: no device I/O.
        let decision = guard::enforce(&g.sysfs_root, &g.namespace, &self.params, g.policy);
        let refused = |fixes: &[String]| {
            format!(
                "the stale-I/O guard refuses NVMe namespace {}: writes queued on this node could \
                 land after another node took over; fix: {}",
                g.namespace,
                if fixes.is_empty() {
                    "see `blockfence doctor`".to_string()
                } else {
                    fixes.join("; ")
                }
            )
        };
        match decision {
            Ok(Decision::Proceed { applied, .. }) => {
                if !applied.is_empty() {
                    tracing::warn!(volume = %self.name, ?applied, "stale-I/O guard: set fast_io_fail_tmo; the volume now passes");
                }
            }
            Ok(Decision::Warned { verdict }) if !self.resv_registered => {
                // Nothing would stop this node's queued writes from landing
                // after a takeover: the bounded-landing assumption of the
                // protocol (docs/PROTOCOL.md §5) would rest on nothing.
                let why = format!(
                    "{} (policy warn grants only where NVMe reservations make the target refuse \
                     a fenced node's writes, and this node holds no registration on the \
                     namespace{})",
                    refused(&verdict.fixes),
                    if self.resv.is_some() {
                        " yet: try again in a moment"
                    } else {
                        ": reservations are unsupported there"
                    }
                );
                tracing::error!(volume = %self.name, "{why}");
                return Some(why);
            }
            Ok(Decision::Warned { verdict }) => {
                self.send_event(VolumeEventKind::StaleIoWarning {
                    fixes: verdict.fixes.join("; "),
                });
                tracing::warn!(volume = %self.name, fixes = ?verdict.fixes,
                    "stale-I/O guard (policy warn): granting because NVMe reservations refuse a \
                     fenced node's queued writes; fix the timeouts all the same");
                self.guard_needs_resv = Some(g.clone());
            }
            Ok(Decision::Refused { verdict, .. }) => {
                let why = refused(&verdict.fixes);
                tracing::error!(volume = %self.name, "{why}");
                return Some(why);
            }
            Err(e) if g.policy == Policy::Warn => {
                tracing::warn!(volume = %self.name, error = %e, "stale-I/O guard cannot read the namespace (policy warn: carrying on)");
            }
            Err(e) => {
                return Some(format!(
                    "the stale-I/O guard cannot check NVMe namespace {}: {e}",
                    g.namespace
                ))
            }
        }
        self.guard = None;
        None
    }

    fn on_device(&mut self, news: DeviceNews) {
        match news {
            DeviceNews::PathLost(why) => {
                tracing::error!(volume = %self.name, %why, "device path lost: fencing now");
                self.gone = Some(why.clone());
                self.send_event(VolumeEventKind::PathLost {
                    reason: why.clone(),
                });
                self.queue
                    .push_back(Work::Session(session::Input::PathLost { why }));
            }
            DeviceNews::PathBack => {
                tracing::warn!(volume = %self.name, "device path back");
                self.gone = None;
                self.send_event(VolumeEventKind::PathBack {});
                self.queue
                    .push_back(Work::Session(session::Input::PathBack));
            }
        }
    }

    /// Takes the NVMe reservation after winning the lease, before the grant
    /// is answered; returns its events (handled after the lease news).
    async fn resv_become_holder(&mut self, now: Millis, valid_until: Millis) -> Vec<ResvEvent> {
        let Some(link) = &self.resv else {
            return Vec::new();
        };
        let rx = link.ask(ResvInput::BecomeHolder);
        let limit = Duration::from_millis(valid_until.saturating_sub(now));
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(events)) => events,
            Ok(Err(_)) => vec![ResvEvent::AcquireFailed {
                detail: "the reservation thread ended".into(),
            }],
            Err(_) => vec![ResvEvent::AcquireFailed {
                detail: "no answer within the lease's validity".into(),
            }],
        }
    }

    fn on_resv_events(&mut self, events: Vec<ResvEvent>) {
        for e in events {
            match e {
                ResvEvent::Unsupported { reason } => {
                    tracing::warn!(volume = %self.name, %reason, "reservations: unsupported (disk lease only)");
                    self.resv = None;
                    self.resv_holding = false;
                    self.resv_registered = false;
                    if let Some(g) = self.guard_needs_resv.take() {
                        // The warn grant leaned on reservations: end it, and let
                        // the guard judge (and refuse) the next acquire.
                        tracing::error!(volume = %self.name,
                            "the stale-I/O guard passed only because of reservations, which are unsupported: fencing now");
                        self.guard = Some(g);
                        self.queue
                            .push_back(Work::Session(session::Input::ReservationLost));
                    }
                }
                ResvEvent::Acquired { preempted } => {
                    tracing::info!(volume = %self.name, ?preempted, "NVMe reservation held");
                    self.resv_holding = true;
                    self.resv_registered = true;
                }
                ResvEvent::Released => self.resv_holding = false,
                ResvEvent::ReservationLost { reason } => {
                    tracing::error!(volume = %self.name, ?reason, "NVMe reservation lost: fencing now");
                    self.resv_holding = false;
                    self.resv_lost = true;
                    self.queue
                        .push_back(Work::Session(session::Input::ReservationLost));
                }
                ResvEvent::AcquireFailed { detail } => {
                    tracing::error!(volume = %self.name, %detail, "NVMe reservation not acquired: fencing now");
                    self.resv_holding = false;
                    self.resv_lost = true;
                    self.queue
                        .push_back(Work::Session(session::Input::ReservationLost));
                }
                ResvEvent::Registered => {
                    self.resv_registered = true;
                    tracing::info!(volume = %self.name, "NVMe reservation key registered")
                }
                ResvEvent::CommandFailed { command, detail } => {
                    tracing::warn!(volume = %self.name, ?command, %detail, "reservation command failed")
                }
            }
        }
    }

    fn send_event(&self, kind: VolumeEventKind) {
        let _ = self.events.send(VolumeEvent {
            volume: self.name.clone(),
            kind,
        });
    }

    /// Steps the machines until no work is left.
    async fn drain(&mut self) {
        while let Some(work) = self.queue.pop_front() {
            match work {
                Work::Lease(input) => self.lease_step(input).await,
                Work::Session(input) => self.session_step(input),
            }
        }
    }

    async fn lease_step(&mut self, input: lease::Input) {
        let now = self.now();
        let actions = self.lease.step(now, input);
        self.lease_wake = None;
        for action in actions {
            match action {
                lease::Action::Read { first_block, count } => {
                    self.metrics.lease_io(&self.name, 1, count as u64, 0);
                    let rx = self
                        .worker
                        .submit_async(Request::Read { first_block, count });
                    self.io = Some((rx, true));
                }
                lease::Action::Write { block, data } => {
                    self.metrics.lease_io(&self.name, 0, 0, 1);
                    self.write_started = Some(Instant::now());
                    let rx = self.worker.submit_async(Request::Write { block, data });
                    self.io = Some((rx, false));
                }
                lease::Action::WakeAt(t) => self.lease_wake = Some(t),
                lease::Action::Emit(event) => self.on_lease_event(now, event).await,
            }
        }
        // A successful renewal moves valid_until without an event.
        if let Some((_, until)) = self.lease.holding() {
            if self.last_valid_until.is_some_and(|last| until > last) {
                let t = Instant::now();
                self.last_renewal = Some(t);
                self.metrics.renewed_now(&self.name, t.into_std());
                if let Some(started) = self.write_started {
                    self.metrics
                        .renewal(&self.name, t.saturating_duration_since(started));
                }
                self.queue
                    .push_back(Work::Session(session::Input::Lease(LeaseNews::Renewed {
                        valid_until: until,
                    })));
            }
            self.last_valid_until = Some(until);
        } else {
            self.last_valid_until = None;
        }
    }

    async fn on_lease_event(&mut self, now: Millis, event: Event) {
        tracing::info!(volume = %self.name, ?event, "lease");
        let news = match event {
            Event::Joined { .. } => return,
            Event::Waiting { holder } => LeaseNews::Waiting { holder },
            Event::Acquired {
                generation,
                valid_until,
            } => {
                let t = Instant::now();
                self.last_renewal = Some(t);
                self.metrics.renewed_now(&self.name, t.into_std());
                self.metrics.set_generation(&self.name, generation);
                if let Some(started) = self.seek_started.take() {
                    self.metrics
                        .takeover(&self.name, t.saturating_duration_since(started));
                }
                let resv = self.resv_become_holder(now, valid_until).await;
                let failed = resv.iter().find_map(|e| match e {
                    ResvEvent::AcquireFailed { detail } => Some(detail.clone()),
                    ResvEvent::ReservationLost { reason } => Some(format!("{reason:?}")),
                    _ => None,
                });
                self.on_resv_events(resv);
                if let Some(why) = failed {
                    // No writer starts: the session machine gives the lease back.
                    self.resv_lost = false;
                    self.queue
                        .retain(|w| !matches!(w, Work::Session(session::Input::ReservationLost)));
                    self.queue
                        .push_back(Work::Session(session::Input::ReservationRefused { why }));
                    if let Some(link) = &self.resv {
                        // Not wanted any more; registered again if need be.
                        link.send(ResvInput::StepDown);
                        link.send(ResvInput::Check);
                    }
                } else if self.mmp_clean {
                    self.clean_mmp(now, valid_until).await;
                }
                self.queue
                    .push_back(Work::Session(session::Input::Lease(LeaseNews::Acquired {
                        generation,
                        valid_until,
                    })));
                return;
            }
            Event::RenewFailed { valid_until, .. } => {
                self.metrics.renewal_failed(&self.name);
                LeaseNews::RenewLate { valid_until }
            }
            Event::Lost { generation, reason } => LeaseNews::Lost {
                generation,
                reason: format!("{reason:?}"),
            },
            Event::Released { generation, .. } => LeaseNews::Released { generation },
            Event::Stopped => LeaseNews::Stopped,
            Event::Failed { error } => LeaseNews::Failed { error },
        };
        self.queue
            .push_back(Work::Session(session::Input::Lease(news)));
    }

    /// Marks the MMP block clean, within the lease's validity; a failure is
    /// logged (the mount then waits out MMP itself, which is safe).
    async fn clean_mmp(&self, now: Millis, valid_until: Millis) {
        let device = self.device.clone();
        let limit = Duration::from_millis(
            valid_until
                .saturating_sub(now)
                .min(self.params.io_timeout_ms as u64),
        );
        let job = tokio::task::spawn_blocking(move || crate::ext4::mark_mmp_clean(&device));
        match tokio::time::timeout(limit, job).await {
            Ok(Ok(Ok(previous))) => {
                tracing::info!(volume = %self.name, ?previous, "ext4 MMP marked clean")
            }
            Ok(Ok(Err(e))) => tracing::warn!(volume = %self.name, error = %e, "MMP clean failed"),
            Ok(Err(e)) => tracing::warn!(volume = %self.name, error = %e, "MMP clean panicked"),
            Err(_) => tracing::warn!(volume = %self.name, "MMP clean timed out"),
        }
    }

    fn session_step(&mut self, input: session::Input) {
        let now = self.now();
        let actions = self.sessions.step(now, input);
        self.session_wake = None;
        for action in actions {
            match action {
                session::Action::SeekLease => {
                    self.seek_started.get_or_insert_with(Instant::now);
                    self.queue.push_back(Work::Lease(lease::Input::Acquire));
                }
                session::Action::ReleaseLease => {
                    if let (Some(link), true) = (&self.resv, self.resv_holding) {
                        link.send(ResvInput::StepDown);
                        self.resv_holding = false;
                    }
                    self.queue.push_back(Work::Lease(lease::Input::Release))
                }
                session::Action::Fence { deadline, cause } => self.start_fence(deadline, cause),
                session::Action::Reply { req, answer } => self.answer(req, answer),
                session::Action::Publish(p) => self.publish_event(p),
                session::Action::WakeAt(t) => self.session_wake = Some(t),
            }
        }
    }

    fn start_fence(&mut self, deadline: Millis, cause: EndReason) {
        tracing::warn!(volume = %self.name, cause = cause.as_str(), "fencing this node's use of the volume");
        let (tx, rx) = oneshot::channel();
        let ops = Arc::clone(&self.fence_ops);
        let deadline = self.at(deadline).into_std();
        let device = self.rdev.map(|rdev| (self.device.clone(), rdev));
        let diskseq = self.diskseq;
        let name = self.name.clone();
        self.fence_started = Some(Instant::now());
        // No mount for a pod may land after this fence (podmount's gate).
        self.mount_gate.close();
        let gate = Arc::clone(&self.mount_gate);
        tokio::task::spawn_blocking(move || {
            gate.settle();
            let ok = match device {
                Some((device, rdev)) => {
                    let r = fence_device(ops, &device, rdev, diskseq, deadline);
                    if r.ok {
                        tracing::info!(volume = %name, device = %device.display(),
                            duration_ms = r.duration_ms, killed = ?r.killed, "fenced");
                    } else {
                        tracing::error!(volume = %name, device = %device.display(),
                            duration_ms = r.duration_ms, killed = ?r.killed, errors = ?r.errors,
                            "fence failed: the lease is kept and the watchdog starved");
                    }
                    r.ok
                }
                None => true,
            };
            let _ = tx.send(ok);
        });
        self.fence = Some(rx);
    }

    fn answer(&mut self, req: u64, answer: Answer) {
        let Some(waiting) = self.waiting.remove(&req) else {
            return;
        };
        let status = self.status();
        match (waiting, answer) {
            (Waiting::Grant(reply), Answer::Grant(g)) => {
                let _ = reply.send(Ok(Grant {
                    session: g.session,
                    generation: g.generation,
                    device: self.device.display().to_string(),
                    mount_options: REQUIRED_MOUNT_OPTIONS
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                    valid_for_ms: g.valid_for_ms,
                    keepalive_interval_ms: g.keepalive_interval_ms,
                    stop: g.stop.map(|k| match k {
                        StopKind::Handover => StopReason::Handover,
                        StopKind::Shutdown => StopReason::Shutdown,
                    }),
                }));
            }
            (Waiting::Status(reply), Answer::Done) => {
                let _ = reply.send(Ok(status));
            }
            (Waiting::Grant(reply), Answer::Refused(r)) => {
                let _ = reply.send(Err(self.refusal(r)));
            }
            (Waiting::Status(reply), Answer::Refused(r)) => {
                let _ = reply.send(Err(self.refusal(r)));
            }
            (Waiting::Grant(reply), Answer::Done) => {
                let _ = reply.send(Err(ApiError::unavailable(
                    "internal: no grant in the answer",
                )));
            }
            (Waiting::Status(reply), Answer::Grant(_)) => {
                let _ = reply.send(Ok(status));
            }
        }
    }

    fn refusal(&self, r: Refusal) -> ApiError {
        match r {
            Refusal::Held { holder } => {
                ApiError::held(&self.name, holder.as_deref().unwrap_or("another node"))
            }
            Refusal::UnknownSession => ApiError::new(
                ErrorCode::UnknownSession,
                "no such session on this volume: it was never granted or is long gone",
            ),
            Refusal::SessionEnded(why) => ApiError::new(
                ErrorCode::SessionEnded,
                format!("the session has ended ({}): stop writing now", why.as_str()),
            ),
            Refusal::NotHeld { holder } => ApiError::new(
                ErrorCode::NotHeld,
                match holder {
                    Some(h) => format!(
                        "volume {:?} has no session on this node (held by {h:?}): ask the holder's daemon",
                        self.name
                    ),
                    None => format!("volume {:?} is not held by this node", self.name),
                },
            ),
            Refusal::Unavailable(why) => ApiError::unavailable(why),
        }
    }

    fn publish_event(&mut self, p: Published) {
        let kind = match p {
            Published::Granted {
                session,
                holder,
                generation,
            } => VolumeEventKind::Granted {
                session,
                holder,
                generation,
            },
            Published::RenewalLate {
                generation,
                valid_for_ms,
            } => VolumeEventKind::RenewalLate {
                generation,
                valid_for_ms,
            },
            Published::HandoverRequested { session, to_node } => {
                self.handover_started = Some(Instant::now());
                VolumeEventKind::HandoverRequested { session, to_node }
            }
            Published::Fencing { generation, cause } => {
                self.fenced = false;
                self.fence_cause = cause.as_str();
                VolumeEventKind::Fencing {
                    generation,
                    reason: cause.as_str().to_string(),
                }
            }
            Published::Fenced { generation, ok } => {
                self.fenced = true;
                if ok && std::mem::take(&mut self.resv_lost) {
                    if let Some(link) = &self.resv {
                        link.send(ResvInput::Rejoin);
                    }
                }
                let took = self
                    .fence_started
                    .take()
                    .map_or(Duration::ZERO, |t| t.elapsed());
                self.metrics.fence(&self.name, self.fence_cause, ok, took);
                let duration_ms = took.as_millis() as u64;
                VolumeEventKind::Fenced {
                    generation,
                    ok,
                    duration_ms,
                }
            }
            Published::Released { generation } => {
                self.fenced = false;
                if let Some(t) = self.handover_started.take() {
                    self.metrics.handover(&self.name, t.elapsed());
                }
                VolumeEventKind::Released { generation }
            }
        };
        tracing::info!(volume = %self.name, event = ?kind, "event");
        let _ = self.events.send(VolumeEvent {
            volume: self.name.clone(),
            kind,
        });
    }

    fn snapshot_now(&self) -> Snapshot {
        let phase = self.sessions.phase();
        let held = self.lease.holding().is_some() || self.sessions.holder().is_some();
        Snapshot {
            state: if held {
                VolumeState::Held
            } else {
                VolumeState::Free
            },
            holder: self.sessions.holder().or_else(|| {
                self.lease
                    .holding()
                    .map(|_| self.lease.identity().name.clone())
            }),
            generation: self.sessions.generation(),
            last_renewal: self.lease.holding().and(self.last_renewal),
            fence_state: match phase {
                Phase::Serving => FenceState::Armed,
                Phase::Fencing | Phase::FenceFailed => FenceState::Fenced,
                _ if self.fenced => FenceState::Fenced,
                _ => FenceState::Idle,
            },
            phase,
        }
    }

    fn status(&self) -> VolumeStatus {
        self.snapshot_now().status(&self.name, Instant::now())
    }

    /// Publishes the snapshot, the metrics' gauges and the watchdog guard.
    fn publish(&mut self) {
        let snap = self.snapshot_now();
        self.metrics
            .set_state(&self.name, lease_state(snap.phase, self.fenced));
        self.metrics
            .set_sessions(&self.name, self.sessions.sessions());
        self.snapshot.send_replace(snap);
        let guard = if self.sessions.phase() == Phase::FenceFailed {
            Guard::FenceFailed
        } else if self.sessions.may_be_writing() {
            Guard::Writing {
                valid_until: self.sessions.lease().map_or(0, |(_, until)| until),
                fence_timeout_ms: self.params.fence_timeout_ms as u64,
            }
        } else {
            Guard::NotWriting
        };
        if let Ok(mut g) = self.guards.lock() {
            if let Some(slot) = g.get_mut(self.index) {
                *slot = guard;
            }
        }
    }
}

fn io_input(
    res: Result<Result<IoReply, DiskError>, oneshot::error::RecvError>,
    is_read: bool,
) -> lease::Input {
    let outcome = match res {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(e)) => Err(Waited::Failed(e).to_string()),
        Err(_) => Err(Waited::WorkerGone.to_string()),
    };
    lease_input(outcome, is_read)
}

/// The metrics' lease state of a volume in `phase`.
/// (`Free` covers "not this node's": another node may hold it; a fence that
/// failed stays `Fencing`, since it never completes.)
fn lease_state(phase: Phase, fenced: bool) -> LeaseState {
    match phase {
        Phase::Idle | Phase::Broken if fenced => LeaseState::Fenced,
        Phase::Idle | Phase::Broken => LeaseState::Free,
        Phase::Seeking => LeaseState::Waiting,
        Phase::Serving => LeaseState::Held,
        Phase::Fencing | Phase::FenceFailed => LeaseState::Fencing,
        Phase::Releasing => LeaseState::Releasing,
    }
}

/// Awaits `f` if there is one; never completes otherwise.
async fn maybe<F: std::future::Future + Unpin>(f: Option<&mut F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Receives from `rx` if there is one; never completes otherwise.
async fn maybe_recv<T>(rx: Option<&mut mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
