//! The `tether` command line: flags, and how each command prints what the API returns.

use crate::client::{enc, Client};
use crate::view::{CreatedView, LogsView, ShowView, SpanView, WorkspaceView};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tether_shared::{limits, WorkspaceStatus};

/// Where `--help` lists the options of the commands that talk to a coordinator: apart, so that
/// `serve --help` does not seem to offer them.
const CLIENT_OPTIONS: &str = "Options of the commands that talk to a coordinator (not serve)";

#[derive(Parser, Debug)]
#[command(name = "tether", version, about = "Tether coordinator and command-line interface")]
pub struct Cli {
    /// Coordinator API URL.
    #[arg(long, env = "TETHER_URL", global = true, help_heading = CLIENT_OPTIONS)]
    pub url: Option<String>,
    /// API token: the admin's, or a user's (their own workspaces and SSH only).
    #[arg(long, env = "TETHER_TOKEN", global = true, hide_env_values = true, help_heading = CLIENT_OPTIONS)]
    pub token: Option<String>,
    /// The coordinator's CA certificate (PEM), trusted for an https:// URL besides the system's roots
    /// [default: the ca.pem of the --data-dir coordinator, if any].
    #[arg(long, env = "TETHER_CA", global = true, value_name = "FILE", help_heading = CLIENT_OPTIONS)]
    pub ca: Option<PathBuf>,
    /// The coordinator's data directory (on its own machine, enough to find the URL and token).
    #[arg(long, env = "TETHER_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Log format for `serve` and `demo`.
    #[arg(long, env = "TETHER_LOG_FORMAT", global = true, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `info,tether_coordinator=debug` (tracing's EnvFilter syntax).
    #[arg(long, env = "TETHER_LOG", global = true, value_name = "FILTER", value_parser = parse_filter)]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the coordinator.
    Serve(Box<ServeArgs>),
    /// Start a coordinator on embedded defaults, run a sample workspace through its life, and show it.
    Demo(DemoArgs),
    /// Manage workspaces.
    #[command(subcommand, visible_alias = "ws")]
    Workspace(WorkspaceCmd),
    /// Manage users and their SSH keys.
    #[command(subcommand)]
    User(crate::cli_ssh::UserCmd),
    /// Back up and restore the coordinator's database and keys.
    #[command(subcommand)]
    Admin(crate::backup::AdminCmd),
    /// Check the coordinator's configuration, or print an example file.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Brokered SSH connections: who reached which workspace, when, and how much.
    Audit {
        /// Only connections made as this user.
        #[arg(long)]
        user: Option<String>,
        /// Only connections to this workspace (its name, without the host suffix such as `.tether`).
        #[arg(long)]
        workspace: Option<String>,
        /// Most connections to show, newest first (1 to 10000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=10_000))]
        limit: i64,
        /// Print the connections as a JSON array (adding each one's SSH key fingerprint).
        #[arg(long)]
        json: bool,
    },
    /// Write a `Host *.tether` block into your ssh config, so `ssh NAME.tether` works with strict
    /// host-key checking (the suffix is the coordinator's `--ssh-host-suffix`; each suffix has its
    /// own block, so several coordinators can share one config).
    ConfigSsh {
        /// The Tether user you log in as (default: the owner of the API token).
        #[arg(long)]
        user: Option<String>,
        /// Edit this file instead of ~/.ssh/config; the managed known_hosts file goes beside it.
        #[arg(long, value_name = "FILE")]
        ssh_config: Option<PathBuf>,
        /// Private key to use (IdentityFile); default: ssh's own choice.
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
    /// SSH into a workspace through the coordinator's API port (for networks that block the front
    /// door's port). With --stdio, carry one connection on stdin/stdout: `ProxyCommand tether ssh
    /// --stdio %h`.
    Ssh {
        /// Workspace (`NAME`, or its host name `NAME.tether`).
        workspace: String,
        /// Carry the connection on stdin/stdout instead of running ssh.
        #[arg(long)]
        stdio: bool,
        /// With the admin token: connect as this user.
        #[arg(long = "as", value_name = "USER")]
        as_user: Option<String>,
        /// Passed to ssh (a command to run, or options after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Check what `tether serve` with these flags would use (file, environment, flags): prints every
    /// setting and where it came from, or every problem, and exits 64 without starting.
    Check(Box<ServeArgs>),
    /// Print a configuration file with every setting, commented out at its default.
    Example,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Configuration file (TOML); flags and TETHER_… variables override it.
    #[arg(long, env = "TETHER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// HTTP API address (port 0 picks a free port).
    #[arg(long, env = "TETHER_LISTEN_HTTP", default_value = "127.0.0.1:7080")]
    pub listen_http: SocketAddr,
    /// Agent tunnel (QUIC, UDP) address.
    #[arg(long, env = "TETHER_LISTEN_QUIC", default_value = "0.0.0.0:7443")]
    pub listen_quic: SocketAddr,
    /// The HOST:PORT agents dial, if not the bound address (NAT, load balancer, DNS name).
    #[arg(long, env = "TETHER_ADVERTISE_QUIC", value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub advertise_quic: Option<String>,
    /// The tether-agent binary the process provisioner runs (default: next to `tether`).
    #[arg(long, env = "TETHER_AGENT_BINARY")]
    pub agent_binary: Option<PathBuf>,
    /// Most agent connections held at once, once welcomed. Connections that have not said hello yet
    /// have places of their own (4096, at most 256 from one address) and 10 seconds to say it.
    #[arg(long, env = "TETHER_MAX_AGENTS", default_value_t = 50_000, value_parser = parse_max_agents)]
    pub max_agents: usize,
    /// SSH front door (TCP) address, or `off`.
    #[arg(long, env = "TETHER_LISTEN_SSH", default_value = "0.0.0.0:2222", value_parser = parse_listen)]
    pub listen_ssh: Listen,
    /// The HOST:PORT users dial for the SSH front door, if not the bound address.
    #[arg(long, env = "TETHER_ADVERTISE_SSH", value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub advertise_ssh: Option<String>,
    /// What workspace host names end in (`ssh dev.tether`). Give each coordinator its own
    /// (`.staging`) to reach several from one ssh config: each `tether config-ssh` block then
    /// trusts its own coordinator's CA for its own names.
    #[arg(long, env = "TETHER_SSH_HOST_SUFFIX", value_name = "SUFFIX", default_value = crate::sshca::HOST_SUFFIX,
          value_parser = crate::sshca::parse_host_suffix)]
    pub ssh_host_suffix: String,
    /// Time an SSH client has from connecting to the front door to logging in, its key exchange
    /// included (sshd's LoginGraceTime); then it is disconnected.
    #[arg(long, env = "TETHER_SSH_LOGIN_GRACE", value_name = "DURATION", default_value = "30s", value_parser = parse_grace)]
    pub ssh_login_grace: Duration,
    /// HTTPS address (TCP) of the same API, which also serves workspaces their agent (/agent/init.sh),
    /// or `off`. Same port number as the agent tunnel's UDP, so one number to open.
    #[arg(long, env = "TETHER_LISTEN_HTTPS", default_value = "0.0.0.0:7443", value_parser = parse_listen)]
    pub listen_https: Listen,
    /// The https://HOST[:PORT] URL workspaces reach the HTTPS listener at, if not the bound address.
    #[arg(long, env = "TETHER_ADVERTISE_HTTPS", value_name = "URL", value_parser = crate::https::parse_https_url)]
    pub advertise_https: Option<String>,
    /// PEM certificate chain for HTTPS (e.g. a public certificate); with --tls-key. Default: a
    /// certificate from the coordinator's own CA for localhost and the advertised host names.
    #[arg(long, env = "TETHER_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "TETHER_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// How long the SSH audit log keeps a connection after it ended (`90d`, `12h`), or `forever`.
    #[arg(long, env = "TETHER_KEEP_AUDIT", value_name = "DURATION", default_value = "90d", value_parser = parse_keep)]
    pub keep_audit: Keep,
    /// How long the logs and timings of a workspace's earlier builds are kept after the build
    /// started, or `forever`. The current build's are kept while it is current; a deleted
    /// workspace's builds, history and record go once it has been deleted that long.
    #[arg(long, env = "TETHER_KEEP_BUILDS", value_name = "DURATION", default_value = "30d", value_parser = parse_keep)]
    pub keep_builds: Keep,
    /// Most log bytes kept for one build of a workspace, in MiB. A build that reaches it gets one
    /// line saying so, and its later lines are dropped; other workspaces are not affected.
    #[arg(long, env = "TETHER_MAX_BUILD_LOG_MIB", value_name = "MIB", default_value_t = limits::DEFAULT_MAX_BUILD_LOG_MIB,
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub max_build_log_mib: u64,
}

