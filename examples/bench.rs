//! The benchmark behind docs/performance.md, in one run on this machine.
//!
//! Its headline is the cost as deployed: the shipped static musl binary as a
//! process at a fixed cadence pushing to a loopback receiver, beside a floor
//! probe built the same way (examples/floor_probe.rs: only the work no
//! collector of the sample can avoid), node_exporter and collectd, all
//! running at once; whole-process CPU per sample, RSS, threads and bytes on
//! the wire, as ratios to the floor. Then the breakdown: the hot loop beside
//! the hot floor, per /proc source, allocations per sample, memory over a
//! long run, and binary size. Prints Markdown tables.
//!
//! ```text
//! cargo run --release --example bench [-- --quick] [--samples N] [--scrapes N] [--long N]
//! ```
//!
//! It builds the static musl agent and probe it runs (the musl target must be
//! installed). In-process CPU figures are the calling thread's CPU clock
//! (`CLOCK_THREAD_CPUTIME_ID`) around each iteration, so a loopback
//! receiver's work is counted apart. All traffic stays on 127.0.0.1; every
//! thread and process started here is stopped when the run ends, or when it
//! fails (kill on drop).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::error::Error;
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_agent::collect::{
    ProcFile, balloon, diskstats, filesystem, identity, loadavg, meminfo, net_dev, pressure,
    processes, stat, uptime,
};
use guest_agent::config::{self, Format};
use guest_agent::internals::{Buffer, Outcome, Sender, Status, Target};
use guest_agent::internals::{encode, encode_prometheus};
use guest_agent::{Collector, Sample};

#[allow(dead_code)] // the probe's process entry points are the example's
#[path = "support/floor.rs"]
mod floor;

#[path = "support/deployed.rs"]
mod deployed;

#[path = "support/ingest_memory.rs"]
mod ingest_memory;

type Res<T> = Result<T, Box<dyn Error>>;

// ---------------------------------------------------------------- allocations

/// Counts this thread's allocations, so that a loop's allocations per
/// iteration are its own and not a receiver thread's.
struct Counting;

thread_local! {
    // `const` and `Cell`: no lazy initialisation and no destructor, so the
    // allocator never re-enters itself.
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static ALLOC_BYTES: Cell<u64> = const { Cell::new(0) };
}

fn count_alloc(bytes: usize) {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    let _ = ALLOC_BYTES.try_with(|c| c.set(c.get() + bytes as u64));
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters only read and write this thread's cells.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_alloc(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_alloc(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_alloc(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations (calls to alloc, alloc_zeroed or realloc) and bytes asked for
/// per call of `f`, over `n` calls after a warm-up.
fn allocs_per(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..n / 10 + 1 {
        f();
    }
    let (a0, b0) = (ALLOCS.with(Cell::get), ALLOC_BYTES.with(Cell::get));
    for _ in 0..n {
        f();
    }
    let (a1, b1) = (ALLOCS.with(Cell::get), ALLOC_BYTES.with(Cell::get));
    ((a1 - a0) as f64 / n as f64, (b1 - b0) as f64 / n as f64)
}

const NODE_EXPORTER: &str = "/usr/bin/prometheus-node-exporter";
/// The shortest interval the agent accepts; the memory children run at it.
const CHILD_INTERVAL: Duration = Duration::from_millis(100);
/// The default buffer (docs/design.md#configuration), filled by the outage child.
const BUFFER: usize = 1000;
const MIB: f64 = 1024.0 * 1024.0;

const USAGE: &str = "usage: bench [--quick] [--samples N] [--scrapes N] [--long N] [--slices N] [--only WHAT]
  --quick       shorter run (under a minute): fewer iterations, a 20 s as-deployed run,
                a short memory-growth loop
  --slices N    5-second slices of the as-deployed run (default 12; quick 4)
  --runs N      alternating runs of the fair comparison (agent, floor + ureq, floor;
                default 5 of 30 s each; quick 2 of 10 s)
  --samples N   timed iterations per CPU figure (default 5000; quick 1000)
  --scrapes N   node_exporter scrapes (default 500; quick 100)
  --long N      iterations of the in-process memory-growth loop (default 200000, about
                50 s; quick 10000); --long 1000000 for the million samples of docs/design.md#budgets (about 4 min)
  --agent-args 'ARGS'  one more guest-agent row in the as-deployed run, with these
                arguments added (repeatable), to compare settings side by side
  --agent-bin PATH  one more row: another build of the agent (an earlier commit's
                static binary), to compare builds in one run (repeatable)
  --only WHAT   run one loop of --samples iterations and print its figure, for a
                profiler (perf record, valgrind --tool=callgrind): collect, encode, push,
                floor; `deployed` for the as-deployed table alone, `fair` for the
                alternating runs alone, `formats` for the encode cost per wire format,
                `sources` for the CPU per /proc and /sys source, `allocs` for the
                allocations per sample, `ingest` for the ingest kit's memory under
                hostile bodies (docs/manager.md#what-the-kit-keeps-in-memory)";

struct Opts {
    samples: usize,
    scrapes: usize,
    long: u64,
    /// Samples each agent child collects before its last memory reading.
    child_samples: u64,
    slices: u32,
    /// Runs of the fair comparison, and 5-second slices in each.
    runs: u32,
    fair_slices: u32,
    only: Option<String>,
    /// Extra guest-agent rows of the as-deployed run.
    agent_variants: Vec<deployed::Variant>,
}

fn opts() -> Res<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = Opts {
        samples: if quick { 1000 } else { 5000 },
        scrapes: if quick { 100 } else { 500 },
        long: if quick { 10_000 } else { 200_000 },
        child_samples: if quick { 50 } else { 1000 },
        slices: if quick { 4 } else { 12 },
        runs: if quick { 2 } else { 5 },
        fair_slices: if quick { 2 } else { 6 },
        only: None,
        agent_variants: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Res<u64> {
            let v = it.next().ok_or(format!("{name} needs a number"))?;
            Ok(v.parse()
                .map_err(|_| format!("{name}: {v:?} is not a number"))?)
        };
        match a.as_str() {
            "--quick" => {}
            "--samples" => o.samples = num("--samples")?.max(10) as usize,
            "--scrapes" => o.scrapes = num("--scrapes")?.max(10) as usize,
            "--long" => o.long = num("--long")?.max(1000),
            "--slices" => o.slices = num("--slices")?.clamp(1, 1000) as u32,
            "--runs" => o.runs = num("--runs")?.clamp(1, 100) as u32,
            "--only" => o.only = Some(it.next().ok_or("--only needs a loop name")?.clone()),
            "--agent-args" => o.agent_variants.push(deployed::Variant {
                binary: None,
                args: it
                    .next()
                    .ok_or("--agent-args needs the arguments, quoted as one")?
                    .split_whitespace()
                    .map(str::to_string)
                    .collect(),
            }),
            "--agent-bin" => o.agent_variants.push(deployed::Variant {
                binary: Some(PathBuf::from(it.next().ok_or("--agent-bin needs a path")?)),
                args: Vec::new(),
            }),
            "--bench" => {} // passed by `cargo bench`-style runners
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    Ok(o)
}

// ---------------------------------------------------------------- timing

/// This thread's CPU time, ns.
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Median, p99 and mean of per-iteration figures, µs.
#[derive(Clone, Copy, Default)]
struct Dist {
    median: f64,
    p99: f64,
    mean: f64,
}

impl Dist {
    fn of(mut ns: Vec<u64>) -> Dist {
        if ns.is_empty() {
            return Dist::default();
        }
        ns.sort_unstable();
        let at = |q: usize| ns[(ns.len() * q / 100).min(ns.len() - 1)] as f64 / 1000.0;
        Dist {
            median: at(50),
            p99: at(99),
            mean: ns.iter().sum::<u64>() as f64 / ns.len() as f64 / 1000.0,
        }
    }
}

/// Thread CPU and wall time of each of `n` calls of `f`, after `n / 10`
/// untimed warm-up calls.
struct Timed {
    cpu: Dist,
    wall: Dist,
}

fn measure(n: usize, mut f: impl FnMut()) -> Timed {
    for _ in 0..n / 10 {
        f();
    }
    let (mut cpu, mut wall) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let w0 = Instant::now();
        let c0 = thread_cpu_ns();
        f();
        let c1 = thread_cpu_ns();
        wall.push(w0.elapsed().as_nanos() as u64);
        cpu.push(c1.saturating_sub(c0));
    }
    Timed {
        cpu: Dist::of(cpu),
        wall: Dist::of(wall),
    }
}

// ---------------------------------------------------------------- receiver

/// What a receiver has seen.
#[derive(Default)]
struct RecvStats {
    requests: AtomicU64,
    samples: AtomicU64,
    body_bytes: AtomicU64,
    /// CPU time of the connection threads, ns (reading, parsing, answering).
    cpu_ns: AtomicU64,
    /// When the last request arrived: ns since [`since_epoch_ns`]'s epoch.
    last_at_ns: AtomicU64,
}

/// Nanoseconds since the first call in this process: one clock for every
/// receiver and scraper, so that the phases of the contenders' ticks can be
/// compared.
fn since_epoch_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A minimal HTTP/1.1 keep-alive receiver on 127.0.0.1 answering every POST
/// with 204, as a manager that accepts everything would.
struct Receiver {
    addr: SocketAddr,
    stats: Arc<RecvStats>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: Option<JoinHandle<()>>,
}

impl Receiver {
    /// `count_samples`: count the samples of each body (for the agent
    /// children); off where the receiver's own CPU should stay minimal.
    fn start(count_samples: bool) -> Res<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(RecvStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (st, sp, cs, ts) = (stats.clone(), stop.clone(), conns.clone(), threads.clone());
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let _ = conn.set_nodelay(true);
                if let Ok(c) = conn.try_clone()
                    && let Ok(mut v) = cs.lock()
                {
                    v.push(c);
                }
                let st = st.clone();
                let t = std::thread::spawn(move || serve(conn, &st, count_samples));
                if let Ok(mut v) = ts.lock() {
                    v.push(t);
                }
            }
        });
        Ok(Receiver {
            addr,
            stats,
            stop,
            conns,
            threads,
            accept: Some(accept),
        })
    }

    fn url(&self) -> String {
        format!("http://{}/v1/guest-metrics", self.addr)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop, then end every connection.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        if let Ok(v) = self.conns.lock() {
            for c in v.iter() {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        let threads = self.threads.lock().map(|mut v| std::mem::take(&mut *v));
        for t in threads.unwrap_or_default() {
            let _ = t.join();
        }
    }
}

fn serve(mut conn: TcpStream, stats: &RecvStats, count_samples: bool) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = [0u8; 64 * 1024];
    let mut last_cpu = thread_cpu_ns();
    loop {
        // One request: head, then Content-Length bytes of body.
        let (head_len, body_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let mut len = 0;
                    for h in req.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            len = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                        } else if h.name.eq_ignore_ascii_case("expect")
                            && h.value.eq_ignore_ascii_case(b"100-continue")
                            && conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err()
                        {
                            // collectd's libcurl asks before sending a body over 1 KiB.
                            return;
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            // Not needed by the agent; refuse rather than misread.
                            let _ = conn.write_all(
                                b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                            );
                            return;
                        }
                    }
                    break (head_len, len);
                }
                Ok(httparse::Status::Partial) => match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                },
                Err(_) => return,
            }
        };
        while buf.len() < head_len + body_len {
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        stats.last_at_ns.store(since_epoch_ns(), Ordering::SeqCst);
        let body = &buf[head_len..head_len + body_len];
        if count_samples {
            let n = body.windows(6).filter(|w| w == b"\"seq\":").count();
            stats.samples.fetch_add(n as u64, Ordering::SeqCst);
        }
        stats
            .body_bytes
            .fetch_add(body_len as u64, Ordering::SeqCst);
        buf.drain(..head_len + body_len);
        if conn
            .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            .is_err()
        {
            return;
        }
        stats.requests.fetch_add(1, Ordering::SeqCst);
        let now = thread_cpu_ns();
        stats.cpu_ns.fetch_add(now - last_cpu, Ordering::SeqCst);
        last_cpu = now;
    }
}

