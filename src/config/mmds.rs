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
//!
//! The document is read by serde_json into [`Members`]: the object's
//! members in document order, each a value a setting can take or one it
//! cannot. It is bounded as every answer is, at most [`MAX_RESPONSE_BODY`]
//! bytes; a nested value, which no setting takes, is read past by
//! serde_json without recursion (a stack of one byte per level), so no
//! nesting can exhaust the stack.

use std::net::SocketAddr;
use std::time::Duration;

use http::Method;
use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::{Error, Result};
use crate::net::client::{Client, MAX_RESPONSE_BODY};
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
const NOT_FROM_MMDS: [&str; 6] = [
    "proc_root",
    "sys_root",
    "mmds",
    "kmsg",
    "token_file",
    "key_file",
];

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

/// One member's value, as a setting would take it.
#[derive(Debug, PartialEq)]
enum Member {
    /// A string, a boolean or a number, as text (`50`, `true`).
    Text(String),
    /// `null`: the member is absent.
    Null,
    /// An object or an array, which no setting takes; read past, not kept.
    Nested,
}

impl<'de> Deserialize<'de> for Member {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Member;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Member, E> {
                Ok(Member::Text(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> std::result::Result<Member, E> {
                Ok(Member::Text(v))
            }
            fn visit_bool<E>(self, v: bool) -> std::result::Result<Member, E> {
                Ok(Member::Text(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> std::result::Result<Member, E> {
                Ok(Member::Text(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> std::result::Result<Member, E> {
                Ok(Member::Text(v.to_string()))
            }
            // A fraction or exponent reaches the setting's check in Rust's
            // shortest form (`1e3` as `1000`); no setting takes one.
            fn visit_f64<E>(self, v: f64) -> std::result::Result<Member, E> {
                Ok(Member::Text(v.to_string()))
            }
            fn visit_unit<E>(self) -> std::result::Result<Member, E> {
                Ok(Member::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> std::result::Result<Member, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| Member::Nested)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> std::result::Result<Member, A::Error> {
                IgnoredAny.visit_map(map).map(|_| Member::Nested)
            }
        }
        d.deserialize_any(V)
    }
}

/// The members of the object under [`KEY`] in document order, a key given
/// twice kept twice (the later one wins when the settings are merged).
#[derive(Debug, PartialEq)]
struct Members(Vec<(String, Member)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "the {KEY} object of settings")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Members, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses the JSON of the object under [`KEY`] (as `GET /guest_agent`
/// returns it). `-` and `_` are equivalent in keys, as on the cmdline. A
/// member no setting takes is a warning that names it; JSON that is not an
/// object is an error with serde_json's line and column.
pub fn parse_document(body: &[u8]) -> std::result::Result<Document, String> {
    // JSON is UTF-8 (RFC 8259), and serde_json checks it only in what it
    // keeps: checked here for the whole answer, read past parts included.
    let text = std::str::from_utf8(body)
        .map_err(|e| format!("the {KEY} document is not UTF-8 (byte {})", e.valid_up_to()))?;
    let Members(members) = serde_json::from_str(text)
        .map_err(|e| format!("the {KEY} document is not a JSON object of settings: {e}"))?;
    let mut doc = Document::default();
    for (key, value) in members {
        let name = key.replace('-', "_");
        let Some(s) = super::settings::setting(&name).filter(|s| !NOT_FROM_MMDS.contains(&s.name))
        else {
            doc.warnings.push(format!(
                "mmds: unknown or not settable key {KEY}.{key} ignored"
            ));
            continue;
        };
        match value {
            Member::Text(text) => doc.entries.push((s.name, text)),
            Member::Null => {}
            Member::Nested => doc.warnings.push(format!(
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
        let e = parse_document(br#"{"vm_id": "a",}"#).unwrap_err();
        assert!(e.contains("guest_agent") && e.contains("column"), "{e}");
        let bad = parse_document(br#"{"vm_id": ""}"#).unwrap();
        assert_eq!(bad.vm_id(), None, "an invalid vm_id is not an identity");
    }

    #[test]
    fn values_are_read_as_json_says() {
        let doc = parse_document(
            br#" { "vm_id" : "x\"y\\z\/\u00e9\ud83d\ude00" , "batch": 0, "buffer": -1,
                   "timeout": -1.5e+3, "log": true, "format": null,
                   "url": {"g": [1, {"h": "}"}, []]}, "interval": [] } "#,
        )
        .unwrap();
        assert_eq!(
            doc.entries,
            vec![
                ("vm_id", "x\"y\\z/\u{e9}\u{1f600}".to_string()),
                ("batch", "0".to_string()),
                ("buffer", "-1".to_string()),
                ("timeout", "-1500".to_string()),
                ("log", "true".to_string()),
            ]
        );
        assert_eq!(doc.warnings.len(), 2, "{:?}", doc.warnings);
        assert!(doc.warnings[0].contains("guest_agent.url"));
        assert!(doc.warnings[1].contains("guest_agent.interval"));
        assert_eq!(parse_document(b"{}").unwrap(), Document::default());
        assert_eq!(
            parse_document("{\"vm_id\": \"ü\"}".as_bytes())
                .unwrap()
                .entries,
            vec![("vm_id", "ü".to_string())]
        );
        // A key given twice is kept twice, in order: the later one wins.
        let twice = parse_document(br#"{"vm-id": "a", "vm_id": "b"}"#).unwrap();
        assert_eq!(twice.vm_id().as_deref(), Some("b"));
    }

    #[test]
    fn what_is_not_json_is_refused() {
        for bad in [
            &b""[..],
            b"[]",
            b"\"x\"",
            b"{",
            b"{\"a\"}",
            b"{\"a\": }",
            b"{\"a\": 1,}",
            b"{\"a\": 1} x",
            b"{\"a\": 01}",
            b"{\"a\": +1}",
            b"{\"a\": .5}",
            b"{\"a\": 1.}",
            b"{\"a\": nan}",
            b"{\"a\": True}",
            b"{\"a\": \"\\x\"}",
            b"{\"a\": \"\\u12\"}",
            // Found by the fuzz target `mmds` in the hand-written reader
            // this one replaced (docs/testing.md#fuzzing).
            b"{\"a\": \"\\u+00e9\"}",
            b"{\"a\": \"\\ud83d\\u+e00\"}",
            b"{\"a\": \"\\udc00\"}",
            b"{\"a\": \"tab\there\"}",
            b"{\"a\": \"\xff\"}",
            // Found by the fuzz target `mmds`: serde_json checks UTF-8 only
            // in the strings it keeps, not in a value it reads past.
            b"{\"url\": [\"\xff\"]}",
            b"{\"a\": [1 2]}",
            b"{\"a\": {1: 2}}",
            b"{\"a\": \"unterminated}",
        ] {
            assert!(
                parse_document(bad).is_err(),
                "{:?} must be refused",
                String::from_utf8_lossy(bad)
            );
        }
        // A nested value is read past without recursion, so no depth can
        // exhaust the stack: a whole answer's worth of brackets.
        let n = MAX_RESPONSE_BODY / 2 - 8;
        let deep = format!("{{\"url\": {}{}}}", "[".repeat(n), "]".repeat(n));
        assert_eq!(parse_document(deep.as_bytes()).unwrap().warnings.len(), 1);
        let unclosed = format!("{{\"url\": {}}}", "[".repeat(n));
        assert!(parse_document(unclosed.as_bytes()).is_err());
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
