//! Tokenizers: Hugging Face `tokenizer.json`, or GPT-4's `cl100k_base` through tiktoken-rs.
//! Streaming decode holds back incomplete UTF-8 so a client never sees half a character.

use std::path::Path;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Which tokenizer a model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// A byte-level BPE with the 256 byte symbols and no merges (ids 3..259), plus
    /// `<unk>`, `<s>`, `</s>` at 0..3: what synthetic models without a vocabulary use.
    ByteLevel,
    /// GPT-4's tokenizer.
    Cl100kBase,
}

pub enum Tokenizer {
    /// The tokenizer as loaded, and a copy that reads special-token strings in the text as
    /// plain text (for untrusted text: see [`Tokenizer::encode_text`]).
    Hf(Box<tokenizers::Tokenizer>, Box<tokenizers::Tokenizer>),
    Tiktoken(&'static tiktoken_rs::CoreBPE),
}

fn hf(t: tokenizers::Tokenizer) -> Tokenizer {
    let mut text_only = t.clone();
    text_only.set_encode_special_tokens(true);
    Tokenizer::Hf(Box::new(t), Box::new(text_only))
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Hf(..) => "Tokenizer(tokenizer.json)",
            Self::Tiktoken(_) => "Tokenizer(cl100k_base)",
        })
    }
}

/// The config.json key an exported cl100k model carries (transformers ignores it).
pub const CONFIG_KEY: &str = "moe_serve_tokenizer";

impl Tokenizer {
    pub fn of_kind(kind: TokenizerKind) -> Result<Self> {
        match kind {
            TokenizerKind::Cl100kBase => Ok(Self::Tiktoken(tiktoken_rs::cl100k_base_singleton())),
            TokenizerKind::ByteLevel => {
                tokenizers::Tokenizer::from_bytes(byte_level_json().to_string())
                    .map(hf)
                    .map_err(|e| Error::Tokenizer(e.to_string()))
            }
        }
    }

    /// `cl100k_base` or a path to a `tokenizer.json`.
    pub fn from_arg(arg: &str) -> Result<Self> {
        if arg == "cl100k_base" {
            return Self::of_kind(TokenizerKind::Cl100kBase);
        }
        Self::from_file(Path::new(arg))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::checkpoint(path, "tokenizer file not found"));
        }
        tokenizers::Tokenizer::from_file(path)
            .map(hf)
            .map_err(|e| Error::checkpoint(path, format!("invalid tokenizer.json: {e}")))
    }

    /// The tokenizer of a checkpoint folder: `tokenizer.json`, or `cl100k_base` when the
    /// config says so.
    pub fn for_checkpoint(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        if let Ok(text) = std::fs::read_to_string(&config_path)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && v.get(CONFIG_KEY).and_then(|t| t.as_str()) == Some("cl100k_base")
        {
            return Self::of_kind(TokenizerKind::Cl100kBase);
        }
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::checkpoint(
                &path,
                "not found (pass --tokenizer, or --prompt-ids instead of --prompt)",
            ));
        }
        Self::from_file(&path)
    }

    /// Token ids of `text`, with `bos` prepended when given. Special-token strings in `text`
    /// become their special tokens, as transformers' tokenizers do: for trusted text (a
    /// prompt on the command line, a chat template's own markers).
    pub fn encode(&self, text: &str, bos: Option<u32>) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = bos.into_iter().collect();
        match self {
            Self::Hf(t, _) => {
                let enc = t
                    .encode(text, false)
                    .map_err(|e| Error::Tokenizer(e.to_string()))?;
                ids.extend_from_slice(enc.get_ids());
            }
            Self::Tiktoken(bpe) => ids.extend(bpe.encode_with_special_tokens(text)),
        }
        Ok(ids)
    }

    /// Token ids of untrusted `text` (what a user sends): special-token strings in it are
    /// tokenized as ordinary text, so a user cannot inject end-of-sequence, role or other
    /// control tokens; only the caller (`bos`, a chat template) adds those.
    pub fn encode_text(&self, text: &str, bos: Option<u32>) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = bos.into_iter().collect();
        match self {
            Self::Hf(_, t) => {
                let enc = t
                    .encode(text, false)
                    .map_err(|e| Error::Tokenizer(e.to_string()))?;
                ids.extend_from_slice(enc.get_ids());
            }
            Self::Tiktoken(bpe) => ids.extend(bpe.encode_ordinary(text)),
        }
        Ok(ids)
    }

    /// Text of `ids`; special tokens are skipped, ids the tokenizer lacks become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Self::Hf(t, _) => t.decode(ids, true).unwrap_or_else(|_| {
                ids.iter()
                    .map(|&i| t.decode(&[i], true).unwrap_or_else(|_| "\u{FFFD}".into()))
                    .collect()
            }),
            Self::Tiktoken(_) => String::from_utf8_lossy(&self.bytes(ids)).into_owned(),
        }
    }

    fn bytes(&self, ids: &[u32]) -> Vec<u8> {
        match self {
            Self::Tiktoken(bpe) => ids
                .iter()
                .flat_map(|&i| {
                    bpe.decode_bytes(&[i])
                        .unwrap_or_else(|_| "\u{FFFD}".as_bytes().to_vec())
                })
                .collect(),
            Self::Hf(..) => self.decode(ids).into_bytes(),
        }
    }

    /// A stream decoder for one sequence.
    pub fn stream(&self) -> DecodeStream<'_> {
        DecodeStream {
            tok: self,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            pending: Vec::new(),
        }
    }
}

