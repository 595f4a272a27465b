//! The sharding plan: one pure function maps a model's shape and the requested parallelism to
//! pipeline stages (contiguous layer ranges) and expert shards (a layer range × a group of
//! experts). The local launcher uses it, and so does the operator, so what runs on one machine
//! is what runs on a cluster. [`size`] adds memory: parameters, KV cache and GPUs per pod, and
//! picks the expert-shard count when none is given.

use std::ops::Range;

use serde::{Deserialize, Serialize};

pub mod host;
pub mod perf;
pub mod search;
pub mod sim;
mod sizing;
pub use sizing::{
    LatentDims, LayerSet, ModelDims, PodSizing, SizedExpertShard, SizedPlan, SizedStage,
    SizingRequest, USABLE_GPU_MEMORY_FRACTION, Variant, size,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> PlanError {
    PlanError::Invalid {
        field,
        message: message.into(),
    }
}

/// The largest layer count the planner lays out (the CRD's schema has the same maxima).
/// Together these bound every allocation and loop of planning, whatever the input.
pub const MAX_LAYERS: usize = 1024;
/// The largest expert count per layer the planner lays out.
pub const MAX_EXPERTS: usize = 1024;
/// The most pipeline stages.
pub const MAX_STAGES: usize = 1024;
/// The most expert shards.
pub const MAX_EXPERT_SHARDS: usize = 65536;

/// What the plan needs to know of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelShape {
    pub num_layers: usize,
    pub num_experts: usize,
    pub top_k: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StagePlan {
    pub index: usize,
    pub layer_start: usize,
    pub layer_end: usize,
}

impl StagePlan {
    pub fn layers(&self) -> Range<usize> {
        self.layer_start..self.layer_end
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExpertShardPlan {
    pub index: usize,
    pub layer_start: usize,
    pub layer_end: usize,
    /// Expert ids, ascending.
    pub experts: Vec<usize>,
}

impl ExpertShardPlan {
    pub fn layers(&self) -> Range<usize> {
        self.layer_start..self.layer_end
    }

    pub fn owns(&self, layer: usize, expert: usize) -> bool {
        self.layers().contains(&layer) && self.experts.binary_search(&expert).is_ok()
    }

    /// `L0-L1:E0,E1,…` — how the shard is named on command lines and in logs.
    pub fn describe(&self) -> String {
        let experts: Vec<String> = self.experts.iter().map(|e| e.to_string()).collect();
        format!(
            "layers {}..{} experts {}",
            self.layer_start,
            self.layer_end,
            experts.join(",")
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub model: ModelShape,
    pub stages: Vec<StagePlan>,
    /// Empty when the stages compute their own experts.
    pub expert_shards: Vec<ExpertShardPlan>,
}

impl Plan {
    /// The expert shards that hold (layer, expert).
    pub fn shards_for(
        &self,
        layer: usize,
        expert: usize,
    ) -> impl Iterator<Item = &ExpertShardPlan> {
        self.expert_shards
            .iter()
            .filter(move |s| s.owns(layer, expert))
    }
}

/// Splits `0..n` into `parts` contiguous ranges whose sizes differ by at most one (the first
/// `n % parts` ranges get the extra item).
pub fn split(n: usize, parts: usize) -> Vec<Range<usize>> {
    let (base, extra) = (n / parts, n % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// How `shards` expert shards tile the (layer, expert) grid: the experts split into `groups`
/// (the largest divisor of `shards` that is at most `num_experts`) and the layers into
/// `blocks = shards / groups`. `shards` must be at least 1.
pub fn tiling(num_experts: usize, shards: usize) -> (usize, usize) {
    let groups = (1..=num_experts.min(shards))
        .rev()
        .find(|&g| shards.is_multiple_of(g))
        .unwrap_or(1);
    (groups, shards / groups)
}

/// Plans `stages` pipeline stages and `expert_shards` expert shards for `model`.
///
/// Stages split the layers evenly. Expert shards tile the (layer, expert) grid: the experts
/// split into the largest number of groups that divides `expert_shards` and does not exceed
/// the expert count, and the layers into `expert_shards / groups` blocks (with as many blocks
/// as stages the blocks match the stages' ranges, so a stage calls only its own shards). Zero
/// expert shards means every stage computes its own experts.
pub fn plan(model: ModelShape, stages: usize, expert_shards: usize) -> Result<Plan, PlanError> {
    for (field, v, max) in [
        ("model.numLayers", model.num_layers, MAX_LAYERS),
        ("model.numExperts", model.num_experts, MAX_EXPERTS),
        ("stages", stages, MAX_STAGES),
        ("expertShards", expert_shards, MAX_EXPERT_SHARDS),
    ] {
        if v > max {
            return Err(invalid(
                field,
                format!("{v} is more than the planner's limit {max}"),
            ));
        }
    }
    if model.num_layers == 0 {
        return Err(invalid("model.numLayers", "must be at least 1"));
    }
    if model.num_experts == 0 {
        return Err(invalid("model.numExperts", "must be at least 1"));
    }
    if model.top_k == 0 || model.top_k > model.num_experts {
        return Err(invalid(
            "model.topK",
            format!(
                "{} must be between 1 and the expert count {}",
                model.top_k, model.num_experts
            ),
        ));
    }
    if stages == 0 {
        return Err(invalid("stages", "must be at least 1"));
    }
    if stages > model.num_layers {
        return Err(invalid(
            "stages",
            format!(
                "{stages} stages for {} layers: each stage needs at least one layer",
                model.num_layers
            ),
        ));
    }
    let stage_plans = split(model.num_layers, stages)
        .into_iter()
        .enumerate()
        .map(|(index, r)| StagePlan {
            index,
            layer_start: r.start,
            layer_end: r.end,
        })
        .collect();
    let mut shards = Vec::new();
    if expert_shards > 0 {
        let (groups, blocks) = tiling(model.num_experts, expert_shards);
        if blocks > model.num_layers {
            return Err(invalid(
                "expertShards",
                format!(
                    "{expert_shards} shards cannot tile {} layers × {} experts",
                    model.num_layers, model.num_experts
                ),
            ));
        }
        for layers in split(model.num_layers, blocks) {
            for experts in split(model.num_experts, groups) {
                shards.push(ExpertShardPlan {
                    index: shards.len(),
                    layer_start: layers.start,
                    layer_end: layers.end,
                    experts: experts.collect(),
                });
            }
        }
    }
    Ok(Plan {
        model,
        stages: stage_plans,
        expert_shards: shards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPT4: ModelShape = ModelShape {
        num_layers: 120,
        num_experts: 16,
        top_k: 2,
    };

    /// Every (layer, expert) is held by exactly one shard, and every layer by one stage.
    fn assert_covers(p: &Plan) {
        let mut layer = 0;
        for s in &p.stages {
            assert_eq!(s.layer_start, layer);
            assert!(s.layer_end > s.layer_start);
            layer = s.layer_end;
        }
        assert_eq!(layer, p.model.num_layers);
        if p.expert_shards.is_empty() {
            return;
        }
        for l in 0..p.model.num_layers {
            for e in 0..p.model.num_experts {
                assert_eq!(p.shards_for(l, e).count(), 1, "layer {l} expert {e}");
            }
        }
    }

    #[test]
    fn gpt4_over_4_stages_and_4_shards() {
        let p = plan(GPT4, 4, 4).unwrap();
        assert_covers(&p);
        assert_eq!(p.stages[1].layers(), 30..60);
        // 4 groups of 4 experts, each over every layer.
        assert_eq!(p.expert_shards[2].experts, vec![8, 9, 10, 11]);
        assert_eq!(p.expert_shards[2].layers(), 0..120);
    }

    #[test]
    fn more_shards_than_experts_tile_layers_too() {
        let p = plan(GPT4, 4, 64).unwrap();
        assert_covers(&p);
        // 16 groups of one expert, 4 layer blocks matching the 4 stages.
        assert_eq!(p.expert_shards.len(), 64);
        assert_eq!(p.expert_shards[16].layers(), p.stages[1].layers());
        assert_eq!(p.expert_shards[17].experts, vec![1]);
    }

    #[test]
    fn uneven_splits_and_odd_counts() {
        let m = ModelShape {
            num_layers: 7,
            num_experts: 6,
            top_k: 3,
        };
        for stages in 1..=7 {
            for shards in 0..=12 {
                match plan(m, stages, shards) {
                    Ok(p) => assert_covers(&p),
                    // 11 shards: one group of experts, and 11 blocks of 7 layers cannot be.
                    Err(e) if shards > 7 => assert!(e.to_string().starts_with("expertShards")),
                    Err(e) => panic!("{stages} stages {shards} shards: {e}"),
                }
            }
        }
        assert_eq!(split(7, 3), vec![0..3, 3..5, 5..7]);
    }

    #[test]
    fn rejects_impossible_plans_naming_the_field() {
        let e = plan(GPT4, 121, 4).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("stages: 121 stages for 120 layers"),
            "{e}"
        );
        let small = ModelShape {
            num_layers: 2,
            num_experts: 2,
            top_k: 2,
        };
        let e = plan(small, 1, 6).unwrap_err();
        assert!(e.to_string().starts_with("expertShards:"), "{e}");
        let bad = ModelShape { top_k: 3, ..small };
        assert!(
            plan(bad, 1, 1)
                .unwrap_err()
                .to_string()
                .starts_with("model.topK")
        );
        assert!(plan(GPT4, 0, 1).is_err());
    }

    #[test]
    fn serialises_camel_case() {
        let p = plan(GPT4, 2, 2).unwrap();
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["expertShards"][1]["experts"][0], 8);
        assert_eq!(v["stages"][1]["layerStart"], 60);
        let back: Plan = serde_json::from_value(v).unwrap();
        assert_eq!(back, p);
    }
}

/// How many sequences each of `gateways` gateway replicas may run at once when the stages hold
/// KV caches for `max_sequences`: an equal share, rounded down, so that together they never
/// admit more than a stage accepts (at least 1 each; callers refuse `gateways >
/// max_sequences`). The operator and the local launcher both use it.
pub fn gateway_share(max_sequences: usize, gateways: usize) -> usize {
    (max_sequences / gateways.max(1)).max(1)
}

#[cfg(test)]
mod share_tests {
    #[test]
    fn shares_never_add_up_past_the_stage_capacity() {
        for total in 1..50 {
            for gateways in 1..=total {
                let share = super::gateway_share(total, gateways);
                assert!(share >= 1);
                assert!(
                    share * gateways <= total,
                    "{total} among {gateways}: {share}"
                );
            }
        }
    }
}
