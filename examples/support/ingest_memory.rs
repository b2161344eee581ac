//! The ingest kit's memory under hostile and worst-case bodies
//! (docs/manager.md#what-the-kit-keeps-in-memory). Each scenario runs in a
//! process of its own (the bench started again with `--ingest-scenario`),
//! so that its peak resident memory (VmHWM) is its own.

use std::process::Command;

use guest_agent::ingest::{self, DEDUP_WINDOW, Dedup, Ingest, MAX_BODY, MAX_RUNS, MAX_TEXT};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The scenarios, with what each one sends.
pub const SCENARIOS: [(&str, &str); 5] = [
    (
        "long-run-ids",
        "40 bodies of 8 MiB, each sample with a run_id of 4 KiB, all different",
    ),
    (
        "max-run-ids",
        "40 bodies of 8 MiB, each sample a new run whose run_id is 256 bytes (the longest accepted)",
    ),
    ("zeros", "one 8 MiB body of [0,0,0,...]"),
    (
        "largest-batch",
        "one body of 10,000 valid samples (the agent's largest batch)",
    ),
    (
        "full-dedup",
        "the de-duplicator full: 1,024 runs of 16,384 seqs each, recorded",
    ),
];

/// A sample with `run_id` and `seq`, as the agent writes it.
fn sample(run_id: &str, seq: u64) -> String {
    format!(
        r#"{{"schema":1,"agent_version":"0.1.0","vm_id":"6f1c2d3e-4b5a-4c6d-8e7f-0123456789ab","hostname":"vm-1","boot_id":"b","run_id":"{run_id}","seq":{seq},"timestamp_ms":1700000000000,"window_ms":5000,"guest_ip":"10.0.2.15","cpu_count":2,"cpu_usage_percent":1.5,"cpu_iowait_percent":0.0,"cpu_steal_percent":0.0,"procs_running":1,"procs_blocked":0,"process_count":50,"load_average":0.1,"load_average_5":0.1,"load_average_15":0.1,"memory_total_kb":1000,"memory_available_kb":500,"memory_used_kb":500,"memory_usage_percent":50.0,"swap_total_kb":0,"swap_used_kb":0,"uptime_seconds":10,"network_rx_bytes":0,"network_tx_bytes":0,"disk_read_bytes":0,"disk_write_bytes":0,"filesystem_total_kb":null,"filesystem_used_kb":null,"pressure_cpu_some_avg10":null,"pressure_memory_some_avg10":null,"pressure_io_some_avg10":null,"dropped_samples":0}}"#
    )
}

/// A body of samples up to `MAX_BODY` bytes, each from `run_id(i)`.
fn body(mut run_id: impl FnMut(usize) -> String) -> Vec<u8> {
    let mut b = b"[".to_vec();
    for i in 0.. {
        let s = sample(&run_id(i), 1);
        if b.len() + s.len() + 2 > MAX_BODY || i == ingest::MAX_SAMPLES {
            break;
        }
        if i > 0 {
            b.push(b',');
        }
        b.extend_from_slice(s.as_bytes());
    }
    b.push(b']');
    b
}

/// VmRSS and VmHWM of this process, KiB.
fn memory() -> Res<(u64, u64)> {
    let st = procfs::process::Process::myself()?.status()?;
    Ok((st.vmrss.unwrap_or(0), st.vmhwm.unwrap_or(0)))
}

/// Runs scenario `name` in this process: resident and peak KiB, read
/// while what it filled is still held, and the outcome, in a line.
pub fn run_scenario(name: &str) -> Res<String> {
    let mut ing = Ingest::new();
    let outcome = match name {
        "long-run-ids" | "max-run-ids" => {
            let len = if name == "long-run-ids" {
                4096
            } else {
                MAX_TEXT
            };
            let (mut stored, mut refused) = (0, 0);
            for n in 0..40 {
                let b = body(|i| format!("{n:04}-{i:06}-{}", "r".repeat(len - 12)));
                match ing.receive(&b) {
                    Ok(batch) => stored += batch.fresh().count(),
                    Err(_) => refused += 1,
                }
            }
            format!(
                "{stored} samples stored, {refused} bodies refused, {} runs remembered",
                ing.dedup().runs()
            )
        }
        "zeros" => {
            let mut b = b"[0".to_vec();
            while b.len() < MAX_BODY - 3 {
                b.extend_from_slice(b",0");
            }
            b.push(b']');
            let e = ing.prepare(&b).err().map(|e| e.to_string());
            format!("{e:?}")
        }
        "largest-batch" => {
            let mut b = b"[".to_vec();
            for seq in 1..=ingest::MAX_SAMPLES as u64 {
                if seq > 1 {
                    b.push(b',');
                }
                b.extend_from_slice(sample("run", seq).as_bytes());
            }
            b.push(b']');
            let n = ing.receive(&b).map(|batch| batch.fresh().count());
            format!("{} bytes: {n:?}", b.len())
        }
        "full-dedup" => {
            let mut d = Dedup::default();
            for run in 0..MAX_RUNS {
                let id = format!("{run:0256}");
                for seq in 1..=DEDUP_WINDOW as u64 {
                    d.record(&id, seq, seq);
                }
            }
            let (rss, hwm) = memory()?;
            return Ok(format!("{rss} {hwm} {} runs", d.runs()));
        }
        other => return Err(format!("no scenario {other:?}").into()),
    };
    let (rss, hwm) = memory()?;
    drop(ing);
    Ok(format!("{rss} {hwm} {outcome}"))
}

/// Every scenario in a child process; a Markdown table.
pub fn table() -> Res<String> {
    let exe = std::env::current_exe()?;
    let mut md = String::from(
        "| scenario | resident after | peak (VmHWM) | outcome |\n|---|---:|---:|---|\n",
    );
    for (name, what) in SCENARIOS {
        let out = Command::new(&exe)
            .args(["--ingest-scenario", name])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut parts = text.trim().splitn(3, ' ');
        let rss: u64 = parts.next().unwrap_or("0").parse().unwrap_or(0);
        let hwm: u64 = parts.next().unwrap_or("0").parse().unwrap_or(0);
        let outcome = parts.next().unwrap_or("").to_string();
        if !out.status.success() {
            return Err(format!("{name}: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        md.push_str(&format!(
            "| {what} | {:.1} MiB | {:.1} MiB | {outcome} |\n",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        ));
    }
    Ok(md)
}
