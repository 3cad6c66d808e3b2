//! The agent's main loop. It owns the build's lifecycle: it reacts to manifests (run the start phase,
//! or re-report a build an earlier run already started), to the start phase finishing, and to
//! shutdown (a signal or the coordinator). It is the only writer of the state file.

use crate::clock::WallClock;
use crate::config::Config;
use crate::metrics::{AgentMetrics, Scrape};
use crate::outbox::Outboxes;
use crate::phase::{self, PhaseEnv, PhaseKind, ScriptResult};
use crate::scripts::LocalUser;
use crate::ssh::{Account, LoginGate, SshServer};
use crate::state::{self, StateFile};
use crate::stats::Stats;
use crate::tunnel::{
    DrainRequest, FetchedManifest, Tunnel, TunnelConfig, TunnelError, TunnelLinks, CLOSE_TIMEOUT, DRAIN_TIMEOUT,
};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tether_shared::datalock::{self, DataDirLock, LockError};
use tether_shared::proto::{EventKind, Manifest, RejectCode, Span};
use tether_shared::tls::{self, TlsError};
use tether_shared::{limits, Lifecycle, SpanStatus};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;

/// How the agent ended, when it ended on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Shut down as asked (signal or coordinator).
    Stopped,
    /// The coordinator refused this agent for good: bad token or protocol version.
    Rejected { code: RejectCode, message: String },
}

impl Exit {
    /// The process exit status: 0 stopped, 2 rejected (retrying will not help).
    pub fn code(&self) -> u8 {
        match self {
            Exit::Stopped => 0,
            Exit::Rejected { .. } => 2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("data directory {}", path.display())]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("data directory {}: {source}", path.display())]
    DataDirLock { path: PathBuf, source: LockError },
    #[error("tls client configuration: {0}")]
    Tls(#[from] TlsError),
    #[error("the connection task failed: {0}")]
    Tunnel(String),
    #[error("ssh: {0}")]
    Ssh(#[from] crate::ssh::SshError),
    #[error("listening for ssh on {addr}")]
    SshListen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("listening for metrics on {addr}")]
    MetricsListen { addr: std::net::SocketAddr, source: std::io::Error },
}

/// What the agent does with a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing: this build is already starting or started in this process.
    Keep,
    /// An earlier run of the agent finished this build's start phase: report where it got.
    Report(Lifecycle),
    /// Run the start phase for this build (replacing a start phase of another build).
    Start,
}

/// Decides what a manifest for `build` means, given the build whose start phase is running, the
/// build this process already handled, and the state file an earlier run left.
pub fn decide(build: u64, running: Option<u64>, handled: Option<u64>, saved: Option<StateFile>) -> Decision {
    if let Some(running) = running {
        return if running == build { Decision::Keep } else { Decision::Start };
    }
    if handled == Some(build) {
        return Decision::Keep;
    }
    if handled.is_none() {
        // An earlier process finished this build's start phase. If it went on to shut down (and was
        // killed in its stop scripts, or finished them), this process is still a start: it reports
        // how the start phase ended, not a shutdown it is not in.
        if let Some(outcome) = saved.filter(|s| s.build == build).and_then(|s| s.start_outcome()) {
            return Decision::Report(outcome);
        }
    }
    Decision::Start
}

