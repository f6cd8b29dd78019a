//! The bodies of `POST /v1/txt2img` ([`Txt2ImgRequest`], the body diffusers-based services
//! accept today) and `POST /v1/img2img` ([`Img2ImgRequest`], the same fields plus the image to
//! edit), validated into the [`GenParams`] of one image.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::adapters::{ControlRequest, LoraRequest, refuse_control_with_edit};
use crate::bounds::Limits;
use crate::edit::{DEFAULT_STRENGTH, EditUpload, MaskRule, MaskUpload};
use crate::error::ApiError;
use crate::output::Output;
use crate::params::GenParams;
use crate::picture;
use crate::sampling::Sampling;

/// `POST /v1/txt2img`: the body diffusers-based services accept today.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Txt2ImgRequest {
    /// What to draw (not empty, not only spaces).
    pub prompt: String,
    /// What to steer away from (used when guidance_scale > 1).
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Width in pixels, a multiple of 16 up to the model's limit.
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
    pub guidance_scale: Option<f64>,
    /// Seed of the initial noise (random when left out; the response reports it).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Also store the image (the server must have artifact storage): the image answer carries
    /// its URL in `X-Artifact-Url` (and its expiry, Unix seconds, in `X-Artifact-Expires`),
    /// the JSON answer in `url` and `expires_at`.
    #[serde(default)]
    pub store: Option<bool>,
    /// `png` (the default), `jpeg` or `webp` (lossless); left out, the first of
    /// `image/png`, `image/jpeg`, `image/webp` the `Accept` header names.
    #[serde(default)]
    pub output_format: Option<String>,
    /// JPEG quality from 0 to 100 (default 100); PNG and WebP are lossless.
    #[serde(default)]
    pub output_compression: Option<u32>,
    /// Skip-layer guidance: the transformer blocks skipped in its extra pass (`[]` turns it
    /// off); left out, the model's default (`/v1/models`: `defaults.skip_layer_guidance`).
    /// It applies with classifier-free guidance (guidance_scale > 1).
    #[serde(default)]
    pub slg_layers: Option<Vec<u32>>,
    /// LoRA adapters to apply, each a served name with its scale (`GET /v1/models`:
    /// `adapters`).
    #[serde(default)]
    pub loras: Option<Vec<LoraRequest>>,
    /// A ControlNet condition (`GET /v1/models`: `control_modes`).
    #[serde(default)]
    pub control: Option<ControlRequest>,
}

impl Txt2ImgRequest {
    /// Validates the request.
    pub fn resolve(
        &self,
        limits: &Limits,
        random_seed: impl FnOnce() -> u64,
    ) -> Result<GenParams, ApiError> {
        self.output(None)?;
        self.sampling().resolve(limits, random_seed)
    }

    /// The sampling fields.
    pub fn sampling(&self) -> Sampling<'_> {
        Sampling {
            prompt: &self.prompt,
            negative_prompt: self.negative_prompt.as_deref(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            seed: self.seed,
            slg_layers: self.slg_layers.as_deref(),
            loras: self.loras.as_deref().unwrap_or_default(),
            control: self.control.as_ref(),
        }
    }

    /// The format the image is answered in: `output_format`, else the `Accept` header's.
    pub fn output(&self, accept: Option<&str>) -> Result<Output, ApiError> {
        Output::resolve(
            self.output_format.as_deref(),
            self.output_compression,
            accept,
        )
    }
}

