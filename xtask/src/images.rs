//! The images: one base layer (Debian packages, users, CA bundle) shared by both, and a layer
//! with the stripped binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use moe_oci::{Image, ImageConfig, Layer, LayerBuilder, Layout};

use crate::{debs, output, root};

/// The non-root user and group every container runs as (distroless's `nonroot`).
pub const NONROOT: u64 = 65532;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cargo profile of the binaries (`dev` uses the test build's binaries).
    #[arg(long, default_value = "release")]
    pub profile: String,
    /// Use the binaries already built for the profile instead of running `cargo build`.
    #[arg(long)]
    pub no_build: bool,
    /// Take the binaries from this folder (default: the profile's folder of the target dir).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// The OCI image layout folder to write (default: the target folder's `images/`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The lock file of the base's Debian packages.
    #[arg(long, default_value = "images/debian.lock")]
    pub lock: PathBuf,
    /// Push both images to REGISTRY[/PATH] (as PATH/moe-operator:VERSION and
    /// PATH/moe-worker:VERSION). Credentials: MOE_REGISTRY_USERNAME and MOE_REGISTRY_PASSWORD,
    /// else the registry's entry in $DOCKER_CONFIG/config.json or ~/.docker/config.json.
    #[arg(long, value_name = "REGISTRY[/PATH]")]
    pub push: Option<String>,
    /// PEM CA certificates to trust for the registry besides the system's.
    #[arg(long, value_name = "FILE")]
    pub registry_ca: Option<PathBuf>,
    /// Fail when the worker image is larger than this, compressed (MB, 10^6 bytes).
    #[arg(long, default_value_t = 60)]
    pub max_worker_mb: u64,
}

/// One image to build.
struct Spec {
    name: &'static str,
    description: &'static str,
}

const SPECS: &[Spec] = &[
    Spec {
        name: "moe-operator",
        description: "moe-serve operator: reconciles MoEDeployments into pipeline stages, expert shards and a gateway",
    },
    Spec {
        name: "moe-worker",
        description: "moe-serve worker (CPU): gateway, pipeline stage and expert shard roles",
    },
];

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// `version = "..."` of a member's Cargo.toml.
pub fn crate_version(member: &str) -> Result<String, String> {
    let path = root().join(member).join("Cargo.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("version")?.trim().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_string())
        })
        .ok_or_else(|| format!("{}: no version", path.display()))
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .current_dir(root())
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What names the build: the commit, and its time (or `SOURCE_DATE_EPOCH`).
fn provenance() -> (String, u64) {
    let revision = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let created = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .or_else(|| git(&["log", "-1", "--format=%ct"]))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (revision, created)
}

/// Paths of a package that an image without a shell or package manager has no use for.
fn wanted(path: &str) -> bool {
    const DROP: &[&str] = &[
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/lintian",
        "usr/share/locale",
        "usr/share/bug",
        "usr/sbin",
        "usr/bin",
        "sbin",
        "bin",
        "etc/ca-certificates",
        "etc/ca-certificates.conf",
        "usr/share/debconf",
    ];
    !DROP
        .iter()
        .any(|d| path == *d || path.strip_prefix(d).is_some_and(|r| r.starts_with('/')))
}

fn err(e: moe_oci::Error) -> String {
    e.to_string()
}

