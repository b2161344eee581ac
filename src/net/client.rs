//! The agent's HTTP client: every request the binary makes goes through
//! ureq (docs/design.md#the-http-client): pushes over TCP, vsock or a Unix
//! socket, the two MMDS requests, the guest-address report, and
//! `guest-agent --health`.
//!
//! A [`Client`] is one ureq agent set up the same way for every use: no
//! proxy (a guest's `http_proxy` must not reroute samples), no redirects,
//! statuses returned as values, one kept-alive connection, one deadline for
//! the whole request (connect, send, answer, body), small buffers, and a
//! [`Resolve`]r that never spawns a thread. ureq probes a kept connection
//! before it reuses it, so an answer nobody asked for is never read as the
//! answer to the next request.
//!
//! An answer's body is read to its end when it is at most
//! [`MAX_RESPONSE_BODY`] bytes (that keeps the connection for the next
//! request); a longer one is cut there and its connection closed.

use std::fmt;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Uri};
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

use super::transport::{StreamConnector, TcpConnect};
use super::url::{Peer, Target};
use crate::sign::Credentials;

/// Most bytes of an answer's body read: to keep the connection (a push
/// throws them away) or for the caller ([`Client::body`]).
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// Most bytes of an answer's head; a longer one fails the request.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Bytes of each of ureq's two connection buffers. Its default (128 KiB
/// each) would be a sixth of the agent's resident memory; a request
/// larger than this is written in several calls.
const IO_BUFFER: usize = 16 * 1024;

/// Host names remembered with their addresses.
const MAX_NAMES: usize = 4;

/// Most addresses kept per name (ureq tries them in turn).
const MAX_ADDRESSES: usize = 4;

/// The `User-Agent` of every request.
pub fn user_agent() -> String {
    format!("guest-agent/{}", crate::sample::AGENT_VERSION)
}

/// What the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The status code (never 1xx: interim answers are skipped).
    pub status: u16,
    /// The `Retry-After` header, as given.
    pub retry_after: Option<String>,
    /// Whether [`Client::body`] holds the whole body.
    pub complete: bool,
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The request's deadline passed.
    Timeout(Duration),
    /// The connection could not be made or broke, or the answer was not
    /// HTTP that can be trusted.
    Io(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Timeout(d) => write!(
                f,
                "no whole answer within {}",
                humantime::format_duration(*d)
            ),
            Error::Io(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for Error {}

/// A host name and port, and the addresses they were found at.
type Name = (String, u16, Vec<SocketAddr>);

/// Host names looked up, shared by a client and its agent's resolver.
#[derive(Debug, Clone, Default)]
struct Names(Arc<Mutex<Vec<Name>>>);

impl Names {
    fn lock(&self) -> MutexGuard<'_, Vec<Name>> {
        // A list of plain values, every change one push or removal.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, host: &str, port: u16) -> Option<Vec<SocketAddr>> {
        self.lock()
            .iter()
            .find(|(h, p, _)| h == host && *p == port)
            .map(|(_, _, a)| a.clone())
    }

    /// Looks `host` up now, on the calling thread, and remembers it.
    fn lookup(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| io::Error::new(e.kind(), format!("looking up {host}: {e}")))?
            .take(MAX_ADDRESSES)
            .collect();
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("looking up {host}: no address"),
            ));
        }
        let mut names = self.lock();
        names.retain(|(h, p, _)| !(h == host && *p == port));
        if names.len() >= MAX_NAMES {
            names.remove(0);
        }
        names.push((host.to_string(), port, addrs.clone()));
        Ok(addrs)
    }
}

/// The resolver of every agent: it never spawns a thread. An address
/// literal is used as it is; a name is taken from the addresses its
/// client last looked up ([`Client::lookup`], which the push thread calls
/// whenever it looks for its target again), or else looked up on the
/// calling thread with the C library's resolver, whose wait is bounded by
/// its own timeout and attempts (docs/design.md#the-http-client). A
/// stream peer (vsock, Unix) needs no address at all.
#[derive(Debug)]
struct Resolve {
    names: Names,
    stream: bool,
}

