//! The adapter and control fields of the generation bodies — `loras: [{name, scale}]`, and
//! AUTOMATIC1111's `<lora:name:0.8>` prompt tags ([`prompt_lora_tags`]); `control: {mode,
//! image, scale, start, end, preprocess}` — checked against what the server serves (the
//! adapters and ControlNet modes of [`ModelInfo`]) before anything is queued: an unknown
//! adapter or an unserved mode is a 422 naming it and listing what is served.
//!
//! The control image is read like an upload ([`crate::picture`]: recognised by its bytes, its
//! size checked before decoding) and resized to the request's size (Lanczos, the aspect ratio
//! not kept, as diffusers' image processor resizes control images). The backend makes it the
//! condition: as sent, or as Canny edges or a blur of it when `preprocess` asks (after the
//! resize, so edges are found at the size that is sampled).

use std::sync::Arc;

use http::StatusCode;
use schemars::JsonSchema;
use sd35_contract::ControlMode;
use serde::{Deserialize, Serialize};

use crate::bounds::{
    DEFAULT_BLUR_SIGMA, DEFAULT_CANNY, MAX_BLUR_SIGMA, MAX_CANNY_THRESHOLD, MAX_CONTROL_SCALE,
    MAX_LORA_SCALE,
};
use crate::error::ApiError;
use crate::params::{ControlParams, ModelInfo, Preprocess};
use crate::picture::{self, Picture};

/// One LoRA adapter a request applies.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraRequest {
    /// A served adapter's name (`GET /v1/models`: `adapters`).
    pub name: String,
    /// How strongly it applies (0 leaves the model as it is, negative pushes away from the
    /// adapter); left out, the adapter's default scale (`GET /v1/models`).
    #[serde(default)]
    pub scale: Option<f64>,
}

/// How a control picture is made into the condition.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged, deny_unknown_fields)]
pub enum PreprocessRequest {
    /// `false` (the default): the image is the control image as sent (edges, a blur, a depth
    /// map); `true`: the mode's own preprocessing with its defaults (canny: thresholds 100 and
    /// 200; blur: σ 2 pixels; depth has none: send a depth map).
    Switch(bool),
    /// Canny edges (mode `canny`) with these hysteresis thresholds, in OpenCV's units: edges
    /// start above `high` and continue above `low`.
    Canny {
        /// Weakest gradient kept when connected to a strong edge.
        low: f64,
        /// Weakest gradient that starts an edge.
        high: f64,
    },
    /// A Gaussian blur (mode `blur`) of standard deviation `sigma` pixels.
    Blur {
        /// Standard deviation in pixels.
        sigma: f64,
    },
}

/// A ControlNet condition (SD3.5's canny, depth and blur ControlNets, as diffusers'
/// `StableDiffusion3ControlNetPipeline` applies them).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    /// A served mode (`GET /v1/models`: `control_modes`): `canny`, `depth` or `blur`.
    pub mode: String,
    /// The control picture: a PNG, JPEG or WebP file in base64 (a `data:` URL too), resized to
    /// the request's size.
    pub image: String,
    /// `controlnet_conditioning_scale` (default 1).
    #[serde(default)]
    pub scale: Option<f64>,
    /// The fraction of the steps before which the condition is off (default 0).
    #[serde(default)]
    pub start: Option<f64>,
    /// The fraction of the steps after which the condition is off (default 1).
    #[serde(default)]
    pub end: Option<f64>,
    /// Made into the control image here: `true` or the mode's parameters (`{"low", "high"}`
    /// for canny, `{"sigma"}` for blur); left out or `false`, the image is used as sent.
    #[serde(default)]
    pub preprocess: Option<PreprocessRequest>,
}

