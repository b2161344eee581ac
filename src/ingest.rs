//! The receiving end of the agent's pushes, for a manager to embed: no HTTP
//! framework, no I/O, only what every receiver has to get right
//! (docs/manager.md, "Adding the push route to your manager").
//!
//! A POST body is a JSON array of samples of schema 1
//! (docs/design.md#the-sample). [`Ingest::prepare`] parses and validates it
//! and sorts its samples into new ones, duplicates and conflicts against the
//! pairs (`run_id`, `seq`) seen before; the manager stores the new ones, then
//! calls [`Ingest::commit`] (a failed store leaves them new, so the agent's
//! retry stores them). Every outcome maps to the status the agent's delivery
//! contract expects (docs/design.md#delivery): 2xx delivered; 400, 413 and
//! 422 refused for its payload (the agent drops that batch, and never
//! retries it); anything else, [`STORE_FAILED`] included, retried.
//!
//! Fields this version does not know are ignored, never refused: an agent
//! newer than the manager adds fields within schema 1, and must not lose its
//! samples to an older manager. A nullable field an older agent did not send
//! is taken as null.
//!
//! ```
//! use guest_agent::ingest::Ingest;
//!
//! let mut ingest = Ingest::new();
//! let body = br#"[{"schema":1,"agent_version":"9.9.9","run_id":"r1","seq":1,
//!     "timestamp_ms":1700000000000,"window_ms":0,"dropped_samples":0,
//!     "cpu_usage_percent":3.5,"a_field_from_the_future":true}]"#;
//! let batch = ingest.prepare(body).expect("a valid body");
//! assert_eq!(batch.fresh().count(), 1);
//! // … store batch.fresh() in the database, then:
//! ingest.commit(&batch);
//! assert_eq!(batch.reply().status, 200);
//! // The agent's retry after a lost answer is recognised.
//! let again = ingest.prepare(body).expect("a valid body");
//! assert_eq!((again.fresh().count(), again.duplicates()), (0, 1));
//! ```

use std::collections::{HashMap, VecDeque};

use serde::Serialize;

use crate::sample::{SCHEMA, Sample, Value};

/// Largest body accepted, in bytes: the agent's largest batch (10,000
/// samples) as it sends them, compact, is under this. Larger gets 413, on
/// which the agent halves its batch.
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// Most samples in one body: the agent's largest batch. More gets 413.
pub const MAX_SAMPLES: usize = 10_000;

/// Longest text field of a sample, in bytes (`run_id`, `vm_id`,
/// `hostname`, …): the agent's ids are 36-byte UUIDs, its VM ids at most
/// 256 bytes, a Linux host name at most 64. A longer one is refused (400)
/// before anything is remembered, so no sender can make the
/// de-duplicator keep long keys.
pub const MAX_TEXT: usize = 256;

/// Pairs remembered per run (agent process) for de-duplication. The agent
/// sends oldest first and only ever resends the batch in flight (at most
/// 10,000 samples, 100 by default), so a duplicate falls within this many
/// of the newest seq; an older seq of a known run counts as
/// [`Verdict::Expired`]. Each pair costs 16 bytes.
pub const DEDUP_WINDOW: usize = 16 * 1024;

/// Runs remembered; the least recently active is forgotten first (its
/// resent samples would then count as new). The de-duplicator holds at
/// most `MAX_RUNS × (DEDUP_WINDOW × 16 + MAX_TEXT + 64)` bytes, 256.3 MiB
/// with these values, reached only when each of 1,024 runs has pushed
/// 16,384 samples (23 hours at 5 s); [`Ingest::with_limits`] sets smaller
/// ones (docs/manager.md#what-the-kit-keeps-in-memory).
pub const MAX_RUNS: usize = 1024;

/// The status to answer when the samples could not be stored: the agent
/// keeps the batch and retries.
pub const STORE_FAILED: u16 = 503;

/// The status for a sample of another VM than the one that signed the
/// request (or that the vsock socket belongs to): nothing is stored, and
/// the agent keeps the batch (docs/security.md#verification).
pub const OTHER_VM: u16 = 403;

pub use crate::sign::verify::{Rejection, Signer, Verifier};

