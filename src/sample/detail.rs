//! The figures behind a sample's totals, per CPU, interface, disk and
//! pressure line, for the formats that carry them: OTLP pushes and the
//! Prometheus exposition of `/metrics` (docs/backends.md). They are not part
//! of the JSON wire contract: never serialized with the sample, and absent
//! in a sample parsed from JSON.
//!
//! Counters are cumulative, as the kernel keeps them: seconds since boot
//! for CPU and PSI times, bytes and operations since boot for devices.

use std::sync::Arc;

/// CPU modes in the order of [`CpuTimes::seconds`] and
/// [`Detail::cpu_shares`], as `stat` lists them (node_exporter's `mode`
/// label values).
pub const CPU_MODES: [&str; 8] = [
    "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
];

/// One CPU's cumulative time per mode.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTimes {
    /// The CPU's number (`cpuN`).
    pub cpu: u32,
    /// Seconds in each of [`CPU_MODES`]; `guest` and `guest_nice` are
    /// inside `user` and `nice`.
    pub seconds: [f64; 8],
    /// Seconds running a guest: (`guest`, `guest_nice`).
    pub guest: (f64, f64),
}

/// Memory as `meminfo` reports it, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// MemTotal.
    pub total: u64,
    /// MemFree.
    pub free: u64,
    /// MemAvailable, or its estimate before Linux 3.14.
    pub available: u64,
    /// Buffers.
    pub buffers: u64,
    /// Cached.
    pub cached: u64,
    /// SReclaimable (since Linux 2.6.19).
    pub slab_reclaimable: Option<u64>,
    /// SwapTotal.
    pub swap_total: u64,
    /// SwapFree.
    pub swap_free: u64,
    /// The virtio balloon's size; `None` where the kernel shows none.
    pub balloon: Option<u64>,
    /// What the guest can use now: MemTotal, less the balloon where
    /// MemTotal still counts it (docs/design.md#memory-under-a-balloon).
    pub usable: u64,
}

/// One network interface's cumulative counters, `net/dev`.
#[derive(Debug, Clone, PartialEq)]
pub struct Interface {
    /// The interface's name (`eth0`, `lo`).
    pub name: String,
    /// Received: bytes, packets, errors, dropped.
    pub receive: [u64; 4],
    /// Sent: bytes, packets, errors, dropped.
    pub transmit: [u64; 4],
    /// When its counters began, ms since the epoch, for a device that
    /// appeared (or was reset) during the run; `None`: counting from boot.
    pub since_ms: Option<u64>,
}

/// One whole disk's cumulative counters, `diskstats`.
#[derive(Debug, Clone, PartialEq)]
pub struct Disk {
    /// The device's name (`vda`, `nvme0n1`).
    pub name: String,
    /// Reads completed.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Milliseconds spent reading.
    pub read_ms: u64,
    /// Writes completed.
    pub writes: u64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Milliseconds spent writing.
    pub write_ms: u64,
    /// I/Os in flight now.
    pub in_progress: u64,
    /// Milliseconds with I/O in flight.
    pub io_ms: u64,
    /// When its counters began, ms since the epoch, for a disk that
    /// appeared (or was reset) during the run; `None`: counting from boot.
    pub since_ms: Option<u64>,
}

/// The root filesystem, from statvfs and `mounts`.
#[derive(Debug, Clone, PartialEq)]
pub struct Filesystem {
    /// The mounted device (`/dev/vda`), as `mounts` names it; empty when
    /// `mounts` could not be read.
    pub device: Arc<str>,
    /// Its type (`ext4`).
    pub fstype: Arc<str>,
    /// Where it is mounted: `/`.
    pub mountpoint: Arc<str>,
    /// Size, bytes.
    pub size: u64,
    /// Free bytes, the root-reserved ones included.
    pub free: u64,
    /// Bytes free for unprivileged users.
    pub avail: u64,
    /// Inodes.
    pub files: u64,
    /// Free inodes.
    pub files_free: u64,
}

/// One `pressure/*` line: averages in percent, total stall time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stall {
    /// Percent of the last 10, 60 and 300 seconds.
    pub avg: [f64; 3],
    /// Microseconds stalled since boot.
    pub total_us: u64,
}

/// One resource's pressure: its `some` line, and its `full` line where the
/// kernel has one (not for CPU before Linux 5.13).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pressure {
    /// Some tasks stalled.
    pub some: Stall,
    /// All non-idle tasks stalled.
    pub full: Option<Stall>,
}

/// The kernel's identity, as `uname` gives it (`node_uname_info`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Uname {
    /// `sys/kernel/ostype` (`Linux`).
    pub sysname: String,
    /// `sys/kernel/osrelease`.
    pub release: String,
    /// `sys/kernel/version`.
    pub version: String,
    /// The machine's architecture (`x86_64`).
    pub machine: String,
    /// `sys/kernel/domainname`.
    pub domainname: String,
}

/// Everything behind one sample's totals. Each part is empty or `None`
/// where its source failed this time, as the sample's own figure is null.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Detail {
    /// Per CPU, in the order of `stat`.
    pub cpus: Vec<CpuTimes>,
    /// Each mode's share (0–1) of the window, all CPUs together, in the
    /// order of [`CPU_MODES`]; they sum to 1.
    pub cpu_shares: Option<[f64; 8]>,
    /// Boot time, seconds since the epoch (`stat` btime).
    pub boot_time: Option<u64>,
    /// Context switches since boot.
    pub context_switches: Option<u64>,
    /// Processes created since boot.
    pub forks: Option<u64>,
    /// Memory, bytes.
    pub memory: Option<Memory>,
    /// Every interface, loopback included.
    pub interfaces: Vec<Interface>,
    /// Whole disks.
    pub disks: Vec<Disk>,
    /// The root filesystem.
    pub filesystem: Option<Filesystem>,
    /// CPU, memory and I/O pressure; `None` without PSI.
    pub pressure: [Option<Pressure>; 3],
    /// The kernel's identity, read once.
    pub uname: Option<Arc<Uname>>,
}

impl Detail {
    /// Bytes this takes in memory beyond its own struct, for the buffer's
    /// byte bound.
    pub fn footprint(&self) -> usize {
        use std::mem::size_of;
        size_of::<Detail>()
            + self.cpus.capacity() * size_of::<CpuTimes>()
            + self.interfaces.capacity() * size_of::<Interface>()
            + self
                .interfaces
                .iter()
                .map(|i| i.name.capacity())
                .sum::<usize>()
            + self.disks.capacity() * size_of::<Disk>()
            + self.disks.iter().map(|d| d.name.capacity()).sum::<usize>()
    }
}
