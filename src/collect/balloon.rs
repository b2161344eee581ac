//! The virtio balloon: how much memory the host has taken back, and whether
//! the kernel still counts it in MemTotal (docs/design.md#memory-under-a-balloon).
//!
//! Linux accounts a balloon two ways. Without `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`
//! the balloon's pages leave MemTotal; with it (Firecracker's
//! `deflate_on_oom: true`) MemTotal keeps them and they vanish from
//! MemFree and MemAvailable, so total − available would count the host's
//! reclaim as the guest's own use. The size comes from `Balloon:` in
//! `meminfo` (Linux 6.15+), else from `vmstat` (`nr_balloon_pages`, or
//! `balloon_inflate` − `balloon_deflate` on older kernels with
//! `CONFIG_MEMORY_BALLOON`), else it is unknown. The mode is feature bit 2
//! of the balloon device (virtio device id 5) under the sys root.
//!
//! procfs parses `vmstat` into a map of every counter (over 150, a string
//! each, per read) where three are wanted, and its `Meminfo` leaves
//! `Balloon:` out, so these lines are picked out of the kept-open files'
//! bytes instead: nothing is allocated per sample.

use std::path::{Path, PathBuf};

use procfs::ProcError;

use super::proc_file::ProcFile;
use crate::error::{Error, Result};

/// The virtio device id of a memory balloon (virtio spec 5.5).
const BALLOON_DEVICE_ID: &str = "0x0005";
/// `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
const DEFLATE_ON_OOM_BIT: usize = 2;
/// Where virtio devices are listed, under the sys root.
const VIRTIO_DEVICES: &str = "bus/virtio/devices";

/// The balloon's pages according to `vmstat`: `nr_balloon_pages` where the
/// kernel has it, else `balloon_inflate` − `balloon_deflate`; `None` on a
/// kernel without balloon accounting (neither line).
pub fn vmstat_pages(text: &[u8]) -> std::result::Result<Option<u64>, ProcError> {
    let (mut pages, mut inflate, mut deflate) = (None, None, None);
    for line in text.split(|&b| b == b'\n') {
        let slot = if line.starts_with(b"nr_balloon_pages ") {
            &mut pages
        } else if line.starts_with(b"balloon_inflate ") {
            &mut inflate
        } else if line.starts_with(b"balloon_deflate ") {
            &mut deflate
        } else {
            continue;
        };
        let mut fields = line
            .split(|b| b.is_ascii_whitespace())
            .filter(|f| !f.is_empty());
        let key = fields.next().unwrap_or_default();
        let value = fields
            .next()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok());
        match (value, fields.next()) {
            (Some(v), None) => *slot = Some(v),
            _ => {
                return Err(ProcError::Other(format!(
                    "{:?} is not `{} COUNT`",
                    String::from_utf8_lossy(line),
                    String::from_utf8_lossy(key)
                )));
            }
        }
    }
    Ok(pages.or(match (inflate, deflate) {
        (Some(i), Some(d)) => Some(i.saturating_sub(d)),
        _ => None,
    }))
}

/// Whether a virtio device's `features` file (one `0` or `1` per feature
/// bit, bit 0 first) has deflate-on-OOM.
pub fn deflate_on_oom(features: &[u8]) -> std::result::Result<bool, ProcError> {
    let bits = features.trim_ascii_end();
    if bits.is_empty() || !bits.iter().all(|b| matches!(b, b'0' | b'1')) {
        return Err(ProcError::Other(format!(
            "{:?} is not a string of feature bits",
            String::from_utf8_lossy(features)
        )));
    }
    Ok(bits.get(DEFLATE_ON_OOM_BIT) == Some(&b'1'))
}

/// Reads the balloon each sample: `vmstat` (unless `meminfo` had it) and,
/// while the balloon holds memory, its device's features, both kept open.
#[derive(Debug)]
pub struct BalloonReader {
    vmstat: ProcFile,
    sys_root: PathBuf,
    /// The balloon device's `features`, once found.
    features: Option<ProcFile>,
    /// The balloon size at the last search that found no device: searched
    /// again only when the size moves, not every sample.
    searched_at_kb: Option<u64>,
    /// KiB per page.
    page_kb: u64,
}

impl BalloonReader {
    /// A reader of `proc_root/vmstat` and of the devices under `sys_root`.
    pub fn new(proc_root: &Path, sys_root: &Path) -> BalloonReader {
        BalloonReader {
            vmstat: ProcFile::new(proc_root, "vmstat"),
            sys_root: sys_root.to_path_buf(),
            features: None,
            searched_at_kb: None,
            page_kb: (rustix::param::page_size() / 1024) as u64,
        }
    }

