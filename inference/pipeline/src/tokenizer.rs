//! The three SD3 tokenizers, built from the files of a model repository: CLIP's byte-level BPE
//! from `vocab.json` + `merges.txt`, T5's unigram model from `tokenizer.json`. Special tokens,
//! padding token and maximum length come from each tokenizer's `tokenizer_config.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::{Error, Result};

/// CLIP's pre-tokenisation pattern (as in transformers' `CLIPTokenizer`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A tokenizer producing fixed-length, padded and truncated id sequences.
#[derive(Debug, Clone)]
pub struct PromptTokenizer {
    inner: Tokenizer,
    max_length: usize,
    pad_id: u32,
    eos_id: u32,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// A token in `tokenizer_config.json`: a string or an `AddedToken` object.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

#[derive(Debug)]
struct TokenizerConfig {
    raw: Value,
}

impl TokenizerConfig {
    fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Err(Error::Tokenizer(format!("missing {}", path.display())));
        }
        Ok(Self {
            raw: crate::error::read_json(&path)?,
        })
    }

    fn token(&self, key: &str) -> Option<String> {
        token_str(self.raw.get(key))
    }

    fn model_max_length(&self) -> Option<usize> {
        self.raw
            .get("model_max_length")
            .and_then(Value::as_f64)
            .filter(|v| *v > 0.0 && *v < 1e9)
            .map(|v| v as usize)
    }
}

fn added_token(id: u32, content: &str, o: Option<&serde_json::Map<String, Value>>) -> Value {
    let flag = |k: &str, d: bool| {
        o.and_then(|o| o.get(k))
            .and_then(Value::as_bool)
            .unwrap_or(d)
    };
    json!({
        "id": id,
        "content": content,
        "single_word": flag("single_word", false),
        "lstrip": flag("lstrip", false),
        "rstrip": flag("rstrip", false),
        "normalized": flag("normalized", false),
        "special": flag("special", true),
    })
}

impl PromptTokenizer {
    /// Loads a CLIP tokenizer from `vocab.json`, `merges.txt` and `tokenizer_config.json`.
    pub fn clip(dir: &Path) -> Result<Self> {
        let cfg = TokenizerConfig::read(dir)?;
        let vocab_path = dir.join("vocab.json");
        let vocab: BTreeMap<String, u32> = crate::error::read_json(&vocab_path)?;
        let merges_path = dir.join("merges.txt");
        let merges_text =
            std::fs::read_to_string(&merges_path).map_err(|e| Error::io(&merges_path, e))?;
        let merges: Vec<Value> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| {
                let mut it = l.split(' ');
                json!([it.next().unwrap_or_default(), it.next().unwrap_or_default()])
            })
            .collect();
        let bos = cfg
            .token("bos_token")
            .unwrap_or_else(|| "<|startoftext|>".into());
        let eos = cfg
            .token("eos_token")
            .unwrap_or_else(|| "<|endoftext|>".into());
        let unk = cfg.token("unk_token").unwrap_or_else(|| eos.clone());
        let pad = cfg.token("pad_token").unwrap_or_else(|| eos.clone());
        let id_of = |t: &str| -> Result<u32> {
            vocab.get(t).copied().ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: token `{t}` is not in vocab.json",
                    dir.display()
                ))
            })
        };
        let (bos_id, eos_id, pad_id) = (id_of(&bos)?, id_of(&eos)?, id_of(&pad)?);
        let mut added = BTreeMap::new();
        if let Some(Value::Object(map)) = cfg.raw.get("added_tokens_decoder") {
            for (id, o) in map {
                let id: u32 = id.parse().map_err(tok_err)?;
                if let Some(content) = o.get("content").and_then(Value::as_str) {
                    added.insert(id, added_token(id, content, o.as_object()));
                }
            }
        }
        for t in [&bos, &eos, &unk, &pad] {
            let id = id_of(t)?;
            added.entry(id).or_insert_with(|| added_token(id, t, None));
        }
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added.into_values().collect::<Vec<_>>(),
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_PATTERN}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
            ]},
            "post_processor": {"type": "RobertaProcessing", "sep": [eos, eos_id], "cls": [bos, bos_id],
                "trim_offsets": false, "add_prefix_space": false},
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": "",
                "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": vocab, "merges": merges}
        });
        let inner: Tokenizer = spec.to_string().parse().map_err(tok_err)?;
        let max_length = cfg.model_max_length().unwrap_or(77);
        Self::finish(inner, max_length, pad_id, &pad, eos_id)
    }

    /// Loads a T5 tokenizer from `tokenizer.json` (or, without it, `spiece.model`) and
    /// `tokenizer_config.json`, producing `max_length` ids (SD3's `max_sequence_length`).
    pub fn t5(dir: &Path, max_length: usize) -> Result<Self> {
        let cfg = TokenizerConfig::read(dir)?;
        let file = dir.join("tokenizer.json");
        let spiece = dir.join("spiece.model");
        let inner = if file.is_file() {
            Tokenizer::from_file(&file).map_err(tok_err)?
        } else if spiece.is_file() {
            t5_from_sentencepiece(&spiece, &cfg)?
        } else {
            return Err(Error::Tokenizer(format!(
                "{} has neither tokenizer.json nor spiece.model",
                dir.display()
            )));
        };
        let pad = cfg.token("pad_token").unwrap_or_else(|| "<pad>".into());
        let eos = cfg.token("eos_token").unwrap_or_else(|| "</s>".into());
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| Error::Tokenizer(format!("{}: unknown token `{t}`", file.display())))
        };
        let (pad_id, eos_id) = (id(&pad)?, id(&eos)?);
        if let Some(limit) = cfg.model_max_length()
            && max_length > limit
        {
            return Err(Error::invalid(
                "t5_max_length",
                format!("{max_length} exceeds the tokenizer's model_max_length {limit}"),
            ));
        }
        Self::finish(inner, max_length, pad_id, &pad, eos_id)
    }

    fn finish(
        mut inner: Tokenizer,
        max_length: usize,
        pad_id: u32,
        pad: &str,
        eos_id: u32,
    ) -> Result<Self> {
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(tok_err)?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad.to_string(),
        }));
        Ok(Self {
            inner,
            max_length,
            pad_id,
            eos_id,
        })
    }

    /// Token ids of `prompt`: special tokens added, truncated and padded to the max length.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(prompt, true).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// The fixed output length.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The end-of-sequence id.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
}

