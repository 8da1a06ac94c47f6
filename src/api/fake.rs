//! An in-memory backend: answers the API's [`Command`]s from a table of volumes,
//! with no disk and no lease protocol. For the API's tests and a future
//! `blockfence daemon --fake` dev mode.
//!
//! Behaviour:
//! - Acquire grants at once when the volume is free; when it is held, the
//!   request waits (in a FIFO queue per volume) until a release frees it or its
//!   timeout passes, then answers 409 `held` naming the holder.
//! - Release with the volume's session frees the volume and grants it to the
//!   first waiter still listening.
//! - Handover of a held volume makes `to_node` the holder with the next
//!   generation; the local session ends (its id becomes unknown).
//! - Grants never expire here: keepalive only resets `since_renewal_ms`.
//! - [`FakeBackend::with_max_wait`] caps how long an acquire waits (a fuzzer
//!   asking for an hour then gets its 409 sooner).
//! - Each volume has a broadcast channel of [`VolumeEvent`]s (what
//!   `Command::Subscribe` hands out): `granted` on every grant, `released` on
//!   release, `handover_requested` then `released` when a locally held volume
//!   is handed over. There are no renewals or fences here, so no other events.
//! - Given [`Metrics`] ([`FakeBackend::with_metrics`]), it keeps the lease
//!   state, generation and session gauges of each volume up to date.
//!
//! One task owns all state and handles one command at a time, the way the
//! daemon's runtime will; it reads tokio's clock, so tests may pause time.

use super::{
    ApiError, Command, ErrorCode, FenceState, Grant, Reply, VolumeEvent, VolumeEventKind,
    VolumeState, VolumeStatus, REQUIRED_MOUNT_OPTIONS,
};
use crate::metrics::{LeaseState, Metrics};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

/// How long a fake grant says it is valid.
pub const FAKE_VALID_FOR: Duration = Duration::from_secs(10);

/// Depth of the command channel [`FakeBackend::spawn`] creates.
pub const COMMAND_QUEUE: usize = 64;

/// How many events a volume's broadcast channel buffers per subscriber before
/// a slow subscriber is told it lagged.
pub const EVENT_BUFFER: usize = 64;

/// The in-memory backend. Build it with the volumes it knows, then
/// [`FakeBackend::spawn`] it.
#[derive(Debug, Default)]
pub struct FakeBackend {
    volumes: BTreeMap<String, FakeVolume>,
    /// Session id -> volume name.
    sessions: HashMap<String, String>,
    next_session: u64,
    metrics: Option<Arc<Metrics>>,
    max_wait: Option<Duration>,
}

#[derive(Debug)]
struct FakeVolume {
    generation: u64,
    holder: Option<Holder>,
    waiters: VecDeque<Waiter>,
    events: broadcast::Sender<VolumeEvent>,
}

impl FakeVolume {
    fn new() -> FakeVolume {
        FakeVolume {
            generation: 0,
            holder: None,
            waiters: VecDeque::new(),
            events: broadcast::channel(EVENT_BUFFER).0,
        }
    }

    /// Send an event to the volume's subscribers, if any.
    fn publish(&self, volume: &str, kind: VolumeEventKind) {
        // An error only means nobody listens right now.
        let _ = self.events.send(VolumeEvent {
            volume: volume.to_string(),
            kind,
        });
    }
}

#[derive(Debug)]
struct Holder {
    name: String,
    /// `None` when another node holds it (after a handover).
    session: Option<String>,
    renewed: Instant,
}

#[derive(Debug)]
struct Waiter {
    holder: String,
    deadline: Instant,
    reply: Reply<Grant>,
}

