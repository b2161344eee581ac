//! The agent's HTTP/1.1 client (docs/design.md#delivery): pushes, the MMDS
//! requests, the guest-address report and `--health`. One kept-alive
//! connection to the target, the request's head and body written in one
//! system call, and the answer's head parsed by `httparse`.
//!
//! It replaced ureq because a push is the agent's most frequent request and,
//! as deployed (one sample every few seconds, every cache cold), ureq's
//! request path cost more CPU than parsing the whole sample
//! (docs/performance.md#the-http-client). What it leaves out is what these
//! requests never need: TLS, proxies, redirects, cookies, compression, a
//! connection pool. An answer's body is read when its `Content-Length` is
//! at most [`MAX_RESPONSE_BODY`], or up to that much until the connection
//! closes when it gives no length; a chunked or larger body ends the
//! connection unread, which HTTP always allows.
//!
//! The request's timeout is one deadline for everything (connect, write,
//! answer), as ureq's global timeout was. The socket's timeouts are set
//! when they must shrink to meet it, so a prompt answer costs no extra
//! system call.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::route::{Lookups, Target};
use crate::vsock::StreamConnector;

/// Most bytes of an answer's body read: to keep the connection (a push
/// throws them away) or for the caller ([`Client::body`]).
pub const MAX_RESPONSE_BODY: usize = 64 * 1024;
/// Most bytes of a response head.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Most headers of a response.
const MAX_HEADERS: usize = 48;
/// How far past the request's deadline a socket timeout may reach before it
/// is set again: small against any timeout, large enough that a prompt
/// answer never needs the call.
const TIMEOUT_SLACK: Duration = Duration::from_millis(20);

/// What the server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The status code (never 1xx: interim answers are skipped).
    pub status: u16,
    /// The `Retry-After` header, as given.
    pub retry_after: Option<String>,
}

/// How the answer's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `Content-Length` (0 for statuses that have no body).
    Length(usize),
    /// Chunked: not decoded.
    Chunked,
    /// Up to the connection's end.
    UntilClose,
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum Error {
    /// The deadline passed: `what` was under way.
    Timeout(&'static str),
    /// The connection could not be made, or broke.
    Io(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Timeout(what) => write!(f, "timed out {what}"),
            Error::Io(e) => f.write_str(e),
        }
    }
}

/// How connections are made.
enum Connect {
    /// TCP to the target's host and port.
    Tcp,
    /// A fixed stream peer whatever the target (vsock; a Unix socket in tests).
    Stream(StreamConnector),
}

/// An open connection and what it was opened for.
struct Connection {
    socket: Socket,
    /// The target URL it goes to: a new target needs a new connection.
    url: String,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
}

/// The client: at most one connection, kept between requests.
pub struct Client {
    connect: Connect,
    connection: Option<Connection>,
    user_agent: String,
    head: Vec<u8>,
    input: Input,
    /// Where the last answer's body is in `input`, when it was read.
    body: Option<std::ops::Range<usize>>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("connected", &self.connection.is_some())
            .finish()
    }
}

/// Where a request stands when it fails, to tell a kept connection that the
/// peer had closed (send again, on a new one) from a request that failed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Sending,
    /// Sent; no byte of the answer yet.
    Waiting,
    /// Part of the answer read.
    Reading,
}

impl Client {
    /// A client connecting over TCP.
    pub fn tcp(user_agent: String) -> Client {
        Client::with(Connect::Tcp, user_agent)
    }

    /// A client whose every connection goes to `peer` (vsock).
    pub fn stream(peer: StreamConnector, user_agent: String) -> Client {
        Client::with(Connect::Stream(peer), user_agent)
    }

    fn with(connect: Connect, user_agent: String) -> Client {
        Client {
            connect,
            connection: None,
            user_agent,
            head: Vec::with_capacity(512),
            input: Input::new(),
            body: None,
        }
    }

    /// Drops the kept connection (after a snapshot restore it belongs to
    /// the parent VM).
    pub fn disconnect(&mut self) {
        self.connection = None;
    }

    /// POSTs `body` to `target`: [`Client::request`].
    pub fn post(
        &mut self,
        target: &Target,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
        lookups: &Lookups,
    ) -> Result<Answer, Error> {
        self.request("POST", target, headers, body, timeout, lookups)
    }

