//! Image editing requests — img2img, and inpainting with a mask — and how an uploaded image
//! and mask become the [`EditParams`] of a request.
//!
//! Two bodies here, a third in [`crate::sdapi`]: the OpenAI `POST /v1/images/edits` form
//! ([`ImageEditRequest`], `multipart/form-data`) and `POST /v1/img2img` ([`Img2ImgRequest`],
//! `/v1/txt2img`'s JSON plus the image and mask in base64).
//!
//! The order of the checks keeps a bad request cheap: the form's fields, then the image's and
//! the mask's headers (format, claimed size, the mask's size against the image's), then the
//! sampling fields against the bounds and the memory plan (the size defaults to the image's),
//! then `strength` against the steps, and only then are the files decoded and resized.
//!
//! Sizes: a side a request leaves out is the image's, rounded down to a multiple of 16; an
//! image of another size than the request's is resized to it with Lanczos (a = 3), the aspect
//! ratio not kept, as diffusers' `VaeImageProcessor` does; the mask likewise, then binarised
//! at half scale by the pipeline.

use std::sync::Arc;

use base64::Engine as _;
use http::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::bounds::{Bounds, Limits, SIZE_MULTIPLE, max_first_seed};
use crate::error::ApiError;
use crate::multipart::Part;
use crate::output::Output;
use crate::params::{EditParams, GenParams, first_step};
use crate::picture::{self, Header, Mask};
use crate::request::{
    Delivery, Sampling, check_first_seed, check_model, fan_out, openai_delivery, openai_size,
    size_field,
};

/// `strength` of `/v1/img2img`, and of `/v1/images/edits` without a mask, when left out
/// (diffusers' default).
pub const DEFAULT_STRENGTH: f64 = 0.6;
/// `strength` of `/v1/images/edits` with a mask when left out: the masked region is drawn
/// anew, as OpenAI's edits do.
pub const DEFAULT_MASKED_STRENGTH: f64 = 1.0;
/// Largest `mask_blur` (pixels).
pub const MAX_MASK_BLUR: u32 = 64;

/// How an uploaded mask says where to repaint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskRule {
    /// OpenAI's: fully transparent pixels (alpha 0) are repainted; a mask without an alpha
    /// channel is refused.
    Transparent,
    /// diffusers': white is repainted (the grey level, PIL's `convert("L")`, at least 128);
    /// any alpha channel is ignored.
    White,
    /// AUTOMATIC1111's: a mask with transparency repaints where it is opaque (alpha above 128),
    /// any other where it is white; inverted when asked (`255 − level`), then blurred
    /// ([`Mask::blurred`]) before it is resized and binarised.
    A1111 {
        /// `inpainting_mask_invert`.
        invert: bool,
        /// `mask_blur_x`, pixels.
        blur_x: u32,
        /// `mask_blur_y`, pixels.
        blur_y: u32,
    },
}

/// An uploaded mask and how to read it.
#[derive(Debug, Clone, Copy)]
pub struct MaskUpload<'a> {
    /// The field it came in.
    pub field: &'a str,
    /// The file.
    pub bytes: &'a [u8],
    /// How it says where to repaint.
    pub rule: MaskRule,
}

/// An image to edit as a request sent it, its headers read.
#[derive(Debug, Clone, Copy)]
pub struct EditUpload<'a> {
    /// The field the image came in.
    pub field: &'a str,
    /// The image file.
    pub bytes: &'a [u8],
    /// Its header.
    pub header: Header,
    /// The mask, when inpainting.
    pub mask: Option<MaskUpload<'a>>,
}

