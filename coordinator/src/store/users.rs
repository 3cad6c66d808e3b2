//! Users, their SSH keys, workspace grants and the SSH audit log.

use super::{Result, Store, StoreError};
use sqlx::Row;

#[derive(Debug, Clone)]
pub struct UserRow {
    pub id: i64,
    pub name: String,
    pub created_at: i64,
    /// `(fingerprint, public key line)`, oldest first.
    pub keys: Vec<(String, String)>,
}

/// One brokered SSH connection or refusal, as the audit API returns it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AuditRow {
    pub id: i64,
    pub user: String,
    pub workspace: String,
    pub via: String,
    pub peer: String,
    pub key_fingerprint: Option<String>,
    #[serde(rename = "started_at_ms")]
    pub started_at: i64,
    #[serde(rename = "ended_at_ms")]
    pub ended_at: Option<i64>,
    pub bytes_up: i64,
    pub bytes_down: i64,
    pub outcome: String,
}

impl Store {
    /// Adds a user with keys `(fingerprint, line)` and an API token hash, all or nothing.
    pub async fn add_user(&self, name: &str, keys: &[(String, String)], token_hash: &str, now: i64) -> Result<UserRow> {
        let mut tx = self.write_tx().await?;
        if user_id(&mut tx, name).await?.is_some() {
            return Err(StoreError::Conflict(format!("a user named '{name}' already exists")));
        }
        let id: i64 =
            sqlx::query_scalar("INSERT INTO users (name, token_hash, created_at) VALUES ($1, $2, $3) RETURNING id")
                .bind(name)
                .bind(token_hash)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
        insert_keys(&mut tx, id, keys, now).await?;
        tx.commit().await?;
        self.user(name).await?.ok_or(StoreError::Db(sqlx::Error::RowNotFound))
    }

    /// Adds keys to an existing user.
    pub async fn add_user_keys(&self, name: &str, keys: &[(String, String)], now: i64) -> Result<UserRow> {
        let mut tx = self.write_tx().await?;
        let id = user_id(&mut tx, name).await?.ok_or_else(|| StoreError::Missing(format!("no user '{name}'")))?;
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM user_keys WHERE user_id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        if count as usize + keys.len() > tether_shared::limits::MAX_SSH_KEYS {
            return Err(StoreError::Conflict(format!(
                "user '{name}' would have {} keys, over the limit of {}",
                count as usize + keys.len(),
                tether_shared::limits::MAX_SSH_KEYS
            )));
        }
        insert_keys(&mut tx, id, keys, now).await?;
        tx.commit().await?;
        self.user(name).await?.ok_or(StoreError::Db(sqlx::Error::RowNotFound))
    }

