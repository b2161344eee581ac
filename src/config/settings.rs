//! The settings table: one row per setting drives the CLI flag, the
//! environment name, the kernel cmdline key, the default, `--help` and
//! `--print-config` (docs/design.md#configuration). Adding a setting is one
//! row here and one field in [`super::Config`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::net::url::UrlTemplate;

/// One setting, as every source names it.
#[derive(Debug)]
pub struct Setting {
    /// Canonical name: the key in `--print-config` and after `guest_agent.`.
    pub name: &'static str,
    /// Placeholder shown in `--help`.
    pub value_name: &'static str,
    /// The default, as a user would type it; `None` for no default.
    pub default: Option<&'static str>,
    /// Whether the kernel cmdline may set it (not `proc_root`: the cmdline is read from it).
    pub on_cmdline: bool,
    /// Whether the value is a secret: never printed, logged or shown in `/health`.
    pub secret: bool,
    /// One line for `--help`.
    pub help: &'static str,
    /// Checks a value, saying what is accepted when it is not.
    pub check: fn(&str) -> Result<(), String>,
}

impl Setting {
    /// The CLI flag, `--vm-id` for `vm_id`.
    pub fn flag(&self) -> String {
        format!("--{}", self.name.replace('_', "-"))
    }

    /// The environment variable, `GUEST_AGENT_VM_ID` for `vm_id`.
    pub fn env(&self) -> String {
        format!("GUEST_AGENT_{}", self.name.to_ascii_uppercase())
    }
}

/// Shortest interval accepted: below it the agent would cost the guest more
/// than it is worth.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest interval accepted.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// Shortest request timeout accepted.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest request timeout accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest buffer accepted, in samples. The buffer is bounded in bytes
/// too ([`BUFFER_MAX_BYTES`], [`BUFFER_MEMORY_SHARE`]), so a large count
/// cannot take a small guest's memory.
pub const MAX_BUFFER: usize = 1_000_000;
/// Most bytes the buffer may hold, whatever the guest's memory.
pub const BUFFER_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Most of the guest's memory the buffer may hold: 1/this of MemTotal
/// (2 %: 2.6 MiB in a 128 MiB guest, where the default 1000 samples take
/// about 0.7 MiB).
pub const BUFFER_MEMORY_SHARE: usize = 50;
/// The buffer's byte bound for a guest that can use `memory_kb`:
/// [`BUFFER_MAX_BYTES`], or its [`BUFFER_MEMORY_SHARE`] when that is less.
pub fn buffer_bound(memory_kb: u64) -> usize {
    (memory_kb.saturating_mul(1024) / BUFFER_MEMORY_SHARE as u64).min(BUFFER_MAX_BYTES as u64)
        as usize
}

/// Largest token file read.
pub const MAX_TOKEN_FILE: u64 = 4096;
/// Largest batch accepted, in samples per POST.
pub const MAX_BATCH: usize = 10_000;
/// Longest VM id accepted, in bytes.
pub const MAX_VM_ID: usize = 256;
/// The kernel log device, watched for snapshot restores by default
/// (docs/snapshots.md).
pub const DEFAULT_KMSG: &str = "/dev/kmsg";
/// Where Firecracker's MMDS answers unless the host chose another address.
pub const DEFAULT_MMDS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), 80);