/// How long records are kept: `None` is for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep(pub Option<Duration>);

/// Shortest retention: anything shorter would delete records while they are being read.
const MIN_KEEP: Duration = Duration::from_secs(1);
/// Longest retention; beyond it, say `forever`.
const MAX_KEEP: Duration = Duration::from_secs(100 * 365 * 86_400);

fn parse_keep(s: &str) -> Result<Keep, String> {
    if s.eq_ignore_ascii_case("forever") {
        return Ok(Keep(None));
    }
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration (like 90d or 12h) or `forever`: {e}"))?;
    if !(MIN_KEEP..=MAX_KEEP).contains(&d) {
        return Err(format!("'{s}' is out of range: keep records at least 1s and at most 100 years, or `forever`"));
    }
    Ok(Keep(Some(d)))
}

/// Shortest and longest login grace time: under a second a slow network fails real users; over an
/// hour, idle connections hold their places for nothing.
const MIN_GRACE: Duration = Duration::from_secs(1);
const MAX_GRACE: Duration = Duration::from_secs(3600);

fn parse_grace(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration (like 30s or 2m): {e}"))?;
    if !(MIN_GRACE..=MAX_GRACE).contains(&d) {
        return Err(format!("'{s}' is out of range: from 1s to 1h"));
    }
    Ok(d)
}

