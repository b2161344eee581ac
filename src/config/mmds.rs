//! Firecracker's metadata service (MMDS) as a configuration source
//! (docs/snapshots.md#mmds-identity-per-clone).
//!
//! Clones of one snapshot share their kernel command line and conf file, so
//! neither can tell them apart; the host can give each clone its own MMDS
//! document. The agent reads the object under [`KEY`] (`{"guest_agent":
//! {"vm_id": "clone-a"}}`), whose keys are the settings' names, at start and
//! again after each restore. MMDS is opt-in (`mmds=on` or `mmds=ADDR[:PORT]`):
//! a guest without it never waits on it, and with it every request has a
//! short deadline ([`REQUEST_TIMEOUT`]). Only MMDS version 2 is spoken: a
//! session token from `PUT /latest/api/token`, then a `GET` carrying it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::error::{Error, Result};

/// Where Firecracker's MMDS answers unless the host chose another address.
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), 80);

/// The key of the metadata document whose object holds the settings.
pub const KEY: &str = "guest_agent";

/// Deadline of each of the two requests (token, document), connection
/// included. MMDS is served by the VMM on the guest's own link and answers
/// in well under a millisecond; an address nobody answers costs a boot at
/// most twice this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

/// Lifetime asked for the session token: it is used at once and dropped.
pub const TOKEN_TTL_SECONDS: u32 = 60;

/// Largest token or document read.
pub const MAX_BODY: u64 = 64 * 1024;

/// Settings MMDS may not set: where the agent reads its own sources from.
const NOT_FROM_MMDS: [&str; 4] = ["proc_root", "mmds", "kmsg", "token_file"];

/// Parses the `mmds` setting: `off`, `on` (the default address), or an
/// address with an optional port (80).
pub fn parse_setting(v: &str) -> std::result::Result<Option<SocketAddr>, String> {
    let expected = "off, on, or ADDR[:PORT] such as 169.254.169.254 or 10.0.2.100:80";
    match v.trim() {
        "off" => Ok(None),
        "on" => Ok(Some(DEFAULT_ADDR)),
        v => {
            let addr = v
                .parse::<SocketAddr>()
                .or_else(|_| v.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 80)))
                .map_err(|_| expected.to_string())?;
            if addr.port() == 0 {
                return Err(expected.into());
            }
            Ok(Some(addr))
        }
    }
}

/// The settings found under [`KEY`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Document {
    /// `(setting name, value)` pairs, values as written (numbers as text).
    pub entries: Vec<(&'static str, String)>,
    /// What was skipped and why (unknown keys, values of the wrong type).
    pub warnings: Vec<String>,
}

impl Document {
    /// The `vm_id` the document gives, if it gives a valid one.
    pub fn vm_id(&self) -> Option<String> {
        let check = super::settings::setting("vm_id")?.check;
        self.entries
            .iter()
            .rev()
            .find(|(n, v)| *n == "vm_id" && check(v).is_ok())
            .map(|(_, v)| v.clone())
    }
}

/// Parses the JSON of the object under [`KEY`] (as `GET /guest_agent`
/// returns it). `-` and `_` are equivalent in keys, as on the cmdline.
pub fn parse_document(body: &[u8]) -> std::result::Result<Document, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let serde_json::Value::Object(obj) = value else {
        return Err(format!("{KEY} is not a JSON object"));
    };
    let mut doc = Document::default();
    for (key, v) in obj {
        let name = key.replace('-', "_");
        let Some(s) = super::settings::setting(&name).filter(|s| !NOT_FROM_MMDS.contains(&s.name))
        else {
            doc.warnings.push(format!(
                "mmds: unknown or not settable key {KEY}.{key} ignored"
            ));
            continue;
        };
        let text = match v {
            serde_json::Value::String(t) => t,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Null => continue,
            _ => {
                doc.warnings.push(format!(
                    "mmds: {KEY}.{key} is not a string or number; ignored"
                ));
                continue;
            }
        };
        doc.entries.push((s.name, text));
    }
    Ok(doc)
}

/// Fetches and parses the document at `addr`: a session token, then
/// `GET /guest_agent` as JSON. Each request is bounded by [`REQUEST_TIMEOUT`].
pub fn fetch(addr: SocketAddr) -> Result<Document> {
    let base = format!("http://{addr}");
    // The push client: no proxy, no redirects, statuses as values. One
    // client type in the binary instead of two (docs/snapshots.md#cost).
    let agent = crate::push::http_agent(REQUEST_TIMEOUT);
    let err = |url: &str, reason: String| Error::Network {
        target: url.to_string(),
        reason: format!("mmds: {reason}"),
    };

    let token_url = format!("{base}/latest/api/token");
    let mut resp = agent
        .put(&token_url)
        .header(
            "X-metadata-token-ttl-seconds",
            TOKEN_TTL_SECONDS.to_string(),
        )
        .send_empty()
        .map_err(|e| err(&token_url, e.to_string()))?;
    let status = resp.status().as_u16();
    let token = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_vec()
        .map_err(|e| err(&token_url, format!("HTTP {status}, then {e}")))?;
    if status != 200 {
        return Err(err(
            &token_url,
            format!("HTTP {status} for a session token"),
        ));
    }
    let token = String::from_utf8_lossy(&token);
    let token = token.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err(
            &token_url,
            "the session token is not printable text".into(),
        ));
    }

    let doc_url = format!("{base}/{KEY}");
    let mut resp = agent
        .get(&doc_url)
        .header("X-metadata-token", token)
        .header("Accept", "application/json")
        .call()
        .map_err(|e| err(&doc_url, e.to_string()))?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_vec()
        .map_err(|e| err(&doc_url, format!("HTTP {status}, then {e}")))?;
    match status {
        200 => parse_document(&body).map_err(|e| err(&doc_url, e)),
        // No key for the agent (or nothing put into MMDS yet): no settings.
        404 => Ok(Document {
            entries: Vec::new(),
            warnings: vec![format!("mmds: {doc_url} has no {KEY} object (HTTP 404)")],
        }),
        _ => Err(err(&doc_url, format!("HTTP {status}"))),
    }
}

