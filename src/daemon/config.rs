//! The daemon's configuration: command line, environment, optional TOML file,
//! defaults, in that order of precedence (docs/CONFIG.md).
//!
//! Every option is a flag with an environment variable (clap resolves flag
//! over environment) and a key of the same name in the file; a value missing
//! from all three takes the default named beside it here. The result,
//! [`DaemonConfig`], is checked as a whole before anything is opened, so a bad
//! value is one clear error at start-up.

use crate::core::params::Params;
pub use crate::device::guard::Policy;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default API socket.
pub const DEFAULT_SOCKET: &str = crate::api::DEFAULT_SOCKET;
/// Default time a session may go without a keepalive before it is fenced.
pub const DEFAULT_SESSION_TIMEOUT_MS: u64 = 5_000;
/// Default time a holder asked to stop (handover, shutdown) has to release.
pub const DEFAULT_STOP_TIMEOUT_MS: u64 = 30_000;
/// Default time this node steps aside after handing a volume over.
pub const DEFAULT_HANDOVER_HOLD_OFF_MS: u64 = 5_000;
/// Default sysfs root (discovery, path health, the stale-I/O guard).
pub const DEFAULT_SYSFS_ROOT: &str = "/sys";
/// Default directory of device nodes for volumes given by id.
pub const DEFAULT_DEV_DIR: &str = "/dev";
/// Default stale-I/O guard policy.
pub const DEFAULT_STALE_IO_POLICY: Policy = Policy::Warn;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("config file {}: {error}", path.display())]
    Parse {
        path: PathBuf,
        error: Box<toml::de::Error>,
    },
    #[error(
        "no node name: give --node-name (or BLOCKFENCE_NODE_NAME, or node_name in the config file)"
    )]
    NoNodeName,
    #[error("no volumes: give --volume NAME=DEVICE (or BLOCKFENCE_VOLUMES=NAME=DEVICE,..., or volumes in the config file)")]
    NoVolumes,
    #[error("volume {0:?} is given twice")]
    DuplicateVolume(String),
    #[error("bad volume {spec:?}: {why}")]
    BadVolume { spec: String, why: String },
    #[error("{0}")]
    Invalid(String),
}

/// One volume: its API name and its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// The name the API uses (1-253 of `[A-Za-z0-9._-]`).
    pub name: String,
    /// The block device (or image file) formatted by `blockfence format`,
    /// as an absolute path, or an id resolved under the sysfs root:
    /// `uuid.<uuid>`, `eui.<hex>`, `nguid.<hex>`, `wwid:<wwid>`, a bare
    /// WWID/NGUID/UUID, or a block device name.
    pub device: PathBuf,
}

/// Parses `NAME=DEVICE` (DEVICE: a path or an id, see [`VolumeSpec`]).
pub fn parse_volume(spec: &str) -> Result<VolumeSpec, String> {
    let (name, device) = spec
        .split_once('=')
        .ok_or_else(|| format!("{spec:?} is not NAME=DEVICE (e.g. pg=/dev/nvme0n1)"))?;
    crate::api::router::valid_name("volume name", name).map_err(|e| e.message)?;
    if device.is_empty() {
        return Err(format!("{spec:?}: the device path is empty"));
    }
    Ok(VolumeSpec {
        name: name.to_string(),
        device: PathBuf::from(device),
    })
}

