//! The OpenAI Images API body of `POST /v1/images/generations` ([`ImagesRequest`]) and what
//! the OpenAI routes share: how the images are delivered (inline or stored, streamed or not)
//! and the `size` field.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::adapters::{ControlRequest, LoraRequest};
use crate::bounds::{Bounds, Limits, max_first_seed};
use crate::error::ApiError;
use crate::output::Output;
use crate::params::GenParams;
use crate::sampling::{Sampling, check_first_seed, check_model, fan_out};

/// Largest `partial_images` of a streamed generation (the OpenAI Images API's limit).
pub const MAX_PARTIAL_IMAGES: u32 = 3;

/// How `POST /v1/images/generations` hands the images back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    /// Inline, base64 PNG.
    B64Json,
    /// Stored; the answer carries an expiring URL per image.
    Url,
}

/// How a request to `POST /v1/images/generations` is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Inline or stored.
    pub format: ResponseFormat,
    /// Streamed as server-sent events with this many partial images, or one JSON answer.
    pub stream: Option<u32>,
}

/// `POST /v1/images/generations`: the OpenAI Images API body, plus our sampling fields.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImagesRequest {
    /// What to draw (not empty, not only spaces).
    pub prompt: String,
    /// Number of images.
    #[serde(default)]
    pub n: Option<u32>,
    /// `"WxH"`, e.g. `"1024x1024"`; each side a multiple of 16 up to the model's limit.
    #[serde(default)]
    pub size: Option<String>,
    /// `b64_json` (the default: the PNG inline) or `url` (the image is stored and the answer
    /// carries a URL that expires; the server must have artifact storage).
    #[serde(default)]
    pub response_format: Option<String>,
    /// One of the served model names (`GET /v1/models`); left out, the served model.
    #[serde(default)]
    pub model: Option<String>,
    /// Accepted for compatibility and ignored.
    #[serde(default)]
    pub user: Option<String>,
    /// What to steer away from.
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    #[serde(default)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale.
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    /// Seed of the first image; image `i` uses `seed + i`, so `seed + n - 1` must fit in
    /// 64 bits (seeds never wrap around; a larger seed is a 422 naming `seed`).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Answer with server-sent events (`text/event-stream`): `image_generation.partial_image`
    /// events with previews while sampling, then `image_generation.completed` with the image
    /// (one image: `n` must be 1; inline: `response_format` must be `b64_json`).
    #[serde(default)]
    pub stream: Option<bool>,
    /// Previews streamed before the image (with `stream: true`), spread evenly over the
    /// sampling steps; fewer when there are too few steps.
    #[serde(default)]
    pub partial_images: Option<u32>,
    /// `png` (the default), `jpeg` or `webp` (lossless).
    #[serde(default)]
    pub output_format: Option<String>,
    /// JPEG quality from 0 to 100 (default 100); PNG and WebP are lossless.
    #[serde(default)]
    pub output_compression: Option<u32>,
    /// Our extension: LoRA adapters to apply, each a served name with its scale
    /// (`GET /v1/models`: `adapters`).
    #[serde(default)]
    pub loras: Option<Vec<LoraRequest>>,
    /// Our extension: a ControlNet condition (`GET /v1/models`: `control_modes`).
    #[serde(default)]
    pub control: Option<ControlRequest>,
}

/// The pattern every `size` matches (the digits are ASCII): `WIDTHxHEIGHT`, or `auto`.
pub const SIZE_PATTERN: &str = "^([0-9]+[xX][0-9]+|auto)$";

/// Parses an OpenAI `size` (`"WxH"`: ASCII digits, `x` or `X`, ASCII digits).
pub fn parse_size(size: &str) -> Result<(u32, u32), ApiError> {
    let bad = || {
        ApiError::invalid(
            "size",
            format!("`{size}` is not WIDTHxHEIGHT, e.g. \"1024x1024\""),
        )
    };
    let (w, h) = size.split_once(['x', 'X']).ok_or_else(bad)?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(w) || !digits(h) {
        return Err(bad());
    }
    let side = |s: &str| {
        s.parse::<u32>().map_err(|_| {
            ApiError::invalid(
                "size",
                format!("`{size}`: {s} is far larger than any model"),
            )
        })
    };
    Ok((side(w)?, side(h)?))
}

