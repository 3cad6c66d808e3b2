//! A harness for end-to-end tests: starts the real `tether` and `tether-agent` binaries on
//! 127.0.0.1 in temporary directories and talks to them the way users do, through the CLI.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long end-to-end tests wait for an event (a status, a log line, a file) before failing:
/// generous, because the tests wait on events and a loaded 2-core machine can be slow.
pub const LONG: Duration = Duration::from_secs(90);

/// A built binary of this workspace (`cargo test --workspace` builds them before any test runs).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo test --workspace` (or `cargo build --workspace`) first",
        path.display()
    );
    path
}

/// Waits for `cond` with a deadline, checking every `every`. For conditions no event announces
/// (a file appearing, a process going away).
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Coordinator {
    pub dir: tempfile::TempDir,
    pub info: Value,
    child: Option<Child>,
    http_port: u16,
    quic_port: u16,
    ssh_port: u16,
    https_port: u16,
    /// More `tether serve` flags, kept across restarts.
    extra_args: Vec<String>,
    /// Its stdout and stderr are a pipe nobody reads (closed), not the log file.
    lost_log: bool,
    /// More environment variables for `tether serve`.
    extra_env: Vec<(String, String)>,
}

impl Coordinator {
    pub fn start() -> Coordinator {
        Coordinator::start_with(&[])
    }

    /// Starts a coordinator with more `tether serve` flags.
    pub fn start_with(args: &[&str]) -> Coordinator {
        let dir = tempfile::Builder::new().prefix("tether-e2e-").tempdir().expect("tempdir");
        let mut c = Coordinator::unstarted(dir);
        c.extra_args = args.iter().map(|a| a.to_string()).collect();
        c.spawn();
        c
    }

    /// Starts a coordinator whose stdout and stderr are a pipe whose reader has gone, as when the
    /// process it logged to (`tee`, a log shipper) died: every log line fails to be written.
    pub fn start_with_lost_log() -> Coordinator {
        let dir = tempfile::Builder::new().prefix("tether-e2e-").tempdir().expect("tempdir");
        let mut c = Coordinator::unstarted(dir);
        c.lost_log = true;
        c.spawn();
        c
    }

    /// Starts a coordinator with these environment variables besides the test's own.
    pub fn start_with_env(env: &[(&str, &str)]) -> Coordinator {
        let dir = tempfile::Builder::new().prefix("tether-e2e-").tempdir().expect("tempdir");
        let mut c = Coordinator::unstarted(dir);
        c.extra_env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        c.spawn();
        c
    }

    /// Starts a coordinator on a data directory that already holds its state (a restored backup).
    pub fn start_in(dir: tempfile::TempDir) -> Coordinator {
        let mut c = Coordinator::unstarted(dir);
        c.spawn();
        c
    }

