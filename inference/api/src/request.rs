//! The request bodies, their strict parsing, and their validation into one [`GenParams`] per
//! image.
//!
//! Parsing accepts exactly one JSON object — no unknown fields, nothing after it — and names
//! the offending field; validation checks every field against [`Bounds`] before anything is
//! queued.

use http::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::bounds::{Bounds, Limits, max_first_seed};
use crate::error::ApiError;
use crate::output::Output;
use crate::params::{GenParams, ModelInfo};

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
}

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
}

/// Parses a JSON body: exactly one JSON object (surrounding whitespace allowed), no unknown
/// fields. A bad body is a 400 naming the field when one is to blame.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(v) => v,
        Err(e) => return Err(deserialize_error(e)),
    };
    // Text after the object would be silently dropped: a client that concatenated two
    // bodies, or a proxy that mangled one, must hear about it.
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the body has more after its JSON object (line {}, column {}); send exactly one JSON object",
                e.line(),
                e.column()
            ),
        )
    })?;
    Ok(value)
}

fn deserialize_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let msg = inner.to_string();
    // serde reports an unknown field at the parent's path; name the field itself.
    let field = match msg.strip_prefix("unknown field `") {
        Some(rest) => rest.split('`').next().map(str::to_owned),
        None if !matches!(path.as_str(), "." | "?" | "") => Some(path),
        None => msg
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
            .map(str::to_owned),
    };
    let what = if inner.is_syntax() || inner.is_eof() {
        "the body is not valid JSON"
    } else {
        "the body does not match the schema"
    };
    ApiError {
        field,
        ..ApiError::new(StatusCode::BAD_REQUEST, format!("{what}: {msg}"))
    }
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default)]
pub struct Sampling<'a> {
    /// Prompt.
    pub prompt: &'a str,
    /// Negative prompt.
    pub negative_prompt: Option<&'a str>,
    /// Width.
    pub width: Option<u32>,
    /// Height.
    pub height: Option<u32>,
    /// Steps.
    pub steps: Option<u32>,
    /// Guidance.
    pub guidance_scale: Option<f64>,
    /// Seed.
    pub seed: Option<u64>,
    /// Skip-layer guidance blocks.
    pub slg_layers: Option<&'a [u32]>,
}

/// Most blocks `slg_layers` may name.
pub const MAX_SLG_LAYERS: usize = 64;

impl Sampling<'_> {
    /// Validates and fills defaults; `random_seed` supplies a seed when none is given.
    pub fn resolve(
        &self,
        limits: &Limits,
        random_seed: impl FnOnce() -> u64,
    ) -> Result<GenParams, ApiError> {
        let bounds = limits.bounds();
        bounds.check_prompt("prompt", self.prompt, true)?;
        let negative = self.negative_prompt.unwrap_or("");
        bounds.check_prompt("negative_prompt", negative, false)?;
        let width = bounds
            .size
            .check("width", self.width.unwrap_or(limits.defaults.width))?;
        let height = bounds
            .size
            .check("height", self.height.unwrap_or(limits.defaults.height))?;
        let steps = bounds
            .steps
            .check("steps", self.steps.unwrap_or(limits.defaults.steps))?;
        let guidance = bounds.check_guidance(
            self.guidance_scale
                .unwrap_or(limits.defaults.guidance_scale),
        )?;
        if let Some(gate) = &limits.model.memory
            && let Some(why) = gate.refusal(width, height, guidance > 1.0, limits.max_size())
        {
            return Err(ApiError::invalid("width", why));
        }
        if let Some(layers) = self.slg_layers {
            check_slg_layers(layers, limits.model.transformer_blocks)?;
        }
        Ok(GenParams {
            prompt: self.prompt.to_owned(),
            negative_prompt: negative.to_owned(),
            width,
            height,
            steps,
            guidance_scale: guidance,
            seed: self.seed.unwrap_or_else(random_seed),
            slg_layers: self.slg_layers.map(<[u32]>::to_vec),
            edit: None,
        })
    }
}

