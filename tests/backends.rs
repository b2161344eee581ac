//! What a metrics backend sees (docs/backends.md): Influx line protocol
//! bodies and the bearer token, against receivers on 127.0.0.1, and the
//! token kept out of every log line and of `--print-config`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{AgentProcess, Mode, Receiver, Request, config, fixture_root};
use guest_agent::Sample;
use guest_agent::agent;

const TOKEN: &str = "s3cr3t-tok";

fn header<'a>(r: &'a Request, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// One parsed line of line protocol: tags, fields (raw text), timestamp.
#[derive(Debug)]
struct Line {
    tags: BTreeMap<String, String>,
    fields: BTreeMap<String, String>,
    timestamp: u64,
}

/// Splits `s` on `sep` where it is not escaped by a backslash.
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let last = parts.last_mut().unwrap();
                last.push(c);
                if let Some(n) = chars.next() {
                    last.push(n);
                }
            }
            c if c == sep => parts.push(String::new()),
            c => parts.last_mut().unwrap().push(c),
        }
    }
    parts
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.extend(chars.next());
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses a line `guest,tag=v,… field=v,… timestamp` (no string fields).
fn parse_line(line: &str) -> Line {
    let parts = split_unescaped(line, ' ');
    assert_eq!(parts.len(), 3, "{line:?}");
    let mut series = split_unescaped(&parts[0], ',').into_iter();
    assert_eq!(series.next().as_deref(), Some("guest"), "{line:?}");
    let pair = |kv: String| {
        let kv = split_unescaped(&kv, '=');
        assert_eq!(kv.len(), 2, "{line:?}");
        (unescape(&kv[0]), unescape(&kv[1]))
    };
    Line {
        tags: series.map(pair).collect(),
        fields: split_unescaped(&parts[1], ',')
            .into_iter()
            .map(pair)
            .collect(),
        timestamp: parts[2].parse().expect("integer timestamp"),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn influx_bodies_have_one_line_per_sample_and_batch_after_an_outage() {
    // Nothing listens at first: samples pile up, then go out in one batch.
    let rx = Receiver::start(Mode::Reset);
    let url = format!("http://{}/write", rx.addr);
    let started_ms = now_ms();
    let a = agent::start(config(&[
        ("url", &url),
        ("format", "influx"),
        ("interval", "100ms"),
        ("vm_id", "vm-7.a_b~c"),
    ]))
    .unwrap();
    let mut seen: BTreeMap<u64, Arc<Sample>> = BTreeMap::new();
    let record = |seen: &mut BTreeMap<u64, Arc<Sample>>| {
        if let Some(s) = a.latest() {
            seen.insert(s.seq, s);
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.health().buffered < 6 {
        record(&mut seen);
        assert!(Instant::now() < deadline, "no backlog after 30 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let backlog = a.health().buffered;
    rx.set_mode(Mode::Accept);
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.health().delivered < backlog as u64 + 4 {
        record(&mut seen);
        assert!(Instant::now() < deadline, "not delivered after 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    a.stop();
    let ended_ms = now_ms();

    let reqs: Vec<Request> = rx
        .requests()
        .into_iter()
        .filter(|r| r.answered == 204)
        .collect();
    let mut lines = Vec::new();
    let mut per_request = Vec::new();
    for r in &reqs {
        assert_eq!(r.path, "/write");
        assert_eq!(header(r, "content-type"), Some("text/plain; charset=utf-8"));
        assert_eq!(header(r, "authorization"), None, "no token configured");
        let body = std::str::from_utf8(&r.body).unwrap();
        assert!(body.ends_with('\n'), "{body:?}");
        let n = body.lines().count();
        per_request.push(n);
        for l in body.lines() {
            assert!(l.starts_with("guest,vm_id="), "{l:?}");
            lines.push(parse_line(l));
        }
    }
    // The first delivery carries the whole backlog, one line per sample.
    assert!(per_request[0] >= backlog, "{per_request:?} vs {backlog}");

    // Each sample once, in order: seq 1..=n as an integer field.
    let seqs: Vec<u64> = lines
        .iter()
        .map(|l| l.fields["seq"].strip_suffix('i').unwrap().parse().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());

    let fixture_hostname =
        std::fs::read_to_string(format!("{}/sys/kernel/hostname", fixture_root())).unwrap();
    for (l, seq) in lines.iter().zip(&seqs) {
        assert_eq!(l.tags["vm_id"], "vm-7.a_b~c");
        assert_eq!(l.tags["hostname"], fixture_hostname.trim());
        // Nanoseconds: a whole number of milliseconds, during this test.
        assert_eq!(l.timestamp % 1_000_000, 0, "{l:?}");
        let ms = l.timestamp / 1_000_000;
        assert!((started_ms..=ended_ms).contains(&ms), "{l:?}");
        // Where this thread saw the sample, the line carries its values.
        if let Some(s) = seen.get(seq) {
            assert_eq!(l.timestamp, s.timestamp_ms * 1_000_000);
            assert_eq!(
                l.fields["memory_total_kb"],
                format!("{}i", s.memory_total_kb.unwrap())
            );
            assert_eq!(
                l.fields["cpu_usage_percent"].parse::<f64>().unwrap(),
                s.cpu_usage_percent.unwrap()
            );
        }
    }
    assert!(!seen.is_empty());
    println!(
        "influx: {} lines in requests of {per_request:?} (backlog {backlog}), {} checked against the agent's samples",
        lines.len(),
        seqs.iter().filter(|s| seen.contains_key(s)).count()
    );
}

fn agent_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_guest-agent"));
    cmd.args(["--listen", "off", "--config", "/nonexistent"])
        .args(["--proc-root", &fixture_root()])
        .env_remove("GUEST_AGENT_TOKEN")
        .env_remove("GUEST_AGENT_URL");
    cmd
}

#[test]
fn the_token_goes_in_the_authorization_header_and_never_into_the_log() {
    let rx = Receiver::start(Mode::Status(500, vec![]));
    let url = rx.url();
    let agent = AgentProcess::start(&[
        "--url",
        &url,
        "--interval",
        "100ms",
        "--token",
        TOKEN,
        "--log",
        "debug",
    ]);
    // Failures first, so that warnings and debug lines about them are written.
    rx.wait_for(30, "three refused pushes", |r| r.requests().len() >= 3);
    rx.set_mode(Mode::Accept);
    rx.wait_for(30, "deliveries", |r| r.delivered().len() >= 3);
    agent.signal("TERM");
    let (status, stderr) = agent.wait(60);
    assert!(status.success(), "{status:?}\n{stderr}");

    let reqs = rx.requests();
    assert!(reqs.iter().any(|r| r.answered == 500));
    for r in &reqs {
        assert_eq!(
            header(r, "authorization"),
            Some(format!("Bearer {TOKEN}").as_str())
        );
    }
    // The log is not empty: it reports the failures, the recovery, the stop.
    assert!(stderr.contains("HTTP 500"), "{stderr}");
    assert!(stderr.contains("delivering again"), "{stderr}");
    assert!(stderr.contains("DEBUG"), "{stderr}");
    assert!(!stderr.contains(TOKEN), "token in the log:\n{stderr}");
    println!(
        "token: {} requests carried it, {} log lines without it",
        reqs.len(),
        stderr.lines().count()
    );
}

#[test]
fn a_token_file_is_read_checked_and_preferred_over_a_lower_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let set_mode = |mode| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    set_mode(0o600);
    let rx = Receiver::start(Mode::Accept);
    let url = rx.url();
    let path = file.display().to_string();
    let a = agent::start(config(&[
        ("url", &url),
        ("interval", "100ms"),
        ("token_file", &path),
    ]))
    .unwrap();
    rx.wait_for(30, "a delivery", |r| !r.delivered().is_empty());
    a.stop();
    for r in rx.requests() {
        assert_eq!(
            header(&r, "authorization"),
            Some(format!("Bearer {TOKEN}").as_str())
        );
    }

    // On the CLI, an unreadable or empty token file is a usage error.
    let out = agent_command()
        .args([
            "--url",
            "off",
            "--token-file",
            "/nonexistent/token",
            "--print-config",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("token_file") && stderr.contains("/nonexistent/token"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    // From the environment, a file others may read works, with a warning;
    // and it beats a token from the kernel cmdline (a lower source).
    set_mode(0o644);
    let out = agent_command()
        .args(["--url", "off", "--print-config"])
        .env("GUEST_AGENT_TOKEN_FILE", &path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
    assert!(!stderr.contains(TOKEN), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains(TOKEN), "{stdout}");
}

#[test]
fn a_token_on_the_kernel_cmdline_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let proc_root = dir.path();
    for f in ["meminfo", "stat"] {
        std::fs::copy(Path::new(&fixture_root()).join(f), proc_root.join(f)).unwrap();
    }
    std::fs::write(
        proc_root.join("cmdline"),
        format!("console=ttyS0 guest_agent.token={TOKEN}\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args([
            "--url",
            "off",
            "--listen",
            "off",
            "--config",
            "/nonexistent",
        ])
        .args([
            "--proc-root",
            &proc_root.display().to_string(),
            "--print-config",
        ])
        .env_remove("GUEST_AGENT_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("every process in the guest can read"),
        "{stderr}"
    );
    assert!(!stderr.contains(TOKEN), "{stderr}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        j["token"],
        serde_json::json!({"value": "set", "source": "cmdline"})
    );
}

#[test]
fn print_config_shows_only_whether_the_token_is_set() {
    let run = |cmd: &mut Command| {
        let out = cmd.arg("--print-config").output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(!stdout.contains("s3cr3t"), "{stdout}");
        assert!(!stderr.contains("s3cr3t"), "{stderr}");
        let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        (j["token"].clone(), stderr)
    };
    let (token, _) = run(agent_command().args(["--token", TOKEN, "--url", "off"]));
    assert_eq!(token, serde_json::json!({"value": "set", "source": "cli"}));
    let (token, _) = run(agent_command()
        .args(["--url", "off"])
        .env("GUEST_AGENT_TOKEN", TOKEN));
    assert_eq!(token, serde_json::json!({"value": "set", "source": "env"}));
    // A bad token from the environment is reported, without its value.
    let (token, stderr) = run(agent_command()
        .args(["--url", "off"])
        .env("GUEST_AGENT_TOKEN", "s3cr3t with spaces"));
    assert_eq!(
        token,
        serde_json::json!({"value": "unset", "source": "default"})
    );
    assert!(stderr.contains("GUEST_AGENT_TOKEN"), "{stderr}");
    let (token, _) = run(agent_command().args(["--url", "off"]));
    assert_eq!(
        token,
        serde_json::json!({"value": "unset", "source": "default"})
    );
}
