//! The kernel command-line splitter and the `guest_agent.*` parameter
//! reader, on any text a boot loader may pass (docs/testing.md#fuzzing).
#![no_main]

use guest_agent::config::cmdline::{params, tokens};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let toks = tokens(&text);
    for t in &toks {
        assert!(!t.contains('"'), "quote kept in token {t:?}");
        assert_ne!(t, "--", "init's arguments kept");
    }
    for p in params(&text) {
        assert!(
            !p.name.contains('-'),
            "name {:?} not folded (from {:?})",
            p.name,
            p.written
        );
        assert!(
            toks.iter().any(|t| t.starts_with(&p.written)),
            "{:?} is in no token",
            p.written
        );
    }
});
