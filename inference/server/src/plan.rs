//! `sd35-server plan`: the memory a published SD3.5 variant needs for a request, computed from
//! its shapes (see `sd35_contract::plan`), not measured.

use sd35_contract::DeviceKind;
use sd35_contract::plan::{self, MemoryPlan, PlanDevice, PlanRequest};
use sd35_pipeline::{Precision, Variant, model_card};

/// Arguments of `plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Model variant: large, large-turbo or medium.
    #[arg(long)]
    variant: Variant,
    /// Weight precision: bf16 or fp8 (f32 on the CPU).
    #[arg(long, default_value = "bf16")]
    precision: Precision,
    /// Width in pixels.
    #[arg(long, default_value_t = 1024)]
    width: usize,
    /// Height in pixels.
    #[arg(long, default_value_t = 1024)]
    height: usize,
    /// Images sampled together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Count T5-XXL's weights (off: CLIP-only, T5's embedding zeros).
    #[arg(long)]
    t5: bool,
    /// Classifier-free guidance scale [default: the model card's; > 1 doubles the batch].
    #[arg(long)]
    guidance: Option<f64>,
    /// T5 sequence length.
    #[arg(long, default_value_t = 256)]
    t5_max_length: usize,
    /// The device planned for: cuda (bf16 compute) or cpu (f32 compute, fused kernels).
    #[arg(long, value_enum, default_value_t = DeviceKind::Cuda)]
    device: DeviceKind,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// The plan `args` ask for.
pub fn compute(args: &PlanArgs) -> anyhow::Result<(PlanRequest, PlanDevice, MemoryPlan)> {
    if args.width == 0
        || args.height == 0
        || !args.width.is_multiple_of(16)
        || !args.height.is_multiple_of(16)
    {
        anyhow::bail!(
            "--width {} --height {}: both must be positive multiples of 16",
            args.width,
            args.height
        );
    }
    if args.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    let guidance = args
        .guidance
        .unwrap_or_else(|| model_card(args.variant).guidance);
    let req = PlanRequest {
        width: args.width,
        height: args.height,
        batch: args.batch,
        guidance: guidance > 1.0,
        t5_tokens: args.t5_max_length,
    };
    let dev = match args.device {
        DeviceKind::Cpu => PlanDevice {
            kind: DeviceKind::Cpu,
            ..PlanDevice::cuda(args.precision)
        },
        _ => PlanDevice::cuda(args.precision),
    };
    let dev = PlanDevice {
        generic: dev.kind == DeviceKind::Cuda,
        ..dev
    };
    Ok((req, dev, plan::published(args.variant, &req, &dev, args.t5)))
}

/// Runs `plan`.
pub fn run(args: &PlanArgs) -> anyhow::Result<()> {
    let (req, dev, p) = compute(args)?;
    let limit = p.kernel_limit(dev.kind);
    if args.json {
        let out = serde_json::json!({
            "variant": args.variant,
            "precision": args.precision,
            "device": dev.kind,
            "width": req.width,
            "height": req.height,
            "batch": req.batch,
            "guidance": req.guidance,
            "t5": args.t5,
            "computed": true,
            "peak_bytes": p.peak_bytes,
            "weights_bytes": p.weights_bytes,
            "activation_bytes": p.activation_bytes,
            "runtime_bytes": p.runtime_bytes,
            "largest_stage": p.largest_stage,
            "weights": p.weights,
            "stages": {
                "transformer_bytes": p.transformer_bytes,
                "vae_bytes": p.vae_bytes,
                "text_bytes": p.text_bytes,
            },
            "max_softmax_elements": p.max_softmax_elements,
            "max_tensor_elements": p.max_tensor_elements,
            "kernel_limit": limit,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let gb = |b: u64| format!("{:.2} GB", b as f64 / 1e9);
    println!(
        "SD3.5 {} {} on {}, {}x{}, {} image(s), guidance {}, T5 {} (computed from the shapes, \
         not measured)",
        args.variant,
        args.precision,
        dev.kind.as_str(),
        req.width,
        req.height,
        req.batch,
        if req.guidance { "on" } else { "off" },
        if args.t5 { "loaded" } else { "off" }
    );
    let w = &p.weights;
    println!("  weights      {:>10}", gb(p.weights_bytes));
    println!("    transformer  {:>10}", gb(w.mmdit));
    println!("    CLIP-L + G   {:>10}", gb(w.clip));
    println!("    T5-XXL       {:>10}", gb(w.t5));
    println!("    VAE decoder  {:>10}", gb(w.vae));
    println!(
        "  activations  {:>10}  (largest stage: {}; transformer {}, VAE {}, text {})",
        gb(p.activation_bytes),
        p.largest_stage,
        gb(p.transformer_bytes),
        gb(p.vae_bytes),
        gb(p.text_bytes)
    );
    println!("  runtime      {:>10}", gb(p.runtime_bytes));
    println!("  peak         {:>10}", gb(p.peak_bytes));
    if let Some(why) = limit {
        println!("  refused on CUDA: {why}");
    }
    Ok(())
}
