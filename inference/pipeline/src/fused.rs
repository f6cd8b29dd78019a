//! Fused row-wise CPU kernels: a normalisation together with its affine or adaLN modulation,
//! bias adds, tanh-GELU and gated residual adds, each in one pass over the data.
//!
//! candle evaluates `layer_norm(x) * (1 + scale) + shift` as seven passes over the activations,
//! on one thread, each into freshly allocated memory. Here each is one pass, split over all
//! threads, vectorised through [`crate::simd`]. Kernels that take a fresh intermediate (a matmul's
//! output) write into it in place, so no new pages are touched; they are crate-private and
//! their callers pass only tensors they have just created and not shared.
//!
//! Guarantees: the same arithmetic as the candle form up to rounding (variance by two passes
//! over a row in cache, the normaliser as a multiply by `1/sqrt(var + eps)`), deterministic on
//! one machine whatever the thread count (rows are independent and reduced in order), and only
//! ever used for f32 tensors on the CPU with the fused op graph ([`crate::op_graph`]): every
//! function falls back to candle ops elsewhere, which is what runs on CUDA, in bf16, and on the
//! CPU under `SD35_GENERIC_OPS=1`.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::simd::{self, MulAdd};
use crate::{Error, Result};

/// Rows per parallel task (rows are 64 to 6144 values wide here).
const ROWS_PER_TASK: usize = 16;

/// Which normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// `(x − mean) / sqrt(var + eps)` (biased variance, like PyTorch).
    Layer,
    /// `x / sqrt(mean(x²) + eps)`.
    Rms,
}

/// `norm(x) · (mul + offset) + add` over the last dimension of `x`. `mul` and `add` broadcast to
/// `x`'s shape (a `[C]` weight, or a `[B, 1, C]` adaLN chunk); `offset` is 1 for adaLN's
/// `1 + scale` and 0 for an affine weight. Off the CPU, or for other dtypes, computed with
/// candle ops in f32 and returned in `x`'s dtype.
pub fn norm(
    x: &Tensor,
    kind: Norm,
    eps: f64,
    mul: Option<&Tensor>,
    offset: f64,
    add: Option<&Tensor>,
) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| crate::op_graph::fused_cpu(t) && t.dtype() == DType::F32;
    if f32_cpu(x) && mul.is_none_or(f32_cpu) && add.is_none_or(f32_cpu) && x.rank() >= 1 {
        return norm_cpu(x, kind, eps as f32, mul, offset as f32, add);
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let last = candle_core::D::Minus1;
    let mut y = match kind {
        Norm::Layer => {
            let centered = xf.broadcast_sub(&xf.mean_keepdim(last)?)?;
            let var = centered.sqr()?.mean_keepdim(last)?;
            centered.broadcast_div(&(var + eps)?.sqrt()?)?
        }
        Norm::Rms => {
            let ms = xf.sqr()?.mean_keepdim(last)?;
            xf.broadcast_div(&(ms + eps)?.sqrt()?)?
        }
    };
    if let Some(m) = mul {
        let m = m.to_dtype(DType::F32)?;
        let m = if offset == 0.0 { m } else { (m + offset)? };
        y = y.broadcast_mul(&m)?;
    }
    if let Some(a) = add {
        y = y.broadcast_add(&a.to_dtype(DType::F32)?)?;
    }
    Ok(y.to_dtype(dtype)?)
}

/// Row offsets of a layout's last dimension, walked in row-major order of the leading ones.
#[derive(Clone)]
struct RowWalk {
    dims: Vec<usize>,
    strides: Vec<usize>,
    index: Vec<usize>,
    offset: usize,
}

impl RowWalk {
    /// Positioned at row `row`.
    fn new(layout: &Layout, row: usize) -> Self {
        let rank = layout.dims().len();
        let dims = layout.dims()[..rank - 1].to_vec();
        let strides = layout.stride()[..rank - 1].to_vec();
        let mut index = vec![0; dims.len()];
        let mut offset = layout.start_offset();
        let mut r = row;
        for i in (0..dims.len()).rev() {
            index[i] = r % dims[i].max(1);
            r /= dims[i].max(1);
            offset += index[i] * strides[i];
        }
        Self {
            dims,
            strides,
            index,
            offset,
        }
    }

