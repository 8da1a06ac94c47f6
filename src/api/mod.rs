//! The node-local HTTP API: parse a request, turn it into a [`Command`], send it
//! over a channel to whatever owns the lease state, await the reply, render it.
//!
//! Invariants:
//! - Handlers never touch lease state. The only thing they hold is an
//!   `mpsc::Sender<Command>`; each command carries a `oneshot::Sender` for its
//!   reply. The owner of the receiver (the daemon later, [`fake::FakeBackend`]
//!   now) is the "backend".
//! - Every answer, error or not, is JSON except `/metrics` (text/plain). Errors
//!   have the shape `{"error": code, "message": text}` (plus `holder` when a
//!   volume is held by someone else); see docs/openapi.yaml.
//! - Nothing here panics on bad input: malformed bodies, paths and methods are
//!   400/404/405 with a JSON body.
//!
//! Layout: this file holds the wire types and the command set; [`router`] the
//! axum handlers; [`serve`] the listeners (Unix socket, optional loopback TCP);
//! [`fake`] an in-memory backend for tests and a future `--fake` dev mode.

pub mod fake;
pub mod router;
pub mod serve;

pub use router::router;
pub use serve::{Peer, ServeConfig, ServeError, Server};

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Where the daemon listens and `blockfence run` connects unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/blockfence/api.sock";

/// Longest `timeout_seconds` an acquire may ask for.
pub const MAX_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Mount options every grant carries: a filesystem error must stop writes
/// rather than let a node that lost the lease carry on.
pub const REQUIRED_MOUNT_OPTIONS: &[&str] = &["errors=remount-ro"];

/// Whether a volume has a writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Nobody holds the lease.
    Free,
    /// A node holds the lease (this one or another).
    Held,
}

/// This node's fencing state for a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceState {
    /// This node does not write the volume; nothing to fence.
    Idle,
    /// This node writes the volume; the fence fires if renewals stop.
    Armed,
    /// The fence has fired: writes were stopped.
    Fenced,
}

/// What `GET /v1/volumes[/{volume}]` reports for one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// The volume's name.
    pub volume: String,
    /// Free or held.
    pub state: VolumeState,
    /// Who holds it (a node name, or a local holder name), if anyone.
    pub holder: Option<String>,
    /// The lease generation (grows with every new holder).
    pub generation: u64,
    /// Milliseconds since the holder last renewed, if held.
    pub since_renewal_ms: Option<u64>,
    /// This node's fencing state.
    pub fence_state: FenceState,
}

/// What a successful acquire (and keepalive) returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Opaque session id: send it to keepalive and release.
    pub session: String,
    /// The lease generation this grant belongs to.
    pub generation: u64,
    /// The block device to mount.
    pub device: String,
    /// Mount options to use; always includes [`REQUIRED_MOUNT_OPTIONS`].
    pub mount_options: Vec<String>,
    /// How long the grant stays valid without a keepalive, in milliseconds,
    /// counted from when the request was *sent*: a holder that has heard
    /// nothing newer must have stopped writing by then.
    pub valid_for_ms: u64,
    /// How often to send a keepalive, in milliseconds (well inside
    /// `valid_for_ms`).
    pub keepalive_interval_ms: u64,
    /// Set when the daemon asks the holder to stop: finish, unmount and
    /// release (the grant stays valid meanwhile). `None` while it may go on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopReason>,
}

/// What a successful `POST /v1/volumes/{volume}/mount` returns: the volume
/// is mounted on `target` in the caller's mount namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mounted {
    /// The volume's name.
    pub volume: String,
    /// The session the mount belongs to.
    pub session: String,
    /// Where it is mounted, in the caller's mount namespace.
    pub target: String,
    /// The block device mounted (a path in the daemon's namespace).
    pub device: String,
}

/// Why the daemon asks a session's holder to stop (see [`Grant::stop`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A planned switchover to another node was requested.
    Handover,
    /// The daemon is shutting down.
    Shutdown,
}

/// One entry of a volume's event stream (`GET /v1/volumes/{volume}/events`,
/// server-sent events: the SSE `event:` field is the `event` tag, `data:` is
/// this object as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeEvent {
    /// The volume's name.
    pub volume: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: VolumeEventKind,
}

