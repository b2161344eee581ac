//! The running agent: collection on a fixed cadence on the monotonic clock,
//! the sender, the listener and the address report on their own threads,
//! and shutdown. This is where the stages are wired together; none of them
//! knows the others (docs/design.md#data-flow-and-modules).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::collect::Collector;
use crate::config::Config;
use crate::config::settings::buffer_bound;
use crate::deliver::buffer::Buffer;
use crate::deliver::push::Sender;
use crate::error::{Error, Result};
use crate::net::address::source_address;
use crate::notify::Notifier;
use crate::sample::{AGENT_VERSION, Sample};
use crate::serve::listener::{self, Listener, View};
use crate::status::{BufferFigures, Health, PushState, Status};
use crate::stop::Stop;
use crate::vm::guest_ip::{self, Reporter};
use crate::vm::restore::{self, Restorer};

/// An agent running in this process.
pub struct Running {
    view: View,
    stop: Arc<Stop>,
    collector: Option<JoinHandle<()>>,
    sender: Option<JoinHandle<()>>,
    listener: Option<Listener>,
    guest_ip: Option<JoinHandle<()>>,
}

/// Starts collecting (first sample at once), pushing and listening. If a
/// thread cannot be started, whatever did start is stopped again before the
/// error is returned.
pub fn start(config: Config) -> Result<Running> {
    start_with(config, None)
}

/// [`start`], telling a service manager (docs/systemd.md) through
/// `notifier`: ready once the listener is bound and the first sample
/// collected, the push state as it changes, and the watchdog from the
/// collection loop.
fn start_with(config: Config, notifier: Option<Arc<Mutex<Notifier>>>) -> Result<Running> {
    let collector =
        Collector::new(&config.proc_root, config.vm_id.clone())?.with_sys_root(&config.sys_root);
    let status = Arc::new(Status::new(
        config.interval,
        config.url.is_some(),
        config.errors.clone(),
        guest_ip::initial_report(&config),
    ));
    let buffer = Arc::new(Buffer::new(config.buffer, config.buffer_max_bytes));
    // Known before the first sample when the target is an address; a host
    // name is looked up later, by the sender's thread.
    let guest_ip = config
        .resolved_target()
        .and_then(|t| t.literal())
        .and_then(|a| source_address(a).ok())
        .map(|ip| ip.to_string());
    status.set_target(None, guest_ip);
    let view = View {
        status: status.clone(),
        buffer: buffer.clone(),
    };
    // From here on, dropping `running` (an early return) stops every thread
    // started so far: none is left waiting on a buffer nobody fills.
    let mut running = Running {
        view: view.clone(),
        stop: Arc::new(Stop::new()),
        collector: None,
        sender: None,
        listener: None,
        guest_ip: None,
    };

    // A listener that cannot bind (port taken) must not stop pushing.
    running.listener = config.listen.and_then(|addr| {
        listener::spawn(addr, view)
            .map_err(|e| log::error!("listener: {e}; going on without it"))
            .ok()
    });

    let sender = Sender::new(&config, status.clone(), buffer.clone(), collector.run_id())
        .map(Mutex::new)
        .map(Arc::new);
    if let Some(sender) = sender.clone() {
        let stop = running.stop.clone();
        running.sender = Some(spawn("the push thread", "push", move || {
            Sender::run(&sender, &stop)
        })?);
    }
    if let Some(reporter) = Reporter::new(&config, status.clone()) {
        let stop = running.stop.clone();
        running.guest_ip = Some(spawn("the guest-address thread", "guest-ip", move || {
            reporter.run(&stop)
        })?);
    }
    let interval = config.interval;
    let keep_detail = config.format.needs_detail();
    let restorer = Restorer::new(&config);
    let stop = running.stop.clone();
    running.collector = Some(spawn("the collection thread", "collect", move || {
        let out = Out {
            status: &status,
            keep_detail,
            // With pushing off nothing would ever take a sample out of the
            // buffer, which would only count drops.
            buffer: sender.is_some().then_some(&*buffer),
            sender: sender.as_deref(),
            notifier: notifier.as_deref(),
            interval,
        };
        collect_loop(collector, restorer, &out, &stop, interval)
    })?);
    log::info!(
        "guest-agent {AGENT_VERSION} started: every {}, {}",
        humantime::format_duration(interval),
        config
            .url
            .as_ref()
            .map_or("pushing off".to_string(), |u| format!(
                "pushing to {}",
                u.as_str()
            ))
    );
    Ok(running)
}

fn spawn(
    what: &'static str,
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|source| Error::Startup { what, source })
}

