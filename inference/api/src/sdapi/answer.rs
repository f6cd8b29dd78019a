//! What the AUTOMATIC1111 routes answer: the images' `parameters` and `info`, the served
//! models (`sd-models`), LoRA adapters (`loras`) and options.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::SAMPLER;
use crate::params::{GenParams, ModelInfo};

/// The parameters of a `/sdapi/v1/txt2img` answer: what was generated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct A1111Parameters {
    /// Prompt.
    pub prompt: String,
    /// Negative prompt.
    pub negative_prompt: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Steps.
    pub steps: u32,
    /// Guidance scale.
    pub cfg_scale: f64,
    /// Seed of the first image.
    pub seed: u64,
    /// Images per batch.
    pub batch_size: u32,
    /// Batches.
    pub n_iter: u32,
    /// The sampler used (always `Euler`).
    pub sampler_name: String,
    /// The model that made the images (the served model's primary name).
    pub sd_model_checkpoint: String,
    /// `img2img`: how much of the schedule ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denoising_strength: Option<f64>,
}

/// `POST /sdapi/v1/txt2img` answer.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct A1111Txt2ImgResponse {
    /// One base64 PNG per image, in seed order.
    pub images: Vec<String>,
    /// What was generated.
    pub parameters: A1111Parameters,
    /// [`A1111Info`] as a JSON string, as AUTOMATIC1111 sends it.
    pub info: String,
}

/// What the `info` string of a `/sdapi/v1/txt2img` answer holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct A1111Info {
    /// Prompt.
    pub prompt: String,
    /// The prompt of each image.
    pub all_prompts: Vec<String>,
    /// Negative prompt.
    pub negative_prompt: String,
    /// The negative prompt of each image.
    pub all_negative_prompts: Vec<String>,
    /// Seed of the first image.
    pub seed: u64,
    /// The seed of each image.
    pub all_seeds: Vec<u64>,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// Sampler.
    pub sampler_name: String,
    /// Guidance scale.
    pub cfg_scale: f64,
    /// Steps.
    pub steps: u32,
    /// Images per batch.
    pub batch_size: u32,
    /// Batches.
    pub n_iter: u32,
    /// The model's primary name.
    pub sd_model_name: String,
    /// The engine key, when a prebuilt engine is served.
    pub sd_model_hash: Option<String>,
    /// One AUTOMATIC1111 "infotext" line block per image.
    pub infotexts: Vec<String>,
}

/// One entry of `GET /sdapi/v1/sd-models`: a name the server answers to.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct A1111Model {
    /// The name to send as `sd_model_checkpoint`.
    pub title: String,
    /// The same name.
    pub model_name: String,
    /// The first 10 characters of the engine key, when a prebuilt engine is served.
    pub hash: Option<String>,
    /// The engine key, when a prebuilt engine is served.
    pub sha256: Option<String>,
    /// The variant served (`large`, `large-turbo` or `medium`).
    pub filename: String,
    /// Always null.
    pub config: Option<String>,
}

/// `GET /sdapi/v1/options` (and the answer of `POST`): the model name only.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct A1111Options {
    /// The name of the model the server generates with.
    pub sd_model_checkpoint: String,
}

/// `POST /sdapi/v1/options`: the model name only; other options are refused.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct A1111OptionsUpdate {
    /// One of the served names (`GET /sdapi/v1/sd-models`); left out, nothing changes.
    #[serde(default)]
    pub sd_model_checkpoint: Option<String>,
}

/// One entry of `GET /sdapi/v1/loras`: a LoRA adapter a prompt may name
/// (`<lora:NAME:WEIGHT>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct A1111Lora {
    /// The name a prompt's tag gives.
    pub name: String,
    /// The same name (AUTOMATIC1111's alias, which a tag may give too).
    pub alias: String,
    /// The adapter's file on the server.
    pub path: String,
    /// The file's safetensors metadata (training settings for sd-scripts files).
    pub metadata: BTreeMap<String, serde_json::Value>,
}

/// The served adapters as `GET /sdapi/v1/loras` lists them.
pub fn loras(model: &ModelInfo) -> Vec<A1111Lora> {
    model
        .served
        .adapters
        .iter()
        .map(|a| A1111Lora {
            name: a.name.clone(),
            alias: a.name.clone(),
            path: a.path.clone(),
            metadata: a.metadata.clone(),
        })
        .collect()
}

/// The served names as `GET /sdapi/v1/sd-models` lists them.
pub fn models(model: &ModelInfo) -> Vec<A1111Model> {
    let served = &model.served;
    served
        .served_names
        .iter()
        .map(|name| A1111Model {
            title: name.clone(),
            model_name: name.clone(),
            hash: served
                .engine_key
                .as_ref()
                .map(|k| k.chars().take(10).collect()),
            sha256: served.engine_key.clone(),
            filename: served.variant.as_str().to_owned(),
            config: None,
        })
        .collect()
}

/// The answer's parameters and `info` for images made from `images` in `batch × iterations`;
/// the prompt is reported as the request sent it (`prompt`, its `<lora:…>` tags kept, as
/// AUTOMATIC1111 reports it).
pub fn describe(
    images: &[GenParams],
    batch: u32,
    iterations: u32,
    model: &ModelInfo,
    prompt: &str,
) -> (A1111Parameters, A1111Info) {
    let none;
    let first = match images.first() {
        Some(first) => first,
        // `resolve` always makes at least one image.
        None => {
            none = GenParams::default();
            &none
        }
    };
    let parameters = A1111Parameters {
        prompt: prompt.to_owned(),
        negative_prompt: first.negative_prompt.clone(),
        width: first.width,
        height: first.height,
        steps: first.steps,
        cfg_scale: first.guidance_scale,
        seed: first.seed,
        batch_size: batch,
        n_iter: iterations,
        sampler_name: SAMPLER.to_owned(),
        sd_model_checkpoint: model.id.clone(),
        denoising_strength: first.edit.as_ref().map(|e| e.strength),
    };
    let infotexts = images
        .iter()
        .map(|p| {
            let negative = if p.negative_prompt.is_empty() {
                String::new()
            } else {
                format!("\nNegative prompt: {}", p.negative_prompt)
            };
            let strength = p
                .edit
                .as_ref()
                .map(|e| format!(", Denoising strength: {}", e.strength))
                .unwrap_or_default();
            format!(
                "{prompt}{negative}\nSteps: {}, Sampler: {SAMPLER}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}{strength}",
                p.steps, p.guidance_scale, p.seed, p.width, p.height, model.id
            )
        })
        .collect();
    let info = A1111Info {
        prompt: prompt.to_owned(),
        all_prompts: vec![prompt.to_owned(); images.len()],
        negative_prompt: first.negative_prompt.clone(),
        all_negative_prompts: images.iter().map(|p| p.negative_prompt.clone()).collect(),
        seed: first.seed,
        all_seeds: images.iter().map(|p| p.seed).collect(),
        width: first.width,
        height: first.height,
        sampler_name: SAMPLER.to_owned(),
        cfg_scale: first.guidance_scale,
        steps: first.steps,
        batch_size: batch,
        n_iter: iterations,
        sd_model_name: model.id.clone(),
        sd_model_hash: model.served.engine_key.clone(),
        infotexts,
    };
    (parameters, info)
}