impl<'a> EditUpload<'a> {
    /// Reads the image's and the mask's headers (nothing is decoded): their formats and
    /// sizes are checked, and the mask must be the image's size.
    pub fn probe(
        field: &'a str,
        bytes: &'a [u8],
        mask: Option<MaskUpload<'a>>,
    ) -> Result<Self, ApiError> {
        let header = picture::probe(field, bytes)?;
        if let Some(m) = &mask {
            let mh = picture::probe(m.field, m.bytes)?;
            if (mh.width, mh.height) != (header.width, header.height) {
                return Err(ApiError::invalid(
                    m.field,
                    format!(
                        "is {}x{} but the image is {}x{}: send a mask of the image's size",
                        mh.width, mh.height, header.width, header.height
                    ),
                ));
            }
        }
        Ok(Self {
            field,
            bytes,
            header,
            mask,
        })
    }

    /// The size a request that leaves it out gets: the image's, each side rounded down to a
    /// multiple of 16.
    pub fn default_size(&self) -> Result<(u32, u32), ApiError> {
        let round = |v: u32| v - v % SIZE_MULTIPLE;
        let (w, h) = (round(self.header.width), round(self.header.height));
        if w == 0 || h == 0 {
            return Err(ApiError::invalid(
                self.field,
                format!(
                    "is {}x{}; an image to edit needs at least {SIZE_MULTIPLE} pixels a side",
                    self.header.width, self.header.height
                ),
            ));
        }
        Ok((w, h))
    }

    /// Validates `sampling` with the sides it leaves out taken from the image; an error about
    /// the size says where the size came from.
    pub fn resolve_sampling(
        &self,
        mut sampling: Sampling<'_>,
        limits: &Limits,
        random_seed: impl FnOnce() -> u64,
    ) -> Result<GenParams, ApiError> {
        if !limits.model.image_editing {
            return Err(ApiError::invalid(
                self.field,
                "this model's VAE has no encoder, so it cannot edit images (only generate them)",
            ));
        }
        let (w, h) = self.default_size()?;
        let defaulted = sampling.width.is_none() || sampling.height.is_none();
        sampling.width = sampling.width.or(Some(w));
        sampling.height = sampling.height.or(Some(h));
        sampling.resolve(limits, random_seed).map_err(|e| {
            if defaulted && matches!(e.field.as_deref(), Some("width" | "height")) {
                ApiError {
                    message: format!(
                        "{} (the size defaults to the image's, {}x{} rounded down to a multiple \
                         of {SIZE_MULTIPLE}; ask for a size and the image is resized to it)",
                        e.message, self.header.width, self.header.height
                    ),
                    ..e
                }
            } else {
                e
            }
        })
    }

    /// Checks `strength` against the request's steps, then decodes the image and the mask and
    /// brings them to the request's size.
    pub fn prepare(
        &self,
        params: &GenParams,
        strength_field: &str,
        strength: f64,
    ) -> Result<EditParams, ApiError> {
        check_strength(strength_field, strength, params.steps)?;
        let (width, height) = (params.width, params.height);
        let image = picture::decode(self.field, self.bytes)?
            .picture
            .resized(width, height);
        let mask = match &self.mask {
            Some(m) => Some(Arc::new(read_mask(m)?.resized(width, height))),
            None => None,
        };
        Ok(EditParams {
            image: Arc::new(image),
            mask,
            strength,
        })
    }
}

/// `strength` in (0, 1], and enough of it that at least one of `steps` runs.
pub fn check_strength(field: &str, strength: f64, steps: u32) -> Result<(), ApiError> {
    if !(strength.is_finite() && strength > 0.0 && strength <= 1.0) {
        return Err(ApiError::invalid(
            field,
            format!("must be above 0 and at most 1; got {strength}"),
        ));
    }
    if first_step(steps, strength) >= steps {
        return Err(ApiError::invalid(
            field,
            format!(
                "{strength} of {steps} steps runs none of them: raise {field} or steps \
                 (steps × {field} must reach 1)"
            ),
        ));
    }
    Ok(())
}