    /// The balloon's size: `meminfo_kb` (meminfo's `Balloon:`) when the
    /// kernel printed it, else from `vmstat`. A `vmstat` that cannot be read
    /// is an error; one without balloon lines is a kernel without them.
    pub fn size_kb(&mut self, meminfo_kb: Option<u64>) -> Result<Option<u64>> {
        if meminfo_kb.is_some() {
            return Ok(meminfo_kb);
        }
        match self.vmstat.parse(vmstat_pages) {
            Ok(pages) => Ok(pages.map(|p| p.saturating_mul(self.page_kb))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether MemTotal counts a balloon of `kb`: read from the device's
    /// features only while the balloon holds memory. An error when the
    /// balloon holds memory but no balloon device can be read.
    pub fn in_mem_total(&mut self, kb: u64) -> Result<bool> {
        if kb == 0 {
            return Ok(false);
        }
        if self.features.is_none() && self.searched_at_kb != Some(kb) {
            self.features = self
                .find_device()
                .map(|dir| ProcFile::new(&dir, "features"));
            if self.features.is_none() {
                self.searched_at_kb = Some(kb);
            }
        }
        let Some(features) = self.features.as_mut() else {
            return Err(Error::Parse {
                path: self.sys_root.join(VIRTIO_DEVICES),
                reason: format!(
                    "a balloon of {kb} KiB but no virtio balloon device (id {BALLOON_DEVICE_ID}) \
                     here: memory_total_kb is MemTotal as the kernel counts it"
                ),
            });
        };
        match features.parse(deflate_on_oom) {
            Ok(on) => Ok(on),
            Err(e) => {
                // The device may have gone with its driver: look again.
                self.features = None;
                self.searched_at_kb = None;
                Err(e)
            }
        }
    }

    /// The directory of the first virtio device whose id is a balloon's,
    /// in name order. (Listed with `getdents64`, as the process count is:
    /// std's `read_dir` would add its own code to the binary for this one
    /// rare call.)
    fn find_device(&self) -> Option<PathBuf> {
        use rustix::fs::{Mode, OFlags, RawDir};
        let dir = self.sys_root.join(VIRTIO_DEVICES);
        let fd = rustix::fs::open(
            &dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let mut buf = Vec::with_capacity(4096);
        let mut entries = RawDir::new(&fd, buf.spare_capacity_mut());
        let mut found: Option<PathBuf> = None;
        while let Some(Ok(entry)) = entries.next() {
            let Ok(name) = entry.file_name().to_str() else {
                continue;
            };
            let path = dir.join(name);
            let is_balloon = name.starts_with("virtio")
                && std::fs::read(path.join("device"))
                    .is_ok_and(|id| id.trim_ascii() == BALLOON_DEVICE_ID.as_bytes());
            // A guest has one balloon; were there two, the choice stays stable.
            if is_balloon && found.as_ref().is_none_or(|f| path < *f) {
                found = Some(path);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmstat_counters_give_the_balloon() {
        let text = b"nr_free_pages 100\nballoon_inflate 32768\nballoon_deflate 8192\nswap_ra 0\n";
        assert_eq!(vmstat_pages(text).unwrap(), Some(24576));
        // Linux 6.15+: the gauge wins over the two event counters.
        let text = b"nr_balloon_pages 5\nballoon_inflate 32768\nballoon_deflate 0\n";
        assert_eq!(vmstat_pages(text).unwrap(), Some(5));
        // A kernel without CONFIG_MEMORY_BALLOON: unknown, not 0.
        assert_eq!(vmstat_pages(b"nr_free_pages 100\n").unwrap(), None);
        assert_eq!(vmstat_pages(b"balloon_inflate 3\n").unwrap(), None);
        // More deflated than inflated cannot be; it never goes below 0.
        assert_eq!(
            vmstat_pages(b"balloon_inflate 1\nballoon_deflate 2\n").unwrap(),
            Some(0)
        );
    }

    #[test]
    fn a_malformed_balloon_line_is_an_error_naming_it() {
        for bad in [
            &b"balloon_inflate x\nballoon_deflate 0\n"[..],
            b"balloon_inflate 1 2\nballoon_deflate 0\n",
            b"balloon_deflate -1\n",
            b"nr_balloon_pages 18446744073709551616\n",
        ] {
            let e = vmstat_pages(bad).unwrap_err().to_string();
            assert!(e.contains("balloon"), "{e}");
        }
        // Other lines are not ours to judge.
        assert_eq!(
            vmstat_pages(b"nr_x y z\nballoon_inflate 1\nballoon_deflate 0\n").unwrap(),
            Some(1)
        );
    }

    #[test]
    fn feature_bit_two_is_deflate_on_oom() {
        // As QEMU's balloon negotiated them (bits 1, 28, 29; then with 2).
        let off = b"0100000000000000000000000000110000000000000000000000000000000000\n";
        let on = b"0110000000000000000000000000110000000000000000000000000000000000\n";
        assert!(!deflate_on_oom(off).unwrap());
        assert!(deflate_on_oom(on).unwrap());
        assert!(!deflate_on_oom(b"01\n").unwrap());
        for bad in [&b""[..], b"\n", b"01x1\n", b"0x0005\n"] {
            assert!(deflate_on_oom(bad).is_err(), "{bad:?}");
        }
    }
}
