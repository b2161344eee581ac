//! The state shared by the collector, the sender and the listener: the
//! buffer, the latest sample, delivery counters and errors. `/health` and
//! `/metrics` are rendered from it.
//!
//! Delivery state changes only through the transition methods of
//! [`Status`], one per event the sender sees, so that what `/health` says is
//! decided in one place.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::Sample;
use crate::buffer::Buffer;
use crate::config::Config;

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

/// Mutable status, under one lock; changed only by its methods.
#[derive(Debug, Clone)]
pub struct Status {
    latest: Option<Arc<Sample>>,
    last_sample_at: Option<Instant>,
    push_state: PushState,
    last_error: Option<String>,
    consecutive_failures: u64,
    delivered: u64,
    rejected: u64,
    target: Option<String>,
    guest_ip: Option<String>,
    collector_errors: BTreeMap<String, String>,
}

/// What [`Status::failed`] tells the sender, so it logs on changes only.
#[derive(Debug, Clone, Copy)]
pub struct Failure {
    /// True when this failure ends a run of successes.
    pub first: bool,
    /// Failed requests since the last success, this one included.
    pub consecutive: u64,
}

impl Status {
    /// A batch of `n` samples was accepted. Returns the failures it ends.
    pub fn delivered(&mut self, n: u64) -> u64 {
        self.delivered += n;
        self.push_state = PushState::Ok;
        std::mem::take(&mut self.consecutive_failures)
    }

    /// A batch of `n` samples was refused for its payload and dropped.
    pub fn refused(&mut self, n: u64, why: String) {
        self.rejected += n;
        self.push_state = PushState::Rejecting;
        self.consecutive_failures = 0;
        self.last_error = Some(why);
    }

    /// A request failed; its batch is kept.
    pub fn failed(&mut self, error: String) -> Failure {
        self.consecutive_failures += 1;
        let first = self.push_state != PushState::Failing;
        self.push_state = PushState::Failing;
        self.last_error = Some(error);
        Failure {
            first,
            consecutive: self.consecutive_failures,
        }
    }

    /// The manager has no ingest route (HTTP 404); the batch is kept.
    /// Returns true when this starts the state, so that it is logged once.
    pub fn no_ingest_route(&mut self, error: String) -> bool {
        self.consecutive_failures += 1;
        let first = self.push_state != PushState::NoIngestRoute;
        self.push_state = PushState::NoIngestRoute;
        self.last_error = Some(error);
        first
    }

    /// There is no default route to fill `{gateway}` with yet.
    pub fn waiting_for_route(&mut self) {
        self.push_state = PushState::Waiting;
        self.last_error = Some("no default route".into());
    }

    /// The push target and the guest's address toward it were looked up.
    pub fn set_target(&mut self, target: Option<String>, guest_ip: Option<String>) {
        self.target = target;
        self.guest_ip = guest_ip;
    }

    /// The delivery state.
    pub fn push_state(&self) -> PushState {
        self.push_state
    }

    /// The guest's source address toward the push target.
    pub fn guest_ip(&self) -> Option<&str> {
        self.guest_ip.as_deref()
    }
}

/// Everything the agent's threads share.
#[derive(Debug)]
pub struct Shared {
    /// Samples waiting for delivery.
    pub buffer: Buffer,
    pushing: bool,
    started: Instant,
    interval: Duration,
    config_errors: Vec<String>,
    status: Mutex<Status>,
    /// The guest-address report to a pull-model manager (docs/manager.md).
    pub guest_ip_report: crate::guest_ip::ReportState,
    /// Snapshot restores detected (crate::restore): the sender compares it
    /// with the last value it saw to drop its connections.
    restores: AtomicU64,
}

