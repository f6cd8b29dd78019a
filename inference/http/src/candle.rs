//! The candle SD3.5 pipeline as a [`Backend`]: batched flow-matching sampling with
//! per-item cancellation at step boundaries.
//!
//! Sampling follows `Pipeline::sample` operation for operation (same noise, same guidance
//! arithmetic, same per-image VAE decode), only with `B` images side by side, so a batched
//! image equals the image generated alone.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sd35_pipeline::scheduler::FlowMatchSchedule;
use sd35_pipeline::{GenerateRequest, Pipeline, PipelineOptions, Precision};

use crate::backend::{Backend, Defaults, GenFailure, GenParams, ModelInfo, StepControl};

/// The loaded pipeline and what the server reports about it.
#[derive(Debug)]
pub struct CandleBackend {
    pipeline: Pipeline,
    device: Device,
    shift: f64,
    info: ModelInfo,
}

/// How to load the candle backend.
#[derive(Debug, Clone)]
pub struct CandleOptions {
    /// The directory to load: a model (any layout the pipeline reads) or a prebuilt engine.
    pub dir: std::path::PathBuf,
    /// Model id reported by the API (default: the directory's name).
    pub id: Option<String>,
    /// Engine key reported by the API, when serving an engine.
    pub engine_key: Option<String>,
    /// Weight precision (an engine brings its own).
    pub precision: Precision,
    /// Where to run.
    pub device: Device,
    /// Load T5.
    pub load_t5: bool,
    /// T5 sequence length.
    pub t5_max_tokens: usize,
}

