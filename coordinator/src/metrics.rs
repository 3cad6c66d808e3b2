//! Health and Prometheus metrics on the API port: `GET /readyz` and `GET /metrics`.
//!
//! Every [`Engine`] has its own registry (no process-wide recorder), so several coordinators in one
//! process keep separate counts. Gauges that mirror state (workspaces by status, connected agents,
//! heartbeat lag) are computed at scrape time from the store and the engine, so they cannot drift;
//! counters and histograms are recorded where things happen. Labels only ever take values from
//! small fixed sets: never a workspace name, a user name or a raw URI.

use crate::api::ApiState;
use crate::engine::Engine;
use axum::extract::{MatchedPath, State};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tether_shared::WorkspaceStatus;

/// `/readyz` gives up on a database that does not answer within this.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

const METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

const WORKSPACES: &str = "tether_workspaces";
const AGENTS_CONNECTED: &str = "tether_agents_connected";
const HEARTBEAT_LAG: &str = "tether_agents_heartbeat_lag_seconds";
const HEARTBEAT_LAG_MAX: &str = "tether_agent_heartbeat_lag_seconds_max";
const AGENT_CONNECTIONS: &str = "tether_agent_connections_total";
const AGENT_RECONNECTS: &str = "tether_agent_reconnects_total";
const SSH_CONNECTIONS: &str = "tether_ssh_connections_total";
const SSH_ACTIVE: &str = "tether_ssh_connections_active";
const SSH_BYTES: &str = "tether_ssh_bytes_total";
const FRONT_DOOR_DROPPED: &str = "tether_ssh_front_door_dropped_total";
const HTTP_DROPPED: &str = "tether_http_connections_dropped_total";
const TRANSITION_SECONDS: &str = "tether_workspace_transition_seconds";
const API_SECONDS: &str = "tether_api_request_duration_seconds";
const BUILD_INFO: &str = "tether_build_info";

/// Upper bounds (seconds) of the heartbeat lag gauges; `+Inf` is added.
const LAG_BOUNDS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0];
const TRANSITION_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];
const API_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// A user-requested change whose duration is measured, from the request to its target status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transition {
    /// A new build: start requested (or an external agent connected to a stopped workspace) until
    /// `running`.
    Start,
    /// A lost `process` agent brought back for the same build, until `running`.
    Restart,
    /// Stop requested until `stopped`.
    Stop,
    /// Delete requested until `deleted`.
    Delete,
}

impl Transition {
    pub const ALL: &'static [Transition] =
        &[Transition::Start, Transition::Restart, Transition::Stop, Transition::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Start => "start",
            Transition::Restart => "restart",
            Transition::Stop => "stop",
            Transition::Delete => "delete",
        }
    }

    fn target(self) -> WorkspaceStatus {
        match self {
            Transition::Start | Transition::Restart => WorkspaceStatus::Running,
            Transition::Stop => WorkspaceStatus::Stopped,
            Transition::Delete => WorkspaceStatus::Deleted,
        }
    }

    /// Statuses on the way to the target. Anything else (a failed start, a stop that failed and
    /// went back) ends the measurement without a sample.
    fn on_the_way(self, status: WorkspaceStatus) -> bool {
        use WorkspaceStatus::*;
        match self {
            // An agent that has not connected yet, or lost its connection while starting, may still
            // come: the start then took that long.
            Transition::Start | Transition::Restart => matches!(status, Pending | Starting | Unhealthy),
            Transition::Stop => status == Stopping,
            Transition::Delete => status == Deleting,
        }
    }
}

/// Transitions under way, by workspace id: a plain state machine with time passed in.
#[derive(Debug, Default)]
pub struct Transitions {
    pending: HashMap<i64, (Transition, Instant)>,
}

impl Transitions {
    /// A transition was requested; it replaces any other under way for this workspace.
    pub fn begin(&mut self, id: i64, transition: Transition, now: Instant) {
        self.pending.insert(id, (transition, now));
    }

    /// A workspace's status changed: the finished transition and how long it took, if one finished.
    pub fn status_changed(&mut self, id: i64, to: WorkspaceStatus, now: Instant) -> Option<(Transition, Duration)> {
        let (transition, since) = *self.pending.get(&id)?;
        if transition.on_the_way(to) {
            return None;
        }
        self.pending.remove(&id);
        (to == transition.target()).then(|| (transition, now.saturating_duration_since(since)))
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// How a brokered SSH connection attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshOutcome {
    Accepted,
    Refused,
}

/// Why the SSH front door dropped a connection before its user logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontDoorDrop {
    /// Refused at accept: too many connections had not logged in yet, in all or from its address.
    UnauthenticatedLimit,
    /// Refused at accept: the front door held its most connections.
    ConnectionLimit,
    /// Cut off: no login within the grace time.
    LoginTimeout,
}

