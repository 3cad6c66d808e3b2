//! The agent against a fake coordinator in the same process: real QUIC, real TLS, real scripts. The
//! fake speaks the protocol from `tether-shared` by hand, so these tests check the agent's side of
//! every exchange: hello, welcome, manifest, events and acknowledgements, logs, shutdown, goodbye,
//! rejection, reconnection and TLS failures.

use quinn::{RecvStream, SendStream};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tether_agent::clock::WallClock;
use tether_agent::config::{Config, LogFormat};
use tether_agent::Exit;
use tether_shared::proto::*;
use tether_shared::tls::{self, CaPin};
use tether_shared::{frame, io, Lifecycle, SpanStatus};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

const DEADLINE: Duration = Duration::from_secs(30);
const TOKEN: &str = "agent-token-1";

fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

mod common;
use common::pki;

struct FakeCoordinator {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    ca: CertificateDer<'static>,
}

impl FakeCoordinator {
    fn start() -> Self {
        install_provider();
        let pki = pki();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key));
        let config = tls::server_config(pki.chain, key, 16).unwrap();
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        FakeCoordinator { endpoint, addr, ca: pki.ca }
    }

    fn config(&self, data_dir: &Path, ca: CaPin) -> Config {
        Config {
            coordinator: self.addr.to_string(),
            ca,
            token: TOKEN.to_string(),
            data_dir: data_dir.to_path_buf(),
            log_format: LogFormat::Text,
            ssh_listen: None,
            metrics_listen: None,
        }
    }

    fn pin(&self) -> CaPin {
        CaPin::Certificate(self.ca.clone())
    }

    /// Accepts the next connection and reads its hello.
    async fn hello(&self) -> Handshake {
        let incoming = timeout(DEADLINE, self.endpoint.accept()).await.expect("agent connects").unwrap();
        let conn = incoming.await.unwrap();
        let (send, mut recv) = timeout(DEADLINE, conn.accept_bi()).await.unwrap().unwrap();
        let mut buf = Vec::new();
        assert!(io::read_payload(&mut recv, &mut buf).await.unwrap());
        let (version, body) = frame::split_version(&buf).unwrap();
        assert_eq!(version, PROTOCOL_VERSION);
        let hello: Hello = frame::decode(body).unwrap();
        hello.validate().unwrap();
        Handshake { conn, send, recv, hello }
    }
}

struct Handshake {
    conn: quinn::Connection,
    send: SendStream,
    recv: RecvStream,
    hello: Hello,
}

fn welcome(build: u64, events_acked: u64, logs_acked: u64) -> HelloReply {
    HelloReply::Welcome(Welcome {
        workspace: "ws1".into(),
        build,
        events_acked,
        logs_acked,
        heartbeat_interval_ms: 300,
        coordinator_version: "test".into(),
        ssh_host_certificate: None,
    })
}

/// What the fake saw from the agent, in order.
#[derive(Debug)]
enum Seen {
    Events(Vec<Event>),
    Heartbeat(Heartbeat),
    Goodbye(String),
    Logs(Vec<LogLine>),
    ControlEnd,
}

