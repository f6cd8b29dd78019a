//! Wiring of `sd35-server serve`: logging, model loading on the model thread, the listener,
//! and shutdown (SIGTERM/SIGINT: stop accepting, finish what was accepted; at
//! `--drain-seconds`, answer what is left with 503 and exit 0).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use sd35_contract::{ExitError, ExitReason, one_line, write_termination_message};
use sd35_pipeline::ModelSource;
use tokio::sync::oneshot;

use crate::api::{Bounds, Limits};
use crate::artifacts::{ArtifactStore as _, Opened};
use crate::backend::{Backend, Defaults, GenControl, GenParams, StepControl};
use crate::candle::{CandleBackend, pipeline_failure};
use crate::config::{LogFormat, ServeConfig};
use crate::edge::{self, EdgeLimits};
use crate::metrics::Metrics;
use crate::queue::{LoadFn, Queue, QueueLimits};
use crate::routes::router;
use crate::state::{AppState, DECODING_AT_ONCE};

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
    fn step_done(&mut self, _: usize, _: usize, _: usize, _: f64) {}
}

impl GenControl for Quiet {
    fn partial_image(&mut self, _: usize, _: usize, _: Vec<u8>) {}
}

/// Opens the device and the model's manifests (the engine's checked now, so a wrong engine
/// never passes as loading) and returns the loader of the candle pipeline for `config`, which
/// loads the model with its adapters and warms it up with one small image. A failure is an
/// [`ExitError`] with the documented exit code.
pub fn candle_loader(config: &ServeConfig) -> anyhow::Result<LoadFn> {
    let args = &config.args;
    if !args.model.exists() {
        return Err(ExitError::new(
            ExitReason::NotFound,
            format!("--model {}: no such directory", args.model.display()),
        )
        .into());
    }
    let source = ModelSource::serving(&args.model, args.engine.as_deref()).map_err(|e| {
        let flag = match &args.engine {
            Some(engine) => format!("--engine {}", engine.display()),
            None => format!("--model {}", args.model.display()),
        };
        pipeline_failure(&flag, &e)
    })?;
    // The op graph is chosen once, before any model is loaded (SD35_GENERIC_OPS=1: on the
    // CPU, the operations a GPU runs).
    let graph = sd35_pipeline::op_graph::OpGraph::from_env()
        .and_then(sd35_pipeline::op_graph::install)
        .map_err(|e| pipeline_failure("the op graph", &e))?;
    let device = sd35_pipeline::device::open(args.device)
        .map_err(|e| pipeline_failure("cannot open the device", &e))?;
    if let Some(w) = &device.warning {
        tracing::warn!("{w}");
    }
    tracing::info!(
        device = device.kind.as_str(),
        gpu = device.gpu_name.as_deref().unwrap_or(""),
        op_graph = graph.name(),
        chunk_elements = graph.chunk_elements,
        "device opened"
    );
    let config = config.clone();
    Ok(Box::new(move || {
        let started = Instant::now();
        let mut backend = CandleBackend::load(&config, &source, &device)?;
        let info = backend.info();
        for w in &info.served.warnings {
            tracing::warn!("{w}");
        }
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            variant = info.served.variant.as_str(),
            precision = info.served.precision.as_str(),
            device = info.served.device.as_str(),
            loras = info.served.adapters.len(),
            controlnets = info.served.control_modes.len(),
            weights_bytes = info.memory.as_ref().map(|m| m.weights.total()),
            activation_budget_bytes = info.memory.as_ref().map(|m| m.activation_budget_bytes),
            "model loaded"
        );
        check_engine(&backend, &source.weights, config.engine_check_min_psnr_db)?;
        if !config.no_warmup {
            let size = 64.min(info.max_size);
            let params = GenParams {
                prompt: "warm-up".into(),
                width: size,
                height: size,
                steps: 1,
                guidance_scale: info.defaults.guidance_scale,
                ..GenParams::default()
            };
            let out = backend.generate(&[params], &mut Quiet);
            if let Some(Err(e)) = out.into_iter().next() {
                return Err(ExitError::new(
                    ExitReason::InvalidModel,
                    format!("warm-up generation failed: {e:?}"),
                )
                .into());
            }
        }
        Ok(Box::new(backend) as Box<dyn Backend>)
    }))
}

