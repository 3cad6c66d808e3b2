//! What users do over SSH, counted for heartbeats: open connections and sessions, bytes, and when the
//! last byte moved. Counting happens where bytes are copied, so keep-alives never count as activity.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use tether_shared::proto::SshActivity;

/// Shared counters; cheap to update from any task.
#[derive(Debug, Default)]
pub struct Activity {
    connections: AtomicU32,
    sessions: AtomicU32,
    last_activity_ms: AtomicI64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Activity {
    pub fn snapshot(&self) -> SshActivity {
        SshActivity {
            connections: self.connections.load(Ordering::Relaxed),
            sessions: self.sessions.load(Ordering::Relaxed),
            last_activity_ms: self.last_activity_ms.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }

    /// Bytes received from a client (channel payload).
    pub fn received(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    /// Bytes sent to a client (channel payload).
    pub fn sent(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    fn touch(&self) {
        self.last_activity_ms.store(tether_shared::now_ms(), Ordering::Relaxed);
    }

    /// Counts one connection until the guard is dropped.
    pub fn connection(self: &Arc<Self>) -> Gauge {
        self.touch();
        Gauge::new(self.clone(), Which::Connections)
    }

    /// Counts one session (shell, command or subsystem) until the guard is dropped.
    pub fn session(self: &Arc<Self>) -> Gauge {
        self.touch();
        Gauge::new(self.clone(), Which::Sessions)
    }
}

#[derive(Debug, Clone, Copy)]
enum Which {
    Connections,
    Sessions,
}

/// Holds one unit of a gauge; gives it back on drop.
#[derive(Debug)]
pub struct Gauge {
    activity: Arc<Activity>,
    which: Which,
}

impl Gauge {
    fn new(activity: Arc<Activity>, which: Which) -> Self {
        activity.counter(which).fetch_add(1, Ordering::Relaxed);
        Gauge { activity, which }
    }
}

impl Activity {
    fn counter(&self, which: Which) -> &AtomicU32 {
        match which {
            Which::Connections => &self.connections,
            Which::Sessions => &self.sessions,
        }
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.activity.counter(self.which).fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauges_and_bytes() {
        let a = Arc::new(Activity::default());
        assert_eq!(a.snapshot(), SshActivity::default());
        let c = a.connection();
        let s1 = a.session();
        let s2 = a.session();
        a.received(10);
        a.sent(7);
        let snap = a.snapshot();
        assert_eq!((snap.connections, snap.sessions, snap.bytes_in, snap.bytes_out), (1, 2, 10, 7));
        assert!(snap.last_activity_ms > 0);
        drop((c, s1, s2));
        let snap = a.snapshot();
        assert_eq!((snap.connections, snap.sessions), (0, 0));
    }
}
