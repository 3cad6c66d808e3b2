//! SSH into workspaces with the stock OpenSSH client (`ssh`, `scp`, `sftp`, `rsync`, tmux), through
//! the coordinator's front door (`ProxyJump`, as `tether config-ssh` writes it) and through the API
//! (`tether ssh`), against the real `tether` and `tether-agent` binaries on 127.0.0.1. Every
//! connection checks host keys strictly against the coordinator's SSH CA.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tether_tests::ssh::{keygen, SshUser};
use tether_tests::{wait_until, Agent, Coordinator, LONG};

const TEMPLATE: &str = r#"
heartbeat_timeout = "6s"

[env]
WORKSPACE_GREETING = "hello from the template"

[ssh]
motd = "Welcome to a Tether workspace"
allowed_env = ["TETHER_TEST_*"]
"#;

/// Creates an external workspace owned by `owner` and starts its agent.
fn workspace(coord: &Coordinator, name: &str, owner: &str) -> Agent {
    workspace_under(coord, name, owner, &[])
}

/// As [`workspace`], with the agent started through `launcher` (see [`Agent::start_under`]).
fn workspace_under(coord: &Coordinator, name: &str, owner: &str, launcher: &[&str]) -> Agent {
    let created = coord.create(name, TEMPLATE, &["--owner", owner]);
    let token = created["agent_token"].as_str().expect("agent token").to_string();
    let agent = Agent::start_under(coord, &token, &coord.data_dir().join(format!("agent-{name}")), launcher);
    coord.wait_for(name, "running", LONG);
    agent
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A one-response HTTP server on 127.0.0.1 that answers every connection with `body`.
fn http_server(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = write!(conn, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
    });
    port
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// GET / on a local port, retrying until it answers (a forward being set up) or the deadline.
fn http_get(port: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            if s.write_all(b"GET / HTTP/1.0\r\n\r\n").is_ok() {
                let mut out = String::new();
                if s.read_to_string(&mut out).is_ok() && out.contains("200 OK") {
                    return out;
                }
            }
        }
        assert!(Instant::now() < deadline, "nothing answered on port {port} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An X server, stopped with SIGTERM so that it removes its lock file and socket (a killed one
/// leaves them, and holds its display number on this machine until they are removed).
struct XServer(Child, u32);

impl Drop for XServer {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(format!("/tmp/.X{}-lock", self.1));
        let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{}", self.1));
    }
}

/// Files removed at the end of a test, passed or not.
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn random_file(path: &Path, len: usize, seed: u64) {
    let mut x = seed | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, data).expect("write file");
}

fn same_file(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).expect("read a"), std::fs::read(b).expect("read b"));
    assert!(x == y, "{} and {} differ ({} vs {} bytes)", a.display(), b.display(), x.len(), y.len());
}

/// Every file under `a` is under `b` with the same bytes, and the other way round.
fn same_tree(a: &Path, b: &Path) {
    fn files(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                files(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).expect("prefix").display().to_string());
            }
        }
    }
    let (mut fa, mut fb) = (Vec::new(), Vec::new());
    files(a, a, &mut fa);
    files(b, b, &mut fb);
    fa.sort();
    fb.sort();
    assert_eq!(fa, fb, "trees differ");
    for f in &fa {
        same_file(&a.join(f), &b.join(f));
    }
}

