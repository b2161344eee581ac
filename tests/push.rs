//! Push delivery against receivers on 127.0.0.1 (GUIDE §5). Every fault test
//! prints its delivered/lost counts (run with --nocapture to see them).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Mode, Receiver, config, free_port, wait_until};
use guest_agent::Sample;
use guest_agent::agent;
use guest_agent::status::PushState;

/// Asserts that the first arrival of every seq is in increasing order, and
/// returns the distinct seqs.
fn distinct_in_order(seqs: &[u64]) -> Vec<u64> {
    let mut seen = Vec::new();
    for &s in seqs {
        if !seen.contains(&s) {
            if let Some(&last) = seen.last() {
                assert!(s > last, "seq {s} first arrived after {last}: {seqs:?}");
            }
            seen.push(s);
        }
    }
    seen
}

/// Largest gap between consecutive collection timestamps, in ms.
fn largest_gap_ms(samples: &[serde_json::Value]) -> u64 {
    let mut ts: Vec<(u64, u64)> = samples
        .iter()
        .map(|s| {
            (
                s["seq"].as_u64().unwrap(),
                s["timestamp_ms"].as_u64().unwrap(),
            )
        })
        .collect();
    ts.sort();
    ts.dedup();
    ts.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap_or(0)
}

/// An agent pushing to a loopback port where nothing listens yet, so that
/// samples pile up; returns the port, for a receiver to come back on.
fn agent_facing_an_outage(extra: &[(&'static str, &str)]) -> (SocketAddr, agent::Running) {
    let addr = free_port();
    let url = format!("http://{addr}/v1/guest-metrics");
    let mut pairs = vec![("url", url.as_str()), ("interval", "100ms")];
    pairs.extend_from_slice(extra);
    (addr, agent::start(config(&pairs)).unwrap())
}

#[test]
fn steady_state_delivers_every_seq_in_order_with_the_schema() {
    let rx = Receiver::start(Mode::Accept);
    let url = rx.url();
    let a = agent::start(config(&[
        ("url", &url),
        ("interval", "200ms"),
        ("vm_id", "vm-steady"),
    ]))
    .unwrap();
    rx.wait_for(30, "8 samples", |r| r.delivered().len() >= 8);
    a.stop();
    let reqs = rx.requests();
    for r in &reqs {
        assert_eq!(r.path, "/v1/guest-metrics");
        let h = |k: &str| {
            r.headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(h("content-type").as_deref(), Some("application/json"));
        assert_eq!(
            h("user-agent"),
            Some(format!("guest-agent/{}", guest_agent::AGENT_VERSION))
        );
    }
    let samples = rx.delivered();
    let seqs: Vec<u64> = samples.iter().map(|s| s["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let run_id = samples[0]["run_id"].as_str().unwrap().to_string();
    for s in &samples {
        let parsed = Sample::from_json_strict(s).unwrap();
        assert_eq!(parsed.run_id, run_id);
        assert_eq!(parsed.vm_id.as_deref(), Some("vm-steady"));
        assert_eq!(parsed.guest_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(parsed.dropped_samples, 0);
        assert!(parsed.memory_total_kb.unwrap() > 0);
    }
    // window_ms covers the time since the previous sample.
    assert_eq!(samples[0]["window_ms"], 0);
    assert!(samples[1]["window_ms"].as_u64().unwrap() > 0);
}

#[test]
fn gateway_placeholder_resolves_from_the_proc_root_route_table() {
    // The fixture's default route is 127.0.0.1 (0100007F).
    let rx = Receiver::start(Mode::Accept);
    let url = format!("http://{{gateway}}:{}/v1/guest-metrics", rx.addr.port());
    let a = agent::start(config(&[("url", &url), ("interval", "200ms")])).unwrap();
    rx.wait_for(30, "2 samples", |r| r.delivered().len() >= 2);
    assert_eq!(
        a.shared().status().target.as_deref(),
        Some(rx.url().as_str())
    );
    a.stop();
}

#[test]
fn outage_shorter_than_the_buffer_loses_nothing() {
    let (addr, a) = agent_facing_an_outage(&[("buffer", "1000")]);
    // Nothing listens: connections are refused while samples accumulate.
    wait_until(30, "15 samples buffered", || a.shared().buffer.len() >= 15);
    assert_eq!(a.shared().status().push_state, PushState::Failing);
    let rx = Receiver::start_on(addr, Mode::Accept);
    rx.wait_for(60, "seq 1..=25 delivered", |r| {
        r.delivered_seqs().iter().filter(|&&s| s <= 25).count() >= 25
    });
    a.stop();
    let samples = rx.delivered();
    let distinct = distinct_in_order(&rx.delivered_seqs());
    assert_eq!(distinct[..25], (1..=25).collect::<Vec<_>>()[..]);
    assert!(samples.iter().all(|s| s["dropped_samples"] == 0));
    println!(
        "short outage: delivered {} distinct samples, lost 0",
        distinct.len()
    );
}

#[test]
fn outage_longer_than_the_buffer_keeps_the_newest_and_counts_the_rest() {
    let (addr, a) = agent_facing_an_outage(&[("buffer", "5")]);
    wait_until(30, "samples dropped", || a.shared().buffer.dropped() >= 10);
    let rx = Receiver::start_on(addr, Mode::Accept);
    rx.wait_for(60, "delivery after the outage", |r| {
        r.delivered().len() >= 8
    });
    a.stop();
    let samples = rx.delivered();
    let seqs = distinct_in_order(&rx.delivered_seqs());
    let last = samples
        .iter()
        .max_by_key(|s| s["seq"].as_u64().unwrap())
        .unwrap();
    let last_seq = last["seq"].as_u64().unwrap();
    let missing: Vec<u64> = (1..=last_seq).filter(|s| !seqs.contains(s)).collect();
    // The lost ones are the oldest of the outage: one contiguous run from seq 1,
    // and exactly as many as the samples say were dropped.
    assert!(!missing.is_empty());
    assert_eq!(missing, (1..=missing.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        last["dropped_samples"].as_u64().unwrap(),
        missing.len() as u64
    );
    // The first delivery after the outage is exactly the buffer: the newest 5.
    let first_batch: Vec<u64> = rx
        .requests()
        .iter()
        .find(|r| r.answered == 204)
        .unwrap()
        .samples
        .iter()
        .map(|s| s["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(first_batch.len(), 5, "{first_batch:?}");
    assert_eq!(first_batch[0], missing.len() as u64 + 1);
    println!(
        "long outage: delivered {} distinct samples, lost {} (dropped_samples {})",
        seqs.len(),
        missing.len(),
        last["dropped_samples"]
    );
}

/// Runs an agent against a receiver in `fault` until it has failed at least
/// `attempts` times in a row, then heals the receiver and waits until the
/// samples collected during the fault arrive.
fn fault_then_heal(fault: Mode, attempts: u64, timeout: &str) -> (Receiver, Vec<u64>) {
    let rx = Receiver::start(fault);
    let url = rx.url();
    let a = agent::start(config(&[
        ("url", &url),
        ("interval", "100ms"),
        ("timeout", timeout),
    ]))
    .unwrap();
    wait_until(60, "failed attempts", || {
        a.shared().status().consecutive_failures >= attempts
    });
    let collected_during_fault = a.shared().latest().unwrap().seq;
    rx.set_mode(Mode::Accept);
    rx.wait_for(60, "delivery after healing", |r| {
        r.delivered_seqs().contains(&(collected_during_fault + 3))
    });
    a.stop();
    let seqs = distinct_in_order(&rx.delivered_seqs());
    // Collection kept its cadence throughout: no stall of many intervals
    // (30 of them: generous for a busy host, far below a blocked collector's).
    let gap = largest_gap_ms(&rx.delivered());
    assert!(gap < 3000, "collection stalled for {gap} ms");
    (rx, seqs)
}

#[test]
fn server_errors_are_retried_and_lose_nothing() {
    for code in [500, 503, 429] {
        let (rx, seqs) = fault_then_heal(Mode::Status(code, vec![]), 2, "2s");
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{code}");
        let failed = rx.requests().iter().filter(|r| r.answered == code).count();
        println!(
            "HTTP {code}: {failed} refused attempts, delivered {}, lost 0",
            seqs.len()
        );
    }
}

#[test]
fn retry_after_is_honoured() {
    let retry = vec![("Retry-After".to_string(), "2".to_string())];
    let rx = Receiver::start(Mode::Status(503, retry));
    let url = rx.url();
    let a = agent::start(config(&[("url", &url), ("interval", "100ms")])).unwrap();
    rx.wait_for(30, "first 503", |r| !r.requests().is_empty());
    rx.set_mode(Mode::Accept);
    rx.wait_for(30, "a retry", |r| r.requests().len() >= 2);
    a.stop();
    let reqs = rx.requests();
    let waited = reqs[1].at - reqs[0].at;
    // A lower bound only: the agent must not come back before 2 s.
    assert!(
        waited >= Duration::from_millis(1900),
        "retried after {waited:?}"
    );
    println!("503 Retry-After 2: retried after {waited:?}, lost 0");
}

#[test]
fn refused_payloads_are_dropped_and_counted() {
    for code in [400, 422] {
        let rx = Receiver::start(Mode::Status(code, vec![]));
        let url = rx.url();
        let a = agent::start(config(&[("url", &url), ("interval", "100ms")])).unwrap();
        rx.wait_for(30, "refusals", |r| r.requests().len() >= 3);
        rx.set_mode(Mode::Accept);
        rx.wait_for(30, "deliveries", |r| r.delivered().len() >= 3);
        let st = a.shared().status().clone();
        a.stop();
        let refused: usize = rx
            .requests()
            .iter()
            .filter(|r| r.answered == code)
            .map(|r| r.samples.len())
            .sum();
        assert!(
            st.rejected >= 3 && st.rejected as usize <= refused,
            "{code}"
        );
        // Refused samples are never sent again.
        let delivered = rx.delivered_seqs();
        for r in rx.requests().iter().filter(|r| r.answered == code) {
            for s in &r.samples {
                assert!(!delivered.contains(&s["seq"].as_u64().unwrap()));
            }
        }
        assert!(st.last_error.unwrap().contains(&code.to_string()));
        println!(
            "HTTP {code}: rejected {}, delivered {}",
            st.rejected,
            delivered.len()
        );
    }
}

#[test]
fn too_large_splits_the_batch_then_drops_only_a_single_refused_sample() {
    // Build a backlog first so that the first batch has many samples.
    let (addr, a) = agent_facing_an_outage(&[("batch", "16")]);
    wait_until(30, "backlog", || a.shared().buffer.len() >= 16);
    let rx = Receiver::start_on(addr, Mode::TooLargeAbove(3));
    rx.wait_for(60, "split deliveries", |r| r.delivered().len() >= 20);
    let sizes: Vec<usize> = rx.requests().iter().map(|r| r.samples.len()).collect();
    assert_eq!(sizes[0], 16, "{sizes:?}");
    assert!(sizes.contains(&2) || sizes.contains(&1), "{sizes:?}");
    let seqs = distinct_in_order(&rx.delivered_seqs());
    assert_eq!(seqs[..20], (1..=20).collect::<Vec<_>>()[..]);
    assert_eq!(a.shared().status().rejected, 0);
    // A single sample that is still too large is dropped and counted.
    rx.set_mode(Mode::TooLargeAbove(0));
    wait_until(30, "single-sample 413", || {
        a.shared().status().rejected >= 1
    });
    a.stop();
    println!(
        "413: request sizes {sizes:?}, delivered {}, lost 0 before the forced refusal",
        seqs.len()
    );
}

#[test]
fn a_manager_that_never_answers_times_out_and_loses_nothing() {
    let (rx, seqs) = fault_then_heal(Mode::Hang, 2, "500ms");
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    println!(
        "hanging manager: {} attempts timed out, delivered {}, lost 0",
        rx.requests().iter().filter(|r| r.answered == 0).count(),
        seqs.len()
    );
}

#[test]
fn collection_goes_on_while_a_request_hangs() {
    // The request may hang for 10 s; ten samples at 100 ms take about one.
    // If collection waited on delivery, seq could not advance by ten while
    // the first request is still open.
    let rx = Receiver::start(Mode::Hang);
    let url = rx.url();
    let a = agent::start(config(&[
        ("url", &url),
        ("interval", "100ms"),
        ("timeout", "10s"),
    ]))
    .unwrap();
    rx.wait_for(30, "the first request", |r| !r.requests().is_empty());
    let first = rx.requests()[0].at;
    let seq_at_hang = a.shared().latest().unwrap().seq;
    wait_until(30, "ten more samples", || {
        a.shared().latest().unwrap().seq >= seq_at_hang + 10
    });
    assert_eq!(
        rx.requests().len(),
        1,
        "the hanging request timed out first"
    );
    assert!(first.elapsed() < Duration::from_secs(10));
    rx.set_mode(Mode::Accept);
    a.stop();
}

#[test]
fn a_connection_closed_mid_response_is_retried() {
    let (rx, seqs) = fault_then_heal(Mode::CloseMidResponse, 2, "2s");
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    println!(
        "closed mid-response: {} broken attempts, delivered {}, lost 0",
        rx.requests().iter().filter(|r| r.answered == 0).count(),
        seqs.len()
    );
}

#[test]
fn connection_resets_are_retried() {
    let (_rx, seqs) = fault_then_heal(Mode::Reset, 2, "2s");
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

#[test]
fn sigterm_flushes_the_buffer_before_exit() {
    use std::process::{Command, Stdio};
    let retry = vec![("Retry-After".to_string(), "600".to_string())];
    let rx = Receiver::start(Mode::Status(503, retry));
    let child = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args(["--url", &rx.url(), "--interval", "100ms", "--listen", "off"])
        .args([
            "--proc-root",
            &common::fixture_root(),
            "--config",
            "/nonexistent",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The 503 asked for a 10-minute pause, so samples pile up in the buffer.
    rx.wait_for(30, "the 503", |r| !r.requests().is_empty());
    std::thread::sleep(Duration::from_millis(800));
    rx.set_mode(Mode::Accept);
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit status {:?}", out.status);
    let seqs = distinct_in_order(&rx.delivered_seqs());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(seqs.len() >= 5, "{seqs:?}\n{stderr}");
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{stderr}"
    );
    println!(
        "SIGTERM: flushed {} samples before exit, lost 0",
        seqs.len()
    );
}

#[test]
fn a_long_outage_logs_state_changes_not_every_retry() {
    use std::process::{Command, Stdio};
    let addr = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args(["--url", &format!("http://{addr}/v1/guest-metrics")])
        .args(["--interval", "100ms", "--listen", "off", "--log", "info"])
        .args([
            "--proc-root",
            &common::fixture_root(),
            "--config",
            "/nonexistent",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Nothing listens: every push is refused. Let a few retries happen (the
    // backoff starts at 1 s), then heal nothing and stop.
    std::thread::sleep(Duration::from_secs(4));
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(child.wait().unwrap().success());
    // One line when pushing starts failing; the periodic summary comes only
    // after 60 s; the shutdown says what could not be delivered.
    let failing = stderr.lines().filter(|l| l.contains("push failed")).count();
    assert_eq!(failing, 1, "{stderr}");
    assert!(stderr.contains("samples undelivered"), "{stderr}");
    assert!(stderr.lines().count() <= 6, "{stderr}");
}
