//! Deterministic layers: entries sorted by path, every header field fixed (times, owners by
//! number, no user or group names), gzip without a timestamp. The same entries give the same
//! bytes, and so the same digests, on any machine.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use crate::{Error, Result, digest, io};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    /// A hard link to another entry of the same layer (its path).
    Link(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
}

/// The entries of one layer, by path (relative, no leading `/` or `./`).
#[derive(Debug, Default, Clone)]
pub struct LayerBuilder {
    entries: BTreeMap<String, Entry>,
}

/// A built layer: the compressed tar (the blob) and its digests.
#[derive(Debug, Clone)]
pub struct Layer {
    pub blob: Vec<u8>,
    /// Digest of the compressed tar: the blob's name.
    pub digest: String,
    /// Digest of the uncompressed tar: the config's `rootfs.diff_ids`.
    pub diff_id: String,
    /// What the layer is, for the image's history.
    pub created_by: String,
}

/// `./usr/lib/` → `usr/lib`; `None` for the root itself or a path that climbs out.
fn normalize(path: &str) -> Option<String> {
    let mut parts = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

impl LayerBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        normalize(path).and_then(|p| self.entries.get(&p))
    }

    /// Every path, sorted.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Adds (or replaces) `path`, creating missing parent folders (0755, root).
    pub fn insert(&mut self, path: &str, entry: Entry) -> Result<()> {
        let path = normalize(path)
            .ok_or_else(|| Error::Invalid(format!("bad path in layer: `{path}`")))?;
        // Every proper prefix ending before a `/` is a parent folder.
        for (i, _) in path.match_indices('/') {
            self.entries.entry(path[..i].to_string()).or_insert(Entry {
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
            });
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    pub fn dir(&mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Result<()> {
        self.insert(
            path,
            Entry {
                kind: Kind::Dir,
                mode,
                uid,
                gid,
            },
        )
    }

    pub fn file(&mut self, path: &str, bytes: Vec<u8>, mode: u32) -> Result<()> {
        self.insert(
            path,
            Entry {
                kind: Kind::File(bytes),
                mode,
                uid: 0,
                gid: 0,
            },
        )
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.insert(
            path,
            Entry {
                kind: Kind::Symlink(target.to_string()),
                mode: 0o777,
                uid: 0,
                gid: 0,
            },
        )
    }

    /// Adds the entries of a tar stream (a Debian package's data, say) for which `keep` holds.
    /// Character and block devices, fifos and the like are refused: images carry none.
    pub fn add_tar(&mut self, reader: impl Read, keep: impl Fn(&str) -> bool) -> Result<()> {
        let mut archive = tar::Archive::new(reader);
        for e in archive.entries().map_err(io("reading tar"))? {
            let mut e = e.map_err(io("reading tar entry"))?;
            let raw = e.path().map_err(io("tar entry path"))?;
            let raw = raw.to_string_lossy().into_owned();
            let Some(path) = normalize(&raw) else {
                continue;
            };
            if !keep(&path) {
                continue;
            }
            let h = e.header();
            let mode = h.mode().map_err(io("tar mode"))? & 0o7777;
            let uid = h.uid().map_err(io("tar uid"))?;
            let gid = h.gid().map_err(io("tar gid"))?;
            let kind = match h.entry_type() {
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mut bytes = Vec::new();
                    e.read_to_end(&mut bytes)
                        .map_err(io(format!("reading {raw}")))?;
                    Kind::File(bytes)
                }
                tar::EntryType::Symlink => {
                    let target = e
                        .link_name()
                        .map_err(io("link name"))?
                        .ok_or_else(|| Error::Invalid(format!("{raw}: symlink without target")))?;
                    Kind::Symlink(target.to_string_lossy().into_owned())
                }
                tar::EntryType::Link => {
                    let target = e
                        .link_name()
                        .map_err(io("link name"))?
                        .ok_or_else(|| Error::Invalid(format!("{raw}: link without target")))?;
                    let target = normalize(&target.to_string_lossy())
                        .ok_or_else(|| Error::Invalid(format!("{raw}: bad link target")))?;
                    if !keep(&target) {
                        continue;
                    }
                    Kind::Link(target)
                }
                other => {
                    return Err(Error::Invalid(format!(
                        "{raw}: entry type {other:?} has no place in an image"
                    )));
                }
            };
            self.insert(
                &path,
                Entry {
                    kind,
                    mode,
                    uid,
                    gid,
                },
            )?;
        }
        Ok(())
    }

    /// The tar, gzip-compressed at the best level, every header time `mtime` (Unix seconds).
    pub fn build(&self, mtime: u64, created_by: &str) -> Result<Layer> {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Deterministic);
        for (path, e) in &self.entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(mtime);
            h.set_uid(e.uid);
            h.set_gid(e.gid);
            h.set_mode(e.mode);
            let built = match &e.kind {
                Kind::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    tar.append_data(&mut h, format!("{path}/"), std::io::empty())
                }
                Kind::File(bytes) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(bytes.len() as u64);
                    tar.append_data(&mut h, path, bytes.as_slice())
                }
                Kind::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    tar.append_link(&mut h, path, target)
                }
                Kind::Link(target) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    tar.append_link(&mut h, path, target)
                }
            };
            built.map_err(io(format!("adding {path} to a layer")))?;
        }
        let tar = tar.into_inner().map_err(io("finishing a layer"))?;
        let mut gz = flate2::GzBuilder::new()
            .mtime(0)
            .write(Vec::new(), flate2::Compression::best());
        gz.write_all(&tar).map_err(io("compressing a layer"))?;
        let blob = gz.finish().map_err(io("compressing a layer"))?;
        Ok(Layer {
            digest: digest(&blob),
            diff_id: digest(&tar),
            blob,
            created_by: created_by.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LayerBuilder {
        let mut l = LayerBuilder::new();
        l.file("/usr/local/bin/tool", b"\x7fELF...".to_vec(), 0o755)
            .expect("file");
        l.dir("tmp", 0o1777, 0, 0).expect("dir");
        l.dir("home/nonroot", 0o700, 65532, 65532).expect("dir");
        l.symlink("lib64/ld.so", "/lib/x86_64-linux-gnu/ld.so")
            .expect("symlink");
        l
    }

    #[test]
    fn the_same_entries_give_the_same_bytes_in_any_order() {
        let a = sample().build(1_700_000_000, "test").expect("layer");
        let mut b = LayerBuilder::new();
        b.symlink("./lib64/ld.so", "/lib/x86_64-linux-gnu/ld.so")
            .expect("symlink");
        b.dir("home/nonroot/", 0o700, 65532, 65532).expect("dir");
        b.dir("/tmp", 0o1777, 0, 0).expect("dir");
        b.file("usr/local/bin/tool", b"\x7fELF...".to_vec(), 0o755)
            .expect("file");
        let b = b.build(1_700_000_000, "test").expect("layer");
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.diff_id, b.diff_id);
        let c = sample().build(1_700_000_001, "test").expect("layer");
        assert_ne!(a.diff_id, c.diff_id, "the time is part of the content");
    }

    #[test]
    fn a_built_layer_reads_back_with_parents_owners_and_modes() {
        let layer = sample().build(42, "test").expect("layer");
        let tar = flate2::read::GzDecoder::new(layer.blob.as_slice());
        let mut back = LayerBuilder::new();
        back.add_tar(tar, |_| true).expect("read back");
        let paths: Vec<&str> = back.paths().collect();
        assert_eq!(
            paths,
            [
                "home",
                "home/nonroot",
                "lib64",
                "lib64/ld.so",
                "tmp",
                "usr",
                "usr/local",
                "usr/local/bin",
                "usr/local/bin/tool"
            ]
        );
        let home = back.get("home/nonroot").expect("home");
        assert_eq!((home.uid, home.gid, home.mode), (65532, 65532, 0o700));
        assert_eq!(back.get("tmp").expect("tmp").mode, 0o1777);
        assert_eq!(
            back.get("usr/local/bin/tool").expect("tool").kind,
            Kind::File(b"\x7fELF...".to_vec())
        );
        let filtered = {
            let mut f = LayerBuilder::new();
            let tar = flate2::read::GzDecoder::new(layer.blob.as_slice());
            f.add_tar(tar, |p| !p.starts_with("usr")).expect("filtered");
            f
        };
        assert!(filtered.get("usr/local/bin/tool").is_none());
        assert!(filtered.get("tmp").is_some());
    }

    #[test]
    fn paths_that_climb_out_are_refused() {
        let mut l = LayerBuilder::new();
        assert!(l.file("../etc/passwd", Vec::new(), 0o644).is_err());
        assert!(l.file("/", Vec::new(), 0o644).is_err());
    }
}
