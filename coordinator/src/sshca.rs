//! The coordinator as an SSH certificate authority.
//!
//! One ed25519 CA key, kept in the data directory, signs every agent's host key as a host
//! certificate for its workspace (`NAME.tether` and `NAME`), and the front door's own host key for
//! its alias (`tether-frontdoor`) and its configured host names. Users trust the CA once, with one
//! `@cert-authority` line that `tether config-ssh` writes; a rebuilt workspace with a new host key
//! then never triggers a host-key warning, and strict host-key checking stays on.
//!
//! The suffix (`.tether`) is a setting ([`SshNames`]), so that one user's ssh config can hold the
//! blocks of several coordinators (`dev.tether` on one, `dev.staging` on another), each trusting
//! its own CA for its own names only.

use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::{Algorithm, Certificate, HashAlg, LineEnding, PrivateKey, PublicKey};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tether_shared::limits;

/// The front door's alias with the default suffix.
pub const FRONT_DOOR_ALIAS: &str = "tether-frontdoor";
/// Host names of workspaces end in this unless `--ssh-host-suffix` says otherwise.
pub const HOST_SUFFIX: &str = ".tether";
/// Longest host suffix: with a 63-byte workspace name, a host name stays well under DNS's 253.
pub const MAX_HOST_SUFFIX: usize = 100;

/// The names users reach this coordinator's workspaces and front door by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshNames {
    /// Workspace host names are `NAME` plus this (`.tether`).
    pub suffix: String,
    /// The name the front door's host certificate carries, and the `HostKeyAlias` the ssh config
    /// that `tether config-ssh` writes uses for it, so the check does not depend on how the
    /// coordinator's address is spelled. `tether-frontdoor` with the default suffix, otherwise
    /// `tether-frontdoor` and the suffix with underscores for dots (`tether-frontdoor_staging`):
    /// one alias per suffix (host names have no `_`), never a name that the suffix's
    /// `Host *.staging` pattern matches, and never a workspace's name.
    pub alias: String,
    /// The host names users dial the front door by (`--advertise-ssh`, or its bound address):
    /// its certificate is for them too, and no workspace's is, with the suffix or without.
    pub front_door_hosts: Vec<String>,
    /// The port users dial the front door on: not 22, known_hosts names it `[HOST]:PORT`.
    pub front_door_port: u16,
}

impl Default for SshNames {
    fn default() -> Self {
        SshNames {
            suffix: HOST_SUFFIX.into(),
            alias: FRONT_DOOR_ALIAS.into(),
            front_door_hosts: Vec::new(),
            front_door_port: 22,
        }
    }
}

impl SshNames {
    /// The names for a suffix that [`parse_host_suffix`] accepted.
    pub fn new(suffix: &str) -> Result<SshNames, String> {
        let suffix = parse_host_suffix(suffix)?;
        let alias = if suffix == HOST_SUFFIX {
            FRONT_DOOR_ALIAS.into()
        } else {
            format!("tether-frontdoor{}", suffix.replace('.', "_"))
        };
        Ok(SshNames { suffix, alias, front_door_hosts: Vec::new(), front_door_port: 22 })
    }

    /// Whether a workspace's certificate may carry `principal`: never a name the front door is
    /// known by. Any `tether-frontdoor…` is kept out too, as another coordinator's alias (a staging
    /// coordinator restored from production's backup has production's CA).
    fn may_certify(&self, principal: &str) -> bool {
        let an_alias = !principal.contains('.') && principal.starts_with(FRONT_DOOR_ALIAS);
        !an_alias && principal != self.alias && !self.front_door_hosts.iter().any(|h| h.eq_ignore_ascii_case(principal))
    }

    /// The workspace a client's host name names (see [`workspace_name`]).
    pub fn workspace_name(&self, target: &str) -> String {
        workspace_name(target, &self.suffix)
    }
}

/// The workspace a client's host name names: `NAME` plus `suffix`, or `NAME`, any case. A host name
/// with another suffix is left whole, so that it is refused as no such workspace rather than taken
/// for one of this coordinator's.
pub fn workspace_name(target: &str, suffix: &str) -> String {
    // A host name is at most 255 characters; longer is not a workspace, and is not worth keeping
    // whole in the log and the audit record of its refusal.
    let target: String = target.chars().take(255).collect();
    let t = target.trim().trim_end_matches('.').to_ascii_lowercase();
    t.strip_suffix(suffix).map(str::to_string).unwrap_or(t)
}

