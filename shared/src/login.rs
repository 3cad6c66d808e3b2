//! A login deadline on an SSH server's stream. russh waits for a client's version line for ever,
//! a session's handle cannot end it during the key exchange (its disconnect waits for the exchange
//! to finish), and a write to a client that stops reading waits for ever: a client that connects
//! and stalls would keep its place for good. Reads and writes of a [`LoginDeadline`] stream fail
//! once the deadline passes before the login, which ends the session wherever it is waiting.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Set by the server's handler once the client has logged in; from then on the stream is plain.
#[derive(Debug, Clone, Default)]
pub struct LoggedIn(Arc<AtomicBool>);

impl LoggedIn {
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// `inner`, whose reads fail with [`io::ErrorKind::TimedOut`] once `deadline` passes unless
/// [`LoggedIn`] was set first.
#[derive(Debug)]
pub struct LoginDeadline<S> {
    inner: S,
    /// Until the login (or the deadline).
    deadline: Option<Pin<Box<Sleep>>>,
    logged_in: LoggedIn,
}

impl<S> LoginDeadline<S> {
    pub fn new(inner: S, deadline: Instant, logged_in: LoggedIn) -> Self {
        LoginDeadline { inner, deadline: Some(Box::pin(tokio::time::sleep_until(deadline))), logged_in }
    }
}

impl<S> LoginDeadline<S> {
    /// `Err(TimedOut)` once the deadline has passed without a login; otherwise registers `cx` to be
    /// woken at the deadline, so that a read or write waiting on the peer fails then.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Some(deadline) = &mut self.deadline {
            if self.logged_in.get() {
                self.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no login within the grace time"));
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LoginDeadline<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// Writes have the deadline too: a client that stops reading (while it makes the server answer,
/// say, public-key queries) would otherwise hold the server in a write for ever.
impl<S: AsyncWrite + Unpin> AsyncWrite for LoginDeadline<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_cut_off_at_the_deadline_even_while_a_read_waits() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let mut s = LoginDeadline::new(ours, Instant::now() + Duration::from_secs(30), LoggedIn::default());
        let mut buf = [0u8; 8];
        // The read is already waiting when the deadline passes: it wakes and fails.
        let err = s.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(s.write(b"x").await.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_off_while_a_write_waits() {
        let (ours, _theirs) = tokio::io::duplex(16);
        let mut s = LoginDeadline::new(ours, Instant::now() + Duration::from_secs(30), LoggedIn::default());
        // The peer reads nothing: the write fills the pipe, waits, and fails at the deadline.
        let err = s.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_login_the_deadline_is_gone() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let logged_in = LoggedIn::default();
        let mut s = LoginDeadline::new(ours, Instant::now() + Duration::from_secs(30), logged_in.clone());
        let mut buf = [0u8; 8];
        theirs.write_all(b"hello").await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap(), 5);
        logged_in.set();
        tokio::time::advance(Duration::from_secs(60)).await;
        theirs.write_all(b"later").await.unwrap();
        assert_eq!(s.read(&mut buf).await.unwrap(), 5, "no deadline once logged in");
    }
}
