//! Group commit (docs/manager.md, "Group commit"): requests validated
//! apart are gathered, up to a number of samples or a few milliseconds,
//! and written by one statement per table in one transaction. Each request
//! is answered once the transaction holding its samples has committed; a
//! failed transaction fails every request in it (503: the agents retry),
//! and a request the database refuses as data is written again alone, so
//! that its neighbours are stored and only it is refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use guest_agent::ingest::{Conflict, Refusal};
use sqlx::Row;
use sqlx::postgres::PgPool;
use tokio::sync::{Mutex, Notify, mpsc, oneshot};

/// Why a batch was not stored: the agent drops a refused one and retries
/// a failed store.
pub enum Failure {
    Refused(Refusal),
    Store(String),
}

pub fn unprocessable(reason: String) -> Failure {
    Failure::Refused(Refusal {
        status: 422,
        reason,
    })
}

/// Samples as one array per column, for a single `UNNEST` insert: one
/// round trip whatever their number. Pairs repeated within a request are
/// kept once (the first), since one statement cannot both insert a pair
/// and see it conflict.
#[derive(Default)]
pub struct Columns {
    pub run_id: Vec<String>,
    pub seq: Vec<i64>,
    pub vm_id: Vec<String>,
    pub timestamp_ms: Vec<i64>,
    pub cpu_usage_percent: Vec<Option<f64>>,
    pub memory_usage_percent: Vec<Option<f64>>,
    pub memory_used_kb: Vec<Option<i64>>,
    pub memory_total_kb: Vec<Option<i64>>,
    pub load_average: Vec<Option<f64>>,
    /// The sample's text as sent, or `None` where no JSONB copy is kept.
    pub sample: Vec<Option<String>>,
    /// The sample's [`fingerprint`], where no JSONB copy is kept (with
    /// one, the JSONB is compared: no fingerprint is made per sample).
    pub fingerprint: Vec<Option<i64>>,
}

impl Columns {
    pub fn len(&self) -> usize {
        self.seq.len()
    }

    /// Row `i` of `other` appended.
    fn push_row(&mut self, other: &Columns, i: usize) {
        self.run_id.push(other.run_id[i].clone());
        self.seq.push(other.seq[i]);
        self.vm_id.push(other.vm_id[i].clone());
        self.timestamp_ms.push(other.timestamp_ms[i]);
        self.cpu_usage_percent.push(other.cpu_usage_percent[i]);
        self.memory_usage_percent
            .push(other.memory_usage_percent[i]);
        self.memory_used_kb.push(other.memory_used_kb[i]);
        self.memory_total_kb.push(other.memory_total_kb[i]);
        self.load_average.push(other.load_average[i]);
        self.sample.push(other.sample[i].clone());
        self.fingerprint.push(other.fingerprint[i]);
    }
}

/// Whether rows `i` of `a` and `j` of `b` carry the same payload.
pub fn same_payload(a: &Columns, i: usize, b: &Columns, j: usize) -> bool {
    match (
        a.fingerprint[i],
        b.fingerprint[j],
        &a.sample[i],
        &b.sample[j],
    ) {
        (Some(x), Some(y), _, _) => x == y,
        (_, _, Some(x), Some(y)) => same_json(x, y),
        _ => true,
    }
}

/// Whether two samples' texts are the same JSON, as JSONB compares them
/// (white space and key order aside). Only pairs repeated within one
/// group come here.
pub fn same_json(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// A sample's JSON as 64 bits that differ when the payload does: the
/// text parsed and written again (keys sorted, no white space), hashed
/// with a fixed-key SipHash so that every route process agrees.
pub fn fingerprint(text: &str) -> i64 {
    use std::hash::Hasher;
    let canonical = serde_json::from_str::<serde_json::Value>(text)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| text.to_string());
    #[allow(deprecated)] // SipHasher: the one std hasher with a fixed key
    let mut h = std::hash::SipHasher::new_with_keys(0x6775_6573_742d_6167, 0x656e_742d_6670_7631);
    h.write(canonical.as_bytes());
    h.finish() as i64
}

