//! The data directory's lock: one process at a time may own a data directory.
//!
//! - The coordinator's (`coordinator.lock`), held by `tether serve` or `tether admin restore`. Two
//!   coordinators on one database would each believe its own view of the workspaces, and the second
//!   would overwrite the first's `coordinator.json`, sending the CLI to its ports.
//! - The agent's (`agent.lock`). Two agents on one data directory would end each other's scripts as
//!   leftovers of a dead agent, and take the workspace's connection from each other for ever.
//!
//! An advisory `flock`: the kernel releases it when the process ends, however it ends, so there is
//! never a stale lock to clean up. The file holds the owner's pid and role, for the message the next
//! one gets. The descriptor is close-on-exec, so the provisioner's commands, the agents they start
//! (which outlive a coordinator by design) and the agent's scripts never hold it.

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The coordinator's lock file in its data directory.
pub const LOCK_FILE: &str = "coordinator.lock";
/// The agent's lock file in its data directory.
pub const AGENT_LOCK_FILE: &str = "agent.lock";
/// Most of the lock file read for the holder's description.
const MAX_HOLDER: u64 = 256;

/// Held while the process owns the data directory; dropping it lets the next one in.
#[derive(Debug)]
pub struct DataDirLock {
    /// `None` where the file system has no locks and the caller goes on unguarded.
    _lock: Option<Flock<File>>,
    /// Whether this process made the file.
    created: bool,
    /// The file to remove on drop: one `admin restore` created in a directory it leaves unchanged.
    remove: Option<PathBuf>,
}

impl DataDirLock {
    /// A lock that guards nothing, for a file system that offers no locks.
    pub fn none() -> Self {
        DataDirLock { _lock: None, created: false, remove: None }
    }

    /// Removes the lock file when dropped if this lock created it, so that a command that must leave
    /// the directory as it found it (a refused restore) does.
    pub fn leaving_no_file(mut self, dir: &Path) -> Self {
        if self.created {
            self.remove = Some(dir.join(LOCK_FILE));
        }
        self
    }
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        // Before the lock goes: whoever locks next makes the file anew.
        if let Some(path) = self.remove.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process owns the directory.
    #[error("{holder} is using {}", dir.display())]
    Held { dir: PathBuf, holder: Holder },
    #[error("opening {}: {source}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    /// The file system offers no locks (some network file systems).
    #[error("locking {}: {errno} (the file system may not support locks)", path.display())]
    Unsupported { path: PathBuf, errno: Errno },
    #[error("locking {}: {errno}", path.display())]
    Lock { path: PathBuf, errno: Errno },
}

/// Who holds the lock, as it wrote itself into the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: Option<u32>,
    pub role: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.role.as_deref() {
            Some("restore") => "`tether admin restore`",
            Some("agent") => "another tether-agent",
            _ => "a coordinator",
        };
        match self.pid {
            Some(pid) => write!(f, "{what} (pid {pid})"),
            None => write!(f, "{what}"),
        }
    }
}

impl Holder {
    /// Reads `PID ROLE` from the lock file's text; anything else gives an unknown holder.
    fn parse(text: &str) -> Holder {
        let mut words = text.split_whitespace();
        let pid = words.next().and_then(|w| w.parse().ok());
        let role =
            words.next().filter(|r| r.len() <= 32 && r.chars().all(|c| c.is_ascii_lowercase())).map(String::from);
        Holder { pid, role }
    }
}

/// Takes the coordinator's lock on `dir` (which must exist) for `role` ("serve" or "restore"),
/// without waiting.
pub fn lock(dir: &Path, role: &str) -> Result<DataDirLock, LockError> {
    lock_file(dir, LOCK_FILE, role)
}

/// Takes the lock `name` in `dir` (which must exist) for `role`, without waiting.
pub fn lock_file(dir: &Path, name: &str, role: &str) -> Result<DataDirLock, LockError> {
    let path = dir.join(name);
    let created = !path.exists();
    let open = |source| LockError::Open { path: path.clone(), source };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(open)?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let _ = (&mut file).take(MAX_HOLDER).read_to_string(&mut text);
            return Err(LockError::Held { dir: dir.to_path_buf(), holder: Holder::parse(&text) });
        }
        Err((_, errno @ (Errno::ENOLCK | Errno::EOPNOTSUPP))) => return Err(LockError::Unsupported { path, errno }),
        Err((_, errno)) => return Err(LockError::Lock { path, errno }),
    };
    // Only the description for the next one: the lock itself is what counts.
    let describe = |file: &mut File| -> std::io::Result<()> {
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{} {role}", std::process::id())
    };
    // Only the next holder's message suffers if this fails (a full disk): the lock holds.
    let _ = describe(&mut lock);
    Ok(DataDirLock { _lock: Some(lock), created, remove: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_directory_is_refused_with_the_holder_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path(), "serve").unwrap();
        match lock(dir.path(), "restore") {
            Err(LockError::Held { holder, .. }) => {
                assert_eq!(holder, Holder { pid: Some(std::process::id()), role: Some("serve".into()) });
                assert_eq!(holder.to_string(), format!("a coordinator (pid {})", std::process::id()));
            }
            other => panic!("expected Held, got {other:?}"),
        }
        drop(first);
        let second = lock(dir.path(), "restore").unwrap();
        match lock(dir.path(), "serve") {
            Err(e @ LockError::Held { .. }) => assert!(e.to_string().starts_with("`tether admin restore` (pid ")),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(second);
        // A lock that leaves no file removes only the file it made.
        drop(lock(dir.path(), "restore").unwrap().leaving_no_file(dir.path()));
        assert!(dir.path().join(LOCK_FILE).exists(), "the file was there before");
        let fresh = tempfile::tempdir().unwrap();
        drop(lock(fresh.path(), "restore").unwrap().leaving_no_file(fresh.path()));
        assert!(!fresh.path().join(LOCK_FILE).exists());
    }

    #[test]
    fn a_lock_file_with_anything_in_it_gives_an_unknown_holder() {
        assert_eq!(Holder::parse(""), Holder { pid: None, role: None });
        assert_eq!(Holder::parse("12 Serve!"), Holder { pid: Some(12), role: None });
        assert_eq!(Holder::parse("x serve"), Holder { pid: None, role: Some("serve".into()) });
        assert_eq!(Holder { pid: None, role: None }.to_string(), "a coordinator");
        assert_eq!(Holder { pid: Some(7), role: Some("agent".into()) }.to_string(), "another tether-agent (pid 7)");
    }
}
