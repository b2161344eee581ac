//! Collection on fixture proc roots: a real capture and hand-made anomalies.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use guest_agent::{Collector, Sample};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// A copy of the host fixture in a fresh temp dir, to alter per test.
struct ProcRoot(PathBuf);

impl ProcRoot {
    fn new(name: &str) -> ProcRoot {
        let dir = std::env::temp_dir().join(format!("ga-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        copy_dir(&Path::new(FIXTURES).join("host"), &dir);
        ProcRoot(dir)
    }

    fn put(&self, rel: &str, anomaly: &str) {
        fs::copy(
            Path::new(FIXTURES).join("anomalies").join(anomaly),
            self.0.join(rel),
        )
        .unwrap();
    }

    fn remove(&self, rel: &str) {
        let p = self.0.join(rel);
        if p.is_dir() {
            fs::remove_dir_all(p).unwrap();
        } else {
            fs::remove_file(p).unwrap();
        }
    }

    fn collector(&self) -> Collector {
        Collector::new(&self.0, Some("vm-fixture".into())).unwrap()
    }
}

impl Drop for ProcRoot {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A `Key:  123 kB` figure of a meminfo text.
fn kb(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} in meminfo"))
}

fn json(s: &Sample) -> serde_json::Value {
    serde_json::to_value(s).unwrap()
}

#[test]
fn host_capture_gives_a_complete_sample() {
    let root = ProcRoot::new("host");
    let mut c = root.collector();
    c.collect();
    let s = c.collect();
    let v = json(&s);
    // Every schema field is present and, on a full capture, not null
    // (guest_ip is the caller's; restored_from_run_id is null until a
    // snapshot restore).
    for f in guest_agent::sample::FIELDS {
        assert!(v.get(f).is_some(), "{f} missing");
        if !["guest_ip", "restored_from_run_id"].contains(f) {
            assert!(!v[f].is_null(), "{f} is null");
        }
    }
    assert!(c.failures().is_empty(), "{:?}", c.failures());
    let meminfo = fs::read_to_string(root.0.join("meminfo")).unwrap();
    assert_eq!(s.memory_total_kb, Some(kb(&meminfo, "MemTotal")));
    assert_eq!(s.memory_available_kb, Some(kb(&meminfo, "MemAvailable")));
    assert_eq!(
        s.memory_used_kb,
        Some(kb(&meminfo, "MemTotal") - kb(&meminfo, "MemAvailable"))
    );
    let stat = fs::read_to_string(root.0.join("stat")).unwrap();
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    assert_eq!(s.cpu_count, Some(cpus as u32));
    // net/dev of the capture: eth0 and two idle ifb devices; lo is left out.
    assert_eq!(s.network_rx_bytes, Some(294_154_599));
    assert_eq!(s.network_tx_bytes, Some(560_664));
    // diskstats of the capture: vda only (loop and zram are left out).
    assert_eq!(s.disk_read_bytes, Some(2_726_658 * 512));
    assert_eq!(s.disk_write_bytes, Some(3_300_576 * 512));
    assert_eq!(s.process_count, Some(2));
    assert_eq!(s.run_id, "11111111-2222-4333-8444-555555555555");
    assert_eq!(s.vm_id.as_deref(), Some("vm-fixture"));
    // Same stat twice: no tick elapsed, so the first window's zeros repeat.
    assert_eq!(s.cpu_usage_percent, Some(0.0));
}

/// Two samples with `first` then `second` as `stat`.
fn window(name: &str, first: &str, second: &str) -> (Sample, Sample) {
    let root = ProcRoot::new(name);
    root.put("stat", first);
    let mut c = root.collector();
    let a = c.collect();
    root.put("stat", second);
    let b = c.collect();
    (a, b)
}

fn pct(s: &Sample) -> (f64, f64, f64) {
    (
        s.cpu_usage_percent.unwrap(),
        s.cpu_iowait_percent.unwrap(),
        s.cpu_steal_percent.unwrap(),
    )
}

#[test]
fn iowait_going_backwards_contributes_nothing() {
    // Per CPU: user +30, system +10, idle +60, iowait -5 → 40 % busy.
    let (_, s) = window(
        "iowait",
        "stat-iowait-backwards.1",
        "stat-iowait-backwards.2",
    );
    assert_eq!(pct(&s), (40.0, 0.0, 0.0));
    assert_eq!(s.procs_running, Some(2));
}

#[test]
fn a_vanished_cpu_is_left_out_of_the_window() {
    // cpu0: user +80, idle +20; cpu2: user +40, idle +60; cpu1 gone → 60 %.
    let (a, s) = window("vanish", "stat-cpu-vanishes.1", "stat-cpu-vanishes.2");
    assert_eq!(a.cpu_count, Some(3));
    assert_eq!(s.cpu_count, Some(2));
    assert_eq!(pct(&s), (60.0, 0.0, 0.0));
}

#[test]
fn guest_time_is_not_counted_twice() {
    // user +90 (of which guest +90), system +5, idle +5 → 95 %, not 185/190.
    let (_, s) = window("guest", "stat-guest-heavy.1", "stat-guest-heavy.2");
    assert_eq!(pct(&s), (95.0, 0.0, 0.0));
}

#[test]
fn a_zero_tick_window_repeats_the_previous_figures() {
    let root = ProcRoot::new("zero");
    root.put("stat", "stat-guest-heavy.1");
    let mut c = root.collector();
    assert_eq!(c.collect().cpu_usage_percent, Some(0.0));
    root.put("stat", "stat-guest-heavy.2");
    assert_eq!(c.collect().cpu_usage_percent, Some(95.0));
    let s = c.collect();
    assert_eq!(pct(&s), (95.0, 0.0, 0.0));
}

#[test]
fn without_mem_available_the_documented_estimate_is_used() {
    let root = ProcRoot::new("nomemavail");
    root.put("meminfo", "meminfo-no-memavailable");
    let s = root.collector().collect();
    let m = fs::read_to_string(root.0.join("meminfo")).unwrap();
    let expected =
        kb(&m, "MemFree") + kb(&m, "Buffers") + kb(&m, "Cached") + kb(&m, "SReclaimable");
    assert_eq!(s.memory_available_kb, Some(expected));
}

#[test]
fn without_psi_pressure_is_null_and_not_an_error() {
    let root = ProcRoot::new("nopsi");
    root.remove("pressure");
    let mut c = root.collector();
    let s = c.collect();
    assert_eq!(s.pressure_cpu_some_avg10, None);
    assert_eq!(s.pressure_memory_some_avg10, None);
    assert_eq!(s.pressure_io_some_avg10, None);
    assert!(c.failures().is_empty(), "{:?}", c.failures());
    assert!(s.memory_total_kb.is_some());
}

#[test]
fn malformed_files_null_their_figures_name_the_file_and_spare_the_rest() {
    let cases = [
        ("meminfo", "meminfo-malformed", "memory_total_kb"),
        ("stat", "stat-malformed", "cpu_usage_percent"),
        ("net/dev", "net-dev-malformed", "network_rx_bytes"),
    ];
    for (file, anomaly, field) in cases {
        let root = ProcRoot::new("malformed");
        root.put(file, anomaly);
        let mut c = root.collector();
        let v = json(&c.collect());
        assert!(v[field].is_null(), "{field} with bad {file}");
        assert!(!v["load_average"].is_null() && !v["uptime_seconds"].is_null());
        let err = c
            .failures()
            .get(file)
            .unwrap_or_else(|| panic!("{file} failure"));
        assert!(
            err.contains(&root.0.join(file).display().to_string()),
            "{err}"
        );
    }
}

#[test]
fn a_missing_required_file_is_an_error_that_names_it() {
    let root = ProcRoot::new("missing");
    root.remove("loadavg");
    let mut c = root.collector();
    let s = c.collect();
    assert_eq!(s.load_average, None);
    let err = &c.failures()["loadavg"];
    assert!(
        err.contains("loadavg") && err.contains("No such file"),
        "{err}"
    );
    // It recovers when the file comes back.
    fs::copy(
        Path::new(FIXTURES).join("host/loadavg"),
        root.0.join("loadavg"),
    )
    .unwrap();
    assert!(c.collect().load_average.is_some());
    assert!(c.failures().is_empty());
}

#[test]
fn without_a_run_id_source_the_collector_refuses_to_start() {
    let root = ProcRoot::new("nouuid");
    root.remove("sys/kernel/random/uuid");
    let err = Collector::new(&root.0, None).unwrap_err().to_string();
    assert!(err.contains("sys/kernel/random/uuid"), "{err}");
}
