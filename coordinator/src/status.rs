//! How a workspace's status follows from what the coordinator knows, and the liveness clock that
//! turns silence into "unhealthy". Pure functions and a sans-IO tracker: time is passed in.

use std::collections::HashMap;
use std::time::{Duration, Instant};
use tether_shared::{Lifecycle, SpanStatus, WorkspaceStatus};

/// A start script that did not end well, from its span.
#[derive(Debug, Clone, PartialEq)]
pub struct ScriptProblem {
    pub script: String,
    pub blocks_login: bool,
    pub status: SpanStatus,
    pub exit_code: Option<i32>,
    pub timeout: Duration,
    /// The agent's own account of this script's failure, when it gave one (see [`agent_detail`]).
    pub detail: Option<String>,
}

impl ScriptProblem {
    pub fn describe(&self) -> String {
        match (self.status, self.exit_code, &self.detail) {
            (SpanStatus::TimedOut, _, _) => {
                format!("startup script '{}' timed out after {}", self.script, secs(self.timeout))
            }
            (_, Some(code), _) => format!("startup script '{}' exited with code {code}", self.script),
            (_, None, Some(detail)) => detail.clone(),
            (SpanStatus::ExitFailure, None, None) => format!("startup script '{}' was killed by a signal", self.script),
            (_, None, None) => {
                format!("startup script '{0}' could not run (`logs --script {0}` says why)", self.script)
            }
        }
    }
}

/// The agent's detail for a start phase (`startup script 'NAME' …`, naming the script users wait for
/// first) if it is about `script` and says more than a span can: why it could not run, or which
/// signal killed it.
pub fn agent_detail(lifecycle_detail: Option<&str>, script: &str) -> Option<String> {
    let detail = lifecycle_detail?;
    let rest = detail.strip_prefix(&format!("startup script '{script}' "))?;
    (rest.starts_with("could not run") || rest.starts_with("was killed by signal")).then(|| detail.to_string())
}

/// "120s", "1.5s": durations in reasons, in seconds as people read them.
pub fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Status of a started workspace whose agent is connected, from its lifecycle and script results.
pub fn connected_status(lifecycle: Option<Lifecycle>, problems: &[ScriptProblem]) -> (WorkspaceStatus, String) {
    use Lifecycle::*;
    match lifecycle {
        None => (WorkspaceStatus::Starting, "agent connected; fetching its manifest".into()),
        Some(Created | Starting) => (WorkspaceStatus::Starting, "agent connected; startup scripts running".into()),
        Some(Ready) => (WorkspaceStatus::Running, "agent connected; startup scripts finished".into()),
        Some(StartError | StartTimeout) => {
            if let Some(p) = problems.iter().find(|p| p.blocks_login) {
                (WorkspaceStatus::Unhealthy, p.describe())
            } else if let Some(p) = problems.first() {
                (WorkspaceStatus::Running, format!("agent connected; {} (does not block login)", p.describe()))
            } else {
                (WorkspaceStatus::Unhealthy, "startup scripts failed".into())
            }
        }
        Some(ShuttingDown) => (WorkspaceStatus::Stopping, "agent is running stop scripts".into()),
        Some(Off | ShutdownError | ShutdownTimeout) => (WorkspaceStatus::Stopping, "agent has shut down".into()),
    }
}

pub fn lost_reason(since_heartbeat: Duration) -> String {
    // A fact about the moment it was lost, which stays true as the reason ages ("last heartbeat
    // 15s ago" read as counting from now); `show` has the time of the last heartbeat.
    format!("agent has lost connection (no heartbeat for {}s)", since_heartbeat.as_secs())
}

/// Why a workspace whose `process` agent ended without a goodbye it could have said, from how its
/// process ended: killed by a signal, or a crash (Rust's exit status after a panic). `None` for an
/// exit of its own, which its goodbye or its rejection explains. It starts with "agent has", as the
/// other reasons of an agent that is gone do (see `TOKEN_REPLACED_REASON`).
pub fn agent_death_reason(signal: Option<i32>, code: Option<i32>, log: &std::path::Path) -> Option<String> {
    if let Some(sig) = signal {
        let name = nix::sys::signal::Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("unknown");
        return Some(format!("agent has died: its process was killed by signal {sig} ({name})"));
    }
    (code == Some(101))
        .then(|| format!("agent has crashed: its process exited with status 101 (its log: {})", log.display()))
}

