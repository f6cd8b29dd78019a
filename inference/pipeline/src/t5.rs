//! The T5 v1.1 encoder (T5-XXL in SD3): RMS layer norms, bucketed relative position bias,
//! unscaled attention, gated-GELU feed-forward.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::attention::attention;
use crate::linear::Linear;
use crate::nn;
use crate::weights::Weights;
use crate::{Error, Result};

/// Architecture of a T5 encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    /// Width.
    pub d_model: usize,
    /// Blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Relative-position buckets.
    pub num_buckets: usize,
    /// Distance beyond which relative positions share a bucket.
    pub max_distance: usize,
    /// RMS norm epsilon.
    pub eps: f64,
}

#[derive(Deserialize)]
struct HfConfig {
    d_model: usize,
    num_layers: usize,
    num_heads: usize,
    relative_attention_num_buckets: usize,
    #[serde(default = "default_distance")]
    relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default)]
    feed_forward_proj: Option<String>,
}

fn default_distance() -> usize {
    128
}

fn default_eps() -> f64 {
    1e-6
}

impl T5Config {
    /// Reads a transformers `config.json`.
    pub fn from_hf(path: &std::path::Path) -> Result<Self> {
        let c: HfConfig = crate::error::read_json(path)?;
        if let Some(ff) = c.feed_forward_proj.as_deref()
            && ff != "gated-gelu"
        {
            return Err(Error::Layout(format!(
                "{}: feed_forward_proj `{ff}` is not supported (SD3 uses T5 v1.1, gated-gelu)",
                path.display()
            )));
        }
        Ok(Self {
            d_model: c.d_model,
            layers: c.num_layers,
            heads: c.num_heads,
            num_buckets: c.relative_attention_num_buckets,
            max_distance: c.relative_attention_max_distance,
            eps: c.layer_norm_epsilon,
        })
    }

