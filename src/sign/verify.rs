//! The manager's side: checking a signed request before its body is
//! parsed (docs/security.md#verification).
//!
//! [`Verifier::verify`] takes the method, the path, the headers and the raw
//! body: the body's sha-256 must equal `Content-Digest`, then the
//! `Signature` must be the HMAC, compared in constant time, under the key
//! derived for the `keyid`'s KID and VM id. It returns the [`Signer`]; the
//! caller then holds every sample's `vm_id` to `Signer::vm_id`
//! ([`crate::ingest::check_vm`], 403). A refusal is 401 with its reason.
//!
//! `created` is reported, not enforced: a VM restored from an old snapshot
//! keeps the snapshot's clock until something sets it, and must not be
//! locked out. A replayed request is a duplicate to the (`run_id`, `seq`)
//! de-duplication, never a second row.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::{Key, fields, parse_keys, signature_base, valid_vm_id};

/// The status of every refused signature.
pub const UNAUTHORIZED: u16 = 401;

/// Who signed a request that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer {
    /// The master key's id.
    pub kid: String,
    /// The VM the request speaks for: every sample must carry this `vm_id`.
    pub vm_id: String,
    /// The signature's `created`, unix seconds, as the VM's clock had it.
    pub created: i64,
}

/// Why a request's signature was refused: always HTTP 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// What is missing or wrong, starting `signature` or `content digest`.
    pub reason: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {UNAUTHORIZED}: {}", self.reason)
    }
}

impl std::error::Error for Rejection {}

fn reject(reason: impl Into<String>) -> Rejection {
    Rejection {
        reason: reason.into(),
    }
}

/// The master keys a manager accepts; built from the lines of its master
/// key file. All are accepted (rotation); the first derives new VM keys.
#[derive(Debug, Clone)]
pub struct Verifier {
    masters: Vec<Key>,
}

impl Verifier {
    /// From the text of a master key file (`KID HEX` lines).
    pub fn from_lines(text: &str) -> Result<Verifier, String> {
        Ok(Verifier {
            masters: parse_keys(text)?,
        })
    }

