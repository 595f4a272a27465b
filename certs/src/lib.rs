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

/// Files (or Secret keys) of a CA set besides [`CA_FILE`] (the trust bundle) and
/// [`CA_KEY_FILE`] (the signing key): present only while a rotation is under way.
pub const CA_SIGNING_FILE: &str = "ca-signing.crt";
pub const CA_NEXT_FILE: &str = "ca-next.crt";
pub const CA_NEXT_KEY_FILE: &str = "ca-next.key";
pub const CA_PREVIOUS_FILE: &str = "ca-previous.crt";

/// A deployment's CAs over a rotation. Steady state: one CA that signs and is trusted. A
/// rotation moves through three steps, each of which must reach every worker before the next
/// (the issuer waits for that), so that no two workers ever hold certificates the other does
/// not trust:
/// 1. **introduce**: a next CA joins the trust bundle; certificates are still signed by the
///    current one;
/// 2. **promote**: the next CA signs (workers get new certificates); the old one stays trusted
///    as the previous CA, for the certificates it signed that are still in use;
/// 3. **retire**: the previous CA leaves the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSet {
    pub signing_cert: String,
    pub signing_key: String,
    /// Introduced, not yet signing: (certificate, key).
    pub next: Option<(String, String)>,
    /// Promoted away from, still trusted.
    pub previous: Option<String>,
}

/// What [`CaSet::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Introduced,
    Promoted,
    Retired,
}

impl CaSet {
    /// A set of one new CA valid for `days`.
    pub fn generate(days: u32) -> Result<Self, Error> {
        let (ca, key) = Authority::generate(days)?;
        Ok(Self {
            signing_cert: ca.cert_pem,
            signing_key: key,
            next: None,
            previous: None,
        })
    }

    /// The set stored as files or Secret keys (`get` reads one); `None` when the signing CA
    /// is missing or unusable. A store written before rotations existed (only `ca.crt` and
    /// `ca.key`) reads as a steady set.
    pub fn from_files(get: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let key = get(CA_KEY_FILE)?;
        let cert = get(CA_SIGNING_FILE).or_else(|| get(CA_FILE))?;
        Authority::from_pem(&cert, &key).ok()?;
        let next = match (get(CA_NEXT_FILE), get(CA_NEXT_KEY_FILE)) {
            (Some(c), Some(k)) if Authority::from_pem(&c, &k).is_ok() => Some((c, k)),
            _ => None,
        };
        Some(Self {
            signing_cert: cert,
            signing_key: key,
            next,
            previous: get(CA_PREVIOUS_FILE).filter(|c| c.contains("BEGIN CERTIFICATE")),
        })
    }

    /// Every file of the set with its content, or `None` for one that must not exist.
    pub fn files(&self) -> Vec<(&'static str, Option<String>)> {
        let rotating = self.next.is_some() || self.previous.is_some();
        vec![
            (CA_FILE, Some(self.bundle())),
            (CA_KEY_FILE, Some(self.signing_key.clone())),
            (CA_SIGNING_FILE, rotating.then(|| self.signing_cert.clone())),
            (CA_NEXT_FILE, self.next.as_ref().map(|n| n.0.clone())),
            (CA_NEXT_KEY_FILE, self.next.as_ref().map(|n| n.1.clone())),
            (CA_PREVIOUS_FILE, self.previous.clone()),
        ]
    }

    /// What workers trust: the signing CA, then the next or the previous one.
    pub fn bundle(&self) -> String {
        let mut b = self.signing_cert.clone();
        for c in self.next.iter().map(|n| &n.0).chain(self.previous.iter()) {
            if !b.ends_with('\n') {
                b.push('\n');
            }
            b.push_str(c);
        }
        b
    }

    /// Whether a rotation is under way (the next step is due once the last one has reached
    /// every worker).
    pub fn rotating(&self) -> bool {
        self.next.is_some() || self.previous.is_some()
    }

    /// The CA that signs worker certificates now.
    pub fn authority(&self) -> Result<Authority, Error> {
        Authority::from_pem(&self.signing_cert, &self.signing_key)
    }

    /// The next step of a rotation (a new CA, if one starts, is valid for `days`).
    pub fn step(&mut self, days: u32) -> Result<Step, Error> {
        if let Some((cert, key)) = self.next.take() {
            self.previous = Some(std::mem::replace(&mut self.signing_cert, cert));
            self.signing_key = key;
            return Ok(Step::Promoted);
        }
        if self.previous.take().is_some() {
            return Ok(Step::Retired);
        }
        let (ca, key) = Authority::generate(days)?;
        self.next = Some((ca.cert_pem, key));
        Ok(Step::Introduced)
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

    #[test]
    fn a_rotation_introduces_promotes_and_retires() {
        let mut set = CaSet::generate(1).expect("ca");
        let first = set.signing_cert.clone();
        let read = |set: &CaSet| {
            let files: std::collections::HashMap<_, _> = set.files().into_iter().collect();
            CaSet::from_files(|f| files.get(f).cloned().flatten()).expect("reads back")
        };
        assert_eq!(read(&set), set);
        assert!(!set.rotating());
        assert_eq!(set.step(1).expect("step"), Step::Introduced);
        let second = set.next.clone().expect("next").0;
        // Both trusted, the first still signing.
        assert_eq!(set.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        assert!(set.bundle().starts_with(&first) && set.bundle().contains(&second));
        assert_eq!(read(&set), set);
        assert_eq!(set.step(1).expect("step"), Step::Promoted);
        assert_eq!(set.signing_cert, second);
        assert_eq!(set.previous.as_deref(), Some(first.as_str()));
        assert_eq!(set.bundle().matches("BEGIN CERTIFICATE").count(), 2);
        assert_eq!(read(&set), set);
        assert_eq!(set.step(1).expect("step"), Step::Retired);
        assert_eq!(set.bundle(), second);
        assert!(!set.rotating());
        assert_eq!(read(&set), set);
        // A store from before rotations: ca.crt and ca.key only.
        let old = CaSet::from_files(|f| match f {
            CA_FILE => Some(set.signing_cert.clone()),
            CA_KEY_FILE => Some(set.signing_key.clone()),
            _ => None,
        })
        .expect("old layout");
        assert_eq!(old, set);
        assert!(CaSet::from_files(|_| None).is_none());
    }
}
