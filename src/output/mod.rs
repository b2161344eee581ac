//! Wire formats: how a batch of samples is written on the wire, one file
//! per format, all fed from the same [`Sample`].

pub mod influx;
pub mod json;
pub mod otlp;
pub mod prometheus;

use std::sync::Arc;

use crate::config::Format;
use crate::sample::Sample;

/// The `Content-Type` of a body in `format`.
pub fn content_type(format: Format) -> &'static str {
    match format {
        Format::Json => json::CONTENT_TYPE,
        Format::Influx => influx::CONTENT_TYPE,
        Format::Otlp => otlp::CONTENT_TYPE,
    }
}

/// Writes `batch` into `out` (cleared first) in `format`, oldest first.
pub fn encode(batch: &[Arc<Sample>], format: Format, out: &mut Vec<u8>) {
    out.clear();
    match format {
        Format::Json => json::encode(batch, out),
        Format::Influx => influx::encode(batch, out),
        Format::Otlp => otlp::encode(batch, out),
    }
}
