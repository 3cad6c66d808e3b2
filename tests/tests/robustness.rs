//! Bad peers and restarts: each is refused or survived while other workspaces keep running.

use tether_shared::proto::{Hello, HelloReply, RejectCode, PROTOCOL_VERSION};
use tether_shared::tls::{client_config, CaPin, SERVER_NAME};
use tether_shared::{frame, limits};
use tether_tests::{external, span, Agent, Coordinator, LONG};

const HEALTHY: &str = r#"
heartbeat_timeout = "4s"
[[script]]
name = "setup"
run = "echo ready"
blocks_login = true
"#;

fn hello(token: &str) -> Hello {
    Hello {
        token: token.into(),
        agent_version: "test".into(),
        instance: 42,
        sent_at_ms: tether_shared::now_ms(),
        hostname: "test".into(),
        ssh_host_key: None,
    }
}

/// Opens a raw tunnel connection the way an agent would, without being one.
async fn raw_connect(c: &Coordinator) -> (quinn::Endpoint, quinn::Connection) {
    raw_connect_from(c, "127.0.0.1").await.unwrap()
}

/// [`raw_connect`] from `local`, any address of 127.0.0.0/8 (all on Linux's loopback).
async fn raw_connect_from(
    c: &Coordinator,
    local: &str,
) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = std::fs::read(c.ca_path()).unwrap();
    let config = client_config(CaPin::from_pem(&pem, "ca.pem").unwrap()).unwrap();
    let mut endpoint = quinn::Endpoint::client(format!("{local}:0").parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let conn = endpoint.connect(c.agent_addr().parse().unwrap(), SERVER_NAME).unwrap().await?;
    Ok((endpoint, conn))
}

async fn read_reply(recv: &mut quinn::RecvStream) -> HelloReply {
    let mut buf = Vec::new();
    assert!(tether_shared::io::read_payload(recv, &mut buf).await.unwrap(), "a reply frame");
    frame::decode(&buf).unwrap()
}

fn assert_still_running(c: &Coordinator, name: &str) {
    let w = c.show(name);
    assert_eq!(w["status"], "running", "{name} kept running: {w}");
}

