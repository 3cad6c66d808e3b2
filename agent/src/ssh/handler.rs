//! One SSH connection's handler: public-key authentication against the fingerprints the connection
//! was given, session requests (pty, env, shell, exec, subsystem, signals, window changes, agent and
//! X11 forwarding), channel opens (sessions, `direct-tcpip`, `direct-streamlocal@openssh.com`) and
//! global requests (`tcpip-forward`, `streamlocal-forward@openssh.com` and their cancels).
//!
//! Channel requests are answered here, before russh reads the next packet: OpenSSH sends `pty-req`,
//! `env` and `exec` back to back, and russh remembers only the latest request's want-reply flag.

use super::activity::Gauge;
use super::forward::{self, Link, Listener};
use super::inbound::Backlogs;
use super::keys::fingerprint;
use super::session::{self, Control, Launch, Program, PtySpec};
use super::x11::{Display as X11Display, Request as X11Request};
use super::{Peer, SshServer, MAX_CHANNELS};
use russh::keys::PublicKey;
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet, Pty, Sig};
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tether_shared::limits;
use tether_shared::login::LoggedIn;
use tokio::sync::{mpsc, Semaphore};

/// Environment variables a client may set on one session.
const MAX_CLIENT_ENV: usize = 64;
/// Remote forwards (TCP and Unix together) one connection may hold.
const MAX_FORWARDS: usize = 64;
/// How long a `direct-tcpip` connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `TERM` value kept.
const MAX_TERM: usize = 64;
/// Variables never passed from the agent's own environment to sessions: the agent's secret, and the
/// SSH variables of whatever session started the agent.
const HIDDEN_ENV: &[&str] = &[
    crate::config::TOKEN_ENV,
    "SSH_AUTH_SOCK",
    "SSH_AGENT_PID",
    "SSH_CLIENT",
    "SSH_CONNECTION",
    "SSH_TTY",
    "SSH_ORIGINAL_COMMAND",
    // The agent's own settings (the token is above; `TETHER_AGENT_*` are all dropped too).
    "TETHER_COORDINATOR",
    "TETHER_CA",
    "TETHER_CA_SHA256",
    "TETHER_LOG",
    "TETHER_LOG_FORMAT",
    // The shell that started the agent: a login shell sets its own. An inherited SHLVL of 1 makes
    // Debian's bash skip ~/.bashrc for `ssh ws command`, as it would not under sshd.
    "SHLVL",
    "OLDPWD",
    "PWD",
    "_",
    // Set from the client's request only when it asked for a terminal.
    "TERM",
];

/// Whether the agent's own variable `key` stays out of sessions.
fn hidden(key: &std::ffi::OsStr) -> bool {
    HIDDEN_ENV.iter().any(|h| key == *h) || key.as_encoded_bytes().starts_with(b"TETHER_AGENT_")
}
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A session channel as the handler sees it.
struct SessionChannel {
    control: mpsc::Sender<Control>,
    pty: Option<PtySpec>,
    env: Vec<(String, String)>,
    started: bool,
    /// The display `ssh -X` asked for, while the channel lasts.
    x11: Option<super::x11::Display>,
}

pub struct Connection {
    server: Arc<SshServer>,
    peer: Peer,
    /// `SHA256:…` fingerprints of the keys this connection may authenticate with.
    keys: Arc<[String]>,
    /// Set once the client has logged in: ends its login deadline.
    logged_in: LoggedIn,
    /// The login name the client gave.
    login: String,
    sessions: HashMap<ChannelId, SessionChannel>,
    /// One permit per open channel, held by the channel's task.
    channels: Arc<Semaphore>,
    tcp_forwards: HashMap<(String, u32), Listener>,
    unix_forwards: HashMap<String, Listener>,
    /// Agent forwarding, once the client asked for it: `SSH_AUTH_SOCK` for later sessions.
    agent: Option<(PathBuf, Listener)>,
    /// What each channel's consumer holds of the client's input, for the window russh grants.
    backlogs: Arc<Backlogs>,
    _gauge: Gauge,
}

impl Connection {
    pub fn new(server: Arc<SshServer>, peer: Peer, keys: Arc<[String]>, logged_in: LoggedIn) -> Self {
        let gauge = server.activity.connection();
        Connection {
            server,
            peer,
            keys,
            logged_in,
            login: String::new(),
            sessions: HashMap::new(),
            channels: Arc::new(Semaphore::new(MAX_CHANNELS)),
            tcp_forwards: HashMap::new(),
            unix_forwards: HashMap::new(),
            agent: None,
            backlogs: Arc::new(Backlogs::default()),
            _gauge: gauge,
        }
    }

