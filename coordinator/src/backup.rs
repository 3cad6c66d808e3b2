//! Backup and restore of a coordinator's state: `tether admin backup FILE` asks the running
//! coordinator for a consistent snapshot, `tether admin restore FILE` puts one into a data directory.
//!
//! A backup is a plain tar file, so an operator can list or unpack it without tether. Its first entry
//! is `MANIFEST.json` (format, versions, and the size and SHA-256 of every other entry); then the
//! database snapshot and the key files a restored coordinator needs to be the same coordinator: the
//! TLS CA that agents pin, the tunnel certificate, the SSH CA that users trust, the front door's
//! host key, the QUIC reset key and the admin token. Without those, every agent and user would have
//! to be re-enrolled, so one file restores everything.

use crate::api::{ApiError, ApiState};
use crate::client::Client;
use crate::store::{self, Store};
use anyhow::{bail, Context};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use clap::Subcommand;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "tether-backup";
pub const FORMAT_VERSION: u32 = 1;
const MANIFEST: &str = "MANIFEST.json";
const DB_FILE: &str = "tether.db";
/// Files of the data directory that travel with the database. `coordinator.json` does not: it is
/// rewritten at every start.
const KEY_FILES: &[&str] = &[
    "ca.pem",
    "ca-key.pem",
    "tunnel.pem",
    "tunnel-key.pem",
    "quic-reset.key",
    "ssh-ca.key",
    "ssh-frontdoor.key",
    crate::server::ADMIN_TOKEN_FILE,
];
/// Files SQLite keeps beside the database; a stale one would be replayed into a restored database.
const DB_SIDE_FILES: &[&str] = &["tether.db-wal", "tether.db-shm", "tether.db-journal"];
const MAX_MANIFEST: u64 = 64 * 1024;
const MAX_KEY_FILE: u64 = 1 << 20;
/// A bound on what a restore writes; far above any real coordinator's database.
const MAX_DB: u64 = 1 << 40;

#[derive(Subcommand, Debug)]
pub enum AdminCmd {
    /// Write a consistent backup of the running coordinator (database and keys) to FILE.
    Backup {
        /// Where to write the backup (a tar file, mode 0600: it holds private keys).
        file: PathBuf,
    },
    /// Restore a backup into the data directory named with --data-dir (or TETHER_DATA_DIR; no
    /// coordinator may be running on it); then `tether serve --data-dir DIR` starts from it.
    Restore {
        /// The backup to restore (a tar file written by `tether admin backup`).
        file: PathBuf,
        /// Replace a database and keys already in the data directory (they are moved to
        /// `DIR/replaced-TIME/`, not deleted).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Store(#[from] store::StoreError),
    #[error("{file} is not a tether backup: {why}")]
    NotBackup { file: PathBuf, why: String },
    #[error("{file} is damaged or truncated: {why}")]
    Damaged { file: PathBuf, why: String },
    #[error("{file} is a backup of format version {found}, newer than this tether reads ({known}); upgrade tether")]
    FormatTooNew { file: PathBuf, found: u32, known: u32 },
    #[error("{file} holds database schema version {found}, newer than this tether knows ({known}); upgrade tether")]
    SchemaTooNew { file: PathBuf, found: i64, known: i64 },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BackupError + '_ {
    move |source| BackupError::Io { path: path.to_path_buf(), source }
}

/// What a backup holds, written as its first entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub tether_version: String,
    pub schema_version: i64,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    pub files: Vec<ManifestFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// Copies `r` to `w`, returning the byte count and the SHA-256.
fn copy_hashed(r: &mut impl Read, w: &mut impl Write) -> io::Result<(u64, String)> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            return Ok((n, hex::encode(hash.finalize())));
        }
        hash.update(&buf[..k]);
        w.write_all(&buf[..k])?;
        n += k as u64;
    }
}

