//! Running one script: the user's shell in its own process group, output captured line by line, a
//! timeout that kills the whole group, and no waiting forever on pipes a background child holds open.
//!
//! A script that exits normally may leave daemons running on purpose: its group is never killed
//! then. Only a timeout or a cancel (agent shutdown) kills the group.

use crate::output::ScriptOutput;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tether_shared::proto::LogStream;
use tether_shared::SpanStatus;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

/// Between SIGTERM and SIGKILL to a timed-out script's group.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long output is still read after the script's main process exited: a background child it
/// started may hold the pipes open for ever.
pub const PIPE_GRACE: Duration = Duration::from_millis(500);

const READ_CHUNK: usize = 16 * 1024;

/// The workspace user, as scripts see it.
#[derive(Debug, Clone)]
pub struct LocalUser {
    /// The login shell from `/etc/passwd`, else `/bin/sh` (also instead of `nologin` or `false`).
    pub shell: PathBuf,
    /// `$HOME`, else the home directory from `/etc/passwd`, else `/`.
    pub home: PathBuf,
}

impl LocalUser {
    pub fn discover() -> Self {
        let user = nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten();
        let shell = user
            .as_ref()
            .map(|u| u.shell.clone())
            // Service accounts often have nologin or false as their shell: those cannot run scripts.
            .filter(|s| s.is_absolute() && s.exists() && !s.ends_with("nologin") && !s.ends_with("false"))
            .unwrap_or_else(|| PathBuf::from("/bin/sh"));
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|h| h.is_absolute())
            .or_else(|| user.map(|u| u.dir))
            .unwrap_or_else(|| PathBuf::from("/"));
        LocalUser { shell, home }
    }
}

/// How to run one script.
#[derive(Debug, Clone)]
pub struct ScriptCommand {
    pub shell: PathBuf,
    /// The script body, given to `SHELL -c`.
    pub run: String,
    /// Added to (or replacing) the agent's own environment.
    pub env: Vec<(String, String)>,
    /// Taken out of the agent's environment.
    pub env_remove: Vec<String>,
    pub working_dir: PathBuf,
    /// `None`: no time limit.
    pub timeout: Option<Duration>,
    /// Where the script's process group is recorded while it runs, so that a next agent process
    /// can end it if this one dies first (`tether_shared::leftovers`).
    pub record_in: Option<PathBuf>,
}

/// How a script run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptEnd {
    Exited(i32),
    /// Killed by this signal, not by us.
    Signaled(i32),
    /// Over its time limit; its group was killed.
    TimedOut(Duration),
    /// Stopped because the agent is shutting down; its group was killed.
    Cancelled,
    /// Could not be started or waited for.
    Failed(String),
}

impl ScriptEnd {
    pub fn is_ok(&self) -> bool {
        *self == ScriptEnd::Exited(0)
    }

    pub fn span_status(&self) -> SpanStatus {
        match self {
            ScriptEnd::Exited(0) => SpanStatus::Ok,
            ScriptEnd::Exited(_) | ScriptEnd::Signaled(_) => SpanStatus::ExitFailure,
            ScriptEnd::TimedOut(_) => SpanStatus::TimedOut,
            ScriptEnd::Cancelled | ScriptEnd::Failed(_) => SpanStatus::Error,
        }
    }

    /// The exit code, when the process exited on its own; `None` when a signal ended it.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            ScriptEnd::Exited(c) => Some(*c),
            _ => None,
        }
    }
}

/// One finished run.
#[derive(Debug, Clone)]
pub struct ScriptRun {
    pub started: Instant,
    /// When the main process ended (or the run gave up on it).
    pub ended: Instant,
    pub end: ScriptEnd,
}

/// Where a script's lines go.
pub trait OutputSink {
    fn line(&mut self, stream: LogStream, line: String);
}