    fn unstarted(dir: tempfile::TempDir) -> Coordinator {
        Coordinator {
            dir,
            info: Value::Null,
            child: None,
            http_port: 0,
            quic_port: 0,
            ssh_port: 0,
            https_port: 0,
            extra_args: Vec::new(),
            lost_log: false,
            extra_env: Vec::new(),
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        let info_path = self.data_dir().join("coordinator.json");
        let _ = std::fs::remove_file(&info_path);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir().join("coordinator.log"))
            .expect("coordinator log");
        let mut serve = Command::new(bin("tether"));
        serve
            .arg("serve")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-http")
            .arg(format!("127.0.0.1:{}", self.http_port))
            .arg("--listen-quic")
            .arg(format!("127.0.0.1:{}", self.quic_port))
            .arg("--listen-ssh")
            .arg(format!("127.0.0.1:{}", self.ssh_port))
            .arg("--listen-https")
            .arg(format!("127.0.0.1:{}", self.https_port))
            .args(&self.extra_args)
            .env("TETHER_LOG", "info,tether_coordinator=debug")
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if self.lost_log {
            serve.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = serve.spawn().expect("spawn tether serve");
        // Dropped: the pipes' read ends close.
        drop((child.stdout.take(), child.stderr.take()));
        self.child = Some(child);
        let child = self.child.as_mut().expect("child");
        wait_until("coordinator.json", Duration::from_secs(60), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("tether serve exited early with {status}");
            }
            info_path.exists()
        });
        self.info = serde_json::from_slice(&std::fs::read(&info_path).expect("read info")).expect("parse info");
        let port = |k: &str| self.info[k].as_str().and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse().ok());
        self.http_port = port("http_addr").expect("http port");
        self.quic_port = port("quic_addr").expect("quic port");
        self.ssh_port = port("ssh_addr").expect("ssh port");
        self.https_port = port("https_addr").expect("https port");
    }

    /// The address agents dial.
    pub fn agent_addr(&self) -> String {
        self.info["agent_coordinator"].as_str().expect("agent_coordinator").to_string()
    }

    /// The SSH front door, `127.0.0.1:PORT`.
    pub fn ssh_addr(&self) -> String {
        self.info["ssh_addr"].as_str().expect("ssh_addr").to_string()
    }

    /// The HTTP API's base URL.
    pub fn api_url(&self) -> String {
        self.info["api_url"].as_str().expect("api_url").to_string()
    }

    /// The HTTPS listener's base URL, `https://127.0.0.1:PORT`.
    pub fn https_url(&self) -> String {
        self.info["https_url"].as_str().expect("https_url").to_string()
    }

    pub fn ca_path(&self) -> PathBuf {
        PathBuf::from(self.info["ca_cert"].as_str().expect("ca_cert"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no goodbye to anyone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
        c.wait().expect("wait")
    }

    /// Starts a stopped (killed or terminated) coordinator again on the same ports and data
    /// directory.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the coordinator is still running");
        self.spawn();
    }

    /// Starts again on the same ports and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts again with a new tunnel port: running agents keep dialling the old one and are lost.
    pub fn restart_on_another_tunnel_port(&mut self) {
        self.kill();
        self.quic_port = 0;
        self.spawn();
    }

    /// `tether ARGS` against this coordinator, to run as the caller likes.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("tether"));
        c.arg("--data-dir").arg(self.data_dir()).args(args).env_remove("TETHER_URL").env_remove("TETHER_TOKEN");
        c
    }

    /// Runs `tether ARGS` against this coordinator.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args).output().expect("run tether")
    }

    /// Runs the CLI and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "tether {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Runs the CLI and expects failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(!out.status.success(), "tether {args:?} should have failed: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("tether {args:?} gave no JSON ({e}): {out}"))
    }

    /// Creates a workspace from template text.
    pub fn create(&self, name: &str, template: &str, extra: &[&str]) -> Value {
        let path = self.data_dir().join(format!("{name}.toml"));
        std::fs::write(&path, template).expect("write template");
        let mut args = vec!["workspace", "create", name, "--template", path.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        self.json(&args)
    }

    /// Waits (server-side, on status-change events) for one of `statuses`.
    pub fn wait_for(&self, name: &str, statuses: &str, timeout: Duration) -> Value {
        let t = format!("{}s", timeout.as_secs());
        let out = self.cli(&["workspace", "wait", name, "--for", statuses, "--timeout", &t, "--json"]);
        if !out.status.success() {
            let show = self.cli(&["workspace", "show", name]);
            panic!(
                "workspace {name} did not reach {statuses}: {}\n{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&show.stdout),
                self.log_tail()
            );
        }
        serde_json::from_slice(&out.stdout).expect("wait json")
    }

    pub fn show(&self, name: &str) -> Value {
        self.json(&["workspace", "show", name])
    }

    pub fn timings(&self, name: &str) -> Vec<Value> {
        self.json(&["workspace", "timings", name]).as_array().expect("spans").clone()
    }

    /// All log lines of a workspace, as `(source, line)`.
    pub fn logs(&self, name: &str) -> Vec<(String, String)> {
        let out = self.ok(&["workspace", "logs", name, "--json"]);
        out.lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).expect("log json");
                (v["source"].as_str().unwrap_or("").to_string(), v["line"].as_str().unwrap_or("").to_string())
            })
            .collect()
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.data_dir().join("coordinator.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!("--- coordinator log (last lines) ---\n{}", lines[lines.len().saturating_sub(40)..].join("\n"))
    }
}