/// Every setting, in the order `--help` and `--print-config` show them.
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: "url",
        value_name: "URL|off",
        default: Some("http://{gateway}:18080/v1/guest-metrics"),
        on_cmdline: true,
        secret: false,
        help: "where samples are POSTed; {gateway} is the default gateway; off disables pushing",
        check: check_url,
    },
    Setting {
        name: "interval",
        value_name: "DURATION",
        default: Some("5s"),
        on_cmdline: true,
        secret: false,
        help: "time between samples (500ms, 5s, 1m)",
        check: check_interval,
    },
    Setting {
        name: "listen",
        value_name: "ADDR:PORT|off",
        default: Some("127.0.0.1:8080"),
        on_cmdline: true,
        secret: false,
        help: "address of the /health and /metrics listener; off disables it",
        check: check_listen,
    },
    Setting {
        name: "vm_id",
        value_name: "ID",
        default: None,
        on_cmdline: true,
        secret: false,
        help: "this VM's id, carried in every sample",
        check: check_vm_id,
    },
    Setting {
        name: "timeout",
        value_name: "DURATION",
        default: Some("2s"),
        on_cmdline: true,
        secret: false,
        help: "deadline of a whole push request",
        check: check_timeout,
    },
    Setting {
        name: "buffer",
        value_name: "N",
        default: Some("1000"),
        on_cmdline: true,
        secret: false,
        help: "samples kept while the manager is unreachable; the oldest go first",
        check: check_buffer,
    },
    Setting {
        name: "batch",
        value_name: "N",
        default: Some("100"),
        on_cmdline: true,
        secret: false,
        help: "most samples per POST",
        check: check_batch,
    },
    Setting {
        name: "log",
        value_name: "LEVEL",
        default: Some("info"),
        on_cmdline: true,
        secret: false,
        help: "log level on stderr: error, warn, info, debug, trace or off",
        check: check_log,
    },
    Setting {
        name: "proc_root",
        value_name: "DIR",
        default: Some("/proc"),
        on_cmdline: false,
        secret: false,
        help: "where /proc is mounted (tests point it at fixtures)",
        check: check_proc_root,
    },
    Setting {
        name: "sys_root",
        value_name: "DIR",
        default: Some("/sys"),
        on_cmdline: false,
        secret: false,
        help: "where /sys is mounted (the balloon device's features; tests point it at fixtures)",
        check: check_proc_root,
    },
    Setting {
        name: "format",
        value_name: "json|influx|otlp",
        default: Some("json"),
        on_cmdline: true,
        secret: false,
        help: "body of each POST: a JSON array, Influx line protocol, or OTLP/HTTP JSON",
        check: check_format,
    },
    Setting {
        name: "token",
        value_name: "TOKEN",
        default: None,
        on_cmdline: true,
        secret: true,
        help: "sent as Authorization: Bearer; never printed (prefer token_file)",
        check: check_token,
    },
    Setting {
        name: "token_file",
        value_name: "PATH",
        default: None,
        on_cmdline: true,
        secret: false,
        help: "a file (mode 0600) whose content is the token; beats token from a lower source",
        check: check_path,
    },
    // The pull-model manager's side of the drop-in mode (docs/manager.md).
    Setting {
        name: "manager_url",
        value_name: "URL|off",
        default: None,
        on_cmdline: true,
        secret: false,
        help: "manager base URL told the guest's address (POST URL/v1/vms/VM_ID/guest-ip); MANAGER_URL in the config file sets it",
        check: check_url,
    },
    Setting {
        name: "mmds",
        value_name: "off|on|ADDR[:PORT]",
        default: Some("off"),
        on_cmdline: true,
        secret: false,
        help: "read settings from Firecracker's MMDS (on: 169.254.169.254) at start and after a snapshot restore",
        check: check_mmds,
    },
    Setting {
        name: "kmsg",
        value_name: "PATH|off",
        default: Some(DEFAULT_KMSG),
        on_cmdline: true,
        secret: false,
        help: "kernel log watched for snapshot restores (VMGenID); off disables the detection",
        check: check_kmsg,
    },
    // The VM's own signing key (docs/security.md).
    Setting {
        name: "key",
        value_name: "KID HEX",
        default: None,
        on_cmdline: true,
        secret: true,
        help: "this VM's key (KID and 64 hex digits): every request to the manager is signed; never printed (prefer MMDS or key_file)",
        check: check_key,
    },
    Setting {
        name: "key_file",
        value_name: "PATH",
        default: None,
        on_cmdline: true,
        secret: false,
        help: "a file (mode 0600) holding the line KID HEX; beats key from a lower source",
        check: check_path,
    },
    Setting {
        name: "flush",
        value_name: "DURATION|off",
        default: Some("off"),
        on_cmdline: true,
        secret: false,
        help: "hold samples up to this long and push them in one POST (60s); off pushes each at once",
        check: check_flush,
    },
];

