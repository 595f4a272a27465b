//! The decoder of every family the engine serves, loadable in parts (a layer range, a set
//! of experts) so that pipeline stages and expert shards each hold only what they own.
//!
//! A stage owns, per layer, the attention, the norms and what runs for every token next to
//! it: the router, shared experts, or the dense MLP of a layer without experts. Routed
//! experts are owned by expert shards (or by the stage itself in a single process).

mod attention;
mod layout;
mod moe;

use std::collections::BTreeSet;

pub use attention::KvCache;
pub use layout::TensorRef;
pub use moe::{ExpertCompute, Routing, gather, scatter_add};

use crate::config::{Activation, ModelConfig, QkNorm};
use crate::error::{Error, Result};
use crate::kernels::{self, MatMul};
use crate::weights::{Precision, ShardSpec, Weight, WeightSource};

/// `y = x · Wᵀ (+ b)`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub w: Weight,
    pub b: Option<Weight>,
}

impl Linear {
    /// `y = x · Wᵀ + b` for `rows` rows of `x`.
    fn apply(&self, x: &[f32], y: &mut [f32], rows: usize) {
        let (n, k) = (self.w.shape()[0], self.w.shape()[1]);
        kernels::matmul(x, self.w.mat(), y, rows, n, k);
        add_bias(y, self.b.as_ref());
    }
}

/// A SwiGLU MLP (dense layers, shared experts): `down · (silu(gate · x) ⊙ (up · x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate: Weight,
    pub up: Weight,
    pub down: Weight,
}

/// The query path of multi-head latent attention.
#[derive(Debug, Clone)]
pub enum MlaQuery {
    Direct(Weight),
    /// `q_b · rms_norm(q_a · x)`.
    Lora {
        a: Weight,
        norm: Weight,
        b: Weight,
    },
}

#[derive(Debug, Clone)]
pub enum Attn {
    /// Grouped-query attention with the families' options (biases, QK-norm, sinks).
    Gqa {
        q: Linear,
        k: Linear,
        v: Linear,
        o: Linear,
        q_norm: Option<Weight>,
        k_norm: Option<Weight>,
        sinks: Option<Weight>,
    },
    /// Multi-head latent attention (DeepSeek): the cache holds the normalised latent and the
    /// rotary key; queries are absorbed into the latent space.
    Mla {
        q: MlaQuery,
        kv_a: Weight,
        kv_a_norm: Weight,
        kv_b: Weight,
        o: Weight,
    },
}

/// What runs after attention on the stage itself.
#[derive(Debug, Clone)]
pub enum StageFfn {
    /// A layer without experts.
    Dense(Mlp),
    /// An MoE layer: the router (the routed experts run wherever they are owned) and the
    /// shared expert that runs for every token, with its gate.
    Moe {
        router: Linear,
        correction_bias: Option<Weight>,
        shared: Option<Mlp>,
        shared_gate: Option<Weight>,
    },
}

/// Attention, norms, router and shared or dense MLP of one layer (what a pipeline stage
/// owns).
#[derive(Debug)]
pub struct LayerAttention {
    pub input_norm: Weight,
    pub attn: Attn,
    pub post_norm: Weight,
    pub ffn: StageFfn,
}

/// One routed expert: `w2 · act(w1 · x + b1, w3 · x + b3) + b2`.
#[derive(Debug)]
pub struct Expert {
    pub w1: Weight,
    pub w3: Weight,
    pub w2: Weight,
    pub b1: Option<Weight>,
    pub b3: Option<Weight>,
    pub b2: Option<Weight>,
}

#[derive(Debug)]
pub struct Layer {
    pub index: usize,
    pub attention: Option<LayerAttention>,
    /// Indexed by expert id; `None` where this part does not own the expert (and in layers
    /// without experts).
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
    gate: Vec<f32>,
    up: Vec<f32>,
    shared: Vec<f32>,
}

