//! Linear layers whose weights are f32, bf16 or F8E4M3 with a scale, dequantised at use.
//!
//! candle has no F8E4M3 matmul on any backend and no BF16 matmul on CPU, so the stored weight
//! is converted to the activations' dtype right before the product. For F8 the dequantised
//! weight is `f8 as f32 * scale`, the same arithmetic a PyTorch consumer of ComfyUI's
//! `fp8_scaled` files performs.
//!
//! **FP8 never exists as an F8E4M3 tensor on a device.** candle 0.11's CUDA backend asks for its
//! F8 kernels as `cast_f8e4m3_f32`, `ucopy_f8e4m3`, … while its PTX names them
//! `cast_f8_e4m3_f32`, …, so any cast or copy of an F8E4M3 tensor on a GPU fails. FP8 weights
//! are therefore kept as their raw bytes (`U8`, one per value) and dequantised through a
//! 256-entry table of the F8E4M3 values: `table[bytes] · scale`, an `index_select` and a
//! broadcast multiply, kernels every device has. The CPU runs the same graph, so the fp8
//! goldens cover the GPU's route. Quantisation at load (a bf16 model served as fp8) happens on
//! the CPU, row by row in parallel, and only the bytes and scales are uploaded.

use candle_core::{DType, Device, Tensor};

use crate::variant::Precision;
use crate::weights::{Weights, tensor_bytes};
use crate::{Error, Result};

/// Largest finite F8E4M3 value.
const F8E4M3_MAX: f64 = 448.0;

pub use sd35_contract::plan::DEQUANTISE_ELEMENTS;

/// The 256 F8E4M3 values indexed by their bit patterns (NaN at `0x7f` and `0xff`), in f32.
pub fn f8e4m3_table(device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..=255u8)
        .map(|bits| float8::F8E4M3::from_bits(bits).to_f32())
        .collect();
    Ok(Tensor::from_vec(values, 256, device)?)
}

/// A linear weight as it is kept in memory.
#[derive(Debug, Clone)]
enum Stored {
    /// f32 or bf16 `[out, in]`, or (`transposed`) an f32 `Wᵀ` `[in, out]`, contiguous: on the
    /// fused CPU graph `gemm` runs the product `x Wᵀ` faster from that layout than through a
    /// transposed view of `W` (`make bench-kernels` times both at the MMDiT's shapes).
    Float { weight: Tensor, transposed: bool },
    /// F8E4M3 bit patterns `[out, in]` as `U8`, an `[out, 1]` column of f32 scales (per output
    /// channel; a per-tensor scale is broadcast), and the table of F8E4M3 values.
    Fp8 {
        bytes: Tensor,
        scale: Tensor,
        table: Tensor,
    },
}

/// `y = x W^T + b` with a compactly stored `W`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Stored,
    bias: Option<Tensor>,
    /// Unique per layer loaded: how compiled LoRA adapters find it ([`crate::lora`]).
    id: u64,
}

/// One part of an FP8 weight being assembled on the CPU: bit patterns and per-row scales.
struct Fp8Rows {
    bytes: Vec<u8>,
    scales: Vec<f32>,
    cols: usize,
}

impl Linear {
    /// Loads `{name}.weight` (and `{name}.bias` when `bias`).
    pub fn load(w: &Weights, name: &str, bias: bool) -> Result<Self> {
        Self::load_fused(w, &[name], bias)
    }

