//! Prebuilt engines: a cached model rewritten for one serving precision, plus a manifest.
//!
//! An engine directory mirrors the model's file tree, so the ordinary loader reads it with no
//! conversion at start-up. Every safetensors file is rewritten:
//! - bf16 engines store every float tensor in bf16 (F8 tensors of `fp8_scaled` sources are
//!   dequantised with their scales);
//! - fp8 engines store the linear weights of the MMDiT and T5 as F8E4M3 with an f32
//!   `<name>.scale_weight` (absmax per tensor or per output channel, the arithmetic of
//!   [`quantize_per_channel`]) and every other float tensor in bf16; each such file carries the
//!   `scaled_fp8` marker of ComfyUI's `fp8_scaled` checkpoints, so nothing is quantised again
//!   at load. CLIP stays bf16, as the pipeline keeps it in fp8 mode.
//!
//! Conversion streams chunks of rows from the source file to the engine file, so memory stays
//! near one chunk, not one tensor and never the model. `engine.json` is written last,
//! atomically, and lists the size and sha256 of every file; an engine without it is
//! incomplete and is refused.

use std::collections::BTreeMap;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use sd35_contract::{ENGINE_FORMAT_VERSION, ENGINE_MANIFEST, ManifestError};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::linear::quantize_per_channel;
use crate::variant::{Precision, Variant};
use crate::{Error, Result};

/// Largest finite F8E4M3 value.
const F8E4M3_MAX: f64 = 448.0;

/// Source bytes converted at once; bounds the builder's working memory.
const CHUNK_BYTES: usize = 4 << 20;

/// Name of the marker tensor of pre-quantised checkpoints.
const FP8_MARKER: &str = "scaled_fp8";

pub use sd35_contract::{EngineManifest, FileRecord, Fp8Scale};

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// The variant the engine serves, recorded in the manifest.
    pub variant: Variant,
    /// `Bf16` or `Fp8`.
    pub precision: Precision,
    /// The engine key, recorded in the manifest.
    pub engine_key: String,
    /// Scaling of fp8 weights.
    pub fp8_scale: Fp8Scale,
    /// Cache key of the source model, recorded in the manifest.
    pub source_cache_key: String,
    /// Revision of the source model, recorded in the manifest.
    pub source_revision: Option<String>,
    /// Hugging Face repository of the source model, recorded in the manifest.
    pub source_repo: Option<String>,
    /// Recorded in the manifest.
    pub tool_version: String,
}

/// Progress of a build, reported after every chunk.
#[derive(Clone, Debug)]
pub struct BuildProgress<'a> {
    /// The file being written, relative to the engine directory.
    pub file: &'a str,
    /// Source bytes processed so far, over all files.
    pub done_bytes: u64,
    /// Source bytes in all.
    pub total_bytes: u64,
}

/// Whether `dir` holds an engine manifest (complete or not, it is an engine directory).
pub fn is_engine(dir: &Path) -> bool {
    dir.join(ENGINE_MANIFEST).is_file()
}

fn engine_err(dir: &Path, message: impl Into<String>) -> Error {
    Error::Engine {
        path: dir.to_path_buf(),
        message: message.into(),
    }
}

/// Reads and checks an engine: manifest present and of this format version, every file
/// present with its recorded size and, when `checksums`, its recorded sha256.
pub fn open(dir: &Path, checksums: bool) -> Result<EngineManifest> {
    let manifest = EngineManifest::read(dir).map_err(|e| match e {
        ManifestError::Missing(_) => engine_err(
            dir,
            format!(
                "no {ENGINE_MANIFEST}: the engine is missing or incomplete (an interrupted \
                 build); run build-engine for it"
            ),
        ),
        ManifestError::Io(path, source) => Error::io(path, source),
        ManifestError::Invalid(_, message) => engine_err(dir, message),
    })?;
    for f in &manifest.files {
        let path = dir.join(&f.path);
        let meta = std::fs::metadata(&path).map_err(|e| {
            engine_err(
                dir,
                format!("file {} is unreadable ({e}); rebuild the engine", f.path),
            )
        })?;
        if meta.len() != f.size {
            return Err(engine_err(
                dir,
                format!(
                    "file {} has {} bytes, the manifest says {}: the engine is corrupt; \
                     rebuild it",
                    f.path,
                    meta.len(),
                    f.size
                ),
            ));
        }
        if checksums {
            let sum = sha256_file(&path)?;
            if sum != f.sha256 {
                return Err(engine_err(
                    dir,
                    format!(
                        "file {} has sha256 {sum}, the manifest says {}: the engine is \
                         corrupt; rebuild it",
                        f.path, f.sha256
                    ),
                ));
            }
        }
    }
    Ok(manifest)
}

