//! Test helpers: a scriptable HTTP receiver on 127.0.0.1 and waiting helpers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use std::time::{Duration, Instant};

use guest_agent::config::{self, Config};

/// How the receiver answers the next requests.
#[derive(Debug, Clone)]
pub enum Mode {
    /// 204 No Content.
    Accept,
    /// This status, with these extra headers.
    Status(u16, Vec<(String, String)>),
    /// 413 for requests with more than this many samples, else 204.
    TooLargeAbove(usize),
    /// This status with this JSON body.
    Body(u16, String),
    /// Read the request, then never answer (until the mode changes).
    Hang,
    /// Read the request, send half a response, close.
    CloseMidResponse,
    /// Accept the connection and close it at once.
    Reset,
    /// 204 for a JSON array of samples of this schema or a guest-address
    /// report (`POST …/guest-ip`), 400 for anything else.
    Samples,
}

/// One request the receiver saw.
#[derive(Debug, Clone)]
pub struct Request {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The parsed JSON array, when the body was one.
    pub samples: Vec<serde_json::Value>,
    /// The status it was answered with (0: none).
    pub answered: u16,
}

#[derive(Default)]
struct State {
    requests: Vec<Request>,
    connections: u64,
}

/// An HTTP/1.1 receiver with keep-alive, on 127.0.0.1.
pub struct Receiver {
    pub addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    state: Arc<Mutex<State>>,
}

impl Receiver {
    /// Binds 127.0.0.1 on a free port.
    pub fn start(mode: Mode) -> Receiver {
        Self::start_on("127.0.0.1:0".parse().unwrap(), mode)
    }

