//! The README's first command works.

use std::process::Command;
use tether_tests::bin;

#[test]
fn tether_demo_runs_a_workspace_through_its_life() {
    let dir = tempfile::tempdir().unwrap();
    let demo = || {
        Command::new(bin("tether"))
            .args(["demo", "--dir"])
            .arg(dir.path())
            .env_remove("TETHER_URL")
            .env_remove("TETHER_TOKEN")
            .output()
            .unwrap()
    };
    let out = demo();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let wants = [
        "pending    start requested",
        "running    agent connected; startup scripts finished",
        "STAGE",
        "install-deps",
        "unhealthy  agent has died: its process was killed by signal 9 (SIGKILL)",
        "script runs recorded: 3 before the restart, 3 after",
        "stopped    stopped; stop scripts finished",
    ];
    for want in wants {
        assert!(stdout.contains(want), "demo output lacks {want:?}:\n{stdout}");
    }

    // Again in the same directory: the earlier workspace goes first, and only this run's changes
    // are shown (none before this run's start, so no negative times).
    let out = demo();
    let again = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "second demo failed:\n{again}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(again.contains("tether workspace delete demo --wait"), "{again}");
    for want in wants {
        assert!(again.contains(want), "second demo output lacks {want:?}:\n{again}");
    }
    let negative =
        |l: &str| l.trim_start().strip_prefix('-').is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()));
    assert!(!again.lines().any(negative), "times before this run:\n{again}");
}

/// The demo's agent, by the pid file it keeps in the demo's directory.
fn agent_pid(dir: &std::path::Path) -> i32 {
    let text = std::fs::read_to_string(dir.join("workspaces/demo/agent.pid")).expect("the agent's pid file");
    text.trim().parse().expect("a pid")
}

/// `tether demo | head`, and Ctrl-C: the demo stops there, quietly, and its agent (a process it
/// started, which would outlive it) goes with it.
#[test]
fn a_demo_cut_short_stops_its_agent() {
    use std::io::BufRead;
    use std::process::Stdio;
    use tether_tests::{pid_alive, wait_until, LONG};
    let demo = |dir: &std::path::Path| {
        Command::new(bin("tether"))
            .args(["demo", "--dir"])
            .arg(dir)
            .env_remove("TETHER_URL")
            .env_remove("TETHER_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Read until the workspace is running, then close the pipe, as `head` does.
    let read_until_running = |child: &mut std::process::Child| {
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines.by_ref() {
            if line.unwrap().contains("running    agent connected; startup scripts finished") {
                return;
            }
        }
        panic!("the demo ended before its workspace was running");
    };

    let piped = tempfile::tempdir().unwrap();
    let mut child = demo(piped.path());
    read_until_running(&mut child);
    let agent = agent_pid(piped.path());
    let mut status = None;
    wait_until("the demo to end after its stdout closed", LONG, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.unwrap().success(), "a closed stdout is not an error: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!pid_alive(agent), "the demo's agent was left running");

    let interrupted = tempfile::tempdir().unwrap();
    let mut child = demo(interrupted.path());
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        lines.by_ref().any(|l| l.unwrap().contains("running    agent connected")),
        "the demo ended before its workspace was running"
    );
    let agent = agent_pid(interrupted.path());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("stopped    stopped")), "the workspace was stopped: {rest:?}");
    assert!(!pid_alive(agent), "the demo's agent was left running");
}

/// `--dir` never takes a directory that holds something other than an earlier demo's data: a real
/// coordinator's workspace named `demo` would be deleted by the demo's clean start.
#[test]
fn the_demo_refuses_a_directory_that_is_not_a_demos() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tether.db"), b"a coordinator's data").unwrap();
    let out = Command::new(bin("tether")).args(["demo", "--dir"]).arg(dir.path()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds files that are not an earlier demo's"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("tether.db")).unwrap(), b"a coordinator's data");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "nothing was written there");
}
