//! TLS and QUIC transport settings for the agent tunnel.
//!
//! The coordinator runs its own CA. Agents trust the coordinator by pinning that CA, either as a PEM
//! file or as its SHA-256 fingerprint (which fits in a join command); verification is never turned off.
//! The tunnel always uses the fixed server name [`SERVER_NAME`], so the coordinator's certificate does
//! not depend on the address agents dial through NAT or a load balancer.

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// The name agents verify on the coordinator's tunnel certificate.
pub const SERVER_NAME: &str = "tether-coordinator";

/// QUIC idle timeout on the tunnel. Below the default heartbeat timeout, so a vanished peer is noticed
/// before the workspace is declared unhealthy.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Agent keep-alive: under the idle timeout so NAT bindings stay open, above the heartbeat interval
/// (at most 5 s) so a live agent's heartbeats make it unnecessary. The coordinator sends none.
pub const KEEP_ALIVE: Duration = Duration::from_secs(7);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate found in {0}")]
    NoCertificate(String),
    #[error("ca fingerprint '{0}' is not 'sha256:' followed by 64 hex digits")]
    BadFingerprint(String),
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("reading pem: {0}")]
    Pem(String),
    #[error("quic crypto config: {0}")]
    Quic(String),
}

/// The one crypto provider of the whole workspace.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How an agent recognises its coordinator.
#[derive(Debug, Clone)]
pub enum CaPin {
    /// The CA certificate itself.
    Certificate(CertificateDer<'static>),
    /// The SHA-256 of the CA certificate's DER encoding.
    Fingerprint([u8; 32]),
}

impl CaPin {
    pub fn from_pem(pem: &[u8], origin: &str) -> Result<Self, TlsError> {
        let cert = rustls_pki_types::pem::PemObject::pem_slice_iter(pem)
            .next()
            .ok_or_else(|| TlsError::NoCertificate(origin.to_string()))?
            .map_err(|e: rustls_pki_types::pem::Error| TlsError::Pem(format!("{origin}: {e}")))?;
        Ok(CaPin::Certificate(cert))
    }

    pub fn from_fingerprint(s: &str) -> Result<Self, TlsError> {
        let hexpart = s.trim().strip_prefix("sha256:").unwrap_or(s.trim());
        let bytes = hex::decode(hexpart).map_err(|_| TlsError::BadFingerprint(s.to_string()))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| TlsError::BadFingerprint(s.to_string()))?;
        Ok(CaPin::Fingerprint(arr))
    }
}

/// `sha256:<hex>` of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

/// Transport settings both ends of the tunnel use.
pub fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // IDLE_TIMEOUT is a small constant that always fits a QUIC varint.
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits a varint")));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    // Brokered SSH streams carry bulk transfers (scp, rsync). quinn's default 1.25 MB stream window
    // caps one stream at window / round trip (12.5 MB/s at 100 ms); these are credits, not buffers
    // allocated up front, so idle agents cost nothing more.
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(CONNECTION_WINDOW.into());
    t.send_window(CONNECTION_WINDOW.into());
    t
}

/// Flow-control credit per stream and per connection on the tunnel. The agent's stream window is
/// the coordinator's per-stream share of its send window ([`SERVER_STREAM_WINDOW`], see the
/// coordinator's broker): an upload whose SSH session the agent stops reading holds no more than
/// its own share of what the coordinator may have unacknowledged towards the agent, and the rest
/// stays free for the control stream.
pub const STREAM_WINDOW: u32 = SERVER_STREAM_WINDOW;
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// What the coordinator grants an agent per stream, and per connection before any brokered SSH
/// stream: what one agent can make the coordinator buffer. A brokered stream's window caps a
/// download at window / round trip between the coordinator and the agent, so it is at least the
/// window an SSH client grants its channel (OpenSSH: 2 MiB), which then sets the pace, as it does
/// through an OpenSSH jump host; 256 KiB held downloads to 5 MiB/s with the agent 50 ms away
/// (`tether-bench ssh --rtt-ms 50`).
pub const SERVER_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const SERVER_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// What a connection gets before its hello is welcomed: a hello and then some.
pub const PRE_HELLO_WINDOW: u32 = 4 * crate::limits::MAX_HELLO_FRAME as u32;

/// The agent's QUIC client configuration.
pub fn client_config(pin: CaPin) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut config = match pin {
        CaPin::Certificate(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca)?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        CaPin::Fingerprint(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCa { fingerprint: fp, provider }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![crate::proto::ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = transport();
    // The coordinator opens one bidirectional stream per brokered SSH connection.
    t.max_concurrent_bidi_streams(crate::limits::MAX_SSH_CONNECTIONS.into());
    client.transport_config(Arc::new(t));
    Ok(client)
}

/// The coordinator's QUIC server configuration. `chain` is the leaf followed by the CA, so agents that
/// pin the CA by fingerprint can find it.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    max_streams: u32,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![crate::proto::ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(config).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut t = transport();
    t.keep_alive_interval(None);
    t.max_concurrent_bidi_streams(max_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    // An idle agent needs little; these bound what one connection can make us buffer. Each brokered
    // SSH stream adds its own stream window to the connection's (see the coordinator's broker), so
    // that streams whose users stopped reading can never use up the credit the control and log
    // streams need.
    // Until its hello is welcomed, a connection gets only what the hello needs.
    t.stream_receive_window(SERVER_STREAM_WINDOW.into());
    t.receive_window(PRE_HELLO_WINDOW.into());
    t.send_window(PRE_HELLO_WINDOW.into());
    server.transport_config(Arc::new(t));
    Ok(server)
}

/// Verifies the server chain against a CA known only by fingerprint: the CA must be in the chain the
/// server sends, and the leaf must verify against it as an ordinary root.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca =
            intermediates.iter().find(|c| Sha256::digest(c.as_ref())[..] == self.fingerprint[..]).ok_or_else(|| {
                rustls::Error::General("coordinator's certificate chain does not contain the pinned CA".into())
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
