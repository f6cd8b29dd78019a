//! The candle SD3.5 pipeline as a [`Backend`]. Sampling is the pipeline's own
//! [`Pipeline::sample_batch`] — the loop `generate` runs and the goldens test — so a served
//! image for a seed is the image `generate` makes for it; previews are the sampler's preview
//! latents decoded by the VAE, and the engine's smoke image is checked with the same sampler.

use std::path::{Path, PathBuf};

use sd35_contract::plan::MemoryGate;
use sd35_contract::{CacheManifest, DeviceKind, Precision, Variant};
use sd35_pipeline::device::OpenedDevice;
use sd35_pipeline::{
    Edit, GenerateRequest, Pipeline, PipelineOptions, SkipLayerGuidance, VariantSource, model_card,
};

use crate::backend::{
    Backend, Defaults, GenControl, GenFailure, GenParams, ModelInfo, SkipLayerInfo, StepControl,
};

/// The loaded pipeline and what the server reports about it.
#[derive(Debug)]
pub struct CandleBackend {
    pipeline: Pipeline,
    info: ModelInfo,
    smoke: Option<sd35_contract::SmokeRecord>,
    /// Skip-layer guidance of requests that name no blocks: the model card's, when the
    /// transformer has the blocks it names.
    default_slg: Option<SkipLayerGuidance>,
}

/// The skip-layer guidance a request naming `layers` gets: the model card's scale and
/// interval (the medium card's for variants without one).
fn slg_with_layers(card: Option<&SkipLayerGuidance>, layers: &[u32]) -> SkipLayerGuidance {
    let base = card.cloned().or(model_card(Variant::Medium).slg);
    let (scale, start, stop) = base.map_or((2.8, 0.01, 0.2), |b| (b.scale, b.start, b.stop));
    SkipLayerGuidance {
        layers: layers.iter().map(|&l| l as usize).collect(),
        scale,
        start,
        stop,
    }
}

/// The model card's skip-layer guidance when this transformer has every block it names;
/// otherwise none, and a warning that says so (a distilled or custom MMDiT-X with fewer
/// blocks than the card's model).
fn card_slg(
    card: Option<SkipLayerGuidance>,
    blocks: usize,
    warnings: &mut Vec<String>,
) -> Option<SkipLayerGuidance> {
    let slg = card?;
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

fn decode_png(pipeline: &Pipeline, latents: &candle_core::Tensor) -> Result<Vec<u8>, String> {
    let decoded = pipeline.decode(latents).map_err(|e| e.to_string())?;
    let img = sd35_pipeline::image::to_rgb(&decoded).map_err(|e| e.to_string())?;
    img.to_png().map_err(|e| e.to_string())
}

/// The caller's control, with preview latents decoded into PNGs on the way.
struct Decoding<'a> {
    pipeline: &'a Pipeline,
    outer: &'a mut dyn GenControl,
}

impl StepControl for Decoding<'_> {
    fn wanted(&mut self, index: usize) -> bool {
        self.outer.wanted(index)
    }
    fn step_done(&mut self, step: usize, steps: usize, live: usize, seconds: f64) {
        self.outer.step_done(step, steps, live, seconds);
    }
    fn preview_wanted(&mut self, index: usize, step: usize, steps: usize) -> bool {
        self.outer.preview_wanted(index, step, steps)
    }
    fn preview(&mut self, index: usize, step: usize, latents: &candle_core::Tensor) {
        match decode_png(self.pipeline, latents) {
            Ok(png) => self.outer.partial_image(index, step, png),
            // A preview is a courtesy: the image itself still comes.
            Err(e) => tracing::warn!(step, error = %e, "a preview could not be decoded"),
        }
    }
}

/// How to load the candle backend.
#[derive(Debug, Clone)]
pub struct CandleOptions {
    /// The model directory (any layout the pipeline reads; a cache model directory).
    pub model: PathBuf,
    /// A prebuilt engine to serve instead of the model's own weights.
    pub engine: Option<PathBuf>,
    /// The variant asked for (must match the engine's and the model's structure).
    pub variant: Option<Variant>,
    /// The precision asked for (must match the engine's).
    pub precision: Option<Precision>,
    /// Names clients may send as `model`; empty: the variant's default names.
    pub served_names: Vec<String>,
    /// Where to run.
    pub device: OpenedDevice,
    /// Load T5.
    pub load_t5: bool,
    /// T5 sequence length.
    pub t5_max_tokens: usize,
    /// Device memory the server may use in all (`--memory-limit`); unset: what is free.
    pub memory_limit: Option<u64>,
}

