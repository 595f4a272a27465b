//! Worker certificates: each MoEDeployment has its own CA (a Secret only the operator reads)
//! and a worker TLS Secret (CA bundle, certificate, key) that every worker pod mounts. The
//! operator renews the worker certificate when two thirds of its lifetime have passed; the
//! kubelet updates the mounted files and the workers re-read them, so running connections go on
//! and new ones use the new certificate.
//!
//! The CA itself is rotated when two thirds of its lifetime have passed, in the three steps of
//! [`moe_certs::CaSet`] (introduce, promote, retire), [`CA_SETTLE_SECS`] apart so that each
//! step has reached every pod's mounted Secret before the next: no two workers ever hold
//! certificates the other does not trust.

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
/// Lifetime of a deployment's CA; it is rotated after two thirds of it.
pub const CA_DAYS: u32 = 365;
/// Unix seconds after which the CA's rotation starts.
pub const CA_ROTATE_AFTER: &str = "serving.moe.dev/ca-rotate-after";
/// Unix seconds of the last rotation step.
pub const CA_STEP_AT: &str = "serving.moe.dev/ca-step-at";
/// Time between rotation steps: more than the kubelet needs to update a mounted Secret (its
/// sync period plus its cache's delay, about a minute or two by default) and the workers to
/// re-read it (a second).
pub const CA_SETTLE_SECS: i64 = 600;

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

/// Where a deployment's CA rotation stands: the CA set and its two times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaState {
    pub set: moe_certs::CaSet,
    /// When the next rotation starts (unix seconds).
    pub rotate_after: i64,
    /// When the last rotation step was taken (unix seconds; 0: none).
    pub step_at: i64,
}

impl CaState {
    /// A new CA made at `now`.
    pub fn generate(now_unix: i64) -> Result<Self, moe_certs::Error> {
        Ok(Self {
            set: moe_certs::CaSet::generate(CA_DAYS)?,
            rotate_after: ca_rotate_after(now_unix),
            step_at: 0,
        })
    }

    /// When the next rotation step is due.
    pub fn next_step_at(&self) -> i64 {
        if self.set.rotating() {
            self.step_at.saturating_add(CA_SETTLE_SECS)
        } else {
            self.rotate_after
        }
    }

    /// Takes the rotation step due at `now`, if any.
    pub fn advance(&mut self, now_unix: i64) -> Result<Option<moe_certs::Step>, moe_certs::Error> {
        if now_unix < self.next_step_at() {
            return Ok(None);
        }
        let step = self.set.step(CA_DAYS)?;
        self.step_at = now_unix;
        if step == moe_certs::Step::Promoted {
            self.rotate_after = ca_rotate_after(now_unix);
        }
        Ok(Some(step))
    }
}

/// When a CA made at `now` starts its rotation: after two thirds of its lifetime.
pub fn ca_rotate_after(now_unix: i64) -> i64 {
    now_unix + i64::from(CA_DAYS) * 86_400 * 2 / 3
}

