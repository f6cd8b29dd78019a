//! One joint block of the MMDiT (and MMDiT-X's extra image-only attention): adaLN modulation,
//! joint attention over image and context tokens, gated MLPs; and how a block's weights load
//! under either naming.

use candle_core::{D, Tensor};

use crate::attention::{self, Qkv, joint_attention};
use crate::fused::{self, Norm};
use crate::linear::Linear;
use crate::lora::Active;
use crate::nn;
use crate::weights::Weights;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub(super) struct Attention {
    pub(super) qkv: Linear,
    pub(super) norm_q: Option<Tensor>,
    pub(super) norm_k: Option<Tensor>,
    pub(super) proj: Option<Linear>,
}

impl Attention {
    fn qkv_heads(
        &self,
        x: &Tensor,
        heads: usize,
        adapters: Active<'_>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = nn::split_qkv_heads(&self.qkv.forward_with(x, adapters)?, heads)?;
        let q = match &self.norm_q {
            Some(w) => nn::rms_norm(&q, w, 1e-6)?,
            None => q,
        };
        let k = match &self.norm_k {
            Some(w) => nn::rms_norm(&k, w, 1e-6)?,
            None => k,
        };
        Ok((q, k, v))
    }
}

#[derive(Debug, Clone)]
pub(super) struct Mlp {
    pub(super) fc1: Linear,
    pub(super) fc2: Linear,
}

impl Mlp {
    /// `residual + mlp(x) · gate`, the bias, GELU and gated residual fused into the products.
    fn gated(
        &self,
        x: &Tensor,
        gate: &Tensor,
        residual: &Tensor,
        adapters: Active<'_>,
    ) -> Result<Tensor> {
        let h = fused::bias_in_place(
            self.fc1.forward_unbiased_with(x, adapters)?,
            self.fc1.bias(),
            true,
        )?;
        fused::gated_residual_in_place(
            self.fc2.forward_unbiased_with(&h, adapters)?,
            self.fc2.bias(),
            gate,
            residual,
        )
    }
}

/// `residual + proj(a) · gate`.
fn gated_proj(
    proj: &Linear,
    a: &Tensor,
    gate: &Tensor,
    residual: &Tensor,
    adapters: Active<'_>,
) -> Result<Tensor> {
    fused::gated_residual_in_place(
        proj.forward_unbiased_with(a, adapters)?,
        proj.bias(),
        gate,
        residual,
    )
}

#[derive(Debug, Clone)]
pub(super) struct Block {
    pub(super) x_ada: Linear,
    pub(super) x_attn: Attention,
    pub(super) x_attn2: Option<Attention>,
    pub(super) x_mlp: Mlp,
    pub(super) c_ada: Linear,
    /// Context adaLN of the last block: whether its two chunks are (shift, scale).
    pub(super) c_shift_first: bool,
    pub(super) c_attn: Attention,
    pub(super) c_mlp: Option<Mlp>,
}

/// `x` layer-normalised (no affine) and modulated: `ln(x) * (1 + scale) + shift`.
pub(crate) fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    fused::norm(x, Norm::Layer, 1e-6, Some(scale), 1.0, Some(shift))
}

/// The `i`-th of the `[B, k*C]` modulation chunks, as `[B, 1, C]`.
pub(crate) fn chunk(m: &Tensor, i: usize, c: usize) -> Result<Tensor> {
    Ok(m.narrow(1, i * c, c)?.unsqueeze(1)?)
}

