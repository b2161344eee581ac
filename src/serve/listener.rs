//! The local HTTP listener (docs/design.md#the-listener): `GET`/`HEAD
//! /health` and `/metrics`, for an operator's `curl localhost:8080/health`
//! and for the `/metrics` object of the pull-model agent this one replaces
//! (what that manager needs of it is in [`super::pull`]).
//!
//! It runs beside collection and pushing and must never slow them, nor let a
//! client grow the agent's memory: everything a client controls is bounded
//! by the constants below (head size, time to send a head, idle time,
//! concurrent connections, time to take a response). One accept thread
//! blocks in `accept` (no polling, so an idle listener costs nothing) and
//! starts one short-lived thread per connection, at most
//! [`MAX_CONNECTIONS`] at a time, plus [`LOOPBACK_RESERVE`] for loopback
//! peers only. When every slot a new client may take is held, the
//! connection that has waited longest for its next request is closed for
//! it; when none waits, the new one gets a 503 and is closed at once,
//! never queued. So neither a client keeping idle connections nor a peer on
//! the network filling every slot keeps `/health` from the guest out. The status lock is only taken to copy the
//! health figures or the latest sample's `Arc`; serialization and I/O happen
//! after it is released.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::pull;
use crate::deliver::buffer::Buffer;
use crate::error::{Error, Result};
use crate::output::prometheus;
use crate::status::{Health, HealthState, Status};

/// Largest request head (request line and headers), in bytes. A head that
/// does not end within it gets 431 and the connection is closed.
pub const MAX_HEAD: usize = 8 * 1024;

/// Most header lines in one request; more gets 431.
pub const MAX_HEADERS: usize = 32;

/// Time a client has to send a whole request head, counted from the
/// connection's accept (first request) or from the head's first byte (later
/// requests), not per read: a client dripping one byte a second is cut when
/// it runs out. A body to discard gets the same time again, from the end of
/// its head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// Time a keep-alive connection may wait for its next request. A client
/// that keeps asking within it keeps its slot: that is ordinary use, and
/// [`MAX_CONNECTIONS`] bounds what it costs.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Time a client has to take one whole response; a client that never reads
/// cannot hold a connection thread longer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections served at once. When all are taken, the one that has waited
/// longest between requests on a kept-alive connection is closed to make
/// room; when none is waiting, the new one gets a 503 and is closed at
/// once: never queued, so a flood costs a few syscalls per connection.
pub const MAX_CONNECTIONS: usize = 16;

/// Slots beyond [`MAX_CONNECTIONS`] that only a loopback peer may take: an
/// operator's `curl localhost:8080/health` and the service's health check
/// come from inside the guest, while the pull port (`0.0.0.0:9000`) is
/// reachable from the network; no peer outside can take these.
pub const LOOPBACK_RESERVE: usize = 4;

/// Largest request body (on a GET, say) read and thrown away so that the
/// connection can be kept; a larger or unframed body closes the connection
/// after the response instead.
pub const MAX_DISCARDED_BODY: u64 = 64 * 1024;

/// After an error response, how long the client's remaining input is read
/// and thrown away before closing, so that closing with unread input (which
/// makes the kernel send a reset) does not destroy the response before the
/// client reads it.
pub const LINGER_TIMEOUT: Duration = Duration::from_millis(500);

/// Most bytes thrown away while lingering.
pub const LINGER_MAX: usize = 64 * 1024;

/// Pause after a failed `accept` (out of file descriptors, say): the pending
/// connection stays queued, so retrying at once would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Stack of a listener thread. Requests are parsed from a heap buffer and
/// responses are small, so the 2 MiB default would only reserve address
/// space the guest may not have to spare.
const THREAD_STACK: usize = 256 * 1024;

/// How long `stop` waits to connect to its own listener to wake `accept`.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the listener reads: the shared status, and the buffer for its
/// figures.
#[derive(Debug, Clone)]
pub struct View {
    /// The status every stage updates.
    pub status: Arc<Status>,
    /// The buffer between collection and delivery.
    pub buffer: Arc<Buffer>,
}

impl View {
    /// What `/health` says now.
    pub fn health(&self) -> Health {
        self.status.health(self.buffer.figures())
    }
}

