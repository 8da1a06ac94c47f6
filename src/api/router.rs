//! The axum handlers: parse and validate, build a [`Command`], send it, await
//! the reply, render it. No handler holds lease state.
//!
//! Request bodies go through [`ApiJson`] and path parameters through
//! [`ApiPath`], so that every rejection is a JSON [`ApiError`] rather than
//! axum's plain-text one. Unknown paths and methods are JSON too.
//!
//! `GET /v1/volumes/{volume}/events` is the one long-lived answer: server-sent
//! events fed by the backend's broadcast receiver. It ends when the backend
//! drops its sender or the server shuts down (so a graceful shutdown never
//! waits on a subscriber), and a subscriber that falls behind is told how many
//! events it missed (`event: lagged`) rather than cut off.

use super::{
    ApiError, Command, ErrorBody, ErrorCode, Grant, Mounted, Peer, VolumeEvent, VolumeEventKind,
    VolumeStatus, MAX_ACQUIRE_TIMEOUT,
};
use crate::metrics::Metrics;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// How long a handler waits for the backend beyond the command's own timeout
/// before it answers 503.
pub const BACKEND_REPLY_MARGIN: Duration = Duration::from_secs(5);

/// How long `/readyz` waits for the backend's first answer.
pub const READYZ_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a mount may take (reading the superblock, waiting out ext4's
/// MMP check) before the handler answers 503.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest mount target accepted (PATH_MAX).
pub const MAX_TARGET_LEN: usize = 4096;

/// Longest volume name, session id or node name accepted.
pub const MAX_NAME_LEN: usize = 253;

/// How often an idle event stream sends a keep-alive comment, so that proxies
/// and clients can tell a quiet stream from a dead one.
pub const SSE_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// The SSE `event:` name sent when a subscriber fell behind and missed events.
pub const LAGGED_EVENT: &str = "lagged";

/// Content type of `/metrics` (Prometheus text format 0.0.4).
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code,
            message: self.message,
            holder: self.holder,
        };
        (self.status, Json(body)).into_response()
    }
}

/// `Json<T>` whose rejections are JSON [`ApiError`]s (400 bad_request).
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    let what = match &rejection {
        JsonRejection::JsonDataError(_) => "request body has the wrong fields or types",
        JsonRejection::JsonSyntaxError(_) => "request body is not valid JSON",
        JsonRejection::MissingJsonContentType(_) => "send `Content-Type: application/json`",
        _ => "request body could not be read",
    };
    ApiError::bad_request(format!("{what}: {}", rejection.body_text()))
}

/// `Path<String>` whose rejections are JSON [`ApiError`]s, and which checks
/// that the name is one [`valid_name`] accepts.
pub struct ApiPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(name)) => {
                valid_name("path parameter", &name)?;
                Ok(ApiPath(name))
            }
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

fn path_rejection(rejection: PathRejection) -> ApiError {
    ApiError::bad_request(format!("bad path: {}", rejection.body_text()))
}

/// Names (volumes, sessions, nodes, holders): 1 to [`MAX_NAME_LEN`] bytes of
/// ASCII letters, digits, `.`, `_`, `-`.
pub fn valid_name(what: &str, name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(ApiError::bad_request(format!(
            "{what} must be 1 to {MAX_NAME_LEN} characters long, got {}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(ApiError::bad_request(format!(
            "{what} {name:?} contains {c:?}; use letters, digits, '.', '_' and '-'"
        )));
    }
    Ok(())
}

/// Body of `POST /v1/volumes/{volume}/acquire`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireBody {
    /// Who asks.
    pub holder: String,
    /// How long to wait while someone else holds the volume (0 = do not wait).
    pub timeout_seconds: f64,
}

/// Body of `POST /v1/volumes/{volume}/release`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseBody {
    /// The session id from the grant.
    pub session: String,
}

/// Body of `POST /v1/volumes/{volume}/mount`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountBody {
    /// The session id from the grant.
    pub session: String,
    /// Where to mount: an absolute path without `..` in the caller's mount
    /// namespace.
    pub target: String,
}

/// Body of `POST /v1/volumes/{volume}/handover`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoverBody {
    /// The node that should hold the volume next.
    pub to_node: String,
}

/// Body of `/livez` and `/readyz`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    /// `"ok"` or `"unavailable"`.
    pub status: String,
}

