//! The worker PKI of a deployment: its own CA, and the certificates every gateway, stage and
//! expert shard presents to the others (mutual TLS). The operator keeps one CA per
//! MoEDeployment; `moe-worker local` and `moe-worker certs` make theirs with the same code.
//!
//! Workers dial each other by pod address, so a certificate is not tied to an address: every
//! worker certificate carries the fixed name [`SERVER_NAME`], and what makes a peer trusted is
//! that the deployment's CA key signed its certificate.

/// Files of a worker's TLS folder (a Kubernetes TLS Secret's keys plus its CA).
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
/// The CA's private key: only issuers hold it, never a worker.
pub const CA_KEY_FILE: &str = "ca.key";

/// The name every worker certificate carries and every worker checks.
pub const SERVER_NAME: &str = "moe-worker";

/// Subject of every worker CA: deployments differ by key, and a certificate is trusted only
/// when the key of a CA in the bundle signed it.
const CA_NAME: &str = "moe-serve worker CA";

#[derive(Debug, thiserror::Error)]
#[error("certificate: {0}")]
pub struct Error(String);

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Self(e.to_string())
    }
}

/// A CA that issues worker certificates.
pub struct Authority {
    cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authority")
    }
}

fn ca_params(days: u32) -> Result<rcgen::CertificateParams, Error> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CA_NAME);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(i64::from(days));
    Ok(params)
}

impl Authority {
    /// A new CA valid for `days`, and its private key as PEM (to store it).
    pub fn generate(days: u32) -> Result<(Self, String), Error> {
        let key = rcgen::KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let params = ca_params(days)?;
        let cert = params.self_signed(&key)?;
        Ok((
            Self {
                cert_pem: cert.pem(),
                issuer: rcgen::Issuer::new(params, key),
            },
            key_pem,
        ))
    }

    /// A CA stored as its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = rcgen::KeyPair::from_pem(key_pem)?;
        if !cert_pem.contains("BEGIN CERTIFICATE") {
            return Err(Error("the CA certificate is not PEM".into()));
        }
        // What a certificate names of its issuer (subject, key identifier from the key) is
        // all an issuer needs: the same parameters and key issue what the CA would.
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            issuer: rcgen::Issuer::new(ca_params(1)?, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A worker certificate and its key (PEM) named `name`, valid for `hours`, for both client
    /// and server use.
    pub fn issue(&self, name: &str, hours: u32) -> Result<(String, String), Error> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::hours(i64::from(hours));
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_ca_issues_like_the_one_that_made_it() {
        let (ca, key) = Authority::generate(1).expect("ca");
        let again = Authority::from_pem(ca.cert_pem(), &key).expect("read back");
        let (cert, leaf_key) = again.issue("w", 1).expect("issue");
        assert!(cert.contains("BEGIN CERTIFICATE") && leaf_key.contains("PRIVATE KEY"));
        assert!(Authority::from_pem("junk", &key).is_err());
        assert!(Authority::from_pem(ca.cert_pem(), "junk").is_err());
    }
}