    pub async fn remove_user_key(&self, name: &str, fingerprint: &str) -> Result<bool> {
        let done = sqlx::query(
            "DELETE FROM user_keys WHERE fingerprint = $1 AND user_id = (SELECT id FROM users WHERE name = $2)",
        )
        .bind(fingerprint)
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Removes a user, their keys and their grants, and takes their name off the workspaces they
    /// own (deleted ones included), so that a later user of the same name inherits nothing. `None`
    /// if there is no such user; else the names of the live workspaces left without an owner.
    pub async fn remove_user(&self, name: &str) -> Result<Option<Vec<String>>> {
        let mut tx = self.write_tx().await?;
        let disowned: Vec<String> =
            sqlx::query_scalar("SELECT name FROM workspaces WHERE owner = $1 AND status <> 'deleted' ORDER BY name")
                .bind(name)
                .fetch_all(&mut *tx)
                .await?;
        sqlx::query("UPDATE workspaces SET owner = NULL WHERE owner = $1").bind(name).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM grants WHERE user_name = $1").bind(name).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM user_keys WHERE user_id = (SELECT id FROM users WHERE name = $1)")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM users WHERE name = $1").bind(name).execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            // Nothing to undo: with no such user there was no owner of that name to take off either
            // (an owner is a user when the workspace is created).
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(disowned))
    }

    pub async fn set_user_token(&self, name: &str, token_hash: &str) -> Result<bool> {
        let done = sqlx::query("UPDATE users SET token_hash = $1 WHERE name = $2")
            .bind(token_hash)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub async fn user(&self, name: &str) -> Result<Option<UserRow>> {
        let Some(row) = sqlx::query("SELECT id, name, created_at FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        self.user_with_keys(&row).await.map(Some)
    }

    pub async fn users(&self) -> Result<Vec<UserRow>> {
        let rows = sqlx::query("SELECT id, name, created_at FROM users ORDER BY name").fetch_all(&self.pool).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(self.user_with_keys(row).await?);
        }
        Ok(out)
    }

    async fn user_with_keys(&self, row: &sqlx::sqlite::SqliteRow) -> Result<UserRow> {
        let id: i64 = row.try_get("id")?;
        let keys = sqlx::query("SELECT fingerprint, public_key FROM user_keys WHERE user_id = $1 ORDER BY id")
            .bind(id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|k| Ok((k.try_get("fingerprint")?, k.try_get("public_key")?)))
            .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?;
        Ok(UserRow { id, name: row.try_get("name")?, created_at: row.try_get("created_at")?, keys })
    }

    /// The user a key belongs to.
    pub async fn user_by_key(&self, fingerprint: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(
            "SELECT u.name FROM users u JOIN user_keys k ON k.user_id = u.id WHERE k.fingerprint = $1",
        )
        .bind(fingerprint)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn user_by_token(&self, token_hash: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT name FROM users WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Grants `user` access to a workspace. The user must exist in the same transaction, so a user
    /// removed meanwhile leaves no grant behind for a later user of that name to inherit.
    pub async fn grant(&self, workspace_id: i64, user: &str, now: i64) -> Result<()> {
        let mut tx = self.write_tx().await?;
        if user_id(&mut tx, user).await?.is_none() {
            return Err(StoreError::Missing(format!("no user '{user}'")));
        }
        sqlx::query(
            "INSERT INTO grants (workspace_id, user_name, granted_at) VALUES ($1, $2, $3)
             ON CONFLICT (workspace_id, user_name) DO NOTHING",
        )
        .bind(workspace_id)
        .bind(user)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn revoke(&self, workspace_id: i64, user: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM grants WHERE workspace_id = $1 AND user_name = $2")
            .bind(workspace_id)
            .bind(user)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The ids of the workspaces granted to `user`.
    pub async fn granted_to(&self, user: &str) -> Result<std::collections::BTreeSet<i64>> {
        let ids: Vec<i64> = sqlx::query_scalar("SELECT workspace_id FROM grants WHERE user_name = $1")
            .bind(user)
            .fetch_all(&self.pool)
            .await?;
        Ok(ids.into_iter().collect())
    }

    pub async fn grants(&self, workspace_id: i64) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar("SELECT user_name FROM grants WHERE workspace_id = $1 ORDER BY user_name")
            .bind(workspace_id)
            .fetch_all(&self.pool)
            .await?)
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn audit_start(
        &self,
        user: &str,
        workspace: &str,
        via: &str,
        peer: &str,
        key_fingerprint: Option<&str>,
        outcome: &str,
        now: i64,
    ) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "INSERT INTO ssh_connections (user_name, workspace_name, via, peer, key_fingerprint, started_at, outcome)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        )
        .bind(user)
        .bind(workspace)
        .bind(via)
        .bind(peer)
        .bind(key_fingerprint)
        .bind(now)
        .bind(outcome)
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn audit_end(&self, id: i64, bytes_up: u64, bytes_down: u64, outcome: &str, now: i64) -> Result<()> {
        sqlx::query(
            "UPDATE ssh_connections SET ended_at = $1, bytes_up = $2, bytes_down = $3, outcome = $4 WHERE id = $5",
        )
        .bind(now)
        .bind(bytes_up as i64)
        .bind(bytes_down as i64)
        .bind(outcome)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes connections that ended before `before` (Unix ms), `batch` rows per statement.
    /// Returns how many went.
    pub async fn purge_audit(&self, before: i64, batch: i64) -> Result<u64> {
        const ENDED: &str = "DELETE FROM ssh_connections WHERE id IN
             (SELECT id FROM ssh_connections WHERE ended_at IS NOT NULL AND ended_at < $1 LIMIT $2)";
        self.delete_in_batches(ENDED, before, batch).await
    }

    /// Ends the connections a previous run of the coordinator left open: it brokered them in its
    /// own process, so they ended when it did. Returns how many there were.
    pub async fn end_stale_audit(&self, now: i64) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE ssh_connections SET ended_at = $1, outcome = 'ended: the coordinator stopped' WHERE ended_at IS NULL",
        )
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Audit rows, newest first.
    pub async fn audit(&self, user: Option<&str>, workspace: Option<&str>, limit: i64) -> Result<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT * FROM ssh_connections WHERE ($1 IS NULL OR user_name = $1) AND ($2 IS NULL OR workspace_name = $2)
             ORDER BY id DESC LIMIT $3",
        )
        .bind(user)
        .bind(workspace)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditRow {
                    id: r.try_get("id")?,
                    user: r.try_get("user_name")?,
                    workspace: r.try_get("workspace_name")?,
                    via: r.try_get("via")?,
                    peer: r.try_get("peer")?,
                    key_fingerprint: r.try_get("key_fingerprint")?,
                    started_at: r.try_get("started_at")?,
                    ended_at: r.try_get("ended_at")?,
                    bytes_up: r.try_get("bytes_up")?,
                    bytes_down: r.try_get("bytes_down")?,
                    outcome: r.try_get("outcome")?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

async fn insert_keys(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    user_id: i64,
    keys: &[(String, String)],
    now: i64,
) -> Result<()> {
    for (fingerprint, line) in keys {
        let owner: Option<String> = sqlx::query_scalar(
            "SELECT u.name FROM users u JOIN user_keys k ON k.user_id = u.id WHERE k.fingerprint = $1",
        )
        .bind(fingerprint)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(owner) = owner {
            return Err(StoreError::Conflict(format!("key {fingerprint} is already registered to user '{owner}'")));
        }
        sqlx::query("INSERT INTO user_keys (user_id, fingerprint, public_key, added_at) VALUES ($1, $2, $3, $4)")
            .bind(user_id)
            .bind(fingerprint)
            .bind(line)
            .bind(now)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// The id of the user called `name`, read in `tx`, so a check and the write that depends on it
/// cannot be split by a `remove_user`.
pub(super) async fn user_id(tx: &mut sqlx::SqliteConnection, name: &str) -> Result<Option<i64>> {
    Ok(sqlx::query_scalar("SELECT id FROM users WHERE name = $1").bind(name).fetch_optional(tx).await?)
}
