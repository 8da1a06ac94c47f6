//! `blockfence daemon`: the runtime that holds many volumes' leases at once,
//! serves the node-local API, fences this node's use of a volume when it can
//! no longer prove it owns it, and feeds the watchdog.
//!
//! Tasks and channels (all on one tokio runtime):
//! ```text
//! API server (axum) --Command--> dispatcher --VolumeCmd--> volume task (one per volume)
//!                                    |                       | owns LeaseMachine + SessionMachine
//!                                    | reads snapshots <-----+ publishes Snapshot, Guard, events
//!                                                            | I/O worker thread (lease I/O, deadlines)
//!                                                            | fence on a blocking thread
//!                                                            | reservation thread (NVMe)
//! device monitor thread --DeviceEvent--> bridge thread --> router --DeviceNews--> volume task
//! watchdog feeder: every FEED_INTERVAL, feeds iff core::watchdog::may_feed(guards)
//! ```
//! A volume whose device is missing (or went away while idle) is served by
//! its waiting loop (`volume_main`): acquires are refused saying why, and the
//! device is opened when the router reports it back (docs/DEVICES.md §6).
//! Invariants:
//! - decisions live in `core::lease`, `core::session`, `core::watchdog`; this
//!   module wires and carries out;
//! - one clock: tokio's monotonic `Instant`, with one epoch for the daemon;
//! - the watchdog is fed from one place only, under the policy; a stopped
//!   daemon stops feeding it, which is the point.
//!
//! What it must not do: hold a lock across an await, or wait on a device on a
//! runtime thread (lease I/O is on the worker threads, fences and MMP
//! cleaning on blocking threads).

pub mod config;
pub mod devices;
pub mod mounts;
pub mod podmount;
pub mod volume;

pub use config::{DaemonArgs, DaemonConfig, VolumeSpec};

use crate::api::{ApiError, Command, ServeConfig, Server};
use crate::core::session::SessionConfig;
use crate::core::watchdog::{self, Guard};
use crate::disk::runner::{open_lease, RunnerError};
use crate::fence::device::DeviceOps;
use crate::fence::{FenceOps, FileWatchdog, Watchdog};
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use volume::{VolumeCmd, VolumeHandle, VolumeSetup, VolumeTask};

/// How often the watchdog is fed while the policy allows it.
pub const FEED_INTERVAL: Duration = Duration::from_millis(100);
/// Depth of the API's command channel.
pub const API_QUEUE: usize = 1024;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("volume {volume:?} ({}): {error}", device.display())]
    Volume {
        volume: String,
        device: PathBuf,
        error: RunnerError,
    },
    #[error("--watchdog-timeout-ms: {0}")]
    Watchdog(#[from] watchdog::TimeoutTooLong),
    #[error("watchdog {}: {error}", path.display())]
    WatchdogOpen {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("API socket directory {}: {error}", path.display())]
    SocketDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Serve(#[from] crate::api::ServeError),
    #[error(
        "volume {volume:?}: no device matches {spec:?} under {sysfs_root}: check the id \
             (`blockfence doctor` lists the namespaces) or that the device is attached"
    )]
    DeviceMissing {
        volume: String,
        spec: PathBuf,
        sysfs_root: PathBuf,
    },
    #[error("volume {volume:?}: {error}")]
    Device {
        volume: String,
        error: crate::device::DeviceError,
    },
    #[error("{0}")]
    Internal(String),
}

/// A running daemon (for tests and `run`).
pub struct Daemon {
    handles: Vec<VolumeHandle>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    server: Server,
    feeder: Option<(
        tokio::task::JoinHandle<Option<FileWatchdog>>,
        tokio::sync::watch::Sender<bool>,
    )>,
    dispatcher: tokio::task::JoinHandle<()>,
    drain_limit: Duration,
    starved: Arc<std::sync::atomic::AtomicBool>,
    monitor: Option<crate::device::monitor::Monitor>,
    device_events: mpsc::UnboundedSender<crate::device::DeviceEvent>,
}

