//! Brokered SSH: checks that a user may reach a workspace, opens a stream to its agent over the
//! agent's own QUIC connection, and splices the user's bytes onto it. The bytes are the user's SSH
//! session with the agent, encrypted end to end; the coordinator only counts them.
//!
//! Both ways in use this module: the SSH front door (`direct-tcpip`, as `ssh -J` asks for) and the
//! HTTP upgrade behind `tether ssh` (for users who cannot reach the front door's port). Every
//! attempt, refused or not, lands in the audit log.

use crate::engine::{Engine, OpError};
use crate::metrics::SshOutcome;
use crate::ratelimit::Take;
use crate::store::WorkspaceRow;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tether_shared::proto::{SshStreamOpen, StreamOpen};
use tether_shared::{now_ms, Lifecycle, WorkspaceStatus};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, info, warn};

/// Opening a stream to a connected agent should take one round trip; this bounds a dying one.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an agent has to answer a new stream with its SSH server's version line. It takes one
/// round trip, as an OpenSSH jump host's connect to its target does; an agent that died or lost its
/// network moments ago still looks connected until QUIC's idle timeout, and a user asking for it
/// meanwhile is told so after this, instead of waiting on a channel that never speaks.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most of the agent's first bytes taken before the splice (its version line is at most 255).
const ANSWER_MAX: usize = 1024;
/// Longest an SSH connection waits for a starting workspace's agent to begin its login-blocking
/// scripts before it is refused with the reason that holds then.
pub const LOGIN_WAIT: Duration = Duration::from_secs(600);
/// Copy buffer per direction: large enough for full-speed bulk transfers, small enough that a slow
/// reader holds at most this much per direction in the coordinator.
const SPLICE_BUFFER: usize = 256 * 1024;

/// Refused connections of one user that are logged and audited: a burst, then one every 10 s. A
/// script retrying a refused connection in a loop would otherwise add audit rows (kept 90 days)
/// and log lines as fast as it can connect; past the rate it is still refused, with the same
/// message, and counted in the metrics, and the next refusal logged says how many were not.
/// Refusals for the coordinator's own errors are always logged and audited.
pub const AUDITED_REFUSALS_BURST: u32 = 20;
pub const AUDITED_REFUSALS_PER_SEC: f64 = 0.1;

/// How the user reached the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The SSH front door, authenticated by the user's SSH key.
    FrontDoor,
    /// An HTTP upgrade, authenticated by the user's API token.
    Api,
}

impl Via {
    pub fn as_str(self) -> &'static str {
        match self {
            Via::FrontDoor => "ssh",
            Via::Api => "api",
        }
    }
}

pub struct Request {
    pub user: String,
    /// What the client asked for: `NAME` or `NAME.tether`.
    pub target: String,
    pub via: Via,
    pub peer: String,
    /// The key the front door authenticated; `None` for API tokens, which allow any of the user's keys.
    pub key_fingerprint: Option<String>,
    /// Through the API: the hash of the user's own token, or `None` for the admin's (connecting as
    /// `user` with `tether ssh --as`). Unused through the front door.
    pub token_hash: Option<String>,
    /// Closes (its sender is dropped) when the client's connection ends: a wait for the workspace
    /// stops there rather than hold its task for `LOGIN_WAIT` after the client has gone.
    pub client_gone: Option<tokio::sync::watch::Receiver<()>>,
}

/// A refusal with the sentence the user sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    NotFound,
    Forbidden,
    Unavailable,
    Internal,
}

fn refuse(kind: RefusalKind, message: String) -> Refusal {
    Refusal { kind, message }
}

/// An open stream to a workspace's agent, ready to splice.
pub struct Brokered {
    pub workspace: String,
    pub connection_id: i64,
    /// Who connected, and with what.
    user: String,
    credential: Credential,
    engine: Arc<Engine>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// What the agent sent before the connection was confirmed, for the client first.
    answer: Vec<u8>,
    _window: WindowShare,
}

