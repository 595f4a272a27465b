//! Routing (every family's: softmax or sigmoid scores, selection bias, group-limited top-k,
//! renormalisation and scaling, as transformers computes them) and the local experts. The
//! router is separate from the experts: a stage routes, and whoever owns an expert computes
//! it.

use super::Layer;
use crate::config::{Activation, GroupScore, ModelConfig, RouterConfig, Scoring};
use crate::error::{Error, Result};
use crate::kernels::{self, MatMul};

/// Computes `out[rows, hidden] = Σ_k weight_k · expert_k(x[row])` for a layer's routing.
pub trait ExpertCompute {
    fn compute(
        &mut self,
        layer: usize,
        routing: &Routing,
        x: &[f32],
        out: &mut [f32],
    ) -> Result<()>;
}

/// One layer's routing decision for a batch, grouped by expert.
#[derive(Debug, Default, Clone)]
pub struct Routing {
    pub rows: usize,
    pub top_k: usize,
    /// `rows × top_k` chosen experts, best first.
    pub experts: Vec<u32>,
    /// `rows × top_k` renormalised weights.
    pub weights: Vec<f32>,
    /// For expert `e`, its assignments are `assignments[offsets[e]..offsets[e + 1]]`.
    pub offsets: Vec<usize>,
    /// (row, weight), grouped by expert, rows ascending within a group.
    pub assignments: Vec<(u32, f32)>,
    probs: Vec<f32>,
    fill: Vec<usize>,
    scratch: RouteScratch,
}

/// Buffers `route_with` reuses across layers (it runs per layer on the decode path).
#[derive(Debug, Default, Clone)]
struct RouteScratch {
    picked: Vec<usize>,
    group_scores: Vec<f32>,
    groups_kept: Vec<usize>,
}

impl Routing {
    /// Routes `rows` rows from their router logits (`rows × num_experts`) as Mixtral does:
    /// softmax, top-k, renormalised.
    pub fn route(&mut self, logits: &[f32], rows: usize, num_experts: usize, top_k: usize) {
        self.route_with(
            &RouterConfig::mixtral(),
            logits,
            None,
            rows,
            num_experts,
            top_k,
        );
    }

