//! The agent's SSH server (russh). Users reach it through the coordinator: the coordinator opens a
//! bidirectional stream on the agent's tunnel connection, sends one [`StreamOpen`] frame naming the
//! user and the key fingerprints it authenticated, and the rest of the stream is an SSH connection
//! the coordinator splices but cannot read. For debugging and tests the same server can also listen
//! on a TCP port (`--ssh-listen`, with an `authorized_keys` file); it never does by default.
//!
//! Code map: [`keys`] (host key, certificate, fingerprints), `handler` (auth, requests, channel
//! opens), `session` (shells, commands, subsystems), `forward` (listeners that lead back to the
//! client), `x11` (forwarded X displays), `splice` (bounded copying), [`activity`] (heartbeat
//! counters).
//!
//! Invariants: a connection authenticates only with a public key whose fingerprint it was given; no
//! peer makes the agent buffer more than a channel window per channel; every session process is
//! hung up when its channel closes before it exits.

pub mod activity;
mod forward;
mod handler;
mod inbound;
pub mod keys;
mod modes;
mod pty;
mod session;
mod splice;
mod x11;

use crate::scripts::LocalUser;
use crate::tunnel::FetchedManifest;
use activity::Activity;
use keys::KeyError;
use russh::keys::{Certificate, PrivateKey};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tether_shared::login::{LoggedIn, LoginDeadline};
use tether_shared::proto::{stream_refused, Manifest, StreamOpen};
use tether_shared::{io, limits};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::timeout;

/// SSH connections served at once, brokered and direct together.
pub const MAX_CONNECTIONS: usize = limits::MAX_SSH_CONNECTIONS as usize;
/// Channels open at once on one connection (sessions and forwarded connections).
pub const MAX_CHANNELS: usize = 256;
/// How long the coordinator has to send the `StreamOpen` frame on a new stream.
pub const STREAM_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has from connecting to authenticating.
pub const LOGIN_GRACE: Duration = Duration::from_secs(60);
/// Channel window toward the agent. Throughput per channel is at most window / round trip.
pub const WINDOW: u32 = 4 * 1024 * 1024;
/// Largest data packet a client may send.
pub const MAX_PACKET: u32 = 32 * 1024;
/// Client packets russh queues per channel before its session loop waits. Each channel's consumer
/// empties it as packets arrive (see `inbound`), so it only evens out bursts.
pub const CHANNEL_BUFFER: usize = 256;
/// Keep-alives find dead clients; there is no inactivity timeout (an idle shell is fine).
pub const KEEPALIVE: Duration = Duration::from_secs(30);
pub const KEEPALIVE_MAX: usize = 4;
/// How long a session waits for the start scripts that block login before its program starts
/// anyway (a hung script must not lock its users out of the workspace they would debug it in).
pub const LOGIN_WAIT: Duration = Duration::from_secs(600);

/// Whether sessions may start their programs now: not while the start scripts that block login
/// run. Sessions opened meanwhile are told so and wait; port forwards do not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginGate {
    Open,
    /// The workspace's name and the start scripts that block login, once the manifest says.
    Closed {
        workspace: Option<String>,
        scripts: Vec<String>,
    },
    /// The agent is stopping: sessions that waited end, saying so.
    Stopping,
}

/// Algorithm preferences for Tether's SSH servers (the agent's and the coordinator's front door).
pub use tether_shared::ssh_algorithms::preferred;

/// A russh server configuration with Tether's settings and the given host keys and certificates.
pub fn server_config(keys: Vec<PrivateKey>, certificates: Vec<Certificate>) -> russh::server::Config {
    russh::server::Config {
        // "OpenSSH" first: OpenSSH's client keeps its extensions for servers whose version starts
        // so, and one of them matters here: `eow@openssh.com`, its word that it takes no more
        // output (`ssh dev.tether cmd | head`), which ends the command (see `channel_eow`).
        // Without it the command ran for ever. No bug workarounds apply to this name.
        server_id: russh::SshId::Standard(format!("SSH-2.0-OpenSSH_Tether_{}", env!("CARGO_PKG_VERSION")).into()),
        methods: russh::MethodSet::from(&[russh::MethodKind::PublicKey][..]),
        // Public-key checks reveal nothing a delay would hide, and OpenSSH's "none" probe would pay it.
        auth_rejection_time: Duration::ZERO,
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys,
        certificates,
        window_size: WINDOW,
        maximum_packet_size: MAX_PACKET,
        channel_buffer_size: CHANNEL_BUFFER,
        preferred: preferred(),
        max_auth_attempts: 10,
        inactivity_timeout: None,
        keepalive_interval: Some(KEEPALIVE),
        keepalive_max: KEEPALIVE_MAX,
        nodelay: true,
        ..Default::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("{0}")]
    Key(#[from] KeyError),
}

/// The workspace user, as SSH sessions see it.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub home: PathBuf,
    pub shell: PathBuf,
}

