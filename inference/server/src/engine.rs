//! `sd35-server build-engine`: converts a complete cached model into the engine of one
//! precision under `<cache-root>/engines/<engine-key>/`, with progress in the logs, then makes
//! the engine's smoke image on the CPU and records it in `engine.json` (see
//! `sd35_pipeline::smoke`): servers repeat it before they turn ready.
//!
//! An engine whose manifest already matches (format version, source, precision, every file's
//! size and sha256, a smoke image) is kept; anything else in the directory is rebuilt.

use std::time::Instant;

use sd35_contract::{BuildEngineArgs, EnginePrecision, ExitReason, engine_dir, model_dir};
use sd35_pipeline::engine::{BuildOptions, Fp8Scale};

use crate::fetch::error::{ExitError, exit_on_error};
use crate::fetch::manifest::read_marker;

/// `sd35-server build-engine`: the contract's flags plus the fp8 scaling choice.
#[derive(Debug, clap::Args)]
pub struct BuildEngineCommand {
    #[command(flatten)]
    pub args: BuildEngineArgs,

    /// fp8 only: absmax scale per output channel or per tensor.
    #[arg(long, env = "SD35_FP8_SCALE", default_value = "per-channel")]
    pub fp8_scale: Fp8Scale,
}

/// Runs `build-engine` and exits with its documented exit code.
pub fn main(cmd: &BuildEngineCommand) -> ! {
    exit_on_error(
        "build-engine",
        run(cmd),
        cmd.args.termination_message_path.as_deref(),
    )
}

fn pipeline_error(e: sd35_pipeline::Error) -> ExitError {
    match e {
        sd35_pipeline::Error::Io { path, source } => ExitError::io(&path, &source),
        other => ExitError::new(ExitReason::InvalidModel, other.to_string()),
    }
}

/// Builds (or confirms) the engine.
pub fn run(cmd: &BuildEngineCommand) -> Result<(), ExitError> {
    let a = &cmd.args;
    let model = model_dir(&a.cache_root, &a.cache_key);
    let out = engine_dir(&a.cache_root, &a.engine_key);
    let Some(cache) = read_marker(&model)? else {
        return Err(ExitError::new(
            ExitReason::NotFound,
            format!(
                "{} is not a complete cache (no completion marker); run fetch first",
                model.display()
            ),
        ));
    };
    if !cache.files_present(&model) {
        return Err(ExitError::new(
            ExitReason::InvalidModel,
            format!(
                "{}: files listed in the completion marker are missing or truncated; fetch again",
                model.display()
            ),
        ));
    }
    let precision = a.precision;
    let variant = a.variant.unwrap_or(cache.variant);
    if let Ok(m) = sd35_pipeline::engine::open(&out, true)
        && m.source_cache_key == a.cache_key
        && m.engine_key == a.engine_key
        && m.variant == variant
        && m.precision == precision
        && m.fp8_scale == (precision == EnginePrecision::Fp8).then_some(cmd.fp8_scale)
        && m.smoke.is_some()
    {
        tracing::info!(engine = %out.display(), "engine already built, nothing to do");
        return Ok(());
    }
    let opts = BuildOptions {
        variant,
        precision,
        engine_key: a.engine_key.clone(),
        fp8_scale: cmd.fp8_scale,
        source_cache_key: a.cache_key.clone(),
        source_repo: cache.repo().map(str::to_owned),
        source_revision: cache.resolved_revision.clone().or(Some(cache.revision)),
        tool_version: concat!("sd35-server ", env!("CARGO_PKG_VERSION")).to_owned(),
    };
    tracing::info!(
        model = %model.display(),
        engine = %out.display(),
        variant = variant.as_str(),
        precision = precision.as_str(),
        "building engine"
    );
    let started = Instant::now();
    let mut last = Instant::now();
    let manifest = sd35_pipeline::engine::build(&model, &out, &opts, &mut |p| {
        if last.elapsed().as_secs() >= 10 || p.done_bytes == p.total_bytes {
            last = Instant::now();
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            let rate = p.done_bytes as f64 / secs;
            let eta = (p.total_bytes.saturating_sub(p.done_bytes)) as f64 / rate.max(1.0);
            tracing::info!(
                file = p.file,
                "progress: {} of {} MB ({:.1} MB/s, ETA {eta:.0}s)",
                p.done_bytes / 1_000_000,
                p.total_bytes / 1_000_000,
                rate / 1e6
            );
        }
    })
    .map_err(pipeline_error)?;
    tracing::info!(
        files = manifest.files.len(),
        bytes = manifest.files.iter().map(|f| f.size).sum::<u64>(),
        seconds = started.elapsed().as_secs_f64(),
        peak_rss_bytes = peak_rss_bytes().unwrap_or(0),
        "engine files written"
    );
    // The fixed-seed image servers repeat before they turn ready: without it the engine is
    // not complete, and a server refuses it.
    let smoke_started = Instant::now();
    let manifest = sd35_pipeline::smoke::record_engine(&out).map_err(|e| {
        let e = pipeline_error(e);
        ExitError::new(
            e.reason,
            format!(
                "the engine's files are written but its smoke image could not be made, so no \
                 server will serve it: {}",
                e.message
            ),
        )
    })?;
    if let Some(smoke) = &manifest.smoke {
        tracing::info!(
            seconds = smoke_started.elapsed().as_secs_f64(),
            width = smoke.width,
            height = smoke.height,
            steps = smoke.steps,
            sha256 = %smoke.sha256,
            "engine complete: smoke image recorded"
        );
    }
    Ok(())
}

/// The process's peak resident set (`VmHWM`), from `/proc/self/status`.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