/// Writes a backup of `data_dir` as a tar file in a private scratch directory there, and returns it
/// open for reading. The file is already unlinked, so nothing is left behind however the caller ends.
pub async fn make(store: &Store, data_dir: &Path) -> Result<fs::File, BackupError> {
    let scratch = tempfile::Builder::new().prefix(".backup-").tempdir_in(data_dir).map_err(io_err(data_dir))?;
    let db = scratch.path().join(DB_FILE);
    store.snapshot_into(&db).await?;
    let schema_version = store.schema_version().await?;
    let data_dir = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut keys = Vec::new();
        for name in KEY_FILES {
            let path = data_dir.join(name);
            match fs::read(&path) {
                Ok(bytes) => keys.push((*name, bytes)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        let (db_size, db_sha) =
            copy_hashed(&mut fs::File::open(&db).map_err(io_err(&db))?, &mut io::sink()).map_err(io_err(&db))?;
        let mut files = vec![ManifestFile { name: DB_FILE.into(), size: db_size, sha256: db_sha }];
        files.extend(keys.iter().map(|(name, bytes)| ManifestFile {
            name: name.to_string(),
            size: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
        }));
        let manifest = Manifest {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            tether_version: env!("CARGO_PKG_VERSION").into(),
            schema_version,
            created_at: tether_shared::now_ms(),
            files,
        };
        let manifest = serde_json::to_vec_pretty(&manifest).map_err(|e| io_err(&db)(e.into()))?;

        let tar_path = scratch.path().join("backup.tar");
        let out = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tar_path)
            .map_err(io_err(&tar_path))?;
        let mut tar = tar::Builder::new(io::BufWriter::new(out));
        let mtime = (tether_shared::now_ms() / 1000) as u64;
        let header = |size: u64, mode: u32| {
            let mut h = tar::Header::new_gnu();
            h.set_size(size);
            h.set_mode(mode);
            h.set_mtime(mtime);
            h.set_entry_type(tar::EntryType::Regular);
            h
        };
        let add = |tar: &mut tar::Builder<_>, name: &str, size: u64, mode: u32, r: &mut dyn Read| {
            tar.append_data(&mut header(size, mode), name, r).map_err(io_err(&tar_path))
        };
        add(&mut tar, MANIFEST, manifest.len() as u64, 0o644, &mut manifest.as_slice())?;
        add(&mut tar, DB_FILE, db_size, 0o600, &mut fs::File::open(&db).map_err(io_err(&db))?)?;
        for (name, bytes) in &keys {
            add(&mut tar, name, bytes.len() as u64, mode_of(name), &mut bytes.as_slice())?;
        }
        let out = tar.into_inner().map_err(io_err(&tar_path))?;
        let mut out = out.into_inner().map_err(|e| io_err(&tar_path)(e.into_error()))?;
        io::Seek::rewind(&mut out).map_err(io_err(&tar_path))?;
        // Dropping `scratch` removes the snapshot and unlinks the tar; the open handle still reads it.
        drop(scratch);
        Ok(out)
    })
    .await
    .map_err(|e| BackupError::Io { path: "backup task".into(), source: io::Error::other(e) })?
}

/// The CA certificate is public (agents and users need it); every other file is private.
fn mode_of(name: &str) -> u32 {
    if name == "ca.pem" {
        0o644
    } else {
        0o600
    }
}

