//! The whole agent in-process: listener and pusher together.

mod common;

use std::net::TcpListener;

use common::{Mode, Receiver, config, get, wait_until};
use guest_agent::{Sample, agent};

#[test]
fn with_url_off_it_is_a_pure_pull_agent() {
    let a = agent::start(config(&[
        ("url", "off"),
        ("listen", "127.0.0.1:0"),
        ("interval", "200ms"),
        ("vm_id", "vm-pull"),
    ]))
    .unwrap();
    let addr = a.listen_addr().unwrap();
    wait_until(30, "seq 3 on /metrics", || {
        let (code, body) = get(addr, "/metrics");
        code == 200
            && serde_json::from_str::<serde_json::Value>(&body).unwrap()["seq"]
                .as_u64()
                .unwrap()
                >= 3
    });
    let (code, body) = get(addr, "/metrics");
    assert_eq!(code, 200);
    let s = Sample::from_json_strict(&serde_json::from_str(&body).unwrap()).unwrap();
    assert_eq!(s.vm_id.as_deref(), Some("vm-pull"));
    let (code, body) = get(addr, "/health");
    assert_eq!(code, 200);
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["push_state"], "off");
    assert_eq!(h["status"], "ok");
    a.stop();
}

#[test]
fn health_reports_delivery_and_a_taken_port_does_not_stop_pushing() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let rx = Receiver::start(Mode::Accept);
    let url = rx.url();
    let a = agent::start(config(&[
        ("url", &url),
        ("listen", &port),
        ("interval", "200ms"),
    ]))
    .unwrap();
    assert_eq!(a.listen_addr(), None);
    rx.wait_for(30, "3 deliveries", |r| r.delivered().len() >= 3);
    a.stop();

    // And with a free port, /health shows the delivery state.
    let a = agent::start(config(&[
        ("url", &url),
        ("listen", "127.0.0.1:0"),
        ("interval", "200ms"),
    ]))
    .unwrap();
    let addr = a.listen_addr().unwrap();
    wait_until(30, "delivered in /health", || {
        let (_, body) = get(addr, "/health");
        let h: serde_json::Value = serde_json::from_str(&body).unwrap();
        h["delivered"].as_u64().unwrap() >= 2 && h["push_state"] == "ok"
    });
    let (_, body) = get(addr, "/health");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["push_target"], url.as_str());
    a.stop();
    drop(taken);
}
