//! `diskstats`: bytes read and written by whole disks.
//!
//! Partitions would count their disk's I/O twice, and loop, ram, zram,
//! device-mapper and md devices are layered on disks already counted (or on
//! memory), so only whole physical or virtual disks are summed. The rule is by
//! name, as node_exporter's, so that it works on any proc root.

use procfs::{DiskStats, FromBufRead, ProcError};

use crate::sample::detail::Disk;

/// The kernel's diskstats sectors are always 512 bytes, whatever the device.
const SECTOR_BYTES: u64 = 512;

/// What one read of `diskstats` gives.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskReading {
    /// Cumulative bytes read, summed over whole disks. Like the kernel's
    /// own counters they wrap at 2^64 rather than saturate, so that a
    /// consumer's difference of two readings (modulo 2^64) stays right.
    pub read_bytes: u64,
    /// Cumulative bytes written, the same way.
    pub written_bytes: u64,
    /// Each whole disk, in the order of the file.
    pub disks: Vec<Disk>,
}

/// Parses the text of `diskstats`, whole disks only.
pub fn parse(text: &[u8]) -> Result<DiskReading, ProcError> {
    let all = DiskStats::from_buf_read(text)?;
    let (mut read_bytes, mut written_bytes) = (0u64, 0u64);
    let mut disks: Vec<Disk> = all
        .0
        .into_iter()
        .filter(|d| is_whole_disk(&d.name))
        .map(|d| {
            let read = d.sectors_read.wrapping_mul(SECTOR_BYTES);
            let written = d.sectors_written.wrapping_mul(SECTOR_BYTES);
            read_bytes = read_bytes.wrapping_add(read);
            written_bytes = written_bytes.wrapping_add(written);
            Disk {
                name: d.name,
                reads: d.reads,
                read_bytes: read,
                read_ms: d.time_reading,
                writes: d.writes,
                written_bytes: written,
                write_ms: d.time_writing,
                in_progress: d.in_progress,
                io_ms: d.time_in_progress,
                since_ms: None,
            }
        })
        .collect();
    // The collect reuses procfs's vector, one slot per line of the file
    // (partitions, loop devices): 39 slots for 1 disk here. The disks are
    // kept with every buffered sample when the format needs them, so the
    // slack would be kept 1,000 times over.
    disks.shrink_to_fit();
    Ok(DiskReading {
        read_bytes,
        written_bytes,
        disks,
    })
}

/// True for a whole disk (`vda`, `sdb`, `nvme0n1`, `mmcblk0`, `xvda`), false
/// for partitions (`vda1`, `nvme0n1p2`, `mmcblk0p1`) and virtual devices.
pub fn is_whole_disk(name: &str) -> bool {
    const VIRTUAL: [&str; 9] = ["loop", "ram", "zram", "dm-", "md", "sr", "fd", "nbd", "zd"];
    if VIRTUAL.iter().any(|p| name.starts_with(p)) {
        return false;
    }
    let ends_in_digit = name.ends_with(|c: char| c.is_ascii_digit());
    if name.starts_with("nvme") || name.starts_with("mmcblk") {
        // nvme0n1 / mmcblk0 are disks; nvme0n1p1 / mmcblk0p1 are partitions.
        let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
        return !stem.ends_with('p') || stem == "nvme" || stem.ends_with("nvme");
    }
    // sda, vda, xvda, hda: letters only; a trailing number is a partition.
    !ends_in_digit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_no_slot_for_the_lines_it_drops() {
        let text = b"   7       0 loop0 1 0 2 0 0 0 0 0 0 0 0\n \
  253       0 vda 10 0 20 5 4 0 8 3 0 9 8\n \
  253       1 vda1 1 0 2 0 0 0 0 0 0 0 0\n \
  253       2 vda2 1 0 2 0 0 0 0 0 0 0 0\n";
        let r = parse(text).unwrap();
        assert_eq!(r.disks.len(), 1);
        assert_eq!(r.disks.capacity(), 1);
    }

    const SAMPLE: &str = "   7       0 loop0 100 0 800 0 0 0 0 0 0 0 0 0 0 0 0 0 0
 254       0 vda 1000 10 2000 500 300 20 4000 900 0 1200 1400 0 0 0 0 0 0
 254       1 vda1 900 10 1800 450 290 20 3900 880 0 1100 1330 0 0 0 0 0 0
 259       0 nvme0n1 10 0 100 0 10 0 50 0 0 0 0 0 0 0 0 0 0
 259       1 nvme0n1p1 10 0 100 0 10 0 50 0 0 0 0 0 0 0 0 0 0
 253       0 dm-0 10 0 100 0 10 0 50 0 0 0 0 0 0 0 0 0 0
";

    #[test]
    fn sums_whole_disks_only() {
        let r = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(r.read_bytes, (2000 + 100) * 512);
        assert_eq!(r.written_bytes, (4000 + 50) * 512);
        let names: Vec<&str> = r.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["vda", "nvme0n1"]);
        let vda = &r.disks[0];
        assert_eq!(
            (vda.reads, vda.read_ms, vda.writes, vda.write_ms, vda.io_ms),
            (1000, 500, 300, 900, 1200)
        );
    }

    #[test]
    fn whole_disk_names() {
        for d in [
            "vda", "vdb", "sda", "xvda", "hda", "nvme0n1", "nvme10n2", "mmcblk0",
        ] {
            assert!(is_whole_disk(d), "{d}");
        }
        for p in [
            "vda1",
            "sda12",
            "xvda1",
            "nvme0n1p1",
            "mmcblk0p2",
            "loop0",
            "ram1",
            "zram0",
            "dm-3",
            "md127",
            "sr0",
        ] {
            assert!(!is_whole_disk(p), "{p}");
        }
    }

    #[test]
    fn malformed_line_is_an_error() {
        let bad = SAMPLE.replace("vda 1000", "vda 1z00");
        assert!(parse(bad.as_bytes()).is_err());
    }
}