/// What let a brokered connection in: ending the access ends the connections it let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// The front door, with this key (its fingerprint).
    Key(String),
    /// `tether ssh` with the user's own API token (its hash).
    UserToken(String),
    /// `tether ssh --as USER` with the admin's token.
    AdminToken,
}

/// A brokered SSH connection while it is open, for ending it when its access goes.
pub struct OpenSsh {
    user: String,
    workspace: String,
    credential: Credential,
    end: Arc<tokio::sync::Notify>,
    /// Set with `end`: why it was ended, for the log and the audit record.
    why: Option<String>,
}

impl Engine {
    /// Ends the open SSH connections that `which` picks, saying `why`; returns how many.
    pub fn end_ssh(&self, which: impl Fn(&str, &str, &Credential) -> bool, why: &str) -> usize {
        let mut open = self.ssh_open.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for o in open.values_mut() {
            if o.why.is_none() && which(&o.user, &o.workspace, &o.credential) {
                o.why = Some(why.to_string());
                o.end.notify_one();
                n += 1;
            }
        }
        n
    }
}

/// Brokered streams open on each agent connection, by the connection's stable id.
static OPEN_STREAMS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<usize, u64>>> =
    std::sync::LazyLock::new(Default::default);

/// One brokered stream's share of its agent connection's flow-control windows. QUIC credits the
/// connection's window back only as the coordinator reads, and a stream whose user stopped reading
/// holds up to a stream window of it unread. So each open stream adds a stream window to the
/// connection's, and what the control and log streams need (heartbeats, lifecycle, logs) is always
/// left free, however many users stall.
struct WindowShare {
    conn: quinn::Connection,
}

impl WindowShare {
    fn new(conn: quinn::Connection) -> WindowShare {
        WindowShare::adjust(&conn, 1);
        WindowShare { conn }
    }

    fn adjust(conn: &quinn::Connection, by: i64) {
        let mut open = OPEN_STREAMS.lock().unwrap_or_else(|e| e.into_inner());
        let id = conn.stable_id();
        let n = open.get(&id).copied().unwrap_or(0).saturating_add_signed(by);
        if n == 0 {
            open.remove(&id);
        } else {
            open.insert(id, n);
        }
        let stream = u64::from(tether_shared::tls::SERVER_STREAM_WINDOW);
        let window = u64::from(tether_shared::tls::SERVER_CONNECTION_WINDOW).saturating_add(n.saturating_mul(stream));
        conn.set_receive_window(quinn::VarInt::from_u64(window).unwrap_or(quinn::VarInt::MAX));
        conn.set_send_window(window);
    }
}

/// An agent connection's windows once its hello is welcomed: the base, plus a stream window per
/// brokered stream already open (none, unless this is called again).
pub fn grant_windows(conn: &quinn::Connection) {
    WindowShare::adjust(conn, 0);
}

impl Drop for WindowShare {
    fn drop(&mut self) {
        WindowShare::adjust(&self.conn, -1);
    }
}

/// Whether a workspace in `status` with these facts takes SSH connections; the refusal if not.
fn check_reachable(
    name: &str,
    status: WorkspaceStatus,
    reason: &str,
    connected: bool,
    lifecycle: Option<Lifecycle>,
    blocks_login: bool,
) -> Result<(), Refusal> {
    use WorkspaceStatus::*;
    let unavailable = |m: String| Err(refuse(RefusalKind::Unavailable, m));
    match status {
        Stopped => unavailable(format!("workspace '{name}' is stopped; start it with `tether workspace start {name}`")),
        Pending if reason == crate::status::CREATED_NOT_STARTED => unavailable(format!(
            "workspace '{name}' was created and never started; start it with `tether workspace start {name}`"
        )),
        Failed => unavailable(format!(
            "workspace '{name}' is failed: {reason}; start it again with `tether workspace start {name}`"
        )),
        Pending | Stopping | Deleting | Deleted => {
            unavailable(format!("workspace '{name}' is {status}: {reason}"))
        }
        // Still `running`: its agent's connection dropped moments ago (a coordinator restart sends
        // agents away for a few seconds) and the heartbeat timeout has not passed.
        Running if !connected => unavailable(format!(
            "workspace '{name}' has no connected agent right now (its connection dropped; it is marked unhealthy unless it is back within its heartbeat timeout); try again in a few seconds"
        )),
        Starting | Unhealthy if !connected => {
            unavailable(format!("workspace '{name}' has no connected agent ({status}: {reason})"))
        }
        Starting if scripts_block_login(status, connected, lifecycle, blocks_login) => {
            unavailable(format!("workspace '{name}' is starting: its agent has not begun the startup scripts that block login"))
        }
        Starting | Running | Unhealthy => Ok(()),
    }
}

