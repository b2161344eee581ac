//! The floor probe as a process, for the as-deployed comparison of
//! `examples/bench.rs`: built like the agent (static musl, release profile)
//! and run at the same cadence, it costs what any collector of the sample
//! must pay (docs/performance.md).
//!
//! ```text
//! cargo build --release --target x86_64-unknown-linux-musl --example floor_probe
//! floor_probe --url http://127.0.0.1:PORT/PATH --interval 100ms [--proc-root /proc]
//!             [--parse] [--handoff] [--ureq]
//! ```
//!
//! Two switches add one part of the agent's work each, so that the gap
//! between the floor and the agent can be taken apart: `--parse` parses every
//! file with the collector's own (procfs-based) functions, `--handoff` posts
//! from a second thread woken for each sample, as the agent's sender is,
//! `--ureq` posts the same fixed body through ureq with the agent's own
//! client (the floor for the crates the agent is built on).
//! Only loopback addresses are accepted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use guest_agent::collect::{diskstats, loadavg, meminfo, net_dev, pressure, stat, uptime};

// Shared with the bench, which uses more of it than the probe does.
#[allow(dead_code)]
#[path = "support/floor.rs"]
mod floor;

// Built the same way as the agent, allocator included (src/main.rs), so
// that the `--parse` and `--ureq` rows compare with it.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn main() {
    if let Err(e) = run() {
        eprintln!("floor_probe: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let mut url = None;
    let mut interval = Duration::from_millis(100);
    let mut root = PathBuf::from("/proc");
    let (mut parse, mut handoff, mut use_ureq) = (false, false, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--url" => url = Some(value()?),
            "--interval" => {
                let v = value()?;
                interval =
                    humantime::parse_duration(&v).map_err(|e| format!("--interval {v}: {e}"))?;
            }
            "--proc-root" => root = PathBuf::from(value()?),
            "--parse" => parse = true,
            "--handoff" => handoff = true,
            "--ureq" => use_ureq = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let url = url.ok_or("--url is required")?;
    let rest = url
        .strip_prefix("http://")
        .ok_or(format!("{url}: only http:// URLs"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr: SocketAddr = authority
        .parse()
        .map_err(|e| format!("{authority}: not an address and port: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("{addr}: the probe only posts to loopback"));
    }
    let path = if path.is_empty() { "/" } else { path };
    let open =
        || floor::Floor::new(&root, addr, path).map_err(|e| format!("{}: {e}", root.display()));
    let mut probe = open()?;
    if use_ureq {
        probe.use_ureq(&url).map_err(|e| format!("{url}: {e}"))?;
    }
    // The hand-off: a flag and a condition variable, as the agent's buffer.
    let pending = Arc::new((Mutex::new(false), Condvar::new()));
    if handoff {
        let mut poster = open()?;
        if use_ureq {
            poster.use_ureq(&url).map_err(|e| format!("{url}: {e}"))?;
        }
        let pending = pending.clone();
        std::thread::spawn(move || {
            let (flag, ready) = &*pending;
            loop {
                let mut g = flag.lock().unwrap_or_else(|p| p.into_inner());
                while !*g {
                    g = ready.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                *g = false;
                drop(g);
                if let Err(e) = poster.post() {
                    eprintln!("floor_probe: {e}");
                }
            }
        });
    }
    let mut next = Instant::now();
    let mut failed = false;
    let mut parsed = 0usize;
    loop {
        let read = if parse {
            probe.read_each(|i, text| parsed += parse_one(i, text))
        } else {
            probe.read_files()
        };
        let round = read.and_then(|_| probe.count_processes()).and_then(|_| {
            if handoff {
                let (flag, ready) = &*pending;
                *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
                ready.notify_one();
                Ok(())
            } else {
                probe.post()
            }
        });
        match round {
            Ok(()) => failed = false,
            Err(e) if !failed => {
                eprintln!("floor_probe: {e}");
                failed = true;
            }
            Err(_) => {}
        }
        floor::wait_for_next_tick(&mut next, interval);
        std::hint::black_box(parsed);
    }
}

/// Parses file `i` of [`floor::NINE_FILES`] with the collector's function;
/// 1 when it parsed.
fn parse_one(i: usize, text: &[u8]) -> usize {
    let ok = match i {
        0 => stat::parse(text).is_ok(),
        1 => meminfo::parse(text).is_ok(),
        2 => loadavg::parse(text).is_ok(),
        3 => uptime::parse(text).is_ok(),
        4 => net_dev::parse(text).is_ok(),
        5 => diskstats::parse(text).is_ok(),
        _ => pressure::parse(text).is_ok(),
    };
    usize::from(ok)
}