/// `names` as a message lists them: `` `a`, `b` ``.
fn listed<T: std::fmt::Display>(names: impl IntoIterator<Item = T>) -> String {
    names
        .into_iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The adapters a request names, as `(name, scale)` in its order: each served (a 422 naming
/// `field` lists the served ones otherwise), none twice, each scale (or the adapter's default)
/// within ±[`MAX_LORA_SCALE`].
pub fn resolve_loras(
    requested: &[LoraRequest],
    field: &str,
    model: &ModelInfo,
) -> Result<Vec<(String, f64)>, ApiError> {
    let mut out: Vec<(String, f64)> = Vec::with_capacity(requested.len());
    for lora in requested {
        let Some(served) = model.adapter(&lora.name) else {
            let adapters = &model.served.adapters;
            return Err(ApiError::invalid(
                field,
                if adapters.is_empty() {
                    format!(
                        "unknown adapter `{}`: this server serves no LoRA adapter",
                        lora.name
                    )
                } else {
                    format!(
                        "unknown adapter `{}`: this server serves {}",
                        lora.name,
                        listed(adapters.iter().map(|a| &a.name))
                    )
                },
            ));
        };
        if out.iter().any(|(name, _)| *name == lora.name) {
            return Err(ApiError::invalid(
                field,
                format!(
                    "adapter `{}` is named twice; name each adapter once",
                    lora.name
                ),
            ));
        }
        let scale = lora.scale.unwrap_or(served.scale);
        if !(scale.is_finite() && scale.abs() <= MAX_LORA_SCALE) {
            return Err(ApiError::invalid(
                field,
                format!(
                    "adapter `{}`: the scale must be a number from -{MAX_LORA_SCALE} to \
                     {MAX_LORA_SCALE}; got {scale}",
                    lora.name
                ),
            ));
        }
        out.push((lora.name.clone(), scale));
    }
    Ok(out)
}

/// The 422 of a ControlNet condition sent with an image to edit.
pub fn refuse_control_with_edit(control: Option<&ControlRequest>) -> Result<(), ApiError> {
    match control {
        Some(_) => Err(ApiError::invalid(
            "control",
            "an image to edit and a ControlNet condition cannot be combined: send the edit \
             without `control`, or the condition on a generation route",
        )),
        None => Ok(()),
    }
}

/// A fraction of the steps, `field` naming it.
fn fraction(field: &str, v: f64) -> Result<f64, ApiError> {
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::invalid(
            field,
            format!("must be a fraction of the steps from 0 to 1; got {v}"),
        ))
    }
}

impl PreprocessRequest {
    /// The preprocessing this asks of a `mode` picture; a 422 naming `control.preprocess`
    /// when it does not fit the mode or its parameters are out of range.
    pub fn resolve(self, mode: ControlMode) -> Result<Option<Preprocess>, ApiError> {
        const FIELD: &str = "control.preprocess";
        let chosen = match (self, mode) {
            (Self::Switch(false), _) => return Ok(None),
            (Self::Switch(true), ControlMode::Canny) => Preprocess::Canny {
                low: DEFAULT_CANNY.0,
                high: DEFAULT_CANNY.1,
            },
            (Self::Switch(true), ControlMode::Blur) => Preprocess::Blur {
                sigma: DEFAULT_BLUR_SIGMA,
            },
            (Self::Switch(true), ControlMode::Depth) => {
                return Err(ApiError::invalid(
                    FIELD,
                    "depth has no preprocessing here: send a depth map as the image, with \
                     `preprocess` false or left out",
                ));
            }
            (Self::Canny { low, high }, ControlMode::Canny) => Preprocess::Canny { low, high },
            (Self::Blur { sigma }, ControlMode::Blur) => Preprocess::Blur { sigma },
            (Self::Canny { .. }, _) | (Self::Blur { .. }, _) => {
                return Err(ApiError::invalid(
                    FIELD,
                    format!(
                        "these parameters are not mode `{mode}`'s: `{{\"low\", \"high\"}}` is \
                         canny's, `{{\"sigma\"}}` blur's"
                    ),
                ));
            }
        };
        match chosen {
            Preprocess::Canny { low, high } => {
                let ok = |t: f64| t.is_finite() && (0.0..=MAX_CANNY_THRESHOLD).contains(&t);
                if !(ok(low) && ok(high) && low <= high) {
                    return Err(ApiError::invalid(
                        FIELD,
                        format!(
                            "the thresholds must satisfy 0 <= low <= high <= \
                             {MAX_CANNY_THRESHOLD}; got low {low}, high {high}"
                        ),
                    ));
                }
            }
            Preprocess::Blur { sigma } => {
                if !(sigma.is_finite() && sigma > 0.0 && sigma <= MAX_BLUR_SIGMA) {
                    return Err(ApiError::invalid(
                        FIELD,
                        format!(
                            "sigma must be above 0 and at most {MAX_BLUR_SIGMA} pixels; got \
                             {sigma}"
                        ),
                    ));
                }
            }
        }
        Ok(Some(chosen))
    }
}

impl ControlRequest {
    /// The mode, served by `model`; a 422 naming `control.mode` lists the served ones.
    fn served_mode(&self, model: &ModelInfo) -> Result<ControlMode, ApiError> {
        let modes = &model.served.control_modes;
        match self.mode.parse::<ControlMode>() {
            Ok(mode) if modes.contains(&mode) => Ok(mode),
            _ if modes.is_empty() => Err(ApiError::invalid(
                "control.mode",
                format!(
                    "mode `{}` is not served: this server serves no ControlNet",
                    self.mode
                ),
            )),
            _ => Err(ApiError::invalid(
                "control.mode",
                format!(
                    "mode `{}` is not served: this server serves {}",
                    self.mode,
                    listed(modes)
                ),
            )),
        }
    }