/// Whether a connection waits here for a starting workspace: its agent is connected, but has not
/// begun the start phase, whose scripts block login. Once it has (`starting`), the agent holds its
/// sessions itself until they are done, and tells their users so; it can, as the coordinator
/// cannot, since OpenSSH shows nothing a jump host says while a channel opens.
fn scripts_block_login(
    status: WorkspaceStatus,
    connected: bool,
    lifecycle: Option<Lifecycle>,
    blocks_login: bool,
) -> bool {
    status == WorkspaceStatus::Starting
        && connected
        && blocks_login
        && !matches!(
            lifecycle,
            Some(Lifecycle::Starting | Lifecycle::Ready | Lifecycle::StartError | Lifecycle::StartTimeout)
        )
}

/// Checks access and opens a stream to the workspace's agent. Refusals are logged and audited.
pub async fn open(engine: &Arc<Engine>, req: Request) -> Result<Brokered, Refusal> {
    let name = engine.ssh_ca.names().workspace_name(&req.target);
    match authorize_and_open(engine, &req, &name).await {
        Ok((send, recv, window)) => {
            let key_fingerprints = match &req.key_fingerprint {
                Some(fp) => vec![fp.clone()],
                None => user_keys(engine, &req.user).await?,
            };
            let connection_id = audit_start(engine, &req, &name, "open")
                .await
                .map_err(|e| refuse(RefusalKind::Internal, format!("coordinator error: {e}")))?;
            info!(user = %req.user, workspace = %name, via = req.via.as_str(), peer = %req.peer, connection_id, "ssh connection brokered");
            let mut b = Brokered {
                workspace: name,
                connection_id,
                user: req.user.clone(),
                credential: match (&req.key_fingerprint, &req.token_hash) {
                    (Some(fp), _) => Credential::Key(fp.clone()),
                    (None, Some(hash)) => Credential::UserToken(hash.clone()),
                    (None, None) => Credential::AdminToken,
                },
                engine: engine.clone(),
                send,
                recv,
                answer: Vec::new(),
                _window: window,
            };
            let open = StreamOpen::Ssh(SshStreamOpen {
                connection_id: connection_id as u64,
                user: req.user.clone(),
                key_fingerprints,
                peer: req.peer.clone(),
            });
            if let Err(e) = tether_shared::io::write_msg(&mut b.send, &open).await {
                let message = format!("workspace '{}': its agent went away ({e})", b.workspace);
                b.finish(0, 0, &format!("agent stream failed: {e}")).await;
                engine.metrics.ssh_connection(SshOutcome::Refused);
                return Err(refuse(RefusalKind::Unavailable, message));
            }
            // Confirmed to the client only once the agent answers: a refusal can still say why.
            match tokio::time::timeout(ANSWER_TIMEOUT, read_answer(&mut b.recv)).await {
                Ok(Ok(answer)) => b.answer = answer,
                failed => {
                    let why = match failed {
                        Ok(Err(why)) => why,
                        _ => format!(
                            "its agent did not answer within {}s: it may have stopped or lost its network \
                             (`tether workspace show {}` tells once its connection times out)",
                            ANSWER_TIMEOUT.as_secs(),
                            b.workspace
                        ),
                    };
                    let message = format!("workspace '{}': {why}", b.workspace);
                    warn!(user = %req.user, workspace = %b.workspace, connection_id = b.connection_id, "ssh refused: {message}");
                    let _ = b.send.reset(0u32.into());
                    let _ = b.recv.stop(0u32.into());
                    b.finish(0, 0, &format!("refused: {message}")).await;
                    engine.metrics.ssh_connection(SshOutcome::Refused);
                    return Err(refuse(RefusalKind::Unavailable, message));
                }
            }
            engine.metrics.ssh_connection(SshOutcome::Accepted);
            Ok(b)
        }
        Err(refusal) => {
            record_refusal(engine, &req, &name, &refusal).await;
            Err(refusal)
        }
    }
}

