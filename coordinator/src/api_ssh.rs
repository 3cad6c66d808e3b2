//! The API for users, grants, the SSH audit log, and SSH over HTTP.
//!
//! Admin routes manage users and grants. User routes accept a user's API token (or the admin
//! token): `GET /ssh` tells `tether config-ssh` where the front door is and which CA to trust, and
//! `GET /workspaces/{name}/ssh` with `Upgrade: tether-ssh` turns the HTTP connection into a raw
//! byte stream to the workspace's agent, for `ProxyCommand tether ssh --stdio %h`;
//! `GET /workspaces/{name}/ssh/check` tells whether that would be let in, without connecting.
//!
//! That stream has no room for a message of the coordinator's own, so the answer that opens it
//! carries a ticket (`Tether-Ssh-Ticket`), and a connection the coordinator ends (its access was
//! taken away, its agent was lost, the coordinator is shutting down) leaves its reason under that
//! ticket for a minute before the stream closes: `GET /ssh/ended/{ticket}` gives it to the CLI,
//! which prints it, as the front door's SSH disconnect message does for `ssh -J`. The ticket is the
//! only credential it needs, so a client whose token was just replaced still learns why.

use crate::api::{ApiError, ApiState};
use crate::broker::{self, RefusalKind, Request, Via};
use crate::pki;
use crate::users::{AuditView, UserView};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The `Upgrade` protocol name for SSH over the API.
pub const UPGRADE_PROTOCOL: &str = "tether-ssh";

/// The header of the upgrade's answer that names where the connection's end reason will be.
pub const TICKET_HEADER: &str = "tether-ssh-ticket";

/// Why the coordinator ended connections made over the API, by ticket, while their clients may
/// still ask: a minute each, the newest [`EndNotes::CAPACITY`] at most.
#[derive(Debug, Default)]
pub struct EndNotes(Mutex<VecDeque<EndNote>>);

#[derive(Debug)]
struct EndNote {
    at: Instant,
    ticket: String,
    reason: String,
}

impl EndNotes {
    /// More ended connections at once than any client still reading its reason would meet.
    const CAPACITY: usize = 1024;
    const KEEP: Duration = Duration::from_secs(60);

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<EndNote>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn insert(&self, ticket: String, reason: String, now: Instant) {
        let mut notes = self.lock();
        while notes.front().is_some_and(|n| now.duration_since(n.at) > Self::KEEP) || notes.len() >= Self::CAPACITY {
            notes.pop_front();
        }
        notes.push_back(EndNote { at: now, ticket, reason });
    }

    pub fn get(&self, ticket: &str, now: Instant) -> Option<String> {
        self.lock()
            .iter()
            .find(|n| n.ticket == ticket && now.duration_since(n.at) <= Self::KEEP)
            .map(|n| n.reason.clone())
    }
}

/// What `GET /ssh/ended/{ticket}` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct EndedView {
    /// Why the coordinator ended the connection, as its client should be told.
    pub reason: String,
}

/// The routes that need no token: a ticket is its own credential.
pub fn ticket_routes() -> Router<ApiState> {
    Router::new().route("/ssh/ended/{ticket}", get(ssh_ended))
}

/// A ticket as the coordinator makes them: `pki::new_token`'s prefix and 64 hex digits.
const TICKET_PREFIX: &str = "tether_ssh_end";

async fn ssh_ended(State(s): State<ApiState>, Path(ticket): Path<String>) -> ApiResult<EndedView> {
    let well_formed = ticket
        .strip_prefix(TICKET_PREFIX)
        .and_then(|t| t.strip_prefix('_'))
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return Err(ApiError(StatusCode::BAD_REQUEST, "that is not an SSH connection's ticket".into()));
    }
    match s.ssh_ends.get(&ticket, Instant::now()) {
        Some(reason) => Ok(Json(EndedView { reason })),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            "no reason is kept for that connection: it is open, it ended on its own, or it ended over a minute ago"
                .into(),
        )),
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Who a request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Admin,
    User(String),
}

pub fn admin_routes() -> Router<ApiState> {
    Router::new()
        .route("/users", get(list_users).post(add_user))
        .route("/users/{name}", get(show_user).delete(remove_user))
        .route("/users/{name}/keys", post(add_keys))
        .route("/users/{name}/keys/{fingerprint}", delete(remove_key))
        .route("/users/{name}/token", post(user_token))
        .route("/workspaces/{name}/grants", get(grants).post(grant))
        .route("/workspaces/{name}/grants/{user}", delete(revoke))
        .route("/audit", get(audit))
}