    /// Binds `addr` (to come back on the port an agent already targets).
    pub fn start_on(addr: SocketAddr, mode: Mode) -> Receiver {
        let listener = TcpListener::bind(addr).expect("bind receiver");
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(mode));
        let state = Arc::new(Mutex::new(State::default()));
        let (m, s) = (mode.clone(), state.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                s.lock().unwrap().connections += 1;
                let (m, s) = (m.clone(), s.clone());
                std::thread::spawn(move || serve(conn, m, s));
            }
        });
        Receiver { addr, mode, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1/guest-metrics", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Connections accepted so far (in `Reset` mode, each is a failed push).
    pub fn connections(&self) -> u64 {
        self.state.lock().unwrap().connections
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Samples of the requests answered 2xx, in arrival order.
    pub fn delivered(&self) -> Vec<serde_json::Value> {
        self.requests()
            .into_iter()
            .filter(|r| (200..300).contains(&r.answered))
            .flat_map(|r| r.samples)
            .collect()
    }

    /// Seqs of delivered samples, in arrival order.
    pub fn delivered_seqs(&self) -> Vec<u64> {
        self.delivered()
            .iter()
            .map(|s| s["seq"].as_u64().unwrap())
            .collect()
    }

    /// Waits until `pred` holds for the receiver, or panics after `secs`.
    pub fn wait_for(&self, secs: u64, what: &str, pred: impl Fn(&Receiver) -> bool) {
        wait_until(secs, what, || pred(self));
    }
}

/// Polls `pred` every 20 ms until it holds; panics after `secs` seconds.
pub fn wait_until(secs: u64, what: &str, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !pred() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve(mut conn: TcpStream, mode: Arc<Mutex<Mode>>, state: Arc<Mutex<State>>) {
    let mut buf = Vec::new();
    loop {
        if matches!(*mode.lock().unwrap(), Mode::Reset) {
            return;
        }
        let Some((method, path, headers, body)) = read_request(&mut conn, &mut buf) else {
            return;
        };
        let samples = serde_json::from_slice::<Vec<serde_json::Value>>(&body).unwrap_or_default();
        let mode_now = mode.lock().unwrap().clone();
        let mut reply_body = String::new();
        let (status, extra): (u16, Vec<(String, String)>) = match &mode_now {
            Mode::Accept => (204, vec![]),
            Mode::Body(code, b) => {
                reply_body = b.clone();
                (
                    *code,
                    vec![("Content-Type".into(), "application/json".into())],
                )
            }
            Mode::Status(code, h) => (*code, h.clone()),
            Mode::TooLargeAbove(n) if samples.len() > *n => (413, vec![]),
            Mode::TooLargeAbove(_) => (204, vec![]),
            Mode::Samples if path.ends_with("/guest-ip") => (204, vec![]),
            Mode::Samples => match serde_json::from_slice::<Vec<guest_agent::Sample>>(&body) {
                Ok(_) => (204, vec![]),
                Err(_) => (400, vec![]),
            },
            Mode::Hang | Mode::CloseMidResponse | Mode::Reset => (0, vec![]),
        };
        state.lock().unwrap().requests.push(Request {
            at: Instant::now(),
            method,
            path,
            headers,
            body,
            samples,
            answered: status,
        });
        match mode_now {
            Mode::Hang => {
                // Hold the connection, answering nothing, until the mode changes.
                while matches!(*mode.lock().unwrap(), Mode::Hang) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
            Mode::CloseMidResponse => {
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart");
                return;
            }
            Mode::Reset => return,
            _ => {}
        }
        let mut resp = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n",
            reply_body.len()
        );
        for (k, v) in extra {
            resp.push_str(&format!("{k}: {v}\r\n"));
        }
        resp.push_str("\r\n");
        resp.push_str(&reply_body);
        if conn.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// A request's method, path, lower-cased headers and body.
type Parsed = (String, String, Vec<(String, String)>, Vec<u8>);

/// Reads one request (head and Content-Length body) from a keep-alive
/// connection; `buf` carries bytes read past the previous request.
fn read_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Parsed> {
    let mut chunk = [0u8; 16384];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head_len)) = req.parse(buf) {
            let method = req.method.unwrap_or("").to_string();
            let path = req.path.unwrap_or("").to_string();
            let hs: Vec<(String, String)> = req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let len: usize = hs
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < head_len + len {
                let n = conn.read(&mut chunk).ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[head_len..head_len + len].to_vec();
            buf.drain(..head_len + len);
            return Some((method, path, hs, body));
        }
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The agent binary as a child process, killed if the test ends early
/// (a panic included), with its stderr collected as it comes.
pub struct AgentProcess {
    child: std::process::Child,
    started: Instant,
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl AgentProcess {
    /// Starts `guest-agent ARGS` on the fixture proc root with no config
    /// file and the listener off unless `args` says otherwise.
    pub fn start(args: &[&str]) -> AgentProcess {
        let root = fixture_root();
        let mut all = vec!["--proc-root", &root, "--config", "/nonexistent"];
        if !args.contains(&"--listen") {
            all.extend(["--listen", "off"]);
        }
        all.extend_from_slice(args);
        AgentProcess::spawn(&all)
    }

    /// Starts `guest-agent ARGS` with nothing else: no default arguments and
    /// nothing from the caller's environment.
    pub fn spawn(args: &[&str]) -> AgentProcess {
        use std::process::{Command, Stdio};
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_guest-agent"));
        for s in guest_agent::config::settings::SETTINGS {
            cmd.env_remove(s.env());
        }
        let started = Instant::now();
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start guest-agent");
        let (stderr, reader) = collect_stderr(&mut child);
        AgentProcess {
            child,
            started,
            stderr,
            reader: Some(reader),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When it was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Sends SIGTERM and gives it `secs` to exit (it is killed on drop if
    /// it has not); what it wrote to stderr.
    pub fn terminate(mut self, secs: u64) -> String {
        // It may have exited already: then there is nothing to signal.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stderr()
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until its stderr has a line containing `text`; returns the line.
    pub fn wait_for_log(&self, secs: u64, text: &str) -> String {
        let mut line = String::new();
        wait_until(secs, text, || {
            match self.stderr().lines().find(|l| l.contains(text)) {
                Some(l) => {
                    line = l.to_string();
                    true
                }
                None => false,
            }
        });
        line
    }

    /// The listener's address, from its start-up log line.
    pub fn listen_addr(&self) -> SocketAddr {
        let line = self.wait_for_log(30, "listening on ");
        let addr = line.rsplit("listening on ").next().unwrap_or_default();
        addr.trim_start_matches("http://")
            .split_whitespace()
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
    }

    /// Sends `signal` (`TERM`, `INT`, `KILL`) to it.
    pub fn signal(&self, signal: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(ok.success(), "kill -{signal} failed");
    }

    /// Waits for it to exit (at most `secs`); its status and stderr.
    pub fn wait(mut self, secs: u64) -> (std::process::ExitStatus, String) {
        let mut status = None;
        wait_until(secs, "the agent to exit", || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        // The reader sees end of file once the process is gone.
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        (status.unwrap(), self.stderr())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET http://ADDR/PATH` (bounded by a generous deadline): the status and
/// the body as text.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut resp = ureq::get(&format!("http://{addr}{path}"))
        .config()
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"));
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    (resp.status().as_u16(), body)
}

/// `guest-agent --once --url off ARGS` with no config file and nothing
/// from the caller's environment: the sample as JSON.
pub fn once(args: &[&str]) -> serde_json::Value {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_guest-agent"));
    cmd.args(["--once", "--url", "off", "--config", "/nonexistent"])
        .args(args);
    for s in guest_agent::config::settings::SETTINGS {
        cmd.env_remove(s.env());
    }
    let out = cmd.output().expect("run guest-agent --once");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--once prints JSON")
}

/// Collects a child's piped stderr as it comes, on a thread that ends at
/// end of file: the text so far, and the thread to join after the exit.
pub fn collect_stderr(
    child: &mut std::process::Child,
) -> (Arc<Mutex<String>>, std::thread::JoinHandle<()>) {
    let stderr = Arc::new(Mutex::new(String::new()));
    let sink = stderr.clone();
    let mut pipe = child.stderr.take().expect("stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    (stderr, reader)
}

/// The fixture proc root captured from a real machine.
pub fn fixture_root() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/host").to_string()
}

/// A configuration from CLI-style pairs, with no config file, the listener
/// off unless given, and the fixture proc root unless given.
pub fn config(pairs: &[(&'static str, &str)]) -> Config {
    let mut cli: Vec<(&'static str, String)> = vec![
        ("listen", "off".into()),
        ("proc_root", fixture_root()),
        ("log", "warn".into()),
    ];
    cli.extend(pairs.iter().map(|(k, v)| (*k, v.to_string())));
    config::resolve(&cli, &[], Some(Path::new("/nonexistent/guest-agent.conf")))
        .expect("valid test config")
}

/// The built example `name` (`target/<profile>/examples/NAME`), refusing one
/// older than its sources.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/TEST-HASH → target/<profile>/examples/NAME
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable is in target/<profile>/deps");
    let bin = dir.join("examples").join(name);
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}; {REBUILD}", bin.display()));
    // `cargo test --test X` alone does not rebuild examples: refuse to test
    // an old binary against newer sources.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Some(newer) =
        newest_source(&[root.join("examples"), root.join("src")]).filter(|(t, _)| *t > built)
    {
        panic!(
            "{} is older than {}; {REBUILD}",
            bin.display(),
            newer.1.display()
        );
    }
    bin
}

const REBUILD: &str =
    "run the whole `cargo test` (which builds examples) or `cargo build --examples`";

/// The most recently modified file among `paths` (directories walked).
fn newest_source(paths: &[PathBuf]) -> Option<(SystemTime, PathBuf)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut todo = paths.to_vec();
    while let Some(p) = todo.pop() {
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                todo.extend(entries.flatten().map(|e| e.path()));
            }
        } else if let Ok(t) = meta.modified()
            && newest.as_ref().is_none_or(|(n, _)| t > *n)
        {
            newest = Some((t, p));
        }
    }
    newest
}

/// Moves the calling thread (and every thread and process it starts from
/// now on) into a new network namespace with loopback up. `Err` when this
/// process may not create one.
pub fn private_network() -> Result<(), String> {
    // SAFETY: only the network namespace is unshared, which changes no file
    // descriptor or memory another thread could see.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
        .map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
    let up = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if !up.success() {
        return Err("ip link set lo up failed".into());
    }
    Ok(())
}

/// Moves this thread into a private network namespace; false (after
/// saying so) when that is not possible here, which fails under `CI=true`.
pub fn enter_private_network(test: &str) -> bool {
    match private_network() {
        Ok(()) => true,
        Err(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "a network namespace is required under CI=true: {why}"
            );
            eprintln!("{test}: SKIPPED, no network namespace: {why}");
            false
        }
    }
}

/// Runs `ip ARGS` (in the caller's namespace), panicking on failure.
pub fn ip(args: &str) {
    let ok = std::process::Command::new("ip")
        .args(args.split_whitespace())
        .status()
        .unwrap_or_else(|e| panic!("ip {args}: {e}"));
    assert!(ok.success(), "ip {args} failed");
}
