//! CLIP text encoders (CLIP-L and OpenCLIP bigG as `CLIPTextModelWithProjection`): the
//! penultimate hidden states and the projected pooled output, as SD3 uses them.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::attention::attention;
use crate::linear::Linear;
use crate::nn;
use crate::weights::Weights;
use crate::{Error, Result};

/// CLIP's activation in the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP-L).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP bigG).
    Gelu,
}

/// Architecture of a CLIP text encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    /// Width.
    pub hidden: usize,
    /// Encoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP activation.
    pub activation: ClipActivation,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// The id whose first occurrence marks the pooled position, or 2 for the legacy rule
    /// (position of the largest id), exactly as transformers decides.
    pub eos_token_id: u32,
}

#[derive(Deserialize)]
struct HfConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    hidden_act: String,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    eos_token_id: u32,
}

fn default_eps() -> f64 {
    1e-5
}

impl ClipConfig {
    /// Reads a transformers `config.json`.
    pub fn from_hf(path: &std::path::Path) -> Result<Self> {
        let c: HfConfig = crate::error::read_json(path)?;
        let activation = match c.hidden_act.as_str() {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            other => {
                return Err(Error::Layout(format!(
                    "{}: unsupported hidden_act `{other}`",
                    path.display()
                )));
            }
        };
        Ok(Self {
            hidden: c.hidden_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            activation,
            eps: c.layer_norm_eps,
            eos_token_id: c.eos_token_id,
        })
    }

    /// Infers the architecture from weights alone (single-file layouts): CLIP heads are 64
    /// wide; the activation and pooling token are those of the named model.
    pub fn infer(w: &Weights, activation: ClipActivation, eos_token_id: u32) -> Result<Self> {
        let root = text_root(w);
        let hidden = root.shape("embeddings.token_embedding.weight")?[1];
        let layers = (0..)
            .take_while(|i| root.contains(&format!("encoder.layers.{i}.layer_norm1.weight")))
            .count();
        Ok(Self {
            hidden,
            layers,
            heads: (hidden / 64).max(1),
            activation,
            eps: 1e-5,
            eos_token_id,
        })
    }
}

/// transformers ≥ 5.6 saves `CLIPTextModel` without the `text_model.` level.
fn text_root(w: &Weights) -> Weights {
    if w.contains("text_model.embeddings.token_embedding.weight") {
        w.pp("text_model")
    } else {
        w.clone()
    }
}

#[derive(Debug, Clone)]
struct Layer {
    ln1_w: Tensor,
    ln1_b: Tensor,
    qkv: Linear,
    out: Linear,
    ln2_w: Tensor,
    ln2_b: Tensor,
    fc1: Linear,
    fc2: Linear,
}

/// A CLIP text encoder with its projection.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    cfg: ClipConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_ln_w: Tensor,
    final_ln_b: Tensor,
    projection: Option<Linear>,
}

/// What SD3 takes from a CLIP encoder.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// Hidden states after the penultimate layer, `[B, L, hidden]`.
    pub penultimate: Tensor,
    /// The final-normed state at the pooled position, projected: `[B, projection]`.
    pub pooled: Tensor,
}

