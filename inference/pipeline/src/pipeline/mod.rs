//! The pipeline: load a model directory, encode prompts, sample, decode. Requests and their
//! checks are in [`request`], the adapters and ControlNets served in `adapters`, the denoising
//! loop in `sample`.
//!
//! Same request and seed give bit-identical images on one machine: noise comes from a seeded
//! ChaCha8 generator and every step is deterministic on the CPU backend.

mod adapters;
mod request;
mod sample;
mod source;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use adapters::{CompiledLoras, LoraKey};

pub use source::ModelSource;

pub use request::{
    Control, Edit, GenerateRequest, PromptParts, PromptTokens, StepControl, control_keeps,
    first_step,
};

use candle_core::{DType, Device, Tensor};

use crate::clip::{ClipActivation, ClipConfig, ClipTextModel};
use crate::controlnet::ControlNet;
use crate::image::{self, RgbImage};
use crate::lora::LoraFile;
use crate::mmdit::{Mmdit, MmditConfig, MmditNames};
use crate::model_dir::{Layout, ModelDir, TextEncoderSource};
use crate::plan::{ModelSpec, WeightBytes};
use crate::t5::{T5Config, T5Encoder};
use crate::tokenizer::PromptTokenizer;
use crate::vae::{VaeConfig, VaeDecoder, VaeEncoder, VaeNames};
use crate::variant::{Precision, Variant, model_card};
use crate::weights::{Weights, component_files};
use crate::{Error, Result};

/// Default T5 sequence length (diffusers' `max_sequence_length`).
pub const DEFAULT_T5_LENGTH: usize = 256;
/// Longest T5 sequence accepted.
pub const MAX_T5_LENGTH: usize = 512;
/// VAE downsampling factor times the transformer patch size: sizes must be multiples of it.
pub const SIZE_MULTIPLE: usize = 16;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Weight storage precision. Unset: an engine's own, else bf16 on CUDA and f32 on the CPU.
    /// Set, it must match an engine's.
    pub precision: Option<Precision>,
    /// Where to run.
    pub device: Device,
    /// Load T5 (otherwise its embedding is zeros, as the reference allows).
    pub load_t5: bool,
    /// T5 sequence length (≤ 512).
    pub t5_max_length: usize,
    /// The variant, as the caller knows it. Unset: the engine's or the cache marker's, else
    /// what the transformer's structure says (see [`VariantSource`]). Set, it must match an
    /// engine's and the structure.
    pub variant: Option<Variant>,
}

/// Where a pipeline's variant came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VariantSource {
    /// The caller said it (`--variant`).
    Requested,
    /// The engine's manifest says it.
    Engine,
    /// The cache's completion marker says it.
    CacheMarker,
    /// The transformer is MMDiT-X, which only medium is.
    Structure,
    /// Nothing said it and the transformer is an MMDiT: large and large-turbo look the same,
    /// so `large` was assumed.
    Assumed,
}

impl VariantSource {
    /// A word for logs and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Engine => "engine",
            Self::CacheMarker => "cache-marker",
            Self::Structure => "structure",
            Self::Assumed => "assumed",
        }
    }
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            precision: None,
            device: Device::Cpu,
            load_t5: true,
            t5_max_length: DEFAULT_T5_LENGTH,
            variant: None,
        }
    }
}

/// A loaded SD3.5 pipeline.
#[derive(Debug)]
pub struct Pipeline {
    variant: Variant,
    variant_source: VariantSource,
    precision: Precision,
    dtype: DType,
    device: Device,
    tok_l: PromptTokenizer,
    tok_g: PromptTokenizer,
    tok_t5: Option<PromptTokenizer>,
    t5_length: usize,
    clip_l: ClipTextModel,
    clip_g: ClipTextModel,
    t5: Option<T5Encoder>,
    mmdit: Mmdit,
    vae: VaeDecoder,
    /// The VAE encoder, when the checkpoint has one (edits and ControlNet conditions need it).
    vae_encoder: Option<VaeEncoder>,
    shift: f64,
    /// Bytes of the weights each component keeps, as loaded.
    kept: WeightBytes,
    /// LoRA adapters requests may name, by name.
    loras: BTreeMap<String, Arc<LoraFile>>,
    /// ControlNets requests may name, by mode.
    controlnets: BTreeMap<sd35_contract::ControlMode, ControlNet>,
    /// The adapter set compiled last, with its key (names and scales), reused while batches
    /// ask for the same set.
    compiled: Mutex<Option<(LoraKey, Arc<CompiledLoras>)>>,
}