/// What the transaction wrote of one request's samples.
pub struct Stored {
    pub accepted: u64,
    pub conflicts: Vec<Conflict>,
}

/// The group in one statement. Each incoming pair is first looked up in
/// every partition of the companion table (`prior`): a pair stored before
/// under any time is not inserted again, and is a conflict if its payload
/// differs. The others are inserted with `ON CONFLICT DO NOTHING` (a
/// concurrent transaction holding the same resend), and only those that
/// came back go on to `vm_metrics`. `ord` maps each row back to its place
/// in the group. The look-up is a scalar subquery, run per incoming
/// sample through the key's (run_id, seq) prefix: as a join, a plan made
/// while the table was small (a prepared statement's generic plan) scans
/// the whole table on every group.
const STORE: &str = r"
WITH incoming AS (
    SELECT t.*, timestamptz 'epoch' + t.timestamp_ms * interval '1 millisecond' AS recorded_at
    FROM UNNEST($1::int4[], $2::text[], $3::bigint[], $4::uuid[], $5::bigint[], $6::float8[],
                $7::float8[], $8::bigint[], $9::bigint[], $10::float8[], $11::jsonb[],
                $12::bigint[])
        AS t(ord, run_id, seq, vm_id, timestamp_ms, cpu_usage_percent, memory_usage_percent,
             memory_used_kb, memory_total_kb, load_average, sample, fingerprint)
), prior AS (
    SELECT i.ord, (SELECT row(g.fingerprint, g.sample)::metrics.stored_sample
                   FROM metrics.guest_samples g
                   WHERE g.run_id = i.run_id AND g.seq = i.seq LIMIT 1) AS stored
    FROM incoming i
), fresh AS (
    INSERT INTO metrics.guest_samples (run_id, seq, vm_id, recorded_at, sample, fingerprint)
    SELECT i.run_id, i.seq, i.vm_id, i.recorded_at, i.sample, i.fingerprint
    FROM incoming i JOIN prior p USING (ord)
    WHERE p.stored IS NULL
    ON CONFLICT (run_id, seq, recorded_at) DO NOTHING
    RETURNING run_id, seq, recorded_at
), inserted AS (
    SELECT i.* FROM incoming i JOIN fresh f USING (run_id, seq, recorded_at)
), rows AS (
    INSERT INTO metrics.vm_metrics (vm_id, recorded_at, cpu_usage_percent,
        memory_usage_percent, memory_used_kb, memory_total_kb, load_average)
    SELECT vm_id, recorded_at, cpu_usage_percent, memory_usage_percent,
        memory_used_kb, memory_total_kb, load_average
    FROM inserted
    RETURNING 1
)
SELECT (SELECT count(*) FROM rows) AS metric_rows,
       ARRAY(SELECT ord FROM inserted) AS inserted,
       ARRAY(SELECT p.ord FROM prior p JOIN incoming i USING (ord)
             WHERE NOT (p.stored IS NULL)
               AND CASE WHEN (p.stored).fingerprint IS NOT NULL AND i.fingerprint IS NOT NULL
                        THEN (p.stored).fingerprint <> i.fingerprint
                        WHEN (p.stored).sample IS NOT NULL AND i.sample IS NOT NULL
                        THEN (p.stored).sample <> i.sample
                        ELSE false END) AS differing
";

/// A database error as the agent should see it. Data exceptions (class
/// 22: a value out of a type's range) and integrity violations (class 23:
/// a constraint the manager added, such as a foreign key to its VM table)
/// would fail again on every retry, so the batch is refused; anything else
/// (the server down or restarting, a lost connection, a full disk, no
/// partition yet for a sample's day) is worth retrying.
pub fn database(doing: &str, e: sqlx::Error) -> Failure {
    if let Some(db) = e.as_database_error()
        && let Some(code) = db.code()
        && (code.starts_with("22") || code.starts_with("23"))
        && !is_missing_partition(&e)
    {
        return unprocessable(format!(
            "the database refused the batch ({doing}): {} (SQLSTATE {code})",
            db.message()
        ));
    }
    Failure::Store(format!("{doing}: {e}"))
}

