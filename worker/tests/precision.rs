//! Precision across processes: activations sent as bf16 between real worker processes give
//! exactly what one process computes when it rounds where the deployment sends, and 8-bit
//! experts in a deployment give what one process computes with the same experts.

#[path = "support/deploy.rs"]
mod deploy;

use std::path::{Path, PathBuf};
use std::time::Duration;

use deploy::Deployment;
use moe_worker::model::{
    Chunk, ExpertCompute, KvCache, Model, MoeScratch, Routing, Scratch, gather, scatter_add,
};
use moe_worker::sampling::argmax;
use moe_worker::weights::{Checkpoint, Precision, ShardSpec, WeightSource};
use serde_json::{Value, json};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../engine/tests/golden")
        .join(name)
}

fn bf16(v: f32) -> f32 {
    moe_proto::WireDtype::Bf16.round(v)
}

/// An expert shard seen from a stage that sends and receives bf16: each expert's rows are
/// rounded on the way out, its unweighted output on the way back, then combined in f32.
struct RoundTrip<'a> {
    model: &'a Model,
    scratch: MoeScratch,
    round: bool,
}

impl ExpertCompute for RoundTrip<'_> {
    fn compute(
        &mut self,
        layer: usize,
        routing: &Routing,
        x: &[f32],
        out: &mut [f32],
    ) -> moe_worker::Result<()> {
        let h = self.model.config().hidden_size;
        let (mut sent, mut groups) = (Vec::new(), Vec::new());
        gather(routing, |_| true, x, h, &mut sent, &mut groups);
        let r = |v: &mut f32| {
            if self.round {
                *v = bf16(*v)
            }
        };
        sent.iter_mut().for_each(r);
        let mut back = Vec::new();
        self.model
            .expert_ffn(layer, &groups, &sent, &mut back, &mut self.scratch)?;
        back.iter_mut().for_each(r);
        out.fill(0.0);
        let mut row = 0;
        for &(e, n) in &groups {
            scatter_add(routing, e, &back[row * h..(row + n) * h], h, out);
            row += n;
        }
        Ok(())
    }
}

/// Greedy tokens computed in this process, split as a deployment of `stages` stages with
/// expert shards is, rounding to bf16 exactly where it sends activations (stage to expert
/// shard and back, stage to stage, last stage to gateway).
fn generate_rounded(
    dir: &Path,
    stages: usize,
    precision: Precision,
    prompt: &[u32],
    n: usize,
) -> Vec<u32> {
    generate_rounded_with(dir, stages, precision, prompt, n, true)
}

/// As [`generate_rounded`], rounding only when `round` is set (else: f32 on the wire).
fn generate_rounded_with(
    dir: &Path,
    stages: usize,
    precision: Precision,
    prompt: &[u32],
    n: usize,
    round: bool,
) -> Vec<u32> {
    let r = |v: &mut f32| {
        if round {
            *v = bf16(*v)
        }
    };
    let src = Checkpoint::open(dir).expect("open");
    let cfg = src.config().clone();
    let shape = moe_plan::ModelShape {
        num_layers: cfg.num_hidden_layers,
        num_experts: cfg.num_local_experts,
        top_k: cfg.num_experts_per_tok,
    };
    let plan = moe_plan::plan(shape, stages, 2).expect("plan");
    let load = |spec| Model::load_with(&src, spec, precision, &mut |_| {}).expect("load");
    let parts: Vec<Model> = plan
        .stages
        .iter()
        .map(|s| load(ShardSpec::stage(&cfg, s.layer_start..s.layer_end, true)))
        .collect();
    let head = load(ShardSpec::head(&cfg));
    let mut caches: Vec<KvCache> = parts
        .iter()
        .map(|m| m.new_cache(prompt.len() + n))
        .collect();
    let (mut scratch, mut logits, mut out) = (Scratch::default(), Vec::new(), Vec::new());
    let (mut input, mut pos) = (prompt.to_vec(), 0);
    for _ in 0..n {
        let mut hidden = Vec::new();
        parts[0].embed(&input, &mut hidden).expect("embed");
        let chunks = [Chunk {
            start: pos,
            len: input.len(),
        }];
        for (m, cache) in parts.iter().zip(caches.iter_mut()) {
            let mut ex = RoundTrip {
                model: m,
                scratch: MoeScratch::default(),
                round,
            };
            m.forward_layers(&mut hidden, &chunks, &mut [cache], &mut ex, &mut scratch)
                .expect("forward");
            hidden.iter_mut().for_each(r);
        }
        head.logits(&hidden, &[input.len() - 1], &mut logits, &mut scratch)
            .expect("logits");
        let t = argmax(&logits);
        out.push(t);
        pos += input.len();
        input = vec![t];
    }
    out
}

async fn complete_ids(base: &str, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let v: Value = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true}))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .expect("http")
        .json()
        .await
        .expect("json");
    v["choices"][0]["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no tokens: {v}"))
        .iter()
        .map(|t| t.as_u64().expect("id") as u32)
        .collect()
}

/// The golden prompts, and 24 more of random ids.
fn prompts(dir: &Path) -> Vec<Vec<u32>> {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("config.json")).expect("config.json"),
    )
    .expect("json");
    let vocab = cfg["vocab_size"].as_u64().expect("vocab_size").max(4);
    let mut x = 7u64;
    let random = (0..24).map(|_| {
        (0..6)
            .map(|_| {
                x = moe_worker::synthetic::splitmix64(x);
                (3 + x % (vocab - 3)) as u32
            })
            .collect::<Vec<u32>>()
    });
    v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            c["prompt_ids"]
                .as_array()
                .expect("prompt")
                .iter()
                .map(|t| t.as_u64().expect("id") as u32)
                .collect()
        })
        .chain(random)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_on_the_wire_equals_one_process_rounding_where_the_deployment_sends() {
    // An f32 checkpoint with dense and MoE layers (qwen2-moe: a shared expert on the stage)
    // and a bf16 one with 8-bit experts on top.
    for (name, expert_dtype) in [("qwen2-moe", None), ("tiny-mha-top3", Some("q8"))] {
        let dir = golden(name);
        let model = dir.to_str().expect("utf-8").to_string();
        let mut extra = vec!["--wire-dtype", "bf16"];
        let mut precision = Precision::default();
        if let Some(d) = expert_dtype {
            extra.extend(["--expert-dtype", d]);
            precision.experts = d.parse().expect("dtype");
        }
        let d = Deployment::start(&model, 2, 2, &extra);
        let n = 24;
        let mut moved = 0;
        for prompt in prompts(&dir) {
            let got = complete_ids(&d.base, &prompt, n).await;
            let want = generate_rounded(&dir, 2, precision, &prompt, n);
            assert_eq!(
                got, want,
                "{name}: deployment vs one process rounding as it sends"
            );
            // The rounding is really there: somewhere it moves a greedy token of the
            // unrounded computation (these tiny random models have small margins late).
            let exact = generate_rounded_with(&dir, 2, precision, &prompt, n, false);
            moved += usize::from(exact != want);
        }
        d.stop();
        assert!(
            moved > 0,
            "{name}: bf16 on the wire changed no token of any prompt"
        );
    }
}
