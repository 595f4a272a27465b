//! Continuous batching over one model: sequences join and leave between steps; each step
//! runs every pending prompt token (chunked by a token budget) and one decode token per
//! running sequence through the model in one batch, then samples.

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
    cache: KvCache,
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

#[derive(Debug)]
pub struct Engine {
    model: Model,
    opts: EngineOptions,
    seqs: Vec<Sequence>,
    next_id: u64,
    scratch: Scratch,
    moe: MoeScratch,
    hidden: Vec<f32>,
    logits: Vec<f32>,
    ids: Vec<u32>,
}

impl Engine {
    /// An engine over a whole model (embeddings, every layer and expert, LM head).
    pub fn new(model: Model, opts: EngineOptions) -> Result<Self> {
        let cfg = model.config();
        let whole = model.owns_embeddings()
            && model.owns_head()
            && model.layers().len() == cfg.num_hidden_layers
            && model.owned_experts().len() == cfg.num_hidden_layers * cfg.num_local_experts;
        if !whole {
            return Err(Error::invalid(
                "model part",
                "the single-process engine needs the whole model",
            ));
        }
        if opts.max_batch_tokens == 0 {
            return Err(Error::invalid("max_batch_tokens", "must be at least 1"));
        }
        Ok(Self {
            model,
            opts,
            seqs: Vec::new(),
            next_id: 0,
            scratch: Scratch::default(),
            moe: MoeScratch::default(),
            hidden: Vec::new(),
            logits: Vec::new(),
            ids: Vec::new(),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Adds a sequence; it joins the batch at the next step.
    pub fn add(&mut self, prompt: Vec<u32>, params: SamplingParams) -> Result<SeqId> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(Error::invalid("prompt", "must contain at least one token"));
        }
        self.model.check_tokens(&prompt)?;
        let max_pos = self.model.config().max_position_embeddings;
        if prompt.len() >= max_pos {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "{} tokens leave no room to generate (context length {max_pos})",
                    prompt.len()
                ),
            ));
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        let capacity = (prompt.len() + params.max_new_tokens).min(max_pos);
        self.seqs.push(Sequence {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            processed: 0,
            cache: self.model.new_cache(capacity),
            sampler: Sampler::new(&params, id.0),
            params,
            finish: None,
        });
        Ok(id)
    }

    /// Removes a sequence (finished or not) and frees its cache.
    pub fn remove(&mut self, id: SeqId) -> bool {
        let before = self.seqs.len();
        self.seqs.retain(|s| s.id != id);
        self.seqs.len() != before
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

    /// Runs one batch step and returns the tokens it produced.
    pub fn step(&mut self) -> Result<Vec<TokenEvent>> {
        let mut budget = self.opts.max_batch_tokens;
        let mut chunks = Vec::new();
        let mut members = Vec::new();
        let mut sample_rows = Vec::new();
        self.ids.clear();
        for (i, s) in self.seqs.iter().enumerate() {
            if s.finish.is_some() || budget == 0 {
                continue;
            }
            let take = (s.tokens.len() - s.processed).min(budget);
            budget -= take;
            chunks.push(Chunk {
                start: s.processed,
                len: take,
            });
            self.ids
                .extend_from_slice(&s.tokens[s.processed..s.processed + take]);
            if s.processed + take == s.tokens.len() {
                sample_rows.push((members.len(), self.ids.len() - 1));
            }
            members.push(i);
        }
        if members.is_empty() {
            return Ok(Vec::new());
        }
        self.model.embed(&self.ids, &mut self.hidden)?;
        {
            let mut caches: Vec<&mut KvCache> = Vec::with_capacity(members.len());
            let mut next = members.iter().peekable();
            for (i, s) in self.seqs.iter_mut().enumerate() {
                if next.peek() == Some(&&i) {
                    caches.push(&mut s.cache);
                    next.next();
                }
            }
            let mut experts = LocalExperts {
                model: &self.model,
                scratch: &mut self.moe,
            };
            self.model.forward_layers(
                &mut self.hidden,
                &chunks,
                &mut caches,
                &mut experts,
                &mut self.scratch,
            )?;
        }
        for (&i, c) in members.iter().zip(&chunks) {
            self.seqs[i].processed += c.len;
        }
        let rows: Vec<usize> = sample_rows.iter().map(|&(_, r)| r).collect();
        self.model
            .logits(&self.hidden, &rows, &mut self.logits, &mut self.scratch)?;
        let vocab = self.model.config().vocab_size;
        let eos = &self.model.config().eos_token_ids;
        let max_pos = self.model.config().max_position_embeddings;
        let mut events = Vec::with_capacity(sample_rows.len());
        for (k, &(member, _)) in sample_rows.iter().enumerate() {
            let s = &mut self.seqs[members[member]];
            let row = &mut self.logits[k * vocab..(k + 1) * vocab];
            let token = s.sampler.sample(row);
            s.tokens.push(token);
            let finish = if !s.params.ignore_eos && eos.contains(&token) {
                Some(FinishReason::Stop)
            } else if s.generated() >= s.params.max_new_tokens || s.tokens.len() >= max_pos {
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
        Ok(events)
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
