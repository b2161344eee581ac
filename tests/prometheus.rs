//! The Prometheus exposition of `/metrics` against Prometheus' own tools
//! (docs/backends.md#prometheus): `promtool check metrics` reads it, and a
//! real Prometheus server (Debian's `prometheus`) scrapes the agent on
//! 127.0.0.1 while the top row of the "Node Exporter Full" dashboard is
//! asked of it in PromQL and compared with the agent's own figures.
//!
//! The agent reads the real `/proc` here (a fixture's counters never move).
//! Without the Debian packages the tests are skipped, except under
//! `CI=true`, where they fail and say which package to install.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{config, wait_until};
use guest_agent::{Sample, agent};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

/// Prometheus' own scrape `Accept` header (2.x).
const SCRAPE_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// True when `path` exists; otherwise skips (saying why) or, under
/// `CI=true`, fails.
fn installed(path: &str) -> bool {
    if Path::new(path).exists() {
        return true;
    }
    let why = format!("{path} is missing: apt-get install prometheus");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("skipping: {why}");
    false
}

/// An agent on the real `/proc` with its listener on a free loopback port.
fn start_agent() -> (agent::Running, SocketAddr) {
    let a = agent::start(config(&[
        ("url", "off"),
        ("listen", "127.0.0.1:0"),
        ("interval", "1s"),
        ("proc_root", "/proc"),
    ]))
    .unwrap();
    let addr = a.listen_addr().unwrap();
    wait_until(30, "two samples", || a.health().last_seq >= Some(2));
    (a, addr)
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// `GET /metrics` with `accept` (none when `None`): status, type, body.
fn metrics(addr: SocketAddr, accept: Option<&str>) -> (u16, String, String) {
    let mut req = http().get(format!("http://{addr}/metrics"));
    if let Some(a) = accept {
        req = req.header("Accept", a);
    }
    let mut r = req.call().unwrap();
    let ty = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = r.body_mut().read_to_string().unwrap();
    (r.status().as_u16(), ty, body)
}

#[test]
fn the_exposition_passes_promtool_and_json_stays_for_everyone_else() {
    if !installed(PROMTOOL) {
        return;
    }
    let (a, addr) = start_agent();
    let (status, ty, body) = metrics(addr, Some(SCRAPE_ACCEPT));
    assert_eq!(status, 200);
    assert_eq!(ty, "text/plain; version=0.0.4; charset=utf-8");
    let mut child = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let lint = String::from_utf8_lossy(&out.stderr).into_owned();
    // Exit 1 is an exposition promtool cannot read; 3 is naming advice.
    // The only advice allowed is against node_exporter's own camelCase
    // memory names (node_memory_MemTotal_bytes ...), which dashboards
    // query by those names and node_exporter itself exposes.
    match out.status.code() {
        Some(0) => {}
        Some(3) => {
            for line in lint.lines() {
                assert!(
                    line.starts_with("node_memory_")
                        && line.ends_with(
                            "metric names should be written in 'snake_case' not 'camelCase'"
                        ),
                    "promtool: {line}"
                );
            }
        }
        other => panic!("promtool exited {other:?}: {lint}"),
    }
    // Today's pulling manager, curl and a JSON client still get the sample.
    for accept in [None, Some("*/*"), Some("application/json")] {
        let (status, ty, body) = metrics(addr, accept);
        assert_eq!(
            (status, ty.as_str()),
            (200, "application/json"),
            "{accept:?}"
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        Sample::from_json_strict(&v).unwrap();
    }
    a.stop();
}

/// A Prometheus server on a free 127.0.0.1 port, scraping `target` every
/// second into a fresh directory; killed and removed on drop (panics too).
struct Prometheus {
    child: Child,
    _dir: tempfile::TempDir,
    port: u16,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("prometheus.yml");
        std::fs::write(
            &conf,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: guest-agent\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        // The port is found by binding 127.0.0.1:0 and released before
        // Prometheus binds it: another process may take it in between, so
        // a start that never answers is tried again on a new port.
        let mut logs = String::new();
        for attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let log_path = dir.path().join(format!("log-{attempt}"));
            let log = std::fs::File::create(&log_path).unwrap();
            let mut child = Command::new(PROMETHEUS)
                .arg(format!("--config.file={}", conf.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join(format!("data-{attempt}")).display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start prometheus");
            let ready = (0..600).any(|_| {
                if child.try_wait().ok().flatten().is_some() {
                    return false;
                }
                let ok = http()
                    .get(format!("http://127.0.0.1:{port}/-/ready"))
                    .call()
                    .is_ok_and(|r| r.status() == 200);
                if !ok {
                    std::thread::sleep(Duration::from_millis(100));
                }
                ok
            });
            if ready {
                return Prometheus {
                    child,
                    _dir: dir,
                    port,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            logs.push_str(&std::fs::read_to_string(&log_path).unwrap_or_default());
        }
        panic!("prometheus never became ready:\n{logs}");
    }

    /// The value of `query` at `time` (seconds since the epoch); `None`
    /// while it has no result.
    fn query(&self, query: &str, time: f64) -> Option<f64> {
        let mut r = http()
            .get(format!("http://127.0.0.1:{}/api/v1/query", self.port))
            .query("query", query)
            .query("time", format!("{time:.3}"))
            .call()
            .ok()?;
        let v: serde_json::Value =
            serde_json::from_str(&r.body_mut().read_to_string().ok()?).ok()?;
        assert_eq!(v["status"], "success", "{query}: {v}");
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn a_real_prometheus_scrapes_the_agent_and_the_dashboard_agrees_with_it() {
    if !installed(PROMETHEUS) {
        return;
    }
    let (a, addr) = start_agent();
    let prometheus = Prometheus::start(addr);

    // A steady load, so that the CPU busy share is neither 0 nor noise.
    let stop = Arc::new(AtomicBool::new(false));
    let spinner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut x = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        })
    };
    // The agent's samples as they come, to compare over the same window.
    let mut samples: Vec<Arc<Sample>> = Vec::new();
    let up = "up{job=\"guest-agent\"}";
    wait_until(60, "a successful scrape", || {
        prometheus.query(up, now()) == Some(1.0)
    });
    let started = now();
    while now() < started + 15.0 {
        if let Some(s) = a.latest()
            && samples.last().is_none_or(|l| l.seq != s.seq)
        {
            samples.push(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let at = now();
    stop.store(true, Ordering::Relaxed);
    spinner.join().unwrap();
    let q = |expr: &str| {
        prometheus
            .query(expr, at)
            .unwrap_or_else(|| panic!("no result for {expr}"))
    };

    // CPU Busy, as the dashboard's current version asks it.
    let busy =
        q("100 * (1 - avg(rate(node_cpu_seconds_total{mode=\"idle\",job=\"guest-agent\"}[10s])))");
    // The agent's own: busy + iowait + steal is what is not idle, over
    // the samples whose windows fall in those 10 seconds.
    let window: Vec<f64> = samples
        .iter()
        .filter(|s| {
            let t = s.timestamp_ms as f64 / 1000.0;
            t > at - 10.0 && t <= at
        })
        .map(|s| {
            s.cpu_usage_percent.unwrap()
                + s.cpu_iowait_percent.unwrap()
                + s.cpu_steal_percent.unwrap()
        })
        .collect();
    assert!(window.len() >= 5, "{} samples in the window", window.len());
    let ours = window.iter().sum::<f64>() / window.len() as f64;
    println!(
        "CPU busy: dashboard {busy:.2} %, agent {ours:.2} % over {} samples",
        window.len()
    );
    assert!(
        (busy - ours).abs() <= 5.0,
        "dashboard {busy} vs agent {ours}"
    );

    let last = samples.last().unwrap();
    let cores = q("count(count(node_cpu_seconds_total{job=\"guest-agent\"}) by (cpu))");
    assert_eq!(cores, f64::from(last.cpu_count.unwrap()));
    let ram = q(
        "100 - ((node_memory_MemAvailable_bytes{job=\"guest-agent\"} * 100) / node_memory_MemTotal_bytes{job=\"guest-agent\"})",
    );
    let ram_total = q("node_memory_MemTotal_bytes{job=\"guest-agent\"}");
    // The dashboard divides by MemTotal as the kernel counts it, a
    // deflate-on-OOM balloon included (docs/design.md#memory-under-a-balloon);
    // with no balloon inflated that is the agent's own percentage.
    let available = (last.memory_available_kb.unwrap() * 1024) as f64;
    let dashboard = 100.0 - available * 100.0 / ram_total;
    assert!((ram - dashboard).abs() <= 2.0, "RAM used {ram} vs {last:?}");
    if last.memory_balloon_kb.unwrap_or(0) == 0 {
        assert!(
            (ram - last.memory_usage_percent.unwrap()).abs() <= 2.0,
            "RAM used {ram} vs {last:?}"
        );
    }
    let uptime =
        q("node_time_seconds{job=\"guest-agent\"} - node_boot_time_seconds{job=\"guest-agent\"}");
    assert!(
        (uptime - last.uptime_seconds.unwrap() as f64).abs() <= 5.0,
        "uptime {uptime}"
    );
    let root_used = q(
        "100 - ((node_filesystem_avail_bytes{job=\"guest-agent\",mountpoint=\"/\",fstype!=\"rootfs\"} * 100) / node_filesystem_size_bytes{job=\"guest-agent\",mountpoint=\"/\",fstype!=\"rootfs\"})",
    );
    let st = rustix::fs::statvfs("/").unwrap();
    let by_test = 100.0 - st.f_bavail as f64 * 100.0 / st.f_blocks as f64;
    assert!(
        (root_used - by_test).abs() <= 1.0,
        "root FS used {root_used} vs {by_test}"
    );
    let usable = q("guest_agent_memory_usable_bytes{job=\"guest-agent\"}");
    assert_eq!(usable, (last.memory_total_kb.unwrap() * 1024) as f64);
    // MemTotal counts a deflate-on-OOM balloon; the usable total does not.
    let balloon = (last.memory_balloon_kb.unwrap_or(0) * 1024) as f64;
    assert!(
        ram_total == usable || ram_total == usable + balloon,
        "RAM total {ram_total} vs usable {usable} and balloon {balloon}"
    );
    let load = q(
        "avg(node_load1{job=\"guest-agent\"}) / count(count(node_cpu_seconds_total{job=\"guest-agent\"}) by (cpu)) * 100",
    );
    assert!(load.is_finite() && load >= 0.0, "{load}");
    println!(
        "dashboard top row: cores {cores}, RAM used {ram:.1} %, uptime {uptime:.0} s, root FS used {root_used:.1} %, load1/cores {load:.0} %"
    );
    a.stop();
}
