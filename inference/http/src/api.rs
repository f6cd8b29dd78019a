//! Request and response types of the HTTP API, their validation, and the one error type
//! whose variants decide the status code.
//!
//! Parsing rejects unknown fields and names the offending field; validation bounds every
//! field against the loaded model and the server's limits before anything is queued.

use axum::http::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::backend::{GenParams, ModelInfo};

/// Largest `n` of the OpenAI images endpoint.
pub const MAX_IMAGES_PER_REQUEST: u32 = 4;
/// Largest guidance scale accepted.
pub const MAX_GUIDANCE: f64 = 30.0;
/// Sizes must be multiples of this (VAE factor 8 × patch size 2).
pub const SIZE_MULTIPLE: u32 = 16;

/// `POST /v1/txt2img`: the body diffusers-based services accept today.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Txt2ImgRequest {
    /// What to draw (non-empty).
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
    /// Classifier-free guidance scale, 0 to 30 (≤ 1 disables guidance).
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    /// Seed of the initial noise (random when left out; the response reports it).
    #[serde(default)]
    pub seed: Option<u64>,
}

/// `POST /v1/images/generations`: the OpenAI Images API body, plus our sampling fields.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImagesRequest {
    /// What to draw (non-empty).
    pub prompt: String,
    /// Number of images, 1 to 4 (seeds `seed`, `seed + 1`, …).
    #[serde(default)]
    pub n: Option<u32>,
    /// `"WxH"`, e.g. `"1024x1024"`.
    #[serde(default)]
    pub size: Option<String>,
    /// Only `b64_json` is supported.
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
    /// Seed of the first image.
    #[serde(default)]
    pub seed: Option<u64>,
}

/// `POST /v1/txt2img` with `Accept: application/json`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Txt2ImgResponse {
    /// The PNG, base64.
    pub image: String,
    /// The parameters actually used (defaults and seed filled in).
    pub parameters: UsedParameters,
}

/// The parameters that produced an image; sending them back reproduces it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
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
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: u64,
    /// One entry per image.
    pub data: Vec<ImageData>,
}

/// One generated image.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ImageData {
    /// The PNG, base64.
    pub b64_json: String,
    /// The seed of this image.
    pub seed: u64,
}

/// The JSON body of every error.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong and, when one field is to blame, which.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ErrorDetail {
    /// What went wrong and what to change.
    pub message: String,
    /// The offending request field, when there is one.
    pub field: Option<String>,
}

/// An error answer: the status, a message and maybe the field.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Message for the client.
    pub message: String,
    /// Offending field.
    pub field: Option<String>,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error without a field.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// A field value out of range (422).
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.to_owned()),
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, message)
        }
    }

    /// Adds `Retry-After`.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                field: self.field.clone(),
            },
        }
    }
}

/// Parses a JSON body, rejecting unknown fields; a bad body is a 400 naming the field.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(e) => {
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
            Err(ApiError {
                field,
                ..ApiError::new(StatusCode::BAD_REQUEST, format!("{what}: {msg}"))
            })
        }
    }
}

/// What validation checks against.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The model.
    pub model: ModelInfo,
    /// Defaults after the server's overrides.
    pub defaults: crate::backend::Defaults,
    /// Step cap.
    pub max_steps: u32,
    /// Prompt cap in bytes.
    pub max_prompt_bytes: usize,
}

fn check_prompt(field: &str, text: &str, limits: &Limits, required: bool) -> Result<(), ApiError> {
    if required && text.trim().is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    if text.len() > limits.max_prompt_bytes {
        return Err(ApiError::invalid(
            field,
            format!(
                "is {} bytes; at most {} are accepted",
                text.len(),
                limits.max_prompt_bytes
            ),
        ));
    }
    if text.contains('\0') {
        return Err(ApiError::invalid(field, "must not contain NUL characters"));
    }
    Ok(())
}

fn check_size(field: &str, v: u32, max: u32) -> Result<u32, ApiError> {
    if v == 0 || !v.is_multiple_of(SIZE_MULTIPLE) || v > max {
        return Err(ApiError::invalid(
            field,
            format!("{v} must be a multiple of {SIZE_MULTIPLE} from {SIZE_MULTIPLE} to {max}"),
        ));
    }
    Ok(v)
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
}

impl Sampling<'_> {
    /// Validates and fills defaults; `random_seed` supplies a seed when none is given.
    pub fn resolve(
        &self,
        limits: &Limits,
        random_seed: impl FnOnce() -> u64,
    ) -> Result<GenParams, ApiError> {
        check_prompt("prompt", self.prompt, limits, true)?;
        let negative = self.negative_prompt.unwrap_or("");
        check_prompt("negative_prompt", negative, limits, false)?;
        let max = limits.model.max_size;
        let width = check_size("width", self.width.unwrap_or(limits.defaults.width), max)?;
        let height = check_size("height", self.height.unwrap_or(limits.defaults.height), max)?;
        let steps = self.steps.unwrap_or(limits.defaults.steps);
        if steps == 0 || steps > limits.max_steps {
            return Err(ApiError::invalid(
                "steps",
                format!("{steps} is outside 1..={}", limits.max_steps),
            ));
        }
        let guidance = self
            .guidance_scale
            .unwrap_or(limits.defaults.guidance_scale);
        if !guidance.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&guidance) {
            return Err(ApiError::invalid(
                "guidance_scale",
                format!("{guidance} is outside 0..={MAX_GUIDANCE}"),
            ));
        }
        Ok(GenParams {
            prompt: self.prompt.to_owned(),
            negative_prompt: negative.to_owned(),
            width,
            height,
            steps,
            guidance_scale: guidance,
            seed: self.seed.unwrap_or_else(random_seed),
        })
    }
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
    Err(ApiError {
        field: Some("model".into()),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "model `{model}` is not served here; this server serves {} (or leave `model` out)",
                names.join(", ")
            ),
        )
    })
}

