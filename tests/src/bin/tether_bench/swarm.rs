//! Simulated agents: real QUIC connections that say on the wire exactly what `tether-agent` says
//! (hello, manifest fetch, log stream, lifecycle events, heartbeats) without running anything.
//!
//! Each simulated agent is one task plus, while connected, one reader task for the control stream, so
//! a frame is never cancelled half-read. Connections share a few client endpoints, and a semaphore
//! bounds how many are between dialling and being fully set up. Lost connections are dialled again
//! with the agent's own backoff and the same `instance`, like an agent process that kept running.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_shared::backoff::Backoff;
use tether_shared::frame::{self, FrameError};
use tether_shared::proto::{
    AgentMessage, Channel, CoordinatorMessage, Event, EventBatch, EventKind, Heartbeat, Hello, HelloReply, LogBatch,
    RejectCode, PROTOCOL_VERSION,
};
use tether_shared::{io, limits, now_ms, tls, Lifecycle};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;

/// The agent's own settings (agent/src/tunnel.rs), so the simulation behaves as agents do.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
const MAX_RECONNECT_WITHIN: Duration = Duration::from_secs(600);
const MIN_HEARTBEAT: Duration = Duration::from_millis(500);
const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);
/// Distinct failure reasons kept for the report; the rest are counted as "other".
const MAX_REASONS: usize = 24;

pub struct SwarmConfig {
    /// The coordinator's QUIC address.
    pub coordinator: SocketAddr,
    pub client: quinn::ClientConfig,
    /// Connections per client endpoint (UDP socket).
    pub per_endpoint: usize,
    /// Connections allowed between dialling and fully set up at once.
    pub handshakes: usize,
    /// Heartbeat interval to use instead of the one in the welcome.
    pub heartbeat: Option<Duration>,
    /// Receive buffer to ask for on each client UDP socket (the kernel caps it at
    /// net.core.rmem_max); `None` keeps the system default.
    pub recv_buffer: Option<usize>,
    /// When the coordinator answers the lifecycle events with an error, drop the connection and
    /// dial again. The agent instead stays connected and resends them only on its next connection.
    pub reconnect_on_events_error: bool,
}

/// Counters every simulated agent updates; read by the benchmark while it runs.
#[derive(Default)]
struct Counters {
    /// High 32 bits: the generation (bumped at each coordinator restart); low 32 bits: agents
    /// welcomed on a connection attempt that began in that generation. One word, so a welcome can
    /// never be counted against the wrong generation.
    generation: AtomicU64,
    connected: AtomicUsize,
    welcomes: AtomicU64,
    attempts: AtomicU64,
    failed_attempts: AtomicU64,
    lost: AtomicU64,
    reconnect_asked: AtomicU64,
    coordinator_errors: AtomicU64,
    heartbeats: AtomicU64,
    gave_up: AtomicUsize,
    /// Connected agents whose lifecycle events the coordinator refused on this connection.
    events_refused_now: AtomicUsize,
    events_refused: AtomicU64,
    setup_count: AtomicU64,
    setup_us_sum: AtomicU64,
    setup_us_max: AtomicU64,
    reasons: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    fn generation(&self) -> u32 {
        (self.generation.load(Ordering::Acquire) >> 32) as u32
    }

    /// Counts a welcome once per agent and generation, and only if the attempt began in the
    /// current generation (so it cannot have been answered by the coordinator before a restart).
    fn welcomed(&self, attempt_generation: u32, counted: &mut Option<u32>) {
        self.welcomes.fetch_add(1, Ordering::Relaxed);
        if *counted == Some(attempt_generation) {
            return;
        }
        let mut v = self.generation.load(Ordering::Acquire);
        loop {
            if (v >> 32) as u32 != attempt_generation {
                return;
            }
            match self.generation.compare_exchange_weak(v, v + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    *counted = Some(attempt_generation);
                    return;
                }
                Err(now) => v = now,
            }
        }
    }

    fn reason(&self, what: &str) {
        let mut r = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
        let key: String = what.chars().take(160).collect();
        if r.len() < MAX_REASONS || r.contains_key(&key) {
            *r.entry(key).or_default() += 1;
        } else {
            *r.entry("other".into()).or_default() += 1;
        }
    }
}