/// A running listener.
#[derive(Debug)]
pub struct Listener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// The address it listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes the open connections and joins every thread.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // `accept` blocks without a timeout (an idle listener must cost
        // nothing), so a connection of our own is what wakes it.
        match TcpStream::connect_timeout(&wake_addr(self.addr), WAKE_TIMEOUT) {
            Ok(_) => {
                if thread.join().is_err() {
                    log::error!("listener on {}: accept thread panicked", self.addr);
                }
            }
            // Joining now could hang forever; the thread ends at its next
            // connection instead.
            Err(e) => log::warn!(
                "listener on {}: cannot wake the accept thread ({e}); leaving it to end at its next connection",
                self.addr
            ),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Binds `addr` and serves /health and /metrics from `view` on its own
/// thread(s). A bind failure returns an error naming the address (the
/// caller logs it and goes on without a listener).
pub fn spawn(addr: SocketAddr, view: View) -> Result<Listener> {
    let net_err = |reason: String| Error::Network {
        target: addr.to_string(),
        reason,
    };
    let listener = TcpListener::bind(addr).map_err(|e| net_err(format!("cannot listen: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| net_err(format!("cannot read the bound address: {e}")))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = thread::Builder::new()
        .name("listener".into())
        .stack_size(THREAD_STACK)
        .spawn(move || accept_loop(listener, view, flag))
        .map_err(|e| net_err(format!("cannot start the listener thread: {e}")))?;
    log::info!("listening on http://{local} (/health, /metrics)");
    Ok(Listener {
        addr: local,
        stop,
        thread: Some(thread),
    })
}

/// Where `stop` connects to wake `accept`: the bound address, or loopback of
/// the same family when bound to every address.
fn wake_addr(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    addr
}

/// One connection being served.
struct Slot {
    /// A handle on its socket, so that `stop` (or an eviction) can shut it
    /// down, which wakes its thread from a blocked read or write.
    stream: TcpStream,
    /// Which claim of the slot this is: a thread whose connection was
    /// closed for another frees only its own claim.
    generation: u64,
    /// The connection's [`IdleMark`].
    idle_since: Arc<AtomicU64>,
}

/// The connections being served: [`MAX_CONNECTIONS`] slots for anyone,
/// then [`LOOPBACK_RESERVE`] for loopback peers only.
struct Slots {
    slots: Mutex<Vec<Option<Slot>>>,
    next_generation: AtomicU64,
    epoch: Instant,
}

/// A claimed slot: its index, the claim's generation, and the idle mark
/// the connection keeps.
type Claim = (usize, u64, Arc<AtomicU64>);

impl Slots {
    fn new() -> Slots {
        Slots {
            slots: Mutex::new(
                (0..MAX_CONNECTIONS + LOOPBACK_RESERVE)
                    .map(|_| None)
                    .collect(),
            ),
            next_generation: AtomicU64::new(1),
            epoch: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Option<Slot>>> {
        // The release build aborts on panic, so this lock is never poisoned
        // there; in test builds a panicking connection thread leaves plain
        // data behind, still valid.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for `stream`: a free one this peer may take, else the one
    /// idle the longest (its connection is shut down), else `None`.
    fn claim(&self, stream: &TcpStream, loopback: bool) -> io::Result<Option<Claim>> {
        let mut slots = self.lock();
        let usable = if loopback {
            slots.len()
        } else {
            MAX_CONNECTIONS
        };
        let index = match slots[..usable].iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                let oldest = slots[..usable]
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| {
                        let since = s.as_ref()?.idle_since.load(Ordering::SeqCst);
                        (since > 0).then_some((since, i))
                    })
                    .min();
                let Some((_, i)) = oldest else {
                    return Ok(None);
                };
                if let Some(evicted) = slots[i].take() {
                    log::debug!("listener: closing an idle keep-alive connection for a new one");
                    let _ = evicted.stream.shutdown(Shutdown::Both);
                }
                i
            }
        };
        let generation = self.next_generation.fetch_add(1, Ordering::SeqCst);
        let idle_since = Arc::new(AtomicU64::new(0));
        slots[index] = Some(Slot {
            stream: stream.try_clone()?,
            generation,
            idle_since: idle_since.clone(),
        });
        Ok(Some((index, generation, idle_since)))
    }

    fn release(&self, index: usize, generation: u64) {
        let mut slots = self.lock();
        if slots[index]
            .as_ref()
            .is_some_and(|s| s.generation == generation)
        {
            slots[index] = None;
        }
    }

    fn shutdown_all(&self) {
        for s in self.lock().iter().flatten() {
            let _ = s.stream.shutdown(Shutdown::Both);
        }
    }
}

/// Frees a slot when its connection thread ends, however it ends (an early
/// return, or in test builds a panic; the release build aborts on panic).
struct SlotGuard {
    slots: Arc<Slots>,
    index: usize,
    generation: u64,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.release(self.index, self.generation);
    }
}

fn accept_loop(listener: TcpListener, view: View, stop: Arc<AtomicBool>) {
    let slots = Arc::new(Slots::new());
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    // Logged once per episode, not once per connection of a flood.
    let mut saturated = false;
    let mut failing = false;
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                failing = false;
                accepted
            }
            Err(e) => {
                if !failing {
                    log::warn!("listener: accept failed: {e}");
                    failing = true;
                }
                thread::sleep(ACCEPT_ERROR_PAUSE);
                continue;
            }
        };
        threads.retain(|t| !t.is_finished());
        let loopback = peer.ip().is_loopback()
            || matches!(peer.ip(), IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()));
        let claimed = match slots.claim(&stream, loopback) {
            Ok(Some(c)) => c,
            Ok(None) => {
                if !saturated {
                    log::warn!(
                        "listener: {MAX_CONNECTIONS} connections busy, none idle; refusing new ones until one ends"
                    );
                    saturated = true;
                }
                refuse(stream);
                continue;
            }
            Err(e) => {
                log::warn!("listener: cannot keep a connection: {e}");
                refuse(stream);
                continue;
            }
        };
        saturated = false;
        let (index, generation, idle) = claimed;
        let guard = SlotGuard {
            slots: slots.clone(),
            index,
            generation,
        };
        let epoch = slots.epoch;
        let view = view.clone();
        let stop = stop.clone();
        let spawned = thread::Builder::new()
            .name("listener-conn".into())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let _guard = guard;
                let mut c = Connection::new(stream, &view, &stop);
                c.idle = Some(IdleMark { since: idle, epoch });
                c.serve();
            });
        match spawned {
            Ok(t) => threads.push(t),
            // The closure, its stream and its guard are dropped: the slot
            // is free again and the client sees the connection close.
            Err(e) => log::warn!("listener: cannot start a connection thread: {e}"),
        }
    }
    slots.shutdown_all();
    for t in threads {
        let _ = t.join();
    }
}

