//! `cargo xtask images` from the binaries this test build made: both images in an OCI layout,
//! the same digests when built twice, the worker image within its size budget, and each image's
//! root filesystem running its binary as the non-root user (glibc, the loader and the CA
//! bundle found in the image, not on the host).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use moe_oci::Layout;

fn build_images(out: &Path) -> Result<BTreeMap<String, (String, f64)>> {
    Ok(e2e::images::build(out, None)?.images)
}

#[test]
fn images_build_reproducibly_and_their_binaries_run_as_nonroot() -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("moe-images-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let first = build_images(&tmp.join("a"))?;
    let second = build_images(&tmp.join("b"))?;
    let version = env!("CARGO_PKG_VERSION");
    let worker = format!("moe-worker:{version}");
    let operator = format!("moe-operator:{version}");
    ensure!(
        first.contains_key(&worker) && first.contains_key(&operator),
        "{first:?}"
    );
    assert_eq!(first, second, "two builds of one tree give one digest");
    assert!(
        first[&worker].1 < 60.0,
        "worker image {} MB",
        first[&worker].1
    );

    let layout = Layout::open(&tmp.join("a"))?;
    // The standard config: entrypoint, non-root user, labels.
    let digest = layout.resolve(&worker)?.context("worker in index")?;
    let manifest: serde_json::Value = serde_json::from_slice(&layout.read_blob(&digest)?)?;
    let config: serde_json::Value = serde_json::from_slice(
        &layout.read_blob(manifest["config"]["digest"].as_str().context("config")?)?,
    )?;
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(
        config["config"]["Entrypoint"][0],
        "/usr/local/bin/moe-worker"
    );
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], version);
    assert_eq!(
        labels["org.opencontainers.image.source"],
        "https://github.com/moe-serve/moe-serve"
    );
    assert!(
        labels["org.opencontainers.image.revision"]
            .as_str()
            .is_some_and(|r| !r.is_empty())
    );
    // The two images share their base layer.
    let op_digest = layout.resolve(&operator)?.context("operator in index")?;
    let op_manifest: serde_json::Value = serde_json::from_slice(&layout.read_blob(&op_digest)?)?;
    assert_eq!(
        manifest["layers"][0]["digest"],
        op_manifest["layers"][0]["digest"]
    );

    for (reference, bin, args) in [
        (
            &worker,
            "moe-worker",
            vec![
                "generate",
                "--model",
                "synthetic:tiny",
                "--prompt-ids",
                "1,2,3",
                "--max-new-tokens",
                "3",
            ],
        ),
        (&operator, "moe-operator", vec!["plan", "-f", "/plan.yaml"]),
    ] {
        let root = tmp.join("rootfs").join(bin);
        moe_oci::unpack::unpack(&layout, reference, &root)?;
        for needed in [
            "lib64/ld-linux-x86-64.so.2",
            "etc/ssl/certs/ca-certificates.crt",
            "etc/passwd",
        ] {
            ensure!(root.join(needed).exists(), "{reference}: no /{needed}");
        }
        let bundle = std::fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt"))?;
        assert!(
            bundle.matches("BEGIN CERTIFICATE").count() > 100,
            "the Mozilla roots"
        );
        std::fs::write(
            root.join("plan.yaml"),
            std::fs::read(e2e::moe::example("gpt4.yaml"))?,
        )?;
        let out = Command::new("/usr/sbin/chroot")
            .arg("--userspec=65532:65532")
            .arg(&root)
            .arg(format!("/usr/local/bin/{bin}"))
            .args(&args)
            .env_clear()
            .output()
            .context("chroot")?;
        ensure!(
            out.status.success(),
            "{bin} in its image: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "[images] {bin}: {}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
