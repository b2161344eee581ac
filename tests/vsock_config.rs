//! `url = vsock://CID:PORT/PATH` as the configuration sees it (docs/vsock.md):
//! a bad one on the command line exits 2 with one line naming the flag and
//! the value; from the environment or the kernel command line it is logged
//! and the next source's URL is used; a good one is shown as is by
//! `--print-config`, and a sample's `guest_ip` is null.
//!
//! Nothing here opens a socket: `--print-config` and `--once` only read.

use std::process::{Command, Output};

fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run guest-agent")
}

/// A proc root holding only a kernel command line.
fn proc_root(cmdline: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cmdline"), cmdline).unwrap();
    dir
}

#[test]
fn bad_vsock_urls_on_the_command_line_exit_2_with_one_line() {
    for (url, why) in [
        ("vsock://2/v1/guest-metrics", "the port is missing"),
        ("vsock://host:1024/x", "CID \"host\" is not a number"),
        ("vsock://2:http/x", "port \"http\" is not a number"),
        ("vsock://0:1024/x", "CID 0 is reserved"),
        ("vsock://1:1024/x", "CID 1 is reserved"),
        ("vsock://{gateway}:1024/x", "is not a number"),
    ] {
        let out = agent(&["--url", url, "--print-config"], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{url}: one line: {stderr}");
        assert!(
            stderr.contains("--url")
                && stderr.contains(&format!("{url:?}"))
                && stderr.contains(why),
            "{url}: the message names the flag, the value and {why:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{url}: nothing printed on stdout");
    }
}

#[test]
fn bad_vsock_urls_elsewhere_fall_through_to_the_next_source() {
    let root = proc_root("console=ttyS0 guest_agent.url=vsock://2:x/v1/guest-metrics quiet\n");
    let out = agent(
        &[
            "--proc-root",
            root.path().to_str().unwrap(),
            "--config",
            root.path().join("no-such.conf").to_str().unwrap(),
            "--print-config",
        ],
        &[("GUEST_AGENT_URL", "vsock://0:1024/v1/guest-metrics")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(config["url"]["source"], "default", "{config}");
    assert!(
        stderr.contains("GUEST_AGENT_URL") && stderr.contains("CID 0 is reserved"),
        "{stderr}"
    );
    assert!(
        stderr.contains("guest_agent.url") && stderr.contains("port \"x\" is not a number"),
        "{stderr}"
    );
}

#[test]
fn a_vsock_url_is_printed_as_is_and_gives_no_guest_ip() {
    let url = "vsock://2:1024/v1/guest-metrics";
    let root = proc_root(&format!("console=ttyS0 guest_agent.url={url}\n"));
    let out = agent(
        &[
            "--proc-root",
            root.path().to_str().unwrap(),
            "--print-config",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(config["url"]["value"], url, "{config}");
    assert_eq!(config["url"]["source"], "cmdline", "{config}");
    assert_eq!(config["url"]["resolved"], url, "{config}");

    // A real /proc for the figures; `--once` collects and prints, it does
    // not push.
    let out = agent(&["--url", url, "--once"], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sample: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON sample");
    assert!(sample["guest_ip"].is_null(), "{sample}");
}
