//! A reference ingest server for manager developers: what the receiving end
//! of guest-agent's pushes has to do (docs/design.md#the-sample,
//! docs/design.md#delivery), in one std-only file.
//!
//! ```text
//! cargo run --example manager -- [--listen 127.0.0.1:18080 | --unix PATH [--vm-id ID]] [--ndjson FILE] [--token TOKEN] [--key-file FILE]
//! ```
//!
//! `--key-file FILE` (master keys, lines `KID HEX`) requires every push to
//! be signed with the key of the VM it speaks for, and stores samples only
//! of that VM (docs/security.md): 401 with the reason for a missing or
//! wrong signature or digest, 403 for a sample of another VM; nothing of
//! such a body is stored. `--unix PATH --vm-id ID` refuses (403) samples of
//! any VM but ID, signed or not: the host socket of a vsock belongs to one
//! VM.
//!
//! `--unix PATH` listens on a Unix socket instead: the host side of a
//! Firecracker VM whose agent pushes over vsock is `--unix <uds_path>_PORT`
//! (docs/vsock.md).
//!
//! It accepts `POST /v1/guest-metrics` with a JSON array of samples and
//! hands the body to the library's ingest kit (`guest_agent::ingest`), which
//! validates it (a batch is stored whole or not at all; fields it does not
//! know are ignored) and sorts its samples into new ones, duplicates by
//! (`run_id`, `seq`) and conflicts (a pair seen before with a different
//! payload, reported on stderr). It prints one line per new sample,
//! optionally appends each to an NDJSON file, and answers 200 with the
//! counts as JSON. The first line on stdout is `listening on ADDR`, so a
//! caller that asked for port 0 learns the port.
//!
//! Answers: 400 with a JSON reason for a body that does not parse or fails
//! validation, 422 for a schema other than 1; 401 without the right
//! `Authorization: Bearer` (with `--token`); 404 for other paths, 405 for
//! other methods; 411 without a `Content-Length`, 501 for
//! `Transfer-Encoding` (the agent always sends a length); 413 for bodies
//! over the kit's `MAX_BODY`, 431 for heads over [`MAX_HEAD`]; 503 when the
//! NDJSON file cannot be written (the batch is not marked seen, so the
//! agent's retry stores it) and, with `Retry-After`, when
//! [`MAX_CONNECTIONS`] are open.
//!
//! HTTP/1.1 keep-alive, one thread per connection, and every read has a
//! deadline. A production manager keeps the same contract but stores samples
//! in its database, where a unique key on (`run_id`, `seq`) backs the kit's
//! in-memory de-duplication and survives restarts.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use guest_agent::Sample;
use guest_agent::ingest::{self, Ingest, Verifier};

/// The ingest path the agent POSTs to by default.
const INGEST_PATH: &str = "/v1/guest-metrics";
/// Largest request head (request line and headers), bytes.
const MAX_HEAD: usize = 16 * 1024;
/// Most headers in one request.
const MAX_HEADERS: usize = 64;
/// Connections served at once; more get 503 and `Retry-After`.
const MAX_CONNECTIONS: usize = 256;
/// Deadline for a whole request (head and body) once its first byte arrived.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// How long an idle keep-alive connection is kept open.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline for writing one response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match Options::parse(&args) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            print!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("manager: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(opts) {
        eprintln!("manager: {e}");
        std::process::exit(1);
    }
}

const USAGE: &str =
    "usage: manager [--listen ADDR:PORT | --unix PATH [--vm-id ID]] [--ndjson FILE] [--token TOKEN] [--key-file FILE]
  --listen ADDR:PORT  where to listen (default 127.0.0.1:18080; port 0 picks one)
  --unix PATH         listen on a Unix socket instead (a Firecracker vsock host side)
  --ndjson FILE       append each new sample to FILE as one JSON line
  --token TOKEN       require Authorization: Bearer TOKEN
  --key-file FILE     master keys (lines KID HEX): require signed pushes, store only the signer's VM
  --vm-id ID          with --unix: the VM this socket belongs to; other VMs' samples get 403
";