/// The data of an `event: lagged` message: the subscriber missed `missed`
/// events (the stream goes on with the next one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lagged {
    /// The volume's name.
    pub volume: String,
    /// Always [`LAGGED_EVENT`].
    pub event: String,
    /// How many events were dropped.
    pub missed: u64,
}

/// What the handlers share: the command channel, the readiness flag, the
/// metrics to render and the server's stop signal (ends event streams).
#[derive(Clone)]
struct ApiState {
    commands: mpsc::Sender<Command>,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    stop: Option<watch::Receiver<bool>>,
}

impl ApiState {
    /// Send a command built around a fresh reply channel and await the answer,
    /// for at most `wait`.
    async fn ask<T>(
        &self,
        wait: Duration,
        build: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> Command,
    ) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(build(tx))
            .await
            .map_err(|_| ApiError::unavailable("the backend has stopped"))?;
        let answer = match tokio::time::timeout(wait, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(ApiError::unavailable(
                "the backend dropped the request without answering",
            )),
            Err(_) => Err(ApiError::unavailable(format!(
                "the backend did not answer within {} ms",
                wait.as_millis()
            ))),
        };
        if !matches!(&answer, Err(e) if e.code == ErrorCode::Unavailable) {
            self.ready.store(true, Ordering::Release);
        }
        answer
    }
}

/// The API's router over a command channel, serving `metrics` at `/metrics`.
/// Serve it with [`super::Server`] or any axum server. (Event streams served by
/// this router end only when the backend drops their sender; [`super::Server`]
/// also ends them on shutdown.)
pub fn router(commands: mpsc::Sender<Command>, metrics: Arc<Metrics>) -> Router {
    router_until(commands, metrics, None)
}

/// [`router`] whose event streams end once `stop` is true (or its sender is
/// gone).
pub(crate) fn router_until(
    commands: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
    stop: Option<watch::Receiver<bool>>,
) -> Router {
    let state = ApiState {
        commands,
        ready: Arc::new(AtomicBool::new(false)),
        metrics,
        stop,
    };
    Router::new()
        .route("/v1/volumes", get(list_volumes))
        .route("/v1/volumes/{volume}", get(get_volume))
        .route("/v1/volumes/{volume}/acquire", post(acquire))
        .route("/v1/volumes/{volume}/release", post(release))
        .route("/v1/volumes/{volume}/handover", post(handover))
        .route("/v1/volumes/{volume}/mount", post(mount))
        .route("/v1/volumes/{volume}/events", get(events))
        .route("/v1/sessions/{session}/keepalive", post(keepalive))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn list_volumes(State(api): State<ApiState>) -> Result<Json<Vec<VolumeStatus>>, ApiError> {
    api.ask(BACKEND_REPLY_MARGIN, |reply| Command::ListVolumes { reply })
        .await
        .map(Json)
}

async fn get_volume(
    State(api): State<ApiState>,
    ApiPath(volume): ApiPath,
) -> Result<Json<VolumeStatus>, ApiError> {
    api.ask(BACKEND_REPLY_MARGIN, |reply| Command::GetVolume {
        volume,
        reply,
    })
    .await
    .map(Json)
}

async fn acquire(
    State(api): State<ApiState>,
    ApiPath(volume): ApiPath,
    ApiJson(body): ApiJson<AcquireBody>,
) -> Result<Json<Grant>, ApiError> {
    valid_name("holder", &body.holder)?;
    let t = body.timeout_seconds;
    if !t.is_finite() || t < 0.0 || t > MAX_ACQUIRE_TIMEOUT.as_secs_f64() {
        return Err(ApiError::bad_request(format!(
            "timeout_seconds must be a number from 0 to {}, got {t}",
            MAX_ACQUIRE_TIMEOUT.as_secs()
        )));
    }
    let timeout = Duration::from_secs_f64(t);
    let holder = body.holder;
    api.ask(timeout + BACKEND_REPLY_MARGIN, |reply| Command::Acquire {
        volume,
        holder,
        timeout,
        reply,
    })
    .await
    .map(Json)
}

async fn keepalive(
    State(api): State<ApiState>,
    ApiPath(session): ApiPath,
) -> Result<Json<Grant>, ApiError> {
    api.ask(BACKEND_REPLY_MARGIN, |reply| Command::Keepalive {
        session,
        reply,
    })
    .await
    .map(Json)
}

async fn release(
    State(api): State<ApiState>,
    ApiPath(volume): ApiPath,
    ApiJson(body): ApiJson<ReleaseBody>,
) -> Result<Json<VolumeStatus>, ApiError> {
    valid_name("session", &body.session)?;
    let session = body.session;
    api.ask(BACKEND_REPLY_MARGIN, |reply| Command::Release {
        volume,
        session,
        reply,
    })
    .await
    .map(Json)
}

/// A mount target: absolute, no `..`, not too long, no NUL.
pub fn valid_target(target: &str) -> Result<std::path::PathBuf, ApiError> {
    let path = std::path::Path::new(target);
    if target.len() > MAX_TARGET_LEN || target.contains('\0') {
        return Err(ApiError::bad_request(format!(
            "target must be a path of at most {MAX_TARGET_LEN} bytes without NUL"
        )));
    }
    if !path.is_absolute() {
        return Err(ApiError::bad_request(format!(
            "target {target:?} must be an absolute path (it is resolved in the caller's mount namespace)"
        )));
    }
    if path
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(ApiError::bad_request(format!(
            "target {target:?} must not contain `..`"
        )));
    }
    Ok(path.to_path_buf())
}

