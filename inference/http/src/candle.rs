//! The candle SD3.5 pipeline as a [`Backend`]. Sampling is the pipeline's own
//! [`Pipeline::sample_batch`] — the loop `generate` runs and the goldens test — and requests
//! become pipeline requests through [`crate::to_pipeline`], as `generate`'s do, so a served
//! image for a seed is the image `generate` makes for it; previews are the sampler's preview
//! latents decoded by the VAE, and the engine's smoke image is checked with the same sampler.

use std::path::Path;

use sd35_contract::plan::MemoryGate;
use sd35_contract::{CacheManifest, ExitError, ExitReason, Precision, ServeArgs};
use sd35_pipeline::device::OpenedDevice;
use sd35_pipeline::{
    GenerateRequest, ModelSource, Pipeline, PipelineOptions, SkipLayerGuidance, VariantSource,
};

use crate::api::{AdapterInfo, ServedModel};
use crate::backend::{
    Backend, Defaults, GenControl, GenFailure, GenParams, ModelInfo, SkipLayerInfo, StepControl,
};
use crate::config::ServeConfig;
use crate::to_pipeline::{card_slg, generate_request};

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

/// The pipeline's options for what `args` serve on `device`.
fn pipeline_options(args: &ServeArgs, device: &OpenedDevice) -> PipelineOptions {
    PipelineOptions {
        precision: args.precision,
        device: device.device.clone(),
        load_t5: !args.no_t5,
        t5_max_length: args.t5_max_tokens as usize,
        variant: args.variant,
    }
}

/// Kept free beside a request's planned activations (allocator slack, cuBLAS's workspace).
const MEMORY_MARGIN_BYTES: u64 = 256 << 20;