/// An address to listen on, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

/// At least one: 0 would turn every agent away.
fn parse_max_agents(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("0 would turn every agent away; give at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("'{s}' is not a number of agents ({e})")),
    }
}

fn parse_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("'{s}' is not a log filter: {e}"))
}

/// `HOST:PORT` or `[IPv6]:PORT`, as agents and ssh clients will dial it.
fn parse_host_port(s: &str) -> Result<String, String> {
    let bad = |why: &str| format!("'{s}' is not HOST:PORT ({why})");
    let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad("the port is not 1-65535"))?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.len() > 253 || host.contains(char::is_whitespace) || host.contains('/') {
        return Err(bad("bad host name"));
    }
    Ok(s.to_string())
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(Listen(None));
    }
    s.parse().map(|a| Listen(Some(a))).map_err(|e| format!("'{s}' is not HOST:PORT or `off`: {e}"))
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the demo's data here instead of a temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Leave the coordinator and workspace running at the end, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
}

#[derive(Subcommand, Debug)]
pub enum WorkspaceCmd {
    /// Create a workspace from a template.
    Create {
        /// The new workspace's name (lowercase letters, digits and '-'); `ssh NAME.tether` reaches it.
        name: String,
        /// Template file (TOML). Without one the workspace is external: you start its agent.
        #[arg(long)]
        template: Option<PathBuf>,
        /// The user who may SSH into it (an existing user; others need `tether workspace grant`).
        #[arg(long)]
        owner: Option<String>,
        /// Start it right away.
        #[arg(long)]
        start: bool,
        /// With --start and a template: wait until the start has finished; exit 1 unless it is
        /// running.
        #[arg(long, requires = "start")]
        wait: bool,
        /// With --wait: give up after this long (e.g. 10m; exit 1). Default 1h.
        #[arg(long, requires = "wait", value_name = "DURATION")]
        timeout: Option<humantime::Duration>,
        /// Print the created workspace as JSON (with an external one's agent token and command;
        /// with --wait, once it settles).
        #[arg(long)]
        json: bool,
    },
    /// Start a workspace (a new build), or bring back a lost `process` agent. A workspace that is
    /// already starting or running is left as it is, and the command succeeds.
    Start {
        /// The workspace's name.
        name: String,
        /// Wait until the start has finished; exit 1 unless it is running.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (e.g. 10m; exit 1). Default 1h.
        #[arg(long, requires = "wait", value_name = "DURATION")]
        timeout: Option<humantime::Duration>,
        /// Print the workspace as JSON (once it settles, with --wait).
        #[arg(long)]
        json: bool,
    },
    /// Stop a workspace: its stop scripts run, then the provisioner stops it. A workspace that is
    /// already stopping or stopped is left as it is, and the command succeeds.
    Stop {
        /// The workspace's name.
        name: String,
        /// Wait until the stop has finished; exit 1 unless it is stopped.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (e.g. 10m; exit 1). Default 1h.
        #[arg(long, requires = "wait", value_name = "DURATION")]
        timeout: Option<humantime::Duration>,
        /// Print the workspace as JSON (once it settles, with --wait).
        #[arg(long)]
        json: bool,
    },
    /// Delete a workspace and its resources.
    Delete {
        /// The workspace's name.
        name: String,
        /// Delete it even if the provisioner's stop or delete command fails (say the container was
        /// removed by hand): the failures are logged and kept in the status reason, and whatever
        /// the provisioner could not remove is left behind.
        #[arg(long)]
        force: bool,
        /// Wait until the delete has finished; exit 1 unless it is deleted.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (e.g. 10m; exit 1). Default 1h.
        #[arg(long, requires = "wait", value_name = "DURATION")]
        timeout: Option<humantime::Duration>,
        /// Print the workspace as JSON (once it settles, with --wait).
        #[arg(long)]
        json: bool,
    },
    /// List workspaces, with a count by status.
    List {
        /// Only workspaces in this status, or in any of several separated by commas: pending,
        /// starting, running, unhealthy, stopping, stopped, failed, deleting or deleted.
        #[arg(long, value_parser = status_words)]
        status: Option<String>,
        /// Include deleted workspaces.
        #[arg(long)]
        all: bool,
        /// Print the workspaces as a JSON array (without the count by status).
        #[arg(long)]
        json: bool,
    },
    /// Count workspaces in each status.
    Count {
        /// Print the counts as a JSON object, from status to count.
        #[arg(long)]
        json: bool,
    },
    /// Show one workspace: status, reason, agent, recent history.
    Show {
        /// The workspace's name.
        name: String,
        /// Print the workspace and its history as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Timing breakdown of a build: provisioning, agent connection, every script.
    Timings {
        /// The workspace's name.
        name: String,
        /// Build number (default: the current one).
        #[arg(long)]
        build: Option<i64>,
        /// Print the timing spans as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Startup script and provisioning logs.
    Logs {
        /// The workspace's name.
        name: String,
        /// Keep printing new lines as they arrive, until the workspace is stopped, deleted, or
        /// failed with no agent.
        #[arg(long, short)]
        follow: bool,
        /// Only this script (or `provision:start` etc.).
        #[arg(long)]
        script: Option<String>,
        /// Build number (default: the current one).
        #[arg(long)]
        build: Option<i64>,
        /// Print each log line as a JSON object, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Wait until a workspace reaches one of the given statuses.
    Wait {
        /// The workspace's name.
        name: String,
        /// Comma-separated statuses, e.g. `running,unhealthy`. A workspace that is failed, stopped
        /// or deleted, with nothing under way, is reported at once rather than waited on (except an
        /// external workspace, whose agent may be started by hand).
        #[arg(long = "for", value_name = "STATUSES", value_parser = status_words)]
        until: String,
        /// Give up after this long (e.g. 90s, 5m).
        #[arg(long, default_value = "120s")]
        timeout: humantime::Duration,
        /// Print the workspace as JSON once it gets there.
        #[arg(long)]
        json: bool,
    },
    /// Issue a new agent token for an external workspace (the old one stops working, and an agent
    /// connected with it is disconnected).
    Token {
        /// The workspace's name.
        name: String,
        /// Print the new agent token and the command that starts the agent as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Let a user reach a workspace over SSH (besides its owner).
    Grant {
        /// The workspace's name.
        name: String,
        /// The user to let in.
        user: String,
        /// Print the owner and the granted users as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take back a grant.
    Revoke {
        /// The workspace's name.
        name: String,
        /// The user whose grant to take back.
        user: String,
        /// Print the owner and the granted users as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show who may reach a workspace.
    Access {
        /// The workspace's name.
        name: String,
        /// Print the owner and the granted users as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("tether");
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/share/tether"),
        None => PathBuf::from("tether-data"),
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Column-aligned plain text; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                s.push_str(&c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
    out
}

pub fn seconds(ms: i64) -> String {
    format!("{:.3}s", ms as f64 / 1000.0)
}

pub fn timings_table(spans: &[SpanView]) -> String {
    let rows: Vec<Vec<String>> = spans
        .iter()
        .map(|s| {
            vec![
                s.stage.clone(),
                s.name.clone(),
                // A span may begin before its build (an agent that waited for a coordinator that
                // was down): `-13.098s`, not `+-13.098s`.
                if s.offset_ms < 0 { seconds(s.offset_ms) } else { format!("+{}", seconds(s.offset_ms)) },
                seconds(s.duration_ms),
                s.exit_code.map_or("-".into(), |c| c.to_string()),
                s.status.to_string(),
            ]
        })
        .collect();
    table(&["STAGE", "NAME", "START", "DURATION", "EXIT", "STATUS"], &rows)
}

fn ago(rfc: &Option<String>) -> String {
    let Some(s) = rfc else { return "-".into() };
    match humantime::parse_rfc3339(s) {
        Ok(t) => match std::time::SystemTime::now().duration_since(t) {
            Ok(d) => format!("{}s ago", d.as_secs()),
            Err(_) => "just now".into(),
        },
        Err(_) => s.clone(),
    }
}

pub fn workspaces_table(list: &[WorkspaceView]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|w| {
            vec![
                w.name.clone(),
                w.status.to_string(),
                w.lifecycle.map_or("-".into(), |l| l.to_string()),
                ago(&w.last_heartbeat_at),
                w.status_reason.clone(),
            ]
        })
        .collect();
    table(&["NAME", "STATUS", "LIFECYCLE", "HEARTBEAT", "REASON"], &rows)
}

fn count_line(list: &[WorkspaceView]) -> String {
    let parts: Vec<String> = WorkspaceStatus::ALL
        .iter()
        .map(|s| (s, list.iter().filter(|w| w.status == *s).count()))
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    let total = format!("{} workspace{}", list.len(), if list.len() == 1 { "" } else { "s" });
    if parts.is_empty() {
        total
    } else {
        format!("{total}: {}", parts.join(", "))
    }
}

pub fn print_workspace(w: &WorkspaceView) {
    println!("{}: {} ({})", w.name, w.status, w.status_reason);
}

pub async fn wait_for(client: &Client, name: &str, statuses: &str, timeout: Duration) -> anyhow::Result<WorkspaceView> {
    let deadline = std::time::Instant::now() + timeout;
    let mut lost = false;
    // Retried only once this wait has reached the coordinator: a wrong address fails at once.
    let mut reached = false;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let chunk = left.as_secs().clamp(1, 60);
        match client
            .get::<WorkspaceView>(&format!("/workspaces/{}/wait?for={}&timeout={chunk}", enc(name), enc(statuses)))
            .await
        {
            Ok(w) => return Ok(w),
            // A coordinator restart (an upgrade, say) must not fail the scripts waiting on it:
            // the wait goes on once it is back, within the same deadline.
            Err(e) if coordinator_away(&e, reached) && std::time::Instant::now() + RECONNECT_PAUSE < deadline => {
                reached = true;
                if !lost {
                    eprintln!("{e}; waiting for it to come back");
                    lost = true;
                }
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
            Err(e) if e.to_string().contains(" is still ") => {
                reached = true;
                if std::time::Instant::now() >= deadline {
                    let msg = e.to_string();
                    let what = msg.rsplit_once(" after ").map_or(msg.as_str(), |(w, _)| w);
                    anyhow::bail!("{what} after {}s", timeout.as_secs());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether `e` says the coordinator is away for now (restarting, say), so a wait or a follower
/// should ask again: it shut down under a long poll, cut one off, or is unreachable for a reason
/// that may pass once it has been `reached` (a wrong address fails at once).
fn coordinator_away(e: &anyhow::Error, reached: bool) -> bool {
    if let Some(u) = e.downcast_ref::<crate::client::Unreachable>() {
        return u.transient && (reached || !u.connect);
    }
    e.downcast_ref::<crate::client::ApiFailure>().is_some_and(|f| f.status == reqwest::StatusCode::SERVICE_UNAVAILABLE)
}

/// How often a wait tries the coordinator again while it is unreachable.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// A comma-separated list of workspace statuses, checked as the command line is read.
fn status_words(s: &str) -> Result<String, String> {
    for word in s.split(',') {
        word.trim().parse::<WorkspaceStatus>().map_err(|e| e.to_string())?;
    }
    Ok(s.to_string())
}

/// Every status but `passing`, comma-separated: what to wait for until an operation that passes
/// through those has ended, wherever it ended (a failed one leaves the workspace where it was,
/// `starting` say, and another operation may take over).
pub fn settled_statuses(passing: &[WorkspaceStatus]) -> String {
    let rest: Vec<&str> = WorkspaceStatus::ALL.iter().filter(|s| !passing.contains(s)).map(|s| s.as_str()).collect();
    rest.join(",")
}

/// What a start passes through (and a stop or delete that takes it over).
const STARTING: &[WorkspaceStatus] =
    &[WorkspaceStatus::Pending, WorkspaceStatus::Starting, WorkspaceStatus::Stopping, WorkspaceStatus::Deleting];
/// What a stop or a delete passes through.
pub const STOPPING: &[WorkspaceStatus] = &[WorkspaceStatus::Stopping, WorkspaceStatus::Deleting];

/// What `--wait` after an operation waits for.
struct Settle {
    /// The statuses the workspace passes through while the operation (or one taking it over) runs.
    passing: &'static [WorkspaceStatus],
    /// The one that means it worked.
    target: WorkspaceStatus,
    /// The operation, for the message when it did not work.
    op: &'static str,
    /// How long `--wait` waits.
    timeout: Duration,
}

/// A `--wait`'s limit: `--timeout`, or an hour.
fn limit(timeout: Option<humantime::Duration>) -> Duration {
    timeout.map_or(Duration::from_secs(3600), Into::into)
}

/// After a start, stop or delete: optionally wait for the workspace to settle, then print it. With
/// `--wait`, an operation that ended anywhere but its target is an error (exit status 1), with the
/// operation's error if there is one: `tether workspace start ws --wait && ssh ws.tether` must not
/// go on after a failed start.
async fn settle(
    client: &Client,
    name: &str,
    w: WorkspaceView,
    settle: Option<Settle>,
    json: bool,
) -> anyhow::Result<()> {
    let (w, failed) = match settle {
        Some(until) => wait_settled(client, name, until).await?,
        None => (w, None),
    };
    if json {
        print_json(&w)?;
    } else {
        print_workspace(&w);
    }
    match failed {
        Some(message) => Err(anyhow::anyhow!(message)),
        None => Ok(()),
    }
}

/// Says on stderr when a start or stop had nothing to do: the coordinator answers those with the
/// workspace as it is, already in the status asked for, and the command succeeds.
fn already(w: &WorkspaceView, target: WorkspaceStatus) {
    if w.status == target {
        eprintln!("workspace '{}' is already {target}", w.name);
    }
}

/// Waits until the operation has finished; returns the workspace and, unless it got to the
/// operation's target status, the error to exit with.
async fn wait_settled(
    client: &Client,
    name: &str,
    Settle { passing, target, op, timeout }: Settle,
) -> anyhow::Result<(WorkspaceView, Option<String>)> {
    let w = wait_for(client, name, &settled_statuses(passing), timeout).await?;
    let failed = (w.status != target).then(|| {
        let why = match &w.last_error {
            Some(e) if !e.is_empty() => e.clone(),
            _ => w.status_reason.clone(),
        };
        let hint = match op {
            "delete" => format!(
                "; `tether workspace delete {name} --force` deletes it anyway, leaving behind what the \
                 provisioner could not remove"
            ),
            _ => String::new(),
        };
        format!("the {op} of workspace '{name}' did not finish: it is {} ({why}){hint}", w.status)
    });
    Ok((w, failed))
}

pub async fn workspace(client: &Client, cmd: WorkspaceCmd) -> anyhow::Result<()> {
    match cmd {
        WorkspaceCmd::Create { name, template, owner, start, wait, timeout, json } => {
            if wait && template.is_none() {
                // It would wait for an agent that needs the token this command has yet to print.
                anyhow::bail!(
                    "--wait: an external workspace starts when you run its agent with the token this \
                     prints; create it without --wait, start the agent, then `tether workspace wait {name} --for running`"
                );
            }
            let text = match &template {
                Some(p) => {
                    let text =
                        std::fs::read_to_string(p).with_context(|| format!("reading template {}", p.display()))?;
                    if text.len() > crate::template::MAX_TEMPLATE {
                        anyhow::bail!(
                            "template {} is {} bytes, over the limit of {} ({} KiB)",
                            p.display(),
                            text.len(),
                            crate::template::MAX_TEMPLATE,
                            crate::template::MAX_TEMPLATE / 1024
                        );
                    }
                    text
                }
                None => String::new(),
            };
            let body = serde_json::json!({ "name": name, "template": text, "owner": owner, "start": start });
            // The coordinator's "template: …" errors, with the file they are about.
            let mut created: CreatedView = client.post("/workspaces", &body).await.map_err(|e| {
                match (&template, e.to_string().strip_prefix("template: ")) {
                    (Some(p), Some(rest)) => anyhow::anyhow!("template {}: {rest}", p.display()),
                    _ => e,
                }
            })?;
            if !json {
                print_workspace(&created.workspace);
                if let (Some(token), Some(cmd)) = (&created.agent_token, &created.agent_command) {
                    println!("\nagent token (shown once): {token}\n\nstart the agent in the workspace with:\n  {cmd}");
                }
            }
            if !wait {
                return if json { print_json(&created) } else { Ok(()) };
            }
            let until =
                Settle { passing: STARTING, target: WorkspaceStatus::Running, op: "start", timeout: limit(timeout) };
            let (settled, failed) = wait_settled(client, &name, until).await?;
            created.workspace = settled;
            if json {
                print_json(&created)?;
            } else {
                print_workspace(&created.workspace);
            }
            if let Some(message) = failed {
                anyhow::bail!(message);
            }
        }
        WorkspaceCmd::Start { name, wait, timeout, json } => {
            let w: WorkspaceView =
                client.post(&format!("/workspaces/{}/start", enc(&name)), &serde_json::json!({})).await?;
            already(&w, WorkspaceStatus::Running);
            let until =
                Settle { passing: STARTING, target: WorkspaceStatus::Running, op: "start", timeout: limit(timeout) };
            settle(client, &name, w, wait.then_some(until), json).await?;
        }
        WorkspaceCmd::Stop { name, wait, timeout, json } => {
            let w: WorkspaceView =
                client.post(&format!("/workspaces/{}/stop", enc(&name)), &serde_json::json!({})).await?;
            already(&w, WorkspaceStatus::Stopped);
            let until =
                Settle { passing: STOPPING, target: WorkspaceStatus::Stopped, op: "stop", timeout: limit(timeout) };
            settle(client, &name, w, wait.then_some(until), json).await?;
        }
        WorkspaceCmd::Delete { name, force, wait, timeout, json } => {
            let w = client.delete(&format!("/workspaces/{}?force={force}", enc(&name))).await?;
            already(&w, WorkspaceStatus::Deleted);
            let until =
                Settle { passing: STOPPING, target: WorkspaceStatus::Deleted, op: "delete", timeout: limit(timeout) };
            settle(client, &name, w, wait.then_some(until), json).await?;
        }
        WorkspaceCmd::List { status, all, json } => {
            let mut path = format!("/workspaces?all={all}");
            if let Some(s) = status {
                path.push_str(&format!("&status={}", enc(&s)));
            }
            let list: Vec<WorkspaceView> = client.get(&path).await?;
            if json {
                return print_json(&list);
            }
            print!("{}", workspaces_table(&list));
            println!("{}", count_line(&list));
        }
        WorkspaceCmd::Count { json } => {
            let counts: BTreeMap<String, i64> = client.get("/status-counts").await?;
            if json {
                return print_json(&counts);
            }
            let rows: Vec<Vec<String>> = WorkspaceStatus::ALL
                .iter()
                .filter_map(|s| counts.get(s.as_str()).map(|n| vec![s.to_string(), n.to_string()]))
                .collect();
            print!("{}", table(&["STATUS", "COUNT"], &rows));
        }
        WorkspaceCmd::Show { name, json } => {
            let s: ShowView = client.get(&format!("/workspaces/{}", enc(&name))).await?;
            if json {
                return print_json(&s);
            }
            let w = &s.workspace;
            println!("name:           {}", w.name);
            println!("status:         {}", w.status);
            println!("reason:         {}", w.status_reason);
            println!("lifecycle:      {}", w.lifecycle.map_or("-".into(), |l| l.to_string()));
            println!("provisioner:    {}", w.provisioner);
            println!("build:          {}", w.build);
            println!("last heartbeat: {}", ago(&w.last_heartbeat_at));
            if let Some(e) = &w.last_error {
                println!("last error:     {e}");
            }
            println!("owner:          {}", w.owner.as_deref().unwrap_or("-"));
            if let Some(a) = &w.agent {
                let lost = if a.connected {
                    ""
                } else {
                    " (not answering: its heartbeats stopped; figures below are its last)"
                };
                println!("agent:          {} on {}{lost}", a.version, a.hostname);
                if let Some(st) = &a.stats {
                    println!(
                        "stats:          cpu {:.1}% of {:.1} cpus, mem {} / {} MiB, disk {} / {} GiB, load {:.2}",
                        st.cpu_percent,
                        st.cpu_limit,
                        st.mem_used >> 20,
                        st.mem_total >> 20,
                        st.disk_used >> 30,
                        st.disk_total >> 30,
                        st.load[0]
                    );
                    let ssh = &st.ssh;
                    let last = if ssh.last_activity_ms > 0 {
                        let ago = (tether_shared::now_ms() - ssh.last_activity_ms).max(0) / 1000;
                        format!("last activity {ago}s ago")
                    } else {
                        "no activity yet".to_string()
                    };
                    println!(
                        "ssh:            {} connections, {} sessions, {last}, {} KiB in / {} KiB out",
                        ssh.connections,
                        ssh.sessions,
                        ssh.bytes_in >> 10,
                        ssh.bytes_out >> 10
                    );
                }
            }
            println!("history:");
            for t in &s.history {
                println!("  {}  {:<9} {}", t.at, t.to, t.reason);
            }
        }
        WorkspaceCmd::Timings { name, build, json } => {
            let mut path = format!("/workspaces/{}/timings", enc(&name));
            if let Some(b) = build {
                path.push_str(&format!("?build={b}"));
            }
            let spans: Vec<SpanView> = client.get(&path).await?;
            if json {
                return print_json(&spans);
            }
            print!("{}", timings_table(&spans));
        }
        WorkspaceCmd::Logs { name, follow, script, build, json } => {
            let mut after = 0;
            // The current build's, pinned by the first answer: a restart does not mix in the next.
            let mut build = build;
            let mut away = false;
            loop {
                let mut path =
                    format!("/workspaces/{}/logs?after={after}&wait={}", enc(&name), if follow { 30 } else { 0 });
                if let Some(s) = &script {
                    path.push_str(&format!("&source={}", enc(s)));
                }
                if let Some(b) = build {
                    path.push_str(&format!("&build={b}"));
                }
                let logs: LogsView = match client.get(&path).await {
                    Ok(logs) => logs,
                    // Following goes on across a coordinator restart, from the line it had reached.
                    Err(e) if follow && coordinator_away(&e, build.is_some()) => {
                        if !away {
                            eprintln!("{e}; waiting for it to come back");
                            away = true;
                        }
                        tokio::time::sleep(RECONNECT_PAUSE).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                away = false;
                build = Some(logs.build);
                for l in &logs.lines {
                    if json {
                        println!("{}", serde_json::to_string(l)?);
                    } else {
                        // Standard error is marked, as `--json` gives its `stream`.
                        let mark = if l.stream == "stderr" { " stderr" } else { "" };
                        println!("{} [{}{mark}] {}", l.at, l.source, l.line);
                    }
                }
                after = logs.next;
                // Following ends with the workspace: stopped, deleted, or failed with no agent.
                if (!follow && logs.lines.is_empty()) || (follow && logs.ended) {
                    break;
                }
            }
        }
        WorkspaceCmd::Wait { name, until, timeout, json } => {
            let w = wait_for(client, &name, &until, timeout.into()).await?;
            if json {
                print_json(&w)?
            } else {
                print_workspace(&w)
            }
        }
        WorkspaceCmd::Grant { name, user, json } => crate::cli_ssh::grant(client, &name, &user, json).await?,
        WorkspaceCmd::Revoke { name, user, json } => crate::cli_ssh::revoke(client, &name, &user, json).await?,
        WorkspaceCmd::Access { name, json } => crate::cli_ssh::access(client, &name, json).await?,
        WorkspaceCmd::Token { name, json } => {
            let v: serde_json::Value =
                client.post(&format!("/workspaces/{}/token", enc(&name)), &serde_json::json!({})).await?;
            if json {
                return print_json(&v);
            }
            if v["agent_disconnected"].as_bool() == Some(true) {
                println!("the agent connected with the old token was disconnected\n");
            }
            println!(
                "agent token (shown once): {}\n\nstart the agent with:\n  {}",
                v["agent_token"].as_str().unwrap_or_default(),
                v["agent_command"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_ends_wherever_the_operation_ended() {
        assert_eq!(settled_statuses(STARTING), "running,unhealthy,stopped,failed,deleted");
        assert_eq!(settled_statuses(STOPPING), "pending,starting,running,unhealthy,stopped,failed,deleted");
    }

    #[test]
    fn a_span_that_began_before_its_build_has_a_negative_start_not_plus_minus() {
        let span = |offset_ms| SpanView {
            build: 1,
            source: "agent".into(),
            stage: "agent".into(),
            name: "connect".into(),
            started_at: String::new(),
            ended_at: String::new(),
            offset_ms,
            duration_ms: 13_100,
            exit_code: None,
            status: tether_shared::SpanStatus::Ok,
        };
        let table = timings_table(&[span(-13_098), span(4)]);
        assert!(table.contains(" -13.098s ") && table.contains(" +0.004s ") && !table.contains("+-"), "{table}");
    }

    #[test]
    fn retention_is_a_duration_or_forever_and_says_what_is_wrong() {
        assert_eq!(parse_keep("90d"), Ok(Keep(Some(Duration::from_secs(90 * 86_400)))));
        assert_eq!(parse_keep("Forever"), Ok(Keep(None)));
        assert!(parse_keep("soon").unwrap_err().contains("'soon' is not a duration (like 90d or 12h) or `forever`"));
        assert!(parse_keep("0s").unwrap_err().contains("out of range"));
        assert!(parse_keep("500y").unwrap_err().contains("out of range"));
    }
}
