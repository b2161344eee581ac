//! The JSON body (`format = json`, the default): an array of samples,
//! oldest first (docs/design.md#the-sample), as the manager's ingest route
//! reads it.

use std::sync::Arc;

use crate::sample::Sample;

/// The `Content-Type` of a JSON body.
pub const CONTENT_TYPE: &str = "application/json";

/// Writes `batch` as one JSON array into `out` (appending).
pub fn encode(batch: &[Arc<Sample>], out: &mut Vec<u8>) {
    out.push(b'[');
    for (i, s) in batch.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Serializing plain data into a Vec cannot fail.
        if let Err(e) = serde_json::to_writer(&mut *out, &**s) {
            log::error!("encoding sample {}: {e}", s.seq);
        }
    }
    out.push(b']');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::fixture::sample;

    #[test]
    fn an_array_of_whole_samples_oldest_first() {
        let mut out = Vec::new();
        encode(&[Arc::new(sample(1)), Arc::new(sample(2))], &mut out);
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0]["seq"].as_u64(), v[1]["seq"].as_u64()),
            (Some(1), Some(2))
        );
        for s in &v {
            Sample::from_json_strict(s).unwrap();
        }
    }
}
