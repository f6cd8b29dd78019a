//! SD3.5 ControlNets (Stability's canny, depth and blur models for SD3.5 Large), numerically
//! equivalent to diffusers' `SD3ControlNetModel` as those models configure it:
//!
//! - `joint_attention_dim: null`: no text stream. The blocks are diffusers'
//!   `SD3SingleTransformerBlock` (adaLN-Zero with six chunks in the order shift, scale, gate of
//!   the attention then of the MLP; LayerNorm without affine, eps 1e-6; self-attention with
//!   biased q/k/v and output projections, no qk-norm; tanh-GELU MLP of width 4·C), chained.
//! - `use_pos_embed: false`: the input is the *transformer's* patch embedding of the latents,
//!   its positional embedding added (diffusers' pipeline lends the ControlNet the transformer's
//!   `pos_embed`), so [`ControlNet::forward`] takes it already embedded.
//! - `pos_embed_input`: a patch convolution of the control image's latents, no positional
//!   embedding, added to that input.
//! - `time_text_embed` of the timestep and the pooled text vector, as the transformer's;
//!   `force_zeros_for_pooled_projection` (false for SD3.5's) makes the pooled vector zeros, as
//!   diffusers' pipeline does when the flag is set.
//! - `controlnet_blocks`: one linear per block; the residuals are scaled by the conditioning
//!   scale. [`crate::mmdit::block_residual`] says which residual each transformer block adds.
//!
//! Weights load from a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`,
//! sharded or not) or from the single file of Stability's sd3.5 repository (`ControlNetEmbedder`
//! names: `t_embedder.mlp.{0,2}`, `y_embedder.mlp.{0,2}`, `transformer_blocks.{i}.
//! adaLN_modulation.1`, fused `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`,
//! `controlnet_blocks.{i}`, `pos_embed_input.proj`, and an `x_embedder` the SD3.5 models never
//! use). The two layouts store the adaLN chunks in the same order: unlike the MMDiT's last
//! context block and final layer, no ControlNet block is "pre-only", so nothing is swapped.
//! A single file records no head count; the ControlNet shares the transformer's attention
//! geometry (Stability's code builds it with the transformer's heads), so the head width is
//! taken from the transformer it is loaded for.
//!
//! A ControlNet whose width, heads, patch size, latent channels or pooled width do not fit the
//! transformer is refused at load with the file and both shapes named; one with a text stream
//! (InstantX's SD3 ControlNets) or its own positional embedding is refused as unsupported.

mod config;

use std::path::{Path, PathBuf};

use candle_core::{D, Device, Tensor};

use crate::fused;
use crate::linear::Linear;
use crate::mmdit::{MmditConfig, chunk, modulate, timestep_embedding};
use crate::nn::{self, Conv2d};
use crate::variant::Precision;
use crate::{Error, Result};

pub use config::{ControlNetConfig, ControlNetLayout};
use config::{Opened, open};

/// One `SD3SingleTransformerBlock`.
#[derive(Debug, Clone)]
struct Block {
    ada: Linear,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
}

impl Block {
    fn forward(&self, x: &Tensor, temb_silu: &Tensor, heads: usize) -> Result<Tensor> {
        let c = x.dim(D::Minus1)?;
        // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
        let m = self.ada.forward(temb_silu)?;
        let norm_x = modulate(x, &chunk(&m, 0, c)?, &chunk(&m, 1, c)?)?;
        let (q, k, v) = nn::split_qkv_heads(&self.qkv.forward(&norm_x)?, heads)?;
        let scale = 1.0 / ((c / heads) as f64).sqrt();
        let a = crate::attention::attention(&q, &k, &v, scale, None)?;
        let x = fused::gated_residual_in_place(
            self.proj.forward_unbiased(&a)?,
            self.proj.bias(),
            &chunk(&m, 2, c)?,
            x,
        )?;
        let ff_in = modulate(&x, &chunk(&m, 3, c)?, &chunk(&m, 4, c)?)?;
        let h = fused::bias_in_place(self.fc1.forward_unbiased(&ff_in)?, self.fc1.bias(), true)?;
        fused::gated_residual_in_place(
            self.fc2.forward_unbiased(&h)?,
            self.fc2.bias(),
            &chunk(&m, 5, c)?,
            &x,
        )
    }
}

/// An SD3.5 ControlNet, loaded for one transformer.
#[derive(Debug, Clone)]
pub struct ControlNet {
    cfg: ControlNetConfig,
    layout: ControlNetLayout,
    source: PathBuf,
    pos_embed_input: Conv2d,
    t_fc1: Linear,
    t_fc2: Linear,
    y_fc1: Linear,
    y_fc2: Linear,
    blocks: Vec<Block>,
    controlnet_blocks: Vec<Linear>,
    weight_bytes: u64,
}

impl ControlNet {
    /// Reads a ControlNet's configuration (a diffusers folder's `config.json`, or a single
    /// file's shapes) and checks that it fits `transformer`, loading no weight: what a fetch
    /// or a start-up check can afford.
    pub fn inspect(path: &Path, transformer: &MmditConfig) -> Result<ControlNetConfig> {
        Ok(open(path, transformer, &Device::Cpu, Precision::F32)?.cfg)
    }

