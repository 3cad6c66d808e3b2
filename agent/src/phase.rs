//! The start and stop phases: run a manifest's scripts for one trigger in parallel, send their output
//! to the log outbox and to local files, report a span per script, and judge the phase.

use crate::clock::WallClock;
use crate::metrics::AgentMetrics;
use crate::outbox::Outboxes;
use crate::scripts::{self, LocalUser, OutputSink, ScriptCommand, ScriptEnd, ScriptRun};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tether_shared::limits;
use tether_shared::proto::{EventKind, LogStream, Manifest, Script, ScriptTrigger, Span};
use tether_shared::Lifecycle;
use tokio::sync::watch;

/// Environment variables the agent keeps from its scripts: the token is the agent's secret.
const HIDDEN_ENV: &[&str] = &[crate::config::TOKEN_ENV, crate::config::TOKEN_FILE_ENV];

/// What phases need from the agent.
#[derive(Debug)]
pub struct PhaseEnv {
    pub outboxes: Arc<Outboxes>,
    pub clock: WallClock,
    pub user: LocalUser,
    /// `DATA/logs`.
    pub logs_dir: PathBuf,
    /// `DATA/running`: the process groups of the scripts running now (`tether_shared::leftovers`).
    pub running_dir: PathBuf,
    pub metrics: Arc<AgentMetrics>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseKind {
    Start,
    Stop,
}

impl PhaseKind {
    fn trigger(self) -> ScriptTrigger {
        match self {
            PhaseKind::Start => ScriptTrigger::Start,
            PhaseKind::Stop => ScriptTrigger::Stop,
        }
    }

    /// The span stage of this phase's scripts.
    pub fn stage(self) -> &'static str {
        match self {
            PhaseKind::Start => "script",
            PhaseKind::Stop => "stop_script",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            PhaseKind::Start => "startup script",
            PhaseKind::Stop => "stop script",
        }
    }
}

/// One script's run within a phase.
#[derive(Debug, Clone)]
pub struct ScriptResult {
    pub name: String,
    pub blocks_login: bool,
    pub run: ScriptRun,
}

/// Runs every script of `kind` in `manifest` in parallel and returns their results in manifest order.
/// `overall` bounds each script's time on top of its own timeout (the stop phase's budget). A span
/// is pushed for each script as it ends. `cancel` turning true kills all the phase's scripts.
pub async fn run_phase(
    env: Arc<PhaseEnv>,
    manifest: Arc<Manifest>,
    kind: PhaseKind,
    overall: Option<Duration>,
    cancel: watch::Receiver<bool>,
) -> Vec<ScriptResult> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut names = Vec::new();
    for (index, script) in manifest.scripts.iter().enumerate() {
        if script.on == ScriptTrigger::Cron {
            tracing::debug!(script = %script.name, "cron scripts are not run by this agent version");
            continue;
        }
        if script.on != kind.trigger() {
            continue;
        }
        names.push((index, script.name.clone(), script.blocks_login));
        let (env, manifest, script, cancel) = (env.clone(), manifest.clone(), script.clone(), cancel.clone());
        tasks.spawn(async move { (index, run_one(&env, &manifest, &script, kind, overall, cancel).await) });
    }
    let mut results: Vec<(usize, ScriptResult)> = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((index, result)) => results.push((index, result)),
            Err(e) => tracing::error!(error = %e, "a script task failed"),
        }
    }
    // A task that panicked still counts as a failed script.
    for (index, name, blocks_login) in names {
        if !results.iter().any(|(i, _)| *i == index) {
            let now = tokio::time::Instant::now();
            let run = ScriptRun { started: now, ended: now, end: ScriptEnd::Failed("internal agent error".into()) };
            results.push((index, ScriptResult { name, blocks_login, run }));
        }
    }
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

