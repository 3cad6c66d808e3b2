//! What the agent has to tell the coordinator and has not yet seen stored: events and log lines, each
//! with its own sequence, kept in memory until acknowledged and resent on every new connection.
//!
//! [`Outbox`] is a plain state machine (push, take the next batch, acknowledge, rewind); [`Outboxes`]
//! shares the two outboxes between the script runners that fill them and the tunnel that drains them.

use crate::clock::WallClock;
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
/// Log batches sent and not yet acknowledged, at most: one being stored while the next travels. The
/// coordinator gives each agent 1 MiB of flow-control credit for its control and log streams
/// together, and a log stream's own window is larger (the coordinator's stream window is sized
/// for SSH downloads), so without this a long build's output could take all of it and hold
/// heartbeats and events behind the coordinator's database writes.
pub const MAX_LOG_BATCHES_IN_FLIGHT: usize = 2;
/// How long, on one connection, an event held behind log lines waits for them to be stored before
/// it goes anyway (a coordinator that stores no logs must still learn the verdict).
pub const LOGS_FIRST_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Memory an item costs beyond its text: the struct and its allocations' headers. Counting it keeps
/// a flood of empty lines bounded too; the coordinator checks a log batch's size the same way.
pub use tether_shared::limits::ITEM_OVERHEAD;

/// An item with a sequence number and a size.
pub trait Sequenced: Clone {
    fn seq(&self) -> u64;
    /// Approximate bytes the item costs in memory, at least its size on the wire.
    fn cost(&self) -> usize;
}

impl Sequenced for Event {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn cost(&self) -> usize {
        ITEM_OVERHEAD
            + match &self.kind {
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
        LogLine::cost(self)
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
    /// Every item the memory cap ever dropped, for metrics.
    dropped_total: u64,
}

impl<T: Sequenced> Outbox<T> {
    pub fn new(max_bytes: usize) -> Self {
        Outbox {
            items: VecDeque::new(),
            next_seq: 1,
            acked: 0,
            sent: 0,
            bytes: 0,
            max_bytes,
            dropped: 0,
            dropped_total: 0,
        }
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
                self.dropped_total += 1;
            }
        }
        seq
    }

    /// The next unsent items, oldest first, at most `max_items` and at most `max_bytes` of
    /// [`Sequenced::cost`] (but always at least one item). Marks them sent on this connection.
    pub fn next_batch(&mut self, max_items: usize, max_bytes: usize) -> Option<Vec<T>> {
        self.next_batch_before(max_items, max_bytes, u64::MAX)
    }

    /// Like [`Outbox::next_batch`], but only items with a sequence number below `end`.
    pub fn next_batch_before(&mut self, max_items: usize, max_bytes: usize, end: u64) -> Option<Vec<T>> {
        let first = self.items.front()?.seq();
        let start = usize::try_from((self.sent + 1).saturating_sub(first)).unwrap_or(usize::MAX);
        let mut batch = Vec::new();
        let mut bytes = 0;
        for item in self.items.iter().skip(start) {
            if item.seq() >= end || batch.len() >= max_items || (!batch.is_empty() && bytes + item.cost() > max_bytes) {
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

    /// Something went out on this connection and is not acknowledged yet.
    pub fn in_flight(&self) -> bool {
        self.sent > self.acked
    }

    /// A new connection: everything not acknowledged is unsent again.
    pub fn rewind(&mut self) {
        self.sent = self.acked;
    }

    /// Some item numbered `from` or later has not been sent on this connection.
    pub fn has_unsent_from(&self, from: u64) -> bool {
        self.last_seq() > self.sent && self.last_seq() >= from
    }

    /// The sequence number of the newest item pushed (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
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

    /// How many items the memory cap dropped in all.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total
    }
}

/// What the outboxes hold and have lost, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxStats {
    pub events_pending: usize,
    pub events_dropped: u64,
    /// Log lines ever queued (including the agent's own notes about dropped lines).
    pub logs_queued: u64,
    pub logs_pending: usize,
    pub logs_dropped: u64,
}

#[derive(Debug)]
struct Inner {
    events: Outbox<Event>,
    logs: Outbox<LogLine>,
    /// Lines dropped by the memory cap and not yet reported: (build, script, count).
    log_drops: Option<(u64, String, u64)>,
    barrier: Option<Barrier>,
    /// The last sequence number of each log batch sent on this connection and not yet
    /// acknowledged, oldest first.
    log_batches: VecDeque<u64>,
}

/// Events from `event_seq` on wait until the log lines up to `log_seq` are stored.
#[derive(Debug, Clone, Copy)]
struct Barrier {
    event_seq: u64,
    log_seq: u64,
}

impl Inner {
    /// The first event sequence number the barrier holds back, if it holds anything back.
    fn held_from(&self) -> Option<u64> {
        let b = self.barrier?;
        let blocked = self.logs.acked() < b.log_seq && self.events.last_seq() >= b.event_seq;
        blocked.then_some(b.event_seq)
    }

