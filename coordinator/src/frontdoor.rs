//! The SSH front door: an SSH server (russh) on TCP that users reach with `ssh -J`. It
//! authenticates users by their registered public keys and answers `direct-tcpip` requests for
//! `NAME.tether` by splicing the channel onto a stream to that workspace's agent ([`broker`]). It
//! never sees the inner session: the user's client and the agent run their own SSH over it.
//!
//! A plain `ssh -p PORT user@coordinator` gets a short message saying how to connect, and the list
//! of the workspaces the user may reach.
//!
//! Like sshd (`LoginGraceTime`, `MaxStartups`), the front door gives a connection a fixed time from
//! accept to authenticate, its version line and key exchange included, and holds only so many
//! unauthenticated connections, in all and from one address: idle or slow connections cannot take
//! every slot (or file descriptor) and lock users out.

use crate::broker::{self, Request, Via};
use crate::engine::Engine;
use crate::metrics::FrontDoorDrop;
use crate::places::{source_of, Place, Places};
use crate::ratelimit::RateLimiter;
use crate::sshca;
use russh::keys::ssh_key::Certificate;
use russh::server::{Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet};
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_shared::login::{LoggedIn, LoginDeadline};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// Default time a client has from connecting to authenticating (sshd's `LoginGraceTime` is 120 s).
pub const LOGIN_GRACE: Duration = Duration::from_secs(30);
/// Connections that have not authenticated yet, in all and from one address. Past either, new
/// connections are closed at once (the client reports "Connection closed by remote host", as for
/// sshd's `MaxStartups`). A client normally authenticates within a few round trips, so even a burst
/// of connections from one office behind NAT stays well under these.
pub const MAX_UNAUTHENTICATED: usize = 512;
pub const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 64;
/// Public keys a client may offer (ask about without a signature) on one connection. russh does not
/// count a query it answers yes to as an attempt, so without this a client could ask about a user's
/// (public) key for ever, a database lookup each time.
const MAX_KEY_OFFERS: u32 = 32;
/// Workspace connections one front-door connection may carry at once (`ssh -J` uses one; a
/// multiplexing client a few).
const MAX_CHANNELS: usize = 64;
/// Read buffer of one front-door connection: two full-size SSH packets.
const READ_BUFFER: usize = 64 * 1024;

/// Settings for [`serve`].
#[derive(Debug, Clone)]
pub struct FrontDoorConfig {
    /// Most SSH connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Time from accept to authentication.
    pub login_grace: Duration,
}

/// The client-side cipher order `tether config-ssh` and `tether ssh` give OpenSSH.
pub const CLIENT_CIPHERS: &str =
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,aes128-ctr,aes256-ctr";

/// The russh server settings of the front door.
pub fn ssh_config(engine: &Engine) -> anyhow::Result<russh::server::Config> {
    let cert: Certificate = engine.ssh_ca.front_door_certificate()?;
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    Ok(russh::server::Config {
        server_id: russh::SshId::Standard(Cow::Owned(format!("SSH-2.0-tether_{}", env!("CARGO_PKG_VERSION")))),
        methods,
        // The "none" probe every OpenSSH client sends first must not cost a second.
        auth_rejection_time: Duration::from_millis(50),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![engine.ssh_ca.front_door_key().clone()],
        certificates: vec![cert],
        window_size: 8 * 1024 * 1024,
        maximum_packet_size: 65535,
        channel_buffer_size: 64,
        preferred: tether_shared::ssh_algorithms::preferred(),
        max_auth_attempts: 6,
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        ..Default::default()
    })
}

