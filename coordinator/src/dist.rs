//! Agent distribution: the coordinator serves its own `tether-agent`, that binary's SHA-256, its CA
//! certificate and `init.sh`, a script a workspace image runs at start to fetch, check and exec the
//! agent. An image then needs only a shell and curl or wget, and its agent always matches the
//! coordinator. Nothing here is secret, so these routes take no token.
//!
//! The binary is hashed once (in a blocking task) and again whenever its size, modification time or
//! inode changes, so replacing it on disk is picked up by the next request. It is streamed from the
//! open file, never loaded whole into memory.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;
use tracing::{info, warn};

/// The file name the binary is served and cached under.
pub const AGENT_FILE: &str = "tether-agent";
pub const BINARY_ROUTE: &str = "/agent/tether-agent";
pub const SHA256_ROUTE: &str = "/agent/tether-agent.sha256";
pub const CA_ROUTE: &str = "/agent/ca.pem";
pub const INIT_ROUTE: &str = "/agent/init.sh";

/// What the init script embeds besides the binary's hash.
#[derive(Debug, Clone)]
pub struct DistConfig {
    /// The `tether-agent` the process provisioner runs: a path, or a bare name looked up in `PATH`.
    pub binary: PathBuf,
    /// The coordinator CA, PEM: the agent pins it.
    pub ca_pem: String,
    /// The base URL workspaces fetch the agent from (the advertised HTTPS URL).
    pub url: String,
    /// Whether that URL's certificate is issued by the coordinator's own CA (the script then verifies
    /// its downloads against that CA) rather than one the system already trusts.
    pub own_ca: bool,
    /// `HOST:PORT` of the agent tunnel.
    pub agent_coordinator: String,
}

/// The served binary as last hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    /// `uname -m`'s family for the binary's ELF machine, `None` when it is not an ELF file or the
    /// machine is not one this knows.
    pub arch: Option<&'static str>,
    stamp: Stamp,
}

/// What tells that the file changed since it was hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: Option<SystemTime>,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp { dev: meta.dev(), ino: meta.ino(), size: meta.len(), mtime: meta.modified().ok() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("this coordinator has no tether-agent to serve: '{0}' is not in PATH (set --agent-binary)")]
    NotFound(PathBuf),
    #[error("this coordinator cannot serve its tether-agent: {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("this coordinator cannot serve its tether-agent: {} is not a regular file", .0.display())]
    NotAFile(PathBuf),
}

pub struct Dist {
    config: DistConfig,
    hashed: tokio::sync::Mutex<Option<Hashed>>,
}

impl Dist {
    pub fn new(config: DistConfig) -> Arc<Dist> {
        Arc::new(Dist { config, hashed: tokio::sync::Mutex::new(None) })
    }

    pub fn config(&self) -> &DistConfig {
        &self.config
    }

    /// Hashes the binary now, so the first download does not wait for it; logs what is served.
    pub async fn prepare(&self) {
        match self.open().await {
            Ok((h, _)) => info!(
                binary = %h.path.display(),
                sha256 = %h.sha256,
                arch = h.arch.unwrap_or("unknown"),
                "serving tether-agent to workspace images"
            ),
            Err(e) => warn!(error = %e, "no tether-agent to serve to workspace images"),
        }
    }

    /// Opens the binary and returns it with its hash, hashing again when it changed on disk. The hash
    /// is of the very file returned (read at offsets, so the returned handle is still at the start).
    pub async fn open(&self) -> Result<(Hashed, std::fs::File), DistError> {
        let path = resolve(&self.config.binary).ok_or_else(|| DistError::NotFound(self.config.binary.clone()))?;
        let mut cached = self.hashed.lock().await;
        let opened = {
            let (p, known) = (path.clone(), cached.clone());
            tokio::task::spawn_blocking(move || open_and_hash(&p, known))
                .await
                .map_err(|e| DistError::Io { path: path.clone(), source: std::io::Error::other(e.to_string()) })??
        };
        if cached.as_ref() != Some(&opened.0) {
            if cached.is_some() {
                info!(binary = %path.display(), sha256 = %opened.0.sha256, "tether-agent changed on disk; serving the new one");
            }
            *cached = Some(opened.0.clone());
        }
        Ok(opened)
    }

