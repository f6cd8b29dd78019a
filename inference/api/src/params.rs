//! What one image needs ([`GenParams`]) and what the loaded model is ([`ModelInfo`]): the
//! values validation produces and checks against.

use std::collections::BTreeMap;
use std::sync::Arc;

use schemars::JsonSchema;
use sd35_contract::{ControlMode, DeviceKind, Precision, Variant};
use serde::{Deserialize, Serialize};

use crate::picture::{Mask, Picture};

/// Everything that decides one image. Two requests with equal [`GenParams::batch_key`] can
/// be sampled together.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GenParams {
    /// What to draw.
    pub prompt: String,
    /// What to steer away from.
    pub negative_prompt: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Denoising steps.
    pub steps: u32,
    /// Classifier-free guidance scale.
    pub guidance_scale: f64,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Skip-layer guidance blocks the request names (`Some(vec![])`: none); `None`: the
    /// server's default ([`ModelInfo::skip_layer_guidance`]).
    pub slg_layers: Option<Vec<u32>>,
    /// The image to edit, for img2img and inpainting.
    #[serde(skip)]
    pub edit: Option<EditParams>,
    /// LoRA adapters, each a served name with its scale, in the order the request gave them.
    pub loras: Vec<(String, f64)>,
    /// A ControlNet condition.
    #[serde(skip)]
    pub control: Option<ControlParams>,
}

/// A ControlNet condition, validated: the control image at the request's size, and how it is
/// made into the condition.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlParams {
    /// Which of the served ControlNets.
    pub mode: ControlMode,
    /// The picture as sent, at the request's size (shared by the images of one request).
    pub image: Arc<Picture>,
    /// Made into the control image by this; `None`: the picture is the control image.
    pub preprocess: Option<Preprocess>,
    /// `controlnet_conditioning_scale`.
    pub scale: f64,
    /// The fraction of the steps before which the condition is off.
    pub start: f64,
    /// The fraction of the steps after which the condition is off.
    pub end: f64,
}

/// How a picture is made into a control image (the pipeline's `control_image` module does it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Preprocess {
    /// Canny edges with hysteresis thresholds `low` ≤ `high` (OpenCV's units).
    Canny {
        /// Weakest gradient kept when connected to a strong edge.
        low: f64,
        /// Weakest gradient that starts an edge.
        high: f64,
    },
    /// A Gaussian blur of standard deviation `sigma` pixels.
    Blur {
        /// Standard deviation in pixels.
        sigma: f64,
    },
}

/// An image to edit, already at the request's size: img2img, and inpainting with a mask.
#[derive(Debug, Clone, PartialEq)]
pub struct EditParams {
    /// The image (shared by the images of one request).
    pub image: Arc<Picture>,
    /// Where to repaint (level ≥ 128), when inpainting.
    pub mask: Option<Arc<Mask>>,
    /// How much of the schedule runs, in (0, 1] (diffusers' `strength`).
    pub strength: f64,
}

/// What must match for two requests to share a batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    width: u32,
    height: u32,
    steps: u32,
    guidance_bits: u64,
    slg_layers: Option<Vec<u32>>,
    /// An edit's strength and whether it has a mask.
    edit: Option<(u64, bool)>,
    /// The adapters with their scales, in order.
    loras: Vec<(String, u64)>,
    /// A ControlNet condition's mode, scale, start and end.
    control: Option<(ControlMode, u64, u64, u64)>,
}

/// The first step an edit of `strength` runs of a `steps`-step schedule, exactly as diffusers'
/// `get_timesteps` (and the pipeline) cut it: `int(max(steps − min(steps · strength, steps),
/// 0))` in f64, truncated.
pub fn first_step(steps: u32, strength: f64) -> u32 {
    let steps = f64::from(steps);
    let init = (steps * strength).min(steps);
    (steps - init).max(0.0) as u32
}

impl GenParams {
    /// The shape of the work: size, steps, guidance, skip-layer guidance, the adapters and
    /// their scales, a ControlNet condition's mode and scales and, for edits, strength and
    /// whether a mask is given.
    pub fn batch_key(&self) -> BatchKey {
        BatchKey {
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_bits: self.guidance_scale.to_bits(),
            slg_layers: self.slg_layers.clone(),
            edit: self
                .edit
                .as_ref()
                .map(|e| (e.strength.to_bits(), e.mask.is_some())),
            loras: self
                .loras
                .iter()
                .map(|(name, scale)| (name.clone(), scale.to_bits()))
                .collect(),
            control: self.control.as_ref().map(|c| {
                (
                    c.mode,
                    c.scale.to_bits(),
                    c.start.to_bits(),
                    c.end.to_bits(),
                )
            }),
        }
    }

    /// The sampling steps that run: all of them, or an edit's tail (see [`first_step`]).
    pub fn sampled_steps(&self) -> u32 {
        match &self.edit {
            Some(e) => self.steps - first_step(self.steps, e.strength).min(self.steps),
            None => self.steps,
        }
    }
}