fn resize(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    v.resize(len, 0.0);
    &mut v[..len]
}

impl Model {
    /// Loads the part of the model that `spec` owns, and nothing else, in the checkpoint's
    /// formats.
    pub fn load(
        src: &dyn WeightSource,
        spec: ShardSpec,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        Self::load_with(src, spec, Precision::default(), progress)
    }

    /// Loads the part of the model that `spec` owns, keeping its matrices in the formats
    /// `precision` asks for (converted tensor by tensor, so only one is ever held twice).
    pub fn load_with(
        src: &dyn WeightSource,
        spec: ShardSpec,
        precision: Precision,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let cfg = src.config().clone();
        spec.check(&cfg)?;
        // The plan is the one list of owned tensors; loading follows it, then assembles.
        let plan = Self::tensor_uses(&cfg, &spec, src);
        let mut done = LoadProgress {
            tensors_done: 0,
            tensors_total: plan.len(),
            bytes_done: 0,
            bytes_total: plan.iter().map(|(r, _)| r.elements() as u64 * 4).sum(),
        };
        progress(done);
        let mut loaded = std::collections::HashMap::with_capacity(plan.len());
        for (r, usage) in plan {
            let w = match r.index {
                None => src.load(&r.name, &r.shape)?,
                Some(i) => src.load_slice(&r.name, &r.shape, i)?,
            };
            let dtype = usage.dtype(w.dtype(), &precision);
            let w = w.convert(dtype);
            if w.is_mapped() {
                std::hint::black_box(w.prefault());
            }
            done.tensors_done += 1;
            done.bytes_done += r.elements() as u64 * 4;
            progress(done);
            loaded.insert(r, w);
        }
        let parts = layout::Layout::new(&cfg, src).parts(
            &spec,
            &mut layout::Loaded {
                tensors: loaded,
                precision,
            },
        )?;
        Ok(Self {
            cfg,
            spec,
            embed: parts.embed,
            layers: parts.layers,
            final_norm: parts.final_norm,
            lm_head: parts.lm_head,
        })
    }

    /// Every tensor `spec` owns, in load order.
    pub fn tensor_plan(
        cfg: &ModelConfig,
        spec: &ShardSpec,
        src: &dyn WeightSource,
    ) -> Vec<TensorRef> {
        Self::tensor_uses(cfg, spec, src)
            .into_iter()
            .map(|(r, _)| r)
            .collect()
    }

    /// Every tensor `spec` owns with how it is read, in load order.
    fn tensor_uses(
        cfg: &ModelConfig,
        spec: &ShardSpec,
        src: &dyn WeightSource,
    ) -> Vec<(TensorRef, layout::Use)> {
        let mut planner = layout::Planner::default();
        // Planning fetches nothing, so it cannot fail.
        let _ = layout::Layout::new(cfg, src).parts(spec, &mut planner);
        planner.refs
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
        let (k, v) = self.cfg.kv_cache_dims();
        KvCache::new(self.layers.len(), k, v, capacity)
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
        hidden.clear();
        hidden.resize(ids.len() * h, 0.0);
        for (&t, row) in ids.iter().zip(hidden.chunks_exact_mut(h)) {
            embed.row_into(t as usize, row);
        }
        Ok(())
    }

