//! The agent's SSH server against the real OpenSSH client (`ssh`, `sftp`, `ssh-agent`).
//!
//! Most tests run the `tether-agent` binary with `--ssh-listen 127.0.0.1:0` (the address comes from
//! its JSON log) while it keeps retrying a coordinator that is not there; the agent's host and the
//! client's host are the same machine, so "inside the workspace" is this machine too. Two tests run
//! the server in-process: one with a host certificate, one on a brokered QUIC stream the way the
//! coordinator opens it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::process::{Child, Command};
use tokio::time::timeout;

const DEADLINE: Duration = Duration::from_secs(60);
const NO_CA: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn keygen(path: &Path) {
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "tether-test", "-f"])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

/// A running `tether-agent` with `--ssh-listen`.
struct AgentProcess {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl AgentProcess {
    async fn start(data: &Path, home: &Path, authorized: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tether-agent"))
            .args(["--coordinator", "127.0.0.1:1", "--ca-sha256", NO_CA, "--log-format", "json"])
            .arg("--data-dir")
            .arg(data)
            .args(["--ssh-listen", "127.0.0.1:0", "--ssh-authorized-keys"])
            .arg(authorized)
            .env("TETHER_AGENT_TOKEN", "test-token")
            .env("HOME", home)
            .env("TETHER_LOG", "info,tether_agent::ssh=debug")
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log2 = log.clone();
        tokio::spawn(async move {
            let mut addr_tx = Some(addr_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["fields"]["message"] == "ssh server listening" {
                        if let (Some(tx), Some(addr)) = (addr_tx.take(), v["fields"]["addr"].as_str()) {
                            let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                        }
                    }
                }
                log2.lock().unwrap().push(line);
            }
        });
        let addr = match timeout(DEADLINE, addr_rx).await {
            Ok(Ok(addr)) => addr,
            _ => panic!("the agent did not start its ssh listener: {:#?}", log.lock().unwrap()),
        };
        AgentProcess { child, addr, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

/// An agent, a client key it accepts, and a scratch directory.
struct Fixture {
    dir: tempfile::TempDir,
    key: PathBuf,
    agent: AgentProcess,
}

impl Fixture {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("id_ed25519");
        keygen(&key);
        std::fs::create_dir(dir.path().join("home")).unwrap();
        let agent =
            AgentProcess::start(&dir.path().join("data"), &dir.path().join("home"), &key.with_extension("pub")).await;
        Fixture { dir, key, agent }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Options every client command shares (ssh and sftp spell the port differently).
    fn options(&self, key: &Path) -> Vec<String> {
        let mut o = vec!["-F".into(), "/dev/null".into(), "-i".into(), key.display().to_string()];
        for opt in [
            "IdentitiesOnly=yes".to_string(),
            format!("UserKnownHostsFile={}", self.path("known_hosts").display()),
            "StrictHostKeyChecking=no".into(),
            "BatchMode=yes".into(),
            "LogLevel=ERROR".into(),
            "ConnectTimeout=30".into(),
        ] {
            o.push("-o".into());
            o.push(opt);
        }
        o
    }

    /// `ssh [extra] dev@agent [remote]`.
    fn ssh(&self, extra: &[&str], remote: &[&str]) -> Command {
        self.ssh_with_key(&self.key, extra, remote)
    }

    fn ssh_with_key(&self, key: &Path, extra: &[&str], remote: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        // ssh keeps the first value it sees for an option: `extra` goes first so it can override.
        c.args(extra)
            .args(self.options(key))
            .args(["-p", &self.agent.addr.port().to_string()])
            .arg("dev@127.0.0.1")
            .args(remote)
            .env("HOME", self.dir.path())
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    async fn output(&self, mut cmd: Command) -> Output {
        let out = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).output();
        match timeout(DEADLINE, out).await {
            Ok(out) => out.unwrap(),
            Err(_) => panic!("client timed out; agent log:\n{}", self.agent.log()),
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn exec_returns_output_and_exit_status() {
    let f = Fixture::new().await;
    let out = f.output(f.ssh(&[], &["echo out; echo err >&2; exit 7"])).await;
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    // The session's environment and working directory.
    let out = f.output(f.ssh(&[], &["echo $HOME:$USER:${SSH_CONNECTION%% *}:${SSH_TTY-none}:$PWD"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let home = f.path("home").display().to_string();
    let user = text(&std::process::Command::new("id").arg("-un").output().unwrap().stdout).trim().to_string();
    assert_eq!(text(&out.stdout), format!("{home}:{user}:127.0.0.1:none:{home}\n"));
}

#[tokio::test]
async fn a_command_killed_by_a_signal_reports_exit_signal() {
    let f = Fixture::new().await;
    // OpenSSH's client exits with 255 when the remote command dies of a signal; with -v it logs the
    // exit-signal request it received.
    let out = f.output(f.ssh(&["-v"], &["kill -TERM $$"])).await;
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("rtype exit-signal"), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("rtype exit-status"), "{}", text(&out.stderr));
}

#[tokio::test]
async fn stdin_round_trips_byte_for_byte() {
    let f = Fixture::new().await;
    // 8 MiB through `cat` and back: more than the channel windows in both directions at once.
    let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let mut child =
        f.ssh(&[], &["cat"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = data.clone();
    let writer = tokio::spawn(async move {
        stdin.write_all(&input).await.unwrap();
        // Dropping stdin sends EOF, so the remote cat ends.
    });
    let out = timeout(DEADLINE, child.wait_with_output()).await.expect("cat round trip timed out").unwrap();
    writer.await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "the bytes differ");

    // Upload only: the remote side sees every byte and end of file.
    let mut child =
        f.ssh(&[], &["wc -c"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = tokio::spawn(async move { stdin.write_all(&data).await.unwrap() });
    let out = timeout(DEADLINE, child.wait_with_output()).await.unwrap().unwrap();
    writer.await.unwrap();
    assert_eq!(text(&out.stdout).trim(), (8 * 1024 * 1024).to_string());
}

#[tokio::test]
async fn a_client_that_stops_reading_stalls_the_command_not_the_agents_memory() {
    let f = Fixture::new().await;
    // The command writes 1 MiB at a time and records how many it wrote; the client reads nothing.
    let progress = f.path("progress");
    let remote = format!(
        "for i in $(seq 1 256); do head -c 1048576 /dev/zero; echo $i > {}; done",
        shell_quote(&progress.display().to_string())
    );
    let mut child = f.ssh(&[], &[&remote]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let read = || std::fs::read_to_string(&progress).ok().and_then(|s| s.trim().parse::<u32>().ok()).unwrap_or(0);
    // Wait until the writer is stuck: no progress for a second.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let (mut last, mut since) = (read(), tokio::time::Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = read();
        if now != last {
            (last, since) = (now, tokio::time::Instant::now());
        } else if since.elapsed() >= Duration::from_secs(1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the writer never stalled (at {now} MiB)");
    }
    // What is in flight: the client's window, socket buffers, pipes and the agent's bounded copies.
    assert!(last < 16, "the command wrote {last} MiB to a client that reads nothing");
    let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", f.agent.child.id().unwrap()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap()))
        .unwrap();
    assert!(rss_kib < 128 * 1024, "the agent holds {rss_kib} KiB");
    // Reading again lets everything through.
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = timeout(DEADLINE, stdout.read(&mut buf)).await.unwrap().unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert_eq!(total, 256 << 20);
    assert!(timeout(DEADLINE, child.wait()).await.unwrap().unwrap().success());
}

#[tokio::test]
async fn pty_sessions_get_a_terminal_of_the_clients_size() {
    let f = Fixture::new().await;
    // `script` gives ssh a terminal of a known size, which ssh sends in its pty request.
    let ssh = f.ssh(&["-tt"], &["tty; stty size; echo $TERM:$SSH_TTY; exit 3"]);
    let cmdline = format!(
        "stty rows 33 cols 101; TERM=xterm-256color {}",
        std::iter::once("ssh".to_string())
            .chain(ssh.as_std().get_args().map(|a| shell_quote(&a.to_string_lossy())))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &cmdline, "/dev/null"])
        .env("HOME", f.dir.path())
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null());
    let out = f.output(cmd).await;
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout} {}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().map(|l| l.trim_end_matches('\r')).filter(|l| !l.is_empty()).collect();
    // `script` may echo a stray control character before a line.
    let tty = lines
        .iter()
        .find_map(|l| l.find("/dev/pts/").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no tty in {stdout:?}"));
    // (Or before any line: `^@`, the terminal's echo of a NUL, as `script` may send one.)
    assert!(lines.iter().any(|l| l.ends_with("33 101")), "{stdout:?}");
    let term = format!("xterm-256color:{tty}");
    assert!(lines.iter().any(|l| l.ends_with(term.as_str())), "{stdout:?}");
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[tokio::test]
async fn a_window_change_reaches_the_pty() {
    let f = Fixture::new().await;
    // ssh in tmux: resizing the tmux window makes ssh send a window-change.
    let sock = f.path("tmux.sock");
    let out_file = f.path("sizes");
    let ssh = f.ssh(&["-tt"], &["trap 'stty size' WINCH; stty size; while :; do sleep 0.1; done"]);
    let ssh_cmd = std::iter::once("ssh".to_string())
        .chain(ssh.as_std().get_args().map(|a| shell_quote(&a.to_string_lossy())))
        .collect::<Vec<_>>()
        .join(" ");
    let tmux = |args: &[&str]| {
        let mut c = std::process::Command::new("tmux");
        c.arg("-S").arg(&sock).args(args).env("HOME", f.dir.path()).env_remove("SSH_AUTH_SOCK").env_remove("TMUX");
        c
    };
    let cmd = format!("{ssh_cmd} > {}", shell_quote(&out_file.display().to_string()));
    let status = tmux(&["-f", "/dev/null", "new-session", "-d", "-x", "90", "-y", "20", &cmd]).status().unwrap();
    assert!(status.success());
    let wait_for = |want: &'static str| {
        let out_file = out_file.clone();
        async move {
            let deadline = tokio::time::Instant::now() + DEADLINE;
            loop {
                let got = std::fs::read_to_string(&out_file).unwrap_or_default();
                if got.lines().any(|l| l.trim_end_matches('\r') == want) {
                    return;
                }
                assert!(tokio::time::Instant::now() < deadline, "no {want:?} in {got:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for("20 90").await;
    let status = tmux(&["resize-window", "-x", "132", "-y", "41"]).status().unwrap();
    assert!(status.success());
    wait_for("41 132").await;
    let _ = tmux(&["kill-server"]).status();
}

#[tokio::test]
async fn env_accepts_lang_and_lc_only() {
    let f = Fixture::new().await;
    let mut cmd = f.ssh(
        &["-o", "SendEnv=LANG LC_ALL FOO", "-o", "SetEnv=LC_TIME=C BAR=x"],
        &["echo \"$LANG|$LC_ALL|$LC_TIME|${FOO-unset}|${BAR-unset}\""],
    );
    cmd.env("LANG", "fr_FR.UTF-8").env("LC_ALL", "C.UTF-8").env("FOO", "secret");
    let out = f.output(cmd).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "fr_FR.UTF-8|C.UTF-8|C|unset|unset\n");
}

#[tokio::test]
async fn sftp_batch_lists_puts_gets_renames_and_removes() {
    let f = Fixture::new().await;
    let local = f.path("local.bin");
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&local, &data).unwrap();
    let back = f.path("back.bin");
    let remote_dir = f.path("remote");
    let batch = f.path("batch");
    std::fs::write(
        &batch,
        format!(
            "mkdir {r}\nput {l} {r}/a\nls -1 {r}\nrename {r}/a {r}/b\nget {r}/b {b}\nrm {r}/b\nrmdir {r}\n",
            r = remote_dir.display(),
            l = local.display(),
            b = back.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("sftp");
    cmd.args(f.options(&f.key))
        .args(["-P", &f.agent.addr.port().to_string(), "-b"])
        .arg(&batch)
        .arg("dev@127.0.0.1")
        .env("HOME", f.dir.path())
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null());
    let out = f.output(cmd).await;
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("{}/a", remote_dir.display())), "{}", text(&out.stdout));
    assert!(std::fs::read(&back).unwrap() == data, "the downloaded file differs");
    assert!(!remote_dir.exists());
}

/// A TCP server that greets each connection, then echoes what it reads.
async fn greeter(greeting: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                s.write_all(greeting.as_bytes()).await?;
                let (mut r, mut w) = s.split();
                tokio::io::copy(&mut r, &mut w).await?;
                w.shutdown().await
            });
        }
    });
    addr
}

/// Connects to `addr` until it answers, then checks the greeting and an echo.
async fn expect_greeting<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, greeting: &str) {
    let mut got = vec![0u8; greeting.len()];
    timeout(DEADLINE, s.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(text(&got), greeting);
    s.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    timeout(DEADLINE, s.read_exact(&mut echo)).await.unwrap().unwrap();
    assert_eq!(&echo, b"ping");
}

async fn connect_until_up(addr: SocketAddr) -> tokio::net::TcpStream {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "{addr} never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn unix_connect_until_up(path: &Path) -> tokio::net::UnixStream {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(s) = tokio::net::UnixStream::connect(path).await {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "{} never answered", path.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn local_forwarding_reaches_a_server_in_the_workspace() {
    let f = Fixture::new().await;
    let server = greeter("hello from the workspace\n").await;

    // ssh -W: a direct-tcpip channel on ssh's stdin and stdout.
    let mut child =
        f.ssh(&["-W", &server.to_string()], &[]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let stdio = tokio::io::join(child.stdout.take().unwrap(), child.stdin.take().unwrap());
    expect_greeting(stdio, "hello from the workspace\n").await;
    drop(child);

    // ssh -L.
    let port = free_port();
    let forward = format!("127.0.0.1:{port}:{server}");
    let _child = f.ssh(&["-N", "-o", "ExitOnForwardFailure=yes", "-L", &forward], &[]).spawn().unwrap();
    expect_greeting(connect_until_up(([127, 0, 0, 1], port).into()).await, "hello from the workspace\n").await;

    // A port nobody listens on is refused, and ssh -W says so.
    let dead = free_port();
    let out = f.output(f.ssh(&["-W", &format!("127.0.0.1:{dead}")], &[])).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stderr).contains("stdio forwarding failed"), "{}", text(&out.stderr));
}

#[tokio::test]
async fn remote_forwarding_reaches_a_server_on_the_client_side() {
    let f = Fixture::new().await;
    let server = greeter("hello from the client side\n").await;
    // Port 0: the agent picks one and ssh prints it.
    let forward = format!("0:{server}");
    let mut child = f
        .ssh(&["-N", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=INFO", "-R", &forward], &[])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let port: u16 = timeout(DEADLINE, async {
        loop {
            let line = lines.next_line().await.unwrap().expect("ssh ended without allocating a port");
            if let Some(rest) = line.strip_prefix("Allocated port ") {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
    })
    .await
    .unwrap();
    // The listener is inside the workspace, which is this machine.
    expect_greeting(connect_until_up(([127, 0, 0, 1], port).into()).await, "hello from the client side\n").await;
    // A second connection through the same forward.
    expect_greeting(connect_until_up(([127, 0, 0, 1], port).into()).await, "hello from the client side\n").await;
    drop(child);
}

#[tokio::test]
async fn unix_socket_forwarding_both_ways() {
    let f = Fixture::new().await;
    // A Unix server in "the workspace", reached with -L local.sock:remote.sock.
    let remote_sock = f.path("remote.sock");
    let listener = UnixListener::bind(&remote_sock).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                s.write_all(b"unix hello\n").await?;
                let (mut r, mut w) = s.split();
                tokio::io::copy(&mut r, &mut w).await
            });
        }
    });
    let local_sock = f.path("local.sock");
    let forward = format!("{}:{}", local_sock.display(), remote_sock.display());
    let _l = f.ssh(&["-N", "-o", "ExitOnForwardFailure=yes", "-L", &forward], &[]).spawn().unwrap();
    expect_greeting(unix_connect_until_up(&local_sock).await, "unix hello\n").await;

    // -R listen.sock:host:port: the agent listens on a Unix socket and leads back to the client.
    let server = greeter("tcp behind a unix socket\n").await;
    let listen_sock = f.path("listen.sock");
    let forward = format!("{}:{server}", listen_sock.display());
    let _r = f.ssh(&["-N", "-o", "ExitOnForwardFailure=yes", "-R", &forward], &[]).spawn().unwrap();
    expect_greeting(unix_connect_until_up(&listen_sock).await, "tcp behind a unix socket\n").await;
}

#[tokio::test]
async fn agent_forwarding_lists_the_clients_keys() {
    let f = Fixture::new().await;
    let sock = f.path("agent.sock");
    let mut agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let _ = unix_connect_until_up(&sock).await;
    let status =
        Command::new("ssh-add").arg(&f.key).env("SSH_AUTH_SOCK", &sock).stderr(Stdio::null()).status().await.unwrap();
    assert!(status.success());
    let fp = std::process::Command::new("ssh-keygen").arg("-lf").arg(f.key.with_extension("pub")).output().unwrap();
    let fp = text(&fp.stdout).split_whitespace().nth(1).unwrap().to_string();

    let mut cmd = f.ssh(&["-A"], &["ssh-add -l; echo sock=$SSH_AUTH_SOCK"]);
    cmd.env("SSH_AUTH_SOCK", &sock);
    let out = f.output(cmd).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains(&fp), "{stdout}");
    let remote_sock = stdout.lines().find_map(|l| l.strip_prefix("sock=")).unwrap().to_string();
    assert!(!remote_sock.is_empty() && remote_sock != sock.display().to_string(), "{stdout}");
    // The socket goes away with the connection.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while Path::new(&remote_sock).exists() {
        assert!(tokio::time::Instant::now() < deadline, "{remote_sock} is still there");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Without -A there is no agent in the session.
    let mut cmd = f.ssh(&[], &["ssh-add -l; echo status=$?"]);
    cmd.env("SSH_AUTH_SOCK", &sock);
    let out = f.output(cmd).await;
    assert!(text(&out.stdout).contains("status=2"), "{}", text(&out.stdout));
    agent.kill().await.unwrap();
}

#[tokio::test]
async fn a_key_not_authorized_is_refused() {
    let f = Fixture::new().await;
    let other = f.path("other_key");
    keygen(&other);
    let out = f.output(f.ssh_with_key(&other, &[], &["true"])).await;
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stderr).contains("Permission denied (publickey)"), "{}", text(&out.stderr));
}

