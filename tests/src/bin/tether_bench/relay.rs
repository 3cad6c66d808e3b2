//! Delay lines for `tether-bench ssh --rtt-ms`: a TCP and a UDP relay on 127.0.0.1 that hold every
//! chunk or datagram for half the round-trip time in each direction, so the paths can be compared
//! with the workspace a long way off (this kernel has no `netem`). Every path reaches the workspace
//! through one: OpenSSH's target `sshd` behind the TCP relay, the agent's QUIC connection to the
//! coordinator through the UDP relay.
//!
//! The link they stand for has no bandwidth limit and loses nothing, up to a queue as deep as a
//! router's: the TCP relay holds at most [`TCP_IN_FLIGHT`] bytes each way (as a TCP connection's
//! largest receive window would), the UDP relay at most [`UDP_QUEUE`] datagrams (more are
//! dropped). Delays are kept to tokio's timer, within a millisecond.
//!
//! The two are not the same link for the protocols' own control loops, and the difference favours
//! OpenSSH: the TCP relay ends each TCP connection on its side, so OpenSSH's TCP congestion control
//! sees loopback round trips while QUIC's, through the UDP relay, sees the whole delay (slow start
//! and loss recovery take round trips of it). The UDP relay also makes a system call per datagram,
//! CPU taken mostly on Tether's path on a small machine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bytes one direction of a relayed TCP connection holds at most: Linux's default largest TCP
/// receive window (`tcp_rmem`'s maximum, 6 MiB).
pub const TCP_IN_FLIGHT: usize = 6 * 1024 * 1024;
/// Datagrams one direction of the UDP relay holds at most; more are dropped.
pub const UDP_QUEUE: usize = 16 * 1024;
const CHUNK: usize = 64 * 1024;

/// A running relay; it stops when dropped.
pub struct Relay {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Relays TCP connections made to the returned address on to `target`, each byte `one_way` late.
pub async fn tcp(target: SocketAddr, one_way: Duration) -> std::io::Result<Relay> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((client, _)) = listener.accept().await {
            connections.spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else { return };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(tcp_direction(cr, sw, one_way), tcp_direction(sr, cw, one_way));
            });
        }
    });
    Ok(Relay { addr, task })
}

/// One direction of a relayed connection: what is read at `t` is written at `t + one_way`.
async fn tcp_direction(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    one_way: Duration,
) {
    let room = Arc::new(Semaphore::new(TCP_IN_FLIGHT));
    let (tx, mut rx) = mpsc::unbounded_channel::<Option<(Instant, Vec<u8>, tokio::sync::OwnedSemaphorePermit)>>();
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let Ok(permit) = room.clone().acquire_many_owned(n as u32).await else { break };
            let due = Instant::now() + one_way;
            if tx.send(Some((due, buf[..n].to_vec(), permit))).is_err() {
                return;
            }
        }
        let _ = tx.send(None);
    };
    let writer = async move {
        while let Some(Some((due, data, _permit))) = rx.recv().await {
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Relays UDP datagrams sent to the returned address on to `target` and back, each `one_way` late:
/// one upstream socket per client address, as a NAT would.
pub async fn udp(target: SocketAddr, one_way: Duration) -> std::io::Result<Relay> {
    let front = Arc::new(big_buffers(UdpSocket::bind("127.0.0.1:0").await?));
    let addr = front.local_addr()?;
    let task = tokio::spawn(async move {
        let mut upstreams: HashMap<SocketAddr, mpsc::Sender<(Instant, Vec<u8>)>> = HashMap::new();
        let mut children = tokio::task::JoinSet::new();
        let mut buf = vec![0u8; CHUNK];
        while let Ok((n, client)) = front.recv_from(&mut buf).await {
            let due = Instant::now() + one_way;
            let line = match upstreams.get(&client) {
                Some(line) => line.clone(),
                None => {
                    let Ok(up) = UdpSocket::bind("127.0.0.1:0").await.map(big_buffers) else { continue };
                    if up.connect(target).await.is_err() {
                        continue;
                    }
                    let up = Arc::new(up);
                    let (to_target, queued) = mpsc::channel(UDP_QUEUE);
                    let (to_client, back) = mpsc::channel(UDP_QUEUE);
                    let sender = up.clone();
                    children.spawn(delay_line(queued, move |d: Vec<u8>| {
                        let s = sender.clone();
                        async move { s.send(&d).await.map(drop) }
                    }));
                    let front2 = front.clone();
                    children.spawn(delay_line(back, move |d: Vec<u8>| {
                        let f = front2.clone();
                        async move { f.send_to(&d, client).await.map(drop) }
                    }));
                    children.spawn(async move {
                        let mut buf = vec![0u8; CHUNK];
                        loop {
                            match up.recv(&mut buf).await {
                                // A full queue drops the datagram, as a router's would.
                                Ok(n) => drop(to_client.try_send((Instant::now() + one_way, buf[..n].to_vec()))),
                                // An ICMP error for an earlier datagram (the target was restarted).
                                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                                Err(_) => return,
                            }
                        }
                    });
                    upstreams.insert(client, to_target.clone());
                    to_target
                }
            };
            let _ = line.try_send((due, buf[..n].to_vec()));
        }
    });
    Ok(Relay { addr, task })
}

/// The relay's sockets get the largest buffers the kernel allows (`net.core.rmem_max`), so that
/// it is not what drops a burst.
fn big_buffers(socket: UdpSocket) -> UdpSocket {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(&socket, sockopt::RcvBuf, &(16 << 20));
    let _ = setsockopt(&socket, sockopt::SndBuf, &(16 << 20));
    socket
}

/// Sends each queued datagram when it is due.
async fn delay_line<F, Fut>(mut queued: mpsc::Receiver<(Instant, Vec<u8>)>, send: F)
where
    F: Fn(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>>,
{
    while let Some((due, data)) = queued.recv().await {
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        // A datagram the kernel will not take is lost, as on a link.
        let _ = send(data).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_relay_delays_and_carries_every_byte() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let relay = tcp(target, Duration::from_millis(20)).await.unwrap();
        let mut c = TcpStream::connect(relay.addr).await.unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let started = Instant::now();
        let (mut r, mut w) = c.split();
        let send = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let recv = r.read_to_end(&mut back);
        let (_, got) = tokio::join!(send, recv);
        got.unwrap();
        assert_eq!(back, data);
        assert!(started.elapsed() >= Duration::from_millis(40), "there and back, 20 ms each way");
    }

    #[tokio::test]
    async fn udp_relay_delays_both_ways() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = server.recv_from(&mut buf).await {
                let _ = server.send_to(&buf[..n], from).await;
            }
        });
        let relay = udp(target, Duration::from_millis(20)).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(relay.addr).await.unwrap();
        let started = Instant::now();
        client.send(b"ping").await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), client.recv(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert!(started.elapsed() >= Duration::from_millis(40), "there and back, 20 ms each way");
    }
}
