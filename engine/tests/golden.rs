//! Golden tests: our logits and greedy tokens against Hugging Face transformers' on the
//! committed tiny checkpoints (made by scripts/golden/make_golden.py). No Python needed.

use std::path::{Path, PathBuf};

use moe_engine::engine::{Engine, EngineOptions};
use moe_engine::model::{Chunk, ExpertCompute, LocalExperts, Model, MoeScratch, Routing, Scratch};
use moe_engine::sampling::{SamplingParams, argmax};
use moe_engine::tokenizer::Tokenizer;
use moe_engine::weights::{Checkpoint, ShardSpec, WeightSource};
use serde_json::Value;

const TOLERANCE: f32 = 1e-4;

fn golden_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("golden folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("expected.json").exists())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 2,
        "expected at least two golden checkpoints in {}",
        root.display()
    );
    dirs
}

fn expected(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).expect("read"))
        .expect("json")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("floats")
        .iter()
        .map(|x| x.as_f64().expect("f") as f32)
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut worst, mut at) = (0f32, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if (g - w).abs() > worst {
            worst = (g - w).abs();
            at = i;
        }
    }
    assert!(
        worst <= TOLERANCE,
        "{what}: max |diff| {worst} at {at} ({} vs {})",
        got[at],
        want[at]
    );
}

fn load(dir: &Path) -> Model {
    let ckpt = Checkpoint::open(dir).expect("open checkpoint");
    Model::load(&ckpt, ShardSpec::full(ckpt.config()), &mut |_| {}).expect("load")
}

/// Runs `tokens` through the model at positions `cache.len()..`, returning logits of every row.
fn forward_all(model: &Model, cache: &mut moe_engine::model::KvCache, tokens: &[u32]) -> Vec<f32> {
    let (mut hidden, mut logits, mut s, mut moe) = (
        Vec::new(),
        Vec::new(),
        Scratch::default(),
        MoeScratch::default(),
    );
    model.embed(tokens, &mut hidden).expect("embed");
    let chunk = Chunk {
        start: cache.len(),
        len: tokens.len(),
    };
    let mut experts = LocalExperts {
        model,
        scratch: &mut moe,
    };
    model
        .forward_layers(&mut hidden, &[chunk], &mut [cache], &mut experts, &mut s)
        .expect("forward");
    let rows: Vec<usize> = (0..tokens.len()).collect();
    model
        .logits(&hidden, &rows, &mut logits, &mut s)
        .expect("logits");
    logits
}

#[test]
fn logits_and_greedy_tokens_match_transformers() {
    for dir in golden_dirs() {
        let exp = expected(&dir);
        let model = load(&dir);
        let vocab = model.config().vocab_size;
        let tokenizer = Tokenizer::for_checkpoint(&dir).expect("tokenizer");
        let cases = exp["cases"].as_array().expect("cases");
        assert!(cases.len() >= 4);
        for case in cases {
            let name = format!(
                "{}/{}",
                dir.file_name().expect("name").to_string_lossy(),
                case["name"]
            );
            let prompt = ids(&case["prompt_ids"]);
            if let Some(text) = case["prompt"].as_str() {
                let ours = tokenizer
                    .encode(text, model.config().bos_token_id)
                    .expect("encode");
                assert_eq!(ours, prompt, "{name}: tokenization of {text:?}");
            }
            // Prefill: logits at every prompt position.
            let mut cache = model.new_cache(prompt.len() + 8);
            let logits = forward_all(&model, &mut cache, &prompt);
            let want: Vec<f32> = case["prefill_logits"]
                .as_array()
                .expect("rows")
                .iter()
                .flat_map(floats)
                .collect();
            assert_close(&logits, &want, &format!("{name} prefill logits"));

            // Greedy decode through the KV cache, one token at a time.
            let greedy = ids(&case["greedy_ids"]);
            let steps = case["step_logits"].as_array().expect("steps");
            let mut row = logits[(prompt.len() - 1) * vocab..].to_vec();
            for (k, want_tok) in greedy.iter().enumerate() {
                assert_close(&row, &floats(&steps[k]), &format!("{name} step {k} logits"));
                let tok = argmax(&row);
                assert_eq!(tok, *want_tok, "{name}: greedy token {k}");
                row = forward_all(&model, &mut cache, &[tok]);
            }
        }
    }
}

