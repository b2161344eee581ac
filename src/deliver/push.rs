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

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Method;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};

use super::backoff::{BACKOFF_CAP, Backoff, parse_retry_after};
use super::buffer::{Batch, Buffer};
use crate::collect::route;
use crate::config::key::Signing;
use crate::config::{Config, Format};
use crate::net::address::source_address;
use crate::net::client::{Client, Error as ClientError};
use crate::net::url::{Peer, Target, UrlTemplate, VsockUrl};
use crate::output;
use crate::sample::Sample;
use crate::status::Status;
use crate::stop::Stop;

/// How often a still-failing delivery is summarised in the log.
pub const FAILURE_SUMMARY_EVERY: Duration = Duration::from_secs(60);
/// How often the route table is read again while there is no default route:
/// reading it costs microseconds, and the first samples should go out as soon
/// as DHCP has run.
pub const NO_ROUTE_POLL: Duration = Duration::from_secs(1);
/// Shortest time left worth a final request at shutdown.
const MIN_FLUSH_REQUEST: Duration = Duration::from_millis(50);
/// Shortest time worth a request from the collection thread; with less
/// left before the next sample, the sender's thread sends it.
pub const MIN_DIRECT_BUDGET: Duration = Duration::from_millis(10);

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
        /// True when the request ran out of time.
        timed_out: bool,
    },
}

/// The sender's state. Its thread ([`Sender::run`]) sends what is queued,
/// retries and backs off; the collection thread sends a new sample itself
/// when nothing else is queued ([`Sender::send_directly`]), so that in the
/// steady state a sample wakes one thread, not two
/// (docs/performance.md#one-wake-up-per-sample).
pub struct Sender {
    status: Arc<Status>,
    buffer: Arc<Buffer>,
    client: Client,
    template: UrlTemplate,
    proc_root: PathBuf,
    format: Format,
    /// Content type and authorization, made once: sent with every push.
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
    batch_limit: usize,
    backoff: Backoff,
    body: Vec<u8>,
    target: Option<Target>,
    resolve_again: bool,
    reported_no_route: bool,
    last_summary: Instant,
    /// The restore generation last acted on (docs/snapshots.md).
    restores: u64,
    /// No request before this (backoff, `Retry-After`, no route yet),
    /// whichever thread made the last one.
    retry_at: Option<Instant>,
    /// Whether the current run of partly refused OTLP batches was logged.
    said_partial: bool,
    /// An unreadable OTLP answer was logged; said once per run of them.
    said_unreadable: bool,
    /// Set when a request from the collection thread ran out of the time
    /// it had: the collection thread sends nothing itself until the sender's
    /// thread has had an answer within half of it.
    too_slow_for: Option<Duration>,
    /// The VM's key, when pushes are signed (docs/security.md).
    signing: Option<Signing>,
    /// Set by a 401 or a restore: the sender's thread reads the key again
    /// before its next request (the collection thread sends nothing until
    /// then: reading MMDS may take its whole timeout).
    reload_key: bool,
    /// The `flush` setting: how long samples are held to share a POST.
    flush: Option<Duration>,
    /// The collection interval: how often a held batch looks for a
    /// snapshot restore.
    interval: Duration,
    /// Since when the samples now buffered have been held for `flush`.
    held_since: Option<Instant>,
}

impl Sender {
    /// A sender for `config`'s URL; `None` when pushing is off.
    pub fn new(
        config: &Config,
        status: Arc<Status>,
        buffer: Arc<Buffer>,
        seed: &str,
    ) -> Option<Sender> {
        let template = config.url.clone()?;
        let peer = match VsockUrl::parse(template.as_str()) {
            Ok(v) => Peer::Vsock {
                cid: v.cid,
                port: v.port,
            },
            Err(_) => Peer::Tcp,
        };
        let mut headers = vec![(
            CONTENT_TYPE,
            HeaderValue::from_static(output::content_type(config.format)),
        )];
        // The token passed its check (printable ASCII without spaces), so
        // it is always a valid header value.
        if let Some(token) = &config.token
            && let Ok(mut v) = HeaderValue::try_from(format!("Bearer {}", token.0))
        {
            v.set_sensitive(true);
            headers.push((AUTHORIZATION, v));
        }
        let restores = status.restores();
        let signing = Signing::new(config);
        let mut client = Client::for_peer(peer, config.timeout);
        client.sign_with(signing.as_ref().map(|s| s.credentials.clone()));
        Some(Sender {
            status,
            buffer,
            client,
            template,
            proc_root: config.proc_root.clone(),
            format: config.format,
            headers,
            timeout: config.timeout,
            batch_limit: config.batch.min(config.format.max_batch()),
            backoff: Backoff::new(seed),
            body: Vec::with_capacity(64 * 1024),
            target: None,
            resolve_again: true,
            reported_no_route: false,
            last_summary: Instant::now(),
            restores,
            retry_at: None,
            said_partial: false,
            said_unreadable: false,
            too_slow_for: None,
            signing,
            reload_key: false,
            flush: config.flush,
            interval: config.interval,
            held_since: None,
        })
    }

