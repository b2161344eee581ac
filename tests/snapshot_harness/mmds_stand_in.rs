//! A stand-in for Firecracker's MMDS version 2 on 127.0.0.1:0 (std and
//! serde_json only, so the library's unit tests and the VM test share it).
//!
//! It behaves as the service is documented to: `PUT /latest/api/token` with
//! `X-metadata-token-ttl-seconds` (1 to 21600) issues a session token as
//! plain text; a `GET` needs a token it issued (else 401) and, with `Accept:
//! application/json`, returns the JSON value at the path (a JSON pointer into
//! the document), 404 when there is none. Other methods get 405. Each
//! answer closes its connection. Every request is recorded.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, String>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

#[derive(Default)]
struct State {
    document: String,
    tokens: Vec<String>,
    refuse_tokens: bool,
    requests: Vec<Request>,
}

pub struct MmdsStandIn {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl MmdsStandIn {
    /// Serves `document` (JSON text) on 127.0.0.1 at a free port.
    pub fn start(document: &str) -> MmdsStandIn {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(Mutex::new(State {
            document: document.to_string(),
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let st = st.clone();
                std::thread::spawn(move || serve(conn, &st));
            }
        });
        MmdsStandIn { addr, state, stop }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Replaces the document, as the host does for a clone (`PUT /mmds`).
    pub fn set_document(&self, document: &str) {
        self.lock().document = document.to_string();
    }

    /// From now on a token request gets 405, as a V1-only service answers.
    pub fn refuse_tokens(&self) {
        self.lock().refuse_tokens = true;
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for MmdsStandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn serve(conn: TcpStream, state: &Mutex<State>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return;
    };
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        match reader.read_line(&mut h) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let request = Request {
        method: method.to_string(),
        path: path.to_string(),
        headers,
    };
    let (status, content_type, text) = answer(&request, state);
    state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .requests
        .push(request);
    let _ = write!(
        writer,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
}

fn answer(r: &Request, state: &Mutex<State>) -> (&'static str, &'static str, String) {
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    let plain = "text/plain";
    match (r.method.as_str(), r.path.as_str()) {
        ("PUT", "/latest/api/token") => {
            if st.refuse_tokens {
                return ("405 Method Not Allowed", plain, "Not allowed".into());
            }
            let ttl = r
                .header("x-metadata-token-ttl-seconds")
                .and_then(|v| v.parse::<u32>().ok());
            if !ttl.is_some_and(|t| (1..=21600).contains(&t)) {
                return ("400 Bad Request", plain, "bad token ttl".into());
            }
            let token = format!("session-{}-{}", std::process::id(), st.tokens.len() + 1);
            st.tokens.push(token.clone());
            ("200 OK", plain, token)
        }
        ("GET", path) => {
            let valid = r
                .header("x-metadata-token")
                .is_some_and(|t| st.tokens.iter().any(|k| k == t));
            if !valid {
                return ("401 Unauthorized", plain, "Unauthorized".into());
            }
            let doc: serde_json::Value =
                serde_json::from_str(&st.document).unwrap_or(serde_json::Value::Null);
            let pointer = path.trim_end_matches('/');
            match doc.pointer(pointer) {
                Some(v) if r.header("accept") == Some("application/json") => {
                    ("200 OK", "application/json", v.to_string())
                }
                Some(_) => ("501 Not Implemented", plain, "IMDS format".into()),
                None => ("404 Not Found", plain, "Not found".into()),
            }
        }
        _ => ("405 Method Not Allowed", plain, "Not allowed".into()),
    }
}
