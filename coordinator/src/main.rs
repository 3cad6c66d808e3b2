use clap::Parser;
use tether_coordinator::cli::{self, Cli, Command, LogFormat};
use tether_coordinator::cli_ssh;
use tether_coordinator::{backup, client::Client, config, demo, server};

fn init_tracing(format: LogFormat, filter: Option<&str>, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter.unwrap_or(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written is dropped: tracing's default then reports it with
        // `eprintln!`, which panics when stderr is gone (a log pipe whose reader died), and the
        // panic took down whatever task was logging (an API request, a workspace's start).
        .log_internal_errors(false)
        // Colour only for a person at a terminal; journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `warnings`: about the configuration, for `serve` to log once its log is set up.
async fn run(cli: Cli, warnings: Vec<String>) -> anyhow::Result<()> {
    let data_dir = cli.data_dir.clone().unwrap_or_else(cli::default_data_dir);
    match cli.command {
        Command::Serve(args) => {
            sigpipe(false);
            init_tracing(cli.log_format, cli.log.as_deref(), "info");
            for w in warnings {
                tracing::warn!("{w}");
            }
            let config = server::ServeConfig {
                data_dir,
                listen_http: args.listen_http,
                listen_quic: args.listen_quic,
                advertise_quic: args.advertise_quic,
                agent_binary: args.agent_binary,
                max_agents: args.max_agents,
                listen_ssh: args.listen_ssh.0,
                advertise_ssh: args.advertise_ssh,
                ssh_host_suffix: args.ssh_host_suffix,
                ssh_login_grace: args.ssh_login_grace,
                listen_https: args.listen_https.0,
                advertise_https: args.advertise_https,
                tls_cert: args.tls_cert,
                tls_key: args.tls_key,
                keep_audit: args.keep_audit.0,
                keep_builds: args.keep_builds.0,
                max_build_log_bytes: args.max_build_log_mib * 1024 * 1024,
            };
            server::run(config, terminated()).await
        }
        Command::Demo(args) => {
            sigpipe(false);
            // The demo tells its own story, the lost agent it kills included: only errors besides.
            init_tracing(cli.log_format, cli.log.as_deref(), "error");
            let serve = cli::ServeArgs {
                listen_http: "127.0.0.1:0".parse()?,
                listen_quic: "127.0.0.1:0".parse()?,
                advertise_quic: None,
                agent_binary: None,
                config: None,
                max_agents: 100,
                listen_ssh: cli::Listen(Some("127.0.0.1:0".parse()?)),
                advertise_ssh: None,
                ssh_host_suffix: tether_coordinator::sshca::HOST_SUFFIX.into(),
                ssh_login_grace: tether_coordinator::frontdoor::LOGIN_GRACE,
                listen_https: cli::Listen(Some("127.0.0.1:0".parse()?)),
                advertise_https: None,
                tls_cert: None,
                tls_key: None,
                keep_audit: cli::Keep(None),
                keep_builds: cli::Keep(None),
                max_build_log_mib: tether_shared::limits::DEFAULT_MAX_BUILD_LOG_MIB,
            };
            if cli.data_dir.is_some() && args.dir.is_none() {
                // Never the data of a real coordinator (TETHER_DATA_DIR may name one): say so.
                eprintln!(
                    "note: the demo does not use --data-dir (TETHER_DATA_DIR), which names a coordinator's data; \
                     keep the demo's with --dir DIR"
                );
            }
            demo::run(args.dir, args.keep_running, &serve).await
        }
        Command::Workspace(cmd) => {
            init_tracing(cli.log_format, cli.log.as_deref(), "warn");
            let client = Client::discover(cli.url, cli.token, cli.ca, &data_dir)?;
            cli::workspace(&client, cmd).await
        }
        Command::User(cmd) => {
            init_tracing(cli.log_format, cli.log.as_deref(), "warn");
            let client = Client::discover(cli.url, cli.token, cli.ca, &data_dir)?;
            cli_ssh::user(&client, cmd).await
        }
        Command::Config(cli::ConfigCmd::Check(_)) => unreachable!("resolved in main"),
        Command::Config(cli::ConfigCmd::Example) => {
            print!("{}", config::example());
            Ok(())
        }
        Command::Admin(cmd) => {
            init_tracing(cli.log_format, cli.log.as_deref(), "warn");
            match cmd {
                backup::AdminCmd::Backup { file } => {
                    let client = Client::discover(cli.url, cli.token, cli.ca, &data_dir)?;
                    backup::backup(&client, &file).await
                }
                backup::AdminCmd::Restore { file, force } => {
                    // It writes a coordinator's keys and database: where, the operator says.
                    if cli.data_dir.is_none() {
                        anyhow::bail!(
                            "name the data directory to restore into: `tether --data-dir DIR admin restore {}` \
                             (or TETHER_DATA_DIR; a coordinator started without one uses {})",
                            file.display(),
                            data_dir.display()
                        );
                    }
                    backup::restore(&file, &data_dir, force).await
                }
            }
        }
        Command::Audit { user, workspace, limit, json } => {
            init_tracing(cli.log_format, cli.log.as_deref(), "warn");
            let client = Client::discover(cli.url, cli.token, cli.ca, &data_dir)?;
            cli_ssh::audit(&client, user, workspace, limit, json).await
        }
        Command::ConfigSsh { user, ssh_config, identity } => {
            init_tracing(cli.log_format, cli.log.as_deref(), "warn");
            let client = Client::discover(cli.url, cli.token, cli.ca, &data_dir)?;
            cli_ssh::config_ssh(&client, user, ssh_config, identity).await
        }
        Command::Ssh { workspace, stdio, as_user, args } => {
            init_tracing(cli.log_format, cli.log.as_deref(), "warn");
            let client = Client::discover(cli.url, cli.token, cli.ca, &data_dir)?;
            if stdio {
                // Exit as soon as the connection ends, so OpenSSH sees stdout close: the runtime
                // would otherwise wait on its way out for the read of stdin, which cannot be
                // cancelled, and so for the client, which is waiting for us.
                let code = match cli_ssh::ssh_stdio(&client, &workspace, as_user.as_deref()).await {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("error: {}", tether_shared::error_chain_text(e.as_ref()));
                        1
                    }
                };
                std::process::exit(code)
            } else if let Err(e) = cli_ssh::ssh_exec(&client, &workspace, as_user.as_deref(), &args).await {
                // As ssh itself does when it cannot connect, so that scripts tell a refusal from
                // the remote command's own failure.
                eprintln!("error: {}", tether_shared::error_chain_text(e.as_ref()));
                std::process::exit(255)
            } else {
                Ok(())
            }
        }
    }
}

/// A bad command line: clap's message, and exit status 64 (EX_USAGE) like bad configuration;
/// `--help` and `--version` exit 0.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit()
    }
    let _ = e.print();
    std::process::exit(config::EXIT_CONFIG)
}

