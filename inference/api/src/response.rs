//! The response bodies: images and the parameters that made them, and what `/v1/models`
//! reports about the served model.

use schemars::JsonSchema;
use sd35_contract::{DeviceKind, Precision, Variant};
use serde::{Deserialize, Serialize};

use crate::bounds::{Limits, MAX_GUIDANCE, MAX_IMAGES_PER_REQUEST, SIZE_MULTIPLE};
use crate::params::{GenParams, SkipLayerInfo};

/// `POST /v1/txt2img` with `Accept: application/json`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Txt2ImgResponse {
    /// The PNG, base64.
    pub image: String,
    /// The parameters actually used (defaults and seed filled in).
    pub parameters: UsedParameters,
}

/// The parameters that produced an image; sending them back reproduces it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UsedParameters {
    /// Prompt.
    pub prompt: String,
    /// Negative prompt.
    pub negative_prompt: String,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// Steps.
    pub steps: u32,
    /// Guidance scale.
    pub guidance_scale: f64,
    /// Seed.
    pub seed: u64,
}

impl From<&GenParams> for UsedParameters {
    fn from(p: &GenParams) -> Self {
        Self {
            prompt: p.prompt.clone(),
            negative_prompt: p.negative_prompt.clone(),
            width: p.width,
            height: p.height,
            steps: p.steps,
            guidance_scale: p.guidance_scale,
            seed: p.seed,
        }
    }
}

/// `POST /v1/images/generations` response.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: u64,
    /// One entry per image.
    pub data: Vec<ImageData>,
}

/// One generated image.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageData {
    /// The PNG, base64.
    pub b64_json: String,
    /// The seed of this image.
    pub seed: u64,
}

/// `GET /v1/models`: one entry per served name (the OpenAI list shape).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// One entry per served name, the primary first.
    pub data: Vec<ModelEntry>,
}

/// One served name of the model and everything about what is served.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// The name a request may send as `model`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// When the server started, Unix seconds.
    pub created: u64,
    /// Always `sd35`.
    pub owned_by: String,
    /// The primary name.
    pub root: String,
    /// Every served name.
    pub served_names: Vec<String>,
    /// The variant served.
    pub variant: Variant,
    /// Where the variant came from.
    pub variant_source: String,
    /// Weight precision.
    pub precision: Precision,
    /// Where the model runs.
    pub device: DeviceKind,
    /// The GPU's name, on CUDA.
    pub gpu_name: Option<String>,
    /// Engine key of a prebuilt engine.
    pub engine_key: Option<String>,
    /// Cache key of the cached model.
    pub cache_key: Option<String>,
    /// Whether T5 is loaded.
    pub t5_loaded: bool,
    /// What a request gets for the fields it leaves out.
    pub defaults: ModelDefaults,
    /// Things an operator should know.
    pub warnings: Vec<String>,
    /// What a request may ask for.
    pub limits: ModelLimits,
}

/// The defaults a request gets.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelDefaults {
    /// Steps.
    pub steps: u32,
    /// Guidance scale.
    pub guidance_scale: f64,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Whether the default guidance turns classifier-free guidance on.
    pub classifier_free_guidance: bool,
    /// The variant's skip-layer guidance, when it has one.
    pub skip_layer_guidance: Option<SkipLayerInfo>,
}

/// The server's limits on a request.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelLimits {
    /// Largest width or height.
    pub max_size: u32,
    /// Sizes are multiples of this.
    pub size_multiple: u32,
    /// Most steps.
    pub max_steps: u32,
    /// Largest guidance scale.
    pub max_guidance_scale: f64,
    /// Longest prompt in bytes.
    pub max_prompt_bytes: usize,
    /// Most images per request.
    pub max_images_per_request: u32,
    /// Most images sampled together.
    pub max_batch_size: usize,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
}

impl ModelList {
    /// The list for the loaded model: `created` is the server's start, the batch and body
    /// limits are the server's.
    pub fn describe(
        limits: &Limits,
        created: u64,
        max_batch_size: usize,
        max_body_bytes: usize,
    ) -> Self {
        let m = &limits.model;
        let bounds = limits.bounds();
        let entry = |id: &str| ModelEntry {
            id: id.to_owned(),
            object: "model".into(),
            created,
            owned_by: "sd35".into(),
            root: m.id.clone(),
            served_names: m.served_names.clone(),
            variant: m.variant,
            variant_source: m.variant_source.clone(),
            precision: m.precision,
            device: m.device,
            gpu_name: m.gpu_name.clone(),
            engine_key: m.engine_key.clone(),
            cache_key: m.cache_key.clone(),
            t5_loaded: m.t5_loaded,
            defaults: ModelDefaults {
                steps: limits.defaults.steps,
                guidance_scale: limits.defaults.guidance_scale,
                width: limits.defaults.width,
                height: limits.defaults.height,
                classifier_free_guidance: limits.defaults.guidance_scale > 1.0,
                skip_layer_guidance: m.skip_layer_guidance.clone(),
            },
            warnings: m.warnings.clone(),
            limits: ModelLimits {
                max_size: bounds.size.max.unwrap_or_else(|| limits.max_size()),
                size_multiple: SIZE_MULTIPLE,
                max_steps: limits.max_steps,
                max_guidance_scale: MAX_GUIDANCE,
                max_prompt_bytes: limits.max_prompt_bytes,
                max_images_per_request: MAX_IMAGES_PER_REQUEST,
                max_batch_size,
                max_body_bytes,
            },
        };
        Self {
            object: "list".into(),
            data: m.served_names.iter().map(|n| entry(n)).collect(),
        }
    }
}
