//! The deployment as separate processes on loopback (`moe-worker local`): the same greedy
//! tokens as single-process generation, the OpenAI HTTP contract, bad input, and faults.

#[path = "support/deploy.rs"]
mod deploy;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deploy::{Deployment, generate_ids};
use serde_json::{Value, json};

fn golden_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/golden");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("golden folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("expected.json").exists())
        .collect();
    dirs.sort();
    dirs
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an id array: {v}"))
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(&body)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .expect("http");
    let status = r.status().as_u16();
    let v = r.json().await.unwrap_or(Value::Null);
    (status, v)
}

async fn models(base: &str) -> Value {
    reqwest::get(format!("{base}/v1/models"))
        .await
        .expect("models")
        .json()
        .await
        .expect("json")
}

async fn complete_ids(base: &str, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let (status, v) = post(
        base,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], max_tokens);
    ids(&v["choices"][0]["token_ids"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_checkpoints_give_the_same_tokens_distributed() {
    let dirs = golden_dirs();
    assert!(dirs.len() >= 2);
    for dir in dirs {
        let model = dir.to_str().expect("utf-8 path").to_string();
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("expected.json")).expect("read"),
        )
        .expect("json");
        let layers = expected["config"]["num_hidden_layers"]
            .as_u64()
            .unwrap_or(2) as usize;
        let d = Deployment::start(&model, layers.min(3), 2, &[]);
        for case in expected["cases"].as_array().expect("cases") {
            let prompt = ids(&case["prompt_ids"]);
            let want = ids(&case["greedy_ids"]);
            let got = complete_ids(&d.base, &prompt, want.len()).await;
            assert_eq!(got, want, "{model}: {} vs transformers", case["name"]);
            assert_eq!(
                got,
                generate_ids(&model, &prompt, want.len()),
                "{model}: vs generate"
            );
        }
        d.stop();
    }
}

/// A MoEDeployment of the golden checkpoint in `dir`, read from this machine's folder.
fn golden_manifest(dir: &Path, extra_spec: &str) -> String {
    format!(
        "apiVersion: serving.moe.dev/v1alpha1\nkind: MoEDeployment\nmetadata:\n  name: golden\n\
         spec:\n  replicas: 2\n  model:\n    source:\n      hostPath: {{path: '{}'}}\n    \
         architecture: {{numLayers: 2, numExperts: 4, topK: 2, hiddenSize: 64, \
         intermediateSize: 128, numAttentionHeads: 4, numKeyValueHeads: 2, vocabSize: 384, \
         maxPositionEmbeddings: 256}}\n  parallelism: {{pipeline: 2, expert: 2}}\n  \
         experts: {{minReplicas: 2, maxReplicas: 3}}\n  serving: {{maxConcurrentSequences: 6}}\n\
         {extra_spec}",
        dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_runs_locally_with_the_workloads_the_operator_would_create() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/golden/tiny-gqa-top2");
    let tmp = tempfile::tempdir().expect("tmp");
    let manifest = tmp.path().join("golden.yaml");
    std::fs::write(&manifest, golden_manifest(&dir, "")).expect("write");
    let d = Deployment::start_manifest(&manifest, &[]);
    // 2 expert shards × minReplicas 2, 2 stages, replicas 2 gateways.
    let procs = d.processes();
    let count = |role: &str| procs.iter().filter(|(_, c)| c.contains(role)).count();
    assert_eq!(
        (count(" expert "), count(" stage "), count(" gateway ")),
        (4, 2, 2),
        "{procs:?}"
    );
    // Each gateway admits its share of the stages' 6 sequences.
    assert_eq!(
        procs
            .iter()
            .filter(|(_, c)| c.contains(" gateway ") && c.contains("--max-sequences 3 "))
            .count(),
        2,
        "{procs:?}"
    );
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).expect("read"))
            .expect("json");
    assert_eq!(d.bases.len(), 2);
    for base in &d.bases {
        let m = models(base).await;
        assert_eq!(m["data"][0]["id"], "golden", "{m}");
        for case in expected["cases"].as_array().expect("cases") {
            let prompt = ids(&case["prompt_ids"]);
            let want = ids(&case["greedy_ids"]);
            let got = complete_ids(base, &prompt, want.len()).await;
            assert_eq!(got, want, "{base}: {} vs transformers", case["name"]);
        }
    }
    d.stop();
}