/// A welcomed connection with the manifest sent and both streams read by background tasks.
struct Session {
    conn: quinn::Connection,
    control: SendStream,
    /// Log acknowledgements to write on the log stream (which exists once the first batch came).
    log_acks: mpsc::UnboundedSender<u64>,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl Handshake {
    async fn serve(mut self, reply: HelloReply, manifest: Manifest) -> Session {
        let mut bytes = frame::encode(&reply).unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut self.send, &bytes).await.unwrap();
        let mut buf = Vec::new();
        let msg: AgentMessage = io::read_msg(&mut self.recv, &mut buf).await.unwrap().unwrap();
        assert_eq!(msg, AgentMessage::FetchManifest);
        bytes = frame::encode(&CoordinatorMessage::Manifest(manifest)).unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut self.send, &bytes).await.unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        let mut control_recv = self.recv;
        let control_tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            loop {
                match io::read_msg::<AgentMessage, _>(&mut control_recv, &mut buf).await {
                    Ok(Some(msg)) => {
                        msg.validate().unwrap();
                        let seen = match msg {
                            AgentMessage::Events(b) => Seen::Events(b.events),
                            AgentMessage::Heartbeat(h) => Seen::Heartbeat(h),
                            AgentMessage::Goodbye { reason } => Seen::Goodbye(reason),
                            AgentMessage::FetchManifest => panic!("second manifest fetch"),
                        };
                        let _ = control_tx.send(seen);
                    }
                    _ => {
                        let _ = control_tx.send(Seen::ControlEnd);
                        return;
                    }
                }
            }
        });
        // The log stream shows up with the agent's first log batch, if any.
        let (log_acks, mut acks) = mpsc::unbounded_channel::<u64>();
        let conn = self.conn.clone();
        tokio::spawn(async move {
            let Ok((mut log_send, mut log_recv)) = conn.accept_bi().await else { return };
            let (batches_tx, mut batches) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Ok(Some(batch)) = io::read_msg::<LogBatch, _>(&mut log_recv, &mut buf).await {
                    batch.validate().unwrap();
                    assert!(!batch.lines.is_empty(), "no empty batches");
                    let _ = batches_tx.send(batch.lines);
                }
            });
            loop {
                tokio::select! {
                    lines = batches.recv() => match lines {
                        Some(lines) => { let _ = tx.send(Seen::Logs(lines)); }
                        None => return,
                    },
                    seq = acks.recv() => match seq {
                        Some(seq) => {
                            let ack = CoordinatorMessage::Ack { channel: Channel::Logs, seq };
                            if io::write_msg(&mut log_send, &ack).await.is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                }
            }
        });
        Session { conn: self.conn, control: self.send, log_acks, seen }
    }
}

impl Session {
    async fn send(&mut self, msg: CoordinatorMessage) {
        io::write_msg(&mut self.control, &msg).await.unwrap();
    }

    fn ack_logs(&mut self, seq: u64) {
        let _ = self.log_acks.send(seq);
    }

    /// The coordinator goes away.
    fn close(self) {
        self.conn.close(0u32.into(), b"coordinator going away");
    }

    async fn next(&mut self) -> Seen {
        timeout(DEADLINE, self.seen.recv()).await.expect("the agent said something in time").expect("streams open")
    }
}

/// Everything the agent reported on one or more connections, acknowledged as it comes.
#[derive(Default)]
struct Record {
    events: Vec<Event>,
    logs: Vec<LogLine>,
    heartbeats: usize,
    goodbye: Option<String>,
}

impl Record {
    fn lifecycles(&self) -> Vec<Lifecycle> {
        self.events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::Lifecycle { state, .. } => Some(*state),
                _ => None,
            })
            .collect()
    }

    fn span(&self, stage: &str, name: &str) -> Option<Span> {
        self.events.iter().find_map(|e| match &e.kind {
            EventKind::Span(s) if s.stage == stage && s.name == name => Some(s.clone()),
            _ => None,
        })
    }

    fn detail_of(&self, lifecycle: Lifecycle) -> Option<String> {
        self.events.iter().find_map(|e| match &e.kind {
            EventKind::Lifecycle { state, detail, .. } if *state == lifecycle => detail.clone(),
            _ => None,
        })
    }
}

/// The start phase is over and fully reported (its final lifecycle comes last).
fn started(r: &Record) -> bool {
    r.lifecycles().iter().any(|l| l.start_finished())
}

/// Reads from the session, acknowledging everything, until `done` holds.
async fn pump(s: &mut Session, rec: &mut Record, ack: bool, done: impl Fn(&Record) -> bool) {
    while !done(rec) {
        match s.next().await {
            Seen::Events(events) => {
                let last = events.last().unwrap().seq;
                rec.events.extend(events);
                if ack {
                    s.send(CoordinatorMessage::Ack { channel: Channel::Events, seq: last }).await;
                }
            }
            Seen::Logs(lines) => {
                if let Some(last) = lines.last().map(|l| l.seq) {
                    rec.logs.extend(lines);
                    if ack {
                        s.ack_logs(last);
                    }
                }
            }
            Seen::Heartbeat(h) => {
                assert!(h.mem_total > 0);
                rec.heartbeats += 1;
            }
            Seen::Goodbye(reason) => rec.goodbye = Some(reason),
            Seen::ControlEnd => {
                assert!(done(rec), "control stream ended early");
                return;
            }
        }
    }
}