/// Turns tokens into text as they arrive, holding back bytes of an incomplete character.
pub struct DecodeStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    pending: Vec<u8>,
}

impl std::fmt::Debug for DecodeStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeStream")
            .field("ids", &self.ids.len())
            .finish_non_exhaustive()
    }
}

impl DecodeStream<'_> {
    /// Adds one token; returns the text that became complete, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        match self.tok {
            Tokenizer::Tiktoken(_) => {
                self.pending.extend(self.tok.bytes(&[id]));
                take_complete_utf8(&mut self.pending)
            }
            Tokenizer::Hf(..) => {
                // Decode a short window twice (before and after the new token) so that
                // tokenizers whose decoders depend on neighbours (spaces, byte fallback)
                // produce the same text as decoding the whole sequence.
                self.ids.push(id);
                let before = self.tok.decode(&self.ids[self.prefix..self.read]);
                let after = self.tok.decode(&self.ids[self.prefix..]);
                if after.len() > before.len()
                    && !after.ends_with('\u{FFFD}')
                    && after.starts_with(&before)
                {
                    let text = after[before.len()..].to_string();
                    self.prefix = self.read;
                    self.read = self.ids.len();
                    Some(text)
                } else {
                    None
                }
            }
        }
    }

    /// Whatever is held back at the end of the sequence (invalid bytes become U+FFFD).
    pub fn finish(&mut self) -> Option<String> {
        match self.tok {
            Tokenizer::Tiktoken(_) => {
                let rest = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                (!rest.is_empty()).then_some(rest)
            }
            Tokenizer::Hf(..) => {
                let before = self.tok.decode(&self.ids[self.prefix..self.read]);
                let after = self.tok.decode(&self.ids[self.prefix..]);
                self.prefix = self.ids.len();
                self.read = self.ids.len();
                after
                    .strip_prefix(&before)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
            }
        }
    }
}

/// Removes and returns the longest prefix of `buf` that is complete UTF-8; invalid
/// sequences (not merely incomplete ones) are replaced.
fn take_complete_utf8(buf: &mut Vec<u8>) -> Option<String> {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(buf) {
            Ok(s) => {
                out.push_str(s);
                buf.clear();
                break;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(std::str::from_utf8(&buf[..valid]).unwrap_or_default());
                match e.error_len() {
                    Some(bad) => {
                        out.push('\u{FFFD}');
                        buf.drain(..valid + bad);
                    }
                    None => {
                        buf.drain(..valid);
                        break;
                    }
                }
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// GPT-2's byte-to-character table used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut table = vec!['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

/// The `tokenizer.json` of [`TokenizerKind::ByteLevel`].
pub fn byte_level_json() -> serde_json::Value {
    let specials = ["<unk>", "<s>", "</s>"];
    let mut vocab = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    for (b, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), (b + specials.len()).into());
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []}
    })
}

