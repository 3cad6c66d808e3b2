//! Session channels: the user's login shell or a command, on a pty or on pipes, or a subsystem
//! (`sftp`). The handler decides and spawns (so it can answer the request), then hands the process to
//! the channel's task, which moves the bytes and reports how the process ended.

use super::activity::{Activity, Gauge};
use super::inbound::Queue;
use super::splice::{pump_out, PumpState};
use super::{LoginGate, LOGIN_WAIT};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// After the process exits, output is still copied until its source has been silent this long: a
/// background child may hold the pty or pipes open for ever (OpenSSH would hang; we do not).
pub const OUTPUT_GRACE: Duration = Duration::from_millis(1000);
const GRACE_TICK: Duration = Duration::from_millis(100);

/// A pty as the client asked for it.
#[derive(Debug, Clone)]
pub struct PtySpec {
    pub term: String,
    pub size: pty_process::Size,
    /// The client's terminal modes, at most `modes::MAX_MODES`.
    pub modes: Vec<(russh::Pty, u32)>,
}

/// What runs in a session.
#[derive(Debug, Clone)]
pub enum Program {
    /// The login shell, interactive.
    Shell,
    /// `SHELL -c COMMAND`.
    Exec(OsString),
    /// A subsystem server run directly, with its arguments.
    Subsystem { path: PathBuf, args: Vec<OsString> },
}

/// Everything needed to start a session's process.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: Program,
    pub shell: PathBuf,
    pub env: Vec<(OsString, OsString)>,
    /// Where the program starts; the home directory if it is not a directory.
    pub cwd: PathBuf,
    pub home: PathBuf,
    pub pty: Option<PtySpec>,
}

/// From the handler to a session channel's task.
pub enum Control {
    /// Start the program. The handler has answered the request already, as sshd does: the spawn
    /// happens in the channel's task, so that neither the connection's other channels nor the
    /// agent's worker thread wait for it.
    Start(Box<Launching>),
    Resize(pty_process::Size),
    Signal(Signal),
    /// The client takes no more output: stop reading the program's.
    Eow,
}

/// A session's program, for its channel's task to start.
pub struct Launching {
    pub launch: Launch,
    /// For the login gate and, once it is open, the banner (why the start phase failed, the MOTD).
    pub server: Arc<super::SshServer>,
    /// A shell on a pty: shown the banner.
    pub interactive: bool,
    /// For the log: what runs (`shell`, `exec`, `subsystem PATH`) and for whom.
    pub what: String,
    pub client: String,
    pub login: String,
}

/// How long a session's program may take to start. The spawn returns once the child has changed
/// into its working directory and exec'd its program: on a hung network filesystem, never.
pub const SPAWN_TIMEOUT: Duration = Duration::from_secs(30);

/// A process and its stdio, ready to be served.
pub struct Started {
    child: Child,
    io: ChildIo,
    /// Written to the client before any output (the MOTD).
    banner: Option<Vec<u8>>,
    _gauge: Gauge,
}

impl Started {
    /// Ends a process that will never be served.
    pub fn hang_up(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGHUP);
        }
        let _ = self.child.start_kill();
    }
}

enum ChildIo {
    Pty(super::pty::Master),
    Pipes {
        stdin: ChildStdin,
        stdout: Box<dyn AsyncRead + Send + Unpin>,
        stderr: Option<Box<dyn AsyncRead + Send + Unpin>>,
    },
}