/// `--ssh-host-suffix`: a dot, then one or more DNS labels (`.tether`, `.staging.example.com`).
pub fn parse_host_suffix(s: &str) -> Result<String, String> {
    let shown: String = s.chars().take(80).collect();
    let Some(labels) = s.strip_prefix('.') else {
        return Err(format!("'{shown}' does not start with a dot: give it as `.tether` or `.staging.example.com`"));
    };
    if s.len() > MAX_HOST_SUFFIX {
        return Err(format!("'{shown}…' is {} bytes, over the limit of {MAX_HOST_SUFFIX}", s.len()));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !labels.split('.').all(label_ok) {
        return Err(format!(
            "'{shown}' is not a host name suffix: after the leading dot, use DNS labels of lowercase letters, \
             digits and '-' (not starting or ending with '-'), separated by single dots"
        ));
    }
    Ok(s.to_string())
}

/// Host certificates are signed again at every agent connection and every coordinator start; the
/// validity only bounds how long a stolen agent host key stays useful.
const HOST_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Slack for clocks that run behind.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum SshCaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Write(#[from] crate::pki::PkiError),
    #[error("{path}: not an OpenSSH private key: {source}")]
    BadKeyFile { path: PathBuf, source: russh::keys::ssh_key::Error },
    #[error("host key is not valid: {0}")]
    BadHostKey(String),
    #[error("signing failed: {0}")]
    Sign(russh::keys::ssh_key::Error),
}

pub struct SshCa {
    ca: PrivateKey,
    front_door: PrivateKey,
    names: SshNames,
}

/// A new ed25519 key from the system's random source.
pub fn new_ed25519(comment: &str) -> PrivateKey {
    let seed: [u8; 32] = rand::random();
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(comment);
    key
}

/// Loads an OpenSSH private key, creating it (mode 0600, written atomically) if missing.
pub fn load_or_create_key(path: &Path, comment: &str) -> Result<PrivateKey, SshCaError> {
    let io = |source| SshCaError::Io { path: path.to_path_buf(), source };
    match std::fs::read(path) {
        Ok(bytes) => {
            PrivateKey::from_openssh(bytes).map_err(|source| SshCaError::BadKeyFile { path: path.into(), source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = new_ed25519(comment);
            let text = key.to_openssh(LineEnding::LF).map_err(SshCaError::Sign)?;
            crate::pki::write_private(path, text.as_bytes())?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// `SHA256:…`, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// What a private key given for a public one gets.
pub const PRIVATE_KEY_GIVEN: &str = "this is a private key; give the public key (the .pub file)";

/// Parses one OpenSSH public-key line (`ssh-ed25519 AAAA… comment`), with the reason if it is not one.
pub fn parse_public_key(line: &str) -> Result<PublicKey, String> {
    let line = line.trim();
    if line.len() > limits::MAX_SSH_PUBLIC_KEY {
        return Err(format!("key is {} bytes, over the limit of {}", line.len(), limits::MAX_SSH_PUBLIC_KEY));
    }
    if line.starts_with("-----BEGIN") {
        return Err(PRIVATE_KEY_GIVEN.into());
    }
    // `no-pty ssh-ed25519 AAAA…`: an authorized_keys line with options, which Tether has no use for.
    let is_type = |w: &str| w.starts_with("ssh-") || w.starts_with("ecdsa-") || w.starts_with("sk-");
    let mut words = line.split_whitespace();
    if let Some(first) = words.next() {
        if !is_type(first) && words.any(is_type) {
            let options: String = first.chars().take(64).collect();
            return Err(format!(
                "authorized_keys options ('{options}') are not supported: give the key alone (type, key, comment)"
            ));
        }
    }
    let key = PublicKey::from_openssh(line).map_err(|e| format!("not an OpenSSH public key line: {e}"))?;
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } | Algorithm::Rsa { .. } => Ok(key),
        other => Err(format!("key type {other} is not accepted; use ed25519, ecdsa or rsa")),
    }
}

fn unix_s(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl SshCa {
    /// Loads the CA key and the front door's host key from `dir`, creating them on first start;
    /// certificates name hosts with `names`.
    pub fn load_or_create(dir: &Path, names: SshNames) -> Result<SshCa, SshCaError> {
        Ok(SshCa {
            ca: load_or_create_key(&dir.join("ssh-ca.key"), "tether ssh ca")?,
            front_door: load_or_create_key(&dir.join("ssh-frontdoor.key"), "tether front door")?,
            names,
        })
    }

    /// The host names its certificates are for.
    pub fn names(&self) -> &SshNames {
        &self.names
    }

    pub fn public_key(&self) -> &PublicKey {
        self.ca.public_key()
    }

    /// The CA's public key as one OpenSSH line.
    pub fn public_line(&self) -> String {
        self.ca.public_key().to_openssh().unwrap_or_default()
    }

    /// The known_hosts line that makes OpenSSH trust every workspace and the front door: under its
    /// alias (config-ssh's `HostKeyAlias`) and as users dial it without config-ssh (`ssh -J
    /// alice@HOST:PORT`, which OpenSSH looks up as `[HOST]:PORT`).
    pub fn known_hosts_line(&self) -> String {
        let key = self.ca.public_key().to_openssh().unwrap_or_default();
        let mut patterns = vec![format!("*{}", self.names.suffix), self.names.alias.clone()];
        for host in &self.names.front_door_hosts {
            patterns.push(match self.names.front_door_port {
                22 => host.clone(),
                port => format!("[{host}]:{port}"),
            });
        }
        format!("@cert-authority {} {key}", patterns.join(","))
    }

    pub fn front_door_key(&self) -> &PrivateKey {
        &self.front_door
    }

    /// Signs a host certificate for `key` valid for `principals`.
    pub fn sign_host(&self, key: &PublicKey, key_id: &str, principals: &[String]) -> Result<Certificate, SshCaError> {
        let now = std::time::SystemTime::now();
        let after = unix_s(now - CLOCK_SKEW);
        let before = unix_s(now + HOST_CERT_VALIDITY);
        let nonce: [u8; 32] = rand::random();
        let mut b = Builder::new(nonce.to_vec(), key.key_data().clone(), after, before).map_err(SshCaError::Sign)?;
        b.cert_type(CertType::Host).map_err(SshCaError::Sign)?;
        b.serial(rand::random()).map_err(SshCaError::Sign)?;
        b.key_id(key_id).map_err(SshCaError::Sign)?;
        for p in principals {
            b.valid_principal(p.clone()).map_err(SshCaError::Sign)?;
        }
        b.sign(&self.ca).map_err(SshCaError::Sign)
    }

    /// An agent's host certificate for workspace `name`, as one OpenSSH line.
    pub fn sign_workspace_host(&self, host_key_line: &str, name: &str) -> Result<String, SshCaError> {
        let key = parse_public_key(host_key_line).map_err(SshCaError::BadHostKey)?;
        // Its host name, and its bare name too (`ssh -J … dev@NAME`), but never one the front door
        // is known by: a workspace must not be able to pose as the front door.
        let principals: Vec<String> = [format!("{name}{}", self.names.suffix), name.to_string()]
            .into_iter()
            .filter(|p| self.names.may_certify(p))
            .collect();
        if principals.is_empty() {
            return Err(SshCaError::BadHostKey(format!("workspace '{name}' is named like the SSH front door")));
        }
        let cert = self.sign_host(&key, &format!("workspace {name}"), &principals)?;
        cert.to_openssh().map_err(SshCaError::Sign)
    }

    /// The front door's host certificate, for its alias and its host names.
    pub fn front_door_certificate(&self) -> Result<Certificate, SshCaError> {
        let alias = &self.names.alias;
        let mut principals = vec![alias.clone()];
        principals.extend(self.names.front_door_hosts.iter().filter(|n| *n != alias).cloned());
        self.sign_host(self.front_door.public_key(), "tether front door", &principals)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_persist_and_certificates_verify() {
        let dir = tempfile::tempdir().unwrap();
        let ca = SshCa::load_or_create(dir.path(), SshNames::default()).unwrap();
        let again = SshCa::load_or_create(dir.path(), SshNames::default()).unwrap();
        assert_eq!(ca.public_line(), again.public_line());

        let host = new_ed25519("host");
        let line = ca.sign_workspace_host(&host.public_key().to_openssh().unwrap(), "dev").unwrap();
        let cert = Certificate::from_openssh(&line).unwrap();
        assert_eq!(cert.cert_type(), CertType::Host);
        assert_eq!(cert.valid_principals(), ["dev.tether".to_string(), "dev".to_string()]);
        let fp = ca.public_key().fingerprint(HashAlg::Sha256);
        cert.validate(&[fp]).unwrap();
        assert!(ca.known_hosts_line().starts_with("@cert-authority *.tether,tether-frontdoor ssh-ed25519 "));
    }

    #[test]
    fn a_host_suffix_names_workspaces_the_front_door_and_the_trusted_hosts() {
        let staging = SshNames::new(".staging.example").unwrap();
        assert_eq!(staging.alias, "tether-frontdoor_staging_example");
        // One alias per suffix.
        assert_ne!(SshNames::new(".a-b").unwrap().alias, SshNames::new(".a.b").unwrap().alias);
        assert_eq!(SshNames::new(".tether").unwrap(), SshNames::default());
        assert_eq!(staging.workspace_name("Dev.Staging.Example."), "dev");
        assert_eq!(staging.workspace_name("dev"), "dev");
        // Another coordinator's name is not taken for one of ours.
        assert_eq!(staging.workspace_name("dev.tether"), "dev.tether");
        assert_eq!(SshNames::default().workspace_name("dev.tether"), "dev");

        let dir = tempfile::tempdir().unwrap();
        let ca = SshCa::load_or_create(dir.path(), staging.clone()).unwrap();
        assert!(ca
            .known_hosts_line()
            .starts_with("@cert-authority *.staging.example,tether-frontdoor_staging_example "));
        let host = new_ed25519("host").public_key().to_openssh().unwrap();
        let cert = Certificate::from_openssh(&ca.sign_workspace_host(&host, "dev").unwrap()).unwrap();
        assert_eq!(cert.valid_principals(), ["dev.staging.example".to_string(), "dev".to_string()]);
        // A workspace named like a front door's alias, or like the front door's host name, is not
        // certified for that name.
        let cert = Certificate::from_openssh(&ca.sign_workspace_host(&host, "tether-frontdoor").unwrap()).unwrap();
        assert_eq!(cert.valid_principals(), ["tether-frontdoor.staging.example".to_string()]);
        let alias = staging.alias.clone();
        let names = SshNames { front_door_hosts: vec!["tether.staging.example".into(), "gate".into()], ..staging };
        let ca = SshCa::load_or_create(dir.path(), names).unwrap();
        let door = ca.front_door_certificate().unwrap();
        assert_eq!(door.valid_principals(), [alias, "tether.staging.example".into(), "gate".into()]);
        // Dialled as `ssh -J alice@tether.staging.example` (port 22) it is known by its name.
        assert!(ca.known_hosts_line().starts_with(
            "@cert-authority *.staging.example,tether-frontdoor_staging_example,tether.staging.example,gate ssh-ed25519 "
        ));
        let names = SshNames { front_door_port: 2222, ..ca.names().clone() };
        let ca = SshCa::load_or_create(dir.path(), names).unwrap();
        assert!(ca.known_hosts_line().contains(",[tether.staging.example]:2222,[gate]:2222 ssh-ed25519 "));
        let cert = Certificate::from_openssh(&ca.sign_workspace_host(&host, "tether").unwrap()).unwrap();
        assert_eq!(cert.valid_principals(), ["tether".to_string()]);
        let cert = Certificate::from_openssh(&ca.sign_workspace_host(&host, "gate").unwrap()).unwrap();
        assert_eq!(cert.valid_principals(), ["gate.staging.example".to_string()]);
    }

    #[test]
    fn bad_host_suffixes_are_refused_with_why() {
        for (bad, why) in [
            ("tether", "does not start with a dot"),
            (".", "not a host name suffix"),
            (".Staging", "not a host name suffix"),
            (".a..b", "not a host name suffix"),
            (".-a", "not a host name suffix"),
            (".a b", "not a host name suffix"),
            (".*", "not a host name suffix"),
            (".a,b", "not a host name suffix"),
        ] {
            let err = parse_host_suffix(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert!(parse_host_suffix(&format!(".{}", "a".repeat(120))).unwrap_err().contains("over the limit"));
        assert_eq!(parse_host_suffix(".dev-1.example").unwrap(), ".dev-1.example");
    }

    #[test]
    fn public_keys_are_checked() {
        assert!(parse_public_key("ssh-ed25519 nonsense").unwrap_err().contains("not an OpenSSH public key"));
        assert!(parse_public_key("-----BEGIN OPENSSH PRIVATE KEY-----").unwrap_err().contains("private key"));
        let with_options =
            "no-pty,command=\"x\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAzKDVc8sDliTHRhjiNeKIB8xkcVvq1PlnyDVC4uU19h c";
        let err = parse_public_key(with_options).unwrap_err();
        assert!(err.starts_with("authorized_keys options ('no-pty,command=\"x\"') are not supported"), "{err}");
        let key = new_ed25519("alice@laptop");
        let line = key.public_key().to_openssh().unwrap();
        assert_eq!(fingerprint(&parse_public_key(&line).unwrap()), fingerprint(key.public_key()));
    }
}
