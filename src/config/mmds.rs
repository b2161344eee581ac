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

use std::net::SocketAddr;
use std::time::Duration;

use http::Method;

use crate::error::{Error, Result};
use crate::net::client::{Client, MAX_RESPONSE_BODY};
use crate::net::json::{Scalar, flat_object};
use crate::net::url::Target;

/// The key of the metadata document whose object holds the settings.
pub const KEY: &str = "guest_agent";

/// Deadline of each of the two requests (token, document), connection
/// included. MMDS is served by the VMM on the guest's own link and answers
/// in well under a millisecond; an address nobody answers costs a boot at
/// most twice this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

/// Lifetime asked for the session token: it is used at once and dropped.
pub const TOKEN_TTL_SECONDS: u32 = 60;

/// Settings MMDS may not set: where the agent reads its own sources from.
const NOT_FROM_MMDS: [&str; 5] = ["proc_root", "mmds", "kmsg", "token_file", "key_file"];

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
    let mut doc = Document::default();
    for (key, value) in flat_object(body)? {
        let name = key.replace('-', "_");
        let Some(s) = super::settings::setting(&name).filter(|s| !NOT_FROM_MMDS.contains(&s.name))
        else {
            doc.warnings.push(format!(
                "mmds: unknown or not settable key {KEY}.{key} ignored"
            ));
            continue;
        };
        match value {
            Scalar::Text(text) => doc.entries.push((s.name, text)),
            Scalar::Null => {}
            Scalar::Nested(_) => doc.warnings.push(format!(
                "mmds: {KEY}.{key} is not a string, number or boolean; ignored"
            )),
        }
    }
    Ok(doc)
}

/// Fetches and parses the document at `addr`: a session token, then
/// `GET /guest_agent` as JSON. Each request is bounded by [`REQUEST_TIMEOUT`].
pub fn fetch(addr: SocketAddr) -> Result<Document> {
    let mut client = Client::tcp(REQUEST_TIMEOUT);
    let err = |url: &str, reason: String| Error::Network {
        target: url.to_string(),
        reason: format!("mmds: {reason}"),
    };
    // The status and the whole body (an answer cut off or too long is an
    // error, not an empty document).
    let mut ask = |method: Method, path: &str, headers: &[(&'static str, &str)], body| {
        let url = format!("http://{addr}{path}");
        let target = Target::http(&url).map_err(|e| err(&url, e))?;
        let answer = client
            .request(method, &target, headers, body, None)
            .map_err(|e| err(&url, e.to_string()))?;
        if !answer.complete {
            return Err(err(
                &url,
                format!(
                    "HTTP {}, with a body over {MAX_RESPONSE_BODY} bytes",
                    answer.status
                ),
            ));
        }
        Ok::<_, Error>((url, answer.status, client.body().to_vec()))
    };

    let ttl = TOKEN_TTL_SECONDS.to_string();
    let (token_url, status, token) = ask(
        Method::PUT,
        "/latest/api/token",
        &[("x-metadata-token-ttl-seconds", &ttl)],
        Some(b""),
    )?;
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

    let (doc_url, status, body) = ask(
        Method::GET,
        &format!("/{KEY}"),
        &[("x-metadata-token", token), ("accept", "application/json")],
        None,
    )?;
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
    fn document_keys_are_setting_names() {
        let doc = parse_document(
            br#"{"vm_id": "clone-a", "interval": "2s", "batch": 50, "listen": null,
                 "proc-root": "/x", "mmds": "off", "colour": "blue", "url": {"a": 1}}"#,
        )
        .unwrap();
        assert_eq!(
            doc.entries,
            vec![
                ("vm_id", "clone-a".to_string()),
                ("interval", "2s".to_string()),
                ("batch", "50".to_string()),
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
    fn a_service_that_issues_no_token_is_an_error() {
        // A service that does not speak V2 answers the token PUT with 405:
        // reported with its status, and no GET is tried without a token.
        let mmds = MmdsStandIn::start(r#"{"guest_agent": {"vm_id": "x"}}"#);
        mmds.refuse_tokens();
        let e = fetch(mmds.addr()).unwrap_err().to_string();
        assert!(e.contains("mmds") && e.contains("HTTP 405"), "{e}");
        assert!(mmds.requests().iter().all(|r| r.method == "PUT"));
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