impl Daemon {
    /// Opens every volume, starts its task, the API and the watchdog feeder.
    pub async fn start(cfg: DaemonConfig) -> Result<Daemon, DaemonError> {
        Daemon::start_with(cfg, Arc::new(DeviceOps)).await
    }

    /// [`Daemon::start`] with other fence operations (tests).
    pub async fn start_with<O: FenceOps + 'static>(
        cfg: DaemonConfig,
        ops: Arc<O>,
    ) -> Result<Daemon, DaemonError> {
        Daemon::start_full(cfg, ops, Arc::new(devices::SystemReservations)).await
    }

    /// [`Daemon::start_with`] with other NVMe reservation commands (tests:
    /// `nvme::fake`).
    pub async fn start_full<O: FenceOps + 'static>(
        cfg: DaemonConfig,
        ops: Arc<O>,
        reservations: Arc<dyn devices::ReservationOpener>,
    ) -> Result<Daemon, DaemonError> {
        let epoch = Instant::now();
        let dev = &cfg.devices;
        let metrics = Arc::new(Metrics::new());
        let guards = Arc::new(Mutex::new(vec![Guard::NotWriting; cfg.volumes.len()]));
        let mut min_fence_ms = u64::MAX;
        let mut max_window_ms = 0u64;
        let mut starts = Vec::new();
        for (index, spec) in cfg.volumes.iter().enumerate() {
            let plan = Plan {
                spec: spec.clone(),
                index,
                node: cfg.node_name.clone(),
                params: cfg.params,
                session_timeout: cfg.session_timeout,
                stop_timeout: cfg.stop_timeout,
                handover_hold_off: cfg.handover_hold_off,
                devices: dev.clone(),
                epoch,
                guards: Arc::clone(&guards),
                ops: Arc::clone(&ops),
                metrics: Arc::clone(&metrics),
                reservations: Arc::clone(&reservations),
                watchdog_ms: None,
            };
            // A device present now must open (a bad one is a start-up
            // error); a missing one is waited for.
            let located = plan.locate()?;
            let first = match &located {
                Some(l) => Some(plan.open(l).await?),
                None => {
                    tracing::warn!(volume = %spec.name, device = %spec.device.display(),
                        "the volume's device is not present: waiting for it to appear");
                    None
                }
            };
            let p = first
                .as_ref()
                .map(|s| s.identity.params)
                .unwrap_or_else(|| cfg.params.apply(crate::core::params::Params::default()));
            min_fence_ms = min_fence_ms.min(p.fence_timeout_ms as u64);
            max_window_ms =
                max_window_ms.max(p.lease_timeout_ms as u64 + p.fence_timeout_ms as u64);
            starts.push((plan, located, first));
        }
        let watchdog_timeout = cfg.watchdog_timeout.map(millis).unwrap_or(min_fence_ms);
        watchdog::check_timeout(watchdog_timeout, min_fence_ms)?;
        let mut watched = Vec::new();
        let mut handles = Vec::new();
        let mut tasks = Vec::new();
        for (mut plan, located, first) in starts {
            if cfg.watchdog.is_some() {
                plan.watchdog_ms = Some(watchdog_timeout);
            }
            let (news_tx, news_rx) = mpsc::unbounded_channel();
            let (chans, handle) = volume::channels(&plan.spec.name, plan.index, news_rx);
            watched.push(devices::Watched {
                volume: plan.spec.name.clone(),
                spec: plan.spec.device.clone(),
                located,
                news: news_tx,
            });
            let why = plan.missing();
            tasks.push(tokio::spawn(volume_main(plan, chans, first, why)));
            handles.push(handle);
        }
        let watch_paths = watched
            .iter()
            .any(|w| w.located.as_ref().map_or(true, |l| l.namespace.is_some()));
        let (device_events, device_rx) = mpsc::unbounded_channel();
        tokio::spawn(devices::route_events(
            dev.sysfs_root.clone(),
            dev.dev_dir.clone(),
            device_rx,
            watched,
        ));
        let monitor = start_monitor(&dev.sysfs_root, watch_paths, device_events.clone());
        let starved = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let feeder = match &cfg.watchdog {
            Some(path) => {
                let dog = FileWatchdog::open(path).map_err(|error| DaemonError::WatchdogOpen {
                    path: path.clone(),
                    error,
                })?;
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                let g = Arc::clone(&guards);
                Some((
                    tokio::spawn(feed_watchdog(
                        dog,
                        g,
                        epoch,
                        watchdog_timeout,
                        stop_rx,
                        Arc::clone(&starved),
                    )),
                    stop_tx,
                ))
            }
            None => {
                tracing::warn!(
                    "no --watchdog: a stalled daemon is covered only by `blockfence run`'s own deadline"
                );
                None
            }
        };
        if let Some(dir) = cfg.socket.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|error| DaemonError::SocketDir {
                    path: dir.to_path_buf(),
                    error,
                })?;
            }
        }
        let (api_tx, api_rx) = mpsc::channel(API_QUEUE);
        let dispatcher = tokio::spawn(dispatch(api_rx, handles.clone()));
        let server = Server::start(
            &ServeConfig {
                socket: cfg.socket.clone(),
                tcp: cfg.listen,
            },
            api_tx,
            metrics,
        )
        .await?;
        tracing::info!(node = %cfg.node_name, volumes = handles.len(), socket = %cfg.socket.display(), "daemon started");
        Ok(Daemon {
            handles,
            tasks,
            server,
            feeder,
            dispatcher,
            drain_limit: cfg.stop_timeout
                + Duration::from_millis(max_window_ms)
                + Duration::from_secs(5),
            starved,
            monitor,
            device_events,
        })
    }

    /// A receiver of `volume`'s events from now on (what the SSE stream
    /// sends), or `None` for an unknown volume.
    pub fn subscribe(
        &self,
        volume: &str,
    ) -> Option<tokio::sync::broadcast::Receiver<crate::api::VolumeEvent>> {
        self.handles
            .iter()
            .find(|h| h.name == volume)
            .map(|h| h.events.subscribe())
    }

    /// Feeds a device event as if the monitor had sent it (tests: events the
    /// kernel cannot be made to send, such as the removal of an open loop
    /// device, whose detach the kernel defers until it is closed).
    pub fn inject_device_event(&self, event: crate::device::DeviceEvent) {
        let _ = self.device_events.send(event);
    }

    /// Whether the watchdog has been starved for good (a fence failed).
    pub fn watchdog_starved(&self) -> bool {
        self.starved.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The API server (its socket and TCP address).
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Stops: asks every holder to stop, waits until every volume is fenced
    /// or released (bounded by the stop timeout plus the lease and fence
    /// budget), stops the API, and disarms the watchdog only if nothing may
    /// still be writing.
    pub async fn shutdown(self) -> Result<(), DaemonError> {
        for h in &self.handles {
            let _ = h.commands.send(VolumeCmd::Shutdown).await;
        }
        drop(self.handles);
        let mut clean = true;
        let deadline = Instant::now() + self.drain_limit;
        for task in self.tasks {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                clean = false;
            }
        }
        self.dispatcher.abort();
        if let Some(m) = self.monitor {
            let _ = tokio::task::spawn_blocking(move || m.stop()).await;
        }
        let served = self.server.shutdown().await;
        if let Some((feeder, stop)) = self.feeder {
            let _ = stop.send(true);
            if let Ok(Some(dog)) = feeder.await {
                if clean {
                    if let Err(e) = dog.disarm() {
                        tracing::error!(error = %e, "disarming the watchdog failed");
                    }
                } else {
                    tracing::error!("volumes did not settle: leaving the watchdog armed");
                }
            }
        }
        served?;
        if !clean {
            return Err(DaemonError::Internal(
                "some volumes did not settle before the shutdown limit".into(),
            ));
        }
        Ok(())
    }
}

