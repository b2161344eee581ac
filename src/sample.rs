//! The sample: the wire contract of schema 1 (GUIDE §3).
//!
//! Every field is always present; a figure is `null` only where its source
//! does not exist on this kernel or failed to read this time.

use serde::{Deserialize, Serialize};

/// The schema number of [`Sample`]'s shape.
pub const SCHEMA: u32 = 1;

/// One measurement of the guest, as POSTed (in an array) and served by `/metrics`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    /// Always [`SCHEMA`].
    pub schema: u32,
    /// The agent's crate version.
    pub agent_version: String,
    /// The VM id from configuration.
    pub vm_id: Option<String>,
    /// `sys/kernel/hostname`.
    pub hostname: Option<String>,
    /// `sys/kernel/random/boot_id`.
    pub boot_id: Option<String>,
    /// A UUID read once per agent process; (`run_id`, `seq`) is unique.
    pub run_id: String,
    /// 1, 2, 3… per agent process.
    pub seq: u64,
    /// Wall-clock milliseconds since the Unix epoch at collection.
    pub timestamp_ms: u64,
    /// Monotonic milliseconds covered by the CPU figures (0 for the first sample).
    pub window_ms: u64,
    /// The guest's source address toward the push target.
    pub guest_ip: Option<String>,
    /// CPUs listed in `stat`.
    pub cpu_count: Option<u32>,
    /// Busy share of the window (user+nice+system+irq+softirq), percent.
    pub cpu_usage_percent: Option<f64>,
    /// iowait share of the window, percent.
    pub cpu_iowait_percent: Option<f64>,
    /// steal share of the window, percent: time the hypervisor ran something else.
    pub cpu_steal_percent: Option<f64>,
    /// Runnable tasks, `stat`.
    pub procs_running: Option<u32>,
    /// Tasks blocked on I/O, `stat`.
    pub procs_blocked: Option<u32>,
    /// Numeric entries of the proc root.
    pub process_count: Option<u64>,
    /// 1-minute load average, `loadavg`.
    pub load_average: Option<f64>,
    /// 5-minute load average.
    pub load_average_5: Option<f64>,
    /// 15-minute load average.
    pub load_average_15: Option<f64>,
    /// MemTotal, KiB.
    pub memory_total_kb: Option<u64>,
    /// MemAvailable (or its pre-3.14 estimate), KiB.
    pub memory_available_kb: Option<u64>,
    /// total − available, KiB.
    pub memory_used_kb: Option<u64>,
    /// used / total × 100.
    pub memory_usage_percent: Option<f64>,
    /// SwapTotal, KiB.
    pub swap_total_kb: Option<u64>,
    /// SwapTotal − SwapFree, KiB.
    pub swap_used_kb: Option<u64>,
    /// Seconds since boot, `uptime`.
    pub uptime_seconds: Option<u64>,
    /// Cumulative bytes received, all interfaces but `lo`, `net/dev`.
    pub network_rx_bytes: Option<u64>,
    /// Cumulative bytes sent, all interfaces but `lo`.
    pub network_tx_bytes: Option<u64>,
    /// Cumulative bytes read from whole disks, `diskstats`.
    pub disk_read_bytes: Option<u64>,
    /// Cumulative bytes written to whole disks.
    pub disk_write_bytes: Option<u64>,
    /// Size of the root filesystem, KiB (statvfs).
    pub filesystem_total_kb: Option<u64>,
    /// Used space of the root filesystem, KiB.
    pub filesystem_used_kb: Option<u64>,
    /// `pressure/cpu` some avg10; null without PSI.
    pub pressure_cpu_some_avg10: Option<f64>,
    /// `pressure/memory` some avg10; null without PSI.
    pub pressure_memory_some_avg10: Option<f64>,
    /// `pressure/io` some avg10; null without PSI.
    pub pressure_io_some_avg10: Option<f64>,
    /// Samples this process dropped because the buffer was full.
    pub dropped_samples: u64,
    /// The `run_id` this run replaced when the VM was restored from a
    /// snapshot; null for a run that began with the process
    /// (docs/snapshots.md). Absent in samples of older agents.
    #[serde(default)]
    pub restored_from_run_id: Option<String>,
    /// Snapshot restores this process has gone through; 0 for a fresh
    /// start. Absent in samples of older agents.
    #[serde(default)]
    pub restore_count: u64,
}

/// Every field name of the schema, in wire order. Used to check that a JSON
/// object carries all of them (serde accepts a missing `Option` as null).
pub const FIELDS: &[&str] = &[
    "schema",
    "agent_version",
    "vm_id",
    "hostname",
    "boot_id",
    "run_id",
    "seq",
    "timestamp_ms",
    "window_ms",
    "guest_ip",
    "cpu_count",
    "cpu_usage_percent",
    "cpu_iowait_percent",
    "cpu_steal_percent",
    "procs_running",
    "procs_blocked",
    "process_count",
    "load_average",
    "load_average_5",
    "load_average_15",
    "memory_total_kb",
    "memory_available_kb",
    "memory_used_kb",
    "memory_usage_percent",
    "swap_total_kb",
    "swap_used_kb",
    "uptime_seconds",
    "network_rx_bytes",
    "network_tx_bytes",
    "disk_read_bytes",
    "disk_write_bytes",
    "filesystem_total_kb",
    "filesystem_used_kb",
    "pressure_cpu_some_avg10",
    "pressure_memory_some_avg10",
    "pressure_io_some_avg10",
    "dropped_samples",
];

impl Sample {
    /// Parses one sample from a JSON value, requiring every field of the
    /// schema to be present (null allowed only where the type is nullable)
    /// and `schema` to be [`SCHEMA`].
    pub fn from_json_strict(v: &serde_json::Value) -> Result<Sample, String> {
        let obj = v.as_object().ok_or("sample is not a JSON object")?;
        if let Some(missing) = FIELDS.iter().find(|f| !obj.contains_key(**f)) {
            return Err(format!("field {missing:?} is missing"));
        }
        let s: Sample = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        if s.schema != SCHEMA {
            return Err(format!("schema {} is not {SCHEMA}", s.schema));
        }
        Ok(s)
    }
}