impl FrontDoorDrop {
    const ALL: [FrontDoorDrop; 3] =
        [FrontDoorDrop::UnauthenticatedLimit, FrontDoorDrop::ConnectionLimit, FrontDoorDrop::LoginTimeout];

    fn label(self) -> &'static str {
        match self {
            FrontDoorDrop::UnauthenticatedLimit => "unauthenticated_limit",
            FrontDoorDrop::ConnectionLimit => "connection_limit",
            FrontDoorDrop::LoginTimeout => "login_timeout",
        }
    }
}

/// The coordinator's metrics: one registry per engine, and handles to what is recorded.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    workspaces: Vec<(WorkspaceStatus, Gauge)>,
    agents_connected: Gauge,
    heartbeat_lag: Vec<(Option<f64>, Gauge)>,
    heartbeat_lag_max: Gauge,
    agent_connections: Counter,
    agent_reconnects: Counter,
    ssh_accepted: Counter,
    ssh_refused: Counter,
    ssh_active: Gauge,
    ssh_bytes_up: Counter,
    ssh_bytes_down: Counter,
    front_door_dropped: Vec<(FrontDoorDrop, Counter)>,
    transition_seconds: Vec<(Transition, Histogram)>,
    transitions: Mutex<Transitions>,
}

fn labels(pairs: &[(&'static str, &str)]) -> Vec<Label> {
    pairs.iter().map(|(k, v)| Label::new(*k, v.to_string())).collect()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(TRANSITION_SECONDS.into()), TRANSITION_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full(API_SECONDS.into()), API_BUCKETS));
        // Only an empty bucket list is an error, and both lists are constants with values.
        let recorder = builder.expect("histogram buckets are not empty").build_recorder();
        let handle = recorder.handle();

        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            // One description per name; the kind only matters to the recorder's bookkeeping.
            recorder.describe_gauge(name.into(), unit, help.into());
        };
        describe(WORKSPACES, None, "Workspaces in each status.");
        describe(AGENTS_CONNECTED, None, "Agents with an open tunnel connection.");
        describe(
            HEARTBEAT_LAG,
            Some(Unit::Seconds),
            "Connected agents whose last heartbeat is at most `le` seconds old, at scrape time (a gauge \
             histogram: histogram_quantile works on it).",
        );
        describe(
            HEARTBEAT_LAG_MAX,
            Some(Unit::Seconds),
            "Seconds since the oldest last heartbeat of a connected agent.",
        );
        describe(AGENT_CONNECTIONS, None, "Agent tunnel connections accepted (hello welcomed).");
        describe(
            AGENT_RECONNECTS,
            None,
            "Accepted agent connections from an agent process that had connected before (same instance).",
        );
        describe(SSH_CONNECTIONS, None, "Brokered SSH connection attempts, accepted or refused.");
        describe(SSH_ACTIVE, None, "Brokered SSH connections being spliced now.");
        describe(
            SSH_BYTES,
            Some(Unit::Bytes),
            "Bytes spliced for SSH: up is client to agent, down is agent to client.",
        );
        describe(
            FRONT_DOOR_DROPPED,
            None,
            "SSH front door connections dropped before a login: refused at accept (too many not logged in \
             yet, or the connection limit) or cut off at the login grace time.",
        );
        describe(
            HTTP_DROPPED,
            None,
            "HTTP and HTTPS connections the coordinator closed on its own: refused at accept (the \
             listener's or the source address's connection limit), or cut off when a write waited too \
             long for the client to read.",
        );
        describe(
            TRANSITION_SECONDS,
            Some(Unit::Seconds),
            "Seconds from a start, restart, stop or delete request to running, running, stopped or deleted.",
        );
        describe(
            API_SECONDS,
            Some(Unit::Seconds),
            "HTTP API request durations by method, route template and status class.",
        );
        describe(BUILD_INFO, None, "Always 1; the version label says which tether this is.");

        let gauge = |name: &'static str, l: &[(&'static str, &str)]| {
            recorder.register_gauge(&Key::from_parts(name, labels(l)), &METADATA)
        };
        let counter = |name: &'static str, l: &[(&'static str, &str)]| {
            recorder.register_counter(&Key::from_parts(name, labels(l)), &METADATA)
        };
        gauge(BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))]).set(1.0);
        let workspaces =
            WorkspaceStatus::ALL.iter().map(|s| (*s, gauge(WORKSPACES, &[("status", s.as_str())]))).collect();
        let heartbeat_lag = LAG_BOUNDS
            .iter()
            .map(|b| Some(*b))
            .chain([None])
            .map(|b| {
                let le = b.map_or_else(|| "+Inf".to_string(), |b| b.to_string());
                (b, gauge(HEARTBEAT_LAG, &[("le", &le)]))
            })
            .collect();
        let transition_seconds = Transition::ALL
            .iter()
            .map(|t| {
                let key = Key::from_parts(TRANSITION_SECONDS, labels(&[("transition", t.as_str())]));
                (*t, recorder.register_histogram(&key, &METADATA))
            })
            .collect();
        Metrics {
            workspaces,
            agents_connected: gauge(AGENTS_CONNECTED, &[]),
            heartbeat_lag,
            heartbeat_lag_max: gauge(HEARTBEAT_LAG_MAX, &[]),
            agent_connections: counter(AGENT_CONNECTIONS, &[]),
            agent_reconnects: counter(AGENT_RECONNECTS, &[]),
            ssh_accepted: counter(SSH_CONNECTIONS, &[("outcome", "accepted")]),
            ssh_refused: counter(SSH_CONNECTIONS, &[("outcome", "refused")]),
            ssh_active: gauge(SSH_ACTIVE, &[]),
            ssh_bytes_up: counter(SSH_BYTES, &[("direction", "up")]),
            ssh_bytes_down: counter(SSH_BYTES, &[("direction", "down")]),
            front_door_dropped: FrontDoorDrop::ALL
                .iter()
                .map(|d| (*d, counter(FRONT_DOOR_DROPPED, &[("reason", d.label())])))
                .collect(),
            transition_seconds,
            transitions: Mutex::new(Transitions::default()),
            handle,
            recorder,
        }
    }

    fn transitions(&self) -> std::sync::MutexGuard<'_, Transitions> {
        // Every method leaves the map valid, so a panic elsewhere cannot leave it half-changed.
        self.transitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A start, restart, stop or delete was requested for workspace `id`.
    pub fn transition_begun(&self, id: i64, transition: Transition) {
        self.transitions().begin(id, transition, Instant::now());
    }

    /// Called by `Engine::set_status` for every status change.
    pub fn status_changed(&self, id: i64, to: WorkspaceStatus) {
        let done = self.transitions().status_changed(id, to, Instant::now());
        if let Some((transition, took)) = done {
            if let Some((_, h)) = self.transition_seconds.iter().find(|(t, _)| *t == transition) {
                h.record(took.as_secs_f64());
            }
        }
    }

    /// An agent's hello was accepted; `reconnect` when the same agent process had connected before.
    pub fn agent_connected(&self, reconnect: bool) {
        self.agent_connections.increment(1);
        if reconnect {
            self.agent_reconnects.increment(1);
        }
    }

    pub fn ssh_connection(&self, outcome: SshOutcome) {
        match outcome {
            SshOutcome::Accepted => self.ssh_accepted.increment(1),
            SshOutcome::Refused => self.ssh_refused.increment(1),
        }
    }

    /// The counters of connections the `listener` ("http" or "https") closed on its own.
    pub fn http_drops(&self, listener: &'static str) -> crate::https::Drops {
        let counter = |reason: &'static str| {
            let key = Key::from_parts(HTTP_DROPPED, labels(&[("listener", listener), ("reason", reason)]));
            self.recorder.register_counter(&key, &METADATA)
        };
        crate::https::Drops { connection_limit: counter("connection_limit"), write_stalled: counter("write_stalled") }
    }

    pub fn front_door_dropped(&self, why: FrontDoorDrop) {
        if let Some((_, c)) = self.front_door_dropped.iter().find(|(d, _)| *d == why) {
            c.increment(1);
        }
    }

    /// Counts one active SSH splice until the guard is dropped.
    pub fn ssh_active(&self) -> ActiveGuard {
        self.ssh_active.increment(1.0);
        ActiveGuard(self.ssh_active.clone())
    }

    /// The byte counters for spliced SSH traffic: (up, down).
    pub fn ssh_bytes(&self) -> (Counter, Counter) {
        (self.ssh_bytes_up.clone(), self.ssh_bytes_down.clone())
    }

    /// Records one HTTP API request. `route` is the matched route template, never the raw path.
    pub fn api_request(&self, method: &Method, route: &str, status: StatusCode, took: Duration) {
        let key = Key::from_parts(
            API_SECONDS,
            labels(&[("method", method_label(method)), ("route", route), ("status", status_class(status))]),
        );
        self.recorder.register_histogram(&key, &METADATA).record(took.as_secs_f64());
    }

    /// Folds recorded histogram samples into their buckets; without it, samples pile up between
    /// scrapes (or forever, when nobody scrapes). Call every few seconds.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Sets the scrape-time gauges. `counts` is `None` when the database could not be read: the
    /// workspace gauges then say NaN rather than an old number.
    fn observe(&self, counts: Option<&[(String, i64)]>, agents: usize, lags: &[Duration]) {
        for (status, g) in &self.workspaces {
            let n = match counts {
                Some(counts) => {
                    counts.iter().filter(|(s, _)| s == status.as_str()).map(|(_, n)| *n).sum::<i64>() as f64
                }
                None => f64::NAN,
            };
            g.set(n);
        }
        self.agents_connected.set(agents as f64);
        for (bound, g) in &self.heartbeat_lag {
            let n = match bound {
                Some(b) => lags.iter().filter(|l| l.as_secs_f64() <= *b).count(),
                None => lags.len(),
            };
            g.set(n as f64);
        }
        self.heartbeat_lag_max.set(lags.iter().max().copied().unwrap_or_default().as_secs_f64());
    }

    fn render(&self) -> String {
        self.handle.render()
    }
}

