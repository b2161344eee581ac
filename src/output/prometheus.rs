//! The Prometheus text exposition (format 0.0.4) of `GET /metrics`, for a
//! Prometheus server that scrapes the agent (docs/backends.md#prometheus).
//!
//! What the agent collects is named and labelled as node_exporter names it
//! (`node_cpu_seconds_total{cpu,mode}`, `node_memory_MemAvailable_bytes`,
//! `node_filesystem_avail_bytes{device,fstype,mountpoint}`, …), so that
//! dashboards made for node_exporter, "Node Exporter Full" among them, work
//! on a scrape of the agent. The agent's own figures are under
//! `guest_agent_`. One HELP and TYPE line per family, families with no
//! series left out, label values escaped, no series twice.

use std::collections::BTreeSet;
use std::io::Write;

use crate::sample::Sample;
use crate::sample::detail::{CPU_MODES, Detail, Disk};

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's kind.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}
use Kind::{Counter, Gauge};

/// Writes families one after the other into a buffer: [`Exposition::start`]
/// names a family, [`Exposition::series`] adds to it. A family's HELP and
/// TYPE are written with its first series, so a family with none is left
/// out. (Plain calls in loops, not iterator chains: this runs once per
/// scrape, and one non-generic writer keeps the binary small.)
struct Exposition<'a> {
    out: &'a mut Vec<u8>,
    name: String,
    help: String,
    kind: Kind,
    header: bool,
}

