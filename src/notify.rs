//! The systemd notification protocol (`sd_notify`), for a `Type=notify`
//! unit with a watchdog (docs/systemd.md): one datagram per message to the
//! Unix socket systemd names in `NOTIFY_SOCKET`, a path or, when it starts
//! with `@`, an abstract name. No libsystemd: the protocol is a few
//! `KEY=value` lines in one datagram, and the static binary links no C
//! library of systemd's.
//!
//! Without `NOTIFY_SOCKET` there is no [`Notifier`] and nothing is sent, so
//! under OpenRC or from a shell the agent behaves as it always did.
//!
//! This is a leaf: it knows nothing of the stages; the wiring
//! (`src/agent.rs`) decides when to say what.

use std::ffi::OsStr;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// The variables systemd sets for a notify service.
pub const SOCKET_VAR: &str = "NOTIFY_SOCKET";
/// The watchdog timeout in microseconds (`WatchdogSec=`).
pub const WATCHDOG_USEC_VAR: &str = "WATCHDOG_USEC";
/// The process the watchdog is meant for; unset means the main process.
pub const WATCHDOG_PID_VAR: &str = "WATCHDOG_PID";

/// How long one message may wait for room in systemd's queue: PID 1
/// reads it at once, and a stuck PID 1 must not stall collection.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// Shown in messages about this socket.
    shown: String,
    /// Ping every this long: half the watchdog timeout. `None` without a
    /// watchdog for this process.
    watchdog_every: Option<Duration>,
    last_ping: Option<Instant>,
    /// Set after the first failed send, so a socket that went away is
    /// reported once, not every interval.
    failing: bool,
}

impl Notifier {
    /// The notifier this process's environment asks for: `None` without
    /// `NOTIFY_SOCKET`. A socket or watchdog setting that cannot be used is
    /// logged and left out; the agent runs on without it.
    pub fn from_env() -> Option<Notifier> {
        let socket = std::env::var_os(SOCKET_VAR);
        let usec = std::env::var(WATCHDOG_USEC_VAR).ok();
        let pid = std::env::var(WATCHDOG_PID_VAR).ok();
        match Notifier::new(
            socket.as_deref(),
            usec.as_deref(),
            pid.as_deref(),
            std::process::id(),
        ) {
            Ok(Some(n)) => {
                match n.watchdog_every() {
                    Some(every) => log::info!(
                        "notifying the service manager at {}; watchdog pinged every {}",
                        n.shown,
                        humantime::format_duration(every)
                    ),
                    None => log::info!("notifying the service manager at {}", n.shown),
                }
                Some(n)
            }
            Ok(None) => None,
            Err(e) => {
                log::error!("{e}; not notifying the service manager");
                None
            }
        }
    }

    /// The notifier for these variable values, `own_pid` being this
    /// process: `Ok(None)` when `socket` is unset or empty; an error naming
    /// the variable and its value when the socket address cannot be used.
    /// A bad `WATCHDOG_USEC` is logged and leaves the watchdog off (the
    /// service manager would kill a process that never pings; the log says
    /// why).
    pub fn new(
        socket: Option<&OsStr>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        own_pid: u32,
    ) -> Result<Option<Notifier>, String> {
        let Some(socket) = socket.filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let shown = socket.to_string_lossy().into_owned();
        let bad = |why: &str| format!("{SOCKET_VAR}={shown:?}: {why}");
        let addr = socket_addr(socket).map_err(|why| bad(&why))?;
        let sock =
            UnixDatagram::unbound().map_err(|e| bad(&format!("cannot open a socket: {e}")))?;
        sock.set_write_timeout(Some(SEND_TIMEOUT))
            .map_err(|e| bad(&format!("cannot set a send timeout: {e}")))?;
        let watchdog_every = match watchdog_interval(watchdog_usec, watchdog_pid, own_pid) {
            Ok(every) => every,
            Err(e) => {
                log::error!("{e}; the watchdog is not pinged");
                None
            }
        };
        Ok(Some(Notifier {
            socket: sock,
            addr,
            shown,
            watchdog_every,
            last_ping: None,
            failing: false,
        }))
    }

