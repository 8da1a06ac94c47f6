//! Finding and killing the processes that hold a filesystem, from /proc.
//!
//! A process *holds* the filesystem if any of its open files, its cwd, its root
//! or a file mapping is on it. The scan never calls into any filesystem (a
//! `stat` of a file on a stalled FUSE or NFS mount of some other process
//! would hang the kill step): it reads only /proc text and mount ids.
//! - The filesystem is its device number (`major:minor` in mountinfo, the
//!   `st_dev` of its files); its *mount ids* are those of every mount with
//!   that device, collected from the mountinfo of every mount namespace a
//!   process is in (containers see the volume through their own bind mounts).
//! - Open files: `mnt_id:` of `/proc/PID/fdinfo/N`.
//! - cwd and root: opened here with `O_PATH` through the `/proc/PID/cwd` magic
//!   link (no lookup, no open in the target filesystem), then `mnt_id:` of our
//!   own fdinfo.
//! - Mappings: the `dev` column of `/proc/PID/maps`.
//!
//! - A descriptor, cwd or root on a mount that is in no namespace's mountinfo
//!   (a lazily detached mount, or an internal one: pipes, sockets): its mount
//!   id is unknown, so it is opened with `O_PATH` through the magic link and
//!   `fstat`ed for its `st_dev`. This is the one place the scan may ask a
//!   filesystem (`getattr`); it is done only for unknown mount ids.
//!
//! Not a holder: a process with the block device itself open (raw I/O, not
//! through the filesystem). Killing by device number is unsafe once a device
//! can be detached and its number reused (a `losetup -f` of an unrelated user
//! opens the same number); NVMe reservations are what refuse a fenced node's
//! raw writes.
//!
//! Processes are found in every PID namespace (the scan reads the host's
//! /proc: the DaemonSet runs with `hostPID`), mounts in every mount namespace
//! that has a process.
//!
//! PID 1 and this process are never killed. Scanning and killing repeat until a
//! scan finds no holder (a process may fork or open a file between the scan and
//! the kill), at most [`MAX_ROUNDS`] times. Not covered: threads that left their
//! process's fs context (`unshare(CLONE_FS)`) with a cwd on the mount (the
//! device fence's final `O_EXCL` check catches what stays mounted). One call can
//! still reach a filesystem: the kernel weakly revalidates the target of a
//! followed magic link, which on NFS (not FUSE) may ask the server about a
//! process's cwd.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::FenceError;

/// Scan-and-kill rounds before giving up.
pub const MAX_ROUNDS: usize = 20;
/// How long one round waits for the processes it killed to exit.
pub const EXIT_WAIT: Duration = Duration::from_millis(200);

/// One mount, as /proc/self/mountinfo shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount id (`mnt_id:` in fdinfo).
    pub mount_id: u64,
    /// `st_dev` of files on the filesystem.
    pub dev: u64,
    /// The mount point, unescaped.
    pub mount_point: PathBuf,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).ok();
            if let Some(v) = digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses /proc/self/mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(' ');
            let mount_id = f.next()?.parse().ok()?;
            let _parent = f.next()?;
            let (major, minor) = f.next()?.split_once(':')?;
            let _root = f.next()?;
            let mount_point = PathBuf::from(unescape(f.next()?));
            let dev = nix::sys::stat::makedev(major.parse().ok()?, minor.parse().ok()?);
            Some(MountEntry {
                mount_id,
                dev,
                mount_point,
            })
        })
        .collect()
}

/// The topmost mount at `mount` in this process's namespace, if any.
pub fn find_mount(mount: &Path) -> Result<Option<MountEntry>, FenceError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| FenceError::Proc {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rfind(|m| m.mount_point == mount))
}

/// Whether one line of /proc/PID/maps maps a file of device `dev`.
fn maps_line_on(line: &str, dev: u64) -> bool {
    let mut f = line.split_ascii_whitespace();
    let (Some(_range), Some(_perms), Some(_offset), Some(d), Some(inode)) =
        (f.next(), f.next(), f.next(), f.next(), f.next())
    else {
        return false;
    };
    let Some((major, minor)) = d.split_once(':') else {
        return false;
    };
    let (Ok(major), Ok(minor)) = (
        u64::from_str_radix(major, 16),
        u64::from_str_radix(minor, 16),
    ) else {
        return false;
    };
    inode != "0" && nix::sys::stat::makedev(major, minor) == dev
}

/// The `mnt_id:` field of an fdinfo file.
fn fdinfo_mnt_id(path: &Path) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// An `O_PATH` descriptor on what the magic link `link` (`/proc/PID/cwd`,
/// `root`, `fd/N`) points to: no lookup or open in the target filesystem.
fn open_link(link: &Path) -> Option<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(link)
        .ok()
}

