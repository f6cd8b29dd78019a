//! The response bodies: images and the parameters that made them, and what `/v1/models`
//! reports about the served model.

use schemars::JsonSchema;
use sd35_contract::ControlMode;
use serde::{Deserialize, Serialize};

use crate::adapters::LoraRequest;
use crate::bounds::{Limits, MAX_GUIDANCE, MAX_IMAGES_PER_REQUEST, SIZE_MULTIPLE};
use crate::params::{Defaults, GenParams, ServedModel, SkipLayerInfo};

/// `POST /v1/txt2img` with `Accept: application/json`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Txt2ImgResponse {
    /// The image, base64, in `output_format`.
    pub image: String,
    /// `png`, `jpeg` or `webp`.
    pub output_format: String,
    /// The parameters actually used (defaults and seed filled in).
    pub parameters: UsedParameters,
    /// With `store: true`: where the stored image can be fetched until `expires_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// With `store: true`: when `url` stops working, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
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
    /// Skip-layer guidance blocks the request named (`[]`: off); absent: the model's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slg_layers: Option<Vec<u32>>,
    /// Edits: how much of the schedule ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// The LoRA adapters applied, each with the scale used; absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loras: Option<Vec<LoraRequest>>,
    /// The ControlNet condition (its image is not echoed); absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<UsedControl>,
}

/// A ControlNet condition as it was applied.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UsedControl {
    /// The mode.
    pub mode: ControlMode,
    /// The conditioning scale.
    pub scale: f64,
    /// The fraction of the steps before which it was off.
    pub start: f64,
    /// The fraction of the steps after which it was off.
    pub end: f64,
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
            slg_layers: p.slg_layers.clone(),
            strength: p.edit.as_ref().map(|e| e.strength),
            loras: (!p.loras.is_empty()).then(|| {
                p.loras
                    .iter()
                    .map(|(name, scale)| LoraRequest {
                        name: name.clone(),
                        scale: Some(*scale),
                    })
                    .collect()
            }),
            control: p.control.as_ref().map(|c| UsedControl {
                mode: c.mode,
                scale: c.scale,
                start: c.start,
                end: c.end,
            }),
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
    /// `png`, `jpeg` or `webp`: the format of every image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_format: Option<String>,
}

/// One generated image: inline (`b64_json`) or stored (`url`, `expires_at`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageData {
    /// The image, base64 (`response_format: "b64_json"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    /// Where the stored image can be fetched until `expires_at` (`response_format: "url"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// When `url` stops working, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The seed of this image.
    pub seed: u64,
}

/// The token counts OpenAI's GPT image models report; zero here (nothing is counted in
/// tokens), present so OpenAI clients read the event.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamUsage {
    /// Always 0.
    pub input_tokens: u64,
    /// Always zeros.
    pub input_tokens_details: StreamTokenDetails,
    /// Always 0.
    pub output_tokens: u64,
    /// Always 0.
    pub total_tokens: u64,
}

/// Input token details of [`StreamUsage`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamTokenDetails {
    /// Always 0.
    pub image_tokens: u64,
    /// Always 0.
    pub text_tokens: u64,
}

/// The `type` of a partial image event.
pub const PARTIAL_IMAGE_EVENT: &str = "image_generation.partial_image";
/// The `type` of the final event of a streamed generation.
pub const COMPLETED_EVENT: &str = "image_generation.completed";
/// The `type` of a partial image event of a streamed edit.
pub const EDIT_PARTIAL_IMAGE_EVENT: &str = "image_edit.partial_image";
/// The `type` of the final event of a streamed edit.
pub const EDIT_COMPLETED_EVENT: &str = "image_edit.completed";

/// The event names of a streamed route: (partial image, completed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamEvents {
    /// A preview's `type`.
    pub partial: &'static str,
    /// The image's `type`.
    pub completed: &'static str,
}

/// `POST /v1/images/generations`'s events.
pub const GENERATION_EVENTS: StreamEvents = StreamEvents {
    partial: PARTIAL_IMAGE_EVENT,
    completed: COMPLETED_EVENT,
};
/// `POST /v1/images/edits`'s events.
pub const EDIT_EVENTS: StreamEvents = StreamEvents {
    partial: EDIT_PARTIAL_IMAGE_EVENT,
    completed: EDIT_COMPLETED_EVENT,
};

/// One server-sent event of a streamed `POST /v1/images/generations` or `/v1/images/edits`
/// (`stream: true`), in the OpenAI Images API's shape: the event name is `type`, the data this
/// object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageStreamEvent {
    /// `image_generation.partial_image` (a preview) or `image_generation.completed`; for
    /// edits, `image_edit.partial_image` or `image_edit.completed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The image, base64 in `output_format`: a preview of the image the model predicts at
    /// that step, or the image.
    pub b64_json: String,
    /// Always `opaque`.
    pub background: String,
    /// Unix seconds.
    pub created_at: u64,
    /// `png`, `jpeg` or `webp`, as the request asked.
    pub output_format: String,
    /// Always `auto`.
    pub quality: String,
    /// `WIDTHxHEIGHT`.
    pub size: String,
    /// Partial images only: 0, 1, … in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_image_index: Option<u32>,
    /// Partial images only (our extension): the sampling steps done when the preview was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// Partial images only (our extension): the sampling steps the image takes in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// The completed event only: zeros.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<StreamUsage>,
    /// The seed of the image.
    pub seed: u64,
}