/// The mask an upload describes, at the upload's size.
fn read_mask(m: &MaskUpload<'_>) -> Result<Mask, ApiError> {
    let decoded = picture::decode(m.field, m.bytes)?;
    let (width, height) = (decoded.picture.width, decoded.picture.height);
    let grey = match m.rule {
        MaskRule::Transparent => {
            let Some(alpha) = decoded.alpha else {
                return Err(ApiError::invalid(
                    m.field,
                    "has no alpha channel: the mask is a PNG whose fully transparent pixels \
                     (alpha 0) mark where to repaint",
                ));
            };
            alpha
                .iter()
                .map(|&a| if a == 0 { 255 } else { 0 })
                .collect()
        }
        MaskRule::White => decoded.picture.grey(),
        MaskRule::A1111 { .. } => match decoded.alpha {
            Some(alpha) if alpha.iter().any(|&a| a != 255) => alpha
                .iter()
                .map(|&a| if a > 128 { 255 } else { 0 })
                .collect(),
            _ => decoded.picture.grey(),
        },
    };
    let mut mask = Mask {
        width,
        height,
        grey,
    };
    if let MaskRule::A1111 {
        invert,
        blur_x,
        blur_y,
    } = m.rule
    {
        if invert {
            mask = mask.inverted();
        }
        mask = mask.blurred(blur_x, blur_y);
    }
    Ok(mask)
}

/// An image sent as base64 in a JSON body (a `data:` URL's prefix, white space and missing
/// padding are accepted); a 400 naming the field when it is not base64.
pub fn base64_file(field: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let body = match text.trim_start().strip_prefix("data:") {
        Some(url) => url
            .split_once(',')
            .filter(|(meta, _)| meta.ends_with(";base64"))
            .map(|(_, data)| data)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "is a data: URL that is not base64 (`data:image/png;base64,...` expected)",
                )
                .with_field(field)
            })?,
        None => text,
    };
    let compact: Vec<u8> = body.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if compact.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "is empty").with_field(field));
    }
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(&compact).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("is not base64 (standard alphabet): {e}"),
        )
        .with_field(field)
    })
}

/// `POST /v1/images/edits` (OpenAI Images API, `multipart/form-data`): the image to edit, an
/// optional mask, and the generation fields, plus our sampling fields as extra form fields.
/// Text fields are read as their JSON types: whole numbers, numbers, `true` / `false`.
#[derive(Debug, Clone, Default, JsonSchema)]
pub struct ImageEditRequest {
    /// The image to edit: a PNG, JPEG or WebP file (`image`, or one `image[]`). Its EXIF
    /// orientation is applied; its alpha channel is dropped.
    #[schemars(with = "String")]
    pub image: Vec<u8>,
    /// Where to repaint: a PNG of the image's size whose fully transparent pixels (alpha 0)
    /// are repainted, as OpenAI's masks; left out, the whole image is edited (img2img).
    #[schemars(with = "Option<String>")]
    pub mask: Option<Vec<u8>>,
    /// What the edited image shows (not empty, not only spaces).
    pub prompt: String,
    /// Number of images.
    pub n: Option<u32>,
    /// `"WxH"`, e.g. `"1024x1024"`, or `auto`; left out or `auto`: the image's size rounded
    /// down to a multiple of 16. The image (and mask) are resized to it.
    pub size: Option<String>,
    /// `b64_json` (the default) or `url` (stored; the server must have artifact storage).
    pub response_format: Option<String>,
    /// One of the served model names (`GET /v1/models`); left out, the served model.
    pub model: Option<String>,
    /// Accepted for compatibility and ignored.
    pub user: Option<String>,
    /// `png` (the default), `jpeg` or `webp` (lossless).
    pub output_format: Option<String>,
    /// JPEG quality from 0 to 100 (default 100); PNG and WebP are lossless.
    pub output_compression: Option<u32>,
    /// Answer with server-sent events: `image_edit.partial_image` previews, then
    /// `image_edit.completed` (one image, inline).
    pub stream: Option<bool>,
    /// Previews streamed before the image (with `stream`).
    pub partial_images: Option<u32>,
    /// What to steer away from.
    pub negative_prompt: Option<String>,
    /// Denoising steps of the whole schedule; an edit runs the last `strength` of them.
    pub steps: Option<u32>,
    /// Classifier-free guidance scale.
    pub guidance_scale: Option<f64>,
    /// Seed of the first image's noise; image `i` uses `seed + i`.
    pub seed: Option<u64>,
    /// How much of the schedule runs, above 0 and at most 1: 1 draws (the masked region)
    /// anew, less keeps more of the image. Left out: 1 with a mask, 0.6 without.
    pub strength: Option<f64>,
}