/// The base layer: the pinned packages' files, `/etc` for a non-root user, the CA bundle.
fn base_layer(lock: &Path, created: u64) -> Result<Layer, String> {
    let pins = debs::read_lock(lock)?;
    let mut l = LayerBuilder::new();
    for pin in &pins {
        let deb = debs::fetch(pin)?;
        let tar = debs::data_tar(&deb)?;
        l.add_tar(tar.as_slice(), wanted).map_err(err)?;
        // What scanners read to know the packages (as distroless does).
        let control = debs::control(&deb)?;
        l.file(
            &format!("var/lib/dpkg/status.d/{}", pin.name),
            control,
            0o644,
        )
        .map_err(err)?;
    }
    // One bundle of the Mozilla roots, as update-ca-certificates would write it.
    let mut bundle = Vec::new();
    let certs: Vec<String> = l
        .paths()
        .filter(|p| p.starts_with("usr/share/ca-certificates/") && p.ends_with(".crt"))
        .map(str::to_string)
        .collect();
    for p in &certs {
        if let Some(moe_oci::layer::Kind::File(b)) = l.get(p).map(|e| &e.kind) {
            bundle.extend_from_slice(b);
            if !bundle.ends_with(b"\n") {
                bundle.push(b'\n');
            }
        }
    }
    if certs.is_empty() {
        return Err("ca-certificates holds no certificate".into());
    }
    l.file("etc/ssl/certs/ca-certificates.crt", bundle, 0o644)
        .map_err(err)?;
    let etc: &[(&str, &str)] = &[
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/sbin/nologin\n\
             nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n\
             nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
        ),
        (
            "etc/group",
            "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n",
        ),
        (
            "etc/nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n",
        ),
        (
            "etc/os-release",
            "PRETTY_NAME=\"moe-serve base (Debian GNU/Linux 12 packages)\"\nNAME=\"Debian GNU/Linux\"\n\
             ID=debian\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\nHOME_URL=\"https://github.com/moe-serve/moe-serve\"\n",
        ),
    ];
    for (path, text) in etc {
        l.file(path, text.as_bytes().to_vec(), 0o644).map_err(err)?;
    }
    l.dir("tmp", 0o1777, 0, 0).map_err(err)?;
    l.dir("root", 0o700, 0, 0).map_err(err)?;
    l.dir("home/nonroot", 0o700, NONROOT, NONROOT)
        .map_err(err)?;
    let names: Vec<String> = pins
        .iter()
        .map(|p| format!("{}={}", p.name, p.version))
        .collect();
    l.build(created, &format!("debian packages: {}", names.join(" ")))
        .map_err(err)
}

/// The binary, stripped of debug information, at /usr/local/bin.
fn binary_layer(bin: &Path, name: &str, created: u64) -> Result<Layer, String> {
    let stripped = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
    output(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(bin),
    )?;
    let bytes = std::fs::read(&stripped).map_err(|e| format!("{}: {e}", stripped.display()));
    let _ = std::fs::remove_file(&stripped);
    let mut l = LayerBuilder::new();
    l.file(&format!("usr/local/bin/{name}"), bytes?, 0o755)
        .map_err(err)?;
    l.build(created, &format!("COPY {name} /usr/local/bin/"))
        .map_err(err)
}

pub fn run(args: Args) -> Result<(), String> {
    let profile_dir = match args.profile.as_str() {
        "dev" | "test" => "debug",
        p => p,
    };
    if !args.no_build && args.bin_dir.is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(root())
            .args(["build", "--profile", &args.profile, "--bins"])
            .args(SPECS.iter().flat_map(|s| ["-p", s.name]))
            .status()
            .map_err(|e| format!("cargo build: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build failed ({status})"));
        }
    }
    let bins = args
        .bin_dir
        .clone()
        .unwrap_or_else(|| target_dir().join(profile_dir));
    let out = args.out.unwrap_or_else(|| target_dir().join("images"));
    let (revision, created) = provenance();
    let lock = root().join(&args.lock);
    let base = base_layer(&lock, created)?;
    let layout = Layout::open(&out).map_err(err)?;
    println!("| image | reference | digest | compressed |\n|---|---|---|---|");
    let mut worker_size = 0;
    let mut built = Vec::new();
    for spec in SPECS {
        let member = spec.name.trim_start_matches("moe-");
        let version = crate_version(member)?;
        let bin = bins.join(spec.name);
        if !bin.exists() {
            return Err(format!(
                "{}: not built (run without --no-build, or build the `{}` profile)",
                bin.display(),
                args.profile
            ));
        }
        let labels = BTreeMap::from([
            (
                "org.opencontainers.image.title".to_string(),
                spec.name.to_string(),
            ),
            (
                "org.opencontainers.image.description".to_string(),
                spec.description.to_string(),
            ),
            (
                "org.opencontainers.image.source".to_string(),
                "https://github.com/moe-serve/moe-serve".to_string(),
            ),
            (
                "org.opencontainers.image.version".to_string(),
                version.clone(),
            ),
            (
                "org.opencontainers.image.revision".to_string(),
                revision.clone(),
            ),
            (
                "org.opencontainers.image.created".to_string(),
                moe_oci::image::rfc3339(created),
            ),
            (
                "org.opencontainers.image.licenses".to_string(),
                "Apache-2.0".to_string(),
            ),
        ]);
        let cfg = ImageConfig {
            entrypoint: vec![format!("/usr/local/bin/{}", spec.name)],
            cmd: Vec::new(),
            env: vec![
                "PATH=/usr/local/bin:/usr/bin:/bin".into(),
                "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt".into(),
            ],
            user: format!("{NONROOT}:{NONROOT}"),
            working_dir: "/".into(),
            labels,
            created,
        };
        let layers = vec![base.clone(), binary_layer(&bin, spec.name, created)?];
        let image = Image::new(&cfg, layers).map_err(err)?;
        let reference = format!("{}:{version}", spec.name);
        layout.add(&image, &reference).map_err(err)?;
        let size = image.compressed_size();
        built.push((spec.name, version.clone(), image.clone()));
        if spec.name == "moe-worker" {
            worker_size = size;
        }
        println!(
            "| {} | {reference} | {} | {:.1} MB |",
            spec.name,
            image.digest,
            size as f64 / 1e6
        );
    }
    println!("OCI image layout: {}", out.display());
    if let Some(prefix) = &args.push {
        push(prefix, args.registry_ca.as_deref(), &built)?;
    }
    if worker_size > args.max_worker_mb * 1_000_000 {
        return Err(format!(
            "the worker image is {:.1} MB compressed, over the {} MB budget",
            worker_size as f64 / 1e6,
            args.max_worker_mb
        ));
    }
    Ok(())
}