    fn lift_barrier_if_met(&mut self) {
        if self.barrier.is_some_and(|b| self.logs.acked() >= b.log_seq) {
            self.barrier = None;
        }
    }
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
                barrier: None,
                log_batches: VecDeque::new(),
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

    /// Pushes an event that must not reach the coordinator before the log lines pushed so far:
    /// whoever sees a phase's verdict stored can then already read the phase's output. The tunnel
    /// may still let it through after [`LOGS_FIRST_GRACE`] on a connection that stores no logs.
    pub fn push_event_after_logs(&self, build: u64, kind: EventKind) -> u64 {
        let seq = {
            let mut inner = self.lock();
            let log_seq = inner.logs.last_seq();
            let seq = inner.events.push_with(|seq| Event { seq, build, kind });
            if inner.logs.acked() < log_seq {
                let event_seq = inner.barrier.map_or(seq, |b| b.event_seq.min(seq));
                inner.barrier = Some(Barrier { event_seq, log_seq });
            }
            seq
        };
        self.events_ready.notify_one();
        seq
    }

    pub fn push_log(&self, build: u64, script: &str, stream: LogStream, at_ms: i64, line: String) -> u64 {
        let seq = {
            let mut inner = self.lock();
            let seq =
                inner.logs.push_with(|seq| LogLine { seq, build, script: script.to_string(), stream, at_ms, line });
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
        inner.log_batches.clear();
        inner.lift_barrier_if_met();
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
                Channel::Logs => {
                    inner.logs.ack(seq);
                    inner.lift_barrier_if_met();
                }
            }
        }
        // The next event batch may go now (after an event ack, or a log ack lifting a barrier), and
        // the next log batch (after a log ack, see `MAX_LOG_BATCHES_IN_FLIGHT`).
        self.events_ready.notify_one();
        self.logs_ready.notify_one();
        self.acked.notify_one();
    }

    /// The next event batch, once the previous one is acknowledged. Events go one batch at a time:
    /// the coordinator answers a batch it could not store with an error and keeps reading, so a
    /// later batch must not overtake it (its acknowledgement would cover the lost one).
    ///
    /// Events behind a log barrier (see [`Outboxes::push_event_after_logs`]) wait unless
    /// `past_barrier`.
    pub fn next_events(&self, past_barrier: bool) -> Option<Vec<Event>> {
        let mut inner = self.lock();
        if inner.events.in_flight() {
            return None;
        }
        let end = if past_barrier { None } else { inner.held_from() };
        inner.events.next_batch_before(limits::MAX_EVENTS_PER_BATCH, usize::MAX, end.unwrap_or(u64::MAX))
    }

    /// Unsent events wait for log lines to be stored.
    pub fn events_held(&self) -> bool {
        let inner = self.lock();
        inner.held_from().is_some_and(|from| inner.events.has_unsent_from(from))
    }

