//! What clients send on channels, and the flow control russh leaves to us.
//!
//! russh grants a channel more window as soon as data arrives, not when it is consumed, and hands
//! each packet to a bounded queue per channel whose `send` blocks its whole session loop when full.
//! A process that stops reading its input while the client keeps sending (`ssh ws 'gzip' < big`,
//! whose output waits on the client's window) would then stall the loop, the loop would stop reading
//! the client's window adjustments, the output would never move, and the process would never read
//! again: a deadlock OpenSSH's sshd avoids by granting window only for what was consumed.
//!
//! So each channel's consumer takes packets from russh as they arrive into a [`Queue`] and counts
//! what it holds, and the connection's `adjust_window` asks [`Backlogs::window_for`]: while a
//! channel's consumer is more than [`HIGH_WATER`] behind, russh grants only [`TRICKLE`] bytes at a
//! time, the client's window for it runs dry, and the client stops sending, while the loop stays free
//! for everything else. A queue stops taking packets only past [`HARD_CAP`], which a client that
//! honours its window does not reach.
//!
//! russh sends a window adjustment only when data arrives, so a channel whose window is withheld
//! keeps trickling: two bytes each way per round trip. At a loopback's round trip that is thousands
//! of packets a second through the client, the coordinator and the agent for as long as the process
//! does not read, a busy loop `sshd` does not have. So the session's `data` callback, for a packet
//! of a channel whose consumer is behind, waits ([`Backlogs::pause`]) until the consumer catches up,
//! or at most [`PAUSE`]: the trickle then costs a packet per `PAUSE`, and the consumer catching up
//! still opens the window at once. Other channels of the connection wait that long at most.

use super::WINDOW;
use bytes::Bytes;
use russh::ChannelId;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Window granted while a channel's consumer is behind: two bytes per round trip keeps russh's
/// refill going (it refills when the window falls under half the target) without letting data in.
pub const TRICKLE: u32 = 2;
/// Bytes held for a channel's consumer beyond which its window is withheld.
pub const HIGH_WATER: usize = WINDOW as usize;
/// Bytes held for a channel's consumer beyond which it stops taking packets from russh. A client
/// that honours its window stays under `HIGH_WATER` plus one window.
pub const HARD_CAP: usize = 4 * WINDOW as usize;
/// What a packet costs beyond its bytes, so a flood of one-byte packets is bounded too.
const PACKET_COST: usize = 64;
/// Longest a packet of a channel whose consumer is behind holds the session loop.
pub const PAUSE: Duration = Duration::from_millis(20);

/// What one channel's consumer holds, and a wake-up for when it falls back under `HIGH_WATER`.
#[derive(Debug, Default)]
struct Held {
    bytes: AtomicUsize,
    caught_up: Notify,
}

/// The channels of one SSH connection whose consumers count what they hold.
#[derive(Debug, Default)]
pub struct Backlogs {
    /// By channel number (russh's `ChannelId` cannot be made outside russh).
    channels: Mutex<HashMap<u32, Arc<Held>>>,
}

impl Backlogs {
    /// A queue for `id`'s input, counted here until it is dropped.
    pub fn queue(self: &Arc<Self>, id: ChannelId) -> Queue {
        self.queue_for(id.number())
    }

    fn queue_for(self: &Arc<Self>, id: u32) -> Queue {
        let held = Arc::new(Held::default());
        self.lock().insert(id, held.clone());
        Queue { id, backlogs: self.clone(), held, packets: VecDeque::new(), offset: 0 }
    }

    /// The window russh should grant next after refilling `id`'s: withheld while its consumer is
    /// behind. russh keeps one target per connection and asks again at each refill, so another
    /// channel's refill restores the full window for its own, and a stalled channel's next trickle
    /// refill may then get a full window too: with busy neighbours a stalled channel's queue still
    /// grows, up to `HARD_CAP`, where the connection waits for it as before.
    pub fn window_for(&self, id: ChannelId) -> u32 {
        self.window_for_number(id.number())
    }

    fn window_for_number(&self, id: u32) -> u32 {
        match self.lock().get(&id) {
            Some(held) if held.bytes.load(Ordering::Relaxed) > HIGH_WATER => TRICKLE,
            _ => WINDOW,
        }
    }

