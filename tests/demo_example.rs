//! The one-command tour (`examples/demo.rs`) run as the README says, with
//! `--seconds 3`: it receives samples from the in-process agent on loopback.

mod common;

use std::process::Command;

#[test]
fn demo_receives_at_least_two_samples_in_three_seconds() {
    let out = Command::new(common::example_binary("demo"))
        .args(["--seconds", "3"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("pushing to http://127.0.0.1:"), "{stdout}");
    // Table rows start with the seq; they count 1, 2, 3… without gaps.
    let seqs: Vec<u64> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(seqs.len() >= 2, "{stdout}");
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{stdout}"
    );
    let summary = stdout.lines().last().unwrap_or("");
    assert!(
        summary.starts_with(&format!("received {} samples", seqs.len())),
        "{stdout}"
    );
}