impl Account {
    pub fn discover() -> Self {
        let user = LocalUser::discover();
        let name = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| nix::unistd::getuid().to_string());
        Account { name, home: user.home, shell: user.shell }
    }
}

/// Who is on the other end of a connection, for logs and `SSH_CONNECTION`.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address as `IP PORT`.
    pub client: String,
    /// The server end as `IP PORT`; for brokered streams, the workspace's address towards the
    /// coordinator and port 22, what `ssh -J` to an sshd on that address would show.
    pub server: String,
    /// The Tether user the coordinator authenticated (brokered streams only).
    pub user: Option<String>,
    /// The coordinator's connection id (brokered streams only).
    pub connection_id: Option<u64>,
}

impl Peer {
    fn from_socket(client: SocketAddr, server: SocketAddr) -> Self {
        Peer {
            client: format!("{} {}", client.ip(), client.port()),
            server: format!("{} {}", server.ip(), server.port()),
            user: None,
            connection_id: None,
        }
    }

    fn brokered(open: &tether_shared::proto::SshStreamOpen, server: &str) -> Self {
        let client = match open.peer.parse::<SocketAddr>() {
            Ok(a) => format!("{} {}", a.ip(), a.port()),
            Err(_) if !open.peer.is_empty() && !open.peer.contains(char::is_whitespace) => format!("{} 0", open.peer),
            Err(_) => "0.0.0.0 0".to_string(),
        };
        Peer {
            client,
            server: server.to_string(),
            user: Some(open.user.clone()),
            connection_id: Some(open.connection_id),
        }
    }
}

/// The address this host uses to reach `remote`: the route's source address, found by connecting a
/// UDP socket (which sends nothing). Unspecified if there is no route.
fn local_ip_towards(remote: SocketAddr) -> std::net::IpAddr {
    let unspecified: SocketAddr = if remote.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    std::net::UdpSocket::bind(unspecified)
        .and_then(|s| s.connect(remote).and_then(|_| s.local_addr()))
        .map(|a| a.ip())
        .unwrap_or(unspecified.ip())
}

/// The SSH server: the host identity, the connection budget and what sessions need to start.
pub struct SshServer {
    host_key: PrivateKey,
    host_key_line: String,
    certificate: RwLock<Option<Certificate>>,
    manifests: watch::Receiver<Option<FetchedManifest>>,
    /// A line for interactive logins: why the start phase failed, if it did.
    notice: watch::Receiver<Option<String>>,
    gate: watch::Receiver<LoginGate>,
    account: Account,
    activity: Arc<Activity>,
    permits: Arc<Semaphore>,
    /// Where agent-forwarding sockets go.
    runtime_dir: PathBuf,
}

impl SshServer {
    /// Loads (or creates) the host key in `data_dir`. Sessions read the newest manifest from
    /// `manifests` when they start.
    pub fn new(
        data_dir: &Path,
        manifests: watch::Receiver<Option<FetchedManifest>>,
        notice: watch::Receiver<Option<String>>,
        gate: watch::Receiver<LoginGate>,
        account: Account,
    ) -> Result<Arc<Self>, SshError> {
        let host_key = keys::load_or_create_host_key(data_dir)?;
        let host_key_line = keys::public_line(&host_key);
        Ok(Arc::new(SshServer {
            host_key,
            host_key_line,
            certificate: RwLock::new(None),
            manifests,
            notice,
            gate,
            account,
            activity: Arc::new(Activity::default()),
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            runtime_dir: std::env::temp_dir(),
        }))
    }

    /// What interactive logins are told first, if anything.
    pub fn notice(&self) -> Option<String> {
        self.notice.borrow().clone()
    }

    /// What an interactive login is shown before its shell: why the start phase failed, if it did,
    /// then the template's MOTD.
    pub fn login_banner(&self) -> Option<String> {
        let motd = self.manifest().and_then(|m| m.ssh.motd.clone()).filter(|m| !m.is_empty());
        // The notice first: a failed startup explains what the MOTD may promise.
        match (self.notice(), motd) {
            (Some(n), Some(m)) => Some(format!("{n}\n{m}")),
            (n, m) => n.or(m),
        }
    }

    /// Whether sessions may start their programs, and when that changes.
    pub fn gate(&self) -> watch::Receiver<LoginGate> {
        self.gate.clone()
    }

    /// The host key as one OpenSSH public-key line, for the hello.
    pub fn host_public_key(&self) -> &str {
        &self.host_key_line
    }