fn script(name: &str, run: &str, on: ScriptTrigger) -> Script {
    Script { name: name.into(), run: run.into(), on, schedule: None, timeout_ms: 20_000, blocks_login: true }
}

fn manifest(build: u64, dir: &Path, scripts: Vec<Script>) -> Manifest {
    Manifest {
        workspace: "ws1".into(),
        build,
        scripts,
        env: vec![("MARKER".into(), "from-the-manifest".into())],
        working_dir: Some(dir.display().to_string()),
        shutdown_timeout_ms: 10_000,
        ssh: Default::default(),
    }
}

/// Runs the agent in a task; `stop` sends it a signal-style shutdown.
struct RunningAgent {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<Exit, tether_agent::AgentError>>,
}

fn start_agent(config: Config) -> RunningAgent {
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
        "test stop".to_string()
    };
    let task = tokio::spawn(tether_agent::run(config, WallClock::start(), shutdown));
    RunningAgent { stop: Some(stop), task }
}

impl RunningAgent {
    async fn exit(self) -> Exit {
        timeout(DEADLINE, self.task).await.expect("agent exits in time").unwrap().unwrap()
    }

    async fn signal(mut self) -> Exit {
        self.stop();
        self.exit().await
    }

    /// Sends the stop signal without waiting.
    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn read_state(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("state.json")).unwrap()
}

#[tokio::test]
async fn full_life_of_a_build() {
    let coord = FakeCoordinator::start();
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let agent = start_agent(coord.config(data.path(), coord.pin()));

    let hs = coord.hello().await;
    assert_eq!(hs.hello.token, TOKEN);
    assert_eq!(hs.hello.agent_version, env!("CARGO_PKG_VERSION"));
    let m = manifest(
        1,
        work.path(),
        vec![
            script("install-deps", "echo \"hello $MARKER in $TETHER_WORKSPACE\"; echo oops >&2", ScriptTrigger::Start),
            script("flush", "echo bye > flushed", ScriptTrigger::Stop),
            script("nightly", "touch cron-ran", ScriptTrigger::Cron),
        ],
    );
    let mut s = hs.serve(welcome(1, 0, 0), m).await;
    let mut rec = Record::default();
    pump(&mut s, &mut rec, true, |r| started(r) && r.logs.len() >= 2 && r.heartbeats >= 2).await;

    assert_eq!(rec.lifecycles(), vec![Lifecycle::Created, Lifecycle::Starting, Lifecycle::Ready]);
    let seqs: Vec<u64> = rec.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "event sequence starts at 1, no gaps");
    assert!(rec.events.iter().all(|e| e.build == 1));
    let connect = rec.span("agent", "connect").expect("connect span");
    let fetch = rec.span("agent", "manifest").expect("manifest span");
    let run = rec.span("script", "install-deps").expect("script span");
    let ready = rec.span("agent", "ready").expect("ready span");
    assert_eq!((run.exit_code, run.status), (Some(0), SpanStatus::Ok));
    assert_eq!(ready.status, SpanStatus::Ok);
    assert!(connect.started_at_ms <= connect.ended_at_ms && connect.ended_at_ms <= fetch.started_at_ms);
    assert!(fetch.ended_at_ms <= run.started_at_ms && run.ended_at_ms <= ready.ended_at_ms);
    assert_eq!(ready.started_at_ms, connect.started_at_ms, "both measured from agent start");

    let lines: Vec<(&str, LogStream, &str)> =
        rec.logs.iter().map(|l| (l.script.as_str(), l.stream, l.line.as_str())).collect();
    assert!(lines.contains(&("install-deps", LogStream::Stdout, "hello from-the-manifest in ws1")), "{lines:?}");
    assert!(lines.contains(&("install-deps", LogStream::Stderr, "oops")), "{lines:?}");
    assert_eq!(rec.logs[0].seq, 1);
    let local = std::fs::read_to_string(data.path().join("logs/build-1/install-deps.log")).unwrap();
    assert!(local.contains("hello from-the-manifest in ws1\n"), "{local}");
    assert_eq!(read_state(data.path()), "{\"build\":1,\"lifecycle\":\"ready\"}\n");

    // The coordinator stops the workspace: stop scripts, final lifecycle, goodbye, clean exit.
    s.send(CoordinatorMessage::Shutdown { reason: "user stopped the workspace".into() }).await;
    pump(&mut s, &mut rec, true, |r| r.goodbye.is_some()).await;
    assert_eq!(rec.goodbye.as_deref(), Some("user stopped the workspace"));
    assert_eq!(agent.exit().await, Exit::Stopped);
    assert_eq!(rec.lifecycles()[3..], [Lifecycle::ShuttingDown, Lifecycle::Off]);
    let stop = rec.span("stop_script", "flush").expect("stop script span");
    assert_eq!(stop.status, SpanStatus::Ok);
    assert_eq!(std::fs::read_to_string(work.path().join("flushed")).unwrap(), "bye\n");
    assert!(!work.path().join("cron-ran").exists(), "cron scripts are skipped");
    assert_eq!(read_state(data.path()), "{\"build\":1,\"lifecycle\":\"off\",\"start\":\"ready\"}\n");
    let close = timeout(DEADLINE, s.conn.closed()).await.unwrap();
    assert!(matches!(close, quinn::ConnectionError::ApplicationClosed(_)), "{close:?}");
}

