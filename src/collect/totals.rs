//! Cumulative network and disk totals that never run backwards within a
//! run (docs/design.md#totals-over-devices-that-come-and-go).
//!
//! The kernel keeps counters per device, and a device can go (`ip link
//! del`, a hot-unplugged disk) or come back with its counters at 0. A sum
//! over the devices present now would then drop. So each device's last
//! counts are remembered, and when it vanishes, or its counters go back
//! (a new device under an old name), the counts it had stay in the total:
//! the total is the sum over every device seen in this run of what it
//! counted. Each device also learns when its own counters began, for the
//! formats that carry per-device counters (OTLP's start time).

use crate::sample::detail::{Disk, Interface};

/// A device with two cumulative counters summed into the run's totals.
pub trait Counted {
    /// The device's name, unique within one reading.
    fn name(&self) -> &str;
    /// Its two counters (received and sent, read and written).
    fn counters(&self) -> [u64; 2];
    /// Whether it counts in the totals (not `lo`).
    fn counted(&self) -> bool;
    /// Records when its counters began: `None` for a device present at the
    /// run's first reading (they count from boot), else the time of the
    /// reading before the one that found it new or reset, ms since the epoch.
    fn set_since(&mut self, since_ms: Option<u64>);
}

impl Counted for Interface {
    fn name(&self) -> &str {
        &self.name
    }
    fn counters(&self) -> [u64; 2] {
        [self.receive[0], self.transmit[0]]
    }
    fn counted(&self) -> bool {
        self.name != "lo"
    }
    fn set_since(&mut self, since_ms: Option<u64>) {
        self.since_ms = since_ms;
    }
}

impl Counted for Disk {
    fn name(&self) -> &str {
        &self.name
    }
    fn counters(&self) -> [u64; 2] {
        [self.read_bytes, self.written_bytes]
    }
    fn counted(&self) -> bool {
        true
    }
    fn set_since(&mut self, since_ms: Option<u64>) {
        self.since_ms = since_ms;
    }
}

/// One device as last seen.
#[derive(Debug)]
struct Tracked {
    name: String,
    last: [u64; 2],
    since_ms: Option<u64>,
    counted: bool,
    seen: bool,
}

/// The run's totals over devices that come and go.
#[derive(Debug, Default)]
pub struct DeviceTotals {
    devices: Vec<Tracked>,
    /// What devices no longer there (or reset) had counted.
    gone: [u64; 2],
    /// The time of the last reading; `None` before the first.
    last_ms: Option<u64>,
}

impl DeviceTotals {
    /// Folds in one reading taken at `now_ms`, marking each device with
    /// when its counters began, and returns the run's two totals. Nothing
    /// is allocated unless a device is new.
    pub fn update<D: Counted>(&mut self, devices: &mut [D], now_ms: u64) -> [u64; 2] {
        // The generic part stays this loop: the rest is one copy for both
        // device kinds.
        self.begin();
        let mut now = [0u64; 2];
        for d in devices.iter_mut() {
            let counters = d.counters();
            let counted = d.counted();
            d.set_since(self.track(d.name(), counters, counted));
            if counted {
                add(&mut now, counters);
            }
        }
        self.finish(now, now_ms)
    }

    fn begin(&mut self) {
        for t in &mut self.devices {
            t.seen = false;
        }
    }

    /// One device of the reading: returns when its counters began.
    fn track(&mut self, name: &str, counters: [u64; 2], counted: bool) -> Option<u64> {
        let Some(t) = self.devices.iter_mut().find(|t| !t.seen && t.name == name) else {
            self.devices.push(Tracked {
                name: name.to_string(),
                last: counters,
                since_ms: self.last_ms,
                counted,
                seen: true,
            });
            return self.last_ms;
        };
        if counters[0] < t.last[0] || counters[1] < t.last[1] {
            // A new device under the old name: the old one's counts stay
            // in the total.
            if t.counted {
                add(&mut self.gone, t.last);
            }
            t.since_ms = self.last_ms;
        }
        t.last = counters;
        t.counted = counted;
        t.seen = true;
        t.since_ms
    }