impl Rejection {
    /// The response to send: 401 with the reason.
    pub fn reply(&self) -> Reply {
        Reply::json(
            crate::sign::verify::UNAUTHORIZED,
            &serde_json::json!({ "error": self.reason }),
        )
    }
}

/// Holds every sample to `vm_id`, the VM that signed the request (or whose
/// vsock socket it came in on): 403 naming the first sample that claims
/// another VM, or none.
pub fn check_vm<'a>(
    samples: impl IntoIterator<Item = &'a Sample>,
    vm_id: &str,
) -> Result<(), Refusal> {
    for (i, s) in samples.into_iter().enumerate() {
        if s.vm_id.as_deref() != Some(vm_id) {
            return Err(Refusal {
                status: OTHER_VM,
                reason: format!(
                    "sample {i}: vm_id {:?} is not {vm_id:?}, the VM this request speaks for",
                    s.vm_id.as_deref().unwrap_or("null")
                ),
            });
        }
    }
    Ok(())
}

/// A body refused for its payload, with the status the delivery contract
/// gives it (400, 413 or 422: the agent drops the batch), or 403 for a
/// sample of another VM ([`check_vm`]: the agent keeps the batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 400 malformed, 413 too large, 422 a schema this version does not
    /// know, 403 another VM's sample.
    pub status: u16,
    /// What is wrong, naming the sample's index where there is one.
    pub reason: String,
}

impl Refusal {
    fn malformed(reason: impl Into<String>) -> Refusal {
        Refusal {
            status: 400,
            reason: reason.into(),
        }
    }

    /// The response to send.
    pub fn reply(&self) -> Reply {
        Reply::json(self.status, &serde_json::json!({ "error": self.reason }))
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}: {}", self.status, self.reason)
    }
}

impl std::error::Error for Refusal {}

/// A response: always a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body, newline-terminated.
    pub body: String,
}

impl Reply {
    /// The content type of every body.
    pub const CONTENT_TYPE: &'static str = "application/json";

    fn json(status: u16, value: &serde_json::Value) -> Reply {
        Reply {
            status,
            body: format!("{value}\n"),
        }
    }

    /// The answer when storing failed: [`STORE_FAILED`], so the agent retries.
    pub fn store_failed(why: &str) -> Reply {
        Reply::json(STORE_FAILED, &serde_json::json!({ "error": why }))
    }
}

/// Checks a declared `Content-Length` before reading the body (413 over
/// [`MAX_BODY`]).
pub fn check_length(len: u64) -> Result<(), Refusal> {
    if len > MAX_BODY as u64 {
        return Err(Refusal {
            status: 413,
            reason: format!("body of {len} bytes is over {MAX_BODY}"),
        });
    }
    Ok(())
}

/// A pair seen again with a different payload: two agents sharing a
/// `run_id`, or a corrupted resend. The first payload is kept; this one is
/// reported, never silently dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    /// The run.
    pub run_id: String,
    /// The sequence number.
    pub seq: u64,
    /// The VM id the conflicting sample carries.
    pub vm_id: Option<String>,
}

/// What the de-duplicator says of one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not seen before: store it.
    New,
    /// Seen with the same payload: the agent resent it after a lost answer.
    Duplicate,
    /// Seen with a different payload: see [`Conflict`].
    Conflict,
    /// Older than the run's window: cannot be told apart, taken as seen.
    Expired,
}

/// A parsed sample and the fingerprint of its whole payload (unknown
/// fields included).
#[derive(Debug, Clone)]
struct Received {
    sample: Sample,
    fingerprint: u64,
}

/// Parses and validates a POST body into its samples, oldest first, with
/// no de-duplication: for a receiver whose store de-duplicates itself (a
/// unique key on `run_id` and `seq`, as a database table can have). The
/// refusal carries the status the delivery contract gives it.
pub fn parse(body: &[u8]) -> Result<Vec<Sample>, Refusal> {
    each_sample(body, checked)
}

/// A sample of a body and its text as sent: fields this version does not
/// know (a newer agent's) are in the text and not in the [`Sample`].
#[derive(Debug, Clone)]
pub struct Parsed<'a> {
    /// The sample, checked as [`parse`] checks it.
    pub sample: Sample,
    /// The sample's JSON object exactly as it is in the body.
    pub text: &'a str,
}

