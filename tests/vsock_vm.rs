//! The vsock transport in a real VM with no network device at all: the
//! agent, configured on the kernel command line with
//! `guest_agent.url=vsock://2:PORT/v1/guest-metrics`, pushes to the host's
//! Unix socket `<uds_path>_PORT` (Firecracker's contract, served here by
//! QEMU's `vhost-user-vsock-device` and the `vhost-device-vsock` daemon in
//! hybrid mode), where the reference manager (`examples/manager.rs --unix`)
//! stores what arrives. See docs/vsock.md and docs/testing.md.
//!
//! Nothing here touches a network: the guest has none, and the host side is
//! Unix sockets in `target/vsock-vm/`.

#[path = "vsock_vm/host.rs"]
mod host;
#[allow(dead_code, unused_imports)]
mod vm_harness;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use guest_agent::Sample;
use host::{HostSide, Manager, stored};
use vm_harness::{Boot, Vm, assert_no_gaps, report, runs};

/// Generous: two cores shared with other work, a TCG guest.
const DEADLINE: Duration = Duration::from_secs(240);
const VM_ID: &str = "vsock-vm";

/// Where the host side and the guest meet; derived from the process so
/// that nothing in the test is a fixed number the code could assume.
fn port() -> u32 {
    10_000 + std::process::id() % 20_000
}

/// The daemon, or `None` after saying why the test is skipped.
fn daemon(test: &str) -> Option<PathBuf> {
    match host::daemon_binary() {
        Ok(b) => Some(b),
        Err(why) if host::required() => panic!("{test}: {why}"),
        Err(why) => {
            report(format_args!("{test}: SKIPPED, {why}"));
            None
        }
    }
}