impl Shared {
    /// Shared state for an agent configured by `config`.
    pub fn new(config: &Config) -> Arc<Shared> {
        Arc::new(Shared {
            buffer: Buffer::new(config.buffer, config.buffer_max_bytes),
            pushing: config.url.is_some(),
            started: Instant::now(),
            interval: config.interval,
            config_errors: config.errors.clone(),
            status: Mutex::new(Status {
                latest: None,
                last_sample_at: None,
                push_state: if config.url.is_some() {
                    PushState::Waiting
                } else {
                    PushState::Off
                },
                last_error: None,
                consecutive_failures: 0,
                delivered: 0,
                rejected: 0,
                target: None,
                guest_ip: None,
                collector_errors: BTreeMap::new(),
            }),
            guest_ip_report: crate::guest_ip::ReportState::new(config),
            restores: AtomicU64::new(0),
        })
    }

    /// The status, locked. The release build aborts on panic, so the lock
    /// is never poisoned there; in test builds a panicking test thread must
    /// not take the others down with it, so a poisoned lock is entered
    /// anyway (every update is a single assignment, never half done).
    pub fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a freshly collected sample (when pushing is on: with it off
    /// nothing would ever take it out, and the buffer would only count
    /// drops) and makes it the latest; `errors`, when given, replaces the
    /// failing sources shown in `/health`.
    pub fn record(&self, sample: Sample, errors: Option<&BTreeMap<&'static str, String>>) {
        drop(self.record_claiming(sample, errors, false));
    }

    /// [`Shared::record`]; with `claim`, the sample comes back as a batch of
    /// its own when nothing else waits for delivery, for the caller to send
    /// ([`crate::buffer::Buffer::push_claiming`]).
    pub fn record_claiming(
        &self,
        sample: Sample,
        errors: Option<&BTreeMap<&'static str, String>>,
        claim: bool,
    ) -> Option<crate::buffer::Batch<'_>> {
        let (sample, batch) = if self.pushing {
            self.buffer.push_claiming(sample, claim)
        } else {
            (Arc::new(sample), None)
        };
        let mut st = self.status();
        st.latest = Some(sample);
        st.last_sample_at = Some(Instant::now());
        if let Some(errors) = errors {
            st.collector_errors = errors
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
        }
        batch
    }

    /// Records a snapshot restore; returns the new restore generation.
    pub fn note_restore(&self) -> u64 {
        self.restores.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The restore generation: snapshot restores detected so far.
    pub fn restores(&self) -> u64 {
        self.restores.load(Ordering::SeqCst)
    }

    /// The latest sample, if one was collected.
    pub fn latest(&self) -> Option<Arc<Sample>> {
        self.status().latest.clone()
    }

    /// Whether a sample was collected within the last 3 intervals.
    pub fn is_healthy(&self) -> bool {
        let last = self.status().last_sample_at;
        let limit = self.interval * 3;
        match last {
            Some(t) => t.elapsed() <= limit,
            None => self.started.elapsed() <= limit,
        }
    }

    /// The `/health` body.
    pub fn health(&self) -> Health {
        let st = self.status().clone();
        let buffer = self.buffer.stats();
        Health {
            status: if self.is_healthy() {
                HealthState::Ok
            } else {
                HealthState::Stale
            },
            version: crate::AGENT_VERSION,
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
            buffer_capacity: self.buffer.capacity(),
            buffer_bytes: buffer.bytes,
            buffer_max_bytes: self.buffer.max_bytes(),
            dropped: buffer.dropped,
            rejected: st.rejected,
            config_errors: self.config_errors.clone(),
            collector_errors: st.collector_errors,
            guest_ip_report: self.guest_ip_report.snapshot(),
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
    /// Samples whose payload the manager refused (400, 413, 422).
    pub rejected: u64,
    /// Bad configuration values that were skipped.
    pub config_errors: Vec<String>,
    /// Sources failing at the last collection.
    pub collector_errors: BTreeMap<String, String>,
    /// The guest-address report to a pull-model manager; null when off.
    pub guest_ip_report: Option<crate::guest_ip::GuestIpReport>,
}