/// The command line.
struct Options {
    listen: SocketAddr,
    unix: Option<PathBuf>,
    ndjson: Option<PathBuf>,
    token: Option<String>,
    key_file: Option<PathBuf>,
    vm_id: Option<String>,
}

impl Options {
    /// `Ok(None)` for `--help`.
    fn parse(args: &[String]) -> Result<Option<Options>, String> {
        let mut opts = Options {
            listen: SocketAddr::from(([127, 0, 0, 1], 18080)),
            unix: None,
            ndjson: None,
            token: None,
            key_file: None,
            vm_id: None,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            if flag == "--help" || flag == "-h" {
                return Ok(None);
            }
            let value = it
                .next()
                .ok_or_else(|| format!("{flag} needs a value"))?
                .clone();
            match flag.as_str() {
                "--listen" => {
                    opts.listen = value.parse().map_err(|_| {
                        format!("--listen {value:?}: expected an address such as 127.0.0.1:18080")
                    })?
                }
                "--unix" => opts.unix = Some(PathBuf::from(value)),
                "--ndjson" => opts.ndjson = Some(PathBuf::from(value)),
                "--token" => {
                    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err("--token: expected printable ASCII without spaces".into());
                    }
                    opts.token = Some(value)
                }
                "--key-file" => opts.key_file = Some(PathBuf::from(value)),
                "--vm-id" => opts.vm_id = Some(value),
                _ => return Err(format!("unknown argument {flag:?}")),
            }
        }
        if opts.unix.is_some() && args.iter().any(|a| a == "--listen") {
            return Err("--listen and --unix exclude each other".into());
        }
        if opts.vm_id.is_some() && opts.unix.is_none() {
            return Err("--vm-id names the VM of a --unix socket; over TCP the signature names it (--key-file)".into());
        }
        Ok(Some(opts))
    }
}

/// What every connection thread shares.
struct Shared {
    token: Option<String>,
    /// Master keys: pushes must be signed (`--key-file`).
    verifier: Option<Verifier>,
    /// The only VM this socket accepts samples of (`--unix … --vm-id`).
    vm_id: Option<String>,
    sink: Sink,
    store: Mutex<Store>,
}

/// Seen samples and where new ones go, under one lock so that the NDJSON
/// file's order is the order samples were accepted in.
struct Store {
    ingest: Ingest,
    ndjson: Option<File>,
}

/// Where each new (de-duplicated, stored) sample goes besides the NDJSON
/// file: the command prints a line, the demo draws a table.
pub type Sink = Box<dyn Fn(&Sample) + Send + Sync>;

fn run(opts: Options) -> Result<(), String> {
    let (listener, shared) = open(opts, Box::new(print_summary))?;
    println!("listening on {}", listener.name()?);
    accept_loop(listener, shared);
    Ok(())
}

/// Binds a Unix socket at `path`. A socket file left by a listener that
/// was killed (nothing accepts on it any more) is replaced, so a restarted
/// host side needs no clean-up; a live one is an error.
fn bind_unix(path: &std::path::Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::FileTypeExt;
    let stale = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
        && UnixStream::connect(path).is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused);
    if stale {
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
    }
    UnixListener::bind(path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))
}

/// Where connections come from.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// What the first stdout line names: the bound address (the port chosen
    /// for port 0), or `unix:PATH`.
    fn name(&self) -> Result<String, String> {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .map_err(|e| format!("cannot read the bound address: {e}")),
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .ok_or_else(|| "cannot read the bound socket path".into()),
        }
    }

    fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, a)| (Stream::Tcp(s), a.to_string())),
            Listener::Unix(l) => l.accept().map(|(s, _)| (Stream::Unix(s), "unix".into())),
        }
    }
}