/// Starts the process, as sshd does: it leads a new session (with the pty as its controlling terminal
/// when there is one; without, it has none, so nothing reaches the terminal the agent was started
/// from), so a hang-up to its process group reaches its children; and every signal starts at its
/// default action.
///
/// Blocks until the child has exec'd (or failed to): run it on the blocking pool.
pub fn spawn(launch: &Launch, banner: Option<Vec<u8>>, activity: &Arc<Activity>) -> std::io::Result<Started> {
    let shell_name = launch.shell.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "sh".into());
    let mut cmd = match &launch.program {
        Program::Shell => {
            let mut cmd = tokio::process::Command::new(&launch.shell);
            // A leading '-' in argv[0] makes it a login shell, as sshd does.
            let mut argv0 = OsString::from("-");
            argv0.push(&shell_name);
            cmd.arg0(argv0);
            cmd
        }
        Program::Exec(command) => {
            let mut cmd = tokio::process::Command::new(&launch.shell);
            cmd.arg0(&shell_name).arg("-c").arg(command);
            cmd
        }
        Program::Subsystem { path, args } => {
            let mut cmd = tokio::process::Command::new(path);
            cmd.args(args);
            cmd
        }
    };
    let cwd = if launch.cwd == launch.home || launch.cwd.is_dir() { &launch.cwd } else { &launch.home };
    cmd.env_clear().envs(launch.env.iter().map(|(k, v)| (k, v))).current_dir(cwd);
    // The pre_exec closures below run in the child between fork and exec, in the order given: first
    // the new session, then the default signals (so the child never has them while still in the
    // agent's process group). They make only async-signal-safe calls (setsid, sigaction) and
    // allocate nothing.
    let (child, io) = match &launch.pty {
        Some(spec) => {
            let (pty, pts) = pty_process::open().map_err(pty_error)?;
            pty.resize(spec.size).map_err(pty_error)?;
            if let Err(e) = super::modes::apply(&pts, &spec.modes) {
                tracing::debug!(error = %e, "could not set the client's terminal modes; keeping the defaults");
            }
            let tty = pts_name(&pts);
            cmd.env("TERM", &spec.term);
            if let Some(tty) = tty {
                cmd.env("SSH_TTY", tty);
            }
            // pty_process's own pre_exec (setsid, the controlling terminal) runs before this one.
            // SAFETY: see above.
            let pty_cmd = unsafe { pty_process::Command::from(cmd).pre_exec(crate::scripts::default_signals) };
            let child = pty_cmd.spawn(pts).map_err(pty_error)?;
            (child, ChildIo::Pty(super::pty::Master::new(pty)?))
        }
        None => {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
            // SAFETY: see above.
            unsafe {
                cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from));
                cmd.pre_exec(crate::scripts::default_signals);
            }
            // A subsystem speaks a protocol on stdout; its complaints are not part of it.
            let subsystem = matches!(launch.program, Program::Subsystem { .. });
            cmd.stderr(if subsystem { Stdio::null() } else { Stdio::piped() });
            let mut child = cmd.spawn()?;
            let missing = || std::io::Error::other("child stdio missing");
            let stdin = child.stdin.take().ok_or_else(missing)?;
            let stdout: Box<dyn AsyncRead + Send + Unpin> = Box::new(child.stdout.take().ok_or_else(missing)?);
            let stderr = child.stderr.take().map(|e| Box::new(e) as Box<dyn AsyncRead + Send + Unpin>);
            (child, ChildIo::Pipes { stdin, stdout, stderr })
        }
    };
    Ok(Started { child, io, banner, _gauge: activity.session() })
}

fn pty_error(e: pty_process::Error) -> std::io::Error {
    match e {
        pty_process::Error::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

/// `/dev/pts/N` for `SSH_TTY`.
fn pts_name(pts: &pty_process::Pts) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", pts.as_raw_fd())).ok()
}

/// Where a session's input goes.
enum Sink {
    Pty(super::pty::Writer),
    /// `None` once the client sent EOF (the child sees end of file) or the child stopped reading.
    Pipe(Option<ChildStdin>),
}

impl Sink {
    async fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Pty(w) => w.write(data).await,
            Sink::Pipe(Some(w)) => w.write(data).await,
            Sink::Pipe(None) => Ok(data.len()),
        }
    }
}

/// How the running phase ended.
enum Finish {
    Exited(ExitStatus),
    Closed,
}

