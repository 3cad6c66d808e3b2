//! A workspace's life end to end: real `tether serve`, real `tether-agent`, the CLI.

use serde_json::Value;
use std::process::Command;
use std::time::Duration;
use tether_tests::{external, pid_alive, span, wait_until, Agent, Coordinator, LONG};

#[test]
fn reaches_running_with_a_span_for_every_script() {
    let c = Coordinator::start();
    let _agent = external(
        &c,
        "web",
        r#"
heartbeat_timeout = "15s"
[[script]]
name = "install-deps"
run = "sleep 1; echo installed"
timeout = "60s"
blocks_login = true

[[script]]
name = "quick"
run = "echo quick"

[[script]]
name = "lint"
run = "echo 'lint warnings' >&2; exit 3"
blocks_login = false
"#,
    );
    let w = c.wait_for("web", "running,unhealthy,failed", LONG);
    assert_eq!(w["status"], "running", "{w}");
    assert_eq!(
        w["status_reason"], "agent connected; startup script 'lint' exited with code 3 (does not block login)",
        "a failing script that does not block login is shown but the workspace runs"
    );
    let show = c.show("web");
    assert_eq!(show["lifecycle"], "start_error");
    assert!(show["last_heartbeat_at"].is_string(), "{show}");
    // One script's logs; a script the template does not have is named, not an empty answer.
    let lint = c.ok(&["workspace", "logs", "web", "--script", "lint"]);
    assert!(lint.contains("lint warnings") && !lint.contains("quick"), "{lint}");
    let err = c.fails(&["workspace", "logs", "web", "--script", "nope"]);
    assert!(err.contains("workspace 'web' has no script 'nope' (its scripts: install-deps, quick, lint;"), "{err}");

    let spans = c.timings("web");
    let install = span(&spans, "script", "install-deps");
    assert_eq!(install["exit_code"], 0);
    assert_eq!(install["status"], "ok");
    let ms = install["duration_ms"].as_i64().unwrap();
    assert!((950..30_000).contains(&ms), "install-deps took {ms} ms for `sleep 1`");
    assert_eq!(span(&spans, "script", "quick")["exit_code"], 0);
    let lint = span(&spans, "script", "lint");
    assert_eq!((lint["exit_code"].as_i64(), lint["status"].as_str()), (Some(3), Some("exit_failure")));
    span(&spans, "agent", "connect");
    span(&spans, "agent", "manifest");
    span(&spans, "agent", "ready");
    for s in &spans {
        for k in ["stage", "name", "started_at", "ended_at", "exit_code", "status"] {
            assert!(s.get(k).is_some(), "span lacks {k}: {s}");
        }
    }
    let starts: Vec<i64> = spans.iter().map(|s| s["offset_ms"].as_i64().unwrap()).collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "spans are ordered in time: {starts:?}");

    let table = c.ok(&["workspace", "timings", "web"]);
    assert!(table.starts_with("STAGE"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("script") && l.contains("install-deps") && l.contains("ok")),
        "{table}"
    );

    let logs = c.logs("web");
    assert!(logs.contains(&("install-deps".into(), "installed".into())), "{logs:?}");
    assert!(logs.contains(&("lint".into(), "lint warnings".into())), "{logs:?}");
}

#[test]
fn a_failing_login_script_makes_the_workspace_unhealthy_and_names_it() {
    let c = Coordinator::start();
    let _agent = external(
        &c,
        "broken",
        r#"
[[script]]
name = "install-deps"
run = "echo cannot resolve >&2; exit 2"
blocks_login = true
"#,
    );
    let w = c.wait_for("broken", "unhealthy,running", LONG);
    assert_eq!(w["status"], "unhealthy");
    assert_eq!(w["status_reason"], "startup script 'install-deps' exited with code 2");
    let list = c.json(&["workspace", "list", "--status", "unhealthy"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["name"], "broken");
    // Several statuses, as `wait --for` takes them.
    c.create("idle", "provisioner = \"process\"\n", &[]);
    let list = c.json(&["workspace", "list", "--status", "pending,unhealthy"]);
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["broken", "idle"]);
    assert!(c.json(&["workspace", "list", "--status", "running,stopped"]).as_array().unwrap().is_empty());
}

#[test]
fn a_script_past_its_timeout_is_killed_with_its_children() {
    let c = Coordinator::start();
    let marker = c.data_dir().join("child.pid");
    let template = format!(
        r#"
[[script]]
name = "warm-cache"
run = "sleep 300 & echo $! > {}; sleep 300"
timeout = "2s"
blocks_login = true
"#,
        marker.display()
    );
    let _agent = external(&c, "slow", &template);
    let w = c.wait_for("slow", "unhealthy,running", LONG);
    assert_eq!(w["status_reason"], "startup script 'warm-cache' timed out after 2s");
    assert_eq!(c.show("slow")["lifecycle"], "start_timeout");
    let s = c.timings("slow");
    assert_eq!(span(&s, "script", "warm-cache")["status"], "timed_out");
    let child: i32 = std::fs::read_to_string(&marker).unwrap().trim().parse().unwrap();
    wait_until("the script's background child to be gone", Duration::from_secs(30), || !pid_alive(child));
}

#[test]
fn a_killed_agent_turns_unhealthy_and_a_restarted_one_recovers_without_rerunning_scripts() {
    let c = Coordinator::start();
    let runs = c.data_dir().join("runs.txt");
    let template = format!(
        r#"
heartbeat_timeout = "3s"
[[script]]
name = "setup"
run = "echo ran >> {}"
blocks_login = true
"#,
        runs.display()
    );
    let created = c.create("dev", &template, &[]);
    let token = created["agent_token"].as_str().unwrap().to_string();
    let agent_dir = c.data_dir().join("agent-dev");
    let mut agent = Agent::start(&c, &token, &agent_dir);
    assert_eq!(c.wait_for("dev", "running,unhealthy", LONG)["status"], "running");
    let spans_before = c.timings("dev").len();
    // Heartbeats for a while, so the last one is well after the hello (the stored last-seen time).
    let hello = unix_seconds(c.show("dev")["last_heartbeat_at"].as_str().unwrap());
    wait_until("heartbeats 4 s after the hello", LONG, || {
        unix_seconds(c.show("dev")["last_heartbeat_at"].as_str().unwrap()) - hello >= 4.0
    });

    agent.kill();
    let w = c.wait_for("dev", "unhealthy", LONG);
    let reason = w["status_reason"].as_str().unwrap();
    assert!(reason.starts_with("agent has lost connection (no heartbeat for "), "{reason}");
    assert_eq!(c.json(&["workspace", "count"])["unhealthy"], 1);
    // `show` gives the same last heartbeat as the reason counts from, not the stored hello.
    assert_reason_agrees_with_show(&c, 0);

    let mut agent = Agent::start(&c, &token, &agent_dir);
    let w = c.wait_for("dev", "running", LONG);
    assert_eq!(w["status_reason"], "agent connected; startup scripts finished");
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "ran\n", "start scripts ran once");
    assert_eq!(c.timings("dev").len(), spans_before, "no new spans for the same build");

    // The coordinator stops, the agent dies while it is down, and the coordinator is back some
    // seconds later. Once the restart grace is over, the reason counts from the agent's real last
    // heartbeat, the one `show` prints, not from the restart.
    let mut c = c;
    c.terminate();
    agent.kill();
    std::thread::sleep(Duration::from_secs(6)); // the coordinator's downtime, part of the scenario
    c.start_again();
    c.wait_for("dev", "unhealthy", Duration::from_secs(120));
    assert_reason_agrees_with_show(&c, 3 + 30 + 6);
}