/// The pidfd of the process that sent the request, or 403 caller_unknown.
fn caller(extensions: &axum::http::Extensions) -> Result<Arc<std::os::fd::OwnedFd>, ApiError> {
    let unknown = |why: String| ApiError::new(ErrorCode::CallerUnknown, why);
    match extensions.get::<ConnectInfo<Peer>>() {
        Some(ConnectInfo(Peer::Unix(Ok(pidfd)))) => Ok(Arc::clone(pidfd)),
        Some(ConnectInfo(Peer::Unix(Err(e)))) => Err(unknown(format!(
            "cannot identify the process that sent the request ({e}), so there is no mount \
             namespace to mount into"
        ))),
        Some(ConnectInfo(Peer::Tcp(addr))) => Err(unknown(format!(
            "mount is served only over the Unix socket: a TCP peer ({addr}) names no process \
             whose mount namespace the volume could be mounted into"
        ))),
        None => Err(unknown(
            "this server does not identify its callers, so it cannot mount for them (use the \
             daemon's Unix socket)"
                .into(),
        )),
    }
}

/// Validates the body, then identifies the caller (400 comes before 403).
async fn mount(
    State(api): State<ApiState>,
    ApiPath(volume): ApiPath,
    extensions: axum::http::Extensions,
    ApiJson(body): ApiJson<MountBody>,
) -> Result<Json<Mounted>, ApiError> {
    valid_name("session", &body.session)?;
    let target = valid_target(&body.target)?;
    let peer = caller(&extensions)?;
    let session = body.session;
    api.ask(MOUNT_TIMEOUT + BACKEND_REPLY_MARGIN, |reply| {
        Command::Mount {
            volume,
            session,
            target,
            peer,
            reply,
        }
    })
    .await
    .map(Json)
}

async fn handover(
    State(api): State<ApiState>,
    ApiPath(volume): ApiPath,
    ApiJson(body): ApiJson<HandoverBody>,
) -> Result<Json<VolumeStatus>, ApiError> {
    valid_name("to_node", &body.to_node)?;
    let to_node = body.to_node;
    api.ask(BACKEND_REPLY_MARGIN, |reply| Command::Handover {
        volume,
        to_node,
        reply,
    })
    .await
    .map(Json)
}

async fn livez() -> Json<Health> {
    Json(Health {
        status: "ok".to_string(),
    })
}

/// Ready once the backend has answered any command; until then this asks it
/// for the volume list itself.
async fn readyz(State(api): State<ApiState>) -> Response {
    if !api.ready.load(Ordering::Acquire) {
        if let Err(e) = api
            .ask(READYZ_PROBE_TIMEOUT, |reply| Command::ListVolumes { reply })
            .await
        {
            if e.code == ErrorCode::Unavailable {
                return e.into_response();
            }
        }
    }
    Json(Health {
        status: "ok".to_string(),
    })
    .into_response()
}

async fn render_metrics(State(api): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        api.metrics.render(),
    )
        .into_response()
}