/// `blockfence daemon` options.
#[derive(clap::Args, Debug, Default)]
pub struct DaemonArgs {
    /// This node's name, unique among the nodes that share a volume (on
    /// Kubernetes: the node name, from the downward API).
    #[arg(long, env = "BLOCKFENCE_NODE_NAME")]
    pub node_name: Option<String>,
    /// The API's Unix socket [default: /run/blockfence/api.sock].
    #[arg(long, env = "BLOCKFENCE_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Also serve the API on this loopback TCP address (e.g. 127.0.0.1:7946);
    /// non-loopback addresses are refused (the API has no authentication).
    #[arg(long, env = "BLOCKFENCE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// A volume to manage, NAME=DEVICE; repeat for more (the environment
    /// variable takes a comma-separated list). Replaces the file's list.
    /// DEVICE is a path, or an id resolved under --sysfs-root (uuid.<uuid>,
    /// eui.<hex>, nguid.<hex>, wwid:<wwid>); a missing device is waited for.
    #[arg(long = "volume", value_name = "NAME=DEVICE", env = "BLOCKFENCE_VOLUMES",
          value_delimiter = ',', value_parser = parse_volume)]
    pub volumes: Vec<VolumeSpec>,
    /// The watchdog device (/dev/watchdog), fed only while every lease this
    /// node writes under is valid [default: none: a stalled daemon is then
    /// covered by `blockfence run`'s own deadline only].
    #[arg(long, env = "BLOCKFENCE_WATCHDOG")]
    pub watchdog: Option<PathBuf>,
    /// The watchdog's timeout in ms; must not exceed any volume's fence
    /// timeout [default: the smallest fence timeout].
    #[arg(long, env = "BLOCKFENCE_WATCHDOG_TIMEOUT_MS")]
    pub watchdog_timeout_ms: Option<u64>,
    /// A session without a keepalive for this long is fenced and its lease
    /// released [default: 5000].
    #[arg(long, env = "BLOCKFENCE_SESSION_TIMEOUT_MS")]
    pub session_timeout_ms: Option<u64>,
    /// A holder asked to stop (handover, daemon shutdown) has this long to
    /// release before it is fenced [default: 30000].
    #[arg(long, env = "BLOCKFENCE_STOP_TIMEOUT_MS")]
    pub stop_timeout_ms: Option<u64>,
    /// After a handover, local acquires wait this long so the named node gets
    /// the volume [default: 5000].
    #[arg(long, env = "BLOCKFENCE_HANDOVER_HOLD_OFF_MS")]
    pub handover_hold_off_ms: Option<u64>,
    /// The lease parameters this node records (each defaults to the area's).
    #[command(flatten)]
    pub params: ParamOverrides,
    /// Where sysfs is (volume ids, path health, the stale-I/O guard)
    /// [default: /sys].
    #[arg(long, env = "BLOCKFENCE_SYSFS_ROOT")]
    pub sysfs_root: Option<PathBuf>,
    /// Where the device nodes of volumes given by id are [default: /dev].
    #[arg(long, env = "BLOCKFENCE_DEV_DIR")]
    pub dev_dir: Option<PathBuf>,
    /// What to do when an NVMe volume's queued writes could outlive a
    /// takeover (docs/DEVICES.md §3), checked before its first grant:
    /// refuse the grant, warn (and grant only where NVMe reservations
    /// refuse a fenced node's writes), or set fast_io_fail_tmo
    /// [default: warn].
    #[arg(long, env = "BLOCKFENCE_STALE_IO_POLICY", value_enum)]
    pub stale_io_policy: Option<Policy>,
    /// A TOML file with any of these options (keys as the long option names
    /// with `_` for `-`; `volumes = ["pg=/dev/nvme0n1"]`). Flags and
    /// environment variables override it.
    #[arg(long, env = "BLOCKFENCE_CONFIG")]
    pub config: Option<PathBuf>,
}

/// The config file: the same options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_name: Option<String>,
    socket: Option<PathBuf>,
    listen: Option<SocketAddr>,
    volumes: Option<Vec<String>>,
    watchdog: Option<PathBuf>,
    watchdog_timeout_ms: Option<u64>,
    session_timeout_ms: Option<u64>,
    stop_timeout_ms: Option<u64>,
    handover_hold_off_ms: Option<u64>,
    io_timeout_ms: Option<u32>,
    renew_interval_ms: Option<u32>,
    lease_timeout_ms: Option<u32>,
    fence_timeout_ms: Option<u32>,
    sysfs_root: Option<PathBuf>,
    dev_dir: Option<PathBuf>,
    stale_io_policy: Option<String>,
}

/// Lease parameters given on the command line (`blockfence daemon`, `lease
/// acquire`); each `None` takes the value the area records.
#[derive(clap::Args, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamOverrides {
    /// Deadline of each lease I/O, ms [default: the area's, set by format].
    #[arg(long, env = "BLOCKFENCE_IO_TIMEOUT_MS")]
    pub io_timeout_ms: Option<u32>,
    /// Time between renewals, ms [default: the area's].
    #[arg(long, env = "BLOCKFENCE_RENEW_INTERVAL_MS")]
    pub renew_interval_ms: Option<u32>,
    /// Lease validity after the start of the last good renewal, ms [default: the area's].
    #[arg(long, env = "BLOCKFENCE_LEASE_TIMEOUT_MS")]
    pub lease_timeout_ms: Option<u32>,
    /// Time the fence may take after the lease expired, ms [default: the area's].
    #[arg(long, env = "BLOCKFENCE_FENCE_TIMEOUT_MS")]
    pub fence_timeout_ms: Option<u32>,
}

