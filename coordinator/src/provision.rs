//! Provisioners: how a workspace's compute comes and goes. `process` runs the agent as a local child
//! in a per-workspace directory; `command` runs ops' own commands; `external` does nothing.

use crate::engine::Engine;
use crate::status;
use crate::store::WorkspaceRow;
use crate::template::{ProvisionerKind, Template};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_shared::lines::LineCutter;
use tether_shared::proto::Span;
use tether_shared::{limits, now_ms, SpanStatus};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("could not run {what}: {message}")]
    Spawn { what: String, message: String },
    #[error("{what} exited with code {code}{}", last_line.as_deref().map(|l| format!(": {l}")).unwrap_or_default())]
    Failed { what: String, code: i32, last_line: Option<String> },
    #[error("{what} was killed by a signal{}", last_line.as_deref().map(|l| format!(": {l}")).unwrap_or_default())]
    Killed { what: String, last_line: Option<String> },
    #[error("{what} timed out after {}", crate::status::secs(*after))]
    TimedOut { what: String, after: Duration },
    #[error("{what} was cancelled by a {by}")]
    Cancelled { what: String, by: &'static str },
    #[error("{0}")]
    Other(String),
}

pub fn workspace_dir(engine: &Engine, name: &str) -> PathBuf {
    engine.data_dir().join("workspaces").join(name)
}

/// The working directory of a `process` workspace.
pub fn home_dir(engine: &Engine, name: &str) -> PathBuf {
    workspace_dir(engine, name).join("home")
}

fn pid_file(engine: &Engine, name: &str) -> PathBuf {
    workspace_dir(engine, name).join("agent.pid")
}

fn other(e: impl std::fmt::Display) -> ProvisionError {
    ProvisionError::Other(e.to_string())
}

/// Set to what overtook a start (`"stop"`, `"delete"`): its command is then ended.
pub type Cancel = tokio::sync::watch::Receiver<Option<&'static str>>;

/// How long a cancelled command has after SIGTERM to end before its process group is killed.
const CANCEL_GRACE: Duration = Duration::from_secs(10);

pub async fn start(
    engine: &Arc<Engine>,
    row: &WorkspaceRow,
    template: &Template,
    token: &str,
    restart: bool,
    cancel: Cancel,
) -> Result<(), ProvisionError> {
    match template.provisioner {
        ProvisionerKind::External => Ok(()),
        ProvisionerKind::Process => spawn_agent(engine, row, token, restart).await,
        ProvisionerKind::Command => {
            let Some(spec) = &template.command else { return Err(other("template has no [command] table")) };
            run_command(engine, row, "start", &spec.start, Some(token), spec.timeout, Some(cancel)).await
        }
    }
}

pub async fn stop(engine: &Engine, row: &WorkspaceRow, template: &Template) -> Result<(), ProvisionError> {
    match template.provisioner {
        ProvisionerKind::External => Ok(()),
        ProvisionerKind::Process => {
            stop_agent_process(engine, &row.name, template.shutdown_timeout + Duration::from_secs(5)).await;
            Ok(())
        }
        ProvisionerKind::Command => {
            match template.command.as_ref().and_then(|c| c.stop.clone().map(|s| (s, c.timeout))) {
                Some((cmd, timeout)) => run_command(engine, row, "stop", &cmd, None, timeout, None).await,
                None => Ok(()),
            }
        }
    }
}

pub async fn delete(engine: &Engine, row: &WorkspaceRow, template: &Template) -> Result<(), ProvisionError> {
    match template.provisioner {
        ProvisionerKind::External => Ok(()),
        ProvisionerKind::Process => {
            let dir = workspace_dir(engine, &row.name);
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(other(format!("removing {}: {e}", dir.display()))),
            }
        }
        ProvisionerKind::Command => {
            match template.command.as_ref().and_then(|c| c.delete.clone().map(|s| (s, c.timeout))) {
                Some((cmd, timeout)) => run_command(engine, row, "delete", &cmd, None, timeout, None).await,
                None => Ok(()),
            }
        }
    }
}

fn span(stage: &str, name: &str, started: i64, status: SpanStatus, exit_code: Option<i32>) -> Span {
    Span { stage: stage.into(), name: name.into(), started_at_ms: started, ended_at_ms: now_ms(), exit_code, status }
}

