//! Collection on `tests/fixtures/vm/`: the /proc of a small microvm (QEMU
//! microvm, `-m 256 -smp 2`, Debian cloud kernel 6.1, busybox initramfs, one
//! virtio-net and one virtio-blk device) captured by `tests/vm.rs`'s
//! `capture_vm_proc_fixture`, plus a fixed `sys/kernel/random/uuid` and three
//! process directories. The expected figures below are read off those files.

use std::path::Path;

use guest_agent::Collector;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/vm");

#[test]
fn vm_fixture_collects_every_figure() {
    let mut c = Collector::new(Path::new(ROOT), Some("vm-fixture".into())).unwrap();
    let first = c.collect();
    let s = c.collect();

    assert_eq!(s.run_id, "7a1c3e52-4b8d-4f6e-9a20-0c5d1e2f3a4b");
    assert_eq!(first.run_id, s.run_id);
    assert_eq!(
        s.boot_id.as_deref(),
        Some("aaff2d0e-886b-42f6-a11a-ff025f2e0fb5")
    );
    assert_eq!(s.hostname.as_deref(), Some("ga-vm"));
    assert_eq!(s.vm_id.as_deref(), Some("vm-fixture"));

    // stat: two CPUs, cpu0 and cpu1.
    assert_eq!(s.cpu_count, Some(2));
    assert_eq!(s.procs_running, Some(1));
    assert_eq!(s.procs_blocked, Some(0));
    // The same stat twice: no tick elapsed, so the figures repeat the
    // previous sample's, which for the first window are 0.
    for x in [first, s.clone()] {
        assert_eq!(x.cpu_usage_percent, Some(0.0));
        assert_eq!(x.cpu_iowait_percent, Some(0.0));
        assert_eq!(x.cpu_steal_percent, Some(0.0));
    }

    // meminfo: MemTotal 223520, MemAvailable 197232, no swap (-m 256).
    assert_eq!(s.memory_total_kb, Some(223_520));
    assert_eq!(s.memory_available_kb, Some(197_232));
    assert_eq!(s.memory_used_kb, Some(223_520 - 197_232));
    let pct = s.memory_usage_percent.unwrap();
    assert!((pct - 26_288.0 / 223_520.0 * 100.0).abs() < 0.01, "{pct}");
    assert_eq!(s.swap_total_kb, Some(0));
    assert_eq!(s.swap_used_kb, Some(0));

    // loadavg, uptime ("6.35 6.99": whole seconds).
    assert_eq!(s.load_average, Some(0.0));
    assert_eq!(s.load_average_5, Some(0.0));
    assert_eq!(s.load_average_15, Some(0.0));
    assert_eq!(s.uptime_seconds, Some(6));

    // net/dev: eth0 only (lo is excluded): rx 1290, tx 1286 bytes.
    assert_eq!(s.network_rx_bytes, Some(1290));
    assert_eq!(s.network_tx_bytes, Some(1286));
    // diskstats: vda read 2312 sectors, wrote 64, of 512 bytes.
    assert_eq!(s.disk_read_bytes, Some(2312 * 512));
    assert_eq!(s.disk_write_bytes, Some(64 * 512));

    // pressure: some avg10 of cpu, memory, io.
    assert_eq!(s.pressure_cpu_some_avg10, Some(1.21));
    assert_eq!(s.pressure_memory_some_avg10, Some(0.0));
    assert_eq!(s.pressure_io_some_avg10, Some(0.14));

    // Directories 1, 2 and 121.
    assert_eq!(s.process_count, Some(3));
    assert!(c.failures().is_empty(), "{:?}", c.failures());
}
