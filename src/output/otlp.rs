//! OTLP/HTTP bodies (`format = otlp`): one `ExportMetricsServiceRequest`
//! per push in the protobuf JSON mapping, for an OpenTelemetry Collector's
//! `otlp` receiver or any OTLP/HTTP endpoint (docs/backends.md#opentelemetry).
//!
//! The mapping's rules: lowerCamelCase keys, 64-bit integers as decimal
//! strings, enums as integers (`aggregationTemporality` 2, cumulative).
//! Names, units, instruments and attributes follow the OpenTelemetry
//! semantic conventions for system metrics; load averages are named as the
//! Collector's hostmetrics receiver names them, and pressure as the open
//! semantic-conventions proposal names it (not yet standard).
//!
//! A batch's samples of one run (one agent process, one VM) share one
//! resource; a batch that spans a snapshot restore has one per run.
//! Counters start at boot (`startTimeUnixNano`), the kernel's own origin.

use std::io::Write;
use std::sync::Arc;

use serde::Deserialize;

use crate::sample::detail::{Detail, Disk};
use crate::sample::{AGENT_VERSION, Sample};

/// The `Content-Type` of an OTLP/HTTP JSON body.
pub const CONTENT_TYPE: &str = "application/json";

/// How a metric accumulates.
#[derive(Clone, Copy, PartialEq)]
enum Instrument {
    /// A monotonic cumulative sum.
    Counter,
    /// A non-monotonic cumulative sum.
    UpDownCounter,
    /// A gauge.
    Gauge,
}
use Instrument::{Counter, Gauge, UpDownCounter};

/// An attribute's value.
#[derive(Clone, Copy)]
enum Attr<'a> {
    Str(&'a str),
    Int(u64),
}

/// A metric and how to write one sample's points of it.
struct Metric {
    name: &'static str,
    unit: &'static str,
    instrument: Instrument,
    points: fn(&Sample, &Detail, &mut Points<'_>),
}

/// Writes data points straight into the body, all of one sample (one
/// time, one start). Plain calls in loops rather than iterator chains:
/// this runs once per push, and one non-generic writer keeps the binary
/// small.
struct Points<'a> {
    out: &'a mut Vec<u8>,
    time: u64,
    start: Option<u64>,
    /// The sample's counters' start: boot.
    boot: Option<u64>,
    written: usize,
}

