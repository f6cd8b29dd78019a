//! What a request asks the pipeline for ([`GenerateRequest`], an image to [`Edit`], a
//! ControlNet [`Control`]), how a caller follows its steps ([`StepControl`]), and the checks a
//! request passes before any work.

use candle_core::Tensor;

use super::{Pipeline, SIZE_MULTIPLE};
use crate::clip::ClipOutput;
use crate::variant::SkipLayerGuidance;
use crate::{Error, Result};

/// One image to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// What to draw.
    pub prompt: String,
    /// What to steer away from (used only with guidance > 1).
    pub negative_prompt: String,
    /// Width in pixels (multiple of 16).
    pub width: usize,
    /// Height in pixels (multiple of 16).
    pub height: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale; ≤ 1 runs a single, unguided pass per step.
    pub guidance: f64,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Skip-layer guidance (applied only together with classifier-free guidance).
    pub slg: Option<SkipLayerGuidance>,
    /// Initial latents `[1, 16, H/8, W/8]` replacing the seeded noise.
    pub init_latents: Option<Tensor>,
    /// Encode the prompts as if T5 were not loaded (its embedding zeros), so that servers with
    /// and without T5 can repeat the same image (the engine's smoke image).
    pub without_t5: bool,
    /// An image to edit (img2img), optionally with a mask (inpainting).
    pub edit: Option<Edit>,
    /// LoRA adapters (names given to [`Pipeline::add_lora`]) with their scales.
    pub loras: Vec<(String, f64)>,
    /// A ControlNet's condition.
    pub control: Option<Control>,
}

/// A ControlNet condition, as diffusers' `StableDiffusion3ControlNetPipeline` takes it.
#[derive(Debug, Clone)]
pub struct Control {
    /// Which of the served ControlNets ([`Pipeline::add_controlnet`]).
    pub mode: sd35_contract::ControlMode,
    /// The control image (already preprocessed: edges, a blur, a depth map), `[1, 3, H, W]`
    /// f32 in `[-1, 1]` at the request's size ([`image::to_tensor`]).
    pub image: Tensor,
    /// `controlnet_conditioning_scale`.
    pub scale: f64,
    /// `control_guidance_start`: the fraction of the steps before which it is off.
    pub start: f64,
    /// `control_guidance_end`: the fraction of the steps after which it is off.
    pub end: f64,
}

/// Whether the ControlNet acts at step `i` of `steps`: diffusers' `controlnet_keep`, off while
/// `i / steps < start` or `(i + 1) / steps > end`, in f64.
pub fn control_keeps(i: usize, steps: usize, start: f64, end: f64) -> bool {
    let (i, n) = (i as f64, steps as f64);
    !(i / n < start || (i + 1.0) / n > end)
}

/// An image to edit, as diffusers' `StableDiffusion3Img2ImgPipeline` and (with a mask)
/// `StableDiffusion3InpaintPipeline` take it.
#[derive(Debug, Clone)]
pub struct Edit {
    /// The image, `[1, 3, H, W]` f32 in `[-1, 1]` at the request's size ([`image::to_tensor`]).
    pub image: Tensor,
    /// Where to repaint, `[1, 1, H, W]`: 1 repaints, 0 keeps ([`image::mask_tensor`]).
    pub mask: Option<Tensor>,
    /// How much of the schedule runs, in (0, 1]: 1 starts from pure noise, 0.6 runs the last
    /// 60 % of the steps (cut as [`first_step`] says).
    pub strength: f64,
}

/// The first step an edit of `strength` runs of a `steps`-step schedule, exactly as diffusers'
/// `get_timesteps`: `int(max(steps - min(steps · strength, steps), 0))` in f64, truncated, so
/// 28 steps at 0.3 start at step 19 (28 − 8.4 = 19.6), and 3 steps at 0.7 at step 0
/// (3 × 0.7 = 2.0999999999999996).
pub fn first_step(steps: usize, strength: f64) -> usize {
    let steps = steps as f64;
    let init = (steps * strength).min(steps);
    (steps - init).max(0.0) as usize
}

/// Per-encoder outputs for one prompt, as the reference computes them.
#[derive(Debug, Clone)]
pub struct PromptParts {
    /// CLIP-L.
    pub clip_l: ClipOutput,
    /// CLIP-G.
    pub clip_g: ClipOutput,
    /// T5 hidden states, `[1, L, d]` (zeros when T5 is not loaded).
    pub t5: Tensor,
}

/// Token ids of one prompt for each tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTokens {
    /// CLIP-L ids.
    pub clip_l: Vec<u32>,
    /// CLIP-G ids.
    pub clip_g: Vec<u32>,
    /// T5 ids, when T5 is loaded.
    pub t5: Option<Vec<u32>>,
}

/// What happens between sampling steps: which batch items are still wanted (the others are
/// dropped at the next step), progress, and previews of chosen steps.
pub trait StepControl {
    /// Whether batch item `index` is still wanted.
    fn wanted(&mut self, index: usize) -> bool;
    /// Step `step` of `steps` finished for `live` items in `seconds`.
    fn step_done(&mut self, step: usize, steps: usize, live: usize, seconds: f64);
    /// Whether batch item `index` wants a preview after step `step` of `steps` (by default
    /// none does). Asked after the step, for items still sampled.
    fn preview_wanted(&mut self, _index: usize, _step: usize, _steps: usize) -> bool {
        false
    }
    /// The preview of batch item `index` after step `step`: the latents `[1, 16, H/8, W/8]`
    /// (f32) of the image the model predicts at that step — the current latents with the
    /// predicted remaining noise taken out — for [`Pipeline::decode`]. Reading them changes
    /// nothing in the sampling.
    fn preview(&mut self, _index: usize, _step: usize, _latents: &Tensor) {}
}

