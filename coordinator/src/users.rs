//! Users, their SSH keys and API tokens, workspace grants, and the audit log: the engine's
//! operations behind `tether user`, `tether workspace grant` and `tether audit`.

use crate::broker::Credential;
use crate::engine::{Engine, OpError};
use crate::pki;
use crate::sshca;
use crate::store::{AuditRow, StoreError, UserRow};
use crate::template::check_name;
use serde::{Deserialize, Serialize};
use tether_shared::{limits, now_ms};
use tracing::info;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserView {
    pub name: String,
    /// RFC 3339, as every time in the API; `created_at_ms` is the same in Unix milliseconds.
    #[serde(default)]
    pub created_at: String,
    pub created_at_ms: i64,
    pub keys: Vec<KeyView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyView {
    pub fingerprint: String,
    pub public_key: String,
}

impl From<UserRow> for UserView {
    fn from(u: UserRow) -> Self {
        UserView {
            name: u.name,
            created_at: crate::view::rfc3339(u.created_at),
            created_at_ms: u.created_at,
            keys: u.keys.into_iter().map(|(fingerprint, public_key)| KeyView { fingerprint, public_key }).collect(),
        }
    }
}

/// One brokered SSH connection or refusal from the audit log, with its times in RFC 3339 as well
/// (`started_at`, `ended_at`), as every time in the API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditView {
    #[serde(flatten)]
    pub row: AuditRow,
    #[serde(default)]
    pub started_at: String,
    #[serde(default)]
    pub ended_at: Option<String>,
}

impl From<AuditRow> for AuditView {
    fn from(row: AuditRow) -> Self {
        let started_at = crate::view::rfc3339(row.started_at);
        let ended_at = row.ended_at.map(crate::view::rfc3339);
        AuditView { row, started_at, ended_at }
    }
}

fn store_err(e: StoreError) -> OpError {
    match e {
        StoreError::Conflict(m) => OpError::Conflict(m),
        StoreError::Missing(m) => OpError::Missing(m),
        e => OpError::Store(e),
    }
}

/// Parses public-key lines (one per line, `#` comments and blanks skipped) into `(fingerprint, line)`.
/// Every bad line is reported, with its number.
pub fn parse_keys(text: &str) -> Result<Vec<(String, String)>, OpError> {
    // A private key file: one message, not one per line of it.
    if text.trim_start().starts_with("-----BEGIN") {
        return Err(OpError::Invalid(sshca::PRIVATE_KEY_GIVEN.into()));
    }
    let mut keys = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match sshca::parse_public_key(line) {
            Ok(key) => {
                let fp = sshca::fingerprint(&key);
                if !keys.iter().any(|(f, _)| f == &fp) {
                    keys.push((fp, key.to_openssh().unwrap_or_else(|_| line.to_string())));
                }
            }
            Err(e) => errors.push(format!("key line {}: {e}", i + 1)),
        }
    }
    if !errors.is_empty() {
        return Err(OpError::Invalid(errors.join("; ")));
    }
    if keys.is_empty() {
        return Err(OpError::Invalid("no SSH public key given".into()));
    }
    if keys.len() > limits::MAX_SSH_KEYS {
        return Err(OpError::Invalid(format!("{} keys, over the limit of {}", keys.len(), limits::MAX_SSH_KEYS)));
    }
    Ok(keys)
}

impl Engine {
    /// Adds a user with SSH keys; returns the user and their API token (shown once).
    pub async fn add_user(&self, name: &str, keys_text: &str) -> Result<(UserView, String), OpError> {
        check_name("user", name).map_err(OpError::Invalid)?;
        let keys = parse_keys(keys_text)?;
        let token = pki::new_token("tether_user");
        let row = self.store.add_user(name, &keys, &pki::hash_token(&token), now_ms()).await.map_err(store_err)?;
        info!(user = name, keys = keys.len(), "user added");
        Ok((row.into(), token))
    }

    pub async fn add_user_keys(&self, name: &str, keys_text: &str) -> Result<UserView, OpError> {
        let keys = parse_keys(keys_text)?;
        let row = self.store.add_user_keys(name, &keys, now_ms()).await.map_err(store_err)?;
        info!(user = name, keys = keys.len(), "user keys added");
        Ok(row.into())
    }

    pub async fn remove_user_key(&self, name: &str, fingerprint: &str) -> Result<UserView, OpError> {
        if !self.store.remove_user_key(name, fingerprint).await? {
            return Err(OpError::Missing(format!("user '{name}' has no key {fingerprint}")));
        }
        let ended = self.end_ssh(
            |u, _, with| u == name && matches!(with, Credential::Key(k) if k == fingerprint),
            "the key was removed",
        );
        info!(user = name, key = fingerprint, ssh_connections_ended = ended, "ssh key removed");
        self.user(name).await
    }

