//! Where each family keeps its tensors in a Hugging Face checkpoint, and which of them a
//! model part loads. The list of tensors and the assembly of the part's weights are one piece
//! of code run twice: first to plan (what to load, for progress and partial loads), then to
//! build from what was loaded.

use std::collections::HashMap;

use super::{Attn, Expert, Layer, LayerAttention, Linear, MlaQuery, Mlp, StageFfn};
use crate::config::{Family, ModelConfig, QkNorm};
use crate::error::{Error, Result};
use crate::weights::{Dtype, Precision, ShardSpec, Weight, WeightSource, names};

/// One tensor a part loads: a whole tensor, or entry `index` of the first dimension of a
/// fused tensor (one expert of `[experts, ...]`). `shape` is the whole tensor's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorRef {
    pub name: String,
    pub shape: Vec<usize>,
    pub index: Option<usize>,
}

impl TensorRef {
    /// Elements the part holds from this tensor.
    pub fn elements(&self) -> usize {
        let dims = if self.index.is_some() {
            &self.shape[1..]
        } else {
            &self.shape[..]
        };
        dims.iter().product()
    }
}

/// How routed experts are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExpertLayout {
    /// One tensor per expert and projection (the Hub layout of Mixtral, Qwen, OLMoE,
    /// DeepSeek, GLM).
    PerExpert,
    /// `experts.gate_up_proj` `[E, 2I, H]` (gate rows, then up rows) and `experts.down_proj`
    /// `[E, H, I]`: transformers 5's in-memory layout, if a checkpoint was written so.
    Fused,
    /// gpt-oss: `gate_up_proj` `[E, H, 2I]` with gate and up interleaved by column, its bias
    /// `[E, 2I]`, `down_proj` `[E, I, H]` and its bias `[E, H]`.
    GptOss,
}

/// How a tensor is read, which decides the format it is kept in ([`Precision`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Read element by element (norms, biases, gates, MLA's `kv_b`): always f32.
    Vector,
    /// A matrix of the matrix kernels (attention, routers, dense MLPs, embeddings, head).
    Matrix,
    /// A routed expert's matrix.
    Expert,
    /// Kept as stored: a fused tensor that the layout slices or transposes into others.
    Source,
}

impl Use {
    /// The format a tensor stored as `stored` is kept in.
    pub fn dtype(self, stored: Dtype, precision: &Precision) -> Dtype {
        match self {
            Use::Vector => Dtype::F32,
            Use::Source => stored,
            Use::Matrix => precision.matrix(stored, false),
            Use::Expert => precision.matrix(stored, true),
        }
    }
}

/// Gets a tensor, in the planning pass (records it, returns an empty weight) or the build
/// pass (returns what was loaded, already in its use's format).
pub(super) trait Fetch {
    fn get(&mut self, r: TensorRef, usage: Use) -> Result<Weight>;
    /// A weight made from fetched ones stored as `from` (sliced, transposed), in `usage`'s
    /// format.
    fn derived(&mut self, w: Weight, from: Dtype, usage: Use) -> Weight;
}

/// The planning pass.
#[derive(Default)]
pub(super) struct Planner {
    pub refs: Vec<(TensorRef, Use)>,
}

impl Fetch for Planner {
    fn get(&mut self, r: TensorRef, usage: Use) -> Result<Weight> {
        self.refs.push((r, usage));
        Ok(Weight::owned(Vec::new(), vec![0]))
    }

    fn derived(&mut self, w: Weight, _: Dtype, _: Use) -> Weight {
        w
    }
}

/// The build pass, over the loaded tensors.
pub(super) struct Loaded {
    pub tensors: HashMap<TensorRef, Weight>,
    pub precision: Precision,
}

impl Fetch for Loaded {
    fn get(&mut self, r: TensorRef, _: Use) -> Result<Weight> {
        self.tensors
            .remove(&r)
            .ok_or_else(|| Error::tensor(&r.name, "missing from the load plan"))
    }

    fn derived(&mut self, w: Weight, from: Dtype, usage: Use) -> Weight {
        w.convert(usage.dtype(from, &self.precision))
    }
}

fn whole(name: String, shape: Vec<usize>) -> TensorRef {
    TensorRef {
        name,
        shape,
        index: None,
    }
}

/// The parts of a model a spec owns, assembled.
pub(super) struct Parts {
    pub embed: Option<Weight>,
    pub layers: Vec<Layer>,
    pub final_norm: Option<Weight>,
    pub lm_head: Option<Weight>,
}