/// `POST /v1/img2img`: `/v1/txt2img`'s body plus the image to edit (and a mask) in base64;
/// answered like `/v1/txt2img`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Img2ImgRequest {
    /// What the edited image shows (not empty, not only spaces).
    pub prompt: String,
    /// The image to edit: a PNG, JPEG or WebP file in base64 (a `data:` URL too). Its EXIF
    /// orientation is applied; its alpha channel is dropped.
    pub image: String,
    /// Where to repaint: an image of the image's size in base64, white where to repaint (its
    /// grey level at least 128, as diffusers reads masks); left out, the whole image is
    /// edited (img2img).
    #[serde(default)]
    pub mask: Option<String>,
    /// How much of the schedule runs, above 0 and at most 1 (default 0.6, diffusers'): 1
    /// draws (the masked region) anew, less keeps more of the image.
    #[serde(default)]
    pub strength: Option<f64>,
    /// What to steer away from (used when guidance_scale > 1).
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Width in pixels, a multiple of 16 up to the model's limit; left out, the image's
    /// width rounded down to a multiple of 16. The image is resized to the size asked for.
    #[serde(default)]
    pub width: Option<u32>,
    /// Height in pixels, likewise.
    #[serde(default)]
    pub height: Option<u32>,
    /// Denoising steps of the whole schedule; an edit runs the last `strength` of them.
    #[serde(default)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale (≤ 1 disables guidance).
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    /// Seed of the initial noise (random when left out; the response reports it).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Also store the image, as `/v1/txt2img`'s `store`.
    #[serde(default)]
    pub store: Option<bool>,
    /// `png` (the default), `jpeg` or `webp` (lossless); left out, the `Accept` header's.
    #[serde(default)]
    pub output_format: Option<String>,
    /// JPEG quality from 0 to 100 (default 100); PNG and WebP are lossless.
    #[serde(default)]
    pub output_compression: Option<u32>,
    /// Skip-layer guidance blocks, as `/v1/txt2img`'s.
    #[serde(default)]
    pub slg_layers: Option<Vec<u32>>,
    /// LoRA adapters, as `/v1/txt2img`'s.
    #[serde(default)]
    pub loras: Option<Vec<LoraRequest>>,
    /// Refused with a 422: a ControlNet condition does not combine with an image to edit.
    #[serde(default)]
    pub control: Option<ControlRequest>,
}

impl Img2ImgRequest {
    /// The format the image is answered in: `output_format`, else the `Accept` header's.
    pub fn output(&self, accept: Option<&str>) -> Result<Output, ApiError> {
        Output::resolve(
            self.output_format.as_deref(),
            self.output_compression,
            accept,
        )
    }

