//! Restore detection: a VM resumed from a snapshot must not go on speaking
//! with its parent's identity (docs/snapshots.md).
//!
//! Every VM resumed from one snapshot resumes this process mid-flight with
//! the same `run_id`, the next `seq` and the same `vm_id`: two clones would
//! push different samples under one (`run_id`, `seq`) key. The hypervisor's
//! VMGenID device is the signal: a guest kernel with `CONFIG_VMGENID` reseeds
//! its random pool when the generation id changes and logs
//! `random: crng reseeded due to virtual machine fork` (the `NEW_VMGENID`
//! uevent existed only in Linux 6.8). The [`Watcher`] reads the kernel log
//! from its end with non-blocking reads, once per sample, for that line; the
//! [`Restorer`] then starts a new run: a fresh `run_id` read after the
//! reseed, `seq` from 1, the restore marker in the sample, the identity read
//! again from MMDS, and a restore generation in the shared state that tells
//! the sender to drop its connections and look the route up again.
//!
//! Without a VMGenID signal nothing is detected and the clone keeps its
//! parent's run: see docs/snapshots.md for what the agent can and cannot
//! know then.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::collect::Collector;
use crate::config::{Config, Source, mmds};
use crate::status::Status;

/// What the kernel logs (since Linux 5.18) when VMGenID reports a new
/// generation: the VM was resumed from a snapshot as a new instance.
pub const VM_FORK_LINE: &str = "crng reseeded due to virtual machine fork";

/// Largest kernel log record read at once. `/dev/kmsg` returns one record
/// per read and refuses (EINVAL) a buffer too small for it; records are at
/// most about 1 KiB of text plus their dictionary.
const RECORD_BUFFER: usize = 8 * 1024;

/// Most records read per check: a flood of kernel messages must not turn a
/// check into a long loop. What is left is read at the next check.
const MAX_RECORDS_PER_CHECK: usize = 256;

/// Longest wait between collecting a sample and checking for a restore
/// before it is numbered: a sample collected just after a resume, before the
/// kernel has handled the VMGenID notification, would otherwise be numbered
/// in the parent's run (docs/snapshots.md#timing).
pub const MAX_SETTLE: Duration = Duration::from_millis(500);

/// How long a sample waits for a restore check after its collection: half
/// the interval, at most [`MAX_SETTLE`]. Measured under QEMU TCG, the kernel
/// logged the fork 0.1–0.2 s of guest time after the resume.
pub fn settle(interval: Duration) -> Duration {
    (interval / 2).min(MAX_SETTLE)
}

/// A signal that this VM is a new instance resumed from a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The kernel reseeded its random pool after a VMGenID change.
    VmFork,
}

/// Reads the kernel log from where it was when opened, without blocking.
#[derive(Debug)]
pub struct Watcher {
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
    broken: bool,
}

