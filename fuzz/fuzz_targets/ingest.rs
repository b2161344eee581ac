//! The ingest kit's body parser and its deduplication, on any body a
//! pushing client may send (docs/testing.md#fuzzing).
#![no_main]

use guest_agent::ingest::{self, Ingest, MAX_TEXT};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(parsed) = ingest::parse_text(data) else {
        return;
    };
    for p in &parsed {
        // What was accepted is bounded as documented, and the text kept
        // for it is one JSON value that parses to the same sample.
        assert!(
            p.sample.run_id.len() <= MAX_TEXT,
            "run_id of {} bytes",
            p.sample.run_id.len()
        );
        if let Some(id) = &p.sample.vm_id {
            assert!(id.len() <= MAX_TEXT, "vm_id of {} bytes", id.len());
        }
        let again =
            ingest::parse(format!("[{}]", p.text).as_bytes()).expect("a kept sample text parses");
        assert_eq!(again.len(), 1);
        assert_eq!(again[0], p.sample, "the kept text is another sample");
        // What the agent would send for it is accepted too.
        let sent = serde_json::to_vec(&[&p.sample]).expect("a sample serializes");
        ingest::parse(&sent).expect("a sample as serialized parses");
    }
    // A retried body (the agent resends after a lost answer) stores nothing
    // twice.
    let mut receiver = Ingest::new();
    let first = receiver
        .receive(data)
        .expect("accepted by parse_text, refused by receive");
    assert_eq!(
        first.fresh().count() + first.duplicates() + first.conflicts().len() + first.expired(),
        parsed.len()
    );
    let second = receiver
        .receive(data)
        .expect("the same body refused the second time");
    assert_eq!(second.fresh().count(), 0, "a resent body stored again");
});
