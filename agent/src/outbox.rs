//! What the agent has to tell the coordinator and has not yet seen stored: events and log lines, each
//! with its own sequence, kept in memory until acknowledged and resent on every new connection.
//!
//! [`Outbox`] is a plain state machine (push, take the next batch, acknowledge, rewind); [`Outboxes`]
//! shares the two outboxes between the script runners that fill them and the tunnel that drains them.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use tether_shared::limits;
use tether_shared::proto::{Channel, Event, EventKind, LogLine, LogStream};
use tokio::sync::Notify;

/// Unacknowledged log bytes kept before the oldest lines are dropped. Script output is already capped
/// per script run; this bounds the sum when the coordinator is away for many runs.
pub const MAX_UNACKED_LOG_BYTES: usize = 64 * 1024 * 1024;
/// Unacknowledged event bytes kept before the oldest events are dropped.
pub const MAX_UNACKED_EVENT_BYTES: usize = 8 * 1024 * 1024;

/// An item with a sequence number and a size.
pub trait Sequenced: Clone {
    fn seq(&self) -> u64;
    /// Approximate bytes the item costs, in memory and on the wire.
    fn cost(&self) -> usize;
}

impl Sequenced for Event {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn cost(&self) -> usize {
        64 + match &self.kind {
            EventKind::Lifecycle { detail, .. } => detail.as_ref().map_or(0, String::len),
            EventKind::Span(s) => s.stage.len() + s.name.len(),
        }
    }
}

impl Sequenced for LogLine {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn cost(&self) -> usize {
        // Counting the per-line overhead keeps a batch of many empty lines inside a frame too.
        self.line.len() + self.script.len() + 32
    }
}

/// One sequence of items: numbered from 1, sent in order, trimmed when acknowledged.
///
/// Invariant: `items` holds consecutive sequence numbers, all above `acked`.
#[derive(Debug)]
pub struct Outbox<T> {
    items: VecDeque<T>,
    next_seq: u64,
    /// Everything up to here is stored by the coordinator.
    acked: u64,
    /// Everything up to here went out on the current connection.
    sent: u64,
    bytes: usize,
    max_bytes: usize,
    dropped: u64,
}

impl<T: Sequenced> Outbox<T> {
    pub fn new(max_bytes: usize) -> Self {
        Outbox { items: VecDeque::new(), next_seq: 1, acked: 0, sent: 0, bytes: 0, max_bytes, dropped: 0 }
    }

    /// Adds an item built around its sequence number. Past the memory cap, drops the oldest items
    /// (counted, see [`Outbox::take_dropped`]); the newest item is always kept.
    pub fn push_with(&mut self, make: impl FnOnce(u64) -> T) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let item = make(seq);
        debug_assert_eq!(item.seq(), seq);
        self.bytes += item.cost();
        self.items.push_back(item);
        while self.bytes > self.max_bytes && self.items.len() > 1 {
            if let Some(old) = self.items.pop_front() {
                self.bytes -= old.cost();
                self.dropped += 1;
            }
        }
        seq
    }

    /// The next unsent items, oldest first, at most `max_items` and at most `max_bytes` of
    /// [`Sequenced::cost`] (but always at least one item). Marks them sent on this connection.
    pub fn next_batch(&mut self, max_items: usize, max_bytes: usize) -> Option<Vec<T>> {
        let first = self.items.front()?.seq();
        let start = usize::try_from((self.sent + 1).saturating_sub(first)).unwrap_or(usize::MAX);
        let mut batch = Vec::new();
        let mut bytes = 0;
        for item in self.items.iter().skip(start) {
            if batch.len() >= max_items || (!batch.is_empty() && bytes + item.cost() > max_bytes) {
                break;
            }
            bytes += item.cost();
            batch.push(item.clone());
        }
        let last = batch.last()?.seq();
        self.sent = last;
        Some(batch)
    }

    /// The coordinator stored everything up to and including `seq`.
    pub fn ack(&mut self, seq: u64) {
        // An ack beyond what was ever pushed would otherwise make us skip future items.
        let seq = seq.min(self.next_seq - 1);
        if seq <= self.acked {
            return;
        }
        self.acked = seq;
        while self.items.front().is_some_and(|i| i.seq() <= seq) {
            if let Some(old) = self.items.pop_front() {
                self.bytes -= old.cost();
            }
        }
        self.sent = self.sent.max(seq);
    }

    /// A new connection: everything not acknowledged is unsent again.
    pub fn rewind(&mut self) {
        self.sent = self.acked;
    }

    /// Nothing waits for an acknowledgement.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Items waiting for an acknowledgement, sent or not.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// How many items the memory cap dropped since the last call.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

