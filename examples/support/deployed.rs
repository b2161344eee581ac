//! The as-deployed comparison (docs/performance.md): the shipped static
//! binary, the floor probe built the same way, node_exporter and collectd,
//! each as its own process at the same cadence, all at once, so that what
//! the machine's other tenants do hits them alike.
//!
//! Whole-process CPU is the sum of the run time (`/proc/PID/task/*/schedstat`,
//! nanoseconds) of every thread, read at the start and the end of each slice
//! of the run. Receivers and the node_exporter scraper are the bench's own
//! threads: their CPU is not counted.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{NODE_EXPORTER, Receiver, Res, Spawned, dead_port, since_epoch_ns, spawn, wait_for};

const COLLECTD: &str = "/usr/sbin/collectd";
const COLLECTD_PLUGINS: &str = "/usr/lib/collectd";
const COLLECTD_TYPES: &str = "/usr/share/collectd/types.db";

/// A further guest-agent row: another binary, or other arguments.
#[derive(Clone)]
pub struct Variant {
    pub binary: Option<PathBuf>,
    pub args: Vec<String>,
}

/// One process of the comparison.
pub struct Contender {
    pub label: String,
    pub proc: Spawned,
    /// Where its samples go (agent, probe, collectd), or its scraper.
    pub feed: Feed,
    /// The command line, with the machine's paths and ports generalised.
    pub shown: String,
}

pub enum Feed {
    Pushed(Receiver),
    Scraped(Scraper),
}

impl Feed {
    /// When the last sample or scrape arrived ([`since_epoch_ns`]).
    fn last_at_ns(&self) -> u64 {
        match self {
            Feed::Pushed(r) => r.stats.last_at_ns.load(Ordering::SeqCst),
            Feed::Scraped(s) => s.last_at_ns.load(Ordering::SeqCst),
        }
    }

    /// (samples or scrapes, body bytes) so far.
    fn counts(&self) -> (u64, u64) {
        match self {
            Feed::Pushed(r) => (
                r.stats.requests.load(Ordering::SeqCst),
                r.stats.body_bytes.load(Ordering::SeqCst),
            ),
            Feed::Scraped(s) => (
                s.scrapes.load(Ordering::SeqCst),
                s.bytes.load(Ordering::SeqCst),
            ),
        }
    }
}

/// Scrapes node_exporter at a fixed cadence from a thread of the bench.
pub struct Scraper {
    scrapes: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    failures: Arc<AtomicU64>,
    last_at_ns: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Scraper {
    /// Scrapes `url` every `interval` from `first` on.
    fn start(url: String, interval: Duration, first: Instant) -> Scraper {
        let scrapes = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let last_at_ns = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (sc, by, fa, la, st) = (
            scrapes.clone(),
            bytes.clone(),
            failures.clone(),
            last_at_ns.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(5)))
                .proxy(None)
                .build()
                .into();
            let mut next = first;
            std::thread::sleep(first.saturating_duration_since(Instant::now()));
            while !st.load(Ordering::SeqCst) {
                la.store(since_epoch_ns(), Ordering::SeqCst);
                let got = agent
                    .get(&url)
                    .call()
                    .map_err(|e| e.to_string())
                    .and_then(|mut r| {
                        r.body_mut()
                            .with_config()
                            .limit(64 << 20)
                            .read_to_vec()
                            .map_err(|e| e.to_string())
                    });
                match got {
                    Ok(b) => {
                        sc.fetch_add(1, Ordering::SeqCst);
                        by.fetch_add(b.len() as u64, Ordering::SeqCst);
                    }
                    Err(_) => {
                        fa.fetch_add(1, Ordering::SeqCst);
                    }
                }
                super::floor::wait_for_next_tick(&mut next, interval);
            }
        });
        Scraper {
            scrapes,
            bytes,
            failures,
            last_at_ns,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Run time of every thread of `pid`, ns.
pub fn process_cpu_ns(pid: i32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// VmRSS (KiB) and thread count of a process.
pub fn rss_and_threads(pid: i32) -> (u64, u64) {
    let st = procfs::process::Process::new(pid).and_then(|p| p.status());
    match st {
        Ok(s) => (s.vmrss.unwrap_or(0), s.threads),
        Err(_) => (0, 0),
    }
}

/// What one contender did over the measured run.
pub struct Row {
    pub label: String,
    pub shown: String,
    /// Samples (pushes, or scrapes) over the run.
    pub samples: u64,
    /// CPU per sample over the whole run, µs.
    pub cpu_us: f64,
    /// CPU per sample in each slice, µs.
    pub slices: Vec<f64>,
    pub rss_kib: u64,
    pub threads: u64,
    pub bytes_per_sample: f64,
    /// Where in the interval its samples arrive, ms (median over the slices).
    pub phase_ms: f64,
    pub note: String,
}

pub struct Deployed {
    pub rows: Vec<Row>,
    pub interval: Duration,
    pub run: Duration,
    pub slice: Duration,
}

impl Deployed {
    /// Index of the floor probe's row.
    pub fn floor(&self) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.label.starts_with("floor probe"))
    }

    /// The per-slice ratios of row `i` to the floor: (median, min, max).
    pub fn slice_ratio(&self, row: &Row) -> Option<(f64, f64, f64)> {
        let floor = self.floor()?;
        let mut r: Vec<f64> = row
            .slices
            .iter()
            .zip(&floor.slices)
            .filter(|(_, f)| **f > 0.0)
            .map(|(a, f)| a / f)
            .collect();
        if r.is_empty() {
            return None;
        }
        r.sort_by(|a, b| a.total_cmp(b));
        Some((r[r.len() / 2], r[0], r[r.len() - 1]))
    }
}