#[tokio::test]
async fn the_host_key_survives_a_restart() {
    let mut f = Fixture::new().await;
    let out = f.output(f.ssh(&[], &["true"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    f.agent.child.kill().await.unwrap();
    f.agent = AgentProcess::start(&f.path("data"), &f.path("home"), &f.key.with_extension("pub")).await;
    // The known_hosts entry is for 127.0.0.1 on the old port: copy it to the new one.
    let known = std::fs::read_to_string(f.path("known_hosts")).unwrap();
    let key = known.lines().next().unwrap().split_once(' ').unwrap().1.to_string();
    std::fs::write(f.path("known_hosts"), format!("[127.0.0.1]:{} {key}\n", f.agent.addr.port())).unwrap();
    let out = f.output(f.ssh(&["-o", "StrictHostKeyChecking=yes"], &["true"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
}

mod common;

/// The coordinator's half of the tunnel, in-process: a QUIC server the "agent" connection dials, and
/// a local TCP port whose connections become brokered SSH streams on it.
mod brokered {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tether_agent::ssh::{Account, SshServer};
    use tether_agent::tunnel::FetchedManifest;
    use tether_shared::proto::{Manifest, SshSettings, SshStreamOpen, StreamOpen};
    use tether_shared::tls::{self, CaPin};

    /// Two ends of one tunnel connection.
    pub async fn tunnel() -> (quinn::Connection, quinn::Connection) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let pki = crate::common::pki();
        let chain = pki.chain;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key));
        let server =
            quinn::Endpoint::server(tls::server_config(chain, key, 16).unwrap(), "127.0.0.1:0".parse().unwrap())
                .unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let config = tls::client_config(CaPin::Certificate(pki.ca)).unwrap();
        let connecting = client.connect_with(config, server.local_addr().unwrap(), tls::SERVER_NAME).unwrap();
        let (agent, coordinator) = tokio::join!(connecting, async { server.accept().await.unwrap().await });
        (agent.unwrap(), coordinator.unwrap())
    }

    /// Serves a TCP port whose connections are brokered to the agent with `open` as the header.
    pub async fn front_door(coordinator: quinn::Connection, open: SshStreamOpen) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let (mut send, recv) = coordinator.open_bi().await.unwrap();
                tether_shared::io::write_msg(&mut send, &StreamOpen::Ssh(open.clone())).await.unwrap();
                tokio::spawn(async move {
                    let mut stream = tokio::io::join(recv, send);
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut stream).await;
                });
            }
        });
        addr
    }

    pub fn manifest(home: &Path) -> FetchedManifest {
        std::fs::create_dir_all(home.join("proj")).unwrap();
        let now = tokio::time::Instant::now();
        FetchedManifest {
            manifest: Arc::new(Manifest {
                workspace: "ws".into(),
                build: 1,
                scripts: Vec::new(),
                env: vec![("FROM_TEMPLATE".into(), "yes".into())],
                working_dir: Some("proj".into()),
                shutdown_timeout_ms: 0,
                ssh: SshSettings {
                    motd: Some("Welcome to ws\nhave fun".into()),
                    allowed_env: vec!["EDITOR".into(), "GIT_*".into()],
                },
            }),
            first_welcome: now,
            fetch_started: now,
            fetch_ended: now,
        }
    }

    pub fn server(dir: &Path) -> (Arc<SshServer>, tokio::sync::watch::Sender<Option<FetchedManifest>>) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        let home = dir.join("home");
        std::fs::create_dir_all(&home).unwrap();
        let account = Account { name: "dev".into(), home, shell: "/bin/bash".into() };
        let (_, notice) = tokio::sync::watch::channel(None);
        let (_, gate) = tokio::sync::watch::channel(tether_agent::ssh::LoginGate::Open);
        (SshServer::new(&dir.join("data"), rx, notice, gate, account).unwrap(), tx)
    }
}