/// A loopback port with nothing listening (bound, then released).
fn dead_port() -> Res<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ---------------------------------------------------------------- processes

/// A child process killed and reaped when dropped.
struct Spawned {
    child: Child,
    what: String,
}

impl Spawned {
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Fails if the process has already exited.
    fn check_alive(&mut self) -> Res<()> {
        match self.child.try_wait()? {
            Some(status) => Err(format!("{} exited early: {status}", self.what).into()),
            None => Ok(()),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(what: &str, cmd: &mut Command, log: &Path) -> Res<Spawned> {
    let log = std::fs::File::create(log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    Ok(Spawned {
        child,
        what: what.to_string(),
    })
}

/// VmRSS and VmHWM of a process, KiB.
fn rss_kib(pid: i32) -> Res<(u64, u64)> {
    let st = procfs::process::Process::new(pid)?.status()?;
    Ok((st.vmrss.unwrap_or(0), st.vmhwm.unwrap_or(0)))
}

fn self_rss_kib() -> Res<u64> {
    Ok(rss_kib(std::process::id() as i32)?.0)
}

/// utime + stime of a process, clock ticks.
fn cpu_ticks(pid: i32) -> Res<u64> {
    let st = procfs::process::Process::new(pid)?.stat()?;
    Ok(st.utime + st.stime)
}

/// Polls `pred` every 20 ms until it holds or `limit` passes.
fn wait_for(limit: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !pred() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

// ---------------------------------------------------------------- per source

struct SourceRow {
    name: &'static str,
    read: Option<Timed>,
    parsed: Timed,
    /// The text's size, bytes (files only).
    bytes: Option<usize>,
}

/// A /proc file kept open: read only, then read + parse with the
/// collector's own parse function.
fn file_source<T>(
    n: usize,
    name: &'static str,
    rel: &str,
    parse: fn(&[u8]) -> Result<T, procfs::ProcError>,
) -> Res<SourceRow> {
    file_source_in(n, Path::new("/proc"), name, rel, parse)
}

/// [`file_source`] under another root (`/sys`).
fn file_source_in<T>(
    n: usize,
    root: &Path,
    name: &'static str,
    rel: &str,
    parse: fn(&[u8]) -> Result<T, procfs::ProcError>,
) -> Res<SourceRow> {
    let mut f = ProcFile::new(root, rel);
    let bytes = f.read().map_err(|e| format!("{name}: {e}"))?.len();
    f.parse(parse).map_err(|e| format!("{name}: {e}"))?;
    let read = measure(n, || {
        let _ = black_box(f.read().map(|b| b.len()));
    });
    let parsed = measure(n, || {
        let _ = black_box(f.parse(parse));
    });
    Ok(SourceRow {
        name,
        read: Some(read),
        parsed,
        bytes: Some(bytes),
    })
}

/// Named aggregate rows (several sources in one timed iteration).
type Totals = Vec<(String, Timed)>;

fn per_source(n: usize) -> Res<(Vec<SourceRow>, Totals)> {
    let mut rows = vec![
        file_source(n, "stat", "stat", stat::parse)?,
        file_source(n, "meminfo", "meminfo", meminfo::parse)?,
        file_source(n, "loadavg", "loadavg", loadavg::parse)?,
        file_source(n, "uptime", "uptime", uptime::parse)?,
        file_source(n, "net/dev", "net/dev", net_dev::parse)?,
        file_source(n, "diskstats", "diskstats", diskstats::parse)?,
        file_source(n, "pressure/cpu", "pressure/cpu", pressure::parse)?,
        file_source(n, "pressure/memory", "pressure/memory", pressure::parse)?,
        file_source(n, "pressure/io", "pressure/io", pressure::parse)?,
        file_source(n, "hostname", "sys/kernel/hostname", identity::parse_line)?,
        // The balloon (docs/design.md#memory-under-a-balloon): vmstat's
        // three lines picked out, against procfs's whole map of it; read
        // only where meminfo has no `Balloon:` line.
        file_source(n, "vmstat (balloon lines)", "vmstat", balloon::vmstat_pages)?,
        file_source(n, "vmstat (procfs VmStat, not used)", "vmstat", |t| {
            <procfs::VmStat as procfs::FromBufRead>::from_buf_read(t).map(|v| v.0.len())
        })?,
    ];
    // The balloon device's features, read while the balloon holds memory.
    if let Some(dev) = std::fs::read_dir("/sys/bus/virtio/devices")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| std::fs::read(p.join("device")).is_ok_and(|d| d.trim_ascii() == b"0x0005"))
    {
        rows.push(file_source_in(
            n,
            &dev,
            "balloon device features (/sys)",
            "features",
            balloon::deflate_on_oom,
        )?);
    }
    let proc = Path::new("/proc");
    let mut counter = processes::ProcessCounter::new(proc);
    counter.count()?;
    rows.push(SourceRow {
        name: "process count (readdir, kept open)",
        read: None,
        parsed: measure(n, || {
            let _ = black_box(counter.count());
        }),
        bytes: None,
    });
    filesystem::usage(Path::new("/"))?;
    rows.push(SourceRow {
        name: "filesystem (statvfs /)",
        read: None,
        parsed: measure(n, || {
            let _ = black_box(filesystem::usage(Path::new("/")));
        }),
        bytes: None,
    });

    // The nine files together: kept open vs opened anew (docs/performance.md).
    let mut files: Vec<ProcFile> = floor::NINE_FILES
        .iter()
        .map(|r| ProcFile::new(proc, r))
        .collect();
    let paths: Vec<PathBuf> = floor::NINE_FILES.iter().map(|r| proc.join(r)).collect();
    let kept = measure(n, || {
        for f in files.iter_mut() {
            let _ = black_box(f.read().map(|b| b.len()));
        }
    });
    let anew = measure(n, || {
        for p in &paths {
            let _ = black_box(std::fs::read(p));
        }
    });
    let totals = vec![
        ("the 9 files, kept open, read only".to_string(), kept),
        ("the 9 files, opened anew each time".to_string(), anew),
    ];
    Ok((rows, totals))
}

// ---------------------------------------------------------------- whole sample

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

/// A copy of the microvm fixture proc root with the balloon fixture `case`'s
/// `meminfo` and `vmstat`, in a temporary directory.
fn fixture_guest(case: &str) -> Res<PathBuf> {
    fn copy(from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(to)?;
        for e in std::fs::read_dir(from)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                copy(&e.path(), &to.join(e.file_name()))?;
            } else {
                std::fs::copy(e.path(), to.join(e.file_name()))?;
            }
        }
        Ok(())
    }
    let root = std::env::temp_dir().join(format!("ga-bench-{case}-{}", std::process::id()));
    copy(&Path::new(FIXTURES).join("vm"), &root)?;
    for f in ["meminfo", "vmstat"] {
        std::fs::copy(
            Path::new(FIXTURES).join("balloon").join(case).join(f),
            root.join(f),
        )?;
    }
    Ok(root)
}

struct SampleFigures {
    collect: Timed,
    collect_encode: Timed,
    /// One pre-collected sample encoded and sent again: the HTTP part alone.
    send_only: Timed,
    push: Timed,
    /// Receiver CPU per request, µs (mean).
    receiver_cpu: f64,
    body_bytes: f64,
    timer: Timed,
    /// The floor probe's round, in this process: the hot floor.
    floor: Timed,
    /// (what, allocations per call, bytes asked per call).
    allocs: Vec<(&'static str, f64, f64)>,
}

fn push_config(url: &str) -> Res<config::Config> {
    let cli: Vec<(&'static str, String)> = vec![
        ("url", url.to_string()),
        ("listen", "off".into()),
        ("log", "warn".into()),
    ];
    Ok(config::resolve(
        &cli,
        &[],
        Some(Path::new("/nonexistent/guest-agent.conf")),
    )?)
}

/// One collect + encode + push of a single sample, as the agent does at
/// every interval when the manager keeps up.
struct PushLoop {
    collector: Collector,
    sender: Sender,
    target: Target,
    seq: u64,
}

impl PushLoop {
    fn new(url: String) -> Res<PushLoop> {
        let config = push_config(&url)?;
        let collector = Collector::new(Path::new("/proc"), Some("bench".into()))?;
        let status = Arc::new(Status::new(config.interval, true, Vec::new(), None));
        let buffer = Arc::new(Buffer::new(config.buffer, config.buffer_max_bytes));
        let target = config
            .resolved_target()
            .ok_or_else(|| format!("{url}: no push target"))?;
        let sender = Sender::new(&config, status, buffer, collector.run_id())
            .ok_or("pushing is off in config")?;
        Ok(PushLoop {
            collector,
            sender,
            target,
            seq: 0,
        })
    }

    fn once(&mut self) -> Outcome {
        self.seq += 1;
        let mut s = self.collector.collect();
        s.seq = self.seq;
        let batch = [Arc::new(s)];
        self.sender.send(&self.target, &batch, None)
    }
}

fn whole_sample(n: usize) -> Res<SampleFigures> {
    let timer = measure(n, || {});
    let mut c = Collector::new(Path::new("/proc"), Some("bench".into()))?;
    let collect = measure(n, || {
        black_box(c.collect());
    });
    let mut body = Vec::with_capacity(64 * 1024);
    let collect_encode = measure(n, || {
        let s = Arc::new(c.collect());
        encode(&[s], Format::Json, &mut body);
        black_box(&body);
    });

    let receiver = Receiver::start(false)?;
    let mut lp = PushLoop::new(receiver.url())?;
    match lp.once() {
        Outcome::Delivered => {}
        other => return Err(format!("push to the loopback receiver failed: {other:?}").into()),
    }
    let failures = AtomicU64::new(0);
    let fixed = [Arc::new(c.collect())];
    let send_only = measure(n, || {
        if lp.sender.send(&lp.target, &fixed, None) != Outcome::Delivered {
            failures.fetch_add(1, Ordering::SeqCst);
        }
    });
    let (req0, cpu0, bytes0) = (
        receiver.stats.requests.load(Ordering::SeqCst),
        receiver.stats.cpu_ns.load(Ordering::SeqCst),
        receiver.stats.body_bytes.load(Ordering::SeqCst),
    );
    let push = measure(n, || {
        if lp.once() != Outcome::Delivered {
            failures.fetch_add(1, Ordering::SeqCst);
        }
    });
    let mut probe = floor::Floor::new(Path::new("/proc"), receiver.addr, "/v1/guest-metrics")?;
    probe.once()?;
    let floor = measure(n, || {
        if probe.once().is_err() {
            failures.fetch_add(1, Ordering::SeqCst);
        }
    });
    let failures = failures.load(Ordering::SeqCst);
    if failures > 0 {
        return Err(format!("{failures} pushes to the loopback receiver failed").into());
    }
    let an = n.min(2000);
    let mut allocs = Vec::new();
    let (a, b) = allocs_per(an, || {
        black_box(c.collect());
    });
    allocs.push(("collect", a, b));
    // The parsers alone, on texts read once: what procfs allocates.
    let texts: Vec<Vec<u8>> = floor::NINE_FILES
        .iter()
        .map(|f| std::fs::read(Path::new("/proc").join(f)))
        .collect::<std::io::Result<_>>()?;
    let (a, b) = allocs_per(an, || {
        let _ = black_box(stat::parse(&texts[0]));
        let _ = black_box(meminfo::parse(&texts[1]));
        let _ = black_box(loadavg::parse(&texts[2]));
        let _ = black_box(uptime::parse(&texts[3]));
        let _ = black_box(net_dev::parse(&texts[4]));
        let _ = black_box(diskstats::parse(&texts[5]));
        for t in &texts[6..] {
            let _ = black_box(pressure::parse(t));
        }
    });
    allocs.push(("of which the nine files' parsers (procfs)", a, b));
    let (a, b) = allocs_per(an, || {
        let _ = black_box(meminfo::parse(&texts[1]));
    });
    allocs.push(("of which `meminfo` alone", a, b));
    // The balloon's reads (docs/design.md#memory-under-a-balloon) on the
    // microvm fixture: empty, then 128 MiB inflated with deflate-on-OOM,
    // where vmstat and the device's features are read every time.
    for (what, case, sys) in [
        (
            "collect, fixture microvm, balloon empty",
            "before",
            "/nonexistent",
        ),
        (
            "collect, fixture microvm, 128 MiB ballooned (deflate-on-OOM)",
            "vmstat-only-deflate",
            "sys-deflate-on-oom",
        ),
    ] {
        let root = fixture_guest(case)?;
        let sys = Path::new(FIXTURES).join("balloon").join(sys);
        let mut g = Collector::new(&root, None)?.with_sys_root(&sys);
        let (a, b) = allocs_per(an, || {
            black_box(g.collect());
        });
        allocs.push((what, a, b));
        let _ = std::fs::remove_dir_all(&root);
    }
    let (a, b) = allocs_per(an, || {
        encode(&fixed, Format::Json, &mut body);
    });
    allocs.push(("encode (JSON, into a kept buffer)", a, b));
    let (a, b) = allocs_per(an, || {
        black_box(lp.sender.send(&lp.target, &fixed, None));
    });
    allocs.push(("encode + push of one sample (ureq)", a, b));
    let (a, b) = allocs_per(an, || {
        black_box(lp.once());
    });
    allocs.push(("**collect + encode + push**", a, b));
    let (a, b) = allocs_per(an, || {
        let _ = black_box(probe.once());
    });
    allocs.push(("floor probe round", a, b));
    // The receiver counts a request once answered; the last may lag a moment.
    let want = req0 + (n + n / 10) as u64;
    wait_for(Duration::from_secs(2), || {
        receiver.stats.requests.load(Ordering::SeqCst) >= want
    });
    let reqs = receiver.stats.requests.load(Ordering::SeqCst) - req0;
    let receiver_cpu =
        (receiver.stats.cpu_ns.load(Ordering::SeqCst) - cpu0) as f64 / reqs.max(1) as f64 / 1000.0;
    let body_bytes =
        (receiver.stats.body_bytes.load(Ordering::SeqCst) - bytes0) as f64 / reqs.max(1) as f64;
    Ok(SampleFigures {
        collect,
        collect_encode,
        send_only,
        push,
        receiver_cpu,
        body_bytes,
        timer,
        floor,
        allocs,
    })
}

// ---------------------------------------------------------------- node_exporter

struct NodeExporter {
    cpu_per_scrape_us: f64,
    ticks: u64,
    scrapes: usize,
    wall: Dist,
    body_bytes: usize,
    series: usize,
    rss_kib: u64,
    version: String,
    args: Vec<String>,
}

/// node_exporter's first `--version` line.
fn node_exporter_version() -> String {
    Command::new(NODE_EXPORTER)
        .arg("--version")
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("node_exporter, version ")
                .to_string()
        })
        .unwrap_or_default()
}

/// node_exporter's flags: on `port` of 127.0.0.1, the collectors that
/// match the sample, nothing else.
fn node_exporter_args(port: u16) -> Vec<String> {
    [
        format!("--web.listen-address=127.0.0.1:{port}"),
        "--web.disable-exporter-metrics".into(),
        "--collector.disable-defaults".into(),
        "--collector.cpu".into(),
        "--collector.stat".into(),
        "--collector.meminfo".into(),
        "--collector.loadavg".into(),
        "--collector.netdev".into(),
        "--collector.diskstats".into(),
        "--collector.filesystem".into(),
        // The root filesystem only, as the agent reports.
        "--collector.filesystem.mount-points-exclude=^/.+".into(),
        "--collector.filesystem.fs-types-exclude=^$".into(),
        "--collector.pressure".into(),
        "--collector.uname".into(),
    ]
    .into()
}

fn node_exporter(scrapes: usize, tmp: &Path) -> Res<Option<NodeExporter>> {
    if !Path::new(NODE_EXPORTER).exists() {
        return Ok(None);
    }
    let version = node_exporter_version();
    let port = dead_port()?;
    let args = node_exporter_args(port);
    let mut ne = spawn(
        "prometheus-node-exporter",
        Command::new(NODE_EXPORTER).args(&args).env_clear(),
        &tmp.join("node-exporter.log"),
    )?;
    let url = format!("http://127.0.0.1:{port}/metrics");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .proxy(None)
        .build()
        .into();
    let scrape = |agent: &ureq::Agent| -> Res<Vec<u8>> {
        let mut resp = agent.get(&url).call()?;
        Ok(resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()?)
    };
    let up = wait_for(Duration::from_secs(10), || {
        ne.check_alive().is_ok() && scrape(&agent).is_ok()
    });
    ne.check_alive()?;
    if !up {
        return Err(format!("node_exporter did not answer on {url} within 10 s").into());
    }
    let mut body = Vec::new();
    for _ in 0..10 {
        body = scrape(&agent)?;
    }
    let series = body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty() && l[0] != b'#')
        .count();
    let t0 = cpu_ticks(ne.pid())?;
    let mut wall = Vec::with_capacity(scrapes);
    for _ in 0..scrapes {
        let w = Instant::now();
        black_box(scrape(&agent)?);
        wall.push(w.elapsed().as_nanos() as u64);
    }
    let t1 = cpu_ticks(ne.pid())?;
    let ticks = t1 - t0;
    let tck = procfs::ticks_per_second() as f64;
    let rss = rss_kib(ne.pid())?.0;
    Ok(Some(NodeExporter {
        cpu_per_scrape_us: ticks as f64 / tck * 1e6 / scrapes as f64,
        ticks,
        scrapes,
        wall: Dist::of(wall),
        body_bytes: body.len(),
        series,
        rss_kib: rss,
        version,
        args: args[1..].to_vec(),
    }))
}

