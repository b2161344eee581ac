//! The listener's request-head parser and its Accept negotiation, on any
//! bytes a client may send (docs/testing.md#fuzzing).
#![no_main]

use guest_agent::internals::{negotiate, parse_head};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The head as it arrives, and every prefix a slow client leaves the
    // listener with: a prefix is incomplete or refused, never a different
    // request.
    let whole = parse_head(data);
    if let Ok(Some((_, len))) = &whole {
        assert!(
            *len <= data.len(),
            "head length {len} past the {} bytes read",
            data.len()
        );
        assert!(
            *len <= 8 * 1024,
            "a head of {len} bytes accepted over the 8 KiB limit"
        );
        for cut in [len / 2, len.saturating_sub(1)] {
            if let Ok(Some((_, l))) = parse_head(&data[..cut]) {
                panic!("prefix of {cut} bytes parsed as a complete head of {l}");
            }
        }
        // The same head followed by anything (a body, a pipelined request)
        // is the same request.
        let (req, _) = parse_head(&data[..*len])
            .expect("the head alone")
            .expect("complete");
        assert_eq!(
            Some(&req),
            whole.as_ref().ok().and_then(|w| w.as_ref()).map(|(r, _)| r)
        );
    }
    negotiate(&String::from_utf8_lossy(data));
});
