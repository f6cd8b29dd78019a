//! Every limit a request is held to, in one place: validation reads these values and the JSON
//! Schemas of the OpenAPI document are written from them ([`crate::schema`]), so the document
//! states exactly what the server enforces.

use sd35_contract::ControlMode;

use crate::error::ApiError;
use crate::params::{Defaults, ModelInfo};

/// Largest `n` of the OpenAI images endpoint.
pub const MAX_IMAGES_PER_REQUEST: u32 = 4;
/// Largest guidance scale accepted.
pub const MAX_GUIDANCE: f64 = 30.0;
/// Sizes must be multiples of this (VAE factor 8 × patch size 2).
pub const SIZE_MULTIPLE: u32 = 16;
/// Largest magnitude of a LoRA adapter's scale (negative scales push away from the adapter).
pub const MAX_LORA_SCALE: f64 = 10.0;
/// Largest ControlNet conditioning scale.
pub const MAX_CONTROL_SCALE: f64 = 10.0;
/// Canny thresholds of `control.preprocess` when it is `true` (OpenCV's usual 100 / 200).
pub const DEFAULT_CANNY: (f64, f64) = (100.0, 200.0);
/// Largest Canny threshold: the largest gradient the edge detector sees on 8-bit input
/// (`2·√5·255`); a higher one keeps nothing.
pub const MAX_CANNY_THRESHOLD: f64 = 1140.39;
/// Blur σ of `control.preprocess` when it is `true`, in pixels.
pub const DEFAULT_BLUR_SIGMA: f64 = 2.0;
/// Largest blur σ in pixels: beyond it the kernel (radius ⌈2σ⌉) outgrows any image served.
pub const MAX_BLUR_SIGMA: f64 = 256.0;

/// An inclusive range of whole numbers, in steps of `multiple_of` from `min`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntRange {
    /// Smallest value accepted.
    pub min: u32,
    /// Largest value accepted; `None` only in the document served before the model is loaded,
    /// when the model's limit is not known yet.
    pub max: Option<u32>,
    /// Every accepted value is a multiple of this (1: any whole number).
    pub multiple_of: u32,
}

impl IntRange {
    /// Whether `v` is accepted.
    pub fn contains(&self, v: u32) -> bool {
        v >= self.min
            && self.max.is_none_or(|m| v <= m)
            && v.is_multiple_of(self.multiple_of.max(1))
    }

    /// What the range accepts, in words ("a multiple of 16 from 16 to 256").
    pub fn describe(&self) -> String {
        let what = if self.multiple_of > 1 {
            format!("a multiple of {}", self.multiple_of)
        } else {
            "a whole number".to_owned()
        };
        match self.max {
            Some(max) => format!("{what} from {} to {max}", self.min),
            None => format!("{what} of at least {}", self.min),
        }
    }

    /// `v` when accepted, else a 422 naming `field`.
    pub fn check(&self, field: &str, v: u32) -> Result<u32, ApiError> {
        if self.contains(v) {
            Ok(v)
        } else {
            Err(ApiError::invalid(
                field,
                format!("must be {}; got {v}", self.describe()),
            ))
        }
    }
}

/// The bounds of every request field.
#[derive(Debug, Clone, PartialEq)]
pub struct Bounds {
    /// Images per request (`n`).
    pub images: IntRange,
    /// Width and height in pixels (`width`, `height`, each side of `size`).
    pub size: IntRange,
    /// Denoising steps.
    pub steps: IntRange,
    /// Guidance scale, inclusive.
    pub guidance: (f64, f64),
    /// Longest prompt and negative prompt, in bytes of UTF-8.
    pub prompt_bytes: usize,
    /// The names a request may give as its model (`model`, `sd_model_checkpoint`), ASCII case
    /// ignored and surrounding white space trimmed; empty before the model is loaded.
    pub model_names: Vec<String>,
    /// The transformer's blocks (`slg_layers` names blocks below it); `None` before the model
    /// is loaded.
    pub transformer_blocks: Option<u32>,
    /// The LoRA adapters a request may name; empty before the model is loaded (or when none
    /// is served).
    pub adapter_names: Vec<String>,
    /// The ControlNet modes served; empty before the model is loaded (or when none is).
    pub control_modes: Vec<ControlMode>,
}

impl Bounds {
    /// The bounds for a loaded model.
    pub fn for_model(max_size: u32, max_steps: u32, max_prompt_bytes: usize) -> Self {
        Self {
            size: IntRange {
                min: SIZE_MULTIPLE,
                max: Some(max_size - max_size % SIZE_MULTIPLE),
                multiple_of: SIZE_MULTIPLE,
            },
            steps: IntRange {
                min: 1,
                max: Some(max_steps),
                multiple_of: 1,
            },
            ..Self::before_load(max_prompt_bytes)
        }
    }