fn weights_of(src: &TextEncoderSource, device: &Device, precision: Precision) -> Result<Weights> {
    Ok(Weights::open(std::slice::from_ref(&src.file), device, precision)?.with_prefix(&src.prefix))
}

impl Pipeline {
    /// Loads the model at `path` (diffusers or single-file layout, or an engine directory
    /// built by [`crate::engine::build`], which brings its own precision).
    pub fn load(path: &Path, opts: &PipelineOptions) -> Result<Self> {
        Self::load_source(&ModelSource::open(path)?, opts)
    }

    /// Loads `source`, whose manifests are already read (see [`ModelSource`]).
    pub fn load_source(source: &ModelSource, opts: &PipelineOptions) -> Result<Self> {
        let path = source.weights.as_path();
        if opts.t5_max_length == 0 || opts.t5_max_length > MAX_T5_LENGTH {
            return Err(Error::invalid(
                "t5_max_length",
                format!("{} is outside 1..={MAX_T5_LENGTH}", opts.t5_max_length),
            ));
        }
        // A prebuilt engine is stored in its own precision: it is loaded as built, checked
        // against its manifest first, and never converted again.
        let engine = source.engine.as_ref();
        let prec = match (engine, opts.precision) {
            (Some(m), Some(asked)) if asked != m.precision.into() => {
                return Err(Error::Mismatch(format!(
                    "--precision {asked} but the engine {} is {}: rebuild it in {asked} or ask \
                     for {}",
                    path.display(),
                    m.precision,
                    m.precision
                )));
            }
            (Some(m), _) => m.precision.into(),
            (None, Some(asked)) => asked,
            (None, None) if opts.device.is_cpu() => Precision::F32,
            (None, None) => Precision::Bf16,
        };
        let dir = ModelDir::open(path)?;
        let (dev, prec) = (&opts.device, prec);
        // The CLIP encoders are small: in fp8 mode they stay bf16, as in fp8_scaled checkpoints.
        let clip_prec = match prec {
            Precision::Fp8 => Precision::Bf16,
            p => p,
        };
        let tok_l = PromptTokenizer::clip(&dir.component("tokenizer")?)?;
        let tok_g = PromptTokenizer::clip(&dir.component("tokenizer_2")?)?;
        let mut kept = WeightBytes::default();
        let (clip_l, clip_g, t5, mmdit, vae, vae_encoder, shift) = match &dir.layout {
            Layout::Diffusers => {
                let te = |name: &str, prec: Precision| -> Result<(Weights, std::path::PathBuf)> {
                    let d = dir.component(name)?;
                    let w = Weights::open(&component_files(&d, "model")?, dev, prec)?;
                    Ok((w, d.join("config.json")))
                };
                let (w, cfg) = te("text_encoder", clip_prec)?;
                let clip_l = ClipTextModel::load(&w, ClipConfig::from_hf(&cfg)?)?;
                kept.clip += w.kept_bytes();
                let (w, cfg) = te("text_encoder_2", clip_prec)?;
                let clip_g = ClipTextModel::load(&w, ClipConfig::from_hf(&cfg)?)?;
                kept.clip += w.kept_bytes();
                let t5 = if opts.load_t5 && dir.root.join("text_encoder_3").is_dir() {
                    let (w, cfg) = te("text_encoder_3", prec)?;
                    let t5 = T5Encoder::load(&w, T5Config::from_hf(&cfg)?)?;
                    kept.t5 = w.kept_bytes();
                    Some(t5)
                } else {
                    None
                };
                let td = dir.component("transformer")?;
                let w =
                    Weights::open(&component_files(&td, "diffusion_pytorch_model")?, dev, prec)?;
                let cfg = MmditConfig::from_diffusers(&td.join("config.json"))?;
                let mmdit = Mmdit::load(&w, cfg, MmditNames::Diffusers)?;
                kept.mmdit = w.kept_bytes();
                let vd = dir.component("vae")?;
                let w =
                    Weights::open(&component_files(&vd, "diffusion_pytorch_model")?, dev, prec)?;
                let vae_config = VaeConfig::from_diffusers(&vd.join("config.json"))?;
                let vae = VaeDecoder::load(&w, vae_config.clone(), VaeNames::Diffusers)?;
                let vae_encoder = VaeEncoder::present(&w)
                    .then(|| VaeEncoder::load(&w, vae_config, VaeNames::Diffusers))
                    .transpose()?;
                kept.vae = w.kept_bytes();
                let shift = scheduler_shift(&dir.root.join("scheduler/scheduler_config.json"))?;
                (clip_l, clip_g, t5, mmdit, vae, vae_encoder, shift)
            }
            Layout::SingleFile {
                checkpoint,
                clip_l,
                clip_g,
                t5,
            } => {
                let w = weights_of(clip_l, dev, clip_prec)?;
                let cl = ClipTextModel::load(
                    &w,
                    ClipConfig::infer(&w, ClipActivation::QuickGelu, tok_l.eos_id())?,
                )?;
                kept.clip += w.kept_bytes();
                let w = weights_of(clip_g, dev, clip_prec)?;
                let cg = ClipTextModel::load(
                    &w,
                    ClipConfig::infer(&w, ClipActivation::Gelu, tok_g.eos_id())?,
                )?;
                kept.clip += w.kept_bytes();
                let t5 = match (opts.load_t5, t5) {
                    (true, Some(src)) => {
                        let w = weights_of(src, dev, prec)?;
                        let t5 = T5Encoder::load(&w, T5Config::infer(&w)?)?;
                        kept.t5 = w.kept_bytes();
                        Some(t5)
                    }
                    _ => None,
                };
                let ckpt = Weights::open(std::slice::from_ref(checkpoint), dev, prec)?;
                let w = ckpt.with_prefix("model.diffusion_model.");
                let mmdit = Mmdit::load(
                    &w,
                    MmditConfig::from_stability_weights(&w)?,
                    MmditNames::Stability,
                )?;
                kept.mmdit = ckpt.kept_bytes();
                let w = ckpt.with_prefix("first_stage_model.");
                let vae_config = VaeConfig::infer_stability(&w)?;
                let vae = VaeDecoder::load(&w, vae_config.clone(), VaeNames::Stability)?;
                let vae_encoder = VaeEncoder::present(&w)
                    .then(|| VaeEncoder::load(&w, vae_config, VaeNames::Stability))
                    .transpose()?;
                kept.vae = ckpt.kept_bytes() - kept.mmdit;
                (cl, cg, t5, mmdit, vae, vae_encoder, 3.0)
            }
        };
        let tok_t5 = match &t5 {
            Some(_) => Some(PromptTokenizer::t5(
                &dir.component("tokenizer_3")?,
                opts.t5_max_length,
            )?),
            None => None,
        };
        let (variant, variant_source) = resolve_variant(
            path,
            opts.variant,
            engine.map(|m| m.variant),
            source.marker.as_ref().map(|m| m.variant),
            !mmdit.config().dual_attention_layers.is_empty(),
        )?;
        let dtype = ckpt_compute_dtype(dev, prec);
        Ok(Self {
            variant,
            variant_source,
            precision: prec,
            dtype,
            device: dev.clone(),
            tok_l,
            tok_g,
            tok_t5,
            t5_length: opts.t5_max_length,
            clip_l,
            clip_g,
            t5,
            mmdit,
            vae,
            vae_encoder,
            shift,
            kept,
            loras: BTreeMap::new(),
            controlnets: BTreeMap::new(),
            compiled: Mutex::new(None),
        })
    }