/// Builds the T5 tokenizer transformers derives from a sentencepiece unigram model: its pieces
/// and scores, then `extra_ids` sentinels `<extra_id_{n-1}>..<extra_id_0>`; the model's
/// precompiled normaliser; whitespace split and `▁` prefixing; `</s>` appended.
fn t5_from_sentencepiece(path: &Path, cfg: &TokenizerConfig) -> Result<Tokenizer> {
    use base64::Engine;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let model = crate::sentencepiece::ModelProto::parse(&bytes)
        .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    let extra_ids = cfg
        .raw
        .get("extra_ids")
        .and_then(Value::as_u64)
        .unwrap_or(100) as usize;
    let mut vocab: Vec<Value> = model
        .pieces
        .iter()
        .map(|p| json!([p.piece, p.score]))
        .collect();
    let mut added = Vec::new();
    for (id, p) in model.pieces.iter().enumerate() {
        // CONTROL (3) and UNKNOWN (2) pieces are special tokens.
        if p.kind == 2 || p.kind == 3 {
            added.push(added_token(id as u32, &p.piece, None));
        }
    }
    for i in (0..extra_ids).rev() {
        let token = format!("<extra_id_{i}>");
        added.push(added_token(vocab.len() as u32, &token, None));
        vocab.push(json!([token, 0.0]));
    }
    let eos = cfg.token("eos_token").unwrap_or_else(|| "</s>".into());
    let eos_id = model
        .pieces
        .iter()
        .position(|p| p.piece == eos)
        .ok_or_else(|| Error::Tokenizer(format!("{}: no `{eos}` piece", path.display())))?;
    let normalizer = if model.precompiled_charsmap.is_empty() {
        Value::Null
    } else {
        json!({"type": "Precompiled", "precompiled_charsmap":
            base64::engine::general_purpose::STANDARD.encode(&model.precompiled_charsmap)})
    };
    let metaspace = json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true});
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace]},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": eos, "type_id": 0}}],
            "special_tokens": {eos.clone(): {"id": eos, "ids": [eos_id], "tokens": [eos]}}},
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": model.unk_id, "vocab": vocab, "byte_fallback": false}
    });
    spec.to_string().parse().map_err(tok_err)
}
