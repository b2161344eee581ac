//! The README keeps its promises: its Quick start, pasted in order into bash,
//! works, and the repository explains itself without outside references
//! (`.ci/check-repo`). See docs/testing.md#the-readme-and-the-repository.
//!
//! The Quick start is the fenced block between `<!-- quickstart:begin -->`
//! and `<!-- quickstart:end -->`. It runs as written, with two changes made
//! so that parallel runs never collide: its two loopback ports become free
//! ones, and cargo builds into `target/readme-quickstart` (a nested cargo on
//! the outer `target/` would wait for the lock the running `cargo test`
//! holds). All its traffic stays on 127.0.0.1.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BEGIN: &str = "<!-- quickstart:begin -->";
const END: &str = "<!-- quickstart:end -->";
/// The ports the README uses: the manager's and the agent's listener.
const MANAGER_ADDR: &str = "127.0.0.1:18080";
const LISTEN_ADDR: &str = "127.0.0.1:8080";
/// Generous: the block starts with a cold release build on a shared machine.
const DEADLINE: Duration = Duration::from_secs(1800);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The commands of the README's Quick start block.
fn quick_start(readme: &str) -> Result<String, String> {
    let start = readme
        .find(BEGIN)
        .ok_or(format!("README.md has no {BEGIN}"))?;
    let end = readme[start..]
        .find(END)
        .map(|e| start + e)
        .ok_or(format!("README.md has no {END} after {BEGIN}"))?;
    let section = &readme[start + BEGIN.len()..end];
    let body = section
        .trim()
        .strip_prefix("```sh\n")
        .and_then(|b| b.strip_suffix("```"))
        .ok_or("the Quick start must be exactly one ```sh block between its markers")?;
    if body.contains("```") {
        return Err("the Quick start holds more than one fenced block".into());
    }
    Ok(body.to_string())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn has(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Kills the whole process group `pgid` (bash and everything it started).
fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
}

#[test]
fn quick_start_block_is_extracted_whole() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let block = quick_start(&readme).unwrap_or_else(|e| panic!("{e}"));
    for needle in [MANAGER_ADDR, LISTEN_ADDR, "cargo build", "kill "] {
        assert!(
            block.contains(needle),
            "Quick start lacks {needle:?}:\n{block}"
        );
    }
    // The agent is never started there without an explicit loopback URL.
    for line in block
        .lines()
        .filter(|l| l.contains("cargo run --release -- "))
    {
        assert!(
            line.contains("--url off") || line.contains("--url http://127.0.0.1:"),
            "an agent command without a loopback --url: {line}"
        );
    }
    assert!(quick_start("no markers").is_err());
    assert!(quick_start(&format!("{BEGIN}\n```sh\na\n```\n```sh\nb\n```\n{END}")).is_err());
}

#[test]
fn quick_start_runs_as_written() {
    if std::env::var("GUEST_AGENT_README_TEST").is_ok_and(|v| v == "skip") && !ci() {
        eprintln!("skipped: GUEST_AGENT_README_TEST=skip");
        return;
    }
    if !has("curl") {
        assert!(!ci(), "curl is missing on CI");
        eprintln!("skipped: the Quick start needs curl");
        return;
    }
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let block = quick_start(&readme).unwrap_or_else(|e| panic!("{e}"));
    let (manager_port, listen_port) = (free_port(), free_port());
    let script = block
        .replace(MANAGER_ADDR, &format!("127.0.0.1:{manager_port}"))
        .replace(LISTEN_ADDR, &format!("127.0.0.1:{listen_port}"));

    let target_dir: PathBuf = root().join("target/readme-quickstart");
    std::fs::create_dir_all(&target_dir).expect("target/readme-quickstart");
    let stdout_path = target_dir.join("quickstart.stdout");
    let stderr_path = target_dir.join("quickstart.stderr");
    let stdout = std::fs::File::create(&stdout_path).expect("stdout file");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let cargo_dir = Path::new(&cargo).parent().map(Path::to_path_buf);
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = cargo_dir.filter(|d| !d.as_os_str().is_empty()) {
        let mut dirs = vec![dir];
        dirs.extend(std::env::split_paths(&path));
        path = std::env::join_paths(dirs).expect("PATH");
    }

    use std::os::unix::process::CommandExt;
    let mut child = Command::new("bash")
        // -e: a command that fails fails the recipe, as a reader would see it.
        .args(["-e", "-o", "pipefail", "-c", &script])
        .current_dir(root())
        .env("PATH", path)
        .env("CARGO_TARGET_DIR", &target_dir)
        // A proxy from the environment would take curl off loopback.
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .expect("bash");
    let pgid = child.id();
    let started = Instant::now();
    let status = loop {
        match child.try_wait().expect("waiting for bash") {
            Some(status) => break Some(status),
            None if started.elapsed() > DEADLINE => break None,
            None => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    // Whatever the recipe left running (it should have stopped both).
    kill_group(pgid);
    if status.is_none() {
        let _ = child.wait();
    }
    let out = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let show = format!("--- script\n{script}\n--- stdout\n{out}\n--- stderr\n{err}");
    let status = status.unwrap_or_else(|| panic!("still running after {DEADLINE:?}\n{show}"));
    assert!(status.success(), "the Quick start failed: {status}\n{show}");

    // Step 2: one pretty-printed sample.
    assert!(out.contains("\"schema\": 1,"), "no --once sample\n{show}");
    // Step 3: the manager is up and stores what the agent sends.
    assert!(
        out.contains(&format!("listening on 127.0.0.1:{manager_port}")),
        "the manager did not start\n{show}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("quickstart seq=")),
        "the manager stored no sample\n{show}"
    );
    // Step 5: the agent's health and latest sample, through its listener.
    let health = out
        .lines()
        .find(|l| l.starts_with("{\"status\":"))
        .unwrap_or_else(|| panic!("no /health body\n{show}"));
    let health: serde_json::Value = serde_json::from_str(health).expect("/health is JSON");
    assert_eq!(health["push_state"], "ok", "{show}");
    assert!(health["delivered"].as_u64() > Some(0), "{show}");
    let metrics = out
        .lines()
        .find(|l| l.starts_with("{\"schema\":1"))
        .unwrap_or_else(|| panic!("no /metrics body\n{show}"));
    let sample: serde_json::Value = serde_json::from_str(metrics).expect("/metrics is JSON");
    assert_eq!(sample["vm_id"], "quickstart", "{show}");
    // Nobody got a 401: the token is the same on both sides.
    assert!(!err.contains("HTTP 401"), "{show}");
}

#[test]
fn repository_stands_alone() {
    let out = Command::new("bash")
        .arg(root().join(".ci/check-repo"))
        .current_dir(root())
        .output()
        .expect("bash .ci/check-repo");
    assert!(
        out.status.success(),
        ".ci/check-repo failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
