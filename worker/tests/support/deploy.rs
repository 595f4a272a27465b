//! Starts `moe-worker local` as a real deployment (separate processes on loopback) and
//! stops it, checking that no process is left behind.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_moe-worker");

pub struct Deployment {
    pub child: Child,
    /// `http://127.0.0.1:PORT` (the first gateway)
    pub base: String,
    /// Every gateway's base URL (`--gateways N`), the first one first.
    pub bases: Vec<String>,
    /// Every process's `/metrics` URL, by process name (`local-stage-0`, `local-gateway`, ...).
    pub metrics: Vec<(String, String)>,
    marker: String,
}

fn marker() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

impl Deployment {
    pub fn start(model: &str, stages: usize, shards: usize, extra: &[&str]) -> Self {
        Self::start_with_env(model, stages, shards, extra, &[])
    }

    pub fn start_with_env(
        model: &str,
        stages: usize,
        shards: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let (stages, shards) = (stages.to_string(), shards.to_string());
        let mut args = vec![
            "--model",
            model,
            "--stages",
            &stages,
            "--expert-shards",
            &shards,
        ];
        args.extend(extra);
        Self::launch(model, &args, env)
    }

    /// `moe-worker local -f MANIFEST`.
    pub fn start_manifest(manifest: &std::path::Path, extra: &[&str]) -> Self {
        let path = manifest.to_str().expect("utf-8 path");
        let mut args = vec!["-f", path];
        args.extend(extra);
        Self::launch(path, &args, &[])
    }

    fn launch(what: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let marker = marker();
        let mut cmd = Command::new(BIN);
        cmd.args(["--threads", "1", "local", "--http-port", "0"])
            .args(args)
            .env("MOE_TEST_MARKER", &marker)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start moe-worker local");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // The endpoint lines come together, after every gateway is ready.
            let mut bases = Vec::new();
            let mut metrics = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(all) = line.strip_prefix("metrics: ") {
                    metrics = all
                        .split_whitespace()
                        .filter_map(|t| t.split_once('='))
                        .map(|(n, u)| (n.to_string(), u.to_string()))
                        .collect();
                } else if let Some(ep) = line.strip_prefix("OpenAI endpoint: ") {
                    bases = vec![ep.trim_end_matches("/v1").to_string()];
                } else if let Some(all) = line.strip_prefix("gateway endpoints: ") {
                    bases = all
                        .split_whitespace()
                        .map(|e| e.trim_end_matches("/v1").to_string())
                        .collect();
                } else if line.starts_with("try: ") && !bases.is_empty() {
                    let _ = tx.send((std::mem::take(&mut bases), std::mem::take(&mut metrics)));
                }
            }
        });
        let (bases, metrics) = match rx.recv_timeout(Duration::from_secs(240)) {
            Ok(b) => b,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                panic!("deployment of {what} did not become ready ({status:?})");
            }
        };
        Self {
            child,
            base: bases[0].clone(),
            bases,
            metrics,
            marker,
        }
    }

    /// Pids of this deployment's processes (the launcher's children), with their command lines.
    pub fn processes(&self) -> Vec<(i32, String)> {
        let needle = format!("MOE_TEST_MARKER={}", self.marker);
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(env) = std::fs::read(e.path().join("environ")) else {
                continue;
            };
            if !env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) {
                continue;
            }
            if pid == self.child.id() as i32 {
                continue;
            }
            // Zombies have no command line.
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if cmd.is_empty() {
                continue;
            }
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            out.push((pid, cmd));
        }
        out
    }

    /// The pid of the role whose command line contains `role` (e.g. ` expert ` with
    /// `--index 1`).
    pub fn pid_of(&self, role: &str, index: usize) -> i32 {
        self.processes()
            .into_iter()
            .find(|(_, c)| {
                c.contains(&format!(" {role} ")) && c.contains(&format!("--index {index} "))
            })
            .map(|(p, _)| p)
            .unwrap_or_else(|| panic!("no {role} {index} in {:?}", self.processes()))
    }

    /// The pid of expert shard `index`'s replica `replica`.
    pub fn pid_of_replica(&self, index: usize, replica: usize) -> i32 {
        self.processes()
            .into_iter()
            .find(|(_, c)| {
                c.contains(" expert ")
                    && c.contains(&format!("--index {index} "))
                    && c.contains(&format!("--replica {replica} "))
            })
            .map(|(p, _)| p)
            .unwrap_or_else(|| {
                panic!(
                    "no expert {index} replica {replica} in {:?}",
                    self.processes()
                )
            })
    }

    /// SIGTERM to the launcher; returns once it and every child are gone.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let pid = self.child.id() as i32;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("launcher did not stop within 30s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.processes().is_empty() {
            if Instant::now() > deadline {
                let left = self.processes();
                for (p, _) in &left {
                    let _ = Command::new("kill")
                        .args(["-KILL", &p.to_string()])
                        .status();
                }
                panic!("processes left behind after the launcher stopped: {left:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            // Children exit when the launcher's pipes close.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !self.processes().is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Greedy tokens from single-process `generate` (the reference the deployment must match).
pub fn generate_ids(model: &str, prompt_ids: &[u32], max_new: usize) -> Vec<u32> {
    let ids: Vec<String> = prompt_ids.iter().map(|t| t.to_string()).collect();
    let out = Command::new(BIN)
        .args([
            "--threads",
            "1",
            "generate",
            "--model",
            model,
            "--json",
            "--ignore-eos",
        ])
        .args([
            "--prompt-ids",
            &ids.join(","),
            "--max-new-tokens",
            &max_new.to_string(),
        ])
        .output()
        .expect("run generate");
    assert!(
        out.status.success(),
        "generate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("generate json");
    v["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|t| t.as_u64().expect("id") as u32)
        .collect()
}
