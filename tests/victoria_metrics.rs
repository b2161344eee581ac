//! End to end with a real VictoriaMetrics (Debian's `victoria-metrics`) on
//! 127.0.0.1: the agent pushes Influx line protocol to `/write`, and what
//! VictoriaMetrics stored is read back through `/api/v1/export` and
//! `/api/v1/query` and compared with the samples the agent collected.
//!
//! Without `/usr/bin/victoria-metrics` the test is skipped, except under
//! `CI=true`, where it fails and says which package to install.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, wait_until};
use guest_agent::Sample;
use guest_agent::agent;

const VICTORIA_METRICS: &str = "/usr/bin/victoria-metrics";

/// True when VictoriaMetrics is installed; otherwise skips (prints why) or,
/// under `CI=true`, fails.
fn victoria_metrics_installed() -> bool {
    if Path::new(VICTORIA_METRICS).exists() {
        return true;
    }
    let why = format!(
        "{VICTORIA_METRICS} is missing: install the victoria-metrics package \
         (apt-get install victoria-metrics)"
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("skipping: {why}");
    false
}

/// A VictoriaMetrics process listening on 127.0.0.1 only, storing into a
/// fresh directory; killed and its directory removed on drop (panics too).
struct VictoriaMetrics {
    child: Child,
    dir: PathBuf,
    port: u16,
    http: ureq::Agent,
}

impl VictoriaMetrics {
    fn start() -> VictoriaMetrics {
        // The port is found by binding 127.0.0.1:0 and released before
        // VictoriaMetrics binds it: another process may take it in between,
        // so a start that fails to bind is tried again on a new port.
        let mut last_log = String::new();
        for attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let dir = std::env::temp_dir().join(format!(
                "guest-agent-vm-{}-{port}-{attempt}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let log = File::create(dir.join("victoria-metrics.log")).unwrap();
            let child = Command::new(VICTORIA_METRICS)
                .arg(format!("-httpListenAddr=127.0.0.1:{port}"))
                .arg(format!("-storageDataPath={}", dir.join("data").display()))
                .arg("-retentionPeriod=1d")
                .arg("-loggerLevel=WARN")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start victoria-metrics");
            let mut vm = VictoriaMetrics {
                child,
                dir,
                port,
                http: ureq::Agent::config_builder()
                    .proxy(None)
                    .timeout_global(Some(Duration::from_secs(10)))
                    .http_status_as_error(false)
                    .build()
                    .into(),
            };
            match vm.wait_healthy() {
                Ok(()) => return vm,
                Err(log) => last_log = log,
            }
            // Dropping `vm` kills it and removes its directory.
        }
        panic!("victoria-metrics did not start in 5 attempts; last log:\n{last_log}");
    }

    /// Polls `/health` until it answers `OK`; `Err(log)` if the process
    /// exited (a port taken in between), panics after the deadline.
    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, body)) = self.get("/health", &[])
                && body.trim() == "OK"
            {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}:\n{}", self.log()));
            }
            assert!(
                Instant::now() < deadline,
                "victoria-metrics not healthy after 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("victoria-metrics.log")).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// GET `path` with `query` pairs (URL-encoded here): status and body.
    fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<(u16, String), ureq::Error> {
        let mut req = self.http.get(self.url(path));
        for (k, v) in query {
            req = req.query(*k, *v);
        }
        let mut resp = req.call()?;
        let status = resp.status().as_u16();
        Ok((status, resp.body_mut().read_to_string()?))
    }

    /// `GET /api/v1/export` of `selector`: one JSON object per series.
    fn export(&self, selector: &str) -> Vec<serde_json::Value> {
        let (status, body) = self
            .get("/api/v1/export", &[("match[]", selector)])
            .expect("export");
        assert_eq!(status, 200, "export {selector}: {body}");
        body.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("export line is JSON"))
            .collect()
    }

    /// `GET /api/v1/query` of `query` at `time` (seconds): the result vector.
    ///
    /// `nocache=1`: otherwise a `time` within `-search.latencyOffset` of now
    /// (30 s by default, and never less than 1 s in this version) is moved
    /// back to `now - latencyOffset`, hiding the newest points.
    fn query(&self, query: &str, time: &str) -> Vec<serde_json::Value> {
        let (status, body) = self
            .get(
                "/api/v1/query",
                &[("query", query), ("time", time), ("nocache", "1")],
            )
            .expect("query");
        assert_eq!(status, 200, "query {query}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{body}");
        v["data"]["result"].as_array().unwrap().clone()
    }
}

