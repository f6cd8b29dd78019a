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

/// GroupNorm of NCHW tensors with affine parameters (`eps` inside the square root, biased
/// variance, like PyTorch), computed in f32 and returned in the input's dtype, optionally
/// followed by SiLU (the VAE applies one after most of its norms).
///
/// The statistics are computed a few groups at a time, so the f32 temporaries stay within the
/// op graph's chunk size ([`crate::op_graph`]); the normalisation can then be applied to any
/// band of rows ([`GroupNorm::apply`]), so a convolution reads normalised rows band by band
/// and no full-size normalised copy of a VAE activation ever exists. Each group's statistics
/// are computed whole, so the result does not depend on the chunking.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// Per-(item, group) mean and `1 / sqrt(var + eps)`, `[B, groups, 1, 1]` each (f32).
#[derive(Debug, Clone)]
pub struct GroupStats {
    mean: Tensor,
    rstd: Tensor,
}

impl GroupNorm {
    /// Loads `{name}.weight` and `{name}.bias`.
    pub fn load(w: &Weights, name: &str, groups: usize, eps: f64) -> Result<Self> {
        Self::new(
            w.get(&format!("{name}.weight"))?,
            w.get(&format!("{name}.bias"))?,
            groups,
            eps,
        )
    }

    /// A GroupNorm of `weight.len()` channels in `groups` groups.
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let c = weight.dim(0)?;
        if groups == 0 || c % groups != 0 {
            return Err(crate::Error::Layout(format!(
                "GroupNorm of {c} channels in {groups} groups"
            )));
        }
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// The statistics of `x`, with chunks of at most the op graph's chunk size.
    pub fn stats(&self, x: &Tensor) -> Result<GroupStats> {
        self.stats_under(x, crate::op_graph::current().chunk_elements)
    }

    fn stats_under(&self, x: &Tensor, limit: usize) -> Result<GroupStats> {
        let (b, c, h, w) = x.dims4()?;
        let groups = self.groups;
        let per_group = c / groups;
        // Three f32 temporaries of a chunk are alive at once (input, centred, squares).
        let step = crate::op_graph::rows_per_chunk(groups, 3 * b * per_group * h * w, limit);
        if step < groups {
            crate::op_graph::note_chunked();
        }
        let (mut means, mut rstds) = (Vec::new(), Vec::new());
        for g0 in (0..groups).step_by(step) {
            let n = step.min(groups - g0);
            let xg = x
                .narrow(1, g0 * per_group, n * per_group)?
                .to_dtype(DType::F32)?
                .reshape((b, n, per_group * h * w))?;
            let mean = xg.mean_keepdim(D::Minus1)?;
            let var = xg.broadcast_sub(&mean)?.sqr()?.mean_keepdim(D::Minus1)?;
            rstds.push((var + self.eps)?.sqrt()?.recip()?);
            means.push(mean);
        }
        let cat =
            |v: &[Tensor]| -> Result<Tensor> { Ok(Tensor::cat(v, 1)?.reshape((b, groups, 1, 1))?) };
        Ok(GroupStats {
            mean: cat(&means)?,
            rstd: cat(&rstds)?,
        })
    }

    /// Normalises `rows` (`[B, C, r, W]`, any band of the tensor `stats` were taken of), then
    /// applies the affine parameters and, when `silu`, SiLU.
    pub fn apply(&self, rows: &Tensor, stats: &GroupStats, silu: bool) -> Result<Tensor> {
        let dtype = rows.dtype();
        let (b, c, r, w) = rows.dims4()?;
        let y = rows
            .to_dtype(DType::F32)?
            .reshape((b, self.groups, c / self.groups, r * w))?
            .broadcast_sub(&stats.mean)?
            .broadcast_mul(&stats.rstd)?
            .reshape((b, c, r, w))?;
        let wt = self.weight.to_dtype(DType::F32)?.reshape((1, c, 1, 1))?;
        let bs = self.bias.to_dtype(DType::F32)?.reshape((1, c, 1, 1))?;
        let y = y.broadcast_mul(&wt)?.broadcast_add(&bs)?;
        let y = if silu { y.silu()? } else { y };
        Ok(y.to_dtype(dtype)?)
    }