/// [`parse`], each sample with its text, for a store that keeps samples
/// whole (as JSONB, say) and must not lose what this version cannot read.
pub fn parse_text(body: &[u8]) -> Result<Vec<Parsed<'_>>, Refusal> {
    each_sample(body, |i, text| {
        Ok(Parsed {
            sample: checked(i, text)?,
            text,
        })
    })
}

/// Samples with their fingerprints; no state is touched.
fn parse_received(body: &[u8]) -> Result<Vec<Received>, Refusal> {
    each_sample(body, |i, raw| {
        Ok(Received {
            sample: checked(i, raw)?,
            fingerprint: fingerprint(raw.as_bytes()),
        })
    })
}

/// Reads a POST body and makes one `T` of each sample's raw text.
///
/// The body is read as a stream of array elements, each held as the raw
/// text it is in the body (no copy) until it is checked: a body that is
/// not an array of objects fails at its first wrong element, and at most
/// [`MAX_SAMPLES`] are taken. What this holds is the parsed samples, never
/// a tree of the whole body.
fn each_sample<'de, T>(
    body: &'de [u8],
    make: impl FnMut(usize, &'de str) -> Result<T, Refusal>,
) -> Result<Vec<T>, Refusal> {
    check_length(body.len() as u64)?;
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut items = Items {
        out: Vec::new(),
        refusal: None,
        make,
    };
    let read = serde::Deserializer::deserialize_seq(&mut de, &mut items).and_then(|()| de.end());
    if let Some(refusal) = items.refusal {
        return Err(refusal);
    }
    if let Err(e) = read {
        // Told apart only on this path: JSON at all (checked without
        // building anything), or JSON of the wrong shape.
        return Err(Refusal::malformed(
            match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Err(syntax) => format!("body is not JSON: {syntax}"),
                Ok(_) => format!("body is not a JSON array of samples: {e}"),
            },
        ));
    }
    if items.out.is_empty() {
        return Err(Refusal::malformed("empty batch: no samples"));
    }
    Ok(items.out)
}

/// The visitor of the body's array: each element is checked and made
/// into a `T` as it comes; the first refusal stops the read.
struct Items<T, F> {
    out: Vec<T>,
    refusal: Option<Refusal>,
    make: F,
}

impl<'de, T, F> serde::de::Visitor<'de> for &mut Items<T, F>
where
    F: FnMut(usize, &'de str) -> Result<T, Refusal>,
{
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array of samples")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        use serde::de::Error as _;
        while let Some(raw) = seq.next_element::<&'de serde_json::value::RawValue>()? {
            let i = self.out.len();
            let made = if i >= MAX_SAMPLES {
                Err(Refusal {
                    status: 413,
                    reason: format!("more than {MAX_SAMPLES} samples in one body"),
                })
            } else {
                (self.make)(i, raw.get())
            };
            match made {
                Ok(r) => self.out.push(r),
                Err(refusal) => {
                    self.refusal = Some(refusal);
                    return Err(A::Error::custom("refused"));
                }
            }
        }
        Ok(())
    }
}

/// Only the schema number of a sample, read before the rest so that a
/// sample of another schema is told apart from a malformed one.
#[derive(serde::Deserialize)]
struct SchemaOnly {
    schema: Option<u64>,
}

/// Sample `i` of a body, from its raw text: schema, shape, then the
/// length of every text field.
fn checked(i: usize, raw: &str) -> Result<Sample, Refusal> {
    if !raw.starts_with('{') {
        return Err(Refusal::malformed(format!("sample {i}: not a JSON object")));
    }
    match serde_json::from_str::<SchemaOnly>(raw)
        .ok()
        .and_then(|s| s.schema)
    {
        Some(n) if n == u64::from(SCHEMA) => {}
        Some(n) => {
            return Err(Refusal {
                status: 422,
                reason: format!("sample {i}: schema {n}; this manager understands schema {SCHEMA}"),
            });
        }
        None => {
            return Err(Refusal::malformed(format!(
                "sample {i}: no numeric \"schema\" field"
            )));
        }
    }
    let sample: Sample =
        serde_json::from_str(raw).map_err(|e| Refusal::malformed(format!("sample {i}: {e}")))?;
    let mut too_long = None;
    sample.visit(|name, value| {
        if let Value::Text(t) = value
            && t.len() > MAX_TEXT
            && too_long.is_none()
        {
            too_long = Some(name);
        }
    });
    if let Some(name) = too_long {
        return Err(Refusal::malformed(format!(
            "sample {i}: {name} is longer than {MAX_TEXT} bytes"
        )));
    }
    Ok(sample)
}

