//! The drop-in mode against a stand-in of today's pull-model manager
//! (docs/manager.md): the agent started the way that manager's installer
//! starts it, with nothing but `/etc/guest-agent.conf` (here `--config`
//! pointing at a copy in a temporary directory).
//!
//! The main test runs in a network namespace of its own, holding only a
//! loopback interface: the agent's real default listener, `0.0.0.0:9000`,
//! is bound there, reachable by the stand-in and by nothing on this
//! machine's networks. Creating the namespace needs CAP_SYS_ADMIN (root, as
//! `.ci/run` runs); without it the test fails under `CI=true` and is
//! skipped otherwise.

mod common;
mod pull_manager;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{AgentProcess, enter_private_network};
use pull_manager::{AGENT_PORT, StandIn};

const VM_ID: &str = "6f1c2d3e-4b5a-4c6d-8e7f-0123456789ab";

/// The agent as a child process, killed on drop, its stderr collected.
/// The installer's file, as it writes it.
fn installer_conf(dir: &Path, manager_url: &str) -> PathBuf {
    let path = dir.join("guest-agent.conf");
    std::fs::write(
        &path,
        format!(
            "# Guest Agent Configuration\n# Auto-generated during VM creation\nVM_ID={VM_ID}\nMANAGER_URL={manager_url}\n"
        ),
    )
    .unwrap();
    path
}