async fn run_one(
    env: &PhaseEnv,
    manifest: &Manifest,
    script: &Script,
    kind: PhaseKind,
    overall: Option<Duration>,
    cancel: watch::Receiver<bool>,
) -> ScriptResult {
    let build = manifest.build;
    let own = (script.timeout_ms > 0).then(|| Duration::from_millis(script.timeout_ms));
    let timeout = match (own, overall) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let mut vars: Vec<(String, String)> = manifest.env.clone();
    vars.push(("TETHER_WORKSPACE".into(), manifest.workspace.clone()));
    let working_dir = match &manifest.working_dir {
        Some(dir) if !dir.is_empty() => env.user.home.join(dir),
        _ => env.user.home.clone(),
    };
    let cmd = ScriptCommand {
        shell: env.user.shell.clone(),
        run: script.run.clone(),
        env: vars,
        env_remove: HIDDEN_ENV.iter().map(|s| s.to_string()).collect(),
        working_dir,
        timeout,
        record_in: Some(env.running_dir.clone()),
    };
    let mut sink = ScriptLog::open(env, build, &script.name);
    tracing::info!(build, script = %script.name, stage = kind.stage(), "script started");
    let run = scripts::run(&cmd, &mut sink, cancel).await;
    sink.local.close().await;
    tracing::info!(build, script = %script.name, stage = kind.stage(), end = ?run.end, "script ended");
    env.metrics.script_ended(kind, run.end.span_status(), run.ended.saturating_duration_since(run.started));
    env.outboxes.push_event(
        build,
        EventKind::Span(Span {
            stage: kind.stage().to_string(),
            name: script.name.clone(),
            started_at_ms: env.clock.at(run.started),
            ended_at_ms: env.clock.at(run.ended),
            exit_code: run.end.exit_code(),
            status: run.end.span_status(),
        }),
    );
    ScriptResult { name: script.name.clone(), blocks_login: script.blocks_login, run }
}

/// A script's lines: to `DATA/logs/build-N/NAME.log` and to the log outbox.
struct ScriptLog<'a> {
    env: &'a PhaseEnv,
    build: u64,
    script: String,
    local: LocalLog,
}

impl<'a> ScriptLog<'a> {
    fn open(env: &'a PhaseEnv, build: u64, script: &str) -> Self {
        let local = LocalLog::open(log_file(&env.logs_dir, build, script));
        ScriptLog { env, build, script: script.to_string(), local }
    }
}

impl OutputSink for ScriptLog<'_> {
    fn line(&mut self, stream: LogStream, line: String) {
        self.local.line(&line);
        self.env.outboxes.push_log(self.build, &self.script, stream, self.env.clock.now_ms(), line);
    }
}

/// Bytes of lines a script's local log holds in memory while the disk catches up: what a script may
/// print in all (its output is capped at that), so lines are left out only when the disk is stuck.
const LOCAL_LOG_QUEUE_BYTES: usize = limits::MAX_SCRIPT_OUTPUT as usize;

/// How long a finished script waits for its local log to reach the file before it reports its end.
const LOCAL_LOG_CLOSE: Duration = Duration::from_secs(2);

/// A script's local copy of its output, written on the blocking pool. The data directory is under
/// the home by default, which may be a network filesystem: a slow or hung disk must not hold up the
/// agent's one worker thread, and with it every SSH session and heartbeat. Lines wait in a bounded
/// queue; past it the local copy skips them (the coordinator's copy has them) and says so at its end.
struct LocalLog {
    lines: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    /// Bytes queued and not yet written, at most [`LOCAL_LOG_QUEUE_BYTES`].
    queued: Arc<std::sync::atomic::AtomicUsize>,
    skipped: Arc<std::sync::atomic::AtomicU64>,
    written: Option<tokio::sync::oneshot::Receiver<()>>,
    path: PathBuf,
}

impl LocalLog {
    fn open(path: PathBuf) -> LocalLog {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (done, written) = tokio::sync::oneshot::channel();
        let skipped = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (file, count, bytes) = (path.clone(), skipped.clone(), queued.clone());
        tokio::task::spawn_blocking(move || {
            write_local_log(&file, rx, &bytes, &count);
            let _ = done.send(());
        });
        LocalLog { lines: Some(tx), queued, skipped, written: Some(written), path }
    }

