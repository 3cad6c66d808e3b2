//! The UDP socket under both ends of the QUIC tunnel: quinn's tokio socket, less one wake-up per
//! datagram sent.
//!
//! quinn's stock tokio socket registers for readable *and* writable readiness. Linux raises a
//! UDP socket's writable edge every time a sent datagram's buffer is released, which on loopback
//! and on most NICs is once per `sendmsg`, so every datagram sent costs the runtime one more turn
//! of `epoll_wait`, and often wakes an idle worker thread that then finds nothing to do. Measured on
//! an interactive SSH session, that is a sixth of the coordinator's system calls per keystroke.
//!
//! [`Runtime`] registers the socket for readable readiness only ([`crate::ready`]). Sending just
//! tries `sendmsg`; only when the kernel says the buffer is full (`EAGAIN`, rare: a fast sender on
//! a slow NIC) does a sender wait for room, with a [`WriteWait`].

use crate::ready::{register, WriteWait};
use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncTimer, AsyncUdpSocket, UdpPoller};
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A quinn runtime for tokio whose sockets wake the runtime for received datagrams only. Use
/// it with [`quinn::Endpoint::new`] in place of [`quinn::TokioRuntime`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Runtime;

impl quinn::Runtime for Runtime {
    fn new_timer(&self, t: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(Timer(Box::pin(tokio::time::sleep_until(t.into()))))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(future);
    }

    fn wrap_udp_socket(&self, sock: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        sock.set_nonblocking(true)?;
        let state = UdpSocketState::new((&sock).into())?;
        // Room for a burst while the runtime is busy elsewhere: Linux's default 208 KiB holds
        // about a hundred full datagrams, 1 to 2 ms at 100 MB/s, and what overflows is lost and
        // costs the connection its congestion window. The kernel caps this at
        // `net.core.rmem_max` (`wmem_max`), 208 KiB unless raised (see the README); memory is used
        // only while datagrams wait.
        let _ = state.set_recv_buffer_size((&sock).into(), SOCKET_BUFFER);
        let _ = state.set_send_buffer_size((&sock).into(), SOCKET_BUFFER);
        let io = register(sock, Interest::READABLE)?;
        Ok(Arc::new(Socket { io, state, full: AtomicBool::new(false) }))
    }
}

/// The receive and send buffer asked for on each QUIC socket.
pub const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// The timer quinn asks for: tokio's `Sleep` (quinn implements its trait for `Sleep` only in its
/// own runtime module).
#[derive(Debug)]
struct Timer(Pin<Box<tokio::time::Sleep>>);

