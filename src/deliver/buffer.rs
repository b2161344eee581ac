//! The bounded FIFO between collection and delivery
//! (docs/design.md#delivery).
//!
//! It holds at most `capacity` samples and at most `max_bytes` bytes of
//! them; when either bound is reached the oldest sample is dropped and
//! counted. Nothing else ever removes a sample except confirmed delivery or
//! a refusal of its payload. The sender takes a [`Batch`] that stays in the
//! buffer until the batch is settled: [`Batch::remove`] once the manager has
//! answered, or dropped (released) when the request failed, so a failed
//! request loses nothing and a forgotten batch cannot leave the buffer
//! stuck. A sample evicted while it is in flight is counted as dropped only
//! if that request fails: if it succeeds, the sample was delivered, not lost.
//!
//! The byte bound follows the guest's memory ([`Buffer::set_max_bytes`]). A
//! lower bound is met gradually, never by a burst of drops: while the
//! buffer holds more than it, each new sample makes room for itself and
//! one more (the oldest go), so what is held shrinks by about a sample per
//! interval, and deliveries drain it as usual.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::sample::{Sample, footprint};
use crate::status::BufferFigures;

/// The sample queue shared by the collector and the sender.
#[derive(Debug)]
pub struct Buffer {
    inner: Mutex<Inner>,
    ready: Condvar,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<(Arc<Sample>, usize)>,
    bytes: usize,
    /// The byte bound, which follows the guest's memory.
    max_bytes: usize,
    dropped: u64,
    closed: bool,
    /// Samples of the batch being sent still at the front of the queue, if
    /// one is in flight. A count, not a seq: after a snapshot restore seq
    /// starts again at 1 while the parent's samples are still queued
    /// (docs/snapshots.md).
    in_flight: Option<usize>,
    /// Samples of the in-flight batch evicted by overflow.
    evicted_in_flight: u64,
}