/// Serves one session channel until it closes: waits for the handler to start a process (keeping
/// early input in `queue`), then splices the process and the channel and reports the exit.
pub async fn serve(
    channel: Channel<Msg>,
    handle: Handle,
    mut control: mpsc::Receiver<Control>,
    activity: Arc<Activity>,
    mut queue: Queue,
) {
    let id = channel.id();
    let (mut rx, tx) = channel.split();
    let mut client_eof = false;
    let launching = loop {
        tokio::select! {
            ctl = control.recv() => match ctl {
                Some(Control::Start(l)) => break *l,
                Some(_) => {}
                // The connection is gone.
                None => return,
            },
            msg = rx.wait(), if queue.has_room() => {
                if !take_input(msg, &mut queue, &mut client_eof, &activity) {
                    return;
                }
            }
        }
    };
    let Launching { launch, server, interactive, what, client, login } = launching;
    let pty = launch.pty.is_some();
    let mut resize = None;
    // The start scripts that block login are running: say so, and wait for them (or the client's
    // leaving, or a Ctrl-C on its terminal) before the program starts.
    let mut gate = server.gate();
    let closed = gate.borrow_and_update().clone();
    if let LoginGate::Closed { workspace, scripts } = closed {
        let end = if pty { "\r\n" } else { "\n" };
        // On a pty, as the MOTD is; otherwise on stderr, out of the command's output.
        let out = if pty { None } else { Some(1) };
        let said = match workspace {
            Some(w) => format!(
                "tether: workspace '{w}' is starting; waiting for its startup scripts to finish ({}){end}",
                scripts.join(", ")
            ),
            None => format!("tether: this workspace is starting; waiting for its startup scripts to finish{end}"),
        };
        let _ = tx.make_writer_ext(out).write_all(said.as_bytes()).await;
        tracing::info!(client = %client, login = %login, what = %what, "ssh session waits for the startup scripts");
        let waited = tokio::time::sleep(LOGIN_WAIT);
        tokio::pin!(waited);
        // Why the session ends without its program, and the exit status the client gets.
        let gave_up = loop {
            tokio::select! {
                // The scripts are done, or the agent is stopping (or going: its sender dropped).
                g = async { gate.wait_for(|g| !matches!(g, LoginGate::Closed { .. })).await.map(|g| g.clone()) } => {
                    match g {
                        Ok(LoginGate::Open) => break None,
                        _ => break Some((format!("tether: the workspace is stopping{end}"), 1)),
                    }
                }
                _ = &mut waited => {
                    let said = format!(
                        "tether: the startup scripts are still running after {} minutes; going ahead{end}",
                        LOGIN_WAIT.as_secs() / 60
                    );
                    let _ = tx.make_writer_ext(out).write_all(said.as_bytes()).await;
                    break None;
                }
                ctl = control.recv() => match ctl {
                    Some(Control::Resize(size)) => resize = Some(size),
                    // Nothing runs yet to signal.
                    Some(_) => {}
                    None => return,
                },
                msg = rx.wait(), if queue.has_room() => {
                    // The terminal is raw: its Ctrl-C arrives as a byte, which would otherwise wait
                    // for the shell. It means: stop waiting.
                    if pty && matches!(&msg, Some(ChannelMsg::Data { data }) if data.contains(&0x03)) {
                        break Some((format!("tether: stopped waiting{end}"), 130));
                    }
                    if !take_input(msg, &mut queue, &mut client_eof, &activity) {
                        return;
                    }
                }
            }
        };
        if let Some((said, status)) = gave_up {
            tracing::info!(client = %client, login = %login, what = %what, said = said.trim_end(), "ssh session ended while it waited");
            end_without_program(&tx, &mut rx, out, &said, status).await;
            return;
        }
    }
    // Read now, after the wait: why the start phase failed, if it did.
    let banner = interactive.then(|| server.login_banner()).flatten().map(|m| super::handler::motd_bytes(&m));
    let spawn_activity = activity.clone();
    let mut spawning = tokio::task::spawn_blocking(move || spawn(&launch, banner, &spawn_activity));
    let deadline = tokio::time::sleep(SPAWN_TIMEOUT);
    tokio::pin!(deadline);
    let mut control_open = true;
    let spawned = loop {
        tokio::select! {
            r = &mut spawning => break r.map_err(std::io::Error::other).and_then(|r| r),
            _ = &mut deadline => {
                hang_up_when_started(spawning);
                break Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the program did not start within {} s (is the home directory's filesystem hung?)",
                        SPAWN_TIMEOUT.as_secs()
                    ),
                ));
            }
            ctl = control.recv(), if control_open => match ctl {
                Some(Control::Resize(size)) => resize = Some(size),
                // Nothing runs yet to signal.
                Some(_) => {}
                None => control_open = false,
            },
            msg = rx.wait(), if queue.has_room() => {
                if !take_input(msg, &mut queue, &mut client_eof, &activity) {
                    hang_up_when_started(spawning);
                    return;
                }
            }
        }
    };
    let started = match spawned {
        Ok(started) => {
            tracing::info!(client = %client, login = %login, what = %what, pty, "ssh session started");
            started
        }
        Err(e) => {
            // As sshd's child does when it cannot run the program: say why on stderr, exit 1.
            tracing::warn!(client = %client, what = %what, error = %e, "could not start an ssh session");
            let end = if pty { "\r\n" } else { "\n" };
            let said = format!("tether-agent: could not start the {what}: {e}{end}");
            end_without_program(&tx, &mut rx, Some(1), &said, 1).await;
            return;
        }
    };
    let Started { mut child, io, banner, _gauge } = started;
    let pid = child.id().map(|p| Pid::from_raw(p as i32));
    let mut stdout_writer = tx.make_writer();
    let mut stderr_writer = tx.make_writer_ext(Some(1));
    if let Some(banner) = banner {
        if stdout_writer.write_all(&banner).await.is_ok() {
            activity.sent(banner.len());
        }
    }
    let (mut sink, stdout, stderr): (Sink, Box<dyn AsyncRead + Send + Unpin>, _) = match io {
        ChildIo::Pty(pty) => {
            let (r, w) = pty.into_split();
            // The window changed while the program was starting.
            if let Some(size) = resize {
                let _ = w.resize(size);
            }
            (Sink::Pty(w), Box::new(r), None)
        }
        ChildIo::Pipes { stdin, stdout, stderr } => (Sink::Pipe(Some(stdin)), stdout, stderr),
    };
    let (out_state, err_state) = (PumpState::default(), PumpState::default());
    // Each pump owns its reader: dropping the pump (at the client's end of write) closes it.
    let mut out = Some(Box::pin(async {
        let mut stdout = stdout;
        pump_out(&mut stdout, &mut stdout_writer, &activity, &out_state).await
    }));
    let mut err_done = stderr.is_none();
    let mut err = Some(Box::pin(async {
        match stderr {
            Some(mut e) => pump_out(&mut e, &mut stderr_writer, &activity, &err_state).await,
            None => Ok(0),
        }
    }));
    let mut out_done = false;
    let mut status: Option<ExitStatus> = None;
    let mut tick = tokio::time::interval(GRACE_TICK);
    let mut quiet = Quiet::default();
    let finish = loop {
        if client_eof && queue.is_empty() {
            if let Sink::Pipe(stdin) = &mut sink {
                // The child reads end of file.
                stdin.take();
            }
        }
        if let Some(st) = status {
            if out_done && err_done {
                break Finish::Exited(st);
            }
        }
        tokio::select! {
            biased;
            ctl = control.recv(), if control_open => match ctl {
                Some(Control::Resize(size)) => {
                    if let Sink::Pty(w) = &sink {
                        let _ = w.resize(size);
                    }
                }
                Some(Control::Signal(sig)) => {
                    if let (Some(pid), None) = (pid, status) {
                        let _ = kill(pid, sig);
                    }
                }
                Some(Control::Eow) => {
                    // As sshd does: its output is no longer read, so the program's next write
                    // fails (SIGPIPE, for a pipe; a terminal's output just stops).
                    (out, err) = (None, None);
                    (out_done, err_done) = (true, true);
                }
                Some(Control::Start(_)) => {}
                None => control_open = false,
            },
            // Taken as they arrive, not as the process reads them: `queue` withholds the client's
            // window instead, so russh's loop stays free (see `inbound`).
            msg = rx.wait(), if queue.has_room() => {
                if !take_input(msg, &mut queue, &mut client_eof, &activity) {
                    break Finish::Closed;
                }
            }
            r = sink.write(queue.front()), if !queue.is_empty() => match r {
                Ok(n) => queue.consume(n),
                Err(_) => {
                    // The child stopped reading its input: drop what the client sends from now on.
                    queue.clear();
                    sink = Sink::Pipe(None);
                }
            },
            st = child.wait(), if status.is_none() => {
                status = Some(st.unwrap_or_else(|_| ExitStatus::from_raw(255 << 8)));
            }
            r = while_some(&mut out), if !out_done => {
                out_done = true;
                if let Err(e) = r {
                    tracing::debug!(error = %e, "session output ended");
                }
            }
            _ = while_some(&mut err), if !err_done => err_done = true,
            now = tick.tick(), if status.is_some() => {
                let silent = quiet.observe(now, &[(&out_state, out_done), (&err_state, err_done)]);
                if silent >= OUTPUT_GRACE {
                    out_done = true;
                    err_done = true;
                }
            }
        }
    };
    // The copiers are not polled again: nothing they hold follows the exit status or the close.
    match finish {
        Finish::Exited(st) => {
            match exit_signal(st) {
                Some((sig, core)) => {
                    let _ = handle.exit_signal_request(id, sig, core, String::new(), String::new()).await;
                }
                None => {
                    let _ = tx.exit_status(st.code().unwrap_or(255) as u32).await;
                }
            }
            let _ = tx.eof().await;
            let _ = tx.close().await;
            // The client answers with its own close; wait for it briefly so it is consumed.
            let _ = tokio::time::timeout(Duration::from_secs(5), drain(&mut rx)).await;
        }
        Finish::Closed => {
            // The client went away. On a pty, hang up, as a closed terminal does. A command on
            // pipes runs on, as under sshd: its input ends and its next write fails (SIGPIPE), so
            // `ssh ws ./long-job.sh` cut off (a laptop's lid, a coordinator restart) is not killed
            // if it redirects its output.
            if status.is_none() && pty {
                if let Some(pid) = pid {
                    let _ = killpg(pid, Signal::SIGHUP);
                }
            }
        }
    }
}

