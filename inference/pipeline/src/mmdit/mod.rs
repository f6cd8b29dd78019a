//! MMDiT (SD3.5 large / large-turbo) and MMDiT-X (SD3.5 medium: a second, image-only attention
//! in the first blocks), numerically equivalent to diffusers' `SD3Transformer2DModel`.
//!
//! Weights load from the diffusers names or the Stability single-file names (fused `qkv`, and
//! (shift, scale) order in the last context adaLN and the final layer's adaLN).

mod block;
mod config;

use candle_core::{DType, Tensor};

use crate::linear::Linear;
use crate::lora::{Active, Target};
use crate::nn::Conv2d;
use crate::weights::Weights;
use crate::{Error, Result};

use block::{Block, Mlp, attention};
pub(crate) use block::{chunk, modulate};
pub use config::{MmditConfig, MmditNames};

#[derive(Debug, Clone)]
pub struct Mmdit {
    cfg: MmditConfig,
    patch: Conv2d,
    pos_embed: Tensor,
    t_fc1: Linear,
    t_fc2: Linear,
    y_fc1: Linear,
    y_fc2: Linear,
    context_embedder: Linear,
    blocks: Vec<Block>,
    final_ada: Linear,
    final_shift_first: bool,
    final_linear: Linear,
}

impl Mmdit {
    /// Loads the transformer from `w` (already prefixed to the transformer's root).
    pub fn load(w: &Weights, cfg: MmditConfig, names: MmditNames) -> Result<Self> {
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let last = i + 1 == cfg.depth;
            let dual = cfg.dual_attention_layers.contains(&i);
            let block = match names {
                MmditNames::Diffusers => {
                    let b = w.pp(format!("transformer_blocks.{i}"));
                    Block {
                        x_ada: Linear::load(&b, "norm1.linear", true)?,
                        x_attn: attention(
                            &b,
                            &["attn.to_q", "attn.to_k", "attn.to_v"],
                            Some(("attn.norm_q", "attn.norm_k")),
                            Some("attn.to_out.0"),
                            cfg.qk_norm,
                        )?,
                        x_attn2: dual
                            .then(|| {
                                attention(
                                    &b,
                                    &["attn2.to_q", "attn2.to_k", "attn2.to_v"],
                                    Some(("attn2.norm_q", "attn2.norm_k")),
                                    Some("attn2.to_out.0"),
                                    cfg.qk_norm,
                                )
                            })
                            .transpose()?,
                        x_mlp: Mlp {
                            fc1: Linear::load(&b, "ff.net.0.proj", true)?,
                            fc2: Linear::load(&b, "ff.net.2", true)?,
                        },
                        c_ada: Linear::load(&b, "norm1_context.linear", true)?,
                        c_shift_first: false,
                        c_attn: attention(
                            &b,
                            &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
                            Some(("attn.norm_added_q", "attn.norm_added_k")),
                            (!last).then_some("attn.to_add_out"),
                            cfg.qk_norm,
                        )?,
                        c_mlp: (!last)
                            .then(|| -> Result<Mlp> {
                                Ok(Mlp {
                                    fc1: Linear::load(&b, "ff_context.net.0.proj", true)?,
                                    fc2: Linear::load(&b, "ff_context.net.2", true)?,
                                })
                            })
                            .transpose()?,
                    }
                }
                MmditNames::Stability => {
                    let b = w.pp(format!("joint_blocks.{i}"));
                    Block {
                        x_ada: Linear::load(&b, "x_block.adaLN_modulation.1", true)?,
                        x_attn: attention(
                            &b,
                            &["x_block.attn.qkv"],
                            Some(("x_block.attn.ln_q", "x_block.attn.ln_k")),
                            Some("x_block.attn.proj"),
                            cfg.qk_norm,
                        )?,
                        x_attn2: dual
                            .then(|| {
                                attention(
                                    &b,
                                    &["x_block.attn2.qkv"],
                                    Some(("x_block.attn2.ln_q", "x_block.attn2.ln_k")),
                                    Some("x_block.attn2.proj"),
                                    cfg.qk_norm,
                                )
                            })
                            .transpose()?,
                        x_mlp: Mlp {
                            fc1: Linear::load(&b, "x_block.mlp.fc1", true)?,
                            fc2: Linear::load(&b, "x_block.mlp.fc2", true)?,
                        },
                        c_ada: Linear::load(&b, "context_block.adaLN_modulation.1", true)?,
                        c_shift_first: true,
                        c_attn: attention(
                            &b,
                            &["context_block.attn.qkv"],
                            Some(("context_block.attn.ln_q", "context_block.attn.ln_k")),
                            (!last).then_some("context_block.attn.proj"),
                            cfg.qk_norm,
                        )?,
                        c_mlp: (!last)
                            .then(|| -> Result<Mlp> {
                                Ok(Mlp {
                                    fc1: Linear::load(&b, "context_block.mlp.fc1", true)?,
                                    fc2: Linear::load(&b, "context_block.mlp.fc2", true)?,
                                })
                            })
                            .transpose()?,
                    }
                }
            };
            blocks.push(block);
        }
        let p = cfg.patch_size;
        let (patch, pos, t, y, ctx, fin_ada, fin_lin, shift_first) = match names {
            MmditNames::Diffusers => (
                "pos_embed.proj",
                "pos_embed.pos_embed",
                [
                    "time_text_embed.timestep_embedder.linear_1",
                    "time_text_embed.timestep_embedder.linear_2",
                ],
                [
                    "time_text_embed.text_embedder.linear_1",
                    "time_text_embed.text_embedder.linear_2",
                ],
                "context_embedder",
                "norm_out.linear",
                "proj_out",
                false,
            ),
            MmditNames::Stability => (
                "x_embedder.proj",
                "pos_embed",
                ["t_embedder.mlp.0", "t_embedder.mlp.2"],
                ["y_embedder.mlp.0", "y_embedder.mlp.2"],
                "context_embedder",
                "final_layer.adaLN_modulation.1",
                "final_layer.linear",
                true,
            ),
        };
        let m = cfg.pos_embed_max_size;
        let pos_embed = w.get_shaped(pos, &[1, m * m, cfg.hidden])?;
        Ok(Self {
            patch: Conv2d::load(w, patch, p, 0)?,
            pos_embed,
            t_fc1: Linear::load(w, t[0], true)?,
            t_fc2: Linear::load(w, t[1], true)?,
            y_fc1: Linear::load(w, y[0], true)?,
            y_fc2: Linear::load(w, y[1], true)?,
            context_embedder: Linear::load(w, ctx, true)?,
            blocks,
            final_ada: Linear::load(w, fin_ada, true)?,
            final_shift_first: shift_first,
            final_linear: Linear::load(w, fin_lin, true)?,
            cfg,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &MmditConfig {
        &self.cfg
    }

    /// Predicts the flow (velocity) for `latents` `[B, C, H, W]` at `timesteps` `[B]` (0..1000),
    /// given the text context `[B, L, joint_dim]` and pooled vector `[B, pooled_dim]`.
    /// Blocks listed in `skip_layers` are left out (skip-layer guidance).
    pub fn forward(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        skip_layers: &[usize],
    ) -> Result<Tensor> {
        self.forward_with(
            latents,
            timesteps,
            context,
            pooled,
            skip_layers,
            &Extras::default(),
        )
    }

    /// The image tokens `[B, hp·wp, hidden]`: the patch embedding of `latents` plus the
    /// position embedding cropped from the centre of its table (what ControlNets start from).
    pub fn embed_patches(&self, latents: &Tensor) -> Result<Tensor> {
        let dtype = latents.dtype();
        let (_, _, h, w) = latents.dims4()?;
        let p = self.cfg.patch_size;
        let (hp, wp) = (h / p, w / p);
        let m = self.cfg.pos_embed_max_size;
        if h % p != 0 || w % p != 0 || hp > m || wp > m {
            return Err(Error::invalid(
                "size",
                format!(
                    "latent {h}x{w} must be a multiple of {p} and at most {} per side",
                    m * p
                ),
            ));
        }
        let x = self.patch.forward(latents)?; // [B, C, hp, wp]
        let c = self.cfg.hidden;
        let x = x.flatten_from(2)?.transpose(1, 2)?; // [B, hp*wp, C]
        let top = (m - hp) / 2;
        let left = (m - wp) / 2;
        let pos = self
            .pos_embed
            .reshape((1, m, m, c))?
            .narrow(1, top, hp)?
            .narrow(2, left, wp)?
            .reshape((1, hp * wp, c))?
            .to_dtype(dtype)?;
        Ok(x.broadcast_add(&pos)?.contiguous()?)
    }

    /// [`Mmdit::forward`] with LoRA adapters and ControlNet residuals ([`Extras`]).
    pub fn forward_with(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
        skip_layers: &[usize],
        extras: &Extras<'_>,
    ) -> Result<Tensor> {
        let adapters = extras.adapters;
        let dtype = latents.dtype();
        let (b, _, h, w) = latents.dims4()?;
        let p = self.cfg.patch_size;
        let (hp, wp) = (h / p, w / p);
        let c = self.cfg.hidden;
        let mut x = match extras.embedded {
            Some(x) => x.clone(),
            None => self.embed_patches(latents)?,
        };

        let t_emb = timestep_embedding(timesteps, 256)?
            .to_device(latents.device())?
            .to_dtype(dtype)?;
        let t_emb = self.t_fc2.forward_with(
            &self.t_fc1.forward_with(&t_emb, adapters)?.silu()?,
            adapters,
        )?;
        let y_emb = self.y_fc2.forward_with(
            &self.y_fc1.forward_with(pooled, adapters)?.silu()?,
            adapters,
        )?;
        let temb = (t_emb + y_emb)?;
        let temb_silu = temb.silu()?;

        let mut ctx = self.context_embedder.forward_with(context, adapters)?;
        let n_blocks = self.blocks.len();
        for (i, block) in self.blocks.iter().enumerate() {
            if !skip_layers.contains(&i) {
                let (new_ctx, new_x) =
                    block.forward(&x, &ctx, &temb_silu, self.cfg.heads, adapters)?;
                x = new_x;
                if let Some(nc) = new_ctx {
                    ctx = nc;
                }
            }
            // ControlNet residuals, as diffusers adds them: after every block but the last
            // (skipped or not), residual ⌊i / (blocks / residuals)⌋.
            if let Some(residuals) = extras.control
                && let Some(r) = block_residual(i, n_blocks, residuals.len())
            {
                x = (x + residuals[r].to_dtype(dtype)?)?;
            }
        }

        let fm = self.final_ada.forward_with(&temb_silu, adapters)?;
        let (shift, scale) = if self.final_shift_first {
            (chunk(&fm, 0, c)?, chunk(&fm, 1, c)?)
        } else {
            (chunk(&fm, 1, c)?, chunk(&fm, 0, c)?)
        };
        let x = self
            .final_linear
            .forward_with(&modulate(&x, &shift, &scale)?, adapters)?;
        // Unpatchify: [B, hp*wp, p*p*C] -> [B, C, hp*p, wp*p].
        let oc = self.cfg.out_channels;
        let x = x
            .reshape((b * hp, wp, p, p, oc))?
            .permute((0, 4, 2, 1, 3))? // [b*hp, C, p, wp, q]
            .contiguous()?
            .reshape((b, hp, oc, p * wp * p))?
            .transpose(1, 2)? // [b, C, hp, p*wp*q]
            .contiguous()?
            .reshape((b, oc, hp * p, wp * p))?;
        Ok(x)
    }

    /// Every linear an adapter may target, under diffusers' module names, with the rows each
    /// module is of its layer (q, k and v share one) and whether the layer stores them in
    /// Stability's (shift, scale) order.
    pub fn lora_targets(&self) -> Result<Vec<Target>> {
        let h = self.cfg.hidden;
        let mut out = Vec::new();
        let mut one = |l: &Linear, name: String, swapped: bool| -> Result<()> {
            out.push(l.target(name, None, swapped)?);
            Ok(())
        };
        one(
            &self.t_fc1,
            "time_text_embed.timestep_embedder.linear_1".into(),
            false,
        )?;
        one(
            &self.t_fc2,
            "time_text_embed.timestep_embedder.linear_2".into(),
            false,
        )?;
        one(
            &self.y_fc1,
            "time_text_embed.text_embedder.linear_1".into(),
            false,
        )?;
        one(
            &self.y_fc2,
            "time_text_embed.text_embedder.linear_2".into(),
            false,
        )?;
        one(&self.context_embedder, "context_embedder".into(), false)?;
        one(
            &self.final_ada,
            "norm_out.linear".into(),
            self.final_shift_first,
        )?;
        one(&self.final_linear, "proj_out".into(), false)?;
        let qkv = |l: &Linear, names: [String; 3]| -> Result<Vec<Target>> {
            names
                .into_iter()
                .enumerate()
                .map(|(i, n)| l.target(n, Some((i * h, h)), false))
                .collect()
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let b = format!("transformer_blocks.{i}");
            let mut more = qkv(
                &block.x_attn.qkv,
                ["to_q", "to_k", "to_v"].map(|m| format!("{b}.attn.{m}")),
            )?;
            more.extend(qkv(
                &block.c_attn.qkv,
                ["add_q_proj", "add_k_proj", "add_v_proj"].map(|m| format!("{b}.attn.{m}")),
            )?);
            if let Some(a2) = &block.x_attn2 {
                more.extend(qkv(
                    &a2.qkv,
                    ["to_q", "to_k", "to_v"].map(|m| format!("{b}.attn2.{m}")),
                )?);
                if let Some(p) = &a2.proj {
                    more.push(p.target(format!("{b}.attn2.to_out.0"), None, false)?);
                }
            }
            if let Some(p) = &block.x_attn.proj {
                more.push(p.target(format!("{b}.attn.to_out.0"), None, false)?);
            }
            if let Some(p) = &block.c_attn.proj {
                more.push(p.target(format!("{b}.attn.to_add_out"), None, false)?);
            }
            more.push(
                block
                    .x_ada
                    .target(format!("{b}.norm1.linear"), None, false)?,
            );
            more.push(block.c_ada.target(
                format!("{b}.norm1_context.linear"),
                None,
                block.c_mlp.is_none() && block.c_shift_first,
            )?);
            more.push(
                block
                    .x_mlp
                    .fc1
                    .target(format!("{b}.ff.net.0.proj"), None, false)?,
            );
            more.push(
                block
                    .x_mlp
                    .fc2
                    .target(format!("{b}.ff.net.2"), None, false)?,
            );
            if let Some(m) = &block.c_mlp {
                more.push(
                    m.fc1
                        .target(format!("{b}.ff_context.net.0.proj"), None, false)?,
                );
                more.push(m.fc2.target(format!("{b}.ff_context.net.2"), None, false)?);
            }
            out.extend(more);
        }
        Ok(out)
    }
}

/// What a transformer pass may add to the base model: LoRA adapters, ControlNet residuals, and
/// the image tokens already embedded (a ControlNet read them first).
#[derive(Debug, Default, Clone, Copy)]
pub struct Extras<'a> {
    /// Compiled adapters of the transformer.
    pub adapters: Active<'a>,
    /// One residual `[B, N, hidden]` per ControlNet block (summed over ControlNets).
    pub control: Option<&'a [Tensor]>,
    /// [`Mmdit::embed_patches`] of the latents, when already computed.
    pub embedded: Option<&'a Tensor>,
}

/// Sinusoidal timestep features `[cos | sin]` (diffusers' `Timesteps(256, flip_sin_to_cos=True,
/// downscale_freq_shift=0)`), computed in f32.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let ln = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((ln * i as f32) / half as f32).exp())
        .collect();
    let t = t
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(t.len() * dim);
    for tv in &t {
        let args: Vec<f32> = freqs.iter().map(|f| tv * f).collect();
        out.extend(args.iter().map(|a| a.cos()));
        out.extend(args.iter().map(|a| a.sin()));
    }
    Ok(Tensor::from_vec(
        out,
        (t.len(), dim),
        &candle_core::Device::Cpu,
    )?)
}

