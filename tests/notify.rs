//! The agent binary as a systemd `Type=notify` service sees it: a real Unix
//! datagram socket stands in for systemd's `NOTIFY_SOCKET`, and the test
//! reads what the agent says there (docs/systemd.md). The fixture proc root
//! routes to 127.0.0.1 and pushes go to a receiver on loopback.

mod common;

use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Mode, Receiver, fixture_root, get};

/// The agent with `env` set (and nothing else of the caller's notify or
/// agent environment), pushing to `url` every `interval`.
fn spawn(url: &str, interval: &str, listen: &str, env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_guest-agent"));
    for s in guest_agent::config::settings::SETTINGS {
        cmd.env_remove(s.env());
    }
    for v in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .args(["--proc-root", &fixture_root(), "--config", "/nonexistent"])
        .args(["--url", url, "--interval", interval, "--listen", listen])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start guest-agent")
}

/// Messages read from `sock` until `done` holds for them all (generous
/// deadline: the test waits for events, it does not time them).
fn read_until(sock: &UnixDatagram, got: &mut Vec<String>, done: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    while !done(got) {
        assert!(Instant::now() < deadline, "not heard in time: {got:#?}");
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[test]
fn a_notify_service_hears_ready_status_watchdog_pings_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let rx = Receiver::start(Mode::Accept);
    let listen = free_port();
    let mut agent = spawn(
        &rx.url(),
        "200ms",
        &listen,
        &[
            ("NOTIFY_SOCKET", path.display().to_string()),
            // Pinged every 500 ms: more than once per 200 ms interval is
            // never needed, less than every other interval would be late.
            ("WATCHDOG_USEC", "1000000".into()),
        ],
    );
    let mut got = Vec::new();
    read_until(&sock, &mut got, |g| !g.is_empty());
    let ready = &got[0];
    assert!(
        ready.starts_with("READY=1\nSTATUS=collecting every 200ms; "),
        "the first message says ready with a status: {ready:?}"
    );
    // Ready means the listener is bound and a sample collected.
    let (code, body) = get(listen.parse().unwrap(), "/metrics");
    assert_eq!(code, 200, "{body}");

    let pings = |g: &[String]| g.iter().filter(|m| *m == "WATCHDOG=1").count();
    read_until(&sock, &mut got, |g| pings(g) >= 4);

    // The push state as it changes: failing while the manager answers
    // 503, ok again once it takes the samples.
    let statuses = |g: &[String]| -> Vec<String> {
        g.iter()
            .filter_map(|m| m.lines().find_map(|l| l.strip_prefix("STATUS=")))
            .map(str::to_string)
            .collect()
    };
    rx.set_mode(Mode::Status(503, Vec::new()));
    let failing = "push failing, samples kept for retry: ";
    read_until(&sock, &mut got, |g| {
        statuses(g).last().is_some_and(|s| s.contains(failing))
    });
    rx.set_mode(Mode::Accept);
    let ok = format!("collecting every 200ms; pushing to {}: ok", rx.url());
    read_until(&sock, &mut got, |g| statuses(g).last() == Some(&ok));
    let shown = statuses(&got);
    assert!(
        shown.windows(2).all(|w| w[0] != w[1]),
        "a status is said when it changes, not again: {shown:#?}"
    );
    let status = terminate(&mut agent);
    assert!(status.success(), "exit status after SIGTERM: {status}");
    read_until(&sock, &mut got, |g| {
        g.last().is_some_and(|m| m.starts_with("STOPPING=1\n"))
    });
    let stopping = got.last().unwrap();
    assert!(
        stopping.starts_with("STOPPING=1\nSTATUS=stopping: flushing "),
        "{stopping:?}"
    );
    assert_eq!(
        got.iter().filter(|m| m.contains("READY=1")).count(),
        1,
        "ready is said once: {got:#?}"
    );
    for m in &got {
        assert!(
            [
                "READY=1\nSTATUS=",
                "STATUS=",
                "WATCHDOG=1",
                "STOPPING=1\nSTATUS="
            ]
            .iter()
            .any(|p| m.starts_with(p)),
            "an unexpected message: {m:?}"
        );
    }
    assert!(!rx.delivered().is_empty());
}

#[cfg(target_os = "linux")]
#[test]
fn an_abstract_socket_is_told_and_a_watchdog_for_another_pid_is_not_pinged() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;
    let name = format!("guest-agent-notify-test-{}", std::process::id());
    let sock = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let rx = Receiver::start(Mode::Accept);
    let mut agent = spawn(
        &rx.url(),
        "200ms",
        "off",
        &[
            ("NOTIFY_SOCKET", format!("@{name}")),
            ("WATCHDOG_USEC", "400000".into()),
            // PID 1 is never the agent: the watchdog is someone else's.
            ("WATCHDOG_PID", "1".into()),
        ],
    );
    let mut got = Vec::new();
    read_until(&sock, &mut got, |g| !g.is_empty());
    assert!(got[0].starts_with("READY=1\n"), "{got:#?}");
    // Ten intervals, five watchdog periods: no ping may come.
    rx.wait_for(60, "10 samples", |r| r.delivered().len() >= 10);
    let status = terminate(&mut agent);
    assert!(status.success(), "{status}");
    read_until(&sock, &mut got, |g| {
        g.last().is_some_and(|m| m.starts_with("STOPPING=1\n"))
    });
    assert!(
        !got.iter().any(|m| m.contains("WATCHDOG=1")),
        "pinged a watchdog meant for another process: {got:#?}"
    );
}

#[test]
fn with_an_interval_longer_than_half_the_watchdog_the_loop_wakes_up_to_ping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let rx = Receiver::start(Mode::Accept);
    let mut agent = spawn(
        &rx.url(),
        "2s",
        "off",
        &[
            ("NOTIFY_SOCKET", path.display().to_string()),
            // A ping every 300 ms, samples every 2 s: about 6 pings per sample.
            ("WATCHDOG_USEC", "600000".into()),
        ],
    );
    let mut got = Vec::new();
    read_until(&sock, &mut got, |_| rx.delivered().len() >= 3);
    let samples = rx.delivered().len();
    let status = terminate(&mut agent);
    assert!(status.success(), "{status}");
    let pings = got.iter().filter(|m| *m == "WATCHDOG=1").count();
    // Pinging only at collections would give one per sample.
    assert!(
        pings >= 2 * samples,
        "{pings} pings for {samples} samples: the loop did not wake up between collections"
    );
}