// ---------------------------------------------------------------- memory

/// The agent binary, and a child running it against a receiver.
struct AgentChild {
    label: String,
    proc: Spawned,
    started: Instant,
    receiver: Option<Receiver>,
    rss_start_kib: u64,
}

fn start_agent(
    label: &str,
    bin: &Path,
    receiver: Option<Receiver>,
    extra: &[&str],
    tmp: &Path,
    log_name: &str,
) -> Res<AgentChild> {
    let url = match &receiver {
        Some(r) => r.url(),
        None => format!("http://127.0.0.1:{}/v1/guest-metrics", dead_port()?),
    };
    // An explicit loopback URL, always (docs/testing.md).
    assert!(url.starts_with("http://127.0.0.1:"));
    let proc = spawn(
        label,
        Command::new(bin)
            .args(["--url", &url, "--interval", "100ms", "--listen", "off"])
            .args(["--buffer", &BUFFER.to_string(), "--log", "warn"])
            .args(["--config", "/nonexistent/guest-agent.conf"])
            .args(extra)
            .env_clear(),
        &tmp.join(log_name),
    )?;
    Ok(AgentChild {
        label: label.to_string(),
        proc,
        started: Instant::now(),
        receiver,
        rss_start_kib: 0,
    })
}

/// Where cargo put the agent binaries: next to this example's directory.
fn target_dir() -> Option<PathBuf> {
    // target/<profile>/examples/bench
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.to_path_buf())
}

