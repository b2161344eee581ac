//! The one-command tour: a reference receiver on a loopback port, the agent
//! in-process pushing to it every second, and the received samples as a live
//! table until Ctrl-C (or `--seconds N`).
//!
//! ```text
//! cargo run --release --example demo [-- --seconds N] [--interval 1s]
//! cargo run --release --example demo -- --help
//! ```
//!
//! Everything stays on 127.0.0.1: the receiver binds an ephemeral loopback
//! port and the agent is given that URL explicitly.

#[allow(dead_code)]
#[path = "manager.rs"]
mod manager;

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use guest_agent::{Sample, agent, config};

const USAGE: &str = "usage: demo [--seconds N] [--interval DURATION]
  --seconds N          stop after N seconds, then print how many samples
                       arrived (default: run until Ctrl-C)
  --interval DURATION  time between samples: 500ms, 1s, 2s... (default 1s)

Starts a reference receiver on a free 127.0.0.1 port and an agent in this
process pushing to it; nothing leaves this machine. One row per sample the
receiver accepted:
  seq, time       the sample's sequence number and UTC collection time
  cpu% iow% stl%  CPU busy, iowait and steal shares of the interval
  mem% MiB        memory used (total - available), percent and MiB
  load            1-minute load average
  rx/s tx/s       network bytes per second received, sent (all but lo)
  rd/s wr/s       disk bytes per second read, written (whole disks)
The table fits 80 columns; with COLUMNS set narrower, the rightmost
columns are left out.
";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args) {
        Ok(Some((seconds, interval))) => {
            if let Err(e) = run(seconds, &interval) {
                eprintln!("demo: {e}");
                std::process::exit(1);
            }
        }
        Ok(None) => print!("{USAGE}"),
        Err(e) => {
            eprintln!("demo: {e}\n{USAGE}");
            std::process::exit(2);
        }
    }
}

/// `Ok(None)` for `--help`.
fn parse(args: &[String]) -> Result<Option<(Option<u64>, String)>, String> {
    let (mut seconds, mut interval) = (None, "1s".to_string());
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--seconds" => {
                seconds = Some(
                    value
                        .parse()
                        .map_err(|_| format!("--seconds {value:?}: expected a whole number"))?,
                )
            }
            "--interval" => interval = value.clone(),
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(Some((seconds, interval)))
}

fn run(seconds: Option<u64>, interval: &str) -> Result<(), String> {
    let (tx, rx) = mpsc::channel::<Sample>();
    let tx = Mutex::new(tx);
    let addr = manager::spawn(
        ([127, 0, 0, 1], 0).into(),
        Box::new(move |s: &Sample| {
            if let Ok(tx) = tx.lock() {
                let _ = tx.send(s.clone());
            }
        }),
    )?;
    let url = format!("http://{addr}/v1/guest-metrics");
    let config = config::resolve(
        &[
            ("url", url.clone()),
            ("interval", interval.to_string()),
            ("listen", "off".into()),
            ("vm_id", "demo".into()),
            ("log", "warn".into()),
        ],
        &[],
        Some(Path::new("/nonexistent/guest-agent.conf")),
    )
    .map_err(|e| e.to_string())?;

    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())
        .map_err(|e| format!("cannot watch Ctrl-C: {e}"))?;
    let running = agent::start(config).map_err(|e| e.to_string())?;

    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "guest-agent {} pushing to {url}",
        guest_agent::AGENT_VERSION
    );
    let _ = writeln!(
        out,
        "{}",
        match seconds {
            Some(n) => format!("for {n} s; each row is a sample as the receiver accepted it:\n"),
            None => "Ctrl-C to stop; each row is a sample as the receiver accepted it:\n".into(),
        }
    );
    let width = columns();
    let _ = writeln!(out, "{}", header(width));
    let deadline = seconds.map(|n| Instant::now() + Duration::from_secs(n));
    let (mut received, mut previous) = (0u64, None::<Sample>);
    while !interrupted.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        let Ok(s) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        received += 1;
        let _ = writeln!(out, "{}", row(&s, previous.as_ref(), width));
        previous = Some(s);
    }
    let delivered = running.stop().delivered;
    // Samples flushed at the stop arrive after it.
    while let Ok(s) = rx.recv_timeout(Duration::from_millis(200)) {
        received += 1;
        let _ = writeln!(out, "{}", row(&s, previous.as_ref(), width));
        previous = Some(s);
    }
    let _ = writeln!(
        out,
        "\nreceived {received} samples (the agent counted {delivered} delivered)"
    );
    Ok(())
}

