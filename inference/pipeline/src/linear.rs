//! Linear layers whose weights are f32, bf16 or F8E4M3 with a scale, dequantised at use.
//!
//! candle has no F8E4M3 matmul on any backend and no BF16 matmul on CPU, so the stored weight
//! is converted to the activations' dtype right before the product. For F8 the dequantised
//! weight is `f8 as f32 * scale`, the same arithmetic a PyTorch consumer of ComfyUI's
//! `fp8_scaled` files performs.

use candle_core::{D, DType, Tensor};

use crate::variant::Precision;
use crate::weights::Weights;
use crate::{Error, Result};

/// Largest finite F8E4M3 value.
const F8E4M3_MAX: f64 = 448.0;

/// `y = x W^T + b` with a compactly stored `W`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `W` as `[out, in]`, except an f32 weight on the CPU, kept as `Wᵀ` (`[in, out]`,
    /// contiguous): `gemm` runs the product `x Wᵀ` faster from that layout than through a
    /// transposed view of `W` (`make bench-kernels` times both at the MMDiT's shapes).
    weight: Tensor,
    /// Whether `weight` holds `Wᵀ`.
    transposed: bool,
    /// F8 only: a scalar or an `[out, 1]` column of per-output-channel scales (f32).
    scale: Option<Tensor>,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `{name}.weight` (and `{name}.bias` when `bias`).
    pub fn load(w: &Weights, name: &str, bias: bool) -> Result<Self> {
        Self::load_fused(w, &[name], bias)
    }

    /// Loads several linears sharing an input (q, k, v) as one, stacked along the output.
    pub fn load_fused(w: &Weights, names: &[&str], bias: bool) -> Result<Self> {
        let mut parts = Vec::with_capacity(names.len());
        let mut scales = Vec::with_capacity(names.len());
        let mut any_f8 = false;
        for name in names {
            let raw = w.raw(&format!("{name}.weight"))?;
            if raw.rank() != 2 {
                return Err(Error::Layout(format!(
                    "`{name}.weight` should be a matrix, found shape {:?}",
                    raw.dims()
                )));
            }
            let out = raw.dim(0)?;
            if raw.dtype() == DType::F8E4M3 {
                any_f8 = true;
                let scale_name = format!("{name}.scale_weight");
                let s = if w.contains(&scale_name) {
                    w.raw(&scale_name)?.to_dtype(DType::F32)?
                } else {
                    Tensor::ones((), DType::F32, w.device())?
                };
                let s = if s.elem_count() == 1 {
                    s.reshape(())?.broadcast_as((out, 1))?.contiguous()?
                } else {
                    s.reshape((out, 1))?
                };
                scales.push(s);
            } else {
                scales.push(Tensor::ones((out, 1), DType::F32, w.device())?);
            }
            parts.push(raw);
        }
        let weight = if any_f8 {
            // A checkpoint already in F8: keep it as stored.
            let parts = parts
                .into_iter()
                .map(|p| {
                    if p.dtype() == DType::F8E4M3 {
                        Ok(p)
                    } else {
                        p.to_dtype(DType::F32)?.to_dtype(DType::F8E4M3)
                    }
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)?
        } else {
            let parts = parts
                .into_iter()
                .map(|p| p.to_dtype(DType::F32))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let full = Tensor::cat(&parts, 0)?;
            match w.precision() {
                Precision::F32 => full,
                Precision::Bf16 => full.to_dtype(DType::BF16)?,
                Precision::Fp8 if w.prequantized() => full.to_dtype(DType::BF16)?,
                Precision::Fp8 => {
                    let (q, s) = quantize_per_channel(&full)?;
                    scales = vec![s];
                    q
                }
            }
        };
        let scale = if weight.dtype() == DType::F8E4M3 {
            let s = Tensor::cat(&scales, 0)?;
            Some(s)
        } else {
            None
        };
        let bias = if bias {
            let b = names
                .iter()
                .map(|n| w.get(&format!("{n}.bias")))
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&b, 0)?)
        } else {
            None
        };
        let transposed = weight.dtype() == DType::F32 && weight.device().is_cpu();
        let weight = if transposed {
            weight.t()?.contiguous()?
        } else {
            weight
        };
        Ok(Self {
            weight,
            transposed,
            scale,
            bias,
        })
    }

    /// Output features.
    pub fn out_features(&self) -> Result<usize> {
        Ok(self.weight.dim(usize::from(self.transposed))?)
    }

    /// The stored weight's dtype.
    pub fn weight_dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// The weight as a `dtype` matrix `[out, in]`, dequantised.
    pub fn dequantized_weight(&self, dtype: DType) -> Result<Tensor> {
        let w = match &self.scale {
            None if self.transposed => self.weight.t()?.to_dtype(dtype)?,
            None => self.weight.to_dtype(dtype)?,
            Some(s) => self
                .weight
                .to_dtype(DType::F32)?
                .broadcast_mul(s)?
                .to_dtype(dtype)?,
        };
        Ok(w)
    }

    /// Applies the layer to `x` (`[..., in]`), computing in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::fused::bias_in_place(self.forward_unbiased(x)?, self.bias.as_ref(), false)
    }

    /// The bias, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x W^T` without the bias: a fresh tensor, for fused epilogues to finish in place.
    pub fn forward_unbiased(&self, x: &Tensor) -> Result<Tensor> {
        let wt = if self.transposed {
            self.weight.to_dtype(x.dtype())?
        } else {
            self.dequantized_weight(x.dtype())?.t()?
        };
        let y = match x.rank() {
            2 => x.matmul(&wt)?,
            3 => {
                let (b, n, k) = x.dims3()?;
                x.reshape((b * n, k))?.matmul(&wt)?.reshape((b, n, ()))?
            }
            _ => x.broadcast_matmul(&wt)?,
        };
        Ok(y)
    }
}