fn profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.to_path_buf())
}

struct ChildMemory {
    label: String,
    samples: u64,
    rss_start_kib: u64,
    rss_end_kib: u64,
    hwm_kib: u64,
    cpu_ticks: u64,
    note: String,
}

struct InProcessMemory {
    buffer_rss_delta_kib: i64,
    buffer_heap_estimate: usize,
    long_iters: u64,
    rss_after_1000_kib: u64,
    rss_after_long_kib: u64,
    long_wall: Duration,
}

/// Fills a default-size buffer with real samples; then runs the
/// collect+encode+push loop `long` times, reading this process's RSS after
/// 1,000 iterations and at the end.
fn in_process_memory(long: u64) -> Res<InProcessMemory> {
    let mut c = Collector::new(Path::new("/proc"), Some("bench".into()))?;
    let before = self_rss_kib()?;
    let buffer = Buffer::new(BUFFER, usize::MAX);
    let mut one: Option<Arc<Sample>> = None;
    for seq in 1..=BUFFER as u64 {
        let mut s = c.collect();
        s.seq = seq;
        one = Some(buffer.push(s));
    }
    let after = self_rss_kib()?;
    let heap = one.map_or(0, |s| {
        let strings = s.agent_version.capacity()
            + s.run_id.capacity()
            + s.vm_id.as_ref().map_or(0, String::capacity)
            + s.hostname.as_ref().map_or(0, String::capacity)
            + s.boot_id.as_ref().map_or(0, String::capacity)
            + s.guest_ip.as_ref().map_or(0, String::capacity);
        // Arc header (two counters) + the sample + its strings + the queue slot.
        16 + std::mem::size_of::<Sample>() + strings + std::mem::size_of::<Arc<Sample>>()
    }) * BUFFER;
    drop(buffer);

    let receiver = Receiver::start(false)?;
    let mut lp = PushLoop::new(receiver.url())?;
    let started = Instant::now();
    let mut rss_1000 = 0;
    let step = (long / 10).max(1);
    for i in 1..=long {
        if lp.once() != Outcome::Delivered {
            return Err(format!("push {i} to the loopback receiver failed").into());
        }
        if i == 1000 {
            rss_1000 = self_rss_kib()?;
        }
        if i % step == 0 {
            eprint!(" {}%", i * 100 / long);
        }
    }
    eprintln!();
    let long_wall = started.elapsed();
    Ok(InProcessMemory {
        buffer_rss_delta_kib: after as i64 - before as i64,
        buffer_heap_estimate: heap,
        long_iters: long,
        rss_after_1000_kib: rss_1000,
        rss_after_long_kib: self_rss_kib()?,
        long_wall,
    })
}

// ---------------------------------------------------------------- signing

