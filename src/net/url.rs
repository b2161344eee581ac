//! The URLs the agent sends to: a push URL as configured ([`UrlTemplate`],
//! with its `{gateway}` placeholder), and a [`Target`], the URL with its host
//! known, parsed once into what the HTTP client needs
//! (docs/design.md#configuration).
//!
//! URLs are parsed in one place, here, with the `http` crate's parser (the
//! one ureq uses), so what the configuration accepts is exactly what a
//! request can be sent to. `vsock://CID:PORT/PATH` is a shape of its own
//! (docs/vsock.md): the request goes out as `http://localhost/PATH` over an
//! AF_VSOCK stream to that CID and port.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};

use http::Uri;

/// The placeholder replaced by the current default gateway.
pub const GATEWAY: &str = "{gateway}";

/// An address that stands in for `{gateway}` while a template is checked.
const GATEWAY_STAND_IN: &str = "0.0.0.0";

/// What a URL that is not accepted gets told.
const EXPECTED_URL: &str =
    "off, or http://HOST[:PORT]/PATH where HOST may be {gateway}, or vsock://CID:PORT/PATH";

/// The vsock URL scheme.
pub const VSOCK_SCHEME: &str = "vsock://";

/// The host of requests over vsock. There is no host name, and a
/// Unix-socket server (what Firecracker's host side is) expects
/// `localhost`, as curl's and Docker's clients send it.
pub const VSOCK_HTTP_HOST: &str = "localhost";

/// CIDs that are never a push target: 0 is the hypervisor
/// (`VMADDR_CID_HYPERVISOR`), 1 the guest's own loopback
/// (`VMADDR_CID_LOCAL`), `u32::MAX` the bind-only wildcard (`VMADDR_CID_ANY`).
const RESERVED_CIDS: [u32; 3] = [0, 1, u32::MAX];

/// The bind-only wildcard port (`VMADDR_PORT_ANY`).
const VMADDR_PORT_ANY: u32 = u32::MAX;

/// What a vsock URL looks like, for error messages.
const EXPECTED_VSOCK: &str = "vsock://CID:PORT/PATH with numbers for CID (2 is the host) and PORT";

/// A push URL as configured: plain `http://host[:port]/path`, where host may
/// be `{gateway}`, or `vsock://CID:PORT/PATH`. TLS is not built in
/// (docs/design.md#budgets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    raw: String,
}

/// Where a request goes: TCP to a host and port, or a vsock peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// TCP; the host is in the target's URI.
    Tcp,
    /// An AF_VSOCK stream to this context id and port.
    Vsock {
        /// The peer's context id; 2 is the host.
        cid: u32,
        /// The peer's vsock port.
        port: u32,
    },
}

/// A URL with its host known: what a request is sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The whole URL, as shown in logs and `/health`.
    pub url: String,
    /// The host: an address literal (brackets removed) or a name; empty
    /// for vsock.
    pub host: String,
    /// The port (80 when the URL names none; 0 for vsock).
    pub port: u16,
    /// How the connection is made.
    pub peer: Peer,
    /// The URI the request is made with: the URL itself for HTTP, its
    /// `http://localhost/PATH` form for vsock. Parsed once here rather
    /// than at every request.
    pub uri: Uri,
}