pub fn user_routes() -> Router<ApiState> {
    Router::new()
        .route("/ssh", get(ssh_info))
        .route("/workspaces/{name}/ssh", get(ssh_upgrade))
        .route("/workspaces/{name}/ssh/check", get(ssh_check))
}

/// Accepts the admin token or a user's token, and records which in the request.
pub async fn user_auth(
    State(state): State<ApiState>,
    headers: HeaderMap,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = crate::api::bearer(&headers) else {
        return ApiError(StatusCode::UNAUTHORIZED, "missing API token (Authorization: Bearer …)".into())
            .into_response();
    };
    let identity = if pki::hash_token(token) == *state.admin_token_hash {
        Identity::Admin
    } else {
        match state.engine.user_for_token(token).await {
            Ok(Some(user)) => Identity::User(user),
            Ok(None) => return ApiError(StatusCode::UNAUTHORIZED, "the API token is not valid".into()).into_response(),
            Err(e) => return ApiError::from(e).into_response(),
        }
    };
    req.extensions_mut().insert(identity);
    next.run(req).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddUserBody {
    name: String,
    /// Public-key lines, as in an authorized_keys file: one string, or a list of them.
    #[serde(deserialize_with = "key_lines")]
    ssh_keys: String,
}

/// `"ssh_keys"` as authorized_keys text, or as a list of lines (which JSON clients tend to send).
fn key_lines<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Keys {
        Text(String),
        Lines(Vec<String>),
    }
    match Keys::deserialize(d) {
        Ok(Keys::Text(t)) => Ok(t),
        Ok(Keys::Lines(lines)) => Ok(lines.join("\n")),
        Err(_) => Err(serde::de::Error::custom(
            "expected public-key lines: a string (authorized_keys text) or a list of strings",
        )),
    }
}

#[derive(Serialize)]
struct AddedUser {
    user: UserView,
    /// The user's API token, shown once.
    token: String,
}

async fn add_user(
    State(s): State<ApiState>,
    Json(b): Json<AddUserBody>,
) -> Result<(StatusCode, Json<AddedUser>), ApiError> {
    let (user, token) = s.engine.add_user(&b.name, &b.ssh_keys).await?;
    Ok((StatusCode::CREATED, Json(AddedUser { user, token })))
}

async fn list_users(State(s): State<ApiState>) -> ApiResult<Vec<UserView>> {
    Ok(Json(s.engine.users().await?))
}