/// Skip-layer guidance blocks a request names: each one of the model's, at most
/// [`MAX_SLG_LAYERS`] of them.
fn check_slg_layers(layers: &[u32], blocks: u32) -> Result<(), ApiError> {
    if layers.len() > MAX_SLG_LAYERS {
        return Err(ApiError::invalid(
            "slg_layers",
            format!(
                "names {} blocks; at most {MAX_SLG_LAYERS} are accepted",
                layers.len()
            ),
        ));
    }
    if let Some(&bad) = layers.iter().find(|&&l| l >= blocks) {
        return Err(ApiError::invalid(
            "slg_layers",
            format!(
                "block {bad} does not exist: this model's transformer has {blocks} blocks \
                 (0 to {}); send `[]` to turn skip-layer guidance off",
                blocks.saturating_sub(1)
            ),
        ));
    }
    Ok(())
}

/// Whether a request's `model` names the served model: any of its served names (compared
/// without regard to ASCII case); anything else is a 404 that lists them.
pub fn check_model(model: &str, served: &ModelInfo) -> Result<(), ApiError> {
    if served
        .served_names
        .iter()
        .any(|n| n.eq_ignore_ascii_case(model.trim()))
    {
        return Ok(());
    }
    let names: Vec<String> = served
        .served_names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect();
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "model `{model}` is not served here; this server serves {} (or leave `model` out)",
            names.join(", ")
        ),
    )
    .with_field("model"))
}

/// The white space `str::trim` removes (Unicode `White_Space`), as a regular expression class
/// (ECMA-262's `\s` differs: it has U+FEFF and lacks U+0085).
const TRIMMED_SPACE: &str =
    r"[\t\n\x0B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000]*";

/// The JSON Schema `pattern` of a prompt `Bounds::check_prompt` accepts when it is required:
/// no NUL, and something besides the white space `str::trim` removes.
pub const PROMPT_PATTERN: &str = r"^[^\u0000]*[^\u0000\t\n\x0B\f\r \u0085\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000]*$";

/// The JSON Schema `pattern` of a negative prompt: no NUL.
pub const NO_NUL_PATTERN: &str = r"^[^\u0000]*$";