    /// From a master key file; errors name it.
    pub fn load(path: &Path) -> Result<Verifier, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("master key file {}: {e}", path.display()))?;
        Verifier::from_lines(&text).map_err(|e| format!("master key file {}: {e}", path.display()))
    }

    /// The master keys, first the one that derives new VM keys.
    pub fn masters(&self) -> &[Key] {
        &self.masters
    }

    /// The key of `vm_id` under the first master key: what to give a new VM.
    pub fn vm_key(&self, vm_id: &str) -> Key {
        self.masters[0].derive(vm_id)
    }

    /// Checks a request: `method` and `path` (the request target; a query
    /// is not part of `@path`), its headers as `(name, value)` pairs in any
    /// case (a field sent twice is joined with `, `, as HTTP does), and the
    /// raw body, before anything parses it.
    pub fn verify(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &[u8])],
        body: &[u8],
    ) -> Result<Signer, Rejection> {
        let field = |name: &str| -> Result<Option<String>, Rejection> {
            let mut joined: Option<String> = None;
            for (_, v) in headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)) {
                let v = std::str::from_utf8(v)
                    .map_err(|_| reject(format!("signature: {name} is not text")))?;
                match &mut joined {
                    Some(j) => {
                        j.push_str(", ");
                        j.push_str(v);
                    }
                    None => joined = Some(v.to_string()),
                }
            }
            Ok(joined)
        };
        let input = field("signature-input")?.ok_or_else(|| {
            reject("signature: none (no Signature-Input); this manager accepts only signed pushes")
        })?;
        let input =
            fields::signature_input(&input).map_err(|e| reject(format!("signature: {e}")))?;
        let sig = field("signature")?.ok_or_else(|| reject("signature: no Signature header"))?;
        let sig = fields::signature(&sig).map_err(|e| reject(format!("signature: {e}")))?;
        let digest_field =
            field("content-digest")?.ok_or_else(|| reject("content digest: no Content-Digest"))?;
        let digest = fields::content_digest(&digest_field)
            .map_err(|e| reject(format!("content digest: {e}")))?;
        // The digest is no secret: a plain compare.
        if digest.as_slice() != Sha256::digest(body).as_slice() {
            return Err(reject(
                "content digest: sha-256 does not match the body (changed after signing?)",
            ));
        }
        let Some((kid, vm_id)) = input.keyid.split_once('/') else {
            return Err(reject(format!(
                "signature: keyid {:?} is not KID/VM_ID",
                input.keyid
            )));
        };
        if !valid_vm_id(vm_id) {
            return Err(reject(format!(
                "signature: keyid {:?}: the VM id is not 1 to 256 unreserved characters",
                input.keyid
            )));
        }
        let Some(master) = self.masters.iter().find(|k| k.kid() == kid) else {
            return Err(reject(format!(
                "signature: unknown key id {kid:?} (rotated out, or another manager's)"
            )));
        };
        let mut components = Vec::with_capacity(input.components.len());
        for c in &input.components {
            let value = match c.as_str() {
                "@method" => method,
                "@path" => super::request_path(path),
                _ => digest_field.as_str(),
            };
            components.push((c.as_str(), value));
        }
        let base = signature_base(&components, &input.params);
        let vm_key = master.derive(vm_id);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(vm_key.bytes())
            .map_err(|_| reject("signature: key of the wrong length"))?;
        mac.update(base.as_bytes());
        // verify_slice compares in constant time.
        mac.verify_slice(&sig).map_err(|_| {
            reject(format!(
                "signature: does not verify for {kid}/{vm_id} over this method, path and digest"
            ))
        })?;
        Ok(Signer {
            kid: kid.to_string(),
            vm_id: vm_id.to_string(),
            created: input.created,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::sign;
    use super::*;

    fn verifier() -> Verifier {
        Verifier::from_lines(&format!("new {}\nold {}\n", "1".repeat(64), "2".repeat(64))).unwrap()
    }

    fn headers(h: &super::super::Headers) -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("Content-Digest", h.content_digest.clone().into_bytes()),
            ("Signature-Input", h.signature_input.clone().into_bytes()),
            ("signature", h.signature.clone().into_bytes()),
        ]
    }

    fn check(
        v: &Verifier,
        m: &str,
        p: &str,
        h: &[(&'static str, Vec<u8>)],
        b: &[u8],
    ) -> Result<Signer, Rejection> {
        let h: Vec<(&str, &[u8])> = h.iter().map(|(n, v)| (*n, v.as_slice())).collect();
        v.verify(m, p, &h, b)
    }

    #[test]
    fn a_signed_request_verifies_under_either_master() {
        let v = verifier();
        for master in v.masters() {
            let key = master.derive("vm-1");
            let h = sign(&key, "vm-1", "POST", "/v1/guest-metrics", b"[1]", 42);
            let s = check(
                &v,
                "POST",
                "/v1/guest-metrics?ignored",
                &headers(&h),
                b"[1]",
            )
            .unwrap();
            assert_eq!(
                (s.kid.as_str(), s.vm_id.as_str(), s.created),
                (master.kid(), "vm-1", 42)
            );
        }
    }

    #[test]
    fn every_tampering_is_refused() {
        let v = verifier();
        let key = v.vm_key("vm-1");
        let h = sign(&key, "vm-1", "POST", "/v1/guest-metrics", b"[1]", 42);
        let ok = headers(&h);
        let reason = |m: &str, p: &str, hs: &[(&'static str, Vec<u8>)], b: &[u8]| {
            check(&v, m, p, hs, b).unwrap_err().reason
        };
        assert!(
            reason("POST", "/v1/guest-metrics", &ok, b"[2]").contains("does not match the body")
        );
        assert!(reason("PUT", "/v1/guest-metrics", &ok, b"[1]").contains("does not verify"));
        assert!(reason("POST", "/v1/other", &ok, b"[1]").contains("does not verify"));
        assert!(reason("POST", "/v1/guest-metrics", &[], b"[1]").starts_with("signature: none"));
        // The digest and signature of another body, moved onto this one.
        let other = sign(&key, "vm-1", "POST", "/v1/guest-metrics", b"[2]", 42);
        let mut moved = ok.clone();
        moved[2] = headers(&other)[2].clone();
        assert!(reason("POST", "/v1/guest-metrics", &moved, b"[1]").contains("does not verify"));
        // Another VM's key id with this VM's key.
        let forged = sign(&key, "vm-2", "POST", "/v1/guest-metrics", b"[1]", 42);
        assert!(reason("POST", "/v1/guest-metrics", &headers(&forged), b"[1]").contains("vm-2"));
        let unknown = sign(
            &Key::new("gone", [9; 32]).unwrap().derive("vm-1"),
            "vm-1",
            "POST",
            "/",
            b"",
            1,
        );
        assert!(reason("POST", "/", &headers(&unknown), b"").contains("unknown key id"));
        let mut bad_utf8 = ok.clone();
        bad_utf8[1].1 = vec![0xff];
        assert!(reason("POST", "/v1/guest-metrics", &bad_utf8, b"[1]").contains("not text"));
    }

    #[test]
    fn a_field_sent_twice_is_joined() {
        let v = verifier();
        let h = sign(&v.vm_key("vm-1"), "vm-1", "POST", "/p", b"x", 1);
        let mut hs = headers(&h);
        hs.insert(
            0,
            ("signature-input", b"other=(\"@method\");created=1".to_vec()),
        );
        assert!(check(&v, "POST", "/p", &hs, b"x").is_ok());
    }
}