/// What happened to a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum VolumeEventKind {
    /// A session on this node was granted the volume.
    Granted {
        session: String,
        holder: String,
        generation: u64,
    },
    /// A lease renewal failed or was late; the lease runs out in `valid_for_ms`
    /// unless a later renewal succeeds.
    RenewalLate { generation: u64, valid_for_ms: u64 },
    /// The holder was asked to stop for a handover to `to_node`.
    HandoverRequested { session: String, to_node: String },
    /// This node started fencing its use of the volume.
    Fencing { generation: u64, reason: String },
    /// The fence ended; `ok` is false when a step failed or was late (the
    /// watchdog was starved).
    Fenced {
        generation: u64,
        ok: bool,
        duration_ms: u64,
    },
    /// This node released the lease.
    Released { generation: u64 },
    /// The volume's device is not usable on this node (no usable NVMe path,
    /// device removed): a live session is fenced at once and nothing is
    /// granted until `path_back`.
    PathLost { reason: String },
    /// The volume's device is usable again (nothing is granted by itself).
    PathBack {},
    /// The stale-I/O guard found that writes queued on this node could
    /// outlive a takeover, and the policy (`warn`) grants anyway; `fixes`
    /// are the commands that make it pass, separated by "; ".
    StaleIoWarning { fixes: String },
}

/// The machine-readable part of an error: the `error` field of the JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed request: bad JSON, missing or wrong-typed field, bad value.
    BadRequest,
    /// No such path.
    NotFound,
    /// The path exists, the method does not.
    MethodNotAllowed,
    /// No such volume on this node.
    UnknownVolume,
    /// No such session (never granted, released, or handed over).
    UnknownSession,
    /// The session belongs to another volume.
    SessionMismatch,
    /// Acquire timed out: somebody else holds the volume (`holder` names them).
    Held,
    /// Handover of a volume that nobody holds.
    NotHeld,
    /// The session is over (lease lost, fenced, expired): stop writing now.
    SessionEnded,
    /// The backend did not answer (not started, stopped, or too slow), or
    /// could not do what was asked (a mount failed).
    Unavailable,
    /// The daemon cannot tell which process sent the request (it came over
    /// TCP, or the socket gave no pidfd), so it cannot mount for it.
    CallerUnknown,
}

impl ErrorCode {
    /// The HTTP status this code is sent with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::NotFound | ErrorCode::UnknownVolume | ErrorCode::UnknownSession => {
                StatusCode::NOT_FOUND
            }
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::SessionMismatch | ErrorCode::Held | ErrorCode::NotHeld => {
                StatusCode::CONFLICT
            }
            ErrorCode::SessionEnded => StatusCode::GONE,
            ErrorCode::CallerUnknown => StatusCode::FORBIDDEN,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// An error answer: status, code and a message for people, rendered as
/// `{"error": code, "message": message}` (and `"holder"` when known).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code:?}: {message}")]
pub struct ApiError {
    /// HTTP status; always `code.status()` when built with [`ApiError::new`].
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: ErrorCode,
    /// What happened and, where it helps, what to do.
    pub message: String,
    /// Who holds the volume, for [`ErrorCode::Held`].
    pub holder: Option<String>,
}

impl ApiError {
    /// An error with the status that belongs to `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status: code.status(),
            code,
            message: message.into(),
            holder: None,
        }
    }

    /// 400 bad_request.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::BadRequest, message)
    }

    /// 404 unknown_volume.
    pub fn unknown_volume(volume: &str) -> ApiError {
        ApiError::new(
            ErrorCode::UnknownVolume,
            format!("no volume named {volume:?} on this node (GET /v1/volumes lists them)"),
        )
    }

    /// 404 unknown_session.
    pub fn unknown_session(session: &str) -> ApiError {
        ApiError::new(
            ErrorCode::UnknownSession,
            format!(
                "no session {session:?}: it was never granted, was released, or was handed over"
            ),
        )
    }

    /// 409 held, naming the holder.
    pub fn held(volume: &str, holder: &str) -> ApiError {
        ApiError {
            holder: Some(holder.to_string()),
            ..ApiError::new(
                ErrorCode::Held,
                format!("volume {volume:?} is held by {holder:?}; acquire timed out"),
            )
        }
    }

    /// 410 session_ended: the session's holder must stop writing now.
    pub fn session_ended(session: &str, why: &str) -> ApiError {
        ApiError::new(
            ErrorCode::SessionEnded,
            format!("session {session:?} has ended ({why}): stop writing now"),
        )
    }

    /// 503 unavailable.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Unavailable, message)
    }
}