/// The lost-agent reason of workspace `dev` counts at least `at_least` seconds, from the last
/// heartbeat `show` prints (to the second, as of the transition).
fn assert_reason_agrees_with_show(c: &Coordinator, at_least: u64) {
    let shown = c.show("dev");
    let reason = shown["status_reason"].as_str().unwrap();
    let ago: u64 = reason
        .strip_prefix("agent has lost connection (no heartbeat for ")
        .and_then(|r| r.strip_suffix("s)"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{reason}"));
    let history = shown["history"].as_array().unwrap();
    // The first entry is the creation: it comes from no status.
    assert_eq!(history[0]["from"], Value::Null, "{shown}");
    assert!(history[1..].iter().all(|t| t["from"].is_string()), "{shown}");
    let turned = history.last().unwrap()["at"].as_str().unwrap();
    let last = shown["last_heartbeat_at"].as_str().unwrap();
    let shown_ago = (unix_seconds(turned) - unix_seconds(last)).max(0.0) as u64;
    assert!(ago.abs_diff(shown_ago) <= 2, "reason {reason}, last heartbeat {last}, unhealthy at {turned}");
    assert!(ago >= at_least, "{reason}");
}

/// Seconds since the epoch of an RFC 3339 UTC time as the API prints it (`2026-11-24T19:22:40.835Z`).
fn unix_seconds(t: &str) -> f64 {
    let num = |r: std::ops::Range<usize>| t[r].parse::<i64>().unwrap();
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719468;
    let secs: f64 = t[17..t.len() - 1].parse().unwrap();
    (days * 86400 + num(11..13) * 3600 + num(14..16) * 60) as f64 + secs
}

#[test]
fn stop_runs_the_stop_scripts_and_ends_stopped() {
    let c = Coordinator::start();
    let template = r#"
provisioner = "process"
heartbeat_timeout = "5s"
[[script]]
name = "hello"
run = "echo hello > started.txt"
blocks_login = true

[[script]]
name = "save"
run = "sleep 2; echo bye > stopped.txt"
on = "stop"
"#;
    // --wait prints the workspace once the start has finished.
    let created = c.create("proc", template, &["--start", "--wait"]);
    assert_eq!(created["status"], "running", "{created}");
    let home = c.data_dir().join("workspaces/proc/home");
    assert_eq!(std::fs::read_to_string(home.join("started.txt")).unwrap(), "hello\n");
    let pid: i32 =
        std::fs::read_to_string(c.data_dir().join("workspaces/proc/agent.pid")).unwrap().trim().parse().unwrap();
    let transitions = c.show("proc")["history"].as_array().unwrap().len();

    // Starting a running workspace changes nothing and succeeds, --wait included.
    let again = c.cli(&["workspace", "start", "proc", "--wait"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("workspace 'proc' is already running"));
    let shown = c.show("proc");
    assert_eq!((shown["build"].as_i64(), shown["history"].as_array().unwrap().len()), (Some(1), transitions));

    let answer = c.json(&["workspace", "stop", "proc"]);
    assert_eq!(answer["status"], "stopping", "{answer}");
    let w = c.wait_for("proc", "stopped,running,unhealthy", LONG);
    assert_eq!(w["status"], "stopped", "{w}");
    assert_eq!(w["status_reason"], "stopped; stop scripts finished");
    assert_eq!(w["lifecycle"], "off");
    assert_eq!(std::fs::read_to_string(home.join("stopped.txt")).unwrap(), "bye\n");
    wait_until("the agent process to exit", Duration::from_secs(30), || !pid_alive(pid));
    let spans = c.timings("proc");
    assert_eq!(span(&spans, "stop_script", "save")["status"], "ok");

    let history = c.show("proc")["history"].as_array().unwrap().clone();
    let path: Vec<&str> = history.iter().map(|t| t["to"].as_str().unwrap()).collect();
    assert_eq!(path.first(), Some(&"pending"));
    assert!(path.contains(&"starting") && path.contains(&"running") && path.contains(&"stopping"), "{path:?}");
    assert_eq!(path.last(), Some(&"stopped"));
    // The stop's answer gives the time of the change it made, not of the one before.
    let stopping = history.iter().find(|t| t["to"] == "stopping").unwrap();
    assert_eq!(answer["status_changed_at"], stopping["at"], "{answer} {history:?}");

    // Stopping a stopped workspace changes nothing and succeeds.
    let again = c.cli(&["workspace", "stop", "proc", "--wait"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stderr).contains("workspace 'proc' is already stopped"));

    // Started again: a new build, the scripts run again. A second start while the first is under
    // way joins it rather than begin a third build.
    c.ok(&["workspace", "start", "proc"]);
    c.ok(&["workspace", "start", "proc"]);
    let w = c.wait_for("proc", "running,unhealthy,failed", LONG);
    assert_eq!((w["status"].as_str(), w["build"].as_i64()), (Some("running"), Some(2)));
    c.ok(&["workspace", "delete", "proc"]);
    // A second delete while the first runs the stop script joins it; its --wait waits for it.
    let again = c.cli(&["workspace", "delete", "proc", "--wait"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stdout).contains("deleted"), "{}", String::from_utf8_lossy(&again.stdout));
    assert!(!c.data_dir().join("workspaces/proc").exists(), "delete removes the workspace directory");
    // Deleted, it is still shown, with its history, until its name is used again; deleting it
    // again changes nothing and succeeds, as the README promises cleanup scripts.
    let shown = c.show("proc");
    assert_eq!(shown["status"], "deleted", "{shown}");
    let again = c.cli(&["workspace", "delete", "proc", "--wait"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(String::from_utf8_lossy(&again.stdout).contains("deleted"), "{}", String::from_utf8_lossy(&again.stdout));
    assert!(c.fails(&["workspace", "start", "proc"]).contains("no workspace 'proc'"));
}

#[test]
fn the_command_provisioner_records_failures_with_the_last_error_line() {
    let c = Coordinator::start();
    let template = r#"
provisioner = "command"
[command]
start = "head -c 100000 /dev/zero | tr '\\0' x; echo; printf 'bad \\377 byte\\n'; echo pulling image; echo 'image not found: example/dev:latest' >&2; exit 4"
"#;
    c.create("cmd", template, &["--start"]);
    let w = c.wait_for("cmd", "failed,running", LONG);
    assert_eq!(w["status"], "failed");
    assert_eq!(w["status_reason"], "start command exited with code 4: image not found: example/dev:latest");
    let spans = c.timings("cmd");
    assert_eq!(span(&spans, "provision", "start command")["exit_code"], 4);
    let logs = c.logs("cmd");
    assert!(logs.contains(&("provision:start".into(), "pulling image".into())), "{logs:?}");
    // A line without end is cut at the log line limit; a byte that is not UTF-8 does not stop reading.
    let cut = format!("{} [line truncated]", "x".repeat(16 * 1024));
    assert!(
        logs.contains(&("provision:start".into(), cut)),
        "{:?}",
        logs.iter().map(|l| l.1.len()).collect::<Vec<_>>()
    );
    assert!(logs.contains(&("provision:start".into(), "bad \u{fffd} byte".into())), "{logs:?}");
}

/// `--wait` after an operation fails (exit status 1) when the operation did not get there, naming
/// why, so `tether workspace start ws --wait && ssh ws.tether` stops at a failed start; `workspace
/// wait` reports a failed workspace with nothing under way at once instead of waiting out its
/// timeout; a status word that does not exist is a usage error.
#[test]
fn wait_fails_when_the_operation_did_not_finish_and_does_not_wait_on_a_settled_failure() {
    let c = Coordinator::start();
    c.create("cmd", "provisioner = \"command\"\n[command]\nstart = \"echo 'no capacity' >&2; exit 3\"\n", &[]);
    let reason = "start command exited with code 3: no capacity";
    let out = c.cli(&["workspace", "start", "cmd", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("cmd: failed ({reason})\n"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("the start of workspace 'cmd' did not finish: it is failed ({reason})")), "{err}");
    // With --json the workspace is still printed, for scripts that read it.
    let out = c.cli(&["workspace", "start", "cmd", "--wait", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let w: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(w["status"], "failed");
    // So does `create --start --wait`, after the line saying it was created.
    let path = c.data_dir().join("cmd2.toml");
    std::fs::write(&path, "provisioner = \"command\"\n[command]\nstart = \"echo 'no capacity' >&2; exit 3\"\n")
        .unwrap();
    let out = c.cli(&["workspace", "create", "cmd2", "--template", path.to_str().unwrap(), "--start", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(&format!("cmd2: failed ({reason})\n")), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("the start of workspace 'cmd2' did not finish"), "{out:?}");
    // An external workspace (no template) is not waited for: its agent needs the token printed.
    let e = c.fails(&["workspace", "create", "ext", "--start", "--wait"]);
    assert!(e.contains("--wait: an external workspace starts when you run its agent"), "{e}");
    assert!(c.fails(&["workspace", "show", "ext"]).contains("no workspace 'ext'"), "nothing was created");

    // Waiting for `running` on it ends at once with why; waiting for what it is still works.
    let err = c.fails(&["workspace", "wait", "cmd", "--for", "running", "--timeout", "10m"]);
    let want = format!("workspace 'cmd' is failed ({reason}); it stays failed until `tether workspace start cmd`");
    assert!(err.contains(&want), "{err}");
    assert_eq!(c.wait_for("cmd", "failed", LONG)["status"], "failed");
    // So does one on a workspace created and never started: only a start moves it.
    c.create("idle", "provisioner = \"command\"\n[command]\nstart = \"true\"\n", &[]);
    let err = c.fails(&["workspace", "wait", "idle", "--for", "running", "--timeout", "10m"]);
    assert!(err.contains("workspace 'idle' is pending (created; not started); it stays pending until"), "{err}");

    let out = c.cli(&["workspace", "wait", "cmd", "--for", "running,bogus"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown workspace status 'bogus' (expected one of: pending, starting, running,"), "{err}");
    assert_eq!(c.cli(&["workspace", "list", "--status", "Running"]).status.code(), Some(64));
    assert_eq!(c.cli(&["audit", "--limit", "0"]).status.code(), Some(64), "the limit is 1 to 10000");

    // A failed stop of a workspace whose agent never connected leaves it waiting for the agent, as
    // it was: no agent "has shut down".
    let template = "provisioner = \"command\"\nconnection_timeout = \"10m\"\n[command]\nstart = \"true\"\nstop = \"echo 'no such container' >&2; exit 4\"\n";
    c.create("never", template, &["--start"]);
    wait_until("the start command to finish", LONG, || {
        c.show("never")["status_reason"] == "waiting for the agent to connect"
    });
    let before = c.show("never");
    let err = c.fails(&["workspace", "stop", "never", "--wait"]);
    let failure = "stop failed: stop command exited with code 4: no such container";
    assert!(err.contains(&format!("did not finish: it is starting ({failure})")), "{err}");
    let w = c.show("never");
    assert_eq!((&w["status"], &w["status_reason"]), (&before["status"], &before["status_reason"]), "{w}");
    assert_eq!(w["last_error"], failure, "{w}");
}

#[test]
fn the_printed_agent_command_works_as_given_and_a_clean_exit_stops_the_workspace() {
    let c = Coordinator::start();
    let created = c.create(
        "ext",
        r#"
[[script]]
name = "setup"
run = "echo up"
blocks_login = true

[[script]]
name = "goodbye"
run = "echo going"
on = "stop"
"#,
        &[],
    );
    // `create` prints the exact command to run anywhere: the token and the CA pinned by fingerprint.
    let command = created["agent_command"].as_str().unwrap();
    let (env, rest) = command.split_once(' ').unwrap();
    let token = env.strip_prefix("TETHER_AGENT_TOKEN=").unwrap();
    let args: Vec<&str> = rest.split_whitespace().collect();
    assert_eq!(args[0], "tether-agent");
    assert_eq!(&args[1..4], &["--coordinator", c.agent_addr().as_str(), "--ca-sha256"]);
    let dir = c.data_dir().join("agent-ext");
    std::fs::create_dir_all(&dir).unwrap();
    let log = std::fs::File::create(dir.with_extension("log")).unwrap();
    let mut agent = std::process::Command::new(tether_tests::bin("tether-agent"))
        .args(&args[1..])
        .env("TETHER_AGENT_TOKEN", token)
        .env("TETHER_AGENT_DATA_DIR", &dir)
        .env_remove("TETHER_CA")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    assert_eq!(c.wait_for("ext", "running,unhealthy", LONG)["status"], "running");

    // SIGTERM: the agent runs its stop scripts, says goodbye and exits 0; no heartbeat timeout.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(agent.wait().unwrap().success(), "agent exits 0 on SIGTERM");
    let w = c.wait_for("ext", "stopped,unhealthy", LONG);
    assert_eq!(w["status"], "stopped", "{w}");
    assert!(w["status_reason"].as_str().unwrap().starts_with("agent shut down"), "{w}");
    assert_eq!(w["lifecycle"], "off");
    let logs = c.logs("ext");
    assert!(logs.contains(&("goodbye".into(), "going".into())), "{logs:?}");
}

#[test]
fn logs_follow_prints_lines_as_the_script_writes_them() {
    let c = Coordinator::start();
    let created = c.create(
        "tail",
        r#"
[[script]]
name = "build"
run = "for i in 1 2 3 4 5; do echo step $i; sleep 0.3; done; echo warned >&2; echo build finished"

[[script]]
name = "goodbye"
run = "echo going"
on = "stop"
"#,
        &[],
    );
    let mut follow = std::process::Command::new(tether_tests::bin("tether"))
        .arg("--data-dir")
        .arg(c.data_dir())
        .args(["workspace", "logs", "tail", "--follow"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let token = created["agent_token"].as_str().unwrap();
    let mut agent = Agent::start(&c, token, &c.data_dir().join("agent-tail"));
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.ends_with("[build] build finished")) {
        match rx.recv_timeout(LONG) {
            Ok(line) => seen.push(line),
            Err(e) => panic!("no more lines from logs --follow ({e}); got {seen:?}"),
        }
    }
    let steps: Vec<&String> = seen.iter().filter(|l| l.contains("[build] step")).collect();
    assert_eq!(steps.len(), 5, "{seen:?}");

    // The workspace stops (its agent shuts down, running its stop script): the follower prints
    // the stop script's lines and ends by itself, as `kubectl logs -f` does with its container.
    assert!(agent.terminate().success());
    loop {
        match rx.recv_timeout(LONG) {
            Ok(line) => seen.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("logs --follow did not end with the workspace ({e}); got {seen:?}"),
        }
    }
    let mut status = None;
    wait_until("logs --follow to exit", LONG, || {
        status = follow.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success());
    assert!(seen.iter().any(|l| l.ends_with("[goodbye] going")), "{seen:?}");
    assert!(seen.iter().any(|l| l.ends_with("[build stderr] warned")), "standard error is marked: {seen:?}");
    assert_eq!(c.show("tail")["status"], "stopped");
}

/// A logs poll waiting for lines ends as soon as its workspace stops, even when the stop writes no
/// line (no stop scripts, no agent): it does not wait out its whole `wait`.
#[test]
fn a_logs_poll_ends_with_a_stop_that_writes_nothing() {
    let c = Coordinator::start();
    c.create("quiet", "[[script]]\nname = \"build\"\nrun = \"true\"\n", &[]);
    let token = std::fs::read_to_string(c.data_dir().join("admin-token")).unwrap().trim().to_string();
    // Longer than any deadline below: only the stop can end it in time.
    let url = format!("{}/api/v1/workspaces/quiet/logs?wait=300", c.api_url());
    let poll = Command::new("curl")
        .args(["-sS", "--max-time", "400", "-H", &format!("authorization: Bearer {token}"), &url])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    // Something else first, so that the poll is most likely waiting by the time of the stop (if not,
    // it sees the stopped workspace at once, and this passes as it should).
    assert_eq!(c.show("quiet")["status"], "starting");
    c.ok(&["workspace", "stop", "quiet", "--wait"]);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(poll.wait_with_output());
    });
    let out = rx.recv_timeout(LONG).expect("the logs poll to end with the stop").unwrap();
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["ended"], true, "{body}");
    assert_eq!(body["lines"], serde_json::json!([]), "{body}");
}

#[test]
fn a_failed_stop_is_recorded_and_never_leaves_a_false_running() {
    let c = Coordinator::start();
    // The command provisioner starts a real agent in the background, as `docker run -d` would.
    let template = r#"
provisioner = "command"
heartbeat_timeout = "4s"
[command]
start = "D=$(dirname $TETHER_CA)/cmd-$TETHER_WORKSPACE; mkdir -p $D; TETHER_AGENT_DATA_DIR=$D $TETHER_AGENT_BINARY > $D.log 2>&1 < /dev/null &"
stop = "echo 'cannot reach the docker daemon' >&2; exit 1"
[[script]]
name = "setup"
run = "echo up"
blocks_login = true
"#;
    c.create("cmdws", template, &["--start"]);
    assert_eq!(c.wait_for("cmdws", "running,unhealthy,failed", LONG)["status"], "running");
    // `stop --wait` fails, with the operation's error.
    let err = c.fails(&["workspace", "stop", "cmdws", "--wait"]);
    let failure = "stop failed: stop command exited with code 1: cannot reach the docker daemon";
    assert!(
        err.contains(&format!("the stop of workspace 'cmdws' did not finish: it is unhealthy ({failure})")),
        "{err}"
    );
    let w = c.wait_for("cmdws", "running,unhealthy,stopped", LONG);
    assert_eq!(w["last_error"], failure, "{w}");
    // The agent ran its stop scripts and left, so the workspace is not shown as running.
    assert_eq!(w["status"], "unhealthy", "{w}");
    assert!(w["status_reason"].as_str().unwrap().ends_with("the agent has shut down"), "{w}");
    let spans = c.timings("cmdws");
    assert_eq!(span(&spans, "provision", "stop command")["exit_code"], 1);

    // A delete fails the same way, and says how to delete it anyway; --force does, keeping what it
    // went past in the reason.
    let err = c.fails(&["workspace", "delete", "cmdws", "--wait"]);
    let want = "the delete of workspace 'cmdws' did not finish: it is unhealthy (delete failed: stop command exited \
                with code 1: cannot reach the docker daemon); `tether workspace delete cmdws --force` deletes it anyway";
    assert!(err.contains(want), "{err}");
    let w = c.json(&["workspace", "delete", "cmdws", "--force", "--wait"]);
    assert_eq!(w["status"], "deleted", "{w}");
    assert_eq!(
        w["status_reason"],
        "deleted (forced past: stop failed: stop command exited with code 1: cannot reach the docker daemon; what it started may be left behind)",
        "{w}"
    );
    // Shown deleted, with why the delete was forced, until the name is used again.
    let shown = c.show("cmdws");
    assert_eq!(shown["status"], "deleted", "{shown}");
    assert!(shown["status_reason"].as_str().unwrap().contains("what it started may be left behind"), "{shown}");
}

#[test]
fn an_agent_that_shuts_down_on_its_own_has_the_provisioner_stop_what_it_started() {
    let c = Coordinator::start();
    // The command provisioner starts the agent in the background, as `docker run -d` would start a
    // container whose main process is not the agent; its stop command leaves a mark where `docker
    // rm -f` would remove the container.
    let script = "[[script]]\nname = \"bye\"\nrun = \"echo bye\"\non = \"stop\"\n";
    let (base, _, pid) = start_background_agent(&c, &background_agent_template(false, script));

    // SIGTERM inside the workspace: the agent runs its stop scripts and says goodbye; the
    // coordinator then runs the provisioner's stop, once, and only then calls it stopped.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    let w = c.wait_for("cmdws", "stopped,unhealthy,failed", LONG);
    assert_eq!(w["status"], "stopped", "{w}");
    assert!(w["status_reason"].as_str().unwrap().starts_with("agent shut down"), "{w}");
    assert_eq!(std::fs::read_to_string(base.with_extension("stopped")).unwrap(), "removed\n");
    assert_eq!(span(&c.timings("cmdws"), "provision", "stop command")["exit_code"], 0);
    assert!(c.logs("cmdws").contains(&("bye".into(), "bye".into())));
    // Nothing stands in the way of the next start.
    c.ok(&["workspace", "start", "cmdws"]);
    assert_eq!(c.wait_for("cmdws", "running,unhealthy,failed", LONG)["status"], "running");
    c.ok(&["workspace", "stop", "cmdws", "--wait"]);
    assert_eq!(std::fs::read_to_string(base.with_extension("stopped")).unwrap(), "removed\nremoved\n");
}

#[test]
fn a_coordinator_restart_during_the_provisioner_stop_after_the_agents_own_shutdown_keeps_its_reason() {
    let mut c = Coordinator::start();
    let (base, _, pid) = start_background_agent(&c, &background_agent_template(true, ""));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    // The agent has said goodbye and the provisioner's stop command is running when the coordinator
    // is killed.
    wait_until("the stop command", LONG, || base.with_extension("stopping").exists());
    let w = c.show("cmdws");
    assert!(w["status_reason"].as_str().unwrap().starts_with("agent shut down"), "{w}");
    c.restart();
    // The restarted coordinator runs the stop again, and ends it with the agent's reason.
    std::fs::write(base.with_extension("release"), "").unwrap();
    let w = c.wait_for("cmdws", "stopped,unhealthy,failed", LONG);
    assert_eq!(w["status"], "stopped", "{w}");
    let reason = w["status_reason"].as_str().unwrap();
    assert!(reason.starts_with("agent shut down") && !reason.contains("provisioner"), "{w}");
}

/// The builds of `logs --json` lines, each once.
fn builds_in(out: &str) -> Vec<i64> {
    let mut builds: Vec<i64> =
        out.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["build"].as_i64().unwrap()).collect();
    builds.dedup();
    builds
}

#[test]
fn earlier_builds_lose_their_logs_and_timings_after_keep_builds_and_the_current_one_keeps_them() {
    let c = Coordinator::start_with(&["--keep-builds", "2s"]);
    let template = r#"
provisioner = "process"
[[script]]
name = "hello"
run = "echo hello"
"#;
    // Runs `name` to a second build, with build 1's output in.
    let rebuild = |name: &str| {
        c.create(name, template, &["--start"]);
        assert_eq!(c.wait_for(name, "running,unhealthy,failed", LONG)["status"], "running");
        wait_until("build 1's script output", LONG, || c.logs(name).iter().any(|(s, _)| s == "hello"));
        c.ok(&["workspace", "stop", name, "--wait"]);
        c.ok(&["workspace", "start", name]);
        let w = c.wait_for(name, "running,unhealthy,failed", LONG);
        assert_eq!((w["status"].as_str(), w["build"].as_i64()), (Some("running"), Some(2)));
        assert!(!c.json(&["workspace", "timings", name, "--build", "1"]).as_array().unwrap().is_empty());
        // `logs` gives the current build's lines, `--build` an earlier one's.
        wait_until("build 2's script output", LONG, || c.logs(name).iter().any(|(s, _)| s == "hello"));
        assert_eq!(builds_in(&c.ok(&["workspace", "logs", name, "--json"])), [2]);
        assert_eq!(builds_in(&c.ok(&["workspace", "logs", name, "--json", "--build", "1"])), [1]);
    };
    rebuild("proc");

    // Build 1 started more than two seconds ago and is no longer current: the purge takes it.
    wait_until("build 1's timings to go", LONG, || {
        !c.cli(&["workspace", "timings", "proc", "--build", "1"]).status.success()
    });
    let err = c.fails(&["workspace", "timings", "proc", "--build", "1"]);
    assert!(err.contains("workspace 'proc' has no build 1 (its current build is 2"), "{err}");
    // Logs go before the build's record, so they are gone already.
    let err = c.fails(&["workspace", "logs", "proc", "--build", "1"]);
    assert!(err.contains("workspace 'proc' has no build 1 (its current build is 2"), "{err}");
    assert_eq!(builds_in(&c.ok(&["workspace", "logs", "proc", "--json"])), [2]);
    // The current build keeps everything, however old it gets. A second workspace's build 1 starts
    // after proc's build 2 did, so the purge that takes it finds proc's build 2 past the retention
    // too, and leaves it.
    rebuild("other");
    wait_until("other's build 1 to go", LONG, || {
        !c.cli(&["workspace", "timings", "other", "--build", "1"]).status.success()
    });
    let spans = c.timings("proc");
    assert_eq!(span(&spans, "script", "hello")["status"], "ok");
    assert!(c.logs("proc").iter().any(|(s, _)| s == "hello"), "build 2's log lines stay");

    // A deleted workspace keeps nothing past the retention: its last build, history and record go.
    c.ok(&["workspace", "delete", "other"]);
    c.wait_for("other", "deleted", LONG);
    let log = || std::fs::read_to_string(c.data_dir().join("coordinator.log")).unwrap_or_default();
    wait_until("the deleted workspace to be purged", LONG, || log().contains("deleted_workspaces=1"));
    // The name is free again.
    c.create("other", template, &[]);
}

#[test]
fn a_build_whose_logs_reach_max_build_log_mib_keeps_that_much_and_says_so_while_others_keep_all() {
    let c = Coordinator::start_with(&["--max-build-log-mib", "1"]);
    // Two scripts of 700 lines of 1000 bytes each: under the agent's 1 MiB per script, over the
    // coordinator's 1 MiB for the build.
    let loud = r#"
provisioner = "process"
[[script]]
name = "first"
run = "head -c 700000 /dev/zero | tr '\\0' a | fold -w 1000; echo; echo first-done"
[[script]]
name = "second"
run = "head -c 700000 /dev/zero | tr '\\0' b | fold -w 1000; echo; echo second-done"
"#;
    let quiet = r#"
provisioner = "process"
[[script]]
name = "hello"
run = "echo hello from quiet"
"#;
    c.create("loud", loud, &["--start"]);
    c.create("quiet", quiet, &["--start"]);
    for name in ["loud", "quiet"] {
        assert_eq!(c.wait_for(name, "running,unhealthy,failed", LONG)["status"], "running", "{name}");
    }
    let marker =
        "[tether: this build's logs reached the coordinator's limit of 1 MiB (--max-build-log-mib); later lines \
                  are not kept]";
    wait_until("the limit's marker in loud's logs", LONG, || c.logs("loud").iter().any(|(_, l)| l == marker));
    let spans = c.timings("loud");
    assert_eq!(span(&spans, "script", "second")["status"], "ok", "the limit does not fail the script");
    let lines = c.logs("loud");
    let kept: usize = lines.iter().filter(|(_, l)| l != marker).map(|(_, l)| l.len()).sum();
    assert!((1_000_000..=1024 * 1024).contains(&kept), "kept {kept} bytes");
    assert_eq!(lines.iter().filter(|(_, l)| l == marker).count(), 1, "one marker");
    // Under the script whose line crossed the limit (the two run side by side), and last.
    assert_eq!(lines.last().map(|(_, l)| l.as_str()), Some(marker), "nothing after it");
    assert!(lines.iter().any(|(s, l)| s == "first" && l.starts_with("aaaa")));
    assert!(lines.iter().any(|(s, l)| s == "second" && l.starts_with("bbbb")));
    // The two run side by side, so either may cross the limit: that one's last line is not kept.
    let (crosser, _) = lines.last().unwrap();
    let done = format!("{crosser}-done");
    assert!(!lines.iter().any(|(s, l)| s == crosser && *l == done), "{crosser}'s last line is past the limit");
    let log = std::fs::read_to_string(c.data_dir().join("coordinator.log")).unwrap();
    assert!(log.contains("its later lines are dropped"), "the coordinator logs it");
    // The other workspace kept everything.
    assert_eq!(c.logs("quiet"), [("hello".to_string(), "hello from quiet".to_string())]);
}

#[test]
fn a_script_that_cannot_start_is_reported_in_the_agent_s_words_and_its_log() {
    let c = Coordinator::start();
    let template = r#"
working_dir = "/nonexistent/tether-test-dir"
[[script]]
name = "setup"
run = "echo hi"
blocks_login = true
"#;
    let _agent = external(&c, "nodir", template);
    let w = c.wait_for("nodir", "unhealthy,running", LONG);
    assert_eq!(w["status"], "unhealthy", "{w}");
    // The agent's own words: which shell could not start, where, and why.
    let reason = w["status_reason"].as_str().unwrap();
    assert!(reason.starts_with("startup script 'setup' could not run: could not start "), "{reason}");
    assert!(reason.contains("/nonexistent/tether-test-dir: No such file or directory"), "{reason}");
    let logs = c.logs("nodir");
    assert!(
        logs.iter().any(|(script, line)| script == "setup"
            && line.contains("could not start")
            && line.contains("/nonexistent/tether-test-dir")),
        "{logs:?}"
    );
}

#[test]
fn starting_a_lost_process_agent_replaces_it_without_running_its_stop_scripts() {
    let mut c = Coordinator::start();
    let template = r#"
provisioner = "process"
heartbeat_timeout = "3s"
[[script]]
name = "setup"
run = "echo ran >> runs.txt"
blocks_login = true

[[script]]
name = "save"
run = "echo stopped >> stops.txt"
on = "stop"
"#;
    c.create("dev", template, &["--start"]);
    assert_eq!(c.wait_for("dev", "running,unhealthy,failed", LONG)["status"], "running");
    let home = c.data_dir().join("workspaces/dev/home");
    let pid_file = c.data_dir().join("workspaces/dev/agent.pid");
    let old: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();

    // The agent is alive but cannot reach the coordinator any more: lost, then unhealthy.
    c.restart_on_another_tunnel_port();
    assert_eq!(c.wait_for("dev", "unhealthy", LONG)["status"], "unhealthy");
    assert!(pid_alive(old), "the lost agent is still running");

    // Starting it replaces the agent for the same build: no stop scripts (it is not a stop), no
    // start scripts again, and the new agent reports the build as ready, not shut down.
    let w = c.json(&["workspace", "start", "dev", "--wait"]);
    assert_eq!(w["status"], "running", "{w}");
    wait_until("the old agent to be gone", LONG, || !pid_alive(old));
    let log = c.data_dir().join("workspaces/dev/agent.log");
    wait_until("the new agent to report the build's lifecycle", LONG, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("this build was started by an earlier agent run")
            .count()
            >= 1
    });
    let w = c.show("dev");
    assert_eq!((w["status"].as_str(), w["lifecycle"].as_str()), (Some("running"), Some("ready")), "{w}");
    assert!(!home.join("stops.txt").exists(), "the replaced agent ran its stop scripts");
    assert_eq!(std::fs::read_to_string(home.join("runs.txt")).unwrap(), "ran\n", "start scripts ran once");
}

/// The `retry_ms` and `retry_ceiling_ms` of each "connection to the coordinator lost" line in an
/// agent's log, and whether the agent has connected again since the last one.
fn retries_after_losses(log: &str) -> (Vec<(u64, u64)>, bool) {
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split(&format!(" {name}=")).nth(1)?.split_whitespace().next()?.parse().ok()
    };
    let mut retries = Vec::new();
    let mut connected_since = false;
    for line in log.lines() {
        if line.contains("connection to the coordinator lost") {
            if let (Some(delay), Some(ceiling)) = (field(line, "retry_ms"), field(line, "retry_ceiling_ms")) {
                retries.push((delay, ceiling));
                connected_since = false;
            }
        } else if line.contains("connected to the coordinator") {
            connected_since = true;
        }
    }
    (retries, connected_since)
}

/// Two agents started with one workspace's token (a unit file and a manual run, say) displace each
/// other at every hello. Each must back off further every time instead of starting over at each
/// welcome. And an agent told to stop while it waits to retry must not wait out its delay: its stop
/// scripts' spans and its final lifecycle still reach the coordinator before the drain deadline.
#[test]
fn agents_sharing_a_token_back_off_and_a_stop_does_not_wait_out_the_delay() {
    let c = Coordinator::start();
    let created = c.create(
        "twin",
        r#"
[[script]]
name = "bye"
run = "echo bye"
on = "stop"
"#,
        &[],
    );
    let token = created["agent_token"].as_str().unwrap();
    let mut first = Agent::start(&c, token, &c.data_dir().join("agent-twin-1"));
    c.wait_for("twin", "running", LONG);
    let mut second = Agent::start(&c, token, &c.data_dir().join("agent-twin-2"));
    // Each loss of the first agent's connection is the second's hello, and the other way round. Wait
    // until the first agent has just begun to wait well over its 5 s drain deadline.
    wait_until("the first agent to wait over 10 s to retry", 3 * LONG, || {
        let (retries, connected_since) = retries_after_losses(&first.log_text());
        !connected_since && retries.last().is_some_and(|(delay, _)| *delay > 10_000)
    });
    let (retries, _) = retries_after_losses(&first.log_text());
    // The backoff grew from one loss to the next instead of starting over at each welcome (a
    // connection that lasted 30 s would start it over; these last a few seconds at first).
    let ceilings: Vec<u64> = retries.iter().map(|(_, ceiling)| *ceiling).collect();
    assert!(ceilings.starts_with(&[250, 500, 1000, 2000]), "the backoff grows: {ceilings:?}");
    // Stop it now: it must reconnect to deliver its stop phase, not sleep on.
    second.kill();
    assert!(first.terminate().success(), "the agent exits 0 on SIGTERM:\n{}", first.log_text());
    let w = c.wait_for("twin", "stopped", LONG);
    assert_eq!(w["lifecycle"], "off", "{w}");
    assert_eq!(span(&c.timings("twin"), "stop_script", "bye")["status"], "ok");
}

/// A `command` workspace whose start launches the agent in the background and keeps its token, pid
/// and log beside the coordinator's data (`cmd-NAME.*`), and whose stop command waits for
/// `cmd-NAME.release` (a minute at most) when `slow_stop`, then leaves a mark.
fn background_agent_template(slow_stop: bool, stop_script: &str) -> String {
    let wait = if slow_stop {
        "touch $D.stopping; i=0; while [ ! -e $D.release ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; "
    } else {
        ""
    };
    format!(
        r#"
provisioner = "command"
[command]
start = "D=$(dirname $TETHER_CA)/cmd-$TETHER_WORKSPACE; mkdir -p $D; echo $TETHER_AGENT_TOKEN > $D.token; TETHER_AGENT_DATA_DIR=$D $TETHER_AGENT_BINARY > $D.log 2>&1 < /dev/null & echo $! > $D.pid"
stop = "D=$(dirname $TETHER_CA)/cmd-$TETHER_WORKSPACE; {wait}echo removed >> $D.stopped"
{stop_script}
"#
    )
}

/// A stop script that holds the agent's shutdown (touching `DIR/holding`) until `DIR/let-go`
/// exists (a minute at most), then prints "let go".
fn hold_stop_script(dir: &std::path::Path) -> String {
    format!(
        "[[script]]\nname = \"hold\"\non = \"stop\"\nrun = \"touch {d}/holding; i=0; while [ ! -e {d}/let-go ] && \
         [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; echo let go\"\n",
        d = dir.display()
    )
}

/// SIGTERM to the agent `pid` of workspace `name` (as in a container's stop): it begins its own
/// shutdown and is held in its [`hold_stop_script`], with the workspace `stopping`.
fn begin_own_shutdown(c: &Coordinator, name: &str, pid: i32) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_until("the stop script", LONG, || c.data_dir().join("holding").exists());
    wait_until("the workspace to be stopping", LONG, || c.show(name)["status"] == "stopping");
}

/// Creates and starts `cmdws` from a [`background_agent_template`]; returns where its files go
/// (`cmd-cmdws`, to take an extension), its agent token and its agent's pid.
fn start_background_agent(c: &Coordinator, template: &str) -> (std::path::PathBuf, String, i32) {
    c.create("cmdws", template, &["--start"]);
    assert_eq!(c.wait_for("cmdws", "running,unhealthy,failed", LONG)["status"], "running");
    let base = c.data_dir().join("cmd-cmdws");
    let read = |ext: &str| std::fs::read_to_string(base.with_extension(ext)).unwrap().trim().to_string();
    let (token, pid) = (read("token"), read("pid").parse().unwrap());
    (base, token, pid)
}

/// Waits until a test-started agent has been turned away with `why`, then until it exits: it
/// retries while the workspace is stopping, and gives up once the stop has revoked its token.
fn turned_away<'a>(agent: &'a mut Agent, why: &str) -> impl FnOnce() + 'a {
    wait_until("the coordinator to turn the second agent away", LONG, || agent.log_text().contains(why));
    move || {
        wait_until("the second agent to exit", LONG, || agent.child.try_wait().unwrap().is_some());
        let status = agent.child.wait().unwrap();
        assert!(!status.success(), "a refused agent exits with an error: {status}");
        let log = agent.log_text();
        assert!(log.contains("agent token is not valid"), "{log}");
    }
}

#[test]
fn another_agent_process_during_a_stop_is_refused_and_the_stop_finishes() {
    let c = Coordinator::start();
    let (base, token, _) = start_background_agent(&c, &background_agent_template(true, ""));

    // The stop has had the agent shut down and is running the provisioner's stop command when a
    // second agent process (say, a container's restart policy) comes with the same token.
    c.ok(&["workspace", "stop", "cmdws"]);
    wait_until("the stop command", LONG, || base.with_extension("stopping").exists());
    assert_eq!(c.show("cmdws")["status"], "stopping");
    let mut second = Agent::start(&c, &token, &c.data_dir().join("second"));
    let exits = turned_away(&mut second, "workspace 'cmdws' is stopping (stop requested)");

    // The stop finishes as it began, with no agent attached, and the second agent is told its
    // token is void.
    std::fs::write(base.with_extension("release"), "").unwrap();
    exits();
    let w = c.wait_for("cmdws", "stopped,unhealthy,failed", LONG);
    assert_eq!(w["status"], "stopped", "{w}");
    assert_eq!(std::fs::read_to_string(base.with_extension("stopped")).unwrap(), "removed\n");
    c.ok(&["workspace", "start", "cmdws"]);
    assert_eq!(c.wait_for("cmdws", "running,unhealthy,failed", LONG)["status"], "running");
    c.ok(&["workspace", "stop", "cmdws", "--wait"]);
}

#[test]
fn a_coordinator_restart_during_the_agents_own_shutdown_lets_it_finish_and_say_goodbye() {
    let mut c = Coordinator::start();
    let dir = c.data_dir().to_path_buf();
    let script = hold_stop_script(&dir);
    let (base, _, pid) = start_background_agent(&c, &background_agent_template(false, &script));
    begin_own_shutdown(&c, "cmdws", pid);

    // The coordinator restarts while the agent is in its stop script: nothing is stopped under it.
    c.restart();
    let w = c.show("cmdws");
    assert_eq!(w["status"], "stopping", "{w}");
    assert!(!base.with_extension("stopped").exists(), "the provisioner's stop waits for the agent");

    // The agent reconnects, finishes, and says goodbye; then the provisioner's stop runs, once.
    std::fs::write(dir.join("let-go"), "").unwrap();
    let w = c.wait_for("cmdws", "stopped,unhealthy,failed", LONG);
    assert_eq!(w["status"], "stopped", "{w}");
    assert!(w["status_reason"].as_str().unwrap().starts_with("agent shut down"), "{w}");
    assert_eq!(std::fs::read_to_string(base.with_extension("stopped")).unwrap(), "removed\n");
    assert!(c.logs("cmdws").contains(&("hold".into(), "let go".into())), "the stop script's last line arrived");
}

#[test]
fn a_second_agent_for_an_external_workspace_waits_for_the_first_ones_own_shutdown() {
    let c = Coordinator::start();
    let dir = c.data_dir().to_path_buf();
    let template = hold_stop_script(&dir);
    let created = c.create("ext", &template, &[]);
    let token = created["agent_token"].as_str().unwrap().to_string();
    let mut first = Agent::start(&c, &token, &dir.join("first"));
    assert_eq!(c.wait_for("ext", "running,unhealthy,failed", LONG)["status"], "running");

    // SIGTERM in the workspace: the first agent runs its stop script. A second agent process with
    // the token waits: an external workspace has no provisioner to stop, and the first agent still
    // holds the connection.
    begin_own_shutdown(&c, "ext", first.child.id() as i32);
    let second = Agent::start(&c, &token, &dir.join("second"));
    let why = "workspace 'ext' is stopping (agent is running stop scripts)";
    wait_until("the second agent to be turned away", LONG, || second.log_text().contains(why));
    assert_eq!(c.show("ext")["status"], "stopping");

    // The first agent finishes and says goodbye; the second one's next try starts the workspace.
    std::fs::write(dir.join("let-go"), "").unwrap();
    wait_until("the first agent to exit", LONG, || first.child.try_wait().unwrap().is_some());
    let w = c.wait_for("ext", "running,unhealthy,failed", LONG);
    assert_eq!(w["status"], "running", "{w}");
    assert_eq!(w["build"], 2, "{w}");
}

#[test]
fn a_delete_during_a_stop_takes_it_over_and_the_provisioner_stops_once() {
    delete_during_a_stop(true);
}

#[test]
fn a_delete_that_took_over_a_stop_and_failed_leaves_the_workspace_stopped() {
    delete_during_a_stop(false);
}

/// The stop is in the provisioner's stop command when the user deletes the workspace; the
/// provisioner's delete command succeeds when `deletes`, else fails.
fn delete_during_a_stop(deletes: bool) {
    let c = Coordinator::start();
    let delete = if deletes { "echo deleted >> $(dirname $TETHER_CA)/cmd-$TETHER_WORKSPACE.stopped" } else { "exit 3" };
    let template = background_agent_template(true, &format!("delete = \"{delete}\"\n"));
    let (base, _, _) = start_background_agent(&c, &template);
    c.ok(&["workspace", "stop", "cmdws"]);
    wait_until("the stop command", LONG, || base.with_extension("stopping").exists());

    let out = c.ok(&["workspace", "delete", "cmdws"]);
    assert!(out.contains("deleting"), "{out}");
    assert_eq!(c.show("cmdws")["status"], "deleting");
    std::fs::write(base.with_extension("release"), "").unwrap();
    let w = c.wait_for("cmdws", "deleted,failed,stopped,unhealthy", LONG);
    // The stop command ran once either way.
    if deletes {
        assert_eq!(w["status"], "deleted", "{w}");
        assert_eq!(std::fs::read_to_string(base.with_extension("stopped")).unwrap(), "removed\ndeleted\n");
    } else {
        // What the stop did stands: the workspace is stopped, with the delete's failure said.
        assert_eq!(w["status"], "stopped", "{w}");
        let reason = w["status_reason"].as_str().unwrap();
        assert!(reason.starts_with("stopped; delete failed: "), "{w}");
        assert_eq!(std::fs::read_to_string(base.with_extension("stopped")).unwrap(), "removed\n");
        c.ok(&["workspace", "start", "cmdws"]);
        assert_eq!(c.wait_for("cmdws", "running,unhealthy,failed", LONG)["status"], "running");
        c.ok(&["workspace", "stop", "cmdws", "--wait"]);
    }
}

#[test]
fn a_new_agent_process_after_the_agent_was_killed_in_its_own_shutdown_gets_the_provisioner_stop() {
    new_agent_process_during_own_shutdown(true);
}

#[test]
fn a_new_agent_process_while_the_agent_runs_its_stop_scripts_gets_the_provisioner_stop() {
    new_agent_process_during_own_shutdown(false);
}

/// SIGTERM inside the workspace starts the agent's own shutdown, held in its stop script; the agent
/// is then SIGKILLed (the container's grace period ran out) when `killed`, and a new agent process
/// comes with the workspace's token (the container was restarted).
fn new_agent_process_during_own_shutdown(killed: bool) {
    let c = Coordinator::start();
    let dir = c.data_dir().to_path_buf();
    // The agent's stop script holds its shutdown until the test lets it go.
    let script = hold_stop_script(&dir);
    let (base, token, pid) = start_background_agent(&c, &background_agent_template(false, &script));
    begin_own_shutdown(&c, "cmdws", pid);
    if killed {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    }

    // That shutdown is over, what the provisioner started is stopped, and the new process is
    // refused. The old agent's connection is still open (alive, or dead and not yet noticed), so
    // the reason does not call it lost.
    let mut second = Agent::start(&c, &token, &dir.join("second"));
    let exits = turned_away(&mut second, "workspace 'cmdws' is stopping");
    let reason = "agent was shutting down on its own when a new agent process connected, before its goodbye";
    if !killed {
        let w = c.show("cmdws");
        assert!(w["status_reason"].as_str().unwrap().contains(reason), "{w}");
        // The old agent finishes its stop script and says goodbye.
        std::fs::write(dir.join("let-go"), "").unwrap();
    }
    exits();
    let w = c.wait_for("cmdws", "stopped,unhealthy,failed", LONG);
    assert_eq!(w["status"], "stopped", "{w}");
    assert!(w["status_reason"].as_str().unwrap().contains(reason), "{w}");
    // The killed agent's stop script is let go.
    std::fs::write(dir.join("let-go"), "").unwrap();
    assert_eq!(std::fs::read_to_string(base.with_extension("stopped")).unwrap(), "removed\n", "stopped once");
}

#[test]
fn an_agent_restarted_after_a_kill_at_the_start_of_its_shutdown_reports_its_start_not_a_shutdown() {
    let c = Coordinator::start();
    let dir = c.data_dir().to_path_buf();
    let template = format!(
        "heartbeat_timeout = \"3s\"\n[[script]]\nname = \"setup\"\nrun = \"echo run >> {}/starts\"\n",
        dir.display()
    );
    let created = c.create("ext", &template, &[]);
    let token = created["agent_token"].as_str().unwrap().to_string();
    let data = dir.join("agent");
    let mut first = Agent::start(&c, &token, &data);
    assert_eq!(c.wait_for("ext", "running,unhealthy,failed", LONG)["status"], "running");
    let runs = || std::fs::read_to_string(dir.join("starts")).unwrap_or_default().lines().count();
    assert_eq!(runs(), 1);

    // The agent is killed just after it began its shutdown: it has written that to its state file
    // (as it does before its stop scripts run) but the news has not left it, so the coordinator still
    // has the workspace running. The container or VM comes back with a new agent process.
    first.kill();
    let state_file = data.join("state.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    assert_eq!(state["lifecycle"], "ready", "{state}");
    state["lifecycle"] = "shutting_down".into();
    state["start"] = "ready".into();
    std::fs::write(&state_file, state.to_string()).unwrap();
    let second = Agent::start(&c, &token, &data);
    wait_until("the new agent to take the earlier start", LONG, || {
        second.log_text().contains("not running its start scripts again")
    });
    // Two heartbeats after that: they travel behind its lifecycle report, so the report is in.
    for _ in 0..2 {
        let before = c.show("ext")["last_heartbeat_at"].clone();
        wait_until("a heartbeat", LONG, || c.show("ext")["last_heartbeat_at"] != before);
    }
    // The new process is not shutting down: the workspace is running, not stuck "stopping" beside
    // a live agent, and its start script did not run twice.
    let w = c.show("ext");
    assert_eq!(w["status"], "running", "{w}");
    assert_eq!(w["lifecycle"], "ready", "{w}");
    assert_eq!(runs(), 1);
}

/// A coordinator that went down between a start request and its provisioning begins that
/// provisioning when it is back; one that went down during provisioning (whose outcome it cannot
/// know) says so and waits for the agent. The database is set to what each moment leaves behind.
#[test]
fn a_start_cut_off_by_a_restart_is_resumed_or_says_so() {
    let mut c = Coordinator::start();
    for name in ["cut", "mid"] {
        c.create(name, "provisioner = \"process\"\n", &["--start", "--wait"]);
        c.ok(&["workspace", "stop", name, "--wait"]);
    }
    c.terminate();
    let db = c.data_dir().join("tether.db");
    let sql = |statement: &str| {
        let script = "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\nc.execute(sys.argv[2])\nc.commit()";
        let out = Command::new("/usr/bin/python3").args(["-c", script]).arg(&db).arg(statement).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    sql("UPDATE workspaces SET status = 'pending', status_reason = 'start requested', op = 'start' WHERE name = 'cut'");
    sql("UPDATE workspaces SET status = 'starting', status_reason = 'provisioning', op = 'start' WHERE name = 'mid'");
    c.start_again();

    let w = c.wait_for("cut", "running,unhealthy,failed", LONG);
    assert_eq!(
        (w["status"].as_str(), w["status_reason"].as_str()),
        (Some("running"), Some("agent connected; startup scripts finished"))
    );
    let w = c.show("mid");
    let reason = "provisioning was cut off by a coordinator restart; waiting for the agent to connect";
    assert_eq!((w["status"].as_str(), w["status_reason"].as_str()), (Some("starting"), Some(reason)), "{w}");
    // Starting it again changes nothing, and shows why it is starting.
    let out = c.cli(&["workspace", "start", "mid"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("mid: starting ({reason})\n"));
}

#[test]
fn a_process_workspace_gets_none_of_the_coordinators_environment_but_what_it_needs() {
    // Ops' secrets in the coordinator's environment stay there: the agent hands its environment
    // to scripts and SSH sessions, and a `process` agent's would be the coordinator's.
    let c = Coordinator::start_with_env(&[("TETHER_E2E_SECRET", "hunter2"), ("LC_E2E", "passed")]);
    let template = "provisioner = \"process\"\n[[script]]\nname = \"env\"\nrun = \"echo secret=${TETHER_E2E_SECRET:-absent} lc=${LC_E2E:-absent} path=${PATH:+set}\"\n";
    c.create("dev", template, &["--start"]);
    assert_eq!(c.wait_for("dev", "running,unhealthy,failed", LONG)["status"], "running");
    let lines: Vec<String> = c.logs("dev").into_iter().filter(|(s, _)| s == "env").map(|(_, l)| l).collect();
    assert_eq!(lines, ["secret=absent lc=passed path=set"]);
}

#[test]
fn a_delete_cut_off_by_a_coordinator_restart_lets_the_agent_finish_its_stop_scripts() {
    let mut c = Coordinator::start();
    let ran = c.data_dir().join("stop-ran");
    let template = format!(
        "provisioner = \"process\"\n[[script]]\nname = \"save\"\non = \"stop\"\nrun = \"sleep 3; echo saved > {}\"\n",
        ran.display()
    );
    c.create("dev", &template, &["--start"]);
    assert_eq!(c.wait_for("dev", "running,unhealthy,failed", LONG)["status"], "running");
    c.ok(&["workspace", "delete", "dev"]);
    wait_until("the stop script to run", LONG, || c.show("dev")["lifecycle"] == "shutting_down");
    c.kill();
    c.start_again();
    // The agent comes back to the restarted coordinator, finishes its stop script and says
    // goodbye; the delete then ends. It used to be turned away ("workspace 'dev' is deleted") and
    // killed.
    wait_until("the delete to end", LONG, || c.show("dev")["status"] == "deleted");
    assert_eq!(std::fs::read_to_string(&ran).unwrap_or_default(), "saved\n", "the stop script finished");
    assert!(!c.log_tail().contains("workspace 'dev' is deleted"), "{}", c.log_tail());
}

#[test]
fn a_wait_gives_up_at_its_timeout() {
    let c = Coordinator::start();
    let template = "provisioner = \"process\"\n[[script]]\nname = \"slow\"\nrun = \"sleep 30\"\nblocks_login = true\n";
    let path = c.data_dir().join("slow.toml");
    std::fs::write(&path, template).unwrap();
    c.ok(&["workspace", "create", "dev", "--template", path.to_str().unwrap()]);
    let out = c.cli(&["workspace", "start", "dev", "--wait", "--timeout", "2s"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("is still starting") && said.trim_end().ends_with("after 2s"), "{said}");
    // Only with --wait.
    assert_eq!(c.cli(&["workspace", "stop", "dev", "--timeout", "2s"]).status.code(), Some(64));
}

/// One agent per data directory: a second one started on it (a stray copy, or a restart before the
/// old process is gone) waits for the first to exit rather than ending its scripts as a dead
/// agent's leftovers and taking the workspace's connection from it; then it takes over as any
/// restarted agent does. The token comes from a file, which the scripts never learn the name of,
/// and the disk figures are the ones `df` gives the workspace's user.
#[test]
fn a_second_agent_on_a_data_directory_waits_for_the_first_to_exit_then_takes_over() {
    let c = Coordinator::start();
    let dir = c.data_dir().to_path_buf();
    let template = format!(
        "[[script]]\nname = \"setup\"\nrun = \"echo run >> {d}/starts; env > {d}/script-env; \
         while [ ! -e {d}/go ]; do sleep 0.1; done; echo ready\"\n",
        d = dir.display()
    );
    let created = c.create("ext", &template, &[]);
    let token = created["agent_token"].as_str().unwrap().to_string();
    let token_file = dir.join("agent-token");
    std::fs::write(&token_file, &token).unwrap();
    let data = dir.join("agent");
    let spawn = |log: &str| {
        let log = dir.join(log);
        let f = std::fs::File::create(&log).unwrap();
        let child = Agent::command(&c, "unused", &data, &[])
            .env_remove("TETHER_AGENT_TOKEN")
            .env("TETHER_AGENT_TOKEN_FILE", &token_file)
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Agent { child, data_dir: data.clone(), log }
    };
    let mut first = spawn("first.log");
    let runs = || std::fs::read_to_string(dir.join("starts")).unwrap_or_default().lines().count();
    wait_until("the start script to begin", LONG, || runs() == 1);

    // The second waits, saying for whom; the first's script is not ended, and it finishes.
    let second = spawn("second.log");
    let second_log = || second.log_text();
    let waiting =
        format!("another tether-agent (pid {}) is using this data directory: waiting for it to exit", first.child.id());
    wait_until("the second agent to wait", LONG, || second_log().contains(&waiting));
    // The first's script, running all along, is let go only now: it finishes.
    std::fs::write(dir.join("go"), "").unwrap();
    let w = c.wait_for("ext", "running,unhealthy,failed", LONG);
    assert_eq!((&w["status"], &w["lifecycle"]), (&"running".into(), &"ready".into()), "{w}");
    assert!(c.logs("ext").contains(&("setup".into(), "ready".into())), "{:?}", c.logs("ext"));
    assert!(first.child.try_wait().unwrap().is_none(), "the first agent runs on");
    assert_eq!(runs(), 1);

    // Scripts see neither the token nor where it is kept.
    let env = std::fs::read_to_string(dir.join("script-env")).unwrap();
    assert!(!env.contains("TETHER_AGENT_TOKEN") && !env.contains(&token), "{env}");

    // What `show` gives of the disk is what `df` gives: used, and used plus what the user may still
    // fill (blocks kept for root are in neither).
    let home = std::env::var("HOME").unwrap();
    let df = Command::new("df").args(["-B1", "--output=used,avail", &home]).output().unwrap();
    let df = String::from_utf8_lossy(&df.stdout).lines().nth(1).unwrap().to_string();
    let df: Vec<f64> = df.split_whitespace().map(|n| n.parse().unwrap()).collect();
    wait_until("the agent's disk figures", LONG, || c.show("ext")["agent"]["stats"]["disk_total"].as_u64() > Some(0));
    let stats = c.show("ext")["agent"]["stats"].clone();
    let total = stats["disk_total"].as_f64().unwrap();
    assert!((total - (df[0] + df[1])).abs() < 0.02 * total, "df: {df:?}, stats: {stats}");

    // The first goes (killed, as by a crash): the second takes over as a restarted agent, reporting
    // the start it finished rather than running it again.
    first.kill();
    wait_until("the second agent to go on", LONG, || {
        second_log().contains("the other agent has exited: going on")
            && second_log().contains("not running its start scripts again")
    });
    let w = c.wait_for("ext", "running,unhealthy,failed", LONG);
    assert_eq!(w["status"], "running", "{w}");
    assert_eq!(runs(), 1);
}

/// A stop or delete that comes while a `command` start is still provisioning ends the start
/// command's whole process group (SIGTERM, as `docker stop` does) and waits for it before the
/// provisioner's stop or delete runs: what the start made is never made after it was removed.
#[test]
fn a_stop_or_delete_during_a_command_start_ends_the_start_command_first() {
    let c = Coordinator::start();
    let dir = c.data_dir().to_path_buf();
    let journal = dir.join("journal");
    let template = format!(
        r#"
provisioner = "command"
[command]
start = "trap 'echo start cancelled >> {j}; exit 143' TERM; echo provisioning; echo start began >> {j}; sleep 7321 & wait; echo start made it >> {j}"
stop = "echo stop ran >> {j}"
delete = "echo delete ran >> {j}"
"#,
        j = journal.display()
    );
    let lines = || std::fs::read_to_string(&journal).unwrap_or_default();
    let sleeping = || {
        let out = Command::new("pgrep").args(["-f", "^sleep 7321$"]).output().unwrap();
        !out.stdout.is_empty()
    };

    c.create("cmd", &template, &["--start"]);
    wait_until("the start command to begin", LONG, || lines().contains("start began"));
    // Its output is there to read while it runs (a long `docker pull`), not only once it ends.
    wait_until("the start command's first line in its logs", LONG, || {
        c.logs("cmd").contains(&("provision:start".into(), "provisioning".into()))
    });
    let w = c.json(&["workspace", "stop", "cmd", "--wait"]);
    assert_eq!(w["status"], "stopped", "{w}");
    assert_eq!(lines(), "start began\nstart cancelled\nstop ran\n");
    assert!(!sleeping(), "the start command's children were ended with it");
    let spans = c.timings("cmd");
    let started = span(&spans, "provision", "start command");
    assert_eq!(started["status"], "cancelled", "{started}");
    assert!(c.logs("cmd").contains(&("provision:start".into(), "provisioning".into())), "{:?}", c.logs("cmd"));

    std::fs::remove_file(&journal).unwrap();
    c.ok(&["workspace", "start", "cmd"]);
    wait_until("the start command to begin again", LONG, || lines().contains("start began"));
    let w = c.json(&["workspace", "delete", "cmd", "--wait"]);
    assert_eq!(w["status"], "deleted", "{w}");
    assert_eq!(lines(), "start began\nstart cancelled\nstop ran\ndelete ran\n");
    assert!(!sleeping());
}
