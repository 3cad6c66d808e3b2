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