/// What signing adds to a push (docs/security.md): the Content-Digest,
/// signature base and HMAC of one request, as the agent's client makes
/// them, for the steady state's one-sample body and a full batch.
fn sign_table(n: usize) -> Res<String> {
    use guest_agent::sign::{Credentials, Key};
    let mut c = Collector::new(Path::new("/proc"), Some("bench".into()))?;
    let credentials = Credentials::new("bench", Key::new("k1", [7; 32])?.derive("bench"));
    let mut md = String::from(
        "| body | bytes | thread CPU per signature, median | p99 |\n|---|---:|---:|---:|\n",
    );
    for samples in [1usize, 100] {
        let batch: Vec<Arc<Sample>> = (0..samples).map(|_| Arc::new(c.collect())).collect();
        let mut body = Vec::with_capacity(128 * 1024);
        encode(&batch, Format::Json, &mut body);
        let t = measure(n, || {
            black_box(credentials.sign("POST", "/v1/guest-metrics", black_box(&body)));
        });
        md.push_str(&format!(
            "| {samples} sample{} (JSON) | {} | {} µs | {} µs |\n",
            if samples == 1 { "" } else { "s" },
            body.len(),
            us(t.cpu.median),
            us(t.cpu.p99)
        ));
    }
    Ok(md)
}

// ---------------------------------------------------------------- size

struct Size {
    label: String,
    path: PathBuf,
    bytes: u64,
    stripped: Option<u64>,
}

fn sizes(tmp: &Path) -> Vec<Size> {
    let mut out = Vec::new();
    let candidates = [
        ("static musl", musl_binary()),
        ("host (glibc, dynamic)", host_binary()),
    ];
    for (label, path) in candidates {
        let Some(path) = path else { continue };
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let copy = tmp.join("stripped");
        let stripped = std::fs::copy(&path, &copy)
            .ok()
            .and_then(|_| Command::new("strip").arg(&copy).status().ok())
            .filter(|s| s.success())
            .and_then(|_| std::fs::metadata(&copy).ok())
            .map(|m| m.len());
        out.push(Size {
            label: label.to_string(),
            path,
            bytes: meta.len(),
            stripped,
        });
    }
    out
}

fn host_binary() -> Option<PathBuf> {
    Some(profile_dir()?.join("guest-agent")).filter(|p| p.exists())
}

fn musl_binary() -> Option<PathBuf> {
    let profile = profile_dir()?.file_name()?.to_owned();
    Some(
        target_dir()?
            .join("x86_64-unknown-linux-musl")
            .join(profile)
            .join("guest-agent"),
    )
    .filter(|p| p.exists())
}

/// Builds the host agent binary with the same profile and target directory
/// as this example, when it is missing.
fn build_host_binary() -> Option<PathBuf> {
    if let Some(p) = host_binary() {
        return Some(p);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let release = profile_dir()?.file_name()? == "release";
    eprintln!("building the agent binary (cargo build --bin guest-agent) ...");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--bin", "guest-agent", "--target-dir"])
        .arg(target_dir()?);
    if release {
        cmd.arg("--release");
    }
    match cmd.status() {
        Ok(s) if s.success() => host_binary(),
        _ => None,
    }
}

fn release_profile() -> String {
    let toml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .unwrap_or_default();
    let mut lines = toml.lines().skip_while(|l| l.trim() != "[profile.release]");
    if lines.next().is_none() {
        return "cargo's default release profile (no [profile.release] in Cargo.toml)".into();
    }
    let body: Vec<&str> = lines
        .take_while(|l| !l.trim_start().starts_with('['))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    format!("[profile.release] {}", body.join(", "))
}

// ---------------------------------------------------------------- machine

fn machine() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    let hypervisor = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| meminfo::parse(m.as_bytes()).ok())
        .map_or("?".into(), |m| {
            format!("{:.1} GiB", m.total_kb as f64 / MIB)
        });
    let procs = processes::count(Path::new("/proc")).unwrap_or(0);
    vec![
        (
            "CPUs (nproc)".into(),
            std::thread::available_parallelism().map_or("?".into(), |n| n.get().to_string()),
        ),
        ("CPU model".into(), field("model name")),
        (
            "virtualised".into(),
            if hypervisor {
                "yes (hypervisor flag)"
            } else {
                "no"
            }
            .into(),
        ),
        ("kernel".into(), kernel.trim().to_string()),
        ("memory".into(), mem),
        ("processes at start".into(), procs.to_string()),
        ("load average at start".into(), load_average()),
        ("agent profile".into(), release_profile()),
    ]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------- report

fn us(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

fn mib(kib: u64) -> String {
    format!("{:.2} MiB", kib as f64 / 1024.0)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "within" } else { "**MISSES**" }
}

/// The command line of this run, as typed.
fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    format!(
        "cargo run --release --example bench{}{}",
        if args.is_empty() { "" } else { " -- " },
        args.join(" ")
    )
}

fn run_deployed(o: &Opts, tmp: &Path) -> Res<deployed::Deployed> {
    let target = target_dir().ok_or("cannot tell cargo's target directory")?;
    let profile = profile_dir()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().to_string()))
        .ok_or("cannot tell cargo's profile")?;
    let (agent, probe) = deployed::musl_binaries(&target, &profile)?;
    deployed::run(
        &agent,
        &probe,
        CHILD_INTERVAL,
        Duration::from_secs(5),
        o.slices,
        &deployed::Lineup::all(&o.agent_variants),
        tmp,
    )
}

/// One run of the fair comparison: whole-run CPU per sample, µs.
struct FairRun {
    reversed: bool,
    agent_us: f64,
    /// The probe parsing with procfs and posting through ureq.
    crates_us: f64,
    ureq_us: f64,
    floor_us: f64,
}

/// The floors of the fair comparison: raw, with ureq for the POST (the
/// agent's own client and resolver), and with procfs's parsing as well:
/// the floor for the crates the agent is built on.
const FAIR_FLOORS: [(&str, &[&str]); 3] = [
    ("floor probe (static musl)", &[]),
    ("floor + ureq for the POST", &["--ureq"]),
    ("floor + procfs parsing + ureq", &["--parse", "--ureq"]),
];

/// The agent as deployed beside the floors of [`FAIR_FLOORS`], alone on
/// the bench's side, in runs whose slot order alternates: whoever ticks
/// first in an interval finds the caches colder, so each contender goes
/// first as often as last.
fn fair_runs(o: &Opts, tmp: &Path) -> Res<Vec<FairRun>> {
    let target = target_dir().ok_or("cannot tell cargo's target directory")?;
    let profile = profile_dir()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().to_string()))
        .ok_or("cannot tell cargo's profile")?;
    let (agent, probe) = deployed::musl_binaries(&target, &profile)?;
    let floors = FAIR_FLOORS;
    let mut out = Vec::new();
    for i in 0..o.runs {
        let reversed = i % 2 == 1;
        eprint!("fair comparison, run {}/{}:", i + 1, o.runs);
        let lineup = deployed::Lineup {
            kmsg_off: false,
            variants: &[],
            floors: &floors,
            others: false,
            reversed,
        };
        let d = deployed::run(
            &agent,
            &probe,
            CHILD_INTERVAL,
            Duration::from_secs(5),
            o.fair_slices,
            &lineup,
            tmp,
        )?;
        let find = |prefix: &str| {
            d.rows
                .iter()
                .find(|r| r.label.starts_with(prefix))
                .map(|r| r.cpu_us)
                .ok_or_else(|| format!("the fair run has no {prefix:?} row"))
        };
        out.push(FairRun {
            reversed,
            agent_us: find("guest-agent")?,
            crates_us: find(floors[2].0)?,
            ureq_us: find(floors[1].0)?,
            floor_us: find(floors[0].0)?,
        });
    }
    Ok(out)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The agent ÷ each floor (procfs + ureq, ureq, raw): medians of the
/// runs' ratios.
fn fair_ratios(runs: &[FairRun]) -> (f64, f64, f64) {
    let med = |f: fn(&FairRun) -> f64| median(runs.iter().map(|r| r.agent_us / f(r)).collect());
    (
        med(|r| r.crates_us),
        med(|r| r.ureq_us),
        med(|r| r.floor_us),
    )
}

fn fair_table(runs: &[FairRun], slices: u32, md: &mut String) {
    let mut p = |s: String| {
        md.push_str(&s);
        md.push('\n');
    };
    p("### Against the floor for the chosen crates".into());
    p(String::new());
    p(format!(
        "The shipped agent as configured by default beside three floor probes, nothing else: raw, posting through ureq with the agent's own client (`--ureq`), and parsing with procfs as well (`--parse --ureq`, the floor for the crates the agent is built on); each sample every {} ms; {} runs of {} s, the slot order reversed every other run. Whole-process CPU per sample, µs.",
        CHILD_INTERVAL.as_millis(),
        runs.len(),
        slices * 5
    ));
    p(String::new());
    p("| run | first to tick | guest-agent | floor + procfs + ureq | floor + ureq | floor | × floor + procfs + ureq | × floor + ureq | × floor |".into());
    p("|---:|---|---:|---:|---:|---:|---:|---:|---:|".into());
    for (i, r) in runs.iter().enumerate() {
        p(format!(
            "| {} | {} | {} | {} | {} | {} | {:.2}× | {:.2}× | {:.2}× |",
            i + 1,
            if r.reversed { "floors" } else { "guest-agent" },
            us(r.agent_us),
            us(r.crates_us),
            us(r.ureq_us),
            us(r.floor_us),
            r.agent_us / r.crates_us,
            r.agent_us / r.ureq_us,
            r.agent_us / r.floor_us
        ));
    }
    let (vs_crates, vs_ureq, vs_floor) = fair_ratios(runs);
    let med = |f: fn(&FairRun) -> f64| us(median(runs.iter().map(f).collect()));
    p(format!(
        "| **median** | | {} | {} | {} | {} | **{vs_crates:.2}×** | **{vs_ureq:.2}×** | **{vs_floor:.2}×** |",
        med(|r| r.agent_us),
        med(|r| r.crates_us),
        med(|r| r.ureq_us),
        med(|r| r.floor_us)
    ));
    p(String::new());
}