impl Points<'_> {
    fn begin(&mut self, attrs: &[(&str, Attr<'_>)]) {
        if self.written > 0 {
            self.out.push(b',');
        }
        self.written += 1;
        self.out.extend_from_slice(b"{\"attributes\":[");
        for (i, (k, v)) in attrs.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            attribute(self.out, k, *v);
        }
        self.out.push(b']');
        if let Some(start) = self.start {
            let _ = write!(self.out, ",\"startTimeUnixNano\":\"{start}\"");
        }
        let _ = write!(self.out, ",\"timeUnixNano\":\"{}\"", self.time);
    }

    fn int(&mut self, attrs: &[(&str, Attr<'_>)], v: u64) {
        self.begin(attrs);
        let _ = write!(self.out, ",\"asInt\":\"{v}\"}}");
    }

    /// Starts the points of a device whose counters began at `since_ms`
    /// (it appeared, or was reset, during the run), or at boot for `None`,
    /// so a receiver sees a new device's counters as a new series.
    fn device(&mut self, since_ms: Option<u64>) {
        self.start = match (since_ms, self.boot) {
            (Some(ms), Some(_)) => Some(ms.saturating_mul(1_000_000)),
            _ => self.boot,
        };
    }

    fn double(&mut self, attrs: &[(&str, Attr<'_>)], v: f64) {
        if !v.is_finite() {
            return;
        }
        self.begin(attrs);
        let _ = write!(self.out, ",\"asDouble\":{v}}}");
    }
}

/// The `cpu.mode` of each of the sample's `detail::CPU_MODES`, in that
/// order (`irq` is `interrupt` in the conventions).
const OTEL_CPU_MODES: [&str; 8] = [
    "user",
    "nice",
    "system",
    "idle",
    "iowait",
    "interrupt",
    "softirq",
    "steal",
];

/// The metrics, in the order they are written.
const METRICS: &[Metric] = &[
    Metric {
        name: "system.cpu.time",
        unit: "s",
        instrument: Counter,
        points: |_, d, p| {
            for c in &d.cpus {
                let cpu = Attr::Int(u64::from(c.cpu));
                for (mode, v) in OTEL_CPU_MODES.iter().zip(c.seconds) {
                    p.double(
                        &[("cpu.logical_number", cpu), ("cpu.mode", Attr::Str(mode))],
                        v,
                    );
                }
            }
        },
    },
    Metric {
        name: "system.cpu.utilization",
        unit: "1",
        instrument: Gauge,
        points: |_, d, p| {
            if let Some(shares) = &d.cpu_shares {
                for (mode, v) in OTEL_CPU_MODES.iter().zip(shares) {
                    p.double(&[("cpu.mode", Attr::Str(mode))], *v);
                }
            }
        },
    },
    Metric {
        name: "system.cpu.logical.count",
        unit: "{cpu}",
        instrument: UpDownCounter,
        points: |s, _, p| {
            if let Some(n) = s.cpu_count {
                p.int(&[], u64::from(n));
            }
        },
    },
    Metric {
        name: "system.memory.usage",
        unit: "By",
        instrument: UpDownCounter,
        points: |_, d, p| {
            if let Some(m) = &d.memory {
                // "used" as the hostmetrics receiver counts it: neither
                // free nor buffers nor page cache; nor the balloon, out of
                // the usable memory these states add up to.
                let used = m
                    .usable
                    .saturating_sub(m.free)
                    .saturating_sub(m.buffers)
                    .saturating_sub(m.cached);
                for (state, v) in [
                    ("used", used),
                    ("free", m.free),
                    ("buffers", m.buffers),
                    ("cached", m.cached),
                ] {
                    p.int(&[("system.memory.state", Attr::Str(state))], v);
                }
            }
        },
    },
    Metric {
        name: "system.memory.limit",
        unit: "By",
        instrument: UpDownCounter,
        points: |_, d, p| {
            if let Some(m) = &d.memory {
                p.int(&[], m.usable);
            }
        },
    },
    Metric {
        name: "system.memory.linux.balloon",
        unit: "By",
        instrument: UpDownCounter,
        points: |_, d, p| {
            if let Some(b) = d.memory.and_then(|m| m.balloon) {
                p.int(&[], b);
            }
        },
    },
    Metric {
        name: "system.memory.linux.available",
        unit: "By",
        instrument: UpDownCounter,
        points: |_, d, p| {
            if let Some(m) = &d.memory {
                p.int(&[], m.available);
            }
        },
    },
    Metric {
        name: "system.paging.usage",
        unit: "By",
        instrument: UpDownCounter,
        points: |_, d, p| {
            if let Some(m) = &d.memory {
                let used = m.swap_total.saturating_sub(m.swap_free);
                p.int(&[("system.paging.state", Attr::Str("used"))], used);
                p.int(&[("system.paging.state", Attr::Str("free"))], m.swap_free);
            }
        },
    },
    Metric {
        name: "system.network.io",
        unit: "By",
        instrument: Counter,
        points: |_, d, p| network(d, 0, p),
    },
    Metric {
        name: "system.network.packet.count",
        unit: "{packet}",
        instrument: Counter,
        points: |_, d, p| network(d, 1, p),
    },
    Metric {
        name: "system.network.errors",
        unit: "{error}",
        instrument: Counter,
        points: |_, d, p| network(d, 2, p),
    },
    Metric {
        name: "system.network.packet.dropped",
        unit: "{packet}",
        instrument: Counter,
        points: |_, d, p| network(d, 3, p),
    },
    Metric {
        name: "system.disk.io",
        unit: "By",
        instrument: Counter,
        points: |_, d, p| {
            for k in &d.disks {
                disk(p, k, k.read_bytes, k.written_bytes);
            }
        },
    },
    Metric {
        name: "system.disk.operations",
        unit: "{operation}",
        instrument: Counter,
        points: |_, d, p| {
            for k in &d.disks {
                disk(p, k, k.reads, k.writes);
            }
        },
    },
    Metric {
        name: "system.disk.io_time",
        unit: "s",
        instrument: Counter,
        points: |_, d, p| {
            for k in &d.disks {
                p.device(k.since_ms);
                p.double(
                    &[("system.device", Attr::Str(&k.name))],
                    k.io_ms as f64 / 1000.0,
                );
            }
            p.device(None);
        },
    },
    Metric {
        name: "system.filesystem.usage",
        unit: "By",
        instrument: UpDownCounter,
        points: |_, d, p| {
            if let Some(f) = &d.filesystem {
                for (state, v) in [
                    ("used", f.size.saturating_sub(f.free)),
                    ("free", f.avail),
                    ("reserved", f.free.saturating_sub(f.avail)),
                ] {
                    p.int(
                        &[
                            ("system.device", Attr::Str(&f.device)),
                            ("system.filesystem.mountpoint", Attr::Str(&f.mountpoint)),
                            ("system.filesystem.type", Attr::Str(&f.fstype)),
                            ("system.filesystem.state", Attr::Str(state)),
                        ],
                        v,
                    );
                }
            }
        },
    },
    Metric {
        name: "system.filesystem.limit",
        unit: "By",
        instrument: UpDownCounter,
        points: |_, d, p| {
            if let Some(f) = &d.filesystem {
                p.int(
                    &[
                        ("system.device", Attr::Str(&f.device)),
                        ("system.filesystem.mountpoint", Attr::Str(&f.mountpoint)),
                        ("system.filesystem.type", Attr::Str(&f.fstype)),
                    ],
                    f.size,
                );
            }
        },
    },
    Metric {
        name: "system.uptime",
        unit: "s",
        instrument: Gauge,
        points: |s, _, p| {
            if let Some(u) = s.uptime_seconds {
                p.double(&[], u as f64);
            }
        },
    },
    Metric {
        name: "system.process.count",
        unit: "{process}",
        instrument: UpDownCounter,
        points: |s, _, p| {
            if let Some(n) = s.process_count {
                p.int(&[], n);
            }
        },
    },
    Metric {
        name: "system.cpu.load_average.1m",
        unit: "{thread}",
        instrument: Gauge,
        points: |s, _, p| load(p, s.load_average),
    },
    Metric {
        name: "system.cpu.load_average.5m",
        unit: "{thread}",
        instrument: Gauge,
        points: |s, _, p| load(p, s.load_average_5),
    },
    Metric {
        name: "system.cpu.load_average.15m",
        unit: "{thread}",
        instrument: Gauge,
        points: |s, _, p| load(p, s.load_average_15),
    },
    Metric {
        name: "system.cpu.linux.pressure.10s",
        unit: "1",
        instrument: Gauge,
        points: |_, d, p| pressure(d, 0, Some(0), p),
    },
    Metric {
        name: "system.cpu.linux.pressure.1m",
        unit: "1",
        instrument: Gauge,
        points: |_, d, p| pressure(d, 0, Some(1), p),
    },
    Metric {
        name: "system.cpu.linux.pressure.5m",
        unit: "1",
        instrument: Gauge,
        points: |_, d, p| pressure(d, 0, Some(2), p),
    },
    Metric {
        name: "system.cpu.linux.pressure.total",
        unit: "s",
        instrument: Counter,
        points: |_, d, p| pressure(d, 0, None, p),
    },
    Metric {
        name: "system.memory.linux.pressure.10s",
        unit: "1",
        instrument: Gauge,
        points: |_, d, p| pressure(d, 1, Some(0), p),
    },
    Metric {
        name: "system.memory.linux.pressure.1m",
        unit: "1",
        instrument: Gauge,
        points: |_, d, p| pressure(d, 1, Some(1), p),
    },
    Metric {
        name: "system.memory.linux.pressure.5m",
        unit: "1",
        instrument: Gauge,
        points: |_, d, p| pressure(d, 1, Some(2), p),
    },
    Metric {
        name: "system.memory.linux.pressure.total",
        unit: "s",
        instrument: Counter,
        points: |_, d, p| pressure(d, 1, None, p),
    },
    Metric {
        name: "system.io.linux.pressure.10s",
        unit: "1",
        instrument: Gauge,
        points: |_, d, p| pressure(d, 2, Some(0), p),
    },
    Metric {
        name: "system.io.linux.pressure.1m",
        unit: "1",
        instrument: Gauge,
        points: |_, d, p| pressure(d, 2, Some(1), p),
    },
    Metric {
        name: "system.io.linux.pressure.5m",
        unit: "1",
        instrument: Gauge,
        points: |_, d, p| pressure(d, 2, Some(2), p),
    },
    Metric {
        name: "system.io.linux.pressure.total",
        unit: "s",
        instrument: Counter,
        points: |_, d, p| pressure(d, 2, None, p),
    },
];

/// Counter `i` (bytes, packets, errors, dropped) of every interface, both
/// directions.
fn network(d: &Detail, i: usize, p: &mut Points<'_>) {
    for n in &d.interfaces {
        let name = Attr::Str(&n.name);
        p.device(n.since_ms);
        for (dir, v) in [("receive", n.receive[i]), ("transmit", n.transmit[i])] {
            p.int(
                &[
                    ("network.interface.name", name),
                    ("network.io.direction", Attr::Str(dir)),
                ],
                v,
            );
        }
    }
    p.device(None);
}

/// A disk's read and write figures, from when its counters began.
fn disk(p: &mut Points<'_>, k: &Disk, read: u64, write: u64) {
    p.device(k.since_ms);
    for (dir, v) in [("read", read), ("write", write)] {
        p.int(
            &[
                ("system.device", Attr::Str(&k.name)),
                ("disk.io.direction", Attr::Str(dir)),
            ],
            v,
        );
    }
    p.device(None);
}

fn load(p: &mut Points<'_>, v: Option<f64>) {
    if let Some(v) = v {
        p.double(&[], v);
    }
}

/// Resource `r`'s pressure: average `window` (10 s, 1 min, 5 min) as a
/// ratio, or with `None` its total stall time in seconds; `some`, and
/// `full` where the kernel has it.
fn pressure(d: &Detail, r: usize, window: Option<usize>, p: &mut Points<'_>) {
    let Some(psi) = d.pressure[r] else {
        return;
    };
    for (kind, stall) in [("some", Some(psi.some)), ("full", psi.full)] {
        let Some(stall) = stall else { continue };
        let v = match window {
            Some(w) => stall.avg[w] / 100.0,
            None => stall.total_us as f64 / 1e6,
        };
        p.double(&[("system.linux.pressure.stall_type", Attr::Str(kind))], v);
    }
}

/// A JSON string, escaped. Writing into a Vec cannot fail.
fn string(out: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Writes `batch` as one ExportMetricsServiceRequest into `out` (appending).
pub fn encode(batch: &[Arc<Sample>], out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"resourceMetrics\":[");
    let mut rest = batch;
    while let Some(head) = rest.first() {
        // Consecutive samples of one run share a resource.
        let n = rest
            .iter()
            .take_while(|s| s.run_id == head.run_id && s.vm_id == head.vm_id)
            .count();
        let (group, tail) = rest.split_at(n);
        if rest.len() != batch.len() {
            out.push(b',');
        }
        rest = tail;
        resource(group, out);
    }
    out.extend_from_slice(b"]}");
}

/// One resourceMetrics: the run's resource and every metric's points.
fn resource(group: &[Arc<Sample>], out: &mut Vec<u8>) {
    let head = &group[0];
    out.extend_from_slice(b"{\"resource\":{\"attributes\":[");
    attribute(out, "service.name", Attr::Str("guest-agent"));
    out.push(b',');
    attribute(out, "service.version", Attr::Str(AGENT_VERSION));
    out.push(b',');
    attribute(out, "service.instance.id", Attr::Str(&head.run_id));
    if let Some(h) = &head.hostname {
        out.push(b',');
        attribute(out, "host.name", Attr::Str(h));
    }
    if let Some(v) = &head.vm_id {
        out.push(b',');
        attribute(out, "host.id", Attr::Str(v));
    }
    out.extend_from_slice(
        b"]},\"scopeMetrics\":[{\"scope\":{\"name\":\"guest-agent\",\"version\":",
    );
    string(out, AGENT_VERSION);
    out.extend_from_slice(b"},\"metrics\":[");
    let empty = Detail::default();
    let mut metrics = 0;
    for m in METRICS {
        // Written in full, then taken back if no sample had a point.
        let mark = out.len();
        if metrics > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"name\":");
        string(out, m.name);
        out.extend_from_slice(b",\"unit\":");
        string(out, m.unit);
        let kind = if m.instrument == Gauge {
            "gauge"
        } else {
            "sum"
        };
        let _ = write!(out, ",\"{kind}\":{{\"dataPoints\":[");
        let mut points = Points {
            out,
            time: 0,
            start: None,
            boot: None,
            written: 0,
        };
        for s in group {
            points.time = s.timestamp_ms.saturating_mul(1_000_000);
            points.start = (m.instrument != Gauge).then(|| start_time(s)).flatten();
            points.boot = points.start;
            (m.points)(s, s.detail.as_deref().unwrap_or(&empty), &mut points);
        }
        if points.written == 0 {
            out.truncate(mark);
            continue;
        }
        metrics += 1;
        out.push(b']');
        match m.instrument {
            Counter => out.extend_from_slice(b",\"aggregationTemporality\":2,\"isMonotonic\":true"),
            UpDownCounter => {
                out.extend_from_slice(b",\"aggregationTemporality\":2,\"isMonotonic\":false")
            }
            Gauge => {}
        }
        out.extend_from_slice(b"}}");
    }
    out.extend_from_slice(b"]}]}");
}

fn attribute(out: &mut Vec<u8>, key: &str, value: Attr<'_>) {
    out.extend_from_slice(b"{\"key\":");
    string(out, key);
    match value {
        Attr::Str(v) => {
            out.extend_from_slice(b",\"value\":{\"stringValue\":");
            string(out, v);
            out.extend_from_slice(b"}}");
        }
        Attr::Int(v) => {
            let _ = write!(out, ",\"value\":{{\"intValue\":\"{v}\"}}}}");
        }
    }
}

/// When a cumulative series began, nanoseconds since the epoch: the boot,
/// from `stat`, or else from the sample's time and uptime.
fn start_time(s: &Sample) -> Option<u64> {
    let boot_s = s
        .detail
        .as_deref()
        .and_then(|d| d.boot_time)
        .or_else(|| (s.timestamp_ms / 1000).checked_sub(s.uptime_seconds?))?;
    boot_s.checked_mul(1_000_000_000)
}

/// What an OTLP/HTTP receiver's 200 may say: data points it did not take
/// (`partialSuccess`, OTLP 1.0). Only that is read from the answer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PartialSuccess {
    /// Data points refused.
    pub rejected: u64,
    /// The receiver's reason.
    pub message: String,
}

/// The body of an OTLP/HTTP 200 (`ExportMetricsServiceResponse`), of which
/// only `partialSuccess` is read; every other member is ignored. The
/// protobuf JSON mapping lets a parser take the proto field names too.
#[derive(Deserialize)]
struct ExportAnswer {
    #[serde(default, rename = "partialSuccess", alias = "partial_success")]
    partial_success: Option<PartialAnswer>,
}

#[derive(Deserialize)]
struct PartialAnswer {
    #[serde(
        default,
        rename = "rejectedDataPoints",
        alias = "rejected_data_points",
        deserialize_with = "int64"
    )]
    rejected: u64,
    #[serde(
        default,
        rename = "errorMessage",
        alias = "error_message",
        deserialize_with = "message"
    )]
    message: String,
}

