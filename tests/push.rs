//! Push delivery against receivers on 127.0.0.1 (docs/design.md#delivery).
//! Faults are one table; each row prints what was delivered, lost and
//! rejected (run with --nocapture to see them). Tests wait for events with
//! generous deadlines and assert outcomes, never durations.

mod common;

use std::time::Duration;

use common::{AgentProcess, Mode, Receiver, config, wait_until};
use guest_agent::{PushState, Running, Sample, agent};

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

fn start(rx: &Receiver, extra: &[(&'static str, &str)]) -> Running {
    let url = rx.url();
    let mut pairs = vec![("url", url.as_str()), ("interval", "100ms")];
    pairs.extend_from_slice(extra);
    agent::start(config(&pairs)).unwrap()
}

fn latest_seq(a: &Running) -> u64 {
    a.latest().map_or(0, |s| s.seq)
}

#[test]
fn steady_state_delivers_every_seq_in_order_with_the_schema() {
    let rx = Receiver::start(Mode::Accept);
    let a = start(&rx, &[("interval", "200ms"), ("vm_id", "vm-steady")]);
    rx.wait_for(30, "8 samples", |r| r.delivered().len() >= 8);
    a.stop();
    for r in &rx.requests() {
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
    let h = a.health();
    assert_eq!(h.push_target.as_deref(), Some(rx.url().as_str()));
    assert_eq!(h.guest_ip.as_deref(), Some("127.0.0.1"));
    a.stop();
}

/// A receiver that resets every connection: the manager is down.
fn outage() -> Receiver {
    Receiver::start(Mode::Reset)
}

#[test]
fn outage_shorter_than_the_buffer_loses_nothing() {
    let rx = outage();
    let a = start(&rx, &[("buffer", "1000")]);
    wait_until(30, "15 samples buffered while failing", || {
        let h = a.health();
        h.buffered >= 15 && h.push_state == PushState::Failing
    });
    rx.set_mode(Mode::Accept);
    rx.wait_for(60, "seq 1..=25 delivered", |r| {
        r.delivered_seqs().iter().filter(|&&s| s <= 25).count() >= 25
    });
    a.stop();
    let distinct = distinct_in_order(&rx.delivered_seqs());
    assert_eq!(distinct[..25], (1..=25).collect::<Vec<_>>()[..]);
    assert!(rx.delivered().iter().all(|s| s["dropped_samples"] == 0));
    println!(
        "short outage: delivered {} distinct samples, lost 0",
        distinct.len()
    );
}

#[test]
fn outage_longer_than_the_buffer_keeps_the_newest_and_counts_the_rest() {
    let rx = outage();
    let a = start(&rx, &[("buffer", "5")]);
    wait_until(30, "samples dropped", || a.health().dropped >= 10);
    rx.set_mode(Mode::Accept);
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
    // The lost ones are the oldest of the outage: one contiguous run from
    // seq 1, and exactly as many as the samples say were dropped.
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

/// What a fault does to the samples sent during it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kept {
    /// Kept and retried: every seq arrives once the receiver heals.
    Retried,
    /// Refused for its payload: dropped, counted, never sent again.
    Rejected,
}

/// One row of the fault table.
struct Fault {
    name: &'static str,
    mode: Mode,
    timeout: &'static str,
    kept: Kept,
}

/// What a row came to.
#[derive(Debug)]
struct Outcome {
    failed_attempts: usize,
    delivered: usize,
    lost: usize,
    rejected: u64,
}

fn faults() -> Vec<Fault> {
    let status = |code| Mode::Status(code, vec![]);
    let row = |name, mode, timeout, kept| Fault {
        name,
        mode,
        timeout,
        kept,
    };
    vec![
        row("HTTP 500", status(500), "2s", Kept::Retried),
        row("HTTP 503", status(503), "2s", Kept::Retried),
        row("HTTP 429", status(429), "2s", Kept::Retried),
        row("never answers", Mode::Hang, "500ms", Kept::Retried),
        row(
            "closed mid-response",
            Mode::CloseMidResponse,
            "2s",
            Kept::Retried,
        ),
        row("connection reset", Mode::Reset, "2s", Kept::Retried),
        row("HTTP 400", status(400), "2s", Kept::Rejected),
        row("HTTP 422", status(422), "2s", Kept::Rejected),
    ]
}

/// Runs an agent against a receiver in the row's fault until it has failed
/// twice, checks what `/health` says meanwhile, heals the receiver, and
/// waits until the samples collected during the fault have been settled.
fn run_fault(f: &Fault) -> Outcome {
    let rx = Receiver::start(f.mode.clone());
    let a = start(&rx, &[("timeout", f.timeout)]);
    let failed = |rx: &Receiver| match f.mode {
        Mode::Reset => rx.connections() as usize,
        _ => rx.requests().len(),
    };
    // Counted by the agent: a first request from the collection thread that
    // runs out of its shorter time is sent again, not counted as a failure
    // (docs/performance.md#one-wake-up-per-sample).
    wait_until(60, "two failed attempts", || {
        let h = a.health();
        match f.kept {
            Kept::Retried => h.consecutive_failures >= 2,
            Kept::Rejected => h.rejected >= 2,
        }
    });
    let seq_at_fault = latest_seq(&a);
    let during = a.health();
    let expected_state = match f.kept {
        Kept::Retried => PushState::Failing,
        Kept::Rejected => PushState::Rejecting,
    };
    assert_eq!(during.push_state, expected_state, "{}: {during:?}", f.name);
    assert!(during.last_error.is_some(), "{}", f.name);
    let failed_attempts = failed(&rx);
    rx.set_mode(Mode::Accept);
    rx.wait_for(60, "delivery after healing", |r| {
        r.delivered_seqs().contains(&(seq_at_fault + 3))
    });
    wait_until(30, "push state ok again", || {
        a.health().push_state == PushState::Ok
    });
    let after = a.health();
    a.stop();
    let seqs = distinct_in_order(&rx.delivered_seqs());
    let last = *seqs.last().unwrap();
    let lost: Vec<u64> = (1..=last).filter(|s| !seqs.contains(s)).collect();
    match f.kept {
        Kept::Retried => {
            assert_eq!(lost, Vec::<u64>::new(), "{}", f.name);
            assert_eq!(after.rejected, 0, "{}", f.name);
        }
        Kept::Rejected => {
            // What was lost is exactly what was refused, and never resent.
            let refused: Vec<u64> = rx
                .requests()
                .iter()
                .filter(|r| !(200..300).contains(&r.answered))
                .flat_map(|r| r.samples.iter().map(|s| s["seq"].as_u64().unwrap()))
                .collect();
            assert!(lost.iter().all(|s| refused.contains(s)), "{}", f.name);
            assert!(refused.iter().all(|s| !seqs.contains(s)), "{}", f.name);
            assert_eq!(after.rejected, refused.len() as u64, "{}", f.name);
        }
    }
    Outcome {
        failed_attempts,
        delivered: seqs.len(),
        lost: lost.len(),
        rejected: after.rejected,
    }
}

#[test]
fn every_fault_in_the_table_is_retried_or_rejected_as_the_contract_says() {
    // Rows run side by side: each waits mostly on its own backoff.
    let rows = std::thread::scope(|s| {
        let handles: Vec<_> = faults()
            .into_iter()
            .map(|f| s.spawn(move || (f.name, run_fault(&f))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    println!(
        "{:<22} {:>8} {:>9} {:>5} {:>8}",
        "fault", "failed", "delivered", "lost", "rejected"
    );
    for (name, o) in rows {
        println!(
            "{name:<22} {:>8} {:>9} {:>5} {:>8}",
            o.failed_attempts, o.delivered, o.lost, o.rejected
        );
    }
}

#[test]
fn retry_after_is_honoured() {
    let retry = vec![("Retry-After".to_string(), "2".to_string())];
    let rx = Receiver::start(Mode::Status(503, retry));
    let a = start(&rx, &[]);
    rx.wait_for(30, "first 503", |r| !r.requests().is_empty());
    rx.set_mode(Mode::Accept);
    rx.wait_for(30, "a retry", |r| r.requests().len() >= 2);
    a.stop();
    let reqs = rx.requests();
    let waited = reqs[1].at - reqs[0].at;
    // A lower bound only, which a slow machine cannot break: the agent
    // must not come back before it was told to.
    assert!(
        waited >= Duration::from_millis(1900),
        "retried after {waited:?}"
    );
    println!("503 Retry-After 2: retried after {waited:?}, lost 0");
}

/// A struggling manager answering 503 with `Retry-After: 0` (or `+5`,
/// which is no delay at all) got about 42,000 requests in 5 s from one
/// agent. Every retry now waits at least the backoff's first step, so an
/// agent at a 100 ms cadence asks a few times a second at the most, and
/// its samples wait in the buffer.
#[test]
fn a_manager_saying_retry_after_0_is_never_hammered() {
    for said in ["0", "+5", "-1"] {
        let retry = vec![("Retry-After".to_string(), said.to_string())];
        let rx = Receiver::start(Mode::Status(503, retry));
        let a = start(&rx, &[]);
        rx.wait_for(30, "first 503", |r| !r.requests().is_empty());
        let first = rx.requests()[0].at;
        // Five seconds of failures, then the manager recovers.
        std::thread::sleep(Duration::from_secs(5));
        let during = rx
            .requests()
            .iter()
            .filter(|r| r.at < first + Duration::from_secs(5))
            .count();
        rx.set_mode(Mode::Accept);
        wait_until(60, "delivery after the outage", || a.health().delivered > 0);
        let h = a.stop();
        // An upper bound, which a slow machine only makes easier to meet:
        // at most one request per second of the outage, and the first.
        assert!(during <= 6, "Retry-After {said}: {during} requests in 5 s");
        assert_eq!(h.dropped, 0, "Retry-After {said}");
        println!("503 Retry-After {said}: {during} requests in 5 s of outage, none lost");
    }
}

#[test]
fn too_large_splits_the_batch_then_drops_only_a_single_refused_sample() {
    // Build a backlog first so that the first batch has many samples.
    let rx = outage();
    let a = start(&rx, &[("batch", "16")]);
    wait_until(30, "backlog", || a.health().buffered >= 16);
    rx.set_mode(Mode::TooLargeAbove(3));
    rx.wait_for(60, "split deliveries", |r| r.delivered().len() >= 20);
    let sizes: Vec<usize> = rx.requests().iter().map(|r| r.samples.len()).collect();
    assert_eq!(sizes[0], 16, "{sizes:?}");
    assert!(sizes.contains(&2) || sizes.contains(&1), "{sizes:?}");
    let seqs = distinct_in_order(&rx.delivered_seqs());
    assert_eq!(seqs[..20], (1..=20).collect::<Vec<_>>()[..]);
    assert_eq!(a.health().rejected, 0);
    // A single sample that is still too large is dropped and counted.
    rx.set_mode(Mode::TooLargeAbove(0));
    wait_until(30, "single-sample 413", || a.health().rejected >= 1);
    assert_eq!(a.health().push_state, PushState::Rejecting);
    a.stop();
    println!(
        "413: request sizes {sizes:?}, delivered {}, lost 0 before the forced refusal",
        seqs.len()
    );
}

#[test]
fn collection_goes_on_while_a_request_hangs() {
    // The request may hang for 10 s. If collection waited on delivery, seq
    // could not advance by ten while that first request is still open.
    let rx = Receiver::start(Mode::Hang);
    let a = start(&rx, &[("timeout", "5m")]);
    rx.wait_for(30, "the first request", |r| !r.requests().is_empty());
    let seq_at_hang = latest_seq(&a);
    wait_until(60, "ten more samples", || {
        latest_seq(&a) >= seq_at_hang + 10
    });
    // The first try, from the collection thread, gives up when the next
    // sample is due and leaves the sample to the push thread, whose request
    // is the one that hangs; nothing is sent beside it.
    assert!(
        rx.requests().len() <= 2,
        "the hanging request is still the only one open: {} requests",
        rx.requests().len()
    );
    rx.set_mode(Mode::Accept);
    a.stop();
}

/// GET /health of a child agent, as JSON.
fn health_of(addr: std::net::SocketAddr) -> serde_json::Value {
    serde_json::from_str(&common::get(addr, "/health").1).unwrap()
}

#[test]
fn sigterm_flushes_the_buffer_before_exit() {
    let retry = vec![("Retry-After".to_string(), "600".to_string())];
    let rx = Receiver::start(Mode::Status(503, retry));
    let url = rx.url();
    let agent = AgentProcess::start(&[
        "--url",
        &url,
        "--interval",
        "100ms",
        "--listen",
        "127.0.0.1:0",
    ]);
    let addr = agent.listen_addr();
    // The 503 asked for a 10-minute pause, so samples pile up in the buffer.
    rx.wait_for(30, "the 503", |r| !r.requests().is_empty());
    wait_until(30, "5 samples buffered", || {
        health_of(addr)["buffered"].as_u64().unwrap() >= 5
    });
    rx.set_mode(Mode::Accept);
    agent.signal("TERM");
    let (status, stderr) = agent.wait(60);
    assert!(status.success(), "exit status {status:?}\n{stderr}");
    let seqs = distinct_in_order(&rx.delivered_seqs());
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
fn a_second_signal_ends_the_flush_at_once() {
    // The manager never answers and the timeout is five minutes: the flush
    // would wait that long; the second signal must not.
    let rx = Receiver::start(Mode::Hang);
    let url = rx.url();
    let agent = AgentProcess::start(&["--url", &url, "--interval", "100ms", "--timeout", "5m"]);
    rx.wait_for(30, "a hanging request", |r| !r.requests().is_empty());
    agent.signal("TERM");
    agent.wait_for_log(30, "stopping");
    agent.signal("TERM");
    let (status, stderr) = agent.wait(120);
    rx.set_mode(Mode::Accept);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "{status:?} {:?}\n{stderr}",
        status.signal()
    );
    assert!(stderr.contains("again"), "{stderr}");
}

#[test]
fn a_long_outage_logs_state_changes_not_every_retry() {
    let rx = outage();
    let url = rx.url();
    let agent = AgentProcess::start(&["--url", &url, "--interval", "100ms", "--log", "info"]);
    // Every push is reset; let three attempts happen (the backoff starts at
    // 1 s and doubles), then stop without healing.
    rx.wait_for(60, "three failed attempts", |r| r.connections() >= 3);
    agent.signal("TERM");
    let (status, stderr) = agent.wait(60);
    assert!(status.success(), "{stderr}");
    // One line when pushing starts failing; the periodic summary comes only
    // after 60 s; the shutdown says what could not be delivered.
    let failing = stderr.lines().filter(|l| l.contains("push failed")).count();
    assert_eq!(failing, 1, "{stderr}");
    assert!(stderr.contains("samples undelivered"), "{stderr}");
    assert!(stderr.lines().count() <= 6, "{stderr}");
}

/// Times the thread named `name` of process `pid` has gone to sleep
/// (`voluntary_ctxt_switches`): each is a wake-up to come.
fn sleeps_of_thread(pid: u32, name: &str) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the agent's threads");
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        return status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches");
    }
    panic!("no thread named {name} in process {pid}");
}

#[test]
fn in_the_steady_state_the_push_thread_is_not_woken_for_each_sample() {
    // The collection thread sends a sample itself when nothing else waits
    // (docs/performance.md#one-wake-up-per-sample); the push thread stays
    // asleep. With a second's interval, the time a request may take (half
    // of it) is far beyond a loopback answer even on a busy machine; a late
    // answer would only hand a few samples back to the push thread.
    let rx = Receiver::start(Mode::Accept);
    let url = rx.url();
    let agent = AgentProcess::start(&["--url", &url, "--interval", "1s", "--kmsg", "off"]);
    rx.wait_for(30, "2 samples", |r| r.delivered().len() >= 2);
    let before = sleeps_of_thread(agent.pid(), "push");
    rx.wait_for(60, "10 more samples", |r| r.delivered().len() >= 12);
    let woken = sleeps_of_thread(agent.pid(), "push") - before;
    let seqs = rx.delivered_seqs();
    agent.terminate(10);
    // A push thread woken per sample sleeps at least once per sample.
    assert!(
        woken <= 4,
        "the push thread slept {woken} times over 10 samples"
    );
    assert_eq!(seqs[..12], (1..=12).collect::<Vec<_>>()[..]);
}