#[cfg(test)]
#[path = "../../tests/snapshot_harness/mmds_stand_in.rs"]
mod mmds_stand_in;

#[cfg(test)]
mod tests {
    use super::mmds_stand_in::MmdsStandIn;
    use super::*;

    #[test]
    fn setting_values() {
        assert_eq!(parse_setting("off"), Ok(None));
        assert_eq!(parse_setting("on"), Ok(Some(DEFAULT_ADDR)));
        assert_eq!(
            parse_setting("10.0.2.100"),
            Ok(Some("10.0.2.100:80".parse().unwrap()))
        );
        assert_eq!(
            parse_setting("127.0.0.1:8123"),
            Ok(Some("127.0.0.1:8123".parse().unwrap()))
        );
        assert!(parse_setting("[::1]:80").is_ok());
        for bad in ["", "yes", "host.example:80", "10.0.2.100:0", "10.0.2.100:x"] {
            assert!(parse_setting(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn document_keys_are_setting_names() {
        let doc = parse_document(
            br#"{"vm_id": "clone-a", "interval": "2s", "batch": 50, "listen": null,
                 "proc-root": "/x", "mmds": "off", "colour": "blue", "url": {"a": 1}}"#,
        )
        .unwrap();
        assert_eq!(
            doc.entries,
            vec![
                ("batch", "50".to_string()),
                ("interval", "2s".to_string()),
                ("vm_id", "clone-a".to_string()),
            ]
        );
        assert_eq!(doc.vm_id().as_deref(), Some("clone-a"));
        assert_eq!(doc.warnings.len(), 4, "{:?}", doc.warnings);
        assert!(parse_document(b"[1]").is_err());
        assert!(parse_document(b"{").is_err());
        let bad = parse_document(br#"{"vm_id": ""}"#).unwrap();
        assert_eq!(bad.vm_id(), None, "an invalid vm_id is not an identity");
    }

    #[test]
    fn v2_session_then_document() {
        let mmds = MmdsStandIn::start(r#"{"guest_agent": {"vm_id": "clone-b", "token": "t0p"}}"#);
        let doc = fetch(mmds.addr()).unwrap();
        assert_eq!(doc.vm_id().as_deref(), Some("clone-b"));
        assert!(doc.entries.contains(&("token", "t0p".to_string())));
        let log = mmds.requests();
        assert_eq!(log.len(), 2, "{log:?}");
        assert_eq!(log[0].method, "PUT");
        assert_eq!(log[0].path, "/latest/api/token");
        assert_eq!(
            log[0].header("x-metadata-token-ttl-seconds"),
            Some(TOKEN_TTL_SECONDS.to_string().as_str())
        );
        assert_eq!(log[1].method, "GET");
        assert_eq!(log[1].path, "/guest_agent");
        assert_eq!(log[1].header("accept"), Some("application/json"));
        assert!(log[1].header("x-metadata-token").is_some());
    }

    #[test]
    fn a_document_changed_by_the_host_is_read_again() {
        let mmds = MmdsStandIn::start(r#"{"guest_agent": {"vm_id": "parent"}}"#);
        assert_eq!(
            fetch(mmds.addr()).unwrap().vm_id().as_deref(),
            Some("parent")
        );
        mmds.set_document(r#"{"guest_agent": {"vm_id": "clone-a"}}"#);
        assert_eq!(
            fetch(mmds.addr()).unwrap().vm_id().as_deref(),
            Some("clone-a")
        );
    }

    #[test]
    fn no_key_for_the_agent_is_no_settings() {
        let mmds = MmdsStandIn::start(r#"{"latest": {"meta-data": {}}}"#);
        let doc = fetch(mmds.addr()).unwrap();
        assert!(doc.entries.is_empty());
        assert_eq!(doc.warnings.len(), 1);
    }

    #[test]
    fn a_get_without_a_valid_token_is_refused_and_reported() {
        // The stand-in answers 401 to a GET whose token it did not issue, as
        // MMDS V2 does; a server that issues none is an error, not a hang.
        let mmds = MmdsStandIn::start(r#"{"guest_agent": {"vm_id": "x"}}"#);
        mmds.refuse_tokens();
        let e = fetch(mmds.addr()).unwrap_err().to_string();
        assert!(e.contains("mmds") && e.contains("HTTP 405"), "{e}");
    }

    #[test]
    fn nobody_listening_fails_quickly_with_the_address() {
        // A port just released on loopback: connection refused.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = fetch(addr).unwrap_err().to_string();
        assert!(e.contains(&addr.to_string()), "{e}");
    }
}
