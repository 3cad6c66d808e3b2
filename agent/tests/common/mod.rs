//! What the agent's integration tests share.

use rustls::pki_types::CertificateDer;
use tether_shared::tls;

/// A CA and a coordinator certificate signed by it.
pub struct Pki {
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's PKCS#8 private key.
    pub key: Vec<u8>,
}

pub fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf =
        CertificateParams::new(vec![tls::SERVER_NAME.to_string()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    Pki { ca: ca.der().clone(), chain: vec![leaf.der().clone(), ca.der().clone()], key: leaf_key.serialize_der() }
}