#[derive(Debug)]
struct Inner {
    events: Outbox<Event>,
    logs: Outbox<LogLine>,
    /// Lines dropped by the memory cap and not yet reported: (build, script, count).
    log_drops: Option<(u64, String, u64)>,
}

/// The two outboxes, shared between the producers (phases, the agent loop) and the tunnel.
#[derive(Debug)]
pub struct Outboxes {
    inner: Mutex<Inner>,
    /// Something was pushed to the events outbox.
    pub events_ready: Notify,
    /// Something was pushed to the logs outbox.
    pub logs_ready: Notify,
    /// An acknowledgement arrived.
    pub acked: Notify,
}

impl Default for Outboxes {
    fn default() -> Self {
        Self::new(MAX_UNACKED_EVENT_BYTES, MAX_UNACKED_LOG_BYTES)
    }
}

impl Outboxes {
    pub fn new(max_event_bytes: usize, max_log_bytes: usize) -> Self {
        Outboxes {
            inner: Mutex::new(Inner {
                events: Outbox::new(max_event_bytes),
                logs: Outbox::new(max_log_bytes),
                log_drops: None,
            }),
            events_ready: Notify::new(),
            logs_ready: Notify::new(),
            acked: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The guarded data stays consistent even if a holder panicked: every method leaves it valid.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn push_event(&self, build: u64, kind: EventKind) -> u64 {
        let (seq, dropped) = {
            let mut inner = self.lock();
            let seq = inner.events.push_with(|seq| Event { seq, build, kind });
            (seq, inner.events.take_dropped())
        };
        if dropped > 0 {
            tracing::warn!(dropped, "dropped the oldest unacknowledged events: too many waiting for the coordinator");
        }
        self.events_ready.notify_one();
        seq
    }

    pub fn push_log(&self, build: u64, script: &str, stream: LogStream, at_ms: i64, line: String) -> u64 {
        let seq = {
            let mut inner = self.lock();
            let seq = inner.logs.push_with(|seq| LogLine { seq, build, script: script.to_string(), stream, at_ms, line });
            let dropped = inner.logs.take_dropped();
            if dropped > 0 {
                let note = inner.log_drops.get_or_insert_with(|| (build, script.to_string(), 0));
                note.2 += dropped;
            }
            seq
        };
        self.logs_ready.notify_one();
        seq
    }

    /// A connection was welcomed: trim what the coordinator already has and resend the rest.
    pub fn welcome(&self, events_acked: u64, logs_acked: u64) {
        let mut inner = self.lock();
        inner.events.ack(events_acked);
        inner.events.rewind();
        inner.logs.ack(logs_acked);
        inner.logs.rewind();
        drop(inner);
        self.events_ready.notify_one();
        self.logs_ready.notify_one();
        self.acked.notify_one();
    }

    pub fn ack(&self, channel: Channel, seq: u64) {
        {
            let mut inner = self.lock();
            match channel {
                Channel::Events => inner.events.ack(seq),
                Channel::Logs => inner.logs.ack(seq),
            }
        }
        self.acked.notify_one();
    }

    pub fn next_events(&self) -> Option<Vec<Event>> {
        self.lock().events.next_batch(limits::MAX_EVENTS_PER_BATCH, usize::MAX)
    }

    pub fn next_logs(&self) -> Option<Vec<LogLine>> {
        let mut inner = self.lock();
        if let Some((build, script, count)) = inner.log_drops.take() {
            tracing::warn!(dropped = count, "dropped the oldest unacknowledged log lines: over the memory cap");
            let line = format!(
                "[tether-agent: {count} older log lines were dropped: more than {} MiB waited for the coordinator]",
                MAX_UNACKED_LOG_BYTES / (1024 * 1024)
            );
            let at_ms = tether_shared::now_ms();
            inner.logs.push_with(|seq| LogLine { seq, build, script, stream: LogStream::Stderr, at_ms, line });
            // Drops caused by the note itself are only counted in the tracing line above.
            inner.logs.take_dropped();
        }
        inner.logs.next_batch(usize::MAX, limits::MAX_LOG_BATCH_BYTES)
    }

    /// Nothing waits for an acknowledgement on either channel.
    pub fn all_acked(&self) -> bool {
        let inner = self.lock();
        inner.events.is_empty() && inner.logs.is_empty()
    }

    /// (events, log lines) waiting for an acknowledgement.
    pub fn pending(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.events.len(), inner.logs.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_shared::Lifecycle;

    #[derive(Debug, Clone, PartialEq)]
    struct Item {
        seq: u64,
        size: usize,
    }

    impl Sequenced for Item {
        fn seq(&self) -> u64 {
            self.seq
        }
        fn cost(&self) -> usize {
            self.size
        }
    }

    fn seqs(batch: Option<Vec<Item>>) -> Vec<u64> {
        batch.unwrap_or_default().iter().map(|i| i.seq).collect()
    }

    fn outbox_with(n: usize, size: usize) -> Outbox<Item> {
        let mut o = Outbox::new(usize::MAX);
        for _ in 0..n {
            o.push_with(|seq| Item { seq, size });
        }
        o
    }

    #[test]
    fn sequence_starts_at_one_and_batches_honour_count() {
        let mut o = outbox_with(5, 10);
        assert_eq!(seqs(o.next_batch(2, usize::MAX)), vec![1, 2]);
        assert_eq!(seqs(o.next_batch(2, usize::MAX)), vec![3, 4]);
        assert_eq!(seqs(o.next_batch(2, usize::MAX)), vec![5]);
        assert_eq!(seqs(o.next_batch(2, usize::MAX)), Vec::<u64>::new(), "nothing is sent twice");
        o.push_with(|seq| Item { seq, size: 10 });
        assert_eq!(seqs(o.next_batch(2, usize::MAX)), vec![6]);
    }

    #[test]
    fn batches_honour_bytes_but_always_carry_one_item() {
        let mut o = outbox_with(4, 100);
        assert_eq!(seqs(o.next_batch(usize::MAX, 250)), vec![1, 2]);
        assert_eq!(seqs(o.next_batch(usize::MAX, 50)), vec![3], "an item bigger than the budget still goes");
        assert_eq!(seqs(o.next_batch(usize::MAX, 100)), vec![4]);
    }

    #[test]
    fn acks_trim_and_rewind_resends_the_rest() {
        let mut o = outbox_with(5, 10);
        assert_eq!(seqs(o.next_batch(10, usize::MAX)), vec![1, 2, 3, 4, 5]);
        o.ack(2);
        assert_eq!((o.len(), o.bytes(), o.acked()), (3, 30, 2));
        assert!(o.next_batch(10, usize::MAX).is_none());
        // Connection lost: a new connection resends everything still unacked, once.
        o.rewind();
        assert_eq!(seqs(o.next_batch(10, usize::MAX)), vec![3, 4, 5]);
        assert!(o.next_batch(10, usize::MAX).is_none());
        o.ack(5);
        assert!(o.is_empty());
        assert_eq!(o.bytes(), 0);
    }

    #[test]
    fn welcome_ack_skips_what_is_stored() {
        let mut o = outbox_with(5, 10);
        assert_eq!(seqs(o.next_batch(2, usize::MAX)), vec![1, 2]);
        // The new connection's welcome says 3 is stored (it arrived before the old one died).
        o.ack(3);
        o.rewind();
        assert_eq!(seqs(o.next_batch(10, usize::MAX)), vec![4, 5]);
    }

    #[test]
    fn stale_and_impossible_acks_are_harmless() {
        let mut o = outbox_with(3, 10);
        o.ack(2);
        o.ack(1);
        assert_eq!(o.acked(), 2);
        o.ack(1000);
        assert_eq!(o.acked(), 3, "an ack beyond the last pushed item is clamped");
        assert!(o.is_empty());
        o.push_with(|seq| Item { seq, size: 10 });
        assert_eq!(seqs(o.next_batch(10, usize::MAX)), vec![4]);
    }

    #[test]
    fn ack_while_unsent_moves_the_cursor() {
        let mut o = outbox_with(4, 10);
        o.ack(2);
        assert_eq!(seqs(o.next_batch(10, usize::MAX)), vec![3, 4]);
    }

    #[test]
    fn memory_cap_drops_the_oldest_and_counts() {
        let mut o = Outbox::new(35);
        for _ in 0..5 {
            o.push_with(|seq| Item { seq, size: 10 });
        }
        assert_eq!(o.len(), 3);
        assert_eq!(o.take_dropped(), 2);
        assert_eq!(o.take_dropped(), 0);
        assert_eq!(seqs(o.next_batch(10, usize::MAX)), vec![3, 4, 5]);
        // Dropping below the sent cursor keeps the cursor valid.
        o.push_with(|seq| Item { seq, size: 30 });
        assert_eq!(o.take_dropped(), 3);
        assert_eq!(seqs(o.next_batch(10, usize::MAX)), vec![6]);
        o.rewind();
        assert_eq!(seqs(o.next_batch(10, usize::MAX)), vec![6]);
        // One item over the cap on its own is still kept.
        o.push_with(|seq| Item { seq, size: 100 });
        assert_eq!(o.len(), 1);
    }

    #[test]
    fn shared_outboxes_batch_by_protocol_limits() {
        let o = Outboxes::default();
        for i in 0..300 {
            o.push_event(1, EventKind::Lifecycle { state: Lifecycle::Starting, at_ms: i, detail: None });
        }
        assert_eq!(o.next_events().unwrap().len(), limits::MAX_EVENTS_PER_BATCH);
        assert_eq!(o.next_events().unwrap().len(), 300 - limits::MAX_EVENTS_PER_BATCH);
        assert!(o.next_events().is_none());

        let line = "x".repeat(limits::MAX_LOG_LINE);
        for _ in 0..40 {
            o.push_log(1, "build", LogStream::Stdout, 0, line.clone());
        }
        let batch = o.next_logs().unwrap();
        let text: usize = batch.iter().map(|l| l.line.len()).sum();
        assert!(text <= limits::MAX_LOG_BATCH_BYTES, "{text}");
        assert_eq!(batch.len(), limits::MAX_LOG_BATCH_BYTES / (limits::MAX_LOG_LINE + 32 + 5));
        // And the batch fits one frame.
        let frame = tether_shared::frame::encode(&tether_shared::proto::LogBatch { lines: batch }).unwrap();
        assert!(frame.len() <= limits::MAX_FRAME);

        assert_eq!(o.pending(), (300, 40));
        o.ack(Channel::Events, 300);
        o.ack(Channel::Logs, 40);
        assert!(o.all_acked());
    }

    #[test]
    fn dropped_log_lines_are_reported_in_the_stream() {
        let o = Outboxes::new(MAX_UNACKED_EVENT_BYTES, 1000);
        for i in 0..20 {
            o.push_log(4, "seed", LogStream::Stdout, 0, format!("line {i:03} {}", "x".repeat(50)));
        }
        let batch = o.next_logs().unwrap();
        let last = batch.last().unwrap();
        assert!(last.line.starts_with("[tether-agent: "), "{last:?}");
        assert!(last.line.contains("older log lines were dropped"), "{last:?}");
        assert_eq!((last.build, last.script.as_str()), (4, "seed"));
        assert!(batch[0].seq > 1, "the oldest lines went first");
    }
}
