//! Backup and restore: a backup taken while agents run, restored into a fresh data directory, gives
//! back a coordinator with every workspace, user, timing and key; a bad file changes nothing.

use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use tether_tests::{bin, ssh::keygen, wait_until, Agent, Coordinator, LONG};

const TEMPLATE: &str = r#"
heartbeat_timeout = "15s"
[[script]]
name = "install"
run = "sleep 0.2; echo installed"
blocks_login = true

[[script]]
name = "lint"
run = "exit 3"
"#;

/// `tether admin restore FILE --data-dir DIR [EXTRA]`, on no coordinator.
fn restore(file: &Path, dir: &Path, extra: &[&str]) -> Output {
    Command::new(bin("tether"))
        .args(["admin", "restore"])
        .arg(file)
        .arg("--data-dir")
        .arg(dir)
        .args(extra)
        .env_remove("TETHER_URL")
        .env_remove("TETHER_TOKEN")
        .output()
        .expect("run tether admin restore")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Names and sizes of every entry of a directory, to show it did not change.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            let e = e.expect("entry");
            (e.file_name().to_string_lossy().into_owned(), e.metadata().expect("metadata").len())
        })
        .collect();
    v.sort();
    v
}

fn names(list: &Value) -> Vec<String> {
    let mut v: Vec<String> =
        list.as_array().expect("list").iter().map(|w| w["name"].as_str().expect("name").to_string()).collect();
    v.sort();
    v
}