    /// The sender's thread: sends what is queued until `stop`, then
    /// flushes what is buffered until the request timeout has passed since
    /// the stop. It takes only batches nobody else is sending, so a sample
    /// the collection thread sends itself does not wake it.
    pub fn run(sender: &Mutex<Sender>, stop: &Stop) {
        // Never poisoned in the release build (panic = abort); in tests a
        // panic elsewhere must not stop delivery: the state stays valid.
        let lock = || sender.lock().unwrap_or_else(|p| p.into_inner());
        let (buffer, timeout) = {
            let mut s = lock();
            s.refresh_target(true);
            (s.buffer.clone(), s.timeout)
        };
        loop {
            let limit = lock().batch_limit;
            let batch = buffer.batch(limit, None);
            if stop.is_set() || batch.is_empty() {
                break;
            }
            let mut s = lock();
            // A backoff set by either thread's last request.
            if let Some(at) = s.retry_at.filter(|at| *at > Instant::now()) {
                drop(batch);
                drop(s);
                if stop.wait_until(at) {
                    break;
                }
                continue;
            }
            if let Some(at) = s.hold(batch.samples().len(), Instant::now()) {
                drop(batch);
                drop(s);
                if stop.wait_until(at) {
                    break;
                }
                continue;
            }
            s.attempt(batch);
        }
        lock().flush(stop.deadline_after(timeout));
    }

    /// With `flush` set, whether a batch of `n` samples waits: until when,
    /// or `None` to send it now. It is sent once its first sample has been
    /// held for `flush`, at once when it is full (`batch` samples: the
    /// buffer never fills while samples are held) or after a snapshot
    /// restore (the clone's first push must not wait on the parent's
    /// samples). The wait is in steps of one interval, so that a restore
    /// is seen within one.
    fn hold(&mut self, n: usize, now: Instant) -> Option<Instant> {
        let flush = self.flush?;
        if n >= self.batch_limit || self.status.restores() != self.restores {
            self.held_since = None;
            return None;
        }
        // Kept past a failed attempt: a retry waits for the backoff only.
        let due = *self.held_since.get_or_insert(now) + flush;
        (due > now).then(|| due.min(now + self.interval))
    }

    /// One request for `batch` from the sender's thread, with everything
    /// that may come before it: a restore, a new route, a name lookup.
    fn attempt(&mut self, batch: Batch<'_>) {
        self.after_restore();
        self.reload_key_if_refused();
        let buffer = self.buffer.clone();
        let Some(batch) = self.for_one_vm(batch, &buffer) else {
            return;
        };
        let delay = match self.refresh_target(true) {
            None => {
                drop(batch);
                self.no_route_delay()
            }
            Some(target) => {
                let started = Instant::now();
                let outcome = self.send(&target, batch.samples(), None);
                if outcome == Outcome::Delivered
                    && self
                        .too_slow_for
                        .is_some_and(|budget| started.elapsed() < budget / 2)
                {
                    self.too_slow_for = None;
                    log::debug!("{}: answering quickly again", target.url);
                }
                self.settle(outcome, batch)
            }
        };
        self.retry_at = delay.map(|d| Instant::now() + d);
    }

    /// Whether the collection thread may send its new sample itself now:
    /// samples are not held (`flush`), the target is known and needs no
    /// lookup, no backoff is running, no restore waits to be handled, and
    /// the manager has not been too slow for it. Anything else is the
    /// sender's thread's work.
    pub fn may_send_directly(&self, now: Instant) -> bool {
        self.flush.is_none()
            && self.target.is_some()
            && !self.resolve_again
            && self.retry_at.is_none_or(|at| at <= now)
            && self.too_slow_for.is_none()
            && !self.reload_key
            && self.status.restores() == self.restores
    }

