//! `sd35-server generate`: one image from the command line, with progress per step — drawn
//! from a prompt, or an edit of an image (`--image`, and `--mask` to inpaint).
//!
//! An image to edit is read exactly as the server reads an upload (the same decoding, EXIF
//! orientation, size defaults and resizing), so `generate` and the server make the same image
//! for the same request.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use sd35_http::api::GenParams;
use sd35_http::api::edit::{self, EditUpload, MaskRule, MaskUpload};
use sd35_pipeline::{DeviceKind, Pipeline, PipelineOptions, Precision, SkipLayerGuidance, Variant};

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

fn parse_layers(s: &str) -> anyhow::Result<Option<Vec<usize>>> {
    if s.trim().eq_ignore_ascii_case("none") || s.trim().is_empty() {
        return Ok(None);
    }
    let layers = s
        .split(',')
        .map(|l| {
            l.trim()
                .parse::<usize>()
                .with_context(|| format!("--slg-layers: `{l}` is not a layer index"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Some(layers))
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
    let pipeline = Pipeline::load(&args.model, &opts)
        .with_context(|| format!("loading {}", args.model.display()))?;
    tracing::info!(
        variant = %pipeline.variant(),
        variant_source = pipeline.variant_source().as_str(),
        precision = %pipeline.precision(),
        device = opened.kind.as_str(),
        seconds = started.elapsed().as_secs_f64(),
        "model loaded"
    );

    let mut req = pipeline.default_request(&args.prompt);
    req.negative_prompt.clone_from(&args.negative_prompt);
    req.seed = args.seed;
    // The files of an edit, read before anything is sampled.
    let image = args
        .image
        .as_ref()
        .map(|p| std::fs::read(p).with_context(|| format!("--image {}", p.display())))
        .transpose()?;
    let mask = args
        .mask
        .as_ref()
        .map(|p| std::fs::read(p).with_context(|| format!("--mask {}", p.display())))
        .transpose()?;
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
        .map_err(|e| {
            anyhow::anyhow!("{}: {}", e.field.as_deref().unwrap_or("--image"), e.message)
        })?;
    if let Some(upload) = &upload {
        // An edit's size defaults to its image's.
        let (w, h) = upload
            .default_size()
            .map_err(|e| anyhow::anyhow!("--image: {}", e.message))?;
        (req.width, req.height) = (w as usize, h as usize);
    }
    if let Some(w) = args.width {
        req.width = w;
    }
    if let Some(h) = args.height {
        req.height = h;
    }
    if let Some(s) = args.steps {
        req.steps = s;
    }
    if let Some(g) = args.guidance {
        req.guidance = g;
    }
    let base = req.slg.clone().unwrap_or(SkipLayerGuidance {
        layers: Vec::new(),
        scale: 2.8,
        start: 0.01,
        stop: 0.2,
    });
    let blocks = pipeline.mmdit().config().depth;
    let layers = match &args.slg_layers {
        // Named on the command line: used as named (a block that does not exist is an error).
        Some(s) => parse_layers(s)?,
        // The model card's, unless this transformer lacks a block it names.
        None => match &req.slg {
            Some(slg) if slg.layers.iter().any(|&l| l >= blocks) => {
                tracing::warn!(
                    layers = ?slg.layers,
                    blocks,
                    "the model card's skip-layer guidance names blocks this transformer does \
                     not have: generating without it (--slg-layers names blocks that exist)"
                );
                None
            }
            slg => slg.as_ref().map(|s| s.layers.clone()),
        },
    };
    req.slg = layers.map(|layers| SkipLayerGuidance {
        layers,
        scale: args.slg_scale.unwrap_or(base.scale),
        start: args.slg_start.unwrap_or(base.start),
        stop: args.slg_stop.unwrap_or(base.stop),
    });
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
    if let Some(upload) = &upload {
        let params = GenParams {
            width: u32::try_from(req.width).context("--width")?,
            height: u32::try_from(req.height).context("--height")?,
            steps: u32::try_from(req.steps).context("--steps")?,
            ..GenParams::default()
        };
        let field = if args.strength.is_some() {
            "--strength"
        } else {
            "strength"
        };
        let edit = upload
            .prepare(
                &params,
                field,
                args.strength.unwrap_or(edit::DEFAULT_STRENGTH),
            )
            .map_err(|e| {
                anyhow::anyhow!("{}: {}", e.field.as_deref().unwrap_or("--image"), e.message)
            })?;
        req.edit = Some(sd35_http::candle::edit_tensors(&edit)?);
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
    use super::parse_layers;

    #[test]
    fn slg_layers_parse() {
        assert_eq!(parse_layers("7,8,9").unwrap(), Some(vec![7, 8, 9]));
        assert_eq!(parse_layers(" 7 , 8 ").unwrap(), Some(vec![7, 8]));
        assert_eq!(parse_layers("none").unwrap(), None);
        assert!(parse_layers("7,x").unwrap_err().to_string().contains("`x`"));
    }
}