#[test]
fn ssh_exec_pty_files_and_forwarding() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    // Started the way an image's init script might (`nohup tether-agent &` from sh), the agent
    // itself ignores SIGHUP, SIGINT, SIGQUIT and a real-time signal; its sessions must not.
    let _agent = workspace_under(&coord, "dev", "alice", &["sh", "-c", r#"trap '' HUP INT QUIT 40; exec "$0""#]);
    let host = "dev.tether";

    // A command leads its own session, with no controlling terminal, and every signal at its
    // default action, as under sshd.
    let stat = alice.ok(host, "echo $$; cut -d' ' -f6 /proc/$$/stat; grep SigIgn /proc/self/status");
    let lines: Vec<&str> = stat.lines().collect();
    assert_eq!(lines.len(), 3, "{stat}");
    assert_eq!(lines[0], lines[1], "the command's shell leads its own session: {stat}");
    let ignored = u64::from_str_radix(lines[2].split_whitespace().nth(1).unwrap_or("x"), 16).expect("SigIgn mask");
    // (Signals 32 and 33 belong to the C library, which does not let a program change them.)
    assert_eq!(ignored & !(0b11 << 31), 0, "no signal is ignored, real-time ones included: {stat}");

    // exec: output, exit status, stdin, the workspace's environment.
    assert_eq!(alice.ok(host, "echo $WORKSPACE_GREETING").trim(), "hello from the template");
    // A clean session environment, as sshd gives: none of the agent's settings or its shell's
    // bookkeeping (an inherited SHLVL makes bash skip ~/.bashrc), no TERM without a terminal.
    // (bash itself sets TERM=dumb when it finds none, as it does under sshd.)
    let env =
        alice.ok(host, r#"echo "[$TETHER_COORDINATOR] [$TETHER_AGENT_DATA_DIR] [$SSH_ORIGINAL_COMMAND] [$OLDPWD]""#);
    assert_eq!(env.trim(), "[] [] [] []");
    // SSH_CONNECTION: client address and port, then the workspace's address (towards the
    // coordinator, here loopback) and port 22, as `ssh -J` to its sshd would give.
    let conn = alice.ok(host, "echo $SSH_CONNECTION");
    let fields: Vec<&str> = conn.split_whitespace().collect();
    assert_eq!(fields.len(), 4, "{conn}");
    assert_eq!(fields[0], "127.0.0.1", "{conn}");
    assert_eq!(&fields[2..], ["127.0.0.1", "22"], "{conn}");
    let term = alice.ok(host, "echo $TERM");
    assert!(matches!(term.trim(), "" | "dumb"), "TERM {term:?} without a terminal");
    let shlvl = alice.ok(host, "echo $SHLVL");
    assert!(matches!(shlvl.trim(), "" | "1"), "SHLVL {shlvl:?}: a command's shell is the first");
    assert_eq!(alice.run(host, "exit 7").status.code(), Some(7), "remote exit status");
    // A command killed by a signal: the agent reports exit-signal, and OpenSSH's client then exits
    // 255, as it does with sshd.
    let killed = alice.ssh().args(["-v", host, "kill -KILL $$"]).output().unwrap();
    assert_eq!(killed.status.code(), Some(255));
    assert!(text(&killed.stderr).contains("rtype exit-signal"), "{}", text(&killed.stderr));
    let mut child = alice.ssh().arg(host).arg("wc -c").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let payload = vec![b'x'; 3 << 20];
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&payload));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(text(&out.stdout).trim(), (3 << 20).to_string(), "stdin reaches the command whole");

    // Environment: LANG and allowed names pass, others do not.
    let out = alice
        .ssh()
        .args(["-o", "SendEnv=LANG TETHER_TEST_COLOUR NOT_ALLOWED", host])
        .arg("echo \"$LANG|$TETHER_TEST_COLOUR|${NOT_ALLOWED:-unset}\"")
        .env("LANG", "C.UTF-8")
        .env("TETHER_TEST_COLOUR", "teal")
        .env("NOT_ALLOWED", "leaked")
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "C.UTF-8|teal|unset", "{}", text(&out.stderr));

    // An interactive PTY in tmux: the MOTD, a command, a resize the shell sees, and the client
    // terminal's modes (an unusual erase and interrupt character) carried over to the remote pty.
    let sock = alice.dir.join("tmux.sock");
    let tmux = |args: &[&str]| {
        Command::new("tmux").arg("-S").arg(&sock).args(args).env("TERM", "xterm").output().expect("tmux")
    };
    let ssh_cmd = format!("stty erase ^H intr ^G && exec ssh -F {} {host}", alice.config.display());
    let started = tmux(&["new-session", "-d", "-s", "t", "-x", "100", "-y", "30", &ssh_cmd]);
    assert!(started.status.success(), "tmux: {}", text(&started.stderr));
    let pane = || text(&tmux(&["capture-pane", "-p", "-t", "t", "-S", "-200"]).stdout);
    wait_until("the MOTD in the pty", LONG, || pane().contains("Welcome to a Tether workspace"));
    tmux(&["send-keys", "-t", "t", "stty size | sed 's/^/SIZE:/'", "Enter"]);
    wait_until("stty size 30x100", LONG, || pane().lines().any(|l| l.trim() == "SIZE:30 100"));
    tmux(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    tmux(&["send-keys", "-t", "t", "stty size | sed 's/^/SIZE:/'", "Enter"]);
    wait_until("stty size after the resize", LONG, || pane().lines().any(|l| l.trim() == "SIZE:40 120"));
    tmux(&["send-keys", "-t", "t", "stty -a | tr ';' '\\n' | grep -E 'erase|intr' | sed 's/^ */MODE:/'", "Enter"]);
    wait_until("the client's erase and interrupt characters", LONG, || {
        let p = pane();
        p.contains("MODE:erase = ^H") && p.contains("MODE:intr = ^G")
    });
    tmux(&["send-keys", "-t", "t", "tty | sed 's/^/TTY:/'; exit", "Enter"]);
    let _ = tmux(&["kill-server"]);

    // scp both ways, rsync of a tree, an sftp batch: byte-identical.
    let files = alice.dir.join("files");
    std::fs::create_dir_all(files.join("tree/sub")).unwrap();
    let up = files.join("up.bin");
    random_file(&up, 5 << 20, 1);
    let remote = coord.data_dir().join("remote");
    std::fs::create_dir_all(&remote).unwrap();
    let cfg = alice.config.to_str().unwrap().to_string();
    let scp = |from: String, to: String| {
        let out = Command::new("scp").args(["-q", "-F", &cfg, &from, &to]).output().unwrap();
        assert!(out.status.success(), "scp {from} {to}: {}", text(&out.stderr));
    };
    scp(up.display().to_string(), format!("{host}:{}/up.bin", remote.display()));
    same_file(&up, &remote.join("up.bin"));
    let down = files.join("down.bin");
    scp(format!("{host}:{}/up.bin", remote.display()), down.display().to_string());
    same_file(&up, &down);

    for (i, name) in ["a.txt", "sub/b.bin", "sub/c.bin"].iter().enumerate() {
        random_file(&files.join("tree").join(name), 100_000 * (i + 1), i as u64 + 7);
    }
    let out = Command::new("rsync")
        .args(["-a", "-e", &format!("ssh -F {cfg}")])
        .arg(format!("{}/", files.join("tree").display()))
        .arg(format!("{host}:{}/tree/", remote.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "rsync: {}", text(&out.stderr));
    same_tree(&files.join("tree"), &remote.join("tree"));

    let batch = files.join("batch");
    let back = files.join("back.bin");
    let sd = remote.join("sftp");
    std::fs::write(
        &batch,
        format!(
            "mkdir {sd}\nput {up} {sd}/a.bin\nls -l {sd}\nrename {sd}/a.bin {sd}/b.bin\nget {sd}/b.bin {back}\nrm {sd}/b.bin\nrmdir {sd}\n",
            sd = sd.display(),
            up = up.display(),
            back = back.display()
        ),
    )
    .unwrap();
    let out = Command::new("sftp").args(["-F", &cfg, "-b"]).arg(&batch).arg(host).output().unwrap();
    assert!(out.status.success(), "sftp: {}\n{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("a.bin"), "ls -l lists the file: {}", text(&out.stdout));
    same_file(&up, &back);
    assert!(!sd.exists(), "rmdir removed the directory");

    // ssh -L to a server inside the workspace; ssh -R to one outside it.
    let inside = http_server("hello from inside");
    let local = free_port();
    let _forward = Killed(
        alice
            .ssh()
            .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L", &format!("{local}:127.0.0.1:{inside}"), host])
            .spawn()
            .unwrap(),
    );
    assert!(http_get(local, LONG).ends_with("hello from inside"));

    // A forward to a port where nothing listens says why, as sshd does.
    let closed = free_port();
    let out = alice.ssh().args(["-W", &format!("127.0.0.1:{closed}"), host]).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains(&format!(
            "open failed: connect failed: connect to 127.0.0.1:{closed} inside the workspace: connection refused"
        )),
        "{}",
        text(&out.stderr)
    );

    let outside = http_server("hello from outside");
    let rport = free_port();
    let out = alice
        .ssh()
        .args(["-o", "ExitOnForwardFailure=yes", "-R", &format!("{rport}:127.0.0.1:{outside}"), host])
        .arg(format!("for i in $(seq 100); do curl -sf http://127.0.0.1:{rport}/ && exit 0; sleep 0.2; done; exit 1"))
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh -R: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello from outside");

    // VS Code Remote-SSH's pattern: `ssh -T -D PORT host bash` with its install script on stdin;
    // the script prints where its server listens and the editor connects there through the SOCKS
    // proxy (a direct-tcpip channel per connection), while the session stays open.
    let socks = free_port();
    let mut remote = Killed(
        alice
            .ssh()
            .args(["-T", "-o", "ExitOnForwardFailure=yes", "-D", &format!("127.0.0.1:{socks}"), host, "bash"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut script = remote.0.stdin.take().unwrap();
    writeln!(script, "echo \"listeningOn=={inside}==\"; cat >/dev/null; echo bye").unwrap();
    let (line_tx, lines) = std::sync::mpsc::channel();
    let stdout = remote.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    assert_eq!(lines.recv_timeout(LONG).expect("the script's first line"), format!("listeningOn=={inside}=="));
    let socks_url = format!("socks5h://127.0.0.1:{socks}");
    for _ in 0..2 {
        let out = Command::new("curl")
            .args(["-sf", "--max-time", "60", "--noproxy", "", "--proxy", &socks_url])
            .arg(format!("http://127.0.0.1:{inside}/"))
            .output()
            .unwrap();
        assert_eq!(text(&out.stdout), "hello from inside", "through ssh -D: {}", text(&out.stderr));
    }
    drop(script);
    assert_eq!(lines.recv_timeout(LONG).expect("the script's last line"), "bye");
    let mut status = None;
    wait_until("ssh -T -D to end with its session", LONG, || {
        status = remote.0.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success());

    // Agent forwarding: the workspace lists the client's key.
    let agent_sock = alice.dir.join("agent.sock");
    let _ssh_agent =
        Killed(Command::new("ssh-agent").arg("-D").arg("-a").arg(&agent_sock).stdout(Stdio::null()).spawn().unwrap());
    wait_until("ssh-agent socket", LONG, || agent_sock.exists());
    let added = Command::new("ssh-add").arg(&alice.key).env("SSH_AUTH_SOCK", &agent_sock).output().unwrap();
    assert!(added.status.success(), "ssh-add: {}", text(&added.stderr));
    let out = alice.ssh().args(["-A", host, "ssh-add -l"]).env("SSH_AUTH_SOCK", &agent_sock).output().unwrap();
    assert!(out.status.success(), "ssh -A: {}", text(&out.stderr));
    let fp = text(&Command::new("ssh-keygen").arg("-lf").arg(alice.key.with_extension("pub")).output().unwrap().stdout);
    let fp = fp.split_whitespace().nth(1).unwrap().to_string();
    assert!(text(&out.stdout).contains(&fp), "forwarded agent lists {fp}: {}", text(&out.stdout));

    // The audit log has the connections, with bytes; heartbeats report the activity.
    let audit = coord.json(&["audit", "--workspace", "dev"]);
    let rows = audit.as_array().unwrap();
    assert!(rows.len() >= 8, "{audit}");
    assert!(rows.iter().all(|r| r["user"] == "alice" && r["via"] == "ssh"), "{audit}");
    assert!(rows.iter().any(|r| r["outcome"] == "closed" && r["bytes_up"].as_i64().unwrap() > 3 << 20), "{audit}");
    wait_until("ssh activity in a heartbeat", LONG, || {
        let show = coord.show("dev");
        show["agent"]["stats"]["ssh"]["bytes_in"].as_u64().unwrap_or(0) > 3 << 20
    });
}

#[test]
fn refusals_say_why() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let bob = SshUser::add(&coord, "bob");
    let _dev = workspace(&coord, "dev", "alice");
    let stopped = coord.create("idle", TEMPLATE, &["--owner", "alice"]);
    assert_eq!(stopped["status"], "starting");
    let refused = |user: &SshUser, host: &str, want: &str| {
        let out = user.run(host, "true");
        assert_eq!(out.status.code(), Some(255), "ssh {host} as {} should fail", user.name);
        let err = text(&out.stderr);
        assert!(err.contains(want), "ssh {host} as {}: want {want:?} in: {err}", user.name);
    };
    refused(&bob, "dev.tether", "user 'bob' may not access workspace 'dev'");
    refused(&alice, "nosuch.tether", "no workspace 'nosuch'");
    // The external workspace `idle` has no agent yet.
    refused(&alice, "idle.tether", "workspace 'idle' has no connected agent");
    // One created and never started says what to do.
    coord.create("later", "provisioner = \"command\"\n[command]\nstart = \"true\"\n", &["--owner", "alice"]);
    refused(
        &alice,
        "later.tether",
        "workspace 'later' was created and never started; start it with `tether workspace start later`",
    );

    // A key that is not registered gets nowhere, and neither does a registered key under another name.
    let stranger = alice.dir.join("stranger");
    keygen(&stranger, "stranger");
    let mut cfg = std::fs::read_to_string(&alice.config).unwrap();
    cfg = cfg.replace(alice.key.to_str().unwrap(), stranger.to_str().unwrap());
    let stranger_cfg = alice.dir.join("stranger-config");
    std::fs::write(&stranger_cfg, cfg).unwrap();
    let out = Command::new("ssh").arg("-F").arg(&stranger_cfg).args(["dev.tether", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stderr).contains("Permission denied (publickey)"), "{}", text(&out.stderr));
    // The coordinator logs the failed login with the address, the user and the key, as sshd does.
    let stranger_fp =
        text(&Command::new("ssh-keygen").arg("-lf").arg(stranger.with_extension("pub")).output().unwrap().stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string();
    let log = coord.data_dir().join("coordinator.log");
    wait_until("the failed login in the log", LONG, || {
        std::fs::read_to_string(&log).unwrap_or_default().lines().any(|l| {
            l.contains("ssh front door: login failed: no key offered is registered to this user")
                && l.contains("peer=127.0.0.1:")
                && l.contains("user=\"alice\"")
                && l.contains(&stranger_fp)
        })
    });

    // A grant lets bob in; a revoke shuts him out again.
    coord.ok(&["workspace", "grant", "dev", "bob"]);
    let access = coord.json(&["workspace", "access", "dev"]);
    assert_eq!((&access["owner"], &access["granted"]), (&serde_json::json!("alice"), &serde_json::json!(["bob"])));
    assert_eq!(bob.ok("dev.tether", "echo in").trim(), "in");
    coord.ok(&["workspace", "revoke", "dev", "bob"]);
    refused(&bob, "dev.tether", "user 'bob' may not access workspace 'dev'");

    // A stopped workspace.
    coord.ok(&["workspace", "stop", "dev", "--wait"]);
    refused(&alice, "dev.tether", "workspace 'dev' is stopped");

    // Every refusal is in the audit log.
    let audit = coord.json(&["audit"]);
    let outcomes: Vec<String> =
        audit.as_array().unwrap().iter().map(|r| r["outcome"].as_str().unwrap().to_string()).collect();
    for want in ["may not access", "no workspace 'nosuch'", "is stopped"] {
        assert!(outcomes.iter().any(|o| o.starts_with("refused") && o.contains(want)), "{want}: {outcomes:?}");
    }

    // A script retrying a refused connection in a loop is refused every time, with the reason,
    // but past a burst of 20 and then one every 10 s its refusals no longer fill the audit log.
    let bob_rows = || coord.json(&["audit", "--user", "bob", "--limit", "1000"]).as_array().unwrap().len();
    let before = bob_rows();
    let started = Instant::now();
    let tries = 100;
    for _ in 0..tries {
        let reply = upgrade_request(&coord, &bob.token, "dev");
        assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
        assert!(reply.contains("user 'bob' may not access workspace 'dev'"), "{reply}");
    }
    let audited = bob_rows() - before;
    let allowed = 20 + started.elapsed().as_secs() as usize / 10 + 1;
    assert!(audited >= 15 && audited <= allowed.min(tries - 1), "{audited} of {tries} refusals audited");
}

/// Asks the API to carry an SSH connection to `workspace` (what `tether ssh` does) and returns the
/// reply's head and body.
fn upgrade_request(coord: &Coordinator, token: &str, workspace: &str) -> String {
    let addr = coord.api_url().trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    write!(
        s,
        "GET /api/v1/workspaces/{workspace}/ssh HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Connection: upgrade\r\nUpgrade: tether-ssh\r\n\r\n"
    )
    .unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    while !text(&reply).contains("\r\n\r\n") || !text(&reply).trim_end().ends_with('}') {
        match s.read(&mut buf) {
            // A read with a timeout is not restarted after a signal handler runs (signal(7)); one
            // may be installed in this process by another test's library.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
        }
    }
    text(&reply)
}

#[test]
fn a_killed_agent_ends_its_sessions_and_a_rebuilt_one_keeps_trust() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let mut dev = workspace(&coord, "dev", "alice");
    let _other = workspace(&coord, "other", "alice");

    let mut session = long_session(&alice, "dev.tether");
    let mut tether_ssh = alice.tether(&coord);
    tether_ssh.args(["ssh", "dev", "--", "-i", alice.key.to_str().unwrap(), "-o", "BatchMode=yes"]);
    let mut via_api = started(tether_ssh);
    dev.kill();
    // Right after: the coordinator does not know yet (nothing told it; QUIC's idle timeout will),
    // and a new connection is refused with the reason rather than left hanging without one.
    let out = alice.run("dev.tether", "true");
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    let said = text(&out.stderr);
    assert!(
        [
            "workspace 'dev': its agent did not answer within 5s",
            "workspace 'dev': its agent went away",
            "workspace 'dev' has no connected agent"
        ]
        .iter()
        .any(|why| said.contains(&format!("open failed: connect failed: {why}"))),
        "{said}"
    );
    let mut status = None;
    wait_until("the ssh client to end after its agent died", LONG, || {
        status = session.0.try_wait().unwrap();
        status.is_some()
    });
    assert!(!status.unwrap().success(), "the session ended with a failure status");
    let said = session.said();
    assert!(said.contains(": workspace 'dev': the connection to its agent ended"), "{said}");
    wait_until("the tether ssh session to end after its agent died", LONG, || via_api.0.try_wait().unwrap().is_some());
    let said = via_api.said();
    assert!(said.contains("error: workspace 'dev': the connection to its agent ended"), "{said}");
    // The front door keeps serving other workspaces.
    assert_eq!(alice.ok("other.tether", "echo fine").trim(), "fine");

    // A rebuilt workspace: a new agent with a new host key, and strict checking still passes.
    let old_key = std::fs::read(dev.data_dir.join("ssh_host_ed25519_key")).expect("the agent's host key");
    let token = coord.json(&["workspace", "token", "dev"])["agent_token"].as_str().unwrap().to_string();
    let rebuilt = Agent::start(&coord, &token, &coord.data_dir().join("agent-dev-rebuilt"));
    coord.wait_for("dev", "running", LONG);
    let new_key = std::fs::read(rebuilt.data_dir.join("ssh_host_ed25519_key")).expect("the new agent's host key");
    assert_ne!(old_key, new_key, "the rebuilt agent has a new host key");
    assert_eq!(alice.ok("dev.tether", "echo again").trim(), "again");
}

#[test]
fn tether_ssh_goes_through_the_api_port() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _dev = workspace(&coord, "dev", "alice");

    // `tether ssh NAME -- …` runs OpenSSH with `tether ssh --stdio` as its ProxyCommand.
    let out = alice
        .tether(&coord)
        .args(["ssh", "dev", "--", "-i", alice.key.to_str().unwrap(), "-o", "BatchMode=yes", "echo via-api"])
        .output()
        .unwrap();
    assert!(out.status.success(), "tether ssh: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "via-api");
    // And over the HTTPS port.
    let out = alice
        .tether(&coord)
        .env("TETHER_URL", coord.https_url())
        .env("TETHER_CA", coord.data_dir().join("ca.pem"))
        .args(["ssh", "dev", "--", "-i", alice.key.to_str().unwrap(), "-o", "BatchMode=yes", "echo via-https"])
        .output()
        .unwrap();
    assert!(out.status.success(), "tether ssh over https: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "via-https");

    // The admin's `--as` names a user that does not exist: said so, not "may not access".
    let out = Command::new(tether_tests::bin("tether"))
        .arg("--data-dir")
        .arg(coord.data_dir())
        .env("HOME", &alice.dir)
        .args(["ssh", "dev", "--as", "nosuch", "--", "-o", "BatchMode=yes", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("error: no user 'nosuch'"), "{}", text(&out.stderr));

    // A refusal is asked for before OpenSSH runs: its line is all the user reads (no "Connection
    // closed" from ssh after it), the exit status is ssh's own for a failed connection, and the
    // refusal is audited as a connection's would be.
    coord.create("idle", "provisioner = \"process\"\n", &["--owner", "alice"]);
    for (target, want) in [
        ("nosuch", "error: no workspace 'nosuch'\n"),
        (
            "idle",
            "error: workspace 'idle' was created and never started; start it with `tether workspace start idle`\n",
        ),
    ] {
        let out = alice.tether(&coord).args(["ssh", target, "--", "-o", "BatchMode=yes", "true"]).output().unwrap();
        assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
        assert_eq!(text(&out.stderr), want);
    }
    let audit = coord.json(&["audit", "--workspace", "idle"]);
    let rows = audit.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{audit}");
    assert_eq!(rows[0]["via"], "api", "{audit}");
    assert!(rows[0]["outcome"].as_str().unwrap().starts_with("refused: workspace 'idle' was created"), "{audit}");

    // The same as a ProxyCommand in a plain ssh config.
    let known = alice.dir.join("tether_known_hosts");
    let cfg = alice.dir.join("proxycommand-config");
    std::fs::write(
        &cfg,
        format!(
            "Host *.tether\n  ProxyCommand {} ssh --stdio %h\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n  BatchMode yes\n",
            tether_tests::bin("tether").display(),
            alice.key.display(),
            known.display()
        ),
    )
    .unwrap();
    let run = |host: &str| {
        Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .args([host, "echo proxied"])
            .env("TETHER_URL", coord.api_url())
            .env("TETHER_TOKEN", &alice.token)
            .output()
            .unwrap()
    };
    let out = run("dev.tether");
    assert!(out.status.success(), "ProxyCommand: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "proxied");
    let out = run("nosuch.tether");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no workspace 'nosuch'"), "{}", text(&out.stderr));

    // Each ended as it should: closed. OpenSSH ends its ProxyCommand with SIGHUP, which over TLS
    // leaves no close_notify (and may reset the connection): that is how such a client hangs up,
    // not an error.
    let mut audit = serde_json::Value::Null;
    wait_until("the connections' audit records to close", LONG, || {
        audit = coord.json(&["audit", "--workspace", "dev"]);
        audit.as_array().unwrap().iter().all(|r| !r["ended_at"].is_null())
    });
    let api: Vec<_> = audit.as_array().unwrap().iter().filter(|r| r["via"] == "api").collect();
    assert_eq!(api.len(), 3, "{audit}");
    assert!(api.iter().all(|r| r["outcome"] == "closed"), "{audit}");

    // The same token on an admin route: valid, but not for that, and the error says so.
    let out = Command::new(tether_tests::bin("tether"))
        .args(["user", "list"])
        .env("TETHER_URL", coord.api_url())
        .env("TETHER_TOKEN", &alice.token)
        .env_remove("TETHER_DATA_DIR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("this is the API token of user 'alice'"), "{}", text(&out.stderr));
}

#[test]
fn users_stop_and_start_their_own_workspaces_with_their_token_and_nothing_else() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let bob = SshUser::add(&coord, "bob");
    let template = "provisioner = \"process\"\n[[script]]\nname = \"hello\"\nrun = \"echo hello from dev\"\n";
    coord.create("dev", template, &["--owner", "alice", "--start"]);
    coord.create("ops", template, &["--owner", "bob"]);
    coord.wait_for("dev", "running", LONG);
    // As on a laptop: the user's own token and the coordinator's URL, no data directory.
    let run = |user: &SshUser, args: &[&str]| user.tether(&coord).args(args).output().unwrap();
    let ok = |user: &SshUser, args: &[&str]| {
        let out = run(user, args);
        assert!(out.status.success(), "{} as {}: {}", args.join(" "), user.name, text(&out.stderr));
        text(&out.stdout)
    };
    let refused = |user: &SshUser, args: &[&str], want: &str| {
        let out = run(user, args);
        assert!(!out.status.success(), "{} as {} should fail", args.join(" "), user.name);
        assert!(
            text(&out.stderr).contains(want),
            "{} as {}: want {want:?} in {}",
            args.join(" "),
            user.name,
            text(&out.stderr)
        );
    };
    let names = |user: &SshUser| -> Vec<String> {
        let list: serde_json::Value = serde_json::from_str(&ok(user, &["workspace", "list", "--json"])).unwrap();
        list.as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap().to_string()).collect()
    };

    // alice sees her workspace, its logs and timings, and no one else's.
    assert_eq!(names(&alice), ["dev"]);
    assert!(ok(&alice, &["workspace", "logs", "dev"]).contains("hello from dev"));
    assert!(ok(&alice, &["workspace", "timings", "dev"]).contains("hello"));
    // She stops it; SSH then tells her how to start it, which she does herself.
    ok(&alice, &["workspace", "stop", "dev", "--wait"]);
    let out = alice.run("dev.tether", "true");
    assert!(
        text(&out.stderr).contains("workspace 'dev' is stopped; start it with `tether workspace start dev`"),
        "{}",
        text(&out.stderr)
    );
    let started: serde_json::Value =
        serde_json::from_str(&ok(&alice, &["workspace", "start", "dev", "--wait", "--json"])).unwrap();
    assert_eq!(started["status"], "running", "{started}");
    assert_eq!(alice.ok("dev.tether", "echo back").trim(), "back");

    // Someone else's workspace, a missing one, and everything that is the admin's stay out of reach.
    let not_hers = "user 'alice' may not access workspace 'ops'";
    for verb in ["show", "start", "stop", "logs", "timings"] {
        refused(&alice, &["workspace", verb, "ops"], not_hers);
    }
    refused(&alice, &["workspace", "wait", "ops", "--for", "running", "--timeout", "1s"], not_hers);
    refused(&alice, &["workspace", "show", "nosuch"], "no workspace 'nosuch'");
    let admin_only = "this is the API token of user 'alice'";
    refused(&alice, &["workspace", "delete", "dev"], admin_only);
    refused(&alice, &["workspace", "token", "dev"], admin_only);
    refused(&alice, &["workspace", "grant", "dev", "bob"], admin_only);
    refused(&alice, &["audit"], admin_only);
    refused(&alice, &["workspace", "access", "dev"], admin_only);
    refused(&alice, &["workspace", "count"], admin_only);
    refused(&alice, &["user", "list"], admin_only);
    refused(&alice, &["user", "token", "bob"], admin_only);
    refused(&alice, &["admin", "backup", alice.dir.join("b.tar").to_str().unwrap()], admin_only);
    let file = alice.dir.join("t.toml");
    std::fs::write(&file, template).unwrap();
    refused(&alice, &["workspace", "create", "mine", "--template", file.to_str().unwrap()], admin_only);
    assert_eq!(coord.json(&["workspace", "show", "ops"])["status"], "pending");

    // A grant gives bob the same reach over alice's workspace; there is none for a user who does
    // not exist, nor a workspace for them to own.
    let err = coord.fails(&["workspace", "grant", "dev", "zed"]);
    assert!(err.contains("no user 'zed'"), "{err}");
    let err = coord.fails(&["workspace", "create", "zeds", "--template", file.to_str().unwrap(), "--owner", "zed"]);
    assert!(err.contains("no user 'zed'; add it with `tether user add zed --ssh-key FILE`"), "{err}");
    assert_eq!(names(&bob), ["ops"]);
    // The owner has access already: a grant to her is no grant, and her access is not revoked.
    let grants = coord.json(&["workspace", "grant", "dev", "alice"]);
    assert_eq!(grants, serde_json::json!({"workspace": "dev", "owner": "alice", "granted": []}));
    let err = coord.fails(&["workspace", "revoke", "dev", "alice"]);
    assert!(err.contains("user 'alice' owns workspace 'dev' and has no grant on it"), "{err}");
    let grants = coord.json(&["workspace", "grant", "dev", "bob"]);
    assert_eq!(grants["granted"], serde_json::json!(["bob"]), "{grants}");
    let mut both = names(&bob);
    both.sort();
    assert_eq!(both, ["dev", "ops"]);
    ok(&bob, &["workspace", "stop", "dev", "--wait"]);
    assert_eq!(coord.json(&["workspace", "show", "dev"])["status"], "stopped");
    let log = std::fs::read_to_string(coord.data_dir().join("coordinator.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("stop requested by a user") && l.contains("bob")),
        "the coordinator logs who"
    );
    let grants = coord.json(&["workspace", "revoke", "dev", "bob"]);
    assert_eq!(grants["granted"], serde_json::json!([]), "{grants}");
    refused(&bob, &["workspace", "start", "dev"], "user 'bob' may not access workspace 'dev'");
    assert_eq!(names(&bob), ["ops"]);

    // A deleted workspace that was never yours is no workspace at all, and a name that passes to a
    // new owner shows you nothing of theirs.
    coord.ok(&["workspace", "delete", "ops", "--wait"]);
    refused(&alice, &["workspace", "wait", "ops", "--for", "deleted", "--timeout", "1s"], "no workspace 'ops'");
    coord.ok(&["workspace", "delete", "dev", "--wait"]);
    let gone: serde_json::Value =
        serde_json::from_str(&ok(&alice, &["workspace", "wait", "dev", "--for", "deleted", "--json"])).unwrap();
    assert_eq!(gone["status"], "deleted");
    coord.create("dev", template, &["--owner", "bob"]);
    refused(
        &alice,
        &["workspace", "wait", "dev", "--for", "running", "--timeout", "1s"],
        "user 'alice' may not access workspace 'dev'",
    );

    // Removing a user takes their name off what they owned: a later user of that name inherits
    // nothing, over the API or SSH.
    coord.create("lab", template, &["--owner", "alice"]);
    let removed = coord.ok(&["user", "remove", "alice"]);
    assert!(removed.contains("workspaces now without an owner") && removed.contains("lab"), "{removed}");
    assert_eq!(coord.json(&["workspace", "show", "lab"])["owner"], serde_json::Value::Null);
    let public = alice.key.with_extension("pub");
    let again = coord.json(&["user", "add", "alice", "--ssh-key", public.to_str().unwrap()]);
    let new_alice = SshUser { token: again["token"].as_str().unwrap().to_string(), ..alice.clone() };
    assert_eq!(names(&new_alice), Vec::<String>::new());
    refused(&new_alice, &["workspace", "show", "lab"], "user 'alice' may not access workspace 'lab'");
    let out = new_alice.run("lab.tether", "true");
    assert!(text(&out.stderr).contains("user 'alice' may not access workspace 'lab'"), "{}", text(&out.stderr));
}

#[test]
fn the_audit_log_keeps_connections_for_keep_audit_then_drops_them() {
    let coord = Coordinator::start_with(&["--keep-audit", "2s"]);
    let alice = SshUser::add(&coord, "alice");
    let out = alice.run("nosuch.tether", "true");
    assert_eq!(out.status.code(), Some(255));
    let audit = coord.json(&["audit"]);
    let rows = audit.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{audit}");
    assert!(rows[0]["outcome"].as_str().unwrap().contains("no workspace 'nosuch'"), "{audit}");
    // Two seconds after it ended, the next purge (every second with this retention) removes it.
    wait_until("the refusal to leave the audit log", LONG, || coord.json(&["audit"]).as_array().unwrap().is_empty());
}

#[test]
fn a_command_that_echoes_a_large_input_streams_both_ways_at_once() {
    // `cat` writes back what it reads: its output waits on the client's window while the client is
    // still sending. The agent must keep reading the client's window adjustments meanwhile, and make
    // the client wait for its own window instead of stalling the connection (a deadlock before).
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _agent = workspace(&coord, "dev", "alice");
    let big = alice.dir.join("big.bin");
    random_file(&big, 40 << 20, 11);
    let echoed = alice.dir.join("echoed.bin");
    let mut child = alice
        .ssh()
        .args(["dev.tether", "cat"])
        .stdin(std::fs::File::open(&big).unwrap())
        .stdout(std::fs::File::create(&echoed).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + LONG * 2;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let got = std::fs::metadata(&echoed).map(|m| m.len()).unwrap_or(0);
            panic!("`ssh dev.tether cat` still running after {:?}, {got} of {} bytes back", LONG * 2, 40 << 20);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "ssh cat: {status}: {err}");
    same_file(&big, &echoed);
    // The connection is still good for the next command on it.
    assert_eq!(alice.ok("dev.tether", "echo still here").trim(), "still here");

    // A ControlMaster, as users set one up to skip the connection setup: several sessions at once
    // on one brokered connection, a 10 MiB `cat` beside quick commands.
    let control = alice.dir.join("cm.sock");
    let mux = |args: &[&str]| {
        let mut c = alice.ssh();
        c.arg("-S").arg(&control).args(args).arg("dev.tether");
        c
    };
    let _master = Killed(mux(&["-M", "-N", "-o", "ControlPersist=no"]).spawn().unwrap());
    wait_until("the control master", LONG, || mux(&["-O", "check"]).output().is_ok_and(|o| o.status.success()));
    let audited = || coord.json(&["audit", "--user", "alice", "--limit", "1000"]).as_array().unwrap().len();
    let before = audited();
    let mid = alice.dir.join("mid.bin");
    random_file(&mid, 10 << 20, 12);
    let mid_back = alice.dir.join("mid-back.bin");
    let mut bulk = Killed(
        mux(&[])
            .arg("cat")
            .stdin(std::fs::File::open(&mid).unwrap())
            .stdout(std::fs::File::create(&mid_back).unwrap())
            .spawn()
            .unwrap(),
    );
    for i in 0..5 {
        let out = mux(&[]).arg(format!("echo quick {i}")).output().unwrap();
        assert_eq!(text(&out.stdout).trim(), format!("quick {i}"), "{}", text(&out.stderr));
    }
    let mut status = None;
    wait_until("the multiplexed cat", LONG * 2, || {
        status = bulk.0.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success());
    same_file(&mid, &mid_back);
    assert_eq!(audited(), before, "the sessions rode the master's one brokered connection");
    assert!(mux(&["-O", "exit"]).output().unwrap().status.success());

    // A burst of connections at once (a CI job's parallel steps): every one gets in. (sshd's
    // default MaxStartups begins dropping connections past 10 that have not yet authenticated.)
    let burst: Vec<Child> = (0..20)
        .map(|i| alice.ssh().args(["dev.tether", &format!("echo burst {i}")]).stdout(Stdio::piped()).spawn().unwrap())
        .collect();
    for (i, child) in burst.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "connection {i} of the burst: {}", out.status);
        assert_eq!(text(&out.stdout).trim(), format!("burst {i}"));
    }
}

/// A process that does not read its input while the client uploads (`ssh ws 'sleep 4; md5sum' <
/// big`): the client waits for its window, and the connection is quiet meanwhile. Before, the
/// withheld window trickled two bytes per round trip, thousands of packets a second through the
/// client, the coordinator and the agent (megabytes of them in the audit log's count), for as long
/// as the process did not read.
#[test]
fn an_upload_into_a_process_that_does_not_read_yet_waits_quietly() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _agent = workspace(&coord, "dev", "alice");
    let big = alice.dir.join("big.bin");
    random_file(&big, 40 << 20, 13);
    let expected = Command::new("md5sum").arg(&big).output().unwrap();
    let expected = text(&expected.stdout).split_whitespace().next().unwrap().to_string();
    let out =
        alice.ssh().args(["dev.tether", "sleep 4; md5sum"]).stdin(std::fs::File::open(&big).unwrap()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).split_whitespace().next(), Some(expected.as_str()));
    let mut audit = serde_json::Value::Null;
    wait_until("the connection's audit record", LONG, || {
        audit = coord.json(&["audit", "--user", "alice", "--limit", "1"])[0].clone();
        !audit["ended_at"].is_null()
    });
    let down = audit["bytes_down"].as_u64().unwrap();
    // The handshake, the output and a few window adjustments a second: kilobytes.
    assert!(down < 256 << 10, "{down} bytes from the agent for a 33-byte answer: {audit}");
    assert!(audit["bytes_up"].as_u64().unwrap() > 40 << 20, "{audit}");
}

/// A command without a pty outlives its client, as under sshd: its input ends and its output goes
/// nowhere, but it is not sent SIGHUP (a closed laptop, or a coordinator restart, would otherwise
/// kill every `ssh ws ./long-job.sh`).
#[test]
fn a_command_without_a_pty_runs_on_after_its_client_is_gone() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _agent = workspace(&coord, "dev", "alice");
    let (began, go, finished) = (alice.dir.join("began"), alice.dir.join("go"), alice.dir.join("finished"));
    let job = format!(
        "echo > {}; while [ ! -e {} ]; do sleep 0.1; done; echo done > {}",
        began.display(),
        go.display(),
        finished.display()
    );
    let mut client = alice.ssh().args(["dev.tether", &job]).stdin(Stdio::null()).spawn().unwrap();
    wait_until("the job to begin", LONG, || began.exists());
    client.kill().unwrap();
    client.wait().unwrap();
    wait_until("the connection's end to reach the coordinator", LONG, || {
        !coord.json(&["audit", "--user", "alice", "--limit", "1"])[0]["ended_at"].is_null()
    });
    std::fs::write(&go, "").unwrap();
    wait_until("the job to finish on its own", LONG, || finished.exists());
}

/// Without config-ssh, as the README gives it: `ssh -J alice@HOST:PORT dev.tether` with the
/// `@cert-authority` line of `GET /ssh` in known_hosts checks both hops under `StrictHostKeyChecking
/// yes` (OpenSSH looks the jump host up as `[HOST]:PORT`, which the line names).
#[test]
fn ssh_j_without_config_ssh_checks_both_hops_with_the_api_known_hosts_line() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _agent = workspace(&coord, "dev", "alice");
    let info = Command::new("curl")
        .args(["-sf", "-H", &format!("Authorization: Bearer {}", alice.token)])
        .arg(format!("{}/api/v1/ssh", coord.api_url()))
        .output()
        .unwrap();
    assert!(info.status.success(), "{}", text(&info.stderr));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let known = alice.dir.join("plain_known_hosts");
    std::fs::write(&known, format!("{}\n", info["known_hosts"].as_str().unwrap())).unwrap();
    let config = alice.dir.join("plain_config");
    std::fs::write(
        &config,
        format!(
            "Host *\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n  IdentityFile {}\n  IdentitiesOnly yes\n  BatchMode yes\n",
            known.display(),
            alice.key.display()
        ),
    )
    .unwrap();
    let out = Command::new("ssh")
        .arg("-F")
        .arg(&config)
        .args(["-J", &format!("alice@{}", coord.ssh_addr()), "dev.tether", "echo checked"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "checked");
}

#[test]
fn config_ssh_warns_when_an_earlier_block_would_win() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let config = alice.config.to_str().unwrap().to_string();
    let key = alice.key.to_str().unwrap().to_string();
    let config_ssh = || coord.cli(&["config-ssh", "--user", "alice", "--ssh-config", &config, "--identity", &key]);
    // The harness's config (options above the block, no `Host *`) is what ssh will use.
    let out = config_ssh();
    assert!(out.status.success());
    assert!(!text(&out.stderr).contains("warning"), "{}", text(&out.stderr));
    // A `Host *` block above the managed one wins for every option it sets: ssh keeps the first
    // value. config-ssh asks `ssh -G` what it will really use and says which options lost.
    let old = std::fs::read_to_string(&alice.config).unwrap();
    std::fs::write(&alice.config, format!("Host *\n  User bob\n  StrictHostKeyChecking no\n\n{old}")).unwrap();
    let out = config_ssh();
    assert!(out.status.success(), "a warning, not an error");
    let err = text(&out.stderr);
    assert!(err.contains("ssh resolves workspace.tether with User bob, not alice"), "{err}");
    assert!(err.contains("with StrictHostKeyChecking no, not yes"), "{err}");
    assert!(!err.contains("ProxyJump") && !err.contains("UserKnownHostsFile"), "{err}");
}

/// Two coordinators (say production and staging) reached from one ssh config: each has its own host
/// suffix, `config-ssh` writes a block and a known_hosts file for each and replaces only its own, and
/// each trusts its own CA for its own names, with strict host-key checking.
#[test]
fn two_coordinators_with_their_own_suffixes_share_one_ssh_config() {
    let prod = Coordinator::start();
    let staging = Coordinator::start_with(&["--ssh-host-suffix", ".staging"]);
    let alice = SshUser::add(&prod, "alice");
    let public = alice.key.with_extension("pub");
    let added = staging.json(&["user", "add", "alice", "--ssh-key", public.to_str().unwrap()]);
    let staging_token = added["token"].as_str().unwrap().to_string();
    let mut agents = Vec::new();
    for (coord, place) in [(&prod, "prod"), (&staging, "staging")] {
        let template = format!("[env]\nWHERE = \"{place}\"\n");
        let created = coord.create("dev", &template, &["--owner", "alice"]);
        let token = created["agent_token"].as_str().unwrap();
        agents.push(Agent::start(coord, token, &coord.data_dir().join("agent-dev")));
        coord.wait_for("dev", "running", LONG);
    }
    let config = alice.config.to_str().unwrap();
    let key = alice.key.to_str().unwrap();
    let out = staging.cli(&["config-ssh", "--user", "alice", "--ssh-config", config, "--identity", key]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("warning"), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("connect with: ssh WORKSPACE.staging"), "{}", text(&out.stdout));
    assert!(alice.dir.join("tether_known_hosts.staging").exists());

    // Each name reaches its own coordinator's workspace; each known_hosts file trusts one CA.
    assert_eq!(alice.ok("dev.tether", "echo $WHERE").trim(), "prod");
    assert_eq!(alice.ok("dev.staging", "echo $WHERE").trim(), "staging");
    // Running either again changes nothing in the other's block.
    let before = std::fs::read_to_string(&alice.config).unwrap();
    alice.config_ssh(&prod);
    let out = staging.cli(&["config-ssh", "--user", "alice", "--ssh-config", config, "--identity", key]);
    assert!(!text(&out.stderr).contains("warning"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&alice.config).unwrap(), before);
    // A staging name sent to production's front door is no workspace of production's, rather than
    // production's `dev` under the wrong name.
    let wrong = alice.ssh().args(["-o", "ProxyJump=tether-frontdoor", "dev.staging", "true"]).output().unwrap();
    assert!(!wrong.status.success());
    let said = text(&wrong.stderr);
    assert!(
        said.contains("no workspace 'dev.staging' (this coordinator's workspace host names end in .tether)"),
        "{said}"
    );

    // `tether ssh` to both at once, through their APIs.
    let via_api = |coord: &Coordinator, token: &str, target: &str| {
        let mut c = alice.tether(coord);
        c.env("TETHER_TOKEN", token);
        c.args(["ssh", target, "--", "-i", key, "-o", "BatchMode=yes", "echo $WHERE"]);
        c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let a = via_api(&prod, &alice.token, "dev");
    let b = via_api(&staging, &staging_token, "dev.staging");
    for (child, want) in [(a, "prod"), (b, "staging")] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "tether ssh: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), want);
    }

    // A second coordinator with the same suffix replaces the block, and says so.
    let other = Coordinator::start();
    other.ok(&["user", "add", "alice", "--ssh-key", public.to_str().unwrap()]);
    let out = other.cli(&["config-ssh", "--user", "alice", "--ssh-config", config, "--identity", key]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    let was = prod.ssh_addr();
    assert!(
        err.contains(&format!(
            "this replaced the block for *.tether of another coordinator (its SSH CA differs), which led to the front \
             door at {was}"
        )),
        "{err}"
    );
    assert!(err.contains("--ssh-host-suffix"), "{err}");
    // Staging's block is untouched.
    assert_eq!(alice.ok("dev.staging", "echo $WHERE").trim(), "staging");
    // Production's again: it replaces the other's, and says so; the same one again says nothing.
    let out = prod.cli(&["config-ssh", "--user", "alice", "--ssh-config", config, "--identity", key]);
    assert!(text(&out.stderr).contains("of another coordinator"), "{}", text(&out.stderr));
    let out = prod.cli(&["config-ssh", "--user", "alice", "--ssh-config", config, "--identity", key]);
    assert!(!text(&out.stderr).contains("warning"), "{}", text(&out.stderr));
    assert_eq!(alice.ok("dev.tether", "echo $WHERE").trim(), "prod");

    // Both at once, into a new file (a setup script): they take turns, and neither block is lost.
    for round in 0..3 {
        let together = alice.dir.join(format!("together-{round}"));
        let together = together.to_str().unwrap();
        let args = ["config-ssh", "--user", "alice", "--ssh-config", together, "--identity", key];
        let both: Vec<Child> =
            [&prod, &staging].iter().map(|c| c.cli_command(&args).stdout(Stdio::null()).spawn().unwrap()).collect();
        for mut child in both {
            assert!(child.wait().unwrap().success());
        }
        let written = std::fs::read_to_string(together).unwrap();
        assert!(written.contains("# <<< tether <<<") && written.contains("# <<< tether .staging <<<"), "{written}");
    }

    // A block whose end line was deleted: an error naming its line, and the file left as it was.
    let whole = std::fs::read_to_string(&alice.config).unwrap();
    let cut = whole.replacen("# <<< tether .staging <<<\n", "", 1);
    std::fs::write(&alice.config, &cut).unwrap();
    let out = staging.cli(&["config-ssh", "--user", "alice", "--ssh-config", config, "--identity", key]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("the tether block for *.staging has no end line"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&alice.config).unwrap(), cut);
    std::fs::write(&alice.config, &whole).unwrap();

    // A narrower suffix than an existing block's goes above it, so ssh (as `ssh -G` tells
    // config-ssh) resolves its names with its own block: no warning.
    let narrow = Coordinator::start_with(&["--ssh-host-suffix", ".x.tether"]);
    narrow.ok(&["user", "add", "alice", "--ssh-key", public.to_str().unwrap()]);
    let out = narrow.cli(&["config-ssh", "--user", "alice", "--ssh-config", config, "--identity", key]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("warning"), "{}", text(&out.stderr));
    let written = std::fs::read_to_string(&alice.config).unwrap();
    assert!(written.find("Host *.x.tether") < written.find("Host *.tether"), "{written}");
    drop(agents);
}

/// X11 forwarding: `ssh -Y` and `ssh -X` (its untrusted cookie) give the workspace a `DISPLAY` whose
/// programs draw on the client's X server (Xvfb here, with its own cookie). The workspace only ever
/// sees a stand-in cookie, which the client checks and swaps for the real one; a program without it
/// is turned away, and the display goes away with the session.
#[test]
fn x11_forwarding_reaches_the_clients_display() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    // The workspace's X authority file, where the agent registers each session's cookie.
    let workspace_auth = coord.data_dir().join("workspace-xauthority");
    let template = format!("heartbeat_timeout = \"6s\"\n\n[env]\nXAUTHORITY = \"{}\"\n", workspace_auth.display());
    let created = coord.create("x", &template, &["--owner", "alice"]);
    let token = created["agent_token"].as_str().expect("agent token").to_string();
    let _agent = Agent::start(&coord, &token, &coord.data_dir().join("agent-x"));
    coord.wait_for("x", "running", LONG);

    // The user's X server, on a display no other X server holds, accepting only its cookie.
    let n = (60..100)
        .find(|n| {
            !Path::new(&format!("/tmp/.X{n}-lock")).exists() && !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
        })
        .expect("a free X display number");
    let client_auth = alice.dir.join("Xauthority");
    let cookie: String = (0..16).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let added = Command::new("xauth")
        .arg("-f")
        .arg(&client_auth)
        .args(["add", &format!(":{n}"), "MIT-MAGIC-COOKIE-1", &cookie])
        .output()
        .expect("run xauth (is xauth installed?)");
    assert!(added.status.success(), "xauth add: {}", text(&added.stderr));
    let xvfb = Command::new("Xvfb")
        .arg(format!(":{n}"))
        .args(["-nolisten", "tcp", "-auth"])
        .arg(&client_auth)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run Xvfb (is xvfb installed?)");
    let _xvfb = XServer(xvfb, n);
    wait_until("Xvfb's socket", LONG, || Path::new(&format!("/tmp/.X11-unix/X{n}")).exists());
    let x11 = |flag: &str, command: &str| {
        alice
            .ssh()
            .args([flag, "x.tether", command])
            .env("DISPLAY", format!(":{n}"))
            .env("XAUTHORITY", &client_auth)
            .output()
            .expect("run ssh")
    };

    // A display socket someone listens on is never taken; one left by a killed X server or agent
    // (nobody listening) is taken over.
    let socket = |n: u32| format!("/tmp/.X11-unix/X{n}");
    let free = |from: u32| {
        (from..60).find(|n| !Path::new(&format!("/tmp/.X{n}-lock")).exists() && !Path::new(&socket(*n)).exists())
    };
    std::fs::create_dir_all("/tmp/.X11-unix").expect("/tmp/.X11-unix");
    let live = free(10).expect("a free display number");
    let _live = std::os::unix::net::UnixListener::bind(socket(live)).expect("a live display socket");
    let stale = free(live + 1).expect("a free display number");
    drop(std::os::unix::net::UnixListener::bind(socket(stale)).expect("a stale display socket"));
    let _cleanup = RemoveOnDrop(vec![socket(live).into(), socket(stale).into()]);

    // Without -X or -Y there is no display.
    assert_eq!(alice.ok("x.tether", "echo \"[$DISPLAY]\"").trim(), "[]");

    let out = x11("-Y", "echo $DISPLAY; xdpyinfo | grep -m1 '^name of display'; xauth list");
    assert!(out.status.success(), "ssh -Y: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let display = stdout.lines().next().unwrap_or_default().to_string();
    let number: u32 = display
        .strip_prefix(':')
        .and_then(|d| d.strip_suffix(".0"))
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("DISPLAY is :N.0: {stdout}"));
    assert!(number >= 10, "display numbers start at 10, past local X servers: {stdout}");
    assert!(number != live && number <= stale, "live {live}, stale {stale}: {stdout}");
    assert!(
        stdout.contains(&format!("name of display:    {display}")),
        "xdpyinfo reached the client's X server: {stdout}"
    );
    assert!(
        stdout.contains(&format!("/unix:{number}  MIT-MAGIC-COOKIE-1  ")),
        "the session's cookie is registered: {stdout}"
    );
    assert!(!stdout.contains(&cookie), "the workspace never sees the real cookie: {stdout}");
    // The display is gone with its session: socket and cookie.
    wait_until("the display's socket to go", LONG, || !Path::new(&socket(number)).exists());
    wait_until("the display's cookie to go", LONG, || {
        let list = Command::new("xauth").arg("-f").arg(&workspace_auth).arg("list").output().expect("xauth list");
        !text(&list.stdout).contains(&format!("/unix:{number} "))
    });

    // A program that does not present the session's cookie is refused by the client.
    let out = x11("-Y", "XAUTHORITY=/dev/null xdpyinfo >/dev/null 2>&1 && echo drew || echo refused");
    assert_eq!(text(&out.stdout).trim(), "refused", "{}", text(&out.stderr));

    // ssh -X: the client makes an untrusted cookie with xauth; the program still reaches the display.
    let out = x11("-X", "xdpyinfo | grep -m1 '^name of display'");
    assert!(out.status.success(), "ssh -X: {}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("name of display:    :"), "{}", text(&out.stdout));
}

/// Reads from `stream` until the peer closes it (or resets it); false if it is still open after
/// `within`. Whatever arrives before is dropped.
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        stream.set_read_timeout(Some(Duration::from_millis(500))).expect("read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// The front door gives a connection a grace time from accept to authenticate, its version line
/// and key exchange included, and holds at most 64 unauthenticated connections from one address
/// (as sshd's LoginGraceTime and MaxStartups do): connections that connect and send nothing, or
/// stop in the middle of the handshake, cannot take every place and lock users out for good.
#[test]
fn idle_connections_cannot_lock_users_out_of_the_front_door() {
    let coord = Coordinator::start_with(&["--ssh-login-grace", "3s"]);
    let alice = SshUser::add(&coord, "alice");
    let _agent = workspace(&coord, "dev", "alice");
    let addr = coord.ssh_addr();

    // 64 connections from 127.0.0.1 that never say a word: each is accepted (the front door sends
    // its version line first).
    let mut idle: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(&addr).expect("connect")).collect();
    for s in &mut idle {
        s.set_read_timeout(Some(LONG)).expect("read timeout");
        let mut line = [0u8; 14];
        s.read_exact(&mut line).expect("the front door's version line");
        assert_eq!(&line, b"SSH-2.0-tether");
    }
    // A 65th from the same address is closed at once, without a version line; so is a user's ssh.
    let mut extra = TcpStream::connect(&addr).expect("connect");
    extra.set_read_timeout(Some(LONG)).expect("read timeout");
    let mut got = Vec::new();
    let _ = extra.read_to_end(&mut got);
    assert!(got.is_empty(), "no version line for a connection over the limit: {}", text(&got));
    let out = alice.run("dev.tether", "true");
    assert!(!out.status.success(), "refused while 64 connections from its address wait");
    // Another address is not: it gets the version line.
    let mut other = tether_tests::tcp_connect_from("127.0.0.2", &addr).expect("connect from 127.0.0.2");
    other.set_read_timeout(Some(LONG)).expect("read timeout");
    let mut line = [0u8; 14];
    other.read_exact(&mut line).expect("a version line for another address");
    assert_eq!(&line, b"SSH-2.0-tether");
    drop(other);
    // One that sends its version line, then stalls in the key exchange, in a place given back.
    idle.pop();
    let mut stalled = None;
    wait_until("a place given back", LONG, || {
        let mut s = TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2))).expect("read timeout");
        let mut line = [0u8; 14];
        if s.read_exact(&mut line).is_err() {
            return false;
        }
        s.write_all(b"SSH-2.0-OpenSSH_9.9\r\n").expect("version line");
        stalled = Some(s);
        true
    });
    let mut stalled = stalled.expect("stalled connection");

    // After the grace time each of them is closed, and users get in again.
    for s in idle.iter_mut().chain([&mut stalled]) {
        assert!(closed_within(s, LONG), "an unauthenticated connection outlived the grace time");
    }
    assert_eq!(alice.ok("dev.tether", "echo in").trim(), "in");
    // Ops see both in the metrics.
    let api = coord.api_url().trim_start_matches("http://").to_string();
    let (_, metrics) = tether_tests::get(&api, "/metrics").expect("GET /metrics");
    let dropped = |reason: &str| -> u64 {
        let series = format!("tether_ssh_front_door_dropped_total{{reason=\"{reason}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(&series)).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    assert!(dropped("unauthenticated_limit") >= 2, "{metrics}");
    assert!(dropped("login_timeout") >= 64, "{metrics}");
    assert_eq!(dropped("connection_limit"), 0, "{metrics}");
    let log = std::fs::read_to_string(coord.data_dir().join("coordinator.log")).expect("coordinator log");
    assert!(
        log.contains("refusing connection: 64 connections from 127.0.0.1 have not authenticated yet"),
        "the refusal is logged with its reason"
    );
}

/// The agent's SSH server gives a client 60 s from its stream's start to log in, wherever it stalls:
/// here a raw stream to the workspace (`ssh -W` through the front door) sends a version line, reads
/// the agent's key exchange offer and goes quiet. The agent closes it, and serves others meanwhile.
#[test]
fn the_agent_cuts_off_a_client_that_stalls_in_the_key_exchange() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _agent = workspace(&coord, "dev", "alice");
    let mut raw = alice
        .ssh()
        .args(["-W", "dev.tether:22", "tether-frontdoor"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ssh -W");
    let mut stdin = raw.stdin.take().expect("stdin");
    stdin.write_all(b"SSH-2.0-OpenSSH_9.9\r\n").expect("version line");
    let (tx, rx) = std::sync::mpsc::channel();
    let mut stdout = raw.stdout.take().expect("stdout");
    let opened = Instant::now();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let _ = stdout.read_to_end(&mut got);
        let _ = tx.send(got);
    });
    assert_eq!(alice.ok("dev.tether", "echo meanwhile").trim(), "meanwhile");
    // At the grace time: well before russh's own keep-alives give up on the client (4 missed at 30 s
    // intervals, 150 s), which is all that ended such a stream before.
    let got = rx.recv_timeout(Duration::from_secs(110)).expect("the agent closes the stalled stream at 60 s");
    assert!(got.starts_with(b"SSH-2.0-"), "the agent spoke first: {}", text(&got));
    assert!(
        opened.elapsed() >= Duration::from_secs(50),
        "closed at the grace time, not at once: {:?}",
        opened.elapsed()
    );
    let _ = raw.kill();
    let _ = raw.wait();
    drop(stdin);
}

/// The agent and the front door offer no finite-field Diffie-Hellman above 2048 bits: russh computes
/// it in the connection's task, and group 18 costs over a second of CPU per key exchange, which any
/// client could ask of the front door before logging in. A client that insists is told there is no
/// common key exchange; FIPS-style clients (NIST curves) and group 14 still get in.
#[test]
fn expensive_key_exchanges_are_not_offered() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _dev = workspace(&coord, "dev", "alice");
    let with_kex = |kex: &str| {
        alice.ssh().args(["-o", &format!("KexAlgorithms={kex}"), "dev.tether", "echo in"]).output().unwrap()
    };
    for kex in ["ecdh-sha2-nistp256", "diffie-hellman-group14-sha256"] {
        let out = with_kex(kex);
        assert!(out.status.success(), "{kex}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), "in", "{kex}");
    }
    for kex in
        ["diffie-hellman-group18-sha512", "diffie-hellman-group16-sha512", "diffie-hellman-group-exchange-sha256"]
    {
        // The agent, through the front door.
        let out = with_kex(kex);
        assert!(!out.status.success(), "{kex} is not offered by the agent");
        assert!(text(&out.stderr).contains("no matching key exchange method"), "{kex}: {}", text(&out.stderr));
        // The front door itself, before any login.
        let (host, port) = coord.ssh_addr().rsplit_once(':').map(|(h, p)| (h.to_string(), p.to_string())).unwrap();
        let out = Command::new("ssh")
            .args(["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null", "-o", &format!("KexAlgorithms={kex}"), "-p", &port])
            .arg(format!("alice@{host}"))
            .arg("true")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{kex} is not offered by the front door");
        assert!(text(&out.stderr).contains("no matching key exchange method"), "{kex}: {}", text(&out.stderr));
    }
    // The front door still serves everyone else.
    assert_eq!(alice.ok("dev.tether", "echo still").trim(), "still");
}

/// Whether a thread of process `pid` waits to write to a pipe.
fn writing_to_a_full_pipe(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().any(|t| std::fs::read_to_string(t.path().join("wchan")).is_ok_and(|w| w.contains("pipe_write")))
}

/// The agent's stderr is a pipe that nobody reads, as when the log collector of an image stalls.
/// Once the pipe is full the agent's log thread waits on it, and SSH and heartbeats go on.
#[test]
fn an_agent_whose_log_nobody_reads_keeps_serving() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let created = coord.create("dev", TEMPLATE, &["--owner", "alice"]);
    let token = created["agent_token"].as_str().expect("agent token");
    let data_dir = coord.data_dir().join("agent-dev");
    let child = Agent::command(&coord, token, &data_dir, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tether-agent");
    let pid = child.id();
    // The pipe's read end stays open, unread, inside `child`.
    let _agent = Agent { child, data_dir, log: Default::default() };
    coord.wait_for("dev", "running", LONG);
    // Debug logging fills the pipe's 64 KiB soon; each connection adds to it.
    let started = Instant::now();
    while !writing_to_a_full_pipe(pid) {
        assert!(started.elapsed() < LONG, "the agent's stderr never filled");
        assert_eq!(alice.ok("dev.tether", "echo filling").trim(), "filling");
    }
    for i in 0..3 {
        assert_eq!(alice.ok("dev.tether", &format!("echo {i}")).trim(), i.to_string());
    }
    let beat = coord.show("dev")["last_heartbeat_at"].clone();
    wait_until("a heartbeat after the pipe filled", LONG, || coord.show("dev")["last_heartbeat_at"] != beat);
    assert_eq!(coord.show("dev")["status"], "running");
    assert!(writing_to_a_full_pipe(pid), "the log thread still waits on the pipe");
}

/// A program that cannot start (here: the workspace user's home directory is gone) is reported to
/// the user on stderr with exit status 1, as sshd's child does, and other sessions go on.
#[test]
fn a_program_that_cannot_start_says_why() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let created = coord.create("dev", TEMPLATE, &["--owner", "alice"]);
    let token = created["agent_token"].as_str().expect("agent token");
    let data_dir = coord.data_dir().join("agent-dev");
    let home = coord.data_dir().join("home-dev");
    std::fs::create_dir_all(&home).unwrap();
    let log = std::fs::File::create(data_dir.with_extension("log")).unwrap();
    let child = Agent::command(&coord, token, &data_dir, &[])
        .env("HOME", &home)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn tether-agent");
    let agent = Agent { child, log: data_dir.with_extension("log"), data_dir };
    coord.wait_for("dev", "running", LONG);
    assert_eq!(alice.ok("dev.tether", "pwd").trim(), home.to_str().unwrap());
    std::fs::remove_dir(&home).unwrap();
    for (flags, what) in [(&[][..], "command"), (&["-tt"][..], "shell")] {
        let mut ssh = alice.ssh();
        ssh.args(flags).arg("dev.tether");
        if what == "command" {
            ssh.arg("true");
        }
        let out = ssh.stdin(Stdio::null()).output().unwrap();
        let said = text(&out.stderr) + &text(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{what}: {said}\n{}", agent.log_text());
        assert!(said.contains(&format!("tether-agent: could not start the {what}: ")), "{what}: {said}");
        assert!(said.contains("No such file or directory"), "{what}: {said}");
    }
    std::fs::create_dir_all(&home).unwrap();
    assert_eq!(alice.ok("dev.tether", "echo back").trim(), "back");
}

/// A front-door connection shared by a ControlMaster opens one workspace connection per `ssh`. Once
/// the user's key is removed, the next one is refused, although the shared connection logged in
/// with it before.
#[test]
fn a_removed_key_opens_nothing_more_over_a_shared_front_door_connection() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _dev = workspace(&coord, "dev", "alice");
    let mut config = std::fs::read_to_string(&alice.config).unwrap();
    config.push_str(&format!(
        "\nHost tether-frontdoor\n  ControlMaster auto\n  ControlPath {}/cm-%C\n  ControlPersist 120\n",
        alice.dir.display()
    ));
    std::fs::write(&alice.config, config).unwrap();
    assert_eq!(alice.ok("dev.tether", "echo shared").trim(), "shared");
    let check = alice.ssh().args(["-O", "check", "tether-frontdoor"]).output().unwrap();
    assert!(check.status.success(), "the front-door connection is shared: {}", text(&check.stderr));
    // The same connection serves the next one while the key is registered.
    assert_eq!(alice.ok("dev.tether", "echo again").trim(), "again");

    let listed = Command::new("ssh-keygen").arg("-lf").arg(alice.key.with_extension("pub")).output().unwrap();
    let fingerprint = text(&listed.stdout).split_whitespace().nth(1).unwrap().to_string();
    let left = coord.json(&["user", "remove-key", "alice", &fingerprint]);
    assert_eq!(left["keys"], serde_json::json!([]), "{left}");
    let out = alice.run("dev.tether", "echo after");
    assert!(!out.status.success(), "refused after the key is removed: {}", text(&out.stdout));
    // Through a ControlMaster, OpenSSH shows only "Session open refused by peer"; the reason is in
    // the audit log.
    assert!(text(&out.stderr).contains("refused"), "{}", text(&out.stderr));
    let audit = coord.json(&["audit", "--workspace", "dev"]);
    let why = format!("refused: the key {fingerprint} is no longer registered to user 'alice'");
    assert!(audit.as_array().unwrap().iter().any(|r| r["outcome"] == why.as_str()), "{audit}");
    let check = alice.ssh().args(["-O", "check", "tether-frontdoor"]).output().unwrap();
    assert!(check.status.success(), "the refusal came over the shared connection: {}", text(&check.stderr));
    let _ = alice.ssh().args(["-O", "exit", "tether-frontdoor"]).output();
    let public = alice.key.with_extension("pub");
    let back = coord.json(&["user", "add-key", "alice", "--ssh-key", public.to_str().unwrap()]);
    assert_eq!(back["keys"][0]["fingerprint"], fingerprint.as_str(), "{back}");
    assert_eq!(alice.ok("dev.tether", "echo back in").trim(), "back in");
}

