//! The README's first command works.

use std::process::Command;
use tether_tests::bin;

#[test]
fn tether_demo_runs_a_workspace_through_its_life() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("tether"))
        .args(["demo", "--dir"])
        .arg(dir.path())
        .env_remove("TETHER_URL")
        .env_remove("TETHER_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "pending    start requested",
        "running    agent connected; startup scripts finished",
        "STAGE",
        "install-deps",
        "unhealthy  agent has lost connection",
        "script runs recorded: 3 before the restart, 3 after",
        "stopped    stopped; stop scripts finished",
    ] {
        assert!(stdout.contains(want), "demo output lacks {want:?}:\n{stdout}");
    }
}