async fn spawn_agent(
    engine: &Arc<Engine>,
    row: &WorkspaceRow,
    token: &str,
    restart: bool,
) -> Result<(), ProvisionError> {
    let started = now_ms();
    let dir = workspace_dir(engine, &row.name);
    if restart {
        // A replacement, not a stop: SIGTERM would have the old agent run the stop scripts and
        // record this build as shut down, which the new agent would then report.
        kill_agent_process(engine, &row.name).await;
    }
    for d in [dir.clone(), dir.join("agent"), home_dir(engine, &row.name)] {
        tokio::fs::create_dir_all(&d).await.map_err(|e| other(format!("creating {}: {e}", d.display())))?;
    }
    let log_path = dir.join("agent.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| other(format!("opening {}: {e}", log_path.display())))?;
    let log2 = log.try_clone().map_err(other)?;
    let binary = &engine.config.agent_binary;
    let mut cmd = Command::new(binary);
    // Not the coordinator's environment: it may hold ops' secrets (a database password, cloud
    // credentials), and the agent hands its environment to every SSH session. What a process
    // needs to run, and the log settings, pass.
    cmd.env_clear().envs(std::env::vars_os().filter(|(k, _)| passed_to_agent(k)));
    cmd.env("TETHER_COORDINATOR", &engine.config.agent_coordinator_addr)
        .env("TETHER_CA", &engine.pki.ca_path)
        .env("TETHER_AGENT_TOKEN", token)
        .env("TETHER_AGENT_DATA_DIR", dir.join("agent"))
        // The admin credentials of whoever runs the coordinator stay out of workspaces.
        .env_remove("TETHER_TOKEN")
        .env_remove("TETHER_URL")
        .current_dir(home_dir(engine, &row.name))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: the agent outlives a coordinator restart and its signals.
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| ProvisionError::Spawn {
        what: format!("the agent ({})", binary.display()),
        message: e.to_string(),
    })?;
    let pid = child.id().unwrap_or(0);
    tokio::fs::write(pid_file(engine, &row.name), pid.to_string()).await.map_err(other)?;
    let (name, id, weak) = (row.name.clone(), row.id, Arc::downgrade(engine));
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).insert(pid, false);
    tokio::spawn(async move {
        match child.wait().await {
            Ok(exit) => {
                info!(workspace = %name, pid, status = %exit, "agent process exited");
                let ours = CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid).unwrap_or(false);
                let died = status::agent_death_reason(exit.signal(), exit.code(), &log_path);
                if let (false, Some(reason), Some(engine)) = (ours, died, weak.upgrade()) {
                    engine.agent_process_died(id, reason).await;
                }
            }
            Err(e) => warn!(workspace = %name, pid, error = %e, "waiting for agent process"),
        }
    });
    if !restart {
        let s = span("provision", "spawn agent", started, SpanStatus::Ok, None);
        engine.store.add_span(row.id, row.build, &s).await.map_err(other)?;
    }
    info!(workspace = %row.name, pid, "agent spawned");
    Ok(())
}

/// The coordinator's variables a `process` agent gets.
fn passed_to_agent(key: &std::ffi::OsStr) -> bool {
    const PASSED: &[&str] = &[
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TETHER_LOG",
        "TETHER_LOG_FORMAT",
        "RUST_BACKTRACE",
    ];
    key.to_str().is_some_and(|k| PASSED.contains(&k) || k.starts_with("LC_"))
}

/// The workspace's agent from its pid file, if that process is still this workspace's agent (a pid
/// left from an earlier run may since belong to anything: it is never signalled).
fn read_pid(engine: &Engine, name: &str) -> Option<Pid> {
    let text = std::fs::read_to_string(pid_file(engine, name)).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    if pid <= 1 {
        return None;
    }
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let mut data_dir = b"TETHER_AGENT_DATA_DIR=".to_vec();
    data_dir.extend_from_slice(workspace_dir(engine, name).join("agent").as_os_str().as_encoded_bytes());
    environ.split(|b| *b == 0).any(|var| var == data_dir.as_slice()).then(|| Pid::from_raw(pid))
}

fn alive(pid: Pid) -> bool {
    kill(pid, None).is_ok()
}

async fn wait_gone(pid: Pid, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// The agent processes this coordinator spawned and still waits for, each with whether it is
/// ending that agent itself (a stop, a replacement), which makes its exit no news. Agents left from
/// before a coordinator restart are not its children and are not here, so nothing stays behind.
static CHILDREN: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<u32, bool>>> =
    std::sync::LazyLock::new(Default::default);

fn ending_here(pid: Pid) {
    if let Ok(pid) = u32::try_from(pid.as_raw()) {
        if let Some(ending) = CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&pid) {
            *ending = true;
        }
    }
}

