//! The listener over real loopback TCP: routes, status codes and bodies,
//! keep-alive, and the bounds a hostile client meets (docs/design.md#the-listener). Every
//! server binds 127.0.0.1 on port 0; every wait has a generous deadline and
//! no test asserts how long something took.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use guest_agent::internals::{
    Buffer, LOOPBACK_RESERVE, Listener, MAX_CONNECTIONS, Status, View, spawn_listener,
};
use guest_agent::{Collector, Sample};

/// Longest any single wait may take before the test fails: far beyond
/// every bound of the listener, so a loaded 2-core machine never trips it.
const DEADLINE: Duration = Duration::from_secs(30);

const FIXTURE: &str = "tests/fixtures/host";

/// What a listener reads, as the agent sets it up for `interval`.
fn shared(interval: &str) -> View {
    let config = guest_agent::config::resolve(
        &[
            ("url", "off".into()),
            ("listen", "127.0.0.1:0".into()),
            ("interval", interval.into()),
            ("proc_root", FIXTURE.into()),
        ],
        &[],
        Some(Path::new("/nonexistent")),
    )
    .unwrap();
    View {
        status: Arc::new(Status::new(config.interval, false, config.errors, None)),
        buffer: Arc::new(Buffer::new(config.buffer, config.buffer_max_bytes)),
    }
}

/// Collects a real sample from the fixture root and makes it the latest,
/// as the agent's collection loop does.
fn record(shared: &View, collector: &mut Collector, seq: u64) {
    let mut sample = collector.collect();
    sample.seq = seq;
    shared.status.collected(Arc::new(sample), None, None);
}

fn collector() -> Collector {
    Collector::new(Path::new(FIXTURE), Some("vm-test".into())).unwrap()
}

fn start(shared: &View) -> (Listener, SocketAddr) {
    let l = spawn_listener("127.0.0.1:0".parse().unwrap(), shared.clone()).unwrap();
    let addr = l.local_addr();
    (l, addr)
}

#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// A raw HTTP/1.x client that keeps its read buffer across responses, so
/// that stray bytes (a body after HEAD, say) would break the next response.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect_timeout(&addr, DEADLINE).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.set_write_timeout(Some(DEADLINE)).unwrap();
        Client {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    /// Writes `raw`. A server that has already answered and closed (a
    /// 4xx to hostile input, a 503 over the connection limit) makes the
    /// write fail with a reset or broken pipe: that is its right, and what
    /// the test then reads tells the outcome.
    fn send(&mut self, raw: impl AsRef<[u8]>) {
        if let Err(e) = self.writer.write_all(raw.as_ref()) {
            assert!(
                matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
                "write: {e}"
            );
        }
    }

    fn get(&mut self, method: &str, target: &str) -> Response {
        self.send(format!(
            "{method} {target} HTTP/1.1\r\nHost: localhost\r\n\r\n"
        ));
        self.response(method == "HEAD")
    }

    fn try_response(&mut self, head_only: bool) -> std::io::Result<Response> {
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status = line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let l = line.trim_end_matches("\r\n");
            if l.is_empty() {
                break;
            }
            let (n, v) = l
                .split_once(':')
                .ok_or_else(|| std::io::Error::other(format!("bad header {l:?}")))?;
            headers.push((n.to_string(), v.trim().to_string()));
        }
        let mut r = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if !head_only {
            let len: usize = r
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| std::io::Error::other("no content-length"))?;
            r.body = vec![0; len];
            self.reader.read_exact(&mut r.body)?;
        }
        Ok(r)
    }

    fn response(&mut self, head_only: bool) -> Response {
        self.try_response(head_only).unwrap()
    }

    /// True when the server has closed the connection (EOF or reset).
    fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.reader.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != ErrorKind::WouldBlock && e.kind() != ErrorKind::TimedOut,
        }
    }
}