/// Users whose clients stop reading leave the agent's data waiting at the coordinator. However many
/// brokered connections stall, the workspace's own traffic (heartbeats) and other users' connections
/// still get through the agent's tunnel.
#[test]
fn stalled_ssh_clients_never_starve_the_agents_tunnel() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let bob = SshUser::add(&coord, "bob");
    let _dev = workspace(&coord, "dev", "alice");
    coord.ok(&["workspace", "grant", "dev", "bob"]);
    // The sessions wait on a FIFO (each blocks opening it) until the test opens and closes it.
    let go = alice.dir.join("go");
    // Stopped processes are resumed and killed at the end, pass or fail, and so are the sessions'
    // commands: one still blocked opening the FIFO would wait for ever once the test has gone (as
    // under sshd, a killed server leaves its sessions' processes to themselves).
    struct Held(Vec<Child>, String);
    impl Drop for Held {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let pid = nix::unistd::Pid::from_raw(c.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
                let _ = c.kill();
                let _ = c.wait();
            }
            for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
                if std::fs::read(p.path().join("cmdline")).is_ok_and(|c| text(&c).contains(&self.1)) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }
    let mut held = Held(Vec::new(), go.display().to_string());
    nix::unistd::mkfifo(&go, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let pour = format!("cat {} && exec cat /dev/zero", go.display());
    let waiting = || {
        let procs = std::fs::read_dir("/proc").unwrap().flatten();
        procs.filter(|p| std::fs::read(p.path().join("cmdline")).is_ok_and(|c| text(&c).contains(&pour))).count()
    };
    // Twelve connections, each a master with 8 sessions that will pour out zeros. The masters are
    // stopped before the zeros start, so nothing reads their connections: 8 channel windows of
    // 2 MiB each are more than the sockets on the way hold, and the rest waits at the coordinator.
    for m in 0..12 {
        let control = alice.dir.join(format!("m{m}"));
        let master = alice
            .ssh()
            .args(["-o", "ControlMaster=yes", "-o", &format!("ControlPath={}", control.display()), "-N", "dev.tether"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = nix::unistd::Pid::from_raw(master.id() as i32);
        held.0.push(master);
        wait_until("the control master", LONG, || control.exists());
        for _ in 0..8 {
            let session = alice
                .ssh()
                .args(["-S", control.to_str().unwrap(), "dev.tether", &pour])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            held.0.push(session);
        }
        wait_until("the sessions to start", LONG, || waiting() >= (m + 1) * 8);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    }
    // Opening the FIFO for writing lets every `cat` blocked on it go, and closing it ends them; any
    // that came to it late are let go on the next round.
    let readers = || {
        let want = format!("cat\0{}\0", go.display());
        let procs = std::fs::read_dir("/proc").unwrap().flatten();
        procs.filter(|p| std::fs::read(p.path().join("cmdline")).is_ok_and(|c| text(&c) == want)).count()
    };
    wait_until("every session to pour", LONG, || {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::OpenOptions::new().write(true).custom_flags(nix::libc::O_NONBLOCK).open(&go);
        readers() == 0
    });
    // Heartbeats keep coming for three heartbeat timeouts (they come every 2 s; the template's
    // timeout is 6 s), and the workspace stays running.
    let mut last = coord.show("dev")["last_heartbeat_at"].clone();
    let mut beats = 0;
    wait_until("nine more heartbeats", 3 * LONG, || {
        let w = coord.show("dev");
        assert_eq!(w["status"], "running", "{w}");
        if w["last_heartbeat_at"] != last {
            beats += 1;
            last = w["last_heartbeat_at"].clone();
        }
        beats >= 9
    });
    assert_eq!(bob.ok("dev.tether", "echo through").trim(), "through");
}

/// Sends a line to the Unix socket at `path` and returns what comes back, retrying until a forward
/// being set up answers or the deadline passes.
fn unix_ask(path: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(path) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut out = String::new();
            if s.write_all(b"ping\n").is_ok() && s.read_to_string(&mut out).is_ok() && !out.is_empty() {
                return out;
            }
        }
        assert!(Instant::now() < deadline, "no answer on {}", path.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Unix-socket forwarding both ways, as `ssh -L SOCKET:SOCKET` and `ssh -R SOCKET:HOST:PORT` do it
/// (Docker's socket, say): the agent connects to a socket in the workspace, and listens on one there
/// until the forward ends, when it removes it.
#[test]
fn unix_sockets_are_forwarded_both_ways_and_cleaned_up() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _dev = workspace(&coord, "dev", "alice");
    // A server on a Unix socket inside the workspace (this machine), answering each line.
    let inside = alice.dir.join("inside.sock");
    let listener = std::os::unix::net::UnixListener::bind(&inside).unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut line = String::new();
            let _ = BufReader::new(&conn).read_line(&mut line);
            let _ = write!(conn, "inside heard {line}");
        }
    });
    let local = alice.dir.join("local.sock");
    let mut forward = alice
        .ssh()
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("{}:{}", local.display(), inside.display()))
        .arg("dev.tether")
        .spawn()
        .unwrap();
    assert_eq!(unix_ask(&local, LONG), "inside heard ping\n");
    let _ = forward.kill();
    let _ = forward.wait();

    // The other way: the agent listens on a socket in the workspace for a server outside it.
    let outside = http_server("from outside");
    let remote = alice.dir.join("remote.sock");
    let mut reverse = alice
        .ssh()
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-R"])
        .arg(format!("{}:127.0.0.1:{outside}", remote.display()))
        .arg("dev.tether")
        .spawn()
        .unwrap();
    assert!(unix_ask(&remote, LONG).ends_with("from outside"));
    let _ = reverse.kill();
    let _ = reverse.wait();
    wait_until("the agent to remove its socket", LONG, || !remote.exists());
}

