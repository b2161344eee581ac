//! The one-command tour: a reference receiver on a loopback port, the agent
//! in-process pushing to it every second, and the received samples as a live
//! table until Ctrl-C (or `--seconds N`).
//!
//! ```text
//! cargo run --release --example demo [-- --seconds N] [--interval 1s]
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
  --seconds N          stop after N seconds (default: run until Ctrl-C)
  --interval DURATION  sampling interval (default 1s)
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
    let _ = writeln!(out, "{}", header());
    let deadline = seconds.map(|n| Instant::now() + Duration::from_secs(n));
    let (mut received, mut previous) = (0u64, None::<Sample>);
    while !interrupted.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        let Ok(s) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        received += 1;
        let _ = writeln!(out, "{}", row(&s, previous.as_ref()));
        previous = Some(s);
    }
    let delivered = running.stop().delivered;
    // Samples flushed at the stop arrive after it.
    while let Ok(s) = rx.recv_timeout(Duration::from_millis(200)) {
        received += 1;
        let _ = writeln!(out, "{}", row(&s, previous.as_ref()));
        previous = Some(s);
    }
    let _ = writeln!(
        out,
        "\nreceived {received} samples (the agent counted {delivered} delivered)"
    );
    Ok(())
}

fn header() -> String {
    format!(
        "{:>4} {:>8} {:>6} {:>6} {:>6} {:>6} {:>9} {:>6} {:>10} {:>10} {:>10} {:>10}",
        "seq",
        "time",
        "cpu%",
        "iow%",
        "steal%",
        "mem%",
        "used MiB",
        "load",
        "rx B/s",
        "tx B/s",
        "read B/s",
        "write B/s"
    )
}

/// One table row; rates are over the time since the previous sample.
fn row(s: &Sample, prev: Option<&Sample>) -> String {
    let f = |x: Option<f64>| x.map_or_else(|| "-".into(), |v| format!("{v:.1}"));
    let rate = |now: Option<u64>, before: Option<u64>| -> String {
        let (Some(now), Some(before), Some(p)) = (now, before, prev) else {
            return "-".into();
        };
        let ms = s.timestamp_ms.saturating_sub(p.timestamp_ms).max(1);
        format!("{}", now.saturating_sub(before) * 1000 / ms)
    };
    let secs = (s.timestamp_ms / 1000) % 86_400;
    format!(
        "{:>4} {:>02}:{:>02}:{:>02} {:>6} {:>6} {:>6} {:>6} {:>9} {:>6} {:>10} {:>10} {:>10} {:>10}",
        s.seq,
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
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
    )
}