    /// How often the watchdog is pinged (half its timeout), if it is on.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog_every
    }

    /// Sends one message: `KEY=value` lines. A failure is logged when it
    /// starts and when it ends, never fatal: the agent's work goes on.
    pub fn send(&mut self, message: &str) {
        match self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            Ok(_) if self.failing => {
                self.failing = false;
                log::info!("notifying the service manager at {} again", self.shown);
            }
            Ok(_) => {}
            Err(e) if !self.failing => {
                self.failing = true;
                log::warn!(
                    "cannot notify the service manager at {}: {e} (said: {})",
                    self.shown,
                    message.lines().next().unwrap_or("")
                );
            }
            Err(_) => {}
        }
    }

    /// `READY=1`, with the status line shown by `systemctl status`.
    pub fn ready(&mut self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `STATUS=`: one line for `systemctl status`.
    pub fn status(&mut self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    /// `STOPPING=1`: the process is shutting down on purpose.
    pub fn stopping(&mut self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }

    /// When the next watchdog ping is due: `None` without a watchdog, `now`
    /// before the first ping.
    pub fn ping_due(&self, now: Instant) -> Option<Instant> {
        let every = self.watchdog_every?;
        Some(self.last_ping.map_or(now, |t| t + every))
    }

    /// `WATCHDOG=1` if one is due at `now`; the caller vouches that the
    /// work the watchdog stands for is on schedule.
    pub fn ping_if_due(&mut self, now: Instant) {
        if self.ping_due(now).is_some_and(|due| now >= due) {
            self.last_ping = Some(now);
            self.send("WATCHDOG=1");
        }
    }
}

/// A notification socket's address: an absolute path, or `@name` for an
/// abstract socket (Linux).
fn socket_addr(socket: &OsStr) -> Result<SocketAddr, String> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = socket.as_bytes();
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(socket).map_err(|e| e.to_string()),
        Some(b'@') => abstract_addr(&bytes[1..]),
        _ => Err("neither an absolute path nor an abstract socket (@name)".into()),
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> Result<SocketAddr, String> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name).map_err(|e| e.to_string())
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> Result<SocketAddr, String> {
    Err("abstract sockets exist on Linux only".into())
}

/// Half of `WATCHDOG_USEC`, when the watchdog is meant for this process:
/// `WATCHDOG_PID` unset or equal to `own_pid`.
fn watchdog_interval(
    usec: Option<&str>,
    pid: Option<&str>,
    own_pid: u32,
) -> Result<Option<Duration>, String> {
    let Some(usec) = usec.filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    if let Some(pid) = pid.filter(|p| !p.is_empty()) {
        match pid.parse::<u32>() {
            Ok(p) if p == own_pid => {}
            // Meant for another process (a wrapper that exec'd us keeps its
            // own pid; one that forked us does not).
            Ok(_) => return Ok(None),
            Err(_) => return Err(format!("{WATCHDOG_PID_VAR}={pid:?} is not a process id")),
        }
    }
    match usec.parse::<u64>() {
        Ok(0) | Err(_) => Err(format!(
            "{WATCHDOG_USEC_VAR}={usec:?} is not a positive number of microseconds"
        )),
        Ok(us) => Ok(Some(Duration::from_micros(us) / 2)),
    }
}