#[test]
fn bad_tokens_versions_and_frames_are_refused_while_others_keep_running() {
    let c = Coordinator::start();
    let _good = external(&c, "good", HEALTHY);
    c.wait_for("good", "running", LONG);

    // A wrong token: the agent says why and exits; nothing changes on the coordinator.
    let before = c.json(&["workspace", "list"]);
    let mut bad = Agent::start(
        &c,
        "tether_agent_0000000000000000000000000000000000000000000000000000000000000000",
        &c.data_dir().join("agent-bad"),
    );
    let status = bad.child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "a rejected agent exits with status 2");
    let log = bad.log_text();
    assert!(log.contains("agent token is not valid"), "agent log names the problem:\n{log}");
    let after = c.json(&["workspace", "list"]);
    assert_eq!(before.as_array().unwrap().len(), after.as_array().unwrap().len());
    assert_still_running(&c, "good");

    // A data directory it cannot create is bad configuration too: status 2 (systemd does not
    // restart it), and the cause said once.
    let not_a_dir = c.data_dir().join("agent-file");
    std::fs::write(&not_a_dir, "").unwrap();
    let mut stuck = Agent::command(&c, "tether_agent_0", &c.data_dir().join("agent-cwd"), &[]);
    let out = stuck.env("TETHER_AGENT_DATA_DIR", &not_a_dir).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{log}");
    // The file in the way is named, rather than mkdir's "File exists".
    let said = format!("data directory {0}: {0} is not a directory", not_a_dir.display());
    assert_eq!(log.matches("is not a directory").count(), 1, "the cause once: {log}");
    assert!(log.contains(&said), "{log}");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        // A protocol version this coordinator does not speak.
        let (_ep, conn) = raw_connect(&c).await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&frame::encode_versioned(PROTOCOL_VERSION + 98, &hello("whatever")).unwrap()).await.unwrap();
        match read_reply(&mut recv).await {
            HelloReply::Rejected { code, message } => {
                assert_eq!(code, RejectCode::VersionMismatch);
                assert!(
                    message.contains(&format!("agent speaks protocol version {}", PROTOCOL_VERSION + 98)),
                    "{message}"
                );
                assert!(message.contains(&format!("speaks version {PROTOCOL_VERSION}")), "{message}");
                let fetch = format!("`curl -fsSL {}/agent/init.sh | sh` fetches and starts it", c.https_url());
                assert!(message.contains(&fetch), "the refusal says where the matching agent is: {message}");
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        conn.close(0u32.into(), b"done");

        // A frame header announcing 16 MiB: the connection is closed with the limit named.
        let (_ep, conn) = raw_connect(&c).await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&(16u32 * 1024 * 1024).to_be_bytes()).await.unwrap();
        let err = conn.closed().await;
        let text = err.to_string();
        assert!(text.contains("over the limit of 1048576 bytes"), "close reason names the limit: {text}");

        // A hello announced at 1 MiB: within the frame limit, over the hello's own, refused before
        // anything is read or allocated for it.
        let (_ep, conn) = raw_connect(&c).await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&(1024u32 * 1024).to_be_bytes()).await.unwrap();
        let text = conn.closed().await.to_string();
        let limit = format!("frame of 1048576 bytes is over the limit of {} bytes", limits::MAX_HELLO_FRAME);
        assert!(text.contains(&limit), "close reason names the hello's limit: {text}");

        // A hello from a clock that cannot be: refused with the field named, before the token is looked at.
        let (_ep, conn) = raw_connect(&c).await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let bad_clock = Hello { sent_at_ms: i64::MIN, ..hello("whatever") };
        send.write_all(&frame::encode_versioned(PROTOCOL_VERSION, &bad_clock).unwrap()).await.unwrap();
        match read_reply(&mut recv).await {
            HelloReply::Rejected { code, message } => {
                assert_eq!(code, RejectCode::Malformed);
                assert!(
                    message.starts_with("hello is not valid: sent_at_ms is -9223372036854775808, outside"),
                    "{message}"
                );
            }
            other => panic!("expected a rejection, got {other:?}"),
        }

        // Garbage where the hello should be.
        let (_ep, conn) = raw_connect(&c).await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut junk = vec![0, 0, 0, 12];
        junk.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        junk.extend_from_slice(&[0xff; 10]);
        send.write_all(&junk).await.unwrap();
        match read_reply(&mut recv).await {
            HelloReply::Rejected { code, message } => {
                assert_eq!(code, RejectCode::Malformed);
                assert!(message.starts_with("hello is not valid"), "{message}");
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    });
    assert_still_running(&c, "good");
    let log = std::fs::read_to_string(c.data_dir().join("coordinator.log")).unwrap();
    assert!(log.contains("protocol version mismatch") && log.contains("over the limit"), "refusals are logged");
    let w = c.wait_for("good", "running", LONG);
    assert_eq!(w["agent"]["connected"], true);
}

#[test]
fn a_coordinator_killed_and_restarted_gets_every_agent_back_losing_and_duplicating_nothing() {
    let mut c = Coordinator::start();
    // Two workspaces; one prints a numbered line every 50 ms across the restart.
    let chatty = r#"
[[script]]
name = "count"
run = "for i in $(seq 1 60); do echo line $i; sleep 0.05; done"
blocks_login = true
"#;
    let _a = external(&c, "alpha", chatty);
    let _b = external(&c, "beta", "[[script]]\nname = \"setup\"\nrun = \"true\"\n");
    c.wait_for("beta", "running", LONG);
    // Kill the coordinator while alpha's script is still printing.
    c.restart();
    let a = c.wait_for("alpha", "running,unhealthy", LONG);
    assert_eq!(a["status"], "running", "{a}");
    c.wait_for("beta", "running", LONG);

    let lines: Vec<String> = c.logs("alpha").into_iter().filter(|(s, _)| s == "count").map(|(_, l)| l).collect();
    let want: Vec<String> = (1..=60).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, want, "every log line exactly once, in order");
    let spans = c.timings("alpha");
    assert_eq!(spans.iter().filter(|s| s["stage"] == "script").count(), 1, "one span per script: {spans:?}");
    span(&spans, "agent", "ready");

    for name in ["alpha", "beta"] {
        let history = c.show(name)["history"].as_array().unwrap().clone();
        assert!(
            history.iter().all(|t| t["to"] != "unhealthy"),
            "{name} never showed unhealthy across the restart: {history:?}"
        );
    }
}

