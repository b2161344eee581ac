//! The `flush` setting against receivers on 127.0.0.1: samples held and
//! pushed together, a full batch sent at once, nothing lost at SIGTERM or
//! a snapshot restore. Tests wait for events with generous deadlines and
//! assert outcomes, never durations.

mod common;

use std::io::Write;

use common::{AgentProcess, Mode, Receiver, config, wait_until};
use guest_agent::agent;

/// Every seq from 1 on, each delivered once per request it was sent in,
/// in order: the distinct seqs.
fn distinct(seqs: &[u64]) -> Vec<u64> {
    let mut seen: Vec<u64> = Vec::new();
    for &s in seqs {
        if !seen.contains(&s) {
            seen.push(s);
        }
    }
    seen
}

#[test]
fn held_samples_go_in_one_post_and_none_is_lost() {
    let rx = Receiver::start(Mode::Accept);
    let url = rx.url();
    let a = agent::start(config(&[
        ("url", url.as_str()),
        ("interval", "100ms"),
        ("flush", "2s"),
        ("kmsg", "off"),
    ]))
    .unwrap();
    rx.wait_for(60, "3 POSTs", |r| r.requests().len() >= 3);
    a.stop();
    let requests = rx.requests();
    let samples: usize = requests.iter().map(|r| r.samples.len()).sum();
    // 2 s of samples at 100 ms: each POST carries many.
    assert!(
        requests.len() * 2 <= samples,
        "{} POSTs for {samples} samples",
        requests.len()
    );
    let seqs = distinct(&rx.delivered_seqs());
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

#[test]
fn a_full_batch_does_not_wait_for_the_flush() {
    let rx = Receiver::start(Mode::Accept);
    let url = rx.url();
    let a = agent::start(config(&[
        ("url", url.as_str()),
        ("interval", "100ms"),
        ("flush", "1h"),
        ("batch", "5"),
        ("kmsg", "off"),
    ]))
    .unwrap();
    rx.wait_for(60, "3 POSTs", |r| r.requests().len() >= 3);
    a.stop();
    let requests = rx.requests();
    for r in &requests[..3] {
        assert_eq!(r.samples.len(), 5, "a full batch of 5");
    }
    let seqs = distinct(&rx.delivered_seqs());
    assert_eq!(seqs[..15], (1..=15).collect::<Vec<_>>()[..]);
}

#[test]
fn sigterm_pushes_the_held_samples_before_exit() {
    let rx = Receiver::start(Mode::Accept);
    let url = rx.url();
    let agent = AgentProcess::start(&[
        "--url",
        &url,
        "--interval",
        "100ms",
        "--flush",
        "1h",
        "--listen",
        "127.0.0.1:0",
        "--kmsg",
        "off",
    ]);
    let addr = agent.listen_addr();
    wait_until(60, "5 samples held", || {
        let health: serde_json::Value =
            serde_json::from_str(&common::get(addr, "/health").1).unwrap();
        health["buffered"].as_u64().unwrap_or(0) >= 5
    });
    assert!(rx.requests().is_empty(), "nothing pushed before the hour");
    agent.signal("TERM");
    let (status, stderr) = agent.wait(60);
    assert!(status.success(), "exit status {status:?}\n{stderr}");
    let seqs = distinct(&rx.delivered_seqs());
    assert!(seqs.len() >= 5, "{seqs:?}\n{stderr}");
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{stderr}"
    );
}

#[test]
fn a_snapshot_restore_pushes_the_held_samples() {
    let rx = Receiver::start(Mode::Accept);
    let url = rx.url();
    // A plain file standing in for /dev/kmsg: the kernel's fork line
    // written to it is a restore.
    let kmsg = tempfile::NamedTempFile::new().unwrap();
    let kmsg_path = kmsg.path().to_str().unwrap().to_string();
    let a = agent::start(config(&[
        ("url", url.as_str()),
        ("interval", "100ms"),
        ("flush", "1h"),
        ("kmsg", kmsg_path.as_str()),
    ]))
    .unwrap();
    wait_until(60, "3 samples collected", || {
        a.latest().is_some_and(|s| s.seq >= 3)
    });
    let parent_run = a.latest().unwrap().run_id.clone();
    assert!(rx.requests().is_empty(), "nothing pushed before the hour");
    // The line the kernel logs when VMGenID reports a new generation.
    writeln!(
        kmsg.as_file(),
        "6,1234,5678,-;random: crng reseeded due to virtual machine fork"
    )
    .unwrap();
    rx.wait_for(60, "the parent's samples pushed", |r| {
        r.delivered()
            .iter()
            .any(|s| s["run_id"] == parent_run.as_str())
    });
    a.stop();
    let parent: Vec<u64> = rx
        .delivered()
        .iter()
        .filter(|s| s["run_id"] == parent_run.as_str())
        .map(|s| s["seq"].as_u64().unwrap())
        .collect();
    let parent = distinct(&parent);
    assert!(parent.len() >= 3, "{parent:?}");
    assert_eq!(parent, (1..=parent.len() as u64).collect::<Vec<_>>());
}
