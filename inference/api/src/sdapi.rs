//! The AUTOMATIC1111 web API subset (`/sdapi/v1/...`) that Open WebUI's image generation and
//! many other clients speak: `txt2img`, `sd-models` and `options` (the model name only).
//!
//! Requests are parsed as strictly as the other routes (one JSON object; a field this server
//! does not know is a 400 naming it) and validated by the same bounds (a value out of range is
//! a 422 naming the field as the client spelled it, `cfg_scale` or `batch_size`). Fields
//! AUTOMATIC1111 clients send that do not change an SD3.5 image here are accepted and listed
//! in [`A1111Txt2ImgRequest`]; the few that would change it in ways this server cannot do
//! (`enable_hr`, `restore_faces`, `tiling`) are refused when turned on.

use std::collections::BTreeMap;

use http::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::bounds::{Limits, MAX_IMAGES_PER_REQUEST};
use crate::error::ApiError;
use crate::params::{GenParams, ModelInfo};
use crate::request::{Sampling, check_model};

/// The sampler SD3.5 is sampled with here, whatever `sampler_name` asks for.
pub const SAMPLER: &str = "Euler";

/// The largest seed a random draw gives (AUTOMATIC1111 draws 32-bit seeds), so a reported seed
/// can be sent back as a request's `seed`.
pub const MAX_RANDOM_SEED: u64 = u32::MAX as u64;

/// `POST /sdapi/v1/txt2img`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct A1111Txt2ImgRequest {
    /// What to draw (not empty, not only spaces).
    #[serde(default)]
    pub prompt: String,
    /// What to steer away from (used when cfg_scale > 1).
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Width in pixels, a multiple of 16 up to the model's limit (left out: the model's
    /// default).
    #[serde(default)]
    pub width: Option<u32>,
    /// Height in pixels, a multiple of 16 up to the model's limit.
    #[serde(default)]
    pub height: Option<u32>,
    /// Denoising steps.
    #[serde(default)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale (≤ 1 disables guidance).
    #[serde(default)]
    pub cfg_scale: Option<f64>,
    /// Seed of the first image; `-1` (or left out) draws one. Image `i` uses `seed + i`.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Images per batch.
    #[serde(default)]
    pub batch_size: Option<u32>,
    /// Batches; `batch_size × n_iter` images in all.
    #[serde(default)]
    pub n_iter: Option<u32>,
    /// Accepted and ignored: SD3.5 is sampled with flow-matching Euler (`info` says so).
    #[serde(default)]
    pub sampler_name: Option<String>,
    /// Accepted and ignored, like `sampler_name`.
    #[serde(default)]
    pub sampler_index: Option<String>,
    /// Accepted and ignored: the schedule is SD3.5's shifted flow-matching schedule.
    #[serde(default)]
    pub scheduler: Option<String>,
    /// Must be true or left out: the images are always sent.
    #[serde(default)]
    pub send_images: Option<bool>,
    /// Accepted and ignored: this server saves nothing unless asked through `/v1` routes.
    #[serde(default)]
    pub save_images: Option<bool>,
    /// Accepted and ignored, like `save_images`.
    #[serde(default)]
    pub do_not_save_samples: Option<bool>,
    /// Accepted and ignored, like `save_images`.
    #[serde(default)]
    pub do_not_save_grid: Option<bool>,
    /// Settings for this request: only `sd_model_checkpoint`, which must be a served name.
    #[serde(default)]
    pub override_settings: Option<BTreeMap<String, serde_json::Value>>,
    /// Accepted and ignored: nothing is overridden beyond the request.
    #[serde(default)]
    pub override_settings_restore_afterwards: Option<bool>,
    /// Must be false or left out: there is no high-resolution second pass.
    #[serde(default)]
    pub enable_hr: Option<bool>,
    /// Accepted and ignored (used only by the second pass `enable_hr` would run).
    #[serde(default)]
    pub denoising_strength: Option<f64>,
    /// Must be false or left out: no face restoration.
    #[serde(default)]
    pub restore_faces: Option<bool>,
    /// Must be false or left out: no tiling.
    #[serde(default)]
    pub tiling: Option<bool>,
}

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

/// The served names as `GET /sdapi/v1/sd-models` lists them.
pub fn models(model: &ModelInfo) -> Vec<A1111Model> {
    model
        .served_names
        .iter()
        .map(|name| A1111Model {
            title: name.clone(),
            model_name: name.clone(),
            hash: model
                .engine_key
                .as_ref()
                .map(|k| k.chars().take(10).collect()),
            sha256: model.engine_key.clone(),
            filename: model.variant.as_str().to_owned(),
            config: None,
        })
        .collect()
}

