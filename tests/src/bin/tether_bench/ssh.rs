//! `tether-bench ssh`: one OpenSSH client over three paths in the same run, (a) straight to a local
//! `sshd`, (b) `ssh -J` through one local `sshd` to another, (c) `ssh -J` through the coordinator's
//! SSH front door to a workspace's agent. Measures bulk throughput, connection setup and echo
//! latency through a remote PTY, records what each hop negotiated, and reports Tether as ratios to
//! (b). The OpenSSH paths run twice: with the client's default ciphers, and with one cipher forced
//! on every hop so Tether can be compared like for like.

use crate::coordinator::sibling_binary;
use crate::host;
use crate::relay::{self, Relay};
use crate::report::{median_max, Block};
use crate::swarm::round;
use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitid, Id as NixId, WaitPidFlag};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";
const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
/// The Tether user and workspace the benchmark creates.
const TETHER_USER: &str = "bench";
const TETHER_WORKSPACE: &str = "bench";
const TETHER_TEMPLATE: &str = "provisioner = \"process\"\n";
/// Longest an `sshd` may take to listen, or the coordinator to write `coordinator.json`.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest one `tether` CLI call may take (the workspace wait included).
const CLI_TIMEOUT: Duration = Duration::from_secs(150);
/// Longest one `ssh HOST true` may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Slowest bulk rate tolerated before a run counts as hung, in MiB/s.
const BULK_FLOOR_MIB_S: u64 = 5;
/// Round trips not counted, while the session settles.
const ECHO_WARMUP: usize = 20;
/// Longest the lines read while waiting for a remote "ready" may get.
const READY_LIMIT: usize = 64 * 1024;

#[derive(Debug, Clone, clap::Args)]
pub struct SshArgs {
    /// MiB sent through `cat > /dev/null` in each bulk run.
    #[arg(long, default_value_t = 1024)]
    pub bulk_mib: u64,
    /// Bulk runs per path; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub bulk_runs: usize,
    /// `ssh HOST true` runs per path; median and p90 are reported.
    #[arg(long, default_value_t = 20)]
    pub setup_runs: usize,
    /// One-byte round trips through a remote PTY per path; p50 and p99 are reported. With 5000 the
    /// p99 is the 50th slowest trip, not (as with 500) the 5th, which one stray timer decides.
    #[arg(long, default_value_t = 5000)]
    pub echo_samples: usize,
    /// The cipher forced on every hop of the second OpenSSH baseline.
    #[arg(long, default_value = "aes128-gcm@openssh.com")]
    pub cipher: String,
    /// Measure the OpenSSH baselines only.
    #[arg(long)]
    pub skip_tether: bool,
    /// TETHER_LOG for the coordinator.
    #[arg(long, default_value = "info")]
    pub coordinator_log: String,
    /// Keep the temporary directory (keys, configs, sshd and coordinator logs).
    #[arg(long)]
    pub keep: bool,
    /// A second build's `tether` binary (its `tether-agent` beside it), measured as path c2 in the
    /// same run, interleaved with the others: an A/B comparison of two builds on equal terms.
    #[arg(long, value_name = "TETHER")]
    pub compare_with: Option<PathBuf>,
    /// Puts the workspace this many milliseconds of round trip away: every path reaches it through a
    /// delay line on 127.0.0.1, half the time each way (OpenSSH's target `sshd` behind a TCP relay,
    /// the agent's QUIC connection to the coordinator through a UDP relay). Every echo trip then
    /// takes a round trip: pass fewer --echo-samples with it.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub rtt_ms: u64,
}

impl SshArgs {
    /// The delay each way of the relays in front of the workspace, if any.
    fn one_way(&self) -> Option<Duration> {
        (self.rtt_ms > 0).then(|| Duration::from_micros(self.rtt_ms * 500))
    }
}

/// One way from the client to a shell: an ssh config file and the host to name in it.
#[derive(Debug, Clone)]
struct Route {
    key: &'static str,
    about: &'static str,
    config: PathBuf,
    host: String,
    /// Where the client's stderr goes, one file per run, overwritten.
    log: PathBuf,
    /// Long-lived server processes this route goes through (the coordinator and the agent); the
    /// ones a connection forks are found when it opens.
    servers: Vec<u32>,
}

impl Route {
    /// The client with the options every path shares. `-o` options given here bind the last hop
    /// only; a jump hop reads them from the config file.
    fn ssh(&self, flags: &[&str], remote: &str) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-F")
            .arg(&self.config)
            .args(["-o", "BatchMode=yes", "-o", "ControlMaster=no", "-o", "ControlPath=none"])
            .args(["-o", "Compression=no", "-e", "none"])
            .args(flags)
            .arg(&self.host)
            .arg(remote)
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        c
    }
}

/// Kills a child that outlives its deadline, so every blocking read and write on its pipes ends.
/// It must be disarmed before the child is reaped, while the pid it may signal is still that child's.
struct Watchdog {
    cancel: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<bool>>,
}

impl Watchdog {
    fn arm(pid: u32, timeout: Duration) -> Watchdog {
        let (cancel, cancelled) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || match cancelled.recv_timeout(timeout) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                true
            }
            _ => false,
        });
        Watchdog { cancel: Some(cancel), thread: Some(thread) }
    }

    /// Stops it; true if it had fired.
    fn disarm(&mut self) -> bool {
        drop(self.cancel.take());
        self.thread.take().is_some_and(|t| t.join().unwrap_or(false))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// A running `ssh` client with a deadline; killed and reaped when dropped.
struct SshRun {
    child: Child,
    watchdog: Watchdog,
    timeout: Duration,
    what: String,
    log: PathBuf,
    reaped: bool,
}

impl SshRun {
    fn spawn(route: &Route, mut cmd: Command, what: &str, timeout: Duration) -> anyhow::Result<SshRun> {
        let log = std::fs::File::create(&route.log).with_context(|| format!("creating {}", route.log.display()))?;
        cmd.stderr(log);
        let child = cmd.spawn().context("starting ssh")?;
        let watchdog = Watchdog::arm(child.id(), timeout);
        Ok(SshRun {
            child,
            watchdog,
            timeout,
            what: format!("{what} ({})", route.key),
            log: route.log.clone(),
            reaped: false,
        })
    }

    fn stdout(&mut self) -> anyhow::Result<ChildStdout> {
        self.child.stdout.take().ok_or_else(|| anyhow!("{}: no stdout pipe", self.what))
    }

    /// Waits for the exit and expects success; an error says why, with the client's last words.
    fn finish(&mut self) -> anyhow::Result<()> {
        // Waits without reaping, so the watchdog stays armed until the child has exited and the pid
        // it would signal cannot have been reused.
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
        let pid = Pid::from_raw(self.child.id() as i32);
        while matches!(waitid(NixId::Pid(pid), flags), Err(nix::errno::Errno::EINTR)) {}
        let fired = self.watchdog.disarm();
        let status = self.child.wait().with_context(|| format!("{}: waiting for ssh", self.what))?;
        self.reaped = true;
        if fired {
            bail!("{}: no answer within {} s\n{}", self.what, self.timeout.as_secs(), self.log_tail());
        }
        check_status(&self.what, status, &self.log_tail())
    }

    fn log_tail(&self) -> String {
        tail(&self.log, 15)
    }
}

impl Drop for SshRun {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            self.watchdog.disarm();
            let _ = self.child.wait();
        }
    }
}

