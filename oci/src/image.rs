//! Image config, manifest and index (OCI image spec v1), and the OCI image layout folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::{Error, Layer, Result, digest, io};

pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The index annotation that names an image in a layout.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// What runs and how: the runtime part of the image config.
#[derive(Debug, Clone, Default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// `uid:gid`, numeric (an image without a passwd lookup at run time).
    pub user: String,
    pub working_dir: String,
    /// `org.opencontainers.image.*` and the like; also the manifest's annotations.
    pub labels: BTreeMap<String, String>,
    /// Unix seconds (the commit's time, for reproducibility).
    pub created: u64,
}

/// A built image: config and manifest blobs and the layers, each with its digest.
#[derive(Debug, Clone)]
pub struct Image {
    pub config: Vec<u8>,
    pub config_digest: String,
    pub manifest: Vec<u8>,
    pub digest: String,
    pub layers: Vec<Layer>,
}

/// `1970-01-01T00:00:00Z` from Unix seconds (the proleptic Gregorian calendar, UTC).
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn to_bytes(v: &Value) -> Vec<u8> {
    // Objects are maps with a fixed order of keys, so the bytes are a function of the content.
    serde_json::to_vec(v).unwrap_or_default()
}

impl Image {
    pub fn new(cfg: &ImageConfig, layers: Vec<Layer>) -> Result<Self> {
        if layers.is_empty() {
            return Err(Error::Invalid("an image needs at least one layer".into()));
        }
        let created = rfc3339(cfg.created);
        let mut runtime = serde_json::Map::new();
        runtime.insert("User".into(), json!(cfg.user));
        runtime.insert("Env".into(), json!(cfg.env));
        runtime.insert("Entrypoint".into(), json!(cfg.entrypoint));
        if !cfg.cmd.is_empty() {
            runtime.insert("Cmd".into(), json!(cfg.cmd));
        }
        runtime.insert("WorkingDir".into(), json!(cfg.working_dir));
        runtime.insert("Labels".into(), json!(cfg.labels));
        let config = to_bytes(&json!({
            "created": created,
            "architecture": "amd64",
            "os": "linux",
            "config": runtime,
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
            },
            "history": layers
                .iter()
                .map(|l| json!({"created": created, "created_by": l.created_by}))
                .collect::<Vec<_>>(),
        }));
        let config_digest = digest(&config);
        let manifest = to_bytes(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config.len()},
            "layers": layers
                .iter()
                .map(|l| json!({"mediaType": LAYER_TYPE, "digest": l.digest, "size": l.blob.len()}))
                .collect::<Vec<_>>(),
            "annotations": cfg.labels,
        }));
        Ok(Self {
            digest: digest(&manifest),
            config,
            config_digest,
            manifest,
            layers,
        })
    }

    /// Bytes a registry stores and a node pulls: manifest, config and compressed layers.
    pub fn compressed_size(&self) -> u64 {
        (self.manifest.len()
            + self.config.len()
            + self.layers.iter().map(|l| l.blob.len()).sum::<usize>()) as u64
    }

    /// Every blob (config and layers) with its digest.
    pub fn blobs(&self) -> impl Iterator<Item = (&str, &[u8])> {
        std::iter::once((self.config_digest.as_str(), self.config.as_slice())).chain(
            self.layers
                .iter()
                .map(|l| (l.digest.as_str(), l.blob.as_slice())),
        )
    }
}