impl AsyncTimer for Timer {
    fn reset(mut self: Pin<&mut Self>, t: Instant) {
        self.0.as_mut().reset(t.into());
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<()> {
        Future::poll(self.0.as_mut(), cx)
    }
}

struct Socket {
    /// Registered for readable readiness only.
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// The last send found the socket's buffer full; senders must wait for writable readiness.
    full: AtomicBool,
}

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Socket").field("local", &self.io.get_ref().local_addr().ok()).finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller { socket: self, wait: WriteWait::default() })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let result = self.state.send(self.io.get_ref().into(), transmit);
        if matches!(&result, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
            self.full.store(true, Ordering::Release);
        }
        result
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let batch = bufs.len().min(meta.len()).min(quinn::udp::BATCH_SIZE);
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            match guard.try_io(|io| self.state.recv(io.get_ref().into(), bufs, meta)) {
                Ok(Ok(n)) => {
                    // Fewer datagrams than asked for: the queue was empty when the kernel looked, so
                    // the next call would only find EAGAIN. Clearing the readiness now saves that
                    // system call per wake-up; a datagram that arrives meanwhile raises a new edge,
                    // which the reactor records after this clear (tokio does the same for short
                    // TCP reads). Only where quinn receives with `recvmmsg`: elsewhere it may
                    // read one datagram at a time whatever the batch.
                    if cfg!(any(target_os = "linux", target_os = "android")) && n < batch {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

/// One sender's wait for room in the socket's buffer.
struct Poller {
    socket: Arc<Socket>,
    wait: WriteWait,
}

impl fmt::Debug for Poller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Poller").field("waiting", &self.wait.is_waiting()).finish_non_exhaustive()
    }
}

impl UdpPoller for Poller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.socket.full.load(Ordering::Acquire) {
            this.wait.cancel();
            return Poll::Ready(Ok(()));
        }
        ready!(this.wait.poll_writable(this.socket.io.get_ref().as_fd(), cx))?;
        this.socket.full.store(false, Ordering::Release);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::Runtime as _;
    use std::time::Duration;

    #[tokio::test]
    async fn datagrams_round_trip() {
        let a = Runtime.wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let b = Runtime.wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let mut poller = a.clone().create_io_poller();
        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await.unwrap();
        let transmit = Transmit {
            destination: b.local_addr().unwrap(),
            ecn: None,
            contents: b"hello",
            segment_size: None,
            src_ip: None,
        };
        a.try_send(&transmit).unwrap();
        let mut buf = [0u8; 1500];
        let mut meta = [RecvMeta::default()];
        let n = std::future::poll_fn(|cx| b.poll_recv(cx, &mut [IoSliceMut::new(&mut buf)], &mut meta)).await.unwrap();
        assert_eq!(n, 1);
        assert_eq!(&buf[..meta[0].len], b"hello");
        assert_eq!(meta[0].addr, a.local_addr().unwrap());
    }

    /// One `poll_recv` call's worth of datagrams, waiting up to 10 s.
    async fn recv_some(socket: &dyn AsyncUdpSocket, bufs: &mut [Vec<u8>], meta: &mut [RecvMeta]) -> usize {
        let mut slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let n = std::future::poll_fn(|cx| socket.poll_recv(cx, &mut slices, meta));
        tokio::time::timeout(Duration::from_secs(10), n).await.expect("a datagram wakes the receiver").unwrap()
    }

    /// A regression test for lost wake-ups, not a proof: the window it guards (a datagram landing
    /// between the kernel finding the queue empty and the clear) cannot be timed from here.
    #[tokio::test]
    async fn a_datagram_after_a_short_batch_still_wakes_the_receiver() {
        let a = Runtime.wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let b = Runtime.wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let send = |body: &[u8]| {
            let t = Transmit {
                destination: b.local_addr().unwrap(),
                ecn: None,
                contents: body,
                segment_size: None,
                src_ip: None,
            };
            a.try_send(&t).unwrap();
        };
        let mut bufs: Vec<Vec<u8>> = (0..quinn::udp::BATCH_SIZE).map(|_| vec![0u8; 1500]).collect();
        let mut meta = vec![RecvMeta::default(); quinn::udp::BATCH_SIZE];
        // Two datagrams waiting: however many each call returns, both arrive.
        send(&[0]);
        send(&[0]);
        let mut got = 0;
        while got < 2 {
            got += recv_some(&*b, &mut bufs, &mut meta).await;
        }
        assert_eq!(got, 2);
        // Then, twice, one datagram sent while the receiver waits after a short batch.
        for round in 1..3u8 {
            let sender = async {
                tokio::task::yield_now().await;
                send(&[round]);
            };
            let (n, ()) = tokio::join!(recv_some(&*b, &mut bufs, &mut meta), sender);
            assert_eq!(n, 1, "round {round}");
        }
    }

    #[tokio::test]
    async fn a_full_socket_waits_for_room_then_clears() {
        let std = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        std.set_nonblocking(true).unwrap();
        let socket = Arc::new(Socket {
            state: UdpSocketState::new((&std).into()).unwrap(),
            io: register(std, Interest::READABLE).unwrap(),
            full: AtomicBool::new(true),
        });
        let mut poller = Box::pin(Poller { socket: socket.clone(), wait: WriteWait::default() });
        // The buffer has room, so the writable registration reports it at once.
        std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await.unwrap();
        assert!(!socket.full.load(Ordering::Acquire));
        assert!(!poller.wait.is_waiting(), "the writable registration is dropped once there is room");
    }
}