#[test]
fn a_manifest_that_cannot_run_here_is_refused_naming_the_field() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/golden/tiny-gqa-top2");
    let tmp = tempfile::tempdir().expect("tmp");
    let run = |yaml: String, extra: &[&str]| {
        let manifest = tmp.path().join("m.yaml");
        std::fs::write(&manifest, yaml).expect("write");
        let out = std::process::Command::new(deploy::BIN)
            .args(["local", "--http-port", "0", "-f"])
            .arg(&manifest)
            .args(extra)
            .output()
            .expect("run");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let golden = golden_manifest(&dir, "");
    // The checkpoint has 2 layers; a plan for 3 would load layers it does not have.
    let e = run(golden.replace("numLayers: 2", "numLayers: 3"), &[]);
    assert!(
        e.contains("spec.model.architecture.numLayers") && e.contains("num_hidden_layers = 2"),
        "{e}"
    );
    let pvc = golden.replace(
        &format!("hostPath: {{path: '{}'}}", dir.display()),
        "pvc: {claimName: weights}",
    );
    let e = run(pvc.clone(), &[]);
    assert!(
        e.contains("spec.model.source") && e.contains("--model"),
        "{e}"
    );
    // With the checkpoint given, the same manifest plans (and is only printed here).
    let out = std::process::Command::new(deploy::BIN)
        .args(["local", "--dry-run", "--model"])
        .arg(&dir)
        .arg("-f")
        .arg(tmp.path().join("m.yaml"))
        .output()
        .expect("dry run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("golden-")).count(),
        8,
        "{text}"
    );
    // A checkpoint folder plans from its config.json, as `moe-operator plan -f DIR` does.
    let out = std::process::Command::new(deploy::BIN)
        .args(["local", "--dry-run", "-f"])
        .arg(&dir)
        .output()
        .expect("dry run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("tiny-gqa-top2: 1 stages"), "{text}");
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("tiny-gqa-top2-"))
            .count(),
        3,
        "{text}"
    );
    let e = run(golden.replace("expert: 2", "expert: 9"), &[]);
    assert!(e.contains("spec.parallelism.expert"), "{e}");
    let e = run(golden.replace("name: golden", "name: Golden"), &[]);
    assert!(e.contains("metadata.name"), "{e}");
    let e = run(golden.clone(), &["--stages", "2"]);
    assert!(e.contains("--stages") && e.contains("--file"), "{e}");
    let e = run("apiVersion: v1\nkind: Service\n".into(), &[]);
    assert!(e.contains("no MoEDeployment"), "{e}");
}