/// An OCI image layout folder (`oci-layout`, `index.json`, `blobs/sha256/...`): what `skopeo`,
/// `crane`, `podman` and `ctr` read and push.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    /// Opens `dir`, making it a layout if it is not one yet.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("blobs/sha256"))
            .map_err(io(format!("creating {}", dir.display())))?;
        let marker = dir.join("oci-layout");
        if !marker.exists() {
            write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    /// Writes the image's blobs and names it `ref_name` in the index (replacing an image of
    /// that name).
    pub fn add(&self, image: &Image, ref_name: &str) -> Result<()> {
        for (d, bytes) in image.blobs().chain(std::iter::once((
            image.digest.as_str(),
            image.manifest.as_slice(),
        ))) {
            let path = self.blob_path(d);
            if !path.exists() {
                write(&path, bytes)?;
            }
        }
        let mut manifests: BTreeMap<String, Value> = self
            .index()?
            .into_iter()
            .filter_map(|m| Some((m["annotations"][REF_NAME].as_str()?.to_string(), m)))
            .collect();
        manifests.insert(
            ref_name.to_string(),
            json!({
                "mediaType": MANIFEST_TYPE,
                "digest": image.digest,
                "size": image.manifest.len(),
                "annotations": {REF_NAME: ref_name},
            }),
        );
        let index = json!({
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": manifests.into_values().collect::<Vec<_>>(),
        });
        write(&self.dir.join("index.json"), &to_bytes(&index))
    }

    /// The index's manifest descriptors.
    pub fn index(&self) -> Result<Vec<Value>> {
        let path = self.dir.join("index.json");
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(format!("reading {}", path.display()))(e)),
        };
        let v: Value = serde_json::from_slice(&text)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        Ok(v["manifests"].as_array().cloned().unwrap_or_default())
    }

    /// The manifest digest named `ref_name`.
    pub fn resolve(&self, ref_name: &str) -> Result<Option<String>> {
        Ok(self
            .index()?
            .into_iter()
            .find(|m| m["annotations"][REF_NAME] == ref_name)
            .and_then(|m| m["digest"].as_str().map(str::to_string)))
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let bytes = std::fs::read(&path).map_err(io(format!("reading {}", path.display())))?;
        if crate::digest(&bytes) != digest {
            return Err(Error::Invalid(format!(
                "{}: content does not match its digest",
                path.display()
            )));
        }
        Ok(bytes)
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LayerBuilder;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_083_199), "2026-11-30T23:59:59Z");
    }

    fn image(created: u64) -> Image {
        let mut l = LayerBuilder::new();
        l.file("usr/local/bin/tool", b"tool".to_vec(), 0o755)
            .expect("file");
        let layer = l.build(created, "COPY tool").expect("layer");
        let cfg = ImageConfig {
            entrypoint: vec!["/usr/local/bin/tool".into()],
            user: "65532:65532".into(),
            working_dir: "/".into(),
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
            labels: BTreeMap::from([(
                "org.opencontainers.image.version".to_string(),
                "0.1.0".to_string(),
            )]),
            created,
            ..ImageConfig::default()
        };
        Image::new(&cfg, vec![layer]).expect("image")
    }

    #[test]
    fn images_are_reproducible_and_the_layout_names_them() {
        let a = image(1_700_000_000);
        assert_eq!(a.digest, image(1_700_000_000).digest);
        assert_ne!(a.digest, image(1_700_000_001).digest);
        let config: Value = serde_json::from_slice(&a.config).expect("config");
        assert_eq!(config["config"]["User"], "65532:65532");
        assert_eq!(config["rootfs"]["diff_ids"][0], a.layers[0].diff_id);
        assert_eq!(config["created"], "2023-11-14T22:13:20Z");
        let manifest: Value = serde_json::from_slice(&a.manifest).expect("manifest");
        assert_eq!(manifest["config"]["digest"], a.config_digest);
        assert_eq!(manifest["layers"][0]["size"], a.layers[0].blob.len());

        let dir = std::env::temp_dir().join(format!("moe-oci-test-{}", std::process::id()));
        let layout = Layout::open(&dir).expect("layout");
        layout.add(&a, "tool:1").expect("add");
        let b = image(1_700_000_001);
        layout.add(&b, "tool:2").expect("add");
        layout.add(&b, "tool:1").expect("rename");
        assert_eq!(
            layout.resolve("tool:1").expect("index"),
            Some(b.digest.clone())
        );
        assert_eq!(layout.index().expect("index").len(), 2);
        assert_eq!(layout.read_blob(&b.digest).expect("blob"), b.manifest);
        std::fs::write(layout.blob_path(&b.config_digest), b"tampered").expect("write");
        assert!(layout.read_blob(&b.config_digest).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