    fn allows(&self, key: &PublicKey) -> bool {
        let fp = fingerprint(key);
        self.keys.contains(&fp)
    }

    fn link(&self, session: &Session) -> Link {
        Link {
            handle: session.handle(),
            activity: self.server.activity.clone(),
            channels: self.channels.clone(),
            backlogs: self.backlogs.clone(),
        }
    }

    fn forwards(&self) -> usize {
        self.tcp_forwards.len() + self.unix_forwards.len()
    }

    /// What a session's process starts with: the agent's environment without its secrets, the
    /// template's variables, the account, the client's accepted variables, then SSH's own.
    fn launch(&self, program: Program, channel: &SessionChannel) -> Launch {
        let account = &self.server.account;
        let manifest = self.server.manifest();
        let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().filter(|(k, _)| !hidden(k)).collect();
        if let Some(m) = &manifest {
            env.extend(m.env.iter().map(|(k, v)| (k.into(), v.into())));
            env.insert("TETHER_WORKSPACE".into(), m.workspace.clone().into());
        }
        env.insert("HOME".into(), account.home.clone().into());
        env.insert("USER".into(), account.name.clone().into());
        env.insert("LOGNAME".into(), account.name.clone().into());
        env.insert("SHELL".into(), account.shell.clone().into());
        env.entry("PATH".into()).or_insert_with(|| DEFAULT_PATH.into());
        env.extend(channel.env.iter().map(|(k, v)| (k.into(), v.into())));
        let client_port = self.peer.client.rsplit(' ').next().unwrap_or("0");
        let client_ip = self.peer.client.split(' ').next().unwrap_or("0.0.0.0");
        let server_port = self.peer.server.rsplit(' ').next().unwrap_or("0");
        env.insert("SSH_CONNECTION".into(), format!("{} {}", self.peer.client, self.peer.server).into());
        env.insert("SSH_CLIENT".into(), format!("{client_ip} {client_port} {server_port}").into());
        if let Some((sock, _)) = &self.agent {
            env.insert("SSH_AUTH_SOCK".into(), sock.clone().into());
        }
        if let Some(display) = &channel.x11 {
            env.insert("DISPLAY".into(), display.env_value().into());
        }
        // Whether it exists is checked where the program is spawned, off the runtime's thread.
        let cwd = match manifest.as_ref().and_then(|m| m.working_dir.as_deref()).filter(|d| !d.is_empty()) {
            Some(dir) => account.home.join(dir),
            None => account.home.clone(),
        };
        Launch {
            program,
            shell: account.shell.clone(),
            env: env.into_iter().collect(),
            cwd,
            home: account.home.clone(),
            pty: channel.pty.clone(),
        }
    }

    /// Starts the program of a `shell`, `exec` or `subsystem` request and answers it.
    async fn start(&mut self, channel: ChannelId, program: Program, session: &mut Session) -> Result<(), russh::Error> {
        let Some(state) = self.sessions.get(&channel).filter(|s| !s.started) else {
            return session.channel_failure(channel);
        };
        let interactive = matches!(program, Program::Shell) && state.pty.is_some();
        let what = match &program {
            Program::Shell => "shell".to_string(),
            Program::Exec(_) => "command".to_string(),
            Program::Subsystem { path, .. } => format!("subsystem {}", path.display()),
        };
        let launch = self.launch(program, state);
        let launching = session::Launching {
            launch,
            server: self.server.clone(),
            interactive,
            what,
            client: self.peer.client.to_string(),
            login: self.login.to_string(),
        };
        match self.sessions.get_mut(&channel) {
            Some(state) => match state.control.try_send(Control::Start(Box::new(launching))) {
                Ok(()) => {
                    state.started = true;
                    session.channel_success(channel)
                }
                Err(_) => session.channel_failure(channel),
            },
            None => session.channel_failure(channel),
        }
    }

    /// Drops the state of session channels whose task has ended.
    fn prune(&mut self) {
        self.sessions.retain(|_, s| !s.control.is_closed());
    }
}

