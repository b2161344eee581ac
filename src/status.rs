//! The state shared by the collector, the sender and the listener: the
//! buffer, the latest sample, delivery counters and errors. `/health` and
//! `/metrics` are rendered from it.

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
#[serde(rename_all = "lowercase")]
pub enum PushState {
    /// Pushing is disabled (`url off`).
    Off,
    /// Nothing attempted yet (or no default route yet).
    Waiting,
    /// The last request succeeded.
    Ok,
    /// The last request failed; the batch is kept and retried.
    Failing,
}

/// Mutable status, under one lock.
#[derive(Debug, Clone)]
pub struct Status {
    /// The latest sample, for `/metrics`.
    pub latest: Option<Arc<Sample>>,
    /// When the latest sample was collected.
    pub last_sample_at: Option<Instant>,
    /// Delivery state.
    pub push_state: PushState,
    /// The most recent delivery error, kept after recovery for diagnosis.
    pub last_error: Option<String>,
    /// Failed requests since the last success.
    pub consecutive_failures: u64,
    /// Samples the manager accepted.
    pub delivered: u64,
    /// Samples whose payload the manager refused (400, 413, 422).
    pub rejected: u64,
    /// The resolved push URL in use, if any.
    pub target: Option<String>,
    /// The guest's source address toward the target.
    pub guest_ip: Option<String>,
    /// Sources failing at the last collection.
    pub collector_errors: BTreeMap<String, String>,
}

/// Everything the agent's threads share.
#[derive(Debug)]
pub struct Shared {
    /// Samples waiting for delivery.
    pub buffer: Buffer,
    /// When the agent started.
    pub started: Instant,
    /// The collection interval.
    pub interval: Duration,
    /// Configuration errors found at start (each one was skipped).
    pub config_errors: Vec<String>,
    status: Mutex<Status>,
    /// Snapshot restores detected (crate::restore): the sender compares it
    /// with the last value it saw to drop its connections.
    restores: AtomicU64,
}

impl Shared {
    /// Shared state for an agent configured by `config`.
    pub fn new(config: &Config) -> Arc<Shared> {
        Arc::new(Shared {
            buffer: Buffer::new(config.buffer),
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
            restores: AtomicU64::new(0),
        })
    }

    /// The status, locked for reading or updating. A poisoned lock is
    /// recovered: status is plain data and always consistent.
    pub fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a freshly collected sample and makes it the latest; `errors`,
    /// when given, replaces the failing sources shown in `/health`.
    pub fn record(&self, sample: Sample, errors: Option<&BTreeMap<&'static str, String>>) {
        let sample = self.buffer.push(sample);
        let mut st = self.status();
        st.latest = Some(sample);
        st.last_sample_at = Some(Instant::now());
        if let Some(errors) = errors {
            st.collector_errors = errors
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
        }
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
        Health {
            status: if self.is_healthy() { "ok" } else { "stale" },
            version: crate::AGENT_VERSION,
            uptime_seconds: self.started.elapsed().as_secs(),
            last_sample_age_ms: st.last_sample_at.map(|t| t.elapsed().as_millis() as u64),
            last_seq: st.latest.as_ref().map(|s| s.seq),
            interval_ms: self.interval.as_millis() as u64,
            push_state: st.push_state,
            push_target: st.target,
            last_error: st.last_error,
            consecutive_failures: st.consecutive_failures,
            delivered: st.delivered,
            buffered: self.buffer.len(),
            buffer_capacity: self.buffer.capacity(),
            dropped: self.buffer.dropped(),
            rejected: st.rejected,
            config_errors: self.config_errors.clone(),
            collector_errors: st.collector_errors,
        }
    }
}

/// The `/health` body (GUIDE §5).
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// `ok`, or `stale` when no sample was collected for 3 intervals (503).
    pub status: &'static str,
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
    /// `off`, `waiting`, `ok` or `failing`.
    pub push_state: PushState,
    /// The resolved push URL in use.
    pub push_target: Option<String>,
    /// The most recent delivery error.
    pub last_error: Option<String>,
    /// Failed requests since the last success.
    pub consecutive_failures: u64,
    /// Samples delivered.
    pub delivered: u64,
    /// Samples waiting in the buffer.
    pub buffered: usize,
    /// The buffer's capacity.
    pub buffer_capacity: usize,
    /// Samples dropped because the buffer was full.
    pub dropped: u64,
    /// Samples the manager refused.
    pub rejected: u64,
    /// Bad configuration values that were skipped.
    pub config_errors: Vec<String>,
    /// Sources failing at the last collection.
    pub collector_errors: BTreeMap<String, String>,
}
