//! The coordinator's state of the world: workspaces in the store, live agents in memory, and every
//! operation that moves a workspace from one status to another. The HTTP API and the agent tunnel
//! are thin layers over this.

use crate::metrics::Transition;
use crate::pki::{self, Pki};
use crate::provision::{self, ProvisionError};
use crate::sshca::SshCa;
use crate::status::{self, Expiry, Liveness, ScriptProblem};
use crate::store::{Store, StoreError, WorkspaceRow};
use crate::template::{check_name, ProvisionerKind, Template};
use crate::view::{AgentView, SpanView, WorkspaceView};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_shared::proto::{
    CoordinatorMessage, Event, Heartbeat, Hello, LogLine, Manifest, RejectCode, ScriptTrigger, Welcome,
};
use tether_shared::{now_ms, Lifecycle, SpanStatus, WorkspaceStatus};
use tokio::sync::{mpsc, watch, OwnedMutexGuard};
use tracing::{info, warn};

/// Extra time agents get to come back after a coordinator restart, beyond their heartbeat timeout.
pub const RESTART_GRACE: Duration = Duration::from_secs(30);

/// Errors users see from workspace operations; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("no workspace '{0}'")]
    NotFound(String),
    /// Something other than a workspace is missing; the message says what.
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Settings the engine needs from `tether serve`.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// Where managed agents dial: the QUIC address as reachable from the workspace.
    pub agent_coordinator_addr: String,
    /// The `tether-agent` binary for the process provisioner.
    pub agent_binary: PathBuf,
    /// Longest a long-poll (`--wait`, `logs --follow`) may hold a request.
    pub max_wait: Duration,
    /// `HOST:PORT` of the SSH front door as users dial it; `None` when it is off.
    pub ssh_front_door: Option<String>,
    /// The HTTPS URL workspaces reach the coordinator at (it serves the agent there); `None` when
    /// HTTPS is off.
    pub https_url: Option<String>,
    /// Most log bytes kept per build (`--max-build-log-mib`).
    pub max_build_log_bytes: u64,
}

/// A connected agent, as the tunnel registered it.
struct AgentConn {
    conn_id: u64,
    /// The agent's QUIC connection, for streams the coordinator opens (brokered SSH).
    quic: Option<quinn::Connection>,
    instance: u64,
    commands: mpsc::Sender<CoordinatorMessage>,
    stats: Option<Heartbeat>,
    version: String,
    hostname: String,
    last_heartbeat_ms: i64,
    heartbeat_timeout: Duration,
}

#[derive(Default)]
struct Live {
    liveness: Liveness,
    agents: HashMap<i64, AgentConn>,
    /// Stops in flight, each with its outcome once its agent shutdown and provisioner stop are
    /// done (true when they succeeded): a delete that takes over a stop waits for it.
    stops: HashMap<i64, watch::Receiver<Option<bool>>>,
    /// Provisioning starts in flight (a `command` start runs for as long as its command): a stop or
    /// delete cancels the start and waits for it to end before it stops what the start made.
    starts: HashMap<i64, StartInFlight>,
    /// The last heartbeat of agents whose connection ended since last-seen times were last
    /// written: shown until then, written with the others (one transaction, however many went).
    gone_last_seen: HashMap<i64, i64>,
}

/// A provisioning start under way: its cancel signal (what overtook it), and a channel whose
/// sender the start holds until it has ended.
struct StartInFlight {
    serial: u64,
    cancel: watch::Sender<Option<&'static str>>,
    done: watch::Receiver<()>,
}

pub struct Engine {
    pub store: Store,
    pub pki: Pki,
    pub ssh_ca: SshCa,
    pub config: EngineConfig,
    live: Mutex<Live>,
    locks: Mutex<HashMap<i64, Arc<tokio::sync::Mutex<()>>>>,
    /// Bumped whenever a workspace's status or agent changes; waiters re-check their condition.
    changed: watch::Sender<u64>,
    /// Bumped whenever log lines are stored.
    logged: watch::Sender<u64>,
    next_conn: std::sync::atomic::AtomicU64,
    pub metrics: crate::metrics::Metrics,
    /// Set when a graceful stop begins; `/readyz` then says so.
    shutting_down: std::sync::atomic::AtomicBool,
    /// Refused SSH connections per user that are logged and audited (see `broker::open`).
    pub(crate) ssh_refusals: Mutex<crate::ratelimit::RateLimiter>,
    /// Brokered SSH connections open now, by audit id: what access changes end.
    pub(crate) ssh_open: Mutex<HashMap<i64, crate::broker::OpenSsh>>,
    /// Brokered SSH connections being spliced now, until their end is recorded.
    pub(crate) ssh_splicing: std::sync::atomic::AtomicUsize,
}

/// What an accepted hello gives the tunnel.
pub struct Accepted {
    pub workspace_id: i64,
    pub welcome: Welcome,
    pub conn_id: u64,
    pub commands: mpsc::Receiver<CoordinatorMessage>,
    pub clock_offset_ms: i64,
}

pub struct Rejected {
    pub code: RejectCode,
    pub message: String,
}

/// What `rotate_token` returns: the new token, the command that starts an agent with it, and
/// whether an agent connected with the old token was disconnected.
pub struct RotatedToken {
    pub token: String,
    pub command: String,
    pub agent_disconnected: bool,
}

/// What `create` returns: the workspace and, for external ones, how to start the agent.
pub struct Created {
    pub view: WorkspaceView,
    pub agent_token: Option<String>,
    pub agent_command: Option<String>,
}

fn template_of(row: &WorkspaceRow) -> Result<Template, OpError> {
    Template::parse(&row.template)
        .map_err(|e| OpError::Invalid(format!("stored template of '{}' is invalid: {e}", row.name)))
}

fn unix_to_instant(at_ms: i64, now: Instant) -> Instant {
    let ago = Duration::from_millis(now_ms().saturating_sub(at_ms).max(0) as u64);
    now.checked_sub(ago).unwrap_or(now)
}

/// The status reason of a forced delete under way; a restart resumes it forced.
const FORCED_DELETE_REQUESTED: &str = "delete requested (forced)";

/// A deleted workspace's status reason: "deleted", and what a forced delete went past.
fn deleted_reason(past: &[String]) -> String {
    if past.is_empty() {
        "deleted".into()
    } else {
        format!("deleted (forced past: {}; what it started may be left behind)", past.join("; "))
    }
}

impl Engine {
    pub fn new(store: Store, pki: Pki, ssh_ca: SshCa, config: EngineConfig) -> Arc<Engine> {
        Arc::new(Engine {
            store,
            pki,
            ssh_ca,
            config,
            live: Mutex::new(Live::default()),
            locks: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            logged: watch::channel(0).0,
            next_conn: 1.into(),
            metrics: crate::metrics::Metrics::new(),
            shutting_down: false.into(),
            ssh_refusals: Mutex::new(crate::ratelimit::RateLimiter::new(
                crate::broker::AUDITED_REFUSALS_PER_SEC,
                crate::broker::AUDITED_REFUSALS_BURST,
            )),
            ssh_open: Mutex::new(HashMap::new()),
            ssh_splicing: 0.into(),
        })
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        // A panic while holding this lock is a bug elsewhere; the map itself stays consistent.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn lock(&self, id: i64) -> OwnedMutexGuard<()> {
        let m = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(id).or_default().clone()
        };
        m.lock_owned().await
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn subscribe_logs(&self) -> watch::Receiver<u64> {
        self.logged.subscribe()
    }