    /// An event batch is sent and not yet acknowledged.
    pub fn events_in_flight(&self) -> bool {
        self.lock().events.in_flight()
    }

    /// The next batch of log lines; a note of lines dropped, if any, is stamped by `clock`.
    pub fn next_logs(&self, clock: &WallClock) -> Option<Vec<LogLine>> {
        let mut inner = self.lock();
        let acked = inner.logs.acked();
        while inner.log_batches.front().is_some_and(|last| *last <= acked) {
            inner.log_batches.pop_front();
        }
        if inner.log_batches.len() >= MAX_LOG_BATCHES_IN_FLIGHT {
            return None;
        }
        if let Some((build, script, count)) = inner.log_drops.take() {
            tracing::warn!(dropped = count, "dropped the oldest unacknowledged log lines: over the memory cap");
            let line = format!(
                "[tether-agent: {count} older log lines were dropped: more than {} MiB waited for the coordinator]",
                MAX_UNACKED_LOG_BYTES / (1024 * 1024)
            );
            let at_ms = clock.now_ms();
            inner.logs.push_with(|seq| LogLine { seq, build, script, stream: LogStream::Stderr, at_ms, line });
            // Drops caused by the note itself are only counted in the tracing line above.
            inner.logs.take_dropped();
        }
        let batch = inner.logs.next_batch(usize::MAX, limits::MAX_LOG_BATCH_BYTES)?;
        inner.log_batches.extend(batch.last().map(|l| l.seq));
        Some(batch)
    }

    /// Nothing waits for an acknowledgement on either channel.
    pub fn all_acked(&self) -> bool {
        let inner = self.lock();
        inner.events.is_empty() && inner.logs.is_empty()
    }

    pub fn stats(&self) -> OutboxStats {
        let inner = self.lock();
        OutboxStats {
            events_pending: inner.events.len(),
            events_dropped: inner.events.dropped_total(),
            logs_queued: inner.logs.last_seq(),
            logs_pending: inner.logs.len(),
            logs_dropped: inner.logs.dropped_total(),
        }
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
        let first = o.next_events(false).unwrap();
        assert_eq!(first.len(), limits::MAX_EVENTS_PER_BATCH);
        assert!(o.events_in_flight());
        assert!(o.next_events(false).is_none(), "one event batch at a time");
        o.ack(Channel::Events, first.last().unwrap().seq);
        assert!(!o.events_in_flight());
        assert_eq!(o.next_events(false).unwrap().len(), 300 - limits::MAX_EVENTS_PER_BATCH);
        assert!(o.next_events(false).is_none());

        let line = "x".repeat(limits::MAX_LOG_LINE);
        for _ in 0..40 {
            o.push_log(1, "build", LogStream::Stdout, 0, line.clone());
        }
        let batch = o.next_logs(&WallClock::start()).unwrap();
        let text: usize = batch.iter().map(|l| l.line.len()).sum();
        assert!(text <= limits::MAX_LOG_BATCH_BYTES, "{text}");
        assert_eq!(batch.len(), limits::MAX_LOG_BATCH_BYTES / (limits::MAX_LOG_LINE + ITEM_OVERHEAD + "build".len()));
        let empty: Vec<LogLine> = (0..100_000)
            .map(|seq| LogLine {
                seq,
                build: u64::MAX,
                script: "x".repeat(limits::MAX_NAME),
                stream: LogStream::Stderr,
                at_ms: i64::MIN,
                line: String::new(),
            })
            .collect();
        let n = limits::MAX_LOG_BATCH_BYTES / empty[0].cost();
        let frame = tether_shared::frame::encode(&tether_shared::proto::LogBatch { lines: empty[..n].to_vec() });
        assert!(frame.is_ok(), "a batch of the most empty lines still fits a frame");
        // And the batch fits one frame.
        let frame = tether_shared::frame::encode(&tether_shared::proto::LogBatch { lines: batch }).unwrap();
        assert!(frame.len() <= limits::MAX_FRAME);

        assert_eq!(o.pending(), (300 - limits::MAX_EVENTS_PER_BATCH, 40));
        o.ack(Channel::Events, 300);
        o.ack(Channel::Logs, 40);
        assert!(o.all_acked());
    }