/// Holds one unit of the active SSH connections gauge.
pub struct ActiveGuard(Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Methods outside the usual set are one label value, so a client cannot invent new series.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn status_class(s: StatusCode) -> &'static str {
    match s.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// `/readyz` and `/metrics`: no token, like `/healthz`.
pub fn routes() -> Router<ApiState> {
    Router::new().route("/readyz", get(readyz)).route("/metrics", get(scrape))
}

/// 200 when the database answers and the coordinator is not shutting down; 503 with the reason.
async fn readyz(State(s): State<ApiState>) -> (StatusCode, String) {
    match ready(&s.engine).await {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

async fn ready(engine: &Engine) -> Result<(), String> {
    readiness(engine.is_shutting_down(), engine.store.ping(), READY_TIMEOUT).await
}

/// Not ready while shutting down, or while the database does not answer `ping` within `limit`.
async fn readiness(
    shutting_down: bool,
    ping: impl std::future::Future<Output = Result<(), crate::store::StoreError>>,
    limit: Duration,
) -> Result<(), String> {
    if shutting_down {
        return Err("shutting down".into());
    }
    match tokio::time::timeout(limit, ping).await {
        Ok(Ok(())) => Ok(()),
        // The store's error already reads "database: …"; the answer stays one line.
        Ok(Err(e)) => Err(e.to_string().replace(['\r', '\n'], " ")),
        Err(_) => Err(format!("database: no answer within {:?}", limit)),
    }
}

async fn scrape(State(s): State<ApiState>) -> Response {
    let engine = &s.engine;
    let counts = match engine.store.counts().await {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: counting workspaces");
            None
        }
    };
    let lags = engine.heartbeat_lags();
    engine.metrics.observe(counts.as_deref(), lags.len(), &lags);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], engine.metrics.render()).into_response()
}