impl Exposition<'_> {
    fn start(&mut self, name: &str, kind: Kind, help: &str) {
        self.name.clear();
        self.name.push_str(name);
        self.help.clear();
        self.help.push_str(help);
        self.kind = kind;
        self.header = false;
    }

    fn series(&mut self, labels: &[(&str, &str)], value: f64) {
        if !value.is_finite() {
            return;
        }
        if !self.header {
            let kind = match self.kind {
                Counter => "counter",
                Gauge => "gauge",
            };
            let _ = writeln!(self.out, "# HELP {} {}", self.name, self.help);
            let _ = writeln!(self.out, "# TYPE {} {kind}", self.name);
            self.header = true;
        }
        self.out.extend_from_slice(self.name.as_bytes());
        if !labels.is_empty() {
            self.out.push(b'{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(b',');
                }
                self.out.extend_from_slice(k.as_bytes());
                self.out.extend_from_slice(b"=\"");
                escape_label(v, self.out);
                self.out.push(b'"');
            }
            self.out.push(b'}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A family of one series without labels, when the figure exists.
    fn single(&mut self, name: &str, kind: Kind, help: &str, value: Option<f64>) {
        self.start(name, kind, help);
        if let Some(v) = value {
            self.series(&[], v);
        }
    }
}

/// A label value as the text format carries it: backslash, double quote
/// and line feed escaped.
fn escape_label(v: &str, out: &mut Vec<u8>) {
    for c in v.chars() {
        match c {
            '\\' => out.extend_from_slice(b"\\\\"),
            '"' => out.extend_from_slice(b"\\\""),
            '\n' => out.extend_from_slice(b"\\n"),
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
}

/// Whether `name` was seen before: a second device of one name (which
/// the kernel does not make, but a fixture could) would be a duplicate
/// series.
fn again(seen: &mut BTreeSet<String>, name: &str) -> bool {
    !seen.insert(name.to_string())
}

/// A disk's figure, by index into the table in [`encode`].
fn disk_figure(d: &Disk, i: usize) -> f64 {
    match i {
        0 => d.reads as f64,
        1 => d.read_bytes as f64,
        2 => d.read_ms as f64 / 1000.0,
        3 => d.writes as f64,
        4 => d.written_bytes as f64,
        5 => d.write_ms as f64 / 1000.0,
        6 => d.in_progress as f64,
        _ => d.io_ms as f64 / 1000.0,
    }
}

/// The disk families: name, kind, help, in the order of [`disk_figure`].
const DISK_FAMILIES: [(&str, Kind, &str); 8] = [
    (
        "node_disk_reads_completed_total",
        Counter,
        "The total number of reads completed successfully.",
    ),
    (
        "node_disk_read_bytes_total",
        Counter,
        "The total number of bytes read successfully.",
    ),
    (
        "node_disk_read_time_seconds_total",
        Counter,
        "The total number of seconds spent by all reads.",
    ),
    (
        "node_disk_writes_completed_total",
        Counter,
        "The total number of writes completed successfully.",
    ),
    (
        "node_disk_written_bytes_total",
        Counter,
        "The total number of bytes written successfully.",
    ),
    (
        "node_disk_write_time_seconds_total",
        Counter,
        "This is the total number of seconds spent by all writes.",
    ),
    (
        "node_disk_io_now",
        Gauge,
        "The number of I/Os currently in progress.",
    ),
    (
        "node_disk_io_time_seconds_total",
        Counter,
        "Total seconds spent doing I/Os.",
    ),
];

/// Writes the exposition of `s` into `out` (appending), with `detail` when
/// the sample itself goes without it.
pub fn encode(s: &Sample, detail: Option<&Detail>, out: &mut Vec<u8>) {
    let mut e = Exposition {
        out,
        name: String::new(),
        help: String::new(),
        kind: Gauge,
        header: false,
    };
    let empty = Detail::default();
    let d = detail.or(s.detail.as_deref()).unwrap_or(&empty);

    e.start(
        "node_cpu_seconds_total",
        Counter,
        "Seconds the CPUs spent in each mode.",
    );
    for c in &d.cpus {
        let id = c.cpu.to_string();
        for (mode, v) in CPU_MODES.iter().zip(c.seconds) {
            e.series(&[("cpu", &id), ("mode", mode)], v);
        }
    }
    e.start(
        "node_cpu_guest_seconds_total",
        Counter,
        "Seconds the CPUs spent in guests (VMs) for each mode.",
    );
    for c in &d.cpus {
        let id = c.cpu.to_string();
        e.series(&[("cpu", &id), ("mode", "user")], c.guest.0);
        e.series(&[("cpu", &id), ("mode", "nice")], c.guest.1);
    }

    if let Some(m) = &d.memory {
        for (field, v) in [
            ("MemTotal", Some(m.total)),
            ("MemFree", Some(m.free)),
            ("MemAvailable", Some(m.available)),
            ("Buffers", Some(m.buffers)),
            ("Cached", Some(m.cached)),
            ("SReclaimable", m.slab_reclaimable),
            ("SwapTotal", Some(m.swap_total)),
            ("SwapFree", Some(m.swap_free)),
            // meminfo's own line on Linux 6.15+; the agent has the figure
            // from vmstat on older kernels too.
            ("Balloon", m.balloon),
        ] {
            e.single(
                &format!("node_memory_{field}_bytes"),
                Gauge,
                &format!("Memory information field {field}_bytes."),
                v.map(|v| v as f64),
            );
        }
    }

    for (name, help, v) in [
        ("node_load1", "1m load average.", s.load_average),
        ("node_load5", "5m load average.", s.load_average_5),
        ("node_load15", "15m load average.", s.load_average_15),
    ] {
        e.single(name, Gauge, help, v);
    }

    for (dir, side) in [("receive", 0), ("transmit", 1)] {
        for (i, (what, help)) in [
            ("bytes", "bytes"),
            ("packets", "packets"),
            ("errs", "errors"),
            ("drop", "dropped packets"),
        ]
        .into_iter()
        .enumerate()
        {
            e.start(
                &format!("node_network_{dir}_{what}_total"),
                Counter,
                &format!("Network device statistic {dir}_{what}: {help}."),
            );
            let mut seen = BTreeSet::new();
            for n in &d.interfaces {
                if again(&mut seen, &n.name) {
                    continue;
                }
                let v = if side == 0 {
                    n.receive[i]
                } else {
                    n.transmit[i]
                };
                e.series(&[("device", &n.name)], v as f64);
            }
        }
    }

    for (i, (name, kind, help)) in DISK_FAMILIES.into_iter().enumerate() {
        e.start(name, kind, help);
        let mut seen = BTreeSet::new();
        for k in &d.disks {
            if !again(&mut seen, &k.name) {
                e.series(&[("device", &k.name)], disk_figure(k, i));
            }
        }
    }

    if let Some(f) = &d.filesystem {
        let labels = [
            ("device", &*f.device),
            ("fstype", &*f.fstype),
            ("mountpoint", &*f.mountpoint),
        ];
        for (name, help, v) in [
            ("size_bytes", "Filesystem size in bytes.", f.size),
            ("free_bytes", "Filesystem free space in bytes.", f.free),
            (
                "avail_bytes",
                "Filesystem space available to non-root users in bytes.",
                f.avail,
            ),
            ("files", "Filesystem total file nodes.", f.files),
            (
                "files_free",
                "Filesystem total free file nodes.",
                f.files_free,
            ),
        ] {
            e.start(&format!("node_filesystem_{name}"), Gauge, help);
            e.series(&labels, v as f64);
        }
    }

    for (resource, p) in ["cpu", "memory", "io"].into_iter().zip(d.pressure) {
        let Some(p) = p else { continue };
        e.single(
            &format!("node_pressure_{resource}_waiting_seconds_total"),
            Counter,
            &format!("Total time in seconds that processes have waited for {resource}."),
            Some(p.some.total_us as f64 / 1e6),
        );
        e.single(
            &format!("node_pressure_{resource}_stalled_seconds_total"),
            Counter,
            &format!(
                "Total time in seconds no process could make progress due to {resource} congestion."
            ),
            p.full.map(|f| f.total_us as f64 / 1e6),
        );
    }

    let count = |v: Option<u64>| v.map(|v| v as f64);
    for (name, kind, help, v) in [
        (
            "node_boot_time_seconds",
            Gauge,
            "Node boot time, in unixtime.",
            count(d.boot_time),
        ),
        (
            "node_time_seconds",
            Gauge,
            "System time in seconds since epoch (1970).",
            Some(s.timestamp_ms as f64 / 1000.0),
        ),
        (
            "node_context_switches_total",
            Counter,
            "Total number of context switches.",
            count(d.context_switches),
        ),
        (
            "node_forks_total",
            Counter,
            "Total number of forks.",
            count(d.forks),
        ),
        (
            "node_procs_running",
            Gauge,
            "Number of processes in runnable state.",
            s.procs_running.map(f64::from),
        ),
        (
            "node_procs_blocked",
            Gauge,
            "Number of processes blocked waiting for I/O to complete.",
            s.procs_blocked.map(f64::from),
        ),
    ] {
        e.single(name, kind, help, v);
    }
    if let Some(u) = &d.uname {
        e.start(
            "node_uname_info",
            Gauge,
            "Labeled system information as provided by the uname system call.",
        );
        e.series(
            &[
                ("domainname", &u.domainname),
                ("machine", &u.machine),
                ("nodename", s.hostname.as_deref().unwrap_or("")),
                ("release", &u.release),
                ("sysname", &u.sysname),
                ("version", &u.version),
            ],
            1.0,
        );
    }

    // The agent's own figures.
    e.start(
        "guest_agent_info",
        Gauge,
        "The agent's version, run and VM, as labels.",
    );
    e.series(
        &[
            ("version", &s.agent_version),
            ("run_id", &s.run_id),
            ("vm_id", s.vm_id.as_deref().unwrap_or("")),
        ],
        1.0,
    );
    let ratio = |p: Option<f64>| p.map(|p| p / 100.0);
    let kib = |v: Option<u64>| v.map(|v| v as f64 * 1024.0);
    for (name, kind, help, v) in [
        (
            "guest_agent_cpu_busy_ratio",
            Gauge,
            "Share of the last window the CPUs were busy (user, nice, system, irq, softirq).",
            ratio(s.cpu_usage_percent),
        ),
        (
            "guest_agent_cpu_iowait_ratio",
            Gauge,
            "Share of the last window the CPUs were idle with I/O outstanding.",
            ratio(s.cpu_iowait_percent),
        ),
        (
            "guest_agent_cpu_steal_ratio",
            Gauge,
            "Share of the last window the hypervisor ran something else.",
            ratio(s.cpu_steal_percent),
        ),
        (
            "guest_agent_memory_used_ratio",
            Gauge,
            "Share of the usable memory in use (used / usable), the balloon excluded.",
            ratio(s.memory_usage_percent),
        ),
        (
            "guest_agent_memory_usable_bytes",
            Gauge,
            "Memory the guest can use now: MemTotal, less the balloon where MemTotal still counts it.",
            kib(s.memory_total_kb),
        ),
        (
            "guest_agent_memory_used_bytes",
            Gauge,
            "Memory the guest itself uses: usable - MemAvailable, never the balloon.",
            kib(s.memory_used_kb),
        ),
        (
            "guest_agent_window_seconds",
            Gauge,
            "Length of the window the CPU shares cover.",
            Some(s.window_ms as f64 / 1000.0),
        ),
        (
            "guest_agent_sample_sequence",
            Gauge,
            "Number of the latest sample in its run (1, 2, 3 ...).",
            Some(s.seq as f64),
        ),
        (
            "guest_agent_processes",
            Gauge,
            "Processes, the numeric entries of /proc.",
            count(s.process_count),
        ),
        (
            "guest_agent_dropped_samples_total",
            Counter,
            "Samples this process dropped because its buffer was full.",
            Some(s.dropped_samples as f64),
        ),
        (
            "guest_agent_restores_total",
            Counter,
            "Snapshot restores this process went through.",
            Some(s.restore_count as f64),
        ),
    ] {
        e.single(name, kind, help, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn exposition() -> String {
        let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/host"));
        let mut c = crate::collect::Collector::new(root, Some("vm-1".into())).unwrap();
        c.collect();
        let mut s = c.collect();
        s.seq = 2;
        let mut out = Vec::new();
        encode(&s, None, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn node_exporter_names_labels_and_one_header_per_family() {
        let text = exposition();
        for want in [
            "# TYPE node_cpu_seconds_total counter\n",
            "node_cpu_seconds_total{cpu=\"0\",mode=\"idle\"} ",
            "# TYPE node_memory_MemAvailable_bytes gauge\n",
            "node_load1 ",
            "node_network_receive_bytes_total{device=\"eth0\"} ",
            "node_filesystem_avail_bytes{device=\"/dev/vda\",fstype=\"ext4\",mountpoint=\"/\"} ",
            "node_pressure_memory_stalled_seconds_total ",
            "node_uname_info{domainname=\"(none)\",machine=\"",
            "guest_agent_sample_sequence 2\n",
        ] {
            assert!(text.contains(want), "{want:?} missing:\n{text}");
        }
        let (mut families, mut series) = (BTreeSet::new(), BTreeSet::new());
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let family = rest.split(' ').next().unwrap();
                assert!(families.insert(family), "two TYPE lines for {family}");
            } else if !line.starts_with('#') {
                let one = line.rsplit_once(' ').unwrap().0;
                assert!(series.insert(one), "{one} twice");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = Vec::new();
        escape_label("a\"b\\c\nd", &mut out);
        assert_eq!(out, b"a\\\"b\\\\c\\nd");
    }

    #[test]
    fn a_sample_without_detail_still_has_its_own_figures() {
        let mut out = Vec::new();
        encode(&crate::sample::fixture::sample(7), None, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("guest_agent_sample_sequence 7\n"), "{text}");
        assert!(!text.contains("node_cpu_seconds_total"), "{text}");
    }
}
