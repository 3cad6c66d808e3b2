//! Messages on the agent tunnel.
//!
//! One QUIC connection per agent, dialled by the agent. Streams have one job each:
//! - the **control** stream (the first bidirectional stream the agent opens): hello, manifest,
//!   heartbeats, lifecycle changes and spans, acknowledgements, commands from the coordinator;
//! - the **log** stream (the second): script output, so a burst of logs never delays a heartbeat;
//! - **brokered** streams, opened by the coordinator, one per SSH connection a user makes through the
//!   front door. Each starts with one [`StreamOpen`] frame naming who is connecting; the rest of the
//!   stream is the raw bytes of an SSH connection between the user's client and the agent, which the
//!   coordinator splices but cannot read.
//!
//! The first frame on the control stream is a [`Hello`], encoded as a two-byte big-endian protocol
//! version followed by the postcard body, so a peer can read the version even when it cannot decode
//! the rest. The coordinator answers with a [`HelloReply`], whose `Rejected` variant is frozen across
//! versions so an old agent can always read why it was turned away.
//!
//! Enum variants are only ever appended; a change to a field bumps [`PROTOCOL_VERSION`].

use crate::limits;
use crate::status::{Lifecycle, SpanStatus};
use serde::{Deserialize, Serialize};

/// The one protocol version this build speaks. 3: the agent holds SSH sessions while its start
/// scripts that block login run (the coordinator no longer waits for them), so an agent that does
/// not must not be let in.
pub const PROTOCOL_VERSION: u16 = 3;

/// TLS application protocol name on the tunnel. Carries no version: version mismatches must reach the
/// hello, where they get a readable answer, rather than fail the handshake.
pub const ALPN: &[u8] = b"tether";

/// Agent → coordinator, first frame of the control stream (after the version prefix).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The per-workspace agent token.
    pub token: String,
    /// The agent's build, for logs and `show`.
    pub agent_version: String,
    /// Random per agent process: acknowledgements are kept per instance, so a restarted agent starts
    /// its sequence numbers afresh without being taken for a duplicate.
    pub instance: u64,
    /// The agent's wall clock when it sent the hello, to estimate clock offset.
    pub sent_at_ms: i64,
    pub hostname: String,
    /// The agent's persistent SSH host key, one OpenSSH public-key line (`ssh-ed25519 AAAA…`). The
    /// coordinator signs it as a host certificate for the workspace's name.
    pub ssh_host_key: Option<String>,
}

/// Why the coordinator refused a hello. Numbers are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    BadToken,
    VersionMismatch,
    WorkspaceNotRunnable,
    Malformed,
    Busy,
}

/// Coordinator → agent, first frame of the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HelloReply {
    /// Frozen: never change this variant's place or fields.
    Rejected {
        code: RejectCode,
        message: String,
    },
    Welcome(Welcome),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub workspace: String,
    /// The build (start generation) the workspace is on; a new `start` makes a new build.
    pub build: u64,
    /// Highest event sequence number already stored for this agent instance.
    pub events_acked: u64,
    /// Highest log sequence number already stored for this agent instance.
    pub logs_acked: u64,
    pub heartbeat_interval_ms: u64,
    pub coordinator_version: String,
    /// The agent's host key signed by the coordinator's SSH CA (one OpenSSH certificate line), for the
    /// principals `NAME.tether` and `NAME`. `None` when the hello carried no host key.
    pub ssh_host_certificate: Option<String>,
}

/// Agent → coordinator on the control stream, after the hello.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    FetchManifest,
    Heartbeat(Heartbeat),
    Events(EventBatch),
    /// The agent is exiting on purpose; the coordinator need not wait for a heartbeat timeout.
    Goodbye {
        reason: String,
    },
}