/// What requests are checked against: the loaded model's shapes and weights (with what is
/// served beside it: the ControlNets, the LoRA updates of a request naming every adapter, and
/// on the CPU the LoRA files as read), and the memory the device has left for activations
/// (capped by `--memory-limit`), measured now that the model and its ControlNets are loaded
/// (the LoRA updates are compiled per request, so they come off what is measured). `None`,
/// with a warning, when the device's memory cannot be read.
fn memory_gate(
    pipeline: &Pipeline,
    device: &OpenedDevice,
    limit: Option<u64>,
    warnings: &mut Vec<String>,
) -> sd35_pipeline::Result<Option<MemoryGate>> {
    let spec = pipeline.spec()?;
    let compiled_loras = pipeline.lora_bytes()?;
    let lora_files: u64 = if device.device.is_cpu() {
        pipeline
            .loras()
            .flat_map(|(_, file)| file.pieces.values().flatten())
            .map(|piece| 4 * (piece.down.elem_count() + piece.up.elem_count()) as u64)
            .sum()
    } else {
        0
    };
    let controlnets: u64 = pipeline.controlnets().map(|(_, n)| n.weight_bytes()).sum();
    let mut weights = pipeline.weight_bytes();
    weights.adapters = controlnets + compiled_loras + lora_files;
    let plan_device = sd35_pipeline::plan::plan_device(
        device,
        pipeline.precision(),
        sd35_pipeline::op_graph::current(),
    );
    let measured = device.memory();
    let free = match (measured, limit) {
        (Some(m), Some(limit)) => Some(
            m.free
                .saturating_sub(compiled_loras)
                .min(limit.saturating_sub(weights.total())),
        ),
        (Some(m), None) => Some(m.free.saturating_sub(compiled_loras)),
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

/// A start-up failure of a pipeline call, `what` saying what was being done.
pub fn pipeline_failure(what: &str, e: &sd35_pipeline::Error) -> ExitError {
    ExitError::new(e.exit_reason(), format!("{what}: {e}"))
}

/// A `--lora` or `--controlnet` file that cannot be served: missing or unreadable as the
/// pipeline says, anything else (not an adapter, made for another model) `InvalidModel`.
fn adapter_failure(flag: &str, e: &sd35_pipeline::Error) -> ExitError {
    let reason = match e.exit_reason() {
        ExitReason::NotFound | ExitReason::PermissionDenied => e.exit_reason(),
        _ => ExitReason::InvalidModel,
    };
    ExitError::new(reason, format!("{flag}: {e}"))
}

/// The served adapters as the API reports them: each `--lora` with its default scale, what it
/// adapts, its file and the file's metadata.
fn adapter_infos(config: &ServeConfig, pipeline: &Pipeline) -> Vec<AdapterInfo> {
    config
        .args
        .loras
        .iter()
        .map(|lora| {
            let text_encoders = pipeline
                .loras()
                .find(|(name, _)| *name == lora.name)
                .is_some_and(|(_, file)| file.has_text_encoders());
            let metadata = sd35_contract::read_safetensors_header(&lora.path)
                .ok()
                .and_then(|h| h.metadata)
                .and_then(|m| serde_json::from_value(m).ok())
                .unwrap_or_default();
            AdapterInfo {
                name: lora.name.clone(),
                scale: lora.scale.unwrap_or(1.0),
                text_encoders,
                path: lora.path.display().to_string(),
                metadata,
            }
        })
        .collect()
}

impl CandleBackend {
    /// Loads what `config` serves from `source` (the model or its engine, opened once at
    /// start-up) on `device`, then every `--lora` and `--controlnet`, each checked against the
    /// model (a file that is not an adapter, or one made for another model, fails here naming
    /// the flag, the file and the mismatch).
    pub fn load(
        config: &ServeConfig,
        source: &ModelSource,
        device: &OpenedDevice,
    ) -> Result<Self, ExitError> {
        let args = &config.args;
        let mut pipeline =
            Pipeline::load_source(source, &pipeline_options(args, device)).map_err(|e| {
                pipeline_failure(
                    &format!("cannot load the model {}", source.weights.display()),
                    &e,
                )
            })?;
        for lora in &args.loras {
            pipeline
                .add_lora(&lora.name, &lora.path)
                .map_err(|e| adapter_failure(&format!("--lora {lora}"), &e))?;
        }
        for net in &args.controlnets {
            pipeline
                .add_controlnet(net.mode, &net.path)
                .map_err(|e| adapter_failure(&format!("--controlnet {net}"), &e))?;
        }
        let adapters = adapter_infos(config, &pipeline);
        let model_failure = |e: sd35_pipeline::Error| {
            pipeline_failure(
                &format!("cannot load the model {}", source.weights.display()),
                &e,
            )
        };
        let engine = source.engine.as_ref();
        let marker: Option<&CacheManifest> = source.marker.as_ref();
        let variant = pipeline.variant();
        let repo = engine
            .and_then(|m| m.source_repo.clone())
            .or_else(|| marker.and_then(|m| m.repo().map(str::to_owned)));
        let mut served_names = if args.served_model_names.is_empty() {
            sd35_contract::default_served_names(variant, repo.as_deref())
        } else {
            args.served_model_names.clone()
        };
        sd35_contract::dedup_in_order(&mut served_names);
        let mut warnings: Vec<String> = device.warning.iter().cloned().collect();
        if pipeline.variant_source() == VariantSource::Assumed {
            warnings.push(format!(
                "nothing states the variant of {}: serving it as {variant}; pass --variant \
                 (large and large-turbo have the same architecture but different defaults)",
                args.model.display()
            ));
        }
        if engine.is_none() && pipeline.precision() == Precision::Fp8 {
            warnings.push(
                "no prebuilt engine: the weights were quantised to fp8 at start-up".to_owned(),
            );
        }
        let memory = memory_gate(&pipeline, device, config.memory_limit, &mut warnings)
            .map_err(model_failure)?;
        let card = pipeline.default_request("");
        let default_slg = card_slg(&pipeline, &mut warnings);
        let info = ModelInfo {
            id: served_names
                .first()
                .cloned()
                .unwrap_or_else(|| variant.to_string()),
            served: ServedModel {
                served_names,
                variant,
                variant_source: pipeline.variant_source().as_str().to_owned(),
                precision: pipeline.precision(),
                device: device.kind,
                gpu_name: device.gpu_name.clone(),
                compute_capability: device.compute_capability.map(|c| c.to_string()),
                fp8_tensor_cores: device.fp8_capability() == sd35_contract::Fp8Path::TensorCore,
                fp8_path: device.fp8_path().as_str().to_owned(),
                engine_key: engine.map(|m| m.engine_key.clone()),
                cache_key: engine
                    .map(|m| m.source_cache_key.clone())
                    .or_else(|| marker.and_then(|_| dir_name(&args.model))),
                t5_loaded: pipeline.t5_loaded(),
                image_editing: pipeline.spec().map_err(model_failure)?.vae.encoder,
                warnings,
                op_graph: sd35_pipeline::op_graph::current().name().to_owned(),
                adapters,
                control_modes: pipeline.controlnets().map(|(mode, _)| mode).collect(),
            },
            max_size: pipeline.max_size() as u32,
            transformer_blocks: pipeline.mmdit().config().depth as u32,
            defaults: Defaults {
                steps: card.steps as u32,
                guidance_scale: card.guidance,
                width: card.width as u32,
                height: card.height as u32,
            },
            skip_layer_guidance: default_slg.as_ref().map(|s| SkipLayerInfo {
                layers: s.layers.clone(),
                scale: s.scale,
                start: s.start,
                stop: s.stop,
            }),
            memory,
        };
        Ok(Self {
            pipeline,
            info,
            smoke: engine.and_then(|m| m.smoke.clone()),
            default_slg,
        })
    }

    /// Whether the served engine has its smoke image (an engine without one was not built to
    /// completion); `None` when no engine is served.
    pub fn engine_has_smoke(&self) -> Option<bool> {
        self.info
            .served
            .engine_key
            .as_ref()
            .map(|_| self.smoke.is_some())
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
            self.info.served.device,
            min_psnr_db,
        ))
    }
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
        let failed = |e: sd35_pipeline::Error| {
            let msg = format!("generation failed: {e}");
            batch
                .iter()
                .map(|_| Err(GenFailure::Failed(msg.clone())))
                .collect()
        };
        let reqs = match batch
            .iter()
            .map(|p| generate_request(&self.pipeline, p, self.default_slg.as_ref()))
            .collect::<sd35_pipeline::Result<Vec<GenerateRequest>>>()
        {
            Ok(reqs) => reqs,
            Err(e) => return failed(e),
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
            Err(e) => failed(e),
        }
    }
}