    /// Sends `method` to `target` with `headers` and `body`, within
    /// `timeout`. A kept connection the peer has closed meanwhile is
    /// replaced and the request sent once more; any other failure is
    /// returned. The answer's body, when read, is [`Client::body`].
    pub fn request(
        &mut self,
        method: &str,
        target: &Target,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
        lookups: &Lookups,
    ) -> Result<Answer, Error> {
        let deadline = Instant::now() + timeout;
        self.body = None;
        self.write_head(method, target, headers, body.len());
        let reused = self
            .connection
            .as_ref()
            .is_some_and(|c| c.url == target.url);
        match self.exchange(target, body, deadline, lookups) {
            Err((stage, Error::Io(_))) if reused && stage != Stage::Reading => {
                self.connection = None;
                self.exchange(target, body, deadline, lookups)
                    .map_err(|(_, e)| e)
            }
            other => other.map_err(|(_, e)| e),
        }
    }

    /// The last answer's body, when it was read whole.
    pub fn body(&self) -> Option<&[u8]> {
        self.body.clone().map(|r| &self.input.buf[r])
    }

    /// Header values are not escaped: each is checked where it comes from
    /// (the token is printable ASCII without spaces, the path and host are
    /// what `http::Uri` accepted, the rest are constants).
    fn write_head(&mut self, method: &str, target: &Target, headers: &[(&str, &str)], len: usize) {
        let h = &mut self.head;
        h.clear();
        for part in [
            method,
            " ",
            &target.path,
            " HTTP/1.1\r\nHost: ",
            &target.host_header,
        ] {
            h.extend_from_slice(part.as_bytes());
        }
        h.extend_from_slice(b"\r\nUser-Agent: ");
        h.extend_from_slice(self.user_agent.as_bytes());
        for (name, value) in headers {
            for part in ["\r\n", name, ": ", value] {
                h.extend_from_slice(part.as_bytes());
            }
        }
        // A GET with no body says nothing of one. Writing into a Vec cannot
        // fail.
        if len > 0 || method != "GET" {
            let _ = write!(h, "\r\nContent-Length: {len}");
        }
        h.extend_from_slice(b"\r\n\r\n");
    }

    /// One request on the kept connection (or a new one); on failure, the
    /// connection is dropped and the stage it failed in returned.
    fn exchange(
        &mut self,
        target: &Target,
        body: &[u8],
        deadline: Instant,
        lookups: &Lookups,
    ) -> Result<Answer, (Stage, Error)> {
        if self.connection.as_ref().is_none_or(|c| c.url != target.url) {
            self.connection = None;
            let socket = self
                .open(target, deadline, lookups)
                .map_err(|e| (Stage::Sending, e))?;
            self.connection = Some(Connection {
                socket,
                url: target.url.clone(),
                read_timeout: None,
                write_timeout: None,
            });
        }
        let Some(conn) = self.connection.as_mut() else {
            return Err((Stage::Sending, Error::Io("no connection".into())));
        };
        let result = exchange_on(conn, &self.head, body, &mut self.input, deadline);
        match result {
            Ok((answer, body, keep)) => {
                if !keep {
                    self.connection = None;
                }
                self.body = body;
                Ok(answer)
            }
            Err(e) => {
                self.connection = None;
                Err(e)
            }
        }
    }

    fn open(&self, target: &Target, deadline: Instant, lookups: &Lookups) -> Result<Socket, Error> {
        let time = left(deadline, "connecting")?;
        match &self.connect {
            Connect::Stream(peer) => peer.open(time).map_err(|e| Error::Io(e.to_string())),
            Connect::Tcp => {
                let addr = match target.literal() {
                    Some(a) => a,
                    None => lookups
                        .resolve(&target.host, target.port, time)
                        .map_err(|e| Error::Io(format!("looking up {}: {e}", target.host)))?,
                };
                connect_tcp(addr, left(deadline, "connecting")?)
                    .map_err(|e| Error::Io(format!("connect to {addr}: {e}")))
            }
        }
    }
}

fn connect_tcp(addr: SocketAddr, timeout: Duration) -> io::Result<Socket> {
    // socket2 opens it close-on-exec.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.connect_timeout(&SockAddr::from(addr), timeout)?;
    // The request goes out in one write; the answer should not wait on Nagle.
    socket.set_tcp_nodelay(true)?;
    Ok(socket)
}

/// The time left before `deadline`, or the timeout error for `what`.
fn left(deadline: Instant, what: &'static str) -> Result<Duration, Error> {
    match deadline.checked_duration_since(Instant::now()) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(Error::Timeout(what)),
    }
}

