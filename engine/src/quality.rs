//! What a cheaper weight format costs in quality: the same prompts through a reference model
//! (f32) and a test model (bf16 or 8-bit experts), comparing next-token distributions at
//! every position and the greedy continuations.

use crate::error::Result;
use crate::model::{Chunk, LocalExperts, Model, MoeScratch, Scratch};
use crate::sampling::argmax;

/// Agreement of a test model with a reference over a set of prompts.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Quality {
    /// Positions compared (every prompt position plus the reference's greedy continuation).
    pub positions: usize,
    /// Share of positions where both models' most likely next token is the same.
    pub top1_agreement: f64,
    /// Mean KL(reference ‖ test) of the next-token distributions, in nats.
    pub mean_kl: f64,
    pub max_kl: f64,
    /// Share of the greedy continuations' tokens equal to the reference's, each continuation
    /// counted up to its first difference.
    pub greedy_agreement: f64,
}

/// Log-probabilities of `logits` (one row).
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

/// KL(p ‖ q) from log-probabilities.
fn kl(lp: &[f64], lq: &[f64]) -> f64 {
    lp.iter()
        .zip(lq)
        .map(|(&a, &b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

/// One whole model (embeddings to head) run over a sequence one chunk at a time.
struct Runner<'a> {
    model: &'a Model,
    cache: crate::model::KvCache,
    scratch: Scratch,
    moe: MoeScratch,
}

impl<'a> Runner<'a> {
    fn new(model: &'a Model, capacity: usize) -> Self {
        Self {
            model,
            cache: model.new_cache(capacity),
            scratch: Scratch::default(),
            moe: MoeScratch::default(),
        }
    }

    /// Logits (`ids.len() × vocab`) of every position of `ids`, appended to the sequence.
    fn feed(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut hidden = Vec::new();
        self.model.embed(ids, &mut hidden)?;
        let chunks = [Chunk {
            start: self.cache.len(),
            len: ids.len(),
        }];
        let mut experts = LocalExperts {
            model: self.model,
            scratch: &mut self.moe,
        };
        self.model.forward_layers(
            &mut hidden,
            &chunks,
            &mut [&mut self.cache],
            &mut experts,
            &mut self.scratch,
        )?;
        let rows: Vec<usize> = (0..ids.len()).collect();
        let mut logits = Vec::new();
        self.model
            .logits(&hidden, &rows, &mut logits, &mut self.scratch)?;
        Ok(logits)
    }
}

/// Compares `test` against `reference` (both whole models of the same checkpoint) on
/// `prompts`, each continued greedily for `continue_tokens` tokens.
pub fn compare(
    reference: &Model,
    test: &Model,
    prompts: &[Vec<u32>],
    continue_tokens: usize,
) -> Result<Quality> {
    let vocab = reference.config().vocab_size;
    let (mut positions, mut agree, mut kl_sum, mut kl_max) = (0usize, 0usize, 0f64, 0f64);
    let (mut greedy_same, mut greedy_total) = (0usize, 0usize);
    for prompt in prompts {
        let cap = prompt.len() + continue_tokens + 1;
        let (mut r, mut t) = (Runner::new(reference, cap), Runner::new(test, cap));
        // The test model follows the reference's tokens (teacher forcing), so every position
        // compares the same context: one input for both.
        let mut input = prompt.clone();
        let mut diverged = false;
        for step in 0..=continue_tokens {
            let (rl, tl) = (r.feed(&input)?, t.feed(&input)?);
            for (a, b) in rl.chunks_exact(vocab).zip(tl.chunks_exact(vocab)) {
                let d = kl(&log_softmax(a), &log_softmax(b));
                kl_sum += d;
                kl_max = kl_max.max(d);
                agree += usize::from(argmax(a) == argmax(b));
                positions += 1;
            }
            if step == continue_tokens {
                break;
            }
            let (rn, tn) = (
                argmax(&rl[rl.len() - vocab..]),
                argmax(&tl[tl.len() - vocab..]),
            );
            greedy_total += 1;
            diverged |= rn != tn;
            greedy_same += usize::from(!diverged);
            input = vec![rn];
        }
    }
    let share = |a: usize, b: usize| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    Ok(Quality {
        positions,
        top1_agreement: share(agree, positions),
        mean_kl: if positions == 0 {
            0.0
        } else {
            kl_sum / positions as f64
        },
        max_kl: kl_max,
        greedy_agreement: share(greedy_same, greedy_total),
    })
}