#[test]
fn a_coordinator_stopped_with_sigterm_sends_agents_away_with_jitter_and_gets_them_back_without_an_unhealthy() {
    let mut c = Coordinator::start();
    let template = "heartbeat_timeout = \"15s\"\n[[script]]\nname = \"setup\"\nrun = \"true\"\n";
    let agents: Vec<Agent> = ["one", "two", "three"].iter().map(|n| external(&c, n, template)).collect();
    for name in ["one", "two", "three"] {
        c.wait_for(name, "running", LONG);
    }

    let status = c.terminate();
    assert!(status.success(), "tether serve exits 0 on SIGTERM: {status}\n{}", c.log_tail());
    // A clean stop takes its coordinator.json along: the CLI then says no coordinator runs there.
    assert!(!c.data_dir().join("coordinator.json").exists());
    let err = c.fails(&["workspace", "list"]);
    assert!(err.contains("no coordinator to talk to"), "{err}");
    let log = std::fs::read_to_string(c.data_dir().join("coordinator.log")).unwrap();
    assert!(log.contains("shutting down: asking agents to reconnect later"), "{}", c.log_tail());
    assert!(!log.contains("agents did not hang up in time"), "every agent hung up when asked: {}", c.log_tail());
    // Each agent was told to come back at a random moment within the coordinator's window, not
    // all at once and not on its own error backoff.
    let mut delays = Vec::new();
    for a in &agents {
        tether_tests::wait_until("the agent to hear the reconnect request", LONG, || {
            a.log_text().contains("coordinator asked the agent to reconnect")
        });
        let log = a.log_text();
        let line = log.lines().find(|l| l.contains("coordinator asked the agent to reconnect")).unwrap();
        let ms: u64 = line
            .split("delay_ms=")
            .nth(1)
            .and_then(|r| r.split(|ch: char| !ch.is_ascii_digit()).next())
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("no delay in {line}"));
        assert!(ms <= 10_000, "reconnect delay within the coordinator's 10 s window: {line}");
        delays.push(ms);
    }
    eprintln!("reconnect delays: {delays:?} ms");

    c.start_again();
    for name in ["one", "two", "three"] {
        tether_tests::wait_until(&format!("{name} running with its agent back"), LONG, || {
            let w = c.show(name);
            w["status"] == "running" && w["agent"]["connected"] == true
        });
        let history = c.show(name)["history"].as_array().unwrap().clone();
        assert!(
            history.iter().all(|t| t["to"] != "unhealthy"),
            "{name} never showed unhealthy across the restart: {history:?}"
        );
    }
    for a in &agents {
        assert!(!a.log_text().contains("connection to the coordinator lost"), "a clean handover: {}", a.log_text());
    }
}

