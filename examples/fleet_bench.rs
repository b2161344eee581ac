//! A fleet of simulated agents pushing into examples/postgres_ingest.rs over
//! loopback, ramped up until the route or PostgreSQL saturates
//! (docs/manager.md, "How far one PostgreSQL goes").
//!
//! ```text
//! cargo run --release --example fleet_bench -- --help
//! cargo run --release --example fleet_bench -- --agents 10000,50000,100000 --duration 60
//! cargo run --release --example fleet_bench -- --agents 100000,400000 --flush 60 --duration 120
//! ```
//!
//! The bench starts its own PostgreSQL cluster in a temporary directory
//! (examples/support/postgres.rs; as `nobody` when run as root) unless
//! given `--database-url`, and runs the route as a child process (this same
//! binary with `--serve`), so that the route's CPU and memory, PostgreSQL's
//! and the simulated fleet's own are measured apart, from `/proc`.
//!
//! Each simulated agent has its own `vm_id` and `run_id` and pushes every
//! interval one sample (as an agent in the steady state), or with `--flush`
//! every flush period the samples of that period in one POST (as an agent
//! with `flush` set), its pushes spread evenly over the period as a fleet's
//! are. The samples are one real sample of this machine with the per-agent
//! and per-round fields written in: the body is prepared text with numbers
//! put between its pieces, and its request headers come from one function,
//! [`request_head`]. One thread drives every connection (`--connections`
//! kept-alive ones), each taking the next push due when it is free, so the
//! fleet costs little beside what it measures (its CPU per request is
//! reported). A step is saturated when it falls behind (it delivered under
//! 95 % of the offered samples, or the 99th percentile of how late pushes
//! started is over a second) or when any request failed. After the last
//! step, the bytes each stored sample takes are reported, after `VACUUM`.
//! Unless `--unsigned`, every push is signed as an agent with a key signs
//! it (docs/security.md) and the route checks every signature.

#[allow(dead_code)]
#[path = "postgres_ingest.rs"]
mod postgres_ingest;

#[allow(dead_code)]
#[path = "support/postgres.rs"]
mod postgres;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guest_agent::{Collector, Sample};

const USAGE: &str = "usage: fleet_bench [OPTIONS]

  --agents LIST        fleet sizes to ramp through, comma-separated
                       (1000,2000,5000,10000,20000,50000)
  --interval SECS      each agent's push interval (10)
  --duration SECS      how long each step runs (30)
  --flush SECS         each agent pushes its samples of the last SECS in one
                       POST, as an agent with flush=SECS does (off: each
                       sample pushed as it is taken)
  --connections N      kept-alive connections the fleet sends on, all
                       driven by one thread (512)
  --pool N             the route's database connections (8)
  --database-url URL   use this database instead of a throwaway cluster
                       (PostgreSQL's CPU and memory are then not reported)
  --pg-setting N=V     a setting of the throwaway cluster (stock otherwise),
                       such as --pg-setting max_wal_size=8GB; repeatable
  --route-arg ARG      an argument for the route (postgres_ingest --help),
                       such as --route-arg --jsonb-copy=off; repeatable
  --unsigned           push unsigned, to a route without master keys; by
                       default every push is signed with its agent's own
                       VM key, derived from a master key the route is given
                       (--key-file), as agents with keys push
                       (docs/security.md)
  --keep-going         run every step even after one saturates

Every address is loopback: the route listens on 127.0.0.1, the cluster on
127.0.0.1 and a Unix socket.";

/// The command line.
struct Options {
    agents: Vec<u64>,
    interval: Duration,
    duration: Duration,
    flush: Option<Duration>,
    connections: usize,
    pool: u32,
    route_args: Vec<String>,
    pg_settings: Vec<(String, String)>,
    database_url: Option<String>,
    keep_going: bool,
    signed: bool,
}

impl Options {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
        let mut o = Options {
            agents: vec![1000, 2000, 5000, 10_000, 20_000, 50_000],
            interval: Duration::from_secs(10),
            duration: Duration::from_secs(30),
            flush: None,
            connections: 512,
            route_args: Vec::new(),
            pg_settings: Vec::new(),
            pool: 8,
            database_url: None,
            keep_going: false,
            signed: true,
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
            if arg == "--unsigned" {
                o.signed = false;
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
                "--flush" if value == "off" => o.flush = None,
                "--flush" => o.flush = Some(Duration::from_secs(number(&value)?)),
                "--connections" => o.connections = number(&value)? as usize,
                "--pool" => o.pool = u32::try_from(number(&value)?).unwrap_or(u32::MAX),
                "--database-url" => o.database_url = Some(value),
                "--route-arg" => o.route_args.push(value),
                "--pg-setting" => {
                    let (n, v) = value
                        .split_once('=')
                        .ok_or_else(|| format!("--pg-setting {value:?}: NAME=VALUE"))?;
                    o.pg_settings.push((n.to_string(), v.to_string()));
                }
                _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
            }
        }
        Ok(o)
    }
}

