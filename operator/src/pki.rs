//! Worker certificates: each MoEDeployment has its own CA (a Secret only the operator reads)
//! and a worker TLS Secret (CA bundle, certificate, key) that every worker pod mounts. The
//! operator renews the worker certificate when two thirds of its lifetime have passed; the
//! kubelet updates the mounted files and the workers re-read them, so running connections go on
//! and new ones use the new certificate.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

/// Where the worker TLS Secret is mounted in every worker container.
pub const TLS_MOUNT: &str = "/etc/moe/tls";
/// Unix seconds after which the worker certificate is renewed.
pub const RENEW_AFTER: &str = "serving.moe.dev/renew-after";
/// Lifetime of a worker certificate.
pub const WORKER_CERT_HOURS: u32 = 30 * 24;
/// Lifetime of a deployment's CA.
pub const CA_DAYS: u32 = 10 * 365;

pub fn ca_secret_name(md: &str) -> String {
    format!("{md}-worker-ca")
}

pub fn tls_secret_name(md: &str) -> String {
    format!("{md}-worker-tls")
}

fn meta(
    name: String,
    ns: &str,
    labels: &BTreeMap<String, String>,
    owner: &OwnerReference,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(ns.to_string()),
        labels: Some(labels.clone()),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect()
}

/// The CA's certificate and key, as stored.
pub fn ca_secret(
    md: &str,
    ns: &str,
    labels: &BTreeMap<String, String>,
    owner: &OwnerReference,
    cert_pem: &str,
    key_pem: &str,
) -> Secret {
    Secret {
        metadata: meta(ca_secret_name(md), ns, labels, owner),
        type_: Some("Opaque".into()),
        data: Some(data(&[
            (moe_certs::CA_FILE, cert_pem),
            (moe_certs::CA_KEY_FILE, key_pem),
        ])),
        ..Secret::default()
    }
}

/// The Secret worker pods mount: the CA bundle and the worker certificate and key.
pub fn tls_secret(
    md: &str,
    ns: &str,
    labels: &BTreeMap<String, String>,
    owner: &OwnerReference,
    ca_pem: &str,
    (cert_pem, key_pem): (&str, &str),
    renew_after_unix: i64,
) -> Secret {
    let mut m = meta(tls_secret_name(md), ns, labels, owner);
    m.annotations = Some(BTreeMap::from([(
        RENEW_AFTER.to_string(),
        renew_after_unix.to_string(),
    )]));
    Secret {
        metadata: m,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data(&[
            (moe_certs::CA_FILE, ca_pem),
            (moe_certs::CERT_FILE, cert_pem),
            (moe_certs::KEY_FILE, key_pem),
        ])),
        ..Secret::default()
    }
}

fn text(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// The CA a stored CA Secret holds (`None`: missing or unusable, so a new one is made).
pub fn stored_ca(s: &Secret) -> Option<moe_certs::Authority> {
    let cert = text(s, moe_certs::CA_FILE)?;
    let key = text(s, moe_certs::CA_KEY_FILE)?;
    moe_certs::Authority::from_pem(&cert, &key).ok()
}

/// Whether the worker TLS Secret must be (re)issued: missing, from another CA, incomplete, or
/// past its renewal time.
pub fn tls_due(tls: Option<&Secret>, ca_pem: &str, now_unix: i64) -> bool {
    let Some(s) = tls else { return true };
    let renew_after = renews_at(s);
    text(s, moe_certs::CA_FILE).as_deref() != Some(ca_pem)
        || text(s, moe_certs::CERT_FILE).is_none()
        || text(s, moe_certs::KEY_FILE).is_none()
        || renew_after.is_none_or(|t| now_unix >= t)
}

/// When a stored worker TLS Secret is due (its annotation).
pub fn renews_at(s: &Secret) -> Option<i64> {
    s.metadata
        .annotations
        .as_ref()?
        .get(RENEW_AFTER)?
        .parse()
        .ok()
}

/// When a certificate issued now for `hours` is renewed: after two thirds of its lifetime.
pub fn renew_after(now_unix: i64, hours: u32) -> i64 {
    now_unix + i64::from(hours) * 3600 * 2 / 3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "serving.moe.dev/v1alpha1".into(),
            kind: "MoEDeployment".into(),
            name: "tiny".into(),
            uid: "u".into(),
            controller: Some(true),
            ..OwnerReference::default()
        }
    }

    #[test]
    fn the_worker_certificate_is_renewed_when_due_or_when_the_ca_changed() {
        let (ca, key) = moe_certs::Authority::generate(1).expect("ca");
        let labels = BTreeMap::new();
        let stored = ca_secret("tiny", "ns", &labels, &owner(), ca.cert_pem(), &key);
        let ca = stored_ca(&stored).expect("the stored CA reads back");
        let (cert, leaf) = ca.issue("tiny", 24).expect("issue");
        let now = 1_000_000;
        let s = tls_secret(
            "tiny",
            "ns",
            &labels,
            &owner(),
            ca.cert_pem(),
            (&cert, &leaf),
            renew_after(now, 24),
        );
        assert!(tls_due(None, ca.cert_pem(), now));
        assert!(!tls_due(Some(&s), ca.cert_pem(), now));
        assert!(!tls_due(Some(&s), ca.cert_pem(), now + 15 * 3600));
        assert!(
            tls_due(Some(&s), ca.cert_pem(), now + 16 * 3600),
            "2/3 of 24 h"
        );
        let (other, _) = moe_certs::Authority::generate(1).expect("ca");
        assert!(
            tls_due(Some(&s), other.cert_pem(), now),
            "issued by another CA"
        );
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));
    }
}