/// The API port closes a connection whose request's headers never end (a "slowloris" client), as
/// the HTTPS port does, and keeps answering everyone else meanwhile.
#[test]
fn the_api_port_drops_a_client_that_never_finishes_its_request() {
    use std::io::{Read, Write};
    let c = Coordinator::start();
    let addr = c.api_url().trim_start_matches("http://").to_string();
    let mut slow = std::net::TcpStream::connect(&addr).expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: tether\r\n").expect("half a request");
    let mut other = std::net::TcpStream::connect(&addr).expect("connect");
    other.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").expect("request");
    other.set_read_timeout(Some(LONG)).expect("read timeout");
    let mut answer = String::new();
    other.read_to_string(&mut answer).expect("answer");
    assert!(
        answer.starts_with("HTTP/1.0 200") && answer.ends_with("\r\n\r\nok\n"),
        "others are served meanwhile: {answer}"
    );
    slow.set_read_timeout(Some(LONG)).expect("read timeout");
    let opened = std::time::Instant::now();
    let mut got = Vec::new();
    let _ = slow.read_to_end(&mut got);
    assert!(got.is_empty(), "closed without an answer: {}", String::from_utf8_lossy(&got));
    assert!(opened.elapsed() < LONG, "closed by the server, after {:?}", opened.elapsed());
}

