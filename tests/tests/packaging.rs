//! The Debian packages: built with `cargo deb` from the binaries `cargo test` already built,
//! installed with `dpkg -i`, and the installed programs answer `--version` and start.
//!
//! Needs root, dpkg and cargo-deb (`cargo install cargo-deb --locked`); without them the test
//! says so and passes without checking anything.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tether_tests::{bin, wait_until};

const PACKAGES: [(&str, &str); 2] = [("tether-coordinator", "tether"), ("tether-agent", "tether-agent")];

#[test]
fn debian_packages_install_and_run() {
    if let Some(reason) = why_not_here() {
        println!("skipping the Debian package test: {reason}");
        eprintln!("skipping the Debian package test: {reason}");
        return;
    }
    // The packages take the binaries `cargo test --workspace` built (target/debug).
    bin("tether");
    bin("tether-agent");

    let debs = tempfile::Builder::new().prefix("tether-deb-").tempdir().expect("tempdir");
    let built = Instant::now();
    let files: Vec<PathBuf> = PACKAGES.iter().map(|(crate_name, _)| cargo_deb(crate_name, debs.path())).collect();
    println!("built {} packages in {:.1?}", files.len(), built.elapsed());

    let installed = Installed;
    let out = run(Command::new("dpkg").arg("-i").args(&files));
    assert!(out.status.success(), "dpkg -i failed:\n{}", text(&out));

    // What each package put where.
    for (path, source) in [
        ("/lib/systemd/system/tether.service", "packaging/systemd/tether.service"),
        ("/lib/systemd/system/tether-agent.service", "packaging/systemd/tether-agent.service"),
        ("/etc/tether/tether.toml", "packaging/tether.toml"),
        ("/usr/share/doc/tether/README.md", "README.md"),
        ("/usr/share/doc/tether-agent/README.md", "README.md"),
    ] {
        let got = std::fs::read(path).unwrap_or_else(|e| panic!("{path} not installed: {e}"));
        assert!(got == std::fs::read(workspace_root().join(source)).expect("source"), "{path} differs from {source}");
    }
    let owner = run(Command::new("dpkg").args(["-S", "/usr/bin/tether"]));
    assert_eq!(String::from_utf8_lossy(&owner.stdout).trim(), "tether: /usr/bin/tether");

    let version = env!("CARGO_PKG_VERSION");
    for (program, name) in [("/usr/bin/tether", "tether"), ("/usr/bin/tether-agent", "tether-agent")] {
        let out = run(Command::new(program).arg("--version"));
        assert!(out.status.success(), "{program} --version failed:\n{}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{name} {version}"));
    }

    // A short start of the installed coordinator, as the unit runs it.
    let data = tempfile::Builder::new().prefix("tether-deb-data-").tempdir().expect("tempdir");
    let log = std::fs::File::create(data.path().join("coordinator.log")).expect("log");
    let mut serve = Command::new("/usr/bin/tether")
        .arg("serve")
        .arg("--data-dir")
        .arg(data.path())
        .args(["--config", "/etc/tether/tether.toml"])
        .args(["--listen-http", "127.0.0.1:0", "--listen-quic", "127.0.0.1:0", "--listen-ssh", "127.0.0.1:0"])
        .args(["--listen-https", "127.0.0.1:0"])
        .env_remove("TETHER_URL")
        .env_remove("TETHER_TOKEN")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn /usr/bin/tether serve");
    let serve_log = || std::fs::read_to_string(data.path().join("coordinator.log")).unwrap_or_default();
    wait_until("coordinator.json", Duration::from_secs(30), || {
        if let Ok(Some(status)) = serve.try_wait() {
            panic!("/usr/bin/tether serve exited early with {status}:\n{}", serve_log());
        }
        data.path().join("coordinator.json").exists()
    });

    let out = run(Command::new("/usr/bin/tether")
        .arg("--data-dir")
        .arg(data.path())
        .args(["workspace", "list", "--json"])
        .env_remove("TETHER_URL")
        .env_remove("TETHER_TOKEN"));
    assert!(out.status.success(), "tether workspace list failed:\n{}\n{}", text(&out), serve_log());
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("workspace list --json");
    assert_eq!(list, serde_json::json!([]), "a fresh coordinator has no workspaces");

    let pid = nix::unistd::Pid::from_raw(serve.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    wait_until("tether serve to exit after SIGTERM", Duration::from_secs(20), || {
        serve.try_wait().expect("try_wait").is_some()
    });
    let status = serve.wait().expect("wait");
    assert!(status.success(), "tether serve exited with {status} after SIGTERM:\n{}", serve_log());

    drop(installed);
    for (_, package) in PACKAGES {
        assert!(!installed_now(package), "{package} still installed after dpkg --purge");
    }
}

/// Why this machine cannot run the test, if it cannot.
fn why_not_here() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root, so dpkg -i cannot install".into());
    }
    if Command::new("dpkg").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        return Some("no dpkg on this machine".into());
    }
    let cargo_deb = Command::new(cargo()).args(["deb", "--version"]).output();
    if cargo_deb.map(|o| !o.status.success()).unwrap_or(true) {
        return Some("cargo-deb is not installed (cargo install cargo-deb --locked)".into());
    }
    // Never replace, then remove, packages someone installed for real.
    if let Some((_, package)) = PACKAGES.iter().find(|(_, package)| installed_now(package)) {
        return Some(format!("the {package} package is already installed; not touching it"));
    }
    None
}

/// Builds one package from the debug binaries, without compiling; returns the .deb.
fn cargo_deb(crate_name: &str, out_dir: &Path) -> PathBuf {
    let out = run(Command::new(cargo())
        .current_dir(workspace_root())
        .args(["deb", "--no-build", "--profile", "dev", "--fast", "-p", crate_name, "--output"])
        .arg(out_dir));
    assert!(out.status.success(), "cargo deb -p {crate_name} failed:\n{}", text(&out));
    // cargo-deb prints the path of the package it made as its last line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(
        path.extension().is_some_and(|e| e == "deb") && path.exists(),
        "cargo deb -p {crate_name} made no .deb:\n{}",
        text(&out)
    );
    path
}

/// Purges the packages when dropped, also when the test fails halfway.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let out = Command::new("dpkg").arg("--purge").args(PACKAGES.map(|(_, package)| package)).output();
        match out {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("dpkg --purge failed:\n{}", text(&out)),
            Err(err) => eprintln!("dpkg --purge did not run: {err}"),
        }
    }
}

fn installed_now(package: &str) -> bool {
    let out = Command::new("dpkg-query").args(["-W", "-f", "${db:Status-Status}", package]).output();
    out.is_ok_and(|o| o.status.success() && o.stdout == b"installed")
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()))
}

fn text(out: &Output) -> String {
    format!("{}\n{}\n{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