/// The encode cost of one real sample (its detail included) in each wire
/// format, and the bytes it makes.
struct FormatCost {
    format: &'static str,
    cpu: Timed,
    bytes: usize,
}

fn format_costs(n: usize) -> Res<Vec<FormatCost>> {
    let mut c = Collector::new(Path::new("/proc"), Some("bench".into()))?;
    // Two collections, so that the CPU shares and rates are real.
    c.collect();
    std::thread::sleep(Duration::from_millis(100));
    let s = Arc::new(c.collect());
    let batch = [s.clone()];
    let mut body = Vec::with_capacity(64 * 1024);
    let mut out = Vec::new();
    for (name, format) in [
        ("JSON (`format=json`, the default)", Format::Json),
        ("Influx line protocol (`format=influx`)", Format::Influx),
        ("OTLP/HTTP JSON (`format=otlp`)", Format::Otlp),
    ] {
        let cpu = measure(n, || {
            encode(&batch, format, &mut body);
            black_box(&body);
        });
        out.push(FormatCost {
            format: name,
            cpu,
            bytes: body.len(),
        });
    }
    let cpu = measure(n, || {
        body.clear();
        encode_prometheus(&s, s.detail.as_deref(), &mut body);
        black_box(&body);
    });
    out.push(FormatCost {
        format: "Prometheus text 0.0.4 (`GET /metrics`, scraped)",
        cpu,
        bytes: body.len(),
    });
    Ok(out)
}

fn format_table(costs: &[FormatCost], md: &mut String) {
    let mut p = |s: String| {
        md.push_str(&s);
        md.push('\n');
    };
    p("### Encode cost per wire format".into());
    p(String::new());
    p("One real sample of this machine, its detail (per CPU, interface, disk) included, encoded into a kept buffer; thread CPU per encode.".into());
    p(String::new());
    p("| format | median µs | p99 µs | bytes per sample |".into());
    p("|---|---:|---:|---:|".into());
    for f in costs {
        p(format!(
            "| {} | {} | {} | {} |",
            f.format,
            us(f.cpu.cpu.median),
            us(f.cpu.cpu.p99),
            f.bytes
        ));
    }
    p(String::new());
}

/// The headline table: machine, command and date first, then each process
/// of the as-deployed run with its ratio to the floor probe.
fn deployed_tables(d: &deployed::Deployed, md: &mut String) {
    let mut p = |s: String| {
        md.push_str(&s);
        md.push('\n');
    };
    let m = machine();
    let get = |k: &str| {
        m.iter()
            .find(|(n, _)| n == k)
            .map_or("?".to_string(), |(_, v)| v.clone())
    };
    p("### As deployed".into());
    p(String::new());
    p(format!(
        "{} CPUs ({}, virtualised: {}), kernel {}, load average {} at the end; `{}`; {} UTC. Every process at once, each sample every {} ms, for {:.0} s ({} slices of {} s) after a warm-up; whole-process CPU = the run time of all its threads (`/proc/PID/task/*/schedstat`). Receivers and the node_exporter scraper are the bench's threads and are not counted.",
        get("CPUs (nproc)"),
        get("CPU model"),
        get("virtualised"),
        get("kernel"),
        load_average(),
        command_line(),
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
            .to_string()
            .replace('T', " ")
            .trim_end_matches('Z'),
        d.interval.as_millis(),
        d.run.as_secs_f64(),
        d.rows.first().map_or(0, |r| r.slices.len()),
        d.slice.as_secs()
    ));
    p(String::new());
    p("| process | samples | CPU per sample, µs | × floor (whole run) | × floor, per slice: median (min–max) | RSS | threads | body bytes per sample | ticks at, ms into the interval |".into());
    p("|---|---:|---:|---:|---:|---:|---:|---:|---:|".into());
    let floor_us = d.floor().map(|f| f.cpu_us);
    for r in &d.rows {
        let ratio = floor_us.map_or("—".into(), |f| format!("{:.2}×", r.cpu_us / f));
        let slices = d.slice_ratio(r).map_or("—".into(), |(med, lo, hi)| {
            format!("{med:.2}× ({lo:.2}–{hi:.2})")
        });
        let label = if r.label.starts_with("guest-agent") {
            format!("**{}**", r.label)
        } else {
            r.label.clone()
        };
        p(format!(
            "| {label} | {} | {} | {ratio} | {slices} | {} | {} | {:.0}{} | {:.0} |",
            r.samples,
            us(r.cpu_us),
            mib(r.rss_kib),
            r.threads,
            r.bytes_per_sample,
            if r.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.note)
            },
            r.phase_ms
        ));
    }
    p(String::new());
    for r in &d.rows {
        p(format!("- {}: {}", r.label, r.shown));
    }
    p(String::new());
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, name] = &args[..]
        && flag == "--ingest-scenario"
    {
        println!("{}", ingest_memory::run_scenario(name)?);
        return Ok(());
    }
    let o = opts()?;
    let run_started = Instant::now();
    let tmp = std::env::temp_dir().join(format!("guest-agent-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = run(&o, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!(
        "bench finished in {:.0} s",
        run_started.elapsed().as_secs_f64()
    );
    result
}

/// One loop alone, for a profiler.
fn only(o: &Opts, what: &str, n: usize, tmp: &Path) -> Res<()> {
    if what == "deployed" {
        let d = run_deployed(o, tmp)?;
        let mut md = String::new();
        deployed_tables(&d, &mut md);
        println!("\n{md}");
        return Ok(());
    }
    if what == "ingest" {
        println!("\n{}", ingest_memory::table()?);
        return Ok(());
    }
    if what == "fair" {
        let runs = fair_runs(o, tmp)?;
        let mut md = String::new();
        fair_table(&runs, o.fair_slices, &mut md);
        println!("\n{md}");
        return Ok(());
    }
    if what == "formats" {
        let mut md = String::new();
        format_table(&format_costs(n)?, &mut md);
        println!("\n{md}");
        return Ok(());
    }
    if what == "sources" {
        let (rows, totals) = per_source(n)?;
        println!(
            "| source | bytes | read only, median µs | read + parse, median µs |\n|---|---:|---:|---:|"
        );
        for r in &rows {
            println!(
                "| {} | {} | {} | {} |",
                r.name,
                r.bytes.map_or("—".into(), |b| b.to_string()),
                r.read.as_ref().map_or("—".into(), |t| us(t.cpu.median)),
                us(r.parsed.cpu.median)
            );
        }
        for (name, t) in &totals {
            println!("| {name} | | {} | |", us(t.cpu.median));
        }
        return Ok(());
    }
    if what == "allocs" {
        let whole = whole_sample(n)?;
        println!("| loop | allocations | bytes asked |\n|---|---:|---:|");
        for (what, a, b) in &whole.allocs {
            println!("| {what} | {a:.1} | {b:.0} |");
        }
        return Ok(());
    }
    if what == "sign" {
        println!("\n{}", sign_table(n)?);
        return Ok(());
    }
    let mut c = Collector::new(Path::new("/proc"), Some("bench".into()))?;
    let t = match what {
        "floor" => {
            let receiver = Receiver::start(false)?;
            let mut probe =
                floor::Floor::new(Path::new("/proc"), receiver.addr, "/v1/guest-metrics")?;
            measure(n, || {
                let _ = black_box(probe.once());
            })
        }
        "collect" => measure(n, || {
            black_box(c.collect());
        }),
        "encode" => {
            let s = [Arc::new(c.collect())];
            let mut body = Vec::with_capacity(64 * 1024);
            measure(n, || {
                encode(&s, Format::Json, &mut body);
                black_box(&body);
            })
        }
        "push" => {
            let receiver = Receiver::start(false)?;
            let mut lp = PushLoop::new(receiver.url())?;
            measure(n, || {
                black_box(lp.once());
            })
        }
        other => {
            return Err(format!(
                "--only {other:?}: expected collect, encode, push, floor, deployed, fair, formats, sources, allocs, sign or ingest"
            )
            .into());
        }
    };
    println!(
        "{what}: {n} iterations, thread CPU median {} µs, p99 {} µs, mean {} µs; wall median {} µs",
        us(t.cpu.median),
        us(t.cpu.p99),
        us(t.cpu.mean),
        us(t.wall.median)
    );
    Ok(())
}

