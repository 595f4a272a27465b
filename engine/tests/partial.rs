//! Loading a model in parts: a part reads only the tensors it owns, and a model split into
//! a stage (attention, routers) plus expert shards computes exactly what the whole model does.

use std::collections::BTreeSet;
use std::path::Path;

use moe_engine::model::{Chunk, ExpertCompute, LocalExperts, Model, MoeScratch, Routing, Scratch};
use moe_engine::synthetic::{self, Synthetic};
use moe_engine::weights::{Checkpoint, ShardSpec, WeightSource};

/// Exports `tiny` with roughly one expert per safetensors file.
fn sharded_tiny(dir: &Path) {
    let preset = synthetic::preset("tiny").expect("preset");
    synthetic::export(&preset, 3, dir, 100_000, &mut |_, _| {}).expect("export");
}

fn owned_names(model_spec: &ShardSpec, ckpt: &Checkpoint) -> BTreeSet<String> {
    Model::tensor_plan(ckpt.config(), model_spec, ckpt)
        .into_iter()
        .map(|r| r.name)
        .collect()
}

#[test]
fn a_partial_load_never_touches_tensors_it_does_not_own() {
    let tmp = tempfile::tempdir().expect("tempdir");
    sharded_tiny(tmp.path());
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("model.safetensors.index.json")).expect("index"),
    )
    .expect("json");
    let weight_map = index["weight_map"].as_object().expect("weight_map");
    let files: BTreeSet<&str> = weight_map
        .values()
        .map(|v| v.as_str().expect("file"))
        .collect();
    assert!(
        files.len() > 20,
        "expected many shards, got {}",
        files.len()
    );

    let spec = ShardSpec::experts(1..3, [2, 5]);
    let ckpt = Checkpoint::open(tmp.path()).expect("open");
    let owned = owned_names(&spec, &ckpt);
    assert_eq!(
        owned.len(),
        2 * 2 * 3,
        "2 layers x 2 experts x 3 projections"
    );

    // Remove every shard that holds none of the owned tensors: loading must not need them.
    let needed: BTreeSet<&str> = owned
        .iter()
        .map(|n| weight_map[n].as_str().expect("file"))
        .collect();
    for f in &files {
        if !needed.contains(f) {
            std::fs::remove_file(tmp.path().join(f)).expect("remove shard");
        }
    }
    let ckpt = Checkpoint::open(tmp.path()).expect("open after removal");
    let model = Model::load(&ckpt, spec.clone(), &mut |_| {}).expect("partial load");
    let loaded: BTreeSet<String> = ckpt.loaded_tensors().into_iter().collect();
    assert_eq!(loaded, owned, "loaded exactly the owned tensors");
    assert_eq!(ckpt.opened_files().len(), needed.len());
    assert_eq!(
        model.owned_experts(),
        [(1, 2), (1, 5), (2, 2), (2, 5)].into_iter().collect()
    );

    // The whole model cannot load from the same folder: proof the files really are gone.
    let err =
        Model::load(&ckpt, ShardSpec::full(ckpt.config()), &mut |_| {}).expect_err("full load");
    assert!(err.to_string().contains(".safetensors"), "{err}");

    // A stage part owns attention and routers of its layers, no experts, and the model end
    // only where its range touches it.
    let stage = ShardSpec::stage(ckpt.config(), 0..2, false);
    let names = owned_names(&stage, &ckpt);
    assert!(names.contains("model.embed_tokens.weight") && !names.contains("lm_head.weight"));
    assert!(names.iter().all(|n| !n.contains(".experts.")));
    assert!(
        names
            .iter()
            .all(|n| !n.starts_with("model.layers.2.") && !n.starts_with("model.layers.3."))
    );
}

/// Dispatches each expert's rows to whichever part owns it and sums the results, as a
/// stage does over its expert shards.
struct Shards<'a> {
    parts: Vec<&'a Model>,
    scratch: MoeScratch,
}