impl Running {
    /// What `/health` would say now.
    pub fn health(&self) -> Health {
        self.view.health()
    }

    /// The latest sample, as `/metrics` would serve it.
    pub fn latest(&self) -> Option<Arc<Sample>> {
        self.view.status.latest()
    }

    /// The listener's bound address, if it runs.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().map(|l| l.local_addr())
    }

    /// Stops collecting, flushes the buffer until the request timeout has
    /// passed since this call, stops the listener, and waits for every
    /// thread. Returns what `/health` says after all that.
    pub fn stop(mut self) -> Health {
        self.shutdown();
        self.view.health()
    }

    fn shutdown(&mut self) {
        self.stop.trigger();
        if let Some(t) = self.collector.take() {
            let _ = t.join();
        }
        self.view.buffer.close();
        if let Some(t) = self.sender.take() {
            let _ = t.join();
        }
        if let Some(l) = self.listener.take() {
            l.stop();
        }
        if let Some(t) = self.guest_ip.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Where the collection thread hands each sample: the status, the buffer
/// (when pushing), and the sender for a sample it sends itself.
struct Out<'a> {
    status: &'a Status,
    /// Whether buffered samples keep their detail (the push format carries
    /// it); otherwise only the status keeps the latest one.
    keep_detail: bool,
    buffer: Option<&'a Buffer>,
    sender: Option<&'a Mutex<Sender>>,
    /// The service manager, told of readiness, the push state and that
    /// collection keeps its schedule (the watchdog).
    notifier: Option<&'a Mutex<Notifier>>,
    interval: Duration,
}

impl Out<'_> {
    fn notifier(&self) -> Option<MutexGuard<'_, Notifier>> {
        // Never poisoned in the release build (panic = abort).
        self.notifier
            .map(|n| n.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Tells the service manager the push state if it changed since
    /// `shown` (the sender's thread changes it too: it is seen here at the
    /// next wake-up of this loop). With `ready`, says READY=1 with it.
    fn notify_state(&self, shown: &mut Option<PushState>, ready: bool) {
        let Some(mut n) = self.notifier() else {
            return;
        };
        let state = self.status.push_state();
        if !ready && *shown == Some(state) {
            return;
        }
        *shown = Some(state);
        let line = status_line(&self.status.health(BufferFigures::default()), self.interval);
        if ready {
            n.ready(&line);
        } else {
            n.status(&line);
        }
    }
}

/// The one line `systemctl status` shows for the agent: its cadence and
/// where delivery stands.
fn status_line(h: &Health, interval: Duration) -> String {
    let every = humantime::format_duration(interval);
    let error = h.last_error.as_deref().unwrap_or("none");
    let target = h.push_target.as_deref().unwrap_or("the manager");
    match h.push_state {
        PushState::Off => format!("collecting every {every}; pushing off"),
        PushState::Waiting => format!(
            "collecting every {every}; push waiting: {}",
            h.last_error.as_deref().unwrap_or("no request yet")
        ),
        PushState::Ok => format!("collecting every {every}; pushing to {target}: ok"),
        PushState::Failing => {
            format!("collecting every {every}; push failing, samples kept for retry: {error}")
        }
        PushState::Rejecting => {
            format!("collecting every {every}; the manager refuses the samples: {error}")
        }
        PushState::NoIngestRoute => format!(
            "collecting every {every}; the manager has no ingest route yet (404), samples kept"
        ),
    }
}

/// Sleeps until `next` or the stop (true when stopped), pinging the
/// service manager's watchdog whenever a ping falls due meanwhile. The
/// ping is what says "collection keeps its schedule", so it is sent only
/// while this loop waits ahead of its next collection: a collection that
/// hangs, or keeps overrunning its interval, stops the pings, and the
/// service manager restarts the agent (docs/systemd.md#the-watchdog).
///
/// Each wake-up also tells the service manager of a push state the
/// sender's thread changed meanwhile (once READY was said: `shown`).
fn wait_for_next(stop: &Stop, next: Instant, out: &Out<'_>, shown: &mut Option<PushState>) -> bool {
    loop {
        if shown.is_some() {
            out.notify_state(shown, false);
        }
        let now = Instant::now();
        if now >= next {
            return stop.is_set();
        }
        let wake = match out.notifier() {
            Some(mut n) => {
                n.ping_if_due(now);
                n.ping_due(now).map_or(next, |due| due.min(next))
            }
            None => next,
        };
        if stop.wait_until(wake) {
            return true;
        }
    }
}