#[tokio::test]
async fn bad_token_exits_without_retrying() {
    let coord = FakeCoordinator::start();
    let data = tempfile::tempdir().unwrap();
    let agent = start_agent(coord.config(data.path(), coord.pin()));
    let mut hs = coord.hello().await;
    let reply = HelloReply::Rejected { code: RejectCode::BadToken, message: "unknown agent token".into() };
    io::write_msg(&mut hs.send, &reply).await.unwrap();
    let exit = agent.exit().await;
    assert_eq!(exit, Exit::Rejected { code: RejectCode::BadToken, message: "unknown agent token".into() });
    assert_eq!(exit.code(), 2);
}

#[tokio::test]
async fn busy_is_retried_and_unacked_items_are_resent() {
    let coord = FakeCoordinator::start();
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let agent = start_agent(coord.config(data.path(), coord.pin()));

    // First attempt: turned away for now.
    let mut hs = coord.hello().await;
    let busy = HelloReply::Rejected { code: RejectCode::Busy, message: "try later".into() };
    io::write_msg(&mut hs.send, &busy).await.unwrap();

    // Second attempt: welcomed; acknowledges nothing. Events go one batch at a time, so only the
    // first batch comes; log lines keep flowing.
    let hs = coord.hello().await;
    let first_instance = hs.hello.instance;
    let m = manifest(5, work.path(), vec![script("seed", "echo seeded", ScriptTrigger::Start)]);
    let mut s = hs.serve(welcome(5, 0, 0), m.clone()).await;
    let mut rec = Record::default();
    pump(&mut s, &mut rec, false, |r| !r.events.is_empty() && !r.logs.is_empty()).await;
    assert_eq!(rec.events[0].seq, 1);
    // The coordinator could not store that batch: it says so and keeps the connection.
    s.send(CoordinatorMessage::Error { message: "database is locked".into() }).await;

    // Third connection: the agent left the one where its events were refused. Same agent process,
    // so the same instance; the welcome says 2 events and no logs are stored, and the agent resends
    // everything after that, once.
    let hs = coord.hello().await;
    assert_eq!(hs.hello.instance, first_instance);
    let mut s = hs.serve(welcome(5, 2, 0), m).await;
    let mut again = Record::default();
    pump(&mut s, &mut again, true, |r| started(r) && !r.logs.is_empty()).await;
    let resent: Vec<u64> = again.events.iter().map(|e| e.seq).collect();
    assert_eq!(resent, (3..3 + resent.len() as u64).collect::<Vec<_>>(), "from 3, each once, in order");
    assert_eq!(again.lifecycles(), vec![Lifecycle::Created, Lifecycle::Starting, Lifecycle::Ready]);
    assert!(again.span("script", "seed").is_some());
    assert!(again.span("agent", "connect").is_none(), "stored already: not resent");
    assert_eq!(again.logs[0].seq, 1);
    assert_eq!(again.logs[0].line, "seeded");
    let total = resent.last().copied().unwrap();

    // Same build on reconnect: the start scripts do not run again; the only new events are the
    // shutdown's.
    s.send(CoordinatorMessage::Shutdown { reason: "done".into() }).await;
    pump(&mut s, &mut again, true, |r| r.goodbye.is_some()).await;
    assert_eq!(agent.exit().await, Exit::Stopped);
    let new: Vec<&EventKind> = again.events.iter().filter(|e| e.seq > total).map(|e| &e.kind).collect();
    assert!(
        matches!(
            new[..],
            [
                EventKind::Lifecycle { state: Lifecycle::ShuttingDown, .. },
                EventKind::Lifecycle { state: Lifecycle::Off, .. }
            ]
        ),
        "{new:?}"
    );
    assert_eq!(again.logs.iter().filter(|l| l.line == "seeded").count(), 1);
}