impl FakeBackend {
    /// A backend that knows these volumes, all free.
    pub fn new<I, S>(volumes: I) -> FakeBackend
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        FakeBackend {
            volumes: volumes
                .into_iter()
                .map(|v| (v.into(), FakeVolume::new()))
                .collect(),
            ..FakeBackend::default()
        }
    }

    /// Keep `metrics` up to date: lease state (free or held), generation and
    /// sessions of every volume.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> FakeBackend {
        self.metrics = Some(metrics);
        for name in self.volumes.keys() {
            self.record(name);
        }
        self
    }

    /// Wait at most `max` for a held volume, whatever timeout an acquire asks
    /// for (answering 409 `held` after that, as when its own timeout passes).
    pub fn with_max_wait(mut self, max: Duration) -> FakeBackend {
        self.max_wait = Some(max);
        self
    }

    /// Copy a volume's state into the metrics, if there are any.
    fn record(&self, volume: &str) {
        let (Some(m), Some(v)) = (&self.metrics, self.volumes.get(volume)) else {
            return;
        };
        let local = v.holder.as_ref().is_some_and(|h| h.session.is_some());
        m.set_state(
            volume,
            if local {
                LeaseState::Held
            } else {
                LeaseState::Free
            },
        );
        m.set_generation(volume, v.generation);
        m.set_sessions(volume, usize::from(local));
    }

    /// Run on the current tokio runtime; returns the channel to give to
    /// [`super::router`] or [`super::Server::start`]. The task ends when every
    /// sender is dropped.
    pub fn spawn(self) -> mpsc::Sender<Command> {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        tokio::spawn(self.run(rx));
        tx
    }

    /// Handle commands until the channel closes.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.handle(command, Instant::now()),
                    None => return,
                },
                () = sleep_until(deadline) => self.expire_waiters(Instant::now()),
            }
        }
    }

    fn handle(&mut self, command: Command, now: Instant) {
        match command {
            Command::ListVolumes { reply } => {
                let all = self
                    .volumes
                    .iter()
                    .map(|(name, v)| v.status(name, now))
                    .collect();
                let _ = reply.send(Ok(all));
            }
            Command::GetVolume { volume, reply } => {
                let _ = reply.send(self.volume(&volume).map(|v| v.status(&volume, now)));
            }
            Command::Acquire {
                volume,
                holder,
                timeout,
                reply,
            } => {
                let wait = self.max_wait.map_or(timeout, |max| timeout.min(max));
                self.acquire(volume, holder, now + wait, reply, now)
            }
            Command::Keepalive { session, reply } => {
                let _ = reply.send(self.keepalive(&session, now));
            }
            Command::Release {
                volume,
                session,
                reply,
            } => {
                let _ = reply.send(self.release(&volume, &session, now));
            }
            Command::Subscribe { volume, reply } => {
                let _ = reply.send(self.volume(&volume).map(|v| v.events.subscribe()));
            }
            Command::Mount { volume, reply, .. } => {
                let _ = reply.send(self.volume(&volume).and_then(|_| {
                    Err(ApiError::unavailable(
                        "the fake backend does not mount (it has no devices)",
                    ))
                }));
            }
            Command::Handover {
                volume,
                to_node,
                reply,
            } => {
                let _ = reply.send(self.handover(&volume, to_node, now));
            }
        }
    }

    fn volume(&self, volume: &str) -> Result<&FakeVolume, ApiError> {
        self.volumes
            .get(volume)
            .ok_or_else(|| ApiError::unknown_volume(volume))
    }

    fn acquire(
        &mut self,
        volume: String,
        holder: String,
        deadline: Instant,
        reply: Reply<Grant>,
        now: Instant,
    ) {
        let Some(v) = self.volumes.get_mut(&volume) else {
            let _ = reply.send(Err(ApiError::unknown_volume(&volume)));
            return;
        };
        match &v.holder {
            None => {
                let grant = self.grant(&volume, holder, now);
                let _ = reply.send(Ok(grant));
            }
            Some(current) if deadline <= now => {
                let _ = reply.send(Err(ApiError::held(&volume, &current.name)));
            }
            Some(_) => v.waiters.push_back(Waiter {
                holder,
                deadline,
                reply,
            }),
        }
    }

    /// Make `holder` the holder of the (free, known) `volume`.
    fn grant(&mut self, volume: &str, holder: String, now: Instant) -> Grant {
        self.next_session += 1;
        let session = format!("fake-{:016x}", self.next_session);
        let v = self
            .volumes
            .get_mut(volume)
            .expect("grant is only called for known volumes");
        v.generation += 1;
        let generation = v.generation;
        v.publish(
            volume,
            VolumeEventKind::Granted {
                session: session.clone(),
                holder: holder.clone(),
                generation,
            },
        );
        v.holder = Some(Holder {
            name: holder,
            session: Some(session.clone()),
            renewed: now,
        });
        self.sessions.insert(session.clone(), volume.to_string());
        self.record(volume);
        grant_for(volume, session, generation)
    }

    fn keepalive(&mut self, session: &str, now: Instant) -> Result<Grant, ApiError> {
        let volume = self
            .sessions
            .get(session)
            .ok_or_else(|| ApiError::unknown_session(session))?
            .clone();
        let v = self
            .volumes
            .get_mut(&volume)
            .ok_or_else(|| ApiError::unknown_volume(&volume))?;
        match &mut v.holder {
            Some(h) if h.session.as_deref() == Some(session) => {
                h.renewed = now;
                Ok(grant_for(&volume, session.to_string(), v.generation))
            }
            _ => Err(ApiError::unknown_session(session)),
        }
    }

    fn release(
        &mut self,
        volume: &str,
        session: &str,
        now: Instant,
    ) -> Result<VolumeStatus, ApiError> {
        self.volume(volume)?;
        match self.sessions.get(session) {
            None => return Err(ApiError::unknown_session(session)),
            Some(owner) if owner != volume => {
                return Err(ApiError::new(
                    ErrorCode::SessionMismatch,
                    format!("session {session:?} belongs to volume {owner:?}, not {volume:?}"),
                ))
            }
            Some(_) => {}
        }
        self.sessions.remove(session);
        let v = self
            .volumes
            .get_mut(volume)
            .expect("checked above that the volume exists");
        v.holder = None;
        v.publish(
            volume,
            VolumeEventKind::Released {
                generation: v.generation,
            },
        );
        self.record(volume);
        self.grant_to_next_waiter(volume, now);
        Ok(self.volumes[volume].status(volume, now))
    }

    fn handover(
        &mut self,
        volume: &str,
        to_node: String,
        now: Instant,
    ) -> Result<VolumeStatus, ApiError> {
        let v = self
            .volumes
            .get_mut(volume)
            .ok_or_else(|| ApiError::unknown_volume(volume))?;
        let Some(holder) = v.holder.take() else {
            return Err(ApiError::new(
                ErrorCode::NotHeld,
                format!("volume {volume:?} is free; nothing to hand over (acquire it instead)"),
            ));
        };
        if let Some(session) = holder.session {
            self.sessions.remove(&session);
            v.publish(
                volume,
                VolumeEventKind::HandoverRequested {
                    session,
                    to_node: to_node.clone(),
                },
            );
            v.publish(
                volume,
                VolumeEventKind::Released {
                    generation: v.generation,
                },
            );
        }
        v.generation += 1;
        v.holder = Some(Holder {
            name: to_node,
            session: None,
            renewed: now,
        });
        let status = v.status(volume, now);
        self.record(volume);
        Ok(status)
    }

    /// Grant a freed volume to its first waiter that still listens.
    fn grant_to_next_waiter(&mut self, volume: &str, now: Instant) {
        loop {
            let Some(waiter) = self
                .volumes
                .get_mut(volume)
                .and_then(|v| v.waiters.pop_front())
            else {
                return;
            };
            if waiter.reply.is_closed() {
                continue;
            }
            let grant = self.grant(volume, waiter.holder, now);
            match waiter.reply.send(Ok(grant)) {
                Ok(()) => return,
                Err(Ok(grant)) => {
                    // The caller went away between the check and the send.
                    self.sessions.remove(&grant.session);
                    if let Some(v) = self.volumes.get_mut(volume) {
                        v.holder = None;
                        v.publish(
                            volume,
                            VolumeEventKind::Released {
                                generation: grant.generation,
                            },
                        );
                    }
                    self.record(volume);
                }
                Err(Err(_)) => return,
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.volumes
            .values()
            .flat_map(|v| v.waiters.iter().map(|w| w.deadline))
            .min()
    }

    fn expire_waiters(&mut self, now: Instant) {
        for (name, v) in &mut self.volumes {
            let holder = v.holder.as_ref().map(|h| h.name.clone());
            let (expired, waiting): (VecDeque<_>, VecDeque<_>) =
                v.waiters.drain(..).partition(|w| w.deadline <= now);
            v.waiters = waiting;
            for w in expired {
                let err = match &holder {
                    Some(h) => ApiError::held(name, h),
                    None => ApiError::unavailable("volume freed but not granted; retry"),
                };
                let _ = w.reply.send(Err(err));
            }
        }
    }
}

impl FakeVolume {
    fn status(&self, name: &str, now: Instant) -> VolumeStatus {
        let local = self.holder.as_ref().is_some_and(|h| h.session.is_some());
        VolumeStatus {
            volume: name.to_string(),
            state: if self.holder.is_some() {
                VolumeState::Held
            } else {
                VolumeState::Free
            },
            holder: self.holder.as_ref().map(|h| h.name.clone()),
            generation: self.generation,
            since_renewal_ms: self
                .holder
                .as_ref()
                .map(|h| millis(now.saturating_duration_since(h.renewed))),
            fence_state: if local {
                FenceState::Armed
            } else {
                FenceState::Idle
            },
        }
    }
}

fn grant_for(volume: &str, session: String, generation: u64) -> Grant {
    Grant {
        session,
        generation,
        device: format!("/dev/fake/{volume}"),
        mount_options: REQUIRED_MOUNT_OPTIONS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        valid_for_ms: millis(FAKE_VALID_FOR),
        keepalive_interval_ms: millis(FAKE_VALID_FOR) / 5,
        stop: None,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    /// Commands on one channel are handled in order, so a waiter sent before a
    /// release is queued before it: no sleeps needed.
    async fn acquire(
        tx: &mpsc::Sender<Command>,
        volume: &str,
        holder: &str,
        timeout: Duration,
    ) -> oneshot::Receiver<Result<Grant, ApiError>> {
        let (reply, rx) = oneshot::channel();
        tx.send(Command::Acquire {
            volume: volume.into(),
            holder: holder.into(),
            timeout,
            reply,
        })
        .await
        .unwrap();
        rx
    }

    async fn release(tx: &mpsc::Sender<Command>, volume: &str, session: &str) -> VolumeStatus {
        let (reply, rx) = oneshot::channel();
        tx.send(Command::Release {
            volume: volume.into(),
            session: session.into(),
            reply,
        })
        .await
        .unwrap();
        rx.await.unwrap().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_is_granted_on_release_in_fifo_order() {
        let tx = FakeBackend::new(["v"]).spawn();
        let long = Duration::from_secs(60);
        let first = acquire(&tx, "v", "a", Duration::ZERO).await.await.unwrap();
        let first = first.unwrap();
        let b = acquire(&tx, "v", "b", long).await;
        let c = acquire(&tx, "v", "c", long).await;
        let status = release(&tx, "v", &first.session).await;
        // Granted to b within the same command: the status shows b holding.
        assert_eq!(status.holder.as_deref(), Some("b"));
        let b = b.await.unwrap().unwrap();
        assert_eq!(b.generation, 2);
        release(&tx, "v", &b.session).await;
        let c = c.await.unwrap().unwrap();
        assert_eq!(c.generation, 3);
        assert!(c.mount_options.iter().any(|o| o == "errors=remount-ro"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_times_out_at_its_deadline_with_the_holder_named() {
        let tx = FakeBackend::new(["v"]).spawn();
        acquire(&tx, "v", "a", Duration::ZERO)
            .await
            .await
            .unwrap()
            .unwrap();
        let started = Instant::now();
        let b = acquire(&tx, "v", "b", Duration::from_secs(30)).await;
        let err = b.await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert_eq!(err.code, ErrorCode::Held);
        assert_eq!(err.status, axum::http::StatusCode::CONFLICT);
        assert_eq!(err.holder.as_deref(), Some("a"));
    }

    #[tokio::test(start_paused = true)]
    async fn max_wait_caps_how_long_an_acquire_waits() {
        let tx = FakeBackend::new(["v"])
            .with_max_wait(Duration::from_secs(2))
            .spawn();
        acquire(&tx, "v", "a", Duration::ZERO)
            .await
            .await
            .unwrap()
            .unwrap();
        let started = Instant::now();
        let b = acquire(&tx, "v", "b", Duration::from_secs(3600)).await;
        let err = b.await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(err.code, ErrorCode::Held);
        // Shorter timeouts are kept.
        let started = Instant::now();
        let c = acquire(&tx, "v", "c", Duration::from_secs(1)).await;
        assert_eq!(c.await.unwrap().unwrap_err().code, ErrorCode::Held);
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_went_away_is_skipped() {
        let tx = FakeBackend::new(["v"]).spawn();
        let long = Duration::from_secs(60);
        let a = acquire(&tx, "v", "a", Duration::ZERO)
            .await
            .await
            .unwrap()
            .unwrap();
        drop(acquire(&tx, "v", "gone", long).await);
        let c = acquire(&tx, "v", "c", long).await;
        let status = release(&tx, "v", &a.session).await;
        assert_eq!(status.holder.as_deref(), Some("c"));
        assert_eq!(c.await.unwrap().unwrap().generation, 2);
    }

    async fn subscribe(
        tx: &mpsc::Sender<Command>,
        volume: &str,
    ) -> Result<broadcast::Receiver<VolumeEvent>, ApiError> {
        let (reply, rx) = oneshot::channel();
        tx.send(Command::Subscribe {
            volume: volume.into(),
            reply,
        })
        .await
        .unwrap();
        rx.await.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn subscribers_see_grants_releases_and_handovers_in_order() {
        let metrics = Arc::new(Metrics::new());
        let tx = FakeBackend::new(["v", "w"])
            .with_metrics(metrics.clone())
            .spawn();
        assert_eq!(
            subscribe(&tx, "nope").await.unwrap_err().code,
            ErrorCode::UnknownVolume
        );
        let mut events = subscribe(&tx, "v").await.unwrap();
        let mut other = subscribe(&tx, "w").await.unwrap();
        let a = acquire(&tx, "v", "a", Duration::ZERO)
            .await
            .await
            .unwrap()
            .unwrap();
        assert!(metrics
            .render()
            .contains(r#"blockfence_lease_state{state="held",volume="v"} 1"#));
        release(&tx, "v", &a.session).await;
        let b = acquire(&tx, "v", "b", Duration::ZERO)
            .await
            .await
            .unwrap()
            .unwrap();
        let (reply, rx) = oneshot::channel();
        tx.send(Command::Handover {
            volume: "v".into(),
            to_node: "node-2".into(),
            reply,
        })
        .await
        .unwrap();
        rx.await.unwrap().unwrap();

        let mut seen = Vec::new();
        for _ in 0..5 {
            let e = events.recv().await.unwrap();
            assert_eq!(e.volume, "v");
            seen.push(e.kind);
        }
        assert_eq!(
            seen,
            vec![
                VolumeEventKind::Granted {
                    session: a.session.clone(),
                    holder: "a".into(),
                    generation: 1
                },
                VolumeEventKind::Released { generation: 1 },
                VolumeEventKind::Granted {
                    session: b.session.clone(),
                    holder: "b".into(),
                    generation: 2
                },
                VolumeEventKind::HandoverRequested {
                    session: b.session.clone(),
                    to_node: "node-2".into()
                },
                VolumeEventKind::Released { generation: 2 },
            ]
        );
        assert!(matches!(
            events.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ));
        // Nothing happened to the other volume.
        assert!(matches!(
            other.try_recv(),
            Err(broadcast::error::TryRecvError::Empty)
        ));
        let text = metrics.render();
        assert!(text.contains(r#"blockfence_lease_state{state="free",volume="v"} 1"#));
        assert!(text.contains(r#"blockfence_lease_generation{volume="v"} 3"#));
        assert!(text.contains(r#"blockfence_sessions{volume="v"} 0"#));

        // The stream ends when the backend does.
        drop(tx);
        assert!(matches!(
            events.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
    }
}
