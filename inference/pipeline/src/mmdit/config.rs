//! The transformer's hyper-parameters, read from diffusers' `config.json` or inferred from
//! Stability-layout weights, and which naming scheme the weights use.

use serde::Deserialize;

use crate::weights::Weights;
use crate::{Error, Result};

/// Architecture hyper-parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmditConfig {
    /// Latent patch size (2).
    pub patch_size: usize,
    /// Latent channels in (16).
    pub in_channels: usize,
    /// Latent channels out (16).
    pub out_channels: usize,
    /// Number of joint blocks.
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of the token streams.
    pub hidden: usize,
    /// Side of the square position-embedding table, in patches.
    pub pos_embed_max_size: usize,
    /// Width of the text context (T5's width).
    pub joint_attention_dim: usize,
    /// Width of the pooled text vector (CLIP-L + CLIP-G projections).
    pub pooled_projection_dim: usize,
    /// Blocks with a second, image-only attention (MMDiT-X).
    pub dual_attention_layers: Vec<usize>,
    /// Whether queries and keys are RMS-normalised.
    pub qk_norm: bool,
}

#[derive(Deserialize)]
struct DiffusersConfig {
    patch_size: usize,
    in_channels: usize,
    out_channels: Option<usize>,
    num_layers: usize,
    attention_head_dim: usize,
    num_attention_heads: usize,
    joint_attention_dim: usize,
    pooled_projection_dim: usize,
    pos_embed_max_size: usize,
    #[serde(default)]
    dual_attention_layers: Vec<usize>,
    qk_norm: Option<String>,
}

impl MmditConfig {
    /// Reads diffusers' `transformer/config.json`.
    pub fn from_diffusers(path: &std::path::Path) -> Result<Self> {
        let c: DiffusersConfig = crate::error::read_json(path)?;
        if let Some(n) = c.qk_norm.as_deref()
            && n != "rms_norm"
        {
            return Err(Error::Layout(format!(
                "{}: qk_norm `{n}` is not supported (rms_norm or none)",
                path.display()
            )));
        }
        Ok(Self {
            patch_size: c.patch_size,
            in_channels: c.in_channels,
            out_channels: c.out_channels.unwrap_or(c.in_channels),
            depth: c.num_layers,
            heads: c.num_attention_heads,
            hidden: c.num_attention_heads * c.attention_head_dim,
            pos_embed_max_size: c.pos_embed_max_size,
            joint_attention_dim: c.joint_attention_dim,
            pooled_projection_dim: c.pooled_projection_dim,
            dual_attention_layers: c.dual_attention_layers,
            qk_norm: c.qk_norm.is_some(),
        })
    }

    /// Infers the configuration from Stability-layout weights (no config file exists there).
    /// SD3 transformers have as many heads as blocks, which fixes the head count.
    pub fn from_stability_weights(w: &Weights) -> Result<Self> {
        let names = w.names();
        let depth = names
            .iter()
            .filter_map(|n| n.strip_prefix("joint_blocks."))
            .filter_map(|n| n.split('.').next()?.parse::<usize>().ok())
            .max()
            .map(|m| m + 1)
            .ok_or_else(|| Error::Layout("no `joint_blocks` in the transformer weights".into()))?;
        let x = w.shape("x_embedder.proj.weight")?;
        let (hidden, in_channels, patch_size) = (x[0], x[1], x[2]);
        let pos = w.shape("pos_embed")?;
        let pos_embed_max_size = (pos[1] as f64).sqrt().round() as usize;
        let final_out = w.shape("final_layer.linear.weight")?[0];
        let dual_attention_layers = (0..depth)
            .filter(|i| w.contains(&format!("joint_blocks.{i}.x_block.attn2.qkv.weight")))
            .collect();
        Ok(Self {
            patch_size,
            in_channels,
            out_channels: final_out / (patch_size * patch_size),
            depth,
            heads: depth,
            hidden,
            pos_embed_max_size,
            joint_attention_dim: w.shape("context_embedder.weight")?[1],
            pooled_projection_dim: w.shape("y_embedder.mlp.0.weight")?[1],
            dual_attention_layers,
            qk_norm: w.contains("joint_blocks.0.x_block.attn.ln_q.weight"),
        })
    }
}

/// Which naming scheme the weights use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmditNames {
    /// diffusers `SD3Transformer2DModel` names.
    Diffusers,
    /// Stability single-file names (below `model.diffusion_model.`).
    Stability,
}
