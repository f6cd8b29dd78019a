//! Memory-mapped safetensors checkpoints with prefixed views.
//!
//! Tensors are read from the mapping straight into their storage dtype, so a weight exists once
//! in memory; the mapping itself is page cache that the kernel reclaims.

use std::path::{Path, PathBuf};
use std::sync::Arc;

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
        })
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

    /// `name` as stored in the file.
    pub fn raw(&self, name: &str) -> Result<Tensor> {
        let full = self.full(name);
        if self.files.get(&full).is_err() {
            return Err(Error::MissingWeight(full));
        }
        Ok(self.files.load(&full, &self.device)?)
    }

    /// `name` in the storage dtype of non-linear weights. F8 tensors with a sibling
    /// `scale_weight` are dequantised.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let t = self.raw(name)?;
        let t = if t.dtype() == DType::F8E4M3 {
            let t = t.to_dtype(DType::F32)?;
            let scale_name = format!("{}scale_weight", name.trim_end_matches("weight"));
            if self.contains(&scale_name) {
                t.broadcast_mul(&self.raw(&scale_name)?.to_dtype(DType::F32)?)?
            } else {
                t
            }
        } else {
            t
        };
        Ok(t.to_dtype(self.storage_dtype())?)
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
