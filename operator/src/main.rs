//! `sd35-operator`: wiring only. Flags and env, logging, the admin port, leader election,
//! and the controller, each in its own task; SIGTERM/SIGINT stop it gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ContainerStatus, Node, PersistentVolumeClaim, Pod, PodSpec, PodStatus, Service,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams, PartialObjectMeta};
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use sd35_crds::SD35Deployment;
use sd35_operator::admin::{AdminState, router};
use sd35_operator::build::ServiceMonitor;
use sd35_operator::compact::CachedDeployment;
use sd35_operator::config::OperatorConfig;
use sd35_operator::index::{self, Index};
use sd35_operator::labels;
use sd35_operator::leader::{Elector, LeaseConfig};
use sd35_operator::metrics::Metrics;
use sd35_operator::reconcile::{
    ChildStores, Context, Owned, cache_key_of, error_policy, instance_of, reconcile,
    users_of_cache_key,
};
use tracing::{Instrument, error, info, info_span, warn};

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

/// Returns once the ServiceMonitor CRD is served, checking at once and then every minute.
async fn wait_for_service_monitor_crd(client: &Client) {
    loop {
        match client
            .list_api_group_resources("monitoring.coreos.com/v1")
            .await
        {
            Ok(list) if list.resources.iter().any(|r| r.name == "servicemonitors") => {
                info!("the ServiceMonitor CRD is installed: ServiceMonitors are managed");
                return;
            }
            Ok(_) | Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
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

async fn run_controller(
    client: Client,
    args: &Args,
    metrics: Arc<Metrics>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let config = OperatorConfig {
        server_image: args.server_image.clone(),
        hf_endpoint: args.hf_endpoint.clone(),
        job_ttl_seconds: args.job_ttl_seconds,
        startup_seconds: args.startup_seconds,
    };
    let sd35: Api<SD35Deployment> = match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    fn api<K>(client: &Client, ns: Option<&String>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let ns = args.namespace.as_ref();
    let ours =
        watcher::Config::default().labels(&format!("{}={}", labels::MANAGED_BY, labels::MANAGER));
    // One watch per child type feeds the controller's triggers, a cache that the reconciler
    // reads instead of asking the API server, and an index of that cache.
    fn cached<K>(
        api: Api<K>,
        config: watcher::Config,
        index: Option<Index<K>>,
        trim: fn(&mut K),
    ) -> (
        Store<K>,
        impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    )
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let (store, writer) = reflector::store();
        // managedFields (and what `trim` drops) are never read; dropping them keeps the caches
        // small. The index sees each event before the store, so an object that triggers a
        // reconcile is indexed.
        let events = watcher(api, config)
            .default_backoff()
            .modify(move |o| {
                o.managed_fields_mut().clear();
                trim(o);
            })
            .inspect_ok(move |event| {
                if let Some(index) = &index {
                    index.apply_watcher_event(event);
                }
            });
        let stream = reflector(writer, events).touched_objects();
        (store, stream)
    }
    fn owned<K>(
        api: Api<K>,
        config: watcher::Config,
    ) -> (
        Owned<K>,
        impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    )
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let by_owner = Index::new(index::controller_uid::<K>);
        let (store, stream) = cached(api, config, Some(by_owner.clone()), |_| {});
        (Owned { store, by_owner }, stream)
    }
    // Serving Deployments with their specs as JSON text: most of a fleet's cache otherwise.
    let (deployments, deployment_events) =
        owned(api::<CachedDeployment>(&client, ns), ours.clone());
    let (services, service_events) = owned(api::<Service>(&client, ns), ours.clone());
    let (pdbs, pdb_events) = owned(api::<PodDisruptionBudget>(&client, ns), ours.clone());
    let (network_policies, network_policy_events) =
        owned(api::<NetworkPolicy>(&client, ns), ours.clone());
    // ServiceMonitors are watched once their CRD is there; until then the reconciler says
    // that it skips them.
    let service_monitor_crd = Arc::new(AtomicBool::new(false));
    let (service_monitors, service_monitor_events) =
        owned(api::<ServiceMonitor>(&client, ns), ours.clone());
    let service_monitor_events = {
        let (client, installed) = (client.clone(), service_monitor_crd.clone());
        let mut events = Some(service_monitor_events);
        futures::stream::once(async move {
            wait_for_service_monitor_crd(&client).await;
            installed.store(true, Ordering::Relaxed);
        })
        .filter_map(move |()| std::future::ready(events.take()))
        .flatten()
    };
    // Of a Job the reconciler reads its metadata and status (it creates a Job and never
    // compares it with a desired one), of a serving pod its container statuses.
    let (jobs, job_events) = cached(api::<Job>(&client, ns), ours.clone(), None, |j| {
        j.spec = None;
    });
    let (claims, claim_events) = cached(
        api::<PersistentVolumeClaim>(&client, ns),
        ours.clone(),
        None,
        |_| {},
    );
    // Serving pods only: their exit codes say why a server could not start.
    let pods_by_instance = Index::new(instance_of);
    let (pods, pod_events) = cached(
        api::<Pod>(&client, ns),
        watcher::Config::default().labels(&format!(
            "{}={},{}={}",
            labels::MANAGED_BY,
            labels::MANAGER,
            labels::NAME,
            labels::SERVER_NAME
        )),
        Some(pods_by_instance.clone()),
        // Of the spec only the node it runs on (which GPU it got), of the status only how
        // each container ran and ended (why a server could not start).
        |p| {
            p.annotations_mut().clear();
            p.spec = p.spec.take().map(|s| PodSpec {
                node_name: s.node_name,
                ..PodSpec::default()
            });
            p.status = p.status.take().map(|s| PodStatus {
                container_statuses: s.container_statuses.map(|statuses| {
                    statuses
                        .into_iter()
                        .map(|c| ContainerStatus {
                            name: c.name,
                            state: c.state,
                            last_state: c.last_state,
                            ..ContainerStatus::default()
                        })
                        .collect()
                }),
                ..PodStatus::default()
            });
        },
    );
    // Nodes, metadata only (their labels say which GPU they have); read when a status is
    // computed, never a trigger: a relabelled node shows at the next reconcile.
    let (nodes, node_writer) = reflector::store();
    let node_events = reflector(
        node_writer,
        watcher(
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|n| {
            n.managed_fields_mut().clear();
            n.annotations_mut().clear();
        }),
    );
    tokio::spawn(node_events.for_each(|event| async move {
        if let Err(e) = event {
            warn!(error = %e, "watching nodes (for their GPU labels)");
        }
    }));
    // SD35Deployments, indexed by cache key: a Job or claim event finds its users there.
    let users = {
        let (config, metrics) = (config.clone(), metrics.clone());
        Index::new(move |o: &SD35Deployment| cache_key_of(o, &config, &metrics))
    };
    let (store, writer) = reflector::store();
    let user_index = users.clone();
    let sd35_events = reflector(
        writer,
        watcher(sd35, watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(|o| o.managed_fields_mut().clear())
            .inspect_ok(move |event| user_index.apply_watcher_event(event)),
    )
    .applied_objects();
    let controller = Controller::for_stream(sd35_events, store.clone()).with_config(
        ControllerConfig::default()
            .concurrency(args.concurrency)
            .debounce(Duration::from_millis(args.debounce_ms)),
    );
    let (job_users, claim_users) = (users.clone(), users.clone());
    let ctx = Arc::new(Context {
        client: client.clone(),
        config,
        metrics,
        recorder: sd35_operator::events::Recorder::new(
            client.clone(),
            labels::MANAGER,
            args.identity.as_deref(),
        ),
        store,
        users,
        children: ChildStores {
            claims,
            jobs,
            deployments,
            services,
            pdbs,
            network_policies,
            service_monitors,
            service_monitor_crd,
            pods,
            pods_by_instance,
            nodes,
        },
    });
    let mut shutdown = shutdown;
    controller
        .owns_stream(deployment_events)
        .owns_stream(service_events)
        .owns_stream(pdb_events)
        .owns_stream(network_policy_events)
        .owns_stream(service_monitor_events)
        .watches_stream(job_events, move |job: Job| {
            users_of_cache_key(
                &job_users,
                job.namespace().as_deref(),
                job.labels().get(labels::CACHE_KEY).map(String::as_str),
            )
        })
        .watches_stream(pod_events, |pod: Pod| {
            let ns = pod.namespace();
            pod.labels()
                .get(labels::INSTANCE)
                .map(|name| {
                    let r = ObjectRef::<SD35Deployment>::new(name);
                    match ns {
                        Some(ns) => r.within(&ns),
                        None => r,
                    }
                })
                .into_iter()
                .collect::<Vec<_>>()
        })
        .watches_stream(claim_events, move |pvc: PersistentVolumeClaim| {
            users_of_cache_key(
                &claim_users,
                pvc.namespace().as_deref(),
                pvc.labels().get(labels::CACHE_KEY).map(String::as_str),
            )
        })
        .graceful_shutdown_on(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "reconcile loop");
            }
        })
        .await;
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
    let controller = run_controller(client, &args, metrics.clone(), stop_rx.clone())
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