    /// Removes a user; returns the live workspaces they owned, now without an owner.
    pub async fn remove_user(&self, name: &str) -> Result<Vec<String>, OpError> {
        let Some(disowned) = self.store.remove_user(name).await? else {
            return Err(OpError::Missing(format!("no user '{name}'")));
        };
        let ended = self.end_ssh(|u, _, _| u == name, "the user was removed");
        info!(user = name, workspaces_without_owner = ?disowned, ssh_connections_ended = ended, "user removed");
        Ok(disowned)
    }

    /// Issues a new API token for a user; the old one stops working, and the `tether ssh`
    /// connections made with it end.
    pub async fn rotate_user_token(&self, name: &str) -> Result<String, OpError> {
        let token = pki::new_token("tether_user");
        if !self.store.set_user_token(name, &pki::hash_token(&token)).await? {
            return Err(OpError::Missing(format!("no user '{name}'")));
        }
        // `tether ssh` connections were let in by the old token (the front door's by a key).
        let ended = self.end_ssh(
            |u, _, with| u == name && matches!(with, Credential::UserToken(_)),
            "the user's API token was replaced",
        );
        info!(user = name, ssh_connections_ended = ended, "api token replaced");
        Ok(token)
    }

    pub async fn user(&self, name: &str) -> Result<UserView, OpError> {
        Ok(self.store.user(name).await?.ok_or_else(|| OpError::Missing(format!("no user '{name}'")))?.into())
    }

    pub async fn users(&self) -> Result<Vec<UserView>, OpError> {
        Ok(self.store.users().await?.into_iter().map(Into::into).collect())
    }

    /// The user an API token belongs to.
    pub async fn user_for_token(&self, token: &str) -> Result<Option<String>, OpError> {
        Ok(self.store.user_by_token(&pki::hash_token(token)).await?)
    }

    pub async fn grant(&self, workspace: &str, user: &str) -> Result<Vec<String>, OpError> {
        let row = self.workspace_row(workspace).await?;
        if row.owner.as_deref() == Some(user) {
            // The owner has access already; a grant beside it would only be listed as if it mattered.
            return Ok(self.store.grants(row.id).await?);
        }
        // The store checks that the user exists, in the transaction that grants ("no user 'x'").
        self.store.grant(row.id, user, now_ms()).await.map_err(store_err)?;
        info!(workspace, user, "access granted");
        Ok(self.store.grants(row.id).await?)
    }

    pub async fn revoke(&self, workspace: &str, user: &str) -> Result<Vec<String>, OpError> {
        let row = self.workspace_row(workspace).await?;
        let owner = row.owner.as_deref() == Some(user);
        if !self.store.revoke(row.id, user).await? {
            return Err(OpError::Missing(if owner {
                format!("user '{user}' owns workspace '{workspace}' and has no grant on it: an owner's access is not taken back")
            } else {
                format!("user '{user}' has no grant on workspace '{workspace}'")
            }));
        }
        let ended = if owner { 0 } else { self.end_ssh(|u, w, _| u == user && w == workspace, "access was revoked") };
        info!(workspace, user, ssh_connections_ended = ended, "access revoked");
        Ok(self.store.grants(row.id).await?)
    }

    pub async fn grants(&self, workspace: &str) -> Result<Vec<String>, OpError> {
        let row = self.workspace_row(workspace).await?;
        Ok(self.store.grants(row.id).await?)
    }

    pub async fn audit(
        &self,
        user: Option<&str>,
        workspace: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AuditRow>, OpError> {
        Ok(self.store.audit(user, workspace, limit.clamp(1, 10_000)).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_checked_line_by_line() {
        let a = sshca::new_ed25519("a").public_key().to_openssh().unwrap();
        let b = sshca::new_ed25519("b").public_key().to_openssh().unwrap();
        let keys = parse_keys(&format!("# mine\n{a}\n\n{b}\n{a}\n")).unwrap();
        assert_eq!(keys.len(), 2);
        let err = parse_keys(&format!("{a}\nssh-ed25519 AAAAnope\nhello\n")).unwrap_err().to_string();
        assert!(err.contains("key line 2") && err.contains("key line 3"), "{err}");
        assert!(parse_keys("\n# nothing\n").unwrap_err().to_string().contains("no SSH public key"));
        let private =
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
        assert_eq!(
            parse_keys(private).unwrap_err().to_string(),
            "this is a private key; give the public key (the .pub file)"
        );
    }
}
