//! Every request to the manager signed with the VM's own key
//! (docs/security.md): the keys, their derivation, and the headers.
//!
//! A manager holds *master keys* (lines `KID HEX`); the key of one VM is
//! HMAC-SHA256 of a master key over `guest-agent vm key v1`, a 0x00 byte
//! and the VM id, so the manager stores nothing per VM and a VM's key
//! signs for that VM only. A request carries an RFC 9530
//! `Content-Digest` (sha-256) of its body and an RFC 9421 signature
//! labelled [`LABEL`] over `@method`, `@path` and `content-digest`, with
//! `created` and `keyid="KID/VM_ID"`. The agent writes these headers
//! (fixed text, no parser needed); the ingest kit reads them back
//! ([`verify`]).

pub mod fields;
pub mod verify;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The signature's label in `Signature-Input` and `Signature`.
pub const LABEL: &str = "ga";
/// The only algorithm: the `alg` parameter.
pub const ALG: &str = "hmac-sha256";
/// The covered components, in the order the agent lists them.
pub const COMPONENTS: [&str; 3] = ["@method", "@path", "content-digest"];
/// What a VM key is derived over, before the 0x00 byte and the VM id.
pub const KEY_CONTEXT: &[u8] = b"guest-agent vm key v1";
/// Bytes of every key, master or VM: 64 hex digits.
pub const KEY_BYTES: usize = 32;
/// Longest key id.
pub const MAX_KID: usize = 16;
/// Longest VM id in a `keyid` (the agent's `vm_id` bound).
pub const MAX_VM_ID: usize = 256;

type HmacSha256 = Hmac<Sha256>;

/// A key and its id: a master key, or a VM key derived from one (which
/// keeps its master's id). `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    kid: String,
    bytes: [u8; KEY_BYTES],
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}, hidden)", self.kid)
    }
}

