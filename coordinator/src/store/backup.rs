//! The database side of backup and restore: an online snapshot, and the checks a restored copy must
//! pass before a coordinator may start on it.

use super::{Result, Store, MIGRATIONS};
use std::path::Path;

impl Store {
    /// Writes a consistent copy of the database to `path` (which must not exist) while the
    /// coordinator keeps running: `VACUUM INTO` reads one snapshot, so writers are not blocked and a
    /// transaction is either wholly in the copy or not at all.
    pub async fn snapshot_into(&self, path: &Path) -> Result<()> {
        sqlx::query("VACUUM INTO $1").bind(path.to_string_lossy().into_owned()).execute(&self.pool).await?;
        Ok(())
    }

    /// The schema version this database is at.
    pub async fn schema_version(&self) -> Result<i64> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM schema_version").fetch_one(&self.pool).await?;
        Ok(v.unwrap_or(0))
    }

    /// SQLite's own consistency check: `None` when the file is sound, otherwise what is wrong.
    pub async fn quick_check(&self) -> Result<Option<String>> {
        let rows: Vec<String> = sqlx::query_scalar("PRAGMA quick_check").fetch_all(&self.pool).await?;
        if rows.len() == 1 && rows[0] == "ok" {
            return Ok(None);
        }
        Ok(Some(rows.into_iter().take(5).collect::<Vec<_>>().join("; ")))
    }
}

/// The newest schema version this build knows.
pub fn known_schema_version() -> i64 {
    MIGRATIONS.len() as i64
}