/// The last component of a directory's canonical path.
pub fn dir_name(dir: &Path) -> Option<String> {
    dir.canonicalize()
        .ok()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

/// The scheduler shift of a model directory (diffusers layout keeps it in the scheduler config).
fn scheduler_shift(model: &Path) -> f64 {
    std::fs::read_to_string(model.join("scheduler/scheduler_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("shift").and_then(serde_json::Value::as_f64))
        .unwrap_or(3.0)
}

impl CandleBackend {
    /// Loads the model (or prebuilt engine) directory.
    pub fn load(o: CandleOptions) -> anyhow::Result<Self> {
        let CandleOptions {
            dir: model,
            id,
            engine_key,
            precision,
            device,
            load_t5,
            t5_max_tokens,
        } = o;
        let model = model.as_path();
        let opts = PipelineOptions {
            precision,
            device: device.clone(),
            load_t5,
            t5_max_length: t5_max_tokens,
            variant: None,
        };
        let pipeline = Pipeline::load(model, &opts)
            .map_err(|e| anyhow::anyhow!("cannot load the model {}: {e}", model.display()))?;
        let d = pipeline.default_request("");
        let variant = pipeline.variant();
        let id = id.unwrap_or_else(|| dir_name(model).unwrap_or_else(|| variant.to_string()));
        let info = ModelInfo {
            id,
            variant: variant.as_str().to_owned(),
            precision: precision.as_str().to_owned(),
            engine_key,
            t5_loaded: load_t5
                && pipeline
                    .tokenize("")
                    .map(|t| t.t5.is_some())
                    .unwrap_or(false),
            max_size: pipeline.max_size() as u32,
            defaults: Defaults {
                steps: d.steps as u32,
                guidance_scale: d.guidance,
                width: d.width as u32,
                height: d.height as u32,
            },
        };
        Ok(Self {
            pipeline,
            device,
            shift: scheduler_shift(model),
            info,
        })
    }

    fn request(&self, p: &GenParams) -> GenerateRequest {
        let mut req = self.pipeline.default_request(&p.prompt);
        req.negative_prompt = p.negative_prompt.clone();
        req.width = p.width as usize;
        req.height = p.height as usize;
        req.steps = p.steps as usize;
        req.guidance = p.guidance_scale;
        req.seed = p.seed;
        req
    }

    /// Samples the batch; `None` for items dropped on the way.
    fn sample(
        &self,
        batch: &[GenParams],
        control: &mut dyn StepControl,
    ) -> candle_core::Result<Vec<Option<Tensor>>> {
        let pl = &self.pipeline;
        let dev = &self.device;
        let to_candle = |e: sd35_pipeline::Error| candle_core::Error::Msg(e.to_string());
        let first = self.request(&batch[0]);
        let cfg = first.guidance > 1.0;
        let slg = if cfg { first.slg.clone() } else { None };
        let (mut lat, mut ctx, mut pooled, mut nctx, mut npooled) =
            (vec![], vec![], vec![], vec![], vec![]);
        for p in batch {
            let req = self.request(p);
            lat.push(pl.initial_latents(&req).map_err(to_candle)?);
            let (c, pp) = pl.encode_prompt(&req.prompt).map_err(to_candle)?;
            ctx.push(c);
            pooled.push(pp);
            if cfg {
                let (c, pp) = pl.encode_prompt(&req.negative_prompt).map_err(to_candle)?;
                nctx.push(c);
                npooled.push(pp);
            }
        }
        let cat = |v: &[Tensor]| Tensor::cat(v, 0);
        let mut latents = cat(&lat)?;
        let (mut ctx, mut pooled) = (cat(&ctx)?, cat(&pooled)?);
        let (mut nctx, mut npooled) = if cfg {
            (Some(cat(&nctx)?), Some(cat(&npooled)?))
        } else {
            (None, None)
        };
        // Original batch index of each row still sampled.
        let mut rows: Vec<usize> = (0..batch.len()).collect();
        let schedule = FlowMatchSchedule::new(first.steps, self.shift);
        let steps = schedule.len();
        let dtype = pl.compute_dtype();
        for (i, &t) in schedule.timesteps.iter().enumerate() {
            let keep: Vec<usize> = (0..rows.len())
                .filter(|&r| control.wanted(rows[r]))
                .collect();
            if keep.is_empty() {
                return Ok(vec![None; batch.len()]);
            }
            if keep.len() < rows.len() {
                let ids = Tensor::new(keep.iter().map(|&r| r as u32).collect::<Vec<_>>(), dev)?;
                latents = latents.index_select(&ids, 0)?;
                ctx = ctx.index_select(&ids, 0)?;
                pooled = pooled.index_select(&ids, 0)?;
                nctx = nctx.map(|t| t.index_select(&ids, 0)).transpose()?;
                npooled = npooled.map(|t| t.index_select(&ids, 0)).transpose()?;
                rows = keep.iter().map(|&r| rows[r]).collect();
            }
            let started = Instant::now();
            let b = rows.len();
            let x = latents.to_dtype(dtype)?;
            let noise = match (&nctx, &npooled) {
                (Some(nc), Some(np)) => {
                    let x_in = Tensor::cat(&[&x, &x], 0)?;
                    let c_in = Tensor::cat(&[nc, &ctx], 0)?;
                    let p_in = Tensor::cat(&[np, &pooled], 0)?;
                    let tt = Tensor::full(t, 2 * b, dev)?;
                    let pred = pl
                        .mmdit()
                        .forward(&x_in, &tt, &c_in, &p_in, &[])
                        .map_err(to_candle)?
                        .to_dtype(DType::F32)?;
                    let uncond = pred.narrow(0, 0, b)?;
                    let text = pred.narrow(0, b, b)?;
                    let mut noise = (&uncond + ((&text - &uncond)? * first.guidance)?)?;
                    if let Some(slg) = &slg {
                        let (fi, n) = (i as f64, steps as f64);
                        if fi > n * slg.start && fi < n * slg.stop {
                            let t1 = Tensor::full(t, b, dev)?;
                            let skip = pl
                                .mmdit()
                                .forward(&x, &t1, &ctx, &pooled, &slg.layers)
                                .map_err(to_candle)?
                                .to_dtype(DType::F32)?;
                            noise = (noise + ((&text - &skip)? * slg.scale)?)?;
                        }
                    }
                    noise
                }
                _ => {
                    let tt = Tensor::full(t, b, dev)?;
                    pl.mmdit()
                        .forward(&x, &tt, &ctx, &pooled, &[])
                        .map_err(to_candle)?
                        .to_dtype(DType::F32)?
                }
            };
            latents = (latents + (noise * f64::from(schedule.dt(i)))?)?;
            control.step_done(
                (i + 1) as u32,
                steps as u32,
                b,
                started.elapsed().as_secs_f64(),
            );
        }
        let mut out = vec![None; batch.len()];
        for (r, &orig) in rows.iter().enumerate() {
            out[orig] = Some(latents.narrow(0, r, 1)?);
        }
        Ok(out)
    }

    fn decode_png(&self, latents: &Tensor) -> Result<Vec<u8>, String> {
        let decoded = self.pipeline.decode(latents).map_err(|e| e.to_string())?;
        let img = sd35_pipeline::image::to_rgb(&decoded).map_err(|e| e.to_string())?;
        img.to_png().map_err(|e| e.to_string())
    }
}

impl Backend for CandleBackend {
    fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    fn generate(
        &mut self,
        batch: &[GenParams],
        control: &mut dyn StepControl,
    ) -> Vec<Result<Vec<u8>, GenFailure>> {
        if batch.is_empty() {
            return Vec::new();
        }
        match self.sample(batch, control) {
            Ok(latents) => latents
                .into_iter()
                .enumerate()
                .map(|(i, l)| match l {
                    Some(l) if control.wanted(i) => self.decode_png(&l).map_err(GenFailure::Failed),
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
