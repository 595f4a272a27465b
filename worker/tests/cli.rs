//! The `moe-worker` binary: output contract of `generate --json`, and one-line errors that
//! name the file, tensor or field at fault (never a panic or backtrace).

use std::path::Path;
use std::process::{Command, Output};

fn worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moe-worker"))
        .args(args)
        .output()
        .expect("run moe-worker")
}

/// Runs `generate ARGS --json`, asserts success, and returns the printed object.
fn generate_json(args: &[&str]) -> serde_json::Value {
    let out = worker(&[&["generate"], args, &["--json"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn golden(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/tests/golden")
        .join(name)
        .display()
        .to_string()
}

/// Asserts a failure with a single stderr line containing every needle.
fn fails_naming(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected, got:\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "stderr should name `{n}`: {err}");
    }
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn generate_json_prints_generated_ids_and_text() {
    let dir = golden("tiny-gqa-top2");
    let exp: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&dir).join("expected.json")).expect("read"),
    )
    .expect("json");
    let case = exp["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["prompt"].is_string())
        .expect("text case");
    let want: Vec<u64> = case["greedy_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_u64().expect("id"))
        .collect();
    let v = generate_json(&[
        "--model",
        &dir,
        "--prompt",
        case["prompt"].as_str().expect("prompt"),
        "--max-new-tokens",
        &want.len().to_string(),
        "--ignore-eos",
    ]);
    let got: Vec<u64> = v["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|t| t.as_u64().expect("id"))
        .collect();
    assert_eq!(got, want, "generated ids only, prompt excluded");
    assert!(v["text"].is_string());
    assert_eq!(v["prompt_ids"], case["prompt_ids"]);
}

#[test]
fn seeded_sampling_is_reproducible_from_the_cli() {
    let run = |seed: &str| {
        generate_json(&[
            "--model",
            "synthetic:tiny",
            "--prompt-ids",
            "5,6,7",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0.9",
            "--top-p",
            "0.95",
            "--top-k",
            "50",
            "--seed",
            seed,
            "--ignore-eos",
        ])["token_ids"]
            .clone()
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
}

#[test]
fn errors_are_one_line_and_name_what_is_wrong() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let t = tmp.path().display().to_string();

    // Missing folder / file.
    fails_naming(
        &worker(&[
            "generate",
            "--model",
            "/nonexistent/model",
            "--prompt-ids",
            "1",
        ]),
        &["/nonexistent/model"],
    );

    // Unknown model_type.
    let cfg = std::fs::read_to_string(Path::new(&golden("tiny-gqa-top2")).join("config.json"))
        .expect("config");
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("\"mixtral\"", "\"llama\""),
    )
    .expect("write");
    fails_naming(
        &worker(&["generate", "--model", &t, "--prompt-ids", "1"]),
        &["model_type", "llama"],
    );

    // Tensor shape mismatch: the config says hidden 64, the checkpoint disagrees.
    std::fs::write(
        tmp.path().join("config.json"),
        cfg.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .expect("write");
    std::fs::copy(
        Path::new(&golden("tiny-gqa-top2")).join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .expect("copy");
    fails_naming(
        &worker(&["generate", "--model", &t, "--prompt-ids", "1"]),
        &[
            "model.layers.0.block_sparse_moe.experts.0.w1.weight",
            "shape",
        ],
    );

    // Token id outside the vocabulary.
    fails_naming(
        &worker(&[
            "generate",
            "--model",
            &golden("tiny-gqa-top2"),
            "--prompt-ids",
            "1,99999",
        ]),
        &["99999", "vocab"],
    );

    // Bad flags and values.
    fails_naming(
        &worker(&[
            "generate",
            "--model",
            "synthetic:tiny",
            "--prompt-ids",
            "1",
            "--bogus",
        ]),
        &["--bogus"],
    );
    fails_naming(
        &worker(&[
            "generate",
            "--model",
            "synthetic:tiny",
            "--prompt-ids",
            "1,x",
        ]),
        &["prompt-ids"],
    );
    fails_naming(
        &worker(&[
            "generate",
            "--model",
            "synthetic:tiny",
            "--prompt-ids",
            "1",
            "--top-p",
            "0",
        ]),
        &["top-p"],
    );
    fails_naming(
        &worker(&["generate", "--model", "synthetic:nope", "--prompt-ids", "1"]),
        &["nope", "preset"],
    );

    // A corrupt safetensors file names the file.
    std::fs::write(tmp.path().join("config.json"), &cfg).expect("write");
    std::fs::write(
        tmp.path().join("model.safetensors"),
        b"not a safetensors file",
    )
    .expect("write");
    fails_naming(
        &worker(&["generate", "--model", &t, "--prompt-ids", "1"]),
        &["model.safetensors"],
    );
}

#[test]
fn export_writes_a_checkpoint_the_engine_loads_back() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("tiny");
    let o = worker(&[
        "export",
        "--preset",
        "tiny",
        "--seed",
        "5",
        "--out",
        &out.display().to_string(),
        "--shard-bytes",
        "400000",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.join("model.safetensors.index.json").exists() && out.join("tokenizer.json").exists()
    );
    let ids = |model: &str| {
        let args = [
            "--model",
            model,
            "--prompt",
            "hi there",
            "--max-new-tokens",
            "6",
            "--ignore-eos",
        ];
        generate_json(&args)["token_ids"].clone()
    };
    let (from_dir, from_synth) = (ids(&out.display().to_string()), ids("synthetic:tiny:5"));
    assert_eq!(
        from_dir, from_synth,
        "exported checkpoint == in-memory synthetic model"
    );
}

/// `inspect` prints the architecture the operator plans from (and writes it to the
/// termination log), or one line naming the missing or unreadable file.
#[test]
fn inspect_reports_the_architecture_or_names_what_is_missing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let log = tmp.path().join("termination-log");
    let dir = golden("deepseek-v3");
    let out = worker(&[
        "inspect",
        "--model",
        &dir,
        "--termination-log",
        &log.to_string_lossy(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let a = &v["architecture"];
    assert_eq!(a["numLayers"], 3);
    assert_eq!(a["denseLayers"], serde_json::json!([0]));
    assert_eq!(a["latentAttention"]["kvLoraRank"], 32);
    assert_eq!(v["modelType"], "deepseek_v3");
    let logged: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&log).expect("log")).expect("json");
    assert_eq!(logged, v);

    // A shard missing from the folder is named before any worker would trip on it.
    let copy = tmp.path().join("ckpt");
    std::fs::create_dir(&copy).expect("mkdir");
    for e in std::fs::read_dir(&dir).expect("dir") {
        let p = e.expect("entry").path();
        if !p
            .to_string_lossy()
            .ends_with("model-00002-of-00003.safetensors")
        {
            std::fs::copy(&p, copy.join(p.file_name().expect("name"))).expect("copy");
        }
    }
    let out = worker(&[
        "inspect",
        "--model",
        &copy.to_string_lossy(),
        "--termination-log",
        &log.to_string_lossy(),
    ]);
    fails_naming(&out, &["model-00002-of-00003.safetensors"]);
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(
        logged.contains("model-00002-of-00003.safetensors"),
        "{logged}"
    );

    let out = worker(&["inspect", "--model", &tmp.path().to_string_lossy()]);
    fails_naming(&out, &["config.json"]);
}
