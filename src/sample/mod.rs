//! The sample: the wire contract of schema 1 (docs/design.md#the-sample).
//!
//! Every field is always present; a figure is `null` only where its source
//! does not exist on this kernel or failed to read this time. The struct,
//! the list of field names and the field-by-field walk that the Influx
//! encoder uses are generated from the one list below, so a new field cannot
//! reach one consumer and miss another.

pub mod detail;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use detail::Detail;

/// The schema number of [`Sample`]'s shape.
pub const SCHEMA: u32 = 1;

/// The agent's version, as carried in every sample.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One field's value, as [`Sample::visit`] hands it over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// A figure that is null in this sample.
    Null,
    /// A whole number (counts, bytes, KiB, milliseconds).
    Int(u64),
    /// A fractional figure (percentages, load, pressure).
    Float(f64),
    /// Text (ids, names, addresses).
    Text(&'a str),
}

/// A field type that [`Sample::visit`] can hand over as a [`Value`].
pub trait AsValue {
    /// The value of this field.
    fn as_value(&self) -> Value<'_>;
}

impl AsValue for u64 {
    fn as_value(&self) -> Value<'_> {
        Value::Int(*self)
    }
}

impl AsValue for u32 {
    fn as_value(&self) -> Value<'_> {
        Value::Int(u64::from(*self))
    }
}

impl AsValue for f64 {
    fn as_value(&self) -> Value<'_> {
        Value::Float(*self)
    }
}

impl AsValue for String {
    fn as_value(&self) -> Value<'_> {
        Value::Text(self)
    }
}

impl<T: AsValue> AsValue for Option<T> {
    fn as_value(&self) -> Value<'_> {
        self.as_ref().map_or(Value::Null, AsValue::as_value)
    }
}

/// Defines [`Sample`], [`FIELDS`] and [`Sample::visit`] from one field list.
macro_rules! schema {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty, )*) => {
        /// One measurement of the guest, as POSTed (in an array) and served by
        /// `/metrics`. Unknown fields are ignored when parsing, so that a
        /// consumer built against this version accepts a newer agent's samples.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub struct Sample {
            $( $(#[$doc])* pub $name: $ty, )*
            /// The figures behind the totals (per CPU, interface, disk),
            /// for the formats that carry them; not on the JSON wire.
            #[serde(skip)]
            pub detail: Option<Arc<Detail>>,
        }

        /// Every field name of the schema, in wire order.
        pub const FIELDS: &[&str] = &[ $( stringify!($name) ),* ];

        impl Sample {
            /// Calls `f` with every field's name and value, in wire order.
            pub fn visit(&self, mut f: impl FnMut(&'static str, Value<'_>)) {
                $( f(stringify!($name), AsValue::as_value(&self.$name)); )*
            }
        }
    };
}

schema! {
    /// Always [`SCHEMA`].
    schema: u32,
    /// The agent's crate version.
    agent_version: String,
    /// The VM id from configuration.
    vm_id: Option<String>,
    /// `sys/kernel/hostname`.
    hostname: Option<String>,
    /// `sys/kernel/random/boot_id`.
    boot_id: Option<String>,
    /// A UUID read once per agent process; (`run_id`, `seq`) is unique.
    run_id: String,
    /// 1, 2, 3… per agent process.
    seq: u64,
    /// Wall-clock milliseconds since the Unix epoch at collection.
    timestamp_ms: u64,
    /// Monotonic milliseconds covered by the CPU figures (0 for the first sample).
    window_ms: u64,
    /// The guest's source address toward the push target.
    guest_ip: Option<String>,
    /// CPUs listed in `stat`.
    cpu_count: Option<u32>,
    /// Busy share of the window (user+nice+system+irq+softirq), percent.
    cpu_usage_percent: Option<f64>,
    /// iowait share of the window, percent.
    cpu_iowait_percent: Option<f64>,
    /// steal share of the window, percent: time the hypervisor ran something else.
    cpu_steal_percent: Option<f64>,
    /// Runnable tasks, `stat`.
    procs_running: Option<u32>,
    /// Tasks blocked on I/O, `stat`.
    procs_blocked: Option<u32>,
    /// Numeric entries of the proc root.
    process_count: Option<u64>,
    /// 1-minute load average, `loadavg`.
    load_average: Option<f64>,
    /// 5-minute load average.
    load_average_5: Option<f64>,
    /// 15-minute load average.
    load_average_15: Option<f64>,
    /// Memory the guest can use now, KiB: MemTotal, less the balloon when
    /// the balloon's pages stay inside MemTotal (deflate-on-OOM).
    memory_total_kb: Option<u64>,
    /// MemAvailable (or its pre-3.14 estimate), KiB, at most the total.
    memory_available_kb: Option<u64>,
    /// total − available, KiB: the guest's own use, never the balloon.
    memory_used_kb: Option<u64>,
    /// used / total × 100.
    memory_usage_percent: Option<f64>,
    /// The virtio balloon's size, KiB (`Balloon:` in `meminfo`, else
    /// `vmstat`'s balloon counters); null where the kernel shows none.
    #[serde(default)]
    memory_balloon_kb: Option<u64>,
    /// SwapTotal, KiB.
    swap_total_kb: Option<u64>,
    /// SwapTotal − SwapFree, KiB.
    swap_used_kb: Option<u64>,
    /// Seconds since boot, `uptime`.
    uptime_seconds: Option<u64>,
    /// Cumulative bytes received, all interfaces but `lo`, `net/dev`.
    network_rx_bytes: Option<u64>,
    /// Cumulative bytes sent, all interfaces but `lo`.
    network_tx_bytes: Option<u64>,
    /// Cumulative bytes read from whole disks, `diskstats`.
    disk_read_bytes: Option<u64>,
    /// Cumulative bytes written to whole disks.
    disk_write_bytes: Option<u64>,
    /// Size of the root filesystem, KiB (statvfs).
    filesystem_total_kb: Option<u64>,
    /// Used space of the root filesystem, KiB.
    filesystem_used_kb: Option<u64>,
    /// `pressure/cpu` some avg10; null without PSI.
    pressure_cpu_some_avg10: Option<f64>,
    /// `pressure/memory` some avg10; null without PSI.
    pressure_memory_some_avg10: Option<f64>,
    /// `pressure/io` some avg10; null without PSI.
    pressure_io_some_avg10: Option<f64>,
    /// Samples this process dropped because the buffer was full.
    dropped_samples: u64,
    /// The `run_id` this run replaced when the VM was restored from a
    /// snapshot; null for a run that began with the process
    /// (docs/snapshots.md#the-sample-fields).
    #[serde(default)]
    restored_from_run_id: Option<String>,
    /// Snapshot restores this process has gone through; 0 for a fresh start.
    #[serde(default)]
    restore_count: u64,
}