    pub fn connected_agents(&self) -> usize {
        self.live().agents.len()
    }

    /// Time since each connected agent's last heartbeat (or its hello, before the first one).
    pub fn heartbeat_lags(&self) -> Vec<Duration> {
        let now = now_ms();
        let live = self.live();
        live.agents
            .values()
            .map(|a| Duration::from_millis(now.saturating_sub(a.last_heartbeat_ms).max(0) as u64))
            .collect()
    }

    /// A graceful stop has begun: from now on the coordinator reports itself not ready, and the
    /// long polls under way (woken here) answer at once rather than hold the shutdown up.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, std::sync::atomic::Ordering::Relaxed);
        self.bump();
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The QUIC connection of a workspace's agent, if it is connected now.
    pub fn agent_connection(&self, id: i64) -> Option<quinn::Connection> {
        self.live().agents.get(&id).and_then(|a| a.quic.clone())
    }

    pub(crate) async fn workspace_row(&self, name: &str) -> Result<WorkspaceRow, OpError> {
        self.row(name).await
    }

    async fn row(&self, name: &str) -> Result<WorkspaceRow, OpError> {
        self.store.workspace(name).await?.ok_or_else(|| OpError::NotFound(name.to_string()))
    }

    async fn reload(&self, id: i64) -> Result<WorkspaceRow, OpError> {
        self.store.workspace_by_id(id).await?.ok_or_else(|| OpError::NotFound(format!("#{id}")))
    }

    /// Writes a new status if it differs; the one place statuses change.
    async fn set_status(&self, row: &mut WorkspaceRow, to: WorkspaceStatus, reason: &str) -> Result<(), OpError> {
        if row.status == to && row.status_reason == reason {
            return Ok(());
        }
        let now = now_ms();
        self.store.set_status(row.id, row.status, to, reason, now).await?;
        info!(workspace = %row.name, from = %row.status, to = %to, reason, "status");
        self.metrics.status_changed(row.id, to);
        row.status = to;
        row.status_reason = reason.to_string();
        row.status_changed_at = now;
        self.bump();
        Ok(())
    }

    // ---- views ------------------------------------------------------------------------------

    pub fn view(&self, row: &WorkspaceRow) -> WorkspaceView {
        let live = self.live();
        let agent = live.agents.get(&row.id);
        WorkspaceView::new(
            row,
            agent.map(|a| AgentView {
                // Its QUIC connection may outlive it until the idle timeout; once its heartbeats
                // have lapsed (the workspace is unhealthy for it) it does not count as connected.
                connected: !live.liveness.is_lost(row.id),
                version: a.version.clone(),
                hostname: a.hostname.clone(),
                stats: a.stats.clone(),
            }),
            agent
                .map(|a| a.last_heartbeat_ms)
                .or_else(|| live.gone_last_seen.get(&row.id).copied())
                .or(row.last_heartbeat_at),
        )
    }

    /// The workspace of that name, or, once it is deleted and until the name is used again, the
    /// deleted one, with its history (why a forced delete went ahead, say).
    pub async fn show(&self, name: &str) -> Result<(WorkspaceView, Vec<crate::store::TransitionRow>), OpError> {
        let row = self.store.workspace_any(name).await?.ok_or_else(|| OpError::NotFound(name.to_string()))?;
        let history = self.store.transitions(row.id, 20).await?;
        Ok((self.view(&row), history))
    }

    pub async fn list(&self, status: Option<WorkspaceStatus>, all: bool) -> Result<Vec<WorkspaceView>, OpError> {
        self.list_for(None, status.as_slice(), all).await
    }

    /// The workspaces `user` may see (all of them for the admin), in any of `statuses` (in any
    /// status, deleted ones only with `all`, if it is empty).
    pub async fn list_for(
        &self,
        user: Option<&str>,
        statuses: &[WorkspaceStatus],
        all: bool,
    ) -> Result<Vec<WorkspaceView>, OpError> {
        let rows = self.store.list(statuses, all).await?;
        let granted = match user {
            Some(user) => self.store.granted_to(user).await?,
            None => Default::default(),
        };
        let visible = |r: &&WorkspaceRow| match user {
            None => true,
            Some(user) => r.owner.as_deref() == Some(user) || granted.contains(&r.id),
        };
        Ok(rows.iter().filter(visible).map(|r| self.view(r)).collect())
    }

    /// Whether `user` owns workspace `name` or has been granted it (the newest of that name,
    /// deleted or not, as `wait` sees it). A deleted workspace that was not theirs is, to them, no
    /// workspace at all.
    pub async fn may_use(&self, user: &str, name: &str) -> Result<bool, OpError> {
        let row = self.store.workspace_any(name).await?.ok_or_else(|| OpError::NotFound(name.to_string()))?;
        let theirs = self.may_use_row(user, &row).await?;
        if !theirs && row.status == WorkspaceStatus::Deleted {
            return Err(OpError::NotFound(name.to_string()));
        }
        Ok(theirs)
    }

    /// Whether `user` owns the workspace in `row` or has been granted it.
    pub async fn may_use_row(&self, user: &str, row: &WorkspaceRow) -> Result<bool, OpError> {
        Ok(row.owner.as_deref() == Some(user) || self.store.grants(row.id).await?.iter().any(|g| g == user))
    }

    pub async fn timings(&self, name: &str, build: Option<i64>) -> Result<Vec<SpanView>, OpError> {
        let row = self.row(name).await?;
        let build = build.unwrap_or(row.build);
        let origin = self.store.build_started_at(row.id, build).await?;
        if origin.is_none() && build != row.build {
            return Err(OpError::Missing(format!(
                "workspace '{name}' has no build {build} (its current build is {}; the coordinator keeps \
                 earlier builds' logs and timings for --keep-builds)",
                row.build
            )));
        }
        let spans = self.store.spans(row.id, build).await?;
        let origin = origin.or(spans.first().map(|s| s.started_at)).unwrap_or(0);
        Ok(spans.iter().map(|s| SpanView::new(s, origin)).collect())
    }

    // ---- user operations --------------------------------------------------------------------

    pub async fn create(
        self: &Arc<Self>,
        name: &str,
        template_text: &str,
        owner: Option<&str>,
        start: bool,
    ) -> Result<Created, OpError> {
        check_name("workspace", name).map_err(OpError::Invalid)?;
        if let Some(o) = owner {
            check_name("user", o).map_err(OpError::Invalid)?;
            if self.store.user(o).await?.is_none() {
                return Err(OpError::Invalid(format!(
                    "no user '{o}'; add it with `tether user add {o} --ssh-key FILE`"
                )));
            }
        }
        let template = Template::parse(template_text)
            .and_then(|t| t.check_manifest().map(|()| t))
            .map_err(|e| OpError::Invalid(format!("template: {e}")))?;
        let now = now_ms();
        if template.provisioner == ProvisionerKind::External {
            let token = pki::new_token("tether_agent");
            let mut row = self
                .store
                .create_workspace(
                    name,
                    owner,
                    template_text,
                    "external",
                    WorkspaceStatus::Starting,
                    "waiting for the agent to connect",
                    Some(&pki::hash_token(&token)),
                    now,
                )
                .await?;
            self.store.begin_build(row.id, None, now).await?;
            self.store.set_waiting_since(row.id, Some(now)).await?;
            self.live().liveness.await_agent(row.id, Instant::now(), template.connection_timeout);
            self.metrics.transition_begun(row.id, Transition::Start);
            row = self.reload(row.id).await?;
            let command = self.agent_command(&token);
            info!(workspace = %name, provisioner = "external", "created");
            self.bump();
            return Ok(Created { view: self.view(&row), agent_token: Some(token), agent_command: Some(command) });
        }
        let row = self
            .store
            .create_workspace(
                name,
                owner,
                template_text,
                template.provisioner.as_str(),
                WorkspaceStatus::Pending,
                status::CREATED_NOT_STARTED,
                None,
                now,
            )
            .await?;
        info!(workspace = %name, provisioner = template.provisioner.as_str(), "created");
        self.bump();
        if start {
            let view = self.start(name).await?;
            return Ok(Created { view, agent_token: None, agent_command: None });
        }
        Ok(Created { view: self.view(&row), agent_token: None, agent_command: None })
    }