    /// Checks every field, the image last (its header, then its pixels, decoded and resized
    /// to `width` × `height`).
    pub fn resolve(
        &self,
        model: &ModelInfo,
        width: u32,
        height: u32,
    ) -> Result<ControlParams, ApiError> {
        let mode = self.served_mode(model)?;
        let scale = self.scale.unwrap_or(1.0);
        if !(scale.is_finite() && (0.0..=MAX_CONTROL_SCALE).contains(&scale)) {
            return Err(ApiError::invalid(
                "control.scale",
                format!("must be a number from 0 to {MAX_CONTROL_SCALE}; got {scale}"),
            ));
        }
        let start = fraction("control.start", self.start.unwrap_or(0.0))?;
        let end = fraction("control.end", self.end.unwrap_or(1.0))?;
        if start >= end {
            return Err(ApiError::invalid(
                "control.end",
                format!("must be above start ({start}); got {end}"),
            ));
        }
        let preprocess = match self.preprocess {
            Some(p) => p.resolve(mode)?,
            None => None,
        };
        const IMAGE: &str = "control.image";
        let bytes = picture::base64_file(IMAGE, &self.image)?;
        Ok(ControlParams {
            mode,
            image: Arc::new(control_picture(IMAGE, &bytes, width, height)?),
            preprocess,
            scale,
            start,
            end,
        })
    }
}

/// A control picture sent in `field` (a PNG, JPEG or WebP file), its header checked before it
/// is decoded, at `width` × `height`.
pub fn control_picture(
    field: &str,
    bytes: &[u8],
    width: u32,
    height: u32,
) -> Result<Picture, ApiError> {
    picture::probe(field, bytes)?;
    Ok(picture::decode(field, bytes)?
        .picture
        .resized(width, height))
}

/// The `<lora:NAME>` and `<lora:NAME:WEIGHT>` tags of an AUTOMATIC1111 prompt, taken out: the
/// prompt without them (the text on either side joined by one space, the ends trimmed) and
/// the adapters they name, each with its weight (1 when it has none), in the prompt's order.
/// A tag with a second weight (AUTOMATIC1111's separate text-encoder weight) or a weight
/// that is not a number is a 422 naming `prompt`.
pub fn prompt_lora_tags(prompt: &str) -> Result<(String, Vec<LoraRequest>), ApiError> {
    const OPEN: &str = "<lora:";
    if !prompt.contains(OPEN) {
        return Ok((prompt.to_owned(), Vec::new()));
    }
    let mut text = String::with_capacity(prompt.len());
    let mut loras = Vec::new();
    let mut rest = prompt;
    while let Some(at) = rest.find(OPEN) {
        let Some(close) = rest[at..].find('>') else {
            break;
        };
        let tag = &rest[at + OPEN.len()..at + close];
        let mut parts = tag.split(':');
        let name = parts.next().unwrap_or("").trim();
        let scale = match (parts.next(), parts.next()) {
            (None, _) => 1.0,
            (Some(w), None) => w.trim().parse::<f64>().map_err(|_| {
                ApiError::invalid(
                    "prompt",
                    format!("<lora:{tag}>: the weight `{w}` is not a number"),
                )
            })?,
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "prompt",
                    format!(
                        "<lora:{tag}>: one weight per adapter is applied here \
                         (<lora:NAME:WEIGHT>), not separate text-encoder and model weights"
                    ),
                ));
            }
        };
        loras.push(LoraRequest {
            name: name.to_owned(),
            scale: Some(scale),
        });
        join_trimmed(&mut text, &rest[..at]);
        rest = &rest[at + close + 1..];
    }
    join_trimmed(&mut text, rest);
    Ok((text, loras))
}

/// Appends `piece` to `text`, one space between them when both have words.
fn join_trimmed(text: &mut String, piece: &str) {
    let piece = piece.trim();
    if piece.is_empty() {
        return;
    }
    if !text.is_empty() {
        text.push(' ');
    }
    text.push_str(piece);
}

