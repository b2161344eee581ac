//! Every /proc parser on arbitrary bytes: the first byte picks the file,
//! the rest is its text (docs/testing.md#fuzzing). A parser may refuse a
//! text; what it accepts is a reading the sample can carry.
#![no_main]

use guest_agent::collect::{
    balloon, cpu, diskstats, filesystem, identity, loadavg, meminfo, net_dev, pressure, route,
    stat, uptime,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, text)) = data.split_first() else {
        return;
    };
    match pick % 11 {
        0 => {
            if let Ok(r) = stat::parse(text) {
                let mut ids: Vec<u32> = r.cpus.cpus.iter().map(|(id, _)| *id).collect();
                ids.sort_unstable();
                ids.dedup();
                assert_eq!(ids.len(), r.cpus.cpus.len(), "a CPU listed twice");
                assert_eq!(r.guest.len(), r.cpus.cpus.len());
            }
        }
        1 => {
            // Two readings of stat, split at the first NUL: the window's
            // shares are always finite and in range.
            let cut = text.iter().position(|b| *b == 0).unwrap_or(text.len());
            let (a, b) = (&text[..cut], text.get(cut + 1..).unwrap_or_default());
            if let (Ok(prev), Ok(cur)) = (stat::parse(a), stat::parse(b)) {
                let p = cpu::percentages(&prev.cpus, &cur.cpus, cpu::CpuPercent::default());
                for v in [p.usage, p.iowait, p.steal, p.idle] {
                    assert!(v.is_finite() && (0.0..=100.0).contains(&v), "{p:?}");
                }
                assert!(
                    p.shares
                        .iter()
                        .all(|s| s.is_finite() && (0.0..=1.0).contains(s)),
                    "{p:?}"
                );
            }
        }
        2 => {
            if let Ok(m) = meminfo::parse(text) {
                assert!(m.used_kb() <= m.total_kb);
                let pct = m.usage_percent();
                assert!(pct.is_finite() && (0.0..=100.0).contains(&pct), "{pct}");
                // Whatever the balloon says, in either mode.
                for in_total in [false, true] {
                    let f = m.figures(m.balloon_kb, in_total);
                    assert!(f.used_kb + f.available_kb == f.total_kb && f.total_kb <= m.total_kb);
                    let pct = f.usage_percent;
                    assert!(pct.is_finite() && (0.0..=100.0).contains(&pct), "{f:?}");
                }
            }
            // vmstat's balloon lines and a device's feature bits, from
            // the same bytes (the first byte's value is kept for the
            // committed seeds).
            let _ = balloon::vmstat_pages(text);
            let _ = balloon::deflate_on_oom(text);
        }
        3 => {
            if let Ok(l) = loadavg::parse(text) {
                assert!(l.iter().all(|v| v.is_finite() && *v >= 0.0), "load {l:?}");
            }
        }
        4 => {
            let _ = net_dev::parse(text);
        }
        5 => {
            let _ = diskstats::parse(text);
        }
        6 => {
            if let Ok(p) = pressure::parse(text) {
                for s in std::iter::once(p.some).chain(p.full) {
                    assert!(
                        s.avg
                            .iter()
                            .all(|v| v.is_finite() && (0.0..=100.0).contains(v)),
                        "{s:?}"
                    );
                }
            }
        }
        7 => {
            let _ = uptime::parse(text);
        }
        8 => {
            let _ = identity::parse_line(text);
        }
        9 => {
            let _ = route::parse_default_gateway(text);
        }
        _ => {
            let _ = filesystem::root_mount(text);
        }
    }
});