impl UrlTemplate {
    /// Checks the URL's shape; `off` is handled by the caller.
    pub fn parse(raw: &str) -> Result<UrlTemplate, String> {
        if is_vsock(raw) {
            VsockUrl::parse(raw)?;
        } else {
            parse_http(&raw.replace(GATEWAY, GATEWAY_STAND_IN))?;
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

    /// The target with `{gateway}` filled in; `None` when it needs a gateway
    /// and there is none.
    pub fn resolve(&self, gateway: Option<Ipv4Addr>) -> Option<Target> {
        // Every branch parses what already passed the same parser.
        if is_vsock(&self.raw) {
            return VsockUrl::parse(&self.raw).ok().map(|v| v.target());
        }
        let url = if self.needs_gateway() {
            self.raw.replace(GATEWAY, &gateway?.to_string())
        } else {
            self.raw.clone()
        };
        parse_http(&url).ok()
    }
}

impl Target {
    /// A target for a complete `http://` URL.
    pub fn http(url: &str) -> Result<Target, String> {
        parse_http(url)
    }

    /// The socket address, when the host is an address literal (a name
    /// would need a lookup; vsock has none).
    pub fn literal(&self) -> Option<SocketAddr> {
        match self.peer {
            Peer::Tcp => Some(SocketAddr::new(self.host.parse().ok()?, self.port)),
            Peer::Vsock { .. } => None,
        }
    }
}

/// Parses a complete `http://` URL into a [`Target`].
fn parse_http(url: &str) -> Result<Target, String> {
    // The parser drops a fragment without a word, and everything after
    // `#` with it: `http://h#x:9/p` would be sent to `http://h/`.
    if url.contains('#') {
        return Err(format!("{EXPECTED_URL} (no #fragment: it is never sent)"));
    }
    if let Some(c) = url.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("{EXPECTED_URL} (character {c:?} in the URL)"));
    }
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
        peer: Peer::Tcp,
        uri,
    })
}

/// Whether a configured URL is a vsock one.
pub fn is_vsock(url: &str) -> bool {
    url.starts_with(VSOCK_SCHEME)
}

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
    /// what is accepted. The path must be one an HTTP request line can
    /// carry: no spaces or control characters.
    pub fn parse(raw: &str) -> Result<VsockUrl, String> {
        let rest = raw
            .strip_prefix(VSOCK_SCHEME)
            .ok_or_else(|| EXPECTED_VSOCK.to_string())?;
        if rest.contains(char::is_whitespace) || rest.contains(['#', '@']) {
            return Err(format!(
                "{EXPECTED_VSOCK} (no spaces, fragment or user information)"
            ));
        }
        let at = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(at);
        let (cid, port) = authority
            .split_once(':')
            .ok_or_else(|| format!("{EXPECTED_VSOCK} (the port is missing)"))?;
        let cid: u32 = cid
            .parse()
            .map_err(|_| format!("{EXPECTED_VSOCK} (CID {cid:?} is not a number)"))?;
        if RESERVED_CIDS.contains(&cid) {
            return Err(format!(
                "{EXPECTED_VSOCK} (CID {cid} is reserved: 0 is the hypervisor, 1 this VM's own loopback)"
            ));
        }
        let port: u32 = port
            .parse()
            .map_err(|_| format!("{EXPECTED_VSOCK} (port {port:?} is not a number)"))?;
        if port == 0 || port == VMADDR_PORT_ANY {
            return Err(format!(
                "{EXPECTED_VSOCK} (port {port} is not 1-4294967294)"
            ));
        }
        let path = match path {
            "" => "/".to_string(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_string(),
        };
        if let Some(c) = path.chars().find(|c| c.is_control()) {
            return Err(format!(
                "{EXPECTED_VSOCK} (control character {c:?} in the path)"
            ));
        }
        let url = VsockUrl { cid, port, path };
        url.http_uri()
            .map_err(|_| format!("{EXPECTED_VSOCK} (the path is not a valid URL path)"))?;
        Ok(url)
    }

    /// The URI of requests over this peer.
    fn http_uri(&self) -> Result<Uri, http::uri::InvalidUri> {
        format!("http://{VSOCK_HTTP_HOST}{}", self.path).parse()
    }

    fn target(&self) -> Target {
        Target {
            url: self.to_string(),
            host: String::new(),
            port: 0,
            peer: Peer::Vsock {
                cid: self.cid,
                port: self.port,
            },
            // Checked in `parse`; the fallback is never reached.
            uri: self.http_uri().unwrap_or_default(),
        }
    }
}

