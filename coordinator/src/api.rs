//! The HTTP JSON API: everything the CLI does, behind the admin token. A user's token reaches the
//! workspaces the user owns or has been granted, for what a developer does with their own
//! workspace (list, show, timings, logs, wait, start, stop); the SSH routes users' tokens reach are
//! in [`crate::api_ssh`].

use crate::api_ssh::Identity;
use crate::engine::{Engine, OpError};
use crate::pki;
use crate::store::WorkspaceRow;
use crate::view::{CreatedView, LogView, LogsView, ShowView, TransitionView, WorkspaceView};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tether_shared::WorkspaceStatus;

#[derive(Clone)]
pub struct ApiState {
    pub engine: Arc<Engine>,
    pub admin_token_hash: Arc<String>,
    /// Why the coordinator ended SSH connections made over the API, for their clients.
    pub ssh_ends: Arc<crate::api_ssh::EndNotes>,
}

pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        let code = match &e {
            OpError::NotFound(_) | OpError::Missing(_) => StatusCode::NOT_FOUND,
            OpError::Conflict(_) => StatusCode::CONFLICT,
            OpError::Invalid(_) => StatusCode::BAD_REQUEST,
            OpError::Store(crate::store::StoreError::NameTaken(_) | crate::store::StoreError::Conflict(_)) => {
                StatusCode::CONFLICT
            }
            OpError::Store(crate::store::StoreError::Missing(_)) => StatusCode::NOT_FOUND,
            OpError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// A `limit` query value, `default` when absent: out of 1..=10000 it is refused, as the CLI refuses
/// it, not quietly clamped.
pub fn page_limit(limit: Option<i64>, default: i64) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(default);
    if !(1..=10_000).contains(&limit) {
        return Err(bad(format!("limit {limit}: it must be between 1 and 10000")));
    }
    Ok(limit)
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// The whole HTTP surface: `/healthz`, `/readyz`, `/metrics`, the API under `/api/v1`, and `extra`
/// (the agent downloads), every route timed.
pub fn router(state: ApiState, extra: Router) -> Router {
    let api = Router::new()
        .route("/workspaces", get(list).post(create))
        .route("/workspaces/{name}", get(show).delete(delete))
        .route("/workspaces/{name}/start", post(start))
        .route("/workspaces/{name}/stop", post(stop))
        .route("/workspaces/{name}/token", post(token))
        .route("/workspaces/{name}/timings", get(timings))
        .route("/workspaces/{name}/logs", get(logs))
        .route("/workspaces/{name}/wait", get(wait))
        .route("/status-counts", get(counts))
        .route("/admin/backup", post(crate::backup::api_backup))
        .merge(crate::api_ssh::admin_routes())
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .merge(
            crate::api_ssh::user_routes()
                .layer(axum::middleware::from_fn_with_state(state.clone(), crate::api_ssh::user_auth)),
        )
        .merge(crate::api_ssh::ticket_routes())
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, NO_ROUTE.into()) })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(json_errors));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(crate::metrics::routes())
        .nest("/api/v1", api)
        .with_state(state.clone())
        .merge(extra)
        // Last, so it times every route above; it sees the matched route template.
        .layer(axum::middleware::from_fn_with_state(state, crate::metrics::track_requests))
}

/// The answer to a path the API has no route for (the CLI reads it as a coordinator older than itself).
pub const NO_ROUTE: &str = "no such API route";

/// Largest request body the API reads: a template and the rest of its request.
const BODY_LIMIT: usize = crate::template::MAX_TEMPLATE + 16 * 1024;

/// Every API error as `{"error": "…"}`, as scripts read them: axum's own rejections (a body that is
/// not JSON, an unknown field, a query that does not parse, a body over the limit) are plain text,
/// and an unknown route or method has no body at all.
async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => format!(
            "the request body is over the API's limit of {BODY_LIMIT} bytes (a template may have at most {} bytes)",
            crate::template::MAX_TEMPLATE
        ),
        StatusCode::NOT_FOUND if text.is_empty() => NO_ROUTE.to_string(),
        StatusCode::METHOD_NOT_ALLOWED if text.is_empty() => "this API route does not take that method".to_string(),
        _ if text.is_empty() => status.canonical_reason().unwrap_or("error").to_string(),
        _ => text,
    };
    let mut out = ApiError(status, message).into_response();
    // What a 405 allows, a 401's challenge.
    for name in [axum::http::header::ALLOW, axum::http::header::WWW_AUTHENTICATE] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