fn check_status(what: &str, status: ExitStatus, log: &str) -> anyhow::Result<()> {
    if !status.success() {
        bail!("{what}: ssh exited with {status}\n--- ssh stderr ---\n{log}");
    }
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Reads until a line `ready` arrives; what came before it (a remote PTY's echo) is dropped.
fn wait_ready(out: &mut ChildStdout, what: &str) -> anyhow::Result<()> {
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match out.read(&mut byte) {
            Ok(0) => bail!("{what}: the session ended before the remote side was ready (got {:?})", lossy(&seen)),
            Ok(_) => seen.push(byte[0]),
            Err(e) => bail!("{what}: reading from ssh: {e}"),
        }
        if seen.ends_with(b"ready\n") || seen.ends_with(b"ready\r\n") {
            return Ok(());
        }
        if seen.len() > READY_LIMIT {
            bail!("{what}: no 'ready' in the first {READY_LIMIT} bytes from the remote side");
        }
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(200)..]).into_owned()
}

/// What one hop negotiated, from the client's `-v` output.
#[derive(Debug, Clone, Default)]
struct Hop {
    kex: String,
    host_key: String,
    cipher_c2s: String,
    cipher_s2c: String,
    mac_s2c: String,
}

impl Hop {
    fn json(&self) -> Value {
        json!({
            "kex": self.kex,
            "host_key": self.host_key,
            "cipher_client_to_server": self.cipher_c2s,
            "cipher_server_to_client": self.cipher_s2c,
            "mac_server_to_client": self.mac_s2c,
        })
    }

    fn brief(&self) -> String {
        let cipher = if self.cipher_c2s == self.cipher_s2c {
            self.cipher_s2c.clone()
        } else {
            format!("{} up, {} down", self.cipher_c2s, self.cipher_s2c)
        };
        format!("{cipher}, kex {}, host key {}", self.kex, self.host_key)
    }
}

/// Hops in the order the client negotiated them: a jump hop finishes before the hop it carries
/// starts, so with ProxyJump the last one is the end-to-end session.
fn parse_hops(verbose: &str) -> Vec<Hop> {
    let mut hops: Vec<Hop> = Vec::new();
    for line in verbose.lines() {
        let Some(rest) = line.trim_end().strip_prefix("debug1: kex: ") else { continue };
        if let Some(v) = rest.strip_prefix("algorithm: ") {
            hops.push(Hop { kex: v.to_string(), ..Hop::default() });
            continue;
        }
        let Some(hop) = hops.last_mut() else { continue };
        let cipher_mac = |v: &str| {
            let (cipher, more) = v.split_once(" MAC: ").unwrap_or((v, ""));
            let mac = more.split_once(" compression:").map_or(more, |(m, _)| m);
            (cipher.to_string(), mac.to_string())
        };
        if let Some(v) = rest.strip_prefix("host key algorithm: ") {
            hop.host_key = v.to_string();
        } else if let Some(v) = rest.strip_prefix("server->client cipher: ") {
            (hop.cipher_s2c, hop.mac_s2c) = cipher_mac(v);
        } else if let Some(v) = rest.strip_prefix("client->server cipher: ") {
            hop.cipher_c2s = cipher_mac(v).0;
        }
    }
    hops
}

/// `ssh -v HOST true` once: what each hop negotiated. Also the first connection of the run, which
/// records the baselines' host keys.
fn negotiated(route: &Route) -> anyhow::Result<Vec<Hop>> {
    SshRun::spawn(route, route.ssh(&["-v"], "true"), "ssh -v true", CONNECT_TIMEOUT)?.finish()?;
    let hops = parse_hops(&std::fs::read_to_string(&route.log).unwrap_or_default());
    if hops.is_empty() {
        bail!("ssh -v ({}) printed no 'kex:' lines\n{}", route.key, tail(&route.log, 15));
    }
    Ok(hops)
}