/// The fields of [`ImageEditRequest`], as a form names them.
pub const EDIT_FORM_FIELDS: &[&str] = &[
    "image",
    "mask",
    "prompt",
    "n",
    "size",
    "response_format",
    "model",
    "user",
    "output_format",
    "output_compression",
    "stream",
    "partial_images",
    "negative_prompt",
    "steps",
    "guidance_scale",
    "seed",
    "strength",
];

fn form_error(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message).with_field(field)
}

fn form_int<T: std::str::FromStr>(part: &Part<'_>) -> Result<T, ApiError> {
    let text = part.text()?.trim();
    text.parse().map_err(|_| {
        form_error(
            &part.name,
            format!("`{}` is not a whole number in range", text.escape_debug()),
        )
    })
}

fn form_number(part: &Part<'_>) -> Result<f64, ApiError> {
    let text = part.text()?.trim();
    // JSON's numbers: no `inf`, `nan` or hexadecimal.
    let json_like = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b));
    match text.parse::<f64>() {
        Ok(v) if json_like && v.is_finite() => Ok(v),
        _ => Err(form_error(
            &part.name,
            format!("`{}` is not a number", text.escape_debug()),
        )),
    }
}

fn form_bool(part: &Part<'_>) -> Result<bool, ApiError> {
    match part.text()?.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(form_error(
            &part.name,
            format!("`{}` is not true or false", other.escape_debug()),
        )),
    }
}