impl ExpertCompute for Shards<'_> {
    fn compute(
        &mut self,
        layer: usize,
        routing: &Routing,
        x: &[f32],
        out: &mut [f32],
    ) -> moe_engine::Result<()> {
        out.fill(0.0);
        let mut partial = vec![0f32; out.len()];
        for part in &self.parts {
            let mine = routing.subset(|e| part.spec().owns_expert(layer, e));
            if mine.assignments.is_empty() {
                continue;
            }
            let mut local = LocalExperts {
                model: part,
                scratch: &mut self.scratch,
            };
            local.compute(layer, &mine, x, &mut partial)?;
            for (o, p) in out.iter_mut().zip(&partial) {
                *o += p;
            }
        }
        Ok(())
    }
}

#[test]
fn a_stage_with_expert_shards_computes_what_the_whole_model_computes() {
    let synth = Synthetic::new(synthetic::preset("tiny").expect("preset").config, 11);
    let cfg = synth.config().clone();
    let whole = Model::load(&synth, ShardSpec::full(&cfg), &mut |_| {}).expect("whole");
    let stage = Model::load(
        &synth,
        ShardSpec::stage(&cfg, 0..cfg.num_hidden_layers, false),
        &mut |_| {},
    )
    .expect("stage");
    let shard_a = Model::load(
        &synth,
        ShardSpec::experts(0..cfg.num_hidden_layers, [0, 2, 4, 6]),
        &mut |_| {},
    )
    .expect("shard a");
    let shard_b = Model::load(
        &synth,
        ShardSpec::experts(0..cfg.num_hidden_layers, [1, 3, 5, 7]),
        &mut |_| {},
    )
    .expect("shard b");
    assert!(stage.owned_experts().is_empty());

    let prompt: Vec<u32> = (0..13)
        .map(|i| (i * 37 + 5) % cfg.vocab_size as u32)
        .collect();
    let run = |model: &Model, experts: &mut dyn ExpertCompute| {
        let (mut hidden, mut logits, mut s) = (Vec::new(), Vec::new(), Scratch::default());
        let mut cache = model.new_cache(prompt.len());
        model.embed(&prompt, &mut hidden).expect("embed");
        let chunk = Chunk {
            start: 0,
            len: prompt.len(),
        };
        model
            .forward_layers(&mut hidden, &[chunk], &mut [&mut cache], experts, &mut s)
            .expect("forward");
        model
            .logits(&hidden, &[prompt.len() - 1], &mut logits, &mut s)
            .expect("logits");
        logits
    };
    let mut moe = MoeScratch::default();
    let want = run(
        &whole,
        &mut LocalExperts {
            model: &whole,
            scratch: &mut moe,
        },
    );
    let mut shards = Shards {
        parts: vec![&shard_a, &shard_b],
        scratch: MoeScratch::default(),
    };
    let got = run(&stage, &mut shards);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "split vs whole: max diff {worst}");

    // An expert the parts do not own is an error, not a silent zero.
    let mut only_a = Shards {
        parts: vec![&shard_a],
        scratch: MoeScratch::default(),
    };
    let mut lonely = LocalExperts {
        model: &shard_a,
        scratch: &mut only_a.scratch,
    };
    let mut r = Routing::default();
    r.route(&[0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 8.0], 1, 8, 2);
    let err = lonely.compute(
        0,
        &r,
        &vec![0.0; cfg.hidden_size],
        &mut vec![0.0; cfg.hidden_size],
    );
    assert!(
        err.expect_err("unowned expert")
            .to_string()
            .contains("expert 1")
    );
}

fn golden_dirs() -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("golden folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("config.json").exists())
        .collect();
    dirs.sort();
    dirs
}