    /// The current row's offset; then steps to the next row.
    #[inline(always)]
    fn next_offset(&mut self) -> usize {
        let current = self.offset;
        for i in (0..self.dims.len()).rev() {
            self.index[i] += 1;
            self.offset += self.strides[i];
            if self.index[i] < self.dims[i] {
                break;
            }
            self.offset -= self.index[i] * self.strides[i];
            self.index[i] = 0;
        }
        current
    }
}

/// A tensor's f32 data with its layout, checked to have a contiguous last dimension.
struct Operand<'a> {
    data: &'a [f32],
    layout: &'a Layout,
}

fn cpu_f32(storage: &candle_core::Storage) -> Result<&[f32]> {
    match storage {
        candle_core::Storage::Cpu(s) => Ok(s.as_slice::<f32>()?),
        _ => Err(Error::Layout("fused kernel needs CPU tensors".into())),
    }
}

/// `t` broadcast to `shape`, with a contiguous last dimension (copied only if it is not).
fn rows_of(t: &Tensor, shape: &Shape) -> Result<Tensor> {
    let t = t.broadcast_as(shape)?;
    let width = t.dims().last().copied().unwrap_or(1);
    if width <= 1 || t.stride().last() == Some(&1) {
        Ok(t)
    } else {
        Ok(t.contiguous()?)
    }
}

fn norm_cpu(
    x: &Tensor,
    kind: Norm,
    eps: f32,
    mul: Option<&Tensor>,
    offset: f32,
    add: Option<&Tensor>,
) -> Result<Tensor> {
    let shape = x.shape().clone();
    let width = x.dims().last().copied().unwrap_or(1);
    let x = rows_of(x, &shape)?;
    let mul = mul.map(|m| rows_of(m, &shape)).transpose()?;
    let add = add.map(|a| rows_of(a, &shape)).transpose()?;
    let mut out = vec![0f32; shape.elem_count()];
    {
        let (xs, xl) = x.storage_and_layout();
        let ms = mul.as_ref().map(|m| m.storage_and_layout());
        let adds = add.as_ref().map(|a| a.storage_and_layout());
        let xo = Operand {
            data: cpu_f32(&xs)?,
            layout: xl,
        };
        let mo = match &ms {
            Some((s, l)) => Some(Operand {
                data: cpu_f32(s)?,
                layout: l,
            }),
            None => None,
        };
        let ao = match &adds {
            Some((s, l)) => Some(Operand {
                data: cpu_f32(s)?,
                layout: l,
            }),
            None => None,
        };
        if width > 0 {
            out.par_chunks_mut(ROWS_PER_TASK * width)
                .enumerate()
                .for_each(|(task, dst)| {
                    simd::dispatch(NormRows {
                        kind,
                        eps,
                        offset,
                        width,
                        first: task * ROWS_PER_TASK,
                        x: &xo,
                        mul: mo.as_ref(),
                        add: ao.as_ref(),
                        out: dst,
                    })
                });
        }
    }
    Ok(Tensor::from_vec(out, shape, x.device())?)
}

struct NormRows<'a> {
    kind: Norm,
    eps: f32,
    offset: f32,
    width: usize,
    first: usize,
    x: &'a Operand<'a>,
    mul: Option<&'a Operand<'a>>,
    add: Option<&'a Operand<'a>>,
    out: &'a mut [f32],
}

/// Sum with 16 lane-wise partial sums, so the loop vectorises.
#[inline(always)]
fn lane_sum(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = values.chunks_exact(16);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += f(v);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    lanes.iter().sum::<f32>() + tail
}