/// Runs the daemon until `stop` completes, then shuts it down.
pub async fn run(cfg: DaemonConfig, stop: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let daemon = Daemon::start(cfg).await?;
    stop.await;
    tracing::info!("stopping: asking holders to stop");
    daemon.shutdown().await
}

/// What a volume needs to (re)open its device.
struct Plan<O> {
    spec: VolumeSpec,
    index: usize,
    node: String,
    params: config::ParamOverrides,
    session_timeout: Duration,
    stop_timeout: Duration,
    handover_hold_off: Duration,
    devices: config::DeviceOptions,
    epoch: Instant,
    guards: Arc<Mutex<Vec<Guard>>>,
    ops: Arc<O>,
    metrics: Arc<Metrics>,
    reservations: Arc<dyn devices::ReservationOpener>,
    /// With a watchdog: its timeout, which a volume opened after start-up
    /// must not exceed with its fence timeout.
    watchdog_ms: Option<u64>,
}

impl<O: FenceOps + 'static> Plan<O> {
    fn locate(&self) -> Result<Option<devices::Located>, DaemonError> {
        let d = &self.devices;
        devices::locate(&d.sysfs_root, &d.dev_dir, &self.spec.device).map_err(|error| {
            DaemonError::Device {
                volume: self.spec.name.clone(),
                error,
            }
        })
    }

    /// Why acquires are refused while the device is missing.
    fn missing(&self) -> String {
        format!(
            "its device {} is not present on this node (ids resolve under {})",
            self.spec.device.display(),
            self.devices.sysfs_root.display()
        )
    }

    fn failed(&self, device: &std::path::Path, error: RunnerError) -> DaemonError {
        DaemonError::Volume {
            volume: self.spec.name.clone(),
            device: device.to_path_buf(),
            error,
        }
    }

    /// Opens the lease area of the located device and everything the
    /// volume's task needs with it (guard, reservation).
    async fn open(&self, located: &devices::Located) -> Result<VolumeSetup<O>, DaemonError> {
        let (device, node, params) = (located.path.clone(), self.node.clone(), self.params);
        let opened = tokio::task::spawn_blocking(move || {
            open_lease(&device, &node, |area| params.apply(area))
        })
        .await
        .map_err(|e| DaemonError::Internal(e.to_string()))?
        .map_err(|error| self.failed(&located.path, error))?;
        let p = opened.identity.params;
        if let Some(w) = self.watchdog_ms.filter(|&w| w > p.fence_timeout_ms as u64) {
            return Err(self.failed(
                &located.path,
                RunnerError::Failed(format!(
                    "its fence timeout ({} ms) is below the watchdog timeout ({w} ms): restart \
                     the daemon with --watchdog-timeout-ms at most {} ms",
                    p.fence_timeout_ms, p.fence_timeout_ms
                )),
            ));
        }
        let rdev = mounts::device_number(&located.path)
            .map_err(|e| self.failed(&located.path, RunnerError::Failed(e.to_string())))?;
        let session_ms = millis(self.session_timeout);
        let sessions = SessionConfig {
            session_timeout_ms: session_ms,
            stop_timeout_ms: millis(self.stop_timeout),
            keepalive_interval_ms: (p.renew_interval_ms as u64).min(session_ms / 3).max(10),
            fence_timeout_ms: p.fence_timeout_ms as u64,
            handover_hold_off_ms: millis(self.handover_hold_off),
            acquire_grace_ms: 4 * p.io_timeout_ms as u64 + p.renew_interval_ms as u64,
        };
        let name = &self.spec.name;
        let guard = match &located.namespace {
            Some(ns) => Some(volume::GuardCheck {
                sysfs_root: self.devices.sysfs_root.clone(),
                namespace: ns.clone(),
                policy: self.devices.stale_io_policy,
            }),
            None => {
                tracing::info!(volume = %name, device = %located.path.display(),
                    "not an NVMe namespace: the stale-I/O guard and reservations are skipped");
                None
            }
        };
        let reservation = match &located.namespace {
            Some(ns) => match self.reservations.open(name, ns, &located.path) {
                Ok(ops) => Some(
                    devices::ReservationLink::spawn(
                        name,
                        crate::nvme::reservation::key_for_node(&self.node),
                        ops,
                    )
                    .map_err(|e| DaemonError::Internal(format!("reservation thread: {e}")))?,
                ),
                Err(e) => {
                    tracing::warn!(volume = %name, error = %e,
                        "reservations: unsupported (disk lease only): cannot open the namespace for reservation commands");
                    None
                }
            },
            None => None,
        };
        Ok(VolumeSetup {
            name: name.clone(),
            index: self.index,
            device: located.path.clone(),
            rdev,
            // Read while the store holds the device open: the same disk.
            diskseq: rdev.and_then(crate::fence::device::diskseq),
            store: Box::new(opened.store),
            layout: opened.layout,
            identity: opened.identity,
            sessions,
            epoch: self.epoch,
            guards: Arc::clone(&self.guards),
            fence_ops: Arc::clone(&self.ops),
            mmp_clean: rdev.is_some(),
            metrics: Arc::clone(&self.metrics),
            guard,
            reservation,
        })
    }
}

