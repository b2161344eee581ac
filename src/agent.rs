//! The running agent: collection on a fixed cadence on the monotonic clock,
//! the sender, the listener and the address report on their own threads,
//! and shutdown. This is where the stages are wired together; none of them
//! knows the others (docs/design.md#data-flow-and-modules).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::collect::Collector;
use crate::config::Config;
use crate::config::settings::buffer_bound;
use crate::deliver::buffer::Buffer;
use crate::deliver::push::Sender;
use crate::error::{Error, Result};
use crate::net::address::source_address;
use crate::sample::{AGENT_VERSION, Sample};
use crate::serve::listener::{self, Listener, View};
use crate::status::{Health, Status};
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
    let mut memory_kb = None;
    loop {
        if stop.wait_until(next) {
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
    let running = start(config)?;
    if let Some(sig) = signals.forever().next() {
        log::info!(
            "signal {sig}: stopping; flushing {} buffered samples (a second signal exits at once)",
            running.view.buffer.len()
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
