//! Continuous batching over one model: sequences join and leave between steps; each step
//! runs every pending prompt token (chunked by a token budget) and one decode token per
//! running sequence through the model in one batch, then samples.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::model::{Chunk, KvCache, LocalExperts, Model, MoeScratch, Scratch};
use crate::sampling::{Sampler, SamplingParams};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token was produced.
    Stop,
    /// `max_new_tokens` or the model's context length was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// A token produced for a sequence in one step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub seq: SeqId,
    pub token: u32,
    pub finish: Option<FinishReason>,
}

#[derive(Debug)]
struct Sequence {
    id: SeqId,
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens already run through the model (their keys and values are cached).
    processed: usize,
    sampler: Sampler,
    params: SamplingParams,
    finish: Option<FinishReason>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Most tokens one step runs (prompt chunks plus decode tokens).
    pub max_batch_tokens: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_batch_tokens: 2048,
        }
    }
}

/// What the batcher needs to know of a model.
#[derive(Debug, Clone)]
pub struct BatchLimits {
    pub vocab_size: usize,
    pub max_positions: usize,
    pub eos_token_ids: Vec<u32>,
}

impl BatchLimits {
    pub fn of(cfg: &crate::config::ModelConfig) -> Self {
        Self {
            vocab_size: cfg.vocab_size,
            max_positions: cfg.max_position_embeddings,
            eos_token_ids: cfg.eos_token_ids.clone(),
        }
    }
}

/// One scheduled step: for each member sequence a chunk of its tokens, all chunks'
/// token ids in row order, and which members get a new token sampled.
#[derive(Debug, Clone, Default)]
pub struct Step {
    pub seqs: Vec<SeqId>,
    pub chunks: Vec<Chunk>,
    pub ids: Vec<u32>,
    /// Positions each new sequence's KV cache should reserve (0 for known sequences).
    pub capacities: Vec<usize>,
    /// Indexes into `seqs` of the sequences sampled after this step, in order.
    pub sampled: Vec<usize>,
}

impl Step {
    /// Batch rows whose outputs are sampled (each sampled sequence's last row).
    pub fn sample_rows(&self) -> Vec<usize> {
        let mut ends = Vec::with_capacity(self.chunks.len());
        let mut row = 0;
        for c in &self.chunks {
            row += c.len;
            ends.push(row - 1);
        }
        self.sampled.iter().map(|&m| ends[m]).collect()
    }
}

/// Continuous-batching bookkeeping without a model: which sequences run in the next step,
/// chunked by a token budget, and sampling once the step's logits are known. The local
/// engine and the gateway (whose model runs in other processes) share it.
#[derive(Debug)]
pub struct Batcher {
    limits: BatchLimits,
    opts: EngineOptions,
    seqs: Vec<Sequence>,
}

impl Batcher {
    pub fn new(limits: BatchLimits, opts: EngineOptions) -> Result<Self> {
        if opts.max_batch_tokens == 0 {
            return Err(Error::invalid("max_batch_tokens", "must be at least 1"));
        }
        Ok(Self {
            limits,
            opts,
            seqs: Vec::new(),
        })
    }

    /// Checks a prompt and parameters as `add` would.
    pub fn check(&self, prompt: &[u32], params: &SamplingParams) -> Result<()> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(Error::invalid("prompt", "must contain at least one token"));
        }
        if let Some(&bad) = prompt
            .iter()
            .find(|&&t| t as usize >= self.limits.vocab_size)
        {
            return Err(Error::invalid(
                "token id",
                format!(
                    "{bad} is outside the vocabulary (vocab_size {})",
                    self.limits.vocab_size
                ),
            ));
        }
        let max_pos = self.limits.max_positions;
        if prompt.len() >= max_pos {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "{} tokens leave no room to generate (context length {max_pos})",
                    prompt.len()
                ),
            ));
        }
        Ok(())
    }

    /// Adds a sequence under a caller-chosen id; it joins the batch at the next step.
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>, params: SamplingParams) -> Result<()> {
        self.check(&prompt, &params)?;
        if self.seqs.iter().any(|s| s.id == id) {
            return Err(Error::invalid("sequence", format!("id {} is in use", id.0)));
        }
        self.seqs.push(Sequence {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            processed: 0,
            sampler: Sampler::new(&params, id.0),
            params,
            finish: None,
        });
        Ok(())
    }

    /// Removes a sequence, finished or not.
    pub fn remove(&mut self, id: SeqId) -> bool {
        let before = self.seqs.len();
        self.seqs.retain(|s| s.id != id);
        self.seqs.len() != before
    }

    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.iter().map(|s| s.id)
    }

    /// Whether any sequence still needs a step.
    pub fn has_work(&self) -> bool {
        self.seqs.iter().any(|s| s.finish.is_none())
    }

    /// Prompt and generated tokens of a sequence.
    pub fn tokens(&self, id: SeqId) -> Option<(&[u32], &[u32])> {
        self.seqs
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.tokens.split_at(s.prompt_len))
    }

    /// The next step: every unfinished sequence's pending tokens, up to the token budget.
    pub fn schedule(&self) -> Option<Step> {
        let mut budget = self.opts.max_batch_tokens;
        let mut step = Step::default();
        for s in &self.seqs {
            if s.finish.is_some() || budget == 0 {
                continue;
            }
            let take = (s.tokens.len() - s.processed).min(budget);
            budget -= take;
            step.chunks.push(Chunk {
                start: s.processed,
                len: take,
            });
            step.ids
                .extend_from_slice(&s.tokens[s.processed..s.processed + take]);
            step.capacities.push(if s.processed == 0 {
                (s.prompt_len + s.params.max_new_tokens).min(self.limits.max_positions)
            } else {
                0
            });
            if s.processed + take == s.tokens.len() {
                step.sampled.push(step.seqs.len());
            }
            step.seqs.push(s.id);
        }
        (!step.seqs.is_empty()).then_some(step)
    }

    /// Records that `step` ran, and samples one token per sampled sequence from `logits`
    /// (`step.sampled.len() × vocab`, in that order).
    pub fn commit(&mut self, step: &Step, logits: &mut [f32]) -> Vec<TokenEvent> {
        let vocab = self.limits.vocab_size;
        let mut events = Vec::with_capacity(step.sampled.len());
        let mut k = 0;
        for (m, (id, c)) in step.seqs.iter().zip(&step.chunks).enumerate() {
            let Some(s) = self.seqs.iter_mut().find(|s| s.id == *id) else {
                if step.sampled.contains(&m) {
                    k += 1;
                }
                continue;
            };
            s.processed += c.len;
            if !step.sampled.contains(&m) {
                continue;
            }
            let row = &mut logits[k * vocab..(k + 1) * vocab];
            k += 1;
            let token = s.sampler.sample(row);
            s.tokens.push(token);
            let finish = if !s.params.ignore_eos && self.limits.eos_token_ids.contains(&token) {
                Some(FinishReason::Stop)
            } else if s.generated() >= s.params.max_new_tokens
                || s.tokens.len() >= self.limits.max_positions
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            s.finish = finish;
            events.push(TokenEvent {
                seq: s.id,
                token,
                finish,
            });
        }
        events
    }
}