/// The golden-image gate: an engine must bring its smoke image, and repeating it must land
/// within the bound for this device and precision; otherwise start-up fails with
/// `EngineMismatch` (exit code 18) and `/readyz` never turns ready, so a rollout to this
/// engine stops at this pod and the pods already serving keep serving.
fn check_engine(
    backend: &CandleBackend,
    dir: &std::path::Path,
    min_psnr: Option<f64>,
) -> anyhow::Result<()> {
    if backend.engine_has_smoke() == Some(false) {
        return Err(ExitError::new(
            ExitReason::EngineMismatch,
            format!(
                "the engine {} has no smoke image in its engine.json: it was not built to \
                 completion; run build-engine for it again",
                dir.display()
            ),
        )
        .into());
    }
    let started = Instant::now();
    let Some(result) = backend.check_smoke(min_psnr) else {
        return Ok(());
    };
    let check =
        result.map_err(|e| pipeline_failure("the engine's smoke image could not be made", &e))?;
    let served = &backend.info().served;
    if !check.passed() {
        return Err(ExitError::new(
            ExitReason::EngineMismatch,
            format!(
                "the engine {} fails its smoke check: its image is {:.1} dB PSNR from the one \
                 build-engine recorded, below the {:.1} dB required on {} in {}; the engine no \
                 longer makes what it made when it was built (damaged or changed weights): \
                 delete it to have it rebuilt",
                dir.display(),
                check.psnr_db,
                check.min_psnr_db,
                served.device.as_str(),
                served.precision.as_str()
            ),
        )
        .into());
    }
    tracing::info!(
        psnr_db = check.psnr_db,
        min_psnr_db = check.min_psnr_db,
        identical = check.identical,
        seconds = started.elapsed().as_secs_f64(),
        "engine smoke check passed"
    );
    Ok(())
}

