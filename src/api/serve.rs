//! The API's listeners: a Unix socket (always) and a loopback TCP address
//! (optional).
//!
//! Rules:
//! - An existing file at the socket path is removed only if it is a socket
//!   nobody answers on (a stale one from a crashed daemon). A socket that
//!   answers means another server runs: refuse. Anything that is not a socket:
//!   refuse, never delete it.
//! - The socket is made mode 0660 right after it is bound. (Between bind and
//!   chmod it has the umask's mode; put the socket in a directory only the
//!   daemon's group can enter if that window matters.)
//! - TCP is accepted only on loopback addresses: the API has no
//!   authentication, its callers are on this node.
//! - On shutdown the socket file is removed if it is still the one we bound.
//! - Every connection carries a [`Peer`] (axum's `ConnectInfo`): on the Unix
//!   socket a pidfd of the process that connected, taken when the connection
//!   is accepted (`POST /v1/volumes/{volume}/mount` mounts into that
//!   process's mount namespace); on TCP only the address, which names no
//!   process.

use super::Command;
use crate::metrics::Metrics;
use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use std::future::IntoFuture;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Who is at the other end of a connection.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A Unix socket peer: a pidfd of the process that connected, or why
    /// there is none.
    Unix(Result<Arc<OwnedFd>, String>),
    /// A TCP peer: an address, no process.
    Tcp(SocketAddr),
}

impl Connected<IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Peer {
        Peer::Unix(
            crate::nsmount::peer_pidfd(stream.io())
                .map(Arc::new)
                .map_err(|e| e.to_string()),
        )
    }
}

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Peer {
        Peer::Tcp(*stream.remote_addr())
    }
}

/// Mode of the Unix socket: owner and group may connect.
pub const SOCKET_MODE: u32 = 0o660;

/// Where to listen.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The Unix socket's path.
    pub socket: PathBuf,
    /// An optional loopback TCP address (port 0 picks a free port).
    pub tcp: Option<SocketAddr>,
}

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The TCP address is not a loopback one.
    #[error("refusing to serve the API on {addr}: it has no authentication, so only loopback addresses (127.0.0.0/8, ::1) are allowed")]
    NotLoopback {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// Another server answers on the socket.
    #[error("another server is answering on {path}; stop it first or choose another --api-socket")]
    SocketInUse {
        /// The socket's path.
        path: PathBuf,
    },
    /// Something that is not a socket is at the socket's path.
    #[error("{path} exists and is not a socket; refusing to remove it (choose another path)")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// An I/O error on the socket path.
    #[error("API socket {path}: {source}")]
    Socket {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// An I/O error on the TCP address.
    #[error("API address {addr}: {source}")]
    Tcp {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// A listener failed while serving.
    #[error("API server failed: {0}")]
    Serve(io::Error),
}

/// A running API server. Stop it with [`Server::shutdown`].
pub struct Server {
    socket: PathBuf,
    socket_ino: (u64, u64),
    tcp: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<io::Result<()>>>,
}

impl Server {
    /// Bind the listeners and start serving [`super::router`] over `commands`,
    /// with `metrics` at `/metrics`. Open event streams end on
    /// [`Server::shutdown`].
    pub async fn start(
        config: &ServeConfig,
        commands: mpsc::Sender<Command>,
        metrics: Arc<Metrics>,
    ) -> Result<Server, ServeError> {
        // Check TCP first: a refused address must not leave a socket behind.
        if let Some(addr) = config.tcp {
            if !addr.ip().is_loopback() {
                return Err(ServeError::NotLoopback { addr });
            }
        }
        let (tcp_listener, tcp) = match config.tcp {
            Some(addr) => {
                let tcp_err = |source| ServeError::Tcp { addr, source };
                let listener = TcpListener::bind(addr).await.map_err(tcp_err)?;
                let local = listener.local_addr().map_err(tcp_err)?;
                (Some(listener), Some(local))
            }
            None => (None, None),
        };
        let (unix_listener, socket_ino) = bind_unix(&config.socket).await?;

        let (stop, _) = watch::channel(false);
        let app = super::router::router_until(commands, metrics, Some(stop.subscribe()));
        let mut tasks = Vec::new();
        let mut stopped = stop.subscribe();
        let unix = axum::serve(
            unix_listener,
            app.clone().into_make_service_with_connect_info::<Peer>(),
        )
        .with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .into_future();
        tasks.push(tokio::spawn(unix));
        if let Some(listener) = tcp_listener {
            let mut stopped = stop.subscribe();
            let serve = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .into_future();
            tasks.push(tokio::spawn(serve));
        }
        Ok(Server {
            socket: config.socket.clone(),
            socket_ino,
            tcp,
            stop,
            tasks,
        })
    }

    /// The Unix socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The bound TCP address, if any (the real port when 0 was asked for).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// Stop accepting, let requests in flight finish, remove the socket file.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        let _ = self.stop.send(true);
        let mut result = Ok(());
        for task in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(ServeError::Serve(e)),
                Err(e) => result = Err(ServeError::Serve(io::Error::other(e))),
            }
        }
        // Remove the socket only if it is still ours (not a successor's).
        if let Ok(meta) = std::fs::symlink_metadata(&self.socket) {
            if (meta.dev(), meta.ino()) == self.socket_ino {
                let _ = std::fs::remove_file(&self.socket);
            }
        }
        result
    }
}

/// Bind the Unix socket at `path` following the module's rules; returns the
/// listener and the socket file's (device, inode).
async fn bind_unix(path: &Path) -> Result<(UnixListener, (u64, u64)), ServeError> {
    let err = |source| ServeError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path).await {
            Ok(_) => {
                return Err(ServeError::SocketInUse {
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(err)?;
            }
            Err(e) => return Err(err(e)),
        },
        Ok(_) => {
            return Err(ServeError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(err)?;
    let meta = std::fs::symlink_metadata(path).map_err(err)?;
    Ok((listener, (meta.dev(), meta.ino())))
}