fn wait_until(what: &str, deadline: Instant, mut done: impl FnMut() -> bool) {
    while !done() {
        assert!(Instant::now() < deadline, "{what} before the deadline");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn max_seq(samples: &[Sample]) -> u64 {
    samples.iter().map(|s| s.seq).max().unwrap_or(0)
}

/// Starts the VM, again when its kernel never reaches init: under TCG on a
/// loaded machine the guest's early timer calibration can hang now and then
/// ("APIC frequency too slow"), which says nothing about the agent.
fn start_vm(
    ready: &vm_harness::Ready,
    initrd: &std::path::Path,
    host: &HostSide,
    name: &'static str,
    vsock: &str,
) -> Vm {
    const ATTEMPTS: u32 = 3;
    const BOOT_DEADLINE: Duration = Duration::from_secs(120);
    for attempt in 1..=ATTEMPTS {
        let vm = Vm::start_without_network(ready.assets, initrd, boot(host, name, vsock));
        let deadline = Instant::now() + BOOT_DEADLINE;
        let booted = || {
            vm.lines()
                .iter()
                .any(|l| vm_harness::qemu::marker(l).is_some_and(|m| m.starts_with("boot ")))
        };
        while !booted() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if booted() {
            return vm;
        }
        report(format_args!(
            "{name}: the guest kernel did not reach init (attempt {attempt} of {ATTEMPTS}); booting again"
        ));
    }
    panic!("{name}: the guest kernel did not reach init in {ATTEMPTS} attempts");
}

fn boot(host: &HostSide, name: &'static str, vsock: &str) -> Boot<'static> {
    Boot {
        name,
        scenario: "vsock",
        cmdline: vec![
            format!("guest_agent.url=vsock://2:{}/v1/guest-metrics", port()),
            "guest_agent.interval=1s".into(),
            format!("guest_agent.vm_id={VM_ID}"),
            format!("ga_vsock={vsock}"),
        ],
        watchdog: DEADLINE,
        qemu_args: host.qemu_args(),
    }
}

#[test]
fn vsock_vm_without_network_pushes_to_the_host_socket_and_loses_nothing_across_a_listener_restart()
{
    const NAME: &str = "vsock_vm_without_network_pushes";
    let Some(ready) = vm_harness::ready(NAME) else {
        return;
    };
    let Some(daemon) = daemon(NAME) else {
        return;
    };
    let host = HostSide::start("push", &daemon);
    let initrd = host::initrd(ready.assets, ready.initrd, &host.dir).expect("vsock initramfs");
    let socket = host.port_socket(port());
    let (first_file, second_file) = (
        host.dir.join("samples-1.ndjson"),
        host.dir.join("samples-2.ndjson"),
    );
    let manager = Manager::start(&socket, &first_file);

    let mut vm = start_vm(&ready, &initrd, &host, "vsock-push", "boot");
    let deadline = Instant::now() + DEADLINE;
    let (_, net) = vm.wait_marker("net", deadline);
    assert_eq!(net, "lo", "the guest must have no network interface but lo");
    let (_, virtio) = vm.wait_marker("virtio", deadline);
    let ids: Vec<&str> = virtio.split_whitespace().collect();
    // virtio device ids: 0x0001 network, 0x0013 vsock.
    assert_eq!(ids, ["0x0013"], "the only virtio device is the vsock one");

    let (agent_at, _) = vm.wait_marker("agent-started", deadline);
    wait_until("a first sample over vsock", deadline, || {
        !stored(&[&first_file]).is_empty()
    });
    let first_at = vm.started.elapsed();
    let agent_to_first = agent_at.elapsed();
    wait_until("five samples over vsock", deadline, || {
        stored(&[&first_file]).len() >= 5
    });

    // The host side goes away (killed, its socket file left behind) and
    // comes back on the same path.
    drop(manager);
    let before = max_seq(&stored(&[&first_file]));
    wait_until("the agent noticing the host side is gone", deadline, || {
        vm.lines().iter().any(|l| l.contains("push failed"))
    });
    // Let the agent buffer a few samples through the outage.
    std::thread::sleep(Duration::from_secs(3));
    let _manager = Manager::start(&socket, &second_file);
    wait_until("samples after the restart", deadline, || {
        max_seq(&stored(&[&second_file])) >= before + 8
    });
    vm.send("off");
    vm.wait_exit(deadline);

    let all = stored(&[&first_file, &second_file]);
    let mut seen = BTreeSet::new();
    let unique: Vec<Sample> = all
        .iter()
        .filter(|s| seen.insert((s.run_id.clone(), s.seq)))
        .cloned()
        .collect();
    let runs = runs(&unique);
    assert_eq!(runs.len(), 1, "one agent process: {runs:?}");
    let seqs = &runs[0].1;
    let lost = (1..=max_seq(&unique)).filter(|n| !seqs.contains(n)).count();
    assert_no_gaps("samples over vsock across a listener restart", seqs);
    for s in &unique {
        assert_eq!(s.vm_id.as_deref(), Some(VM_ID));
        assert_eq!(s.guest_ip, None, "vsock has no guest address: {s:?}");
        assert_eq!(s.hostname.as_deref(), Some("ga-vsock"));
    }
    // What the second listener got starts where the first one stopped:
    // the samples of the outage were kept and delivered.
    let second = stored(&[&second_file]);
    let resumed = second.iter().map(|s| s.seq).min().unwrap_or(u64::MAX);
    assert!(
        resumed <= before + 1,
        "the restarted listener must receive the samples buffered during the outage \
         (first listener saw up to seq {before}, the second started at {resumed})"
    );
    report(format_args!(
        "vsock vm: QEMU start to first stored sample {:.2} s (agent start to it {:.2} s); \
         {} samples, {} stored twice, {lost} lost across the listener restart",
        first_at.as_secs_f64(),
        agent_to_first.as_secs_f64(),
        unique.len(),
        all.len() - unique.len()
    ));
}

#[test]
fn vsock_vm_on_a_kernel_without_vsock_reports_it_and_keeps_collecting() {
    const NAME: &str = "vsock_vm_on_a_kernel_without_vsock";
    let Some(ready) = vm_harness::ready(NAME) else {
        return;
    };
    let Some(daemon) = daemon(NAME) else {
        return;
    };
    let host = HostSide::start("late", &daemon);
    let initrd = host::initrd(ready.assets, ready.initrd, &host.dir).expect("vsock initramfs");
    let file = host.dir.join("samples.ndjson");
    let _manager = Manager::start(&host.port_socket(port()), &file);

    let mut vm = start_vm(&ready, &initrd, &host, "vsock-late", "late");
    let deadline = Instant::now() + DEADLINE;
    let (_, health) = vm.wait_marker("health-without-vsock", deadline);
    let health: serde_json::Value = serde_json::from_str(&health)
        .unwrap_or_else(|e| panic!("/health is not JSON ({e}): {health}"));
    let error = health["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("no vsock support") && error.contains("vmw_vsock_virtio_transport"),
        "/health must say the kernel lacks vsock and what to load: {health}"
    );
    assert_eq!(health["push_state"], "failing", "{health}");
    assert!(
        health["last_seq"].as_u64().is_some_and(|n| n >= 1),
        "collection goes on without vsock: {health}"
    );
    let logged = vm
        .lines()
        .iter()
        .filter(|l| l.contains("no vsock support") && vm_harness::qemu::marker(l).is_none())
        .count();
    assert!(
        logged >= 1,
        "the agent's log names the missing vsock support"
    );

    // The modules arrive: the next retry connects, and what was collected
    // meanwhile is delivered.
    vm.wait_marker("vsock-loaded", deadline);
    wait_until("samples once vsock is there", deadline, || {
        stored(&[&file]).len() >= 3
    });
    vm.send("off");
    vm.wait_exit(deadline);
    let samples = stored(&[&file]);
    let runs = runs(&samples);
    assert_eq!(runs.len(), 1, "{runs:?}");
    let seqs: Vec<u64> = runs[0]
        .1
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_no_gaps("samples collected before vsock was there", &seqs);
    report(format_args!(
        "vsock vm without vsock: /health said {error:?}; logged {logged} time(s); \
         {} samples delivered once the modules were loaded",
        seqs.len()
    ));
}