/// Kept free beside a request's planned activations (allocator slack, cuBLAS's workspace).
const MEMORY_MARGIN_BYTES: u64 = 256 << 20;

/// What requests are checked against: the loaded model's shapes and weights, and the memory
/// the device has left for activations (capped by `--memory-limit`), measured now that the
/// model is loaded. `None`, with a warning, when the device's memory cannot be read.
fn memory_gate(
    pipeline: &Pipeline,
    device: &OpenedDevice,
    limit: Option<u64>,
    warnings: &mut Vec<String>,
) -> sd35_pipeline::Result<Option<MemoryGate>> {
    let spec = pipeline.spec()?;
    let weights = pipeline.weight_bytes();
    let plan_device = sd35_pipeline::plan::plan_device(
        device,
        pipeline.precision(),
        sd35_pipeline::op_graph::current(),
    );
    let measured = device.memory();
    let free = match (measured, limit) {
        (Some(m), Some(limit)) => Some(m.free.min(limit.saturating_sub(weights.total()))),
        (Some(m), None) => Some(m.free),
        (None, Some(limit)) => Some(limit.saturating_sub(weights.total())),
        (None, None) => None,
    };
    let Some(free) = free else {
        warnings.push(
            "the device's free memory could not be read: requests are not checked against \
             the memory plan"
                .to_owned(),
        );
        return Ok(None);
    };
    Ok(Some(MemoryGate {
        spec,
        weights,
        device: plan_device,
        t5_tokens: pipeline.t5_length(),
        activation_budget_bytes: free.saturating_sub(MEMORY_MARGIN_BYTES),
        free_bytes: measured.map(|m| m.free),
        total_bytes: measured.map(|m| m.total),
    }))
}

