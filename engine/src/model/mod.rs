//! The Mixtral-family decoder, loadable in parts (a layer range, a set of experts) so that
//! pipeline stages and expert shards each hold only what they own.

mod attention;
mod moe;

use std::collections::BTreeSet;

pub use attention::KvCache;
pub use moe::{ExpertCompute, Routing, gather, scatter_add};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::{self, MatMul};
use crate::weights::{ShardSpec, Weight, WeightSource, names};

/// Attention, norms and router of one layer (what a pipeline stage owns).
#[derive(Debug)]
pub struct LayerAttention {
    pub input_norm: Weight,
    pub q: Weight,
    pub k: Weight,
    pub v: Weight,
    pub o: Weight,
    pub post_norm: Weight,
    pub router: Weight,
}

/// One SwiGLU expert: `w2 · (silu(w1 · x) ⊙ (w3 · x))`.
#[derive(Debug)]
pub struct Expert {
    pub w1: Weight,
    pub w3: Weight,
    pub w2: Weight,
}

#[derive(Debug)]
pub struct Layer {
    pub index: usize,
    pub attention: Option<LayerAttention>,
    /// Indexed by expert id; `None` where this part does not own the expert.
    pub experts: Vec<Option<Expert>>,
}

/// A contiguous run of one sequence's tokens inside a batch: positions `start..start+len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub start: usize,
    pub len: usize,
}

/// Loading progress: tensors and bytes done so far, of the total.
#[derive(Debug, Clone, Copy)]
pub struct LoadProgress {
    pub tensors_done: usize,
    pub tensors_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    spec: ShardSpec,
    embed: Option<Weight>,
    layers: Vec<Layer>,
    final_norm: Option<Weight>,
    lm_head: Option<Weight>,
}

/// Reusable activation buffers, so steady-state decoding does not allocate.
#[derive(Debug, Default)]
pub struct Scratch {
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    router_logits: Vec<f32>,
    routing: Routing,
    rope: attention::RopeRows,
    row_chunk: Vec<usize>,
    head_rows: Vec<f32>,
}

fn resize(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    v.resize(len, 0.0);
    &mut v[..len]
}