    #[test]
    fn a_verdict_waits_for_the_output_before_it() {
        let o = Outboxes::default();
        let lifecycle = |state| EventKind::Lifecycle { state, at_ms: 0, detail: None };
        o.push_event(1, lifecycle(Lifecycle::Starting));
        o.push_log(1, "s", LogStream::Stdout, 0, "one".into());
        o.push_log(1, "s", LogStream::Stdout, 0, "two".into());
        o.push_event_after_logs(1, lifecycle(Lifecycle::Ready));
        o.push_event(1, lifecycle(Lifecycle::ShuttingDown));
        assert_eq!(o.next_events(false).unwrap().len(), 1, "only what precedes the verdict");
        o.ack(Channel::Events, 1);
        assert!(o.events_held());
        assert!(o.next_events(false).is_none());
        o.ack(Channel::Logs, 1);
        assert!(o.next_events(false).is_none(), "line two is not stored yet");
        o.ack(Channel::Logs, 2);
        assert!(!o.events_held());
        assert_eq!(o.next_events(false).unwrap().len(), 2);

        // With the logs already stored there is no barrier; and the tunnel may overrule one.
        o.ack(Channel::Events, 3);
        o.push_event_after_logs(1, lifecycle(Lifecycle::Off));
        assert!(!o.events_held());
        assert_eq!(o.next_events(false).unwrap().len(), 1);
        o.ack(Channel::Events, 4);
        o.push_log(1, "s", LogStream::Stdout, 0, "three".into());
        o.push_event_after_logs(2, lifecycle(Lifecycle::Ready));
        assert!(o.events_held());
        assert_eq!(o.next_events(true).unwrap().len(), 1);
    }

    #[test]
    fn dropped_log_lines_are_reported_in_the_stream() {
        let o = Outboxes::new(MAX_UNACKED_EVENT_BYTES, 2000);
        for i in 0..20 {
            o.push_log(4, "seed", LogStream::Stdout, 0, format!("line {i:03} {}", "x".repeat(50)));
        }
        let batch = o.next_logs(&WallClock::start()).unwrap();
        let last = batch.last().unwrap();
        assert!(last.line.starts_with("[tether-agent: "), "{last:?}");
        assert!(last.line.contains("older log lines were dropped"), "{last:?}");
        assert_eq!((last.build, last.script.as_str()), (4, "seed"));
        assert!(batch[0].seq > 1, "the oldest lines went first");
    }

    #[test]
    fn at_most_two_log_batches_wait_for_their_acknowledgement() {
        let o = Outboxes::default();
        let clock = WallClock::start();
        // Lines of 100 KiB: two fill a batch.
        for i in 0..8 {
            o.push_log(1, "s", LogStream::Stdout, 0, format!("{i}{}", "x".repeat(100 * 1024)));
        }
        let first = o.next_logs(&clock).unwrap();
        let second = o.next_logs(&clock).unwrap();
        assert!(o.next_logs(&clock).is_none(), "two batches are in flight");
        o.ack(Channel::Logs, first.last().unwrap().seq);
        let third = o.next_logs(&clock).unwrap();
        assert_eq!(third[0].seq, second.last().unwrap().seq + 1);
        assert!(o.next_logs(&clock).is_none());
        // A new connection resends everything not acknowledged, again two batches at a time.
        o.welcome(0, first.last().unwrap().seq);
        assert_eq!(o.next_logs(&clock).unwrap()[0].seq, second[0].seq);
        assert!(o.next_logs(&clock).is_some());
        assert!(o.next_logs(&clock).is_none());
    }
}
