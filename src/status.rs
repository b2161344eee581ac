//! What the agent's stages tell each other and `/health`: plain data under
//! one lock, with no behaviour of its own (docs/design.md#data-flow-and-modules).
//!
//! It sits below every stage and imports none of them (only the sample
//! type): collection records the latest sample, delivery its outcomes, the
//! address report its own, restore detection the restore generation. Each
//! does so through one narrow method per event, so what `/health` says is
//! decided in one place, and no stage reaches another through it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::sample::{AGENT_VERSION, Detail, Sample};

/// Where delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PushState {
    /// Pushing is disabled (`url off`).
    Off,
    /// Nothing attempted yet, or no default route yet.
    Waiting,
    /// The last request was accepted.
    Ok,
    /// The last request failed; its batch is kept and retried.
    Failing,
    /// The manager refused the last batch's payload (400, 413, 422): those
    /// samples were dropped. Stays until a batch is accepted again, so a
    /// receiver that refuses everything never looks healthy.
    Rejecting,
    /// The manager answered 404: it has no ingest route (yet). Samples stay
    /// buffered and the route is tried again at the backoff ceiling
    /// (docs/manager.md).
    NoIngestRoute,
}

/// Whether the agent is collecting on schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    /// A sample was collected within the last 3 intervals.
    Ok,
    /// No sample for 3 intervals: `/health` answers 503.
    Stale,
}

/// Where the guest-address report to a pull-model manager stands
/// (docs/manager.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestIpState {
    /// Configured without a VM id: nothing can be reported.
    Off,
    /// No report sent yet (no route or address yet).
    Waiting,
    /// The last report was accepted.
    Ok,
    /// The last report failed; it is retried.
    Failing,
}

/// The guest-address report as `/health` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GuestIpReport {
    /// The report URL as configured (`{gateway}` unfilled).
    pub url: String,
    /// Where it stands.
    pub state: GuestIpState,
    /// The address the manager last accepted.
    pub reported_ip: Option<String>,
    /// Milliseconds since the manager last accepted a report.
    pub last_report_age_ms: Option<u64>,
    /// Reports accepted since start.
    pub reports: u64,
    /// Failed attempts since the last accepted one.
    pub consecutive_failures: u64,
    /// The most recent failure, kept after recovery for diagnosis.
    pub last_error: Option<String>,
}

/// What [`Status::failed`] tells the sender, so it logs on changes only.
#[derive(Debug, Clone, Copy)]
pub struct Failure {
    /// True when this failure ends a run of successes.
    pub first: bool,
    /// Failed requests since the last success, this one included.
    pub consecutive: u64,
}

/// The buffer's figures, as its owner reads them for `/health`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BufferFigures {
    /// Samples waiting.
    pub len: usize,
    /// Bytes they take.
    pub bytes: usize,
    /// Samples dropped so far because the buffer was full.
    pub dropped: u64,
    /// The capacity in samples.
    pub capacity: usize,
    /// The bound in bytes.
    pub max_bytes: usize,
}

/// The part that changes, under one lock.
#[derive(Debug, Clone)]
struct State {
    latest: Option<Arc<Sample>>,
    /// The latest sample's detail, kept here when the buffered copy goes
    /// without it (formats that do not carry it).
    latest_detail: Option<Arc<Detail>>,
    last_sample_at: Option<Instant>,
    push_state: PushState,
    last_error: Option<String>,
    consecutive_failures: u64,
    delivered: u64,
    rejected: u64,
    rejected_points: u64,
    target: Option<String>,
    guest_ip: Option<String>,
    collector_errors: BTreeMap<String, String>,
    report: Option<GuestIpReport>,
    report_ok_at: Option<Instant>,
}

/// The agent's shared status.
#[derive(Debug)]
pub struct Status {
    started: Instant,
    interval: Duration,
    config_errors: Vec<String>,
    state: Mutex<State>,
    /// Snapshot restores detected (docs/snapshots.md): the sender and the
    /// address report compare it with the last value they saw.
    restores: AtomicU64,
}