/// Width used when `$COLUMNS` is unset or not a number: a classic terminal.
/// The full table is 79 characters wide.
const DEFAULT_COLUMNS: usize = 80;

/// The terminal width the table must fit: `$COLUMNS` when the shell exports
/// it (bash sets but does not export it), else 80. Columns that do not fit
/// are left out from the right; seq and time always stay.
fn columns() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(DEFAULT_COLUMNS)
}

/// Column titles and widths (each cell is right-aligned, one space before it).
const COLUMNS: [(&str, usize); 12] = [
    ("seq", 5),
    ("time", 8),
    ("cpu%", 5),
    ("iow%", 5),
    ("stl%", 5),
    ("mem%", 5),
    ("MiB", 6),
    ("load", 5),
    ("rx/s", 6),
    ("tx/s", 6),
    ("rd/s", 6),
    ("wr/s", 6),
];

/// Joins the cells that fit in `width` (seq and time always do).
fn fit(cells: &[String], width: usize) -> String {
    let mut line = String::new();
    for (i, (cell, (_, w))) in cells.iter().zip(COLUMNS).enumerate() {
        let sep = usize::from(i > 0);
        if i >= 2 && line.len() + sep + w > width {
            break;
        }
        if sep == 1 {
            line.push(' ');
        }
        line.push_str(&format!("{cell:>w$}"));
    }
    line
}

fn header(width: usize) -> String {
    let cells: Vec<String> = COLUMNS.iter().map(|(t, _)| t.to_string()).collect();
    fit(&cells, width)
}

/// Bytes per second in at most 6 characters: `512`, `12.3K`, `4.5M`, `1.2G`.
fn human(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    for (size, unit) in UNITS {
        if bytes >= size {
            let v = bytes as f64 / size as f64;
            return if v < 100.0 {
                format!("{v:.1}{unit}")
            } else {
                format!("{v:.0}{unit}")
            };
        }
    }
    bytes.to_string()
}

/// One table row; rates are over the time since the previous sample.
fn row(s: &Sample, prev: Option<&Sample>, width: usize) -> String {
    let f = |x: Option<f64>| x.map_or_else(|| "-".into(), |v| format!("{v:.1}"));
    let rate = |now: Option<u64>, before: Option<u64>| -> String {
        let (Some(now), Some(before), Some(p)) = (now, before, prev) else {
            return "-".into();
        };
        let ms = s.timestamp_ms.saturating_sub(p.timestamp_ms).max(1);
        human(now.saturating_sub(before) * 1000 / ms)
    };
    let secs = (s.timestamp_ms / 1000) % 86_400;
    let cells = [
        s.seq.to_string(),
        format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60),
        f(s.cpu_usage_percent),
        f(s.cpu_iowait_percent),
        f(s.cpu_steal_percent),
        f(s.memory_usage_percent),
        s.memory_used_kb
            .map_or_else(|| "-".into(), |kb| (kb / 1024).to_string()),
        s.load_average
            .map_or_else(|| "-".into(), |l| format!("{l:.2}")),
        rate(s.network_rx_bytes, prev.and_then(|p| p.network_rx_bytes)),
        rate(s.network_tx_bytes, prev.and_then(|p| p.network_tx_bytes)),
        rate(s.disk_read_bytes, prev.and_then(|p| p.disk_read_bytes)),
        rate(s.disk_write_bytes, prev.and_then(|p| p.disk_write_bytes)),
    ];
    fit(&cells, width)
}