fn fingerprint_of(pubkey: &Path) -> String {
    let out = std::process::Command::new("ssh-keygen").arg("-lf").arg(pubkey).output().unwrap();
    text(&out.stdout).split_whitespace().nth(1).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokered_streams_with_a_host_certificate_and_the_manifests_settings() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id_ed25519");
    keygen(&key);
    let (server, manifests) = brokered::server(dir.path());
    manifests.send_replace(Some(brokered::manifest(&dir.path().join("home"))));

    // The coordinator's SSH CA signs the agent's host key for the workspace's names.
    let ca = dir.path().join("ca");
    keygen(&ca);
    let host_pub = dir.path().join("host.pub");
    std::fs::write(&host_pub, format!("{}\n", server.host_public_key())).unwrap();
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(&ca)
        .args(["-I", "ws", "-h", "-n", "ws.tether,ws"])
        .arg(&host_pub)
        .status()
        .unwrap();
    assert!(status.success());
    let cert = std::fs::read_to_string(dir.path().join("host-cert.pub")).unwrap();
    server.set_host_certificate(Some(&cert));
    let ca_pub = std::fs::read_to_string(ca.with_extension("pub")).unwrap();
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, format!("@cert-authority *.tether {ca_pub}")).unwrap();

    let (agent_conn, coordinator_conn) = brokered::tunnel().await;
    let _accepting = server.accept_brokered(agent_conn);
    // A stream with a garbage header is closed alone.
    let (mut send, mut recv) = coordinator_conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
    let reset = timeout(DEADLINE, recv.read_to_end(1024)).await.unwrap();
    assert!(reset.is_err(), "{reset:?}");

    let open = tether_shared::proto::SshStreamOpen {
        connection_id: 42,
        user: "alice".into(),
        key_fingerprints: vec![fingerprint_of(&key.with_extension("pub"))],
        peer: "203.0.113.7:5555".into(),
    };
    let door = brokered::front_door(coordinator_conn, open).await;
    let ssh = |key: &Path, extra: &[&str], remote: &[&str]| {
        let mut c = Command::new("ssh");
        c.args(extra)
            .args(["-F", "/dev/null", "-i"])
            .arg(key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args(["-o", "HostKeyAlias=ws.tether", "-o", "HostName=127.0.0.1", "-p", &door.port().to_string()])
            .arg("dev@ws.tether")
            .args(remote)
            .env("HOME", dir.path())
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    };

    // Strict host key checking passes on the certificate alone; the template's env, working
    // directory and allowed variables apply; the peer the coordinator named is the client.
    let out = timeout(
        DEADLINE,
        ssh(
            &key,
            &["-o", "SetEnv=EDITOR=vi GIT_X=1 BAR=no"],
            &["echo $FROM_TEMPLATE:$TETHER_WORKSPACE:$PWD:$EDITOR:$GIT_X:${BAR-unset}:${SSH_CONNECTION%% *}"],
        )
        .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let home = dir.path().join("home");
    assert_eq!(text(&out.stdout), format!("yes:ws:{}/proj:vi:1:unset:203.0.113.7\n", home.display()));

    // An interactive shell starts with the MOTD.
    let mut child = ssh(&key, &["-tt"], &[]).stdin(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(b"echo marker-$((6*7)); exit 5\n").await.unwrap();
    let out = timeout(DEADLINE, child.wait_with_output()).await.unwrap().unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(5), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.starts_with("Welcome to ws\r\nhave fun\r\n"), "{stdout:?}");
    assert!(stdout.contains("marker-42"), "{stdout:?}");

    // A key the coordinator did not name is refused, even though the stream is brokered.
    let other = dir.path().join("other");
    keygen(&other);
    let out = timeout(DEADLINE, ssh(&other, &[], &["true"]).output()).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stderr).contains("Permission denied (publickey)"), "{}", text(&out.stderr));

    // Activity is counted for heartbeats, and connections are let go.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let a = server.activity().snapshot();
        if a.connections == 0 && a.sessions == 0 {
            assert!(a.bytes_in > 0 && a.bytes_out > 0 && a.last_activity_ms > 0, "{a:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{a:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