/// Coordinator → agent on the control stream, after the welcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CoordinatorMessage {
    Manifest(Manifest),
    /// Everything up to and including `seq` on that channel is stored.
    Ack {
        channel: Channel,
        seq: u64,
    },
    /// Run the stop scripts, report the final lifecycle and exit.
    Shutdown {
        reason: String,
    },
    /// The coordinator is going away; reconnect after a random delay below `within_ms`.
    Reconnect {
        within_ms: u64,
    },
    /// A message the coordinator could not accept; the connection stays up.
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Channel {
    Events,
    Logs,
}

/// What the agent runs and how, fetched once per connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub workspace: String,
    pub build: u64,
    pub scripts: Vec<Script>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    /// Time allowed for all stop scripts together.
    pub shutdown_timeout_ms: u64,
    pub ssh: SshSettings,
}

/// How the agent's SSH server treats sessions, from the template's `[ssh]` table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SshSettings {
    /// Printed at the start of interactive sessions.
    pub motd: Option<String>,
    /// Environment variables a client may set besides `LANG` and `LC_*`. An entry ending in `*` is a
    /// prefix.
    pub allowed_env: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScriptTrigger {
    Start,
    Stop,
    Cron,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Script {
    pub name: String,
    pub run: String,
    pub on: ScriptTrigger,
    /// Cron expression when `on` is `Cron`.
    pub schedule: Option<String>,
    pub timeout_ms: u64,
    pub blocks_login: bool,
}

/// System stats, refreshed only for what is sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub sent_at_ms: i64,
    pub cpu_percent: f32,
    /// CPUs available: the cgroup quota inside a container, the host's count otherwise.
    pub cpu_limit: f32,
    pub mem_used: u64,
    /// The cgroup limit inside a container, host memory otherwise.
    pub mem_total: u64,
    pub disk_used: u64,
    pub disk_total: u64,
    pub load: [f32; 3],
    pub uptime_s: u64,
    pub ssh: SshActivity,
}

/// What users are doing over SSH, as of the heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SshActivity {
    /// SSH connections open now.
    pub connections: u32,
    /// Sessions (shells, commands, subsystems) open now.
    pub sessions: u32,
    /// Wall-clock time of the last byte in either direction; 0 if never.
    pub last_activity_ms: i64,
    /// Totals since the agent started: bytes received from and sent to SSH clients.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Coordinator → agent: the first frame of a bidirectional stream the coordinator opens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StreamOpen {
    /// The rest of the stream is an SSH connection from a user the coordinator authenticated.
    Ssh(SshStreamOpen),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SshStreamOpen {
    /// The coordinator's id for this connection, as in its audit log.
    pub connection_id: u64,
    /// The Tether user the coordinator authenticated.
    pub user: String,
    /// SHA-256 fingerprints (`SHA256:…`, as `ssh-keygen -l` prints them) of the keys the inner SSH
    /// session may authenticate with: the one the front door saw, or all of the user's keys when the
    /// user came in with an API token.
    pub key_fingerprints: Vec<String>,
    /// Where the user connected from, for logs and `SSH_CONNECTION`.
    pub peer: String,
}

/// Agent → coordinator: why the agent reset a stream the coordinator opened instead of serving it
/// (the QUIC reset's error code). Its SSH server otherwise speaks first, with its version line.
pub mod stream_refused {
    /// It serves as many SSH connections as it takes ([`crate::limits::MAX_SSH_CONNECTIONS`]).
    pub const FULL: u32 = 1;
    /// The stream's [`super::StreamOpen`] did not come in time, or could not be read or was invalid.
    pub const BAD_OPEN: u32 = 2;
}

/// Lifecycle changes and spans, each with a sequence number, kept by the agent until acknowledged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBatch {
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub build: u64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    Lifecycle { state: Lifecycle, at_ms: i64, detail: Option<String> },
    Span(Span),
}

/// One timed step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Span {
    /// `agent` (connect, manifest), `script`, `stop_script`, `ready`.
    pub stage: String,
    pub name: String,
    pub started_at_ms: i64,
    pub ended_at_ms: i64,
    pub exit_code: Option<i32>,
    pub status: SpanStatus,
}