/// Whether a user's token may use this route (the handler then checks the workspace is theirs):
/// what a developer does with their own workspace. Creating, deleting, agent tokens, users, grants,
/// the audit log and backups stay the admin's.
fn self_service(method: &Method, route: Option<&str>) -> bool {
    let Some(route) = route.map(|r| r.strip_prefix("/api/v1").unwrap_or(r)) else { return false };
    match *method {
        Method::GET => matches!(
            route,
            "/workspaces"
                | "/workspaces/{name}"
                | "/workspaces/{name}/timings"
                | "/workspaces/{name}/logs"
                | "/workspaces/{name}/wait"
        ),
        Method::POST => matches!(route, "/workspaces/{name}/start" | "/workspaces/{name}/stop"),
        _ => false,
    }
}

async fn auth(
    State(state): State<ApiState>,
    headers: HeaderMap,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match bearer(&headers) {
        Some(t) if pki::hash_token(t) == *state.admin_token_hash => {
            req.extensions_mut().insert(Identity::Admin);
            next.run(req).await
        }
        Some(t) => match state.engine.user_for_token(t).await {
            Ok(Some(user)) if self_service(req.method(), req.extensions().get::<MatchedPath>().map(|m| m.as_str())) => {
                req.extensions_mut().insert(Identity::User(user));
                next.run(req).await
            }
            // A user's token is valid, just not here: say so rather than call it invalid.
            Ok(Some(user)) => ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "this is the API token of user '{user}', which reaches their own workspaces (list, show, \
                     timings, logs, wait, start, stop, SSH); this needs the admin token (`admin-token` in \
                     the coordinator's data directory)"
                ),
            )
            .into_response(),
            Ok(None) => ApiError(StatusCode::UNAUTHORIZED, "the API token is not valid".into()).into_response(),
            Err(e) => ApiError::from(e).into_response(),
        },
        None => {
            ApiError(StatusCode::UNAUTHORIZED, "missing API token (Authorization: Bearer …)".into()).into_response()
        }
    }
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme's case does not matter (RFC 9110).
        .and_then(|v| v.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")))
        .map(|(_, token)| token.trim())
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    #[serde(default)]
    all: bool,
}

/// Refuses a user's token for a workspace the user neither owns nor has been granted; the admin's
/// reaches every workspace.
async fn reach(s: &ApiState, who: &Identity, name: &str) -> Result<(), ApiError> {
    let Identity::User(user) = who else { return Ok(()) };
    if s.engine.may_use(user, name).await? {
        Ok(())
    } else {
        Err(ApiError(StatusCode::FORBIDDEN, format!("user '{user}' may not access workspace '{name}'")))
    }
}

/// [`reach`], and the coordinator's log says which user asked for `what`.
async fn requested(s: &ApiState, who: &Identity, name: &str, what: &str) -> Result<(), ApiError> {
    reach(s, who, name).await?;
    if let Identity::User(user) = who {
        tracing::info!(workspace = %name, user = %user, "{what} requested by a user");
    }
    Ok(())
}

async fn list(
    State(s): State<ApiState>,
    Extension(who): Extension<Identity>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Vec<WorkspaceView>> {
    // One status, or several separated by commas.
    let statuses = match q.status.as_deref() {
        Some(words) => words
            .split(',')
            .map(|w| w.trim().parse::<WorkspaceStatus>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(e.to_string()))?,
        None => Vec::new(),
    };
    let user = match &who {
        Identity::User(user) => Some(user.as_str()),
        Identity::Admin => None,
    };
    Ok(Json(s.engine.list_for(user, &statuses, q.all).await?))
}

async fn counts(State(s): State<ApiState>) -> ApiResult<BTreeMap<String, i64>> {
    let mut out: BTreeMap<String, i64> =
        WorkspaceStatus::ALL.iter().filter(|w| **w != WorkspaceStatus::Deleted).map(|w| (w.to_string(), 0)).collect();
    for (status, n) in s.engine.store.counts().await.map_err(OpError::from)? {
        if status != "deleted" {
            out.insert(status, n);
        }
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    /// TOML; none (or empty) makes an external workspace, as the CLI without `--template` does.
    #[serde(default)]
    template: String,
    owner: Option<String>,
    #[serde(default)]
    start: bool,
}

async fn create(
    State(s): State<ApiState>,
    Json(b): Json<CreateBody>,
) -> Result<(StatusCode, Json<CreatedView>), ApiError> {
    let c = s.engine.create(&b.name, &b.template, b.owner.as_deref(), b.start).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedView { workspace: c.view, agent_token: c.agent_token, agent_command: c.agent_command }),
    ))
}

