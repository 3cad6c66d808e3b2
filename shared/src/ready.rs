//! Readiness registrations for one direction only.
//!
//! tokio registers sockets, pipes and ptys for readable *and* writable readiness, edge-triggered.
//! A descriptor that is written to a little at a time (a UDP socket, a pty) then raises a writable
//! edge after nearly every write, once the kernel frees the room the write took, and each edge is a
//! turn of the runtime, often the wake-up of a sleeping thread, for nobody: writers rarely wait.
//! OpenSSH asks `poll` for writability only while it has bytes it could not write; these helpers
//! do the same with tokio: register a descriptor for readable readiness with [`register`], write
//! to it directly, and wait with a [`WriteWait`] only after a write would block.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Registers an owned descriptor, which must be in non-blocking mode, with the runtime's reactor
/// for `interest` only.
pub fn register<T: AsRawFd>(io: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: the callers pass `std::net::UdpSocket` or `OwnedFd`, which own their descriptor:
    // it stays open and `as_raw_fd` returns the same one until the `AsyncFd` drops them.
    unsafe { AsyncFd::register_with_interest(io, interest) }.map_err(io::Error::from)
}

/// One writer's wait for room in a descriptor registered for readable readiness only.
///
/// While waiting it holds a duplicate of the descriptor registered for writable readiness, one
/// per waiter so that every waiting writer is woken; the registration goes as soon as there is
/// room.
#[derive(Debug, Default)]
pub struct WriteWait {
    watch: Option<AsyncFd<OwnedFd>>,
}

impl WriteWait {
    /// Call after a write to `fd` failed with `WouldBlock`: ready once `fd` has room again.
    /// Registering reports readiness at once, so room freed since the failed write is not missed.
    pub fn poll_writable(&mut self, fd: BorrowedFd<'_>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.watch.is_none() {
            self.watch = Some(register(fd.try_clone_to_owned()?, Interest::WRITABLE)?);
        }
        let watch = self.watch.as_ref().expect("set above");
        // The registration is dropped below, so its readiness need not be cleared.
        ready!(watch.poll_write_ready(cx))?.retain_ready();
        self.watch = None;
        Poll::Ready(Ok(()))
    }

    /// Drops the registration, if any.
    pub fn cancel(&mut self) {
        self.watch = None;
    }

    /// Whether a writable registration is held.
    pub fn is_waiting(&self) -> bool {
        self.watch.is_some()
    }
}
