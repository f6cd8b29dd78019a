//! Wiring of `sd35-server serve`: logging, model loading on the model thread, the listener,
//! and shutdown (SIGTERM/SIGINT: stop accepting, finish what was accepted, exit within
//! `--drain-seconds`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use candle_core::Device;
use sd35_pipeline::Precision;
use tokio::sync::oneshot;

use crate::api::Limits;
use crate::backend::{Backend, Defaults, GenParams, StepControl};
use crate::candle::{CandleBackend, CandleOptions};
use crate::config::{DeviceKind, LogFormat, ServeConfig};
use crate::metrics::Metrics;
use crate::queue::{LoadFn, Queue, QueueLimits};
use crate::routes::{AppState, router};

/// Installs the global log subscriber (text or JSON lines on stderr, `RUST_LOG` filter).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

struct Quiet;

impl StepControl for Quiet {
    fn wanted(&mut self, _: usize) -> bool {
        true
    }
    fn step_done(&mut self, _: u32, _: u32, _: usize, _: f64) {}
}

/// Loads the candle pipeline for `config` and warms it up with one small image.
pub fn candle_loader(config: &ServeConfig) -> anyhow::Result<LoadFn> {
    let model = config.args.model.clone();
    if !model.exists() {
        bail!("--model {}: no such directory", model.display());
    }
    let (dir, engine_key, precision) = match &config.args.engine {
        Some(engine) => {
            let (key, precision) = engine_identity(engine)?;
            (engine.clone(), Some(key), precision)
        }
        None => (model.clone(), None, config.precision),
    };
    let device = match config.device {
        DeviceKind::Cpu => Device::Cpu,
        DeviceKind::Cuda => Device::new_cuda(0)
            .context("--device cuda: no usable CUDA GPU (or a build without CUDA)")?,
    };
    let options = CandleOptions {
        dir,
        id: crate::candle::dir_name(&model),
        engine_key,
        precision,
        device,
        load_t5: !config.args.no_t5,
        t5_max_tokens: config.args.t5_max_tokens as usize,
    };
    let warmup = !config.no_warmup;
    Ok(Box::new(move || {
        let started = Instant::now();
        let mut backend = CandleBackend::load(options)?;
        tracing::info!(seconds = started.elapsed().as_secs_f64(), "model loaded");
        if warmup {
            let size = 64.min(backend.info().max_size);
            let params = GenParams {
                prompt: "warm-up".into(),
                negative_prompt: String::new(),
                width: size,
                height: size,
                steps: 1,
                guidance_scale: backend.info().defaults.guidance_scale,
                seed: 0,
            };
            let out = backend.generate(&[params], &mut Quiet);
            if let Some(Err(e)) = out.into_iter().next() {
                bail!("warm-up generation failed: {e:?}");
            }
        }
        Ok(Box::new(backend) as Box<dyn Backend>)
    }))
}

