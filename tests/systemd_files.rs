//! The systemd unit and its environment file against the agent: every
//! setting is documented in the environment file, nothing in it is set by
//! default, and the unit keeps the properties docs/systemd.md promises.
//! `tests/systemd_vm.rs` runs both files under a real systemd; `.ci/run`
//! runs `systemd-analyze verify` and `systemd-analyze security` on the unit.

use std::path::Path;

use guest_agent::config::settings::SETTINGS;

const UNIT: &str = "systemd/guest-agent.service";
const DEFAULT: &str = "systemd/guest-agent.default";

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The unit's `Key=value` lines (comments and sections left out).
fn directives(text: &str) -> Vec<(&str, &str)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .collect()
}

#[test]
fn the_environment_file_documents_every_setting_and_sets_none() {
    let text = read(DEFAULT);
    for s in SETTINGS {
        let name = s.env();
        assert!(
            text.lines().any(|l| l.starts_with(&format!("#{name}="))),
            "{DEFAULT} lacks a commented {name}= line"
        );
    }
    for line in text.lines() {
        let line = line.trim();
        assert!(line.is_empty() || line.starts_with('#'), "{line:?}");
    }
}

#[test]
fn the_unit_is_a_notify_service_that_never_gives_up_and_waits_for_no_network() {
    let text = read(UNIT);
    let d = directives(&text);
    let value = |key: &str| -> Vec<&str> {
        d.iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .collect()
    };
    assert_eq!(value("Type"), ["notify"]);
    assert_eq!(value("Restart"), ["always"]);
    assert_eq!(value("StartLimitIntervalSec"), ["0"]);
    assert_eq!(
        value("RestartPreventExitStatus"),
        ["2"],
        "only a usage error"
    );
    assert_eq!(value("WatchdogSec"), ["30s"]);
    assert_eq!(
        value("EnvironmentFile"),
        ["-/etc/default/guest-agent"],
        "a missing environment file is no error"
    );
    assert_eq!(
        value("ExecStart"),
        ["/usr/local/bin/guest-agent $GUEST_AGENT_ARGS"]
    );
    assert_eq!(value("WantedBy"), ["multi-user.target"]);
    // No network manager, no network-online wait, no fixed sleep.
    for (k, v) in &d {
        assert!(
            !matches!(*k, "Requires" | "BindsTo" | "Wants" | "After" | "Requisite")
                || !(v.contains("network") || v.contains("NetworkManager")),
            "{k}={v}"
        );
        assert!(!v.contains("sleep"), "{k}={v}");
    }
    // Everything the agent reads and binds stays reachable.
    let families = value("RestrictAddressFamilies").join(" ");
    for f in ["AF_INET", "AF_INET6", "AF_UNIX", "AF_VSOCK"] {
        assert!(families.split_whitespace().any(|x| x == f), "{families}");
    }
    for breaks in [
        "PrivateDevices",
        "ProtectKernelLogs",
        "ProcSubset",
        "ProtectProc",
        "PrivateNetwork",
        "PrivateUsers",
        "ProtectHostname",
        "IPAddressDeny",
        "SocketBindDeny",
    ] {
        assert!(value(breaks).is_empty(), "{breaks}= breaks the agent");
    }
    assert_eq!(value("DeviceAllow"), ["/dev/kmsg r"]);
    assert_eq!(value("AmbientCapabilities"), ["CAP_SYSLOG"]);
}
