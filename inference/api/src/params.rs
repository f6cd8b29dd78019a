//! What one image needs ([`GenParams`]) and what the loaded model is ([`ModelInfo`]): the
//! values validation produces and checks against.

use schemars::JsonSchema;
use sd35_contract::{DeviceKind, Precision, Variant};
use serde::Serialize;

/// Everything that decides one image. Two requests with equal [`GenParams::batch_key`] can
/// be sampled together.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
}

/// What must match for two requests to share a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchKey {
    width: u32,
    height: u32,
    steps: u32,
    guidance_bits: u64,
}

impl GenParams {
    /// The shape of the work: size, steps and guidance.
    pub fn batch_key(&self) -> BatchKey {
        BatchKey {
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_bits: self.guidance_scale.to_bits(),
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

/// What the loaded model is and accepts: what `/v1/models` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    /// The primary model id (the first served name).
    pub id: String,
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
    /// Largest width or height the model accepts.
    pub max_size: u32,
    /// Defaults the model card gives (before the server's overrides).
    pub defaults: Defaults,
    /// Skip-layer guidance of the variant, when it has one.
    pub skip_layer_guidance: Option<SkipLayerInfo>,
    /// Things an operator should know (CPU fallback, an assumed variant, conversion at load).
    pub warnings: Vec<String>,
    /// The op graph the model runs: `generic` (candle's own operations, always on GPUs) or
    /// `fused-cpu`.
    pub op_graph: String,
    /// What requests are checked against for memory; `None` where the device's memory is not
    /// known (no request is refused for memory then).
    pub memory: Option<sd35_contract::plan::MemoryGate>,
}