    /// The whole of `x` normalised (and SiLU'd when `silu`).
    pub fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let stats = self.stats(x)?;
        self.apply(x, &stats, silu)
    }
}

/// `x * sigmoid(1.702 x)`, CLIP-L's activation.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// GELU with the tanh approximation (PyTorch's `approximate="tanh"`), on all threads on the
/// fused CPU graph ([`fused::gelu`]).
pub use crate::fused::gelu as gelu_tanh;

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

/// Zero padding of a convolution's input, per side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pad {
    /// Rows above.
    pub top: usize,
    /// Rows below.
    pub bottom: usize,
    /// Columns on the left.
    pub left: usize,
    /// Columns on the right.
    pub right: usize,
}

impl Pad {
    /// The same padding on every side.
    pub const fn all(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }
}

/// A 2-D convolution with bias (square stride, no dilation).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: Pad,
}

impl Conv2d {
    /// Loads `{name}.weight` / `{name}.bias`, with `padding` on every side.
    pub fn load(w: &Weights, name: &str, stride: usize, padding: usize) -> Result<Self> {
        Self::load_padded(w, name, stride, Pad::all(padding))
    }

    /// Loads `{name}.weight` / `{name}.bias` with any padding (the VAE encoder's downsamplers
    /// pad only the bottom and right).
    pub fn load_padded(w: &Weights, name: &str, stride: usize, padding: Pad) -> Result<Self> {
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
        let y = if w.dim(2)? == 1
            && w.dim(3)? == 1
            && self.stride == 1
            && self.padding == Pad::all(0)
        {
            // 1x1 convolutions are matmuls over channels.
            let (b, c, h, wd) = x.dims4()?;
            let o = w.dim(0)?;
            let w2 = w.reshape((o, c))?;
            w2.broadcast_matmul(&x.reshape((b, c, h * wd))?)?
                .reshape((b, o, h, wd))?
        } else {
            let (b, c, h, wd) = x.dims4()?;
            let input = Input {
                rows: &|r0: usize, r1: usize| Ok(x.narrow(2, r0, r1 - r0)?),
                b,
                c,
                h,
                w: wd,
            };
            conv2d_in_bands(&input, &w, self.padding, self.stride, chunk_elements())?
        };
        self.add_bias(y)
    }

    /// The convolution of `norm(x)` (with SiLU when `silu`), each band of output rows
    /// normalising only the input rows it reads, so no normalised copy of `x` is made.
    pub fn forward_normed(&self, x: &Tensor, norm: &GroupNorm, silu: bool) -> Result<Tensor> {
        let stats = norm.stats(x)?;
        let dtype = x.dtype();
        let w = self.weight.to_dtype(dtype)?;
        let (b, c, h, wd) = x.dims4()?;
        let rows = |r0: usize, r1: usize| norm.apply(&x.narrow(2, r0, r1 - r0)?, &stats, silu);
        let input = Input {
            rows: &rows,
            b,
            c,
            h,
            w: wd,
        };
        let y = conv2d_in_bands(&input, &w, self.padding, self.stride, chunk_elements())?;
        self.add_bias(y)
    }

    /// The convolution of `x` upsampled 2× by nearest neighbour (the VAE decoder's upsampler),
    /// without materialising the upsampled tensor: each band of output rows upsamples only
    /// the input rows it reads.
    pub fn forward_upsampled(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let w = self.weight.to_dtype(dtype)?;
        let (b, c, h, wd) = x.dims4()?;
        let rows = |r0: usize, r1: usize| -> Result<Tensor> {
            // Rows r0..r1 of the upsampled input are rows r0/2 ..= (r1-1)/2 of `x`, doubled.
            let (s0, s1) = (r0 / 2, (r1 - 1) / 2 + 1);
            let band = x
                .narrow(2, s0, s1 - s0)?
                .upsample_nearest2d(2 * (s1 - s0), 2 * wd)?;
            Ok(band.narrow(2, r0 - 2 * s0, r1 - r0)?)
        };
        let input = Input {
            rows: &rows,
            b,
            c,
            h: 2 * h,
            w: 2 * wd,
        };
        let y = conv2d_in_bands(&input, &w, self.padding, self.stride, chunk_elements())?;
        self.add_bias(y)
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        let c = self.bias.dim(0)?;
        let bias = self.bias.to_dtype(y.dtype())?.reshape((1, c, 1, 1))?;
        Ok(y.broadcast_add(&bias)?)
    }
}