/// Reads a backup, checking every entry against the manifest. With `into`, writes the files there
/// (an empty directory); without, only checks. Returns the manifest.
pub fn unpack(file: &Path, into: Option<&Path>) -> Result<Manifest, BackupError> {
    let not_backup = |why: String| BackupError::NotBackup { file: file.to_path_buf(), why };
    let damaged = |why: String| BackupError::Damaged { file: file.to_path_buf(), why };
    let f = fs::File::open(file).map_err(io_err(file))?;
    let len = f.metadata().map_err(io_err(file))?.len();
    if len < 1024 {
        return Err(not_backup(format!("it is {len} bytes, too short for a tar archive")));
    }
    let mut archive = tar::Archive::new(io::BufReader::new(f));
    let mut entries = archive.entries().map_err(|e| not_backup(e.to_string()))?;

    let mut first = match entries.next() {
        None => return Err(not_backup("it holds no entries".into())),
        Some(Err(e)) => return Err(not_backup(format!("not a tar archive ({e})"))),
        Some(Ok(e)) => e,
    };
    let first_name = first.path_bytes().into_owned();
    if first_name != MANIFEST.as_bytes() {
        return Err(not_backup(format!(
            "its first entry is '{}', not {MANIFEST}",
            String::from_utf8_lossy(&first_name)
        )));
    }
    if first.size() > MAX_MANIFEST {
        return Err(not_backup(format!("{MANIFEST} is {} bytes, over the limit of {MAX_MANIFEST}", first.size())));
    }
    let mut text = Vec::new();
    first.read_to_end(&mut text).map_err(|e| damaged(format!("reading {MANIFEST}: {e}")))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| not_backup(format!("{MANIFEST} does not parse: {e}")))?;
    if manifest.format != FORMAT {
        return Err(not_backup(format!("{MANIFEST} says format '{}', not '{FORMAT}'", manifest.format)));
    }
    if manifest.version > FORMAT_VERSION {
        return Err(BackupError::FormatTooNew {
            file: file.to_path_buf(),
            found: manifest.version,
            known: FORMAT_VERSION,
        });
    }
    let known = store::known_schema_version();
    if manifest.schema_version > known {
        return Err(BackupError::SchemaTooNew { file: file.to_path_buf(), found: manifest.schema_version, known });
    }
    let mut expected = BTreeSet::new();
    for m in &manifest.files {
        let limit = if m.name == DB_FILE {
            MAX_DB
        } else if KEY_FILES.contains(&m.name.as_str()) {
            MAX_KEY_FILE
        } else {
            return Err(not_backup(format!("{MANIFEST} lists an unknown file '{}'", m.name)));
        };
        if m.size > limit {
            return Err(not_backup(format!(
                "{MANIFEST} says {} is {} bytes, over the limit of {limit}",
                m.name, m.size
            )));
        }
        if !expected.insert(m.name.as_str()) {
            return Err(not_backup(format!("{MANIFEST} lists {} twice", m.name)));
        }
    }
    if !expected.contains(DB_FILE) {
        return Err(not_backup(format!("{MANIFEST} lists no {DB_FILE}")));
    }
    drop(first);

    let mut seen = BTreeSet::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| damaged(format!("after {} of {} files: {e}", seen.len(), expected.len())))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some(m) = manifest.files.iter().find(|m| m.name == name) else {
            return Err(damaged(format!("it holds '{name}', which {MANIFEST} does not list")));
        };
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(damaged(format!("'{name}' is not a regular file")));
        }
        if !seen.insert(m.name.as_str()) {
            return Err(damaged(format!("it holds '{name}' twice")));
        }
        if entry.size() != m.size {
            return Err(damaged(format!("'{name}' is {} bytes, {MANIFEST} says {}", entry.size(), m.size)));
        }
        let (n, sha) = match into {
            Some(dir) => {
                let path = dir.join(&m.name);
                let mut out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode_of(&m.name))
                    .open(&path)
                    .map_err(io_err(&path))?;
                let r = copy_hashed(&mut (&mut entry).take(m.size), &mut out);
                out.sync_all().map_err(io_err(&path))?;
                r
            }
            None => copy_hashed(&mut (&mut entry).take(m.size), &mut io::sink()),
        }
        .map_err(|e| damaged(format!("reading '{name}': {e}")))?;
        if n != m.size {
            return Err(damaged(format!("'{name}' ends after {n} of {} bytes", m.size)));
        }
        if sha != m.sha256 {
            return Err(damaged(format!("'{name}' does not match its SHA-256 in {MANIFEST}")));
        }
    }
    if let Some(missing) = expected.difference(&seen).next() {
        return Err(damaged(format!("it ends before '{missing}' ({} of {} files read)", seen.len(), expected.len())));
    }
    Ok(manifest)
}

/// `POST /api/v1/admin/backup`: the backup as `application/x-tar`, streamed from a snapshot.
pub async fn api_backup(State(s): State<ApiState>) -> Result<Response, ApiError> {
    // One snapshot at a time: each is a full copy of the database on the data directory's disk.
    static ONE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    let Ok(_permit) = ONE.try_acquire() else {
        return Err(ApiError(StatusCode::CONFLICT, "a backup is already being made; try again when it is done".into()));
    };
    let file = make(&s.engine.store, s.engine.data_dir()).await.map_err(|e| {
        tracing::warn!(error = %e, "backup failed");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("making the backup: {e}"))
    })?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    tracing::info!(bytes = len, "backup made");
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file)));
    Ok(([(header::CONTENT_TYPE, "application/x-tar".to_string()), (header::CONTENT_LENGTH, len.to_string())], body)
        .into_response())
}

/// `tether admin backup FILE`: streams the coordinator's backup to a private temporary file beside
/// FILE, checks it end to end, then renames it into place.
pub async fn backup(client: &Client, file: &Path) -> anyhow::Result<()> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut resp = client.post_raw("/admin/backup").await?;
    let tmp = tempfile::Builder::new()
        .prefix(".tether-backup-")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(&dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let mut out = io::BufWriter::new(tmp.as_file());
    let mut n: u64 = 0;
    while let Some(chunk) = resp.chunk().await.context("receiving the backup")? {
        out.write_all(&chunk).with_context(|| format!("writing {}", tmp.path().display()))?;
        n += chunk.len() as u64;
    }
    out.flush().with_context(|| format!("writing {}", tmp.path().display()))?;
    drop(out);
    tmp.as_file().sync_all()?;
    let manifest = unpack(tmp.path(), None).context("checking the backup the coordinator sent")?;
    tmp.persist(file).map_err(|e| e.error).with_context(|| format!("writing {}", file.display()))?;
    println!(
        "wrote {} ({n} bytes): database schema version {}, {} files",
        file.display(),
        manifest.schema_version,
        manifest.files.len()
    );
    Ok(())
}