/// Counts, logs and audits a refusal, within the per-user rate.
async fn record_refusal(engine: &Engine, req: &Request, name: &str, refusal: &Refusal) {
    engine.metrics.ssh_connection(SshOutcome::Refused);
    let take = match refusal.kind {
        RefusalKind::Internal => Take::Allowed { refused_before: 0 },
        _ => {
            let mut limiter = engine.ssh_refusals.lock().unwrap_or_else(|e| e.into_inner());
            limiter.take(&req.user, std::time::Instant::now())
        }
    };
    if let Take::Allowed { refused_before } = take {
        let outcome = match refused_before {
            0 => format!("refused: {refusal}"),
            n => format!("refused: {refusal} (and {n} times before, not recorded: over the rate)"),
        };
        warn!(user = %req.user, workspace = %name, via = req.via.as_str(), peer = %req.peer, "ssh {outcome}");
        if let Ok(id) = audit_start(engine, req, name, &outcome).await {
            let _ = engine.store.audit_end(id, 0, 0, &outcome, now_ms()).await;
        }
    }
}

/// The agent's first bytes on a new stream (its SSH server's version line), or why none came.
async fn read_answer(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, String> {
    use tether_shared::proto::stream_refused;
    let mut buf = vec![0u8; ANSWER_MAX];
    match recv.read(&mut buf).await {
        Ok(Some(n)) => {
            buf.truncate(n);
            Ok(buf)
        }
        Ok(None) => Err("its agent closed the connection before SSH began".into()),
        Err(quinn::ReadError::Reset(code)) => Err(match u32::try_from(code.into_inner()) {
            Ok(stream_refused::FULL) => format!(
                "its agent refused the connection: it serves {} SSH connections already, as many as it takes",
                tether_shared::limits::MAX_SSH_CONNECTIONS
            ),
            Ok(stream_refused::BAD_OPEN) => {
                "its agent could not read the connection request (is it a different version of Tether?)".into()
            }
            _ => format!("its agent refused the connection (code {code})"),
        }),
        Err(quinn::ReadError::ConnectionLost(e)) => Err(format!("its agent went away ({e})")),
        Err(e) => Err(format!("its agent's stream failed ({e})")),
    }
}

/// Starts an audit record for this request.
async fn audit_start(
    engine: &Engine,
    req: &Request,
    name: &str,
    outcome: &str,
) -> Result<i64, crate::store::StoreError> {
    let fp = req.key_fingerprint.as_deref();
    engine.store.audit_start(&req.user, name, req.via.as_str(), &req.peer, fp, outcome, now_ms()).await
}

/// Why `user` may no longer use this connection to `workspace`, if that is so: the words
/// `end_ssh`'s callers use. A store error counts as still allowed (it is logged), so that a
/// database hiccup does not end sessions.
async fn access_gone(engine: &Engine, user: &str, workspace: &str, credential: &Credential) -> Option<&'static str> {
    let check = async {
        let db = |e: crate::store::StoreError| e.to_string();
        let by = match credential {
            Credential::Key(fp) => engine.store.user_by_key(fp).await.map_err(db)?,
            Credential::UserToken(hash) => engine.store.user_by_token(hash).await.map_err(db)?,
            Credential::AdminToken => engine.store.user(user).await.map_err(db)?.map(|u| u.name),
        };
        if by.as_deref() != Some(user) {
            return Ok(Some(match credential {
                Credential::Key(_) => "the key was removed",
                Credential::UserToken(_) => "the user's API token was replaced",
                Credential::AdminToken => "the user was removed",
            }));
        }
        let row = match engine.workspace_row(workspace).await {
            Ok(row) => row,
            Err(OpError::NotFound(_)) => return Ok(Some("the workspace was deleted")),
            Err(e) => return Err(e.to_string()),
        };
        let granted = engine.store.grants(row.id).await.map_err(db)?;
        let allowed = row.owner.as_deref() == Some(user) || granted.iter().any(|g| g == user);
        Ok((!allowed).then_some("access was revoked"))
    };
    let result: Result<Option<&'static str>, String> = check.await;
    result.unwrap_or_else(|e| {
        warn!(user, workspace, error = %e, "ssh: could not check access again; the connection goes on");
        None
    })
}