/// Runs the agent until `shutdown` completes (with a reason) or the coordinator ends it.
pub async fn run(
    config: Config,
    boot: WallClock,
    shutdown: impl Future<Output = String> + Send,
) -> Result<Exit, AgentError> {
    let data_dir = config.data_dir.clone();
    // Script logs may hold secrets a script printed: keep the directory to the workspace user.
    tether_shared::fs::create_private_dir(&data_dir)
        .map_err(|source| AgentError::DataDir { path: data_dir.clone(), source })?;
    let mut shutdown = std::pin::pin!(shutdown);
    let Some(_lock) = lock_data_dir(&data_dir, &mut shutdown).await? else {
        return Ok(Exit::Stopped);
    };
    // Scripts an earlier agent process was running when it died: the start phase runs them again.
    let ended = tether_shared::leftovers::end_all(&data_dir.join(tether_shared::leftovers::DIR));
    if !ended.is_empty() {
        tracing::info!(groups = ?ended, "ended the scripts an earlier agent process left running");
    }
    let saved = match state::load(&data_dir) {
        Ok(saved) => saved,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the state file: start scripts will run");
            None
        }
    };
    let client = tls::client_config(config.ca.clone())?;
    let user = LocalUser::discover();
    let outboxes = Arc::new(Outboxes::default());
    let hostname = sysinfo::System::host_name().unwrap_or_else(|_| "unknown".to_string());
    let (manifests_tx, manifests) = watch::channel(None);
    let (notice, notice_rx) = watch::channel(None);
    // A start phase an earlier process of this agent began and never finished (it was killed)
    // runs again once the manifest comes: until then, sessions wait, as the coordinator, which
    // still has this build `starting`, lets them through.
    let cut_off = saved.is_some_and(|s| s.lifecycle == Lifecycle::Starting);
    let (gate, gate_rx) = watch::channel(match cut_off {
        true => LoginGate::Closed { workspace: None, scripts: Vec::new() },
        false => LoginGate::Open,
    });
    let ssh = SshServer::new(&data_dir, manifests_tx.subscribe(), notice_rx, gate_rx, Account::discover())?;
    if let Some(listen) = &config.ssh_listen {
        let listener = tokio::net::TcpListener::bind(listen.addr)
            .await
            .map_err(|source| AgentError::SshListen { addr: listen.addr, source })?;
        tokio::spawn(ssh.clone().serve_tcp(listener, listen.authorized_keys.clone().into()));
    }
    let metrics = Arc::new(AgentMetrics::default());
    if let Some(addr) = config.metrics_listen {
        if !addr.ip().is_loopback() {
            tracing::warn!(addr = %addr, "metrics are served on a non-loopback address: anyone who can reach it can read them");
        }
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| AgentError::MetricsListen { addr, source })?;
        let bound = listener.local_addr().unwrap_or(addr);
        // Tests and operators who asked for port 0 read the port from this line.
        tracing::info!("metrics listening on {bound}");
        let scrape = Scrape { metrics: metrics.clone(), outboxes: outboxes.clone(), ssh: ssh.activity() };
        tokio::spawn(crate::metrics::serve(listener, Arc::new(scrape)));
    }
    let tunnel = Tunnel::new(
        TunnelConfig {
            coordinator: config.coordinator.clone(),
            client,
            token: config.token.clone(),
            instance: rand::random::<u64>(),
            hostname: phase::truncate(hostname, limits::MAX_TEXT),
            ssh: ssh.clone(),
            metrics: metrics.clone(),
            clock: boot,
        },
        outboxes.clone(),
        Stats::new(user.home.clone()).with_ssh(ssh.activity()),
    );
    tracing::info!(
        coordinator = %config.coordinator,
        data_dir = %data_dir.display(),
        shell = %user.shell.display(),
        version = env!("CARGO_PKG_VERSION"),
        "agent starting"
    );
    let (coordinator_shutdown_tx, coordinator_shutdown) = watch::channel(None);
    let (drain, drain_rx) = watch::channel(None);
    let tunnel = tokio::spawn(tunnel.run(TunnelLinks {
        manifests: manifests_tx,
        shutdown: coordinator_shutdown_tx,
        drain: drain_rx,
    }));
    let agent = Agent {
        env: Arc::new(PhaseEnv {
            outboxes,
            clock: boot,
            user,
            logs_dir: data_dir.join("logs"),
            running_dir: data_dir.join(tether_shared::leftovers::DIR),
            metrics,
        }),
        data_dir,
        saved,
        handled: None,
        manifest: None,
        seen_manifest: false,
        start: None,
        notice,
        gate,
    };
    agent.serve(shutdown, manifests, coordinator_shutdown, drain, tunnel).await
}

/// How often an agent whose data directory another agent holds tries again.
const LOCK_RETRY: Duration = Duration::from_secs(1);

