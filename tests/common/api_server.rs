//! The node-local API for tests: [`FakeBackend`] behind a real [`Server`] on a
//! Unix socket, with a proxy on the command channel that can change what the
//! fake answers, the way a daemon might:
//! - `device`: the grant's device per volume (the fake says /dev/fake/NAME);
//! - `valid_for_ms` / `keepalive_interval_ms`: shorter grants;
//! - `stop`: set `stop` in every keepalive answer (a handover or shutdown
//!   request);
//! - `silent`: keepalives are never answered (a stalled daemon); the router
//!   answers 503 after its own margin;
//! - `session_ended`: keepalives are answered 410 session_ended (the lease
//!   was lost).
//!
//! Acquire requests and successful keepalive answers are counted, and a test
//! can wait for the counts (an event, not a sleep).

use blockfence::api::fake::FakeBackend;
use blockfence::api::{ApiError, Command, Grant, ServeConfig, Server, StopReason};
use blockfence::client::Client;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// What the proxy changes.
#[derive(Debug, Default)]
pub struct Knobs {
    /// Volume -> device path for grants.
    pub devices: HashMap<String, String>,
    /// Overrides every grant's `valid_for_ms`.
    pub valid_for_ms: Option<u64>,
    /// Overrides every grant's `keepalive_interval_ms`.
    pub keepalive_interval_ms: Option<u64>,
    /// Set in every keepalive answer.
    pub stop: Option<StopReason>,
    /// Keepalives get no answer.
    pub silent: bool,
    /// Keepalives are answered 410 session_ended.
    pub session_ended: bool,
}

#[derive(Default)]
struct Shared {
    knobs: Knobs,
    /// Successful keepalive answers sent.
    keepalives: u64,
    /// Acquire requests received.
    acquires: u64,
    /// Replies held back while silent (dropping them would answer 503 at once).
    held: Vec<oneshot::Sender<Result<Grant, ApiError>>>,
}

/// A running API server over the fake, with its proxy.
pub struct TestApi {
    runtime: tokio::runtime::Runtime,
    server: Option<Server>,
    socket: PathBuf,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    _dir: tempfile::TempDir,
}

impl TestApi {
    /// Serves the fake with these volumes on a socket in a fresh temp dir.
    pub fn start(volumes: &[&str]) -> TestApi {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let dir = tempfile::Builder::new()
            .prefix("bf-api-")
            .tempdir()
            .expect("temp dir");
        let socket = dir.path().join("api.sock");
        let shared: Arc<(Mutex<Shared>, Condvar)> = Arc::default();
        let volumes: Vec<String> = volumes.iter().map(|v| v.to_string()).collect();
        let server = runtime.block_on(async {
            let fake = FakeBackend::new(volumes).spawn();
            let (proxy_tx, proxy_rx) = mpsc::channel(64);
            tokio::spawn(proxy(proxy_rx, fake, shared.clone()));
            Server::start(
                &ServeConfig {
                    socket: socket.clone(),
                    tcp: None,
                },
                proxy_tx,
                Arc::new(blockfence::metrics::Metrics::new()),
            )
            .await
            .expect("API server starts")
        });
        TestApi {
            runtime,
            server: Some(server),
            socket,
            shared,
            _dir: dir,
        }
    }

    /// The Unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A client for it.
    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    /// Runs a future (e.g. a client call) on the server's runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Changes the knobs.
    pub fn set(&self, f: impl FnOnce(&mut Knobs)) {
        let mut s = self.shared.0.lock().expect("lock");
        f(&mut s.knobs);
    }

    /// Successful keepalive answers so far.
    pub fn keepalives(&self) -> u64 {
        self.shared.0.lock().expect("lock").keepalives
    }

    /// Waits until at least `n` keepalives were answered; false on timeout.
    pub fn wait_keepalives(&self, n: u64, timeout: Duration) -> bool {
        self.wait_for(|s| s.keepalives >= n, timeout)
    }

    /// Waits until at least `n` acquire requests arrived; false on timeout.
    pub fn wait_acquires(&self, n: u64, timeout: Duration) -> bool {
        self.wait_for(|s| s.acquires >= n, timeout)
    }

    fn wait_for(&self, done: impl Fn(&Shared) -> bool, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let (lock, cv) = &*self.shared;
        let mut s = lock.lock().expect("lock");
        while !done(&s) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = cv.wait_timeout(s, left).expect("lock").0;
        }
        true
    }
}

impl Drop for TestApi {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            // Held replies would keep requests open: answer them now.
            self.shared.0.lock().expect("lock").held.clear();
            let _ = self.runtime.block_on(server.shutdown());
        }
    }
}

/// Forwards every command to the fake, rewriting grants per the knobs.
async fn proxy(
    mut rx: mpsc::Receiver<Command>,
    fake: mpsc::Sender<Command>,
    shared: Arc<(Mutex<Shared>, Condvar)>,
) {
    while let Some(command) = rx.recv().await {
        let command = match command {
            Command::Acquire {
                volume,
                holder,
                timeout,
                reply,
            } => {
                {
                    let (lock, cv) = &*shared;
                    lock.lock().expect("lock").acquires += 1;
                    cv.notify_all();
                }
                let (tx, answer) = oneshot::channel::<Result<Grant, ApiError>>();
                let shared = shared.clone();
                let v = volume.clone();
                tokio::spawn(async move {
                    if let Ok(result) = answer.await {
                        let result = result.map(|g| rewrite(&shared, &v, g, false));
                        let _ = reply.send(result);
                    }
                });
                Command::Acquire {
                    volume,
                    holder,
                    timeout,
                    reply: tx,
                }
            }
            Command::Keepalive { session, reply } => {
                let (silent, ended) = {
                    let s = shared.0.lock().expect("lock");
                    (s.knobs.silent, s.knobs.session_ended)
                };
                if silent {
                    shared.0.lock().expect("lock").held.push(reply);
                    continue;
                }
                if ended {
                    let _ = reply.send(Err(ApiError::session_ended(&session, "lease lost")));
                    continue;
                }
                let (tx, answer) = oneshot::channel::<Result<Grant, ApiError>>();
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Ok(result) = answer.await {
                        let ok = result.is_ok();
                        // The volume is not in a keepalive: take it from the device map
                        // by the fake's device name.
                        let result = result.map(|g| {
                            let volume = g
                                .device
                                .strip_prefix("/dev/fake/")
                                .unwrap_or_default()
                                .to_string();
                            rewrite(&shared, &volume, g, true)
                        });
                        if reply.send(result).is_ok() && ok {
                            let (lock, cv) = &*shared;
                            lock.lock().expect("lock").keepalives += 1;
                            cv.notify_all();
                        }
                    }
                });
                Command::Keepalive { session, reply: tx }
            }
            other => other,
        };
        if fake.send(command).await.is_err() {
            return;
        }
    }
}

fn rewrite(
    shared: &Arc<(Mutex<Shared>, Condvar)>,
    volume: &str,
    mut g: Grant,
    keepalive: bool,
) -> Grant {
    let s = shared.0.lock().expect("lock");
    if let Some(d) = s.knobs.devices.get(volume) {
        g.device = d.clone();
    }
    if let Some(v) = s.knobs.valid_for_ms {
        g.valid_for_ms = v;
    }
    if let Some(i) = s.knobs.keepalive_interval_ms {
        g.keepalive_interval_ms = i;
    }
    if keepalive && s.knobs.stop.is_some() {
        g.stop = s.knobs.stop;
    }
    g
}
