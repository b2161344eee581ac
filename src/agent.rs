//! The running agent: collection on a fixed cadence on the monotonic clock,
//! the sender and the listener on their own threads, and shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Collector;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::push::Sender;
use crate::status::Shared;
use crate::stop::Stop;

/// An agent running in this process.
pub struct Running {
    shared: Arc<Shared>,
    stop: Arc<Stop>,
    collector: Option<JoinHandle<()>>,
    sender: Option<JoinHandle<()>>,
    listener: Option<crate::listener::Listener>,
}

/// Starts collecting (first sample at once), pushing and listening.
pub fn start(config: Config) -> Result<Running> {
    let collector = Collector::new(&config.proc_root, config.vm_id.clone())?;
    let shared = Shared::new(&config);
    // Known before the first sample when the target is an address; a host
    // name is looked up later by the sender.
    shared.status().guest_ip = crate::cli::guest_ip(&config);
    let stop = Arc::new(Stop::new());

    // A listener that cannot bind (port taken) must not stop pushing.
    let listener = config.listen.and_then(|addr| {
        crate::listener::spawn(addr, shared.clone())
            .map_err(|e| log::error!("listener: {e}; going on without it"))
            .ok()
    });

    let sender = match Sender::new(&config, shared.clone(), collector.run_id()) {
        Some(sender) => {
            let stop = stop.clone();
            let t = std::thread::Builder::new()
                .name("push".into())
                .spawn(move || sender.run(&stop))
                .map_err(|source| Error::Startup {
                    what: "the push thread",
                    source,
                })?;
            Some(t)
        }
        None => None,
    };
    let interval = config.interval;
    let restorer = crate::restore::Restorer::new(&config);
    let (sh, st) = (shared.clone(), stop.clone());
    let collector = std::thread::Builder::new()
        .name("collect".into())
        .spawn(move || collect_loop(collector, restorer, &sh, &st, interval))
        .map_err(|source| Error::Startup {
            what: "the collection thread",
            source,
        })?;
    log::info!(
        "guest-agent {} started: every {}, {}",
        crate::AGENT_VERSION,
        humantime::format_duration(interval),
        config
            .url
            .as_ref()
            .map_or("pushing off".to_string(), |u| format!(
                "pushing to {}",
                u.as_str()
            ))
    );
    Ok(Running {
        shared,
        stop,
        collector: Some(collector),
        sender,
        listener,
    })
}

impl Running {
    /// The state shared with the listener.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The listener's bound address, if it runs.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().map(|l| l.local_addr())
    }

    /// The stop handle: triggering it ends collection.
    pub fn stop_handle(&self) -> Arc<Stop> {
        self.stop.clone()
    }

    /// Stops collecting, flushes the buffer for at most the timeout, stops
    /// the listener, and waits for every thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.trigger();
        if let Some(t) = self.collector.take() {
            let _ = t.join();
        }
        self.shared.buffer.close();
        if let Some(t) = self.sender.take() {
            let _ = t.join();
        }
        if let Some(l) = self.listener.take() {
            l.stop();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown();
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
/// (docs/snapshots.md).
fn collect_loop(
    mut collector: Collector,
    mut restorer: crate::restore::Restorer,
    shared: &Shared,
    stop: &Stop,
    interval: Duration,
) {
    let mut next = Instant::now();
    let mut seq = 0;
    let settle = crate::restore::settle(interval);
    loop {
        if stop.wait_until(next) {
            return;
        }
        let mut sample = collector.collect();
        if restorer.is_watching() {
            // Stopping during the wait still records the sample.
            stop.wait(settle);
            if restorer.check(&mut collector, shared) {
                collector.relabel(&mut sample);
                seq = 0;
            }
        }
        seq += 1;
        sample.seq = seq;
        sample.guest_ip = shared.status().guest_ip.clone();
        let errors = collector
            .take_failures_changed()
            .then(|| collector.failures());
        shared.record(sample, errors);

        next += interval;
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

/// Runs until SIGTERM or SIGINT, then stops as [`Running::stop`] does.
pub fn run(config: Config) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(|source| {
        Error::Startup {
            what: "the SIGTERM/SIGINT handler",
            source,
        }
    })?;
    let running = start(config)?;
    if let Some(sig) = signals.forever().next() {
        log::info!(
            "signal {sig}: stopping; flushing {} buffered samples",
            running.shared().buffer.len()
        );
    }
    running.stop();
    Ok(())
}
