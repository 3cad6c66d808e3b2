//! X11 forwarding (`ssh -X`, `ssh -Y`): a display inside the workspace whose connections become
//! `x11` channels to the client, which hands them to the user's own X server.
//!
//! As sshd does, the agent registers the client's cookie (a fake one: the client swaps in the real
//! cookie only for connections that present it) with the workspace's `xauth`, and sets `DISPLAY` for
//! the session. Unlike sshd, the display is a Unix socket (`/tmp/.X11-unix/XN`, and the abstract
//! name X clients try first) instead of a TCP port: the agent never listens on a network port for
//! this. Numbers start at 10, as sshd's do, past any local X server's.

use super::forward::{listen_x11, Link, Listener};
use std::ffi::OsString;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Where X clients look for display `N`'s socket, `XN`.
pub const SOCKET_DIR: &str = "/tmp/.X11-unix";
/// The first display number tried (sshd's `X11DisplayOffset`), and how many after it.
const FIRST_DISPLAY: u32 = 10;
const DISPLAYS: u32 = 1000;
/// Longest an `xauth` run may take.
const XAUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest auth protocol name and cookie (hex) accepted; MIT-MAGIC-COOKIE-1 uses 18 and 32.
const MAX_PROTOCOL: usize = 64;
const MAX_COOKIE: usize = 1024;
/// Highest screen number accepted.
const MAX_SCREEN: u32 = 255;
/// Where `xauth` is looked for when the session's `PATH` has none.
const FALLBACK_PATH: &str = "/usr/bin:/bin:/usr/local/bin";

/// Why a `x11-req` was refused.
#[derive(Debug, thiserror::Error)]
pub enum X11Error {
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    #[error("no xauth program in the workspace (install xauth)")]
    NoXauth,
    #[error("{SOCKET_DIR}: {0}")]
    SocketDir(std::io::Error),
    #[error("no free display between :{FIRST_DISPLAY} and :{}", FIRST_DISPLAY + DISPLAYS - 1)]
    NoDisplay,
    #[error("display socket: {0}")]
    Bind(std::io::Error),
    #[error("xauth: {0}")]
    Xauth(String),
}

/// A client's `x11-req`, checked: its values go into `xauth`'s input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub single_connection: bool,
    pub protocol: String,
    pub cookie: String,
    pub screen: u32,
}

impl Request {
    pub fn new(single_connection: bool, protocol: &str, cookie: &str, screen: u32) -> Result<Request, X11Error> {
        if protocol.is_empty() || protocol.len() > MAX_PROTOCOL || !protocol.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(X11Error::Invalid("the auth protocol must be 1 to 64 visible ASCII characters"));
        }
        if cookie.is_empty()
            || cookie.len() > MAX_COOKIE
            || cookie.len() % 2 != 0
            || !cookie.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(X11Error::Invalid("the auth cookie must be an even number of hex digits, at most 1024"));
        }
        if screen > MAX_SCREEN {
            return Err(X11Error::Invalid("the screen number is over 255"));
        }
        Ok(Request { single_connection, protocol: protocol.to_string(), cookie: cookie.to_string(), screen })
    }
}

/// A forwarded display, for one session channel. Dropping it stops listening, removes its
/// sockets, and removes its cookie from the session's X authority file.
pub struct Display {
    number: u32,
    screen: u32,
    xauth: PathBuf,
    env: Vec<(OsString, OsString)>,
    /// Dropped only once the cookie is removed: until then the number stays taken, so a new
    /// session cannot get it and have its own cookie removed.
    listener: Option<Listener>,
}

impl Display {
    /// Takes the first free display number, listens on it and registers the client's cookie with
    /// `xauth`, run with the session's environment `env` (its `HOME` or `XAUTHORITY`).
    pub async fn open(link: Link, request: &Request, env: Vec<(OsString, OsString)>) -> Result<Display, X11Error> {
        let path = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.clone());
        // File lookups, on the blocking pool: a PATH entry may be on a hung network filesystem, and
        // the agent's one worker thread serves every session.
        let lookup = tokio::task::spawn_blocking(move || {
            let xauth = find_program("xauth", path.as_deref()).ok_or(X11Error::NoXauth)?;
            socket_dir(Path::new(SOCKET_DIR)).map_err(X11Error::SocketDir)?;
            Ok(xauth)
        });
        let xauth = match tokio::time::timeout(XAUTH_TIMEOUT, lookup).await {
            Ok(Ok(found)) => found?,
            Ok(Err(e)) => return Err(X11Error::Xauth(format!("looking for xauth: {e}"))),
            Err(_) => {
                return Err(X11Error::Xauth(format!("looking for xauth took over {} s", XAUTH_TIMEOUT.as_secs())))
            }
        };
        let (number, listener) = bind(link, request.single_connection).await?;
        let display = Display { number, screen: request.screen, xauth, env, listener: Some(listener) };
        // On failure `display` drops here, and with it the socket and any half-added entry.
        let name = display.auth_name();
        display.xauth(&format!("remove {name}\nadd {name} {} {}\n", request.protocol, request.cookie)).await?;
        Ok(display)
    }

    /// The session's `DISPLAY`.
    pub fn env_value(&self) -> String {
        format!(":{}.{}", self.number, self.screen)
    }

    pub fn number(&self) -> u32 {
        self.number
    }

    /// The name sshd gives `xauth` for a local display: the entry X clients look up for `:N`.
    fn auth_name(&self) -> String {
        format!("unix:{}.{}", self.number, self.screen)
    }

    async fn xauth(&self, input: &str) -> Result<(), X11Error> {
        let mut child = self
            .command()
            .args(["-q", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| X11Error::Xauth(format!("cannot run {}: {e}", self.xauth.display())))?;
        let mut stdin = child.stdin.take().ok_or_else(|| X11Error::Xauth("no stdin".into()))?;
        let run = async {
            stdin.write_all(input.as_bytes()).await?;
            drop(stdin);
            child.wait_with_output().await
        };
        let out = match tokio::time::timeout(XAUTH_TIMEOUT, run).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(X11Error::Xauth(e.to_string())),
            Err(_) => return Err(X11Error::Xauth(format!("no answer within {} s", XAUTH_TIMEOUT.as_secs()))),
        };
        if out.status.success() {
            return Ok(());
        }
        let said: String = String::from_utf8_lossy(&out.stderr).trim().chars().take(200).collect();
        Err(X11Error::Xauth(format!("{}: {said}", out.status)))
    }

    /// `xauth` with the session's environment.
    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.xauth);
        cmd.env_clear().envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }
}

