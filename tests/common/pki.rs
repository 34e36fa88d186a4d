//! A throwaway certificate authority for TLS tests.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA, a `localhost` server certificate and a `control-plane` client
/// one, as PEM (certificate, key).
pub struct Pki {
    pub ca_pem: String,
    pub server: (String, String),
    pub client: (String, String),
}

/// A certificate for `names`, signed by `ca`.
pub fn leaf(names: &[&str], ca: &CertifiedIssuer<'_, KeyPair>) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A new CA.
pub fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A new CA with a server and a client certificate.
pub fn pki() -> Pki {
    let ca = ca();
    Pki {
        ca_pem: ca.pem(),
        server: leaf(&["localhost"], &ca),
        client: leaf(&["control-plane"], &ca),
    }
}
