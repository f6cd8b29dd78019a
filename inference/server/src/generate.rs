//! `sd35-server generate`: one image from the command line, with progress per step — drawn
//! from a prompt, or an edit of an image (`--image`, and `--mask` to inpaint); with LoRA
//! adapters (`--lora`) and a ControlNet condition (`--controlnet`).
//!
//! An image to edit and a control picture are read exactly as the server reads an upload (the
//! same decoding, EXIF orientation, size defaults and resizing), and the parameters become the
//! pipeline's request through the server's own conversion (`sd35_http::to_pipeline`), so
//! `generate` and the server make the same image for the same request.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use sd35_contract::ControlMode;
use sd35_http::api::edit::{self, EditUpload, MaskRule, MaskUpload};
use sd35_http::api::{ApiError, ControlParams, GenParams, PreprocessRequest, adapters};
use sd35_http::to_pipeline::{card_slg, generate_request};
use sd35_pipeline::{DeviceKind, Pipeline, PipelineOptions, Precision, Variant};

/// Arguments of `generate`. Unset sampling options take the variant's model-card defaults.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Model directory (diffusers layout, Stability single-file layout, or a prebuilt engine).
    #[arg(long)]
    model: PathBuf,
    /// What to draw.
    #[arg(long)]
    prompt: String,
    /// What to steer away from (used when guidance > 1).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// Output PNG file.
    #[arg(long)]
    out: PathBuf,
    /// Width in pixels, a multiple of 16 [default: 1024, capped by the model].
    #[arg(long)]
    width: Option<usize>,
    /// Height in pixels, a multiple of 16 [default: 1024, capped by the model].
    #[arg(long)]
    height: Option<usize>,
    /// Denoising steps [default: large 28, large-turbo 4, medium 40].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance; ≤ 1 disables it [default: large 3.5, large-turbo 0, medium 4.5].
    #[arg(long)]
    guidance: Option<f64>,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Weight precision: f32, bf16 or fp8 [default: an engine's own, else bf16 on CUDA and
    /// f32 on the CPU].
    #[arg(long)]
    precision: Option<Precision>,
    /// Model variant: large, large-turbo or medium [default: what an engine or cache marker
    /// says, else medium for an MMDiT-X and large otherwise].
    #[arg(long)]
    variant: Option<Variant>,
    /// Skip-layer guidance layers, comma separated, or `none` [default: medium 7,8,9].
    #[arg(long)]
    slg_layers: Option<String>,
    /// Skip-layer guidance scale [default: 2.8].
    #[arg(long)]
    slg_scale: Option<f64>,
    /// Fraction of the steps after which skip-layer guidance starts [default: 0.01].
    #[arg(long)]
    slg_start: Option<f64>,
    /// Fraction of the steps before which skip-layer guidance stops [default: 0.2].
    #[arg(long)]
    slg_stop: Option<f64>,
    /// Safetensors file with an f32 tensor `latents` [1, 16, H/8, W/8] replacing seeded noise.
    #[arg(long)]
    init_latents: Option<PathBuf>,
    /// An image to edit (img2img): PNG, JPEG or WebP, its EXIF orientation applied. Width and
    /// height default to its size rounded down to a multiple of 16; an image of another size
    /// than the one asked for is resized to it (Lanczos, a = 3, the aspect ratio not kept, as
    /// diffusers resizes).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Inpaint: a mask of the image's size, white where to repaint (its grey level at least
    /// 128, as diffusers reads masks). Needs --image.
    #[arg(long, requires = "image")]
    mask: Option<PathBuf>,
    /// How much of the schedule an edit runs, above 0 and at most 1: 1 draws (the masked
    /// region) anew, 0.6 runs the last 60 % of the steps [default: 0.6]. Needs --image.
    #[arg(long, requires = "image")]
    strength: Option<f64>,
    /// A LoRA adapter, `FILE[:SCALE]` (repeatable, applied in the order given; SCALE 1 by
    /// default): a PEFT or sd-scripts (kohya) safetensors file.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    loras: Vec<String>,
    /// An SD3.5 ControlNet: a diffusers folder or one safetensors file. Needs
    /// --control-image and --control-mode.
    #[arg(long, requires_all = ["control_image", "control_mode"])]
    controlnet: Option<PathBuf>,
    /// The control picture (PNG, JPEG or WebP), resized to the image's size: the control
    /// image itself (edges, a blur, a depth map), unless --control-preprocess makes it.
    #[arg(long, requires = "controlnet")]
    control_image: Option<PathBuf>,
    /// What the ControlNet conditions on: canny, depth or blur.
    #[arg(long, requires = "controlnet")]
    control_mode: Option<ControlMode>,
    /// `controlnet_conditioning_scale` [default: 1].
    #[arg(long, requires = "controlnet")]
    control_scale: Option<f64>,
    /// The fraction of the steps before which the condition is off [default: 0].
    #[arg(long, requires = "controlnet")]
    control_start: Option<f64>,
    /// The fraction of the steps after which the condition is off [default: 1].
    #[arg(long, requires = "controlnet")]
    control_end: Option<f64>,
    /// Make the control image from the picture: alone, the mode's defaults (canny thresholds
    /// 100 and 200, blur σ 2); `LOW,HIGH` canny thresholds; `SIGMA` a blur's σ in pixels.
    #[arg(long, requires = "controlnet", num_args = 0..=1, default_missing_value = "",
          value_name = "LOW,HIGH | SIGMA")]
    control_preprocess: Option<String>,
    /// Do not load T5 (its embedding is then zeros).
    #[arg(long)]
    no_t5: bool,
    /// T5 sequence length (at most 512).
    #[arg(long, default_value_t = 256)]
    t5_max_length: usize,
    /// Where to run: auto (CUDA when this binary has it and a GPU is usable), cuda or cpu.
    #[arg(long, value_enum, default_value_t = DeviceKind::Auto)]
    device: DeviceKind,
    /// Same as `--device cuda`.
    #[arg(long, hide = true)]
    cuda: bool,
}

