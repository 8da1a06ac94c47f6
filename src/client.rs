//! A small async client for the node-local API (docs/openapi.yaml) over its
//! Unix socket: what `blockfence run`, scripts, tests and a future
//! `blockfence volumes` use to talk to the daemon.
//!
//! One HTTP/1.1 connection per request (hyper's client connection over a
//! `tokio::net::UnixStream`): requests are rare and local, and a fresh
//! connection cannot be left half-used by a timed-out request.
//!
//! Invariants:
//! - Every request has a timeout ([`Client::timeout`]; an acquire waits its own
//!   `timeout` plus [`ACQUIRE_REPLY_MARGIN`]). Nothing here waits forever.
//! - Errors keep what a caller must tell apart: the daemon could not be
//!   reached or did not answer in time ([`ClientError::is_unreachable`]), or
//!   it answered with an API error whose [`ErrorBody`] (code, message,
//!   holder) is kept as sent.
//! - Path parameters are percent-encoded, so no argument can change which
//!   path is asked for; the server validates the names.
//!
//! What it must not do: retry (callers decide; a retried acquire or release
//! is not the same request), or read any clock but tokio's.

use crate::api::router::{BACKEND_REPLY_MARGIN, MOUNT_TIMEOUT};
use crate::api::{ErrorBody, ErrorCode, Grant, Mounted, VolumeStatus, MAX_ACQUIRE_TIMEOUT};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::UnixStream;

/// How long a request (other than an acquire) may take, unless changed with
/// [`Client::with_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How much longer than its own `timeout` an acquire request may take: the
/// server answers at most [`BACKEND_REPLY_MARGIN`] after the timeout, plus
/// transport slack.
pub const ACQUIRE_REPLY_MARGIN: Duration = Duration::from_secs(BACKEND_REPLY_MARGIN.as_secs() + 5);

/// Largest answer body read; anything longer is a bad answer.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection to the socket (missing, refused, no permission).
    #[error("cannot reach the blockfence daemon at {}: {source} (is `blockfence daemon` running, and is the socket path right?)", socket.display())]
    Connect {
        /// The socket's path.
        socket: PathBuf,
        /// The connect error.
        source: io::Error,
    },
    /// The request did not complete in time.
    #[error("the blockfence daemon at {} did not answer {method} {path} within {} ms", socket.display(), after.as_millis())]
    Timeout {
        /// The socket's path.
        socket: PathBuf,
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// The timeout that passed.
        after: Duration,
    },
    /// The connection failed while the request was under way.
    #[error("talking to the blockfence daemon at {}: {method} {path}: {source}", socket.display())]
    Http {
        /// The socket's path.
        socket: PathBuf,
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// The transport error.
        source: hyper::Error,
    },
    /// The daemon answered with an API error.
    #[error("{} ({status} {})", body.message, code_name(body.error))]
    Api {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// The HTTP status.
        status: StatusCode,
        /// The error as sent.
        body: ErrorBody,
    },
    /// The daemon answered something this client does not understand.
    #[error("{method} {path}: unexpected answer ({status}): {detail}")]
    BadAnswer {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// The HTTP status.
        status: StatusCode,
        /// What was wrong with it.
        detail: String,
    },
    /// An argument the API would refuse anyway, caught before sending.
    #[error("{what}: {detail}")]
    BadArgument {
        /// Which argument.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

impl ClientError {
    /// The daemon could not be reached or did not answer in time: nothing is
    /// known about what it did with the request.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::Timeout { .. } | ClientError::Http { .. }
        )
    }

    /// The API's error body, for an API error.
    pub fn body(&self) -> Option<&ErrorBody> {
        match self {
            ClientError::Api { body, .. } => Some(body),
            _ => None,
        }
    }

    /// The API's error code, for an API error.
    pub fn code(&self) -> Option<ErrorCode> {
        self.body().map(|b| b.error)
    }

    /// The session is over (404 unknown_session or 410 session_ended): its
    /// holder must stop writing now.
    pub fn session_over(&self) -> bool {
        matches!(
            self.code(),
            Some(ErrorCode::UnknownSession | ErrorCode::SessionEnded)
        )
    }
}

/// The wire name of an error code (`unknown_volume`, ...).
pub fn code_name(code: ErrorCode) -> String {
    match serde_json::to_value(code) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{code:?}"),
    }
}

