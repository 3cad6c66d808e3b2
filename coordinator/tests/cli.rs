//! The `tether` binary's own command-line behaviour (this file also makes `cargo test` build the
//! binary that the end-to-end tests in `tests/` run).

use std::process::Command;

fn tether() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tether"));
    c.env_remove("TETHER_URL").env_remove("TETHER_TOKEN").env_remove("TETHER_DATA_DIR");
    c
}

#[test]
fn version_and_help() {
    let out = tether().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("tether {}", env!("CARGO_PKG_VERSION")));
    let out = tether().args(["workspace", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["create", "start", "stop", "delete", "list", "show", "timings", "logs"] {
        assert!(help.contains(cmd), "help lists {cmd}: {help}");
    }
}

#[test]
fn without_a_coordinator_the_cli_says_how_to_find_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = tether().arg("--data-dir").arg(dir.path()).args(["workspace", "list"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: no coordinator to talk to: pass --url and --token"), "{err}");
}