    /// Infers the architecture from the weights (single-file layouts).
    pub fn infer(w: &Weights) -> Result<Self> {
        let bias =
            w.shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")?;
        let layers = (0..)
            .take_while(|i| w.contains(&format!("encoder.block.{i}.layer.0.layer_norm.weight")))
            .count();
        Ok(Self {
            d_model: w.shape("encoder.final_layer_norm.weight")?[0],
            layers,
            heads: bias[1],
            num_buckets: bias[0],
            max_distance: 128,
            eps: 1e-6,
        })
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln0: Tensor,
    qkv: Linear,
    o: Linear,
    ln1: Tensor,
    wi0: Linear,
    wi1: Linear,
    wo: Linear,
}

/// A T5 encoder.
#[derive(Debug, Clone)]
pub struct T5Encoder {
    cfg: T5Config,
    embedding: Tensor,
    relative_bias: Tensor,
    blocks: Vec<Block>,
    final_ln: Tensor,
}

impl T5Encoder {
    /// Loads the encoder from `w` (the root of a transformers `T5EncoderModel`).
    pub fn load(w: &Weights, cfg: T5Config) -> Result<Self> {
        let embedding = if w.contains("shared.weight") {
            w.get("shared.weight")?
        } else {
            w.get("encoder.embed_tokens.weight")?
        };
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let b = w.pp(format!("encoder.block.{i}.layer"));
            blocks.push(Block {
                ln0: b.get("0.layer_norm.weight")?,
                qkv: Linear::load_fused(
                    &b,
                    &[
                        "0.SelfAttention.q",
                        "0.SelfAttention.k",
                        "0.SelfAttention.v",
                    ],
                    false,
                )?,
                o: Linear::load(&b, "0.SelfAttention.o", false)?,
                ln1: b.get("1.layer_norm.weight")?,
                wi0: Linear::load(&b, "1.DenseReluDense.wi_0", false)?,
                wi1: Linear::load(&b, "1.DenseReluDense.wi_1", false)?,
                wo: Linear::load(&b, "1.DenseReluDense.wo", false)?,
            });
        }
        Ok(Self {
            embedding,
            relative_bias: w
                .get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")?,
            blocks,
            final_ln: w.get("encoder.final_layer_norm.weight")?,
            cfg,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// The shapes the memory plan needs, read off the loaded tensors.
    pub fn spec(&self) -> Result<crate::plan::T5Spec> {
        let (vocab, d_model) = self.embedding.dims2()?;
        let (inner, d_ff) = match self.blocks.first() {
            Some(b) => (b.qkv.out_features()? / 3, b.wi0.out_features()?),
            None => (0, 0),
        };
        Ok(crate::plan::T5Spec {
            vocab,
            d_model,
            inner,
            d_ff,
            layers: self.blocks.len(),
            heads: self.cfg.heads,
            buckets: self.relative_bias.dim(0)?,
        })
    }

    /// Encodes one token sequence: `[1, L, d_model]`.
    pub fn forward(&self, ids: &[u32], dtype: DType) -> Result<Tensor> {
        let device = self.embedding.device().clone();
        let n = ids.len();
        let ids_t = Tensor::new(ids, &device)?;
        let mut x = self
            .embedding
            .index_select(&ids_t, 0)?
            .to_dtype(dtype)?
            .unsqueeze(0)?;
        let bias = self.position_bias(n, &device)?.to_dtype(dtype)?;
        let heads = self.cfg.heads;
        for b in &self.blocks {
            let h = nn::rms_norm(&x, &b.ln0, self.cfg.eps)?;
            let (q, k, v) = nn::split_qkv_heads(&b.qkv.forward(&h)?, heads)?;
            let a = attention(&q, &k, &v, 1.0, Some(&bias))?;
            x = (x + b.o.forward(&a)?)?;
            let h = nn::rms_norm(&x, &b.ln1, self.cfg.eps)?;
            let g = (crate::fused::bias_in_place(b.wi0.forward_unbiased(&h)?, None, true)?
                * b.wi1.forward(&h)?)?;
            x = (x + b.wo.forward(&g)?)?;
        }
        nn::rms_norm(&x, &self.final_ln, self.cfg.eps)
    }

    /// The `[1, H, n, n]` additive attention bias shared by all blocks.
    fn position_bias(&self, n: usize, device: &Device) -> Result<Tensor> {
        let buckets: Vec<u32> = (0..n)
            .flat_map(|i| {
                (0..n).map(move |j| {
                    relative_position_bucket(
                        j as i64 - i as i64,
                        self.cfg.num_buckets,
                        self.cfg.max_distance,
                    )
                })
            })
            .collect();
        let idx = Tensor::from_vec(buckets, n * n, device)?;
        let values = self.relative_bias.index_select(&idx, 0)?; // [n*n, H]
        Ok(values
            .reshape((n, n, self.cfg.heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()?)
    }
}

/// T5's bidirectional bucketing of `memory - query` positions (f32 logarithm like PyTorch).
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let rp = relative.abs();
    let max_exact = half / 2;
    if rp < max_exact {
        bucket += rp;
    } else {
        let scaled = ((rp as f32 / max_exact as f32).ln()
            / ((max_distance as f64 / max_exact as f64).ln() as f32)
            * (half - max_exact) as f32) as i64;
        bucket += (max_exact + scaled).min(half - 1);
    }
    bucket as u32
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    #[test]
    fn buckets_follow_t5() {
        // 32 buckets, distance 128: exact below 8, log-spaced up to 15, +16 for keys after.
        assert_eq!(relative_position_bucket(0, 32, 128), 0);
        assert_eq!(relative_position_bucket(-7, 32, 128), 7);
        assert_eq!(relative_position_bucket(3, 32, 128), 19);
        assert_eq!(relative_position_bucket(-8, 32, 128), 8);
        assert_eq!(relative_position_bucket(-127, 32, 128), 15);
        assert_eq!(relative_position_bucket(-1000, 32, 128), 15);
        assert_eq!(relative_position_bucket(1000, 32, 128), 31);
    }
}