/// One request on a fresh connection, retried until it gets an answer:
/// under a flood a connection may be refused or cut.
fn fetch_eventually(addr: SocketAddr, target: &str) -> Response {
    let until = Instant::now() + DEADLINE;
    loop {
        let attempt = (|| -> std::io::Result<Response> {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut c = Client {
                reader: BufReader::new(s.try_clone()?),
                writer: s,
            };
            c.writer.write_all(
                format!("GET {target} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes(),
            )?;
            c.try_response(false)
        })();
        match attempt {
            // Refused as one connection too many: try again.
            Ok(r) if r.status == 503 && r.json()["error"] == "too many connections" => {}
            Ok(r) => return r,
            Err(_) => {}
        }
        assert!(
            Instant::now() < until,
            "no answer for {target} within {DEADLINE:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `f` holds, failing after [`DEADLINE`].
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + DEADLINE;
    while !f() {
        assert!(Instant::now() < until, "{what}: not within {DEADLINE:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn health_get_and_head_answer_200_with_the_status_json() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    record(&shared, &mut collector(), 1);
    let mut c = Client::connect(addr);

    let get = c.get("GET", "/health");
    assert_eq!(get.status, 200);
    assert_eq!(get.header("content-type"), Some("application/json"));
    assert_eq!(get.header("connection"), Some("keep-alive"));
    let h = get.json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["version"], guest_agent::AGENT_VERSION);
    assert_eq!(h["push_state"], "off");
    assert_eq!(h["last_seq"], 1);
    for key in [
        "uptime_seconds",
        "last_sample_age_ms",
        "last_error",
        "consecutive_failures",
        "buffered",
        "buffer_capacity",
        "buffer_bytes",
        "buffer_max_bytes",
        "guest_ip",
        "dropped",
        "rejected",
        "config_errors",
    ] {
        assert!(h.get(key).is_some(), "{key} missing from {h}");
    }
    // Pushing is off: nothing is queued for a sender that does not exist.
    assert_eq!(
        (h["buffered"].as_u64(), h["dropped"].as_u64()),
        (Some(0), Some(0))
    );

    // HEAD: the same headers, no body. The next response on the same
    // connection would be garbled if any body byte followed.
    let head = c.get("HEAD", "/health");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("application/json"));
    let len: usize = head.header("content-length").unwrap().parse().unwrap();
    assert!(len > 0);
    let again = c.get("GET", "/health?verbose=1");
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["status"], "ok");
}

#[test]
fn health_is_503_when_no_sample_came_for_three_intervals() {
    let shared = shared("100ms");
    let (_l, addr) = start(&shared);
    let mut c = Client::connect(addr);
    wait_for("health turns stale", || {
        c.get("GET", "/health").status == 503
    });
    let r = c.get("GET", "/health");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["status"], "stale");
    let head = c.get("HEAD", "/health");
    assert_eq!(head.status, 503);
    assert_eq!(
        head.header("content-length").map(|v| v.is_empty()),
        Some(false)
    );

    // A fresh sample makes it healthy again.
    record(&shared, &mut collector(), 1);
    let r = c.get("GET", "/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
}

#[test]
fn metrics_is_503_before_the_first_sample_then_the_latest_sample() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    let mut c = Client::connect(addr);

    let r = c.get("GET", "/metrics");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.json()["error"].is_string());
    assert_eq!(c.get("HEAD", "/metrics").status, 503);

    let mut col = collector();
    record(&shared, &mut col, 1);
    record(&shared, &mut col, 2);
    let r = c.get("GET", "/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let sample = Sample::from_json_strict(&r.json()).unwrap();
    assert_eq!(sample.seq, 2);
    assert_eq!(sample.vm_id.as_deref(), Some("vm-test"));
    assert_eq!(sample.run_id, col.run_id());
    // The JSON carries the wire contract; the detail behind the totals
    // stays off it (docs/design.md#the-sample).
    let mut latest = (*shared.status.latest().unwrap()).clone();
    assert!(latest.detail.take().is_some());
    assert_eq!(latest, sample);

    let head = c.get("HEAD", "/metrics?pretty");
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(r.body.len().to_string().as_str())
    );
    assert_eq!(c.get("GET", "/metrics").status, 200);
}