impl Resolver for Resolve {
    fn resolve(
        &self,
        uri: &Uri,
        _config: &ureq::config::Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let mut out = self.empty();
        if self.stream {
            // The connector ignores it: it knows its peer.
            out.push(SocketAddr::from(([0, 0, 0, 0], 0)));
            return Ok(out);
        }
        let host = uri.host().ok_or(ureq::Error::HostNotFound)?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = uri.port_u16().unwrap_or(80);
        if let Ok(ip) = host.parse::<IpAddr>() {
            out.push(SocketAddr::new(ip, port));
            return Ok(out);
        }
        let addrs = match self.names.get(host, port) {
            Some(a) => a,
            None => self.names.lookup(host, port)?,
        };
        for a in addrs {
            out.push(a);
        }
        Ok(out)
    }
}

/// How a client connects.
#[derive(Debug, Clone)]
enum Connect {
    Tcp,
    Stream(StreamConnector),
}

/// One ureq agent and the last answer's body.
pub struct Client {
    agent: ureq::Agent,
    connect: Connect,
    timeout: Duration,
    names: Names,
    body: Vec<u8>,
    /// When set, every request carries `Content-Digest` and a signature
    /// (docs/security.md): made here, once, whatever the transport.
    credentials: Option<Arc<Credentials>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("connect", &self.connect)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client over TCP whose requests end within `timeout` unless told
    /// otherwise.
    pub fn tcp(timeout: Duration) -> Client {
        Client::with(Connect::Tcp, timeout)
    }

    /// A client whose every connection goes to `connector`'s peer.
    pub fn over(connector: StreamConnector, timeout: Duration) -> Client {
        Client::with(Connect::Stream(connector), timeout)
    }

    /// The client for `target`'s kind of peer.
    pub fn for_peer(peer: Peer, timeout: Duration) -> Client {
        match peer {
            Peer::Tcp => Client::tcp(timeout),
            Peer::Vsock { cid, port } => Client::over(StreamConnector::vsock(cid, port), timeout),
        }
    }

    fn with(connect: Connect, timeout: Duration) -> Client {
        let names = Names::default();
        Client {
            agent: agent(&connect, timeout, &names),
            connect,
            timeout,
            names,
            body: Vec::new(),
            credentials: None,
        }
    }

    /// Signs every request from now on with `credentials`.
    pub fn sign_with(&mut self, credentials: Option<Arc<Credentials>>) {
        self.credentials = credentials;
    }

    /// Drops the kept connection: after a snapshot restore it belongs to
    /// the parent VM.
    pub fn disconnect(&mut self) {
        self.agent = agent(&self.connect, self.timeout, &self.names);
    }

    /// Looks `host` up now, on this thread, and has the next connections
    /// use what it found; the first address.
    pub fn lookup(&self, host: &str, port: u16) -> io::Result<SocketAddr> {
        self.names.lookup(host, port).map(|a| a[0])
    }

