//! The Debian packages of the images' base, pinned by version and SHA-256 in
//! `images/debian.lock`, downloaded with `apt-get download` into a cache shared by every
//! clone, and unpacked with `dpkg-deb`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::output;

/// What a distroless `cc` image holds, and no more: glibc, libgcc, CA certificates, tzdata.
pub const PACKAGES: &[&str] = &["libc6", "libgcc-s1", "ca-certificates", "tzdata"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

impl Pinned {
    /// The start of the file name `apt-get download` gives it (an epoch's `:` is written
    /// `%3a`); the architecture (`amd64`, `all`) follows.
    fn file_prefix(&self) -> String {
        format!("{}_{}_", self.name, self.version.replace(':', "%3a"))
    }

    /// The downloaded .deb in `dir`, if there.
    fn find(&self, dir: &Path) -> Option<PathBuf> {
        let prefix = self.file_prefix();
        ["amd64", "all"]
            .iter()
            .map(|arch| dir.join(format!("{prefix}{arch}.deb")))
            .find(|p| p.exists())
    }

    /// Downloads it into `dir` unless it is there already.
    fn download(&self, dir: &Path) -> Result<PathBuf, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if let Some(p) = self.find(dir) {
            return Ok(p);
        }
        output(
            Command::new("apt-get")
                .current_dir(dir)
                .args(["download", &format!("{}={}", self.name, self.version)]),
        )?;
        self.find(dir)
            .ok_or_else(|| format!("apt-get download left no {}*.deb", self.file_prefix()))
    }
}

pub fn read_lock(path: &Path) -> Result<Vec<Pinned>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut pins = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [name, version, sha256] = f[..] else {
            return Err(format!(
                "{}:{}: expected `name version sha256`",
                path.display(),
                i + 1
            ));
        };
        pins.push(Pinned {
            name: name.into(),
            version: version.into(),
            sha256: sha256.into(),
        });
    }
    for p in PACKAGES {
        if !pins.iter().any(|x| x.name == *p) {
            return Err(format!("{}: {p} is not pinned", path.display()));
        }
    }
    Ok(pins)
}

fn sha256_file(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(moe_oci::digest(&bytes)
        .trim_start_matches("sha256:")
        .to_string())
}

fn cache() -> PathBuf {
    crate::cache_dir().join("debs")
}

/// The .deb of `pin`, from the cache or downloaded, checked against its SHA-256.
pub fn fetch(pin: &Pinned) -> Result<PathBuf, String> {
    let path = pin.download(&cache()).map_err(|e| {
        format!(
            "{e}\n  {} {} is no longer offered by the configured mirror? Run \
             `cargo xtask lock-debs` to pin what it offers now.",
            pin.name, pin.version
        )
    })?;
    let got = sha256_file(&path)?;
    if got != pin.sha256 {
        let _ = std::fs::remove_file(&path);
        return Err(format!(
            "{}: SHA-256 {got} is not the pinned {} (removed; run again, or re-pin with \
             `cargo xtask lock-debs`)",
            path.display(),
            pin.sha256
        ));
    }
    Ok(path)
}

/// The package's files as a tar stream.
pub fn data_tar(deb: &Path) -> Result<Vec<u8>, String> {
    output(Command::new("dpkg-deb").arg("--fsys-tarfile").arg(deb))
}

/// The package's control fields (what `dpkg` keeps in its status database).
pub fn control(deb: &Path) -> Result<Vec<u8>, String> {
    output(Command::new("dpkg-deb").arg("--field").arg(deb))
}

/// Pins what apt offers now for every package.
pub fn relock(lock: &Path) -> Result<(), String> {
    let mut text = String::from(
        "# The Debian packages of the images' base (amd64), pinned: name version sha256 of the .deb.\n\
         # Rewrite with `cargo xtask lock-debs` (then the images' digests change).\n",
    );
    for name in PACKAGES {
        let policy = output(Command::new("apt-cache").args(["policy", name]))?;
        let policy = String::from_utf8_lossy(&policy);
        let version = policy
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate: "))
            .filter(|v| *v != "(none)")
            .ok_or_else(|| format!("apt offers no {name} (apt-get update?)"))?
            .to_string();
        let pin = Pinned {
            name: name.to_string(),
            version,
            sha256: String::new(),
        };
        let sha = sha256_file(&pin.download(&cache())?)?;
        text.push_str(&format!("{} {} {sha}\n", pin.name, pin.version));
    }
    if let Some(dir) = lock.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(lock, text).map_err(|e| format!("{}: {e}", lock.display()))?;
    println!("wrote {}", lock.display());
    Ok(())
}
