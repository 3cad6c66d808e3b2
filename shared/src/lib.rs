//! What the Tether agent and coordinator share: the wire protocol, its framing and limits, the status
//! vocabulary, and the TLS settings both ends of the tunnel must agree on.
//!
//! Nothing here does network I/O except [`io`], the thin async glue that reads and writes frames on a
//! stream, [`login`], the SSH servers' login deadline on theirs, and [`udp`], the QUIC tunnel's
//! socket; message types and frame parsing are plain
//! functions over bytes so they can be fuzzed and tested without a runtime.

pub mod backoff;
pub mod datalock;
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

/// An error and its causes on one line, `outer: inner: innermost`, leaving out a cause whose text
/// the message before it already ends with (errors that name their source in their own message, as
/// `reading FILE: Permission denied`), so that no cause is printed twice.
pub fn error_text(chain: impl IntoIterator<Item = String>) -> String {
    let mut text = String::new();
    for message in chain {
        if text.is_empty() {
            text = message;
        } else if !text.ends_with(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
    }
    text
}

/// [`error_text`] of an error and the sources under it (`anyhow::Error::as_ref` gives one).
pub fn error_chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    error_text(std::iter::successors(Some(e), |e| e.source()).map(ToString::to_string))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_the_message_already_gives_is_not_repeated() {
        let chain = |v: &[&str]| super::error_text(v.iter().map(|s| s.to_string()));
        assert_eq!(
            chain(&["ssh: reading key k: denied", "reading key k: denied", "reading key k: denied", "denied"]),
            "ssh: reading key k: denied"
        );
        assert_eq!(chain(&["data directory /d", "denied"]), "data directory /d: denied");
        assert_eq!(chain(&["starting", "bind: in use", "in use"]), "starting: bind: in use");
        assert_eq!(chain(&[]), "");
    }
}