    /// Loads the ControlNet at `path` (a diffusers folder, or a single `.safetensors` file in
    /// either naming) for `transformer`, its linears stored as `precision` says (f32, bf16, or
    /// F8E4M3 with scales, like the transformer's). Refused, with the file and both shapes
    /// named, when it does not fit the transformer.
    pub fn load(
        path: &Path,
        transformer: &MmditConfig,
        device: &Device,
        precision: Precision,
    ) -> Result<Self> {
        let Opened {
            weights: w,
            names,
            cfg,
            shown,
        } = open(path, transformer, device, precision)?;
        let [t1, t2] = names.t_embedder();
        let [y1, y2] = names.y_embedder();
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        let mut controlnet_blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let b = names.block(i);
            let qkv: Vec<&str> = b.qkv.iter().map(String::as_str).collect();
            blocks.push(Block {
                ada: Linear::load(&w, &b.ada, true)?,
                qkv: Linear::load_fused(&w, &qkv, true)?,
                proj: Linear::load(&w, &b.proj, true)?,
                fc1: Linear::load(&w, &b.fc1, true)?,
                fc2: Linear::load(&w, &b.fc2, true)?,
            });
            controlnet_blocks.push(Linear::load(&w, &format!("controlnet_blocks.{i}"), true)?);
        }
        Ok(Self {
            pos_embed_input: Conv2d::load(&w, "pos_embed_input.proj", cfg.patch_size, 0)?,
            t_fc1: Linear::load(&w, t1, true)?,
            t_fc2: Linear::load(&w, t2, true)?,
            y_fc1: Linear::load(&w, y1, true)?,
            y_fc2: Linear::load(&w, y2, true)?,
            blocks,
            controlnet_blocks,
            weight_bytes: w.kept_bytes(),
            layout: names.layout,
            source: shown,
            cfg,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &ControlNetConfig {
        &self.cfg
    }

    /// Which names the file used.
    pub fn layout(&self) -> ControlNetLayout {
        self.layout
    }

    /// The folder or file it was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Bytes of the weights it keeps in memory.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Refuses the ControlNet for a transformer it does not fit (see
    /// [`ControlNetConfig::check_fits`]); [`ControlNet::load`] already checked the one it was
    /// loaded for.
    pub fn fits(&self, transformer: &MmditConfig) -> Result<()> {
        self.cfg.check_fits(&self.source, transformer)
    }

    /// The VAE shift factor to encode control images with: the VAE's own, or 0 when the config
    /// forces a zero pooled vector (diffusers ties the two together for InstantX's models).
    pub fn control_latent_shift(&self, vae_shift: f64) -> f64 {
        if self.cfg.force_zeros_for_pooled_projection {
            0.0
        } else {
            vae_shift
        }
    }

    /// The residuals, one `[B, N, hidden]` per block, already multiplied by `scale`.
    ///
    /// - `x_embedded` `[B, N, hidden]`: the transformer's patch embedding of the latents with
    ///   its positional embedding added (the tokens its first block takes);
    /// - `control_latents` `[B, in_channels, h, w]`: the control image's VAE latents (posterior
    ///   mean, shifted and scaled like the latents), with `h/p · w/p = N`;
    /// - `pooled` `[B, pooled_dim]`: the prompt's pooled vector (zeros are used instead when
    ///   the config forces them);
    /// - `timestep` `[B]`: the transformer's timestep (0..1000).
    ///
    /// Computed in `x_embedded`'s dtype.
    pub fn forward(
        &self,
        x_embedded: &Tensor,
        control_latents: &Tensor,
        pooled: &Tensor,
        timestep: &Tensor,
        scale: f64,
    ) -> Result<Vec<Tensor>> {
        let dtype = x_embedded.dtype();
        let (b, n, c) = x_embedded.dims3()?;
        let (cb, cc, h, w) = control_latents.dims4()?;
        let p = self.cfg.patch_size;
        if c != self.cfg.hidden {
            return Err(Error::Mismatch(format!(
                "ControlNet {}: tokens of width {c}, the ControlNet's is {}",
                self.source.display(),
                self.cfg.hidden
            )));
        }
        if cb != b
            || cc != self.cfg.in_channels
            || h % p != 0
            || w % p != 0
            || (h / p) * (w / p) != n
        {
            return Err(Error::invalid(
                "control_image",
                format!(
                    "control latents {:?} do not match {b} images of {n} tokens ({} channels, \
                     patch {p})",
                    control_latents.dims(),
                    self.cfg.in_channels
                ),
            ));
        }
        let pooled = if self.cfg.force_zeros_for_pooled_projection {
            pooled.zeros_like()?
        } else {
            pooled.clone()
        }
        .to_dtype(dtype)?;

        let t_emb = timestep_embedding(timestep, 256)?
            .to_device(x_embedded.device())?
            .to_dtype(dtype)?;
        let t_emb = self.t_fc2.forward(&self.t_fc1.forward(&t_emb)?.silu()?)?;
        let y_emb = self.y_fc2.forward(&self.y_fc1.forward(&pooled)?.silu()?)?;
        let temb_silu = (t_emb + y_emb)?.silu()?;

        let cond = self
            .pos_embed_input
            .forward(&control_latents.to_dtype(dtype)?)? // [B, C, h/p, w/p]
            .flatten_from(2)?
            .transpose(1, 2)?;
        let mut x = (x_embedded + cond)?.contiguous()?;
        let mut residuals = Vec::with_capacity(self.blocks.len());
        for (block, out) in self.blocks.iter().zip(&self.controlnet_blocks) {
            x = block.forward(&x, &temb_silu, self.cfg.heads)?;
            let r = out.forward(&x)?;
            residuals.push(if scale == 1.0 { r } else { (r * scale)? });
        }
        Ok(residuals)
    }
}
