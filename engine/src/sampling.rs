//! Token selection: greedy, or sampling with temperature, top-k and top-p from a per-sequence
//! seeded generator (the same seed gives the same tokens whatever else is in the batch).

use crate::error::{Error, Result};
use crate::synthetic::splitmix64;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 keeps all).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 keeps all).
    pub top_k: usize,
    pub seed: Option<u64>,
    /// Keep going past end-of-sequence tokens.
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 16,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            return Err(Error::invalid("max_new_tokens", "must be at least 1"));
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::invalid(
                "temperature",
                format!("{} must be a finite number >= 0", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(
                "top_p",
                format!("{} must be > 0 and <= 1", self.top_p),
            ));
        }
        Ok(())
    }
}

/// Chooses tokens for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    top_k: usize,
    state: u64,
    order: Vec<u32>,
}

impl Sampler {
    /// `salt` distinguishes unseeded sequences from each other.
    pub fn new(p: &SamplingParams, salt: u64) -> Self {
        let state = p.seed.unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            splitmix64(nanos ^ salt.rotate_left(32))
        });
        Self {
            temperature: p.temperature,
            top_p: p.top_p,
            top_k: p.top_k,
            state,
            order: Vec::new(),
        }
    }

    fn uniform(&mut self) -> f32 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        (splitmix64(self.state) >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Picks a token from `logits` (which it may overwrite).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.temperature;
        self.order.clear();
        self.order.extend(0..logits.len() as u32);
        let keep = if self.top_k > 0 {
            self.top_k.min(logits.len())
        } else {
            logits.len()
        };
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if keep < logits.len() {
            self.order.select_nth_unstable_by(keep - 1, by_logit);
            self.order.truncate(keep);
        }
        if self.top_p < 1.0 {
            self.order.sort_unstable_by(by_logit);
        }
        let max = self
            .order
            .iter()
            .map(|&i| logits[i as usize])
            .fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f32;
        for &i in &self.order {
            let p = ((logits[i as usize] - max) * inv_t).exp();
            logits[i as usize] = p;
            total += p;
        }
        if self.top_p < 1.0 {
            // Smallest prefix (by probability) whose mass reaches top_p; at least one token.
            let mut cum = 0.0;
            let mut cut = self.order.len();
            for (n, &i) in self.order.iter().enumerate() {
                cum += logits[i as usize] / total;
                if cum >= self.top_p {
                    cut = n + 1;
                    break;
                }
            }
            self.order.truncate(cut);
            total = self.order.iter().map(|&i| logits[i as usize]).sum();
        }
        let mut r = self.uniform() * total;
        for &i in &self.order {
            r -= logits[i as usize];
            if r < 0.0 {
                return i;
            }
        }
        self.order.last().copied().unwrap_or(0)
    }
}

/// Index of the largest value; the first one on ties (as `torch.argmax`).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_first_maximum() {
        let mut s = Sampler::new(&SamplingParams::greedy(1), 0);
        assert_eq!(s.sample(&mut [0.1, 2.0, 2.0, -1.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits = [1.0f32, 0.5, 3.0, 2.5, -4.0, 0.0];
        let draw = |seed| {
            let mut s = Sampler::new(&params(1.0, 2, 1.0, seed), 0);
            (0..200)
                .map(|_| s.sample(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        let a = draw(42);
        assert_eq!(a, draw(42));
        assert_ne!(a, draw(43));
        assert!(
            a.iter().all(|&t| t == 2 || t == 3),
            "top-k=2 keeps tokens 2 and 3 only"
        );
        assert!(a.contains(&2) && a.contains(&3));
    }

    #[test]
    fn top_p_keeps_the_smallest_sufficient_set() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps the first two.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(&params(1.0, 0, 0.8, 7), 0);
        let picks: Vec<u32> = (0..300).map(|_| s.sample(&mut logits.clone())).collect();
        assert!(picks.iter().all(|&t| t < 2));
        assert!(picks.contains(&1));
    }

    #[test]
    fn low_temperature_concentrates_on_the_maximum() {
        let logits = [1.0f32, 1.5, 1.2];
        let mut s = Sampler::new(&params(0.01, 0, 1.0, 1), 0);
        assert!((0..100).all(|_| s.sample(&mut logits.clone()) == 1));
    }

    #[test]
    fn validation_names_the_field() {
        let mut p = SamplingParams::greedy(4);
        p.top_p = 0.0;
        assert!(
            p.validate()
                .expect_err("top_p")
                .to_string()
                .contains("top_p")
        );
        p.top_p = 1.0;
        p.temperature = f32::NAN;
        assert!(
            p.validate()
                .expect_err("temperature")
                .to_string()
                .contains("temperature")
        );
        assert!(SamplingParams::greedy(0).validate().is_err());
    }
}