/// Which of `residuals` ControlNet outputs transformer block `block` (of `depth`) adds to its
/// image tokens after it runs, as diffusers' `SD3Transformer2DModel` picks it:
/// `int(block / (depth / residuals))` in floating point, and none for the last block (its
/// context stream is "pre-only", which diffusers' condition excludes). SD3.5 Large's 38 blocks
/// with a 19-block ControlNet: blocks 2k and 2k+1 add residual k, block 37 none.
pub fn block_residual(block: usize, depth: usize, residuals: usize) -> Option<usize> {
    if residuals == 0 || block + 1 >= depth {
        return None;
    }
    let interval = depth as f64 / residuals as f64;
    let index = (block as f64 / interval) as usize;
    (index < residuals).then_some(index)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::block_residual;

    #[test]
    fn residuals_map_to_blocks_as_diffusers_does() {
        // Large with a 19-block ControlNet: pairs of blocks share a residual, the last none.
        let map: Vec<Option<usize>> = (0..38).map(|i| block_residual(i, 38, 19)).collect();
        assert_eq!(map[0], Some(0));
        assert_eq!(map[1], Some(0));
        assert_eq!(map[2], Some(1));
        assert_eq!(map[36], Some(18));
        assert_eq!(map[37], None);
        // The tiny model: two blocks, two residuals; the second block is the last.
        assert_eq!(block_residual(0, 2, 2), Some(0));
        assert_eq!(block_residual(1, 2, 2), None);
        // Uneven: 24 blocks, 5 residuals: int(i / 4.8).
        let uneven: Vec<Option<usize>> = (0..24).map(|i| block_residual(i, 24, 5)).collect();
        assert_eq!(uneven[4], Some(0));
        assert_eq!(uneven[5], Some(1));
        assert_eq!(uneven[19], Some(3));
        assert_eq!(uneven[20], Some(4));
        assert_eq!(block_residual(0, 4, 0), None);
    }
}