/// Ends a session whose program never ran: `said` on stdout (`out` None) or stderr, then the exit
/// status and the close, and the client's own close is waited for briefly so it is consumed.
async fn end_without_program(
    tx: &ChannelWriteHalf<Msg>,
    rx: &mut ChannelReadHalf,
    out: Option<u32>,
    said: &str,
    status: u32,
) {
    let _ = tx.make_writer_ext(out).write_all(said.as_bytes()).await;
    let _ = tx.exit_status(status).await;
    let _ = tx.eof().await;
    let _ = tx.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), drain(rx)).await;
}

/// Awaits the future in `f`, or never once it is gone.
async fn while_some<F: std::future::Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Takes one message from the client: its data into `queue` (none after its end of file), its end
/// of file noted. False once the channel is closed. Requests: the handler answered them already.
fn take_input(msg: Option<ChannelMsg>, queue: &mut Queue, client_eof: &mut bool, activity: &Activity) -> bool {
    match msg {
        Some(ChannelMsg::Data { data }) => {
            activity.received(data.len());
            if !*client_eof {
                queue.push(data);
            }
        }
        Some(ChannelMsg::Eof) => *client_eof = true,
        Some(ChannelMsg::Close) | None => return false,
        Some(_) => {}
    }
    true
}

/// Ends the process of a spawn nobody waits for any more, should it start after all.
fn hang_up_when_started(spawning: tokio::task::JoinHandle<std::io::Result<Started>>) {
    tokio::spawn(async move {
        if let Ok(Ok(started)) = spawning.await {
            started.hang_up();
        }
    });
}