/// The fingerprint of a sample's payload as sent, unknown fields included:
/// its text without the white space between tokens, so that the same
/// sample sent again, however indented, is a duplicate and not a conflict.
fn fingerprint(raw: &[u8]) -> u64 {
    let (mut in_string, mut escaped) = (false, false);
    let mut h = FNV_OFFSET;
    for &b in raw {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            continue;
        }
        h = fnv1a_step(h, b);
    }
    h
}

/// FNV-1a, 64 bits: stable across processes and builds, unlike std's
/// randomly keyed hasher, so fingerprints could be stored.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a_step(h: u64, b: u8) -> u64 {
    (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
}

/// One run's remembered pairs, `(seq, fingerprint)` sorted by seq.
#[derive(Debug, Default)]
struct Run {
    pairs: VecDeque<(u64, u64)>,
    last_active: u64,
}

/// Which (`run_id`, `seq`) pairs were seen and with what payload, in bounded
/// memory: per run at most a window of the newest pairs, at most a number
/// of runs, the least recently active forgotten first. Memory grows with
/// what was seen, up to the limits.
#[derive(Debug)]
pub struct Dedup {
    runs: HashMap<String, Run>,
    clock: u64,
    window: usize,
    max_runs: usize,
}

impl Default for Dedup {
    fn default() -> Dedup {
        Dedup::with_limits(DEDUP_WINDOW, MAX_RUNS)
    }
}

impl Dedup {
    /// A de-duplicator remembering `window` pairs per run (at least 1) and
    /// `max_runs` runs (at least 1).
    pub fn with_limits(window: usize, max_runs: usize) -> Dedup {
        Dedup {
            runs: HashMap::new(),
            clock: 0,
            window: window.max(1),
            max_runs: max_runs.max(1),
        }
    }

    /// Runs remembered now.
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// What a sample with this payload fingerprint is.
    pub fn check(&self, run_id: &str, seq: u64, fingerprint: u64) -> Verdict {
        let Some(run) = self.runs.get(run_id) else {
            return Verdict::New;
        };
        match run.pairs.binary_search_by_key(&seq, |p| p.0) {
            Ok(i) if run.pairs[i].1 == fingerprint => Verdict::Duplicate,
            Ok(_) => Verdict::Conflict,
            Err(0) if run.pairs.len() >= self.window => Verdict::Expired,
            Err(_) => Verdict::New,
        }
    }

    /// Remembers a stored sample.
    pub fn record(&mut self, run_id: &str, seq: u64, fingerprint: u64) {
        self.clock += 1;
        if !self.runs.contains_key(run_id)
            && self.runs.len() >= self.max_runs
            && let Some(oldest) = self
                .runs
                .iter()
                .min_by_key(|(_, r)| r.last_active)
                .map(|(k, _)| k.clone())
        {
            self.runs.remove(&oldest);
        }
        let run = self.runs.entry(run_id.to_string()).or_default();
        run.last_active = self.clock;
        if let Err(mut i) = run.pairs.binary_search_by_key(&seq, |p| p.0) {
            // Full: the oldest goes before the new one comes, so the queue
            // never grows past the window (nor its allocation past it).
            if run.pairs.len() >= self.window {
                if i == 0 {
                    return; // older than everything kept
                }
                run.pairs.pop_front();
                i -= 1;
            }
            run.pairs.insert(i, (seq, fingerprint));
        }
    }
}

/// A validated body, its samples sorted against what was seen before.
#[derive(Debug, Clone)]
pub struct Batch {
    fresh: Vec<Received>,
    duplicates: usize,
    expired: usize,
    conflicts: Vec<Conflict>,
}