    fn line(&mut self, line: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(lines) = &self.lines else { return };
        if self.queued.load(Relaxed).saturating_add(line.len()) > LOCAL_LOG_QUEUE_BYTES {
            self.skipped.fetch_add(1, Relaxed);
            return;
        }
        self.queued.fetch_add(line.len(), Relaxed);
        if lines.send(line.to_string()).is_err() {
            // The writer gave up (it said why).
            self.lines = None;
        }
    }

    /// Ends the file, waiting a little for the disk.
    async fn close(&mut self) {
        self.lines = None;
        if let Some(written) = self.written.take() {
            if tokio::time::timeout(LOCAL_LOG_CLOSE, written).await.is_err() {
                tracing::warn!(path = %self.path.display(), "the script's local log is still being written: the disk is slow");
            }
        }
    }
}

/// The writer's side of a [`LocalLog`]: until the script's end, then a note of lines skipped.
fn write_local_log(
    path: &Path,
    mut lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    queued: &std::sync::atomic::AtomicUsize,
    skipped: &std::sync::atomic::AtomicU64,
) {
    let opened = path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| std::fs::File::create(path));
    let mut file = match opened {
        Ok(file) => std::io::BufWriter::new(file),
        Err(e) => return tracing::warn!(path = %path.display(), error = %e, "cannot write the script's local log"),
    };
    let mut written = Ok(());
    while let Some(line) = lines.blocking_recv() {
        queued.fetch_sub(line.len(), std::sync::atomic::Ordering::Relaxed);
        written = writeln!(file, "{line}");
        if written.is_err() {
            break;
        }
    }
    drop(lines);
    let skipped = skipped.load(std::sync::atomic::Ordering::Relaxed);
    if skipped > 0 && written.is_ok() {
        written = writeln!(
            file,
            "[tether-agent: {skipped} lines are missing here because this disk was too slow; `tether workspace logs` has them]"
        );
    }
    if let Err(e) = written.and_then(|()| file.flush()) {
        tracing::warn!(path = %path.display(), error = %e, "writing the script's local log");
    }
}

/// `LOGS/build-N/NAME.log`, with the name made safe as one path component.
pub fn log_file(logs_dir: &Path, build: u64, script: &str) -> PathBuf {
    logs_dir.join(format!("build-{build}")).join(format!("{}.log", file_name(script)))
}

fn file_name(name: &str) -> String {
    let safe: String = name
        .chars()
        .take(limits::MAX_NAME)
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .collect();
    if safe.is_empty() || safe.starts_with('.') {
        format!("_{safe}")
    } else {
        safe
    }
}

/// The lifecycle a finished phase reports, and the first problem in words.
pub fn verdict(kind: PhaseKind, results: &[ScriptResult]) -> (Lifecycle, Option<String>) {
    let problems: Vec<&ScriptResult> = results.iter().filter(|r| !r.run.end.is_ok()).collect();
    let timed_out = problems.iter().any(|r| matches!(r.run.end, ScriptEnd::TimedOut(_)));
    let lifecycle = match (kind, problems.is_empty(), timed_out) {
        (PhaseKind::Start, true, _) => Lifecycle::Ready,
        (PhaseKind::Start, false, true) => Lifecycle::StartTimeout,
        (PhaseKind::Start, false, false) => Lifecycle::StartError,
        (PhaseKind::Stop, true, _) => Lifecycle::Off,
        (PhaseKind::Stop, false, true) => Lifecycle::ShutdownTimeout,
        (PhaseKind::Stop, false, false) => Lifecycle::ShutdownError,
    };
    // A script that blocks login is the one users wait for: name its problem first.
    let first = problems.iter().find(|r| r.blocks_login).or(problems.first());
    let detail = first.map(|r| {
        let mut text = describe(kind, r);
        match problems.len() {
            1 => {}
            2 => text.push_str(" (and 1 more problem)"),
            n => text.push_str(&format!(" (and {} more problems)", n - 1)),
        }
        truncate(text, limits::MAX_TEXT)
    });
    (lifecycle, detail)
}

