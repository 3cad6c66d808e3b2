//! Script process groups still running when their agent died. Each script runs in a process group
//! of its own, which outlives the agent (as sshd's sessions outlive sshd). A script the agent was
//! running when it was killed is run again by the next agent process, and the first run must not go
//! on beside it; nor may a deleted `process` workspace leave it behind. So the agent records each
//! running script's group in a directory, with its leader's start time (which tells the leader from
//! a later process given the same pid), and whoever comes next ends the groups left there.

use std::path::{Path, PathBuf};

/// The records' directory, under the agent's data directory.
pub const DIR: &str = "running";

/// The record of one running script's group; dropping it (the script ended) removes it.
#[derive(Debug)]
pub struct Running {
    path: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Records group `pgid` (its leader's pid) as running, in `dir`; `None` if its leader has already
/// ended (a script that quick leaves nothing to end).
pub fn record(dir: &Path, pgid: i32) -> std::io::Result<Option<Running>> {
    let Some(started) = start_time(pgid) else { return Ok(None) };
    std::fs::create_dir_all(dir)?;
    let path = dir.join(pgid.to_string());
    std::fs::write(&path, started.to_string())?;
    Ok(Some(Running { path }))
}

/// Ends (SIGKILL) every group recorded in `dir` whose leader is still the process recorded, and
/// clears the records. Returns the groups ended.
pub fn end_all(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut ended = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let recorded = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()).and_then(|pgid| {
            let started = std::fs::read_to_string(&path).ok()?.trim().parse::<u64>().ok()?;
            Some((pgid, started))
        });
        if let Some((pgid, started)) = recorded.filter(|(pgid, _)| *pgid > 1) {
            // Still the script's own shell: its script had not finished.
            if start_time(pgid) == Some(started) {
                let group = nix::unistd::Pid::from_raw(pgid);
                if nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).is_ok() {
                    ended.push(pgid);
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    ended
}

/// A process's start time (clock ticks after boot, field 22 of `/proc/PID/stat`).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything: count after its end.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn a_running_group_is_ended_and_a_finished_one_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let running = dir.path().join("running");
        // A script with a child, in its own group.
        let mut script =
            std::process::Command::new("sh").args(["-c", "sleep 300 & sleep 300"]).process_group(0).spawn().unwrap();
        let pgid = script.id() as i32;
        let left = record(&running, pgid).unwrap().expect("running");
        // The agent was killed: its record stays.
        std::mem::forget(left);
        // A finished script whose record was left: its pid may be anyone's now.
        std::fs::write(running.join("999999"), "1").unwrap();
        assert_eq!(end_all(&running), vec![pgid]);
        let status = script.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
        assert_eq!(std::fs::read_dir(&running).unwrap().count(), 0, "the records are cleared");
        assert!(end_all(&running).is_empty());
        // A record dropped as its script ends is removed.
        let mut done = std::process::Command::new("true").process_group(0).spawn().unwrap();
        let r = record(&running, done.id() as i32).unwrap();
        done.wait().unwrap();
        drop(r);
        assert_eq!(std::fs::read_dir(&running).unwrap().count(), 0);
    }
}