#[test]
fn batched_engine_with_joining_sequences_gives_the_same_tokens() {
    for dir in golden_dirs() {
        let exp = expected(&dir);
        let cases = exp["cases"].as_array().expect("cases").clone();
        // A small token budget forces prompts to be prefilled in chunks across steps.
        let mut engine = Engine::new(
            load(&dir),
            EngineOptions {
                max_batch_tokens: 7,
            },
        )
        .expect("engine");
        let mut pending: Vec<(usize, Vec<u32>, Vec<u32>)> = cases
            .iter()
            .enumerate()
            .map(|(i, c)| (i, ids(&c["prompt_ids"]), ids(&c["greedy_ids"])))
            .collect();
        let mut live = Vec::new();
        let mut got: Vec<Vec<u32>> = vec![Vec::new(); cases.len()];
        let mut step = 0;
        while !pending.is_empty() || engine.has_work() {
            // One new sequence joins every other step, while others are mid-flight.
            if step % 2 == 0 && !pending.is_empty() {
                let (i, prompt, want) = pending.remove(0);
                let p = SamplingParams {
                    ignore_eos: true,
                    ..SamplingParams::greedy(want.len())
                };
                live.push((engine.add(prompt, p).expect("add"), i));
            }
            for e in engine.step().expect("step") {
                let i = live
                    .iter()
                    .find(|(id, _)| *id == e.seq)
                    .expect("known seq")
                    .1;
                got[i].push(e.token);
                if e.finish.is_some() {
                    engine.remove(e.seq);
                }
            }
            step += 1;
            assert!(step < 500, "engine did not finish");
        }
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(
                got[i],
                ids(&c["greedy_ids"]),
                "{} case {}",
                dir.display(),
                c["name"]
            );
        }
    }
}

/// Records the routing decisions it is asked to compute.
struct Recording<'a> {
    inner: LocalExperts<'a>,
    seen: Vec<(usize, Routing)>,
}

impl ExpertCompute for Recording<'_> {
    fn compute(
        &mut self,
        layer: usize,
        routing: &Routing,
        x: &[f32],
        out: &mut [f32],
    ) -> moe_engine::Result<()> {
        self.seen.push((layer, routing.clone()));
        self.inner.compute(layer, routing, x, out)
    }
}

#[test]
fn router_picks_the_experts_and_weights_transformers_picks() {
    let dir = golden_dirs()
        .into_iter()
        .find(|d| expected(d).get("router_case").is_some())
        .expect("router case");
    let rc = expected(&dir)["router_case"].clone();
    let model = load(&dir);
    let prompt = ids(&rc["prompt_ids"]);
    let (mut hidden, mut s, mut moe) = (Vec::new(), Scratch::default(), MoeScratch::default());
    model.embed(&prompt, &mut hidden).expect("embed");
    let mut cache = model.new_cache(prompt.len());
    let mut rec = Recording {
        inner: LocalExperts {
            model: &model,
            scratch: &mut moe,
        },
        seen: Vec::new(),
    };
    let chunk = Chunk {
        start: 0,
        len: prompt.len(),
    };
    model
        .forward_layers(&mut hidden, &[chunk], &mut [&mut cache], &mut rec, &mut s)
        .expect("forward");
    let (layer, routing) = &rec.seen[0];
    assert_eq!(*layer, 0);
    let want_experts: Vec<u32> = rc["layer0_topk_experts"]
        .as_array()
        .expect("e")
        .iter()
        .flat_map(ids)
        .collect();
    let want_weights: Vec<f32> = rc["layer0_topk_weights"]
        .as_array()
        .expect("w")
        .iter()
        .flat_map(floats)
        .collect();
    assert_eq!(routing.experts, want_experts);
    assert_close(&routing.weights, &want_weights, "router weights");
}

/// Elements of every tensor in a checkpoint folder's safetensors files.
fn stored_parameters(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).expect("read");
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
            total += meta
                .tensors()
                .values()
                .map(|t| t.shape.iter().product::<usize>() as u64)
                .sum::<u64>();
        }
    }
    total
}

fn stored_bf16_matrices(dir: &Path) -> bool {
    std::fs::read_dir(dir).expect("dir").any(|entry| {
        let path = entry.expect("entry").path();
        path.extension().is_some_and(|e| e == "safetensors") && {
            let bytes = std::fs::read(&path).expect("read");
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("header");
            meta.tensors()
                .values()
                .any(|t| t.dtype == safetensors::Dtype::BF16 && t.shape.len() == 2)
        }
    })
}

#[test]
fn parameter_counts_equal_the_stored_tensors() {
    for dir in golden_dirs() {
        let cfg = Checkpoint::open(&dir).expect("open").config().clone();
        assert_eq!(
            cfg.total_params(),
            stored_parameters(&dir),
            "{}: config-derived parameter count vs the checkpoint's tensors",
            dir.display()
        );
        let whole = load(&dir);
        assert_eq!(
            whole.parameters(),
            cfg.total_params(),
            "{}: loaded weights",
            dir.display()
        );
        // Kept as stored: a bf16 checkpoint's matrices stay bf16 (vectors are widened).
        let stored_bf16 = stored_bf16_matrices(&dir);
        let by = whole.bytes_by_dtype();
        assert_eq!(
            by.contains_key("bf16"),
            stored_bf16,
            "{}: formats held {by:?}",
            dir.display()
        );
        assert_eq!(whole.weight_bytes(), by.values().sum::<u64>());
    }
}