/// A client that asks for the agent download and then stops reading is cut off once a write has
/// waited 60 s for it (as nginx's `send_timeout`), so such clients cannot keep their places on the
/// API port for good; others are served meanwhile, and the metrics say why.
#[test]
fn the_api_port_drops_a_client_that_stops_reading() {
    use std::io::{Read, Write};
    let c = Coordinator::start();
    let addr = c.api_url().trim_start_matches("http://").to_string();
    let stalled = |addr: &str| {
        let (code, body) = tether_tests::get(addr, "/metrics").expect("GET /metrics");
        assert_eq!(code, 200, "{body}");
        body.lines()
            .find(|l| l.starts_with(r#"tether_http_connections_dropped_total{listener="http",reason="write_stalled"}"#))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(stalled(&addr), 0, "none yet");
    let mut slow = std::net::TcpStream::connect(&addr).expect("connect");
    slow.write_all(b"GET /agent/tether-agent HTTP/1.1\r\nHost: tether\r\n\r\n").expect("request");
    // The head of the answer, then nothing more is read until the coordinator gives up.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    slow.set_read_timeout(Some(LONG)).expect("read timeout");
    while !head.ends_with(b"\r\n\r\n") {
        slow.read_exact(&mut byte).expect("the answer's head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().ok()))
        .flatten()
        .expect("a content length");
    let (code, _) = tether_tests::get(&addr, "/healthz").expect("GET /healthz");
    assert_eq!(code, 200, "others are served meanwhile");
    tether_tests::wait_until("the coordinator to cut off the client that stopped reading", LONG * 2, || {
        stalled(&addr) == 1
    });
    let mut body = Vec::new();
    let _ = slow.read_to_end(&mut body);
    assert!(body.len() < length, "the connection was closed part way: {} of {length} bytes arrived", body.len());
}

/// Connections that have not said hello hold no agent's place: with `--max-agents 2`, 70 silent
/// connections do not keep a real agent out, and each is closed at the hello deadline. Past 64 of
/// them, new ones (the real agent's too) first prove their address with a QUIC Retry.
#[test]
fn silent_connections_take_no_agents_place_and_are_closed_at_the_hello_deadline() {
    let c = Coordinator::start_with(&["--max-agents", "2"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut silent = Vec::new();
    let opened = std::time::Instant::now();
    rt.block_on(async {
        for _ in 0..70 {
            silent.push(raw_connect(&c).await);
        }
    });
    let _real = external(&c, "real", HEALTHY);
    c.wait_for("real", "running", LONG);
    rt.block_on(async {
        // The agent got in while all of them were open: none is closed before its ten seconds
        // (each counts from its own accept, after `opened`), whatever the agent's arrival did.
        for (_, conn) in &silent {
            let closed = tokio::time::timeout(LONG, conn.closed()).await.expect("closed at the hello deadline");
            assert!(
                matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
                "the coordinator closed it: {closed}"
            );
            assert!(opened.elapsed() >= std::time::Duration::from_secs(9), "closed before the hello deadline");
        }
    });
    assert_still_running(&c, "real");
}

/// One address holds at most 256 of the places of connections that have not said hello (a NAT in
/// front of many agents that reconnect together still gets that many): the 257th from it is
/// refused, while another address, and a real agent, still get in.
#[test]
fn one_address_holds_at_most_256_pre_hello_places_and_others_still_get_in() {
    let c = Coordinator::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let opened = std::time::Instant::now();
    let held = rt.block_on(async {
        let mut held = Vec::new();
        for i in 0..256 {
            held.push(raw_connect_from(&c, "127.0.0.2").await.unwrap_or_else(|e| panic!("connection {i}: {e}")));
        }
        held
    });
    let refused = rt.block_on(raw_connect_from(&c, "127.0.0.2"));
    // The places are held until the hello deadline, ten seconds from each accept: the refusal
    // only means something if it came before the first of them ran out.
    let took = opened.elapsed();
    assert!(took < std::time::Duration::from_secs(9), "opening 256 connections took {took:?}");
    assert!(refused.is_err(), "a 257th connection from 127.0.0.2 was accepted");
    let other = rt.block_on(raw_connect_from(&c, "127.0.0.3"));
    assert!(other.is_ok(), "another address is refused: {:?}", other.err());
    let _real = external(&c, "real", HEALTHY);
    c.wait_for("real", "running", LONG);
    let log = std::fs::read_to_string(c.data_dir().join("coordinator.log")).unwrap();
    assert!(
        log.contains("refusing agent connection: 256 connections from 127.0.0.2 are waiting to say hello"),
        "{}",
        c.log_tail()
    );
    drop(held);
}

#[test]
fn a_coordinator_whose_log_reader_died_keeps_working_and_the_cli_ends_quietly_on_a_closed_pipe() {
    // Every log line now fails to be written. It used to panic the task that logged: API requests
    // ended with no answer, and a start stayed `pending` for ever, while /readyz said ready.
    let mut c = Coordinator::start_with_lost_log();
    let created = c.create(
        "dev",
        "provisioner = \"process\"\n[[script]]\nname = \"setup\"\nrun = \"echo ready\"\n",
        &["--start"],
    );
    assert_eq!(created["name"], "dev");
    c.wait_for("dev", "running", LONG);
    let external = c.json(&["workspace", "create", "ext"]);
    assert!(external["agent_token"].as_str().is_some_and(|t| t.starts_with("tether_agent_")), "{external}");
    c.ok(&["workspace", "stop", "dev", "--wait"]);
    assert_eq!(c.show("dev")["status"], "stopped");

    // The CLI's output going to a reader that left (`| head`): it ends quietly, as Unix tools do,
    // instead of panicking with a backtrace.
    let mut list = c
        .cli_command(&["workspace", "list"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(list.stdout.take());
    let out = list.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains("panicked"), "{said}");
    use std::os::unix::process::ExitStatusExt;
    assert!(
        out.status.success() || out.status.signal() == Some(13),
        "SIGPIPE or a clean exit: {:?} {said}",
        out.status
    );

    // SIGTERM: a clean exit, which removes coordinator.json.
    assert!(c.terminate().success());
    assert!(!c.data_dir().join("coordinator.json").exists());
}

#[test]
fn a_wait_goes_on_across_a_coordinator_restart() {
    // `start --wait` and `workspace wait` in scripts must not fail because ops restarted the
    // coordinator (an upgrade) meanwhile: the wait goes on once it is back.
    use std::io::BufRead;
    let mut c = Coordinator::start();
    let token = c.create("ext", HEALTHY, &[])["agent_token"].as_str().unwrap().to_string();
    let mut wait = c
        .cli_command(&["workspace", "wait", "ext", "--for", "running", "--timeout", "180s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = |from: Box<dyn std::io::Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(from).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        rx
    };
    let said_rx = lines(Box::new(wait.stderr.take().unwrap()));
    // And `logs --follow`, which has had its first answer (the build it follows) and polls again.
    let mut follow = c
        .cli_command(&["workspace", "logs", "ext", "--follow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let followed = lines(Box::new(follow.stdout.take().unwrap()));
    let follow_said = lines(Box::new(follow.stderr.take().unwrap()));
    // Both end with the test, whatever happens: the follower would otherwise wait for a coordinator
    // that never comes back.
    struct Reaped(std::process::Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let (mut wait, follow) = (Reaped(wait), Reaped(follow));
    // Their long polls are open (each has a TCP connection established), then the coordinator goes,
    // without waiting out the polls: they are answered at once.
    tether_tests::wait_until("the long polls to be open", LONG, || {
        established_tcp(wait.0.id()) && established_tcp(follow.0.id())
    });
    assert!(c.terminate().success());
    let log = std::fs::read_to_string(c.data_dir().join("coordinator.log")).unwrap();
    assert!(!log.contains("did not finish in time"), "the shutdown waited on a long poll:\n{log}");
    // Down until each says it noticed, whether its request was answered, cut off or refused.
    for (who, rx) in [("the wait", &said_rx), ("the follower", &follow_said)] {
        let said = rx.recv_timeout(LONG).unwrap_or_else(|_| panic!("{who} says the coordinator is gone"));
        assert!(
            (said.contains("the coordinator is shutting down") || said.contains("cannot reach the coordinator"))
                && said.ends_with("waiting for it to come back"),
            "{who}: {said}"
        );
    }
    c.start_again();
    let _agent = Agent::start(&c, &token, &c.data_dir().join("agent-ext"));
    let line = followed.recv_timeout(LONG).expect("the follower prints the script's line after the restart");
    assert!(line.ends_with("[setup] ready"), "{line}");
    drop(follow);
    let mut status = None;
    tether_tests::wait_until("the wait to end", LONG, || {
        status = wait.0.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "{:?}", said_rx.try_iter().collect::<Vec<_>>());
    let mut out = String::new();
    std::io::Read::read_to_string(&mut wait.0.stdout.take().unwrap(), &mut out).unwrap();
    assert!(out.contains("running"), "{out}");
}

/// Whether process `pid` holds an established TCP connection (from /proc: its sockets' inodes
/// against the kernel's table).
fn established_tcp(pid: u32) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    let inodes: Vec<String> = fds
        .filter_map(|f| std::fs::read_link(f.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table).unwrap_or_default().lines().skip(1).any(|row| {
            let cols: Vec<&str> = row.split_whitespace().collect();
            cols.len() > 9 && cols[3] == "01" && inodes.iter().any(|i| i == cols[9])
        })
    })
}

#[test]
fn every_api_error_is_json_with_a_sentence() {
    let c = Coordinator::start();
    let token = std::fs::read_to_string(c.data_dir().join("admin-token")).unwrap().trim().to_string();
    let curl = |args: &[&str]| -> (u16, serde_json::Value) {
        let out = std::process::Command::new("curl")
            .args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-H", &format!("authorization: bearer {token}")])
            .args(args)
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?} for {args:?}"));
        (code.parse().unwrap(), json)
    };
    let url = |p: &str| format!("{}/api/v1{p}", c.api_url());
    // The scheme's case does not matter: this lowercase `bearer` works.
    let (code, list) = curl(&[&url("/workspaces")]);
    assert_eq!((code, list.is_array()), (200, true), "{list}");
    let cases: [(&[&str], u16, &str); 5] = [
        (&["-X", "POST", "-H", "content-type: text/plain", "-d", "x"], 415, "Content-Type"),
        (
            &["-X", "POST", "-H", "content-type: application/json", "-d", r#"{"name":"a","bogus":1}"#],
            422,
            "unknown field",
        ),
        (&["-X", "DELETE"], 405, "does not take that method"),
        (&["-X", "POST", "-H", "content-type: application/json", "--data-binary", "@BIG"], 413, "over the API's limit"),
        (&["-X", "GET", "--path-as-is"], 404, "no such API route"),
    ];
    let big = c.data_dir().join("big.json");
    std::fs::write(&big, format!(r#"{{"name":"big","template":"{}"}}"#, "x".repeat(300 * 1024))).unwrap();
    for (args, want, says) in cases {
        let path = match want {
            405 => url("/status-counts"),
            404 => url("/no/such/route"),
            _ => url("/workspaces"),
        };
        let big_arg = format!("@{}", big.display());
        let args: Vec<&str> = args.iter().map(|a| if *a == "@BIG" { big_arg.as_str() } else { a }).collect();
        let mut all = args.clone();
        all.push(&path);
        let (code, body) = curl(&all);
        assert_eq!(code, want, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains(says)), "{want}: {body}");
    }
    // An SSH connection's end reason is asked for by its ticket alone: one that is not a ticket is
    // refused as such, one unknown (or whose connection ended on its own) is a 404 that says so.
    let (code, body) = curl(&[&url(&format!("/ssh/ended/{}", "x".repeat(5000)))]);
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("not an SSH connection's ticket"), "{body}");
    let (code, body) = curl(&[&url(&format!("/ssh/ended/tether_ssh_end_{}", "ab".repeat(32)))]);
    assert_eq!(code, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no reason is kept for that connection"), "{body}");
    // Values out of range are refused, as the CLI refuses them, not quietly clamped.
    let (code, body) = curl(&[&url("/audit?limit=0")]);
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("between 1 and 10000"), "{body}");
    // A user's keys as authorized_keys text or, as JSON clients tend to send them, a list of lines;
    // anything else is refused with what is expected.
    let key = c.data_dir().join("listed");
    tether_tests::ssh::keygen(&key, "listed");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let listed = serde_json::json!({ "name": "listed", "ssh_keys": [public.trim()] }).to_string();
    let post = |body: &str| curl(&["-X", "POST", "-H", "content-type: application/json", "-d", body, &url("/users")]);
    let (code, body) = post(&listed);
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["user"]["keys"].as_array().map(Vec::len), Some(1), "{body}");
    let (code, body) = post(r#"{"name": "numbered", "ssh_keys": 7}"#);
    assert_eq!(code, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("a string (authorized_keys text) or a list of strings"), "{body}");
    let (code, body) = curl(&[&url("/workspaces/any/logs?limit=0")]);
    assert_eq!(code, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("limit 0: it must be between 1 and 10000"), "{body}");
    // A workspace without a template is external, over the API as with the CLI.
    let (code, body) =
        curl(&["-X", "POST", "-H", "content-type: application/json", "-d", r#"{"name":"bare"}"#, &url("/workspaces")]);
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["provisioner"], "external", "{body}");
    assert!(body["agent_token"].is_string(), "{body}");
    // The CLI shows the sentence, not a bare status.
    std::fs::write(c.data_dir().join("big.toml"), format!("# {}\n", "x".repeat(300 * 1024))).unwrap();
    let said = c.fails(&["workspace", "create", "big", "--template", c.data_dir().join("big.toml").to_str().unwrap()]);
    assert!(said.contains("big.toml is 307203 bytes, over the limit of 262144 (256 KiB)"), "{said}");
    // A template the coordinator refuses: the error names the file.
    std::fs::write(c.data_dir().join("bad.toml"), "x = \n").unwrap();
    let said = c.fails(&["workspace", "create", "bad", "--template", c.data_dir().join("bad.toml").to_str().unwrap()]);
    assert!(said.contains("bad.toml: TOML parse error at line 1"), "{said}");
    // Several problems: every one, one per line.
    std::fs::write(c.data_dir().join("two.toml"), "connection_timeout = \"0s\"\nheartbeat_timeout = \"xx\"\n").unwrap();
    let said = c.fails(&["workspace", "create", "two", "--template", c.data_dir().join("two.toml").to_str().unwrap()]);
    assert!(
        said.contains(
            "two.toml: 2 problems:\n  connection_timeout must be more than zero\n  heartbeat_timeout 'xx' is not"
        ),
        "{said}"
    );
}