/// A status that is one line, as the protocol's `STATUS=` must be.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    /// A notification socket bound like systemd's, in a temporary folder.
    fn bound() -> (tempfile::TempDir, UnixDatagram, OsString) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        (dir, sock, path.into_os_string())
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn no_socket_no_notifier() {
        assert!(
            Notifier::new(None, Some("30000000"), None, 1)
                .unwrap()
                .is_none()
        );
        assert!(
            Notifier::new(Some(OsStr::new("")), None, None, 1)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_relative_or_foreign_socket_address_is_refused_by_name() {
        for bad in ["run/notify", "vsock:2:1234"] {
            let e = Notifier::new(Some(OsStr::new(bad)), None, None, 1).unwrap_err();
            assert!(e.starts_with(&format!("NOTIFY_SOCKET=\"{bad}\"")), "{e}");
        }
    }

    #[test]
    fn messages_reach_a_path_socket_one_datagram_each() {
        let (_dir, sock, path) = bound();
        let mut n = Notifier::new(Some(&path), None, None, 1).unwrap().unwrap();
        n.ready("collecting every 5s;\npushing");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=collecting every 5s; pushing");
        n.status("push failing");
        assert_eq!(recv(&sock), "STATUS=push failing");
        n.stopping("flushing 3 samples");
        assert_eq!(recv(&sock), "STOPPING=1\nSTATUS=flushing 3 samples");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn messages_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "guest-agent-test-{}-{:?}",
            std::process::id(),
            Instant::now()
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let var = OsString::from(format!("@{name}"));
        let mut n = Notifier::new(Some(&var), None, None, 1).unwrap().unwrap();
        n.ready("up");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=up");
    }

    #[test]
    fn the_watchdog_is_pinged_at_half_its_timeout() {
        let (_dir, sock, path) = bound();
        let mut n = Notifier::new(Some(&path), Some("4000000"), None, 7)
            .unwrap()
            .unwrap();
        assert_eq!(n.watchdog_every(), Some(Duration::from_secs(2)));
        let t0 = Instant::now();
        assert_eq!(n.ping_due(t0), Some(t0), "the first ping is due at once");
        n.ping_if_due(t0);
        assert_eq!(recv(&sock), "WATCHDOG=1");
        assert_eq!(n.ping_due(t0), Some(t0 + Duration::from_secs(2)));
        // Not yet due: nothing is sent; then due: one ping.
        n.ping_if_due(t0 + Duration::from_secs(1));
        n.ping_if_due(t0 + Duration::from_secs(2));
        n.status("marker");
        assert_eq!(recv(&sock), "WATCHDOG=1");
        assert_eq!(recv(&sock), "STATUS=marker");
    }

    #[test]
    fn the_watchdog_honours_watchdog_pid() {
        let (_dir, _sock, path) = bound();
        let ours = Notifier::new(Some(&path), Some("1000000"), Some("42"), 42)
            .unwrap()
            .unwrap();
        assert_eq!(ours.watchdog_every(), Some(Duration::from_millis(500)));
        let other = Notifier::new(Some(&path), Some("1000000"), Some("43"), 42)
            .unwrap()
            .unwrap();
        assert_eq!(other.watchdog_every(), None);
        assert_eq!(other.ping_due(Instant::now()), None);
        let none = Notifier::new(Some(&path), None, None, 42).unwrap().unwrap();
        assert_eq!(none.watchdog_every(), None);
    }

    #[test]
    fn a_bad_watchdog_setting_leaves_the_watchdog_off_and_says_why() {
        assert!(
            watchdog_interval(Some("soon"), None, 1)
                .unwrap_err()
                .contains("WATCHDOG_USEC=\"soon\"")
        );
        assert!(watchdog_interval(Some("0"), None, 1).is_err());
        assert!(
            watchdog_interval(Some("1000"), Some("x"), 1)
                .unwrap_err()
                .contains("WATCHDOG_PID=\"x\"")
        );
        let (_dir, _sock, path) = bound();
        let n = Notifier::new(Some(&path), Some("soon"), None, 1)
            .unwrap()
            .unwrap();
        assert_eq!(n.watchdog_every(), None);
    }

    #[test]
    fn a_socket_that_went_away_is_not_fatal() {
        let (dir, sock, path) = bound();
        let mut n = Notifier::new(Some(&path), None, None, 1).unwrap().unwrap();
        drop(sock);
        drop(dir);
        n.ready("up");
        n.status("still running");
        assert!(n.failing);
    }
}
