//! Applying layers to a root filesystem, as a container runtime's snapshotter does: in order,
//! each layer's whiteouts (`.wh.NAME` removes NAME, `.wh..wh..opq` empties its folder first)
//! before its files, owners and modes kept, nothing written outside the root.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::{Error, Layout, Result, io};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// `path` inside `root`, or `None` if it would leave it.
fn inside(root: &Path, path: &Path) -> Option<PathBuf> {
    let mut out = root.to_path_buf();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn remove(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            std::fs::remove_dir_all(path).map_err(io(format!("removing {}", path.display())))
        }
        Ok(_) => std::fs::remove_file(path).map_err(io(format!("removing {}", path.display()))),
        Err(_) => Ok(()),
    }
}

/// Applies one layer (a tar, gzip-compressed or not) to `root`.
pub fn apply_layer(blob: &[u8], root: &Path) -> Result<()> {
    std::fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
    let reader: Box<dyn Read> = if blob.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(blob))
    } else {
        Box::new(blob)
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    for e in archive.entries().map_err(io("reading layer"))? {
        let mut e = e.map_err(io("reading layer entry"))?;
        let path = e.path().map_err(io("layer entry path"))?.into_owned();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            let parent = path.parent().unwrap_or(Path::new(""));
            let dir = inside(root, parent)
                .ok_or_else(|| Error::Invalid(format!("{}: leaves the root", path.display())))?;
            if name == OPAQUE {
                if let Ok(children) = std::fs::read_dir(&dir) {
                    for c in children.flatten() {
                        remove(&c.path())?;
                    }
                }
            } else {
                remove(&dir.join(hidden))?;
            }
            continue;
        }
        if inside(root, &path).is_none() {
            return Err(Error::Invalid(format!(
                "{}: a layer entry that leaves the root",
                path.display()
            )));
        }
        // A file replacing a folder (or the reverse) replaces it whole.
        if let Some(target) = inside(root, &path)
            && let Ok(m) = std::fs::symlink_metadata(&target)
            && (m.is_dir() != e.header().entry_type().is_dir())
        {
            remove(&target)?;
        }
        e.unpack_in(root)
            .map_err(io(format!("unpacking {}", path.display())))?;
    }
    Ok(())
}

/// The manifest of `reference` in `layout`, and its layer digests.
pub fn layers(layout: &Layout, reference: &str) -> Result<Vec<String>> {
    let digest = layout
        .resolve(reference)?
        .ok_or_else(|| Error::Invalid(format!("no image named {reference} in the layout")))?;
    let manifest: serde_json::Value = serde_json::from_slice(&layout.read_blob(&digest)?)
        .map_err(|e| Error::Invalid(format!("manifest {digest}: {e}")))?;
    Ok(manifest["layers"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .filter_map(|l| l["digest"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// Unpacks image `reference` of `layout` into `root` (created if missing).
pub fn unpack(layout: &Layout, reference: &str, root: &Path) -> Result<()> {
    std::fs::create_dir_all(root).map_err(io(format!("creating {}", root.display())))?;
    for d in layers(layout, reference)? {
        apply_layer(&layout.read_blob(&d)?, root)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LayerBuilder;

    #[test]
    fn whiteouts_remove_and_opaque_folders_empty_what_lower_layers_had() {
        let root = std::env::temp_dir().join(format!("moe-oci-unpack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mut lower = LayerBuilder::new();
        lower.file("etc/a", b"a".to_vec(), 0o644).expect("a");
        lower.file("etc/b", b"b".to_vec(), 0o600).expect("b");
        lower.file("opt/x/1", b"1".to_vec(), 0o644).expect("1");
        lower.file("opt/x/2", b"2".to_vec(), 0o644).expect("2");
        lower
            .file("var/thing", b"file".to_vec(), 0o644)
            .expect("thing");
        let mut upper = LayerBuilder::new();
        upper
            .file("etc/.wh.a", Vec::new(), 0o644)
            .expect("whiteout");
        upper
            .file("opt/x/.wh..wh..opq", Vec::new(), 0o644)
            .expect("opaque");
        upper.file("opt/x/3", b"3".to_vec(), 0o644).expect("3");
        upper
            .file("var/thing/inside", b"dir now".to_vec(), 0o644)
            .expect("dir");
        apply_layer(&lower.build(0, "lower").expect("lower").blob, &root).expect("apply");
        apply_layer(&upper.build(0, "upper").expect("upper").blob, &root).expect("apply");
        assert!(!root.join("etc/a").exists());
        assert_eq!(std::fs::read(root.join("etc/b")).expect("b"), b"b");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join("etc/b"))
            .expect("b")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut x: Vec<String> = std::fs::read_dir(root.join("opt/x"))
            .expect("x")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        x.sort();
        assert_eq!(x, ["3"]);
        assert_eq!(
            std::fs::read(root.join("var/thing/inside")).expect("inside"),
            b"dir now"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn entries_that_leave_the_root_are_refused() {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // Written raw: the builder itself refuses `..`.
        h.as_gnu_mut().expect("gnu").name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        tar.append(&h, &b"x"[..]).expect("append");
        let blob = tar.into_inner().expect("tar");
        let root = std::env::temp_dir().join(format!("moe-oci-escape-{}", std::process::id()));
        let e = apply_layer(&blob, &root.join("r")).expect_err("escapes");
        assert!(e.to_string().contains("leaves the root"), "{e}");
        assert!(!root.join("escape").exists());
        let _ = std::fs::remove_dir_all(&root);
    }
}
