//! Push bodies: how a batch of samples is written on the wire.

use std::sync::Arc;

use crate::Sample;
use crate::config::Format;

/// The `Content-Type` of a body in `format`.
pub fn content_type(format: Format) -> &'static str {
    match format {
        Format::Json => "application/json",
        Format::Influx => "text/plain; charset=utf-8",
    }
}

/// Writes `batch` into `out` (cleared first) in `format`: a JSON array of
/// samples, oldest first (docs/design.md#the-sample), or Influx line protocol.
pub fn encode(batch: &[Arc<Sample>], format: Format, out: &mut Vec<u8>) {
    out.clear();
    match format {
        Format::Json => {
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
        Format::Influx => crate::influx::encode(batch, out),
    }
}
