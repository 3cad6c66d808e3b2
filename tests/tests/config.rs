//! The coordinator's configuration file, with the real `tether` binary: a bad file is refused with
//! every problem and its line before anything is created or bound (exit 64, for `serve` and for
//! `config check` alike), and a good one is used, with the environment and flags above it.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tether_tests::{bin, wait_until};

fn tether(dir: &Path) -> Command {
    let mut c = Command::new(bin("tether"));
    // Nothing from the machine running the tests leaks in.
    for (k, _) in std::env::vars() {
        if k.starts_with("TETHER_") {
            c.env_remove(k);
        }
    }
    c.env("HOME", dir).current_dir(dir).stdin(Stdio::null());
    c
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn a_bad_file_is_refused_with_every_problem_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("never-created");
    let file = dir.path().join("tether.toml");
    std::fs::write(
        &file,
        format!(
            r#"# Tether
data_dir = "{}"
listen_http = "127.0.0.1:0"
listen_quic = "localhost"
max_agents = -3
lisen_ssh = "127.0.0.1:0"
log_format = "xml"
advertise_ssh = "example.com"
log = "info,[nope"

[ssh]
port = 22
"#,
            data.display()
        ),
    )
    .unwrap();
    let f = file.display().to_string();
    let want = [
        format!("{f}:4: listen_quic: 'localhost': invalid socket address syntax"),
        format!("{f}:5: max_agents: '-3'"),
        format!("{f}:6: unknown key 'lisen_ssh' (did you mean 'listen_ssh'?)"),
        format!("{f}:7: log_format: 'xml' is not one of: text, json"),
        format!("{f}:8: advertise_ssh: 'example.com' is not HOST:PORT (no port)"),
        format!("{f}:9: log: 'info,[nope' is not a log filter"),
        format!("{f}:11: unknown key 'ssh'"),
    ];
    for args in [vec!["serve"], vec!["config", "check"]] {
        let out = tether(dir.path()).args(&args).arg("--config").arg(&file).output().unwrap();
        let all = text(&out);
        assert_eq!(out.status.code(), Some(64), "{args:?} exits 64: {all}");
        assert!(all.starts_with("error: invalid configuration (7 problems):"), "{args:?}: {all}");
        for w in &want {
            assert!(all.contains(w.as_str()), "{args:?} reports {w:?}:\n{all}");
        }
        assert!(!all.contains("listening"), "{args:?} bound nothing: {all}");
        assert!(!data.exists(), "{args:?} created nothing");
    }

    // The file through TETHER_CONFIG, and a bad variable reported along with the file's problems.
    let out = tether(dir.path())
        .args(["config", "check"])
        .env("TETHER_CONFIG", &file)
        .env("TETHER_LISTEN_HTTP", "nowhere:port")
        .output()
        .unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(64), "{all}");
    assert!(all.contains("environment TETHER_LISTEN_HTTP: 'nowhere:port'"), "{all}");
    assert!(all.contains("(8 problems)"), "{all}");

    // Files that are not configuration at all.
    std::fs::write(&file, "listen_http = \"127.0.0.1:0\"\nlisten_quic = [\n").unwrap();
    let out = tether(dir.path()).args(["serve", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains(&format!("{f}:2: ")), "a syntax error names its line: {}", text(&out));
    let missing = dir.path().join("nope.toml");
    let out = tether(dir.path()).args(["serve", "--config"]).arg(&missing).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("cannot read the configuration file"), "{}", text(&out));
    // Settings that only fail together.
    let out = tether(dir.path()).args(["config", "check", "--tls-cert"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("tls_cert (flag) needs tls_key"), "{}", text(&out));
    // From the file, it is given as the file's other problems are, at its line.
    let lone = dir.path().join("lone.toml");
    std::fs::write(&lone, "# HTTPS\ntls_cert = \"/etc/ssl/x.pem\"\n").unwrap();
    let out = tether(dir.path()).args(["config", "check", "--config"]).arg(&lone).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains(&format!("{}:2: tls_cert needs tls_key", lone.display())), "{}", text(&out));
    // A certificate with another certificate's key: found by the check, and `serve` creates nothing.
    for name in ["a", "b"] {
        let made = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2"])
            .args(["-subj", &format!("/CN={name}"), "-keyout", &format!("{name}.key"), "-out", &format!("{name}.pem")])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(made.status.success(), "openssl: {}", text(&made));
    }
    let (cert, key) = (dir.path().join("a.pem"), dir.path().join("b.key"));
    let want = format!("the private key in {} is not the key of the certificate in {}", key.display(), cert.display());
    for args in [vec!["config", "check"], vec!["serve", "--data-dir", data.to_str().unwrap()]] {
        let out =
            tether(dir.path()).args(&args).arg("--tls-cert").arg(&cert).arg("--tls-key").arg(&key).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{}", text(&out));
        assert!(text(&out).contains(&want), "{}", text(&out));
    }
    assert!(!data.exists(), "nothing created");
    // A bad flag is a usage error with the same status.
    let out = tether(dir.path()).args(["serve", "--listen-htp", "127.0.0.1:0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    // So is a limit that would turn every agent away.
    let out = tether(dir.path()).args(["config", "check", "--max-agents", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("0 would turn every agent away"), "{}", text(&out));
}

#[test]
fn a_good_file_is_used_and_the_environment_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    // Under a parent that does not exist yet either.
    let data = dir.path().join("srv").join("data");
    let file = dir.path().join("tether.toml");
    std::fs::write(
        &file,
        format!(
            r#"data_dir = "{}"
listen_http = "127.0.0.1:1"     # overridden by the flag
listen_quic = "127.0.0.1:1"     # overridden by TETHER_LISTEN_QUIC
listen_ssh = "off"
listen_https = "127.0.0.1:0"
max_agents = 12
log = "warn"
"#,
            data.display()
        ),
    )
    .unwrap();
    let configure = |c: &mut Command| {
        c.arg("--config").arg(&file).arg("--listen-http").arg("127.0.0.1:0").env("TETHER_LISTEN_QUIC", "127.0.0.1:0");
        // A mistyped variable is ignored, with a warning; the agent's own and the scripts' are not
        // warned about.
        c.env("TETHER_KEEP_AUDT", "7d").env("TETHER_AGENT_DATA_DIR", "/x").env("TETHER_WORKSPACE", "dev");
    };

    let mut check = tether(dir.path());
    check.args(["config", "check"]);
    configure(&mut check);
    let out = check.output().unwrap();
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    let line = |key: &str| report.lines().find(|l| l.trim_start().starts_with(&format!("{key} "))).unwrap_or("");
    assert!(line("listen_http").ends_with("# flag"), "{report}");
    assert!(line("listen_quic").ends_with("# environment TETHER_LISTEN_QUIC"), "{report}");
    assert!(line("max_agents").contains("\"12\"") && line("max_agents").ends_with("# file, line 6"), "{report}");
    assert!(line("listen_ssh").ends_with("# file, line 4"), "{report}");
    assert!(line("log_format").ends_with("# default"), "{report}");
    let warning = "environment variable TETHER_KEEP_AUDT is not a Tether setting and is ignored (did you mean \
                   TETHER_KEEP_AUDIT?)";
    assert!(report.contains(&format!("\nwarning: {warning}\n")), "{report}");
    assert_eq!(report.matches("warning:").count(), 1, "{report}");
    assert!(line("keep_audit").ends_with("# default"), "{report}");
    assert!(!data.exists(), "config check starts nothing");

    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let mut serve = tether(dir.path());
    serve.arg("serve");
    configure(&mut serve);
    let mut child = serve.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap();
    let info_path = data.join("coordinator.json");
    let serve_log = || std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default();
    wait_until("the coordinator to start from its file", Duration::from_secs(60), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("tether serve exited with {status}: {}", serve_log());
        }
        info_path.exists()
    });
    let info: Value = serde_json::from_slice(&std::fs::read(&info_path).unwrap()).unwrap();
    let port = |k: &str| info[k].as_str().and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse::<u16>().ok());
    assert_ne!(port("http_addr"), Some(1), "the flag won: {info}");
    assert_ne!(port("quic_addr"), Some(1), "the environment won: {info}");
    assert_eq!(info["ssh_addr"], Value::Null, "the file turned the front door off: {info}");
    assert!(!serve_log().contains("coordinator listening"), "the file's log filter (warn) applies: {}", serve_log());
    assert!(serve_log().contains(warning), "serve logs the warning: {}", serve_log());
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&data).unwrap().permissions()) & 0o777;
    assert_eq!(mode, 0o700, "the data directory it made is private");
    let parent =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.path().join("srv")).unwrap().permissions());
    assert_eq!(parent & 0o077, 0o755 & !umask() & 0o077, "a parent it made has the usual mode, as mkdir -p gives it");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {}", serve_log());
}

