//! The push route writing into the manager's own PostgreSQL
//! (docs/manager.md, "Storing pushes in PostgreSQL"): every accepted sample
//! becomes a row of `metrics.vm_metrics`, the table the manager's dashboards
//! read, and is kept whole as JSONB in `metrics.guest_samples`, whose
//! primary key (`run_id`, `seq`, `recorded_at`) de-duplicates, with a
//! look-up of each pair across partitions. Each request is validated alone,
//! then joins a group of concurrent requests written by one statement per
//! table in one transaction (group.rs), and is answered once that commits,
//! so a batch the agent resends after a lost answer or a manager restart is
//! stored once: the database remembers, not the process. Both tables are
//! partitioned by day, created ahead and dropped after a retention each
//! (partitions.rs).
//!
//! ```text
//! cargo run --example postgres_ingest -- --listen 127.0.0.1:18080 \
//!     --database-url postgres://USER@127.0.0.1:5432/DB
//! ```
//!
//! Answers, as the agent's delivery contract reads them
//! (docs/design.md#delivery): 200 with `accepted`, `duplicates`,
//! `expired` (older than the JSONB copy's retention: not stored) and
//! `conflicts` once committed; 400 for a body that is not samples (the
//! kit's check); 413 over `ingest::MAX_BODY` (the agent halves its batch);
//! 422 for a sample without a UUID `vm_id` (the column is `UUID NOT NULL`),
//! stamped past the partitions made ahead, or one the database refuses as
//! data (the agent drops the batch: no retry could store it); 503 with
//! `Retry-After` when the database cannot be reached or the transaction
//! fails (the agent keeps the batch and retries).
//! With `--key-file FILE` (master keys; [`AppState::with_keys`]) a push must
//! be signed with its VM's key, checked on the raw body first: 401 with the
//! reason for a missing or wrong signature or digest, 403 for a sample of
//! another VM than the signer; nothing of such a body is written
//! (docs/security.md).
//!
//! axum, tokio and sqlx are dev-dependencies of this crate: nothing here
//! reaches the agent's binary.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use guest_agent::ingest::{self, Conflict, Parsed, Refusal, Reply, Verifier};
use sqlx::Connection;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

#[path = "postgres_ingest/group.rs"]
mod group;
#[path = "postgres_ingest/partitions.rs"]
mod partitions;

pub use group::Grouping;
use group::{Columns, Failure, Groups, fingerprint, same_json, unprocessable};
pub use partitions::{Retention, maintain};

/// The example's schema: the shape of the manager's `metrics.vm_metrics`
/// and the companion `metrics.guest_samples`, embedded at compile time.
pub static MIGRATOR: Migrator = sqlx::migrate!("examples/postgres_ingest/migrations");

/// The schema holding the migrator's own bookkeeping table. Not `public`:
/// the manager's sqlx migrator keeps its `_sqlx_migrations` there, and two
/// migrators sharing that table each refuse the other's versions.
pub const MIGRATIONS_SCHEMA: &str = "metrics";

/// How long a group waits for a pooled connection before its requests are
/// answered 503. Short: while PostgreSQL is down, the agent is told to come
/// back later within its own request timeout (2 s by default), instead of
/// timing out and backing off on its own.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);

/// How the route behaves, beyond its pool.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The `Retry-After` of a 503, in seconds: about how long a database
    /// restart takes. The agent waits at least this long before retrying.
    pub retry_after_secs: u64,
    /// How requests are gathered into transactions.
    pub grouping: Grouping,
    /// The partitions' retention, and the time range a sample may have.
    pub retention: Retention,
    /// Whether each sample is kept whole as JSONB in `guest_samples`;
    /// without, only its key and fingerprint are (docs/manager.md,
    /// "Storage per sample").
    pub jsonb_copy: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            retry_after_secs: 5,
            grouping: Grouping::default(),
            retention: Retention::default(),
            jsonb_copy: true,
        }
    }
}