/// Transposes a row-major `[rows, cols]` matrix, taking every `step`-th column from `first`.
fn columns(w: &Weight, rows: usize, cols: usize, first: usize, step: usize) -> Weight {
    if w.is_empty() {
        return w.clone();
    }
    let (src, picked) = (w.mat(), (cols - first).div_ceil(step));
    let mut out = vec![0.0; picked * rows];
    for r in 0..rows {
        for (j, c) in (first..cols).step_by(step).enumerate() {
            out[j * rows + r] = src.get(r * cols + c);
        }
    }
    Weight::owned(out, vec![picked, rows])
}

/// Every `step`-th value from `first` of a vector.
fn every(w: &Weight, first: usize, step: usize) -> Weight {
    let v: Vec<f32> = w
        .as_slice()
        .iter()
        .skip(first)
        .step_by(step)
        .copied()
        .collect();
    let n = v.len();
    Weight::owned(v, vec![n])
}

/// Rows `from..to` of a row-major matrix of width `cols`.
fn rows(w: &Weight, from: usize, to: usize, cols: usize) -> Weight {
    if w.is_empty() {
        return w.clone();
    }
    let src = w.mat();
    let v = (from * cols..to * cols).map(|i| src.get(i)).collect();
    Weight::owned(v, vec![to - from, cols])
}

pub(super) struct Layout<'a> {
    cfg: &'a ModelConfig,
    src: &'a dyn WeightSource,
    block: &'static str,
    experts: ExpertLayout,
}

impl<'a> Layout<'a> {
    pub fn new(cfg: &'a ModelConfig, src: &'a dyn WeightSource) -> Self {
        let block = match cfg.family() {
            Family::Mixtral => "block_sparse_moe",
            _ => "mlp",
        };
        let mut l = Self {
            cfg,
            src,
            block,
            experts: ExpertLayout::PerExpert,
        };
        l.experts = if cfg.family() == Family::GptOss {
            ExpertLayout::GptOss
        } else if let Some(first) = (0..cfg.num_hidden_layers).find(|&i| cfg.is_moe_layer(i)) {
            let (gate, _, _) = l.expert_names(first, 0);
            if !src.contains(&gate) && src.contains(&l.fused(first, "gate_up_proj")) {
                ExpertLayout::Fused
            } else {
                ExpertLayout::PerExpert
            }
        } else {
            ExpertLayout::PerExpert
        };
        l
    }

    fn layer(&self, i: usize, rest: &str) -> String {
        names::layer(i, rest)
    }

    fn fused(&self, i: usize, what: &str) -> String {
        self.layer(i, &format!("{}.experts.{what}", self.block))
    }

    /// (gate, up, down) weight names of one expert.
    fn expert_names(&self, i: usize, e: usize) -> (String, String, String) {
        if self.cfg.family() == Family::Mixtral {
            return (
                names::expert(i, e, "w1"),
                names::expert(i, e, "w3"),
                names::expert(i, e, "w2"),
            );
        }
        let n = |p: &str| self.layer(i, &format!("{}.experts.{e}.{p}.weight", self.block));
        (n("gate_proj"), n("up_proj"), n("down_proj"))
    }