#[test]
fn unknown_paths_are_404_and_other_methods_405_with_allow() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    let mut c = Client::connect(addr);
    for (method, target) in [
        ("GET", "/"),
        ("GET", "/healthz"),
        ("POST", "/nope"),
        ("GET", "/health/"),
    ] {
        let r = c.get(method, target);
        assert_eq!(r.status, 404, "{method} {target}");
        assert!(r.json()["error"].is_string());
    }
    for (method, target) in [
        ("POST", "/health"),
        ("DELETE", "/metrics"),
        ("PUT", "/health?x=1"),
    ] {
        let r = c.get(method, target);
        assert_eq!(r.status, 405, "{method} {target}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    // Errors on known request shapes keep the connection.
    assert_eq!(c.get("GET", "/health").status, 200);
}

#[test]
fn a_request_that_does_not_parse_is_400_and_closed() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    let mut c = Client::connect(addr);
    c.send("hello there\r\n\r\n");
    let r = c.response(false);
    assert_eq!(r.status, 400);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed_by_server());

    let mut c = Client::connect(addr);
    c.send("GET /health HTTP/1.1\r\nContent-Length: nine\r\n\r\n");
    assert_eq!(c.response(false).status, 400);
}

#[test]
fn a_non_utf8_path_is_400_or_404_and_the_listener_lives_on() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    for raw in [
        &b"GET /\xff\xfe\xfd HTTP/1.1\r\n\r\n"[..],
        b"GET /health\xc3\x28 HTTP/1.1\r\n\r\n",
        b"GET /h\xc3\xa9alth HTTP/1.1\r\n\r\n",
    ] {
        let mut c = Client::connect(addr);
        c.send(raw);
        let status = c.response(false).status;
        assert!(status == 400 || status == 404, "{status}");
    }
    assert_eq!(Client::connect(addr).get("GET", "/health").status, 200);
}

#[test]
fn a_one_mib_header_is_431() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    let mut c = Client::connect(addr);
    let mut writer = c.writer.try_clone().unwrap();
    // Written from another thread: the server stops reading after 8 KiB, so
    // this write fails or blocks until the server closes; the response is
    // read meanwhile.
    let sender = thread::spawn(move || {
        let mut raw = b"GET /health HTTP/1.1\r\nX-Big: ".to_vec();
        raw.resize(raw.len() + (1 << 20), b'a');
        raw.extend_from_slice(b"\r\n\r\n");
        let _ = writer.write_all(&raw);
    });
    let r = c.response(false);
    assert_eq!(r.status, 431);
    assert_eq!(r.header("connection"), Some("close"));
    sender.join().unwrap();
    assert!(c.closed_by_server());
    assert_eq!(Client::connect(addr).get("GET", "/health").status, 200);
}

#[test]
fn keep_alive_serves_several_requests_and_pipelined_ones_in_order() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    record(&shared, &mut collector(), 7);
    let mut c = Client::connect(addr);
    assert_eq!(c.get("GET", "/health").status, 200);
    assert_eq!(c.get("GET", "/metrics").json()["seq"], 7);

    c.send(
        "GET /metrics HTTP/1.1\r\n\r\nHEAD /health HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\n\r\n",
    );
    assert_eq!(c.response(false).json()["seq"], 7);
    assert_eq!(c.response(true).status, 200);
    assert_eq!(c.response(false).status, 404);
    assert_eq!(c.response(false).json()["status"], "ok");
}

#[test]
fn connection_close_and_http_1_0_end_the_connection() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);

    let mut c = Client::connect(addr);
    c.send("GET /health HTTP/1.1\r\nConnection: close\r\n\r\n");
    let r = c.response(false);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed_by_server());

    let mut c = Client::connect(addr);
    c.send("GET /health HTTP/1.0\r\n\r\n");
    let r = c.response(false);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed_by_server());

    // HTTP/1.0 may ask to keep it.
    let mut c = Client::connect(addr);
    c.send("GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(c.response(false).header("connection"), Some("keep-alive"));
    assert_eq!(c.get("GET", "/health").status, 200);
}

