//! `sd35-server generate`: one image from the command line, with progress per step.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
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
    let layers = match &args.slg_layers {
        Some(s) => parse_layers(s)?,
        None => req.slg.as_ref().map(|s| s.layers.clone()),
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

    tracing::info!(
        width = req.width,
        height = req.height,
        steps = req.steps,
        guidance = req.guidance,
        seed = req.seed,
        slg = ?req.slg.as_ref().map(|s| &s.layers),
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