    /// Routes `rows` rows from their router logits (`rows × num_experts`, router bias
    /// included) by `cfg`. `correction` is added to the scores to choose experts only.
    /// Ties go to the lower expert id.
    pub fn route_with(
        &mut self,
        cfg: &RouterConfig,
        logits: &[f32],
        correction: Option<&[f32]>,
        rows: usize,
        num_experts: usize,
        top_k: usize,
    ) {
        self.rows = rows;
        self.top_k = top_k;
        self.experts.clear();
        self.weights.clear();
        let mut probs = std::mem::take(&mut self.probs);
        probs.resize(2 * num_experts, 0.0);
        let (scores, choice) = probs.split_at_mut(num_experts);
        let mut sc = std::mem::take(&mut self.scratch);
        let RouteScratch {
            picked,
            group_scores,
            groups_kept,
        } = &mut sc;
        let group_size = num_experts / cfg.groups.max(1);
        group_scores.clear();
        group_scores.resize(cfg.groups.max(1), 0.0);
        for r in 0..rows {
            let l = &logits[r * num_experts..(r + 1) * num_experts];
            match cfg.scoring {
                Scoring::Softmax => {
                    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for (p, &x) in scores.iter_mut().zip(l) {
                        *p = (x - max).exp();
                        sum += *p;
                    }
                    for p in scores.iter_mut() {
                        *p /= sum;
                    }
                }
                Scoring::Sigmoid => {
                    for (p, &x) in scores.iter_mut().zip(l) {
                        *p = 1.0 / (1.0 + (-x).exp());
                    }
                }
                Scoring::TopKThenSoftmax => scores.copy_from_slice(l),
            }
            choice.copy_from_slice(scores);
            if let Some(b) = correction {
                for (c, b) in choice.iter_mut().zip(b) {
                    *c += b;
                }
            }
            if cfg.groups > 1 {
                for (g, gs) in group_scores.iter_mut().enumerate() {
                    let members = &choice[g * group_size..(g + 1) * group_size];
                    *gs = match cfg.group_score {
                        GroupScore::Max => {
                            members.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                        }
                        GroupScore::TopTwoSum => {
                            let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                            for &x in members {
                                if x > a {
                                    (a, b) = (x, a);
                                } else if x > b {
                                    b = x;
                                }
                            }
                            a + b
                        }
                    };
                }
                top_indices(group_scores, cfg.topk_groups, groups_kept);
                for (e, c) in choice.iter_mut().enumerate() {
                    if !groups_kept.contains(&(e / group_size)) {
                        *c = f32::NEG_INFINITY;
                    }
                }
            }
            top_indices(choice, top_k, picked);
            let start = self.weights.len();
            for &e in picked.iter() {
                self.experts.push(e as u32);
                self.weights.push(scores[e]);
            }
            let w = &mut self.weights[start..];
            match cfg.scoring {
                Scoring::TopKThenSoftmax => {
                    let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for x in w.iter_mut() {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                    w.iter_mut().for_each(|x| *x /= sum);
                }
                _ if cfg.renormalize => {
                    let mut total: f32 = w.iter().sum();
                    if cfg.scoring == Scoring::Sigmoid {
                        total += 1e-20;
                    }
                    w.iter_mut().for_each(|x| *x /= total);
                }
                _ => {}
            }
            if cfg.scale != 1.0 {
                let s = cfg.scale as f32;
                w.iter_mut().for_each(|x| *x *= s);
            }
        }
        self.probs = probs;
        self.scratch = sc;
        self.group(num_experts);
    }

    /// Builds the per-expert grouping from `experts` and `weights`.
    pub fn group(&mut self, num_experts: usize) {
        self.offsets.clear();
        self.offsets.resize(num_experts + 1, 0);
        for &e in &self.experts {
            self.offsets[e as usize + 1] += 1;
        }
        for e in 0..num_experts {
            self.offsets[e + 1] += self.offsets[e];
        }
        self.assignments.clear();
        self.assignments.resize(self.experts.len(), (0, 0.0));
        self.fill.clear();
        self.fill.extend_from_slice(&self.offsets);
        for (i, (&e, &w)) in self.experts.iter().zip(&self.weights).enumerate() {
            let slot = &mut self.fill[e as usize];
            self.assignments[*slot] = ((i / self.top_k.max(1)) as u32, w);
            *slot += 1;
        }
    }

    /// The assignments whose expert satisfies `keep` (what one expert shard is sent), with
    /// rows and weights unchanged.
    pub fn subset(&self, keep: impl Fn(usize) -> bool) -> Routing {
        let n = self.num_experts();
        let mut offsets = vec![0; n + 1];
        let mut assignments = Vec::new();
        for e in 0..n {
            if keep(e) {
                assignments.extend_from_slice(self.for_expert(e));
            }
            offsets[e + 1] = assignments.len();
        }
        Routing {
            rows: self.rows,
            top_k: self.top_k,
            experts: Vec::new(),
            weights: Vec::new(),
            offsets,
            assignments,
            probs: Vec::new(),
            fill: Vec::new(),
            scratch: RouteScratch::default(),
        }
    }

    pub fn num_experts(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// (row, weight) pairs routed to expert `e`.
    pub fn for_expert(&self, e: usize) -> &[(u32, f32)] {
        &self.assignments[self.offsets[e]..self.offsets[e + 1]]
    }

    /// Tokens routed to each expert in this batch.
    pub fn counts(&self) -> impl Iterator<Item = usize> + '_ {
        self.offsets.windows(2).map(|w| w[1] - w[0])
    }
}

/// The indices of the `k` largest values, largest first; ties go to the lower index.
fn top_indices(values: &[f32], k: usize, picked: &mut Vec<usize>) {
    picked.clear();
    for _ in 0..k.min(values.len()) {
        let best = (0..values.len())
            .filter(|i| !picked.contains(i))
            .fold(None, |b: Option<usize>, i| match b {
                Some(b) if values[b] >= values[i] => Some(b),
                _ => Some(i),
            })
            .unwrap_or(0);
        picked.push(best);
    }
}

/// Buffers for the experts' gathered inputs and intermediates, reused across layers.
#[derive(Debug, Default)]
pub struct MoeScratch {
    gathered: Vec<f32>,
    groups: Vec<(usize, usize)>,
    offsets: Vec<usize>,
    gate: Vec<f32>,
    up: Vec<f32>,
    pub(super) down: Vec<f32>,
}

/// Appends the rows of `x` routed to the experts that satisfy `keep` to `gathered`, grouped
/// by expert in ascending order, and lists (expert, rows) in `groups`: what one expert shard
/// is sent for a layer.
pub fn gather(
    routing: &Routing,
    keep: impl Fn(usize) -> bool,
    x: &[f32],
    h: usize,
    gathered: &mut Vec<f32>,
    groups: &mut Vec<(usize, usize)>,
) {
    for e in 0..routing.num_experts() {
        let group = routing.for_expert(e);
        if group.is_empty() || !keep(e) {
            continue;
        }
        groups.push((e, group.len()));
        for &(row, _) in group {
            let row = row as usize;
            gathered.extend_from_slice(&x[row * h..(row + 1) * h]);
        }
    }
}

/// Adds expert `e`'s weighted outputs (`down`, one row per assignment in routing order) into
/// `out`. Called for experts in ascending order, it sums exactly as the local path does.
pub fn scatter_add(routing: &Routing, e: usize, down: &[f32], h: usize, out: &mut [f32]) {
    for (i, &(row, w)) in routing.for_expert(e).iter().enumerate() {
        let row = row as usize;
        kernels::axpy(
            w,
            &down[i * h..(i + 1) * h],
            &mut out[row * h..(row + 1) * h],
        );
    }
}

/// Runs the experts of `layer` that have rows, each over only its rows, and accumulates the
/// weighted results into `out` (which is overwritten).
pub(super) fn compute_local(
    cfg: &ModelConfig,
    layer: &Layer,
    routing: &Routing,
    x: &[f32],
    out: &mut [f32],
    s: &mut MoeScratch,
) -> Result<()> {
    let h = cfg.hidden_size;
    out.fill(0.0);
    let mut gathered = std::mem::take(&mut s.gathered);
    let mut groups = std::mem::take(&mut s.groups);
    gathered.clear();
    groups.clear();
    gather(routing, |_| true, x, h, &mut gathered, &mut groups);
    let result = ffn_groups(cfg, layer, &groups, &gathered, s);
    s.gathered = gathered;
    s.groups = groups;
    result?;
    for e in 0..routing.num_experts() {
        let base = routing.offsets[e];
        let n = routing.offsets[e + 1] - base;
        scatter_add(routing, e, &s.down[base * h..(base + n) * h], h, out);
    }
    Ok(())
}

/// Runs each expert of `groups` (ascending (expert, rows)) over its consecutive rows of `x`;
/// the outputs land in the same rows of `s.down`.
pub(super) fn ffn_groups(
    cfg: &ModelConfig,
    layer: &Layer,
    groups: &[(usize, usize)],
    x: &[f32],
    s: &mut MoeScratch,
) -> Result<()> {
    let (h, inter, ne) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_local_experts,
    );
    let total: usize = groups.iter().map(|g| g.1).sum();
    if x.len() != total * h {
        return Err(Error::invalid(
            "expert input",
            format!("{} values for {total} rows of width {h}", x.len()),
        ));
    }
    s.offsets.clear();
    s.offsets.resize(ne + 1, 0);
    let mut prev = None;
    for &(e, rows) in groups {
        if e >= ne {
            return Err(Error::invalid(
                "expert",
                format!("{e} is outside the model's {ne} experts"),
            ));
        }
        if prev.is_some_and(|p| p >= e) {
            return Err(Error::invalid(
                "expert",
                "experts must be listed in ascending order",
            ));
        }
        prev = Some(e);
        if layer.experts.get(e).is_none_or(Option::is_none) {
            return Err(Error::invalid(
                "expert",
                format!("layer {} expert {e} is not owned by this part", layer.index),
            ));
        }
        s.offsets[e + 1] = rows;
    }
    for e in 0..ne {
        s.offsets[e + 1] += s.offsets[e];
    }
    s.gate.resize(total * inter, 0.0);
    s.up.resize(total * inter, 0.0);
    s.down.resize(total * h, 0.0);
    let offsets = std::mem::take(&mut s.offsets);
    swiglu_grouped(cfg.arch.activation, layer, &offsets, h, inter, x, s);
    s.offsets = offsets;
    Ok(())
}