/// What the route has answered since it started, for a health page or a
/// test; all counts are of this process only.
#[derive(Debug, Default)]
pub struct Stats {
    /// Batches committed (200).
    pub committed: AtomicU64,
    /// Samples written for the first time.
    pub accepted: AtomicU64,
    /// Samples already stored with the same payload (resends).
    pub duplicates: AtomicU64,
    /// Samples whose pair was stored with a different payload.
    pub conflicts: AtomicU64,
    /// Samples older than the JSONB copy's retention, not stored.
    pub expired: AtomicU64,
    /// Batches refused for their payload (400, 413, 422).
    pub refused: AtomicU64,
    /// Batches answered 503: the database failed; the agent retries.
    pub store_failed: AtomicU64,
}

impl Stats {
    /// One of the counts, read now.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The state the route shares between requests: cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pool: PgPool,
    settings: Settings,
    stats: Arc<Stats>,
    groups: Groups,
    /// Master keys: when set, only signed pushes are stored
    /// ([`AppState::with_keys`], docs/security.md).
    verifier: Option<Arc<Verifier>>,
}

impl AppState {
    /// The route's state over a pool (from [`pool`], or the manager's own
    /// with a short acquire timeout), on a database [`migrate`]d already:
    /// creates the partitions due (see [`maintain`]), then starts the
    /// group writers and the partitions' timer on the current runtime.
    pub async fn start(pool: PgPool, settings: Settings) -> Result<AppState, String> {
        settings.retention.check()?;
        for line in maintain(&pool, &settings.retention).await? {
            eprintln!("postgres_ingest: {line}");
        }
        let missing_partition = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(partitions::keep_maintained(
            pool.clone(),
            settings.retention,
            missing_partition.clone(),
        ));
        let groups = Groups::start(pool.clone(), settings.grouping, missing_partition);
        Ok(AppState {
            pool,
            settings,
            stats: Arc::default(),
            verifier: None,
            groups,
        })
    }

    /// The same route requiring every push to be signed with a key derived
    /// from one of these master keys, and storing only the signer's VM.
    pub fn with_keys(mut self, verifier: Verifier) -> AppState {
        self.verifier = Some(Arc::new(verifier));
        self
    }

    /// What has been answered so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The pool the route writes through.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// A pool that never blocks a request for long: connections are made on
/// demand (the route starts, and answers 503, while the database is down)
/// and tested before use (after a database restart the old ones are
/// dropped instead of failing a request).
pub fn pool(url: &str, max_connections: u32) -> Result<PgPool, String> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| format!("database URL {}: {e}", redact(url)))?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(true)
        .connect_lazy_with(options))
}

/// Runs the example's migrations on one connection of its own, with the
/// migrator's bookkeeping in [`MIGRATIONS_SCHEMA`].
pub async fn migrate(url: &str) -> Result<(), String> {
    let mut conn = PgConnection::connect(url)
        .await
        .map_err(|e| format!("connecting to {} to migrate: {e}", redact(url)))?;
    let setup = format!(
        "CREATE SCHEMA IF NOT EXISTS {MIGRATIONS_SCHEMA}; SET search_path TO {MIGRATIONS_SCHEMA}"
    );
    sqlx::raw_sql(&setup)
        .execute(&mut conn)
        .await
        .map_err(|e| format!("preparing schema {MIGRATIONS_SCHEMA}: {e}"))?;
    MIGRATOR
        .run(&mut conn)
        .await
        .map_err(|e| format!("running the migrations: {e}"))?;
    // The session's search_path must not outlive the migration.
    conn.close()
        .await
        .map_err(|e| format!("closing the migration connection: {e}"))
}

/// `POST /v1/guest-metrics`, to merge into the manager's own router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/guest-metrics", post(push))
        // The handler applies the kit's limit itself, answering with the
        // kit's JSON refusal rather than axum's plain-text one.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// One batch: read, validate, store with the next group, answer.
async fn push(State(state): State<AppState>, request: Request) -> Response {
    let reply = match read_and_store(&state, request).await {
        Ok(reply) => reply,
        Err(Failure::Refused(refusal)) => {
            state.stats.refused.fetch_add(1, Ordering::Relaxed);
            refusal.reply()
        }
        Err(Failure::Store(why)) => {
            state.stats.store_failed.fetch_add(1, Ordering::Relaxed);
            eprintln!("postgres_ingest: {why}; answering {}", ingest::STORE_FAILED);
            let mut response = respond(Reply::store_failed(&why));
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(state.settings.retry_after_secs),
            );
            return response;
        }
    };
    respond(reply)
}