impl ImageStreamEvent {
    /// An event of `kind` for a `width`×`height` image, `image_b64` in `output_format`.
    pub fn new(
        kind: &str,
        image_b64: String,
        output_format: &str,
        width: u32,
        height: u32,
        seed: u64,
        created_at: u64,
    ) -> Self {
        Self {
            kind: kind.to_owned(),
            b64_json: image_b64,
            background: "opaque".into(),
            created_at,
            output_format: output_format.to_owned(),
            quality: "auto".into(),
            size: format!("{width}x{height}"),
            partial_image_index: None,
            step: None,
            steps: None,
            usage: (kind == COMPLETED_EVENT || kind == EDIT_COMPLETED_EVENT)
                .then(StreamUsage::default),
            seed,
        }
    }
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
    /// What is served (the same in every entry).
    #[serde(flatten)]
    pub model: ServedModel,
    /// What a request gets for the fields it leaves out.
    pub defaults: ModelDefaults,
    /// What a request may ask for.
    pub limits: ModelLimits,
    /// Device memory as planned from the model's shapes; absent where the device's memory is
    /// not known.
    pub memory: Option<MemoryReport>,
}

/// Device memory, computed from the model's shapes (`sd35-server plan` prints the same
/// arithmetic), against what the device had free once the model was loaded.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryReport {
    /// Always true: these figures are computed, not measured.
    pub computed: bool,
    /// The device's memory, when known.
    pub device_total_bytes: Option<u64>,
    /// What the device had free once the model was loaded, when known.
    pub device_free_bytes: Option<u64>,
    /// The weights as loaded.
    pub weights_bytes: u64,
    /// What a request's activations may take; requests planned over it are refused (422).
    pub activation_budget_bytes: u64,
    /// One image at the default size.
    pub default_request: PlannedRequest,
    /// Images of the default size the server samples together at most (the batcher never
    /// groups more than fit, whatever `--max-batch-size` says).
    pub max_batch_at_default_size: u32,
    /// The largest square image that fits, when one does.
    pub largest_square_size: Option<u32>,
}

/// The plan of one request.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlannedRequest {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Weights, the largest stage's activations and the runtime reserve.
    pub peak_bytes: u64,
    /// The largest stage's activations.
    pub activation_bytes: u64,
    /// `transformer`, `vae` or `text`.
    pub largest_stage: String,
}

impl MemoryReport {
    /// The report of `gate` for a server whose defaults are `defaults` and whose batcher
    /// groups up to `max_batch_size` images.
    pub fn of(
        gate: &sd35_contract::plan::MemoryGate,
        defaults: &Defaults,
        max_batch_size: usize,
        max_side: u32,
    ) -> Self {
        let guidance = defaults.guidance_scale > 1.0;
        let p = gate.plan(defaults.width, defaults.height, 1, guidance);
        let batch = (1..=max_batch_size.max(1) as u32)
            .take_while(|&b| gate.fits(defaults.width, defaults.height, b as usize, guidance))
            .last()
            .unwrap_or(0);
        Self {
            computed: true,
            device_total_bytes: gate.total_bytes,
            device_free_bytes: gate.free_bytes,
            weights_bytes: gate.weights.total(),
            activation_budget_bytes: gate.activation_budget_bytes,
            default_request: PlannedRequest {
                width: defaults.width,
                height: defaults.height,
                peak_bytes: p.peak_bytes,
                activation_bytes: p.activation_bytes,
                largest_stage: p.largest_stage.to_owned(),
            },
            max_batch_at_default_size: batch,
            largest_square_size: gate.largest_square(guidance, max_side),
        }
    }
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
            model: m.served.clone(),
            defaults: ModelDefaults {
                steps: limits.defaults.steps,
                guidance_scale: limits.defaults.guidance_scale,
                width: limits.defaults.width,
                height: limits.defaults.height,
                classifier_free_guidance: limits.defaults.guidance_scale > 1.0,
                skip_layer_guidance: m.skip_layer_guidance.clone(),
            },
            memory: m
                .memory
                .as_ref()
                .map(|g| MemoryReport::of(g, &limits.defaults, max_batch_size, limits.max_size())),
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
            data: m.served.served_names.iter().map(|n| entry(n)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/v1/models` reads back as it was written (what the served model is comes from one
    /// struct, flattened into every entry), and a field it does not have is refused.
    #[test]
    fn the_model_list_reads_back_and_refuses_unknown_fields() {
        let limits = crate::properties::limits();
        let list = ModelList::describe(&limits, 7, 2, 1000);
        let mut value = serde_json::to_value(&list).unwrap_or_default();
        let back: ModelList =
            serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}"));
        let served = &back.data[0].model;
        assert_eq!(served.served_names, limits.model.served.served_names);
        assert_eq!(served.control_modes, limits.model.served.control_modes);
        let names: Vec<&str> = served.adapters.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["style", "detail"]);
        assert!(
            value["data"][0]["adapters"][0].get("path").is_none(),
            "paths stay inside"
        );
        value["data"][0]["surprise"] = serde_json::json!(1);
        assert!(serde_json::from_value::<ModelList>(value).is_err());
    }
}
