//! Command-line flags and environment variables, checked all at once into a [`Config`].
//!
//! The agent token is never a command-line argument (every user on the machine can read those with
//! `ps`): it comes from `TETHER_AGENT_TOKEN` or from a file.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use tether_shared::limits;
use tether_shared::tls::{self, CaPin, TlsError};

/// Environment variable holding the agent token.
pub const TOKEN_ENV: &str = "TETHER_AGENT_TOKEN";
/// Where the token file is named; scripts do not see it either.
pub const TOKEN_FILE_ENV: &str = "TETHER_AGENT_TOKEN_FILE";
/// Environment variable with the tracing filter.
pub const LOG_FILTER_ENV: &str = "TETHER_LOG";

/// Largest token or CA file read, so a wrong path (a disk image, `/dev/zero`) fails cleanly.
const MAX_SECRET_FILE: u64 = 64 * 1024;
const MAX_CA_FILE: u64 = 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Tether's workspace agent: dials out to the coordinator, runs the workspace's startup and stop
/// scripts and reports status. The agent token is read from TETHER_AGENT_TOKEN or from
/// --token-file, never from the command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tether-agent", version)]
pub struct Args {
    /// The coordinator's tunnel (QUIC) address. Required.
    #[arg(long, env = "TETHER_COORDINATOR", value_name = "HOST:PORT")]
    pub coordinator: Option<String>,

    /// PEM file with the coordinator's CA certificate (or use --ca-sha256).
    #[arg(long, env = "TETHER_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// The coordinator CA's fingerprint (or use --ca).
    #[arg(long = "ca-sha256", env = "TETHER_CA_SHA256", value_name = "sha256:HEX")]
    pub ca_sha256: Option<String>,

    /// File holding the agent token (alternative to the TETHER_AGENT_TOKEN variable).
    #[arg(long, env = "TETHER_AGENT_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Where the agent keeps its state and script logs [default: $XDG_STATE_HOME/tether-agent or
    /// ~/.local/state/tether-agent].
    #[arg(long, env = "TETHER_AGENT_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Log output format (the filter comes from TETHER_LOG, default "info").
    #[arg(long, env = "TETHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Also serve SSH directly on this TCP address, for debugging and tests (needs
    /// --ssh-authorized-keys). Off by default: users normally come through the coordinator.
    #[arg(long, env = "TETHER_AGENT_SSH_LISTEN", value_name = "ADDR")]
    pub ssh_listen: Option<std::net::SocketAddr>,

    /// OpenSSH authorized_keys file naming the keys --ssh-listen accepts.
    #[arg(long, env = "TETHER_AGENT_SSH_AUTHORIZED_KEYS", value_name = "FILE")]
    pub ssh_authorized_keys: Option<PathBuf>,

    /// Serve Prometheus metrics (GET /metrics) on this TCP address, e.g. 127.0.0.1:9465 (port 0
    /// picks a free one; the log says which). Off by default; a non-loopback address is allowed
    /// with a warning.
    #[arg(long, env = "TETHER_AGENT_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,

    /// A helper the agent runs as its own child process instead of the agent.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Helpers the agent starts itself; hidden from `--help`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Serve SFTP on stdin and stdout in the working directory (the `sftp` subsystem where
    /// OpenSSH's sftp-server is not installed).
    #[command(hide = true)]
    SftpServer,
}

