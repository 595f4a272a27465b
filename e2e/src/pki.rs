//! The cluster's certificates and keys: a CA, the API server's serving certificate, an admin
//! client certificate (group `system:masters`) and the service-account signing key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Paths of the PEM files written by [`write`].
#[derive(Debug, Clone)]
pub(crate) struct PkiFiles {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub service_account_key: PathBuf,
    pub service_account_pub: PathBuf,
}

/// Writes a fresh CA and the certificates signed by it into `dir`. The serving certificate is
/// valid for `server_ips` and the in-cluster names of the `kubernetes` Service.
pub(crate) fn write(dir: &Path, server_ips: &[IpAddr]) -> Result<PkiFiles> {
    std::fs::create_dir_all(dir)?;
    let files = PkiFiles {
        ca_cert: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("apiserver.crt"),
        server_key: dir.join("apiserver.key"),
        admin_cert: dir.join("admin.crt"),
        admin_key: dir.join("admin.key"),
        service_account_key: dir.join("sa.key"),
        service_account_pub: dir.join("sa.pub"),
    };

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "moe-e2e-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    std::fs::write(&files.ca_cert, ca_cert.pem())?;
    std::fs::write(&files.ca_key, ca_key.serialize_pem())?;
    let issuer = Issuer::new(ca, ca_key);

    let mut names: Vec<String> = server_ips.iter().map(IpAddr::to_string).collect();
    names.extend(
        [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ]
        .map(String::from),
    );
    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(names)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    server.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer)?;
    std::fs::write(&files.server_cert, server_cert.pem())?;
    std::fs::write(&files.server_key, server_key.serialize_pem())?;

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin
        .distinguished_name
        .push(DnType::CommonName, "moe-e2e-admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &issuer)?;
    std::fs::write(&files.admin_cert, admin_cert.pem())?;
    std::fs::write(&files.admin_key, admin_key.serialize_pem())?;

    // ECDSA P-256: kube-apiserver signs service-account tokens with it as ES256.
    let sa_key = KeyPair::generate()?;
    std::fs::write(&files.service_account_key, sa_key.serialize_pem())
        .context("writing the service-account key")?;
    std::fs::write(&files.service_account_pub, sa_key.public_key_pem())?;
    Ok(files)
}
