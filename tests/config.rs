//! Configuration sources and precedence (docs/design.md#configuration),
//! through the library and through the built binary's `--print-config`. No
//! test resolves this machine's real gateway: every proc root here is a
//! fixture.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use guest_agent::config::{self, Config, Source};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// A temp proc root with a cmdline and a config file beside it.
struct Setup {
    dir: PathBuf,
}

impl Setup {
    fn new(name: &str, cmdline: &str, file: &str) -> Setup {
        let dir = std::env::temp_dir().join(format!("ga-cfg-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("proc/net")).unwrap();
        fs::write(dir.join("proc/cmdline"), cmdline).unwrap();
        fs::copy(
            Path::new(FIXTURES).join("host/net/route"),
            dir.join("proc/net/route"),
        )
        .unwrap();
        fs::write(dir.join("guest-agent.conf"), file).unwrap();
        Setup { dir }
    }

    fn resolve(
        &self,
        cli: &[(&'static str, &str)],
        env: &[(&str, &str)],
    ) -> guest_agent::Result<Config> {
        let mut c: Vec<(&'static str, String)> =
            vec![("proc_root", self.dir.join("proc").display().to_string())];
        c.extend(cli.iter().map(|(k, v)| (*k, v.to_string())));
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        config::resolve(&c, &env, Some(&self.dir.join("guest-agent.conf")))
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn origin(c: &Config, name: &str) -> (Option<String>, Source) {
    let o = c.origins.iter().find(|o| o.setting.name == name).unwrap();
    (o.value.clone(), o.source)
}

/// One row per setting: a value from each source, as each source spells it.
struct Row {
    name: &'static str,
    cli: &'static str,
    env: (&'static str, &'static str),
    cmdline: &'static str,
    file: &'static str,
    /// The value the file line gives, when the file spells it differently.
    file_value: &'static str,
    default: Option<&'static str>,
}

const ROWS: &[Row] = &[
    Row {
        name: "interval",
        cli: "1s",
        env: ("GUEST_AGENT_INTERVAL", "2s"),
        cmdline: "guest_agent.interval=3s",
        file: "GUEST_AGENT_INTERVAL=4s",
        file_value: "4s",
        default: Some("5s"),
    },
    Row {
        name: "vm_id",
        cli: "vm-cli",
        env: ("GUEST_AGENT_VM_ID", "vm-env"),
        cmdline: "guest-agent.vm-id=vm-cmdline",
        file: "VM_ID=vm-file",
        file_value: "vm-file",
        default: None,
    },
    Row {
        name: "url",
        cli: "http://127.0.0.1:1/cli",
        env: ("GUEST_AGENT_URL", "http://127.0.0.1:2/env"),
        cmdline: "guest_agent.url=http://127.0.0.1:3/cmdline",
        file: "MANAGER_URL=http://127.0.0.1:4",
        file_value: "http://127.0.0.1:4/v1/guest-metrics",
        default: Some("http://{gateway}:18080/v1/guest-metrics"),
    },
    Row {
        name: "buffer",
        cli: "11",
        env: ("GUEST_AGENT_BUFFER", "22"),
        cmdline: "guest_agent.buffer=33",
        file: "GUEST_AGENT_BUFFER=44",
        file_value: "44",
        default: Some("1000"),
    },
    Row {
        name: "format",
        cli: "influx",
        env: ("GUEST_AGENT_FORMAT", "json"),
        cmdline: "guest_agent.format=influx",
        file: "GUEST_AGENT_FORMAT=json",
        file_value: "json",
        default: Some("json"),
    },
];

#[test]
fn each_source_beats_the_next_with_the_others_present() {
    for r in ROWS {
        // Sources present, from most to least specific; each step drops the top one.
        for top in 0..5 {
            let setup = Setup::new(
                r.name,
                if top <= 2 { r.cmdline } else { "" },
                if top <= 3 { r.file } else { "" },
            );
            let cli: Vec<(&'static str, &str)> = if top == 0 {
                vec![(r.name, r.cli)]
            } else {
                vec![]
            };
            let env: Vec<(&str, &str)> = if top <= 1 { vec![r.env] } else { vec![] };
            let c = setup.resolve(&cli, &env).unwrap();
            let cmdline_value = r.cmdline.split_once('=').unwrap().1;
            let want = match top {
                0 => (Some(r.cli.to_string()), Source::Cli),
                1 => (Some(r.env.1.to_string()), Source::Env),
                2 => (Some(cmdline_value.to_string()), Source::Cmdline),
                3 => (Some(r.file_value.to_string()), Source::File),
                _ => (r.default.map(str::to_string), Source::Default),
            };
            assert_eq!(origin(&c, r.name), want, "{} with top source {top}", r.name);
            assert!(c.errors.is_empty(), "{:?}", c.errors);
        }
    }
}

#[test]
fn bad_values_fall_through_to_the_next_source_and_are_reported() {
    let setup = Setup::new(
        "fallthrough",
        "guest_agent.interval=soon guest_agent.buffer=0 guest_agent.vm_id=ok-vm",
        "GUEST_AGENT_INTERVAL=7s\nGUEST_AGENT_BUFFER=12\n",
    );
    let c = setup
        .resolve(
            &[],
            &[
                ("GUEST_AGENT_INTERVAL", "fast"),
                ("GUEST_AGENT_LISTEN", "nowhere"),
            ],
        )
        .unwrap();
    assert_eq!(origin(&c, "interval"), (Some("7s".into()), Source::File));
    assert_eq!(origin(&c, "buffer"), (Some("12".into()), Source::File));
    assert_eq!(
        origin(&c, "listen"),
        (Some("127.0.0.1:8080".into()), Source::Default)
    );
    assert_eq!(c.interval, std::time::Duration::from_secs(7));
    let all = c.errors.join("\n");
    for needle in [
        "env: invalid GUEST_AGENT_INTERVAL value \"fast\"",
        "cmdline: invalid guest_agent.interval value \"soon\"",
        "cmdline: invalid guest_agent.buffer value \"0\"",
        "env: invalid GUEST_AGENT_LISTEN value \"nowhere\"",
    ] {
        assert!(all.contains(needle), "{needle:?} not in:\n{all}");
    }
    assert_eq!(c.errors.len(), 4, "{all}");
}

#[test]
fn a_bad_cli_value_is_a_usage_error_naming_flag_value_and_what_is_accepted() {
    let setup = Setup::new("badcli", "", "");
    let e = setup.resolve(&[("interval", "50ms")], &[]).unwrap_err();
    assert!(matches!(e, guest_agent::Error::Usage(_)));
    let msg = e.to_string();
    assert!(
        msg.contains("--interval") && msg.contains("50ms") && msg.contains("100ms"),
        "{msg}"
    );
}

#[test]
fn cmdline_rules_init_args_unknown_keys_and_valueless_keys() {
    let setup = Setup::new(
        "rules",
        "guest_agent.kmsg=\"/dev/k msg\" guest_agent.vm_id=\"a b\" guest_agent.colour=red guest_agent.interval -- guest_agent.vm_id=init",
        "",
    );
    let c = setup.resolve(&[], &[]).unwrap();
    // Quotes protect a space, and the quote characters go.
    assert_eq!(
        origin(&c, "kmsg"),
        (Some("/dev/k msg".into()), Source::Cmdline)
    );
    // A VM id goes into a URL path (the guest-address report): one with a
    // space is refused by name, and the next source's value is used.
    assert_eq!(origin(&c, "vm_id"), (None, Source::Default));
    assert!(
        c.errors
            .iter()
            .any(|e| e.contains("cmdline: invalid guest_agent.vm_id value \"a b\"")),
        "{:?}",
        c.errors
    );
    assert!(
        c.warnings.iter().any(|w| w.contains("guest_agent.colour")),
        "{:?}",
        c.warnings
    );
    assert!(
        c.errors
            .iter()
            .any(|e| e.contains("guest_agent.interval has no value")),
        "{:?}",
        c.errors
    );
    assert_eq!(origin(&c, "interval").1, Source::Default);
}

#[test]
fn a_missing_file_is_normal_an_unreadable_one_is_reported() {
    let setup = Setup::new("file", "", "");
    let c = config::resolve(
        &[("proc_root", setup.dir.join("proc").display().to_string())],
        &[],
        Some(Path::new("/nonexistent/guest-agent.conf")),
    )
    .unwrap();
    assert!(c.errors.is_empty());
    // A directory where the file should be cannot be read as one.
    let c = config::resolve(
        &[("proc_root", setup.dir.join("proc").display().to_string())],
        &[],
        Some(&setup.dir),
    )
    .unwrap();
    assert!(
        c.errors
            .iter()
            .any(|e| e.contains(&setup.dir.display().to_string())),
        "{:?}",
        c.errors
    );
}

fn print_config(args: &[&str], env: &[(&str, &str)]) -> (i32, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .arg("--print-config")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), json, stderr)
}

#[test]
fn print_config_shows_every_value_and_source_through_the_binary() {
    let root = format!("{FIXTURES}/configured");
    let (code, j, stderr) = print_config(
        &[
            "--proc-root",
            &root,
            "--config",
            "/nonexistent",
            "--batch",
            "7",
        ],
        &[
            ("GUEST_AGENT_INTERVAL", "2s"),
            ("GUEST_AGENT_TOKEN", "env-secret"),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let entry = |k: &str| {
        (
            j[k]["value"].clone(),
            j[k]["source"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(entry("batch"), ("7".into(), "cli".into()));
    assert_eq!(entry("proc_root"), (root.clone().into(), "cli".into()));
    assert_eq!(entry("interval"), ("2s".into(), "env".into()));
    assert_eq!(entry("token"), ("set".into(), "env".into()));
    assert_eq!(entry("vm_id"), ("vm-from-cmdline".into(), "cmdline".into()));
    assert_eq!(entry("listen"), ("127.0.0.1:9181".into(), "cmdline".into()));
    assert_eq!(entry("timeout"), ("3s".into(), "cmdline".into()));
    assert_eq!(entry("buffer"), ("300".into(), "cmdline".into()));
    assert_eq!(entry("log"), ("warn".into(), "cmdline".into()));
    assert_eq!(entry("format"), ("influx".into(), "cmdline".into()));
    assert_eq!(
        entry("url"),
        ("http://{gateway}:18081/ingest".into(), "cmdline".into())
    );
    // Three default routes: the lowest metric (100) is 127.0.0.2.
    assert_eq!(j["url"]["resolved"], "http://127.0.0.2:18081/ingest");
    assert_eq!(
        j.as_object().unwrap().len(),
        config::settings::SETTINGS.len()
    );
    // Secrets never appear, and the unknown cmdline key is a warning.
    let all = format!("{j}{stderr}");
    assert!(!all.contains("secret"), "{all}");
    assert!(stderr.contains("guest_agent.colour"), "{stderr}");
}

#[test]
fn print_config_without_a_default_route_resolves_to_null() {
    let setup = Setup::new("noroute", "", "");
    fs::write(
        setup.dir.join("proc/net/route"),
        fs::read(format!("{FIXTURES}/routes/empty")).unwrap(),
    )
    .unwrap();
    let proc_root = setup.dir.join("proc").display().to_string();
    let (code, j, stderr) = print_config(
        &["--proc-root", &proc_root, "--config", "/nonexistent"],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(j["url"]["source"], "default");
    assert!(j["url"]["resolved"].is_null());
}

#[test]
fn an_invalid_cli_exits_2_with_one_line() {
    for args in [
        &["--interval", "often"][..],
        &["--buffer", "0"][..],
        &["--frobnicate"][..],
        &["--url", "ftp://127.0.0.1/"][..],
        &["--proc-root", "/nonexistent/proc"][..],
        &["--token-file", "", "--url", "off"][..],
    ] {
        let (code, _, stderr) = print_config(args, &[]);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(args[0]) || stderr.contains(args[0].trim_start_matches('-')),
            "{stderr}"
        );
    }
}

#[test]
fn an_argument_that_is_not_utf8_is_a_usage_error_not_a_panic() {
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"vm-\xff");
    for args in [
        vec![std::ffi::OsStr::new("--vm-id"), bad],
        vec![std::ffi::OsStr::from_bytes(b"--vm-id=vm-\xff")],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
            .args(["--print-config", "--url", "off"])
            .args(&args)
            .env_clear()
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("--vm-id") && stderr.contains("UTF-8"),
            "{stderr}"
        );
    }
}

#[test]
fn a_bad_proc_root_from_the_environment_falls_back_to_the_default() {
    let (code, json, stderr) = print_config(
        &["--url", "off"],
        &[("GUEST_AGENT_PROC_ROOT", "/nonexistent/proc")],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("GUEST_AGENT_PROC_ROOT"), "{stderr}");
    assert_eq!(json["proc_root"]["source"], "default");
}

#[test]
fn the_buffer_is_bounded_by_a_share_of_memory_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    // A 64 MiB guest: 2 % is about 1.3 MB, far less than a million samples.
    let host = fs::read_to_string(Path::new(FIXTURES).join("host/meminfo")).unwrap();
    let small: String = host
        .lines()
        .map(|l| match l.starts_with("MemTotal:") {
            true => "MemTotal:          65536 kB\n".to_string(),
            false => format!("{l}\n"),
        })
        .collect();
    fs::write(dir.path().join("meminfo"), small).unwrap();
    let root = dir.path().display().to_string();
    let (code, json, stderr) = print_config(
        &["--url", "off", "--proc-root", &root, "--buffer", "1000000"],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let b = &json["buffer"];
    assert_eq!(b["value"], "1000000");
    assert_eq!(b["max_bytes"], 65536 * 1024 / 50);
    let clamped = b["clamped"].as_str().unwrap();
    assert!(clamped.contains("samples fit"), "{clamped}");
    // The default buffer fits in a 64 MiB guest: nothing to say.
    let (_, json, _) = print_config(&["--url", "off", "--proc-root", &root], &[]);
    assert!(json["buffer"].get("clamped").is_none(), "{json}");
}

#[test]
fn route_fixtures_pick_the_right_gateway() {
    use guest_agent::internals::parse_default_gateway;
    let gw =
        |name: &str| parse_default_gateway(&fs::read(format!("{FIXTURES}/routes/{name}")).unwrap());
    assert_eq!(
        gw("several-defaults").unwrap(),
        Some("127.0.0.2".parse().unwrap())
    );
    assert_eq!(gw("down-and-host-routes").unwrap(), None);
    assert_eq!(gw("empty").unwrap(), None);
    assert!(gw("malformed").is_err());
}

#[test]
fn help_and_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for s in config::settings::SETTINGS {
        assert!(help.contains(&s.flag()), "{}", s.name);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("guest-agent {}", guest_agent::AGENT_VERSION)
    );
}

#[test]
fn once_prints_a_sample_from_a_fixture_root_without_network() {
    let out = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args(["--once", "--url", "off", "--config", "/nonexistent"])
        .args([
            "--proc-root",
            &format!("{FIXTURES}/host"),
            "--vm-id",
            "vm-once",
        ])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = guest_agent::Sample::from_json_strict(&v).unwrap();
    assert_eq!(
        (s.seq, s.vm_id.as_deref(), s.guest_ip),
        (1, Some("vm-once"), None)
    );
}

#[test]
fn a_reader_that_goes_away_is_not_a_crash() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args(["--print-config", "--url", "off", "--config", "/nonexistent"])
        .env_clear()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before the agent writes, as `| head -0` would.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
