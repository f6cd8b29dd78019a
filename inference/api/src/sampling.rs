//! The sampling fields every generation body shares (prompt, size, steps, guidance, seed,
//! skip-layer guidance, adapters, a ControlNet condition), their validation into the
//! [`GenParams`] of one image, and the JSON Schema patterns that state the same rules.

use http::StatusCode;

use crate::adapters::{ControlRequest, LoraRequest, resolve_loras};
use crate::bounds::{Limits, max_first_seed};
use crate::error::ApiError;
use crate::params::{GenParams, ModelInfo};

/// The sampling fields of a generation body.
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
    /// LoRA adapters (a 422 names `loras`).
    pub loras: &'a [LoraRequest],
    /// A ControlNet condition.
    pub control: Option<&'a ControlRequest>,
}

/// Most blocks `slg_layers` may name.
pub const MAX_SLG_LAYERS: usize = 64;

impl Sampling<'_> {
    /// Validates and fills defaults; `random_seed` supplies a seed when none is given. A
    /// control image is decoded last, once everything else has passed.
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
        let loras = resolve_loras(self.loras, "loras", &limits.model)?;
        let control = self
            .control
            .map(|c| c.resolve(&limits.model, width, height))
            .transpose()?;
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
            loras,
            control,
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
        .served
        .served_names
        .iter()
        .any(|n| n.eq_ignore_ascii_case(model.trim()))
    {
        return Ok(());
    }
    let names: Vec<String> = served
        .served
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

/// `n` images like `first`, with seeds `first.seed`, `first.seed + 1`, …
pub fn fan_out(first: &GenParams, n: u32) -> Vec<GenParams> {
    (0..u64::from(n))
        .map(|i| GenParams {
            seed: first.seed + i,
            ..first.clone()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::properties::limits;

    /// The document's pattern for model names accepts exactly the names `check_model` does.
    #[test]
    fn model_name_pattern_is_check_model() {
        let mut model = limits().model;
        model.served.served_names = vec!["sd3.5-Large".into(), "a+b/c".into()];
        let pattern = model_name_pattern(&model.served.served_names).unwrap_or_default();
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