/// How an OpenAI images request is answered: inline or stored, streamed or not; a
/// combination the API does not define is a 422 naming the field.
pub fn openai_delivery(
    response_format: Option<&str>,
    stream: Option<bool>,
    partial_images: Option<u32>,
    n: Option<u32>,
) -> Result<Delivery, ApiError> {
    let format = match response_format {
        None | Some("b64_json") => ResponseFormat::B64Json,
        Some("url") => ResponseFormat::Url,
        Some(other) => {
            return Err(ApiError::invalid(
                "response_format",
                format!("`{other}` is not supported; use \"b64_json\" or \"url\""),
            ));
        }
    };
    if let Some(p) = partial_images
        && p > MAX_PARTIAL_IMAGES
    {
        return Err(ApiError::invalid(
            "partial_images",
            format!("must be a whole number from 0 to {MAX_PARTIAL_IMAGES}; got {p}"),
        ));
    }
    if stream != Some(true) {
        if partial_images.is_some_and(|p| p > 0) {
            return Err(ApiError::invalid(
                "partial_images",
                "partial images are streamed: send `stream: true` with them",
            ));
        }
        return Ok(Delivery {
            format,
            stream: None,
        });
    }
    if n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            "n",
            "a streamed generation makes one image: `n` must be 1 with `stream: true`",
        ));
    }
    if format == ResponseFormat::Url {
        return Err(ApiError::invalid(
            "response_format",
            "streamed images are sent inline: use \"b64_json\" with `stream: true`",
        ));
    }
    Ok(Delivery {
        format,
        stream: Some(partial_images.unwrap_or(0)),
    })
}

/// What an OpenAI Images request (a generation or an edit) asks for before sampling.
pub(crate) struct Shape {
    /// The number of images.
    pub n: u32,
    /// The size, when one is given (not `auto`).
    pub size: Option<(u32, u32)>,
    /// The largest first seed that leaves room for `n` seeds.
    pub max_seed: u64,
}

impl Shape {
    /// Checks, in this order: `n`, what `formats` checks (the delivery and the output
    /// format), the model name, `size`, and that `n` seeds from `seed` on fit.
    pub(crate) fn check(
        limits: &Limits,
        n: Option<u32>,
        formats: impl FnOnce() -> Result<(), ApiError>,
        model: Option<&str>,
        size: Option<&str>,
        seed: Option<u64>,
    ) -> Result<Self, ApiError> {
        let bounds: Bounds = limits.bounds();
        let n = bounds.images.check("n", n.unwrap_or(1))?;
        formats()?;
        if let Some(m) = model {
            check_model(m, &limits.model)?;
        }
        let size = openai_size(size, &bounds)?;
        check_first_seed(seed, n)?;
        Ok(Self {
            n,
            size,
            max_seed: max_first_seed(n),
        })
    }
}

/// An OpenAI `size` checked against the bounds: `(width, height)`, or `None` for a size left
/// out or `auto` (the default).
pub fn openai_size(size: Option<&str>, bounds: &Bounds) -> Result<Option<(u32, u32)>, ApiError> {
    let Some(s) = size.filter(|s| *s != "auto") else {
        return Ok(None);
    };
    let (w, h) = parse_size(s)?;
    let side = |v| {
        bounds.size.check("size", v).map_err(|e| ApiError {
            message: format!("`{s}`: each side {}", e.message),
            ..e
        })
    };
    Ok(Some((side(w)?, side(h)?)))
}

/// The OpenAI routes have no width or height: their `size` says both.
pub fn size_field(e: ApiError) -> ApiError {
    match e.field.as_deref() {
        Some("width" | "height") => e.with_field("size"),
        _ => e,
    }
}

impl ImagesRequest {
    /// How the request is answered: inline or stored, streamed or not; a combination the API
    /// does not define is a 422 naming the field.
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