/// Accepts SSH connections until the listener's task is dropped.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>, config: FrontDoorConfig) -> anyhow::Result<()> {
    let ssh = Arc::new(ssh_config(&engine)?);
    let open = Arc::new(AtomicUsize::new(0));
    let unauthenticated = Places::new(MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED_PER_SOURCE);
    // Log lines about refused connections: one every 10 s per source address.
    let mut refusals_logged = RateLimiter::new(0.1, 1);
    // Log lines about failed logins: a burst of 5, then one every 10 s per source address.
    let failures_logged = Arc::new(std::sync::Mutex::new(RateLimiter::new(0.1, 5)));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                warn!(error = %e, "ssh front door: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let deadline = tokio::time::Instant::now() + config.login_grace;
        let refused = if open.load(Ordering::Relaxed) >= config.max_connections {
            Err((FrontDoorDrop::ConnectionLimit, format!("{} connections are open", config.max_connections)))
        } else {
            unauthenticated
                .take(peer.ip())
                .map_err(|full| (FrontDoorDrop::UnauthenticatedLimit, full.describe("have not authenticated yet")))
        };
        let startup = match refused {
            Ok(place) => place,
            Err((drop, why)) => {
                engine.metrics.front_door_dropped(drop);
                if let Some(earlier) = refusals_logged.log_line(&source_of(peer.ip()).to_string(), Instant::now()) {
                    warn!(%peer, "ssh front door: refusing connection: {why}{earlier}");
                }
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        open.fetch_add(1, Ordering::Relaxed);
        let (engine, ssh, open, failures_logged) = (engine.clone(), ssh.clone(), open.clone(), failures_logged.clone());
        tokio::spawn(async move {
            let logged_in = LoggedIn::default();
            let refused = Arc::new(std::sync::Mutex::new(RefusedKeys::default()));
            // Dropped when this connection's task ends, telling its channels' waits.
            let (_connected, client_gone) = tokio::sync::watch::channel(());
            let handler = Handler {
                engine: engine.clone(),
                peer,
                user: None,
                logged_in: logged_in.clone(),
                channels: Arc::new(AtomicUsize::new(0)),
                startup: Some(startup),
                offers: 0,
                refused: refused.clone(),
                client_gone,
            };
            // russh reads each packet's length, then its body: buffered, that is one system call per
            // packet (or fewer) instead of two.
            let tcp = tokio::io::BufReader::with_capacity(READ_BUFFER, tcp);
            // Version line, key exchange and login within the grace time, or the connection ends.
            let tcp = LoginDeadline::new(tcp, deadline, logged_in.clone());
            match russh::server::run_stream(ssh, tcp, handler).await {
                Ok(session) => {
                    if let Err(e) = session.await {
                        debug!(%peer, error = %e, "ssh front door: connection ended");
                    }
                }
                Err(e) => debug!(%peer, error = %e, "ssh front door: handshake failed"),
            }
            if !logged_in.get() && tokio::time::Instant::now() >= deadline {
                engine.metrics.front_door_dropped(FrontDoorDrop::LoginTimeout);
            }
            // As sshd's "Connection closed by authenticating user …": a line per failed login,
            // with the address, for ops and for tools such as fail2ban.
            let refused = std::mem::take(&mut *refused.lock().unwrap_or_else(|e| e.into_inner()));
            if !logged_in.get() {
                if let Some(user) = refused.user {
                    let source = source_of(peer.ip()).to_string();
                    let line =
                        failures_logged.lock().unwrap_or_else(|e| e.into_inner()).log_line(&source, Instant::now());
                    if let Some(earlier) = line {
                        let more = match refused.more {
                            0 => String::new(),
                            n => format!(" and {n} more"),
                        };
                        warn!(
                            %peer,
                            user,
                            "ssh front door: login failed: no key offered is registered to this user (offered: {}{more}){earlier}",
                            refused.keys.join(", ")
                        );
                    }
                }
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

struct Handler {
    engine: Arc<Engine>,
    peer: SocketAddr,
    /// `(user, key fingerprint)` once authenticated.
    user: Option<(String, String)>,
    logged_in: LoggedIn,
    /// Brokered channels open now on this connection.
    channels: Arc<AtomicUsize>,
    /// Its place among the unauthenticated connections, until it authenticates.
    startup: Option<Place>,
    /// Public keys offered so far.
    offers: u32,
    /// The keys refused, for the log line if the connection never logs in.
    refused: Arc<std::sync::Mutex<RefusedKeys>>,
    /// Closes when the connection ends (see `broker::Request::client_gone`).
    client_gone: tokio::sync::watch::Receiver<()>,
}

/// Keys a connection offered that are not registered to the user it named.
#[derive(Debug, Default)]
struct RefusedKeys {
    /// The user name the client gave last.
    user: Option<String>,
    /// Fingerprints, the first few.
    keys: Vec<String>,
    /// Further keys refused.
    more: u32,
}

impl RefusedKeys {
    /// Fingerprints kept for the log line; the rest are counted.
    const KEPT: usize = 4;

    fn add(&mut self, user: &str, fingerprint: String) {
        self.user = Some(user.chars().take(tether_shared::limits::MAX_NAME).collect());
        if self.keys.contains(&fingerprint) {
            return;
        }
        if self.keys.len() < Self::KEPT {
            self.keys.push(fingerprint);
        } else {
            self.more = self.more.saturating_add(1);
        }
    }
}

impl Handler {
    /// Whether `key` is registered to `user`.
    async fn key_matches(&self, user: &str, key: &russh::keys::PublicKey) -> Result<bool, anyhow::Error> {
        let fp = sshca::fingerprint(key);
        Ok(self.engine.store.user_by_key(&fp).await?.as_deref() == Some(user))
    }

    fn refuse_key(&self, user: &str, key: &russh::keys::PublicKey) {
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).add(user, sshca::fingerprint(key));
    }

    /// What a plain login (no workspace) prints.
    async fn greeting(&self) -> String {
        let Some((user, _)) = &self.user else { return String::new() };
        let suffix = &self.engine.ssh_ca.names().suffix;
        let mut text = format!(
            "Hi {user}. This is Tether's SSH front door; it does not run shells itself.\r\n\
             Connect to a workspace with `ssh WORKSPACE{suffix}` after `tether config-ssh --user {user}`,\r\n\
             or with `ssh -J {user}@HOST:PORT WORKSPACE{suffix}`.\r\n"
        );
        // Owned and granted ones, in two queries however many workspaces there are.
        if let Ok(mine) = self.engine.list_for(Some(user), &[], false).await {
            if mine.is_empty() {
                text.push_str("You have no workspaces.\r\n");
            } else {
                let rows: Vec<Vec<String>> = mine
                    .iter()
                    .map(|w| vec![format!("{}{suffix}", w.name), w.status.to_string(), w.status_reason.clone()])
                    .collect();
                text.push_str("Your workspaces:\r\n");
                let table = crate::cli::table(&["WORKSPACE", "STATUS", "REASON"], &rows);
                text.push_str(&table.replace('\n', "\r\n"));
            }
        }
        text
    }

    /// The greeting, on a shell or a command. A command is not run (the front door runs nothing):
    /// it gets the greeting on stderr and exit status 1, so a script that meant a workspace fails.
    async fn say_and_close(
        &self,
        channel: ChannelId,
        command: Option<&[u8]>,
        session: &mut Session,
    ) -> Result<(), anyhow::Error> {
        let mut text = self.greeting().await;
        session.channel_success(channel)?;
        let status = match command {
            None => {
                session.data(channel, text.into_bytes())?;
                0
            }
            Some(cmd) => {
                let cmd: String = String::from_utf8_lossy(cmd).chars().take(80).collect();
                let suffix = &self.engine.ssh_ca.names().suffix;
                text = format!(
                    "the front door runs no commands (not `{cmd}`): `ssh NAME{suffix} …` runs them in a workspace\r\n{text}"
                );
                session.extended_data(channel, 1, text.into_bytes())?;
                1
            }
        };
        session.exit_status_request(channel, status)?;
        session.eof(channel)?;
        session.close(channel)?;
        Ok(())
    }
}

impl russh::server::Handler for Handler {
    type Error = anyhow::Error;

    async fn auth_publickey_offered(&mut self, user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        self.offers = self.offers.saturating_add(1);
        if self.offers > MAX_KEY_OFFERS {
            return Ok(Auth::reject());
        }
        if self.key_matches(user, offer.public_key).await? {
            Ok(Auth::Accept)
        } else {
            self.refuse_key(user, offer.public_key);
            Ok(Auth::reject())
        }
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        let fp = sshca::fingerprint(key.public_key);
        if self.key_matches(user, key.public_key).await? {
            info!(peer = %self.peer, user, key = %fp, "ssh front door: user authenticated");
            self.user = Some((user.to_string(), fp));
            self.logged_in.set();
            self.startup = None;
            Ok(Auth::Accept)
        } else {
            debug!(peer = %self.peer, user, key = %fp, "ssh front door: key is not registered to this user");
            self.refuse_key(user, key.public_key);
            Ok(Auth::reject())
        }
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some((user, fp)) = self.user.clone() else {
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        };
        if self.channels.load(Ordering::Relaxed) >= MAX_CHANNELS {
            let reason = format!("at most {MAX_CHANNELS} workspace connections per SSH connection");
            reply.reject(ChannelOpenFailure::Other { code: 4, reason }).await;
            return Ok(());
        }
        let request = Request {
            user,
            target: host_to_connect.to_string(),
            via: Via::FrontDoor,
            peer: self.peer.to_string(),
            key_fingerprint: Some(fp),
            token_hash: None,
            client_gone: Some(self.client_gone.clone()),
        };
        // In a task of its own: the broker may wait for a starting workspace's login-blocking
        // scripts, and the connection's loop (its other channels, keepalive replies) must not.
        let channels = self.channels.clone();
        channels.fetch_add(1, Ordering::Relaxed);
        let engine = self.engine.clone();
        let handle = session.handle();
        tokio::spawn(async move {
            match broker::open(&engine, request).await {
                Ok(brokered) => {
                    // Counted until the reason is sent: a shutdown waits for it.
                    let _splicing = broker::Splicing::new(&engine);
                    reply.accept().await;
                    let why = brokered.splice(channel.into_stream()).await;
                    // The coordinator or the agent ended it: say why, as OpenSSH's client shows a
                    // disconnect ("Received disconnect from …: 11: workspace 'dev': access was
                    // revoked"); a closed channel alone shows nothing. Only once the connection's
                    // last workspace connection has ended (several may end together), since the
                    // others would go too.
                    let last = channels.fetch_sub(1, Ordering::Relaxed) == 1;
                    if let Some(why) = why.filter(|_| last) {
                        let _ = handle.disconnect(russh::Disconnect::ByApplication, why, String::new()).await;
                    }
                    return;
                }
                Err(refusal) => {
                    // As OpenSSH's client shows them: "administratively prohibited" for a name or an
                    // access it may not have, "connect failed" for a workspace that cannot take it.
                    let code = match refusal.kind {
                        broker::RefusalKind::NotFound | broker::RefusalKind::Forbidden => 1,
                        broker::RefusalKind::Unavailable | broker::RefusalKind::Internal => 2,
                    };
                    reply.reject(ChannelOpenFailure::Other { code, reason: refusal.message }).await;
                }
            }
            channels.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        self.say_and_close(channel, None, session).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.say_and_close(channel, Some(data), session).await
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        Ok(())
    }
}
