//! What the Tether agent and coordinator share: the wire protocol, its framing and limits, the status
//! vocabulary, and the TLS settings both ends of the tunnel must agree on.
//!
//! Nothing here does network I/O except [`io`], the thin async glue that reads and writes frames on a
//! stream, [`login`], the SSH servers' login deadline on theirs, and [`udp`], the QUIC tunnel's
//! socket; message types and frame parsing are plain
//! functions over bytes so they can be fuzzed and tested without a runtime.

pub mod backoff;
pub mod frame;
pub mod fs;
pub mod io;
pub mod leftovers;
pub mod limits;
pub mod lines;
pub mod login;
pub mod proto;
pub mod ready;
pub mod ssh_algorithms;
pub mod status;
pub mod tls;
pub mod udp;

pub use frame::FrameError;
pub use status::{Lifecycle, SpanStatus, WorkspaceStatus};

/// Milliseconds since the Unix epoch, the one wall-clock unit on the wire and in storage.
pub fn unix_ms(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// The current wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    unix_ms(std::time::SystemTime::now())
}