async fn show(
    State(s): State<ApiState>,
    Extension(who): Extension<Identity>,
    Path(name): Path<String>,
) -> ApiResult<ShowView> {
    reach(&s, &who, &name).await?;
    let (workspace, history) = s.engine.show(&name).await?;
    Ok(Json(ShowView { workspace, history: history.iter().map(TransitionView::from).collect() }))
}

async fn start(
    State(s): State<ApiState>,
    Extension(who): Extension<Identity>,
    Path(name): Path<String>,
) -> ApiResult<WorkspaceView> {
    requested(&s, &who, &name, "start").await?;
    Ok(Json(s.engine.start(&name).await?))
}

async fn stop(
    State(s): State<ApiState>,
    Extension(who): Extension<Identity>,
    Path(name): Path<String>,
) -> ApiResult<WorkspaceView> {
    requested(&s, &who, &name, "stop").await?;
    Ok(Json(s.engine.stop(&name).await?))
}

#[derive(Deserialize)]
struct DeleteQuery {
    /// Delete even if the provisioner's stop or delete command fails.
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> ApiResult<WorkspaceView> {
    Ok(Json(s.engine.delete(&name, q.force).await?))
}

async fn token(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<serde_json::Value> {
    let r = s.engine.rotate_token(&name).await?;
    Ok(Json(serde_json::json!({
        "agent_token": r.token,
        "agent_command": r.command,
        "agent_disconnected": r.agent_disconnected,
    })))
}

#[derive(Deserialize)]
struct TimingsQuery {
    build: Option<i64>,
}

async fn timings(
    State(s): State<ApiState>,
    Extension(who): Extension<Identity>,
    Path(name): Path<String>,
    Query(q): Query<TimingsQuery>,
) -> ApiResult<Vec<crate::view::SpanView>> {
    reach(&s, &who, &name).await?;
    Ok(Json(s.engine.timings(&name, q.build).await?))
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default)]
    after: i64,
    limit: Option<i64>,
    /// Seconds to wait for new lines when there are none yet.
    wait: Option<u64>,
    source: Option<String>,
    /// The build whose lines to give (default: the current one).
    build: Option<i64>,
}

async fn logs(
    State(s): State<ApiState>,
    Extension(who): Extension<Identity>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<LogsView> {
    let limit = page_limit(q.limit, 1000)?;
    // Before the row is read: a change just after it still wakes the wait below.
    let mut rx = s.engine.subscribe_logs();
    let mut changes = s.engine.subscribe_changes();
    reach(&s, &who, &name).await?;
    let row = s.engine.store.workspace(&name).await.map_err(OpError::from)?.ok_or(OpError::NotFound(name.clone()))?;
    // A script the template does not have would only ever give nothing: say so.
    if let Some(source) = q.source.as_deref().filter(|src| !src.starts_with("provision:")) {
        let scripts: Vec<String> = crate::template::Template::parse(&row.template)
            .map(|t| t.scripts.into_iter().map(|s| s.name).collect())
            .unwrap_or_default();
        if !scripts.iter().any(|n| n == source) {
            let theirs = if scripts.is_empty() {
                "it has none".to_string()
            } else {
                format!("its scripts: {}", scripts.join(", "))
            };
            let source: String = source.chars().take(64).collect();
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!(
                    "workspace '{name}' has no script '{source}' ({theirs}; the provisioner's logs are provision:start, \
                     provision:stop and provision:delete)"
                ),
            ));
        }
    }
    let build = q.build.unwrap_or(row.build);
    if build != row.build && s.engine.store.build_started_at(row.id, build).await.map_err(OpError::from)?.is_none() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "workspace '{name}' has no build {build} (its current build is {}; the coordinator keeps earlier \
                 builds' logs and timings for --keep-builds)",
                row.build
            ),
        ));
    }
    let wait = Duration::from_secs(q.wait.unwrap_or(0)).min(s.engine.config.max_wait);
    let deadline = tokio::time::Instant::now() + wait;
    let id = row.id;
    let mut row = row;
    // A workspace changed since the row was read: `changed()` below marks the change seen as it
    // wakes us, so that wake-up must be remembered here, or the row would never be read again and
    // an end with no new lines (a stop without stop scripts) would wait out the whole poll.
    let mut stale = false;
    loop {
        // Marked seen before the status and the lines are read: a change after that wakes us.
        rx.borrow_and_update();
        if std::mem::take(&mut stale) || changes.has_changed().unwrap_or(false) {
            changes.borrow_and_update();
            row = s
                .engine
                .store
                .workspace_by_id(id)
                .await
                .map_err(OpError::from)?
                .ok_or(OpError::NotFound(name.clone()))?;
        }
        // The status before the lines: a line stored before the workspace ended is in this answer.
        // An earlier build than the current one gets no more lines either.
        let ended = build != row.build
            || match row.status {
                WorkspaceStatus::Stopped | WorkspaceStatus::Deleted => true,
                WorkspaceStatus::Failed => s.engine.agent_connection(id).is_none(),
                _ => false,
            };
        let rows = s.engine.store.logs(id, build, q.after, limit, q.source.as_deref()).await.map_err(OpError::from)?;
        // A shutting-down coordinator answers at once: the client polls again once it is back.
        let done = tokio::time::Instant::now() >= deadline || s.engine.is_shutting_down();
        if !rows.is_empty() || ended || done {
            let next = rows.last().map_or(q.after, |r| r.id);
            // More lines may follow those of a full page.
            let ended = ended && rows.len() < limit as usize;
            return Ok(Json(LogsView { lines: rows.iter().map(LogView::from).collect(), next, build, ended }));
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = rx.changed() => {}
            _ = changes.changed() => stale = true,
        }
    }
}