/// Why a workspace whose agent was running its stop scripts on its own (a signal in the workspace)
/// is stopped without the agent's goodbye; `how` says how the coordinator learned the agent was gone.
pub fn lost_in_shutdown_reason(how: &str) -> String {
    format!("agent was lost during its own shutdown (no goodbye; {how})")
}

/// The reason of a workspace created and not started.
pub const CREATED_NOT_STARTED: &str = "created; not started";

/// Added to the reason of a workspace whose agent ended it on its own while the coordinator stops
/// what the provisioner started; the part before it is the reason the workspace will be stopped with.
pub const PROVISIONER_STOP_SUFFIX: &str = "; stopping what the provisioner started";

/// Why a workspace whose agent was running its stop scripts on its own is stopped when another
/// agent process connects while the first one's connection is still open: that one may be alive and
/// finishing, or dead and not yet noticed, so the reason does not call it lost.
pub const SUPERSEDED_IN_SHUTDOWN_REASON: &str =
    "agent was shutting down on its own when a new agent process connected, before its goodbye";

/// Why a workspace's agent was disconnected by `tether workspace token`. It starts with "agent has",
/// as the other reasons of an agent that is gone do, so a restarted coordinator does not wait for
/// this agent to come back (see `Engine::resume`).
pub const TOKEN_REPLACED_REASON: &str =
    "agent has been disconnected: its token was replaced; no agent has connected with the new token yet";

pub fn not_connected_reason(after: Duration) -> String {
    format!("agent has not connected after {}", secs(after))
}

/// Statuses in which the coordinator expects an agent and watches for it.
pub fn expects_agent(s: WorkspaceStatus) -> bool {
    matches!(s, WorkspaceStatus::Starting | WorkspaceStatus::Running | WorkspaceStatus::Unhealthy)
}

/// Whether a new agent process (not the one before, reconnecting) starts the build's lifecycle
/// afresh. It does when the process before had begun its shutdown and the coordinator did not take
/// that as one (the news came while it counted that agent as lost, so the workspace stayed
/// starting, running or unhealthy): that shutdown is over, the new process reports where the
/// build's start got, and its report must count, which it would not against a stored lifecycle
/// that never moves back (the workspace would show `stopping` beside a live agent).
pub fn new_process_restarts_lifecycle(status: WorkspaceStatus, lifecycle: Option<Lifecycle>, reconnect: bool) -> bool {
    !reconnect && expects_agent(status) && lifecycle.is_some_and(|l| l.shutdown_begun())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Watch {
    /// Started, no agent yet; unhealthy at the deadline.
    Awaiting { deadline: Instant, timeout: Duration },
    /// An agent has been heard from; unhealthy when silent for `timeout`.
    Heard { last: Instant, timeout: Duration, lost: bool },
}

/// What the liveness clock decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Expiry {
    NeverConnected { workspace: i64, after: Duration },
    Lost { workspace: i64, since_heartbeat: Duration },
}

/// In-memory liveness of every watched workspace. Heartbeats touch only this, never the database.
#[derive(Debug, Default)]
pub struct Liveness {
    watches: HashMap<i64, Watch>,
}

impl Liveness {
    /// Start waiting for an agent that should connect within `timeout`, counted from `since`.
    pub fn await_agent(&mut self, workspace: i64, since: Instant, timeout: Duration) {
        self.watches.insert(workspace, Watch::Awaiting { deadline: since + timeout, timeout });
    }

    /// An agent was heard from (hello or heartbeat). Returns true if it had been declared lost.
    pub fn heard(&mut self, workspace: i64, now: Instant, timeout: Duration) -> bool {
        let was_lost = matches!(self.watches.get(&workspace), Some(Watch::Heard { lost: true, .. }));
        self.watches.insert(workspace, Watch::Heard { last: now, timeout, lost: false });
        was_lost
    }