    /// Validates the request into one parameter set per image (seeds `seed`, `seed + 1`, …).
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
        let first = Sampling {
            prompt: &self.prompt,
            negative_prompt: self.negative_prompt.as_deref(),
            width: size.map(|s| s.0),
            height: size.map(|s| s.1),
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            seed: self.seed,
            slg_layers: None,
            loras: self.loras.as_deref().unwrap_or_default(),
            control: self.control.as_ref(),
        }
        .resolve(limits, || random_seed().min(max_seed))
        .map_err(size_field)?;
        Ok(fan_out(&first, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_json;
    use crate::properties::limits;

    /// (width, height, seed) of each image, or (status, field).
    type Outcome = Result<Vec<(u32, u32, u64)>, (u16, Option<String>)>;

    fn images(body: &str, random: u64) -> Outcome {
        parse_json::<ImagesRequest>(body.as_bytes())
            .and_then(|r| r.resolve(&limits(), || random))
            .map(|v| {
                v.iter()
                    .map(|p| (p.width, p.height, p.seed))
                    .collect::<Vec<_>>()
            })
            .map_err(|e| (e.status.as_u16(), e.field))
    }

    #[test]
    fn openai_shape_is_checked() {
        let run = |body: &str| images(body, 1);
        assert_eq!(
            run(r#"{"prompt":"a","n":2,"size":"32x48","seed":5}"#),
            Ok(vec![(32, 48, 5), (32, 48, 6)])
        );
        assert_eq!(run(r#"{"prompt":"a","n":5}"#), Err((422, Some("n".into()))));
        for size in [
            "big",
            "16 x 16",
            "x16",
            "16x",
            "١٦x16",
            "16x16x16",
            "99999999999x16",
        ] {
            let body = format!(r#"{{"prompt":"a","size":"{size}"}}"#);
            assert_eq!(run(&body), Err((422, Some("size".into()))), "{size}");
        }
        assert_eq!(
            run(r#"{"prompt":"a","response_format":"png"}"#),
            Err((422, Some("response_format".into())))
        );
        assert_eq!(
            run(r#"{"prompt":"a","response_format":"url","seed":1}"#),
            Ok(vec![(64, 64, 1)])
        );
        assert_eq!(
            run(r#"{"prompt":"a","model":"dall-e-3"}"#),
            Err((404, Some("model".into())))
        );
        assert_eq!(
            run(r#"{"prompt":"a","quality":"hd"}"#),
            Err((400, Some("quality".into())))
        );
    }

    #[test]
    fn streaming_is_one_inline_image_with_up_to_three_previews() {
        let delivery = |body: &str| {
            parse_json::<ImagesRequest>(body.as_bytes())
                .and_then(|r| r.delivery())
                .map_err(|e| (e.status.as_u16(), e.field))
        };
        assert_eq!(
            delivery(r#"{"prompt":"a","stream":true,"partial_images":2}"#),
            Ok(Delivery {
                format: ResponseFormat::B64Json,
                stream: Some(2)
            })
        );
        assert_eq!(
            delivery(r#"{"prompt":"a","stream":true}"#).map(|d| d.stream),
            Ok(Some(0))
        );
        assert_eq!(
            delivery(r#"{"prompt":"a","stream":false,"response_format":"url"}"#),
            Ok(Delivery {
                format: ResponseFormat::Url,
                stream: None
            })
        );
        for (body, field) in [
            (
                r#"{"prompt":"a","stream":true,"partial_images":4}"#,
                "partial_images",
            ),
            (r#"{"prompt":"a","partial_images":1}"#, "partial_images"),
            (r#"{"prompt":"a","stream":true,"n":2}"#, "n"),
            (
                r#"{"prompt":"a","stream":true,"response_format":"url"}"#,
                "response_format",
            ),
        ] {
            assert_eq!(delivery(body), Err((422, Some(field.into()))), "{body}");
            assert_eq!(
                images(body, 0),
                Err((422, Some(field.into()))),
                "resolve refuses {body} too"
            );
        }
    }

    #[test]
    fn seeds_never_wrap() {
        let max = u64::MAX;
        assert_eq!(
            images(&format!(r#"{{"prompt":"a","seed":{max}}}"#), 0),
            Ok(vec![(64, 64, max)])
        );
        assert_eq!(
            images(&format!(r#"{{"prompt":"a","n":2,"seed":{max}}}"#), 0),
            Err((422, Some("seed".into())))
        );
        assert_eq!(
            images(&format!(r#"{{"prompt":"a","n":4,"seed":{}}}"#, max - 3), 0),
            Ok(vec![
                (64, 64, max - 3),
                (64, 64, max - 2),
                (64, 64, max - 1),
                (64, 64, max)
            ])
        );
        // A random first seed is drawn so that the last one still fits.
        let drawn = images(r#"{"prompt":"a","n":3}"#, max).unwrap_or_default();
        assert_eq!(drawn.last().map(|p| p.2), Some(max));
    }
}
