//! Pushing over virtio-vsock, for guests with no network (or one the manager
//! must not be reached through): `url = vsock://CID:PORT/PATH`.
//!
//! The samples still travel as HTTP/1.1 POSTs through the same ureq agent as
//! `http://` pushes (keep-alive, batching, retry and backoff, `Retry-After`,
//! token, format: docs/design.md#delivery); only the connection differs. A
//! [`StreamConnector`] plugged into ureq's transport interface opens an
//! `AF_VSOCK` stream instead of TCP. On Firecracker, a guest connection to
//! CID 2 port P reaches the host's Unix socket `<uds_path>_P` (docs/vsock.md).
//!
//! The socket calls go through `socket2`: rustix (1.1) has no safe vsock
//! address type, and building a `sockaddr_vm` by hand would need `unsafe`,
//! which this crate forbids.
//!
//! A vsock connection is reset when the VM is restored from a snapshot and
//! when the host side restarts. ureq's pool probes an idle connection before
//! reusing it ([`Transport::is_open`]), so the next push opens a new one; a
//! batch whose request failed stays buffered and is sent again.

use std::fmt;
use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::sync::{Arc, Weak};
use std::time::Duration;

use rustix::io::Errno;
use socket2::{Domain, SockAddr, Socket, Type};
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, ShutdownHandle, Transport,
};

/// The URL scheme.
pub const SCHEME: &str = "vsock://";
/// CIDs that are never a push target: 0 is the hypervisor
/// (`VMADDR_CID_HYPERVISOR`), 1 the guest's own loopback
/// (`VMADDR_CID_LOCAL`), `u32::MAX` the bind-only wildcard (`VMADDR_CID_ANY`).
const RESERVED_CIDS: [u32; 3] = [0, 1, u32::MAX];
/// The bind-only wildcard port (`VMADDR_PORT_ANY`).
const VMADDR_PORT_ANY: u32 = u32::MAX;
/// The `Host` header of requests over vsock. There is no host name, and a
/// Unix-socket server (what Firecracker's host side is) expects `localhost`,
/// as curl's and Docker's clients send it.
const HTTP_HOST: &str = "localhost";
/// What a vsock URL looks like, for error messages.
const EXPECTED: &str = "vsock://CID:PORT/PATH with numbers for CID (2 is the host) and PORT";

/// A parsed `vsock://CID:PORT/PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockUrl {
    /// The peer's context id; 2 is the host.
    pub cid: u32,
    /// The peer's vsock port; on Firecracker the host socket is `<uds_path>_PORT`.
    pub port: u32,
    /// The request path with its query, starting with `/`.
    pub path: String,
}

impl VsockUrl {
    /// Parses `vsock://CID:PORT[/PATH]`; the error says what is wrong and
    /// what is accepted.
    pub fn parse(raw: &str) -> Result<VsockUrl, String> {
        let rest = raw
            .strip_prefix(SCHEME)
            .ok_or_else(|| EXPECTED.to_string())?;
        if rest.contains(char::is_whitespace) || rest.contains(['#', '@']) {
            return Err(format!(
                "{EXPECTED} (no spaces, fragment or user information)"
            ));
        }
        let at = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(at);
        let (cid, port) = authority
            .split_once(':')
            .ok_or_else(|| format!("{EXPECTED} (the port is missing)"))?;
        let cid: u32 = cid
            .parse()
            .map_err(|_| format!("{EXPECTED} (CID {cid:?} is not a number)"))?;
        if RESERVED_CIDS.contains(&cid) {
            return Err(format!(
                "{EXPECTED} (CID {cid} is reserved: 0 is the hypervisor, 1 this VM's own loopback)"
            ));
        }
        let port: u32 = port
            .parse()
            .map_err(|_| format!("{EXPECTED} (port {port:?} is not a number)"))?;
        if port == 0 || port == VMADDR_PORT_ANY {
            return Err(format!("{EXPECTED} (port {port} is not 1-4294967294)"));
        }
        let path = match path {
            "" => "/".to_string(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_string(),
        };
        Ok(VsockUrl { cid, port, path })
    }

    /// The URL handed to ureq: plain HTTP with a placeholder host, since
    /// the connector, not the host name, decides where the bytes go.
    pub fn http_url(&self) -> String {
        format!("http://{HTTP_HOST}{}", self.path)
    }
}

impl fmt::Display for VsockUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}:{}{}", self.cid, self.port, self.path)
    }
}

