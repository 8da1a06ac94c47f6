//! Mounting a volume into another process's mount namespace, for a caller
//! that may not mount itself (an unprivileged database container).
//!
//! `blockfence run --daemon-mount` asks the daemon over its Unix socket; the
//! daemon identifies the caller by the socket itself ([`peer_pidfd`]) and
//! mounts the granted device on a directory of the caller's choosing, in the
//! caller's mount namespace ([`mount_into`]):
//! 1. in the daemon's own namespace (where the device node is): `fsopen("ext4")`,
//!    `fsconfig` the source and every option of the [`MountSpec`], create the
//!    superblock, `fsmount` a detached mount with the VFS flags as mount
//!    attributes;
//! 2. on a thread of its own: `unshare(CLONE_FS)` (a thread sharing its fs
//!    context may not change mount namespace), `setns(pidfd, CLONE_NEWNS)`
//!    (the namespace of *that* process, not of whatever reuses its pid),
//!    resolve the target there without following any symlink
//!    (`openat2(RESOLVE_NO_SYMLINKS)`: a caller cannot point the daemon at a
//!    place outside its own tree, e.g. through `/proc/PID/root`), and
//!    `move_mount` the detached mount onto it. The thread (and its namespace)
//!    ends with the call.
//!
//! Invariants:
//! - The daemon keeps no handle on the mount: every descriptor (fs context,
//!   detached mount, target) is closed when [`mount_into`] returns. The
//!   daemon's device fence ([`crate::fence::device`]) finds the mount through
//!   `/proc/PID/root`, unmounts it in the caller's namespace like any other,
//!   and proves the device unused with an exclusive open, which a handle kept
//!   here would make fail.
//! - A failed step leaves nothing mounted: the detached mount dies with its
//!   descriptor.
//!
//! What it must not do: mount anything but what the caller's session was
//! granted (the daemon checks the session before calling), or resolve the
//! target anywhere but in the caller's namespace.
//!
//! This module and its `unsafe` blocks are the only raw system calls of the
//! daemon's mount path (libc has no wrappers for the new mount API).

#![allow(unsafe_code)]

use crate::api;
use nix::mount::MsFlags;
use std::ffi::{CString, OsStr};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `getsockopt(SOL_SOCKET, SO_PEERPIDFD)`: a pidfd of the peer (Linux 6.5).
pub const SO_PEERPIDFD: libc::c_int = 77;

// From linux/mount.h (libc has the syscall numbers, not these).
const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
/// Mount attribute: read-only.
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// Mount attribute: ignore suid and sgid bits.
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
/// Mount attribute: no device files.
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
/// Mount attribute: no execution.
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;
/// The atime field of the mount attributes (one of the three below).
pub const MOUNT_ATTR__ATIME: u64 = 0x70;
/// atime: relatime (the default: zero).
pub const MOUNT_ATTR_RELATIME: u64 = 0x0;
/// atime: never update.
pub const MOUNT_ATTR_NOATIME: u64 = 0x10;
/// atime: always update.
pub const MOUNT_ATTR_STRICTATIME: u64 = 0x20;
/// Mount attribute: no directory atime updates.
pub const MOUNT_ATTR_NODIRATIME: u64 = 0x80;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

/// The filesystem type mounted.
pub const FS_TYPE: &str = "ext4";

/// How to mount: VFS flags and the filesystem's option string (mount(2)'s
/// arguments; [`fs_plan`] turns them into the new mount API's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// VFS flags (ro, nosuid, noatime, ...).
    pub flags: MsFlags,
    /// What ext4 parses (errors=remount-ro, data=ordered, ...).
    pub data: String,
}

/// A mount option that is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mount option {option:?}: {why}")]
pub struct BadMountOption {
    /// The option as given.
    pub option: String,
    /// Why it is refused.
    pub why: &'static str,
}