    /// POSTs `body` to `target`: [`Client::request`].
    pub fn post(
        &mut self,
        target: &Target,
        headers: &[(&'static str, &str)],
        body: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Answer, Error> {
        let headers = header_values(headers)?;
        self.send(Method::POST, target, &headers, Some(body), timeout)
    }

    /// Sends `method` to `target` with `headers` and `body` (none for a
    /// GET), within `timeout` (the client's when `None`). The answer's body,
    /// when it was read whole, is [`Client::body`].
    pub fn request(
        &mut self,
        method: Method,
        target: &Target,
        headers: &[(&'static str, &str)],
        body: Option<&[u8]>,
        timeout: Option<Duration>,
    ) -> Result<Answer, Error> {
        let headers = header_values(headers)?;
        self.send(method, target, &headers, body, timeout)
    }

    /// [`Client::request`] with headers already made, for a caller that
    /// sends the same ones at every request (a push).
    pub fn send(
        &mut self,
        method: Method,
        target: &Target,
        headers: &[(HeaderName, HeaderValue)],
        body: Option<&[u8]>,
        timeout: Option<Duration>,
    ) -> Result<Answer, Error> {
        let timeout = timeout.unwrap_or(self.timeout);
        self.body.clear();
        let signed = match &self.credentials {
            Some(c) => signed_headers(c, &method, target, body.unwrap_or_default())?,
            None => Vec::new(),
        };
        let answer = match body {
            Some(b) => self.run(request(method, target, headers, &signed, b), timeout),
            None => self.run(request(method, target, headers, &signed, ()), timeout),
        };
        answer.map_err(|e| match e {
            ureq::Error::Timeout(_) => Error::Timeout(timeout),
            e => Error::Io(describe(e)),
        })
    }

    fn run<B: ureq::AsSendBody>(
        &mut self,
        req: Request<B>,
        timeout: Duration,
    ) -> Result<Answer, ureq::Error> {
        // Only a request that must end sooner than the client's own
        // deadline pays for a configuration of its own.
        let mut resp = if timeout == self.timeout {
            self.agent.run(req)?
        } else {
            let req = self
                .agent
                .configure_request(req)
                .timeout_global(Some(timeout))
                .build();
            self.agent.run(req)?
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string());
        // One byte more than kept tells a body that is too long.
        let mut reader = resp
            .body_mut()
            .as_reader()
            .take(MAX_RESPONSE_BODY as u64 + 1);
        let complete = match reader.read_to_end(&mut self.body) {
            Ok(_) => self.body.len() <= MAX_RESPONSE_BODY,
            Err(e) => {
                // The head came, the body did not: not an answer that can
                // be trusted (a retry may deliver twice; the receiver
                // de-duplicates on run_id and seq).
                return Err(match e.downcast::<ureq::Error>() {
                    Ok(e) => e,
                    Err(e) => ureq::Error::Io(io::Error::new(
                        e.kind(),
                        format!("HTTP {status}, then the body broke off: {e}"),
                    )),
                });
            }
        };
        self.body.truncate(MAX_RESPONSE_BODY);
        Ok(Answer {
            status,
            retry_after,
            complete,
        })
    }

    /// The last answer's body, as far as it was read.
    pub fn body(&self) -> &[u8] {
        &self.body
    }
}

/// Headers from names and values given as text: a value that is not a
/// valid header value is an error naming the header, never a panic.
fn header_values(
    headers: &[(&'static str, &str)],
) -> Result<Vec<(HeaderName, HeaderValue)>, Error> {
    headers
        .iter()
        .map(|(name, value)| {
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| Error::Io(format!("{name:?}: not a header name")))?;
            let v = HeaderValue::from_str(value)
                .map_err(|_| Error::Io(format!("header {name}: not a valid value")))?;
            Ok((n, v))
        })
        .collect()
}

/// `Content-Digest`, `Signature-Input` and `Signature` for a request.
fn signed_headers(
    credentials: &Credentials,
    method: &Method,
    target: &Target,
    body: &[u8],
) -> Result<Vec<(HeaderName, HeaderValue)>, Error> {
    let h = credentials.sign(method.as_str(), target.uri.path(), body);
    let value = |name: &str, v: String| {
        HeaderValue::try_from(v).map_err(|_| Error::Io(format!("header {name}: not a valid value")))
    };
    Ok(vec![
        (
            HeaderName::from_static("content-digest"),
            value("content-digest", h.content_digest)?,
        ),
        (
            HeaderName::from_static("signature-input"),
            value("signature-input", h.signature_input)?,
        ),
        (
            HeaderName::from_static("signature"),
            value("signature", h.signature)?,
        ),
    ])
}

fn request<B>(
    method: Method,
    target: &Target,
    headers: &[(HeaderName, HeaderValue)],
    signed: &[(HeaderName, HeaderValue)],
    body: B,
) -> Request<B> {
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = target.uri.clone();
    let h = req.headers_mut();
    for (name, value) in headers.iter().chain(signed) {
        h.insert(name.clone(), value.clone());
    }
    req
}

/// One line for a failed request.
fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Io(e) => e.to_string(),
        ureq::Error::Protocol(e) => format!("not an HTTP answer that can be trusted: {e}"),
        ureq::Error::HostNotFound => "host not found".into(),
        e => e.to_string(),
    }
}

/// The ureq agent of a client: see the module's doc for each choice.
fn agent(connect: &Connect, timeout: Duration, names: &Names) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .user_agent(user_agent())
        .timeout_global(Some(timeout))
        .max_idle_connections(1)
        .max_idle_connections_per_host(1)
        .max_response_header_size(MAX_RESPONSE_HEAD)
        .input_buffer_size(IO_BUFFER)
        .output_buffer_size(IO_BUFFER)
        .build();
    let resolve = Resolve {
        names: names.clone(),
        stream: matches!(connect, Connect::Stream(_)),
    };
    match connect {
        Connect::Tcp => ureq::Agent::with_parts(config, TcpConnect::default(), resolve),
        Connect::Stream(c) => ureq::Agent::with_parts(config, c.clone(), resolve),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::url::UrlTemplate;
    use std::io::Write;
    use std::net::TcpListener;
    use std::path::Path;
    use std::sync::mpsc;

    const LONG: Duration = Duration::from_secs(30);

    /// What a test server does with a request.
    enum Reply {
        Bytes(Vec<u8>),
        /// Sends these, then closes the connection.
        Last(Vec<u8>),
        /// Keeps the connection open and never answers.
        Hang,
    }

    /// Reads one request (head and `Content-Length` body) from `conn`
    /// after what `buf` holds; `None` at the end of the stream.
    fn read_request(conn: &mut impl Read, buf: &mut Vec<u8>) -> Option<String> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(len)) = req.parse(buf) {
                let body: usize = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                    .unwrap_or(0);
                while buf.len() < len + body {
                    let mut chunk = [0u8; 4096];
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => return None,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                let text = String::from_utf8_lossy(&buf[..len + body]).into_owned();
                buf.drain(..len + body);
                return Some(text);
            }
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
    }

    /// A raw-socket server on 127.0.0.1 that reads one request per reply
    /// in `replies`, on connections accepted in turn, and reports each
    /// request with the number of the connection it came on.
    fn server(replies: Vec<Reply>) -> (Target, mpsc::Receiver<(usize, String)>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/in?x=1", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut replies = replies.into_iter();
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { return };
                let mut buf = Vec::new();
                while let Some(req) = read_request(&mut conn, &mut buf) {
                    let _ = tx.send((n, req));
                    match replies.next() {
                        Some(Reply::Bytes(a)) => {
                            if conn.write_all(&a).is_err() {
                                break;
                            }
                        }
                        Some(Reply::Last(a)) => {
                            let _ = conn.write_all(&a);
                            break;
                        }
                        Some(Reply::Hang) => std::thread::sleep(Duration::from_secs(600)),
                        None => return,
                    }
                }
            }
        });
        (Target::http(&url).unwrap(), rx)
    }

