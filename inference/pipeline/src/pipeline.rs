//! The text-to-image pipeline: load a model directory, encode prompts, sample, decode.
//!
//! Same request and seed give bit-identical images on one machine: noise comes from a seeded
//! ChaCha8 generator and every step is deterministic on the CPU backend.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::clip::{ClipActivation, ClipConfig, ClipOutput, ClipTextModel};
use crate::controlnet::ControlNet;
use crate::image::{self, RgbImage};
use crate::lora::{Adapters, Component, LoraFile};
use crate::mmdit::{Extras, Mmdit, MmditConfig, MmditNames};
use crate::model_dir::{Layout, ModelDir, TextEncoderSource};
use crate::plan::{ModelSpec, WeightBytes};
use crate::scheduler::FlowMatchSchedule;
use crate::t5::{T5Config, T5Encoder};
use crate::tokenizer::PromptTokenizer;
use crate::vae::{VaeConfig, VaeDecoder, VaeEncoder, VaeNames};
use crate::variant::{Precision, SkipLayerGuidance, Variant, model_card};
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

/// One image to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// What to draw.
    pub prompt: String,
    /// What to steer away from (used only with guidance > 1).
    pub negative_prompt: String,
    /// Width in pixels (multiple of 16).
    pub width: usize,
    /// Height in pixels (multiple of 16).
    pub height: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale; ≤ 1 runs a single, unguided pass per step.
    pub guidance: f64,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Skip-layer guidance (applied only together with classifier-free guidance).
    pub slg: Option<SkipLayerGuidance>,
    /// Initial latents `[1, 16, H/8, W/8]` replacing the seeded noise.
    pub init_latents: Option<Tensor>,
    /// Encode the prompts as if T5 were not loaded (its embedding zeros), so that servers with
    /// and without T5 can repeat the same image (the engine's smoke image).
    pub without_t5: bool,
    /// An image to edit (img2img), optionally with a mask (inpainting).
    pub edit: Option<Edit>,
    /// LoRA adapters (names given to [`Pipeline::add_lora`]) with their scales.
    pub loras: Vec<(String, f64)>,
    /// A ControlNet's condition.
    pub control: Option<Control>,
}

/// A ControlNet condition, as diffusers' `StableDiffusion3ControlNetPipeline` takes it.
#[derive(Debug, Clone)]
pub struct Control {
    /// Which of the served ControlNets ([`Pipeline::add_controlnet`]).
    pub mode: sd35_contract::ControlMode,
    /// The control image (already preprocessed: edges, a blur, a depth map), `[1, 3, H, W]`
    /// f32 in `[-1, 1]` at the request's size ([`image::to_tensor`]).
    pub image: Tensor,
    /// `controlnet_conditioning_scale`.
    pub scale: f64,
    /// `control_guidance_start`: the fraction of the steps before which it is off.
    pub start: f64,
    /// `control_guidance_end`: the fraction of the steps after which it is off.
    pub end: f64,
}

/// Whether the ControlNet acts at step `i` of `steps`: diffusers' `controlnet_keep`, off while
/// `i / steps < start` or `(i + 1) / steps > end`, in f64.
pub fn control_keeps(i: usize, steps: usize, start: f64, end: f64) -> bool {
    let (i, n) = (i as f64, steps as f64);
    !(i / n < start || (i + 1.0) / n > end)
}

/// An image to edit, as diffusers' `StableDiffusion3Img2ImgPipeline` and (with a mask)
/// `StableDiffusion3InpaintPipeline` take it.
#[derive(Debug, Clone)]
pub struct Edit {
    /// The image, `[1, 3, H, W]` f32 in `[-1, 1]` at the request's size ([`image::to_tensor`]).
    pub image: Tensor,
    /// Where to repaint, `[1, 1, H, W]`: 1 repaints, 0 keeps ([`image::mask_tensor`]).
    pub mask: Option<Tensor>,
    /// How much of the schedule runs, in (0, 1]: 1 starts from pure noise, 0.6 runs the last
    /// 60 % of the steps (cut as [`first_step`] says).
    pub strength: f64,
}

/// The first step an edit of `strength` runs of a `steps`-step schedule, exactly as diffusers'
/// `get_timesteps`: `int(max(steps - min(steps · strength, steps), 0))` in f64, truncated, so
/// 28 steps at 0.3 start at step 19 (28 − 8.4 = 19.6), and 3 steps at 0.7 at step 0
/// (3 × 0.7 = 2.0999999999999996).
pub fn first_step(steps: usize, strength: f64) -> usize {
    let steps = steps as f64;
    let init = (steps * strength).min(steps);
    (steps - init).max(0.0) as usize
}