impl Buffer {
    /// An empty buffer holding at most `capacity` samples (at least 1) and
    /// at most `max_bytes` of them (at least one sample, whatever its size).
    pub fn new(capacity: usize, max_bytes: usize) -> Buffer {
        Buffer {
            inner: Mutex::new(Inner {
                max_bytes,
                ..Inner::default()
            }),
            ready: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Never poisoned in the release build (panic = abort); in tests a
        // panicking thread must not stop the others: the queue stays valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a sample, first dropping the oldest while the buffer is full
    /// in samples or bytes. The sample's `dropped_samples` is set to the
    /// count including those drops. Returns the sample as queued, shared
    /// (the listener serves the same one).
    pub fn push(&self, sample: Sample) -> Arc<Sample> {
        self.push_claiming(sample, false).0
    }

    /// [`Buffer::push`]; with `claim`, the new sample is also taken as a
    /// batch of its own when it is the only one queued and no batch is in
    /// flight, without waking the sender's thread: the caller sends it
    /// itself (docs/performance.md#one-wake-up-per-sample). Dropping that
    /// batch unsent wakes the sender's thread to take it.
    pub fn push_claiming(
        &self,
        mut sample: Sample,
        claim: bool,
    ) -> (Arc<Sample>, Option<Batch<'_>>) {
        let size = footprint(&sample);
        let mut g = self.lock();
        // Over a bound that was lowered: room for this sample and one more.
        let limit = if g.bytes > g.max_bytes {
            g.max_bytes.max(g.bytes.saturating_sub(size))
        } else {
            g.max_bytes
        };
        while !g.queue.is_empty() && (g.queue.len() >= self.capacity || g.bytes + size > limit) {
            let Some((_, bytes)) = g.queue.pop_front() else {
                break;
            };
            g.bytes -= bytes;
            if let Some(n) = g.in_flight.as_mut().filter(|n| **n > 0) {
                *n -= 1;
                g.evicted_in_flight += 1;
            } else {
                g.dropped += 1;
            }
        }
        let claim = claim && g.queue.is_empty() && g.in_flight.is_none() && !g.closed;
        sample.dropped_samples = g.dropped;
        let sample = Arc::new(sample);
        g.queue.push_back((sample.clone(), size));
        g.bytes += size;
        if claim {
            g.in_flight = Some(1);
            drop(g);
            let batch = Batch {
                buffer: self,
                samples: vec![sample.clone()],
            };
            return (sample, Some(batch));
        }
        drop(g);
        self.ready.notify_all();
        (sample, None)
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
        self.lock().queue.is_empty()
    }

    /// The figures `/health` shows, read under one lock.
    pub fn figures(&self) -> BufferFigures {
        let g = self.lock();
        BufferFigures {
            len: g.queue.len(),
            bytes: g.bytes,
            dropped: g.dropped,
            capacity: self.capacity,
            max_bytes: g.max_bytes,
        }
    }

    /// The capacity in samples.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The bound in bytes.
    pub fn max_bytes(&self) -> usize {
        self.lock().max_bytes
    }

    /// A new byte bound, when the guest's memory changed. Nothing is
    /// dropped now: a lower bound is met as later samples arrive.
    pub fn set_max_bytes(&self, max_bytes: usize) {
        self.lock().max_bytes = max_bytes;
    }

    /// The oldest `max` samples, waiting until at least one is there and no
    /// other batch is in flight, the buffer is closed, or `deadline` passes
    /// (an empty batch). They stay in the buffer until the batch is settled.
    pub fn batch(&self, max: usize, deadline: Option<Instant>) -> Batch<'_> {
        let mut g = self.lock();
        while (g.queue.is_empty() || g.in_flight.is_some()) && !g.closed {
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
        let samples: Vec<Arc<Sample>> = if g.in_flight.is_some() {
            Vec::new()
        } else {
            g.queue.iter().take(max).map(|(s, _)| s.clone()).collect()
        };
        if !samples.is_empty() {
            g.in_flight = Some(samples.len());
        }
        Batch {
            buffer: self,
            samples,
        }
    }

    /// Wakes every waiter; later [`Buffer::batch`] calls return at once.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

/// Samples taken for one request. They stay in the buffer until
/// [`Batch::remove`]; dropping the batch instead releases them for a later
/// attempt.
#[derive(Debug)]
pub struct Batch<'a> {
    buffer: &'a Buffer,
    samples: Vec<Arc<Sample>>,
}

impl Batch<'_> {
    /// The samples, oldest first.
    pub fn samples(&self) -> &[Arc<Sample>] {
        &self.samples
    }

    /// True when nothing was waiting (closed buffer or deadline).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The seqs of the first and last sample, for messages.
    pub fn seqs(&self) -> (u64, u64) {
        let seq = |s: Option<&Arc<Sample>>| s.map_or(0, |s| s.seq);
        (seq(self.samples.first()), seq(self.samples.last()))
    }

    /// The manager answered for these samples (accepted or refused them):
    /// removes them. Those that overflow already dropped are simply no
    /// longer there. Returns how many were removed.
    pub fn remove(mut self) -> usize {
        if self.samples.is_empty() {
            return 0;
        }
        let mut g = self.buffer.lock();
        let n = g.in_flight.take().unwrap_or(0).min(g.queue.len());
        let bytes: usize = g.queue.drain(..n).map(|(_, b)| b).sum();
        g.bytes -= bytes;
        g.evicted_in_flight = 0;
        drop(g);
        // Settled: the drop that follows must not touch a batch another
        // thread may have taken since.
        self.samples.clear();
        n
    }
}

impl Drop for Batch<'_> {
    /// Not removed: the samples stay queued, those evicted meanwhile now
    /// count as dropped, and a thread waiting for a batch is woken to take
    /// them (the sender's, when the collection thread did not send them).
    fn drop(&mut self) {
        if self.samples.is_empty() {
            return;
        }
        let mut g = self.buffer.lock();
        if g.in_flight.take().is_some() {
            g.dropped += std::mem::take(&mut g.evicted_in_flight);
            drop(g);
            self.buffer.ready.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::fixture::sample;

    fn seqs(b: &Batch<'_>) -> Vec<u64> {
        b.samples().iter().map(|s| s.seq).collect()
    }

    const ROOMY: usize = 1 << 30;

    #[test]
    fn overflow_drops_oldest_and_counts_in_later_samples() {
        let b = Buffer::new(3, ROOMY);
        for i in 1..=5 {
            b.push(sample(i));
        }
        let all = b.batch(10, None);
        assert_eq!(seqs(&all), vec![3, 4, 5]);
        assert_eq!(
            all.samples()
                .iter()
                .map(|s| s.dropped_samples)
                .collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        drop(all);
        assert_eq!(b.dropped(), 2);
    }

    #[test]
    fn a_batch_stays_until_removed_and_removal_tolerates_overflow() {
        let b = Buffer::new(3, ROOMY);
        for i in 1..=3 {
            b.push(sample(i));
        }
        let batch = b.batch(2, None);
        assert_eq!(seqs(&batch), vec![1, 2]);
        assert_eq!(b.len(), 3);
        // While the batch is in flight, overflow drops seq 1.
        b.push(sample(4));
        assert_eq!(batch.remove(), 1);
        assert_eq!(seqs(&b.batch(10, None)), vec![3, 4]);
        assert_eq!(b.dropped(), 0);
    }

    #[test]
    fn eviction_of_an_in_flight_sample_counts_only_if_the_request_fails() {
        let b = Buffer::new(2, ROOMY);
        b.push(sample(1));
        b.push(sample(2));
        let batch = b.batch(2, None);
        b.push(sample(3)); // evicts 1, in flight
        assert_eq!(b.dropped(), 0);
        batch.remove(); // delivered: 1 was not lost
        assert_eq!(b.dropped(), 0);
        assert_eq!(seqs(&b.batch(10, None)), vec![3]);

        let b = Buffer::new(2, ROOMY);
        b.push(sample(1));
        b.push(sample(2));
        let batch = b.batch(2, None);
        b.push(sample(3)); // evicts 1, in flight
        drop(batch); // the request failed: 1 is lost
        assert_eq!(b.dropped(), 1);
        b.push(sample(4)); // evicts 2, not in flight
        assert_eq!(b.dropped(), 2);
        assert_eq!(seqs(&b.batch(10, None)), vec![3, 4]);
    }

    #[test]
    fn the_byte_bound_keeps_the_newest_that_fit() {
        let one = footprint(&sample(1));
        let b = Buffer::new(1000, 3 * one);
        for i in 1..=10 {
            b.push(sample(i));
        }
        let st = b.figures();
        assert_eq!((st.len, st.dropped), (3, 7));
        assert_eq!(st.bytes, 3 * one);
        assert_eq!(seqs(&b.batch(10, None)), vec![8, 9, 10]);
        // Even a bound smaller than one sample keeps the newest one.
        let b = Buffer::new(1000, 1);
        b.push(sample(1));
        b.push(sample(2));
        assert_eq!(seqs(&b.batch(10, None)), vec![2]);
        // Removal gives the bytes back.
        let b = Buffer::new(10, ROOMY);
        b.push(sample(1));
        b.batch(10, None).remove();
        assert_eq!(b.figures().bytes, 0);
    }

    #[test]
    fn a_lowered_bound_is_met_a_sample_at_a_time_and_a_raised_one_at_once() {
        let one = footprint(&sample(1));
        let b = Buffer::new(1000, 10 * one);
        for i in 1..=10 {
            b.push(sample(i));
        }
        // The guest's memory shrank: the bound is now 4 samples.
        b.set_max_bytes(4 * one);
        assert_eq!(b.figures().len, 10, "nothing dropped when the bound moves");
        assert_eq!(b.max_bytes(), 4 * one);
        // Each new sample takes the room of two old ones: 10 → 9 → … → 4.
        let mut held = Vec::new();
        for i in 11..=20 {
            b.push(sample(i));
            held.push(b.figures().len);
        }
        assert_eq!(held, [9, 8, 7, 6, 5, 4, 4, 4, 4, 4]);
        let st = b.figures();
        assert_eq!((st.dropped, st.bytes), (16, 4 * one));
        assert_eq!(seqs(&b.batch(10, None)), vec![17, 18, 19, 20]);
        // Grown again: room at once, nothing more dropped.
        b.set_max_bytes(8 * one);
        for i in 21..=24 {
            b.push(sample(i));
        }
        let st = b.figures();
        assert_eq!((st.len, st.dropped), (8, 16));
    }

    #[test]
    fn a_batch_spanning_a_restore_is_removed_whole() {
        // The parent's seq 7 and 8, then the restored run's 1, 2 and 3.
        let b = Buffer::new(10, ROOMY);
        for i in [7, 8, 1, 2, 3] {
            b.push(sample(i));
        }
        let batch = b.batch(4, None);
        assert_eq!(seqs(&batch), vec![7, 8, 1, 2]);
        assert_eq!(batch.remove(), 4);
        assert_eq!(seqs(&b.batch(10, None)), vec![3]);
    }

    #[test]
    fn batch_waits_until_deadline_or_close() {
        let b = std::sync::Arc::new(Buffer::new(2, ROOMY));
        let soon = Instant::now() + std::time::Duration::from_millis(20);
        assert!(b.batch(1, Some(soon)).is_empty());
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.batch(1, None).is_empty());
        b.close();
        assert!(t.join().unwrap());
    }

    #[test]
    fn a_sample_is_claimed_only_when_nothing_else_waits_or_is_in_flight() {
        let b = Buffer::new(10, ROOMY);
        let (_, claimed) = b.push_claiming(sample(1), true);
        let claimed = claimed.expect("alone in the buffer");
        assert_eq!(seqs(&claimed), vec![1]);
        // In flight: neither a second claim nor the sender gets it.
        assert!(b.push_claiming(sample(2), true).1.is_none());
        let soon = Instant::now() + std::time::Duration::from_millis(20);
        assert!(b.batch(10, Some(soon)).is_empty());
        assert_eq!(claimed.remove(), 1);
        // Sample 2 still waits: the next one is not claimed past it.
        assert!(b.push_claiming(sample(3), true).1.is_none());
        assert_eq!(seqs(&b.batch(10, None)), vec![2, 3]);
    }

    #[test]
    fn a_claimed_sample_not_sent_wakes_the_sender() {
        let b = std::sync::Arc::new(Buffer::new(10, ROOMY));
        let claimed = b.push_claiming(sample(1), true).1;
        let b2 = b.clone();
        let sender = std::thread::spawn(move || seqs(&b2.batch(10, None)));
        // Released unsent (the collection thread gave up on it): the waiting
        // sender takes it.
        drop(claimed);
        assert_eq!(sender.join().unwrap(), vec![1]);
        assert_eq!(b.len(), 1);
    }
}
