//! The end-to-end VM harness: assets, initramfs, QEMU and an ingest receiver.

#[path = "../common/mod.rs"]
pub mod common;

pub mod assets;
pub mod cpio;
pub mod initramfs;
pub mod monitor;
pub mod overlay;
pub mod qemu;
pub mod receiver;
pub mod service;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use guest_agent::Sample;

pub use assets::Assets;
pub use qemu::{Boot, Vm};
pub use receiver::{Post, Receiver};

/// A ready VM test: the assets, the initramfs, and the lock that keeps VMs
/// one at a time (two TCG guests of two vCPUs on two cores would only slow
/// each other down).
pub struct Ready {
    pub assets: &'static Assets,
    pub initrd: &'static Path,
    _one_at_a_time: MutexGuard<'static, ()>,
}

/// The prerequisites, or `None` after printing why the test is skipped.
/// With `CI=true` or `GUEST_AGENT_VM_TEST=require` a missing one panics.
pub fn ready(test: &str) -> Option<Ready> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let prepared = assets::get().and_then(|a| initramfs::get(a).map(|i| (a, i)));
    match prepared {
        Ok((assets, initrd)) => Some(Ready {
            assets,
            initrd,
            _one_at_a_time: ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner()),
        }),
        Err(why) if assets::required() => {
            panic!(
                "{test}: VM prerequisites missing (required by CI=true or GUEST_AGENT_VM_TEST=require): {why}"
            )
        }
        Err(why) => {
            report(format_args!(
                "{test}: SKIPPED, VM prerequisites missing: {why}"
            ));
            None
        }
    }
}

/// Prints a line on the process's stderr directly, past the test harness's
/// output capture: skips and timings show in a plain `cargo test` run.
pub fn report(line: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The samples of all requests so far, in arrival order, duplicates (the
/// same run_id and seq, allowed after a timeout) removed.
pub fn samples(posts: &[Post]) -> Vec<Sample> {
    let mut seen = std::collections::BTreeSet::new();
    posts
        .iter()
        .filter_map(|p| p.samples.as_ref().ok())
        .flatten()
        .filter(|s| seen.insert((s.run_id.clone(), s.seq)))
        .cloned()
        .collect()
}

/// Sequence numbers per run_id, runs in order of first appearance.
pub fn runs(samples: &[Sample]) -> Vec<(String, Vec<u64>)> {
    let mut order: Vec<String> = Vec::new();
    let mut seqs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for s in samples {
        if !seqs.contains_key(&s.run_id) {
            order.push(s.run_id.clone());
        }
        seqs.entry(s.run_id.clone()).or_default().push(s.seq);
    }
    order
        .into_iter()
        .map(|r| {
            let mut v = seqs.remove(&r).unwrap();
            v.sort_unstable();
            (r, v)
        })
        .collect()
}

/// Asserts `seqs` (sorted) are exactly 1..=n.
pub fn assert_no_gaps(what: &str, seqs: &[u64]) {
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "{what}: seq must run 1, 2, 3… without gaps");
}

/// Asserts every request is a well-formed push of a non-empty sample array.
pub fn assert_wire_contract(posts: &[Post], path: &str) {
    for p in posts {
        assert_eq!(p.method, "POST", "{p:?}");
        assert_eq!(p.path, path, "{p:?}");
        let ct = p.headers.get("content-type").map(String::as_str);
        assert!(
            ct.is_some_and(|c| c.starts_with("application/json")),
            "Content-Type must be application/json: {p:?}"
        );
        let ua = p.headers.get("user-agent").map(String::as_str);
        assert!(
            ua.is_some_and(|u| u.starts_with("guest-agent/")),
            "User-Agent must be guest-agent/<version>: {p:?}"
        );
        match &p.samples {
            Ok(s) => assert!(!s.is_empty(), "empty sample array: {p:?}"),
            Err(e) => panic!("body is not a sample array: {e}"),
        }
    }
}