/// Whether a configured URL is a vsock one.
pub fn is_vsock(url: &str) -> bool {
    url.starts_with(SCHEME)
}

/// An agent whose every connection is an `AF_VSOCK` stream to `url`'s CID
/// and port, whatever the request's host.
pub fn agent(config: ureq::config::Config, url: &VsockUrl) -> ureq::Agent {
    ureq::Agent::with_parts(
        config,
        StreamConnector::vsock(url.cid, url.port),
        NoResolver,
    )
}

/// Resolves nothing: the connector knows its peer, and a name lookup of the
/// placeholder host would only cost a thread per push.
#[derive(Debug)]
struct NoResolver;

impl Resolver for NoResolver {
    fn resolve(
        &self,
        _uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        // Empty: only TCP, SOCKS and CONNECT connectors read the addresses,
        // and this agent has none of them.
        Ok(self.empty())
    }
}

/// Opens a stream socket to one fixed address for every connection ureq
/// asks for: a vsock peer in production, a Unix socket in tests (the same
/// code path, since a Firecracker host side is a Unix socket).
pub struct StreamConnector {
    domain: Domain,
    addr: SockAddr,
    peer: String,
}

impl StreamConnector {
    /// A connector to vsock `cid`:`port`.
    pub fn vsock(cid: u32, port: u32) -> StreamConnector {
        StreamConnector {
            domain: Domain::VSOCK,
            addr: SockAddr::vsock(cid, port),
            peer: format!("vsock CID {cid} port {port}"),
        }
    }

    /// A connector to the Unix stream socket at `path`: the in-process
    /// tests' stand-in for the host side, which is one on Firecracker.
    #[cfg(test)]
    pub fn unix(path: &std::path::Path) -> io::Result<StreamConnector> {
        Ok(StreamConnector {
            domain: Domain::UNIX,
            addr: SockAddr::unix(path)?,
            peer: format!("unix socket {}", path.display()),
        })
    }

    fn open(&self, timeout: NextTimeout) -> Result<Socket, ureq::Error> {
        let socket = Socket::new(self.domain, Type::STREAM, None).map_err(|e| {
            let why = if e.raw_os_error() == Some(Errno::AFNOSUPPORT.raw_os_error()) {
                "this kernel has no vsock support; load the vsock and \
                 vmw_vsock_virtio_transport modules"
            } else {
                "cannot create the socket"
            };
            ureq::Error::Io(io::Error::new(e.kind(), format!("{why} ({e})")))
        })?;
        let connected = match timeout.not_zero() {
            Some(t) => socket.connect_timeout(&self.addr, *t),
            None => socket.connect(&self.addr),
        };
        connected.map_err(|e| {
            // ENODEV: the vsock core is there but no transport is (no vsock
            // device, or vmw_vsock_virtio_transport not loaded).
            let hint = if e.raw_os_error() == Some(Errno::NODEV.raw_os_error()) {
                "; does the VM have a vsock device and vmw_vsock_virtio_transport?"
            } else {
                ""
            };
            ureq::Error::Io(io::Error::new(
                e.kind(),
                format!("connect to {}: {e}{hint}", self.peer),
            ))
        })?;
        Ok(socket)
    }
}

impl fmt::Debug for StreamConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamConnector")
            .field("peer", &self.peer)
            .finish()
    }
}