/// For each expert `e` with rows `offsets[e]..offsets[e+1]` of `x`, writes its FFN output
/// to the same rows of `s.down`. Gate and up projections of every active expert run in one
/// parallel region, then every down projection in another.
fn swiglu_grouped(
    act: Activation,
    layer: &Layer,
    offsets: &[usize],
    h: usize,
    inter: usize,
    x: &[f32],
    s: &mut MoeScratch,
) {
    let active = || {
        (0..offsets.len() - 1).filter_map(|e| {
            let (a, b) = (offsets[e], offsets[e + 1]);
            let expert = layer.experts.get(e)?.as_ref()?;
            (b > a).then_some((expert, a, b))
        })
    };
    {
        let mut jobs = Vec::new();
        let (mut gate, mut up) = (s.gate.as_mut_slice(), s.up.as_mut_slice());
        let mut consumed = 0;
        for (ex, a, b) in active() {
            let m = b - a;
            let (_, g_rest) = std::mem::take(&mut gate).split_at_mut((a - consumed) * inter);
            let (g, g_rest) = g_rest.split_at_mut(m * inter);
            let (_, u_rest) = std::mem::take(&mut up).split_at_mut((a - consumed) * inter);
            let (u, u_rest) = u_rest.split_at_mut(m * inter);
            gate = g_rest;
            up = u_rest;
            consumed = b;
            let xe = &x[a * h..b * h];
            jobs.push(MatMul::new(xe, ex.w1.mat(), g, m, inter, h));
            jobs.push(MatMul::new(xe, ex.w3.mat(), u, m, inter, h));
        }
        kernels::matmul_many(&mut jobs);
    }
    let end = offsets.last().copied().unwrap_or(0);
    for (ex, a, b) in active() {
        let rows = |v: &mut [f32], bias: &Option<crate::weights::Weight>| {
            if let Some(bias) = bias {
                for row in v[a * inter..b * inter].chunks_exact_mut(inter) {
                    for (x, b) in row.iter_mut().zip(bias.as_slice()) {
                        *x += b;
                    }
                }
            }
        };
        rows(&mut s.gate, &ex.b1);
        rows(&mut s.up, &ex.b3);
    }
    activate(act, &mut s.gate[..end * inter], &s.up[..end * inter]);
    let mut jobs = Vec::new();
    let mut down = s.down.as_mut_slice();
    let mut consumed = 0;
    for (ex, a, b) in active() {
        let m = b - a;
        let (_, rest) = std::mem::take(&mut down).split_at_mut((a - consumed) * h);
        let (d, rest) = rest.split_at_mut(m * h);
        down = rest;
        consumed = b;
        jobs.push(MatMul::new(
            &s.gate[a * inter..b * inter],
            ex.w2.mat(),
            d,
            m,
            h,
            inter,
        ));
    }
    kernels::matmul_many(&mut jobs);
    for (ex, a, b) in active() {
        if let Some(bias) = &ex.b2 {
            for row in s.down[a * h..b * h].chunks_exact_mut(h) {
                for (x, b) in row.iter_mut().zip(bias.as_slice()) {
                    *x += b;
                }
            }
        }
    }
}