/// The mount id of what the magic link `link` points to, from our own fdinfo.
fn link_mnt_id(link: &Path) -> Option<u64> {
    let f = open_link(link)?;
    fdinfo_mnt_id(Path::new(&format!("/proc/self/fdinfo/{}", f.as_raw_fd())))
}

/// `st_dev` of what `link` points to.
fn link_dev(link: &Path) -> Option<u64> {
    let f = open_link(link)?;
    nix::sys::stat::fstat(f.as_raw_fd())
        .ok()
        .map(|st| st.st_dev)
}

/// What to look for: a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// `st_dev` of the filesystem's files (the device number of its device).
    pub dev: u64,
}

/// A mount of the target's filesystem in some mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsMount {
    /// A process in that namespace (to reach it: `/proc/PID/root`, `ns/mnt`).
    pub pid: i32,
    /// The namespace (`mnt:[inode]`).
    pub ns: PathBuf,
    /// Whether it is this process's own namespace.
    pub own: bool,
    pub entry: MountEntry,
}

impl NsMount {
    /// A path that reaches the mount from this process: the mount point in our
    /// own namespace, else through `/proc/PID/root`.
    pub fn reach(&self) -> PathBuf {
        if self.own {
            self.entry.mount_point.clone()
        } else {
            let rel = self
                .entry
                .mount_point
                .strip_prefix("/")
                .unwrap_or(&self.entry.mount_point);
            PathBuf::from(format!("/proc/{}/root", self.pid)).join(rel)
        }
    }
}

/// Every process and mount of the node, as far as the target is concerned.
#[derive(Debug, Default)]
pub struct View {
    /// Every pid but PID 1 and this process.
    pub pids: Vec<i32>,
    /// Mounts of the target's filesystem, one entry per namespace and mount.
    pub mounts: Vec<NsMount>,
    /// Mount ids of the target's filesystem, in every namespace.
    dev_ids: HashSet<u64>,
    /// Every mount id seen in any namespace.
    known_ids: HashSet<u64>,
}

impl View {
    /// Reads /proc: every process, and the mountinfo of every mount namespace
    /// that has one (this process's first).
    pub fn collect(target: Target) -> Result<View, FenceError> {
        let me = std::process::id() as i32;
        let proc_dir = Path::new("/proc");
        let entries = fs::read_dir(proc_dir).map_err(|source| FenceError::Proc {
            path: proc_dir.to_path_buf(),
            source,
        })?;
        let pids: Vec<i32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
            .filter(|&pid| pid > 1 && pid != me)
            .collect();
        let own_ns = fs::read_link("/proc/self/ns/mnt").map_err(|source| FenceError::Proc {
            path: PathBuf::from("/proc/self/ns/mnt"),
            source,
        })?;
        let mut v = View {
            pids: pids.clone(),
            ..View::default()
        };
        let mut seen_ns = HashSet::new();
        for pid in std::iter::once(me).chain(pids) {
            let Ok(ns) = fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
                continue;
            };
            if !seen_ns.insert(ns.clone()) {
                continue;
            }
            let Ok(text) = fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
                continue;
            };
            for e in parse_mountinfo(&text) {
                v.known_ids.insert(e.mount_id);
                if e.dev == target.dev {
                    v.dev_ids.insert(e.mount_id);
                    v.mounts.push(NsMount {
                        pid,
                        ns: ns.clone(),
                        own: ns == own_ns,
                        entry: e,
                    });
                }
            }
        }
        Ok(v)
    }

    /// Whether a descriptor (or cwd, root) with mount id `mnt_id`, reached
    /// through `link`, is on the target's filesystem.
    fn on_fs(&self, target: Target, mnt_id: u64, link: &Path) -> bool {
        if self.dev_ids.contains(&mnt_id) {
            return true;
        }
        // A detached or internal mount: ask what it is.
        !self.known_ids.contains(&mnt_id) && link_dev(link) == Some(target.dev)
    }

    /// Whether process `pid` holds the target.
    fn holds(&self, target: Target, pid: i32) -> bool {
        let base = PathBuf::from(format!("/proc/{pid}"));
        for link in ["cwd", "root"] {
            let link = base.join(link);
            if link_mnt_id(&link).is_some_and(|id| self.on_fs(target, id, &link)) {
                return true;
            }
        }
        if let Ok(fds) = fs::read_dir(base.join("fdinfo")) {
            for fd in fds.flatten() {
                let Some(mnt_id) = fdinfo_mnt_id(&fd.path()) else {
                    continue;
                };
                if self.on_fs(target, mnt_id, &base.join("fd").join(fd.file_name())) {
                    return true;
                }
            }
        }
        if let Ok(maps) = fs::read_to_string(base.join("maps")) {
            if maps.lines().any(|l| maps_line_on(l, target.dev)) {
                return true;
            }
        }
        false
    }

    /// Every process (but PID 1 and this one) that holds the target.
    pub fn holders(&self, target: Target) -> Vec<i32> {
        self.pids
            .iter()
            .copied()
            .filter(|&pid| self.holds(target, pid))
            .collect()
    }

    /// A path to some open file of the target's filesystem, through the holder's
    /// descriptor (`/proc/PID/fd/N`): the way to reach a filesystem that is
    /// mounted nowhere any more (lazily detached) but still held open.
    pub fn any_open_file(&self, target: Target) -> Option<PathBuf> {
        self.pids.iter().find_map(|pid| {
            let base = PathBuf::from(format!("/proc/{pid}"));
            fs::read_dir(base.join("fdinfo"))
                .ok()?
                .flatten()
                .find_map(|fd| {
                    let mnt_id = fdinfo_mnt_id(&fd.path())?;
                    let link = base.join("fd").join(fd.file_name());
                    self.on_fs(target, mnt_id, &link).then_some(link)
                })
        })
    }
}