/// `extras` with a ControlNet pass's patch embeddings and residuals, when it ran.
fn with_control<'a>(extras: Extras<'a>, found: &'a Option<(Tensor, Vec<Tensor>)>) -> Extras<'a> {
    match found {
        Some((embedded, residuals)) => Extras {
            control: Some(residuals),
            embedded: Some(embedded),
            ..extras
        },
        None => extras,
    }
}

/// `sigma · noise + (1 − sigma) · sample`: the flow-matching forward process
/// (`FlowMatchEulerDiscreteScheduler.scale_noise`), in f32.
fn scale_noise(sample: &Tensor, sigma: f32, noise: &Tensor) -> Result<Tensor> {
    let keep = 1.0f32 - sigma;
    Ok(((noise * f64::from(sigma))? + (sample * f64::from(keep))?)?)
}

/// A `[1, 1, H, W]` 0/1 mask on the latent grid `[1, 1, H/8, W/8]`: the value at the top-left
/// pixel of each 8 × 8 block, as PyTorch's default (`nearest`) `interpolate` picks it.
fn mask_to_latents(mask: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = mask.dims4()?;
    Ok(mask
        .reshape((b, c, h / 8, 8, w / 8, 8))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((b, c, h / 8, w / 8))?)
}

/// Per-encoder outputs for one prompt, as the reference computes them.
#[derive(Debug, Clone)]
pub struct PromptParts {
    /// CLIP-L.
    pub clip_l: ClipOutput,
    /// CLIP-G.
    pub clip_g: ClipOutput,
    /// T5 hidden states, `[1, L, d]` (zeros when T5 is not loaded).
    pub t5: Tensor,
}

/// Token ids of one prompt for each tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTokens {
    /// CLIP-L ids.
    pub clip_l: Vec<u32>,
    /// CLIP-G ids.
    pub clip_g: Vec<u32>,
    /// T5 ids, when T5 is loaded.
    pub t5: Option<Vec<u32>>,
}

/// What happens between sampling steps: which batch items are still wanted (the others are
/// dropped at the next step), progress, and previews of chosen steps.
pub trait StepControl {
    /// Whether batch item `index` is still wanted.
    fn wanted(&mut self, index: usize) -> bool;
    /// Step `step` of `steps` finished for `live` items in `seconds`.
    fn step_done(&mut self, step: usize, steps: usize, live: usize, seconds: f64);
    /// Whether batch item `index` wants a preview after step `step` of `steps` (by default
    /// none does). Asked after the step, for items still sampled.
    fn preview_wanted(&mut self, _index: usize, _step: usize, _steps: usize) -> bool {
        false
    }
    /// The preview of batch item `index` after step `step`: the latents `[1, 16, H/8, W/8]`
    /// (f32) of the image the model predicts at that step — the current latents with the
    /// predicted remaining noise taken out — for [`Pipeline::decode`]. Reading them changes
    /// nothing in the sampling.
    fn preview(&mut self, _index: usize, _step: usize, _latents: &Tensor) {}
}

/// Every item wanted; each step reported to a closure.
struct Progress<'a>(&'a mut dyn FnMut(usize, usize));

impl StepControl for Progress<'_> {
    fn wanted(&mut self, _: usize) -> bool {
        true
    }
    fn step_done(&mut self, step: usize, steps: usize, _: usize, _: f64) {
        (self.0)(step, steps);
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

/// An adapter set as requests name it: names with their scales' bits.
type LoraKey = Vec<(String, u64)>;

/// An adapter set compiled for each model it adapts.
#[derive(Debug, Default)]
struct CompiledLoras {
    transformer: Adapters,
    clip_l: Adapters,
    clip_g: Adapters,
}

impl CompiledLoras {
    fn active(a: &Adapters) -> crate::lora::Active<'_> {
        (!a.is_empty()).then_some(a)
    }
}

fn weights_of(src: &TextEncoderSource, device: &Device, precision: Precision) -> Result<Weights> {
    Ok(Weights::open(std::slice::from_ref(&src.file), device, precision)?.with_prefix(&src.prefix))
}

