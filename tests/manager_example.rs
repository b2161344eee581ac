//! The reference manager (`examples/manager.rs`) run as a process on
//! loopback: ingest, de-duplication, validation, limits and the token.
//!
//! `cargo test` builds the examples before running tests; this file finds
//! the binary beside its own (`target/<profile>/examples/manager`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use guest_agent::{Collector, Sample};

mod common;
use common::example_binary;

/// Generous: a loaded CI machine may be slow to start a process.
const DEADLINE: Duration = Duration::from_secs(30);

/// A running manager; killed when dropped.
struct Manager {
    child: Child,
    addr: SocketAddr,
    lines: Receiver<String>,
}

impl Manager {
    fn start(extra: &[&str]) -> Manager {
        let mut child = Command::new(example_binary("manager"))
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the manager example");
        let stdout = child.stdout.take().expect("piped stdout");
        // Drain stdout on a thread so the manager never blocks on a full pipe.
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines.recv_timeout(DEADLINE).expect("first stdout line");
        let addr = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .parse()
            .expect("bound address");
        Manager { child, addr, lines }
    }

    /// The next printed line, waiting up to [`DEADLINE`].
    fn line(&self) -> String {
        self.lines.recv_timeout(DEADLINE).expect("a printed line")
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A status line, headers and body as read from the wire.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 client connection kept open across requests.
struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to the manager");
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        Client {
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, raw: &[u8]) -> Response {
        self.reader.get_mut().write_all(raw).expect("send request");
        self.read_response()
    }

    fn post(&mut self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let mut raw = format!(
            "POST {path} HTTP/1.1\r\nHost: manager\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (n, v) in headers {
            raw.push_str(&format!("{n}: {v}\r\n"));
        }
        raw.push_str("\r\n");
        let mut raw = raw.into_bytes();
        raw.extend_from_slice(body);
        self.send(&raw)
    }

    fn read_response(&mut self) -> Response {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {line:?}"));
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).expect("header line");
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (n, v) = h.split_once(':').expect("header with a colon");
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().expect("numeric Content-Length"));
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body).expect("body");
        Response {
            status,
            headers,
            body: String::from_utf8(body).expect("UTF-8 body"),
        }
    }

    /// Whether the server closed the connection (reads end of stream).
    fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.reader.read(&mut b), Ok(0))
    }
}

/// Three samples from the fixture proc root, seq 1..=3.
fn batch() -> Vec<Sample> {
    let mut c = Collector::new(Path::new("tests/fixtures/host"), Some("vm-t".into()))
        .expect("collector on fixtures");
    (1..=3)
        .map(|seq| {
            let mut s = c.collect();
            s.seq = seq;
            s
        })
        .collect()
}

fn json(samples: &[Sample]) -> Vec<u8> {
    serde_json::to_vec(samples).expect("encode samples")
}

fn temp_path(name: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}-{nanos}.ndjson", std::process::id()))
}

fn ndjson_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("each NDJSON line is JSON"))
        .collect()
}