/// A long wait's answer when the coordinator stops under it (503): ask again once it is back.
const SHUTTING_DOWN: &str = "the coordinator is shutting down; ask again once it is back";

#[derive(Deserialize)]
struct WaitQuery {
    /// Comma-separated statuses.
    #[serde(rename = "for")]
    until: String,
    timeout: Option<u64>,
}

/// Why waiting on `row` for another status is pointless: it is failed, stopped or deleted with no
/// operation under way, and only a new one (`start`, or a new workspace of that name) moves it. An
/// external workspace's agent may be started by hand, which is a start: that one is waited on.
fn settled_elsewhere(row: &WorkspaceRow) -> Option<String> {
    use WorkspaceStatus::*;
    if row.op.is_some() {
        return None;
    }
    let (name, status, reason) = (&row.name, row.status, &row.status_reason);
    match status {
        Deleted => Some(format!("workspace '{name}' is deleted ({reason})")),
        // Created and never started (or its start was cut off before provisioning, which has an
        // op): only a start moves it. An external one's agent starts it by connecting.
        Pending | Failed | Stopped if row.provisioner != "external" => Some(format!(
            "workspace '{name}' is {status} ({reason}); it stays {status} until `tether workspace start {name}`"
        )),
        _ => None,
    }
}

/// Holds the request until the workspace is in one of the given statuses (or the timeout passes),
/// then returns it. 408 on timeout; 409 at once when waiting is pointless ([`settled_elsewhere`]).
async fn wait(
    State(s): State<ApiState>,
    Extension(who): Extension<Identity>,
    Path(name): Path<String>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<WorkspaceView> {
    reach(&s, &who, &name).await?;
    let wanted: Vec<WorkspaceStatus> = q
        .until
        .split(',')
        .map(|w| w.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e: tether_shared::status::UnknownWord| bad(e.to_string()))?;
    let wait = Duration::from_secs(q.timeout.unwrap_or(60)).min(s.engine.config.max_wait);
    let deadline = tokio::time::Instant::now() + wait;
    let mut rx = s.engine.subscribe_changes();
    loop {
        rx.borrow_and_update();
        let row = s.engine.store.workspace_any(&name).await.map_err(OpError::from)?;
        let Some(row) = row else { return Err(OpError::NotFound(name).into()) };
        // The name may have passed to a new workspace (deleted, then created again) while we waited:
        // a user sees only what is theirs.
        if let Identity::User(user) = &who {
            if !s.engine.may_use_row(user, &row).await? {
                return Err(OpError::NotFound(name).into());
            }
        }
        if wanted.contains(&row.status) {
            return Ok(Json(s.engine.view(&row)));
        }
        if let Some(message) = settled_elsewhere(&row) {
            return Err(ApiError(StatusCode::CONFLICT, message));
        }
        if s.engine.is_shutting_down() {
            return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, SHUTTING_DOWN.into()));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError(
                StatusCode::REQUEST_TIMEOUT,
                format!("workspace '{name}' is still {} ({}) after {}s", row.status, row.status_reason, wait.as_secs()),
            ));
        }
        let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
    }
}