/// Parses an OpenAI `size` (`"WxH"`).
pub fn parse_size(size: &str) -> Result<(u32, u32), ApiError> {
    let bad = || {
        ApiError::invalid(
            "size",
            format!("`{size}` is not WIDTHxHEIGHT, e.g. \"1024x1024\""),
        )
    };
    let (w, h) = size.split_once(['x', 'X']).ok_or_else(bad)?;
    let w = w.trim().parse::<u32>().map_err(|_| bad())?;
    let h = h.trim().parse::<u32>().map_err(|_| bad())?;
    Ok((w, h))
}

impl ImagesRequest {
    /// Validates the request into one parameter set per image.
    pub fn resolve(
        &self,
        limits: &Limits,
        random_seed: impl FnOnce() -> u64,
    ) -> Result<Vec<GenParams>, ApiError> {
        let n = self.n.unwrap_or(1);
        if n == 0 || n > MAX_IMAGES_PER_REQUEST {
            return Err(ApiError::invalid(
                "n",
                format!("{n} is outside 1..={MAX_IMAGES_PER_REQUEST}"),
            ));
        }
        match self.response_format.as_deref() {
            None | Some("b64_json") => {}
            Some(other) => {
                return Err(ApiError::invalid(
                    "response_format",
                    format!("`{other}` is not supported; use \"b64_json\""),
                ));
            }
        }
        if let Some(m) = &self.model {
            check_model(m, &limits.model)?;
        }
        let (width, height) = match &self.size {
            Some(s) => {
                let (w, h) = parse_size(s)?;
                let max = limits.model.max_size;
                check_size("size", w, max)?;
                check_size("size", h, max)?;
                (Some(w), Some(h))
            }
            None => (None, None),
        };
        let first = Sampling {
            prompt: &self.prompt,
            negative_prompt: self.negative_prompt.as_deref(),
            width,
            height,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            seed: self.seed,
        }
        .resolve(limits, random_seed)?;
        Ok((0..u64::from(n))
            .map(|i| GenParams {
                seed: first.seed.wrapping_add(i),
                ..first.clone()
            })
            .collect())
    }
}

impl Txt2ImgRequest {
    /// Validates the request.
    pub fn resolve(
        &self,
        limits: &Limits,
        random_seed: impl FnOnce() -> u64,
    ) -> Result<GenParams, ApiError> {
        Sampling {
            prompt: &self.prompt,
            negative_prompt: self.negative_prompt.as_deref(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            seed: self.seed,
        }
        .resolve(limits, random_seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, FakeBackend};

    fn limits() -> Limits {
        let model = FakeBackend::new(std::time::Duration::ZERO).info();
        Limits {
            defaults: model.defaults.clone(),
            model,
            max_steps: 50,
            max_prompt_bytes: 100,
        }
    }

    fn field_of(body: &str) -> Option<String> {
        match parse_json::<Txt2ImgRequest>(body.as_bytes()) {
            Ok(r) => r.resolve(&limits(), || 7).err().and_then(|e| e.field),
            Err(e) => e.field,
        }
    }

    #[test]
    fn every_bad_field_is_named() {
        assert_eq!(
            field_of(r#"{"prompt":"a","wdth":64}"#).as_deref(),
            Some("wdth")
        );
        assert_eq!(
            field_of(r#"{"prompt":"a","width":"x"}"#).as_deref(),
            Some("width")
        );
        assert_eq!(field_of(r#"{"width":64}"#).as_deref(), Some("prompt"));
        assert_eq!(field_of(r#"{"prompt":" "}"#).as_deref(), Some("prompt"));
        assert_eq!(
            field_of(r#"{"prompt":"a","width":65}"#).as_deref(),
            Some("width")
        );
        assert_eq!(
            field_of(r#"{"prompt":"a","height":512}"#).as_deref(),
            Some("height")
        );
        assert_eq!(
            field_of(r#"{"prompt":"a","steps":0}"#).as_deref(),
            Some("steps")
        );
        assert_eq!(
            field_of(r#"{"prompt":"a","steps":51}"#).as_deref(),
            Some("steps")
        );
        assert_eq!(
            field_of(r#"{"prompt":"a","guidance_scale":31}"#).as_deref(),
            Some("guidance_scale")
        );
        assert_eq!(
            field_of(r#"{"prompt":"a","seed":-1}"#).as_deref(),
            Some("seed")
        );
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
    fn openai_shape_is_checked() {
        let run = |body: &str| {
            parse_json::<ImagesRequest>(body.as_bytes())
                .and_then(|r| r.resolve(&limits(), || 1))
                .map(|v| {
                    v.iter()
                        .map(|p| (p.width, p.height, p.seed))
                        .collect::<Vec<_>>()
                })
                .map_err(|e| (e.status.as_u16(), e.field))
        };
        assert_eq!(
            run(r#"{"prompt":"a","n":2,"size":"32x48","seed":5}"#),
            Ok(vec![(32, 48, 5), (32, 48, 6)])
        );
        assert_eq!(run(r#"{"prompt":"a","n":5}"#), Err((422, Some("n".into()))));
        assert_eq!(
            run(r#"{"prompt":"a","size":"big"}"#),
            Err((422, Some("size".into())))
        );
        assert_eq!(
            run(r#"{"prompt":"a","response_format":"url"}"#),
            Err((422, Some("response_format".into())))
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
}