/// Subscribe first (so an unknown volume is a JSON 404 before any stream
/// starts), then stream.
async fn events(
    State(api): State<ApiState>,
    ApiPath(volume): ApiPath,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let name = volume.clone();
    let receiver = api
        .ask(BACKEND_REPLY_MARGIN, |reply| Command::Subscribe {
            volume: name,
            reply,
        })
        .await?;
    let stream = event_stream(volume, receiver, api.stop.clone());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(SSE_KEEPALIVE_INTERVAL)))
}

/// The SSE `event:` name of an event: its `event` tag in JSON.
pub fn event_name(kind: &VolumeEventKind) -> &'static str {
    match kind {
        VolumeEventKind::Granted { .. } => "granted",
        VolumeEventKind::RenewalLate { .. } => "renewal_late",
        VolumeEventKind::HandoverRequested { .. } => "handover_requested",
        VolumeEventKind::Fencing { .. } => "fencing",
        VolumeEventKind::Fenced { .. } => "fenced",
        VolumeEventKind::Released { .. } => "released",
        VolumeEventKind::PathLost { .. } => "path_lost",
        VolumeEventKind::PathBack {} => "path_back",
        VolumeEventKind::StaleIoWarning { .. } => "stale_io_warning",
    }
}

const EXPECT_JSON: &str = "events are plain structs of strings, integers and booleans";

fn sse_event(event: &VolumeEvent) -> Event {
    Event::default()
        .event(event_name(&event.kind))
        .data(serde_json::to_string(event).expect(EXPECT_JSON))
}

fn lagged_event(volume: &str, missed: u64) -> Event {
    let data = Lagged {
        volume: volume.to_string(),
        event: LAGGED_EVENT.to_string(),
        missed,
    };
    Event::default()
        .event(LAGGED_EVENT)
        .data(serde_json::to_string(&data).expect(EXPECT_JSON))
}

struct Subscription {
    volume: String,
    receiver: broadcast::Receiver<VolumeEvent>,
    stop: Option<watch::Receiver<bool>>,
}

/// Every event the receiver gets, as SSE, until its sender is dropped or
/// `stop` turns true.
fn event_stream(
    volume: String,
    receiver: broadcast::Receiver<VolumeEvent>,
    stop: Option<watch::Receiver<bool>>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let start = Subscription {
        volume,
        receiver,
        stop,
    };
    futures_util::stream::unfold(start, |mut s| async move {
        let next = tokio::select! {
            biased;
            () = stopped(&mut s.stop) => return None,
            next = s.receiver.recv() => next,
        };
        let event = match next {
            Ok(event) => sse_event(&event),
            Err(RecvError::Lagged(missed)) => lagged_event(&s.volume, missed),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(event), s))
    })
}

/// Resolves once the server stops (or its stop sender is gone); never without
/// a stop signal.
async fn stopped(stop: &mut Option<watch::Receiver<bool>>) {
    match stop {
        Some(stop) => {
            let _ = stop.wait_for(|stopped| *stopped).await;
        }
        None => std::future::pending().await,
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no such path: {}", uri.path()))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_event_names_are_the_json_event_tags() {
        let kinds = [
            VolumeEventKind::Granted {
                session: "s".into(),
                holder: "h".into(),
                generation: 1,
            },
            VolumeEventKind::RenewalLate {
                generation: 1,
                valid_for_ms: 5,
            },
            VolumeEventKind::HandoverRequested {
                session: "s".into(),
                to_node: "n".into(),
            },
            VolumeEventKind::Fencing {
                generation: 1,
                reason: "lease_lost".into(),
            },
            VolumeEventKind::Fenced {
                generation: 1,
                ok: true,
                duration_ms: 3,
            },
            VolumeEventKind::Released { generation: 1 },
            VolumeEventKind::PathLost { reason: "r".into() },
            VolumeEventKind::PathBack {},
            VolumeEventKind::StaleIoWarning { fixes: "f".into() },
        ];
        for kind in kinds {
            let json = serde_json::to_value(VolumeEvent {
                volume: "v".into(),
                kind: kind.clone(),
            })
            .unwrap();
            assert_eq!(json["event"], event_name(&kind), "{json}");
            assert_eq!(json["volume"], "v");
        }
    }
}
