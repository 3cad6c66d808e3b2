//! `tether-agent`: reads its configuration, sets up logging and runs the agent until it is told to
//! stop. Exit status: 0 after a shutdown, 1 on a runtime failure, 2 on a configuration error (a data
//! directory it may not create included) or when the coordinator rejects the agent (bad token,
//! protocol version). `tether-agent sftp-server` (hidden)
//! serves SFTP on stdin and stdout instead, for the SSH server.

use anyhow::Context;
use clap::Parser;
use std::future::Future;
use std::process::ExitCode;
use tether_agent::clock::WallClock;
use tether_agent::config::{Args, Command, Config, LogFormat, LOG_FILTER_ENV};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let boot = WallClock::start();
    let args = Args::parse();
    // Flushes what is still queued when main returns.
    let _log = init_tracing(args.log_format);
    if let Some(Command::SftpServer) = args.command {
        return sftp_server();
    }
    // Another crate may have installed the same provider first; either way ring is in place.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match Config::from_args(args, &|key| std::env::var_os(key)) {
        Ok(config) => config,
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!("configuration: {e}");
            }
            return ExitCode::from(2);
        }
    };
    match run(config, boot) {
        Ok(tether_agent::Exit::Stopped) => ExitCode::SUCCESS,
        Ok(exit @ tether_agent::Exit::Rejected { .. }) => {
            if let tether_agent::Exit::Rejected { code, message } = &exit {
                tracing::error!(code = ?code, "coordinator rejected this agent: {message}");
            }
            ExitCode::from(exit.code())
        }
        Err(e) => {
            tracing::error!("{}", tether_shared::error_chain_text(e.as_ref()));
            // A data directory it may not make (no permission, a file in the way, a read-only
            // file system) is the configuration's to fix, and a supervisor restarting the agent
            // would not help: exit as for any other bad setting. Other failures (a full disk, a
            // volume not mounted yet) may pass, and a restart is worth it.
            use std::io::ErrorKind::*;
            match e.downcast_ref::<tether_agent::AgentError>() {
                Some(tether_agent::AgentError::DataDir { source, .. })
                    if matches!(
                        source.kind(),
                        PermissionDenied | AlreadyExists | NotADirectory | ReadOnlyFilesystem
                    ) =>
                {
                    ExitCode::from(2)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn run(config: Config, boot: WallClock) -> anyhow::Result<tether_agent::Exit> {
    // One worker, like sshd's one process per connection: each byte of an SSH session then goes
    // from socket to PTY and back on one thread. With two, tasks on the data path were stolen back
    // and forth between workers on most round trips, which cost echo latency and CPU and gained no
    // throughput (measured with `tether-bench ssh`; see the README). Blocking work goes to the
    // blocking pool as before.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let exit = runtime.block_on(async {
        let shutdown = stop_signal().context("listening for SIGTERM and SIGINT")?;
        Ok(tether_agent::run(config, boot, shutdown).await?)
    });
    // A blocking-pool thread stuck in the filesystem (statvfs on a hung network home, say) must not
    // keep the agent from exiting: dropping the runtime would wait for it for ever.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    exit
}

/// `tether-agent sftp-server`: SFTP on stdin and stdout until stdin ends. Logs go to stderr.
fn sftp_server() -> ExitCode {
    match tether_agent::sftp::serve_stdio() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("sftp: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGTERM or SIGINT with the goodbye reason.
fn stop_signal() -> std::io::Result<impl Future<Output = String> + Send> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "received a stop signal");
        format!("agent stopped by {name}")
    })
}

/// Lines the log writer holds while stderr is slow; past that new lines are dropped rather than
/// block the agent.
const LOG_QUEUE_LINES: usize = 10_000;

/// Logs go to stderr from a thread of their own: a stderr that stops taking writes (a full pipe to
/// a stalled log collector, a file on a hung disk) must not stop the agent's one worker thread.
fn init_tracing(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = match std::env::var(LOG_FILTER_ENV) {
        Ok(spec) => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!("tether-agent: ignoring {LOG_FILTER_ENV}={spec:?}: {e}");
            EnvFilter::new("info")
        }),
        Err(_) => EnvFilter::new("info"),
    };
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .lossy(true)
        .thread_name("tether-agent-log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // A log line that cannot be written is dropped: tracing's default then reports it with
        // `eprintln!`, which panics when stderr is gone (a log pipe whose reader died), and the
        // panic took down whatever task was logging (an API request, a workspace's start).
        .log_internal_errors(false)
        // Colour only for a person at a terminal; journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}
