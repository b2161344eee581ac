//! examples/axum_ingest.rs, the push route as an axum manager mounts it:
//! our agent pushes into it, and a newer agent's body with fields this
//! version does not know is accepted.

mod common;

#[allow(dead_code)]
#[path = "../examples/axum_ingest.rs"]
mod axum_ingest;

use std::net::SocketAddr;
use std::time::Duration;

use axum_ingest::AppState;
use common::{AgentProcess, wait_until};

/// Serves the example's router on 127.0.0.1:0 on its own runtime thread.
fn serve() -> (SocketAddr, AppState) {
    serve_state(AppState::default())
}

fn serve_state(state: AppState) -> (SocketAddr, AppState) {
    let app = axum_ingest::router(state.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    (addr, state)
}

fn post(addr: SocketAddr, body: &[u8]) -> (u16, serde_json::Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .post(format!("http://{addr}/v1/guest-metrics"))
        .header("Content-Type", "application/json")
        .send(body)
        .unwrap();
    let status = r.status().as_u16();
    let body = r
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .unwrap();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

#[test]
fn our_agent_pushes_into_the_axum_route() {
    let (addr, state) = serve();
    let url = format!("http://{addr}/v1/guest-metrics");
    let agent = AgentProcess::start(&["--url", &url, "--interval", "200ms", "--vm-id", "vm-axum"]);
    wait_until(60, "three samples stored for vm-axum", || {
        axum_ingest::latest(&state, "vm-axum").is_some_and(|s| s.seq >= 3)
    });
    // The route's own view of it.
    let http: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut r = http
        .get(format!("http://{addr}/v1/guest-metrics/vm-axum/latest"))
        .call()
        .unwrap();
    let latest: guest_agent::Sample =
        serde_json::from_slice(&r.body_mut().read_to_vec().unwrap()).unwrap();
    assert_eq!(latest.vm_id.as_deref(), Some("vm-axum"));
    assert!(latest.seq >= 3);
    agent.signal("TERM");
    let (status, log) = agent.wait(30);
    assert!(status.success(), "{log}");
    assert!(!log.contains("push failed"), "{log}");
}

#[test]
fn a_newer_agents_body_is_accepted_and_outcomes_map_to_statuses() {
    let (addr, state) = serve();
    let mut newer: serde_json::Value = serde_json::from_slice(
        &std::process::Command::new(env!("CARGO_BIN_EXE_guest-agent"))
            .args(["--once", "--config", "/nonexistent", "--url", "off"])
            .args(["--vm-id", "vm-new", "--proc-root", &common::fixture_root()])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    // Fields a later version might add within schema 1.
    newer["gpu_usage_percent"] = 41.5.into();
    newer["restore"] = serde_json::json!({ "generation": 3, "marker": "vmgenid" });
    let body = serde_json::to_vec(&[&newer]).unwrap();

    let (status, counts) = post(addr, &body);
    assert_eq!(status, 200, "{counts}");
    assert_eq!(counts["accepted"], 1);
    assert_eq!(
        axum_ingest::latest(&state, "vm-new").map(|s| s.seq),
        Some(1)
    );
    // The agent's resend after a lost answer.
    let (status, counts) = post(addr, &body);
    assert_eq!((status, &counts["duplicates"]), (200, &1.into()));
    // The same pair with another payload: reported, first one kept.
    let mut other = newer.clone();
    other["cpu_usage_percent"] = 99.0.into();
    let (status, counts) = post(addr, &serde_json::to_vec(&[&other]).unwrap());
    assert_eq!(status, 200);
    assert_eq!(counts["conflicts"][0]["seq"], 1, "{counts}");
    assert_ne!(
        axum_ingest::latest(&state, "vm-new").and_then(|s| s.cpu_usage_percent),
        Some(99.0)
    );

    let mut schema2 = newer.clone();
    schema2["schema"] = 2.into();
    assert_eq!(post(addr, &serde_json::to_vec(&[&schema2]).unwrap()).0, 422);
    assert_eq!(post(addr, b"{\"not\": \"an array\"}").0, 400);
    let too_big = vec![b' '; guest_agent::ingest::MAX_BODY + 1];
    assert_eq!(post(addr, &too_big).0, 413);
}

#[test]
fn with_master_keys_only_the_signers_samples_are_stored() {
    use guest_agent::ingest::Verifier;
    use guest_agent::sign::{self, Key};
    use std::os::unix::fs::PermissionsExt;

    let master = Key::new("k1", [5; 32]).unwrap();
    let verifier = Verifier::from_lines(&master.to_line()).unwrap();
    let state = std::sync::Arc::new(std::sync::Mutex::new(axum_ingest::Store::with_keys(
        verifier,
    )));
    let (addr, state) = serve_state(state);
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("vm.key");
    std::fs::write(&key_file, master.derive("vm-s").to_line()).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let url = format!("http://{addr}/v1/guest-metrics");
    let agent = AgentProcess::start(&[
        "--url",
        &url,
        "--interval",
        "200ms",
        "--vm-id",
        "vm-s",
        "--key-file",
        key_file.to_str().unwrap(),
    ]);
    wait_until(60, "two signed samples stored for vm-s", || {
        axum_ingest::latest(&state, "vm-s").is_some_and(|s| s.seq >= 2)
    });
    agent.signal("TERM");
    let (status, log) = agent.wait(30);
    assert!(status.success(), "{log}");
    assert!(!log.contains("push failed"), "{log}");

    // Unsigned: 401. Signed by vm-s for a body of vm-x: 403, nothing stored.
    let body = std::process::Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args(["--once", "--config", "/nonexistent", "--url", "off"])
        .args(["--vm-id", "vm-x", "--proc-root", &common::fixture_root()])
        .output()
        .unwrap()
        .stdout;
    let sample: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let body = serde_json::to_vec(&[sample]).unwrap();
    let (status, why) = post(addr, &body);
    assert_eq!(status, 401, "{why}");
    let h = sign::sign(
        &master.derive("vm-s"),
        "vm-s",
        "POST",
        "/v1/guest-metrics",
        &body,
        1,
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let r = agent
        .post(format!("http://{addr}/v1/guest-metrics"))
        .header("Content-Type", "application/json")
        .header("Content-Digest", &h.content_digest)
        .header("Signature-Input", &h.signature_input)
        .header("Signature", &h.signature)
        .send(&body[..])
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert!(axum_ingest::latest(&state, "vm-x").is_none());
}