impl ClipTextModel {
    /// Loads the encoder from `w` (the root of a transformers `CLIPTextModelWithProjection`).
    pub fn load(w: &Weights, cfg: ClipConfig) -> Result<Self> {
        let root = text_root(w);
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let l = root.pp(format!("encoder.layers.{i}"));
            layers.push(Layer {
                ln1_w: l.get("layer_norm1.weight")?,
                ln1_b: l.get("layer_norm1.bias")?,
                qkv: Linear::load_fused(
                    &l,
                    &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                    true,
                )?,
                out: Linear::load(&l, "self_attn.out_proj", true)?,
                ln2_w: l.get("layer_norm2.weight")?,
                ln2_b: l.get("layer_norm2.bias")?,
                fc1: Linear::load(&l, "mlp.fc1", true)?,
                fc2: Linear::load(&l, "mlp.fc2", true)?,
            });
        }
        // Stability's CLIP-L file has no projection: diffusers then uses the identity.
        let projection = if w.contains("text_projection.weight") {
            Some(Linear::load(w, "text_projection", false)?)
        } else {
            None
        };
        Ok(Self {
            token_embedding: root.get("embeddings.token_embedding.weight")?,
            position_embedding: root.get("embeddings.position_embedding.weight")?,
            layers,
            final_ln_w: root.get("final_layer_norm.weight")?,
            final_ln_b: root.get("final_layer_norm.bias")?,
            projection,
            cfg,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }

    /// The shapes the memory plan needs, read off the loaded tensors.
    pub fn spec(&self) -> Result<crate::plan::ClipSpec> {
        let (vocab, hidden) = self.token_embedding.dims2()?;
        let intermediate = match self.layers.first() {
            Some(l) => l.fc1.out_features()?,
            None => 0,
        };
        Ok(crate::plan::ClipSpec {
            vocab,
            positions: self.position_embedding.dim(0)?,
            hidden,
            intermediate,
            layers: self.layers.len(),
            projection: self
                .projection
                .as_ref()
                .map(Linear::out_features)
                .transpose()?,
        })
    }

    /// Longest token sequence the position table allows.
    pub fn max_positions(&self) -> Result<usize> {
        Ok(self.position_embedding.dim(0)?)
    }

    /// Every linear an adapter may target, under transformers' module names
    /// (`text_model.encoder.layers.0.self_attn.q_proj`; q, k and v share one layer).
    pub fn lora_targets(&self) -> Result<Vec<crate::lora::Target>> {
        let h = self.cfg.hidden;
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("text_model.encoder.layers.{i}");
            for (j, part) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                out.push(
                    l.qkv
                        .target(format!("{p}.self_attn.{part}"), Some((j * h, h)), false)?,
                );
            }
            out.push(
                l.out
                    .target(format!("{p}.self_attn.out_proj"), None, false)?,
            );
            out.push(l.fc1.target(format!("{p}.mlp.fc1"), None, false)?);
            out.push(l.fc2.target(format!("{p}.mlp.fc2"), None, false)?);
        }
        if let Some(p) = &self.projection {
            out.push(p.target("text_projection".into(), None, false)?);
        }
        Ok(out)
    }

    /// Encodes one token sequence (already padded to the tokenizer's max length).
    pub fn forward(&self, ids: &[u32], dtype: DType) -> Result<ClipOutput> {
        self.forward_with(ids, dtype, None)
    }

    /// [`ClipTextModel::forward`] with LoRA adapters.
    pub fn forward_with(
        &self,
        ids: &[u32],
        dtype: DType,
        adapters: crate::lora::Active<'_>,
    ) -> Result<ClipOutput> {
        let device = self.token_embedding.device().clone();
        let n = ids.len();
        if n > self.max_positions()? || self.cfg.layers < 2 {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "{n} CLIP tokens exceed the encoder's {} positions",
                    self.max_positions()?
                ),
            ));
        }
        let ids_t = Tensor::new(ids, &device)?;
        let tok = self
            .token_embedding
            .index_select(&ids_t, 0)?
            .to_dtype(dtype)?;
        let pos = self.position_embedding.narrow(0, 0, n)?.to_dtype(dtype)?;
        let mut x = (tok + pos)?.unsqueeze(0)?;
        let mask = causal_mask(n, &device)?.to_dtype(dtype)?;
        let heads = self.cfg.heads;
        let scale = 1.0 / ((self.cfg.hidden / heads) as f64).sqrt();
        let mut penultimate = None;
        for (i, l) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = Some(x.clone());
            }
            let h = nn::layer_norm(&x, Some(&l.ln1_w), Some(&l.ln1_b), self.cfg.eps)?;
            let (q, k, v) = nn::split_qkv_heads(&l.qkv.forward_with(&h, adapters)?, heads)?;
            let a = attention(&q, &k, &v, scale, Some(&mask))?;
            x = (x + l.out.forward_with(&a, adapters)?)?;
            let h = nn::layer_norm(&x, Some(&l.ln2_w), Some(&l.ln2_b), self.cfg.eps)?;
            let h = l.fc1.forward_with(&h, adapters)?;
            let h = match self.cfg.activation {
                ClipActivation::QuickGelu => nn::quick_gelu(&h)?,
                ClipActivation::Gelu => h.gelu_erf()?,
            };
            x = (x + l.fc2.forward_with(&h, adapters)?)?;
        }
        let penultimate = penultimate.ok_or_else(|| Error::Layout("CLIP without layers".into()))?;
        let last = nn::layer_norm(
            &x,
            Some(&self.final_ln_w),
            Some(&self.final_ln_b),
            self.cfg.eps,
        )?;
        let pos = pooled_position(ids, self.cfg.eos_token_id);
        let pooled = last.narrow(1, pos, 1)?.squeeze(1)?;
        let pooled = match &self.projection {
            Some(p) => p.forward_with(&pooled, adapters)?,
            None => pooled,
        };
        Ok(ClipOutput {
            penultimate,
            pooled,
        })
    }
}

/// The pooled position: the first `eos` (or, for the legacy id 2, the first largest id).
pub fn pooled_position(ids: &[u32], eos: u32) -> usize {
    if eos == 2 {
        let max = ids.iter().copied().max().unwrap_or(0);
        ids.iter().position(|&i| i == max).unwrap_or(0)
    } else {
        ids.iter().position(|&i| i == eos).unwrap_or(0)
    }
}

fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (n, n), device)?)
}

#[cfg(test)]
mod tests {
    use super::pooled_position;

    #[test]
    fn pooled_position_is_first_eos_or_legacy_argmax() {
        // Padding with the eos token itself (CLIP-L): the first one counts.
        assert_eq!(pooled_position(&[49406, 320, 49407, 49407], 49407), 2);
        // Padding with `!` (CLIP-G).
        assert_eq!(pooled_position(&[49406, 320, 49407, 0, 0], 49407), 2);
        // Legacy configs (eos id 2): position of the largest id.
        assert_eq!(pooled_position(&[49406, 320, 49407, 49407], 2), 2);
    }
}