    fn linear(
        &self,
        f: &mut dyn Fetch,
        name: String,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear> {
        let b = if bias {
            let bn = name.replace(".weight", ".bias");
            Some(f.get(whole(bn, vec![out]), Use::Vector)?)
        } else {
            None
        };
        Ok(Linear {
            w: f.get(whole(name, vec![out, inp]), Use::Matrix)?,
            b,
        })
    }

    fn mlp(&self, f: &mut dyn Fetch, prefix: &str, inter: usize) -> Result<Mlp> {
        let h = self.cfg.hidden_size;
        let n = |p: &str| format!("{prefix}.{p}.weight");
        Ok(Mlp {
            gate: f.get(whole(n("gate_proj"), vec![inter, h]), Use::Matrix)?,
            up: f.get(whole(n("up_proj"), vec![inter, h]), Use::Matrix)?,
            down: f.get(whole(n("down_proj"), vec![h, inter]), Use::Matrix)?,
        })
    }

    fn attention(&self, f: &mut dyn Fetch, i: usize) -> Result<Attn> {
        let cfg = self.cfg;
        let h = cfg.hidden_size;
        let a = &cfg.arch.attention;
        let l = |rest: &str| self.layer(i, rest);
        if let Some(m) = &a.mla {
            let heads = cfg.num_attention_heads;
            let q = match m.q_lora_rank {
                None => MlaQuery::Direct(f.get(
                    whole(
                        l("self_attn.q_proj.weight"),
                        vec![heads * m.qk_head_dim(), h],
                    ),
                    Use::Matrix,
                )?),
                Some(r) => MlaQuery::Lora {
                    a: f.get(
                        whole(l("self_attn.q_a_proj.weight"), vec![r, h]),
                        Use::Matrix,
                    )?,
                    norm: f.get(
                        whole(l("self_attn.q_a_layernorm.weight"), vec![r]),
                        Use::Vector,
                    )?,
                    b: f.get(
                        whole(
                            l("self_attn.q_b_proj.weight"),
                            vec![heads * m.qk_head_dim(), r],
                        ),
                        Use::Matrix,
                    )?,
                },
            };
            return Ok(Attn::Mla {
                q,
                kv_a: f.get(
                    whole(
                        l("self_attn.kv_a_proj_with_mqa.weight"),
                        vec![m.kv_lora_rank + m.qk_rope_head_dim, h],
                    ),
                    Use::Matrix,
                )?,
                kv_a_norm: f.get(
                    whole(l("self_attn.kv_a_layernorm.weight"), vec![m.kv_lora_rank]),
                    Use::Vector,
                )?,
                kv_b: f.get(
                    whole(
                        l("self_attn.kv_b_proj.weight"),
                        vec![heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank],
                    ),
                    Use::Vector,
                )?,
                o: f.get(
                    whole(l("self_attn.o_proj.weight"), vec![h, heads * m.v_head_dim]),
                    Use::Matrix,
                )?,
            });
        }
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let (q_norm, k_norm) = match a.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (
                Some(f.get(
                    whole(l("self_attn.q_norm.weight"), vec![cfg.head_dim]),
                    Use::Vector,
                )?),
                Some(f.get(
                    whole(l("self_attn.k_norm.weight"), vec![cfg.head_dim]),
                    Use::Vector,
                )?),
            ),
            QkNorm::Whole => (
                Some(f.get(whole(l("self_attn.q_norm.weight"), vec![qd]), Use::Vector)?),
                Some(f.get(whole(l("self_attn.k_norm.weight"), vec![kvd]), Use::Vector)?),
            ),
        };
        Ok(Attn::Gqa {
            q: self.linear(f, l("self_attn.q_proj.weight"), qd, h, a.qkv_bias)?,
            k: self.linear(f, l("self_attn.k_proj.weight"), kvd, h, a.qkv_bias)?,
            v: self.linear(f, l("self_attn.v_proj.weight"), kvd, h, a.qkv_bias)?,
            o: self.linear(f, l("self_attn.o_proj.weight"), h, qd, a.o_bias)?,
            q_norm,
            k_norm,
            sinks: if a.sinks {
                Some(f.get(
                    whole(l("self_attn.sinks"), vec![cfg.num_attention_heads]),
                    Use::Vector,
                )?)
            } else {
                None
            },
        })
    }

    fn stage_ffn(&self, f: &mut dyn Fetch, i: usize) -> Result<StageFfn> {
        let cfg = self.cfg;
        let arch = &cfg.arch;
        let (h, ne) = (cfg.hidden_size, cfg.num_local_experts);
        let l = |rest: &str| self.layer(i, rest);
        if !cfg.is_moe_layer(i) {
            return Ok(StageFfn::Dense(self.mlp(
                f,
                &l("mlp"),
                arch.dense_intermediate_size,
            )?));
        }
        let router_name = match cfg.family() {
            Family::Mixtral => names::router(i),
            Family::GptOss => l("mlp.router.weight"),
            _ => l("mlp.gate.weight"),
        };
        let router = self.linear(f, router_name, ne, h, arch.router.bias)?;
        let correction_bias = if arch.router.correction_bias {
            Some(f.get(
                whole(l("mlp.gate.e_score_correction_bias"), vec![ne]),
                Use::Vector,
            )?)
        } else {
            None
        };
        let shared = if arch.shared_intermediate_size > 0 {
            let prefix = match cfg.family() {
                Family::Qwen2Moe => l("mlp.shared_expert"),
                _ => l("mlp.shared_experts"),
            };
            Some(self.mlp(f, &prefix, arch.shared_intermediate_size)?)
        } else {
            None
        };
        let shared_gate = if arch.shared_gate {
            Some(f.get(
                whole(l("mlp.shared_expert_gate.weight"), vec![1, h]),
                Use::Vector,
            )?)
        } else {
            None
        };
        Ok(StageFfn::Moe {
            router,
            correction_bias,
            shared,
            shared_gate,
        })
    }