#[test]
fn stores_a_batch_once_and_prints_each_new_sample() {
    let path = temp_path("dedup");
    let m = Manager::start(&["--ndjson", path.to_str().expect("UTF-8 path")]);
    let samples = batch();
    let mut client = Client::connect(m.addr);

    let r = client.post("/v1/guest-metrics", &[], &json(&samples));
    assert_eq!(r.status, 200, "{}", r.body);
    for seq in 1..=3 {
        let line = m.line();
        assert!(line.starts_with(&format!("vm-t seq={seq} cpu=")), "{line}");
        assert!(line.contains(" mem=") && line.contains(" load="), "{line}");
    }
    let stored = ndjson_lines(&path);
    assert_eq!(stored.len(), 3);
    for (line, sample) in stored.iter().zip(&samples) {
        // The wire contract; the detail behind the totals stays off it.
        let mut sent = sample.clone();
        sent.detail = None;
        assert_eq!(Sample::from_json_strict(line).expect("valid sample"), sent);
    }

    // The agent resends a batch after a timeout; the second copy, and an
    // overlapping one, store only what is new. Same connection: keep-alive.
    let r = client.post("/v1/guest-metrics", &[], &json(&samples));
    assert_eq!(r.status, 200, "{}", r.body);
    let mut more = samples.clone();
    let mut fourth = samples[2].clone();
    fourth.seq = 4;
    more.push(fourth);
    let r = client.post("/v1/guest-metrics", &[], &json(&more));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(m.line().starts_with("vm-t seq=4 "));
    let stored = ndjson_lines(&path);
    assert_eq!(stored.len(), 4, "only seq 4 is new");
    assert_eq!(stored[3]["seq"], 4);

    // Another run (a restarted agent) with the same seqs is new.
    let mut other = samples.clone();
    for s in &mut other {
        s.run_id = "00000000-0000-4000-8000-000000000001".into();
    }
    let r = client.post("/v1/guest-metrics", &[], &json(&other));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(ndjson_lines(&path).len(), 7);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn refuses_bodies_that_are_not_valid_batches() {
    let path = temp_path("refuse");
    let m = Manager::start(&["--ndjson", path.to_str().expect("UTF-8 path")]);
    let samples = batch();

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"{not json".to_vec(), "not JSON"),
        ("object", json(&samples[..1])[1..].to_vec(), "not JSON"),
        (
            "single object",
            serde_json::to_vec(&samples[0]).expect("encode"),
            "not a JSON array",
        ),
        ("empty", b"[]".to_vec(), "empty batch"),
        (
            "missing field",
            {
                let mut v = serde_json::to_value(&samples).expect("encode");
                v[1].as_object_mut().expect("object").remove("run_id");
                serde_json::to_vec(&v).expect("encode")
            },
            "sample 1: missing field `run_id`",
        ),
        (
            "wrong schema",
            {
                let mut v = serde_json::to_value(&samples).expect("encode");
                v[0]["schema"] = 2.into();
                serde_json::to_vec(&v).expect("encode")
            },
            "sample 0: schema 2; this manager understands schema 1",
        ),
    ];
    for (what, body, reason) in cases {
        let mut client = Client::connect(m.addr);
        let r = client.post("/v1/guest-metrics", &[], &body);
        let expected = if what == "wrong schema" { 422 } else { 400 };
        assert_eq!(r.status, expected, "{what}: {}", r.body);
        assert!(
            r.body.contains(reason),
            "{what}: {:?} lacks {reason:?}",
            r.body
        );
    }
    // A refused batch stores nothing, not even its valid samples.
    assert!(ndjson_lines(&path).is_empty());

    // A valid batch still goes through afterwards.
    let mut client = Client::connect(m.addr);
    assert_eq!(
        client
            .post("/v1/guest-metrics", &[], &json(&samples))
            .status,
        200
    );
    assert_eq!(ndjson_lines(&path).len(), 3);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn answers_other_paths_methods_and_sizes() {
    let m = Manager::start(&[]);

    let mut c = Client::connect(m.addr);
    let r = c.post("/v1/other", &[], b"[]");
    assert_eq!(r.status, 404);
    assert!(c.closed_by_server());

    let mut c = Client::connect(m.addr);
    let r = c.send(b"GET /v1/guest-metrics HTTP/1.1\r\nHost: m\r\n\r\n");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("Allow"), Some("POST"));

    // Refused on the declared length alone, before any body is sent.
    let mut c = Client::connect(m.addr);
    let r =
        c.send(b"POST /v1/guest-metrics HTTP/1.1\r\nHost: m\r\nContent-Length: 9000000\r\n\r\n");
    assert_eq!(r.status, 413);
    assert!(c.closed_by_server());

    let mut c = Client::connect(m.addr);
    let r = c.send(b"POST /v1/guest-metrics HTTP/1.1\r\nHost: m\r\n\r\n");
    assert_eq!(r.status, 411);

    let mut c = Client::connect(m.addr);
    let r = c.send(b"NOT HTTP AT ALL\r\n\r\n");
    assert_eq!(r.status, 400);

    // HTTP/1.1 with Connection: close is answered, then closed.
    let mut c = Client::connect(m.addr);
    let r = c.post(
        "/v1/guest-metrics",
        &[("Connection", "close")],
        &json(&batch()),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(c.closed_by_server());
}

#[test]
fn two_pipelined_requests_on_one_connection() {
    let m = Manager::start(&[]);
    let samples = batch();
    let body = json(&samples[..1]);
    let one = format!(
        "POST /v1/guest-metrics HTTP/1.1\r\nHost: m\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut raw = one.clone().into_bytes();
    raw.extend_from_slice(&body);
    let body2 = json(&samples[1..]);
    raw.extend_from_slice(
        format!(
            "POST /v1/guest-metrics HTTP/1.1\r\nHost: m\r\nContent-Length: {}\r\n\r\n",
            body2.len()
        )
        .as_bytes(),
    );
    raw.extend_from_slice(&body2);
    let mut c = Client::connect(m.addr);
    assert_eq!(c.send(&raw).status, 200);
    assert_eq!(c.read_response().status, 200);
    let printed: Vec<String> = (0..3).map(|_| m.line()).collect();
    assert!(printed[2].starts_with("vm-t seq=3 "), "{printed:?}");
}

#[test]
fn token_is_required_when_set() {
    let m = Manager::start(&["--token", "s3cr3t"]);
    let body = json(&batch());

    let mut c = Client::connect(m.addr);
    let r = c.post("/v1/guest-metrics", &[], &body);
    assert_eq!(r.status, 401);
    assert_eq!(r.header("WWW-Authenticate"), Some("Bearer"));

    let mut c = Client::connect(m.addr);
    let r = c.post(
        "/v1/guest-metrics",
        &[("Authorization", "Bearer s3cr3")],
        &body,
    );
    assert_eq!(r.status, 401);

    let mut c = Client::connect(m.addr);
    let r = c.post(
        "/v1/guest-metrics",
        &[("Authorization", "Bearer s3cr3t")],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The agent's own HTTP client (ureq, as the push loop uses it) against the
/// manager: status codes arrive as the sender will see them.
#[test]
fn ureq_client_sees_200_and_400() {
    let m = Manager::start(&["--token", "t0k"]);
    let url = format!("http://{}/v1/guest-metrics", m.addr);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(DEADLINE))
        .build()
        .into();
    let post = |body: Vec<u8>| {
        agent
            .post(&url)
            .header("Content-Type", "application/json")
            .header("Authorization", "Bearer t0k")
            .send(&body[..])
            .expect("request completes")
            .status()
            .as_u16()
    };
    assert_eq!(post(json(&batch())), 200);
    assert_eq!(post(b"[1]".to_vec()), 400);
    // Once more over the (pooled) connection.
    assert_eq!(post(json(&batch())), 200);
}

#[test]
fn bad_arguments_exit_2() {
    let out = Command::new(example_binary("manager"))
        .args(["--listen", "nowhere"])
        .output()
        .expect("run the manager example");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}
