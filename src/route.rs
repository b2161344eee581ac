//! Where pushes go: the URL template with its `{gateway}` placeholder, the
//! default gateway from `<proc_root>/net/route` (GUIDE §4), and the guest's
//! own source address toward the target.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;

use procfs::{FromRead, net::RouteEntries};

use crate::collect::ProcFile;
use crate::error::{Error, Result};

/// The placeholder replaced by the current default gateway.
pub const GATEWAY: &str = "{gateway}";

const RTF_UP: u16 = 0x1;
const RTF_GATEWAY: u16 = 0x2;

/// A push URL as configured: plain `http://host[:port]/path`, where host may
/// be `{gateway}`. TLS is not built in (it would triple the binary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    raw: String,
}

impl UrlTemplate {
    /// Checks the URL's shape; `off` is handled by the caller.
    pub fn parse(raw: &str) -> std::result::Result<UrlTemplate, String> {
        // vsock: its own shape, no gateway (docs/vsock.md).
        if crate::vsock::is_vsock(raw) {
            crate::vsock::VsockUrl::parse(raw)?;
            return Ok(UrlTemplate {
                raw: raw.to_string(),
            });
        }
        let expected = "off, http://HOST[:PORT]/PATH where HOST may be {gateway}, \
                        or vsock://CID:PORT/PATH";
        let rest = raw
            .strip_prefix("http://")
            .ok_or_else(|| match raw.split_once("://") {
                Some((scheme, _)) => format!("{expected} (scheme {scheme} is not supported)"),
                None => expected.to_string(),
            })?;
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let (host, port) = split_host_port(authority);
        if host.is_empty() || authority.contains('@') || rest.contains(char::is_whitespace) {
            return Err(expected.to_string());
        }
        if let Some(p) =
            port.filter(|p| p.parse::<u16>().is_ok_and(|p| p == 0) || p.parse::<u16>().is_err())
        {
            return Err(format!("{expected} (port {p} is not 1-65535)"));
        }
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

    /// The URL with `{gateway}` filled in; `None` when it needs a gateway and
    /// there is none.
    pub fn resolve(&self, gateway: Option<Ipv4Addr>) -> Option<String> {
        if !self.needs_gateway() {
            return Some(self.raw.clone());
        }
        gateway.map(|g| self.raw.replace(GATEWAY, &g.to_string()))
    }
}

/// Splits `host[:port]` or `[v6][:port]`.
fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((h, tail)) => (h, tail.strip_prefix(':')),
            None => ("", None),
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    }
}

/// The host and port of a resolved `http://` URL (port 80 when absent).
pub fn host_port(url: &str) -> Option<(&str, u16)> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split(['/', '?']).next()?;
    let (host, port) = split_host_port(authority);
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => 80,
    };
    Some((host, port))
}

/// The address a resolved URL points at, when its host is an address
/// literal (a name would need DNS, which this does not do).
pub fn literal_target(url: &str) -> Option<SocketAddr> {
    let (host, port) = host_port(url)?;
    Some(SocketAddr::new(host.parse().ok()?, port))
}

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
        let dir = std::env::temp_dir().join(format!("ga-route-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("net")).unwrap();
        std::fs::write(dir.join("net/route"), table(&["eth0\tzz\t0100007F\t0003"])).unwrap();
        let err = default_gateway(&dir).unwrap_err();
        assert!(err.to_string().contains("net/route"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn template_resolution() {
        let t = UrlTemplate::parse("http://{gateway}:18080/v1/guest-metrics").unwrap();
        assert!(t.needs_gateway());
        assert_eq!(t.resolve(None), None);
        assert_eq!(
            t.resolve(Some(Ipv4Addr::new(10, 0, 2, 2))).as_deref(),
            Some("http://10.0.2.2:18080/v1/guest-metrics")
        );
        let fixed = UrlTemplate::parse("http://127.0.0.1:9/x").unwrap();
        assert_eq!(fixed.resolve(None).as_deref(), Some("http://127.0.0.1:9/x"));
    }

    #[test]
    fn literal_targets() {
        assert_eq!(
            literal_target("http://127.0.0.1:9/x"),
            Some("127.0.0.1:9".parse().unwrap())
        );
        assert_eq!(
            literal_target("http://[::1]/x"),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(literal_target("http://manager.local:9/x"), None);
    }

    #[test]
    fn source_address_toward_loopback_is_loopback() {
        let ip = source_address("127.0.0.1:9".parse().unwrap()).unwrap();
        assert_eq!(ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
}