/// One accepted connection, TCP or Unix.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Starts a receiver on `listen` on its own thread, giving every new sample
/// to `sink`; returns the bound address (for the demo, in-process).
pub fn spawn(listen: SocketAddr, sink: Sink) -> Result<SocketAddr, String> {
    let opts = Options {
        listen,
        unix: None,
        ndjson: None,
        token: None,
        key_file: None,
        vm_id: None,
    };
    let (listener, shared) = open(opts, sink)?;
    let addr = match &listener {
        Listener::Tcp(l) => l
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?,
        Listener::Unix(_) => unreachable!("spawn listens on TCP"),
    };
    std::thread::Builder::new()
        .name("manager".into())
        .spawn(move || accept_loop(listener, shared))
        .map_err(|e| format!("cannot start the receiver thread: {e}"))?;
    Ok(addr)
}

/// Opens the NDJSON file and binds the listener.
fn open(opts: Options, sink: Sink) -> Result<(Listener, Arc<Shared>), String> {
    let ndjson = match &opts.ndjson {
        Some(path) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let listener = match &opts.unix {
        Some(path) => Listener::Unix(bind_unix(path)?),
        None => Listener::Tcp(
            TcpListener::bind(opts.listen)
                .map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?,
        ),
    };
    let verifier = opts.key_file.as_deref().map(Verifier::load).transpose()?;
    let shared = Arc::new(Shared {
        token: opts.token,
        verifier,
        vm_id: opts.vm_id,
        sink,
        store: Mutex::new(Store {
            ingest: Ingest::new(),
            ndjson,
        }),
    });
    Ok((listener, shared))
}

/// Serves connections until the process ends.
fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors, a reset before accept: the
                // listener itself is fine; wait a little and go on.
                eprintln!("manager: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            let mut conn = Conn::new(stream);
            let _ = conn.respond(&Reply::busy(), true);
            continue;
        }
        let guard = Slot(Arc::clone(&open));
        let shared = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                let _slot = guard;
                if let Err(e) = serve(Conn::new(stream), &shared) {
                    eprintln!("manager: {peer}: {e}");
                }
            });
        if let Err(e) = spawned {
            eprintln!("manager: cannot start a connection thread: {e}");
        }
    }
}

/// Holds one of the [`MAX_CONNECTIONS`] places until dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Locks the store; a panic in another connection thread leaves it usable
/// (each update is complete before anything that could panic).
fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(|p| p.into_inner())
}

/// One HTTP response.
struct Reply {
    status: u16,
    reason: &'static str,
    headers: Vec<(&'static str, String)>,
    body: String,
    json: bool,
}

impl Reply {
    fn new(status: u16, reason: &'static str, body: impl Into<String>) -> Reply {
        Reply {
            status,
            reason,
            headers: Vec::new(),
            body: body.into(),
            json: false,
        }
    }

    /// The ingest kit's answer, with its JSON body.
    fn from_kit(r: ingest::Reply) -> Reply {
        let reason = match r.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            413 => "Content Too Large",
            422 => "Unprocessable Content",
            _ => "Service Unavailable",
        };
        let mut reply = Reply::new(r.status, reason, r.body);
        reply.json = true;
        reply
    }

    fn bad_request(why: impl std::fmt::Display) -> Reply {
        Reply::new(400, "Bad Request", format!("{why}\n"))
    }

    fn busy() -> Reply {
        let mut r = Reply::new(503, "Service Unavailable", "too many connections\n");
        r.headers.push(("Retry-After", "1".into()));
        r
    }
}

/// A connection with the bytes read from it but not used yet (the start of
/// a pipelined request).
struct Conn {
    stream: Stream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads more bytes into `buf`, waiting until `deadline`. `Ok(0)` is the
    /// end of the stream.
    fn fill(&mut self, deadline: Instant) -> io::Result<usize> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn respond(&mut self, reply: &Reply, close: bool) -> io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Length: {}\r\n",
            reply.status,
            reply.reason,
            reply.body.len()
        );
        if reply.json {
            head.push_str("Content-Type: application/json\r\n");
        } else if !reply.body.is_empty() {
            head.push_str("Content-Type: text/plain; charset=utf-8\r\n");
        }
        for (name, value) in &reply.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(if close {
            "Connection: close\r\n\r\n"
        } else {
            "Connection: keep-alive\r\n\r\n"
        });
        head.push_str(&reply.body);
        self.stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        self.stream.write_all(head.as_bytes())?;
        self.stream.flush()
    }
}