/// The counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Distinct agents welcomed in the current generation.
    pub welcomed: usize,
    /// Agents with a set-up connection now.
    pub connected: usize,
    pub welcomes: u64,
    pub attempts: u64,
    pub failed_attempts: u64,
    pub lost: u64,
    pub reconnect_asked: u64,
    pub coordinator_errors: u64,
    pub heartbeats: u64,
    pub gave_up: usize,
    /// Connected agents whose lifecycle events were answered with an error on this connection:
    /// like the agent, they resend them only on their next connection.
    pub events_refused_now: usize,
    /// Event batches answered with an error, in all.
    pub events_refused: u64,
    /// Connection set-ups finished (dial to events acknowledged), their mean and longest time.
    pub setups: u64,
    pub setup_mean_ms: f64,
    pub setup_max_ms: f64,
    pub reasons: BTreeMap<String, u64>,
}

impl Snapshot {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "welcomes": self.welcomes,
            "attempts": self.attempts,
            "failed_attempts": self.failed_attempts,
            "connections_lost": self.lost,
            "reconnect_requests": self.reconnect_asked,
            "coordinator_error_messages": self.coordinator_errors,
            "heartbeats_sent": self.heartbeats,
            "agents_gave_up": self.gave_up,
            "connected_with_events_refused": self.events_refused_now,
            "event_batches_refused": self.events_refused,
            "setups": self.setups,
            "setup_mean_ms": round(self.setup_mean_ms, 2),
            "setup_max_ms": round(self.setup_max_ms, 2),
            "failure_reasons": self.reasons,
        })
    }
}

pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

struct Shared {
    coordinator: SocketAddr,
    client: quinn::ClientConfig,
    handshakes: Semaphore,
    heartbeat: Option<Duration>,
    reconnect_on_events_error: bool,
    counters: Counters,
}

pub struct Swarm {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    endpoints: Vec<quinn::Endpoint>,
    /// The receive buffer each client socket got, as the kernel reports it.
    pub recv_buffer: usize,
}