/// Which processes one run compares, and in which order their ticks come.
pub struct Lineup<'a> {
    /// The shipped agent with `--kmsg off` too, besides as configured by
    /// default.
    pub kmsg_off: bool,
    /// Further guest-agent rows.
    pub variants: &'a [Variant],
    /// The floor probe's rows: label and switches.
    pub floors: &'a [(&'static str, &'static [&'static str])],
    /// node_exporter and collectd, where installed.
    pub others: bool,
    /// Slots in the opposite order: the last contender ticks first.
    pub reversed: bool,
}

/// The floor probe alone, with procfs's parsing, with ureq for the POST.
pub const ALL_FLOORS: &[(&str, &[&str])] = &[
    ("floor probe (static musl)", &[]),
    ("floor + procfs parsing", &["--parse"]),
    ("floor + ureq for the POST", &["--ureq"]),
];

impl Lineup<'_> {
    /// Every contender: the headline table.
    pub fn all(variants: &[Variant]) -> Lineup<'_> {
        Lineup {
            kmsg_off: true,
            variants,
            floors: ALL_FLOORS,
            others: true,
            reversed: false,
        }
    }
}

/// Starts every contender of `lineup` that is available, lets them warm
/// up, then measures `slices` slices of `slice` each.
pub fn run(
    agent: &Path,
    floor: &Path,
    interval: Duration,
    slice: Duration,
    slices: u32,
    lineup: &Lineup<'_>,
    tmp: &Path,
) -> Res<Deployed> {
    let ms = interval.as_millis();
    let mut contenders: Vec<Contender> = Vec::new();

    // Each contender ticks in its own slot of the interval. Started
    // together, their ticks would come in one burst, and whichever woke
    // first would warm the caches (and the idle CPU) for the rest: in one
    // such run the same binary cost 699 µs per sample started first and
    // 455 µs started third. A guest agent wakes alone, so each is measured
    // alone.
    let node_exporter = lineup.others && Path::new(NODE_EXPORTER).exists();
    let collectd = lineup.others
        && Path::new(COLLECTD).exists()
        && Path::new(COLLECTD_PLUGINS).join("write_http.so").exists();
    // The shipped agent as configured by default; the same without the
    // restore watcher (whose check, a moment after each collection, is a
    // second wake-up per sample: docs/snapshots.md#timing); then any
    // variants asked for.
    let mut agents = vec![Variant {
        binary: None,
        args: Vec::new(),
    }];
    if lineup.kmsg_off {
        agents.push(Variant {
            binary: None,
            args: vec!["--kmsg".into(), "off".into()],
        });
    }
    agents.extend(lineup.variants.iter().cloned());
    let floors = lineup.floors;
    let count = agents.len() + floors.len() + usize::from(node_exporter) + usize::from(collectd);
    let slot = interval / count as u32;
    let t0 = Instant::now() + Duration::from_millis(10);
    let slot_at = |k: usize| {
        let k = if lineup.reversed { count - 1 - k } else { k };
        let mut at = t0 + slot * k as u32;
        while at < Instant::now() {
            at += interval;
        }
        at
    };
    let wait_for_slot =
        |k: usize| std::thread::sleep(slot_at(k).saturating_duration_since(Instant::now()));

    for variant in &agents {
        let extra = &variant.args;
        let r = Receiver::start(true)?;
        let url = r.url();
        assert!(url.starts_with("http://127.0.0.1:"), "loopback only");
        wait_for_slot(contenders.len());
        let proc = spawn(
            "guest-agent",
            Command::new(variant.binary.as_deref().unwrap_or(agent))
                .args(["--url", &url, "--interval", &format!("{ms}ms")])
                .args(["--listen", "off", "--log", "warn"])
                .args(["--config", "/nonexistent/guest-agent.conf"])
                .args(extra)
                .env_clear(),
            &tmp.join(format!("deployed-agent-{}.log", contenders.len())),
        )?;
        let with = match &variant.binary {
            Some(b) => format!(" ({})", b.display()),
            None if extra.is_empty() => String::new(),
            None => format!(" {}", extra.join(" ")),
        };
        contenders.push(Contender {
            label: format!("guest-agent (static musl){with}"),
            proc,
            feed: Feed::Pushed(r),
            shown: format!(
                "`guest-agent --url http://127.0.0.1:PORT/v1/guest-metrics --interval {ms}ms --listen off{with}`"
            ),
        });
    }

    // The floor, then the floor plus the parsing the agent does (procfs's
    // parsers, the rule), and plus the HTTP client the agent used before
    // (ureq), so that the gap is taken apart in the same run.
    for &(label, extra) in floors {
        let r = Receiver::start(false)?;
        let url = r.url();
        wait_for_slot(contenders.len());
        let proc = spawn(
            label,
            Command::new(floor)
                .args(["--url", &url, "--interval", &format!("{ms}ms")])
                .args(extra)
                .env_clear(),
            &tmp.join(format!("deployed-floor-{}.log", contenders.len())),
        )?;
        contenders.push(Contender {
            label: label.into(),
            proc,
            feed: Feed::Pushed(r),
            shown: format!(
                "`floor_probe --url http://127.0.0.1:PORT/v1/guest-metrics --interval {ms}ms{}{}` (examples/floor_probe.rs)",
                if extra.is_empty() { "" } else { " " },
                extra.join(" ")
            ),
        });
    }

    if node_exporter {
        let port = dead_port()?;
        let args = super::node_exporter_args(port);
        let mut proc = spawn(
            "prometheus-node-exporter",
            Command::new(NODE_EXPORTER).args(&args).env_clear(),
            &tmp.join("deployed-node-exporter.log"),
        )?;
        let url = format!("http://127.0.0.1:{port}/metrics");
        let probe: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .proxy(None)
            .build()
            .into();
        let up = wait_for(Duration::from_secs(10), || {
            proc.check_alive().is_ok() && probe.get(&url).call().is_ok()
        });
        proc.check_alive()?;
        if !up {
            return Err(format!("node_exporter did not answer on {url} within 10 s").into());
        }
        contenders.push(Contender {
            label: format!(
                "node_exporter {}, scraped",
                super::node_exporter_version()
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
            ),
            proc,
            feed: Feed::Scraped(Scraper::start(url, interval, slot_at(contenders.len()))),
            shown: format!(
                "`prometheus-node-exporter {}`, scraped every {ms} ms",
                args[1..].join(" ")
            ),
        });
    }

    if collectd {
        let r = Receiver::start(false)?;
        let dir = tmp.join("collectd");
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("collectd.conf");
        std::fs::write(
            &conf,
            collectd_conf(
                &dir,
                &r.url().replace("/v1/guest-metrics", "/collectd"),
                interval,
            ),
        )?;
        wait_for_slot(contenders.len());
        let proc = spawn(
            "collectd",
            Command::new(COLLECTD)
                .arg("-f")
                .arg("-C")
                .arg(&conf)
                .env_clear(),
            &tmp.join("deployed-collectd.log"),
        )?;
        contenders.push(Contender {
            label: format!("collectd {}", collectd_version()),
            proc,
            feed: Feed::Pushed(r),
            shown: format!(
                "`collectd -f -C collectd.conf`: `Interval {}`, cpu memory load interface (not lo) disk df (/) processes swap uptime, write_http JSON to a loopback receiver",
                interval.as_secs_f64()
            ),
        });
    }

    // Warm up: every contender has delivered at least twice.
    let warm = wait_for(Duration::from_secs(15), || {
        contenders.iter().all(|c| c.feed.counts().0 >= 2)
    });
    for c in contenders.iter_mut() {
        c.proc.check_alive()?;
        if !warm && c.feed.counts().0 < 2 {
            return Err(format!("{} delivered nothing within 15 s", c.label).into());
        }
    }
    std::thread::sleep(interval * 5);

    let n = contenders.len();
    let snap = |cs: &[Contender]| -> Vec<(u64, u64, u64, Instant)> {
        cs.iter()
            .map(|c| {
                let (s, b) = c.feed.counts();
                (process_cpu_ns(c.proc.pid()), s, b, Instant::now())
            })
            .collect()
    };
    let first = snap(&contenders);
    let started = Instant::now();
    let mut prev = first.clone();
    let mut slice_us: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut phases: Vec<Vec<f64>> = vec![Vec::new(); n];
    for k in 1..=slices {
        let until = started + slice * k;
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
        let now = snap(&contenders);
        for i in 0..n {
            let per = per_sample(&contenders[i], &prev[i], &now[i], interval);
            slice_us[i].push(per.0);
            let at = contenders[i].feed.last_at_ns() % interval.as_nanos() as u64;
            phases[i].push(at as f64 / 1e6);
        }
        prev = now;
        eprint!(" {}/{slices}", k);
    }
    eprintln!();
    let run = started.elapsed();
    let mut rows = Vec::new();
    for (i, c) in contenders.iter_mut().enumerate() {
        c.proc.check_alive()?;
        let (cpu_us, samples, bytes) = per_sample(c, &first[i], &prev[i], interval);
        let (rss, threads) = rss_and_threads(c.proc.pid());
        let note = match &c.feed {
            Feed::Scraped(s) if s.failures.load(Ordering::SeqCst) > 0 => {
                format!("{} scrapes failed", s.failures.load(Ordering::SeqCst))
            }
            Feed::Pushed(_) if c.label.starts_with("collectd") => {
                "per interval (its POSTs batch values)".into()
            }
            _ => String::new(),
        };
        rows.push(Row {
            label: c.label.clone(),
            shown: c.shown.clone(),
            samples,
            cpu_us,
            slices: slice_us[i].clone(),
            rss_kib: rss,
            threads,
            bytes_per_sample: bytes,
            phase_ms: {
                let p = &mut phases[i];
                p.sort_by(|a, b| a.total_cmp(b));
                p.get(p.len() / 2).copied().unwrap_or(0.0)
            },
            note,
        });
    }
    drop(contenders);
    Ok(Deployed {
        rows,
        interval,
        run,
        slice,
    })
}