impl fmt::Display for VsockUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{VSOCK_SCHEME}{}:{}{}", self.cid, self.port, self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(t("http://h").uri.path(), "/");
        assert_eq!(
            t("http://10.0.2.2:9/x?y=1").uri.path_and_query().unwrap(),
            "/x?y=1"
        );
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
            ("http://h/a\u{0}b", ""),
            ("http://h/a\u{7f}b", ""),
            ("", ""),
            // Found by the fuzz target `route_url` (docs/testing.md#fuzzing):
            // sent as http://10.0.2.2/ before.
            ("Http://{gateway}#8+6734/vguest-metrics", "fragment"),
            ("http://h:9/p#top", "fragment"),
            ("http://h:9/p\tq", "character '\\t'"),
        ] {
            let e = UrlTemplate::parse(bad).unwrap_err();
            assert!(e.starts_with("off, or http://"), "{bad:?}: {e}");
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    fn ok(raw: &str) -> VsockUrl {
        VsockUrl::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    fn err(raw: &str) -> String {
        VsockUrl::parse(raw).expect_err(raw)
    }

    #[test]
    fn vsock_host_cid_port_and_path() {
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
        assert_eq!(ok("vsock://2:52").path, "/");
        assert_eq!(ok("vsock://2:52?vm=a").path, "/?vm=a");
        assert_eq!(ok("vsock://2:52/x?vm=a").path, "/x?vm=a");
        let u = ok("vsock://3:4294967294/x");
        assert_eq!((u.cid, u.port), (3, u32::MAX - 1));
    }

    #[test]
    fn vsock_bad_cids_and_ports_are_named() {
        assert!(err("vsock://host:1024/x").contains("CID \"host\" is not a number"));
        assert!(err("vsock://{gateway}:1024/x").contains("is not a number"));
        assert!(err("vsock://-2:1024/x").contains("is not a number"));
        assert!(err("vsock://4294967296:1024/x").contains("is not a number"));
        assert!(err("vsock://:1024/x").contains("CID \"\" is not a number"));
        for reserved in ["0", "1", "4294967295"] {
            let e = err(&format!("vsock://{reserved}:1024/x"));
            assert!(e.contains(&format!("CID {reserved} is reserved")), "{e}");
        }
        assert!(err("vsock://2/x").contains("the port is missing"));
        assert!(err("vsock://2").contains("the port is missing"));
        assert!(err("vsock://2:/x").contains("port \"\" is not a number"));
        assert!(err("vsock://2:http/x").contains("port \"http\" is not a number"));
        assert!(err("vsock://2:1:2/x").contains("port \"1:2\" is not a number"));
        assert!(err("vsock://2:0/x").contains("port 0 is not"));
        assert!(err("vsock://2:4294967295/x").contains("port 4294967295 is not"));
    }

    #[test]
    fn vsock_other_shapes_and_control_characters_are_refused() {
        assert!(err("http://2:1024/x").starts_with("vsock://CID:PORT/PATH"));
        assert!(err("vsock://2:1024/a b").contains("no spaces"));
        assert!(err("vsock://u@2:1024/x").contains("user information"));
        assert!(err("vsock://2:1024/x#f").contains("fragment"));
        for c in ['\u{0}', '\u{1}', '\u{1b}', '\u{7f}', '\u{85}'] {
            let e = err(&format!("vsock://2:1024/a{c}b"));
            assert!(
                e.contains("control character") || e.contains("no spaces"),
                "{c:?}: {e}"
            );
        }
        assert!(err("vsock://2:1024/a\"b<>").contains("not a valid URL path"));
    }

    #[test]
    fn the_template_takes_vsock_urls() {
        let t = UrlTemplate::parse("vsock://2:1024/v1/guest-metrics?vm=a").unwrap();
        assert!(!t.needs_gateway());
        let target = t.resolve(None).expect("no gateway needed");
        assert_eq!(target.url, "vsock://2:1024/v1/guest-metrics?vm=a");
        assert_eq!(target.peer, Peer::Vsock { cid: 2, port: 1024 });
        assert_eq!(target.literal(), None);
        assert_eq!(
            target.uri.to_string(),
            "http://localhost/v1/guest-metrics?vm=a"
        );
        let e = UrlTemplate::parse("vsocks://2:1/x").unwrap_err();
        assert!(e.starts_with("off, or http://"), "{e}");
        assert!(is_vsock("vsock://2:1024/x") && !is_vsock("http://x/"));
    }
}