/// The parts of a request head the server acts on.
struct Head {
    method: String,
    path: String,
    keep_alive: bool,
    content_length: Option<usize>,
    chunked: bool,
    expect_continue: bool,
    authorization: Option<Vec<u8>>,
    /// `Content-Digest`, `Signature-Input` and `Signature`, for the kit.
    signed: Vec<(String, Vec<u8>)>,
    len: usize,
}

/// Parses a complete head from `buf`; `Ok(None)` when more bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed request head: {e}")),
    };
    let http11 = req.version == Some(1);
    let mut head = Head {
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        keep_alive: http11,
        content_length: None,
        chunked: false,
        expect_continue: false,
        authorization: None,
        signed: Vec::new(),
        len,
    };
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            if head.content_length.is_some_and(|m| m != n) {
                return Err("conflicting Content-Length headers".into());
            }
            head.content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    head.keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    head.keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            head.expect_continue = value.eq_ignore_ascii_case("100-continue");
        } else if h.name.eq_ignore_ascii_case("authorization") {
            head.authorization = Some(h.value.to_vec());
        } else if ["content-digest", "signature-input", "signature"]
            .iter()
            .any(|n| h.name.eq_ignore_ascii_case(n))
        {
            head.signed.push((h.name.to_string(), h.value.to_vec()));
        }
    }
    Ok(Some(head))
}