async fn show_user(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<UserView> {
    Ok(Json(s.engine.user(&name).await?))
}

async fn remove_user(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<serde_json::Value> {
    let disowned = s.engine.remove_user(&name).await?;
    Ok(Json(serde_json::json!({ "removed": name, "workspaces_without_owner": disowned })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysBody {
    #[serde(deserialize_with = "key_lines")]
    ssh_keys: String,
}

async fn add_keys(State(s): State<ApiState>, Path(name): Path<String>, Json(b): Json<KeysBody>) -> ApiResult<UserView> {
    Ok(Json(s.engine.add_user_keys(&name, &b.ssh_keys).await?))
}

async fn remove_key(State(s): State<ApiState>, Path((name, fp)): Path<(String, String)>) -> ApiResult<UserView> {
    Ok(Json(s.engine.remove_user_key(&name, &fp).await?))
}

async fn user_token(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<serde_json::Value> {
    let token = s.engine.rotate_user_token(&name).await?;
    Ok(Json(serde_json::json!({ "user": name, "token": token })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    user: String,
}

#[derive(Serialize)]
struct GrantsView {
    workspace: String,
    owner: Option<String>,
    granted: Vec<String>,
}

async fn grants_view(s: &ApiState, name: &str, granted: Vec<String>) -> ApiResult<GrantsView> {
    let row = s.engine.workspace_row(name).await?;
    Ok(Json(GrantsView { workspace: row.name, owner: row.owner, granted }))
}

async fn grants(State(s): State<ApiState>, Path(name): Path<String>) -> ApiResult<GrantsView> {
    let granted = s.engine.grants(&name).await?;
    grants_view(&s, &name, granted).await
}

async fn grant(State(s): State<ApiState>, Path(name): Path<String>, Json(b): Json<GrantBody>) -> ApiResult<GrantsView> {
    let granted = s.engine.grant(&name, &b.user).await?;
    grants_view(&s, &name, granted).await
}

async fn revoke(State(s): State<ApiState>, Path((name, user)): Path<(String, String)>) -> ApiResult<GrantsView> {
    let granted = s.engine.revoke(&name, &user).await?;
    grants_view(&s, &name, granted).await
}

#[derive(Deserialize)]
struct AuditQuery {
    user: Option<String>,
    workspace: Option<String>,
    limit: Option<i64>,
}

async fn audit(State(s): State<ApiState>, Query(q): Query<AuditQuery>) -> ApiResult<Vec<AuditView>> {
    let limit = crate::api::page_limit(q.limit, 100)?;
    let rows = s.engine.audit(q.user.as_deref(), q.workspace.as_deref(), limit).await?;
    Ok(Json(rows.into_iter().map(AuditView::from).collect()))
}

/// What a client needs to reach workspaces over SSH.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SshInfo {
    /// `HOST:PORT` of the SSH front door, as users should dial it; `None` when it is off.
    pub front_door: Option<String>,
    /// The name the front door's host certificate carries; use it as `HostKeyAlias`.
    pub front_door_alias: String,
    /// Workspace host names are `NAME` plus this.
    pub host_suffix: String,
    /// The line for a known_hosts file that trusts the coordinator's SSH CA.
    pub known_hosts: String,
    /// The user the token belongs to; `None` for the admin token.
    pub user: Option<String>,
}

async fn ssh_info(State(s): State<ApiState>, Extension(id): Extension<Identity>) -> ApiResult<SshInfo> {
    Ok(Json(SshInfo {
        front_door: s.engine.config.ssh_front_door.clone(),
        front_door_alias: s.engine.ssh_ca.names().alias.clone(),
        host_suffix: s.engine.ssh_ca.names().suffix.clone(),
        known_hosts: s.engine.ssh_ca.known_hosts_line(),
        user: match id {
            Identity::User(u) => Some(u),
            Identity::Admin => None,
        },
    }))
}

#[derive(Deserialize)]
struct UpgradeQuery {
    /// With the admin token: act as this user.
    user: Option<String>,
}

/// Who a connection over the API is for: the token's user, or the user the admin token names.
async fn connecting_user(s: &ApiState, id: Identity, asked: Option<String>) -> Result<String, ApiError> {
    match (id, asked) {
        (Identity::User(u), None) => Ok(u),
        (Identity::User(u), Some(other)) if u == other => Ok(u),
        (Identity::User(u), Some(other)) => {
            Err(ApiError(StatusCode::FORBIDDEN, format!("user '{u}' may not connect as '{other}'")))
        }
        // Not a refusal to audit under a user nobody registered.
        (Identity::Admin, Some(u)) => match s.engine.store.user(&u).await {
            Ok(Some(_)) => Ok(u),
            Ok(None) => Err(ApiError(StatusCode::NOT_FOUND, format!("no user '{u}'"))),
            Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("coordinator error: {e}"))),
        },
        (Identity::Admin, None) => Err(ApiError(
            StatusCode::BAD_REQUEST,
            "the admin token connects as a user: name one (`tether ssh --as USER`, or ?user=NAME)".into(),
        )),
    }
}

fn refused(refusal: broker::Refusal) -> ApiError {
    let code = match refusal.kind {
        RefusalKind::NotFound => StatusCode::NOT_FOUND,
        RefusalKind::Forbidden => StatusCode::FORBIDDEN,
        RefusalKind::Unavailable => StatusCode::CONFLICT,
        RefusalKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(code, refusal.message)
}

/// What `GET /workspaces/{name}/ssh/check` answers when a connection would be let in.
#[derive(Debug, Serialize, Deserialize)]
pub struct SshCheckView {
    pub workspace: String,
    pub user: String,
}

/// Whether a connection to the workspace would be let in now, without making one: 200, or the
/// refusal it would get with the same status code (logged and audited as the connection's would be).
async fn ssh_check(
    State(s): State<ApiState>,
    Extension(id): Extension<Identity>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    Query(q): Query<UpgradeQuery>,
) -> ApiResult<SshCheckView> {
    let user = connecting_user(&s, id, q.user).await?;
    let request = Request {
        user: user.clone(),
        target: name,
        via: Via::Api,
        peer: peer.to_string(),
        key_fingerprint: None,
        token_hash: None,
        client_gone: None,
    };
    let workspace = broker::check(&s.engine, &request).await.map_err(refused)?;
    Ok(Json(SshCheckView { workspace, user }))
}

/// Turns the connection into a byte stream to the workspace's agent (HTTP 101), after the same
/// checks as the front door.
async fn ssh_upgrade(
    State(s): State<ApiState>,
    Extension(id): Extension<Identity>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    Query(q): Query<UpgradeQuery>,
    mut req: axum::extract::Request,
) -> Response {
    let wants_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(UPGRADE_PROTOCOL));
    if !wants_upgrade {
        return ApiError(
            StatusCode::UPGRADE_REQUIRED,
            format!("this endpoint carries SSH: send `Connection: upgrade` and `Upgrade: {UPGRADE_PROTOCOL}`"),
        )
        .into_response();
    }
    // What let it in, so that replacing the token ends the connection.
    let token_hash = match id {
        Identity::User(_) => crate::api::bearer(req.headers()).map(crate::pki::hash_token),
        Identity::Admin => None,
    };
    let user = match connecting_user(&s, id, q.user).await {
        Ok(u) => u,
        Err(e) => return e.into_response(),
    };
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return ApiError(StatusCode::BAD_REQUEST, "this connection cannot be upgraded (HTTP/1.1 only)".into())
            .into_response();
    };
    // The HTTP listener's per-address and total connection caps bound the requests that wait.
    let request = Request {
        user,
        target: name,
        via: Via::Api,
        peer: peer.to_string(),
        key_fingerprint: None,
        token_hash,
        client_gone: None,
    };
    let brokered = match broker::open(&s.engine, request).await {
        Ok(b) => b,
        Err(refusal) => {
            return refused(refusal).into_response();
        }
    };
    // The upgraded connection carries an SSH session, whose client may stop reading for as long as
    // it likes (suspended, say): lift the listener's write deadline.
    if let Some(upgrading) = req.extensions().get::<crate::https::Upgrading>() {
        upgrading.set();
    }
    let ticket = pki::new_token(TICKET_PREFIX);
    let ends = s.ssh_ends.clone();
    let kept = ticket.clone();
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut stream = hyper_util::rt::TokioIo::new(upgraded);
                // The reason is kept before the stream closes, so the client finds it when it asks.
                if let Some(why) = brokered.splice(&mut stream).await {
                    ends.insert(kept, why, Instant::now());
                }
                drop(stream);
            }
            Err(e) => {
                tracing::debug!(error = %e, "ssh upgrade did not complete");
                brokered.abandon(&format!("upgrade failed: {e}")).await;
            }
        }
    });
    let mut resp = StatusCode::SWITCHING_PROTOCOLS.into_response();
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut().insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    if let Ok(v) = HeaderValue::from_str(&ticket) {
        resp.headers_mut().insert(TICKET_HEADER, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_notes_keep_a_minute_and_the_newest_at_most() {
        let notes = EndNotes::default();
        let t0 = Instant::now();
        notes.insert("a".into(), "why a".into(), t0);
        assert_eq!(notes.get("a", t0 + Duration::from_secs(59)).as_deref(), Some("why a"));
        assert_eq!(notes.get("b", t0), None);
        assert_eq!(notes.get("a", t0 + Duration::from_secs(61)), None, "expired");
        for i in 0..EndNotes::CAPACITY + 10 {
            notes.insert(format!("n{i}"), format!("why {i}"), t0);
        }
        assert_eq!(notes.lock().len(), EndNotes::CAPACITY);
        assert_eq!(notes.get("n0", t0), None, "the oldest made room");
        assert_eq!(
            notes.get(&format!("n{}", EndNotes::CAPACITY + 9), t0).as_deref(),
            Some(&*format!("why {}", EndNotes::CAPACITY + 9))
        );
        // A later insert drops the expired ones first.
        notes.insert("late".into(), "why late".into(), t0 + Duration::from_secs(120));
        assert_eq!(notes.lock().len(), 1);
    }
}
