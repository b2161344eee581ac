//! A guest that changes under the agent, on fixture roots: a virtio balloon
//! with and without deflate-on-OOM, its size from `meminfo`, from `vmstat`
//! or from neither, MemTotal moving (hot-plug), and devices that vanish and
//! come back (docs/design.md#memory-under-a-balloon,
//! docs/design.md#totals-over-devices-that-come-and-go).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use guest_agent::internals::{encode, encode_prometheus};
use guest_agent::{Collector, Sample};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// A copy of the VM capture in a temp dir, with files put in per test.
struct Root(PathBuf);

impl Root {
    fn new(name: &str) -> Root {
        let dir = std::env::temp_dir().join(format!("ga-changes-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        copy_dir(&Path::new(FIXTURES).join("vm"), &dir.join("proc"));
        fs::create_dir_all(dir.join("sys")).unwrap();
        Root(dir)
    }

    fn proc(&self) -> PathBuf {
        self.0.join("proc")
    }

    /// `tests/fixtures/FROM` as `proc/TO`.
    fn put(&self, to: &str, from: &str) {
        fs::copy(Path::new(FIXTURES).join(from), self.proc().join(to)).unwrap();
    }

    /// The balloon fixture `case`: its `meminfo` and `vmstat`.
    fn balloon(&self, case: &str) {
        self.put("meminfo", &format!("balloon/{case}/meminfo"));
        self.put("vmstat", &format!("balloon/{case}/vmstat"));
    }

    fn collector(&self, sys: Option<&str>) -> Collector {
        let sys = match sys {
            Some(s) => Path::new(FIXTURES).join("balloon").join(s),
            None => self.0.join("sys"),
        };
        Collector::new(&self.proc(), Some("vm-changes".into()))
            .unwrap()
            .with_sys_root(&sys)
    }
}

impl Drop for Root {
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

/// (total, available, used, percent, balloon) of a sample.
fn memory(s: &Sample) -> (u64, u64, u64, f64, Option<u64>) {
    (
        s.memory_total_kb.unwrap(),
        s.memory_available_kb.unwrap(),
        s.memory_used_kb.unwrap(),
        s.memory_usage_percent.unwrap(),
        s.memory_balloon_kb,
    )
}

fn pct(used: u64, total: u64) -> f64 {
    (used as f64 * 100.0 / total as f64 * 100.0).round() / 100.0
}

/// Before inflating: the 6.1 guest of the QEMU run, balloon at 0.
const BEFORE_USED_KB: u64 = 481_436 - 452_012;
const BALLOON_KB: u64 = 128 * 1024;

#[test]
fn deflate_on_oom_takes_the_balloon_out_of_memtotal() {
    let root = Root::new("deflate");
    root.balloon("vmstat-only-deflate");
    let mut c = root.collector(Some("sys-deflate-on-oom"));
    let s = c.collect();
    // MemTotal 481436 keeps the balloon; MemAvailable 322564 lost it.
    let total = 481_436 - BALLOON_KB;
    let used = total - 322_564;
    assert_eq!(
        memory(&s),
        (total, 322_564, used, pct(used, total), Some(BALLOON_KB))
    );
    assert!(
        used.abs_diff(BEFORE_USED_KB) <= 2048,
        "{used} vs {BEFORE_USED_KB}"
    );
    assert!(
        !c.failures().contains_key("balloon device"),
        "{:?}",
        c.failures()
    );
    // Without the correction it would have been 33 %, the host's reclaim
    // counted as the guest's use.
    assert!(s.memory_usage_percent.unwrap() < 10.0);
}

#[test]
fn without_deflate_on_oom_memtotal_already_lacks_the_balloon() {
    let root = Root::new("plain");
    root.balloon("vmstat-only-plain");
    let mut c = root.collector(Some("sys-plain"));
    let s = c.collect();
    let (total, used) = (350_364, 350_364 - 322_424);
    assert_eq!(
        memory(&s),
        (total, 322_424, used, pct(used, total), Some(BALLOON_KB))
    );
    assert!(used.abs_diff(BEFORE_USED_KB) <= 2048);
    assert!(c.failures().is_empty(), "{:?}", c.failures());
}

#[test]
fn the_meminfo_balloon_line_is_used_where_present() {
    let root = Root::new("line");
    root.balloon("meminfo-line");
    // vmstat would say otherwise: meminfo's figure wins, vmstat is not read.
    fs::write(
        root.proc().join("vmstat"),
        "nr_balloon_pages 1\nballoon_inflate 1\nballoon_deflate 0\n",
    )
    .unwrap();
    let s = root.collector(Some("sys-deflate-on-oom")).collect();
    let m = fs::read_to_string(root.proc().join("meminfo")).unwrap();
    let mem_total = kb(&m, "MemTotal");
    assert_eq!(s.memory_balloon_kb, Some(BALLOON_KB));
    assert_eq!(s.memory_total_kb, Some(mem_total - BALLOON_KB));
    assert_eq!(
        s.memory_used_kb,
        Some(mem_total - BALLOON_KB - kb(&m, "MemAvailable"))
    );
}

#[test]
fn a_kernel_without_balloon_figures_says_null_not_zero() {
    let root = Root::new("neither");
    root.balloon("neither");
    let mut c = root.collector(None);
    let s = c.collect();
    assert_eq!(s.memory_balloon_kb, None);
    let m = fs::read_to_string(root.proc().join("meminfo")).unwrap();
    assert_eq!(s.memory_total_kb, Some(kb(&m, "MemTotal")));
    assert!(c.failures().is_empty(), "{:?}", c.failures());
    // No vmstat at all: the same.
    fs::remove_file(root.proc().join("vmstat")).unwrap();
    let s = c.collect();
    assert_eq!(s.memory_balloon_kb, None);
    assert!(c.failures().is_empty(), "{:?}", c.failures());
    // The JSON carries the null.
    let v = serde_json::to_value(&s).unwrap();
    assert!(v["memory_balloon_kb"].is_null());
}

#[test]
fn an_empty_balloon_is_zero_and_needs_no_device() {
    let root = Root::new("empty");
    root.balloon("before");
    let mut c = root.collector(None);
    let s = c.collect();
    assert_eq!(
        memory(&s),
        (
            481_436,
            452_012,
            BEFORE_USED_KB,
            pct(BEFORE_USED_KB, 481_436),
            Some(0)
        )
    );
    assert!(c.failures().is_empty(), "{:?}", c.failures());
}

#[test]
fn a_balloon_without_a_readable_device_is_reported_and_memtotal_stands() {
    let root = Root::new("nodevice");
    root.balloon("vmstat-only-deflate");
    let mut c = root.collector(None);
    let s = c.collect();
    assert_eq!(s.memory_balloon_kb, Some(BALLOON_KB));
    assert_eq!(s.memory_total_kb, Some(481_436));
    let e = &c.failures()["balloon device"];
    assert!(
        e.contains("bus/virtio/devices") && e.contains("no virtio balloon device"),
        "{e}"
    );
    // The device shows up (its driver loaded): found, and the error clears.
    copy_dir(
        &Path::new(FIXTURES).join("balloon/sys-deflate-on-oom"),
        &root.0.join("sys"),
    );
    root.put("vmstat", "balloon/vmstat-only-deflate/vmstat");
    fs::write(
        root.proc().join("vmstat"),
        fs::read_to_string(root.proc().join("vmstat"))
            .unwrap()
            .replace("balloon_deflate 0", "balloon_deflate 1"),
    )
    .unwrap();
    let s = c.collect();
    assert_eq!(s.memory_balloon_kb, Some(BALLOON_KB - 4));
    assert_eq!(s.memory_total_kb, Some(481_436 - (BALLOON_KB - 4)));
    assert!(c.failures().is_empty(), "{:?}", c.failures());
}

#[test]
fn a_malformed_balloon_line_is_an_error_and_memory_still_goes_out() {
    let root = Root::new("badvmstat");
    root.put("meminfo", "balloon/vmstat-only-plain/meminfo");
    fs::write(
        root.proc().join("vmstat"),
        "nr_free_pages 5\nballoon_inflate 12x\nballoon_deflate 0\n",
    )
    .unwrap();
    let mut c = root.collector(Some("sys-plain"));
    let s = c.collect();
    assert_eq!(s.memory_balloon_kb, None);
    assert_eq!(s.memory_total_kb, Some(350_364));
    let e = &c.failures()["vmstat"];
    assert!(e.contains("vmstat") && e.contains("balloon_inflate"), "{e}");
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

#[test]
fn memtotal_is_read_every_sample_as_it_grows_and_shrinks() {
    let root = Root::new("hotplug");
    let mut c = root.collector(None);
    let mut totals = Vec::new();
    for i in 1..=3 {
        root.put("meminfo", &format!("hotplug/meminfo.{i}"));
        let s = c.collect();
        totals.push(s.memory_total_kb.unwrap());
        assert!((0.0..=100.0).contains(&s.memory_usage_percent.unwrap()));
    }
    assert_eq!(totals, [481_436, 481_436 + 262_144, 481_436]);
}

#[test]
fn network_totals_keep_a_deleted_interface_and_count_it_again_when_back() {
    let root = Root::new("netdel");
    let mut c = root.collector(None);
    let mut totals = Vec::new();
    let mut samples = Vec::new();
    for i in 1..=3 {
        root.put("net/dev", &format!("devices/net-dev.{i}"));
        let s = c.collect();
        totals.push((s.network_rx_bytes.unwrap(), s.network_tx_bytes.unwrap()));
        samples.push(s);
    }
    // d0 sent 4200 bytes, then was deleted; it came back from 0 and sent 84.
    assert_eq!(
        totals,
        [(50_000, 24_200), (51_000, 25_200), (52_000, 26_284)]
    );
    // OTLP: the new d0 is a new series, started after the one before it.
    let body = otlp(&samples[2]);
    let points = &metric(&body, "system.network.io")["sum"]["dataPoints"];
    let start = |dev: &str| {
        points
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["attributes"][0]["value"]["stringValue"] == dev)
            .map(|p| p["startTimeUnixNano"].as_str().unwrap().to_string())
            .unwrap()
    };
    let boot = start("eth0");
    let d0 = start("d0");
    assert_eq!(
        d0,
        format!("{}", samples[1].timestamp_ms * 1_000_000),
        "d0 counts from after the sample that saw it gone"
    );
    assert!(d0.parse::<u64>().unwrap() > boot.parse::<u64>().unwrap());
}

#[test]
fn disk_totals_keep_an_unplugged_disk() {
    let root = Root::new("diskdel");
    let mut c = root.collector(None);
    root.put("diskstats", "devices/diskstats.1");
    let a = c.collect();
    root.put("diskstats", "devices/diskstats.2");
    let b = c.collect();
    assert_eq!(a.disk_read_bytes, Some((7200 + 2048) * 512));
    assert_eq!(b.disk_read_bytes, Some((7300 + 2048) * 512));
    assert_eq!(b.disk_write_bytes, Some((410 + 80) * 512));
}

fn otlp(s: &Sample) -> serde_json::Value {
    let mut out = Vec::new();
    encode(
        &[Arc::new(s.clone())],
        guest_agent::config::Format::Otlp,
        &mut out,
    );
    serde_json::from_slice(&out).unwrap()
}

fn metric<'a>(body: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    body["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("{name} missing"))
}

#[test]
fn the_exposition_formats_carry_the_same_figures() {
    let root = Root::new("formats");
    root.balloon("vmstat-only-deflate");
    let s = root.collector(Some("sys-deflate-on-oom")).collect();
    let usable = (481_436 - BALLOON_KB) * 1024;

    let mut out = Vec::new();
    encode_prometheus(&s, None, &mut out);
    let text = String::from_utf8(out).unwrap();
    for want in [
        format!("node_memory_Balloon_bytes {}\n", BALLOON_KB * 1024),
        format!("node_memory_MemTotal_bytes {}\n", 481_436 * 1024),
        format!("guest_agent_memory_usable_bytes {usable}\n"),
        format!(
            "guest_agent_memory_used_bytes {}\n",
            s.memory_used_kb.unwrap() * 1024
        ),
        format!(
            "guest_agent_memory_used_ratio {}\n",
            s.memory_usage_percent.unwrap() / 100.0
        ),
    ] {
        assert!(text.contains(&want), "{want:?} missing:\n{text}");
    }

    let body = otlp(&s);
    let int = |name: &str| {
        metric(&body, name)["sum"]["dataPoints"][0]["asInt"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(int("system.memory.limit"), usable);
    assert_eq!(int("system.memory.linux.balloon"), BALLOON_KB * 1024);
    // The states add up to the usable memory: the balloon is in none.
    let states: u64 = metric(&body, "system.memory.usage")["sum"]["dataPoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["asInt"].as_str().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(states, usable);

    // Influx: every numeric field, the balloon among them.
    let mut out = Vec::new();
    encode(
        &[Arc::new(s.clone())],
        guest_agent::config::Format::Influx,
        &mut out,
    );
    let line = String::from_utf8(out).unwrap();
    assert!(
        line.contains(&format!("memory_balloon_kb={BALLOON_KB}i")),
        "{line}"
    );
}

/// The buffer's byte bound: 2 % of the usable memory (at most 16 MiB).
fn bound(kb: u64) -> usize {
    (kb * 1024 / 50).min(16 << 20) as usize
}

#[test]
fn the_buffer_bound_follows_the_usable_memory() {
    let root = Root::new("bound");
    root.balloon("before");
    let rx = common::Receiver::start(common::Mode::Accept);
    let proc = root.proc().display().to_string();
    let sys = Path::new(FIXTURES).join("balloon/sys-deflate-on-oom");
    let config = common::config(&[
        ("proc_root", &proc),
        ("sys_root", &sys.display().to_string()),
        ("url", &rx.url()),
        ("interval", "100ms"),
        ("kmsg", "off"),
    ]);
    assert_eq!(
        config.buffer_max_bytes,
        bound(481_436),
        "from MemTotal at start"
    );
    let agent = guest_agent::agent::start(config).unwrap();
    let follows = |kb: u64, what: &str| {
        common::wait_until(30, what, || agent.health().buffer_max_bytes == bound(kb));
    };
    follows(481_436, "the bound at start");
    // 128 MiB inflated with deflate-on-OOM: MemTotal stays, usable drops.
    root.balloon("vmstat-only-deflate");
    follows(481_436 - 131_072, "the bound under the balloon");
    // Deflated, then 256 MiB hot-plugged.
    root.balloon("before");
    root.put("meminfo", "hotplug/meminfo.2");
    follows(481_436 + 262_144, "the bound after hot-plug");
    let health = agent.stop();
    assert_eq!(health.dropped, 0);
}
