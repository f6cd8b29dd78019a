//! The AUTOMATIC1111 web API subset (`/sdapi/v1/...`) that Open WebUI's image generation and
//! many other clients speak: `txt2img`, `img2img` (with inpainting), `sd-models` and `options`
//! (the model name only).
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

use crate::adapters::{LoraRequest, prompt_lora_tags};
use crate::bounds::{Limits, MAX_IMAGES_PER_REQUEST};
use crate::edit::{EditUpload, MAX_MASK_BLUR, MaskRule, MaskUpload};
use crate::error::ApiError;
use crate::output::Output;
use crate::params::{GenParams, ModelInfo};
use crate::picture;
use crate::sampling::{Sampling, check_model, fan_out};

mod answer;

pub use answer::{
    A1111Info, A1111Lora, A1111Model, A1111Options, A1111OptionsUpdate, A1111Parameters,
    A1111Txt2ImgResponse, describe, loras, models,
};

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
    /// Our extension: `png` (the default), `jpeg` or `webp` (lossless) for `images`.
    #[serde(default)]
    pub output_format: Option<String>,
    /// Our extension: JPEG quality from 0 to 100 (default 100).
    #[serde(default)]
    pub output_compression: Option<u32>,
}

/// `mask_blur` when left out (AUTOMATIC1111's default), in pixels.
pub const DEFAULT_MASK_BLUR: u32 = 4;
/// `denoising_strength` of `img2img` when left out (AUTOMATIC1111's default).
pub const DEFAULT_DENOISING_STRENGTH: f64 = 0.75;

