//! The agent side of the coordinator: accepts agents' QUIC connections, checks their hello, and
//! moves messages between each connection and the [`Engine`]. One task per stream; a bad frame
//! closes that one connection and nothing else.

use crate::engine::{Accepted, Engine};
use crate::places::{source_of, Place, Places};
use crate::ratelimit::RateLimiter;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether_shared::frame::{self, FrameError};
use tether_shared::io::{read_payload, read_payload_max, write_msg};
use tether_shared::limits::MAX_HELLO_FRAME;
use tether_shared::proto::{
    AgentMessage, Channel, CoordinatorMessage, Hello, HelloReply, LogBatch, RejectCode, PROTOCOL_VERSION,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

/// Close codes on the tunnel.
pub const CLOSE_NORMAL: u32 = 0;
pub const CLOSE_PROTOCOL: u32 = 1;
pub const CLOSE_REJECTED: u32 = 2;
pub const CLOSE_SHUTDOWN: u32 = 3;

/// From an agent's first packet to its hello's answer, all together.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections between their first packet and their hello's answer: nobody is authenticated yet, so
/// no one source may hold many of them (a NAT in front of many agents that reconnect together still
/// gets plenty), and they do not count against `max_agents`.
const MAX_PENDING: usize = 4096;
const MAX_PENDING_PER_SOURCE: usize = 256;
/// With this many pending, a new source must first show that it receives at its address (a QUIC
/// Retry: one more round trip), so packets with forged sources hold no place at all.
const RETRY_WHEN_PENDING: usize = 64;

#[derive(Debug, thiserror::Error)]
enum TunnelError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("{0}")]
    Protocol(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

/// Accepts agent connections until the endpoint closes. `max_agents` bounds welcomed connections.
pub async fn serve(endpoint: quinn::Endpoint, engine: Arc<Engine>, max_agents: usize) {
    let open = Arc::new(AtomicUsize::new(0));
    let pending = Places::new(MAX_PENDING, MAX_PENDING_PER_SOURCE);
    let mut refusals_logged = RateLimiter::new(0.1, 1);
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        if engine.is_shutting_down() {
            // An agent that came back too soon; it retries on its backoff, to the next coordinator.
            debug!(%remote, "refusing agent connection: shutting down");
            incoming.refuse();
            continue;
        }
        if open.load(Ordering::Relaxed) >= max_agents {
            warn!(%remote, max_agents, "refusing agent connection: at the connection limit");
            incoming.refuse();
            continue;
        }
        if pending.held() >= RETRY_WHEN_PENDING && !incoming.remote_address_validated() && incoming.may_retry() {
            let _ = incoming.retry();
            continue;
        }
        let place = match pending.take(remote.ip()) {
            Ok(place) => place,
            Err(full) => {
                // One line per source now and then: a flood of refusals must not flood the log.
                let source = source_of(remote.ip()).to_string();
                if let Some(earlier) = refusals_logged.log_line(&source, std::time::Instant::now()) {
                    warn!(%remote, "refusing agent connection: {}{earlier}", full.describe("are waiting to say hello"));
                }
                incoming.refuse();
                continue;
            }
        };
        let engine = engine.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
            match tokio::time::timeout_at(deadline, incoming).await {
                Ok(Ok(conn)) => handle(conn, remote, engine, Pending { place, deadline, open, max_agents }).await,
                Ok(Err(e)) => debug!(%remote, error = %e, "agent handshake failed"),
                Err(_) => debug!(%remote, "agent handshake timed out"),
            }
        });
    }
}

/// A connection that has not said hello: its place, when it must have, and the count of welcomed
/// connections it joins once welcomed.
struct Pending {
    place: Place,
    deadline: tokio::time::Instant,
    open: Arc<AtomicUsize>,
    max_agents: usize,
}

/// Counts one welcomed connection until dropped.
struct Welcomed(Arc<AtomicUsize>);

impl Welcomed {
    /// Counts one more, unless `max` are counted already.
    fn take(open: Arc<AtomicUsize>, max: usize) -> Option<Welcomed> {
        if open.fetch_add(1, Ordering::Relaxed) >= max {
            open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Welcomed(open))
    }
}