impl ImageEditRequest {
    /// The request a form's parts make: every field at most once, each of its type; an
    /// unknown field is a 400 naming it.
    pub fn from_form(parts: &[Part<'_>]) -> Result<Self, ApiError> {
        let mut req = Self::default();
        let (mut image, mut prompt) = (false, false);
        for part in parts {
            match part.name.as_str() {
                "image" | "image[]" => {
                    if image {
                        return Err(ApiError::invalid(
                            "image",
                            "more than one image: an edit takes one image",
                        ));
                    }
                    image = true;
                    req.image = part.data.to_vec();
                }
                "mask" => req.mask = Some(part.data.to_vec()),
                "prompt" => {
                    prompt = true;
                    req.prompt = part.text()?.to_owned();
                }
                "n" => req.n = Some(form_int(part)?),
                "size" => req.size = Some(part.text()?.to_owned()),
                "response_format" => req.response_format = Some(part.text()?.to_owned()),
                "model" => req.model = Some(part.text()?.to_owned()),
                "user" => req.user = Some(part.text()?.to_owned()),
                "output_format" => req.output_format = Some(part.text()?.to_owned()),
                "output_compression" => req.output_compression = Some(form_int(part)?),
                "stream" => req.stream = Some(form_bool(part)?),
                "partial_images" => req.partial_images = Some(form_int(part)?),
                "negative_prompt" => req.negative_prompt = Some(part.text()?.to_owned()),
                "steps" => req.steps = Some(form_int(part)?),
                "guidance_scale" => req.guidance_scale = Some(form_number(part)?),
                "seed" => req.seed = Some(form_int(part)?),
                "strength" => req.strength = Some(form_number(part)?),
                other => {
                    return Err(form_error(
                        other,
                        format!(
                            "unknown field `{other}`; the form takes {}",
                            EDIT_FORM_FIELDS.join(", ")
                        ),
                    ));
                }
            }
        }
        if !image {
            return Err(form_error(
                "image",
                "missing: send the image to edit as the form's `image` file",
            ));
        }
        if !prompt {
            return Err(form_error("prompt", "missing field `prompt`"));
        }
        Ok(req)
    }

    /// How the request is answered.
    pub fn delivery(&self) -> Result<Delivery, ApiError> {
        openai_delivery(
            self.response_format.as_deref(),
            self.stream,
            self.partial_images,
            self.n,
        )
    }

    /// The format the images are answered in.
    pub fn output(&self) -> Result<Output, ApiError> {
        Output::resolve(self.output_format.as_deref(), self.output_compression, None)
    }

    /// Validates the request into one parameter set per image (seeds `seed`, `seed + 1`, …),
    /// the image and mask decoded and at the request's size.
    pub fn resolve(
        &self,
        limits: &Limits,
        random_seed: impl FnOnce() -> u64,
    ) -> Result<Vec<GenParams>, ApiError> {
        let bounds: Bounds = limits.bounds();
        let n = bounds.images.check("n", self.n.unwrap_or(1))?;
        self.delivery()?;
        self.output()?;
        if let Some(m) = &self.model {
            check_model(m, &limits.model)?;
        }
        let size = openai_size(self.size.as_deref(), &bounds)?;
        check_first_seed(self.seed, n)?;
        let upload = EditUpload::probe(
            "image",
            &self.image,
            self.mask.as_deref().map(|bytes| MaskUpload {
                field: "mask",
                bytes,
                rule: MaskRule::Transparent,
            }),
        )?;
        let max_seed = max_first_seed(n);
        let mut first = upload
            .resolve_sampling(
                Sampling {
                    prompt: &self.prompt,
                    negative_prompt: self.negative_prompt.as_deref(),
                    width: size.map(|s| s.0),
                    height: size.map(|s| s.1),
                    steps: self.steps,
                    guidance_scale: self.guidance_scale,
                    seed: self.seed,
                    slg_layers: None,
                },
                limits,
                || random_seed().min(max_seed),
            )
            .map_err(size_field)?;
        let strength = self.strength.unwrap_or(if self.mask.is_some() {
            DEFAULT_MASKED_STRENGTH
        } else {
            DEFAULT_STRENGTH
        });
        first.edit = Some(upload.prepare(&first, "strength", strength)?);
        Ok(fan_out(&first, n))
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
        let image = base64_file("image", &self.image)?;
        let mask = self
            .mask
            .as_deref()
            .map(|m| base64_file("mask", m))
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
    use super::*;
    use crate::multipart;

    pub(crate) fn png(width: u32, height: u32, alpha: Option<&dyn Fn(u32, u32) -> u8>) -> Vec<u8> {
        let mut out = Vec::new();
        let img = match alpha {
            Some(a) => image::DynamicImage::ImageRgba8(image::ImageBuffer::from_fn(
                width,
                height,
                |x, y| image::Rgba([(x * 8) as u8, (y * 8) as u8, 200, a(x, y)]),
            )),
            None => image::DynamicImage::ImageRgb8(image::ImageBuffer::from_fn(
                width,
                height,
                |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, 200]),
            )),
        };
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap_or_else(|e| panic!("{e}"));
        out
    }

    fn form(fields: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in fields {
            out.extend_from_slice(
                format!("--b\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n")
                    .as_bytes(),
            );
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"--b--\r\n");
        out
    }

    /// (width, height, strength, mask repainted pixels, seeds), or (status, field).
    type Outcome = Result<(u32, u32, f64, Option<usize>, Vec<u64>), (u16, Option<String>)>;

    fn edit(fields: &[(&str, &[u8])]) -> Outcome {
        let body = form(fields);
        multipart::parse("b", &body)
            .and_then(|parts| ImageEditRequest::from_form(&parts))
            .and_then(|r| r.resolve(&crate::properties::limits(), || 9))
            .map(|images| {
                let e = images[0].edit.clone().unwrap_or_else(|| panic!("no edit"));
                (
                    images[0].width,
                    images[0].height,
                    e.strength,
                    e.mask.map(|m| m.grey.iter().filter(|&&g| g >= 128).count()),
                    images.iter().map(|p| p.seed).collect(),
                )
            })
            .map_err(|e| (e.status.as_u16(), e.field))
    }