    /// Sends `batch` (the sample just collected, alone in the buffer) from
    /// the collection thread, within `budget`: the time it can spend before
    /// the next sample is due. A request that runs out of that time, when
    /// it is shorter than the configured timeout, is not held against the
    /// manager: the batch goes back to the sender's thread, which sends it
    /// again with the full timeout (the manager may see it twice, and
    /// de-duplicates on `run_id` and `seq`), and the collection thread
    /// leaves requests to it until one is answered within half that time.
    pub fn send_directly(&mut self, batch: Batch<'_>, budget: Duration) {
        // Taken out for the request and put back: a clone would copy its
        // four strings at every sample.
        let Some(target) = self.target.take() else {
            return; // dropping the batch wakes the sender's thread
        };
        if budget < MIN_DIRECT_BUDGET {
            self.target = Some(target);
            return;
        }
        let shortened = budget < self.timeout;
        let outcome = self.send(&target, batch.samples(), shortened.then_some(budget));
        self.target = Some(target);
        let target = self.target.as_ref().map_or("", |t| t.url.as_str());
        if shortened
            && matches!(
                outcome,
                Outcome::Retry {
                    timed_out: true,
                    ..
                }
            )
        {
            log::debug!(
                "{target}: no answer within the {budget:?} left before the next sample; the push thread sends it"
            );
            self.too_slow_for = Some(budget);
            return;
        }
        let delay = self.settle(outcome, batch);
        self.retry_at = delay.map(|d| Instant::now() + d);
    }

    /// After a snapshot restore (docs/snapshots.md) the kept-alive
    /// connections belong to the parent and the network may differ: the
    /// pool goes with the old client, and the route is looked up again.
    fn after_restore(&mut self) {
        let restores = self.status.restores();
        if restores == self.restores {
            return;
        }
        self.restores = restores;
        self.client.disconnect();
        self.resolve_again = true;
        self.backoff.reset();
        // A clone gets its own key (and maybe id) from MMDS.
        self.reload_key = self.signing.is_some();
        log::info!("restored from a snapshot: new connections, route looked up again");
    }

    /// After the manager refused a signature (or a restore): the key is
    /// read again from MMDS or the key file before the next request, so a
    /// key rotated on both sides lets pushes resume with nothing lost
    /// (docs/security.md#rotation).
    fn reload_key_if_refused(&mut self) {
        if !std::mem::take(&mut self.reload_key) {
            return;
        }
        let Some(signing) = &self.signing else {
            return;
        };
        match signing.reload() {
            Ok(true) => log::info!(
                "signing key read again: now key {} for vm_id {}",
                signing.credentials.kid(),
                signing.credentials.vm_id()
            ),
            Ok(false) => log::debug!("signing key read again: unchanged"),
            Err(e) => log::warn!("reading the signing key again: {e}; keeping the one in use"),
        }
    }

    /// With signing, one request speaks for one VM: a batch is cut before
    /// the first sample whose `vm_id` differs from its first one. Samples
    /// of an earlier run that carry another `vm_id` than the one signed for
    /// are a snapshot parent's, buffered before the restore made this VM a
    /// clone with its own id: this VM holds no key for them and can never
    /// deliver them to a manager that checks signatures, so they are
    /// dropped, counted as rejected and logged (the parent, or the
    /// snapshot's other clones, deliver the same samples). `None` when
    /// nothing is left to send now.
    fn for_one_vm<'b>(&mut self, batch: Batch<'b>, buffer: &'b Buffer) -> Option<Batch<'b>> {
        let Some(signing) = &self.signing else {
            return Some(batch);
        };
        let samples = batch.samples();
        let first = samples.first()?;
        let n = samples
            .iter()
            .take_while(|s| s.vm_id == first.vm_id)
            .count();
        let signer = signing.credentials.vm_id();
        let parents =
            first.vm_id.as_deref() != Some(signer.as_str()) && first.restore_count < self.restores;
        if !parents && n == samples.len() {
            return Some(batch);
        }
        let parent_id = first.vm_id.clone().unwrap_or_default();
        drop(batch);
        let part = buffer.batch(n, Some(Instant::now()));
        if !parents || part.is_empty() {
            return Some(part).filter(|b| !b.is_empty());
        }
        let (from, to) = part.seqs();
        let removed = part.remove();
        let msg = format!(
            "{removed} samples (seq {from}..={to}) of vm_id {parent_id:?}, buffered before the snapshot restore, \
             cannot be signed by this VM (vm_id {signer:?}); dropped (the VM they came from delivers them)"
        );
        log::warn!("{msg}");
        self.status.refused(removed as u64, msg);
        None
    }

