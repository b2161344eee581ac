//! The OpenRC service files against the agent: every setting is in conf.d
//! and exported by the init script, `start_pre` hands conf.d values to the
//! real binary (run with `--url off`: no network), and `healthcheck` asks
//! the real binary's `--health` and stops a stand-in agent when it fails.
//! `tests/openrc_vm.rs` runs the same files under a real OpenRC.
//!
//! The init script is sourced by `sh` with OpenRC's output helpers (`eerror`,
//! `ewarn`) defined as plain `echo`s; everything else it runs is real.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use guest_agent::config::settings::SETTINGS;

const INIT: &str = "openrc/guest-agent";
const CONFD: &str = "openrc/guest-agent.confd";

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn env_names() -> BTreeSet<String> {
    SETTINGS.iter().map(|s| s.env()).collect()
}

#[test]
fn init_script_exports_exactly_the_settings() {
    let text = read(INIT);
    let start = text
        .find("guest_agent_env=\"")
        .expect("guest_agent_env in the init script")
        + "guest_agent_env=\"".len();
    let len = text[start..].find('"').expect("closing quote");
    let listed: BTreeSet<String> = text[start..start + len]
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(listed, env_names());
}

#[test]
fn confd_documents_every_setting() {
    let text = read(CONFD);
    for name in env_names() {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("#{name}="))),
            "{CONFD} lacks a commented {name}= line"
        );
    }
    // Everything is commented out: an installed conf.d changes nothing.
    for line in text.lines() {
        let line = line.trim();
        assert!(line.is_empty() || line.starts_with('#'), "{line:?}");
    }
}

#[test]
fn both_files_parse_as_posix_sh() {
    for f in [INIT, CONFD] {
        let out = Command::new("sh")
            .args(["-n", f])
            .output()
            .expect("run sh -n");
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Sources a conf.d body and the init script, runs `start_pre`, then asks
/// the agent (with the exported environment) for its configuration.
fn start_pre(confd: &str, command_args: &str) -> (bool, String, String) {
    let script = format!(
        "eerror() {{ echo \"eerror: $*\" >&2; }}
ewarn() {{ echo \"ewarn: $*\" >&2; }}
{confd}
command={bin:?}
command_args={command_args:?}
. ./{INIT}
start_pre || exit 3
# shellcheck disable=SC2086
exec \"$command\" $command_args --print-config",
        bin = env!("CARGO_BIN_EXE_guest-agent"),
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run sh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn start_pre_exports_confd_settings_to_the_agent() {
    let (ok, stdout, stderr) = start_pre(
        "GUEST_AGENT_VM_ID=\"vm-7\"\nGUEST_AGENT_KMSG=\"/dev/k msg\"\nGUEST_AGENT_INTERVAL=2s\nNOT_AGENT=1",
        "--url off --proc-root tests/fixtures/host",
    );
    assert!(ok, "{stderr}");
    let config: serde_json::Value = serde_json::from_str(&stdout).expect("--print-config JSON");
    assert_eq!(config["vm_id"]["value"], "vm-7");
    assert_eq!(config["vm_id"]["source"], "env");
    // A value with a space survives the export whole.
    assert_eq!(config["kmsg"]["value"], "/dev/k msg");
    assert_eq!(config["interval"]["value"], "2s");
    assert_eq!(config["interval"]["source"], "env");
    assert_eq!(config["url"]["source"], "cli");
}

#[test]
fn start_pre_refuses_a_usage_error() {
    let (ok, _, stderr) = start_pre("", "--url off --interval 5");
    assert!(!ok);
    assert!(stderr.contains("invalid command line"), "{stderr}");
    assert!(stderr.contains("--interval"), "{stderr}");
}

/// Sources the init script with `confd` and runs `healthcheck`, with
/// OpenRC's `service_get_value` answering `child_pid` with `pid`. Returns
/// the exit status and what the check wrote to its log.
fn healthcheck(confd: &str, pid: u32) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("guest-agent.log");
    let script = format!(
        "service_get_value() {{ [ \"$1\" = child_pid ] && echo {pid}; }}
{confd}
command={bin:?}
error_log={log:?}
. ./{INIT}
healthcheck",
        bin = env!("CARGO_BIN_EXE_guest-agent"),
        log = log.display().to_string(),
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run sh");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    (out.status.success(), text)
}

/// Where nothing listens: port 1 (tcpmux) is privileged and unused, and,
/// unlike a port bound and released, no parallel test can be given it.
const NOBODY: &str = "127.0.0.1:1";

/// A process standing in for the agent: `sh` running a loop.
fn stand_in(ignore_term: bool) -> std::process::Child {
    let body = if ignore_term {
        "trap '' TERM; while :; do sleep 0.1; done"
    } else {
        "while :; do sleep 0.1; done"
    };
    Command::new("sh")
        .args(["-c", body])
        .spawn()
        .expect("spawn sh")
}

#[test]
fn a_healthy_agent_is_left_alone() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && conn.read(&mut b).unwrap() == 1 {
            head.push(b[0]);
        }
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}")
            .unwrap();
    });
    let mut agent = stand_in(false);
    // The listener comes from conf.d, exported to `--health` as to the agent.
    let (ok, log) = healthcheck(
        &format!("GUEST_AGENT_LISTEN={addr}\nGUEST_AGENT_URL=off"),
        agent.id(),
    );
    server.join().unwrap();
    assert!(ok);
    assert_eq!(log, "", "nothing to note");
    assert!(agent.try_wait().unwrap().is_none(), "the agent still runs");
    agent.kill().unwrap();
    agent.wait().unwrap();
}

#[test]
fn a_failed_check_stops_the_agent_with_sigterm_and_notes_why() {
    use std::os::unix::process::ExitStatusExt;
    let addr = NOBODY;
    let mut agent = stand_in(false);
    let (ok, log) = healthcheck(
        &format!("GUEST_AGENT_LISTEN={addr}\nGUEST_AGENT_URL=off"),
        agent.id(),
    );
    // Success for supervise-daemon: the agent is already gone, and its
    // ordinary respawn follows (see the comment in the init script).
    assert!(ok);
    let status = agent.wait().unwrap();
    assert_eq!(status.signal(), Some(15), "SIGTERM first: {status:?}");
    assert!(
        log.contains(&format!(
            "WARN  openrc: health check failed (unhealthy: http://{addr}/health: connect to {addr}: "
        )),
        "{log}"
    );
}

#[test]
fn an_agent_that_ignores_sigterm_gets_sigkill_after_the_retry_wait() {
    use std::os::unix::process::ExitStatusExt;
    let addr = NOBODY;
    let mut agent = stand_in(true);
    // Let the stand-in install its trap before the check runs.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (ok, log) = healthcheck(
        &format!("GUEST_AGENT_LISTEN={addr}\nGUEST_AGENT_URL=off\nretry=TERM/1/KILL/5"),
        agent.id(),
    );
    assert!(ok);
    let status = agent.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    assert!(log.contains("ignored SIGTERM; sending SIGKILL"), "{log}");
}

#[test]
fn no_listener_means_nothing_to_check() {
    let mut agent = stand_in(false);
    let (ok, log) = healthcheck("GUEST_AGENT_LISTEN=off\nGUEST_AGENT_URL=off", agent.id());
    assert!(ok);
    assert_eq!(log, "");
    assert!(agent.try_wait().unwrap().is_none());
    agent.kill().unwrap();
    agent.wait().unwrap();
}
