//! The drop-in mode in a real VM (docs/manager.md): the guest holds the
//! agent and `/etc/guest-agent.conf` as the pull-model manager's installer
//! writes it (`VM_ID`, `MANAGER_URL=http://10.0.2.2:PORT`), and nothing for
//! the agent on the kernel command line; the agent starts with no arguments
//! once the network is up (the installer's service needs `net`).
//!
//! A stand-in of that manager on host loopback (QEMU hands the guest's
//! 10.0.2.2:PORT to host 127.0.0.1:PORT) receives the guest's address and
//! pulls `/metrics` from the guest's port 9000 through a QEMU port forward
//! (host 127.0.0.1:HOSTPORT to guest :9000): the host cannot reach
//! 10.0.2.15 itself, so the stand-in maps that address to the forward.
//!
//! Skips and failures follow tests/vm.rs: without QEMU, the kernel or
//! busybox this test says SKIPPED, unless `CI=true` or
//! `GUEST_AGENT_VM_TEST=require`.

mod pull_manager;
#[allow(unused_imports, dead_code)]
mod vm_harness;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pull_manager::{AGENT_PORT, StandIn};
use vm_harness::qemu::MEMORY_MIB;
use vm_harness::{Boot, Vm, monitor, overlay};

const GUEST_IP: &str = "10.0.2.15";
const VM_ID: &str = "0b6f4a52-91c3-4e1d-a7d2-5c0e8f3b1a94";

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

#[test]
fn vm_with_only_the_installers_file_serves_todays_manager() {
    let Some(ready) = vm_harness::ready("vm_with_only_the_installers_file_serves_todays_manager")
    else {
        return;
    };
    // A free host port for the forward; QEMU binds it a moment later.
    let host_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let forward = SocketAddr::from(([127, 0, 0, 1], host_port));
    let manager = StandIn::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(move |ip: &str| {
            if ip == GUEST_IP {
                forward
            } else {
                // An address the host cannot reach: the pull fails, visibly.
                SocketAddr::new(ip.parse().unwrap(), AGENT_PORT)
            }
        }),
    );
    let conf = format!(
        "# Guest Agent Configuration\n# Auto-generated during VM creation\nVM_ID={VM_ID}\nMANAGER_URL=http://10.0.2.2:{}\n",
        manager.addr.port()
    );
    let initrd = overlay::with_files(
        ready.assets,
        ready.initrd,
        &[("/etc/guest-agent.conf", 0o644, conf.as_bytes())],
    )
    .expect("the initramfs with the installer's file");
    let socket = monitor::socket_path("dropin");
    let t0 = Instant::now();
    let mut vm = Vm::start(
        ready.assets,
        &initrd,
        Boot {
            name: "dropin",
            scenario: "push",
            cmdline: Vec::new(),
            watchdog: Duration::from_secs(150),
            qemu_args: monitor::args(&socket),
        },
    );
    monitor::hostfwd(&socket, host_port, AGENT_PORT).expect("port forward to the guest's 9000");
    let deadline = t0 + Duration::from_secs(130);
    let (net, _) = vm.wait_marker("net-up", deadline);
    let (agent, _) = vm.wait_marker("agent-started", deadline);

    let left = || deadline.saturating_duration_since(Instant::now()).as_secs();
    let report = manager.wait_for(left(), "the guest's address", |m| {
        m.reports().first().cloned()
    });
    assert_eq!(report.vm_id, VM_ID);
    assert_eq!(report.guest_ip, GUEST_IP);
    let pull = manager.wait_for(left(), "a live-view pull that parses", |m| {
        m.live_pulls().into_iter().find(|p| p.result.is_ok())
    });
    let collected = manager.wait_for(left(), "a collector pull that parses", |m| {
        m.collector_pulls().into_iter().find_map(|p| p.result.ok())
    });
    vm_harness::report(format_args!(
        "vm dropin: network at {}, agent started at {}, guest-ip report at {} (agent +{}), \
         first successful pull at {} (agent +{})",
        secs(net - vm.started),
        secs(agent - vm.started),
        secs(report.at - vm.started),
        secs(report.at.saturating_duration_since(agent)),
        secs(pull.at - vm.started),
        secs(pull.at.saturating_duration_since(agent)),
    ));
    let total = collected.memory_total_kb;
    assert!(
        (150 * 1024..=MEMORY_MIB * 1024).contains(&total),
        "MemTotal {total} KiB is not plausible for -m {MEMORY_MIB}: {collected:?}"
    );
    assert_eq!(
        collected.memory_used_kb + collected.memory_available_kb,
        total
    );
    assert!((0.0..=100.0).contains(&collected.cpu_usage_percent));
    assert!(collected.uptime_seconds > 0);
    assert!(collected.process_count.is_some_and(|n| n > 5));
    // This manager has no push route: every push got its 404.
    assert!(!manager.ingest_posts().is_empty());
    assert!(manager.ingest_posts().iter().all(|s| *s == 404));

    vm.send("off");
    vm.wait_exit(t0 + Duration::from_secs(170));
}