/// The signature check, before anything parses the body: the VM the
/// request speaks for (401 with the reason when the signature or digest is
/// missing or wrong); `None` when the route requires no signature.
fn signer(
    state: &AppState,
    request: &SignedRequest,
    body: &[u8],
) -> Result<Option<String>, Failure> {
    let Some(verifier) = &state.verifier else {
        return Ok(None);
    };
    let fields: Vec<(&str, &[u8])> = request
        .fields
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .collect();
    verifier
        .verify(request.method.as_str(), &request.path, &fields, body)
        .map(|s| Some(s.vm_id))
        .map_err(|r| {
            Failure::Refused(Refusal {
                status: 401,
                reason: r.reason,
            })
        })
}

/// What the signature covers, taken from the request before its body is
/// read.
struct SignedRequest {
    method: axum::http::Method,
    path: String,
    fields: Vec<(String, Vec<u8>)>,
}

impl SignedRequest {
    fn of(request: &Request) -> SignedRequest {
        SignedRequest {
            method: request.method().clone(),
            path: request.uri().path().to_string(),
            fields: request
                .headers()
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                .collect(),
        }
    }
}

async fn read_and_store(state: &AppState, request: Request) -> Result<Reply, Failure> {
    let signed = SignedRequest::of(&request);
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared
        && let Err(refusal) = ingest::check_length(len)
    {
        if len <= DRAIN_LIMIT {
            drain(request.into_body()).await;
        }
        return Err(Failure::Refused(refusal));
    }
    let body = read_body(request.into_body()).await?;
    let signer = signer(state, &signed, &body)?;
    // Everything that can refuse this request alone happens here, before it
    // joins a group: a group only fails for reasons shared by all in it.
    let batch = validate(&body, &state.settings, signer.as_deref(), now_ms())?;
    let stored = state.groups.store(batch.rows).await?;

    let conflicts: Vec<Conflict> = batch
        .conflicts
        .into_iter()
        .chain(stored.conflicts)
        .collect();
    for c in &conflicts {
        eprintln!(
            "postgres_ingest: run {} seq {} (vm {}) was stored before with a different payload; the first is kept",
            c.run_id,
            c.seq,
            c.vm_id.as_deref().unwrap_or("?")
        );
    }
    let accepted = stored.accepted;
    let duplicates =
        (batch.samples as u64).saturating_sub(accepted + batch.expired + conflicts.len() as u64);
    let stats = &state.stats;
    stats.committed.fetch_add(1, Ordering::Relaxed);
    stats.accepted.fetch_add(accepted, Ordering::Relaxed);
    stats.duplicates.fetch_add(duplicates, Ordering::Relaxed);
    stats.expired.fetch_add(batch.expired, Ordering::Relaxed);
    stats
        .conflicts
        .fetch_add(conflicts.len() as u64, Ordering::Relaxed);
    let body = serde_json::json!({
        "accepted": accepted,
        "duplicates": duplicates,
        "expired": batch.expired,
        "conflicts": conflicts,
    });
    Ok(Reply {
        status: 200,
        body: format!("{body}\n"),
    })
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// How much of an oversized body is read (and thrown away) before the 413
/// is sent. A client that is still writing when the server closes the
/// connection gets a reset instead of the answer, and the agent would take
/// that for a network error and resend the same batch forever; past this
/// much, the connection is closed anyway.
const DRAIN_LIMIT: u64 = 4 * ingest::MAX_BODY as u64;

/// The next chunk of a body: `None` at its end.
async fn next_chunk(body: &mut Body) -> Option<Result<Bytes, axum::Error>> {
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await?;
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => return Some(Ok(data)),
                // Trailers: nothing of the payload.
                Err(_) => continue,
            },
            Err(e) => return Some(Err(e)),
        }
    }
}

