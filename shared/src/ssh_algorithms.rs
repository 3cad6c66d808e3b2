//! The SSH algorithms Tether's two SSH servers (the coordinator's front door and the agent) offer.

use russh::{cipher, kex, Preferred};
use std::borrow::Cow;

/// Ciphers, best first: AES-GCM first, the fastest in russh (1.4 to 1.7 times chacha20-poly1305,
/// measured) and hardware-accelerated almost everywhere (AES-NI, through ring); chacha20 and CTR
/// stay for clients without GCM. OpenSSH's client picks the first of *its* own list that the server
/// offers, so `tether config-ssh` also puts AES-GCM first on the client side.
pub const CIPHERS: &[cipher::Name] =
    &[cipher::AES_128_GCM, cipher::AES_256_GCM, cipher::CHACHA20_POLY1305, cipher::AES_128_CTR, cipher::AES_256_CTR];

/// Key exchanges, best first. russh's default list also offers finite-field Diffie-Hellman up to
/// 8192 bits (groups 15 to 18 and group exchange), which it computes inline in the connection's
/// task: about 0.1 s of CPU per key exchange for group 16 and over 1 s for group 18, asked for by
/// any client before it logs in, and again at every rekey. Curve25519 (with or without ML-KEM) is
/// what OpenSSH, PuTTY and the SSH libraries of editors pick; the NIST curves serve FIPS-mode
/// clients at about a millisecond; group 14 stays for old clients.
pub const KEX: &[kex::Name] = &[
    kex::MLKEM768X25519_SHA256,
    kex::CURVE25519,
    kex::CURVE25519_PRE_RFC_8731,
    kex::ECDH_SHA2_NISTP256,
    kex::ECDH_SHA2_NISTP384,
    kex::DH_G14_SHA256,
    kex::EXTENSION_SUPPORT_AS_CLIENT,
    kex::EXTENSION_SUPPORT_AS_SERVER,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
];

/// Algorithm preferences for both servers.
pub fn preferred() -> Preferred {
    Preferred { kex: Cow::Borrowed(KEX), cipher: Cow::Borrowed(CIPHERS), ..Preferred::DEFAULT }
}
