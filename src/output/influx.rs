//! Influx line protocol bodies (`format = influx`), accepted as-is by
//! InfluxDB, VictoriaMetrics and Telegraf's HTTP listener.
//!
//! One line per sample: measurement `guest`, tags `vm_id` and `hostname`,
//! every numeric sample field as a field (integers with the `i` suffix,
//! nulls left out), and the timestamp in nanoseconds, the protocol's default
//! precision, so no query parameter is needed.

use std::io::Write;
use std::sync::Arc;

use crate::sample::{Sample, Value};

/// The `Content-Type` of a line-protocol body.
pub const CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// The measurement name; series become `guest_<field>` in VictoriaMetrics.
pub const MEASUREMENT: &str = "guest";

/// Sample fields that are not written as fields: the schema number is
/// metadata and the timestamp is the line's own timestamp.
const NOT_FIELDS: [&str; 2] = ["schema", "timestamp_ms"];

/// Writes `batch` as line protocol into `out` (appending).
pub fn encode(batch: &[Arc<Sample>], out: &mut Vec<u8>) {
    for s in batch {
        encode_one(s, out);
    }
}

fn encode_one(s: &Sample, out: &mut Vec<u8>) {
    out.extend_from_slice(MEASUREMENT.as_bytes());
    for (tag, value) in [("vm_id", &s.vm_id), ("hostname", &s.hostname)] {
        if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
            out.push(b',');
            out.extend_from_slice(tag.as_bytes());
            out.push(b'=');
            escape_tag(v, out);
        }
    }
    // Every numeric field of the schema, straight from its one definition:
    // text fields are tags or identifiers, nulls are left out.
    let mut sep = b' ';
    s.visit(|name, value| {
        if NOT_FIELDS.contains(&name) {
            return;
        }
        let (Value::Int(_) | Value::Float(_)) = value else {
            return;
        };
        out.push(sep);
        sep = b',';
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        let _ = match value {
            Value::Int(i) => write!(out, "{i}i"),
            Value::Float(f) => write!(out, "{f}"),
            _ => Ok(()),
        };
    });
    let _ = writeln!(out, " {}", s.timestamp_ms.saturating_mul(1_000_000));
}

/// Escapes a tag value: commas, equals signs and spaces take a backslash;
/// line breaks, which the protocol cannot carry, become spaces (escaped).
fn escape_tag(v: &str, out: &mut Vec<u8>) {
    for c in v.chars() {
        match c {
            ',' | '=' | ' ' => {
                out.push(b'\\');
                out.push(c as u8);
            }
            '\n' | '\r' => out.extend_from_slice(b"\\ "),
            '\\' => out.extend_from_slice(b"\\\\"),
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: &Sample) -> String {
        let mut out = Vec::new();
        encode(&[Arc::new(s.clone())], &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn tags_fields_and_timestamp() {
        let mut c = crate::collect::Collector::new(
            std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/host")),
            Some("vm 1,a=b".into()),
        )
        .unwrap();
        let mut s = c.collect();
        s.seq = 7;
        s.timestamp_ms = 1_700_000_000_123;
        s.hostname = Some("web=1".into());
        let l = line(&s);
        assert!(
            l.starts_with("guest,vm_id=vm\\ 1\\,a\\=b,hostname=web\\=1 "),
            "{l}"
        );
        assert!(l.ends_with(" 1700000000123000000\n"), "{l}");
        assert!(l.contains(" seq=7i,") || l.contains(",seq=7i,"), "{l}");
        let total = s.memory_total_kb.unwrap();
        assert!(l.contains(&format!("memory_total_kb={total}i")), "{l}");
        assert!(l.contains("cpu_usage_percent=0"), "{l}");
        assert!(
            !l.contains("schema=") && !l.contains("timestamp_ms="),
            "{l}"
        );
        // Null figures (no guest_ip, a string anyway) are left out.
        assert!(!l.contains("guest_ip"), "{l}");
        assert_eq!(l.matches('\n').count(), 1);
    }

    #[test]
    fn absent_tags_are_left_out() {
        let mut s = crate::sample::fixture::sample(1);
        s.memory_total_kb = Some(5);
        assert_eq!(
            line(&s),
            "guest seq=1i,window_ms=0i,memory_total_kb=5i,dropped_samples=0i,restore_count=0i 0\n"
        );
    }
}
