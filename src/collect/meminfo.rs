//! `meminfo`: memory and swap, in KiB.

use procfs::{FromBufRead, Meminfo, ProcError};

use crate::sample::detail::Memory;

/// Memory figures of one read of `meminfo`, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemReading {
    /// MemTotal.
    pub total_kb: u64,
    /// MemAvailable, or MemFree + Buffers + Cached + SReclaimable on kernels
    /// before 3.14 that lack it.
    pub available_kb: u64,
    /// SwapTotal.
    pub swap_total_kb: u64,
    /// SwapTotal − SwapFree.
    pub swap_used_kb: u64,
    /// `Balloon:` (Linux 6.15+), the virtio balloon's size.
    pub balloon_kb: Option<u64>,
    /// The same and more, in bytes, as the exposition formats carry it.
    pub bytes: Memory,
}

/// The memory figures of a sample, the balloon taken out
/// (docs/design.md#memory-under-a-balloon), in KiB.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemFigures {
    /// What the guest can use now: MemTotal, less the balloon when MemTotal
    /// still counts it.
    pub total_kb: u64,
    /// MemAvailable, at most the total.
    pub available_kb: u64,
    /// total − available: the guest's own use.
    pub used_kb: u64,
    /// used / total × 100; 0 when the total is 0.
    pub usage_percent: f64,
}

impl MemReading {
    /// total − available, as `free` computes "used".
    pub fn used_kb(&self) -> u64 {
        self.figures(None, false).used_kb
    }

    /// used / total × 100; 0 when total is 0.
    pub fn usage_percent(&self) -> f64 {
        self.figures(None, false).usage_percent
    }

    /// The figures with a balloon of `balloon_kb` taken out: subtracted
    /// from MemTotal when `in_mem_total` (deflate-on-OOM: the kernel kept
    /// its pages in MemTotal, and they are not available), and already out
    /// of MemTotal otherwise. Either way the balloon is in neither the
    /// total nor the used figure.
    pub fn figures(&self, balloon_kb: Option<u64>, in_mem_total: bool) -> MemFigures {
        let total_kb = match balloon_kb {
            Some(b) if in_mem_total => self.total_kb.saturating_sub(b),
            _ => self.total_kb,
        };
        let available_kb = self.available_kb.min(total_kb);
        let used_kb = total_kb - available_kb;
        let usage_percent = if total_kb == 0 {
            0.0
        } else {
            used_kb as f64 * 100.0 / total_kb as f64
        };
        MemFigures {
            total_kb,
            available_kb,
            used_kb,
            usage_percent,
        }
    }
}

/// The value of `Balloon:`, KiB, which procfs's `Meminfo` leaves out. Read
/// after procfs took the file, so the line's number and unit are valid.
fn balloon_line(text: &[u8]) -> Option<u64> {
    let line = text
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"Balloon:"))?;
    let mut fields = std::str::from_utf8(line).ok()?.split_whitespace();
    let n: u64 = fields.next()?.parse().ok()?;
    // The kernel prints kB; the other units are read as procfs reads them.
    Some(match fields.next() {
        None | Some("B") => n / 1024,
        Some("MiB" | "miB" | "MB" | "mB") => n.saturating_mul(1024),
        Some("GiB" | "giB" | "GB" | "gB") => n.saturating_mul(1024 * 1024),
        Some(_) => n,
    })
}

/// Parses the text of `meminfo`.
pub fn parse(text: &[u8]) -> Result<MemReading, ProcError> {
    procfs_can_read(text)?;
    let m = Meminfo::from_buf_read(text)?;
    let available = m.mem_available.unwrap_or_else(|| {
        m.mem_free
            .saturating_add(m.buffers)
            .saturating_add(m.cached)
            .saturating_add(m.s_reclaimable.unwrap_or(0))
    });
    let available = available.min(m.mem_total);
    Ok(MemReading {
        total_kb: m.mem_total / 1024,
        available_kb: available / 1024,
        swap_total_kb: m.swap_total / 1024,
        swap_used_kb: m.swap_total.saturating_sub(m.swap_free) / 1024,
        balloon_kb: balloon_line(text),
        bytes: Memory {
            total: m.mem_total,
            free: m.mem_free,
            available,
            buffers: m.buffers,
            cached: m.cached,
            slab_reclaimable: m.s_reclaimable,
            swap_total: m.swap_total,
            swap_free: m.swap_free,
            balloon: None,
            usable: m.mem_total,
        },
    })
}