/// The MOTD as a terminal wants it: CRLF line ends, ending with one.
pub fn motd_bytes(motd: &str) -> Vec<u8> {
    let mut text = motd.replace("\r\n", "\n").replace('\n', "\r\n");
    if !text.ends_with("\r\n") {
        text.push_str("\r\n");
    }
    text.into_bytes()
}

/// Whether a client may set `name`: `LANG`, `LC_*` and the template's list (`*` ends a prefix).
pub fn env_allowed(name: &str, allowed: &[String]) -> bool {
    name == "LANG"
        || name.starts_with("LC_")
        || allowed.iter().any(|a| match a.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => a == name,
        })
}

fn valid_env(name: &str, value: &str) -> bool {
    !name.is_empty()
        && name.len() <= limits::MAX_TEXT
        && !name.contains(['=', '\0'])
        && !value.contains('\0')
        && value.len() <= limits::MAX_ENV_VALUE
}

fn pty_size(cols: u32, rows: u32, px: u32, py: u32) -> pty_process::Size {
    let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    pty_process::Size::new_with_pixel(clamp(rows), clamp(cols), clamp(px), clamp(py))
}

/// A forward's connect failure with the reason, which OpenSSH's client prints ("channel 2: open
/// failed: connect failed: connect to 127.0.0.1:9999 inside the workspace: connection refused").
fn connect_failed(target: String, error: Option<std::io::Error>) -> ChannelOpenFailure {
    let why = match error {
        Some(e) => {
            // "Connection refused (os error 111)": the number means nothing to the user.
            let text = e.to_string();
            let text = text.split(" (os error").next().unwrap_or(&text).to_string();
            text.to_lowercase()
        }
        None => format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
    };
    ChannelOpenFailure::Other {
        code: ChannelOpenFailure::ConnectFailed.code(),
        reason: format!("connect to {target} inside the workspace: {why}"),
    }
}