impl OutputSink for Vec<(LogStream, String)> {
    fn line(&mut self, stream: LogStream, line: String) {
        self.push((stream, line));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    TimedOut,
    Cancelled,
}

/// Runs one script to its end. `cancel` turning true kills the script's group (agent shutdown).
pub async fn run<S: OutputSink + Send>(
    cmd: &ScriptCommand,
    sink: &mut S,
    mut cancel: watch::Receiver<bool>,
) -> ScriptRun {
    let started = Instant::now();
    let mut command = tokio::process::Command::new(&cmd.shell);
    command
        .arg("-c")
        .arg(&cmd.run)
        .current_dir(&cmd.working_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so a timeout can kill everything the script started.
        .process_group(0);
    // SAFETY: runs in the child between fork and exec, making only async-signal-safe calls.
    unsafe { command.pre_exec(default_signals) };
    for key in &cmd.env_remove {
        command.env_remove(key);
    }
    command.envs(cmd.env.iter().map(|(k, v)| (k, v)));
    // Spawning waits until the child has changed into the working directory and exec'd: on a hung
    // network filesystem, for ever. It runs on the blocking pool so that it never holds up the
    // agent's one worker thread (every SSH session and the tunnel). The script's own timeout, if
    // any, and the agent's shutdown end the wait; a script that starts after that is killed at once.
    let mut spawning = tokio::task::spawn_blocking(move || command.spawn());
    let spawned = tokio::select! {
        r = &mut spawning => r.unwrap_or_else(|e| Err(std::io::Error::other(e))),
        _ = until(cmd.timeout.map(|t| started + t)) => {
            kill_when_started(spawning);
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "it did not start within its timeout"))
        }
        _ = cancelled(&mut cancel) => {
            kill_when_started(spawning);
            return ScriptRun { started, ended: Instant::now(), end: ScriptEnd::Cancelled };
        }
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let reason = format!("could not start {} in {}: {e}", cmd.shell.display(), cmd.working_dir.display());
            sink.line(LogStream::Stderr, format!("[tether-agent: {reason}]"));
            return ScriptRun { started, ended: Instant::now(), end: ScriptEnd::Failed(reason) };
        }
    };
    // The child is its own group leader, so its pid is the group id. A pid always fits an i32.
    let group = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
    // Removed when this returns: the script's group has ended or been killed by then.
    let _running = match (group, &cmd.record_in) {
        (Some(g), Some(dir)) => tether_shared::leftovers::record(dir, g.as_raw())
            .inspect_err(|e| tracing::warn!(error = %e, "could not record a running script's process group"))
            .ok()
            .flatten(),
        _ => None,
    };
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut output = ScriptOutput::default();
    let mut out_buf = vec![0u8; READ_CHUNK];
    let mut err_buf = vec![0u8; READ_CHUNK];

    let deadline = cmd.timeout.map(|t| started + t);
    let mut status: Option<std::io::Result<ExitStatus>> = None;
    let mut exited_at: Option<Instant> = None;
    let mut stop: Option<Stop> = None;
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;

    loop {
        if status.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        let pipe_deadline = exited_at.map(|t| t + PIPE_GRACE);
        tokio::select! {
            r = read_some(&mut stdout, &mut out_buf) => {
                let mut emit = |s, l| sink.line(s, l);
                match r {
                    Ok(n) if n > 0 => output.feed(LogStream::Stdout, &out_buf[..n], &mut emit),
                    _ => {
                        output.finish(LogStream::Stdout, &mut emit);
                        stdout = None;
                    }
                }
            }
            r = read_some(&mut stderr, &mut err_buf) => {
                let mut emit = |s, l| sink.line(s, l);
                match r {
                    Ok(n) if n > 0 => output.feed(LogStream::Stderr, &err_buf[..n], &mut emit),
                    _ => {
                        output.finish(LogStream::Stderr, &mut emit);
                        stderr = None;
                    }
                }
            }
            s = child.wait(), if status.is_none() => {
                status = Some(s);
                exited_at = Some(Instant::now());
            }
            _ = until(deadline), if status.is_none() && stop.is_none() => {
                stop = Some(Stop::TimedOut);
                signal_group(group, Signal::SIGTERM);
                kill_at = Some(Instant::now() + KILL_GRACE);
            }
            _ = cancelled(&mut cancel), if status.is_none() && stop.is_none() => {
                stop = Some(Stop::Cancelled);
                signal_group(group, Signal::SIGTERM);
                kill_at = Some(Instant::now() + KILL_GRACE);
            }
            _ = until(kill_at), if !killed && kill_at.is_some() => {
                signal_group(group, Signal::SIGKILL);
                killed = true;
            }
            _ = until(pipe_deadline), if pipe_deadline.is_some() => break,
        }
    }
    let ended = exited_at.unwrap_or_else(Instant::now);

    if let (Some(kill_at), false) = (kill_at, killed) {
        // The main process went after SIGTERM; whatever else of its group ignored it gets SIGKILL.
        if group_alive(group) {
            sleep_until(kill_at).await;
            signal_group(group, Signal::SIGKILL);
        }
    }
    if stdout.is_some() || stderr.is_some() {
        // A background child still holds the pipes. Keep draining them so it neither blocks on a full
        // pipe nor dies of SIGPIPE; what it prints is not part of this script's output.
        tokio::spawn(discard(stdout, stderr));
    }

    let end = match (stop, status) {
        (Some(Stop::TimedOut), _) => ScriptEnd::TimedOut(cmd.timeout.unwrap_or_default()),
        (Some(Stop::Cancelled), _) => ScriptEnd::Cancelled,
        (None, Some(Ok(s))) => match (s.code(), s.signal()) {
            (Some(code), _) => ScriptEnd::Exited(code),
            (None, Some(sig)) => ScriptEnd::Signaled(sig),
            (None, None) => ScriptEnd::Failed(format!("ended with unknown status {s}")),
        },
        (None, Some(Err(e))) => ScriptEnd::Failed(format!("waiting for the script: {e}")),
        (None, None) => ScriptEnd::Failed("the script's process vanished".to_string()),
    };
    ScriptRun { started, ended, end }
}