    /// Uses `line` (from the coordinator's welcome) as the host certificate for new connections;
    /// `None` leaves the plain key only.
    pub fn set_host_certificate(&self, line: Option<&str>) {
        let cert = line.and_then(|line| match keys::parse_host_certificate(line, &self.host_key) {
            Ok(cert) => Some(cert),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring the ssh host certificate from the coordinator");
                None
            }
        });
        if let Some(cert) = &cert {
            tracing::info!(principals = ?cert.valid_principals(), "using the ssh host certificate from the coordinator");
        }
        // A poisoned lock only means a panic elsewhere mid-write of an Option: overwrite it.
        *self.certificate.write().unwrap_or_else(|e| e.into_inner()) = cert;
    }

    pub fn activity(&self) -> Arc<Activity> {
        self.activity.clone()
    }

    fn manifest(&self) -> Option<Arc<Manifest>> {
        self.manifests.borrow().as_ref().map(|f| f.manifest.clone())
    }

    /// The configuration for a new connection, with the newest certificate.
    fn config(&self) -> Arc<russh::server::Config> {
        let cert = self.certificate.read().unwrap_or_else(|e| e.into_inner()).clone();
        Arc::new(server_config(vec![self.host_key.clone()], cert.into_iter().collect()))
    }

    fn try_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Serves the SSH streams the coordinator opens on `conn` until the connection ends. Dropping the
    /// result stops accepting; connections already running end with the QUIC connection.
    pub fn accept_brokered(self: &Arc<Self>, conn: quinn::Connection) -> Brokered {
        let server = self.clone();
        Brokered(tokio::spawn(async move { server.brokered(conn).await }).abort_handle())
    }

    async fn brokered(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
        let server_end: Arc<str> = format!("{} 22", local_ip_towards(remote).to_canonical()).into();
        loop {
            let (mut send, mut recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "no more brokered ssh streams on this connection");
                    return;
                }
            };
            let Some(permit) = self.try_permit() else {
                tracing::warn!(max = MAX_CONNECTIONS, "too many ssh connections; refusing a brokered stream");
                let _ = send.reset(stream_refused::FULL.into());
                let _ = recv.stop(stream_refused::FULL.into());
                continue;
            };
            let server = self.clone();
            let server_end = server_end.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let open = match timeout(STREAM_OPEN_TIMEOUT, io::read_msg::<StreamOpen, _>(&mut recv, &mut buf)).await
                {
                    Ok(Ok(Some(open))) => open,
                    Ok(Ok(None)) => return,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "bad brokered stream header; closing the stream");
                        let _ = send.reset(stream_refused::BAD_OPEN.into());
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(
                            secs = STREAM_OPEN_TIMEOUT.as_secs(),
                            "no brokered stream header in time; closing the stream"
                        );
                        let _ = send.reset(stream_refused::BAD_OPEN.into());
                        return;
                    }
                };
                if let Err(e) = open.validate() {
                    tracing::warn!(error = %e, "invalid brokered stream header; closing the stream");
                    let _ = send.reset(stream_refused::BAD_OPEN.into());
                    return;
                }
                let StreamOpen::Ssh(open) = open;
                let peer = Peer::brokered(&open, &server_end);
                let keys: Arc<[String]> = open.key_fingerprints.into();
                server.serve(tokio::io::join(recv, send), peer, keys, permit).await;
            });
        }
    }

    /// Serves SSH on a TCP listener, for keys in `authorized` (fingerprints). Only when configured.
    pub async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener, authorized: Arc<[String]>) {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(addr = %addr, keys = authorized.len(), "ssh server listening");
        }
        loop {
            let (stream, client) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "ssh listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(permit) = self.try_permit() else {
                tracing::warn!(max = MAX_CONNECTIONS, "too many ssh connections; refusing {client}");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let server_addr = stream.local_addr().unwrap_or(client);
            let peer = Peer::from_socket(client, server_addr);
            tokio::spawn(self.clone().serve(stream, peer, authorized.clone(), permit));
        }
    }

    /// Runs one SSH connection to its end.
    async fn serve<S>(self: Arc<Self>, stream: S, peer: Peer, keys: Arc<[String]>, permit: OwnedSemaphorePermit)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let _permit = permit;
        let started = tokio::time::Instant::now();
        let logged_in = LoggedIn::default();
        let handler = handler::Connection::new(self.clone(), peer.clone(), keys, logged_in.clone());
        // Version line, key exchange and login within the grace time, or the connection ends.
        let stream = LoginDeadline::new(stream, started + LOGIN_GRACE, logged_in);
        let result = match russh::server::run_stream(self.config(), stream, handler).await {
            Ok(session) => session.await,
            Err(e) => {
                tracing::debug!(client = %peer.client, error = %e, "ssh handshake failed");
                return;
            }
        };
        let secs = started.elapsed().as_secs_f64();
        match result {
            Ok(()) => tracing::debug!(client = %peer.client, secs, "ssh connection ended"),
            Err(e) => tracing::debug!(client = %peer.client, secs, error = %e, "ssh connection ended"),
        }
    }
}

/// The task accepting brokered streams on one tunnel connection; stops when dropped.
pub struct Brokered(tokio::task::AbortHandle);

impl Drop for Brokered {
    fn drop(&mut self) {
        self.0.abort();
    }
}
