//! Delivery (docs/design.md#delivery): the sender thread posts the oldest buffered samples
//! in batches and removes them only once the manager has answered.
//!
//! 2xx removes the batch. 400 and 422 mean the payload itself is refused: the
//! batch is dropped and counted as rejected; 413 halves the batch size first
//! and drops only a single refused sample. Every other failure keeps the batch
//! and waits (exponential backoff with full jitter, or `Retry-After`). After a
//! connection failure the default gateway is looked up again, since DHCP may
//! have moved it. Logging follows state changes plus a periodic summary, so a
//! long outage does not flood the log.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Sample;
use crate::backoff::{Backoff, parse_retry_after};
use crate::buffer::Batch;
use crate::config::{Config, Format};
use crate::encode;
use crate::route::{self, Lookups, Target, UrlTemplate};
use crate::status::Shared;
use crate::stop::Stop;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

/// How often a still-failing delivery is summarised in the log.
pub const FAILURE_SUMMARY_EVERY: Duration = Duration::from_secs(60);
/// Most bytes of a response body read (and discarded) to keep the connection reusable.
pub const MAX_RESPONSE_BODY: u64 = 64 * 1024;
/// How often the route table is read again while there is no default route:
/// reading it costs microseconds, and the first samples should go out as soon
/// as DHCP has run.
pub const NO_ROUTE_POLL: Duration = Duration::from_secs(1);
/// Shortest time left worth a final request at shutdown.
const MIN_FLUSH_REQUEST: Duration = Duration::from_millis(50);

/// What one request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the batch is delivered.
    Delivered,
    /// 400, 413 or 422: the payload is refused.
    Refused(u16),
    /// 404: the manager has no ingest route (yet): keep the batch and try
    /// again at the backoff ceiling (docs/manager.md).
    NoIngestRoute(String),
    /// Anything else: keep the batch and try again later.
    Retry {
        /// What went wrong, with the URL.
        error: String,
        /// The manager's `Retry-After`.
        retry_after: Option<Duration>,
        /// True for failures below HTTP (connect, reset, timeout).
        transport: bool,
    },
}

/// The sender's state; runs on its own thread.
pub struct Sender {
    shared: Arc<Shared>,
    agent: ureq::Agent,
    template: UrlTemplate,
    proc_root: PathBuf,
    format: Format,
    authorization: Option<String>,
    timeout: Duration,
    batch_limit: usize,
    backoff: Backoff,
    body: Vec<u8>,
    target: Option<Target>,
    lookups: Lookups,
    resolve_again: bool,
    reported_no_route: bool,
    last_summary: Instant,
    /// The restore generation last acted on (crate::restore).
    restores: u64,
}

impl Sender {
    /// A sender for `config`'s URL; `None` when pushing is off.
    pub fn new(config: &Config, shared: Arc<Shared>, seed: &str) -> Option<Sender> {
        let template = config.url.clone()?;
        let agent = agent_for(&template, config.timeout);
        let restores = shared.restores();
        Some(Sender {
            shared,
            agent,
            template,
            proc_root: config.proc_root.clone(),
            format: config.format,
            authorization: config.token.as_ref().map(|t| format!("Bearer {}", t.0)),
            timeout: config.timeout,
            batch_limit: config.batch,
            backoff: Backoff::new(seed),
            body: Vec::with_capacity(64 * 1024),
            target: None,
            lookups: Lookups::default(),
            resolve_again: true,
            reported_no_route: false,
            last_summary: Instant::now(),
            restores,
        })
    }

    /// Sends until `stop`, then flushes what is buffered until the request
    /// timeout has passed since the stop.
    pub fn run(mut self, stop: &Stop) {
        let shared = self.shared.clone();
        self.refresh_target(true);
        loop {
            let batch = shared.buffer.batch(self.batch_limit, None);
            if stop.is_set() || batch.is_empty() {
                break;
            }
            self.after_restore();
            let delay = match self.refresh_target(true) {
                None => {
                    drop(batch);
                    self.no_route_delay()
                }
                Some(target) => {
                    let outcome = self.send(&target, batch.samples(), None);
                    self.settle(outcome, batch)
                }
            };
            if let Some(d) = delay
                && stop.wait(d)
            {
                break;
            }
        }
        self.flush(stop.deadline_after(self.timeout));
    }

    /// After a snapshot restore (docs/snapshots.md) the kept-alive
    /// connections belong to the parent and the network may differ: the
    /// pool goes with the old client, and the route is looked up again.
    fn after_restore(&mut self) {
        let restores = self.shared.restores();
        if restores == self.restores {
            return;
        }
        self.restores = restores;
        self.agent = agent_for(&self.template, self.timeout);
        self.resolve_again = true;
        self.backoff.reset();
        log::info!("restored from a snapshot: new connections, route looked up again");
    }