impl Drop for Welcomed {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(conn: quinn::Connection, remote: SocketAddr, engine: Arc<Engine>, pending: Pending) {
    match session(&conn, remote, &engine, pending).await {
        Ok(()) => {}
        Err(TunnelError::Connection(e)) => debug!(%remote, error = %e, "agent connection ended"),
        // The coordinator is stopping and closed its connections: their streams fail, as expected.
        Err(e) if engine.is_shutting_down() => debug!(%remote, error = %e, "agent connection ended at shutdown"),
        Err(e) => {
            warn!(%remote, error = %e, "closing agent connection");
            conn.close(CLOSE_PROTOCOL.into(), truncate_reason(&e.to_string()));
        }
    }
}

fn truncate_reason(s: &str) -> &[u8] {
    let b = s.as_bytes();
    &b[..b.len().min(512)]
}

async fn reject(conn: &quinn::Connection, send: &mut quinn::SendStream, code: RejectCode, message: String) {
    let _ = write_msg(send, &HelloReply::Rejected { code, message: message.clone() }).await;
    let _ = send.finish();
    // Let the agent read the answer and close; do not wait on a peer that never does.
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    conn.close(CLOSE_REJECTED.into(), truncate_reason(&message));
}

async fn session(
    conn: &quinn::Connection,
    remote: SocketAddr,
    engine: &Arc<Engine>,
    pending: Pending,
) -> Result<(), TunnelError> {
    let Pending { place, deadline, open, max_agents } = pending;
    let (mut send, mut recv) = tokio::time::timeout_at(deadline, conn.accept_bi())
        .await
        .map_err(|_| TunnelError::Timeout("the control stream"))??;
    let mut buf = Vec::new();
    // Nobody is authenticated yet: the hello gets a small limit of its own.
    let got = tokio::time::timeout_at(deadline, read_payload_max(&mut recv, &mut buf, MAX_HELLO_FRAME))
        .await
        .map_err(|_| TunnelError::Timeout("the hello"))??;
    if !got {
        return Err(TunnelError::Protocol("control stream closed before the hello".into()));
    }
    let (version, body) = frame::split_version(&buf)?;
    if version != PROTOCOL_VERSION {
        let fetch = match &engine.config.https_url {
            Some(url) => format!("`curl -fsSL {url}{} | sh` fetches and starts it", crate::dist::INIT_ROUTE),
            None => format!("its {} fetches and starts it", crate::dist::INIT_ROUTE),
        };
        let message = format!(
            "agent speaks protocol version {version}, but this coordinator (tether {}) speaks version \
             {PROTOCOL_VERSION}; run the tether-agent that matches it, which the coordinator serves: {fetch}",
            env!("CARGO_PKG_VERSION")
        );
        warn!(%remote, version, "rejecting agent: protocol version mismatch");
        reject(conn, &mut send, RejectCode::VersionMismatch, message).await;
        return Ok(());
    }
    let hello: Hello = match frame::decode(body).map_err(|e| e.to_string()).and_then(|h: Hello| {
        h.validate().map_err(|e| e.to_string())?;
        Ok(h)
    }) {
        Ok(h) => h,
        Err(e) => {
            warn!(%remote, error = %e, "rejecting agent: bad hello");
            reject(conn, &mut send, RejectCode::Malformed, format!("hello is not valid: {e}")).await;
            return Ok(());
        }
    };
    // Counted as an agent from here: the limit is checked again now that the hello is good.
    let Some(welcomed) = Welcomed::take(open, max_agents) else {
        warn!(%remote, max_agents, "refusing agent: at the connection limit");
        let message = format!("the coordinator holds its most agent connections ({max_agents}, --max-agents)");
        reject(conn, &mut send, RejectCode::Busy, message).await;
        return Ok(());
    };
    let accepted = match engine.agent_hello(&hello, Some(conn.clone())).await {
        Ok(a) => a,
        Err(r) => {
            warn!(%remote, code = ?r.code, reason = %r.message, "rejecting agent");
            // The place is kept until the rejected peer is gone.
            drop(welcomed);
            reject(conn, &mut send, r.code, r.message).await;
            return Ok(());
        }
    };
    // Welcomed: the connection gets the windows of an agent (the pre-hello ones are small).
    drop(place);
    let _welcomed = welcomed;
    crate::broker::grant_windows(conn);
    let Accepted { workspace_id: id, welcome, conn_id, mut commands, clock_offset_ms: offset } = accepted;
    let name = welcome.workspace.clone();
    write_msg(&mut send, &HelloReply::Welcome(welcome)).await?;

    let (msgs_tx, mut msgs) = mpsc::channel::<Result<AgentMessage, FrameError>>(4);
    let reader = tokio::spawn(read_loop(recv, msgs_tx));
    let mut goodbye = None;
    let mut logs_task: Option<tokio::task::JoinHandle<()>> = None;
    let result: Result<(), TunnelError> = async {
        loop {
            tokio::select! {
                msg = msgs.recv() => {
                    let Some(msg) = msg else { break };
                    let msg = msg?;
                    msg.validate().map_err(|e| TunnelError::Protocol(format!("invalid message: {e}")))?;
                    match msg {
                        AgentMessage::FetchManifest => match engine.manifest(id).await {
                            Ok(m) => write_msg(&mut send, &CoordinatorMessage::Manifest(m)).await?,
                            Err(e) => write_msg(&mut send, &CoordinatorMessage::Error { message: e.to_string() }).await?,
                        },
                        AgentMessage::Heartbeat(hb) => engine.heartbeat(id, conn_id, hb),
                        AgentMessage::Events(batch) => match engine.agent_events(id, conn_id, &batch.events, offset).await {
                            Ok(seq) => write_msg(&mut send, &CoordinatorMessage::Ack { channel: Channel::Events, seq }).await?,
                            // The agent resends whatever is unacknowledged on its next connection.
                            Err(e) => return Err(TunnelError::Protocol(format!("storing events: {e}"))),
                        },
                        AgentMessage::Goodbye { reason } => goodbye = Some(reason),
                    }
                }
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { break };
                    let replaced = matches!(&cmd, CoordinatorMessage::Error { message } if message.starts_with("replaced"));
                    write_msg(&mut send, &cmd).await?;
                    if replaced {
                        conn.close(CLOSE_NORMAL.into(), b"replaced by a newer connection");
                        break;
                    }
                }
                stream = conn.accept_bi(), if logs_task.is_none() => {
                    let (lsend, lrecv) = stream?;
                    // Its log lines name the workspace, not its row id.
                    let logs = log_stream(lsend, lrecv, engine.clone(), id, conn_id, offset, conn.clone())
                        .instrument(tracing::info_span!("logs", workspace = %name));
                    logs_task = Some(tokio::spawn(logs));
                }
            }
        }
        Ok(())
    }
    .await;
    reader.abort();
    if let Some(t) = logs_task {
        t.abort();
    }
    let clean = goodbye.is_some();
    engine.agent_gone(id, conn_id, goodbye).await;
    info!(workspace = %name, clean, "agent disconnected");
    result
}