/// Whether `kid` is a key id: 1 to [`MAX_KID`] of `[A-Za-z0-9._-]`.
pub fn valid_kid(kid: &str) -> bool {
    (1..=MAX_KID).contains(&kid.len())
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `vm_id` can be signed for: 1 to [`MAX_VM_ID`] of RFC 3986's
/// unreserved characters, so the first `/` of a `keyid` ends the KID.
pub fn valid_vm_id(vm_id: &str) -> bool {
    (1..=MAX_VM_ID).contains(&vm_id.len())
        && vm_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

impl Key {
    /// A key from its id and bytes; the id must pass [`valid_kid`].
    pub fn new(kid: &str, bytes: [u8; KEY_BYTES]) -> Result<Key, String> {
        if !valid_kid(kid) {
            return Err(format!(
                "key id {kid:?}: expected 1 to {MAX_KID} letters, digits, '.', '_' or '-'"
            ));
        }
        Ok(Key {
            kid: kid.to_string(),
            bytes,
        })
    }

    /// Parses one line `KID HEX` (HEX: 64 hex digits). The message never
    /// repeats the key's digits.
    pub fn parse_line(line: &str) -> Result<Key, String> {
        let mut words = line.split_ascii_whitespace();
        let (Some(kid), Some(hex), None) = (words.next(), words.next(), words.next()) else {
            return Err("expected one line KID HEX (a key id, a space, 64 hex digits)".into());
        };
        let digits = hex.as_bytes();
        if digits.len() != KEY_BYTES * 2 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(format!(
                "key {kid}: expected {} hex digits, found {} characters",
                KEY_BYTES * 2,
                hex.chars().count()
            ));
        }
        let mut bytes = [0u8; KEY_BYTES];
        for (i, pair) in digits.chunks_exact(2).enumerate() {
            bytes[i] = (nibble(pair[0]) << 4) | nibble(pair[1]);
        }
        Key::new(kid, bytes)
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The key's bytes.
    pub fn bytes(&self) -> &[u8; KEY_BYTES] {
        &self.bytes
    }

    /// The line `KID HEX`: what a VM's `key` setting or key file holds.
    pub fn to_line(&self) -> String {
        let mut line = format!("{} ", self.kid);
        for b in self.bytes {
            line.push_str(&format!("{b:02x}"));
        }
        line
    }

    /// The key of VM `vm_id` derived from this master key:
    /// HMAC-SHA256(master, `guest-agent vm key v1` 0x00 `vm_id`), with the
    /// master's id.
    pub fn derive(&self, vm_id: &str) -> Key {
        let mut mac = self.mac();
        mac.update(KEY_CONTEXT);
        mac.update(&[0]);
        mac.update(vm_id.as_bytes());
        Key {
            kid: self.kid.clone(),
            bytes: mac.finalize().into_bytes().into(),
        }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes a key of any length: this cannot fail.
        <HmacSha256 as Mac>::new_from_slice(&self.bytes).unwrap_or_else(|_| unreachable!())
    }
}

fn nibble(h: u8) -> u8 {
    match h {
        b'0'..=b'9' => h - b'0',
        b'a'..=b'f' => h - b'a' + 10,
        _ => h - b'A' + 10,
    }
}

/// Parses a master key file: one `KID HEX` per line; blank lines and `#`
/// comments are skipped. The first key derives new VM keys; every one is
/// accepted (rotation). Errors name the line; a key id listed twice is one.
pub fn parse_keys(text: &str) -> Result<Vec<Key>, String> {
    let mut keys: Vec<Key> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = Key::parse_line(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        if keys.iter().any(|k| k.kid == key.kid) {
            return Err(format!("line {}: key id {} listed twice", n + 1, key.kid));
        }
        keys.push(key);
    }
    if keys.is_empty() {
        return Err("no key: expected lines KID HEX".into());
    }
    Ok(keys)
}

/// HMAC-SHA256 of `message` under `key` (any length).
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// The RFC 9530 `Content-Digest` value of `body`: `sha-256=:BASE64:`.
pub fn content_digest(body: &[u8]) -> String {
    format!("sha-256=:{}:", BASE64.encode(Sha256::digest(body)))
}

/// The RFC 9421 signature base: one line `"name": value` per covered
/// component, then `"@signature-params": PARAMS`, joined by `\n` with no
/// final newline.
pub fn signature_base(components: &[(&str, &str)], params: &str) -> String {
    let mut base = String::new();
    for (name, value) in components {
        base.push_str(&format!("\"{name}\": {value}\n"));
    }
    base.push_str(&format!("\"@signature-params\": {params}"));
    base
}

/// The three headers of a signed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Headers {
    /// `Content-Digest`.
    pub content_digest: String,
    /// `Signature-Input`.
    pub signature_input: String,
    /// `Signature`.
    pub signature: String,
}

/// The `@path` of a request target: its path without the query; `/` when
/// empty.
pub fn request_path(target: &str) -> &str {
    let path = target.split(['?', '#']).next().unwrap_or("");
    if path.is_empty() { "/" } else { path }
}

/// Signs a request to `path` (the `@path`) with `key`, the key of VM
/// `vm_id`, at `created` (unix seconds).
pub fn sign(
    key: &Key,
    vm_id: &str,
    method: &str,
    path: &str,
    body: &[u8],
    created: u64,
) -> Headers {
    let content_digest = content_digest(body);
    let params = format!(
        "(\"@method\" \"@path\" \"content-digest\");created={created};keyid=\"{}/{vm_id}\";alg=\"{ALG}\"",
        key.kid
    );
    let base = signature_base(
        &[
            ("@method", method),
            ("@path", request_path(path)),
            ("content-digest", &content_digest),
        ],
        &params,
    );
    let mac = hmac_sha256(&key.bytes, base.as_bytes());
    Headers {
        signature_input: format!("{LABEL}={params}"),
        signature: format!("{LABEL}=:{}:", BASE64.encode(mac)),
        content_digest,
    }
}

/// The current time in unix seconds (0 before 1970: a clock never set).
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A VM's signing identity, shared by every client that talks to the
/// manager and replaced in place when the key is read again after a
/// refusal or a restore (docs/security.md#rotation).
#[derive(Debug)]
pub struct Credentials {
    current: Mutex<(String, Key)>,
}

impl Credentials {
    /// Credentials of VM `vm_id` with its `key`.
    pub fn new(vm_id: &str, key: Key) -> Arc<Credentials> {
        Arc::new(Credentials {
            current: Mutex::new((vm_id.to_string(), key)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, (String, Key)> {
        // Two plain values replaced together: never left half-written.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the VM id and key; true when either changed.
    pub fn replace(&self, vm_id: &str, key: Key) -> bool {
        let mut cur = self.lock();
        let changed = cur.0 != vm_id || cur.1 != key;
        *cur = (vm_id.to_string(), key);
        changed
    }

    /// The VM id signed for.
    pub fn vm_id(&self) -> String {
        self.lock().0.clone()
    }

    /// The key id in use.
    pub fn kid(&self) -> String {
        self.lock().1.kid.clone()
    }

    /// The headers for a request, created now.
    pub fn sign(&self, method: &str, path: &str, body: &[u8]) -> Headers {
        let cur = self.lock();
        sign(&cur.1, &cur.0, method, path, body, now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> Vec<u8> {
        BASE64.decode(s).unwrap()
    }

    /// RFC 9421 Appendix B.2.5: hmac-sha256 over the test request with the
    /// key `test-shared-secret`.
    #[test]
    fn rfc9421_b25_hmac_sha256() {
        let secret = b64(
            "uzvJfB4u3N0Jy4T7NZ75MDVcr8zSTInedJtkgcu46YW4XByzNJjxBdtjUkdJPBtbmHhIDi6pcl8jsasjlTMtDQ==",
        );
        let params =
            r#"("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret""#;
        let base = signature_base(
            &[
                ("date", "Tue, 20 Apr 2021 02:07:55 GMT"),
                ("@authority", "example.com"),
                ("content-type", "application/json"),
            ],
            params,
        );
        assert_eq!(
            base,
            "\"date\": Tue, 20 Apr 2021 02:07:55 GMT\n\"@authority\": example.com\n\
             \"content-type\": application/json\n\"@signature-params\": (\"date\" \
             \"@authority\" \"content-type\");created=1618884473;keyid=\"test-shared-secret\""
        );
        assert_eq!(
            BASE64.encode(hmac_sha256(&secret, base.as_bytes())),
            "pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8="
        );
    }

    /// RFC 9530 Appendix B: the sha-256 digest of `{"hello": "world"}`,
    /// and of an empty body.
    #[test]
    fn rfc9530_content_digests() {
        assert_eq!(
            content_digest(br#"{"hello": "world"}"#),
            "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
        );
        assert_eq!(
            content_digest(b""),
            "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
        );
    }

    #[test]
    fn key_lines_parse_and_print_back() {
        let line = format!("k1 {}", "0f".repeat(32));
        let key = Key::parse_line(&line).unwrap();
        assert_eq!(key.kid(), "k1");
        assert_eq!(key.bytes(), &[0x0f; 32]);
        assert_eq!(key.to_line(), line);
        assert_eq!(format!("{key:?}"), "Key(k1, hidden)");
        let upper = Key::parse_line(&format!("k1 {}", "AB".repeat(32))).unwrap();
        assert_eq!(upper.bytes(), &[0xab; 32]);
        for bad in [
            String::new(),
            "k1".into(),
            format!("k1 {}", "0".repeat(63)),
            format!("k1 {}", "g".repeat(64)),
            format!("k/1 {}", "0".repeat(64)),
            format!("{} {}", "k".repeat(17), "0".repeat(64)),
            format!("k1 {} extra", "0".repeat(64)),
        ] {
            let e = Key::parse_line(&bad).unwrap_err();
            assert!(!e.contains(&"0".repeat(32)), "{e}");
        }
    }

    #[test]
    fn master_files_allow_comments_and_refuse_a_kid_twice() {
        let a = "1".repeat(64);
        let b = "2".repeat(64);
        let keys = parse_keys(&format!("# rotated 2026-12\nk2 {b}\n\nk1 {a}\n")).unwrap();
        assert_eq!(
            keys.iter().map(Key::kid).collect::<Vec<_>>(),
            vec!["k2", "k1"]
        );
        let e = parse_keys(&format!("k1 {a}\nk1 {b}\n")).unwrap_err();
        assert!(e.contains("line 2") && e.contains("twice"), "{e}");
        assert!(parse_keys("# nothing\n").is_err());
        assert!(parse_keys("k1 00").unwrap_err().starts_with("line 1: "));
    }

    #[test]
    fn a_vm_key_is_hmac_of_the_context_and_vm_id() {
        let master = Key::new("k1", [7; 32]).unwrap();
        let mut message = KEY_CONTEXT.to_vec();
        message.push(0);
        message.extend_from_slice(b"vm-1");
        let vm = master.derive("vm-1");
        assert_eq!(vm.bytes(), &hmac_sha256(&[7; 32], &message));
        assert_eq!(vm.kid(), "k1");
        assert_ne!(master.derive("vm-2").bytes(), vm.bytes());
    }

    #[test]
    fn signed_headers_have_the_documented_shape() {
        let key = Key::new("k1", [1; 32]).unwrap();
        let h = sign(
            &key,
            "vm-1",
            "POST",
            "/v1/guest-metrics?x=1",
            b"[]",
            1_700_000_000,
        );
        assert_eq!(h.content_digest, content_digest(b"[]"));
        assert_eq!(
            h.signature_input,
            "ga=(\"@method\" \"@path\" \"content-digest\");created=1700000000;\
             keyid=\"k1/vm-1\";alg=\"hmac-sha256\""
        );
        let base = format!(
            "\"@method\": POST\n\"@path\": /v1/guest-metrics\n\"content-digest\": {}\n\
             \"@signature-params\": {}",
            h.content_digest,
            &h.signature_input[3..]
        );
        assert_eq!(
            h.signature,
            format!(
                "ga=:{}:",
                BASE64.encode(hmac_sha256(&[1; 32], base.as_bytes()))
            )
        );
        assert_eq!(request_path(""), "/");
        assert_eq!(request_path("/a/b?c#d"), "/a/b");
    }
}