/// Reads a body of at most `ingest::MAX_BODY` bytes; a longer one is read
/// on up to [`DRAIN_LIMIT`] and refused (413).
async fn read_body(mut body: Body) -> Result<Vec<u8>, Failure> {
    let mut kept = Vec::new();
    let mut seen: u64 = 0;
    while let Some(chunk) = next_chunk(&mut body).await {
        let chunk = chunk.map_err(|e| {
            // The client went away or sent a broken chunked body: nobody
            // will read this answer.
            Failure::Refused(Refusal {
                status: 400,
                reason: format!("reading the body: {e}"),
            })
        })?;
        seen += chunk.len() as u64;
        if seen > DRAIN_LIMIT {
            break;
        }
        if seen <= ingest::MAX_BODY as u64 {
            kept.extend_from_slice(&chunk);
        }
    }
    ingest::check_length(seen).map_err(Failure::Refused)?;
    Ok(kept)
}

/// Reads a body to its end (at most [`DRAIN_LIMIT`] bytes), keeping nothing.
async fn drain(mut body: Body) {
    let mut seen: u64 = 0;
    while let Some(Ok(chunk)) = next_chunk(&mut body).await {
        seen += chunk.len() as u64;
        if seen > DRAIN_LIMIT {
            return;
        }
    }
}

/// One request's samples, checked and ready to join a group.
struct Validated {
    /// Samples in the body.
    samples: usize,
    /// The rows to write: the samples within the retention, each pair once.
    rows: Columns,
    /// Samples older than the JSONB copy's retention: not stored (a resend
    /// of one could no longer be recognised), answered as `expired`.
    expired: u64,
    /// Pairs seen earlier in this body with another payload.
    conflicts: Vec<Conflict>,
}

/// Checks a body against the columns' types and the partitions' time
/// range: the whole request is refused (400, 413 or 422) for one bad
/// sample, before anything is written; a signed request may carry only its
/// signer's samples (403). `now_ms` is the route's clock.
fn validate(
    body: &[u8],
    settings: &Settings,
    signer: Option<&str>,
    now_ms: i64,
) -> Result<Validated, Failure> {
    let (retention, jsonb_copy) = (&settings.retention, settings.jsonb_copy);
    // Each sample's text goes to the JSONB column as sent, so fields a newer
    // agent adds are kept though this build cannot read them.
    let samples = ingest::parse_text(body).map_err(Failure::Refused)?;
    // A signed request speaks for its signer's VM only (403 otherwise).
    if let Some(vm_id) = signer {
        ingest::check_vm(samples.iter().map(|p| &p.sample), vm_id).map_err(Failure::Refused)?;
    }
    let oldest = now_ms.saturating_sub(millis(retention.samples));
    let latest = now_ms.saturating_add(i64::from(retention.days_ahead) * 86_400_000);
    let mut c = Columns::default();
    let mut expired = 0;
    let mut conflicts = Vec::new();
    // Index of each pair's first occurrence in the columns.
    let mut first: HashMap<(&str, u64), usize> = HashMap::new();
    for (i, Parsed { sample: s, text }) in samples.iter().enumerate() {
        let Some(raw) = s.vm_id.as_deref() else {
            return Err(unprocessable(format!(
                "sample {i}: no vm_id; every row of metrics.vm_metrics needs the VM's UUID"
            )));
        };
        let vm_id = uuid::Uuid::try_parse(raw)
            .map_err(|e| unprocessable(format!("sample {i}: vm_id {raw:?} is not a UUID: {e}")))?;
        let timestamp_ms = bigint(i, "timestamp_ms", s.timestamp_ms)?;
        if timestamp_ms >= latest {
            return Err(unprocessable(format!(
                "sample {i}: timestamp_ms {timestamp_ms} is more than {} days ahead of the \
                 manager's clock ({now_ms}); the guest's clock is wrong",
                retention.days_ahead
            )));
        }
        if timestamp_ms < oldest {
            expired += 1;
            continue;
        }
        if let Some(&at) = first.get(&(s.run_id.as_str(), s.seq)) {
            let same = match (c.fingerprint[at], &c.sample[at]) {
                (Some(f), _) => f == fingerprint(text),
                (None, Some(first)) => same_json(first, text),
                (None, None) => true,
            };
            if !same {
                conflicts.push(Conflict {
                    run_id: s.run_id.clone(),
                    seq: s.seq,
                    vm_id: s.vm_id.clone(),
                });
            }
            continue;
        }
        first.insert((s.run_id.as_str(), s.seq), c.seq.len());
        c.seq.push(bigint(i, "seq", s.seq)?);
        c.timestamp_ms.push(timestamp_ms);
        c.memory_used_kb.push(
            s.memory_used_kb
                .map(|v| bigint(i, "memory_used_kb", v))
                .transpose()?,
        );
        c.memory_total_kb.push(
            s.memory_total_kb
                .map(|v| bigint(i, "memory_total_kb", v))
                .transpose()?,
        );
        c.run_id.push(s.run_id.clone());
        c.vm_id.push(vm_id.hyphenated().to_string());
        c.cpu_usage_percent.push(s.cpu_usage_percent);
        c.memory_usage_percent.push(s.memory_usage_percent);
        c.load_average.push(s.load_average);
        c.fingerprint.push((!jsonb_copy).then(|| fingerprint(text)));
        c.sample.push(jsonb_copy.then(|| text.to_string()));
    }
    Ok(Validated {
        samples: samples.len(),
        rows: c,
        expired,
        conflicts,
    })
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A u64 as PostgreSQL's BIGINT, which is signed.
fn bigint(i: usize, field: &str, v: u64) -> Result<i64, Failure> {
    i64::try_from(v)
        .map_err(|_| unprocessable(format!("sample {i}: {field} {v} is over BIGINT's range")))
}

/// A reply of the kit as an axum response.
fn respond(reply: Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, Reply::CONTENT_TYPE)],
        reply.body,
    )
        .into_response()
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// The command line of `main`.
#[derive(Debug)]
pub struct Args {
    /// Where to listen (`--listen`).
    pub listen: SocketAddr,
    /// The database (`--database-url`, else `DATABASE_URL`).
    pub database_url: String,
    /// The pool's size (`--max-connections`).
    pub max_connections: u32,
    /// The route's settings (`--retry-after`, `--group-*`, `--*-retention`,
    /// `--days-ahead`).
    pub settings: Settings,
    /// Master keys (`--key-file`): pushes must be signed.
    pub key_file: Option<std::path::PathBuf>,
}