    /// The push target, looked up again after a connection failure. The
    /// guest's address toward it is looked up with it, unless `with_guest_ip`
    /// is false (at shutdown, where nothing may wait on a name lookup).
    fn refresh_target(&mut self, with_guest_ip: bool) -> Option<Target> {
        if !self.resolve_again && self.target.is_some() {
            return self.target.clone();
        }
        let gateway = if self.template.needs_gateway() {
            match route::default_gateway(&self.proc_root) {
                Ok(g) => g,
                Err(e) => {
                    log::warn!("{e}");
                    None
                }
            }
        } else {
            None
        };
        let target = self.template.resolve(gateway);
        if target != self.target
            && let Some(t) = &target
        {
            log::info!("pushing to {}", t.url);
            self.reported_no_route = false;
        }
        if with_guest_ip {
            let guest_ip = target
                .as_ref()
                .and_then(|t| route::guest_ip(t, &self.lookups, self.timeout))
                .map(|ip| ip.to_string());
            let url = target.as_ref().map(|t| t.url.clone());
            self.shared.status().set_target(url, guest_ip);
        }
        self.target = target;
        self.resolve_again = false;
        self.target.clone()
    }

    /// Waiting for a default route is not a failure of the manager: no
    /// backoff, the route table is simply read again soon.
    fn no_route_delay(&mut self) -> Option<Duration> {
        if !self.reported_no_route {
            log::warn!(
                "no default route yet for {}; buffering until one appears",
                self.template.as_str()
            );
            self.reported_no_route = true;
        }
        self.shared.status().waiting_for_route();
        self.resolve_again = true;
        Some(NO_ROUTE_POLL)
    }

    /// One POST of `batch` to `url`.
    pub fn send(
        &mut self,
        target: &Target,
        batch: &[Arc<Sample>],
        timeout: Option<Duration>,
    ) -> Outcome {
        let url = &target.url;
        encode::encode(batch, self.format, &mut self.body);
        let mut req = self
            .agent
            .post(&target.request_url)
            .header("Content-Type", encode::content_type(self.format));
        if let Some(auth) = &self.authorization {
            req = req.header("Authorization", auth);
        }
        if let Some(t) = timeout {
            req = req.config().timeout_global(Some(t)).build();
        }
        match req.send(&self.body[..]) {
            Ok(mut resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after);
                // Read the (bounded) body: it keeps the connection reusable,
                // and a response cut off mid-way is not an answer. Retrying
                // may deliver twice; the manager de-duplicates on (run_id, seq).
                if let Err(e) = resp
                    .body_mut()
                    .with_config()
                    .limit(MAX_RESPONSE_BODY)
                    .read_to_vec()
                    && !matches!(e, ureq::Error::BodyExceedsLimit(_))
                {
                    return Outcome::Retry {
                        error: format!("{url}: HTTP {status}, then {e}"),
                        retry_after: None,
                        transport: true,
                    };
                }
                match status {
                    200..=299 => Outcome::Delivered,
                    400 | 413 | 422 => Outcome::Refused(status),
                    404 => Outcome::NoIngestRoute(format!(
                        "{url}: HTTP 404: this manager has no ingest route"
                    )),
                    _ => Outcome::Retry {
                        error: format!("{url}: HTTP {status}"),
                        retry_after,
                        transport: false,
                    },
                }
            }
            Err(e) => Outcome::Retry {
                error: format!("{url}: {e}"),
                retry_after: None,
                transport: true,
            },
        }
    }

    /// Applies an outcome to the batch and the status; returns how long to
    /// wait before the next request, if at all.
    fn settle(&mut self, outcome: Outcome, batch: Batch<'_>) -> Option<Duration> {
        let n = batch.samples().len();
        let (first, last) = batch.seqs();
        match outcome {
            Outcome::Delivered => {
                batch.remove();
                let ended = self.shared.status().delivered(n as u64);
                if ended > 0 {
                    log::info!(
                        "delivering again after {ended} failed attempts; {} samples buffered",
                        self.shared.buffer.len()
                    );
                }
                self.backoff.reset();
                None
            }
            Outcome::Refused(413) if n > 1 => {
                drop(batch);
                self.batch_limit = (n / 2).max(1);
                log::warn!(
                    "manager answered 413 to {n} samples; sending at most {} per request from now on",
                    self.batch_limit
                );
                None
            }
            Outcome::Refused(status) => {
                batch.remove();
                let msg = format!(
                    "manager refused samples seq {first}..={last} with HTTP {status}; they are dropped"
                );
                log::error!("{msg}");
                self.shared.status().refused(n as u64, msg);
                self.backoff.reset();
                None
            }
            Outcome::NoIngestRoute(error) => {
                drop(batch);
                let buffered = self.shared.buffer.len();
                if self.shared.status().no_ingest_route(error.clone()) {
                    log::warn!(
                        "{error}; keeping the newest {} samples (now {buffered}) and asking again every {}s; a pull-model manager reads /metrics meanwhile",
                        self.shared.buffer.capacity(),
                        crate::backoff::BACKOFF_CAP.as_secs()
                    );
                }
                Some(crate::backoff::BACKOFF_CAP)
            }
            Outcome::Retry {
                error,
                retry_after,
                transport,
            } => {
                drop(batch);
                if transport {
                    self.resolve_again = true;
                }
                let delay = self.backoff.next_delay(retry_after);
                let buffered = self.shared.buffer.len();
                let failure = self.shared.status().failed(error.clone());
                if failure.first {
                    log::warn!("push failed: {error}; keeping {buffered} samples and retrying");
                    self.last_summary = Instant::now();
                } else if self.last_summary.elapsed() >= FAILURE_SUMMARY_EVERY {
                    log::warn!(
                        "push still failing after {} attempts: {error}; {buffered} samples buffered, {} dropped",
                        failure.consecutive,
                        self.shared.buffer.dropped()
                    );
                    self.last_summary = Instant::now();
                } else {
                    log::debug!("push failed: {error}; next try in {delay:?}");
                }
                Some(delay)
            }
        }
    }

    /// At shutdown: sends what is buffered until it is empty, a request
    /// fails, or `deadline` passes. Every request gets only the time left,
    /// and no name lookup for the guest's address is made.
    fn flush(&mut self, deadline: Instant) {
        let shared = self.shared.clone();
        loop {
            let batch = shared.buffer.batch(self.batch_limit, Some(Instant::now()));
            if batch.is_empty() {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let target = self.refresh_target(false);
            let (Some(target), true) = (target, left >= MIN_FLUSH_REQUEST) else {
                drop(batch);
                log::warn!("exiting with {} samples undelivered", shared.buffer.len());
                return;
            };
            let outcome = self.send(&target, batch.samples(), Some(left));
            if self.settle(outcome, batch).is_some() {
                log::warn!("exiting with {} samples undelivered", shared.buffer.len());
                return;
            }
        }
    }
}

