//! The ingest kit's reading of `Signature-Input`, `Signature` and
//! `Content-Digest`, and its verification, on any headers and body a
//! pushing client may send (docs/testing.md#fuzzing).
//!
//! The input is five parts separated by newlines: Signature-Input,
//! Signature, Content-Digest, the path, the body (the rest). The master
//! key is fixed; the seeds carry requests signed with keys derived from it.
#![no_main]

use guest_agent::ingest::Verifier;
use guest_agent::sign::{self, Key, fields, valid_vm_id};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(5, |b| *b == b'\n');
    let mut next = || parts.next().unwrap_or_default();
    let (input, signature, digest, path, body) = (next(), next(), next(), next(), next());
    let master = Key::new("k1", [0x11; 32]).expect("a valid key id");
    let verifier = Verifier::from_lines(&master.to_line()).expect("one valid line");
    let headers: [(&str, &[u8]); 3] = [
        ("signature-input", input),
        ("signature", signature),
        ("content-digest", digest),
    ];
    let path_text = String::from_utf8_lossy(path);
    match verifier.verify("POST", &path_text, &headers, body) {
        Ok(signer) => {
            // Only a VM id the agent could have, under a key the manager
            // holds, over exactly this body.
            assert!(valid_vm_id(&signer.vm_id), "{:?}", signer.vm_id);
            assert_eq!(signer.kid, "k1");
            let mut changed = body.to_vec();
            changed.push(b'x');
            assert!(
                verifier
                    .verify("POST", &path_text, &headers, &changed)
                    .is_err(),
                "a changed body verified"
            );
            assert!(
                verifier.verify("PUT", &path_text, &headers, body).is_err(),
                "another method verified"
            );
        }
        Err(r) => assert!(
            r.reason.starts_with("signature") || r.reason.starts_with("content digest"),
            "{}",
            r.reason
        ),
    }
    // What the field reader accepts reads back the same from its own
    // serialization: the signature base is built from it.
    if let Ok(text) = std::str::from_utf8(input)
        && let Ok(parsed) = fields::signature_input(text)
    {
        let again = fields::signature_input(&format!("{}={}", sign::LABEL, parsed.params))
            .expect("its own serialization reads back");
        assert_eq!(again, parsed);
    }
    // Whatever the body and a VM id taken from the path, the agent's own
    // signature verifies.
    if valid_vm_id(&path_text) {
        let h = sign::sign(
            &master.derive(&path_text),
            &path_text,
            "POST",
            "/v1/guest-metrics",
            body,
            1,
        );
        let ok: [(&str, &[u8]); 3] = [
            ("signature-input", h.signature_input.as_bytes()),
            ("signature", h.signature.as_bytes()),
            ("content-digest", h.content_digest.as_bytes()),
        ];
        let signer = verifier
            .verify("POST", "/v1/guest-metrics", &ok, body)
            .expect("the agent's own signature verifies");
        assert_eq!(signer.vm_id, path_text);
    }
});
