//! Where pushes go: the URL template with its `{gateway}` placeholder, the
//! default gateway from `<proc_root>/net/route`, and the guest's own source
//! address toward the target (docs/design.md#configuration).
//!
//! URLs are parsed in one place, here, with the `http` crate's parser, into
//! the parts the HTTP client sends (src/client.rs), so what the
//! configuration accepts is exactly what the client can send to.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::Uri;
use procfs::{FromRead, net::RouteEntries};

use crate::collect::ProcFile;
use crate::error::{Error, Result};

/// The placeholder replaced by the current default gateway.
pub const GATEWAY: &str = "{gateway}";

/// An address that stands in for `{gateway}` while a template is checked.
const GATEWAY_STAND_IN: &str = "0.0.0.0";

const RTF_UP: u16 = 0x1;
const RTF_GATEWAY: u16 = 0x2;

/// What a URL that is not accepted gets told.
const EXPECTED_URL: &str =
    "off, or http://HOST[:PORT]/PATH where HOST may be {gateway}, or vsock://CID:PORT/PATH";

/// A push URL as configured: plain `http://host[:port]/path`, where host may
/// be `{gateway}`. TLS is not built in (docs/design.md#budgets: it would
/// triple the binary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    raw: String,
}

/// A push URL with its host known: what a request is sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The whole URL.
    pub url: String,
    /// The host: an address literal (brackets removed) or a name.
    pub host: String,
    /// The port (80 when the URL names none).
    pub port: u16,
    /// The request's `Host` header: the URL's host and port as written, or
    /// for `vsock://` a stand-in (the connector knows the peer).
    pub host_header: String,
    /// The request's path and query. These two are worked out once here
    /// rather than at every request.
    pub path: String,
}

impl UrlTemplate {
    /// Checks the URL's shape; `off` is handled by the caller.
    pub fn parse(raw: &str) -> std::result::Result<UrlTemplate, String> {
        // vsock: a shape of its own, no gateway (docs/vsock.md).
        if crate::vsock::is_vsock(raw) {
            crate::vsock::VsockUrl::parse(raw)?;
            return Ok(UrlTemplate {
                raw: raw.to_string(),
            });
        }
        parse_target(&raw.replace(GATEWAY, GATEWAY_STAND_IN))?;
        Ok(UrlTemplate {
            raw: raw.to_string(),
        })
    }

    /// The URL as configured.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether the URL needs the default gateway.
    pub fn needs_gateway(&self) -> bool {
        self.raw.contains(GATEWAY)
    }

    /// The target with `{gateway}` filled in; `None` when it needs a gateway
    /// and there is none.
    pub fn resolve(&self, gateway: Option<Ipv4Addr>) -> Option<Target> {
        // vsock: the connector knows the peer; no host or port (docs/vsock.md).
        if crate::vsock::is_vsock(&self.raw) {
            // The template passed the same parser.
            let vsock = crate::vsock::VsockUrl::parse(&self.raw).ok()?;
            return Some(Target {
                url: self.raw.clone(),
                host: String::new(),
                port: 0,
                host_header: crate::vsock::HTTP_HOST.to_string(),
                path: vsock.path,
            });
        }
        let url = if self.needs_gateway() {
            self.raw.replace(GATEWAY, &gateway?.to_string())
        } else {
            self.raw.clone()
        };
        // The template passed the same parser with a stand-in address.
        parse_target(&url).ok()
    }
}

impl Target {
    /// The socket address, when the host is an address literal (a name
    /// would need a lookup).
    pub fn literal(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.host.parse().ok()?, self.port))
    }
}

/// Parses a complete `http://` URL into a [`Target`].
fn parse_target(url: &str) -> std::result::Result<Target, String> {
    let uri: Uri = url.parse().map_err(|_| EXPECTED_URL.to_string())?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => return Err(format!("{EXPECTED_URL} (scheme {other} is not supported)")),
        None => return Err(EXPECTED_URL.to_string()),
    }
    let authority = uri.authority().ok_or(EXPECTED_URL)?;
    if authority.as_str().contains('@') {
        return Err(format!("{EXPECTED_URL} (no user:password@)"));
    }
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(EXPECTED_URL.to_string());
    }
    // The parser takes any digits after the colon but gives no number
    // for those that do not fit a port.
    let written = authority
        .as_str()
        .rsplit_once(':')
        .map(|(_, p)| p)
        .filter(|p| !p.contains(']'));
    let port = match (written, authority.port_u16()) {
        (None, _) => 80,
        (Some(_), Some(p)) if p > 0 => p,
        (Some(p), _) => return Err(format!("{EXPECTED_URL} (port {p} is not 1-65535)")),
    };
    Ok(Target {
        url: url.to_string(),
        host: host.to_string(),
        port,
        host_header: authority.as_str().to_string(),
        path: match uri.path_and_query().map(|p| p.as_str()) {
            Some(p) if p.starts_with('/') => p.to_string(),
            Some(p) => format!("/{p}"),
            None => "/".to_string(),
        },
    })
}

