//! A client of the OCI distribution API: push an image (blobs, then the manifest by tag) and
//! pull manifests and blobs by tag or digest, over TLS with the system's roots plus any CA
//! given, with Basic or Bearer-token authentication as the registry asks (`WWW-Authenticate`).

use std::sync::{Arc, Mutex};

use base64::Engine;
use reqwest::{Method, StatusCode, header};

use crate::image::MANIFEST_TYPE;
use crate::{Error, Image, Result, digest};

/// `registry[:port]/repository[:tag][@sha256:...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::Invalid(format!("image reference `{s}`: {why}"));
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) if d.starts_with("sha256:") && d.len() == 71 => (r, Some(d.to_string())),
            Some(_) => return Err(bad("the digest must be sha256:<64 hex digits>")),
            None => (s, None),
        };
        let (registry, path) = rest
            .split_once('/')
            .filter(|(r, _)| r.contains('.') || r.contains(':') || *r == "localhost")
            .ok_or_else(|| bad("name the registry host first (registry.example.com/repo)"))?;
        // A tag follows the last `:` after the last `/`.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag.to_string())),
            _ => (path, None),
        };
        let valid = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.chars().all(|ch| {
                        ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch)
                    })
            });
        if !valid {
            return Err(bad(
                "the repository is lowercase letters, digits, '.', '_', '-' and '/'",
            ));
        }
        if tag.as_deref().is_some_and(|t| {
            t.is_empty()
                || t.len() > 128
                || !t
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        }) {
            return Err(bad("a tag is up to 128 letters, digits, '.', '_' and '-'"));
        }
        Ok(Self {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag,
            digest,
        })
    }

    /// What the manifest is fetched by: the digest if there is one, else the tag (`latest`).
    pub fn target(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Credentials for one registry.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    /// From a Docker config (`~/.docker/config.json`, or a `kubernetes.io/dockerconfigjson`
    /// Secret's `.dockerconfigjson`): the `auths` entry of `registry`.
    pub fn from_docker_config(json: &[u8], registry: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(json).ok()?;
        let auths = v.get("auths")?.as_object()?;
        let entry = auths.iter().find_map(|(k, e)| {
            let host = k
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or("");
            (host == registry).then_some(e)
        })?;
        if let (Some(u), Some(p)) = (entry["username"].as_str(), entry["password"].as_str()) {
            return Some(Self {
                username: u.into(),
                password: p.into(),
            });
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(entry.get("auth")?.as_str()?)
            .ok()?;
        let (u, p) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        Some(Self {
            username: u.into(),
            password: p.into(),
        })
    }

    fn basic(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// One registry, spoken to over HTTPS.
#[derive(Debug, Clone)]
pub struct Registry {
    host: String,
    http: reqwest::Client,
    credentials: Option<Credentials>,
    /// The `Authorization` value that last worked.
    auth: Arc<Mutex<Option<String>>>,
}

/// What went wrong talking to a registry, with the HTTP status when there was one.
fn http_err(what: &str, status: Option<StatusCode>, body: &str) -> Error {
    let body: String = body.chars().take(300).collect();
    match status {
        Some(StatusCode::UNAUTHORIZED) | Some(StatusCode::FORBIDDEN) => Error::Invalid(format!(
            "{what}: {} (credentials missing or refused): {body}",
            status.map(|s| s.to_string()).unwrap_or_default()
        )),
        Some(s) => Error::Invalid(format!("{what}: {s}: {body}")),
        None => Error::Invalid(format!("{what}: {body}")),
    }
}

/// `key="value"` pairs of a `WWW-Authenticate` challenge.
fn challenge_params(h: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = h;
    while let Some((k, v)) = rest.split_once('=') {
        let key = k.trim().trim_start_matches(',').trim().to_string();
        let v = v.trim_start();
        let (value, tail) = if let Some(q) = v.strip_prefix('"') {
            match q.split_once('"') {
                Some((val, t)) => (val.to_string(), t),
                None => (q.to_string(), ""),
            }
        } else {
            match v.split_once(',') {
                Some((val, t)) => (val.trim().to_string(), t),
                None => (v.trim().to_string(), ""),
            }
        };
        out.push((key, value));
        rest = tail.trim_start_matches(',');
    }
    out
}

impl Registry {
    /// A client of `host` (`registry.example.com` or `host:port`), trusting the system's roots
    /// and the PEM certificates in `extra_ca` (a private registry's CA).
    pub fn new(
        host: &str,
        extra_ca: Option<&[u8]>,
        credentials: Option<Credentials>,
    ) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
        if let Some(pem) = extra_ca {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            for c in CertificateDer::pem_slice_iter(pem) {
                let c = c.map_err(|e| Error::Invalid(format!("registry CA: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| Error::Invalid(format!("registry CA: {e}")))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Invalid(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(600))
            .build()
            .map_err(|e| Error::Invalid(format!("HTTP client: {e}")))?;
        Ok(Self {
            host: host.to_string(),
            http,
            credentials,
            auth: Arc::default(),
        })
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("https://") || path.starts_with("http://") {
            path.to_string()
        } else {
            format!("https://{}{path}", self.host)
        }
    }

    /// Sends a request, answering one authentication challenge (Basic, or a Bearer token
    /// fetched from the realm with the credentials) and retrying once.
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(header::HeaderName, String)],
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response> {
        let url = self.url(path);
        for attempt in 0..2 {
            let mut req = self.http.request(method.clone(), &url);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            if let Some(a) = self.auth.lock().ok().and_then(|a| a.clone()) {
                req = req.header(header::AUTHORIZATION, a);
            }
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            let resp = req
                .send()
                .await
                .map_err(|e| http_err(&format!("{method} {url}"), None, &e.to_string()))?;
            if resp.status() != StatusCode::UNAUTHORIZED || attempt == 1 {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let auth = self.answer(&challenge).await?;
            if let Ok(mut a) = self.auth.lock() {
                *a = Some(auth);
            }
        }
        Err(http_err(
            &format!("{method} {url}"),
            Some(StatusCode::UNAUTHORIZED),
            "",
        ))
    }

    async fn answer(&self, challenge: &str) -> Result<String> {
        let creds = self.credentials.as_ref();
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return creds.map(Credentials::basic).ok_or_else(|| {
                http_err(
                    &self.host,
                    Some(StatusCode::UNAUTHORIZED),
                    "the registry asks for credentials and none were given",
                )
            });
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(http_err(
                &self.host,
                Some(StatusCode::UNAUTHORIZED),
                &format!("unknown challenge `{challenge}`"),
            ));
        }
        let params = challenge_params(params);
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let realm = get("realm").ok_or_else(|| {
            Error::Invalid(format!("{}: bearer challenge without realm", self.host))
        })?;
        let mut req = self.http.get(&realm);
        let query: Vec<(&str, String)> = [("service", get("service")), ("scope", get("scope"))]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        req = req.query(&query);
        if let Some(c) = creds {
            req = req.header(header::AUTHORIZATION, c.basic());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| http_err(&realm, None, &e.to_string()))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(http_err(
                &format!("token from {realm}"),
                Some(status),
                &body,
            ));
        }
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let token = v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .ok_or_else(|| Error::Invalid(format!("{realm}: no token in the answer")))?;
        Ok(format!("Bearer {token}"))
    }

    async fn expect(
        resp: reqwest::Response,
        what: &str,
        ok: &[StatusCode],
    ) -> Result<reqwest::Response> {
        if ok.contains(&resp.status()) {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        Err(http_err(what, Some(status), &body))
    }

    /// The status of `GET /v2/` without credentials (200 open, 401 a registry that wants them).
    pub async fn ping(&self) -> Result<StatusCode> {
        let url = self.url("/v2/");
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| http_err(&format!("GET {url}"), None, &e.to_string()))?;
        Ok(resp.status())
    }

    /// Uploads one blob unless the registry has it.
    pub async fn push_blob(&self, repo: &str, digest: &str, bytes: &[u8]) -> Result<()> {
        let head = self
            .send(
                Method::HEAD,
                &format!("/v2/{repo}/blobs/{digest}"),
                &[],
                None,
            )
            .await?;
        if head.status() == StatusCode::OK {
            return Ok(());
        }
        let what = format!("uploading {digest} to {}/{repo}", self.host);
        let start = self
            .send(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/"),
                &[],
                None,
            )
            .await?;
        let start = Self::expect(start, &what, &[StatusCode::ACCEPTED]).await?;
        let location = start
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::Invalid(format!("{what}: no upload location")))?
            .to_string();
        let location = if location.starts_with('/') || location.starts_with("http") {
            location
        } else {
            format!("/{location}")
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = self
            .send(
                Method::PUT,
                &format!("{location}{sep}digest={digest}"),
                &[(header::CONTENT_TYPE, "application/octet-stream".into())],
                Some(bytes.to_vec()),
            )
            .await?;
        Self::expect(put, &what, &[StatusCode::CREATED]).await?;
        Ok(())
    }

    /// Pushes `image` (blobs, then the manifest) and tags it `tag`; returns the manifest digest.
    pub async fn push(&self, repo: &str, image: &Image, tag: &str) -> Result<String> {
        for (d, bytes) in image.blobs() {
            self.push_blob(repo, d, bytes).await?;
        }
        let what = format!("pushing the manifest of {}/{repo}:{tag}", self.host);
        let put = self
            .send(
                Method::PUT,
                &format!("/v2/{repo}/manifests/{tag}"),
                &[(header::CONTENT_TYPE, MANIFEST_TYPE.into())],
                Some(image.manifest.clone()),
            )
            .await?;
        Self::expect(put, &what, &[StatusCode::CREATED]).await?;
        Ok(image.digest.clone())
    }

    /// The manifest `reference` names (tag or digest) and its digest, checked when asked by digest.
    pub async fn manifest(&self, repo: &str, reference: &str) -> Result<(Vec<u8>, String)> {
        let sep = if reference.starts_with("sha256:") {
            '@'
        } else {
            ':'
        };
        let what = format!("manifest {}/{repo}{sep}{reference}", self.host);
        let accept = [(header::ACCEPT, MANIFEST_TYPE.to_string())];
        let path = format!("/v2/{repo}/manifests/{reference}");
        let bytes = self.get_checked(&what, &path, &accept, reference).await?;
        let got = digest(&bytes);
        Ok((bytes, got))
    }

    /// A blob, checked against its digest.
    pub async fn blob(&self, repo: &str, d: &str) -> Result<Vec<u8>> {
        let what = format!("blob {}/{repo}@{d}", self.host);
        self.get_checked(&what, &format!("/v2/{repo}/blobs/{d}"), &[], d)
            .await
    }

    /// GETs `path`; when `expected` is a digest, the content must have it.
    async fn get_checked(
        &self,
        what: &str,
        path: &str,
        headers: &[(header::HeaderName, String)],
        expected: &str,
    ) -> Result<Vec<u8>> {
        let resp = self.send(Method::GET, path, headers, None).await?;
        let resp = Self::expect(resp, what, &[StatusCode::OK]).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| http_err(what, None, &e.to_string()))?
            .to_vec();
        let got = digest(&bytes);
        if expected.starts_with("sha256:") && got != expected {
            return Err(Error::Invalid(format!("{what}: content has digest {got}")));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_with_ports_paths_tags_and_digests() {
        let d = format!("sha256:{}", "a".repeat(64));
        let r =
            Reference::parse(&format!("localhost:5000/ml/moe-worker:0.1.0@{d}")).expect("parse");
        assert_eq!(r.registry, "localhost:5000");
        assert_eq!(r.repository, "ml/moe-worker");
        assert_eq!(r.tag.as_deref(), Some("0.1.0"));
        assert_eq!(r.target(), d);
        assert_eq!(
            r.to_string(),
            format!("localhost:5000/ml/moe-worker:0.1.0@{d}")
        );
        let r = Reference::parse("ghcr.io/moe-serve/moe-worker").expect("parse");
        assert_eq!((r.tag.as_deref(), r.target()), (None, "latest"));
        for bad in [
            "moe-worker:1",
            "ghcr.io/Moe/x",
            "ghcr.io/x@sha256:12",
            "ghcr.io/x:",
            "ghcr.io//x",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn docker_config_credentials() {
        let auth = base64::engine::general_purpose::STANDARD.encode("ann:s3cret");
        let cfg = format!(
            r#"{{"auths": {{"https://reg.example.com:5000/v1/": {{"auth": "{auth}"}}, "other.io": {{"username": "u", "password": "p"}}}}}}"#
        );
        let c =
            Credentials::from_docker_config(cfg.as_bytes(), "reg.example.com:5000").expect("creds");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("ann", "s3cret")
        );
        let c = Credentials::from_docker_config(cfg.as_bytes(), "other.io").expect("creds");
        assert_eq!(c.username, "u");
        assert!(Credentials::from_docker_config(cfg.as_bytes(), "third.io").is_none());
    }

    #[test]
    fn bearer_challenges_parse() {
        let p = challenge_params(
            r#"realm="https://auth.example.com/token",service="registry.example.com",scope="repository:ml/w:pull,push""#,
        );
        assert_eq!(
            p[0],
            ("realm".into(), "https://auth.example.com/token".into())
        );
        assert_eq!(p[2], ("scope".into(), "repository:ml/w:pull,push".into()));
    }
}