    #[test]
    fn an_openai_edit_takes_its_size_from_the_image_and_repaints_the_transparent_pixels() {
        let image = png(40, 33, None);
        let mask = png(40, 33, Some(&|x, _| if x < 10 { 0 } else { 255 }));
        assert_eq!(
            edit(&[("image", &image), ("prompt", b"a cat")]),
            Ok((32, 32, DEFAULT_STRENGTH, None, vec![9]))
        );
        // 32 of 40 columns kept, the size asked for is 16x16: a quarter repainted.
        assert_eq!(
            edit(&[
                ("image", &image),
                ("mask", &mask),
                ("prompt", b"a cat"),
                ("size", b"16x16"),
                ("n", b"2"),
                ("seed", b"4"),
            ]),
            Ok((16, 16, 1.0, Some(64), vec![4, 5]))
        );
        let err = |fields: &[(&str, &[u8])]| edit(fields).err();
        let opaque = png(40, 33, None);
        let small_mask = png(8, 8, Some(&|_, _| 0));
        for (fields, status, field) in [
            (vec![("prompt", b"a".as_slice())], 400, "image"),
            (vec![("image", image.as_slice())], 400, "prompt"),
            (
                vec![("image", b"not an image".as_slice()), ("prompt", b"a")],
                400,
                "image",
            ),
            (
                vec![("image", &image), ("mask", &small_mask), ("prompt", b"a")],
                422,
                "mask",
            ),
            (
                vec![("image", &image), ("mask", &opaque), ("prompt", b"a")],
                422,
                "mask",
            ),
            (
                vec![("image", &image), ("prompt", b"a"), ("strength", b"0")],
                422,
                "strength",
            ),
            (
                vec![("image", &image), ("prompt", b"a"), ("strength", b"1e-300")],
                422,
                "strength",
            ),
            (
                vec![("image", &image), ("prompt", b"a"), ("strength", b"nan")],
                400,
                "strength",
            ),
            (
                vec![("image", &image), ("prompt", b"a"), ("size", b"512x512")],
                422,
                "size",
            ),
            (
                vec![("image", &image), ("prompt", b"a"), ("quality", b"hd")],
                400,
                "quality",
            ),
            (
                vec![("image", &image), ("prompt", b"a"), ("n", b"two")],
                400,
                "n",
            ),
            (
                vec![
                    ("image", &image),
                    ("prompt", b"a"),
                    ("output_format", b"gif"),
                ],
                422,
                "output_format",
            ),
            (
                vec![
                    ("image", &image),
                    ("prompt", b"a"),
                    ("stream", b"true"),
                    ("n", b"2"),
                ],
                422,
                "n",
            ),
        ] {
            assert_eq!(
                err(&fields),
                Some((status, Some(field.to_owned()))),
                "{:?}",
                fields.iter().map(|f| f.0).collect::<Vec<_>>()
            );
        }
        // An image too small for the smallest size.
        let tiny = png(10, 10, None);
        assert_eq!(
            err(&[("image", &tiny), ("prompt", b"a")]),
            Some((422, Some("image".into())))
        );
    }

    #[test]
    fn a_model_without_the_vae_encoder_refuses_edits_up_front() {
        let mut limits = crate::properties::limits();
        limits.model.image_editing = false;
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
        let req: Img2ImgRequest =
            crate::request::parse_json(body.to_string().as_bytes()).unwrap_or_default();
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
        let req: Img2ImgRequest =
            crate::request::parse_json(bad.to_string().as_bytes()).unwrap_or_default();
        assert_eq!(
            req.resolve(&crate::properties::limits(), || 1)
                .err()
                .map(|e| (e.status.as_u16(), e.field)),
            Some((400, Some("image".into())))
        );
    }
}
