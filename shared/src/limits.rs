//! Every size a peer or a user controls, in one place. Errors name the limit they hit.

/// Largest frame either side accepts on any stream, payload only.
pub const MAX_FRAME: usize = 1024 * 1024;
/// Longest log line kept; longer lines are cut and marked.
pub const MAX_LOG_LINE: usize = 16 * 1024;
/// Output kept (and streamed) per script run before an "output truncated" line.
pub const MAX_SCRIPT_OUTPUT: u64 = 1024 * 1024;
/// Scripts in one manifest.
pub const MAX_SCRIPTS: usize = 64;
/// Length of a script body.
pub const MAX_SCRIPT_LEN: usize = 64 * 1024;
/// Workspace, user and script names.
pub const MAX_NAME: usize = 63;
/// Environment variables in one manifest, and the size of each value.
pub const MAX_ENV: usize = 256;
pub const MAX_ENV_VALUE: usize = 32 * 1024;
/// Events (lifecycle changes, spans) in one batch.
pub const MAX_EVENTS_PER_BATCH: usize = 256;
/// Bytes of log lines in one batch, so one batch always fits a frame.
pub const MAX_LOG_BATCH_BYTES: usize = 256 * 1024;
/// Length of an agent token as sent in a hello.
pub const MAX_TOKEN: usize = 256;
/// Free-text fields a peer sends (reasons, host names, versions).
pub const MAX_TEXT: usize = 1024;
/// SSH public keys one user may register, and fingerprints one brokered stream may carry.
pub const MAX_SSH_KEYS: usize = 16;
/// A template's message of the day.
pub const MAX_MOTD: usize = 8 * 1024;
/// Size of one SSH public key line a user registers, or an agent's host key.
pub const MAX_SSH_PUBLIC_KEY: usize = 16 * 1024;
/// SSH connections one agent serves at once: brokered streams the coordinator may open on a tunnel
/// connection (the agent's QUIC stream limit) and the agent's own cap.
pub const MAX_SSH_CONNECTIONS: u32 = 256;
/// Latest wall-clock time a peer may send, in milliseconds since the Unix epoch (the year 5138):
/// far past any real clock, and small enough that sums and differences of times never overflow.
pub const MAX_TIME_MS: i64 = 100_000_000_000_000;
/// Log bytes the coordinator keeps per build unless `--max-build-log-mib` says otherwise: the
/// agent's own cap lets a build's scripts print at most `MAX_SCRIPTS * MAX_SCRIPT_OUTPUT` (64 MiB).
pub const DEFAULT_MAX_BUILD_LOG_MIB: u64 = 64;
/// Largest hello frame the coordinator reads from a connection it knows nothing about yet: a valid
/// hello (a token and three short texts) is well under it.
pub const MAX_HELLO_FRAME: usize = 8 * 1024;
/// Bytes counted for each event or log line on top of its text: in a batch's size, which a log batch
/// must keep under `MAX_LOG_BATCH_BYTES` (so a batch holds at most 2048 lines), and in the agent's
/// memory cap. More than an item's framing on the wire, so a batch measured this way fits a frame.
pub const ITEM_OVERHEAD: usize = 128;
/// Bytes the coordinator counts against `--max-build-log-mib` for each stored log line on top of its
/// text and script name: about what a row and its index entry cost, so empty lines add up too.
pub const LOG_ROW_OVERHEAD: usize = 32;
/// Timing spans the coordinator keeps per build; a build has one per step and script, so a few dozen.
pub const MAX_SPANS_PER_BUILD: i64 = 1024;
/// Status changes the coordinator keeps per workspace (the newest); `show` reads the last 20.
pub const MAX_TRANSITIONS_KEPT: i64 = 1000;
