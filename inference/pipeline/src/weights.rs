//! Memory-mapped safetensors checkpoints with prefixed views.
//!
//! Tensors are read from the mapping straight into their storage dtype, so a weight exists once
//! in memory; the mapping itself is page cache that the kernel reclaims.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::variant::Precision;
use crate::{Error, Result};

/// A prefixed view of one or more memory-mapped safetensors files.
#[derive(Clone)]
pub struct Weights {
    files: Arc<MmapedSafetensors>,
    prefix: String,
    device: Device,
    precision: Precision,
    /// The file is an `fp8_scaled` checkpoint: its non-F8 linears are kept as stored.
    prequantized: bool,
    /// Bytes of the tensors the model keeps from these files (shared by every view).
    kept: Arc<AtomicU64>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("prefix", &self.prefix)
            .field("precision", &self.precision)
            .finish_non_exhaustive()
    }
}

#[allow(unsafe_code)]
fn mmap(paths: &[PathBuf]) -> Result<MmapedSafetensors> {
    for p in paths {
        if !p.is_file() {
            return Err(Error::Layout(format!(
                "missing weights file {}",
                p.display()
            )));
        }
    }
    // SAFETY: the files are opened read-only and the model directory is not modified while the
    // process runs (a cache written once, then served); candle validates the headers.
    unsafe { MmapedSafetensors::multi(paths) }.map_err(Error::from)
}

impl Weights {
    /// Maps `paths` (the shards of one model, or several single files) for reading.
    pub fn open(paths: &[PathBuf], device: &Device, precision: Precision) -> Result<Self> {
        let files = mmap(paths)?;
        let prequantized = files
            .tensors()
            .iter()
            .any(|(name, _)| name == "scaled_fp8" || name.ends_with(".scaled_fp8"));
        Ok(Self {
            files: Arc::new(files),
            prefix: String::new(),
            device: device.clone(),
            precision,
            prequantized,
            kept: Arc::default(),
        })
    }

    /// Counts `bytes` as kept by the model (the loaders call it for every tensor they keep).
    pub fn keep(&self, bytes: u64) {
        self.kept.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes of the tensors kept from these files so far, by this view and every other.
    pub fn kept_bytes(&self) -> u64 {
        self.kept.load(Ordering::Relaxed)
    }

    /// A view whose names are relative to `prefix.` inside this view.
    pub fn pp(&self, prefix: impl AsRef<str>) -> Self {
        let mut w = self.clone();
        w.prefix = format!("{}{}.", self.prefix, prefix.as_ref());
        w
    }

    /// A view with exactly `prefix` prepended (which may be empty or end without a dot).
    pub fn with_prefix(&self, prefix: &str) -> Self {
        let mut w = self.clone();
        w.prefix = format!("{}{prefix}", self.prefix);
        w
    }

    /// The device tensors are loaded to.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How weights are stored.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Whether the checkpoint is already quantised (ComfyUI `scaled_fp8` marker): its linears
    /// keep the dtype they are stored in instead of being quantised at load.
    pub fn prequantized(&self) -> bool {
        self.prequantized
    }

    /// The dtype computations run in: f32 on CPU, bf16 on GPUs for reduced precisions.
    pub fn compute_dtype(&self) -> DType {
        match (&self.device, self.precision) {
            (Device::Cpu, _) | (_, Precision::F32) => DType::F32,
            _ => DType::BF16,
        }
    }

    /// The dtype non-linear weights (norms, biases, embeddings, convolutions) are stored in.
    pub fn storage_dtype(&self) -> DType {
        match self.precision {
            Precision::F32 => DType::F32,
            Precision::Bf16 | Precision::Fp8 => DType::BF16,
        }
    }

    fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Whether the view holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.files.get(&self.full(name)).is_ok()
    }

    /// Every tensor name in the view, relative to its prefix.
    pub fn names(&self) -> Vec<String> {
        self.files
            .tensors()
            .into_iter()
            .filter_map(|(n, _)| n.strip_prefix(&self.prefix).map(str::to_string))
            .collect()
    }

