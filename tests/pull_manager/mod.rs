//! A stand-in for the pull-model manager the drop-in mode serves
//! (docs/manager.md), reproducing what it does with a guest agent:
//!
//! - its guest-address route, `POST /v1/vms/{id}/guest-ip` with
//!   `{"guest_ip": "…"}`, mounted the way that manager mounts it (axum 0.7,
//!   a `Json` extractor, so a body without `Content-Type: application/json`
//!   gets 415; an id that is not a UUID gets 400);
//! - no ingest route: `POST /v1/guest-metrics` gets axum's 404, until
//!   [`StandIn::add_ingest_route`] mounts the ingest kit there;
//! - its metrics collector: every 10 s, for a VM whose address it knows,
//!   `GET http://{guest_ip}:9000/metrics` with a 2 s timeout, a success
//!   status required, and the body parsed into a struct with exactly its
//!   field types ([`CollectorMetrics`]);
//! - its live view: the same every 1 s into its smaller struct
//!   ([`LiveMetrics`]).
//!
//! The pulls go through a blocking client rather than that manager's async
//! one: what the test keeps from it is the URL, the deadline, the status
//! check and the types the body must parse into.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use guest_agent::ingest::Ingest;
use serde::Deserialize;

/// The collector's period and its request deadline.
pub const COLLECT_EVERY: Duration = Duration::from_secs(10);
pub const LIVE_EVERY: Duration = Duration::from_secs(1);
pub const PULL_TIMEOUT: Duration = Duration::from_secs(2);
/// The port the manager pulls.
pub const AGENT_PORT: u16 = 9000;

/// The collector's struct: these names, these types, nothing else required.
#[derive(Debug, Clone, Deserialize)]
pub struct CollectorMetrics {
    pub cpu_usage_percent: f64,
    pub memory_usage_percent: f64,
    pub memory_used_kb: u64,
    pub memory_total_kb: u64,
    pub memory_available_kb: u64,
    pub uptime_seconds: u64,
    pub load_average: Option<f64>,
    pub process_count: Option<u32>,
}

/// The live view's struct.
#[derive(Debug, Clone, Deserialize)]
pub struct LiveMetrics {
    pub cpu_usage_percent: f64,
    pub memory_usage_percent: f64,
    pub memory_used_kb: u64,
    pub memory_total_kb: u64,
}

#[derive(Deserialize)]
struct UpdateGuestIpReq {
    guest_ip: String,
}

/// One guest-address report as received.
#[derive(Debug, Clone)]
pub struct IpReport {
    pub at: Instant,
    pub vm_id: String,
    pub guest_ip: String,
}

/// One pull and what came of it.
#[derive(Debug, Clone)]
pub struct Pull<T> {
    pub at: Instant,
    pub url: String,
    pub result: Result<T, String>,
}

#[derive(Default)]
struct Inner {
    reports: Vec<IpReport>,
    collector: Vec<Pull<CollectorMetrics>>,
    live: Vec<Pull<LiveMetrics>>,
    /// Requests to the ingest path and the status answered.
    ingest_posts: Vec<u16>,
    /// Samples stored through the ingest kit, once the route exists.
    stored: Vec<guest_agent::Sample>,
    ingest: Option<Ingest>,
}

type Shared = Arc<Mutex<Inner>>;

/// Where a guest's `/metrics` is reached from the manager: its address and
/// port 9000, or (through a VM's port forward) somewhere else.
pub type PullAddr = Arc<dyn Fn(&str) -> SocketAddr + Send + Sync>;