/// Quantises an f32 matrix to F8E4M3 with one scale per output row (`amax / 448`). On the CPU
/// rows are quantised in parallel, in one pass each, with the arithmetic of the candle form
/// below (bit for bit: the same products, division, clamps and conversion).
pub fn quantize_per_channel(w: &Tensor) -> Result<(Tensor, Tensor)> {
    if w.device().is_cpu() && w.dtype() == DType::F32 && w.rank() == 2 {
        return quantize_rows_cpu(w);
    }
    quantize_per_channel_candle(w)
}

fn quantize_rows_cpu(w: &Tensor) -> Result<(Tensor, Tensor)> {
    use rayon::prelude::*;
    let (rows, cols) = w.dims2()?;
    let w = w.contiguous()?;
    let mut q = vec![float8::F8E4M3::ZERO; rows * cols];
    let mut scales = vec![0f32; rows];
    {
        let (storage, layout) = w.storage_and_layout();
        let data = match &*storage {
            candle_core::Storage::Cpu(s) => s.as_slice::<f32>()?,
            _ => return Err(Error::Layout("CPU quantiser on a non-CPU tensor".into())),
        };
        let data = &data[layout.start_offset()..][..rows * cols];
        // `Tensor / f64` multiplies by the reciprocal in f32; the same here.
        let inv_max = (1.0 / F8E4M3_MAX) as f32;
        let (lo, hi) = (-F8E4M3_MAX as f32, F8E4M3_MAX as f32);
        if cols > 0 {
            q.par_chunks_mut(cols)
                .zip(scales.par_iter_mut())
                .zip(data.par_chunks(cols))
                .for_each(|((qrow, scale), row)| {
                    let amax = row.iter().fold(0f32, |a, &x| a.max(x.abs()));
                    let s = (amax * inv_max).max(1e-12);
                    for (o, &x) in qrow.iter_mut().zip(row) {
                        *o = float8::F8E4M3::from_f32((x / s).max(lo).min(hi));
                    }
                    *scale = s;
                });
        }
    }
    Ok((
        Tensor::from_vec(q, (rows, cols), w.device())?,
        Tensor::from_vec(scales, (rows, 1), w.device())?,
    ))
}

fn quantize_per_channel_candle(w: &Tensor) -> Result<(Tensor, Tensor)> {
    let amax = w.abs()?.max_keepdim(D::Minus1)?;
    let scale = (amax / F8E4M3_MAX)?.maximum(1e-12)?;
    let q = w
        .broadcast_div(&scale)?
        .clamp(-F8E4M3_MAX, F8E4M3_MAX)?
        .to_dtype(DType::F8E4M3)?;
    Ok((q, scale))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn f32_weights_kept_transposed_give_the_same_products() {
        let file =
            std::env::temp_dir().join(format!("sd35-linear-{}.safetensors", std::process::id()));
        let dev = candle_core::Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        candle_core::safetensors::save(
            &std::collections::HashMap::from([
                ("l.weight".to_string(), w.clone()),
                ("l.bias".to_string(), b.clone()),
            ]),
            &file,
        )
        .unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 7), &dev).unwrap();
        let want = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        for precision in [Precision::F32, Precision::Bf16] {
            let weights = Weights::open(std::slice::from_ref(&file), &dev, precision).unwrap();
            let l = Linear::load(&weights, "l", true).unwrap();
            assert_eq!(l.transposed, precision == Precision::F32);
            assert_eq!(l.out_features().unwrap(), 5);
            assert_eq!(l.dequantized_weight(DType::F32).unwrap().dims(), &[5, 7]);
            let got = l.forward(&x).unwrap();
            assert_eq!(got.dims(), &[2, 3, 5]);
            let err = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let tol = if precision == Precision::F32 {
                1e-5
            } else {
                0.1
            };
            assert!(err < tol, "{precision:?}: {err}");
        }
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn parallel_quantiser_equals_the_candle_form_bit_for_bit() {
        let w = (Tensor::randn(0f32, 1.0, (37, 300), &candle_core::Device::Cpu).unwrap() * 3.0)
            .unwrap();
        // A zero row takes the 1e-12 floor.
        let w = Tensor::cat(
            &[
                &w,
                &Tensor::zeros((1, 300), DType::F32, w.device()).unwrap(),
            ],
            0,
        )
        .unwrap();
        let (q, s) = quantize_per_channel(&w).unwrap();
        let (qc, sc) = quantize_per_channel_candle(&w).unwrap();
        let bits = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(bits(&q), bits(&qc));
        assert_eq!(bits(&s), bits(&sc));
        assert_eq!(q.dtype(), DType::F8E4M3);
        assert_eq!(s.dims(), &[38, 1]);
    }
}