/// `gate = act(gate, up)` elementwise.
pub(super) fn activate(act: Activation, gate: &mut [f32], up: &[f32]) {
    match act {
        Activation::Silu => {
            for (g, u) in gate.iter_mut().zip(up) {
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
        }
        Activation::ClampedSwiglu { alpha, limit } => {
            let (alpha, limit) = (alpha as f32, limit as f32);
            for (g, u) in gate.iter_mut().zip(up) {
                let x = g.min(limit);
                let u = u.clamp(-limit, limit);
                let glu = x / (1.0 + (-x * alpha).exp());
                *g = (u + 1.0) * glu;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_like_transformers() {
        // softmax([1, 3, 2, 0]) -> top-2 = experts 1 and 2, renormalised.
        let mut r = Routing::default();
        r.route(&[1.0, 3.0, 2.0, 0.0, 0.0, 0.0, 5.0, 0.0], 2, 4, 2);
        assert_eq!(&r.experts[..2], &[1, 2]);
        let (e1, e2) = (3f32.exp(), 2f32.exp());
        assert!((r.weights[0] - e1 / (e1 + e2)).abs() < 1e-6);
        assert!((r.weights[0] + r.weights[1] - 1.0).abs() < 1e-6);
        // Row 1: expert 2 first, then a tie among the rest goes to the lowest id.
        assert_eq!(&r.experts[2..], &[2, 0]);
        assert_eq!(r.for_expert(2), &[(0, r.weights[1]), (1, r.weights[2])]);
        assert_eq!(r.counts().collect::<Vec<_>>(), vec![1, 1, 2, 0]);
    }

    #[test]
    fn top_k_equal_to_expert_count_uses_every_expert() {
        let mut r = Routing::default();
        r.route(&[0.5, -1.0, 2.0], 1, 3, 3);
        let mut e = r.experts.clone();
        e.sort();
        assert_eq!(e, vec![0, 1, 2]);
        assert!((r.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