    /// The bounds known before the model is loaded (no largest size or step count yet).
    pub fn before_load(max_prompt_bytes: usize) -> Self {
        Self {
            images: IntRange {
                min: 1,
                max: Some(MAX_IMAGES_PER_REQUEST),
                multiple_of: 1,
            },
            size: IntRange {
                min: SIZE_MULTIPLE,
                max: None,
                multiple_of: SIZE_MULTIPLE,
            },
            steps: IntRange {
                min: 1,
                max: None,
                multiple_of: 1,
            },
            guidance: (0.0, MAX_GUIDANCE),
            prompt_bytes: max_prompt_bytes,
            model_names: Vec::new(),
            transformer_blocks: None,
            adapter_names: Vec::new(),
            control_modes: Vec::new(),
        }
    }

    /// The guidance scale when accepted, else a 422.
    pub fn check_guidance(&self, v: f64) -> Result<f64, ApiError> {
        let (lo, hi) = self.guidance;
        if v.is_finite() && (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(ApiError::invalid(
                "guidance_scale",
                format!("must be a number from {lo} to {hi}; got {v}"),
            ))
        }
    }

    /// Checks a prompt: not empty when `required`, at most [`Bounds::prompt_bytes`], no NUL.
    pub fn check_prompt(&self, field: &str, text: &str, required: bool) -> Result<(), ApiError> {
        if required && text.trim().is_empty() {
            return Err(ApiError::invalid(field, "must not be empty"));
        }
        if text.len() > self.prompt_bytes {
            return Err(ApiError::invalid(
                field,
                format!(
                    "is {} bytes; at most {} are accepted",
                    text.len(),
                    self.prompt_bytes
                ),
            ));
        }
        if text.contains('\0') {
            return Err(ApiError::invalid(field, "must not contain NUL characters"));
        }
        Ok(())
    }
}

/// The largest first seed of a request for `n` images: image `i` uses seed `seed + i`, and
/// seeds never wrap around, so `seed + n - 1` must fit in 64 bits.
pub fn max_first_seed(n: u32) -> u64 {
    u64::MAX - u64::from(n.saturating_sub(1))
}

/// What validation checks against: the loaded model and the server's limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The model.
    pub model: ModelInfo,
    /// Defaults after the server's overrides.
    pub defaults: Defaults,
    /// Step cap.
    pub max_steps: u32,
    /// Prompt cap in bytes.
    pub max_prompt_bytes: usize,
    /// The server's own cap on width and height, below the model's limit (`--max-size`).
    pub max_size: Option<u32>,
}

impl Limits {
    /// The largest width or height: the model's limit, or the server's cap below it.
    pub fn max_size(&self) -> u32 {
        self.max_size
            .map_or(self.model.max_size, |cap| cap.min(self.model.max_size))
    }

    /// The bounds of every request field for this model and server.
    pub fn bounds(&self) -> Bounds {
        let served = &self.model.served;
        Bounds {
            model_names: served.served_names.clone(),
            transformer_blocks: Some(self.model.transformer_blocks),
            adapter_names: served.adapters.iter().map(|a| a.name.clone()).collect(),
            control_modes: served.control_modes.clone(),
            ..Bounds::for_model(self.max_size(), self.max_steps, self.max_prompt_bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_accept_exactly_what_they_describe() {
        let b = Bounds::for_model(256, 50, 10);
        assert!(b.size.contains(16) && b.size.contains(256));
        assert!(!b.size.contains(0) && !b.size.contains(8) && !b.size.contains(272));
        assert!(!b.size.contains(100));
        assert_eq!(b.size.describe(), "a multiple of 16 from 16 to 256");
        assert!(b.steps.contains(1) && b.steps.contains(50) && !b.steps.contains(51));
        assert!(!b.steps.contains(0));
        assert!(b.images.contains(4) && !b.images.contains(5) && !b.images.contains(0));
        assert_eq!(b.check_guidance(30.0), Ok(30.0));
        assert!(b.check_guidance(-0.1).is_err() && b.check_guidance(f64::NAN).is_err());
        // A model limit that is not a multiple of 16 is rounded down, never up.
        assert_eq!(Bounds::for_model(250, 1, 1).size.max, Some(240));
        assert_eq!(max_first_seed(1), u64::MAX);
        assert_eq!(max_first_seed(4), u64::MAX - 3);
    }
}