    /// The shape of `name` without loading it.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let full = self.full(name);
        let view = self
            .files
            .get(&full)
            .map_err(|_| Error::MissingWeight(full.clone()))?;
        Ok(view.shape().to_vec())
    }

    /// The dtype `name` is stored in, read from the header (nothing is loaded).
    pub fn stored_dtype(&self, name: &str) -> Result<DType> {
        let full = self.full(name);
        let view = self
            .files
            .get(&full)
            .map_err(|_| Error::MissingWeight(full.clone()))?;
        Ok(match view.dtype() {
            safetensors::Dtype::F8_E4M3 => DType::F8E4M3,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F64 => DType::F64,
            other => {
                return Err(Error::Layout(format!(
                    "weight `{full}` is stored as {other:?}, which the model does not use"
                )));
            }
        })
    }

    /// `name` as stored in the file, on the CPU. F8E4M3 tensors are only ever loaded here:
    /// candle's CUDA kernels for that dtype are missing under the names it asks for, so no
    /// F8E4M3 tensor may live on a GPU (see [`crate::linear`]).
    pub fn host(&self, name: &str) -> Result<Tensor> {
        let full = self.full(name);
        if self.files.get(&full).is_err() {
            return Err(Error::MissingWeight(full));
        }
        Ok(self.files.load(&full, &Device::Cpu)?)
    }

    /// The raw bytes of the F8E4M3 tensor `name` (one byte per value, row-major) and its shape.
    pub fn f8_bytes(&self, name: &str) -> Result<(Vec<u8>, Vec<usize>)> {
        let full = self.full(name);
        let view = self
            .files
            .get(&full)
            .map_err(|_| Error::MissingWeight(full.clone()))?;
        if view.dtype() != safetensors::Dtype::F8_E4M3 {
            return Err(Error::Layout(format!(
                "weight `{full}` is {:?}, not F8_E4M3",
                view.dtype()
            )));
        }
        Ok((view.data().to_vec(), view.shape().to_vec()))
    }

    /// `name` as stored in the file, on the device; an F8E4M3 tensor is an error (use
    /// [`Weights::host`] or [`Weights::f8_bytes`]).
    pub fn raw(&self, name: &str) -> Result<Tensor> {
        if self.stored_dtype(name)? == DType::F8E4M3 && !self.device.is_cpu() {
            return Err(Error::Layout(format!(
                "weight `{}` is F8E4M3, which is never loaded to a GPU as such",
                self.full(name)
            )));
        }
        let full = self.full(name);
        Ok(self.files.load(&full, &self.device)?)
    }

    /// `name` in the storage dtype of non-linear weights, on the device. F8 tensors are
    /// dequantised on the CPU, with their sibling `scale_weight` if there is one.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        if self.stored_dtype(name)? != DType::F8E4M3 {
            let t = self.raw(name)?.to_dtype(self.storage_dtype())?;
            self.keep(tensor_bytes(&t));
            return Ok(t);
        }
        let t = self.host(name)?.to_dtype(DType::F32)?;
        let scale_name = format!("{}scale_weight", name.trim_end_matches("weight"));
        let t = if self.contains(&scale_name) {
            t.broadcast_mul(&self.host(&scale_name)?.to_dtype(DType::F32)?)?
        } else {
            t
        };
        let t = t.to_dtype(self.storage_dtype())?.to_device(&self.device)?;
        self.keep(tensor_bytes(&t));
        Ok(t)
    }

    /// Like [`Weights::get`] with an expected shape, for a clear error on a mismatched file.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.dims() != shape {
            return Err(Error::Layout(format!(
                "weight `{}{name}` has shape {:?}, the architecture expects {shape:?}",
                self.prefix,
                t.dims()
            )));
        }
        Ok(t)
    }
}

/// Bytes of a tensor's elements.
pub fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// Lists the safetensors files of a diffusers component folder: the shards named by its
/// `*.safetensors.index.json` when there is one, else its single `*.safetensors` file.
pub fn component_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.is_file() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let idx: Index = crate::error::read_json(&index)?;
        let mut files: Vec<PathBuf> = idx.weight_map.values().map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::Layout(format!(
        "{} has neither {stem}.safetensors nor {stem}.safetensors.index.json",
        dir.display()
    )))
}