/// Agent → coordinator on the log stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogBatch {
    pub lines: Vec<LogLine>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub seq: u64,
    pub build: u64,
    pub script: String,
    pub stream: LogStream,
    pub at_ms: i64,
    pub line: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// A message that decoded but breaks a limit or a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    #[error("{field} is {len} bytes, over the limit of {max}")]
    TooLong { field: &'static str, len: usize, max: usize },
    #[error("{field} has {count} entries, over the limit of {max}")]
    TooMany { field: &'static str, count: usize, max: usize },
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("{field} is {value}, outside {range}")]
    OutOfRange { field: &'static str, value: String, range: String },
}

/// A wall-clock time a peer sent, in milliseconds since the Unix epoch: from 0 to
/// [`limits::MAX_TIME_MS`], so that no difference or clock correction of two of them overflows.
fn check_time(field: &'static str, ms: i64) -> Result<(), InvalidMessage> {
    if !(0..=limits::MAX_TIME_MS).contains(&ms) {
        return Err(InvalidMessage::OutOfRange {
            field,
            value: ms.to_string(),
            range: format!("0 ..= {} ms", limits::MAX_TIME_MS),
        });
    }
    Ok(())
}

/// A build number a peer sent: the coordinator stores them as SQLite integers.
fn check_build(field: &'static str, build: u64) -> Result<(), InvalidMessage> {
    if build > i64::MAX as u64 {
        return Err(InvalidMessage::OutOfRange {
            field,
            value: build.to_string(),
            range: format!("0 ..= {}", i64::MAX),
        });
    }
    Ok(())
}

/// A gauge a peer sent (CPU percent, load, CPU count): finite, not negative, below a billion.
fn check_gauge(field: &'static str, v: f32) -> Result<(), InvalidMessage> {
    if !(v.is_finite() && (0.0..1e9).contains(&v)) {
        return Err(InvalidMessage::OutOfRange { field, value: v.to_string(), range: "0 ..< 1e9".into() });
    }
    Ok(())
}

fn check_len(field: &'static str, s: &str, max: usize) -> Result<(), InvalidMessage> {
    if s.len() > max {
        return Err(InvalidMessage::TooLong { field, len: s.len(), max });
    }
    Ok(())
}

fn check_count(field: &'static str, count: usize, max: usize) -> Result<(), InvalidMessage> {
    if count > max {
        return Err(InvalidMessage::TooMany { field, count, max });
    }
    Ok(())
}

impl Hello {
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        if self.token.is_empty() {
            return Err(InvalidMessage::Empty { field: "token" });
        }
        check_len("token", &self.token, limits::MAX_TOKEN)?;
        check_len("agent_version", &self.agent_version, limits::MAX_TEXT)?;
        check_len("hostname", &self.hostname, limits::MAX_TEXT)?;
        check_len("ssh_host_key", self.ssh_host_key.as_deref().unwrap_or(""), limits::MAX_TEXT)?;
        check_time("sent_at_ms", self.sent_at_ms)
    }
}

impl Heartbeat {
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        check_time("heartbeat sent_at_ms", self.sent_at_ms)?;
        check_time("ssh last_activity_ms", self.ssh.last_activity_ms)?;
        check_gauge("cpu_percent", self.cpu_percent)?;
        check_gauge("cpu_limit", self.cpu_limit)?;
        for l in self.load {
            check_gauge("load", l)?;
        }
        Ok(())
    }
}