impl Model {
    /// Loads the part of the model that `spec` owns, and nothing else.
    pub fn load(
        src: &dyn WeightSource,
        spec: ShardSpec,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let cfg = src.config().clone();
        spec.check(&cfg)?;
        // The plan is the one list of owned tensors; loading follows it, then assembles.
        let plan = Self::tensor_plan(&cfg, &spec, src);
        let mut done = LoadProgress {
            tensors_done: 0,
            tensors_total: plan.len(),
            bytes_done: 0,
            bytes_total: plan
                .iter()
                .map(|(_, s)| s.iter().product::<usize>() as u64 * 4)
                .sum(),
        };
        progress(done);
        let mut loaded = std::collections::HashMap::with_capacity(plan.len());
        for (name, shape) in plan {
            let w = src.load(&name, &shape)?;
            if w.is_mapped() {
                std::hint::black_box(w.prefault());
            }
            done.tensors_done += 1;
            done.bytes_done += shape.iter().product::<usize>() as u64 * 4;
            progress(done);
            loaded.insert(name, w);
        }
        let mut take = |name: &str| {
            loaded
                .remove(name)
                .ok_or_else(|| Error::tensor(name, "missing from the load plan"))
        };

        let embed = if spec.embeddings || (spec.head && cfg.tie_word_embeddings) {
            Some(take(names::EMBED)?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(spec.layers.len());
        for li in spec.layers.clone() {
            let attention = if spec.attention {
                let l = |rest: &str| names::layer(li, rest);
                Some(LayerAttention {
                    input_norm: take(&l("input_layernorm.weight"))?,
                    q: take(&l("self_attn.q_proj.weight"))?,
                    k: take(&l("self_attn.k_proj.weight"))?,
                    v: take(&l("self_attn.v_proj.weight"))?,
                    o: take(&l("self_attn.o_proj.weight"))?,
                    post_norm: take(&l("post_attention_layernorm.weight"))?,
                    router: take(&names::router(li))?,
                })
            } else {
                None
            };
            let mut experts = Vec::with_capacity(cfg.num_local_experts);
            for e in 0..cfg.num_local_experts {
                experts.push(if spec.owns_expert(li, e) {
                    Some(Expert {
                        w1: take(&names::expert(li, e, "w1"))?,
                        w3: take(&names::expert(li, e, "w3"))?,
                        w2: take(&names::expert(li, e, "w2"))?,
                    })
                } else {
                    None
                });
            }
            layers.push(Layer {
                index: li,
                attention,
                experts,
            });
        }
        let (final_norm, lm_head) = if spec.head {
            let norm = take(names::FINAL_NORM)?;
            let head = if cfg.tie_word_embeddings && !src.contains(names::LM_HEAD) {
                embed.clone()
            } else {
                Some(take(names::LM_HEAD)?)
            };
            (Some(norm), head)
        } else {
            (None, None)
        };
        let embed = if spec.embeddings { embed } else { None };
        Ok(Self {
            cfg,
            spec,
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }

    /// The (name, shape) of every tensor `spec` owns, in load order.
    pub fn tensor_plan(
        cfg: &ModelConfig,
        spec: &ShardSpec,
        src: &dyn WeightSource,
    ) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mut plan = Vec::new();
        if spec.embeddings || (spec.head && cfg.tie_word_embeddings) {
            plan.push((names::EMBED.to_string(), vec![cfg.vocab_size, h]));
        }
        for li in spec.layers.clone() {
            if spec.attention {
                let l = |rest: &str| names::layer(li, rest);
                plan.push((l("input_layernorm.weight"), vec![h]));
                plan.push((l("self_attn.q_proj.weight"), vec![cfg.q_dim(), h]));
                plan.push((l("self_attn.k_proj.weight"), vec![cfg.kv_dim(), h]));
                plan.push((l("self_attn.v_proj.weight"), vec![cfg.kv_dim(), h]));
                plan.push((l("self_attn.o_proj.weight"), vec![h, cfg.q_dim()]));
                plan.push((l("post_attention_layernorm.weight"), vec![h]));
                plan.push((names::router(li), vec![cfg.num_local_experts, h]));
            }
            for e in 0..cfg.num_local_experts {
                if spec.owns_expert(li, e) {
                    plan.push((names::expert(li, e, "w1"), vec![i, h]));
                    plan.push((names::expert(li, e, "w3"), vec![i, h]));
                    plan.push((names::expert(li, e, "w2"), vec![h, i]));
                }
            }
        }
        if spec.head {
            plan.push((names::FINAL_NORM.to_string(), vec![h]));
            if !cfg.tie_word_embeddings || src.contains(names::LM_HEAD) {
                plan.push((names::LM_HEAD.to_string(), vec![cfg.vocab_size, h]));
            }
        }
        plan
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn spec(&self) -> &ShardSpec {
        &self.spec
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Experts this part owns, as (layer, expert).
    pub fn owned_experts(&self) -> BTreeSet<(usize, usize)> {
        self.layers
            .iter()
            .flat_map(|l| {
                l.experts
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.is_some())
                    .map(move |(e, _)| (l.index, e))
            })
            .collect()
    }

    /// A KV cache for this part's layers with room for `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::new(self.layers.len(), self.cfg.kv_dim(), capacity)
    }

    /// Checks token ids against the vocabulary.
    pub fn check_tokens(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::invalid(
                "token id",
                format!(
                    "{bad} is outside the vocabulary (vocab_size {})",
                    self.cfg.vocab_size
                ),
            ));
        }
        Ok(())
    }

    /// Embeds `ids` into `hidden` (`ids.len() × hidden_size`).
    pub fn embed(&self, ids: &[u32], hidden: &mut Vec<f32>) -> Result<()> {
        let embed = self
            .embed
            .as_ref()
            .ok_or_else(|| Error::invalid("model part", "this part does not own the embeddings"))?;
        self.check_tokens(ids)?;
        let h = self.cfg.hidden_size;
        let table = embed.as_slice();
        hidden.clear();
        for &t in ids {
            hidden.extend_from_slice(&table[t as usize * h..(t as usize + 1) * h]);
        }
        Ok(())
    }

    /// Runs every owned layer over `hidden` in place. `chunks` describe the batch rows (one
    /// per sequence, in row order) and `caches` the matching sequences' KV caches; experts
    /// are computed by `experts` (this model itself when it owns them).
    pub fn forward_layers(
        &self,
        hidden: &mut [f32],
        chunks: &[Chunk],
        caches: &mut [&mut KvCache],
        experts: &mut dyn ExpertCompute,
        s: &mut Scratch,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (h, qd, kvd) = (cfg.hidden_size, cfg.q_dim(), cfg.kv_dim());
        let rows: usize = chunks.iter().map(|c| c.len).sum();
        if hidden.len() != rows * h || chunks.len() != caches.len() {
            return Err(Error::invalid(
                "batch",
                "hidden rows, chunks and caches disagree",
            ));
        }
        for (c, cache) in chunks.iter().zip(caches.iter_mut()) {
            if c.start != cache.len() {
                return Err(Error::invalid(
                    "batch",
                    format!(
                        "chunk starts at position {} but the cache holds {}",
                        c.start,
                        cache.len()
                    ),
                ));
            }
            if c.start + c.len > cfg.max_position_embeddings {
                return Err(Error::invalid(
                    "sequence length",
                    format!(
                        "{} exceeds max_position_embeddings {}",
                        c.start + c.len,
                        cfg.max_position_embeddings
                    ),
                ));
            }
            cache.reserve(c.start + c.len);
        }
        s.row_chunk.clear();
        for (ci, c) in chunks.iter().enumerate() {
            s.row_chunk.extend(std::iter::repeat_n(ci, c.len));
        }
        s.rope.prepare(cfg, chunks);

        for (li, layer) in self.layers.iter().enumerate() {
            let attn = layer
                .attention
                .as_ref()
                .ok_or_else(|| Error::invalid("model part", "this part does not own attention"))?;
            let eps = cfg.rms_norm_eps as f32;
            rms_norm(
                hidden,
                attn.input_norm.as_slice(),
                eps,
                resize(&mut s.normed, rows * h),
            );
            {
                let (q, k, v) = (resize(&mut s.q, rows * qd), &mut s.k, &mut s.v);
                let (k, v) = (resize(k, rows * kvd), resize(v, rows * kvd));
                kernels::matmul_many(&mut [
                    MatMul::new(&s.normed, attn.q.as_slice(), q, rows, qd, h),
                    MatMul::new(&s.normed, attn.k.as_slice(), k, rows, kvd, h),
                    MatMul::new(&s.normed, attn.v.as_slice(), v, rows, kvd, h),
                ]);
            }
            attention::attend(
                cfg,
                li,
                chunks,
                caches,
                &s.row_chunk,
                &s.rope,
                &mut s.q,
                &mut s.k,
                &s.v,
                resize(&mut s.attn, rows * qd),
            );
            kernels::matmul(
                &s.attn,
                attn.o.as_slice(),
                resize(&mut s.proj, rows * h),
                rows,
                h,
                qd,
            );
            for (x, d) in hidden.iter_mut().zip(&s.proj) {
                *x += d;
            }

            rms_norm(
                hidden,
                attn.post_norm.as_slice(),
                eps,
                resize(&mut s.normed, rows * h),
            );
            let ne = cfg.num_local_experts;
            kernels::matmul(
                &s.normed,
                attn.router.as_slice(),
                resize(&mut s.router_logits, rows * ne),
                rows,
                ne,
                h,
            );
            s.routing
                .route(&s.router_logits, rows, ne, cfg.num_experts_per_tok);
            let out = resize(&mut s.proj, rows * h);
            experts.compute(layer.index, &s.routing, &s.normed, out)?;
            for (x, d) in hidden.iter_mut().zip(out.iter()) {
                *x += d;
            }
        }
        for (c, cache) in chunks.iter().zip(caches.iter_mut()) {
            cache.advance(c.len);
        }
        Ok(())
    }

    /// Final norm and LM head for the given rows of `hidden`: `logits` is `rows × vocab`.
    pub fn logits(
        &self,
        hidden: &[f32],
        rows: &[usize],
        logits: &mut Vec<f32>,
        s: &mut Scratch,
    ) -> Result<()> {
        let (norm, head) = match (&self.final_norm, &self.lm_head) {
            (Some(n), Some(hd)) => (n, hd),
            _ => {
                return Err(Error::invalid(
                    "model part",
                    "this part does not own the LM head",
                ));
            }
        };
        let h = self.cfg.hidden_size;
        s.head_rows.clear();
        for &r in rows {
            s.head_rows.extend_from_slice(&hidden[r * h..(r + 1) * h]);
        }
        let normed = resize(&mut s.normed, rows.len() * h);
        rms_norm(
            &s.head_rows,
            norm.as_slice(),
            self.cfg.rms_norm_eps as f32,
            normed,
        );
        let v = self.cfg.vocab_size;
        logits.resize(rows.len() * v, 0.0);
        kernels::matmul(normed, head.as_slice(), logits, rows.len(), v, h);
        Ok(())
    }

    /// Bytes of weights this part holds (f32).
    pub fn weight_bytes(&self) -> u64 {
        let n = |w: &Weight| w.as_slice().len() as u64 * 4;
        let mut total = 0;
        for w in [&self.embed, &self.final_norm, &self.lm_head]
            .into_iter()
            .flatten()
        {
            total += n(w);
        }
        for l in &self.layers {
            if let Some(a) = &l.attention {
                for w in [
                    &a.input_norm,
                    &a.q,
                    &a.k,
                    &a.v,
                    &a.o,
                    &a.post_norm,
                    &a.router,
                ] {
                    total += n(w);
                }
            }
            for e in l.experts.iter().flatten() {
                total += n(&e.w1) + n(&e.w2) + n(&e.w3);
            }
        }
        total
    }

    pub fn owns_head(&self) -> bool {
        self.lm_head.is_some()
    }

    pub fn owns_embeddings(&self) -> bool {
        self.embed.is_some()
    }
}

impl Model {
    pub fn layer(&self, index: usize) -> Option<&Layer> {
        index
            .checked_sub(self.spec.layers.start)
            .and_then(|i| self.layers.get(i))
    }