    pub async fn start(self: &Arc<Self>, name: &str) -> Result<WorkspaceView, OpError> {
        let row = self.row(name).await?;
        let _guard = self.lock(row.id).await;
        let mut row = self.reload(row.id).await?;
        let template = template_of(&row)?;
        let connected = {
            let live = self.live();
            live.agents.contains_key(&row.id) && !live.liveness.is_lost(row.id)
        };
        use WorkspaceStatus::*;
        match (row.status, template.provisioner) {
            // Already started, or a start already under way: nothing to do, and the caller (a
            // script's `start --wait`, say) gets the workspace as it is. A second build must not
            // begin while the first is being provisioned.
            (Starting | Running, _) => return Ok(self.view(&row)),
            (Pending, _) if row.op.as_deref() == Some("start") => return Ok(self.view(&row)),
            (Pending | Stopped | Failed, ProvisionerKind::External) => {
                let now = now_ms();
                self.store.begin_build(row.id, None, now).await?;
                self.store.set_waiting_since(row.id, Some(now)).await?;
                self.live().liveness.await_agent(row.id, Instant::now(), template.connection_timeout);
                self.metrics.transition_begun(row.id, Transition::Start);
                self.set_status(&mut row, Starting, "waiting for the agent to connect").await?;
            }
            (Pending | Stopped | Failed, _) => {
                // A wait for an agent left from before (a restart's) must not expire while this
                // build is provisioned: provisioning sets its own.
                self.live().liveness.forget(row.id);
                let token = pki::new_token("tether_agent");
                self.store.begin_build(row.id, Some(&pki::hash_token(&token)), now_ms()).await?;
                self.store.set_op(row.id, Some("start")).await?;
                self.metrics.transition_begun(row.id, Transition::Start);
                self.set_status(&mut row, Pending, "start requested").await?;
                let engine = self.clone();
                let id = row.id;
                tokio::spawn(async move { engine.provision_start(id, token, false).await });
            }
            (Unhealthy, ProvisionerKind::Process) if !connected => {
                // Bring back a lost agent for the same build: its start scripts do not run again.
                let token = pki::new_token("tether_agent");
                self.store.set_token(row.id, Some(&pki::hash_token(&token))).await?;
                self.store.set_op(row.id, Some("start")).await?;
                self.metrics.transition_begun(row.id, Transition::Restart);
                self.set_status(&mut row, Starting, "restarting the agent").await?;
                let engine = self.clone();
                let id = row.id;
                tokio::spawn(async move { engine.provision_start(id, token, true).await });
            }
            (Unhealthy, ProvisionerKind::External) => {
                return Err(OpError::Conflict(format!(
                    "workspace '{name}' is unhealthy ({}); its agent runs outside Tether: restart it where it \
                     runs (with the new token, if `tether workspace token {name}` replaced it)",
                    row.status_reason
                )))
            }
            (Unhealthy, _) => {
                return Err(OpError::Conflict(format!(
                    "workspace '{name}' is unhealthy ({}); stop it, then start it again",
                    row.status_reason
                )))
            }
            (Stopping | Deleting | Deleted, _) => {
                return Err(OpError::Conflict(format!("workspace '{name}' is {}; wait for it to finish", row.status)))
            }
        }
        Ok(self.view(&row))
    }

    async fn provision_start(self: Arc<Self>, id: i64, token: String, restart: bool) {
        if let Err(e) = self.provision_start_inner(id, token, restart).await {
            warn!(workspace = id, error = %e, "start failed");
        }
    }

    async fn provision_start_inner(self: &Arc<Self>, id: i64, token: String, restart: bool) -> Result<(), OpError> {
        let (row, template) = {
            let _guard = self.lock(id).await;
            let mut row = self.reload(id).await?;
            if row.op.as_deref() != Some("start") {
                return Ok(());
            }
            let template = template_of(&row)?;
            let reason = if restart { "restarting the agent" } else { "provisioning" };
            self.set_status(&mut row, WorkspaceStatus::Starting, reason).await?;
            (row, template)
        };
        let serial = self.next_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (cancel, cancelled) = watch::channel(None);
        let (_done, done) = watch::channel(());
        self.live().starts.insert(id, StartInFlight { serial, cancel, done });
        let result = provision::start(self, &row, &template, &token, restart, cancelled).await;
        {
            let mut live = self.live();
            if live.starts.get(&id).is_some_and(|s| s.serial == serial) {
                live.starts.remove(&id);
            }
        }
        let _guard = self.lock(id).await;
        let mut row = self.reload(id).await?;
        if row.op.as_deref() != Some("start") {
            // Stopped or deleted meanwhile: that operation's `op` is its own to clear.
            return Ok(());
        }
        self.store.set_op(id, None).await?;
        if row.status != WorkspaceStatus::Starting {
            return Ok(());
        }
        match result {
            Ok(()) => {
                if !self.live().agents.contains_key(&id) {
                    let now = now_ms();
                    self.store.set_waiting_since(id, Some(now)).await?;
                    self.live().liveness.await_agent(id, Instant::now(), template.connection_timeout);
                    self.set_status(&mut row, WorkspaceStatus::Starting, "waiting for the agent to connect").await?;
                }
            }
            Err(e) => {
                self.store.set_last_error(id, Some(&e.to_string())).await?;
                self.set_status(&mut row, WorkspaceStatus::Failed, &e.to_string()).await?;
            }
        }
        Ok(())
    }

    pub async fn stop(self: &Arc<Self>, name: &str) -> Result<WorkspaceView, OpError> {
        let row = self.row(name).await?;
        let _guard = self.lock(row.id).await;
        let mut row = self.reload(row.id).await?;
        use WorkspaceStatus::*;
        match row.status {
            Pending | Starting | Running | Unhealthy | Failed => {}
            // Already stopped, or a stop already under way: nothing to do.
            Stopped => return Ok(self.view(&row)),
            Stopping if row.op.as_deref() == Some("stop") => return Ok(self.view(&row)),
            // The agent is shutting down on its own: a stop of ours takes over and finishes the job
            // (the provisioner's stop too), whether or not the agent is still there to say goodbye.
            Stopping if row.op.is_none() => {}
            Stopping | Deleting | Deleted => {
                return Err(OpError::Conflict(format!("workspace '{name}' is {}; wait for it to finish", row.status)))
            }
        }
        let previous = (row.status, row.status_reason.clone());
        self.store.set_op(row.id, Some("stop")).await?;
        self.metrics.transition_begun(row.id, Transition::Stop);
        self.set_status(&mut row, Stopping, "stop requested").await?;
        self.spawn_stop(row.id, previous, None, None);
        Ok(self.view(&row))
    }