/// The CA Secret: the CA set's files, and the rotation's times as annotations.
pub fn ca_secret(
    md: &str,
    ns: &str,
    labels: &BTreeMap<String, String>,
    owner: &OwnerReference,
    state: &CaState,
) -> Secret {
    let mut m = meta(ca_secret_name(md), ns, labels, owner);
    m.annotations = Some(BTreeMap::from([
        (CA_ROTATE_AFTER.to_string(), state.rotate_after.to_string()),
        (CA_STEP_AT.to_string(), state.step_at.to_string()),
    ]));
    let files = state.set.files();
    let pairs: Vec<(&str, &str)> = files
        .iter()
        .filter_map(|(name, text)| text.as_deref().map(|t| (*name, t)))
        .collect();
    Secret {
        metadata: m,
        type_: Some("Opaque".into()),
        data: Some(data(&pairs)),
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

/// The CA state a stored CA Secret holds (`None`: missing or unusable, so a new CA is made). A
/// Secret from before rotations (no annotations) starts its rotation clock at `now`.
pub fn stored_ca(s: &Secret, now_unix: i64) -> Option<CaState> {
    let set = moe_certs::CaSet::from_files(|f| text(s, f))?;
    let annotation =
        |key: &str| -> Option<i64> { s.metadata.annotations.as_ref()?.get(key)?.parse().ok() };
    Some(CaState {
        set,
        rotate_after: annotation(CA_ROTATE_AFTER).unwrap_or_else(|| ca_rotate_after(now_unix)),
        step_at: annotation(CA_STEP_AT).unwrap_or(0),
    })
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
        let now = 1_000_000;
        let labels = BTreeMap::new();
        let state = CaState::generate(now).expect("ca");
        let stored = ca_secret("tiny", "ns", &labels, &owner(), &state);
        let back = stored_ca(&stored, now + 5).expect("the stored CA reads back");
        assert_eq!(back, state);
        let ca = back.set.authority().expect("authority");
        let bundle = back.set.bundle();
        let (cert, leaf) = ca.issue("tiny", 24).expect("issue");
        let s = tls_secret(
            "tiny",
            "ns",
            &labels,
            &owner(),
            &bundle,
            (&cert, &leaf),
            renew_after(now, 24),
        );
        assert!(tls_due(None, &bundle, now));
        assert!(!tls_due(Some(&s), &bundle, now));
        assert!(!tls_due(Some(&s), &bundle, now + 15 * 3600));
        assert!(tls_due(Some(&s), &bundle, now + 16 * 3600), "2/3 of 24 h");
        let other = CaState::generate(now).expect("ca");
        assert!(
            tls_due(Some(&s), &other.set.bundle(), now),
            "issued by another CA"
        );
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));
    }

    #[test]
    fn the_ca_rotates_in_settled_steps_after_two_thirds_of_its_life() {
        use moe_certs::Step;
        let start = 1_000_000;
        let mut state = CaState::generate(start).expect("ca");
        let first = state.set.signing_cert.clone();
        let day = 86_400;
        // Checked every 5 minutes (the operator's resync) over 450 days: one rotation.
        let mut steps = Vec::new();
        let mut bundles = vec![(start, state.set.bundle())];
        let mut t = start;
        while t < start + 450 * day {
            if let Some(step) = state.advance(t).expect("step") {
                steps.push((step, t));
                bundles.push((t, state.set.bundle()));
                // Every state survives a round trip through its Secret.
                let s = ca_secret("tiny", "ns", &BTreeMap::new(), &owner(), &state);
                assert_eq!(stored_ca(&s, t).expect("reads"), state);
            }
            t += 300;
        }
        let kinds: Vec<Step> = steps.iter().map(|s| s.0).collect();
        assert_eq!(kinds, [Step::Introduced, Step::Promoted, Step::Retired]);
        let introduced = steps[0].1;
        assert!(introduced >= start + 243 * day && introduced < start + 244 * day);
        assert!(steps[1].1 - steps[0].1 >= CA_SETTLE_SECS);
        assert!(steps[2].1 - steps[1].1 >= CA_SETTLE_SECS);
        // Whatever a worker still holds from the previous step, every bundle from the next
        // step trusts it: the signing CA of each state is in the bundle of the one after.
        for pair in bundles.windows(2) {
            let signing_before = pair[0]
                .1
                .split_inclusive("-----END CERTIFICATE-----")
                .next();
            let after = &pair[1].1;
            let signing_after = after.split_inclusive("-----END CERTIFICATE-----").next();
            assert!(after.contains(signing_before.expect("pem").trim()));
            assert!(pair[0].1.contains(signing_after.expect("pem").trim()));
        }
        assert_ne!(state.set.signing_cert, first);
        // The next rotation is two thirds of a CA lifetime after the promotion.
        assert_eq!(state.next_step_at(), ca_rotate_after(steps[1].1));
        // A CA Secret from before rotations reads as a steady set whose clock starts now.
        let mut legacy = ca_secret("tiny", "ns", &BTreeMap::new(), &owner(), &state);
        legacy.metadata.annotations = None;
        let read = stored_ca(&legacy, t).expect("legacy");
        assert_eq!(read.rotate_after, ca_rotate_after(t));
    }
}