/// Sets a socket timeout when the one set would reach too far past the
/// deadline (or is not set): the common prompt answer needs no call.
fn arm(
    set: &mut Option<Duration>,
    left: Duration,
    apply: impl FnOnce(Option<Duration>) -> io::Result<()>,
) -> io::Result<()> {
    if set.is_none_or(|s| s > left + TIMEOUT_SLACK || s + TIMEOUT_SLACK < left) {
        apply(Some(left))?;
        *set = Some(left);
    }
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// An answer, where its body is in the input buffer if it was read, and
/// whether the connection can be kept.
type Exchanged = (Answer, Option<std::ops::Range<usize>>, bool);

/// Writes the request and reads the answer on `conn`. Returns the answer,
/// where its body is in `input` if it was read, and whether the connection
/// can be kept.
fn exchange_on(
    conn: &mut Connection,
    head: &[u8],
    body: &[u8],
    input: &mut Input,
    deadline: Instant,
) -> Result<Exchanged, (Stage, Error)> {
    let io = |stage: Stage, what: &'static str| {
        move |e: io::Error| {
            if is_timeout(&e) {
                (stage, Error::Timeout(what))
            } else {
                (stage, Error::Io(format!("{what}: {e}")))
            }
        }
    };
    // Send: head and body in one call where the socket takes them.
    let (mut h, mut b) = (head, body);
    while !h.is_empty() || !b.is_empty() {
        let t = left(deadline, "sending the request").map_err(|e| (Stage::Sending, e))?;
        let socket = &conn.socket;
        arm(&mut conn.write_timeout, t, |t| socket.set_write_timeout(t))
            .map_err(io(Stage::Sending, "setting a timeout"))?;
        let n = match (&conn.socket).write_vectored(&[IoSlice::new(h), IoSlice::new(b)]) {
            Ok(0) => {
                return Err((
                    Stage::Sending,
                    Error::Io("the connection closed while sending".into()),
                ));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(Stage::Sending, "sending the request")(e)),
        };
        let from_head = n.min(h.len());
        h = &h[from_head..];
        b = &b[n - from_head..];
    }

    // The answer's head; interim (1xx) answers are skipped.
    input.filled = 0;
    let mut stage = Stage::Waiting;
    let (answer, head_len, framing, keep) = loop {
        let parsed = parse_head(input.bytes()).map_err(|e| (stage, Error::Io(e)))?;
        if let Some((answer, head_len, framing, keep)) = parsed {
            if (100..200).contains(&answer.status) {
                input.consume(head_len);
                continue;
            }
            break (answer, head_len, framing, keep);
        }
        if input.filled >= MAX_RESPONSE_HEAD {
            return Err((
                stage,
                Error::Io(format!(
                    "the answer's head is over {MAX_RESPONSE_HEAD} bytes"
                )),
            ));
        }
        let got = read_more(
            conn,
            input,
            MAX_RESPONSE_HEAD,
            deadline,
            "waiting for the answer",
        )
        .map_err(|e| (stage, e))?;
        if got == 0 {
            let what = if stage == Stage::Waiting {
                "the connection closed before an answer"
            } else {
                "the connection closed in the answer's head"
            };
            return Err((stage, Error::Io(what.into())));
        }
        stage = Stage::Reading;
    };

    // The body: read when it is small and framed, to keep the connection
    // and for callers that want it.
    let total = match framing {
        Framing::Length(n) if n <= MAX_RESPONSE_BODY => head_len + n,
        Framing::UntilClose => head_len + MAX_RESPONSE_BODY,
        Framing::Length(_) | Framing::Chunked => return Ok((answer, None, false)),
    };
    while input.filled < total {
        let got = read_more(conn, input, total, deadline, "reading the answer's body")
            .map_err(|e| (Stage::Reading, e))?;
        if got > 0 {
            continue;
        }
        if framing == Framing::UntilClose {
            return Ok((answer, Some(head_len..input.filled), false));
        }
        return Err((
            Stage::Reading,
            Error::Io(format!(
                "HTTP {}, then the connection closed in the body",
                answer.status
            )),
        ));
    }
    if framing == Framing::UntilClose {
        // Still open after the most that is read: the body is not whole.
        return Ok((answer, None, false));
    }
    // Bytes beyond the answer were not asked for: the connection is not in
    // a state to be trusted again.
    Ok((answer, Some(head_len..total), keep && input.filled == total))
}

/// The answer's bytes as read: a zero-filled buffer and how much of it holds
/// data, kept between requests so that reading allocates nothing.
pub(crate) struct Input {
    buf: Vec<u8>,
    filled: usize,
}

impl Input {
    fn new() -> Input {
        Input {
            buf: vec![0; 4096],
            filled: 0,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.filled]
    }

    /// Drops the first `n` bytes (an interim answer).
    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.filled, 0);
        self.filled -= n;
    }
}