/// CPU µs per sample, samples, body bytes per sample between two snapshots.
/// collectd batches its values into POSTs as its buffer fills, so its
/// "sample" is one interval.
fn per_sample(
    c: &Contender,
    a: &(u64, u64, u64, Instant),
    b: &(u64, u64, u64, Instant),
    interval: Duration,
) -> (f64, u64, f64) {
    let cpu = b.0.saturating_sub(a.0) as f64 / 1000.0;
    let mut samples = b.1.saturating_sub(a.1);
    if c.label.starts_with("collectd") {
        samples = (b.3.duration_since(a.3).as_secs_f64() / interval.as_secs_f64()).round() as u64;
    }
    let bytes = b.2.saturating_sub(a.2) as f64;
    let s = samples.max(1) as f64;
    (cpu / s, samples, bytes / s)
}

fn collectd_conf(dir: &Path, url: &str, interval: Duration) -> String {
    let d = dir.display();
    format!(
        r#"Interval {interval}
BaseDir "{d}"
PIDFile "{d}/collectd.pid"
PluginDir "{COLLECTD_PLUGINS}"
TypesDB "{COLLECTD_TYPES}"
FQDNLookup false
LoadPlugin cpu
LoadPlugin memory
LoadPlugin load
LoadPlugin interface
LoadPlugin disk
LoadPlugin df
LoadPlugin processes
LoadPlugin swap
LoadPlugin uptime
LoadPlugin write_http
<Plugin interface>
  Interface "lo"
  IgnoreSelected true
</Plugin>
<Plugin df>
  MountPoint "/"
</Plugin>
<Plugin write_http>
  <Node "bench">
    URL "{url}"
    Format "JSON"
  </Node>
</Plugin>
"#,
        interval = interval.as_secs_f64()
    )
}