impl simd::Kernel for NormRows<'_> {
    type Output = ();

    #[inline(always)]
    fn run<M: MulAdd, S: pulp::Simd>(self, _simd: S) {
        let w = self.width;
        let mut xw = RowWalk::new(self.x.layout, self.first);
        let mut mw = self.mul.map(|m| RowWalk::new(m.layout, self.first));
        let mut aw = self.add.map(|a| RowWalk::new(a.layout, self.first));
        let n = w as f32;
        for dst in self.out.chunks_exact_mut(w) {
            let xo = xw.next_offset();
            let row = &self.x.data[xo..xo + w];
            let (mean, rstd) = match self.kind {
                Norm::Layer => {
                    let mean = lane_sum(row, |v| v) / n;
                    let var = lane_sum(row, |v| (v - mean) * (v - mean)) / n;
                    (mean, 1.0 / (var + self.eps).sqrt())
                }
                Norm::Rms => (0.0, 1.0 / (lane_sum(row, |v| v * v) / n + self.eps).sqrt()),
            };
            let m_row = match (self.mul, mw.as_mut()) {
                (Some(m), Some(walk)) => {
                    let o = walk.next_offset();
                    Some(&m.data[o..o + w])
                }
                _ => None,
            };
            let a_row = match (self.add, aw.as_mut()) {
                (Some(a), Some(walk)) => {
                    let o = walk.next_offset();
                    Some(&a.data[o..o + w])
                }
                _ => None,
            };
            for (d, &v) in dst.iter_mut().zip(row) {
                *d = (v - mean) * rstd;
            }
            if let Some(m) = m_row {
                for (d, &s) in dst.iter_mut().zip(m) {
                    *d *= s + self.offset;
                }
            }
            if let Some(a) = a_row {
                for (d, &s) in dst.iter_mut().zip(a) {
                    *d += s;
                }
            }
        }
    }
}

/// Mutable rows of a contiguous f32 CPU storage.
fn rows_mut<'a>(dst: &'a mut CpuStorage, layout: &Layout) -> candle_core::Result<&'a mut [f32]> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("in-place kernel on a non-contiguous tensor".into())
    })?;
    match dst {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("in-place kernel on a non-f32 tensor"),
    }
}

fn src_f32(s: &CpuStorage) -> candle_core::Result<&[f32]> {
    s.as_slice::<f32>()
}

/// Whether `y` (and the other operands) can take the in-place CPU kernels.
fn in_place_ok(y: &Tensor, others: &[Option<&Tensor>]) -> bool {
    let ok = |t: &Tensor| crate::op_graph::fused_cpu(t) && t.dtype() == DType::F32;
    ok(y) && y.is_contiguous() && y.rank() >= 1 && others.iter().flatten().all(|t| ok(t))
}

/// `y + bias`, then `gelu_tanh` when `gelu`, over the last dimension. On the CPU in f32 it
/// writes into `y`, which must be a fresh, unshared tensor (a matmul's output just computed);
/// elsewhere candle ops make a new tensor.
pub(crate) fn bias_in_place(y: Tensor, bias: Option<&Tensor>, gelu: bool) -> Result<Tensor> {
    if !in_place_ok(&y, &[bias]) {
        let y = match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        };
        return if gelu { self::gelu(&y) } else { Ok(y) };
    }
    let width = y.dims().last().copied().unwrap_or(1);
    let bias = match bias {
        Some(b) => b.reshape(width)?.contiguous()?,
        None if gelu => Tensor::zeros(width, DType::F32, y.device())?,
        None => return Ok(y),
    };
    y.inplace_op2(&bias, &BiasOp { gelu })?;
    Ok(y)
}

struct BiasOp {
    gelu: bool,
}

impl candle_core::InplaceOp2 for BiasOp {
    fn name(&self) -> &'static str {
        "fused-bias"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
    ) -> candle_core::Result<()> {
        let y = rows_mut(dst, dst_l)?;
        let bias = &src_f32(bias)?[bias_l.start_offset()..][..bias_l.shape().elem_count()];
        let width = bias.len();
        if width == 0 {
            return Ok(());
        }
        let gelu = self.gelu;
        y.par_chunks_mut(ROWS_PER_TASK * width).for_each(|rows| {
            simd::dispatch(BiasRows { rows, bias, gelu });
        });
        Ok(())
    }
}

struct BiasRows<'a> {
    rows: &'a mut [f32],
    bias: &'a [f32],
    gelu: bool,
}

impl simd::Kernel for BiasRows<'_> {
    type Output = ();

    #[inline(always)]
    fn run<M: MulAdd, S: pulp::Simd>(self, _simd: S) {
        for row in self.rows.chunks_exact_mut(self.bias.len()) {
            if self.gelu {
                for (y, &b) in row.iter_mut().zip(self.bias) {
                    *y = gelu_tanh(*y + b);
                }
            } else {
                for (y, &b) in row.iter_mut().zip(self.bias) {
                    *y += b;
                }
            }
        }
    }
}