#[tokio::test]
async fn restarted_agent_does_not_rerun_start_scripts_for_the_same_build() {
    let coord = FakeCoordinator::start();
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let m = manifest(7, work.path(), vec![script("count", "echo run >> runs", ScriptTrigger::Start)]);

    let mut agent = start_agent(coord.config(data.path(), coord.pin()));
    let mut s = coord.hello().await.serve(welcome(7, 0, 0), m.clone()).await;
    let mut rec = Record::default();
    pump(&mut s, &mut rec, true, started).await;
    // A SIGTERM-style stop runs the (absent) stop scripts and says goodbye: state becomes off.
    agent.stop();
    pump(&mut s, &mut rec, true, |r| r.goodbye.is_some()).await;
    assert_eq!(rec.goodbye.as_deref(), Some("test stop"));
    assert_eq!(agent.exit().await, Exit::Stopped);
    assert_eq!(read_state(data.path()), "{\"build\":7,\"lifecycle\":\"off\",\"start\":\"ready\"}\n");
    // Started again for the same build (its container restarted, say): a new process is a start,
    // not the shutdown the one before finished, and reports how the start phase ended.

    let mut agent = start_agent(coord.config(data.path(), coord.pin()));
    let mut s = coord.hello().await.serve(welcome(7, 0, 0), m).await;
    let mut rec = Record::default();
    pump(&mut s, &mut rec, true, |r| !r.lifecycles().is_empty()).await;
    assert_eq!(rec.lifecycles(), vec![Lifecycle::Ready], "re-reported, not restarted");
    assert!(rec.span("agent", "connect").is_none(), "no start phase, no connect span");
    assert_eq!(std::fs::read_to_string(work.path().join("runs")).unwrap(), "run\n");
    agent.stop();
    pump(&mut s, &mut rec, true, |r| r.goodbye.is_some()).await;
    assert_eq!(agent.exit().await, Exit::Stopped);
}

#[tokio::test]
async fn failing_and_timed_out_start_scripts() {
    let coord = FakeCoordinator::start();
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut slow = script("warm-cache", "sleep 60", ScriptTrigger::Start);
    slow.timeout_ms = 1000;
    slow.blocks_login = false;
    let m = manifest(2, work.path(), vec![slow, script("install-deps", "exit 2", ScriptTrigger::Start)]);
    let agent = start_agent(coord.config(data.path(), coord.pin()));
    let mut s = coord.hello().await.serve(welcome(2, 0, 0), m).await;
    let mut rec = Record::default();
    pump(&mut s, &mut rec, true, started).await;
    assert_eq!(
        rec.detail_of(Lifecycle::StartTimeout).as_deref(),
        Some("startup script 'install-deps' exited with code 2 (and 1 more problem)")
    );
    let ready = rec.span("agent", "ready").unwrap();
    assert_eq!(ready.status, SpanStatus::TimedOut);
    let slow = rec.span("script", "warm-cache").unwrap();
    assert_eq!((slow.status, slow.exit_code), (SpanStatus::TimedOut, None));
    s.send(CoordinatorMessage::Shutdown { reason: "stop".into() }).await;
    pump(&mut s, &mut rec, true, |r| r.goodbye.is_some()).await;
    assert_eq!(agent.exit().await, Exit::Stopped);
}