/// The mount arguments for the granted options plus the extra ones. The
/// [`api::REQUIRED_MOUNT_OPTIONS`] are always included, and no extra option
/// may weaken them (`errors=continue`). The daemon (`--daemon-mount`) and
/// `blockfence run` (mounting itself) both use this one definition.
pub fn mount_spec(granted: &[String], extra: &[String]) -> Result<MountSpec, BadMountOption> {
    let mut flags = MsFlags::empty();
    let mut data: Vec<String> = Vec::new();
    let required = api::REQUIRED_MOUNT_OPTIONS.iter().map(|s| s.to_string());
    let extra_checked = extra
        .iter()
        .map(|o| {
            if let Some(mode) = o.strip_prefix("errors=") {
                if mode != "remount-ro" && mode != "panic" {
                    return Err(BadMountOption {
                        option: o.clone(),
                        why: "a filesystem error must stop writes: only errors=remount-ro or errors=panic",
                    });
                }
            }
            Ok(o.clone())
        })
        .collect::<Result<Vec<_>, _>>()?;
    for opt in granted.iter().cloned().chain(required).chain(extra_checked) {
        let opt = opt.trim().to_string();
        let (set, clear) = match opt.as_str() {
            "" | "defaults" => continue,
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::MS_RELATIME),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::MS_NOATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::MS_NOATIME),
            "lazytime" => (MsFlags::MS_LAZYTIME, MsFlags::empty()),
            "silent" => (MsFlags::MS_SILENT, MsFlags::empty()),
            "remount" | "bind" | "rbind" | "move" => {
                return Err(BadMountOption {
                    option: opt,
                    why: "not a filesystem option",
                })
            }
            _ => {
                if !data.contains(&opt) {
                    data.push(opt);
                }
                continue;
            }
        };
        flags = (flags - clear) | set;
    }
    // The required options last, so that no earlier one overrides them
    // (ext4 takes the last errors=); an extra errors=panic stays last.
    let panic = data.iter().any(|o| o == "errors=panic");
    data.retain(|o| !o.starts_with("errors="));
    data.extend(api::REQUIRED_MOUNT_OPTIONS.iter().map(|s| s.to_string()));
    if panic {
        data.push("errors=panic".into());
    }
    Ok(MountSpec {
        flags,
        data: data.join(","),
    })
}

/// One `fsconfig` call on the filesystem context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsParam {
    /// `FSCONFIG_SET_FLAG key`.
    Flag(String),
    /// `FSCONFIG_SET_STRING key=value`.
    String(String, String),
}

impl fmt::Display for FsParam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsParam::Flag(k) => write!(f, "{k}"),
            FsParam::String(k, v) => write!(f, "{k}={v}"),
        }
    }
}

/// What [`mount_into`] does with a [`MountSpec`]: the `fsconfig` parameters
/// (superblock flags and ext4's options) and the `fsmount` attributes
/// (per-mount VFS flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsPlan {
    /// In order, after `source`.
    pub params: Vec<FsParam>,
    /// `MOUNT_ATTR_*` for `fsmount`.
    pub attrs: u64,
}

/// Translates mount(2)'s arguments into the new mount API's.
pub fn fs_plan(spec: &MountSpec) -> FsPlan {
    let f = spec.flags;
    let mut params = Vec::new();
    // Superblock flags: fsconfig flags the VFS itself parses.
    for (flag, name) in [
        (MsFlags::MS_RDONLY, "ro"),
        (MsFlags::MS_SYNCHRONOUS, "sync"),
        (MsFlags::MS_DIRSYNC, "dirsync"),
        (MsFlags::MS_LAZYTIME, "lazytime"),
    ] {
        if f.contains(flag) {
            params.push(FsParam::Flag(name.into()));
        }
    }
    // MS_SILENT only quiets mount(2)'s log; the new API has no such flag.
    for opt in spec
        .data
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
    {
        params.push(match opt.split_once('=') {
            Some((k, v)) => FsParam::String(k.into(), v.into()),
            None => FsParam::Flag(opt.into()),
        });
    }
    let mut attrs = 0;
    for (flag, attr) in [
        (MsFlags::MS_RDONLY, MOUNT_ATTR_RDONLY),
        (MsFlags::MS_NOSUID, MOUNT_ATTR_NOSUID),
        (MsFlags::MS_NODEV, MOUNT_ATTR_NODEV),
        (MsFlags::MS_NOEXEC, MOUNT_ATTR_NOEXEC),
        (MsFlags::MS_NODIRATIME, MOUNT_ATTR_NODIRATIME),
    ] {
        if f.contains(flag) {
            attrs |= attr;
        }
    }
    // One atime mode: noatime over strictatime over relatime (the default).
    attrs |= if f.contains(MsFlags::MS_NOATIME) {
        MOUNT_ATTR_NOATIME
    } else if f.contains(MsFlags::MS_STRICTATIME) {
        MOUNT_ATTR_STRICTATIME
    } else {
        MOUNT_ATTR_RELATIME
    };
    FsPlan { params, attrs }
}