/// The JSON Schema `pattern` of exactly the names [`check_model`] accepts: one of `names`,
/// ASCII case ignored, with surrounding white space; `None` when there are no names yet.
pub fn model_name_pattern(names: &[String]) -> Option<String> {
    if names.is_empty() {
        return None;
    }
    let alternatives: Vec<String> = names
        .iter()
        .map(|name| {
            let mut out = String::new();
            for c in name.chars() {
                if c.is_ascii_alphabetic() {
                    out.push('[');
                    out.push(c.to_ascii_lowercase());
                    out.push(c.to_ascii_uppercase());
                    out.push(']');
                } else if "\\^$.|?*+()[]{}/".contains(c) {
                    out.push('\\');
                    out.push(c);
                } else {
                    out.push(c);
                }
            }
            out
        })
        .collect();
    Some(format!(
        "^{TRIMMED_SPACE}(?:{}){TRIMMED_SPACE}$",
        alternatives.join("|")
    ))
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

/// A first seed checked for `n` images: seeds never wrap.
pub fn check_first_seed(seed: Option<u64>, n: u32) -> Result<(), ApiError> {
    let max_seed = max_first_seed(n);
    if let Some(seed) = seed
        && seed > max_seed
    {
        return Err(ApiError::invalid(
            "seed",
            format!(
                "{seed} is too large for n = {n}: image i uses seed + i and seeds never \
                 wrap, so the seed must be at most {max_seed}"
            ),
        ));
    }
    Ok(())
}

/// The OpenAI routes have no width or height: their `size` says both.
pub fn size_field(e: ApiError) -> ApiError {
    match e.field.as_deref() {
        Some("width" | "height") => e.with_field("size"),
        _ => e,
    }
}

/// `n` images like `first`, with seeds `first.seed`, `first.seed + 1`, …
pub fn fan_out(first: &GenParams, n: u32) -> Vec<GenParams> {
    (0..u64::from(n))
        .map(|i| GenParams {
            seed: first.seed + i,
            ..first.clone()
        })
        .collect()
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
        let bounds: Bounds = limits.bounds();
        let n = bounds.images.check("n", self.n.unwrap_or(1))?;
        self.delivery()?;
        self.output()?;
        if let Some(m) = &self.model {
            check_model(m, &limits.model)?;
        }
        let size = openai_size(self.size.as_deref(), &bounds)?;
        check_first_seed(self.seed, n)?;
        let max_seed = max_first_seed(n);
        let first = Sampling {
            prompt: &self.prompt,
            negative_prompt: self.negative_prompt.as_deref(),
            width: size.map(|s| s.0),
            height: size.map(|s| s.1),
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            seed: self.seed,
            slg_layers: None,
        }
        .resolve(limits, || random_seed().min(max_seed))
        .map_err(size_field)?;
        Ok(fan_out(&first, n))
    }
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The small model the properties and the fuzzer use: 256 px at most, 64 px by default.
    pub(crate) fn limits() -> Limits {
        crate::properties::limits()
    }

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
    fn exactly_one_json_object_is_accepted() {
        let status = |body: &str| {
            parse_json::<Txt2ImgRequest>(body.as_bytes())
                .map(drop)
                .map_err(|e| (e.status.as_u16(), e.message))
        };
        assert_eq!(status(" {\"prompt\":\"a\"}\r\n "), Ok(()));
        for body in [
            r#"{"prompt":"a"} trailing"#,
            r#"{"prompt":"a"}{"prompt":""}"#,
            r#"{"prompt":"a"}]"#,
            "{\"prompt\":\"a\"}\0",
        ] {
            let err = status(body).expect_err(body);
            assert_eq!(err.0, 400, "{body}");
            assert!(
                err.1.starts_with("the body has more after"),
                "{body}: {}",
                err.1
            );
        }
    }

    #[test]
    fn a_number_with_more_digits_than_f64_holds_reads_as_the_nearest_f64() {
        // Correctly rounded parsing, so that the value written back (shortest form) reads as
        // the same number: the request's echo and a resend give the same image.
        let body = br#"{"prompt":"a","guidance_scale":3.0000018446744073709551615001}"#;
        let g = parse_json::<Txt2ImgRequest>(body)
            .ok()
            .and_then(|r| r.guidance_scale);
        assert_eq!(g, "3.0000018446744073709551615001".parse::<f64>().ok());
        let written = serde_json::to_vec(&Txt2ImgRequest {
            guidance_scale: g,
            ..Default::default()
        })
        .unwrap_or_default();
        let again = parse_json::<Txt2ImgRequest>(&written)
            .ok()
            .and_then(|r| r.guidance_scale);
        assert_eq!(again.map(f64::to_bits), g.map(f64::to_bits));
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

    /// The document's pattern for model names accepts exactly the names `check_model` does.
    #[test]
    fn model_name_pattern_is_check_model() {
        let mut model = limits().model;
        model.served_names = vec!["sd3.5-Large".into(), "a+b/c".into()];
        let pattern = model_name_pattern(&model.served_names).unwrap_or_default();
        let re = regex::Regex::new(&pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
        for name in [
            "sd3.5-large",
            "SD3.5-LARGE",
            " sd3.5-Large\t",
            "\u{a0}sd3.5-large\u{3000}",
            "\u{85}a+b/c",
            "A+B/C",
            "sd3x5-large",
            "sd3.5-larg",
            "sd3.5-large!",
            "\u{feff}sd3.5-large",
            "aab/c",
            "",
            "ſd3.5-large",
        ] {
            assert_eq!(
                re.is_match(name),
                check_model(name, &model).is_ok(),
                "{name:?} against {pattern}"
            );
        }
        assert_eq!(model_name_pattern(&[]), None);
    }

    /// The prompt patterns accept exactly the prompts `check_prompt` does (length aside).
    #[test]
    fn prompt_patterns_are_check_prompt() {
        let bounds = limits().bounds();
        let prompt = regex::Regex::new(PROMPT_PATTERN).unwrap_or_else(|e| panic!("{e}"));
        let negative = regex::Regex::new(NO_NUL_PATTERN).unwrap_or_else(|e| panic!("{e}"));
        for text in [
            "a",
            " a ",
            "",
            " ",
            "\t\n",
            "\u{3000}\u{85}",
            "\u{feff}",
            "a\0",
            "\0",
            "a b",
        ] {
            assert_eq!(
                prompt.is_match(text),
                bounds.check_prompt("prompt", text, true).is_ok(),
                "{text:?}"
            );
            assert_eq!(
                negative.is_match(text),
                bounds.check_prompt("negative_prompt", text, false).is_ok(),
                "{text:?}"
            );
        }
    }
}