/// Answers a connection beyond [`MAX_CONNECTIONS`] with a 503 without ever
/// blocking the accept thread, and closes it.
fn refuse(stream: TcpStream) {
    let r = Response::json((503, error_body("too many connections")));
    let mut msg = response_head(&r, false, false).into_bytes();
    msg.extend_from_slice(&r.body);
    // A fresh socket's send buffer takes a few hundred bytes at once; if it
    // does not, the client only misses the courtesy.
    if stream.set_nonblocking(true).is_ok() {
        let _ = (&stream).write(&msg);
    }
}

/// What a request asks for, after routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET`/`HEAD /health`.
    Health,
    /// `GET`/`HEAD /metrics`.
    Metrics,
    /// A path this listener does not serve (404).
    NotFound,
    /// A known path with a method other than GET or HEAD (405).
    MethodNotAllowed,
    /// `/configure-interface`, any method: deliberately not served (501).
    ConfigureInterface,
}

/// Routes a request by method and request target; the query string is
/// ignored (`/health?x=1` is `/health`).
pub fn route(method: &str, target: &str) -> Route {
    let path = target.split(['?', '#']).next().unwrap_or(target);
    if path == pull::CONFIGURE_INTERFACE {
        return Route::ConfigureInterface;
    }
    let known = matches!(path, "/health" | "/metrics");
    match (known, method) {
        (false, _) => Route::NotFound,
        (true, "GET" | "HEAD") if path == "/health" => Route::Health,
        (true, "GET" | "HEAD") => Route::Metrics,
        (true, _) => Route::MethodNotAllowed,
    }
}

/// How the body of a request is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// A `Transfer-Encoding` body, whose end this listener does not look for.
    Unframed,
}

/// The parts of a request head the listener acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Where it goes.
    pub route: Route,
    /// `HEAD`: same headers as `GET`, no body.
    pub head_only: bool,
    /// Whether the client lets the connection stay open after the response
    /// (HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with
    /// `Connection: keep-alive`).
    pub keep_alive: bool,
    /// The body that follows the head.
    pub body: Body,
    /// What its `Accept` header prefers for `/metrics`.
    pub accept: Representation,
}