/// A pidfd of the process at the other end of a Unix stream socket: the
/// process that connected (`SO_PEERPIDFD`, Linux 6.5). On an older kernel
/// (`ENOPROTOOPT`) it falls back to `SO_PEERCRED`'s pid and `pidfd_open`,
/// which has a race: if the peer exited and its pid was reused between
/// `connect` and `pidfd_open`, the pidfd names the new process. (The peer
/// would have had to exit while its request is being served, and the pid be
/// reused within that moment.)
pub fn peer_pidfd(stream: &impl AsFd) -> io::Result<OwnedFd> {
    let fd = stream.as_fd().as_raw_fd();
    let mut pidfd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is a valid socket borrowed for the call; the kernel
    // writes at most `len` bytes into `pidfd`, a c_int of that size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut pidfd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 {
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(pidfd) });
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOPROTOOPT) {
        return Err(err);
    }
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: as above, into a ucred of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if cred.pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the peer's pid is not visible in this PID namespace",
        ));
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, cred.pid, 0 as libc::c_uint) };
    own(r)
}

/// The step of [`mount_into`] that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `fsopen("ext4")`.
    Open,
    /// `fsconfig source=DEVICE`.
    Source,
    /// `fsconfig` of one option.
    Option(String),
    /// `FSCONFIG_CMD_CREATE`: reading the superblock (and waiting out MMP).
    Create,
    /// `fsmount`.
    Mount,
    /// Starting the thread that enters the caller's namespace.
    Thread,
    /// `unshare(CLONE_FS)` and `setns(pidfd, CLONE_NEWNS)`.
    EnterNamespace,
    /// Opening the target in the caller's namespace.
    Target,
    /// `move_mount` onto the target.
    Move,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Open => write!(f, "fsopen(ext4)"),
            Step::Source => write!(f, "fsconfig source"),
            Step::Option(o) => write!(f, "fsconfig {o}"),
            Step::Create => write!(f, "creating the ext4 superblock (fsconfig CMD_CREATE)"),
            Step::Mount => write!(f, "fsmount"),
            Step::Thread => write!(f, "starting the namespace thread"),
            Step::EnterNamespace => write!(f, "entering the caller's mount namespace (setns)"),
            Step::Target => write!(f, "opening the target in the caller's mount namespace"),
            Step::Move => write!(f, "move_mount onto the target"),
        }
    }
}

/// Why [`mount_into`] failed: the step, the error, a hint, and what the
/// kernel logged on the filesystem context.
#[derive(Debug, thiserror::Error)]
#[error("mounting {} on {} in the caller's namespace: {step}: {source}{}{}",
    device.display(), target.display(), hint(step, source), kernel_log(log))]
pub struct NsMountError {
    /// The device (in the daemon's namespace).
    pub device: std::path::PathBuf,
    /// The target (in the caller's namespace).
    pub target: std::path::PathBuf,
    /// The step that failed.
    pub step: Step,
    /// Its error.
    pub source: io::Error,
    /// Messages the kernel left on the filesystem context.
    pub log: Vec<String>,
}

fn hint(step: &Step, e: &io::Error) -> &'static str {
    match (step, e.raw_os_error().unwrap_or(0)) {
        (_, libc::EPERM) => " (needs CAP_SYS_ADMIN: the daemon must run privileged)",
        (Step::Target, libc::ENOENT) => {
            " (the target does not exist in the caller's mount namespace: create it first)"
        }
        (Step::Target, libc::ELOOP) => " (the target's path has a symlink: pass the resolved path)",
        (Step::Target, libc::ENOTDIR) => " (the target is not a directory)",
        (Step::Source, libc::ENOENT) | (Step::Create, libc::ENOENT | libc::ENXIO) => {
            " (the device is missing on this node)"
        }
        (_, libc::EBUSY) => {
            " (the device is mounted elsewhere, or ext4's MMP says another node uses it)"
        }
        (Step::Create | Step::Option(_), libc::EINVAL) => {
            " (not an ext4 filesystem, or an option ext4 does not know)"
        }
        (Step::EnterNamespace, libc::ESRCH) => " (the caller has exited)",
        _ => "",
    }
}

fn kernel_log(log: &[String]) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!("; the kernel says: {}", log.join("; "))
    }
}