/// `rejectedDataPoints`: an int64, which the JSON mapping writes as a
/// decimal string; some receivers write a number. Either is read.
fn int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("partialSuccess.rejectedDataPoints as a count or its decimal string")
        }
        fn visit_u64<E>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
            v.parse()
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))
        }
        fn visit_unit<E>(self) -> Result<u64, E> {
            Ok(0)
        }
    }
    d.deserialize_any(V)
}

/// `errorMessage`: a string, `null` for none.
fn message<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("partialSuccess.errorMessage as a string")
        }
        fn visit_str<E>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_unit<E>(self) -> Result<String, E> {
            Ok(String::new())
        }
    }
    d.deserialize_any(V)
}

/// Reads `partialSuccess` from a 200's body: `Ok(None)` when every point
/// was taken (no body, no field, zero rejected); an error that says what
/// was wrong, and where, when the body is not such an answer.
pub fn partial_success(body: &[u8]) -> Result<Option<PartialSuccess>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let answer: ExportAnswer = serde_json::from_slice(body)
        .map_err(|e| format!("not an OTLP export answer in JSON: {e}"))?;
    Ok(answer
        .partial_success
        .filter(|p| p.rejected > 0)
        .map(|p| PartialSuccess {
            rejected: p.rejected,
            message: p.message,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn samples(n: u64) -> Vec<Arc<Sample>> {
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/host"));
        let mut c = crate::collect::Collector::new(root, Some("vm-1".into())).unwrap();
        c.collect();
        (1..=n)
            .map(|seq| {
                let mut s = c.collect();
                s.seq = seq;
                s.timestamp_ms = 1_700_000_000_000 + seq * 1000;
                Arc::new(s)
            })
            .collect()
    }

    fn body(batch: &[Arc<Sample>]) -> serde_json::Value {
        let mut out = Vec::new();
        encode(batch, &mut out);
        serde_json::from_slice(&out).unwrap()
    }

    #[test]
    fn one_resource_per_run_and_the_mapping_rules() {
        let mut batch = samples(3);
        let mut restored = (*batch[2]).clone();
        restored.run_id = "other-run".into();
        batch[2] = Arc::new(restored);
        let v = body(&batch);
        let rms = v["resourceMetrics"].as_array().unwrap();
        assert_eq!(rms.len(), 2, "one resource per run");
        let attrs = &rms[0]["resource"]["attributes"];
        let attr = |k: &str| {
            attrs
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["key"] == k)
                .map(|a| a["value"]["stringValue"].clone())
        };
        assert_eq!(attr("service.name").unwrap(), "guest-agent");
        assert_eq!(attr("host.id").unwrap(), "vm-1");
        assert_eq!(
            attr("service.instance.id").unwrap(),
            batch[0].run_id.as_str()
        );
        let metrics = rms[0]["scopeMetrics"][0]["metrics"].as_array().unwrap();
        let metric = |name: &str| metrics.iter().find(|m| m["name"] == name).unwrap();
        let cpu = metric("system.cpu.time");
        assert_eq!(cpu["unit"], "s");
        assert_eq!(cpu["sum"]["aggregationTemporality"], 2);
        assert_eq!(cpu["sum"]["isMonotonic"], true);
        let p = &cpu["sum"]["dataPoints"][0];
        assert!(p["timeUnixNano"].is_string() && p["startTimeUnixNano"].is_string());
        assert_eq!(p["attributes"][0]["value"]["intValue"], "0");
        // Two samples, each with every CPU and mode.
        let n_cpus = batch[0].detail.as_ref().unwrap().cpus.len();
        assert_eq!(
            cpu["sum"]["dataPoints"].as_array().unwrap().len(),
            2 * n_cpus * 8
        );
        let mem = metric("system.memory.usage");
        assert_eq!(mem["sum"]["isMonotonic"], false);
        assert!(mem["sum"]["dataPoints"][0]["asInt"].is_string());
        let util = metric("system.cpu.utilization");
        assert!(util["gauge"]["dataPoints"][0]["asDouble"].as_f64().unwrap() <= 1.0);
        assert!(util.get("sum").is_none());
    }

    #[test]
    fn partial_success_is_read_as_either_form() {
        let r = partial_success(
            br#"{"partialSuccess":{"rejectedDataPoints":"3","errorMessage":"bad"}}"#,
        );
        assert_eq!(
            r,
            Ok(Some(PartialSuccess {
                rejected: 3,
                message: "bad".into()
            }))
        );
        let rejected = |b: &[u8]| partial_success(b).map(|p| p.map(|p| p.rejected));
        assert_eq!(
            rejected(br#"{"partialSuccess":{"rejectedDataPoints":2}}"#),
            Ok(Some(2))
        );
        // The proto field names, unknown members, and nulls.
        assert_eq!(
            rejected(
                br#"{"x":[{"y":1}],"partial_success":{"rejected_data_points":"4","error_message":null}}"#
            ),
            Ok(Some(4))
        );
        assert_eq!(rejected(br#"{"partialSuccess":{}}"#), Ok(None));
        assert_eq!(rejected(br#"{"partialSuccess":null}"#), Ok(None));
        assert_eq!(
            rejected(br#"{"partialSuccess":{"rejectedDataPoints":"0"}}"#),
            Ok(None)
        );
        assert_eq!(rejected(b"{}"), Ok(None));
        assert_eq!(rejected(b""), Ok(None));
        assert_eq!(rejected(b" \r\n"), Ok(None));
    }

    #[test]
    fn a_malformed_answer_is_an_error_naming_the_field() {
        for (body, says) in [
            (
                &br#"{"partialSuccess":{"rejectedDataPoints":"x"}}"#[..],
                "rejectedDataPoints",
            ),
            (
                br#"{"partialSuccess":{"rejectedDataPoints":-1}}"#,
                "rejectedDataPoints",
            ),
            (br#"{"partialSuccess":{"errorMessage":7}}"#, "errorMessage"),
            (br#"{"partialSuccess":{"rejectedDataPoints":"1"}"#, "EOF"),
            (b"<html>", "not an OTLP export answer"),
        ] {
            let e = partial_success(body).unwrap_err();
            assert!(e.contains(says), "{:?}: {e}", String::from_utf8_lossy(body));
        }
    }
}