    /// The variant served.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Where the variant came from.
    pub fn variant_source(&self) -> VariantSource {
        self.variant_source
    }

    /// The precision the weights are stored in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether T5 is loaded (otherwise its embedding is zeros).
    pub fn t5_loaded(&self) -> bool {
        self.t5.is_some()
    }

    /// Bytes of the weights each component keeps in memory, as loaded.
    pub fn weight_bytes(&self) -> WeightBytes {
        self.kept
    }

    /// The shapes the memory plan needs, read off the loaded model.
    pub fn spec(&self) -> Result<ModelSpec> {
        Ok(ModelSpec {
            mmdit: self.mmdit.config().into(),
            clip_l: self.clip_l.spec()?,
            clip_g: self.clip_g.spec()?,
            t5: self.t5.as_ref().map(T5Encoder::spec).transpose()?,
            vae: crate::plan::vae_spec(self.vae.config(), self.vae_encoder.is_some()),
        })
    }

    /// The T5 sequence length prompts are encoded to.
    pub fn t5_length(&self) -> usize {
        self.t5_length
    }

    /// The flow-matching schedule shift.
    pub fn shift(&self) -> f64 {
        self.shift
    }

    /// The transformer.
    pub fn mmdit(&self) -> &Mmdit {
        &self.mmdit
    }