/// Collects every `interval` from the first tick, on the monotonic clock, so
/// samples do not drift. If the loop falls more than an interval behind (the
/// VM was paused, or restored from a snapshot) it resumes from now instead of
/// bursting out the missed samples.
///
/// A sample is numbered only after a check for a snapshot restore made a
/// moment after its collection, so that one collected in a clone before the
/// kernel has logged the VM fork is not numbered in the parent's run
/// (docs/snapshots.md#timing).
///
/// When nothing else waits for delivery and the sender is idle, the sample
/// is sent from this thread, within the time left before the next one, so
/// that the sender's thread is not woken for it
/// (docs/performance.md#one-wake-up-per-sample).
fn collect_loop(
    mut collector: Collector,
    mut restorer: Restorer,
    out: &Out<'_>,
    stop: &Stop,
    interval: Duration,
) {
    let mut next = Instant::now();
    let mut seq = 0;
    let settle = restore::settle(interval);
    let mut shown_state = None;
    let mut memory_kb = None;
    loop {
        if wait_for_next(stop, next, out, &mut shown_state) {
            return;
        }
        let mut sample = collector.collect();
        if restorer.is_watching() {
            // Stopping during the wait still records the sample.
            stop.wait(settle);
            if restorer.check(&mut collector, out.status) {
                collector.relabel(&mut sample);
                seq = 0;
            }
        }
        seq += 1;
        sample.seq = seq;
        sample.guest_ip = out.status.guest_ip();
        let errors = collector
            .take_failures_changed()
            .then(|| collector.failures());
        next += interval;
        // The sender's lock is free unless its thread is sending.
        let direct = out
            .sender
            .and_then(|s| s.try_lock().ok())
            .filter(|s| s.may_send_directly(Instant::now()));
        let detail = if out.keep_detail {
            None
        } else {
            sample.detail.take()
        };
        // The byte bound follows the memory the guest can use now (a
        // balloon, hot-plug: docs/design.md#delivery).
        // A total of 0 is no figure to size a buffer by.
        if let (Some(buffer), Some(kb)) = (out.buffer, sample.memory_total_kb)
            && kb > 0
            && memory_kb != Some(kb)
        {
            memory_kb = Some(kb);
            let bound = buffer_bound(kb);
            if bound != buffer.max_bytes() {
                log::debug!("buffer bound {bound} bytes for {kb} KiB of usable memory");
                buffer.set_max_bytes(bound);
            }
        }
        let (sample, batch) = match out.buffer {
            Some(buffer) => buffer.push_claiming(sample, direct.is_some()),
            None => (Arc::new(sample), None),
        };
        out.status.collected(sample, detail, errors);
        // The listener was bound before this thread started: with the
        // first sample collected the agent is ready, whatever the network
        // does with it.
        let first = seq == 1 && shown_state.is_none();
        out.notify_state(&mut shown_state, first);
        if let (Some(mut direct), Some(batch)) = (direct, batch) {
            let budget = next.saturating_duration_since(Instant::now()) / 2;
            direct.send_directly(batch, budget);
        }

        let now = Instant::now();
        if now > next + interval {
            let behind = (now - next).as_millis() / interval.as_millis().max(1);
            log::warn!(
                "collection fell {behind} intervals behind (VM paused or restored?); resuming from now"
            );
            next = now;
        }
    }
}

/// Runs until SIGTERM or SIGINT, then stops as [`Running::stop`] does. A
/// second signal during the flush ends the process at once (exit status
/// 128 + the signal, as a shell reports a killed process).
pub fn run(config: Config) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(|source| {
        Error::Startup {
            what: "the SIGTERM/SIGINT handler",
            source,
        }
    })?;
    let notifier = Notifier::from_env().map(Mutex::new).map(Arc::new);
    let running = start_with(config, notifier.clone())?;
    if let Some(sig) = signals.forever().next() {
        let buffered = running.view.buffer.len();
        if let Some(n) = &notifier {
            n.lock()
                .unwrap_or_else(|p| p.into_inner())
                .stopping(&format!("stopping: flushing {buffered} buffered samples"));
        }
        log::info!(
            "signal {sig}: stopping; flushing {buffered} buffered samples (a second signal exits at once)"
        );
    }
    let handle = signals.handle();
    let second = spawn("the second-signal watcher", "signals", move || {
        if let Some(sig) = signals.forever().next() {
            log::warn!("signal {sig} again: exiting without finishing the flush");
            std::process::exit(128 + sig);
        }
    });
    if let Err(e) = second {
        log::warn!("{e}; a second signal will not cut the flush short");
    }
    running.stop();
    handle.close();
    Ok(())
}
