//! The connection to the coordinator: dial out over QUIC, say hello, fetch the manifest, keep the
//! control and log streams flowing until the connection drops, then dial again with backoff.
//!
//! The tunnel never decides what the agent does: it publishes manifests and shutdown requests on
//! watch channels and carries whatever the [`Outboxes`] hold. It only ends on its own when the
//! coordinator rejects the agent for good (bad token, version mismatch), or when asked to drain.

use crate::clock::WallClock;
use crate::metrics::AgentMetrics;
use crate::outbox::{Outboxes, LOGS_FIRST_GRACE};
use crate::phase::truncate;
use crate::ssh::SshServer;
use crate::stats::Stats;
use quinn::{ConnectionError, RecvStream, SendStream};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tether_shared::backoff::Backoff;
use tether_shared::frame::{self, FrameError};
use tether_shared::proto::{
    AgentMessage, CoordinatorMessage, EventBatch, Hello, HelloReply, InvalidMessage, LogBatch, Manifest, RejectCode,
    PROTOCOL_VERSION,
};
use tether_shared::{io, limits, tls};
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout, Instant};

/// Connection, hello and manifest must each finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a departing agent waits for the coordinator to acknowledge everything.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a departing agent waits for its goodbye to be delivered, then for the close to go out.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// How long a connection must last before the next loss starts the backoff over.
const STABLE_CONNECTION: Duration = BACKOFF_CAP;
/// The longest wait between attempts while the agent is leaving (within the drain deadline).
const DRAIN_RETRY: Duration = Duration::from_millis(500);
/// Caps the coordinator's `Reconnect { within_ms }`.
const MAX_RECONNECT_WITHIN: Duration = Duration::from_secs(600);
/// Bounds the coordinator's heartbeat interval to something sane.
const MIN_HEARTBEAT: Duration = Duration::from_millis(500);
const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);

/// Who this agent is and where it dials.
#[derive(Clone)]
pub struct TunnelConfig {
    /// `HOST:PORT`, resolved at each attempt.
    pub coordinator: String,
    pub client: quinn::ClientConfig,
    pub token: String,
    /// Random per agent process.
    pub instance: u64,
    pub hostname: String,
    /// Serves the SSH streams the coordinator opens; its host key goes in the hello.
    pub ssh: Arc<SshServer>,
    pub metrics: Arc<AgentMetrics>,
    /// Stamps the hello, as it stamps every span and log line.
    pub clock: WallClock,
}

/// A manifest as fetched on one connection, with the timings of the connection that fetched it.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub manifest: Arc<Manifest>,
    /// When the first connection of this process was welcomed.
    pub first_welcome: Instant,
    pub fetch_started: Instant,
    pub fetch_ended: Instant,
}

/// How the tunnel talks to the rest of the agent.
pub struct TunnelLinks {
    /// Every manifest fetched (one per connection).
    pub manifests: watch::Sender<Option<FetchedManifest>>,
    /// Set when the coordinator sends `Shutdown`.
    pub shutdown: watch::Sender<Option<String>>,
    /// Set by the agent once it is ready to leave.
    pub drain: watch::Receiver<Option<DrainRequest>>,
}

/// The agent is leaving: deliver what is unacknowledged until `deadline`, then say goodbye.
#[derive(Debug, Clone)]
pub struct DrainRequest {
    pub reason: String,
    pub deadline: Instant,
}

/// Why the tunnel gave up for good.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("coordinator rejected this agent: {message}")]
    Rejected { code: RejectCode, message: String },
}