    /// The VAE decoder.
    pub fn vae(&self) -> &VaeDecoder {
        &self.vae
    }

    /// The dtype computations run in.
    pub fn compute_dtype(&self) -> DType {
        self.dtype
    }

    /// Largest width or height in pixels the position embedding allows.
    pub fn max_size(&self) -> usize {
        let c = self.mmdit.config();
        c.pos_embed_max_size * c.patch_size * 8
    }

    /// A request with the variant's defaults (size capped by the model).
    pub fn default_request(&self, prompt: &str) -> GenerateRequest {
        let d = model_card(self.variant);
        let size = d.size.min(self.max_size());
        GenerateRequest {
            prompt: prompt.to_string(),
            negative_prompt: String::new(),
            width: size,
            height: size,
            steps: d.steps,
            guidance: d.guidance,
            seed: 0,
            slg: d.slg,
            init_latents: None,
            without_t5: false,
            edit: None,
            loras: Vec::new(),
            control: None,
        }
    }

    /// Decodes sampler latents into an image tensor `[1, 3, H, W]` in `[-1, 1]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let x = latents.to_dtype(self.dtype)?;
        Ok(self.vae.decode_latents(&x)?.to_dtype(DType::F32)?)
    }

    /// Generates one image.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<RgbImage> {
        let latents = self.sample(req, progress)?;
        image::to_rgb(&self.decode(&latents)?)
    }
}

/// The variant to serve, from what the caller asked, the engine and cache marker say, and the
/// transformer's structure; a contradiction is an error naming both sides.
fn resolve_variant(
    path: &Path,
    asked: Option<Variant>,
    engine: Option<Variant>,
    marker: Option<Variant>,
    mmdit_x: bool,
) -> Result<(Variant, VariantSource)> {
    if let (Some(a), Some(e)) = (asked, engine)
        && a != e
    {
        return Err(Error::Mismatch(format!(
            "--variant {a} but the engine {} was built for {e}: rebuild it for {a} or ask for {e}",
            path.display()
        )));
    }
    let (variant, source) = match (asked, engine, marker) {
        (Some(v), ..) => (v, VariantSource::Requested),
        (None, Some(v), _) => (v, VariantSource::Engine),
        (None, None, Some(v)) => (v, VariantSource::CacheMarker),
        (None, None, None) if mmdit_x => (Variant::Medium, VariantSource::Structure),
        (None, None, None) => (Variant::Large, VariantSource::Assumed),
    };
    if mmdit_x != (variant == Variant::Medium) {
        let found = if mmdit_x {
            "an MMDiT-X (medium)"
        } else {
            "an MMDiT (large or large-turbo)"
        };
        return Err(Error::Mismatch(format!(
            "the variant is {variant} ({}) but {} holds {found} transformer",
            source.as_str(),
            path.display()
        )));
    }
    Ok((variant, source))
}

fn ckpt_compute_dtype(device: &Device, precision: Precision) -> DType {
    match (device, precision) {
        (Device::Cpu, _) | (_, Precision::F32) => DType::F32,
        _ => DType::BF16,
    }
}

fn scheduler_shift(path: &Path) -> Result<f64> {
    if !path.is_file() {
        return Ok(3.0);
    }
    let v: serde_json::Value = crate::error::read_json(path)?;
    Ok(v.get("shift")
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(3.0))
}
