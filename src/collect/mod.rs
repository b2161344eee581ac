//! Collection: one module per /proc source, and the [`Collector`] that reads
//! them all into one [`Sample`].
//!
//! Every source module is a pure function from the file's bytes to a typed
//! reading, built on procfs's parsers. The collector keeps each file open
//! ([`ProcFile`]) and remembers the previous CPU reading for the window. A
//! source that fails is logged once (and again when it recovers), its figures
//! are null in that sample, and the others still go out.

pub mod balloon;
pub mod cpu;
pub mod diskstats;
pub mod filesystem;
pub mod identity;
pub mod loadavg;
pub mod meminfo;
pub mod net_dev;
pub mod pressure;
pub mod proc_file;
pub mod processes;
pub mod route;
pub mod stat;
pub mod totals;
pub mod uptime;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::sample::detail::{CpuTimes, Detail, Filesystem, Memory, Uname};
use crate::sample::{AGENT_VERSION, SCHEMA, Sample};
use cpu::{CpuPercent, CpuSnapshot};
pub use proc_file::ProcFile;

/// Rounds to two decimals, the precision the kernel prints load and PSI with
/// (procfs hands them over as `f32`, whose widening shows noise digits).
fn round2(x: f32) -> f64 {
    round_pct(x as f64)
}

