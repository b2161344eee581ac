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
    /// The same and more, in bytes, as the exposition formats carry it.
    pub bytes: Memory,
}

impl MemReading {
    /// total − available, as `free` computes "used".
    pub fn used_kb(&self) -> u64 {
        self.total_kb.saturating_sub(self.available_kb)
    }

    /// used / total × 100; 0 when total is 0.
    pub fn usage_percent(&self) -> f64 {
        if self.total_kb == 0 {
            0.0
        } else {
            self.used_kb() as f64 * 100.0 / self.total_kb as f64
        }
    }
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
        bytes: Memory {
            total: m.mem_total,
            free: m.mem_free,
            available,
            buffers: m.buffers,
            cached: m.cached,
            slab_reclaimable: m.s_reclaimable,
            swap_total: m.swap_total,
            swap_free: m.swap_free,
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
    fn missing_mem_total_is_an_error() {
        assert!(parse(meminfo(FIGURES, &["MemTotal"]).as_bytes()).is_err());
    }
}