impl Swarm {
    /// Starts one simulated agent per token; they all begin dialling at once, limited by the
    /// handshake semaphore.
    pub fn launch(config: SwarmConfig, tokens: Vec<String>) -> anyhow::Result<Swarm> {
        let shared = Arc::new(Shared {
            coordinator: config.coordinator,
            client: config.client,
            handshakes: Semaphore::new(config.handshakes.max(1)),
            heartbeat: config.heartbeat,
            reconnect_on_events_error: config.reconnect_on_events_error,
            counters: Counters::default(),
        });
        let per = config.per_endpoint.max(1);
        let mut endpoints = Vec::new();
        let mut recv_buffer = 0;
        for _ in 0..tokens.len().div_ceil(per) {
            let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
            let state = quinn::udp::UdpSocketState::new((&socket).into())?;
            if let Some(bytes) = config.recv_buffer {
                state.set_recv_buffer_size((&socket).into(), bytes)?;
            }
            recv_buffer = state.recv_buffer_size((&socket).into())?;
            let runtime = Arc::new(quinn::TokioRuntime);
            endpoints.push(quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)?);
        }
        let mut tasks = JoinSet::new();
        for (i, token) in tokens.into_iter().enumerate() {
            let agent = SimAgent {
                index: i as u32,
                token,
                instance: rand::random(),
                endpoint: endpoints[i / per].clone(),
                started: Instant::now(),
            };
            tasks.spawn(agent.run(shared.clone()));
        }
        Ok(Swarm { shared, tasks, endpoints, recv_buffer })
    }

    pub fn endpoints(&self) -> usize {
        self.endpoints.len()
    }

    /// The client UDP sockets' local ports.
    pub fn local_ports(&self) -> Vec<u16> {
        self.endpoints.iter().filter_map(|e| e.local_addr().ok()).map(|a| a.port()).collect()
    }

    pub fn snapshot(&self) -> Snapshot {
        let c = &self.shared.counters;
        let g = c.generation.load(Ordering::Acquire);
        let setups = c.setup_count.load(Ordering::Relaxed);
        let sum = c.setup_us_sum.load(Ordering::Relaxed);
        Snapshot {
            welcomed: (g & 0xffff_ffff) as usize,
            connected: c.connected.load(Ordering::Relaxed),
            welcomes: c.welcomes.load(Ordering::Relaxed),
            attempts: c.attempts.load(Ordering::Relaxed),
            failed_attempts: c.failed_attempts.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            reconnect_asked: c.reconnect_asked.load(Ordering::Relaxed),
            coordinator_errors: c.coordinator_errors.load(Ordering::Relaxed),
            heartbeats: c.heartbeats.load(Ordering::Relaxed),
            gave_up: c.gave_up.load(Ordering::Relaxed),
            events_refused_now: c.events_refused_now.load(Ordering::Relaxed),
            events_refused: c.events_refused.load(Ordering::Relaxed),
            setups,
            setup_mean_ms: if setups == 0 { 0.0 } else { sum as f64 / setups as f64 / 1000.0 },
            setup_max_ms: c.setup_us_max.load(Ordering::Relaxed) as f64 / 1000.0,
            reasons: c.reasons.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    /// Starts counting welcomes afresh, for a new coordinator process. Call it after the old one
    /// is dead and before the new one is spawned.
    pub fn next_generation(&self) {
        let c = &self.shared.counters;
        let g = c.generation.load(Ordering::Acquire) >> 32;
        c.generation.store((g + 1) << 32, Ordering::Release);
    }

    /// Stops every simulated agent and closes the endpoints.
    pub async fn shutdown(mut self) {
        self.tasks.shutdown().await;
        for e in &self.endpoints {
            e.close(0u32.into(), b"benchmark finished");
        }
        for e in &self.endpoints {
            let _ = timeout(Duration::from_secs(2), e.wait_idle()).await;
        }
    }
}

/// Why one attempt to set up a connection failed.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("dial: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("no answer within {secs}s ({0})", secs = HANDSHAKE_TIMEOUT.as_secs())]
    Timeout(&'static str),
    #[error("coordinator closed the {0} stream")]
    StreamClosed(&'static str),
    #[error("coordinator refused the hello ({code:?})")]
    Refused { code: RejectCode, message: String },
    #[error("coordinator asked the agent to reconnect")]
    ReconnectAsked(Duration),
    #[error("coordinator answered with an error: {0}")]
    Coordinator(String),
}

/// How a set-up connection ended.
enum SessionEnd {
    Reconnect(Duration),
    Lost(String),
}

/// A welcomed connection with its streams.
struct Session {
    conn: quinn::Connection,
    control_send: quinn::SendStream,
    control_recv: quinn::RecvStream,
    /// Held open for the life of the connection, as the agent does.
    _log: (quinn::SendStream, quinn::RecvStream),
    heartbeat: Duration,
    /// The coordinator answered the lifecycle events with an error on this connection.
    events_refused: bool,
}

struct SimAgent {
    index: u32,
    token: String,
    /// Random per simulated agent, kept across reconnects: an agent that did not restart.
    instance: u64,
    endpoint: quinn::Endpoint,
    started: Instant,
}

/// What a simulated agent keeps between connections.
struct AgentState {
    /// Generation in which this agent's welcome was last counted.
    counted: Option<u32>,
    /// Reused for every frame this agent writes.
    wbuf: Vec<u8>,
    /// When its lifecycle events happened (first connection).
    events_at_ms: Option<i64>,
}

impl SimAgent {
    async fn run(self, shared: Arc<Shared>) {
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        let mut st = AgentState { counted: None, wbuf: Vec::with_capacity(128), events_at_ms: None };
        let c = &shared.counters;
        loop {
            let generation = c.generation();
            let attempt = {
                // Closed never: the semaphore lives as long as `shared`.
                let Ok(_permit) = shared.handshakes.acquire().await else { return };
                c.attempts.fetch_add(1, Ordering::Relaxed);
                let began = Instant::now();
                let r = self.establish(&shared, &mut st, &mut backoff, generation).await;
                if r.is_ok() {
                    let us = began.elapsed().as_micros() as u64;
                    c.setup_count.fetch_add(1, Ordering::Relaxed);
                    c.setup_us_sum.fetch_add(us, Ordering::Relaxed);
                    c.setup_us_max.fetch_max(us, Ordering::Relaxed);
                }
                r
            };
            let delay = match attempt {
                Ok(session) => {
                    let refused = session.events_refused;
                    c.connected.fetch_add(1, Ordering::Relaxed);
                    if refused {
                        c.events_refused_now.fetch_add(1, Ordering::Relaxed);
                    }
                    let end = self.serve(&shared, session, &mut st).await;
                    c.connected.fetch_sub(1, Ordering::Relaxed);
                    if refused {
                        c.events_refused_now.fetch_sub(1, Ordering::Relaxed);
                    }
                    match end {
                        SessionEnd::Reconnect(within) => {
                            c.reconnect_asked.fetch_add(1, Ordering::Relaxed);
                            within.mul_f64(rand::random::<f64>())
                        }
                        SessionEnd::Lost(reason) => {
                            c.lost.fetch_add(1, Ordering::Relaxed);
                            c.reason(&format!("connection lost: {reason}"));
                            backoff.next_delay(rand::random::<f64>())
                        }
                    }
                }
                Err(SetupError::Refused { code, message })
                    if matches!(code, RejectCode::BadToken | RejectCode::VersionMismatch) =>
                {
                    // The agent exits on these; so does its simulation.
                    c.gave_up.fetch_add(1, Ordering::Relaxed);
                    c.reason(&format!("rejected for good ({code:?}): {message}"));
                    return;
                }
                Err(SetupError::ReconnectAsked(within)) => {
                    c.reconnect_asked.fetch_add(1, Ordering::Relaxed);
                    within.mul_f64(rand::random::<f64>())
                }
                Err(e) => {
                    c.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    let text = match &e {
                        SetupError::Refused { code, message } => format!("refused ({code:?}): {message}"),
                        other => format!("set-up failed: {other}"),
                    };
                    c.reason(&text);
                    backoff.next_delay(rand::random::<f64>())
                }
            };
            tokio::time::sleep(delay).await;
        }
    }

    /// Dials, says hello, fetches the manifest, opens the log stream and reports the lifecycle,
    /// in the agent's order.
    async fn establish(
        &self,
        shared: &Shared,
        st: &mut AgentState,
        backoff: &mut Backoff,
        generation: u32,
    ) -> Result<Session, SetupError> {
        let connecting = self.endpoint.connect_with(shared.client.clone(), shared.coordinator, tls::SERVER_NAME)?;
        let conn = timeout(HANDSHAKE_TIMEOUT, connecting).await.map_err(|_| SetupError::Timeout("tls handshake"))??;
        let (mut control_send, mut control_recv) = conn.open_bi().await?;
        let hello = Hello {
            token: self.token.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            instance: self.instance,
            sent_at_ms: now_ms(),
            hostname: format!("sim-{:05}", self.index),
            ssh_host_key: None,
        };
        control_send.write_all(&frame::encode_versioned(PROTOCOL_VERSION, &hello)?).await?;
        let mut rbuf = Vec::new();
        let got = timeout(HANDSHAKE_TIMEOUT, io::read_payload(&mut control_recv, &mut rbuf))
            .await
            .map_err(|_| SetupError::Timeout("hello"))??;
        if !got {
            return Err(SetupError::StreamClosed("control"));
        }
        let welcome = match frame::decode::<HelloReply>(&rbuf)? {
            HelloReply::Rejected { code, message } => {
                let message = message.chars().take(limits::MAX_TEXT).collect();
                return Err(SetupError::Refused { code, message });
            }
            HelloReply::Welcome(w) => w,
        };
        backoff.reset();
        shared.counters.welcomed(generation, &mut st.counted);

        write(&mut control_send, &mut st.wbuf, &AgentMessage::FetchManifest).await?;
        let manifest = timeout(HANDSHAKE_TIMEOUT, async {
            loop {
                match read(&mut control_recv, &mut rbuf, "control").await? {
                    CoordinatorMessage::Manifest(m) => return Ok(m),
                    CoordinatorMessage::Reconnect { within_ms } => {
                        return Err(SetupError::ReconnectAsked(reconnect_window(within_ms)))
                    }
                    // The agent logs it and keeps waiting for the manifest.
                    CoordinatorMessage::Error { message } => {
                        shared.counters.coordinator_errors.fetch_add(1, Ordering::Relaxed);
                        shared.counters.reason(&format!("error instead of the manifest: {message}"));
                    }
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| SetupError::Timeout("manifest"))??;
        if manifest.validate().is_err() {
            return Err(SetupError::Coordinator("invalid manifest".into()));
        }

        let (mut log_send, mut log_recv) = conn.open_bi().await?;
        write(&mut log_send, &mut st.wbuf, &LogBatch { lines: Vec::new() }).await?;

        // created, starting, ready: what an agent with no start scripts reports, minus what the
        // coordinator already holds for this instance.
        let at_ms = *st.events_at_ms.get_or_insert_with(now_ms);
        let events: Vec<Event> = [Lifecycle::Created, Lifecycle::Starting, Lifecycle::Ready]
            .into_iter()
            .zip(1u64..)
            .filter(|(_, seq)| *seq > welcome.events_acked)
            .map(|(state, seq)| Event {
                seq,
                build: welcome.build,
                kind: EventKind::Lifecycle { state, at_ms, detail: None },
            })
            .collect();
        let mut events_refused = false;
        if let Some(last) = events.last().map(|e| e.seq) {
            write(&mut control_send, &mut st.wbuf, &AgentMessage::Events(EventBatch { events })).await?;
            let answer = timeout(HANDSHAKE_TIMEOUT, async {
                loop {
                    match read(&mut control_recv, &mut rbuf, "control").await? {
                        CoordinatorMessage::Ack { channel: Channel::Events, seq } if seq >= last => return Ok(None),
                        CoordinatorMessage::Reconnect { within_ms } => {
                            return Err(SetupError::ReconnectAsked(reconnect_window(within_ms)))
                        }
                        CoordinatorMessage::Error { message } => return Ok(Some(message)),
                        _ => {}
                    }
                }
            })
            .await
            .map_err(|_| SetupError::Timeout("events ack"))??;
            if let Some(message) = answer {
                let c = &shared.counters;
                c.events_refused.fetch_add(1, Ordering::Relaxed);
                c.coordinator_errors.fetch_add(1, Ordering::Relaxed);
                if shared.reconnect_on_events_error {
                    return Err(SetupError::Coordinator(format!("lifecycle events refused: {message}")));
                }
                // The agent logs the error and carries on; its events stay unacknowledged until
                // they are resent on its next connection.
                c.reason(&format!("lifecycle events refused, agent stays connected: {message}"));
                events_refused = true;
            }
        }
        // The coordinator acknowledges the empty log batch; nothing else comes on that stream.
        match timeout(HANDSHAKE_TIMEOUT, read(&mut log_recv, &mut rbuf, "log")).await {
            Err(_) => return Err(SetupError::Timeout("log ack")),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(CoordinatorMessage::Ack { channel: Channel::Logs, .. })) => {}
            Ok(Ok(other)) => return Err(SetupError::Coordinator(format!("unexpected on the log stream: {other:?}"))),
        }

        let heartbeat = shared.heartbeat.unwrap_or_else(|| {
            Duration::from_millis(welcome.heartbeat_interval_ms).clamp(MIN_HEARTBEAT, MAX_HEARTBEAT)
        });
        Ok(Session { conn, control_send, control_recv, _log: (log_send, log_recv), heartbeat, events_refused })
    }

    /// Heartbeats until the connection ends; a separate task reads what the coordinator sends.
    async fn serve(&self, shared: &Arc<Shared>, session: Session, st: &mut AgentState) -> SessionEnd {
        let Session { conn, mut control_send, control_recv, _log, heartbeat, .. } = session;
        let mut reader = tokio::spawn(read_control(control_recv, shared.clone()));
        let mut beat = tokio::time::interval(heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            tokio::select! {
                r = &mut reader => break r.unwrap_or_else(|e| SessionEnd::Lost(format!("reader task: {e}"))),
                e = conn.closed() => break SessionEnd::Lost(e.to_string()),
                _ = beat.tick() => {
                    let hb = AgentMessage::Heartbeat(self.stats());
                    if let Err(e) = write(&mut control_send, &mut st.wbuf, &hb).await {
                        break SessionEnd::Lost(format!("heartbeat: {e}"));
                    }
                    shared.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        reader.abort();
        let end = match (end, conn.close_reason()) {
            // A stream error usually stands for the connection's own reason, which says more.
            (SessionEnd::Lost(_), Some(reason)) => SessionEnd::Lost(reason.to_string()),
            (end, _) => end,
        };
        match &end {
            SessionEnd::Reconnect(_) => conn.close(0u32.into(), b"reconnecting"),
            SessionEnd::Lost(_) => conn.close(1u32.into(), b"agent connection error"),
        }
        end
    }

    /// Plausible, constant stats: a small idle machine.
    fn stats(&self) -> Heartbeat {
        const GIB: u64 = 1024 * 1024 * 1024;
        Heartbeat {
            sent_at_ms: now_ms(),
            cpu_percent: 2.5,
            cpu_limit: 2.0,
            mem_used: GIB / 2,
            mem_total: 4 * GIB,
            disk_used: 12 * GIB,
            disk_total: 50 * GIB,
            load: [0.08, 0.05, 0.01],
            uptime_s: 3600 + self.started.elapsed().as_secs(),
            ssh: Default::default(),
        }
    }
}

/// Reads coordinator messages until the stream ends or a reconnect is asked for.
async fn read_control(mut recv: quinn::RecvStream, shared: Arc<Shared>) -> SessionEnd {
    let mut buf = Vec::new();
    loop {
        match read(&mut recv, &mut buf, "control").await {
            Ok(CoordinatorMessage::Reconnect { within_ms }) => {
                return SessionEnd::Reconnect(reconnect_window(within_ms))
            }
            Ok(CoordinatorMessage::Error { .. }) => {
                shared.counters.coordinator_errors.fetch_add(1, Ordering::Relaxed);
            }
            Ok(CoordinatorMessage::Shutdown { .. }) => {
                shared.counters.reason("coordinator sent shutdown");
            }
            Ok(CoordinatorMessage::Ack { .. } | CoordinatorMessage::Manifest(_)) => {}
            Err(e) => return SessionEnd::Lost(e.to_string()),
        }
    }
}

async fn read(
    recv: &mut quinn::RecvStream,
    buf: &mut Vec<u8>,
    stream: &'static str,
) -> Result<CoordinatorMessage, SetupError> {
    match io::read_msg::<CoordinatorMessage, _>(recv, buf).await? {
        Some(m) => Ok(m),
        None => Err(SetupError::StreamClosed(stream)),
    }
}

/// Encodes one frame into the agent's reused buffer and writes it.
async fn write<T: serde::Serialize>(
    send: &mut quinn::SendStream,
    buf: &mut Vec<u8>,
    msg: &T,
) -> Result<(), SetupError> {
    let mut out = std::mem::take(buf);
    out.clear();
    out.extend_from_slice(&[0; 4]);
    let mut out = postcard::to_extend(msg, out).map_err(FrameError::Encode)?;
    let len = out.len() - 4;
    if len > limits::MAX_FRAME {
        return Err(FrameError::TooLarge { len, max: limits::MAX_FRAME }.into());
    }
    // Fits: MAX_FRAME is far below u32::MAX.
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    let r = send.write_all(&out).await;
    *buf = out;
    Ok(r?)
}

fn reconnect_window(within_ms: u64) -> Duration {
    Duration::from_millis(within_ms).min(MAX_RECONNECT_WITHIN)
}