fn chunk_elements() -> usize {
    crate::op_graph::current().chunk_elements
}

/// A convolution's NCHW input, read by rows: `rows(r0, r1)` returns rows `r0..r1` (unpadded,
/// `[B, C, r1 - r0, W]`).
struct Input<'a> {
    rows: &'a dyn Fn(usize, usize) -> Result<Tensor>,
    b: usize,
    c: usize,
    h: usize,
    w: usize,
}

/// The convolution of `input` by `w` (`[O, C, kh, kw]`) computed in bands of output rows, so
/// that no band's im2col buffer (`B · rows · W_out · C · kh · kw` elements) exceeds `limit`:
/// candle's CUDA im2col counts in 32 bits, and the VAE's last convolutions at 1376² would pass
/// 2³²; the bound also caps the largest temporary buffer. Each band reads the input rows it
/// needs, zero-padded where it meets the border, and is convolved with no padding, so every
/// output value is the same sum as in one call. Bands are written into one output tensor.
fn conv2d_in_bands(
    input: &Input<'_>,
    w: &Tensor,
    pad: Pad,
    stride: usize,
    limit: usize,
) -> Result<Tensor> {
    let (b, c, h, wd) = (input.b, input.c, input.h, input.w);
    let (o, _, kh, kw) = w.dims4()?;
    let (padded_h, padded_w) = (h + pad.top + pad.bottom, wd + pad.left + pad.right);
    if stride == 0 || padded_h < kh || padded_w < kw {
        return Err(crate::Error::Layout(format!(
            "a {kh}x{kw} convolution with padding {pad:?} and stride {stride} does not fit a \
             {h}x{wd} input"
        )));
    }
    let h_out = (padded_h - kh) / stride + 1;
    let w_out = (padded_w - kw) / stride + 1;
    let rows = crate::op_graph::rows_per_chunk(h_out, b * w_out * c * kh * kw, limit);
    let band = |start: usize, len: usize| -> Result<Tensor> {
        // Padded-input rows [start·stride, start·stride + (len-1)·stride + kh) are input rows
        // shifted by `pad.top`; those outside 0..h are zeros.
        let lo = start * stride;
        let hi = lo + (len - 1) * stride + kh;
        let (in_lo, in_hi) = (
            lo.max(pad.top) - pad.top,
            (hi.max(pad.top) - pad.top).min(h),
        );
        let (top, bottom) = (pad.top.saturating_sub(lo), hi.saturating_sub(h + pad.top));
        let mut x = (input.rows)(in_lo, in_hi.max(in_lo))?;
        if top > 0 || bottom > 0 {
            x = x.pad_with_zeros(2, top, bottom)?;
        }
        if pad.left > 0 || pad.right > 0 {
            x = x.pad_with_zeros(3, pad.left, pad.right)?;
        }
        Ok(x.conv2d(w, 0, stride, 1, 1)?)
    };
    if rows >= h_out {
        return band(0, h_out);
    }
    crate::op_graph::note_chunked();
    let out = Tensor::zeros((b, o, h_out, w_out), w.dtype(), w.device())?;
    for start in (0..h_out).step_by(rows) {
        out.slice_set(&band(start, rows.min(h_out - start))?, 2, start)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use candle_core::{DType, Device, Tensor};

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

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn convolutions_in_bands_equal_one_call() {
        let dev = Device::Cpu;
        for (padding, stride, k) in [(1, 1, 3), (0, 2, 2), (1, 2, 3), (0, 1, 3)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, 11, 9), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (4, 3, k, k), &dev).unwrap();
            let whole = x.conv2d(&w, padding, stride, 1, 1).unwrap();
            let (_, _, h_out, w_out) = whole.dims4().unwrap();
            let rows = |r0: usize, r1: usize| Ok(x.narrow(2, r0, r1 - r0)?);
            let input = super::Input {
                rows: &rows,
                b: 2,
                c: 3,
                h: 11,
                w: 9,
            };
            // Limits of one, two and three output rows' im2col, and of all of them.
            for band in [1, 2, 3, h_out] {
                let limit = band * 2 * w_out * 3 * k * k;
                let banded =
                    super::conv2d_in_bands(&input, &w, super::Pad::all(padding), stride, limit)
                        .unwrap();
                let d = max_diff(&banded, &whole);
                assert!(
                    d < 1e-5,
                    "padding {padding} stride {stride} band {band}: {d}"
                );
            }
        }
    }

    #[test]
    fn upsampled_convolution_in_bands_equals_upsampling_first() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 3, 5, 4), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 3, 3, 3), &dev).unwrap();
        let want = x
            .upsample_nearest2d(10, 8)
            .unwrap()
            .conv2d(&w, 1, 1, 1, 1)
            .unwrap();
        let conv = super::Conv2d {
            weight: w.clone(),
            bias: Tensor::zeros(2, DType::F32, &dev).unwrap(),
            stride: 1,
            padding: super::Pad::all(1),
        };
        let got = conv.forward_upsampled(&x).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        let rows = |r0: usize, r1: usize| {
            let (s0, s1) = (r0 / 2, (r1 - 1) / 2 + 1);
            let band = x
                .narrow(2, s0, s1 - s0)?
                .upsample_nearest2d(2 * (s1 - s0), 8)?;
            Ok(band.narrow(2, r0 - 2 * s0, r1 - r0)?)
        };
        let input = super::Input {
            rows: &rows,
            b: 1,
            c: 3,
            h: 10,
            w: 8,
        };
        for band in 1..=4 {
            let got =
                super::conv2d_in_bands(&input, &w, super::Pad::all(1), 1, band * 8 * 27).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "band {band}");
        }
    }

    #[test]
    fn group_norm_in_group_chunks_and_row_bands_equals_the_definition() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1.0, (2, 8, 5, 3), &dev).unwrap() * 3.0).unwrap();
        let w = Tensor::randn(1f32, 0.2, 8, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.2, 8, &dev).unwrap();
        let gn = super::GroupNorm::new(w.clone(), b.clone(), 4, 1e-6).unwrap();
        for silu in [false, true] {
            let whole = gn.forward(&x, silu).unwrap();
            // The definition, by hand, for group 1 of item 0: channels 2 and 3.
            let g = x.narrow(0, 0, 1).unwrap().narrow(1, 2, 2).unwrap();
            let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f32>() / v.len() as f32;
            let (wv, bv) = (w.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
            let first = (v[0] - mean) / (var + 1e-6).sqrt() * wv[2] + bv[2];
            let first = if silu {
                first / (1.0 + (-first).exp())
            } else {
                first
            };
            let got = whole
                .narrow(0, 0, 1)
                .unwrap()
                .narrow(1, 2, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()[0];
            assert!((got - first).abs() < 1e-4, "{got} vs {first}");
            // Statistics one group (3 · 2 · 2 · 15 elements of temporaries) at a time, then
            // two; the normalisation applied band by band.
            for groups in [1, 2] {
                let stats = gn.stats_under(&x, groups * 3 * 2 * 2 * 15).unwrap();
                let bands: Vec<Tensor> = [(0, 2), (2, 1), (3, 2)]
                    .iter()
                    .map(|&(r, n)| gn.apply(&x.narrow(2, r, n).unwrap(), &stats, silu).unwrap())
                    .collect();
                let banded = Tensor::cat(&bands, 2).unwrap();
                assert!(max_diff(&banded, &whole) < 1e-6);
            }
        }
    }

    #[test]
    fn asymmetric_padding_in_bands_equals_padding_first() {
        // The VAE encoder's downsampler: pad bottom and right by one, 3x3, stride 2.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 2, 9, 8), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 2, 3, 3), &dev).unwrap();
        let want = x
            .pad_with_zeros(2, 0, 1)
            .unwrap()
            .pad_with_zeros(3, 0, 1)
            .unwrap()
            .conv2d(&w, 0, 2, 1, 1)
            .unwrap();
        let rows = |r0: usize, r1: usize| Ok(x.narrow(2, r0, r1 - r0)?);
        let input = super::Input {
            rows: &rows,
            b: 1,
            c: 2,
            h: 9,
            w: 8,
        };
        let pad = super::Pad {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        };
        for band in [1, 2, 5] {
            let got = super::conv2d_in_bands(&input, &w, pad, 2, band * 4 * 2 * 9).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "band {band}");
        }
    }
}