/// The wire form of an [`ApiError`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The [`ErrorCode`].
    pub error: ErrorCode,
    /// The message.
    pub message: String,
    /// Who holds the volume, when the error is about that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
}

/// Where a backend sends one command's answer.
pub type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// One request to the backend. The backend answers every command exactly once
/// (dropping the reply sender counts as "unavailable"); an acquire answers no
/// later than its `timeout`.
#[derive(Debug)]
pub enum Command {
    /// Every volume this node knows, sorted by name.
    ListVolumes {
        /// The answer.
        reply: Reply<Vec<VolumeStatus>>,
    },
    /// One volume.
    GetVolume {
        /// The volume's name.
        volume: String,
        /// The answer.
        reply: Reply<VolumeStatus>,
    },
    /// Become the writer of `volume`, waiting up to `timeout` for it.
    Acquire {
        /// The volume's name.
        volume: String,
        /// Who asks (a pod or process name, for status and errors).
        holder: String,
        /// How long to wait while someone else holds it.
        timeout: Duration,
        /// The answer.
        reply: Reply<Grant>,
    },
    /// Extend a session's grant.
    Keepalive {
        /// The session id from the grant.
        session: String,
        /// The answer: the grant, renewed.
        reply: Reply<Grant>,
    },
    /// Give the volume up.
    Release {
        /// The volume's name.
        volume: String,
        /// The session id from the grant.
        session: String,
        /// The answer: the volume's status afterwards.
        reply: Reply<VolumeStatus>,
    },
    /// Mount the volume for a live session, in the mount namespace of the
    /// process that sent the request (`peer`).
    Mount {
        /// The volume's name.
        volume: String,
        /// The session id from the grant.
        session: String,
        /// Where to mount it: an absolute path in the caller's namespace.
        target: PathBuf,
        /// A pidfd of the caller (taken from the socket when it connected).
        peer: Arc<OwnedFd>,
        /// The answer, once the mount is in place.
        reply: Reply<Mounted>,
    },
    /// The volume's event stream: a receiver that gets every event from now on.
    Subscribe {
        /// The volume's name.
        volume: String,
        /// The answer.
        reply: Reply<tokio::sync::broadcast::Receiver<VolumeEvent>>,
    },
    /// Hand the lease of a held volume to another node.
    Handover {
        /// The volume's name.
        volume: String,
        /// The node that should hold it next.
        to_node: String,
        /// The answer: the volume's status afterwards.
        reply: Reply<VolumeStatus>,
    },
}

impl Command {
    /// The volume the command names, if it names one (keepalive names a
    /// session only; list names none).
    pub fn volume(&self) -> Option<&str> {
        match self {
            Command::GetVolume { volume, .. }
            | Command::Acquire { volume, .. }
            | Command::Release { volume, .. }
            | Command::Mount { volume, .. }
            | Command::Subscribe { volume, .. }
            | Command::Handover { volume, .. } => Some(volume),
            Command::ListVolumes { .. } | Command::Keepalive { .. } => None,
        }
    }

    /// The session the command names, if it names one.
    pub fn session(&self) -> Option<&str> {
        match self {
            Command::Keepalive { session, .. }
            | Command::Release { session, .. }
            | Command::Mount { session, .. } => Some(session),
            _ => None,
        }
    }

    /// Answers the command with `error`.
    pub fn fail(self, error: ApiError) {
        // A dropped receiver (the client left) needs no answer.
        match self {
            Command::ListVolumes { reply } => drop(reply.send(Err(error))),
            Command::GetVolume { reply, .. }
            | Command::Release { reply, .. }
            | Command::Handover { reply, .. } => drop(reply.send(Err(error))),
            Command::Acquire { reply, .. } | Command::Keepalive { reply, .. } => {
                drop(reply.send(Err(error)))
            }
            Command::Subscribe { reply, .. } => drop(reply.send(Err(error))),
            Command::Mount { reply, .. } => drop(reply.send(Err(error))),
        }
    }
}