/// How a write to a closed pipe ends this process. The CLI, like other Unix tools, ends quietly
/// (`tether workspace list | head`), where Rust's default made every print panic with a backtrace.
/// The coordinator's servers keep Rust's default, an error on the write, so a client or a log
/// reader that goes away ends nothing else.
fn sigpipe(quiet_exit: bool) {
    use nix::sys::signal::{signal, SigHandler, Signal};
    let handler = if quiet_exit { SigHandler::SigDfl } else { SigHandler::SigIgn };
    // SAFETY: a default or ignored disposition runs no code of ours in the handler.
    let _ = unsafe { signal(Signal::SIGPIPE, handler) };
}

fn main() {
    // An empty TETHER_… variable means unset, as `serve` and `config check` read them; clap would
    // take it as a flag given no value ("a value is required for '--data-dir'"). Done before any
    // other thread exists.
    for (key, value) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("TETHER_")) && value.is_empty() {
            std::env::remove_var(key);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async_main());
}

async fn async_main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    sigpipe(true);
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `serve` and `config check`: the file and the environment folded into the flags, every
    // problem reported before anything starts.
    let unknown = || config::unknown_variables(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()));
    let mut warnings = Vec::new();
    let cli = match config::resolve(&argv, &|k| std::env::var(k).ok()) {
        Ok(Some(resolved)) => {
            if let Command::Config(cli::ConfigCmd::Check(_)) = resolved.cli.command {
                print!("{}", config::report(&resolved));
                for w in unknown() {
                    println!("warning: {w}");
                }
                return;
            }
            warnings = unknown();
            resolved.cli
        }
        Ok(None) => Cli::try_parse_from(&argv).unwrap_or_else(|e| usage_error(e)),
        Err(config::ConfigError::Usage(e)) => usage_error(e),
        Err(e) => {
            eprint!("error: {e}");
            std::process::exit(config::EXIT_CONFIG);
        }
    };
    if let Err(e) = run(cli, warnings).await {
        eprintln!("error: {}", tether_shared::error_chain_text(e.as_ref()));
        std::process::exit(1);
    }
}