/// A row whose day has no partition (SQLSTATE 23514, "no partition of
/// relation"): the partitions were not maintained in time, not the
/// sample's fault.
fn is_missing_partition(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|db| {
        db.code().as_deref() == Some("23514")
            && db.message().starts_with("no partition of relation")
    })
}

/// Writes `rows` in one transaction: for each row, whether it was inserted
/// and whether it conflicts with a stored pair.
async fn store(pool: &PgPool, rows: &Columns) -> Result<(Vec<bool>, Vec<bool>), sqlx::Error> {
    let ord: Vec<i32> = (0..rows.len())
        .map(|i| i32::try_from(i).unwrap_or(i32::MAX))
        .collect();
    let mut tx = pool.begin().await?;
    let row = sqlx::query(STORE)
        .bind(&ord)
        .bind(&rows.run_id)
        .bind(&rows.seq)
        .bind(&rows.vm_id)
        .bind(&rows.timestamp_ms)
        .bind(&rows.cpu_usage_percent)
        .bind(&rows.memory_usage_percent)
        .bind(&rows.memory_used_kb)
        .bind(&rows.memory_total_kb)
        .bind(&rows.load_average)
        .bind(&rows.sample)
        .bind(&rows.fingerprint)
        .fetch_one(&mut *tx)
        .await?;
    let inserted: Vec<i32> = row.try_get("inserted")?;
    let differing: Vec<i32> = row.try_get("differing")?;
    tx.commit().await?;
    let flags = |ords: Vec<i32>| {
        let mut f = vec![false; rows.len()];
        for o in ords {
            if let Some(slot) = usize::try_from(o).ok().and_then(|o| f.get_mut(o)) {
                *slot = true;
            }
        }
        f
    };
    Ok((flags(inserted), flags(differing)))
}

/// One request waiting in a group.
struct Job {
    rows: Columns,
    answer: oneshot::Sender<Result<Stored, Failure>>,
}

/// How requests are gathered.
#[derive(Debug, Clone, Copy)]
pub struct Grouping {
    /// A group is written once it holds this many samples...
    pub max_samples: usize,
    /// ...or this long after its first request came, whichever is first.
    pub max_wait: Duration,
    /// Groups written at once, each in a transaction on a connection of
    /// its own: while some commit, the next group gathers.
    pub writers: usize,
}

impl Default for Grouping {
    fn default() -> Grouping {
        Grouping {
            max_samples: 2000,
            max_wait: Duration::from_millis(5),
            writers: 4,
        }
    }
}

/// The requests' way into a group: cheap to clone.
#[derive(Clone)]
pub struct Groups {
    jobs: mpsc::Sender<Job>,
}

impl Groups {
    /// Starts `g.writers` writer tasks on the current runtime, writing
    /// through `pool`. `missing_partition` is notified when a write found
    /// no partition for a sample's day.
    pub fn start(pool: PgPool, g: Grouping, missing_partition: Arc<Notify>) -> Groups {
        let (jobs, queue) = mpsc::channel(16_384);
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..g.writers.max(1) {
            tokio::spawn(writer(
                pool.clone(),
                g,
                queue.clone(),
                missing_partition.clone(),
            ));
        }
        Groups { jobs }
    }

    /// Stores one request's validated rows with the next group: returns
    /// once that group's transaction has committed or failed.
    pub async fn store(&self, rows: Columns) -> Result<Stored, Failure> {
        if rows.len() == 0 {
            return Ok(Stored {
                accepted: 0,
                conflicts: Vec::new(),
            });
        }
        let (answer, answered) = oneshot::channel();
        self.jobs
            .send(Job { rows, answer })
            .await
            .map_err(|_| Failure::Store("the route's writers have stopped".into()))?;
        answered
            .await
            .map_err(|_| Failure::Store("the route's writer stopped mid-group".into()))?
    }
}

/// Gathers a group (the queue is held meanwhile, so one writer gathers at
/// a time), writes it, answers its requests; until the route stops.
async fn writer(
    pool: PgPool,
    g: Grouping,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
    missing_partition: Arc<Notify>,
) {
    loop {
        let group = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut size = first.rows.len();
            let mut group = vec![first];
            let deadline = tokio::time::Instant::now() + g.max_wait;
            while size < g.max_samples {
                match tokio::time::timeout_at(deadline, queue.recv()).await {
                    Ok(Some(job)) => {
                        size += job.rows.len();
                        group.push(job);
                    }
                    _ => break,
                }
            }
            group
        };
        write_group(&pool, group, &missing_partition).await;
    }
}