    fn post(c: &mut Client, t: &Target, timeout: Option<Duration>) -> Result<Answer, Error> {
        c.post(t, &[("content-type", "application/json")], b"[1]", timeout)
    }

    #[test]
    fn a_request_and_its_answer_keep_the_connection() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfine.".to_vec();
        let (t, seen) = server(vec![Reply::Bytes(ok.clone()), Reply::Bytes(ok)]);
        let mut c = Client::tcp(LONG);
        assert_eq!(post(&mut c, &t, None).unwrap().status, 200);
        assert_eq!(c.body(), b"fine.");
        assert_eq!(post(&mut c, &t, None).unwrap().status, 200);
        let (n0, first) = seen.recv_timeout(LONG).unwrap();
        let (n1, _) = seen.recv_timeout(LONG).unwrap();
        assert_eq!((n0, n1), (0, 0), "one connection");
        let head = first.to_ascii_lowercase();
        assert!(head.starts_with("post /in?x=1 http/1.1\r\n"), "{head}");
        assert!(
            head.contains(&format!("\r\nhost: {}\r\n", t.uri.authority().unwrap())),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\nuser-agent: {}\r\n", user_agent())),
            "{head}"
        );
        assert!(head.contains("\r\ncontent-length: 3\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n[1]"), "{head}");
    }

    #[test]
    fn interim_answers_are_skipped() {
        let a = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n";
        let (t, _seen) = server(vec![Reply::Bytes(a.to_vec())]);
        let mut c = Client::tcp(LONG);
        assert_eq!(post(&mut c, &t, None).unwrap().status, 202);
    }

    #[test]
    fn a_kept_connection_the_peer_closed_is_replaced() {
        let ok = b"HTTP/1.1 204 No Content\r\n\r\n".to_vec();
        // Answers the first request, then closes: the client sees the
        // close before reusing the connection and opens a new one.
        let (t, seen) = server(vec![Reply::Last(ok.clone()), Reply::Bytes(ok)]);
        let mut c = Client::tcp(LONG);
        assert_eq!(post(&mut c, &t, None).unwrap().status, 204);
        // The server has closed by the time it reports the request.
        seen.recv_timeout(LONG).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(post(&mut c, &t, None).unwrap().status, 204);
        assert_eq!(seen.recv_timeout(LONG).unwrap().0, 1);
    }

    #[test]
    fn an_unsolicited_second_answer_is_never_read_as_the_next_one() {
        // A 200, then an answer nobody asked for on the kept connection: the
        // next request must not take that 400 for its own answer.
        let stale = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec();
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec();
        let (t, seen) = server(vec![
            Reply::Bytes(stale.clone()),
            Reply::Bytes(stale),
            Reply::Bytes(ok),
        ]);
        let mut c = Client::tcp(LONG);
        for i in 0..3 {
            assert_eq!(post(&mut c, &t, None).unwrap().status, 200, "request {i}");
            // The stale bytes are there before the next request is made.
            seen.recv_timeout(LONG).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn signed_or_conflicting_content_lengths_and_a_101_are_not_answers() {
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
        ] {
            let (t, _seen) = server(vec![Reply::Last(bad.as_bytes().to_vec())]);
            let e = post(&mut Client::tcp(LONG), &t, None).unwrap_err();
            assert!(matches!(e, Error::Io(_)), "{bad:?}: {e}");
        }
        // Agreeing repeats are one length (RFC 9110 section 8.6).
        let same = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok".to_vec();
        let (t, _seen) = server(vec![Reply::Bytes(same)]);
        assert_eq!(post(&mut Client::tcp(LONG), &t, None).unwrap().status, 200);
        // A 101 is not a success: it is returned as what it is, and the
        // connection it switched is never used again.
        let switch =
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
                .to_vec();
        let ok = b"HTTP/1.1 204 No Content\r\n\r\n".to_vec();
        let (t, seen) = server(vec![Reply::Bytes(switch), Reply::Bytes(ok)]);
        let mut c = Client::tcp(LONG);
        assert_eq!(
            post(&mut c, &t, Some(Duration::from_secs(5)))
                .map(|a| a.status)
                .ok(),
            Some(101)
        );
        assert_eq!(post(&mut c, &t, None).unwrap().status, 204);
        let conns: Vec<usize> = (0..2).map(|_| seen.recv_timeout(LONG).unwrap().0).collect();
        assert_eq!(conns, [0, 1]);
    }

    #[test]
    fn an_answer_cut_short_is_an_error_not_an_answer() {
        let cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart".to_vec();
        let (t, _seen) = server(vec![Reply::Last(cut)]);
        let e = post(&mut Client::tcp(LONG), &t, None).unwrap_err();
        assert!(matches!(e, Error::Io(_)), "{e}");
    }

    #[test]
    fn a_server_that_never_answers_is_a_timeout() {
        let (t, seen) = server(vec![Reply::Hang]);
        let e = post(&mut Client::tcp(LONG), &t, Some(Duration::from_millis(300))).unwrap_err();
        assert_eq!(e, Error::Timeout(Duration::from_millis(300)));
        seen.recv_timeout(LONG).unwrap();
    }

    #[test]
    fn long_or_chunked_bodies_are_read_up_to_the_limit() {
        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}",
            MAX_RESPONSE_BODY + 100,
            "x".repeat(MAX_RESPONSE_BODY + 100)
        )
        .into_bytes();
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec();
        let ok = b"HTTP/1.1 204 No Content\r\n\r\n".to_vec();
        let (t, seen) = server(vec![
            Reply::Bytes(big),
            Reply::Bytes(chunked),
            Reply::Bytes(ok),
        ]);
        let mut c = Client::tcp(LONG);
        let a = post(&mut c, &t, None).unwrap();
        assert!(!a.complete && c.body().len() == MAX_RESPONSE_BODY);
        let a = post(&mut c, &t, None).unwrap();
        assert!(
            a.complete && c.body() == b"hello",
            "chunked bodies are decoded"
        );
        assert_eq!(post(&mut c, &t, None).unwrap().status, 204);
        let conns: Vec<usize> = (0..3).map(|_| seen.recv_timeout(LONG).unwrap().0).collect();
        assert_eq!(
            conns,
            [0, 1, 1],
            "a body cut at the limit ends its connection"
        );
    }

    #[test]
    fn nothing_listening_is_a_connect_error() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = Target::http(&format!("http://127.0.0.1:{port}/x")).unwrap();
        let e = post(&mut Client::tcp(LONG), &t, None).unwrap_err();
        assert!(
            matches!(&e, Error::Io(m) if m.starts_with(&format!("connect to 127.0.0.1:{port}: "))),
            "{e}"
        );
    }

    #[test]
    fn names_are_looked_up_once_and_literals_never() {
        let c = Client::tcp(LONG);
        let a = c.lookup("localhost", 9).unwrap();
        assert!(a.ip().is_loopback() && a.port() == 9, "{a}");
        assert!(c.names.get("localhost", 9).is_some());
        let e = c.lookup("name.invalid", 9).unwrap_err();
        assert!(e.to_string().contains("name.invalid"), "{e}");
        // A name that was looked up is what the next connections use.
        let (t, seen) = server(vec![Reply::Bytes(
            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
        )]);
        let port = t.port;
        let named = UrlTemplate::parse(&format!("http://localhost:{port}/x"))
            .unwrap()
            .resolve(None)
            .unwrap();
        let mut c = Client::tcp(LONG);
        c.lookup("localhost", port).unwrap();
        // A server on 127.0.0.1 only: a first IPv6 address would be refused
        // and the next one tried, so either order reaches it.
        assert_eq!(post(&mut c, &named, None).unwrap().status, 204);
        seen.recv_timeout(LONG).unwrap();
    }

    /// A request as a Unix-socket server read it.
    #[derive(Debug)]
    struct Seen {
        /// Which accepted connection it came on, counting from 0.
        conn: usize,
        head: String,
    }

    /// What the Unix-socket server does after answering.
    #[derive(Clone, Copy, PartialEq)]
    enum After {
        Keep,
        /// Closes the connection (a snapshot restore, a host-side restart).
        Close,
        /// Writes a second, unsolicited answer on the kept connection.
        Stale,
    }

    /// A minimal HTTP/1.1 server on a Unix socket, as a Firecracker host
    /// side is: answers 204 with keep-alive, then does `after`.
    fn serve_unix(path: &Path, after: After) -> mpsc::Receiver<Seen> {
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for (conn, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { return };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    while let Some(head) = read_request(&mut stream, &mut buf) {
                        if stream
                            .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                            .is_err()
                        {
                            return;
                        }
                        match after {
                            After::Keep => {}
                            After::Close => {
                                let _ = stream.shutdown(std::net::Shutdown::Both);
                            }
                            After::Stale => {
                                let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
                            }
                        }
                        // Reported after the close or the stale answer, so
                        // the client's next request finds it there.
                        let _ = tx.send(Seen { conn, head });
                        if after == After::Close {
                            return;
                        }
                    }
                });
            }
        });
        rx
    }

    fn unix_client(path: &Path) -> Client {
        Client::over(StreamConnector::unix(path).unwrap(), LONG)
    }

    fn post_vsock(c: &mut Client, body: &str) -> Result<u16, String> {
        let target = UrlTemplate::parse("vsock://2:1024/v1/guest-metrics")
            .unwrap()
            .resolve(None)
            .unwrap();
        c.post(
            &target,
            &[("authorization", "Bearer t0ken")],
            body.as_bytes(),
            None,
        )
        .map(|a| a.status)
        .map_err(|e| e.to_string())
    }

    /// A socket path in a fresh directory, removed with the returned guard.
    fn socket_path() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock_1024");
        (dir, path)
    }

    #[test]
    fn http_over_a_stream_socket_keeps_the_connection_alive() {
        let (_dir, path) = socket_path();
        let seen = serve_unix(&path, After::Keep);
        let mut c = unix_client(&path);
        for body in ["[1]", "[2]", "[3]"] {
            assert_eq!(post_vsock(&mut c, body).unwrap(), 204);
        }
        let got: Vec<Seen> = (0..3).map(|_| seen.recv_timeout(LONG).unwrap()).collect();
        assert!(got.iter().all(|s| s.conn == 0), "one connection: {got:?}");
        assert!(got[2].head.ends_with("\r\n\r\n[3]"), "{got:?}");
        let head = got[0].head.to_ascii_lowercase();
        assert!(
            head.starts_with("post /v1/guest-metrics http/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nhost: localhost\r\n"), "{head}");
        assert!(
            head.contains("\r\nauthorization: bearer t0ken\r\n"),
            "{head}"
        );
    }

    #[test]
    fn a_signing_client_signs_over_a_stream_socket_what_it_sends() {
        use crate::sign::verify::Verifier;
        use crate::sign::{Credentials, Key};
        let master = Key::new("k1", [4; 32]).unwrap();
        let verifier = Verifier::from_lines(&master.to_line()).unwrap();
        let (_dir, path) = socket_path();
        let seen = serve_unix(&path, After::Keep);
        let mut c = unix_client(&path);
        c.sign_with(Some(Credentials::new("vm-v", master.derive("vm-v"))));
        for body in ["[1]", "[22]"] {
            assert_eq!(post_vsock(&mut c, body).unwrap(), 204);
            let got = seen.recv_timeout(LONG).unwrap();
            let (head, sent) = got.head.split_once("\r\n\r\n").unwrap();
            assert_eq!(sent, body);
            let mut lines = head.split("\r\n");
            let request_line: Vec<&str> = lines.next().unwrap().split(' ').collect();
            let headers: Vec<(&str, &[u8])> = lines
                .filter_map(|l| l.split_once(": "))
                .map(|(n, v)| (n, v.as_bytes()))
                .collect();
            let signer = verifier
                .verify(request_line[0], request_line[1], &headers, sent.as_bytes())
                .unwrap();
            assert_eq!(signer.vm_id, "vm-v");
        }
    }

    #[test]
    fn a_closed_stream_connection_is_replaced_at_the_next_request() {
        let (_dir, path) = socket_path();
        let seen = serve_unix(&path, After::Close);
        let mut c = unix_client(&path);
        for body in ["[1]", "[2]"] {
            assert_eq!(post_vsock(&mut c, body).unwrap(), 204);
            seen.recv_timeout(LONG).unwrap();
        }
        assert_eq!(post_vsock(&mut c, "[3]").unwrap(), 204);
        assert_eq!(seen.recv_timeout(LONG).unwrap().conn, 2);
    }

    #[test]
    fn a_stale_answer_on_a_stream_connection_is_never_taken_for_the_next() {
        let (_dir, path) = socket_path();
        let seen = serve_unix(&path, After::Stale);
        let mut c = unix_client(&path);
        for i in 0..3 {
            assert_eq!(post_vsock(&mut c, "[1]").unwrap(), 204, "request {i}");
            let s = seen.recv_timeout(LONG).unwrap();
            assert_eq!(s.conn, i, "the connection with stale bytes was dropped");
        }
    }

    #[test]
    fn a_missing_host_side_is_a_connect_error_then_a_new_one_is_used() {
        let (_dir, path) = socket_path();
        let mut c = unix_client(&path);
        let e = post_vsock(&mut c, "[1]").unwrap_err();
        assert!(
            e.contains("connect to unix socket") && e.contains("vm.vsock_1024"),
            "{e}"
        );
        let seen = serve_unix(&path, After::Keep);
        assert_eq!(post_vsock(&mut c, "[1]").unwrap(), 204);
        assert!(seen.recv_timeout(LONG).unwrap().head.ends_with("[1]"));
    }
}