/// `POST /sdapi/v1/img2img`: the `txt2img` fields, the image to edit and, for inpainting, a
/// mask. The size defaults to the image's (rounded down to a multiple of 16); an image of
/// another size is resized to the size asked for (AUTOMATIC1111's `resize_mode` 0, "just
/// resize", with Lanczos).
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct A1111Img2ImgRequest {
    /// The image to edit, one PNG, JPEG or WebP in base64 (a `data:` URL too).
    #[serde(default)]
    pub init_images: Vec<String>,
    /// Where to repaint, an image of the image's size in base64: white repaints; a mask with
    /// transparency repaints where it is opaque (alpha above 128), as AUTOMATIC1111 reads
    /// masks. Left out: the whole image is edited.
    #[serde(default)]
    pub mask: Option<String>,
    /// How much of the schedule runs, above 0 and at most 1 (default 0.75).
    #[serde(default)]
    pub denoising_strength: Option<f64>,
    /// 1 repaints where the mask is black instead (the mask's levels inverted, `255 − l`).
    #[serde(default)]
    pub inpainting_mask_invert: Option<u32>,
    /// Blur of the mask, in pixels (default 4): a Gaussian of this standard deviation over
    /// `2·⌊2.5·σ + 0.5⌋ + 1` taps, across then down, edges mirrored (OpenCV's `GaussianBlur`,
    /// as AUTOMATIC1111 blurs), before the mask is resized and binarised at half scale — so
    /// it rounds the mask's corners and drops specks narrower than about σ, it does not
    /// feather the result.
    #[serde(default)]
    pub mask_blur: Option<u32>,
    /// The blur across, replacing `mask_blur` for that direction.
    #[serde(default)]
    pub mask_blur_x: Option<u32>,
    /// The blur down, replacing `mask_blur` for that direction.
    #[serde(default)]
    pub mask_blur_y: Option<u32>,
    /// Must be 0 or left out: the image is resized to the size asked for ("just resize").
    #[serde(default)]
    pub resize_mode: Option<u32>,
    /// Accepted and ignored: the masked region always starts from the image's own latents
    /// noised by `denoising_strength` (AUTOMATIC1111's `original`, diffusers' inpainting).
    #[serde(default)]
    pub inpainting_fill: Option<u32>,
    /// Accepted and ignored: the whole picture is inpainted at the request's size.
    #[serde(default)]
    pub inpaint_full_res: Option<serde_json::Value>,
    /// Accepted and ignored, like `inpaint_full_res`.
    #[serde(default)]
    pub inpaint_full_res_padding: Option<u32>,
    /// Accepted and ignored: the answer carries the generated images only.
    #[serde(default)]
    pub include_init_images: Option<bool>,
    /// What the edited image shows (not empty, not only spaces).
    #[serde(default)]
    pub prompt: String,
    /// What to steer away from (used when cfg_scale > 1).
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Width in pixels, a multiple of 16 up to the model's limit (left out: the image's,
    /// rounded down to a multiple of 16).
    #[serde(default)]
    pub width: Option<u32>,
    /// Height in pixels, likewise.
    #[serde(default)]
    pub height: Option<u32>,
    /// Denoising steps of the whole schedule; an edit runs the last `denoising_strength` of
    /// them.
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
    /// Accepted and ignored: SD3.5 is sampled with flow-matching Euler.
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
    /// Accepted and ignored.
    #[serde(default)]
    pub save_images: Option<bool>,
    /// Accepted and ignored.
    #[serde(default)]
    pub do_not_save_samples: Option<bool>,
    /// Accepted and ignored.
    #[serde(default)]
    pub do_not_save_grid: Option<bool>,
    /// Settings for this request: only `sd_model_checkpoint`, which must be a served name.
    #[serde(default)]
    pub override_settings: Option<BTreeMap<String, serde_json::Value>>,
    /// Accepted and ignored.
    #[serde(default)]
    pub override_settings_restore_afterwards: Option<bool>,
    /// Must be false or left out: no face restoration.
    #[serde(default)]
    pub restore_faces: Option<bool>,
    /// Must be false or left out: no tiling.
    #[serde(default)]
    pub tiling: Option<bool>,
    /// Our extension: `png` (the default), `jpeg` or `webp` (lossless) for `images`.
    #[serde(default)]
    pub output_format: Option<String>,
    /// Our extension: JPEG quality from 0 to 100 (default 100).
    #[serde(default)]
    pub output_compression: Option<u32>,
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
    /// The format the images are answered in.
    pub fn output(&self) -> Result<Output, ApiError> {
        Output::resolve(self.output_format.as_deref(), self.output_compression, None)
    }

    /// Validates the request into one parameter set per image (seeds `seed`, `seed + 1`, …) and
    /// the batch shape `(batch_size, n_iter)`; `random_seed` is drawn when `seed` is `-1` or left
    /// out, and is kept at most [`MAX_RANDOM_SEED`].
    pub fn resolve(
        &self,
        limits: &Limits,
        random_seed: impl FnOnce() -> u64,
    ) -> Result<(Vec<GenParams>, u32, u32), ApiError> {
        let (batch, iterations) = self.checked_batch(limits)?;
        let (prompt, loras) = prompt_lora_tags(&self.prompt)?;
        let first = self
            .sampling(&prompt, &loras)?
            .resolve(limits, || random_seed().min(MAX_RANDOM_SEED))
            .map_err(a1111_field)?;
        // i64 seeds are far from wrapping when `n - 1` is added.
        Ok((fan_out(&first, batch * iterations), batch, iterations))
    }

    /// The sampling fields, with `prompt` (the prompt without its `<lora:…>` tags) and the
    /// adapters its tags name (the seed checked).
    fn sampling<'a>(
        &'a self,
        prompt: &'a str,
        loras: &'a [LoraRequest],
    ) -> Result<Sampling<'a>, ApiError> {
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
        Ok(Sampling {
            prompt,
            negative_prompt: self.negative_prompt.as_deref(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_scale: self.cfg_scale,
            seed,
            slg_layers: None,
            loras,
            control: None,
        })
    }

    /// Everything but the sampling fields: `(batch_size, n_iter)`, the switches, the
    /// overrides and the output format.
    fn checked_batch(&self, limits: &Limits) -> Result<(u32, u32), ApiError> {
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
        self.output()?;
        Ok((batch, iterations))
    }
}

/// This API calls the guidance scale `cfg_scale`, and names adapters in the prompt.
fn a1111_field(e: ApiError) -> ApiError {
    match e.field.as_deref() {
        Some("guidance_scale") => e.with_field("cfg_scale"),
        Some("loras") => e.with_field("prompt"),
        _ => e,
    }
}