/// Reads what the socket has into `input`, growing it up to `want` bytes,
/// within the deadline. 0 is the end of the stream.
fn read_more(
    conn: &mut Connection,
    input: &mut Input,
    want: usize,
    deadline: Instant,
    what: &'static str,
) -> Result<usize, Error> {
    if input.filled == input.buf.len() {
        let grown = (input.buf.len() * 2).min(want).max(input.filled + 1);
        input.buf.resize(grown, 0);
    }
    loop {
        let t = left(deadline, what)?;
        let socket = &conn.socket;
        arm(&mut conn.read_timeout, t, |t| socket.set_read_timeout(t))
            .map_err(|e| Error::Io(format!("setting a timeout: {e}")))?;
        match (&conn.socket).read(&mut input.buf[input.filled..]) {
            Ok(n) => {
                input.filled += n;
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => return Err(Error::Timeout(what)),
            Err(e) => return Err(Error::Io(format!("{what}: {e}"))),
        }
    }
}

/// The answer's status, `Retry-After`, where its head ends, how its body is
/// framed, and whether the connection may be kept. `None` until the head is
/// complete.
fn parse_head(bytes: &[u8]) -> Result<Option<(Answer, usize, Framing, bool)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("not an HTTP answer ({e})")),
    };
    let status = resp.code.unwrap_or(0);
    let mut keep = resp.version == Some(1);
    let mut length = None;
    let mut chunked = false;
    let mut retry_after = None;
    for h in resp.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) => length = Some(n),
                Err(_) => return Err(format!("bad Content-Length {value:?}")),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Not decoded; the connection is given up instead.
            chunked = true;
            keep = false;
        } else if h.name.eq_ignore_ascii_case("connection") {
            if value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"))
            {
                keep = false;
            }
        } else if h.name.eq_ignore_ascii_case("retry-after") {
            retry_after = Some(value.to_string());
        }
    }
    let framing = if status == 204 || status == 304 || (100..200).contains(&status) {
        // No body by definition, whatever the headers say.
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        keep = false;
        Framing::UntilClose
    };
    Ok(Some((
        Answer {
            status,
            retry_after,
        },
        head_len,
        framing,
        keep,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::mpsc;

    fn head(text: &str) -> (Answer, usize, Framing, bool) {
        parse_head(text.as_bytes())
            .unwrap()
            .unwrap_or_else(|| panic!("incomplete: {text:?}"))
    }

    #[test]
    fn answer_heads() {
        let (a, len, body, keep) = head("HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(
            (a.status, len, body, keep),
            (204, 27, Framing::Length(0), true)
        );
        let (a, _, body, keep) = head("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n");
        assert_eq!((a.status, body, keep), (200, Framing::Length(12), true));
        let (a, _, _, keep) = head(
            "HTTP/1.1 503 Busy\r\nRetry-After: 7\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(
            (a.status, a.retry_after.as_deref(), keep),
            (503, Some("7"), false)
        );
        // Chunked or read-to-close bodies are not read: the connection goes.
        let (_, _, body, keep) = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!((body, keep), (Framing::Chunked, false));
        let (_, _, body, keep) = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((body, keep), (Framing::UntilClose, false));
        let (_, _, _, keep) = head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(!keep, "HTTP/1.0 closes unless told otherwise");
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
        let e = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").unwrap_err();
        assert!(e.contains("Content-Length"), "{e}");
        let e = parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").unwrap_err();
        assert!(e.contains("not an HTTP answer"), "{e}");
    }

    /// What the test server does with a request.
    enum Reply {
        Bytes(Vec<u8>),
        /// Sends these, then closes the connection.
        Last(Vec<u8>),
        /// Closes the connection without answering.
        Close,
        /// Keeps the connection open and never answers.
        Hang,
    }

    /// A loopback server that reads one request per reply in `replies`, on
    /// connections accepted in turn, reporting each request and the
    /// connection it came on.
    fn server(replies: Vec<Reply>) -> (Target, mpsc::Receiver<(usize, String)>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/in?x=1", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut replies = replies.into_iter();
            for (n, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { return };
                let mut buf = Vec::new();
                loop {
                    let mut headers = [httparse::EMPTY_HEADER; 16];
                    let mut req = httparse::Request::new(&mut headers);
                    let len = match req.parse(&buf) {
                        Ok(httparse::Status::Complete(len)) => len,
                        _ => {
                            let mut chunk = [0u8; 4096];
                            match conn.read(&mut chunk) {
                                Ok(0) | Err(_) => break,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                            continue;
                        }
                    };
                    let body: usize = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                        .unwrap_or(0);
                    while buf.len() < len + body {
                        let mut chunk = [0u8; 4096];
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    }
                    let _ = tx.send((n, String::from_utf8_lossy(&buf[..len + body]).into_owned()));
                    buf.drain(..len + body);
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
                        Some(Reply::Close) => break,
                        Some(Reply::Hang) => std::thread::sleep(Duration::from_secs(600)),
                        None => return,
                    }
                }
            }
        });
        let target = crate::route::UrlTemplate::parse(&url)
            .unwrap()
            .resolve(None)
            .unwrap();
        (target, rx)
    }

    fn post(c: &mut Client, t: &Target, timeout: Duration) -> Result<Answer, Error> {
        c.post(
            t,
            &[("Content-Type", "application/json")],
            b"[1]",
            timeout,
            &Lookups::default(),
        )
    }

    const LONG: Duration = Duration::from_secs(30);

    #[test]
    fn a_request_and_its_answer_keep_the_connection() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfine.".to_vec();
        let (t, seen) = server(vec![Reply::Bytes(ok.clone()), Reply::Bytes(ok)]);
        let mut c = Client::tcp("guest-agent/t".into());
        assert_eq!(post(&mut c, &t, LONG).unwrap().status, 200);
        assert_eq!(post(&mut c, &t, LONG).unwrap().status, 200);
        let (n0, first) = seen.recv_timeout(LONG).unwrap();
        let (n1, _) = seen.recv_timeout(LONG).unwrap();
        assert_eq!((n0, n1), (0, 0), "one connection");
        let addr = t.host_header.clone();
        assert_eq!(
            first,
            format!(
                "POST /in?x=1 HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: guest-agent/t\r\nContent-Type: application/json\r\nContent-Length: 3\r\n\r\n[1]"
            )
        );
    }

    #[test]
    fn interim_answers_are_skipped() {
        let a = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n";
        let (t, _seen) = server(vec![Reply::Bytes(a.to_vec())]);
        let mut c = Client::tcp("t".into());
        assert_eq!(post(&mut c, &t, LONG).unwrap().status, 202);
    }

    #[test]
    fn a_kept_connection_the_peer_closed_is_replaced_and_the_request_sent_again() {
        let ok = b"HTTP/1.1 204 No Content\r\n\r\n".to_vec();
        // Answers the first request, then closes without answering the
        // second: the client sends it again on a new connection.
        let (t, seen) = server(vec![
            Reply::Bytes(ok.clone()),
            Reply::Close,
            Reply::Bytes(ok),
        ]);
        let mut c = Client::tcp("t".into());
        assert_eq!(post(&mut c, &t, LONG).unwrap().status, 204);
        assert_eq!(post(&mut c, &t, LONG).unwrap().status, 204);
        let conns: Vec<usize> = (0..3).map(|_| seen.recv_timeout(LONG).unwrap().0).collect();
        assert_eq!(conns, [0, 0, 1]);
    }

    #[test]
    fn an_answer_cut_short_is_an_error_not_an_answer() {
        let cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart".to_vec();
        let (t, _seen) = server(vec![Reply::Last(cut)]);
        let mut c = Client::tcp("t".into());
        // The client must not take the part for an answer.
        let e = post(&mut c, &t, LONG).unwrap_err();
        assert!(
            matches!(&e, Error::Io(m) if m == "HTTP 200, then the connection closed in the body"),
            "{e}"
        );
    }

    #[test]
    fn a_server_that_never_answers_is_a_timeout() {
        let (t, seen) = server(vec![Reply::Hang]);
        let mut c = Client::tcp("t".into());
        let e = post(&mut c, &t, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, Error::Timeout("waiting for the answer")), "{e}");
        seen.recv_timeout(LONG).unwrap();
    }

    #[test]
    fn large_chunked_or_unbounded_bodies_end_the_connection() {
        let big = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_RESPONSE_BODY + 1
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
        let mut c = Client::tcp("t".into());
        for _ in 0..3 {
            assert!(post(&mut c, &t, LONG).unwrap().status < 300);
        }
        let conns: Vec<usize> = (0..3).map(|_| seen.recv_timeout(LONG).unwrap().0).collect();
        assert_eq!(conns, [0, 1, 2], "each answer's body ended its connection");
    }

    #[test]
    fn nothing_listening_is_a_connect_error() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = crate::route::UrlTemplate::parse(&format!("http://127.0.0.1:{port}/x"))
            .unwrap()
            .resolve(None)
            .unwrap();
        let e = post(&mut Client::tcp("t".into()), &t, LONG).unwrap_err();
        assert!(
            matches!(&e, Error::Io(m) if m.starts_with("connect to 127.0.0.1:")),
            "{e}"
        );
    }
}