/// Middleware: the duration of every API request, by route template.
pub async fn track_requests(
    State(s): State<ApiState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route =
        req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(req).await;
    s.engine.metrics.api_request(&method, &route, response.status(), started.elapsed());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next())
    }

    #[test]
    fn transitions_are_measured_to_their_target_only() {
        use WorkspaceStatus::*;
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut t = Transitions::default();
        assert_eq!(t.status_changed(1, Running, at(1)), None, "nothing under way");

        t.begin(1, Transition::Start, t0);
        assert_eq!(t.status_changed(1, Pending, at(1)), None);
        assert_eq!(t.status_changed(1, Starting, at(2)), None);
        assert_eq!(t.status_changed(1, Unhealthy, at(3)), None, "the agent may still come");
        assert_eq!(t.status_changed(1, Running, at(4)), Some((Transition::Start, Duration::from_secs(4))));
        assert_eq!(t.status_changed(1, Running, at(5)), None, "measured once");

        t.begin(2, Transition::Start, t0);
        assert_eq!(t.status_changed(2, Failed, at(1)), None, "a failed start is no sample");
        assert!(t.is_empty(), "and is forgotten");

        t.begin(3, Transition::Stop, t0);
        assert_eq!(t.status_changed(3, Stopping, at(1)), None);
        assert_eq!(t.status_changed(3, Running, at(2)), None, "a failed stop goes back");
        assert!(t.is_empty());

        t.begin(4, Transition::Start, t0);
        t.begin(4, Transition::Delete, at(1));
        assert_eq!(t.status_changed(4, Deleting, at(2)), None);
        assert_eq!(t.status_changed(4, Deleted, at(3)), Some((Transition::Delete, Duration::from_secs(2))));
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn scrape_gauges_and_labels() {
        let m = Metrics::new();
        let counts = vec![("running".to_string(), 2), ("stopped".to_string(), 1)];
        let lags = [Duration::from_millis(500), Duration::from_secs(3), Duration::from_secs(400)];
        m.observe(Some(&counts), 3, &lags);
        m.agent_connected(false);
        m.agent_connected(true);
        m.ssh_connection(SshOutcome::Refused);
        {
            let _active = m.ssh_active();
            let text = m.render();
            assert_eq!(line(&text, "tether_ssh_connections_active "), Some("1"), "{text}");
        }
        m.api_request(&Method::GET, "/api/v1/workspaces/{name}", StatusCode::NOT_FOUND, Duration::from_millis(3));
        m.api_request(&Method::from_bytes(b"BREW").unwrap(), "unmatched", StatusCode::OK, Duration::from_millis(1));
        m.transition_begun(7, Transition::Stop);
        m.status_changed(7, WorkspaceStatus::Stopped);
        m.upkeep();
        let text = m.render();
        for (prefix, value) in [
            ("tether_workspaces{status=\"running\"}", "2"),
            ("tether_workspaces{status=\"stopped\"}", "1"),
            ("tether_workspaces{status=\"deleted\"}", "0"),
            ("tether_agents_connected ", "3"),
            ("tether_agents_heartbeat_lag_seconds{le=\"1\"}", "1"),
            ("tether_agents_heartbeat_lag_seconds{le=\"5\"}", "2"),
            ("tether_agents_heartbeat_lag_seconds{le=\"120\"}", "2"),
            ("tether_agents_heartbeat_lag_seconds{le=\"+Inf\"}", "3"),
            ("tether_agent_heartbeat_lag_seconds_max ", "400"),
            ("tether_agent_connections_total ", "2"),
            ("tether_agent_reconnects_total ", "1"),
            ("tether_ssh_connections_total{outcome=\"refused\"}", "1"),
            ("tether_ssh_connections_total{outcome=\"accepted\"}", "0"),
            ("tether_ssh_connections_active ", "0"),
            (
                "tether_api_request_duration_seconds_count{method=\"GET\",route=\"/api/v1/workspaces/{name}\",status=\"4xx\"}",
                "1",
            ),
            ("tether_api_request_duration_seconds_count{method=\"other\",route=\"unmatched\",status=\"2xx\"}", "1"),
            ("tether_workspace_transition_seconds_count{transition=\"stop\"}", "1"),
            ("tether_workspace_transition_seconds_count{transition=\"start\"}", "0"),
            ("tether_build_info{version=", "1"),
        ] {
            assert_eq!(line(&text, prefix), Some(value), "{prefix} in\n{text}");
        }
        assert!(text.contains("# TYPE tether_workspace_transition_seconds histogram"), "{text}");

        m.observe(None, 0, &[]);
        let text = m.render();
        assert_eq!(line(&text, "tether_workspaces{status=\"running\"}"), Some("NaN"), "unknown, not stale");
        assert_eq!(line(&text, "tether_agent_heartbeat_lag_seconds_max "), Some("0"));
    }

    #[tokio::test]
    async fn readiness_says_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("t.db")).await.unwrap();
        let limit = Duration::from_secs(30);
        assert_eq!(readiness(false, store.ping(), limit).await, Ok(()));
        assert_eq!(readiness(true, store.ping(), limit).await, Err("shutting down".into()));
        store.close().await;
        let err = readiness(false, store.ping(), limit).await.unwrap_err();
        assert!(err.starts_with("database: ") && !err.contains('\n'), "{err}");
        let hung = readiness(false, std::future::pending(), Duration::from_millis(10)).await;
        assert_eq!(hung, Err("database: no answer within 10ms".into()));
    }

    #[test]
    fn registries_are_per_engine() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.agent_connected(false);
        assert_eq!(line(&a.render(), "tether_agent_connections_total "), Some("1"));
        assert_eq!(line(&b.render(), "tether_agent_connections_total "), Some("0"));
    }
}