async fn user_keys(engine: &Engine, user: &str) -> Result<Vec<String>, Refusal> {
    let u = engine
        .store
        .user(user)
        .await
        .map_err(|e| refuse(RefusalKind::Internal, format!("coordinator error: {e}")))?
        .ok_or_else(|| refuse(RefusalKind::Forbidden, format!("no user '{user}'")))?;
    Ok(u.keys.into_iter().map(|(fp, _)| fp).collect())
}

fn internal(e: OpError) -> Refusal {
    refuse(RefusalKind::Internal, format!("coordinator error: {e}"))
}

fn no_workspace(name: &str) -> Refusal {
    refuse(RefusalKind::NotFound, format!("no workspace '{name}'"))
}

/// Whether `user` may reach workspace `name` (with the key `key_fingerprint`, when the front door
/// authenticated one): its row, and whether its template has start scripts that block login.
async fn authorize(
    engine: &Engine,
    user: &str,
    key_fingerprint: Option<&str>,
    name: &str,
) -> Result<(WorkspaceRow, bool), Refusal> {
    // The key was checked at login, but a front-door connection can outlive it (a ControlMaster opens
    // many workspace connections over one): a removed key or user opens nothing more.
    if let Some(fp) = key_fingerprint {
        let holder = engine.store.user_by_key(fp).await.map_err(|e| internal(e.into()))?;
        if holder.as_deref() != Some(user) {
            return Err(refuse(
                RefusalKind::Forbidden,
                format!("the key {fp} is no longer registered to user '{user}'"),
            ));
        }
    }
    if crate::template::check_name("workspace", name).is_err() {
        if name.contains('.') {
            // `dev.staging` at the `.tether` coordinator: most likely the wrong coordinator.
            let suffix = &engine.ssh_ca.names().suffix;
            return Err(refuse(
                RefusalKind::NotFound,
                format!("no workspace '{name}' (this coordinator's workspace host names end in {suffix})"),
            ));
        }
        return Err(no_workspace(name));
    }
    let row = match engine.workspace_row(name).await {
        Ok(row) => row,
        Err(OpError::NotFound(_)) => return Err(no_workspace(name)),
        Err(e) => return Err(internal(e)),
    };
    let owner = row.owner.as_deref() == Some(user);
    if !owner && !engine.store.grants(row.id).await.map_err(|e| internal(e.into()))?.iter().any(|g| g == user) {
        return Err(refuse(RefusalKind::Forbidden, format!("user '{user}' may not access workspace '{name}'")));
    }
    let blocks_login = crate::template::Template::parse(&row.template)
        .map(|t| t.scripts.iter().any(|s| s.blocks_login && s.on == tether_shared::proto::ScriptTrigger::Start))
        .unwrap_or(false);
    Ok((row, blocks_login))
}