impl ParamOverrides {
    /// The parameters this node records on a volume whose area says `area`.
    pub fn apply(&self, area: Params) -> Params {
        Params {
            io_timeout_ms: self.io_timeout_ms.unwrap_or(area.io_timeout_ms),
            renew_interval_ms: self.renew_interval_ms.unwrap_or(area.renew_interval_ms),
            lease_timeout_ms: self.lease_timeout_ms.unwrap_or(area.lease_timeout_ms),
            fence_timeout_ms: self.fence_timeout_ms.unwrap_or(area.fence_timeout_ms),
        }
    }
}

/// Where the device layer looks, and the guard's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceOptions {
    pub sysfs_root: PathBuf,
    pub dev_dir: PathBuf,
    pub stale_io_policy: Policy,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            sysfs_root: PathBuf::from(DEFAULT_SYSFS_ROOT),
            dev_dir: PathBuf::from(DEFAULT_DEV_DIR),
            stale_io_policy: DEFAULT_STALE_IO_POLICY,
        }
    }
}

/// The daemon's resolved configuration.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub node_name: String,
    pub socket: PathBuf,
    pub listen: Option<SocketAddr>,
    pub volumes: Vec<VolumeSpec>,
    pub watchdog: Option<PathBuf>,
    /// `None`: the smallest fence timeout of the volumes.
    pub watchdog_timeout: Option<Duration>,
    pub session_timeout: Duration,
    pub stop_timeout: Duration,
    pub handover_hold_off: Duration,
    pub params: ParamOverrides,
    pub devices: DeviceOptions,
}

