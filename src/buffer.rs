//! The bounded FIFO between collection and delivery (GUIDE §5).
//!
//! When full, the oldest sample is dropped and counted; nothing else ever
//! removes a sample except confirmed delivery or a refusal of its payload.
//! The sender reads a batch without removing it, and removes it only once
//! the manager has answered, so a failed request loses nothing. A sample
//! evicted while it is in flight is counted as dropped only if that request
//! fails: if it succeeds, the sample was delivered, not lost.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::Sample;

/// The sample queue shared by the collector and the sender.
#[derive(Debug)]
pub struct Buffer {
    inner: Mutex<Inner>,
    ready: Condvar,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Arc<Sample>>,
    dropped: u64,
    closed: bool,
    /// Samples of the batch being sent still at the front of the queue. A
    /// count, not a seq: after a snapshot restore seq starts again at 1
    /// while the parent's samples are still queued (docs/snapshots.md).
    in_flight: usize,
    /// Samples of the in-flight batch evicted by overflow.
    evicted_in_flight: u64,
}

impl Buffer {
    /// An empty buffer holding at most `capacity` samples (at least 1).
    pub fn new(capacity: usize) -> Buffer {
        Buffer {
            inner: Mutex::new(Inner::default()),
            ready: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere must not stop collection: the queue stays valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a sample, first dropping the oldest if the buffer is full. The
    /// sample's `dropped_samples` is set to the count including that drop.
    /// Returns the sample as queued, shared (the listener serves the same one).
    pub fn push(&self, mut sample: Sample) -> Arc<Sample> {
        let mut g = self.lock();
        if g.queue.len() >= self.capacity {
            let evicted = g.queue.pop_front().is_some();
            if evicted && g.in_flight > 0 {
                g.in_flight -= 1;
                g.evicted_in_flight += 1;
            } else {
                g.dropped += 1;
            }
        }
        sample.dropped_samples = g.dropped;
        let sample = Arc::new(sample);
        g.queue.push_back(sample.clone());
        drop(g);
        self.ready.notify_all();
        sample
    }

    /// Samples dropped so far because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Samples waiting for delivery.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// True when nothing waits for delivery.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The capacity in samples.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The oldest `max` samples, waiting until at least one is there, the
    /// buffer is closed, or `deadline` passes (empty result). They stay in
    /// the buffer, marked in flight until [`Buffer::remove_in_flight`] or
    /// [`Buffer::release`].
    pub fn peek_batch(&self, max: usize, deadline: Option<Instant>) -> Vec<Arc<Sample>> {
        let mut g = self.lock();
        while g.queue.is_empty() && !g.closed {
            g = match deadline {
                None => self.ready.wait(g).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let Some(left) = d.checked_duration_since(Instant::now()) else {
                        break;
                    };
                    self.ready
                        .wait_timeout(g, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
        let batch: Vec<Arc<Sample>> = g.queue.iter().take(max).cloned().collect();
        g.in_flight = batch.len();
        batch
    }

    /// Removes the in-flight batch, delivered or refused. Samples of that
    /// batch that overflow already dropped are simply no longer there.
    pub fn remove_in_flight(&self) -> usize {
        let mut g = self.lock();
        let n = std::mem::take(&mut g.in_flight).min(g.queue.len());
        g.queue.drain(..n);
        g.evicted_in_flight = 0;
        n
    }

    /// Ends an in-flight batch that was not delivered: its samples stay
    /// queued, and those evicted meanwhile now count as dropped.
    pub fn release(&self) {
        let mut g = self.lock();
        g.dropped += std::mem::take(&mut g.evicted_in_flight);
        g.in_flight = 0;
    }

    /// Wakes every waiter; later `peek_batch` calls return at once.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// Whether [`Buffer::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(seq: u64) -> Sample {
        let json = serde_json::json!({
            "schema": 1, "agent_version": "t", "vm_id": null, "hostname": null,
            "boot_id": null, "run_id": "r", "seq": seq, "timestamp_ms": 0,
            "window_ms": 0, "guest_ip": null, "cpu_count": null,
            "cpu_usage_percent": null, "cpu_iowait_percent": null,
            "cpu_steal_percent": null, "procs_running": null, "procs_blocked": null,
            "process_count": null, "load_average": null, "load_average_5": null,
            "load_average_15": null, "memory_total_kb": null,
            "memory_available_kb": null, "memory_used_kb": null,
            "memory_usage_percent": null, "swap_total_kb": null, "swap_used_kb": null,
            "uptime_seconds": null, "network_rx_bytes": null, "network_tx_bytes": null,
            "disk_read_bytes": null, "disk_write_bytes": null,
            "filesystem_total_kb": null, "filesystem_used_kb": null,
            "pressure_cpu_some_avg10": null, "pressure_memory_some_avg10": null,
            "pressure_io_some_avg10": null, "dropped_samples": 0
        });
        Sample::from_json_strict(&json).unwrap()
    }

    fn seqs(v: &[Arc<Sample>]) -> Vec<u64> {
        v.iter().map(|s| s.seq).collect()
    }

    #[test]
    fn overflow_drops_oldest_and_counts_in_later_samples() {
        let b = Buffer::new(3);
        for i in 1..=5 {
            b.push(sample(i));
        }
        let all = b.peek_batch(10, None);
        assert_eq!(seqs(&all), vec![3, 4, 5]);
        assert_eq!(b.dropped(), 2);
        assert_eq!(
            all.iter().map(|s| s.dropped_samples).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn peek_does_not_remove_and_remove_in_flight_tolerates_overflow() {
        let b = Buffer::new(3);
        for i in 1..=3 {
            b.push(sample(i));
        }
        let batch = b.peek_batch(2, None);
        assert_eq!(seqs(&batch), vec![1, 2]);
        assert_eq!(b.len(), 3);
        // While the batch is in flight, overflow drops seq 1.
        b.push(sample(4));
        assert_eq!(b.remove_in_flight(), 1);
        assert_eq!(seqs(&b.peek_batch(10, None)), vec![3, 4]);
    }

    #[test]
    fn eviction_of_an_in_flight_sample_counts_only_if_the_request_fails() {
        let b = Buffer::new(2);
        b.push(sample(1));
        b.push(sample(2));
        let batch = b.peek_batch(2, None);
        b.push(sample(3)); // evicts 1, in flight
        assert_eq!(b.dropped(), 0);
        assert_eq!(batch.len(), 2);
        b.remove_in_flight(); // delivered: 1 was not lost
        assert_eq!(b.dropped(), 0);
        assert_eq!(seqs(&b.peek_batch(10, None)), vec![3]);

        let b = Buffer::new(2);
        b.push(sample(1));
        b.push(sample(2));
        b.peek_batch(2, None);
        b.push(sample(3)); // evicts 1, in flight
        b.release(); // the request failed: 1 is lost
        assert_eq!(b.dropped(), 1);
        b.push(sample(4)); // evicts 2, not in flight
        assert_eq!(b.dropped(), 2);
        assert_eq!(seqs(&b.peek_batch(10, None)), vec![3, 4]);
    }

    #[test]
    fn a_batch_spanning_a_restore_is_removed_whole() {
        // The parent's seq 7 and 8, then the restored run's 1 and 2.
        let b = Buffer::new(10);
        for i in [7, 8, 1, 2, 3] {
            b.push(sample(i));
        }
        assert_eq!(seqs(&b.peek_batch(4, None)), vec![7, 8, 1, 2]);
        assert_eq!(b.remove_in_flight(), 4);
        assert_eq!(seqs(&b.peek_batch(10, None)), vec![3]);
    }

    #[test]
    fn peek_waits_until_deadline_or_close() {
        let b = std::sync::Arc::new(Buffer::new(2));
        let soon = Instant::now() + std::time::Duration::from_millis(20);
        assert!(b.peek_batch(1, Some(soon)).is_empty());
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.peek_batch(1, None));
        b.close();
        assert!(t.join().unwrap().is_empty());
    }
}