/// Whether the request would be let in now, without connecting or waiting: the workspace's name,
/// or the refusal a connection would get, logged and audited as that connection's would be.
/// `tether ssh` asks before it runs OpenSSH, so that a refusal is the only thing the user reads
/// (OpenSSH adds lines of its own after a ProxyCommand's error). A starting workspace whose agent
/// has not begun its login-blocking scripts passes: a connection waits for them.
pub async fn check(engine: &Engine, req: &Request) -> Result<String, Refusal> {
    let name = engine.ssh_ca.names().workspace_name(&req.target);
    let checked = async {
        let (row, blocks_login) = authorize(engine, &req.user, req.key_fingerprint.as_deref(), &name).await?;
        let connected = engine.agent_connection(row.id).is_some();
        match check_reachable(&name, row.status, &row.status_reason, connected, row.lifecycle, blocks_login) {
            Err(_) if scripts_block_login(row.status, connected, row.lifecycle, blocks_login) => Ok(()),
            other => other,
        }
    };
    match checked.await {
        Ok(()) => Ok(name),
        Err(refusal) => {
            record_refusal(engine, req, &name, &refusal).await;
            Err(refusal)
        }
    }
}

async fn authorize_and_open(
    engine: &Arc<Engine>,
    req: &Request,
    name: &str,
) -> Result<(quinn::SendStream, quinn::RecvStream, WindowShare), Refusal> {
    let not_found = || no_workspace(name);
    let (row, blocks_login) = authorize(engine, &req.user, req.key_fingerprint.as_deref(), name).await?;
    // A workspace whose agent is connected but has not begun the start scripts that block login
    // is waited for (a moment, usually), up to `LOGIN_WAIT`: the connection goes through once the
    // agent has begun them, or gets the refusal that applies then (a workspace with no agent yet is
    // refused at once: nothing says when one will come).
    let deadline = tokio::time::Instant::now() + LOGIN_WAIT;
    let mut changes = engine.subscribe_changes();
    let mut row = row;
    let mut waited = false;
    let mut gone = req.client_gone.clone();
    let quic = loop {
        changes.borrow_and_update();
        let quic = engine.agent_connection(row.id);
        match check_reachable(name, row.status, &row.status_reason, quic.is_some(), row.lifecycle, blocks_login) {
            Ok(()) => break quic,
            Err(refusal)
                if scripts_block_login(row.status, quic.is_some(), row.lifecycle, blocks_login)
                    && tokio::time::Instant::now() < deadline =>
            {
                if !waited {
                    debug!(workspace = %name, user = %req.user, %refusal, "ssh waits for the workspace to come up");
                    waited = true;
                }
                // Woken by any workspace's change; a second's poll as well, for what changes none.
                let until = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
                let gone = async {
                    match &mut gone {
                        Some(rx) => while rx.changed().await.is_ok() {},
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tokio::time::timeout_at(until, changes.changed()) => {}
                    () = gone => {
                        return Err(refuse(RefusalKind::Unavailable, format!("the client left while '{name}' was starting")));
                    }
                }
            }
            Err(refusal) => return Err(refusal),
        }
        let id = row.id;
        row = engine.store.workspace_by_id(id).await.map_err(|e| internal(e.into()))?.ok_or_else(not_found)?;
    };
    let quic =
        quic.ok_or_else(|| refuse(RefusalKind::Unavailable, format!("workspace '{name}' has no connected agent")))?;
    // The window grows before the agent can send on the stream.
    let window = WindowShare::new(quic.clone());
    match tokio::time::timeout(OPEN_TIMEOUT, quic.open_bi()).await {
        Ok(Ok((send, recv))) => Ok((send, recv, window)),
        Ok(Err(e)) => Err(refuse(RefusalKind::Unavailable, format!("workspace '{name}': its agent went away ({e})"))),
        Err(_) => {
            Err(refuse(RefusalKind::Unavailable, format!("workspace '{name}': its agent did not answer in time")))
        }
    }
}

impl Brokered {
    /// Copies bytes both ways until both sides are done or one fails, then records the end.
    /// Returns why it ended, for its client, unless one of its ends closed it.
    pub async fn splice<S: AsyncRead + AsyncWrite + Unpin>(self, client: S) -> Option<String> {
        let _splicing = Splicing::new(&self.engine);
        let (up_total, down_total) = self.engine.metrics.ssh_bytes();
        let counters = Arc::new(Counters { up: 0.into(), down: 0.into(), up_total, down_total });
        let mut client = Counting { inner: client, counters: counters.clone() };
        let Brokered { workspace, connection_id, user, credential, engine, send, recv, answer, _window } = self;
        let _active = engine.metrics.ssh_active();
        let end = Arc::new(tokio::sync::Notify::new());
        let open = OpenSsh {
            user: user.clone(),
            workspace: workspace.clone(),
            credential: credential.clone(),
            end: end.clone(),
            why: None,
        };
        engine.ssh_open.lock().unwrap_or_else(|e| e.into_inner()).insert(connection_id, open);
        // Access checked before this connection was registered may have gone since (while it
        // waited for login-blocking scripts, say), and taking it away ended only the connections
        // registered then: check again now that a removal would find it.
        if let Some(why) = access_gone(&engine, &user, &workspace, &credential).await {
            if let Some(o) = engine.ssh_open.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&connection_id) {
                o.why.get_or_insert(why.to_string());
                o.end.notify_one();
            }
        }
        let mut agent = tokio::io::join(recv, send);
        let copy = async {
            tokio::io::AsyncWriteExt::write_all(&mut client, &answer).await?;
            tokio::io::copy_bidirectional_with_sizes(&mut client, &mut agent, SPLICE_BUFFER, SPLICE_BUFFER).await
        };
        let result = tokio::select! {
            r = copy => Ok(r),
            () = end.notified() => Err(()),
        };
        let ended = engine.ssh_open.lock().unwrap_or_else(|e| e.into_inner()).remove(&connection_id);
        // Why the coordinator ended it, for its client.
        let mut ended_by_us = None;
        let result = match result {
            Ok(r) => r,
            // Access was taken away: the agent's side is reset (its session ends), and the
            // client's is dropped (its connection closes).
            Err(()) => {
                let why = ended.and_then(|o| o.why).unwrap_or_else(|| "access removed".into());
                info!(%workspace, connection_id, %why, "ssh connection ended by the coordinator");
                ended_by_us = Some(format!("workspace '{workspace}': {why}"));
                Err(std::io::Error::other(why))
            }
        };
        let (up, down) = (counters.up.load(Ordering::Relaxed), counters.down.load(Ordering::Relaxed));
        let (outcome, why) = match &result {
            Ok(_) => ("closed".to_string(), None),
            // The client hung up: it closed its channel while the agent still had bytes for it, or
            // (`tether ssh`, whose ProxyCommand OpenSSH ends with SIGHUP) its TLS connection went
            // without a close_notify, or was reset. That is how these clients leave: a normal end.
            Err(e) if client_hung_up(e, ended_by_us.is_some()) => ("closed".to_string(), None),
            Err(e) => {
                let (mut recv, mut send) = agent.into_inner();
                let _ = send.reset(0u32.into());
                let _ = recv.stop(0u32.into());
                let why = match ended_by_us {
                    Some(why) => Some(why),
                    None if from_agent(e) => Some(agent_gone(&engine, &workspace).await),
                    // The client's side failed: nobody to tell.
                    None => None,
                };
                (format!("ended: {e}"), why)
            }
        };
        info!(%workspace, connection_id, up, down, %outcome, "ssh connection ended");
        record_end(&engine, &workspace, connection_id, up, down, &outcome).await;
        why
    }

    /// Records the end of a connection that never carried bytes.
    pub async fn abandon(self, outcome: &str) {
        self.finish(0, 0, outcome).await;
    }

    async fn finish(self, up: u64, down: u64, outcome: &str) {
        record_end(&self.engine, &self.workspace, self.connection_id, up, down, outcome).await;
    }
}