/// Every family's checkpoint split as a deployment splits it — two pipeline stages (dense
/// layers and shared experts on the stage) and two expert shards that each load only their
/// experts, fused expert tensors included — computes what the whole model computes.
#[test]
fn every_family_split_into_stages_and_expert_shards_computes_the_whole_model() {
    let dirs = golden_dirs();
    assert!(dirs.len() >= 9, "golden checkpoints: {dirs:?}");
    for dir in dirs {
        let name = dir.file_name().expect("name").to_string_lossy().to_string();
        let ckpt = Checkpoint::open(&dir).expect("open");
        let cfg = ckpt.config().clone();
        let n = cfg.num_hidden_layers;
        let whole = Model::load(&ckpt, ShardSpec::full(&cfg), &mut |_| {}).expect("whole");

        let split = n / 2;
        let stages: Vec<Model> = [0..split, split..n]
            .into_iter()
            .map(|r| {
                let spec = ShardSpec::stage(&cfg, r, false);
                let names = owned_names(&spec, &ckpt);
                assert!(
                    names.iter().all(|t| !t.contains(".experts.")),
                    "{name}: a stage loads no routed expert: {names:?}"
                );
                Model::load(&ckpt, spec, &mut |_| {}).expect("stage")
            })
            .collect();
        let even: Vec<usize> = (0..cfg.num_local_experts).step_by(2).collect();
        let odd: Vec<usize> = (1..cfg.num_local_experts).step_by(2).collect();
        let shards: Vec<Model> = [even, odd]
            .into_iter()
            .map(|experts| {
                let fresh = Checkpoint::open(&dir).expect("open");
                let spec = ShardSpec::experts(0..n, experts.clone());
                let part = Model::load(&fresh, spec, &mut |_| {}).expect("shard");
                for t in fresh.loaded_tensors() {
                    // Per-expert names (`experts.3.`) or a fused tensor's entry (`[3]`).
                    let e: usize = t
                        .split_once(".experts.")
                        .and_then(|(_, rest)| rest.split('.').next()?.parse().ok())
                        .or_else(|| t.rsplit_once('[')?.1.trim_end_matches(']').parse().ok())
                        .unwrap_or_else(|| panic!("{name}: a shard loaded `{t}`"));
                    assert!(
                        experts.contains(&e),
                        "{name}: shard of {experts:?} loaded {t}"
                    );
                }
                let moe_layers = (0..n).filter(|&l| cfg.is_moe_layer(l)).count();
                assert_eq!(
                    part.owned_experts().len(),
                    moe_layers * experts.len(),
                    "{name}"
                );
                part
            })
            .collect();

        let prompt: Vec<u32> = (0..11)
            .map(|i| (i * 37 + 5) % cfg.vocab_size as u32)
            .collect();
        let chunk = [Chunk {
            start: 0,
            len: prompt.len(),
        }];
        let mut moe = MoeScratch::default();
        let (mut hidden, mut want, mut s) = (Vec::new(), Vec::new(), Scratch::default());
        whole.embed(&prompt, &mut hidden).expect("embed");
        let mut cache = whole.new_cache(prompt.len());
        let mut local = LocalExperts {
            model: &whole,
            scratch: &mut moe,
        };
        whole
            .forward_layers(&mut hidden, &chunk, &mut [&mut cache], &mut local, &mut s)
            .expect("whole forward");
        whole
            .logits(&hidden, &[prompt.len() - 1], &mut want, &mut s)
            .expect("logits");

        let mut via = Shards {
            parts: shards.iter().collect(),
            scratch: MoeScratch::default(),
        };
        let (mut hidden, mut got) = (Vec::new(), Vec::new());
        stages[0].embed(&prompt, &mut hidden).expect("embed");
        for stage in &stages {
            let mut cache = stage.new_cache(prompt.len());
            stage
                .forward_layers(&mut hidden, &chunk, &mut [&mut cache], &mut via, &mut s)
                .expect("stage forward");
        }
        stages[1]
            .logits(&hidden, &[prompt.len() - 1], &mut got, &mut s)
            .expect("logits");
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "{name}: split vs whole: max diff {worst}");
    }
}