#[test]
fn a_body_on_get_is_discarded_or_the_connection_closed() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);

    let mut c = Client::connect(addr);
    c.send("GET /health HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world");
    assert_eq!(c.response(false).status, 200);
    // The body did not leak into the next request.
    assert_eq!(c.get("GET", "/health").status, 200);

    let mut c = Client::connect(addr);
    c.send("POST /health HTTP/1.1\r\nContent-Length: 1073741824\r\n\r\nsome of it");
    let r = c.response(false);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed_by_server());

    let mut c = Client::connect(addr);
    c.send("GET /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    let r = c.response(false);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed_by_server());
}

#[test]
fn a_slowloris_client_is_cut() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    let mut c = Client::connect(addr);
    c.reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let head = b"GET /health HTTP/1.1\r\nX-Drip: "
        .iter()
        .chain(std::iter::repeat(&b'a'));
    let until = Instant::now() + DEADLINE;
    let mut cut = false;
    for &b in head {
        if c.writer.write_all(&[b]).is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 512];
        match c.reader.get_mut().read(&mut buf) {
            // EOF, or the 408 the server sends before it closes.
            Ok(_) => {
                cut = true;
                break;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            Err(_) => {
                cut = true;
                break;
            }
        }
        if Instant::now() > until {
            break;
        }
    }
    assert!(
        cut,
        "a client dripping its head was not cut within {DEADLINE:?}"
    );
    assert_eq!(Client::connect(addr).get("GET", "/health").status, 200);
}

#[test]
fn a_client_that_sends_nothing_is_closed() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    let mut c = Client::connect(addr);
    assert!(c.closed_by_server());
}

#[test]
fn clients_that_close_mid_request_free_their_slots() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    for i in 0..3 * MAX_CONNECTIONS {
        let mut c = Client::connect(addr);
        c.send(&b"GET /health HTTP/1.1\r\nHost: loc"[..(i % 30) + 1]);
        // The listener may have closed it already (a connection over the
        // limit gets a 503 and is closed): then there is nothing to shut.
        if i % 2 == 0 {
            let _ = c.writer.shutdown(Shutdown::Write);
        }
    }
    // Were the slots held by the dead connections, this would wait for
    // their head time to run out instead; either way it must come.
    let r = fetch_eventually(addr, "/health");
    assert_eq!(r.status, 200);
}

#[test]
fn random_bytes_get_a_4xx_or_a_close_and_the_listener_lives_on() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift64*: reproducible noise without a crate.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for _ in 0..64 {
        let len = (next() % 4096) as usize + 1;
        let raw: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let mut c = Client::connect(addr);
        c.send(&raw);
        // Half-close, as a client that has said all it will say (unless
        // the listener closed first).
        let _ = c.writer.shutdown(Shutdown::Write);
        let mut out = Vec::new();
        let _ = c.reader.read_to_end(&mut out);
        if !out.is_empty() {
            let line = String::from_utf8_lossy(&out[..out.len().min(12)]).into_owned();
            assert!(line.starts_with("HTTP/1.1 4"), "{line:?} for {raw:?}");
        }
    }
    assert_eq!(Client::connect(addr).get("GET", "/health").status, 200);
}

#[test]
fn a_client_that_never_reads_is_cut() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    record(&shared, &mut collector(), 1);
    let mut c = Client::connect(addr);
    c.writer
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let request = b"GET /metrics HTTP/1.1\r\n\r\n".repeat(64);
    // The server answers until its send buffer and our receive buffer are
    // full, then its write deadline passes and it closes: our writes fail.
    // Our own write timing out only means the server is not reading yet.
    let until = Instant::now() + DEADLINE;
    let cut = loop {
        match c.writer.write(&request) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            Err(_) => break true,
        }
        if Instant::now() > until {
            break false;
        }
    };
    assert!(
        cut,
        "a client that never reads was not cut within {DEADLINE:?}"
    );
    assert_eq!(Client::connect(addr).get("GET", "/health").status, 200);
}