    /// The push target, looked up again after a connection failure. A host
    /// name is looked up with it, on this thread, and the next connections
    /// go to what was found; the guest's address toward it is asked of the
    /// routing table. Neither happens when `with_guest_ip` is false (at
    /// shutdown, where nothing may wait on a name lookup).
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
        // A name that did not resolve now is looked up again before the
        // next request, on this thread: until it resolves, the collection
        // thread sends nothing itself (ureq would look it up there).
        let mut resolved = true;
        if with_guest_ip {
            let addr = match target.as_ref() {
                Some(t) if t.peer == Peer::Tcp => {
                    let a = self.address_of(t);
                    resolved = a.is_some();
                    a
                }
                _ => None,
            };
            let guest_ip = addr
                .and_then(|a| source_address(a).ok())
                .map(|ip| ip.to_string());
            let url = target.as_ref().map(|t| t.url.clone());
            self.status.set_target(url, guest_ip);
        }
        self.target = target;
        self.resolve_again = !resolved;
        self.target.clone()
    }

    /// The socket address of a TCP target: its literal, or its name looked
    /// up now (and remembered for the connections that follow). `None`
    /// for a name that does not resolve.
    fn address_of(&self, target: &Target) -> Option<std::net::SocketAddr> {
        target.literal().or_else(|| {
            self.client
                .lookup(&target.host, target.port)
                .map_err(|e| log::debug!("pushing to {}: {e}", target.url))
                .ok()
        })
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
        self.status.waiting_for_route();
        self.resolve_again = true;
        Some(NO_ROUTE_POLL)
    }

    /// One POST of `batch` to `target`, within `timeout` (the configured
    /// one when `None`).
    pub fn send(
        &mut self,
        target: &Target,
        batch: &[Arc<Sample>],
        timeout: Option<Duration>,
    ) -> Outcome {
        let url = &target.url;
        output::encode(batch, self.format, &mut self.body);
        let answer = self.client.send(
            Method::POST,
            target,
            &self.headers,
            Some(&self.body),
            timeout,
        );
        // A response cut off mid-way is an error of the client, not an
        // answer: retrying may deliver twice, and the manager de-duplicates
        // on (run_id, seq).
        let otlp = self.format == Format::Otlp;
        match answer {
            Ok(answer) => match answer.status {
                200..=299 => {
                    if otlp {
                        self.partial_success(url);
                    }
                    Outcome::Delivered
                }
                // A refused signature, or samples of another VM: kept and
                // retried (docs/security.md); after a 401 the key is read
                // again first. Without a key, an OTLP receiver's 401 keeps
                // the OTLP rule below (a token that is wrong).
                status @ (401 | 403) if !otlp || self.signing.is_some() => {
                    // A 403 may come from a vm_id the key no longer matches
                    // (a clone whose MMDS changed): read both again too.
                    self.reload_key = self.signing.is_some();
                    Outcome::Retry {
                        error: format!(
                            "{url}: HTTP {status}: {}",
                            refusal_reason(self.client.body())
                        ),
                        retry_after: answer.retry_after.as_deref().and_then(parse_retry_after),
                        transport: false,
                        timed_out: false,
                    }
                }
                // OTLP/HTTP: only these are worth a retry; any other
                // refusal would be refused again (docs/backends.md#opentelemetry).
                429 | 502 | 503 | 504 if otlp => Outcome::Retry {
                    error: format!("{url}: HTTP {}", answer.status),
                    retry_after: answer.retry_after.as_deref().and_then(parse_retry_after),
                    transport: false,
                    timed_out: false,
                },
                status if otlp => Outcome::Refused(status),
                400 | 413 | 422 => Outcome::Refused(answer.status),
                404 => Outcome::NoIngestRoute(format!(
                    "{url}: HTTP 404: this manager has no ingest route"
                )),
                status => Outcome::Retry {
                    error: format!("{url}: HTTP {status}"),
                    retry_after: answer.retry_after.as_deref().and_then(parse_retry_after),
                    transport: false,
                    timed_out: false,
                },
            },
            Err(e) => Outcome::Retry {
                timed_out: matches!(e, ClientError::Timeout(_)),
                error: format!("{url}: {e}"),
                retry_after: None,
                transport: true,
            },
        }
    }

    /// Whether the sender reads its key again before its next request.
    pub fn reloads_key(&self) -> bool {
        self.reload_key
    }

    /// An OTLP receiver's 200 may still refuse some data points: they are
    /// counted in `/health` (`rejected_data_points`) and logged, once per
    /// run of such answers. The batch is delivered either way: sending it
    /// again would be refused again.
    fn partial_success(&mut self, url: &str) {
        let answer = output::otlp::partial_success(self.client.body());
        if answer.is_ok() {
            self.said_unreadable = false;
        }
        match answer {
            Ok(Some(p)) => {
                let msg = format!(
                    "{url}: the receiver refused {} data points: {}",
                    p.rejected, p.message
                );
                if !self.said_partial {
                    log::warn!("{msg}");
                    self.said_partial = true;
                }
                self.status.points_refused(p.rejected, msg);
            }
            Ok(None) => self.said_partial = false,
            // Delivered all the same: the status was 2xx.
            Err(e) => {
                if !self.said_unreadable {
                    log::warn!("{url}: {e}");
                    self.said_unreadable = true;
                }
            }
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
                self.held_since = None;
                let ended = self.status.delivered(n as u64);
                if ended > 0 {
                    log::info!(
                        "delivering again after {ended} failed attempts; {} samples buffered",
                        self.buffer.len()
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
                self.held_since = None;
                let msg = format!(
                    "manager refused samples seq {first}..={last} with HTTP {status}; they are dropped"
                );
                log::error!("{msg}");
                self.status.refused(n as u64, msg);
                self.backoff.reset();
                None
            }
            Outcome::NoIngestRoute(error) => {
                drop(batch);
                let buffered = self.buffer.len();
                if self.status.no_ingest_route(error.clone()) {
                    log::warn!(
                        "{error}; keeping the newest {} samples (now {buffered}) and asking again every {}s; a pull-model manager reads /metrics meanwhile",
                        self.buffer.capacity(),
                        BACKOFF_CAP.as_secs()
                    );
                }
                Some(BACKOFF_CAP)
            }
            Outcome::Retry {
                error,
                retry_after,
                transport,
                ..
            } => {
                drop(batch);
                if transport {
                    self.resolve_again = true;
                }
                let delay = self.backoff.next_delay(retry_after);
                let buffered = self.buffer.len();
                let failure = self.status.failed(error.clone());
                if failure.first {
                    log::warn!("push failed: {error}; keeping {buffered} samples and retrying");
                    self.last_summary = Instant::now();
                } else if self.last_summary.elapsed() >= FAILURE_SUMMARY_EVERY {
                    log::warn!(
                        "push still failing after {} attempts: {error}; {buffered} samples buffered, {} dropped",
                        failure.consecutive,
                        self.buffer.dropped()
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
        let buffer = self.buffer.clone();
        loop {
            let batch = buffer.batch(self.batch_limit, Some(Instant::now()));
            if batch.is_empty() {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let target = self.refresh_target(false);
            let (Some(target), true) = (target, left >= MIN_FLUSH_REQUEST) else {
                drop(batch);
                log::warn!("exiting with {} samples undelivered", buffer.len());
                return;
            };
            let outcome = self.send(&target, batch.samples(), Some(left));
            if self.settle(outcome, batch).is_some() {
                log::warn!("exiting with {} samples undelivered", buffer.len());
                return;
            }
        }
    }
}

/// The reason a manager gave for a refusal: the ingest kit's
/// `{"error": "…"}`, or the start of whatever else it sent.
pub fn refusal_reason(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Refused {
        error: String,
    }
    let text = match serde_json::from_slice::<Refused>(body) {
        Ok(r) => r.error,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let text: String = text
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match text.trim() {
        "" => "no reason given".into(),
        t => t.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::refusal_reason;

    #[test]
    fn a_refusal_reason_is_the_kits_error_or_the_start_of_the_body() {
        assert_eq!(
            refusal_reason(br#"{"error":"signature: none (no Signature-Input)"}"#),
            "signature: none (no Signature-Input)"
        );
        assert_eq!(refusal_reason(b"forbidden\r\nmore"), "forbidden  more");
        assert_eq!(refusal_reason(b""), "no reason given");
        assert_eq!(refusal_reason(&[b'x'; 500]).len(), 200);
    }
}