    /// What an expert shard computes: each expert of `groups` (ascending (expert, rows)) over
    /// its consecutive rows of `x` (`rows × hidden_size`), unweighted, into `out`.
    pub fn expert_ffn(
        &self,
        layer: usize,
        groups: &[(usize, usize)],
        x: &[f32],
        out: &mut Vec<f32>,
        scratch: &mut MoeScratch,
    ) -> Result<()> {
        let l = self.layer(layer).ok_or_else(|| {
            Error::invalid(
                "layer",
                format!(
                    "{layer} is not owned by this part (layers {}..{})",
                    self.spec.layers.start, self.spec.layers.end
                ),
            )
        })?;
        moe::ffn_groups(&self.cfg, l, groups, x, scratch)?;
        out.clear();
        out.extend_from_slice(&scratch.down[..x.len()]);
        Ok(())
    }
}

/// The experts a model part owns, computed in this process.
#[derive(Debug)]
pub struct LocalExperts<'a> {
    pub model: &'a Model,
    pub scratch: &'a mut MoeScratch,
}

impl ExpertCompute for LocalExperts<'_> {
    fn compute(
        &mut self,
        layer: usize,
        routing: &Routing,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        let l = self
            .model
            .layer(layer)
            .ok_or_else(|| Error::invalid("layer", format!("{layer} is not owned by this part")))?;
        moe::compute_local(&self.model.cfg, l, routing, x, out, self.scratch)
    }
}

pub use moe::MoeScratch;

/// `out = x / rms(x) * weight`, row by row, as transformers' MixtralRMSNorm (f32).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let h = weight.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = w * (v * inv);
        }
    }
}
