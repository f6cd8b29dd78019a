//! Small building blocks shared by the models, written to match PyTorch's arithmetic.

use candle_core::{D, DType, Tensor};

use crate::Result;
use crate::fused::{self, Norm};
use crate::weights::Weights;

/// Converts a stored weight to the compute dtype (a no-op when it already is).
pub fn to(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(t.to_dtype(dtype)?)
}

/// LayerNorm over the last dimension, optionally affine (one fused pass on the CPU).
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    fused::norm(x, Norm::Layer, eps, weight, 0.0, bias)
}

/// RMSNorm over the last dimension with a learned scale (qk-norm, T5's layer norm).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    fused::norm(x, Norm::Rms, eps, Some(weight), 0.0, None)
}

/// GroupNorm of an NCHW tensor with affine parameters.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let (b, c, h, w) = x.dims4()?;
    let xg = x
        .to_dtype(DType::F32)?
        .reshape((b, groups, (c / groups) * h * w))?;
    let mean = xg.mean_keepdim(D::Minus1)?;
    let centered = xg.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape((b, c, h, w))?;
    let wt = weight.to_dtype(DType::F32)?.reshape((1, c, 1, 1))?;
    let bs = bias.to_dtype(DType::F32)?.reshape((1, c, 1, 1))?;
    Ok(y.broadcast_mul(&wt)?.broadcast_add(&bs)?.to_dtype(dtype)?)
}

/// `x * sigmoid(1.702 x)`, CLIP-L's activation.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// GELU with the tanh approximation (PyTorch's `approximate="tanh"`), written as
/// `x * sigmoid(2u)` with `u = sqrt(2/pi) (x + 0.044715 x^3)`, which equals
/// `0.5 x (1 + tanh(u))`. On CPU in f32 it runs on all threads; candle's own element-wise ops
/// run on one.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 && x.device().is_cpu() {
        Ok(x.contiguous()?.apply_op1_no_bwd(&GeluTanh)?)
    } else {
        Ok(x.gelu()?)
    }
}

struct GeluTanh;

impl candle_core::CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh-f32"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("gelu-tanh needs a contiguous input".into()))?;
        let src = &storage.as_slice::<f32>()?[start..end];
        let mut dst = vec![0f32; src.len()];
        const C: f32 = 0.797_884_6; // sqrt(2 / pi)
        dst.par_chunks_mut(4096)
            .zip(src.par_chunks(4096))
            .for_each(|(d, s)| {
                for (o, &x) in d.iter_mut().zip(s) {
                    let u = C * (x + 0.044715 * x * x * x);
                    *o = x / (1.0 + (-2.0 * u).exp());
                }
            });
        Ok((candle_core::CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// Splits a fused projection `[B, N, 3·C]` (queries, keys, values side by side) into three
/// `[B, H, N, C/H]` views of it, nothing copied (the kernels read heads through their strides).
pub fn split_qkv_heads(qkv: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, n, c3) = qkv.dims3()?;
    let qkv = qkv.reshape((b, n, 3, heads, c3 / 3 / heads))?;
    let part =
        |i: usize| -> Result<Tensor> { Ok(qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?) };
    Ok((part(0)?, part(1)?, part(2)?))
}

/// Merges heads `[B, H, N, D]` back into `[B, N, H*D]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, n, h * d))?)
}

/// A 2-D convolution with bias.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Loads `{name}.weight` / `{name}.bias`.
    pub fn load(w: &Weights, name: &str, stride: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{name}.weight"))?,
            bias: w.get(&format!("{name}.bias"))?,
            stride,
            padding,
        })
    }

    /// Output channels.
    pub fn out_channels(&self) -> Result<usize> {
        Ok(self.weight.dim(0)?)
    }

    /// Applies the convolution to an NCHW tensor.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let w = self.weight.to_dtype(dtype)?;
        let y = if w.dim(2)? == 1 && w.dim(3)? == 1 && self.stride == 1 {
            // 1x1 convolutions are matmuls over channels.
            let (b, c, h, wd) = x.dims4()?;
            let o = w.dim(0)?;
            let w2 = w.reshape((o, c))?;
            w2.broadcast_matmul(&x.reshape((b, c, h * wd))?)?
                .reshape((b, o, h, wd))?
        } else {
            x.conv2d(&w, self.padding, self.stride, 1, 1)?
        };
        let c = self.bias.dim(0)?;
        Ok(y.broadcast_add(&self.bias.to_dtype(dtype)?.reshape((1, c, 1, 1))?)?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use candle_core::{Device, Tensor};

    #[test]
    fn qkv_heads_are_views_of_the_projection() {
        let (b, n, h, d) = (2, 5, 3, 4);
        let qkv = Tensor::arange(0f32, (b * n * 3 * h * d) as f32, &Device::Cpu)
            .unwrap()
            .reshape((b, n, 3 * h * d))
            .unwrap();
        let (q, k, v) = super::split_qkv_heads(&qkv, h).unwrap();
        for (i, t) in [q, k, v].iter().enumerate() {
            assert_eq!(t.dims(), &[b, h, n, d]);
            // The same storage, read through strides: nothing was copied.
            assert!(!t.is_contiguous());
            let (storage, _) = t.storage_and_layout();
            let (whole, _) = qkv.storage_and_layout();
            assert!(std::ptr::eq(&*storage, &*whole));
            drop((storage, whole));
            // Head `hi` of part `i` is columns [(i·h + hi)·d, +d) of each token.
            let want = qkv
                .narrow(2, i * h * d, h * d)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((b, n, h, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let diff = (t - &want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        }
    }
}