/// Lower-case hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Files of a model tree, relative and sorted; hidden files (markers, partials) are skipped.
fn model_files(root: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let e = e.map_err(|e| Error::io(dir, e))?;
            let name = e.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out)?;
            } else if p.is_file() {
                let rel = p.strip_prefix(root).unwrap_or(&p);
                let rel: Vec<_> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(rel.join("/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(root, root, &mut out)?;
    out.sort();
    Ok(out)
}

/// Builds the engine of `model` into `out` (created; stale content from an interrupted build
/// is replaced). Returns the manifest, which is written last.
pub fn build(
    model: &Path,
    out: &Path,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(&BuildProgress<'_>),
) -> Result<EngineManifest> {
    if !opts.precision.is_engine_precision() {
        return Err(Error::invalid(
            "precision",
            "engines are built in bf16 or fp8",
        ));
    }
    // Refuse what the server could not load before spending time on it.
    crate::model_dir::ModelDir::open(model)?;
    let files = model_files(model)?;
    let total_bytes = files
        .iter()
        .map(|f| {
            std::fs::metadata(model.join(f))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum();
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut done_bytes = 0u64;
    let mut entries = Vec::with_capacity(files.len());
    for rel in &files {
        let src = model.join(rel);
        let dst = out.join(rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let tmp = dst.with_file_name(format!(
            ".{}.partial",
            dst.file_name().unwrap_or_default().to_string_lossy()
        ));
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        if rel.ends_with(".safetensors") {
            convert_safetensors(&src, rel, &dst, &mut w, opts, &mut |n| {
                done_bytes += n;
                progress(&BuildProgress {
                    file: rel,
                    done_bytes,
                    total_bytes,
                });
            })?;
        } else {
            let mut r = std::fs::File::open(&src).map_err(|e| Error::io(&src, e))?;
            let n = std::io::copy(&mut r, &mut w).map_err(|e| Error::io(&dst, e))?;
            done_bytes += n;
            progress(&BuildProgress {
                file: rel,
                done_bytes,
                total_bytes,
            });
        }
        let (size, sha256) = w.finish(&tmp)?;
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        entries.push(FileRecord {
            path: rel.clone(),
            size,
            sha256,
        });
    }
    let manifest = EngineManifest {
        format_version: ENGINE_FORMAT_VERSION,
        variant: opts.variant,
        precision: opts.precision,
        fp8_scale: (opts.precision == Precision::Fp8).then_some(opts.fp8_scale),
        engine_key: opts.engine_key.clone(),
        source_cache_key: opts.source_cache_key.clone(),
        source_revision: opts.source_revision.clone(),
        source_repo: opts.source_repo.clone(),
        tool_version: opts.tool_version.clone(),
        files: entries,
        smoke: None,
    };
    write_manifest(&manifest, out)?;
    Ok(manifest)
}

fn write_manifest(manifest: &EngineManifest, dir: &Path) -> Result<()> {
    manifest.write(dir).map_err(|e| match e {
        ManifestError::Io(path, source) => Error::io(path, source),
        other => engine_err(dir, other.to_string()),
    })
}

/// Makes the engine's smoke image on the CPU (see [`crate::smoke`]) with the engine as a
/// server loads it, and writes it into `engine.json` (atomically, last again): only an engine
/// with its smoke image is served.
pub fn record_smoke(dir: &Path) -> Result<EngineManifest> {
    let mut manifest = open(dir, false)?;
    let opts = crate::PipelineOptions {
        precision: Some(manifest.precision),
        device: Device::Cpu,
        // The smoke image leaves T5 out; not loading it saves the builder its memory.
        load_t5: false,
        variant: Some(manifest.variant),
        ..crate::PipelineOptions::default()
    };
    let pipeline = crate::Pipeline::load(dir, &opts)?;
    manifest.smoke = Some(crate::smoke::record(
        &pipeline,
        sd35_contract::DeviceKind::Cpu,
    )?);
    write_manifest(&manifest, dir)?;
    Ok(manifest)
}

struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hash: Sha256::new(),
            size: 0,
        }
    }
}

impl HashingWriter<BufWriter<std::fs::File>> {
    fn finish(self, path: &Path) -> Result<(u64, String)> {
        let file = self
            .inner
            .into_inner()
            .map_err(|e| Error::io(path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(path, e))?;
        Ok((self.size, hex(&self.hash.finalize())))
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
#[derive(Clone, Debug, Deserialize)]
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

fn read_header(
    path: &Path,
) -> Result<(BTreeMap<String, TensorInfo>, Option<serde_json::Value>, u64)> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        return Err(Error::Layout(format!(
            "{}: not a safetensors file",
            path.display()
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
    let meta = v.remove("__metadata__");
    let mut tensors = BTreeMap::new();
    for (k, t) in v {
        let info: TensorInfo = serde_json::from_value(t).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        tensors.insert(k, info);
    }
    Ok((tensors, meta, 8 + n))
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

fn convert_safetensors(
    src: &Path,
    rel: &str,
    dst: &Path,
    w: &mut impl Write,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let (tensors, meta, data_start) = read_header(src)?;
    let prequantized = tensors
        .keys()
        .any(|n| n == FP8_MARKER || n.ends_with(".scaled_fp8"));
    let fp8 = opts.precision == Precision::Fp8;
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
                let scale_shape = match opts.fp8_scale {
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
                match opts.fp8_scale {
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
