//! Validated parameters ([`GenParams`]) as the pipeline's [`GenerateRequest`]: the one
//! conversion, used by the served backend and by `sd35-server generate`, so a served image is
//! the image `generate` makes for the same parameters — skip-layer guidance, an image to edit,
//! LoRA adapters and a ControlNet condition (its picture preprocessed here) included.

use sd35_pipeline::control_image;
use sd35_pipeline::image::{self, RgbImage};
use sd35_pipeline::{
    Control, Edit, GenerateRequest, Pipeline, SkipLayerGuidance, Variant, model_card,
};

use crate::api::{ControlParams, EditParams, GenParams, Preprocess};

/// The skip-layer guidance a request naming `layers` gets: the model card's scale and
/// interval (the medium card's for variants without one).
pub fn slg_with_layers(card: Option<&SkipLayerGuidance>, layers: &[u32]) -> SkipLayerGuidance {
    let base = card.cloned().or(model_card(Variant::Medium).slg);
    let (scale, start, stop) = base.map_or((2.8, 0.01, 0.2), |b| (b.scale, b.start, b.stop));
    SkipLayerGuidance {
        layers: layers.iter().map(|&l| l as usize).collect(),
        scale,
        start,
        stop,
    }
}

/// The model card's skip-layer guidance when the transformer has every block it names;
/// otherwise none, and a warning that says so (a distilled or custom MMDiT-X with fewer
/// blocks than the card's model).
pub fn card_slg(pipeline: &Pipeline, warnings: &mut Vec<String>) -> Option<SkipLayerGuidance> {
    let slg = model_card(pipeline.variant()).slg?;
    let blocks = pipeline.mmdit().config().depth;
    if slg.layers.iter().all(|&l| l < blocks) {
        return Some(slg);
    }
    warnings.push(format!(
        "the model card's skip-layer guidance skips blocks {:?}, but this transformer has \
         {blocks} blocks (0 to {}): skip-layer guidance is off by default; a request may \
         name blocks that exist (`slg_layers`)",
        slg.layers,
        blocks.saturating_sub(1)
    ));
    None
}

/// The pipeline request of validated parameters: skip-layer guidance as the request names it
/// or `default_slg` (see [`card_slg`]), the image to edit and the control picture as the
/// pipeline's tensors, the adapters by name.
pub fn generate_request(
    pipeline: &Pipeline,
    params: &GenParams,
    default_slg: Option<&SkipLayerGuidance>,
) -> sd35_pipeline::Result<GenerateRequest> {
    let mut req = pipeline.default_request(&params.prompt);
    req.negative_prompt.clone_from(&params.negative_prompt);
    req.width = params.width as usize;
    req.height = params.height as usize;
    req.steps = params.steps as usize;
    req.guidance = params.guidance_scale;
    req.seed = params.seed;
    req.slg = match &params.slg_layers {
        None => default_slg.cloned(),
        Some(layers) if layers.is_empty() => None,
        Some(layers) => Some(slg_with_layers(
            model_card(pipeline.variant()).slg.as_ref(),
            layers,
        )),
    };
    req.edit = params.edit.as_ref().map(edit_tensors).transpose()?;
    req.loras.clone_from(&params.loras);
    req.control = params.control.as_ref().map(control_condition).transpose()?;
    Ok(req)
}

/// An edit as the pipeline takes it (tensors on the CPU; the pipeline moves them).
pub fn edit_tensors(edit: &EditParams) -> sd35_pipeline::Result<Edit> {
    let cpu = candle_core::Device::Cpu;
    let picture = RgbImage {
        width: edit.image.width as usize,
        height: edit.image.height as usize,
        pixels: edit.image.rgb.clone(),
    };
    Ok(Edit {
        image: image::to_tensor(&picture, &cpu)?,
        mask: edit
            .mask
            .as_ref()
            .map(|m| image::mask_tensor(&m.grey, m.width as usize, m.height as usize, &cpu))
            .transpose()?,
        strength: edit.strength,
    })
}

/// A ControlNet condition as the pipeline takes it: the picture made into the control image
/// (as it is, or its Canny edges or a blur of it), a tensor on the CPU.
pub fn control_condition(control: &ControlParams) -> sd35_pipeline::Result<Control> {
    let picture = RgbImage {
        width: control.image.width as usize,
        height: control.image.height as usize,
        pixels: control.image.rgb.clone(),
    };
    // The pipeline takes f32 thresholds and σ; the API's bounds keep them well inside f32.
    let made = match control.preprocess {
        None => picture,
        Some(Preprocess::Canny { low, high }) => {
            control_image::canny(&picture, low as f32, high as f32)?
        }
        Some(Preprocess::Blur { sigma }) => control_image::gaussian_blur(&picture, sigma as f32)?,
    };
    Ok(Control {
        mode: control.mode,
        image: image::to_tensor(&made, &candle_core::Device::Cpu)?,
        scale: control.scale,
        start: control.start,
        end: control.end,
    })
}

#[cfg(test)]
mod tests {
    use crate::api::bounds;
    use sd35_pipeline::control_image as pipeline;

    /// The API's preprocessing bounds are the pipeline's: what validation accepts, the
    /// pipeline runs.
    #[test]
    fn the_apis_preprocessing_bounds_are_the_pipelines() {
        assert_eq!(
            bounds::DEFAULT_CANNY,
            (
                f64::from(pipeline::DEFAULT_CANNY_LOW),
                f64::from(pipeline::DEFAULT_CANNY_HIGH)
            )
        );
        assert_eq!(
            bounds::MAX_CANNY_THRESHOLD as f32,
            pipeline::CANNY_MAX_THRESHOLD
        );
        assert_eq!(
            bounds::DEFAULT_BLUR_SIGMA,
            f64::from(pipeline::DEFAULT_BLUR_SIGMA)
        );
        assert_eq!(bounds::MAX_BLUR_SIGMA, f64::from(pipeline::MAX_BLUR_SIGMA));
    }
}