/// Credentials for `registry` from the environment or a Docker config.
fn credentials(registry: &str) -> Option<moe_oci::registry::Credentials> {
    if let (Ok(username), Ok(password)) = (
        std::env::var("MOE_REGISTRY_USERNAME"),
        std::env::var("MOE_REGISTRY_PASSWORD"),
    ) {
        return Some(moe_oci::registry::Credentials { username, password });
    }
    let config = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?
        .join("config.json");
    let json = std::fs::read(config).ok()?;
    moe_oci::registry::Credentials::from_docker_config(&json, registry)
}

/// Pushes every built image under `prefix` and prints each pushed reference with its digest.
fn push(prefix: &str, ca: Option<&Path>, built: &[(&str, String, Image)]) -> Result<(), String> {
    let prefix = prefix.trim_end_matches('/');
    let (registry, path) = prefix.split_once('/').unwrap_or((prefix, ""));
    let ca = ca
        .map(|p| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display())))
        .transpose()?;
    let client = moe_oci::registry::Registry::new(registry, ca.as_deref(), credentials(registry))
        .map_err(err)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio: {e}"))?;
    for (name, version, image) in built {
        let repo = if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}/{name}")
        };
        // Validates the whole reference before anything is sent.
        let reference =
            moe_oci::registry::Reference::parse(&format!("{registry}/{repo}:{version}"))
                .map_err(err)?;
        let digest = rt
            .block_on(client.push(&reference.repository, image, version))
            .map_err(err)?;
        println!("pushed {reference}@{digest}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn package_paths_without_use_in_an_image_are_dropped() {
        assert!(super::wanted("lib/x86_64-linux-gnu/libc.so.6"));
        assert!(super::wanted("usr/share/zoneinfo/Europe/Paris"));
        assert!(!super::wanted("usr/share/doc/libc6/copyright"));
        assert!(!super::wanted("usr/sbin/update-ca-certificates"));
        assert!(super::wanted("usr/sbinx"));
    }

    #[test]
    fn the_chart_tags_what_the_build_tags() {
        let chart = std::fs::read_to_string(crate::root().join("charts/moe-operator/Chart.yaml"))
            .expect("Chart.yaml");
        let app = chart
            .lines()
            .find_map(|l| l.strip_prefix("appVersion:"))
            .map(|v| v.trim().trim_matches('"').to_string())
            .expect("appVersion");
        for member in ["operator", "worker"] {
            assert_eq!(
                super::crate_version(member).expect("version"),
                app,
                "{member}"
            );
        }
        let values = std::fs::read_to_string(crate::root().join("charts/moe-operator/values.yaml"))
            .expect("values.yaml");
        for name in ["moe-operator", "moe-worker"] {
            assert!(
                values.contains(&format!("repository: ghcr.io/moe-serve/{name}")),
                "values.yaml names ghcr.io/moe-serve/{name}"
            );
        }
    }
}