#[test]
fn config_check_says_where_the_default_data_directory_is() {
    let dir = tempfile::tempdir().unwrap();
    let out = tether(dir.path()).args(["config", "check"]).env_remove("XDG_DATA_HOME").output().unwrap();
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    let want = format!("(unset: {}) # default", dir.path().join(".local/share/tether").display());
    assert!(report.lines().any(|l| l.trim_start().starts_with("data_dir ") && l.contains(&want)), "{report}");
}

/// This process's file mode creation mask, as Linux shows it (setting it to read it would race
/// with the other tests' files).
fn umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find_map(|l| l.strip_prefix("Umask:")).expect("Umask in /proc/self/status");
    u32::from_str_radix(line.trim(), 8).unwrap()
}

#[test]
fn an_empty_variable_counts_as_unset_for_every_command() {
    let dir = tempfile::tempdir().unwrap();
    // As `serve` and `config check` read them: TETHER_DATA_DIR= is no data directory, not a
    // `--data-dir` given no value.
    let out = tether(dir.path())
        .args(["--url", "http://127.0.0.1:1", "--token", "x", "workspace", "count"])
        .env("TETHER_DATA_DIR", "")
        .env("TETHER_LOG", "")
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("cannot reach the coordinator at http://127.0.0.1:1"), "{said}");
}

#[test]
fn a_port_in_use_stops_serve_before_it_makes_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = tether(dir.path())
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen-http", &addr, "--listen-quic", "127.0.0.1:0", "--listen-ssh", "off"])
        .output()
        .unwrap();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains(&format!("binding the HTTP API on {addr}")), "{said}");
    // A first start that failed there leaves no CA, host keys, database or admin token behind.
    let left: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".pem") || n.contains("token") || n.ends_with(".db") || n.contains("ssh"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