/// Serves requests on one connection until the client closes it, a reply
/// closes it, or a deadline passes.
fn serve(mut conn: Conn, shared: &Shared) -> io::Result<()> {
    loop {
        // Wait for the first byte of the next request with the idle
        // timeout, then for the rest of it with the request deadline.
        if conn.buf.is_empty() {
            match conn.fill(Instant::now() + IDLE_TIMEOUT) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        let deadline = Instant::now() + REQUEST_DEADLINE;
        let head = loop {
            match parse_head(&conn.buf) {
                Ok(Some(head)) => break head,
                Ok(None) if conn.buf.len() > MAX_HEAD => {
                    let reply =
                        Reply::new(431, "Request Header Fields Too Large", "head too large\n");
                    return conn.respond(&reply, true);
                }
                Ok(None) => {
                    if conn.fill(deadline)? == 0 {
                        return Ok(()); // closed in the middle of a head
                    }
                }
                Err(why) => return conn.respond(&Reply::bad_request(why), true),
            }
        };
        conn.buf.drain(..head.len);

        // Refusals that do not read the body close the connection: its
        // unread bytes would otherwise be taken for the next request.
        if let Some(reply) = refuse(&head, shared) {
            return conn.respond(&reply, true);
        }
        let Some(length) = head.content_length else {
            return conn.respond(
                &Reply::new(411, "Length Required", "Content-Length required\n"),
                true,
            );
        };
        if head.expect_continue && conn.buf.is_empty() {
            conn.stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
            conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        while conn.buf.len() < length {
            if conn.fill(deadline)? == 0 {
                return Ok(()); // closed in the middle of a body
            }
        }
        let body: Vec<u8> = conn.buf.drain(..length).collect();
        let reply = ingest(&head, &body, shared);
        conn.respond(&reply, !head.keep_alive)?;
        if !head.keep_alive {
            return Ok(());
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The reply for a request refused on its head alone.
fn refuse(head: &Head, shared: &Shared) -> Option<Reply> {
    let path = head.path.split('?').next().unwrap_or_default();
    if path != INGEST_PATH {
        return Some(Reply::new(404, "Not Found", "not found\n"));
    }
    if head.method != "POST" {
        let mut r = Reply::new(405, "Method Not Allowed", "only POST\n");
        r.headers.push(("Allow", "POST".into()));
        return Some(r);
    }
    if let Some(token) = &shared.token {
        let expected = format!("Bearer {token}");
        let given = head.authorization.as_deref().unwrap_or_default();
        if !constant_time_eq(given, expected.as_bytes()) {
            let mut r = Reply::new(401, "Unauthorized", "missing or wrong bearer token\n");
            r.headers.push(("WWW-Authenticate", "Bearer".into()));
            return Some(r);
        }
    }
    if head.chunked {
        return Some(Reply::new(
            501,
            "Not Implemented",
            "Transfer-Encoding is not supported; send Content-Length\n",
        ));
    }
    if let Some(Err(refusal)) = head.content_length.map(|n| ingest::check_length(n as u64)) {
        return Some(Reply::from_kit(refusal.reply()));
    }
    None
}

/// Compares without stopping at the first difference, so response time
/// does not tell how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The VM a request speaks for: its signer's (checked on the raw body,
/// before any parsing) and, over a VM's own socket, that VM's; `None` when
/// neither is required.
fn speaks_for(head: &Head, body: &[u8], shared: &Shared) -> Result<Option<String>, Reply> {
    let signer = match &shared.verifier {
        Some(v) => {
            let headers: Vec<(&str, &[u8])> = head
                .signed
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_slice()))
                .collect();
            let signer = v
                .verify(&head.method, &head.path, &headers, body)
                .map_err(|r| Reply::from_kit(r.reply()))?;
            Some(signer.vm_id)
        }
        None => None,
    };
    match (signer, &shared.vm_id) {
        (Some(signer), Some(socket)) if signer != *socket => {
            let refusal = ingest::Refusal {
                status: ingest::OTHER_VM,
                reason: format!("signed for {signer:?} on the socket of VM {socket:?}"),
            };
            Err(Reply::from_kit(refusal.reply()))
        }
        (signer, socket) => Ok(signer.or_else(|| socket.clone())),
    }
}

/// Validates a batch with the ingest kit and stores its new samples.
fn ingest(head: &Head, body: &[u8], shared: &Shared) -> Reply {
    let vm_id = match speaks_for(head, body, shared) {
        Ok(v) => v,
        Err(reply) => return reply,
    };
    let mut store = lock(&shared.store);
    let prepared = match &vm_id {
        Some(vm) => store.ingest.prepare_for_vm(body, vm),
        None => store.ingest.prepare(body),
    };
    let batch = match prepared {
        Ok(b) => b,
        Err(refusal) => return Reply::from_kit(refusal.reply()),
    };
    for c in batch.conflicts() {
        eprintln!(
            "manager: run {} seq {} (vm {}) was stored before with a different payload; the first is kept",
            c.run_id,
            c.seq,
            c.vm_id.as_deref().unwrap_or("?")
        );
    }
    // Remembered as seen only once stored: a failed write leaves the
    // samples new for the agent's retry.
    if let Some(file) = store.ndjson.as_mut() {
        let mut lines = String::new();
        for s in batch.fresh() {
            match serde_json::to_string(s) {
                Ok(line) => {
                    lines.push_str(&line);
                    lines.push('\n');
                }
                Err(e) => return Reply::from_kit(ingest::Reply::store_failed(&e.to_string())),
            }
        }
        if let Err(e) = file.write_all(lines.as_bytes()).and_then(|()| file.flush()) {
            eprintln!("manager: writing the NDJSON file: {e}");
            return Reply::from_kit(ingest::Reply::store_failed("cannot store samples"));
        }
    }
    store.ingest.commit(&batch);
    for s in batch.fresh() {
        (shared.sink)(s);
    }
    Reply::from_kit(batch.reply())
}

/// Prints one compact line per sample. A closed stdout must not stop
/// ingestion: the line is only a view.
fn print_summary(s: &Sample) {
    let _ = writeln!(io::stdout().lock(), "{}", summary(s));
}

/// One compact line: vm, seq, cpu%, mem%, load.
fn summary(s: &Sample) -> String {
    fn figure(x: Option<f64>) -> String {
        x.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
    }
    let vm = s.vm_id.as_deref().or(s.hostname.as_deref()).unwrap_or("?");
    format!(
        "{vm} seq={} cpu={}% mem={}% load={}",
        s.seq,
        figure(s.cpu_usage_percent),
        figure(s.memory_usage_percent),
        s.load_average
            .map_or_else(|| "-".into(), |v| format!("{v:.2}")),
    )
}