const USAGE: &str = "usage: postgres_ingest [--listen ADDR] [--database-url URL] \
[--max-connections N] [--retry-after SECS] [--group-samples N] [--group-wait DURATION] \
[--samples-retention DURATION] [--metrics-retention DURATION] [--days-ahead N] \
[--jsonb-copy on|off] [--key-file FILE]

  --listen ADDR                  address to serve POST /v1/guest-metrics on (127.0.0.1:18080)
  --database-url URL             postgres://USER[:PASSWORD]@HOST[:PORT]/DB (default: $DATABASE_URL)
  --max-connections N            database connections in the pool (8); one is kept for the
                                 partitions' upkeep, each other one writes groups
  --retry-after SECS             Retry-After of a 503 when the database fails (5)
  --group-samples N              a group is written once it holds N samples (2000)...
  --group-wait DURATION          ...or this long after its first request came (5ms)
  --samples-retention DURATION   how long the JSONB copy is kept, and how old a sample may be
                                 and still be stored (2days)
  --metrics-retention DURATION   how long vm_metrics rows are kept (7days)
  --days-ahead N                 days of partitions created ahead; a sample stamped later is
                                 refused (2)
  --jsonb-copy on|off            keep each sample whole as JSONB (on); off keeps its key and
                                 fingerprint only: about a quarter of the bytes per sample
  --key-file FILE                master keys (lines KID HEX): require signed pushes, store only
                                 the signer's VM";