/// A form field whose text is JSON (`loras`, `control` of the edit form), parsed; a 400
/// naming the field when it does not parse.
pub fn form_json<T: serde::de::DeserializeOwned>(field: &str, text: &str) -> Result<T, ApiError> {
    serde_json::from_str(text).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("is not the JSON this field takes: {e}"),
        )
        .with_field(field)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::AdapterInfo;

    fn model() -> ModelInfo {
        let mut limits = crate::properties::limits();
        limits.model.served.adapters = vec![
            AdapterInfo {
                name: "style".into(),
                scale: 0.8,
                text_encoders: false,
                path: String::new(),
                metadata: Default::default(),
            },
            AdapterInfo {
                name: "detail".into(),
                scale: 1.0,
                text_encoders: true,
                path: String::new(),
                metadata: Default::default(),
            },
        ];
        limits.model.served.control_modes = vec![ControlMode::Canny];
        limits.model
    }

    fn lora(name: &str, scale: Option<f64>) -> LoraRequest {
        LoraRequest {
            name: name.into(),
            scale,
        }
    }

    #[test]
    fn adapters_are_served_names_with_scales() {
        let m = model();
        assert_eq!(
            resolve_loras(
                &[lora("detail", Some(1.3)), lora("style", None)],
                "loras",
                &m
            ),
            Ok(vec![("detail".into(), 1.3), ("style".into(), 0.8)])
        );
        let refused = |set: &[LoraRequest]| {
            resolve_loras(set, "loras", &m)
                .map_err(|e| (e.status.as_u16(), e.field, e.message))
                .err()
        };
        let (status, field, message) = refused(&[lora("anime", None)]).unwrap_or_default();
        assert_eq!((status, field.as_deref()), (422, Some("loras")));
        assert!(
            message.contains("`anime`") && message.contains("`style`, `detail`"),
            "{message}"
        );
        assert!(refused(&[lora("style", None), lora("style", Some(1.0))]).is_some());
        assert!(refused(&[lora("style", Some(10.5))]).is_some());
        assert!(refused(&[lora("style", Some(f64::NAN))]).is_some());
        let mut bare = m.clone();
        bare.served.adapters.clear();
        let e = resolve_loras(&[lora("style", None)], "prompt", &bare).err();
        assert!(e.is_some_and(|e| e.field.as_deref() == Some("prompt")
            && e.message.contains("serves no LoRA adapter")));
    }

    #[test]
    fn a1111_tags_leave_the_prompt_and_name_the_adapters() {
        let (text, loras) = prompt_lora_tags("a cat <lora:style:0.8>, watercolour <lora:detail>")
            .unwrap_or_default();
        assert_eq!(text, "a cat , watercolour");
        assert_eq!(loras, [lora("style", Some(0.8)), lora("detail", Some(1.0))]);
        assert_eq!(
            prompt_lora_tags("<lora:style:-1>   a cat").map(|(t, _)| t),
            Ok("a cat".to_owned())
        );
        assert_eq!(
            prompt_lora_tags("a cat <lora:open").map(|(t, l)| (t, l.len())),
            Ok(("a cat <lora:open".to_owned(), 0))
        );
        for bad in ["<lora:style:x>", "<lora:style:0.5:1>"] {
            assert_eq!(
                prompt_lora_tags(bad).err().and_then(|e| e.field),
                Some("prompt".into()),
                "{bad}"
            );
        }
    }

    #[test]
    fn control_fields_are_checked_before_the_image() {
        let m = model();
        let png = crate::edit::tests::png(20, 12, None);
        let image = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &png);
        let control = |json: serde_json::Value| -> Result<ControlParams, (u16, Option<String>)> {
            let mut body = json;
            if body.get("image").is_none() {
                body["image"] = serde_json::Value::String(image.clone());
            }
            serde_json::from_value::<ControlRequest>(body)
                .map_err(|_| (400, None))
                .and_then(|c| {
                    c.resolve(&m, 32, 16)
                        .map_err(|e| (e.status.as_u16(), e.field))
                })
        };
        let ok = control(serde_json::json!({"mode": "canny", "preprocess": true}))
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!((ok.image.width, ok.image.height), (32, 16));
        assert_eq!(
            ok.preprocess,
            Some(Preprocess::Canny {
                low: 100.0,
                high: 200.0
            })
        );
        assert_eq!((ok.scale, ok.start, ok.end), (1.0, 0.0, 1.0));
        for (body, field) in [
            (serde_json::json!({"mode": "depth"}), "control.mode"),
            (serde_json::json!({"mode": "openpose"}), "control.mode"),
            (
                serde_json::json!({"mode": "canny", "scale": -1}),
                "control.scale",
            ),
            (
                serde_json::json!({"mode": "canny", "start": 0.5, "end": 0.5}),
                "control.end",
            ),
            (
                serde_json::json!({"mode": "canny", "end": 1.5}),
                "control.end",
            ),
            (
                serde_json::json!({"mode": "canny", "preprocess": {"sigma": 2}}),
                "control.preprocess",
            ),
            (
                serde_json::json!({"mode": "canny", "preprocess": {"low": 300, "high": 200}}),
                "control.preprocess",
            ),
        ] {
            assert_eq!(
                control(body.clone()),
                Err((422, Some(field.into()))),
                "{body}"
            );
        }
        assert_eq!(
            control(serde_json::json!({"mode": "canny", "image": "%%"})),
            Err((400, Some("control.image".into())))
        );
        // Unknown fields are refused, in the preprocessing too.
        assert!(control(serde_json::json!({"mode": "canny", "weight": 1})).is_err());
        assert!(
            control(
                serde_json::json!({"mode": "canny", "preprocess": {"low": 1, "high": 2, "x": 3}})
            )
            .is_err()
        );
    }
}
