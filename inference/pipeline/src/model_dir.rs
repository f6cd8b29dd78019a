//! Finds the components of a model directory in either supported layout.
//!
//! - diffusers: `model_index.json`, `transformer/`, `vae/`, `text_encoder{,_2,_3}/`,
//!   `tokenizer{,_2,_3}/`, `scheduler/` (sharded safetensors with their index json are fine);
//! - Stability single file: `sd3.5_*.safetensors` (MMDiT under `model.diffusion_model.`, VAE
//!   under `first_stage_model.`) with `text_encoders/clip_l, clip_g, t5xxl*.safetensors`, or a
//!   ComfyUI all-in-one checkpoint holding the text encoders under `text_encoders.*.transformer.`
//!   (such as `*_fp8_scaled.safetensors`); tokenizers come from the `tokenizer*/` folders that
//!   the official repositories ship beside the file.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where each component's weights are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// The diffusers repository layout rooted at this directory.
    Diffusers,
    /// A single checkpoint file with the MMDiT and the VAE.
    SingleFile {
        /// The checkpoint.
        checkpoint: PathBuf,
        /// CLIP-L weights (a separate file, or the checkpoint itself).
        clip_l: TextEncoderSource,
        /// CLIP-G weights.
        clip_g: TextEncoderSource,
        /// T5 weights, when present.
        t5: Option<TextEncoderSource>,
    },
}

/// A text encoder's weights: a file and the prefix of its tensors in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextEncoderSource {
    /// The safetensors file.
    pub file: PathBuf,
    /// Prefix of the encoder's tensor names (empty for a standalone file).
    pub prefix: String,
}

/// A resolved model directory.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The directory.
    pub root: PathBuf,
    /// Its layout.
    pub layout: Layout,
}

fn safetensors_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for e in entries {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        if p.extension().is_some_and(|x| x == "safetensors") && p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Tensor names of a safetensors file, read from its header only.
pub fn tensor_names(file: &Path) -> Result<Vec<String>> {
    let header = sd35_contract::read_safetensors_header(file)
        .map_err(|why| Error::Layout(format!("{}: {why}", file.display())))?;
    Ok(header.tensors.into_keys().collect())
}

impl ModelDir {
    /// Inspects `path` (a model directory, or a checkpoint file inside one).
    pub fn open(path: &Path) -> Result<Self> {
        let (root, file) = if path.is_file() {
            let root = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            (root, Some(path.to_path_buf()))
        } else if path.is_dir() {
            (path.to_path_buf(), None)
        } else {
            return Err(Error::Layout(format!("{} does not exist", path.display())));
        };
        if file.is_none() && root.join("model_index.json").is_file() {
            return Ok(Self {
                root,
                layout: Layout::Diffusers,
            });
        }
        let candidates = match file {
            Some(f) => vec![f],
            None => safetensors_in(&root)?,
        };
        let mut checkpoint = None;
        for c in candidates {
            let names = tensor_names(&c)?;
            if names
                .iter()
                .any(|n| n.starts_with("model.diffusion_model."))
            {
                checkpoint = Some((c, names));
                break;
            }
        }
        let Some((checkpoint, names)) = checkpoint else {
            return Err(Error::Layout(format!(
                "{} is neither a diffusers repository (no model_index.json) nor holds a \
                 single-file checkpoint (*.safetensors with `model.diffusion_model.*` tensors)",
                root.display()
            )));
        };
        let embedded = |name: &str| -> Option<TextEncoderSource> {
            let prefix = format!("text_encoders.{name}.transformer.");
            names
                .iter()
                .any(|n| n.starts_with(&prefix))
                .then(|| TextEncoderSource {
                    file: checkpoint.clone(),
                    prefix,
                })
        };
        let te_dir = root.join("text_encoders");
        let standalone = |stems: &[&str]| -> Result<Option<TextEncoderSource>> {
            if !te_dir.is_dir() {
                return Ok(None);
            }
            for f in safetensors_in(&te_dir)? {
                let stem = f.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
                if stems.iter().any(|s| stem.starts_with(s)) {
                    return Ok(Some(TextEncoderSource {
                        file: f,
                        prefix: String::new(),
                    }));
                }
            }
            Ok(None)
        };
        let find = |name: &str, stems: &[&str]| -> Result<Option<TextEncoderSource>> {
            Ok(match embedded(name) {
                Some(s) => Some(s),
                None => standalone(stems)?,
            })
        };
        let missing = |what: &str| {
            Error::Layout(format!(
                "{}: no {what} weights (neither inside {} nor in text_encoders/)",
                root.display(),
                checkpoint.display()
            ))
        };
        let clip_l = find("clip_l", &["clip_l"])?.ok_or_else(|| missing("CLIP-L"))?;
        let clip_g = find("clip_g", &["clip_g"])?.ok_or_else(|| missing("CLIP-G"))?;
        let t5 = find("t5xxl", &["t5xxl", "t5"])?;
        Ok(Self {
            root,
            layout: Layout::SingleFile {
                checkpoint: checkpoint.clone(),
                clip_l,
                clip_g,
                t5,
            },
        })
    }

    /// A component folder of the diffusers layout (or the tokenizer folders of either).
    pub fn component(&self, name: &str) -> Result<PathBuf> {
        let p = self.root.join(name);
        if p.is_dir() {
            Ok(p)
        } else {
            Err(Error::Layout(format!(
                "{} is missing the `{name}/` folder",
                self.root.display()
            )))
        }
    }
}