    /// Validates the request; the image and mask decoded and at the request's size.
    pub fn resolve(
        &self,
        limits: &Limits,
        random_seed: impl FnOnce() -> u64,
    ) -> Result<GenParams, ApiError> {
        self.output(None)?;
        refuse_control_with_edit(self.control.as_ref())?;
        let image = picture::base64_file("image", &self.image)?;
        let mask = self
            .mask
            .as_deref()
            .map(|m| picture::base64_file("mask", m))
            .transpose()?;
        let upload = EditUpload::probe(
            "image",
            &image,
            mask.as_deref().map(|bytes| MaskUpload {
                field: "mask",
                bytes,
                rule: MaskRule::White,
            }),
        )?;
        let mut params = upload.resolve_sampling(
            Sampling {
                prompt: &self.prompt,
                negative_prompt: self.negative_prompt.as_deref(),
                width: self.width,
                height: self.height,
                steps: self.steps,
                guidance_scale: self.guidance_scale,
                seed: self.seed,
                slg_layers: self.slg_layers.as_deref(),
                loras: self.loras.as_deref().unwrap_or_default(),
                control: None,
            },
            limits,
            random_seed,
        )?;
        let strength = self.strength.unwrap_or(DEFAULT_STRENGTH);
        params.edit = Some(upload.prepare(&params, "strength", strength)?);
        Ok(params)
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;
    use crate::edit::tests::png;
    use crate::parse::parse_json;
    use crate::properties::limits;

    fn field_of(body: &str) -> Option<String> {
        match parse_json::<Txt2ImgRequest>(body.as_bytes()) {
            Ok(r) => r.resolve(&limits(), || 7).err().and_then(|e| e.field),
            Err(e) => e.field,
        }
    }

    #[test]
    fn every_bad_field_is_named() {
        for (body, field) in [
            (r#"{"prompt":"a","wdth":64}"#, "wdth"),
            (r#"{"prompt":"a","width":"x"}"#, "width"),
            (r#"{"width":64}"#, "prompt"),
            (r#"{"prompt":" "}"#, "prompt"),
            (r#"{"prompt":"a","width":65}"#, "width"),
            (r#"{"prompt":"a","height":512}"#, "height"),
            (r#"{"prompt":"a","steps":0}"#, "steps"),
            (r#"{"prompt":"a","steps":51}"#, "steps"),
            (r#"{"prompt":"a","guidance_scale":31}"#, "guidance_scale"),
            (r#"{"prompt":"a","seed":-1}"#, "seed"),
        ] {
            assert_eq!(field_of(body).as_deref(), Some(field), "{body}");
        }
        let long = format!(
            r#"{{"prompt":"a","negative_prompt":"{}"}}"#,
            "x".repeat(101)
        );
        assert_eq!(field_of(&long).as_deref(), Some("negative_prompt"));
        assert_eq!(field_of(r#"{"prompt":"a"}"#), None);
    }

    #[test]
    fn defaults_and_seed_are_filled() {
        let r: Txt2ImgRequest = parse_json(br#"{"prompt":"a cat"}"#).unwrap_or_default();
        let p = r.resolve(&limits(), || 42).map_err(|e| e.message);
        assert_eq!(
            p.map(|p| (p.width, p.height, p.steps, p.seed)),
            Ok((64, 64, 4, 42))
        );
    }

    #[test]
    fn img2img_reads_base64_and_white_masks() {
        let image = png(64, 48, None);
        // White on the right half, transparent everywhere (the alpha is ignored).
        let mut mask = Vec::new();
        image::DynamicImage::ImageRgba8(image::ImageBuffer::from_fn(64, 48, |x, _| {
            let v = if x >= 32 { 255 } else { 0 };
            image::Rgba([v, v, v, 0])
        }))
        .write_to(
            &mut std::io::Cursor::new(&mut mask),
            image::ImageFormat::Png,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let body = serde_json::json!({
            "prompt": "a cat",
            "image": format!("data:image/png;base64,{}", b64(&image)),
            "mask": b64(&mask),
            "strength": 0.5,
        });
        let req: Img2ImgRequest = parse_json(body.to_string().as_bytes()).unwrap_or_default();
        let p = req
            .resolve(&crate::properties::limits(), || 1)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((p.width, p.height), (64, 48));
        let e = p.edit.unwrap_or_else(|| panic!("no edit"));
        let m = e.mask.unwrap_or_else(|| panic!("no mask"));
        assert_eq!(m.grey.iter().filter(|&&g| g >= 128).count(), 32 * 48);
        assert_eq!(e.strength, 0.5);
        assert_eq!(e.image.rgb[..3], [0, 0, 200]);
        let bad = serde_json::json!({"prompt": "a", "image": "%%%"});
        let req: Img2ImgRequest = parse_json(bad.to_string().as_bytes()).unwrap_or_default();
        assert_eq!(
            req.resolve(&crate::properties::limits(), || 1)
                .err()
                .map(|e| (e.status.as_u16(), e.field)),
            Some((400, Some("image".into())))
        );
    }

    #[test]
    fn a_model_without_the_vae_encoder_refuses_edits_up_front() {
        let mut limits = crate::properties::limits();
        limits.model.served.image_editing = false;
        let req = Img2ImgRequest {
            prompt: "a".into(),
            image: base64::engine::general_purpose::STANDARD.encode(png(32, 32, None)),
            ..Default::default()
        };
        let e = req.resolve(&limits, || 1).err();
        assert_eq!(
            e.map(|e| (e.status.as_u16(), e.field)),
            Some((422, Some("image".into())))
        );
    }
}