impl Status {
    /// The status of an agent collecting every `interval`, pushing or not,
    /// with the configuration errors it started with and, for a pull-model
    /// manager, the address report's first state.
    pub fn new(
        interval: Duration,
        pushing: bool,
        config_errors: Vec<String>,
        report: Option<GuestIpReport>,
    ) -> Status {
        Status {
            started: Instant::now(),
            interval,
            config_errors,
            state: Mutex::new(State {
                latest: None,
                latest_detail: None,
                last_sample_at: None,
                push_state: if pushing {
                    PushState::Waiting
                } else {
                    PushState::Off
                },
                last_error: None,
                consecutive_failures: 0,
                delivered: 0,
                rejected: 0,
                rejected_points: 0,
                target: None,
                guest_ip: None,
                collector_errors: BTreeMap::new(),
                report,
                report_ok_at: None,
            }),
            restores: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The release build aborts on panic, so the lock is never poisoned
        // there; in test builds a panicking thread must not take the others
        // down with it, and every update is a few assignments, never half
        // done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A sample was collected, with its detail when the sample itself goes
    /// without it; `errors`, when given, replaces the failing sources shown
    /// in `/health`.
    pub fn collected(
        &self,
        sample: Arc<Sample>,
        detail: Option<Arc<Detail>>,
        errors: Option<&BTreeMap<&'static str, String>>,
    ) {
        let mut st = self.lock();
        st.latest_detail = detail.or_else(|| sample.detail.clone());
        st.latest = Some(sample);
        st.last_sample_at = Some(Instant::now());
        if let Some(errors) = errors {
            st.collector_errors = errors
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
        }
    }

    /// The latest sample, if one was collected.
    pub fn latest(&self) -> Option<Arc<Sample>> {
        self.lock().latest.clone()
    }

    /// The latest sample and the figures behind its totals.
    pub fn latest_with_detail(&self) -> Option<(Arc<Sample>, Option<Arc<Detail>>)> {
        let st = self.lock();
        Some((st.latest.clone()?, st.latest_detail.clone()))
    }

    /// The guest's source address toward the push target.
    pub fn guest_ip(&self) -> Option<String> {
        self.lock().guest_ip.clone()
    }

    /// A batch of `n` samples was accepted. Returns the failures it ends.
    pub fn delivered(&self, n: u64) -> u64 {
        let mut st = self.lock();
        st.delivered += n;
        st.push_state = PushState::Ok;
        std::mem::take(&mut st.consecutive_failures)
    }

    /// A receiver took a batch but refused `points` of its data points
    /// (OTLP's partial success); the batch is delivered.
    pub fn points_refused(&self, points: u64, why: String) {
        let mut st = self.lock();
        st.rejected_points += points;
        st.last_error = Some(why);
    }

    /// A batch of `n` samples was refused for its payload and dropped.
    pub fn refused(&self, n: u64, why: String) {
        let mut st = self.lock();
        st.rejected += n;
        st.push_state = PushState::Rejecting;
        st.consecutive_failures = 0;
        st.last_error = Some(why);
    }

    /// A request failed; its batch is kept.
    pub fn failed(&self, error: String) -> Failure {
        let mut st = self.lock();
        st.consecutive_failures += 1;
        let first = st.push_state != PushState::Failing;
        st.push_state = PushState::Failing;
        st.last_error = Some(error);
        Failure {
            first,
            consecutive: st.consecutive_failures,
        }
    }

    /// The manager has no ingest route (HTTP 404); the batch is kept.
    /// Returns true when this starts the state, so that it is logged once.
    pub fn no_ingest_route(&self, error: String) -> bool {
        let mut st = self.lock();
        st.consecutive_failures += 1;
        let first = st.push_state != PushState::NoIngestRoute;
        st.push_state = PushState::NoIngestRoute;
        st.last_error = Some(error);
        first
    }

    /// There is no default route to fill `{gateway}` with yet.
    pub fn waiting_for_route(&self) {
        let mut st = self.lock();
        st.push_state = PushState::Waiting;
        st.last_error = Some("no default route".into());
    }

    /// The push target and the guest's address toward it were looked up.
    pub fn set_target(&self, target: Option<String>, guest_ip: Option<String>) {
        let mut st = self.lock();
        st.target = target;
        st.guest_ip = guest_ip;
    }

    /// The delivery state.
    pub fn push_state(&self) -> PushState {
        self.lock().push_state
    }

    /// The manager accepted the guest's address `ip`.
    pub fn report_accepted(&self, ip: &str) {
        let mut st = self.lock();
        if let Some(r) = st.report.as_mut() {
            r.state = GuestIpState::Ok;
            r.reported_ip = Some(ip.to_string());
            r.reports += 1;
            r.consecutive_failures = 0;
            st.report_ok_at = Some(Instant::now());
        }
    }

    /// A report failed; true when it ends a run of successes (or is the
    /// first ever), so that it is logged once, not at every retry.
    pub fn report_failed(&self, error: String) -> bool {
        let mut st = self.lock();
        let Some(r) = st.report.as_mut() else {
            return false;
        };
        let first = r.consecutive_failures == 0;
        r.state = GuestIpState::Failing;
        r.consecutive_failures += 1;
        r.last_error = Some(error);
        first
    }

    /// Records a snapshot restore; returns the new restore generation.
    pub fn note_restore(&self) -> u64 {
        self.restores.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The restore generation: snapshot restores detected so far.
    pub fn restores(&self) -> u64 {
        self.restores.load(Ordering::SeqCst)
    }

    /// Whether a sample was collected within the last 3 intervals.
    pub fn is_healthy(&self) -> bool {
        let last = self.lock().last_sample_at;
        let limit = self.interval * 3;
        match last {
            Some(t) => t.elapsed() <= limit,
            None => self.started.elapsed() <= limit,
        }
    }

    /// The `/health` body, with the buffer's figures as its owner read them.
    pub fn health(&self, buffer: BufferFigures) -> Health {
        let status = if self.is_healthy() {
            HealthState::Ok
        } else {
            HealthState::Stale
        };
        let st = self.lock().clone();
        let guest_ip_report = st.report.map(|mut r| {
            r.last_report_age_ms = st.report_ok_at.map(|t| t.elapsed().as_millis() as u64);
            r
        });
        Health {
            status,
            version: AGENT_VERSION,
            uptime_seconds: self.started.elapsed().as_secs(),
            last_sample_age_ms: st.last_sample_at.map(|t| t.elapsed().as_millis() as u64),
            last_seq: st.latest.as_ref().map(|s| s.seq),
            interval_ms: self.interval.as_millis() as u64,
            push_state: st.push_state,
            push_target: st.target,
            guest_ip: st.guest_ip,
            last_error: st.last_error,
            consecutive_failures: st.consecutive_failures,
            delivered: st.delivered,
            buffered: buffer.len,
            buffer_capacity: buffer.capacity,
            buffer_bytes: buffer.bytes,
            buffer_max_bytes: buffer.max_bytes,
            dropped: buffer.dropped,
            rejected: st.rejected,
            rejected_data_points: st.rejected_points,
            config_errors: self.config_errors.clone(),
            collector_errors: st.collector_errors,
            guest_ip_report,
        }
    }
}

/// The `/health` body (docs/design.md#the-listener).
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// `ok`, or `stale` when no sample was collected for 3 intervals (503).
    pub status: HealthState,
    /// The agent's version.
    pub version: &'static str,
    /// Seconds since the agent started.
    pub uptime_seconds: u64,
    /// Milliseconds since the latest sample; null before the first.
    pub last_sample_age_ms: Option<u64>,
    /// Seq of the latest sample.
    pub last_seq: Option<u64>,
    /// The collection interval in milliseconds.
    pub interval_ms: u64,
    /// `off`, `waiting`, `ok`, `failing`, `rejecting` or `no_ingest_route`.
    pub push_state: PushState,
    /// The resolved push URL in use.
    pub push_target: Option<String>,
    /// The guest's source address toward the push target.
    pub guest_ip: Option<String>,
    /// The most recent delivery error, kept after recovery for diagnosis.
    pub last_error: Option<String>,
    /// Failed requests since the last success.
    pub consecutive_failures: u64,
    /// Samples the manager accepted.
    pub delivered: u64,
    /// Samples waiting in the buffer.
    pub buffered: usize,
    /// The buffer's capacity in samples.
    pub buffer_capacity: usize,
    /// Bytes the buffered samples take in memory.
    pub buffer_bytes: usize,
    /// Most bytes the buffer may take; the oldest samples go first.
    pub buffer_max_bytes: usize,
    /// Samples dropped because the buffer was full.
    pub dropped: u64,
    /// Samples whose payload the manager refused (400, 413, 422), and,
    /// with a signing key, a snapshot parent's samples this VM cannot sign
    /// for (docs/security.md).
    pub rejected: u64,
    /// Data points an OTLP receiver refused in batches it otherwise took.
    pub rejected_data_points: u64,
    /// Bad configuration values that were skipped.
    pub config_errors: Vec<String>,
    /// Sources failing at the last collection.
    pub collector_errors: BTreeMap<String, String>,
    /// The guest-address report to a pull-model manager; null when off.
    pub guest_ip_report: Option<GuestIpReport>,
}