fn load_as(dir: &Path, precision: moe_engine::weights::Precision) -> Model {
    let ckpt = Checkpoint::open(dir).expect("open checkpoint");
    Model::load_with(
        &ckpt,
        ShardSpec::full(ckpt.config()),
        precision,
        &mut |_| {},
    )
    .expect("load")
}

fn golden_prompts(dir: &Path) -> Vec<Vec<u32>> {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    v["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| ids(&c["prompt_ids"]))
        .collect()
}

/// bf16 weights and 8-bit experts against the checkpoint as stored: close (measured by the
/// quality report), but not identical (the conversion really happened).
#[test]
fn cheaper_formats_stay_close_to_the_stored_weights() {
    use moe_engine::weights::{Dtype, DtypeChoice, Precision};
    for dir in golden_dirs() {
        let reference = load(&dir);
        let prompts = golden_prompts(&dir);
        let stored_bf16 = stored_bf16_matrices(&dir);
        let mut cases = vec![(
            "q8 experts",
            Precision {
                experts: DtypeChoice::Is(Dtype::Q8),
                ..Precision::default()
            },
        )];
        if !stored_bf16 {
            cases.push((
                "bf16 weights",
                Precision {
                    weights: DtypeChoice::Is(Dtype::Bf16),
                    ..Precision::default()
                },
            ));
        }
        for (what, precision) in cases {
            let test = load_as(&dir, precision);
            let q = moe_engine::quality::compare(&reference, &test, &prompts, 8).expect("compare");
            eprintln!("{} {what}: {q:?}", dir.display());
            assert!(q.positions > 0);
            assert!(q.mean_kl > 0.0, "{}: {what} changed nothing", dir.display());
            assert!(
                q.mean_kl < 1e-2 && q.top1_agreement >= 0.9,
                "{}: {what}: {q:?}",
                dir.display()
            );
        }
    }
}

/// bf16 checkpoints computed with their weights as stored (bf16 in memory, f32 activations)
/// against transformers computing in bf16 (`expected_bf16.json`, `scripts/golden/make_bf16.py`):
/// the greedy tokens agree wherever transformers-bf16's own top-1 margin is wide enough that
/// its activation rounding cannot flip them (up to the first step where it is not), in cases
/// whose routing decisions are not closer than bf16's rounding of the router's inputs (1e-2:
/// deepseek-v3's fixtures keep gaps of 2e-3, and transformers-bf16 routes those differently
/// from its own f32 computation, which ours equals).
#[test]
fn bf16_checkpoints_give_transformers_bf16_tokens_where_margins_allow() {
    const MARGIN: f64 = 0.1;
    const ROUTER_GAP: f64 = 1e-2;
    let mut compared = 0;
    for dir in golden_dirs() {
        let path = dir.join("expected_bf16.json");
        if !path.exists() {
            assert!(
                !stored_bf16_matrices(&dir),
                "{}: no bf16 reference",
                dir.display()
            );
            continue;
        }
        let exp: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        let model = load(&dir);
        assert!(model.bytes_by_dtype().contains_key("bf16"));
        let vocab = model.config().vocab_size;
        let f32_cases = expected(&dir)["cases"].clone();
        for case in exp["cases"].as_array().expect("cases") {
            let gap = f32_cases
                .as_array()
                .expect("cases")
                .iter()
                .find(|c| c["name"] == case["name"])
                .and_then(|c| c["min_router_gap"].as_f64())
                .unwrap_or(0.0);
            if gap < ROUTER_GAP {
                continue;
            }
            let prompt = ids(&case["prompt_ids"]);
            let want = ids(&case["greedy_ids"]);
            let margins: Vec<f64> = case["margins"]
                .as_array()
                .expect("margins")
                .iter()
                .map(|m| m.as_f64().expect("margin"))
                .collect();
            let cut = margins
                .iter()
                .position(|&m| m < MARGIN)
                .unwrap_or(want.len());
            let mut cache = model.new_cache(prompt.len() + want.len() + 1);
            let mut logits = forward_all(&model, &mut cache, &prompt);
            let mut got = Vec::new();
            for _ in 0..cut {
                let t = argmax(&logits[logits.len() - vocab..]);
                got.push(t);
                logits = forward_all(&model, &mut cache, &[t]);
            }
            assert_eq!(
                got,
                want[..cut],
                "{}/{}: ours (bf16 weights, f32 activations) vs transformers in bf16",
                dir.display(),
                case["name"]
            );
            compared += cut;
        }
    }
    assert!(
        compared >= 20,
        "only {compared} tokens had margins to compare"
    );
}