/// The guest's own address toward `target`: the source address the kernel
/// picks for it. A host name is looked up first, within `timeout`, on
/// `lookups`' one thread. `None` when there is no route, the name does not
/// resolve in time, or the lookup thread is still busy with an earlier name.
pub fn guest_ip(target: &Target, lookups: &Lookups, timeout: Duration) -> Option<IpAddr> {
    // vsock: no IP address toward the host (docs/vsock.md).
    if crate::vsock::is_vsock(&target.url) {
        return None;
    }
    let addr = match target.literal() {
        Some(a) => a,
        None => match lookups.resolve(&target.host, target.port, timeout) {
            Ok(a) => a,
            Err(e) => {
                log::debug!("guest address toward {}: {e}", target.url);
                return None;
            }
        },
    };
    source_address(addr).ok()
}

/// Name lookups with a deadline. `getaddrinfo` has no timeout of its own, so
/// a lookup runs on a thread of its own while the caller waits at most the
/// deadline; at most one such thread runs at a time, so a resolver that
/// never answers costs one parked thread, not one per attempt.
#[derive(Debug, Default, Clone)]
pub struct Lookups {
    busy: Arc<AtomicBool>,
}

impl Lookups {
    /// The first address of `host:port`, within `timeout`.
    pub fn resolve(&self, host: &str, port: u16, timeout: Duration) -> std::io::Result<SocketAddr> {
        use std::io::{Error as IoError, ErrorKind};
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(IoError::new(
                ErrorKind::WouldBlock,
                "an earlier name lookup has not returned yet",
            ));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let busy = self.busy.clone();
        let name = format!("{host}:{port}");
        let spawned = std::thread::Builder::new()
            .name("lookup".into())
            .stack_size(LOOKUP_STACK)
            .spawn(move || {
                let r = name.to_socket_addrs().map(|mut a| a.next());
                busy.store(false, Ordering::Release);
                let _ = tx.send(r);
            });
        if let Err(e) = spawned {
            self.busy.store(false, Ordering::Release);
            return Err(e);
        }
        match rx.recv_timeout(timeout) {
            Ok(Ok(Some(addr))) => Ok(addr),
            Ok(Ok(None)) => Err(IoError::new(
                ErrorKind::NotFound,
                format!("{host}: no address"),
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(IoError::new(
                ErrorKind::TimedOut,
                format!("looking up {host} took longer than {timeout:?}"),
            )),
        }
    }
}

/// Stack of the lookup thread: `getaddrinfo` in musl needs little.
const LOOKUP_STACK: usize = 128 * 1024;

/// The default gateway in `<proc_root>/net/route`: among routes with
/// destination 0, mask 0 and flags UP|GATEWAY, the lowest metric (the first
/// on a tie). `Ok(None)` when there is no default route, a normal state at boot.
pub fn default_gateway(proc_root: &Path) -> Result<Option<Ipv4Addr>> {
    ProcFile::new(proc_root, "net/route").parse(parse_default_gateway)
}

/// Parses a route table's text into its default gateway (see [`default_gateway`]).
pub fn parse_default_gateway(
    text: &[u8],
) -> std::result::Result<Option<Ipv4Addr>, procfs::ProcError> {
    let routes = RouteEntries::from_read(text)?;
    let mut best: Option<(u32, Ipv4Addr)> = None;
    for r in &routes.0 {
        let default = r.destination.is_unspecified() && r.mask.is_unspecified();
        let up_gw = r.flags & (RTF_UP | RTF_GATEWAY) == RTF_UP | RTF_GATEWAY;
        if default && up_gw && best.is_none_or(|(m, _)| r.metrics < m) {
            best = Some((r.metrics, r.gateway));
        }
    }
    Ok(best.map(|(_, g)| g))
}

/// The local address the kernel would use toward `target`. A connected UDP
/// socket asks the routing table without sending a packet.
pub fn source_address(target: SocketAddr) -> Result<IpAddr> {
    let any: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let net_err = |e: std::io::Error| Error::Network {
        target: target.to_string(),
        reason: format!("no route for the source address: {e}"),
    };
    let sock = UdpSocket::bind(any).map_err(net_err)?;
    sock.connect(target).map_err(net_err)?;
    Ok(sock.local_addr().map_err(net_err)?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";

    fn table(rows: &[&str]) -> String {
        let mut s = HEADER.to_string();
        for r in rows {
            s.push_str(r);
            s.push('\n');
        }
        s
    }

    fn gw(rows: &[&str]) -> Option<Ipv4Addr> {
        parse_default_gateway(table(rows).as_bytes()).unwrap()
    }

    #[test]
    fn qemu_user_network_gateway() {
        let t = [
            "eth0\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0",
            "eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0",
        ];
        assert_eq!(gw(&t), Some(Ipv4Addr::new(10, 0, 2, 2)));
    }

    #[test]
    fn lowest_metric_wins_first_on_tie() {
        let t = [
            "eth0\t00000000\t0100007F\t0003\t0\t0\t600\t00000000\t0\t0\t0",
            "eth1\t00000000\t0200007F\t0003\t0\t0\t100\t00000000\t0\t0\t0",
            "eth2\t00000000\t0300007F\t0003\t0\t0\t100\t00000000\t0\t0\t0",
        ];
        assert_eq!(gw(&t), Some(Ipv4Addr::new(127, 0, 0, 2)));
    }

    #[test]
    fn down_routes_host_routes_and_non_gateway_routes_are_skipped() {
        let t = [
            // down (flags lack RTF_UP)
            "eth0\t00000000\t0100007F\t0002\t0\t0\t0\t00000000\t0\t0\t0",
            // default destination but no RTF_GATEWAY
            "eth0\t00000000\t0200007F\t0001\t0\t0\t0\t00000000\t0\t0\t0",
            // host route with a gateway
            "eth0\t0900007F\t0300007F\t0007\t0\t0\t0\tFFFFFFFF\t0\t0\t0",
        ];
        assert_eq!(gw(&t), None);
    }

    #[test]
    fn no_routes_at_all() {
        assert_eq!(gw(&[]), None);
    }

    #[test]
    fn malformed_line_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net")).unwrap();
        std::fs::write(
            dir.path().join("net/route"),
            table(&["eth0\tzz\t0100007F\t0003"]),
        )
        .unwrap();
        let err = default_gateway(dir.path()).unwrap_err();
        assert!(err.to_string().contains("net/route"), "{err}");
    }

    #[test]
    fn template_resolution() {
        let t = UrlTemplate::parse("http://{gateway}:18080/v1/guest-metrics").unwrap();
        assert!(t.needs_gateway());
        assert_eq!(t.resolve(None), None);
        let r = t.resolve(Some(Ipv4Addr::new(10, 0, 2, 2))).unwrap();
        assert_eq!(r.url, "http://10.0.2.2:18080/v1/guest-metrics");
        assert_eq!(r.literal(), Some("10.0.2.2:18080".parse().unwrap()));
        let fixed = UrlTemplate::parse("http://127.0.0.1:9/x").unwrap();
        assert_eq!(fixed.resolve(None).unwrap().url, "http://127.0.0.1:9/x");
    }

    #[test]
    fn targets_hosts_and_ports() {
        let t = |u: &str| UrlTemplate::parse(u).unwrap().resolve(None).unwrap();
        assert_eq!(
            t("http://[::1]/x").literal(),
            Some("[::1]:80".parse().unwrap())
        );
        let named = t("http://manager.local:9/x");
        assert_eq!((named.host.as_str(), named.port), ("manager.local", 9));
        assert_eq!(named.literal(), None);
    }

    #[test]
    fn urls_refused_with_the_reason() {
        for (bad, why) in [
            ("https://example.invalid/", "scheme https"),
            ("127.0.0.1:9", ""),
            ("http://:9/x", ""),
            ("http://h:99999/", ""),
            ("http://h:0/", "port 0"),
            ("http://u:p@h:9/", "user"),
            ("http://h/a b", ""),
            ("", ""),
        ] {
            let e = UrlTemplate::parse(bad).unwrap_err();
            assert!(e.starts_with("off, or http://"), "{bad}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn lookups_of_names_have_a_deadline_and_an_answer() {
        let l = Lookups::default();
        let a = l.resolve("localhost", 9, Duration::from_secs(30)).unwrap();
        assert!(a.ip().is_loopback() && a.port() == 9, "{a}");
        // While a lookup is still out, another is refused at once instead
        // of stacking threads behind a resolver that does not answer.
        l.busy.store(true, Ordering::Release);
        let e = l
            .resolve("localhost", 9, Duration::from_secs(30))
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
    }

    #[test]
    fn source_address_toward_loopback_is_loopback() {
        let ip = source_address("127.0.0.1:9".parse().unwrap()).unwrap();
        assert_eq!(ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
}