    /// Deletes a workspace: its agent shuts down, then the provisioner stops and deletes it. With
    /// `force`, a failing stop or delete command is logged and recorded in the status reason, and
    /// the workspace is deleted anyway (what the provisioner could not remove may be left behind).
    pub async fn delete(self: &Arc<Self>, name: &str, force: bool) -> Result<WorkspaceView, OpError> {
        // The newest of that name: a deleted one is answered as it is, below.
        let row = self.store.workspace_any(name).await?.ok_or_else(|| OpError::NotFound(name.to_string()))?;
        let _guard = self.lock(row.id).await;
        let mut row = self.reload(row.id).await?;
        // Safe to repeat, as start and stop are: a delete under way is joined (`--wait` waits for
        // it), and a deleted workspace is answered as it is.
        if matches!(row.status, WorkspaceStatus::Deleting | WorkspaceStatus::Deleted) {
            return Ok(self.view(&row));
        }
        let previous = (row.status, row.status_reason.clone());
        self.store.set_op(row.id, Some("delete")).await?;
        self.metrics.transition_begun(row.id, Transition::Delete);
        let requested = if force { FORCED_DELETE_REQUESTED } else { "delete requested" };
        self.set_status(&mut row, WorkspaceStatus::Deleting, requested).await?;
        self.spawn_stop(row.id, previous, Some(force), None);
        Ok(self.view(&row))
    }

    /// The one line that starts an external workspace's agent anywhere: its token and the CA pinned
    /// by fingerprint.
    fn agent_command(&self, token: &str) -> String {
        format!(
            "TETHER_AGENT_TOKEN={token} tether-agent --coordinator {} --ca-sha256 {}",
            self.config.agent_coordinator_addr, self.pki.fingerprint
        )
    }

    /// Issues a new agent token for an external workspace; the old one stops working at once. A
    /// token is replaced when it may have leaked, so an agent connected with the old one (perhaps an
    /// impostor) loses its connection, heartbeats and SSH streams now: it is closed as a rejected
    /// agent's is, and the agent's reconnect is refused as a bad token (the agent exits 2).
    pub async fn rotate_token(&self, name: &str) -> Result<RotatedToken, OpError> {
        let row = self.row(name).await?;
        if row.provisioner != "external" {
            return Err(OpError::Invalid(format!(
                "workspace '{name}' uses the {} provisioner, which issues a fresh token at each start",
                row.provisioner
            )));
        }
        // Under the workspace's lock, so no hello with the old token is accepted after this.
        let _guard = self.lock(row.id).await;
        let mut row = self.reload(row.id).await?;
        let token = pki::new_token("tether_agent");
        self.store.set_token(row.id, Some(&pki::hash_token(&token))).await?;
        let evicted = {
            let mut live = self.live();
            let evicted = live.agents.remove(&row.id);
            if let Some(a) = &evicted {
                live.gone_last_seen.insert(row.id, a.last_heartbeat_ms);
            }
            if evicted.is_some() {
                // The status says why the agent is gone; the liveness clock must not replace it.
                live.liveness.forget(row.id);
            }
            evicted
        };
        let agent_disconnected = evicted.is_some();
        if let Some(agent) = evicted {
            // Dropping `agent.commands` ends the tunnel's session too (and alone, without QUIC).
            if let Some(quic) = agent.quic {
                quic.close(crate::tunnel::CLOSE_REJECTED.into(), b"agent token was replaced");
            }
            info!(workspace = %row.name, instance = agent.instance, "agent disconnected: its token was replaced");
            self.bump();
            use WorkspaceStatus::*;
            match row.status {
                Starting | Running | Unhealthy => {
                    self.set_status(&mut row, Unhealthy, status::TOKEN_REPLACED_REASON).await?;
                }
                Stopping if row.op.is_none() => {
                    let reason = status::lost_in_shutdown_reason("its token was replaced");
                    self.set_status(&mut row, Stopped, &reason).await?;
                }
                // A stop or delete of ours goes on without the agent; a stopped workspace stays so.
                _ => {}
            }
        }
        let command = self.agent_command(&token);
        Ok(RotatedToken { token, command, agent_disconnected })
    }

    /// Runs a stop or a delete whose operation and status are set, in a task of its own. A stop is
    /// registered before this returns, so a delete that takes it over (under the same lock) finds it
    /// and waits for it rather than running the agent shutdown and the provisioner's stop again
    /// beside it.
    /// `delete` is `Some(force)` for a delete, `None` for a stop.
    fn spawn_stop(
        self: &Arc<Self>,
        id: i64,
        previous: (WorkspaceStatus, String),
        delete: Option<bool>,
        reason: Option<String>,
    ) {
        let (after, done) = if delete.is_some() {
            (self.live().stops.get(&id).cloned(), None)
        } else {
            let (tx, rx) = watch::channel(None);
            self.live().stops.insert(id, rx);
            (None, Some(tx))
        };
        let engine = self.clone();
        tokio::spawn(async move { engine.run_stop(id, previous, delete, reason, after, done).await });
    }

