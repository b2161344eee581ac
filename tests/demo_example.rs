//! The one-command tour (`examples/demo.rs`) run as the README says, with
//! `--seconds N`: it receives samples from the in-process agent on loopback,
//! and its table fits the terminal's width.

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

/// Every line fits the terminal: 80 columns by default, fewer when `COLUMNS`
/// says so (the rightmost columns are left out; seq and time stay).
#[test]
fn demo_fits_the_terminal_width() {
    for (columns, width) in [(None, 80), (Some("50"), 50)] {
        let mut cmd = Command::new(common::example_binary("demo"));
        cmd.args(["--seconds", "2", "--interval", "500ms"]);
        match columns {
            Some(c) => cmd.env("COLUMNS", c),
            None => cmd.env_remove("COLUMNS"),
        };
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        let table: Vec<&str> = stdout
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("seq"))
            .take_while(|l| !l.is_empty())
            .collect();
        assert!(table.len() >= 2, "no table rows\n{stdout}");
        for line in &table {
            assert!(
                line.chars().count() <= width,
                "{} columns > {width}: {line:?}",
                line.chars().count()
            );
        }
        let header: Vec<&str> = table[0].split_whitespace().collect();
        assert_eq!(header[..2], ["seq", "time"], "{stdout}");
        // At 80 columns nothing is left out.
        if width == 80 {
            assert_eq!(header.last(), Some(&"wr/s"), "{stdout}");
        }
    }
}

/// `--help` documents `--seconds` (the README points readers at it).
#[test]
fn demo_help_documents_seconds() {
    let out = Command::new(common::example_binary("demo"))
        .arg("--help")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("--seconds N"), "{stdout}");
    assert!(stdout.lines().all(|l| l.chars().count() <= 80), "{stdout}");
}
