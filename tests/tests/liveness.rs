//! Agents that go away at awkward moments: during their own shutdown, or because their token was
//! replaced. Real `tether serve`, real `tether-agent`, the CLI.

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::process::{Child, ExitStatus};
use tether_tests::{external, wait_until, Agent, Coordinator, LONG};

/// A `process` workspace whose stop script outlasts any grace period a test gives it.
fn slow_stop_template(heartbeat_timeout: &str) -> String {
    format!(
        r#"
provisioner = "process"
heartbeat_timeout = "{heartbeat_timeout}"
[[script]]
name = "setup"
run = "echo up"
blocks_login = true

[[script]]
name = "save"
run = "sleep 30"
on = "stop"
"#
    )
}

/// The pid (and process group) of a `process` workspace's agent.
fn agent_pid(c: &Coordinator, name: &str) -> Pid {
    let path = c.data_dir().join(format!("workspaces/{name}/agent.pid"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    Pid::from_raw(text.trim().parse().expect("a pid"))
}

/// Starts a `process` workspace, SIGTERMs its agent (it shuts down on its own and the workspace
/// shows `stopping`), then SIGKILLs the agent's process group while its stop script still runs, as
/// the end of `docker stop`'s or a pod's grace period does: no goodbye ever comes.
fn kill_the_agent_during_its_own_shutdown(c: &Coordinator, name: &str, heartbeat_timeout: &str) {
    c.create(name, &slow_stop_template(heartbeat_timeout), &["--start"]);
    assert_eq!(c.wait_for(name, "running,unhealthy,failed", LONG)["status"], "running");
    let pid = agent_pid(c, name);
    kill(pid, Signal::SIGTERM).expect("SIGTERM the agent");
    let w = c.wait_for(name, "stopping", LONG);
    assert_eq!(w["status_reason"], "agent is running stop scripts", "{w}");
    assert_eq!(w["lifecycle"], "shutting_down", "{w}");
    killpg(pid, Signal::SIGKILL).expect("SIGKILL the agent's process group");
}

#[test]
fn a_workspace_whose_agent_dies_during_its_own_shutdown_is_stopped_when_its_heartbeats_lapse() {
    let c = Coordinator::start();
    kill_the_agent_during_its_own_shutdown(&c, "dev", "5s");

    let w = c.wait_for("dev", "stopped,unhealthy,running,failed", LONG);
    assert_eq!(w["status"], "stopped", "{w}");
    let reason = w["status_reason"].as_str().expect("a reason");
    assert!(
        reason.starts_with("agent was lost during its own shutdown (no goodbye; no heartbeat for "),
        "the reason says what happened: {reason}"
    );
    assert_eq!(w["lifecycle"], "shutting_down", "{w}");
    let history = c.show("dev")["history"].as_array().expect("history").clone();
    let path: Vec<&str> = history.iter().filter_map(|t| t["to"].as_str()).collect();
    assert_eq!(&path[path.len() - 2..], &["stopping", "stopped"], "{path:?}");

    // Start and stop work again: a new build with a new agent.
    let again = c.cli(&["workspace", "stop", "dev"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("workspace 'dev' is already stopped"));
    let started = c.json(&["workspace", "start", "dev"]);
    assert_eq!(started["status"], "pending", "{started}");
    let w = c.wait_for("dev", "running,unhealthy,failed", LONG);
    assert_eq!((w["status"].as_str(), w["build"].as_i64()), (Some("running"), Some(2)), "{w}");
    assert_eq!(w["status_reason"], "agent connected; startup scripts finished");
}

#[test]
fn stop_takes_over_an_agent_s_own_shutdown_even_when_the_agent_died() {
    // A heartbeat timeout longer than the test: only the stop can end the `stopping`.
    let c = Coordinator::start();
    kill_the_agent_during_its_own_shutdown(&c, "dev", "10m");

    let accepted = c.json(&["workspace", "stop", "dev"]);
    assert_eq!(
        (accepted["status"].as_str(), accepted["status_reason"].as_str()),
        (Some("stopping"), Some("stop requested"))
    );
    let w = c.wait_for("dev", "stopped,unhealthy,running,failed", LONG);
    assert_eq!((w["status"].as_str(), w["status_reason"].as_str()), (Some("stopped"), Some("stopped")), "{w}");
    assert_eq!(w["last_error"], serde_json::Value::Null, "{w}");
}

/// Waits (with a deadline) for a process the test started to exit.
fn exit_of(child: &mut Child) -> ExitStatus {
    let mut status = None;
    wait_until("the agent process to exit", LONG, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    status.expect("exited")
}

#[test]
fn a_new_token_disconnects_the_agent_using_the_old_one() {
    let c = Coordinator::start();
    let template = r#"
[[script]]
name = "setup"
run = "echo up"
blocks_login = true
"#;
    let mut old = external(&c, "ext", template);
    assert_eq!(c.wait_for("ext", "running,unhealthy", LONG)["status"], "running");
    assert_eq!(c.show("ext")["agent"]["connected"], true);

    let rotated = c.json(&["workspace", "token", "ext"]);
    assert_eq!(rotated["agent_disconnected"], true, "{rotated}");
    let token = rotated["agent_token"].as_str().expect("agent_token").to_string();

    // The agent holding the old token loses its connection; its reconnect is refused for good.
    let status = exit_of(&mut old.child);
    assert_eq!(status.code(), Some(2), "the agent exits 2 when its token is refused:\n{}", old.log_text());
    assert!(old.log_text().contains("agent token is not valid"), "the agent's log says why:\n{}", old.log_text());
    let w = c.show("ext");
    assert!(w["agent"].is_null(), "no agent is connected: {w}");
    assert_eq!(
        (w["status"].as_str(), w["status_reason"].as_str()),
        (
            Some("unhealthy"),
            Some("agent has been disconnected: its token was replaced; no agent has connected with the new token yet")
        ),
        "{w}"
    );
    // `start` cannot help an external workspace's agent, and says what would.
    let e = c.fails(&["workspace", "start", "ext"]);
    assert!(e.contains("its agent runs outside Tether: restart it where it runs (with the new token"), "{e}");

    // The new token works.
    let new = Agent::start(&c, &token, &c.data_dir().join("agent-ext-new"));
    let w = c.wait_for("ext", "running", LONG);
    assert_eq!(w["status_reason"], "agent connected; startup scripts finished", "{w}");
    assert_eq!(c.show("ext")["agent"]["connected"], true);
    drop(new);
}

#[test]
fn a_process_agent_that_dies_turns_its_workspace_unhealthy_at_once_saying_how() {
    let c = Coordinator::start();
    // A heartbeat timeout longer than the test: only the agent's death can turn it unhealthy.
    let template =
        "provisioner = \"process\"\nheartbeat_timeout = \"10m\"\n[[script]]\nname = \"setup\"\nrun = \"echo up\"\n";
    c.create("dev", template, &["--start"]);
    assert_eq!(c.wait_for("dev", "running,unhealthy,failed", LONG)["status"], "running");
    kill(agent_pid(&c, "dev"), Signal::SIGKILL).expect("SIGKILL the agent");
    let w = c.wait_for("dev", "unhealthy", LONG);
    assert_eq!(w["status_reason"], "agent has died: its process was killed by signal 9 (SIGKILL)", "{w}");
    wait_until("the dead agent's tunnel to close", LONG, || c.show("dev")["agent"].is_null());
    // Brought back: a new agent, and the start scripts do not run again.
    c.ok(&["workspace", "start", "dev"]);
    let w = c.wait_for("dev", "running,failed", LONG);
    assert_eq!(w["status_reason"], "agent connected; startup scripts finished", "{w}");

    // An agent the coordinator replaces itself is no news: a frozen one (its heartbeats stop) is
    // lost, and `start` kills it and starts another; its death is not reported.
    let template = "provisioner = \"process\"\nheartbeat_timeout = \"3s\"\n";
    c.create("frozen", template, &["--start"]);
    assert_eq!(c.wait_for("frozen", "running,unhealthy,failed", LONG)["status"], "running");
    let old = agent_pid(&c, "frozen");
    kill(old, Signal::SIGSTOP).expect("SIGSTOP the agent");
    let w = c.wait_for("frozen", "unhealthy", LONG);
    assert!(w["status_reason"].as_str().unwrap().starts_with("agent has lost connection"), "{w}");
    // Its QUIC connection is not yet timed out, but it does not count as connected: `show` agrees
    // with the status.
    assert_eq!(w["agent"]["connected"], false, "{w}");
    let shown = c.ok(&["workspace", "show", "frozen"]);
    // (Unless the connection has timed out meanwhile, and no agent is shown at all.)
    if shown.contains("\nagent:") {
        assert!(shown.contains("(not answering: its heartbeats stopped; figures below are its last)"), "{shown}");
    }
    c.ok(&["workspace", "start", "frozen"]);
    let w = c.wait_for("frozen", "running,failed", LONG);
    assert_eq!(w["status"], "running", "{w}");
    assert_ne!(agent_pid(&c, "frozen"), old);
    let history = c.show("frozen")["history"].as_array().unwrap().clone();
    assert!(!history.iter().any(|t| t["reason"].as_str().is_some_and(|r| r.contains("has died"))), "{history:?}");
    assert_eq!(c.show("frozen")["status"], "running");
}

/// Pids of processes whose command line is exactly `cmd`.
fn pids_of(cmd: &str) -> Vec<i32> {
    let out = std::process::Command::new("pgrep").args(["-x", "-f", cmd]).output().expect("pgrep");
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[test]
fn scripts_a_killed_agent_left_running_are_ended_not_run_twice_nor_left_behind() {
    let c = Coordinator::start();
    // A command line no other run of this test shares.
    let cmd = &format!("sleep {}", 100_000 + std::process::id());
    let template = format!("provisioner = \"process\"\n[[script]]\nname = \"long\"\nrun = \"exec {cmd}\"\n");
    c.create("dev", &template, &["--start"]);
    wait_until("the start script to run", LONG, || pids_of(cmd).len() == 1);
    let first = pids_of(cmd)[0];
    kill(agent_pid(&c, "dev"), Signal::SIGKILL).expect("SIGKILL the agent");
    c.wait_for("dev", "unhealthy", LONG);
    assert_eq!(pids_of(cmd), [first], "the script outlives its agent, as sshd's sessions do");

    // The agent is brought back and runs the unfinished script again: the first run is ended.
    c.ok(&["workspace", "start", "dev"]);
    // One run, the new one: the first is gone (a zombie left to whoever reaps it has no command
    // line for pgrep to match).
    wait_until("the script to run once again, and only once", LONG, || {
        let now = pids_of(cmd);
        now.len() == 1 && now[0] != first
    });

    c.ok(&["workspace", "delete", "dev", "--wait"]);
    wait_until("nothing left of the workspace", LONG, || pids_of(cmd).is_empty());
}