impl Drop for VictoriaMetrics {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PromQL string literal for `v`.
fn promql_string(v: &str) -> String {
    format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The one series an export returned for a metric: its labels, and its
/// points as timestamp (ms) → value.
fn one_series(vm: &VictoriaMetrics, selector: &str) -> (serde_json::Value, BTreeMap<u64, f64>) {
    let series = vm.export(selector);
    assert_eq!(series.len(), 1, "{selector}: {series:?}");
    let s = &series[0];
    let ts = s["timestamps"].as_array().unwrap();
    let vs = s["values"].as_array().unwrap();
    assert_eq!(ts.len(), vs.len());
    let points: BTreeMap<u64, f64> = ts
        .iter()
        .zip(vs)
        .map(|(t, v)| (t.as_u64().unwrap(), v.as_f64().unwrap()))
        .collect();
    assert_eq!(points.len(), ts.len(), "duplicate timestamps: {s}");
    (s["metric"].clone(), points)
}

/// Runs the agent against `vm` with `vm_id` until `at_least` samples are
/// delivered, then stops it (flushing), and checks that VictoriaMetrics holds
/// exactly the samples the agent collected, with the agent's values.
fn push_and_compare(vm: &VictoriaMetrics, vm_id: &str, at_least: u64) {
    let url = vm.url("/write");
    // The live /proc, so that CPU figures change from sample to sample.
    let a = agent::start(config(&[
        ("url", &url),
        ("format", "influx"),
        ("interval", "200ms"),
        ("vm_id", vm_id),
        ("proc_root", "/proc"),
        // Generous, so that a slow answer on a busy host is not retried
        // (which would store a batch twice).
        ("timeout", "10s"),
    ]))
    .unwrap();
    // Every sample the agent produced that this thread saw, by seq (on a busy
    // host some may pass unseen; those are still checked through `seq`).
    let mut seen: BTreeMap<u64, Arc<Sample>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.health().delivered < at_least {
        if let Some(s) = a.latest() {
            seen.insert(s.seq, s);
        }
        assert!(
            Instant::now() < deadline,
            "{vm_id}: {:?} after 60 s\n{}",
            a.health(),
            vm.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let last = a.latest().unwrap();
    seen.insert(last.seq, last.clone());
    let st = a.stop();
    assert_eq!(st.buffered, 0, "flushed at stop: {st:?}");
    assert_eq!(st.rejected, 0, "{st:?}");
    // Every collected sample was delivered, once (no retries against a
    // healthy VictoriaMetrics).
    assert_eq!(Some(st.delivered), st.last_seq, "{st:?}");
    let last = seen.get(&st.last_seq.unwrap_or(0)).cloned().unwrap_or(last);
    let n = last.seq as usize;

    // Written rows become searchable after VictoriaMetrics flushes them
    // (about a second, longer for a new series): poll until all are there.
    let _ = vm.get("/internal/force_flush", &[]);
    let id = promql_string(vm_id);
    let cpu_sel = format!("guest_cpu_usage_percent{{vm_id={id}}}");
    let mem_sel = format!("guest_memory_total_kb{{vm_id={id}}}");
    let seq_sel = format!("guest_seq{{vm_id={id}}}");
    wait_until(60, "every sample exported", || {
        [&cpu_sel, &mem_sel, &seq_sel].iter().all(|sel| {
            vm.export(sel)
                .first()
                .is_some_and(|s| s["timestamps"].as_array().unwrap().len() >= n)
        })
    });

    let hostname = last.hostname.clone().expect("hostname");
    let (labels, cpu) = one_series(vm, &cpu_sel);
    assert_eq!(
        labels,
        serde_json::json!({
            "__name__": "guest_cpu_usage_percent",
            "vm_id": vm_id,
            "hostname": hostname,
        })
    );
    let (labels, mem) = one_series(vm, &mem_sel);
    assert_eq!(labels["hostname"], hostname.as_str());
    assert_eq!(labels["vm_id"], vm_id);
    let (_, seqs) = one_series(vm, &seq_sel);

    // Exactly one point per collected sample: seq 1..=n, at one timestamp each.
    assert_eq!(cpu.len(), n);
    assert_eq!(mem.len(), n);
    let by_seq: BTreeMap<u64, u64> = seqs.iter().map(|(&t, &s)| (s as u64, t)).collect();
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=n as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        cpu.keys().collect::<Vec<_>>(),
        seqs.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        mem.keys().collect::<Vec<_>>(),
        seqs.keys().collect::<Vec<_>>()
    );
    // MemTotal does not change: every exported point holds it exactly.
    let total = last.memory_total_kb.unwrap();
    assert!(
        mem.values().all(|&v| v == total as f64),
        "{mem:?} vs {total}"
    );
    assert!(cpu.values().all(|v| (0.0..=100.0).contains(v)), "{cpu:?}");
    // Each sample the agent produced is stored at its own timestamp (ms),
    // with its own values.
    assert!(seen.len() >= 3, "saw only {:?}", seen.keys());
    for (seq, s) in &seen {
        assert_eq!(by_seq[seq], s.timestamp_ms, "seq {seq}: timestamp");
        assert_eq!(
            cpu[&s.timestamp_ms],
            s.cpu_usage_percent.unwrap(),
            "seq {seq}: cpu_usage_percent"
        );
        assert_eq!(
            mem[&s.timestamp_ms],
            s.memory_total_kb.unwrap() as f64,
            "seq {seq}: memory_total_kb"
        );
    }
    let distinct_cpu: std::collections::BTreeSet<u64> = seen
        .values()
        .map(|s| s.cpu_usage_percent.unwrap().to_bits())
        .collect();

    // The README's PromQL, at the last sample's time, gives its value.
    // VictoriaMetrics turns `time` (float seconds) into ms by truncating
    // `secs * 1e3`, so "….123" may become ….122 and miss the point: half a
    // millisecond more lands on the right ms.
    let time = format!(
        "{}.{:03}5",
        last.timestamp_ms / 1000,
        last.timestamp_ms % 1000
    );
    let result = vm.query(
        &format!("avg by (vm_id) (guest_cpu_usage_percent{{vm_id={id}}})"),
        &time,
    );
    assert_eq!(result.len(), 1, "{result:?}");
    assert_eq!(result[0]["metric"], serde_json::json!({ "vm_id": vm_id }));
    let value: f64 = result[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert_eq!(value, last.cpu_usage_percent.unwrap(), "at {time}: {cpu:?}");

    println!(
        "{vm_id:?}: {n} samples stored and exported; {} compared value by value \
         ({} distinct cpu_usage_percent values), memory_total_kb {total} on all",
        seen.len(),
        distinct_cpu.len()
    );
}

#[test]
fn influx_pushes_land_in_victoria_metrics_with_the_agents_values() {
    if !victoria_metrics_installed() {
        return;
    }
    let vm = VictoriaMetrics::start();
    push_and_compare(&vm, "vm-vm1", 6);
    // Spaces, commas and equals signs must be escaped in line protocol tags.
    push_and_compare(&vm, "vm-7.a_b~c", 6);
}
