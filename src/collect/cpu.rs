//! CPU percentages over a window, from two readings of `stat` (docs/design.md#cpu-rules).
//!
//! Pure arithmetic, kept apart from I/O so every rule has a hand-computed test:
//! guest time is never added (it is already inside user and nice), a counter
//! that goes backwards contributes 0, a CPU is matched with itself by its id
//! so hot-unplug and hot-plug never produce a negative or inflated window, and
//! a window with no ticks repeats the previous percentages.

/// Cumulative ticks of one CPU, as the kernel reports them in `stat`.
///
/// `guest` and `guest_nice` are deliberately absent: the kernel already counts
/// them inside `user` and `nice`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    /// Ticks in user mode (includes guest).
    pub user: u64,
    /// Ticks in user mode at low priority (includes guest_nice).
    pub nice: u64,
    /// Ticks in kernel mode.
    pub system: u64,
    /// Ticks idle.
    pub idle: u64,
    /// Ticks idle with I/O outstanding (may go backwards).
    pub iowait: u64,
    /// Ticks servicing hardware interrupts.
    pub irq: u64,
    /// Ticks servicing softirqs.
    pub softirq: u64,
    /// Ticks the hypervisor ran something else while this vCPU wanted to run.
    pub steal: u64,
}

impl CpuTicks {
    /// Field-by-field `self - earlier`, where a counter that went backwards gives 0.
    fn since(&self, earlier: &CpuTicks) -> CpuTicks {
        CpuTicks {
            user: self.user.saturating_sub(earlier.user),
            nice: self.nice.saturating_sub(earlier.nice),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }

    fn add(&mut self, o: &CpuTicks) {
        self.user += o.user;
        self.nice += o.nice;
        self.system += o.system;
        self.idle += o.idle;
        self.iowait += o.iowait;
        self.irq += o.irq;
        self.softirq += o.softirq;
        self.steal += o.steal;
    }

    fn busy(&self) -> u64 {
        self.user + self.nice + self.system + self.irq + self.softirq
    }

    fn total(&self) -> u64 {
        self.busy() + self.idle + self.iowait + self.steal
    }

    /// The counters in the order of `stat` (and of the sample's
    /// `detail::CPU_MODES`).
    pub fn modes(&self) -> [u64; 8] {
        [
            self.user,
            self.nice,
            self.system,
            self.idle,
            self.iowait,
            self.irq,
            self.softirq,
            self.steal,
        ]
    }
}

/// The per-CPU counters of one `stat` reading, each with its CPU number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuSnapshot {
    /// `(cpu number, ticks)` in the order of the file.
    pub cpus: Vec<(u32, CpuTicks)>,
}

/// Shares of one window, each in 0–100, summing to 100 with idle.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuPercent {
    /// user + nice + system + irq + softirq.
    pub usage: f64,
    /// iowait.
    pub iowait: f64,
    /// steal.
    pub steal: f64,
    /// idle.
    pub idle: f64,
    /// Every mode's share (0–1), in the order of [`CpuTicks::modes`].
    pub shares: [f64; 8],
}

