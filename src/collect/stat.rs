//! `stat`: per-CPU tick counters and the run-queue figures.

use procfs::{ExplicitSystemInfo, FromBufReadSI, KernelStats, ProcError};

use super::cpu::{CpuSnapshot, CpuTicks};

/// What one read of `stat` gives the sample.
#[derive(Debug, Clone, PartialEq)]
pub struct StatReading {
    /// Per-CPU counters, each with its CPU number.
    pub cpus: CpuSnapshot,
    /// Per CPU, in the same order: (`guest`, `guest_nice`) ticks (since
    /// Linux 2.6.24 and 2.6.33; 0 before).
    pub guest: Vec<(u64, u64)>,
    /// Boot time, seconds since the epoch (`btime`).
    pub boot_time: u64,
    /// Context switches since boot (`ctxt`).
    pub context_switches: u64,
    /// Processes created since boot (`processes`).
    pub forks: u64,
    /// Runnable tasks (`procs_running`, since Linux 2.5.45).
    pub procs_running: Option<u32>,
    /// Tasks blocked on I/O (`procs_blocked`, since Linux 2.5.45).
    pub procs_blocked: Option<u32>,
}

// Only ticks are used, never converted to time, so the tick rate does not matter.
const SYSTEM_INFO: ExplicitSystemInfo = ExplicitSystemInfo {
    boot_time_secs: 0,
    ticks_per_second: 100,
    page_size: 4096,
    is_little_endian: cfg!(target_endian = "little"),
};

/// Parses the text of `stat`.
///
/// procfs parses the counters but keeps per-CPU lines only by position; the
/// CPU numbers are taken from the same lines, in the same order, so that a
/// CPU that goes offline is not confused with its neighbour.
pub fn parse(text: &[u8]) -> Result<StatReading, ProcError> {
    // A byte slice is already a `BufRead`: no reader buffer, no copy.
    let stats = KernelStats::from_buf_read(text, &SYSTEM_INFO)?;
    let ids = cpu_numbers(text)?;
    if ids.len() != stats.cpu_time.len() {
        return Err(ProcError::Other(format!(
            "{} cpuN lines but {} parsed",
            ids.len(),
            stats.cpu_time.len()
        )));
    }
    // Two lines for one CPU would count its ticks twice in every window.
    // The kernel lists CPUs in rising order, so only another order costs
    // a sorted copy.
    if !ids.windows(2).all(|w| w[0] < w[1]) {
        let mut seen = ids.clone();
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(ProcError::Other(format!("cpu{} listed twice", w[0])));
        }
    }
    let guest = stats
        .cpu_time
        .iter()
        .map(|c| (c.guest.unwrap_or(0), c.guest_nice.unwrap_or(0)))
        .collect();
    let cpus = ids
        .into_iter()
        .zip(stats.cpu_time.iter())
        .map(|(id, c)| {
            let ticks = CpuTicks {
                user: c.user,
                nice: c.nice,
                system: c.system,
                idle: c.idle,
                iowait: c.iowait.unwrap_or(0),
                irq: c.irq.unwrap_or(0),
                softirq: c.softirq.unwrap_or(0),
                steal: c.steal.unwrap_or(0),
            };
            (id, ticks)
        })
        .collect();
    Ok(StatReading {
        cpus: CpuSnapshot { cpus },
        guest,
        boot_time: stats.btime,
        context_switches: stats.ctxt,
        forks: stats.processes,
        procs_running: stats.procs_running,
        procs_blocked: stats.procs_blocked,
    })
}

/// The N of every `cpuN` line, matching the lines procfs puts in `cpu_time`.
fn cpu_numbers(text: &[u8]) -> Result<Vec<u32>, ProcError> {
    let text = std::str::from_utf8(text).map_err(|e| ProcError::Other(e.to_string()))?;
    text.lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .map(|l| {
            let label = l.split_whitespace().next().unwrap_or(l);
            label[3..]
                .parse()
                .map_err(|_| ProcError::Other(format!("bad CPU label {label:?}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "cpu  10132153 290696 3084719 46828483 16683 0 25195 0 175628 0
cpu0 1393280 32966 572056 13343292 6130 0 17875 0 23933 0
cpu1 1335085 32587 556302 13380410 1968 0 1972 0 45617 0
cpu3 1392290 8763 396651 13418436 3617 0 2173 7 23321 0
intr 199292 39 0 0
ctxt 1990473
btime 1062191376
processes 2915
procs_running 3
procs_blocked 1
softirq 1 2 3
";

    #[test]
    fn parses_cpus_with_their_numbers() {
        let r = parse(SAMPLE.as_bytes()).unwrap();
        let ids: Vec<u32> = r.cpus.cpus.iter().map(|c| c.0).collect();
        assert_eq!(ids, vec![0, 1, 3]);
        let cpu3 = r.cpus.cpus[2].1;
        assert_eq!(cpu3.user, 1392290);
        assert_eq!(cpu3.steal, 7);
        assert_eq!(r.procs_running, Some(3));
        assert_eq!(r.guest[1], (45617, 0));
        assert_eq!(
            (r.boot_time, r.context_switches, r.forks),
            (1062191376, 1990473, 2915)
        );
        assert_eq!(r.procs_blocked, Some(1));
    }

    #[test]
    fn malformed_counter_is_an_error() {
        let bad = SAMPLE.replace("cpu1 1335085", "cpu1 13x5085");
        assert!(parse(bad.as_bytes()).is_err());
    }

    // Found by the fuzz target `proc` (docs/testing.md#fuzzing).
    #[test]
    fn a_cpu_listed_twice_is_an_error() {
        let bad = SAMPLE.replace("cpu3 ", "cpu1 ");
        let e = parse(bad.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("cpu1 listed twice"), "{e}");
    }

    #[test]
    fn bad_cpu_label_is_an_error() {
        let bad = SAMPLE.replace("cpu1 ", "cpuX ");
        assert!(parse(bad.as_bytes()).is_err());
    }
}