/// The forms `/metrics` answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Representation {
    /// The latest sample as one JSON object, the pull-model agent's form.
    Json,
    /// The Prometheus text exposition (docs/backends.md#prometheus).
    Prometheus,
}

/// The form an `Accept` header prefers (RFC 9110 section 12.5.1): each
/// form gets the quality of the most specific range that matches it
/// (`text/plain` before `text/*` before `*/*`), and JSON wins a tie, so
/// that `*/*` alone, no header, and today's pulling manager get JSON.
/// Prometheus' scrape header (`application/openmetrics-text;version=1.0.0,
/// …,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`) gets the exposition.
pub fn negotiate(accept: &str) -> Representation {
    let candidates = [("application", "json"), ("text", "plain")];
    // (specificity, quality) of the best match of each candidate.
    let mut best = [(0u8, 0.0f32); 2];
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim();
        let Some((ty, sub)) = media.split_once('/') else {
            continue;
        };
        let mut q = 1.0f32;
        for p in parts {
            let p = p.trim();
            if let Some(v) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                q = v.trim().parse::<f32>().unwrap_or(0.0).clamp(0.0, 1.0);
            }
        }
        for (i, (cty, csub)) in candidates.iter().enumerate() {
            let specificity = match (ty.eq_ignore_ascii_case(cty), sub.eq_ignore_ascii_case(csub)) {
                (true, true) => 3,
                (true, false) if sub == "*" => 2,
                _ if ty == "*" && sub == "*" => 1,
                _ => 0,
            };
            if specificity > best[i].0 {
                best[i] = (specificity, q);
            }
        }
    }
    if best[1].1 > best[0].1 {
        Representation::Prometheus
    } else {
        Representation::Json
    }
}

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Not HTTP/1.x, or a bad `Content-Length` (400).
    BadRequest,
    /// More than [`MAX_HEAD`] bytes or [`MAX_HEADERS`] lines (431).
    TooLarge,
}

impl Reject {
    fn status(self) -> u16 {
        match self {
            Reject::BadRequest => 400,
            Reject::TooLarge => 431,
        }
    }
}

/// Parses the request head at the start of `buf`. `Ok(None)`: incomplete,
/// read more (unless `buf` already holds [`MAX_HEAD`] bytes). `Ok(Some)`:
/// the request and the head's length in bytes.
pub fn parse_head(buf: &[u8]) -> std::result::Result<Option<(Request, usize)>, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(Reject::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::TooLarge),
        Err(_) => return Err(Reject::BadRequest),
    };
    if len > MAX_HEAD {
        return Err(Reject::TooLarge);
    }
    // A complete parse always has these three.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Reject::BadRequest);
    };

    let mut close = false;
    let mut keep = false;
    let mut length: Option<u64> = None;
    let mut encoded = false;
    let mut accept = Representation::Json;
    let mut accept_values: Vec<&[u8]> = Vec::new();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            for token in String::from_utf8_lossy(h.value).split(',') {
                let token = token.trim();
                close |= token.eq_ignore_ascii_case("close");
                keep |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            // Repeated or comma-joined values must agree (RFC 9112 §6.3).
            for v in h.value.split(|&b| b == b',') {
                let n = parse_length(v.trim_ascii()).ok_or(Reject::BadRequest)?;
                if length.is_some_and(|l| l != n) {
                    return Err(Reject::BadRequest);
                }
                length = Some(n);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            encoded = true;
        } else if h.name.eq_ignore_ascii_case("accept") {
            accept_values.push(h.value);
        }
    }
    if !accept_values.is_empty() {
        // Repeated header lines are one list (RFC 9110 section 5.3).
        let joined = accept_values
            .iter()
            .map(|v| String::from_utf8_lossy(v))
            .collect::<Vec<_>>()
            .join(",");
        accept = negotiate(&joined);
    }
    let body = match (encoded, length) {
        (true, _) => Body::Unframed,
        (false, Some(n)) if n > 0 => Body::Length(n),
        _ => Body::None,
    };
    Ok(Some((
        Request {
            route: route(method, target),
            head_only: method == "HEAD",
            keep_alive: if version == 1 { !close } else { keep && !close },
            body,
            accept,
        },
        len,
    )))
}

