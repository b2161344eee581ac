//! The number of processes: numeric entries of the proc root.
//!
//! Listing `/proc` is the costliest read of a sample after the files
//! themselves (the kernel looks up every process to list it). The directory
//! is kept open and rewound, and read with `getdents64` into a reused buffer,
//! so a count costs no `open`/`close` and no allocation per entry.

use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, RawDir, SeekFrom};

/// Bytes of directory entries read per `getdents64` call: about 300 entries
/// of `/proc`, far more than the longest single entry needs.
const DIRENT_BUFFER: usize = 8192;

/// Counts the processes under a proc root, keeping the directory open.
#[derive(Debug)]
pub struct ProcessCounter {
    root: PathBuf,
    dir: Option<OwnedFd>,
    buf: Vec<u8>,
}

impl ProcessCounter {
    /// A counter over `root`; nothing is opened until the first count.
    pub fn new(root: &Path) -> Self {
        ProcessCounter {
            root: root.to_path_buf(),
            dir: None,
            buf: Vec::with_capacity(DIRENT_BUFFER),
        }
    }

    /// The entries of the root whose names are all digits (one per process).
    /// An error drops the descriptor, so the next count opens it afresh.
    pub fn count(&mut self) -> std::io::Result<u64> {
        let r = self.count_once();
        if r.is_err() {
            self.dir = None;
        }
        r
    }

    fn count_once(&mut self) -> std::io::Result<u64> {
        let dir = match self.dir.take() {
            Some(d) => {
                rustix::fs::seek(&d, SeekFrom::Start(0))?;
                d
            }
            None => rustix::fs::open(
                &self.root,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?,
        };
        let dir = self.dir.insert(dir);
        let buf: &mut [MaybeUninit<u8>] = self.buf.spare_capacity_mut();
        let mut entries = RawDir::new(&*dir, buf);
        let mut n = 0;
        while let Some(entry) = entries.next() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if !name.is_empty() && name.iter().all(u8::is_ascii_digit) {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Counts the entries of `root` whose names are all digits, once.
pub fn count(root: &Path) -> std::io::Result<u64> {
    ProcessCounter::new(root).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_numeric_entries() {
        let dir = std::env::temp_dir().join(format!("ga-procs-{}", std::process::id()));
        for d in ["1", "42", "self", "net", "1x"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        assert_eq!(count(&dir).unwrap(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kept_open_counter_sees_entries_come_and_go() {
        let dir = std::env::temp_dir().join(format!("ga-procs-kept-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("1")).unwrap();
        let mut c = ProcessCounter::new(&dir);
        assert_eq!(c.count().unwrap(), 1);
        assert_eq!(c.count().unwrap(), 1);
        for d in ["2", "300", "self"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        assert_eq!(c.count().unwrap(), 3);
        std::fs::remove_dir(dir.join("1")).unwrap();
        assert_eq!(c.count().unwrap(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn counts_this_machine_as_read_dir_does() {
        let by_std = std::fs::read_dir("/proc")
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.as_encoded_bytes().iter().all(u8::is_ascii_digit)
            })
            .count() as i64;
        let mut c = ProcessCounter::new(Path::new("/proc"));
        let ours = c.count().unwrap() as i64;
        // Processes come and go between the two listings.
        assert!((ours - by_std).abs() < 20, "{ours} vs {by_std}");
    }

    #[test]
    fn missing_root_is_an_error_and_recovers() {
        let dir = std::env::temp_dir().join(format!("ga-procs-late-{}", std::process::id()));
        let mut c = ProcessCounter::new(&dir);
        assert!(c.count().is_err());
        std::fs::create_dir_all(dir.join("7")).unwrap();
        assert_eq!(c.count().unwrap(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
