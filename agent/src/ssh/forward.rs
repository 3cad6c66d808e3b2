//! Listeners inside the workspace that lead back to the client: remote TCP forwarding
//! (`tcpip-forward`), remote Unix-socket forwarding (`streamlocal-forward@openssh.com`), agent
//! forwarding (a private socket for `SSH_AUTH_SOCK`) and X11 forwarding (a display's sockets). Each
//! accepted connection becomes a channel the agent opens toward the client, spliced with bounded
//! buffers.

use super::activity::Activity;
use super::inbound::Backlogs;
use super::splice::splice;
use russh::server::{Handle, Msg};
use russh::Channel;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

/// How long the client has to accept a channel the agent opens.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// A listener task; dropping it stops listening (and removes its socket file, if any).
#[derive(Debug)]
pub struct Listener {
    task: AbortHandle,
    /// Removed on drop: a socket file (only while it is still the one bound here, by device and
    /// inode: someone may have replaced it since), then its private directory.
    cleanup: Vec<(PathBuf, Option<(u64, u64)>)>,
}

impl Listener {
    /// Removes `socket` on drop, if it is still this file.
    fn removing(task: AbortHandle, socket: &Path) -> Listener {
        Listener { task, cleanup: vec![(socket.to_path_buf(), file_id(socket))] }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
        let cleanup = std::mem::take(&mut self.cleanup);
        let remove = move || {
            for (path, id) in &cleanup {
                match id {
                    Some(id) if file_id(path) == Some(*id) => drop(std::fs::remove_file(path)),
                    Some(_) => {}
                    None => drop(std::fs::remove_dir(path)),
                }
            }
        };
        // Off the worker thread when this runs in a task: the socket may be on a slow filesystem.
        // Outside a task (the runtime shutting down drops what tasks held, on the thread that shuts
        // it down) the blocking pool no longer runs anything, so remove it here.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if tokio::task::try_id().is_some() => drop(runtime.spawn_blocking(remove)),
            _ => remove(),
        }
    }
}

/// How long binding or connecting a Unix socket may take: path lookups on a hung network filesystem
/// never return, and they run on the blocking pool so that they hold up only the request.
const UNIX_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a Unix socket call on the blocking pool, for at most [`UNIX_SOCKET_TIMEOUT`].
async fn unix_socket_call<T: Send + 'static>(
    call: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    match tokio::time::timeout(UNIX_SOCKET_TIMEOUT, tokio::task::spawn_blocking(call)).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(std::io::Error::other(e)),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from the filesystem within {} s", UNIX_SOCKET_TIMEOUT.as_secs()),
        )),
    }
}

/// Connects to the Unix socket at `path` (for `direct-streamlocal@openssh.com`). The connect is
/// non-blocking (a listener whose queue is full refuses at once), so only the path lookup can wait,
/// and that waits on the blocking pool.
pub async fn connect_unix(path: &str) -> std::io::Result<tokio::net::UnixStream> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let path = path.to_string();
    let stream = unix_socket_call(move || {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )?;
        let address = SocketAddrUnix::new(path.as_str())?;
        match rustix::net::connect(&fd, &address) {
            Ok(()) => Ok(std::os::unix::net::UnixStream::from(fd)),
            Err(rustix::io::Errno::AGAIN) => Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "the socket's listener is not accepting connections (its queue is full)",
            )),
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    tokio::net::UnixStream::from_std(stream)
}

/// Device and inode of `path` itself (not what a symlink points to).
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// What a listener needs to reach the client.
#[derive(Clone)]
pub struct Link {
    pub handle: Handle,
    pub activity: Arc<Activity>,
    /// The connection's channel budget.
    pub channels: Arc<Semaphore>,
    /// What each channel's consumer holds of the client's input.
    pub backlogs: Arc<Backlogs>,
}

impl Link {
    /// Opens a channel with `open` for each accepted connection and splices it.
    fn serve<S, F, Fut>(&self, stream: S, what: &'static str, open: F)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
        F: FnOnce(Handle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Channel<Msg>, russh::Error>> + Send,
    {
        let Some(permit) = self.permit() else {
            tracing::warn!(what, "too many channels on this ssh connection; dropping a forwarded connection");
            return;
        };
        let link = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(OPEN_TIMEOUT, open(link.handle.clone())).await {
                Ok(Ok(channel)) => {
                    let input = link.backlogs.queue(channel.id());
                    splice(channel, stream, &link.activity, input).await
                }
                Ok(Err(e)) => tracing::debug!(what, error = %e, "the client refused a forwarded connection"),
                Err(_) => tracing::debug!(what, "the client did not answer a channel open"),
            }
        });
    }

    fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.channels.clone().try_acquire_owned().ok()
    }
}

/// Where `tcpip-forward` listens: loopback for an empty address, `*`, `0.0.0.0` and `localhost`, as
/// sshd does by default (`GatewayPorts no`), so `ssh -R` never opens a port to the workspace's network
/// unasked; a specific address is bound as named. A host name is looked up off the async threads (a
/// slow resolver must not stall the agent), within `RESOLVE_TIMEOUT`.
pub async fn bind_address(address: &str, port: u16) -> Result<Vec<SocketAddr>, std::io::Error> {
    match address {
        "" | "*" | "0.0.0.0" | "localhost" => Ok(vec![(Ipv4Addr::LOCALHOST, port).into()]),
        host => match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port))).await {
            Ok(found) => Ok(found?.collect()),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("looking up '{host}' took over {} s", RESOLVE_TIMEOUT.as_secs()),
            )),
        },
    }
}