/// Digits only: `+5`, `-1`, ` 5` and overflow are all refused.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// A response: status, body, and what its head says of it.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body's type.
    pub content_type: &'static str,
    /// The body (left out of the answer to a HEAD).
    pub body: Vec<u8>,
    /// Whether the body depends on the request's `Accept` (`Vary`).
    pub varies: bool,
}

impl Response {
    fn json((status, body): (u16, Vec<u8>)) -> Response {
        Response {
            status,
            content_type: "application/json",
            body,
            varies: false,
        }
    }
}

/// The status line and headers of a response.
fn response_head(r: &Response, keep_alive: bool, allow: bool) -> String {
    format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n{}{}Connection: {}\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len(),
        if r.varies { "Vary: Accept\r\n" } else { "" },
        if allow { "Allow: GET, HEAD\r\n" } else { "" },
        if keep_alive { "keep-alive" } else { "close" },
    )
}

fn error_body(message: &str) -> Vec<u8> {
    let mut body = serde_json::json!({ "error": message })
        .to_string()
        .into_bytes();
    body.push(b'\n');
    body
}

/// A JSON body with a final newline, for a terminal's `curl`.
fn json_body<T: serde::Serialize>(value: &T) -> (u16, Vec<u8>) {
    match serde_json::to_vec(value) {
        Ok(mut body) => {
            body.push(b'\n');
            (200, body)
        }
        Err(e) => {
            log::error!("listener: cannot encode a response: {e}");
            (500, error_body("cannot encode the response"))
        }
    }
}

/// The response to `route`, read from `view`, in the form `accept`
/// prefers for `/metrics`. The status lock is held only to copy what is
/// read, never while encoding.
pub fn render(route: Route, accept: Representation, view: &View) -> Response {
    match route {
        Route::Health => {
            let health = view.health();
            let (status, body) = json_body(&health);
            // The code follows the body's own verdict, so the two agree.
            let status = if status == 200 && health.status != HealthState::Ok {
                503
            } else {
                status
            };
            Response::json((status, body))
        }
        Route::Metrics => {
            let mut r = match (view.status.latest_with_detail(), accept) {
                (None, _) => Response::json((503, error_body("no sample collected yet"))),
                (Some((sample, detail)), Representation::Prometheus) => {
                    let mut body = Vec::with_capacity(8 * 1024);
                    prometheus::encode(&sample, detail.as_deref(), &mut body);
                    Response {
                        status: 200,
                        content_type: prometheus::CONTENT_TYPE,
                        body,
                        varies: true,
                    }
                }
                (Some((sample, _)), Representation::Json) => match pull::missing_figures(&sample) {
                    missing if missing.is_empty() => Response::json(json_body(&*sample)),
                    missing => Response::json((
                        503,
                        error_body(&format!(
                            "the latest sample lacks {}: see /health collector_errors",
                            missing.join(", ")
                        )),
                    )),
                },
            };
            r.varies = true;
            r
        }
        Route::ConfigureInterface => {
            Response::json((501, error_body(pull::CONFIGURE_INTERFACE_REFUSED)))
        }
        Route::NotFound => Response::json((404, error_body("not found; try /health or /metrics"))),
        Route::MethodNotAllowed => {
            Response::json((405, error_body("method not allowed; use GET or HEAD")))
        }
    }
}

/// How waiting for input ended without data.
enum Wait {
    /// The peer closed, or the connection failed.
    Closed,
    /// The deadline passed.
    TimedOut,
}

/// Time left before `deadline`, or `None` once it has passed.
fn left(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// One client connection, served until it closes, idles out or errs.
struct Connection<'a> {
    stream: TcpStream,
    view: &'a View,
    stop: &'a AtomicBool,
    accepted: Instant,
    /// Received bytes not consumed yet; never more than [`MAX_HEAD`].
    buf: Box<[u8]>,
    filled: usize,
    /// Where this connection says it waits between requests, so that the
    /// accept thread may close it for a new client.
    idle: Option<IdleMark>,
}

/// A connection's mark in its slot: 0 while it is busy, else the
/// millisecond (counted from `epoch`, plus one) since which it has waited
/// for its next request on a kept-alive connection.
struct IdleMark {
    since: Arc<AtomicU64>,
    epoch: Instant,
}