/// Percentages over the window from `prev` to `cur`.
///
/// Only CPUs present in both readings count. When no tick elapsed on them
/// (two reads within one tick, or every counter went backwards) the previous
/// window's figures `last` are returned, so every figure is always finite.
pub fn percentages(prev: &CpuSnapshot, cur: &CpuSnapshot, last: CpuPercent) -> CpuPercent {
    let mut sum = CpuTicks::default();
    for (id, now) in &cur.cpus {
        if let Some((_, before)) = prev.cpus.iter().find(|(p, _)| p == id) {
            sum.add(&now.since(before));
        }
    }
    let total = sum.total();
    if total == 0 {
        return last;
    }
    let pct = |part: u64| (part as f64 * 100.0 / total as f64).clamp(0.0, 100.0);
    CpuPercent {
        usage: pct(sum.busy()),
        iowait: pct(sum.iowait),
        steal: pct(sum.steal),
        idle: pct(sum.idle),
        shares: sum
            .modes()
            .map(|m| (m as f64 / total as f64).clamp(0.0, 1.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(user: u64, nice: u64, system: u64, idle: u64, iowait: u64, steal: u64) -> CpuTicks {
        CpuTicks {
            user,
            nice,
            system,
            idle,
            iowait,
            irq: 0,
            softirq: 0,
            steal,
        }
    }

    fn snap(cpus: &[(u32, CpuTicks)]) -> CpuSnapshot {
        CpuSnapshot {
            cpus: cpus.to_vec(),
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn plain_window_by_hand() {
        // deltas: user 30, system 10, idle 50, iowait 5, steal 5 → total 100
        let prev = snap(&[(0, t(100, 0, 50, 1000, 10, 0))]);
        let cur = snap(&[(0, t(130, 0, 60, 1050, 15, 5))]);
        let p = percentages(&prev, &cur, CpuPercent::default());
        assert!(close(p.usage, 40.0));
        assert!(close(p.iowait, 5.0));
        assert!(close(p.steal, 5.0));
        assert!(close(p.idle, 50.0));
        assert!(close(p.usage + p.iowait + p.steal + p.idle, 100.0));
        let want = [0.30, 0.0, 0.10, 0.50, 0.05, 0.0, 0.0, 0.05];
        for (got, want) in p.shares.iter().zip(want) {
            assert!(close(*got, want), "{:?}", p.shares);
        }
        assert!(close(p.shares.iter().sum::<f64>(), 1.0));
    }

    #[test]
    fn irq_and_softirq_are_busy_time() {
        let prev = snap(&[(0, CpuTicks::default())]);
        let mut now = t(0, 0, 0, 80, 0, 0);
        now.irq = 5;
        now.softirq = 15;
        let p = percentages(&prev, &snap(&[(0, now)]), CpuPercent::default());
        assert!(close(p.usage, 20.0));
    }

    #[test]
    fn large_guest_time_is_not_counted_twice() {
        // A VM host whose CPU ran a guest 90 of 100 ticks: the kernel reports
        // user=90 (guest inside it) and guest=90 separately. CpuTicks has no
        // guest field; parsing drops it, so usage is 90 %, not 180/190.
        let prev = snap(&[(0, t(0, 0, 0, 0, 0, 0))]);
        let cur = snap(&[(0, t(90, 0, 0, 10, 0, 0))]);
        let p = percentages(&prev, &cur, CpuPercent::default());
        assert!(close(p.usage, 90.0));
        assert!(close(p.idle, 10.0));
    }

    #[test]
    fn iowait_going_backwards_contributes_zero() {
        let prev = snap(&[(0, t(10, 0, 0, 100, 50, 0))]);
        let cur = snap(&[(0, t(35, 0, 0, 175, 40, 0))]);
        // user +25, idle +75, iowait -10 → 0; total 100
        let p = percentages(&prev, &cur, CpuPercent::default());
        assert!(close(p.usage, 25.0));
        assert!(close(p.iowait, 0.0));
        assert!(close(p.idle, 75.0));
    }

    #[test]
    fn vanished_cpu_is_left_out_not_subtracted() {
        let prev = snap(&[(0, t(100, 0, 0, 100, 0, 0)), (1, t(5000, 0, 0, 5000, 0, 0))]);
        let cur = snap(&[(0, t(150, 0, 0, 150, 0, 0))]);
        let p = percentages(&prev, &cur, CpuPercent::default());
        assert!(close(p.usage, 50.0));
    }

    #[test]
    fn cpus_are_matched_by_number_not_position() {
        // cpu1 goes offline; cpu2 now stands where cpu1 stood.
        let prev = snap(&[
            (0, t(0, 0, 0, 0, 0, 0)),
            (1, t(900, 0, 0, 0, 0, 0)),
            (2, t(0, 0, 0, 0, 0, 0)),
        ]);
        let cur = snap(&[(0, t(0, 0, 0, 100, 0, 0)), (2, t(100, 0, 0, 0, 0, 0))]);
        let p = percentages(&prev, &cur, CpuPercent::default());
        assert!(close(p.usage, 50.0));
    }

    #[test]
    fn hotplugged_cpu_counts_from_its_second_window() {
        let prev = snap(&[(0, t(0, 0, 0, 0, 0, 0))]);
        let cur = snap(&[(0, t(0, 0, 0, 100, 0, 0)), (1, t(7777, 0, 0, 0, 0, 0))]);
        let p = percentages(&prev, &cur, CpuPercent::default());
        assert!(close(p.usage, 0.0));
        assert!(close(p.idle, 100.0));
    }

    #[test]
    fn zero_tick_window_repeats_previous_figures() {
        let s = snap(&[(0, t(10, 0, 0, 10, 0, 0))]);
        let last = CpuPercent {
            usage: 12.5,
            iowait: 1.0,
            steal: 2.0,
            idle: 84.5,
            shares: [0.1, 0.025, 0.0, 0.845, 0.01, 0.0, 0.0, 0.02],
        };
        assert_eq!(percentages(&s, &s, last), last);
        assert_eq!(
            percentages(&s, &s, CpuPercent::default()),
            CpuPercent::default()
        );
    }

    #[test]
    fn steal_heavy_window_on_a_busy_host() {
        let prev = snap(&[(0, CpuTicks::default()), (1, CpuTicks::default())]);
        let cur = snap(&[(0, t(20, 0, 0, 0, 0, 80)), (1, t(20, 0, 0, 40, 0, 40))]);
        // busy 40, idle 40, steal 120 → total 200
        let p = percentages(&prev, &cur, CpuPercent::default());
        assert!(close(p.usage, 20.0));
        assert!(close(p.steal, 60.0));
        assert!(close(p.idle, 20.0));
    }
}