    /// Loads several linears sharing an input (q, k, v) as one, stacked along the output.
    pub fn load_fused(w: &Weights, names: &[&str], bias: bool) -> Result<Self> {
        let mut stored_f8 = false;
        for name in names {
            let shape = w.shape(&format!("{name}.weight"))?;
            if shape.len() != 2 {
                return Err(Error::Layout(format!(
                    "`{name}.weight` should be a matrix, found shape {shape:?}"
                )));
            }
            stored_f8 |= w.stored_dtype(&format!("{name}.weight"))? == DType::F8E4M3;
        }
        let quantise_here = w.precision() == Precision::Fp8 && !w.prequantized();
        let weight = if stored_f8 || quantise_here {
            load_fp8(w, names, stored_f8)?
        } else {
            let parts = names
                .iter()
                .map(|name| Ok(w.raw(&format!("{name}.weight"))?.to_dtype(DType::F32)?))
                .collect::<Result<Vec<_>>>()?;
            let full = Tensor::cat(&parts, 0)?;
            let full = match w.precision() {
                Precision::F32 => full,
                // An `fp8_scaled` checkpoint's linears that are not F8 stay as stored: bf16.
                Precision::Bf16 | Precision::Fp8 => full.to_dtype(DType::BF16)?,
            };
            let transposed = full.dtype() == DType::F32 && crate::op_graph::fused_cpu(&full);
            let weight = if transposed {
                full.t()?.contiguous()?
            } else {
                full
            };
            Stored::Float { weight, transposed }
        };
        w.keep(match &weight {
            Stored::Float { weight, .. } => tensor_bytes(weight),
            Stored::Fp8 {
                bytes,
                scale,
                table,
            } => tensor_bytes(bytes) + tensor_bytes(scale) + tensor_bytes(table),
        });
        let bias = if bias {
            let b = names
                .iter()
                .map(|n| w.get(&format!("{n}.bias")))
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&b, 0)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            id: crate::lora::next_linear_id(),
        })
    }

    /// The layer's id, unique in the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Input features.
    pub fn in_features(&self) -> Result<usize> {
        Ok(match &self.weight {
            Stored::Float { weight, transposed } => weight.dim(usize::from(!*transposed))?,
            Stored::Fp8 { bytes, .. } => bytes.dim(1)?,
        })
    }

    /// This layer as the target of the module `module`: rows `rows` from `row_offset` (all of
    /// them: `None`), stored with its halves swapped when `swapped`.
    pub fn target(
        &self,
        module: String,
        rows: Option<(usize, usize)>,
        swapped: bool,
    ) -> Result<crate::lora::Target> {
        let out = self.out_features()?;
        let (row_offset, rows) = rows.unwrap_or((0, out));
        Ok(crate::lora::Target {
            module,
            linear: self.id,
            in_features: self.in_features()?,
            out_features: out,
            row_offset,
            rows,
            swapped,
        })
    }

    /// Output features.
    pub fn out_features(&self) -> Result<usize> {
        Ok(match &self.weight {
            Stored::Float { weight, transposed } => weight.dim(usize::from(*transposed))?,
            Stored::Fp8 { bytes, .. } => bytes.dim(0)?,
        })
    }

    /// The stored weight's dtype (`U8` for F8E4M3 bit patterns).
    pub fn weight_dtype(&self) -> DType {
        match &self.weight {
            Stored::Float { weight, .. } => weight.dtype(),
            Stored::Fp8 { bytes, .. } => bytes.dtype(),
        }
    }

    /// Whether the weight is stored as F8E4M3 (bit patterns with scales).
    pub fn is_fp8(&self) -> bool {
        matches!(self.weight, Stored::Fp8 { .. })
    }

    /// The weight as a `dtype` matrix `[out, in]`, dequantised.
    pub fn dequantized_weight(&self, dtype: DType) -> Result<Tensor> {
        Ok(match &self.weight {
            Stored::Float {
                weight,
                transposed: true,
            } => weight.t()?.to_dtype(dtype)?,
            Stored::Float { weight, .. } => weight.to_dtype(dtype)?,
            Stored::Fp8 {
                bytes,
                scale,
                table,
            } => dequantise(bytes, scale, table, dtype, DEQUANTISE_ELEMENTS)?,
        })
    }

    /// Applies the layer to `x` (`[..., in]`), computing in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None)
    }

    /// [`Linear::forward`] with the adapters' update of this layer, if any.
    pub fn forward_with(&self, x: &Tensor, adapters: crate::lora::Active<'_>) -> Result<Tensor> {
        crate::fused::bias_in_place(
            self.forward_unbiased_with(x, adapters)?,
            self.bias.as_ref(),
            false,
        )
    }

    /// [`Linear::forward_unbiased`] plus the adapters' `(x Aᵀ) Bᵀ`, if they touch this layer:
    /// still a fresh tensor.
    pub fn forward_unbiased_with(
        &self,
        x: &Tensor,
        adapters: crate::lora::Active<'_>,
    ) -> Result<Tensor> {
        let y = self.forward_unbiased(x)?;
        let Some(delta) = adapters.and_then(|a| a.get(self.id)) else {
            return Ok(y);
        };
        let a = delta.a.to_dtype(x.dtype())?.t()?;
        let b = delta.b.to_dtype(x.dtype())?.t()?;
        let update = match x.rank() {
            2 => x.matmul(&a)?.matmul(&b)?,
            3 => {
                let (batch, n, k) = x.dims3()?;
                x.reshape((batch * n, k))?
                    .matmul(&a)?
                    .matmul(&b)?
                    .reshape((batch, n, ()))?
            }
            _ => x.broadcast_matmul(&a)?.broadcast_matmul(&b)?,
        };
        Ok((y + update)?)
    }

    /// The bias, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x W^T` without the bias: a fresh tensor, for fused epilogues to finish in place.
    pub fn forward_unbiased(&self, x: &Tensor) -> Result<Tensor> {
        let wt = match &self.weight {
            Stored::Float {
                weight,
                transposed: true,
            } => weight.to_dtype(x.dtype())?,
            _ => self.dequantized_weight(x.dtype())?.t()?,
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

/// `table[bytes] · scale` as a `dtype` matrix, computed in blocks of rows of at most `limit`
/// elements, so the f32 intermediates stay small beside the result.
fn dequantise(
    bytes: &Tensor,
    scale: &Tensor,
    table: &Tensor,
    dtype: DType,
    limit: usize,
) -> Result<Tensor> {
    let (rows, cols) = bytes.dims2()?;
    let block = |r0: usize, n: usize| -> Result<Tensor> {
        Ok(table
            .index_select(&bytes.narrow(0, r0, n)?.flatten_all()?, 0)?
            .reshape((n, cols))?
            .broadcast_mul(&scale.narrow(0, r0, n)?)?
            .to_dtype(dtype)?)
    };
    let step = crate::op_graph::rows_per_chunk(rows, cols, limit);
    if step >= rows {
        return block(0, rows);
    }
    let out = Tensor::zeros((rows, cols), dtype, bytes.device())?;
    for r0 in (0..rows).step_by(step) {
        out.slice_set(&block(r0, step.min(rows - r0))?, 0, r0)?;
    }
    Ok(out)
}

/// Assembles an FP8 linear on the CPU and uploads its bytes and scales. Parts stored as
/// F8E4M3 keep their bytes and `scale_weight` (scalar or per row; 1 when absent); other parts
/// of a checkpoint already in F8 are converted with scale 1, as stored; a model in another
/// dtype is quantised per output channel ([`quantize_per_channel`]).
fn load_fp8(w: &Weights, names: &[&str], stored_f8: bool) -> Result<Stored> {
    let mut parts = Vec::with_capacity(names.len());
    if stored_f8 {
        for name in names {
            let weight = format!("{name}.weight");
            if w.stored_dtype(&weight)? == DType::F8E4M3 {
                let (bytes, shape) = w.f8_bytes(&weight)?;
                let (rows, cols) = (shape[0], shape[1]);
                let scale_name = format!("{name}.scale_weight");
                let scales = if w.contains(&scale_name) {
                    let s = w
                        .host(&scale_name)?
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    match s.len() {
                        1 => vec![s[0]; rows],
                        n if n == rows => s,
                        n => {
                            return Err(Error::Layout(format!(
                                "`{scale_name}` has {n} values for {rows} rows"
                            )));
                        }
                    }
                } else {
                    vec![1.0; rows]
                };
                parts.push(Fp8Rows {
                    bytes,
                    scales,
                    cols,
                });
            } else {
                let t = w.host(&weight)?.to_dtype(DType::F32)?;
                let (rows, cols) = t.dims2()?;
                let bytes = t
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(|x| float8::F8E4M3::from_f32(x).to_bits())
                    .collect();
                parts.push(Fp8Rows {
                    bytes,
                    scales: vec![1.0; rows],
                    cols,
                });
            }
        }
    } else {
        let full = names
            .iter()
            .map(|name| Ok(w.host(&format!("{name}.weight"))?.to_dtype(DType::F32)?))
            .collect::<Result<Vec<_>>>()?;
        let (bytes, scales, cols) = quantize_rows_cpu(&Tensor::cat(&full, 0)?)?;
        parts.push(Fp8Rows {
            bytes,
            scales,
            cols,
        });
    }
    let cols = parts.first().map_or(0, |p| p.cols);
    if let Some(odd) = parts.iter().find(|p| p.cols != cols) {
        return Err(Error::Layout(format!(
            "the fused weights {names:?} have {} and {cols} input features",
            odd.cols
        )));
    }
    let rows: usize = parts.iter().map(|p| p.scales.len()).sum();
    let mut bytes = Vec::with_capacity(rows * cols);
    let mut scales = Vec::with_capacity(rows);
    for p in parts {
        bytes.extend_from_slice(&p.bytes);
        scales.extend_from_slice(&p.scales);
    }
    let dev = w.device();
    Ok(Stored::Fp8 {
        bytes: Tensor::from_vec(bytes, (rows, cols), dev)?,
        scale: Tensor::from_vec(scales, (rows, 1), dev)?,
        table: f8e4m3_table(dev)?,
    })
}

/// Quantises an f32 matrix to F8E4M3 with one scale per output row (`amax / 448`), on the
/// CPU: returns the F8E4M3 matrix (a CPU tensor, for the engine builder to write) and the
/// `[rows, 1]` scales. Rows are quantised in parallel, in one pass each, with the arithmetic of
/// candle's own ops (`quantize_per_channel_candle` below, bit for bit: the same products,
/// division, clamps and conversion).
pub fn quantize_per_channel(w: &Tensor) -> Result<(Tensor, Tensor)> {
    let (bytes, scales, cols) = quantize_rows_cpu(w)?;
    let rows = scales.len();
    let q: Vec<float8::F8E4M3> = bytes.into_iter().map(float8::F8E4M3::from_bits).collect();
    Ok((
        Tensor::from_vec(q, (rows, cols), &Device::Cpu)?,
        Tensor::from_vec(scales, (rows, 1), &Device::Cpu)?,
    ))
}

/// The F8E4M3 bit patterns of `w` quantised per row, the row scales, and the column count.
fn quantize_rows_cpu(w: &Tensor) -> Result<(Vec<u8>, Vec<f32>, usize)> {
    use rayon::prelude::*;
    let w = w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let (rows, cols) = w.dims2()?;
    let data = w.flatten_all()?.to_vec1::<f32>()?;
    let mut q = vec![0u8; rows * cols];
    let mut scales = vec![0f32; rows];
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
                    *o = float8::F8E4M3::from_f32((x / s).max(lo).min(hi)).to_bits();
                }
                *scale = s;
            });
    }
    Ok((q, scales, cols))
}