/// Writes a group and answers each of its requests.
async fn write_group(pool: &PgPool, group: Vec<Job>, missing_partition: &Notify) {
    let (merged, place) = merge(&group);
    match store(pool, &merged).await {
        Ok((inserted, differing)) => {
            let mut results: Vec<Stored> = group
                .iter()
                .map(|_| Stored {
                    accepted: 0,
                    conflicts: Vec::new(),
                })
                .collect();
            for (row, &(job, i)) in place.iter().enumerate() {
                let rows = &group[job].rows;
                if inserted[row] {
                    results[job].accepted += 1;
                }
                if differing[row] {
                    results[job].conflicts.push(conflict(rows, i));
                }
            }
            // A pair a request shares with an earlier request of the same
            // group: written once, with the first; a conflict if the
            // payloads differ, else a duplicate.
            for (job, i, first) in repeats(&group, &merged) {
                if !same_payload(&merged, first, &group[job].rows, i) {
                    results[job].conflicts.push(conflict(&group[job].rows, i));
                }
            }
            for (job, result) in group.into_iter().zip(results) {
                let _ = job.answer.send(Ok(result));
            }
        }
        Err(e) => {
            if is_missing_partition(&e) {
                missing_partition.notify_one();
            }
            match database("storing the batch", e) {
                // Some request holds a value the database refuses: each is
                // written alone, so that only that one is refused.
                Failure::Refused(_) if group.len() > 1 => {
                    for job in group {
                        let alone = vec![job];
                        Box::pin(write_group(pool, alone, missing_partition)).await;
                    }
                }
                failure => {
                    let why = match &failure {
                        Failure::Store(why) => why.clone(),
                        Failure::Refused(r) => r.reason.clone(),
                    };
                    let mut failure = Some(failure);
                    for job in group {
                        let f = match failure.take() {
                            Some(f) => f,
                            None => Failure::Store(why.clone()),
                        };
                        let _ = job.answer.send(Err(f));
                    }
                }
            }
        }
    }
}

fn conflict(rows: &Columns, i: usize) -> Conflict {
    Conflict {
        run_id: rows.run_id[i].clone(),
        seq: rows.seq[i].unsigned_abs(),
        vm_id: Some(rows.vm_id[i].clone()),
    }
}

/// The group's rows, each pair once (its first occurrence), and for each
/// merged row the request and row it came from.
fn merge(group: &[Job]) -> (Columns, Vec<(usize, usize)>) {
    let mut merged = Columns::default();
    let mut place = Vec::new();
    let mut seen: HashMap<(&str, i64), usize> = HashMap::new();
    for (job, j) in group.iter().enumerate() {
        for i in 0..j.rows.len() {
            let key = (j.rows.run_id[i].as_str(), j.rows.seq[i]);
            if seen.contains_key(&key) {
                continue;
            }
            seen.insert(key, merged.len());
            merged.push_row(&j.rows, i);
            place.push((job, i));
        }
    }
    (merged, place)
}

/// The rows left out of [`merge`] as repeats: (request, row, merged row of
/// the pair's first occurrence).
fn repeats(group: &[Job], merged: &Columns) -> Vec<(usize, usize, usize)> {
    let first: HashMap<(&str, i64), usize> = (0..merged.len())
        .map(|m| ((merged.run_id[m].as_str(), merged.seq[m]), m))
        .collect();
    let mut taken: Vec<bool> = vec![false; merged.len()];
    let mut out = Vec::new();
    for (job, j) in group.iter().enumerate() {
        for i in 0..j.rows.len() {
            let Some(&m) = first.get(&(j.rows.run_id[i].as_str(), j.rows.seq[i])) else {
                continue;
            };
            if taken[m] {
                out.push((job, i, m));
            } else {
                taken[m] = true;
            }
        }
    }
    out
}