#[test]
fn a_backup_taken_while_agents_run_restores_into_a_fresh_coordinator() {
    let c = Coordinator::start();
    let key = c.data_dir().join("alice_key");
    keygen(&key, "alice@test");
    c.json(&["user", "add", "alice", "--ssh-key", key.with_extension("pub").to_str().expect("utf-8")]);
    let alice = c.json(&["user", "show", "alice"]);

    let mut agents = Vec::new();
    let mut tokens = Vec::new();
    for name in ["web", "db"] {
        let created = c.create(name, TEMPLATE, &["--owner", "alice"]);
        let token = created["agent_token"].as_str().expect("agent_token").to_string();
        agents.push(Agent::start(&c, &token, &c.data_dir().join(format!("agent-{name}"))));
        tokens.push(token);
    }
    for name in ["web", "db"] {
        assert_eq!(c.wait_for(name, "running,unhealthy,failed", LONG)["status"], "running");
    }
    // A third that never ran: its row, with no spans, must come back too.
    c.create("idle", TEMPLATE, &[]);
    let list = c.json(&["workspace", "list", "--all"]);
    let web_timings = c.timings("web");
    let db_timings = c.timings("db");
    assert!(web_timings.iter().any(|s| s["name"] == "install"), "{web_timings:?}");

    // Taken while the coordinator and both agents are live.
    let out_dir = tempfile::tempdir().expect("tempdir");
    let file = out_dir.path().join("tether-backup.tar");
    let said = c.ok(&["admin", "backup", file.to_str().expect("utf-8")]);
    assert!(said.starts_with(&format!("wrote {} (", file.display())), "{said}");
    let mode = std::fs::metadata(&file).expect("backup file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the backup holds private keys");
    assert_eq!(listing(out_dir.path()).len(), 1, "no temporary file is left beside the backup");

    // The coordinator's machine is lost.
    for a in &mut agents {
        a.kill();
    }
    let mut c = c;
    c.kill();

    let fresh = tempfile::Builder::new().prefix("tether-e2e-restored-").tempdir().expect("tempdir");
    let out = restore(&file, fresh.path(), &[]);
    assert!(out.status.success(), "restore failed: {}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("start it with: tether serve --data-dir {}", fresh.path().display())), "{said}");
    for (name, mode) in [("tether.db", 0o600), ("ca-key.pem", 0o600), ("ssh-ca.key", 0o600), ("ca.pem", 0o644)] {
        let m = std::fs::metadata(fresh.path().join(name)).expect(name).permissions().mode() & 0o777;
        assert_eq!(m, mode, "{name}");
    }

    let r = Coordinator::start_in(fresh);
    assert_eq!(r.info["ca_sha256"], c.info["ca_sha256"], "agents pin the same CA");
    assert_eq!(
        std::fs::read_to_string(r.data_dir().join("admin-token")).expect("admin token"),
        std::fs::read_to_string(c.data_dir().join("admin-token")).expect("admin token"),
    );
    assert_eq!(
        std::fs::read(r.data_dir().join("ssh-ca.key")).expect("ssh ca"),
        std::fs::read(c.data_dir().join("ssh-ca.key")).expect("ssh ca"),
        "users trust the same SSH CA"
    );
    let restored = r.json(&["workspace", "list", "--all"]);
    assert_eq!(names(&restored), names(&list));
    assert_eq!(names(&restored), ["db", "idle", "web"]);
    assert_eq!(r.json(&["user", "show", "alice"]), alice);
    assert_eq!(r.timings("web"), web_timings);
    assert_eq!(r.timings("db"), db_timings);

    // The agents come back to the restored coordinator with their old tokens and state.
    drop(agents);
    let _agents: Vec<Agent> = ["web", "db"]
        .iter()
        .zip(&tokens)
        .map(|(name, token)| Agent::start(&r, token, &c.data_dir().join(format!("agent-{name}"))))
        .collect();
    for name in ["web", "db"] {
        let w = r.wait_for(name, "running", LONG);
        assert_eq!(w["status"], "running", "{w}");
    }
}

#[test]
fn a_bad_backup_is_refused_by_name_and_changes_nothing() {
    let c = Coordinator::start();
    let work = tempfile::tempdir().expect("tempdir");
    let good = work.path().join("good.tar");
    c.ok(&["admin", "backup", good.to_str().expect("utf-8")]);

    // A live coordinator's directory is never restored over, --force or not.
    let out = restore(&good, c.data_dir(), &["--force"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&format!("a coordinator (pid {}) is running on", c.pid())), "{}", stderr(&out));

    // Nor, unnamed, the default data directory: where a coordinator's keys go, the operator says.
    let home = work.path().join("home");
    let out = Command::new(bin("tether"))
        .args(["admin", "restore"])
        .arg(&good)
        .env("HOME", &home)
        .env_remove("TETHER_DATA_DIR")
        .env_remove("XDG_DATA_HOME")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("name the data directory to restore into: `tether --data-dir DIR admin restore"),
        "{}",
        stderr(&out)
    );
    assert!(!home.exists(), "nothing was made in the default place");

    // Nor one that holds a database, without --force.
    let held = work.path().join("held");
    std::fs::create_dir(&held).expect("mkdir");
    std::fs::write(held.join("tether.db"), b"old").expect("write");
    let out = restore(&good, &held, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already holds tether.db; pass --force"), "{}", stderr(&out));

    let bytes = std::fs::read(&good).expect("read backup");
    let garbage = work.path().join("garbage.tar");
    std::fs::write(&garbage, vec![0x5a; 8192]).expect("write");
    let truncated = work.path().join("truncated.tar");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let flipped = work.path().join("flipped.tar");
    let mut b = bytes.clone();
    // The middle of the archive is inside the database, its largest entry.
    b[bytes.len() / 2] ^= 0xff;
    std::fs::write(&flipped, &b).expect("write");
    let tiny = work.path().join("tiny.tar");
    std::fs::write(&tiny, b"hello").expect("write");

    let target = work.path().join("target");
    std::fs::create_dir(&target).expect("mkdir");
    std::fs::write(target.join("notes.txt"), b"keep me").expect("write");
    let missing = work.path().join("never-made");
    let before = listing(work.path());
    for (file, expect) in [
        (&garbage, format!("{} is not a tether backup: not a tar archive", garbage.display())),
        (&tiny, format!("{} is not a tether backup: it is 5 bytes, too short for a tar archive", tiny.display())),
        (&truncated, format!("{} is damaged or truncated", truncated.display())),
        (&flipped, format!("{} is damaged or truncated: 'tether.db' does not match its SHA-256", flipped.display())),
    ] {
        for dir in [&target, &missing] {
            let out = restore(file, dir, &[]);
            assert!(!out.status.success(), "{} restored", file.display());
            assert!(stderr(&out).contains(&expect), "{}: {}", file.display(), stderr(&out));
        }
    }
    assert_eq!(listing(work.path()), before, "no scratch directory is left, nothing is created");
    assert_eq!(listing(&target), [("notes.txt".to_string(), 7)]);

    // The good one restores into a directory that does not exist yet, and into one with other files.
    let out = restore(&good, &missing, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mode = std::fs::metadata(&missing).expect("restored dir").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let out = restore(&good, &target, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(target.join("tether.db").exists() && target.join("notes.txt").exists());

    // --force keeps what it replaces.
    let out = restore(&good, &held, &["--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let aside: Vec<_> = listing(&held).into_iter().filter(|(n, _)| n.starts_with("replaced-")).collect();
    assert_eq!(aside.len(), 1, "{:?}", listing(&held));
    assert_eq!(std::fs::read(held.join(&aside[0].0).join("tether.db")).expect("old db"), b"old");
}

/// A second `tether serve` on a data directory in use is refused before it touches anything: the
/// first keeps its `coordinator.json` (the CLI still reaches it), and `admin restore` is refused on
/// the lock, not on that file's pid.
#[test]
fn a_second_coordinator_on_a_data_directory_is_refused_and_changes_nothing() {
    let c = Coordinator::start();
    let dir = c.data_dir().to_str().expect("utf-8").to_string();
    let info = c.data_dir().join("coordinator.json");
    let before = std::fs::read(&info).expect("coordinator.json");
    let mut second = Command::new(bin("tether"))
        .args(["serve", "--data-dir", &dir, "--listen-http", "127.0.0.1:0", "--listen-quic", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tether serve");
    let mut status = None;
    wait_until("the second coordinator to give up", LONG, || {
        status = second.try_wait().expect("wait");
        status.is_some()
    });
    let status = status.expect("exited");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().expect("stderr"), &mut err).expect("stderr");
    assert!(!status.success());
    let want = format!("a coordinator (pid {}) is using {dir}; stop it first, or use another data directory", c.pid());
    assert!(err.contains(&want), "{err}");
    assert_eq!(std::fs::read(&info).expect("coordinator.json"), before, "the first coordinator's file is untouched");
    c.ok(&["workspace", "list"]);

    // A coordinator.json naming some other live process (here the test) does not fool restore either
    // way: the lock says who is running.
    let work = tempfile::tempdir().expect("tempdir");
    let good = work.path().join("good.tar");
    c.ok(&["admin", "backup", good.to_str().expect("utf-8")]);
    let mut json: Value = serde_json::from_slice(&before).expect("json");
    json["pid"] = std::process::id().into();
    std::fs::write(&info, serde_json::to_vec(&json).expect("json")).expect("write");
    let out = restore(&good, c.data_dir(), &["--force"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&format!("a coordinator (pid {}) is running on", c.pid())), "{}", stderr(&out));
}
