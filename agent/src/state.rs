//! The agent's small on-disk memory: which build it last started and how far that got, so an agent
//! restarted for the same build does not run the start scripts twice.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use tether_shared::Lifecycle;

pub const FILE_NAME: &str = "state.json";
/// A state file is a few dozen bytes; anything bigger is not ours.
const MAX_STATE_FILE: u64 = 64 * 1024;

/// `DATA/state.json`: `{ "build": N, "lifecycle": "shutting_down", "start": "ready" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub build: u64,
    /// How far the build got: the last lifecycle the agent reported for it.
    pub lifecycle: Lifecycle,
    /// How the build's start phase ended, kept once a shutdown has begun (files written before
    /// this field existed lack it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Lifecycle>,
}

impl StateFile {
    /// The state after `build` reached `lifecycle`, keeping how the start phase ended from `before`
    /// if that was the same build.
    pub fn next(before: Option<StateFile>, build: u64, lifecycle: Lifecycle) -> StateFile {
        let start = if lifecycle.shutdown_begun() {
            before.filter(|b| b.build == build).and_then(|b| b.start_outcome())
        } else {
            // Until then the lifecycle itself says it.
            None
        };
        StateFile { build, lifecycle, start }
    }

    /// How the start phase ended, if it did: ready, start_error or start_timeout.
    pub fn start_outcome(&self) -> Option<Lifecycle> {
        if self.lifecycle.start_finished() && !self.lifecycle.shutdown_begun() {
            Some(self.lifecycle)
        } else {
            self.start.filter(|s| s.start_finished() && !s.shutdown_begun())
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} is not a valid state file: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

/// Reads the state file in `dir`; `Ok(None)` when there is none yet.
pub fn load(dir: &Path) -> Result<Option<StateFile>, StateError> {
    let path = dir.join(FILE_NAME);
    let mut bytes = Vec::new();
    let read = std::fs::File::open(&path).and_then(|f| f.take(MAX_STATE_FILE + 1).read_to_end(&mut bytes));
    match read {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Read { path, source }),
    }
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(StateError::Parse { path, reason: format!("over the limit of {MAX_STATE_FILE} bytes") });
    }
    serde_json::from_slice(&bytes).map(Some).map_err(|e| StateError::Parse { path, reason: e.to_string() })
}

/// Replaces the state file atomically: a crash leaves either the old or the new file, never half.
pub fn save(dir: &Path, state: &StateFile) -> Result<(), StateError> {
    let path = dir.join(FILE_NAME);
    let tmp = dir.join(format!(".{FILE_NAME}.tmp"));
    let write = || -> std::io::Result<()> {
        // Serialising two plain fields cannot fail.
        let mut body = serde_json::to_vec(state).map_err(std::io::Error::other)?;
        body.push(b'\n');
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        // Make the rename itself durable; not every file system supports syncing a directory.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|source| StateError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let s = StateFile { build: 7, lifecycle: Lifecycle::StartTimeout, start: None };
        save(dir.path(), &s).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(s));
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(text, "{\"build\":7,\"lifecycle\":\"start_timeout\"}\n");
        let s2 = StateFile { build: 8, lifecycle: Lifecycle::ShuttingDown, start: Some(Lifecycle::Ready) };
        save(dir.path(), &s2).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(s2));
        let text = std::fs::read_to_string(dir.path().join(FILE_NAME)).unwrap();
        assert_eq!(text, "{\"build\":8,\"lifecycle\":\"shutting_down\",\"start\":\"ready\"}\n");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE_NAME)], "no temp file left behind");
    }

    #[test]
    fn reads_what_a_person_would_write() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "{ \"build\": 3, \"lifecycle\": \"ready\" }").unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(StateFile { build: 3, lifecycle: Lifecycle::Ready, start: None }));
    }

    #[test]
    fn the_start_outcome_outlives_the_shutdown_of_its_build_only() {
        use Lifecycle::*;
        let starting = StateFile::next(None, 4, Starting);
        assert_eq!(starting.start_outcome(), None);
        let failed = StateFile::next(Some(starting), 4, StartError);
        assert_eq!(failed.start_outcome(), Some(StartError));
        let stopping = StateFile::next(Some(failed), 4, ShuttingDown);
        assert_eq!(stopping, StateFile { build: 4, lifecycle: ShuttingDown, start: Some(StartError) });
        let off = StateFile::next(Some(stopping), 4, Off);
        assert_eq!(off.start_outcome(), Some(StartError));
        // A shutdown during the start phase: the start never ended.
        assert_eq!(StateFile::next(Some(starting), 4, ShuttingDown).start_outcome(), None);
        // A start phase of the same build again (never run after an outcome today) forgets it.
        assert_eq!(StateFile::next(Some(off), 4, Starting).start_outcome(), None);
        // Another build's outcome is not carried over.
        assert_eq!(StateFile::next(Some(off), 5, ShuttingDown).start_outcome(), None);
    }

    #[test]
    fn garbage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "{\"build\": 3, \"lifecycle\": \"sleeping\"}").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not a valid state file: unknown variant `sleeping`"), "{err}");
    }
}