#[test]
fn a_flood_of_500_connections_leaves_health_reachable() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    let flood: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect_timeout(&addr, DEADLINE).unwrap())
        .collect();
    let r = fetch_eventually(addr, "/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");

    // None is held for long: those beyond the limit were refused with a
    // 503 at once, the others cut when their head time ran out.
    let mut refused = 0;
    for s in flood {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut out = Vec::new();
        match (&s).read_to_end(&mut out) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        }
        if out.starts_with(b"HTTP/1.1 503 ") {
            assert!(String::from_utf8_lossy(&out).contains("too many connections"));
            refused += 1;
        } else {
            assert!(out.is_empty(), "{:?}", String::from_utf8_lossy(&out));
        }
    }
    assert!(refused >= 1, "no connection was refused");
}

#[test]
fn collection_keeps_its_cadence_during_a_flood() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    let stop = Arc::new(AtomicBool::new(false));

    // The collector's stand-in: a real collection every 50 ms. Each update
    // is checked to have taken effect at once.
    let last = Arc::new(AtomicU64::new(0));
    let updater = {
        let (shared, stop, last) = (shared.clone(), stop.clone(), last.clone());
        thread::spawn(move || {
            let mut col = collector();
            let mut seq = 0;
            while !stop.load(Ordering::SeqCst) {
                seq += 1;
                record(&shared, &mut col, seq);
                assert_eq!(shared.status.latest().unwrap().seq, seq);
                last.store(seq, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(50));
            }
            seq
        })
    };

    // 500 connections at once, held, plus a few clients that drip a head
    // and reconnect as soon as they are cut, all through the test.
    let flood: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect_timeout(&addr, DEADLINE).unwrap())
        .collect();
    let drippers: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else {
                        continue;
                    };
                    for b in b"GET /metrics HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
                        if stop.load(Ordering::SeqCst) || s.write_all(&[*b]).is_err() {
                            break;
                        }
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            })
        })
        .collect();

    // /metrics must keep showing newer samples while all that goes on.
    let mut seen: Vec<u64> = Vec::new();
    let until = Instant::now() + DEADLINE;
    while seen.len() < 5 {
        assert!(
            Instant::now() < until,
            "only saw seqs {seen:?} within {DEADLINE:?}"
        );
        let r = fetch_eventually(addr, "/metrics");
        if r.status == 503 {
            continue;
        }
        assert_eq!(r.status, 200);
        let seq = r.json()["seq"].as_u64().unwrap();
        if let Some(&prev) = seen.last() {
            assert!(seq >= prev, "/metrics went back from {prev} to {seq}");
        }
        if seen.last() != Some(&seq) {
            seen.push(seq);
        }
        thread::sleep(Duration::from_millis(60));
    }

    stop.store(true, Ordering::SeqCst);
    let updates = updater.join().unwrap();
    for d in drippers {
        d.join().unwrap();
    }
    drop(flood);
    assert_eq!(last.load(Ordering::SeqCst), updates);
    let r = fetch_eventually(addr, "/metrics");
    assert_eq!(r.json()["seq"], updates);
    assert!(seen.iter().all(|&s| s <= updates));
}

#[test]
fn curl_gets_health_like_the_openrc_healthcheck() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    record(&shared, &mut collector(), 1);
    let url = format!("http://{addr}/health");
    // --noproxy: a proxy from the environment would take this off loopback.
    let out = std::process::Command::new("curl")
        .args(["-fsS", "--noproxy", "*", "--max-time", "20", &url])
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "curl is missing on CI"
            );
            eprintln!("skipped: curl is not installed");
            return;
        }
        Err(e) => panic!("cannot run curl: {e}"),
    };
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "ok");
}

#[test]
fn stop_closes_connections_and_the_port_promptly() {
    let shared = shared("1m");
    let (l, addr) = start(&shared);
    let mut idle = Client::connect(addr);
    assert_eq!(idle.get("GET", "/health").status, 200);

    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        l.stop();
        let _ = tx.send(());
    });
    rx.recv_timeout(DEADLINE)
        .expect("stop did not return while a keep-alive connection was open");
    assert!(idle.closed_by_server());
    let refused = TcpStream::connect_timeout(&addr, Duration::from_secs(5));
    assert!(refused.is_err(), "still accepting after stop");
}

#[test]
fn a_bind_failure_names_the_address() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    let err = spawn_listener(addr, shared.clone()).unwrap_err();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

