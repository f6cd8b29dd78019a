//! Rewriting one safetensors file of a model for an engine's precision, streamed in chunks of
//! rows: copied, converted to bf16 (F8 dequantised with its scale) or quantised to F8E4M3 with
//! its scale, as [`plan`] decides per tensor.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sd35_contract::{EnginePrecision, Fp8Scale};
use sha2::{Digest, Sha256};

use crate::linear::quantize_per_channel;
use crate::{Error, Result};

/// Largest finite F8E4M3 value.
const F8E4M3_MAX: f64 = 448.0;

/// Source bytes converted at once; bounds the builder's working memory.
const CHUNK_BYTES: usize = 4 << 20;

/// Name of the marker tensor of pre-quantised checkpoints.
const FP8_MARKER: &str = "scaled_fp8";

pub(super) struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(super) fn new(inner: W) -> Self {
        Self {
            inner,
            hash: Sha256::new(),
            size: 0,
        }
    }
}

impl HashingWriter<BufWriter<std::fs::File>> {
    pub(super) fn finish(self, path: &Path) -> Result<(u64, String)> {
        let file = self
            .inner
            .into_inner()
            .map_err(|e| Error::io(path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(path, e))?;
        Ok((self.size, sd35_contract::hex(&self.hash.finalize())))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A tensor entry of a safetensors header.
#[derive(Clone, Debug)]
struct TensorInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

fn st_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "F8_E4M3" => DType::F8E4M3,
        _ => return None,
    })
}

/// What happens to one source tensor.
#[derive(Clone, Debug)]
enum Plan {
    /// Bytes copied unchanged.
    Copy,
    /// Converted to bf16 (F8 dequantised with the scale named here, if any).
    Bf16 { scale: Option<String> },
    /// Quantised to F8E4M3; its scale follows it as `<base>.scale_weight`.
    Quantize,
    /// Not written.
    Skip,
}

/// Whether a float matrix is a linear weight the fp8 engine quantises: MMDiT and T5 matrices,
/// but neither CLIP, the VAE nor embedding tables.
fn quantisable(rel: &str, name: &str, info: &TensorInfo) -> bool {
    let clip_file = rel.starts_with("text_encoder/")
        || rel.starts_with("text_encoder_2/")
        || rel
            .rsplit('/')
            .next()
            .is_some_and(|f| f.starts_with("clip_"));
    let clip_tensor = name.starts_with("text_encoders.clip_");
    // The VAE reads its attention matrices as plain tensors, not as linears.
    let vae = rel.starts_with("vae/") || name.starts_with("first_stage_model.");
    let table = [
        "embed_tokens.weight",
        "shared.weight",
        "relative_attention_bias.weight",
    ]
    .iter()
    .any(|s| name.ends_with(s))
        || name.ends_with("embedding.weight");
    !clip_file
        && !clip_tensor
        && !vae
        && !table
        && info.shape.len() == 2
        && name.ends_with(".weight")
        && st_dtype(&info.dtype).is_some_and(|d| d != DType::F8E4M3)
}

/// The tensors of `path`'s header, its metadata and where its data starts, through the one
/// header reader both sides use ([`sd35_contract::read_safetensors_header`]).
fn read_header(
    path: &Path,
) -> Result<(BTreeMap<String, TensorInfo>, Option<serde_json::Value>, u64)> {
    let header = sd35_contract::read_safetensors_header(path)
        .map_err(|why| Error::Layout(format!("{}: {why}", path.display())))?;
    let tensors = header
        .tensors
        .into_iter()
        .map(|(name, t)| {
            let info = TensorInfo {
                dtype: t.dtype,
                shape: t.shape.iter().map(|&d| d as usize).collect(),
                data_offsets: t.data_offsets,
            };
            (name, info)
        })
        .collect();
    Ok((tensors, header.metadata, header.data_start))
}

/// One tensor of the output file, in output order.
struct OutTensor {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    bytes: u64,
}