fn describe(kind: PhaseKind, r: &ScriptResult) -> String {
    let what = format!("{} '{}'", kind.noun(), r.name);
    match &r.run.end {
        ScriptEnd::Exited(code) => format!("{what} exited with code {code}"),
        ScriptEnd::Signaled(sig) => match nix::sys::signal::Signal::try_from(*sig) {
            Ok(s) => format!("{what} was killed by signal {sig} ({s})"),
            Err(_) => format!("{what} was killed by signal {sig}"),
        },
        ScriptEnd::TimedOut(after) => format!("{what} timed out after {}", seconds(*after)),
        ScriptEnd::Cancelled => format!("{what} was stopped because the agent is shutting down"),
        ScriptEnd::Failed(reason) => format!("{what} could not run: {reason}"),
    }
}

/// `300s`, `1.5s`.
fn seconds(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Scrape;
    use tokio::time::Instant;

    fn result(name: &str, blocks_login: bool, end: ScriptEnd) -> ScriptResult {
        let now = Instant::now();
        ScriptResult { name: name.into(), blocks_login, run: ScriptRun { started: now, ended: now, end } }
    }

    #[test]
    fn all_ok_is_ready_or_off() {
        let ok = [result("a", false, ScriptEnd::Exited(0))];
        assert_eq!(verdict(PhaseKind::Start, &ok), (Lifecycle::Ready, None));
        assert_eq!(verdict(PhaseKind::Start, &[]), (Lifecycle::Ready, None));
        assert_eq!(verdict(PhaseKind::Stop, &ok), (Lifecycle::Off, None));
    }

    #[test]
    fn failures_name_the_first_problem() {
        let r = [result("lint", false, ScriptEnd::Exited(0)), result("install-deps", false, ScriptEnd::Exited(2))];
        assert_eq!(
            verdict(PhaseKind::Start, &r),
            (Lifecycle::StartError, Some("startup script 'install-deps' exited with code 2".into()))
        );
        let r = [result("warm-cache", false, ScriptEnd::TimedOut(Duration::from_secs(300)))];
        assert_eq!(
            verdict(PhaseKind::Start, &r),
            (Lifecycle::StartTimeout, Some("startup script 'warm-cache' timed out after 300s".into()))
        );
    }

    #[test]
    fn timeout_wins_the_lifecycle_and_blocking_scripts_win_the_detail() {
        let r = [
            result("warm-cache", false, ScriptEnd::TimedOut(Duration::from_millis(1500))),
            result("db", true, ScriptEnd::Signaled(9)),
            result("x", false, ScriptEnd::Exited(1)),
        ];
        assert_eq!(
            verdict(PhaseKind::Start, &r),
            (
                Lifecycle::StartTimeout,
                Some("startup script 'db' was killed by signal 9 (SIGKILL) (and 2 more problems)".into())
            )
        );
        let r = [result("flush", false, ScriptEnd::Exited(1)), result("save", false, ScriptEnd::Failed("boom".into()))];
        assert_eq!(
            verdict(PhaseKind::Stop, &r),
            (Lifecycle::ShutdownError, Some("stop script 'flush' exited with code 1 (and 1 more problem)".into()))
        );
    }

    #[test]
    fn log_file_names_are_safe() {
        let root = Path::new("/data/logs");
        assert_eq!(log_file(root, 3, "install-deps"), PathBuf::from("/data/logs/build-3/install-deps.log"));
        assert_eq!(log_file(root, 3, "../../etc/passwd"), PathBuf::from("/data/logs/build-3/_.._.._etc_passwd.log"));
        assert_eq!(log_file(root, 3, ""), PathBuf::from("/data/logs/build-3/_.log"));
        assert_eq!(log_file(root, 3, "warm cache/é"), PathBuf::from("/data/logs/build-3/warm_cache__.log"));
    }

    fn manifest(scripts: Vec<Script>) -> Manifest {
        Manifest {
            workspace: "ws1".into(),
            build: 9,
            scripts,
            env: vec![("GREETING".into(), "hello".into())],
            working_dir: None,
            shutdown_timeout_ms: 10_000,
            ssh: Default::default(),
        }
    }

    fn script(name: &str, run: &str, on: ScriptTrigger) -> Script {
        Script { name: name.into(), run: run.into(), on, schedule: None, timeout_ms: 30_000, blocks_login: false }
    }

    #[test]
    fn the_local_log_says_how_many_lines_it_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/build-1/a.log");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send("one".to_string()).unwrap();
        tx.send("two".to_string()).unwrap();
        drop(tx);
        let queued = std::sync::atomic::AtomicUsize::new(6);
        write_local_log(&path, rx, &queued, &std::sync::atomic::AtomicU64::new(3));
        assert_eq!(queued.into_inner(), 0);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("one\ntwo\n[tether-agent: 3 lines are missing here"), "{text}");
    }

    #[tokio::test]
    async fn a_local_log_that_cannot_be_written_is_given_up() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("logs"), "a file where the directory would go").unwrap();
        let mut log = LocalLog::open(dir.path().join("logs/build-1/a.log"));
        // The writer gives up at once, while the script still runs...
        log.written.take().unwrap().await.unwrap();
        // ...and the script's lines are no longer queued for it.
        log.line("after");
        assert!(log.lines.is_none());
        log.close().await;
    }

    #[tokio::test]
    async fn phase_runs_its_scripts_in_parallel_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let outboxes = Arc::new(Outboxes::default());
        let env = Arc::new(PhaseEnv {
            outboxes: outboxes.clone(),
            clock: WallClock::start(),
            user: LocalUser { shell: "/bin/sh".into(), home: dir.path().to_path_buf() },
            logs_dir: dir.path().join("logs"),
            running_dir: dir.path().join("running"),
            metrics: Default::default(),
        });
        // a and b each wait for the other's file: they only finish if they run at the same time.
        let m = Arc::new(manifest(vec![
            script(
                "a",
                "touch a.up; while [ ! -e b.up ]; do sleep 0.05; done; echo \"$GREETING from $TETHER_WORKSPACE\"",
                ScriptTrigger::Start,
            ),
            script("b", "touch b.up; while [ ! -e a.up ]; do sleep 0.05; done; exit 4", ScriptTrigger::Start),
            script("bye", "echo bye", ScriptTrigger::Stop),
            script("nightly", "echo never", ScriptTrigger::Cron),
        ]));
        let results = run_phase(env.clone(), m.clone(), PhaseKind::Start, None, watch::channel(false).1).await;
        let ends: Vec<_> = results.iter().map(|r| (r.name.as_str(), r.run.end.clone())).collect();
        assert_eq!(ends, vec![("a", ScriptEnd::Exited(0)), ("b", ScriptEnd::Exited(4))]);
        assert_eq!(std::fs::read_to_string(dir.path().join("logs/build-9/a.log")).unwrap(), "hello from ws1\n");
        let logs = outboxes.next_logs(&WallClock::start()).unwrap();
        assert_eq!(logs.len(), 1);
        assert_eq!(
            (logs[0].seq, logs[0].build, logs[0].script.as_str(), logs[0].line.as_str()),
            (1, 9, "a", "hello from ws1")
        );
        let events = outboxes.next_events(false).unwrap();
        let spans: Vec<_> = events
            .iter()
            .map(|e| match &e.kind {
                EventKind::Span(s) => (s.stage.as_str(), s.name.as_str(), s.exit_code, s.status),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(spans.len(), 2);
        assert!(spans.contains(&("script", "a", Some(0), tether_shared::SpanStatus::Ok)));
        assert!(spans.contains(&("script", "b", Some(4), tether_shared::SpanStatus::ExitFailure)));
        let text =
            Scrape { metrics: env.metrics.clone(), outboxes: outboxes.clone(), ssh: Default::default() }.render();
        assert!(
            text.contains("\ntether_agent_script_runs_total{phase=\"start\",outcome=\"exit_failure\"} 1\n"),
            "{text}"
        );
        outboxes.ack(tether_shared::proto::Channel::Events, events.last().unwrap().seq);

        let results = run_phase(env, m, PhaseKind::Stop, Some(Duration::from_secs(5)), watch::channel(false).1).await;
        assert_eq!(results.len(), 1);
        assert_eq!(verdict(PhaseKind::Stop, &results), (Lifecycle::Off, None));
        let events = outboxes.next_events(false).unwrap();
        assert!(matches!(&events[0].kind, EventKind::Span(s) if s.stage == "stop_script" && s.name == "bye"));
    }
}
