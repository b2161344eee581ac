//! The shipped OpenRC service under a real OpenRC, in a VM: busybox init
//! runs `openrc sysinit`, `openrc boot`, `openrc default` as on Alpine, and
//! `openrc/guest-agent` with `openrc/guest-agent.confd` (unchanged, plus the
//! lines an image build appends to conf.d) runs the static musl agent under
//! supervise-daemon. The agent's URL and VM id come from the kernel command
//! line; it pushes through QEMU user networking (guest 10.0.2.2:PORT is host
//! 127.0.0.1:PORT) to a receiver in this test.
//!
//! One boot checks, in order: start at boot in the default runlevel, `rc-service
//! status`, a conf.d setting reaching the process (source `env`), respawn after
//! `kill -9`, the health check restarting a stopped (SIGSTOP) agent, and
//! `rc-service stop` flushing what the agent buffered while the manager refused.
//!
//! Without QEMU, the kernel, busybox or the OpenRC packages this test says
//! SKIPPED on stderr and passes, unless `CI=true` or
//! `GUEST_AGENT_VM_TEST=require`: then it fails. See
//! `tests/vm_harness/assets.rs` for the environment variables.

// The harness serves several test files; this one uses part of it.
#[path = "vm_harness/openrc.rs"]
mod openrc_image;
#[allow(dead_code)]
mod vm_harness;

use std::time::{Duration, Instant};

use vm_harness::service::{delivered, field, new_run, number, run_samples, secs};
use vm_harness::{Boot, Receiver, Vm};

const INGEST_PATH: &str = "/v1/guest-metrics";
const VM_ID: &str = "vm-openrc";
const NAME: &str = "openrc_service_boots_restarts_health_checks_and_stops";