/// A client for the API on one Unix socket. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client for the API at `socket` with [`DEFAULT_REQUEST_TIMEOUT`].
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
            timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// The same client with another per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `POST /v1/volumes/{volume}/acquire`: become the writer of `volume`,
    /// waiting up to `timeout` (at most [`MAX_ACQUIRE_TIMEOUT`]) while someone
    /// else holds it. A timeout is the API error `held`, naming the holder.
    /// The grant's `valid_for_ms` counts from when this was called.
    pub async fn acquire(
        &self,
        volume: &str,
        holder: &str,
        timeout: Duration,
    ) -> Result<Grant, ClientError> {
        if timeout > MAX_ACQUIRE_TIMEOUT {
            return Err(ClientError::BadArgument {
                what: "acquire timeout",
                detail: format!(
                    "{} s is longer than the API's limit of {} s; wait in several requests",
                    timeout.as_secs_f64(),
                    MAX_ACQUIRE_TIMEOUT.as_secs()
                ),
            });
        }
        let body = serde_json::json!({
            "holder": holder,
            "timeout_seconds": timeout.as_secs_f64(),
        });
        self.request(
            Method::POST,
            format!("/v1/volumes/{}/acquire", segment(volume)),
            Some(body),
            timeout + ACQUIRE_REPLY_MARGIN,
        )
        .await
    }

    /// `POST /v1/sessions/{session}/keepalive`: extend the session's grant.
    /// [`ClientError::session_over`] means stop writing now.
    pub async fn keepalive(&self, session: &str) -> Result<Grant, ClientError> {
        self.request(
            Method::POST,
            format!("/v1/sessions/{}/keepalive", segment(session)),
            None,
            self.timeout,
        )
        .await
    }

    /// `POST /v1/volumes/{volume}/release`: give the volume up.
    /// `POST /v1/volumes/{volume}/mount`: the daemon mounts the volume of
    /// the live `session` on `target` in this process's mount namespace.
    /// Waits for the mount itself (up to the server's mount timeout), not
    /// [`Client::timeout`].
    pub async fn mount(
        &self,
        volume: &str,
        session: &str,
        target: &Path,
    ) -> Result<Mounted, ClientError> {
        self.request(
            Method::POST,
            format!("/v1/volumes/{}/mount", segment(volume)),
            Some(serde_json::json!({
                "session": session,
                "target": target.to_string_lossy(),
            })),
            MOUNT_TIMEOUT + 2 * BACKEND_REPLY_MARGIN,
        )
        .await
    }

    pub async fn release(&self, volume: &str, session: &str) -> Result<VolumeStatus, ClientError> {
        self.request(
            Method::POST,
            format!("/v1/volumes/{}/release", segment(volume)),
            Some(serde_json::json!({ "session": session })),
            self.timeout,
        )
        .await
    }

    /// `GET /v1/volumes`: every volume this node knows.
    pub async fn volumes(&self) -> Result<Vec<VolumeStatus>, ClientError> {
        self.request(Method::GET, "/v1/volumes".to_string(), None, self.timeout)
            .await
    }

    /// `GET /v1/volumes/{volume}`: one volume.
    pub async fn volume(&self, volume: &str) -> Result<VolumeStatus, ClientError> {
        self.request(
            Method::GET,
            format!("/v1/volumes/{}", segment(volume)),
            None,
            self.timeout,
        )
        .await
    }

    /// `POST /v1/volumes/{volume}/handover`: hand the lease to `to_node`.
    pub async fn handover(&self, volume: &str, to_node: &str) -> Result<VolumeStatus, ClientError> {
        self.request(
            Method::POST,
            format!("/v1/volumes/{}/handover", segment(volume)),
            Some(serde_json::json!({ "to_node": to_node })),
            self.timeout,
        )
        .await
    }

    async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: String,
        body: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let exchange = self.exchange(method.clone(), &path, body);
        let (status, bytes) = match tokio::time::timeout(timeout, exchange).await {
            Ok(answer) => answer?,
            Err(_) => {
                return Err(ClientError::Timeout {
                    socket: self.socket.clone(),
                    method,
                    path,
                    after: timeout,
                })
            }
        };
        let bad = |detail: String| ClientError::BadAnswer {
            method: method.clone(),
            path: path.clone(),
            status,
            detail,
        };
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("{e}: {}", String::from_utf8_lossy(&bytes))));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Api {
                method,
                path,
                status,
                body,
            }),
            Err(e) => Err(bad(format!(
                "not an API error body ({e}): {}",
                String::from_utf8_lossy(&bytes)
            ))),
        }
    }

    /// One request on a fresh connection; returns the status and the body.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let http_err = |source| ClientError::Http {
            socket: self.socket.clone(),
            method: method.clone(),
            path: path.to_string(),
            source,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http_err)?;
        // The connection is driven by its own task, aborted when this request
        // ends (also when its future is dropped on a timeout).
        let _connection = AbortOnDrop(tokio::spawn(connection));
        let mut request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, "localhost");
        let bytes = match body {
            Some(b) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(bytes))
            .map_err(|e| ClientError::BadArgument {
                what: "request",
                detail: e.to_string(),
            })?;
        let response = sender.send_request(request).await.map_err(http_err)?;
        let status = response.status();
        let collected = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| ClientError::BadAnswer {
                method: method.clone(),
                path: path.to_string(),
                status,
                detail: format!("reading the body: {e}"),
            })?;
        Ok((status, collected.to_bytes()))
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Percent-encodes one path segment: everything but RFC 3986 unreserved
/// characters.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::fake::FakeBackend;
    use crate::api::{ServeConfig, Server, VolumeState};

    #[test]
    fn segments_cannot_change_the_path() {
        assert_eq!(segment("pg-data_1.x"), "pg-data_1.x");
        assert_eq!(segment("../v"), "..%2Fv");
        assert_eq!(segment("a b?c#d"), "a%20b%3Fc%23d");
        assert_eq!(segment("é"), "%C3%A9");
    }

    async fn server(dir: &Path) -> (Server, Client) {
        let socket = dir.join("api.sock");
        let server = Server::start(
            &ServeConfig {
                socket: socket.clone(),
                tcp: None,
            },
            FakeBackend::new(["v", "w"]).spawn(),
            std::sync::Arc::new(crate::metrics::Metrics::new()),
        )
        .await
        .expect("server starts");
        (server, Client::new(socket))
    }

    #[tokio::test]
    async fn acquire_keepalive_release_and_status() {
        let dir = tempfile::tempdir().unwrap();
        let (server, client) = server(dir.path()).await;
        let grant = client.acquire("v", "me", Duration::ZERO).await.unwrap();
        assert!(grant
            .mount_options
            .contains(&"errors=remount-ro".to_string()));
        let again = client.keepalive(&grant.session).await.unwrap();
        assert_eq!(again.session, grant.session);
        let status = client.volume("v").await.unwrap();
        assert_eq!(status.state, VolumeState::Held);
        assert_eq!(status.holder.as_deref(), Some("me"));
        let all = client.volumes().await.unwrap();
        assert_eq!(all.len(), 2);
        let released = client.release("v", &grant.session).await.unwrap();
        assert_eq!(released.state, VolumeState::Free);
        let err = client.keepalive(&grant.session).await.unwrap_err();
        assert!(err.session_over(), "{err}");
        assert_eq!(err.code(), Some(ErrorCode::UnknownSession));
        assert!(!err.is_unreachable());
        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn api_errors_keep_their_body() {
        let dir = tempfile::tempdir().unwrap();
        let (server, client) = server(dir.path()).await;
        let err = client
            .acquire("nope", "me", Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::UnknownVolume));
        assert!(err.to_string().contains("no volume named"), "{err}");
        let first = client.acquire("v", "a", Duration::ZERO).await.unwrap();
        let err = client
            .acquire("v", "b", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Held));
        assert_eq!(err.body().unwrap().holder.as_deref(), Some("a"));
        let status = client.handover("v", "node-2").await.unwrap();
        assert_eq!(status.holder.as_deref(), Some("node-2"));
        assert!(client
            .keepalive(&first.session)
            .await
            .unwrap_err()
            .session_over());
        // A name the server refuses: 400 with a reason, not a different path.
        let err = client.volume("../v").await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadRequest));
        let err = client
            .acquire("v", "a", MAX_ACQUIRE_TIMEOUT + Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::BadArgument { .. }), "{err}");
        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_missing_socket_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::new(dir.path().join("none.sock"));
        let err = client.volumes().await.unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        assert!(err.is_unreachable());
        assert!(err.to_string().contains("none.sock"), "{err}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("silent.sock");
        // Accepts connections and never answers.
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                conns.push(c);
            }
        });
        let client = Client::new(&socket).with_timeout(Duration::from_millis(200));
        let err = client.keepalive("s").await.unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
        assert!(err.is_unreachable());
        held.abort();
    }
}