fn collectd_version() -> String {
    // `collectd -h` prints the version on its last line.
    Command::new(COLLECTD)
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&[o.stdout, o.stderr].concat()).to_string();
            text.lines().find_map(|l| {
                l.split_whitespace().find(|w| w.starts_with("5.")).map(|w| {
                    w.trim_end_matches([',', '.'])
                        .trim_end_matches(".git")
                        .to_string()
                })
            })
        })
        .unwrap_or_default()
}

/// The static musl agent and floor probe of this checkout, built when missing.
pub fn musl_binaries(target_dir: &Path, profile: &str) -> Res<(PathBuf, PathBuf)> {
    let dir = target_dir.join("x86_64-unknown-linux-musl").join(profile);
    let agent = dir.join("guest-agent");
    let floor = dir.join("examples").join("floor_probe");
    // Always asked for: cargo rebuilds only what changed, and a stale agent
    // would measure the wrong code.
    {
        eprintln!(
            "building the static musl agent and floor probe (cargo build --target x86_64-unknown-linux-musl --bin guest-agent --example floor_probe) ..."
        );
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "--target", "x86_64-unknown-linux-musl"])
            .args(["--bin", "guest-agent", "--example", "floor_probe"])
            .arg("--target-dir")
            .arg(target_dir);
        if profile == "release" {
            cmd.arg("--release");
        }
        let st = cmd.status()?;
        if !st.success() {
            return Err("building the static musl binaries failed".into());
        }
    }
    Ok((agent, floor))
}