/// `--slg-layers`: `none` (or nothing) turns skip-layer guidance off, else block indices.
fn parse_layers(s: &str) -> anyhow::Result<Vec<u32>> {
    if s.trim().eq_ignore_ascii_case("none") || s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|l| {
            l.trim()
                .parse::<u32>()
                .with_context(|| format!("--slg-layers: `{l}` is not a layer index"))
        })
        .collect()
}

/// `--lora FILE[:SCALE]`: the file and its scale (1 when none is given; a suffix that is not a
/// number is part of the file's name).
fn parse_lora(arg: &str) -> anyhow::Result<(PathBuf, f64)> {
    if let Some((file, scale)) = arg.rsplit_once(':')
        && let Ok(scale) = scale.parse::<f64>()
    {
        if !scale.is_finite() {
            bail!("--lora {arg}: the scale is not a number");
        }
        return Ok((PathBuf::from(file), scale));
    }
    Ok((PathBuf::from(arg), 1.0))
}

/// `--control-preprocess [LOW,HIGH | SIGMA]` as the API's preprocessing field.
fn parse_preprocess(text: &str) -> anyhow::Result<PreprocessRequest> {
    let number = |v: &str| {
        v.trim()
            .parse::<f64>()
            .with_context(|| format!("--control-preprocess: `{v}` is not a number"))
    };
    Ok(match text.split_once(',') {
        _ if text.trim().is_empty() => PreprocessRequest::Switch(true),
        Some((low, high)) => PreprocessRequest::Canny {
            low: number(low)?,
            high: number(high)?,
        },
        None => PreprocessRequest::Blur {
            sigma: number(text)?,
        },
    })
}

/// An error of the API's validation, as a command-line error naming `flag`.
fn flag_error(flag: &str, e: ApiError) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", e.field.as_deref().unwrap_or(flag), e.message)
}