impl IdleMark {
    fn set(&self, waiting: bool) {
        let v = if waiting {
            self.epoch.elapsed().as_millis() as u64 + 1
        } else {
            0
        };
        self.since.store(v, Ordering::SeqCst);
    }
}

impl<'a> Connection<'a> {
    fn new(stream: TcpStream, view: &'a View, stop: &'a AtomicBool) -> Connection<'a> {
        Connection {
            stream,
            view,
            stop,
            accepted: Instant::now(),
            buf: vec![0; MAX_HEAD].into_boxed_slice(),
            filled: 0,
            idle: None,
        }
    }

    fn serve(mut self) {
        // Responses go out in one write; Nagle would only delay them.
        let _ = self.stream.set_nodelay(true);
        let mut first = true;
        while !self.stop.load(Ordering::SeqCst) {
            let request = match self.read_request(first) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(status) => {
                    let r = Response::json((status, error_body(reason(status))));
                    if self.send(&r, false, false, false).is_ok() {
                        self.linger();
                    }
                    return;
                }
            };
            first = false;
            let mut keep_alive = request.keep_alive;
            match request.body {
                Body::None => {}
                Body::Length(n) if n <= MAX_DISCARDED_BODY => {
                    if !self.discard(n) {
                        return;
                    }
                }
                Body::Length(_) | Body::Unframed => keep_alive = false,
            }
            let r = render(request.route, request.accept, self.view);
            let allow = request.route == Route::MethodNotAllowed;
            if self.send(&r, request.head_only, keep_alive, allow).is_err() {
                return;
            }
            if !keep_alive {
                // The client may still be sending a body we did not read.
                self.linger();
                return;
            }
        }
    }

    /// Reads the next request head. `Ok(None)`: the connection ended
    /// quietly (closed, idle, or cut before sending anything). `Err`: the
    /// status to answer before closing.
    fn read_request(&mut self, first: bool) -> std::result::Result<Option<Request>, u16> {
        let idle_until = Instant::now() + IDLE_TIMEOUT;
        // The head's clock starts at accept for the first request, so that
        // a connection that sends nothing holds its slot only so long.
        let mut head_until = if first {
            Some(self.accepted + HEAD_TIMEOUT)
        } else if self.filled > 0 {
            Some(Instant::now() + HEAD_TIMEOUT)
        } else {
            None
        };
        loop {
            if self.filled > 0 {
                match parse_head(&self.buf[..self.filled]) {
                    Ok(Some((request, len))) => {
                        self.consume(len);
                        return Ok(Some(request));
                    }
                    Ok(None) => {}
                    Err(reject) => return Err(reject.status()),
                }
            }
            // Between requests, with nothing of the next one yet: idle.
            let waiting = head_until.is_none();
            if waiting && let Some(m) = &self.idle {
                m.set(true);
            }
            let filled = self.fill(head_until.unwrap_or(idle_until));
            if waiting && let Some(m) = &self.idle {
                m.set(false);
            }
            match filled {
                Ok(()) => {
                    head_until.get_or_insert_with(|| Instant::now() + HEAD_TIMEOUT);
                }
                Err(Wait::TimedOut) if self.filled > 0 => return Err(408),
                Err(_) => return Ok(None),
            }
        }
    }

    /// Reads more bytes into the buffer, waiting until `deadline` at most.
    fn fill(&mut self, deadline: Instant) -> std::result::Result<(), Wait> {
        loop {
            let wait = left(deadline).ok_or(Wait::TimedOut)?;
            self.stream
                .set_read_timeout(Some(wait))
                .map_err(|_| Wait::Closed)?;
            match self.stream.read(&mut self.buf[self.filled..]) {
                Ok(0) => return Err(Wait::Closed),
                Ok(n) => {
                    self.filled += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => return Err(Wait::TimedOut),
                Err(_) => return Err(Wait::Closed),
            }
        }
    }

    /// Drops the first `n` buffered bytes, keeping what follows (a
    /// pipelined request).
    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.filled, 0);
        self.filled -= n;
    }

    /// Reads and throws away a body of `n` bytes; false if it did not
    /// arrive in time.
    fn discard(&mut self, mut n: u64) -> bool {
        let deadline = Instant::now() + HEAD_TIMEOUT;
        loop {
            let buffered = self.filled.min(usize::try_from(n).unwrap_or(usize::MAX));
            self.consume(buffered);
            n -= buffered as u64;
            if n == 0 {
                return true;
            }
            if self.fill(deadline).is_err() {
                return false;
            }
        }
    }

    /// Writes one response within [`WRITE_TIMEOUT`].
    fn send(
        &mut self,
        r: &Response,
        head_only: bool,
        keep_alive: bool,
        allow: bool,
    ) -> io::Result<()> {
        let mut msg = response_head(r, keep_alive, allow).into_bytes();
        if !head_only {
            msg.extend_from_slice(&r.body);
        }
        let deadline = Instant::now() + WRITE_TIMEOUT;
        let mut rest = &msg[..];
        while !rest.is_empty() {
            let wait = left(deadline).ok_or(io::ErrorKind::TimedOut)?;
            self.stream.set_write_timeout(Some(wait))?;
            match self.stream.write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Ends the connection after a response: no more output, then the
    /// client's pending input is read and dropped for a bounded time, so
    /// that it reads the response before it sees the connection close.
    fn linger(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
        let deadline = Instant::now() + LINGER_TIMEOUT;
        let mut dropped = 0;
        while dropped < LINGER_MAX {
            self.filled = 0;
            if self.fill(deadline).is_err() {
                return;
            }
            dropped += self.filled;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> std::result::Result<Option<(Request, usize)>, Reject> {
        parse_head(s.as_bytes())
    }

    fn request(s: &str) -> Request {
        parse(s).unwrap().unwrap().0
    }

    #[test]
    fn routes_by_path_and_method_ignoring_the_query() {
        assert_eq!(route("GET", "/health"), Route::Health);
        assert_eq!(route("HEAD", "/health?x=1"), Route::Health);
        assert_eq!(route("GET", "/metrics"), Route::Metrics);
        assert_eq!(route("HEAD", "/metrics?"), Route::Metrics);
        assert_eq!(route("POST", "/health"), Route::MethodNotAllowed);
        assert_eq!(route("DELETE", "/metrics?a=b"), Route::MethodNotAllowed);
        assert_eq!(route("get", "/health"), Route::MethodNotAllowed);
        assert_eq!(route("GET", "/"), Route::NotFound);
        assert_eq!(route("GET", "/health/"), Route::NotFound);
        assert_eq!(route("GET", "/healthz"), Route::NotFound);
        assert_eq!(route("GET", "/%68ealth"), Route::NotFound);
        assert_eq!(route("GET", "http://localhost/health"), Route::NotFound);
        assert_eq!(route("POST", "/nope"), Route::NotFound);
        assert_eq!(route("GET", "/h\u{e9}alth"), Route::NotFound);
        assert_eq!(route("OPTIONS", "*"), Route::NotFound);
        assert_eq!(
            route("POST", "/configure-interface"),
            Route::ConfigureInterface
        );
        assert_eq!(
            route("GET", "/configure-interface?x"),
            Route::ConfigureInterface
        );
    }

    #[test]
    fn parses_a_complete_head_and_reports_its_length() {
        let raw = "GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics";
        let (req, len) = parse(raw).unwrap().unwrap();
        assert_eq!(len, raw.find("GET /metrics").unwrap());
        assert_eq!(
            req,
            Request {
                route: Route::Health,
                head_only: false,
                keep_alive: true,
                body: Body::None,
                accept: Representation::Json,
            }
        );
        assert!(request("HEAD /metrics HTTP/1.1\r\n\r\n").head_only);
    }

    #[test]
    fn an_incomplete_head_asks_for_more_until_the_limit() {
        assert_eq!(parse("GET /health HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert_eq!(parse("GE"), Ok(None));
        let mut big = String::from("GET /health HTTP/1.1\r\nX-Big: ");
        big.push_str(&"a".repeat(MAX_HEAD));
        assert_eq!(parse(&big), Err(Reject::TooLarge));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            parse(&format!("GET /health HTTP/1.1\r\n{many}\r\n")),
            Err(Reject::TooLarge)
        );
    }

    #[test]
    fn garbage_and_non_utf8_targets_are_bad_requests() {
        assert_eq!(
            parse("\x16\x03\x01\x02\x00\x01\x00"),
            Err(Reject::BadRequest)
        );
        assert_eq!(
            parse("GET /health HTTP/2.0\r\n\r\n"),
            Err(Reject::BadRequest)
        );
        assert_eq!(parse("GET  HTTP/1.1\r\n\r\n"), Err(Reject::BadRequest));
        assert_eq!(
            parse_head(b"GET /\xff\xfe HTTP/1.1\r\n\r\n"),
            Err(Reject::BadRequest)
        );
    }

    #[test]
    fn keep_alive_follows_version_and_connection_tokens() {
        assert!(request("GET /health HTTP/1.1\r\n\r\n").keep_alive);
        assert!(!request("GET /health HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!request("GET /health HTTP/1.1\r\nconnection: Upgrade, CLOSE\r\n\r\n").keep_alive);
        assert!(!request("GET /health HTTP/1.0\r\n\r\n").keep_alive);
        assert!(request("GET /health HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
    }

    #[test]
    fn bodies_are_framed_by_length_or_marked_unframed() {
        let with = |h: &str| parse(&format!("GET /health HTTP/1.1\r\n{h}\r\n\r\n"));
        assert_eq!(
            with("Content-Length: 10").unwrap().unwrap().0.body,
            Body::Length(10)
        );
        assert_eq!(
            with("Content-Length: 0").unwrap().unwrap().0.body,
            Body::None
        );
        assert_eq!(
            with("Content-Length: 7, 7").unwrap().unwrap().0.body,
            Body::Length(7)
        );
        assert_eq!(
            with("Transfer-Encoding: chunked").unwrap().unwrap().0.body,
            Body::Unframed
        );
        assert_eq!(with("Content-Length: 7, 8"), Err(Reject::BadRequest));
        assert_eq!(with("Content-Length: -1"), Err(Reject::BadRequest));
        assert_eq!(with("Content-Length: +1"), Err(Reject::BadRequest));
        assert_eq!(
            with("Content-Length: 99999999999999999999999"),
            Err(Reject::BadRequest)
        );
        assert_eq!(
            parse("GET /health HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(Reject::BadRequest)
        );
    }

    #[test]
    fn response_heads_carry_type_length_connection_and_allow() {
        let r = |status| Response::json((status, vec![b' '; 12]));
        let h = response_head(&r(405), true, true);
        assert!(h.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(h.contains("\r\nContent-Type: application/json\r\n"));
        assert!(h.contains("\r\nContent-Length: 12\r\n"));
        assert!(h.contains("\r\nAllow: GET, HEAD\r\n"));
        assert!(h.contains("\r\nConnection: keep-alive\r\n"));
        assert!(h.ends_with("\r\n\r\n"));
        let h = response_head(&r(200), false, false);
        assert!(!h.contains("Allow"));
        assert!(h.contains("\r\nConnection: close\r\n"));
    }

    #[test]
    fn error_bodies_are_json() {
        let v: serde_json::Value = serde_json::from_slice(&error_body("no \"sample\"")).unwrap();
        assert_eq!(v["error"], "no \"sample\"");
    }

    #[test]
    fn wake_address_is_loopback_for_wildcards() {
        let a: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(wake_addr(a), "127.0.0.1:8080".parse().unwrap());
        let a: SocketAddr = "[::]:8080".parse().unwrap();
        assert_eq!(wake_addr(a), "[::1]:8080".parse().unwrap());
        let a: SocketAddr = "127.0.0.2:80".parse().unwrap();
        assert_eq!(wake_addr(a), a);
    }

    #[test]
    fn accept_picks_the_exposition_only_when_it_is_preferred() {
        use Representation::{Json, Prometheus};
        let prometheus_scrape = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for (accept, want) in [
            (prometheus_scrape, Prometheus),
            ("text/plain", Prometheus),
            ("text/plain;version=0.0.4", Prometheus),
            ("TEXT/PLAIN", Prometheus),
            ("text/*", Prometheus),
            ("application/json", Json),
            ("*/*", Json),
            ("", Json),
            ("application/json;q=0.2, text/plain;q=0.9", Prometheus),
            ("text/plain;q=0.2, application/json", Json),
            ("text/plain;q=0, */*", Json),
            ("text/plain, application/json", Json),
            ("garbage;;;q=x,,", Json),
            ("image/png", Json),
        ] {
            assert_eq!(negotiate(accept), want, "{accept:?}");
        }
        let req =
            request("GET /metrics HTTP/1.1\r\nAccept: text/html\r\naccept: text/plain\r\n\r\n");
        assert_eq!(req.accept, Prometheus, "repeated Accept lines are one list");
    }
}