impl Pipeline {
    /// Loads the model at `path` (diffusers or single-file layout, or an engine directory
    /// built by [`crate::engine::build`], which brings its own precision).
    pub fn load(path: &Path, opts: &PipelineOptions) -> Result<Self> {
        if opts.t5_max_length == 0 || opts.t5_max_length > MAX_T5_LENGTH {
            return Err(Error::invalid(
                "t5_max_length",
                format!("{} is outside 1..={MAX_T5_LENGTH}", opts.t5_max_length),
            ));
        }
        // A prebuilt engine is stored in its own precision: it is loaded as built, checked
        // against its manifest first, and never converted again.
        let engine = if crate::engine::is_engine(path) {
            Some(crate::engine::open(path, false)?)
        } else {
            None
        };
        let prec = match (&engine, opts.precision) {
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
        let marker = sd35_contract::CacheManifest::read(path).ok();
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
            engine.as_ref().map(|m| m.variant),
            marker.as_ref().map(|m| m.variant),
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

    /// Reads the LoRA file `path` and offers it to requests as `name`. The file is checked
    /// against this model now: a module it does not have, or a shape that does not fit (an
    /// adapter made for another variant), is refused here, naming the file and the module.
    pub fn add_lora(&mut self, name: &str, path: &Path) -> Result<()> {
        if self.loras.contains_key(name) {
            return Err(Error::invalid(
                "lora",
                format!("two adapters are named `{name}`"),
            ));
        }
        let file = Arc::new(LoraFile::read(path)?);
        self.compile_loras(&[(file.as_ref(), 1.0)])?;
        self.loras.insert(name.to_owned(), file);
        Ok(())
    }

    /// Loads the ControlNet at `path` (a diffusers folder or a single file) and serves it for
    /// `mode`. One made for another variant is refused here, naming the file and both shapes.
    pub fn add_controlnet(&mut self, mode: sd35_contract::ControlMode, path: &Path) -> Result<()> {
        if self.controlnets.contains_key(&mode) {
            return Err(Error::invalid(
                "controlnet",
                format!("two ControlNets are given for {mode}"),
            ));
        }
        if self.vae_encoder.is_none() {
            return Err(Error::invalid(
                "controlnet",
                "this model's VAE has no encoder, so it cannot encode control images",
            ));
        }
        let net = ControlNet::load(path, self.mmdit.config(), &self.device, self.precision)?;
        self.controlnets.insert(mode, net);
        Ok(())
    }

    /// The ControlNets served, by mode.
    pub fn controlnets(&self) -> impl Iterator<Item = (sd35_contract::ControlMode, &ControlNet)> {
        self.controlnets.iter().map(|(m, n)| (*m, n))
    }

    /// The adapters requests may name, with their files.
    pub fn loras(&self) -> impl Iterator<Item = (&str, &LoraFile)> {
        self.loras.iter().map(|(n, f)| (n.as_str(), f.as_ref()))
    }

    fn compile_loras(&self, set: &[(&LoraFile, f64)]) -> Result<CompiledLoras> {
        let (dev, dtype) = (&self.device, self.dtype);
        let transformer = Adapters::compile(
            set,
            Component::Transformer,
            "transformer",
            &self.mmdit.lora_targets()?,
            dtype,
            dev,
        )?;
        let clip_l = Adapters::compile(
            set,
            Component::ClipL,
            "CLIP-L encoder",
            &self.clip_l.lora_targets()?,
            dtype,
            dev,
        )?;
        let clip_g = Adapters::compile(
            set,
            Component::ClipG,
            "CLIP-G encoder",
            &self.clip_g.lora_targets()?,
            dtype,
            dev,
        )?;
        Ok(CompiledLoras {
            transformer,
            clip_l,
            clip_g,
        })
    }

    /// The compiled adapters of a request's set (cached while batches repeat it).
    fn adapters_for(&self, loras: &[(String, f64)]) -> Result<Option<Arc<CompiledLoras>>> {
        if loras.is_empty() {
            return Ok(None);
        }
        let key: LoraKey = loras
            .iter()
            .map(|(n, s)| (n.clone(), s.to_bits()))
            .collect();
        let mut cache = self
            .compiled
            .lock()
            .map_err(|_| Error::Layout("the adapter cache is poisoned".into()))?;
        if let Some((k, compiled)) = cache.as_ref()
            && *k == key
        {
            return Ok(Some(compiled.clone()));
        }
        let set = loras
            .iter()
            .map(|(name, scale)| {
                self.loras
                    .get(name)
                    .map(|f| (f.as_ref(), *scale))
                    .ok_or_else(|| self.unknown_lora(name))
            })
            .collect::<Result<Vec<_>>>()?;
        let compiled = Arc::new(self.compile_loras(&set)?);
        *cache = Some((key, compiled.clone()));
        Ok(Some(compiled))
    }

    fn unknown_lora(&self, name: &str) -> Error {
        let served: Vec<String> = self.loras.keys().map(|n| format!("`{n}`")).collect();
        Error::invalid(
            "loras",
            if served.is_empty() {
                format!("unknown adapter `{name}`: this server serves no LoRA adapter")
            } else {
                format!(
                    "unknown adapter `{name}`: this server serves {}",
                    served.join(", ")
                )
            },
        )
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

    /// Token ids of `prompt` for CLIP-L, CLIP-G and T5 (when loaded).
    pub fn tokenize(&self, prompt: &str) -> Result<PromptTokens> {
        Ok(PromptTokens {
            clip_l: self.tok_l.encode(prompt)?,
            clip_g: self.tok_g.encode(prompt)?,
            t5: self.tok_t5.as_ref().map(|t| t.encode(prompt)).transpose()?,
        })
    }

    /// Each encoder's output for `prompt`.
    pub fn encode_parts(&self, prompt: &str) -> Result<PromptParts> {
        self.encode_parts_with(prompt, true, None)
    }

    /// [`Pipeline::encode_parts`], with T5 left out (zeros) when `t5` is false.
    fn encode_parts_with(
        &self,
        prompt: &str,
        t5: bool,
        adapters: Option<&CompiledLoras>,
    ) -> Result<PromptParts> {
        let ids = self.tokenize(prompt)?;
        let (l, g) = match adapters {
            Some(a) => (
                CompiledLoras::active(&a.clip_l),
                CompiledLoras::active(&a.clip_g),
            ),
            None => (None, None),
        };
        let clip_l = self.clip_l.forward_with(&ids.clip_l, self.dtype, l)?;
        let clip_g = self.clip_g.forward_with(&ids.clip_g, self.dtype, g)?;
        let joint = self.mmdit.config().joint_attention_dim;
        let t5 = match (&self.t5, &ids.t5) {
            (Some(encoder), Some(ids)) if t5 => encoder.forward(ids, self.dtype)?,
            _ => Tensor::zeros((1, self.t5_length, joint), self.dtype, &self.device)?,
        };
        Ok(PromptParts { clip_l, clip_g, t5 })
    }

    /// The transformer's context `[1, 77 + L, joint]` and pooled vector `[1, P]` for `prompt`.
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor, Tensor)> {
        self.encode_prompt_with(prompt, true, None)
    }

    fn encode_prompt_with(
        &self,
        prompt: &str,
        t5: bool,
        adapters: Option<&CompiledLoras>,
    ) -> Result<(Tensor, Tensor)> {
        let p = self.encode_parts_with(prompt, t5, adapters)?;
        let clip = Tensor::cat(&[&p.clip_l.penultimate, &p.clip_g.penultimate], 2)?;
        let joint = self.mmdit.config().joint_attention_dim;
        let width = clip.dim(2)?;
        if width > joint {
            return Err(Error::Layout(format!(
                "CLIP widths ({width}) exceed the transformer's context width {joint}"
            )));
        }
        let clip = if width < joint {
            let pad = Tensor::zeros(
                (1, clip.dim(1)?, joint - width),
                clip.dtype(),
                clip.device(),
            )?;
            Tensor::cat(&[&clip, &pad], 2)?
        } else {
            clip
        };
        let context = Tensor::cat(&[&clip, &p.t5], 1)?;
        let pooled = Tensor::cat(&[&p.clip_l.pooled, &p.clip_g.pooled], 1)?;
        Ok((context, pooled))
    }

    fn validate(&self, req: &GenerateRequest) -> Result<()> {
        let max = self.max_size();
        for (field, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || v % SIZE_MULTIPLE != 0 || v > max {
                return Err(Error::invalid(
                    field,
                    format!("{v} must be a positive multiple of {SIZE_MULTIPLE} up to {max}"),
                ));
            }
        }
        if req.steps == 0 || req.steps > 1000 {
            return Err(Error::invalid(
                "steps",
                format!("{} is outside 1..=1000", req.steps),
            ));
        }
        if !req.guidance.is_finite() || req.guidance < 0.0 {
            return Err(Error::invalid(
                "guidance",
                format!("{} must be ≥ 0", req.guidance),
            ));
        }
        if let Some(edit) = &req.edit {
            self.validate_edit(req, edit)?;
        }
        if let Some(control) = &req.control {
            self.validate_control(req, control)?;
        }
        for (name, scale) in &req.loras {
            if !self.loras.contains_key(name) {
                return Err(self.unknown_lora(name));
            }
            if !scale.is_finite() {
                return Err(Error::invalid(
                    "loras",
                    format!("adapter `{name}`: the scale {scale} is not a number"),
                ));
            }
        }
        if let Some(slg) = &req.slg
            && let Some(&bad) = slg.layers.iter().find(|&&l| l >= self.mmdit.config().depth)
        {
            return Err(Error::invalid(
                "slg_layers",
                format!(
                    "layer {bad} does not exist (the transformer has {})",
                    self.mmdit.config().depth
                ),
            ));
        }
        Ok(())
    }

    fn validate_edit(&self, req: &GenerateRequest, edit: &Edit) -> Result<()> {
        if !(edit.strength > 0.0 && edit.strength <= 1.0) {
            return Err(Error::invalid(
                "strength",
                format!("{} must be above 0 and at most 1", edit.strength),
            ));
        }
        if first_step(req.steps, edit.strength) >= req.steps {
            return Err(Error::invalid(
                "strength",
                format!(
                    "{} of {} steps runs none of them: raise strength or steps",
                    edit.strength, req.steps
                ),
            ));
        }
        if self.vae_encoder.is_none() {
            return Err(Error::invalid(
                "image",
                "this model's VAE has no encoder, so it cannot edit images",
            ));
        }
        let want = [1, 3, req.height, req.width];
        if edit.image.dims() != want {
            return Err(Error::invalid(
                "image",
                format!(
                    "shape {:?}, expected {want:?} for {}x{}",
                    edit.image.dims(),
                    req.width,
                    req.height
                ),
            ));
        }
        if let Some(mask) = &edit.mask
            && mask.dims() != [1, 1, req.height, req.width]
        {
            return Err(Error::invalid(
                "mask",
                format!(
                    "shape {:?}, expected [1, 1, {}, {}] (the image's size)",
                    mask.dims(),
                    req.height,
                    req.width
                ),
            ));
        }
        Ok(())
    }

    fn validate_control(&self, req: &GenerateRequest, control: &Control) -> Result<()> {
        if !self.controlnets.contains_key(&control.mode) {
            let served: Vec<String> = self.controlnets.keys().map(|m| format!("`{m}`")).collect();
            return Err(Error::invalid(
                "control",
                if served.is_empty() {
                    format!(
                        "mode `{}` is not served: this server serves no ControlNet",
                        control.mode
                    )
                } else {
                    format!(
                        "mode `{}` is not served: this server serves {}",
                        control.mode,
                        served.join(", ")
                    )
                },
            ));
        }
        if req.edit.is_some() {
            return Err(Error::invalid(
                "control",
                "a ControlNet condition and an image to edit cannot be combined: send one",
            ));
        }
        if !control.scale.is_finite() {
            return Err(Error::invalid(
                "control",
                format!("the scale {} is not a number", control.scale),
            ));
        }
        if !(0.0 <= control.start && control.start < control.end && control.end <= 1.0) {
            return Err(Error::invalid(
                "control",
                format!(
                    "start {} and end {} must satisfy 0 <= start < end <= 1",
                    control.start, control.end
                ),
            ));
        }
        let want = [1, 3, req.height, req.width];
        if control.image.dims() != want {
            return Err(Error::invalid(
                "control",
                format!(
                    "the control image has shape {:?}, expected {want:?} for {}x{}",
                    control.image.dims(),
                    req.width,
                    req.height
                ),
            ));
        }
        Ok(())
    }

    /// The control image's latents `[1, 16, H/8, W/8]` (f32) for `net`: the VAE encoder's
    /// posterior mean, shifted as the ControlNet's config says and scaled.
    fn control_latents(&self, net: &ControlNet, image: &Tensor) -> Result<Tensor> {
        let encoder = self
            .vae_encoder
            .as_ref()
            .ok_or_else(|| Error::invalid("control", "this model's VAE has no encoder"))?;
        let cfg = self.vae.config();
        let x = image.to_device(&self.device)?.to_dtype(self.dtype)?;
        let mean = encoder.encode_mean(&x)?.to_dtype(DType::F32)?;
        Ok(((mean - net.control_latent_shift(cfg.shift_factor))? * cfg.scaling_factor)?)
    }

    /// Sampler latents of images `[B, 3, H, W]` in `[-1, 1]`: the VAE encoder's posterior
    /// mean, shifted and scaled, in f32.
    pub fn encode_image(&self, images: &Tensor) -> Result<Tensor> {
        let encoder = self.vae_encoder.as_ref().ok_or_else(|| {
            Error::invalid(
                "image",
                "this model's VAE has no encoder, so it cannot edit images",
            )
        })?;
        let x = images.to_device(&self.device)?.to_dtype(self.dtype)?;
        Ok(encoder.encode_latents(&x)?.to_dtype(DType::F32)?)
    }

    /// The initial latents: the request's own, or seeded standard normal noise.
    pub fn initial_latents(&self, req: &GenerateRequest) -> Result<Tensor> {
        let c = self.mmdit.config().in_channels;
        let shape = (1, c, req.height / 8, req.width / 8);
        match &req.init_latents {
            Some(t) => {
                if t.dims() != [shape.0, shape.1, shape.2, shape.3] {
                    return Err(Error::invalid(
                        "init_latents",
                        format!(
                            "shape {:?}, expected {:?} for {}x{}",
                            t.dims(),
                            shape,
                            req.width,
                            req.height
                        ),
                    ));
                }
                Ok(t.to_dtype(DType::F32)?.to_device(&self.device)?)
            }
            None => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(req.seed);
                let n = shape.0 * shape.1 * shape.2 * shape.3;
                let v: Vec<f32> = (0..n)
                    .map(|_| rand_distr::StandardNormal.sample(&mut rng))
                    .collect();
                Ok(Tensor::from_vec(v, shape, &self.device)?)
            }
        }
    }

    /// Runs the sampler and returns the final latents `[1, 16, H/8, W/8]` (f32).
    /// `progress(step, steps)` is called after each step.
    pub fn sample(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let mut out = self.sample_batch(std::slice::from_ref(req), &mut Progress(progress))?;
        out.pop()
            .flatten()
            .ok_or_else(|| Error::invalid("request", "the sampler returned no latents"))
    }

    /// Runs the sampler for requests of one shape side by side — the one denoising loop, used
    /// by `generate` (a batch of one) and by the server. Returns the final latents of each item
    /// (f32), `None` for items `control` stopped wanting. An item sampled in a batch of one is
    /// bit-identical to [`Pipeline::sample`]'s.
    ///
    /// Every request is validated; they must share size, steps, guidance and skip-layer
    /// guidance (prompts, negative prompts, seeds and initial latents may differ).
    pub fn sample_batch(
        &self,
        reqs: &[GenerateRequest],
        control: &mut dyn StepControl,
    ) -> Result<Vec<Option<Tensor>>> {
        let Some(first) = reqs.first() else {
            return Ok(Vec::new());
        };
        for req in reqs {
            self.validate(req)?;
            let edit_key = |r: &GenerateRequest| {
                r.edit
                    .as_ref()
                    .map(|e| (e.strength.to_bits(), e.mask.is_some()))
            };
            let lora_key = |r: &GenerateRequest| -> LoraKey {
                r.loras
                    .iter()
                    .map(|(n, s)| (n.clone(), s.to_bits()))
                    .collect()
            };
            let condition_key = |r: &GenerateRequest| {
                r.control.as_ref().map(|c| {
                    (
                        c.mode,
                        c.scale.to_bits(),
                        c.start.to_bits(),
                        c.end.to_bits(),
                    )
                })
            };
            let same = (
                req.width,
                req.height,
                req.steps,
                req.guidance.to_bits(),
                &req.slg,
                edit_key(req),
                lora_key(req),
                condition_key(req),
            ) == (
                first.width,
                first.height,
                first.steps,
                first.guidance.to_bits(),
                &first.slg,
                edit_key(first),
                lora_key(first),
                condition_key(first),
            );
            if !same {
                return Err(Error::invalid(
                    "batch",
                    "requests of one batch must share size, steps, guidance, skip-layer \
                     guidance, LoRA adapters, the ControlNet condition's mode and scales and, \
                     for edits, strength and whether a mask is given",
                ));
            }
        }
        let dev = &self.device;
        let cfg = first.guidance > 1.0;
        // Skip-layer guidance refines classifier-free guidance; without CFG there is none.
        let slg = if cfg { first.slg.as_ref() } else { None };
        let compiled = self.adapters_for(&first.loras)?;
        let adapters = compiled.as_deref();
        let extras = Extras {
            adapters: adapters.and_then(|a| CompiledLoras::active(&a.transformer)),
            ..Extras::default()
        };
        let schedule = FlowMatchSchedule::new(first.steps, self.shift);
        // An edit runs the end of the schedule, from its first step on (diffusers'
        // get_timesteps), starting from the image's latents noised to that step.
        let start = first
            .edit
            .as_ref()
            .map_or(0, |e| first_step(first.steps, e.strength));
        let (mut lat, mut ctx, mut pooled, mut nctx, mut npooled) =
            (vec![], vec![], vec![], vec![], vec![]);
        // Inpainting: each row's noise, image latents and latent mask, to put the kept region
        // back after every step.
        let (mut noises, mut images, mut masks) = (vec![], vec![], vec![]);
        // A ControlNet condition: the net, its scales and each row's control latents.
        let condition = match &first.control {
            Some(c) => Some((
                self.controlnets
                    .get(&c.mode)
                    .ok_or_else(|| Error::invalid("control", "the ControlNet is not served"))?,
                c,
            )),
            None => None,
        };
        let mut control_latents = Vec::new();
        for req in reqs {
            if let (Some((net, _)), Some(c)) = (condition, &req.control) {
                control_latents.push(self.control_latents(net, &c.image)?);
            }
            let noise = self.initial_latents(req)?;
            match &req.edit {
                None => lat.push(noise),
                Some(edit) => {
                    let image = self.encode_image(&edit.image)?;
                    lat.push(if edit.strength == 1.0 {
                        noise.clone()
                    } else {
                        scale_noise(&image, schedule.sigmas[start], &noise)?
                    });
                    if let Some(mask) = &edit.mask {
                        let mask = mask.to_device(dev)?.to_dtype(DType::F32)?;
                        masks.push(mask_to_latents(&mask)?);
                        noises.push(noise);
                        images.push(image);
                    }
                }
            }
            let (c, p) = self.encode_prompt_with(&req.prompt, !req.without_t5, adapters)?;
            ctx.push(c);
            pooled.push(p);
            if cfg {
                let (c, p) =
                    self.encode_prompt_with(&req.negative_prompt, !req.without_t5, adapters)?;
                nctx.push(c);
                npooled.push(p);
            }
        }
        let cat = |v: &[Tensor]| Tensor::cat(v, 0);
        let mut latents = cat(&lat)?;
        let (mut ctx, mut pooled) = (cat(&ctx)?, cat(&pooled)?);
        let (mut nctx, mut npooled) = if cfg {
            (Some(cat(&nctx)?), Some(cat(&npooled)?))
        } else {
            (None, None)
        };
        let mut control_latents = if condition.is_some() {
            Some(cat(&control_latents)?)
        } else {
            None
        };
        let mut inpaint = if masks.is_empty() {
            None
        } else {
            Some((cat(&noises)?, cat(&images)?, cat(&masks)?))
        };
        // Original index of each row still sampled.
        let mut rows: Vec<usize> = (0..reqs.len()).collect();
        let last = schedule.len();
        // Steps this request runs (all of them, or an edit's tail), counted from 0 for
        // progress, previews and skip-layer guidance.
        let steps = last - start;
        for (k, &t) in schedule.timesteps[start..].iter().enumerate() {
            let i = start + k;
            let keep: Vec<usize> = (0..rows.len())
                .filter(|&r| control.wanted(rows[r]))
                .collect();
            if keep.is_empty() {
                return Ok(vec![None; reqs.len()]);
            }
            if keep.len() < rows.len() {
                let ids = Tensor::new(keep.iter().map(|&r| r as u32).collect::<Vec<_>>(), dev)?;
                latents = latents.index_select(&ids, 0)?;
                ctx = ctx.index_select(&ids, 0)?;
                pooled = pooled.index_select(&ids, 0)?;
                nctx = nctx.map(|t| t.index_select(&ids, 0)).transpose()?;
                npooled = npooled.map(|t| t.index_select(&ids, 0)).transpose()?;
                control_latents = control_latents
                    .map(|t| t.index_select(&ids, 0))
                    .transpose()?;
                inpaint = inpaint
                    .map(|(n, im, m)| -> Result<_> {
                        Ok((
                            n.index_select(&ids, 0)?,
                            im.index_select(&ids, 0)?,
                            m.index_select(&ids, 0)?,
                        ))
                    })
                    .transpose()?;
                rows = keep.iter().map(|&r| rows[r]).collect();
            }
            let started = std::time::Instant::now();
            let b = rows.len();
            let x = latents.to_dtype(self.dtype)?;
            // The ControlNet's residuals for a pass over `x_in` with `p_in` and `tt`: none
            // while diffusers' controlnet_keep is off at this step (adding its zeros would
            // change nothing). The skip-layer pass runs without them.
            let controlled = |x_in: &Tensor, p_in: &Tensor, tt: &Tensor, copies: usize| {
                let (Some((net, c)), Some(latents)) = (condition, &control_latents) else {
                    return Ok(None);
                };
                if !control_keeps(i, last, c.start, c.end) {
                    return Ok(None);
                }
                let embedded = self.mmdit.embed_patches(x_in)?;
                let latents = latents.to_dtype(self.dtype)?;
                let latents = Tensor::cat(&vec![&latents; copies], 0)?;
                let residuals = net.forward(&embedded, &latents, p_in, tt, c.scale)?;
                Ok::<_, Error>(Some((embedded, residuals)))
            };
            let noise = match (&nctx, &npooled) {
                (Some(nc), Some(np)) => {
                    // Unconditional rows first, then conditional: one transformer pass.
                    let x_in = Tensor::cat(&[&x, &x], 0)?;
                    let c_in = Tensor::cat(&[nc, &ctx], 0)?;
                    let p_in = Tensor::cat(&[np, &pooled], 0)?;
                    let tt = Tensor::full(t, 2 * b, dev)?;
                    let found = controlled(&x_in, &p_in, &tt, 2)?;
                    let pred = self
                        .mmdit
                        .forward_with(&x_in, &tt, &c_in, &p_in, &[], &with_control(extras, &found))?
                        .to_dtype(DType::F32)?;
                    let uncond = pred.narrow(0, 0, b)?;
                    let text = pred.narrow(0, b, b)?;
                    let mut noise = (&uncond + ((&text - &uncond)? * first.guidance)?)?;
                    if let Some(slg) = slg {
                        let (fi, n) = (k as f64, steps as f64);
                        if fi > n * slg.start && fi < n * slg.stop {
                            let tb = Tensor::full(t, b, dev)?;
                            let skip = self
                                .mmdit
                                .forward_with(&x, &tb, &ctx, &pooled, &slg.layers, &extras)?
                                .to_dtype(DType::F32)?;
                            noise = (noise + ((&text - &skip)? * slg.scale)?)?;
                        }
                    }
                    noise
                }
                _ => {
                    let tt = Tensor::full(t, b, dev)?;
                    let found = controlled(&x, &pooled, &tt, 1)?;
                    self.mmdit
                        .forward_with(&x, &tt, &ctx, &pooled, &[], &with_control(extras, &found))?
                        .to_dtype(DType::F32)?
                }
            };
            latents = (latents + (&noise * f64::from(schedule.dt(i)))?)?;
            if let Some((start_noise, image, mask)) = &inpaint {
                // The kept region is the image noised to the next step (the image itself after
                // the last): (1 − m) · kept + m · latents, as diffusers' inpaint loop.
                let kept = if i + 1 < last {
                    scale_noise(image, schedule.sigmas[i + 1], start_noise)?
                } else {
                    image.clone()
                };
                latents = (mask.affine(-1.0, 1.0)?.broadcast_mul(&kept)?
                    + mask.broadcast_mul(&latents)?)?;
            }
            control.step_done(k + 1, steps, b, started.elapsed().as_secs_f64());
            for (r, &orig) in rows.iter().enumerate() {
                if control.preview_wanted(orig, k + 1, steps) {
                    // x0 = x_t - sigma_t * v, written with the latents after the step.
                    let sigma = f64::from(schedule.sigmas[i + 1]);
                    let predicted = (latents.narrow(0, r, 1)? - (noise.narrow(0, r, 1)? * sigma)?)?;
                    control.preview(orig, k + 1, &predicted);
                }
            }
        }
        let mut out = vec![None; reqs.len()];
        for (r, &orig) in rows.iter().enumerate() {
            out[orig] = Some(latents.narrow(0, r, 1)?);
        }
        Ok(out)
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