/// Every process (but PID 1 and this one) that holds the filesystem of `m`.
pub fn scan(m: &MountEntry) -> Result<Vec<i32>, FenceError> {
    let target = Target { dev: m.dev };
    Ok(View::collect(target)?.holders(target))
}

/// Whether `pid` has exited (gone, or a zombie: its files are released).
fn exited(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .map_or(true, |s| s == 'Z' || s == 'X'),
    }
}

/// SIGKILLs every holder of `m` until a scan finds none; returns the pids
/// killed. Fails with the pids still holding after [`MAX_ROUNDS`].
pub fn kill_all(m: &MountEntry) -> Result<Vec<i32>, FenceError> {
    kill_all_of(Target { dev: m.dev })
}

/// SIGKILLs every holder of `target`, in every PID namespace, until a scan
/// finds none; returns the pids killed. Fails with the pids still holding
/// after [`MAX_ROUNDS`].
pub fn kill_all_of(target: Target) -> Result<Vec<i32>, FenceError> {
    let mut killed = BTreeSet::new();
    for _ in 0..MAX_ROUNDS {
        let holders = View::collect(target)?.holders(target);
        if holders.is_empty() {
            return Ok(killed.into_iter().collect());
        }
        for &pid in &holders {
            // ESRCH: it exited by itself, which is as good.
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                killed.insert(pid);
            }
        }
        // Wait for them to exit: there is no event for another process's exit
        // short of pidfds, so poll /proc, bounded by EXIT_WAIT.
        let until = Instant::now() + EXIT_WAIT;
        while holders.iter().any(|&p| !exited(p)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let left = View::collect(target)?.holders(target);
    if left.is_empty() {
        return Ok(killed.into_iter().collect());
    }
    Err(FenceError::StillHeld { pids: left })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/my\\040dir rw,noatime master:1 - ext4 /dev/root rw\n\
                    25 1 7:3 / / rw - ext4 /dev/loop3 rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_id, 36);
        assert_eq!(m[0].dev, nix::sys::stat::makedev(98, 0));
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/my dir"));
        assert_eq!(m[1].mount_point, PathBuf::from("/"));
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("trailing\\"), "trailing\\");
    }

    #[test]
    fn maps_lines_match_by_device_and_skip_anonymous() {
        let dev = nix::sys::stat::makedev(0x07, 0x03);
        assert!(maps_line_on(
            "7f00-7f01 rw-s 00000000 07:03 12 /mnt/x/file",
            dev
        ));
        assert!(!maps_line_on("7f00-7f01 rw-p 00000000 07:03 0 ", dev));
        assert!(!maps_line_on(
            "7f00-7f01 r--p 00000000 fe:01 99 /usr/lib/x.so",
            dev
        ));
        assert!(!maps_line_on("garbage", dev));
    }

    #[test]
    fn this_process_is_never_a_holder() {
        // Our own cwd is on the root filesystem; scanning for it must not list us.
        let root = find_mount(Path::new("/")).unwrap().expect("/ is mounted");
        let me = std::process::id() as i32;
        assert!(!scan(&root).unwrap().contains(&me));
        assert!(!scan(&root).unwrap().contains(&1));
    }
}