/// `x · sigmoid(2u)` with `u = sqrt(2/π) (x + 0.044715 x³)`, which is `0.5 x (1 + tanh(u))`.
#[inline(always)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    let u = C * (x + 0.044715 * x * x * x);
    x / (1.0 + simd::exp2(-2.0 * u * simd::LOG2_E))
}

/// `residual + (y + bias) · gate`, the adaLN-Zero gated residual, for `y` `[B, N, C]`, `gate`
/// `[B, 1, C]`, `bias` `[C]` and `residual` of `y`'s shape. On the CPU in f32 it writes into
/// `y`, which must be a fresh, unshared tensor (a matmul's output just computed); elsewhere
/// candle ops make a new tensor.
pub(crate) fn gated_residual_in_place(
    y: Tensor,
    bias: Option<&Tensor>,
    gate: &Tensor,
    residual: &Tensor,
) -> Result<Tensor> {
    let (b, n, c) = y.dims3()?;
    if !in_place_ok(&y, &[bias, Some(gate), Some(residual)]) || gate.dims() != [b, 1, c] {
        let y = match bias {
            Some(bv) => y.broadcast_add(&bv.to_dtype(y.dtype())?)?,
            None => y,
        };
        return Ok((residual + y.broadcast_mul(gate)?)?);
    }
    // Per batch row: the gate and bias·gate, so that y ← r + y·g + b·g needs two operands.
    let gate = gate.contiguous()?;
    let coef = match bias {
        Some(bv) => {
            let bg = gate.broadcast_mul(&bv.reshape((1, 1, c))?)?;
            Tensor::cat(&[&gate, &bg], 1)?
        }
        None => Tensor::cat(&[&gate, &gate.zeros_like()?], 1)?,
    };
    let residual = rows_of(residual, y.shape())?;
    y.inplace_op3(&residual, &coef, &GatedResidualOp { n, c })?;
    Ok(y)
}

struct GatedResidualOp {
    n: usize,
    c: usize,
}

impl candle_core::InplaceOp3 for GatedResidualOp {
    fn name(&self) -> &'static str {
        "fused-gated-residual"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        res: &CpuStorage,
        res_l: &Layout,
        coef: &CpuStorage,
        coef_l: &Layout,
    ) -> candle_core::Result<()> {
        let (n, c) = (self.n, self.c);
        let y = rows_mut(dst, dst_l)?;
        let res = src_f32(res)?;
        let coef = &src_f32(coef)?[coef_l.start_offset()..];
        if c == 0 || n == 0 {
            return Ok(());
        }
        y.par_chunks_mut(ROWS_PER_TASK * c)
            .enumerate()
            .for_each(|(task, rows)| {
                let first = task * ROWS_PER_TASK;
                simd::dispatch(GatedRows {
                    rows,
                    first,
                    n,
                    c,
                    residual: res,
                    walk: RowWalk::new(res_l, first),
                    coef,
                });
            });
        Ok(())
    }
}

struct GatedRows<'a> {
    rows: &'a mut [f32],
    first: usize,
    n: usize,
    c: usize,
    residual: &'a [f32],
    walk: RowWalk,
    coef: &'a [f32],
}

impl simd::Kernel for GatedRows<'_> {
    type Output = ();

    #[inline(always)]
    fn run<M: MulAdd, S: pulp::Simd>(mut self, _simd: S) {
        let c = self.c;
        for (i, row) in self.rows.chunks_exact_mut(c).enumerate() {
            let batch = (self.first + i) / self.n;
            let gate = &self.coef[2 * batch * c..][..c];
            let bias_gate = &self.coef[(2 * batch + 1) * c..][..c];
            let ro = self.walk.next_offset();
            let r = &self.residual[ro..ro + c];
            for (((y, &r), &g), &bg) in row.iter_mut().zip(r).zip(gate).zip(bias_gate) {
                *y = M::mul_add(*y, g, r + bg);
            }
        }
    }
}