/// Every item wanted; each step reported to a closure.
pub(super) struct Progress<'a>(pub(super) &'a mut dyn FnMut(usize, usize));

impl StepControl for Progress<'_> {
    fn wanted(&mut self, _: usize) -> bool {
        true
    }
    fn step_done(&mut self, step: usize, steps: usize, _: usize, _: f64) {
        (self.0)(step, steps);
    }
}

impl Pipeline {
    pub(super) fn validate(&self, req: &GenerateRequest) -> Result<()> {
        let max = self.max_size();
        for (field, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || v % SIZE_MULTIPLE != 0 || v > max {
                return Err(Error::invalid(
                    field,
                    format!("{v} must be a positive multiple of {SIZE_MULTIPLE} up to {max}"),
                ));
            }
        }
        if req.steps == 0 || req.steps > 1000 {
            return Err(Error::invalid(
                "steps",
                format!("{} is outside 1..=1000", req.steps),
            ));
        }
        if !req.guidance.is_finite() || req.guidance < 0.0 {
            return Err(Error::invalid(
                "guidance",
                format!("{} must be ≥ 0", req.guidance),
            ));
        }
        if let Some(edit) = &req.edit {
            self.validate_edit(req, edit)?;
        }
        if let Some(control) = &req.control {
            self.validate_control(req, control)?;
        }
        for (name, scale) in &req.loras {
            if !self.loras.contains_key(name) {
                return Err(self.unknown_lora(name));
            }
            if !scale.is_finite() {
                return Err(Error::invalid(
                    "loras",
                    format!("adapter `{name}`: the scale {scale} is not a number"),
                ));
            }
        }
        if let Some(slg) = &req.slg
            && let Some(&bad) = slg.layers.iter().find(|&&l| l >= self.mmdit.config().depth)
        {
            return Err(Error::invalid(
                "slg_layers",
                format!(
                    "layer {bad} does not exist (the transformer has {})",
                    self.mmdit.config().depth
                ),
            ));
        }
        Ok(())
    }

    fn validate_edit(&self, req: &GenerateRequest, edit: &Edit) -> Result<()> {
        if !(edit.strength > 0.0 && edit.strength <= 1.0) {
            return Err(Error::invalid(
                "strength",
                format!("{} must be above 0 and at most 1", edit.strength),
            ));
        }
        if first_step(req.steps, edit.strength) >= req.steps {
            return Err(Error::invalid(
                "strength",
                format!(
                    "{} of {} steps runs none of them: raise strength or steps",
                    edit.strength, req.steps
                ),
            ));
        }
        if self.vae_encoder.is_none() {
            return Err(Error::invalid(
                "image",
                "this model's VAE has no encoder, so it cannot edit images",
            ));
        }
        let want = [1, 3, req.height, req.width];
        if edit.image.dims() != want {
            return Err(Error::invalid(
                "image",
                format!(
                    "shape {:?}, expected {want:?} for {}x{}",
                    edit.image.dims(),
                    req.width,
                    req.height
                ),
            ));
        }
        if let Some(mask) = &edit.mask
            && mask.dims() != [1, 1, req.height, req.width]
        {
            return Err(Error::invalid(
                "mask",
                format!(
                    "shape {:?}, expected [1, 1, {}, {}] (the image's size)",
                    mask.dims(),
                    req.height,
                    req.width
                ),
            ));
        }
        Ok(())
    }

    fn validate_control(&self, req: &GenerateRequest, control: &Control) -> Result<()> {
        if !self.controlnets.contains_key(&control.mode) {
            let served: Vec<String> = self.controlnets.keys().map(|m| format!("`{m}`")).collect();
            return Err(Error::invalid(
                "control",
                if served.is_empty() {
                    format!(
                        "mode `{}` is not served: this server serves no ControlNet",
                        control.mode
                    )
                } else {
                    format!(
                        "mode `{}` is not served: this server serves {}",
                        control.mode,
                        served.join(", ")
                    )
                },
            ));
        }
        if req.edit.is_some() {
            return Err(Error::invalid(
                "control",
                "a ControlNet condition and an image to edit cannot be combined: send one",
            ));
        }
        if !control.scale.is_finite() {
            return Err(Error::invalid(
                "control",
                format!("the scale {} is not a number", control.scale),
            ));
        }
        if !(0.0 <= control.start && control.start < control.end && control.end <= 1.0) {
            return Err(Error::invalid(
                "control",
                format!(
                    "start {} and end {} must satisfy 0 <= start < end <= 1",
                    control.start, control.end
                ),
            ));
        }
        let want = [1, 3, req.height, req.width];
        if control.image.dims() != want {
            return Err(Error::invalid(
                "control",
                format!(
                    "the control image has shape {:?}, expected {want:?} for {}x{}",
                    control.image.dims(),
                    req.width,
                    req.height
                ),
            ));
        }
        Ok(())
    }
}