    /// The init script, with the current binary's hash in it.
    pub async fn init_script(&self) -> Result<String, DistError> {
        let (hashed, _) = self.open().await?;
        Ok(init_script(&self.config, &hashed))
    }
}

/// A bare name is looked up in `PATH`, as the process provisioner's `Command` would.
fn resolve(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() != 1 || binary.is_absolute() {
        return Some(binary.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(binary)).find(|p| p.is_file())
}

fn open_and_hash(path: &Path, known: Option<Hashed>) -> Result<(Hashed, std::fs::File), DistError> {
    let io = |source| DistError::Io { path: path.to_path_buf(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(DistError::NotAFile(path.to_path_buf()));
    }
    let stamp = Stamp::of(&meta);
    if let Some(h) = known.filter(|h| h.stamp == stamp && h.path == path) {
        return Ok((h, file));
    }
    let mut hasher = Sha256::new();
    let mut head = [0u8; 20];
    let mut head_len = 0;
    let mut buf = vec![0u8; 256 * 1024];
    let mut offset = 0u64;
    loop {
        let n = file.read_at(&mut buf, offset).map_err(io)?;
        if n == 0 {
            break;
        }
        if head_len < head.len() {
            let take = (head.len() - head_len).min(n);
            head[head_len..head_len + take].copy_from_slice(&buf[..take]);
            head_len += take;
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    let hashed = Hashed {
        path: path.to_path_buf(),
        size: offset,
        sha256: hex::encode(hasher.finalize()),
        arch: elf_arch(&head[..head_len]),
        stamp: Stamp { size: offset, ..stamp },
    };
    Ok((hashed, file))
}

/// The `uname -m` family of an ELF executable's machine, from its header.
fn elf_arch(head: &[u8]) -> Option<&'static str> {
    if head.len() < 20 || head[..4] != *b"\x7fELF" {
        return None;
    }
    let class64 = head[4] == 2;
    let machine = match head[5] {
        1 => u16::from_le_bytes([head[18], head[19]]),
        2 => u16::from_be_bytes([head[18], head[19]]),
        _ => return None,
    };
    let little = head[5] == 1;
    Some(match (machine, class64) {
        (62, true) => "x86_64",
        (3, false) => "x86",
        (183, true) => "aarch64",
        (40, false) => "arm",
        (243, true) => "riscv64",
        (21, true) if little => "ppc64le",
        (21, true) => "ppc64",
        (22, true) => "s390x",
        (258, true) => "loongarch64",
        _ => return None,
    })
}

/// Quotes a value for a POSIX shell: single quotes, with each `'` written as `'\''`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The script a workspace image runs at start (README: "Fetch it at start: init.sh").
pub fn init_script(config: &DistConfig, hashed: &Hashed) -> String {
    // Values in comments must not end the comment line.
    let url: String = config.url.chars().filter(|c| !c.is_control()).collect();
    let mut head = String::new();
    head.push_str("#!/bin/sh\n");
    head.push_str(&format!("# tether-agent {} init, made by the coordinator at {}.\n", env!("CARGO_PKG_VERSION"), url));
    head.push_str(&format!(
        "#   curl -fsSL{} {}{INIT_ROUTE} | sh\n",
        if config.own_ca && url.starts_with("https://") { " --cacert ca.pem" } else { "" },
        url
    ));
    head.push_str(
        "# Fetches the tether-agent this coordinator serves (kept in the agent's data directory and reused\n\
         # while its SHA-256 matches), checks it against the SHA-256 below and execs it. The agent token\n\
         # comes from TETHER_AGENT_TOKEN or TETHER_AGENT_TOKEN_FILE in the environment, never an argument.\n\
         # TETHER_URL and TETHER_COORDINATOR override the addresses below.\n",
    );
    let values = [
        ("tether_version", env!("CARGO_PKG_VERSION").to_string()),
        ("agent_sha256", hashed.sha256.clone()),
        ("agent_arch", hashed.arch.unwrap_or("").to_string()),
        ("default_url", config.url.clone()),
        ("default_coordinator", config.agent_coordinator.clone()),
        ("own_ca", if config.own_ca { "1" } else { "0" }.to_string()),
        ("ca_pem", config.ca_pem.trim_end().to_string()),
    ];
    let mut vars = String::new();
    for (name, value) in values {
        vars.push_str(&format!("{name}={}\n", sh_quote(&value)));
    }
    format!("{head}{vars}{INIT_BODY}")
}

/// The script's logic. The values it uses are set above it; everything runs from `main` at the last
/// line, so a download cut short runs nothing.
const INIT_BODY: &str = r#"set -eu

say() { printf 'tether-agent init: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

main() {
    if [ -z "${TETHER_AGENT_TOKEN:-}" ] && [ -z "${TETHER_AGENT_TOKEN_FILE:-}" ]; then
        die "no agent token: set TETHER_AGENT_TOKEN, or TETHER_AGENT_TOKEN_FILE to a file holding it, in the environment (never as an argument)"
    fi

    machine=$(uname -m)
    case "$machine" in
        x86_64 | amd64) family=x86_64 ;;
        aarch64 | arm64) family=aarch64 ;;
        arm*) family=arm ;;
        i[3-6]86 | x86) family=x86 ;;
        *) family=$machine ;;
    esac
    if [ -n "$agent_arch" ] && [ "$family" != "$agent_arch" ]; then
        die "this machine is $machine, but the coordinator serves a tether-agent for linux-$agent_arch: install a tether-agent built for $machine in the image, or run a coordinator built for it"
    fi

    TETHER_URL=${TETHER_URL:-$default_url}
    TETHER_URL=${TETHER_URL%/}
    TETHER_COORDINATOR=${TETHER_COORDINATOR:-$default_coordinator}
    export TETHER_COORDINATOR

    if [ -z "${TETHER_AGENT_DATA_DIR:-}" ]; then
        case "${XDG_STATE_HOME:-}" in
            /*) TETHER_AGENT_DATA_DIR=$XDG_STATE_HOME/tether-agent ;;
            *)
                [ -n "${HOME:-}" ] || die "no data directory: set TETHER_AGENT_DATA_DIR or HOME"
                TETHER_AGENT_DATA_DIR=$HOME/.local/state/tether-agent
                ;;
        esac
    fi
    export TETHER_AGENT_DATA_DIR
    data=$TETHER_AGENT_DATA_DIR
    mkdir -p "$data"

    # The coordinator's CA came with this script, over the connection that fetched it.
    if [ -n "${TETHER_CA:-}" ]; then
        ca_file=$TETHER_CA
    else
        ca_file=$data/ca.pem
        printf '%s\n' "$ca_pem" > "$ca_file.tmp.$$"
        mv -f "$ca_file.tmp.$$" "$ca_file"
        if [ -z "${TETHER_CA_SHA256:-}" ]; then
            TETHER_CA=$ca_file
            export TETHER_CA
        fi
    fi

    if command -v sha256sum > /dev/null 2>&1; then
        sha256_of() { out=$(sha256sum < "$1") && printf '%s\n' "${out%% *}"; }
    elif command -v shasum > /dev/null 2>&1; then
        sha256_of() { out=$(shasum -a 256 < "$1") && printf '%s\n' "${out%% *}"; }
    elif command -v openssl > /dev/null 2>&1; then
        sha256_of() { out=$(openssl dgst -sha256 -r < "$1") && printf '%s\n' "${out%% *}"; }
    else
        die "cannot check the agent: the image has none of sha256sum, shasum or openssl"
    fi

    if command -v curl > /dev/null 2>&1; then
        fetch() {
            if [ "$own_ca" = 1 ]; then
                curl -fsSL --retry 3 --cacert "$ca_file" -o "$2" "$TETHER_URL$1"
            else
                curl -fsSL --retry 3 -o "$2" "$TETHER_URL$1"
            fi
        }
    elif command -v wget > /dev/null 2>&1; then
        wget_help=$(wget --help 2>&1 || true)
        fetch() {
            case "$own_ca:$wget_help" in
                # BusyBox's wget cannot check certificates at all (and its TLS fails unless told not
                # to); the SHA-256 check below is what makes the download safe.
                *BusyBox*) wget -q --no-check-certificate -O "$2" "$TETHER_URL$1" ;;
                1:*) wget -q -O "$2" --ca-certificate="$ca_file" "$TETHER_URL$1" ;;
                *) wget -q -O "$2" "$TETHER_URL$1" ;;
            esac
        }
    else
        die "cannot download the agent: the image has neither curl nor wget"
    fi

    bin=$data/tether-agent
    if [ -f "$bin" ] && [ "$(sha256_of "$bin")" = "$agent_sha256" ]; then
        say "starting the cached tether-agent $tether_version"
    else
        tmp=$bin.download.$$
        rm -f "$tmp"
        if ! fetch /agent/tether-agent "$tmp"; then
            rm -f "$tmp"
            die "could not download $TETHER_URL/agent/tether-agent"
        fi
        got=$(sha256_of "$tmp")
        if [ "$got" != "$agent_sha256" ]; then
            rm -f "$tmp"
            die "refusing to run the downloaded tether-agent: its sha256 is $got, but the coordinator published $agent_sha256 (a proxy or a broken download changed it, or the coordinator's agent changed since this script was fetched: fetch init.sh again)"
        fi
        chmod 755 "$tmp"
        mv -f "$tmp" "$bin"
        say "downloaded tether-agent $tether_version (sha256 $agent_sha256)"
    fi
    exec "$bin" "$@"
}

main "$@"
"#;

/// The distribution routes, on both the HTTP and the HTTPS listener.
pub fn router(dist: Arc<Dist>) -> Router {
    Router::new()
        .route(BINARY_ROUTE, get(binary))
        .route(SHA256_ROUTE, get(sha256))
        .route(CA_ROUTE, get(ca))
        .route(INIT_ROUTE, get(init))
        .with_state(dist)
}

fn unavailable(e: DistError) -> Response {
    warn!(error = %e, "agent download refused");
    (StatusCode::SERVICE_UNAVAILABLE, text(format!("{e}\n"))).into_response()
}

fn text(body: String) -> ([(header::HeaderName, HeaderValue); 2], String) {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
}

async fn binary(State(dist): State<Arc<Dist>>) -> Response {
    let (hashed, file) = match dist.open().await {
        Ok(x) => x,
        Err(e) => return unavailable(e),
    };
    let stream = tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 64 * 1024);
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(hashed.size));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", hashed.sha256)) {
        h.insert(header::ETAG, etag);
    }
    resp
}

async fn sha256(State(dist): State<Arc<Dist>>) -> Response {
    match dist.open().await {
        // `sha256sum -c` reads this as it is.
        Ok((hashed, _)) => text(format!("{}  {AGENT_FILE}\n", hashed.sha256)).into_response(),
        Err(e) => unavailable(e),
    }
}

async fn ca(State(dist): State<Arc<Dist>>) -> Response {
    let mut resp = text(dist.config.ca_pem.clone()).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-pem-file"));
    resp
}

async fn init(State(dist): State<Arc<Dist>>) -> Response {
    match dist.init_script().await {
        Ok(script) => {
            let mut resp = text(script).into_response();
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/x-shellscript"));
            resp
        }
        // A script that says what is wrong: `curl URL | sh` without -f runs it and fails loudly.
        Err(e) => {
            let message = e.to_string();
            warn!(error = %message, "agent download refused");
            let body = format!(
                "#!/bin/sh\nprintf '%s\\n' {} >&2\nexit 1\n",
                sh_quote(&format!("tether-agent init: {message}"))
            );
            (StatusCode::SERVICE_UNAVAILABLE, text(body)).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn elf(class: u8, data: u8, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = data;
        let m = if data == 1 { machine.to_le_bytes() } else { machine.to_be_bytes() };
        h[18..20].copy_from_slice(&m);
        h
    }

    #[test]
    fn elf_machines_map_to_uname_families() {
        assert_eq!(elf_arch(&elf(2, 1, 62)), Some("x86_64"));
        assert_eq!(elf_arch(&elf(2, 1, 183)), Some("aarch64"));
        assert_eq!(elf_arch(&elf(1, 1, 40)), Some("arm"));
        assert_eq!(elf_arch(&elf(2, 2, 22)), Some("s390x"));
        assert_eq!(elf_arch(&elf(2, 1, 21)), Some("ppc64le"));
        assert_eq!(elf_arch(&elf(2, 1, 9999)), None);
        assert_eq!(elf_arch(b"#!/bin/sh\necho not elf\n"), None);
        assert_eq!(elf_arch(b"\x7fELF"), None, "too short");
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
        assert_eq!(sh_quote("$(x)"), "'$(x)'");
    }

    #[tokio::test]
    async fn hashes_once_and_again_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tether-agent");
        std::fs::write(&path, b"first").unwrap();
        let dist = Dist::new(DistConfig {
            binary: path.clone(),
            ca_pem: "CA".into(),
            url: "https://c.example:7443".into(),
            own_ca: true,
            agent_coordinator: "c.example:7443".into(),
        });
        let (a, _) = dist.open().await.unwrap();
        assert_eq!(a.sha256, hex::encode(Sha256::digest(b"first")));
        assert_eq!((a.size, a.arch), (5, None));
        // Replaced the way installs do it: a new file renamed over the old one.
        let tmp = dir.path().join("new");
        std::fs::write(&tmp, b"second version").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let (b, mut file) = dist.open().await.unwrap();
        assert_eq!(b.sha256, hex::encode(Sha256::digest(b"second version")));
        let mut got = Vec::new();
        file.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"second version", "the returned file is the one hashed, read from the start");
        let script = dist.init_script().await.unwrap();
        assert!(script.contains(&format!("agent_sha256='{}'", b.sha256)), "{script}");
        assert!(script.contains("default_url='https://c.example:7443'"), "{script}");
        assert!(script.trim_end().ends_with("main \"$@\""), "{script}");
    }

    #[test]
    fn values_reach_the_shell_literally() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        let hostile = format!("https://h'$(touch {0})`touch {0}`\n touch {0}", marker.display());
        let config = DistConfig {
            binary: PathBuf::from("tether-agent"),
            ca_pem: "-----BEGIN CERTIFICATE-----\nAA'BB\n-----END CERTIFICATE-----\n".into(),
            url: hostile.clone(),
            own_ca: true,
            agent_coordinator: "c.example:7443".into(),
        };
        let hashed = Hashed {
            path: PathBuf::from("tether-agent"),
            size: 0,
            sha256: "00".repeat(32),
            arch: Some("x86_64"),
            stamp: Stamp { dev: 0, ino: 0, size: 0, mtime: None },
        };
        let script = init_script(&config, &hashed);
        // Everything up to the logic: the values, then print two of them.
        let values = &script[..script.find("set -eu").unwrap()];
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{values}printf '%s|%s' \"$default_url\" \"$ca_pem\""))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{hostile}|{}", config.ca_pem.trim_end()));
        // The whole script runs to its first check (no token) and nothing else.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .env_remove("TETHER_AGENT_TOKEN")
            .env_remove("TETHER_AGENT_TOKEN_FILE")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("tether-agent init: no agent token"));
        assert!(!marker.exists(), "a value ran as a command");
    }

    #[tokio::test]
    async fn a_missing_binary_is_named() {
        let dist = Dist::new(DistConfig {
            binary: PathBuf::from("/nonexistent/tether-agent"),
            ca_pem: String::new(),
            url: String::new(),
            own_ca: true,
            agent_coordinator: String::new(),
        });
        let err = dist.open().await.unwrap_err().to_string();
        assert!(
            err.starts_with("this coordinator cannot serve its tether-agent: /nonexistent/tether-agent: "),
            "{err}"
        );
    }
}
