//! The coordinator's own keys: a CA made on first start, the tunnel certificate it signs, the QUIC
//! stateless-reset key, and random tokens stored only as hashes.

use rand::RngCore;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("making certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: not a valid PEM file: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{path}: the stateless reset key must be 64 bytes")]
    ResetKey { path: PathBuf },
}

pub struct Pki {
    pub ca_path: PathBuf,
    pub ca_der: CertificateDer<'static>,
    pub fingerprint: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    reset_key: [u8; 64],
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

/// Writes a file readable only by its owner, whole or not at all.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let mut f =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
    f.write_all(contents).and_then(|_| f.sync_all()).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

impl Pki {
    /// Loads the CA and tunnel certificate from `dir`, making them on first start.
    pub fn load_or_create(dir: &Path) -> Result<Pki, PkiError> {
        let ca_path = dir.join("ca.pem");
        let ca_key_path = dir.join("ca-key.pem");
        let cert_path = dir.join("tunnel.pem");
        let key_path = dir.join("tunnel-key.pem");
        let reset_path = dir.join("quic-reset.key");
        if !ca_path.exists() || !cert_path.exists() || !key_path.exists() {
            let ca_key = KeyPair::generate()?;
            let ca_params = ca_params()?;
            let ca_cert = ca_params.self_signed(&ca_key)?;
            let issuer = Issuer::from_params(&ca_params, &ca_key);

            let key = KeyPair::generate()?;
            let mut params =
                CertificateParams::new(vec![tether_shared::tls::SERVER_NAME.to_string(), "localhost".to_string()])?;
            params.distinguished_name.push(DnType::CommonName, tether_shared::tls::SERVER_NAME);
            params.not_before = rcgen::date_time_ymd(2025, 1, 1);
            params.not_after = rcgen::date_time_ymd(2045, 1, 1);
            let cert = params.signed_by(&key, &issuer)?;

            write_private(&ca_key_path, ca_key.serialize_pem().as_bytes())?;
            write_private(&key_path, key.serialize_pem().as_bytes())?;
            write_private(&cert_path, format!("{}{}", cert.pem(), ca_cert.pem()).as_bytes())?;
            write_private(&ca_path, ca_cert.pem().as_bytes())?;
            // The CA certificate is public: agents and users need it.
            fs::set_permissions(&ca_path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).map_err(io(&ca_path))?;
        }
        if !reset_path.exists() {
            let mut key = [0u8; 64];
            rand::rng().fill_bytes(&mut key);
            write_private(&reset_path, &key)?;
        }
        let pem_err = |path: &Path| {
            let path = path.to_path_buf();
            move |e: rustls_pki_types::pem::Error| PkiError::Pem { path, message: e.to_string() }
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
            .map_err(pem_err(&cert_path))?
            .collect::<Result<_, _>>()
            .map_err(pem_err(&cert_path))?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(pem_err(&key_path))?;
        let ca_der = CertificateDer::from_pem_file(&ca_path).map_err(pem_err(&ca_path))?;
        let reset = fs::read(&reset_path).map_err(io(&reset_path))?;
        let reset_key: [u8; 64] = reset.try_into().map_err(|_| PkiError::ResetKey { path: reset_path.clone() })?;
        Ok(Pki { fingerprint: tether_shared::tls::fingerprint(&ca_der), ca_path, ca_der, chain, key, reset_key })
    }

    pub fn server_config(&self, max_streams: u32) -> Result<quinn::ServerConfig, tether_shared::tls::TlsError> {
        tether_shared::tls::server_config(self.chain.clone(), self.key.clone_key(), max_streams)
    }

    /// Endpoint settings whose stateless-reset key survives restarts, so agents of a restarted
    /// coordinator learn at their next packet that their old connection is gone.
    pub fn endpoint_config(&self) -> quinn::EndpointConfig {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.reset_key);
        let mut config = quinn::EndpointConfig::new(Arc::new(key));
        // Connection IDs must be recognisable by the next process too, or it drops the old
        // connections' packets as invalid instead of answering them with a stateless reset.
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&self.reset_key[56..64]);
        let cid_key = u64::from_le_bytes(cid_key);
        config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
        // A reset is smaller than the packet that triggers it, so answering every one amplifies
        // nothing; rate-limiting them would leave thousands of agents waiting for an idle timeout.
        config.min_reset_interval(std::time::Duration::ZERO);
        config
    }

    pub fn ca_pem(&self) -> Result<String, PkiError> {
        fs::read_to_string(&self.ca_path).map_err(io(&self.ca_path))
    }

    /// A fresh HTTPS certificate for `names` (DNS names or IP addresses), signed by the CA: the
    /// chain (leaf, then CA) and the leaf's key. Made at each start, so it always names the
    /// addresses in the current configuration; clients trust the CA, not the leaf.
    pub fn https_certificate(
        &self,
        names: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
        let ca_key_path = self.ca_path.with_file_name("ca-key.pem");
        let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem)?;
        // The issuer needs only the CA's name and key identifier method, which `ca_params` made.
        let issuer = Issuer::new(ca_params()?, ca_key);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name.push(DnType::CommonName, names.first().map_or("localhost", String::as_str));
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2045, 1, 1);
        let cert = params.signed_by(&key, &issuer)?;
        let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok((vec![cert.der().clone(), self.ca_der.clone()], key))
    }
}

/// The CA's own settings. Also what issues certificates later: the issuer's name and key identifier
/// in a leaf must match the CA certificate made from these.
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "Tether coordinator CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    ca_params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    Ok(ca_params)
}

/// A fresh secret token: a prefix saying what it is for, then 256 random bits.
pub fn new_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}_{}", hex::encode(bytes))
}

/// Tokens are stored only as this hash. They carry 256 random bits, so a fast hash is enough.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_and_reloads_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let a = Pki::load_or_create(dir.path()).unwrap();
        let b = Pki::load_or_create(dir.path()).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.reset_key, b.reset_key);
        assert_eq!(a.chain.len(), 2);
        let mode = fs::metadata(dir.path().join("ca-key.pem")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    }

    #[test]
    fn https_certificate_verifies_against_the_ca_for_its_names() {
        use rustls::client::danger::ServerCertVerifier;
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(dir.path()).unwrap();
        let names = ["localhost".to_string(), "127.0.0.1".to_string(), "tether.example.com".to_string()];
        let (chain, _key) = pki.https_certificate(&names).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            tether_shared::tls::provider(),
        )
        .build()
        .unwrap();
        let now = rustls_pki_types::UnixTime::now();
        for name in ["localhost", "127.0.0.1", "tether.example.com"] {
            let name = rustls_pki_types::ServerName::try_from(name).unwrap();
            verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], now).unwrap();
        }
        let other = rustls_pki_types::ServerName::try_from("other.example.com").unwrap();
        assert!(verifier.verify_server_cert(&chain[0], &chain[1..], &other, &[], now).is_err());
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let t = new_token("tether_agent");
        assert!(t.starts_with("tether_agent_") && t.len() == "tether_agent_".len() + 64);
        assert_ne!(t, new_token("tether_agent"));
        assert_eq!(hash_token(&t), hash_token(&t));
        assert_ne!(hash_token(&t), t);
    }
}