impl Args {
    /// Parses `args` (without the program name); `Err` carries the message
    /// to print, the usage for `--help`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut listen = "127.0.0.1:18080".to_string();
        let mut database_url = std::env::var("DATABASE_URL").ok();
        let mut max_connections = "8".to_string();
        let mut retry_after = "5".to_string();
        let mut key_file: Option<String> = None;
        let mut group_samples = "2000".to_string();
        let mut group_wait = "5ms".to_string();
        let mut samples_retention = "2days".to_string();
        let mut metrics_retention = "7days".to_string();
        let mut days_ahead = "2".to_string();
        let mut jsonb_copy = "on".to_string();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (arg.clone(), None),
            };
            if name == "--help" || name == "-h" {
                return Err(USAGE.to_string());
            }
            let slot = match name.as_str() {
                "--listen" => &mut listen,
                "--max-connections" => &mut max_connections,
                "--retry-after" => &mut retry_after,
                "--group-samples" => &mut group_samples,
                "--group-wait" => &mut group_wait,
                "--samples-retention" => &mut samples_retention,
                "--metrics-retention" => &mut metrics_retention,
                "--days-ahead" => &mut days_ahead,
                "--jsonb-copy" => &mut jsonb_copy,
                "--database-url" => database_url.insert(String::new()),
                "--key-file" => key_file.insert(String::new()),
                _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
            };
            *slot = match inline.or_else(|| args.next()) {
                Some(v) => v,
                None => return Err(format!("{name} needs a value\n{USAGE}")),
            };
        }
        let duration = |name: &str, v: &str| {
            humantime::parse_duration(v).map_err(|e| format!("{name} {v:?}: {e}"))
        };
        let max_connections: u32 = max_connections
            .parse()
            .map_err(|e| format!("--max-connections {max_connections:?}: {e}"))?;
        let retention = Retention {
            samples: duration("--samples-retention", &samples_retention)?,
            metrics: duration("--metrics-retention", &metrics_retention)?,
            days_ahead: days_ahead
                .parse()
                .map_err(|e| format!("--days-ahead {days_ahead:?}: {e}"))?,
            ..Retention::default()
        };
        retention.check()?;
        Ok(Args {
            listen: listen
                .parse()
                .map_err(|e| format!("--listen {listen:?}: {e}"))?,
            database_url: database_url
                .ok_or_else(|| format!("no --database-url and no DATABASE_URL\n{USAGE}"))?,
            max_connections,
            settings: Settings {
                retry_after_secs: retry_after
                    .parse()
                    .map_err(|e| format!("--retry-after {retry_after:?}: {e}"))?,
                grouping: Grouping {
                    max_samples: group_samples
                        .parse::<usize>()
                        .map_err(|e| format!("--group-samples {group_samples:?}: {e}"))?
                        .max(1),
                    max_wait: duration("--group-wait", &group_wait)?,
                    writers: max_connections.saturating_sub(1).max(1) as usize,
                },
                retention,
                jsonb_copy: match jsonb_copy.as_str() {
                    "on" => true,
                    "off" => false,
                    v => return Err(format!("--jsonb-copy {v:?}: on or off")),
                },
            },
            key_file: key_file.map(std::path::PathBuf::from),
        })
    }
}

/// How long `main` keeps trying to migrate a database that is not up yet
/// (started together with it, say).
const MIGRATE_PATIENCE: Duration = Duration::from_secs(30);

/// Migrates, then serves until the process is stopped.
pub async fn serve(args: Args) -> Result<(), String> {
    let started = Instant::now();
    loop {
        match migrate(&args.database_url).await {
            Ok(()) => break,
            Err(e) if started.elapsed() < MIGRATE_PATIENCE => {
                eprintln!("postgres_ingest: {e}; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
    let mut state = AppState::start(
        pool(&args.database_url, args.max_connections)?,
        args.settings,
    )
    .await?;
    if let Some(path) = &args.key_file {
        state = state.with_keys(Verifier::load(path)?);
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("the listener's address: {e}"))?;
    println!("listening on {addr}");
    axum::serve(listener, router(state))
        .await
        .map_err(|e| format!("serving on {addr}: {e}"))
}

/// `main` for any argument list: the exit status.
pub fn run(args: impl IntoIterator<Item = String>) -> ExitCode {
    let args = match Args::parse(args) {
        Ok(a) => a,
        Err(message) => {
            eprintln!("{message}");
            return if message == USAGE {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("postgres_ingest: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postgres_ingest: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    run(std::env::args().skip(1))
}
