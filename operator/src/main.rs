//! `sd35-operator`: wiring only. Flags and env, logging, the admin port, leader election,
//! and the [`controller`], each in its own task; SIGTERM/SIGINT stop it gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use kube::Client;
use kube::api::{Api, ListParams};
use sd35_crds::SD35Deployment;
use sd35_operator::admin::{AdminState, router};
use sd35_operator::config::OperatorConfig;
use sd35_operator::controller::{self, Settings};
use sd35_operator::leader::{Elector, LeaseConfig};
use sd35_operator::metrics::Metrics;
use tracing::{Instrument, error, info, info_span};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Reconciles SD35Deployments into cached models, prebuilt engines and GPU rollouts.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address of the admin port (/healthz, /readyz, /metrics).
    #[arg(long, env = "SD35_ADMIN_ADDR", default_value = "0.0.0.0:8081")]
    admin_addr: SocketAddr,

    /// Image of sd35-server used when an SD35Deployment names none.
    #[arg(long, env = "SD35_SERVER_IMAGE", default_value_t = OperatorConfig::default().server_image)]
    server_image: String,

    /// Hugging Face endpoint used when a source names none.
    #[arg(
        long,
        env = "SD35_HF_ENDPOINT",
        default_value = "https://huggingface.co"
    )]
    hf_endpoint: String,

    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "SD35_WATCH_NAMESPACE")]
    namespace: Option<String>,

    /// Elect a leader through a Lease, so that several replicas can run.
    #[arg(long, env = "SD35_LEADER_ELECT")]
    leader_elect: bool,

    /// Name of the leader election Lease.
    #[arg(long, env = "SD35_LEASE_NAME", default_value = "sd35-operator")]
    lease_name: String,

    /// Namespace of the leader election Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,

    /// Identity of this replica in the election (default: the pod name or host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// Seconds a leader's Lease lasts without renewal.
    #[arg(long, env = "SD35_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,

    /// Shifts the wall clock this replica writes into the Lease by this many seconds, to test
    /// the election under clock skew.
    #[arg(
        long,
        env = "SD35_CLOCK_OFFSET_SECONDS",
        default_value_t = 0,
        hide = true,
        allow_negative_numbers = true
    )]
    clock_offset_seconds: i64,

    /// Seconds a finished Job is kept for `kubectl logs`.
    #[arg(long, env = "SD35_JOB_TTL_SECONDS", default_value_t = OperatorConfig::default().job_ttl_seconds)]
    job_ttl_seconds: i32,

    /// Seconds a serving pod may take to load the model before it is restarted.
    #[arg(long, env = "SD35_STARTUP_SECONDS", default_value_t = OperatorConfig::default().startup_seconds)]
    startup_seconds: i32,

    /// SD35Deployments reconciled at once.
    #[arg(long, env = "SD35_CONCURRENCY", default_value_t = 8)]
    concurrency: u16,

    /// Milliseconds to wait after a change before reconciling its SD35Deployment; changes
    /// that arrive meanwhile (a child's status moving through several steps at once) are
    /// taken in one reconcile and one status write. 0 reconciles on every change.
    #[arg(long, env = "SD35_DEBOUNCE_MS", default_value_t = 300)]
    debounce_ms: u64,

    /// Log format.
    #[arg(long, env = "SD35_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Fails with a hint when the CRD is missing, instead of watching nothing.
async fn check_crd(client: &Client, namespace: Option<&str>) -> anyhow::Result<()> {
    // Within the watched scope only, so a namespace-scoped install needs no cluster-wide read.
    let api: Api<SD35Deployment> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => anyhow::bail!(
            "the SD35Deployment CRD (sd35deployments.sd35.io) is not installed in this cluster: \
             install it with `kubectl apply -f crds/` or the Helm chart, then start the operator again"
        ),
        Err(e) => Err(e).context(
            "cannot list SD35Deployments; check the operator's RBAC and the cluster connection",
        ),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        () = term => {},
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);

    let mut kube_config = kube::Config::infer().await.context(
        "cannot find a Kubernetes configuration (in-cluster service account or KUBECONFIG)",
    )?;
    // A user agent of our own makes the operator's requests recognisable in audit logs.
    kube_config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("sd35-operator/", env!("CARGO_PKG_VERSION"))),
    ));
    let client = Client::try_from(kube_config).context("cannot build a Kubernetes client")?;
    if let Err(e) = check_crd(&client, args.namespace.as_deref()).await {
        error!("{e:#}");
        std::process::exit(2);
    }

    let metrics = Arc::new(Metrics::default());
    let admin_state = Arc::new(AdminState {
        metrics: metrics.clone(),
        ..Default::default()
    });
    let admin = admin_state.clone();
    let listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("cannot listen on the admin address {}", args.admin_addr))?;
    info!(addr = %args.admin_addr, "admin port listening");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut admin_stop = stop_rx.clone();
    let admin_task = tokio::spawn(
        async move {
            let serve = axum::serve(listener, router(admin)).with_graceful_shutdown(async move {
                let _ = admin_stop.wait_for(|stop| *stop).await;
            });
            if let Err(e) = serve.await {
                error!(error = %e, "admin server failed");
            }
        }
        .instrument(info_span!("admin")),
    );
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let identity = args.identity.clone().unwrap_or_else(|| {
        std::env::var("HOSTNAME")
            .unwrap_or_else(|_| format!("sd35-operator-{}", std::process::id()))
    });
    let mut elector = args.leader_elect.then(|| {
        Elector::new(
            client.clone(),
            LeaseConfig {
                namespace: args.lease_namespace.clone(),
                name: args.lease_name.clone(),
                identity: identity.clone(),
                lease_duration: Duration::from_secs(args.lease_duration_seconds),
                retry_period: Duration::from_secs((args.lease_duration_seconds / 5).max(1)),
                clock_offset: k8s_openapi::jiff::SignedDuration::from_secs(
                    args.clock_offset_seconds,
                ),
            },
        )
    });
    admin_state.ready.store(true, Ordering::Relaxed);

    let mut stop = stop_rx.clone();
    if let Some(e) = elector.as_mut() {
        tokio::select! {
            () = e.acquire() => {},
            _ = stop.wait_for(|s| *s) => {
                let _ = admin_task.await;
                return Ok(());
            }
        }
    }
    metrics.set_leader(true);
    let settings = Settings {
        config: OperatorConfig {
            server_image: args.server_image.clone(),
            hf_endpoint: args.hf_endpoint.clone(),
            job_ttl_seconds: args.job_ttl_seconds,
            startup_seconds: args.startup_seconds,
        },
        namespace: args.namespace.clone(),
        concurrency: args.concurrency,
        debounce: Duration::from_millis(args.debounce_ms),
        identity: args.identity.clone(),
    };
    let controller = controller::run(client, settings, metrics.clone(), stop_rx.clone())
        .instrument(info_span!("controller"));
    match elector.as_mut() {
        Some(e) => {
            // The controller ends by itself on SIGTERM (graceful shutdown), then the Lease is
            // released so another replica takes over at once.
            tokio::select! {
                () = controller => {},
                () = e.keep() => {
                    // Another replica leads now: stop at once so two never reconcile together.
                    error!("lost leadership; exiting");
                    std::process::exit(1);
                }
            }
            metrics.set_leader(false);
            e.release().await;
        }
        None => controller.await,
    }
    let _ = admin_task.await;
    info!("stopped");
    Ok(())
}
