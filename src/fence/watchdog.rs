//! The watchdog: fed while this node may keep running, starved for good once
//! a fence did not complete in time, so the machine is reset.
//!
//! The Linux watchdog API (`/dev/watchdog`, Documentation/watchdog/watchdog-api)
//! is a file: every `write` of any bytes feeds (pings) it; closing the file
//! stops the watchdog only if the last write contained the *magic close*
//! character `V` (and the driver is not built `nowayout`); any other close
//! leaves it running, and the machine is reset when the timeout passes.
//! [`FileWatchdog`] does exactly these writes, so the same type drives the real
//! device, and a test can point it at a plain file and count the bytes.
//!
//! Starving is one-way: after [`Watchdog::starve`], `feed` refuses, and the
//! file is closed *without* the magic character, so the reset cannot be
//! undone by dropping the handle. Only [`FileWatchdog::disarm`] (a clean
//! daemon shutdown, not fenced) writes `V`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Something that resets this node unless it is fed.
pub trait Watchdog: Send {
    /// Feeds it once. Fails after [`Watchdog::starve`].
    fn feed(&mut self) -> io::Result<()>;
    /// Stops feeding, for good: the node will be reset.
    fn starve(&mut self);
    /// Whether [`Watchdog::starve`] was called.
    fn is_starved(&self) -> bool;
}

/// The byte written per feed (anything but `V`).
pub const FEED_BYTE: u8 = b'.';
/// The magic close character.
pub const MAGIC_CLOSE: u8 = b'V';

/// `/dev/watchdog`, or a plain file standing in for it in tests.
#[derive(Debug)]
pub struct FileWatchdog {
    path: PathBuf,
    file: Option<File>,
    starved: bool,
}

impl FileWatchdog {
    /// Opens `path` for writing (appending, for a plain file). Opening
    /// `/dev/watchdog` starts the hardware watchdog.
    pub fn open(path: impl AsRef<Path>) -> io::Result<FileWatchdog> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok(FileWatchdog {
            path,
            file: Some(file),
            starved: false,
        })
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Magic close: writes `V` and closes, which stops the watchdog. Only for a
    /// clean shutdown of a node that is not being fenced; refused once starved.
    pub fn disarm(mut self) -> io::Result<()> {
        if self.starved {
            return Err(io::Error::other(
                "the watchdog was starved; it cannot be disarmed",
            ));
        }
        let mut file = self.file.take().expect("open until disarm or drop");
        file.write_all(&[MAGIC_CLOSE])
    }
}

impl Watchdog for FileWatchdog {
    fn feed(&mut self) -> io::Result<()> {
        if self.starved {
            return Err(io::Error::other(
                "the watchdog was starved; it is not fed again",
            ));
        }
        let file = self.file.as_mut().expect("open until disarm or drop");
        file.write_all(&[FEED_BYTE])
    }

    fn starve(&mut self) {
        self.starved = true;
    }

    fn is_starved(&self) -> bool {
        self.starved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feeds_write_one_byte_each_and_stop_when_starved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("watchdog");
        File::create(&path).unwrap();
        let mut w = FileWatchdog::open(&path).unwrap();
        w.feed().unwrap();
        w.feed().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"..");
        w.starve();
        assert!(w.is_starved());
        assert!(w.feed().is_err());
        assert!(w.disarm().is_err(), "no magic close after a starve");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"..",
            "nothing written after starve"
        );
    }

    #[test]
    fn disarm_writes_the_magic_character() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("watchdog");
        File::create(&path).unwrap();
        let mut w = FileWatchdog::open(&path).unwrap();
        w.feed().unwrap();
        w.disarm().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b".V");
    }
}