/// A checked `sd_model_checkpoint`: a served name, else a 404 naming `field` (the message
/// lists the served names).
pub fn check_checkpoint(name: &str, model: &ModelInfo, field: &str) -> Result<(), ApiError> {
    check_model(name, model).map_err(|e| e.with_field(field))
}

fn refuse_on(field: &str, value: Option<bool>, why: &str) -> Result<(), ApiError> {
    if value == Some(true) {
        return Err(ApiError::invalid(field, why.to_owned()));
    }
    Ok(())
}

impl A1111Txt2ImgRequest {
    /// Validates the request into one parameter set per image (seeds `seed`, `seed + 1`, …) and
    /// the batch shape `(batch_size, n_iter)`; `random_seed` is drawn when `seed` is `-1` or left
    /// out, and is kept at most [`MAX_RANDOM_SEED`].
    pub fn resolve(
        &self,
        limits: &Limits,
        random_seed: impl FnOnce() -> u64,
    ) -> Result<(Vec<GenParams>, u32, u32), ApiError> {
        let bounds = limits.bounds();
        let batch = bounds
            .images
            .check("batch_size", self.batch_size.unwrap_or(1))?;
        let iterations = bounds.images.check("n_iter", self.n_iter.unwrap_or(1))?;
        let n = batch * iterations;
        if n > MAX_IMAGES_PER_REQUEST {
            return Err(ApiError::invalid(
                "n_iter",
                format!(
                    "batch_size × n_iter is {n}; at most {MAX_IMAGES_PER_REQUEST} images are made per request"
                ),
            ));
        }
        if self.send_images == Some(false) {
            return Err(ApiError::invalid(
                "send_images",
                "this server always sends the images; leave send_images out or true",
            ));
        }
        refuse_on(
            "enable_hr",
            self.enable_hr,
            "there is no high-resolution second pass; ask for the size you want",
        )?;
        refuse_on(
            "restore_faces",
            self.restore_faces,
            "face restoration is not available",
        )?;
        refuse_on("tiling", self.tiling, "tiling is not available")?;
        for (key, value) in self.override_settings.iter().flatten() {
            let field = format!("override_settings.{key}");
            match (key.as_str(), value) {
                ("sd_model_checkpoint", serde_json::Value::String(name)) => {
                    check_checkpoint(name, &limits.model, &field)?;
                }
                ("sd_model_checkpoint", _) => {
                    return Err(ApiError::invalid(&field, "must be a model name (a string)"));
                }
                _ => {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("`{key}` cannot be overridden here; only sd_model_checkpoint can"),
                    )
                    .with_field(field));
                }
            }
        }
        let seed = match self.seed {
            None | Some(-1) => None,
            Some(s) => match u64::try_from(s) {
                Ok(s) => Some(s),
                Err(_) => {
                    return Err(ApiError::invalid(
                        "seed",
                        format!("must be -1 (a random seed) or at least 0; got {s}"),
                    ));
                }
            },
        };
        let first = Sampling {
            prompt: &self.prompt,
            negative_prompt: self.negative_prompt.as_deref(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_scale: self.cfg_scale,
            seed,
        }
        .resolve(limits, || random_seed().min(MAX_RANDOM_SEED))
        .map_err(|e| match e.field.as_deref() {
            Some("guidance_scale") => ApiError {
                field: Some("cfg_scale".into()),
                ..e
            },
            _ => e,
        })?;
        // i64 seeds are far from wrapping when `n - 1` is added.
        let images = (0..u64::from(n))
            .map(|i| GenParams {
                seed: first.seed + i,
                ..first.clone()
            })
            .collect();
        Ok((images, batch, iterations))
    }
}