/// Whether a splice's error is the client's leaving, not a failure worth recording.
fn client_hung_up(e: &std::io::Error, ended_by_us: bool) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    !ended_by_us && !from_agent(e) && matches!(e.kind(), BrokenPipe | ConnectionReset | UnexpectedEof)
}

/// Whether a splice's error came from the agent's side: its stream or its connection.
fn from_agent(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<quinn::ReadError>() || inner.is::<quinn::WriteError>())
}

/// What the client of a connection whose agent side failed is told: the workspace's status when it
/// says more (stopping, unhealthy with the reason).
async fn agent_gone(engine: &Engine, workspace: &str) -> String {
    let said = format!("workspace '{workspace}': the connection to its agent ended");
    match engine.store.workspace(workspace).await {
        Ok(Some(row)) if row.status != WorkspaceStatus::Running => match row.status_reason.as_str() {
            "" => format!("{said} (the workspace is {})", row.status),
            reason => format!("{said} (the workspace is {}: {reason})", row.status),
        },
        _ => said,
    }
}

/// Counts a splice while it runs, for a shutdown that waits for them to say why they end.
pub struct Splicing(Arc<Engine>);

impl Splicing {
    pub fn new(engine: &Arc<Engine>) -> Self {
        engine.ssh_splicing.fetch_add(1, Ordering::Relaxed);
        Splicing(engine.clone())
    }
}