/// The memory a queued sample takes: the struct, its text fields and the
/// shared pointer's counts. Allocator rounding is left out; the bound is
/// about orders of magnitude, not bytes.
pub fn footprint(sample: &Sample) -> usize {
    let mut text = 0;
    sample.visit(|_, v| {
        if let Value::Text(t) = v {
            text += t.len();
        }
    });
    let detail = sample.detail.as_deref().map_or(0, Detail::footprint);
    std::mem::size_of::<Sample>() + 2 * std::mem::size_of::<usize>() + text + detail
}

/// What a sample with typical ids and names takes ([`footprint`]); used to
/// say how many samples a byte bound holds before any was collected.
pub const TYPICAL_SAMPLE_BYTES: usize =
    std::mem::size_of::<Sample>() + 2 * std::mem::size_of::<usize>() + 160;

/// Fields added to schema 1 after its first agents shipped: a sample
/// without them is still a whole schema 1 sample, read as null and 0
/// (docs/snapshots.md#the-sample-fields).
const ADDED_LATER: [&str; 3] = ["restored_from_run_id", "restore_count", "memory_balloon_kb"];

impl Sample {
    /// Parses one sample from a JSON value, requiring every field of the
    /// schema to be present, but for those added later (null allowed only
    /// where the type is nullable), and `schema` to be [`SCHEMA`].
    pub fn from_json_strict(v: &serde_json::Value) -> Result<Sample, String> {
        let obj = v.as_object().ok_or("sample is not a JSON object")?;
        if let Some(missing) = FIELDS
            .iter()
            .find(|f| !obj.contains_key(**f) && !ADDED_LATER.contains(f))
        {
            return Err(format!("field {missing:?} is missing"));
        }
        let s: Sample = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        if s.schema != SCHEMA {
            return Err(format!("schema {} is not {SCHEMA}", s.schema));
        }
        Ok(s)
    }
}

/// A sample with every figure null, for the tests of the stages below it.
#[cfg(test)]
pub(crate) mod fixture {
    use super::Sample;

    /// Run `r`, number `seq`, nothing measured.
    pub(crate) fn sample(seq: u64) -> Sample {
        let json = serde_json::json!({
            "schema": 1, "agent_version": "t", "vm_id": null, "hostname": null,
            "boot_id": null, "run_id": "r", "seq": seq, "timestamp_ms": 0,
            "window_ms": 0, "guest_ip": null, "cpu_count": null,
            "cpu_usage_percent": null, "cpu_iowait_percent": null,
            "cpu_steal_percent": null, "procs_running": null, "procs_blocked": null,
            "process_count": null, "load_average": null, "load_average_5": null,
            "load_average_15": null, "memory_total_kb": null,
            "memory_available_kb": null, "memory_used_kb": null,
            "memory_usage_percent": null, "swap_total_kb": null, "swap_used_kb": null,
            "uptime_seconds": null, "network_rx_bytes": null, "network_tx_bytes": null,
            "disk_read_bytes": null, "disk_write_bytes": null,
            "filesystem_total_kb": null, "filesystem_used_kb": null,
            "pressure_cpu_some_avg10": null, "pressure_memory_some_avg10": null,
            "pressure_io_some_avg10": null, "dropped_samples": 0
        });
        match Sample::from_json_strict(&json) {
            Ok(s) => s,
            Err(e) => panic!("the fixture is a whole sample: {e}"),
        }
    }
}