/// The HTTP client of pushes, with its own connection pool; MMDS requests
/// use one too, so the binary holds one instance of the HTTP stack.
pub(crate) fn http_agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::with_parts(
        agent_config(timeout),
        DefaultConnector::new(),
        LiteralResolver::default(),
    )
}

/// The client for a push target: HTTP over TCP, or over an AF_VSOCK
/// connector for a `vsock://` URL (docs/vsock.md), with the same settings.
fn agent_for(template: &UrlTemplate, timeout: Duration) -> ureq::Agent {
    match crate::vsock::VsockUrl::parse(template.as_str()) {
        Ok(vsock) => crate::vsock::agent(agent_config(timeout), &vsock),
        Err(_) => http_agent(timeout),
    }
}

fn agent_config(timeout: Duration) -> ureq::config::Config {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        // Samples go to the manager and nowhere else: no proxy from the
        // environment, no redirects.
        .proxy(None)
        .max_redirects(0)
        .user_agent(format!("guest-agent/{}", crate::AGENT_VERSION))
        .build()
}

/// Resolves an address-literal host (the gateway's address, the usual
/// target) at once, and hands a host name to ureq's own resolver.
///
/// With a timeout set, ureq's resolver looks every name up on a new thread,
/// even an address literal, and even when the request then reuses a pooled
/// connection: a thread spawned per push cost more CPU than collecting the
/// whole sample (examples/bench.rs). A host name keeps that behaviour, since
/// a lookup can block for longer than the timeout.
#[derive(Debug, Default)]
struct LiteralResolver(DefaultResolver);

impl Resolver for LiteralResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let literal = uri.host().and_then(|h| {
            // An IPv6 literal keeps its brackets in the URI's host.
            let h = h
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(h);
            h.parse::<IpAddr>().ok()
        });
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("http") => Some(80),
            Some("https") => Some(443),
            _ => None,
        });
        match (literal, port) {
            (Some(ip), Some(port)) => {
                let mut addrs = self.0.empty();
                addrs.push(SocketAddr::new(ip, port));
                Ok(addrs)
            }
            _ => self.0.resolve(uri, config, timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ureq::unversioned::transport::time::Duration as UreqDuration;

    fn resolve(url: &str) -> Vec<SocketAddr> {
        let uri: ureq::http::Uri = url.parse().unwrap();
        let timeout = NextTimeout {
            after: UreqDuration::NotHappening,
            reason: ureq::Timeout::Global,
            per_read: None,
            per_write: None,
        };
        let config = ureq::config::Config::default();
        LiteralResolver::default()
            .resolve(&uri, &config, timeout)
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    #[test]
    fn address_literals_resolve_to_themselves() {
        assert_eq!(
            resolve("http://10.0.2.2:18080/v1/guest-metrics"),
            vec!["10.0.2.2:18080".parse().unwrap()]
        );
        assert_eq!(
            resolve("http://10.0.2.2/v1/guest-metrics"),
            vec!["10.0.2.2:80".parse().unwrap()]
        );
        assert_eq!(
            resolve("http://[fd00::1]:18080/x"),
            vec!["[fd00::1]:18080".parse().unwrap()]
        );
    }

    #[test]
    fn host_names_go_to_the_system_resolver() {
        let addrs = resolve("http://localhost:18080/x");
        assert!(!addrs.is_empty());
        assert!(
            addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 18080)
        );
    }
}