/// GELU with the tanh approximation (PyTorch's `approximate="tanh"`), written as
/// `x * sigmoid(2u)` with `u = sqrt(2/pi) (x + 0.044715 x^3)`, which equals
/// `0.5 x (1 + tanh(u))`. On CPU in f32 it runs on all threads; candle's own element-wise ops
/// run on one.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 && crate::op_graph::fused_cpu(x) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use candle_core::Device;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
            .fold(0.0, f32::max)
    }

    /// The candle form, through the same function with f64 inputs (not fused), back in f32.
    fn unfused(
        x: &Tensor,
        kind: Norm,
        mul: Option<&Tensor>,
        off: f64,
        add: Option<&Tensor>,
    ) -> Tensor {
        let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let (m, a) = (mul.map(f), add.map(f));
        norm(&f(x), kind, 1e-6, m.as_ref(), off, a.as_ref())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    #[test]
    fn modulated_layer_norm_matches_candle_ops() {
        let x = random(&[2, 37, 96], 1);
        let m = random(&[2, 6 * 96], 2);
        let chunk = |i: usize| m.narrow(1, i * 96, 96).unwrap().unsqueeze(1).unwrap();
        let (shift, scale) = (chunk(0), chunk(1));
        let ours = norm(&x, Norm::Layer, 1e-6, Some(&scale), 1.0, Some(&shift)).unwrap();
        let want = unfused(&x, Norm::Layer, Some(&scale), 1.0, Some(&shift));
        assert!(max_rel(&ours, &want) < 1e-5);
    }

    #[test]
    fn plain_and_affine_norms_match_candle_ops() {
        let x = random(&[3, 5, 70], 3);
        let w = random(&[70], 4);
        let b = random(&[70], 5);
        for kind in [Norm::Layer, Norm::Rms] {
            let ours = norm(&x, kind, 1e-6, None, 0.0, None).unwrap();
            assert!(max_rel(&ours, &unfused(&x, kind, None, 0.0, None)) < 1e-5);
            let ours = norm(&x, kind, 1e-6, Some(&w), 0.0, Some(&b)).unwrap();
            assert!(max_rel(&ours, &unfused(&x, kind, Some(&w), 0.0, Some(&b))) < 1e-5);
        }
    }

    #[test]
    fn rms_norm_reads_strided_heads() {
        // q of [B, H, N, D] split from a fused projection: not contiguous.
        let qkv = random(&[2, 19, 3 * 4 * 16], 6);
        let q = qkv
            .narrow(2, 4 * 16, 4 * 16)
            .unwrap()
            .reshape((2, 19, 4, 16))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(!q.is_contiguous());
        let w = random(&[16], 7);
        let ours = norm(&q, Norm::Rms, 1e-6, Some(&w), 0.0, None).unwrap();
        assert!(max_rel(&ours, &unfused(&q, Norm::Rms, Some(&w), 0.0, None)) < 1e-5);
        assert_eq!(ours.dims(), &[2, 4, 19, 16]);
    }

    #[test]
    fn bias_and_gelu_in_place_match_candle_ops() {
        let y = random(&[2, 9, 40], 8);
        let b = random(&[40], 9);
        let want = y.broadcast_add(&b).unwrap();
        let ours = bias_in_place(y.copy().unwrap(), Some(&b), false).unwrap();
        assert!(max_rel(&ours, &want) < 1e-6);
        let want = want.gelu().unwrap();
        let ours = bias_in_place(y.copy().unwrap(), Some(&b), true).unwrap();
        assert!(max_rel(&ours, &want) < 1e-5, "{}", max_rel(&ours, &want));
    }

    #[test]
    fn gated_residual_in_place_matches_candle_ops() {
        let (b, n, c) = (2, 21, 48);
        let y = random(&[b, n, c], 10);
        let bias = random(&[c], 11);
        let r = random(&[b, n, c], 12);
        let m = random(&[b, 3 * c], 13);
        let gate = m.narrow(1, 2 * c, c).unwrap().unsqueeze(1).unwrap();
        let want = (&r
            + y.broadcast_add(&bias)
                .unwrap()
                .broadcast_mul(&gate)
                .unwrap())
        .unwrap();
        let ours = gated_residual_in_place(y.copy().unwrap(), Some(&bias), &gate, &r).unwrap();
        assert!(max_rel(&ours, &want) < 1e-5);
        // Batches take their own gate row.
        let want = (&r + y.broadcast_mul(&gate).unwrap()).unwrap();
        let ours = gated_residual_in_place(y.copy().unwrap(), None, &gate, &r).unwrap();
        assert!(max_rel(&ours, &want) < 1e-5);
    }
}
