//! Accuracy on the live machine: `guest-agent --once` against /proc read at
//! the same moment, and CPU usage under a busy loop on every CPU. Runs with
//! `--url off`: no network at all.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn once() -> serde_json::Value {
    common::once(&[])
}

fn meminfo_kb(key: &str) -> u64 {
    try_meminfo_kb(key).unwrap()
}

fn try_meminfo_kb(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The machine's virtio balloon in KiB, read here independently of the
/// agent: `Balloon:`, else vmstat's inflate − deflate pages.
fn balloon_kb() -> Option<u64> {
    try_meminfo_kb("Balloon").or_else(|| {
        let vmstat = std::fs::read_to_string("/proc/vmstat").ok()?;
        let get = |k: &str| -> Option<u64> {
            vmstat
                .lines()
                .find_map(|l| l.strip_prefix(k)?.trim().parse().ok())
        };
        let page_kb = rustix::param::page_size() as u64 / 1024;
        Some(get("balloon_inflate ")?.saturating_sub(get("balloon_deflate ")?) * page_kb)
    })
}

/// MemTotal, less the balloon when its device negotiated deflate-on-OOM
/// (feature bit 2): what the agent reports as the guest's usable memory
/// (docs/design.md#memory-under-a-balloon).
fn usable_total_kb() -> u64 {
    let total = meminfo_kb("MemTotal");
    let balloon = balloon_kb().unwrap_or(0);
    let deflate_on_oom = std::fs::read_dir("/sys/bus/virtio/devices")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("device")).is_ok_and(|d| d.trim() == "0x0005")
        })
        .any(|e| {
            std::fs::read_to_string(e.path().join("features"))
                .is_ok_and(|f| f.as_bytes().get(2) == Some(&b'1'))
        });
    if balloon > 0 && deflate_on_oom {
        total - balloon
    } else {
        total
    }
}

#[test]
fn memory_matches_proc_meminfo_within_one_percent() {
    // Other processes may allocate and free between the two readings of
    // /proc around the agent's; a reading that does not fall between them
    // is taken again (a few times) rather than failing a busy machine.
    let total = usable_total_kb();
    let tolerance = total / 100;
    let mut seen = Vec::new();
    for _ in 0..5 {
        let before = meminfo_kb("MemAvailable");
        let s = once();
        let after = meminfo_kb("MemAvailable");
        assert_eq!(s["memory_total_kb"], total);
        assert_eq!(s["memory_balloon_kb"].as_u64(), balloon_kb());
        let avail = s["memory_available_kb"].as_u64().unwrap();
        assert_eq!(s["memory_used_kb"], total - avail);
        let pct = s["memory_usage_percent"].as_f64().unwrap();
        assert!((pct - (total - avail) as f64 * 100.0 / total as f64).abs() <= 0.005);
        let (lo, hi) = (before.min(after), before.max(after));
        if avail + tolerance >= lo && avail <= hi + tolerance {
            return;
        }
        seen.push(format!("agent {avail} vs /proc/meminfo {before}..{after}"));
    }
    panic!("never within ±{tolerance} KiB: {seen:?}");
}

#[test]
fn a_busy_loop_on_every_cpu_shows_above_80_percent() {
    let stop = Arc::new(AtomicBool::new(false));
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let burners: Vec<_> = (0..cpus)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let s = once();
    stop.store(true, Ordering::Relaxed);
    for b in burners {
        b.join().unwrap();
    }
    let usage = s["cpu_usage_percent"].as_f64().unwrap();
    let steal = s["cpu_steal_percent"].as_f64().unwrap();
    // Time the hypervisor stole was not ours to use; the burners had the rest.
    assert!(
        usage > 80.0 || usage + steal > 95.0,
        "usage {usage} % (steal {steal} %) with {cpus} busy threads"
    );
    assert!(s["window_ms"].as_u64().unwrap() > 0);
}