impl AgentMessage {
    /// Checks the limits a decoded message must keep beyond its frame size.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            AgentMessage::FetchManifest => Ok(()),
            AgentMessage::Heartbeat(hb) => hb.validate(),
            AgentMessage::Goodbye { reason } => check_len("reason", reason, limits::MAX_TEXT),
            AgentMessage::Events(batch) => {
                check_count("events", batch.events.len(), limits::MAX_EVENTS_PER_BATCH)?;
                for e in &batch.events {
                    check_build("event build", e.build)?;
                    match &e.kind {
                        EventKind::Lifecycle { detail, at_ms, .. } => {
                            check_len("detail", detail.as_deref().unwrap_or(""), limits::MAX_TEXT)?;
                            check_time("lifecycle at_ms", *at_ms)?;
                        }
                        EventKind::Span(s) => {
                            check_len("span stage", &s.stage, limits::MAX_NAME)?;
                            check_len("span name", &s.name, limits::MAX_TEXT)?;
                            check_time("span started_at_ms", s.started_at_ms)?;
                            check_time("span ended_at_ms", s.ended_at_ms)?;
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

impl StreamOpen {
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        match self {
            StreamOpen::Ssh(s) => {
                if s.user.is_empty() {
                    return Err(InvalidMessage::Empty { field: "user" });
                }
                check_len("user", &s.user, limits::MAX_NAME)?;
                check_count("key_fingerprints", s.key_fingerprints.len(), limits::MAX_SSH_KEYS)?;
                for f in &s.key_fingerprints {
                    check_len("key fingerprint", f, limits::MAX_NAME * 2)?;
                }
                check_len("peer", &s.peer, limits::MAX_TEXT)
            }
        }
    }
}

impl LogLine {
    /// What the line counts for in a batch: its text, its script's name and `ITEM_OVERHEAD`.
    pub fn cost(&self) -> usize {
        limits::ITEM_OVERHEAD + self.line.len() + self.script.len()
    }
}

impl LogBatch {
    /// Each line's fields, and the batch's size as the agent measures it (at most
    /// `MAX_LOG_BATCH_BYTES`, so at most 2048 lines): a batch is stored in one transaction, which
    /// must stay short.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        let mut bytes = 0usize;
        for l in &self.lines {
            check_len("log script", &l.script, limits::MAX_TEXT)?;
            // A cut line carries a short marker past the limit.
            check_len("log line", &l.line, limits::MAX_LOG_LINE + 64)?;
            check_time("log at_ms", l.at_ms)?;
            check_build("log build", l.build)?;
            bytes += l.cost();
        }
        if bytes > limits::MAX_LOG_BATCH_BYTES {
            return Err(InvalidMessage::TooLong { field: "log batch", len: bytes, max: limits::MAX_LOG_BATCH_BYTES });
        }
        Ok(())
    }
}

impl Manifest {
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        check_count("scripts", self.scripts.len(), limits::MAX_SCRIPTS)?;
        for s in &self.scripts {
            check_len("script name", &s.name, limits::MAX_NAME)?;
            check_len("script body", &s.run, limits::MAX_SCRIPT_LEN)?;
        }
        check_count("env", self.env.len(), limits::MAX_ENV)?;
        for (k, v) in &self.env {
            check_len("env name", k, limits::MAX_TEXT)?;
            check_len("env value", v, limits::MAX_ENV_VALUE)?;
        }
        check_len("motd", self.ssh.motd.as_deref().unwrap_or(""), limits::MAX_MOTD)?;
        check_count("ssh allowed_env", self.ssh.allowed_env.len(), limits::MAX_ENV)?;
        for k in &self.ssh.allowed_env {
            check_len("ssh allowed_env entry", k, limits::MAX_TEXT)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(at_ms: i64) -> LogLine {
        LogLine { seq: 1, build: 1, script: "s".into(), stream: LogStream::Stdout, at_ms, line: "x".into() }
    }

    #[test]
    fn times_from_a_peer_must_be_on_a_real_clock() {
        assert!(LogBatch { lines: vec![line(1_700_000_000_000)] }.validate().is_ok());
        for bad in [-1, i64::MIN, i64::MAX, limits::MAX_TIME_MS + 1] {
            let err = LogBatch { lines: vec![line(bad)] }.validate().unwrap_err();
            assert_eq!(err.to_string(), format!("log at_ms is {bad}, outside 0 ..= 100000000000000 ms"));
        }
        let hello = Hello {
            token: "t".into(),
            agent_version: "v".into(),
            instance: 1,
            sent_at_ms: i64::MIN,
            hostname: "h".into(),
            ssh_host_key: None,
        };
        assert!(hello.validate().unwrap_err().to_string().starts_with("sent_at_ms is -9223372036854775808"));
        let span = Span {
            stage: "script".into(),
            name: "s".into(),
            started_at_ms: 5,
            ended_at_ms: i64::MAX,
            exit_code: None,
            status: SpanStatus::Ok,
        };
        let events =
            AgentMessage::Events(EventBatch { events: vec![Event { seq: 1, build: 1, kind: EventKind::Span(span) }] });
        assert!(events.validate().unwrap_err().to_string().starts_with("span ended_at_ms is"));
    }

    #[test]
    fn a_log_batch_is_as_large_as_an_agent_makes_one_and_no_larger() {
        let empty = |seq| LogLine { seq, line: String::new(), ..line(1) };
        let most = limits::MAX_LOG_BATCH_BYTES / empty(0).cost();
        assert!(LogBatch { lines: (0..most as u64).map(empty).collect() }.validate().is_ok());
        let err = LogBatch { lines: (0..most as u64 + 1).map(empty).collect() }.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "log batch is {} bytes, over the limit of {}",
                (most + 1) * empty(0).cost(),
                limits::MAX_LOG_BATCH_BYTES
            )
        );
        let huge_build = LogBatch { lines: vec![LogLine { build: u64::MAX, ..line(1) }] };
        assert!(huge_build.validate().unwrap_err().to_string().starts_with("log build is 18446744073709551615"));
        let event = Event {
            seq: 1,
            build: 1 << 63,
            kind: EventKind::Lifecycle { state: Lifecycle::Ready, at_ms: 1, detail: None },
        };
        let err = AgentMessage::Events(EventBatch { events: vec![event] }).validate().unwrap_err();
        assert!(err.to_string().starts_with("event build is 9223372036854775808"), "{err}");
    }

    #[test]
    fn the_largest_valid_hello_fits_the_hello_frame() {
        let hello = Hello {
            token: "t".repeat(limits::MAX_TOKEN),
            agent_version: "v".repeat(limits::MAX_TEXT),
            instance: u64::MAX,
            sent_at_ms: limits::MAX_TIME_MS,
            hostname: "h".repeat(limits::MAX_TEXT),
            ssh_host_key: Some("k".repeat(limits::MAX_TEXT)),
        };
        hello.validate().unwrap();
        let frame = crate::frame::encode_versioned(PROTOCOL_VERSION, &hello).unwrap();
        assert!(frame.len() - 4 <= limits::MAX_HELLO_FRAME, "{} bytes", frame.len());
    }

    #[test]
    fn heartbeat_gauges_must_be_finite_and_not_negative() {
        let ok =
            Heartbeat { sent_at_ms: 1, cpu_percent: 12.5, cpu_limit: 2.0, load: [0.1, 0.2, 0.3], ..Default::default() };
        assert!(AgentMessage::Heartbeat(ok.clone()).validate().is_ok());
        let nan = Heartbeat { cpu_percent: f32::NAN, ..ok.clone() };
        assert_eq!(
            AgentMessage::Heartbeat(nan).validate().unwrap_err().to_string(),
            "cpu_percent is NaN, outside 0 ..< 1e9"
        );
        let negative = Heartbeat { load: [0.0, -1.0, 0.0], ..ok.clone() };
        assert!(AgentMessage::Heartbeat(negative).validate().is_err());
        let infinite = Heartbeat { cpu_limit: f32::INFINITY, ..ok.clone() };
        assert!(AgentMessage::Heartbeat(infinite).validate().is_err());
        let old = Heartbeat { ssh: SshActivity { last_activity_ms: -5, ..Default::default() }, ..ok };
        assert!(AgentMessage::Heartbeat(old).validate().unwrap_err().to_string().starts_with("ssh last_activity_ms"));
    }
}
