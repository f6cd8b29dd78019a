//! `POST /v1/images/edits`: the OpenAI Images API edit form (`multipart/form-data`), its
//! fields read as their JSON types, validated into one [`GenParams`] per image.

use http::StatusCode;
use schemars::JsonSchema;

use crate::adapters::{ControlRequest, LoraRequest, form_json, refuse_control_with_edit};
use crate::bounds::Limits;
use crate::edit::{DEFAULT_MASKED_STRENGTH, DEFAULT_STRENGTH, EditUpload, MaskRule, MaskUpload};
use crate::error::ApiError;
use crate::multipart::Part;
use crate::openai::{Delivery, Shape, openai_delivery, size_field};
use crate::output::Output;
use crate::params::GenParams;
use crate::sampling::{Sampling, fan_out};

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
    /// Our extension: LoRA adapters to apply, as the JSON text of `/v1/images/generations`'
    /// `loras` (`[{"name": "style", "scale": 0.8}]`).
    pub loras: Option<Vec<LoraRequest>>,
    /// Refused with a 422: a ControlNet condition (JSON text) does not combine with an image
    /// to edit.
    pub control: Option<ControlRequest>,
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
    "loras",
    "control",
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
                "loras" => req.loras = Some(form_json(&part.name, part.text()?)?),
                "control" => req.control = Some(form_json(&part.name, part.text()?)?),
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
        let Shape { n, size, max_seed } = Shape::check(
            limits,
            self.n,
            || {
                self.delivery()?;
                self.output().map(drop)
            },
            self.model.as_deref(),
            self.size.as_deref(),
            self.seed,
        )?;
        refuse_control_with_edit(self.control.as_ref())?;
        let upload = EditUpload::probe(
            "image",
            &self.image,
            self.mask.as_deref().map(|bytes| MaskUpload {
                field: "mask",
                bytes,
                rule: MaskRule::Transparent,
            }),
        )?;
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
                    loras: self.loras.as_deref().unwrap_or_default(),
                    control: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edit::tests::png;
    use crate::multipart;

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
                vec![("image", &image), ("prompt", b"a"), ("loras", b"style")],
                400,
                "loras",
            ),
            (
                vec![
                    ("image", &image),
                    ("prompt", b"a"),
                    ("loras", br#"[{"name":"anime"}]"#),
                ],
                422,
                "loras",
            ),
            (
                vec![
                    ("image", &image),
                    ("prompt", b"a"),
                    ("control", br#"{"mode":"canny","image":"x"}"#),
                ],
                422,
                "control",
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
        // Adapters as JSON text, with the served default scale.
        let body = form(&[
            ("image", &image),
            ("prompt", b"a cat"),
            (
                "loras",
                br#"[{"name":"detail","scale":1.5},{"name":"style"}]"#,
            ),
        ]);
        let images = multipart::parse("b", &body)
            .and_then(|parts| ImageEditRequest::from_form(&parts))
            .and_then(|r| r.resolve(&crate::properties::limits(), || 9))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            images[0].loras,
            [("detail".to_owned(), 1.5), ("style".to_owned(), 0.8)]
        );
        // An image too small for the smallest size.
        let tiny = png(10, 10, None);
        assert_eq!(
            err(&[("image", &tiny), ("prompt", b"a")]),
            Some((422, Some("image".into())))
        );
    }
}