fn get_json(url: &str) -> (u16, serde_json::Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent.get(url).call().expect(url);
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_vec().unwrap();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

fn report(line: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[test]
fn the_installers_file_alone_serves_todays_manager() {
    if !enter_private_network("dropin") {
        return;
    }
    // From here on this thread, the stand-in and the agent see only the
    // namespace's loopback.
    let manager = StandIn::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(|ip: &str| SocketAddr::new(ip.parse().unwrap(), AGENT_PORT)),
    );
    let dir = tempfile::tempdir().unwrap();
    let conf = installer_conf(dir.path(), &manager.base_url());
    let conf = conf.to_str().unwrap();

    // What the mode is, and where each value comes from.
    let out = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args(["--print-config", "--config", conf])
        .output()
        .unwrap();
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["listen"]["value"], "0.0.0.0:9000", "{printed}");
    assert_eq!(printed["listen"]["source"], "file");
    assert_eq!(printed["manager_url"]["value"], manager.base_url());
    assert_eq!(
        printed["url"]["value"],
        format!("{}/v1/guest-metrics", manager.base_url())
    );
    assert_eq!(printed["vm_id"]["value"], VM_ID);

    let agent = AgentProcess::spawn(&["--config", conf]);

    let first_report =
        manager.wait_for(60, "the guest's address", |m| m.reports().first().cloned());
    assert_eq!(first_report.vm_id, VM_ID);
    assert_eq!(first_report.guest_ip, "127.0.0.1");
    let first_pull = manager.wait_for(60, "a live-view pull that parses", |m| {
        m.live_pulls().into_iter().find(|p| p.result.is_ok())
    });
    // The collector's first tick came before the address; its next is 10 s on.
    let collected = manager.wait_for(60, "a collector pull that parses", |m| {
        m.collector_pulls().into_iter().find_map(|p| p.result.ok())
    });
    report(format_args!(
        "dropin: agent start -> guest-ip report {} ms, -> first successful pull {} ms",
        (first_report.at - agent.started()).as_millis(),
        (first_pull.at - agent.started()).as_millis()
    ));
    assert!(collected.memory_total_kb > 0, "{collected:?}");
    assert!(collected.memory_used_kb <= collected.memory_total_kb);
    assert_eq!(
        collected.memory_used_kb + collected.memory_available_kb,
        collected.memory_total_kb
    );
    assert!((0.0..=100.0).contains(&collected.cpu_usage_percent));
    assert!((0.0..=100.0).contains(&collected.memory_usage_percent));
    assert!(collected.uptime_seconds > 0);
    assert!(collected.process_count.is_some_and(|n| n > 0));
    assert!(collected.load_average.is_some());
    // Every pull the manager made after the first success parsed.
    let live = manager.live_pulls();
    let after: Vec<_> = live.iter().filter(|p| p.at >= first_pull.at).collect();
    assert!(
        after.iter().all(|p| p.result.is_ok()),
        "a pull failed after the first success: {after:?}"
    );

    // The push route is missing: said once, shown in /health, samples kept.
    let base = format!("http://127.0.0.1:{AGENT_PORT}");
    let health = manager.wait_for(30, "/health to show the missing ingest route", |_| {
        let (_, h) = get_json(&format!("{base}/health"));
        (h["push_state"] == "no_ingest_route").then_some(h)
    });
    assert!(manager.ingest_posts().iter().all(|s| *s == 404));
    assert_eq!(health["guest_ip_report"]["state"], "ok", "{health}");
    assert_eq!(health["guest_ip_report"]["reported_ip"], "127.0.0.1");
    assert!(health["buffered"].as_u64().unwrap() >= 1, "{health}");
    let said = agent.stderr().matches("no ingest route").count();
    assert_eq!(said, 1, "logged once, not per retry:\n{}", agent.stderr());

    // The old agent's interface setup is refused, with the reason.
    let http: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = http
        .post(format!("{base}/configure-interface"))
        .header("Content-Type", "application/json")
        .send(r#"{"interface":"eth1","static_ip":"10.9.0.5/24","gateway":"10.9.0.1"}"#)
        .unwrap();
    assert_eq!(resp.status().as_u16(), 501);
    let why: serde_json::Value =
        serde_json::from_slice(&resp.body_mut().read_to_vec().unwrap()).unwrap();
    assert!(
        why["error"].as_str().unwrap().contains("unauthenticated"),
        "{why}"
    );

    // The manager gains the route: the buffered samples arrive, from seq 1,
    // at the next retry (the backoff ceiling, 60 s).
    manager.add_ingest_route();
    let stored = manager.wait_for(150, "the buffered samples to be delivered", |m| {
        let s = m.stored();
        (!s.is_empty()).then_some(s)
    });
    let seqs: Vec<u64> = stored.iter().map(|s| s.seq).collect();
    assert_eq!(seqs[0], 1, "the first samples were kept: {seqs:?}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert!(stored.iter().all(|s| s.vm_id.as_deref() == Some(VM_ID)));
    // The manager stores a batch before the agent reads its answer: wait
    // for the agent to have read it, rather than asking once.
    manager.wait_for(30, "/health to show the push as ok", |_| {
        let (_, h) = get_json(&format!("{base}/health"));
        (h["push_state"] == "ok").then_some(())
    });

    let log = agent.terminate(30);
    assert!(
        log.contains("told the manager the guest's address 127.0.0.1"),
        "{log}"
    );
}

/// The guest's address toward the manager changes (a new lease): it is
/// reported again at once, not at the next 30 s refresh, and the manager's
/// pulls follow it. In a namespace of its own, the manager's address and the
/// guest's two addresses live on loopback, and the route to the manager
/// names the source address the kernel picks.
#[test]
fn a_new_address_is_reported_at_once() {
    if !enter_private_network("dropin") {
        return;
    }
    for a in ["10.88.0.1", "10.77.0.2", "10.77.0.3"] {
        common::ip(&format!("addr add {a}/32 dev lo"));
    }
    common::ip("route replace local 10.88.0.1 dev lo table local src 10.77.0.2");
    let manager = StandIn::start(
        "10.88.0.1:0".parse().unwrap(),
        Arc::new(|ip: &str| SocketAddr::new(ip.parse().unwrap(), AGENT_PORT)),
    );
    let dir = tempfile::tempdir().unwrap();
    let conf = installer_conf(dir.path(), &manager.base_url());
    let agent = AgentProcess::spawn(&["--config", conf.to_str().unwrap()]);
    let first = manager.wait_for(60, "the first address", |m| m.reports().first().cloned());
    assert_eq!(first.guest_ip, "10.77.0.2");
    manager.wait_for(60, "a pull from 10.77.0.2", |m| {
        m.live_pulls()
            .into_iter()
            .find(|p| p.result.is_ok() && p.url.contains("10.77.0.2"))
    });

    common::ip("route replace local 10.88.0.1 dev lo table local src 10.77.0.3");
    let changed_at = Instant::now();
    let again = manager.wait_for(60, "the new address", |m| {
        m.reports().into_iter().find(|r| r.guest_ip == "10.77.0.3")
    });
    manager.wait_for(60, "a pull from 10.77.0.3", |m| {
        m.live_pulls()
            .into_iter()
            .find(|p| p.result.is_ok() && p.url.contains("10.77.0.3"))
    });
    report(format_args!(
        "dropin: address change -> new report {} ms",
        (again.at - changed_at).as_millis()
    ));
    let log = agent.terminate(30);
    assert!(
        log.contains("guest address changed from 10.77.0.2 to 10.77.0.3"),
        "reported for the change, not by the periodic refresh:\n{log}"
    );
}

/// The manager is not up yet when the agent starts: the report is retried
/// until it is, and an explicit `--listen` beats the file's implied one.
#[test]
fn the_report_is_retried_until_the_manager_answers() {
    // A port nobody listens on yet; the stand-in takes it later.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let conf = installer_conf(dir.path(), &base);
    let agent = AgentProcess::spawn(&[
        "--config",
        conf.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--proc-root",
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/host"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agent.stderr().contains("guest address report failed") {
        assert!(
            Instant::now() < deadline,
            "no failed report:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let listen = agent
        .stderr()
        .lines()
        .find_map(|l| l.split("listening on http://").nth(1).map(str::to_string))
        .expect("the listener's address in the log");
    assert!(listen.starts_with("127.0.0.1:"), "{listen}");
    let manager = StandIn::start(
        SocketAddr::from(([127, 0, 0, 1], port)),
        // Not pulled in this test.
        Arc::new(|_: &str| SocketAddr::from(([127, 0, 0, 1], 9))),
    );
    let r = manager.wait_for(60, "the retried report", |m| m.reports().first().cloned());
    assert_eq!(
        (r.vm_id.as_str(), r.guest_ip.as_str()),
        (VM_ID, "127.0.0.1")
    );
    let log = agent.terminate(30);
    assert_eq!(
        log.matches("guest address report failed").count(),
        1,
        "a failing report is logged once:\n{log}"
    );
}

/// A sample without one of the figures the pull-model manager requires is
/// answered 503, naming it, never served with a null it cannot parse.
#[test]
fn metrics_without_a_required_figure_is_503() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("proc");
    copy_dir(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/host")),
        &root,
    );
    std::fs::remove_file(root.join("uptime")).unwrap();
    let agent = AgentProcess::spawn(&[
        "--config",
        "/nonexistent",
        "--url",
        "off",
        "--listen",
        "127.0.0.1:0",
        "--proc-root",
        root.to_str().unwrap(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        if let Some(a) = agent
            .stderr()
            .lines()
            .find_map(|l| l.split("listening on http://").nth(1).map(str::to_string))
        {
            break a.split_whitespace().next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "{}", agent.stderr());
        std::thread::sleep(Duration::from_millis(20));
    };
    let (status, body) = loop {
        let (s, b) = get_json(&format!("http://{addr}/metrics"));
        if b["error"] != "no sample collected yet" {
            break (s, b);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("uptime_seconds"),
        "{body}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}