#[cfg(test)]
fn quantize_per_channel_candle(w: &Tensor) -> Result<(Tensor, Tensor)> {
    let amax = w.abs()?.max_keepdim(1)?;
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
            let transposed = matches!(
                l.weight,
                Stored::Float {
                    transposed: true,
                    ..
                }
            );
            let fused = !crate::op_graph::current().generic;
            assert_eq!(transposed, precision == Precision::F32 && fused);
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

    #[test]
    fn the_f8_table_holds_every_value_candle_converts_to() {
        let dev = candle_core::Device::Cpu;
        let all: Vec<float8::F8E4M3> = (0..=255u8).map(float8::F8E4M3::from_bits).collect();
        let cast = Tensor::from_vec(all, 256, &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let table = f8e4m3_table(&dev).unwrap().to_vec1::<f32>().unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&table), bits(&cast));
    }

    #[test]
    fn fp8_weights_dequantise_through_the_table_as_the_cast_did() {
        let dev = candle_core::Device::Cpu;
        let file =
            std::env::temp_dir().join(format!("sd35-fp8-{}.safetensors", std::process::id()));
        let w = (Tensor::randn(0f32, 1.0, (6, 9), &dev).unwrap() * 2.0).unwrap();
        let (q, s) = quantize_per_channel_candle(&w).unwrap();
        // `a` stored in F8 with a per-row scale, `b` with a per-tensor scale, `c` in f32.
        let b = w.narrow(0, 0, 2).unwrap().to_dtype(DType::F8E4M3).unwrap();
        candle_core::safetensors::save(
            &std::collections::HashMap::from([
                ("a.weight".to_string(), q.clone()),
                ("a.scale_weight".to_string(), s.clone()),
                ("b.weight".to_string(), b.clone()),
                (
                    "b.scale_weight".to_string(),
                    Tensor::new(0.5f32, &dev).unwrap(),
                ),
                ("c.weight".to_string(), w.clone()),
            ]),
            &file,
        )
        .unwrap();
        let weights = Weights::open(std::slice::from_ref(&file), &dev, Precision::Fp8).unwrap();
        let fused = Linear::load_fused(&weights, &["a", "b"], false).unwrap();
        assert!(fused.is_fp8());
        assert_eq!(fused.weight_dtype(), DType::U8);
        let want = Tensor::cat(
            &[
                q.to_dtype(DType::F32).unwrap().broadcast_mul(&s).unwrap(),
                (b.to_dtype(DType::F32).unwrap() * 0.5).unwrap(),
            ],
            0,
        )
        .unwrap();
        let got = fused.dequantized_weight(DType::F32).unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&got), v(&want));
        // In blocks of one, three and five rows: the same values.
        let Stored::Fp8 {
            bytes,
            scale,
            table,
        } = &fused.weight
        else {
            panic!("not fp8")
        };
        for rows in [1, 3, 5] {
            let blocks = dequantise(bytes, scale, table, DType::F32, rows * 9).unwrap();
            assert_eq!(v(&blocks), v(&want), "{rows} rows");
        }
        // An f32 weight served as fp8 is quantised per row at load, as the engine builder does.
        let quantised = Linear::load(&weights, "c", false).unwrap();
        assert!(quantised.is_fp8());
        assert_eq!(
            v(&quantised.dequantized_weight(DType::F32).unwrap()),
            v(&q.to_dtype(DType::F32).unwrap().broadcast_mul(&s).unwrap())
        );
        std::fs::remove_file(&file).unwrap();
    }
}
