//! A fleet of simulated agents pushing into examples/postgres_ingest.rs over
//! loopback, ramped up until the route or PostgreSQL saturates
//! (docs/manager.md, "How far one PostgreSQL goes").
//!
//! ```text
//! cargo run --release --example fleet_bench -- --help
//! cargo run --release --example fleet_bench -- --agents 1000,5000,20000 --duration 60
//! ```
//!
//! The bench starts its own PostgreSQL cluster in a temporary directory
//! (examples/support/postgres.rs; as `nobody` when run as root) unless
//! given `--database-url`, and runs the route as a child process (this same
//! binary with `--serve`), so that the route's CPU and memory, PostgreSQL's
//! and the simulated fleet's own are measured apart, from `/proc`.
//!
//! Each simulated agent has its own `vm_id` and `run_id` and sends, every
//! interval, one batch of `--batch` samples (1, as an agent in the steady
//! state; more, as one catching up after an outage), its sends spread
//! evenly over the interval as a fleet's are. The samples are copies of one
//! real sample of this machine with the per-agent fields changed. A pool of
//! client threads, each with one kept-alive connection, sends them when due;
//! a step is saturated when it falls behind (it delivered under 95 % of the
//! offered samples, or the 99th percentile of how late requests started is
//! over a second) or when any request failed.

#[allow(dead_code)]
#[path = "postgres_ingest.rs"]
mod postgres_ingest;

#[allow(dead_code)]
#[path = "support/postgres.rs"]
mod postgres;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guest_agent::{Collector, Sample};

const USAGE: &str = "usage: fleet_bench [OPTIONS]

  --agents LIST        fleet sizes to ramp through, comma-separated
                       (1000,2000,5000,10000,20000,50000)
  --interval SECS      each agent's push interval (10)
  --duration SECS      how long each step runs (30)
  --batch N            samples per push (1)
  --workers N          client threads, one connection each (64)
  --pool N             the route's database connections (8)
  --database-url URL   use this database instead of a throwaway cluster
                       (PostgreSQL's CPU and memory are then not reported)
  --keep-going         run every step even after one saturates

Every address is loopback: the route listens on 127.0.0.1, the cluster on
127.0.0.1 and a Unix socket.";

/// The command line.
struct Options {
    agents: Vec<u64>,
    interval: Duration,
    duration: Duration,
    batch: u64,
    workers: usize,
    pool: u32,
    database_url: Option<String>,
    keep_going: bool,
}

impl Options {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
        let mut o = Options {
            agents: vec![1000, 2000, 5000, 10_000, 20_000, 50_000],
            interval: Duration::from_secs(10),
            duration: Duration::from_secs(30),
            batch: 1,
            workers: 64,
            pool: 8,
            database_url: None,
            keep_going: false,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "--help" || arg == "-h" {
                return Err(USAGE.into());
            }
            if arg == "--keep-going" {
                o.keep_going = true;
                continue;
            }
            let value = args
                .next()
                .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))?;
            let number = |v: &str| {
                v.parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{arg} {v:?}: not a positive whole number"))
            };
            match arg.as_str() {
                "--agents" => {
                    o.agents = value.split(',').map(number).collect::<Result<_, _>>()?;
                }
                "--interval" => o.interval = Duration::from_secs(number(&value)?),
                "--duration" => o.duration = Duration::from_secs(number(&value)?),
                "--batch" => o.batch = number(&value)?,
                "--workers" => o.workers = number(&value)? as usize,
                "--pool" => o.pool = u32::try_from(number(&value)?).unwrap_or(u32::MAX),
                "--database-url" => o.database_url = Some(value),
                _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
            }
        }
        Ok(o)
    }
}

/// xorshift64*: reproducible figures without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn uuid(&mut self) -> String {
        let bytes = (u128::from(self.next()) << 64 | u128::from(self.next())).to_le_bytes();
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .hyphenated()
            .to_string()
    }

    /// A number in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A well-mixed, never-zero seed for [`Rng`] from any number.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

/// One simulated agent.
struct SimAgent {
    vm_id: String,
    run_id: String,
    /// Its typical load, so that VMs differ from each other.
    cpu_base: f64,
}