impl Batch {
    /// The samples to store, in the order they came.
    pub fn fresh(&self) -> impl Iterator<Item = &Sample> {
        self.fresh.iter().map(|r| &r.sample)
    }

    /// Samples already stored with the same payload.
    pub fn duplicates(&self) -> usize {
        self.duplicates
    }

    /// Samples older than their run's window, taken as seen.
    pub fn expired(&self) -> usize {
        self.expired
    }

    /// Samples whose pair was seen with a different payload; not stored.
    pub fn conflicts(&self) -> &[Conflict] {
        &self.conflicts
    }

    /// The response once the fresh samples are stored: 200 with the counts.
    /// Conflicts are listed but still answered 2xx: no retry could resolve
    /// them, and a refusal would make the agent drop the fresh samples too.
    pub fn reply(&self) -> Reply {
        Reply::json(
            200,
            &serde_json::json!({
                "accepted": self.fresh.len(),
                "duplicates": self.duplicates,
                "expired": self.expired,
                "conflicts": self.conflicts,
            }),
        )
    }
}

/// The embeddable receiver: validation and de-duplication.
#[derive(Debug, Default)]
pub struct Ingest {
    dedup: Dedup,
}

impl Ingest {
    /// A receiver with the default limits ([`DEDUP_WINDOW`], [`MAX_RUNS`]).
    pub fn new() -> Ingest {
        Ingest::default()
    }

    /// A receiver with its own de-duplication limits.
    pub fn with_limits(window: usize, max_runs: usize) -> Ingest {
        Ingest {
            dedup: Dedup::with_limits(window, max_runs),
        }
    }

    /// The de-duplicator, for its figures.
    pub fn dedup(&self) -> &Dedup {
        &self.dedup
    }

    /// [`Ingest::prepare`] for a request that speaks for one VM (its
    /// signer's, or its vsock socket's): a body with any sample of another
    /// VM is refused whole with 403 ([`check_vm`]), duplicates included.
    pub fn prepare_for_vm(&self, body: &[u8], vm_id: &str) -> Result<Batch, Refusal> {
        self.prepare_checked(body, Some(vm_id))
    }

    /// Parses, validates and sorts a POST body; nothing is remembered until
    /// [`Ingest::commit`].
    pub fn prepare(&self, body: &[u8]) -> Result<Batch, Refusal> {
        self.prepare_checked(body, None)
    }

    fn prepare_checked(&self, body: &[u8], vm_id: Option<&str>) -> Result<Batch, Refusal> {
        let mut batch = Batch {
            fresh: Vec::new(),
            duplicates: 0,
            expired: 0,
            conflicts: Vec::new(),
        };
        // Pairs earlier in this same body count as seen.
        let mut in_body: HashMap<(String, u64), u64> = HashMap::new();
        let received = parse_received(body)?;
        if let Some(vm_id) = vm_id {
            check_vm(received.iter().map(|r| &r.sample), vm_id)?;
        }
        for r in received {
            let (run_id, seq) = (&r.sample.run_id, r.sample.seq);
            let verdict = match in_body.get(&(run_id.clone(), seq)) {
                Some(&fp) if fp == r.fingerprint => Verdict::Duplicate,
                Some(_) => Verdict::Conflict,
                None => self.dedup.check(run_id, seq, r.fingerprint),
            };
            match verdict {
                Verdict::New => {
                    in_body.insert((run_id.clone(), seq), r.fingerprint);
                    batch.fresh.push(r);
                }
                Verdict::Duplicate => batch.duplicates += 1,
                Verdict::Expired => batch.expired += 1,
                Verdict::Conflict => batch.conflicts.push(Conflict {
                    run_id: run_id.clone(),
                    seq,
                    vm_id: r.sample.vm_id.clone(),
                }),
            }
        }
        Ok(batch)
    }

    /// Remembers a batch's fresh samples as stored.
    pub fn commit(&mut self, batch: &Batch) {
        for r in &batch.fresh {
            self.dedup
                .record(&r.sample.run_id, r.sample.seq, r.fingerprint);
        }
    }