impl Drop for Display {
    fn drop(&mut self) {
        let listener = self.listener.take();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let mut remove = self.command();
        remove
            .args(["-q", "remove", &self.auth_name()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let Ok(mut child) = remove.spawn() else { return };
        runtime.spawn(async move {
            let _ = tokio::time::timeout(XAUTH_TIMEOUT, child.wait()).await;
            drop(listener);
        });
    }
}

/// `SOCKET_DIR`, created world-writable and sticky (as X servers leave it) if it is missing. One that
/// is there must be a real directory (not a symlink), owned by root or by us, and sticky if anyone
/// may write to it: otherwise another user could swap our socket files.
fn socket_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::create_dir(dir) {
        Ok(()) => return std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777)),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let us = nix::unistd::getuid().as_raw();
    if !meta.file_type().is_dir() {
        return Err(std::io::Error::other("exists and is not a directory"));
    }
    if meta.uid() != 0 && meta.uid() != us {
        return Err(std::io::Error::other(format!("owned by uid {}, neither root nor this user", meta.uid())));
    }
    if meta.mode() & 0o002 != 0 && meta.mode() & 0o1000 == 0 {
        return Err(std::io::Error::other("anyone may write to it but it is not sticky"));
    }
    Ok(())
}

/// Listens on the first display number that no X server (its lock file, its socket or its abstract
/// name) or other session holds.
async fn bind(link: Link, single_connection: bool) -> Result<(u32, Listener), X11Error> {
    let mut last_error = None;
    for number in FIRST_DISPLAY..FIRST_DISPLAY + DISPLAYS {
        if Path::new(&format!("/tmp/.X{number}-lock")).exists() {
            continue;
        }
        let path = Path::new(SOCKET_DIR).join(format!("X{number}"));
        match listen_x11(link.clone(), &path, single_connection).await {
            Ok(listener) => return Ok((number, listener)),
            Err(e) if e.kind() == ErrorKind::AddrInUse => continue,
            // Another user's stale socket, say: try the next number.
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.map(X11Error::Bind).unwrap_or(X11Error::NoDisplay))
}

/// The first executable `name` in `path` (a `PATH` value), or in the usual places.
fn find_program(name: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    let dirs = path.map(std::env::split_paths).into_iter().flatten();
    dirs.chain(std::env::split_paths(FALLBACK_PATH))
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_before_they_reach_xauth() {
        let ok = Request::new(false, "MIT-MAGIC-COOKIE-1", "00112233445566778899aabbccddeeff", 0).unwrap();
        assert_eq!(ok.protocol, "MIT-MAGIC-COOKIE-1");
        // A newline or a space would add a second xauth command.
        assert!(Request::new(false, "MIT-MAGIC-COOKIE-1\nremove", "00", 0).is_err());
        assert!(Request::new(false, "MIT MAGIC", "00", 0).is_err());
        assert!(Request::new(false, "", "00", 0).is_err());
        assert!(Request::new(false, "MIT-MAGIC-COOKIE-1", "00 11", 0).is_err());
        assert!(Request::new(false, "MIT-MAGIC-COOKIE-1", "0\n", 0).is_err());
        assert!(Request::new(false, "MIT-MAGIC-COOKIE-1", "001", 0).is_err());
        assert!(Request::new(false, "MIT-MAGIC-COOKIE-1", "", 0).is_err());
        assert!(Request::new(false, "MIT-MAGIC-COOKIE-1", &"ab".repeat(513), 0).is_err());
        assert!(Request::new(false, "MIT-MAGIC-COOKIE-1", "00", 256).is_err());
        assert!(Request::new(false, &"P".repeat(65), "00", 0).is_err());
    }

    #[test]
    fn the_socket_directory_must_be_safe_to_put_sockets_in() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("x11");
        socket_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777, 0o1777, "made sticky");
        socket_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(socket_dir(&dir).unwrap_err().to_string().contains("not sticky"));
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(socket_dir(&link).unwrap_err().to_string().contains("not a directory"));
    }

    #[test]
    fn programs_are_found_on_the_path_then_in_the_usual_places() {
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("xauth");
        std::fs::write(&prog, "#!/bin/sh\n").unwrap();
        assert_ne!(find_program("xauth", Some(dir.path().as_os_str())), Some(prog.clone()));
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_program("xauth", Some(dir.path().as_os_str())), Some(prog));
        assert_eq!(find_program("no-such-program-anywhere", Some(dir.path().as_os_str())), None);
    }
}
