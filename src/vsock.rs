//! Pushing over virtio-vsock, for guests with no network (or one the manager
//! must not be reached through): `url = vsock://CID:PORT/PATH`.
//!
//! The samples still travel as HTTP/1.1 POSTs through the push's client
//! (keep-alive, batching, retry and backoff, `Retry-After`, token, format:
//! docs/design.md#delivery); only the connection differs. A
//! [`StreamConnector`] opens an `AF_VSOCK` stream instead of TCP. On
//! Firecracker, a guest connection to CID 2 port P reaches the host's Unix
//! socket `<uds_path>_P` (docs/vsock.md).
//!
//! The socket calls go through `socket2`: rustix (1.1) has no safe vsock
//! address type, and building a `sockaddr_vm` by hand would need `unsafe`,
//! which this crate forbids.
//!
//! A vsock connection is reset when the VM is restored from a snapshot and
//! when the host side restarts. The client sends a request that finds its
//! kept connection closed once more on a new one; a batch whose request
//! failed stays buffered and is sent again.

use std::fmt;
use std::io;
use std::time::Duration;

use rustix::io::Errno;
use socket2::{Domain, SockAddr, Socket, Type};

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
pub const HTTP_HOST: &str = "localhost";
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

/// Opens a stream socket to one fixed address for every connection the
/// push's client asks for: a vsock peer in production, a Unix socket in
/// tests (the same code path, since a Firecracker host side is a Unix
/// socket).
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

    /// A connected socket, within `timeout`.
    pub fn open(&self, timeout: Duration) -> io::Result<Socket> {
        let socket = Socket::new(self.domain, Type::STREAM, None).map_err(|e| {
            let why = if e.raw_os_error() == Some(Errno::AFNOSUPPORT.raw_os_error()) {
                "this kernel has no vsock support; load the vsock and \
                 vmw_vsock_virtio_transport modules"
            } else {
                "cannot create the socket"
            };
            io::Error::new(e.kind(), format!("{why} ({e})"))
        })?;
        socket.connect_timeout(&self.addr, timeout).map_err(|e| {
            // ENODEV: the vsock core is there but no transport is (no vsock
            // device, or vmw_vsock_virtio_transport not loaded).
            let hint = if e.raw_os_error() == Some(Errno::NODEV.raw_os_error()) {
                "; does the VM have a vsock device and vmw_vsock_virtio_transport?"
            } else {
                ""
            };
            io::Error::new(e.kind(), format!("connect to {}: {e}{hint}", self.peer))
        })?;
        log::debug!("connected to {}", self.peer);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

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

    fn unix_agent(path: &std::path::Path) -> crate::client::Client {
        crate::client::Client::stream(StreamConnector::unix(path).unwrap(), "test".into())
    }

    fn post(client: &mut crate::client::Client, body: &str) -> Result<u16, crate::client::Error> {
        let target = crate::route::UrlTemplate::parse("vsock://2:1024/v1/guest-metrics")
            .unwrap()
            .resolve(None)
            .unwrap();
        client
            .post(
                &target,
                &[("Authorization", "Bearer t0ken")],
                body.as_bytes(),
                Duration::from_secs(10),
                &crate::route::Lookups::default(),
            )
            .map(|a| a.status)
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
        let mut agent = unix_agent(&path);
        for body in ["[1]", "[2]", "[3]"] {
            assert_eq!(post(&mut agent, body).unwrap(), 204);
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
        let mut agent = unix_agent(&path);
        for body in ["[1]", "[2]"] {
            assert_eq!(post(&mut agent, body).unwrap(), 204);
            // The server has closed by the time it reports the request, so
            // the pooled connection is closed (as after a snapshot restore).
            seen.recv_timeout(WAIT).unwrap();
        }
        assert_eq!(post(&mut agent, "[3]").unwrap(), 204);
        assert_eq!(seen.recv_timeout(WAIT).unwrap().conn, 2);
    }

    #[test]
    fn a_missing_host_side_is_a_connect_error_then_a_new_one_is_used() {
        let (_dir, path) = socket_path();
        let mut agent = unix_agent(&path);
        let e = post(&mut agent, "[1]").unwrap_err().to_string();
        assert!(
            e.contains("connect to unix socket") && e.contains("vm.vsock_1024"),
            "{e}"
        );
        let seen = serve(
            std::os::unix::net::UnixListener::bind(&path).unwrap(),
            false,
        );
        assert_eq!(post(&mut agent, "[1]").unwrap(), 204);
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
    fn request_lines_and_host_headers() {
        let target = |u: &str| {
            let t = crate::route::UrlTemplate::parse(u)
                .unwrap()
                .resolve(None)
                .unwrap();
            (t.host_header, t.path)
        };
        assert_eq!(
            target("vsock://2:1024/v1/guest-metrics?vm=a"),
            ("localhost".into(), "/v1/guest-metrics?vm=a".into())
        );
        assert_eq!(
            target("http://10.0.2.2:9/x?y=1"),
            ("10.0.2.2:9".into(), "/x?y=1".into())
        );
        assert_eq!(
            target("http://[fd00::1]/"),
            ("[fd00::1]".into(), "/".into())
        );
        assert_eq!(target("http://h"), ("h".into(), "/".into()));
        assert!(is_vsock("vsock://2:1024/x") && !is_vsock("http://x/"));
    }
}