/// Takes the data directory's lock, waiting for another agent that holds it to exit (an agent
/// restarted before the old process is gone). `None` if `shutdown` came first.
async fn lock_data_dir(
    dir: &Path,
    shutdown: &mut (impl Future<Output = String> + Unpin),
) -> Result<Option<DataDirLock>, AgentError> {
    let mut said = false;
    loop {
        match datalock::lock_file(dir, datalock::AGENT_LOCK_FILE, "agent") {
            Ok(lock) => {
                if said {
                    tracing::info!(data_dir = %dir.display(), "the other agent has exited: going on");
                }
                return Ok(Some(lock));
            }
            Err(LockError::Held { holder, .. }) => {
                if !said {
                    tracing::warn!(
                        data_dir = %dir.display(),
                        "{holder} is using this data directory: waiting for it to exit (one agent per data directory)"
                    );
                    said = true;
                }
            }
            // Some network file systems have no locks: run as before, unguarded.
            Err(e @ LockError::Unsupported { .. }) => {
                tracing::warn!(error = %e, "running without the data directory's lock");
                return Ok(Some(DataDirLock::none()));
            }
            Err(LockError::Open { source, .. }) => return Err(AgentError::DataDir { path: dir.to_path_buf(), source }),
            Err(source) => return Err(AgentError::DataDirLock { path: dir.to_path_buf(), source }),
        }
        tokio::select! {
            reason = &mut *shutdown => {
                tracing::info!(reason = %reason, "stopped while waiting for the data directory");
                return Ok(None);
            }
            () = tokio::time::sleep(LOCK_RETRY) => {}
        }
    }
}

/// A start phase in progress.
struct StartPhase {
    build: u64,
    /// Where the "ready" span begins.
    ready_from: Instant,
    cancel: watch::Sender<bool>,
    /// The results and when the last script ended.
    task: JoinHandle<(Vec<ScriptResult>, Instant)>,
}

/// What woke the main loop.
enum Wake {
    Stop(String),
    Manifest(FetchedManifest),
    StartDone(Result<(Vec<ScriptResult>, Instant), JoinError>),
    TunnelEnded(Result<Result<(), TunnelError>, JoinError>),
    Nothing,
}

struct Agent {
    env: Arc<PhaseEnv>,
    data_dir: PathBuf,
    /// The state file as last read or written.
    saved: Option<StateFile>,
    /// The build this process started or re-reported.
    handled: Option<u64>,
    /// The newest manifest, for the stop scripts.
    manifest: Option<Arc<Manifest>>,
    /// What interactive SSH logins are told first: why this build's start phase failed.
    notice: watch::Sender<Option<String>>,
    /// Closed while this process runs start scripts that block login: SSH sessions wait.
    gate: watch::Sender<LoginGate>,
    seen_manifest: bool,
    start: Option<StartPhase>,
}