    /// [`Ingest::prepare`] and [`Ingest::commit`] at once, for a receiver
    /// whose storing cannot fail (an in-memory view).
    pub fn receive(&mut self, body: &[u8]) -> Result<Batch, Refusal> {
        let batch = self.prepare(body)?;
        self.commit(&batch);
        Ok(batch)
    }
}

/// The response for a body's outcome when nothing else can go wrong.
pub fn reply(outcome: &Result<Batch, Refusal>) -> Reply {
    match outcome {
        Ok(batch) => batch.reply(),
        Err(refusal) => refusal.reply(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(run: &str, seq: u64, cpu: f64) -> serde_json::Value {
        serde_json::json!({
            "schema": 1, "agent_version": "0.1.0", "vm_id": "vm-1", "hostname": "h",
            "boot_id": "b", "run_id": run, "seq": seq, "timestamp_ms": 1_700_000_000_000u64 + seq,
            "window_ms": 5000, "guest_ip": null, "cpu_count": 2, "cpu_usage_percent": cpu,
            "cpu_iowait_percent": 0.0, "cpu_steal_percent": 0.0, "procs_running": 1,
            "procs_blocked": 0, "process_count": 50, "load_average": 0.1,
            "load_average_5": 0.1, "load_average_15": 0.1, "memory_total_kb": 1000,
            "memory_available_kb": 500, "memory_used_kb": 500, "memory_usage_percent": 50.0,
            "swap_total_kb": 0, "swap_used_kb": 0, "uptime_seconds": 10,
            "network_rx_bytes": 0, "network_tx_bytes": 0, "disk_read_bytes": 0,
            "disk_write_bytes": 0, "filesystem_total_kb": null, "filesystem_used_kb": null,
            "pressure_cpu_some_avg10": null, "pressure_memory_some_avg10": null,
            "pressure_io_some_avg10": null, "dropped_samples": 0
        })
    }

    fn body(items: &[serde_json::Value]) -> Vec<u8> {
        serde_json::to_vec(items).unwrap()
    }

    #[test]
    fn new_then_duplicate_then_conflict() {
        let mut ing = Ingest::new();
        let b = ing
            .receive(&body(&[sample("r", 1, 1.0), sample("r", 2, 2.0)]))
            .unwrap();
        assert_eq!(b.fresh().map(|s| s.seq).collect::<Vec<_>>(), vec![1, 2]);
        let b = ing
            .receive(&body(&[sample("r", 2, 2.0), sample("r", 3, 3.0)]))
            .unwrap();
        assert_eq!(b.fresh().map(|s| s.seq).collect::<Vec<_>>(), vec![3]);
        assert_eq!(b.duplicates(), 1);
        let b = ing.receive(&body(&[sample("r", 1, 9.0)])).unwrap();
        assert_eq!(b.fresh().count(), 0);
        assert_eq!(
            b.conflicts(),
            &[Conflict {
                run_id: "r".into(),
                seq: 1,
                vm_id: Some("vm-1".into())
            }]
        );
        let reply: serde_json::Value = serde_json::from_str(&b.reply().body).unwrap();
        assert_eq!(b.reply().status, 200);
        assert_eq!(reply["conflicts"][0]["seq"], 1);
    }

    #[test]
    fn the_same_pair_twice_in_one_body() {
        let ing = Ingest::new();
        let b = ing
            .prepare(&body(&[
                sample("r", 1, 1.0),
                sample("r", 1, 1.0),
                sample("r", 1, 2.0),
            ]))
            .unwrap();
        assert_eq!(
            (b.fresh().count(), b.duplicates(), b.conflicts().len()),
            (1, 1, 1)
        );
    }

    #[test]
    fn nothing_is_remembered_before_commit() {
        let mut ing = Ingest::new();
        let raw = body(&[sample("r", 1, 1.0)]);
        let first = ing.prepare(&raw).unwrap();
        // The store failed: the retry is still new.
        assert_eq!(ing.prepare(&raw).unwrap().fresh().count(), 1);
        ing.commit(&first);
        assert_eq!(ing.prepare(&raw).unwrap().duplicates(), 1);
    }

    #[test]
    fn unknown_fields_are_accepted_and_missing_nullable_ones_are_null() {
        let mut newer = sample("r", 1, 1.0);
        newer["gpu_usage_percent"] = 12.5.into();
        newer["restore"] = serde_json::json!({"generation": 2});
        let b = Ingest::new().prepare(&body(&[newer])).unwrap();
        assert_eq!(b.fresh().count(), 1);

        let mut older = sample("r", 2, 1.0);
        older
            .as_object_mut()
            .unwrap()
            .remove("pressure_io_some_avg10");
        let b = Ingest::new().prepare(&body(&[older])).unwrap();
        assert_eq!(b.fresh().next().unwrap().pressure_io_some_avg10, None);
    }

    #[test]
    fn parse_text_keeps_each_sample_as_sent() {
        let mut newer = sample("r", 1, 1.0);
        newer["gpu_usage_percent"] = 12.5.into();
        let raw = format!(
            "[ {} ,\n{}]",
            serde_json::to_string(&newer).unwrap(),
            serde_json::to_string(&sample("r", 2, 2.0)).unwrap()
        );
        let parsed = parse_text(raw.as_bytes()).unwrap();
        assert_eq!(parsed.len(), 2);
        let first: serde_json::Value = serde_json::from_str(parsed[0].text).unwrap();
        assert_eq!(first, newer);
        assert_eq!(parsed[1].sample.seq, 2);
        assert_eq!(
            parse_text(b"[{\"schema\": 2}]").unwrap_err().status,
            parse(b"[{\"schema\": 2}]").unwrap_err().status
        );
    }

    #[test]
    fn refusals_carry_the_contract_status() {
        let ing = Ingest::new();
        let status = |raw: &[u8]| ing.prepare(raw).unwrap_err().status;
        assert_eq!(status(b"not json"), 400);
        assert_eq!(status(b"{}"), 400);
        assert_eq!(status(b"[]"), 400);
        assert_eq!(status(b"[1]"), 400);
        let mut no_run = sample("r", 1, 1.0);
        no_run.as_object_mut().unwrap().remove("run_id");
        let e = ing
            .prepare(&body(&[sample("r", 1, 1.0), no_run]))
            .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.reason.starts_with("sample 1: ") && e.reason.contains("run_id"),
            "{e}"
        );
        let mut wrong_type = sample("r", 1, 1.0);
        wrong_type["cpu_usage_percent"] = "high".into();
        assert_eq!(status(&body(&[wrong_type])), 400);
        let mut schema2 = sample("r", 1, 1.0);
        schema2["schema"] = 2.into();
        assert_eq!(status(&body(&[schema2])), 422);
        assert_eq!(check_length(MAX_BODY as u64 + 1).unwrap_err().status, 413);
        assert_eq!(status(&vec![b' '; MAX_BODY + 1]), 413);
        let reply = ing.prepare(b"[]").unwrap_err().reply();
        let v: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("no samples"));
    }

    #[test]
    fn a_body_for_one_vm_holds_only_that_vms_samples() {
        let mut ing = Ingest::new();
        let mine = body(&[sample("r", 1, 1.0)]);
        assert_eq!(
            ing.prepare_for_vm(&mine, "vm-1").unwrap().fresh().count(),
            1
        );
        let e = ing.prepare_for_vm(&mine, "vm-2").unwrap_err();
        assert_eq!(e.status, 403);
        assert!(e.reason.contains("\"vm-1\" is not \"vm-2\""), "{e}");
        // A duplicate of another VM's sample is refused too, and nothing
        // of a refused body is remembered.
        ing.receive(&mine).unwrap();
        assert_eq!(ing.prepare_for_vm(&mine, "vm-2").unwrap_err().status, 403);
        let mut none = sample("r", 2, 1.0);
        none["vm_id"] = serde_json::Value::Null;
        let e = ing.prepare_for_vm(&body(&[none]), "vm-1").unwrap_err();
        assert!(e.reason.contains("null"), "{e}");
    }

    #[test]
    fn memory_is_bounded_per_run_and_in_runs() {
        let mut d = Dedup::with_limits(4, 2);
        for seq in 1..=10 {
            d.record("a", seq, seq);
        }
        assert_eq!(d.runs["a"].pairs.len(), 4);
        assert_eq!(d.check("a", 10, 10), Verdict::Duplicate);
        assert_eq!(d.check("a", 7, 7), Verdict::Duplicate);
        assert_eq!(d.check("a", 6, 6), Verdict::Expired);
        assert_eq!(d.check("a", 11, 0), Verdict::New);
        d.record("b", 1, 1);
        d.record("c", 1, 1);
        assert_eq!(d.runs(), 2);
        // "a" was the least recently active: forgotten.
        assert_eq!(d.check("a", 10, 10), Verdict::New);
        assert_eq!(d.check("c", 1, 1), Verdict::Duplicate);
    }

    #[test]
    fn gaps_and_out_of_order_seqs_are_fine() {
        let mut d = Dedup::with_limits(8, 1);
        for seq in [5, 1, 9, 3] {
            d.record("r", seq, seq);
        }
        for seq in [1, 3, 5, 9] {
            assert_eq!(d.check("r", seq, seq), Verdict::Duplicate);
        }
        assert_eq!(d.check("r", 4, 4), Verdict::New);
    }

    #[test]
    fn text_fields_are_bounded_before_anything_is_remembered() {
        let mut ing = Ingest::new();
        let long = "r".repeat(MAX_TEXT + 1);
        let e = ing.receive(&body(&[sample(&long, 1, 1.0)])).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.reason.contains("run_id is longer than 256 bytes"), "{e}");
        assert_eq!(ing.dedup().runs(), 0);
        let mut named = sample("r", 1, 1.0);
        named["hostname"] = "h".repeat(MAX_TEXT + 1).into();
        assert!(
            ing.receive(&body(&[named]))
                .unwrap_err()
                .reason
                .contains("hostname")
        );
        let at_limit = "r".repeat(MAX_TEXT);
        assert_eq!(
            ing.receive(&body(&[sample(&at_limit, 1, 1.0)]))
                .unwrap()
                .fresh()
                .count(),
            1
        );
    }

    #[test]
    fn a_body_that_is_not_samples_fails_at_its_first_wrong_element() {
        let ing = Ingest::new();
        // A megabyte of zeros is refused at the first one, never held as a tree.
        let mut zeros = b"[0".to_vec();
        zeros.extend(std::iter::repeat_n(&b",0"[..], 500_000).flatten());
        zeros.push(b']');
        let e = ing.prepare(&zeros).unwrap_err();
        assert_eq!(
            (e.status, e.reason.as_str()),
            (400, "sample 0: not a JSON object")
        );
        let e = ing.prepare(br#"[{"schema": "1"}]"#).unwrap_err();
        assert!(e.reason.contains("no numeric"), "{e}");
        let e = ing.prepare(b"[{\"schema\":1}] trailing").unwrap_err();
        assert_eq!(e.status, 400, "{e}");
        // More samples than the agent ever batches: split, as for 413.
        let many: Vec<serde_json::Value> = (0..=MAX_SAMPLES as u64)
            .map(|s| sample("r", s, 0.0))
            .collect();
        assert_eq!(ing.prepare(&body(&many)).unwrap_err().status, 413);
    }

    #[test]
    fn the_same_sample_indented_is_a_duplicate_and_a_changed_one_a_conflict() {
        let mut ing = Ingest::new();
        let compact = body(&[sample("r", 1, 1.0)]);
        ing.receive(&compact).unwrap();
        let pretty = serde_json::to_vec_pretty(&[sample("r", 1, 1.0)]).unwrap();
        assert_eq!(ing.prepare(&pretty).unwrap().duplicates(), 1);
        // A space inside a string is part of the payload.
        let mut changed = sample("r", 1, 1.0);
        changed["hostname"] = "h ".into();
        assert_eq!(ing.prepare(&body(&[changed])).unwrap().conflicts().len(), 1);
    }

    #[test]
    fn a_full_window_never_grows_its_queue() {
        let mut d = Dedup::with_limits(1024, 1);
        for seq in 1..=10_000 {
            d.record("r", seq, seq);
        }
        let run = &d.runs["r"];
        assert_eq!(run.pairs.len(), 1024);
        assert!(run.pairs.capacity() <= 1024 * 2, "{}", run.pairs.capacity());
        assert_eq!(run.pairs.front().map(|p| p.0), Some(10_000 - 1023));
    }
}