fn scale_name(weight: &str) -> String {
    format!("{}scale_weight", weight.trim_end_matches("weight"))
}

pub(super) fn convert_safetensors(
    src: &Path,
    rel: &str,
    dst: &Path,
    w: &mut impl Write,
    precision: EnginePrecision,
    fp8_scale: Fp8Scale,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let (tensors, meta, data_start) = read_header(src)?;
    let prequantized = tensors
        .keys()
        .any(|n| n == FP8_MARKER || n.ends_with(".scaled_fp8"));
    let fp8 = precision == EnginePrecision::Fp8;
    // Scales of F8 weights in the source, by weight name.
    let f8_scales: BTreeMap<String, String> = tensors
        .iter()
        .filter(|(_, i)| i.dtype == "F8_E4M3")
        .map(|(n, _)| (n.clone(), scale_name(n)))
        .filter(|(_, s)| tensors.contains_key(s))
        .collect();
    let mut order: Vec<(&String, &TensorInfo)> = tensors.iter().collect();
    order.sort_by_key(|(_, i)| i.data_offsets[0]);
    let mut plans = Vec::with_capacity(order.len());
    let mut outs = Vec::new();
    let mut any_quantised = false;
    for (name, info) in &order {
        let elems: usize = info.shape.iter().product();
        let is_f8_scale = f8_scales.values().any(|s| s == *name);
        let plan = if fp8 {
            if quantisable(rel, name, info) && !prequantized {
                Plan::Quantize
            } else if info.dtype == "F8_E4M3" || is_f8_scale || name.as_str() == FP8_MARKER {
                Plan::Copy
            } else if st_dtype(&info.dtype).is_some() {
                Plan::Bf16 { scale: None }
            } else {
                Plan::Copy
            }
        } else if is_f8_scale || name.as_str() == FP8_MARKER || name.ends_with(".scaled_fp8") {
            Plan::Skip
        } else if st_dtype(&info.dtype).is_some() {
            Plan::Bf16 {
                scale: f8_scales.get(*name).cloned(),
            }
        } else {
            Plan::Copy
        };
        match &plan {
            Plan::Skip => {}
            Plan::Copy => outs.push(OutTensor {
                name: (*name).clone(),
                dtype: info.dtype.clone(),
                shape: info.shape.clone(),
                bytes: info.data_offsets[1] - info.data_offsets[0],
            }),
            Plan::Bf16 { .. } => outs.push(OutTensor {
                name: (*name).clone(),
                dtype: "BF16".into(),
                shape: info.shape.clone(),
                bytes: 2 * elems as u64,
            }),
            Plan::Quantize => {
                any_quantised = true;
                outs.push(OutTensor {
                    name: (*name).clone(),
                    dtype: "F8_E4M3".into(),
                    shape: info.shape.clone(),
                    bytes: elems as u64,
                });
                let scale_shape = match fp8_scale {
                    Fp8Scale::PerTensor => vec![],
                    Fp8Scale::PerChannel => vec![info.shape[0], 1],
                };
                let n: usize = scale_shape.iter().product();
                outs.push(OutTensor {
                    name: scale_name(name),
                    dtype: "F32".into(),
                    shape: scale_shape,
                    bytes: 4 * n as u64,
                });
            }
        }
        plans.push(plan);
    }
    let add_marker = any_quantised && !tensors.contains_key(FP8_MARKER);
    if add_marker {
        outs.push(OutTensor {
            name: FP8_MARKER.to_owned(),
            dtype: "F8_E4M3".into(),
            shape: vec![0],
            bytes: 0,
        });
    }

    // Header.
    let mut header = serde_json::Map::new();
    if let Some(m) = meta {
        header.insert("__metadata__".into(), m);
    }
    let mut offset = 0u64;
    for o in &outs {
        header.insert(
            o.name.clone(),
            serde_json::json!({
                "dtype": o.dtype,
                "shape": o.shape,
                "data_offsets": [offset, offset + o.bytes],
            }),
        );
        offset += o.bytes;
    }
    let mut hbytes = serde_json::to_vec(&header).map_err(|source| Error::Json {
        path: src.to_path_buf(),
        source,
    })?;
    while !hbytes.len().is_multiple_of(8) {
        hbytes.push(b' ');
    }
    let io = |e| Error::io(src, e);
    let wio = |e| Error::io(dst, e);
    w.write_all(&(hbytes.len() as u64).to_le_bytes())
        .map_err(wio)?;
    w.write_all(&hbytes).map_err(wio)?;

    // Data, in header order.
    let file = std::fs::File::open(src).map_err(io)?;
    let read = |info: &TensorInfo, row0: usize, rows: usize, row_bytes: usize| -> Result<Vec<u8>> {
        let mut buf = vec![0u8; rows * row_bytes];
        let at = data_start + info.data_offsets[0] + (row0 * row_bytes) as u64;
        file.read_exact_at(&mut buf, at).map_err(io)?;
        Ok(buf)
    };
    let dev = Device::Cpu;
    for ((_, info), plan) in order.iter().zip(&plans) {
        let bytes = info.data_offsets[1] - info.data_offsets[0];
        let (rows, cols) = match info.shape.as_slice() {
            [] => (1, 1),
            [n] => (1, *n),
            [r, rest @ ..] => (*r, rest.iter().product()),
        };
        let elem = st_dtype(&info.dtype).map(|d| d.size_in_bytes());
        match plan {
            Plan::Skip => {}
            Plan::Copy => {
                let mut done = 0u64;
                while done < bytes {
                    let n = (bytes - done).min(CHUNK_BYTES as u64) as usize;
                    let mut buf = vec![0u8; n];
                    file.read_exact_at(&mut buf, data_start + info.data_offsets[0] + done)
                        .map_err(io)?;
                    w.write_all(&buf).map_err(wio)?;
                    done += n as u64;
                }
            }
            Plan::Bf16 { scale } => {
                let (dtype, esize) = dtype_of(info, elem)?;
                let scale = match scale {
                    Some(s) => Some(load_small(&file, data_start, &tensors[s], src)?),
                    None => None,
                };
                let row_bytes = cols * esize;
                for (row0, n) in chunks(rows, row_bytes) {
                    let buf = read(info, row0, n, row_bytes)?;
                    let mut t = Tensor::from_raw_buffer(&buf, dtype, &[n, cols], &dev)?
                        .to_dtype(DType::F32)?;
                    if let Some(s) = &scale {
                        t = if s.elem_count() == 1 {
                            t.broadcast_mul(&s.reshape(())?)?
                        } else {
                            t.broadcast_mul(&s.reshape((rows, 1))?.narrow(0, row0, n)?)?
                        };
                    }
                    write_tensor(w, &t.to_dtype(DType::BF16)?, dst)?;
                    progress(buf.len() as u64);
                }
            }
            Plan::Quantize => {
                let (dtype, esize) = dtype_of(info, elem)?;
                let row_bytes = cols * esize;
                let load = |row0, n| -> Result<Tensor> {
                    let buf = read(info, row0, n, row_bytes)?;
                    Ok(Tensor::from_raw_buffer(&buf, dtype, &[n, cols], &dev)?
                        .to_dtype(DType::F32)?)
                };
                match fp8_scale {
                    Fp8Scale::PerChannel => {
                        let mut scales = Vec::with_capacity(rows);
                        for (row0, n) in chunks(rows, row_bytes) {
                            let (q, s) = quantize_per_channel(&load(row0, n)?)?;
                            write_tensor(w, &q, dst)?;
                            scales.extend(s.flatten_all()?.to_vec1::<f32>()?);
                            progress((n * row_bytes) as u64);
                        }
                        let s = Tensor::from_vec(scales, (rows, 1), &dev)?;
                        write_tensor(w, &s, dst)?;
                    }
                    Fp8Scale::PerTensor => {
                        let mut amax = 0f32;
                        for (row0, n) in chunks(rows, row_bytes) {
                            let a = load(row0, n)?.abs()?.max_all()?.to_scalar::<f32>()?;
                            amax = amax.max(a);
                        }
                        let scale = ((amax as f64) / F8E4M3_MAX).max(1e-12);
                        for (row0, n) in chunks(rows, row_bytes) {
                            let q = (load(row0, n)? / scale)?
                                .clamp(-F8E4M3_MAX, F8E4M3_MAX)?
                                .to_dtype(DType::F8E4M3)?;
                            write_tensor(w, &q, dst)?;
                            progress((n * row_bytes) as u64);
                        }
                        let s = Tensor::new(scale as f32, &dev)?;
                        write_tensor(w, &s, dst)?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn dtype_of(info: &TensorInfo, elem: Option<usize>) -> Result<(DType, usize)> {
    match (st_dtype(&info.dtype), elem) {
        (Some(d), Some(e)) => Ok((d, e)),
        _ => Err(Error::Layout(format!(
            "unsupported tensor dtype {}",
            info.dtype
        ))),
    }
}

/// Row ranges of at most [`CHUNK_BYTES`] (at least one row).
fn chunks(rows: usize, row_bytes: usize) -> impl Iterator<Item = (usize, usize)> {
    let per = (CHUNK_BYTES / row_bytes.max(1)).max(1);
    (0..rows).step_by(per).map(move |r| (r, per.min(rows - r)))
}

fn load_small(
    file: &std::fs::File,
    data_start: u64,
    info: &TensorInfo,
    src: &Path,
) -> Result<Tensor> {
    let dtype = st_dtype(&info.dtype).ok_or_else(|| {
        Error::Layout(format!("{}: scale of dtype {}", src.display(), info.dtype))
    })?;
    let mut buf = vec![0u8; (info.data_offsets[1] - info.data_offsets[0]) as usize];
    file.read_exact_at(&mut buf, data_start + info.data_offsets[0])
        .map_err(|e| Error::io(src, e))?;
    Ok(Tensor::from_raw_buffer(&buf, dtype, &info.shape, &Device::Cpu)?.to_dtype(DType::F32)?)
}

fn write_tensor(w: &mut impl Write, t: &Tensor, dst: &Path) -> Result<()> {
    let data = safetensors::View::data(&t.contiguous()?).into_owned();
    w.write_all(&data).map_err(|e| Error::io(dst, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_all_rows_once() {
        let c: Vec<_> = chunks(10, CHUNK_BYTES / 3).collect();
        assert_eq!(c, vec![(0, 3), (3, 3), (6, 3), (9, 1)]);
        let c: Vec<_> = chunks(2, CHUNK_BYTES * 2).collect();
        assert_eq!(c, vec![(0, 1), (1, 1)]);
    }

    #[test]
    fn only_non_clip_matrices_are_quantised() {
        let m = |shape: Vec<usize>| TensorInfo {
            dtype: "F32".into(),
            shape,
            data_offsets: [0, 0],
        };
        assert!(quantisable(
            "transformer/a.safetensors",
            "x.attn.to_q.weight",
            &m(vec![4, 4])
        ));
        assert!(!quantisable(
            "transformer/a.safetensors",
            "x.norm.weight",
            &m(vec![4])
        ));
        assert!(!quantisable(
            "text_encoder/model.safetensors",
            "l.weight",
            &m(vec![4, 4])
        ));
        assert!(!quantisable(
            "text_encoders/clip_g.safetensors",
            "l.weight",
            &m(vec![4, 4])
        ));
        assert!(!quantisable(
            "text_encoder_3/model.safetensors",
            "shared.weight",
            &m(vec![4, 4])
        ));
        assert!(quantisable(
            "text_encoder_3/model.safetensors",
            "q.weight",
            &m(vec![4, 4])
        ));
        assert!(!quantisable(
            "vae/diffusion_pytorch_model.safetensors",
            "decoder.mid_block.attentions.0.to_q.weight",
            &m(vec![4, 4])
        ));
    }
}