/// Refuses what procfs 0.18 would mishandle rather than report: it cuts
/// the last byte off every key unchecked (a key ending in a multi-byte
/// character panics, and the release build aborts on a panic), and it
/// multiplies by the unit (`kB` and the others it knows) unchecked, which
/// wraps into a wrong figure. Each line is split as procfs splits it
/// (`lines`, then `split_whitespace`: a vertical tab separates too).
fn procfs_can_read(text: &[u8]) -> Result<(), ProcError> {
    // procfs reads line by line and stops at the first that is not UTF-8,
    // after acting on those before it.
    let text = match std::str::from_utf8(text) {
        Ok(t) => t,
        Err(e) => std::str::from_utf8(&text[..e.valid_up_to()]).unwrap_or_default(),
    };
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(key) = fields.next() else {
            continue;
        };
        let refuse = |why: &str| Err(ProcError::Other(format!("{line:?} {why}")));
        if !key.ends_with(':') {
            return refuse("is not KEY: VALUE");
        }
        let (Some(n), Some(unit)) = (fields.next(), fields.next()) else {
            continue;
        };
        // Fewer than 11 digits cannot overflow even in GiB.
        if n.len() < 11 {
            continue;
        }
        let shift = match unit {
            "KiB" | "kiB" | "kB" | "KB" => 10,
            "MiB" | "miB" | "MB" | "mB" => 20,
            "GiB" | "giB" | "GB" | "gB" => 30,
            _ => 0,
        };
        if n.parse::<u64>().is_ok_and(|n| n.leading_zeros() < shift) {
            return refuse("does not fit in 64 bits of bytes");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real `meminfo` (captured on the development machine) with the
    /// figures under test set to round numbers.
    fn meminfo(set: &[(&str, u64)], drop: &[&str]) -> String {
        include_str!("../../tests/fixtures/host/meminfo")
            .lines()
            .filter(|l| !drop.iter().any(|d| l.starts_with(&format!("{d}:"))))
            .map(|l| {
                let key = l.split(':').next().unwrap_or("");
                match set.iter().find(|(k, _)| *k == key) {
                    Some((k, v)) => format!("{k}: {v} kB\n"),
                    None => format!("{l}\n"),
                }
            })
            .collect()
    }

    const FIGURES: &[(&str, u64)] = &[
        ("MemTotal", 8_000_000),
        ("MemFree", 1_000_000),
        ("MemAvailable", 6_000_000),
        ("Buffers", 200_000),
        ("Cached", 3_000_000),
        ("SReclaimable", 300_000),
        ("SwapTotal", 2_000_000),
        ("SwapFree", 1_500_000),
    ];

    #[test]
    fn uses_mem_available() {
        let m = parse(meminfo(FIGURES, &[]).as_bytes()).unwrap();
        assert_eq!(m.total_kb, 8_000_000);
        assert_eq!(m.available_kb, 6_000_000);
        assert_eq!(m.used_kb(), 2_000_000);
        assert_eq!(m.usage_percent(), 25.0);
        assert_eq!(m.swap_total_kb, 2_000_000);
        assert_eq!(m.swap_used_kb, 500_000);
    }

    #[test]
    fn falls_back_without_mem_available() {
        let m = parse(meminfo(FIGURES, &["MemAvailable"]).as_bytes()).unwrap();
        assert_eq!(m.available_kb, 1_000_000 + 200_000 + 3_000_000 + 300_000);
    }

    // Found by the fuzz target `proc` (docs/testing.md#fuzzing): procfs
    // multiplied this into a wrapped (or, with overflow checks, a panic).
    #[test]
    fn a_figure_over_64_bits_of_bytes_is_an_error() {
        for line in [
            "MemTotal: 18014398509481984 kB",
            "Cached: 17179869184 GB",
            // Found by the fuzz target `proc`: procfs splits at \v too.
            "Cached: 0060000000068739949 kB\u{b}p4/: B",
        ] {
            let text = meminfo(FIGURES, &[]) + line + "\n";
            let e = parse(text.as_bytes()).unwrap_err().to_string();
            assert!(e.contains("does not fit in 64 bits"), "{line}: {e}");
            // A later line that is not UTF-8 does not stop procfs first.
            let mut text = text.into_bytes();
            text.extend_from_slice(b"DirectMa\xf0\x02M: 1 kB\n");
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains("does not fit in 64 bits"), "{line}: {e}");
        }
        // The largest that fits, and the kernel's own 11-digit figures.
        let text =
            meminfo(FIGURES, &[]) + "VmallocTotal: 34359738367 kB\nHuge: 18014398509481983 kB\n";
        parse(text.as_bytes()).unwrap();
    }

    // Found by the fuzz target `proc`: procfs panicked on this key.
    #[test]
    fn a_key_without_its_colon_is_an_error() {
        let text = meminfo(FIGURES, &[]).replace("MemAvailable:", "MemAvailable(ò");
        let e = parse(text.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("is not KEY: VALUE"), "{e}");
    }

    #[test]
    fn the_balloon_is_in_neither_the_total_nor_the_used_figure() {
        // The QEMU run's 6.1 guest, 128 MiB inflated (docs/design.md#memory-under-a-balloon).
        let on =
            parse(meminfo(&[("MemTotal", 481_436), ("MemAvailable", 322_564)], &[]).as_bytes())
                .unwrap();
        let f = on.figures(Some(131_072), true);
        assert_eq!(
            (f.total_kb, f.available_kb, f.used_kb),
            (350_364, 322_564, 27_800)
        );
        assert_eq!(f.usage_percent, 27_800.0 * 100.0 / 350_364.0);
        // Uncorrected, the host's reclaim reads as the guest's use.
        assert_eq!(on.used_kb(), 481_436 - 322_564);
        let off =
            parse(meminfo(&[("MemTotal", 350_364), ("MemAvailable", 322_424)], &[]).as_bytes())
                .unwrap();
        let f = off.figures(Some(131_072), false);
        assert_eq!((f.total_kb, f.used_kb), (350_364, 27_940));
        // Unknown or empty balloon: MemTotal as it is.
        assert_eq!(off.figures(None, true).total_kb, 350_364);
        // A balloon larger than MemTotal (a bad figure) cannot go negative.
        let f = off.figures(Some(u64::MAX), true);
        assert_eq!((f.total_kb, f.used_kb, f.usage_percent), (0, 0, 0.0));
    }

    #[test]
    fn the_balloon_line_is_read_where_the_kernel_prints_it() {
        // The capture has the line (Linux 6.18, a balloon at 0).
        let read = |text: String| parse(text.as_bytes()).unwrap().balloon_kb;
        assert_eq!(read(meminfo(FIGURES, &[])), Some(0));
        assert_eq!(read(meminfo(&[("Balloon", 131_072)], &[])), Some(131_072));
        assert_eq!(read(meminfo(FIGURES, &["Balloon"])), None);
    }

    #[test]
    fn missing_mem_total_is_an_error() {
        assert!(parse(meminfo(FIGURES, &["MemTotal"]).as_bytes()).is_err());
    }
}
