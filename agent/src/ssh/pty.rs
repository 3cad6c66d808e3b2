//! The pty master of a session, registered for readable readiness only.
//!
//! `pty_process` registers the master for reading and writing. Every byte the client types is
//! written to the master, and when the shell reads it the kernel raises the master's writable
//! edge: a wake-up of the agent, on the keystroke's path, for nothing. Here the master is
//! registered for reading only; writes go straight to it and wait for room (a
//! [`WriteWait`]) only when the terminal's input buffer is full, as OpenSSH's sshd does.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tether_shared::ready::{register, WriteWait};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};

/// A pty master: read it as a stream, write to it with [`Writer::write`].
pub struct Master {
    io: Arc<AsyncFd<OwnedFd>>,
}

impl Master {
    /// Takes over `pty`'s descriptor (already non-blocking) and drops `pty_process`'s
    /// registration.
    pub fn new(pty: pty_process::Pty) -> io::Result<Self> {
        let fd = pty.as_fd().try_clone_to_owned()?;
        drop(pty);
        Ok(Master { io: Arc::new(register(fd, Interest::READABLE)?) })
    }

    pub fn into_split(self) -> (Reader, Writer) {
        (Reader { io: self.io.clone() }, Writer { io: self.io, wait: WriteWait::default() })
    }
}

/// The read side: what the session's processes print.
pub struct Reader {
    io: Arc<AsyncFd<OwnedFd>>,
}

impl AsyncRead for Reader {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| rustix::io::read(fd.get_ref(), &mut *unfilled).map_err(io::Error::from)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

/// The write side: what the client types, and the terminal's size.
pub struct Writer {
    io: Arc<AsyncFd<OwnedFd>>,
    wait: WriteWait,
}

impl Writer {
    /// Writes some of `data`, waiting for room only if the terminal's input buffer is full.
    pub async fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_write(cx, data)).await
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            match rustix::io::write(self.io.get_ref(), data) {
                Ok(n) => {
                    self.wait.cancel();
                    return Poll::Ready(Ok(n));
                }
                Err(rustix::io::Errno::AGAIN) => ready!(self.wait.poll_writable(self.io.get_ref().as_fd(), cx))?,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    pub fn resize(&self, size: pty_process::Size) -> io::Result<()> {
        Ok(rustix::termios::tcsetwinsize(self.io.get_ref(), size.into())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
    use std::io::{Read, Write};
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_full_terminal_makes_the_writer_wait_and_nothing_is_lost() {
        let (pty, pts) = pty_process::open().unwrap();
        let mut t = tcgetattr(&pts).unwrap();
        cfmakeraw(&mut t);
        tcsetattr(&pts, SetArg::TCSANOW, &t).unwrap();
        let (mut reader, mut writer) = Master::new(pty).unwrap().into_split();
        writer.resize(pty_process::Size::new(40, 100)).unwrap();
        let sent: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
        let total = sent.len();
        // The terminal's input buffer holds a few KiB: the writer has to wait for room while this
        // slow reader drains it.
        let slave = pts.as_fd().try_clone_to_owned().unwrap();
        let mut slave = std::fs::File::from(slave);
        let mut answer = slave.try_clone().unwrap();
        let drain = std::thread::spawn(move || {
            let mut got = Vec::with_capacity(total);
            let mut buf = [0u8; 1000];
            while got.len() < total {
                let n = slave.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            got
        });
        let mut offset = 0;
        while offset < sent.len() {
            offset += writer.write(&sent[offset..]).await.unwrap();
        }
        let got = tokio::task::spawn_blocking(move || drain.join().unwrap()).await.unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the bytes arrive in order, none lost");
        // Raw mode echoes nothing, so the first bytes the reader gets are what the shell side prints.
        answer.write_all(b"done").unwrap();
        let mut four = [0u8; 4];
        reader.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"done");
    }
}