    /// The devices not seen this time keep their counts in the total.
    fn finish(&mut self, mut now: [u64; 2], now_ms: u64) -> [u64; 2] {
        for t in self.devices.iter().filter(|t| !t.seen && t.counted) {
            add(&mut self.gone, t.last);
        }
        self.devices.retain(|t| t.seen);
        self.last_ms = Some(now_ms);
        add(&mut now, self.gone);
        now
    }
}

/// Adds counters as the kernel's wrap: modulo 2^64, so differences of two
/// totals stay right.
fn add(to: &mut [u64; 2], v: [u64; 2]) {
    to[0] = to[0].wrapping_add(v[0]);
    to[1] = to[1].wrapping_add(v[1]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone)]
    struct Dev(&'static str, [u64; 2], Option<u64>);

    impl Counted for Dev {
        fn name(&self) -> &str {
            self.0
        }
        fn counters(&self) -> [u64; 2] {
            self.1
        }
        fn counted(&self) -> bool {
            self.0 != "lo"
        }
        fn set_since(&mut self, since_ms: Option<u64>) {
            self.2 = since_ms;
        }
    }

    fn dev(name: &'static str, a: u64, b: u64) -> Dev {
        Dev(name, [a, b], Some(u64::MAX))
    }

    #[test]
    fn a_vanished_device_keeps_its_counts_in_the_total() {
        let mut t = DeviceTotals::default();
        let mut r = vec![dev("lo", 9, 9), dev("eth0", 100, 10), dev("d0", 50, 5)];
        assert_eq!(t.update(&mut r, 1000), [150, 15]);
        assert!(r.iter().all(|d| d.2.is_none()), "present from the start");
        let mut r = vec![dev("lo", 99, 99), dev("eth0", 120, 12), dev("d0", 70, 7)];
        assert_eq!(t.update(&mut r, 2000), [190, 19]);
        // d0 deleted: its 70/7 stay.
        let mut r = vec![dev("lo", 99, 99), dev("eth0", 130, 13)];
        assert_eq!(t.update(&mut r, 3000), [200, 20]);
        // d0 again, a new device from 0: counted on top, its own start.
        let mut r = vec![dev("eth0", 130, 13), dev("d0", 4, 1)];
        assert_eq!(t.update(&mut r, 4000), [204, 21]);
        assert_eq!(r[0].2, None);
        assert_eq!(r[1].2, Some(3000));
        let mut r = vec![dev("eth0", 131, 13), dev("d0", 6, 1)];
        assert_eq!(t.update(&mut r, 5000), [207, 21]);
        assert_eq!(r[1].2, Some(3000), "the same device keeps its start");
    }

    #[test]
    fn a_counter_going_back_is_a_new_device_under_the_old_name() {
        let mut t = DeviceTotals::default();
        let mut r = vec![dev("vdb", 1000, 500)];
        assert_eq!(t.update(&mut r, 1000), [1000, 500]);
        // Unplugged and plugged back between two readings.
        let mut r = vec![dev("vdb", 10, 600)];
        assert_eq!(t.update(&mut r, 2000), [1010, 1100]);
        assert_eq!(r[0].2, Some(1000));
    }

    #[test]
    fn totals_never_decrease_whatever_comes_and_goes() {
        let mut t = DeviceTotals::default();
        let mut prev = [0, 0];
        let steps: [&[(&'static str, u64, u64)]; 6] = [
            &[("a", 5, 5), ("b", 7, 1)],
            &[("b", 9, 2)],
            &[],
            &[("a", 1, 1), ("c", 3, 3)],
            &[("a", 0, 4), ("c", 3, 3)],
            &[("a", 2, 9), ("b", 1, 0)],
        ];
        for (i, step) in steps.iter().enumerate() {
            let mut r: Vec<Dev> = step.iter().map(|(n, a, b)| dev(n, *a, *b)).collect();
            let now = t.update(&mut r, i as u64);
            assert!(now[0] >= prev[0] && now[1] >= prev[1], "{prev:?} → {now:?}");
            prev = now;
        }
    }
}