/// Mounts `device` (a path in this process's namespace) as ext4 with `spec`
/// on `target` (an absolute path in the mount namespace of the process
/// `pidfd` refers to). Blocking: the superblock read (and an MMP wait) can
/// take seconds; run it on a blocking thread.
pub fn mount_into(
    pidfd: &OwnedFd,
    device: &Path,
    target: &Path,
    spec: &MountSpec,
) -> Result<(), NsMountError> {
    let fail = |step: Step, source: io::Error, log: Vec<String>| NsMountError {
        device: device.to_path_buf(),
        target: target.to_path_buf(),
        step,
        source,
        log,
    };
    let plan = fs_plan(spec);
    let fs = fsopen(FS_TYPE).map_err(|e| fail(Step::Open, e, Vec::new()))?;
    fsconfig_string(&fs, "source", device.as_os_str())
        .map_err(|e| fail(Step::Source, e, drain_log(&fs)))?;
    for p in &plan.params {
        let r = match p {
            FsParam::Flag(k) => fsconfig(&fs, FSCONFIG_SET_FLAG, k, None),
            FsParam::String(k, v) => fsconfig_string(&fs, k, OsStr::new(v)),
        };
        r.map_err(|e| fail(Step::Option(p.to_string()), e, drain_log(&fs)))?;
    }
    fsconfig(&fs, FSCONFIG_CMD_CREATE, "", None)
        .map_err(|e| fail(Step::Create, e, drain_log(&fs)))?;
    let mnt = fsmount(&fs, plan.attrs).map_err(|e| fail(Step::Mount, e, drain_log(&fs)))?;
    drop(fs);
    let entered = std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("nsmount".into())
            .spawn_scoped(s, || -> Result<(), (Step, io::Error)> {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
                    .and_then(|()| nix::sched::setns(pidfd, nix::sched::CloneFlags::CLONE_NEWNS))
                    .map_err(|e| (Step::EnterNamespace, io::Error::from(e)))?;
                let dir = open_target(target).map_err(|e| (Step::Target, e))?;
                move_mount(&mnt, &dir).map_err(|e| (Step::Move, e))
            })
            .map_err(|e| (Step::Thread, e))?;
        worker.join().unwrap_or_else(|_| {
            Err((
                Step::Thread,
                io::Error::other("the namespace thread panicked"),
            ))
        })
    });
    entered.map_err(|(step, e)| fail(step, e, Vec::new()))
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn own(r: libc::c_long) -> io::Result<OwnedFd> {
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(r).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(r: libc::c_long) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn fsopen(fs_type: &str) -> io::Result<OwnedFd> {
    let name = cstring(OsStr::new(fs_type))?;
    // SAFETY: `name` is a NUL-terminated string alive for the call.
    own(unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC) })
}

fn fsconfig(fs: &OwnedFd, cmd: libc::c_uint, key: &str, value: Option<&OsStr>) -> io::Result<()> {
    let key = (!key.is_empty())
        .then(|| cstring(OsStr::new(key)))
        .transpose()?;
    let value = value.map(cstring).transpose()?;
    let key_ptr = key.as_ref().map_or(std::ptr::null(), |k| k.as_ptr());
    let value_ptr = value.as_ref().map_or(std::ptr::null(), |v| v.as_ptr());
    // SAFETY: `fs` is an fs context descriptor; key and value are NUL-terminated
    // strings (or null where the command takes none) alive for the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            cmd,
            key_ptr,
            value_ptr,
            0 as libc::c_int,
        )
    })
}

fn fsconfig_string(fs: &OwnedFd, key: &str, value: &OsStr) -> io::Result<()> {
    fsconfig(fs, FSCONFIG_SET_STRING, key, Some(value))
}

fn fsmount(fs: &OwnedFd, attrs: u64) -> io::Result<OwnedFd> {
    let attrs = libc::c_uint::try_from(attrs).map_err(|_| io::Error::other("attrs"))?;
    // SAFETY: `fs` is an fs context descriptor; the other arguments are integers.
    own(unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) })
}

/// Opens `target` (absolute, a directory) in this thread's mount namespace
/// without following a symlink anywhere in the path.
fn open_target(target: &Path) -> io::Result<OwnedFd> {
    let path = cstring(target.as_os_str())?;
    // SAFETY: open_how is a plain C struct for which all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `path` is NUL-terminated and `how` a valid open_how of the size
    // passed, both alive for the call.
    own(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    })
}

fn move_mount(mnt: &OwnedFd, dir: &OwnedFd) -> io::Result<()> {
    let empty = c"";
    // SAFETY: both descriptors are open; the paths are empty NUL-terminated
    // strings, as MOVE_MOUNT_{F,T}_EMPTY_PATH ask.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            empty.as_ptr(),
            dir.as_raw_fd(),
            empty.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    })
}