    /// Runs every owned layer over `hidden` in place. `chunks` describe the batch rows (one
    /// per sequence, in row order) and `caches` the matching sequences' KV caches; routed
    /// experts are computed by `experts` (this model itself when it owns them).
    pub fn forward_layers(
        &self,
        hidden: &mut [f32],
        chunks: &[Chunk],
        caches: &mut [&mut KvCache],
        experts: &mut dyn ExpertCompute,
        s: &mut Scratch,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let h = cfg.hidden_size;
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
        let eps = cfg.rms_norm_eps as f32;

        for (li, layer) in self.layers.iter().enumerate() {
            let la = layer
                .attention
                .as_ref()
                .ok_or_else(|| Error::invalid("model part", "this part does not own attention"))?;
            rms_norm(
                hidden,
                la.input_norm.as_slice(),
                eps,
                resize(&mut s.normed, rows * h),
            );
            match &la.attn {
                Attn::Gqa {
                    q,
                    k,
                    v,
                    o,
                    q_norm,
                    k_norm,
                    sinks,
                } => {
                    let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
                    {
                        let (qo, ko, vo) = (&mut s.q, &mut s.k, &mut s.v);
                        let (qo, ko, vo) = (
                            resize(qo, rows * qd),
                            resize(ko, rows * kvd),
                            resize(vo, rows * kvd),
                        );
                        kernels::matmul_many(&mut [
                            MatMul::new(&s.normed, q.w.mat(), qo, rows, qd, h),
                            MatMul::new(&s.normed, k.w.mat(), ko, rows, kvd, h),
                            MatMul::new(&s.normed, v.w.mat(), vo, rows, kvd, h),
                        ]);
                    }
                    add_bias(&mut s.q, q.b.as_ref());
                    add_bias(&mut s.k, k.b.as_ref());
                    add_bias(&mut s.v, v.b.as_ref());
                    let norm_width = match cfg.arch.attention.qk_norm {
                        QkNorm::None => None,
                        QkNorm::PerHead => Some((cfg.head_dim, cfg.head_dim)),
                        QkNorm::Whole => Some((qd, kvd)),
                    };
                    if let (Some((qw, kw)), Some(qn), Some(kn)) = (norm_width, q_norm, k_norm) {
                        rms_norm_in_place(&mut s.q, qn.as_slice(), qw, eps);
                        rms_norm_in_place(&mut s.k, kn.as_slice(), kw, eps);
                    }
                    if let Some(c) = cfg.arch.attention.clip_qkv {
                        let c = c as f32;
                        for x in s.q.iter_mut().chain(s.k.iter_mut()).chain(s.v.iter_mut()) {
                            *x = x.clamp(-c, c);
                        }
                    }
                    {
                        let _t = crate::profile::time(crate::profile::Part::Attention);
                        attention::attend(
                            cfg,
                            li,
                            layer.index,
                            chunks,
                            caches,
                            &s.row_chunk,
                            &s.rope,
                            sinks.as_ref().map(Weight::as_slice),
                            &mut s.q,
                            &mut s.k,
                            &s.v,
                            resize(&mut s.attn, rows * qd),
                        );
                    }
                    o.apply(&s.attn, resize(&mut s.proj, rows * h), rows);
                }
                Attn::Mla {
                    q,
                    kv_a,
                    kv_a_norm,
                    kv_b,
                    o,
                } => {
                    let m = cfg.arch.attention.mla.as_ref().ok_or_else(|| {
                        Error::Internal("latent attention without its config".into())
                    })?;
                    let qd = cfg.num_attention_heads * m.qk_head_dim();
                    match q {
                        MlaQuery::Direct(w) => kernels::matmul(
                            &s.normed,
                            w.mat(),
                            resize(&mut s.q, rows * qd),
                            rows,
                            qd,
                            h,
                        ),
                        MlaQuery::Lora { a, norm, b } => {
                            let r = norm.as_slice().len();
                            kernels::matmul(
                                &s.normed,
                                a.mat(),
                                resize(&mut s.k, rows * r),
                                rows,
                                r,
                                h,
                            );
                            rms_norm_in_place(&mut s.k, norm.as_slice(), r, MLA_NORM_EPS);
                            kernels::matmul(
                                &s.k,
                                b.mat(),
                                resize(&mut s.q, rows * qd),
                                rows,
                                qd,
                                r,
                            );
                        }
                    }
                    let cw = m.kv_lora_rank + m.qk_rope_head_dim;
                    kernels::matmul(
                        &s.normed,
                        kv_a.mat(),
                        resize(&mut s.v, rows * cw),
                        rows,
                        cw,
                        h,
                    );
                    for row in s.v.chunks_exact_mut(cw) {
                        let (lat, _) = row.split_at_mut(m.kv_lora_rank);
                        rms_norm_in_place(lat, kv_a_norm.as_slice(), m.kv_lora_rank, MLA_NORM_EPS);
                    }
                    let od = cfg.attn_out_dim();
                    {
                        let _t = crate::profile::time(crate::profile::Part::Attention);
                        attention::attend_latent(
                            cfg,
                            m,
                            li,
                            chunks,
                            caches,
                            &s.row_chunk,
                            &s.rope,
                            kv_b.as_slice(),
                            &mut s.q,
                            &mut s.v,
                            resize(&mut s.attn, rows * od),
                        );
                    }
                    kernels::matmul(&s.attn, o.mat(), resize(&mut s.proj, rows * h), rows, h, od);
                }
            }
            for (x, d) in hidden.iter_mut().zip(&s.proj) {
                *x += d;
            }

            rms_norm(
                hidden,
                la.post_norm.as_slice(),
                eps,
                resize(&mut s.normed, rows * h),
            );
            match &la.ffn {
                StageFfn::Dense(mlp) => {
                    mlp_forward(
                        mlp,
                        &s.normed,
                        rows,
                        h,
                        &mut s.gate,
                        &mut s.up,
                        resize(&mut s.proj, rows * h),
                    );
                }
                StageFfn::Moe {
                    router,
                    correction_bias,
                    shared,
                    shared_gate,
                } => {
                    let ne = cfg.num_local_experts;
                    router.apply(&s.normed, resize(&mut s.router_logits, rows * ne), rows);
                    {
                        let _t = crate::profile::time(crate::profile::Part::Routing);
                        s.routing.route_with(
                            &cfg.arch.router,
                            &s.router_logits,
                            correction_bias.as_ref().map(Weight::as_slice),
                            rows,
                            ne,
                            cfg.num_experts_per_tok,
                        );
                    }
                    let out = resize(&mut s.proj, rows * h);
                    experts.compute(layer.index, &s.routing, &s.normed, out)?;
                    if let Some(mlp) = shared {
                        let sh = resize(&mut s.shared, rows * h);
                        mlp_forward(mlp, &s.normed, rows, h, &mut s.gate, &mut s.up, sh);
                        if let Some(g) = shared_gate {
                            for (r, row) in sh.chunks_exact_mut(h).enumerate() {
                                let z = kernels::dot(&s.normed[r * h..(r + 1) * h], g.as_slice());
                                let gate = 1.0 / (1.0 + (-z).exp());
                                row.iter_mut().for_each(|x| *x *= gate);
                            }
                        }
                        for (o, x) in s.proj.iter_mut().zip(&s.shared) {
                            *o += x;
                        }
                    }
                }
            }
            for (x, d) in hidden.iter_mut().zip(&s.proj) {
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
        kernels::matmul(normed, head.mat(), logits, rows.len(), v, h);
        Ok(())
    }

    /// Bytes of weights this part holds (in their formats).
    pub fn weight_bytes(&self) -> u64 {
        let mut total = 0;
        self.visit_weights(&mut |w| total += w.bytes());
        total
    }

    /// Parameters this part holds.
    pub fn parameters(&self) -> u64 {
        let mut total = 0;
        self.visit_weights(&mut |w| total += w.len() as u64);
        total
    }

    /// Bytes this part holds per format (f32, bf16, 8-bit).
    pub fn bytes_by_dtype(&self) -> std::collections::BTreeMap<&'static str, u64> {
        let mut by = std::collections::BTreeMap::new();
        self.visit_weights(&mut |w| *by.entry(w.dtype().name()).or_default() += w.bytes());
        by
    }

    /// Calls `f` on every weight this part holds.
    fn visit_weights(&self, f: &mut dyn FnMut(&Weight)) {
        for w in [&self.embed, &self.final_norm, &self.lm_head]
            .into_iter()
            .flatten()
        {
            f(w);
        }
        let linear = |l: &Linear, f: &mut dyn FnMut(&Weight)| {
            f(&l.w);
            l.b.iter().for_each(|b| f(b));
        };
        let mlp = |m: &Mlp, f: &mut dyn FnMut(&Weight)| {
            [&m.gate, &m.up, &m.down].into_iter().for_each(|w| f(w));
        };
        for l in &self.layers {
            if let Some(a) = &l.attention {
                f(&a.input_norm);
                f(&a.post_norm);
                match &a.attn {
                    Attn::Gqa {
                        q,
                        k,
                        v,
                        o,
                        q_norm,
                        k_norm,
                        sinks,
                    } => {
                        for x in [q, k, v, o] {
                            linear(x, f);
                        }
                        for w in [q_norm, k_norm, sinks].into_iter().flatten() {
                            f(w);
                        }
                    }
                    Attn::Mla {
                        q,
                        kv_a,
                        kv_a_norm,
                        kv_b,
                        o,
                    } => {
                        match q {
                            MlaQuery::Direct(w) => f(w),
                            MlaQuery::Lora { a, norm, b } => {
                                [a, norm, b].into_iter().for_each(|w| f(w));
                            }
                        }
                        [kv_a, kv_a_norm, kv_b, o].into_iter().for_each(|w| f(w));
                    }
                }
                match &a.ffn {
                    StageFfn::Dense(m) => mlp(m, f),
                    StageFfn::Moe {
                        router,
                        correction_bias,
                        shared,
                        shared_gate,
                    } => {
                        linear(router, f);
                        for w in [correction_bias, shared_gate].into_iter().flatten() {
                            f(w);
                        }
                        if let Some(m) = shared {
                            mlp(m, f);
                        }
                    }
                }
            }
            for e in l.experts.iter().flatten() {
                [&e.w1, &e.w3, &e.w2].into_iter().for_each(|w| f(w));
                for b in [&e.b1, &e.b3, &e.b2].into_iter().flatten() {
                    f(b);
                }
            }
        }
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

/// DeepSeek's latent norms (`q_a_layernorm`, `kv_a_layernorm`) use their class default.
const MLA_NORM_EPS: f32 = 1e-6;

fn add_bias(y: &mut [f32], b: Option<&Weight>) {
    if let Some(b) = b {
        let b = b.as_slice();
        for row in y.chunks_exact_mut(b.len()) {
            for (x, v) in row.iter_mut().zip(b) {
                *x += v;
            }
        }
    }
}

/// RMS-normalises every `width`-wide piece of `x` in place with `weight`.
fn rms_norm_in_place(x: &mut [f32], weight: &[f32], width: usize, eps: f32) {
    for xr in x.chunks_exact_mut(width) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, w) in xr.iter_mut().zip(weight) {
            *v = w * (*v * inv);
        }
    }
}

/// A SwiGLU MLP over `rows` rows of `x` into `out`.
fn mlp_forward(
    m: &Mlp,
    x: &[f32],
    rows: usize,
    h: usize,
    gate: &mut Vec<f32>,
    up: &mut Vec<f32>,
    out: &mut [f32],
) {
    let inter = m.gate.shape()[0];
    let (g, u) = (resize(gate, rows * inter), resize(up, rows * inter));
    kernels::matmul_many(&mut [
        MatMul::new(x, m.gate.mat(), g, rows, inter, h),
        MatMul::new(x, m.up.mat(), u, rows, inter, h),
    ]);
    moe::activate(Activation::Silu, g, u);
    kernels::matmul(g, m.down.mat(), out, rows, h, inter);
}

/// `out = x / rms(x) * weight`, row by row, as transformers' RMSNorm (f32).
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
