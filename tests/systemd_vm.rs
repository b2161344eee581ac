//! The shipped systemd unit under a real systemd 252 as PID 1, in a VM:
//! `systemd/guest-agent.service` (unchanged, with a drop-in shortening its
//! watchdog to 10 s) and `systemd/guest-agent.default` run the static musl
//! agent, sandboxed and unprivileged as shipped. Its URL and VM id come
//! from the kernel command line; it pushes through QEMU user networking
//! (guest 10.0.2.2:PORT is host 127.0.0.1:PORT) to a receiver in this test.
//!
//! One boot checks, in order: enabled in multi-user.target, the unit is
//! `active (running)` through READY=1 with the agent's status line; `/health`
//! answers on 127.0.0.1:8080; samples arrive; `kill -9` of the main process
//! → restarted and pushing again; `kill -STOP` → the watchdog kills and
//! restarts it; `systemctl stop` flushes every sample buffered while the
//! manager refused; the same agent's figures (process count, network,
//! filesystem) under the unit's sandbox equal those without it; a usage
//! error fails the unit without a restart loop; the pull port 0.0.0.0:9000
//! answers; IPv6 and vsock connections fail the same way in the sandbox as
//! outside it; and the journal shows no permission error.
//!
//! Without QEMU, the kernel, busybox or the systemd packages this test says
//! SKIPPED on stderr and passes, unless `CI=true` or
//! `GUEST_AGENT_VM_TEST=require`: then it fails. See
//! `tests/vm_harness/assets.rs` for the environment variables.

// The harness serves several test files; this one uses part of it.
#[path = "vm_harness/systemd.rs"]
mod systemd_image;
#[allow(dead_code)]
mod vm_harness;

use std::time::{Duration, Instant};

use vm_harness::service::{delivered, field, new_run, number, run_samples, secs};
use vm_harness::{Boot, Receiver, Vm};

const INGEST_PATH: &str = "/v1/guest-metrics";
const VM_ID: &str = "vm-systemd";
const NAME: &str = "systemd_unit_is_ready_restarts_on_kill_and_watchdog_and_flushes_on_stop";

/// The JSON after `rc=0` in a marker line.
fn json_after_rc(line: &str, what: &str) -> serde_json::Value {
    let json = line
        .strip_prefix("rc=0")
        .unwrap_or_else(|| panic!("{what} failed: {line}"))
        .trim();
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{what}: {e}: {json}"))
}

