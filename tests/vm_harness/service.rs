//! What the tests of a shipped service (OpenRC, systemd) read from a VM:
//! marker lines from the guest and the samples a receiver got.
// Used by some of the test crates that include the harness, not all.
#![allow(dead_code)]

use super::{Post, samples};
use guest_agent::Sample;

/// A duration as seconds with two decimals, for the timings the service
/// tests report.
pub fn secs(d: std::time::Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// `key=value` out of a marker line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The number after `key=` in a marker line.
pub fn number(line: &str, key: &str) -> f64 {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number {key}= in {line:?}"))
}

/// The requests a receiver accepted (2xx).
pub fn delivered(posts: &[Post]) -> Vec<Post> {
    posts
        .iter()
        .filter(|p| (200..300).contains(&p.status))
        .cloned()
        .collect()
}

/// Samples of `run` delivered so far, by seq.
pub fn run_samples(posts: &[Post], run: &str) -> Vec<Sample> {
    let mut s: Vec<Sample> = samples(&delivered(posts))
        .into_iter()
        .filter(|s| s.run_id == run)
        .collect();
    s.sort_by_key(|s| s.seq);
    s
}

/// The first delivered sample of a run not in `known`: its run_id, seq and
/// when its request arrived.
pub fn new_run(posts: &[Post], known: &[String]) -> Option<(String, u64, std::time::Instant)> {
    delivered(posts).iter().find_map(|p| {
        let s = p
            .samples
            .as_ref()
            .ok()?
            .iter()
            .find(|s| !known.contains(&s.run_id))?;
        Some((s.run_id.clone(), s.seq, p.at))
    })
}