#[tokio::test]
async fn final_events_are_delivered_on_a_new_connection_while_leaving() {
    let coord = FakeCoordinator::start();
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let m = manifest(4, work.path(), vec![script("bye", "sleep 0.2", ScriptTrigger::Stop)]);
    let mut agent = start_agent(coord.config(data.path(), coord.pin()));
    let mut s = coord.hello().await.serve(welcome(4, 0, 0), m.clone()).await;
    let mut rec = Record::default();
    pump(&mut s, &mut rec, true, started).await;
    let stored = rec.events.last().unwrap().seq;

    // SIGTERM, and the coordinator drops the connection while the stop script runs.
    agent.stop();
    s.close();
    let mut s = coord.hello().await.serve(welcome(4, stored, 0), m).await;
    let mut after = Record::default();
    pump(&mut s, &mut after, true, |r| r.goodbye.is_some()).await;
    assert_eq!(agent.exit().await, Exit::Stopped);
    assert_eq!(after.lifecycles(), vec![Lifecycle::ShuttingDown, Lifecycle::Off]);
    assert_eq!(after.events[0].seq, stored + 1);
    assert_eq!(after.span("stop_script", "bye").unwrap().status, SpanStatus::Ok);
}

#[tokio::test]
async fn shutdown_during_start_kills_the_start_scripts() {
    let coord = FakeCoordinator::start();
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let pidfile = work.path().join("pid");
    let run = format!("sleep 300 & echo $! > {}; echo up; wait", pidfile.display());
    let m = manifest(3, work.path(), vec![script("server", &run, ScriptTrigger::Start)]);
    let agent = start_agent(coord.config(data.path(), coord.pin()));
    let mut s = coord.hello().await.serve(welcome(3, 0, 0), m).await;
    let mut rec = Record::default();
    pump(&mut s, &mut rec, true, |r| r.logs.iter().any(|l| l.line == "up")).await;
    s.send(CoordinatorMessage::Shutdown { reason: "stop".into() }).await;
    pump(&mut s, &mut rec, true, |r| r.goodbye.is_some()).await;
    assert_eq!(agent.exit().await, Exit::Stopped);
    assert_eq!(
        rec.lifecycles(),
        vec![Lifecycle::Created, Lifecycle::Starting, Lifecycle::ShuttingDown, Lifecycle::Off]
    );
    assert_eq!(rec.span("script", "server").unwrap().status, SpanStatus::Error);
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let gone = || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
                .unwrap_or(true)
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !gone() {
        assert!(tokio::time::Instant::now() < deadline, "the start script's child survived shutdown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Collects what the agent logs, to check the words a user would read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn wrong_ca_gives_a_clear_message_and_no_manifest_means_a_plain_exit() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let coord = FakeCoordinator::start();
    let data = tempfile::tempdir().unwrap();
    let wrong = CaPin::from_fingerprint(&format!("sha256:{}", "ab".repeat(32))).unwrap();
    let agent = start_agent(coord.config(data.path(), wrong));
    // Keep the server side accepting so the handshake happens.
    let accept = tokio::spawn({
        let endpoint = coord.endpoint.clone();
        async move {
            while let Some(incoming) = endpoint.accept().await {
                let _ = incoming.await;
            }
        }
    });
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let expected = "tls handshake with the coordinator failed: unexpected error: coordinator's certificate chain does not contain the pinned CA";
    loop {
        let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
        if text.contains(expected) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no clear tls message in:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(agent.signal().await, Exit::Stopped);
    assert!(!data.path().join("state.json").exists());
    accept.abort();
}
