//! Tether's workspace agent as a library: the binary only parses flags, sets up logging and calls
//! [`run`].
//!
//! Code map:
//! - [`agent`]: the main loop; owns the lifecycle of the current build and the state file.
//! - [`tunnel`]: the QUIC connection to the coordinator, reconnects, heartbeats, acknowledgements.
//! - [`outbox`]: events and log lines kept until the coordinator acknowledges them.
//! - [`phase`]: start and stop phases (scripts in parallel, spans, verdict).
//! - [`scripts`]: running one script in its own process group; [`output`]: line cutting and caps.
//! - [`ssh`]: the SSH server, on streams the coordinator brokers (and on `--ssh-listen` if set).
//! - [`stats`]: heartbeat numbers; [`state`]: `state.json`; [`config`]: flags and environment.
//! - [`metrics`]: Prometheus metrics on `--metrics-listen`, if set.
//! - [`sftp`]: the SFTP server run as `tether-agent sftp-server` where OpenSSH's is missing.
//!
//! Invariants: the agent never listens on a network port unless `--ssh-listen` or `--metrics-listen`
//! says so; it never kills a script's process group unless the script timed out or the agent is
//! shutting down; nothing a peer or a script sends grows memory without a bound.

pub mod agent;
pub mod clock;
pub mod config;
pub mod metrics;
pub mod outbox;
pub mod output;
pub mod phase;
pub mod scripts;
pub mod sftp;
pub mod ssh;
pub mod state;
pub mod stats;
pub mod tunnel;

pub use agent::{run, AgentError, Exit};