/// Runs `serve` and exits: 0 after a drain (cut short by `--drain-seconds` or not), the
/// documented code of an [`ExitError`], or 1.
/// A failure's one-line reason also goes to `--termination-message-path`, where Kubernetes
/// shows it as the container's termination message.
pub fn run_and_exit(config: ServeConfig) -> ! {
    let termination = config.args.termination_message_path.clone();
    let Err(e) = run(config) else {
        std::process::exit(0)
    };
    let (code, line) = match e.downcast_ref::<ExitError>() {
        Some(failure) => (
            failure.reason.code(),
            format!("{}: {}", failure.reason.as_str(), failure.message),
        ),
        None => (1, format!("{e:#}")),
    };
    let line = one_line(&line);
    tracing::error!(exit_code = code, "{line}");
    eprintln!("sd35-server serve: {line}");
    if let Some(path) = termination
        && let Err(err) = write_termination_message(&path, &line)
    {
        eprintln!(
            "sd35-server serve: cannot write the termination message to {}: {err}",
            path.display()
        );
    }
    std::process::exit(code)
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
        ExitError::new(
            ExitReason::Usage,
            format!("{flag} does not suit the model: {}", e.message),
        )
        .into()
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

/// Whether the tokens were given on the command line (where `ps` shows them to every user).
fn tokens_on_command_line() -> bool {
    std::env::args_os().any(|a| {
        a.to_str()
            .is_some_and(|a| a == "--auth-tokens" || a.starts_with("--auth-tokens="))
    })
}

/// Serves on `listener` with the backend `load` builds, until `shutdown` completes; then
/// refuses new work and finishes accepted requests for `--drain-seconds`. Requests still
/// queued or running then are answered 503 and `serve` returns `Ok` (a drain is a clean
/// exit); it returns an error only when the model failed to load.
pub async fn serve(
    config: ServeConfig,
    load: LoadFn,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tokens = config.load_tokens()?;
    if config.auth_tokens.is_some() && tokens_on_command_line() {
        tracing::warn!(
            "--auth-tokens puts the tokens on the command line, where every user of this \
             machine can read them (ps, /proc/PID/cmdline); use --auth-token-file or the \
             SD35_AUTH_TOKENS variable instead"
        );
    }
    let store = crate::artifacts::open(&config.args.artifacts, &config.store_options()?)
        .map_err(|e| ExitError::new(ExitReason::Usage, e))?;
    if let Some(Opened::S3(s3)) = &store {
        // A bucket that is missing now may exist by the first request: warn, do not refuse.
        match s3.check().await {
            Ok(()) => tracing::info!(store = %s3.describe(), "artifact storage ready"),
            Err(e) => tracing::warn!(error = %e, "artifact storage is not usable yet"),
        }
    } else if let Some(s) = &store {
        tracing::info!(store = %s.store().describe(), "artifact storage ready");
    }
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
        drain_expired: tokio::sync::watch::Sender::new(false),
        cut_at_drain: Default::default(),
        metrics: metrics.clone(),
        tokens: crate::auth::Tokens::new(&tokens),
        request_timeout: Duration::from_secs(u64::from(config.args.request_timeout_seconds.max(1))),
        body_read_timeout: Duration::from_secs(config.body_read_timeout_seconds.max(1)),
        max_batch_size: limits.max_batch_size.max(1),
        log_prompts: config.log_prompts,
        max_body_bytes: config.max_body_bytes,
        max_upload_bytes: usize::try_from(config.max_upload_bytes).unwrap_or(usize::MAX),
        max_prompt_bytes: config.max_prompt_bytes,
        started_unix: crate::unix_now(),
        artifacts: store.as_ref().map(Opened::store),
        local_artifacts: store.as_ref().and_then(Opened::local),
        public_url: config.artifacts_public_url.clone(),
        checkpoint: Mutex::new(None),
        decoding: tokio::sync::Semaphore::new(DECODING_AT_ONCE),
        document_before_load: crate::openapi::document(&Bounds::before_load(
            config.max_prompt_bytes,
        )),
        document: OnceLock::new(),
    });
    let load_error: Arc<Mutex<Option<anyhow::Error>>> = Arc::default();
    let (failed_tx, failed_rx) = oneshot::channel::<()>();
    {
        let state = state.clone();
        let load_error = load_error.clone();
        let config = config.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let error = match loaded_rx.await {
                Ok(Ok(info)) => {
                    let variant = info.served.variant;
                    let defaults = Defaults {
                        steps: config.args.default_steps.unwrap_or(info.defaults.steps),
                        guidance_scale: config
                            .args
                            .default_guidance
                            .unwrap_or(info.defaults.guidance_scale),
                        width: config.args.default_width.unwrap_or(info.defaults.width),
                        height: config.args.default_height.unwrap_or(info.defaults.height),
                    };
                    let max_steps = config.max_steps_for(variant);
                    let limits = Limits {
                        model: info,
                        defaults,
                        max_steps,
                        max_prompt_bytes: config.max_prompt_bytes,
                        max_size: config.max_size,
                    };
                    match check_defaults(&limits) {
                        Ok(()) => {
                            let seconds = started.elapsed().as_secs_f64();
                            metrics.model_load_seconds.set(seconds);
                            let (model, variant) = (&limits.model.id, limits.model.served.variant);
                            tracing::info!(%model, %variant, seconds, "ready");
                            let _ = state
                                .document
                                .set(crate::openapi::document(&limits.bounds()));
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
    let stop = {
        let state = state.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                Ok(()) = failed_rx => {}
            }
            state.draining.store(true, Ordering::SeqCst);
        }
    };
    let edge = EdgeLimits {
        header_read_timeout: Duration::from_secs(config.header_read_timeout_seconds.max(1)),
        max_reading: config.max_connections_reading as usize,
    };
    let app = router(state.clone());
    // Returns once shutdown began; the listener is closed when it returns.
    let connections = edge::accept_until(listener, app, edge, metrics.clone(), stop).await;
    let drained = connections.shutdown();
    tokio::pin!(drained);
    let drain = Duration::from_secs(config.drain_seconds);
    let finished = tokio::time::timeout(drain, &mut drained).await.is_ok();
    if !finished {
        // Everyone still waiting gets an answer now: 503, send it again.
        let images = state.queue.depth();
        state.drain_expired.send_replace(true);
        // The handlers answer at once; give the answers a moment to leave.
        let _ = tokio::time::timeout(DRAIN_ANSWER_GRACE, &mut drained).await;
        let cut = state.cut_at_drain.load(Ordering::SeqCst);
        metrics.drain_cut.inc_by(cut);
        tracing::warn!(
            requests = cut,
            images,
            drain_seconds = drain.as_secs(),
            "the drain deadline passed: answered {cut} queued or running requests ({images} images) with 503"
        );
    }
    if let Some(e) = load_error.lock().ok().and_then(|mut s| s.take()) {
        return Err(e);
    }
    tracing::info!("drained; exiting");
    Ok(())
}

/// How long the 503 answers at the drain deadline may take to be written.
const DRAIN_ANSWER_GRACE: Duration = Duration::from_secs(5);