    /// Last time the agent was heard from, if it was.
    pub fn last_heard(&self, workspace: i64) -> Option<Instant> {
        match self.watches.get(&workspace) {
            Some(Watch::Heard { last, .. }) => Some(*last),
            _ => None,
        }
    }

    /// Counts a recovery as not yet recorded: the agent stays lost until it is heard from again.
    pub fn relapse(&mut self, workspace: i64) {
        if let Some(Watch::Heard { lost, .. }) = self.watches.get_mut(&workspace) {
            *lost = true;
        }
    }

    pub fn is_lost(&self, workspace: i64) -> bool {
        matches!(self.watches.get(&workspace), Some(Watch::Heard { lost: true, .. }))
    }

    pub fn forget(&mut self, workspace: i64) {
        self.watches.remove(&workspace);
    }

    pub fn len(&self) -> usize {
        self.watches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.watches.is_empty()
    }

    /// Watches that ran out at `now`. Each is reported once: a lost agent stays lost until heard
    /// from again, and an awaited one is dropped from the watch.
    pub fn expire(&mut self, now: Instant) -> Vec<Expiry> {
        let mut out = Vec::new();
        self.watches.retain(|&workspace, w| match w {
            Watch::Awaiting { deadline, timeout } if now >= *deadline => {
                out.push(Expiry::NeverConnected { workspace, after: *timeout });
                false
            }
            Watch::Heard { last, timeout, lost } if !*lost && now.duration_since(*last) >= *timeout => {
                *lost = true;
                out.push(Expiry::Lost { workspace, since_heartbeat: now.duration_since(*last) });
                true
            }
            _ => true,
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(script: &str, blocks: bool, status: SpanStatus, code: Option<i32>) -> ScriptProblem {
        ScriptProblem {
            script: script.into(),
            blocks_login: blocks,
            status,
            exit_code: code,
            timeout: Duration::from_secs(300),
            detail: None,
        }
    }

    #[test]
    fn an_agent_process_that_died_says_how() {
        let log = std::path::Path::new("/w/agent.log");
        assert_eq!(
            agent_death_reason(Some(9), None, log).as_deref(),
            Some("agent has died: its process was killed by signal 9 (SIGKILL)")
        );
        assert_eq!(
            agent_death_reason(Some(11), None, log).as_deref(),
            Some("agent has died: its process was killed by signal 11 (SIGSEGV)")
        );
        assert_eq!(
            agent_death_reason(None, Some(101), log).as_deref(),
            Some("agent has crashed: its process exited with status 101 (its log: /w/agent.log)")
        );
        // Its own exits: a goodbye, or a rejection (a replaced token, a bad configuration), said why.
        for code in [0, 1, 2] {
            assert_eq!(agent_death_reason(None, Some(code), log), None);
        }
    }

    #[test]
    fn only_a_new_process_after_an_unnoticed_shutdown_restarts_the_lifecycle() {
        use Lifecycle as L;
        use WorkspaceStatus as W;
        for status in [W::Starting, W::Running, W::Unhealthy] {
            for lc in [L::ShuttingDown, L::Off, L::ShutdownError, L::ShutdownTimeout] {
                assert!(new_process_restarts_lifecycle(status, Some(lc), false), "{status} {lc}");
                assert!(!new_process_restarts_lifecycle(status, Some(lc), true), "a reconnect keeps it");
            }
            for lc in
                [None, Some(L::Created), Some(L::Starting), Some(L::Ready), Some(L::StartError), Some(L::StartTimeout)]
            {
                assert!(!new_process_restarts_lifecycle(status, lc, false), "{status} {lc:?}");
            }
        }
        // A shutdown the coordinator knows of is ended by the new process otherwise (agent_hello).
        for status in [W::Stopping, W::Stopped, W::Pending, W::Failed, W::Deleting, W::Deleted] {
            assert!(!new_process_restarts_lifecycle(status, Some(L::ShuttingDown), false), "{status}");
        }
    }

    #[test]
    fn status_follows_lifecycle_and_blocking_scripts() {
        let check = |lc, problems: &[ScriptProblem], want: WorkspaceStatus, reason: &str| {
            let (s, r) = connected_status(lc, problems);
            assert_eq!((s, r.as_str()), (want, reason));
        };
        check(Some(Lifecycle::Starting), &[], WorkspaceStatus::Starting, "agent connected; startup scripts running");
        check(Some(Lifecycle::Ready), &[], WorkspaceStatus::Running, "agent connected; startup scripts finished");
        check(
            Some(Lifecycle::StartError),
            &[
                problem("lint", false, SpanStatus::ExitFailure, Some(1)),
                problem("install-deps", true, SpanStatus::ExitFailure, Some(2)),
            ],
            WorkspaceStatus::Unhealthy,
            "startup script 'install-deps' exited with code 2",
        );
        check(
            Some(Lifecycle::StartTimeout),
            &[problem("warm-cache", true, SpanStatus::TimedOut, None)],
            WorkspaceStatus::Unhealthy,
            "startup script 'warm-cache' timed out after 300s",
        );
        check(
            Some(Lifecycle::StartError),
            &[problem("lint", false, SpanStatus::ExitFailure, Some(1))],
            WorkspaceStatus::Running,
            "agent connected; startup script 'lint' exited with code 1 (does not block login)",
        );
    }

    #[test]
    fn a_script_without_exit_code_uses_the_agent_s_words_when_they_are_about_it() {
        let could_not = "startup script 'setup' could not run: could not start /bin/sh in /nope: No such file or \
                         directory (os error 2)";
        let killed = "startup script 'setup' was killed by signal 9 (SIGKILL) (and 1 more problem)";
        assert_eq!(agent_detail(Some(could_not), "setup").as_deref(), Some(could_not));
        assert_eq!(agent_detail(Some(killed), "setup").as_deref(), Some(killed));
        assert_eq!(agent_detail(Some(could_not), "set"), None, "another script's detail");
        assert_eq!(agent_detail(Some("startup script 'setup' exited with code 2"), "setup"), None);
        assert_eq!(agent_detail(None, "setup"), None);
        let killed_by_span = problem("setup", true, SpanStatus::ExitFailure, None);
        assert_eq!(killed_by_span.describe(), "startup script 'setup' was killed by a signal");
        let mut p = problem("setup", true, SpanStatus::Error, None);
        assert_eq!(p.describe(), "startup script 'setup' could not run (`logs --script setup` says why)");
        p.detail = agent_detail(Some(could_not), "setup");
        assert_eq!(p.describe(), could_not);
    }

    #[test]
    fn liveness_reports_each_expiry_once() {
        let t0 = Instant::now();
        let mut l = Liveness::default();
        l.await_agent(1, t0, Duration::from_secs(120));
        l.heard(2, t0, Duration::from_secs(15));
        assert!(l.expire(t0 + Duration::from_secs(14)).is_empty());
        assert_eq!(
            l.expire(t0 + Duration::from_secs(17)),
            vec![Expiry::Lost { workspace: 2, since_heartbeat: Duration::from_secs(17) }]
        );
        assert!(l.expire(t0 + Duration::from_secs(18)).is_empty(), "lost is reported once");
        assert!(l.heard(2, t0 + Duration::from_secs(110), Duration::from_secs(15)), "recovery is reported");
        // A recovery that could not be recorded is reported again at the next heartbeat.
        l.relapse(2);
        assert!(l.heard(2, t0 + Duration::from_secs(111), Duration::from_secs(15)), "recovery is reported again");
        assert!(!l.heard(2, t0 + Duration::from_secs(112), Duration::from_secs(15)), "and then not");
        assert_eq!(
            l.expire(t0 + Duration::from_secs(120)),
            vec![Expiry::NeverConnected { workspace: 1, after: Duration::from_secs(120) }]
        );
        assert_eq!(not_connected_reason(Duration::from_secs(120)), "agent has not connected after 120s");
        assert_eq!(lost_reason(Duration::from_secs(17)), "agent has lost connection (no heartbeat for 17s)");
        assert_eq!(
            lost_in_shutdown_reason("no heartbeat for 6s"),
            "agent was lost during its own shutdown (no goodbye; no heartbeat for 6s)"
        );
    }
}