/// `ssh HOST true`, from spawn to exit, in ms.
fn setup_once(route: &Route) -> anyhow::Result<f64> {
    let cmd = route.ssh(&[], "true");
    let started = Instant::now();
    SshRun::spawn(route, cmd, "ssh true", CONNECT_TIMEOUT)?.finish()?;
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

/// Longest a bulk run of `mib` MiB may take.
fn bulk_timeout(mib: u64, slow_link: bool) -> Duration {
    let floor = if slow_link { 1 } else { BULK_FLOOR_MIB_S };
    CONNECT_TIMEOUT + Duration::from_secs(mib / floor)
}

/// `mib` MiB of zeros into `cat > /dev/null` on the remote side, timed from the remote side being
/// ready to the session's end (so connection setup is not counted), in MiB/s.
fn bulk_once(route: &Route, mib: u64, slow_link: bool) -> anyhow::Result<f64> {
    let mut cmd = route.ssh(&[], "echo ready && exec cat > /dev/null");
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let timeout = bulk_timeout(mib, slow_link);
    let what = format!("bulk {mib} MiB");
    let mut run = SshRun::spawn(route, cmd, &what, timeout)?;
    let mut out = run.stdout()?;
    let mut input = run.child.stdin.take().ok_or_else(|| anyhow!("{what}: no stdin pipe"))?;
    // (On an error here `run` is dropped, which kills the client rather than wait for it.)
    wait_ready(&mut out, &what)?;
    let chunk = vec![0u8; 1 << 20];
    let started = Instant::now();
    let wrote = (0..mib).try_for_each(|_| input.write_all(&chunk));
    drop(input);
    // The remote `cat` has read everything when the session ends.
    let _ = std::io::copy(&mut out, &mut std::io::sink());
    let elapsed = started.elapsed();
    run.finish()?;
    wrote.with_context(|| format!("{what}: writing to ssh"))?;
    Ok(mib as f64 / elapsed.as_secs_f64())
}

/// `mib` MiB of zeros from `head -c` on the remote side, timed from the remote side being ready to
/// the last byte read, in MiB/s: the download direction (`scp` or `rsync` from the workspace).
fn bulk_down_once(route: &Route, mib: u64, slow_link: bool) -> anyhow::Result<f64> {
    let bytes = mib << 20;
    let mut cmd = route.ssh(&[], &format!("echo ready && exec head -c {bytes} /dev/zero"));
    cmd.stdout(Stdio::piped());
    let what = format!("bulk down {mib} MiB");
    let mut run = SshRun::spawn(route, cmd, &what, bulk_timeout(mib, slow_link))?;
    let mut out = run.stdout()?;
    wait_ready(&mut out, &what)?;
    let started = Instant::now();
    let read = std::io::copy(&mut out, &mut std::io::sink());
    let elapsed = started.elapsed();
    run.finish()?;
    let read = read.with_context(|| format!("{what}: reading from ssh"))?;
    if read != bytes {
        bail!("{what}: {read} bytes arrived, not {bytes}");
    }
    Ok(mib as f64 / elapsed.as_secs_f64())
}

/// One route's interactive session: `stty raw -echo` on a remote PTY, then `dd bs=1` echoing each
/// byte back as it arrives.
struct EchoSession {
    key: &'static str,
    run: SshRun,
    out: ChildStdout,
    input: ChildStdin,
    total: usize,
}

impl EchoSession {
    /// `per_trip`: how long one round of trips over every route may take.
    fn open(route: &Route, total: usize, per_trip: Duration) -> anyhow::Result<EchoSession> {
        // `dd bs=1` writes each byte as it reads it (`head` and `cat` may hold it in stdio's buffer
        // for a terminal), and exits after the last one, which ends the session.
        let remote = format!("stty raw -echo && echo ready && exec dd bs=1 count={total} status=none");
        let mut cmd = route.ssh(&["-tt"], &remote);
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let what = "echo through a PTY";
        // Every route's session stays open while the others take their turns.
        let timeout = CONNECT_TIMEOUT + per_trip * total as u32;
        let mut run = SshRun::spawn(route, cmd, what, timeout)?;
        let mut out = run.stdout()?;
        let input = run.child.stdin.take().ok_or_else(|| anyhow!("{what}: no stdin pipe"))?;
        wait_ready(&mut out, what)?;
        Ok(EchoSession { key: route.key, run, out, input, total })
    }

    /// Round trip `i`: microseconds from writing one byte to reading it back.
    fn trip(&mut self, i: usize) -> anyhow::Result<f64> {
        let sent = b'a' + (i % 26) as u8;
        let mut got = [0u8; 1];
        let started = Instant::now();
        let trip = self.input.write_all(&[sent]).and_then(|()| self.out.read_exact(&mut got));
        let elapsed = started.elapsed();
        if let Err(e) = trip {
            let _ = self.run.finish();
            bail!("echo through a PTY ({}): round trip {i} of {}: {e}", self.key, self.total);
        }
        if got[0] != sent {
            bail!("echo ({}): round trip {i} sent {:?} and got {:?} back", self.key, sent as char, got[0] as char);
        }
        Ok(elapsed.as_secs_f64() * 1e6)
    }

    fn close(mut self) -> anyhow::Result<()> {
        drop(self.input);
        let _ = std::io::copy(&mut self.out, &mut std::io::sink());
        self.run.finish()
    }
}

/// One route's echo figures.
struct Echo {
    /// Microseconds per round trip, warm-up left out.
    micros: Vec<f64>,
    /// CPU time the route's server side (every process between the client and the PTY: sshd's
    /// per-connection processes, or the coordinator and the agent, and the remote `dd`) spent per
    /// round trip, in microseconds; `None` where the kernel keeps no per-task run times.
    server_cpu_us: Option<f64>,
    /// The same split by process name (`tether`, `tether-agent`, `sshd x2`, `dd`), largest first.
    by_process: Vec<(String, f64)>,
}

/// Echo latency on every route at once, interleaved: one session per route, then round after round
/// one byte through each in turn, so that whatever else the machine does in a given second falls on
/// all routes alike. Also measures the CPU each route's server side spends per trip: on a machine
/// with few cores every process on the path takes its turn on a core, so that time is most of the
/// latency, and less noisy than it.
fn echo_interleaved(routes: &[Route], samples: usize, added_rtt: Duration) -> anyhow::Result<Vec<Echo>> {
    let total = ECHO_WARMUP + samples;
    let per_trip = Duration::from_millis(500) + added_rtt * routes.len() as u32;
    let mut sessions = Vec::with_capacity(routes.len());
    let mut servers = Vec::with_capacity(routes.len());
    for route in routes {
        let before = procfs::pids();
        let session = EchoSession::open(route, total, per_trip)?;
        // What the connection forked on the server side: the new processes that are not the client
        // (a jump's `ssh -W` is the client's child).
        let client = session.run.child.id();
        let mut pids: Vec<u32> =
            procfs::pids().difference(&before).copied().filter(|p| !procfs::descends_from(*p, client)).collect();
        sessions.push(session);
        pids.extend(&route.servers);
        servers.push(pids);
    }
    let started: Vec<_> = servers.iter().map(|pids| procfs::cpu_ns(pids)).collect();
    let names: Vec<std::collections::BTreeMap<u32, String>> = servers.iter().map(|pids| procfs::names(pids)).collect();
    let mut ended = Vec::new();
    let mut micros: Vec<Vec<f64>> = routes.iter().map(|_| Vec::with_capacity(samples)).collect();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..total {
        // Before the last round: its byte ends each remote `dd`, and with it the session's processes.
        if i + 1 == total {
            ended = servers.iter().map(|pids| procfs::cpu_ns(pids)).collect();
        }
        // Each round takes the routes in a new order (a fixed-seed shuffle), so that no route
        // mostly follows the same one (and whatever that one's processes still do after its byte is
        // back).
        for r in shuffled(&mut seed, sessions.len()) {
            let us = sessions[r].trip(i)?;
            if i >= ECHO_WARMUP {
                micros[r].push(us);
            }
        }
    }
    for session in sessions {
        session.close()?;
    }
    let echoes = micros
        .into_iter()
        .zip(started.iter().zip(&ended).zip(&names))
        .map(|(micros, ((start, end), names))| Echo {
            micros,
            server_cpu_us: procfs::spent_us(start, end, total - 1),
            by_process: procfs::spent_by_name(start, end, names, total - 1),
        })
        .collect();
    Ok(echoes)
}

/// `0..n` in an order drawn from `seed` (xorshift64, Fisher-Yates): the same sequence every run.
fn shuffled(seed: &mut u64, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for k in (1..n).rev() {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        order.swap(k, (*seed % (k as u64 + 1)) as usize);
    }
    order
}

/// Processes and their CPU time, from `/proc`.
mod procfs {
    use std::collections::{BTreeMap, BTreeSet};

    /// Every process on the machine.
    pub fn pids() -> BTreeSet<u32> {
        let Ok(dir) = std::fs::read_dir("/proc") else { return BTreeSet::new() };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
    }

    fn parent(pid: u32) -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The name in parentheses may hold spaces; the parent is the second field after it.
        stat.get(stat.rfind(')')? + 1..)?.split_whitespace().nth(1)?.parse().ok()
    }

    /// Whether `pid` is `ancestor` or one of its descendants (false once it has gone).
    pub fn descends_from(pid: u32, ancestor: u32) -> bool {
        let mut p = pid;
        for _ in 0..64 {
            if p == ancestor {
                return true;
            }
            match parent(p) {
                Some(next) if next != 0 && next != p => p = next,
                _ => return false,
            }
        }
        false
    }

    /// Nanoseconds each process's threads have run so far (`schedstat`), for those still there.
    pub fn cpu_ns(pids: &[u32]) -> BTreeMap<u32, u64> {
        pids.iter().filter_map(|pid| Some((*pid, process_ns(*pid)?))).collect()
    }

    fn process_ns(pid: u32) -> Option<u64> {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        let mut total = 0u64;
        let mut seen = false;
        for task in tasks.flatten() {
            // A thread that ended since the listing has no file left to read; what it ran
            // is gone with it, as it would be had it ended a moment earlier.
            let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
            total += text.split_whitespace().next()?.parse::<u64>().ok()?;
            seen = true;
        }
        seen.then_some(total)
    }

    /// Each process's name (`comm`), for those still there.
    pub fn names(pids: &[u32]) -> BTreeMap<u32, String> {
        pids.iter()
            .filter_map(|pid| {
                Some((*pid, std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?.trim().to_string()))
            })
            .collect()
    }

    /// [`spent_us`] summed by process name, largest first.
    pub fn spent_by_name(
        start: &BTreeMap<u32, u64>,
        end: &BTreeMap<u32, u64>,
        names: &BTreeMap<u32, String>,
        trips: usize,
    ) -> Vec<(String, f64)> {
        // Name -> (processes, nanoseconds).
        let mut by: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
        for (pid, a) in start {
            if let (Some(b), Some(name)) = (end.get(pid), names.get(pid)) {
                let entry = by.entry(name.as_str()).or_default();
                entry.0 += 1;
                entry.1 += b.saturating_sub(*a);
            }
        }
        let mut out: Vec<(String, f64)> = by
            .into_iter()
            .map(|(n, (count, ns))| {
                let name = if count > 1 { format!("{n} x{count}") } else { n.to_string() };
                (name, ns as f64 / 1e3 / trips.max(1) as f64)
            })
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        out
    }

    /// Microseconds per trip the processes present at both ends spent between them.
    pub fn spent_us(start: &BTreeMap<u32, u64>, end: &BTreeMap<u32, u64>, trips: usize) -> Option<f64> {
        if start.is_empty() || trips == 0 {
            return None;
        }
        let ns: u64 = start.iter().filter_map(|(pid, a)| Some(end.get(pid)?.saturating_sub(*a))).sum();
        Some(ns as f64 / 1e3 / trips as f64)
    }
}

