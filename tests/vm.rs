//! End to end in a real VM: QEMU's microvm machine under TCG boots Debian's
//! cloud kernel with a busybox initramfs holding the static musl
//! `guest-agent`, which takes its configuration from the kernel command line
//! only and pushes through QEMU user networking (guest 10.0.2.2:PORT is host
//! 127.0.0.1:PORT) to a receiver in this test.
//!
//! Without QEMU, the kernel or busybox these tests say SKIPPED on stderr and
//! pass, unless `CI=true` or `GUEST_AGENT_VM_TEST=require`: then they fail.
//! See `tests/vm_harness/assets.rs` for the environment variables.

mod vm_harness;

use std::path::Path;
use std::time::{Duration, Instant};

use guest_agent::Sample;
use vm_harness::qemu::{CPUS, MEMORY_MIB, marker};
use vm_harness::{Boot, Receiver, Vm};

const INGEST_PATH: &str = "/v1/guest-metrics";
const GUEST_IP: &str = "10.0.2.15";

/// The agent's configuration, as a VM manager would put it in boot_args.
fn agent_cmdline(port: u16, vm_id: &str) -> Vec<String> {
    vec![
        format!("guest_agent.url=http://{{gateway}}:{port}{INGEST_PATH}"),
        "guest_agent.interval=1s".into(),
        format!("guest_agent.vm_id={vm_id}"),
        "guest_agent.listen=off".into(),
    ]
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// The checks every sample from these VMs passes: identity and shape.
fn assert_vm_sample(s: &Sample, vm_id: &str) {
    assert_eq!(s.schema, 1);
    assert_eq!(s.vm_id.as_deref(), Some(vm_id), "{s:?}");
    assert_eq!(s.hostname.as_deref(), Some("ga-vm"), "{s:?}");
    assert_eq!(s.cpu_count, Some(CPUS), "cpu_count must be -smp: {s:?}");
    let total = s.memory_total_kb.expect("memory_total_kb");
    assert!(
        (150 * 1024..=MEMORY_MIB * 1024).contains(&total),
        "MemTotal {total} KiB is not plausible for -m {MEMORY_MIB}"
    );
    let avail = s.memory_available_kb.expect("memory_available_kb");
    assert!(avail <= total && avail > 0, "{s:?}");
    assert_eq!(s.memory_used_kb, Some(total - avail));
    for pct in [
        s.cpu_usage_percent,
        s.cpu_iowait_percent,
        s.cpu_steal_percent,
        s.memory_usage_percent,
    ] {
        let pct = pct.expect("percentages present");
        assert!((0.0..=100.0).contains(&pct), "{s:?}");
    }
    assert!(s.boot_id.is_some() && s.process_count.is_some_and(|n| n > 5));
    // The microvm has PSI (CONFIG_PSI=y, not disabled by default).
    assert!(s.pressure_cpu_some_avg10.is_some(), "{s:?}");
}

/// Boots, gets a DHCP lease, runs `guest-agent --once` with its
/// configuration from the kernel command line: no push, but the `{gateway}`
/// URL is resolved from the guest's own /proc/net/route, so the guest
/// address comes out right.
#[test]
fn vm_once_sees_the_guest() {
    let Some(ready) = vm_harness::ready("vm_once_sees_the_guest") else {
        return;
    };
    let vm_id = "vm-once";
    let t0 = Instant::now();
    let mut vm = Vm::start(
        ready.assets,
        ready.initrd,
        Boot {
            name: "once",
            scenario: "once",
            // Port 9 (discard): nothing is sent by --once.
            cmdline: agent_cmdline(9, vm_id),
            watchdog: Duration::from_secs(90),
            qemu_args: Vec::new(),
        },
    );
    let deadline = t0 + Duration::from_secs(60);
    let (booted, _) = vm.wait_marker("boot", deadline);
    let (net, net_line) = vm.wait_marker("net-up", deadline);
    assert!(net_line.contains(&format!("ip={GUEST_IP}/")), "{net_line}");
    let (_, code) = vm.wait_marker("once-exit", deadline);
    assert_eq!(code, "0", "guest-agent --once failed in the guest");
    let (done, json) = vm.wait_marker("once-json", deadline);
    let sample: Sample = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    vm_harness::report(format_args!(
        "vm once: init at {}, network at {}, --once sample at {}",
        secs(booted - vm.started),
        secs(net - vm.started),
        secs(done - vm.started)
    ));
    assert_vm_sample(&sample, vm_id);
    assert_eq!(sample.seq, 1);
    assert_eq!(sample.guest_ip.as_deref(), Some(GUEST_IP));
    vm.send("off");
    let status = vm.wait_exit(Instant::now() + Duration::from_secs(30));
    vm_harness::report(format_args!(
        "vm once: wall time {} ({status})",
        secs(t0.elapsed())
    ));
}

/// Captures the guest's /proc files into `tests/fixtures/vm-capture/` (run by
/// hand: `cargo test --test vm -- --ignored capture`; the committed fixture
/// `tests/fixtures/vm/` was made from it).
#[test]
#[ignore = "writes a fixture; run by hand"]
fn capture_vm_proc_fixture() {
    let Some(ready) = vm_harness::ready("capture_vm_proc_fixture") else {
        return;
    };
    // A small scratch disk, as vda, so diskstats has a whole disk with I/O.
    let disk = ready.assets.cache.join("capture-disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(8 << 20))
        .expect("create the scratch disk");
    let mut vm = Vm::start(
        ready.assets,
        ready.initrd,
        Boot {
            name: "capture",
            scenario: "capture",
            cmdline: agent_cmdline(9, "vm-fixture"),
            watchdog: Duration::from_secs(90),
            qemu_args: vec![
                "-drive".into(),
                format!("file={},if=none,id=d0,format=raw", disk.display()),
                "-device".into(),
                "virtio-blk-device,drive=d0".into(),
            ],
        },
    );
    vm.wait_marker("ready", Instant::now() + Duration::from_secs(60));
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vm-capture");
    let mut current: Option<(String, Vec<String>)> = None;
    let mut written = Vec::new();
    for line in vm.lines() {
        match (marker(&line), &mut current) {
            (Some(m), None) if m.starts_with("file ") => {
                current = Some((m["file ".len()..].to_string(), Vec::new()));
            }
            (Some("end"), Some(_)) => {
                let (name, body) = current.take().unwrap();
                let path = out.join(&name);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                let text: String = body.iter().map(|l| format!("{l}\n")).collect();
                std::fs::write(&path, text).unwrap();
                written.push(name);
            }
            (None, Some((_, body))) => body.push(line),
            _ => {}
        }
    }
    vm.send("off");
    vm.wait_exit(Instant::now() + Duration::from_secs(30));
    vm_harness::report(format_args!("captured into {}: {written:?}", out.display()));
    assert!(written.iter().any(|n| n == "meminfo"));
}

/// One line per sample for the report: seq, CPU and guest uptime.
fn trace(samples: &[Sample]) -> String {
    samples
        .iter()
        .map(|s| {
            format!(
                "#{}:{:.0}%@{}s",
                s.seq,
                s.cpu_usage_percent.unwrap_or(f64::NAN),
                s.uptime_seconds.unwrap_or(0)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Boot, DHCP, then the agent with its configuration from the kernel
/// command line only: `{gateway}` resolves from the guest's routing table to
/// 10.0.2.2, which QEMU hands to this receiver on host loopback. Then two
/// CPU burners run in the guest, and the pushed CPU figure follows them up
/// and down.
#[test]
fn vm_pushes_samples_that_follow_cpu_load() {
    let Some(ready) = vm_harness::ready("vm_pushes_samples_that_follow_cpu_load") else {
        return;
    };
    let rx = Receiver::start();
    let vm_id = "vm-push";
    let t0 = Instant::now();
    let mut vm = Vm::start(
        ready.assets,
        ready.initrd,
        Boot {
            name: "push",
            scenario: "push",
            cmdline: agent_cmdline(rx.port(), vm_id),
            watchdog: Duration::from_secs(120),
            qemu_args: Vec::new(),
        },
    );
    let deadline = t0 + Duration::from_secs(100);
    let (booted, _) = vm.wait_marker("boot", deadline);
    let (net, _) = vm.wait_marker("net-up", deadline);
    let (agent, _) = vm.wait_marker("agent-started", deadline);
    let first = rx
        .wait_for(deadline, |p| p.first().map(|p| p.at))
        .expect("no push arrived");
    vm_harness::report(format_args!(
        "vm push: init at {}, network at {}, agent started at {}, first sample received at {} \
         (boot-to-first-sample)",
        secs(booted - vm.started),
        secs(net - vm.started),
        secs(agent - vm.started),
        secs(first - vm.started)
    ));

    let count =
        |n: usize| move |p: &[vm_harness::Post]| (vm_harness::samples(p).len() >= n).then_some(());
    rx.wait_for(deadline, count(3))
        .expect("fewer than 3 samples arrived");

    // Load: two busy loops on the two vCPUs.
    let before_burn = vm_harness::samples(&rx.posts()).len() as u64;
    vm.send("burn");
    vm.wait_marker("burning", deadline);
    let high = rx
        .wait_for(deadline, |p| {
            let s = vm_harness::samples(p);
            let high: Vec<u64> = s
                .iter()
                .filter(|s| s.seq > before_burn + 1 && s.cpu_usage_percent.unwrap() > 50.0)
                .map(|s| s.seq)
                .collect();
            (high.len() >= 2).then_some(high)
        })
        .unwrap_or_else(|| {
            panic!(
                "cpu_usage_percent never rose above 50% twice under load: {}",
                trace(&vm_harness::samples(&rx.posts()))
            )
        });
    let before_cool = vm_harness::samples(&rx.posts()).len() as u64;
    vm.send("cool");
    vm.wait_marker("cooled", deadline);
    let low = rx
        .wait_for(deadline, |p| {
            vm_harness::samples(p)
                .iter()
                .find(|s| s.seq > before_cool + 1 && s.cpu_usage_percent.unwrap() < 30.0)
                .map(|s| s.seq)
        })
        .unwrap_or_else(|| {
            panic!(
                "cpu_usage_percent never fell below 30% after the load: {}",
                trace(&vm_harness::samples(&rx.posts()))
            )
        });
    vm.send("off");
    let status = vm.wait_exit(Instant::now() + Duration::from_secs(30));

    let posts = rx.posts();
    vm_harness::assert_wire_contract(&posts, INGEST_PATH);
    let samples = vm_harness::samples(&posts);
    for s in &samples {
        assert_vm_sample(s, vm_id);
        assert_eq!(s.guest_ip.as_deref(), Some(GUEST_IP), "{s:?}");
    }
    let runs = vm_harness::runs(&samples);
    assert_eq!(runs.len(), 1, "one agent process, one run_id: {runs:?}");
    vm_harness::assert_no_gaps("the run", &runs[0].1);
    assert!(
        samples.windows(2).all(|w| w[0].boot_id == w[1].boot_id),
        "one boot"
    );
    vm_harness::report(format_args!(
        "vm push: {} samples in {} POSTs; above 50% at seq {high:?}, below 30% again at seq {low}",
        samples.len(),
        posts.len()
    ));
    vm_harness::report(format_args!("vm push: {}", trace(&samples)));
    vm_harness::report(format_args!(
        "vm push: wall time {} ({status})",
        secs(t0.elapsed())
    ));
}

/// The agent starts before the network (no default route yet), buffers, and
/// delivers every sample from seq 1 once DHCP brings the route; killed with
/// SIGKILL, it is restarted by init's respawn loop and pushes again under a
/// new run_id from seq 1.
#[test]
fn vm_buffers_until_the_network_and_restarts_under_a_new_run() {
    let Some(ready) =
        vm_harness::ready("vm_buffers_until_the_network_and_restarts_under_a_new_run")
    else {
        return;
    };
    let rx = Receiver::start();
    let vm_id = "vm-late-net";
    let t0 = Instant::now();
    let mut cmdline = agent_cmdline(rx.port(), vm_id);
    cmdline.push("ga_net_delay=4".into());
    let mut vm = Vm::start(
        ready.assets,
        ready.initrd,
        Boot {
            name: "late-net",
            scenario: "late-net",
            cmdline,
            watchdog: Duration::from_secs(150),
            qemu_args: Vec::new(),
        },
    );
    let deadline = t0 + Duration::from_secs(130);
    let (agent, agent_line) = vm.wait_marker("agent-started", deadline);
    let (_, dhcp_line) = vm.wait_marker("dhcp-start", deadline);
    let (net, net_line) = vm.wait_marker("net-up", deadline);
    let uptime_of = |line: &str| -> f64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("uptime="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no uptime in {line:?}"))
    };
    let net_uptime = uptime_of(&net_line);
    let dhcp_uptime = uptime_of(&dhcp_line);
    let (first_at, first_batch) = rx
        .wait_for(deadline, |p| {
            p.first()
                .map(|p| (p.at, p.samples.clone().expect("a sample array")))
        })
        .expect("no push arrived after the network came up");
    // uptime_seconds is whole seconds: one under the DHCP start is before it.
    let before_route = first_batch
        .iter()
        .filter(|s| (s.uptime_seconds.unwrap() + 1) as f64 <= dhcp_uptime)
        .count();
    vm_harness::report(format_args!(
        "vm late-net: agent started at {} (guest uptime {}), network at {} (guest uptime \
         {net_uptime}), first push received at {} ({} after the network) with {} samples, {} of them \
         collected before DHCP started",
        secs(agent - vm.started),
        uptime_of(&agent_line),
        secs(net - vm.started),
        secs(first_at - vm.started),
        secs(first_at.saturating_duration_since(net)),
        first_batch.len(),
        before_route
    ));
    assert_eq!(first_batch[0].seq, 1, "the oldest sample goes first");
    assert!(
        before_route >= 2,
        "the first push carries the samples collected before DHCP started at guest uptime \
         {dhcp_uptime}: {}",
        trace(&first_batch)
    );
    let run_a = first_batch[0].run_id.clone();

    // Three more after the network, then SIGKILL.
    let last_buffered = first_batch.last().unwrap().seq;
    rx.wait_for(deadline, |p| {
        vm_harness::samples(p)
            .iter()
            .any(|s| s.run_id == run_a && s.seq >= last_buffered + 3)
            .then_some(())
    })
    .expect("pushes did not go on after the buffered batch");
    vm.send("kill");
    let (killed, _) = vm.wait_marker("killed", deadline);
    let (_, exit_line) = vm.wait_marker("agent-exited", deadline);
    assert!(exit_line.starts_with("137"), "SIGKILL: {exit_line}");
    let run_b = rx
        .wait_for(deadline, |p| {
            let s = vm_harness::samples(p);
            let b: Vec<&Sample> = s.iter().filter(|s| s.run_id != run_a).collect();
            (b.len() >= 3).then(|| b[0].run_id.clone())
        })
        .expect("the restarted agent did not push 3 samples");
    let restarted = rx
        .posts()
        .iter()
        .find(|p| {
            p.samples
                .as_ref()
                .is_ok_and(|s| s.iter().any(|s| s.run_id == run_b))
        })
        .map(|p| p.at)
        .unwrap();
    vm.send("off");
    let status = vm.wait_exit(Instant::now() + Duration::from_secs(30));

    let posts = rx.posts();
    vm_harness::assert_wire_contract(&posts, INGEST_PATH);
    let samples = vm_harness::samples(&posts);
    for s in &samples {
        assert_vm_sample(s, vm_id);
        if let Some(ip) = &s.guest_ip {
            assert_eq!(ip, GUEST_IP, "{s:?}");
        }
    }
    assert!(
        samples.windows(2).all(|w| w[0].boot_id == w[1].boot_id),
        "one boot"
    );
    let runs = vm_harness::runs(&samples);
    assert_eq!(runs.len(), 2, "two agent processes: {runs:?}");
    assert_eq!((&runs[0].0, &runs[1].0), (&run_a, &run_b));
    vm_harness::assert_no_gaps("the first run", &runs[0].1);
    vm_harness::assert_no_gaps("the restarted run", &runs[1].1);
    let after_route = samples
        .iter()
        .filter(|s| s.run_id == run_b)
        .all(|s| s.guest_ip.as_deref() == Some(GUEST_IP));
    assert!(
        after_route,
        "the restarted agent knows its address from the start"
    );
    vm_harness::report(format_args!(
        "vm late-net: run 1 delivered seq 1..={} ({} buffered before the route), killed at {}, \
         run 2 first push {} later, delivered seq 1..={}",
        runs[0].1.len(),
        first_batch.len(),
        secs(killed - vm.started),
        secs(restarted.saturating_duration_since(killed)),
        runs[1].1.len()
    ));
    vm_harness::report(format_args!("vm late-net: {}", trace(&samples)));
    vm_harness::report(format_args!(
        "vm late-net: wall time {} ({status})",
        secs(t0.elapsed())
    ));
}