/// The messages the kernel logged on an fs context (each `read` returns one;
/// `ENODATA` when there are no more).
fn drain_log(fs: &OwnedFd) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    for _ in 0..16 {
        // SAFETY: reads at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(fs.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(n) = usize::try_from(n) else { break };
        if n == 0 {
            break;
        }
        out.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn vfs_flags_are_flags_and_the_rest_goes_to_ext4() {
        let spec = mount_spec(
            &s(&["errors=remount-ro", "noatime"]),
            &s(&["nodev", "data=ordered", "sync"]),
        )
        .unwrap();
        assert_eq!(
            spec.flags,
            MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_SYNCHRONOUS
        );
        assert_eq!(spec.data, "data=ordered,errors=remount-ro");
    }

    #[test]
    fn errors_remount_ro_is_never_dropped_or_weakened() {
        // Missing from the grant: added.
        assert_eq!(mount_spec(&[], &[]).unwrap().data, "errors=remount-ro");
        // Weakened by an extra option: refused.
        let err = mount_spec(&s(&["errors=remount-ro"]), &s(&["errors=continue"])).unwrap_err();
        assert!(err.to_string().contains("errors=continue"), "{err}");
        // Stricter: kept last, so ext4 uses it.
        let spec = mount_spec(&s(&["errors=remount-ro"]), &s(&["errors=panic"])).unwrap();
        assert_eq!(spec.data, "errors=remount-ro,errors=panic");
        assert!(mount_spec(&[], &s(&["bind"])).is_err());
    }

    fn str_param(k: &str, v: &str) -> FsParam {
        FsParam::String(k.into(), v.into())
    }

    #[test]
    fn ext4_options_become_fsconfig_strings_and_flags() {
        let spec = mount_spec(&s(&["errors=remount-ro"]), &s(&["data=ordered", "noload"])).unwrap();
        let plan = fs_plan(&spec);
        assert_eq!(
            plan.params,
            vec![
                str_param("data", "ordered"),
                FsParam::Flag("noload".into()),
                str_param("errors", "remount-ro"),
            ]
        );
        assert_eq!(plan.attrs, MOUNT_ATTR_RELATIME);
    }

    #[test]
    fn superblock_flags_are_fsconfig_flags_and_vfs_flags_mount_attributes() {
        let spec = mount_spec(
            &[],
            &s(&[
                "ro",
                "sync",
                "dirsync",
                "lazytime",
                "nosuid",
                "nodev",
                "noexec",
                "nodiratime",
                "silent",
            ]),
        )
        .unwrap();
        let plan = fs_plan(&spec);
        let flags: Vec<String> = plan
            .params
            .iter()
            .filter_map(|p| match p {
                FsParam::Flag(k) => Some(k.clone()),
                FsParam::String(..) => None,
            })
            .collect();
        assert_eq!(flags, s(&["ro", "sync", "dirsync", "lazytime"]));
        assert_eq!(
            plan.attrs,
            MOUNT_ATTR_RDONLY
                | MOUNT_ATTR_NOSUID
                | MOUNT_ATTR_NODEV
                | MOUNT_ATTR_NOEXEC
                | MOUNT_ATTR_NODIRATIME
        );
    }

    #[test]
    fn exactly_one_atime_mode_reaches_fsmount() {
        let atime = |opts: &[&str]| fs_plan(&mount_spec(&[], &s(opts)).unwrap()).attrs;
        assert_eq!(atime(&["noatime"]) & MOUNT_ATTR__ATIME, MOUNT_ATTR_NOATIME);
        assert_eq!(
            atime(&["strictatime"]) & MOUNT_ATTR__ATIME,
            MOUNT_ATTR_STRICTATIME
        );
        assert_eq!(
            atime(&["noatime", "relatime"]) & MOUNT_ATTR__ATIME,
            MOUNT_ATTR_RELATIME
        );
        assert_eq!(
            atime(&["strictatime", "noatime"]) & MOUNT_ATTR__ATIME,
            MOUNT_ATTR_NOATIME
        );
    }

    #[test]
    fn errors_name_the_step_and_give_a_hint() {
        let e = NsMountError {
            device: "/dev/loop7".into(),
            target: "/data".into(),
            step: Step::Target,
            source: io::Error::from_raw_os_error(libc::ENOENT),
            log: Vec::new(),
        };
        let text = e.to_string();
        assert!(
            text.contains("does not exist in the caller's mount namespace"),
            "{text}"
        );
        let e = NsMountError {
            step: Step::Create,
            source: io::Error::from_raw_os_error(libc::EBUSY),
            log: vec!["e ext4: MMP in use".into()],
            ..e
        };
        let text = e.to_string();
        assert!(
            text.contains("mounted elsewhere") && text.contains("MMP in use"),
            "{text}"
        );
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let pidfd = peer_pidfd(&a).expect("a pidfd of ourselves");
        let fdinfo =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).unwrap();
        let pid = std::process::id().to_string();
        assert!(
            fdinfo
                .lines()
                .any(|l| l.starts_with("Pid:") && l.split_whitespace().nth(1) == Some(&pid)),
            "{fdinfo}"
        );
    }
}