/// Why one connection attempt or connection ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("resolving {addr}: {source}")]
    Resolve { addr: String, source: std::io::Error },
    #[error("{0} resolved to no address")]
    NoAddress(String),
    #[error("opening a udp socket: {0}")]
    Bind(std::io::Error),
    #[error("{0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("{}", describe_connection_error(.0))]
    Connection(#[from] ConnectionError),
    #[error("no answer from the coordinator within {secs}s ({0})", secs = HANDSHAKE_TIMEOUT.as_secs())]
    Timeout(&'static str),
    #[error("coordinator closed the {0} stream")]
    StreamClosed(&'static str),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("coordinator turned the agent away ({code:?}): {message}")]
    Refused { code: RejectCode, message: String },
    #[error("coordinator could not store events: {0}")]
    EventsRefused(String),
    #[error("coordinator could not give the manifest: {0}")]
    NoManifest(String),
    #[error("coordinator sent an invalid manifest: {0}")]
    InvalidManifest(InvalidMessage),
    #[error("coordinator asked the agent to reconnect")]
    ReconnectAsked(Duration),
}

/// How a connection that was fully set up ended.
enum SessionEnd {
    /// Said goodbye on the agent's request.
    Drained,
    /// The coordinator asked us to come back later.
    Reconnect(Duration),
    Lost(LinkError),
}

/// A welcomed connection with its two streams.
struct Session {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    streams: Streams,
}

/// The control and log streams of a welcomed connection, and the heartbeat it asked for.
struct Streams {
    control_send: SendStream,
    control_recv: RecvStream,
    log_send: SendStream,
    log_recv: RecvStream,
    heartbeat: Duration,
}

pub struct Tunnel {
    config: TunnelConfig,
    outboxes: Arc<Outboxes>,
    stats: Stats,
    manifests: watch::Sender<Option<FetchedManifest>>,
    shutdown: watch::Sender<Option<String>>,
    first_welcome: Option<Instant>,
}

impl Tunnel {
    pub fn new(config: TunnelConfig, outboxes: Arc<Outboxes>, stats: Stats) -> Self {
        let (manifests, _) = watch::channel(None);
        let (shutdown, _) = watch::channel(None);
        Tunnel { config, outboxes, stats, manifests, shutdown, first_welcome: None }
    }

    /// Connects and reconnects until drained (`Ok`) or rejected for good.
    pub async fn run(mut self, links: TunnelLinks) -> Result<(), TunnelError> {
        let TunnelLinks { manifests, shutdown, mut drain } = links;
        self.manifests = manifests;
        self.shutdown = shutdown;
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        let outboxes = self.outboxes.clone();
        loop {
            // Leaving: reconnect only to deliver what is still unacknowledged, and only until the
            // drain deadline.
            let attempt = tokio::select! {
                r = self.establish() => r,
                _ = drain_gives_up(&mut drain, &outboxes) => return Ok(()),
            };
            let delay = match attempt {
                Ok(session) => {
                    let welcomed = Instant::now();
                    let end = self.serve(session, &mut drain).await;
                    // Only a connection that held shows the coordinator is fine. One cut off soon
                    // after its welcome (another agent with this token, a coordinator that cannot
                    // serve this workspace) keeps the delays growing.
                    if welcomed.elapsed() >= STABLE_CONNECTION {
                        backoff.reset();
                    }
                    match end {
                        SessionEnd::Drained => return Ok(()),
                        SessionEnd::Reconnect(within) => {
                            let delay = within.mul_f64(rand::random::<f64>());
                            tracing::info!(
                                delay_ms = delay.as_millis() as u64,
                                "coordinator asked the agent to reconnect"
                            );
                            delay
                        }
                        SessionEnd::Lost(e) => {
                            next_retry(&mut backoff, &e, &self.config.coordinator, "connection to the coordinator lost")
                        }
                    }
                }
                Err(LinkError::Refused { code, message })
                    if matches!(code, RejectCode::BadToken | RejectCode::VersionMismatch) =>
                {
                    return Err(TunnelError::Rejected { code, message: truncate(message, limits::MAX_TEXT) });
                }
                Err(LinkError::ReconnectAsked(within)) => within.mul_f64(rand::random::<f64>()),
                Err(e) => next_retry(&mut backoff, &e, &self.config.coordinator, "cannot connect to the coordinator"),
            };
            // Leaving: what is still unacknowledged (the stop scripts' spans and logs, the final
            // lifecycle) must go out before the drain deadline, so retry soon and stop waiting out a
            // long delay once the drain is asked for.
            let draining = drain.borrow().is_some();
            let mut asked = drain.clone();
            tokio::select! {
                _ = sleep(if draining { delay.min(DRAIN_RETRY) } else { delay }) => {}
                _ = asked.wait_for(Option::is_some), if !draining => {}
                _ = drain_gives_up(&mut drain, &outboxes) => return Ok(()),
            }
        }
    }

    /// Dials, says hello, fetches the manifest and opens the log stream.
    async fn establish(&mut self) -> Result<Session, LinkError> {
        let addr = resolve(&self.config.coordinator).await?;
        let bind: SocketAddr = match addr {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let endpoint = std::net::UdpSocket::bind(bind)
            .and_then(|udp| {
                quinn::Endpoint::new(quinn::EndpointConfig::default(), None, udp, Arc::new(tether_shared::udp::Runtime))
            })
            .map_err(LinkError::Bind)?;
        let connecting = endpoint.connect_with(self.config.client.clone(), addr, tls::SERVER_NAME)?;
        let conn = timeout(HANDSHAKE_TIMEOUT, connecting).await.map_err(|_| LinkError::Timeout("tls handshake"))??;
        tracing::debug!(addr = %addr, "quic connection established");
        match self.greet(&conn).await {
            Ok(streams) => Ok(Session { endpoint, conn, streams }),
            Err(e @ LinkError::Refused { .. }) => {
                // Say we read the answer, so the coordinator need not wait for us to go.
                conn.close(0u32.into(), b"rejected");
                let _ = timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await;
                Err(e)
            }
            // A stream error usually stands for the connection's own reason, which says more.
            Err(e @ (LinkError::Frame(_) | LinkError::StreamClosed(_) | LinkError::Timeout(_))) => {
                Err(conn.close_reason().map_or(e, LinkError::Connection))
            }
            Err(e) => Err(e),
        }
    }

    /// Hello, welcome, manifest and the log stream on a fresh connection.
    async fn greet(&mut self, conn: &quinn::Connection) -> Result<Streams, LinkError> {
        let (mut control_send, mut control_recv) = conn.open_bi().await?;
        let hello = Hello {
            token: self.config.token.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            instance: self.config.instance,
            // The clock that stamps spans and log lines, so that the coordinator's correction fits them.
            sent_at_ms: self.config.clock.now_ms(),
            hostname: self.config.hostname.clone(),
            ssh_host_key: Some(self.config.ssh.host_public_key().to_string()),
        };
        let bytes = frame::encode_versioned(PROTOCOL_VERSION, &hello)?;
        tokio::io::AsyncWriteExt::write_all(&mut control_send, &bytes).await.map_err(FrameError::Io)?;
        let mut buf = Vec::new();
        let got = timeout(HANDSHAKE_TIMEOUT, io::read_payload(&mut control_recv, &mut buf))
            .await
            .map_err(|_| LinkError::Timeout("hello"))??;
        if !got {
            return Err(LinkError::StreamClosed("control"));
        }
        let welcome = match frame::decode::<HelloReply>(&buf)? {
            HelloReply::Rejected { code, message } => {
                return Err(LinkError::Refused { code, message: truncate(message, limits::MAX_TEXT) })
            }
            HelloReply::Welcome(w) => w,
        };
        self.config.ssh.set_host_certificate(welcome.ssh_host_certificate.as_deref());
        let now = Instant::now();
        let first_welcome = *self.first_welcome.get_or_insert(now);
        self.outboxes.welcome(welcome.events_acked, welcome.logs_acked);
        tracing::info!(
            workspace = %truncate(welcome.workspace.clone(), limits::MAX_NAME),
            build = welcome.build,
            coordinator_version = %truncate(welcome.coordinator_version.clone(), limits::MAX_NAME),
            "connected to the coordinator"
        );

        let fetch_started = Instant::now();
        io::write_msg(&mut control_send, &AgentMessage::FetchManifest).await?;
        let manifest = timeout(HANDSHAKE_TIMEOUT, async {
            loop {
                let msg = io::read_msg::<CoordinatorMessage, _>(&mut control_recv, &mut buf)
                    .await?
                    .ok_or(LinkError::StreamClosed("control"))?;
                match msg {
                    CoordinatorMessage::Manifest(m) => return Ok(m),
                    CoordinatorMessage::Reconnect { within_ms } => {
                        return Err(LinkError::ReconnectAsked(reconnect_window(within_ms)))
                    }
                    // The coordinator could not build the manifest: waiting longer will not help.
                    CoordinatorMessage::Error { message } => {
                        return Err(LinkError::NoManifest(truncate(message, limits::MAX_TEXT)))
                    }
                    other => handle_message(other, &self.outboxes, &self.shutdown),
                }
            }
        })
        .await
        .map_err(|_| LinkError::Timeout("manifest"))??;
        manifest.validate().map_err(LinkError::InvalidManifest)?;
        let fetch_ended = Instant::now();
        tracing::info!(build = manifest.build, scripts = manifest.scripts.len(), "manifest fetched");

        // The peer learns of this stream with its first batch; nothing is sent just to announce it.
        let (log_send, log_recv) = conn.open_bi().await?;

        self.manifests.send_replace(Some(FetchedManifest {
            manifest: Arc::new(manifest),
            first_welcome,
            fetch_started,
            fetch_ended,
        }));
        let heartbeat = Duration::from_millis(welcome.heartbeat_interval_ms).clamp(MIN_HEARTBEAT, MAX_HEARTBEAT);
        Ok(Streams { control_send, control_recv, log_send, log_recv, heartbeat })
    }

    /// Runs a welcomed connection until it ends.
    async fn serve(&mut self, session: Session, drain: &mut watch::Receiver<Option<DrainRequest>>) -> SessionEnd {
        let Session { endpoint, conn, streams } = session;
        let Streams { mut control_send, mut control_recv, mut log_send, mut log_recv, heartbeat } = streams;
        // Brokered SSH streams live and die with this connection.
        let _brokered = self.config.ssh.accept_brokered(conn.clone());
        let metrics = self.config.metrics.clone();
        metrics.tunnel_up();
        let end = {
            let outboxes = &*self.outboxes;
            let shutdown = &self.shutdown;
            let manifests = &self.manifests;
            let first_welcome = self.first_welcome.unwrap_or_else(Instant::now);
            tokio::select! {
                r = control_writer(&mut control_send, outboxes, &mut self.stats, heartbeat, drain, &metrics) => match r {
                    Ok(()) => SessionEnd::Drained,
                    Err(e) => SessionEnd::Lost(e),
                },
                r = reader(&mut control_recv, "control", outboxes, shutdown, manifests, first_welcome) => r,
                r = log_writer(&mut log_send, outboxes, self.config.clock) => SessionEnd::Lost(r),
                r = reader(&mut log_recv, "log", outboxes, shutdown, manifests, first_welcome) => r,
                e = conn.closed() => SessionEnd::Lost(LinkError::Connection(e)),
            }
        };
        metrics.tunnel_down();
        match end {
            SessionEnd::Drained => {
                let _ = log_send.finish();
                // Give the goodbye a moment to be delivered before the close discards anything unsent.
                let _ = timeout(CLOSE_TIMEOUT, async {
                    tokio::select! {
                        _ = control_send.stopped() => {}
                        _ = conn.closed() => {}
                    }
                })
                .await;
                conn.close(0u32.into(), b"agent exiting");
                if timeout(CLOSE_TIMEOUT, endpoint.wait_idle()).await.is_err() {
                    tracing::debug!("the coordinator did not confirm the close in time");
                }
                tracing::info!("disconnected from the coordinator");
                SessionEnd::Drained
            }
            SessionEnd::Reconnect(within) => {
                conn.close(0u32.into(), b"reconnecting");
                SessionEnd::Reconnect(within)
            }
            SessionEnd::Lost(e) => {
                // A stream error usually stands for the connection's own reason, which says more.
                let e = match conn.close_reason() {
                    Some(reason) => LinkError::Connection(reason),
                    None => e,
                };
                conn.close(1u32.into(), b"agent connection error");
                SessionEnd::Lost(e)
            }
        }
    }
}

/// Heartbeats and event batches on the control stream; on drain, waits for acknowledgements and
/// says goodbye. Returns `Ok` once the goodbye is written.
async fn control_writer(
    send: &mut SendStream,
    outboxes: &Outboxes,
    stats: &mut Stats,
    heartbeat: Duration,
    drain: &mut watch::Receiver<Option<DrainRequest>>,
    metrics: &AgentMetrics,
) -> Result<(), LinkError> {
    let mut beat = tokio::time::interval(heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining: Option<(String, Instant)> = None;
    // When events on this connection started waiting for log lines to be stored.
    let mut held_since: Option<Instant> = None;
    loop {
        if draining.is_none() {
            if let Some(request) = drain.borrow_and_update().clone() {
                draining = Some((request.reason, request.deadline));
            }
        }
        let held = outboxes.events_held();
        let now = Instant::now();
        held_since = held.then(|| held_since.unwrap_or(now));
        let past_barrier = held_since.is_some_and(|t| now >= t + LOGS_FIRST_GRACE) || draining.is_some();
        if let Some(events) = outboxes.next_events(past_barrier) {
            io::write_msg(send, &AgentMessage::Events(EventBatch { events })).await?;
        }
        if let Some((reason, deadline)) = &draining {
            let all_acked = outboxes.all_acked();
            if all_acked || Instant::now() >= *deadline {
                if !all_acked {
                    let (events, logs) = outboxes.pending();
                    tracing::warn!(events, logs, "leaving before the coordinator acknowledged everything");
                }
                let reason = truncate(reason.clone(), limits::MAX_TEXT);
                io::write_msg(send, &AgentMessage::Goodbye { reason }).await?;
                let _ = send.finish();
                return Ok(());
            }
        }
        let drain_deadline = draining.as_ref().map(|(_, d)| *d);
        let barrier_deadline = held_since.map(|t| t + LOGS_FIRST_GRACE);
        tokio::select! {
            _ = until(barrier_deadline), if barrier_deadline.is_some_and(|d| d > now) => {}
            _ = beat.tick() => {
                let hb = stats.sample(tether_shared::now_ms());
                io::write_msg(send, &AgentMessage::Heartbeat(hb)).await?;
                metrics.heartbeat_sent();
            }
            _ = outboxes.events_ready.notified() => {}
            _ = outboxes.acked.notified(), if draining.is_some() => {}
            _ = until(drain_deadline), if draining.is_some() => {}
            r = drain.changed(), if draining.is_none() => {
                if r.is_err() {
                    // The agent is gone without asking for a drain: leave anyway.
                    draining = Some(("agent exiting".to_string(), Instant::now()));
                }
            }
        }
    }
}

/// Log batches on the log stream, as lines are produced. Only returns on error.
async fn log_writer(send: &mut SendStream, outboxes: &Outboxes, clock: WallClock) -> LinkError {
    loop {
        match outboxes.next_logs(&clock) {
            Some(lines) => {
                if let Err(e) = io::write_msg(send, &LogBatch { lines }).await {
                    return e.into();
                }
            }
            None => outboxes.logs_ready.notified().await,
        }
    }
}

/// Reads coordinator messages from one stream until it ends or asks for a reconnect.
async fn reader(
    recv: &mut RecvStream,
    name: &'static str,
    outboxes: &Outboxes,
    shutdown: &watch::Sender<Option<String>>,
    manifests: &watch::Sender<Option<FetchedManifest>>,
    first_welcome: Instant,
) -> SessionEnd {
    let mut buf = Vec::new();
    loop {
        let msg = match io::read_msg::<CoordinatorMessage, _>(recv, &mut buf).await {
            Ok(Some(msg)) => msg,
            Ok(None) => return SessionEnd::Lost(LinkError::StreamClosed(name)),
            Err(e) => return SessionEnd::Lost(e.into()),
        };
        match msg {
            CoordinatorMessage::Reconnect { within_ms } => return SessionEnd::Reconnect(reconnect_window(within_ms)),
            CoordinatorMessage::Error { message } if outboxes.events_in_flight() => {
                // Most likely the answer to the event batch in flight: it was not stored. Start over
                // on a new connection, whose welcome says exactly what was.
                return SessionEnd::Lost(LinkError::EventsRefused(truncate(message, limits::MAX_TEXT)));
            }
            CoordinatorMessage::Manifest(m) => {
                // Not expected after the fetch, but a pushed manifest is still the newest word.
                if let Err(e) = m.validate() {
                    return SessionEnd::Lost(LinkError::InvalidManifest(e));
                }
                let now = Instant::now();
                tracing::info!(build = m.build, "coordinator sent a new manifest");
                manifests.send_replace(Some(FetchedManifest {
                    manifest: Arc::new(m),
                    first_welcome,
                    fetch_started: now,
                    fetch_ended: now,
                }));
            }
            other => handle_message(other, outboxes, shutdown),
        }
    }
}

/// Acknowledgements, shutdown requests and errors: the messages handled the same way everywhere.
fn handle_message(msg: CoordinatorMessage, outboxes: &Outboxes, shutdown: &watch::Sender<Option<String>>) {
    match msg {
        CoordinatorMessage::Ack { channel, seq } => outboxes.ack(channel, seq),
        CoordinatorMessage::Shutdown { reason } => {
            let reason = truncate(reason, limits::MAX_TEXT);
            tracing::info!(reason = %reason, "coordinator asked the agent to shut down");
            shutdown.send_if_modified(|current| {
                if current.is_none() {
                    *current = Some(reason);
                    true
                } else {
                    false
                }
            });
        }
        CoordinatorMessage::Error { message } => {
            tracing::warn!(message = %truncate(message, limits::MAX_TEXT), "coordinator reported an error");
        }
        CoordinatorMessage::Manifest(m) => tracing::debug!(build = m.build, "ignored a manifest"),
        CoordinatorMessage::Reconnect { .. } => tracing::debug!("ignored a reconnect request"),
    }
}

fn reconnect_window(within_ms: u64) -> Duration {
    Duration::from_millis(within_ms).min(MAX_RECONNECT_WITHIN)
}

async fn resolve(addr: &str) -> Result<SocketAddr, LinkError> {
    let mut addrs =
        tokio::net::lookup_host(addr).await.map_err(|source| LinkError::Resolve { addr: addr.to_string(), source })?;
    addrs.next().ok_or_else(|| LinkError::NoAddress(addr.to_string()))
}

/// The delay before the next attempt, logged with its ceiling (which shows how far the backoff has
/// grown).
fn next_retry(backoff: &mut Backoff, error: &LinkError, coordinator: &str, what: &str) -> Duration {
    let ceiling = backoff.ceiling();
    let delay = backoff.next_delay(rand::random::<f64>());
    tracing::warn!(
        coordinator,
        error = %error,
        retry_ms = delay.as_millis() as u64,
        retry_ceiling_ms = ceiling.as_millis() as u64,
        "{what}"
    );
    delay
}

/// Completes when the agent is leaving and there is nothing left to deliver, or no time left to.
async fn drain_gives_up(drain: &mut watch::Receiver<Option<DrainRequest>>, outboxes: &Outboxes) {
    let request = match drain.wait_for(Option::is_some).await {
        Ok(request) => request.clone(),
        // The agent is gone: stop too.
        Err(_) => return,
    };
    if let Some(request) = request {
        if !outboxes.all_acked() {
            sleep_until(request.deadline).await;
        }
    }
}

async fn until(t: Option<Instant>) {
    match t {
        Some(t) => sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Words for a connection error, with TLS failures spelled out.
fn describe_connection_error(e: &ConnectionError) -> String {
    let is_tls = |code: u64| (0x100..0x200).contains(&code);
    match e {
        ConnectionError::TransportError(t) if is_tls(t.code.into()) => format!(
            "tls handshake with the coordinator failed: {} (check that --ca / --ca-sha256 names the coordinator's CA)",
            if t.reason.is_empty() { t.code.to_string() } else { t.reason.clone() }
        ),
        ConnectionError::ConnectionClosed(c) if is_tls(c.error_code.into()) => {
            format!("the coordinator refused the tls handshake: {c}")
        }
        ConnectionError::ApplicationClosed(c) => format!(
            "the coordinator closed the connection (code {}): {}",
            c.error_code,
            truncate(String::from_utf8_lossy(&c.reason).into_owned(), limits::MAX_TEXT)
        ),
        ConnectionError::TimedOut => format!(
            "no answer from the coordinator for {}s (is it running, and does UDP reach it?)",
            tether_shared::tls::IDLE_TIMEOUT.as_secs()
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_are_spelled_out() {
        let mut e = ConnectionError::TransportError(quinn::TransportErrorCode::crypto(42).into());
        if let ConnectionError::TransportError(t) = &mut e {
            t.reason = "invalid peer certificate: UnknownIssuer".into();
        }
        assert_eq!(
            describe_connection_error(&e),
            "tls handshake with the coordinator failed: invalid peer certificate: UnknownIssuer \
             (check that --ca / --ca-sha256 names the coordinator's CA)"
        );
        assert_eq!(
            describe_connection_error(&ConnectionError::TimedOut),
            "no answer from the coordinator for 10s (is it running, and does UDP reach it?)"
        );
    }

    #[test]
    fn reconnect_window_is_capped() {
        assert_eq!(reconnect_window(1500), Duration::from_millis(1500));
        assert_eq!(reconnect_window(u64::MAX), MAX_RECONNECT_WITHIN);
    }
}
