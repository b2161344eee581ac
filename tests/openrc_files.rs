//! The OpenRC service files against the agent: every setting is in conf.d
//! and exported by the init script, and `start_pre` hands conf.d values to
//! the real binary (run with `--url off`: no network).
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
        "GUEST_AGENT_VM_ID=\"vm 7\"\nGUEST_AGENT_INTERVAL=2s\nNOT_AGENT=1",
        "--url off --proc-root tests/fixtures/host",
    );
    assert!(ok, "{stderr}");
    let config: serde_json::Value = serde_json::from_str(&stdout).expect("--print-config JSON");
    assert_eq!(config["vm_id"]["value"], "vm 7");
    assert_eq!(config["vm_id"]["source"], "env");
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

#[test]
fn health_url_follows_the_listen_setting() {
    let cases = [
        ("", "http://127.0.0.1:8080/health"),
        (
            "GUEST_AGENT_LISTEN=0.0.0.0:9000",
            "http://127.0.0.1:9000/health",
        ),
        ("GUEST_AGENT_LISTEN='[::]:81'", "http://[::1]:81/health"),
        (
            "GUEST_AGENT_LISTEN=127.0.0.2:8080",
            "http://127.0.0.2:8080/health",
        ),
        (
            "healthcheck_url=http://127.0.0.1:1/health",
            "http://127.0.0.1:1/health",
        ),
        ("GUEST_AGENT_LISTEN=off", "none"),
    ];
    for (confd, want) in cases {
        let script = format!("{confd}\n. ./{INIT}\n_health_url || echo none");
        let out = Command::new("sh")
            .args(["-c", &script])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want, "{confd}");
    }
}