/// The whole model in one process, with continuous batching.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    batcher: Batcher,
    caches: HashMap<SeqId, KvCache>,
    next_id: u64,
    scratch: Scratch,
    moe: MoeScratch,
    hidden: Vec<f32>,
    logits: Vec<f32>,
}

impl Engine {
    /// An engine over a whole model (embeddings, every layer and expert, LM head).
    pub fn new(model: Model, opts: EngineOptions) -> Result<Self> {
        let cfg = model.config();
        let whole = model.owns_embeddings()
            && model.owns_head()
            && model.layers().len() == cfg.num_hidden_layers
            && model.owned_experts().len() == cfg.routed_expert_count();
        if !whole {
            return Err(Error::invalid(
                "model part",
                "the single-process engine needs the whole model",
            ));
        }
        let batcher = Batcher::new(BatchLimits::of(cfg), opts)?;
        Ok(Self {
            model,
            batcher,
            caches: HashMap::new(),
            next_id: 0,
            scratch: Scratch::default(),
            moe: MoeScratch::default(),
            hidden: Vec::new(),
            logits: Vec::new(),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Adds a sequence; it joins the batch at the next step.
    pub fn add(&mut self, prompt: Vec<u32>, params: SamplingParams) -> Result<SeqId> {
        let id = SeqId(self.next_id);
        self.batcher.add(id, prompt, params)?;
        self.next_id += 1;
        Ok(id)
    }

    /// Removes a sequence (finished or not) and frees its cache.
    pub fn remove(&mut self, id: SeqId) -> bool {
        self.caches.remove(&id);
        self.batcher.remove(id)
    }

    /// Whether any sequence still needs a step.
    pub fn has_work(&self) -> bool {
        self.batcher.has_work()
    }

    /// Prompt and generated tokens of a sequence.
    pub fn tokens(&self, id: SeqId) -> Option<(&[u32], &[u32])> {
        self.batcher.tokens(id)
    }

    /// Runs one batch step and returns the tokens it produced.
    pub fn step(&mut self) -> Result<Vec<TokenEvent>> {
        let Some(step) = self.batcher.schedule() else {
            return Ok(Vec::new());
        };
        self.model.embed(&step.ids, &mut self.hidden)?;
        let mut caches: Vec<KvCache> = step
            .seqs
            .iter()
            .zip(&step.capacities)
            .map(|(id, &cap)| {
                self.caches
                    .remove(id)
                    .unwrap_or_else(|| self.model.new_cache(cap))
            })
            .collect();
        let result = {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let mut experts = LocalExperts {
                model: &self.model,
                scratch: &mut self.moe,
            };
            self.model.forward_layers(
                &mut self.hidden,
                &step.chunks,
                &mut refs,
                &mut experts,
                &mut self.scratch,
            )
        };
        for (id, cache) in step.seqs.iter().zip(caches) {
            self.caches.insert(*id, cache);
        }
        result?;
        self.model.logits(
            &self.hidden,
            &step.sample_rows(),
            &mut self.logits,
            &mut self.scratch,
        )?;
        Ok(self.batcher.commit(&step, &mut self.logits))
    }

    /// Generates for one prompt to completion (the `generate` command's path).
    pub fn generate(
        &mut self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<(Vec<u32>, FinishReason)> {
        let id = self.add(prompt, params)?;
        let mut out = Vec::new();
        loop {
            for e in self.step()? {
                if e.seq == id {
                    out.push(e.token);
                    if let Some(f) = e.finish {
                        self.remove(id);
                        return Ok((out, f));
                    }
                }
            }
        }
    }
}