/// Sampling defaults the server applies to fields a request leaves out.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
pub struct Defaults {
    /// Steps.
    pub steps: u32,
    /// Guidance scale.
    pub guidance_scale: f64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Skip-layer guidance the server applies when classifier-free guidance is on.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
pub struct SkipLayerInfo {
    /// Transformer blocks skipped in the extra pass.
    pub layers: Vec<usize>,
    /// Weight of the skip-layer term.
    pub scale: f64,
    /// Fraction of the steps after which it starts.
    pub start: f64,
    /// Fraction of the steps before which it stops.
    pub stop: f64,
}

/// A LoRA adapter requests may name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdapterInfo {
    /// The name a request gives (`loras[].name`, `<lora:NAME:0.8>`).
    pub name: String,
    /// The scale a request that names it without one gets.
    pub scale: f64,
    /// Whether it adapts the CLIP text encoders too (otherwise the transformer only).
    pub text_encoders: bool,
    /// Its file on the server (AUTOMATIC1111's `GET /sdapi/v1/loras` reports it).
    #[serde(skip)]
    pub path: String,
    /// The file's safetensors `__metadata__` (AUTOMATIC1111's `GET /sdapi/v1/loras`).
    #[serde(skip)]
    pub metadata: BTreeMap<String, serde_json::Value>,
}

/// What is served, as every entry of `/v1/models` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServedModel {
    /// Every name a request may give as `model`, the primary first.
    pub served_names: Vec<String>,
    /// The variant served.
    pub variant: Variant,
    /// Where the variant came from (`requested`, `engine`, `cache-marker`, `structure`,
    /// `assumed`).
    pub variant_source: String,
    /// Weight precision.
    pub precision: Precision,
    /// Where the model runs (`cuda` or `cpu`).
    pub device: DeviceKind,
    /// The GPU's name, on CUDA.
    pub gpu_name: Option<String>,
    /// The GPU's compute capability (`9.0`), on CUDA.
    pub compute_capability: Option<String>,
    /// Whether the GPU has FP8 tensor cores (compute capability 8.9 or later).
    pub fp8_tensor_cores: bool,
    /// How fp8 weights are computed here: `weight-only` (F8E4M3 in memory, bf16 at use) on
    /// GPUs, `cpu` on the CPU.
    pub fp8_path: String,
    /// Engine key of a prebuilt engine, when one is served.
    pub engine_key: Option<String>,
    /// Cache key of the cached model served (or the engine was built from).
    pub cache_key: Option<String>,
    /// Whether the T5 text encoder is loaded.
    pub t5_loaded: bool,
    /// Whether the model edits images (img2img, inpainting): its VAE has the encoder.
    pub image_editing: bool,
    /// Things an operator should know (CPU fallback, an assumed variant, conversion at load).
    pub warnings: Vec<String>,
    /// The op graph the model runs: `generic` (candle's own operations, always on GPUs) or
    /// `fused-cpu`.
    pub op_graph: String,
    /// The LoRA adapters a request may name (`loras`), with their default scales.
    pub adapters: Vec<AdapterInfo>,
    /// The ControlNet modes a request may ask for (`control.mode`).
    pub control_modes: Vec<ControlMode>,
}

/// What the loaded model is and accepts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// The primary model id (the first served name).
    pub id: String,
    /// What `/v1/models` reports of it.
    #[serde(flatten)]
    pub served: ServedModel,
    /// Largest width or height the model accepts.
    pub max_size: u32,
    /// Transformer blocks (skip-layer guidance may name blocks `0..transformer_blocks`).
    pub transformer_blocks: u32,
    /// Defaults the model card gives (before the server's overrides).
    pub defaults: Defaults,
    /// Skip-layer guidance requests get unless they name their own blocks: the variant's,
    /// when it has one and this model has the blocks it names.
    pub skip_layer_guidance: Option<SkipLayerInfo>,
    /// What requests are checked against for memory; `None` where the device's memory is not
    /// known (no request is refused for memory then).
    pub memory: Option<sd35_contract::plan::MemoryGate>,
}

impl ModelInfo {
    /// The served adapter `name`.
    pub fn adapter(&self, name: &str) -> Option<&AdapterInfo> {
        self.served.adapters.iter().find(|a| a.name == name)
    }

    /// A small model on the CPU answering to `names` (the first its id): 256 px at most, 24
    /// transformer blocks, 4 steps of 64×64 at guidance 3.5 by default, editing, nothing
    /// served beside it; what tests, the fuzzer and the fake backend check against.
    pub fn small(names: &[&str]) -> Self {
        let defaults = Defaults {
            steps: 4,
            guidance_scale: 3.5,
            width: 64,
            height: 64,
        };
        Self {
            id: names.first().copied().unwrap_or("small").to_owned(),
            served: ServedModel {
                served_names: names.iter().map(|&n| n.to_owned()).collect(),
                variant: Variant::Large,
                variant_source: "requested".into(),
                precision: Precision::F32,
                device: DeviceKind::Cpu,
                gpu_name: None,
                compute_capability: None,
                fp8_tensor_cores: false,
                fp8_path: "cpu".into(),
                engine_key: None,
                cache_key: None,
                t5_loaded: false,
                image_editing: true,
                warnings: Vec::new(),
                op_graph: "fused-cpu".into(),
                adapters: Vec::new(),
                control_modes: Vec::new(),
            },
            max_size: 256,
            transformer_blocks: 24,
            defaults,
            skip_layer_guidance: None,
            memory: None,
        }
    }
}