#[test]
fn openrc_service_boots_restarts_health_checks_and_stops() {
    let Some(ready) = openrc_image::ready(NAME) else {
        return;
    };
    let rx = Receiver::start();
    let t0 = Instant::now();
    let mut cmdline = openrc_image::init_cmdline();
    cmdline.push(format!(
        "guest_agent.url=http://{{gateway}}:{}{INGEST_PATH}",
        rx.port()
    ));
    cmdline.push(format!("guest_agent.vm_id={VM_ID}"));
    let mut vm = Vm::start(
        ready.assets,
        ready.initrd,
        Boot {
            name: "openrc",
            scenario: "openrc",
            cmdline,
            watchdog: Duration::from_secs(420),
            qemu_args: Vec::new(),
        },
    );
    let deadline = t0 + Duration::from_secs(400);
    let wait = |n: usize, run: &str| {
        rx.wait_for(deadline, |p| (run_samples(p, run).len() >= n).then_some(()))
            .unwrap_or_else(|| panic!("run {run} did not deliver {n} samples"))
    };

    // Boot: OpenRC reaches the default runlevel and the service pushes.
    let (_, early) = vm.wait_marker("early", deadline);
    let (_, services) = vm.wait_marker("boot-services", deadline);
    let (_, net) = vm.wait_marker("net-up", deadline);
    let (default_at, default) = vm.wait_marker("default", deadline);
    assert_eq!(field(&default, "runlevel"), Some("default"), "{default}");
    let (run_a, seq, first_push) = rx
        .wait_for(deadline, |p| new_run(p, &[]))
        .expect("no push from the service started at boot");
    assert_eq!(seq, 1, "the first sample of a run is seq 1");
    vm_harness::report(format_args!(
        "vm openrc: early init at guest uptime {}s, first boot service at {}s, network at {}s, \
         default runlevel at {}s ({} after QEMU start); first sample received {} after QEMU start",
        number(&early, "uptime"),
        number(&services, "uptime"),
        number(&net, "uptime"),
        number(&default, "uptime"),
        secs(default_at - vm.started),
        secs(first_push - vm.started)
    ));

    // rc-service status.
    vm.send("status 1");
    let (_, status) = vm.wait_marker("status-1", deadline);
    assert!(
        status.starts_with("rc=0") && status.contains("status: started"),
        "rc-service guest-agent status: {status}"
    );

    // conf.d's GUEST_AGENT_INTERVAL reaches the process as environment.
    vm.send("config");
    let (_, env) = vm.wait_marker("env", deadline);
    assert!(
        env.split_whitespace()
            .any(|w| w == "GUEST_AGENT_INTERVAL=1s"),
        "the agent's environment: {env}"
    );
    let (_, json) = vm.wait_marker("print-config", deadline);
    let config: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(config["interval"]["value"], "1s", "{config}");
    assert_eq!(config["interval"]["source"], "env", "{config}");
    assert_eq!(config["vm_id"]["source"], "cmdline", "{config}");
    assert_eq!(config["url"]["source"], "cmdline", "{config}");

    // kill -9: supervise-daemon starts a new process after respawn_delay.
    wait(3, &run_a);
    vm.send("kill9");
    let (killed_at, killed) = vm.wait_marker("killed", deadline);
    let (run_b, seq, respawn_push) = rx
        .wait_for(deadline, |p| new_run(p, std::slice::from_ref(&run_a)))
        .expect("supervise-daemon did not restart the agent after kill -9");
    assert_eq!(seq, 1, "the restarted agent starts from seq 1");
    let respawn = respawn_push.saturating_duration_since(killed_at);
    vm_harness::report(format_args!(
        "vm openrc: kill -9 of {} at guest uptime {}s; new run's first sample {} later \
         (respawn_delay 5 s + start + first push)",
        field(&killed, "pid").unwrap_or("?"),
        number(&killed, "uptime"),
        secs(respawn)
    ));

    // A stopped agent: /health stops answering, the health check restarts it.
    wait(3, &run_b);
    vm.send("sick");
    let (sick_at, sick) = vm.wait_marker("sick", deadline);
    let (run_c, seq, healed_push) = rx
        .wait_for(deadline, |p| new_run(p, &[run_a.clone(), run_b.clone()]))
        .expect("the health check did not restart the stopped agent");
    assert_eq!(seq, 1);
    let healed = healed_push.saturating_duration_since(sick_at);
    vm_harness::report(format_args!(
        "vm openrc: SIGSTOP of {} at guest uptime {}s; health check restart's first sample {} \
         later (up to healthcheck_timer 5 s + the 5 s --health deadline + respawn_delay 5 s)",
        field(&sick, "pid").unwrap_or("?"),
        number(&sick, "uptime"),
        secs(healed)
    ));

    // A stop while the health check is restarting the agent returns as
    // promptly as any stop, and a start brings a new process.
    wait(2, &run_c);
    vm.send("sick-stop");
    vm.wait_marker("sick-again", deadline);
    let (_, stopped) = vm.wait_marker("stopped-in-restart", deadline);
    assert!(
        stopped.starts_with("rc=0"),
        "rc-service guest-agent stop: {stopped}"
    );
    let restart_stop_took = number(&stopped, "to") - number(&stopped, "from");
    // Not a speed check: supervise-daemon waiting out its whole retry
    // schedule (TERM/15/KILL/5) on an exited agent is the failure looked for.
    assert!(
        restart_stop_took < 15.0,
        "a stop during the health check's restart waited out the retry schedule: {stopped}"
    );
    vm.send("status 2");
    let (_, status) = vm.wait_marker("status-2", deadline);
    assert!(
        status.contains("status: stopped"),
        "after the stop: {status}"
    );
    vm.send("start");
    let (_, started) = vm.wait_marker("started", deadline);
    assert!(
        started.starts_with("rc=0"),
        "rc-service guest-agent start: {started}"
    );
    let (run_d, seq, _) = rx
        .wait_for(deadline, |p| {
            new_run(p, &[run_a.clone(), run_b.clone(), run_c.clone()])
        })
        .expect("no push after rc-service guest-agent start");
    assert_eq!(seq, 1);
    vm_harness::report(format_args!(
        "vm openrc: rc-service stop during the health check's restart took {restart_stop_took:.2}s \
         in the guest"
    ));

    // Stop: the manager refuses (503, Retry-After an hour), the agent
    // buffers; the manager comes back, and only the SIGTERM flush can
    // deliver what was buffered before the agent exits.
    wait(2, &run_d);
    rx.refuse(true);
    let refused_from = rx
        .wait_for(deadline, |p| {
            p.iter()
                .filter(|p| p.status == 503)
                .flat_map(|p| p.samples.iter().flatten())
                .filter(|s| s.run_id == run_d)
                .map(|s| s.seq)
                .min()
        })
        .expect("no push reached the refusing receiver");
    let mut buffered = 0;
    for tag in 1.. {
        vm.send(&format!("health {tag}"));
        let (_, h) = vm.wait_marker(&format!("health-{tag}"), deadline);
        assert!(
            h.starts_with("rc=0"),
            "guest-agent --health in the guest: {h}"
        );
        let json = h.trim_start_matches("rc=0").trim();
        let health: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
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
    rx.refuse(false);
    let stop_sent = Instant::now();
    vm.send("stop");
    let (_, stopped) = vm.wait_marker("stopped", deadline);
    assert!(
        stopped.starts_with("rc=0"),
        "rc-service guest-agent stop: {stopped}"
    );
    assert_eq!(field(&stopped, "agent"), Some("gone"), "{stopped}");
    let stop_took = number(&stopped, "to") - number(&stopped, "from");
    // Not a speed check: past the retry schedule's TERM wait (15 s),
    // supervise-daemon would have had to SIGKILL the agent.
    assert!(
        stop_took < 15.0,
        "the agent did not exit on SIGTERM within the retry schedule's 15 s: {stopped}"
    );
    let posts = rx.posts();
    let c = run_samples(&posts, &run_d);
    let seqs: Vec<u64> = c.iter().map(|s| s.seq).collect();
    vm_harness::assert_no_gaps("the run stopped by rc-service", &seqs);
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
        "vm openrc: rc-service stop took {stop_took:.2}s in the guest (retry TERM/15/KILL/5); \
         the flush delivered seq {refused_from}..={last} in {flushed_in} request(s)"
    ));

    // The log: the agent's own lines and the health check's.
    vm.send("log");
    vm.wait_marker("log-end", deadline);
    let lines = vm.lines();
    let begin = lines
        .iter()
        .rposition(|l| l.contains("@@GA log-begin"))
        .unwrap();
    let log: Vec<&String> = lines[begin..]
        .iter()
        .take_while(|l| !l.contains("@@GA log-end"))
        .collect();
    let has = |needle: &str| log.iter().any(|l| l.contains(needle));
    assert!(
        has(
            "openrc: health check failed (unhealthy: http://127.0.0.1:8080/health: no answer within 5s)"
        ),
        "{log:#?}"
    );
    assert!(has("signal 15: stopping; flushing"), "{log:#?}");
    assert_eq!(
        log.iter()
            .filter(|l| l.contains(" started: every 1s"))
            .count(),
        4,
        "four agent processes, each with conf.d's interval: {log:#?}"
    );

    vm.send("off");
    let status = vm.wait_exit(Instant::now() + Duration::from_secs(60));
    let posts = rx.posts();
    vm_harness::assert_wire_contract(&posts, INGEST_PATH);
    let runs = vm_harness::runs(&vm_harness::samples(&delivered(&posts)));
    assert_eq!(
        runs.iter().map(|r| &r.0).collect::<Vec<_>>(),
        vec![&run_a, &run_b, &run_c, &run_d],
        "four processes: at boot, after kill -9, after the health check, after the start"
    );
    for (run, seqs) in &runs {
        vm_harness::assert_no_gaps(run, seqs);
    }
    vm_harness::report(format_args!(
        "vm openrc: wall time {} ({status})",
        secs(t0.elapsed())
    ));
}