    /// Stops (and, for delete, removes) a workspace: its agent, then what the provisioner started.
    /// On success the status reason is `reason` if given, else what became of the agent; on failure
    /// the workspace returns to the status it had, with the failure recorded. A delete that took
    /// over a stop (`after`) waits for it, and runs only the provisioner's delete if it succeeded.
    async fn run_stop(
        self: Arc<Self>,
        id: i64,
        previous: (WorkspaceStatus, String),
        delete: Option<bool>,
        reason: Option<String>,
        after: Option<watch::Receiver<Option<bool>>>,
        done: Option<watch::Sender<Option<bool>>>,
    ) {
        let force = delete == Some(true);
        let delete = delete.is_some();
        let what = if delete { "delete" } else { "stop" };
        // If that stop failed (or its task is gone), its work is done again here.
        let stopped_before = match after {
            Some(mut stop) => stop.wait_for(Option::is_some).await.is_ok_and(|outcome| *outcome == Some(true)),
            None => false,
        };
        let mut stopped_now = false;
        let result = self
            .run_stop_inner(id, delete, force, stopped_before, &mut stopped_now)
            .await
            .map(|detail| reason.unwrap_or(detail));
        if let Some(done) = &done {
            done.send_replace(Some(result.is_ok()));
        }
        let outcome = async {
            let _guard = self.lock(id).await;
            if let Some(done) = &done {
                let mut live = self.live();
                if live.stops.get(&id).is_some_and(|rx| rx.same_channel(&done.subscribe())) {
                    live.stops.remove(&id);
                }
            }
            let mut row = self.reload(id).await?;
            // A delete may have taken over this stop meanwhile: the status and the operation are
            // its to finish.
            if row.op.as_deref().is_some_and(|op| op != what) {
                info!(workspace = %row.name, op = ?row.op, "{what} finished after another operation took over");
                return Ok(());
            }
            self.store.set_op(id, None).await?;
            match result {
                Ok(detail) => {
                    self.live().liveness.forget(id);
                    if delete {
                        self.store.set_token(id, None).await?;
                        // "deleted", or what a forced delete went past.
                        self.set_status(&mut row, WorkspaceStatus::Deleted, &detail).await?;
                    } else {
                        if row.provisioner != "external" {
                            self.store.set_token(id, None).await?;
                        }
                        self.set_status(&mut row, WorkspaceStatus::Stopped, &detail).await?;
                    }
                }
                Err(e) => {
                    let message = format!("{what} failed: {e}");
                    warn!(workspace = %row.name, error = %e, "{what} failed");
                    self.store.set_last_error(id, Some(&message)).await?;
                    if delete && (stopped_before || stopped_now) {
                        // The agent is shut down and the provisioner's stop done (here, or by the
                        // stop this delete took over); only the delete failed: it is stopped.
                        if row.provisioner != "external" {
                            self.store.set_token(id, None).await?;
                        }
                        self.set_status(&mut row, WorkspaceStatus::Stopped, &format!("stopped; {message}")).await?;
                        return Ok(());
                    }
                    // Back to the status it had, unless that would now be a lie: an agent that
                    // already shut down leaves nothing running, and an agent's own shutdown that
                    // this stop took over has nobody left to finish it.
                    let agent_left = {
                        let live = self.live();
                        let connected = live.agents.contains_key(&id);
                        match previous.0 {
                            // An agent that never connected in this build has not shut down: the
                            // workspace goes back to waiting for it (its connection timeout runs).
                            WorkspaceStatus::Starting => !connected && row.lifecycle.is_some(),
                            WorkspaceStatus::Running => !connected,
                            WorkspaceStatus::Stopping => !connected || live.liveness.is_lost(id),
                            _ => false,
                        }
                    };
                    if agent_left {
                        self.set_status(
                            &mut row,
                            WorkspaceStatus::Unhealthy,
                            &format!("{message}; the agent has shut down"),
                        )
                        .await?;
                    } else {
                        self.set_status(&mut row, previous.0, &previous.1).await?;
                    }
                }
            }
            Ok::<_, OpError>(())
        }
        .await;
        if let Err(e) = outcome {
            warn!(workspace = id, error = %e, "{what} could not be recorded");
        }
    }

    /// Cancels the provisioning start under way for `id`, if any, and waits for it to end.
    async fn cancel_start(&self, id: i64, by: &'static str) {
        let done = self.live().starts.get(&id).map(|start| {
            start.cancel.send_replace(Some(by));
            start.done.clone()
        });
        if let Some(mut done) = done {
            info!(workspace = id, "{by}: cancelling the start under way");
            // Ends with an error when the start drops its sender, that is, when it has ended.
            while done.changed().await.is_ok() {}
        }
    }

    /// Returns the status reason: what became of the agent after a stop, "deleted" (or what a
    /// forced delete went past) after a delete.
    async fn run_stop_inner(
        self: &Arc<Self>,
        id: i64,
        delete: bool,
        force: bool,
        stopped_before: bool,
        stopped_now: &mut bool,
    ) -> Result<String, ProvisionError> {
        // A start still provisioning (a `command` start's command running) is ended first, so that
        // the provisioner's stop and delete come after it and find everything it made.
        self.cancel_start(id, if delete { "delete" } else { "stop" }).await;
        let row = self.reload(id).await.map_err(|e| ProvisionError::Other(e.to_string()))?;
        let template = template_of(&row).map_err(|e| ProvisionError::Other(e.to_string()))?;
        let mut detail = "stopped".to_string();
        // What a forced delete went past.
        let mut past: Vec<String> = Vec::new();
        let mut forced = |what: &str, result: Result<(), ProvisionError>| match result {
            Ok(()) => Ok(()),
            Err(e) if force => {
                warn!(workspace = %row.name, error = %e, "forced delete: the provisioner's {what} failed; deleting anyway");
                past.push(format!("{what} failed: {e}"));
                Ok(())
            }
            Err(e) => Err(e),
        };
        // A delete that took over a stop which shut the agent down and ran the provisioner's stop:
        // only the delete is left.
        if delete && stopped_before {
            forced("delete", provision::delete(self, &row, &template).await)?;
            return Ok(deleted_reason(&past));
        }
        let commands = self.live().agents.get(&id).map(|a| a.commands.clone());
        if let Some(commands) = commands {
            let reason = if delete { "workspace is being deleted" } else { "workspace is stopping" };
            let _ = commands.send(CoordinatorMessage::Shutdown { reason: reason.into() }).await;
            let deadline = template.shutdown_timeout + Duration::from_secs(15);
            let gone = self.wait_for(deadline, || !self.live().agents.contains_key(&id)).await;
            let row = self.reload(id).await.map_err(|e| ProvisionError::Other(e.to_string()))?;
            detail = match (gone, row.lifecycle) {
                (false, _) => "stopped; the agent did not shut down in time".into(),
                (true, Some(Lifecycle::Off)) => "stopped; stop scripts finished".into(),
                (true, Some(Lifecycle::ShutdownError)) => "stopped; a stop script failed".into(),
                (true, Some(Lifecycle::ShutdownTimeout)) => "stopped; stop scripts timed out".into(),
                (true, _) => "stopped".into(),
            };
        }
        forced("stop", provision::stop(self, &row, &template).await)?;
        *stopped_now = true;
        if delete {
            forced("delete", provision::delete(self, &row, &template).await)?;
            return Ok(deleted_reason(&past));
        }
        Ok(detail)
    }

    /// The agent ended the workspace on its own: it shut down (SIGTERM in the workspace), or was
    /// lost while it did. What the provisioner started may outlive the agent (a container whose
    /// main process is not the agent, a VM), and would stand in the way of the next start, so it
    /// is stopped as `workspace stop` would; the workspace is `stopped` with `detail` once that is
    /// done. Called under the workspace's lock.
    async fn stopped_by_agent(self: &Arc<Self>, row: &mut WorkspaceRow, detail: String) -> Result<(), OpError> {
        if row.provisioner == "external" {
            return self.set_status(row, WorkspaceStatus::Stopped, &detail).await;
        }
        self.store.set_op(row.id, Some("stop")).await?;
        self.metrics.transition_begun(row.id, Transition::Stop);
        let stopping = format!("{detail}{}", status::PROVISIONER_STOP_SUFFIX);
        self.set_status(row, WorkspaceStatus::Stopping, &stopping).await?;
        self.spawn_stop(row.id, (WorkspaceStatus::Stopping, stopping), None, Some(detail));
        Ok(())
    }