/// `tether admin restore FILE`: unpacks and checks the backup in a scratch directory beside the data
/// directory, and only then moves the files in, so a bad backup changes nothing.
pub async fn restore(file: &Path, data_dir: &Path, force: bool) -> anyhow::Result<()> {
    let data_dir = std::path::absolute(data_dir).context("data directory")?;
    // Held to the end: no coordinator may start on the directory while its files are replaced.
    let _lock = match data_dir.is_dir().then(|| crate::datalock::lock(&data_dir, "restore")) {
        None => None,
        Some(Ok(lock)) => Some(lock.leaving_no_file(&data_dir)),
        Some(Err(crate::datalock::LockError::Held { holder, .. })) => {
            bail!("{holder} is running on {}; stop it before restoring", data_dir.display())
        }
        Some(Err(e)) => return Err(e.into()),
    };
    let present: Vec<&str> = std::iter::once(DB_FILE)
        .chain(KEY_FILES.iter().copied())
        .chain(DB_SIDE_FILES.iter().copied())
        .filter(|n| data_dir.join(n).exists())
        .collect();
    if !present.is_empty() && !force {
        bail!(
            "{} already holds {}; pass --force to replace them (they are moved to {}/replaced-TIME/)",
            data_dir.display(),
            present.join(", "),
            data_dir.display()
        );
    }
    let parent = data_dir.parent().context("the data directory has no parent")?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".tether-restore-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a scratch directory in {}", parent.display()))?;
    let manifest = {
        let (file, dir) = (file.to_path_buf(), staging.path().to_path_buf());
        tokio::task::spawn_blocking(move || unpack(&file, Some(&dir))).await??
    };

    // The database must open here, at a schema this build knows, and pass SQLite's own check.
    let db = staging.path().join(DB_FILE);
    let store = Store::open(&db).await.with_context(|| format!("the database in {} does not open", file.display()))?;
    let checked = store.quick_check().await;
    store.close().await;
    if let Some(problem) = checked.with_context(|| format!("checking the database in {}", file.display()))? {
        bail!("the database in {} is damaged: {problem}", file.display());
    }
    for side in DB_SIDE_FILES {
        let _ = fs::remove_file(staging.path().join(side));
    }

    if !data_dir.exists() {
        let staged = staging.keep();
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o700))?;
        fs::rename(&staged, &data_dir)
            .with_context(|| format!("moving the restored files to {}", data_dir.display()))?;
    } else {
        if !present.is_empty() {
            let aside = data_dir.join(format!("replaced-{}", tether_shared::now_ms() / 1000));
            fs::create_dir(&aside).with_context(|| format!("creating {}", aside.display()))?;
            for n in &present {
                fs::rename(data_dir.join(n), aside.join(n)).with_context(|| format!("moving {n} aside"))?;
            }
            println!("moved the replaced {} to {}", present.join(", "), aside.display());
        }
        for m in &manifest.files {
            fs::rename(staging.path().join(&m.name), data_dir.join(&m.name))
                .with_context(|| format!("moving {} into {}", m.name, data_dir.display()))?;
        }
    }
    println!(
        "restored {} into {}: {} files, database schema version {}, made by tether {}\nstart it with: tether serve --data-dir {}",
        file.display(),
        data_dir.display(),
        manifest.files.len(),
        manifest.schema_version,
        manifest.tether_version,
        data_dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_and_refuses_every_truncation() {
        let data = tempfile::tempdir().unwrap();
        let store = Store::open(&data.path().join(DB_FILE)).await.unwrap();
        store.set_setting("marker", "kept").await.unwrap();
        fs::write(data.path().join("ssh-ca.key"), b"key bytes").unwrap();
        let mut f = make(&store, data.path()).await.unwrap();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        assert_eq!(fs::read_dir(data.path()).unwrap().count(), 4, "db, wal, shm and the key: no scratch left");

        let work = tempfile::tempdir().unwrap();
        let file = work.path().join("b.tar");
        fs::write(&file, &bytes).unwrap();
        let out = work.path().join("out");
        fs::create_dir(&out).unwrap();
        let m = unpack(&file, Some(&out)).unwrap();
        assert_eq!(m.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), [DB_FILE, "ssh-ca.key"]);
        assert_eq!(fs::read(out.join("ssh-ca.key")).unwrap(), b"key bytes");
        let restored = Store::open(&out.join(DB_FILE)).await.unwrap();
        assert_eq!(restored.setting("marker").await.unwrap().as_deref(), Some("kept"));
        assert_eq!(restored.quick_check().await.unwrap(), None);

        // Every cut is an error naming the file, never a panic or a success. (Past the last entry
        // only tar's zero padding is lost, which a reader cannot miss.)
        let last_data_end = bytes.len() - 1024;
        for cut in (0..last_data_end).step_by(509) {
            fs::write(&file, &bytes[..cut]).unwrap();
            let e = unpack(&file, None).expect_err(&format!("cut at {cut} of {}", bytes.len()));
            assert!(e.to_string().starts_with(&file.display().to_string()), "{e}");
        }
    }
}
