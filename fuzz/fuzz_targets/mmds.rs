//! The answers the agent reads as JSON from its peers, through serde_json:
//! the MMDS settings document and an OTLP receiver's partial success
//! (docs/testing.md#fuzzing). Neither may panic; what the document keeps is
//! never more than what was read; and what it takes agrees with
//! serde_json's own reading of the same bytes as a plain value.
#![no_main]

use guest_agent::config::{mmds, settings};
use guest_agent::internals::partial_success;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let value = serde_json::from_slice::<serde_json::Value>(data);
    match mmds::parse_document(data) {
        Ok(doc) => {
            let obj = match &value {
                Ok(serde_json::Value::Object(obj)) => obj,
                // serde_json reads past a value no field takes without
                // checking that a `\u` escape pairs surrogates or that a
                // number fits an f64; a value it keeps is checked.
                Err(e)
                    if e.to_string().contains("surrogate")
                        || e.to_string().starts_with("number out of range") =>
                {
                    return;
                }
                // serde_json's Value reads an object whose first key is its
                // raw-value token as raw JSON text; no other reader does.
                Err(_) if data.windows(20).any(|w| w == b"$serde_json::private") => return,
                other => panic!("a document taken that serde_json reads as {other:?}"),
            };
            let kept: usize = doc.entries.iter().map(|(_, v)| v.len()).sum();
            assert!(kept <= data.len(), "kept {kept} bytes of {}", data.len());
            for (name, text) in &doc.entries {
                assert!(
                    settings::setting(name).is_some(),
                    "unknown setting {name:?} taken"
                );
                // The member's value (under either spelling of the key) is
                // a scalar to serde_json too.
                let scalar = obj.iter().any(|(k, v)| {
                    k.replace('-', "_") == *name && !v.is_object() && !v.is_array() && !v.is_null()
                });
                assert!(scalar, "{name:?} = {text:?} is no scalar member");
            }
            let _ = doc.vm_id();
        }
        // The document is an object of members, so anything that is not an
        // object is refused, and an object is refused only past the depth.
        Err(e) => {
            if let Ok(serde_json::Value::Object(_)) = value {
                panic!("an object refused: {e}");
            }
        }
    }
    if let Ok(Some(p)) = partial_success(data) {
        assert!(p.rejected > 0);
        assert!(p.message.len() <= data.len());
    }
});
