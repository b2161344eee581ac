//! A throwaway PostgreSQL server for tests/postgres_ingest.rs and
//! examples/fleet_bench.rs: its own cluster in a temporary directory,
//! listening on 127.0.0.1 on a free port (and on a Unix socket in that
//! directory), with trust authentication for the `postgres` user.
//!
//! PostgreSQL refuses to run as root; as root the cluster belongs to the
//! unprivileged user `nobody` (another with `GUEST_AGENT_PG_USER`), and its
//! programs run under that user through `setpriv`. The server is stopped
//! and its directory removed on drop, a panic included.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Debian package that provides the server.
pub const PACKAGE: &str = "postgresql";

/// Where PostgreSQL's programs (`initdb`, `postgres`, `pg_isready`) are:
/// `GUEST_AGENT_PG_BIN`, else the newest of Debian's
/// `/usr/lib/postgresql/VERSION/bin`, else a directory of `PATH` that has
/// them.
pub fn bin_dir() -> Option<PathBuf> {
    let has_all = |d: &Path| {
        ["initdb", "postgres", "pg_isready"]
            .iter()
            .all(|p| d.join(p).is_file())
    };
    if let Some(dir) = std::env::var_os("GUEST_AGENT_PG_BIN") {
        return Some(PathBuf::from(dir)).filter(|d| has_all(d));
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, d)| has_all(d))
        .collect();
    debian.sort();
    if let Some((_, dir)) = debian.pop() {
        return Some(dir);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).find(|d| has_all(d))
}

/// The user the cluster runs as when this process is root: name, uid, gid.
fn unprivileged_user() -> Result<(String, u32, u32), String> {
    let name = std::env::var("GUEST_AGENT_PG_USER").unwrap_or_else(|_| "nobody".into());
    let passwd =
        std::fs::read_to_string("/etc/passwd").map_err(|e| format!("reading /etc/passwd: {e}"))?;
    passwd
        .lines()
        .find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
        .map(|(uid, gid)| (name.clone(), uid, gid))
        .ok_or_else(|| format!("no user {name:?} in /etc/passwd to run PostgreSQL as"))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A running (or stopped, between [`PgServer::stop`] and
/// [`PgServer::start`]) PostgreSQL cluster of its own.
pub struct PgServer {
    bin: PathBuf,
    /// uid and gid to run as, when this process is root.
    run_as: Option<(u32, u32)>,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// Bytes of the log before the current start, to find its own lines.
    log_start: u64,
}

impl PgServer {
    /// Creates a cluster with `initdb` and starts it on a free port of
    /// 127.0.0.1. `settings` are extra `-c NAME=VALUE` for the server.
    pub fn start_new(bin: &Path, settings: &[(&str, &str)]) -> Result<PgServer, String> {
        let dir = tempfile::Builder::new()
            .prefix("guest-agent-pg-")
            .tempdir()
            .map_err(|e| format!("creating the cluster's directory: {e}"))?;
        let run_as = if is_root() {
            let (name, uid, gid) = unprivileged_user()?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|e| format!("chown {} to {name}: {e}", dir.path().display()))?;
            Some((uid, gid))
        } else {
            None
        };
        let mut server = PgServer {
            bin: bin.to_path_buf(),
            run_as,
            dir,
            port: 0,
            child: None,
            log_start: 0,
        };
        let out = server
            .command("initdb")
            .args(["-D", "data", "-U", "postgres", "--auth=trust"])
            .args(["--encoding=UTF8", "--locale=C", "--no-sync"])
            .output()
            .map_err(|e| format!("running initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut conf = String::from("\n# Added for this throwaway cluster.\n");
        for (name, value) in settings {
            conf.push_str(&format!("{name} = '{value}'\n"));
        }
        let conf_path = server.dir.path().join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)
            .map_err(|e| format!("reading {}: {e}", conf_path.display()))?;
        text.push_str(&conf);
        std::fs::write(&conf_path, text)
            .map_err(|e| format!("writing {}: {e}", conf_path.display()))?;

        // The port is found by binding 127.0.0.1:0 and released before the
        // server binds it: another process may take it in between, so a
        // start that fails is tried again on a new port.
        let mut last = String::new();
        for _ in 0..5 {
            server.port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("finding a free port: {e}"))?
                .port();
            match server.start() {
                Ok(()) => return Ok(server),
                Err(e) => last = e,
            }
        }
        Err(format!("PostgreSQL did not start in 5 attempts: {last}"))
    }

    /// A command of PostgreSQL's, run in the cluster's directory as the
    /// cluster's owner.
    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        let mut cmd = match self.run_as {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg(exe);
                c
            }
            None => Command::new(exe),
        };
        // Its own directory: the caller's may not be readable by the owner.
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        cmd
    }

    /// Starts the server (again, after [`PgServer::stop`]) on its port and
    /// waits until it accepts connections.
    pub fn start(&mut self) -> Result<(), String> {
        let log_path = self.dir.path().join("postgres.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        self.log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let err = log
            .try_clone()
            .map_err(|e| format!("sharing the log file: {e}"))?;
        let child = self
            .command("postgres")
            .args(["-D", "data", "-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("port={}", self.port))
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting postgres: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ready = self
                .command("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("postgres exited with {status}:\n{}", self.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("postgres not ready after 120 s:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server the way a crash or a `pg_ctl stop -m immediate`
    /// does (SIGQUIT: no checkpoint, recovery from the WAL at the next
    /// start), and waits for it to exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-QUIT", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
    }

    /// The postmaster's process id while it runs: its backends are its
    /// children.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for the `postgres` database as the `postgres` superuser.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's log since the current start.
    pub fn log(&self) -> String {
        let text = std::fs::read(self.dir.path().join("postgres.log")).unwrap_or_default();
        let from = usize::try_from(self.log_start).unwrap_or(0).min(text.len());
        String::from_utf8_lossy(&text[from..]).into_owned()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
        // The TempDir removes the cluster after this.
    }
}