impl Agent {
    async fn serve(
        mut self,
        shutdown: impl Future<Output = String> + Send,
        mut manifests: watch::Receiver<Option<FetchedManifest>>,
        mut coordinator_shutdown: watch::Receiver<Option<String>>,
        drain: watch::Sender<Option<DrainRequest>>,
        mut tunnel: JoinHandle<Result<(), TunnelError>>,
    ) -> Result<Exit, AgentError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let reason = loop {
            let wake = tokio::select! {
                biased;
                reason = &mut shutdown => Wake::Stop(reason),
                joined = &mut tunnel => Wake::TunnelEnded(joined),
                r = coordinator_shutdown.changed() => match r {
                    Ok(()) => coordinator_shutdown.borrow_and_update().clone().map_or(Wake::Nothing, Wake::Stop),
                    // The tunnel task holds the sender: it has ended.
                    Err(_) => Wake::TunnelEnded((&mut tunnel).await),
                },
                r = manifests.changed() => match r {
                    Ok(()) => manifests.borrow_and_update().clone().map_or(Wake::Nothing, Wake::Manifest),
                    Err(_) => Wake::TunnelEnded((&mut tunnel).await),
                },
                joined = start_finished(&mut self.start) => Wake::StartDone(joined),
            };
            match wake {
                Wake::Stop(reason) => break reason,
                Wake::Manifest(fetched) => self.on_manifest(fetched).await,
                Wake::StartDone(joined) => self.on_start_finished(joined),
                Wake::TunnelEnded(joined) => return self.on_tunnel_ended(joined).await,
                Wake::Nothing => {}
            }
        };
        if self.manifest.is_none() {
            // A manifest that arrived together with the shutdown still names the stop scripts.
            self.manifest = manifests.borrow().as_ref().map(|f| f.manifest.clone());
        }
        self.shut_down(reason, drain, tunnel).await
    }

    async fn on_manifest(&mut self, fetched: FetchedManifest) {
        let manifest = fetched.manifest.clone();
        let build = manifest.build;
        let first = !self.seen_manifest;
        self.seen_manifest = true;
        match decide(build, self.start.as_ref().map(|s| s.build), self.handled, self.saved) {
            Decision::Keep => {}
            Decision::Report(lifecycle) => {
                tracing::info!(build, lifecycle = %lifecycle, "this build was started by an earlier agent run; not running its start scripts again");
                self.gate.send_replace(LoginGate::Open);
                // The earlier run's words are not kept; logins still hear that something failed.
                if matches!(lifecycle, Lifecycle::StartError | Lifecycle::StartTimeout) {
                    self.notice.send_replace(Some(format!(
                        "tether: this workspace's startup scripts failed (`tether workspace logs {}` shows how); it \
                         may not be fully set up",
                        manifest.workspace
                    )));
                }
                self.lifecycle(build, lifecycle, None);
                self.handled = Some(build);
            }
            Decision::Start => {
                if let Some(old) = self.start.take() {
                    tracing::warn!(build = old.build, new_build = build, "a new build replaces the one still starting");
                    cancel_phase(old).await;
                }
                self.begin_start(&fetched, first);
            }
        }
        self.manifest = Some(manifest);
    }

    fn begin_start(&mut self, fetched: &FetchedManifest, first: bool) {
        let manifest = fetched.manifest.clone();
        let build = manifest.build;
        let clock = self.env.clock;
        if first {
            self.span(build, "agent", "connect", clock.origin(), fetched.first_welcome, SpanStatus::Ok);
        }
        self.span(build, "agent", "manifest", fetched.fetch_started, fetched.fetch_ended, SpanStatus::Ok);
        // Closed before `starting` is reported: the coordinator lets SSH connections through to
        // this agent from then on, and their sessions wait here.
        let blocking: Vec<String> = manifest
            .scripts
            .iter()
            .filter(|s| s.on == tether_shared::proto::ScriptTrigger::Start && s.blocks_login)
            .map(|s| s.name.clone())
            .collect();
        self.gate.send_replace(match blocking.is_empty() {
            true => LoginGate::Open,
            false => LoginGate::Closed { workspace: Some(manifest.workspace.clone()), scripts: blocking },
        });
        self.lifecycle(build, Lifecycle::Created, None);
        self.lifecycle(build, Lifecycle::Starting, None);
        self.save(build, Lifecycle::Starting);
        let scripts = manifest.scripts.iter().filter(|s| s.on == tether_shared::proto::ScriptTrigger::Start).count();
        tracing::info!(build, scripts, "running start scripts");
        let (cancel, cancel_rx) = watch::channel(false);
        let env = self.env.clone();
        let task = tokio::spawn(async move {
            let results = phase::run_phase(env, manifest, PhaseKind::Start, None, cancel_rx).await;
            (results, Instant::now())
        });
        // The boot that starts a build measures "ready" from process start; a later build from its manifest.
        let ready_from = if first { clock.origin() } else { Instant::now() };
        self.start = Some(StartPhase { build, ready_from, cancel, task });
        self.notice.send_replace(None);
        self.handled = Some(build);
    }

    fn on_start_finished(&mut self, joined: Result<(Vec<ScriptResult>, Instant), JoinError>) {
        let Some(phase) = self.start.take() else { return };
        let (lifecycle, detail, now) = match joined {
            Ok((results, finished)) => {
                let (lifecycle, detail) = phase::verdict(PhaseKind::Start, &results);
                (lifecycle, detail, finished)
            }
            Err(e) => {
                tracing::error!(error = %e, "the start phase failed");
                let detail = "the agent failed while running the startup scripts".to_string();
                (Lifecycle::StartError, Some(detail), Instant::now())
            }
        };
        let status = match lifecycle {
            Lifecycle::Ready => SpanStatus::Ok,
            Lifecycle::StartTimeout => SpanStatus::TimedOut,
            _ => SpanStatus::ExitFailure,
        };
        match &detail {
            None => tracing::info!(build = phase.build, lifecycle = %lifecycle, "start phase finished"),
            Some(d) => tracing::warn!(build = phase.build, lifecycle = %lifecycle, detail = %d, "start phase finished"),
        }
        // A login lets the user in (a failure of scripts that do not block login, or a workspace
        // `unhealthy` since its login-blocking one failed): say why things may be missing.
        self.notice.send_replace(match (lifecycle, &detail) {
            (Lifecycle::Ready, _) => None,
            (_, Some(d)) => Some(format!("tether: {d}; this workspace may not be fully set up")),
            (_, None) => Some("tether: this workspace's startup scripts failed".to_string()),
        });
        // After the notice: the sessions that waited read it as they start.
        self.gate.send_replace(LoginGate::Open);
        // The span first: whoever sees the final lifecycle stored can already see the whole timeline.
        self.span(phase.build, "agent", "ready", phase.ready_from, now, status);
        self.lifecycle(phase.build, lifecycle, detail);
        self.save(phase.build, lifecycle);
    }

    async fn on_tunnel_ended(
        &mut self,
        joined: Result<Result<(), TunnelError>, JoinError>,
    ) -> Result<Exit, AgentError> {
        if let Some(phase) = self.start.take() {
            cancel_phase(phase).await;
        }
        match joined {
            Ok(Err(TunnelError::Rejected { code, message })) => Ok(Exit::Rejected { code, message }),
            Ok(Ok(())) => Err(AgentError::Tunnel("the connection loop ended unexpectedly".to_string())),
            Err(e) => Err(AgentError::Tunnel(e.to_string())),
        }
    }

    async fn shut_down(
        mut self,
        reason: String,
        drain: watch::Sender<Option<DrainRequest>>,
        mut tunnel: JoinHandle<Result<(), TunnelError>>,
    ) -> Result<Exit, AgentError> {
        tracing::info!(reason = %reason, "shutting down");
        // Sessions waiting for the start scripts end, saying so; new ones are not let in.
        self.gate.send_replace(LoginGate::Stopping);
        if let Some(phase) = self.start.take() {
            cancel_phase(phase).await;
        }
        match self.manifest.clone() {
            Some(manifest) => self.stop_phase(manifest).await,
            None => tracing::info!("no manifest was fetched: no stop scripts to run"),
        }
        drain.send_replace(Some(DrainRequest { reason, deadline: Instant::now() + DRAIN_TIMEOUT }));
        let limit = DRAIN_TIMEOUT + 2 * CLOSE_TIMEOUT + Duration::from_secs(1);
        match tokio::time::timeout(limit, &mut tunnel).await {
            Ok(Ok(Ok(()))) => Ok(Exit::Stopped),
            Ok(Ok(Err(TunnelError::Rejected { code, message }))) => Ok(Exit::Rejected { code, message }),
            Ok(Err(e)) => Err(AgentError::Tunnel(e.to_string())),
            Err(_) => {
                tracing::warn!("could not say goodbye to the coordinator in time");
                tunnel.abort();
                Ok(Exit::Stopped)
            }
        }
    }

    async fn stop_phase(&mut self, manifest: Arc<Manifest>) {
        let build = manifest.build;
        self.lifecycle(build, Lifecycle::ShuttingDown, None);
        self.save(build, Lifecycle::ShuttingDown);
        let overall = (manifest.shutdown_timeout_ms > 0).then(|| Duration::from_millis(manifest.shutdown_timeout_ms));
        // Stop scripts are never cancelled: their budget is the shutdown timeout.
        let (_keep, never) = watch::channel(false);
        let results = phase::run_phase(self.env.clone(), manifest, PhaseKind::Stop, overall, never).await;
        let (lifecycle, detail) = phase::verdict(PhaseKind::Stop, &results);
        match &detail {
            None => tracing::info!(build, lifecycle = %lifecycle, "stop phase finished"),
            Some(d) => tracing::warn!(build, lifecycle = %lifecycle, detail = %d, "stop phase finished"),
        }
        self.lifecycle(build, lifecycle, detail);
        self.save(build, lifecycle);
    }

    fn lifecycle(&self, build: u64, state: Lifecycle, detail: Option<String>) {
        let at_ms = self.env.clock.now_ms();
        let event = EventKind::Lifecycle { state, at_ms, detail };
        if state.start_finished() {
            // A verdict: the coordinator stores it after the output of the scripts it judges.
            self.env.outboxes.push_event_after_logs(build, event);
        } else {
            self.env.outboxes.push_event(build, event);
        }
    }

    fn span(&self, build: u64, stage: &str, name: &str, started: Instant, ended: Instant, status: SpanStatus) {
        let clock = self.env.clock;
        self.env.outboxes.push_event(
            build,
            EventKind::Span(Span {
                stage: stage.to_string(),
                name: name.to_string(),
                started_at_ms: clock.at(started),
                ended_at_ms: clock.at(ended),
                exit_code: None,
                status,
            }),
        );
    }

    fn save(&mut self, build: u64, lifecycle: Lifecycle) {
        let s = StateFile::next(self.saved, build, lifecycle);
        if let Err(e) = state::save(&self.data_dir, &s) {
            tracing::warn!(error = %e, "could not update the state file");
        }
        self.saved = Some(s);
    }
}