/// The last component of a directory's canonical path.
pub fn dir_name(dir: &Path) -> Option<String> {
    dir.canonicalize()
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

impl CandleBackend {
    /// Loads the model (or its prebuilt engine).
    pub fn load(o: CandleOptions) -> sd35_pipeline::Result<Self> {
        let dir = o.engine.as_deref().unwrap_or(&o.model);
        let opts = PipelineOptions {
            precision: o.precision,
            device: o.device.device.clone(),
            load_t5: o.load_t5,
            t5_max_length: o.t5_max_tokens,
            variant: o.variant,
        };
        let pipeline = Pipeline::load(dir, &opts)?;
        let engine = match &o.engine {
            Some(e) => Some(sd35_pipeline::engine::open(e, false)?),
            None => None,
        };
        let marker = CacheManifest::read(&o.model).ok();
        let variant = pipeline.variant();
        let repo = engine
            .as_ref()
            .and_then(|m| m.source_repo.clone())
            .or_else(|| marker.as_ref().and_then(|m| m.repo().map(str::to_owned)));
        let mut served_names = if o.served_names.is_empty() {
            sd35_contract::default_served_names(variant, repo.as_deref())
        } else {
            o.served_names.clone()
        };
        sd35_contract::dedup_in_order(&mut served_names);
        let mut warnings: Vec<String> = o.device.warning.iter().cloned().collect();
        if pipeline.variant_source() == VariantSource::Assumed {
            warnings.push(format!(
                "nothing states the variant of {}: serving it as {variant}; pass --variant \
                 (large and large-turbo have the same architecture but different defaults)",
                o.model.display()
            ));
        }
        if engine.is_none() && pipeline.precision() == Precision::Fp8 {
            warnings.push(
                "no prebuilt engine: the weights were quantised to fp8 at start-up".to_owned(),
            );
        }
        let memory = memory_gate(&pipeline, &o.device, o.memory_limit, &mut warnings)?;
        let d = pipeline.default_request("");
        let blocks = pipeline.mmdit().config().depth;
        let default_slg = card_slg(model_card(variant).slg, blocks, &mut warnings);
        let info = ModelInfo {
            id: served_names
                .first()
                .cloned()
                .unwrap_or_else(|| variant.to_string()),
            served_names,
            variant,
            variant_source: pipeline.variant_source().as_str().to_owned(),
            precision: pipeline.precision(),
            device: o.device.kind,
            gpu_name: o.device.gpu_name.clone(),
            compute_capability: o.device.compute_capability.map(|c| c.to_string()),
            fp8_tensor_cores: o.device.fp8_capability() == sd35_contract::Fp8Path::TensorCore,
            fp8_path: o.device.fp8_path().as_str().to_owned(),
            engine_key: engine.as_ref().map(|m| m.engine_key.clone()),
            cache_key: engine
                .as_ref()
                .map(|m| m.source_cache_key.clone())
                .or_else(|| marker.as_ref().and_then(|_| dir_name(&o.model))),
            t5_loaded: pipeline.t5_loaded(),
            max_size: pipeline.max_size() as u32,
            transformer_blocks: blocks as u32,
            image_editing: pipeline.spec()?.vae.encoder,
            defaults: Defaults {
                steps: d.steps as u32,
                guidance_scale: d.guidance,
                width: d.width as u32,
                height: d.height as u32,
            },
            skip_layer_guidance: default_slg.as_ref().map(|s| SkipLayerInfo {
                layers: s.layers.clone(),
                scale: s.scale,
                start: s.start,
                stop: s.stop,
            }),
            warnings,
            op_graph: sd35_pipeline::op_graph::current().name().to_owned(),
            memory,
        };
        debug_assert!(o.device.kind != DeviceKind::Auto);
        Ok(Self {
            pipeline,
            info,
            smoke: engine.and_then(|m| m.smoke),
            default_slg,
        })
    }

    /// Whether the served engine has its smoke image (an engine without one was not built to
    /// completion); `None` when no engine is served.
    pub fn engine_has_smoke(&self) -> Option<bool> {
        self.info.engine_key.as_ref().map(|_| self.smoke.is_some())
    }

    /// Repeats the engine's smoke image and compares it with the record (see
    /// [`sd35_pipeline::smoke`]); `None` when no engine with a smoke image is served.
    pub fn check_smoke(
        &self,
        min_psnr_db: Option<f64>,
    ) -> Option<sd35_pipeline::Result<sd35_pipeline::smoke::SmokeCheck>> {
        let record = self.smoke.as_ref()?;
        Some(sd35_pipeline::smoke::check(
            &self.pipeline,
            record,
            self.info.device,
            min_psnr_db,
        ))
    }

    /// The pipeline request for validated parameters: skip-layer guidance as the request
    /// names it or the server's default, the image to edit as the pipeline's tensors.
    fn request(&self, p: &GenParams) -> sd35_pipeline::Result<GenerateRequest> {
        let mut req = self.pipeline.default_request(&p.prompt);
        req.negative_prompt.clone_from(&p.negative_prompt);
        req.width = p.width as usize;
        req.height = p.height as usize;
        req.steps = p.steps as usize;
        req.guidance = p.guidance_scale;
        req.seed = p.seed;
        req.slg = match &p.slg_layers {
            None => self.default_slg.clone(),
            Some(layers) if layers.is_empty() => None,
            Some(layers) => Some(slg_with_layers(
                model_card(self.info.variant).slg.as_ref(),
                layers,
            )),
        };
        if let Some(edit) = &p.edit {
            req.edit = Some(edit_tensors(edit)?);
        }
        Ok(req)
    }
}

/// An edit as the pipeline takes it (tensors on the CPU; the pipeline moves them).
pub fn edit_tensors(edit: &crate::backend::EditParams) -> sd35_pipeline::Result<Edit> {
    use sd35_pipeline::image;
    let cpu = candle_core::Device::Cpu;
    let picture = image::RgbImage {
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

impl Backend for CandleBackend {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn generate(
        &mut self,
        batch: &[GenParams],
        control: &mut dyn GenControl,
    ) -> Vec<Result<Vec<u8>, GenFailure>> {
        let reqs = match batch
            .iter()
            .map(|p| self.request(p))
            .collect::<sd35_pipeline::Result<Vec<GenerateRequest>>>()
        {
            Ok(reqs) => reqs,
            Err(e) => {
                let msg = format!("generation failed: {e}");
                return batch
                    .iter()
                    .map(|_| Err(GenFailure::Failed(msg.clone())))
                    .collect();
            }
        };
        let sampled = {
            let mut decoding = Decoding {
                pipeline: &self.pipeline,
                outer: &mut *control,
            };
            self.pipeline.sample_batch(&reqs, &mut decoding)
        };
        match sampled {
            Ok(latents) => latents
                .into_iter()
                .enumerate()
                .map(|(i, l)| match l {
                    Some(l) if control.wanted(i) => {
                        decode_png(&self.pipeline, &l).map_err(GenFailure::Failed)
                    }
                    _ => Err(GenFailure::Cancelled),
                })
                .collect(),
            Err(e) => {
                let msg = format!("generation failed: {e}");
                batch
                    .iter()
                    .map(|_| Err(GenFailure::Failed(msg.clone())))
                    .collect()
            }
        }
    }
}