/// Longest a `tcpip-forward` address may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Listens for `tcpip-forward`; returns the bound port (the chosen one when `port` is 0).
pub async fn listen_tcp(link: Link, address: &str, port: u32) -> std::io::Result<(u32, Listener)> {
    let port = u16::try_from(port).map_err(|_| std::io::Error::other(format!("port {port} is out of range")))?;
    let addrs = bind_address(address, port).await?;
    let listener = tokio::net::TcpListener::bind(&addrs[..]).await?;
    let bound = listener.local_addr()?.port();
    let address = address.to_string();
    let task = tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "remote forward: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let address = address.clone();
            link.serve(stream, "forwarded-tcpip", move |h| async move {
                h.channel_open_forwarded_tcpip(address, u32::from(bound), peer.ip().to_string(), u32::from(peer.port()))
                    .await
            });
        }
    })
    .abort_handle();
    Ok((u32::from(bound), Listener { task, cleanup: Vec::new() }))
}

/// Listens for `streamlocal-forward@openssh.com` on a Unix socket at `path`, which must not exist.
pub async fn listen_unix(link: Link, path: &str) -> std::io::Result<Listener> {
    let bind_path = PathBuf::from(path);
    let (listener, id) = unix_socket_call(move || {
        let listener = std::os::unix::net::UnixListener::bind(&bind_path)?;
        listener.set_nonblocking(true)?;
        Ok((listener, file_id(&bind_path)))
    })
    .await?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let socket_path = path.to_string();
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "remote unix forward: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let socket_path = socket_path.clone();
            link.serve(stream, "forwarded-streamlocal", move |h| async move {
                h.channel_open_forwarded_streamlocal(socket_path).await
            });
        }
    })
    .abort_handle();
    Ok(Listener { task, cleanup: vec![(PathBuf::from(path), id)] })
}

/// Agent forwarding: a socket in a fresh private directory; each connection to it becomes an
/// `auth-agent@openssh.com` channel to the client. Returns the socket path for `SSH_AUTH_SOCK`.
pub fn listen_agent(link: Link, parent: &Path) -> std::io::Result<(PathBuf, Listener)> {
    let dir = parent.join(format!("tether-ssh-{:016x}", rand::random::<u64>()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let path = dir.join("agent.sock");
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
    };
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "agent forwarding: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            link.serve(stream, "auth-agent", |h| async move { h.channel_open_agent().await });
        }
    })
    .abort_handle();
    let mut listener = Listener::removing(task, &path);
    listener.cleanup.push((dir, None));
    Ok((path, listener))
}

/// X11 forwarding: listens for display connections at `path` and at the same abstract name, which
/// X clients on Linux try first (so a display number another X server holds in this network
/// namespace is refused here with `AddrInUse`, rather than shadowing ours). Each connection becomes
/// an `x11` channel to the client; with `single_connection`, only the first, but the sockets stay
/// bound (the number stays taken) until the listener is dropped.
pub async fn listen_x11(link: Link, path: &Path, single_connection: bool) -> std::io::Result<Listener> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    let name = std::os::unix::net::SocketAddr::from_abstract_name(path.as_os_str().as_bytes())?;
    let hidden = std::os::unix::net::UnixListener::bind_addr(&name)?;
    hidden.set_nonblocking(true)?;
    let hidden = tokio::net::UnixListener::from_std(hidden)?;
    let file = match tokio::net::UnixListener::bind(path) {
        // A socket nobody answers on: left by an agent or X server that was killed. Take it over.
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && stale_socket(path).await => {
            std::fs::remove_file(path)?;
            tokio::net::UnixListener::bind(path)?
        }
        bound => bound?,
    };
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = hidden.accept() => a,
                a = file.accept() => a,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "x11 forwarding: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            link.serve(stream, "x11", |h| async move { h.channel_open_x11("127.0.0.1", 0).await });
            if single_connection {
                // Hold both sockets, taking no more connections, until the session ends.
                std::future::pending::<()>().await;
            }
        }
    })
    .abort_handle();
    Ok(Listener::removing(task, path))
}

/// Whether `path` is a socket that refuses connections: no process listens on it any more. One
/// that does not answer within a second (a full backlog) counts as live.
async fn stale_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    if !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        return false;
    }
    let connect = tokio::net::UnixStream::connect(path);
    matches!(
        tokio::time::timeout(Duration::from_secs(1), connect).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn forward_addresses() {
        assert_eq!(bind_address("", 80).await.unwrap(), vec![SocketAddr::from(([127, 0, 0, 1], 80))]);
        assert_eq!(bind_address("localhost", 0).await.unwrap(), vec![SocketAddr::from(([127, 0, 0, 1], 0))]);
        assert_eq!(bind_address("*", 8).await.unwrap(), vec![SocketAddr::from(([127, 0, 0, 1], 8))]);
        assert_eq!(bind_address("0.0.0.0", 8).await.unwrap(), vec![SocketAddr::from(([127, 0, 0, 1], 8))]);
        assert_eq!(bind_address("::1", 9).await.unwrap(), vec!["[::1]:9".parse::<SocketAddr>().unwrap()]);
    }
}