impl Block {
    pub(super) fn forward(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        temb_silu: &Tensor,
        heads: usize,
        adapters: Active<'_>,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let c = x.dim(D::Minus1)?;
        let xm = self.x_ada.forward_with(temb_silu, adapters)?;
        let norm_x = modulate(x, &chunk(&xm, 0, c)?, &chunk(&xm, 1, c)?)?;
        let pre_only = self.c_mlp.is_none();
        let cm = self.c_ada.forward_with(temb_silu, adapters)?;
        let norm_c = if pre_only {
            let (shift, scale) = if self.c_shift_first {
                (chunk(&cm, 0, c)?, chunk(&cm, 1, c)?)
            } else {
                (chunk(&cm, 1, c)?, chunk(&cm, 0, c)?)
            };
            modulate(ctx, &shift, &scale)?
        } else {
            modulate(ctx, &chunk(&cm, 0, c)?, &chunk(&cm, 1, c)?)?
        };

        // Joint attention over [image tokens, context tokens].
        let (qx, kx, vx) = self.x_attn.qkv_heads(&norm_x, heads, adapters)?;
        let (qc, kc, vc) = self.c_attn.qkv_heads(&norm_c, heads, adapters)?;
        let scale = 1.0 / ((c / heads) as f64).sqrt();
        let parts = [
            Qkv {
                q: &qx,
                k: &kx,
                v: &vx,
            },
            Qkv {
                q: &qc,
                k: &kc,
                v: &vc,
            },
        ];
        let (a_x, a_c) = match <[Tensor; 2]>::try_from(joint_attention(&parts, scale)?) {
            Ok([a_x, a_c]) => (a_x, a_c),
            Err(_) => return Err(Error::Layout("joint attention lost a part".into())),
        };

        let x_proj = self
            .x_attn
            .proj
            .as_ref()
            .ok_or_else(|| Error::Layout("image attention without output projection".into()))?;
        let mut out_x = gated_proj(x_proj, &a_x, &chunk(&xm, 2, c)?, x, adapters)?;
        if let Some(attn2) = &self.x_attn2 {
            // MMDiT-X: image-only attention on the block input, modulated by chunks 6..9.
            let norm_x2 = modulate(x, &chunk(&xm, 6, c)?, &chunk(&xm, 7, c)?)?;
            let (q, k, v) = attn2.qkv_heads(&norm_x2, heads, adapters)?;
            let a2 = attention::attention(&q, &k, &v, scale, None)?;
            let proj2 = attn2
                .proj
                .as_ref()
                .ok_or_else(|| Error::Layout("attn2 without output projection".into()))?;
            out_x = gated_proj(proj2, &a2, &chunk(&xm, 8, c)?, &out_x, adapters)?;
        }
        let ff_in = modulate(&out_x, &chunk(&xm, 3, c)?, &chunk(&xm, 4, c)?)?;
        let out_x = self
            .x_mlp
            .gated(&ff_in, &chunk(&xm, 5, c)?, &out_x, adapters)?;

        let out_c = match &self.c_mlp {
            None => None,
            Some(mlp) => {
                let proj =
                    self.c_attn.proj.as_ref().ok_or_else(|| {
                        Error::Layout("context attention without projection".into())
                    })?;
                let ctx = gated_proj(proj, &a_c, &chunk(&cm, 2, c)?, ctx, adapters)?;
                let ff_in = modulate(&ctx, &chunk(&cm, 3, c)?, &chunk(&cm, 4, c)?)?;
                Some(mlp.gated(&ff_in, &chunk(&cm, 5, c)?, &ctx, adapters)?)
            }
        };
        Ok((out_c, out_x))
    }
}

pub(super) fn attention(
    w: &Weights,
    qkv: &[&str],
    norms: Option<(&str, &str)>,
    proj: Option<&str>,
    qk_norm: bool,
) -> Result<Attention> {
    let (norm_q, norm_k) = match (qk_norm, norms) {
        (true, Some((q, k))) => (
            Some(w.get(&format!("{q}.weight"))?),
            Some(w.get(&format!("{k}.weight"))?),
        ),
        _ => (None, None),
    };
    Ok(Attention {
        qkv: Linear::load_fused(w, qkv, true)?,
        norm_q,
        norm_k,
        proj: proj.map(|p| Linear::load(w, p, true)).transpose()?,
    })
}