impl Drop for Splicing {
    fn drop(&mut self) {
        self.0.ssh_splicing.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn record_end(engine: &Engine, workspace: &str, connection_id: i64, up: u64, down: u64, outcome: &str) {
    if let Err(e) = engine.store.audit_end(connection_id, up, down, outcome, now_ms()).await {
        warn!(%workspace, connection_id, error = %e, "could not record the end of an ssh connection");
    }
}

/// Bytes of one connection, and the coordinator-wide totals in the metrics.
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    up_total: metrics::Counter,
    down_total: metrics::Counter,
}

/// The client side of a splice, counting bytes: reads go up to the agent, writes come down.
struct Counting<S> {
    inner: S,
    counters: Arc<Counters>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        self.counters.up.fetch_add(n, Ordering::Relaxed);
        self.counters.up_total.increment(n);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counters.down.fetch_add(*n as u64, Ordering::Relaxed);
            self.counters.down_total.increment(*n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_why() {
        use WorkspaceStatus::*;
        let r = |s, c, l, b| check_reachable("x", s, "why", c, l, b).map_err(|e| e.message);
        assert_eq!(
            r(Stopped, false, None, false).unwrap_err(),
            "workspace 'x' is stopped; start it with `tether workspace start x`"
        );
        assert!(r(Unhealthy, false, None, false).unwrap_err().contains("has no connected agent (unhealthy: why)"));
        assert_eq!(
            r(Running, false, Some(Lifecycle::Ready), false).unwrap_err(),
            "workspace 'x' has no connected agent right now (its connection dropped; it is marked unhealthy unless it is back within its heartbeat timeout); try again in a few seconds"
        );
        // The agent has not begun the scripts that block login: the connection waits for that.
        assert!(r(Starting, true, None, true).unwrap_err().contains("has not begun the startup scripts"));
        assert!(r(Starting, true, Some(Lifecycle::Created), true).is_err());
        // It has: its sessions wait there.
        assert!(r(Starting, true, Some(Lifecycle::Starting), true).is_ok());
        assert!(r(Starting, true, Some(Lifecycle::Starting), false).is_ok());
        assert!(r(Unhealthy, true, Some(Lifecycle::StartError), true).is_ok());
        assert!(r(Running, true, Some(Lifecycle::Ready), true).is_ok());
    }
}