async fn drain(rx: &mut ChannelReadHalf) {
    while rx.wait().await.is_some() {}
}

/// Tracks how long the output sources of an exited process have been silent.
#[derive(Default)]
struct Quiet {
    reads: u64,
    since: Option<Instant>,
}

impl Quiet {
    /// How long every unfinished source has been silent, as of `now`. A copier waiting on the client
    /// (a slow reader, a full window) is not silent.
    fn observe(&mut self, now: Instant, pumps: &[(&PumpState, bool)]) -> Duration {
        let active = pumps.iter().filter(|(_, done)| !done);
        let mut reads = 0;
        let mut writing = false;
        for (state, _) in active {
            reads += state.reads.load(Ordering::Relaxed);
            writing |= state.writing.load(Ordering::Relaxed);
        }
        if writing || reads != self.reads || self.since.is_none() {
            self.reads = reads;
            self.since = Some(now);
            // The very first observation starts the clock.
            return Duration::ZERO;
        }
        now.duration_since(self.since.unwrap_or(now))
    }
}

/// The signal that killed a process, as SSH names it, and whether it dumped core.
pub fn exit_signal(status: ExitStatus) -> Option<(Sig, bool)> {
    let signo = status.signal()?;
    let name = Signal::try_from(signo)
        .map(|s| s.as_str().trim_start_matches("SIG").to_string())
        .unwrap_or_else(|_| signo.to_string());
    let sig = match name.as_str() {
        "ABRT" => Sig::ABRT,
        "ALRM" => Sig::ALRM,
        "FPE" => Sig::FPE,
        "HUP" => Sig::HUP,
        "ILL" => Sig::ILL,
        "INT" => Sig::INT,
        "KILL" => Sig::KILL,
        "PIPE" => Sig::PIPE,
        "QUIT" => Sig::QUIT,
        "SEGV" => Sig::SEGV,
        "TERM" => Sig::TERM,
        "USR1" => Sig::USR1,
        _ => Sig::Custom(name),
    };
    Some((sig, status.core_dumped()))
}