async fn read_some<R: AsyncRead + Unpin>(r: &mut Option<R>, buf: &mut [u8]) -> std::io::Result<usize> {
    match r {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn until(t: Option<Instant>) {
    match t {
        Some(t) => sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Kills the group of a script whose start nobody waits for any more, should it start after all.
fn kill_when_started(spawning: tokio::task::JoinHandle<std::io::Result<tokio::process::Child>>) {
    tokio::spawn(async move {
        if let Ok(Ok(mut child)) = spawning.await {
            if let Some(group) = child.id().and_then(|id| i32::try_from(id).ok()) {
                let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
            }
            let _ = child.wait().await;
        }
    });
}

/// Completes when `cancel` turns true; never if its sender is gone.
pub async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn signal_group(group: Option<Pid>, signal: Signal) {
    if let Some(g) = group {
        if let Err(e) = killpg(g, signal) {
            if e != nix::errno::Errno::ESRCH {
                tracing::warn!(group = g.as_raw(), signal = %signal, error = %e, "could not signal a script's process group");
            }
        }
    }
}

fn group_alive(group: Option<Pid>) -> bool {
    group.is_some_and(|g| killpg(g, None).is_ok())
}

async fn discard<A: AsyncRead + Unpin, B: AsyncRead + Unpin>(mut a: Option<A>, mut b: Option<B>) {
    let mut buf_a = vec![0u8; 4096];
    let mut buf_b = vec![0u8; 4096];
    while a.is_some() || b.is_some() {
        tokio::select! {
            r = read_some(&mut a, &mut buf_a) => if !matches!(r, Ok(n) if n > 0) { a = None },
            r = read_some(&mut b, &mut buf_b) => if !matches!(r, Ok(n) if n > 0) { b = None },
        }
    }
}

/// In the child before exec: signals the agent's own parent left ignored (`nohup` ignores SIGHUP, a
/// shell's background job SIGINT and SIGQUIT) would otherwise stay ignored in every script and SSH session, as exec
/// keeps only that. Handlers need no reset: exec drops them.
pub(crate) fn default_signals() -> std::io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for signal in Signal::iterator() {
        if !matches!(signal, Signal::SIGKILL | Signal::SIGSTOP) {
            // SAFETY: installs no handler (the default action); SIGKILL and SIGSTOP are skipped.
            let _ = unsafe { sigaction(signal, &default) };
        }
    }
    // The real-time signals, which nix's list leaves out.
    for signal in nix::libc::SIGRTMIN()..=nix::libc::SIGRTMAX() {
        // SAFETY: signal(2) is async-signal-safe; SIG_DFL installs no handler.
        unsafe { nix::libc::signal(signal, nix::libc::SIG_DFL) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_shared::limits;

    fn sh(run: &str, timeout: Option<Duration>) -> ScriptCommand {
        ScriptCommand {
            shell: PathBuf::from("/bin/sh"),
            run: run.to_string(),
            env: vec![("TETHER_TEST_VAR".into(), "from-manifest".into())],
            env_remove: vec!["HOME".into()],
            working_dir: std::env::temp_dir(),
            timeout,
            record_in: None,
        }
    }

    fn no_cancel() -> watch::Receiver<bool> {
        watch::channel(false).1
    }

    async fn go(run: &str, timeout: Option<Duration>) -> (ScriptRun, Vec<(LogStream, String)>) {
        let mut sink = Vec::new();
        let r = super::run(&sh(run, timeout), &mut sink, no_cancel()).await;
        (r, sink)
    }

    /// Polls `f` until true or the (generous) deadline passes.
    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A process is gone when it does not exist or is a zombie nobody reaped yet.
    fn process_gone(pid: i32) -> bool {
        if nix::sys::signal::kill(Pid::from_raw(pid), None).is_err() {
            return true;
        }
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
            .unwrap_or(true)
    }

    #[tokio::test]
    async fn exit_codes_and_streams() {
        let (r, lines) = go("echo out; echo err >&2; exit 0", None).await;
        assert_eq!(r.end, ScriptEnd::Exited(0));
        assert_eq!(r.end.span_status(), SpanStatus::Ok);
        assert!(lines.contains(&(LogStream::Stdout, "out".to_string())), "{lines:?}");
        assert!(lines.contains(&(LogStream::Stderr, "err".to_string())), "{lines:?}");

        let (r, _) = go("exit 3", None).await;
        assert_eq!(r.end, ScriptEnd::Exited(3));
        assert_eq!((r.end.span_status(), r.end.exit_code()), (SpanStatus::ExitFailure, Some(3)));

        let (r, _) = go("kill -9 $$", None).await;
        assert_eq!(r.end, ScriptEnd::Signaled(9));
        assert_eq!((r.end.span_status(), r.end.exit_code()), (SpanStatus::ExitFailure, None));
    }

    #[tokio::test]
    async fn environment_and_working_directory() {
        let (r, lines) = go("echo \"$TETHER_TEST_VAR ${HOME:-unset} $(pwd)\"", None).await;
        assert_eq!(r.end, ScriptEnd::Exited(0));
        let tmp = std::env::temp_dir().canonicalize().unwrap();
        assert_eq!(lines, vec![(LogStream::Stdout, format!("from-manifest unset {}", tmp.display()))]);
    }

    #[tokio::test]
    async fn spawn_failure_is_reported_not_panicked() {
        let mut cmd = sh("true", None);
        cmd.working_dir = PathBuf::from("/nonexistent/dir");
        let mut sink = Vec::new();
        let r = run(&cmd, &mut sink, no_cancel()).await;
        assert!(matches!(&r.end, ScriptEnd::Failed(m) if m.contains("/nonexistent/dir")), "{:?}", r.end);
        assert_eq!(r.end.span_status(), SpanStatus::Error);
        assert_eq!(sink.len(), 1);
    }

    #[tokio::test]
    async fn output_is_capped_and_the_child_never_blocks() {
        // About 5 MiB in 100-byte lines.
        let (r, lines) =
            go("i=0; line=$(printf '%099d' 0); while [ $i -lt 52429 ]; do echo \"$line\"; i=$((i+1)); done", None)
                .await;
        assert_eq!(r.end, ScriptEnd::Exited(0), "the script ran to its end");
        let marker = crate::output::truncation_marker(limits::MAX_SCRIPT_OUTPUT);
        assert_eq!(lines.last().unwrap().1, marker);
        assert_eq!(lines.iter().filter(|(_, l)| *l == marker).count(), 1);
        let kept: usize = lines[..lines.len() - 1].iter().map(|(_, l)| l.len() + 1).sum();
        assert!(kept as u64 <= limits::MAX_SCRIPT_OUTPUT);
        assert!(kept as u64 > limits::MAX_SCRIPT_OUTPUT - 200, "{kept}");
    }

    #[tokio::test]
    async fn a_flood_of_output_is_read_and_discarded() {
        // 256 MiB of short lines: the first 1 MiB is kept, the rest read and dropped.
        let (r, lines) = go("yes | head -c 268435456; exit 5", None).await;
        assert_eq!(r.end, ScriptEnd::Exited(5));
        let marker = crate::output::truncation_marker(limits::MAX_SCRIPT_OUTPUT);
        assert_eq!(lines.len() as u64, limits::MAX_SCRIPT_OUTPUT / 2 + 1);
        assert_eq!(lines.last().unwrap().1, marker);

        // 256 MiB without a newline is one line, cut.
        let (r, lines) = go("head -c 268435456 /dev/zero | tr '\\0' x", None).await;
        assert_eq!(r.end, ScriptEnd::Exited(0));
        assert_eq!(lines.len(), 1);
        assert!(lines[0].1.ends_with(crate::output::LINE_CUT_MARKER));
    }

    #[tokio::test]
    async fn long_lines_are_cut() {
        let (r, lines) = go("head -c 40000 /dev/zero | tr '\\0' x; echo; echo next", None).await;
        assert_eq!(r.end, ScriptEnd::Exited(0));
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].1.len(), limits::MAX_LOG_LINE + crate::output::LINE_CUT_MARKER.len());
        assert_eq!(lines[1].1, "next");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let run = format!("sleep 100 & echo $! > {}; echo started; sleep 100", pidfile.display());
        let (r, lines) = go(&run, Some(Duration::from_secs(1))).await;
        assert_eq!(r.end, ScriptEnd::TimedOut(Duration::from_secs(1)));
        assert_eq!(r.end.span_status(), SpanStatus::TimedOut);
        assert_eq!(lines, vec![(LogStream::Stdout, "started".to_string())]);
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        eventually("the background sleep to be killed", || process_gone(pid)).await;
    }

    #[tokio::test]
    async fn cancel_kills_the_group() {
        let (tx, rx) = watch::channel(false);
        let mut sink = Vec::new();
        let cmd = sh("echo up; sleep 100", None);
        let runner = run(&cmd, &mut sink, rx);
        tokio::pin!(runner);
        // Cancel once the script is up, then the run must end promptly.
        let r = loop {
            tokio::select! {
                r = &mut runner => break r,
                _ = tokio::time::sleep(Duration::from_millis(50)) => { let _ = tx.send(true); }
            }
        };
        assert_eq!(r.end, ScriptEnd::Cancelled);
        assert!(r.ended.duration_since(r.started) < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn term_ignoring_children_get_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let run =
            format!("sh -c 'trap \"\" TERM; while :; do sleep 1; done' & echo $! > {}; sleep 100", pidfile.display());
        let (r, _) = go(&run, Some(Duration::from_millis(500))).await;
        assert!(matches!(r.end, ScriptEnd::TimedOut(_)));
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        eventually("the TERM-ignoring child to be killed", || process_gone(pid)).await;
    }

    #[tokio::test]
    async fn background_daemon_neither_blocks_nor_gets_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // The daemon keeps stdout open and keeps writing.
        let run = format!("(while :; do echo tick; sleep 0.1; done) & echo $! > {}; echo done", pidfile.display());
        let started = Instant::now();
        let (r, lines) = go(&run, Some(Duration::from_secs(60))).await;
        assert_eq!(r.end, ScriptEnd::Exited(0));
        assert!(started.elapsed() < Duration::from_secs(10), "did not wait for the daemon's pipe");
        assert!(lines.contains(&(LogStream::Stdout, "done".to_string())));
        let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        // Still alive a while later: not killed, not dead of SIGPIPE.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!process_gone(pid), "the daemon must keep running");
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        eventually("the daemon to be cleaned up", || process_gone(pid)).await;
    }
}