/// What a step's client threads measured.
#[derive(Default)]
struct Tally {
    /// Request latencies, microseconds.
    latency_us: Vec<u64>,
    /// How late each request started against its schedule, microseconds.
    lag_us: Vec<u64>,
    requests: u64,
    accepted: u64,
    failures: u64,
    first_failure: Option<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latency_us.extend(other.latency_us);
        self.lag_us.extend(other.lag_us);
        self.requests += other.requests;
        self.accepted += other.accepted;
        self.failures += other.failures;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
    }
}

/// The `q` quantile of `values` (sorted here), in milliseconds.
fn quantile_ms(values: &mut [u64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_unstable();
    let i = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1;
    values[i] as f64 / 1000.0
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One batch of agent `a`'s round `round`, as its agent would send it.
fn batch_body(
    template: &Sample,
    a: &SimAgent,
    round: u64,
    batch: u64,
    interval: Duration,
    rng: &mut Rng,
) -> Result<Vec<u8>, String> {
    let now = now_ms();
    let step_ms = interval.as_millis() as u64 / batch;
    let samples: Vec<Sample> = (0..batch)
        .map(|j| {
            let mut s = template.clone();
            s.vm_id = Some(a.vm_id.clone());
            s.run_id = a.run_id.clone();
            s.seq = round * batch + j + 1;
            s.timestamp_ms = now - (batch - 1 - j) * step_ms;
            s.cpu_usage_percent = Some((a.cpu_base + 10.0 * rng.unit()).min(100.0));
            if let (Some(total), Some(_)) = (s.memory_total_kb, s.memory_used_kb) {
                let used = (total as f64 * (0.2 + 0.6 * rng.unit())) as u64;
                s.memory_used_kb = Some(used);
                s.memory_available_kb = Some(total - used);
                s.memory_usage_percent = Some(used as f64 * 100.0 / total as f64);
            }
            s.load_average = Some(a.cpu_base / 25.0 + rng.unit());
            s
        })
        .collect();
    serde_json::to_vec(&samples).map_err(|e| format!("encoding a batch: {e}"))
}

/// One step: `agents` agents for `o.duration`.
fn run_step(url: &str, template: &Sample, agents: u64, o: &Options, seed: u64) -> Tally {
    // The clock in the seed: a second run on the same database (with
    // --database-url) gets other run ids, not a fleet of resends.
    let mut rng = Rng(splitmix64(seed ^ now_ms()));
    let fleet: Arc<Vec<SimAgent>> = Arc::new(
        (0..agents)
            .map(|_| SimAgent {
                vm_id: rng.uuid(),
                run_id: rng.uuid(),
                cpu_base: 60.0 * rng.unit(),
            })
            .collect(),
    );
    let next = Arc::new(AtomicU64::new(0));
    // Every send is due at a fixed time: agent `a` of round `r` at
    // start + r × interval + a × interval / agents.
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + o.duration;
    let threads: Vec<_> = (0..o.workers)
        .map(|w| {
            let (fleet, next, url, template) = (
                fleet.clone(),
                next.clone(),
                url.to_string(),
                template.clone(),
            );
            let (interval, batch) = (o.interval, o.batch);
            std::thread::spawn(move || {
                let http: ureq::Agent = ureq::Agent::config_builder()
                    .proxy(None)
                    .timeout_global(Some(Duration::from_secs(30)))
                    .http_status_as_error(false)
                    .build()
                    .into();
                let mut rng = Rng(splitmix64(seed ^ (w as u64 + 1) << 32));
                let mut tally = Tally::default();
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let (a, round) = (k % agents, k / agents);
                    let due = start
                        + interval * u32::try_from(round).unwrap_or(u32::MAX)
                        + interval.mul_f64(a as f64 / agents as f64);
                    if due >= end {
                        return tally;
                    }
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let body = match batch_body(
                        &template,
                        &fleet[a as usize],
                        round,
                        batch,
                        interval,
                        &mut rng,
                    ) {
                        Ok(b) => b,
                        Err(e) => {
                            tally.failures += 1;
                            tally.first_failure.get_or_insert(e);
                            continue;
                        }
                    };
                    let sent = Instant::now();
                    tally.lag_us.push((sent - due).as_micros() as u64);
                    let answer = http
                        .post(&url)
                        .header("Content-Type", "application/json")
                        .send(&body[..])
                        .and_then(|mut r| {
                            let status = r.status().as_u16();
                            let text = r.body_mut().read_to_string()?;
                            Ok((status, text))
                        });
                    tally.latency_us.push(sent.elapsed().as_micros() as u64);
                    tally.requests += 1;
                    match answer {
                        Ok((200, text)) => {
                            let counts: serde_json::Value =
                                serde_json::from_str(&text).unwrap_or_default();
                            tally.accepted += counts["accepted"].as_u64().unwrap_or(0);
                        }
                        Ok((status, text)) => {
                            tally.failures += 1;
                            tally
                                .first_failure
                                .get_or_insert(format!("HTTP {status}: {}", text.trim()));
                        }
                        Err(e) => {
                            tally.failures += 1;
                            tally.first_failure.get_or_insert(e.to_string());
                        }
                    }
                }
            })
        })
        .collect();
    let mut total = Tally::default();
    for t in threads {
        match t.join() {
            Ok(tally) => total.merge(tally),
            Err(_) => {
                total.failures += 1;
                total
                    .first_failure
                    .get_or_insert("a client thread panicked".into());
            }
        }
    }
    total
}

/// CPU time (user + system, clock ticks) of a process from
/// `/proc/PID/stat`; with `reaped`, that of its exited children too.
fn cpu_ticks(pid: u32, reaped: bool) -> Option<(u64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let ppid = f.get(1)?.parse().ok()?;
    let mut ticks = n(11)? + n(12)?;
    if reaped {
        ticks += n(13)? + n(14)?;
    }
    Some((ticks, ppid))
}

/// A `kB` figure of a `/proc` key-value file, in KiB.
fn proc_kb(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A process tree's CPU ticks (exited children included, as the parent
/// reaped them) and proportional memory (PSS: shared buffers counted once).
fn tree_usage(root: u32) -> (u64, u64) {
    let mut ticks = cpu_ticks(root, true).map_or(0, |t| t.0);
    let mut pss = proc_kb(&format!("/proc/{root}/smaps_rollup"), "Pss:");
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((t, ppid)) = cpu_ticks(pid, false)
            && ppid == root
        {
            ticks += t;
            pss += proc_kb(&format!("/proc/{pid}/smaps_rollup"), "Pss:");
        }
    }
    (ticks, pss)
}

/// The route as a child process; killed on drop.
struct RouteProcess(Child);

impl Drop for RouteProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_route(database_url: &str, pool: u32) -> Result<(RouteProcess, String), String> {
    let exe = std::env::current_exe().map_err(|e| format!("this binary's path: {e}"))?;
    let mut child = Command::new(exe)
        .args([
            "--serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            database_url,
        ])
        .args(["--max-connections", &pool.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting the route: {e}"))?;
    let stdout = child.stdout.take().ok_or("the route's stdout")?;
    let route = RouteProcess(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| format!("reading the route's address: {e}"))?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| format!("the route did not start: {line:?}"))?;
    Ok((route, format!("http://{addr}/v1/guest-metrics")))
}

/// Bytes both tables take on disk, and their row counts.
fn table_figures(rt: &tokio::runtime::Runtime, pool: &sqlx::PgPool) -> Result<(i64, i64), String> {
    rt.block_on(
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT pg_total_relation_size('metrics.vm_metrics') \
             + pg_total_relation_size('metrics.guest_samples'), \
             (SELECT count(*) FROM metrics.vm_metrics)",
        )
        .fetch_one(pool),
    )
    .map_err(|e| format!("reading the tables' size: {e}"))
}

fn run(o: Options) -> Result<(), String> {
    let cluster = match &o.database_url {
        Some(_) => None,
        None => {
            let bin = postgres::bin_dir().ok_or_else(|| {
                format!(
                    "PostgreSQL's programs are missing: install {} or pass --database-url",
                    postgres::PACKAGE
                )
            })?;
            Some(postgres::PgServer::start_new(&bin, &[])?)
        }
    };
    let database_url = match (&o.database_url, &cluster) {
        (Some(url), _) => url.clone(),
        (None, Some(c)) => c.url(),
        (None, None) => return Err("no database".into()),
    };
    let (route, url) = start_route(&database_url, o.pool)?;
    let route_pid = route.0.id();
    let pg_pid = cluster.as_ref().and_then(postgres::PgServer::pid);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime: {e}"))?;
    let db = rt
        .block_on(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&database_url),
        )
        .map_err(|e| format!("connecting to the database: {e}"))?;
    let template = Collector::new(Path::new("/proc"), Some("template".into()))
        .map_err(|e| format!("collecting a template sample: {e}"))?
        .collect();

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "fleet_bench: {cores} cores, interval {}s, {}s per step, batch {}, {} client threads, route pool {}",
        o.interval.as_secs(),
        o.duration.as_secs(),
        o.batch,
        o.workers,
        o.pool
    );
    println!(
        "| agents | offered samples/s | stored samples/s | requests | failed | p50 ms | p99 ms | p99 late start ms | route CPU % | route RSS MiB | PostgreSQL CPU % | PostgreSQL PSS MiB | fleet CPU % | disk bytes/sample |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let mut stored_total: u64 = 0;
    for (step, &agents) in o.agents.iter().enumerate() {
        let (size_before, rows_before) = table_figures(&rt, &db)?;
        let route_before = cpu_ticks(route_pid, true).map_or(0, |t| t.0);
        let pg_before = pg_pid.map(tree_usage);
        let me_before = cpu_ticks(std::process::id(), false).map_or(0, |t| t.0);
        let started = Instant::now();
        let mut tally = run_step(&url, &template, agents, &o, 0x5eed + step as u64);
        let secs = started.elapsed().as_secs_f64();
        let route_cpu = (cpu_ticks(route_pid, true).map_or(0, |t| t.0) - route_before) as f64
            / ticks_per_sec
            / secs
            * 100.0;
        let route_rss = proc_kb(&format!("/proc/{route_pid}/status"), "VmRSS:") as f64 / 1024.0;
        let (pg_cpu, pg_pss) = match (pg_before, pg_pid.map(tree_usage)) {
            (Some((t0, _)), Some((t1, pss))) => (
                format!(
                    "{:.0}",
                    t1.saturating_sub(t0) as f64 / ticks_per_sec / secs * 100.0
                ),
                format!("{:.0}", pss as f64 / 1024.0),
            ),
            _ => ("n/a".into(), "n/a".into()),
        };
        let me_cpu = (cpu_ticks(std::process::id(), false).map_or(0, |t| t.0) - me_before) as f64
            / ticks_per_sec
            / secs
            * 100.0;
        let (size_after, rows_after) = table_figures(&rt, &db)?;
        let rows = (rows_after - rows_before).max(0) as u64;
        stored_total += tally.accepted;
        let offered = agents as f64 * o.batch as f64 / o.interval.as_secs_f64();
        // Over the time the step really took: a saturated step runs late.
        let stored = tally.accepted as f64 / secs;
        let p50 = quantile_ms(&mut tally.latency_us, 0.50);
        let p99 = quantile_ms(&mut tally.latency_us, 0.99);
        let late = quantile_ms(&mut tally.lag_us, 0.99);
        let per_sample = if rows > 0 {
            format!("{:.0}", (size_after - size_before) as f64 / rows as f64)
        } else {
            "n/a".into()
        };
        println!(
            "| {agents} | {offered:.0} | {stored:.0} | {} | {} | {p50:.1} | {p99:.1} | {late:.0} | {route_cpu:.0} | {route_rss:.0} | {pg_cpu} | {pg_pss} | {me_cpu:.0} | {per_sample} |",
            tally.requests, tally.failures
        );
        if rows != tally.accepted {
            // A request that timed out may have committed all the same.
            println!(
                "note: the answers counted {} samples stored, the database has {rows} new rows",
                tally.accepted
            );
        }
        let saturated = stored < 0.95 * offered || late > 1000.0 || tally.failures > 0;
        if saturated {
            let why = match &tally.first_failure {
                Some(f) => format!("{} requests failed, the first: {f}", tally.failures),
                None => format!(
                    "delivered {stored:.0} of {offered:.0} samples/s, requests started up to {late:.0} ms late"
                ),
            };
            println!("saturated at {agents} agents: {why}");
            if !o.keep_going {
                break;
            }
        }
    }
    println!("fleet_bench: {stored_total} samples stored in all");
    drop(route);
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    // The route's own process: the bench measures it apart from the fleet.
    if args.peek().map(String::as_str) == Some("--serve") {
        return postgres_ingest::run(args.skip(1));
    }
    let options = match Options::parse(args) {
        Ok(o) => o,
        Err(message) if message == USAGE => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    match run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet_bench: {e}");
            ExitCode::FAILURE
        }
    }
}