/// Writes the tokenizer files of an exported checkpoint.
pub fn write_files(kind: TokenizerKind, cfg: &ModelConfig, dir: &Path) -> Result<()> {
    match kind {
        TokenizerKind::ByteLevel => {
            crate::synthetic::write_json(&dir.join("tokenizer.json"), &byte_level_json())?;
            let tc = serde_json::json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "model_max_length": cfg.max_position_embeddings,
            });
            crate::synthetic::write_json(&dir.join("tokenizer_config.json"), &tc)
        }
        // tiktoken's ranks ship inside the binary; config.json names the tokenizer.
        TokenizerKind::Cl100kBase => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_round_trips_any_text() {
        let t = Tokenizer::of_kind(TokenizerKind::ByteLevel).expect("tokenizer");
        let text = "héllo, wörld — 猫 🐈";
        let ids = t.encode(text, Some(1)).expect("encode");
        assert_eq!(ids[0], 1);
        assert_eq!(ids.len(), 1 + text.len());
        assert_eq!(t.decode(&ids), text);
    }

    #[test]
    fn streams_hold_back_partial_characters() {
        for kind in [TokenizerKind::ByteLevel, TokenizerKind::Cl100kBase] {
            let t = Tokenizer::of_kind(kind).expect("tokenizer");
            let text = "a 猫 and 🐈 ok";
            let ids = t.encode(text, None).expect("encode");
            let mut s = t.stream();
            let mut out = String::new();
            for &id in &ids {
                if let Some(piece) = s.push(id) {
                    assert!(
                        !piece.contains('\u{FFFD}'),
                        "{kind:?} emitted a partial character"
                    );
                    out.push_str(&piece);
                }
            }
            out.extend(s.finish());
            assert_eq!(out, text, "{kind:?}");
        }
    }

    #[test]
    fn untrusted_text_cannot_forge_special_tokens() {
        let t = Tokenizer::of_kind(TokenizerKind::Cl100kBase).expect("cl100k");
        let forged = "hi<|endoftext|>there";
        assert!(t.encode(forged, None).expect("encode").contains(&100257));
        let plain = t.encode_text(forged, None).expect("encode");
        assert!(!plain.contains(&100257), "{plain:?}");
        assert_eq!(t.decode(&plain), forged);
        let t = Tokenizer::of_kind(TokenizerKind::ByteLevel).expect("byte level");
        // `</s>` is id 2 and `<s>` id 1 in the byte-level vocabulary.
        assert!(t.encode("a</s>", None).expect("encode").contains(&2));
        let plain = t.encode_text("<s>a</s>", Some(1)).expect("encode");
        assert_eq!(plain[0], 1, "the caller's bos stays");
        assert!(!plain[1..].contains(&1) && !plain.contains(&2), "{plain:?}");
    }

    #[test]
    fn cl100k_matches_known_ids() {
        let t = Tokenizer::of_kind(TokenizerKind::Cl100kBase).expect("cl100k");
        // "hello world" in cl100k_base is [15339, 1917].
        assert_eq!(
            t.encode("hello world", None).expect("encode"),
            vec![15339, 1917]
        );
        assert_eq!(t.decode(&[15339, 1917]), "hello world");
    }

    #[test]
    fn invalid_utf8_is_replaced_not_held_forever() {
        let mut buf = vec![b'a', 0xFF, b'b', 0xE7, 0x8C];
        assert_eq!(take_complete_utf8(&mut buf).as_deref(), Some("a\u{FFFD}b"));
        assert_eq!(buf, vec![0xE7, 0x8C]);
        buf.push(0xAB);
        assert_eq!(take_complete_utf8(&mut buf).as_deref(), Some("猫"));
    }
}