/// `host:port`, with an IPv6 address in brackets.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn too_many_channels() -> ChannelOpenFailure {
    ChannelOpenFailure::Other {
        code: ChannelOpenFailure::ResourceShortage.code(),
        reason: format!("at most {MAX_CHANNELS} channels per SSH connection"),
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::Reject {
            proceed_with_methods: Some(MethodSet::from(&[MethodKind::PublicKey][..])),
            partial_success: false,
        })
    }

    async fn auth_publickey_offered(&mut self, _user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        if self.allows(offer.public_key) {
            return Ok(Auth::Accept);
        }
        tracing::debug!(client = %self.peer.client, key = %fingerprint(offer.public_key), "ssh key not accepted");
        Ok(Auth::reject())
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        if !self.allows(key.public_key) {
            tracing::info!(client = %self.peer.client, key = %fingerprint(key.public_key), "ssh key refused");
            return Ok(Auth::reject());
        }
        self.login = user.chars().take(limits::MAX_NAME).collect();
        tracing::info!(
            client = %self.peer.client,
            user = self.peer.user.as_deref().unwrap_or("-"),
            connection = self.peer.connection_id.unwrap_or(0),
            login = %self.login,
            key = %fingerprint(key.public_key),
            "ssh connection authenticated"
        );
        Ok(Auth::Accept)
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        self.logged_in.set();
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.prune();
        let Ok(permit) = self.channels.clone().try_acquire_owned() else {
            reply.reject(too_many_channels()).await;
            return Ok(());
        };
        let (control, control_rx) = mpsc::channel(16);
        self.sessions
            .insert(channel.id(), SessionChannel { control, pty: None, env: Vec::new(), started: false, x11: None });
        let (handle, activity) = (session.handle(), self.server.activity.clone());
        let input = self.backlogs.queue(channel.id());
        tokio::spawn(async move {
            let _permit = permit;
            session::serve(channel, handle, control_rx, activity, input).await;
        });
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Ok(port) = u16::try_from(port) else {
            let reason = format!("{port} is not a TCP port");
            reply.reject(ChannelOpenFailure::Other { code: ChannelOpenFailure::ConnectFailed.code(), reason }).await;
            return Ok(());
        };
        let Ok(permit) = self.channels.clone().try_acquire_owned() else {
            reply.reject(too_many_channels()).await;
            return Ok(());
        };
        let host = host.to_string();
        let activity = self.server.activity.clone();
        let input = self.backlogs.queue(channel.id());
        // Connecting can take a while: never in the handler, which would stall the whole connection.
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect((host.as_str(), port))).await {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    reply.accept().await;
                    super::splice::splice(channel, stream, &activity, input).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(host = %host, port, error = %e, "direct-tcpip: connect failed");
                    reply.reject(connect_failed(host_port(&host, port), Some(e))).await;
                }
                Err(_) => reply.reject(connect_failed(host_port(&host, port), None)).await,
            }
        });
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Ok(permit) = self.channels.clone().try_acquire_owned() else {
            reply.reject(too_many_channels()).await;
            return Ok(());
        };
        let path = socket_path.to_string();
        let activity = self.server.activity.clone();
        let input = self.backlogs.queue(channel.id());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(CONNECT_TIMEOUT, forward::connect_unix(&path)).await {
                Ok(Ok(stream)) => {
                    reply.accept().await;
                    super::splice::splice(channel, stream, &activity, input).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(path = %path, error = %e, "direct-streamlocal: connect failed");
                    reply.reject(connect_failed(path, Some(e))).await;
                }
                Err(_) => reply.reject(connect_failed(path, None)).await,
            }
        });
        Ok(())
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.sessions.remove(&channel);
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        px: u32,
        py: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.sessions.get_mut(&channel).filter(|s| !s.started && s.pty.is_none()) {
            Some(s) => {
                let term = if term.is_empty() || term.len() > MAX_TERM || term.contains('\0') { "xterm" } else { term };
                let modes = modes.iter().take(super::modes::MAX_MODES).copied().collect();
                s.pty = Some(PtySpec { term: term.to_string(), size: pty_size(cols, rows, px, py), modes });
                session.channel_success(channel)
            }
            None => session.channel_failure(channel),
        }
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        single_connection: bool,
        x11_auth_protocol: &str,
        x11_auth_cookie: &str,
        x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(state) = self.sessions.get(&channel).filter(|s| !s.started && s.x11.is_none()) else {
            return session.channel_failure(channel);
        };
        let request = match X11Request::new(single_connection, x11_auth_protocol, x11_auth_cookie, x11_screen_number) {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(client = %self.peer.client, error = %e, "x11 forwarding refused");
                return session.channel_failure(channel);
            }
        };
        // xauth writes to the session's X authority file: give it the session's environment.
        let env = self.launch(Program::Shell, state).env;
        match X11Display::open(self.link(session), &request, env).await {
            Ok(opened) => {
                tracing::info!(client = %self.peer.client, display = opened.number(), "x11 forwarding on");
                match self.sessions.get_mut(&channel) {
                    Some(s) if !s.started && s.x11.is_none() => {
                        s.x11 = Some(opened);
                        session.channel_success(channel)
                    }
                    _ => session.channel_failure(channel),
                }
            }
            Err(e) => {
                tracing::warn!(client = %self.peer.client, error = %e, "x11 forwarding refused");
                session.channel_failure(channel)
            }
        }
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let allowed = self.server.manifest().map(|m| m.ssh.allowed_env.clone()).unwrap_or_default();
        match self.sessions.get_mut(&channel) {
            Some(s)
                if !s.started
                    && s.env.len() < MAX_CLIENT_ENV
                    && valid_env(name, value)
                    && env_allowed(name, &allowed) =>
            {
                s.env.retain(|(k, _)| k != name);
                s.env.push((name.to_string(), value.to_string()));
                session.channel_success(channel)
            }
            _ => {
                tracing::debug!(name = %name.chars().take(64).collect::<String>(), "ssh env variable refused");
                session.channel_failure(channel)
            }
        }
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        self.start(channel, Program::Shell, session).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if data.contains(&0) {
            return session.channel_failure(channel);
        }
        let command = std::ffi::OsStr::from_bytes(data).to_os_string();
        self.start(channel, Program::Exec(command), session).await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name != "sftp" {
            tracing::debug!(name = %name.chars().take(64).collect::<String>(), "unknown ssh subsystem");
            return session.channel_failure(channel);
        }
        match session::sftp_program() {
            Ok(program) => self.start(channel, program, session).await,
            Err(e) => {
                tracing::warn!(error = %e, "no sftp server to run");
                session.channel_failure(channel)
            }
        }
    }

    /// russh has just refilled `channel`'s window; the target for its next refills (see `inbound`).
    fn adjust_window(&mut self, channel: ChannelId, _current: u32) -> u32 {
        self.backlogs.window_for(channel)
    }

    async fn data(&mut self, channel: ChannelId, _data: &[u8], _session: &mut Session) -> Result<(), Self::Error> {
        self.backlogs.pause(channel).await;
        Ok(())
    }

    async fn extended_data(
        &mut self,
        channel: ChannelId,
        _code: u32,
        _data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.backlogs.pause(channel).await;
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        cols: u32,
        rows: u32,
        px: u32,
        py: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let size = pty_size(cols, rows, px, py);
        match self.sessions.get_mut(&channel) {
            Some(s) if s.started => {
                let _ = s.control.try_send(Control::Resize(size));
                session.channel_success(channel)
            }
            Some(SessionChannel { pty: Some(pty), .. }) => {
                pty.size = size;
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn signal(&mut self, channel: ChannelId, signal: Sig, _session: &mut Session) -> Result<(), Self::Error> {
        if let (Some(s), Some(sig)) = (self.sessions.get(&channel), session::local_signal(&signal)) {
            if s.started {
                let _ = s.control.try_send(Control::Signal(sig));
            }
        }
        Ok(())
    }

    /// The client takes no more output (OpenSSH's `eow@openssh.com`, after `ssh … | head`): the
    /// program's output is no longer read, so its next write ends it with SIGPIPE, as under sshd.
    async fn channel_eow(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        if let Some(s) = self.sessions.get(&channel) {
            if s.started {
                // Once per channel, and never lost: behind a burst of window changes it waits its turn.
                if let Err(mpsc::error::TrySendError::Full(eow)) = s.control.try_send(Control::Eow) {
                    let control = s.control.clone();
                    tokio::spawn(async move { control.send(eow).await });
                }
            }
        }
        Ok(())
    }

    async fn agent_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<bool, Self::Error> {
        if !self.sessions.contains_key(&channel) {
            return Ok(false);
        }
        if self.agent.is_none() {
            match forward::listen_agent(self.link(session), &self.server.runtime_dir) {
                Ok(agent) => self.agent = Some(agent),
                Err(e) => {
                    tracing::warn!(error = %e, "agent forwarding: cannot create the socket");
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        if self.forwards() >= MAX_FORWARDS || address.len() > limits::MAX_TEXT {
            return Ok(false);
        }
        match forward::listen_tcp(self.link(session), address, *port).await {
            Ok((bound, listener)) => {
                tracing::info!(client = %self.peer.client, address = %address, port = bound, "remote forward listening");
                *port = bound;
                self.tcp_forwards.insert((address.to_string(), bound), listener);
                Ok(true)
            }
            Err(e) => {
                tracing::info!(address = %address, port = *port, error = %e, "remote forward refused");
                Ok(false)
            }
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.tcp_forwards.remove(&(address.to_string(), port)).is_some())
    }

    async fn streamlocal_forward(&mut self, socket_path: &str, session: &mut Session) -> Result<bool, Self::Error> {
        if self.forwards() >= MAX_FORWARDS
            || socket_path.len() > limits::MAX_TEXT
            || self.unix_forwards.contains_key(socket_path)
        {
            return Ok(false);
        }
        match forward::listen_unix(self.link(session), socket_path).await {
            Ok(listener) => {
                tracing::info!(client = %self.peer.client, path = %socket_path, "remote unix forward listening");
                self.unix_forwards.insert(socket_path.to_string(), listener);
                Ok(true)
            }
            Err(e) => {
                tracing::info!(path = %socket_path, error = %e, "remote unix forward refused");
                Ok(false)
            }
        }
    }

    async fn cancel_streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.unix_forwards.remove(socket_path).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_policy() {
        let allowed = vec!["EDITOR".to_string(), "GIT_*".to_string()];
        for ok in ["LANG", "LC_ALL", "LC_CTYPE", "EDITOR", "GIT_AUTHOR_NAME"] {
            assert!(env_allowed(ok, &allowed), "{ok}");
        }
        for no in ["PATH", "LD_PRELOAD", "EDITORS", "GI", "LANGUAGE", "lang"] {
            assert!(!env_allowed(no, &allowed), "{no}");
        }
        assert!(!valid_env("A=B", "x"));
        assert!(!valid_env("A", "x\0y"));
        assert!(valid_env("LANG", "C.UTF-8"));
    }

    #[test]
    fn motd_lines_end_in_crlf() {
        assert_eq!(motd_bytes("a\nb"), b"a\r\nb\r\n");
        assert_eq!(motd_bytes("a\r\n"), b"a\r\n");
    }
}