impl DaemonArgs {
    /// Merges flags/environment over the config file over the defaults.
    pub fn resolve(self) -> Result<DaemonConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let volumes = if !self.volumes.is_empty() {
            self.volumes
        } else {
            file.volumes
                .unwrap_or_default()
                .iter()
                .map(|s| {
                    parse_volume(s).map_err(|why| ConfigError::BadVolume {
                        spec: s.clone(),
                        why,
                    })
                })
                .collect::<Result<_, _>>()?
        };
        if volumes.is_empty() {
            return Err(ConfigError::NoVolumes);
        }
        let mut names = std::collections::BTreeSet::new();
        for v in &volumes {
            if !names.insert(v.name.clone()) {
                return Err(ConfigError::DuplicateVolume(v.name.clone()));
            }
        }
        let node_name = self
            .node_name
            .or(file.node_name)
            .ok_or(ConfigError::NoNodeName)?;
        crate::disk::runner::check_node_name(&node_name)
            .map_err(|e| ConfigError::Invalid(format!("--node-name {node_name:?}: {e}")))?;
        let ms = Duration::from_millis;
        let session_timeout = ms(self
            .session_timeout_ms
            .or(file.session_timeout_ms)
            .unwrap_or(DEFAULT_SESSION_TIMEOUT_MS));
        if session_timeout < ms(100) {
            return Err(ConfigError::Invalid(
                "--session-timeout-ms must be at least 100".into(),
            ));
        }
        let watchdog_timeout = self
            .watchdog_timeout_ms
            .or(file.watchdog_timeout_ms)
            .map(ms);
        if watchdog_timeout.is_some_and(|t| t < ms(1)) {
            return Err(ConfigError::Invalid(
                "--watchdog-timeout-ms must be at least 1".into(),
            ));
        }
        let stale_io_policy = match (self.stale_io_policy, file.stale_io_policy) {
            (Some(p), _) => p,
            (None, Some(s)) => <Policy as clap::ValueEnum>::from_str(&s, true).map_err(|_| {
                ConfigError::Invalid(format!(
                    "stale_io_policy {s:?}: give refuse, warn or set-fast-io-fail"
                ))
            })?,
            (None, None) => DEFAULT_STALE_IO_POLICY,
        };
        Ok(DaemonConfig {
            devices: DeviceOptions {
                sysfs_root: self
                    .sysfs_root
                    .or(file.sysfs_root)
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_SYSFS_ROOT)),
                dev_dir: self
                    .dev_dir
                    .or(file.dev_dir)
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_DEV_DIR)),
                stale_io_policy,
            },
            node_name,
            socket: self
                .socket
                .or(file.socket)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            listen: self.listen.or(file.listen),
            volumes,
            watchdog: self.watchdog.or(file.watchdog),
            watchdog_timeout,
            session_timeout,
            stop_timeout: ms(self
                .stop_timeout_ms
                .or(file.stop_timeout_ms)
                .unwrap_or(DEFAULT_STOP_TIMEOUT_MS)),
            handover_hold_off: ms(self
                .handover_hold_off_ms
                .or(file.handover_hold_off_ms)
                .unwrap_or(DEFAULT_HANDOVER_HOLD_OFF_MS)),
            params: ParamOverrides {
                io_timeout_ms: self.params.io_timeout_ms.or(file.io_timeout_ms),
                renew_interval_ms: self.params.renew_interval_ms.or(file.renew_interval_ms),
                lease_timeout_ms: self.params.lease_timeout_ms.or(file.lease_timeout_ms),
                fence_timeout_ms: self.params.fence_timeout_ms.or(file.fence_timeout_ms),
            },
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    toml::from_str(&text).map_err(|error| ConfigError::Parse {
        path: path.to_path_buf(),
        error: Box::new(error),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn args(volumes: &[&str]) -> DaemonArgs {
        DaemonArgs {
            node_name: Some("node-a".into()),
            volumes: volumes.iter().map(|v| parse_volume(v).unwrap()).collect(),
            ..DaemonArgs::default()
        }
    }

    #[test]
    fn defaults_fill_what_is_not_given() {
        let c = args(&["pg=/dev/loop0"]).resolve().unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.session_timeout, Duration::from_millis(5_000));
        assert_eq!(c.volumes[0].device, PathBuf::from("/dev/loop0"));
        assert_eq!(c.params, ParamOverrides::default());
        assert_eq!(c.devices, DeviceOptions::default());
    }

    #[test]
    fn device_options_come_from_flags_or_the_file() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "sysfs_root = \"/tmp/sys\"\nstale_io_policy = \"set-fast-io-fail\"\nvolumes = [\"pg=uuid.1234\"]"
        )
        .unwrap();
        let c = DaemonArgs {
            config: Some(f.path().to_path_buf()),
            node_name: Some("a".into()),
            ..DaemonArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.devices.sysfs_root, PathBuf::from("/tmp/sys"));
        assert_eq!(c.devices.stale_io_policy, Policy::SetFastIoFail);
        assert_eq!(c.volumes[0].device, PathBuf::from("uuid.1234"));
        let c = DaemonArgs {
            config: Some(f.path().to_path_buf()),
            stale_io_policy: Some(Policy::Refuse),
            ..args(&["pg=eui.00a0"])
        }
        .resolve()
        .unwrap();
        assert_eq!(c.devices.stale_io_policy, Policy::Refuse);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "stale_io_policy = \"maybe\"").unwrap();
        let e = DaemonArgs {
            config: Some(f.path().to_path_buf()),
            ..args(&["a=/x"])
        }
        .resolve()
        .unwrap_err();
        assert!(e.to_string().contains("set-fast-io-fail"), "{e}");
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            f,
            "node_name = \"from-file\"\nsocket = \"/tmp/f.sock\"\nvolumes = [\"a=/dev/a\", \"b=/dev/b\"]\n\
             session_timeout_ms = 7000\nfence_timeout_ms = 2500"
        )
        .unwrap();
        let c = DaemonArgs {
            config: Some(f.path().to_path_buf()),
            ..DaemonArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.node_name, "from-file");
        assert_eq!(c.volumes.len(), 2);
        assert_eq!(c.session_timeout, Duration::from_millis(7_000));
        assert_eq!(c.params.fence_timeout_ms, Some(2_500));
        let c = DaemonArgs {
            config: Some(f.path().to_path_buf()),
            session_timeout_ms: Some(9_000),
            ..args(&["c=/dev/c"])
        }
        .resolve()
        .unwrap();
        assert_eq!(c.node_name, "node-a");
        assert_eq!(c.volumes.len(), 1);
        assert_eq!(c.socket, PathBuf::from("/tmp/f.sock"));
        assert_eq!(c.session_timeout, Duration::from_millis(9_000));
    }

    #[test]
    fn bad_input_says_what_is_wrong() {
        assert!(parse_volume("pg").unwrap_err().contains("NAME=DEVICE"));
        assert!(parse_volume("pg=").unwrap_err().contains("empty"));
        assert!(parse_volume("a b=/dev/x").is_err());
        assert!(matches!(
            args(&["a=/x", "a=/y"]).resolve(),
            Err(ConfigError::DuplicateVolume(_))
        ));
        assert!(matches!(args(&[]).resolve(), Err(ConfigError::NoVolumes)));
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "nod_name = \"typo\"").unwrap();
        let e = DaemonArgs {
            config: Some(f.path().to_path_buf()),
            ..args(&["a=/x"])
        }
        .resolve()
        .unwrap_err();
        assert!(e.to_string().contains("nod_name"), "{e}");
    }
}