    fn expert(&self, f: &mut dyn Fetch, i: usize, e: usize) -> Result<Expert> {
        let (h, inter, ne) = (
            self.cfg.hidden_size,
            self.cfg.intermediate_size,
            self.cfg.num_local_experts,
        );
        let slice = |name: String, shape: Vec<usize>| TensorRef {
            name,
            shape,
            index: Some(e),
        };
        Ok(match self.experts {
            ExpertLayout::PerExpert => {
                let (g, u, d) = self.expert_names(i, e);
                Expert {
                    w1: f.get(whole(g, vec![inter, h]), Use::Expert)?,
                    w3: f.get(whole(u, vec![inter, h]), Use::Expert)?,
                    w2: f.get(whole(d, vec![h, inter]), Use::Expert)?,
                    b1: None,
                    b3: None,
                    b2: None,
                }
            }
            ExpertLayout::Fused => {
                let gu = f.get(
                    slice(self.fused(i, "gate_up_proj"), vec![ne, 2 * inter, h]),
                    Use::Source,
                )?;
                let from = gu.dtype();
                let (w1, w3) = (rows(&gu, 0, inter, h), rows(&gu, inter, 2 * inter, h));
                gu.release();
                Expert {
                    w1: f.derived(w1, from, Use::Expert),
                    w3: f.derived(w3, from, Use::Expert),
                    w2: f.get(
                        slice(self.fused(i, "down_proj"), vec![ne, h, inter]),
                        Use::Expert,
                    )?,
                    b1: None,
                    b3: None,
                    b2: None,
                }
            }
            ExpertLayout::GptOss => {
                let gu = f.get(
                    slice(self.fused(i, "gate_up_proj"), vec![ne, h, 2 * inter]),
                    Use::Source,
                )?;
                let gub = f.get(
                    slice(self.fused(i, "gate_up_proj_bias"), vec![ne, 2 * inter]),
                    Use::Vector,
                )?;
                let down = f.get(
                    slice(self.fused(i, "down_proj"), vec![ne, inter, h]),
                    Use::Source,
                )?;
                let from = gu.dtype();
                let (w1, w3) = (
                    columns(&gu, h, 2 * inter, 0, 2),
                    columns(&gu, h, 2 * inter, 1, 2),
                );
                let w2 = columns(&down, inter, h, 0, 1);
                gu.release();
                down.release();
                Expert {
                    w1: f.derived(w1, from, Use::Expert),
                    w3: f.derived(w3, from, Use::Expert),
                    w2: f.derived(w2, from, Use::Expert),
                    b1: Some(every(&gub, 0, 2)),
                    b3: Some(every(&gub, 1, 2)),
                    b2: Some(f.get(
                        slice(self.fused(i, "down_proj_bias"), vec![ne, h]),
                        Use::Vector,
                    )?),
                }
            }
        })
    }

    /// Fetches (plans or builds) everything `spec` owns.
    pub fn parts(&self, spec: &ShardSpec, f: &mut dyn Fetch) -> Result<Parts> {
        let cfg = self.cfg;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let embed = if spec.embeddings || (spec.head && cfg.tie_word_embeddings) {
            Some(f.get(whole(names::EMBED.into(), vec![v, h]), Use::Matrix)?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(spec.layers.len());
        for i in spec.layers.clone() {
            let attention = if spec.attention {
                Some(LayerAttention {
                    input_norm: f.get(
                        whole(self.layer(i, "input_layernorm.weight"), vec![h]),
                        Use::Vector,
                    )?,
                    attn: self.attention(f, i)?,
                    post_norm: f.get(
                        whole(self.layer(i, "post_attention_layernorm.weight"), vec![h]),
                        Use::Vector,
                    )?,
                    ffn: self.stage_ffn(f, i)?,
                })
            } else {
                None
            };
            let mut experts = Vec::with_capacity(cfg.num_local_experts);
            for e in 0..cfg.num_local_experts {
                experts.push(if cfg.is_moe_layer(i) && spec.owns_expert(i, e) {
                    Some(self.expert(f, i, e)?)
                } else {
                    None
                });
            }
            layers.push(Layer {
                index: i,
                attention,
                experts,
            });
        }
        let (final_norm, lm_head) = if spec.head {
            let norm = f.get(whole(names::FINAL_NORM.into(), vec![h]), Use::Vector)?;
            let head = if cfg.tie_word_embeddings && !self.src.contains(names::LM_HEAD) {
                embed.clone()
            } else {
                Some(f.get(whole(names::LM_HEAD.into(), vec![v, h]), Use::Matrix)?)
            };
            (Some(norm), head)
        } else {
            (None, None)
        };
        let embed = if spec.embeddings { embed } else { None };
        Ok(Parts {
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }
}