/// Everything the agent needs, checked.
#[derive(Clone)]
pub struct Config {
    /// `HOST:PORT`, resolved at every connection attempt.
    pub coordinator: String,
    pub ca: CaPin,
    pub token: String,
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    /// The optional direct SSH listener (`--ssh-listen`).
    pub ssh_listen: Option<SshListen>,
    /// Where to serve metrics (`--metrics-listen`), if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// A TCP address to serve SSH on, and the fingerprints of the keys it accepts.
#[derive(Debug, Clone)]
pub struct SshListen {
    pub addr: std::net::SocketAddr,
    pub authorized_keys: Vec<String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of debug output.
        f.debug_struct("Config")
            .field("coordinator", &self.coordinator)
            .field("ca", &self.ca)
            .field("data_dir", &self.data_dir)
            .field("log_format", &self.log_format)
            .field("ssh_listen", &self.ssh_listen)
            .field("metrics_listen", &self.metrics_listen)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no coordinator address: set --coordinator or TETHER_COORDINATOR")]
    NoCoordinator,
    #[error("coordinator address '{0}' is not HOST:PORT")]
    BadCoordinator(String),
    #[error("no coordinator CA: set one of --ca (TETHER_CA) or --ca-sha256 (TETHER_CA_SHA256)")]
    NoCa,
    #[error("--ca (TETHER_CA) and --ca-sha256 (TETHER_CA_SHA256) name different CAs; set exactly one")]
    TwoCas,
    #[error("reading ca file {}: {source}", path.display())]
    ReadCa { path: PathBuf, source: std::io::Error },
    #[error("ca: {0}")]
    Ca(#[from] TlsError),
    #[error("no agent token: set TETHER_AGENT_TOKEN or --token-file (TETHER_AGENT_TOKEN_FILE)")]
    NoToken,
    #[error("both TETHER_AGENT_TOKEN and --token-file (TETHER_AGENT_TOKEN_FILE) are set; set exactly one")]
    TwoTokens,
    #[error("reading token file {}: {source}", path.display())]
    ReadToken { path: PathBuf, source: std::io::Error },
    #[error("agent token from {origin} is empty")]
    EmptyToken { origin: String },
    #[error("agent token from {origin} is {len} bytes, over the limit of {max}")]
    LongToken { origin: String, len: usize, max: usize },
    #[error("agent token from {origin} is not valid UTF-8")]
    TokenNotUtf8 { origin: String },
    #[error("no data directory: set --data-dir (TETHER_AGENT_DATA_DIR), XDG_STATE_HOME or HOME")]
    NoDataDir,
    #[error("--ssh-listen (TETHER_AGENT_SSH_LISTEN) needs --ssh-authorized-keys (TETHER_AGENT_SSH_AUTHORIZED_KEYS)")]
    SshListenWithoutKeys,
    #[error("--ssh-authorized-keys (TETHER_AGENT_SSH_AUTHORIZED_KEYS) is set without --ssh-listen")]
    SshKeysWithoutListen,
    #[error("{0}")]
    SshKeys(#[from] crate::ssh::keys::KeyError),
}

/// All configuration problems found, reported together.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl Config {
    /// Checks parsed flags; `env` reads environment variables (the token, `HOME`, `XDG_STATE_HOME`).
    pub fn from_args(args: Args, env: &dyn Fn(&str) -> Option<OsString>) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();

        let coordinator = match args.coordinator.as_deref().map(str::trim) {
            None | Some("") => {
                errors.push(ConfigError::NoCoordinator);
                None
            }
            Some(addr) if !is_host_port(addr) => {
                errors.push(ConfigError::BadCoordinator(addr.to_string()));
                None
            }
            Some(addr) => Some(addr.to_string()),
        };

        let ca_file = |path: &PathBuf| {
            read_limited(path, MAX_CA_FILE)
                .map_err(|source| ConfigError::ReadCa { path: path.clone(), source })
                .and_then(|pem| Ok(CaPin::from_pem(&pem, &path.display().to_string())?))
        };
        let ca = match (&args.ca, args.ca_sha256.as_deref().filter(|s| !s.trim().is_empty())) {
            (None, None) => Err(ConfigError::NoCa),
            (Some(path), None) => ca_file(path),
            (None, Some(fp)) => CaPin::from_fingerprint(fp).map_err(ConfigError::from),
            // Both may be inherited together (the command provisioner exports both): fine when they
            // name the same CA, an error when they disagree.
            (Some(path), Some(fp)) => match (ca_file(path), CaPin::from_fingerprint(fp)) {
                (Ok(CaPin::Certificate(der)), Ok(CaPin::Fingerprint(want)))
                    if tls::fingerprint(&der) == format!("sha256:{}", hex_lower(&want)) =>
                {
                    Ok(CaPin::Certificate(der))
                }
                (Err(e), _) => Err(e),
                (_, Err(e)) => Err(e.into()),
                _ => Err(ConfigError::TwoCas),
            },
        };
        let ca = ca.map_err(|e| errors.push(e)).ok();

        let token = read_token(env(TOKEN_ENV), args.token_file.as_deref()).map_err(|e| errors.push(e)).ok();

        let data_dir = args.data_dir.clone().or_else(|| default_data_dir(env));
        if data_dir.is_none() {
            errors.push(ConfigError::NoDataDir);
        }

        let ssh_listen = match (args.ssh_listen, &args.ssh_authorized_keys) {
            (None, None) => None,
            (Some(_), None) => {
                errors.push(ConfigError::SshListenWithoutKeys);
                None
            }
            (None, Some(_)) => {
                errors.push(ConfigError::SshKeysWithoutListen);
                None
            }
            (Some(addr), Some(path)) => match crate::ssh::keys::read_authorized_keys(path) {
                Ok(authorized_keys) => Some(SshListen { addr, authorized_keys }),
                Err(e) => {
                    errors.push(e.into());
                    None
                }
            },
        };

        match (coordinator, ca, token, data_dir) {
            (Some(coordinator), Some(ca), Some(token), Some(data_dir)) if errors.is_empty() => Ok(Config {
                coordinator,
                ca,
                token,
                data_dir,
                log_format: args.log_format,
                ssh_listen,
                metrics_listen: args.metrics_listen,
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

/// `host:port` or `[v6]:port`, with a numeric port. Resolution happens at connect time.
fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else { return false };
    // A bare IPv6 address needs brackets, or its last group would be taken for the port.
    let host_ok = !host.is_empty() && (host.starts_with('[') || !host.contains(':'));
    host_ok && port.parse::<u16>().is_ok_and(|p| p != 0)
}

fn read_token(from_env: Option<OsString>, file: Option<&Path>) -> Result<String, ConfigError> {
    let from_env = from_env.filter(|v| !v.is_empty());
    let (raw, origin) = match (from_env, file) {
        (Some(_), Some(_)) => return Err(ConfigError::TwoTokens),
        (None, None) => return Err(ConfigError::NoToken),
        (Some(v), None) => {
            let origin = TOKEN_ENV.to_string();
            let v = v.into_string().map_err(|_| ConfigError::TokenNotUtf8 { origin: origin.clone() })?;
            (v, origin)
        }
        (None, Some(path)) => {
            let bytes = read_limited(path, MAX_SECRET_FILE)
                .map_err(|source| ConfigError::ReadToken { path: path.to_path_buf(), source })?;
            let origin = path.display().to_string();
            let v = String::from_utf8(bytes).map_err(|_| ConfigError::TokenNotUtf8 { origin: origin.clone() })?;
            (v, origin)
        }
    };
    let token = raw.trim();
    if token.is_empty() {
        return Err(ConfigError::EmptyToken { origin });
    }
    if token.len() > limits::MAX_TOKEN {
        return Err(ConfigError::LongToken { origin, len: token.len(), max: limits::MAX_TOKEN });
    }
    Ok(token.to_string())
}

/// `$XDG_STATE_HOME/tether-agent`, else `$HOME/.local/state/tether-agent`.
fn default_data_dir(env: &dyn Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let absolute = |v: OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    if let Some(state) = env("XDG_STATE_HOME").and_then(absolute) {
        return Some(state.join("tether-agent"));
    }
    env("HOME").and_then(absolute).map(|home| home.join(".local/state/tether-agent"))
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a whole file, refusing files over `max` bytes.
fn read_limited(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    std::fs::File::open(path)?.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(std::io::Error::other(format!("file is over the limit of {max} bytes")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::collections::HashMap;

    const FP: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["tether-agent"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    fn check(extra: &[&str], env: &[(&str, &str)]) -> Result<Config, Vec<String>> {
        let env: HashMap<String, OsString> = env.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        Config::from_args(args(extra), &|k| env.get(k).cloned())
            .map_err(|e| e.0.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn minimal_config_with_token_from_env() {
        let c = check(
            &["--coordinator", "coord.example:4433", "--ca-sha256", FP],
            &[(TOKEN_ENV, " tok \n"), ("HOME", "/home/dev")],
        )
        .unwrap();
        assert_eq!(c.coordinator, "coord.example:4433");
        assert_eq!(c.token, "tok");
        assert_eq!(c.data_dir, PathBuf::from("/home/dev/.local/state/tether-agent"));
        assert!(matches!(c.ca, CaPin::Fingerprint(_)));
        assert!(!format!("{c:?}").contains("tok\""), "token must not be in debug output");
    }

    #[test]
    fn xdg_state_home_wins_and_data_dir_flag_wins_over_both() {
        let env = [(TOKEN_ENV, "t"), ("HOME", "/home/dev"), ("XDG_STATE_HOME", "/state")];
        let c = check(&["--coordinator", "c:1", "--ca-sha256", FP], &env).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/state/tether-agent"));
        let c = check(&["--coordinator", "c:1", "--ca-sha256", FP, "--data-dir", "/d"], &env).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/d"));
    }

    #[test]
    fn token_file_is_trimmed_and_conflicts_with_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  secret-token\n\n").unwrap();
        let f = file.to_str().unwrap();
        let c =
            check(&["--coordinator", "[::1]:4433", "--ca-sha256", FP, "--token-file", f], &[("HOME", "/h")]).unwrap();
        assert_eq!(c.token, "secret-token");
        let err =
            check(&["--coordinator", "c:1", "--ca-sha256", FP, "--token-file", f], &[("HOME", "/h"), (TOKEN_ENV, "x")])
                .unwrap_err();
        assert_eq!(err, vec![ConfigError::TwoTokens.to_string()]);
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let err = check(&[], &[]).unwrap_err();
        assert_eq!(
            err,
            vec![
                ConfigError::NoCoordinator.to_string(),
                ConfigError::NoCa.to_string(),
                ConfigError::NoToken.to_string(),
                ConfigError::NoDataDir.to_string(),
            ]
        );
    }

    #[test]
    fn ca_file_and_fingerprint_must_agree() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().self_signed(&key).unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, cert.pem()).unwrap();
        let pem = pem.to_str().unwrap();
        let env = [(TOKEN_ENV, "t"), ("HOME", "/h")];
        let same = tls::fingerprint(cert.der());
        let c = check(&["--coordinator", "c:1", "--ca", pem, "--ca-sha256", &same], &env).unwrap();
        assert!(matches!(c.ca, CaPin::Certificate(ref der) if der == cert.der()));
        let err = check(&["--coordinator", "c:1", "--ca", pem, "--ca-sha256", FP], &env).unwrap_err();
        assert_eq!(err, vec![ConfigError::TwoCas.to_string()]);
    }

    #[test]
    fn ca_problems_are_named() {
        let env = [(TOKEN_ENV, "t"), ("HOME", "/h")];
        let err = check(&["--coordinator", "c:1", "--ca-sha256", "sha256:12"], &env).unwrap_err();
        assert_eq!(err, vec!["ca: ca fingerprint 'sha256:12' is not 'sha256:' followed by 64 hex digits".to_string()]);
        let err = check(&["--coordinator", "c:1", "--ca", "/nonexistent.pem"], &env).unwrap_err();
        assert!(err[0].starts_with("reading ca file /nonexistent.pem: "), "{err:?}");
    }

    #[test]
    fn coordinator_address_needs_a_port() {
        for bad in ["coord", "coord:", ":4433", "coord:99999", "::1:4433"] {
            assert!(!is_host_port(bad), "{bad}");
        }
        for good in ["coord:4433", "10.0.0.1:1", "[::1]:4433"] {
            assert!(is_host_port(good), "{good}");
        }
    }

    #[test]
    fn ssh_listen_needs_an_authorized_keys_file() {
        let env = [(TOKEN_ENV, "t"), ("HOME", "/h")];
        let base = ["--coordinator", "c:1", "--ca-sha256", FP];
        assert!(check(&base, &env).unwrap().ssh_listen.is_none(), "off by default");
        let err = check(&[&base[..], &["--ssh-listen", "127.0.0.1:0"]].concat(), &env).unwrap_err();
        assert_eq!(err, vec![ConfigError::SshListenWithoutKeys.to_string()]);
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("authorized_keys");
        std::fs::write(&keys, "# nothing\n").unwrap();
        let keys = keys.to_str().unwrap();
        let err = check(&[&base[..], &["--ssh-listen", "127.0.0.1:0", "--ssh-authorized-keys", keys]].concat(), &env)
            .unwrap_err();
        assert_eq!(err, vec![format!("authorized keys {keys} holds no key")]);
    }

    #[test]
    fn metrics_listen_is_off_by_default() {
        let env = [(TOKEN_ENV, "t"), ("HOME", "/h")];
        let base = ["--coordinator", "c:1", "--ca-sha256", FP];
        assert_eq!(check(&base, &env).unwrap().metrics_listen, None);
        let c = check(&[&base[..], &["--metrics-listen", "127.0.0.1:0"]].concat(), &env).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:0".parse().unwrap()));
        assert!(Args::try_parse_from(["tether-agent", "--metrics-listen", "localhost"]).is_err(), "an address");
    }

    #[test]
    fn token_limits() {
        let long = "x".repeat(limits::MAX_TOKEN + 1);
        let err = read_token(Some(long.into()), None).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("agent token from TETHER_AGENT_TOKEN is 257 bytes, over the limit of {}", limits::MAX_TOKEN)
        );
        let err = read_token(Some(" \n".into()), None).unwrap_err().to_string();
        assert_eq!(err, "agent token from TETHER_AGENT_TOKEN is empty");
    }
}