/// The row of `name`.
pub fn setting(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

/// Parses a duration with humantime, within `[min, max]`.
pub fn parse_duration(v: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = humantime::parse_duration(v.trim())
        .map_err(|e| format!("a duration such as 500ms, 5s or 1m ({e})"))?;
    if d < min || d > max {
        return Err(format!(
            "a duration from {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// Parses a whole number within `[1, max]`.
pub fn parse_count(v: &str, max: usize) -> Result<usize, String> {
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("a whole number from 1 to {max}")),
    }
}

/// Longest `flush` accepted: past it, a guest's samples would reach the
/// manager too late to be of use as current figures.
pub const MAX_FLUSH: Duration = Duration::from_secs(3600);

/// Parses the `flush` setting: `off` (each sample pushed as it comes) or
/// how long a sample may wait to share a POST with the next ones.
pub fn parse_flush(v: &str) -> Result<Option<Duration>, String> {
    match v.trim() {
        "off" => Ok(None),
        v => parse_duration(v, Duration::from_secs(1), MAX_FLUSH)
            .map(Some)
            .map_err(|e| format!("off, or {e}")),
    }
}

fn check_flush(v: &str) -> Result<(), String> {
    parse_flush(v).map(|_| ())
}

/// Parses `off` or a socket address.
pub fn parse_listen(v: &str) -> Result<Option<SocketAddr>, String> {
    if v == "off" {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .map_err(|_| "an address such as 127.0.0.1:8080 or [::1]:8080, or off".into())
}

/// Parses the `mmds` setting: `off`, `on` (the default address), or an
/// address with an optional port (80).
pub fn parse_mmds(v: &str) -> Result<Option<SocketAddr>, String> {
    let expected = "off, on, or ADDR[:PORT] such as 169.254.169.254 or 10.0.2.100:80";
    match v.trim() {
        "off" => Ok(None),
        "on" => Ok(Some(DEFAULT_MMDS)),
        v => {
            let addr = v
                .parse::<SocketAddr>()
                .or_else(|_| v.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 80)))
                .map_err(|_| expected.to_string())?;
            if addr.port() == 0 {
                return Err(expected.into());
            }
            Ok(Some(addr))
        }
    }
}

/// Parses a log level name.
pub fn parse_log(v: &str) -> Result<log::LevelFilter, String> {
    v.parse()
        .map_err(|_| "one of error, warn, info, debug, trace, off".into())
}

fn check_url(v: &str) -> Result<(), String> {
    if v == "off" {
        return Ok(());
    }
    UrlTemplate::parse(v).map(|_| ())
}

fn check_interval(v: &str) -> Result<(), String> {
    parse_duration(v, MIN_INTERVAL, MAX_INTERVAL).map(|_| ())
}

fn check_timeout(v: &str) -> Result<(), String> {
    parse_duration(v, MIN_TIMEOUT, MAX_TIMEOUT).map(|_| ())
}

fn check_listen(v: &str) -> Result<(), String> {
    parse_listen(v).map(|_| ())
}

/// A VM id goes into samples and into the path of the guest-address
/// report (`/v1/vms/{vm_id}/guest-ip`, docs/manager.md), so it is held to
/// what a URL path segment carries as it is: RFC 3986's unreserved
/// characters, and not a `.` or `..` segment. Every id a manager hands out
/// (a UUID, `vm-123`) is one.
fn check_vm_id(v: &str) -> Result<(), String> {
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~');
    if v.is_empty() || v.len() > MAX_VM_ID || !v.bytes().all(unreserved) || v == "." || v == ".." {
        return Err(format!(
            "1 to {MAX_VM_ID} letters, digits, '-', '.', '_' or '~' (a UUID, say), not . or .."
        ));
    }
    Ok(())
}

fn check_buffer(v: &str) -> Result<(), String> {
    parse_count(v, MAX_BUFFER).map(|_| ())
}

fn check_batch(v: &str) -> Result<(), String> {
    parse_count(v, MAX_BATCH).map(|_| ())
}

fn check_log(v: &str) -> Result<(), String> {
    parse_log(v).map(|_| ())
}

fn check_proc_root(v: &str) -> Result<(), String> {
    match std::fs::metadata(v) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err("a directory (this is not one)".into()),
        Err(e) => Err(format!("an existing directory ({e})")),
    }
}

fn check_path(v: &str) -> Result<(), String> {
    if v.is_empty() || v.chars().any(char::is_control) {
        return Err("a file path".into());
    }
    Ok(())
}

fn check_format(v: &str) -> Result<(), String> {
    match v {
        "json" | "influx" | "otlp" => Ok(()),
        _ => Err("json, influx or otlp".into()),
    }
}

fn check_token(v: &str) -> Result<(), String> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("printable ASCII without spaces".into());
    }
    Ok(())
}

fn check_mmds(v: &str) -> Result<(), String> {
    parse_mmds(v).map(|_| ())
}