impl A1111Img2ImgRequest {
    /// The `txt2img` fields of the request.
    fn txt2img(&self) -> A1111Txt2ImgRequest {
        A1111Txt2ImgRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            cfg_scale: self.cfg_scale,
            seed: self.seed,
            batch_size: self.batch_size,
            n_iter: self.n_iter,
            sampler_name: self.sampler_name.clone(),
            sampler_index: self.sampler_index.clone(),
            scheduler: self.scheduler.clone(),
            send_images: self.send_images,
            save_images: self.save_images,
            do_not_save_samples: self.do_not_save_samples,
            do_not_save_grid: self.do_not_save_grid,
            override_settings: self.override_settings.clone(),
            override_settings_restore_afterwards: self.override_settings_restore_afterwards,
            enable_hr: None,
            denoising_strength: None,
            restore_faces: self.restore_faces,
            tiling: self.tiling,
            output_format: self.output_format.clone(),
            output_compression: self.output_compression,
        }
    }

    /// The format the images are answered in.
    pub fn output(&self) -> Result<Output, ApiError> {
        self.txt2img().output()
    }

    /// Validates the request into one parameter set per image (seeds `seed`, `seed + 1`, …),
    /// the image and mask decoded and at the request's size, and `(batch_size, n_iter)`.
    pub fn resolve(
        &self,
        limits: &Limits,
        random_seed: impl FnOnce() -> u64,
    ) -> Result<(Vec<GenParams>, u32, u32), ApiError> {
        let txt2img = self.txt2img();
        let (batch, iterations) = txt2img.checked_batch(limits)?;
        if self.resize_mode.is_some_and(|m| m != 0) {
            return Err(ApiError::invalid(
                "resize_mode",
                "only 0 (\"just resize\") is available: the image is resized to the size asked \
                 for",
            ));
        }
        let invert = match self.inpainting_mask_invert {
            None | Some(0) => false,
            Some(1) => true,
            Some(v) => {
                return Err(ApiError::invalid(
                    "inpainting_mask_invert",
                    format!("must be 0 or 1; got {v}"),
                ));
            }
        };
        let blur = self.mask_blur.unwrap_or(DEFAULT_MASK_BLUR);
        let (blur_x, blur_y) = (
            self.mask_blur_x.unwrap_or(blur),
            self.mask_blur_y.unwrap_or(blur),
        );
        for (field, v) in [
            ("mask_blur", self.mask_blur),
            ("mask_blur_x", self.mask_blur_x),
            ("mask_blur_y", self.mask_blur_y),
        ] {
            if let Some(v) = v
                && v > MAX_MASK_BLUR
            {
                return Err(ApiError::invalid(
                    field,
                    format!("must be a whole number from 0 to {MAX_MASK_BLUR}; got {v}"),
                ));
            }
        }
        let [image] = self.init_images.as_slice() else {
            return Err(ApiError::invalid(
                "init_images",
                format!(
                    "holds {} images; send exactly one image to edit",
                    self.init_images.len()
                ),
            ));
        };
        let (prompt, loras) = prompt_lora_tags(&self.prompt)?;
        let image = picture::base64_file("init_images", image)?;
        let mask = self
            .mask
            .as_deref()
            .map(|m| picture::base64_file("mask", m))
            .transpose()?;
        let upload = EditUpload::probe(
            "init_images",
            &image,
            mask.as_deref().map(|bytes| MaskUpload {
                field: "mask",
                bytes,
                rule: MaskRule::A1111 {
                    invert,
                    blur_x,
                    blur_y,
                },
            }),
        )?;
        let mut first = upload
            .resolve_sampling(txt2img.sampling(&prompt, &loras)?, limits, || {
                random_seed().min(MAX_RANDOM_SEED)
            })
            .map_err(a1111_field)?;
        let strength = self
            .denoising_strength
            .unwrap_or(DEFAULT_DENOISING_STRENGTH);
        first.edit = Some(upload.prepare(&first, "denoising_strength", strength)?);
        Ok((fan_out(&first, batch * iterations), batch, iterations))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_json;

    /// (seeds, batch_size, n_iter), or (status, field).
    type Outcome = Result<(Vec<u64>, u32, u32), (u16, Option<String>)>;

    fn resolve(body: &str, random: u64) -> Outcome {
        let limits = crate::properties::limits();
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
        let limits = crate::properties::limits();
        let req: A1111Txt2ImgRequest =
            parse_json(br#"{"prompt":"a cat","seed":3,"batch_size":2}"#).unwrap_or_default();
        let (images, b, n) = req.resolve(&limits, || 0).unwrap_or_else(|e| panic!("{e}"));
        let (params, info) = describe(&images, b, n, &limits.model, &req.prompt);
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
