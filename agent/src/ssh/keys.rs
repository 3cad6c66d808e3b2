//! Keys: the agent's persistent host key, the host certificate the coordinator signs for it, and the
//! client keys a connection may authenticate with (as SHA-256 fingerprints).

use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData};
use russh::keys::ssh_key::{AuthorizedKeys, LineEnding};
use russh::keys::{Algorithm, Certificate, HashAlg, PrivateKey, PublicKey};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The host key's file name in the agent's data directory (OpenSSH's own name for it).
pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";
/// Largest authorized_keys file read.
const MAX_AUTHORIZED_KEYS_FILE: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading ssh host key {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("writing ssh host key {}: {source}", path.display())]
    Write { path: PathBuf, source: std::io::Error },
    #[error("ssh host key {} is not an unencrypted OpenSSH private key: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("reading authorized keys {}: {source}", path.display())]
    ReadAuthorized { path: PathBuf, source: std::io::Error },
    #[error("authorized keys {} line {line}: {reason}", path.display())]
    BadAuthorized { path: PathBuf, line: usize, reason: String },
    #[error("authorized keys {} holds no key", path.display())]
    NoAuthorized { path: PathBuf },
}

/// The `SHA256:…` fingerprint of a public key, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// Reads the host key from `DATA/ssh_host_ed25519_key`, creating it on first use. Creation is atomic:
/// the key is written to a temporary file and linked into place, so two agents sharing a data
/// directory (or a crash midway) never leave a half-written key.
pub fn load_or_create_host_key(data_dir: &Path) -> Result<PrivateKey, KeyError> {
    let path = data_dir.join(HOST_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => return parse_host_key(&path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(KeyError::Read { path, source }),
    }
    tether_shared::fs::create_private_dir(data_dir).map_err(|source| KeyError::Write { path: path.clone(), source })?;
    let seed: [u8; 32] = rand::random();
    let key = PrivateKey::new(KeypairData::from(Ed25519Keypair::from_seed(&seed)), "tether-agent")
        .map_err(|e| KeyError::Invalid { path: path.clone(), reason: e.to_string() })?;
    let text =
        key.to_openssh(LineEnding::LF).map_err(|e| KeyError::Invalid { path: path.clone(), reason: e.to_string() })?;
    let tmp = data_dir.join(format!(".{HOST_KEY_FILE}.{:016x}", rand::random::<u64>()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    let linked = write().and_then(|()| std::fs::hard_link(&tmp, &path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), fingerprint = %fingerprint(key.public_key()), "created the ssh host key");
            Ok(key)
        }
        // Another process won the race: use its key.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text =
                std::fs::read_to_string(&path).map_err(|source| KeyError::Read { path: path.clone(), source })?;
            parse_host_key(&path, &text)
        }
        Err(source) => Err(KeyError::Write { path, source }),
    }
}

fn parse_host_key(path: &Path, text: &str) -> Result<PrivateKey, KeyError> {
    let invalid = |reason: String| KeyError::Invalid { path: path.to_path_buf(), reason };
    let key = PrivateKey::from_openssh(text).map_err(|e| invalid(e.to_string()))?;
    if key.is_encrypted() {
        return Err(invalid("the key is encrypted".into()));
    }
    if key.algorithm() != Algorithm::Ed25519 {
        return Err(invalid(format!("the key is {}, not ssh-ed25519", key.algorithm())));
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "the ssh host key is readable by other users");
        }
    }
    Ok(key)
}

/// The host key as one OpenSSH public-key line (`ssh-ed25519 AAAA… tether-agent`).
pub fn public_line(key: &PrivateKey) -> String {
    // Encoding an in-memory ed25519 public key cannot fail.
    key.public_key().to_openssh().unwrap_or_default()
}

/// Parses a host certificate line and checks that it certifies `host_key`.
pub fn parse_host_certificate(line: &str, host_key: &PrivateKey) -> Result<Certificate, String> {
    let cert = Certificate::from_openssh(line.trim()).map_err(|e| e.to_string())?;
    if cert.public_key() != host_key.public_key().key_data() {
        return Err("the certificate is for another key".into());
    }
    if cert.cert_type() != russh::keys::ssh_key::certificate::CertType::Host {
        return Err("the certificate is not a host certificate".into());
    }
    Ok(cert)
}

/// The fingerprints of the keys in an OpenSSH `authorized_keys` file. Options on a line are ignored.
pub fn read_authorized_keys(path: &Path) -> Result<Vec<String>, KeyError> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_AUTHORIZED_KEYS_FILE + 1).read_to_string(&mut text))
        .map_err(|source| KeyError::ReadAuthorized { path: path.to_path_buf(), source })?;
    if text.len() as u64 > MAX_AUTHORIZED_KEYS_FILE {
        let source = std::io::Error::other(format!("file is over the limit of {MAX_AUTHORIZED_KEYS_FILE} bytes"));
        return Err(KeyError::ReadAuthorized { path: path.to_path_buf(), source });
    }
    parse_authorized_keys(&text)
        .map_err(|(line, reason)| KeyError::BadAuthorized { path: path.to_path_buf(), line, reason })
        .and_then(
            |keys| if keys.is_empty() { Err(KeyError::NoAuthorized { path: path.to_path_buf() }) } else { Ok(keys) },
        )
}

/// Fingerprints of the keys in `authorized_keys` text; the error names the 1-based line.
pub fn parse_authorized_keys(text: &str) -> Result<Vec<String>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let entry = AuthorizedKeys::new(line).next().ok_or((i + 1, "no key".to_string()))?;
        let entry = entry.map_err(|e| (i + 1, e.to_string()))?;
        out.push(fingerprint(entry.public_key()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_key_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_host_key(dir.path()).unwrap();
        let path = dir.path().join(HOST_KEY_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(std::fs::read_to_string(&path).unwrap().starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        let b = load_or_create_host_key(dir.path()).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert!(public_line(&a).starts_with("ssh-ed25519 AAAA"), "{}", public_line(&a));
        // Only the key is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from(HOST_KEY_FILE)]);
    }

    #[test]
    fn a_broken_host_key_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(HOST_KEY_FILE), "garbage").unwrap();
        let err = load_or_create_host_key(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not an unencrypted OpenSSH private key"), "{err}");
    }

    #[test]
    fn authorized_keys_lines() {
        let key = PrivateKey::new(KeypairData::from(Ed25519Keypair::from_seed(&[7; 32])), "k").unwrap();
        let line = key.public_key().to_openssh().unwrap();
        let text = format!("# comment\n\n{line}\nno-pty,command=\"x\" {line}\n");
        let fps = parse_authorized_keys(&text).unwrap();
        assert_eq!(fps, vec![fingerprint(key.public_key()); 2]);
        assert!(fps[0].starts_with("SHA256:") && !fps[0].ends_with('='), "{}", fps[0]);
        let err = parse_authorized_keys(&format!("{line}\nssh-ed25519 notbase64\n")).unwrap_err();
        assert_eq!(err.0, 2);
    }
}