/// One volume for the daemon's lifetime: its task while the device is
/// there, waiting (acquires refused, saying why) while it is not.
async fn volume_main<O: FenceOps + 'static>(
    plan: Plan<O>,
    mut chans: volume::VolumeChannels,
    mut ready: Option<VolumeSetup<O>>,
    mut why: String,
) {
    loop {
        let setup = match ready.take() {
            Some(s) => s,
            None => {
                if !chans.wait_for_device(&why).await {
                    return;
                }
                let opened = match plan.locate() {
                    Ok(Some(l)) => plan.open(&l).await.map_err(|e| e.to_string()),
                    Ok(None) => Err(plan.missing()),
                    Err(e) => Err(e.to_string()),
                };
                match opened {
                    Ok(s) => {
                        tracing::warn!(volume = %plan.spec.name, "device present: lease area opened");
                        s
                    }
                    Err(e) => {
                        tracing::warn!(volume = %plan.spec.name, error = %e, "the volume's device is still not usable");
                        why = e;
                        continue;
                    }
                }
            }
        };
        let task = match VolumeTask::new(setup, chans) {
            Ok(t) => t,
            Err((e, c)) => {
                tracing::error!(volume = %plan.spec.name, error = %e, "cannot start the lease I/O thread");
                chans = c;
                why = format!("its lease I/O thread did not start: {e}");
                continue;
            }
        };
        match task.run().await {
            volume::Exit::Stopped => return,
            volume::Exit::DeviceGone(c, gone) => {
                chans = c;
                why = gone;
            }
        }
    }
}