/// Reads a file a flag names.
fn read(flag: &str, path: Option<&PathBuf>) -> anyhow::Result<Option<Vec<u8>>> {
    path.map(|p| std::fs::read(p).with_context(|| format!("{flag} {}", p.display())))
        .transpose()
}

/// Runs `generate`.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let choice = if args.cuda {
        DeviceKind::Cuda
    } else {
        args.device
    };
    // Chosen once, before loading (SD35_GENERIC_OPS=1: on the CPU, the operations a GPU runs).
    let graph = sd35_pipeline::op_graph::install(sd35_pipeline::op_graph::OpGraph::from_env()?)?;
    tracing::info!(
        op_graph = graph.name(),
        chunk_elements = graph.chunk_elements,
        "op graph"
    );
    let opened = sd35_pipeline::device::open(choice)?;
    if let Some(w) = &opened.warning {
        tracing::warn!("{w}");
    }
    let opts = PipelineOptions {
        precision: args.precision,
        device: opened.device,
        load_t5: !args.no_t5,
        t5_max_length: args.t5_max_length,
        variant: args.variant,
    };
    let started = Instant::now();
    let mut pipeline = Pipeline::load(&args.model, &opts)
        .with_context(|| format!("loading {}", args.model.display()))?;
    tracing::info!(
        variant = %pipeline.variant(),
        variant_source = pipeline.variant_source().as_str(),
        precision = %pipeline.precision(),
        device = opened.kind.as_str(),
        seconds = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    let mut loras = Vec::with_capacity(args.loras.len());
    for (i, arg) in args.loras.iter().enumerate() {
        let (file, scale) = parse_lora(arg)?;
        let name = format!("{i}-{}", file.display());
        pipeline
            .add_lora(&name, &file)
            .with_context(|| format!("--lora {arg}"))?;
        loras.push((name, scale));
    }
    if let (Some(path), Some(mode)) = (&args.controlnet, args.control_mode) {
        pipeline
            .add_controlnet(mode, path)
            .with_context(|| format!("--controlnet {}", path.display()))?;
    }

    // The files of an edit and of a condition, read before anything is sampled.
    let image = read("--image", args.image.as_ref())?;
    let mask = read("--mask", args.mask.as_ref())?;
    let control_picture = read("--control-image", args.control_image.as_ref())?;
    let upload = image
        .as_deref()
        .map(|bytes| {
            EditUpload::probe(
                "--image",
                bytes,
                mask.as_deref().map(|bytes| MaskUpload {
                    field: "--mask",
                    bytes,
                    rule: MaskRule::White,
                }),
            )
        })
        .transpose()
        .map_err(|e| flag_error("--image", e))?;
    let card = pipeline.default_request(&args.prompt);
    // An edit's size defaults to its image's.
    let (width, height) = match &upload {
        Some(upload) => upload
            .default_size()
            .map_err(|e| flag_error("--image", e))?,
        None => (card.width as u32, card.height as u32),
    };
    let mut params = GenParams {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width: args
            .width
            .map_or(Ok(width), u32::try_from)
            .context("--width")?,
        height: args
            .height
            .map_or(Ok(height), u32::try_from)
            .context("--height")?,
        steps: args
            .steps
            .map_or(Ok(card.steps as u32), u32::try_from)
            .context("--steps")?,
        guidance_scale: args.guidance.unwrap_or(card.guidance),
        seed: args.seed,
        slg_layers: args.slg_layers.as_deref().map(parse_layers).transpose()?,
        edit: None,
        loras,
        control: None,
    };
    if let Some(upload) = &upload {
        let field = if args.strength.is_some() {
            "--strength"
        } else {
            "strength"
        };
        let strength = args.strength.unwrap_or(edit::DEFAULT_STRENGTH);
        params.edit = Some(
            upload
                .prepare(&params, field, strength)
                .map_err(|e| flag_error("--image", e))?,
        );
    }
    if let (Some(bytes), Some(mode)) = (&control_picture, args.control_mode) {
        let preprocess = match &args.control_preprocess {
            Some(text) => parse_preprocess(text)?
                .resolve(mode)
                .map_err(|e| flag_error("--control-preprocess", e))?,
            None => None,
        };
        let picture =
            adapters::control_picture("--control-image", bytes, params.width, params.height)
                .map_err(|e| flag_error("--control-image", e))?;
        params.control = Some(ControlParams {
            mode,
            image: Arc::new(picture),
            preprocess,
            scale: args.control_scale.unwrap_or(1.0),
            start: args.control_start.unwrap_or(0.0),
            end: args.control_end.unwrap_or(1.0),
        });
    }

    // The model card's skip-layer guidance, unless this transformer lacks a block it names.
    let mut warnings = Vec::new();
    let default_slg = card_slg(&pipeline, &mut warnings);
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let mut req = generate_request(&pipeline, &params, default_slg.as_ref())?;
    if let Some(slg) = &mut req.slg {
        slg.scale = args.slg_scale.unwrap_or(slg.scale);
        slg.start = args.slg_start.unwrap_or(slg.start);
        slg.stop = args.slg_stop.unwrap_or(slg.stop);
    }
    if let Some(path) = &args.init_latents {
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("--init-latents {}", path.display()))?;
        let Some(latents) = tensors.remove("latents") else {
            bail!(
                "--init-latents {}: no tensor named `latents`",
                path.display()
            );
        };
        if latents.dtype() != DType::F32 {
            bail!(
                "--init-latents {}: `latents` must be f32, found {:?}",
                path.display(),
                latents.dtype()
            );
        }
        req.init_latents = Some(latents);
    }

    tracing::info!(
        width = req.width,
        height = req.height,
        steps = req.steps,
        guidance = req.guidance,
        seed = req.seed,
        slg = ?req.slg.as_ref().map(|s| &s.layers),
        strength = req.edit.as_ref().map(|e| e.strength),
        inpainting = req.edit.as_ref().is_some_and(|e| e.mask.is_some()),
        loras = ?req.loras,
        control = ?req.control.as_ref().map(|c| (c.mode, c.scale, c.start, c.end)),
        "generating"
    );
    let started = Instant::now();
    let mut last = Instant::now();
    let image = pipeline.generate(&req, &mut |step, steps| {
        tracing::info!(
            step,
            steps,
            seconds = last.elapsed().as_secs_f64(),
            "step done"
        );
        last = Instant::now();
    })?;
    image
        .save_png(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    tracing::info!(
        out = %args.out.display(),
        seconds = started.elapsed().as_secs_f64(),
        "image written"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slg_layers_parse() {
        assert_eq!(parse_layers("7,8,9").unwrap(), vec![7, 8, 9]);
        assert_eq!(parse_layers(" 7 , 8 ").unwrap(), vec![7, 8]);
        assert_eq!(parse_layers("none").unwrap(), Vec::<u32>::new());
        assert!(parse_layers("7,x").unwrap_err().to_string().contains("`x`"));
    }

    #[test]
    fn lora_flags_parse() {
        assert_eq!(
            parse_lora("a/style.safetensors").unwrap(),
            ("a/style.safetensors".into(), 1.0)
        );
        assert_eq!(
            parse_lora("a/style.safetensors:0.7").unwrap(),
            ("a/style.safetensors".into(), 0.7)
        );
        assert_eq!(
            parse_lora("c:/x.safetensors").unwrap(),
            ("c:/x.safetensors".into(), 1.0)
        );
        assert!(parse_lora("x.safetensors:inf").is_err());
    }

    #[test]
    fn preprocess_flags_parse() {
        assert_eq!(
            parse_preprocess("").unwrap(),
            PreprocessRequest::Switch(true)
        );
        assert_eq!(
            parse_preprocess("50,150").unwrap(),
            PreprocessRequest::Canny {
                low: 50.0,
                high: 150.0
            }
        );
        assert_eq!(
            parse_preprocess("3").unwrap(),
            PreprocessRequest::Blur { sigma: 3.0 }
        );
        assert!(parse_preprocess("x").is_err());
    }
}