    /// Waits until `done()` holds, re-checking whenever a workspace changes. False on timeout.
    pub async fn wait_for(&self, timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done() {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return done(),
            }
        }
    }

    // ---- the agent side ---------------------------------------------------------------------

    /// Checks an agent's hello and registers its connection.
    pub async fn agent_hello(
        self: &Arc<Self>,
        hello: &Hello,
        quic: Option<quinn::Connection>,
    ) -> Result<Accepted, Rejected> {
        let internal = |e: OpError| Rejected { code: RejectCode::Busy, message: format!("coordinator error: {e}") };
        let bad_token = || Rejected {
            code: RejectCode::BadToken,
            message: "agent token is not valid (unknown, revoked, or replaced by a newer start or \
                      `tether workspace token`)"
                .into(),
        };
        let token_hash = pki::hash_token(&hello.token);
        let row =
            self.store.workspace_by_token(&token_hash).await.map_err(|e| internal(e.into()))?.ok_or_else(bad_token)?;
        let _guard = self.lock(row.id).await;
        let mut row = self.reload(row.id).await.map_err(internal)?;
        let template = template_of(&row).map_err(internal)?;
        // The token may have been replaced (`workspace token`, a restart) while this hello waited
        // for the lock: the old one stops working at once.
        let still_valid = self
            .store
            .workspace_by_token(&token_hash)
            .await
            .map_err(|e| internal(e.into()))?
            .is_some_and(|r| r.id == row.id);
        if !still_valid {
            return Err(bad_token());
        }
        // The same agent process again: its connection dropped, or the coordinator restarted.
        let reconnect = row.agent_instance == Some(hello.instance as i64);
        use WorkspaceStatus::*;
        if row.status == Stopping && row.op.is_none() && !reconnect {
            // The agent that was shutting down on its own has not said goodbye, and another agent
            // process (the workspace was restarted) holds the token now: that shutdown is over.
            // What the provisioner started is stopped first (it may be what restarted the agent),
            // as after any shutdown of the agent's own. The old process may still be in its stop
            // scripts (its connection still registered, or dead and not yet noticed): then the
            // reason says only what is known, and an external workspace, which has no provisioner
            // to stop and would take the new agent as a start, turns it away ("stopping") until the
            // old one's goodbye or loss.
            let old_registered = self.live().agents.get(&row.id).is_some_and(|a| a.instance != hello.instance);
            if !(old_registered && row.provisioner == "external") {
                self.live().liveness.forget(row.id);
                let reason = if old_registered {
                    status::SUPERSEDED_IN_SHUTDOWN_REASON.to_string()
                } else {
                    status::lost_in_shutdown_reason("a new agent process connected")
                };
                self.stopped_by_agent(&mut row, reason).await.map_err(internal)?;
            }
        }
        match row.status {
            Starting | Running | Unhealthy => {}
            // The agent shutting down comes back (its connection dropped, or the coordinator
            // restarted during a stop or delete) to finish its stop scripts and say goodbye.
            Stopping | Deleting if reconnect => {}
            // Another agent process while a stop or delete runs: it would be left running, its
            // token cleared, unseen by the stop that already looked for the agent. Or, for an
            // external workspace, while the agent is still in its own shutdown (above).
            Stopping => {
                return Err(Rejected {
                    code: RejectCode::WorkspaceNotRunnable,
                    message: format!("workspace '{}' is stopping ({})", row.name, row.status_reason),
                })
            }
            // The agent that was shutting down comes back to deliver its last events and its
            // goodbye; the workspace stays stopped.
            Stopped if reconnect && row.lifecycle.is_some_and(|l| l.rank() >= Lifecycle::ShuttingDown.rank()) => {}
            Pending | Stopped | Failed if row.provisioner == "external" => {
                // Someone started an external workspace's agent: that is a start.
                let now = now_ms();
                self.store.begin_build(row.id, None, now).await.map_err(|e| internal(e.into()))?;
                row = self.reload(row.id).await.map_err(internal)?;
                self.metrics.transition_begun(row.id, Transition::Start);
                self.set_status(&mut row, Starting, "agent connected").await.map_err(internal)?;
            }
            Deleting => {
                return Err(Rejected {
                    code: RejectCode::WorkspaceNotRunnable,
                    message: format!("workspace '{}' is being deleted", row.name),
                })
            }
            Deleted => {
                return Err(Rejected {
                    code: RejectCode::WorkspaceNotRunnable,
                    message: format!("workspace '{}' is deleted", row.name),
                })
            }
            Pending | Stopped | Failed => {
                return Err(Rejected {
                    code: RejectCode::WorkspaceNotRunnable,
                    message: format!(
                        "workspace '{}' is {}; start it with `tether workspace start`",
                        row.name, row.status
                    ),
                })
            }
        }
        if status::new_process_restarts_lifecycle(row.status, row.lifecycle, reconnect) {
            info!(workspace = %row.name, lifecycle = ?row.lifecycle, "a new agent process after a shutdown this coordinator did not see through: its lifecycle starts afresh");
            self.store.restart_lifecycle(row.id).await.map_err(|e| internal(e.into()))?;
            row.lifecycle = None;
            row.lifecycle_detail = None;
        }
        let now = now_ms();
        let (events_acked, logs_acked) = self
            .store
            .agent_hello(row.id, hello.instance, &hello.agent_version, &hello.hostname, now)
            .await
            .map_err(|e| internal(e.into()))?;
        let conn_id = self.next_conn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(8);
        {
            let mut live = self.live();
            if let Some(old) = live.agents.insert(
                row.id,
                AgentConn {
                    conn_id,
                    quic,
                    instance: hello.instance,
                    commands: tx,
                    stats: None,
                    version: hello.agent_version.clone(),
                    hostname: hello.hostname.clone(),
                    last_heartbeat_ms: now,
                    heartbeat_timeout: template.heartbeat_timeout,
                },
            ) {
                // The old connection is dead or replaced; tell it to go if it is still there.
                let _ = old
                    .commands
                    .try_send(CoordinatorMessage::Error { message: "replaced by a newer connection".into() });
            }
            live.liveness.heard(row.id, Instant::now(), template.heartbeat_timeout);
        }
        self.store.set_waiting_since(row.id, None).await.map_err(|e| internal(e.into()))?;
        self.refresh_connected_status(&mut row, &template).await.map_err(internal)?;
        let ssh_host_certificate = hello.ssh_host_key.as_deref().and_then(|key| {
            self.ssh_ca
                .sign_workspace_host(key, &row.name)
                .inspect_err(|e| warn!(workspace = %row.name, error = %e, "not signing the agent's SSH host key"))
                .ok()
        });
        let offset = now - hello.sent_at_ms;
        let clock_offset_ms = if offset.abs() > 1000 { offset } else { 0 };
        self.metrics.agent_connected(reconnect);
        info!(workspace = %row.name, instance = hello.instance, version = %hello.agent_version, "agent connected");
        Ok(Accepted {
            workspace_id: row.id,
            welcome: Welcome {
                workspace: row.name.clone(),
                build: row.build as u64,
                events_acked,
                logs_acked,
                heartbeat_interval_ms: template.heartbeat_interval().as_millis() as u64,
                coordinator_version: env!("CARGO_PKG_VERSION").into(),
                ssh_host_certificate,
            },
            conn_id,
            commands: rx,
            clock_offset_ms,
        })
    }

    /// Recomputes the status of a workspace whose agent is connected.
    async fn refresh_connected_status(&self, row: &mut WorkspaceRow, template: &Template) -> Result<(), OpError> {
        if !status::expects_agent(row.status) {
            return Ok(());
        }
        let problems = if matches!(row.lifecycle, Some(Lifecycle::StartError | Lifecycle::StartTimeout)) {
            self.script_problems(row, template).await?
        } else {
            Vec::new()
        };
        let (to, reason) = status::connected_status(row.lifecycle, &problems);
        self.set_status(row, to, &reason).await
    }

    async fn script_problems(&self, row: &WorkspaceRow, template: &Template) -> Result<Vec<ScriptProblem>, OpError> {
        let spans = self.store.spans(row.id, row.build).await?;
        Ok(spans
            .iter()
            .filter(|s| s.stage == "script" && s.status != SpanStatus::Ok)
            .map(|s| {
                let script = template.script(&s.name).filter(|sc| sc.on == ScriptTrigger::Start);
                ScriptProblem {
                    script: s.name.clone(),
                    blocks_login: script.is_some_and(|sc| sc.blocks_login),
                    status: s.status,
                    exit_code: s.exit_code,
                    timeout: Duration::from_millis(script.map_or(0, |sc| sc.timeout_ms)),
                    detail: crate::status::agent_detail(row.lifecycle_detail.as_deref(), &s.name),
                }
            })
            .collect())
    }

    pub async fn manifest(&self, id: i64) -> Result<Manifest, OpError> {
        let row = self.reload(id).await?;
        let template = template_of(&row)?;
        let working_dir =
            (row.provisioner == "process").then(|| provision::home_dir(self, &row.name).display().to_string());
        Ok(template.manifest(&row.name, row.build as u64, working_dir))
    }

    pub fn heartbeat(self: &Arc<Self>, id: i64, conn_id: u64, hb: Heartbeat) {
        let recovered = {
            let mut live = self.live();
            let Some(agent) = live.agents.get_mut(&id) else { return };
            if agent.conn_id != conn_id {
                return;
            }
            agent.last_heartbeat_ms = now_ms();
            agent.stats = Some(hb);
            let timeout = agent.heartbeat_timeout;
            live.liveness.heard(id, Instant::now(), timeout)
        };
        if recovered {
            let engine = self.clone();
            tokio::spawn(async move {
                let _guard = engine.lock(id).await;
                // The connection may have been replaced (or its token rotated) meanwhile.
                if engine.live().agents.get(&id).is_none_or(|a| a.conn_id != conn_id) {
                    return;
                }
                let refreshed = match engine.reload(id).await {
                    Ok(mut row) => match template_of(&row) {
                        Ok(t) => engine.refresh_connected_status(&mut row, &t).await,
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                if let Err(e) = refreshed {
                    // The next heartbeat tries again, rather than leave the workspace shown as lost.
                    warn!(workspace = id, error = %e, "recording an agent's recovery");
                    engine.live().liveness.relapse(id);
                }
            });
        }
    }

    pub async fn agent_events(&self, id: i64, conn_id: u64, events: &[Event], offset: i64) -> Result<u64, OpError> {
        let _guard = self.lock(id).await;
        // Under the lock: a rotated token or a newer connection may have replaced this one while
        // the batch waited for it, and then the batch is not this workspace's any more.
        let instance = match self.live().agents.get(&id) {
            Some(a) if a.conn_id == conn_id => a.instance,
            _ => return Err(OpError::Conflict("connection was replaced".into())),
        };
        let applied = self.store.apply_events(id, instance, events, offset).await?;
        if applied.dropped_spans > 0 {
            warn!(
                workspace = id,
                spans = applied.dropped_spans,
                limit = tether_shared::limits::MAX_SPANS_PER_BUILD,
                "dropped timing spans for a build this workspace does not have, or past the limit per build"
            );
        }
        if applied.lifecycle.is_some() || applied.spans > 0 {
            let mut row = self.reload(id).await?;
            if let Some(lc) = applied.lifecycle {
                info!(workspace = %row.name, lifecycle = %lc, "agent lifecycle");
            }
            let template = template_of(&row)?;
            if !self.live().liveness.is_lost(id) {
                self.refresh_connected_status(&mut row, &template).await?;
            }
            self.bump();
        }
        Ok(applied.acked)
    }

    pub async fn agent_logs(&self, id: i64, conn_id: u64, lines: &[LogLine], offset: i64) -> Result<u64, OpError> {
        let instance = match self.live().agents.get(&id) {
            Some(a) if a.conn_id == conn_id => a.instance,
            _ => return Err(OpError::Conflict("connection was replaced".into())),
        };
        let applied = self.store.apply_logs(id, instance, lines, offset, self.config.max_build_log_bytes).await?;
        for build in &applied.capped {
            warn!(
                workspace = id,
                build,
                limit_bytes = self.config.max_build_log_bytes,
                "a build's logs reached --max-build-log-mib; its later lines are dropped"
            );
        }
        if applied.unknown_build > 0 {
            warn!(
                workspace = id,
                lines = applied.unknown_build,
                "dropped log lines for a build this workspace does not have"
            );
        }
        self.logged.send_modify(|n| *n = n.wrapping_add(1));
        Ok(applied.acked)
    }

    /// Log lines were stored (not through an agent): `logs --follow` looks again.
    pub fn logs_added(&self) {
        self.logged.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The tunnel closed. `goodbye` is the agent's reason when it left on purpose.
    pub async fn agent_gone(self: &Arc<Self>, id: i64, conn_id: u64, goodbye: Option<String>) {
        {
            let mut live = self.live();
            let last = match live.agents.get(&id) {
                Some(a) if a.conn_id == conn_id => a.last_heartbeat_ms,
                _ => return,
            };
            live.agents.remove(&id);
            // Shown from here until last-seen times are next written: without it `list` and `show`
            // would fall back to the stored time, up to 30 s older than the one a reason counts from.
            live.gone_last_seen.insert(id, last);
            if goodbye.is_some() {
                live.liveness.forget(id);
            }
        };
        self.bump();
        let Some(reason) = goodbye else {
            // Silence, not a goodbye: the heartbeat timeout decides, so a quick reconnect never flaps.
            return;
        };
        let _guard = self.lock(id).await;
        let Ok(mut row) = self.reload(id).await else { return };
        info!(workspace = %row.name, reason = %reason, "agent said goodbye");
        // An agent that shut down on its own (SIGTERM in the workspace) shows `stopping` while its
        // stop scripts run; with no stop request of ours to finish the job, its goodbye does.
        let own_shutdown = row.status == WorkspaceStatus::Stopping && row.op.is_none();
        if status::expects_agent(row.status) || own_shutdown {
            let shut_down = row.lifecycle.is_some_and(|l| l.rank() >= Lifecycle::ShuttingDown.rank());
            let result = if shut_down {
                self.stopped_by_agent(&mut row, format!("agent shut down: {reason}")).await
            } else {
                self.set_status(&mut row, WorkspaceStatus::Unhealthy, &format!("agent exited: {reason}")).await
            };
            if let Err(e) = result {
                warn!(workspace = id, error = %e, "recording agent exit");
            }
        }
    }

    /// A `process` agent this coordinator spawned died (killed, crashed): the workspace turns
    /// unhealthy now, saying how, instead of showing `running` until the heartbeat timeout and then
    /// "lost connection". Its tunnel, which QUIC would keep until its idle timeout, is closed, and
    /// with it the SSH connections through it. A stop or delete in progress ended it on purpose.
    pub async fn agent_process_died(self: &Arc<Self>, id: i64, reason: String) {
        let _guard = self.lock(id).await;
        let Ok(mut row) = self.reload(id).await else { return };
        if row.op.is_some() || !status::expects_agent(row.status) {
            return;
        }
        let quic = {
            let mut live = self.live();
            live.liveness.forget(id);
            live.agents.get(&id).and_then(|a| a.quic.clone())
        };
        if let Some(quic) = quic {
            quic.close(0u32.into(), b"agent process died");
        }
        info!(workspace = %row.name, %reason, "agent process died");
        if let Err(e) = self.set_status(&mut row, WorkspaceStatus::Unhealthy, &reason).await {
            warn!(workspace = %row.name, error = %e, "recording a dead agent");
        }
    }

    /// One tick of the liveness clock: silent agents and agents that never came turn unhealthy, and
    /// a workspace whose agent went silent while it shut down on its own is stopped.
    pub async fn sweep(self: &Arc<Self>) {
        let expired = self.live().liveness.expire(Instant::now());
        for e in expired {
            let (id, since_heartbeat, reason) = match e {
                Expiry::Lost { workspace, since_heartbeat } => {
                    (workspace, Some(since_heartbeat), status::lost_reason(since_heartbeat))
                }
                Expiry::NeverConnected { workspace, after } => (workspace, None, status::not_connected_reason(after)),
            };
            let _guard = self.lock(id).await;
            let Ok(mut row) = self.reload(id).await else { continue };
            // A heartbeat may have arrived between the expiry and the lock.
            if since_heartbeat.is_some() && !self.live().liveness.is_lost(id) {
                continue;
            }
            if since_heartbeat.is_none() && self.live().agents.contains_key(&id) {
                continue;
            }
            let result = match (row.status, since_heartbeat) {
                (WorkspaceStatus::Starting | WorkspaceStatus::Running | WorkspaceStatus::Unhealthy, _) => {
                    self.set_status(&mut row, WorkspaceStatus::Unhealthy, &reason).await
                }
                // The agent was running its stop scripts on its own (SIGTERM in the workspace) and
                // went silent without its goodbye (SIGKILL at the end of a grace period, power off).
                // Nothing else would ever finish this stop; a stop or delete of ours (`op`) finishes
                // without the agent.
                (WorkspaceStatus::Stopping, Some(since)) if row.op.is_none() => {
                    self.live().liveness.forget(id);
                    let how = format!("no heartbeat for {}s", since.as_secs());
                    self.stopped_by_agent(&mut row, status::lost_in_shutdown_reason(&how)).await
                }
                _ => Ok(()),
            };
            if let Err(err) = result {
                warn!(workspace = %row.name, error = %err, "recording a lost agent");
            }
        }
    }

    /// Persists last-seen times of connected agents (periodically, never per heartbeat).
    pub async fn persist_last_seen(&self) {
        let seen: Vec<(i64, i64)> = {
            let mut live = self.live();
            let gone: Vec<(i64, i64)> = live.gone_last_seen.drain().collect();
            live.agents.iter().map(|(id, a)| (*id, a.last_heartbeat_ms)).chain(gone).collect()
        };
        if let Err(e) = self.store.touch_heartbeats(&seen).await {
            warn!(error = %e, "persisting last-seen times");
        }
    }

    /// After a restart: give every workspace that had an agent its heartbeat timeout and
    /// `RESTART_GRACE` to come back, and resume operations that were cut off.
    pub async fn resume(self: &Arc<Self>) -> Result<(), OpError> {
        let now = Instant::now();
        for row in self.store.list(&[], false).await? {
            let Ok(template) = template_of(&row) else { continue };
            match (row.status, row.op.as_deref()) {
                // The agent was running its stop scripts on its own: it gets the time agents get to
                // come back after a restart, to finish and say goodbye; its goodbye, a new agent
                // process, a user's stop or the sweep (once its heartbeats lapse) ends that
                // shutdown, as without the restart.
                (WorkspaceStatus::Stopping, None) => self.await_return(&row, now, template.heartbeat_timeout),
                (WorkspaceStatus::Stopping, op) => {
                    // A stop of ours was cut off. One that followed the agent's own shutdown ends
                    // with the agent's reason, as it would have.
                    let detail = (op == Some("stop"))
                        .then(|| row.status_reason.strip_suffix(status::PROVISIONER_STOP_SUFFIX))
                        .flatten()
                        .map(str::to_string);
                    self.spawn_stop(row.id, (WorkspaceStatus::Unhealthy, "stop was interrupted".into()), None, detail);
                }
                (WorkspaceStatus::Deleting, _) => {
                    // Forced or not, as it was asked for (the reason the request set says).
                    let forced = row.status_reason == FORCED_DELETE_REQUESTED;
                    let previous = (WorkspaceStatus::Unhealthy, "delete was interrupted".to_string());
                    self.spawn_stop(row.id, previous, Some(forced), None);
                }
                // A start cut off before its provisioning began: begin it now, with a new agent
                // token (the first one's text went with the old process).
                (WorkspaceStatus::Pending, Some("start")) => {
                    let token = pki::new_token("tether_agent");
                    self.store.set_token(row.id, Some(&pki::hash_token(&token))).await?;
                    info!(workspace = %row.name, "resuming a start that a restart cut off before provisioning");
                    let engine = self.clone();
                    let id = row.id;
                    tokio::spawn(async move { engine.provision_start(id, token, false).await });
                }
                // Cut off while provisioning: what the provisioner did is unknown, so it is not run
                // again; the agent it may have started has the connection timeout to come.
                (WorkspaceStatus::Starting, Some("start")) => {
                    self.store.set_op(row.id, None).await?;
                    let mut row = row;
                    let reason = "provisioning was cut off by a coordinator restart; waiting for the agent to connect";
                    self.set_status(&mut row, WorkspaceStatus::Starting, reason).await?;
                    self.live().liveness.await_agent(row.id, now, template.connection_timeout);
                }
                // Waiting for this build's first agent (an earlier build's may have come and gone).
                (WorkspaceStatus::Starting, None) if row.waiting_since.is_some() || row.agent_instance.is_none() => {
                    // Counted from when the wait began, so the reason says how long it has been;
                    // at least a heartbeat timeout from now.
                    let since = row.waiting_since.map_or(now, |at| unix_to_instant(at, now));
                    let timeout =
                        template.connection_timeout.max(now.duration_since(since) + template.heartbeat_timeout);
                    self.live().liveness.await_agent(row.id, since, timeout);
                }
                (s, _) if status::expects_agent(s) => {
                    let already_gone = s == WorkspaceStatus::Unhealthy && row.status_reason.starts_with("agent has");
                    if !already_gone {
                        self.await_return(&row, now, template.heartbeat_timeout);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// After a restart, waits for a workspace's agent to come back: the restart is the
    /// coordinator's doing, so the agent gets `RESTART_GRACE` on top of its heartbeat timeout
    /// (thousands of agents cannot all reconnect at once). Its last heartbeat stays the one it
    /// really sent, so a reason written later ("last heartbeat 95s ago") counts from there.
    fn await_return(&self, row: &WorkspaceRow, now: Instant, heartbeat_timeout: Duration) {
        let last = row.last_heartbeat_at.map_or(now, |at| unix_to_instant(at, now));
        let timeout = now.duration_since(last) + heartbeat_timeout + RESTART_GRACE;
        self.live().liveness.heard(row.id, last, timeout);
    }

    /// Tells every connected agent to reconnect within `within`, so a restart does not bring all
    /// of them back in the same second.
    pub fn ask_agents_to_reconnect(&self, within: Duration) {
        let live = self.live();
        for a in live.agents.values() {
            let _ = a.commands.try_send(CoordinatorMessage::Reconnect { within_ms: within.as_millis() as u64 });
        }
    }

    pub fn data_dir(&self) -> &PathBuf {
        &self.config.data_dir
    }
}

impl Engine {
    pub async fn store_close(&self) {
        self.store.close().await;
    }
}