fn run(o: &Opts, tmp: &Path) -> Res<()> {
    if let Some(what) = &o.only {
        return only(o, what, o.samples, tmp);
    }
    let mut machine = machine();
    let debug_build = cfg!(debug_assertions);
    if debug_build {
        eprintln!("warning: this is a debug build; run with --release for real figures");
    }

    // The headline first, alone on the machine (as far as this run goes).
    eprintln!(
        "as deployed: {} slices of 5 s, every contender at once ...",
        o.slices
    );
    let dep = run_deployed(o, tmp)?;
    let fair = fair_runs(o, tmp)?;

    // Memory children next: they run at 100 ms while everything else is measured.
    let host = build_host_binary();
    let mut children: Vec<AgentChild> = Vec::new();
    let mut binaries: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(m) = musl_binary() {
        binaries.push(("static musl", m));
    }
    if let Some(h) = &host {
        binaries.push(("host glibc", h.clone()));
    }
    for (i, (kind, bin)) in binaries.iter().enumerate() {
        children.push(start_agent(
            &format!("{kind}, pushing to a receiver"),
            bin,
            Some(Receiver::start(true)?),
            &[],
            tmp,
            &format!("agent-{i}.log"),
        )?);
        children.push(start_agent(
            &format!("{kind}, outage (nothing listens)"),
            bin,
            None,
            &[],
            tmp,
            &format!("agent-outage-{i}.log"),
        )?);
        // OTLP keeps each buffered sample's detail (per CPU, interface,
        // disk) for its encoder: the largest buffer the agent can hold.
        if i == 0 {
            children.push(start_agent(
                &format!("{kind}, `--format otlp`, outage (nothing listens)"),
                bin,
                None,
                &["--format", "otlp"],
                tmp,
                "agent-outage-otlp.log",
            )?);
        }
    }
    // "After start": once the first sample is delivered (or, in an outage,
    // after the same time).
    for c in children.iter_mut() {
        if let Some(r) = &c.receiver {
            wait_for(Duration::from_secs(5), || {
                r.stats.samples.load(Ordering::SeqCst) >= 1
            });
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    for c in children.iter_mut() {
        c.proc.check_alive()?;
        c.rss_start_kib = rss_kib(c.proc.pid())?.0;
    }

    eprintln!("per-source CPU ({} iterations each) ...", o.samples);
    let (sources, totals) = per_source(o.samples)?;
    eprintln!("whole sample: collect, encode, push ...");
    let whole = whole_sample(o.samples)?;
    eprintln!("encode cost per wire format ...");
    let formats = format_costs(o.samples)?;
    eprintln!("node_exporter, {} scrapes ...", o.scrapes);
    let ne = node_exporter(o.scrapes, tmp)?;
    eprint!(
        "in-process memory: buffer of {BUFFER}, then {} pushes:",
        o.long
    );
    let inproc = in_process_memory(o.long)?;

    // Let the children reach their sample count.
    let mut child_mem = Vec::new();
    for c in children.iter_mut() {
        let want = c.started + CHILD_INTERVAL * (o.child_samples as u32) + Duration::from_secs(1);
        if let Some(r) = &c.receiver {
            let done = wait_for(
                want.saturating_duration_since(Instant::now()) + Duration::from_secs(30),
                || r.stats.samples.load(Ordering::SeqCst) >= o.child_samples,
            );
            if !done {
                eprintln!("{}: fewer samples than asked for", c.label);
            }
        } else {
            std::thread::sleep(want.saturating_duration_since(Instant::now()));
        }
        c.proc.check_alive()?;
        let (rss, hwm) = rss_kib(c.proc.pid())?;
        let elapsed = c.started.elapsed();
        let collected = (elapsed.as_millis() / CHILD_INTERVAL.as_millis()) as u64 + 1;
        let (samples, note) = match &c.receiver {
            Some(r) => (
                r.stats.samples.load(Ordering::SeqCst),
                "delivered".to_string(),
            ),
            None => (
                collected,
                format!(
                    "collected in {:.0} s, buffer {} (full from sample {BUFFER})",
                    elapsed.as_secs_f64(),
                    collected.min(BUFFER as u64)
                ),
            ),
        };
        child_mem.push(ChildMemory {
            label: c.label.clone(),
            samples,
            rss_start_kib: c.rss_start_kib,
            rss_end_kib: rss,
            hwm_kib: hwm,
            cpu_ticks: cpu_ticks(c.proc.pid())?,
            note,
        });
    }
    drop(children);
    let sizes = sizes(tmp);
    machine.push(("load average at end".into(), load_average()));

    // ------------------------------------------------------------ tables
    let mut md = String::new();
    deployed_tables(&dep, &mut md);
    fair_table(&fair, o.fair_slices, &mut md);
    format_table(&formats, &mut md);
    let mut p = |s: String| {
        md.push_str(&s);
        md.push('\n');
    };
    p("### Machine".into());
    p(String::new());
    p("| | |".into());
    p("|---|---|".into());
    for (k, v) in &machine {
        p(format!("| {k} | {v} |"));
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    p(format!(
        "| run | `cargo run --release --example bench{}{}` ({} timed iterations per figure) |",
        if args.is_empty() { "" } else { " -- " },
        args.join(" "),
        o.samples
    ));
    p(String::new());

    let ours = whole.push.cpu;
    p("### CPU per sample, beside node_exporter".into());
    p(String::new());
    p("CPU time of the thread doing the work (`CLOCK_THREAD_CPUTIME_ID`), µs; the loopback receiver's CPU is not included. node_exporter: its process's utime+stime over all scrapes, divided by the scrapes.".into());
    p(String::new());
    p("| what | median µs | p99 µs | mean µs | wall median µs |".into());
    p("|---|---:|---:|---:|---:|".into());
    let row = |name: &str, t: &Timed| {
        format!(
            "| {name} | {} | {} | {} | {} |",
            us(t.cpu.median),
            us(t.cpu.p99),
            us(t.cpu.mean),
            us(t.wall.median)
        )
    };
    p(row("collect (real /proc)", &whole.collect));
    p(row("collect + encode (JSON)", &whole.collect_encode));
    p(row(
        "encode + push of one sample alone (the HTTP part)",
        &whole.send_only,
    ));
    p(row(
        "**collect + encode + push** (keep-alive, loopback, 204)",
        &whole.push,
    ));
    p(row(
        "floor probe round, in this process (the hot floor)",
        &whole.floor,
    ));
    p(format!(
        "| **collect + encode + push ÷ hot floor** | **{:.2}×** | | {:.2}× | |",
        whole.push.cpu.median / whole.floor.cpu.median,
        whole.push.cpu.mean / whole.floor.cpu.mean
    ));
    p(format!(
        "| loopback receiver, per request (its own threads) | | | {} | |",
        us(whole.receiver_cpu)
    ));
    p(row("timer overhead (included above)", &whole.timer));
    match &ne {
        Some(ne) => {
            p(format!(
                "| node_exporter, one scrape ({} scrapes, {} ticks) | | | {} | {} |",
                ne.scrapes,
                ne.ticks,
                us(ne.cpu_per_scrape_us),
                us(ne.wall.median)
            ));
            p(String::new());
            p("| | ours (collect+encode+push) | node_exporter scrape | ratio |".into());
            p("|---|---:|---:|---:|".into());
            p(format!(
                "| CPU per sample/scrape, mean | {} µs | {} µs | **{:.0}×** |",
                us(ours.mean),
                us(ne.cpu_per_scrape_us),
                ne.cpu_per_scrape_us / ours.mean
            ));
            p(format!(
                "| bytes on the wire (body) | {:.0} | {} ({} series) | {:.0}× |",
                whole.body_bytes,
                ne.body_bytes,
                ne.series,
                ne.body_bytes as f64 / whole.body_bytes.max(1.0)
            ));
            p(format!(
                "| resident memory | see below | {} | |",
                mib(ne.rss_kib)
            ));
            p(String::new());
            p(format!(
                "node_exporter: {}, flags `{}`.",
                ne.version,
                ne.args.join(" ")
            ));
        }
        None => {
            p(String::new());
            p(format!(
                "node_exporter: not installed ({NODE_EXPORTER} missing); install it with `apt-get install prometheus-node-exporter` for the side-by-side figures."
            ));
        }
    }
    p(String::new());

    p("### Allocations per sample".into());
    p(String::new());
    p("Calls to the allocator (alloc, alloc_zeroed, realloc) by the working thread, counted by a counting global allocator in the bench, per call of each loop.".into());
    p(String::new());
    p("| loop | allocations | bytes asked |".into());
    p("|---|---:|---:|".into());
    for (what, a, b) in &whole.allocs {
        p(format!("| {what} | {a:.1} | {b:.0} |"));
    }
    p(String::new());

    p("### CPU per /proc source".into());
    p(String::new());
    p("Each file kept open and re-read from offset 0 (`ProcFile`), parsed by the collector's own function. Thread CPU, µs.".into());
    p(String::new());
    p("| source | bytes | read only, median | read + parse, median | read + parse, p99 | parse share |".into());
    p("|---|---:|---:|---:|---:|---:|".into());
    let mut sum_read = 0.0;
    let mut sum_parsed = 0.0;
    for s in &sources {
        sum_parsed += s.parsed.cpu.median;
        let (read, share) = match &s.read {
            Some(r) => {
                sum_read += r.cpu.median;
                (
                    us(r.cpu.median),
                    format!(
                        "{:.0}%",
                        (1.0 - r.cpu.median / s.parsed.cpu.median).max(0.0) * 100.0
                    ),
                )
            }
            None => ("—".into(), "—".into()),
        };
        p(format!(
            "| {} | {} | {read} | {} | {} | {share} |",
            s.name,
            s.bytes.map_or("—".into(), |b| b.to_string()),
            us(s.parsed.cpu.median),
            us(s.parsed.cpu.p99),
        ));
    }
    p(format!(
        "| sum of the medians | | {} | {} | | |",
        us(sum_read),
        us(sum_parsed)
    ));
    for (name, t) in &totals {
        p(format!(
            "| {name} | | {} | | {} (p99) | |",
            us(t.cpu.median),
            us(t.cpu.p99)
        ));
    }
    p(String::new());

    p("### Memory".into());
    p(String::new());
    p(format!(
        "The agent binary as a child process: `--url http://127.0.0.1:PORT/v1/guest-metrics --interval 100ms --listen off --buffer {BUFFER}`; VmRSS from `/proc/PID/status`. \"Outage\" points the agent at a loopback port where nothing listens, so every sample stays buffered."
    ));
    p(String::new());
    p("| agent process | samples | RSS after start | RSS at end | peak (VmHWM) | whole-process CPU per sample | note |".into());
    p("|---|---:|---:|---:|---:|---:|---|".into());
    let tck = procfs::ticks_per_second() as f64;
    for c in &child_mem {
        let collected = c.samples.max(1) as f64;
        p(format!(
            "| {} | {} | {} | {} | {} | {} µs ({} ticks) | {} |",
            c.label,
            c.samples,
            mib(c.rss_start_kib),
            mib(c.rss_end_kib),
            mib(c.hwm_kib),
            us(c.cpu_ticks as f64 / tck * 1e6 / collected),
            c.cpu_ticks,
            c.note
        ));
    }
    if child_mem.is_empty() {
        p("| (no agent binary: run `cargo build --release` first) | | | | | | |".into());
    }
    if let Some(ne) = &ne {
        p(format!(
            "| node_exporter, after {} scrapes | | | {} | | | |",
            ne.scrapes + 10,
            mib(ne.rss_kib)
        ));
    }
    p(String::new());
    p("Whole-process CPU per sample: the child's utime+stime over its run (clock ticks), divided by its samples: the cost as deployed, with caches cold at every interval, thread wake-ups included, unlike the hot loops above.".into());
    p(String::new());
    p("In this process (the bench itself, so absolute RSS includes the bench):".into());
    p(String::new());
    p("| what | figure |".into());
    p("|---|---:|".into());
    p(format!(
        "| RSS growth from filling a buffer of {BUFFER} real samples | {} KiB (heap estimate {:.0} KiB) |",
        inproc.buffer_rss_delta_kib,
        inproc.buffer_heap_estimate as f64 / 1024.0
    ));
    p(format!(
        "| RSS after 1,000 collect+encode+push | {} |",
        mib(inproc.rss_after_1000_kib)
    ));
    p(format!(
        "| RSS after {} collect+encode+push ({:.0} s, {:.1} µs wall each) | {} |",
        inproc.long_iters,
        inproc.long_wall.as_secs_f64(),
        inproc.long_wall.as_secs_f64() * 1e6 / inproc.long_iters as f64,
        mib(inproc.rss_after_long_kib)
    ));
    p(String::new());

    p("### Size".into());
    p(String::new());
    p("| binary | size | stripped | under cargo's target directory |".into());
    p("|---|---:|---:|---|".into());
    for s in &sizes {
        p(format!(
            "| {} | {} KiB | {} | `{}` |",
            s.label,
            s.bytes / 1024,
            s.stripped
                .map_or("—".into(), |b| format!("{} KiB", b / 1024)),
            s.path
                .strip_prefix(target_dir().unwrap_or_default())
                .map_or_else(|_| s.label.clone(), |r| r.display().to_string())
        ));
    }
    if !sizes.iter().any(|s| s.label == "static musl") {
        p("| static musl | not built | | `cargo build --release --target x86_64-unknown-linux-musl` |".into());
    }
    p(String::new());

    p("### Budgets (docs/design.md#budgets)".into());
    p(String::new());
    p("| budget | measured | |".into());
    p("|---|---:|---|".into());
    if let (Some(agent), Some(fl)) = (
        dep.rows.iter().find(|r| r.label.starts_with("guest-agent")),
        dep.floor(),
    ) {
        let ratio = agent.cpu_us / fl.cpu_us;
        p(format!(
            "| CPU per sample as deployed ≤ 1.2× the floor probe | {ratio:.2}× ({} µs vs {} µs) | {} |",
            us(agent.cpu_us),
            us(fl.cpu_us),
            verdict(ratio <= 1.2)
        ));
    }
    let (vs_crates, vs_ureq, vs_floor) = fair_ratios(&fair);
    p(format!(
        "| CPU per sample as deployed ≤ 1.15× the floor for the chosen crates (procfs + ureq; median of {} alternating runs) | {vs_crates:.2}× ({vs_ureq:.2}× floor + ureq, {vs_floor:.2}× the raw floor) | {} |",
        fair.len(),
        verdict(vs_crates <= 1.15)
    ));
    let hot = whole.push.cpu.median / whole.floor.cpu.median;
    p(format!(
        "| hot loop ≤ 1.3× the hot floor | {hot:.2}× ({} µs vs {} µs, medians) | {} |",
        us(ours.median),
        us(whole.floor.cpu.median),
        verdict(hot <= 1.3)
    ));
    let musl_child = |outage: bool| {
        child_mem
            .iter()
            .find(|c| c.label.starts_with("static musl") && c.label.contains("outage") == outage)
            .or_else(|| {
                child_mem
                    .iter()
                    .find(|c| c.label.contains("outage") == outage)
            })
    };
    if let Some(c) = musl_child(false) {
        p(format!(
            "| RSS ≤ 2 MiB steady ({}) | {} after {} samples | {} |",
            c.label,
            mib(c.rss_end_kib),
            c.samples,
            verdict(c.rss_end_kib <= 2048)
        ));
    }
    if let Some(c) = musl_child(true) {
        let full = c.samples >= BUFFER as u64;
        p(format!(
            "| RSS ≤ 3 MiB with a full buffer ({}) | {}{} | {} |",
            c.label,
            mib(c.rss_end_kib),
            if full {
                String::new()
            } else {
                format!(", buffer {} of {BUFFER} only (--quick)", c.samples)
            },
            verdict(c.rss_end_kib <= 3072)
        ));
    }
    p(format!(
        "| memory after a million samples = after 1,000 | {} → {} after {} | {} |",
        mib(inproc.rss_after_1000_kib),
        mib(inproc.rss_after_long_kib),
        inproc.long_iters,
        verdict(inproc.rss_after_long_kib <= inproc.rss_after_1000_kib + 64)
    ));
    match sizes.iter().find(|s| s.label == "static musl") {
        Some(s) => {
            let b = s.stripped.unwrap_or(s.bytes);
            p(format!(
                "| static musl binary, stripped ≤ 1.25 MiB | {} KiB | {} |",
                b / 1024,
                verdict(b <= 1_310_720)
            ));
        }
        None => p("| static musl binary, stripped ≤ 1.25 MiB | not built | |".into()),
    }
    if debug_build {
        p(String::new());
        p("**Debug build: these figures are not the agent's.**".into());
    }
    println!("\n{md}");
    Ok(())
}