impl Watcher {
    /// Opens `path` (normally [`KMSG`]) non-blocking and moves to its end,
    /// so that only messages logged from now on are seen.
    pub fn open(path: &Path) -> std::io::Result<Watcher> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(path)?;
        // On /dev/kmsg SEEK_END moves past the last record (the kernel's
        // documented way to read only new messages); on a plain file, its end.
        file.seek(SeekFrom::End(0))?;
        Ok(Watcher {
            file,
            path: path.to_path_buf(),
            buf: vec![0; RECORD_BUFFER],
            broken: false,
        })
    }

    /// Reads what was logged since the last check; `Some` when a restore
    /// signal is among it. Never blocks: an empty log answers EAGAIN (a
    /// plain file, in tests, answers end of file).
    pub fn check(&mut self) -> Option<Signal> {
        let mut found = None;
        for _ in 0..MAX_RECORDS_PER_CHECK {
            match self.file.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => {
                    if contains(&self.buf[..n], VM_FORK_LINE.as_bytes()) {
                        found = Some(Signal::VmFork);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // The ring buffer overwrote records this reader had not read
                // yet: the next read returns the oldest one still there. A
                // lost record could be the signal itself; that cannot be
                // helped, but it is said.
                Err(e) if e.kind() == ErrorKind::BrokenPipe => {
                    log::debug!(
                        "{}: kernel log records were overwritten before they were read",
                        self.path.display()
                    );
                }
                Err(e) => {
                    if !self.broken {
                        log::warn!(
                            "{}: {e}; restores are not detected until it reads again",
                            self.path.display()
                        );
                        self.broken = true;
                    }
                    return found;
                }
            }
        }
        if self.broken {
            log::info!("{}: reading again", self.path.display());
            self.broken = false;
        }
        found
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Starts a new run on the collector when the watcher reports a restore.
#[derive(Debug)]
pub struct Restorer {
    watcher: Option<Watcher>,
    mmds: Option<SocketAddr>,
    /// Whether a `vm_id` from MMDS may replace the configured one: not when
    /// the CLI or the environment set it (they rank above MMDS).
    vm_id_from_mmds: bool,
}

impl Restorer {
    /// A restorer for `config`: watches its kernel log unless that is off or
    /// cannot be opened (logged; the agent goes on without detection).
    pub fn new(config: &Config) -> Restorer {
        let watcher = config.kmsg.as_deref().and_then(|path| {
            Watcher::open(path)
                .map_err(|e| {
                    log::warn!(
                        "{}: {e}; snapshot restores will not be detected (docs/snapshots.md)",
                        path.display()
                    )
                })
                .ok()
        });
        let vm_id_from_mmds = config
            .origins
            .iter()
            .find(|o| o.setting.name == "vm_id")
            .is_none_or(|o| !matches!(o.source, Source::Cli | Source::Env));
        Restorer {
            watcher,
            mmds: config.mmds,
            vm_id_from_mmds,
        }
    }

    /// Whether restores can be detected at all.
    pub fn is_watching(&self) -> bool {
        self.watcher.is_some()
    }

    /// Checks for a restore; on one, starts a new run on `collector` (new
    /// `run_id`, restore marker, identity from MMDS) and bumps the shared
    /// restore generation. True when a new run began: the caller numbers
    /// from 1 again.
    pub fn check(&mut self, collector: &mut Collector, status: &Status) -> bool {
        let Some(signal) = self.watcher.as_mut().and_then(Watcher::check) else {
            return false;
        };
        // The identity first: the MMDS request is bounded (config::mmds), and
        // a restore is rare, so this sample may be late but never mislabelled.
        let vm_id = match (self.mmds, self.vm_id_from_mmds) {
            (Some(addr), true) => match mmds::fetch(addr) {
                Ok(doc) => doc.vm_id(),
                Err(e) => {
                    log::warn!("after the restore: {e}; keeping vm_id");
                    None
                }
            },
            _ => None,
        };
        match collector.restart_run(vm_id) {
            Ok(previous) => {
                let generation = status.note_restore();
                log::warn!(
                    "restored from a snapshot ({signal:?}, restore {generation}): run {} replaces {previous}; seq starts again at 1",
                    collector.run_id()
                );
                true
            }
            Err(e) => {
                // Without a fresh run id the clone would collide with its
                // siblings either way; keep going and say so loudly.
                log::error!("restored from a snapshot, but {e}; keeping the parent's run");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn only_lines_logged_after_opening_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsg");
        std::fs::write(&path, format!("6,1,100,-;random: {VM_FORK_LINE}\n")).unwrap();
        let mut w = Watcher::open(&path).unwrap();
        assert_eq!(
            w.check(),
            None,
            "a reseed logged before the start is old news"
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        writeln!(f, "6,2,200,-;virtio_net virtio0 eth0: renamed").unwrap();
        assert_eq!(w.check(), None);
        writeln!(f, "5,3,300,-;random: {VM_FORK_LINE}").unwrap();
        assert_eq!(w.check(), Some(Signal::VmFork));
        assert_eq!(w.check(), None, "each line is reported once");
    }

    #[test]
    fn the_real_kernel_log_never_blocks() {
        // Reading /dev/kmsg needs privileges this test may not have; where
        // it opens, a check must come back at once with nothing new or with
        // whatever was just logged, never wait.
        let kmsg = crate::config::settings::DEFAULT_KMSG;
        let Ok(mut w) = Watcher::open(Path::new(kmsg)) else {
            return;
        };
        let _ = w.check();
        let _ = w.check();
    }

    #[test]
    fn settle_is_a_fraction_of_the_interval_and_bounded() {
        assert_eq!(
            settle(Duration::from_millis(200)),
            Duration::from_millis(100)
        );
        assert_eq!(settle(Duration::from_secs(5)), MAX_SETTLE);
    }
}