fn check_key(v: &str) -> Result<(), String> {
    crate::sign::Key::parse_line(v).map(|_| ())
}

fn check_kmsg(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Err("a path such as /dev/kmsg, or off".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_one_row() {
        let s = setting("vm_id").unwrap();
        assert_eq!(s.flag(), "--vm-id");
        assert_eq!(s.env(), "GUEST_AGENT_VM_ID");
        assert_eq!(setting("proc_root").unwrap().flag(), "--proc-root");
    }

    #[test]
    fn every_default_passes_its_own_check() {
        for s in SETTINGS {
            if let Some(d) = s.default {
                assert_eq!((s.check)(d), Ok(()), "{}", s.name);
            }
        }
    }

    #[test]
    fn values_accepted_and_refused() {
        let key_line = format!("k1 {}", "0".repeat(64));
        let cases: &[(&str, &str, bool)] = &[
            ("interval", "500ms", true),
            ("interval", "1m", true),
            ("interval", "5", false),
            ("interval", "50ms", false),
            ("interval", "2h", false),
            ("timeout", "2s", true),
            ("timeout", "0s", false),
            ("buffer", "1", true),
            ("buffer", "0", false),
            ("buffer", "-3", false),
            ("buffer", "1000001", false),
            ("batch", "100", true),
            ("batch", "0", false),
            ("flush", "off", true),
            ("flush", "60s", true),
            ("flush", "0s", false),
            ("flush", "2h", false),
            ("flush", "soon", false),
            ("listen", "off", true),
            ("listen", "[::1]:9", true),
            ("listen", "localhost:8080", false),
            ("log", "debug", true),
            ("log", "loud", false),
            ("format", "influx", true),
            ("format", "otlp", true),
            ("format", "xml", false),
            ("vm_id", "vm-7", true),
            ("vm_id", "", false),
            ("vm_id", "a\nb", false),
            ("vm_id", "6f1c9e2a-0b1d-4c1e-9f00-1234567890ab", true),
            ("vm_id", "a b", false),
            ("vm_id", "../../admin/reset?x=", false),
            ("vm_id", "a/b", false),
            ("vm_id", "..", false),
            ("vm_id", "a%2Fb", false),
            ("vm_id", "vm.7_a~b", true),
            ("token", "s3cr3t", true),
            ("token", "has space", false),
            ("url", "off", true),
            ("url", "http://127.0.0.1:9/x", true),
            ("url", "http://{gateway}:18080/v1/guest-metrics", true),
            ("url", "https://example.invalid/", false),
            ("url", "127.0.0.1:9", false),
            ("url", "http://:9/x", false),
            ("url", "http://h:99999/", false),
            ("mmds", "off", true),
            ("mmds", "10.0.2.100:80", true),
            ("mmds", "metadata", false),
            ("kmsg", "off", true),
            ("kmsg", "", false),
            ("proc_root", "/proc", true),
            ("proc_root", "/nonexistent/proc", false),
            ("proc_root", "/proc/self/stat", false),
            ("sys_root", "/sys", true),
            ("sys_root", "/nonexistent/sys", false),
            ("token_file", "/run/secrets/token", true),
            ("token_file", "", false),
            ("key", key_line.as_str(), true),
            ("key", "k1 00", false),
            ("key", "k1", false),
            ("key_file", "/etc/guest-agent.key", true),
        ];
        for (name, value, ok) in cases {
            let r = (setting(name).unwrap().check)(value);
            assert_eq!(r.is_ok(), *ok, "{name}={value:?}: {r:?}");
        }
    }

    #[test]
    fn mmds_setting_values() {
        assert_eq!(parse_mmds("off"), Ok(None));
        assert_eq!(parse_mmds("on"), Ok(Some(DEFAULT_MMDS)));
        assert_eq!(
            parse_mmds("10.0.2.100"),
            Ok(Some("10.0.2.100:80".parse().unwrap()))
        );
        assert_eq!(
            parse_mmds("127.0.0.1:8123"),
            Ok(Some("127.0.0.1:8123".parse().unwrap()))
        );
        assert!(parse_mmds("[::1]:80").is_ok());
        for bad in ["", "yes", "host.example:80", "10.0.2.100:0", "10.0.2.100:x"] {
            assert!(parse_mmds(bad).is_err(), "{bad:?}");
        }
    }
}