impl Drop for Coordinator {
    /// Kills the coordinator and the agents its `process` provisioner started. Those run in their
    /// own process groups so that they outlive a coordinator restart, which a test's end is not:
    /// left alone, they would dial a dead port for the rest of the test run.
    fn drop(&mut self) {
        self.kill();
        let Ok(workspaces) = std::fs::read_dir(self.data_dir().join("workspaces")) else { return };
        for ws in workspaces.flatten() {
            let Ok(text) = std::fs::read_to_string(ws.path().join("agent.pid")) else { continue };
            let Ok(pid) = text.trim().parse::<i32>() else { continue };
            // Only a live tether-agent of this data directory: the pid may have been reused.
            let ours = std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                let want = format!("TETHER_AGENT_DATA_DIR={}/", ws.path().display());
                env.split(|b| *b == 0).any(|kv| kv.starts_with(want.as_bytes()))
            });
            if pid > 1 && ours {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            // And the scripts they were running, in process groups of their own.
            tether_shared::leftovers::end_all(&ws.path().join("agent").join(tether_shared::leftovers::DIR));
        }
    }
}

/// A `tether-agent` process started by the test, as an image's init would.
pub struct Agent {
    pub child: Child,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(coord: &Coordinator, token: &str, data_dir: &Path) -> Agent {
        Agent::start_under(coord, token, data_dir, &[])
    }

    /// Starts the agent through `launcher` (a program and its first arguments, given the agent's
    /// path as the next one), as an image's init script or `nohup` would.
    pub fn start_under(coord: &Coordinator, token: &str, data_dir: &Path, launcher: &[&str]) -> Agent {
        let log = data_dir.with_extension("log");
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("agent log");
        let child = Agent::command(coord, token, data_dir, launcher)
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .expect("spawn tether-agent");
        Agent { child, data_dir: data_dir.to_path_buf(), log }
    }

    /// The command [`Agent::start_under`] runs, with debug logging, its output not yet directed.
    pub fn command(coord: &Coordinator, token: &str, data_dir: &Path, launcher: &[&str]) -> Command {
        std::fs::create_dir_all(data_dir).expect("agent dir");
        let mut command = match launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("tether-agent"));
                c
            }
            None => Command::new(bin("tether-agent")),
        };
        command
            .env("TETHER_COORDINATOR", coord.agent_addr())
            .env("TETHER_CA", coord.ca_path())
            .env("TETHER_AGENT_TOKEN", token)
            .env("TETHER_AGENT_DATA_DIR", data_dir)
            .env("TETHER_LOG", "debug")
            .current_dir(data_dir)
            .stdin(Stdio::null());
        command
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.child.wait().expect("wait agent")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates an external workspace and starts its agent; returns the agent.
pub fn external(coord: &Coordinator, name: &str, template: &str) -> Agent {
    let created = coord.create(name, template, &[]);
    let token = created["agent_token"].as_str().expect("agent_token").to_string();
    Agent::start(coord, &token, &coord.data_dir().join(format!("agent-{name}")))
}

pub mod ssh;

/// A TCP connection to `addr` from `local` (any address of 127.0.0.0/8, all on Linux's loopback),
/// so a test can come from more than one address.
pub fn tcp_connect_from(local: &str, addr: &str) -> std::io::Result<std::net::TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(format!("{local}:0").parse().map_err(std::io::Error::other)?)?;
        let stream = socket.connect(addr.parse().map_err(std::io::Error::other)?).await?;
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        Ok(stream)
    })
}

pub fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

pub fn span<'a>(spans: &'a [Value], stage: &str, name: &str) -> &'a Value {
    spans.iter().find(|s| s["stage"] == stage && s["name"] == name).unwrap_or_else(|| {
        panic!("no span {stage}/{name} in {}", serde_json::to_string_pretty(spans).unwrap_or_default())
    })
}

/// `GET path` on `addr` (`HOST:PORT`) over plain HTTP, as Prometheus scrapes: the status code and
/// the body.
pub fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, body.to_string()))
}
