//! Which local program runs a container: the locally built binary stands in for the image.

use std::path::{Path, PathBuf};

/// The `PATH` a container sees (a typical image's), also used to find host commands.
pub const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How images and commands map to programs on this machine.
#[derive(Debug, Clone)]
pub struct Images {
    /// Folders searched for a binary named after the image or `command[0]` (cargo's
    /// `target/debug`): `ghcr.io/moe-serve/moe-worker:0.1.0` runs `<dir>/moe-worker`.
    pub bin_dirs: Vec<PathBuf>,
    /// Also run a `command[0]` that is not a workspace binary from the host (`/bin/sh`,
    /// `sleep`, `python3`, looked up in [`CONTAINER_PATH`]), for infrastructure tests.
    pub host_commands: bool,
}

/// The program to exec and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub path: PathBuf,
    pub args: Vec<String>,
}

/// The binary an image stands for: the last path segment of the repository, without tag or
/// digest (`ghcr.io/moe-serve/moe-worker:0.1.0` → `moe-worker`).
pub fn image_binary(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split(':').next().unwrap_or(last)
}

impl Images {
    /// Resolves a container's program from its image, command and (already expanded) args:
    /// `command[0]`'s basename (else the image's binary) in the bin folders; else, when allowed,
    /// `command[0]` from the host. The error reads like a runtime's image pull failure.
    pub fn resolve(
        &self,
        image: &str,
        command: &[String],
        args: &[String],
    ) -> Result<Program, String> {
        if let Some((first, rest)) = command.split_first() {
            let name = Path::new(first)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut all_args: Vec<String> = rest.to_vec();
            all_args.extend_from_slice(args);
            if let Some(path) = self.find_built(&name) {
                return Ok(Program {
                    path,
                    args: all_args,
                });
            }
            if self.host_commands
                && let Some(path) = find_host(first)
            {
                return Ok(Program {
                    path,
                    args: all_args,
                });
            }
            return Err(format!(
                "command {first:?} of image {image:?}: no binary {name:?} in {}{}",
                self.dirs_text(),
                if self.host_commands {
                    " nor on the host"
                } else {
                    ""
                }
            ));
        }
        let name = image_binary(image);
        match self.find_built(name) {
            Some(path) => Ok(Program {
                path,
                args: args.to_vec(),
            }),
            None => Err(format!(
                "image {image:?}: no locally built binary {name:?} in {} (build it with cargo build)",
                self.dirs_text()
            )),
        }
    }

    fn find_built(&self, name: &str) -> Option<PathBuf> {
        if name.is_empty() {
            return None;
        }
        self.bin_dirs
            .iter()
            .map(|d| d.join(name))
            .find(|p| is_executable(p))
    }

    fn dirs_text(&self) -> String {
        let dirs: Vec<String> = self
            .bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        dirs.join(", ")
    }
}

fn find_host(command: &str) -> Option<PathBuf> {
    if command.contains('/') {
        let p = PathBuf::from(command);
        return is_executable(&p).then_some(p);
    }
    CONTAINER_PATH
        .split(':')
        .map(|d| Path::new(d).join(command))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_map_to_binaries() {
        assert_eq!(
            image_binary("ghcr.io/moe-serve/moe-worker:0.1.0"),
            "moe-worker"
        );
        assert_eq!(
            image_binary("ghcr.io/moe-serve/moe-operator"),
            "moe-operator"
        );
        assert_eq!(
            image_binary("localhost:5000/x/moe-worker:dev"),
            "moe-worker"
        );
        assert_eq!(image_binary("moe-worker@sha256:abc"), "moe-worker");
        assert_eq!(image_binary("busybox"), "busybox");
    }

    fn images(dir: &Path, host_commands: bool) -> Images {
        Images {
            bin_dirs: vec![dir.to_path_buf()],
            host_commands,
        }
    }

    fn fake_binary(dir: &Path, name: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").ok();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).ok();
        p
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn resolves_images_commands_and_host_programs() {
        let dir = std::env::temp_dir().join(format!("moe-e2e-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let worker = fake_binary(&dir, "moe-worker");
        let imgs = images(&dir, true);

        let p = imgs.resolve(
            "ghcr.io/moe-serve/moe-worker:0.1.0",
            &[],
            &s(&["stage", "--x"]),
        );
        assert_eq!(
            p,
            Ok(Program {
                path: worker.clone(),
                args: s(&["stage", "--x"])
            })
        );
        // command[0]'s basename wins over the image, and args follow command's own.
        let p = imgs.resolve(
            "busybox",
            &s(&["/usr/bin/moe-worker", "gateway"]),
            &s(&["--y"]),
        );
        assert_eq!(
            p,
            Ok(Program {
                path: worker,
                args: s(&["gateway", "--y"])
            })
        );
        let p = imgs.resolve("busybox", &s(&["sh", "-c", "true"]), &[]);
        assert!(p.is_ok_and(|p| p.path.ends_with("sh") && p.args == s(&["-c", "true"])));
        assert!(imgs.resolve("busybox", &[], &[]).is_err());
        assert!(
            images(&dir, false)
                .resolve("busybox", &s(&["sh"]), &[])
                .is_err()
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
