//! The SSH side of the CLI: `tether user`, `tether workspace grant|revoke|access`, `tether audit`,
//! `tether config-ssh` and `tether ssh`.

use crate::api_ssh::{EndedView, SshCheckView, SshInfo, TICKET_HEADER, UPGRADE_PROTOCOL};
use crate::cli::table;
use crate::client::{enc, Client};
use crate::users::{AuditView, UserView};
use anyhow::{bail, Context};
use clap::Subcommand;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Add a user with their SSH public key(s); prints their API token once.
    Add {
        /// The new user's name (lowercase letters, digits and '-'), also their SSH login name.
        name: String,
        /// Public key file (`id_ed25519.pub`, or several keys one per line). Repeatable.
        #[arg(long = "ssh-key", value_name = "FILE", required = true)]
        ssh_keys: Vec<PathBuf>,
        /// Print the user and their API token as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List users and their key fingerprints.
    List {
        /// Print the users and their keys as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one user.
    Show {
        /// The user's name.
        name: String,
        /// Print the user and their keys as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a user, their keys and grants.
    Remove {
        /// The user's name.
        name: String,
        /// Print what was removed, and the workspaces left without an owner, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add SSH public keys to a user.
    AddKey {
        /// The user's name.
        name: String,
        /// Public key file (`id_ed25519.pub`, or several keys one per line). Repeatable.
        #[arg(long = "ssh-key", value_name = "FILE", required = true)]
        ssh_keys: Vec<PathBuf>,
        /// Print the user and their keys as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove one of a user's keys, by fingerprint (`SHA256:…`).
    RemoveKey {
        /// The user's name.
        name: String,
        /// The key's fingerprint, as `tether user show` lists it (`SHA256:…`).
        fingerprint: String,
        /// Print the user and their remaining keys as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Issue a new API token for a user (the old one stops working).
    Token {
        /// The user's name.
        name: String,
        /// Print the new API token as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Reads public-key files, refusing anything that is clearly not one before it is sent.
fn read_keys(files: &[PathBuf]) -> anyhow::Result<String> {
    let mut out = String::new();
    for f in files {
        let meta = std::fs::metadata(f).with_context(|| format!("reading SSH key {}", f.display()))?;
        if meta.len() > 256 * 1024 {
            bail!("{} is {} bytes; an SSH public key file is a few hundred", f.display(), meta.len());
        }
        let text = std::fs::read_to_string(f).with_context(|| format!("reading SSH key {}", f.display()))?;
        out.push_str(&text);
        out.push('\n');
    }
    Ok(out)
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_user(u: &UserView) {
    println!("user {}", u.name);
    for k in &u.keys {
        let kind = k.public_key.split_whitespace().next().unwrap_or("?");
        println!("  {}  {kind}", k.fingerprint);
    }
}

pub async fn user(client: &Client, cmd: UserCmd) -> anyhow::Result<()> {
    match cmd {
        UserCmd::Add { name, ssh_keys, json } => {
            let body = serde_json::json!({ "name": name, "ssh_keys": read_keys(&ssh_keys)? });
            let v: serde_json::Value = client.post("/users", &body).await?;
            if json {
                return print_json(&v);
            }
            let u: UserView = serde_json::from_value(v["user"].clone())?;
            print_user(&u);
            println!("\nAPI token for {name} (shown once; for `tether ssh` and `tether config-ssh`):");
            println!("  {}", v["token"].as_str().unwrap_or_default());
        }
        UserCmd::List { json } => {
            let users: Vec<UserView> = client.get("/users").await?;
            if json {
                return print_json(&users);
            }
            let rows: Vec<Vec<String>> = users
                .iter()
                .map(|u| {
                    vec![u.name.clone(), u.keys.iter().map(|k| k.fingerprint.as_str()).collect::<Vec<_>>().join(" ")]
                })
                .collect();
            print!("{}", table(&["USER", "KEYS"], &rows));
        }
        UserCmd::Show { name, json } => {
            let u: UserView = client.get(&format!("/users/{}", enc(&name))).await?;
            if json {
                return print_json(&u);
            }
            print_user(&u);
        }
        UserCmd::Remove { name, json } => {
            let removed: serde_json::Value = client.delete(&format!("/users/{}", enc(&name))).await?;
            if json {
                return print_json(&removed);
            }
            println!("user {name} removed");
            let disowned: Vec<&str> = removed["workspaces_without_owner"]
                .as_array()
                .map(|a| a.iter().filter_map(|w| w.as_str()).collect())
                .unwrap_or_default();
            if !disowned.is_empty() {
                println!(
                    "workspaces now without an owner (only the admin reaches them; a later user named {name} does \
                     not): {}",
                    disowned.join(", ")
                );
            }
        }
        UserCmd::AddKey { name, ssh_keys, json } => {
            let body = serde_json::json!({ "ssh_keys": read_keys(&ssh_keys)? });
            let u: UserView = client.post(&format!("/users/{}/keys", enc(&name)), &body).await?;
            if json {
                return print_json(&u);
            }
            print_user(&u);
        }
        UserCmd::RemoveKey { name, fingerprint, json } => {
            let u: UserView = client.delete(&format!("/users/{}/keys/{}", enc(&name), enc(&fingerprint))).await?;
            if json {
                print_json(&u)?;
            } else {
                println!("removed key {fingerprint} from user {name}");
                print_user(&u);
            }
            if u.keys.is_empty() {
                eprintln!(
                    "warning: user '{name}' has no SSH key left and cannot log in over SSH; add one with \
                     `tether user add-key {name} --ssh-key FILE`"
                );
            }
        }
        UserCmd::Token { name, json } => {
            let v: serde_json::Value =
                client.post(&format!("/users/{}/token", enc(&name)), &serde_json::json!({})).await?;
            if json {
                return print_json(&v);
            }
            println!("API token for {name} (shown once): {}", v["token"].as_str().unwrap_or_default());
        }
    }
    Ok(())
}

/// A workspace's owner and grants, as the API gives them or as a line.
fn print_grants(v: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(v);
    }
    let owner = v["owner"].as_str().unwrap_or("-");
    let granted: Vec<&str> =
        v["granted"].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
    println!(
        "{}: owner {owner}; granted: {}",
        v["workspace"].as_str().unwrap_or_default(),
        if granted.is_empty() { "(none)".to_string() } else { granted.join(", ") }
    );
    Ok(())
}

pub async fn grant(client: &Client, workspace: &str, user: &str, json: bool) -> anyhow::Result<()> {
    let v: serde_json::Value =
        client.post(&format!("/workspaces/{}/grants", enc(workspace)), &serde_json::json!({ "user": user })).await?;
    print_grants(&v, json)
}

pub async fn revoke(client: &Client, workspace: &str, user: &str, json: bool) -> anyhow::Result<()> {
    let v: serde_json::Value = client.delete(&format!("/workspaces/{}/grants/{}", enc(workspace), enc(user))).await?;
    print_grants(&v, json)
}

pub async fn access(client: &Client, workspace: &str, json: bool) -> anyhow::Result<()> {
    let v: serde_json::Value = client.get(&format!("/workspaces/{}/grants", enc(workspace))).await?;
    print_grants(&v, json)
}

fn when(ms: i64) -> String {
    crate::view::rfc3339_seconds(ms)
}

pub async fn audit(
    client: &Client,
    user: Option<String>,
    workspace: Option<String>,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    let mut path = format!("/audit?limit={limit}");
    if let Some(u) = &user {
        path.push_str(&format!("&user={}", enc(u)));
    }
    if let Some(w) = &workspace {
        path.push_str(&format!("&workspace={}", enc(w)));
    }
    let rows: Vec<AuditView> = client.get(&path).await?;
    if json {
        return print_json(&rows);
    }
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|a| &a.row)
        .map(|a| {
            vec![
                a.id.to_string(),
                when(a.started_at),
                a.ended_at.map_or("open".into(), |e| format!("{:.1}s", (e - a.started_at) as f64 / 1000.0)),
                a.user.clone(),
                a.workspace.clone(),
                a.via.clone(),
                a.peer.clone(),
                a.bytes_up.to_string(),
                a.bytes_down.to_string(),
                a.outcome.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["ID", "STARTED", "LASTED", "USER", "WORKSPACE", "VIA", "FROM", "UP", "DOWN", "OUTCOME"], &rows)
    );
    Ok(())
}

/// The lines around the block `tether config-ssh` manages for one host suffix. The default
/// suffix's are the ones every earlier release wrote, so that running it again replaces that block;
/// another suffix's block has its own (one per coordinator, each replaced on its own).
pub fn markers(suffix: &str) -> (String, String) {
    let tag = if suffix == crate::sshca::HOST_SUFFIX { String::new() } else { format!(" {suffix}") };
    (format!("{BEGIN_HEAD}{tag}{BEGIN_TAIL}"), format!("# <<< tether{tag} <<<"))
}

/// A begin marker is these around its tag (nothing for the default suffix, ` SUFFIX` otherwise).
const BEGIN_HEAD: &str = "# >>> tether";
const BEGIN_TAIL: &str = ": managed by `tether config-ssh`; edits between these lines are overwritten >>>";

/// The known_hosts file `tether config-ssh` manages beside the ssh config, for one host suffix.
pub fn known_hosts_name(suffix: &str) -> String {
    if suffix == crate::sshca::HOST_SUFFIX {
        "tether_known_hosts".into()
    } else {
        format!("tether_known_hosts{suffix}")
    }
}

/// Quotes a path for ssh_config if it needs it.
fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.contains([' ', '\t', '"']) {
        format!("\"{}\"", s.replace('"', "\\\""))
    } else {
        s
    }
}

/// The managed block for an ssh config file.
pub fn config_block(info: &SshInfo, user: &str, identity: Option<&Path>, known_hosts: &Path) -> anyhow::Result<String> {
    let Some(front_door) = &info.front_door else {
        bail!("the coordinator's SSH front door is off (`tether serve --listen-ssh`)");
    };
    let (host, port) = match front_door.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h.trim_matches(['[', ']']).to_string(), p.to_string()),
        _ => bail!("the coordinator advertises a front door address '{front_door}' that is not HOST:PORT"),
    };
    let common = {
        let mut c = format!("  User {user}\n");
        if let Some(id) = identity {
            c.push_str(&format!("  IdentityFile {}\n  IdentitiesOnly yes\n", quote(id)));
        }
        c.push_str(&format!("  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n", quote(known_hosts)));
        c.push_str(&format!("  Ciphers {}\n", crate::frontdoor::CLIENT_CIPHERS));
        c
    };
    let alias = &info.front_door_alias;
    let (begin, end) = markers(&info.host_suffix);
    Ok(format!(
        "{begin}\nHost {alias}\n  HostName {host}\n  Port {port}\n  HostKeyAlias {alias}\n{common}\nHost *{suffix}\n  ProxyJump {alias}\n{common}{end}\n",
        suffix = info.host_suffix
    ))
}

/// Where in `text` the managed block for `suffix` is: its start and the end of its last line.
/// A block whose end marker is gone (or that is there twice) is an error naming its line: the
/// file is left as it is rather than a guess made at which lines were the block.
fn find_block(text: &str, suffix: &str) -> Result<Option<std::ops::Range<usize>>, String> {
    let (begin, end) = markers(suffix);
    // Whole lines only: one suffix's marker must not be found inside another's.
    let line_at = |from: usize, marker: &str| {
        text[from..].match_indices(marker).map(|(i, _)| from + i).find(|&i| {
            let starts = i == 0 || text.as_bytes()[i - 1] == b'\n';
            let rest = &text[i + marker.len()..];
            starts && (rest.is_empty() || rest.starts_with(['\n', '\r']))
        })
    };
    let line_no = |at: usize| text[..at].matches('\n').count() + 1;
    let Some(b) = line_at(0, &begin) else { return Ok(None) };
    let Some(e) = line_at(b, &end) else {
        return Err(format!(
            "line {}: the tether block for *{suffix} has no end line (`{end}`): put it back at the block's end, or \
             remove the block's lines, and run config-ssh again",
            line_no(b)
        ));
    };
    if let Some(again) = line_at(b + begin.len(), &begin) {
        return Err(format!(
            "line {}: a second tether block for *{suffix} (the first starts at line {}): remove one, and run \
             config-ssh again",
            line_no(again),
            line_no(b)
        ));
    }
    let e = e + end.len();
    let rest = &text[e..];
    let e = e + if rest.starts_with("\r\n") { 2 } else { usize::from(rest.starts_with('\n')) };
    Ok(Some(b..e))
}

/// The front door (`HOST:PORT`) that the managed block for `suffix` in `text` leads to, if it has one.
fn block_front_door(text: &str, suffix: &str) -> Option<String> {
    let block = &text[find_block(text, suffix).ok()??];
    let value = |key: &str| {
        block.lines().find_map(|l| l.trim().strip_prefix(key).and_then(|v| v.strip_prefix(' ')).map(str::trim))
    };
    let (host, port) = (value("HostName")?, value("Port")?);
    Some(if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") })
}

/// The CA key (`ssh-ed25519 AAAA…`) of a known_hosts text's `@cert-authority` line.
fn ca_key(known_hosts: &str) -> Option<String> {
    known_hosts.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some("@cert-authority")).then(|| words.skip(1).take(2).collect::<Vec<_>>().join(" "))
    })
}

/// The managed blocks in `text`: where each starts, and its suffix.
fn blocks(text: &str) -> Vec<(usize, String)> {
    let mut at = 0;
    let mut out = Vec::new();
    for line in text.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix(BEGIN_HEAD) {
            if let Some((tag, _)) = rest.split_once(BEGIN_TAIL) {
                let tag = tag.trim();
                out.push((at, if tag.is_empty() { crate::sshca::HOST_SUFFIX.to_string() } else { tag.to_string() }));
            }
        }
        at += line.len();
    }
    out
}

/// `text` with the managed block for `suffix` replaced, or appended if it has none. Appending keeps
/// the user's global options (lines before any `Host`) applying to everything, as they did. A new
/// block whose names another block's pattern also matches (`*.x.tether` after `*.tether`) goes
/// above that block instead: ssh takes each option from the first block that matches.
pub fn with_block(text: &str, suffix: &str, block: &str) -> Result<String, String> {
    if let Some(r) = find_block(text, suffix)? {
        return Ok(format!("{}{block}{}", &text[..r.start], &text[r.end..]));
    }
    let wider = blocks(text).into_iter().find(|(_, other)| suffix.ends_with(other.as_str()) && suffix != other);
    if let Some((at, _)) = wider {
        return Ok(format!("{}{block}\n{}", &text[..at], &text[at..]));
    }
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(block);
    Ok(out)
}

/// An exclusive lock on a directory, held until it is dropped (flock: no file left behind).
fn lock_dir(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let f = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", dir.display()))
}

fn write_atomic(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Beside the file, and this process's own: two `tether ssh` at once each write theirs.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tether-tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .inspect_err(|_| drop(std::fs::remove_file(&tmp)))
        .with_context(|| format!("replacing {}", path.display()))
}

pub async fn config_ssh(
    client: &Client,
    user: Option<String>,
    ssh_config: Option<PathBuf>,
    identity: Option<PathBuf>,
) -> anyhow::Result<()> {
    let info: SshInfo = client.get("/ssh").await?;
    let user = match (user, &info.user) {
        // A user's token speaks for that user only: a block for another would not log in.
        (Some(u), Some(me)) if &u != me => {
            bail!("--user {u}: this is the API token of user '{me}'; config-ssh writes the block for the token's user")
        }
        (Some(u), _) => u,
        (None, Some(u)) => u.clone(),
        (None, None) => bail!("give --user NAME (the Tether user whose key you log in with)"),
    };
    let config_given = ssh_config.is_some();
    let config_path = match ssh_config {
        Some(p) => p,
        None => {
            let home =
                std::env::var_os("HOME").filter(|h| !h.is_empty()).context("HOME is not set; pass --ssh-config")?;
            let dir = PathBuf::from(home).join(".ssh");
            if !dir.exists() {
                // As ssh and ssh-keygen make it: private to the user.
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            dir.join("config")
        }
    };
    let config_path = std::path::absolute(&config_path)?;
    let dir = config_path.parent().context("the ssh config path has no directory")?;
    if !dir.is_dir() {
        bail!("{} is not a directory: create it first, or give --ssh-config a file in an existing one", dir.display());
    }
    let known_hosts = dir.join(known_hosts_name(&info.host_suffix));
    let identity = identity.map(|i| std::path::absolute(&i)).transpose()?;
    if let Some(i) = &identity {
        if !i.exists() {
            bail!("identity file {} does not exist", i.display());
        }
    }
    if info.user.is_none() {
        // The admin's token writes a block for any name: check it is a user, and that the identity
        // is one of theirs, or the block would never log in.
        let registered: UserView = client.get(&format!("/users/{}", enc(&user))).await?;
        if let Some(i) = &identity {
            let mut public = i.clone().into_os_string();
            public.push(".pub");
            if let Ok(text) = std::fs::read_to_string(&public) {
                if let Ok(keys) = crate::users::parse_keys(&text) {
                    if !keys.iter().any(|(fp, _)| registered.keys.iter().any(|k| &k.fingerprint == fp)) {
                        eprintln!(
                            "warning: {} is not one of the keys registered to user '{user}': the front door will \
                             refuse it (add it with `tether user add-key {user} --ssh-key {}`)",
                            i.display(),
                            Path::new(&public).display()
                        );
                    }
                }
            }
        }
    }
    let block = config_block(&info, &user, identity.as_deref(), &known_hosts)?;
    // Two config-ssh at once (production's and staging's, from one setup script) must not each
    // write the file with only its own block: one at a time, over the whole read and write.
    // (A file system without locks, some NFS mounts: go on without, as before.)
    let _lock = lock_dir(dir).ok();
    let old = match std::fs::read_to_string(&config_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", config_path.display())),
    };
    let new =
        with_block(&old, &info.host_suffix, &block).map_err(|e| anyhow::anyhow!("{}: {e}", config_path.display()))?;
    let old_ca = std::fs::read_to_string(&known_hosts).ok().as_deref().and_then(ca_key);
    write_atomic(&known_hosts, &format!("# managed by `tether config-ssh`\n{}\n", info.known_hosts), 0o644)?;
    if new != old {
        write_atomic(&config_path, &new, 0o600)?;
    }
    println!("wrote the tether block in {} and the CA in {}", config_path.display(), known_hosts.display());
    if old_ca.is_some() && old_ca != ca_key(&info.known_hosts) {
        // Another coordinator's (a moved one keeps its CA): two with one suffix cannot share a config.
        eprintln!(
            "warning: this replaced the block for *{suffix} of another coordinator (its SSH CA differs), which led \
             to the front door at {was}; *{suffix} now leads to {now}. To reach both from one ssh config, give each \
             its own host suffix (`tether serve --ssh-host-suffix .staging`) and run config-ssh for each",
            suffix = info.host_suffix,
            was = block_front_door(&old, &info.host_suffix).as_deref().unwrap_or("?"),
            now = info.front_door.as_deref().unwrap_or("?"),
        );
    }
    let explicit_config = config_given.then_some(config_path.as_path());
    let ssh_home = (!config_given).then(passwd_home).flatten();
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    match ssh_home.filter(|h| canonical(dir) != canonical(h).join(".ssh")) {
        // ssh finds `~/.ssh/config` through the password database, not $HOME: with them apart it
        // never reads the file just written, and comparing what it resolves would blame the wrong
        // file.
        Some(home) => eprintln!(
            "warning: ssh reads {} (your home directory in the password database), not {} ($HOME): \
             run `tether config-ssh --ssh-config {}`, or `ssh -F {}`",
            home.join(".ssh/config").display(),
            config_path.display(),
            home.join(".ssh/config").display(),
            config_path.display()
        ),
        None => {
            for warning in overridden(explicit_config, &config_path, &info, &user, &known_hosts) {
                eprintln!("warning: {warning}");
            }
        }
    }
    println!("connect with: ssh WORKSPACE{}", info.host_suffix);
    Ok(())
}

/// The current user's home directory in the password database, where ssh looks for `~/.ssh`.
fn passwd_home() -> Option<PathBuf> {
    let user = nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten()?;
    std::path::absolute(&user.dir).ok()
}

/// What ssh would really use for a workspace, as `ssh -G` evaluates the config (the system-wide one
/// too, unless `--ssh-config` named the file), against what the block sets: ssh takes the first
/// value it finds for each option, so an earlier `Host *` block that sets `User` or
/// `StrictHostKeyChecking` silently wins. One sentence per option that differs; none if ssh
/// cannot be run.
fn overridden(
    explicit_config: Option<&Path>,
    config_path: &Path,
    info: &SshInfo,
    user: &str,
    known_hosts: &Path,
) -> Vec<String> {
    let host = format!("workspace{}", info.host_suffix);
    let mut ssh = std::process::Command::new("ssh");
    if let Some(f) = explicit_config {
        ssh.arg("-F").arg(f);
    }
    let Ok(out) = ssh.arg("-G").arg(&host).stdin(std::process::Stdio::null()).output() else {
        return Vec::new();
    };
    if !out.status.success() {
        return Vec::new();
    }
    let effective = String::from_utf8_lossy(&out.stdout);
    let get = |key: &str| {
        effective.lines().find_map(|l| l.split_once(' ').filter(|(k, _)| *k == key).map(|(_, v)| v.to_string()))
    };
    let known = known_hosts.display().to_string();
    // (option, `ssh -G`'s key, the block's value); ssh -G may list several known-hosts files.
    let checks = [
        ("User", "user", user),
        ("ProxyJump", "proxyjump", info.front_door_alias.as_str()),
        ("UserKnownHostsFile", "userknownhostsfile", known.as_str()),
        ("StrictHostKeyChecking", "stricthostkeychecking", "true"),
    ];
    // `ssh -G` prints yes and no as true and false; the config file, and so the warning, says yes and no.
    let spelled = |v: &str| match v {
        "true" => "yes".to_string(),
        "false" => "no".to_string(),
        other => other.to_string(),
    };
    checks
        .into_iter()
        .filter_map(|(option, key, want)| {
            let got = get(key);
            // ssh -G lists every known-hosts file, separated by spaces: the block's must be one.
            let listed = |g: &str| {
                g == want
                    || g.starts_with(&format!("{want} "))
                    || g.ends_with(&format!(" {want}"))
                    || g.contains(&format!(" {want} "))
            };
            let ok = got.as_deref().is_some_and(|g| if key == "userknownhostsfile" { listed(g) } else { g == want });
            (!ok).then(|| {
                format!(
                    "ssh resolves {host} with {option} {}, not {}: an earlier `Host` or `Match` block (in {} \
                     or the system-wide config) sets it, and ssh keeps the first value it finds; move the tether \
                     block above it or narrow that block",
                    got.as_deref().map_or("unset".to_string(), spelled),
                    spelled(want),
                    config_path.display()
                )
            })
        })
        .collect()
}

/// `tether ssh --stdio NAME`: joins stdin/stdout to the workspace's agent over the API (for
/// `ProxyCommand`). A connection the coordinator ended fails with its reason (access taken away,
/// the agent lost, the coordinator shutting down), which OpenSSH shows above its own "Connection
/// closed".
pub async fn ssh_stdio(client: &Client, target: &str, as_user: Option<&str>) -> anyhow::Result<()> {
    // The host name as given (`dev.tether`): the coordinator knows its own suffix.
    let mut path = format!("/workspaces/{}/ssh", enc(target.trim()));
    if let Some(u) = as_user {
        path.push_str(&format!("?user={}", enc(u)));
    }
    let (stream, headers) = client.upgrade(&path, UPGRADE_PROTOCOL).await?;
    let ticket = headers.get(TICKET_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
    let ended = splice_stdio(stream).await;
    if matches!(ended, Ok(Ended::ByClient)) {
        return Ok(());
    }
    // The coordinator's side ended first: ask it why, briefly (it may be gone).
    if let Some(ticket) = ticket {
        let path = format!("/ssh/ended/{}", enc(&ticket));
        let ask = client.get::<EndedView>(&path);
        if let Ok(Ok(view)) = tokio::time::timeout(END_REASON_WAIT, ask).await {
            bail!("{}", view.reason);
        }
    }
    ended.map(|_| ()).context("ssh stream")
}

/// How long `tether ssh --stdio` waits to learn why the coordinator ended its connection.
const END_REASON_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Which side of a spliced connection ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Stdin ended first (OpenSSH closed its side); the stream's end followed.
    ByClient,
    /// The stream ended while stdin was still open.
    ByStream,
}

/// Copies stdin to `stream` and `stream` to stdout. Returns when the stream's side ends, as
/// `ssh -W` does: the process then exits, which closes stdout, and that is how OpenSSH learns
/// that the connection is gone (shutting down tokio's stdout leaves the descriptor open). Stdin's
/// end is passed on as a half-close, and the copy the other way goes on until the stream's end.
async fn splice_stdio<S: AsyncRead + AsyncWrite>(stream: S) -> std::io::Result<Ended> {
    const BUFFER: usize = 256 * 1024;
    let (from_stream, mut to_stream) = tokio::io::split(stream);
    let mut stdout = tokio::io::stdout();
    let down = async {
        tokio::io::copy_buf(&mut BufReader::with_capacity(BUFFER, from_stream), &mut stdout).await?;
        stdout.flush().await
    };
    let up = async {
        tokio::io::copy_buf(&mut BufReader::with_capacity(BUFFER, tokio::io::stdin()), &mut to_stream).await?;
        to_stream.shutdown().await
    };
    tokio::pin!(down);
    tokio::select! {
        r = &mut down => r.map(|()| Ended::ByStream),
        r = up => {
            r?;
            down.await.map(|()| Ended::ByClient)
        }
    }
}

/// `tether ssh NAME [ARGS…]`: runs OpenSSH with this CLI as its `ProxyCommand` and the coordinator's
/// CA as the only trusted host key, so nothing else is needed on the user's machine.
///
/// It asks the coordinator first whether the connection would be let in, so that a refusal (a
/// stopped workspace, no access) is all the user reads: OpenSSH adds lines of its own after a
/// ProxyCommand's error.
pub async fn ssh_exec(client: &Client, target: &str, as_user: Option<&str>, args: &[String]) -> anyhow::Result<()> {
    // The host name as given (`dev` or `dev.tether`): the coordinator knows its own suffix.
    let mut check = format!("/workspaces/{}/ssh/check", enc(target.trim()));
    if let Some(u) = as_user {
        check.push_str(&format!("?user={}", enc(u)));
    }
    let (info, checked) = tokio::join!(client.get::<SshInfo>("/ssh"), client.get::<SshCheckView>(&check));
    let info = info?;
    let name = crate::sshca::workspace_name(target, &info.host_suffix);
    match checked {
        // A coordinator from before the check: the connection itself tells a refusal.
        Err(e) if e.downcast_ref::<crate::client::ApiFailure>().is_some_and(|f| f.no_route) => {}
        checked => drop(checked?),
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("tether");
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    // One file per CA, named by its line: `tether ssh` to two coordinators at once must not have
    // one's ssh read the other's CA.
    let line_hash = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(info.known_hosts.as_bytes())[..8]);
    let known_hosts = cache.join(format!("known_hosts-{line_hash}"));
    if std::fs::read_to_string(&known_hosts).ok().as_deref() != Some(&format!("{}\n", info.known_hosts)) {
        write_atomic(&known_hosts, &format!("{}\n", info.known_hosts), 0o644)?;
    }
    let exe = std::env::current_exe().context("finding the tether executable")?;
    let mut proxy = format!("{} ssh --stdio", quote(&exe));
    if let Some(u) = as_user {
        proxy.push_str(&format!(" --as {u}"));
    }
    proxy.push_str(" %h");
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-o")
        .arg(format!("ProxyCommand={proxy}"))
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", quote(&known_hosts)))
        .arg("-o")
        .arg("StrictHostKeyChecking=yes")
        .arg("-o")
        .arg(format!("Ciphers={}", crate::frontdoor::CLIENT_CIPHERS))
        .arg(format!("{name}{}", info.host_suffix))
        .args(args)
        // The token reaches the ProxyCommand through the environment, never the command line.
        .env("TETHER_URL", client.base())
        .env("TETHER_TOKEN", client.token());
    if let Some(ca) = client.ca() {
        cmd.env("TETHER_CA", ca);
    }
    use std::os::unix::process::CommandExt;
    let err = cmd.exec();
    bail!("running ssh: {err} (is OpenSSH's client installed?)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> SshInfo {
        SshInfo {
            front_door: Some("127.0.0.1:2222".into()),
            front_door_alias: "tether-frontdoor".into(),
            host_suffix: ".tether".into(),
            known_hosts: "@cert-authority *.tether,tether-frontdoor ssh-ed25519 AAAA".into(),
            user: None,
        }
    }

    #[test]
    fn the_block_is_replaced_in_place_and_nothing_else_changes() {
        let block =
            config_block(&info(), "alice", Some(Path::new("/k/id")), Path::new("/h/tether_known_hosts")).unwrap();
        assert!(block.contains("Host *.tether\n  ProxyJump tether-frontdoor\n"));
        assert!(block.contains("HostKeyAlias tether-frontdoor"));
        let mine = "ServerAliveInterval 30\n\nHost work\n  HostName work.example\n";
        let once = with_block(mine, ".tether", &block).unwrap();
        assert!(once.starts_with(mine));
        assert_eq!(with_block(&once, ".tether", &block).unwrap(), once, "idempotent");
        let block2 = config_block(&info(), "bob", None, Path::new("/h/tether_known_hosts")).unwrap();
        let twice = with_block(&format!("{once}Host later\n"), ".tether", &block2).unwrap();
        assert!(twice.contains("User bob") && !twice.contains("User alice"));
        assert!(twice.starts_with(mine) && twice.ends_with("Host later\n"));
        assert_eq!(twice.matches(&markers(".tether").0).count(), 1);
        assert_eq!(block_front_door(&twice, ".tether").as_deref(), Some("127.0.0.1:2222"));
    }

    #[test]
    fn each_host_suffix_has_its_own_block() {
        let staging = SshInfo {
            front_door: Some("stage.example:22".into()),
            front_door_alias: "tether-frontdoor_staging".into(),
            host_suffix: ".staging".into(),
            known_hosts: "@cert-authority *.staging,tether-frontdoor_staging ssh-ed25519 BBBB".into(),
            user: Some("alice".into()),
        };
        // The default suffix keeps the markers every earlier release wrote.
        assert_eq!(markers(".tether").1, "# <<< tether <<<");
        assert_eq!(known_hosts_name(".tether"), "tether_known_hosts");
        assert_eq!(known_hosts_name(".staging"), "tether_known_hosts.staging");
        let prod = config_block(&info(), "alice", None, Path::new("/h/tether_known_hosts")).unwrap();
        let stage = config_block(&staging, "alice", None, Path::new("/h/tether_known_hosts.staging")).unwrap();
        assert!(stage.starts_with("# >>> tether .staging: managed"));
        assert!(stage.contains("Host *.staging\n  ProxyJump tether-frontdoor_staging\n"));
        let both = with_block(&with_block("", ".tether", &prod).unwrap(), ".staging", &stage).unwrap();
        assert_eq!(both, format!("{prod}\n{stage}"));
        // Each is replaced on its own, in place.
        let moved = SshInfo { front_door: Some("stage2.example:2222".into()), ..staging };
        let stage2 = config_block(&moved, "alice", None, Path::new("/h/tether_known_hosts.staging")).unwrap();
        let again = with_block(&both, ".staging", &stage2).unwrap();
        assert_eq!(again, format!("{prod}\n{stage2}"));
        assert_eq!(with_block(&again, ".tether", &prod).unwrap(), again);
        assert_eq!(block_front_door(&both, ".staging").as_deref(), Some("stage.example:22"));
        assert_eq!(block_front_door(&again, ".staging").as_deref(), Some("stage2.example:2222"));
        assert_eq!(block_front_door(&again, ".tether").as_deref(), Some("127.0.0.1:2222"));
        assert_eq!(block_front_door(&again, ".other"), None);
    }

    #[test]
    fn a_narrower_suffix_goes_above_a_wider_one() {
        let wide = config_block(&info(), "alice", None, Path::new("/h/tether_known_hosts")).unwrap();
        let narrow_info = SshInfo {
            front_door_alias: "tether-frontdoor_x_tether".into(),
            host_suffix: ".x.tether".into(),
            known_hosts: "@cert-authority *.x.tether,tether-frontdoor_x_tether ssh-ed25519 CCCC".into(),
            ..info()
        };
        let narrow = config_block(&narrow_info, "alice", None, Path::new("/h/tether_known_hosts.x.tether")).unwrap();
        let mine = "Host work\n";
        let one = with_block(mine, ".tether", &wide).unwrap();
        let both = with_block(&one, ".x.tether", &narrow).unwrap();
        assert_eq!(both, format!("{mine}\n{narrow}\n{wide}"));
        assert_eq!(blocks(&both).into_iter().map(|(_, s)| s).collect::<Vec<_>>(), [".x.tether", ".tether"]);
        // Each is still replaced in place; a wider one added later goes at the end.
        assert_eq!(with_block(&both, ".tether", &wide).unwrap(), both);
        assert_eq!(with_block(&both, ".x.tether", &narrow).unwrap(), both);
    }

    #[test]
    fn a_broken_block_is_named_and_nothing_is_guessed() {
        let block = config_block(&info(), "alice", None, Path::new("/h/tether_known_hosts")).unwrap();
        let (begin, end) = markers(".tether");
        let mine = "Host work\n  HostName work.example\n";
        // The end line deleted: the user's lines after it must not be taken for the block's.
        let cut = format!("{mine}{begin}\nHost *.tether\n  User alice\n{mine}");
        let err = with_block(&cut, ".tether", &block).unwrap_err();
        assert!(err.starts_with("line 3: the tether block for *.tether has no end line (`# <<< tether <<<`)"), "{err}");
        // Twice, one after the other or one inside the other.
        let twice = format!("{block}{mine}{block}");
        let err = with_block(&twice, ".tether", &block).unwrap_err();
        assert!(err.contains("a second tether block for *.tether (the first starts at line 1)"), "{err}");
        let nested = format!("{begin}\n{block}{end}\n");
        let err = with_block(&nested, ".tether", &block).unwrap_err();
        assert!(err.starts_with("line 2: a second tether block for *.tether (the first starts at line 1)"), "{err}");
        // A file with CRLF line ends: the block's end line goes whole.
        let crlf = format!("{}{mine}", block.replace('\n', "\r\n"));
        assert_eq!(with_block(&crlf, ".tether", &block).unwrap(), format!("{block}{mine}"));
        assert_eq!(
            ca_key("# x\n@cert-authority *.tether,tether-frontdoor ssh-ed25519 AAAA c\n").unwrap(),
            "ssh-ed25519 AAAA"
        );
    }

    #[test]
    fn paths_with_spaces_are_quoted() {
        assert_eq!(quote(Path::new("/a b/c")), "\"/a b/c\"");
        assert_eq!(quote(Path::new("/ab/c")), "/ab/c");
    }
}