/// Ends a `process` workspace's agent: it has usually left already after a shutdown request; if
/// not, SIGTERM lets it run its stop scripts, and SIGKILL of its group ends a hung one.
async fn stop_agent_process(engine: &Engine, name: &str, grace: Duration) {
    let Some(pid) = read_pid(engine, name) else {
        end_leftover_scripts(engine, name);
        return;
    };
    ending_here(pid);
    if wait_gone(pid, Duration::from_secs(2)).await {
        let _ = std::fs::remove_file(pid_file(engine, name));
        end_leftover_scripts(engine, name);
        return;
    }
    let _ = kill(pid, Signal::SIGTERM);
    if !wait_gone(pid, grace).await {
        warn!(workspace = %name, pid = pid.as_raw(), "agent ignored SIGTERM; killing its process group");
        let _ = killpg(pid, Signal::SIGKILL);
        wait_gone(pid, Duration::from_secs(5)).await;
    }
    let _ = std::fs::remove_file(pid_file(engine, name));
    end_leftover_scripts(engine, name);
}

/// Scripts in their own process groups outlive an agent that was killed: end those it was still
/// running, which the next agent would run again or a delete would leave behind.
fn end_leftover_scripts(engine: &Engine, name: &str) {
    let dir = workspace_dir(engine, name).join("agent").join(tether_shared::leftovers::DIR);
    let ended = tether_shared::leftovers::end_all(&dir);
    if !ended.is_empty() {
        info!(workspace = %name, groups = ?ended, "ended the scripts a dead agent left running");
    }
}

/// Ends a lost agent that is to be replaced, without its stop phase: SIGKILL to its process group.
async fn kill_agent_process(engine: &Engine, name: &str) {
    let Some(pid) = read_pid(engine, name) else {
        end_leftover_scripts(engine, name);
        return;
    };
    ending_here(pid);
    if !wait_gone(pid, Duration::ZERO).await {
        info!(workspace = %name, pid = pid.as_raw(), "replacing the agent: killing the old one's process group");
        let _ = killpg(pid, Signal::SIGKILL);
        wait_gone(pid, Duration::from_secs(5)).await;
    }
    let _ = std::fs::remove_file(pid_file(engine, name));
    end_leftover_scripts(engine, name);
}

/// Kills a provisioning command's whole process group if its run is dropped before the command
/// ended (the coordinator shutting down): `kill_on_drop` alone would end only the shell and leave
/// its children running half way through.
struct GroupGuard<'a> {
    pgid: Option<Pid>,
    workspace: &'a str,
    what: &'a str,
}

impl Drop for GroupGuard<'_> {
    fn drop(&mut self) {
        if let Some(pg) = self.pgid.take() {
            let _ = killpg(pg, Signal::SIGKILL);
            warn!(workspace = %self.workspace, "the coordinator is shutting down: ended the {} (process group {pg})", self.what);
        }
    }
}