/// The answer's parameters and `info` for images made from `images` in `batch × iterations`.
pub fn describe(
    images: &[GenParams],
    batch: u32,
    iterations: u32,
    model: &ModelInfo,
) -> (A1111Parameters, A1111Info) {
    let none;
    let first = match images.first() {
        Some(first) => first,
        // `resolve` always makes at least one image.
        None => {
            none = GenParams {
                prompt: String::new(),
                negative_prompt: String::new(),
                width: 0,
                height: 0,
                steps: 0,
                guidance_scale: 0.0,
                seed: 0,
            };
            &none
        }
    };
    let parameters = A1111Parameters {
        prompt: first.prompt.clone(),
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
    };
    let infotexts = images
        .iter()
        .map(|p| {
            let negative = if p.negative_prompt.is_empty() {
                String::new()
            } else {
                format!("\nNegative prompt: {}", p.negative_prompt)
            };
            format!(
                "{}{negative}\nSteps: {}, Sampler: {SAMPLER}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
                p.prompt, p.steps, p.guidance_scale, p.seed, p.width, p.height, model.id
            )
        })
        .collect();
    let info = A1111Info {
        prompt: first.prompt.clone(),
        all_prompts: images.iter().map(|p| p.prompt.clone()).collect(),
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
        sd_model_hash: model.engine_key.clone(),
        infotexts,
    };
    (parameters, info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse_json;

    /// (seeds, batch_size, n_iter), or (status, field).
    type Outcome = Result<(Vec<u64>, u32, u32), (u16, Option<String>)>;

    fn resolve(body: &str, random: u64) -> Outcome {
        let limits = crate::request::tests::limits();
        parse_json::<A1111Txt2ImgRequest>(body.as_bytes())
            .and_then(|r| r.resolve(&limits, || random))
            .map(|(images, b, n)| (images.iter().map(|p| p.seed).collect(), b, n))
            .map_err(|e| (e.status.as_u16(), e.field))
    }

    #[test]
    fn a1111_bodies_resolve_with_their_own_field_names() {
        assert_eq!(
            resolve(r#"{"prompt":"a","seed":5,"batch_size":2,"n_iter":2}"#, 0),
            Ok((vec![5, 6, 7, 8], 2, 2))
        );
        // -1 and nothing draw a seed, kept to 32 bits so it can be sent back.
        assert_eq!(
            resolve(r#"{"prompt":"a","seed":-1}"#, u64::MAX),
            Ok((vec![MAX_RANDOM_SEED], 1, 1))
        );
        assert_eq!(resolve(r#"{"prompt":"a"}"#, 9), Ok((vec![9], 1, 1)));
        // What Open WebUI sends.
        assert!(
            resolve(
                r#"{"prompt":"a","batch_size":1,"width":64,"height":64,"steps":2,"cfg_scale":3,"sampler_name":"DPM++ 2M","scheduler":"Karras","negative_prompt":"x","override_settings":{"sd_model_checkpoint":"large"}}"#,
                0
            )
            .is_ok()
        );
        for (body, status, field) in [
            (r#"{"prompt":"a","cfg_scale":31}"#, 422, "cfg_scale"),
            (r#"{"prompt":"a","seed":-2}"#, 422, "seed"),
            (r#"{"prompt":"a","batch_size":5}"#, 422, "batch_size"),
            (r#"{"prompt":"a","batch_size":2,"n_iter":3}"#, 422, "n_iter"),
            (r#"{"prompt":"a","width":65}"#, 422, "width"),
            (r#"{"prompt":" "}"#, 422, "prompt"),
            (r#"{}"#, 422, "prompt"),
            (r#"{"prompt":"a","enable_hr":true}"#, 422, "enable_hr"),
            (r#"{"prompt":"a","send_images":false}"#, 422, "send_images"),
            (
                r#"{"prompt":"a","override_settings":{"sd_model_checkpoint":"sdxl"}}"#,
                404,
                "override_settings.sd_model_checkpoint",
            ),
            (
                r#"{"prompt":"a","override_settings":{"CLIP_stop_at_last_layers":2}}"#,
                422,
                "override_settings.CLIP_stop_at_last_layers",
            ),
            (r#"{"prompt":"a","hr_scale":2}"#, 400, "hr_scale"),
        ] {
            assert_eq!(
                resolve(body, 0),
                Err((status, Some(field.to_owned()))),
                "{body}"
            );
        }
    }

    #[test]
    fn info_is_what_a1111_clients_read() {
        let limits = crate::request::tests::limits();
        let req: A1111Txt2ImgRequest =
            parse_json(br#"{"prompt":"a cat","seed":3,"batch_size":2}"#).unwrap_or_default();
        let (images, b, n) = req.resolve(&limits, || 0).unwrap_or_else(|e| panic!("{e}"));
        let (params, info) = describe(&images, b, n, &limits.model);
        assert_eq!((params.seed, params.batch_size, params.n_iter), (3, 2, 1));
        assert_eq!(info.all_seeds, [3, 4]);
        assert_eq!(info.sampler_name, "Euler");
        assert!(
            info.infotexts[1].contains("Seed: 4, Size: 64x64"),
            "{info:?}"
        );
        let text = serde_json::to_string(&info).unwrap_or_default();
        let back: A1111Info = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, info);
    }
}