impl Connector for StreamConnector {
    type Out = StreamTransport;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<()>,
    ) -> Result<Option<StreamTransport>, ureq::Error> {
        // Nothing sits before this connector in its agent's chain.
        debug_assert!(chained.is_none());
        let socket = self.open(details.timeout)?;
        log::debug!("connected to {}", self.peer);
        let config = details.config;
        let transport = StreamTransport {
            socket: Arc::new(SharedSocket(socket)),
            buffers: LazyBuffers::new(config.input_buffer_size(), config.output_buffer_size()),
            read_timeout: None,
            write_timeout: None,
            peer: self.peer.clone(),
        };
        (details.register_shutdown)(Arc::downgrade(&transport.socket) as Weak<dyn ShutdownHandle>)?;
        Ok(Some(transport))
    }
}

/// The socket, shared (weakly) with the agent so that its shutdown can
/// interrupt a blocked read.
struct SharedSocket(Socket);

impl ShutdownHandle for SharedSocket {
    fn shutdown(&self) {
        // Already closed or shut down: nothing left to interrupt.
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// One connection: HTTP/1.1 bytes over a connected stream socket.
pub struct StreamTransport {
    socket: Arc<SharedSocket>,
    buffers: LazyBuffers,
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    peer: String,
}

impl fmt::Debug for StreamTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamTransport")
            .field("peer", &self.peer)
            .finish()
    }
}

/// The timeout left for one read or write, or the timeout error when none is.
fn left(timeout: NextTimeout) -> Result<Option<Duration>, ureq::Error> {
    if timeout.after.is_zero() {
        return Err(ureq::Error::Timeout(timeout.reason));
    }
    Ok(timeout.not_zero().map(|t| *t))
}

/// A socket timeout surfaces as `WouldBlock` (or `TimedOut`): ureq's own
/// timeout error says which phase ran out.
fn io_error(e: io::Error, timeout: NextTimeout) -> ureq::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ureq::Error::Timeout(timeout.reason),
        _ => ureq::Error::Io(e),
    }
}