/// How a provisioning command ended early.
enum Ended {
    TimedOut,
    Cancelled(&'static str),
}

/// Runs one of ops' provisioning commands with the workspace's details in its environment,
/// keeping its output as provisioning logs and its run as a span.
async fn run_command(
    engine: &Engine,
    row: &WorkspaceRow,
    transition: &str,
    command: &str,
    token: Option<&str>,
    timeout: Duration,
    cancel: Option<Cancel>,
) -> Result<(), ProvisionError> {
    let what = format!("{transition} command");
    let started = now_ms();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .env("TETHER_WORKSPACE", &row.name)
        .env("TETHER_BUILD", row.build.to_string())
        .env("TETHER_TRANSITION", transition)
        .env("TETHER_COORDINATOR", &engine.config.agent_coordinator_addr)
        .env("TETHER_CA", &engine.pki.ca_path)
        .env("TETHER_CA_SHA256", &engine.pki.fingerprint)
        .env("TETHER_AGENT_BINARY", &engine.config.agent_binary)
        .env_remove("TETHER_TOKEN")
        .env_remove("TETHER_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(t) = token {
        cmd.env("TETHER_AGENT_TOKEN", t);
    }
    // Where an image's init script fetches the agent; replaces the admin's own TETHER_URL.
    if let Some(url) = &engine.config.https_url {
        cmd.env("TETHER_URL", url);
    }
    let mut child = cmd.spawn().map_err(|e| ProvisionError::Spawn { what: what.clone(), message: e.to_string() })?;
    let pgid = child.id().map(|p| Pid::from_raw(p as i32));
    let signal_group = |signal| {
        if let Some(pg) = pgid {
            let _ = killpg(pg, signal);
        }
    };
    let mut group = GroupGuard { pgid, workspace: &row.name, what: &what };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(&'static str, String)>(256);
    for (stream, reader) in [
        ("stdout", child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>)),
        ("stderr", child.stderr.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>)),
    ] {
        let Some(reader) = reader else { continue };
        let tx = tx.clone();
        tokio::spawn(async move {
            // Lines are cut at MAX_LOG_LINE as they arrive, so output without newlines costs bounded
            // memory; bytes that are not UTF-8 become replacement characters.
            let mut reader = reader;
            let mut cutter = LineCutter::new(limits::MAX_LOG_LINE);
            let mut chunk = vec![0u8; 8 * 1024];
            let mut lines = Vec::new();
            loop {
                let n = match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                cutter.feed(&chunk[..n], &mut |l| lines.push(l));
                for line in lines.drain(..) {
                    if tx.send((stream, line)).await.is_err() {
                        return;
                    }
                }
            }
            cutter.finish(&mut |l| lines.push(l));
            for line in lines {
                let _ = tx.send((stream, line)).await;
            }
        });
    }
    drop(tx);
    let mut kept: u64 = 0;
    let mut batch = Vec::new();
    let mut last_line: Option<String> = None;
    let mut last_err_line: Option<String> = None;
    let source = format!("provision:{transition}");
    let collect = async {
        while let Some(first) = rx.recv().await {
            // Stored as they come (`logs --follow` shows a long `docker pull` as it goes, and a
            // coordinator that dies mid-command has kept what came before): what arrived together
            // in one write, at most 200 lines.
            let mut next = Some(first);
            while let Some((stream, line)) = next.take() {
                if !line.trim().is_empty() {
                    if stream == "stderr" {
                        last_err_line = Some(line.clone());
                    }
                    last_line = Some(line.clone());
                }
                if kept < limits::MAX_SCRIPT_OUTPUT {
                    kept += line.len() as u64 + 1;
                    batch.push((stream.to_string(), line, now_ms()));
                    if kept >= limits::MAX_SCRIPT_OUTPUT {
                        batch.push(("stderr".into(), "[output truncated: more than 1 MiB]".into(), now_ms()));
                    }
                }
                if batch.len() < 200 {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                let _ = engine.store.add_logs(row.id, row.build, &source, &std::mem::take(&mut batch)).await;
                engine.logs_added();
            }
        }
    };
    let cancelled = async {
        match cancel {
            Some(mut cancel) => {
                let by = cancel.wait_for(Option::is_some).await.map(|by| by.unwrap_or("stop"));
                match by {
                    Ok(by) => by,
                    // The engine let go of it: nothing will cancel this command.
                    Err(_) => std::future::pending().await,
                }
            }
            None => std::future::pending().await,
        }
    };
    let finished = {
        let run = async {
            collect.await;
            child.wait().await
        };
        tokio::pin!(run);
        tokio::select! {
            finished = tokio::time::timeout(timeout, &mut run) => finished.map_err(|_| Ended::TimedOut),
            by = cancelled => {
                // As `docker stop` does: SIGTERM to the whole group, then SIGKILL after a grace.
                signal_group(Signal::SIGTERM);
                if tokio::time::timeout(CANCEL_GRACE, &mut run).await.is_err() {
                    signal_group(Signal::SIGKILL);
                    // Output still comes from anything that left the group and holds the pipes.
                    let _ = tokio::time::timeout(CANCEL_GRACE, &mut run).await;
                }
                Err(Ended::Cancelled(by))
            }
        }
    };
    // The command has ended (or was ended): what it left running in its group is its own.
    group.pgid = None;
    if !batch.is_empty() {
        let _ = engine.store.add_logs(row.id, row.build, &source, &batch).await;
        engine.logs_added();
    }
    let last = last_err_line.or(last_line);
    let (status, code, result) = match finished {
        Err(Ended::TimedOut) => {
            signal_group(Signal::SIGKILL);
            (SpanStatus::TimedOut, None, Err(ProvisionError::TimedOut { what: what.clone(), after: timeout }))
        }
        Err(Ended::Cancelled(by)) => {
            (SpanStatus::Cancelled, None, Err(ProvisionError::Cancelled { what: what.clone(), by }))
        }
        Ok(Err(e)) => {
            (SpanStatus::Error, None, Err(ProvisionError::Spawn { what: what.clone(), message: e.to_string() }))
        }
        Ok(Ok(st)) => match st.code() {
            Some(0) => (SpanStatus::Ok, Some(0), Ok(())),
            Some(code) => (
                SpanStatus::ExitFailure,
                Some(code),
                Err(ProvisionError::Failed { what: what.clone(), code, last_line: last }),
            ),
            None => {
                (SpanStatus::ExitFailure, None, Err(ProvisionError::Killed { what: what.clone(), last_line: last }))
            }
        },
    };
    let s = span("provision", &what, started, status, code);
    if let Err(e) = engine.store.add_span(row.id, row.build, &s).await {
        warn!(workspace = %row.name, error = %e, "recording provisioning span");
    }
    result
}
