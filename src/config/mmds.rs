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
const NOT_FROM_MMDS: [&str; 4] = ["proc_root", "mmds", "kmsg", "token_file"];

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
            Scalar::Nested => doc.warnings.push(format!(
                "mmds: {KEY}.{key} is not a string, number or boolean; ignored"
            )),
        }
    }
    Ok(doc)
}

/// A value of the settings object.
#[derive(Debug, PartialEq)]
enum Scalar {
    /// A string, or a number or boolean as written.
    Text(String),
    /// `null`: not set.
    Null,
    /// An object or array: no setting takes one.
    Nested,
}

/// Deepest nesting skipped inside a value.
const MAX_DEPTH: usize = 32;

/// Reads a JSON object whose values are scalars, keys and values in
/// document order. The agent otherwise only writes JSON, and serde_json's
/// parser for this one object would cost the static binary about 16 KB
/// (docs/snapshots.md#cost): this reader is the JSON grammar (RFC 8259)
/// for exactly this shape, nested values checked and skipped.
fn flat_object(b: &[u8]) -> std::result::Result<Vec<(String, Scalar)>, String> {
    let mut r = Reader { b, i: 0 };
    let mut out = Vec::new();
    r.expect(b'{')?;
    if !r.eat(b'}') {
        loop {
            r.expect(b'"')?;
            let key = r.string()?;
            r.expect(b':')?;
            r.ws();
            let value = match r.peek() {
                Some(b'{' | b'[') => {
                    r.skip(0)?;
                    Scalar::Nested
                }
                _ => r.scalar()?,
            };
            out.push((key, value));
            if r.eat(b'}') {
                break;
            }
            r.expect(b',')?;
        }
    }
    r.ws();
    if r.i != b.len() {
        return Err(r.error("end of the document"));
    }
    Ok(out)
}

/// JSON's number grammar, narrower than Rust's float syntax:
/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn is_json_number(w: &str) -> bool {
    let b = w.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn error(&self, expected: &str) -> String {
        format!(
            "not a JSON object of settings: expected {expected} at byte {}",
            self.i
        )
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// Skips white space, then takes `c` if it is next.
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        let found = self.peek() == Some(c);
        self.i += usize::from(found);
        found
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.error(&format!("{:?}", c as char)))
        }
    }

    /// The rest of a string whose opening quote was taken.
    fn string(&mut self) -> std::result::Result<String, String> {
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.error("the end of a string"));
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let unit = |r: &mut Self| -> std::result::Result<u16, String> {
                        let hex =
                            r.b.get(r.i..r.i + 4)
                                .and_then(|h| std::str::from_utf8(h).ok());
                        let unit = hex.and_then(|h| u16::from_str_radix(h, 16).ok());
                        r.i += 4;
                        unit.ok_or_else(|| r.error("four hex digits"))
                    };
                    let e = self.peek().ok_or_else(|| self.error("an escape"))?;
                    self.i += 1;
                    let ch = match e {
                        b'"' | b'\\' | b'/' => e as char,
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let mut units = vec![unit(self)?];
                            if (0xd800..0xdc00).contains(&units[0])
                                && self.b[self.i..].starts_with(b"\\u")
                            {
                                self.i += 2;
                                units.push(unit(self)?);
                            }
                            char::decode_utf16(units)
                                .next()
                                .and_then(|c| c.ok())
                                .ok_or_else(|| self.error("a valid \\u escape"))?
                        }
                        _ => return Err(self.error("a valid escape")),
                    };
                    out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                }
                0..0x20 => return Err(self.error("no control character in a string")),
                _ => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| self.error("UTF-8 text"))
    }

    /// A string, number, boolean or null.
    fn scalar(&mut self) -> std::result::Result<Scalar, String> {
        self.ws();
        if self.eat(b'"') {
            return self.string().map(Scalar::Text);
        }
        let start = self.i;
        while matches!(
            self.peek(),
            Some(b'a'..=b'z' | b'0'..=b'9' | b'-' | b'+' | b'.' | b'E')
        ) {
            self.i += 1;
        }
        let word = std::str::from_utf8(&self.b[start..self.i]).unwrap_or_default();
        match word {
            "null" => Ok(Scalar::Null),
            "true" | "false" => Ok(Scalar::Text(word.to_string())),
            w if is_json_number(w) => Ok(Scalar::Text(w.to_string())),
            _ => {
                self.i = start;
                Err(self.error("a string, number, true, false or null"))
            }
        }
    }

    /// Checks and skips any value, objects and arrays up to [`MAX_DEPTH`].
    fn skip(&mut self, depth: usize) -> std::result::Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(self.error(&format!("at most {MAX_DEPTH} levels of nesting")));
        }
        let (open, close) = if self.eat(b'{') {
            (true, b'}')
        } else if self.eat(b'[') {
            (false, b']')
        } else {
            return self.scalar().map(|_| ());
        };
        if self.eat(close) {
            return Ok(());
        }
        loop {
            if open {
                self.expect(b'"')?;
                self.string()?;
                self.expect(b':')?;
            }
            self.skip(depth + 1)?;
            if self.eat(close) {
                return Ok(());
            }
            self.expect(b',')?;
        }
    }
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
    fn the_object_reader_follows_json() {
        let text = |s: &str| Scalar::Text(s.to_string());
        assert_eq!(
            flat_object(
                br#" { "a" : "x\"y\\z\/\n\u00e9\ud83d\ude00" , "b":-1.5e+3,"c":0,"d":true,
                   "e":null, "f": {"g": [1, {"h": "}"}, []]}, "i": [] } "#
            )
            .unwrap(),
            vec![
                ("a".to_string(), text("x\"y\\z/\n\u{e9}\u{1f600}")),
                ("b".to_string(), text("-1.5e+3")),
                ("c".to_string(), text("0")),
                ("d".to_string(), text("true")),
                ("e".to_string(), Scalar::Null),
                ("f".to_string(), Scalar::Nested),
                ("i".to_string(), Scalar::Nested),
            ]
        );
        assert_eq!(flat_object(b"{}").unwrap(), vec![]);
        assert_eq!(
            flat_object("{\"v\": \"ü\"}".as_bytes()).unwrap(),
            vec![("v".to_string(), text("ü"))]
        );
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
            b"{\"a\": \"\\udc00\"}",
            b"{\"a\": \"tab\there\"}",
            b"{\"a\": \"\xff\"}",
            b"{\"a\": [1 2]}",
            b"{\"a\": {1: 2}}",
            b"{\"a\": \"unterminated}",
        ] {
            assert!(
                flat_object(bad).is_err(),
                "{:?} must be refused",
                String::from_utf8_lossy(bad)
            );
        }
        let deep = format!("{{\"a\": {}{}}}", "[".repeat(40), "]".repeat(40));
        assert!(flat_object(deep.as_bytes()).is_err(), "nesting is bounded");
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
