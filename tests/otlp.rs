//! OTLP/HTTP pushes (`format=otlp`) to a receiver on 127.0.0.1: every body
//! the agent sends is parsed by the official schema (the PyPI packages
//! `opentelemetry-proto` and `protobuf`, in a venv this test makes under
//! `target/`, unknown fields refused), and the OTLP/HTTP rules of retry and
//! partial success hold (docs/backends.md#opentelemetry).
//!
//! Without python3 or the packages the schema check is skipped, except under
//! `CI=true`, where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{Mode, Receiver, config, wait_until};
use guest_agent::agent;

/// The packages, at the versions this test was written against.
const PACKAGES: [&str; 2] = ["opentelemetry-proto==1.45.2", "protobuf==7.36.2"];

/// The venv's Python, made once per test run; `None` (after saying why)
/// when it cannot be made here, which fails under `CI=true`.
fn validator() -> Option<PathBuf> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let made = PYTHON.get_or_init(|| {
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/otlp-venv");
        let python = venv.join("bin/python");
        let ready = venv.join(format!(".ready-{}", PACKAGES.join("-")));
        if ready.exists() {
            return Ok(python);
        }
        let run = |cmd: &mut Command| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{cmd:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PACKAGES))?;
        std::fs::write(&ready, "").map_err(|e| e.to_string())?;
        Ok(python)
    });
    match made {
        Ok(p) => Some(p.clone()),
        Err(why) => {
            let why = format!("the OTLP schema check needs python3-venv and PyPI: {why}");
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            eprintln!("skipping the schema check: {why}");
            None
        }
    }
}

/// Parses every body with the official schema; panics with the reason of
/// the first that fails.
fn assert_valid_otlp(bodies: &[Vec<u8>]) {
    let Some(python) = validator() else { return };
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let f = dir.path().join(format!("body-{i}.json"));
            std::fs::write(&f, b).unwrap();
            f
        })
        .collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otlp/validate.py");
    let out = Command::new(python)
        .arg(script)
        .args(&files)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        report.lines().filter(|l| l.starts_with("ok ")).count(),
        files.len()
    );
}

fn header<'a>(r: &'a common::Request, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The names of the metrics in a body.
fn metric_names(body: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    v["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_body_parses_with_the_official_schema_single_and_batched() {
    // Nothing listens at first: samples pile up, then go out in one batch.
    let rx = Receiver::start(Mode::Reset);
    let url = format!("http://{}/v1/metrics", rx.addr);
    let a = agent::start(config(&[
        ("url", &url),
        ("format", "otlp"),
        ("interval", "200ms"),
        ("vm_id", "vm-otlp"),
        // The real /proc: the fixture's counters never move.
        ("proc_root", "/proc"),
    ]))
    .unwrap();
    // More than the 10 samples one OTLP request carries at most.
    wait_until(30, "a backlog", || a.health().buffered >= 12);
    rx.set_mode(Mode::Accept);
    wait_until(60, "the backlog and more delivered", || {
        a.health().delivered >= 10
    });
    let h = a.stop();
    assert_eq!((h.dropped, h.rejected), (0, 0));
    let bodies: Vec<Vec<u8>> = rx
        .requests()
        .into_iter()
        .filter(|r| r.answered == 204)
        .map(|r| {
            assert_eq!(r.path, "/v1/metrics");
            assert_eq!(header(&r, "content-type"), Some("application/json"));
            r.body
        })
        .collect();
    assert!(bodies.len() >= 2, "{} bodies", bodies.len());
    let names = metric_names(&bodies[0]);
    for want in [
        "system.cpu.time",
        "system.cpu.utilization",
        "system.cpu.logical.count",
        "system.memory.usage",
        "system.memory.limit",
        "system.memory.linux.available",
        "system.paging.usage",
        "system.network.io",
        "system.network.packet.count",
        "system.network.errors",
        "system.network.packet.dropped",
        "system.disk.io",
        "system.disk.operations",
        "system.disk.io_time",
        "system.filesystem.usage",
        "system.filesystem.limit",
        "system.uptime",
        "system.process.count",
        "system.cpu.load_average.1m",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    // The backlog goes out in batches of at most 10 samples (one
    // `system.uptime` point each), the first of them full.
    let samples_in = |body: &[u8]| {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        v["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "system.uptime")
            .unwrap()["gauge"]["dataPoints"]
            .as_array()
            .unwrap()
            .len()
    };
    let counts: Vec<usize> = bodies.iter().map(|b| samples_in(b)).collect();
    assert_eq!(counts[0], 10, "{counts:?}");
    assert!(counts.iter().all(|&n| n <= 10), "{counts:?}");
    assert_valid_otlp(&bodies);
}

#[test]
fn only_429_502_503_504_are_retried_and_a_partial_success_is_counted() {
    // 503 and 429: kept and retried.
    for status in [503, 429] {
        let retry = vec![("Retry-After".to_string(), "1".to_string())];
        let rx = Receiver::start(Mode::Status(status, retry));
        let url = format!("http://{}/v1/metrics", rx.addr);
        let a = agent::start(config(&[
            ("url", &url),
            ("format", "otlp"),
            ("interval", "100ms"),
        ]))
        .unwrap();
        rx.wait_for(30, "two attempts", |r| r.requests().len() >= 2);
        rx.set_mode(Mode::Accept);
        wait_until(30, "delivery", || a.health().delivered > 0);
        let h = a.stop();
        assert_eq!(h.rejected, 0, "HTTP {status} is retried, not dropped");
        assert_eq!(h.dropped, 0);
    }
    // 400, 401, 404, 500: the OTLP/HTTP rules say a retry cannot help.
    for status in [400, 401, 404, 500] {
        let rx = Receiver::start(Mode::Status(status, vec![]));
        let url = format!("http://{}/v1/metrics", rx.addr);
        let a = agent::start(config(&[
            ("url", &url),
            ("format", "otlp"),
            ("interval", "100ms"),
        ]))
        .unwrap();
        wait_until(30, "refused samples", || a.health().rejected >= 3);
        let h = a.stop();
        assert_eq!(h.push_state, guest_agent::PushState::Rejecting, "{status}");
        assert!(
            h.last_error
                .unwrap_or_default()
                .contains(&format!("HTTP {status}"))
        );
    }
    // A 200 that refuses some points: the batch is delivered, the points
    // counted and the reason kept.
    let partial = r#"{"partialSuccess":{"rejectedDataPoints":"7","errorMessage":"out of order"}}"#;
    let rx = Receiver::start(Mode::Body(200, partial.into()));
    let url = format!("http://{}/v1/metrics", rx.addr);
    let a = agent::start(config(&[
        ("url", &url),
        ("format", "otlp"),
        ("interval", "100ms"),
    ]))
    .unwrap();
    wait_until(30, "two deliveries", || a.health().delivered >= 2);
    let h = a.stop();
    assert!(h.rejected_data_points >= 14, "{}", h.rejected_data_points);
    assert!(
        h.last_error
            .unwrap_or_default()
            .contains("refused 7 data points: out of order"),
        "the receiver's reason is kept"
    );
    assert_eq!(h.rejected, 0, "the samples themselves were taken");
    let bodies: Vec<Vec<u8>> = rx.requests().into_iter().map(|r| r.body).collect();
    assert_valid_otlp(&bodies);
}
