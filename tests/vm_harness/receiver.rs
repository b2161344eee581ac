//! A minimal HTTP/1.1 ingest endpoint on 127.0.0.1:0 (std only): parses the
//! request line, headers and a Content-Length (or chunked) body, answers
//! 204, keeps connections alive, and records every request with the sample
//! array parsed from its body.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use guest_agent::Sample;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Post {
    pub at: Instant,
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, String>,
    /// The body as a sample array, or why it is not one.
    pub samples: Result<Vec<Sample>, String>,
    /// The status code this receiver answered.
    #[allow(dead_code)] // read by the OpenRC test only
    pub status: u16,
}

#[derive(Default)]
struct State {
    posts: Vec<Post>,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

pub struct Receiver {
    pub addr: SocketAddr,
    shared: Shared,
    stop: Arc<AtomicBool>,
    /// While set, every request gets 503 with `Retry-After: 3600`.
    refusing: Arc<AtomicBool>,
}

impl Receiver {
    pub fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let shared: Shared = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let refusing = Arc::new(AtomicBool::new(false));
        let (s, st, rf) = (shared.clone(), stop.clone(), refusing.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (s, rf) = (s.clone(), rf.clone());
                std::thread::spawn(move || serve(conn, s, rf));
            }
        });
        Receiver {
            addr,
            shared,
            stop,
            refusing,
        }
    }

    /// From now on, answers every request with 503 and `Retry-After: 3600`
    /// (`true`), or as before (`false`): a manager that is down and asks
    /// the agent not to retry for an hour.
    #[allow(dead_code)] // used by the OpenRC test only
    pub fn refuse(&self, on: bool) {
        self.refusing.store(on, Ordering::SeqCst);
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request so far.
    pub fn posts(&self) -> Vec<Post> {
        self.shared.0.lock().unwrap().posts.clone()
    }

    /// Waits until `pred` over the requests so far gives a value; `None` at
    /// the deadline.
    pub fn wait_for<T>(
        &self,
        deadline: Instant,
        mut pred: impl FnMut(&[Post]) -> Option<T>,
    ) -> Option<T> {
        let (lock, cond) = &*self.shared;
        let mut st = lock.lock().unwrap();
        loop {
            if let Some(v) = pred(&st.posts) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = cond.wait_timeout(st, deadline - now).unwrap().0;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so its thread ends.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn serve(conn: TcpStream, shared: Shared, refusing: Arc<AtomicBool>) {
    // An idle keep-alive connection is dropped eventually; the agent reconnects.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(120)));
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    while let Some(mut post) = read_request(&mut reader) {
        let close = post
            .headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let refused = refusing.load(Ordering::SeqCst);
        let (code, status) = match post.samples {
            _ if refused => (
                503,
                "503 Service Unavailable\r\nRetry-After: 3600\r\nContent-Length: 0",
            ),
            Ok(_) => (204, "204 No Content"),
            Err(_) => (400, "400 Bad Request"),
        };
        post.status = code;
        let (lock, cond) = &*shared;
        lock.lock().unwrap().posts.push(post);
        cond.notify_all();
        let head = format!(
            "HTTP/1.1 {status}\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        );
        if writer.write_all(head.as_bytes()).is_err() || close {
            return;
        }
    }
}

fn read_line(r: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line.trim_end_matches(['\r', '\n']).to_string()),
    }
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Post> {
    let request_line = read_line(r)?;
    let at = Instant::now();
    let mut parts = request_line.split(' ');
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = BTreeMap::new();
    loop {
        let line = read_line(r)?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        read_chunked(r)?
    } else {
        let len: usize = headers
            .get("content-length")
            .map_or(Some(0), |v| v.parse().ok())?;
        let mut body = vec![0; len];
        r.read_exact(&mut body).ok()?;
        body
    };
    let samples = serde_json::from_slice::<Vec<Sample>>(&body).map_err(|e| {
        format!(
            "{e}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        )
    });
    Some(Post {
        at,
        method,
        path,
        headers,
        samples,
        status: 0,
    })
}

fn read_chunked(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let size_line = read_line(r)?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            // Trailers, then the empty line.
            while !read_line(r)?.is_empty() {}
            return Some(body);
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..]).ok()?;
        read_line(r)?;
    }
}