impl Options {
    /// How often each agent pushes.
    fn push_interval(&self) -> Duration {
        self.flush.unwrap_or(self.interval).max(self.interval)
    }

    /// Samples per push: one per interval of the flush.
    fn batch(&self) -> u64 {
        (self.push_interval().as_secs() / self.interval.as_secs().max(1)).max(1)
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

/// Agent `a`'s UUID of kind `kind` (its vm_id or run_id) in fleet `fleet`:
/// made from the numbers, so that a fleet of any size costs no memory.
fn agent_uuid(fleet: u64, a: u64, kind: u64) -> uuid::Uuid {
    let hi = splitmix64(fleet ^ a.wrapping_mul(0x100_0000_01b3) ^ kind);
    let lo = splitmix64(hi ^ a);
    uuid::Builder::from_random_bytes((u128::from(hi) << 64 | u128::from(lo)).to_le_bytes())
        .into_uuid()
}

/// What a step's connections measured.
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

    fn fail(&mut self, why: String) {
        self.failures += 1;
        self.first_failure.get_or_insert(why);
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

/// One real sample of this machine, serialised once and cut where the
/// per-agent and per-round values go: a body is these pieces with the
/// values between them, written into a kept buffer.
struct BodyTemplate {
    /// The text between the values, one more than there are values.
    pieces: Vec<String>,
}

/// Stand-ins written into the template and found again in its text, in
/// the order the fields serialise.
const MARKS: [(&str, &str); 6] = [
    ("vm_id", "\"00000000-0000-4000-8000-00000000aaaa\""),
    ("run_id", "\"00000000-0000-4000-8000-00000000bbbb\""),
    ("seq", "987654321012345"),
    ("timestamp_ms", "987654321012346"),
    ("cpu_usage_percent", "12.3456789"),
    ("load_average", "2.3456789"),
];

impl BodyTemplate {
    fn new(sample: &Sample) -> Result<BodyTemplate, String> {
        let mut s = sample.clone();
        s.vm_id = Some("00000000-0000-4000-8000-00000000aaaa".into());
        s.run_id = "00000000-0000-4000-8000-00000000bbbb".into();
        s.seq = 987_654_321_012_345;
        s.timestamp_ms = 987_654_321_012_346;
        s.cpu_usage_percent = Some(12.345_678_9);
        s.load_average = Some(2.345_678_9);
        let text = serde_json::to_string(&s).map_err(|e| format!("encoding the template: {e}"))?;
        let mut pieces = Vec::new();
        let mut rest = text.as_str();
        for (field, mark) in MARKS {
            let at = rest
                .find(&format!("\"{field}\":{mark}"))
                .ok_or_else(|| format!("the template's {field} is not where it was expected"))?;
            let cut = at + field.len() + 3;
            pieces.push(rest[..cut].to_string());
            rest = &rest[cut + mark.len()..];
        }
        pieces.push(rest.to_string());
        Ok(BodyTemplate { pieces })
    }

    /// Agent `a`'s push of `batch` samples, the last stamped now, into `out`.
    fn write(
        &self,
        out: &mut Vec<u8>,
        ids: (&str, &str),
        first_seq: u64,
        batch: u64,
        step_ms: u64,
        rng: &mut Rng,
    ) {
        use std::io::Write;
        let now = now_ms();
        out.push(b'[');
        for j in 0..batch {
            if j > 0 {
                out.push(b',');
            }
            let p = &self.pieces;
            let cpu = 60.0 * rng.unit();
            let _ = write!(
                out,
                "{}\"{}\"{}\"{}\"{}{}{}{}{}{:.2}{}{:.2}{}",
                p[0],
                ids.0,
                p[1],
                ids.1,
                p[2],
                first_seq + j,
                p[3],
                now - (batch - 1 - j) * step_ms,
                p[4],
                cpu,
                p[5],
                cpu / 25.0 + rng.unit(),
                p[6]
            );
        }
        out.push(b']');
    }
}

/// The request line and headers of one push of `body`: the one place a
/// request's headers are made, so that the bench sends what an agent sends
/// (a signature over the body goes here).
fn request_head(
    out: &mut Vec<u8>,
    host: &str,
    path: &str,
    body: &[u8],
    signed: Option<&guest_agent::sign::Headers>,
) {
    use std::io::Write;
    let _ = write!(
        out,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: guest-agent/{}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n",
        guest_agent::AGENT_VERSION,
        body.len()
    );
    if let Some(h) = signed {
        let _ = write!(
            out,
            "Content-Digest: {}\r\nSignature-Input: {}\r\nSignature: {}\r\n",
            h.content_digest, h.signature_input, h.signature
        );
    }
    out.extend_from_slice(b"\r\n");
}

/// The fleet's master key and each agent's VM key derived from it once,
/// as each agent holds its own: signing costs a fleet what it costs agents.
struct Keys {
    master: guest_agent::sign::Key,
    vms: std::cell::RefCell<std::collections::HashMap<u64, guest_agent::sign::Key>>,
}

impl Keys {
    /// A master key of 32 bytes from the kernel's random source.
    fn new() -> Result<Keys, String> {
        let mut bytes = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .map_err(|e| format!("reading /dev/urandom for a master key: {e}"))?;
        Ok(Keys {
            master: guest_agent::sign::Key::new("fleet", bytes)?,
            vms: Default::default(),
        })
    }

    /// Forgets the agents' keys: a new step is a new fleet, with other
    /// vm_ids.
    fn new_fleet(&self) {
        self.vms.borrow_mut().clear();
    }

    /// Agent `a`'s signature over `body`.
    fn sign(&self, a: u64, vm: &str, path: &str, body: &[u8]) -> guest_agent::sign::Headers {
        let mut vms = self.vms.borrow_mut();
        let key = vms.entry(a).or_insert_with(|| self.master.derive(vm));
        let created = now_ms() / 1000;
        guest_agent::sign::sign(key, vm, "POST", path, body, created)
    }
}

/// Reads one HTTP/1.1 answer from `conn`, keeping the bytes after it for
/// the next: the status and the body.
async fn read_answer(
    conn: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> Result<(u16, Vec<u8>), String> {
    use tokio::io::AsyncReadExt;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = response
            .parse(buf)
            .map_err(|e| format!("a malformed answer: {e}"))?
        {
            let status = response.code.unwrap_or(0);
            let length = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
                .ok_or("an answer without Content-Length")?;
            while buf.len() < head + length {
                if conn
                    .read_buf(buf)
                    .await
                    .map_err(|e| format!("reading the answer: {e}"))?
                    == 0
                {
                    return Err("the route closed the connection mid-answer".into());
                }
            }
            let body = buf[head..head + length].to_vec();
            buf.drain(..head + length);
            return Ok((status, body));
        }
        if conn
            .read_buf(buf)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            == 0
        {
            return Err("the route closed the connection".into());
        }
    }
}

/// The `accepted` count of a 200 answer, read without a JSON parser.
fn accepted_of(body: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(body);
    text.split("\"accepted\":")
        .nth(1)
        .map(|rest| {
            rest.trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// One step: `agents` agents for `o.duration`, on `o.connections`
/// kept-alive connections driven by one thread. Every push is due at a
/// fixed time (push `k`, agent `k % agents` of round `k / agents`, at
/// start + k × push interval / agents); a free connection takes the next
/// one due, so a slow route shows as pushes starting late.
fn run_step(
    addr: SocketAddr,
    template: &Rc<BodyTemplate>,
    keys: &Option<Rc<Keys>>,
    agents: u64,
    o: &Options,
    seed: u64,
) -> Tally {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let mut t = Tally::default();
            t.fail(format!("starting the fleet's runtime: {e}"));
            return t;
        }
    };
    // The clock in the seed: a second run on the same database (with
    // --database-url) gets other run ids, not a fleet of resends.
    let fleet_id = splitmix64(seed ^ now_ms());
    if let Some(keys) = keys {
        keys.new_fleet();
    }
    let push_every = o.push_interval();
    let batch = o.batch();
    let step_ms = o.interval.as_millis() as u64;
    let next = Rc::new(std::cell::Cell::new(0u64));
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let end = start + o.duration;
    let host = addr.to_string();
    rt.block_on(async {
        let local = tokio::task::LocalSet::new();
        let tasks: Vec<_> = (0..o.connections)
            .map(|c| {
                let next = next.clone();
                let host = host.clone();
                let template = template.clone();
                let keys = keys.clone();
                let mut rng = Rng(splitmix64(seed ^ ((c as u64 + 1) << 32)));
                local.spawn_local(async move {
                    use tokio::io::AsyncWriteExt;
                    let mut tally = Tally::default();
                    let mut conn: Option<tokio::net::TcpStream> = None;
                    let (mut body, mut request, mut answer) = (Vec::new(), Vec::new(), Vec::new());
                    loop {
                        let k = next.get();
                        next.set(k + 1);
                        let (a, round) = (k % agents, k / agents);
                        let due = start + push_every.mul_f64(k as f64 / agents as f64);
                        if due >= end {
                            return tally;
                        }
                        tokio::time::sleep_until(due).await;
                        let vm = agent_uuid(fleet_id, a, 1).hyphenated().to_string();
                        let run = agent_uuid(fleet_id, a, 2).hyphenated().to_string();
                        body.clear();
                        template.write(
                            &mut body,
                            (&vm, &run),
                            round * batch + 1,
                            batch,
                            step_ms,
                            &mut rng,
                        );
                        request.clear();
                        let path = "/v1/guest-metrics";
                        let signed = keys.as_ref().map(|k| k.sign(a, &vm, path, &body));
                        request_head(&mut request, &host, path, &body, signed.as_ref());
                        request.extend_from_slice(&body);
                        let sent = tokio::time::Instant::now();
                        tally.lag_us.push((sent - due).as_micros() as u64);
                        let result = async {
                            if conn.is_none() {
                                let c = tokio::net::TcpStream::connect(addr)
                                    .await
                                    .map_err(|e| format!("connecting to {addr}: {e}"))?;
                                let _ = c.set_nodelay(true);
                                conn = Some(c);
                                answer.clear();
                            }
                            let c = conn.as_mut().ok_or("no connection")?;
                            c.write_all(&request)
                                .await
                                .map_err(|e| format!("sending: {e}"))?;
                            read_answer(c, &mut answer).await
                        };
                        let result = tokio::time::timeout(Duration::from_secs(30), result).await;
                        tally.latency_us.push(sent.elapsed().as_micros() as u64);
                        tally.requests += 1;
                        match result {
                            Ok(Ok((200, text))) => tally.accepted += accepted_of(&text),
                            Ok(Ok((status, text))) => tally.fail(format!(
                                "HTTP {status}: {}",
                                String::from_utf8_lossy(&text).trim()
                            )),
                            Ok(Err(e)) => {
                                conn = None;
                                tally.fail(e);
                            }
                            Err(_) => {
                                conn = None;
                                tally.fail("no answer within 30 s".into());
                            }
                        }
                    }
                })
            })
            .collect();
        local
            .run_until(async move {
                let mut total = Tally::default();
                for t in tasks {
                    match t.await {
                        Ok(tally) => total.merge(tally),
                        Err(e) => total.fail(format!("a connection's task failed: {e}")),
                    }
                }
                total
            })
            .await
    })
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

fn start_route(
    database_url: &str,
    pool: u32,
    extra: &[String],
) -> Result<(RouteProcess, SocketAddr), String> {
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
        .args(extra)
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
    let addr = addr
        .parse()
        .map_err(|e| format!("the route's address {addr:?}: {e}"))?;
    Ok((route, addr))
}

/// Rows of `vm_metrics`, all partitions.
fn stored_rows(rt: &tokio::runtime::Runtime, pool: &sqlx::PgPool) -> Result<i64, String> {
    rt.block_on(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM metrics.vm_metrics").fetch_one(pool),
    )
    .map_err(|e| format!("counting vm_metrics' rows: {e}"))
}

/// Where each stored sample's bytes are, after `VACUUM`: per table, its
/// rows' heap, its indexes one by one and its TOAST, over all partitions,
/// divided by its rows.
fn storage_report(rt: &tokio::runtime::Runtime, pool: &sqlx::PgPool) -> Result<(), String> {
    rt.block_on(async {
        for table in ["metrics.vm_metrics", "metrics.guest_samples"] {
            sqlx::query(&format!("VACUUM (ANALYZE) {table}"))
                .execute(pool)
                .await
                .map_err(|e| format!("VACUUM {table}: {e}"))?;
        }
        let parts: Vec<(String, String, i64)> = sqlx::query_as(
            "WITH leaf AS (
                 SELECT t.relid, p.parent FROM (VALUES ('metrics.vm_metrics'), ('metrics.guest_samples')) p(parent),
                     pg_partition_tree(p.parent::regclass) t WHERE t.isleaf)
             SELECT parent, 'heap', sum(pg_relation_size(relid, 'main') + pg_relation_size(relid, 'fsm')
                 + pg_relation_size(relid, 'vm'))::bigint FROM leaf GROUP BY parent
             UNION ALL
             SELECT parent, 'TOAST', sum(coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0))::bigint
                 FROM leaf JOIN pg_class c ON c.oid = leaf.relid GROUP BY parent
             UNION ALL
             SELECT parent, 'index ' || regexp_replace(pg_partition_root(pi.indexrelid)::regclass::text,
                     '^metrics\\.', ''), pg_relation_size(pi.indexrelid)::bigint
                 FROM leaf JOIN pg_index pi ON pi.indrelid = leaf.relid
             ORDER BY 1, 2",
        )
        .fetch_all(pool)
        .await
        .map_err(|e| format!("reading the partitions' sizes: {e}"))?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT 'metrics.vm_metrics', count(*) FROM metrics.vm_metrics \
             UNION ALL SELECT 'metrics.guest_samples', count(*) FROM metrics.guest_samples",
        )
        .fetch_all(pool)
        .await
        .map_err(|e| format!("counting rows: {e}"))?;
        println!("\nstorage after VACUUM, bytes per row (all partitions):");
        println!("| table | part | bytes | per row |");
        println!("|---|---|---:|---:|");
        let mut total = 0.0;
        for (table, count) in &rows {
            let count = (*count).max(1) as f64;
            // Indexes are listed per partition: summed by the parent's name.
            let mut by_part: Vec<(String, i64)> = Vec::new();
            for (_, part, bytes) in parts.iter().filter(|(t, _, _)| t == table) {
                match by_part.iter_mut().find(|(n, _)| n == part) {
                    Some((_, b)) => *b += bytes,
                    None => by_part.push((part.clone(), *bytes)),
                }
            }
            for (part, bytes) in by_part {
                let per = bytes as f64 / count;
                total += per;
                println!("| {table} | {part} | {bytes} | {per:.0} |");
            }
        }
        println!("| both | all | | {total:.0} |");
        Ok(())
    })
}

/// CPU seconds a process (and, with `reaped`, its exited children) used.
fn cpu_secs(pid: u32, reaped: bool) -> f64 {
    cpu_ticks(pid, reaped).map_or(0, |t| t.0) as f64 / 100.0 // USER_HZ on Linux
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
            let settings: Vec<(&str, &str)> = o
                .pg_settings
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            Some(postgres::PgServer::start_new(&bin, &settings)?)
        }
    };
    let database_url = match (&o.database_url, &cluster) {
        (Some(url), _) => url.clone(),
        (None, Some(c)) => c.url(),
        (None, None) => return Err("no database".into()),
    };
    // Signed pushes: the route is given the master key (a file of mode
    // 0600 in a directory of the bench's own) and checks every push.
    let key_dir =
        tempfile::tempdir().map_err(|e| format!("a directory for the master key: {e}"))?;
    let keys = if o.signed {
        let keys = Keys::new()?;
        let path = key_dir.path().join("master.keys");
        std::fs::write(&path, keys.master.to_line() + "\n")
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        let mut route_args = o.route_args.clone();
        route_args.extend(["--key-file".to_string(), path.display().to_string()]);
        Some((Rc::new(keys), route_args))
    } else {
        None
    };
    let route_args = keys.as_ref().map_or(&o.route_args, |(_, a)| a);
    let (route, addr) = start_route(&database_url, o.pool, route_args)?;
    let keys = keys.map(|(k, _)| k);
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
    let sample = Collector::new(Path::new("/proc"), Some("template".into()))
        .map_err(|e| format!("collecting a template sample: {e}"))?
        .collect();
    let template = Rc::new(BodyTemplate::new(&sample)?);

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "fleet_bench: {cores} cores, load average {} at start, interval {}s, push every {}s ({} samples per push), {}s per step, {} connections, route pool {}, {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        o.interval.as_secs(),
        o.push_interval().as_secs(),
        o.batch(),
        o.duration.as_secs(),
        o.connections,
        o.pool,
        if o.signed {
            "every push signed with its agent's VM key"
        } else {
            "unsigned"
        }
    );
    println!(
        "| agents | offered samples/s | stored samples/s | requests | failed | p50 ms | p99 ms | p99 late start ms | route CPU % | route RSS MiB | PostgreSQL CPU % | PostgreSQL PSS MiB | fleet CPU % | fleet RSS MiB | fleet CPU µs/request |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let mut stored_total: u64 = 0;
    let me = std::process::id();
    for (step, &agents) in o.agents.iter().enumerate() {
        let rows_before = stored_rows(&rt, &db)?;
        let route_before = cpu_secs(route_pid, true);
        let pg_before = pg_pid.map(tree_usage);
        let me_before = cpu_secs(me, false);
        let started = Instant::now();
        let mut tally = run_step(addr, &template, &keys, agents, &o, 0x5eed + step as u64);
        let secs = started.elapsed().as_secs_f64();
        let route_cpu = (cpu_secs(route_pid, true) - route_before) / secs * 100.0;
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
        let me_secs = cpu_secs(me, false) - me_before;
        let me_cpu = me_secs / secs * 100.0;
        let me_rss = proc_kb(&format!("/proc/{me}/status"), "VmRSS:") as f64 / 1024.0;
        let per_request = me_secs * 1e6 / tally.requests.max(1) as f64;
        let rows = (stored_rows(&rt, &db)? - rows_before).max(0) as u64;
        stored_total += tally.accepted;
        let offered = agents as f64 / o.interval.as_secs_f64();
        // Over the time the step really took: a saturated step runs late.
        let stored = tally.accepted as f64 / secs;
        let p50 = quantile_ms(&mut tally.latency_us, 0.50);
        let p99 = quantile_ms(&mut tally.latency_us, 0.99);
        let late = quantile_ms(&mut tally.lag_us, 0.99);
        println!(
            "| {agents} | {offered:.0} | {stored:.0} | {} | {} | {p50:.1} | {p99:.1} | {late:.0} | {route_cpu:.0} | {route_rss:.0} | {pg_cpu} | {pg_pss} | {me_cpu:.0} | {me_rss:.0} | {per_request:.0} |",
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
    storage_report(&rt, &db)
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