/// A local OpenSSH `sshd` on 127.0.0.1, killed when dropped. Each connection it forked lives in
/// its own session and ends with its client, which every measurement ends first.
struct Sshd {
    child: Child,
}

impl Sshd {
    async fn start(dir: &Path, port: u16, authorized_keys: &Path, extra: &str) -> anyhow::Result<Sshd> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Privilege separation wants this directory to exist.
        std::fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        let host_key = dir.join("ssh_host_ed25519_key");
        keygen(&host_key, "bench sshd")?;
        let config = dir.join("sshd_config");
        let text = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
             StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\nPubkeyAuthentication yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nX11Forwarding no\nPrintMotd no\n\
             PrintLastLog no\nUseDNS no\nSubsystem sftp {SFTP_SERVER}\n{extra}",
            host_key.display(),
            authorized_keys.display(),
            dir.join("sshd.pid").display(),
        );
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let log_path = dir.join("sshd.log");
        let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {SSHD}"))?;
        let mut sshd = Sshd { child };
        let listening = format!("Server listening on 127.0.0.1 port {port}.");
        let deadline = Instant::now() + START_TIMEOUT;
        while !std::fs::read_to_string(&log_path).unwrap_or_default().contains(&listening) {
            if let Some(status) = sshd.child.try_wait()? {
                bail!("{SSHD} -f {} exited with {status}:\n{}", config.display(), tail(&log_path, 20));
            }
            if Instant::now() >= deadline {
                bail!(
                    "{SSHD} did not listen on port {port} within {} s:\n{}",
                    START_TIMEOUT.as_secs(),
                    tail(&log_path, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(sshd)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path, comment: &str) -> anyhow::Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen")?;
    if !out.status.success() {
        bail!("ssh-keygen -f {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Ports free right now on 127.0.0.1, all different (sshd cannot be told to pick one itself).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .context("finding a free port")?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// The OpenSSH side: a client key, a target `sshd`, a jump `sshd` and the client's config.
/// Field order is drop order: the servers go before their directory.
struct Lab {
    /// The delay line in front of the target, with --rtt-ms.
    _relay: Option<Relay>,
    _target: Sshd,
    _jump: Sshd,
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    key: PathBuf,
    config: PathBuf,
}

impl Lab {
    async fn start(cipher: &str, one_way: Option<Duration>) -> anyhow::Result<Lab> {
        let dir =
            tempfile::Builder::new().prefix("tether-bench-ssh-").tempdir().context("creating a temporary directory")?;
        let path = dir.path().to_path_buf();
        let key = path.join("id_ed25519");
        keygen(&key, "tether-bench")?;
        let public = key.with_extension("pub");
        let authorized = path.join("authorized_keys");
        std::fs::copy(&public, &authorized).with_context(|| format!("writing {}", authorized.display()))?;
        let ports = free_ports(2)?;
        let (target_port, jump_port) = (ports[0], ports[1]);
        // Sessions get an empty HOME, as a workspace's are: sshd sets SSH_CLIENT, so bash would
        // source the real home's ~/.bashrc and time its startup files along with SSH.
        let home = path.join("home");
        std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
        let session = format!("SetEnv HOME={}\n", home.display());
        let target = Sshd::start(&path.join("sshd-target"), target_port, &authorized, &session).await?;
        let jump_extra = format!("{session}AllowTcpForwarding yes\n");
        let jump = Sshd::start(&path.join("sshd-jump"), jump_port, &authorized, &jump_extra).await?;
        // With a delay line, every path to the target goes through it; the jump host stays near.
        let relay = match one_way {
            Some(d) => {
                Some(relay::tcp(([127, 0, 0, 1], target_port).into(), d).await.context("starting the TCP relay")?)
            }
            None => None,
        };
        let target_port = relay.as_ref().map_or(target_port, |r| r.addr.port());
        let config = path.join("ssh_config");
        let forced = format!("  Ciphers {cipher}\n");
        let host = |name: &str, port: u16, jump: Option<&str>, ciphers: &str| {
            let jump = jump.map(|j| format!("  ProxyJump {j}\n")).unwrap_or_default();
            format!("Host {name}\n  HostName 127.0.0.1\n  Port {port}\n{jump}{ciphers}")
        };
        let text = [
            host("a", target_port, None, ""),
            host("a-gcm", target_port, None, &forced),
            host("b-jump", jump_port, None, ""),
            host("b-jump-gcm", jump_port, None, &forced),
            host("b", target_port, Some("b-jump"), ""),
            host("b-gcm", target_port, Some("b-jump-gcm"), &forced),
            format!(
                "Host *\n  User root\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  \
                 GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking accept-new\n  BatchMode yes\n  \
                 ControlMaster no\n  ControlPath none\n  Compression no\n  ForwardAgent no\n",
                key.display(),
                path.join("known_hosts").display()
            ),
        ]
        .join("");
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        Ok(Lab { _relay: relay, _target: target, _jump: jump, dir: Some(dir), path, key, config })
    }

    fn route(&self, key: &'static str, about: &'static str) -> Route {
        Route {
            key,
            about,
            config: self.config.clone(),
            host: key.to_string(),
            log: self.path.join(format!("ssh-{key}.log")),
            servers: Vec::new(),
        }
    }

    fn keep(&mut self) -> &Path {
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
        &self.path
    }
}

/// The Tether side: `tether serve` with its SSH front door, one user, one running `process`
/// workspace, and the ssh config `tether config-ssh` wrote. Dropping it kills the coordinator and
/// the agent's process group (a `process` agent outlives its coordinator on purpose).
struct TetherSide {
    child: Child,
    /// The delay line between the agent and the coordinator, with --rtt-ms.
    _relay: Option<Relay>,
    data: PathBuf,
    binary: PathBuf,
    route: Route,
    front_door: String,
}

impl Drop for TetherSide {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = self.agent_pid() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

impl TetherSide {
    /// What the `tether` binary lacks for this benchmark, if anything.
    async fn missing(binary: &Path) -> anyhow::Result<Vec<&'static str>> {
        let help = |args: &'static [&'static str]| async move {
            let out = tokio::process::Command::new(binary).args(args).output().await;
            out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .with_context(|| format!("running {} {}", binary.display(), args.join(" ")))
        };
        let top = help(&["--help"]).await?;
        let serve = help(&["serve", "--help"]).await?;
        let has_command = |name: &str| top.lines().any(|l| l.trim_start().starts_with(&format!("{name} ")));
        let mut missing = Vec::new();
        if !serve.contains("--listen-ssh") {
            missing.push("`serve --listen-ssh`");
        }
        if !has_command("user") {
            missing.push("`user add`");
        }
        if !has_command("config-ssh") {
            missing.push("`config-ssh`");
        }
        Ok(missing)
    }

    /// Starts a coordinator with its data under `lab`, named `key` (the route's name).
    async fn start(
        binary: PathBuf,
        lab: &Lab,
        log_filter: &str,
        key: &'static str,
        one_way: Option<Duration>,
    ) -> anyhow::Result<TetherSide> {
        let dir = if key == "c" { String::new() } else { format!("-{key}") };
        let data = lab.path.join(format!("tether{dir}"));
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let log_path = data.join("coordinator.log");
        let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        // With a delay line, the agent is told to dial the coordinator through it.
        let (quic, relay) = match one_way {
            Some(d) => {
                let port = std::net::UdpSocket::bind("127.0.0.1:0")
                    .and_then(|s| s.local_addr())
                    .context("finding a free UDP port")?
                    .port();
                let relay = relay::udp(([127, 0, 0, 1], port).into(), d).await.context("starting the UDP relay")?;
                (format!("127.0.0.1:{port}"), Some(relay))
            }
            None => ("127.0.0.1:0".to_string(), None),
        };
        let mut serve = Command::new(&binary);
        serve.arg("serve").arg("--data-dir").arg(&data);
        serve.args(["--listen-http", "127.0.0.1:0", "--listen-quic", &quic, "--listen-ssh", "127.0.0.1:0"]);
        if let Some(r) = &relay {
            serve.args(["--advertise-quic", &r.addr.to_string()]);
        }
        let child = serve
            .args(["--listen-https", "127.0.0.1:0"])
            .env("TETHER_LOG", log_filter)
            .env_remove("TETHER_URL")
            .env_remove("TETHER_TOKEN")
            .env_remove("TETHER_ADVERTISE_QUIC")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} serve", binary.display()))?;
        // `config-ssh` writes its known_hosts beside the config, so the config gets a directory.
        let ssh_dir = lab.path.join(format!("tether{dir}-ssh"));
        std::fs::create_dir_all(&ssh_dir).with_context(|| format!("creating {}", ssh_dir.display()))?;
        let ssh_config = ssh_dir.join("config");
        let about = if key == "c" { "Tether: ssh -J front door -> agent" } else { "Tether, --compare-with build" };
        let route = Route {
            key,
            about,
            config: ssh_config.clone(),
            host: format!("{TETHER_WORKSPACE}.tether"),
            log: lab.path.join(format!("ssh-{key}.log")),
            servers: Vec::new(),
        };
        let mut side = TetherSide { child, _relay: relay, data, binary, route, front_door: String::new() };

        let info_path = side.data.join("coordinator.json");
        let deadline = Instant::now() + START_TIMEOUT;
        let ssh_addr = loop {
            let info: Option<Value> = std::fs::read(&info_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(addr) = info.as_ref().and_then(|i| i["ssh_addr"].as_str()) {
                break addr.to_string();
            }
            if let Some(status) = side.child.try_wait()? {
                bail!("tether serve exited with {status} before it was ready:\n{}", side.log_tail());
            }
            if Instant::now() >= deadline {
                bail!("tether serve wrote no ssh_addr to coordinator.json within {} s", START_TIMEOUT.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        eprintln!("coordinator {key} up ({}); SSH front door on {ssh_addr}", side.binary.display());
        side.front_door = ssh_addr;

        let public = lab.key.with_extension("pub");
        side.cli(&["user", "add", TETHER_USER, "--ssh-key", &display(&public)]).await?;
        let template = side.data.join("bench.toml");
        std::fs::write(&template, TETHER_TEMPLATE).with_context(|| format!("writing {}", template.display()))?;
        let create = ["workspace", "create", TETHER_WORKSPACE, "--template", &display(&template)];
        side.cli(&[&create[..], &["--owner", TETHER_USER, "--start"]].concat()).await?;
        let waited = side
            .cli(&["workspace", "wait", TETHER_WORKSPACE, "--for", "running,unhealthy,failed", "--timeout", "120s"])
            .await?;
        let shown = side.cli(&["workspace", "show", TETHER_WORKSPACE, "--json"]).await?;
        let view: Value = serde_json::from_str(&shown).context("tether workspace show --json")?;
        if view["status"] != "running" {
            bail!("workspace {TETHER_WORKSPACE} did not reach running: {}\n{waited}", view["status_reason"]);
        }
        side.route.servers = vec![side.child.id()];
        side.route.servers.extend(side.agent_pid());
        side.cli(&[
            "config-ssh",
            "--user",
            TETHER_USER,
            "--ssh-config",
            &display(&ssh_config),
            "--identity",
            &display(&lab.key),
        ])
        .await?;
        Ok(side)
    }

    /// `tether --data-dir D ARGS`; returns stdout.
    async fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let run = tokio::process::Command::new(&self.binary)
            .arg("--data-dir")
            .arg(&self.data)
            .args(args)
            .env_remove("TETHER_URL")
            .env_remove("TETHER_TOKEN")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(CLI_TIMEOUT, run)
            .await
            .map_err(|_| anyhow!("tether {}: no answer within {} s", args.join(" "), CLI_TIMEOUT.as_secs()))?
            .with_context(|| format!("running tether {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "tether {} failed ({}): {}\n--- coordinator log ---\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log_tail()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn log_tail(&self) -> String {
        tail(&self.data.join("coordinator.log"), 30)
    }

    /// The agent the `process` provisioner started, from its pid file.
    fn agent_pid(&self) -> Option<u32> {
        let pid_file = self.data.join("workspaces").join(TETHER_WORKSPACE).join("agent.pid");
        std::fs::read_to_string(pid_file).ok()?.trim().parse().ok().filter(|pid| *pid > 1)
    }

    fn agent_log_tail(&self) -> String {
        tail(&self.data.join("workspaces").join(TETHER_WORKSPACE).join("agent.log"), 30)
    }
}

/// The 1-minute load average: other work on the machine skews every figure here.
fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().next().unwrap_or("?").to_string()
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// Runs blocking measurement code off the async threads, so Ctrl-C still drops the servers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await.context("measurement thread")?
}

/// Nearest-rank percentile of an ascending list; `q` in (0, 1].
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

/// Where the JSON report samples each route's echo distribution.
const ECHO_PERCENTILES: [f64; 9] = [0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999];

/// What was measured on one route.
#[derive(Debug, Default)]
struct Figures {
    hops: Vec<Hop>,
    bulk_mib_s: Vec<f64>,
    bulk_down_mib_s: Vec<f64>,
    setup_ms: Vec<f64>,
    echo_us: Vec<f64>,
    server_cpu_us: Option<f64>,
    server_cpu_by_process: Vec<(String, f64)>,
}

/// `tether 85, tether-agent 72, dd 12` (microseconds per trip).
fn by_process_text(by: &[(String, f64)]) -> String {
    by.iter().map(|(name, us)| format!("{name} {us:.0}")).collect::<Vec<_>>().join(", ")
}

fn cpu_text(us: Option<f64>) -> String {
    us.map_or_else(|| "n/a".to_string(), |us| format!("{us:.0} us"))
}

/// The summary numbers of one route, the ones compared.
#[derive(Debug, Clone, Copy)]
struct Summary {
    bulk: f64,
    bulk_down: f64,
    setup_median: f64,
    setup_p90: f64,
    echo_p50: f64,
    echo_p99: f64,
    /// Server-side CPU per echo trip, microseconds; NaN if not measured.
    server_cpu: f64,
}

impl Figures {
    fn summary(&self) -> Summary {
        let bulk = sorted(&self.bulk_mib_s);
        let bulk_down = sorted(&self.bulk_down_mib_s);
        let setup = sorted(&self.setup_ms);
        let echo = sorted(&self.echo_us);
        let median = |v: &[f64]| median_max(v).map_or(f64::NAN, |(m, _)| m);
        Summary {
            bulk: median(&bulk),
            bulk_down: median(&bulk_down),
            setup_median: median(&setup),
            setup_p90: percentile(&setup, 0.9),
            echo_p50: percentile(&echo, 0.5),
            echo_p99: percentile(&echo, 0.99),
            server_cpu: self.server_cpu_us.unwrap_or(f64::NAN),
        }
    }

    fn json(&self, route: &Route) -> Value {
        let s = self.summary();
        let setup = sorted(&self.setup_ms);
        let echo = sorted(&self.echo_us);
        let list = |v: &[f64], d: i32| v.iter().map(|x| round(*x, d)).collect::<Vec<_>>();
        json!({
            "path": route.about,
            "host": route.host,
            "hops": self.hops.iter().map(Hop::json).collect::<Vec<_>>(),
            "end_to_end": self.hops.last().map(Hop::json),
            "bulk_mib_per_s": { "median": round(s.bulk, 1), "runs": list(&self.bulk_mib_s, 1) },
            "bulk_down_mib_per_s": { "median": round(s.bulk_down, 1), "runs": list(&self.bulk_down_mib_s, 1) },
            "setup_ms": {
                "median": round(s.setup_median, 2),
                "p90": round(s.setup_p90, 2),
                "min": round(setup[0], 2),
                "max": round(setup[setup.len() - 1], 2),
                "runs": list(&self.setup_ms, 2),
            },
            "echo_us": {
                "p50": round(s.echo_p50, 1),
                "p99": round(s.echo_p99, 1),
                // The shape of the distribution: a tail that only one route has (a timer, a
                // periodic task) shows here, where a shift of the whole curve shows at every point.
                "percentiles": ECHO_PERCENTILES
                    .iter()
                    .map(|q| json!({ "q": q, "us": round(percentile(&echo, *q), 1) }))
                    .collect::<Vec<_>>(),
                "min": round(echo[0], 1),
                "max": round(echo[echo.len() - 1], 1),
                "samples": echo.len(),
                "server_cpu_per_trip_us": self.server_cpu_us.map(|us| round(us, 1)),
                "server_cpu_per_trip_us_by_process": self.server_cpu_by_process.iter()
                    .map(|(name, us)| json!({ "process": name, "us": round(*us, 1) }))
                    .collect::<Vec<_>>(),
            },
        })
    }
}

/// Tether against one baseline: each metric as c / baseline, and the three targets.
fn compare(c: &Summary, base: &Summary, base_key: &str, b: &mut Block) -> Value {
    let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
    let ratios = json!({
        "bulk_throughput": round(ratio(c.bulk, base.bulk), 3),
        "bulk_download": round(ratio(c.bulk_down, base.bulk_down), 3),
        "setup_median": round(ratio(c.setup_median, base.setup_median), 3),
        "setup_p90": round(ratio(c.setup_p90, base.setup_p90), 3),
        "echo_p50": round(ratio(c.echo_p50, base.echo_p50), 3),
        "echo_p99": round(ratio(c.echo_p99, base.echo_p99), 3),
        "echo_server_cpu": round(ratio(c.server_cpu, base.server_cpu), 3),
    });
    b.line(
        &format!("ratios c/{base_key}"),
        format!(
            "throughput {:.2} (down {:.2}), setup median {:.2} (p90 {:.2}), echo p50 {:.2}, echo p99 {:.2}, \
             server CPU per trip {:.2}",
            ratio(c.bulk, base.bulk),
            ratio(c.bulk_down, base.bulk_down),
            ratio(c.setup_median, base.setup_median),
            ratio(c.setup_p90, base.setup_p90),
            ratio(c.echo_p50, base.echo_p50),
            ratio(c.echo_p99, base.echo_p99),
            ratio(c.server_cpu, base.server_cpu),
        ),
    );
    let targets = [
        ("throughput", c.bulk >= base.bulk, format!("{:.1} vs {:.1} MiB/s", c.bulk, base.bulk), ">="),
        (
            "throughput down",
            c.bulk_down >= base.bulk_down,
            format!("{:.1} vs {:.1} MiB/s", c.bulk_down, base.bulk_down),
            ">=",
        ),
        (
            "setup median",
            c.setup_median <= base.setup_median,
            format!("{:.1} vs {:.1} ms", c.setup_median, base.setup_median),
            "<=",
        ),
        ("echo p99", c.echo_p99 <= base.echo_p99, format!("{:.0} vs {:.0} us", c.echo_p99, base.echo_p99), "<="),
    ];
    let mut verdicts = serde_json::Map::new();
    for (name, met, detail, op) in targets {
        b.line(
            &format!("  target: {name} c {op} {base_key}"),
            format!("{}   ({detail})", if met { "met" } else { "NOT MET" }),
        );
        verdicts.insert(name.replace(' ', "_"), json!({ "met": met, "detail": detail }));
    }
    json!({ "ratios": ratios, "targets": verdicts })
}

/// Measures every route, prints the summary; returns the figures.
pub async fn run(args: &SshArgs, machine: &Value) -> anyhow::Result<Value> {
    if args.bulk_mib == 0 || args.bulk_runs == 0 || args.setup_runs == 0 || args.echo_samples == 0 {
        bail!("--bulk-mib, --bulk-runs, --setup-runs and --echo-samples must each be at least 1");
    }
    let version = Command::new("ssh").arg("-V").output().context("running ssh -V (is openssh-client installed?)")?;
    let version = String::from_utf8_lossy(&version.stderr).trim().to_string();
    if !Path::new(SSHD).exists() {
        bail!("{SSHD} does not exist; install openssh-server");
    }
    // Checked before anything starts, so a missing feature costs no setup.
    let tether_binary = if args.skip_tether {
        None
    } else {
        let binary = sibling_binary("tether")?;
        let missing = TetherSide::missing(&binary).await?;
        if !missing.is_empty() {
            bail!(
                "{} has no {}: it cannot serve SSH yet; pass --skip-tether to measure the OpenSSH baselines alone",
                binary.display(),
                missing.join(", ")
            );
        }
        Some(binary)
    };

    let load_before = loadavg();
    let mut lab = Lab::start(&args.cipher, args.one_way()).await?;
    eprintln!("sshd target and jump up in {}", lab.path.display());
    let mut routes = vec![
        lab.route("a", "OpenSSH: ssh direct to sshd"),
        lab.route("b", "OpenSSH: ssh -J sshd -> sshd"),
        lab.route("a-gcm", "OpenSSH: direct, cipher forced"),
        lab.route("b-gcm", "OpenSSH: ssh -J, cipher forced on both hops"),
    ];
    let tether = match tether_binary {
        Some(binary) => Some(TetherSide::start(binary, &lab, &args.coordinator_log, "c", args.one_way()).await?),
        None => {
            eprintln!("skipping the Tether leg (--skip-tether)");
            None
        }
    };
    if let Some(t) = &tether {
        routes.push(t.route.clone());
    }
    let other = match (&tether, &args.compare_with) {
        (Some(_), Some(binary)) => {
            Some(TetherSide::start(binary.clone(), &lab, &args.coordinator_log, "c2", args.one_way()).await?)
        }
        _ => None,
    };
    if let Some(t) = &other {
        routes.push(t.route.clone());
    }
    let result = measure(args, &routes).await;
    let result = match (result, &tether) {
        (Err(e), Some(t)) => Err(e.context(format!(
            "--- coordinator log ---\n{}\n--- agent log ---\n{}",
            t.log_tail(),
            t.agent_log_tail()
        ))),
        (r, _) => r,
    };
    let figures = match result {
        Ok(f) => f,
        Err(e) => {
            if args.keep {
                eprintln!("kept {}", lab.keep().display());
            }
            return Err(e);
        }
    };
    let front_door = tether.as_ref().map(|t| t.front_door.clone());
    drop(tether);
    drop(other);
    let kept = args.keep.then(|| lab.keep().to_path_buf());

    let mut b = Block::default();
    b.title("tether-bench ssh: the same OpenSSH client over each path");
    b.line("machine", host::machine_line(machine));
    b.line("client", &version);
    let load_after = loadavg();
    b.line("load average (1 min) before, after", format!("{load_before}, {load_after}"));
    b.line(
        "runs",
        format!(
            "bulk {} x {} MiB each way, setup {} x `ssh HOST true`, echo {} samples (+{ECHO_WARMUP} warm-up)",
            args.bulk_runs, args.bulk_mib, args.setup_runs, args.echo_samples
        ),
    );
    b.line(
        "workspace round trip",
        match args.rtt_ms {
            0 => "loopback".to_string(),
            ms => format!(
                "{ms} ms added by delay lines ({} ms each way) in front of the target sshd and the agent",
                ms as f64 / 2.0
            ),
        },
    );
    b.note("");
    b.note(format!(
        "{:<6} {:<44} {:>9} {:>9} {:>10} {:>9} {:>10} {:>10} {:>10}",
        "path", "", "up MiB/s", "down", "setup ms", "p90 ms", "echo p50", "echo p99", "CPU/trip"
    ));
    let mut summaries = Vec::new();
    let mut per_route = serde_json::Map::new();
    for (route, f) in routes.iter().zip(&figures) {
        let s = f.summary();
        b.note(format!(
            "{:<6} {:<44} {:>9.1} {:>9.1} {:>10.1} {:>9.1} {:>8.0}us {:>8.0}us {:>10}",
            route.key,
            route.about,
            s.bulk,
            s.bulk_down,
            s.setup_median,
            s.setup_p90,
            s.echo_p50,
            s.echo_p99,
            cpu_text(f.server_cpu_us)
        ));
        summaries.push(s);
        per_route.insert(route.key.to_string(), f.json(route));
    }
    b.note(
        "CPU/trip: CPU time the server side spent per echo round trip (sshd's processes for the \
         connection, or the coordinator and the agent, and the remote dd)",
    );
    for (route, f) in routes.iter().zip(&figures) {
        if !f.server_cpu_by_process.is_empty() {
            b.note(format!(
                "  {:<6} CPU/trip by process (us): {}",
                route.key,
                by_process_text(&f.server_cpu_by_process)
            ));
        }
    }
    b.note("");
    for (route, f) in routes.iter().zip(&figures) {
        let names: &[&str] = if f.hops.len() > 1 { &["jump hop", "end to end"] } else { &["end to end"] };
        for (hop, name) in f.hops.iter().zip(names) {
            b.line(&format!("{} {name}", route.key), hop.brief());
        }
    }
    let mut comparisons = serde_json::Map::new();
    let summary_of = |key: &str| routes.iter().position(|r| r.key == key).map(|i| summaries[i]);
    let e2e_cipher = |key: &str| {
        let i = routes.iter().position(|r| r.key == key)?;
        figures[i].hops.last().map(|h| h.cipher_s2c.clone())
    };
    let like_for_like =
        ["b", "b-gcm"].into_iter().find(|k| e2e_cipher(k).is_some() && e2e_cipher(k) == e2e_cipher("c"));
    match summary_of("c") {
        Some(c) => {
            b.line(
                "c's like-for-like baseline (same cipher)",
                like_for_like.unwrap_or("neither: compare ciphers before ratios"),
            );
            for base_key in ["b", "b-gcm"] {
                if let Some(base) = summary_of(base_key) {
                    comparisons.insert(format!("c/{base_key}"), compare(&c, &base, base_key, &mut b));
                }
            }
            if let Some(c2) = summary_of("c2") {
                let r = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
                b.line(
                    "ratios c/c2 (this build against --compare-with)",
                    format!(
                        "throughput {:.3}, setup median {:.3}, echo p50 {:.3}, echo p99 {:.3}, server CPU per trip {:.3}",
                        r(c.bulk, c2.bulk),
                        r(c.setup_median, c2.setup_median),
                        r(c.echo_p50, c2.echo_p50),
                        r(c.echo_p99, c2.echo_p99),
                        r(c.server_cpu, c2.server_cpu)
                    ),
                );
            }
        }
        None => b.line("Tether (c)", "not measured (--skip-tether): no ratios, targets not judged"),
    }
    if let Some(k) = &kept {
        b.line("kept", k.display());
    }
    print!("{}", b.finish());
    Ok(json!({
        "client": version,
        "sshd": SSHD,
        "forced_cipher": args.cipher,
        "bulk_mib": args.bulk_mib,
        "bulk_runs": args.bulk_runs,
        "added_rtt_ms": args.rtt_ms,
        "setup_runs": args.setup_runs,
        "echo_samples": args.echo_samples,
        "echo_warmup": ECHO_WARMUP,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "tether_measured": summary_of("c").is_some(),
        "tether_front_door": front_door,
        "like_for_like_baseline": like_for_like,
        "routes": per_route,
        "comparisons": comparisons,
        "kept_dir": kept,
    }))
}

/// Every measurement, interleaved across routes run by run so drift on the machine hits all alike.
async fn measure(args: &SshArgs, routes: &[Route]) -> anyhow::Result<Vec<Figures>> {
    let mut figures: Vec<Figures> = routes.iter().map(|_| Figures::default()).collect();
    for (route, f) in routes.iter().zip(&mut figures) {
        let r = route.clone();
        f.hops = blocking(move || negotiated(&r)).await?;
        let e2e = f.hops.last().map(Hop::brief).unwrap_or_default();
        eprintln!("{}: {} hop(s); end to end {e2e}", route.key, f.hops.len());
    }
    eprintln!("connection setup: {} rounds", args.setup_runs);
    for _ in 0..args.setup_runs {
        for (route, f) in routes.iter().zip(&mut figures) {
            let r = route.clone();
            f.setup_ms.push(blocking(move || setup_once(&r)).await?);
        }
    }
    let slow_link = args.one_way().is_some();
    for round in 0..args.bulk_runs {
        for (route, f) in routes.iter().zip(&mut figures) {
            let (r, mib) = (route.clone(), args.bulk_mib);
            let up = blocking(move || bulk_once(&r, mib, slow_link)).await?;
            let (r, mib) = (route.clone(), args.bulk_mib);
            let down = blocking(move || bulk_down_once(&r, mib, slow_link)).await?;
            eprintln!("bulk {}/{}: {} up {up:.1} MiB/s, down {down:.1} MiB/s", round + 1, args.bulk_runs, route.key);
            f.bulk_mib_s.push(up);
            f.bulk_down_mib_s.push(down);
        }
    }
    let (r, n, rtt) = (routes.to_vec(), args.echo_samples, Duration::from_millis(args.rtt_ms));
    eprintln!("echo: {n} round trips on each route, interleaved");
    let echoes = blocking(move || echo_interleaved(&r, n, rtt)).await?;
    for ((route, f), echo) in routes.iter().zip(&mut figures).zip(echoes) {
        f.echo_us = echo.micros;
        f.server_cpu_us = echo.server_cpu_us;
        f.server_cpu_by_process = echo.by_process;
        let s = sorted(&f.echo_us);
        eprintln!(
            "echo {}: p50 {:.0} us, p99 {:.0} us, server-side CPU {} per trip ({})",
            route.key,
            percentile(&s, 0.5),
            percentile(&s, 0.99),
            cpu_text(f.server_cpu_us),
            by_process_text(&f.server_cpu_by_process)
        );
    }
    Ok(figures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_come_in_negotiation_order() {
        let log = "\
debug1: Executing proxy command: exec ssh -F c -v -W '[127.0.0.1]:2' j
debug1: kex: algorithm: sntrup761x25519-sha512
debug1: kex: host key algorithm: ssh-ed25519
debug1: kex: server->client cipher: chacha20-poly1305@openssh.com MAC: <implicit> compression: none
debug1: kex: client->server cipher: chacha20-poly1305@openssh.com MAC: <implicit> compression: none
debug1: kex: algorithm: curve25519-sha256
debug1: kex: host key algorithm: ssh-ed25519-cert-v01@openssh.com
debug1: kex: server->client cipher: aes128-gcm@openssh.com MAC: <implicit> compression: none
debug1: kex: client->server cipher: aes256-gcm@openssh.com MAC: <implicit> compression: none
";
        let hops = parse_hops(log);
        assert_eq!(hops.len(), 2);
        assert_eq!(hops[0].brief(), "chacha20-poly1305@openssh.com, kex sntrup761x25519-sha512, host key ssh-ed25519");
        assert_eq!(
            hops[1].brief(),
            "aes256-gcm@openssh.com up, aes128-gcm@openssh.com down, kex curve25519-sha256, \
             host key ssh-ed25519-cert-v01@openssh.com"
        );
        assert_eq!(hops[1].mac_s2c, "<implicit>");
    }

    #[test]
    fn server_cpu_counts_processes_present_at_both_ends() {
        let start = std::collections::BTreeMap::from([(10, 1_000_000u64), (11, 500_000), (12, 7)]);
        // 12 has gone; 13 came later and has no starting point.
        let end = std::collections::BTreeMap::from([(10, 3_000_000u64), (11, 1_500_000), (13, 9_000_000)]);
        assert_eq!(procfs::spent_us(&start, &end, 1000), Some(3.0));
        assert_eq!(procfs::spent_us(&Default::default(), &end, 1000), None);
        let names =
            std::collections::BTreeMap::from([(10, "sshd".to_string()), (11, "sshd".into()), (13, "dd".into())]);
        assert_eq!(procfs::spent_by_name(&start, &end, &names, 1000), vec![("sshd x2".to_string(), 3.0)]);
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let (me, pid) = (std::process::id(), child.id());
        assert!(procfs::pids().contains(&pid));
        assert!(procfs::descends_from(pid, me));
        assert!(!procfs::descends_from(me, pid));
        assert!(procfs::cpu_ns(&[me]).contains_key(&me), "this kernel keeps per-task run times");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.9), 90.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.5), 2.0);
    }
}