/// `ssh HOST` running a command that lasts ten minutes, once it has started.
fn long_session(user: &SshUser, host: &str) -> KillOnDrop {
    let mut ssh = user.ssh();
    ssh.arg(host);
    started(ssh)
}

/// Runs `client` (an ssh command line without its remote command) with a remote command that
/// prints "started" and then sleeps; returns once it has printed it.
fn started(mut client: Command) -> KillOnDrop {
    // A remote command line of its own: a session whose agent was killed goes on (as under sshd),
    // and is ended by that name when the test is done with it.
    static SESSIONS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let n = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let remote = format!("sleep 600.{}{n:03}", std::process::id());
    let mut child =
        client.arg(format!("echo started; {remote}")).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "started");
    KillOnDrop(child, Some(remote))
}

/// Reads `from` until `want` has come; returns what was read.
fn read_until(from: &mut dyn Read, want: &str) -> Vec<u8> {
    let mut got = Vec::new();
    while !text(&got).contains(want) {
        let mut buf = [0u8; 256];
        match from.read(&mut buf) {
            Ok(0) | Err(_) => panic!("ended before {want:?}: {}", text(&got)),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

/// A child process killed (and reaped) when dropped, with the remote command of its SSH session
/// if it has one.
struct KillOnDrop(std::process::Child, Option<String>);

impl KillOnDrop {
    /// What the client wrote to stderr, once it has ended (and the ProxyJump hop with it).
    fn said(&mut self) -> String {
        let mut said = String::new();
        if let Some(mut e) = self.0.stderr.take() {
            let _ = e.read_to_string(&mut said);
        }
        said
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if let Some(remote) = &self.1 {
            let _ = Command::new("pkill").args(["-x", "-f", remote]).status();
        }
    }
}

/// russh's client, for what the OpenSSH client cannot send; it trusts any host key (the host
/// certificate is checked with OpenSSH elsewhere).
struct RusshClient;

impl russh::client::Handler for RusshClient {
    type Error = russh::Error;

    async fn check_server_key(&mut self, _key: &russh::keys::PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// An SSH `signal` request reaches the remote command, which can trap it. OpenSSH's client has no
/// way to send one (editors' SSH libraries do), so russh's client sends it, through
/// `tether ssh --stdio` as its transport and the coordinator's broker to the agent.
#[test]
fn a_signal_request_reaches_the_remote_command() {
    use russh::{ChannelMsg, Sig};
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _dev = workspace(&coord, "dev", "alice");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (out, status) = rt.block_on(async {
        // Spawned with std: tokio's process support would install a SIGCHLD handler in this test
        // process, and that signal then interrupts the other tests' reads that have a timeout.
        let mut proxy = alice.tether(&coord);
        proxy.args(["ssh", "--stdio", "dev"]).stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = proxy.spawn().expect("tether ssh --stdio");
        let stdout = tokio::process::ChildStdout::from_std(child.stdout.take().expect("stdout")).expect("stdout");
        let stdin = tokio::process::ChildStdin::from_std(child.stdin.take().expect("stdin")).expect("stdin");
        let _child = KillOnDrop(child, None);
        let stream = tokio::io::join(stdout, stdin);
        let config = std::sync::Arc::new(russh::client::Config::default());
        let mut session = russh::client::connect_stream(config, stream, RusshClient).await.expect("ssh handshake");
        let key = russh::keys::load_secret_key(&alice.key, None).expect("alice's key");
        let key = russh::keys::PrivateKeyWithHashAlg::new(std::sync::Arc::new(key), None);
        assert!(session.authenticate_publickey("alice", key).await.expect("auth").success(), "alice's key is accepted");
        let mut channel = session.channel_open_session().await.expect("session channel");
        channel
            .exec(true, "trap 'echo got-TERM; exit 3' TERM; echo ready; while :; do sleep 0.1; done")
            .await
            .expect("exec");
        let mut out = Vec::new();
        let mut status = None;
        let mut signalled = false;
        let read = async {
            while let Some(msg) = channel.wait().await {
                match msg {
                    ChannelMsg::Data { data } => {
                        out.extend_from_slice(&data);
                        if !signalled && String::from_utf8_lossy(&out).contains("ready") {
                            channel.signal(Sig::TERM).await.expect("signal request");
                            signalled = true;
                        }
                    }
                    ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    _ => {}
                }
            }
        };
        tokio::time::timeout(LONG, read).await.expect("the command ends after its signal");
        (String::from_utf8_lossy(&out).into_owned(), status)
    });
    assert!(out.contains("got-TERM"), "the trap ran: {out:?}");
    assert_eq!(status, Some(3), "{out:?}");
}

/// The file named `name` somewhere under `dir`.
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        }
    }
    None
}

/// `TYPE BASE64` of the public half of the OpenSSH private key file at `path`.
fn public_key_of(path: &Path) -> String {
    let out = Command::new("ssh-keygen").arg("-y").arg("-f").arg(path).output().expect("ssh-keygen -y");
    assert!(out.status.success(), "ssh-keygen -y {}: {}", path.display(), text(&out.stderr));
    text(&out.stdout).split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// A second SSH implementation on the client side: Paramiko (under Ansible and many tools) jumps
/// through the front door with a direct-tcpip channel, as `ssh -J` does, and logs in to the
/// workspace over it: it negotiates with both servers (it has no AES-GCM or chacha20, and takes
/// CTR with an HMAC), sees each one's plain host key (it knows no host certificates), gets a
/// command's output and exit status, and copies a file up and back with SFTP.
#[test]
fn paramiko_jumps_through_the_front_door_to_the_workspace() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _dev = workspace(&coord, "dev", "alice");
    let local = alice.dir.join("payload.bin");
    random_file(&local, 300_000, 5);
    let payload = std::fs::read(&local).unwrap();
    let (host, port) = coord.ssh_addr().rsplit_once(':').map(|(h, p)| (h.to_string(), p.to_string())).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/paramiko_jump.py");
    // Debian's interpreter, which python3-paramiko (installed by .ci/run) belongs to.
    let out = Command::new("/usr/bin/python3")
        .arg(&script)
        .args([&host, &port, "alice", alice.key.to_str().unwrap(), "dev", local.to_str().unwrap()])
        .output()
        .expect("run /usr/bin/python3 (is python3-paramiko installed?)");
    assert!(out.status.success(), "paramiko failed ({}): {}{}", out.status, text(&out.stdout), text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("paramiko's report");
    assert_eq!(report["output"], "from paramiko\n", "{report}");
    assert_eq!(report["status"], 7, "{report}");
    assert_eq!(report["uploaded_size"], payload.len(), "{report}");
    assert_eq!(report["still_listed_after_remove"], false, "{report}");
    assert_eq!(std::fs::read(local.with_extension("bin.back")).unwrap(), payload, "the file came back unchanged");
    let front_door = find_file(coord.data_dir(), "ssh-frontdoor.key").expect("the front door's key file");
    let agent_key = find_file(&coord.data_dir().join("agent-dev"), "ssh_host_ed25519_key").expect("the agent's key");
    assert_eq!(report["host_keys"]["front_door"], public_key_of(&front_door), "{report}");
    assert_eq!(report["host_keys"]["workspace"], public_key_of(&agent_key), "{report}");
    for hop in ["outer", "inner"] {
        let cipher = report[hop]["cipher"].as_str().unwrap_or_default();
        assert!(cipher.starts_with("aes") && cipher.contains("ctr"), "{hop}: {report}");
    }
}

/// A connection to a workspace whose agent is still running the start scripts that block login
/// goes through, and its session says so and waits for them (it is not refused, and OpenSSH's
/// ConnectTimeout no longer cuts it short); meanwhile the front door keeps serving the same user's
/// other workspaces, a client that gives up ends its wait, and access taken away ends a waiting
/// connection at once.
#[test]
fn ssh_waits_for_the_start_scripts_that_block_login() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _dev = workspace(&coord, "dev", "alice");
    let go = alice.dir.join("go");
    let template = format!(
        "{TEMPLATE}\n[[script]]\nname = \"setup\"\nrun = \"while [ ! -e '{}' ]; do sleep 0.1; done; echo set up\"\nblocks_login = true\n",
        go.display()
    );
    let created = coord.create("slow", &template, &["--owner", "alice"]);
    let token = created["agent_token"].as_str().expect("agent token");
    let _agent = Agent::start(&coord, token, &coord.data_dir().join("agent-slow"));
    wait_until("the agent to run its login-blocking script", LONG, || coord.show("slow")["lifecycle"] == "starting");
    let said = "tether: workspace 'slow' is starting; waiting for its startup scripts to finish (setup)";
    // A client that waits, with its stderr read as it comes.
    let waits = |mut ssh: Command| {
        let mut child = ssh.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                if tx.send(line.unwrap_or_default()).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        while !lines.iter().any(|l: &String| l.contains(said)) {
            match rx.recv_timeout(LONG) {
                Ok(line) => lines.push(line),
                Err(e) => panic!("no word of the wait on stderr ({e}): {lines:?}"),
            }
        }
        child
    };
    let mut ssh = alice.ssh();
    // ConnectTimeout covers the SSH version exchange, which is no longer held up by the wait.
    ssh.args(["-o", "ConnectTimeout=5", "slow.tether", "echo in"]);
    let waiting = waits(ssh);
    assert_eq!(alice.ok("dev.tether", "echo other").trim(), "other", "other workspaces are served meanwhile");
    // A client that gives up while it waits: its connection ends.
    let mut quitter = alice.ssh();
    // Its own process group, so that its ProxyJump `ssh -W` goes with it.
    std::os::unix::process::CommandExt::process_group(quitter.args(["slow.tether", "true"]), 0);
    let mut quitter = KillOnDrop(waits(quitter), None);
    let group = nix::unistd::Pid::from_raw(-(quitter.0.id() as i32));
    nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = quitter.0.wait();
    let outcomes = || -> Vec<String> {
        let audit = coord.json(&["audit", "--workspace", "slow"]);
        audit.as_array().unwrap().iter().filter_map(|r| r["outcome"].as_str().map(String::from)).collect()
    };
    wait_until("the connection that gave up to be closed", LONG, || outcomes().contains(&"closed".to_string()));
    // A `tether ssh` connection waits too; its token is replaced meanwhile, which ends it at once.
    let mut tether_ssh = alice.tether(&coord);
    tether_ssh.args(["ssh", "slow", "--", "-i", alice.key.to_str().unwrap(), "-o", "BatchMode=yes", "echo in too"]);
    let via_token = waits(tether_ssh);
    coord.ok(&["user", "token", "alice"]);
    let out = via_token.wait_with_output().unwrap();
    assert!(!out.status.success() && text(&out.stdout).is_empty(), "{out:?}");
    assert!(outcomes().contains(&"ended: the user's API token was replaced".to_string()), "{:?}", outcomes());
    // The script finishes: the waiting command runs.
    std::fs::write(&go, b"").unwrap();
    let out = waiting.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text(&out.stdout).trim(), "in");
    assert_eq!(coord.show("slow")["status"], "running");
    let mut all = outcomes();
    all.sort();
    assert_eq!(all, ["closed", "closed", "ended: the user's API token was replaced"]);
}

/// A session waiting for the start scripts that block login ends when its user presses Ctrl-C on
/// the (raw) terminal, or when the agent stops meanwhile, saying which; it never starts its program.
#[test]
fn a_waiting_session_ends_on_ctrl_c_or_when_the_agent_stops() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let template = format!("{TEMPLATE}\n[[script]]\nname = \"setup\"\nrun = \"sleep 600\"\nblocks_login = true\n");
    let created = coord.create("slow", &template, &["--owner", "alice"]);
    let token = created["agent_token"].as_str().unwrap().to_string();
    let mut agent = Agent::start(&coord, &token, &coord.data_dir().join("agent-slow"));
    wait_until("the agent to run its login-blocking script", LONG, || coord.show("slow")["lifecycle"] == "starting");
    let waiting = "waiting for its startup scripts to finish (setup)";

    // Ctrl-C on an interactive login.
    let mut ssh =
        alice.ssh().args(["-tt", "slow.tether"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdout = ssh.stdout.take().unwrap();
    read_until(&mut stdout, waiting);
    ssh.stdin.as_mut().unwrap().write_all(b"\x03").unwrap();
    read_until(&mut stdout, "tether: stopped waiting\r\n");
    assert_eq!(ssh.wait().unwrap().code(), Some(130));

    // A command waits; the agent stops (SIGTERM in the workspace): it ends, saying so.
    let mut ssh = alice
        .ssh()
        .args(["slow.tether", "echo never"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = ssh.stderr.take().unwrap();
    read_until(&mut stderr, waiting);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.child.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    read_until(&mut stderr, "tether: the workspace is stopping\n");
    let out = ssh.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).is_empty(), "{out:?}");
    assert!(agent.child.wait().unwrap().success());
}

/// Mistakes with keys, `config-ssh` and the CLI's URL get a message that names them.
#[test]
fn key_and_config_ssh_mistakes_are_named() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _bob = SshUser::add(&coord, "bob");
    let err = |mut c: Command| {
        let out = c.output().expect("run tether");
        assert!(!out.status.success(), "{c:?} should have failed");
        text(&out.stderr)
    };

    // A user's token writes the block for that user only.
    let mut c = alice.tether(&coord);
    c.args(["config-ssh", "--user", "bob", "--ssh-config", alice.dir.join("other-config").to_str().unwrap()]);
    let e = err(c);
    assert!(e.contains("--user bob: this is the API token of user 'alice'"), "{e}");
    // The admin's token: --user must name a user, and an --identity not theirs is warned about.
    let admin = || {
        let mut c = Command::new(tether_tests::bin("tether"));
        c.arg("--data-dir").arg(coord.data_dir()).env("HOME", &alice.dir);
        c
    };
    let mut c = admin();
    c.args(["config-ssh", "--user", "nosuch", "--ssh-config", alice.dir.join("admin-config").to_str().unwrap()]);
    let e = err(c);
    assert!(e.contains("no user 'nosuch'"), "{e}");
    let out = admin()
        .args(["config-ssh", "--user", "bob", "--identity", alice.key.to_str().unwrap()])
        .args(["--ssh-config", alice.dir.join("admin-config").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want = format!("warning: {} is not one of the keys registered to user 'bob'", alice.key.display());
    assert!(text(&out.stderr).contains(&want), "{}", text(&out.stderr));
    // A config file in a directory that does not exist names the directory.
    let mut c = alice.tether(&coord);
    c.args(["config-ssh", "--ssh-config", alice.dir.join("nodir/config").to_str().unwrap()]);
    let e = err(c);
    assert!(e.contains(&format!("{} is not a directory", alice.dir.join("nodir").display())), "{e}");
    // Without --ssh-config, a missing ~/.ssh is made private, as ssh makes it.
    let home = alice.dir.join("home");
    std::fs::create_dir(&home).unwrap();
    let out = alice.tether(&coord).env("HOME", &home).args(["config-ssh"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // That $HOME is not where ssh looks (the password database's home): the warning says so.
    let passwd_home = nix::unistd::User::from_uid(nix::unistd::getuid()).unwrap().unwrap().dir;
    let want = format!(
        "warning: ssh reads {} (your home directory in the password database), not {} ($HOME): run `tether \
         config-ssh --ssh-config {}`, or `ssh -F {}`\n",
        passwd_home.join(".ssh/config").display(),
        home.join(".ssh/config").display(),
        passwd_home.join(".ssh/config").display(),
        home.join(".ssh/config").display()
    );
    assert!(text(&out.stderr).contains(&want), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("an earlier `Host`"), "{}", text(&out.stderr));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(home.join(".ssh")).unwrap().permissions()) & 0o777;
    assert_eq!(mode, 0o700);

    // The private key instead of the public one: one message, not one per line of the file.
    let e = coord.fails(&["user", "add", "dave", "--ssh-key", alice.key.to_str().unwrap()]);
    assert!(e.contains("this is a private key; give the public key (the .pub file)"), "{e}");
    assert!(!e.contains("key line"), "{e}");
    // An authorized_keys line with options.
    let public = std::fs::read_to_string(alice.key.with_extension("pub")).unwrap();
    let with_options = alice.dir.join("options.pub");
    std::fs::write(&with_options, format!("no-pty {public}")).unwrap();
    let e = coord.fails(&["user", "add", "dave", "--ssh-key", with_options.to_str().unwrap()]);
    assert!(e.contains("authorized_keys options ('no-pty') are not supported"), "{e}");

    // A URL without its scheme.
    let mut c = Command::new(tether_tests::bin("tether"));
    c.args(["--url", "127.0.0.1:7080", "--token", "x", "workspace", "list"]);
    let e = err(c);
    assert!(e.contains("--url '127.0.0.1:7080' is not a URL: give it with its scheme"), "{e}");
    // A URL whose scheme is not the port's.
    for (url, says) in [
        (coord.https_url().replacen("https://", "http://", 1), "that port speaks HTTPS: give the URL as https://"),
        (coord.api_url().replacen("http://", "https://", 1), "that port speaks plain HTTP: give the URL as http://"),
    ] {
        let mut c = Command::new(tether_tests::bin("tether"));
        c.args(["--url", &url, "--token", "x", "workspace", "list"]);
        let e = err(c);
        assert!(e.contains(says), "{url}: {e}");
    }
}

/// Taking access away ends what it let in: a revoked grant ends the user's open sessions on that
/// workspace (and only theirs), a removed key ends the connections made with it, a removed user
/// all of theirs. Each is audited with why.
#[test]
fn revoking_access_ends_the_sessions_it_let_in() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let bob = SshUser::add(&coord, "bob");
    let _dev = workspace(&coord, "dev", "alice");
    coord.ok(&["workspace", "grant", "dev", "bob"]);
    let session = |user: &SshUser| long_session(user, "dev.tether");
    let ends = |s: &mut KillOnDrop, what: &str| {
        wait_until(what, LONG, || s.0.try_wait().unwrap().is_some());
    };
    let outcomes = |user: &str| -> Vec<String> {
        let rows = coord.json(&["audit", "--user", user]);
        // Times as everywhere in the API (RFC 3339), and in Unix milliseconds.
        for r in rows.as_array().unwrap() {
            assert!(r["started_at"].as_str().is_some_and(|t| t.ends_with('Z')) && r["started_at_ms"].is_i64(), "{r}");
            assert_eq!(r["ended_at"].is_null(), r["ended_at_ms"].is_null(), "{r}");
        }
        rows.as_array().unwrap().iter().map(|r| r["outcome"].as_str().unwrap().to_string()).collect()
    };
    let user = coord.json(&["user", "show", "bob"]);
    assert!(user["created_at"].as_str().is_some_and(|t| t.ends_with('Z')) && user["created_at_ms"].is_i64(), "{user}");

    let mut bobs = session(&bob);
    let mut alices = session(&alice);
    coord.ok(&["workspace", "revoke", "dev", "bob"]);
    ends(&mut bobs, "bob's session to end after the revoke");
    // The ProxyJump hop shows the front door's disconnect: the user sees why, not only the outer
    // connection's "Broken pipe".
    let said = bobs.said();
    assert!(said.contains("Received disconnect from 127.0.0.1 port"), "{said}");
    assert!(said.contains(": workspace 'dev': access was revoked"), "{said}");
    assert!(alices.0.try_wait().unwrap().is_none(), "the owner's session goes on");
    assert!(outcomes("bob").contains(&"ended: access was revoked".to_string()), "{:?}", outcomes("bob"));

    // Alice's API token is replaced: her `tether ssh` connection, made with it, ends; the one made
    // with her key goes on.
    let mut tether_ssh = alice.tether(&coord);
    tether_ssh.args(["ssh", "dev", "--", "-i", alice.key.to_str().unwrap(), "-o", "BatchMode=yes"]);
    let mut via_token = started(tether_ssh);
    // The admin's `tether ssh --as alice` was let in by the admin's token, not hers.
    let mut as_alice = Command::new(tether_tests::bin("tether"));
    as_alice.arg("--data-dir").arg(coord.data_dir()).env("HOME", &alice.dir);
    as_alice.args(["ssh", "dev", "--as", "alice", "--", "-i", alice.key.to_str().unwrap(), "-o", "BatchMode=yes"]);
    let mut by_admin = started(as_alice);
    coord.ok(&["user", "token", "alice"]);
    ends(&mut via_token, "alice's tether ssh connection to end after her token was replaced");
    // Its ProxyCommand, `tether ssh --stdio`, says why, though the token it holds is no longer valid.
    let said = via_token.said();
    assert!(said.contains("error: workspace 'dev': the user's API token was replaced"), "{said}");
    assert!(alices.0.try_wait().unwrap().is_none(), "the connection made with her key goes on");
    assert!(by_admin.0.try_wait().unwrap().is_none(), "the admin's connection as alice goes on");
    let ended = "ended: the user's API token was replaced".to_string();
    assert!(outcomes("alice").contains(&ended), "{:?}", outcomes("alice"));

    // Alice's key is removed: her connection with it ends.
    let fingerprint = coord.json(&["user", "show", "alice"])["keys"][0]["fingerprint"].as_str().unwrap().to_string();
    coord.ok(&["user", "remove-key", "alice", &fingerprint]);
    ends(&mut alices, "alice's session to end after her key went");
    let said = alices.said();
    assert!(said.contains(": workspace 'dev': the key was removed"), "{said}");
    assert!(outcomes("alice").contains(&"ended: the key was removed".to_string()), "{:?}", outcomes("alice"));

    // A removed user: all of theirs.
    coord.ok(&["workspace", "grant", "dev", "bob"]);
    let mut bobs = session(&bob);
    coord.ok(&["user", "remove", "bob"]);
    ends(&mut bobs, "bob's session to end after he was removed");
    let said = bobs.said();
    assert!(said.contains(": workspace 'dev': the user was removed"), "{said}");
    assert!(outcomes("bob").contains(&"ended: the user was removed".to_string()), "{:?}", outcomes("bob"));
}

/// A coordinator stopped with SIGTERM (a restart, an upgrade) tells each SSH client why its
/// session ended, and closes each connection's audit record, before it exits.
#[test]
fn a_coordinator_shutting_down_tells_ssh_clients_why() {
    let mut coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _dev = workspace(&coord, "dev", "alice");
    let mut session = long_session(&alice, "dev.tether");
    // And one through the API port, `tether ssh`.
    let mut tether_ssh = alice.tether(&coord);
    tether_ssh.args(["ssh", "dev", "--", "-i", alice.key.to_str().unwrap(), "-o", "BatchMode=yes"]);
    let mut via_api = started(tether_ssh);
    assert!(coord.terminate().success());
    wait_until("the session to end with its coordinator", LONG, || session.0.try_wait().unwrap().is_some());
    let said = session.said();
    assert!(said.contains(": workspace 'dev': the coordinator is shutting down"), "{said}");
    wait_until("the tether ssh session to end with its coordinator", LONG, || via_api.0.try_wait().unwrap().is_some());
    let said = via_api.said();
    assert!(said.contains("error: workspace 'dev': the coordinator is shutting down"), "{said}");
    coord.start_again();
    let rows = coord.json(&["audit", "--user", "alice"]);
    let outcomes: Vec<_> = rows.as_array().unwrap().iter().map(|r| r["outcome"].as_str().unwrap_or("")).collect();
    assert!(outcomes.contains(&"ended: the coordinator is shutting down"), "{rows}");
}

#[test]
fn a_client_that_takes_no_more_output_ends_the_remote_command() {
    // `ssh dev.tether cmd | head`: once head has its lines, ssh's output closes and OpenSSH says
    // so (eow@openssh.com). The command must then end, as under sshd, not run for ever with its
    // output thrown away.
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _dev = workspace(&coord, "dev", "alice");
    let marker = "tether-eow-test";
    let mut ssh = alice
        .ssh()
        .args(["dev.tether", &format!("exec yes {marker}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = ssh.stdout.take().unwrap();
    let mut first = [0u8; 64];
    out.read_exact(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with(marker));
    drop(out);
    let mut status = None;
    wait_until("ssh to end once its output closed", LONG, || {
        status = ssh.try_wait().unwrap();
        status.is_some()
    });
    wait_until("the remote command to end", LONG, || {
        !Command::new("pgrep").args(["-f", &format!("^yes {marker}")]).status().unwrap().success()
    });
}

#[test]
fn an_interactive_login_says_when_the_startup_scripts_failed() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    // A script that does not block login fails: the workspace runs, and a login says so first.
    let template = format!("{TEMPLATE}\n[[script]]\nname = \"warm\"\nrun = \"exit 3\"\n");
    let created = coord.create("dev", &template, &["--owner", "alice"]);
    let token = created["agent_token"].as_str().unwrap().to_string();
    let agent = Agent::start(&coord, &token, &coord.data_dir().join("agent-dev"));
    let w = coord.wait_for("dev", "running", LONG);
    assert!(w["status_reason"].as_str().unwrap().contains("'warm' exited with code 3"), "{w}");
    let mut ssh = alice.ssh().args(["-tt", "dev.tether"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    ssh.stdin.take().unwrap().write_all(b"exit\n").unwrap();
    let out = ssh.wait_with_output().unwrap();
    let shown = text(&out.stdout);
    assert!(
        shown.contains(
            "tether: startup script 'warm' exited with code 3; this workspace may not be fully set up\r\nWelcome"
        ),
        "{shown}"
    );
    // A command gets none of it.
    assert_eq!(alice.ok("dev.tether", "echo plain").trim(), "plain");
    // An agent restarted after a kill does not run the scripts again, and still says they failed.
    let mut agent = agent;
    agent.kill();
    let _agent = Agent::start(&coord, &token, &coord.data_dir().join("agent-dev"));
    let log = coord.data_dir().join("agent-dev.log");
    wait_until("the restarted agent to take its build", LONG, || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("this build was started by an earlier agent run")
    });
    let mut ssh = alice.ssh().args(["-tt", "dev.tether"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    ssh.stdin.take().unwrap().write_all(b"exit\n").unwrap();
    let shown = text(&ssh.wait_with_output().unwrap().stdout);
    let notice = "tether: this workspace's startup scripts failed (`tether workspace logs dev` shows how); it may not \
                  be fully set up\r\nWelcome";
    assert!(shown.contains(notice), "{shown}");

    // A login that waited for a script that blocks login hears how it ended.
    let go = alice.dir.join("go");
    let template = format!(
        "{TEMPLATE}\n[[script]]\nname = \"setup\"\nrun = \"while [ ! -e '{}' ]; do sleep 0.1; done; exit 4\"\nblocks_login = true\n",
        go.display()
    );
    let created = coord.create("slow", &template, &["--owner", "alice"]);
    let token = created["agent_token"].as_str().unwrap().to_string();
    let _slow = Agent::start(&coord, &token, &coord.data_dir().join("agent-slow"));
    wait_until("the agent to run its login-blocking script", LONG, || coord.show("slow")["lifecycle"] == "starting");
    let mut ssh =
        alice.ssh().args(["-tt", "slow.tether"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdout = ssh.stdout.take().unwrap();
    let waiting = "tether: workspace 'slow' is starting; waiting for its startup scripts to finish (setup)\r\n";
    let mut shown = read_until(&mut stdout, waiting);
    std::fs::write(&go, b"").unwrap();
    ssh.stdin.take().unwrap().write_all(b"exit\n").unwrap();
    stdout.read_to_end(&mut shown).unwrap();
    let _ = ssh.wait();
    let notice = "tether: startup script 'setup' exited with code 4; this workspace may not be fully set up\r\nWelcome";
    assert!(text(&shown).contains(&format!("{waiting}{notice}")), "{}", text(&shown));
}

#[test]
fn the_front_door_greets_lists_and_runs_no_commands() {
    let coord = Coordinator::start();
    let alice = SshUser::add(&coord, "alice");
    let _dev = workspace(&coord, "dev", "alice");
    // A shell: the greeting and alice's workspaces.
    let out = alice.ssh().args(["-T", "tether-frontdoor"]).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("Hi alice") && said.contains("WORKSPACE   STATUS   REASON\r\ndev.tether  running  "),
        "{said}"
    );
    // A command is not run, and fails, so a script that meant a workspace notices.
    let out = alice.ssh().args(["tether-frontdoor", "ls"]).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("the front door runs no commands (not `ls`)"), "{}", text(&out.stderr));
    assert!(text(&out.stdout).is_empty());
}
