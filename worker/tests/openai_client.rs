//! The gateway, checked with the official `openai` Python client (pinned in
//! scripts/requirements-openai.txt; installed once into a virtual environment cached outside
//! the clone).

#[path = "support/deploy.rs"]
mod deploy;

use std::path::{Path, PathBuf};
use std::process::Command;

use deploy::{Deployment, generate_ids};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The cached virtual environment's python, created when missing or out of date.
fn python() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("HOME or XDG_CACHE_HOME");
    let venv = cache.join("moe-serve/venv-openai");
    let py = venv.join("bin/python");
    let reqs = repo().join("scripts/requirements-openai.txt");
    let pinned = std::fs::read_to_string(&reqs).expect("requirements");
    let version = pinned
        .lines()
        .find_map(|l| l.trim().strip_prefix("openai=="))
        .expect("openai pin");
    let check = format!("import openai, sys; sys.exit(openai.__version__ != '{version}')");
    let ok = Command::new(&py)
        .args(["-c", &check])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv");
        assert!(status.success(), "creating {}", venv.display());
        let status = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&reqs)
            .status()
            .expect("pip");
        assert!(status.success(), "pip install -r {}", reqs.display());
    }
    py
}

#[test]
fn official_openai_client_works_against_the_gateway() {
    let py = python();
    let model = "synthetic:tiny";
    let d = Deployment::start(model, 2, 2, &[]);
    // The prompt's ids, as the gateway tokenizes it (BOS first).
    let prompt = "The capital of France is";
    let out = Command::new(deploy::BIN)
        .args([
            "generate",
            "--model",
            model,
            "--json",
            "--ignore-eos",
            "--max-new-tokens",
            "8",
        ])
        .args(["--prompt", prompt])
        .output()
        .expect("generate");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let prompt_ids: Vec<u32> = v["prompt_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect();
    let expected = serde_json::json!({
        "model": "synthetic:tiny:0",
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "greedy_ids": generate_ids(model, &prompt_ids, 8),
    });
    let out = Command::new(py)
        .arg(repo().join("scripts/openai_check.py"))
        .arg(&d.base)
        .arg(expected.to_string())
        .output()
        .expect("run openai_check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "openai_check.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("openai client: ok"), "{stdout}");
    d.stop();
}