impl Transport for StreamTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        let t = left(timeout)?;
        if t != self.write_timeout {
            self.socket.0.set_write_timeout(t)?;
            self.write_timeout = t;
        }
        let output = &self.buffers.output()[..amount];
        (&self.socket.0)
            .write_all(output)
            .map_err(|e| io_error(e, timeout))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        let t = left(timeout)?;
        if t != self.read_timeout {
            self.socket.0.set_read_timeout(t)?;
            self.read_timeout = t;
        }
        let input = self.buffers.input_append_buf();
        let n = loop {
            match (&self.socket.0).read(input) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other.map_err(|e| io_error(e, timeout))?,
            }
        };
        self.buffers.input_appended(n);
        Ok(n > 0)
    }

    /// An idle connection is usable only if the peer has sent nothing and
    /// not closed it: a reset (snapshot restore, host-side restart) or an
    /// end of stream means a new connection.
    fn is_open(&mut self) -> bool {
        let socket = &self.socket.0;
        if socket.set_nonblocking(true).is_err() {
            return false;
        }
        let mut byte = [MaybeUninit::<u8>::uninit()];
        let idle =
            matches!(socket.peek(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        idle && socket.set_nonblocking(false).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> VsockUrl {
        VsockUrl::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    fn err(raw: &str) -> String {
        VsockUrl::parse(raw).expect_err(raw)
    }

    #[test]
    fn host_cid_port_and_path() {
        let u = ok("vsock://2:1024/v1/guest-metrics");
        assert_eq!(
            u,
            VsockUrl {
                cid: 2,
                port: 1024,
                path: "/v1/guest-metrics".into()
            }
        );
        assert_eq!(u.to_string(), "vsock://2:1024/v1/guest-metrics");
        assert_eq!(u.http_url(), "http://localhost/v1/guest-metrics");
    }

    #[test]
    fn path_defaults_to_root_and_keeps_a_query() {
        assert_eq!(ok("vsock://2:52").path, "/");
        assert_eq!(ok("vsock://2:52?vm=a").path, "/?vm=a");
        assert_eq!(ok("vsock://2:52/x?vm=a").path, "/x?vm=a");
    }

    #[test]
    fn other_guests_and_the_largest_port_are_accepted() {
        let u = ok("vsock://3:4294967294/x");
        assert_eq!((u.cid, u.port), (3, u32::MAX - 1));
    }

    #[test]
    fn bad_cids_are_named() {
        assert!(err("vsock://host:1024/x").contains("CID \"host\" is not a number"));
        assert!(err("vsock://{gateway}:1024/x").contains("is not a number"));
        assert!(err("vsock://-2:1024/x").contains("is not a number"));
        assert!(err("vsock://4294967296:1024/x").contains("is not a number"));
        assert!(err("vsock://:1024/x").contains("CID \"\" is not a number"));
        for reserved in ["0", "1", "4294967295"] {
            let e = err(&format!("vsock://{reserved}:1024/x"));
            assert!(e.contains(&format!("CID {reserved} is reserved")), "{e}");
        }
    }

    #[test]
    fn bad_ports_are_named() {
        assert!(err("vsock://2/x").contains("the port is missing"));
        assert!(err("vsock://2").contains("the port is missing"));
        assert!(err("vsock://2:/x").contains("port \"\" is not a number"));
        assert!(err("vsock://2:http/x").contains("port \"http\" is not a number"));
        assert!(err("vsock://2:1:2/x").contains("port \"1:2\" is not a number"));
        assert!(err("vsock://2:0/x").contains("port 0 is not"));
        assert!(err("vsock://2:4294967295/x").contains("port 4294967295 is not"));
    }

    #[test]
    fn other_shapes_are_refused() {
        assert!(err("http://2:1024/x").starts_with("vsock://CID:PORT/PATH"));
        assert!(err("vsock://2:1024/a b").contains("no spaces"));
        assert!(err("vsock://u@2:1024/x").contains("user information"));
        assert!(err("vsock://2:1024/x#f").contains("fragment"));
    }

    /// A request as the server read it.
    #[derive(Debug)]
    struct Seen {
        /// Which accepted connection it came on, counting from 0.
        conn: usize,
        head: String,
        body: Vec<u8>,
    }

    /// A minimal HTTP/1.1 server on a Unix socket, as a Firecracker host
    /// side is: answers 204 with keep-alive, and with `close_after` closes
    /// the connection right after the answer anyway. Runs until the test
    /// process ends.
    fn serve(
        listener: std::os::unix::net::UnixListener,
        close_after: bool,
    ) -> std::sync::mpsc::Receiver<Seen> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for (conn, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { return };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    loop {
                        let mut headers = [httparse::EMPTY_HEADER; 32];
                        let mut req = httparse::Request::new(&mut headers);
                        let Ok(httparse::Status::Complete(len)) = req.parse(&buf) else {
                            let mut chunk = [0u8; 4096];
                            match stream.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let length: usize = req
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                            .unwrap_or(0);
                        let head = String::from_utf8_lossy(&buf[..len]).into_owned();
                        while buf.len() < len + length {
                            let mut chunk = [0u8; 4096];
                            match stream.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let body = buf[len..len + length].to_vec();
                        buf.drain(..len + length);
                        // The answer always offers keep-alive, so the client
                        // pools the connection even when it is closed next.
                        let reply = "HTTP/1.1 204 No Content\r\n\r\n";
                        if stream.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                        if close_after {
                            // Closed before the test hears of the request:
                            // the pooled connection is dead, as after a
                            // snapshot restore or a host-side restart.
                            let _ = stream.shutdown(std::net::Shutdown::Both);
                        }
                        let _ = tx.send(Seen { conn, head, body });
                        if close_after {
                            return;
                        }
                    }
                });
            }
        });
        rx
    }

    fn unix_agent(path: &std::path::Path) -> ureq::Agent {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .proxy(None)
            .build();
        ureq::Agent::with_parts(config, StreamConnector::unix(path).unwrap(), NoResolver)
    }

    fn post(agent: &ureq::Agent, body: &str) -> Result<u16, ureq::Error> {
        agent
            .post("http://localhost/v1/guest-metrics")
            .header("Authorization", "Bearer t0ken")
            .send(body)
            .map(|r| r.status().as_u16())
    }

    const WAIT: Duration = Duration::from_secs(30);

    /// A socket path in a fresh directory, removed with the returned guard.
    fn socket_path() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.vsock_1024");
        (dir, path)
    }

    #[test]
    fn http_over_a_stream_socket_keeps_the_connection_alive() {
        let (_dir, path) = socket_path();
        let seen = serve(
            std::os::unix::net::UnixListener::bind(&path).unwrap(),
            false,
        );
        let agent = unix_agent(&path);
        for body in ["[1]", "[2]", "[3]"] {
            assert_eq!(post(&agent, body).unwrap(), 204);
        }
        let got: Vec<Seen> = (0..3).map(|_| seen.recv_timeout(WAIT).unwrap()).collect();
        assert!(got.iter().all(|s| s.conn == 0), "one connection: {got:?}");
        assert_eq!(got[2].body, b"[3]");
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
    fn a_closed_connection_is_replaced_at_the_next_request() {
        let (_dir, path) = socket_path();
        let seen = serve(std::os::unix::net::UnixListener::bind(&path).unwrap(), true);
        let agent = unix_agent(&path);
        for body in ["[1]", "[2]"] {
            assert_eq!(post(&agent, body).unwrap(), 204);
            // The server has closed by the time it reports the request, so
            // the pooled connection is closed (as after a snapshot restore).
            seen.recv_timeout(WAIT).unwrap();
        }
        assert_eq!(post(&agent, "[3]").unwrap(), 204);
        assert_eq!(seen.recv_timeout(WAIT).unwrap().conn, 2);
    }

    #[test]
    fn a_missing_host_side_is_a_connect_error_then_a_new_one_is_used() {
        let (_dir, path) = socket_path();
        let agent = unix_agent(&path);
        let e = post(&agent, "[1]").unwrap_err().to_string();
        assert!(
            e.contains("connect to unix socket") && e.contains("vm.vsock_1024"),
            "{e}"
        );
        let seen = serve(
            std::os::unix::net::UnixListener::bind(&path).unwrap(),
            false,
        );
        assert_eq!(post(&agent, "[1]").unwrap(), 204);
        assert_eq!(seen.recv_timeout(WAIT).unwrap().body, b"[1]");
    }

    #[test]
    fn the_url_template_takes_vsock_urls_and_gives_no_guest_address() {
        use crate::route::{Lookups, UrlTemplate, guest_ip};
        let t = UrlTemplate::parse("vsock://2:1024/v1/guest-metrics").unwrap();
        assert!(!t.needs_gateway());
        let target = t.resolve(None).expect("no gateway needed");
        assert_eq!(target.url, "vsock://2:1024/v1/guest-metrics");
        assert_eq!(target.literal(), None);
        assert_eq!(
            guest_ip(&target, &Lookups::default(), Duration::from_secs(1)),
            None
        );
        let e = UrlTemplate::parse("vsock://2/x").unwrap_err();
        assert!(e.contains("the port is missing"), "{e}");
        let e = UrlTemplate::parse("vsocks://2:1/x").unwrap_err();
        assert!(e.contains("vsock://CID:PORT/PATH"), "{e}");
    }

    #[test]
    fn request_urls() {
        let request_url = |u: &str| {
            crate::route::UrlTemplate::parse(u)
                .unwrap()
                .resolve(None)
                .unwrap()
                .request_url
        };
        assert_eq!(
            request_url("vsock://2:1024/v1/guest-metrics"),
            "http://localhost/v1/guest-metrics"
        );
        assert_eq!(request_url("http://10.0.2.2:9/x"), "http://10.0.2.2:9/x");
        assert!(is_vsock("vsock://2:1024/x") && !is_vsock("http://x/"));
    }
}