    /// For a packet that arrived on `id`: while its consumer is behind, waits until it catches up,
    /// or [`PAUSE`] at most, so that a withheld window trickles slowly (see the module's docs).
    pub async fn pause(&self, id: ChannelId) {
        self.pause_number(id.number()).await
    }

    async fn pause_number(&self, id: u32) {
        // Every packet comes here: the usual answer (not behind) costs one look under the lock.
        let behind = |held: &Held| held.bytes.load(Ordering::Relaxed) > HIGH_WATER;
        let held = match self.lock().get(&id) {
            Some(held) if behind(held) => held.clone(),
            _ => return,
        };
        // Registered before the second look, so a catch-up in between still wakes it.
        let caught_up = held.caught_up.notified();
        if behind(&held) {
            let _ = tokio::time::timeout(PAUSE, caught_up).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Held>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A channel's input, taken from russh and not yet consumed.
#[derive(Debug)]
pub struct Queue {
    id: u32,
    backlogs: Arc<Backlogs>,
    /// Bytes held plus `PACKET_COST` per packet, shared with [`Backlogs::window_for`].
    held: Arc<Held>,
    packets: VecDeque<Bytes>,
    /// Bytes of the front packet already consumed.
    offset: usize,
}

impl Queue {
    /// Whether to take another packet from russh.
    pub fn has_room(&self) -> bool {
        self.held.bytes.load(Ordering::Relaxed) < HARD_CAP
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    pub fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.held.bytes.fetch_add(data.len() + PACKET_COST, Ordering::Relaxed);
        self.packets.push_back(data);
    }

    /// The bytes to consume next; empty when there are none.
    pub fn front(&self) -> &[u8] {
        self.packets.front().map_or(&[][..], |p| &p[self.offset..])
    }

    /// `n` bytes of [`Queue::front`] were consumed.
    pub fn consume(&mut self, n: usize) {
        let Some(front) = self.packets.front() else { return };
        let n = n.min(front.len() - self.offset);
        self.offset += n;
        let mut freed = n;
        if self.offset == front.len() {
            self.packets.pop_front();
            self.offset = 0;
            freed += PACKET_COST;
        }
        let before = self.held.bytes.fetch_sub(freed, Ordering::Relaxed);
        if before > HIGH_WATER && before - freed <= HIGH_WATER {
            self.held.caught_up.notify_waiters();
        }
    }

    /// Drops everything held (the consumer is gone).
    pub fn clear(&mut self) {
        self.packets.clear();
        self.offset = 0;
        self.held.bytes.store(0, Ordering::Relaxed);
        self.held.caught_up.notify_waiters();
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.backlogs.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_withheld_while_a_consumer_is_behind_and_only_for_its_channel() {
        let backlogs = Arc::new(Backlogs::default());
        let (a, b) = (1, 2);
        let mut qa = backlogs.queue_for(a);
        let _qb = backlogs.queue_for(b);
        let packet = Bytes::from(vec![7u8; 32 * 1024]);
        while backlogs.window_for_number(a) == WINDOW {
            qa.push(packet.clone());
        }
        assert_eq!(backlogs.window_for_number(a), TRICKLE);
        assert_eq!(backlogs.window_for_number(b), WINDOW, "another channel keeps its window");
        assert!(qa.has_room(), "past the high-water mark, packets are still taken");
        // Consumed in odd pieces: the window opens again once the consumer catches up.
        while !qa.is_empty() {
            let n = qa.front().len().min(10_000);
            qa.consume(n);
        }
        assert_eq!(backlogs.window_for_number(a), WINDOW);
        assert_eq!(qa.held.bytes.load(Ordering::Relaxed), 0, "everything counted is released");
        drop(qa);
        assert_eq!(backlogs.window_for_number(a), WINDOW, "a dropped queue is forgotten");
        assert!(!backlogs.lock().contains_key(&a));
    }

    #[test]
    fn one_byte_packets_count_their_cost_and_the_hard_cap_stops_taking() {
        let backlogs = Arc::new(Backlogs::default());
        let mut q = backlogs.queue_for(3);
        let mut pushed = 0usize;
        while q.has_room() {
            q.push(Bytes::from_static(b"x"));
            pushed += 1;
        }
        assert_eq!(pushed, HARD_CAP.div_ceil(1 + PACKET_COST));
        assert_eq!(q.front(), b"x");
        q.clear();
        assert!(q.is_empty() && q.has_room());
        assert_eq!(q.front(), b"");
    }
}