/// Reads frames off a stream into a bounded channel, so the select loop never cancels a half-read
/// frame and a fast peer waits for us instead of growing a queue.
async fn read_loop(mut recv: quinn::RecvStream, tx: mpsc::Sender<Result<AgentMessage, FrameError>>) {
    let mut buf = Vec::new();
    loop {
        let item = match read_payload(&mut recv, &mut buf).await {
            Ok(true) => frame::decode::<AgentMessage>(&buf),
            Ok(false) => return,
            Err(e) => Err(e),
        };
        let stop = item.is_err();
        if tx.send(item).await.is_err() || stop {
            return;
        }
        if buf.capacity() > 64 * 1024 {
            buf = Vec::new();
        }
    }
}

async fn log_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    engine: Arc<Engine>,
    id: i64,
    conn_id: u64,
    offset: i64,
    conn: quinn::Connection,
) {
    let mut buf = Vec::new();
    let result: Result<(), TunnelError> = async {
        while read_payload(&mut recv, &mut buf).await? {
            let batch: LogBatch = frame::decode(&buf)?;
            batch.validate().map_err(|e| TunnelError::Protocol(format!("invalid log batch: {e}")))?;
            match engine.agent_logs(id, conn_id, &batch.lines, offset).await {
                Ok(seq) => write_msg(&mut send, &CoordinatorMessage::Ack { channel: Channel::Logs, seq }).await?,
                Err(e) => return Err(TunnelError::Protocol(format!("storing logs: {e}"))),
            }
            if buf.capacity() > 64 * 1024 {
                buf = Vec::new();
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        if engine.is_shutting_down() {
            debug!(error = %e, "log stream ended at shutdown");
            return;
        }
        warn!(error = %e, "closing agent connection (log stream)");
        conn.close(CLOSE_PROTOCOL.into(), truncate_reason(&e.to_string()));
    }
}