#[test]
fn systemd_unit_is_ready_restarts_on_kill_and_watchdog_and_flushes_on_stop() {
    let Some(ready) = systemd_image::ready(NAME) else {
        return;
    };
    let rx = Receiver::start();
    let t0 = Instant::now();
    let mut cmdline = systemd_image::init_cmdline();
    cmdline.push(format!(
        "guest_agent.url=http://{{gateway}}:{}{INGEST_PATH}",
        rx.port()
    ));
    cmdline.push(format!("guest_agent.vm_id={VM_ID}"));
    let mut vm = Vm::start(
        ready.assets,
        ready.initrd,
        Boot {
            name: "systemd",
            scenario: "systemd",
            cmdline,
            watchdog: Duration::from_secs(480),
            qemu_args: Vec::new(),
        },
    );
    let deadline = t0 + Duration::from_secs(460);
    let wait = |n: usize, run: &str| {
        rx.wait_for(deadline, |p| (run_samples(p, run).len() >= n).then_some(()))
            .unwrap_or_else(|| panic!("run {run} did not deliver {n} samples"))
    };
    let mut state = {
        let mut tag = 0;
        move |vm: &mut Vm| {
            tag += 1;
            vm.send(&format!("state {tag}"));
            let (_, s) = vm.wait_marker(&format!("state-{tag}"), deadline);
            let (_, text) = vm.wait_marker(&format!("status-text-{tag}"), deadline);
            (s, text)
        }
    };

    // Boot: multi-user.target reached, the enabled unit active through READY.
    let (_, net) = vm.wait_marker("net-up", deadline);
    let (control_at, control) = vm.wait_marker("control", deadline);
    let (run_a, seq, first_push) = rx
        .wait_for(deadline, |p| new_run(p, &[]))
        .expect("no push from the unit started at boot");
    assert_eq!(seq, 1, "the first sample of a run is seq 1");
    let (s, text) = state(&mut vm);
    assert_eq!(field(&s, "active"), Some("active"), "{s}");
    assert_eq!(field(&s, "sub"), Some("running"), "{s}");
    assert_eq!(field(&s, "type"), Some("notify"), "{s}");
    assert_eq!(field(&s, "restarts"), Some("0"), "{s}");
    let watchdog = format!("{}s", systemd_image::WATCHDOG_SEC);
    assert_eq!(field(&s, "watchdog"), Some(watchdog.as_str()), "{s}");
    // Unprivileged, and still reading the kernel log (snapshot restores).
    assert_ne!(field(&s, "uid"), Some("0"), "DynamicUser: {s}");
    assert!(field(&s, "uid").is_some_and(|u| !u.is_empty()), "{s}");
    assert_eq!(field(&s, "kmsg"), Some("1"), "/dev/kmsg open: {s}");
    // Only a notify message sets the status text systemd shows.
    assert!(
        text.starts_with("collecting every 1s; "),
        "StatusText from the agent: {text:?}"
    );
    vm_harness::report(format_args!(
        "vm systemd: network at guest uptime {}s; control after multi-user.target at {}s \
         ({}; {} after QEMU start); first sample received {} after QEMU start; \
         agent uid {}, dmesg_restrict={}",
        number(&net, "uptime"),
        number(&control, "uptime"),
        field(&control, "system").unwrap_or("?"),
        secs(control_at - vm.started),
        secs(first_push - vm.started),
        field(&s, "uid").unwrap_or("?"),
        field(&s, "dmesg_restrict").unwrap_or("?")
    ));

    // /health on 127.0.0.1:8080, asked by another client in the guest.
    wait(3, &run_a);
    vm.send("health 1");
    let (_, h) = vm.wait_marker("health-1", deadline);
    let health = json_after_rc(&h, "wget /health");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["push_state"], "ok", "{health}");
    let (_, text) = state(&mut vm);
    assert!(
        text.ends_with(": ok") && text.contains(INGEST_PATH),
        "the push state in StatusText: {text:?}"
    );

    // kill -9: Restart=always starts a new process after RestartSec.
    vm.send("kill9");
    let (killed_at, killed) = vm.wait_marker("killed", deadline);
    let (run_b, seq, respawn_push) = rx
        .wait_for(deadline, |p| new_run(p, std::slice::from_ref(&run_a)))
        .expect("systemd did not restart the agent after kill -9");
    assert_eq!(seq, 1, "the restarted agent starts from seq 1");
    let (s, _) = state(&mut vm);
    assert_eq!(field(&s, "restarts"), Some("1"), "{s}");
    assert_eq!(field(&s, "active"), Some("active"), "{s}");
    assert_ne!(field(&s, "pid"), field(&killed, "pid"), "{s}");
    vm_harness::report(format_args!(
        "vm systemd: kill -9 of {} at guest uptime {}s; new run's first sample {} later \
         (RestartSec 1 s + start + first push)",
        field(&killed, "pid").unwrap_or("?"),
        number(&killed, "uptime"),
        secs(respawn_push.saturating_duration_since(killed_at))
    ));

    // kill -STOP: no more watchdog pings; systemd kills and restarts it.
    wait(3, &run_b);
    vm.send("sigstop");
    let (stopped_at, stopped) = vm.wait_marker("stopped-process", deadline);
    let (run_c, seq, healed_push) = rx
        .wait_for(deadline, |p| new_run(p, &[run_a.clone(), run_b.clone()]))
        .expect("the watchdog did not restart the stopped agent");
    assert_eq!(seq, 1);
    let (s, _) = state(&mut vm);
    assert_eq!(field(&s, "restarts"), Some("2"), "{s}");
    assert_eq!(field(&s, "active"), Some("active"), "{s}");
    let watchdog_restart = healed_push.saturating_duration_since(stopped_at);
    let stopped_uptime = number(&stopped, "uptime");
    vm_harness::report(format_args!(
        "vm systemd: SIGSTOP of {} at guest uptime {stopped_uptime}s; the new run's first \
         sample {} later (the watchdog's WatchdogSec {} s at most, RestartSec 1 s, start, \
         first push)",
        field(&stopped, "pid").unwrap_or("?"),
        secs(watchdog_restart),
        systemd_image::WATCHDOG_SEC
    ));

    // Stop: the manager refuses (503, Retry-After an hour), the agent
    // buffers; the manager comes back, and only the SIGTERM flush can
    // deliver what was buffered before the agent exits.
    wait(2, &run_c);
    rx.refuse(true);
    let refused_from = rx
        .wait_for(deadline, |p| {
            p.iter()
                .filter(|p| p.status == 503)
                .flat_map(|p| p.samples.iter().flatten())
                .filter(|s| s.run_id == run_c)
                .map(|s| s.seq)
                .min()
        })
        .expect("no push reached the refusing receiver");
    let mut buffered = 0;
    for tag in 2.. {
        vm.send(&format!("health {tag}"));
        let (_, h) = vm.wait_marker(&format!("health-{tag}"), deadline);
        let health = json_after_rc(&h, "wget /health");
        assert_eq!(health["push_state"], "failing", "{health}");
        buffered = health["buffered"].as_u64().expect("buffered");
        if buffered >= 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never buffered 5 samples"
        );
        // Polling pace only: a sample is collected every second.
        std::thread::sleep(Duration::from_millis(500));
    }
    let (_, text) = state(&mut vm);
    assert!(
        text.contains("push failing, samples kept for retry"),
        "StatusText while the manager refuses: {text:?}"
    );
    rx.refuse(false);
    let stop_sent = Instant::now();
    vm.send("stop");
    let (_, stopped) = vm.wait_marker("stopped", deadline);
    assert_eq!(
        field(&stopped, "rc"),
        Some("0"),
        "systemctl stop: {stopped}"
    );
    assert_eq!(field(&stopped, "agent"), Some("gone"), "{stopped}");
    assert_eq!(field(&stopped, "active"), Some("inactive"), "{stopped}");
    let stop_took = number(&stopped, "to") - number(&stopped, "from");
    let posts = rx.posts();
    let c = run_samples(&posts, &run_c);
    let seqs: Vec<u64> = c.iter().map(|s| s.seq).collect();
    vm_harness::assert_no_gaps("the run stopped by systemctl", &seqs);
    let last = *seqs.last().unwrap();
    assert!(
        last >= refused_from + buffered - 1,
        "the flush delivered every buffered sample: seq {refused_from}.. with {buffered} \
         buffered, delivered up to {last}"
    );
    let flushed_in = delivered(&posts)
        .iter()
        .filter(|p| p.at >= stop_sent)
        .count();
    assert!(
        flushed_in > 0,
        "the buffered samples arrived only after the stop was sent"
    );
    vm_harness::report(format_args!(
        "vm systemd: systemctl stop took {stop_took:.2}s in the guest (TimeoutStopSec 15 s); \
         the flush delivered seq {refused_from}..={last} in {flushed_in} request(s)"
    ));

    // The sandbox changes no figure: the same agent's --once under the
    // unit's sandbox and without it, back to back on the quiet guest.
    vm.send("compare");
    let (_, sandboxed) = vm.wait_marker("once-sandboxed", deadline);
    let (_, plain) = vm.wait_marker("once-plain", deadline);
    let sandboxed = json_after_rc(&sandboxed, "--once in the sandbox");
    let plain = json_after_rc(&plain, "--once without the sandbox");
    for key in [
        "process_count",
        "network_rx_bytes",
        "network_tx_bytes",
        "filesystem_total_kb",
        "filesystem_used_kb",
        "hostname",
        "cpu_count",
        "memory_total_kb",
    ] {
        assert!(
            !sandboxed[key].is_null(),
            "{key} null in the sandbox: {sandboxed}"
        );
        assert_eq!(
            sandboxed[key], plain[key],
            "{key}: sandboxed {sandboxed} vs plain {plain}"
        );
    }
    assert!(
        sandboxed["process_count"].as_u64().unwrap_or(0) > 10,
        "every process counted, not only the agent's own: {sandboxed}"
    );
    vm_harness::report(format_args!(
        "vm systemd: sandboxed and plain --once agree: process_count {}, network rx/tx {}/{}, \
         filesystem {}/{} KiB",
        plain["process_count"],
        plain["network_rx_bytes"],
        plain["network_tx_bytes"],
        plain["filesystem_used_kb"],
        plain["filesystem_total_kb"]
    ));

    // A usage error (a bad flag in GUEST_AGENT_ARGS) fails the unit once.
    vm.send("bad-args");
    let (_, bad) = vm.wait_marker("bad-args", deadline);
    assert_ne!(field(&bad, "rc"), Some("0"), "systemctl start: {bad}");
    assert_eq!(field(&bad, "active"), Some("failed"), "{bad}");
    assert_eq!(field(&bad, "result"), Some("exit-code"), "{bad}");
    assert_eq!(field(&bad, "status"), Some("2"), "{bad}");
    assert_eq!(field(&bad, "restarts"), Some("0"), "no restart loop: {bad}");

    // The pull port on every address (a pulling manager's 0.0.0.0:9000),
    // unprivileged, from the environment file.
    vm.send("port9000");
    let (_, p9000) = vm.wait_marker("port9000", deadline);
    assert_eq!(field(&p9000, "rc"), Some("0"), "systemctl start: {p9000}");
    assert_eq!(field(&p9000, "active"), Some("active"), "{p9000}");
    let (_, h) = vm.wait_marker("port9000-health", deadline);
    let health = json_after_rc(&h, "wget http://GUEST:9000/health");
    assert_eq!(health["status"], "ok", "{health}");

    // AF_INET6 and AF_VSOCK under the sandbox: a push to a port where
    // nothing listens fails as it does without the sandbox.
    vm.send("families");
    let (_, sandboxed) = vm.wait_marker("families-sandboxed", deadline);
    let (_, plain) = vm.wait_marker("families-plain", deadline);
    let errors = |line: &str| -> Vec<String> {
        line.split_once(' ')
            .map_or("", |(_, rest)| rest)
            .split('|')
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect()
    };
    let (in_sandbox, without) = (errors(&sandboxed), errors(&plain));
    assert_eq!(in_sandbox.len(), 2, "one failure per family: {sandboxed}");
    assert_eq!(
        in_sandbox, without,
        "the sandbox changed a connection's outcome"
    );
    for e in &in_sandbox {
        assert!(
            !e.contains("not supported") && !e.contains("not permitted"),
            "{e}"
        );
    }
    vm_harness::report(format_args!(
        "vm systemd: IPv6 and vsock pushes fail alike with and without the sandbox: {}",
        in_sandbox.join("; ")
    ));

    // The journal: READY, the watchdog's kill, the flush, no permission error.
    vm.send("journal");
    vm.wait_marker("journal-end", deadline);
    let lines = vm.lines();
    let begin = lines
        .iter()
        .rposition(|l| l.contains("@@GA journal-begin"))
        .unwrap();
    let journal: Vec<&String> = lines[begin..]
        .iter()
        .take_while(|l| !l.contains("@@GA journal-end"))
        .collect();
    let count = |needle: &str| journal.iter().filter(|l| l.contains(needle)).count();
    for denied in [
        "EPERM",
        "EACCES",
        "Permission denied",
        "Operation not permitted",
    ] {
        assert_eq!(count(denied), 0, "{denied} in the journal: {journal:#?}");
    }
    let timeouts: Vec<&&String> = journal
        .iter()
        .filter(|l| l.contains(&format!("Watchdog timeout (limit {watchdog})")))
        .collect();
    assert_eq!(timeouts.len(), 1, "{journal:#?}");
    // On the guest's clock (the journal's monotonic stamp, the control
    // script's uptime), not the host's: systemd fired between half the
    // watchdog (the last ping was at most that long before the SIGSTOP)
    // and the whole of it after the stop. The margin covers the guest
    // being descheduled under TCG; this is not a speed check.
    let fired_at: f64 = timeouts[0]
        .trim_start_matches('[')
        .split(']')
        .next()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no monotonic stamp: {}", timeouts[0]));
    let after_stop = fired_at - stopped_uptime;
    assert!(
        after_stop > 0.0 && after_stop <= systemd_image::WATCHDOG_SEC as f64 + 5.0,
        "the watchdog fired {after_stop:.2}s after the SIGSTOP (WatchdogSec {watchdog})"
    );
    vm_harness::report(format_args!(
        "vm systemd: the watchdog fired {after_stop:.2}s after the SIGSTOP on the guest's clock \
         (WatchdogSec {watchdog}, pings every {}s)",
        systemd_image::WATCHDOG_SEC / 2
    ));
    assert_eq!(
        count("notifying the service manager at /run/systemd/notify; watchdog pinged every 5s"),
        4,
        "four processes, each notifying: {journal:#?}"
    );
    assert_eq!(count("signal 15: stopping; flushing"), 2, "{journal:#?}");
    assert_eq!(count("Started guest-agent.service"), 4, "{journal:#?}");
    assert_eq!(
        count("listening on http://0.0.0.0:9000"),
        1,
        "the pull port: {journal:#?}"
    );
    assert_eq!(
        count("unknown argument \"--no-such-flag\""),
        1,
        "the usage error, once: {journal:#?}"
    );

    vm.send("off");
    let status = vm.wait_exit(Instant::now() + Duration::from_secs(120));
    let posts = rx.posts();
    vm_harness::assert_wire_contract(&posts, INGEST_PATH);
    let runs = vm_harness::runs(&vm_harness::samples(&delivered(&posts)));
    assert_eq!(
        runs.iter().map(|r| &r.0).collect::<Vec<_>>()[..3],
        [&run_a, &run_b, &run_c],
        "at boot, after kill -9, after the watchdog (then the pull-port run)"
    );
    assert_eq!(runs.len(), 4, "{runs:?}");
    for (run, seqs) in &runs {
        vm_harness::assert_no_gaps(run, seqs);
    }
    for s in vm_harness::samples(&delivered(&posts)) {
        assert_eq!(s.vm_id.as_deref(), Some(VM_ID));
    }
    // The root-only token file reached the unprivileged agent as a
    // credential: every push carries it.
    let bearer = format!("Bearer {}", systemd_image::TOKEN);
    for p in &posts {
        assert_eq!(
            p.headers.get("authorization"),
            Some(&bearer),
            "the token from the credential: {p:?}"
        );
    }
    vm_harness::report(format_args!(
        "vm systemd: wall time {} ({status})",
        secs(t0.elapsed())
    ));
}