/// Completes when the running start phase does; never when there is none.
async fn start_finished(start: &mut Option<StartPhase>) -> Result<(Vec<ScriptResult>, Instant), JoinError> {
    match start {
        Some(phase) => (&mut phase.task).await,
        None => std::future::pending().await,
    }
}

/// Kills a start phase's scripts and waits for them to be gone. Their spans say they were cut off.
async fn cancel_phase(phase: StartPhase) {
    tracing::info!(build = phase.build, "stopping the start scripts still running");
    let _ = phase.cancel.send(true);
    if let Err(e) = phase.task.await {
        tracing::error!(error = %e, "the start phase failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(build: u64, lifecycle: Lifecycle) -> Option<StateFile> {
        Some(StateFile { build, lifecycle, start: None })
    }

    #[test]
    fn first_manifest_of_a_fresh_agent_starts() {
        assert_eq!(decide(1, None, None, None), Decision::Start);
        assert_eq!(decide(2, None, None, saved(1, Lifecycle::Ready)), Decision::Start, "new build");
    }

    #[test]
    fn restarted_agent_does_not_rerun_a_finished_start() {
        assert_eq!(decide(3, None, None, saved(3, Lifecycle::Ready)), Decision::Report(Lifecycle::Ready));
        assert_eq!(decide(3, None, None, saved(3, Lifecycle::StartError)), Decision::Report(Lifecycle::StartError));
    }

    #[test]
    fn restarted_agent_reruns_a_start_that_died_midway() {
        assert_eq!(decide(3, None, None, saved(3, Lifecycle::Starting)), Decision::Start);
        assert_eq!(decide(3, None, None, saved(3, Lifecycle::Created)), Decision::Start);
    }

    #[test]
    fn an_agent_restarted_after_its_shutdown_began_reports_how_the_start_ended() {
        use Lifecycle::*;
        for (start, shutdown) in
            [(Ready, ShuttingDown), (StartError, ShuttingDown), (Ready, Off), (Ready, ShutdownTimeout)]
        {
            let file = Some(StateFile { build: 3, lifecycle: shutdown, start: Some(start) });
            assert_eq!(decide(3, None, None, file), Decision::Report(start), "{start} then {shutdown}");
        }
        // Killed in a shutdown during its start phase, or by an agent that did not keep the
        // outcome: the start phase runs again.
        assert_eq!(decide(3, None, None, saved(3, ShuttingDown)), Decision::Start);
    }

    #[test]
    fn reconnects_keep_the_build_and_new_builds_start() {
        assert_eq!(decide(3, Some(3), Some(3), saved(3, Lifecycle::Starting)), Decision::Keep, "still starting");
        assert_eq!(decide(3, None, Some(3), saved(3, Lifecycle::Ready)), Decision::Keep, "already done");
        assert_eq!(decide(4, None, Some(3), saved(3, Lifecycle::Ready)), Decision::Start);
        assert_eq!(decide(4, Some(3), Some(3), saved(3, Lifecycle::Starting)), Decision::Start, "replaces");
        // Only the first manifest of a process looks at the state file.
        assert_eq!(decide(3, None, Some(4), saved(3, Lifecycle::Ready)), Decision::Start);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Exit::Stopped.code(), 0);
        assert_eq!(Exit::Rejected { code: RejectCode::BadToken, message: "no".into() }.code(), 2);
    }
}