/// A client that takes every slot and keeps each with a request every few
/// seconds (well within the keep-alive wait) starved the listener before:
/// `/health` answered 503 and the service's health check restarted the
/// agent. Idle keep-alive connections now make room for a new client.
#[test]
fn idle_keep_alive_connections_make_room_for_a_new_client() {
    let shared = shared("1m");
    let (_l, addr) = start(&shared);
    record(&shared, &mut collector(), 1);
    let total = MAX_CONNECTIONS + LOOPBACK_RESERVE;
    let mut held: Vec<Client> = (0..total)
        .map(|_| {
            let mut c = Client::connect(addr);
            assert_eq!(c.get("GET", "/health").status, 200);
            c
        })
        .collect();
    // Every slot is taken by a connection waiting for its next request.
    for round in 0..3 {
        let r = Client::connect(addr).get("GET", "/health");
        assert_eq!(r.status, 200, "round {round}: {:?}", r.body);
        // The holder keeps asking on the connections it still has, as the
        // reported client did.
        for c in held.iter_mut() {
            c.send("GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n");
            let _ = c.try_response(false);
        }
    }
    // The agent's own health check, through the same listener.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args(["--health", "--url", "off", "--listen", &addr.to_string()])
        .args([
            "--proc-root",
            FIXTURE,
            "--config",
            "/nonexistent/guest-agent.conf",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Those made room for were closed by the listener.
    let closed = held
        .iter_mut()
        .map(Client::closed_by_server)
        .filter(|c| *c)
        .count();
    assert!(closed >= 1, "no idle connection was closed");
}

/// A peer on the network (the pull port listens on every address) that
/// keeps every general slot busy with heads it never finishes cannot keep
/// a loopback client out: a few slots are for loopback peers only. The
/// "network" is a private network namespace this test makes, with two
/// addresses of its own on its loopback device.
#[test]
fn a_network_peer_holding_every_slot_cannot_keep_loopback_out() {
    if !common::enter_private_network("listener") {
        return;
    }
    common::ip("addr add 10.66.0.1/32 dev lo");
    common::ip("addr add 10.66.0.2/32 dev lo");
    let config = guest_agent::config::resolve(
        &[
            ("url", "off".into()),
            ("listen", "0.0.0.0:0".into()),
            ("interval", "1m".into()),
            ("proc_root", FIXTURE.into()),
        ],
        &[],
        Some(Path::new("/nonexistent")),
    )
    .unwrap();
    let view = View {
        status: Arc::new(Status::new(config.interval, false, Vec::new(), None)),
        buffer: Arc::new(Buffer::new(10, 1 << 20)),
    };
    let l = spawn_listener("0.0.0.0:0".parse().unwrap(), view).unwrap();
    let port = l.local_addr().port();
    let outside: SocketAddr = format!("10.66.0.1:{port}").parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Twice as many drippers as general slots, each reconnecting as soon
    // as it is cut or refused, from the non-loopback address.
    let drippers: Vec<_> = (0..2 * MAX_CONNECTIONS)
        .map(|_| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut connections = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let s =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                            .unwrap();
                    let from: SocketAddr = "10.66.0.2:0".parse().unwrap();
                    s.bind(&from.into()).unwrap();
                    if s.connect_timeout(&outside.into(), Duration::from_secs(5))
                        .is_err()
                    {
                        continue;
                    }
                    connections += 1;
                    let mut s = TcpStream::from(s);
                    for b in b"GET /health HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
                        if stop.load(Ordering::SeqCst) || s.write_all(&[*b]).is_err() {
                            break;
                        }
                        thread::sleep(Duration::from_millis(100));
                    }
                }
                connections
            })
        })
        .collect();
    // Let the drippers take the general slots.
    thread::sleep(Duration::from_secs(1));
    let inside: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for i in 0..20 {
        let r = Client::connect(inside).get("GET", "/health");
        assert_eq!(r.status, 200, "loopback request {i}: {:?}", r.body);
    }
    stop.store(true, Ordering::SeqCst);
    let connections: u64 = drippers.into_iter().map(|d| d.join().unwrap()).sum();
    assert!(connections >= MAX_CONNECTIONS as u64, "{connections}");
    l.stop();
}