pub struct StandIn {
    pub addr: SocketAddr,
    inner: Shared,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl StandIn {
    /// Serves the manager's routes on `bind` and runs its two pull loops,
    /// reaching a guest at `pull_addr(guest_ip)`.
    pub fn start(bind: SocketAddr, pull_addr: PullAddr) -> StandIn {
        let inner: Shared = Arc::default();
        let listener = std::net::TcpListener::bind(bind).expect("bind the stand-in manager");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/v1/vms/:id/guest-ip", post(update_guest_ip))
            .fallback(fallback)
            .with_state(inner.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        spawn_pulls(
            inner.clone(),
            stop.clone(),
            pull_addr.clone(),
            COLLECT_EVERY,
            |i, p| i.collector.push(p),
        );
        spawn_pulls(
            inner.clone(),
            stop.clone(),
            pull_addr,
            LIVE_EVERY,
            |i, p| i.live.push(p),
        );
        StandIn { addr, inner, stop }
    }

    /// The manager's base URL, as its installer writes it.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The manager gains the push route (an upgrade with the ingest kit).
    pub fn add_ingest_route(&self) {
        self.inner.lock().unwrap().ingest = Some(Ingest::new());
    }

    pub fn reports(&self) -> Vec<IpReport> {
        self.inner.lock().unwrap().reports.clone()
    }

    pub fn collector_pulls(&self) -> Vec<Pull<CollectorMetrics>> {
        self.inner.lock().unwrap().collector.clone()
    }

    pub fn live_pulls(&self) -> Vec<Pull<LiveMetrics>> {
        self.inner.lock().unwrap().live.clone()
    }

    pub fn ingest_posts(&self) -> Vec<u16> {
        self.inner.lock().unwrap().ingest_posts.clone()
    }

    pub fn stored(&self) -> Vec<guest_agent::Sample> {
        self.inner.lock().unwrap().stored.clone()
    }

    /// Polls `pred` every 50 ms; panics after `secs`, showing what the
    /// stand-in saw.
    pub fn wait_for<T>(
        &self,
        secs: u64,
        what: &str,
        mut pred: impl FnMut(&StandIn) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = pred(self) {
                return v;
            }
            if Instant::now() >= deadline {
                let i = self.inner.lock().unwrap();
                panic!(
                    "timed out after {secs}s waiting for {what}; reports {:?}; last pulls {:?} / {:?}; ingest posts {:?}",
                    i.reports,
                    i.collector.last(),
                    i.live.last(),
                    i.ingest_posts
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A pull loop: the first tick at once, then every `every`; a VM without
/// an address is skipped, as that manager does.
fn spawn_pulls<T: serde::de::DeserializeOwned + Send + 'static>(
    inner: Shared,
    stop: Arc<std::sync::atomic::AtomicBool>,
    pull_addr: PullAddr,
    every: Duration,
    record: impl Fn(&mut Inner, Pull<T>) + Send + 'static,
) {
    std::thread::spawn(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(PULL_TIMEOUT))
            .build()
            .into();
        let mut next = Instant::now();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let ip = inner
                .lock()
                .unwrap()
                .reports
                .last()
                .map(|r| r.guest_ip.clone());
            if let Some(ip) = ip {
                let url = format!("http://{}/metrics", pull_addr(&ip));
                let at = Instant::now();
                let result = agent
                    .get(&url)
                    .call()
                    .map_err(|e| e.to_string())
                    .and_then(|mut r| r.body_mut().read_to_vec().map_err(|e| e.to_string()))
                    .and_then(|b| serde_json::from_slice::<T>(&b).map_err(|e| e.to_string()));
                record(&mut inner.lock().unwrap(), Pull { at, url, result });
            }
            next += every;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    });
}

/// The manager's guest-address handler: the id must be a UUID (its path
/// type), the body `{"guest_ip": "…"}` as JSON.
async fn update_guest_ip(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    Json(req): Json<UpdateGuestIpReq>,
) -> Result<Json<serde_json::Value>, StatusCode> {
    if !is_uuid(&id) {
        return Err(StatusCode::BAD_REQUEST);
    }
    inner.lock().unwrap().reports.push(IpReport {
        at: Instant::now(),
        vm_id: id,
        guest_ip: req.guest_ip,
    });
    Ok(Json(serde_json::json!({})))
}

/// Everything else: 404, except the ingest path once it exists.
async fn fallback(
    State(inner): State<Shared>,
    uri: axum::http::Uri,
    body: axum::body::Bytes,
) -> (StatusCode, String) {
    let mut i = inner.lock().unwrap();
    if uri.path() != "/v1/guest-metrics" {
        return (StatusCode::NOT_FOUND, String::new());
    }
    let Some(ingest) = i.ingest.as_mut() else {
        i.ingest_posts.push(404);
        return (StatusCode::NOT_FOUND, String::new());
    };
    let reply = match ingest.receive(&body) {
        Ok(batch) => {
            let fresh: Vec<_> = batch.fresh().cloned().collect();
            let reply = batch.reply();
            i.stored.extend(fresh);
            reply
        }
        Err(refusal) => refusal.reply(),
    };
    i.ingest_posts.push(reply.status);
    (StatusCode::from_u16(reply.status).unwrap(), reply.body)
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}