/// The key (directory name) and precision of a prebuilt engine, from its manifest; an engine
/// without a manifest is incomplete and refused.
fn engine_identity(engine: &std::path::Path) -> anyhow::Result<(String, Precision)> {
    let manifest = engine.join(sd35_contract::ENGINE_MANIFEST);
    let text = std::fs::read_to_string(&manifest).with_context(|| {
        format!(
            "--engine {}: cannot read {}; the engine is missing or incomplete, run \
             `sd35-server build-engine` for it",
            engine.display(),
            sd35_contract::ENGINE_MANIFEST
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("--engine: {} is not valid JSON", manifest.display()))?;
    let precision = v["precision"]
        .as_str()
        .and_then(|p| p.parse::<Precision>().ok())
        .with_context(|| {
            format!(
                "--engine: {} names no known precision (f32, bf16, fp8)",
                manifest.display()
            )
        })?;
    let key = crate::candle::dir_name(engine).unwrap_or_else(|| engine.display().to_string());
    Ok((key, precision))
}

/// Checks the configured defaults against the loaded model, so a bad default fails start-up
/// instead of every request that relies on it.
fn check_defaults(limits: &Limits) -> anyhow::Result<()> {
    let probe = crate::api::Sampling {
        prompt: "probe",
        ..Default::default()
    };
    probe.resolve(limits, || 0).map(drop).map_err(|e| {
        let flag = match e.field.as_deref() {
            Some("guidance_scale") => "--default-guidance".to_owned(),
            Some(f) => format!("--default-{f}"),
            None => "a default".to_owned(),
        };
        anyhow::anyhow!("{flag} does not suit the model: {}", e.message)
    })
}

/// Runs `sd35-server serve` until SIGTERM or SIGINT.
pub fn run(config: ServeConfig) -> anyhow::Result<()> {
    init_logging(config.log_format);
    let load = candle_loader(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let addr = format!("{}:{}", config.args.host, config.args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        serve(config, load, listener, shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: draining"),
                    _ = int.recv() => tracing::info!("SIGINT: draining"),
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Serves on `listener` with the backend `load` builds, until `shutdown` completes; then
/// refuses new work, finishes accepted requests and returns (an error if the model failed to
/// load or the drain deadline cut requests short).
pub async fn serve(
    config: ServeConfig,
    load: LoadFn,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tokens = config.load_tokens()?;
    let metrics = Arc::new(Metrics::new());
    let limits = QueueLimits {
        queue_size: config.args.queue_size as usize,
        max_batch_size: config.args.max_batch_size as usize,
    };
    let (loaded_tx, loaded_rx) = oneshot::channel();
    let started = Instant::now();
    let (queue, _worker) = Queue::start(load, limits, metrics.clone(), loaded_tx);
    let state = Arc::new(AppState {
        queue,
        limits: OnceLock::new(),
        draining: Default::default(),
        metrics: metrics.clone(),
        tokens: crate::auth::Tokens::new(&tokens),
        request_timeout: Duration::from_secs(u64::from(config.args.request_timeout_seconds.max(1))),
        max_batch_size: limits.max_batch_size.max(1),
        log_prompts: config.log_prompts,
        max_body_bytes: config.max_body_bytes,
    });
    let load_error: Arc<Mutex<Option<anyhow::Error>>> = Arc::default();
    let (failed_tx, failed_rx) = oneshot::channel::<()>();
    {
        let state = state.clone();
        let load_error = load_error.clone();
        let config = config.clone();
        tokio::spawn(async move {
            let error = match loaded_rx.await {
                Ok(Ok(info)) => {
                    let variant = info.variant.parse::<sd35_pipeline::Variant>().ok();
                    let defaults = Defaults {
                        steps: config.args.default_steps.unwrap_or(info.defaults.steps),
                        guidance_scale: config
                            .args
                            .default_guidance
                            .unwrap_or(info.defaults.guidance_scale),
                        width: config.args.default_width.unwrap_or(info.defaults.width),
                        height: config.args.default_height.unwrap_or(info.defaults.height),
                    };
                    let max_steps = variant.map_or(100, |v| config.max_steps_for(v));
                    let limits = Limits {
                        model: info,
                        defaults,
                        max_steps,
                        max_prompt_bytes: config.max_prompt_bytes,
                    };
                    match check_defaults(&limits) {
                        Ok(()) => {
                            let seconds = started.elapsed().as_secs_f64();
                            metrics.model_load_seconds.set(seconds);
                            let (model, variant) = (&limits.model.id, &limits.model.variant);
                            tracing::info!(%model, %variant, seconds, "ready");
                            let _ = state.limits.set(limits);
                            return;
                        }
                        Err(e) => e,
                    }
                }
                Ok(Err(e)) => e,
                Err(_) => anyhow::anyhow!("the model thread stopped while loading"),
            };
            tracing::error!(error = %format!("{error:#}"), "model load failed");
            if let Ok(mut slot) = load_error.lock() {
                *slot = Some(error);
            }
            let _ = failed_tx.send(());
        });
    }
    let local: SocketAddr = listener.local_addr()?;
    tracing::info!(addr = %local, auth = state.tokens.enabled(), "listening");
    let (drain_tx, drain_rx) = oneshot::channel::<()>();
    let graceful = {
        let state = state.clone();
        async move {
            tokio::select! {
                _ = shutdown => {}
                Ok(()) = failed_rx => {}
            }
            state.draining.store(true, Ordering::SeqCst);
            let _ = drain_tx.send(());
        }
    };
    let app = router(state.clone());
    let server = axum::serve(listener, app).with_graceful_shutdown(graceful);
    let drain = Duration::from_secs(config.drain_seconds);
    let deadline = async move {
        if drain_rx.await.is_ok() {
            tokio::time::sleep(drain).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = server => r.context("the HTTP server failed")?,
        _ = deadline => {
            bail!(
                "requests still running {} s after shutdown began (--drain-seconds); exiting",
                drain.as_secs()
            );
        }
    }
    if let Some(e) = load_error.lock().ok().and_then(|mut s| s.take()) {
        return Err(e);
    }
    tracing::info!("drained; exiting");
    Ok(())
}
