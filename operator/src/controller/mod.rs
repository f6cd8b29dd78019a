//! The controller: the watches of SD35Deployments and of their children, the caches and
//! indexes they fill, and the reconciler ([`mod@reconcile`]) they trigger.
//!
//! Guarantees: one watch per child kind feeds the controller's triggers, a cache that the
//! reconciler reads instead of asking the API server, and an index of that cache; a change of
//! a child shared by cache key (a Job, its pods, a cache claim) reaches every user of that cache; the
//! controller stops when `shutdown` says so, after the reconciles in flight.

pub mod context;
pub mod reconcile;
mod triggers;
mod watches;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use sd35_crds::SD35Deployment;
use tracing::warn;

pub use context::{ChildStores, Context, ControlledStores, Owned};
pub use reconcile::{Error, error_policy, reconcile};
pub use triggers::{cache_key_of, instance_of, users_of_cache_key};

use crate::children::ServiceMonitor;
use crate::compact::CachedDeployment;
use crate::config::OperatorConfig;
use crate::events::Recorder;
use crate::index::Index;
use crate::labels;
use crate::metrics::Metrics;
use watches::{api, cached, nodes, our_pods, ours, owned, trim_pod, wait_for_service_monitor_crd};

/// How the controller runs, from the operator's flags.
#[derive(Clone, Debug)]
pub struct Settings {
    /// What shapes the children.
    pub config: OperatorConfig,
    /// Watch only this namespace (all namespaces when `None`).
    pub namespace: Option<String>,
    /// SD35Deployments reconciled at once.
    pub concurrency: u16,
    /// How long to wait after a change before reconciling, so that changes arriving meanwhile
    /// are taken in one reconcile.
    pub debounce: Duration,
    /// This replica's identity, reported as the instance of its events.
    pub identity: Option<String>,
}

/// Runs the controller until `shutdown` turns true.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let Settings {
        config,
        namespace,
        concurrency,
        debounce,
        identity,
    } = settings;
    let ns = namespace.as_deref();
    // Serving Deployments with their specs as JSON text: most of a fleet's cache otherwise.
    let (deployments, deployment_events) = owned(api::<CachedDeployment>(&client, ns));
    let (services, service_events) = owned(api::<Service>(&client, ns));
    let (pdbs, pdb_events) = owned(api::<PodDisruptionBudget>(&client, ns));
    let (network_policies, network_policy_events) = owned(api::<NetworkPolicy>(&client, ns));
    // ServiceMonitors are watched once their CRD is there; until then the reconciler says
    // that it skips them.
    let service_monitor_crd = Arc::new(AtomicBool::new(false));
    let (service_monitors, service_monitor_events) = owned(api::<ServiceMonitor>(&client, ns));
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
    // compares it with a desired one).
    let (jobs, job_events) = cached(api::<Job>(&client, ns), ours(), Vec::new(), |j| {
        j.spec = None;
    });
    let (claims, claim_events) = cached(
        api::<PersistentVolumeClaim>(&client, ns),
        ours(),
        Vec::new(),
        |_| {},
    );
    // Serving pods by instance, the pods of Jobs by Job: each kind is keyed by its own label.
    let pods_by_instance = Index::new(triggers::instance_of);
    let pods_by_job = Index::new(triggers::job_of);
    let (pods, pod_events) = cached(
        api::<Pod>(&client, ns),
        our_pods(),
        vec![pods_by_instance.clone(), pods_by_job.clone()],
        trim_pod,
    );
    // SD35Deployments, indexed by cache key: a Job or claim event finds its users there.
    let users = {
        let (config, metrics) = (config.clone(), metrics.clone());
        Index::new(move |o: &SD35Deployment| triggers::cache_key_of(o, &config, &metrics))
    };
    let (store, writer) = reflector::store();
    let user_index = users.clone();
    let sd35 = api::<SD35Deployment>(&client, ns);
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
            .concurrency(concurrency)
            .debounce(debounce),
    );
    let (job_users, claim_users, pod_users) = (users.clone(), users.clone(), users.clone());
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), labels::MANAGER, identity.as_deref()),
        client: client.clone(),
        config,
        metrics,
        store,
        users,
        children: ChildStores {
            claims,
            jobs,
            controlled: ControlledStores {
                deployments,
                services,
                pdbs,
                network_policies,
                service_monitors,
            },
            service_monitor_crd,
            pods,
            pods_by_instance,
            pods_by_job,
            nodes: nodes(&client),
        },
    });
    controller
        .owns_stream(deployment_events)
        .owns_stream(service_events)
        .owns_stream(pdb_events)
        .owns_stream(network_policy_events)
        .owns_stream(service_monitor_events)
        .watches_stream(job_events, move |job: Job| {
            triggers::users_of_cache_key(
                &job_users,
                job.namespace().as_deref(),
                job.labels().get(labels::CACHE_KEY).map(String::as_str),
            )
        })
        .watches_stream(pod_events, move |pod: Pod| {
            triggers::pod_users(&pod_users, &pod)
        })
        .watches_stream(claim_events, move |pvc: PersistentVolumeClaim| {
            triggers::users_of_cache_key(
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