/// Starts the device monitor (once), its events going to `tx` (the router).
/// Without it (no permission to listen), path loss is still caught by the
/// lease's failing renewals, only later: logged, not fatal.
fn start_monitor(
    sysfs_root: &std::path::Path,
    watch_paths: bool,
    tx: mpsc::UnboundedSender<crate::device::DeviceEvent>,
) -> Option<crate::device::monitor::Monitor> {
    use crate::device::monitor::{Monitor, Options};
    let (std_tx, std_rx) = std::sync::mpsc::channel();
    let opts = Options {
        sysfs_root: sysfs_root.to_path_buf(),
        watch_paths,
        ..Options::default()
    };
    let monitor = match Monitor::spawn(opts, std_tx) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "no device monitor: a lost path is noticed only when renewals fail");
            return None;
        }
    };
    let bridge = std::thread::Builder::new()
        .name("device-events".into())
        .spawn(move || {
            while let Ok(e) = std_rx.recv() {
                if tx.send(e).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = bridge {
        tracing::warn!(error = %e, "no device event thread: a lost path is noticed only when renewals fail");
        return None;
    }
    Some(monitor)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Routes API commands to volume tasks; answers what needs no volume task.
async fn dispatch(mut rx: mpsc::Receiver<Command>, handles: Vec<VolumeHandle>) {
    let by_name: HashMap<String, usize> =
        handles.iter().map(|h| (h.name.clone(), h.index)).collect();
    while let Some(command) = rx.recv().await {
        let now = Instant::now();
        let find = |v: &str| by_name.get(v).map(|&i| &handles[i]);
        let (target, command) = match command {
            Command::ListVolumes { reply } => {
                let mut all: Vec<_> = handles
                    .iter()
                    .map(|h| h.snapshot.borrow().status(&h.name, now))
                    .collect();
                all.sort_by(|a, b| a.volume.cmp(&b.volume));
                let _ = reply.send(Ok(all));
                continue;
            }
            Command::GetVolume { volume, reply } => {
                let _ = reply.send(match find(&volume) {
                    Some(h) => Ok(h.snapshot.borrow().status(&h.name, now)),
                    None => Err(ApiError::unknown_volume(&volume)),
                });
                continue;
            }
            Command::Subscribe { volume, reply } => {
                let _ = reply.send(match find(&volume) {
                    Some(h) => Ok(h.events.subscribe()),
                    None => Err(ApiError::unknown_volume(&volume)),
                });
                continue;
            }
            Command::Keepalive { session, reply } => match session_volume(&session, &handles) {
                Some(h) => (h, Command::Keepalive { session, reply }),
                None => {
                    let _ = reply.send(Err(ApiError::unknown_session(&session)));
                    continue;
                }
            },
            c @ (Command::Release { .. } | Command::Mount { .. }) => {
                let volume = c.volume().unwrap_or_default().to_string();
                let session = c.session().unwrap_or_default().to_string();
                let Some(h) = find(&volume) else {
                    c.fail(ApiError::unknown_volume(&volume));
                    continue;
                };
                if session_volume(&session, &handles).is_some_and(|s| s.index != h.index) {
                    c.fail(ApiError::new(
                        crate::api::ErrorCode::SessionMismatch,
                        format!("session {session:?} belongs to another volume, not {volume:?}"),
                    ));
                    continue;
                }
                (h, c)
            }
            c @ (Command::Acquire { .. } | Command::Handover { .. }) => {
                let volume = c.volume().unwrap_or_default();
                match find(volume) {
                    Some(h) => (h, c),
                    None => {
                        let e = ApiError::unknown_volume(volume);
                        c.fail(e);
                        continue;
                    }
                }
            }
        };
        // A full queue waits: the router's own timeout answers 503 if needed.
        if let Err(e) = target.commands.send(VolumeCmd::Api(command)).await {
            if let VolumeCmd::Api(c) = e.0 {
                c.fail(ApiError::unavailable(
                    "the volume's task has stopped (the daemon is stopping)",
                ));
            }
        }
    }
}

/// The volume a session id belongs to (its prefix is the volume's index).
fn session_volume<'a>(session: &str, handles: &'a [VolumeHandle]) -> Option<&'a VolumeHandle> {
    let (index, _) = session.split_once('-')?;
    let index = usize::from_str_radix(index, 16).ok()?;
    handles.get(index)
}

/// Feeds the watchdog every [`FEED_INTERVAL`] while the policy allows;
/// starves it for good once a fence failed. Returns the watchdog when told
/// to stop (for a clean disarm) unless it was starved.
async fn feed_watchdog(
    mut dog: FileWatchdog,
    guards: Arc<Mutex<Vec<Guard>>>,
    epoch: Instant,
    timeout_ms: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
    starved: Arc<std::sync::atomic::AtomicBool>,
) -> Option<FileWatchdog> {
    let mut tick = tokio::time::interval(FEED_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return (!dog.is_starved()).then_some(dog),
        }
        let now = Instant::now().saturating_duration_since(epoch).as_millis() as u64;
        let (feed, failed) = match guards.lock() {
            Ok(g) => (
                watchdog::may_feed(now, timeout_ms, g.iter()),
                g.contains(&Guard::FenceFailed),
            ),
            Err(_) => (false, true),
        };
        if failed && !dog.is_starved() {
            tracing::error!("a fence failed: starving the watchdog, the node will be reset");
            dog.starve();
            starved.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if feed {
            if let Err(e) = dog.feed() {
                tracing::warn!(error = %e, "feeding the watchdog failed");
            }
        }
    }
}