/// Deterministic pseudo-random token ids.
fn prompt(len: usize, seed: u64, vocab: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab) as u32
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpt4_mini_over_4_stages_and_4_expert_shards_with_concurrent_requests() {
    let model = "synthetic:gpt4-mini";
    let d = Deployment::start(model, 4, 4, &["--max-sequences", "8"]);
    // Different lengths, arriving at different times, sharing the running batch.
    let work: Vec<(Vec<u32>, usize)> = [(3, 6), (17, 10), (40, 4), (1, 8), (64, 5), (9, 12)]
        .iter()
        .enumerate()
        .map(|(i, &(len, new))| (prompt(len, i as u64 + 1, 100_000), new))
        .collect();
    let mut tasks = Vec::new();
    for (i, (p, n)) in work.iter().cloned().enumerate() {
        let base = d.base.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(40 * i as u64)).await;
            complete_ids(&base, &p, n).await
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.expect("task"));
    }
    for ((p, n), g) in work.iter().zip(&got) {
        assert_eq!(
            g,
            &generate_ids(model, p, *n),
            "prompt of {} tokens",
            p.len()
        );
    }
    // The model list, readiness, and metrics that count what just ran.
    let models = models(&d.base).await;
    assert_eq!(models["data"][0]["id"], "synthetic:gpt4-mini:0");
    let ready = reqwest::get(format!("{}/readyz", d.base))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    let metrics = reqwest::get(format!("{}/metrics", d.base))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let total: usize = work.iter().map(|w| w.1).sum();
    assert!(
        metrics.contains(&format!("moe_gateway_generated_tokens_total {total}")),
        "{metrics}"
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_naming_the_field() {
    let d = Deployment::start("synthetic:tiny", 1, 1, &[]);
    let cases = [
        (json!({"max_tokens": 4}), "prompt"),
        (json!({"prompt": "hi", "max_tokens": "a"}), "max_tokens"),
        (json!({"prompt": "hi", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "hi", "max_tokens": 100000}), "max_tokens"),
        (json!({"prompt": "hi", "temperature": -1}), "temperature"),
        (json!({"prompt": "hi", "top_p": 0}), "top_p"),
        (json!({"prompt": [1, 2, 999999]}), "prompt"),
        (json!({"prompt": [1, -2]}), "prompt[1]"),
        (json!({"prompt": {"a": 1}}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": "hi", "n": 2}), "n"),
        (json!({"prompt": "hi", "stop": ["", "x"]}), "stop"),
        (json!({"prompt": "hi", "stream": "yes"}), "stream"),
    ];
    for (body, field) in cases {
        let (status, v) = post(&d.base, "/v1/completions", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {v}");
        assert_eq!(v["error"]["param"], field, "{body} -> {v}");
        let msg = v["error"]["message"].as_str().expect("message");
        assert!(msg.starts_with(field), "{body} -> {msg}");
    }
    let chat = [
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
    ];
    for (body, field) in chat {
        let (status, v) = post(&d.base, "/v1/chat/completions", body.clone()).await;
        assert_eq!(status, 400, "{body} -> {v}");
        assert_eq!(v["error"]["param"], field, "{body} -> {v}");
    }
    let (status, v) = post(
        &d.base,
        "/v1/completions",
        json!({"model": "gpt-5", "prompt": "x"}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", d.base))
        .body("{not json")
        .send()
        .await
        .expect("http");
    assert_eq!(r.status(), 400);
    // The gateway still serves.
    let (status, v) = post(
        &d.base,
        "/v1/completions",
        json!({"prompt": "ok", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    let d = Deployment::start(
        "synthetic:tiny",
        1,
        1,
        &[
            "--max-sequences",
            "1",
            "--max-queue",
            "1",
            "--micro-batches",
            "1",
        ],
    );
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let base = d.base.clone();
        tasks.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!("{base}/v1/completions"))
                .json(&json!({"prompt": [5, 6, 7], "max_tokens": 1000, "ignore_eos": true}))
                .send()
                .await
                .expect("http");
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or("").to_string());
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, retry, body)
        }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for t in tasks {
        let (status, retry, body) = t.await.expect("task");
        match status {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert_eq!(retry.as_deref(), Some("1"));
                assert_eq!(body["error"]["type"], "rate_limit_exceeded", "{body}");
            }
            s => panic!("unexpected {s}: {body}"),
        }
    }
    assert!(ok >= 2 && limited >= 1, "ok {ok}, 429 {limited}");
    d.stop();
}

/// Reads a streamed completion until it ends; returns (tokens, error message if any).
/// Requests of different lengths spread over every gateway at once; each answer must equal
/// single-process generation (two gateways used to overwrite each other's KV caches).
async fn through_every_gateway(model: &str, bases: &[String], vocab: u64) {
    let work: Vec<(Vec<u32>, usize)> = [(3, 6), (17, 9), (1, 7), (30, 4), (9, 11), (5, 8)]
        .iter()
        .enumerate()
        .map(|(i, &(len, new))| (prompt(len, i as u64 + 11, vocab), new))
        .collect();
    let mut tasks = Vec::new();
    for (i, (p, n)) in work.iter().cloned().enumerate() {
        let base = bases[i % bases.len()].clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(25 * i as u64)).await;
            complete_ids(&base, &p, n).await
        }));
    }
    for ((p, n), t) in work.iter().zip(tasks) {
        let got = t.await.expect("task");
        assert_eq!(
            got,
            generate_ids(model, p, *n),
            "prompt of {} tokens",
            p.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_and_three_gateways_share_one_pipeline() {
    let model = "synthetic:tiny";
    for gateways in ["2", "3"] {
        let d = Deployment::start(
            model,
            2,
            2,
            &["--gateways", gateways, "--max-sequences", "12"],
        );
        assert_eq!(d.bases.len(), gateways.parse::<usize>().expect("n"));
        through_every_gateway(model, &d.bases, 256).await;
        if gateways == "3" {
            // A gateway killed mid-stream: its own request ends, the others keep serving
            // exactly, and the launcher brings it back.
            let resp = reqwest::Client::new()
                .post(format!("{}/v1/completions", d.bases[1]))
                .json(&json!({"prompt": [3, 4, 5], "max_tokens": 400, "ignore_eos": true, "stream": true}))
                .send()
                .await
                .expect("http");
            assert_eq!(resp.status(), 200);
            let reader = tokio::spawn(stream_until_end(resp));
            tokio::time::sleep(Duration::from_millis(300)).await;
            let pid = d.pid_of("gateway", 1);
            std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .expect("kill");
            let others = [d.bases[0].clone(), d.bases[2].clone()];
            through_every_gateway(model, &others, 256).await;
            let (_, err) = tokio::time::timeout(Duration::from_secs(20), reader)
                .await
                .expect("the killed gateway's stream must end")
                .expect("task");
            assert!(
                err.is_some(),
                "the stream of a killed gateway cannot complete"
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            while d
                .processes()
                .iter()
                .all(|(p, c)| *p == pid || !c.contains("--index 1 ") || !c.contains(" gateway "))
            {
                assert!(Instant::now() < deadline, "the gateway was not restarted");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while reqwest::get(format!("{}/readyz", d.bases[1]))
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
                != 200
            {
                assert!(
                    Instant::now() < deadline,
                    "the restarted gateway never became ready"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            through_every_gateway(model, &d.bases, 256).await;
        }
        d.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_text_cannot_inject_special_tokens() {
    // gpt4-mini speaks cl100k_base, where `<|endoftext|>` is token 100257.
    let d = Deployment::start("synthetic:gpt4-mini", 1, 0, &[]);
    let usage = async |path: &str, body: Value| -> u64 {
        let (status, v) = post(&d.base, path, body).await;
        assert_eq!(status, 200, "{v}");
        v["usage"]["prompt_tokens"].as_u64().expect("usage")
    };
    let complete = |p: &str| json!({"prompt": p, "max_tokens": 1, "temperature": 0});
    let with = usage("/v1/completions", complete("a<|endoftext|>b")).await;
    let without = usage("/v1/completions", complete("ab")).await;
    // As one special token the marker would add 1; as text it is several ordinary pieces.
    assert!(
        with >= without + 3,
        "{with} vs {without}: the marker became a special token"
    );
    let chat = |c: &str| json!({"messages": [{"role": "user", "content": c}], "max_tokens": 1});
    let with = usage("/v1/chat/completions", chat("<|endoftext|>")).await;
    let without = usage("/v1/chat/completions", chat("")).await;
    assert!(with >= without + 3, "{with} vs {without}");
    d.stop();
}

async fn stream_until_end(resp: reqwest::Response) -> (usize, Option<String>) {
    use futures::StreamExt;
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut tokens = 0;
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            return (tokens, Some("connection closed".into()));
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(at) = buf.find("\n\n") {
            let event: String = buf.drain(..at + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                return (tokens, None);
            }
            let v: Value = serde_json::from_str(data).expect("event json");
            if let Some(e) = v.get("error") {
                return (
                    tokens,
                    Some(e["message"].as_str().unwrap_or("").to_string()),
                );
            }
            tokens += v["choices"][0]["token_ids"].as_array().map_or(0, Vec::len);
        }
    }
    (tokens, Some("stream ended without [DONE]".into()))
}

async fn kill_mid_request(d: &Deployment, role: &str, index: usize) {
    let room = models(&d.base).await["data"][0]["max_model_len"]
        .as_u64()
        .expect("max_model_len")
        - 3;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", d.base))
        .json(&json!({"prompt": [3, 4, 5], "max_tokens": room, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .expect("http");
    assert_eq!(resp.status(), 200);
    let reader = tokio::spawn(stream_until_end(resp));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = d.pid_of(role, index);
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    let killed = Instant::now();
    let (tokens, err) = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the in-flight request must end within its deadline")
        .expect("task");
    let err =
        err.unwrap_or_else(|| panic!("request survived the {role} being killed ({tokens} tokens)"));
    assert!(tokens > 0, "the request was running before the kill");
    assert!(!err.is_empty());
    assert!(killed.elapsed() < Duration::from_secs(20));
    // The gateway stays up, and new requests succeed once the launcher restarted the process.
    let deadline = Instant::now() + Duration::from_secs(60);
    let want = generate_ids("synthetic:tiny", &[9, 8, 7], 6);
    loop {
        let (status, v) = post(
            &d.base,
            "/v1/completions",
            json!({"prompt": [9, 8, 7], "max_tokens": 6, "temperature": 0, "ignore_eos": true}),
        )
        .await;
        if status == 200 {
            assert_eq!(ids(&v["choices"][0]["token_ids"]), want);
            break;
        }
        assert!(matches!(status, 503 | 504), "{status}: {v}");
        assert!(
            Instant::now() < deadline,
            "no recovery after killing the {role}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_ne!(d.pid_of(role, index), pid, "the {role} was restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_expert_or_a_stage_fails_in_flight_requests_cleanly_and_recovers() {
    let d = Deployment::start("synthetic:tiny", 2, 2, &["--step-timeout-ms", "5000"]);
    kill_mid_request(&d, "expert", 1).await;
    kill_mid_request(&d, "stage", 1).await;
    kill_mid_request(&d, "stage", 0).await;
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_a_killed_expert_does_not_fail_the_request() {
    let d = Deployment::start("synthetic:tiny", 2, 2, &["--expert-replicas", "2"]);
    let prompt = [4u32, 5, 6, 7];
    let n = 1000;
    let want = generate_ids("synthetic:tiny", &prompt, n);
    let base = d.base.clone();
    let request = tokio::spawn(async move { complete_ids(&base, &prompt, n).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = d.pid_of_replica(1, 0);
    assert!(!request.is_finished(), "the kill must land mid-request");
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    let got = tokio::time::timeout(Duration::from_secs(60), request)
        .await
        .expect("the request must finish")
        .expect("task");
    assert_eq!(
        got, want,
        "the other replica took over with the same result"
    );
    d.stop();
}

/// Processes whose environment carries `MOE_TEST_MARKER=marker`.
fn marked(marker: &str) -> Vec<i32> {
    let needle = format!("MOE_TEST_MARKER={marker}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let alive = std::fs::read(e.path().join("cmdline")).is_ok_and(|c| !c.is_empty());
        if alive && env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

fn wait_gone(marker: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !marked(marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{what}: processes left behind: {:?}",
            marked(marker)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_failed_startup_stops_every_child_and_names_the_culprit() {
    // The gateway's port is taken: experts and stages start, the gateway cannot.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let marker = format!("startup-{}", std::process::id());
    let out = std::process::Command::new(deploy::BIN)
        .args([
            "local",
            "--model",
            "synthetic:tiny",
            "--stages",
            "2",
            "--expert-shards",
            "2",
        ])
        .args(["--http-port", &port.to_string()])
        .env("MOE_TEST_MARKER", &marker)
        .output()
        .expect("run local");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("gateway"), "{stderr}");
    assert!(stderr.contains(&port.to_string()), "{stderr}");
    wait_gone(&marker, "failed startup");
}

#[test]
fn children_exit_when_the_launcher_is_killed() {
    let d = Deployment::start("synthetic:tiny", 2, 2, &[]);
    assert_eq!(d.processes().len(), 5, "{:?}", d.processes());
    let marker = d
        .processes()
        .first()
        .and_then(|(pid, _)| std::fs::read(format!("/proc/{pid}/environ")).ok())
        .and_then(|env| {
            env.split(|&b| b == 0).find_map(|kv| {
                kv.strip_prefix(b"MOE_TEST_MARKER=")
                    .map(|m| String::from_utf8_lossy(m).to_string())
            })
        })
        .expect("marker");
    // SIGKILL: the launcher cannot clean up; its children notice their stdin pipe closing.
    let mut d = d;
    d.child.kill().expect("kill launcher");
    d.child.wait().expect("wait");
    wait_gone(&marker, "launcher killed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_guards_the_openai_routes_and_stats_but_not_health_or_metrics() {
    let d = Deployment::start_with_env("synthetic:tiny", 1, 1, &[], &[("MOE_API_KEY", "sk-e2e")]);
    let http = reqwest::Client::new();
    let body = json!({"prompt": [5, 6, 7], "max_tokens": 2});
    let url = format!("{}/v1/completions", d.base);
    let r = http.post(&url).json(&body).send().await.expect("http");
    assert_eq!(r.status().as_u16(), 401);
    let err: Value = r.json().await.expect("json");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("Missing API key"),
        "{err}"
    );
    let r = http
        .post(&url)
        .bearer_auth("sk-wrong")
        .json(&body)
        .send()
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 401);
    let r = http
        .post(&url)
        .bearer_auth("sk-e2e")
        .json(&body)
        .send()
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 200);
    let r = http
        .get(format!("{}/v1/models", d.base))
        .send()
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 401);
    // The deployment's statistics are the key holder's too.
    let r = http
        .get(format!("{}/v1/stats", d.base))
        .send()
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 401);
    let r = http
        .get(format!("{}/v1/stats", d.base))
        .bearer_auth("sk-e2e")
        .send()
        .await
        .expect("http");
    assert_eq!(r.status().as_u16(), 200);
    for open in ["/healthz", "/readyz", "/metrics"] {
        let r = http
            .get(format!("{}{open}", d.base))
            .send()
            .await
            .expect("http");
        assert_eq!(r.status().as_u16(), 200, "{open}");
    }
    d.stop();
}

async fn stats(base: &str) -> Value {
    let r = reqwest::get(format!("{base}/v1/stats"))
        .await
        .expect("stats");
    assert_eq!(r.status().as_u16(), 200);
    r.json().await.expect("json")
}

fn counter(v: &Value, path: &[&str]) -> f64 {
    let mut x = &v["gateway"];
    for p in path {
        x = &x[*p];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("gateway.{} is not a number in {v}", path.join(".")))
}

/// What the operator measures a deployment by (`status.performance.measured`): each gateway's
/// `/v1/stats` counts the tokens it generated and the time to first token and per output token
/// (counts and sums of seconds), moving by exactly what its completed requests did; another
/// gateway's requests do not move them; a restarted gateway reports a new instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_tokens_and_latencies_as_requests_complete() {
    let d = Deployment::start("synthetic:tiny", 1, 1, &["--gateways", "2"]);
    let (a, b) = (d.bases[0].clone(), d.bases[1].clone());
    let before = stats(&a).await;
    let other_before = stats(&b).await;
    let instance = before["gateway"]["instance"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(!instance.is_empty(), "{before}");
    assert_ne!(
        other_before["gateway"]["instance"].as_str(),
        Some(instance.as_str())
    );

    // Three requests through gateway 0: 4 prompt tokens and 6 generated tokens each.
    for i in 0..3u32 {
        let (status, v) = post(
            &a,
            "/v1/completions",
            json!({"prompt": [3, 4, 5, 6 + i], "max_tokens": 6, "ignore_eos": true}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 6);
    }
    let after = stats(&a).await;
    let delta = |path: &[&str]| counter(&after, path) - counter(&before, path);
    assert_eq!(delta(&["generatedTokens"]), 18.0, "{before}\n{after}");
    assert_eq!(delta(&["promptTokens"]), 12.0, "{after}");
    assert_eq!(delta(&["sequencesAdmitted"]), 3.0, "{after}");
    // One first token per sequence; the other five tokens each have a time since the last.
    assert_eq!(delta(&["timeToFirstToken", "count"]), 3.0, "{after}");
    assert_eq!(delta(&["timePerOutputToken", "count"]), 15.0, "{after}");
    let ttft = delta(&["timeToFirstToken", "sumSeconds"]) / 3.0;
    let tpot = delta(&["timePerOutputToken", "sumSeconds"]) / 15.0;
    assert!(ttft > 0.0 && ttft < 30.0, "mean TTFT {ttft} s: {after}");
    assert!(tpot > 0.0 && tpot < 30.0, "mean TPOT {tpot} s: {after}");
    assert_eq!(
        after["gateway"]["instance"].as_str(),
        Some(instance.as_str())
    );

    // The same counters as the gateway's Prometheus metrics.
    let text = reqwest::get(format!("{a}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let generated = format!(
        "moe_gateway_generated_tokens_total {}",
        counter(&after, &["generatedTokens"])
    );
    assert!(text.contains(&generated), "no `{generated}` in\n{text}");

    // Gateway 1 served none of them: its counters are its own.
    let other = stats(&b).await;
    for path in [
        &["generatedTokens"][..],
        &["timeToFirstToken", "count"],
        &["timePerOutputToken", "count"],
    ] {
        assert_eq!(
            counter(&other, path),
            counter(&other_before, path),
            "gateway 1's {path:?} moved: {other}"
        );
    }

    // Gateway 1 killed and restarted by the launcher: a new instance, counting from zero.
    let pid = d.pid_of("gateway", 1);
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(90);
    let restarted = loop {
        assert!(Instant::now() < deadline, "gateway 1 did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(r) = reqwest::get(format!("{b}/v1/stats")).await else {
            continue;
        };
        let Ok(v) = r.json::<Value>().await else {
            continue;
        };
        if v["gateway"]["instance"].is_string()
            && v["gateway"]["instance"] != other_before["gateway"]["instance"]
        {
            break v;
        }
    };
    assert_eq!(
        counter(&restarted, &["generatedTokens"]),
        0.0,
        "{restarted}"
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_and_ca_rotation_under_load_loses_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let model = "synthetic:tiny";
    let certs = tempfile::tempdir().expect("tempdir");
    let dir = certs.path().to_str().expect("utf-8").to_string();
    let certs_cmd = |verb: &str| {
        let out = std::process::Command::new(deploy::BIN)
            .args(["certs", verb, "--dir", &dir])
            .output()
            .expect("certs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    certs_cmd("init");
    let d = Deployment::start(model, 2, 2, &["--tls-dir", &dir, "--gateways", "2"]);
    let prompt = [5u32, 6, 7];
    let want = generate_ids(model, &prompt, 8);
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (base, want, stop, served) = (
            d.bases[0].clone(),
            want.clone(),
            stop.clone(),
            served.clone(),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                // Any failure panics here, and the test with it.
                assert_eq!(complete_ids(&base, &prompt, 8).await, want);
                served.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        certs_cmd("renew");
    }
    // Then a CA rotation: introduce, promote, retire, each step read by every process (they
    // look once a second) before the next.
    let first_ca = std::fs::read_to_string(certs.path().join("ca.crt")).expect("ca.crt");
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        certs_cmd("rotate-ca");
    }
    let bundle = std::fs::read_to_string(certs.path().join("ca.crt")).expect("ca.crt");
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1);
    assert_ne!(bundle, first_ca, "the CA was replaced");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // A gateway that starts now handshakes with every stage on a certificate of the new CA,
    // which alone is trusted now.
    let pid = d.pid_of("gateway", 1);
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/completions", d.bases[1]))
            .json(&json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": true}))
            .send()
            .await;
        if let Ok(r) = r
            && r.status() == 200
        {
            let v: Value = r.json().await.expect("json");
            assert_eq!(ids(&v["choices"][0]["token_ids"]), want);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted gateway never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.expect("a request failed during the rotation");
    }
    assert!(served.load(Ordering::SeqCst) >= 3, "the load never ran");
    d.stop();
}

#[test]
fn the_gateway_closes_connections_that_do_not_send_their_headers() {
    use std::io::{BufRead, Read, Write};
    // A gateway alone (its stage is nowhere): HTTP is served before the pipeline is ready.
    let mut child = std::process::Command::new(deploy::BIN)
        .args([
            "--threads",
            "1",
            "gateway",
            "--model",
            "synthetic:tiny",
            "--plaintext",
        ])
        .args(["--stage-addrs", "127.0.0.1:9", "--listen", "127.0.0.1:0"])
        .args(["--header-read-timeout-s", "1", "--exit-with-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gateway");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let addr = line
        .trim()
        .rsplit_once("http://")
        .expect("listening line")
        .1
        .to_string();
    // Headers that never finish, and a connection that never sends any.
    let mut slow = std::net::TcpStream::connect(&addr).expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .expect("write");
    let idle = std::net::TcpStream::connect(&addr).expect("connect");
    for mut c in [slow, idle] {
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let started = Instant::now();
        let mut buf = Vec::new();
        // The server closes it (perhaps after a 408); a read error is a close too.
        let _ = c.read_to_end(&mut buf);
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(8), "held open for {waited:?}");
        let text = String::from_utf8_lossy(&buf);
        assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    // A prompt client is served.
    let mut ok = std::net::TcpStream::connect(&addr).expect("connect");
    ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut buf = String::new();
    ok.read_to_string(&mut buf).expect("read");
    assert!(buf.starts_with("HTTP/1.1 200"), "{buf}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_renders_the_checkpoints_own_template_as_transformers_does() {
    use moe_worker::chat::OrderedJson;
    for name in ["tiny-gqa-top2", "tiny-mha-top3"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../engine/tests/golden")
            .join(name);
        let text = std::fs::read_to_string(dir.join("chat.json")).expect("chat.json");
        let fixture: Value = serde_json::from_str(&text).expect("json");
        // The same cases with their keys in the file's order (tools are sent as written).
        let ordered: OrderedJson = serde_json::from_str(&text).expect("json");
        let d = Deployment::start(dir.to_str().expect("utf-8"), 1, 1, &[]);
        for (i, case) in fixture["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .enumerate()
        {
            let raw = ordered
                .get_attr("cases")
                .and_then(|c| c.get_item(&OrderedJson::from(i)))
                .expect("case");
            let mut body = format!(
                "{{\"messages\": {}, \"add_generation_prompt\": {}, \"max_tokens\": 4, \
                 \"temperature\": 0",
                serde_json::to_string(&raw.get_attr("messages").expect("messages")).expect("json"),
                case["add_generation_prompt"]
            );
            if let Ok(tools) = raw.get_attr("tools")
                && !tools.is_undefined()
            {
                body.push_str(&format!(
                    ", \"tools\": {}",
                    serde_json::to_string(&tools).expect("json")
                ));
            }
            body.push('}');
            let r = reqwest::Client::new()
                .post(format!("{}/v1/chat/completions", d.base))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("http");
            let status = r.status().as_u16();
            let chat: Value = r.json().await.unwrap_or(Value::Null);
            let label = format!("{name}: {}", case["name"]);
            match case.get("ids") {
                Some(ids) if ids.as_array().map_or(0, Vec::len) + 4 > 256 => {
                    // Past this tiny model's context: refused, counting transformers' tokens.
                    assert_eq!(status, 400, "{label}: {chat}");
                    let n = ids.as_array().map_or(0, Vec::len);
                    let msg = chat["error"]["message"].as_str().unwrap_or_default();
                    assert!(
                        msg.contains(&format!("prompt's {n} tokens")),
                        "{label}: {msg}"
                    );
                }
                Some(ids) => {
                    // The prompt is transformers' ids: the same ids as a completion prompt
                    // give the same tokens.
                    assert_eq!(status, 200, "{label}: {chat}");
                    let ids = self::ids(ids);
                    assert_eq!(chat["usage"]["prompt_tokens"], ids.len(), "{label}");
                    let body = json!({"prompt": ids, "max_tokens": 4, "temperature": 0});
                    let (status, plain) = post(&d.base, "/v1/completions", body).await;
                    assert_eq!(status, 200, "{plain}");
                    assert_eq!(
                        self::ids(&chat["choices"][0]["token_ids"]),
                        self::ids(&plain["choices"][0]["token_ids"]),
                        "{label}"
                    );
                }
                None => {
                    assert_eq!(status, 400, "{label}: {chat}");
                    let msg = chat["error"]["message"].as_str().unwrap_or_default();
                    assert!(
                        msg.contains(case["error"].as_str().expect("error")),
                        "{label}: {msg}"
                    );
                }
            }
        }
        d.stop();
    }
}