/// The local signal for an SSH `signal` request.
pub fn local_signal(sig: &Sig) -> Option<Signal> {
    let name = match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(name) => name.as_str(),
    };
    format!("SIG{name}").parse().ok()
}

/// OpenSSH's `sftp-server`, where distributions put it.
const SFTP_SERVERS: &[&str] = &[
    "/usr/lib/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
];

/// The sftp subsystem: OpenSSH's server when the image has one (it is fast), else the agent's own.
pub fn sftp_program() -> std::io::Result<Program> {
    if let Some(path) = SFTP_SERVERS.iter().map(Path::new).find(|p| is_executable(p)) {
        return Ok(Program::Subsystem { path: path.to_path_buf(), args: Vec::new() });
    }
    let exe = std::env::current_exe()?;
    Ok(Program::Subsystem { path: exe, args: vec!["sftp-server".into()] })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_ssh_name() {
        let killed = ExitStatus::from_raw(9);
        let (sig, core) = exit_signal(killed).unwrap();
        assert!(matches!(sig, Sig::KILL));
        assert!(!core);
        let usr2 = ExitStatus::from_raw(Signal::SIGUSR2 as i32);
        assert!(matches!(exit_signal(usr2), Some((Sig::Custom(ref n), false)) if n == "USR2"));
        assert!(exit_signal(ExitStatus::from_raw(7 << 8)).is_none());
        assert_eq!(local_signal(&Sig::TERM), Some(Signal::SIGTERM));
        assert_eq!(local_signal(&Sig::Custom("WINCH".into())), Some(Signal::SIGWINCH));
        assert_eq!(local_signal(&Sig::Custom("NOPE".into())), None);
    }

    #[test]
    fn quiet_counts_only_silence_from_the_source() {
        let (a, b) = (PumpState::default(), PumpState::default());
        let mut q = Quiet::default();
        let t0 = Instant::now();
        assert_eq!(q.observe(t0, &[(&a, false), (&b, true)]), Duration::ZERO);
        assert_eq!(q.observe(t0 + Duration::from_millis(300), &[(&a, false), (&b, true)]), Duration::from_millis(300));
        a.reads.fetch_add(1, Ordering::Relaxed);
        assert_eq!(q.observe(t0 + Duration::from_millis(400), &[(&a, false), (&b, true)]), Duration::ZERO);
        a.writing.store(true, Ordering::Relaxed);
        assert_eq!(q.observe(t0 + Duration::from_secs(5), &[(&a, false), (&b, true)]), Duration::ZERO);
    }
}
