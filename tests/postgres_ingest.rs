//! examples/postgres_ingest.rs against a real PostgreSQL started here
//! (examples/support/postgres.rs): the real agent pushes into it, the route
//! is killed and restarted, PostgreSQL is killed and restarted, and bodies
//! it must refuse are refused; every check reads what the database holds.
//!
//! Without PostgreSQL's programs the tests are skipped, except under
//! `CI=true`, where they fail and name the package to install.

mod common;

#[allow(dead_code)]
#[path = "../examples/postgres_ingest.rs"]
mod postgres_ingest;

#[allow(dead_code)]
#[path = "../examples/support/postgres.rs"]
mod pg;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::{AgentProcess, wait_until};
use guest_agent::Sample;
use pg::PgServer;
use postgres_ingest::{AppState, Settings, Stats};
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};

/// PostgreSQL's programs, or `None` after printing why the test skips;
/// under `CI=true` a missing server fails the test.
fn postgres_bin() -> Option<PathBuf> {
    if let Some(dir) = pg::bin_dir() {
        return Some(dir);
    }
    let why = format!(
        "PostgreSQL's initdb, postgres and pg_isready are missing: install the {} package \
         (apt-get install {}) or set GUEST_AGENT_PG_BIN",
        pg::PACKAGE,
        pg::PACKAGE
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("skipping: {why}");
    None
}

/// A fresh cluster, or `None` (skipped).
fn postgres() -> Option<PgServer> {
    let bin = postgres_bin()?;
    Some(PgServer::start_new(&bin, &[]).unwrap_or_else(|e| panic!("{e}")))
}

/// The example's route on its own runtime thread, as a manager process
/// would run it. Stopping it drops the runtime: open connections and
/// transactions in flight are cut as a killed process cuts them, and
/// nothing of it survives into the next start but the database.
struct Route {
    addr: SocketAddr,
    state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Route {
    /// Migrates and serves on `addr` (port 0 for a free one).
    fn start(addr: SocketAddr, database_url: &str) -> Route {
        Route::start_with(addr, database_url, Route::settings(), None)
    }

    /// [`Route::start`], requiring pushes signed under these master keys.
    fn start_keyed(
        addr: SocketAddr,
        database_url: &str,
        keys: Option<guest_agent::ingest::Verifier>,
    ) -> Route {
        Route::start_with(addr, database_url, Route::settings(), keys)
    }

    /// The settings of [`Route::start`]: a short Retry-After.
    fn settings() -> Settings {
        Settings {
            retry_after_secs: 1,
            ..Settings::default()
        }
    }

    /// [`Route::start`] with these settings and, if given, master keys.
    fn start_with(
        addr: SocketAddr,
        database_url: &str,
        settings: Settings,
        keys: Option<guest_agent::ingest::Verifier>,
    ) -> Route {
        // Coming back on the port the agent targets: std sets SO_REUSEADDR,
        // so the old connections' TIME_WAIT does not block the bind.
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let url = database_url.to_string();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                postgres_ingest::migrate(&url).await.unwrap();
                let pool = postgres_ingest::pool(&url, 4).unwrap();
                let mut state = AppState::start(pool, settings).await.unwrap();
                if let Some(keys) = keys {
                    state = state.with_keys(keys);
                }
                let app = postgres_ingest::router(state.clone());
                ready_tx.send(state).unwrap();
                let l = tokio::net::TcpListener::from_std(listener).unwrap();
                tokio::select! {
                    served = axum::serve(l, app) => served.unwrap(),
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime drops every connection task mid-flight.
            drop(rt);
        });
        let state = ready_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the route migrated and started within 120 s");
        Route {
            addr,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/v1/guest-metrics", self.addr)
    }

    fn stats(&self) -> &Stats {
        self.state.stats()
    }

    /// Kills the route (its runtime and pool); the port is free afterwards.
    fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("the route's thread ended cleanly");
        }
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The test's own view of the database, on its own runtime.
struct Db {
    rt: tokio::runtime::Runtime,
    pool: PgPool,
}

/// A row of `metrics.guest_samples`.
struct Stored {
    run_id: String,
    seq: i64,
    recorded_ms: i64,
    sample: Sample,
    raw: serde_json::Value,
}

/// A row of `metrics.vm_metrics`.
#[derive(Debug, PartialEq)]
struct Metrics {
    vm_id: String,
    recorded_ms: i64,
    cpu_usage_percent: Option<f64>,
    memory_usage_percent: Option<f64>,
    memory_used_kb: Option<i64>,
    memory_total_kb: Option<i64>,
    load_average: Option<f64>,
}

impl Db {
    fn connect(url: &str) -> Db {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let pool = rt
            .block_on(
                PgPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect(url),
            )
            .unwrap();
        Db { rt, pool }
    }

    fn samples(&self, vm_id: &str) -> Vec<Stored> {
        let rows = self
            .rt
            .block_on(
                sqlx::query(
                    "SELECT run_id, seq, \
                     (extract(epoch FROM recorded_at) * 1000)::bigint AS ms, sample::text AS sample \
                     FROM metrics.guest_samples WHERE vm_id = $1::uuid ORDER BY run_id, seq",
                )
                .bind(vm_id)
                .fetch_all(&self.pool),
            )
            .unwrap();
        rows.iter()
            .map(|r| {
                let text: String = r.get("sample");
                Stored {
                    run_id: r.get("run_id"),
                    seq: r.get("seq"),
                    recorded_ms: r.get("ms"),
                    sample: serde_json::from_str(&text).unwrap(),
                    raw: serde_json::from_str(&text).unwrap(),
                }
            })
            .collect()
    }

    fn seqs(&self, vm_id: &str) -> Vec<i64> {
        self.samples(vm_id).iter().map(|s| s.seq).collect()
    }

    fn metrics(&self, vm_id: &str) -> Vec<Metrics> {
        let rows = self
            .rt
            .block_on(
                sqlx::query(
                    "SELECT vm_id::text AS vm_id, \
                     (extract(epoch FROM recorded_at) * 1000)::bigint AS ms, \
                     cpu_usage_percent, memory_usage_percent, memory_used_kb, memory_total_kb, \
                     load_average FROM metrics.vm_metrics WHERE vm_id = $1::uuid ORDER BY recorded_at",
                )
                .bind(vm_id)
                .fetch_all(&self.pool),
            )
            .unwrap();
        rows.iter()
            .map(|r| Metrics {
                vm_id: r.get("vm_id"),
                recorded_ms: r.get("ms"),
                cpu_usage_percent: r.get("cpu_usage_percent"),
                memory_usage_percent: r.get("memory_usage_percent"),
                memory_used_kb: r.get("memory_used_kb"),
                memory_total_kb: r.get("memory_total_kb"),
                load_average: r.get("load_average"),
            })
            .collect()
    }

    fn count(&self, sql: &str) -> i64 {
        self.rt
            .block_on(sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.pool))
            .unwrap()
    }

    /// Rows in both tables, all VMs.
    fn totals(&self) -> (i64, i64) {
        (
            self.count("SELECT count(*) FROM metrics.guest_samples"),
            self.count("SELECT count(*) FROM metrics.vm_metrics"),
        )
    }
}

/// What one agent run left in the database: every seq from 1 to the last
/// exactly once in each table, and each vm_metrics row equal to its sample.
/// Returns the last seq.
fn assert_complete_run(db: &Db, vm_id: &str) -> i64 {
    let samples = db.samples(vm_id);
    let metrics = db.metrics(vm_id);
    assert!(!samples.is_empty(), "no samples stored for {vm_id}");
    let run = &samples[0].run_id;
    assert!(
        samples.iter().all(|s| &s.run_id == run),
        "one agent run only"
    );
    let seqs: Vec<i64> = samples.iter().map(|s| s.seq).collect();
    let last = *seqs.last().unwrap();
    assert_eq!(
        seqs,
        (1..=last).collect::<Vec<_>>(),
        "every seq from 1 to {last}, each once"
    );
    // vm_metrics has no unique key: a resend stored twice would show here.
    assert_eq!(
        metrics.len(),
        samples.len(),
        "one vm_metrics row per stored sample"
    );
    let by_time: HashMap<i64, &Metrics> = metrics.iter().map(|m| (m.recorded_ms, m)).collect();
    assert_eq!(by_time.len(), metrics.len(), "distinct sample times");
    for s in &samples {
        let expected = Metrics {
            vm_id: vm_id.to_string(),
            recorded_ms: s.sample.timestamp_ms as i64,
            cpu_usage_percent: s.sample.cpu_usage_percent,
            memory_usage_percent: s.sample.memory_usage_percent,
            memory_used_kb: s.sample.memory_used_kb.map(|v| v as i64),
            memory_total_kb: s.sample.memory_total_kb.map(|v| v as i64),
            load_average: s.sample.load_average,
        };
        assert_eq!(s.recorded_ms, expected.recorded_ms, "seq {}", s.seq);
        assert_eq!(s.sample.seq as i64, s.seq);
        assert_eq!(by_time.get(&expected.recorded_ms), Some(&&expected));
    }
    last
}

/// POSTs `body`: the status, the `Retry-After` header, the JSON answer.
fn post(url: &str, body: &[u8]) -> (u16, Option<String>, serde_json::Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(body)
        .unwrap();
    let retry_after = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = r.body_mut().read_to_vec().unwrap();
    (
        r.status().as_u16(),
        retry_after,
        serde_json::from_slice(&text).unwrap_or_default(),
    )
}

/// The fixture's `MemTotal`, in KiB: what the agent's samples must carry.
fn fixture_mem_total_kb() -> i64 {
    let meminfo = std::fs::read_to_string(format!("{}/meminfo", common::fixture_root())).unwrap();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn start_agent(url: &str, vm_id: &str) -> AgentProcess {
    AgentProcess::start(&["--url", url, "--interval", "200ms", "--vm-id", vm_id])
}

#[test]
fn the_agents_samples_become_rows_with_their_values() {
    let Some(server) = postgres() else { return };
    let route = Route::start("127.0.0.1:0".parse().unwrap(), &server.url());
    let db = Db::connect(&server.url());
    let vm = "0b7d6a0e-4c1f-4d59-9a55-1f0e6c7b8a01";
    let agent = start_agent(&route.url(), vm);
    wait_until(120, "five samples stored", || db.seqs(vm).len() >= 5);
    let log = agent.terminate(30);
    assert!(!log.contains("manager refused"), "{log}");

    let last = assert_complete_run(&db, vm);
    assert!(last >= 5);
    let samples = db.samples(vm);
    for s in &samples {
        assert_eq!(s.sample.vm_id.as_deref(), Some(vm));
        assert_eq!(
            s.sample.memory_total_kb,
            Some(fixture_mem_total_kb() as u64)
        );
        assert!(s.sample.memory_usage_percent.is_some());
        // The JSONB is the whole sample: every field of the schema.
        for field in guest_agent::sample::FIELDS {
            assert!(s.raw.get(field).is_some(), "seq {}: no {field}", s.seq);
        }
    }
    // The same comparison made by the database itself, on the JSONB.
    let matching = db.count(&format!(
        "SELECT count(*) FROM metrics.vm_metrics m JOIN metrics.guest_samples g \
         ON m.vm_id = g.vm_id AND m.recorded_at = g.recorded_at \
         WHERE m.vm_id = '{vm}' \
         AND m.cpu_usage_percent IS NOT DISTINCT FROM (g.sample->>'cpu_usage_percent')::float8 \
         AND m.memory_usage_percent IS NOT DISTINCT FROM (g.sample->>'memory_usage_percent')::float8 \
         AND m.memory_used_kb IS NOT DISTINCT FROM (g.sample->>'memory_used_kb')::bigint \
         AND m.recorded_at = timestamptz 'epoch' + (g.sample->>'timestamp_ms')::bigint * interval '1 millisecond'"
    ));
    assert_eq!(matching, samples.len() as i64);
    assert_eq!(Stats::get(&route.stats().store_failed), 0);

    // A newer agent's sample: the fields this build cannot read are kept
    // in the JSONB as sent, indentation aside.
    let mut newer = samples[0].raw.clone();
    newer["run_id"] = "newer-agent-run".into();
    newer["gpu_usage_percent"] = 12.5.into();
    newer["restore"] = serde_json::json!({"generation": 2, "at_ms": 1});
    let body = serde_json::to_vec_pretty(&[&newer]).unwrap();
    let (status, _, counts) = post(&route.url(), &body);
    assert_eq!((status, &counts["accepted"]), (200, &1.into()), "{counts}");
    let kept = db
        .samples(vm)
        .into_iter()
        .find(|s| s.run_id == "newer-agent-run")
        .expect("the newer sample is stored");
    assert_eq!(kept.raw, newer);
}

#[test]
fn a_killed_route_comes_back_and_resends_are_stored_once() {
    let Some(server) = postgres() else { return };
    let mut route = Route::start("127.0.0.1:0".parse().unwrap(), &server.url());
    let addr = route.addr;
    let db = Db::connect(&server.url());
    let vm = "2c5e1d7a-8b3f-4e62-b0c4-5d6e7f8a9b02";
    let agent = start_agent(&route.url(), vm);
    wait_until(120, "five samples stored", || db.seqs(vm).len() >= 5);

    route.kill();
    let at_kill = db.seqs(vm).last().copied().unwrap_or(0);
    // The agent keeps collecting and fails to connect meanwhile.
    agent.wait_for_log(120, "push failed");
    route = Route::start(addr, &server.url());
    wait_until(120, "ten more samples after the restart", || {
        db.seqs(vm).last().copied().unwrap_or(0) >= at_kill + 10
    });
    let log = agent.terminate(30);
    assert!(!log.contains("manager refused"), "{log}");
    let last = assert_complete_run(&db, vm);

    // A batch resent after its answer was lost, to a route process that
    // never saw it: the database recognises every pair.
    let first_three: Vec<serde_json::Value> =
        db.samples(vm).into_iter().take(3).map(|s| s.raw).collect();
    let body = serde_json::to_vec(&first_three).unwrap();
    let (status, _, counts) = post(&route.url(), &body);
    assert_eq!(status, 200, "{counts}");
    assert_eq!(
        (&counts["accepted"], &counts["duplicates"]),
        (&0.into(), &3.into())
    );
    route.kill();
    route = Route::start(addr, &server.url());
    let (status, _, counts) = post(&route.url(), &body);
    assert_eq!(
        (status, &counts["duplicates"]),
        (200, &3.into()),
        "{counts}"
    );
    // The same pair with another payload: listed, the first one kept.
    let mut other = first_three[0].clone();
    other["cpu_usage_percent"] = 99.5.into();
    let (status, _, counts) = post(&route.url(), &serde_json::to_vec(&[&other]).unwrap());
    assert_eq!(status, 200);
    assert_eq!(counts["conflicts"][0]["seq"], 1, "{counts}");
    assert_eq!(counts["accepted"], 0);
    assert_ne!(db.samples(vm)[0].sample.cpu_usage_percent, Some(99.5));
    assert_eq!(assert_complete_run(&db, vm), last);
}

#[test]
fn postgres_restarting_mid_run_loses_nothing() {
    let Some(mut server) = postgres() else { return };
    let route = Route::start("127.0.0.1:0".parse().unwrap(), &server.url());
    let db = Db::connect(&server.url());
    let vm = "4e9a3b1c-2d7f-4a80-91b2-6c3d4e5f6a03";
    let agent = start_agent(&route.url(), vm);
    wait_until(120, "five samples stored", || db.seqs(vm).len() >= 5);
    let before = db.seqs(vm).last().copied().unwrap_or(0);

    server.stop();
    let sample = common::once(&["--vm-id", vm, "--proc-root", &common::fixture_root()]);
    let (status, retry_after, answer) =
        post(&route.url(), &serde_json::to_vec(&[&sample]).unwrap());
    assert_eq!(status, 503, "{answer}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(answer["error"].is_string(), "{answer}");
    // The agent's own batches get 503 too, and it keeps them.
    wait_until(120, "the agent's pushes answered 503", || {
        Stats::get(&route.stats().store_failed) >= 3
    });
    server.start().unwrap_or_else(|e| panic!("{e}"));

    wait_until(120, "ten more samples after PostgreSQL is back", || {
        db.seqs(vm).last().copied().unwrap_or(0) >= before + 10
    });
    let log = agent.terminate(30);
    assert!(
        log.contains("push failed"),
        "the agent saw the outage: {log}"
    );
    assert!(!log.contains("manager refused"), "{log}");
    assert_complete_run(&db, vm);
}

#[test]
fn bodies_the_database_cannot_take_are_refused_and_store_nothing() {
    let Some(server) = postgres() else { return };
    let route = Route::start("127.0.0.1:0".parse().unwrap(), &server.url());
    let db = Db::connect(&server.url());

    // The real agent with a VM id that is not a UUID: 422, and it drops
    // the batches (its log says so).
    let agent = start_agent(&route.url(), "vm-not-a-uuid");
    wait_until(120, "two batches refused", || {
        Stats::get(&route.stats().refused) >= 2
    });
    let log = agent.terminate(30);
    assert!(log.contains("with HTTP 422"), "{log}");
    assert_eq!(db.totals(), (0, 0));

    let vm = "6a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c04";
    let good = common::once(&["--vm-id", vm, "--proc-root", &common::fixture_root()]);
    let refused = |samples: &[&serde_json::Value]| {
        let (status, _, answer) = post(&route.url(), &serde_json::to_vec(samples).unwrap());
        assert_eq!(status, 422, "{answer}");
        answer["error"].as_str().unwrap().to_string()
    };
    let mut no_id = good.clone();
    no_id["vm_id"] = serde_json::Value::Null;
    assert!(refused(&[&no_id]).contains("no vm_id"));
    let mut bad = good.clone();
    bad["vm_id"] = "vm-1".into();
    bad["seq"] = 2.into();
    // One bad sample refuses the batch: the good one is not stored either.
    let reason = refused(&[&good, &bad]);
    assert!(
        reason.starts_with("sample 1: ") && reason.contains("not a UUID"),
        "{reason}"
    );
    let mut huge = good.clone();
    huge["memory_used_kb"] = u64::MAX.into();
    assert!(refused(&[&huge]).contains("BIGINT"));
    // Stamped after the partitions made ahead (beyond PostgreSQL's
    // timestamps, here): refused before anything is written.
    let mut far = good.clone();
    far["timestamp_ms"] = (i64::MAX as u64).into();
    far["seq"] = 3.into();
    let reason = refused(&[&good, &far]);
    assert!(
        reason.starts_with("sample 1: ") && reason.contains("ahead of the manager's clock"),
        "{reason}"
    );
    assert_eq!(db.totals(), (0, 0));

    assert_eq!(post(&route.url(), b"[{\"schema\": 1,").0, 400);
    let too_big = vec![b' '; guest_agent::ingest::MAX_BODY + 1];
    assert_eq!(post(&route.url(), &too_big).0, 413);
    assert_eq!(db.totals(), (0, 0));

    // The good sample alone is stored.
    let (status, _, counts) = post(&route.url(), &serde_json::to_vec(&[&good]).unwrap());
    assert_eq!((status, &counts["accepted"]), (200, &1.into()), "{counts}");
    assert_eq!(db.totals(), (1, 1));
}

/// POSTs `body` with `headers`: the status and the JSON answer.
fn post_with(url: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, serde_json::Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.post(url).header("Content-Type", "application/json");
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let mut r = req.send(body).unwrap();
    let text = r.body_mut().read_to_vec().unwrap();
    (
        r.status().as_u16(),
        serde_json::from_slice(&text).unwrap_or_default(),
    )
}

#[test]
fn with_master_keys_only_signed_samples_of_the_signer_become_rows() {
    use guest_agent::ingest::Verifier;
    use guest_agent::sign::{self, Key};
    use std::os::unix::fs::PermissionsExt;

    let Some(server) = postgres() else { return };
    let master = Key::new("k1", [3; 32]).unwrap();
    let route = Route::start_keyed(
        "127.0.0.1:0".parse().unwrap(),
        &server.url(),
        Some(Verifier::from_lines(&master.to_line()).unwrap()),
    );
    let db = Db::connect(&server.url());
    let vm = "5d0c4b7e-1a2b-4c3d-8e9f-0a1b2c3d4e5f";
    let other = "6e1d5c8f-2b3c-4d4e-9f0a-1b2c3d4e5f60";
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("vm.key");
    std::fs::write(&key_file, master.derive(vm).to_line()).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let agent = AgentProcess::start(&[
        "--url",
        &route.url(),
        "--interval",
        "200ms",
        "--vm-id",
        vm,
        "--key-file",
        key_file.to_str().unwrap(),
    ]);
    wait_until(120, "three signed samples stored", || {
        db.seqs(vm).len() >= 3
    });
    let log = agent.terminate(30);
    assert!(
        !log.contains("HTTP 401") && !log.contains("HTTP 403"),
        "{log}"
    );
    assert_complete_run(&db, vm);
    let before = db.totals();

    // Samples of another VM, from the agent's own --once.
    let once = |vm_id: &str, run: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_guest-agent"))
            .args(["--once", "--config", "/nonexistent", "--url", "off"])
            .args(["--vm-id", vm_id, "--proc-root", &common::fixture_root()])
            .output()
            .unwrap();
        let mut s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        s["run_id"] = run.into();
        serde_json::to_vec(&[s]).unwrap()
    };
    let path = "/v1/guest-metrics";
    let key = master.derive(vm);
    let headers = |h: &sign::Headers| {
        [
            ("Content-Digest", h.content_digest.clone()),
            ("Signature-Input", h.signature_input.clone()),
            ("Signature", h.signature.clone()),
        ]
    };
    let send = |h: &[(&str, String); 3], body: &[u8]| {
        let h: Vec<(&str, &str)> = h.iter().map(|(n, v)| (*n, v.as_str())).collect();
        post_with(&route.url(), &h, body)
    };
    // Signed by vm, claiming other: 403.
    let forged = once(other, "forged-run");
    let (status, why) = send(
        &headers(&sign::sign(&key, vm, "POST", path, &forged, 1)),
        &forged,
    );
    assert_eq!(status, 403, "{why}");
    // Changed after signing: 401. Unsigned: 401.
    let mine = once(vm, "raw-run");
    let h = headers(&sign::sign(&key, vm, "POST", path, &mine, 1));
    let mut changed = mine.clone();
    changed.push(b' ');
    assert_eq!(send(&h, &changed).0, 401);
    assert_eq!(post_with(&route.url(), &[], &mine).0, 401);
    assert_eq!(db.totals(), before, "nothing of a refused body is stored");
    assert!(db.seqs(other).is_empty());
    // The same signed request twice: one row.
    assert_eq!(send(&h, &mine).0, 200);
    let (status, counts) = send(&h, &mine);
    assert_eq!(
        (status, &counts["duplicates"]),
        (200, &1.into()),
        "{counts}"
    );
    assert_eq!(db.totals(), (before.0 + 1, before.1 + 1));
}

/// The fixture's sample for `vm`, stamped `timestamp_ms`, as run `run`
/// seq `seq`.
fn sample_at(vm: &str, run: &str, seq: u64, timestamp_ms: i64) -> serde_json::Value {
    let mut s = common::once(&["--vm-id", vm, "--proc-root", &common::fixture_root()]);
    s["run_id"] = run.into();
    s["seq"] = seq.into();
    s["timestamp_ms"] = timestamp_ms.into();
    s
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

const DAY_MS: i64 = 86_400_000;

#[test]
fn a_sample_older_than_the_retention_is_answered_expired_and_not_stored() {
    let Some(server) = postgres() else { return };
    let route = Route::start("127.0.0.1:0".parse().unwrap(), &server.url());
    let db = Db::connect(&server.url());
    let vm = "7b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c05";
    let retention_ms = Settings::default().retention.samples.as_millis() as i64;
    let now = now_ms();
    // One sample a minute older than the retention, one a minute inside it,
    // in the same body: the old one is counted, the other stored.
    let old = sample_at(vm, "run-expired", 1, now - retention_ms - 60_000);
    let kept = sample_at(vm, "run-expired", 2, now - retention_ms + 60_000);
    let (status, _, counts) = post(&route.url(), &serde_json::to_vec(&[&old, &kept]).unwrap());
    assert_eq!(status, 200, "{counts}");
    assert_eq!(
        (
            &counts["accepted"],
            &counts["expired"],
            &counts["duplicates"]
        ),
        (&1.into(), &1.into(), &0.into()),
        "{counts}"
    );
    assert_eq!(db.seqs(vm), vec![2]);
    assert_eq!(db.metrics(vm).len(), 1);
    assert_eq!(Stats::get(&route.stats().expired), 1);
}

#[test]
fn a_resend_across_a_partition_boundary_is_stored_once() {
    let Some(server) = postgres() else { return };
    let route = Route::start("127.0.0.1:0".parse().unwrap(), &server.url());
    let db = Db::connect(&server.url());
    let vm = "8c3d4e5f-6071-4b8c-9d0e-1f2a3b4c5d06";
    // The last millisecond of yesterday (UTC) and the first of today: two
    // partitions.
    let midnight = now_ms() / DAY_MS * DAY_MS;
    let before = sample_at(vm, "run-boundary", 1, midnight - 1);
    let (status, _, counts) = post(&route.url(), &serde_json::to_vec(&[&before]).unwrap());
    assert_eq!((status, &counts["accepted"]), (200, &1.into()), "{counts}");
    let partition = |seq: i64| {
        db.rt
            .block_on(
                sqlx::query_scalar::<_, String>(
                    "SELECT tableoid::regclass::text FROM metrics.guest_samples \
                     WHERE run_id = 'run-boundary' AND seq = $1",
                )
                .bind(seq)
                .fetch_all(&db.pool),
            )
            .unwrap()
    };
    let yesterday = partition(1);

    // The partitions' upkeep runs (as its timer would) and the agent
    // resends the same batch: the pair is found, nothing is stored again.
    db.rt
        .block_on(postgres_ingest::maintain(
            &db.pool,
            &Settings::default().retention,
        ))
        .unwrap();
    let (status, _, counts) = post(&route.url(), &serde_json::to_vec(&[&before]).unwrap());
    assert_eq!(status, 200, "{counts}");
    assert_eq!(
        (&counts["accepted"], &counts["duplicates"]),
        (&0.into(), &1.into()),
        "{counts}"
    );
    // The same pair stamped on the other side of midnight (another
    // partition, where the unique key alone would not see it): a conflict,
    // the first kept, no second row in either table.
    let mut after = before.clone();
    after["timestamp_ms"] = midnight.into();
    let (status, _, counts) = post(&route.url(), &serde_json::to_vec(&[&after]).unwrap());
    assert_eq!(status, 200, "{counts}");
    assert_eq!(counts["accepted"], 0, "{counts}");
    assert_eq!(counts["conflicts"][0]["seq"], 1, "{counts}");
    assert_eq!(partition(1), yesterday, "one row, in yesterday's partition");
    assert_eq!(db.samples(vm).len(), 1);
    assert_eq!(db.metrics(vm).len(), 1);
    assert_eq!(db.metrics(vm)[0].recorded_ms, midnight - 1);

    // A new seq on each side of midnight goes to its day's partition.
    let s2 = sample_at(vm, "run-boundary", 2, midnight - 1);
    let s3 = sample_at(vm, "run-boundary", 3, midnight);
    let (status, _, counts) = post(&route.url(), &serde_json::to_vec(&[&s2, &s3]).unwrap());
    assert_eq!((status, &counts["accepted"]), (200, &2.into()), "{counts}");
    assert_eq!(partition(2), yesterday);
    assert_ne!(partition(3), yesterday);
    assert_eq!(db.seqs(vm), vec![1, 2, 3]);
}

#[test]
fn dropping_expired_partitions_loses_nothing_newer() {
    let Some(server) = postgres() else { return };
    let route = Route::start("127.0.0.1:0".parse().unwrap(), &server.url());
    let db = Db::connect(&server.url());
    let vm = "9d4e5f60-7182-4c9d-8e0f-2a3b4c5d6e07";
    let retention = Settings::default().retention;
    let samples_days = (retention.samples.as_secs() / 86_400) as i64;
    // One sample for each day from the oldest accepted (a minute inside
    // the retention) to today (an hour after midnight, if that is past).
    let now = now_ms();
    let today = now / DAY_MS * DAY_MS;
    let body: Vec<serde_json::Value> = (0..=samples_days)
        .map(|d| {
            let at = match d {
                0 => now - retention.samples.as_millis() as i64 + 60_000,
                _ => today - (samples_days - d) * DAY_MS + 3_600_000,
            };
            sample_at(vm, "run-retention", d as u64 + 1, at)
        })
        .filter(|s| s["timestamp_ms"].as_i64().unwrap() < now)
        .collect();
    let (status, _, counts) = post(&route.url(), &serde_json::to_vec(&body).unwrap());
    assert_eq!(status, 200, "{counts}");
    assert_eq!(counts["accepted"], body.len() as u64, "{counts}");
    drop(route);

    let upkeep = |days_later: i64| -> Vec<String> {
        db.rt
            .block_on(
                sqlx::query_scalar::<_, String>(
                    "SELECT line FROM metrics.maintain_partitions(make_interval(secs => $1), \
                     make_interval(secs => $2), $3, now() + make_interval(days => $4)) AS line",
                )
                .bind(retention.samples.as_secs_f64())
                .bind(retention.metrics.as_secs_f64())
                .bind(retention.days_ahead as i32)
                .bind(days_later as i32)
                .fetch_all(&db.pool),
            )
            .unwrap()
    };
    let times = |table: &str| -> Vec<i64> {
        db.rt
            .block_on(
                sqlx::query_scalar::<_, i64>(&format!(
                    "SELECT (extract(epoch FROM recorded_at) * 1000)::bigint FROM metrics.{table} \
                     WHERE vm_id = $1::uuid ORDER BY recorded_at"
                ))
                .bind(vm)
                .fetch_all(&db.pool),
            )
            .unwrap()
    };
    let all: Vec<i64> = body
        .iter()
        .map(|s| s["timestamp_ms"].as_i64().unwrap())
        .collect();
    assert_eq!(times("guest_samples"), all);
    // A day on: the JSONB copy's oldest day goes, every newer row stays;
    // vm_metrics (a week) keeps everything.
    let done = upkeep(1);
    assert!(
        done.iter()
            .any(|l| l.starts_with("dropped metrics.guest_samples_p")),
        "{done:?}"
    );
    assert!(
        !done
            .iter()
            .any(|l| l.starts_with("dropped metrics.vm_metrics")),
        "{done:?}"
    );
    assert_eq!(times("guest_samples"), all[1..].to_vec());
    assert_eq!(times("vm_metrics"), all);
    // Past vm_metrics' retention for the oldest day only.
    let metrics_days = (retention.metrics.as_secs() / 86_400) as i64;
    let done = upkeep(metrics_days - samples_days + 1);
    assert!(
        done.iter()
            .any(|l| l.starts_with("dropped metrics.vm_metrics_p")),
        "{done:?}"
    );
    assert_eq!(times("vm_metrics"), all[1..].to_vec());
    assert!(times("guest_samples").is_empty());
}

#[test]
fn a_request_the_database_refuses_does_not_fail_its_group() {
    let Some(server) = postgres() else { return };
    let db = Db::connect(&server.url());
    // A long gathering time, so that concurrent requests share a group.
    let mut settings = Settings {
        retry_after_secs: 1,
        ..Settings::default()
    };
    settings.grouping.max_wait = Duration::from_millis(500);
    settings.grouping.max_samples = 1000;
    let route = Route::start_with(
        "127.0.0.1:0".parse().unwrap(),
        &server.url(),
        settings,
        None,
    );
    // A rule of the manager's that no check of the route knows about.
    db.rt
        .block_on(
            sqlx::query(
                "ALTER TABLE metrics.vm_metrics ADD CONSTRAINT cpu_at_most_100 \
                 CHECK (cpu_usage_percent <= 100)",
            )
            .execute(&db.pool),
        )
        .unwrap();
    let vm = "ae5f6071-8293-4dae-9f10-3b4c5d6e7f08";
    let now = now_ms();
    let threads: Vec<_> = (0..8u64)
        .map(|i| {
            let url = route.url();
            let mut s = sample_at(vm, &format!("run-group-{i}"), 1, now);
            if i == 3 {
                s["cpu_usage_percent"] = 150.0.into();
            }
            std::thread::spawn(move || (i, post(&url, &serde_json::to_vec(&[&s]).unwrap())))
        })
        .collect();
    for t in threads {
        let (i, (status, _, answer)) = t.join().unwrap();
        if i == 3 {
            assert_eq!(status, 422, "{answer}");
            assert!(
                answer["error"]
                    .as_str()
                    .unwrap()
                    .contains("cpu_at_most_100"),
                "{answer}"
            );
        } else {
            assert_eq!((status, &answer["accepted"]), (200, &1.into()), "{answer}");
        }
    }
    assert_eq!(db.totals(), (7, 7));
}

#[test]
fn a_database_with_the_unpartitioned_tables_keeps_its_rows() {
    let Some(server) = postgres() else { return };
    let db = Db::connect(&server.url());
    // The manager's vm_metrics and an earlier companion table, with rows,
    // as they were before partitioning.
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/postgres_ingest/migrations"
    );
    for file in [
        "20250101000001_vm_metrics.sql",
        "20250101000002_guest_samples.sql",
    ] {
        let sql = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
        db.rt
            .block_on(sqlx::raw_sql(&sql).execute(&db.pool))
            .unwrap();
    }
    let vm = "bf607182-93a4-4ebf-8021-4c5d6e7f8a09";
    db.rt
        .block_on(
            sqlx::raw_sql(&format!(
                "INSERT INTO metrics.vm_metrics (vm_id, recorded_at) \
                 VALUES ('{vm}', now() - interval '3 days'), ('{vm}', now()); \
                 INSERT INTO metrics.guest_samples (run_id, seq, vm_id, recorded_at, sample) \
                 VALUES ('run-old', 1, '{vm}', now() - interval '1 hour', '{{}}')"
            ))
            .execute(&db.pool),
        )
        .unwrap();
    let route = Route::start("127.0.0.1:0".parse().unwrap(), &server.url());
    assert_eq!(db.metrics(vm).len(), 2);
    // The old table's pair still de-duplicates.
    let mut resent = sample_at(vm, "run-old", 1, now_ms() - 3_600_000);
    resent["cpu_usage_percent"] = 1.0.into();
    let (status, _, counts) = post(&route.url(), &serde_json::to_vec(&[&resent]).unwrap());
    assert_eq!((status, &counts["accepted"]), (200, &0.into()), "{counts}");
    let fresh = sample_at(vm, "run-new", 1, now_ms());
    let (status, _, counts) = post(&route.url(), &serde_json::to_vec(&[&fresh]).unwrap());
    assert_eq!((status, &counts["accepted"]), (200, &1.into()), "{counts}");
    assert_eq!(db.metrics(vm).len(), 3);
    let kinds: Vec<String> = db
        .rt
        .block_on(
            sqlx::query_scalar(
                "SELECT relkind::text FROM pg_class WHERE oid IN \
                 ('metrics.vm_metrics'::regclass, 'metrics.guest_samples'::regclass)",
            )
            .fetch_all(&db.pool),
        )
        .unwrap();
    assert_eq!(kinds, vec!["p", "p"]);
}

#[test]
fn without_the_jsonb_copy_resends_and_conflicts_are_still_told_apart() {
    let Some(server) = postgres() else { return };
    let route = Route::start_with(
        "127.0.0.1:0".parse().unwrap(),
        &server.url(),
        Settings {
            retry_after_secs: 1,
            jsonb_copy: false,
            ..Settings::default()
        },
        None,
    );
    let db = Db::connect(&server.url());
    let vm = "c0718293-a4b5-4c0d-9132-5d6e7f8a9b10";
    let first = sample_at(vm, "run-keys", 1, now_ms());
    let second = sample_at(vm, "run-keys", 2, now_ms());
    let body = serde_json::to_vec(&[&first, &second]).unwrap();
    let (status, _, counts) = post(&route.url(), &body);
    assert_eq!((status, &counts["accepted"]), (200, &2.into()), "{counts}");
    assert_eq!(
        db.count("SELECT count(*) FROM metrics.guest_samples WHERE sample IS NULL AND fingerprint IS NOT NULL"),
        2
    );
    // The same body again, its keys in another order and indented: the
    // same payload, a duplicate.
    let mut reordered = serde_json::Map::new();
    for (k, v) in first.as_object().unwrap().iter().rev() {
        reordered.insert(k.clone(), v.clone());
    }
    let (status, _, counts) = post(
        &route.url(),
        &serde_json::to_vec_pretty(&[&reordered]).unwrap(),
    );
    assert_eq!(
        (status, &counts["duplicates"], &counts["conflicts"]),
        (200, &1.into(), &serde_json::json!([])),
        "{counts}"
    );
    let mut other = first.clone();
    other["cpu_usage_percent"] = 99.5.into();
    let (status, _, counts) = post(&route.url(), &serde_json::to_vec(&[&other]).unwrap());
    assert_eq!(status, 200);
    assert_eq!(counts["conflicts"][0]["seq"], 1, "{counts}");
    assert_eq!(db.metrics(vm).len(), 2);
    assert_ne!(db.metrics(vm)[0].cpu_usage_percent, Some(99.5));
}
