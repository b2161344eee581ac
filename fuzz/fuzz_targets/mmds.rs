//! The MMDS answers: the JSON reader for flat objects, checked against
//! serde_json, and the settings document read from it
//! (docs/testing.md#fuzzing).
#![no_main]

use guest_agent::config::{mmds, settings};
use guest_agent::internals::{Scalar, flat_object};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = flat_object(data) {
        // What the reader takes is a JSON object to serde_json too, with
        // the same keys, and every nested value's text is JSON.
        let v: serde_json::Value = match serde_json::from_slice(data) {
            Ok(v) => v,
            // RFC 8259 puts no limit on a number's range; serde_json stops
            // at f64's. Such a value reaches a setting's check as text and
            // is refused there.
            Err(e) if e.to_string().starts_with("number out of range") => return,
            Err(e) => panic!("accepted, but not JSON to serde_json: {e}"),
        };
        let obj = v.as_object().expect("accepted, but not an object");
        // serde_json keeps a repeated key's last value.
        let mut seen = std::collections::HashSet::new();
        for (k, s) in entries.iter().rev() {
            if !seen.insert(k) {
                continue;
            }
            let theirs = obj
                .get(k)
                .unwrap_or_else(|| panic!("key {k:?} not in serde_json's object"));
            match s {
                Scalar::Null => {}
                Scalar::Text(_) => assert!(!theirs.is_object() && !theirs.is_array(), "{k:?}"),
                Scalar::Nested(text) => {
                    serde_json::from_str::<serde_json::Value>(text)
                        .unwrap_or_else(|e| panic!("nested {k:?} text {text:?}: {e}"));
                }
            }
        }
        assert!(
            obj.keys().all(|k| entries.iter().any(|(e, _)| e == k)),
            "a key lost"
        );
    }
    if let Ok(doc) = mmds::parse_document(data) {
        for (name, _) in &doc.entries {
            assert!(
                settings::setting(name).is_some(),
                "unknown setting {name:?} taken"
            );
        }
        let _ = doc.vm_id();
    }
});