/// Rounds a percentage to two decimals: finer than any reader of `top` or
/// `free` needs, and it keeps every body short.
fn round_pct(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Where sysfs is unless the `sys_root` setting says otherwise.
pub const DEFAULT_SYS_ROOT: &str = "/sys";

/// Reads every source under one proc root into samples.
#[derive(Debug)]
pub struct Collector {
    root: PathBuf,
    fs_root: PathBuf,
    stat: ProcFile,
    meminfo: ProcFile,
    loadavg: ProcFile,
    uptime: ProcFile,
    net_dev: ProcFile,
    diskstats: ProcFile,
    psi: [ProcFile; 3],
    hostname: ProcFile,
    processes: processes::ProcessCounter,
    balloon: balloon::BalloonReader,
    net_totals: totals::DeviceTotals,
    disk_totals: totals::DeviceTotals,
    /// Kernel clock ticks per second, for CPU times in seconds.
    ticks: f64,
    /// What is mounted at `/` (device, type), read once.
    root_mount: (Arc<str>, Arc<str>),
    uname: Arc<Uname>,
    boot_id: Option<String>,
    run_id: String,
    vm_id: Option<String>,
    restored_from_run_id: Option<String>,
    restore_count: u64,
    prev_cpu: Option<(Instant, CpuSnapshot)>,
    last_pct: CpuPercent,
    failing: BTreeMap<&'static str, String>,
    failing_changed: bool,
}

impl Collector {
    /// A collector over `proc_root`. Reads the boot id and a fresh run id
    /// (`sys/kernel/random/uuid`) once; fails only if the run id cannot be
    /// had, since (`run_id`, `seq`) must be unique.
    pub fn new(proc_root: &Path, vm_id: Option<String>) -> Result<Collector> {
        let run_id =
            ProcFile::new(proc_root, "sys/kernel/random/uuid").parse(identity::parse_line)?;
        let boot_id = ProcFile::new(proc_root, "sys/kernel/random/boot_id")
            .parse(identity::parse_line)
            .map_err(|e| log::warn!("boot_id unavailable: {e}"))
            .ok();
        let line = |rel: &str| {
            ProcFile::new(proc_root, rel)
                .parse(identity::parse_line)
                .unwrap_or_default()
        };
        let uname = Arc::new(Uname {
            sysname: line("sys/kernel/ostype"),
            release: line("sys/kernel/osrelease"),
            version: line("sys/kernel/version"),
            // The binary's own: a guest kernel runs what it was built for.
            machine: std::env::consts::ARCH.to_string(),
            domainname: line("sys/kernel/domainname"),
        });
        let root_mount = ProcFile::new(proc_root, "mounts")
            .parse(filesystem::root_mount)
            .map_err(|e| log::warn!("the root filesystem's device and type are unknown: {e}"))
            .ok()
            .flatten()
            .unwrap_or_default();
        Ok(Collector {
            ticks: rustix::param::clock_ticks_per_second() as f64,
            root_mount: (root_mount.0.into(), root_mount.1.into()),
            uname,
            root: proc_root.to_path_buf(),
            fs_root: PathBuf::from("/"),
            stat: ProcFile::new(proc_root, "stat"),
            meminfo: ProcFile::new(proc_root, "meminfo"),
            loadavg: ProcFile::new(proc_root, "loadavg"),
            uptime: ProcFile::new(proc_root, "uptime"),
            net_dev: ProcFile::new(proc_root, "net/dev"),
            diskstats: ProcFile::new(proc_root, "diskstats"),
            psi: [
                ProcFile::new(proc_root, "pressure/cpu"),
                ProcFile::new(proc_root, "pressure/memory"),
                ProcFile::new(proc_root, "pressure/io"),
            ],
            hostname: ProcFile::new(proc_root, "sys/kernel/hostname"),
            processes: processes::ProcessCounter::new(proc_root),
            balloon: balloon::BalloonReader::new(proc_root, Path::new(DEFAULT_SYS_ROOT)),
            net_totals: totals::DeviceTotals::default(),
            disk_totals: totals::DeviceTotals::default(),
            boot_id,
            run_id,
            vm_id,
            restored_from_run_id: None,
            restore_count: 0,
            prev_cpu: None,
            last_pct: CpuPercent::default(),
            failing: BTreeMap::new(),
            failing_changed: false,
        })
    }

    /// Reads `/sys` files (the balloon device's) under `sys_root` instead
    /// of `/sys`.
    pub fn with_sys_root(mut self, sys_root: &Path) -> Collector {
        self.balloon = balloon::BalloonReader::new(&self.root, sys_root);
        self
    }

    /// The run id every sample of this collector carries.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Starts a new run after a snapshot restore (docs/snapshots.md): a
    /// fresh `run_id`, read now that the kernel has reseeded its random pool,
    /// the restore marker, and `vm_id` when one is given. Returns the
    /// previous run id; on failure nothing changes.
    pub fn restart_run(&mut self, vm_id: Option<String>) -> Result<String> {
        let run_id =
            ProcFile::new(&self.root, "sys/kernel/random/uuid").parse(identity::parse_line)?;
        let previous = std::mem::replace(&mut self.run_id, run_id);
        self.restored_from_run_id = Some(previous.clone());
        self.restore_count += 1;
        if vm_id.is_some() {
            self.vm_id = vm_id;
        }
        Ok(previous)
    }

    /// Gives a sample collected before [`Collector::restart_run`] the
    /// current run's identity.
    pub fn relabel(&self, sample: &mut Sample) {
        sample.run_id.clone_from(&self.run_id);
        sample.vm_id.clone_from(&self.vm_id);
        sample
            .restored_from_run_id
            .clone_from(&self.restored_from_run_id);
        sample.restore_count = self.restore_count;
    }

    /// Sources failing at the last collection, with their errors.
    pub fn failures(&self) -> &BTreeMap<&'static str, String> {
        &self.failing
    }

    /// Whether the set of failing sources changed since the last call, so
    /// the status is updated only then.
    pub fn take_failures_changed(&mut self) -> bool {
        std::mem::take(&mut self.failing_changed)
    }

    /// Reads every source once. `seq`, `guest_ip` and `dropped_samples` are
    /// left for the caller (0, null, 0), who owns the numbering and the buffer.
    pub fn collect(&mut self) -> Sample {
        let timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);

        let now = Instant::now();
        let mut detail = Detail {
            uname: Some(self.uname.clone()),
            ..Detail::default()
        };
        let stat = self.stat.parse(stat::parse);
        let stat = self.note("stat", stat);
        let (mut window_ms, mut pct) = (0, None);
        let mut cpu_figures = None;
        if let Some(s) = stat {
            if let Some((then, prev)) = &self.prev_cpu {
                window_ms = now.duration_since(*then).as_millis() as u64;
                self.last_pct = cpu::percentages(prev, &s.cpus, self.last_pct);
                detail.cpu_shares = Some(self.last_pct.shares);
            }
            pct = Some(self.last_pct);
            cpu_figures = Some((s.cpus.cpus.len() as u32, s.procs_running, s.procs_blocked));
            let secs = |t: u64| t as f64 / self.ticks;
            detail.cpus = s
                .cpus
                .cpus
                .iter()
                .zip(&s.guest)
                .map(|((cpu, t), (g, gn))| CpuTimes {
                    cpu: *cpu,
                    seconds: t.modes().map(secs),
                    guest: (secs(*g), secs(*gn)),
                })
                .collect();
            detail.boot_time = Some(s.boot_time);
            detail.context_switches = Some(s.context_switches);
            detail.forks = Some(s.forks);
            // The reading becomes the next window's start: moved, not copied.
            self.prev_cpu = Some((now, s.cpus));
        }

        let mem = self.meminfo.parse(meminfo::parse);
        let mem = self.note("meminfo", mem);
        // The balloon is read only beside a meminfo it corrects.
        let (balloon_kb, in_mem_total) = match mem {
            Some(m) => self.balloon(m.balloon_kb),
            None => (None, false),
        };
        let figures = mem.map(|m| m.figures(balloon_kb, in_mem_total));
        detail.memory = mem.zip(figures).map(|(m, f)| Memory {
            balloon: balloon_kb.map(|b| b.saturating_mul(1024)),
            usable: f.total_kb.saturating_mul(1024),
            available: m.bytes.available.min(f.total_kb.saturating_mul(1024)),
            ..m.bytes
        });
        let load = self.loadavg.parse(loadavg::parse);
        let load = self.note("loadavg", load);
        let uptime = self.uptime.parse(uptime::parse);
        let uptime = self.note("uptime", uptime);
        let net = self.net_dev.parse(net_dev::parse);
        // Totals over every device of the run, gone ones included.
        let net = self.note("net/dev", net).map(|n| {
            detail.interfaces = n.interfaces;
            self.net_totals.update(&mut detail.interfaces, timestamp_ms)
        });
        let disk = optional(self.diskstats.parse(diskstats::parse));
        let disk = self.note("diskstats", disk).flatten().map(|d| {
            detail.disks = d.disks;
            self.disk_totals.update(&mut detail.disks, timestamp_ms)
        });
        let mut psi = [None; 3];
        for (i, name) in ["pressure/cpu", "pressure/memory", "pressure/io"]
            .into_iter()
            .enumerate()
        {
            let r = optional(self.psi[i].parse(pressure::parse));
            detail.pressure[i] = self.note(name, r).flatten();
            psi[i] = detail.pressure[i].map(|p| round_pct(p.some.avg[0]));
        }
        let hostname = self.hostname.parse(identity::parse_line);
        let hostname = self.note("hostname", hostname);
        let procs = self.processes.count().map_err(|source| Error::Read {
            path: self.root.clone(),
            source,
        });
        let procs = self.note("processes", procs);
        let fs = filesystem::usage(&self.fs_root).map_err(|source| Error::Read {
            path: self.fs_root.clone(),
            source,
        });
        let fs = self.note("filesystem", fs).map(|u| {
            detail.filesystem = Some(Filesystem {
                device: self.root_mount.0.clone(),
                fstype: self.root_mount.1.clone(),
                mountpoint: "/".into(),
                size: u.size,
                free: u.free,
                avail: u.avail,
                files: u.files,
                files_free: u.files_free,
            });
            u.kib()
        });

        Sample {
            schema: SCHEMA,
            agent_version: AGENT_VERSION.to_string(),
            vm_id: self.vm_id.clone(),
            hostname,
            boot_id: self.boot_id.clone(),
            run_id: self.run_id.clone(),
            seq: 0,
            timestamp_ms,
            window_ms,
            guest_ip: None,
            cpu_count: cpu_figures.map(|c| c.0),
            cpu_usage_percent: pct.map(|p| round_pct(p.usage)),
            cpu_iowait_percent: pct.map(|p| round_pct(p.iowait)),
            cpu_steal_percent: pct.map(|p| round_pct(p.steal)),
            procs_running: cpu_figures.and_then(|c| c.1),
            procs_blocked: cpu_figures.and_then(|c| c.2),
            process_count: procs,
            load_average: load.map(|l| round2(l[0])),
            load_average_5: load.map(|l| round2(l[1])),
            load_average_15: load.map(|l| round2(l[2])),
            memory_total_kb: figures.map(|f| f.total_kb),
            memory_available_kb: figures.map(|f| f.available_kb),
            memory_used_kb: figures.map(|f| f.used_kb),
            memory_usage_percent: figures.map(|f| round_pct(f.usage_percent)),
            memory_balloon_kb: balloon_kb,
            swap_total_kb: mem.map(|m| m.swap_total_kb),
            swap_used_kb: mem.map(|m| m.swap_used_kb),
            uptime_seconds: uptime,
            network_rx_bytes: net.map(|n| n[0]),
            network_tx_bytes: net.map(|n| n[1]),
            disk_read_bytes: disk.map(|d| d[0]),
            disk_write_bytes: disk.map(|d| d[1]),
            filesystem_total_kb: fs.map(|f| f.0),
            filesystem_used_kb: fs.map(|f| f.1),
            pressure_cpu_some_avg10: psi[0],
            pressure_memory_some_avg10: psi[1],
            pressure_io_some_avg10: psi[2],
            dropped_samples: 0,
            restored_from_run_id: self.restored_from_run_id.clone(),
            restore_count: self.restore_count,
            detail: Some(Arc::new(detail)),
        }
    }

    /// The balloon's size (`meminfo_kb` when meminfo had it) and whether
    /// MemTotal counts it; a part that fails is noted, and the balloon is
    /// then taken as unknown or not counted in MemTotal.
    fn balloon(&mut self, meminfo_kb: Option<u64>) -> (Option<u64>, bool) {
        let kb = self.balloon.size_kb(meminfo_kb);
        let kb = self.note("vmstat", kb).flatten();
        let in_total = self.balloon.in_mem_total(kb.unwrap_or(0));
        let in_total = self.note("balloon device", in_total).unwrap_or(false);
        (kb, in_total)
    }

    /// Keeps a source's value, or records its failure: logged when it starts
    /// or changes, and once more when the source recovers, never every sample.
    fn note<T>(&mut self, source: &'static str, r: Result<T>) -> Option<T> {
        match r {
            Ok(v) => {
                if self.failing.remove(source).is_some() {
                    self.failing_changed = true;
                    log::info!("{source}: reading again");
                }
                Some(v)
            }
            Err(e) => {
                let msg = e.to_string();
                if self.failing.get(source) != Some(&msg) {
                    log::warn!("{source}: {msg}; its figures are null until it recovers");
                    self.failing.insert(source, msg);
                    self.failing_changed = true;
                }
                None
            }
        }
    }
}

/// An absent file is not a failure for an optional source: its figures are
/// null because this kernel does not have it.
fn optional<T>(r: Result<T>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}
